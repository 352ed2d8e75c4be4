//! The web dashboard end to end: the real binary serves it, headless Chromium (driven by
//! Playwright, `tests/dashboard/drive.cjs`) picks a customer and opens the operator view, and
//! this test checks what the page showed: each meter against its limit with the 80 / 100 / 110 %
//! marks, the state and grace, the chart, top customers, totals and pipeline figures.
//!
//! Needs Chromium and playwright-core, which `tests/run.sh` installs (`TALLY_TEST_NODE_PATH`
//! names the directory with playwright-core; `TALLY_TEST_CHROMIUM` the browser).

mod common;
mod servers;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{free_port, start};
use serde_json::{Value, json};

fn event(id: &str, customer: &str, meter: &str, value: u64) -> Value {
    json!({"specversion": "1.0", "id": id, "source": "dash", "type": meter,
           "subject": customer, "data": {"value": value}})
}

fn row<'a>(seen: &'a Value, meter: &str) -> &'a Value {
    seen["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["meter"] == meter)
        .unwrap_or_else(|| panic!("no row for {meter}: {seen}"))
}

#[test]
fn the_dashboard_shows_a_customer_and_the_operator_view() {
    let node_path = std::env::var("TALLY_TEST_NODE_PATH").unwrap_or_default();
    let chromium =
        std::env::var("TALLY_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let found = servers::have_program("node")
        && std::path::Path::new(&node_path)
            .join("playwright-core")
            .is_dir()
        && servers::have_program(&chromium);
    if servers::skip_without_tool("node, playwright-core and Chromium", found) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), free_port(), free_port(), "50ms");
    let batch = json!([
        event("1", "dash-a", "api_requests", 8_500),
        event("2", "dash-a", "build_minutes", 105),
        event("3", "dash-a", "bandwidth_bytes", 1_200_000_000),
        event("4", "dash-a", "wasm_modules", 2),
        event("5", "dash-b", "api_requests", 1_000),
        event("6", "dash-b", "bandwidth_bytes", 2_000_000_000),
        // A duplicate and an invalid event, for the pipeline figures.
        event("1", "dash-a", "api_requests", 8_500),
        event("7", "dash-b", "gpu_hours", 1),
    ]);
    let resp = p.post_batch(batch.to_string());
    assert_eq!(resp.status().as_u16(), 202);
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s: Value = client
            .get(format!("{}/v1/usage/top?meter=bandwidth_bytes", p.api))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if s["customers"].as_array().is_some_and(|c| c.len() == 2) {
            break;
        }
        assert!(Instant::now() < deadline, "events not stored: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A read key closes the API (open on loopback only while no key exists): the page must
    // be given the key.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["keys", "create", "--name", "dashboard", "--scope", "read"])
        .env("TALLY_DATA_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .get(format!("{}/v1/usage/summary?customer=dash-a", p.api))
        .send()
        .unwrap()
        .status()
        != 401
    {
        assert!(Instant::now() < deadline, "the key did not close the API");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Screenshots go to a temporary directory, or to TALLY_TEST_SCREENSHOTS to keep them.
    let tmp = tempfile::tempdir().unwrap();
    let shots = std::env::var_os("TALLY_TEST_SCREENSHOTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dashboard/drive.cjs");
    let out = Command::new("node")
        .arg(script)
        .arg(&p.api)
        .arg("dash-a")
        .arg(&shots)
        .arg(&key)
        .env("NODE_PATH", &node_path)
        .output()
        .expect("node runs (tests/run.sh installs it with playwright-core and Chromium)");
    assert!(
        out.status.success(),
        "the browser run failed (NODE_PATH={node_path:?}):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("the driver prints JSON");

    assert_eq!(seen["path"], "/dashboard", "/ redirects to the dashboard");
    assert_eq!(seen["title"], "Tally usage");
    assert_eq!(
        seen["keylessError"], "this endpoint needs an API key: send `Authorization: Bearer <key>`",
        "{seen}"
    );
    assert_eq!(seen["keyPlaceholder"], "key set");
    assert!(
        seen["invalidCustomerError"]
            .as_str()
            .unwrap()
            .starts_with("`customer` must be"),
        "{seen}"
    );
    assert_eq!(
        seen["errorHidden"], true,
        "the error goes once a customer loads"
    );
    assert!(seen["url"].as_str().unwrap().ends_with("?customer=dash-a"));
    assert!(
        seen["planLine"]
            .as_str()
            .unwrap()
            .starts_with("dash-a: plan free, period "),
        "{seen}"
    );
    assert_eq!(seen["meters"].as_array().unwrap().len(), 7, "every meter");

    let api = row(&seen, "api_requests");
    assert_eq!(
        (&api["usage"], &api["limit"], &api["percent"], &api["state"]),
        (
            &json!("8,500 requests"),
            &json!("10,000"),
            &json!("85.0 %"),
            &json!("warn")
        )
    );
    assert_eq!(api["stateClass"], "badge state-warn");
    assert_eq!(api["grace"], Value::Null);
    // 85 % of a bar that runs to 120 %.
    assert!(
        api["fill"].as_str().unwrap().contains("width: 70.83"),
        "{api}"
    );
    let build = row(&seen, "build_minutes");
    assert_eq!(
        (&build["state"], &build["percent"]),
        (&json!("over"), &json!("105.0 %"))
    );
    let grace = build["grace"].as_str().unwrap();
    assert!(
        grace.starts_with("grace ends in 1 d 23 h") || grace.starts_with("grace ends in 2 d 0 h"),
        "48 h of grace from now: {grace}"
    );
    let bandwidth = row(&seen, "bandwidth_bytes");
    assert_eq!(
        (&bandwidth["state"], &bandwidth["grace"], &bandwidth["fill"]),
        (&json!("blocked"), &Value::Null, &json!("width: 100%;")),
        "120 %: blocked, the bar full"
    );
    let storage = row(&seen, "storage_bytes");
    assert_eq!(
        (&storage["limit"], &storage["state"]),
        (&json!("unlimited"), &json!("ok"))
    );
    assert_eq!(row(&seen, "wasm_modules")["usage"], "2 modules");
    // The 80 / 100 / 110 % marks on every limited meter, none on the unlimited one.
    let marks = seen["marks"].as_array().unwrap();
    assert_eq!(marks[0], json!(["80", "100", "110"]));
    assert_eq!(
        marks
            .iter()
            .filter(|m| m.as_array().unwrap().is_empty())
            .count(),
        1
    );
    // The chart: one bar today for each meter shown.
    let chart = seen["chart"].as_array().unwrap();
    assert_eq!(chart.len(), 1, "{seen}");
    assert_eq!(chart[0]["value"], 8_500);
    assert_eq!(seen["chartBuild"], json!([105]));

    // The operator view.
    assert_eq!(seen["customerViewHidden"], true);
    assert_eq!(
        seen["top"],
        json!([
            {"customer": "dash-a", "usage": "8,500 requests"},
            {"customer": "dash-b", "usage": "1,000 requests"}
        ])
    );
    assert_eq!(seen["topBandwidth"][0]["customer"], "dash-b");
    assert_eq!(
        seen["totals"][0],
        json!({"meter": "api_requests", "usage": "9,500 requests", "customers": "2"})
    );
    let stats = &seen["stats"];
    assert_eq!(stats["Events accepted"], "6", "{stats}");
    assert_eq!(stats["Duplicates dropped"], "1");
    assert_eq!(stats["Events rejected"], "1");
    assert_eq!(stats["Events aggregated"], "6");
    assert_eq!(
        seen["followedLink"], "dash-b",
        "the top customer's link opens its view"
    );
    assert_eq!(seen["consoleErrors"], json!([]), "no script errors");
    for shot in ["customer.png", "operator.png"] {
        let len = std::fs::metadata(shots.join(shot)).unwrap().len();
        assert!(len > 10_000, "{shot} has {len} bytes");
    }
}
