//! The queues between the consumer and the bulk requests, one per partition: which records wait,
//! which partitions have a bulk request in flight, and when a partition's next bulk is due. Pure
//! bookkeeping, no I/O; `sink::apply` drives it.
//!
//! It keeps design invariant 4 by construction: a partition's records leave its queue in offset
//! order, and a partition with a bulk in flight gets no other until [`Partitions::finished`]
//! (which the sink calls only once every item of that bulk is final, retries included). Other
//! partitions go on meanwhile: a slow bulk holds back only its own partition.
//!
//! When a partition's records are due: records that arrive while any bulk is in flight have
//! waited long enough and go in the partition's next bulk as soon as it is free (the batch grows
//! by itself under load). Only a sink with nothing in flight lingers, for at most the linger
//! time, so that a lone first record gets company; a batch's worth of records waiting, over
//! whichever partitions, ends the linger.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A partition: (topic, partition).
pub type PartitionKey = (String, i32);

/// Limits of one bulk: documents and bytes (a single larger record still goes alone).
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_docs: usize,
    pub max_bytes: usize,
}

#[derive(Debug)]
struct Queue<M> {
    /// Records and their sizes, in offset order.
    records: VecDeque<(M, usize)>,
    bytes: usize,
    in_flight: bool,
    /// When the queued records are due; set when the first of them arrives.
    due: Option<Instant>,
}

impl<M> Default for Queue<M> {
    fn default() -> Self {
        Self {
            records: VecDeque::new(),
            bytes: 0,
            in_flight: false,
            due: None,
        }
    }
}

impl<M> Queue<M> {
    fn holds_a_full_batch(&self, limits: BatchLimits) -> bool {
        self.records.len() >= limits.max_docs || self.bytes >= limits.max_bytes
    }

    fn ready(&self, now: Instant, limits: BatchLimits, linger_over: bool) -> bool {
        !self.in_flight
            && !self.records.is_empty()
            && (linger_over
                || self.holds_a_full_batch(limits)
                || self.due.is_some_and(|due| due <= now))
    }
}

/// Per-partition queues and the bulk requests in flight.
#[derive(Debug)]
pub struct Partitions<M> {
    queues: HashMap<PartitionKey, Queue<M>>,
    limits: BatchLimits,
    linger: Duration,
    in_flight: usize,
    queued_records: usize,
    queued_bytes: usize,
}

impl<M> Partitions<M> {
    pub fn new(limits: BatchLimits, linger: Duration) -> Self {
        Self {
            queues: HashMap::new(),
            limits,
            linger,
            in_flight: 0,
            queued_records: 0,
            queued_bytes: 0,
        }
    }

    /// Queues a record of `bytes` bytes that arrived at `now`, after every earlier record of its
    /// partition.
    pub fn push(&mut self, key: PartitionKey, record: M, bytes: usize, now: Instant) {
        let sink_idle = self.in_flight == 0;
        let queue = self.queues.entry(key).or_default();
        if queue.records.is_empty() {
            queue.due = Some(if sink_idle { now + self.linger } else { now });
        }
        queue.records.push_back((record, bytes));
        queue.bytes += bytes;
        self.queued_records += 1;
        self.queued_bytes += bytes;
    }

    /// The batches to send now, at most `slots` of them, earliest due first: each one the oldest
    /// records of a partition with no bulk in flight, within the batch limits. Their partitions
    /// are in flight until [`finished`](Self::finished).
    pub fn take_ready(&mut self, now: Instant, slots: usize) -> Vec<(PartitionKey, Vec<M>)> {
        let limits = self.limits;
        // A batch's worth waiting, whichever partitions it is spread over, is company enough.
        let linger_over =
            self.queued_records >= limits.max_docs || self.queued_bytes >= limits.max_bytes;
        let mut ready: Vec<(Option<Instant>, PartitionKey)> = self
            .queues
            .iter()
            .filter(|(_, queue)| queue.ready(now, limits, linger_over))
            .map(|(key, queue)| (queue.due, key.clone()))
            .collect();
        ready.sort();
        ready.truncate(slots);
        ready
            .into_iter()
            .filter_map(|(_, key)| {
                let batch = self.take_batch(&key, now)?;
                Some((key, batch))
            })
            .collect()
    }

