//! The TOAST fill rule: where the value of an unchanged TOASTed column comes from.
//!
//! pgoutput does not send a TOASTed value that an update left untouched (REPLICA IDENTITY
//! DEFAULT or USING INDEX); the event lists the column in `unchanged_toast_columns`. The
//! document must still be written whole, at the event's version (design invariant 6), so the
//! value is taken from a state of the row that is provably **the row's own state just before
//! this event**, or read from the row itself:
//!
//! 1. **An earlier streamed event of the same document in this batch**, if it is the row's
//!    latest state: the newest event so far by version (ties: the later one), not a delete
//!    ("never across a delete"). Streamed events of one key reach their partition in commit
//!    order, and a replay re-sends them in that order, so the newest earlier streamed event of
//!    the batch is the row's previous state — whether or not it is applied later: its values are
//!    the row's, even if the server refuses its document.
//! 2. **Else a re-read from PostgreSQL** by the event's key, on the table the record's topic
//!    belongs to ([`RowSource`]). A value read later than the event is still safe: the row's
//!    later changes arrive with higher versions and overwrite it, and row locks make every
//!    earlier change of the row visible to the read (design invariant 10). The read first waits
//!    until the event's own transaction is visible (its commit record can be decoded before the
//!    commit is visible, for as long as a synchronous standby takes to confirm it).
//!
//! The stored document is never a source, not even at the event's own version. It is not proof
//! of the previous state: the previous event may have been dead-lettered, compacted away,
//! applied to another partition after the topic grew, or written to the old index of a
//! backfill's swap; and a document of the event's own version may have been written by a
//! *later* change of the same transaction (or by a dead letter's re-send of an earlier one)
//! whose values are not this change's previous state. Filling from it would write a value at a
//! version that a later replay could never correct.
//!
//! A snapshot row (`r`, versioned `cp − 1`) never fills a later event: it is interleaved with the
//! stream at any offset, so it may be older than a streamed change that was applied, refused or
//! compacted before it. The event after it is re-read.
//!
//! A key change arrives as a delete of the old key and a create (`c`) of the new one; a `c`
//! with unchanged columns can only be such a create. Its previous state lives under the old
//! key, and whatever the batch or the index holds under the new key belongs to another row
//! (one deleted in the same transaction, say), so it is always re-read (2).
//!
//! Outcomes of a re-read: the row's values fill the event; a row that is gone is superseded by
//! a later delete of the same key in the same partition, so the event is skipped; a column that
//! no longer exists (dropped since) is left out of the document, which then equals the row as
//! the table has it now; anything that can never succeed (the table is gone, the key cannot be
//! read back) dead-letters the event with the reason. PostgreSQL being unreachable is waited out.

use std::collections::HashMap;

use crate::event::RawRow;
pub use crate::event::rows::{RowAddress, RowRead, RowSource, RowSourceError};

/// What the rule needs to know of one event of a batch, in partition order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchEvent<'a> {
    /// The index and document id it writes (`None`: no document, e.g. an unreadable key).
    pub document: Option<(&'a str, &'a str)>,
    pub version: u64,
    pub kind: EventKind,
    /// Whether it has kept columns whose value did not travel.
    pub needs_fill: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A streamed insert or update (`c`, `u`).
    Streamed,
    /// The create of a key change's new key (a `c` whose values did not all travel).
    KeyChange,
    /// A snapshot row (`r`).
    SnapshotRow,
    /// A delete (`d`).
    Delete,
}

/// Where one event's missing values come from, as far as the batch tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillPlan {
    /// Nothing is missing.
    Nothing,
    /// From the (already filled) event at this position of the batch.
    Batch(usize),
    /// Re-read from PostgreSQL.
    Reread,
}

/// The newest state of a document seen so far in the batch.
#[derive(Debug, Clone, Copy)]
enum Latest {
    Row {
        position: usize,
        version: u64,
        snapshot: bool,
    },
    Deleted {
        version: u64,
    },
}

impl Latest {
    fn version(self) -> u64 {
        match self {
            Latest::Row { version, .. } | Latest::Deleted { version } => version,
        }
    }
}

