//! Progress of the copies: rows copied per table, rows per second and an ETA, shown as a
//! progress bar per table when stderr is a terminal and as structured log lines otherwise,
//! plus the metrics `walsync_snapshot_rows_copied_total{table}` and
//! `walsync_snapshot_tables_done_total` (no-ops unless a metrics recorder is installed).

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often progress is logged when stderr is not a terminal.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// One table's progress, shared by the workers copying its chunks.
pub struct TableProgress {
    pub table: String,
    /// Rows copied, including those of chunks completed by an earlier run.
    rows: AtomicU64,
    /// Rows copied by this run (for the rate).
    rows_this_run: AtomicU64,
    /// The planner's estimate of the table's rows; 0 when unknown.
    estimated_rows: u64,
    started: Instant,
    done: AtomicBool,
    /// Cached once per table: the macro's lookup is not paid per row.
    rows_counter: metrics::Counter,
    bar: Option<ProgressBar>,
}

impl TableProgress {
    /// Counts `rows` more rows handed to the producer.
    pub fn add_rows(&self, rows: u64) {
        self.rows.fetch_add(rows, Ordering::Relaxed);
        self.rows_this_run.fetch_add(rows, Ordering::Relaxed);
        self.rows_counter.increment(rows);
        if let Some(bar) = &self.bar {
            bar.inc(rows);
        }
    }

    /// The table's copy is complete.
    pub fn finish(&self) {
        self.done.store(true, Ordering::Release);
        metrics::counter!("walsync_snapshot_tables_done_total").increment(1);
        if let Some(bar) = &self.bar {
            bar.finish_with_message("done");
        }
        tracing::info!(
            table = %self.table,
            rows = self.rows.load(Ordering::Relaxed),
            seconds = self.started.elapsed().as_secs(),
            "table copied"
        );
    }

    fn rate(&self) -> f64 {
        let seconds = self.started.elapsed().as_secs_f64().max(0.001);
        self.rows_this_run.load(Ordering::Relaxed) as f64 / seconds
    }

    fn log(&self) {
        let rows = self.rows.load(Ordering::Relaxed);
        let rate = self.rate();
        let eta_secs = (self.estimated_rows > rows && rate > 0.0)
            .then(|| ((self.estimated_rows - rows) as f64 / rate).round() as u64);
        tracing::info!(
            table = %self.table,
            rows,
            estimated_rows = self.estimated_rows,
            rows_per_sec = rate.round() as u64,
            eta_secs,
            "copying"
        );
    }
}

/// The progress of every table of one copy.
pub struct CopyProgress {
    tables: Vec<Arc<TableProgress>>,
    bars: Option<MultiProgress>,
}

impl CopyProgress {
    /// `tables`: name, planner estimate (negative when unknown), rows already copied.
    pub fn new(tables: &[(String, f64, u64)]) -> Self {
        let bars = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let style = ProgressStyle::with_template(
            "{prefix:30!} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} rows {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let tables = tables
            .iter()
            .map(|(table, estimate, done)| {
                let estimated_rows = if *estimate > 0.0 { *estimate as u64 } else { 0 };
                let bar = bars.as_ref().map(|bars| {
                    let bar = bars.add(ProgressBar::new(estimated_rows.max(*done)));
                    bar.set_style(style.clone());
                    bar.set_prefix(table.clone());
                    bar.set_position(*done);
                    bar
                });
                Arc::new(TableProgress {
                    table: table.clone(),
                    rows: AtomicU64::new(*done),
                    rows_this_run: AtomicU64::new(0),
                    estimated_rows,
                    started: Instant::now(),
                    done: AtomicBool::new(false),
                    rows_counter: metrics::counter!(
                        "walsync_snapshot_rows_copied_total",
                        "table" => table.clone()
                    ),
                    bar,
                })
            })
            .collect();
        Self { tables, bars }
    }

    pub fn table(&self, index: usize) -> &Arc<TableProgress> {
        &self.tables[index]
    }

    /// Logs the unfinished tables' progress every few seconds, unless bars show it.
    pub async fn log_until_done(self: Arc<Self>) {
        if self.bars.is_some() {
            return;
        }
        let mut ticker = tokio::time::interval(LOG_INTERVAL);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let mut running = false;
            for table in &self.tables {
                if !table.done.load(Ordering::Acquire) {
                    running = true;
                    table.log();
                }
            }
            if !running {
                return;
            }
        }
    }
}
