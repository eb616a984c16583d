//! The soak report: Markdown (seed, command, traffic, faults, verdict per check, duplicates,
//! resources, throughput, lag) and a PNG plot of throughput, lag and RSS with the faults marked.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use membersync::sim::Stats;
use plotters::prelude::*;

use super::faults::{Happened, Kind, Skipped};
use super::observe::Sample;
use super::traffic::Truth;
use super::verdict::{Members, Verdict};
use super::{SQL_RATE, STRIPE_RATE, Settings, WEBHOOK_RATE};

pub struct Run<'a> {
    pub settings: &'a Settings,
    pub setup: Duration,
    pub members: &'a Members,
    pub truth: &'a Truth,
    pub samples: &'a [Sample],
    pub faults: &'a [Happened],
    pub skipped: &'a [Skipped],
    pub verdict: &'a Verdict,
    pub traffic_end: f64,
    pub quiesced_at: f64,
    pub daemon_starts: u32,
    pub ms_stats: Stats,
    pub auth_stats: Stats,
    pub posthog_events: usize,
    pub deliveries: usize,
    pub daemon_log: &'a Path,
}

fn command(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .current_dir(crate::support::repo_root())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Processed changes per second, from the `webhook_log` row counts.
fn throughput(samples: &[Sample]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut prev: Option<(f64, i64)> = None;
    for s in samples {
        if let Some(n) = s.processed {
            if let Some((t, m)) = prev
                && s.t > t
            {
                out.push((s.t, (n - m) as f64 / (s.t - t)));
            }
            prev = Some((s.t, n));
        }
    }
    out
}

/// Writes the report and the plot; returns the report's path.
pub fn write(run: &Run) -> PathBuf {
    let path = run.settings.out.clone();
    let png = path.with_extension("png");
    let plot = plot(run, &png);
    let mut md = String::new();
    let s = run.settings;
    let v = run.verdict;
    let t = run.truth;
    let rel = |p: &Path| {
        p.strip_prefix(path.parent().unwrap())
            .unwrap_or(p)
            .display()
            .to_string()
    };
    let _ = writeln!(md, "# Soak: mixed traffic under faults\n");
    let _ = writeln!(
        md,
        "**Verdict: {}** — {} of {} checks passed.\n",
        if v.passed() { "PASS" } else { "FAIL" },
        v.checks.iter().filter(|c| c.ok()).count(),
        v.checks.len()
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| seed | `{}` |", s.seed);
    let _ = writeln!(
        md,
        "| traffic | {} s (faults until {} s, then {} s of recovery) |",
        s.secs,
        s.secs - s.recovery,
        s.recovery
    );
    let _ = writeln!(
        md,
        "| reproduce | `MEMBERSYNC_SOAK_SECS={} MEMBERSYNC_SOAK_SEED={} MEMBERSYNC_SOAK_FAULTS={}{} MEMBERSYNC_SOAK_OUT={} scripts/test -E 'test(/^soak::/)'` |",
        s.secs,
        s.seed,
        s.faults
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(","),
        if s.overlap {
            " MEMBERSYNC_SOAK_OVERLAP=1"
        } else {
            ""
        },
        s.out
            .strip_prefix(crate::support::repo_root())
            .unwrap_or(&s.out)
            .display()
    );
    let _ = writeln!(
        md,
        "| faults enabled | `{}` (`MEMBERSYNC_SOAK_FAULTS`) |",
        s.faults
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    let _ = writeln!(
        md,
        "| when, commit | {} UTC, `{}`{} |",
        chrono::Utc::now().format("%Y-%m-%d %H:%M"),
        command("git", &["rev-parse", "--short", "HEAD"]),
        if command("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
            ""
        } else {
            " (with uncommitted changes)"
        }
    );
    let _ = writeln!(
        md,
        "| machine | {} cores, load average {} at the end (shared with other work) |",
        command("nproc", &[]),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        md,
        "| daemon | `{}` (`membersync run`: CDC, ingest, merge), {} starts, setup {:.0} s |",
        Path::new(env!("CARGO_BIN_EXE_membersync"))
            .strip_prefix(crate::support::repo_root())
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "membersync".into()),
        run.daemon_starts,
        run.setup.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| services | private Postgres 15 cluster (`wal_level = logical`), private Tansu broker with SQLite storage, Memberstack / Supabase Auth / PostHog simulators |"
    );
    let _ = writeln!(
        md,
        "| merge retries | `merge.max_attempts = 3` (the default: then reported late, retries go on; only poison and permanent errors are dead-lettered), backoff 250 ms → 5 s with jitter |"
    );
    let _ = writeln!(
        md,
        "| quiescence | reached at t = {:.1} s, {:.1} s after the traffic ended |\n",
        run.quiesced_at,
        run.quiesced_at - run.traffic_end
    );

    let _ = writeln!(
        md,
        "## Verdict\n\n| check | scope | result |\n|---|---|---|"
    );
    for c in &v.checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            c.name,
            c.scope,
            if c.ok() {
                "✓".to_owned()
            } else {
                format!("✗ {} violations", c.violations.len())
            }
        );
    }
    for c in v.checks.iter().filter(|c| !c.ok()) {
        let _ = writeln!(md, "\n**✗ {}**\n", c.name);
        for line in c.violations.iter().take(50) {
            let _ = writeln!(md, "- {line}");
        }
        if c.violations.len() > 50 {
            let _ = writeln!(md, "- … {} more", c.violations.len() - 50);
        }
    }

    let _ = writeln!(
        md,
        "\n## Traffic\n\n| source | offered | result |\n|---|---|---|"
    );
    let _ = writeln!(
        md,
        "| Memberstack dashboard edits (`customFields.ms_seq`, {} members) | {WEBHOOK_RATE}/s | {} edits; the simulator sent {} Svix-signed webhooks (edits, creations and echoes of merge's PATCHes), {} accepted |",
        run.members.memberstack.len(),
        t.ms_edits,
        run.deliveries,
        v.accepted_webhooks - t.stripe_accepted.len()
    );
    let _ = writeln!(
        md,
        "| SQL `update members set project_data` ({} members) | {SQL_RATE}/s | {} committed, {} failed or not attempted (Postgres restarting), {} members ending on an unknown-outcome update |",
        run.members.sql.len(),
        t.sql_commits,
        t.sql_failures,
        t.sql_ambiguous.len()
    );
    let _ = writeln!(
        md,
        "| Stripe `customer.subscription.updated` ({} members) | {STRIPE_RATE}/s | {} accepted, {} non-2xx answers retried, {} never accepted |",
        run.members.stripe.len(),
        t.stripe_accepted.len(),
        t.stripe_retries,
        t.stripe_lost.len()
    );
    let _ = writeln!(
        md,
        "| poison records produced to `<prefix>.memberstack` | — | {} |",
        t.poison.len()
    );
    let ms = &run.ms_stats;
    let _ = writeln!(
        md,
        "\nMemberstack API calls by membersync: {} ({} answered 429), by status: {}.",
        ms.total_requests,
        ms.rate_limited,
        ms.per_status
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    let _ = writeln!(
        md,
        "Supabase Auth admin API calls: {} (by status: {}). PostHog events captured: {}.",
        run.auth_stats.total_requests,
        run.auth_stats
            .per_status
            .iter()
            .map(|(k, n)| format!("{k}: {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        run.posthog_events
    );

    let _ = writeln!(
        md,
        "\n## Faults\n\n| # | start (s) | end (s) | fault | detail |\n|---|---|---|---|---|"
    );
    for (i, f) in run.faults.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.1} | {} | {} |",
            i + 1,
            f.start,
            f.end,
            f.kind.label(),
            f.detail
        );
    }

    let _ = writeln!(
        md,
        "\n{}",
        if s.overlap {
            "Faults were injected at their planned times (`MEMBERSYNC_SOAK_OVERLAP=1`).".to_owned()
        } else {
            format!(
                "Each fault waited until merge had caught up after the previous one (group lag ≤ 30); \
                 {} planned faults were still waiting when the fault window closed and were skipped{}.",
                run.skipped.len(),
                if run.skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        run.skipped
                            .iter()
                            .map(|k| format!("{} at {:.0} s", k.kind.label(), k.planned_at))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            )
        }
    );

    let _ = writeln!(
        md,
        "\n## Duplicates in Kafka\n\nAt-least-once delivery: a record produced again after a crash or a retried \
         webhook is a duplicate; merge's effect stays exactly-once (`webhook_log`).\n\n\
         | topic | records | distinct | duplicates |\n|---|---|---|---|"
    );
    for d in &v.duplicates {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            d.topic,
            d.records,
            d.distinct,
            d.records - d.distinct
        );
    }

    let _ = writeln!(md, "\n## Resources, throughput, lag\n");
    if let Some(r) = &v.resources {
        let _ = writeln!(
            md,
            "| | start | end | max | median, first third | median, last third |\n|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            md,
            "| RSS (MB) | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            r.rss_start_mb, r.rss_end_mb, r.rss_max_mb, r.rss_first_third_mb, r.rss_last_third_mb
        );
        let _ = writeln!(
            md,
            "| open fds | {} | {} | {} | {:.0} | {:.0} |",
            r.fds_start, r.fds_end, r.fds_max, r.fds_first_third, r.fds_last_third
        );
    }
    let tp = throughput(run.samples);
    let total = run
        .samples
        .iter()
        .filter_map(|s| s.processed)
        .max()
        .unwrap_or(0);
    let peak = tp.iter().map(|p| p.1).fold(0.0, f64::max);
    let lag_max = run.samples.iter().filter_map(|s| s.lag).max().unwrap_or(0);
    let gaps = run
        .samples
        .iter()
        .filter(|s| s.processed.is_none() || s.lag.is_none())
        .count();
    let _ = writeln!(
        md,
        "\nChanges processed by merge (`webhook_log` rows): {total} in {:.0} s, {:.1}/s on average over the traffic, peak {peak:.0}/s. \
         Consumer lag of the merge group (records of its three topics not committed): max {lag_max}. \
         {gaps} of {} one-second samples had Postgres or the broker unreachable.",
        run.quiesced_at,
        total as f64 / run.quiesced_at.max(1.0),
        run.samples.len()
    );
    let log = std::fs::read_to_string(run.daemon_log).unwrap_or_default();
    let count = |level: &str| log.lines().filter(|l| l.contains(level)).count();
    let _ = writeln!(
        md,
        "\nDaemon log (level warn): {} WARN and {} ERROR lines.",
        count("\"WARN\""),
        count("\"ERROR\"")
    );

    let _ = writeln!(md, "\n## Plot\n");
    match plot {
        Ok(()) => {
            let _ = writeln!(
                md,
                "![throughput, consumer lag and RSS over time, faults marked]({})",
                rel(&png)
            );
        }
        Err(e) => {
            let _ = writeln!(md, "The plot could not be drawn: {e}");
        }
    }
    std::fs::write(&path, md).expect("write the soak report");
    path
}

