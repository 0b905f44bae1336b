//! Re-reading one row by its key: the last source of the sink's TOAST fill
//! ([`crate::sink::toast`]), behind [`crate::event::rows::RowSource`].
//!
//! Owns the SQL of the re-read and its safety argument:
//!
//! - **Bound, typed parameters.** The key's values travel as parameters, never as SQL text:
//!   each is the PostgreSQL input text of the record key's JSON value
//!   ([`Codec::postgres_text`], the codec's inverse), bound as `text` and cast to the column's
//!   type (`$1::text::<format_type(type, -1)>`), so `bytea`, arrays, timestamps and every other key type
//!   compare by value and the primary key's index is used. Identifiers are quoted; type names
//!   come from `format_type`, which quotes them too. Statements are prepared once per table
//!   and column list.
//! - **The table comes from the caller**, which names the table the record's topic belongs to,
//!   never one taken from the record.
//! - **Values as the source prints them.** The connection pins the source's session settings
//!   (`SESSION_SETTINGS`); values are read through each type's output function
//!   (`format('%s', column)`, not `::text`, which differs for `bool`, `inet`, `char(n)`…) and
//!   encoded by the source's codec, so a re-read value equals a streamed one byte for byte.
//! - **Only once the event's transaction is visible.** A commit record is flushed, decoded and
//!   streamed before the commit becomes visible to other sessions — for as long as a
//!   synchronous standby takes to confirm it. A key change read in that window would find the
//!   table as it was before its own transaction (the deleted row that had the key, or no row).
//!   The statement therefore reads, in its one snapshot, whether the event's `txId` is visible
//!   (`pg_visible_in_snapshot`, with the epoch taken from the snapshot's `xmax`) beside the row;
//!   an invisible transaction is waited for while the commit log says it is in progress or
//!   committed, and dead-letters the event when it was rolled back or never assigned (a record
//!   this cluster did not write).
//! - **The view of the table follows the table.** The table's columns and their types are
//!   cached per connection, and each read returns every requested and key column's type as it
//!   is now (`pg_typeof`): a requested column the cache lacks (added since), a type that
//!   changed, or a statement refused for a data or type error (a key value the old type cannot
//!   hold) makes the reader read the catalog (and the types created since) again and retry
//!   once before it concludes — also before concluding that the row is gone (when a catalog
//!   query finds the key columns retyped), or that its key
//!   cannot be read back. Key values are cast to the type without its modifier
//!   (`character varying`, not `character varying(5)`; `bpchar`, not `character`, which is
//!   `character(1)`): a cast to a shorter length would truncate the key and find another row.
//! - **Dispositions.** A connection failure, a restart or an overload (the PostgreSQL rule,
//!   [`super::disposition`]) is [`RowSourceError::Transient`] (the caller waits and retries,
//!   with a fresh connection); a table or key column that no longer exists, or a key that
//!   cannot be read back, is [`RowSourceError::Permanent`]. One refinement of the rule belongs
//!   to the re-read alone: its prepared statement going stale (a column dropped or retyped
//!   since, 42703/0A000/26000/42804) is retried with a fresh view of the table. A requested
//!   column that was dropped is reported in [`RowRead::Found::dropped`] and left out.

use std::collections::HashMap;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex;
use tokio_postgres::Statement;
use tokio_postgres::types::Type;

use crate::event::rows::{RowAddress, RowRead, RowSource, RowSourceError};
use crate::event::{RawRow, raw_value};
use crate::postgres::catalog::Catalog;
use crate::postgres::replication::{ConnectParams, quote_identifier};
use crate::postgres::types::{Codec, CodecOptions};
use crate::retry::Disposition;

/// Re-reads rows from PostgreSQL; connects on first use and again after a failure.
pub struct PostgresRowReader {
    params: ConnectParams,
    codec_options: CodecOptions,
    connection: Mutex<Option<Connection>>,
}

