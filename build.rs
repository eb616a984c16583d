//! Records the git commit for `membersync_build_info{commit}`.
use std::process::Command;

fn main() {
    let commit = std::env::var("MEMBERSYNC_GIT_COMMIT").ok().or_else(|| {
        Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    });
    println!(
        "cargo:rustc-env=MEMBERSYNC_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
    println!("cargo:rerun-if-env-changed=MEMBERSYNC_GIT_COMMIT");
    // refinery embeds schemas/migrations at compile time without telling cargo about the
    // files; a new or changed migration must rebuild the crate.
    println!("cargo:rerun-if-changed=schemas/migrations");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
