//! `Dockerfile` and `.dockerignore`: a multi-stage build with the build dependencies `.ci/run`
//! installs, a small runtime stage that runs `membersync` as a numeric non-root user with a
//! health check on the ops server, and a build context without build output or local state.

use super::{assert_pinned, read};

/// The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(cont) = trimmed.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let (op, args) = pending
            .split_once(char::is_whitespace)
            .unwrap_or((&pending, ""));
        out.push((op.to_uppercase(), args.trim().to_owned()));
        pending.clear();
    }
    out
}

/// `ARG` defaults declared before the first `FROM`, substituted into a `FROM` line.
fn expand(from: &str, args: &[(String, String)]) -> String {
    let mut s = from.to_owned();
    for (name, value) in args {
        s = s.replace(&format!("${{{name}}}"), value);
    }
    s
}

#[test]
fn dockerfile_builds_in_stages_and_runs_as_non_root_with_a_healthcheck() {
    let all = instructions(&read("Dockerfile"));
    let first_from = all.iter().position(|(op, _)| op == "FROM").expect("FROM");
    let global_args: Vec<(String, String)> = all[..first_from]
        .iter()
        .filter(|(op, _)| op == "ARG")
        .filter_map(|(_, a)| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let stages: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, _)| i)
        .collect();
    assert!(stages.len() >= 2, "a builder stage and a runtime stage");
    // A FROM names an image, or an earlier stage (`FROM chef AS planner`).
    let mut stage_names: Vec<String> = Vec::new();
    for &i in &stages {
        let words: Vec<&str> = all[i].1.split_whitespace().collect();
        let image = expand(words[0], &global_args);
        if !stage_names.contains(&image) {
            assert_pinned(&image, &format!("Dockerfile FROM {}", all[i].1));
        }
        if let [_, r#as, name] = words[..]
            && r#as.eq_ignore_ascii_case("as")
        {
            stage_names.push(name.to_owned());
        }
    }

    // The build stages (all but the runtime) install every build dependency .ci/run installs.
    let build_stages = &all[stages[0]..*stages.last().unwrap()];
    let builder_text: String = build_stages.iter().map(|(_, a)| a.as_str()).collect();
    let ci = read(".ci/run");
    let packages = ci
        .split_once("PACKAGES=(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .expect(".ci/run: PACKAGES=(…)")
        .0;
    for package in packages
        .split_whitespace()
        // The rest serve the local services and tests (PostgreSQL, pgrep, promtool, nft; curl
        // and patch build the development broker).
        .filter(|p| {
            !p.starts_with("postgresql")
                && !["procps", "prometheus", "nftables", "curl", "patch"].contains(p)
        })
    {
        assert!(
            builder_text.contains(package),
            "the builder stage does not install {package} (.ci/run does)"
        );
    }
    assert!(builder_text.contains("cargo build --release --locked"));

    let runtime = &all[*stages.last().unwrap()..];
    let get = |op: &str| -> Vec<&str> {
        runtime
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let user = *get("USER").last().expect("USER in the runtime stage");
    let (uid, gid) = user.split_once(':').unwrap_or((user, "0"));
    let uid: u32 = uid.parse().expect("a numeric user");
    let _: u32 = gid.parse().expect("a numeric group");
    assert!(uid >= 1000, "USER {user}");
    let healthcheck = get("HEALTHCHECK").join(" ");
    assert!(
        healthcheck.contains("/healthz") && healthcheck.contains("9464"),
        "HEALTHCHECK {healthcheck}"
    );
    let entrypoint = get("ENTRYPOINT").join(" ");
    assert!(entrypoint.contains("membersync"), "ENTRYPOINT {entrypoint}");
    let env = get("ENV").join(" ");
    assert!(
        env.contains("MEMBERSYNC__TELEMETRY__METRICS_ADDR=0.0.0.0:9464"),
        "{env}"
    );
    let installs = get("RUN").join(" ");
    assert!(
        !installs.contains("build-essential") && installs.contains("libssl3"),
        "the runtime stage gets the runtime libraries only: {installs}"
    );
}

/// The stage (instructions from its `FROM` on) whose `RUN` builds membersync.
fn builder_stage(all: &[(String, String)]) -> &[(String, String)] {
    let build = all
        .iter()
        .position(|(op, a)| op == "RUN" && a.contains("cargo build --release"))
        .expect("a RUN cargo build --release");
    let from = all[..build]
        .iter()
        .rposition(|(op, _)| op == "FROM")
        .expect("FROM before the build");
    let end = all[build..]
        .iter()
        .position(|(op, _)| op == "FROM")
        .map_or(all.len(), |i| build + i);
    &all[from..end]
}

#[test]
fn dependencies_are_built_in_their_own_layer_before_the_sources_are_copied() {
    let all = instructions(&read("Dockerfile"));
    // cargo-chef is installed at a pinned version, and the lock file is honoured.
    let install = all
        .iter()
        .find(|(op, a)| op == "RUN" && a.contains("cargo install cargo-chef"))
        .map(|(_, a)| a.as_str())
        .expect("a RUN that installs cargo-chef");
    assert!(
        install.contains("--locked") && install.contains("--version"),
        "cargo-chef must be pinned: {install}"
    );
    // A planner stage reduces the context to a recipe.
    assert!(
        all.iter().any(
            |(op, a)| op == "RUN" && a.contains("cargo chef prepare --recipe-path recipe.json")
        ),
        "no `cargo chef prepare` stage"
    );
    // The builder: copy the recipe only, cook the dependencies, then copy the sources, then build.
    let builder = builder_stage(&all);
    let pos = |what: &dyn Fn(&(String, String)) -> bool, name: &str| {
        builder
            .iter()
            .position(what)
            .unwrap_or_else(|| panic!("the builder stage has no {name}: {builder:?}"))
    };
    let cook = pos(
        &|(op, a)| op == "RUN" && a.contains("cargo chef cook") && a.contains("--release"),
        "cargo chef cook --release",
    );
    let sources = pos(&|(op, a)| op == "COPY" && a == ". .", "COPY . .");
    let build = pos(
        &|(op, a)| op == "RUN" && a.contains("cargo build --release --locked"),
        "cargo build",
    );
    assert!(
        cook < sources && sources < build,
        "order must be: cook the dependencies, copy the sources, build ({builder:?})"
    );
    for (op, args) in &builder[..cook] {
        if op == "COPY" {
            assert!(
                args.contains("--from=planner") && args.contains("recipe.json"),
                "only the recipe may be copied before the dependencies are built, not `{args}`"
            );
        }
    }
    // Nothing that changes with every commit comes before the cooked layer (the commit ARG
    // would invalidate it).
    assert!(
        !builder[..cook]
            .iter()
            .any(|(_, a)| a.contains("MEMBERSYNC_GIT_COMMIT")),
        "the git commit must be declared after the dependency layer"
    );
    // The cooked dependencies live in the image layer, not in a cache mount the final build
    // would not see on another machine.
    assert!(
        !builder[cook]
            .1
            .contains("--mount=type=cache,target=/src/target")
    );
}

#[test]
fn dockerignore_keeps_build_output_and_local_state_out_of_the_context() {
    let ignored: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for wanted in ["target", ".dev", ".git", ".env"] {
        assert!(
            ignored.iter().any(|l| l == wanted),
            ".dockerignore misses {wanted}"
        );
    }
    // What the build needs stays in.
    for needed in [
        "src",
        "schemas",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "benches",
    ] {
        assert!(
            !ignored.iter().any(|l| l == needed),
            ".dockerignore excludes {needed}, which cargo build needs"
        );
    }
}