fn color(kind: Kind) -> RGBColor {
    match kind {
        Kind::DaemonKill => RGBColor(220, 20, 60),
        Kind::DaemonStop => RGBColor(30, 144, 255),
        Kind::BrokerRestart => RGBColor(255, 140, 0),
        Kind::BrokerKill => RGBColor(200, 100, 0),
        Kind::PostgresRestart => RGBColor(148, 0, 211),
        Kind::Memberstack5xx => RGBColor(0, 128, 0),
        Kind::Memberstack429 => RGBColor(0, 160, 160),
        Kind::MemberstackSlow => RGBColor(139, 90, 43),
        Kind::PostgresOutage => RGBColor(75, 0, 130),
        Kind::MemberstackOutage => RGBColor(0, 90, 0),
    }
}

/// DejaVu Sans (Debian's fonts-dejavu-core, present on the project's machines); plotters draws
/// text through ab_glyph from the file's bytes, without fontconfig.
fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
        ];
        let bytes = candidates
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| {
                format!("no DejaVuSans.ttf in {candidates:?} (apt-get install fonts-dejavu-core)")
            })?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Vec::leak(bytes))
            .map_err(|_| "DejaVuSans.ttf is not a usable font".to_owned())
    })
    .clone()
}

fn plot(run: &Run, png: &Path) -> Result<(), String> {
    register_font()?;
    draw(run, png).map_err(|e| e.to_string())
}

