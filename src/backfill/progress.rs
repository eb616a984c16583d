//! Progress of the Memberstack pass: an indicatif bar when stderr is a terminal, otherwise
//! (a pod, CI, a pipe) one log line every few seconds with the counters.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the log line is written when there is no terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last_log: Mutex<Instant>,
    every: Duration,
}

impl Progress {
    /// `members_done`: already published by an earlier attempt of this run (resume).
    pub fn new(members_done: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} backfill [{elapsed_precise}] {wide_bar} {pos}/{len} members ({per_sec}, eta {eta}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(members_done);
            bar
        });
        Self {
            bar,
            started: Instant::now(),
            last_log: Mutex::new(Instant::now()),
            every: LOG_EVERY,
        }
    }

    /// After each finished page.
    pub fn page(&self, pages_done: u64, members_done: u64, total: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(total.max(members_done));
            bar.set_position(members_done);
            bar.set_message(format!("{pages_done} pages"));
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= self.every {
            *last = Instant::now();
            tracing::info!(
                pages_done,
                members_published = members_done,
                members_total = total,
                elapsed_secs = self.started.elapsed().as_secs(),
                "backfill: Memberstack pass in progress"
            );
        }
    }

    /// While waiting for the incremental snapshot of the captured tables.
    pub fn snapshot(&self, status: &crate::cdc::incremental::SnapshotStatus) {
        let table = status.current_table.as_deref().unwrap_or("-");
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "Memberstack done; incremental snapshot {} {} ({table}): {} rows",
                status.id,
                status.state.as_str(),
                status.rows_emitted
            ));
            bar.tick();
            return;
        }
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= self.every {
            *last = Instant::now();
            tracing::info!(
                snapshot_id = status.id,
                state = status.state.as_str(),
                table,
                rows_emitted = status.rows_emitted,
                rows_skipped = status.rows_skipped,
                chunks = status.chunks,
                "backfill: waiting for the incremental snapshot of the captured tables"
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
