//! The sink's loop: consume events, apply them to the search server, commit offsets.
//!
//! Records go into per-partition queues (`sink::partitions`); each partition sends its oldest
//! records as one bulk request as soon as it has none in flight — in offset order, at most one
//! bulk per partition in flight, its retried items finished before the partition moves on
//! (design invariant 4) — while the consumer keeps reading for the others, so a slow bulk holds
//! back only its own partition. A partition's next offset is committed (asynchronously; in
//! order) when its bulk is final. Records that pile up while bulks are in flight go at once; an
//! idle sink lingers (`sink.linger_ms`) for company. `sink.concurrency` bounds the bulks in
//! flight, and reading stops while the queues hold `sink.concurrency` batches' worth, so memory
//! stays bounded.
//!
//! Rebalances: a revocation is not carried out inside the consumer's callback. The sink stops
//! reading, forgets the revoked partitions' queued records (never applied nor committed: the next
//! owner reads them again), waits for their bulks in flight, commits what they applied, and only
//! then gives the partitions up. The work of a revoked partition is finished, never abandoned,
//! and nobody else applies a partition while our bulk for it is still in flight.
//!
//! Retries (429, 5xx, timeouts, connection errors, blocks, closed or missing indices) go on with
//! exponential backoff and jitter for as long as it takes; the partition's queue fills meanwhile
//! and reading stops. Only records that can never be applied go to the dead-letter topic
//! (documents the server will never accept, values that cannot be filled, records that are not
//! walsync's or not from the index's cluster), all through one breaker: a burst of them stops
//! the sink instead. When the surviving action of
//! several collapsed ones is refused, only it is dead-lettered; the actions it superseded are
//! sent again, in order.
//!
//! **The gap rule** (docs/design.md) is enforced by the consumer group in `kafka::consumer`;
//! this loop stops on the gap it reports, at assignment or while running. Records reach their
//! table only through `sink::routing` (the topic decides), and unchanged TOAST values are
//! filled by `sink::toast`'s rule.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use elasticsearch::Elasticsearch;
use elasticsearch::http::Method;
use elasticsearch::http::headers::HeaderMap;
use futures_util::StreamExt;
use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::FuturesUnordered;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use tokio::sync::{Mutex, watch};

use crate::config::{Config, DeleteMode, TableConfig};
use crate::event::{Envelope, EnvelopeOp};
use crate::health::HEALTH;
use crate::kafka::consumer::{GroupContext, describe_gaps, unassign, warn_commit_failed};
use crate::kafka::control::{CONTROL_HEADER, CopyCompleted, RecordKind};
use crate::kafka::producer::client_config;
use crate::kafka::topics;
use crate::metrics::{self, SinkTableMetrics};
use crate::postgres::row_reader::PostgresRowReader;
use crate::postgres::types::CodecOptions;
use crate::retry::{Backoff, Disposition};
use crate::sink::bulk::{
    ActionKind, BulkAction, BulkFailure, BulkRequest, ItemOutcome, RetryCause, classify_response,
};
use crate::sink::document::{
    COMMIT_LSN_PATH, DELETED_PATH, DocumentShape, LSN_PATH, PARTITION_PATH, document_body,
    document_id, parse_key, soft_tombstone_body,
};
use crate::sink::index::{self, IndexOverrides, alias_name, ensure_index};
use crate::sink::partitions::{BatchLimits, PartitionKey, Partitions};
use crate::sink::routing::{Routes, TableName};
use crate::sink::toast::{
    self, BatchEvent, EventKind, FillPlan, RowAddress, RowRead, RowSource, RowSourceError,
};

/// How long a requested stop waits for the bulks in flight.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Counters the sink keeps; metrics export reads them.
#[derive(Debug, Default)]
pub struct SinkStats {
    pub indexed: AtomicU64,
    pub deleted: AtomicU64,
    /// Version conflicts: the index already held an equal or newer version.
    pub stale: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Events older than a table's truncate mark, dropped.
    pub dropped_before_truncate: AtomicU64,
    pub retries: AtomicU64,
    pub batches: AtomicU64,
}

/// Where one table's events go, and how they are shaped.
struct TableTarget {
    /// The table its topic belongs to.
    table: TableName,
    alias: String,
    shape: DocumentShape,
    metrics: SinkTableMetrics,
    /// The PostgreSQL cluster the index was built from: every record must come from it.
    system_id: String,
}

/// The sink.
pub struct Sink {
    config: Config,
    client: Elasticsearch,
    consumer: StreamConsumer<GroupContext>,
    dead_letters: FutureProducer,
    dead_letter_topic: String,
    /// Topic → table: the only way a record finds its table (`sink::routing`).
    routes: Routes,
    /// By topic.
    targets: Mutex<HashMap<String, Arc<TableTarget>>>,
    /// Per alias: events with a lower commit LSN were truncated away and are dropped.
    truncate_marks: std::sync::Mutex<HashMap<String, TruncateMark>>,
    /// Writes hold it shared, a truncate exclusively: a bulk of pre-truncate events either
    /// finishes before the truncate's delete-by-query or sees its mark and drops them.
    truncate_gate: tokio::sync::RwLock<()>,
    /// Where TOAST fills re-read rows (PostgreSQL).
    rows: Arc<dyn RowSource>,
    /// Tables written to a concrete index instead of their alias (`walsync backfill --into`
    /// fills a new index with a second sink), by (schema, table).
    index_overrides: HashMap<(String, String), String>,
    breaker: std::sync::Mutex<VecDeque<Instant>>,
    conflicts: std::sync::Mutex<ConflictRate>,
    /// The next offset of every partition whose events are all applied: committed once more,
    /// synchronously, when the sink stops, so no asynchronous commit is lost on the way out.
    applied_offsets: std::sync::Mutex<HashMap<PartitionKey, i64>>,
    pub stats: Arc<SinkStats>,
}

impl Drop for Sink {
    /// Closing the consumer revokes its partitions; with the loop gone (stopped, or its future
    /// dropped), nobody would carry a deferred revocation out and the close would wait forever.
    fn drop(&mut self) {
        self.stop_deferring_revocations();
    }
}

impl Sink {
    /// `_delete_by_query` on `alias` (conflicts proceed, refreshed when done): truncates and the
    /// purge of soft tombstones after a copy.
    async fn delete_by_query(
        &self,
        alias: &str,
        query: &Value,
    ) -> Result<elasticsearch::http::response::Response, elasticsearch::Error> {
        self.client
            .send(
                Method::Post,
                &format!("/{alias}/_delete_by_query?conflicts=proceed&refresh=true"),
                HeaderMap::new(),
                Option::<&()>::None,
                Some(query.to_string()),
                Some(Duration::from_secs(600)),
            )
            .await
    }

