//! The fault schedule (a pure function of the seed and the duration) and its execution.

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::observe::LagProbe;
use super::stack::Stack;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// SIGKILL of `membersync run`, down for `param` ms, then started again.
    DaemonKill,
    /// SIGTERM of `membersync run` (it drains and commits), then started again (not in the
    /// default set).
    DaemonStop,
    /// The broker stopped (SIGTERM), down for `param` ms, then started again on the same
    /// storage.
    BrokerRestart,
    /// SIGKILL of the broker, down for `param` ms, then started again on the same storage
    /// (not in the default set).
    BrokerKill,
    /// `pg_ctl restart -m fast`.
    PostgresRestart,
    /// The next `param` Memberstack API requests answer 5xx (500, 502 or 503).
    Memberstack5xx,
    /// The next `param` Memberstack API requests answer 429.
    Memberstack429,
    /// Every Memberstack API response is delayed by `param` ms, for 5 s.
    MemberstackSlow,
    /// Postgres stopped (`pg_ctl stop -m fast`) for `param` s, then started again: longer
    /// than merge's first three attempts, so a change must wait, not be dead-lettered.
    PostgresOutage,
    /// Every Memberstack API request answers 503 for `param` s.
    MemberstackOutage,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::DaemonKill,
        Kind::DaemonStop,
        Kind::BrokerRestart,
        Kind::BrokerKill,
        Kind::PostgresRestart,
        Kind::Memberstack5xx,
        Kind::Memberstack429,
        Kind::MemberstackSlow,
        Kind::PostgresOutage,
        Kind::MemberstackOutage,
    ];

    /// The default set: the faults (the daemon's SIGKILL, a broker stop and restart on
    /// the same storage, a Postgres fast restart, Memberstack 5xx and 429 storms and slow
    /// responses). They need the development broker with scripts/tansu-patches/: unpatched,
    /// Tansu 0.6.0 sometimes never re-forms the merge group after a SIGKILL, and panics in its
    /// storage after a restart under a live idempotent producer (docs/broker.md). The long
    /// outages (Postgres stopped for 60 s, Memberstack answering 503 for 120 s in a 10-minute
    /// run) must be waited out: nothing of them may reach the dead-letter topic.
    pub const DEFAULT: [Kind; 8] = [
        Kind::DaemonKill,
        Kind::BrokerRestart,
        Kind::PostgresRestart,
        Kind::Memberstack5xx,
        Kind::Memberstack429,
        Kind::MemberstackSlow,
        Kind::PostgresOutage,
        Kind::MemberstackOutage,
    ];

    /// The names `MEMBERSYNC_SOAK_FAULTS` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kind::DaemonKill => "daemon",
            Kind::DaemonStop => "daemon-stop",
            Kind::BrokerRestart => "broker",
            Kind::BrokerKill => "broker-kill",
            Kind::PostgresRestart => "postgres",
            Kind::Memberstack5xx => "5xx",
            Kind::Memberstack429 => "429",
            Kind::MemberstackSlow => "slow",
            Kind::PostgresOutage => "postgres-outage",
            Kind::MemberstackOutage => "503-outage",
        }
    }

    /// `daemon,daemon-stop,broker,broker-kill,postgres,5xx,429,slow,postgres-outage,503-outage`
    /// (any subset); empty or unset:
    /// [`Kind::DEFAULT`].
    pub fn parse_list(list: &str) -> Vec<Kind> {
        let kinds: Vec<Kind> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                *Kind::ALL
                    .iter()
                    .find(|k| k.name() == s)
                    .unwrap_or_else(|| panic!("MEMBERSYNC_SOAK_FAULTS: unknown fault {s:?}"))
            })
            .collect();
        if kinds.is_empty() {
            Kind::DEFAULT.to_vec()
        } else {
            kinds
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::DaemonKill => "daemon kill -9",
            Kind::DaemonStop => "daemon stop (SIGTERM)",
            Kind::BrokerRestart => "broker stop + restart",
            Kind::BrokerKill => "broker kill -9 + restart",
            Kind::PostgresRestart => "postgres fast restart",
            Kind::Memberstack5xx => "memberstack 5xx storm",
            Kind::Memberstack429 => "memberstack 429 storm",
            Kind::MemberstackSlow => "memberstack slow",
            Kind::PostgresOutage => "postgres outage",
            Kind::MemberstackOutage => "memberstack 503 outage",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Planned {
    /// Seconds after the traffic started.
    pub at: f64,
    pub kind: Kind,
    pub param: u64,
    /// For 5xx storms: the status.
    pub status: u16,
}

#[derive(Debug, Clone)]
pub struct Happened {
    pub start: f64,
    pub end: f64,
    pub kind: Kind,
    pub detail: String,
}

/// A planned fault that was not injected: the system had not recovered from the previous one
/// before the fault window closed.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub planned_at: f64,
    pub kind: Kind,
}

