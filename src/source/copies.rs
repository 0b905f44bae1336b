//! The tables whose copy (initial snapshot, later backfill) is in progress, shared by the copy
//! workers and the stream reader (design invariant 5).
//!
//! While a table is being copied, a snapshot row read at `cp − 1` can reach the index long
//! after a streamed delete of that row (commit ≥ `cp`) was applied. A hard delete's version is
//! remembered only for `index.gc_deletes`, so the late row would come back for good. Deletes of
//! such a table are therefore marked (`source.soft_delete: true`) and the sink keeps them as
//! versioned soft tombstones; once the copy has had every row acknowledged, a `copy_completed`
//! control record goes to every partition of the table's topic and the sink purges that
//! partition's soft tombstones when it reaches it.
//!
//! The two hooks and when to call them:
//! - [`CopiesInProgress::copy_started`] for every table of a copy **before the copy's snapshot
//!   is exported** (before its slot is created): every delete that commits at or after `cp` is
//!   then read by the stream after the table is registered, whatever the order in which the
//!   copy gets to the table's rows.
//! - [`CopiesInProgress::copy_completed`] after Kafka acknowledged every row of that table's
//!   copy, and before the copy is recorded as done (a crash in between copies the table again
//!   and sends the record again).
//!
//! Copies of one table may overlap (a backfill during the initial snapshot): the table stays
//! registered until the last one completes, and only that one sends the control records — a
//! purge while another copy of the table still runs would drop tombstones it needs.
//!
//! Ordering: the reader holds [`DeleteGate`] (a shared lock) from the moment it decides whether
//! to mark a delete until the delete is handed to the producer; `copy_completed` takes the lock
//! exclusively to unregister the table, then sends the control records. So every marked delete
//! is queued before the control records (and is purged by them), and every unmarked delete is
//! queued after the copy's rows were acknowledged (the sink applies it after them).
//!
//! Copies in other processes (`walsync backfill`) register through
//! `crate::postgres::copy_registry`; [`RegistryFollower`] calls the same two hooks for them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{RwLock, RwLockReadGuard};

use crate::kafka::control::CopyCompleted;
use crate::kafka::frontier::TxAcks;
use crate::kafka::producer::EventProducer;
use crate::lsn::Lsn;
use crate::postgres::catalog::Catalog;
use crate::postgres::copy_registry::{self, Registration, RegistrationState};

/// How often the source looks for copies other processes registered (a backfill waits this
/// long at most, twice).
const REGISTRY_POLL: Duration = Duration::from_millis(250);

/// How often reading a topic's partitions from Kafka's metadata is tried before the copy fails.
const METADATA_ATTEMPTS: u32 = 10;

/// Tables (`schema.table`) with a copy in progress, and how many copies of each.
pub struct CopiesInProgress {
    tables: RwLock<HashMap<String, usize>>,
    producer: Arc<EventProducer>,
    system_id: String,
}

/// Held by the stream reader while it writes and hands over one delete.
pub struct DeleteGate<'a> {
    tables: RwLockReadGuard<'a, HashMap<String, usize>>,
}

impl DeleteGate<'_> {
    /// Whether deletes of `schema.table` must be marked for a soft tombstone.
    pub fn is_copying(&self, qualified_table: &str) -> bool {
        self.tables.contains_key(qualified_table)
    }
}

impl CopiesInProgress {
    pub fn new(producer: Arc<EventProducer>, system_id: String) -> Self {
        Self {
            tables: RwLock::new(HashMap::new()),
            producer,
            system_id,
        }
    }

    /// Registers a copy of `qualified_table` (`schema.table`). Call it before the copy's
    /// snapshot is exported (see the module documentation).
    pub async fn copy_started(&self, qualified_table: &str) {
        *self
            .tables
            .write()
            .await
            .entry(qualified_table.to_owned())
            .or_default() += 1;
    }

