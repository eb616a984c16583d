//! Configuration errors as an operator meets them: the real binary, exit code 2, a message
//! naming the key and the problem, and no secret in any output.

use std::io::Write;

use crate::support::membersync;

fn toml_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

/// Runs `membersync check` with `env`, expecting exit 2; returns stderr.
fn expect_config_error(config: Option<&str>, env: &[(&str, &str)]) -> String {
    let file = config.map(toml_file);
    let mut cmd = membersync();
    if let Some(f) = &file {
        cmd.arg("--config").arg(f.path());
    }
    cmd.arg("check").envs(env.iter().copied());
    let out = cmd.output().expect("run membersync");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout for a config error"
    );
    stderr
}

/// A config file (if any), environment overrides, and the text the error must contain.
type InvalidCase<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn invalid_values_exit_2_naming_key_and_problem() {
    let cases: &[InvalidCase] = &[
        (
            Some("[database]\nport = \"five\""),
            &[],
            "`database.port`: expected u16, found string \"five\"",
        ),
        (
            Some("[database]\nprot = 1"),
            &[],
            "`database.prot`: unknown key",
        ),
        (
            Some("[kafka]\nbrokers = \"nohost\""),
            &[],
            "`kafka.brokers`: `nohost` is not `host:port`",
        ),
        (
            None,
            &[("MEMBERSYNC__DATABASE__PORT", "x")],
            "from environment variable MEMBERSYNC__DATABASE__PORT",
        ),
        (None, &[("MEMBERSYNC__CDC__SLOT", "UPPER")], "`cdc.slot`"),
        (
            None,
            &[("MEMBERSYNC__TELEMETRY__LOG_FORMAT", "yaml")],
            "`telemetry.log_format`: unknown value `yaml`",
        ),
        (
            Some("[database]\npassword_file = \"/nonexistent/secret\""),
            &[],
            "`database.password_file`: cannot read",
        ),
        // The member API on without an audience would accept any Memberstack app's members.
        (
            None,
            &[("MEMBERSYNC__API__ENABLED", "true")],
            "`api.audience`: required when api.enabled = true",
        ),
        // Keys never cross the network in clear text.
        (
            None,
            &[(
                "MEMBERSYNC__MEMBERSTACK__API_URL",
                "http://admin.memberstack.com",
            )],
            "`memberstack.api_url`: is plain http",
        ),
        (
            Some("[supabase]\nurl = \"http://abcdefgh.supabase.co\""),
            &[("MEMBERSYNC__SUPABASE__SERVICE_ROLE_KEY", "not-a-real-key")],
            "`supabase.url`: is plain http",
        ),
    ];
    for (config, env, expected) in cases {
        let stderr = expect_config_error(*config, env);
        assert!(stderr.contains("invalid configuration"), "{stderr}");
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
}

#[test]
fn missing_config_file_exits_2() {
    let out = membersync()
        .args(["--config", "/nonexistent/membersync.toml", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("/nonexistent/membersync.toml does not exist")
    );
}

#[test]
fn secret_written_in_file_is_refused_and_not_echoed() {
    let stderr = expect_config_error(
        Some("[database]\npassword = \"correct-horse-battery\""),
        &[],
    );
    assert!(
        stderr.contains("`database.password`: secrets may not be written in the config file"),
        "{stderr}"
    );
    assert!(
        stderr.contains("MEMBERSYNC__DATABASE__PASSWORD"),
        "{stderr}"
    );
    assert!(!stderr.contains("correct-horse-battery"), "{stderr}");
}

#[test]
fn environment_overrides_the_file() {
    // The file's port is invalid, the environment's valid one replaces it; the next problem
    // reported is then the environment's broker list, proving both layers were read in order.
    let stderr = expect_config_error(
        Some("[database]\nport = 0\n[kafka]\nbrokers = \"127.0.0.1:9092\""),
        &[
            ("MEMBERSYNC__DATABASE__PORT", "5432"),
            ("MEMBERSYNC__KAFKA__BROKERS", "bad"),
        ],
    );
    assert!(
        stderr.contains("`kafka.brokers`: `bad` is not `host:port`"),
        "{stderr}"
    );
}

#[test]
fn the_example_config_is_valid() {
    let example = crate::support::repo_root().join("membersync.example.toml");
    let out = membersync()
        .arg("--config")
        .arg(&example)
        .args(["check"])
        // Point at nothing so check fails fast on connections, not on config.
        .env("MEMBERSYNC__DATABASE__PORT", "1")
        .env("MEMBERSYNC__KAFKA__BROKERS", "127.0.0.1:1")
        .env("MEMBERSYNC__KAFKA__REQUEST_TIMEOUT_MS", "500")
        .env("MEMBERSYNC__DATABASE__CONNECT_TIMEOUT_SECS", "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("✗ postgres connection"), "{stdout}");
    assert!(stdout.contains("✗ kafka broker"), "{stdout}");
}

#[test]
fn librdkafka_pass_through_is_accepted_but_owned_and_secret_properties_are_refused() {
    // Refused: a property membersync owns (its guarantee depends on it), named with what to
    // set instead; a secret (the table lives in the file); a property librdkafka does not know.
    for (table, expected) in [
        (
            "\"enable.idempotence\" = false",
            "`kafka.librdkafka.\"enable.idempotence\"`: membersync sets `enable.idempotence` itself",
        ),
        (
            "\"group.id\" = \"mine\"",
            "set merge.group_id / bridge.group_id",
        ),
        (
            "\"sasl.oauthbearer.client.secret\" = \"tell-no-one\"",
            "secrets may not be written in the config file",
        ),
        (
            "\"queue.buffering.max.kbyte\" = 1024",
            "librdkafka refuses it",
        ),
    ] {
        let stderr = expect_config_error(Some(&format!("[kafka.librdkafka]\n{table}")), &[]);
        assert!(stderr.contains(expected), "{table}: {stderr}");
        assert!(!stderr.contains("tell-no-one"), "{stderr}");
    }

    // Accepted (numbers or text): the configuration loads and `check` goes on to the services.
    let file = toml_file(
        "[kafka.librdkafka]\n\"queue.buffering.max.kbytes\" = 16384\n\
         \"queue.buffering.max.messages\" = \"50000\"\n\"client.rack\" = \"rack-a\"\n",
    );
    let out = membersync()
        .arg("--config")
        .arg(file.path())
        .arg("check")
        .env("MEMBERSYNC__DATABASE__PORT", "1")
        .env("MEMBERSYNC__KAFKA__BROKERS", "127.0.0.1:1")
        .env("MEMBERSYNC__KAFKA__REQUEST_TIMEOUT_MS", "500")
        .env("MEMBERSYNC__DATABASE__CONNECT_TIMEOUT_SECS", "1")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