    pub async fn new(config: Config) -> anyhow::Result<Self> {
        let client = index::build_client(&config.elasticsearch)?;
        let dead_letter_topic = topics::dead_letter_topic(&config.kafka.topic_prefix);
        topics::ensure_topics(&config.kafka, std::slice::from_ref(&dead_letter_topic)).await?;

        let mut consumer_config = client_config(&config.kafka)?;
        consumer_config
            .set("group.id", &config.sink.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Never jump (design invariant 9): an offset out of range is an error the loop stops
            // on; a group that never committed starts at the earliest offset because the
            // assignment says so explicitly (`GroupContext::rebalance`).
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            // Retries can stall a partition for a long time; that must not evict the consumer.
            .set("max.poll.interval.ms", "86400000")
            .set("topic.metadata.refresh.interval.ms", "5000")
            .set("isolation.level", "read_committed");
        let consumer: StreamConsumer<GroupContext> = consumer_config
            .create_with_context(GroupContext::new())
            .context("cannot create the Kafka consumer")?;
        if config.sink.topics.is_empty() {
            consumer.subscribe(&[&topics::table_topics_pattern(&config.kafka.topic_prefix)])?;
        } else {
            let topics: Vec<&str> = config.sink.topics.iter().map(String::as_str).collect();
            consumer.subscribe(&topics)?;
        }
        let dead_letters: FutureProducer = {
            let mut producer = client_config(&config.kafka)?;
            producer
                .set("enable.idempotence", "true")
                .set("acks", "all");
            producer
                .create()
                .context("cannot create the dead-letter producer")?
        };
        let rows: Arc<dyn RowSource> = Arc::new(PostgresRowReader::new(
            crate::postgres::replication::ConnectParams::from_config(&config)?,
            CodecOptions::default(),
        ));
        Ok(Self {
            routes: Routes::new(&config),
            config,
            client,
            consumer,
            dead_letters,
            dead_letter_topic,
            targets: Mutex::new(HashMap::new()),
            truncate_marks: std::sync::Mutex::new(HashMap::new()),
            truncate_gate: tokio::sync::RwLock::new(()),
            rows,
            index_overrides: HashMap::new(),
            breaker: std::sync::Mutex::new(VecDeque::new()),
            conflicts: std::sync::Mutex::new(ConflictRate::new(Instant::now())),
            applied_offsets: std::sync::Mutex::new(HashMap::new()),
            stats: Arc::new(SinkStats::default()),
        })
    }

    /// Writes `schema.table` to the existing concrete `index` instead of the table's alias; the
    /// index is neither created nor checked (its creator did that).
    pub fn write_table_to(&mut self, schema: &str, table: &str, index: &str) {
        self.index_overrides
            .insert((schema.to_owned(), table.to_owned()), index.to_owned());
    }

    /// How many partitions this sink holds right now (0 before it joined its group).
    pub fn assigned_partitions(&self) -> usize {
        self.consumer
            .assignment()
            .map_or(0, |assignment| assignment.count())
    }

    /// Whether the group has taken partitions back that this sink has not given up yet (their
    /// bulks in flight are still running).
    pub fn revocation_pending(&self) -> bool {
        self.consumer.context().revocation_waiting()
    }

    /// From here on revocations are carried out in the consumer's callback; one the loop left
    /// behind is carried out now.
    fn stop_deferring_revocations(&self) {
        let context = self.consumer.context();
        context.defer_revocations.store(false, Ordering::Release);
        if let Some(revoked) = context.take_revocation() {
            unassign(&self.consumer, &revoked);
        }
    }

    /// The partitions this sink holds right now, as (topic, partition).
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.consumer.assignment().map_or_else(
            |_| Vec::new(),
            |assignment| {
                assignment
                    .elements()
                    .iter()
                    .map(|element| (element.topic().to_owned(), element.partition()))
                    .collect()
            },
        )
    }

