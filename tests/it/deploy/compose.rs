//! `docker-compose.yml`: valid under the Compose Specification's JSON Schema (vendored in
//! tests/fixtures/), every file it mounts or builds from exists, images are pinned, health
//! checks gate the start order, Postgres runs with wal_level=logical, and the configuration it
//! gives membersync is one the binary accepts.

use serde_json::{Map, Value};

use super::{assert_config_loads, assert_pinned, assert_valid, json, path, yaml};

const COMPOSE: &str = "docker-compose.yml";

fn compose() -> Value {
    yaml(COMPOSE)
}

fn services(compose: &Value) -> &Map<String, Value> {
    compose["services"].as_object().expect("services")
}

#[test]
fn compose_file_is_valid_under_the_compose_spec_schema() {
    assert_valid(
        &json("tests/fixtures/compose-spec.json"),
        &compose(),
        COMPOSE,
    );
}

#[test]
fn the_schema_check_is_not_vacuous() {
    let mut broken = compose();
    broken["services"]["db"]["helthcheck"] = Value::Bool(true);
    let schema = json("tests/fixtures/compose-spec.json");
    let validator = jsonschema::validator_for(&schema).unwrap();
    assert!(
        !validator.is_valid(&broken),
        "a misspelled key must be refused"
    );
}

#[test]
fn every_referenced_file_exists_and_every_image_is_pinned() {
    let compose = compose();
    for (name, service) in services(&compose) {
        let what = format!("{COMPOSE}: service {name}");
        if let Some(image) = service["image"].as_str() {
            if service.get("build").is_none() {
                assert_pinned(image, &what);
            }
        } else {
            assert!(
                service.get("build").is_some(),
                "{what}: neither image nor build"
            );
        }
        if let Some(build) = service.get("build") {
            let context = build["context"].as_str().unwrap_or(".");
            let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(path(context).is_dir(), "{what}: build context {context}");
            assert!(
                path(context).join(dockerfile).is_file(),
                "{what}: {dockerfile} in {context}"
            );
        }
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = match volume {
                Value::String(s) => s.split(':').next().unwrap().to_owned(),
                other => other["source"].as_str().unwrap_or_default().to_owned(),
            };
            if source.starts_with("./") || source.starts_with('/') {
                assert!(
                    path(&source).exists(),
                    "{what}: mounts {source}, which does not exist"
                );
            } else {
                assert!(
                    compose["volumes"].get(&source).is_some(),
                    "{what}: named volume {source} is not declared"
                );
            }
        }
        for kind in ["configs", "secrets"] {
            for entry in service[kind].as_array().into_iter().flatten() {
                let source = entry.as_str().or_else(|| entry["source"].as_str()).unwrap();
                assert!(
                    compose[kind].get(source).is_some(),
                    "{what}: {kind} {source} is not declared at the top level"
                );
            }
        }
    }
    for kind in ["configs", "secrets"] {
        for (name, def) in compose[kind].as_object().into_iter().flatten() {
            if let Some(file) = def["file"].as_str() {
                assert!(path(file).is_file(), "{kind} {name}: {file} does not exist");
            }
            if let Some(var) = def["environment"].as_str() {
                assert!(
                    super::read("deploy/compose/example.env").contains(&format!("\n{var}=")),
                    "{kind} {name}: {var} is not in deploy/compose/example.env"
                );
            }
        }
    }
}

