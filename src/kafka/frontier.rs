//! The flush frontier: which LSN the source may confirm to PostgreSQL, given which of its
//! transactions Kafka has acknowledged (design invariant 3).
//!
//! A transaction is *in flight* from its BEGIN until Kafka has acknowledged every one of its
//! events. Acknowledgements arrive out of order across partitions, so the frontier keeps the
//! in-flight transactions in BEGIN order and only moves past a prefix of them that is entirely
//! done: the flush LSN never passes a transaction that is still in flight, and never passes an
//! earlier one that is. When nothing at all is in flight, the WAL position of the latest
//! keepalive can be confirmed too, so an idle publication on a busy server does not hold WAL.
//!
//! Acknowledgements come from librdkafka's delivery thread; each transaction's counter is
//! shared through an `Arc<TxAcks>` so the delivery callback needs no lock and no lookup.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::lsn::Lsn;

/// Acknowledgement state of one transaction, shared with the delivery callbacks of its events.
#[derive(Debug, Default)]
pub struct TxAcks {
    /// Events handed to the producer and not yet acknowledged.
    pending: AtomicU64,
    /// Set when Kafka refused one of the events for good: the frontier must never pass it.
    failed: AtomicBool,
}

impl TxAcks {
    /// Called once per event before it is handed to the producer.
    pub fn event_sent(&self) {
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// Called from the delivery callback when Kafka acknowledged one event.
    pub fn event_acknowledged(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }

    /// Called from the delivery callback when Kafka refused one event for good.
    pub fn event_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Every event handed over has been acknowledged, and none was refused.
    pub fn is_done(&self) -> bool {
        self.pending.load(Ordering::Acquire) == 0 && !self.failed.load(Ordering::Acquire)
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

#[derive(Debug)]
struct InFlight {
    acks: Arc<TxAcks>,
    /// Known once the COMMIT message has been read; until then the transaction cannot be done.
    end_lsn: Option<Lsn>,
}

/// Tracks in-flight transactions in BEGIN order and derives the LSN that is safe to confirm.
#[derive(Debug)]
pub struct FlushFrontier {
    in_flight: VecDeque<InFlight>,
    confirmed: Lsn,
    /// The newest keepalive WAL position: everything the server sent before it has been read.
    keepalive_wal_end: Lsn,
}

impl FlushFrontier {
    /// Starts from what the slot already confirmed, so the frontier never moves backwards.
    pub fn new(already_confirmed: Lsn) -> Self {
        Self {
            in_flight: VecDeque::new(),
            confirmed: already_confirmed,
            keepalive_wal_end: already_confirmed,
        }
    }

    /// A BEGIN was read: the transaction is in flight until all its events are acknowledged.
    pub fn begin(&mut self) -> Arc<TxAcks> {
        let acks = Arc::new(TxAcks::default());
        self.in_flight.push_back(InFlight {
            acks: Arc::clone(&acks),
            end_lsn: None,
        });
        acks
    }

    /// The COMMIT of the newest transaction was read, with its end LSN.
    pub fn commit(&mut self, end_lsn: Lsn) -> Result<(), FrontierError> {
        let newest = self
            .in_flight
            .back_mut()
            .filter(|tx| tx.end_lsn.is_none())
            .ok_or(FrontierError::CommitWithoutBegin { end_lsn })?;
        newest.end_lsn = Some(end_lsn);
        Ok(())
    }

    /// A primary keepalive reported the server's WAL position.
    pub fn observe_keepalive(&mut self, wal_end: Lsn) {
        self.keepalive_wal_end = self.keepalive_wal_end.max(wal_end);
    }

    /// Advances over every leading transaction that is done and returns the LSN that may be
    /// sent as the flush position. Never decreases.
    pub fn confirmable(&mut self) -> Lsn {
        while let Some(oldest) = self.in_flight.front() {
            match oldest.end_lsn {
                Some(end_lsn) if oldest.acks.is_done() => {
                    self.confirmed = self.confirmed.max(end_lsn);
                    self.in_flight.pop_front();
                }
                _ => break,
            }
        }
        if self.in_flight.is_empty() {
            self.confirmed = self.confirmed.max(self.keepalive_wal_end);
        }
        self.confirmed
    }

    /// Whether Kafka refused an event of a transaction that is still in flight.
    pub fn has_failed_transaction(&self) -> bool {
        self.in_flight.iter().any(|tx| tx.acks.has_failed())
    }

    pub fn in_flight_transactions(&self) -> usize {
        self.in_flight.len()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrontierError {
    #[error(
        "COMMIT ending at {end_lsn} arrived without an open BEGIN: the replication stream is out of order"
    )]
    CommitWithoutBegin { end_lsn: Lsn },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(value: u64) -> Lsn {
        Lsn(value)
    }

    /// A transaction with `events` events handed to the producer and committed at `end`.
    fn committed_tx(frontier: &mut FlushFrontier, events: u64, end: u64) -> Arc<TxAcks> {
        let acks = frontier.begin();
        for _ in 0..events {
            acks.event_sent();
        }
        frontier.commit(lsn(end)).expect("commit after begin");
        acks
    }

    #[test]
    fn starts_at_what_the_slot_had_confirmed() {
        let mut frontier = FlushFrontier::new(lsn(500));
        assert_eq!(frontier.confirmable(), lsn(500));
    }

    #[test]
    fn a_transaction_is_confirmed_only_after_every_event_is_acknowledged() {
        let mut frontier = FlushFrontier::new(lsn(100));
        let tx = committed_tx(&mut frontier, 2, 200);
        assert_eq!(frontier.confirmable(), lsn(100));
        tx.event_acknowledged();
        assert_eq!(
            frontier.confirmable(),
            lsn(100),
            "one event still in flight"
        );
        tx.event_acknowledged();
        assert_eq!(frontier.confirmable(), lsn(200));
    }

    #[test]
    fn an_uncommitted_transaction_holds_the_frontier_even_when_its_events_are_acknowledged() {
        let mut frontier = FlushFrontier::new(lsn(100));
        let tx = frontier.begin();
        tx.event_sent();
        tx.event_acknowledged();
        frontier.observe_keepalive(lsn(900));
        assert_eq!(frontier.confirmable(), lsn(100));
        frontier.commit(lsn(300)).unwrap();
        assert_eq!(
            frontier.confirmable(),
            lsn(900),
            "done, and the keepalive is newer"
        );
    }

    #[test]
    fn a_later_transaction_acknowledged_first_does_not_move_past_an_earlier_one() {
        let mut frontier = FlushFrontier::new(lsn(100));
        let first = committed_tx(&mut frontier, 1, 200);
        let second = committed_tx(&mut frontier, 1, 300);
        second.event_acknowledged();
        assert_eq!(
            frontier.confirmable(),
            lsn(100),
            "the first is still in flight"
        );
        first.event_acknowledged();
        assert_eq!(frontier.confirmable(), lsn(300));
    }

    #[test]
    fn the_frontier_stops_at_the_first_transaction_still_in_flight() {
        let mut frontier = FlushFrontier::new(lsn(0));
        let txs: Vec<_> = (1..=4)
            .map(|i| committed_tx(&mut frontier, 1, i * 100))
            .collect();
        txs[0].event_acknowledged();
        txs[1].event_acknowledged();
        txs[3].event_acknowledged();
        assert_eq!(frontier.confirmable(), lsn(200));
        assert_eq!(frontier.in_flight_transactions(), 2);
    }

    #[test]
    fn a_keepalive_is_not_confirmed_while_anything_is_in_flight() {
        let mut frontier = FlushFrontier::new(lsn(100));
        let tx = committed_tx(&mut frontier, 1, 200);
        frontier.observe_keepalive(lsn(5_000));
        assert_eq!(frontier.confirmable(), lsn(100));
        tx.event_acknowledged();
        assert_eq!(frontier.confirmable(), lsn(5_000));
    }

    #[test]
    fn an_idle_stream_confirms_the_keepalive_position() {
        let mut frontier = FlushFrontier::new(lsn(100));
        frontier.observe_keepalive(lsn(7_000));
        assert_eq!(frontier.confirmable(), lsn(7_000));
    }

    #[test]
    fn the_frontier_never_moves_backwards() {
        let mut frontier = FlushFrontier::new(lsn(1_000));
        frontier.observe_keepalive(lsn(10));
        let tx = committed_tx(&mut frontier, 1, 500);
        tx.event_acknowledged();
        assert_eq!(frontier.confirmable(), lsn(1_000));
    }

    #[test]
    fn a_failed_delivery_holds_the_frontier_for_good() {
        let mut frontier = FlushFrontier::new(lsn(100));
        let tx = committed_tx(&mut frontier, 1, 200);
        tx.event_failed();
        tx.event_acknowledged();
        frontier.observe_keepalive(lsn(900));
        assert_eq!(frontier.confirmable(), lsn(100));
        assert!(frontier.has_failed_transaction());
    }

    #[test]
    fn an_empty_transaction_is_done_at_commit() {
        let mut frontier = FlushFrontier::new(lsn(100));
        committed_tx(&mut frontier, 0, 150);
        assert_eq!(frontier.confirmable(), lsn(150));
    }

    #[test]
    fn commit_without_begin_is_an_error() {
        let mut frontier = FlushFrontier::new(lsn(100));
        assert_eq!(
            frontier.commit(lsn(200)),
            Err(FrontierError::CommitWithoutBegin { end_lsn: lsn(200) })
        );
        committed_tx(&mut frontier, 0, 300);
        assert!(
            frontier.commit(lsn(400)).is_err(),
            "the newest is already committed"
        );
    }
}
