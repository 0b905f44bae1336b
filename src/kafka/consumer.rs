//! The sink's Kafka consumer group: the context that starts a new group's partitions at the
//! beginning, checks assignments for gaps and defers revocations to the sink's loop.
//!
//! This module enforces **the gap rule** (docs/design.md): the consumer runs with
//! `auto.offset.reset = error`, a partition the group never committed starts at the earliest
//! offset because the assignment says so ([`start_uncommitted_at_the_beginning`]), and a
//! committed offset below the log start — found at assignment ([`GroupContext`]'s
//! `post_rebalance`) or reported while running ([`describe_gaps`]) — is a gap the sink stops on,
//! with the topic, partition, expected offset and log start named ([`gap_message`]).
//!
//! Revocations: while the sink's loop runs (`defer_revocations`), a revocation is parked here and
//! carried out by the loop once the revoked partitions' bulks in flight are done.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// Consumer context: checks every newly assigned partition for a gap (a committed offset that
/// fell out of retention), which must stop the sink instead of silently skipping ahead, and,
/// while the sink runs, defers revocations to its loop so that bulks in flight finish first.
pub struct GroupContext {
    pub(crate) gap: std::sync::Mutex<Option<String>>,
    /// Set while the sink's loop runs: it carries out revocations itself.
    pub(crate) defer_revocations: std::sync::atomic::AtomicBool,
    /// Partitions the group took back and the loop has not given up yet.
    pub(crate) revoked: std::sync::Mutex<Option<TopicPartitionList>>,
    /// Wakes the loop when a revocation arrives.
    pub(crate) revocation_arrived: tokio::sync::Notify,
}

impl Default for GroupContext {
    fn default() -> Self {
        Self::new()
    }
}

impl GroupContext {
    pub fn new() -> Self {
        Self {
            gap: std::sync::Mutex::new(None),
            defer_revocations: std::sync::atomic::AtomicBool::new(false),
            revoked: std::sync::Mutex::new(None),
            revocation_arrived: tokio::sync::Notify::new(),
        }
    }

    pub fn gap(&self) -> Option<String> {
        self.gap.lock().ok().and_then(|gap| gap.clone())
    }

    /// Whether a revocation waits for the loop (without copying its list).
    pub fn revocation_waiting(&self) -> bool {
        self.revoked.lock().is_ok_and(|revoked| revoked.is_some())
    }

    /// The revocation waiting for the loop, if any.
    pub fn pending_revocation(&self) -> Option<TopicPartitionList> {
        self.revoked.lock().ok().and_then(|revoked| revoked.clone())
    }

    pub fn take_revocation(&self) -> Option<TopicPartitionList> {
        self.revoked
            .lock()
            .ok()
            .and_then(|mut revoked| revoked.take())
    }
}

