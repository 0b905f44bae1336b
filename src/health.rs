//! The health state readiness is decided from: one process-wide [`Health`] of atomics, so the
//! hot paths of the source (stream open, deliveries) and the sink (search server answers) update
//! it without locks or allocation. It sits on the ground floor, below every side, so that the
//! sides write into it without importing the operational shell, which serves it
//! (`shell::health`: `/healthz`, `/readyz`, probes).
//!
//! Readiness: the source is ready when its replication stream is open, Kafka answered within
//! [`KAFKA_SILENCE`], and no event has waited for Kafka's acknowledgement longer than
//! [`DELIVERY_STALL`] without any acknowledgement arriving; the sink when Kafka and the search
//! server answered recently ([`SEARCH_SILENCE`]); `walsync run` when both are.

use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Kafka must have answered (a probe or a delivery) within this long.
pub const KAFKA_SILENCE: Duration = Duration::from_secs(10);
/// Events may wait this long for an acknowledgement while none arrives at all.
pub const DELIVERY_STALL: Duration = Duration::from_secs(10);
/// The search server must have answered (a ping or a bulk request) within this long.
pub const SEARCH_SILENCE: Duration = Duration::from_secs(15);

/// Milliseconds since the process started (never 0, which means "never").
pub(crate) fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The process-wide health state.
pub static HEALTH: Health = Health::new();

/// What readiness is decided from. Times are [`now_ms`] values, 0 for never.
pub struct Health {
    stream_open: AtomicBool,
    /// Events handed to the producer and not acknowledged (or refused) yet.
    pub(crate) outstanding: AtomicI64,
    /// The last acknowledgement, or when the first of the outstanding events was sent.
    delivery_progress: AtomicU64,
    kafka_answered: AtomicU64,
    search_answered: AtomicU64,
    /// The sink's partitions, for the lag probe.
    pub(crate) assignment: Mutex<Vec<(String, i32)>>,
}

impl Health {
    const fn new() -> Self {
        Self {
            stream_open: AtomicBool::new(false),
            outstanding: AtomicI64::new(0),
            delivery_progress: AtomicU64::new(0),
            kafka_answered: AtomicU64::new(0),
            search_answered: AtomicU64::new(0),
            assignment: Mutex::new(Vec::new()),
        }
    }

    /// The replication stream opened; closed again when the returned guard drops.
    pub fn stream_opened(&'static self) -> StreamOpen {
        self.stream_open.store(true, Ordering::Release);
        StreamOpen(self)
    }

    /// One event handed to the producer.
    pub fn delivery_sent(&self) {
        if self.outstanding.fetch_add(1, Ordering::AcqRel) == 0 {
            self.delivery_progress.store(now_ms(), Ordering::Release);
        }
    }

    /// One event acknowledged or refused by Kafka (Kafka answered either way).
    pub fn delivery_done(&self) {
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        let now = now_ms();
        self.delivery_progress.store(now, Ordering::Release);
        self.kafka_answered.store(now, Ordering::Release);
    }

    pub fn kafka_answered(&self) {
        self.kafka_answered.store(now_ms(), Ordering::Release);
    }

    pub fn search_answered(&self) {
        self.search_answered.store(now_ms(), Ordering::Release);
    }

    /// A copy of the state now.
    pub fn state(&self) -> State {
        State {
            now: now_ms(),
            stream_open: self.stream_open.load(Ordering::Acquire),
            outstanding: self.outstanding.load(Ordering::Acquire),
            delivery_progress: self.delivery_progress.load(Ordering::Acquire),
            kafka_answered: self.kafka_answered.load(Ordering::Acquire),
            search_answered: self.search_answered.load(Ordering::Acquire),
        }
    }
}

/// Marks the replication stream closed when dropped.
pub struct StreamOpen(&'static Health);

impl Drop for StreamOpen {
    fn drop(&mut self) {
        self.0.stream_open.store(false, Ordering::Release);
    }
}

/// Which parts this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub source: bool,
    pub sink: bool,
}

