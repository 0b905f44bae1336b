//! The event model: one change to one row, as it travels from the source to the sink.
//!
//! Owns the Debezium-compatible envelope (`before`, `after`, `op`, `ts_ms`, `source` with
//! `lsn`, `commit_lsn`, `txId`, system identifier and timeline), the message key built from the
//! primary key columns, and the headers. The `commit_lsn` of an event is its version in the
//! search index (design invariant 1); nothing downstream may invent another one.
//!
//! The model knows nothing of where events are made: `postgres::events` writes them from
//! decoded WAL and copied rows, the sink reads them back ([`Envelope`], [`RawRow`]).
//!
//! Representation decisions (see docs/events.md):
//! - Columns whose value did not travel (unchanged TOAST, no old tuple to fill it from) are
//!   absent from `after` and listed in `unchanged_toast_columns`; never null, never a
//!   placeholder.
//! - `before` holds what the old tuple carried: every column under REPLICA IDENTITY FULL, the
//!   key columns under DEFAULT (deletes, key changes), and is null when no old tuple came.
//! - A truncate is one `t` event per table with the key `{}` and no `before`/`after`.

use std::sync::Arc;

use serde_json::value::RawValue;

pub mod rows;

use crate::lsn::Lsn;

/// The change kind, with Debezium's codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Truncate,
    /// A row read by a snapshot.
    Read,
}

impl Op {
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
            Op::Read => "r",
        }
    }
}

/// Debezium's `source.snapshot` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMarker {
    /// A streamed change.
    False,
    /// A snapshot row.
    True,
    /// The last row of a table's snapshot.
    Last,
}

impl SnapshotMarker {
    pub fn code(self) -> &'static str {
        match self {
            SnapshotMarker::False => "false",
            SnapshotMarker::True => "true",
            SnapshotMarker::Last => "last",
        }
    }
}

/// Fixed facts about where events come from, written into every `source` block.
#[derive(Debug, Clone)]
pub struct SourceInfo {
    /// The logical name of the connector (the topic prefix), Debezium's `source.name`.
    pub name: String,
    pub database: String,
    /// IDENTIFY_SYSTEM's system identifier: versions are only comparable within one cluster.
    pub system_id: String,
    pub timeline: u32,
}

/// The transaction an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxContext {
    pub xid: u32,
    /// The version of every event of the transaction (snapshots: `cp − 1`).
    pub commit_lsn: Lsn,
    pub commit_time_millis: i64,
}

/// One Kafka record, ready to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: Arc<str>,
    pub key: Vec<u8>,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub headers: RecordHeaders,
}

/// Headers let consumers route and order without parsing the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeaders {
    pub commit_lsn: Lsn,
    pub lsn: Lsn,
    pub xid: u32,
    pub op: Op,
}

/// A row image as it travelled: every column's JSON value exactly as the source wrote it, in
/// the source's column order. Values are never parsed, so a number keeps every digit and a
/// `jsonb` value its exact text (design invariant 8).
#[derive(Debug, Clone, Default)]
pub struct RawRow(Vec<(String, Box<RawValue>)>);

impl RawRow {
    /// The value of `column`, if it travelled.
    pub fn get(&self, column: &str) -> Option<&RawValue> {
        self.0
            .iter()
            .find(|(name, _)| name == column)
            .map(|(_, value)| &**value)
    }

    /// Sets `column` to `value`, replacing a value it already has.
    pub fn insert(&mut self, column: String, value: Box<RawValue>) {
        match self.0.iter_mut().find(|(name, _)| *name == column) {
            Some((_, slot)) => *slot = value,
            None => self.0.push((column, value)),
        }
    }

    /// Removes `column`; true when it was there.
    pub fn remove(&mut self, column: &str) -> bool {
        let before = self.0.len();
        self.0.retain(|(name, _)| name != column);
        self.0.len() != before
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &RawValue)> {
        self.0.iter().map(|(name, value)| (name.as_str(), &**value))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The row as one JSON object, values byte for byte.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(64 + self.0.iter().map(|(_, v)| v.get().len() + 8).sum::<usize>());
        out.push(b'{');
        for (position, (name, value)) in self.0.iter().enumerate() {
            if position > 0 {
                out.push(b',');
            }
            write_json_string(&mut out, name);
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
        }
        out.push(b'}');
        out
    }
}

impl FromIterator<(String, Box<RawValue>)> for RawRow {
    fn from_iter<I: IntoIterator<Item = (String, Box<RawValue>)>>(iter: I) -> Self {
        let mut row = RawRow::default();
        for (column, value) in iter {
            row.insert(column, value);
        }
        row
    }
}

impl<'de> serde::Deserialize<'de> for RawRow {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct RowVisitor;
        impl<'de> serde::de::Visitor<'de> for RowVisitor {
            type Value = RawRow;
            fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
                formatter.write_str("a row image (a JSON object of column values)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawRow, A::Error> {
                let mut columns = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((name, value)) = map.next_entry::<String, Box<RawValue>>()? {
                    columns.push((name, value));
                }
                Ok(RawRow(columns))
            }
        }
        deserializer.deserialize_map(RowVisitor)
    }
}

impl PartialEq for RawRow {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self
                .0
                .iter()
                .zip(&other.0)
                .all(|((a, x), (b, y))| a == b && x.get() == y.get())
    }
}

