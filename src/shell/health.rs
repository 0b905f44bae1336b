//! Health: the `/metrics`, `/healthz` and `/readyz` endpoints, and the probes that keep the
//! health state ([`crate::health`]) fresh.
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
//! The state readiness is decided from lives on the ground floor ([`crate::health`]), which the
//! source and the sink update; this module only reads it. An idle source
//! sends nothing to Kafka, so a paused broker would go unnoticed by the delivery check alone:
//! a probe thread asks Kafka for metadata every [`PROBE_INTERVAL`] (a hung broker times out),
//! and a task pings the search server. The same thread computes the sink's consumer lag.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use rdkafka::consumer::{BaseConsumer, Consumer};

use tokio::net::TcpListener;

use crate::config::Config;
use crate::health::{HEALTH, Roles};
use crate::kafka::consumer::group_positions;
use crate::kafka::producer::client_config;
use crate::kafka::topics;
use crate::metrics;
use crate::sink::apply::Sink;

/// How often Kafka and the search server are probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the sink's consumer lag is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(10);

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
    let positions = match group_positions(consumer, &assignment, PROBE_TIMEOUT) {
        Ok(positions) => positions,
        Err(error) => {
            // A slow answer means Kafka is struggling: the probe does not wait on it.
            tracing::debug!(%error, "cannot read the sink's position");
            return assignment;
        }
    };
    for position in positions {
        ::metrics::gauge!(metrics::SINK_CONSUMER_LAG, "topic" => position.topic.clone(), "partition" => position.partition.to_string())
            .set(position.lag() as f64);
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

    #[test]
    fn empty_or_off_disables_the_endpoints() {
        assert!(is_disabled(""));
        assert!(is_disabled(" off "));
        assert!(is_disabled("OFF"));
        assert!(!is_disabled("127.0.0.1:9898"));
    }
}
