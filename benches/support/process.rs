//! The daemon under measurement as a child process: stopping it the way a supervisor does, and
//! reading what it left behind.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// SIGTERM, then waits up to `grace` for the exit (a clean shutdown drains and commits); kills
/// it after that. Returns how it ended, for the report.
pub async fn terminate(child: &mut Child, grace: Duration) -> String {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.to_string();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return format!(
                "did not exit within {} s of SIGTERM; killed",
                grace.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The process's resident memory in MiB (0 once it has gone).
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
