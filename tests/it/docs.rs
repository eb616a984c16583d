//! The repository stands alone: no code comment, doc, script or config cites a file outside
//! it (the planning notes the project started from). Facts go into `docs/` with their public
//! sources — `docs/external-services.md`, `docs/sync-rules.md`, `docs/architecture.md` — and
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
    ]
}

/// The sync rules' file name is allowed only as the in-repo page: after `docs/`, or as a
/// Markdown link (`[…](name)`, `[name]`) from a page in `docs/`, which resolves to that page.
/// Bare or backticked anywhere else, it names the outside file.
fn cites_outside_sync_rules(relative: &str, line: &str) -> bool {
    let name = ["sync", "-rules.md"].concat();
    let in_docs = relative.starts_with("docs/");
    line.match_indices(&name).any(|(at, _)| {
        let before = &line[..at];
        let in_repo = before.ends_with("docs/")
            || (in_docs && (before.ends_with('(') || before.ends_with('[')));
        !in_repo
    })
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
            let outside = names.iter().any(|name| line.contains(name.as_str()))
                || cites_outside_sync_rules(&relative, line);
            if outside {
                found.push(format!("  {relative}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "{} line(s) cite a file outside the repository. The repository must stand alone: \
         state the fact, or cite the in-repo page that states it with its public source \
         (docs/external-services.md §N for vendor facts, docs/sync-rules.md §N for the sync \
         rules, docs/architecture.md / docs/cdc.md / docs/ingest.md / docs/topics.md / \
         docs/api.md for the design):\n{}",
        found.len(),
        found.join("\n")
    );
}

#[test]
fn the_sync_rules_pattern_allows_only_the_in_repo_page() {
    let name = ["sync", "-rules.md"].concat();
    let outside_dir = ["../", "shared/"].concat();
    // (citing file, line, cites the outside file?)
    let cases = [
        ("src/a.rs", format!("see docs/{name} §2"), false),
        ("docs/a.md", format!("[the rules]({name})"), false),
        ("docs/a.md", format!("[{name}]({name}) §2"), false),
        ("docs/a.md", format!("the SQL in `{name}`"), true),
        ("src/a.rs", format!("({name} §2)"), true),
        ("src/a.rs", format!("see {outside_dir}{name}"), true),
    ];
    for (file, line, outside) in cases {
        assert_eq!(
            cites_outside_sync_rules(file, &line),
            outside,
            "{file}: {line}"
        );
    }
}
