//! The repository stands alone: no code comment, doc, script or config cites a file outside
//! it (the planning notes the project started from). Facts go into `docs/` with their public
//! sources — `docs/external-services.md`, `docs/sync-policy.md`, `docs/architecture.md` — and
//! are cited there. No service needed.

use std::path::{Path, PathBuf};

use crate::support::repo_root;

/// What is walked: everything the project ships or runs, not build output.
const ROOTS: &[&str] = &[
    "src",
    "docs",
    "scripts",
    "tests",
    "bench",
    "benches",
    "deploy",
    "schemas",
    "fuzz",
    ".ci",
    ".github",
    ".config",
    "README.md",
    "Cargo.toml",
    "Dockerfile",
    "docker-compose.yml",
    "membersync.example.toml",
    "build.rs",
];

/// Directories never walked: build output and vendored state.
const SKIPPED_DIRS: &[&str] = &["target", "node_modules", ".git", "corpus", "artifacts"];

/// Names of files outside the repository. Assembled from pieces so that this file does not
/// cite them itself.
fn outside_names() -> Vec<String> {
    vec![
        ["../", "shared/"].concat(),
        ["/work/", "shared"].concat(),
        ["external", "-apis"].concat(),
        ["DESIGN", ".md"].concat(),
        ["DESIGN", " §"].concat(),
        ["cdc", "-anchors"].concat(),
        ["STYLE", ".md"].concat(),
        // The in-repo restatement is docs/sync-policy.md: a name apart, so that no reader
        // (or checker) can take one for the other.
        ["sync", "-rules.md"].concat(),
    ]
}

fn walk(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if SKIPPED_DIRS.contains(&name) {
            return;
        }
        let entries =
            std::fs::read_dir(path).unwrap_or_else(|e| panic!("read dir {}: {e}", path.display()));
        for entry in entries {
            walk(&entry.expect("dir entry").path(), out);
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
}

#[test]
fn no_file_cites_a_file_outside_the_repository() {
    let root = repo_root();
    let mut files = Vec::new();
    for r in ROOTS {
        walk(&root.join(r), &mut files);
    }
    assert!(
        files
            .iter()
            .any(|f| f.ends_with("docs/external-services.md")),
        "walked {} files but not docs/external-services.md: wrong root?",
        files.len()
    );

    let names = outside_names();
    let mut found = Vec::new();
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue; // not text (images)
        };
        let relative = file
            .strip_prefix(root)
            .unwrap_or(file)
            .to_string_lossy()
            .replace('\\', "/");
        for (n, line) in text.lines().enumerate() {
            if names.iter().any(|name| line.contains(name.as_str())) {
                found.push(format!("  {relative}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} line(s) cite a file outside the repository. The repository must stand alone: \
         state the fact, or cite the in-repo page that states it with its public source \
         (docs/external-services.md §N for vendor facts, docs/sync-policy.md §N for the sync \
         rules, docs/architecture.md / docs/cdc.md / docs/ingest.md / docs/topics.md / \
         docs/api.md for the design):\n{}",
        found.len(),
        found.join("\n")
    );
}
