//! Running the release binary as an operator would, for crash, outage and memory tests.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{stack, wait_for};

/// The release binary: `WALSYNC_BIN`, or `target/release/walsync` (built by `make test`).
pub fn release_binary() -> PathBuf {
    let path = std::env::var_os("WALSYNC_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/walsync")
        });
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --release` (make test does)",
        path.display()
    );
    path
}

/// The debug binary cargo built for this test run (no release build needed).
pub fn test_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walsync"))
}

/// A source configuration for one test: its own slot, publication and topic prefix.
pub fn source_config(name: &str, tables: &[&str]) -> String {
    let tables: Vec<String> = tables.iter().map(|t| format!("{t:?}")).collect();
    format!(
        r#"[postgres]
url = {url:?}
slot = {name:?}
publication = "{name}_pub"
tables = [{tables}]
heartbeat_interval_secs = 0
status_interval_ms = 500

[kafka]
brokers = {brokers:?}
topic_prefix = {name:?}
"#,
        url = stack().pg_url,
        brokers = stack().kafka_brokers,
        tables = tables.join(", "),
    )
}

/// A `walsync run` configuration for one test: [`source_config`] plus the sink's index prefix
/// (`<name>-`) and consumer group (`<name>-sink`), so nothing is shared with other tests. The
/// dead-letter topic is `<name>.dlq`.
pub fn pipeline_config(name: &str, tables: &[&str]) -> String {
    format!(
        r#"{source}
[elasticsearch]
url = {url:?}
index_prefix = "{name}-"

[sink]
group_id = "{name}-sink"
"#,
        source = source_config(name, tables),
        url = stack().es_url,
    )
}

/// The peak resident set size of process `pid` so far, from /proc (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

/// A spawned `walsync` process; killed when dropped.
pub struct Walsync {
    pub child: Child,
    pub log: PathBuf,
}

impl Walsync {
    /// Starts `walsync <command> --config <file>` with `config` written to a temporary file.
    pub fn spawn(command: &str, name: &str, config: &str) -> Self {
        Self::spawn_binary(&release_binary(), command, name, config)
    }

    /// Like [`spawn`](Self::spawn), with another binary (e.g. [`test_binary`]).
    pub fn spawn_binary(binary: &std::path::Path, command: &str, name: &str, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("walsync-test-{name}"));
        std::fs::create_dir_all(&dir).expect("create the test directory");
        let config_path = dir.join("walsync.toml");
        std::fs::write(&config_path, config).expect("write the config");
        let log = dir.join(format!("{command}.log"));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the log");
        let mut command_line = Command::new(binary);
        // Tests run side by side: only one process could listen on the default 127.0.0.1:9898.
        // A test that checks the endpoints names its own address in a [metrics] section.
        if !config.contains("[metrics]") {
            command_line.env("WALSYNC_METRICS__LISTEN", "off");
        }
        let child = command_line
            .arg(command)
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn walsync");
        Self { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The peak resident set size so far, in bytes.
    pub fn peak_rss_bytes(&self) -> u64 {
        peak_rss_bytes(self.pid())
    }

    pub fn kill_9(&mut self) {
        self.child.kill().expect("SIGKILL walsync");
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit code (panics if it does not exit within `deadline`).
    pub async fn terminate(&mut self, deadline: Duration) -> i32 {
        let pid = self.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
        let child = &mut self.child;
        wait_for("walsync to exit after SIGTERM", deadline, || {
            let exited = child.try_wait().ok().flatten();
            async move { exited }
        })
        .await
        .code()
        .unwrap_or(-1)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Walsync {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `scripts/stack <action> <service>`: stop, start, pause or resume a service.
pub fn stack_control(action: &str, service: &str) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack");
    let status = Command::new(script)
        .args([action, service])
        .status()
        .expect("run scripts/stack");
    assert!(status.success(), "scripts/stack {action} {service} failed");
}

/// Resumes a paused service when dropped, so a failing test does not leave it hung.
pub struct Paused(pub &'static str);

impl Paused {
    pub fn new(service: &'static str) -> Self {
        stack_control("pause", service);
        Self(service)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        stack_control("resume", self.0);
    }
}