struct Connection {
    catalog: Catalog,
    codec: Codec,
    /// By `(schema, table)`: column name → (type OID, the type's name without its modifier:
    /// `character varying`, not `character varying(5)`, which a cast would truncate to; and
    /// `bpchar`, not `character`, which means `character(1)` — `format_type(oid, -1)`).
    columns: HashMap<(String, String), HashMap<String, (u32, String)>>,
    statements: HashMap<String, Statement>,
}

impl PostgresRowReader {
    pub fn new(params: ConnectParams, codec_options: CodecOptions) -> Self {
        Self {
            params,
            codec_options,
            connection: Mutex::new(None),
        }
    }

    async fn read(
        &self,
        address: RowAddress<'_>,
        key: &RawRow,
        columns: &[String],
        transaction: u64,
    ) -> Result<RowRead, RowSourceError> {
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            *slot = Some(self.connect().await?);
        }
        let Some(connection) = slot.as_mut() else {
            return Err(RowSourceError::Transient("not connected".into()));
        };
        let mut attempt = connection.read(address, key, columns, transaction).await;
        if matches!(attempt, Ok(Attempt::Stale)) {
            // The table changed since this connection last looked (a column added, retyped,
            // or of a type created since): look again, once.
            connection.forget(address).await?;
            attempt = connection.read(address, key, columns, transaction).await;
        }
        match attempt {
            Ok(Attempt::Read(read)) => Ok(read),
            Ok(Attempt::Stale) => Err(RowSourceError::Transient(format!(
                "table {}.{} changed while it was read",
                address.schema, address.table
            ))),
            Ok(Attempt::NotVisibleYet) => Err(RowSourceError::Transient(format!(
                "the event's transaction {transaction} is not visible yet (its commit waits for a synchronous standby)"
            ))),
            Err(error) => {
                if matches!(error, RowSourceError::Transient(_)) {
                    // The next attempt starts from a fresh connection and view of the table.
                    *slot = None;
                }
                Err(error)
            }
        }
    }

    async fn connect(&self) -> Result<Connection, RowSourceError> {
        let catalog = Catalog::connect(&self.params).await.map_err(|error| {
            RowSourceError::Transient(format!(
                "cannot connect to PostgreSQL to re-read unchanged TOAST values: {error}"
            ))
        })?;
        let mut connection = Connection {
            catalog,
            codec: Codec::new(self.codec_options),
            columns: HashMap::new(),
            statements: HashMap::new(),
        };
        connection.learn_types().await?;
        Ok(connection)
    }
}

impl RowSource for PostgresRowReader {
    fn read_row<'a>(
        &'a self,
        address: RowAddress<'a>,
        key: &'a RawRow,
        columns: &'a [String],
        transaction: u64,
    ) -> BoxFuture<'a, Result<RowRead, RowSourceError>> {
        self.read(address, key, columns, transaction).boxed()
    }
}

/// The outcome of one attempt at a re-read.
enum Attempt {
    Read(RowRead),
    /// The connection's view of the table is out of date: a requested column it does not
    /// know, or a column whose type is not the one it knows.
    Stale,
    /// The event's own transaction is not visible to the read yet.
    NotVisibleYet,
}

/// What the commit log says of a full transaction id (`pg_xact_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XactStatus {
    Committed,
    Aborted,
    InProgress,
    /// Older than the commit log keeps: finished long ago.
    Forgotten,
    /// Not assigned yet.
    Future,
}

/// The outcome for an event whose transaction the statement's snapshot does not show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invisible {
    /// Committed or in progress: its commit waits (for a synchronous standby, say).
    Wait,
    /// It is in the epoch before the one nearest xmax, long committed: the row read is valid.
    VisibleAfterAll,
}

/// Why an event's transaction can never become visible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Never {
    RolledBack,
    Assigned,
}