/// A JSON text as a raw value, for values produced by walsync's own codec (always valid JSON).
pub fn raw_value(json: Vec<u8>) -> Result<Box<RawValue>, serde_json::Error> {
    let text = String::from_utf8(json).map_err(|error| {
        <serde_json::Error as serde::de::Error>::custom(format!("not UTF-8: {error}"))
    })?;
    RawValue::from_string(text)
}

/// The envelope as a consumer reads it back: what the sink needs from a record's value. Row
/// images stay raw JSON ([`RawRow`]).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Envelope {
    pub before: Option<RawRow>,
    pub after: Option<RawRow>,
    pub op: EnvelopeOp,
    pub source: EnvelopeSource,
    /// Columns whose value did not travel (unchanged TOAST); absent from `after`.
    #[serde(default)]
    pub unchanged_toast_columns: Vec<String>,
}

/// `op` as it appears in the envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum EnvelopeOp {
    #[serde(rename = "c")]
    Create,
    #[serde(rename = "u")]
    Update,
    #[serde(rename = "d")]
    Delete,
    #[serde(rename = "t")]
    Truncate,
    #[serde(rename = "r")]
    Read,
}

impl EnvelopeOp {
    pub fn code(self) -> &'static str {
        match self {
            EnvelopeOp::Create => "c",
            EnvelopeOp::Update => "u",
            EnvelopeOp::Delete => "d",
            EnvelopeOp::Truncate => "t",
            EnvelopeOp::Read => "r",
        }
    }
}

/// The `source` block as a consumer reads it back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct EnvelopeSource {
    /// `kafka.topic_prefix` of the source that wrote it.
    #[serde(default)]
    pub name: String,
    pub schema: String,
    pub table: String,
    #[serde(rename = "txId")]
    pub tx_id: u64,
    pub lsn: u64,
    /// The event's version in the index (snapshot rows: `cp − 1`).
    pub commit_lsn: u64,
    pub ts_ms: i64,
    pub snapshot: String,
    pub system_id: String,
    pub timeline: u32,
    /// A delete during a copy of its table: keep a soft tombstone until the copy completed.
    #[serde(default)]
    pub soft_delete: bool,
}

impl Envelope {
    /// Parses a record's value.
    pub fn parse(value: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }

    /// Whether this is a snapshot row (`op: "r"`), versioned below its copy's consistent point.
    pub fn is_snapshot_row(&self) -> bool {
        self.op == EnvelopeOp::Read
    }
}

/// Writes `text` as a JSON string.
pub(crate) fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // serde_json escapes exactly as JSON requires; writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod envelope_tests {
    use super::*;

    #[test]
    fn the_envelope_written_by_the_source_reads_back() {
        let value = br#"{"before":null,"after":{"id":1,"note":"x"},"op":"u","ts_ms":5,
            "source":{"version":"0.1.0","connector":"walsync","name":"p","db":"d","schema":"public",
            "table":"t","txId":7,"lsn":100,"commit_lsn":200,"ts_ms":4,"snapshot":"false",
            "system_id":"73","timeline":1},"unchanged_toast_columns":["big"]}"#;
        let envelope = Envelope::parse(value).unwrap();
        assert_eq!(envelope.op, EnvelopeOp::Update);
        assert_eq!(envelope.source.commit_lsn, 200);
        assert_eq!(envelope.source.name, "p");
        assert_eq!(envelope.unchanged_toast_columns, ["big"]);
        assert_eq!(envelope.after.unwrap().get("note").unwrap().get(), "\"x\"");
    }

    #[test]
    fn row_values_keep_every_digit_and_byte() {
        let value = br#"{"before":null,"after":{"f":0.9407462388099621,"j":{"n": 0.90372028726197960001, "w": 1.50},"big":123456789012345678901234567890,"s":"a\u00e9\"b"},"op":"c","ts_ms":5,
            "source":{"schema":"public","table":"t","txId":7,"lsn":100,"commit_lsn":200,"ts_ms":4,
            "snapshot":"false","system_id":"73","timeline":1}}"#;
        let after = Envelope::parse(value).unwrap().after.unwrap();
        assert_eq!(after.get("f").unwrap().get(), "0.9407462388099621");
        assert_eq!(
            after.get("j").unwrap().get(),
            r#"{"n": 0.90372028726197960001, "w": 1.50}"#
        );
        assert_eq!(
            after.get("big").unwrap().get(),
            "123456789012345678901234567890"
        );
        assert_eq!(
            String::from_utf8(after.to_json()).unwrap(),
            r#"{"f":0.9407462388099621,"j":{"n": 0.90372028726197960001, "w": 1.50},"big":123456789012345678901234567890,"s":"a\u00e9\"b"}"#
        );
    }

    #[test]
    fn a_filled_value_replaces_or_joins_the_row() {
        let mut row: RawRow = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap();
        row.insert("b".into(), raw_value(b"3.10".to_vec()).unwrap());
        row.insert("c".into(), raw_value(b"null".to_vec()).unwrap());
        assert_eq!(row.to_json(), br#"{"a":1,"b":3.10,"c":null}"#);
        assert!(row.remove("a"));
        assert!(!row.remove("a"));
        assert_eq!(row.len(), 2);
    }
}
