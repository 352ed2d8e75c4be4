//! The deployment files in `deploy/` pass their linters and agree with the code:
//! `promtool` checks the alert rules (and their unit tests) and the Prometheus configuration,
//! `yamllint` every YAML file, `docker-compose config` the compose file, `kubernetes-validate`
//! (Kubernetes' JSON schemas, strict) the manifests; every metric the alerts and the Grafana
//! dashboard use is one Tally registers, and every `TALLY_*` variable they set is a setting.
//!
//! `tests/run.sh` installs the linters (Debian's prometheus, yamllint and docker-compose
//! packages; kubernetes-validate from PyPI in a virtual environment named by
//! `TALLY_TEST_KUBERNETES_VALIDATE`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod servers;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Runs a linter in `deploy/`; fails the test with its output unless it succeeds.
fn lint(program: &str, args: &[&str]) {
    lint_with(program, args, &[]);
}

fn lint_with(program: &str, args: &[&str], env: &[(&str, &str)]) {
    if servers::skip_without_tool(program, servers::have_program(program)) {
        return;
    }
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(deploy())
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run ({e}); tests/run.sh installs it"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn files(dir: &str, ext: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(deploy().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .map(|p| format!("{dir}/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    out.sort();
    out
}

/// The metric names Tally registers, read from the crates' `metrics.rs` files.
fn registered_metrics() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names = BTreeSet::new();
    for file in [
        "src/metrics.rs",
        "http/src/metrics.rs",
        "backends/src/metrics.rs",
        "ingest/src/metrics.rs",
        "aggregator/src/metrics.rs",
        "enforcer/src/metrics.rs",
        "billing-sync/src/metrics.rs",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        names.extend(metric_names(&text));
    }
    assert!(names.len() > 15, "{names:?}");
    names
}

/// Every `tally_...` identifier in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("tally_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // Only names that start at a word boundary (not the tail of a longer identifier).
        if i == 0 || !rest[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    out
}

/// A name used in a query: a registered metric, or a histogram's series of one.
fn known(name: &str, registered: &BTreeSet<String>) -> bool {
    registered.contains(name)
        || ["_bucket", "_sum", "_count"].iter().any(|s| {
            name.strip_suffix(s)
                .is_some_and(|base| registered.contains(base))
        })
}

#[test]
fn prometheus_rules_and_configuration_pass_promtool() {
    lint("promtool", &["check", "rules", "prometheus/alerts.yml"]);
    lint("promtool", &["test", "rules", "prometheus/alerts_test.yml"]);
    lint(
        "promtool",
        &["check", "config", "prometheus/prometheus.yml"],
    );
}

#[test]
fn every_yaml_file_passes_yamllint() {
    lint("yamllint", &["--strict", "--config-file", ".yamllint", "."]);
}

#[test]
fn the_compose_file_is_valid_and_sets_only_known_settings() {
    let args = ["--file", "docker-compose.yml", "config", "--quiet"];
    lint_with(
        "docker-compose",
        &args,
        &[("TALLY_ADMIN_KEY", "0123456789abcdef0123456789abcdef")],
    );
    // The distributed pipeline never runs without an admin key.
    let out = Command::new("docker-compose")
        .args(args)
        .env_remove("TALLY_ADMIN_KEY")
        .current_dir(deploy())
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "compose runs without TALLY_ADMIN_KEY"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("TALLY_ADMIN_KEY"));
    let text = std::fs::read_to_string(deploy().join("docker-compose.yml")).unwrap();
    let vars = tally_variables(&text);
    assert!(vars.len() >= 5, "{vars:?}");
    assert_known_settings(&vars);
    // Each Tally service runs a real subcommand.
    for command in [
        "migrate",
        "ingest",
        "aggregator",
        "enforcer",
        "billing-sync",
    ] {
        assert!(
            text.contains(&format!("command: [\"{command}\"]")),
            "{command}"
        );
        let help = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([command, "--help"])
            .output()
            .unwrap();
        assert!(help.status.success(), "tally {command} exists");
    }
}

#[test]
fn the_kubernetes_manifests_match_the_schemas() {
    let tool = std::env::var("TALLY_TEST_KUBERNETES_VALIDATE")
        .unwrap_or_else(|_| "kubernetes-validate".into());
    let mut args = vec!["--strict".to_owned(), "-k".into(), "1.33.0".into()];
    let manifests: Vec<String> = files("kubernetes", "yaml")
        .into_iter()
        .filter(|f| !f.ends_with("kustomization.yaml"))
        .collect();
    assert_eq!(manifests.len(), 7, "{manifests:?}");
    args.extend(manifests.iter().cloned());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lint(&tool, &args);
    // The kustomization lists every manifest.
    let kustomization =
        std::fs::read_to_string(deploy().join("kubernetes/kustomization.yaml")).unwrap();
    for m in &manifests {
        let name = m.trim_start_matches("kubernetes/");
        assert!(kustomization.contains(&format!("- {name}")), "{name}");
    }
    let config = std::fs::read_to_string(deploy().join("kubernetes/config.yaml")).unwrap();
    let mut vars = tally_variables(&config);
    for m in &manifests {
        vars.extend(tally_variables(
            &std::fs::read_to_string(deploy().join(m)).unwrap(),
        ));
    }
    assert_known_settings(&vars);
}

