//! `deploy/kubernetes/`: every object is valid under the Kubernetes v1.30 OpenAPI schemas
//! (strict: an unknown or misspelled field is an error; vendored in tests/fixtures/), and the
//! objects fit together: the roles' Deployments (CDC with a hot standby), probes on /healthz and
//! /readyz, non-root pods with limits, the Services, PodDisruptionBudgets and ServiceMonitor
//! select what they should, and each role's configuration loads in the real binary.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{assert_config_loads, assert_pinned, assert_valid, json, path, yaml, yaml_documents};

const DIR: &str = "deploy/kubernetes";
/// One Deployment per role.
const ROLES: [&str; 4] = ["cdc", "ingest", "merge", "bridge"];
const SCHEMAS: &str = "tests/fixtures/kubernetes-v1.30-strict.json";

/// Every object of every manifest, with the file it is in.
fn objects() -> Vec<(String, Value)> {
    let mut files: Vec<String> = std::fs::read_dir(path(DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    files.sort();
    files
        .into_iter()
        .flat_map(|f| {
            let rel = format!("{DIR}/{f}");
            yaml_documents(&rel)
                .into_iter()
                .map(move |o| (f.clone(), o))
        })
        .collect()
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in {DIR}"))
}

/// The schema of an object's apiVersion and kind, from the vendored definitions.
fn schema_for(definitions: &Value, object: &Value) -> Option<Value> {
    let (api_version, kind) = (object["apiVersion"].as_str()?, object["kind"].as_str()?);
    let name = definitions["$defs"]
        .as_object()?
        .iter()
        .find_map(|(name, def)| {
            def["x-kubernetes-group-version-kind"]
                .as_array()?
                .iter()
                .any(|gvk| {
                    let group = gvk["group"].as_str().unwrap_or_default();
                    let version = gvk["version"].as_str().unwrap_or_default();
                    let av = if group.is_empty() {
                        version.to_owned()
                    } else {
                        format!("{group}/{version}")
                    };
                    av == api_version && gvk["kind"] == kind
                })
                .then(|| name.clone())
        })?;
    let mut schema = definitions.clone();
    schema["$ref"] = Value::String(format!("#/$defs/{name}"));
    Some(schema)
}

#[test]
fn every_object_is_valid_under_the_kubernetes_schemas() {
    let definitions = json(SCHEMAS);
    let mut kinds = Vec::new();
    for (file, object) in objects() {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let what = format!("{DIR}/{file}: {kind} {}", object["metadata"]["name"]);
        match schema_for(&definitions, &object) {
            Some(schema) => assert_valid(&schema, &object, &what),
            // The Prometheus operator's CRDs are checked by hand below.
            None => assert!(
                kind == "ServiceMonitor" || kind == "PrometheusRule",
                "{what}: no schema for this kind"
            ),
        }
        kinds.push(kind);
    }
    for wanted in [
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "Job",
    ] {
        assert!(kinds.iter().any(|k| k == wanted), "no {wanted} in {DIR}");
    }
}

#[test]
fn the_schema_check_is_not_vacuous() {
    let definitions = json(SCHEMAS);
    let objects = objects();
    let mut deployment = find(&objects, "Deployment", "membersync-cdc").clone();
    deployment["spec"]["replcas"] = Value::from(2);
    let schema = schema_for(&definitions, &deployment).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    assert!(
        !validator.is_valid(&deployment),
        "a misspelled field must be refused"
    );
}

#[test]
fn kustomization_lists_every_manifest_but_the_secret_template() {
    let kustomization = yaml(&format!("{DIR}/kustomization.yaml"));
    let resources: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut files: Vec<String> = objects().into_iter().map(|(f, _)| f).collect();
    files.dedup();
    for file in &files {
        let listed = resources.contains(&file.as_str());
        assert_eq!(
            listed,
            file != "secret.example.yaml",
            "{file}: listed in kustomization.yaml = {listed}"
        );
    }
    for r in resources {
        assert!(
            path(DIR).join(r).is_file(),
            "kustomization lists {r}, which does not exist"
        );
    }
}

fn labels(selector: &Value) -> BTreeMap<String, String> {
    selector
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

fn selects(selector: &Value, target_labels: &Value) -> bool {
    let target = labels(target_labels);
    labels(selector)
        .iter()
        .all(|(k, v)| target.get(k) == Some(v))
}

/// Checks the pod template every role shares: the command, probes, security and resources.
fn check_pod(what: &str, pod: &Value, role: &str, probes: bool) {
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "{what}: runAsNonRoot");
    let uid = security["runAsUser"].as_u64().expect("numeric runAsUser");
    assert!(uid > 0, "{what}: runAsUser {uid}");
    assert_eq!(pod["automountServiceAccountToken"], false, "{what}");

    for init in pod["initContainers"].as_array().into_iter().flatten() {
        let sc = &init["securityContext"];
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}: init");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}: init");
        assert!(
            init["resources"]["limits"]["memory"].is_string(),
            "{what}: init"
        );
    }
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{what}: one container");
    let c = &containers[0];
    assert_pinned(c["image"].as_str().unwrap(), what);
    assert_eq!(
        c["args"],
        serde_json::json!([role]),
        "{what}: runs `membersync {role}`"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "{what}"
    );
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][resource].is_string(),
                "{what}: resources.{kind}.{resource}"
            );
        }
    }
    if probes {
        let ports: Vec<&str> = c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        for (probe, path) in [
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
            ("startupProbe", "/healthz"),
        ] {
            let get = &c[probe]["httpGet"];
            assert_eq!(get["path"], path, "{what}: {probe}");
            let port = get["port"].as_str().unwrap();
            assert!(
                ports.contains(&port),
                "{what}: {probe} port {port} is not declared"
            );
        }
    }
    // Mounted secret keys are keys of the Secret, and each *_FILE points into a mount.
    let secret = yaml(&format!("{DIR}/secret.example.yaml"));
    let volumes = pod["volumes"].as_array().unwrap();
    for v in volumes.iter().filter(|v| v.get("secret").is_some()) {
        assert_eq!(
            v["secret"]["secretName"], secret["metadata"]["name"],
            "{what}"
        );
        for item in v["secret"]["items"].as_array().unwrap() {
            let key = item["key"].as_str().unwrap();
            assert!(
                secret["stringData"].get(key).is_some(),
                "{what}: mounts key {key}, which secret.example.yaml does not have"
            );
        }
    }
    for v in volumes.iter().filter(|v| v.get("configMap").is_some()) {
        assert_eq!(v["configMap"]["name"], "membersync-config", "{what}");
    }
}

