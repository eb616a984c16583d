//! A private Tansu broker for one test, so the test can take Kafka away (SIGKILL) and bring it
//! back on the same port and storage without touching the shared dev broker other tests use.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{free_port, wait_for};

pub struct Broker {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

/// The `tansu` that scripts/dev-services built: version 0.6.0 with scripts/tansu-patches/,
/// which it stamps next to the binary (`tansu.membersync-patches`). An unpatched Tansu fails
/// the soak for its own defects (docs/broker.md), so it is refused here, loudly.
fn tansu_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    });
    let bin = on_path
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cargo/bin/tansu"))
                .filter(|p| p.is_file())
        })
        .expect("tansu is not installed (scripts/dev-services up builds it)");
    let stamp = bin.with_file_name("tansu.membersync-patches");
    let found = std::fs::read_to_string(&stamp).unwrap_or_default();
    let want = format!("0.6.0+{}", patch_id());
    assert_eq!(
        found.trim(),
        want,
        "{} is not Tansu 0.6.0 with today's scripts/tansu-patches ({} says {:?}); \
         scripts/dev-services up rebuilds it",
        bin.display(),
        stamp.display(),
        found.trim()
    );
    bin
}

/// As scripts/dev-services' `tansu_patch_id`: the first 16 hex digits of the SHA-256 of the
/// patch files, concatenated in name order.
fn patch_id() -> String {
    use sha2::{Digest, Sha256};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/tansu-patches");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("scripts/tansu-patches")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    names.sort();
    let mut sha = Sha256::new();
    for name in names {
        sha.update(std::fs::read(name).expect("patch file"));
    }
    hex::encode(sha.finalize())[..16].to_owned()
}

/// Written to the broker's log when the test stops it (SIGTERM).
const STOP_MARKER: &str = "--- membersync test: SIGTERM sent (orderly stop) ---";

/// See [`Broker::panics`].
#[derive(Debug, Default)]
pub struct BrokerPanics {
    pub while_serving: Vec<String>,
    pub while_stopping: Vec<String>,
}

impl Broker {
    /// Starts Tansu on a free loopback port with SQLite storage in a directory of its own.
    pub async fn start() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("membersync-tansu-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("tansu")).expect("storage dir");
        let mut broker = Broker {
            dir,
            port: free_port(),
            child: None,
        };
        broker.spawn().await;
        broker
    }

    /// `host:port` for `kafka.brokers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))
            .expect("tansu log");
        // Tansu resolves a relative sqlite:// URL against its working directory.
        let child = Command::new(tansu_bin())
            .current_dir(self.dir.path())
            .args(["broker", "--cluster-id", "membersync-test"])
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu/tansu.db"])
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tansu");
        self.child = Some(child);
        let port = self.port;
        wait_for(
            "the private Tansu broker to listen",
            Duration::from_secs(30),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// SIGKILL: the broker disappears at once, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, as an orderly stop (a maintenance restart), then SIGKILL if it is still there
    /// after 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.note(STOP_MARKER);
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() {
                if tokio::time::Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Starts it again on the same port with the same storage.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// The broker's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// The panics in the broker's log, split by when: while it served, or between a
    /// [`Broker::stop`] (SIGTERM) and its next start. Tansu 0.6.0 stops its storage task before
    /// its connections, so a request in flight at a SIGTERM can panic its connection task
    /// (`service.rs` "unreachable", `offset_fetch` "not yet implemented") on the way out; that
    /// affects nothing the process would have done, unlike a panic while serving.
    pub fn panics(&self) -> BrokerPanics {
        let mut panics = BrokerPanics::default();
        let mut stopping = false;
        let log = self.log();
        let mut lines = log.lines().peekable();
        while let Some(line) = lines.next() {
            if line.contains(STOP_MARKER) {
                stopping = true;
            } else if line.starts_with("listening on:") {
                stopping = false;
            } else if line.contains("panicked at") {
                let message = lines.peek().map(|m| m.trim()).unwrap_or_default();
                let panic = format!("{} ({message})", line.trim());
                if stopping {
                    panics.while_stopping.push(panic);
                } else {
                    panics.while_serving.push(panic);
                }
            }
        }
        panics
    }

    fn note(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("tansu.log"))
        {
            let _ = writeln!(log, "{line}");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
