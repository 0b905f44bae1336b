//! The metadata connection: an ordinary `tokio-postgres` session for everything that is not
//! the replication stream — server settings, privileges, tables and keys, slots, publications,
//! types, walsync's own tables. It pins the same session settings as the replication
//! connection, so values read here render as streamed values do.
//!
//! TLS follows the same `sslmode` rules as the replication client (see
//! `postgres::replication::tls`): tokio-postgres only knows disable/prefer/require, so the
//! verify-* modes run as `require` with the certificate checks in the rustls configuration.

use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::lsn::Lsn;
use crate::postgres::replication::tls::{self, SslMode, TlsError};
use crate::postgres::replication::{ConnectParams, connection_hint};
use crate::postgres::types::{SESSION_SETTINGS, TypeKind};

/// What the catalog says about one captured table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    pub schema: String,
    pub name: String,
    pub oid: u32,
    /// `r` table, `p` partitioned table, `v` view, …
    pub kind: char,
    /// Primary-key column names in key order; empty when there is none.
    pub primary_key: Vec<String>,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    /// Every column, in table order.
    pub columns: Vec<String>,
    /// With replica identity `i`: the columns of the replica identity index.
    pub identity_index: Vec<String>,
}

/// The column names, in index order, of table `c`'s index with the boolean `flag` set in
/// `pg_index` (`indisprimary`, `indisreplident`); an empty array when it has none.
fn index_columns_sql(flag: &str) -> String {
    format!(
        "coalesce(array(
           SELECT a.attname::text
           FROM pg_index i
           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
           WHERE i.indrelid = c.oid AND i.{flag}
           ORDER BY k.position), '{{}}')"
    )
}

/// How waiting for a slot to confirm a position ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotWait {
    Confirmed,
    /// The slot does not exist.
    Missing,
    /// The deadline passed with the slot at `confirmed`; `read_by_nobody` when no walsender
    /// uses it.
    TimedOut {
        confirmed: Lsn,
        read_by_nobody: bool,
    },
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub temporary: bool,
    pub active_pid: Option<i32>,
    pub confirmed_flush_lsn: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// reserved, extended, unreserved or lost.
    pub wal_status: Option<String>,
}

/// The role walsync connects as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub name: String,
    pub superuser: bool,
    pub replication: bool,
    /// Managed-service roles that grant replication (`rds_replication`, …) held by the role.
    pub replication_roles: Vec<String>,
}

impl RoleInfo {
    pub fn can_replicate(&self) -> bool {
        self.superuser || self.replication || !self.replication_roles.is_empty()
    }
}

/// Managed services grant replication through membership in a role instead of the attribute.
const MANAGED_REPLICATION_ROLES: &[&str] = &[
    "rds_replication",
    "rds_superuser",
    "azure_pg_admin",
    "cloudsqlsuperuser",
    "alloydbsuperuser",
];

/// Why the metadata connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{}", describe(.0))]
    Postgres(tokio_postgres::Error),
}

impl ConnectError {
    /// The server's SQLSTATE when the server refused the connection (`28P01`, …).
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Postgres(error) => error.code().map(|code| code.code()),
            Self::Tls(_) => None,
        }
    }
}

/// tokio-postgres's `Display` leaves out the cause: put the server's words and a hint in.
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        let mut text = format!(
            "PostgreSQL refused the metadata connection: {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        );
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!(" (hint: {hint})"));
        }
        text.push_str(connection_hint(db.code().code()));
        return text;
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub struct Catalog {
    client: Client,
}

