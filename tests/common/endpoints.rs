//! Talking to walsync's `/metrics`, `/healthz` and `/readyz` endpoints: a free port, a plain
//! HTTP GET, and reading one sample out of the Prometheus text format.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A loopback address no one listens on right now (the OS picks the port).
pub fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let address = listener.local_addr().expect("its address");
    address.to_string()
}

/// `GET path` on `address`: the status code and the body, or `None` when nothing answers.
pub async fn get(address: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

/// The sum over every series of `name` (a histogram's `_count`, a gauge per partition, …)
/// whose labels include `labels`; `None` when there is none.
pub fn sum(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in metrics.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, series_labels) = match series.split_once('{') {
            Some((series_name, rest)) => (series_name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let all_match = labels.iter().all(|(key, wanted)| {
            series_labels
                .split(',')
                .any(|pair| pair == format!("{key}=\"{wanted}\""))
        });
        if series_name == name
            && all_match
            && let Ok(value) = value.parse::<f64>()
        {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}