fn container_env(pod: &Value) -> Vec<(String, String)> {
    pod["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().expect("plain env values").to_owned(),
            )
        })
        .collect()
}

#[test]
fn roles_run_as_deployments_with_probes_security_and_disruption_budgets() {
    let objects = objects();
    let pdbs: Vec<&Value> = objects
        .iter()
        .map(|(_, o)| o)
        .filter(|o| o["kind"] == "PodDisruptionBudget")
        .collect();
    for role in ROLES {
        let name = format!("membersync-{role}");
        let deployment = find(&objects, "Deployment", &name);
        let spec = &deployment["spec"];
        let pod_labels = &spec["template"]["metadata"]["labels"];
        assert!(
            selects(&spec["selector"]["matchLabels"], pod_labels),
            "{name}: selector matches its pods"
        );
        assert_eq!(pod_labels["app.kubernetes.io/component"], role);
        check_pod(&name, &spec["template"]["spec"], role, true);
        let replicas = spec["replicas"].as_u64().unwrap();
        if role == "cdc" {
            assert_eq!(replicas, 2, "CDC: one leader and one hot standby");
        } else {
            assert!(replicas >= 2, "{name}: {replicas} replicas");
        }
        let grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap();
        assert!(
            grace > 30,
            "{name}: grace {grace}s must exceed the 30 s drain"
        );
        assert!(
            pdbs.iter()
                .any(|p| selects(&p["spec"]["selector"]["matchLabels"], pod_labels)),
            "{name}: no PodDisruptionBudget selects its pods"
        );
    }
    let job = find(&objects, "Job", "membersync-migrate");
    check_pod(
        "membersync-migrate",
        &job["spec"]["template"]["spec"],
        "migrate",
        false,
    );
}