/// Decides on an invisible transaction from the status of its nearest candidate and, when that
/// one is not assigned yet, of the candidate one epoch earlier. The nearest candidate is right
/// for every event less than 2³¹ transactions old; an older event (a compacted topic replayed,
/// a sink far behind) has its id in the epoch before. The stream carries committed
/// transactions only, so an earlier candidate that is committed or forgotten is the event's.
fn invisibility_verdict(
    nearest: XactStatus,
    older: Option<XactStatus>,
) -> Result<Invisible, Never> {
    match (nearest, older) {
        (XactStatus::Aborted, _) => Err(Never::RolledBack),
        (XactStatus::Future, Some(XactStatus::Committed | XactStatus::Forgotten)) => {
            Ok(Invisible::VisibleAfterAll)
        }
        (XactStatus::Future, Some(XactStatus::Aborted)) => Err(Never::RolledBack),
        (XactStatus::Future, _) => Err(Never::Assigned),
        (XactStatus::Committed | XactStatus::InProgress | XactStatus::Forgotten, _) => {
            Ok(Invisible::Wait)
        }
    }
}

/// Whether transaction `$parameter` (a 32-bit xid as text; 0 for none) is visible in
/// `snapshot` (an SQL expression of type `pg_snapshot`; the reader passes
/// `pg_current_snapshot()`), and its full (epoch-qualified) id as text.
///
/// The full id is the one nearest the snapshot's `xmax` whose low 32 bits are the xid: `xmax`
/// plus the xid's signed 32-bit distance from `xmax`'s low bits. Live xids are within 2³¹ of
/// each other (wraparound protection), so this names the right epoch both for an xid below
/// `xmax` (committed, possibly in the epoch before, when the counter wrapped since) and for one
/// at or above it (still finishing its commit, in `xmax`'s epoch). An event more than 2³¹
/// transactions old gets an id in the future; the reader then tries the epoch before
/// ([`invisibility_verdict`]). An id that would fall below zero cannot be this cluster's; it
/// is moved into the future too. Public for its tests against a real server (tests/replication.rs).
pub fn transaction_visibility_sql(parameter: usize, snapshot: &str) -> String {
    format!(
        "SELECT CASE WHEN x = 0 THEN true ELSE pg_visible_in_snapshot(f::text::xid8, snap) END, f::text \
         FROM (SELECT snap, x, CASE WHEN a < 0 THEN a + 4294967296 ELSE a END AS f \
               FROM (SELECT snap, x, m + (x - (m & 4294967295) + 6442450944) % 4294967296 - 2147483648 AS a \
                     FROM (SELECT snap, pg_snapshot_xmax(snap)::text::bigint AS m, ${parameter}::text::bigint AS x \
                           FROM (SELECT {snapshot} AS snap) s0) s1) s2) s3"
    )
}

