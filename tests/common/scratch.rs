//! Throwaway PostgreSQL clusters for tests that need settings the shared server must not have
//! (`wal_level = replica`, a synchronous standby that never comes, …): `scripts/stack
//! scratch-pg`, stopped and deleted when the guard is dropped — also when the test fails.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};

/// The ports scratch clusters take: nothing else of the stack listens there.
const PORTS: std::ops::Range<u16> = 25433..25733;

/// Where this process starts looking, so that tests of one binary running in parallel never
/// race for the same port (the check below cannot see a cluster still starting).
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

pub fn stack_script() -> Command {
    Command::new(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/stack"))
}

/// A throwaway cluster with the walsync role and database of the main one.
pub struct ScratchPg {
    pub port: u16,
    pub url: String,
}

impl ScratchPg {
    /// Starts a cluster with `settings` (postgres arguments such as `-c wal_level=replica`).
    pub fn up(settings: &[&str]) -> Self {
        Self::start(&[], settings)
    }

    /// Starts a cluster whose transaction ids are in `epoch` (full ids above 2³² for epoch 1),
    /// as after the 32-bit counter wrapped around.
    pub fn up_at_xid_epoch(epoch: u32, settings: &[&str]) -> Self {
        Self::start(&["--xid-epoch", &epoch.to_string()], settings)
    }

    fn start(options: &[&str], settings: &[&str]) -> Self {
        let port = free_scratch_port();
        // The guard exists before the start, so a half-made cluster is removed too.
        let mut cluster = Self {
            port,
            url: String::new(),
        };
        let output = stack_script()
            .args(["scratch-pg", "up", &port.to_string()])
            .args(options)
            .args(settings)
            .output()
            .expect("run scripts/stack scratch-pg up");
        assert!(
            output.status.success(),
            "scripts/stack scratch-pg up {port} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.url = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        assert!(cluster.url.starts_with("postgres://"), "{}", cluster.url);
        cluster
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        match stack_script()
            .args(["scratch-pg", "down", &self.port.to_string()])
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "scripts/stack scratch-pg down {} failed:\n{}",
                self.port,
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(error) => eprintln!("cannot run scripts/stack scratch-pg down: {error}"),
        }
    }
}

/// A port in [`PORTS`] that nothing listens on and no scratch cluster claims, different from
/// every port this process took before.
fn free_scratch_port() -> u16 {
    let stack_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".stack");
    let span = PORTS.end - PORTS.start;
    // Binaries start at different places (by process id), tests within one take turns.
    let base = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let offset = (base + NEXT_PORT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = PORTS.start + offset;
        if !stack_dir.join(format!("scratch-pg-{port}")).exists()
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port for a scratch cluster in {PORTS:?}")
}