#[test]
fn services_and_the_service_monitor_select_the_right_pods_and_ports() {
    let objects = objects();
    let ingest = find(&objects, "Service", "membersync-ingest");
    let ingest_pods = &find(&objects, "Deployment", "membersync-ingest")["spec"]["template"];
    assert!(selects(
        &ingest["spec"]["selector"],
        &ingest_pods["metadata"]["labels"]
    ));
    let container_ports: Vec<&Value> = ingest_pods["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["name"])
        .collect();
    for p in ingest["spec"]["ports"].as_array().unwrap() {
        assert!(
            container_ports.contains(&&p["targetPort"]),
            "ingest Service port {p}"
        );
    }

    let metrics = find(&objects, "Service", "membersync-metrics");
    for role in ROLES {
        let pods = &find(&objects, "Deployment", &format!("membersync-{role}"))["spec"]["template"];
        assert!(
            selects(&metrics["spec"]["selector"], &pods["metadata"]["labels"]),
            "the metrics Service selects the {role} pods"
        );
    }
    let monitor = find(&objects, "ServiceMonitor", "membersync");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert!(
        selects(
            &monitor["spec"]["selector"]["matchLabels"],
            &metrics["metadata"]["labels"]
        ),
        "the ServiceMonitor selects the metrics Service"
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    assert!(
        metrics["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == endpoint["port"]),
        "the ServiceMonitor's port is a port of the metrics Service"
    );
}

#[test]
fn the_secret_template_holds_placeholders_only() {
    let secret = yaml(&format!("{DIR}/secret.example.yaml"));
    for (key, value) in secret["stringData"].as_object().unwrap() {
        assert_eq!(value, "REPLACE_ME", "secret.example.yaml: {key}");
    }
}

#[test]
fn membersync_accepts_each_roles_configuration() {
    let objects = objects();
    let config = find(&objects, "ConfigMap", "membersync-config");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("membersync.toml");
    std::fs::write(&file, config["data"]["membersync.toml"].as_str().unwrap()).unwrap();
    let mut pods: Vec<(String, &Value)> = ROLES
        .iter()
        .map(|role| {
            let name = format!("membersync-{role}");
            let pod = &find(&objects, "Deployment", &name)["spec"]["template"]["spec"];
            (name, pod)
        })
        .collect();
    pods.push((
        "membersync-migrate".into(),
        &find(&objects, "Job", "membersync-migrate")["spec"]["template"]["spec"],
    ));
    for (name, pod) in pods {
        let mut env = container_env(pod);
        // The initContainer loads the same file with its own environment.
        for init in pod["initContainers"].as_array().into_iter().flatten() {
            for e in init["env"].as_array().unwrap() {
                let pair = (
                    e["name"].as_str().unwrap().to_owned(),
                    e["value"].as_str().unwrap().to_owned(),
                );
                if !env.contains(&pair) {
                    env.push(pair);
                }
            }
        }
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "secrets")
            .map(|m| m["mountPath"].as_str().unwrap().to_owned())
            .unwrap();
        let mounted: Vec<String> = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["name"] == "secrets")
            .flat_map(|v| v["secret"]["items"].as_array().unwrap())
            .map(|i| format!("{mount}/{}", i["path"].as_str().unwrap()))
            .collect();
        for (var, value) in env.iter().filter(|(v, _)| v.ends_with("_FILE")) {
            assert!(
                mounted.contains(value),
                "{name}: {var}={value} is not a mounted secret file ({mounted:?})"
            );
        }
        assert_config_loads(&format!("{DIR} {name}"), &file, &env);
    }
}

/// The pod's environment: container variables, by name.
fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

#[test]
fn roles_that_use_postgres_start_only_after_the_migrations() {
    let objects = objects();
    let job = find(&objects, "Job", "membersync-migrate");
    let job_container = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(job_container["args"], serde_json::json!(["migrate"]));
    let mut gated = Vec::new();
    for role in ROLES {
        let pod = &find(&objects, "Deployment", &format!("membersync-{role}"))["spec"]["template"]
            ["spec"];
        let main = &pod["containers"][0];
        let uses_postgres = env_value(main, "MEMBERSYNC__DATABASE__PASSWORD_FILE").is_some();
        let waits: Vec<&Value> = pod["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["args"] == serde_json::json!(["migrate", "--wait"]))
            .collect();
        if !uses_postgres {
            continue;
        }
        assert_eq!(
            waits.len(),
            1,
            "{role}: a role with database access waits for the migrations (initContainer `migrate --wait`)"
        );
        let wait = waits[0];
        assert_eq!(wait["image"], main["image"], "{role}: the same image");
        assert_eq!(
            env_value(wait, "MEMBERSYNC__DATABASE__PASSWORD_FILE"),
            env_value(main, "MEMBERSYNC__DATABASE__PASSWORD_FILE"),
            "{role}: waits as the role's own database user"
        );
        assert!(
            env_value(wait, "MEMBERSYNC__DATABASE__ADMIN_PASSWORD_FILE").is_none(),
            "{role}: only the Job holds the owner's password"
        );
        gated.push(role);
    }
    assert!(
        gated.contains(&"cdc") && gated.contains(&"merge"),
        "{gated:?}"
    );
    // Roles by duty (V14): merge logs in as its own role, not as CDC's replication role.
    let merge = &find(&objects, "Deployment", "membersync-merge")["spec"]["template"]["spec"];
    for c in [&merge["containers"][0], &merge["initContainers"][0]] {
        assert_eq!(
            env_value(c, "MEMBERSYNC__DATABASE__USER"),
            Some("membersync_merge")
        );
    }
}

/// The configuration file of the ConfigMap, loaded by membersync itself (no environment).
fn configmap_config() -> membersync::config::Config {
    let objects = objects();
    let config = find(&objects, "ConfigMap", "membersync-config");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("membersync.toml");
    std::fs::write(&file, config["data"]["membersync.toml"].as_str().unwrap()).unwrap();
    membersync::config::load_from(Some(&file), "MEMBERSYNC_K8S_TEST_UNSET__")
        .expect("the ConfigMap's file loads")
}

/// Kubernetes memory quantity in bytes (`512Mi`, `1Gi`, `256M`).
fn quantity(q: &str) -> u64 {
    let (number, unit) = q.split_at(q.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(q.len()));
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("quantity {q}"));
    n * match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        other => panic!("unit {other} in {q}"),
    }
}