    /// Runs until `stop` turns true (finishing the bulks in flight) or an error an operator must
    /// look at.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
        let context = self.consumer.context();
        context.defer_revocations.store(true, Ordering::Release);
        let mut queues = Partitions::new(
            BatchLimits {
                max_docs: self.config.sink.batch_max_docs.max(1),
                max_bytes: self.config.sink.batch_max_bytes.max(1),
            },
            Duration::from_millis(self.config.sink.linger_ms),
        );
        let mut in_flight = FuturesUnordered::new();
        let result = self.pipeline(&mut stop, &mut queues, &mut in_flight).await;
        if result.is_ok() {
            self.finish_in_flight(&mut queues, &mut in_flight).await?;
        }
        self.commit_applied_offsets();
        self.stop_deferring_revocations();
        tracing::info!("sink stopped");
        result
    }

    /// Reads records into the partitions' queues and sends each partition's bulks, until `stop`.
    async fn pipeline<'s>(
        &'s self,
        stop: &mut watch::Receiver<bool>,
        queues: &mut Partitions<OwnedMessage>,
        in_flight: &mut FuturesUnordered<BoxFuture<'s, Applied>>,
    ) -> anyhow::Result<()> {
        let context = self.consumer.context();
        let concurrency = self.config.sink.concurrency.max(1);
        // A batch's worth waiting behind every bulk that may be in flight keeps each partition's
        // next bulk full; beyond that, reading waits (bounded memory).
        let queue_records = self.config.sink.batch_max_docs.max(1) * concurrency;
        let queue_bytes = self.config.sink.batch_max_bytes.max(1) * concurrency;
        let has_room = |queues: &Partitions<OwnedMessage>| {
            queues.queued_records() < queue_records && queues.queued_bytes() < queue_bytes
        };
        let mut read_after: Option<tokio::time::Instant> = None;
        loop {
            if let Some(gap) = context.gap() {
                bail!("{gap}");
            }
            let revoking = self.carry_out_revocation(queues);
            let read_pause = read_after.filter(|until| *until > tokio::time::Instant::now());
            if !revoking && read_pause.is_none() {
                // What already waits in the consumer goes into the queues first, so that a
                // partition's next bulk takes all it can.
                while has_room(queues) && !context.revocation_waiting() {
                    let Some(received) = self.consumer.recv().now_or_never() else {
                        break;
                    };
                    if !self.receive(queues, received, &mut read_after) {
                        break;
                    }
                }
                if context.revocation_waiting() {
                    // Arrived while draining: carried out before any new bulk is sent.
                    continue;
                }
            }
            let slots = concurrency.saturating_sub(queues.in_flight());
            for (partition, messages) in queues.take_ready(Instant::now(), slots) {
                in_flight.push(self.apply_in_order(partition, messages).boxed());
            }
            let next_due = (queues.in_flight() < concurrency)
                .then(|| queues.next_due())
                .flatten()
                .map(tokio::time::Instant::from_std);
            let read_pause = read_after.filter(|until| *until > tokio::time::Instant::now());
            let reading = !revoking && read_pause.is_none() && has_room(queues);
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                Some((partition, applied)) = in_flight.next(), if !in_flight.is_empty() => {
                    self.applied(queues, &partition, applied)?;
                }
                _ = context.revocation_arrived.notified() => {}
                received = self.consumer.recv(), if reading => {
                    self.receive(queues, received, &mut read_after);
                }
                _ = sleep_until_some(next_due), if next_due.is_some() => {}
                _ = sleep_until_some(read_pause), if read_pause.is_some() => {}
            }
        }
    }

    /// Queues a received record; false for a consumer error, after which reading pauses briefly.
    fn receive(
        &self,
        queues: &mut Partitions<OwnedMessage>,
        received: KafkaResult<BorrowedMessage<'_>>,
        read_after: &mut Option<tokio::time::Instant>,
    ) -> bool {
        match received {
            Ok(message) => {
                let message = message.detach();
                let bytes = message.payload().map_or(0, <[u8]>::len);
                let partition = (message.topic().to_owned(), message.partition());
                queues.push(partition, message, bytes, Instant::now());
                true
            }
            // An offset out of range: records the sink has not applied were deleted. Stop.
            Err(KafkaError::MessageConsumption(
                code @ (RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange),
            )) => {
                let context = self.consumer.context();
                let message = describe_gaps(&self.consumer).unwrap_or_else(|| {
                    format!(
                        "Kafka reports an offset out of range ({code:?}): records this sink has not applied are no longer in Kafka, \
                         and the sink never skips. See docs/runbook.md, \"The sink stopped on a gap\""
                    )
                });
                if let Ok(mut gap) = context.gap.lock() {
                    gap.get_or_insert(message);
                }
                false
            }
            // Other consumer errors are reports (a subscribed pattern that matches no topic
            // yet, a broker going away); librdkafka recovers by itself.
            Err(error) => {
                tracing::warn!(%error, "Kafka consumer reported an error; continuing");
                *read_after = Some(tokio::time::Instant::now() + Duration::from_millis(500));
                false
            }
        }
    }

    /// On stop: lets the bulks in flight finish if the search server is answering; during an
    /// outage it gives up on them: their offsets are not committed, so they are applied again on
    /// the next start (idempotent).
    async fn finish_in_flight<'s>(
        &'s self,
        queues: &mut Partitions<OwnedMessage>,
        in_flight: &mut FuturesUnordered<BoxFuture<'s, Applied>>,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while !in_flight.is_empty() {
            match tokio::time::timeout_at(deadline, in_flight.next()).await {
                Ok(Some((partition, applied))) => self.applied(queues, &partition, applied)?,
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        "stopping with bulks the search server has not accepted yet; their offsets are not committed and they are applied again on the next start"
                    );
                    break;
                }
            }
        }
        Ok(())
    }

    /// Applies one partition's batch; the outcome carries the partition's next offset.
    async fn apply_in_order(
        &self,
        partition: PartitionKey,
        messages: Vec<OwnedMessage>,
    ) -> Applied {
        let next_offset = messages.last().map(|message| message.offset() + 1);
        let result = self.apply_partition(&messages).await;
        (partition, result.map(|()| next_offset))
    }

    /// A partition's bulk is final: its next records may go, and its offset is committed
    /// (asynchronously: the loop need not wait for the broker, and commits reach it in order;
    /// failures are reported by the context's commit callback).
    fn applied(
        &self,
        queues: &mut Partitions<OwnedMessage>,
        partition: &PartitionKey,
        applied: anyhow::Result<Option<i64>>,
    ) -> anyhow::Result<()> {
        queues.finished(partition);
        let Some(next_offset) = applied? else {
            return Ok(());
        };
        self.commit(
            std::iter::once((partition, &next_offset)),
            CommitMode::Async,
        )?;
        if let Ok(mut applied_offsets) = self.applied_offsets.lock() {
            applied_offsets.insert(partition.clone(), next_offset);
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Carries out a revocation once the revoked partitions have no bulk in flight: their queued
    /// records are forgotten at once (never applied, never committed), what they applied is
    /// committed, and only then are they given up. True while one is waiting for its bulks.
    fn carry_out_revocation(&self, queues: &mut Partitions<OwnedMessage>) -> bool {
        let context = self.consumer.context();
        let Some(revoked) = context.pending_revocation() else {
            return false;
        };
        let partitions: Vec<PartitionKey> = revoked
            .elements()
            .iter()
            .map(|element| (element.topic().to_owned(), element.partition()))
            .collect();
        for partition in &partitions {
            queues.discard(partition);
        }
        if partitions
            .iter()
            .any(|partition| queues.is_in_flight(partition))
        {
            return true;
        }
        let Some(revoked) = context.take_revocation() else {
            return false;
        };
        if let Ok(mut applied) = self.applied_offsets.lock() {
            let finished: HashMap<PartitionKey, i64> = partitions
                .iter()
                .filter_map(|partition| Some((partition.clone(), applied.remove(partition)?)))
                .collect();
            // A lost assignment already belongs to someone else: committing would only rewind it.
            if !finished.is_empty() && !self.consumer.assignment_lost() {
                if let Err(error) = self.commit(finished.iter(), CommitMode::Sync) {
                    warn_commit_failed(&error);
                }
            }
        }
        unassign(&self.consumer, &revoked);
        tracing::info!(
            partitions = partitions.len(),
            "gave revoked partitions up once their bulks in flight had finished"
        );
        false
    }

    /// Commits, and waits for, the offsets of everything applied.
    fn commit_applied_offsets(&self) {
        let Ok(applied) = self.applied_offsets.lock() else {
            return;
        };
        if !applied.is_empty() {
            if let Err(error) = self.commit(applied.iter(), CommitMode::Sync) {
                warn_commit_failed(&error);
            }
        }
    }

    /// Commits each partition's next offset; a failure is logged (the events are applied again
    /// by whoever holds the partition next), an offset librdkafka refuses to list is returned.
    fn commit<'o>(
        &self,
        next_offsets: impl Iterator<Item = (&'o PartitionKey, &'o i64)>,
        mode: CommitMode,
    ) -> KafkaResult<()> {
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in next_offsets {
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        if let Err(error) = self.consumer.commit(&offsets, mode) {
            warn_commit_failed(&error);
        }
        Ok(())
    }

    /// Applies one partition's messages in offset order.
    async fn apply_partition(&self, messages: &[OwnedMessage]) -> anyhow::Result<()> {
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for message in messages {
            let Some(table) = self.routes.table_of(message.topic()) else {
                self.dead_letter(message, &self.routes.unrouted_reason(message.topic()))
                    .await?;
                continue;
            };
            match record_kind(message) {
                RecordKind::Change => {}
                RecordKind::CopyCompleted => {
                    // Everything before it in this partition is applied first.
                    self.write(std::mem::take(&mut pending)).await?;
                    self.apply_copy_completed(message, table).await?;
                    continue;
                }
                RecordKind::UnknownControl => {
                    tracing::warn!(
                        topic = message.topic(),
                        partition = message.partition(),
                        offset = message.offset(),
                        "skipping a control record of a kind this version does not know"
                    );
                    continue;
                }
            }
            let Some(payload) = message.payload() else {
                continue;
            }; // Kafka tombstone
            let envelope = match Envelope::parse(payload) {
                Ok(envelope) => envelope,
                Err(error) => {
                    self.dead_letter(message, &format!("not a walsync change event: {error}"))
                        .await?;
                    continue;
                }
            };
            let target = self
                .table_target(message.topic(), table, &envelope.source.system_id)
                .await?;
            if let Err(reason) =
                self.routes
                    .check_event(&target.table, &target.system_id, &envelope)
            {
                self.dead_letter(message, &reason).await?;
                continue;
            }
            target.metrics.consumed.add(envelope.op.code(), 1);
            if envelope.op == EnvelopeOp::Truncate {
                self.write(std::mem::take(&mut pending)).await?;
                self.truncate(&envelope, &target).await?;
                continue;
            }
            pending.push(Pending {
                message,
                envelope,
                target,
                fill_failure: None,
            });
        }
        self.write(pending).await
    }

    /// The index target of the table `topic` belongs to, creating or checking its index on
    /// first use; `system_id` (the first record's cluster) is what a new index records.
    async fn table_target(
        &self,
        topic: &str,
        table: &TableName,
        system_id: &str,
    ) -> anyhow::Result<Arc<TableTarget>> {
        let mut targets = self.targets.lock().await;
        if let Some(target) = targets.get(topic) {
            return Ok(Arc::clone(target));
        }
        let qualified = table.qualified();
        let table_config = self
            .config
            .tables
            .get(&qualified)
            .cloned()
            .unwrap_or_default();
        let key = (table.schema.clone(), table.table.clone());
        let (alias, truncate_mark) = match self.index_overrides.get(&key) {
            Some(index) => (
                index.clone(),
                read_truncate_mark(&self.client, index).await?,
            ),
            None => {
                let alias = alias_name(&self.config.elasticsearch, &table_config, &key.0, &key.1);
                let mark = self.prepare_index(&alias, &table_config, system_id).await?;
                (alias, mark)
            }
        };
        self.raise_truncate_mark(&alias, truncate_mark);
        let target = Arc::new(TableTarget {
            table: table.clone(),
            shape: DocumentShape::new(&qualified, &table_config)?,
            alias,
            metrics: SinkTableMetrics::new(&qualified),
            system_id: system_id.to_owned(),
        });
        targets.insert(topic.to_owned(), Arc::clone(&target));
        Ok(target)
    }

    /// Checks or creates the index behind `alias` and reads its truncate mark. An unreachable,
    /// starting or overloaded search server is waited out with backoff, like a failing bulk
    /// request: a sink that meets a table's first event during an outage (after a restart, say)
    /// must not stop. An index that is not walsync's or was built from another cluster, or a bad
    /// override file, stops the sink.
    async fn prepare_index(
        &self,
        alias: &str,
        table: &TableConfig,
        system_id: &str,
    ) -> anyhow::Result<TruncateMark> {
        let mut backoff = Backoff::new();
        loop {
            let error = match self.ensure(alias, table, system_id).await {
                Ok(()) => match read_truncate_mark(&self.client, alias).await {
                    Ok(mark) => return Ok(mark),
                    Err(error) => error,
                },
                Err(error) if index_error_is_transient(&error) => error,
                Err(error) => return Err(error),
            };
            self.note_retry();
            tracing::warn!(%alias, error = %format!("{error:#}"), "cannot check the index yet; retrying");
            backoff.wait().await;
        }
    }

    fn truncate_mark(&self, alias: &str) -> TruncateMark {
        self.truncate_marks
            .lock()
            .ok()
            .and_then(|marks| marks.get(alias).copied())
            .unwrap_or_default()
    }

    fn raise_truncate_mark(&self, alias: &str, mark: TruncateMark) {
        if let Ok(mut marks) = self.truncate_marks.lock() {
            let entry = marks.entry(alias.to_owned()).or_default();
            *entry = (*entry).max(mark);
        }
    }

    async fn ensure(
        &self,
        alias: &str,
        table: &TableConfig,
        system_id: &str,
    ) -> anyhow::Result<()> {
        let overrides = IndexOverrides::from_table(table)?;
        ensure_index(
            &self.client,
            alias,
            system_id,
            overrides.settings.as_ref(),
            overrides.mappings.as_ref(),
            &self.config.elasticsearch.gc_deletes,
        )
        .await?;
        Ok(())
    }

    /// Turns events into bulk actions (filling unchanged TOAST values first) and writes them.
    async fn write(&self, mut pending: Vec<Pending<'_>>) -> anyhow::Result<()> {
        let _no_truncate_meanwhile = self.truncate_gate.read().await;
        let before = pending.len();
        pending.retain(|item| {
            TruncateMark::of(&item.envelope) >= self.truncate_mark(&item.target.alias)
        });
        self.stats
            .dropped_before_truncate
            .fetch_add((before - pending.len()) as u64, Ordering::Relaxed);
        if pending.is_empty() {
            return Ok(());
        }
        self.fill_unchanged_toast(&mut pending).await?;
        let mut actions = Vec::with_capacity(pending.len());
        let mut sources = Vec::with_capacity(pending.len());
        let mut refused = Vec::new();
        for (position, item) in pending.iter().enumerate() {
            match self.action(item) {
                Ok(Some(action)) => {
                    actions.push(action);
                    sources.push(position);
                }
                Ok(None) => {}
                Err(reason) => refused.push((item.message, reason)),
            }
        }
        let refused: Vec<(&OwnedMessage, &str)> = refused
            .iter()
            .map(|(message, reason)| (*message, reason.as_str()))
            .collect();
        self.dead_letter_all(&refused).await?;
        self.send(actions, &sources, &pending).await
    }

    fn action(&self, item: &Pending<'_>) -> Result<Option<BulkAction>, String> {
        let key = item.message.key().unwrap_or_default();
        let id =
            document_id(key).map_err(|error| format!("cannot derive the document id: {error}"))?;
        let version = item.envelope.source.commit_lsn;
        let index = item.target.alias.clone();
        if let Some(reason) = &item.fill_failure {
            return Err(reason.clone());
        }
        let kind = match item.envelope.op {
            EnvelopeOp::Create | EnvelopeOp::Update | EnvelopeOp::Read => {
                if !item
                    .target
                    .shape
                    .unfilled_columns(&item.envelope)
                    .is_empty()
                {
                    // The re-read found no row: a later delete of this key in this partition
                    // supersedes the event (sink::toast).
                    return Ok(None);
                }
                ActionKind::Index(
                    document_body(&item.target.shape, &item.envelope).map_err(|e| e.to_string())?,
                )
            }
            EnvelopeOp::Delete => match delete_action(
                self.config.elasticsearch.delete_mode,
                item.envelope.source.soft_delete,
            ) {
                DeleteAction::Hard => ActionKind::Delete,
                DeleteAction::SoftTombstone => ActionKind::Index(
                    soft_tombstone_body(
                        &item.target.shape,
                        key,
                        &item.envelope,
                        item.message.partition(),
                    )
                    .map_err(|e| e.to_string())?,
                ),
            },
            EnvelopeOp::Truncate => return Ok(None),
        };
        Ok(Some(BulkAction {
            index,
            id,
            version,
            kind,
        }))
    }

    /// Sends actions until every one is done, stale or dead-lettered. Retried items go again,
    /// in order, before anything later of this partition. A request the server (or a proxy)
    /// finds too large (413) is split in halves, sent one after the other; one document alone
    /// too large can never be accepted and is dead-lettered.
    async fn send(
        &self,
        mut actions: Vec<BulkAction>,
        sources: &[usize],
        pending: &[Pending<'_>],
    ) -> anyhow::Result<()> {
        let mut origins: Vec<usize> = sources.to_vec();
        let mut backoff = Backoff::new();
        while !actions.is_empty() {
            let request = BulkRequest::build(&actions);
            let outcomes = match self.post_bulk(&request).await {
                Ok(outcomes) => outcomes,
                Err(BulkFailure::Fatal { reason }) => {
                    bail!("the search server refused the bulk request: {reason}")
                }
                Err(BulkFailure::TooLarge { reason }) if request.items.len() > 1 => {
                    tracing::warn!(%reason, items = request.items.len(), bytes = request.body.len(), "bulk request too large; sending it in two halves");
                    return self.send_in_halves(actions, origins, pending).await;
                }
                Err(BulkFailure::TooLarge { reason }) => {
                    // Every action is the same document, collapsed into one item.
                    return self.dead_letter_too_large(&reason, &origins, pending).await;
                }
                Err(failure) => {
                    self.note_retry();
                    tracing::warn!(%failure, "bulk request failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            };
            let mut retry_positions = Vec::new();
            // Actions a dead-lettered survivor had superseded: sent again (collapsed anew, in
            // order), so only what the server refuses is dead-lettered.
            let mut resend_positions = Vec::new();
            let mut dead = Vec::new();
            let mut missing_index = false;
            let (mut applied, mut stale) = (0_u64, 0_u64);
            let now_ms = unix_millis();
            for (item, outcome) in request.items.iter().zip(outcomes) {
                // Collapsed events share their item's outcome: count each of them.
                let events = item.positions().len() as u64;
                let sources = || item.positions().into_iter().map(|p| &pending[origins[p]]);
                match &outcome {
                    ItemOutcome::Done | ItemOutcome::AlreadyDeleted => sources().for_each(|p| {
                        let op = p.envelope.op.code();
                        p.target
                            .metrics
                            .written(op, p.envelope.source.ts_ms, now_ms)
                    }),
                    ItemOutcome::Stale => {
                        sources().for_each(|p| p.target.metrics.conflicts.increment(1))
                    }
                    _ => {}
                }
                match outcome {
                    ItemOutcome::Done => {
                        let counter = if item.operation == crate::sink::bulk::BulkOperation::Delete
                        {
                            &self.stats.deleted
                        } else {
                            &self.stats.indexed
                        };
                        counter.fetch_add(events, Ordering::Relaxed);
                        applied += events;
                    }
                    ItemOutcome::Stale => {
                        self.stats.stale.fetch_add(events, Ordering::Relaxed);
                        stale += events;
                    }
                    ItemOutcome::AlreadyDeleted => {
                        self.stats.deleted.fetch_add(events, Ordering::Relaxed);
                    }
                    ItemOutcome::Retry { cause, reason } => {
                        missing_index |= cause == RetryCause::IndexMissing;
                        tracing::debug!(cause = cause.label(), %reason, "bulk item will be retried");
                        retry_positions.extend(item.positions());
                    }
                    ItemOutcome::DeadLetter { reason } => {
                        dead.push((vec![item.position], reason));
                        resend_positions.extend(item.superseded.iter().copied());
                    }
                }
            }
            self.watch_conflicts(stale, applied + stale);
            let records: Vec<(&OwnedMessage, &str)> = dead
                .iter()
                .flat_map(|(positions, reason)| {
                    positions
                        .iter()
                        .map(|position| (pending[origins[*position]].message, reason.as_str()))
                })
                .collect();
            self.dead_letter_all(&records).await?;
            if retry_positions.is_empty() && resend_positions.is_empty() {
                break;
            }
            let wait = !retry_positions.is_empty();
            retry_positions.extend(resend_positions);
            retry_positions.sort_unstable();
            if missing_index {
                self.recreate_missing_indices(&retry_positions, &origins, pending)
                    .await;
            }
            if wait {
                self.note_retry();
            }
            let kept_actions = retry_positions
                .iter()
                .map(|p| actions[*p].clone())
                .collect();
            origins = retry_positions.iter().map(|p| origins[*p]).collect();
            actions = kept_actions;
            if wait {
                backoff.wait().await;
            }
        }
        Ok(())
    }

    /// Sends the first half of `actions`, then the second: a request refused as too large,
    /// in the same order. Boxed: `send` and this call each other.
    fn send_in_halves<'s>(
        &'s self,
        mut actions: Vec<BulkAction>,
        mut origins: Vec<usize>,
        pending: &'s [Pending<'_>],
    ) -> futures_util::future::BoxFuture<'s, anyhow::Result<()>> {
        Box::pin(async move {
            let half = actions.len() / 2;
            let later_actions = actions.split_off(half);
            let later_origins = origins.split_off(half);
            self.send(actions, &origins, pending).await?;
            self.send(later_actions, &later_origins, pending).await
        })
    }

    /// One document too large on its own: the server will never accept it.
    async fn dead_letter_too_large(
        &self,
        reason: &str,
        origins: &[usize],
        pending: &[Pending<'_>],
    ) -> anyhow::Result<()> {
        let reason = format!(
            "the document alone is too large for the search server ({reason}); raise its http.max_content_length (and any proxy's body limit)"
        );
        let records: Vec<(&OwnedMessage, &str)> = origins
            .iter()
            .map(|origin| (pending[*origin].message, reason.as_str()))
            .collect();
        self.dead_letter_all(&records).await
    }

    /// Counts one retry of a request to the search server.
    fn note_retry(&self) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::SINK_RETRIES).increment(1);
    }

    async fn post_bulk(&self, request: &BulkRequest) -> Result<Vec<ItemOutcome>, BulkFailure> {
        let started = Instant::now();
        ::metrics::histogram!(metrics::SINK_BULK_BYTES).record(request.body.len() as f64);
        let response = self
            .client
            .send(
                Method::Post,
                "/_bulk",
                HeaderMap::new(),
                Option::<&()>::None,
                Some(request.body.as_slice()),
                Some(Duration::from_secs(60)),
            )
            .await
            .map_err(|error| BulkFailure::Retry {
                reason: format!("transport: {error}"),
            })?;
        let status = response.status_code().as_u16();
        let body = response.bytes().await.map_err(|error| BulkFailure::Retry {
            reason: format!("reading the response: {error}"),
        })?;
        ::metrics::histogram!(metrics::SINK_BULK_SECONDS).record(started.elapsed().as_secs_f64());
        if status < 500 {
            HEALTH.search_answered();
        }
        classify_response(request, status, &body)
    }

    async fn recreate_missing_indices(
        &self,
        positions: &[usize],
        origins: &[usize],
        pending: &[Pending<'_>],
    ) {
        let mut done = Vec::new();
        for position in positions {
            let item = &pending[origins[*position]];
            let overridden = self
                .index_overrides
                .values()
                .any(|i| *i == item.target.alias);
            if overridden || done.contains(&item.target.alias) {
                continue;
            }
            let table = self
                .config
                .tables
                .get(&item.target.table.qualified())
                .cloned()
                .unwrap_or_default();
            match self
                .ensure(&item.target.alias, &table, &item.target.system_id)
                .await
            {
                Ok(()) => {
                    tracing::warn!(alias = %item.target.alias, "the index was missing and has been re-created")
                }
                Err(error) => {
                    tracing::warn!(error = %format!("{error:#}"), "cannot re-create a missing index yet")
                }
            }
            done.push(item.target.alias.clone());
        }
    }

    /// Warns when most writes are version conflicts: right after a replay that is expected, but
    /// a lasting high share means the index is ahead of the stream — or the source cluster
    /// changed and every write is "stale", which is silent total loss.
    fn watch_conflicts(&self, stale: u64, writes: u64) {
        let Ok(mut rate) = self.conflicts.lock() else {
            return;
        };
        if let Some(share) = rate.record(stale, writes, Instant::now()) {
            tracing::warn!(
                share_percent = (share * 100.0).round(),
                "most writes of the last minute were version conflicts (stale events): fine during a replay; \
                 otherwise check that the index was built from this PostgreSQL cluster"
            );
        }
    }

    /// Stops the sink when dead letters come faster than `sink.dlq_breaker_per_minute`: a
    /// mapping change that rejects every document must not empty a table into the DLQ.
    fn trip_breaker_if_bursting(&self, count: usize, first_reason: &str) -> anyhow::Result<()> {
        let limit = self.config.sink.dlq_breaker_per_minute as usize;
        let now = Instant::now();
        let mut recent = self
            .breaker
            .lock()
            .map_err(|_| anyhow::anyhow!("breaker lock poisoned"))?;
        while recent
            .front()
            .is_some_and(|at| now.duration_since(*at) > Duration::from_secs(60))
        {
            recent.pop_front();
        }
        if recent.len() + count > limit {
            ::metrics::gauge!(metrics::SINK_BREAKER_OPEN).set(1.0);
            bail!(
                "dead-letter breaker tripped: {} records dead-lettered within a minute (limit sink.dlq_breaker_per_minute = {limit}); \
                 first reason: {first_reason}. This batch's offsets were not committed and nothing more was dead-lettered. \
                 Fix the mapping, the data or the configuration the reason names, then restart the sink",
                recent.len() + count
            );
        }
        recent.extend(std::iter::repeat_n(now, count));
        Ok(())
    }

    /// Dead-letters one record, within the breaker's limit.
    async fn dead_letter(&self, message: &OwnedMessage, reason: &str) -> anyhow::Result<()> {
        self.trip_breaker_if_bursting(1, reason)?;
        self.publish_dead_letter(message, reason).await
    }

    /// Dead-letters records together: the breaker counts them all before the first is written,
    /// so a tripped breaker dead-letters none of them.
    async fn dead_letter_all(&self, records: &[(&OwnedMessage, &str)]) -> anyhow::Result<()> {
        let Some((_, first_reason)) = records.first() else {
            return Ok(());
        };
        self.trip_breaker_if_bursting(records.len(), first_reason)?;
        for (message, reason) in records {
            self.publish_dead_letter(message, reason).await?;
        }
        Ok(())
    }

    /// Writes one record to the dead-letter topic, with why and where it came from. Only
    /// through [`Self::dead_letter`] and [`Self::dead_letter_all`], which hold the breaker.
    async fn publish_dead_letter(
        &self,
        message: &OwnedMessage,
        reason: &str,
    ) -> anyhow::Result<()> {
        tracing::warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), %reason, "dead-lettered");
        let mut headers = OwnedHeaders::new();
        if let Some(original) = message.headers() {
            for header in original.iter() {
                headers = headers.insert(Header {
                    key: header.key,
                    value: header.value,
                });
            }
        }
        let offset = message.offset().to_string();
        let partition = message.partition().to_string();
        headers = headers
            .insert(Header {
                key: "walsync.dlq.reason",
                value: Some(reason),
            })
            .insert(Header {
                key: "walsync.dlq.topic",
                value: Some(message.topic()),
            })
            .insert(Header {
                key: "walsync.dlq.partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "walsync.dlq.offset",
                value: Some(&offset),
            });
        let mut record = FutureRecord::to(&self.dead_letter_topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        self.dead_letters
            .send(record, Duration::from_secs(300))
            .await
            .map_err(|(error, _)| {
                anyhow::anyhow!(
                    "cannot write to the dead-letter topic {}: {error}",
                    self.dead_letter_topic
                )
            })?;
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        ::metrics::counter!(metrics::SINK_DEAD_LETTERS, "topic" => message.topic().to_owned())
            .increment(1);
        Ok(())
    }

    /// Deletes the table's documents older than the truncate, and records the truncate mark in
    /// the index so older events still arriving from other partitions are dropped.
    async fn truncate(&self, envelope: &Envelope, target: &TableTarget) -> anyhow::Result<()> {
        let _exclusive = self.truncate_gate.write().await;
        let mark = TruncateMark::of(envelope);
        self.record_truncate_mark(&target.alias, mark).await?;
        self.raise_truncate_mark(&target.alias, mark);
        // Earlier transactions, and earlier changes of the truncating transaction itself.
        let query = serde_json::json!({"query": {"bool": {"should": [
            {"range": {COMMIT_LSN_PATH: {"lt": mark.commit_lsn}}},
            {"bool": {"filter": [
                {"term": {COMMIT_LSN_PATH: mark.commit_lsn}},
                {"range": {LSN_PATH: {"lt": mark.lsn}}}
            ]}}
        ], "minimum_should_match": 1}}});
        let deleted = self
            .delete_by_query_until_done(&target.alias, &query, "applying a truncate")
            .await?;
        tracing::info!(alias = %target.alias, commit_lsn = mark.commit_lsn, lsn = mark.lsn, ?deleted, "applied a truncate");
        Ok(())
    }

    /// Records a truncate mark in the index's `_meta`, retrying transient failures without
    /// end (like a bulk: the partition waits, nothing is skipped).
    async fn record_truncate_mark(&self, alias: &str, mark: TruncateMark) -> anyhow::Result<()> {
        let mut backoff = Backoff::new();
        loop {
            match write_truncate_mark(&self.client, alias, mark).await {
                Ok(()) => return Ok(()),
                Err(error) if index_error_is_transient(&error) => {
                    tracing::warn!(%alias, error = %format!("{error:#}"), "recording a truncate mark failed; retrying");
                }
                Err(error) => return Err(error),
            }
            self.note_retry();
            backoff.wait().await;
        }
    }

    /// A table's copy is complete: every row of it, and every delete marked during it, came
    /// before this record in this partition and has been applied. In hard delete mode the
    /// partition's soft tombstones of the table are purged now; soft mode keeps them. The
    /// record's offset is committed only once this returned.
    async fn apply_copy_completed(
        &self,
        message: &OwnedMessage,
        table: &TableName,
    ) -> anyhow::Result<()> {
        let completed = match CopyCompleted::decode(message.payload()) {
            Ok(completed) => completed,
            Err(error) => {
                return self
                    .dead_letter(message, &format!("a malformed control record: {error}"))
                    .await;
            }
        };
        if completed.schema != table.schema || completed.table != table.table {
            let reason = format!(
                "a copy_completed record for {} on the topic of {}: records are routed by topic, never by payload",
                completed.qualified_table(),
                table.qualified()
            );
            return self.dead_letter(message, &reason).await;
        }
        if self.config.elasticsearch.delete_mode == DeleteMode::Soft {
            return Ok(());
        }
        let target = self
            .table_target(message.topic(), table, &completed.system_id)
            .await?;
        if completed.system_id != target.system_id {
            let reason = format!(
                "a copy_completed record from PostgreSQL system {}, but the index was built from system {}",
                completed.system_id, target.system_id
            );
            return self.dead_letter(message, &reason).await;
        }
        self.purge_copy_tombstones(&target.alias, message.partition())
            .await?;
        tracing::info!(
            table = %completed.qualified_table(),
            alias = %target.alias,
            partition = message.partition(),
            consistent_point = completed.consistent_point,
            "copy complete: purged the partition's soft tombstones"
        );
        Ok(())
    }

    /// Deletes the soft tombstones of `alias` that came through `partition`, retrying
    /// transient failures without end. Only tombstones: a row re-inserted since its delete is
    /// a live document and stays, and `conflicts=proceed` skips a document rewritten while the
    /// query runs. No version bound is needed: this partition's later events are not applied
    /// yet, so every soft tombstone it has written so far is one the copy no longer needs.
    async fn purge_copy_tombstones(&self, alias: &str, partition: i32) -> anyhow::Result<()> {
        let what = format!("purging the soft tombstones of partition {partition}");
        if let Some(deleted) = self
            .delete_by_query_until_done(alias, &purge_query(partition), &what)
            .await?
        {
            self.stats.deleted.fetch_add(deleted, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Deletes what `query` matches in `alias` (after a refresh, so that every earlier write is
    /// seen), retrying transient failures and partial failures without end. `None`: the index
    /// is missing, so nothing matched.
    async fn delete_by_query_until_done(
        &self,
        alias: &str,
        query: &Value,
        what: &str,
    ) -> anyhow::Result<Option<u64>> {
        let mut backoff = Backoff::new();
        loop {
            match self.try_delete_by_query(alias, query, what).await? {
                DeleteByQuery::Done { deleted } => return Ok(Some(deleted)),
                DeleteByQuery::IndexMissing => {
                    tracing::warn!(%alias, "{what}: the index is missing, nothing to delete");
                    return Ok(None);
                }
                DeleteByQuery::Retry(reason) => {
                    tracing::warn!(%alias, %reason, "{what} failed; retrying");
                }
            }
            self.note_retry();
            backoff.wait().await;
        }
    }

    async fn try_delete_by_query(
        &self,
        alias: &str,
        query: &Value,
        what: &str,
    ) -> anyhow::Result<DeleteByQuery> {
        // delete_by_query sees only refreshed documents: make every earlier write visible.
        if let Err(error) = index::refresh(&self.client, alias).await {
            return Ok(match error {
                index::IndexError::Refused { status: 404, .. } => DeleteByQuery::IndexMissing,
                error => {
                    let error = anyhow::Error::from(error);
                    if !index_error_is_transient(&error) {
                        return Err(error.context(format!("refreshing {alias} before {what}")));
                    }
                    DeleteByQuery::Retry(format!("{error:#}"))
                }
            });
        }
        let response = match self.delete_by_query(alias, query).await {
            Ok(response) => response,
            Err(error) => return Ok(DeleteByQuery::Retry(format!("transport: {error}"))),
        };
        let status = response.status_code().as_u16();
        if response.status_code().is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            let deleted = body.get("deleted").and_then(Value::as_u64).unwrap_or(0);
            // Items the server rejected (a full write queue, say) leave tombstones behind: go
            // again; what was deleted already no longer matches.
            if let Some(failures) = body
                .get("failures")
                .and_then(Value::as_array)
                .filter(|failures| !failures.is_empty())
            {
                self.stats.deleted.fetch_add(deleted, Ordering::Relaxed);
                return Ok(DeleteByQuery::Retry(format!(
                    "{} deletes failed, first: {}",
                    failures.len(),
                    failures[0]
                )));
            }
            return Ok(DeleteByQuery::Done { deleted });
        }
        let body = response.text().await.unwrap_or_default();
        if status == 404
            && index::answer_error_type(&body).as_deref() == Some("index_not_found_exception")
        {
            return Ok(DeleteByQuery::IndexMissing);
        }
        match index::answer_disposition(status, index::answer_error_type(&body).as_deref()) {
            Disposition::Retry => Ok(DeleteByQuery::Retry(format!("HTTP {status}: {body}"))),
            Disposition::Stop | Disposition::DeadLetter => {
                bail!("{what} in {alias}: delete_by_query answered {status}: {body}")
            }
        }
    }

    /// Fills `after` values that did not travel (unchanged TOAST) by the rule of
    /// `sink::toast`: from the row's own previous state in this batch, else from the stored
    /// document, else by re-reading the row from PostgreSQL. Never null, never a placeholder,
    /// never another row's value (design invariant 6).
    async fn fill_unchanged_toast(&self, pending: &mut [Pending<'_>]) -> anyhow::Result<()> {
        if pending.iter().all(|item| {
            item.target
                .shape
                .unfilled_columns(&item.envelope)
                .is_empty()
        }) {
            return Ok(());
        }
        let ids: Vec<Option<String>> = pending
            .iter()
            .map(|item| document_id(item.message.key().unwrap_or_default()).ok())
            .collect();
        let events: Vec<BatchEvent<'_>> = pending
            .iter()
            .zip(&ids)
            .map(|(item, id)| batch_event(item, id.as_deref()))
            .collect();
        let plans = toast::plan(&events);
        for position in 0..pending.len() {
            let missing: Vec<String> = pending[position]
                .target
                .shape
                .unfilled_columns(&pending[position].envelope)
                .into_iter()
                .map(str::to_owned)
                .collect();
            if missing.is_empty() {
                continue;
            }
            let (earlier, rest) = pending.split_at_mut(position);
            let item = &mut rest[0];
            let previous = match plans[position] {
                FillPlan::Batch(at) => earlier[at].envelope.after.as_ref(),
                FillPlan::Nothing | FillPlan::Reread => None,
            };
            if let (Some(row), Some(after)) = (previous, item.envelope.after.as_mut()) {
                toast::fill_from(after, &missing, row);
            }
            item.mark_filled();
            let still_missing: Vec<String> = item
                .target
                .shape
                .unfilled_columns(&item.envelope)
                .into_iter()
                .map(str::to_owned)
                .collect();
            if !still_missing.is_empty() {
                self.fill_by_rereading(item, &still_missing).await?;
            }
        }
        Ok(())
    }

    /// Fills `missing` by re-reading the row from the table its topic belongs to. PostgreSQL
    /// being unreachable is waited out; a row that is gone leaves the event unfilled (skipped:
    /// a later delete supersedes it); a dropped column is left out; a read that can never
    /// succeed dead-letters the event with the reason.
    async fn fill_by_rereading(
        &self,
        item: &mut Pending<'_>,
        missing: &[String],
    ) -> anyhow::Result<()> {
        let key = match parse_key(item.message.key().unwrap_or_default()) {
            Ok(key) => key,
            Err(error) => {
                item.fill_failure = Some(format!("cannot re-read unchanged TOAST values: {error}"));
                return Ok(());
            }
        };
        let table = &item.target.table;
        let mut backoff = Backoff::new();
        let read = loop {
            match self
                .rows
                .read_row(
                    RowAddress {
                        schema: &table.schema,
                        table: &table.table,
                    },
                    &key,
                    missing,
                    item.envelope.source.tx_id,
                )
                .await
            {
                Ok(read) => break read,
                Err(RowSourceError::Transient(reason)) => {
                    self.note_retry();
                    tracing::warn!(table = %table.qualified(), %reason, "cannot re-read unchanged TOAST values yet; retrying");
                    backoff.wait().await;
                }
                Err(RowSourceError::Permanent(reason)) => {
                    item.fill_failure =
                        Some(format!("cannot re-read unchanged TOAST values: {reason}"));
                    return Ok(());
                }
            }
        };
        ::metrics::counter!(metrics::SINK_TOAST_REREADS).increment(1);
        let RowRead::Found { values, dropped } = read else {
            return Ok(());
        };
        if let Some(after) = item.envelope.after.as_mut() {
            for (column, value) in values.iter() {
                after.insert(column.to_owned(), value.to_owned());
            }
        }
        if !dropped.is_empty() {
            tracing::warn!(table = %table.qualified(), columns = ?dropped, "unchanged TOAST columns no longer exist in the table; the document leaves them out");
            item.envelope
                .unchanged_toast_columns
                .retain(|column| !dropped.contains(column));
        }
        item.mark_filled();
        Ok(())
    }
}

/// What the TOAST fill rule needs to know of one pending event.
fn batch_event<'a>(item: &'a Pending<'_>, id: Option<&'a str>) -> BatchEvent<'a> {
    let needs_fill = !item
        .target
        .shape
        .unfilled_columns(&item.envelope)
        .is_empty();
    let kind = match item.envelope.op {
        EnvelopeOp::Delete | EnvelopeOp::Truncate => EventKind::Delete,
        EnvelopeOp::Read => EventKind::SnapshotRow,
        EnvelopeOp::Create if needs_fill => EventKind::KeyChange,
        EnvelopeOp::Create | EnvelopeOp::Update => EventKind::Streamed,
    };
    BatchEvent {
        document: id.map(|id| (item.target.alias.as_str(), id)),
        version: item.envelope.source.commit_lsn,
        kind,
        needs_fill,
    }
}

/// One event of a partition on its way to a bulk action.
struct Pending<'a> {
    message: &'a OwnedMessage,
    envelope: Envelope,
    target: Arc<TableTarget>,
    /// Why its unchanged TOAST values can never be filled: it is dead-lettered with this.
    fill_failure: Option<String>,
}

impl Pending<'_> {
    /// Columns that have a value in `after` now no longer lack one.
    fn mark_filled(&mut self) {
        let after = self.envelope.after.as_ref();
        self.envelope
            .unchanged_toast_columns
            .retain(|column| after.is_none_or(|after| after.get(column).is_none()));
    }
}

/// Whether a record is a change event or a control record (by its `walsync.control` header).
fn record_kind(message: &OwnedMessage) -> RecordKind {
    let header = message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|header| header.key == CONTROL_HEADER)
            .map(|header| header.value.unwrap_or_default())
    });
    RecordKind::from_control_header(header)
}