#[test]
fn alerts_and_dashboard_use_only_registered_metrics() {
    let registered = registered_metrics();
    let alerts = std::fs::read_to_string(deploy().join("prometheus/alerts.yml")).unwrap();
    let used = metric_names(&alerts);
    assert!(used.len() >= 6, "{used:?}");
    for name in &used {
        assert!(known(name, &registered), "alerts.yml uses unknown {name}");
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/tally.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "unique panel ids");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "prometheus", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            used.extend(metric_names(t["expr"].as_str().unwrap()));
        }
    }
    for name in &used {
        assert!(known(name, &registered), "tally.json uses unknown {name}");
    }
    // The dashboard covers each component.
    for prefix in [
        "tally_ingest_",
        "tally_log_consumer_lag",
        "tally_aggregator_",
        "tally_enforcer_",
        "tally_billing_",
    ] {
        assert!(used.iter().any(|n| n.starts_with(prefix)), "{prefix}");
    }
    let datasource =
        std::fs::read_to_string(deploy().join("grafana/provisioning/datasources/prometheus.yml"))
            .unwrap();
    assert!(datasource.contains("uid: prometheus"));
}

/// `TALLY_*` names set in a YAML file (`TALLY_X: value` or `name: TALLY_X`).
fn tally_variables(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            let l = l
                .trim()
                .trim_start_matches("- ")
                .trim_start_matches("name: ");
            let name = l.split(':').next()?.trim();
            (name.starts_with("TALLY_") && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .then(|| name.to_owned())
        })
        .collect()
}

/// Every variable names a setting (`TALLY_` + the setting's name in capitals).
fn assert_known_settings(vars: &BTreeSet<String>) {
    let keys = tally::Config::keys();
    let unknown: Vec<&String> = vars
        .iter()
        .filter(|v| !keys.contains(&v.trim_start_matches("TALLY_").to_ascii_lowercase()))
        .collect();
    assert!(unknown.is_empty(), "unknown settings {unknown:?}");
}

/// Columns of a `CREATE TABLE ... (columns) ENGINE` statement, whitespace-normalized.
fn columns_after(text: &str, head: &str) -> Option<String> {
    let start = text.find(head)? + head.len();
    let body = &text[start..];
    let open = body.find('(')?;
    let close = body.find(") ENGINE")?;
    Some(
        body[open + 1..close]
            .split(',')
            .map(|c| c.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

#[test]
fn the_cluster_schema_has_every_table_of_the_migrations() {
    let cluster = std::fs::read_to_string(deploy().join("clickhouse/cluster.sql")).unwrap();
    let mut tables = 0;
    use tally_backends::store::clickhouse::schema::MIGRATIONS;
    for migration in MIGRATIONS {
        for statement in migration.statements {
            let Some(rest) = statement.strip_prefix("CREATE TABLE IF NOT EXISTS {db}.") else {
                continue;
            };
            let name = rest
                .split(|c: char| c.is_whitespace() || c == '(')
                .next()
                .unwrap();
            let mut want = columns_after(statement, &format!("{{db}}.{name}")).unwrap();
            // Columns later migrations add.
            for later in MIGRATIONS.iter().flat_map(|m| m.statements) {
                if let Some(added) = later
                    .strip_prefix(&format!("ALTER TABLE {{db}}.{name} ADD COLUMN "))
                    .and_then(|rest| rest.split(',').next())
                {
                    want.push_str(", ");
                    want.push_str(&added.split_whitespace().collect::<Vec<_>>().join(" "));
                }
            }
            let got = columns_after(&cluster, &format!("tally.{name}_local ON CLUSTER tally"))
                .or_else(|| columns_after(&cluster, &format!("tally.{name} ON CLUSTER tally")))
                .unwrap_or_else(|| panic!("cluster.sql has no table {name}"));
            assert_eq!(got, want, "columns of {name}");
            tables += 1;
        }
    }
    assert_eq!(tables, 11, "tables in the migrations");
    // Tally's names are the Distributed tables over the sharded ones.
    for name in [
        "usage_block_cells",
        "usage_cells",
        "event_ids",
        "batch_offsets",
    ] {
        assert!(
            cluster.contains(&format!(
                "tally.{name} ON CLUSTER tally AS tally.{name}_local\nENGINE = Distributed(tally, tally, {name}_local, partition)"
            )),
            "{name} is sharded by partition"
        );
    }
}
