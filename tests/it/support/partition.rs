//! A network partition between a daemon and Postgres, made by the kernel: the daemon connects
//! to a port of its own that nftables translates (DNAT) to Postgres, and `cut` drops every
//! packet of those connections in both directions. Neither end sees a FIN or an RST, and
//! nothing is acknowledged any more, not even by a kernel: TCP retransmits, keepalive probes go
//! unanswered, `tcp_user_timeout` runs out — what a node that vanished or a partition looks
//! like. (A userspace relay that stops forwarding is not that: its kernel still acknowledges
//! every segment and keepalive, so the ends' TCP timers never fire.)
//!
//! Needs `nft` (Debian package `nftables`, installed by `scripts/test` and `.ci/run`) and
//! CAP_NET_ADMIN (root); the test fails loudly without them. Each partition has a table of its
//! own, deleted on drop, so tests in parallel never touch each other's rules.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{Services, free_port};

pub struct Partition {
    /// Connect here to reach Postgres through the partition.
    pub port: u16,
    table: String,
}

impl Partition {
    /// A partition-able path to the dev Postgres.
    pub fn to_postgres() -> Partition {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let services = Services::get();
        let host = services.pg_host();
        assert!(
            host == "127.0.0.1" || host == "localhost",
            "the partition translates loopback connections; Postgres is at {host}"
        );
        let port = free_port();
        let table = format!(
            "membersync_test_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        nft(&format!(
            "table ip {table} {{
               chain nat_out {{
                 type nat hook output priority -100;
                 ip daddr 127.0.0.1 tcp dport {port} dnat to 127.0.0.1:{pg}
               }}
               chain filter_out {{
                 type filter hook output priority 0;
               }}
             }}",
            pg = services.pg_port()
        ));
        Partition { port, table }
    }

    /// From now on every packet of a connection made to `port` is dropped, both ways.
    pub fn cut(&self) {
        // Conntrack remembers each connection's original destination (our port) for the
        // packets of both directions, after the translation.
        nft(&format!(
            "add rule ip {} filter_out meta l4proto tcp ct original proto-dst {} drop",
            self.table, self.port
        ));
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .status();
    }
}

fn nft(script: &str) {
    let out = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap_or_else(|e| {
            panic!(
                "cannot run nft ({e}): the partition tests need nftables and root \
                 (apt-get install nftables; scripts/test and .ci/run install it)"
            )
        });
    assert!(
        out.status.success(),
        "nft failed: {}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
}
