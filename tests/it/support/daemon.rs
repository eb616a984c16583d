//! The real membersync binary as a child process, with its ops and ingest ports chosen free.

use std::process::{Child, Stdio};
use std::time::Duration;

use super::{free_port, membersync, wait_for};

pub struct Daemon {
    pub child: Child,
    pub ops: String,
    pub ingest: String,
}

impl Daemon {
    /// Starts `membersync <command>` with `env` and waits until every role has started
    /// (`/readyz` reports `startup: ok`, whatever the dependencies say).
    pub async fn start(command: &str, env: Vec<(String, String)>) -> Daemon {
        Self::start_on(command, env, free_port()).await
    }

    /// [`Daemon::start`] with the ingest server on `ingest_port` (for senders configured
    /// before the daemon starts, like the Memberstack simulator's webhooks).
    pub async fn start_on(command: &str, env: Vec<(String, String)>, ingest_port: u16) -> Daemon {
        let ops_port = free_port();
        let child = membersync()
            .arg(command)
            .envs(env)
            .env(
                "MEMBERSYNC__TELEMETRY__METRICS_ADDR",
                format!("127.0.0.1:{ops_port}"),
            )
            .env(
                "MEMBERSYNC__INGEST__LISTEN_ADDR",
                format!("127.0.0.1:{ingest_port}"),
            )
            .env("MEMBERSYNC__SHUTDOWN__DRAIN_TIMEOUT_SECS", "10")
            .env(
                "MEMBERSYNC__TELEMETRY__LOG_LEVEL",
                "info,librdkafka=off,rdkafka=off",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start membersync");
        let mut daemon = Daemon {
            child,
            ops: format!("http://127.0.0.1:{ops_port}"),
            ingest: format!("http://127.0.0.1:{ingest_port}"),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = daemon.child.try_wait().unwrap() {
                panic!("membersync {command} exited early with {status}");
            }
            if let Some((_, body)) = daemon.get("/readyz").await {
                let ready: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if ready["checks"]["startup"] == "ok" {
                    break;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "membersync {command} did not come up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        daemon
    }

    /// GET on the ops server.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("{}{path}", self.ops)).await.ok()?;
        Some((resp.status().as_u16(), resp.text().await.ok()?))
    }

    /// The value of one sample line of `/metrics` (`name{labels}`), 0 when absent.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics").await.expect("metrics");
        text.lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }

    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
        assert!(status.unwrap().success());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        wait_for("exit after SIGTERM", Duration::from_secs(20), || {
            let exited = self.child.try_wait().unwrap();
            async move { exited }
        })
        .await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
