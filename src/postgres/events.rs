//! Writing events from what PostgreSQL sent: a decoded tuple (pgoutput) or a copied row becomes
//! one Kafka record of the event model ([`crate::event`]): key, Debezium-compatible envelope and
//! headers.
//!
//! Owns the binding of a Relation message to its table's topic and key columns ([`TableRoute`])
//! and the envelope's byte layout. Events are written straight to JSON bytes through the type
//! codec, so a change costs a key buffer and a value buffer, not a tree of values; every value
//! is the text PostgreSQL printed, encoded by the codec, never re-formatted (design invariant 8).
//! The representation decisions are the event model's (docs/events.md).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::event::{
    Op, Record, RecordHeaders, SnapshotMarker, SourceInfo, TxContext, write_json_string,
};
use crate::lsn::Lsn;
use crate::postgres::pgoutput::{OldTuple, Relation, TupleValue};
use crate::postgres::types::{Codec, CodecError};

/// A captured table as of the Relation message in force: where its events go and which of
/// its columns form the key.
#[derive(Debug, Clone)]
pub struct TableRoute {
    pub relation: Arc<Relation>,
    pub topic: Arc<str>,
    /// Indices into `relation.columns`, in primary-key order.
    pub key_columns: Vec<usize>,
}

impl TableRoute {
    /// Binds the key column names (from the catalog, in key order) to this Relation's columns.
    pub fn new(
        relation: Arc<Relation>,
        topic: Arc<str>,
        key_names: &[String],
    ) -> Result<Self, EventError> {
        let key_columns = key_names
            .iter()
            .map(|name| {
                relation
                    .columns
                    .iter()
                    .position(|column| &column.name == name)
                    .ok_or_else(|| EventError::KeyColumnMissing {
                        table: qualified_name(&relation),
                        column: name.clone(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            relation,
            topic,
            key_columns,
        })
    }

    pub fn qualified_name(&self) -> String {
        qualified_name(&self.relation)
    }
}

fn qualified_name(relation: &Relation) -> String {
    format!("{}.{}", relation.namespace, relation.name)
}

/// A row image: the values of a tuple, in the Relation's column order.
pub type Row<'a> = &'a [TupleValue];

/// Everything needed to write one row change.
#[derive(Debug, Clone, Copy)]
pub struct RowChange<'a> {
    pub op: Op,
    pub before: Option<Row<'a>>,
    /// `before` is a key-only old tuple (REPLICA IDENTITY DEFAULT or INDEX): only its key
    /// columns travelled, the others are not null but unknown, so they are left out.
    pub before_is_key_only: bool,
    pub after: Option<Row<'a>>,
    /// Values for `after`'s unchanged-TOAST columns (the old tuple under REPLICA IDENTITY
    /// FULL), when there is one.
    pub fill_from: Option<Row<'a>>,
    /// The row whose key is the record's key (`after` for inserts and updates, the old image
    /// for deletes).
    pub key_row: Row<'a>,
    pub lsn: Lsn,
    pub snapshot: SnapshotMarker,
}

/// The changes pgoutput and the copy produce, each built in one place.
impl<'a> RowChange<'a> {
    /// A streamed insert.
    pub fn insert(new: Row<'a>, lsn: Lsn) -> Self {
        Self::create(new, None, lsn)
    }

    /// The create of a key change's new key: its unchanged TOAST values come from the full old
    /// row when there is one (REPLICA IDENTITY FULL), else they are listed as not travelled.
    pub fn key_change_create(new: Row<'a>, old: Option<&'a OldTuple>, lsn: Lsn) -> Self {
        Self::create(new, full_row(old), lsn)
    }

    fn create(new: Row<'a>, fill_from: Option<Row<'a>>, lsn: Lsn) -> Self {
        Self {
            op: Op::Create,
            before: None,
            before_is_key_only: false,
            after: Some(new),
            fill_from,
            key_row: new,
            lsn,
            snapshot: SnapshotMarker::False,
        }
    }

    /// A streamed update that keeps the key, with the old tuple pgoutput sent, if any.
    pub fn update(new: Row<'a>, old: Option<&'a OldTuple>, lsn: Lsn) -> Self {
        Self {
            op: Op::Update,
            before: old.map(|old| &old.tuple().0[..]),
            before_is_key_only: matches!(old, Some(OldTuple::Key(_))),
            after: Some(new),
            fill_from: full_row(old),
            key_row: new,
            lsn,
            snapshot: SnapshotMarker::False,
        }
    }

    /// A streamed delete (also the old key's half of a key change).
    pub fn delete(old: &'a OldTuple, lsn: Lsn) -> Self {
        Self {
            op: Op::Delete,
            before: Some(&old.tuple().0),
            before_is_key_only: matches!(old, OldTuple::Key(_)),
            after: None,
            fill_from: None,
            key_row: &old.tuple().0,
            lsn,
            snapshot: SnapshotMarker::False,
        }
    }

    /// A row of a copy, versioned `cp − 1` (`version`).
    pub fn snapshot_row(values: Row<'a>, version: Lsn) -> Self {
        Self {
            op: Op::Read,
            before: None,
            before_is_key_only: false,
            after: Some(values),
            fill_from: None,
            key_row: values,
            lsn: version,
            snapshot: SnapshotMarker::True,
        }
    }
}

/// The whole old row, under REPLICA IDENTITY FULL.
fn full_row(old: Option<&OldTuple>) -> Option<Row<'_>> {
    match old {
        Some(OldTuple::Full(old)) => Some(&old.0[..]),
        _ => None,
    }
}

/// Writes events for one source. Cheap to share.
#[derive(Debug, Clone)]
pub struct EventWriter {
    codec: Arc<Codec>,
    source: Arc<SourceInfo>,
}

impl EventWriter {
    pub fn new(codec: Arc<Codec>, source: Arc<SourceInfo>) -> Self {
        Self { codec, source }
    }