/// How one `delete_by_query` attempt (a truncate, a purge of soft tombstones) went.
enum DeleteByQuery {
    Done { deleted: u64 },
    IndexMissing,
    Retry(String),
}

/// What a delete event becomes in the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeleteAction {
    /// Delete the document (its version is remembered for `index.gc_deletes`).
    Hard,
    /// Index a metadata-only document marked deleted, at the delete's version.
    SoftTombstone,
}

/// Soft mode keeps every delete as a soft tombstone; hard mode too while the table is being
/// copied (the event carries `source.soft_delete`), until the copy's control record purges it.
fn delete_action(mode: DeleteMode, during_copy: bool) -> DeleteAction {
    match (mode, during_copy) {
        (DeleteMode::Soft, _) | (DeleteMode::Hard, true) => DeleteAction::SoftTombstone,
        (DeleteMode::Hard, false) => DeleteAction::Hard,
    }
}

/// The soft tombstones that came through `partition`.
fn purge_query(partition: i32) -> Value {
    serde_json::json!({"query": {"bool": {"filter": [
        {"term": {DELETED_PATH: true}},
        {"term": {PARTITION_PATH: partition}}
    ]}}})
}

/// The share of version conflicts per minute-long window.
#[derive(Debug)]
struct ConflictRate {
    window_start: Instant,
    stale: u64,
    writes: u64,
}