    fn take_batch(&mut self, key: &PartitionKey, now: Instant) -> Option<Vec<M>> {
        let limits = self.limits;
        let queue = self.queues.get_mut(key)?;
        let mut batch = Vec::with_capacity(queue.records.len().min(limits.max_docs));
        let mut bytes = 0;
        while batch.len() < limits.max_docs && (batch.is_empty() || bytes < limits.max_bytes) {
            let Some((record, size)) = queue.records.pop_front() else {
                break;
            };
            bytes += size;
            batch.push(record);
        }
        queue.bytes -= bytes;
        queue.in_flight = true;
        // What stays behind has waited for this bulk: due as soon as it returns.
        queue.due = (!queue.records.is_empty()).then_some(now);
        self.in_flight += 1;
        self.queued_records -= batch.len();
        self.queued_bytes -= bytes;
        Some(batch)
    }

    /// The bulk of `key` is done: its next records may go.
    pub fn finished(&mut self, key: &PartitionKey) {
        if let Some(queue) = self.queues.get_mut(key) {
            if queue.in_flight {
                queue.in_flight = false;
                self.in_flight -= 1;
            }
        }
    }

    /// When the earliest queued record of a partition with nothing in flight falls due (`None`
    /// when no partition waits on a timer).
    pub fn next_due(&self) -> Option<Instant> {
        self.queues
            .values()
            .filter(|queue| !queue.in_flight && !queue.records.is_empty())
            .filter_map(|queue| queue.due)
            .min()
    }

    /// Forgets a partition's queued records (they were never applied; whoever holds the
    /// partition next reads them again). Its bulk in flight, if any, stays counted.
    pub fn discard(&mut self, key: &PartitionKey) -> usize {
        let Some(queue) = self.queues.get_mut(key) else {
            return 0;
        };
        let dropped = queue.records.len();
        self.queued_records -= dropped;
        self.queued_bytes -= queue.bytes;
        queue.records.clear();
        queue.bytes = 0;
        queue.due = None;
        if !queue.in_flight {
            self.queues.remove(key);
        }
        dropped
    }

    pub fn is_in_flight(&self, key: &PartitionKey) -> bool {
        self.queues.get(key).is_some_and(|queue| queue.in_flight)
    }