    /// The record of one row change.
    pub fn row_event(
        &self,
        route: &TableRoute,
        change: &RowChange<'_>,
        tx: &TxContext,
    ) -> Result<Record, EventError> {
        self.write_row_event(route, change, tx, false)
    }

    /// The record of a delete of a row of a table whose copy is in progress: marked
    /// `source.soft_delete: true`, so the sink keeps a versioned soft tombstone until the copy's
    /// `copy_completed` control record (design invariant 5, `crate::source::copies`).
    pub fn delete_during_copy_event(
        &self,
        route: &TableRoute,
        change: &RowChange<'_>,
        tx: &TxContext,
    ) -> Result<Record, EventError> {
        debug_assert_eq!(change.op, Op::Delete, "only deletes are marked");
        self.write_row_event(route, change, tx, change.op == Op::Delete)
    }

    fn write_row_event(
        &self,
        route: &TableRoute,
        change: &RowChange<'_>,
        tx: &TxContext,
        soft_delete: bool,
    ) -> Result<Record, EventError> {
        let key = self.key(route, change.key_row)?;
        let mut value = Vec::with_capacity(512);
        value.extend_from_slice(b"{\"before\":");
        match change.before {
            Some(row) => {
                let only = change
                    .before_is_key_only
                    .then_some(route.key_columns.as_slice());
                self.write_row(&mut value, route, row, only, None, &mut Vec::new())?;
            }
            None => value.extend_from_slice(b"null"),
        }
        value.extend_from_slice(b",\"after\":");
        let mut unchanged = Vec::new();
        match change.after {
            Some(row) => self.write_row(
                &mut value,
                route,
                row,
                None,
                change.fill_from,
                &mut unchanged,
            )?,
            None => value.extend_from_slice(b"null"),
        }
        self.write_tail(
            &mut value,
            route,
            change.op,
            change.lsn,
            tx,
            change.snapshot,
        );
        if soft_delete {
            // Inside `source`, whose closing brace write_tail left off.
            value.extend_from_slice(b",\"soft_delete\":true");
        }
        value.push(b'}');
        if !unchanged.is_empty() {
            value.extend_from_slice(b",\"unchanged_toast_columns\":");
            write_json_string_array(
                &mut value,
                unchanged
                    .iter()
                    .map(|i| route.relation.columns[*i].name.as_str()),
            );
        }
        value.push(b'}');
        Ok(Record {
            topic: Arc::clone(&route.topic),
            key,
            value: Some(value),
            headers: RecordHeaders {
                commit_lsn: tx.commit_lsn,
                lsn: change.lsn,
                xid: tx.xid,
                op: change.op,
            },
        })
    }