impl ConflictRate {
    /// Below this many writes a window says nothing.
    const MIN_WRITES: u64 = 1_000;
    const WARN_SHARE: f64 = 0.5;
    const WINDOW: Duration = Duration::from_secs(60);

    fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            stale: 0,
            writes: 0,
        }
    }

    /// Adds a bulk's outcome; at the end of a window returns its share of conflicts when that
    /// is alarming.
    fn record(&mut self, stale: u64, writes: u64, now: Instant) -> Option<f64> {
        self.stale += stale;
        self.writes += writes;
        if now.duration_since(self.window_start) < Self::WINDOW {
            return None;
        }
        let (stale, writes) = (self.stale, self.writes);
        *self = Self::new(now);
        let share = stale as f64 / writes.max(1) as f64;
        (writes >= Self::MIN_WRITES && share > Self::WARN_SHARE).then_some(share)
    }
}

/// Exponential backoff with jitter, capped at 30 s.
/// The mappings of the indices behind `alias`, keyed by index name.
async fn read_mapping(client: &Elasticsearch, alias: &str) -> anyhow::Result<Value> {
    let response = client
        .send(
            Method::Get,
            &format!("/{alias}/_mapping"),
            HeaderMap::new(),
            Option::<&()>::None,
            Option::<&[u8]>::None,
            Some(Duration::from_secs(30)),
        )
        .await
        .map_err(|source| index::transport_error("read the mapping of", alias, source))?;
    // An error answer is JSON too: never read it as a mapping without a truncate mark.
    if !response.status_code().is_success() {
        return Err(index::refused(response, "read the mapping of", alias)
            .await
            .into());
    }
    response
        .json()
        .await
        .map_err(|source| index::transport_error("read the mapping of", alias, source).into())
}