impl Connection {
    async fn read(
        &mut self,
        address: RowAddress<'_>,
        key: &RawRow,
        columns: &[String],
        transaction: u64,
    ) -> Result<Attempt, RowSourceError> {
        let RowAddress { schema, table } = address;
        let (table_columns, loaded_now) = self.table_columns(schema, table).await?;
        let table_columns = table_columns.clone();
        if loaded_now
            && table_columns
                .values()
                .any(|(oid, _)| !self.codec.knows(*oid))
        {
            // A type created after this connection learned them (a new domain or enum).
            self.learn_types().await?;
        }
        let qualified = format!("{schema}.{table}");
        let (present, dropped): (Vec<&String>, Vec<&String>) = columns
            .iter()
            .partition(|column| table_columns.contains_key(*column));
        if !dropped.is_empty() && !loaded_now {
            return Ok(Attempt::Stale);
        }
        let mut conditions = Vec::with_capacity(key.len());
        let mut parameters: Vec<Option<String>> = Vec::with_capacity(key.len() + 1);
        for (position, (column, value)) in key.iter().enumerate() {
            let Some((oid, type_name)) = table_columns.get(column) else {
                if !loaded_now {
                    return Ok(Attempt::Stale);
                }
                return Err(RowSourceError::Permanent(format!(
                    "table {qualified}: key column {column} no longer exists"
                )));
            };
            let text = match self.codec.postgres_text(*oid, value.get()) {
                Ok(text) => text,
                // Perhaps read back as a type the column no longer has.
                Err(_) if !loaded_now => return Ok(Attempt::Stale),
                Err(error) => {
                    return Err(RowSourceError::Permanent(format!(
                        "table {qualified}: key column {column} cannot be read back: {error}"
                    )));
                }
            };
            conditions.push(format!(
                "{} = ${}::text::{type_name}",
                quote_identifier(column),
                position + 1
            ));
            parameters.push(text);
        }
        if conditions.is_empty() {
            return Err(RowSourceError::Permanent(format!(
                "table {qualified}: the record key has no columns"
            )));
        }
        parameters.push(Some(transaction.to_string()));
        // Per column: its type now, whether it is NULL, and its output text (format's %s
        // prints NULL as ''). The row is joined to the visibility of the event's transaction,
        // both read in the statement's one snapshot.
        let mut select = vec!["true AS found".to_owned()];
        let mut outer = vec![
            "v.visible".to_owned(),
            "v.xid".to_owned(),
            "r.found".to_owned(),
        ];
        for (position, column) in present.iter().enumerate() {
            let quoted = quote_identifier(column);
            select.push(format!(
                "pg_typeof({quoted})::oid AS t{position}, {quoted} IS NULL AS n{position}, format('%s', {quoted}) AS v{position}"
            ));
            outer.push(format!("r.t{position}, r.n{position}, r.v{position}"));
        }
        // The key columns' types now: the key was cast to the types this connection knows.
        for (position, (column, _)) in key.iter().enumerate() {
            select.push(format!(
                "pg_typeof({})::oid AS k{position}",
                quote_identifier(column)
            ));
            outer.push(format!("r.k{position}"));
        }
        let sql = format!(
            "SELECT {} FROM ({}) v(visible, xid) LEFT JOIN (SELECT {} FROM {}.{} WHERE {}) r ON true",
            outer.join(", "),
            transaction_visibility_sql(key.len() + 1, "pg_current_snapshot()"),
            select.join(", "),
            quote_identifier(schema),
            quote_identifier(table),
            conditions.join(" AND ")
        );
        let statement = match self.statement(&sql, parameters.len()).await {
            Err(error) if !loaded_now && may_be_a_stale_view(&error) => return Ok(Attempt::Stale),
            other => other.map_err(postgres_error)?,
        };
        let parameters: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = parameters
            .iter()
            .map(|parameter| parameter as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let row = match self
            .catalog
            .client()
            .query_one(&statement, &parameters)
            .await
        {
            // A key value the old type cannot hold (int4 → int8: 22003), or that no longer
            // compares with it (42883): look at the table again before concluding.
            Err(error) if !loaded_now && may_be_a_stale_view(&error) => return Ok(Attempt::Stale),
            other => other.map_err(postgres_error)?,
        };
        let visible: bool = row.get(0);
        if !visible {
            let xid: String = row.get(1);
            match self.invisible_transaction(&xid, transaction).await? {
                Invisible::Wait => return Ok(Attempt::NotVisibleYet),
                Invisible::VisibleAfterAll => {}
            }
        }
        let found: Option<bool> = row.get(2);
        if found.is_none() {
            // A key cast to a type the column no longer has may compare unequal to every row
            // (real → double precision): only a fresh view concludes that the row is gone.
            if !loaded_now
                && !self
                    .key_types_unchanged(address, key, &table_columns)
                    .await?
            {
                return Ok(Attempt::Stale);
            }
            return Ok(Attempt::Read(RowRead::Gone));
        }
        let key_types_at = 3 + present.len() * 3;
        for (position, (column, _)) in key.iter().enumerate() {
            let type_now: u32 = row.get(key_types_at + position);
            if table_columns.get(column).map(|(oid, _)| *oid) != Some(type_now) {
                return Ok(Attempt::Stale);
            }
        }
        let mut values = RawRow::default();
        for (position, column) in present.iter().enumerate() {
            let (oid, _) = &table_columns[*column];
            let type_now: u32 = row.get(3 + position * 3);
            if type_now != *oid {
                return Ok(Attempt::Stale);
            }
            let is_null: bool = row.get(4 + position * 3);
            let json = if is_null {
                b"null".to_vec()
            } else {
                let text: String = row.get(5 + position * 3);
                let mut json = Vec::with_capacity(text.len() + 2);
                self.codec
                    .write_json(&mut json, *oid, text.as_bytes())
                    .map_err(|error| {
                        RowSourceError::Permanent(format!(
                            "table {qualified}: column {column} cannot be encoded: {error}"
                        ))
                    })?;
                json
            };
            let value = raw_value(json).map_err(|error| {
                RowSourceError::Permanent(format!(
                    "table {qualified}: column {column} encoded as invalid JSON: {error}"
                ))
            })?;
            values.insert((*column).clone(), value);
        }
        Ok(Attempt::Read(RowRead::Found {
            values,
            dropped: dropped.into_iter().cloned().collect(),
        }))
    }

    /// Why the event's transaction (full id `xid`, the candidate nearest the snapshot's xmax) is
    /// not visible, by the commit log ([`invisibility_verdict`]): still finishing its commit
    /// (wait), visible after all (the event is older than 2³¹ transactions: its id is in the
    /// epoch before), or never a committed transaction of this cluster.
    async fn invisible_transaction(
        &self,
        xid: &str,
        transaction: u64,
    ) -> Result<Invisible, RowSourceError> {
        let nearest = self.transaction_status(xid).await?;
        let older = match (nearest, xid.parse::<u64>()) {
            (XactStatus::Future, Ok(full)) => match full.checked_sub(1 << 32) {
                Some(older) => Some(self.transaction_status(&older.to_string()).await?),
                None => None,
            },
            _ => None,
        };
        invisibility_verdict(nearest, older).map_err(|never| {
            RowSourceError::Permanent(match never {
                Never::RolledBack => format!(
                    "the event's transaction {transaction} was rolled back in this PostgreSQL cluster"
                ),
                Never::Assigned => format!(
                    "the event's transaction {transaction} was never assigned by this PostgreSQL cluster"
                ),
            })
        })
    }

    /// Whether the key columns still have the types the cached view casts the key to (one
    /// catalog query; a full reload would clear every prepared statement).
    async fn key_types_unchanged(
        &self,
        address: RowAddress<'_>,
        key: &RawRow,
        cached: &HashMap<String, (u32, String)>,
    ) -> Result<bool, RowSourceError> {
        let names: Vec<String> = key.iter().map(|(column, _)| column.to_owned()).collect();
        let rows = self
            .catalog
            .client()
            .query(
                "SELECT a.attname::text, a.atttypid
                 FROM pg_attribute a
                 JOIN pg_class c ON c.oid = a.attrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2 AND a.attname = ANY($3) AND NOT a.attisdropped",
                &[&address.schema, &address.table, &names],
            )
            .await
            .map_err(postgres_error)?;
        Ok(rows.len() == names.len()
            && rows.iter().all(|row| {
                let (column, oid): (String, u32) = (row.get(0), row.get(1));
                cached.get(&column).map(|(cached, _)| *cached) == Some(oid)
            }))
    }

    /// The commit log's word on a full transaction id.
    async fn transaction_status(&self, xid: &str) -> Result<XactStatus, RowSourceError> {
        let status = self
            .catalog
            .client()
            .query_one("SELECT pg_xact_status($1::text::xid8)", &[&xid])
            .await;
        match status {
            Ok(row) => Ok(match row.get::<_, Option<String>>(0).as_deref() {
                Some("committed") => XactStatus::Committed,
                Some("aborted") => XactStatus::Aborted,
                Some(_) => XactStatus::InProgress,
                // Older than the commit log keeps.
                None => XactStatus::Forgotten,
            }),
            // 22023: "transaction ID … is in the future".
            Err(error)
                if error.code()
                    == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE) =>
            {
                Ok(XactStatus::Future)
            }
            Err(error) => Err(postgres_error(error)),
        }
    }

