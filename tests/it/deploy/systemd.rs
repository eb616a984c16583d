//! `deploy/systemd/membersync.service`: the unit parses, is hardened, passes every secret as a
//! credential, and the configuration it gives membersync (the example file it installs plus its
//! environment) is one the binary accepts.

use std::collections::BTreeMap;

use super::{assert_config_loads, path, read};

const UNIT: &str = "deploy/systemd/membersync.service";

/// A systemd unit as section → key → values (keys may repeat). Comments, blank lines and line
/// continuations follow systemd.syntax(7).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current: Option<String> = None;
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';'))
        {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(
                !sections.contains_key(name),
                "{UNIT}: section [{name}] twice"
            );
            sections.insert(name.to_owned(), BTreeMap::new());
            current = Some(name.to_owned());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{UNIT}: `{line}` is neither a section nor key=value"));
        let section = current
            .as_ref()
            .unwrap_or_else(|| panic!("{UNIT}: `{line}` before any section"));
        sections
            .get_mut(section)
            .unwrap()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    assert!(pending.is_empty(), "{UNIT}: ends inside a continuation");
    sections
}

#[test]
fn systemd_unit_is_hardened_and_restarts_on_failure() {
    let unit = parse_unit(&read(UNIT));
    let one = |section: &str, key: &str| -> String {
        let values = unit[section]
            .get(key)
            .unwrap_or_else(|| panic!("{UNIT}: [{section}] has no {key}="));
        values.last().unwrap().clone()
    };
    assert!(!one("Unit", "Description").is_empty());
    assert!(one("Unit", "After").contains("network-online.target"));
    let exec = one("Service", "ExecStart");
    assert!(
        exec.starts_with("/") && exec.contains("membersync") && exec.ends_with(" run"),
        "ExecStart={exec}"
    );
    for (key, value) in [
        ("Restart", "on-failure"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("DynamicUser", "yes"),
        ("RestartPreventExitStatus", "2"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert_eq!(one("Service", key), value, "[Service] {key}");
    }
    let stop = one("Service", "TimeoutStopSec");
    let secs: u64 = stop.trim_end_matches('s').parse().unwrap();
    assert!(
        secs > 30,
        "TimeoutStopSec={stop} must exceed the 30 s drain"
    );
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");

    // Every secret comes through LoadCredential=, and every credential is used.
    let credentials: Vec<String> = unit["Service"]["LoadCredential"]
        .iter()
        .map(|c| {
            c.split_once(':')
                .expect("LoadCredential=ID:PATH")
                .0
                .to_owned()
        })
        .collect();
    let files: Vec<(String, String)> = unit["Service"]["Environment"]
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .filter(|(k, _)| k.ends_with("_FILE"))
        .collect();
    assert_eq!(files.len(), credentials.len(), "one *_FILE per credential");
    for (var, value) in &files {
        let id = value
            .strip_prefix("%d/")
            .unwrap_or_else(|| panic!("{var}={value}: not in the credentials directory (%d)"));
        assert!(
            credentials.iter().any(|c| c == id),
            "{var}: no LoadCredential={id}"
        );
    }
    assert!(
        !unit["Service"]["Environment"].iter().any(|e| !e
            .split_once('=')
            .unwrap()
            .0
            .ends_with("_FILE")
            && e.starts_with("MEMBERSYNC__")
            && (e.contains("PASSWORD=") || e.contains("KEY=") || e.contains("SECRETS="))),
        "no secret value in the unit itself"
    );
}

#[test]
fn membersync_accepts_the_configuration_the_unit_gives_it() {
    let unit = parse_unit(&read(UNIT));
    let env: Vec<(String, String)> = unit["Service"]["Environment"]
        .iter()
        .map(|e| {
            let (k, v) = e.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    // The unit's install notes copy membersync.example.toml to /etc/membersync/membersync.toml.
    assert!(read(UNIT).contains("membersync.example.toml /etc/membersync/membersync.toml"));
    assert_config_loads(UNIT, &path("membersync.example.toml"), &env);
}