/// Whether a failure to check or create an index, or another request to the search server, may
/// pass by itself: the search side's one rule ([`IndexError::disposition`]).
fn index_error_is_transient(error: &anyhow::Error) -> bool {
    error
        .downcast_ref::<index::IndexError>()
        .is_some_and(search_error_is_transient)
}

fn search_error_is_transient(error: &index::IndexError) -> bool {
    error.disposition() == Disposition::Retry
}

/// Where a truncate happened: events before it (by commit LSN, then by their own LSN within
/// the truncating transaction) were truncated away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct TruncateMark {
    commit_lsn: u64,
    lsn: u64,
}

impl TruncateMark {
    /// The position of an event, comparable with a mark.
    fn of(envelope: &Envelope) -> Self {
        Self {
            commit_lsn: envelope.source.commit_lsn,
            lsn: envelope.source.lsn,
        }
    }

    fn from_meta(walsync: &Value) -> Self {
        Self {
            commit_lsn: walsync
                .get("truncated_before")
                .and_then(Value::as_u64)
                .unwrap_or(0),
            lsn: walsync
                .get("truncated_before_lsn")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }
    }
}

/// The truncate mark recorded in the index's `_meta` (none: the start of history).
async fn read_truncate_mark(client: &Elasticsearch, alias: &str) -> anyhow::Result<TruncateMark> {
    let mapping = read_mapping(client, alias).await?;
    Ok(mapping
        .as_object()
        .into_iter()
        .flat_map(|indices| indices.values())
        .filter_map(|index| index.pointer("/mappings/_meta/walsync"))
        .map(TruncateMark::from_meta)
        .max()
        .unwrap_or_default())
}

