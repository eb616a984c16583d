//! What `/metrics` can contain, read from the source: every metric family membersync registers
//! with the `prometheus` crate (`src/**/*.rs`), with its labels; and the selectors a PromQL
//! expression uses, read with a real PromQL parser. Together they answer "does the code export
//! every series this alert or panel queries?".

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;

use promql_parser::label::MatchOp;
use promql_parser::parser::{self, Expr};
use promql_parser::util::{ExprVisitor, walk_expr};
use regex::Regex;

use super::path;

/// One registered metric family.
#[derive(Debug, Clone)]
pub(super) struct Family {
    pub labels: BTreeSet<String>,
    pub histogram: bool,
    /// Where it is registered (for messages).
    pub file: String,
}

/// Labels Prometheus adds to every scraped series (`job`, `instance`), and the target labels
/// the Kubernetes ServiceMonitor attaches (`role` from the pod's component, the rest by the
/// Prometheus operator).
pub(super) const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "role",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// Series of the `prometheus` crate's process collector (`ProcessCollector::for_self`, Linux):
/// registered by name inside the crate, so they cannot be found in membersync's source.
const PROCESS_SERIES: &[&str] = &[
    "process_cpu_seconds_total",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_resident_memory_bytes",
    "process_start_time_seconds",
    "process_threads",
];

pub(super) struct Exported {
    pub families: BTreeMap<String, Family>,
    process_collector: bool,
}

impl Exported {
    /// The labels a series name carries, or `None` if nothing exports it. Histograms expose
    /// `_bucket` (with `le`), `_sum` and `_count`; counters are exposed under the name they are
    /// registered with (the crate adds no `_total`).
    pub fn series_labels(&self, series: &str) -> Option<BTreeSet<String>> {
        let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        if series == "up" {
            return Some(labels);
        }
        if self.process_collector && PROCESS_SERIES.contains(&series) {
            return Some(labels);
        }
        if let Some(f) = self.families.get(series)
            && !f.histogram
        {
            labels.extend(f.labels.iter().cloned());
            return Some(labels);
        }
        for (suffix, extra) in [("_bucket", Some("le")), ("_sum", None), ("_count", None)] {
            if let Some(base) = series.strip_suffix(suffix)
                && let Some(f) = self.families.get(base)
                && f.histogram
            {
                labels.extend(f.labels.iter().cloned());
                labels.extend(extra.map(str::to_owned));
                return Some(labels);
            }
        }
        None
    }
}