impl Roles {
    pub const SOURCE: Roles = Roles {
        source: true,
        sink: false,
    };
    pub const SINK: Roles = Roles {
        source: false,
        sink: true,
    };
    pub const BOTH: Roles = Roles {
        source: true,
        sink: true,
    };
}

/// A copy of the health state at one moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct State {
    pub now: u64,
    pub stream_open: bool,
    pub outstanding: i64,
    pub delivery_progress: u64,
    pub kafka_answered: u64,
    pub search_answered: u64,
}

impl State {
    /// Seconds since `at`, or `None` when it never happened.
    fn silent_for(&self, at: u64) -> Option<Duration> {
        (at != 0).then(|| Duration::from_millis(self.now.saturating_sub(at)))
    }

    /// Why the process is not ready; empty when it is.
    pub fn unready_reasons(&self, roles: Roles) -> Vec<String> {
        let mut reasons = Vec::new();
        match self.silent_for(self.kafka_answered) {
            None => reasons.push("kafka: not answered yet".to_owned()),
            Some(silence) if silence > KAFKA_SILENCE => {
                reasons.push(format!("kafka: no answer for {} s", silence.as_secs()))
            }
            Some(_) => {}
        }
        if roles.source {
            if !self.stream_open {
                reasons.push("source: the replication stream is not open".to_owned());
            }
            if self.outstanding > 0
                && let Some(stall) = self.silent_for(self.delivery_progress)
                && stall > DELIVERY_STALL
            {
                reasons.push(format!(
                    "source: {} events wait for Kafka's acknowledgement, none acknowledged for {} s",
                    self.outstanding,
                    stall.as_secs()
                ));
            }
        }
        if roles.sink {
            match self.silent_for(self.search_answered) {
                None => reasons.push("sink: the search server has not answered yet".to_owned()),
                Some(silence) if silence > SEARCH_SILENCE => reasons.push(format!(
                    "sink: no answer from the search server for {} s",
                    silence.as_secs()
                )),
                Some(_) => {}
            }
        }
        reasons
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy(now: u64) -> State {
        State {
            now,
            stream_open: true,
            outstanding: 0,
            delivery_progress: now - 1_000,
            kafka_answered: now - 1_000,
            search_answered: now - 1_000,
        }
    }

    #[test]
    fn fresh_answers_and_an_open_stream_are_ready() {
        assert!(healthy(100_000).unready_reasons(Roles::BOTH).is_empty());
    }

    #[test]
    fn a_silent_kafka_makes_every_role_unready() {
        let mut state = healthy(100_000);
        state.kafka_answered = 100_000 - 11_000;
        for roles in [Roles::SOURCE, Roles::SINK, Roles::BOTH] {
            let reasons = state.unready_reasons(roles);
            assert_eq!(reasons, ["kafka: no answer for 11 s"], "{roles:?}");
        }
    }

    #[test]
    fn deliveries_stalled_with_events_outstanding_make_the_source_unready() {
        let mut state = healthy(100_000);
        state.outstanding = 42;
        state.delivery_progress = 100_000 - 12_000;
        let reasons = state.unready_reasons(Roles::SOURCE);
        assert_eq!(reasons.len(), 1);
        assert!(reasons[0].contains("42 events"), "{reasons:?}");
        assert!(
            state.unready_reasons(Roles::SINK).is_empty(),
            "the sink does not produce"
        );
        state.outstanding = 0;
        assert!(
            state.unready_reasons(Roles::SOURCE).is_empty(),
            "nothing outstanding: nothing stalled"
        );
    }

    #[test]
    fn a_closed_stream_or_a_silent_search_server_names_its_part() {
        let mut state = healthy(100_000);
        state.stream_open = false;
        state.search_answered = 0;
        assert_eq!(
            state.unready_reasons(Roles::SOURCE),
            ["source: the replication stream is not open"]
        );
        assert_eq!(
            state.unready_reasons(Roles::SINK),
            ["sink: the search server has not answered yet"]
        );
        assert_eq!(state.unready_reasons(Roles::BOTH).len(), 2);
    }
}
