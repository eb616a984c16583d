//! The Prometheus alert rules and the Grafana dashboard: every expression parses as PromQL and
//! queries only series membersync exports (with labels it has); every alert has a severity, a
//! summary and a runbook entry in docs/operations.md; the dashboard and the provisioning files
//! fit together.

use regex::Regex;
use serde_json::Value;

use super::metrics::check_expr;
use super::{OPERATIONS_DOC, json, markdown_anchors, path, yaml};

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const DASHBOARD: &str = "deploy/grafana/dashboards/membersync.json";

fn alert_rules() -> Vec<Value> {
    let doc = yaml(ALERTS);
    let groups = doc["groups"].as_array().expect("alerts.yml: groups");
    assert!(!groups.is_empty());
    groups
        .iter()
        .flat_map(|g| {
            assert!(g["name"].is_string(), "every group is named");
            g["rules"].as_array().expect("group rules").clone()
        })
        .collect()
}

#[test]
fn every_alert_queries_exported_metrics_and_has_a_runbook() {
    let anchors = markdown_anchors(OPERATIONS_DOC);
    let duration = Regex::new(r"^[0-9]+(ms|s|m|h|d|w|y)$").unwrap();
    let mut problems = Vec::new();
    let mut names = Vec::new();
    for rule in alert_rules() {
        let name = rule["alert"]
            .as_str()
            .expect("only alerting rules here")
            .to_owned();
        let expr = rule["expr"].as_str().expect("expr");
        for p in check_expr(expr) {
            problems.push(format!("{name}: {p}"));
        }
        if let Some(d) = rule.get("for") {
            let d = d.as_str().unwrap_or_default();
            if !duration.is_match(d) {
                problems.push(format!("{name}: `for: {d}` is not a Prometheus duration"));
            }
        }
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        if !["critical", "warning", "info"].contains(&severity) {
            problems.push(format!("{name}: severity `{severity}`"));
        }
        if rule["annotations"]["summary"]
            .as_str()
            .is_none_or(str::is_empty)
        {
            problems.push(format!("{name}: no summary"));
        }
        let expected = format!("{OPERATIONS_DOC}#{}", name.to_lowercase());
        if rule["annotations"]["runbook"].as_str() != Some(expected.as_str()) {
            problems.push(format!("{name}: runbook annotation should be {expected}"));
        }
        if !anchors.contains(&name.to_lowercase()) {
            problems.push(format!(
                "{name}: no `### {name}` runbook entry in {OPERATIONS_DOC}"
            ));
        }
        names.push(name);
    }
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        names.len(),
        "alert names are unique: {names:?}"
    );
    assert!(
        problems.is_empty(),
        "{ALERTS}:\n  {}",
        problems.join("\n  ")
    );

    // What the alerting contract promises (docs/operations.md#alerts), by the metric it watches.
    let text = super::read(ALERTS);
    for metric in [
        "membersync_cdc_slot_lag_bytes",
        "membersync_cdc_slot_lost",
        "membersync_cdc_leader",
        "membersync_merge_dead_letters_total",
        "membersync_bridge_dead_letters_total",
        "membersync_ingest_requests_total",
        "membersync_kafka_consumer_lag",
        "membersync_memberstack_rate_limited_total",
        "membersync_cdc_slot_safe_wal_size_bytes",
        "membersync_cdc_slot_wal_status",
        "membersync_dlq_unreplayed",
    ] {
        assert!(text.contains(metric), "no alert watches {metric}");
    }
}

/// Grafana's variables, replaced by values that make the expression plain PromQL.
fn without_grafana_variables(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    Regex::new(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?")
        .unwrap()
        .replace_all(&expr, ".*")
        .into_owned()
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(nested) = p["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

#[test]
fn every_dashboard_query_is_promql_over_exported_metrics() {
    let dashboard = json(DASHBOARD);
    assert_eq!(dashboard["uid"], "membersync");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(variables.contains(&"datasource"), "{variables:?}");

    let mut problems = Vec::new();
    let mut ids = Vec::new();
    let mut rows = Vec::new();
    let mut queries = 0;
    for panel in panels(&dashboard) {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        ids.push(panel["id"].as_u64().expect("panel id"));
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        if x + w > 24 {
            problems.push(format!("{title}: wider than the grid"));
        }
        if panel["type"] == "row" {
            rows.push(title.to_owned());
            continue;
        }
        if panel["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "{title}: datasource is not the $datasource variable"
            ));
        }
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if targets.is_empty() {
            problems.push(format!("{title}: no query"));
        }
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_default();
            queries += 1;
            for p in check_expr(&without_grafana_variables(expr)) {
                problems.push(format!("{title}: `{expr}` {p}"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD}:\n  {}",
        problems.join("\n  ")
    );
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "panel ids are unique");
    for wanted in ["CDC", "Ingest", "Merge", "Memberstack", "PostHog"] {
        assert!(
            rows.iter().any(|r| r.contains(wanted)),
            "no {wanted} row in {rows:?}"
        );
    }
    assert!(queries > 30, "only {queries} queries");

    // The instance variable's query names a metric too.
    let label_values = Regex::new(r"label_values\(([a-z_:][a-z0-9_:]*)").unwrap();
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(def) = v["definition"].as_str() {
            let metric = label_values
                .captures(def)
                .map(|c| c[1].to_owned())
                .expect("a label_values() query");
            assert!(check_expr(&metric).is_empty(), "variable query {def}");
        }
    }
}

#[test]
fn grafana_provisioning_points_at_the_dashboard_and_prometheus_loads_the_rules() {
    let datasources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let ds = &datasources["datasources"][0];
    assert_eq!(ds["type"], "prometheus");
    assert_eq!(ds["url"], "http://prometheus:9090");

    let providers = yaml("deploy/grafana/provisioning/dashboards/membersync.yml");
    assert_eq!(
        providers["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );

    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(
        prometheus["rule_files"][0], "/etc/prometheus/rules/*.yml",
        "the compose file mounts alerts.yml under /etc/prometheus/rules/"
    );
    let scrape = &prometheus["scrape_configs"][0];
    assert!(scrape["job_name"].as_str().unwrap().contains("membersync"));
    assert_eq!(scrape["static_configs"][0]["targets"][0], "membersync:9464");
    assert!(path(DASHBOARD).is_file());
}

/// Runs Prometheus' own `promtool` (Debian package `prometheus`, installed by `.ci/run`).
fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(path(""))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run promtool ({e}): install it (apt-get install prometheus; .ci/run does)"
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn promtool_accepts_the_rules_and_config_and_the_rule_unit_tests_pass() {
    promtool(&["check", "rules", ALERTS]);
    promtool(&[
        "check",
        "config",
        "--syntax-only",
        "deploy/prometheus/prometheus.yml",
    ]);
    // Alert behaviour: leader-only lag, no leader (also with no CDC scraped), the 5xx ratio,
    // dead letters, consumer lag, 429s (deploy/prometheus/alerts.test.yml).
    let out = promtool(&["test", "rules", "deploy/prometheus/alerts.test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}