/// What a role's process holds besides its buffers: the runtime, TLS, librdkafka's threads
/// and metadata, the metric registry (docs/operations.md#memory-limits).
const BASE_BYTES: u64 = 96 << 20;
/// librdkafka's bookkeeping per queued record (beyond the payload `kbytes` counts).
const PER_QUEUED_RECORD: u64 = 256;

#[test]
fn memory_limits_cover_the_configured_buffers() {
    let c = configmap_config();
    let prop = |name: &str| -> u64 {
        c.kafka
            .librdkafka
            .get(name)
            .unwrap_or_else(|| panic!("configmap.yaml: [kafka.librdkafka] sets no {name:?}: the memory limits are sized from it"))
            .parse()
            .unwrap()
    };
    let producer = prop("queue.buffering.max.kbytes") * 1024
        + prop("queue.buffering.max.messages") * PER_QUEUED_RECORD;
    let consumer = prop("queued.max.messages.kbytes") * 1024 + prop("fetch.max.bytes");
    let bodies = (c.ingest.concurrency_limit * c.ingest.body_limit_bytes) as u64;
    let objects = objects();
    for role in ROLES {
        // Each role has one producer; merge and bridge one consumer; ingest holds bodies.
        let budget = BASE_BYTES
            + producer
            + if matches!(role, "merge" | "bridge") {
                consumer
            } else {
                0
            }
            + if role == "ingest" { bodies } else { 0 };
        let resources = &find(&objects, "Deployment", &format!("membersync-{role}"))["spec"]["template"]
            ["spec"]["containers"][0]["resources"];
        let limit = quantity(resources["limits"]["memory"].as_str().unwrap());
        let request = quantity(resources["requests"]["memory"].as_str().unwrap());
        let mib = |b: u64| b >> 20;
        assert!(
            limit >= budget && limit <= budget * 2,
            "{role}: memory limit {} MiB should cover the {} MiB of buffers and base, without \
             being more than twice that",
            mib(limit),
            mib(budget)
        );
        assert!(request <= limit, "{role}: request above the limit");
    }
}

