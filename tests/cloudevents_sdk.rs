//! Events sent with the official CloudEvents Python SDK (`cloudevents` on PyPI, structured
//! mode) carrying `{"bytes": 1200, "region": "eu", "model": "m1"}` feed two meters of the real
//! binary, and usage by region reads back exactly: in the embedded default, and on a real
//! Kafka-compatible broker and ClickHouse.

mod common;
#[path = "servers/mod.rs"]
mod servers;

use std::time::{Duration, Instant};

use common::process::{Proc, free_port, start_with_env};
use serde_json::{Value, json};

/// Among them `requests` and `request_bytes` (dimensions `region` and `model`) over `request`
/// events.
const METERS: &str = include_str!("fixtures/payload_meters.toml");

/// The SDK's interpreter (tests/install.sh installs the package and sets it), if it has it.
fn python() -> Option<String> {
    let python = std::env::var("TALLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = std::process::Command::new(&python)
        .args(["-c", "import cloudevents.http"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(python)
}

fn catalog_file(dir: &std::path::Path) -> String {
    let path = dir.join("catalog.toml");
    let text = format!("{}\n{METERS}", tally_schemas::catalog::DEFAULT_CATALOG_TOML);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn emit(python: &str, p: &Proc, id: &str, data: Value) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/emit_cloudevent.py"
    );
    let mut args = vec![
        script.to_owned(),
        format!("{}/v1/events", p.api),
        id.to_owned(),
        "cust_sdk".to_owned(),
        data.to_string(),
    ];
    args.extend(p.key.clone());
    let out = std::process::Command::new(python)
        .args(&args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "the SDK's event was refused: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn usage(p: &Proc, query: &str) -> Value {
    let req = reqwest::blocking::Client::new()
        .get(format!("{}/v1/usage?customer=cust_sdk&{query}", p.api));
    let req = match &p.key {
        Some(k) => req.bearer_auth(k),
        None => req,
    };
    req.send().expect("query replies").json().expect("JSON")
}

/// Sends the events with the SDK and waits for the breakdown by region.
fn sends_and_reads_back_by_region(python: &str, p: &Proc) {
    emit(
        python,
        p,
        "sdk-1",
        json!({"bytes": 1200, "region": "eu", "model": "m1"}),
    );
    emit(
        python,
        p,
        "sdk-2",
        json!({"bytes": 800, "region": "us", "model": "m1"}),
    );
    // The first again: the SDK's retry of the same id is a duplicate.
    emit(
        python,
        p,
        "sdk-1",
        json!({"bytes": 1200, "region": "eu", "model": "m1"}),
    );
    let want = json!([
        {"dimensions": {"region": "eu"}, "usage": 1200},
        {"dimensions": {"region": "us"}, "usage": 800},
    ]);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = usage(p, "meter=request_bytes&group_by=region");
        if last["groups"] == want {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(last["groups"], want, "{last}");
    assert_eq!(last["usage"], 2000);
    assert_eq!(usage(p, "meter=requests")["usage"], 2, "the second meter");
    let m1 = usage(p, "meter=request_bytes&group_by=model&filter[region]=eu");
    assert_eq!(
        m1["groups"],
        json!([{"dimensions": {"model": "m1"}, "usage": 1200}])
    );
}

#[test]
fn sdk_events_read_back_by_region_in_the_embedded_default() {
    let Some(python) = python() else {
        servers::skip_without_tool("the CloudEvents Python SDK", false);
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_file(dir.path());
    let p = start_with_env(
        "run",
        dir.path(),
        free_port(),
        free_port(),
        "50ms",
        &[("TALLY_CATALOG_FILE", catalog.as_str())],
    );
    sends_and_reads_back_by_region(&python, &p);
}

#[test]
fn sdk_events_read_back_by_region_on_kafka_and_clickhouse() {
    let Some(python) = python() else {
        servers::skip_without_tool("the CloudEvents Python SDK", false);
        return;
    };
    if servers::skip_without_servers(false) {
        return;
    }
    let backends = servers::Backends::shared();
    let dir = tempfile::tempdir().unwrap();
    let catalog = catalog_file(dir.path());
    let mut env = backends.env();
    env.push(("TALLY_CATALOG_FILE", catalog));
    let pairs = servers::pairs(&env);
    let p = start_with_env("run", dir.path(), free_port(), free_port(), "100ms", &pairs);
    sends_and_reads_back_by_region(&python, &p);
}