    /// The tombstone that follows a delete, for log compaction.
    pub fn tombstone(&self, delete: &Record) -> Record {
        Record {
            topic: Arc::clone(&delete.topic),
            key: delete.key.clone(),
            value: None,
            headers: delete.headers,
        }
    }

    /// The truncate event of one table.
    pub fn truncate_event(&self, route: &TableRoute, lsn: Lsn, tx: &TxContext) -> Record {
        let mut value = Vec::with_capacity(256);
        value.extend_from_slice(b"{\"before\":null,\"after\":null");
        self.write_tail(
            &mut value,
            route,
            Op::Truncate,
            lsn,
            tx,
            SnapshotMarker::False,
        );
        // Closes `source`, then the envelope.
        value.extend_from_slice(b"}}");
        Record {
            topic: Arc::clone(&route.topic),
            key: b"{}".to_vec(),
            value: Some(value),
            headers: RecordHeaders {
                commit_lsn: tx.commit_lsn,
                lsn,
                xid: tx.xid,
                op: Op::Truncate,
            },
        }
    }

    /// The key: the primary-key columns as a JSON object, in key order. Byte-for-byte
    /// deterministic, because Kafka partitions (and compacts) by these bytes.
    pub fn key(&self, route: &TableRoute, row: Row<'_>) -> Result<Vec<u8>, EventError> {
        let mut key = Vec::with_capacity(64);
        key.push(b'{');
        for (position, &index) in route.key_columns.iter().enumerate() {
            if position > 0 {
                key.push(b',');
            }
            let column = &route.relation.columns[index];
            write_json_string(&mut key, &column.name);
            key.push(b':');
            match row.get(index) {
                Some(TupleValue::Text(text)) => {
                    self.codec.write_json(&mut key, column.type_oid, text)?
                }
                Some(TupleValue::Null) | None => {
                    return Err(EventError::NullKey {
                        table: route.qualified_name(),
                        column: column.name.clone(),
                    });
                }
                Some(TupleValue::UnchangedToast) => {
                    return Err(EventError::UnchangedKey {
                        table: route.qualified_name(),
                        column: column.name.clone(),
                    });
                }
                Some(TupleValue::Binary(_)) => return Err(EventError::BinaryValue),
            }
        }
        key.push(b'}');
        Ok(key)
    }