#[test]
fn the_member_api_is_off_or_configured_with_its_audience_and_database() {
    let c = configmap_config();
    if !c.api.enabled {
        return;
    }
    assert!(c.api.audience.is_some(), "api.enabled without api.audience");
    let objects = objects();
    let ingest = &find(&objects, "Deployment", "membersync-ingest")["spec"]["template"]["spec"]["containers"]
        [0];
    assert!(
        env_value(ingest, "MEMBERSYNC__DATABASE__PASSWORD_FILE").is_some(),
        "the API reads the database: the ingest pods need its password"
    );
}

/// `deploy/kubernetes/prometheusrule.yaml` as generated from `deploy/prometheus/alerts.yml`:
/// a header, then the rules file's `groups` under `spec`, comments and all.
fn generated_prometheus_rule() -> String {
    const HEADER: &str = "\
# GENERATED from deploy/prometheus/alerts.yml — do not edit here. The Prometheus operator's form
# of the same rules; tests/it/deploy/ checks that the two are equal and rewrites this file when
# run with MEMBERSYNC_UPDATE_DEPLOY=1.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: membersync
  labels:
    app.kubernetes.io/name: membersync
spec:
";
    let alerts = super::read("deploy/prometheus/alerts.yml");
    let start = alerts.find("\ngroups:").expect("alerts.yml: groups") + 1;
    let mut out = HEADER.to_owned();
    for line in alerts[start..].split_inclusive('\n') {
        if !line.trim().is_empty() {
            out.push_str("  ");
        }
        out.push_str(line);
    }
    out
}

#[test]
fn the_prometheus_rule_is_alerts_yml() {
    const RULE: &str = "deploy/kubernetes/prometheusrule.yaml";
    let expected = generated_prometheus_rule();
    if std::env::var_os("MEMBERSYNC_UPDATE_DEPLOY").is_some() {
        std::fs::write(path(RULE), &expected).unwrap();
    }
    assert!(
        super::read(RULE) == expected,
        "{RULE} differs from deploy/prometheus/alerts.yml: run this test with MEMBERSYNC_UPDATE_DEPLOY=1"
    );
    // And as data: the operator gets exactly the groups promtool tested.
    let rule = yaml(RULE);
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(
        rule["spec"]["groups"],
        yaml("deploy/prometheus/alerts.yml")["groups"]
    );
    // The kustomization ships it, with the ServiceMonitor.
    let kustomization = yaml(&format!("{DIR}/kustomization.yaml"));
    assert!(
        kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "prometheusrule.yaml")
    );
}
