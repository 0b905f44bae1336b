//! Health: the `/metrics`, `/healthz` and `/readyz` endpoints, the state readiness is decided
//! from, and the probes that keep that state fresh.
//!
//! - `/healthz`: 200 while the process serves HTTP at all (liveness).
//! - `/readyz`: 200 when every part this process runs is connected and making progress, else
//!   503 with the reasons as plain text. The source is ready when its replication stream is
//!   open, Kafka answered within [`KAFKA_SILENCE`], and no event has waited for Kafka's
//!   acknowledgement longer than [`DELIVERY_STALL`] without any acknowledgement arriving. The
//!   sink is ready when Kafka and the search server answered recently. `walsync run` is ready
//!   when both are.
//! - `/metrics`: the Prometheus text format (`shell::metrics`).
//!
//! The state is one process-wide [`Health`] of atomics, so the hot paths update it without
//! locks or allocation, and the source and sink need no handle passed to them. An idle source
//! sends nothing to Kafka, so a paused broker would go unnoticed by the delivery check alone:
//! a probe thread asks Kafka for metadata every [`PROBE_INTERVAL`] (a hung broker times out),
//! and a task pings the search server. The same thread computes the sink's consumer lag.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::net::TcpListener;

use crate::kafka::producer::client_config;
use crate::kafka::topics;
use crate::shell::config::Config;
use crate::shell::metrics;
use crate::sink::apply::Sink;

/// Kafka must have answered (a probe or a delivery) within this long.
pub const KAFKA_SILENCE: Duration = Duration::from_secs(10);
/// Events may wait this long for an acknowledgement while none arrives at all.
pub const DELIVERY_STALL: Duration = Duration::from_secs(10);
/// The search server must have answered (a ping or a bulk request) within this long.
pub const SEARCH_SILENCE: Duration = Duration::from_secs(15);
/// How often Kafka and the search server are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the sink's consumer lag is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(10);

/// Milliseconds since the process started (never 0, which means "never").
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// The process-wide health state.
pub static HEALTH: Health = Health::new();

/// What readiness is decided from. Times are [`now_ms`] values, 0 for never.
pub struct Health {
    stream_open: AtomicBool,
    /// Events handed to the producer and not acknowledged (or refused) yet.
    outstanding: AtomicI64,
    /// The last acknowledgement, or when the first of the outstanding events was sent.
    delivery_progress: AtomicU64,
    kafka_answered: AtomicU64,
    search_answered: AtomicU64,
    /// The sink's partitions, for the lag probe.
    assignment: Mutex<Vec<(String, i32)>>,
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

    fn state(&self) -> State {
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
struct State {
    now: u64,
    stream_open: bool,
    outstanding: i64,
    delivery_progress: u64,
    kafka_answered: u64,
    search_answered: u64,
}

impl State {
    /// Seconds since `at`, or `None` when it never happened.
    fn silent_for(&self, at: u64) -> Option<Duration> {
        (at != 0).then(|| Duration::from_millis(self.now.saturating_sub(at)))
    }

    /// Why the process is not ready; empty when it is.
    fn unready_reasons(&self, roles: Roles) -> Vec<String> {
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

/// The endpoints and probes of one process; everything stops when it is dropped.
pub struct Observability {
    pub address: std::net::SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    probe_stop: Arc<AtomicBool>,
}

impl Drop for Observability {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.probe_stop.store(true, Ordering::Release);
    }
}

/// Whether `metrics.listen` turns the endpoints off.
pub fn is_disabled(listen: &str) -> bool {
    let listen = listen.trim();
    listen.is_empty() || listen.eq_ignore_ascii_case("off")
}

/// Installs the metrics recorder, binds `metrics.listen` and starts the probes for `roles`.
/// `None` when `metrics.listen` is "" or "off". Call it before building the source or the
/// sink: metric handles registered before the recorder exists count nothing.
pub async fn start(config: &Config, roles: Roles) -> anyhow::Result<Option<Observability>> {
    let listen = config.metrics.listen.trim();
    if is_disabled(listen) {
        tracing::info!("metrics.listen is off: no /metrics, /healthz or /readyz");
        return Ok(None);
    }
    let handle = metrics::install()?;
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen on metrics.listen = {listen:?} for /metrics, /healthz and /readyz: \
             use a free host:port (e.g. 127.0.0.1:9898), or \"off\""
        )
    })?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    let probe_stop = Arc::new(AtomicBool::new(false));
    let mut tasks = vec![
        tokio::spawn(serve(listener, handle.clone(), roles)),
        tokio::spawn(metrics::run_upkeep(handle)),
    ];
    if roles.sink {
        ::metrics::gauge!(metrics::SINK_BREAKER_OPEN).set(0.0);
        tasks.push(tokio::spawn(ping_search(config.clone())));
    }
    start_kafka_probe(config, roles, Arc::clone(&probe_stop))?;
    Ok(Some(Observability {
        address,
        tasks,
        probe_stop,
    }))
}

async fn serve(listener: TcpListener, handle: PrometheusHandle, roles: Roles) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "cannot accept a connection on metrics.listen");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let response = respond(request.uri().path(), &handle, roles);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, "metrics connection ended with an error");
            }
        });
    }
}

