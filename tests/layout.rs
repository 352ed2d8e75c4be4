//! The workspace's layers, checked over `cargo metadata` and `cargo tree`:
//!
//! - the core (`tally-schemas`) depends on no other Tally crate;
//! - the shared pieces (`tally-http`, `tally-backends`) depend on the core only;
//! - a stage (`tally-ingest`, `tally-aggregator`, `tally-enforcer`, `tally-billing-sync`) depends
//!   on the core and the shared pieces, never on another stage;
//! - only the binary turns on the backends' `kafka` and `clickhouse` features, so a stage
//!   built alone links neither librdkafka nor the ClickHouse client.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

const CORE: &str = "tally-schemas";
const SHARED: [&str; 2] = ["tally-http", "tally-backends"];
const STAGES: [&str; 4] = [
    "tally-ingest",
    "tally-aggregator",
    "tally-enforcer",
    "tally-billing-sync",
];

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// Each workspace package's Tally dependencies (normal and build; dev-dependencies may reach
/// further, for tests).
fn tally_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let out = cargo()
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let mut graph = BTreeMap::new();
    for pkg in meta["packages"].as_array().expect("packages") {
        let name = pkg["name"].as_str().expect("name").to_owned();
        let deps = pkg["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].as_str() != Some("dev"))
            .filter_map(|d| d["name"].as_str())
            .filter(|n| n.starts_with("tally"))
            .map(str::to_owned)
            .collect();
        graph.insert(name, deps);
    }
    graph
}

#[test]
fn no_stage_depends_on_another_stage_and_the_core_on_nothing_of_tally() {
    let graph = tally_dependencies();
    for name in STAGES.iter().chain(&SHARED).chain([&CORE]) {
        assert!(graph.contains_key(*name), "{name} is a workspace member");
    }
    assert_eq!(
        graph[CORE],
        BTreeSet::new(),
        "the core depends on no Tally crate"
    );
    for shared in SHARED {
        let allowed: BTreeSet<String> = [CORE.to_owned()].into();
        assert!(
            graph[shared].is_subset(&allowed),
            "{shared} may depend on the core only, depends on {:?}",
            graph[shared]
        );
    }
    for stage in STAGES {
        let others: Vec<&String> = graph[stage]
            .iter()
            .filter(|d| STAGES.contains(&d.as_str()))
            .collect();
        assert!(
            others.is_empty(),
            "{stage} depends on other stages: {others:?}"
        );
        let outside: Vec<&String> = graph[stage]
            .iter()
            .filter(|d| d.as_str() != CORE && !SHARED.contains(&d.as_str()))
            .collect();
        assert!(
            outside.is_empty(),
            "{stage} depends on Tally crates outside the core and the shared pieces: {outside:?}"
        );
    }
}

/// The crates a package links when built alone (its normal dependencies, features resolved for
/// it and not for the whole workspace).
fn linked_crates(package: &str) -> BTreeSet<String> {
    let out = cargo()
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn stages_link_neither_librdkafka_nor_the_clickhouse_client_and_the_binary_links_both() {
    for stage in STAGES {
        let linked = linked_crates(stage);
        assert!(
            linked.contains(CORE),
            "{stage}: the tree lists {CORE}: {linked:?}"
        );
        for backend in ["rdkafka", "rdkafka-sys", "clickhouse"] {
            assert!(!linked.contains(backend), "{stage} links {backend}");
        }
    }
    let binary = linked_crates("tally");
    for backend in ["rdkafka", "clickhouse"] {
        assert!(binary.contains(backend), "the binary links {backend}");
    }
}
