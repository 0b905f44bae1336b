//! Re-reading one row by its key: the last source of the sink's TOAST fill
//! ([`crate::sink::toast`]).
//!
//! Owns the SQL of the re-read and its safety argument:
//!
//! - **Bound, typed parameters.** The key's values travel as parameters, never as SQL text:
//!   each is the PostgreSQL input text of the record key's JSON value
//!   ([`Codec::postgres_text`], the codec's inverse), bound as `text` and cast to the column's
//!   type (`$1::text::<format_type>`), so `bytea`, arrays, timestamps and every other key type
//!   compare by value and the primary key's index is used. Identifiers are quoted; type names
//!   come from `format_type`, which quotes them too. Statements are prepared once per table
//!   and column list.
//! - **The table comes from the caller**, which names the table the record's topic belongs to,
//!   never one taken from the record.
//! - **Values as the source prints them.** The connection pins the source's session settings
//!   (`SESSION_SETTINGS`); values are read through each type's output function
//!   (`format('%s', column)`, not `::text`, which differs for `bool`, `inet`, `char(n)`…) and
//!   encoded by the source's codec, so a re-read value equals a streamed one byte for byte.
//! - **Dispositions.** A connection failure, a restart or an overload
//!   (the PostgreSQL rule, [`super::disposition`]) is [`RowSourceError::Transient`] (the caller waits and retries,
//!   with a fresh connection); a table or key column that no longer exists, or a key that
//!   cannot be read back, is [`RowSourceError::Permanent`]. One refinement of the rule belongs to
//!   the re-read alone: its prepared statement going stale (a column dropped or retyped since,
//!   42703/0A000/26000/42804) is retried with a fresh view of the table. A requested column that was dropped
//!   is reported in [`RowRead::Found::dropped`] and left out.

use std::collections::HashMap;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex;
use tokio_postgres::Statement;

use crate::retry::Disposition;
use tokio_postgres::types::Type;

use crate::event::{RawRow, raw_value};
use crate::postgres::catalog::Catalog;
use crate::postgres::replication::{ConnectParams, quote_identifier};
use crate::postgres::types::{Codec, CodecOptions};
use crate::sink::toast::{RowRead, RowSource, RowSourceError};

/// Re-reads rows from PostgreSQL; connects on first use and again after a failure.
pub struct PostgresRowReader {
    params: ConnectParams,
    codec_options: CodecOptions,
    connection: Mutex<Option<Connection>>,
}

struct Connection {
    catalog: Catalog,
    codec: Codec,
    /// By `(schema, table)`: column name → (type OID, `format_type`).
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
        schema: &str,
        table: &str,
        key: &RawRow,
        columns: &[String],
    ) -> Result<RowRead, RowSourceError> {
        let mut slot = self.connection.lock().await;
        if slot.is_none() {
            *slot = Some(self.connect().await?);
        }
        let Some(connection) = slot.as_mut() else {
            return Err(RowSourceError::Transient("not connected".into()));
        };
        let result = connection.read(schema, table, key, columns).await;
        if matches!(result, Err(RowSourceError::Transient(_))) {
            // The next attempt starts from a fresh connection and a fresh view of the table.
            *slot = None;
        }
        result
    }

    async fn connect(&self) -> Result<Connection, RowSourceError> {
        let catalog = Catalog::connect(&self.params).await.map_err(|error| {
            RowSourceError::Transient(format!(
                "cannot connect to PostgreSQL to re-read unchanged TOAST values: {error}"
            ))
        })?;
        let mut codec = Codec::new(self.codec_options);
        let types = catalog.custom_types().await.map_err(postgres_error)?;
        for (oid, kind) in types {
            codec.register(oid, kind);
        }
        Ok(Connection {
            catalog,
            codec,
            columns: HashMap::new(),
            statements: HashMap::new(),
        })
    }
}

impl RowSource for PostgresRowReader {
    fn read_row<'a>(
        &'a self,
        schema: &'a str,
        table: &'a str,
        key: &'a RawRow,
        columns: &'a [String],
    ) -> BoxFuture<'a, Result<RowRead, RowSourceError>> {
        self.read(schema, table, key, columns).boxed()
    }
}

impl Connection {
    async fn read(
        &mut self,
        schema: &str,
        table: &str,
        key: &RawRow,
        columns: &[String],
    ) -> Result<RowRead, RowSourceError> {
        let table_columns = self.table_columns(schema, table).await?.clone();
        let qualified = format!("{schema}.{table}");
        let (present, dropped): (Vec<&String>, Vec<&String>) = columns
            .iter()
            .partition(|column| table_columns.contains_key(*column));
        let mut conditions = Vec::with_capacity(key.len());
        let mut parameters: Vec<Option<String>> = Vec::with_capacity(key.len());
        for (position, (column, value)) in key.iter().enumerate() {
            let Some((oid, type_name)) = table_columns.get(column) else {
                return Err(RowSourceError::Permanent(format!(
                    "table {qualified}: key column {column} no longer exists"
                )));
            };
            let text = self
                .codec
                .postgres_text(*oid, value.get())
                .map_err(|error| {
                    RowSourceError::Permanent(format!(
                        "table {qualified}: key column {column} cannot be read back: {error}"
                    ))
                })?;
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
        // Each column's output text, and whether it is NULL (format's %s prints NULL as '').
        let mut select = vec!["true".to_owned()];
        for column in &present {
            let quoted = quote_identifier(column);
            select.push(format!("{quoted} IS NULL, format('%s', {quoted})"));
        }
        let sql = format!(
            "SELECT {} FROM {}.{} WHERE {}",
            select.join(", "),
            quote_identifier(schema),
            quote_identifier(table),
            conditions.join(" AND ")
        );
        let statement = self.statement(&sql, key.len()).await?;
        let parameters: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = parameters
            .iter()
            .map(|parameter| parameter as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let row = self
            .catalog
            .client()
            .query_opt(&statement, &parameters)
            .await
            .map_err(postgres_error)?;
        let Some(row) = row else {
            return Ok(RowRead::Gone);
        };
        let mut values = RawRow::default();
        for (position, column) in present.iter().enumerate() {
            let is_null: bool = row.get(1 + position * 2);
            let json = if is_null {
                b"null".to_vec()
            } else {
                let text: String = row.get(2 + position * 2);
                let (oid, _) = &table_columns[*column];
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
        Ok(RowRead::Found {
            values,
            dropped: dropped.into_iter().cloned().collect(),
        })
    }

    async fn statement(
        &mut self,
        sql: &str,
        parameters: usize,
    ) -> Result<Statement, RowSourceError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let types = vec![Type::TEXT; parameters];
        let statement = self
            .catalog
            .client()
            .prepare_typed(sql, &types)
            .await
            .map_err(postgres_error)?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    /// The table's columns now; read again after any transient failure (a new connection).
    async fn table_columns(
        &mut self,
        schema: &str,
        table: &str,
    ) -> Result<&HashMap<String, (u32, String)>, RowSourceError> {
        let name = (schema.to_owned(), table.to_owned());
        if !self.columns.contains_key(&name) {
            let rows = self
                .catalog
                .client()
                .query(
                    "SELECT a.attname::text, a.atttypid, format_type(a.atttypid, a.atttypmod)
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
        Ok(&self.columns[&name])
    }
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