    /// Forgets what this connection knows of the table, and learns the types created since.
    async fn forget(&mut self, address: RowAddress<'_>) -> Result<(), RowSourceError> {
        self.columns
            .remove(&(address.schema.to_owned(), address.table.to_owned()));
        self.statements.clear();
        self.learn_types().await
    }

    /// Registers every type of `pg_type` with the codec.
    async fn learn_types(&mut self) -> Result<(), RowSourceError> {
        let types = self.catalog.custom_types().await.map_err(postgres_error)?;
        for (oid, kind) in types {
            self.codec.register(oid, kind);
        }
        Ok(())
    }

    async fn statement(
        &mut self,
        sql: &str,
        parameters: usize,
    ) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let types = vec![Type::TEXT; parameters];
        let statement = self.catalog.client().prepare_typed(sql, &types).await?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// The table's columns as this connection knows them, and whether they were read just now
    /// (they are read again after a transient failure, a new connection, or [`Self::forget`]).
    async fn table_columns(
        &mut self,
        schema: &str,
        table: &str,
    ) -> Result<(&HashMap<String, (u32, String)>, bool), RowSourceError> {
        let name = (schema.to_owned(), table.to_owned());
        let loaded_now = !self.columns.contains_key(&name);
        if loaded_now {
            let rows = self
                .catalog
                .client()
                .query(
                    "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, -1)
                     FROM pg_attribute a
                     JOIN pg_class c ON c.oid = a.attrelid
                     JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
                    &[&schema, &table],
                )
                .await
                .map_err(postgres_error)?;
            if rows.is_empty() {
                return Err(RowSourceError::Permanent(format!(
                    "table {schema}.{table} no longer exists (or walsync's role cannot see it)"
                )));
            }
            let columns = rows
                .iter()
                .map(|row| (row.get(0), (row.get(1), row.get(2))))
                .collect();
            self.columns.insert(name.clone(), columns);
        }
        Ok((&self.columns[&name], loaded_now))
    }
}

