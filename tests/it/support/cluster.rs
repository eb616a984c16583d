//! Throw-away Postgres clusters for tests that need server settings the shared dev cluster
//! must not have (e.g. `wal_level = replica`). Postgres refuses to run as root, so as root the
//! cluster runs as the unprivileged `membersync-dev` user that `scripts/dev-services` creates.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Services, free_port};

pub struct TempCluster {
    dir: tempfile::TempDir,
    pub port: u16,
}

fn as_pg_user(program: PathBuf) -> Command {
    let root = running_as_root();
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "membersync-dev", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn running_as_root() -> bool {
    // `id -u` avoids a libc dependency just for geteuid.
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

impl TempCluster {
    /// initdb + start with `settings` appended to postgresql.conf; superuser `postgres`, trust auth
    /// on loopback (the cluster lives only for one test).
    pub fn start(settings: &[&str]) -> TempCluster {
        let bin = Services::get().pg_bin();
        let dir = tempfile::Builder::new()
            .prefix("membersync-pg-")
            .tempdir()
            .expect("tempdir");
        let _ = Command::new("chmod").arg("777").arg(dir.path()).status();
        let data = dir.path().join("data");
        let status = as_pg_user(bin.join("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let mut conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n",
            dir.path().display()
        );
        for s in settings {
            conf.push_str(s);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), conf).expect("write settings");
        let status = as_pg_user(bin.join("pg_ctl"))
            .args(["-w", "-t", "30", "-l"])
            .arg(dir.path().join("log"))
            .arg("-D")
            .arg(&data)
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl start failed: {:?}",
            std::fs::read_to_string(dir.path().join("log"))
        );
        TempCluster { dir, port }
    }

    /// `pg_ctl restart -m fast`: sessions are terminated, the server shuts down cleanly and
    /// comes back on the same port and data (a database failover or maintenance restart, as
    /// clients see it). Panics if Postgres does not come back within `timeout`.
    pub fn restart_fast(&self, timeout: Duration) {
        let status = as_pg_user(Services::get().pg_bin().join("pg_ctl"))
            .args([
                "-w",
                "-t",
                &timeout.as_secs().to_string(),
                "-m",
                "fast",
                "-l",
            ])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("restart")
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl restart");
        assert!(
            status.success(),
            "pg_ctl restart failed: {:?}",
            std::fs::read_to_string(self.dir.path().join("log"))
        );
    }

    /// `pg_ctl stop -m fast`: the database is gone until [`TempCluster::start_again`].
    pub fn stop_fast(&self) {
        let status = as_pg_user(Services::get().pg_bin().join("pg_ctl"))
            .args(["-w", "-t", "60", "-m", "fast", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl stop");
        assert!(status.success(), "pg_ctl stop failed");
    }

    /// Starts the stopped cluster again on the same port and data.
    pub fn start_again(&self, timeout: Duration) {
        let status = as_pg_user(Services::get().pg_bin().join("pg_ctl"))
            .args(["-w", "-t", &timeout.as_secs().to_string(), "-l"])
            .arg(self.dir.path().join("log"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("start")
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(
            status.success(),
            "pg_ctl start failed: {:?}",
            std::fs::read_to_string(self.dir.path().join("log"))
        );
    }

    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(5))
            .connect(tokio_postgres::NoTls)
            .await
            .expect("connect to temp cluster");
        tokio::spawn(conn);
        client
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        let bin = Services::get().pg_bin();
        let _ = as_pg_user(bin.join("pg_ctl"))
            .args(["-m", "immediate", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("stop")
            .stdout(Stdio::null())
            .status();
    }
}