fn draw(run: &Run, png: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let xmax = run
        .samples
        .last()
        .map_or(run.traffic_end, |s| s.t)
        .max(run.traffic_end)
        + 1.0;
    let root = BitMapBackend::new(png, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(50);
    title.draw(&Text::new(
        format!(
            "membersync soak: seed {}, {} s of traffic, verdict {}",
            run.settings.seed,
            run.settings.secs,
            if run.verdict.passed() { "PASS" } else { "FAIL" }
        ),
        (20, 15),
        ("sans-serif", 24).into_font(),
    ))?;
    let panels = body.split_evenly((3, 1));
    let throughput = throughput(run.samples);
    let lag: Vec<(f64, f64)> = run
        .samples
        .iter()
        .filter_map(|s| s.lag.map(|l| (s.t, l as f64)))
        .collect();
    let rss: Vec<(f64, f64)> = run
        .samples
        .iter()
        .filter_map(|s| s.rss_kb.map(|r| (s.t, r as f64 / 1024.0)))
        .collect();
    /// Caption, unit, points, colour of one panel.
    type Panel<'a> = (&'a str, &'a str, &'a Vec<(f64, f64)>, RGBColor);
    let series: [Panel; 3] = [
        (
            "changes processed by merge per second",
            "changes/s",
            &throughput,
            BLUE,
        ),
        (
            "merge consumer lag (records not committed)",
            "records",
            &lag,
            RGBColor(200, 0, 0),
        ),
        ("daemon RSS", "MB", &rss, BLACK),
    ];
    for (i, (panel, (caption, unit, points, line))) in panels.iter().zip(series).enumerate() {
        let ymax = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .margin(12)
            .caption(caption, ("sans-serif", 20))
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc("seconds since traffic started")
            .y_desc(unit)
            .label_style(("sans-serif", 14))
            .draw()?;
        let mut labelled = std::collections::BTreeSet::new();
        for f in run.faults {
            let c = color(f.kind);
            let s = chart.draw_series(std::iter::once(Rectangle::new(
                [(f.start, 0.0), ((f.end).max(f.start + xmax / 400.0), ymax)],
                c.mix(0.35).filled(),
            )))?;
            if i == 0 && labelled.insert(f.kind) {
                s.label(f.kind.label()).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], c.filled())
                });
            }
        }
        let end = chart.draw_series(LineSeries::new(
            [(run.traffic_end, 0.0), (run.traffic_end, ymax)],
            BLACK.stroke_width(2),
        ))?;
        if i == 0 {
            end.label("traffic ends")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK.stroke_width(2)));
        }
        chart.draw_series(LineSeries::new(
            points.iter().copied(),
            line.stroke_width(2),
        ))?;
        if i == 0 {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .label_font(("sans-serif", 14))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