/// Records the truncate mark in the index's `_meta`, keeping everything else there.
async fn write_truncate_mark(
    client: &Elasticsearch,
    alias: &str,
    mark: TruncateMark,
) -> anyhow::Result<()> {
    let mapping = read_mapping(client, alias).await?;
    let mut meta = mapping
        .as_object()
        .and_then(|indices| indices.values().next())
        .and_then(|index| index.pointer("/mappings/_meta"))
        .cloned()
        .unwrap_or_else(|| serde_json::json!({}));
    if let Some(walsync) = meta.get_mut("walsync").and_then(Value::as_object_mut) {
        let newest = TruncateMark::from_meta(&Value::Object(walsync.clone())).max(mark);
        walsync.insert("truncated_before".into(), Value::from(newest.commit_lsn));
        walsync.insert("truncated_before_lsn".into(), Value::from(newest.lsn));
    }
    let body = serde_json::json!({"_meta": meta}).to_string();
    let response = client
        .send(
            Method::Put,
            &format!("/{alias}/_mapping"),
            HeaderMap::new(),
            Option::<&()>::None,
            Some(body),
            Some(Duration::from_secs(30)),
        )
        .await
        .map_err(|source| index::transport_error("record the truncate mark on", alias, source))?;
    if !response.status_code().is_success() {
        return Err(
            index::refused(response, "record the truncate mark on", alias)
                .await
                .into(),
        );
    }
    Ok(())
}

