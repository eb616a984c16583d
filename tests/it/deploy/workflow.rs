//! `.github/workflows/ci.yml`: valid under SchemaStore's GitHub workflow schema (vendored in
//! tests/fixtures/), and it runs the project's CI entry point, `.ci/run`, with a cargo cache.

use super::{assert_valid, json, yaml};

const WORKFLOW: &str = ".github/workflows/ci.yml";

#[test]
fn github_workflow_is_valid_and_runs_the_ci_script() {
    let workflow = yaml(WORKFLOW);
    assert_valid(
        &json("tests/fixtures/github-workflow.json"),
        &workflow,
        WORKFLOW,
    );
    let steps: Vec<&serde_json::Value> = workflow["jobs"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|job| job["steps"].as_array().unwrap())
        .collect();
    assert!(
        steps
            .iter()
            .any(|s| s["run"].as_str().is_some_and(|r| r.contains(".ci/run"))),
        "no step runs .ci/run"
    );
    assert!(
        steps.iter().any(|s| s["uses"].as_str().is_some_and(|u| u
            .starts_with("Swatinem/rust-cache@")
            || u.starts_with("actions/cache@"))),
        "no cargo cache"
    );
    for step in steps {
        if let Some(uses) = step["uses"].as_str() {
            assert!(uses.contains('@'), "{uses}: pin the action's version");
        }
    }
}
