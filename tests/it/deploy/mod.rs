//! The deployment artefacts — `Dockerfile`, `docker-compose.yml`, `deploy/` (Kubernetes,
//! systemd, Prometheus alerts, Grafana), `.github/workflows/ci.yml` — checked without any
//! service: each file is read by a real parser (YAML, JSON Schema, PromQL), every file they
//! reference exists, every metric they query is one the code exports, and every configuration
//! they hand to membersync is one the real binary accepts.

mod compose;
mod dockerfile;
mod kubernetes;
mod metrics;
mod monitoring;
mod systemd;
mod workflow;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::support::{membersync, repo_root};

fn path(relative: &str) -> PathBuf {
    repo_root().join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("read {relative}: {e}"))
}

/// Every document of a YAML file, as JSON values (what the JSON Schemas describe).
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            <Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{relative} is not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

fn yaml(relative: &str) -> Value {
    let mut docs = yaml_documents(relative);
    assert_eq!(docs.len(), 1, "{relative}: expected one YAML document");
    docs.remove(0)
}

fn json(relative: &str) -> Value {
    serde_json::from_str(&read(relative))
        .unwrap_or_else(|e| panic!("{relative} is not valid JSON: {e}"))
}

/// Validates `instance` against a JSON Schema; the panic lists every violation with its path.
fn assert_valid(schema: &Value, instance: &Value, what: &str) {
    let validator = jsonschema::validator_for(schema)
        .unwrap_or_else(|e| panic!("the schema for {what} does not compile: {e}"));
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} violates its schema:\n  {}",
        errors.join("\n  ")
    );
}

/// A container image reference has an explicit tag (or digest) that is not `latest`, and no
/// variable that could leave it open.
fn assert_pinned(image: &str, what: &str) {
    assert!(
        !image.contains('$'),
        "{what}: image {image} is not a literal"
    );
    if image.contains("@sha256:") {
        return;
    }
    let name = image.rsplit('/').next().unwrap_or(image);
    let tag = name.split_once(':').map(|(_, tag)| tag);
    assert!(
        matches!(tag, Some(t) if !t.is_empty() && t != "latest"),
        "{what}: image {image} must name an exact tag, not latest or none"
    );
}

/// Secret values that pass membersync's own checks, per `*_FILE` variable.
fn dummy_secret(env_name: &str) -> &'static str {
    if env_name.contains("MEMBERSTACK_WEBHOOK") {
        // Svix: whsec_ + standard base64 of at least 16 bytes.
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    } else if env_name.contains("STRIPE_WEBHOOK") {
        "whsec_test_secret"
    } else if env_name.ends_with("__URL_FILE") {
        "https://hook.eu1.make.com/not-a-real-token"
    } else {
        "not-a-real-secret"
    }
}

/// Runs the real binary with a deployment's configuration file and environment (every
/// `*_FILE` pointing at a throw-away file) and asserts that the configuration loads. The
/// command is `migrate` against a closed loopback port: it loads and validates the whole
/// configuration (an invalid one exits 2 before anything else) and then fails to connect
/// (exit 1), without reaching any real service.
fn assert_config_loads(what: &str, config_file: &Path, env: &[(String, String)]) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = membersync();
    cmd.arg("--config").arg(config_file).arg("migrate");
    for (name, value) in env {
        if name == "MEMBERSYNC_CONFIG" {
            continue; // replaced by --config above
        }
        if name.starts_with("MEMBERSYNC__") && name.ends_with("_FILE") {
            let file = dir.path().join(name);
            std::fs::write(&file, format!("{}\n", dummy_secret(name))).unwrap();
            cmd.env(name, &file);
        } else {
            cmd.env(name, value);
        }
    }
    cmd.env("MEMBERSYNC__DATABASE__HOST", "127.0.0.1")
        .env("MEMBERSYNC__DATABASE__PORT", "1")
        .env("MEMBERSYNC__DATABASE__CONNECT_TIMEOUT_SECS", "2");
    let out = cmd.output().expect("run membersync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: membersync should accept the configuration and then fail to connect; stderr:\n{stderr}"
    );
}

/// The GitHub-style anchors of a Markdown file's headings (lower-case, punctuation dropped,
/// spaces to dashes).
fn markdown_anchors(relative: &str) -> Vec<String> {
    read(relative)
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

const OPERATIONS_DOC: &str = "docs/operations.md";
