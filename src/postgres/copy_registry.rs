//! The registry of copies that run in another process than the source (`walsync backfill`):
//! rows of `walsync.copy_registrations` through which such a copy and the source streaming its
//! slot agree on when the table's deletes become soft tombstones and when those are purged
//! (design invariant 5; the in-process side is `crate::source::copies`).
//!
//! The handshake, one row per copy:
//! 1. The copy inserts its row (`requested`) and, in the same statement, takes a session
//!    advisory lock on the row's id. It waits for `registered` **before it creates its
//!    temporary slot**: the source registered the table first, so every delete committed at or
//!    after the copy's consistent point is read by the stream after the registration.
//! 2. Once Kafka acknowledged every row of the copy, the copy sets `copied` (with its
//!    consistent point) and waits for `completed`: the source unregistered the table under its
//!    delete gate and wrote the `copy_completed` control records after every marked delete.
//! 3. The copy deletes its row and releases the lock.
//!
//! A copy that dies loses its session and with it the lock. The source then completes the
//! registration as if copied: the dead copy's producer is gone, so every row it wrote is
//! already in the topic, before the control records. (A row the broker was still receiving
//! when the copy's connection to PostgreSQL broke is the exception; the copy's error says to
//! run the backfill again, which rewrites it.) A source that restarts registers again every
//! row it finds before it streams.

use tokio_postgres::Client;

use crate::lsn::Lsn;

/// The first key of the two-key advisory locks on registration ids ("ws").
const LOCK_CLASS: i32 = 0x7773;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("reading or writing walsync.copy_registrations failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(
        "walsync.copy_registrations holds an unknown state {0:?} (written by a newer walsync?)"
    )]
    UnknownState(String),
    #[error("walsync.copy_registrations holds a consistent point that is not an LSN: {0:?}")]
    BadConsistentPoint(String),
}

/// Where a registered copy is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationState {
    /// Inserted by the copy; the source has not registered the table yet.
    Requested,
    /// The source marks the table's deletes for soft tombstones.
    Registered,
    /// Every row of the copy is in Kafka.
    Copied,
    /// The source wrote the control records; the copy may go.
    Completed,
}

impl RegistrationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Registered => "registered",
            Self::Copied => "copied",
            Self::Completed => "completed",
        }
    }

    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        Ok(match text {
            "requested" => Self::Requested,
            "registered" => Self::Registered,
            "copied" => Self::Copied,
            "completed" => Self::Completed,
            other => return Err(RegistryError::UnknownState(other.to_owned())),
        })
    }
}

/// One registered copy, as the source sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: i32,
    pub schema: String,
    pub table: String,
    pub topic: String,
    pub state: RegistrationState,
    /// Set with [`RegistrationState::Copied`].
    pub consistent_point: Option<Lsn>,
}

impl Registration {
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// The copy's side: its row, and the lock that says it is alive.
#[derive(Debug)]
pub struct CopyRegistration {
    id: i32,
}

impl CopyRegistration {
    /// Registers a copy of `schema.table` (events to `topic`) for the source streaming `slot`.
    /// `client`'s session holds the registration's lock until [`Self::remove`] or until the
    /// session ends.
    pub async fn request(
        client: &Client,
        slot: &str,
        schema: &str,
        table: &str,
        topic: &str,
    ) -> Result<Self, RegistryError> {
        let row = client
            .query_one(
                "WITH registered AS (
                     INSERT INTO walsync.copy_registrations (slot_name, schema_name, table_name, topic)
                     VALUES ($1, $2, $3, $4) RETURNING id
                 )
                 SELECT id, pg_advisory_lock($5, id) FROM registered",
                &[&slot, &schema, &table, &topic, &LOCK_CLASS],
            )
            .await?;
        Ok(Self { id: row.get(0) })
    }

    pub fn id(&self) -> i32 {
        self.id
    }

    /// The registration's state; `None` once its row is gone.
    pub async fn state(&self, client: &Client) -> Result<Option<RegistrationState>, RegistryError> {
        let row = client
            .query_opt(
                "SELECT state FROM walsync.copy_registrations WHERE id = $1",
                &[&self.id],
            )
            .await?;
        row.map(|row| RegistrationState::parse(row.get(0)))
            .transpose()
    }

    /// Every row of the copy, read under `consistent_point`, is in Kafka.
    pub async fn mark_copied(
        &self,
        client: &Client,
        consistent_point: Lsn,
    ) -> Result<(), RegistryError> {
        client
            .execute(
                "UPDATE walsync.copy_registrations
                    SET state = 'copied', consistent_point = $2, updated_at = now()
                  WHERE id = $1",
                &[&self.id, &consistent_point.to_string()],
            )
            .await?;
        Ok(())
    }

    /// Deletes the row and releases the lock.
    pub async fn remove(self, client: &Client) -> Result<(), RegistryError> {
        remove(client, self.id).await?;
        client
            .execute(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&LOCK_CLASS, &self.id],
            )
            .await?;
        Ok(())
    }
}

/// The registrations for the source streaming `slot`, oldest first.
pub async fn registrations(
    client: &Client,
    slot: &str,
) -> Result<Vec<Registration>, RegistryError> {
    let rows = client
        .query(
            "SELECT id, schema_name, table_name, topic, state, consistent_point
               FROM walsync.copy_registrations WHERE slot_name = $1 ORDER BY id",
            &[&slot],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let consistent_point = row
                .get::<_, Option<String>>(5)
                .map(|text| {
                    text.parse::<Lsn>()
                        .map_err(|_| RegistryError::BadConsistentPoint(text))
                })
                .transpose()?;
            Ok(Registration {
                id: row.get(0),
                schema: row.get(1),
                table: row.get(2),
                topic: row.get(3),
                state: RegistrationState::parse(row.get(4))?,
                consistent_point,
            })
        })
        .collect()
}

/// Moves a registration to `state` (the source's side).
pub async fn set_state(
    client: &Client,
    id: i32,
    state: RegistrationState,
) -> Result<(), RegistryError> {
    client
        .execute(
            "UPDATE walsync.copy_registrations SET state = $2, updated_at = now() WHERE id = $1",
            &[&id, &state.as_str()],
        )
        .await?;
    Ok(())
}

/// Whether the copy that made registration `id` is gone: nobody holds its lock. Taking the lock
/// to find out releases it at once.
pub async fn owner_is_gone(client: &Client, id: i32) -> Result<bool, RegistryError> {
    let taken: bool = client
        .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_CLASS, &id])
        .await?
        .get(0);
    if taken {
        client
            .execute("SELECT pg_advisory_unlock($1, $2)", &[&LOCK_CLASS, &id])
            .await?;
    }
    Ok(taken)
}

/// Deletes registration `id`.
pub async fn remove(client: &Client, id: i32) -> Result<(), RegistryError> {
    client
        .execute(
            "DELETE FROM walsync.copy_registrations WHERE id = $1",
            &[&id],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_stored_names() {
        for state in [
            RegistrationState::Requested,
            RegistrationState::Registered,
            RegistrationState::Copied,
            RegistrationState::Completed,
        ] {
            assert_eq!(RegistrationState::parse(state.as_str()).unwrap(), state);
        }
        assert!(matches!(
            RegistrationState::parse("paused"),
            Err(RegistryError::UnknownState(state)) if state == "paused"
        ));
    }
}