/// How long the long outages last: their full length (Postgres 60 s, Memberstack 120 s) in
/// runs of 10 minutes or more; in shorter runs a share of the run (10 s and 20 s in the 120-s
/// profile CI runs), so that the other faults still fit.
fn outage_secs(secs: u64, full: u64, share: u64) -> u64 {
    if secs >= 600 {
        full
    } else {
        (secs / share).clamp(5, full)
    }
}

/// Merge has caught up again when its group's lag is at most this (a few seconds of traffic).
const RECOVERED_LAG: i64 = 30;

/// Faults of `kinds` in `[0.1 × secs, secs − recovery)`, about one per 10 s (at least one of
/// each kind, first, in a seeded order), at jittered slots; the rest of the run is for recovery.
pub fn plan(
    seed: u64,
    secs: u64,
    recovery: u64,
    kinds: &[Kind],
    full_outages: bool,
) -> Vec<Planned> {
    let outage = |full, share| {
        if full_outages {
            full
        } else {
            outage_secs(secs, full, share)
        }
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = secs as f64 * 0.1;
    let end = (secs.saturating_sub(recovery)) as f64;
    let window = (end - start).max(6.0);
    // Full-length outages take most of the window: each kind once.
    let n = if full_outages {
        kinds.len()
    } else {
        ((window / 10.0) as usize).max(kinds.len())
    };
    let slot = window / n as f64;
    let mut order = kinds.to_vec();
    order.shuffle(&mut rng);
    // A SIGKILLed consumer holds its partitions until its session times out (45 s): the kill
    // goes last in the first round, so that even the short profile meets every other fault.
    // The long outages go first: they take the most of the window.
    order.sort_by_key(|k| match k {
        Kind::PostgresOutage | Kind::MemberstackOutage => 0,
        Kind::DaemonKill => 2,
        _ => 1,
    });
    while order.len() < n {
        order.push(kinds[rng.random_range(0..kinds.len())]);
    }
    order
        .into_iter()
        .enumerate()
        .map(|(i, kind)| {
            let at = start + i as f64 * slot + rng.random_range(0.0..slot / 2.0);
            let param = match kind {
                Kind::DaemonKill | Kind::DaemonStop => rng.random_range(0..2000),
                Kind::BrokerRestart | Kind::BrokerKill => rng.random_range(1000..5000),
                Kind::PostgresRestart => 0,
                Kind::Memberstack5xx => rng.random_range(10..40),
                Kind::Memberstack429 => rng.random_range(20..60),
                Kind::MemberstackSlow => rng.random_range(300..2500),
                Kind::PostgresOutage => outage(60, 12),
                Kind::MemberstackOutage => outage(120, 6),
            };
            let status = [500, 502, 503][rng.random_range(0..3)];
            Planned {
                at,
                kind,
                param,
                status,
            }
        })
        .collect()
}

/// Runs `plan` in order against `stack`: each fault at its time, once the previous one has
/// ended and (unless `overlap`) merge has recovered from it (its lag is back to
/// [`RECOVERED_LAG`]); a fault still waiting when the window closes (`window_end` s after
/// `t0`) is skipped. Returns what happened, with times relative to `t0`.
pub async fn run(
    stack: &mut Stack,
    plan: &[Planned],
    t0: Instant,
    lag: &LagProbe,
    window_end: f64,
    overlap: bool,
) -> (Vec<Happened>, Vec<Skipped>) {
    let rel = |i: Instant| i.duration_since(t0).as_secs_f64();
    let mut happened = Vec::new();
    let mut skipped = Vec::new();
    for p in plan {
        tokio::time::sleep_until((t0 + Duration::from_secs_f64(p.at)).into()).await;
        while !overlap
            && rel(Instant::now()) < window_end
            && lag
                .lag(Duration::from_secs(3))
                .is_none_or(|l| l > RECOVERED_LAG)
        {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        if rel(Instant::now()) >= window_end {
            skipped.push(Skipped {
                planned_at: p.at,
                kind: p.kind,
            });
            continue;
        }
        let start = Instant::now();
        let detail = match p.kind {
            Kind::DaemonKill => {
                stack.kill_daemon();
                tokio::time::sleep(Duration::from_millis(p.param)).await;
                stack.start_daemon().await;
                format!(
                    "down {} ms, ready again after {:.1} s",
                    p.param,
                    start.elapsed().as_secs_f64()
                )
            }
            Kind::DaemonStop => {
                let exit = stack.stop_daemon().await;
                tokio::time::sleep(Duration::from_millis(p.param)).await;
                stack.start_daemon().await;
                format!(
                    "exited {exit}, down {} ms more, ready again after {:.1} s",
                    p.param,
                    start.elapsed().as_secs_f64()
                )
            }
            Kind::BrokerRestart | Kind::BrokerKill => {
                if p.kind == Kind::BrokerKill {
                    stack.broker.kill();
                } else {
                    stack.broker.stop().await;
                }
                tokio::time::sleep(Duration::from_millis(p.param)).await;
                stack.broker.restart().await;
                format!(
                    "down {} ms, listening again after {:.1} s",
                    p.param,
                    start.elapsed().as_secs_f64()
                )
            }
            Kind::PostgresRestart => {
                let cluster = stack.cluster.clone();
                tokio::task::spawn_blocking(move || cluster.restart_fast(Duration::from_secs(60)))
                    .await
                    .expect("pg_ctl restart");
                format!("back after {:.1} s", start.elapsed().as_secs_f64())
            }
            Kind::Memberstack5xx => {
                stack.ms.fail_next(p.param as u32, p.status);
                format!("next {} requests answer {}", p.param, p.status)
            }
            Kind::Memberstack429 => {
                stack.ms.rate_limit_next(p.param as u32);
                format!("next {} requests answer 429", p.param)
            }
            Kind::MemberstackSlow => {
                stack.ms.set_latency(Duration::from_millis(p.param));
                tokio::time::sleep(Duration::from_secs(5)).await;
                stack.ms.set_latency(Duration::ZERO);
                format!("+{} ms per response for 5 s", p.param)
            }
            Kind::PostgresOutage => {
                let cluster = stack.cluster.clone();
                tokio::task::spawn_blocking(move || cluster.stop_fast())
                    .await
                    .expect("pg_ctl stop");
                tokio::time::sleep(Duration::from_secs(p.param)).await;
                let cluster = stack.cluster.clone();
                tokio::task::spawn_blocking(move || cluster.start_again(Duration::from_secs(60)))
                    .await
                    .expect("pg_ctl start");
                format!(
                    "stopped for {} s, back after {:.1} s",
                    p.param,
                    start.elapsed().as_secs_f64()
                )
            }
            Kind::MemberstackOutage => {
                stack.ms.fail_next(u32::MAX, 503);
                tokio::time::sleep(Duration::from_secs(p.param)).await;
                stack.ms.reset_faults();
                format!("every request answered 503 for {} s", p.param)
            }
        };
        eprintln!("soak: t={:.1}s {} ({detail})", rel(start), p.kind.label());
        happened.push(Happened {
            start: rel(start),
            end: rel(Instant::now()),
            kind: p.kind,
            detail,
        });
    }
    (happened, skipped)
}
