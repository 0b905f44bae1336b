//! Reading a row as it is now: the contract between the sink, whose TOAST fill re-reads rows
//! (`sink::toast`), and the side that can read them (`postgres::row_reader`). It lives with the
//! event model so that neither side imports the other: the sink depends on this trait, the
//! PostgreSQL side implements it, and the wiring (`Sink::new`) hands one to the other.

use super::RawRow;

/// The result of re-reading one row.
#[derive(Debug, Clone, PartialEq)]
pub enum RowRead {
    /// The row's values of the requested columns that still exist, and the requested columns
    /// that no longer exist in the table.
    Found {
        values: RawRow,
        dropped: Vec<String>,
    },
    /// No row has this key now: a later delete of the key supersedes the event.
    Gone,
}

/// Why a re-read failed, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum RowSourceError {
    /// PostgreSQL is unreachable, restarting or overloaded: try again later.
    #[error("{0}")]
    Transient(String),
    /// The read can never succeed (the table is gone, the key cannot be read back): the event
    /// is dead-lettered with this reason.
    #[error("{0}")]
    Permanent(String),
}

/// The table a re-read addresses: the one the record's topic belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowAddress<'a> {
    pub schema: &'a str,
    pub table: &'a str,
}

/// Where re-reads go: PostgreSQL in production (`crate::postgres::row_reader`), a map in unit
/// tests.
pub trait RowSource: Send + Sync {
    /// Reads `columns` of the row of `schema.table` whose key columns have the values in `key`
    /// (the record key: JSON values as the source wrote them), as of a moment at which the
    /// event's own transaction `transaction` (its 32-bit xid; 0: none) is visible — a read
    /// before that is [`RowSourceError::Transient`].
    fn read_row<'a>(
        &'a self,
        table: RowAddress<'a>,
        key: &'a RawRow,
        columns: &'a [String],
        transaction: u64,
    ) -> futures_util::future::BoxFuture<'a, Result<RowRead, RowSourceError>>;
}