    /// Writes a row as a JSON object, restricted to the columns in `only` when given.
    /// Unchanged TOAST columns are filled from `fill_from` or recorded in `unchanged`.
    fn write_row(
        &self,
        out: &mut Vec<u8>,
        route: &TableRoute,
        row: Row<'_>,
        only: Option<&[usize]>,
        fill_from: Option<Row<'_>>,
        unchanged: &mut Vec<usize>,
    ) -> Result<(), EventError> {
        out.push(b'{');
        let mut first = true;
        for (index, column) in route.relation.columns.iter().enumerate() {
            if only.is_some_and(|columns| !columns.contains(&index)) {
                continue;
            }
            let mut value = row.get(index).unwrap_or(&TupleValue::Null);
            if matches!(value, TupleValue::UnchangedToast) {
                match fill_from.and_then(|old| old.get(index)) {
                    Some(old @ TupleValue::Text(_)) => value = old,
                    _ => {
                        unchanged.push(index);
                        continue;
                    }
                }
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_json_string(out, &column.name);
            out.push(b':');
            match value {
                TupleValue::Text(text) => self.codec.write_json(out, column.type_oid, text)?,
                TupleValue::Null => out.extend_from_slice(b"null"),
                TupleValue::Binary(_) => return Err(EventError::BinaryValue),
                TupleValue::UnchangedToast => unreachable!("handled above"),
            }
        }
        out.push(b'}');
        Ok(())
    }

    fn write_tail(
        &self,
        out: &mut Vec<u8>,
        route: &TableRoute,
        op: Op,
        lsn: Lsn,
        tx: &TxContext,
        snapshot: SnapshotMarker,
    ) {
        use std::io::Write as _;
        let source = &self.source;
        out.extend_from_slice(b",\"op\":\"");
        out.extend_from_slice(op.code().as_bytes());
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "\",\"ts_ms\":{},\"source\":{{\"version\":\"{}\",\"connector\":\"walsync\",\"name\":",
            now_millis(),
            env!("CARGO_PKG_VERSION")
        );
        write_json_string(out, &source.name);
        out.extend_from_slice(b",\"db\":");
        write_json_string(out, &source.database);
        out.extend_from_slice(b",\"schema\":");
        write_json_string(out, &route.relation.namespace);
        out.extend_from_slice(b",\"table\":");
        write_json_string(out, &route.relation.name);
        let _ = write!(
            out,
            ",\"txId\":{},\"lsn\":{},\"commit_lsn\":{},\"ts_ms\":{},\"snapshot\":\"{}\",\"system_id\":",
            tx.xid,
            lsn.as_u64(),
            tx.commit_lsn.as_u64(),
            tx.commit_time_millis,
            snapshot.code()
        );
        write_json_string(out, &source.system_id);
        // The `source` object stays open: the caller may add `soft_delete`, then closes it.
        let _ = write!(out, ",\"timeline\":{}", source.timeline);
    }
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn write_json_string_array<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    out.push(b'[');
    for (position, item) in items.enumerate() {
        if position > 0 {
            out.push(b',');
        }
        write_json_string(out, item);
    }
    out.push(b']');
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error(
        "table {table}: key column {column} is not in the table's columns any more; was it dropped or renamed? Restore it or configure tables.\"{table}\".key_columns"
    )]
    KeyColumnMissing { table: String, column: String },
    #[error("table {table}: key column {column} is NULL; key columns must be NOT NULL")]
    NullKey { table: String, column: String },
    #[error(
        "table {table}: key column {column} arrived as an unchanged TOAST value; key columns cannot be TOASTed"
    )]
    UnchangedKey { table: String, column: String },
    #[error("the server sent a binary-format value; walsync requests text format only")]
    BinaryValue,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Envelope;
    use crate::postgres::pgoutput::{Column, ReplicaIdentity};
    use crate::postgres::types::CodecOptions;
    use bytes::Bytes;
    use serde_json::{Value, json};

    const INT4: u32 = 23;
    const TEXT: u32 = 25;

    fn route() -> TableRoute {
        let column = |name: &str, type_oid| Column {
            is_key: false,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        let relation = Relation {
            oid: 1,
            namespace: "public".into(),
            name: "products".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                column("description", TEXT),
                column("sku", TEXT),
                column("shop", INT4),
            ],
        };
        TableRoute::new(
            Arc::new(relation),
            "shop.public.products".into(),
            &["shop".into(), "sku".into()],
        )
        .expect("key columns exist")
    }

    fn writer() -> EventWriter {
        EventWriter::new(
            Arc::new(Codec::new(CodecOptions::default())),
            Arc::new(SourceInfo {
                name: "shop".into(),
                database: "walsync".into(),
                system_id: "7300000000000000001".into(),
                timeline: 1,
            }),
        )
    }

    fn text(value: &str) -> TupleValue {
        TupleValue::Text(Bytes::copy_from_slice(value.as_bytes()))
    }

    const TX: TxContext = TxContext {
        xid: 42,
        commit_lsn: Lsn(0x5000),
        commit_time_millis: 1_700_000_000_000,
    };

    fn parse(record: &Record) -> Value {
        serde_json::from_slice(record.value.as_deref().expect("not a tombstone"))
            .expect("valid JSON")
    }

    #[test]
    fn the_key_is_the_primary_key_in_key_order_byte_for_byte() {
        let row = [text("long"), text("a-1"), text("7")];
        let key = writer().key(&route(), &row).unwrap();
        assert_eq!(key, br#"{"shop":7,"sku":"a-1"}"#);
    }

    #[test]
    fn an_insert_carries_the_envelope_and_the_transactions_commit_lsn() {
        let row = [text("long"), text("a-1"), text("7")];
        let change = RowChange {
            op: Op::Create,
            before: None,
            before_is_key_only: false,
            after: Some(&row),
            fill_from: None,
            key_row: &row,
            lsn: Lsn(0x4F00),
            snapshot: SnapshotMarker::False,
        };
        let record = writer().row_event(&route(), &change, &TX).unwrap();
        let value = parse(&record);
        assert_eq!(value["before"], Value::Null);
        assert_eq!(
            value["after"],
            json!({"description": "long", "sku": "a-1", "shop": 7})
        );
        assert_eq!(value["op"], "c");
        let source = &value["source"];
        assert_eq!(source["connector"], "walsync");
        assert_eq!(source["schema"], "public");
        assert_eq!(source["table"], "products");
        assert_eq!(source["txId"], 42);
        assert_eq!(source["lsn"], 0x4F00);
        assert_eq!(source["commit_lsn"], 0x5000);
        assert_eq!(source["ts_ms"], 1_700_000_000_000_i64);
        assert_eq!(source["snapshot"], "false");
        assert_eq!(source["system_id"], "7300000000000000001");
        assert_eq!(source["timeline"], 1);
        assert!(value.get("unchanged_toast_columns").is_none());
        assert_eq!(record.topic.as_ref(), "shop.public.products");
        assert_eq!(record.headers.commit_lsn, Lsn(0x5000));
    }

    #[test]
    fn unchanged_toast_without_an_old_tuple_is_absent_and_listed() {
        let row = [TupleValue::UnchangedToast, text("a-1"), text("7")];
        let change = RowChange {
            op: Op::Update,
            before: None,
            before_is_key_only: false,
            after: Some(&row),
            fill_from: None,
            key_row: &row,
            lsn: Lsn(1),
            snapshot: SnapshotMarker::False,
        };
        let value = parse(&writer().row_event(&route(), &change, &TX).unwrap());
        assert_eq!(value["after"], json!({"sku": "a-1", "shop": 7}));
        assert_eq!(value["unchanged_toast_columns"], json!(["description"]));
    }

    #[test]
    fn unchanged_toast_is_filled_from_the_full_old_tuple() {
        let old = [text("the long text"), text("a-1"), text("7")];
        let new = [TupleValue::UnchangedToast, text("a-1"), text("7")];
        let change = RowChange {
            op: Op::Update,
            before: Some(&old),
            before_is_key_only: false,
            after: Some(&new),
            fill_from: Some(&old),
            key_row: &new,
            lsn: Lsn(1),
            snapshot: SnapshotMarker::False,
        };
        let value = parse(&writer().row_event(&route(), &change, &TX).unwrap());
        assert_eq!(value["after"]["description"], "the long text");
        assert!(value.get("unchanged_toast_columns").is_none());
    }

    #[test]
    fn a_null_or_unchanged_key_column_is_an_error_not_a_guess() {
        let null_key = [text("x"), TupleValue::Null, text("7")];
        assert!(matches!(
            writer().key(&route(), &null_key),
            Err(EventError::NullKey { .. })
        ));
        let toasted_key = [text("x"), TupleValue::UnchangedToast, text("7")];
        assert!(matches!(
            writer().key(&route(), &toasted_key),
            Err(EventError::UnchangedKey { .. })
        ));
    }

    #[test]
    fn a_missing_key_column_names_the_fix() {
        let relation = route().relation;
        let error = TableRoute::new(relation, "t".into(), &["gone".into()]).unwrap_err();
        assert!(error.to_string().contains("key_columns"), "{error}");
    }

    #[test]
    fn truncate_and_tombstone_records() {
        let writer = writer();
        let truncate = writer.truncate_event(&route(), Lsn(9), &TX);
        assert_eq!(truncate.key, b"{}");
        let value = parse(&truncate);
        assert_eq!(value["op"], "t");
        assert_eq!(value["after"], Value::Null);

        let row = [text("x"), text("a-1"), text("7")];
        let change = RowChange {
            op: Op::Delete,
            before: Some(&row),
            before_is_key_only: true,
            after: None,
            fill_from: None,
            key_row: &row,
            lsn: Lsn(3),
            snapshot: SnapshotMarker::False,
        };
        let delete = writer.row_event(&route(), &change, &TX).unwrap();
        assert_eq!(
            parse(&delete)["before"],
            json!({"sku": "a-1", "shop": 7}),
            "a key-only old tuple shows only the key"
        );
        let tombstone = writer.tombstone(&delete);
        assert_eq!(tombstone.key, delete.key);
        assert_eq!(tombstone.value, None);
    }

    #[test]
    fn a_delete_during_a_copy_is_marked_and_reads_back_marked() {
        let writer = writer();
        let row = [text("x"), text("a-1"), text("7")];
        let change = RowChange {
            op: Op::Delete,
            before: Some(&row),
            before_is_key_only: true,
            after: None,
            fill_from: None,
            key_row: &row,
            lsn: Lsn(3),
            snapshot: SnapshotMarker::False,
        };
        let marked = writer
            .delete_during_copy_event(&route(), &change, &TX)
            .unwrap();
        let value = parse(&marked);
        assert_eq!(value["source"]["soft_delete"], true);
        assert_eq!(
            value["source"]["commit_lsn"], 0x5000,
            "the rest is unchanged"
        );
        assert_eq!(value["op"], "d");
        let envelope = Envelope::parse(marked.value.as_deref().unwrap()).unwrap();
        assert!(envelope.source.soft_delete);

        let plain = writer.row_event(&route(), &change, &TX).unwrap();
        assert!(
            parse(&plain)["source"].get("soft_delete").is_none(),
            "other events carry no marker"
        );
        let envelope = Envelope::parse(plain.value.as_deref().unwrap()).unwrap();
        assert!(!envelope.source.soft_delete);
    }

    #[test]
    fn names_needing_escapes_stay_valid_json() {
        let mut route = route();
        let mut relation = (*route.relation).clone();
        relation.name = "we\"ird".into();
        relation.columns[0].name = "quo\"te".into();
        route.relation = Arc::new(relation);
        let row = [text("x"), text("a"), text("1")];
        let change = RowChange {
            op: Op::Create,
            before: None,
            before_is_key_only: false,
            after: Some(&row),
            fill_from: None,
            key_row: &row,
            lsn: Lsn(1),
            snapshot: SnapshotMarker::False,
        };
        let value = parse(&writer().row_event(&route, &change, &TX).unwrap());
        assert_eq!(value["source"]["table"], "we\"ird");
        assert_eq!(value["after"]["quo\"te"], "x");
    }
}
