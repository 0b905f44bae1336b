//! Control records: records in a table's topic that are not row events.
//!
//! Today there is one kind, `copy_completed`: after a copy (initial snapshot, later backfill) of
//! a table has had every row acknowledged by Kafka, the source writes one to *every* partition
//! of the table's topic. The producer is idempotent and keeps each partition in order, so in
//! each partition it follows every row of that copy and every delete that was marked
//! `source.soft_delete` during it. The sink purges that partition's soft tombstones of the table
//! when it reaches the record (design invariant 5, docs/events.md "Control records").
//!
//! A control record is recognised by its header `walsync.control` (the kind); its value is a
//! small JSON object, never an envelope, so consumers that parse row events must check the
//! header first (or skip values without `op`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The header that marks a control record; its value is the kind.
pub const CONTROL_HEADER: &str = "walsync.control";

/// The kind of a copy-completed record.
pub const COPY_COMPLETED: &str = "copy_completed";

/// The key of every copy-completed record. Not a row key (row keys are objects of key
/// columns), and never `null`: compacted topics refuse records without a key. Under
/// compaction only the newest control record of a partition survives, which is all the sink
/// needs.
pub const COPY_COMPLETED_KEY: &[u8] = br#"{"walsync.control":"copy_completed"}"#;

/// "The copy of `schema.table` under consistent point `consistent_point` is complete, and no
/// other copy of that table is in progress": every row of the copy and every delete marked
/// during it lies before this record in `partition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyCompleted {
    /// Always [`COPY_COMPLETED`]: the value says what it is even without its headers.
    pub control: String,
    pub schema: String,
    pub table: String,
    /// The consistent point of the copy's snapshot; its rows carry `cp − 1`.
    pub consistent_point: u64,
    /// The partition this record was written to (each partition gets its own).
    pub partition: i32,
    /// The cluster the copy was read from, as in every event's `source.system_id`.
    pub system_id: String,
    /// When the source wrote the record, in milliseconds since the Unix epoch.
    pub ts_ms: i64,
}

/// A control record ready to produce to one explicit partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRecord {
    pub topic: Arc<str>,
    pub partition: i32,
    /// The value of the [`CONTROL_HEADER`] header.
    pub kind: &'static str,
    pub key: &'static [u8],
    pub value: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("a {CONTROL_HEADER}={COPY_COMPLETED} record has a value that is not one: {0}")]
    BadValue(#[source] serde_json::Error),
    #[error("a {CONTROL_HEADER}={COPY_COMPLETED} record has no value")]
    NoValue,
}

impl CopyCompleted {
    pub fn new(
        schema: &str,
        table: &str,
        consistent_point: u64,
        partition: i32,
        system_id: &str,
        ts_ms: i64,
    ) -> Self {
        Self {
            control: COPY_COMPLETED.to_owned(),
            schema: schema.to_owned(),
            table: table.to_owned(),
            consistent_point,
            partition,
            system_id: system_id.to_owned(),
            ts_ms,
        }
    }

    /// The record for the topic of the table.
    pub fn record(&self, topic: Arc<str>) -> ControlRecord {
        ControlRecord {
            topic,
            partition: self.partition,
            kind: COPY_COMPLETED,
            key: COPY_COMPLETED_KEY,
            // A struct of strings and numbers always serializes.
            value: serde_json::to_vec(self).unwrap_or_default(),
        }
    }

    /// Reads the value of a record whose control header says [`COPY_COMPLETED`].
    pub fn decode(value: Option<&[u8]>) -> Result<Self, ControlError> {
        let value = value.ok_or(ControlError::NoValue)?;
        serde_json::from_slice(value).map_err(ControlError::BadValue)
    }

    pub fn qualified_table(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// What a consumer should do with a record, from its control header (`None`: no such header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A row event, a truncate or a Kafka tombstone.
    Change,
    CopyCompleted,
    /// A control record of a kind this version does not know: skip it.
    UnknownControl,
}

impl RecordKind {
    /// The kind of a record from the value of its [`CONTROL_HEADER`] header, if it has one.
    pub fn from_control_header(header: Option<&[u8]>) -> Self {
        match header {
            None => Self::Change,
            Some(kind) if kind == COPY_COMPLETED.as_bytes() => Self::CopyCompleted,
            Some(_) => Self::UnknownControl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_completed_record_round_trips_and_names_its_partition() {
        let completed = CopyCompleted::new("public", "products", 0x5000, 2, "73", 1_700);
        let record = completed.record("shop.public.products".into());
        assert_eq!(record.partition, 2);
        assert_eq!(record.kind, "copy_completed");
        let value: serde_json::Value = serde_json::from_slice(&record.value).unwrap();
        assert_eq!(
            value,
            serde_json::json!({
                "control": "copy_completed", "schema": "public", "table": "products",
                "consistent_point": 0x5000, "partition": 2, "system_id": "73", "ts_ms": 1_700
            })
        );
        assert!(value.get("op").is_none(), "never mistaken for a row event");
        assert_eq!(
            CopyCompleted::decode(Some(&record.value)).unwrap(),
            completed
        );
        assert_eq!(completed.qualified_table(), "public.products");
    }

    #[test]
    fn the_key_is_json_but_not_a_truncates_or_a_rows() {
        let key: serde_json::Value = serde_json::from_slice(COPY_COMPLETED_KEY).unwrap();
        assert_eq!(key["walsync.control"], "copy_completed");
        assert_ne!(COPY_COMPLETED_KEY, b"{}");
    }

    #[test]
    fn a_bad_or_missing_value_is_an_error() {
        assert!(matches!(
            CopyCompleted::decode(None),
            Err(ControlError::NoValue)
        ));
        assert!(matches!(
            CopyCompleted::decode(Some(br#"{"op":"d"}"#)),
            Err(ControlError::BadValue(_))
        ));
    }

    #[test]
    fn records_are_told_apart_by_their_control_header() {
        assert_eq!(RecordKind::from_control_header(None), RecordKind::Change);
        assert_eq!(
            RecordKind::from_control_header(Some(b"copy_completed")),
            RecordKind::CopyCompleted
        );
        assert_eq!(
            RecordKind::from_control_header(Some(b"something_newer")),
            RecordKind::UnknownControl
        );
    }
}