/// Scans `src/` once.
pub(super) fn exported() -> &'static Exported {
    static EXPORTED: OnceLock<Exported> = OnceLock::new();
    EXPORTED.get_or_init(|| {
        let mut files = Vec::new();
        rust_files(&path("src"), &mut files);
        let mut families = BTreeMap::new();
        let mut process_collector = false;
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let rel = file
                .strip_prefix(path(""))
                .unwrap_or(&file)
                .display()
                .to_string();
            process_collector |= text.contains("ProcessCollector::for_self");
            for (name, family) in registrations(&text, &rel) {
                if let Some(previous) = families.insert(name.clone(), family) {
                    panic!("metric {name} is registered twice ({} and {rel})", previous.file);
                }
            }
        }
        assert!(
            families.len() > 20,
            "the scan found only {} metric families in src/: has the way metrics are registered changed?",
            families.len()
        );
        Exported {
            families,
            process_collector,
        }
    })
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The metric families a source file registers: the name literal given to a metric
/// constructor (`Opts::new`, `HistogramOpts::new`, `IntCounter::new`, `IntGauge::new`,
/// `Desc::new`, the `opts!`/`register_*!` macros), and the label names of the `&["…"]` that
/// follows it within the same statement.
fn registrations(text: &str, file: &str) -> Vec<(String, Family)> {
    static CONSTRUCTOR: OnceLock<Regex> = OnceLock::new();
    static LABELS: OnceLock<Regex> = OnceLock::new();
    let constructor = CONSTRUCTOR.get_or_init(|| {
        Regex::new(
            r#"(?x)
            \b(?P<kind>HistogramOpts|Opts|IntCounter|IntGauge|Counter|Gauge|Desc)::new\(\s*
              "(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
            | \b(?P<macro>histogram_opts|opts|register_[a-z_]+)!\(\s*
              "(?P<mname>[a-zA-Z_:][a-zA-Z0-9_:]*)"
            "#,
        )
        .unwrap()
    });
    let labels_re = LABELS
        .get_or_init(|| Regex::new(r#"^&\[\s*((?:"[a-zA-Z_][a-zA-Z0-9_]*"\s*,?\s*)+)\]"#).unwrap());
    let quoted = Regex::new(r#""([a-zA-Z_][a-zA-Z0-9_]*)""#).unwrap();

    let matches: Vec<_> = constructor.captures_iter(text).collect();
    let mut out = Vec::new();
    for (i, caps) in matches.iter().enumerate() {
        let whole = caps.get(0).unwrap();
        let (name, histogram) = match (caps.name("name"), caps.name("mname")) {
            (Some(n), _) => (n.as_str(), &caps["kind"] == "HistogramOpts"),
            (None, Some(n)) => (n.as_str(), caps["macro"].contains("histogram")),
            (None, None) => unreachable!(),
        };
        let window_end = matches
            .get(i + 1)
            .map(|m| m.get(0).unwrap().start())
            .unwrap_or(text.len());
        let statement = until_statement_end(&text[whole.end()..window_end]);
        // The label list, if any: the first `&[` of string literals in the statement.
        let labels = statement
            .match_indices("&[")
            .find_map(|(at, _)| labels_re.captures(&statement[at..]))
            .map(|c| {
                quoted
                    .captures_iter(&c[1])
                    .map(|q| q[1].to_owned())
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            name.to_owned(),
            Family {
                labels,
                histogram,
                file: file.to_owned(),
            },
        ));
    }
    out
}

/// `text` up to its first `;` outside string literals.
fn until_statement_end(text: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            ';' if !in_string => return &text[..i],
            _ => {}
        }
    }
    text
}

/// A metric selector of a PromQL expression: the metric name and the label names it matches on.
#[derive(Debug)]
pub(super) struct Selector {
    pub name: String,
    pub labels: Vec<String>,
}

/// Parses `expr` with promql-parser and returns its selectors.
pub(super) fn selectors(expr: &str) -> Result<Vec<Selector>, String> {
    struct Collect(Vec<Selector>);
    impl ExprVisitor for Collect {
        type Error = String;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
            let vs = match e {
                Expr::VectorSelector(vs) => vs,
                Expr::MatrixSelector(ms) => &ms.vs,
                _ => return Ok(true),
            };
            let matchers = vs
                .matchers
                .matchers
                .iter()
                .chain(vs.matchers.or_matchers.iter().flatten());
            let mut name = vs.name.clone();
            let mut labels = Vec::new();
            for m in matchers {
                if m.name == "__name__" {
                    match m.op {
                        MatchOp::Equal => name = Some(m.value.clone()),
                        _ => {
                            return Err(format!(
                                "a regex metric name ({}) cannot be checked",
                                m.value
                            ));
                        }
                    }
                } else {
                    labels.push(m.name.clone());
                }
            }
            let name = name.ok_or("a selector without a metric name cannot be checked")?;
            self.0.push(Selector { name, labels });
            Ok(true)
        }
    }
    let ast = parser::parse(expr)?;
    let mut collect = Collect(Vec::new());
    walk_expr(&mut collect, &ast)?;
    Ok(collect.0)
}

/// Checks one PromQL expression against what the code exports; returns the problems.
pub(super) fn check_expr(expr: &str) -> Vec<String> {
    let selectors = match selectors(expr) {
        Ok(s) => s,
        Err(e) => return vec![format!("does not parse as PromQL: {e}")],
    };
    if selectors.is_empty() {
        return vec!["queries no metric".to_owned()];
    }
    let exported = exported();
    let mut problems = Vec::new();
    for s in selectors {
        match exported.series_labels(&s.name) {
            None => problems.push(format!(
                "queries {}, which membersync does not export (no such metric registered in src/)",
                s.name
            )),
            Some(known) => {
                for label in s.labels.iter().filter(|l| !known.contains(*l)) {
                    problems.push(format!(
                        "matches label `{label}` of {}, which has only {:?}",
                        s.name, known
                    ));
                }
            }
        }
    }
    problems
}

#[test]
fn the_source_scan_finds_metrics_with_their_labels_and_kinds() {
    let exported = exported();
    let requests = &exported.families["membersync_ingest_requests_total"];
    assert_eq!(
        requests.labels,
        ["reason", "source", "status"].map(String::from).into()
    );
    assert!(!requests.histogram);
    assert!(exported.families["membersync_merge_apply_seconds"].histogram);
    assert!(exported.families["membersync_cdc_leader"].labels.is_empty());
    assert!(
        exported
            .series_labels("membersync_merge_apply_seconds_bucket")
            .unwrap()
            .contains("le")
    );
    assert!(
        exported
            .series_labels("membersync_merge_apply_seconds")
            .is_none()
    );
    assert!(
        exported
            .series_labels("membersync_cdc_leader_total")
            .is_none()
    );
    assert!(
        exported
            .series_labels("process_resident_memory_bytes")
            .is_some()
    );
}

#[test]
fn the_promql_check_rejects_unknown_metrics_and_labels() {
    assert!(
        check_expr("sum(rate(membersync_ingest_requests_total{status=~\"5..\"}[5m]))").is_empty()
    );
    let unknown = check_expr("membersync_no_such_metric > 0");
    assert!(
        unknown[0].contains("membersync_no_such_metric"),
        "{unknown:?}"
    );
    let label = check_expr("membersync_cdc_leader{slot=\"x\"}");
    assert!(label[0].contains("`slot`"), "{label:?}");
    assert!(
        check_expr("sum(")
            .first()
            .unwrap()
            .contains("does not parse")
    );
}