    /// The gate the reader holds while it marks and sends a delete.
    pub async fn delete_gate(&self) -> DeleteGate<'_> {
        DeleteGate {
            tables: self.tables.read().await,
        }
    }

    /// Whether a copy of `qualified_table` is in progress (for logs and tests).
    pub async fn is_copying(&self, qualified_table: &str) -> bool {
        self.delete_gate().await.is_copying(qualified_table)
    }

    /// Ends one copy of `schema.table`, read under `consistent_point`, whose rows Kafka has all
    /// acknowledged. When it was the table's last copy in progress, writes a `copy_completed`
    /// control record to every partition of `topic` and waits until Kafka acknowledged them.
    pub async fn copy_completed(
        &self,
        schema: &str,
        table: &str,
        topic: Arc<str>,
        consistent_point: Lsn,
    ) -> anyhow::Result<()> {
        let qualified = format!("{schema}.{table}");
        {
            let mut tables = self.tables.write().await;
            match tables.get_mut(&qualified) {
                Some(copies) if *copies > 1 => {
                    *copies -= 1;
                    tracing::info!(table = %qualified, "copy complete; another copy of the table is still running");
                    return Ok(());
                }
                Some(_) => {
                    tables.remove(&qualified);
                }
                None => {
                    tracing::warn!(table = %qualified, "a copy completed that was never registered; sending its control records anyway");
                }
            }
        }
        let partitions = self.partition_count(&topic).await?;
        let acks = Arc::new(TxAcks::default());
        let now = now_millis();
        for partition in 0..partitions {
            let completed = CopyCompleted::new(
                schema,
                table,
                consistent_point.as_u64(),
                partition,
                &self.system_id,
                now,
            );
            self.producer
                .send_control(&completed.record(Arc::clone(&topic)), &acks)
                .await?;
        }
        while !acks.is_done() {
            if acks.has_failed() {
                anyhow::bail!(
                    "Kafka refused a copy_completed control record for {qualified}: {}",
                    self.producer.refused().unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(table = %qualified, %consistent_point, partitions, "copy complete; control records written");
        Ok(())
    }

    /// The partitions of `topic`, retrying a few times: the metadata request can time out while
    /// a broker is away.
    async fn partition_count(&self, topic: &Arc<str>) -> anyhow::Result<i32> {
        let mut delay = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let producer = Arc::clone(&self.producer);
            let name = Arc::clone(topic);
            let result = tokio::task::spawn_blocking(move || producer.partition_count(&name))
                .await
                .context("the metadata task failed")?;
            match result {
                Ok(count) => return Ok(count),
                Err(error) if attempt < METADATA_ATTEMPTS => {
                    tracing::warn!(%error, %topic, attempt, "cannot read the topic's partitions yet; retrying");
                }
                Err(error) => return Err(error.into()),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(10));
            attempt += 1;
        }
    }
}

/// The source's side of `crate::postgres::copy_registry`: registers the tables that other
/// processes copy, and completes their copies (or the copies of processes that died).
pub struct RegistryFollower {
    catalog: Catalog,
    slot: String,
    copies: Arc<CopiesInProgress>,
    /// Registrations this process counted in `copies`.
    counted: HashSet<i32>,
}

impl RegistryFollower {
    pub fn new(catalog: Catalog, slot: String, copies: Arc<CopiesInProgress>) -> Self {
        Self {
            catalog,
            slot,
            copies,
            counted: HashSet::new(),
        }
    }

    /// One pass over the slot's registrations. The source runs one before it streams, so that
    /// after a restart the copies still running are registered before any delete is read.
    pub async fn sync(&mut self) -> anyhow::Result<()> {
        let registrations = copy_registry::registrations(self.catalog.client(), &self.slot).await?;
        for registration in registrations {
            self.follow(&registration).await?;
        }
        Ok(())
    }

    /// Follows the registry until reading it fails.
    pub async fn run(mut self) -> anyhow::Result<()> {
        loop {
            tokio::time::sleep(REGISTRY_POLL).await;
            self.sync().await?;
        }
    }

    async fn follow(&mut self, registration: &Registration) -> anyhow::Result<()> {
        let id = registration.id;
        let table = registration.qualified_name();
        match registration.state {
            RegistrationState::Requested => {
                if self.remove_if_abandoned(id).await? {
                    return Ok(());
                }
                self.count(registration).await;
                copy_registry::set_state(self.catalog.client(), id, RegistrationState::Registered)
                    .await?;
                tracing::info!(%table, registration = id, "a backfill registered: deletes of the table become soft tombstones until it completes");
            }
            RegistrationState::Registered => {
                self.count(registration).await;
                if self.owner_is_gone(id).await? {
                    tracing::warn!(%table, registration = id, "a backfill stopped before it had copied every row; completing its registration (run it again to finish the copy)");
                    self.complete(registration).await?;
                    copy_registry::remove(self.catalog.client(), id).await?;
                }
            }
            RegistrationState::Copied => {
                self.count(registration).await;
                self.complete(registration).await?;
                if !self.remove_if_abandoned(id).await? {
                    copy_registry::set_state(
                        self.catalog.client(),
                        id,
                        RegistrationState::Completed,
                    )
                    .await?;
                }
            }
            RegistrationState::Completed => {
                self.remove_if_abandoned(id).await?;
            }
        }
        Ok(())
    }

    async fn owner_is_gone(&self, id: i32) -> anyhow::Result<bool> {
        Ok(copy_registry::owner_is_gone(self.catalog.client(), id).await?)
    }

    /// Removes the registration if its backfill's session is gone; whether it did.
    async fn remove_if_abandoned(&self, id: i32) -> anyhow::Result<bool> {
        let gone = self.owner_is_gone(id).await?;
        if gone {
            copy_registry::remove(self.catalog.client(), id).await?;
        }
        Ok(gone)
    }

    /// Registers the copy in `copies`, once per registration.
    async fn count(&mut self, registration: &Registration) {
        if self.counted.insert(registration.id) {
            self.copies
                .copy_started(&registration.qualified_name())
                .await;
        }
    }

    async fn complete(&mut self, registration: &Registration) -> anyhow::Result<()> {
        self.counted.remove(&registration.id);
        self.copies
            .copy_completed(
                &registration.schema,
                &registration.table,
                Arc::from(registration.topic.as_str()),
                registration.consistent_point.unwrap_or(Lsn::ZERO),
            )
            .await
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KafkaConfig;

    fn copies() -> CopiesInProgress {
        // librdkafka connects lazily: nothing here reaches a broker.
        let producer = EventProducer::new(&KafkaConfig::default()).expect("a producer");
        CopiesInProgress::new(Arc::new(producer), "73".into())
    }

    #[tokio::test]
    async fn a_table_is_copying_from_its_registration_until_its_last_copy_completes() {
        let copies = copies();
        assert!(!copies.is_copying("public.items").await);
        copies.copy_started("public.items").await;
        copies.copy_started("public.items").await;
        assert!(copies.delete_gate().await.is_copying("public.items"));
        assert!(!copies.delete_gate().await.is_copying("public.other"));
        // The first of two overlapping copies completes: no control record yet (none could be
        // sent here), and deletes are still marked.
        copies
            .copy_completed("public", "items", "t".into(), Lsn(0x5000))
            .await
            .expect("an overlapping copy completes without Kafka");
        assert!(copies.is_copying("public.items").await);
    }
}