#[test]
fn the_services_start_in_order_behind_health_checks() {
    let compose = compose();
    let services = services(&compose);
    for wanted in [
        "kafka",
        "db",
        "migrate",
        "membersync",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(wanted), "no {wanted} service");
    }
    assert!(
        services["kafka"]["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka:")
    );
    let kafka_env = &services["kafka"]["environment"];
    assert!(
        kafka_env["KAFKA_PROCESS_ROLES"]
            .as_str()
            .unwrap()
            .contains("controller"),
        "Kafka runs in KRaft mode"
    );
    assert!(
        services["db"]["image"]
            .as_str()
            .unwrap()
            .starts_with("supabase/postgres:")
    );

    for (name, service) in services {
        let deps = service["depends_on"].as_object().into_iter().flatten();
        for (dep, how) in deps {
            let dependency = &services[dep];
            match how["condition"].as_str() {
                Some("service_healthy") => assert!(
                    dependency["healthcheck"]["test"].is_array(),
                    "{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                ),
                Some("service_completed_successfully") => assert_eq!(
                    dependency["restart"], "no",
                    "{name} waits for {dep} to complete: {dep} is a one-shot"
                ),
                other => panic!("{name} → {dep}: condition {other:?} (wait for health instead)"),
            }
        }
        if service["restart"] != "no" {
            assert!(
                service["healthcheck"]["test"].is_array(),
                "long-running service {name} has no healthcheck"
            );
        }
    }
    let membersync_deps = services["membersync"]["depends_on"].as_object().unwrap();
    assert_eq!(
        membersync_deps["migrate"]["condition"],
        "service_completed_successfully"
    );
    for dep in ["db", "kafka"] {
        assert_eq!(membersync_deps[dep]["condition"], "service_healthy");
    }
    assert_eq!(
        services["migrate"]["depends_on"]["db"]["condition"],
        "service_healthy"
    );
    let healthcheck = services["membersync"]["healthcheck"]["test"].to_string();
    assert!(healthcheck.contains("/healthz"), "{healthcheck}");
}

#[test]
fn postgres_runs_with_logical_replication() {
    let compose = compose();
    let command: Vec<&str> = compose["services"]["db"]["command"]
        .as_array()
        .expect("db command as a list")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let settings: Vec<&str> = command
        .windows(2)
        .filter(|w| w[0] == "-c")
        .map(|w| w[1])
        .collect();
    assert!(settings.contains(&"wal_level=logical"), "{command:?}");
    assert!(
        settings
            .iter()
            .any(|s| s.starts_with("max_replication_slots=")),
        "{command:?}"
    );
}

#[test]
fn prometheus_and_grafana_get_the_rules_config_and_dashboards() {
    let compose = compose();
    let mounts = |service: &str| -> Vec<String> {
        compose["services"][service]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    };
    let prometheus = mounts("prometheus");
    assert!(
        prometheus
            .iter()
            .any(|m| m.starts_with("./deploy/prometheus/alerts.yml:/etc/prometheus/rules/"))
    );
    assert!(prometheus.iter().any(|m| {
        m.starts_with("./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml")
    }));
    let grafana = mounts("grafana");
    for dir in [
        "./deploy/grafana/provisioning/datasources:/etc/grafana/provisioning/datasources",
        "./deploy/grafana/provisioning/dashboards:/etc/grafana/provisioning/dashboards",
        "./deploy/grafana/dashboards:/var/lib/grafana/dashboards",
    ] {
        assert!(grafana.iter().any(|m| m.starts_with(dir)), "{dir}");
    }
}

/// The environment of a compose service as name/value pairs.
fn environment(service: &Value) -> Vec<(String, String)> {
    service["environment"]
        .as_object()
        .expect("environment as a map")
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect()
}

#[test]
fn membersync_accepts_the_configuration_compose_gives_it() {
    let compose = compose();
    let config_file = compose["configs"]["membersync_config"]["file"]
        .as_str()
        .unwrap();
    for name in ["migrate", "membersync"] {
        let service = &compose["services"][name];
        let env = environment(service);
        // Every secret file it reads is a secret the service mounts.
        let mounted: Vec<&str> = service["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        for (var, value) in &env {
            if var.ends_with("_FILE") {
                let secret = value
                    .strip_prefix("/run/secrets/")
                    .unwrap_or_else(|| panic!("{name}: {var}={value} is not a compose secret"));
                assert!(
                    mounted.contains(&secret),
                    "{name}: {var} needs secret {secret}"
                );
            }
        }
        let target = service["configs"][0]["target"].as_str().unwrap();
        assert!(
            env.contains(&("MEMBERSYNC_CONFIG".to_owned(), target.to_owned())),
            "{name}: MEMBERSYNC_CONFIG names the mounted config"
        );
        assert_config_loads(
            &format!("{COMPOSE} service {name}"),
            &path(config_file),
            &env,
        );
    }
}