fn respond(path: &str, handle: &PrometheusHandle, roles: Roles) -> Response<Full<Bytes>> {
    let reasons = HEALTH.state().unready_reasons(roles);
    match path {
        "/metrics" => {
            ::metrics::gauge!(metrics::READY).set(if reasons.is_empty() { 1.0 } else { 0.0 });
            ::metrics::gauge!(metrics::SOURCE_KAFKA_OUTSTANDING)
                .set(HEALTH.outstanding.load(Ordering::Acquire).max(0) as f64);
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                handle.render(),
            )
        }
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if reasons.is_empty() => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("not ready: {}\n", reasons.join("; ")),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Pings the search server every [`PROBE_INTERVAL`].
async fn ping_search(config: Config) {
    let client = match crate::sink::index::build_client(&config.elasticsearch) {
        Ok(client) => client,
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), "cannot build the search client for readiness pings");
            return;
        }
    };
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ping = client.ping().request_timeout(PROBE_TIMEOUT).send();
        match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
            Ok(Ok(response)) if response.status_code().is_success() => HEALTH.search_answered(),
            Ok(Ok(response)) => {
                tracing::debug!(status = %response.status_code(), "search server ping refused")
            }
            Ok(Err(error)) => tracing::debug!(%error, "search server ping failed"),
            Err(_) => tracing::debug!("search server ping timed out"),
        }
    }
}

/// Starts the thread that asks Kafka for metadata every [`PROBE_INTERVAL`] (the client is
/// blocking, so it gets a thread of its own) and, for a sink, measures the consumer lag.
fn start_kafka_probe(config: &Config, roles: Roles, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let mut client = client_config(&config.kafka)?;
    // Only to read the sink group's committed offsets: this client never joins the group.
    client.set("group.id", &config.sink.group_id);
    let consumer: BaseConsumer = client
        .create()
        .context("cannot create the Kafka client for readiness probes")?;
    let topic = topics::dead_letter_topic(&config.kafka.topic_prefix);
    std::thread::Builder::new()
        .name("walsync-kafka-probe".into())
        .spawn(move || {
            let mut last_lag = Instant::now() - LAG_INTERVAL;
            let mut reported: Vec<(String, i32)> = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                // Any answer will do: a topic that does not exist yet is answered too (and not
                // created: consumers do not auto-create).
                match consumer.fetch_metadata(Some(&topic), PROBE_TIMEOUT) {
                    Ok(_) => {
                        HEALTH.kafka_answered();
                        if roles.sink && last_lag.elapsed() >= LAG_INTERVAL {
                            last_lag = Instant::now();
                            reported = report_consumer_lag(&consumer, reported);
                        }
                    }
                    Err(error) => tracing::debug!(%error, "Kafka probe failed"),
                }
                std::thread::sleep(PROBE_INTERVAL.saturating_sub(started.elapsed()));
            }
        })
        .context("cannot start the Kafka probe thread")?;
    Ok(())
}

/// Sets the lag gauge of every partition the sink holds (and 0 for those it no longer holds).
/// Returns the partitions reported.
fn report_consumer_lag(consumer: &BaseConsumer, before: Vec<(String, i32)>) -> Vec<(String, i32)> {
    let assignment = HEALTH
        .assignment
        .lock()
        .map(|assignment| assignment.clone())
        .unwrap_or_default();
    for gone in before.iter().filter(|p| !assignment.contains(p)) {
        ::metrics::gauge!(metrics::SINK_CONSUMER_LAG, "topic" => gone.0.clone(), "partition" => gone.1.to_string()).set(0.0);
    }
    if assignment.is_empty() {
        return assignment;
    }
    let mut partitions = TopicPartitionList::new();
    for (topic, partition) in &assignment {
        partitions.add_partition(topic, *partition);
    }
    let committed = match consumer.committed_offsets(partitions, PROBE_TIMEOUT) {
        Ok(committed) => committed,
        Err(error) => {
            tracing::debug!(%error, "cannot read the sink's committed offsets");
            return assignment;
        }
    };
    for element in committed.elements() {
        // One slow answer means Kafka is struggling: stop here rather than hold up the
        // readiness probe on the same thread for every partition.
        let Ok((low, high)) =
            consumer.fetch_watermarks(element.topic(), element.partition(), PROBE_TIMEOUT)
        else {
            break;
        };
        // Nothing committed yet: the sink starts from the oldest retained offset.
        let position = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => low,
        };
        ::metrics::gauge!(metrics::SINK_CONSUMER_LAG, "topic" => element.topic().to_owned(), "partition" => element.partition().to_string())
            .set((high - position).max(0) as f64);
    }
    assignment
}

/// Publishes the sink's partition assignment for the lag probe, every few seconds, forever:
/// run it next to [`Sink::run`] and drop it when the sink stops.
pub async fn watch_sink(sink: &Sink) -> Infallible {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        ticker.tick().await;
        let assignment = sink.assignment();
        ::metrics::gauge!(metrics::SINK_ASSIGNED_PARTITIONS).set(assignment.len() as f64);
        if let Ok(mut shared) = HEALTH.assignment.lock() {
            *shared = assignment;
        }
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

    #[test]
    fn empty_or_off_disables_the_endpoints() {
        assert!(is_disabled(""));
        assert!(is_disabled(" off "));
        assert!(is_disabled("OFF"));
        assert!(!is_disabled("127.0.0.1:9898"));
    }
}