/// The fill plan of every event of a batch (see the module doc).
pub fn plan(events: &[BatchEvent<'_>]) -> Vec<FillPlan> {
    let mut latest: HashMap<(&str, &str), Latest> = HashMap::new();
    let mut plans = Vec::with_capacity(events.len());
    for (position, event) in events.iter().enumerate() {
        let Some(document) = event.document else {
            plans.push(FillPlan::Nothing);
            continue;
        };
        let seen = latest.get(&document).copied();
        plans.push(if event.needs_fill {
            plan_one(event, seen)
        } else {
            FillPlan::Nothing
        });
        // Sequential application with external_gte ends with the newest version, the later
        // of equals.
        if seen.is_none_or(|seen| event.version >= seen.version()) {
            let state = match event.kind {
                EventKind::Delete => Latest::Deleted {
                    version: event.version,
                },
                EventKind::Streamed | EventKind::KeyChange | EventKind::SnapshotRow => {
                    Latest::Row {
                        position,
                        version: event.version,
                        snapshot: event.kind == EventKind::SnapshotRow,
                    }
                }
            };
            latest.insert(document, state);
        }
    }
    plans
}

fn plan_one(event: &BatchEvent<'_>, seen: Option<Latest>) -> FillPlan {
    // A key change's previous state is under the old key; snapshot rows never lack values.
    if event.kind != EventKind::Streamed {
        return FillPlan::Reread;
    }
    match seen {
        Some(Latest::Row {
            position,
            version,
            snapshot: false,
        }) if version <= event.version => FillPlan::Batch(position),
        // Nothing earlier in the batch, a snapshot row (possibly older than a change applied
        // before it), a delete, or a newer state than this (stale) event: nothing in the batch
        // is the row's previous state for sure.
        _ => FillPlan::Reread,
    }
}

/// Copies the values of `columns` found in `from`, an earlier event's row, into `into`.
pub fn fill_from(into: &mut RawRow, columns: &[String], from: &RawRow) {
    for column in columns {
        if let Some(value) = from.get(column) {
            into.insert(column.clone(), value.to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(
        id: &'static str,
        version: u64,
        kind: EventKind,
        needs_fill: bool,
    ) -> BatchEvent<'static> {
        BatchEvent {
            document: Some(("i", id)),
            version,
            kind,
            needs_fill,
        }
    }

    fn key_change(id: &'static str, version: u64) -> BatchEvent<'static> {
        event(id, version, EventKind::KeyChange, true)
    }

    use EventKind::{Delete, SnapshotRow, Streamed};

    #[test]
    fn the_newest_earlier_streamed_event_fills() {
        let plans = plan(&[
            event("1", 10, Streamed, false),
            event("1", 20, Streamed, true),
            event("2", 20, Streamed, true),
        ]);
        assert_eq!(
            plans,
            [FillPlan::Nothing, FillPlan::Batch(0), FillPlan::Reread]
        );
    }

    #[test]
    fn never_across_a_delete() {
        let plans = plan(&[
            event("2", 10, Streamed, false),
            event("2", 20, Delete, false),
            event("2", 20, Streamed, true),
        ]);
        assert_eq!(plans[2], FillPlan::Reread);
    }

    #[test]
    fn a_key_change_onto_a_key_deleted_in_the_same_transaction_is_re_read() {
        // BEGIN; DELETE id=2; UPDATE id=1 SET id=2; COMMIT — with the index holding row 2.
        let plans = plan(&[
            event("2", 30, Delete, false),
            event("1", 30, Delete, false),
            key_change("2", 30),
        ]);
        assert_eq!(plans[2], FillPlan::Reread);
        // Nothing in the batch either: still not the stored document of the new key.
        assert_eq!(plan(&[key_change("2", 30)]), [FillPlan::Reread]);
    }

    #[test]
    fn a_snapshot_row_never_fills() {
        // It may be older than a change applied, refused or compacted before it.
        let plans = plan(&[
            event("1", 49, SnapshotRow, false),
            event("1", 110, Streamed, true),
        ]);
        assert_eq!(plans[1], FillPlan::Reread);
        // A streamed change before it in the batch is newer, and still the previous state.
        let plans = plan(&[
            event("1", 100, Streamed, false),
            event("1", 49, SnapshotRow, false),
            event("1", 110, Streamed, true),
        ]);
        assert_eq!(plans[2], FillPlan::Batch(0));
    }

    #[test]
    fn the_stored_document_never_fills() {
        // Without an earlier event in the batch the row is re-read, whatever the index holds:
        // even a document of the event's own version may be a later change of the same
        // transaction, or a dead letter's re-send of an earlier one.
        assert_eq!(plan(&[event("1", 300, Streamed, true)]), [FillPlan::Reread]);
    }

    #[test]
    fn replays_fill_from_the_replayed_previous_event() {
        // Applied before: v10, v20, v30. Replayed: v20, then v30 lacking a value.
        let plans = plan(&[
            event("1", 20, Streamed, false),
            event("1", 30, Streamed, true),
        ]);
        assert_eq!(plans[1], FillPlan::Batch(0));
    }

    #[test]
    fn an_event_older_than_the_batchs_state_is_re_read() {
        let plans = plan(&[
            event("1", 50, Streamed, false),
            event("1", 40, Streamed, true),
        ]);
        assert_eq!(plans[1], FillPlan::Reread);
    }

    #[test]
    fn documents_are_independent() {
        let plans = plan(&[
            event("1", 10, Delete, false),
            event("2", 20, Streamed, true),
        ]);
        assert_eq!(plans[1], FillPlan::Reread);
    }
}