/// Sets every assigned partition's start explicitly: its committed offset, or the earliest
/// offset for a partition the group never committed (design invariant 9: the start of a new
/// group is a decision, not `auto.offset.reset`, which is `error` so that no offset out of range
/// is ever skipped). The committed offsets are read again until the broker answers: assigning
/// without them would let librdkafka fall back to the reset policy.
pub fn start_uncommitted_at_the_beginning<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &mut TopicPartitionList,
) {
    let mut committed = None;
    for attempt in 1..=10 {
        match consumer.committed_offsets(partitions.clone(), Duration::from_secs(10)) {
            Ok(offsets) => {
                committed = Some(offsets);
                break;
            }
            Err(error) => {
                tracing::warn!(%error, attempt, "cannot read the group's committed offsets yet; retrying");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    let Some(committed) = committed else {
        tracing::error!(
            "cannot read the group's committed offsets; partitions without one will stop the sink with an offset error"
        );
        return;
    };
    for element in committed.elements() {
        let start = match element.offset() {
            Offset::Offset(offset) => Offset::Offset(offset),
            _ => Offset::Beginning,
        };
        if let Err(error) =
            partitions.set_partition_offset(element.topic(), element.partition(), start)
        {
            tracing::warn!(%error, topic = element.topic(), partition = element.partition(), "cannot set a partition's start");
        }
    }
}

/// The partitions whose next offset to read is no longer in Kafka, as a message naming topic,
/// partition, the offset expected and the log start, with the fix. `None` when none is (the
/// records came back meanwhile, or the broker cannot be asked).
pub fn describe_gaps<C: ConsumerContext>(consumer: &impl Consumer<C>) -> Option<String> {
    let positions = consumer.position().ok()?;
    let committed = consumer
        .committed_offsets(positions.clone(), Duration::from_secs(10))
        .ok();
    let mut gaps = Vec::new();
    for element in positions.elements() {
        let expected = match element.offset() {
            Offset::Offset(offset) => Some(offset),
            _ => committed.as_ref().and_then(|committed| {
                match committed
                    .find_partition(element.topic(), element.partition())?
                    .offset()
                {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                }
            }),
        };
        let Some(expected) = expected else { continue };
        let Ok((low, _)) = consumer.fetch_watermarks(
            element.topic(),
            element.partition(),
            Duration::from_secs(10),
        ) else {
            continue;
        };
        if expected < low {
            gaps.push(gap_message(
                element.topic(),
                element.partition(),
                expected,
                low,
            ));
        }
    }
    (!gaps.is_empty()).then(|| gaps.join("; "))
}

pub fn gap_message(topic: &str, partition: i32, expected: i64, low: i64) -> String {
    format!(
        "partition {topic}/{partition}: the next offset to apply, {expected}, is older than the oldest retained offset {low}; \
         events in between were deleted (retention, deleteRecords) before the sink applied them, and the sink never skips. \
         Rebuild the index (walsync backfill --into), then reset the group's offsets, or raise the topic's retention \
         (docs/runbook.md, \"The sink stopped on a gap\")"
    )
}

/// Gives revoked partitions up: all of them under the eager protocol, the listed ones under the
/// cooperative one.
pub fn unassign<C: ConsumerContext>(consumer: &impl Consumer<C>, revoked: &TopicPartitionList) {
    let result = match consumer.rebalance_protocol() {
        RebalanceProtocol::Cooperative => consumer.incremental_unassign(revoked),
        _ => consumer.unassign(),
    };
    if let Err(error) = result {
        tracing::warn!(%error, "cannot give up revoked partitions");
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            warn_commit_failed(&error);
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        partitions: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                start_uncommitted_at_the_beginning(consumer, partitions);
                let assigned = match consumer.rebalance_protocol() {
                    RebalanceProtocol::Cooperative => consumer.incremental_assign(partitions),
                    _ => consumer.assign(partitions),
                };
                if let Err(error) = assigned {
                    tracing::warn!(%error, "cannot take the assigned partitions");
                }
                self.post_rebalance(consumer, &Rebalance::Assign(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS
                if self.defer_revocations.load(Ordering::Acquire) =>
            {
                // librdkafka waits for the unassign call, which need not come from here.
                if let Ok(mut revoked) = self.revoked.lock() {
                    match revoked.as_mut() {
                        Some(pending) => {
                            for element in partitions.elements() {
                                pending.add_partition(element.topic(), element.partition());
                            }
                        }
                        None => *revoked = Some(partitions.clone()),
                    }
                }
                self.revocation_arrived.notify_one();
            }
            _ => {
                if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS {
                    tracing::error!(error = ?err, "rebalance failed; giving the partitions up");
                }
                unassign(consumer, partitions);
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(assigned) = rebalance else {
            return;
        };
        let committed =
            match consumer.committed_offsets((*assigned).clone(), Duration::from_secs(30)) {
                Ok(committed) => committed,
                Err(error) => {
                    tracing::warn!(%error, "cannot read committed offsets to check for gaps");
                    return;
                }
            };
        for element in committed.elements() {
            let Offset::Offset(offset) = element.offset() else {
                continue;
            };
            let Ok((low, _)) = consumer.fetch_watermarks(
                element.topic(),
                element.partition(),
                Duration::from_secs(30),
            ) else {
                continue;
            };
            if offset < low {
                let message = gap_message(element.topic(), element.partition(), offset, low);
                if let Ok(mut gap) = self.gap.lock() {
                    gap.get_or_insert(message);
                }
            }
        }
    }
}

/// Where a consumer group stands on one partition: the one definition of lag and of "nothing
/// committed", used by the sink's health probe, `walsync verify` and `walsync backfill`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPosition {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset; `None` when it committed nothing on the partition.
    pub committed: Option<i64>,
    /// The partition's log start and end (the next offset to be written).
    pub low: i64,
    pub high: i64,
}

impl GroupPosition {
    /// The next offset the group applies: its committed offset, or — nothing committed — the log
    /// start, where the sink starts a partition it never committed
    /// ([`start_uncommitted_at_the_beginning`]).
    pub fn next(&self) -> i64 {
        self.committed.unwrap_or(self.low)
    }

    /// Records from the group's next offset up to `target` (an end offset read earlier).
    pub fn behind(&self, target: i64) -> u64 {
        u64::try_from(target - self.next()).unwrap_or(0)
    }

    /// Records from the group's next offset to the end of the partition now.
    pub fn lag(&self) -> u64 {
        self.behind(self.high)
    }
}

/// The positions of the group `consumer` belongs to on `partitions`: the committed offsets in
/// one request, then each partition's watermarks. Blocking (run it on a blocking thread);
/// fails on the first answer that does not come within `timeout`.
pub fn group_positions<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    partitions: &[(String, i32)],
    timeout: Duration,
) -> KafkaResult<Vec<GroupPosition>> {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition(topic, *partition);
    }
    let committed = consumer.committed_offsets(list, timeout)?;
    partitions
        .iter()
        .map(|(topic, partition)| {
            let (low, high) = consumer.fetch_watermarks(topic, *partition, timeout)?;
            let committed = committed
                .find_partition(topic, *partition)
                .and_then(|element| match element.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                });
            Ok(GroupPosition {
                topic: topic.clone(),
                partition: *partition,
                committed,
                low,
                high,
            })
        })
        .collect()
}

/// An offset commit failed. After a rebalance the partition may belong to another consumer, which
/// re-applies from the last commit: harmless, versions make it idempotent.
pub fn warn_commit_failed(error: &KafkaError) {
    tracing::warn!(%error, "offset commit failed; the events will be applied again (idempotent)");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(committed: Option<i64>, low: i64, high: i64) -> GroupPosition {
        GroupPosition {
            topic: "t".into(),
            partition: 0,
            committed,
            low,
            high,
        }
    }

    #[test]
    fn nothing_committed_means_the_log_start() {
        // Retention removed offsets 0..40: a new group starts at 40, not at 0.
        assert_eq!(position(None, 40, 100).lag(), 60);
        assert_eq!(position(None, 100, 100).lag(), 0, "nothing to read");
        assert_eq!(position(Some(90), 40, 100).lag(), 10);
        assert_eq!(
            position(Some(100), 40, 100).behind(95),
            0,
            "past the target"
        );
        assert_eq!(position(Some(50), 40, 100).behind(95), 45);
    }
}