/// Whether a refused re-read may come from a view of the table older than the table: a data
/// exception (class 22: a key value out of the old type's range or length) or a syntax or
/// access rule violation (class 42: an operator or column that no longer fits).
fn may_be_a_stale_view(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| code.code().starts_with("22") || code.code().starts_with("42"))
}

fn postgres_error(error: tokio_postgres::Error) -> RowSourceError {
    if super::disposition(&error) == Disposition::Retry {
        RowSourceError::Transient(format!("PostgreSQL: {error}"))
    } else {
        let detail = error
            .as_db_error()
            .map_or_else(|| error.to_string(), |db| db.message().to_owned());
        // A column dropped or a type changed since the statement was prepared, or a column
        // list that changed: the view of the table is stale, so try again with a fresh one.
        match error.code().map(|code| code.code()) {
            Some("42703" | "0A000" | "26000" | "42804") => {
                RowSourceError::Transient(format!("PostgreSQL (the table changed): {detail}"))
            }
            _ => RowSourceError::Permanent(format!("PostgreSQL refused the re-read: {detail}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use XactStatus::{Aborted, Committed, Forgotten, Future, InProgress};

    #[test]
    fn a_transaction_finishing_its_commit_is_waited_for() {
        assert_eq!(invisibility_verdict(Committed, None), Ok(Invisible::Wait));
        assert_eq!(invisibility_verdict(InProgress, None), Ok(Invisible::Wait));
    }

    #[test]
    fn an_event_older_than_half_the_id_space_is_in_the_epoch_before() {
        // 3000000000:3000000000: with xid 500000000 — 2.5·10⁹ transactions old, not in progress.
        assert_eq!(
            invisibility_verdict(Future, Some(Committed)),
            Ok(Invisible::VisibleAfterAll)
        );
        assert_eq!(
            invisibility_verdict(Future, Some(Forgotten)),
            Ok(Invisible::VisibleAfterAll)
        );
    }

    #[test]
    fn ids_this_cluster_never_committed_are_refused() {
        assert_eq!(invisibility_verdict(Aborted, None), Err(Never::RolledBack));
        assert_eq!(
            invisibility_verdict(Future, Some(Aborted)),
            Err(Never::RolledBack)
        );
        assert_eq!(invisibility_verdict(Future, None), Err(Never::Assigned));
        assert_eq!(
            invisibility_verdict(Future, Some(InProgress)),
            Err(Never::Assigned)
        );
        assert_eq!(
            invisibility_verdict(Future, Some(Future)),
            Err(Never::Assigned)
        );
    }
}