impl Catalog {
    /// Opens the metadata connection, with TLS as `params.ssl_mode` says.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ConnectError> {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&params.host)
            .port(params.port)
            .user(&params.user)
            .dbname(&params.dbname)
            .application_name(format!("{}-metadata", params.application_name));
        if let Some(password) = &params.password {
            config.password(password);
        }
        let options: String = SESSION_SETTINGS
            .iter()
            .map(|(name, value)| format!("-c {name}={value} "))
            .collect();
        config.options(options.trim_end());
        config.ssl_mode(match params.ssl_mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        });
        let opened = match tls::client_config(params.ssl_mode, params.ca_file.as_deref())? {
            None => open(&config, NoTls).await,
            Some(tls_config) => open(&config, MakeRustlsConnect::new(tls_config)).await,
        };
        let client = opened.map_err(|error| {
            match tls::find_failure(
                &error,
                &params.host,
                params.ssl_mode,
                params.ca_file.as_deref(),
            ) {
                Some(failure) => ConnectError::Tls(failure),
                None => ConnectError::Postgres(error),
            }
        })?;
        Ok(Self { client })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    pub async fn setting(&self, name: &str) -> Result<String, tokio_postgres::Error> {
        let row = self
            .client
            .query_one("SELECT setting FROM pg_settings WHERE name = $1", &[&name])
            .await?;
        Ok(row.get(0))
    }

    pub async fn server_version_num(&self) -> Result<i32, tokio_postgres::Error> {
        Ok(self
            .setting("server_version_num")
            .await?
            .parse()
            .unwrap_or(0))
    }

    pub async fn role(&self) -> Result<RoleInfo, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                "SELECT rolname::text, rolsuper, rolreplication,
                        coalesce(array(SELECT b.rolname::text FROM pg_roles b
                                       WHERE b.rolname = ANY($1) AND pg_has_role(r.oid, b.oid, 'member')), '{}')
                 FROM pg_roles r WHERE rolname = current_user",
                &[&MANAGED_REPLICATION_ROLES],
            )
            .await?;
        Ok(RoleInfo {
            name: row.get(0),
            superuser: row.get(1),
            replication: row.get(2),
            replication_roles: row.get(3),
        })
    }

    /// The table, its primary key in key order and its replica identity; `None` when missing.
    pub async fn table(
        &self,
        schema: &str,
        name: &str,
    ) -> Result<Option<TableInfo>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT c.oid, c.relkind::text, c.relreplident::text,
                            {primary_key},
                            coalesce(array(
                              SELECT a.attname::text FROM pg_attribute a
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                              ORDER BY a.attnum), '{{}}'),
                            {identity_index}
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = $2",
                    primary_key = index_columns_sql("indisprimary"),
                    identity_index = index_columns_sql("indisreplident"),
                ),
                &[&schema, &name],
            )
            .await?;
        Ok(row.map(|row| TableInfo {
            schema: schema.to_owned(),
            name: name.to_owned(),
            oid: row.get(0),
            kind: first_char(row.get(1)),
            replica_identity: first_char(row.get(2)),
            primary_key: row.get(3),
            columns: row.get(4),
            identity_index: row.get(5),
        }))
    }

    /// Waits until slot `name` has confirmed `position` — every change committed before it is in
    /// Kafka, since the source confirms only what Kafka acknowledged — or until `deadline`.
    /// `waiting` hears the confirmed position of every poll that fell short. The one definition
    /// of "the source passed this point", for `backfill` and `verify`.
    pub async fn wait_slot_confirmed(
        &self,
        name: &str,
        position: Lsn,
        deadline: std::time::Instant,
        mut waiting: impl FnMut(Lsn),
    ) -> Result<SlotWait, tokio_postgres::Error> {
        loop {
            let Some(slot) = self.slot(name).await? else {
                return Ok(SlotWait::Missing);
            };
            let confirmed = slot.confirmed_flush_lsn.unwrap_or(Lsn::ZERO);
            if confirmed >= position {
                return Ok(SlotWait::Confirmed);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(SlotWait::TimedOut {
                    confirmed,
                    read_by_nobody: slot.active_pid.is_none(),
                });
            }
            waiting(confirmed);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    pub async fn slot(&self, name: &str) -> Result<Option<SlotInfo>, tokio_postgres::Error> {
        let row = self
            .client
            .query_opt(
                "SELECT slot_name::text, plugin::text, database::text, temporary, active_pid,
                        confirmed_flush_lsn::text, restart_lsn::text, wal_status
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&name],
            )
            .await?;
        Ok(row.map(|row| SlotInfo {
            name: row.get(0),
            plugin: row.get(1),
            database: row.get(2),
            temporary: row.get(3),
            active_pid: row.get(4),
            confirmed_flush_lsn: row
                .get::<_, Option<String>>(5)
                .and_then(|lsn| lsn.parse().ok()),
            restart_lsn: row
                .get::<_, Option<String>>(6)
                .and_then(|lsn| lsn.parse().ok()),
            wal_status: row.get(7),
        }))
    }

    /// The tables a publication publishes, or `None` when it does not exist.
    pub async fn publication_tables(
        &self,
        publication: &str,
    ) -> Result<Option<Vec<(String, String)>>, tokio_postgres::Error> {
        let exists = self
            .client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1",
                &[&publication],
            )
            .await?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let rows = self
            .client
            .query(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                &[&publication],
            )
            .await?;
        Ok(Some(
            rows.iter().map(|row| (row.get(0), row.get(1))).collect(),
        ))
    }

    /// Every type that is not built in, as the codec needs to know it.
    pub async fn custom_types(&self) -> Result<Vec<(u32, TypeKind)>, tokio_postgres::Error> {
        custom_types_of(&self.client).await
    }
}

/// Connects and drives the connection in a task of its own.
async fn open<T>(config: &tokio_postgres::Config, tls: T) -> Result<Client, tokio_postgres::Error>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect(tls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "metadata connection closed");
        }
    });
    Ok(client)
}

fn first_char(text: String) -> char {
    text.chars().next().unwrap_or('?')
}

/// Every type from `pg_type` with what the codec must know about it. Built-in OIDs are
/// harmless to register (the codec keeps its own encoding for them), so nothing is filtered.
pub async fn custom_types_of(
    client: &Client,
) -> Result<Vec<(u32, TypeKind)>, tokio_postgres::Error> {
    let rows = client
            .query(
                "SELECT t.oid, t.typtype::text, t.typbasetype, t.typelem, coalesce(e.typdelim::text, ','),
                        t.typcategory::text
                 FROM pg_type t LEFT JOIN pg_type e ON e.oid = t.typelem
",
                &[],
            )
            .await?;
    Ok(rows
        .iter()
        .map(|row| {
            let oid: u32 = row.get(0);
            let typtype = first_char(row.get(1));
            let element: u32 = row.get(3);
            let category = first_char(row.get(5));
            let kind = match typtype {
                'e' => TypeKind::Enum,
                'd' => TypeKind::Domain {
                    base_oid: row.get(2),
                },
                'c' => TypeKind::Composite,
                'r' | 'm' => TypeKind::Range,
                _ if category == 'A' && element != 0 => TypeKind::Array {
                    element_oid: element,
                    delimiter: first_char(row.get(4)) as u8,
                },
                _ => TypeKind::Other,
            };
            (oid, kind)
        })
        .collect())
}