/// A partition's finished bulk: the partition, and its next offset (`None` for an empty batch).
type Applied = (PartitionKey, anyhow::Result<Option<i64>>);

/// Sleeps until `deadline`; forever without one (the branch is disabled then anyway).
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| now.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_mostly_of_conflicts_warns_once_it_ends() {
        let start = Instant::now();
        let mut rate = ConflictRate::new(start);
        assert_eq!(
            rate.record(900, 1_000, start),
            None,
            "the window is not over"
        );
        let share = rate.record(0, 0, start + Duration::from_secs(61));
        assert_eq!(share, Some(0.9));
        assert_eq!(
            rate.record(0, 0, start + Duration::from_secs(122)),
            None,
            "a new window"
        );
    }

    #[test]
    fn few_writes_or_few_conflicts_do_not_warn() {
        let start = Instant::now();
        let mut rate = ConflictRate::new(start);
        rate.record(90, 100, start);
        assert_eq!(
            rate.record(0, 0, start + Duration::from_secs(61)),
            None,
            "too few writes"
        );
        rate.record(100, 5_000, start + Duration::from_secs(62));
        assert_eq!(
            rate.record(0, 0, start + Duration::from_secs(123)),
            None,
            "2% conflicts"
        );
    }

    #[test]
    fn deletes_during_a_copy_become_soft_tombstones_even_in_hard_mode() {
        assert_eq!(delete_action(DeleteMode::Hard, false), DeleteAction::Hard);
        assert_eq!(
            delete_action(DeleteMode::Hard, true),
            DeleteAction::SoftTombstone
        );
        assert_eq!(
            delete_action(DeleteMode::Soft, false),
            DeleteAction::SoftTombstone
        );
        assert_eq!(
            delete_action(DeleteMode::Soft, true),
            DeleteAction::SoftTombstone
        );
    }

    #[test]
    fn the_purge_takes_only_one_partitions_soft_tombstones() {
        assert_eq!(
            purge_query(2),
            serde_json::json!({"query": {"bool": {"filter": [
                {"term": {"walsync.deleted": true}},
                {"term": {"walsync.partition": 2}}
            ]}}})
        );
    }
}