    /// Bulk requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Records waiting in all queues (not in flight).
    pub fn queued_records(&self) -> usize {
        self.queued_records
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_millis(5);

    fn partitions(max_docs: usize) -> Partitions<u32> {
        Partitions::new(
            BatchLimits {
                max_docs,
                max_bytes: 1000,
            },
            LINGER,
        )
    }

    fn key(partition: i32) -> PartitionKey {
        ("t".to_owned(), partition)
    }

    #[test]
    fn an_idle_sink_lingers_for_company_then_sends_in_offset_order() {
        let mut partitions = partitions(10);
        let start = Instant::now();
        partitions.push(key(0), 1, 10, start);
        partitions.push(key(0), 2, 10, start);
        assert!(partitions.take_ready(start, 4).is_empty(), "lingers");
        assert_eq!(partitions.next_due(), Some(start + LINGER));
        let ready = partitions.take_ready(start + LINGER, 4);
        assert_eq!(ready, vec![(key(0), vec![1, 2])]);
        assert_eq!(partitions.queued_records(), 0);
        assert_eq!(partitions.in_flight(), 1);
    }

    #[test]
    fn a_batchs_worth_spread_over_partitions_ends_the_linger() {
        let mut partitions = partitions(2);
        let start = Instant::now();
        partitions.push(key(0), 1, 10, start);
        assert!(partitions.take_ready(start, 4).is_empty(), "lingers");
        partitions.push(key(1), 2, 10, start);
        let mut ready = partitions.take_ready(start, 4);
        ready.sort();
        assert_eq!(ready, vec![(key(0), vec![1]), (key(1), vec![2])]);
    }

    #[test]
    fn a_full_batch_goes_without_lingering() {
        let mut partitions = partitions(2);
        let start = Instant::now();
        for record in 1..=3 {
            partitions.push(key(0), record, 10, start);
        }
        assert_eq!(partitions.take_ready(start, 4), vec![(key(0), vec![1, 2])]);
    }

    #[test]
    fn one_bulk_per_partition_and_records_queued_behind_it_go_when_it_returns() {
        let mut partitions = partitions(10);
        let start = Instant::now();
        partitions.push(key(0), 1, 10, start);
        assert_eq!(partitions.take_ready(start + LINGER, 4).len(), 1);
        // Arrives while the bulk is in flight: due at once, but not before the bulk returns.
        let later = start + Duration::from_secs(60);
        partitions.push(key(0), 2, 10, later);
        assert!(partitions.take_ready(later, 4).is_empty());
        assert_eq!(partitions.next_due(), None, "nothing waits on a timer");
        partitions.finished(&key(0));
        assert_eq!(partitions.take_ready(later, 4), vec![(key(0), vec![2])]);
    }

    #[test]
    fn a_slow_partition_does_not_hold_back_the_others() {
        let mut partitions = partitions(10);
        let start = Instant::now();
        partitions.push(key(0), 1, 10, start);
        assert_eq!(partitions.take_ready(start + LINGER, 4).len(), 1);
        // Partition 0 is still in flight; partition 1's record goes at once (the sink is busy).
        let later = start + Duration::from_millis(20);
        partitions.push(key(1), 7, 10, later);
        partitions.push(key(0), 2, 10, later);
        assert_eq!(partitions.take_ready(later, 4), vec![(key(1), vec![7])]);
        assert!(partitions.is_in_flight(&key(0)) && partitions.is_in_flight(&key(1)));
    }

    #[test]
    fn slots_bound_the_bulks_in_flight_earliest_due_first() {
        let mut partitions = partitions(10);
        let start = Instant::now();
        partitions.push(key(2), 3, 10, start + Duration::from_millis(2));
        partitions.push(key(1), 2, 10, start + Duration::from_millis(1));
        partitions.push(key(0), 1, 10, start);
        let ready = partitions.take_ready(start + Duration::from_secs(1), 2);
        assert_eq!(ready, vec![(key(0), vec![1]), (key(1), vec![2])]);
        assert_eq!(partitions.queued_records(), 1);
    }

    #[test]
    fn bytes_bound_a_batch_but_a_large_record_still_goes_alone() {
        let mut partitions = partitions(10);
        let start = Instant::now();
        partitions.push(key(0), 1, 5000, start);
        partitions.push(key(0), 2, 600, start);
        partitions.push(key(0), 3, 600, start);
        assert_eq!(partitions.take_ready(start, 1), vec![(key(0), vec![1])]);
        partitions.finished(&key(0));
        assert_eq!(partitions.take_ready(start, 1), vec![(key(0), vec![2, 3])]);
        assert_eq!(partitions.queued_bytes(), 0);
    }

    #[test]
    fn discarding_a_revoked_partition_keeps_its_bulk_in_flight_counted() {
        let mut partitions = partitions(1);
        let start = Instant::now();
        partitions.push(key(0), 1, 10, start);
        partitions.push(key(0), 2, 10, start);
        assert_eq!(partitions.take_ready(start, 4).len(), 1);
        assert_eq!(partitions.discard(&key(0)), 1);
        assert_eq!(partitions.queued_records(), 0);
        assert!(partitions.is_in_flight(&key(0)));
        partitions.finished(&key(0));
        assert_eq!(partitions.in_flight(), 0);
        assert!(partitions.take_ready(start, 4).is_empty());
    }
}
