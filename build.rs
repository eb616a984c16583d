//! Records the git commit for `membersync_build_info{commit}`.
use std::process::Command;

fn main() {
    let commit = std::env::var("MEMBERSYNC_GIT_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    println!(
        "cargo:rustc-env=MEMBERSYNC_GIT_COMMIT={}",
        commit.unwrap_or_else(|| "unknown".into())
    );
    println!("cargo:rerun-if-env-changed=MEMBERSYNC_GIT_COMMIT");
    // refinery embeds schemas/migrations at compile time without telling cargo about the
    // files; a new or changed migration must rebuild the crate.
    println!("cargo:rerun-if-changed=schemas/migrations");
    // Only this checkout's HEAD and the branch it points at: watching all of refs/heads made
    // every commit on any branch (other worktrees share the refs) rebuild the crate. Paths are
    // asked of git because a worktree's HEAD is not under .git/.
    let head = git(&["rev-parse", "--git-path", "HEAD"]);
    let branch =
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r]));
    let packed = git(&["rev-parse", "--git-common-dir"]).map(|d| format!("{d}/packed-refs"));
    for path in [head, branch, packed].into_iter().flatten() {
        // A missing path would rerun this script on every build.
        if std::path::Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
