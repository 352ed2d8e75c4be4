//! Hostile input against the real binary: each test sends what an attacker or a careless client
//! would, and checks the status, the machine-readable code and that nothing already accepted is
//! lost. One test per defect, named after it (the money and availability review).

mod common;

use std::process::Command;
use std::time::Duration;

use common::process::{Proc, free_port, start_with_env};
use reqwest::blocking::Client;
use serde_json::{Value, json};

fn start(data: &std::path::Path, env: &[(&str, &str)]) -> Proc {
    start_with_env("run", data, free_port(), free_port(), "20ms", env)
}

fn body(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

/// A CloudEvent of now (the receipt time).
fn event(id: &str, customer: &str, meter: &str, value: u64) -> String {
    json!({"specversion": "1.0", "id": id, "source": "edge-hostile", "type": meter,
           "subject": customer, "data": {"value": value}})
    .to_string()
}

/// The `tally_http_requests_total` series of the process.
fn request_series(p: &Proc) -> Vec<String> {
    let text = Client::new()
        .get(format!("{}/metrics", p.admin))
        .send()
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("tally_http_requests_total{"))
        .map(|l| l.rsplit_once(' ').map_or(l, |(s, _)| s).to_owned())
        .collect()
}

#[test]
fn method_label_flood_keeps_series_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let client = Client::new();
    let before = request_series(&p).len();
    for i in 0..300 {
        let method = reqwest::Method::from_bytes(format!("INVENTED{i}").as_bytes()).unwrap();
        let r = client
            .request(method, format!("{}/v1/usage", p.api))
            .send()
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let series = request_series(&p);
    assert!(
        series.iter().any(|s| s.contains(r#"method="other""#)),
        "{series:?}"
    );
    assert!(series.iter().all(|s| !s.contains("INVENTED")), "{series:?}");
    // 300 invented methods add at most a few series (`other` by route and status).
    assert!(series.len() <= before + 4, "{before} -> {}", series.len());
}

#[test]
fn kafka_log_with_embedded_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("run")
        .env("TALLY_DATA_DIR", dir.path())
        .env("TALLY_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("TALLY_ADMIN_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("TALLY_KAFKA_BROKERS", format!("127.0.0.1:{}", free_port()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kafka_brokers needs clickhouse_url"), "{err}");
}

#[test]
fn open_loopback_revoking_last_key_keeps_api_closed() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let client = Client::new();
    let usage = format!("{}/v1/usage?customer=c-1&meter=api_requests", p.api);
    assert_eq!(client.get(&usage).send().unwrap().status(), 200, "open");
    let (status, key) = body(
        client
            .post(format!("{}/v1/keys", p.api))
            .json(&json!({"name": "only", "scopes": ["admin"]}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 201, "{key}");
    let (secret, id) = (key["key"].as_str().unwrap(), key["id"].as_str().unwrap());
    assert_eq!(
        body(client.get(&usage).send().unwrap()).0,
        401,
        "closed by the key"
    );
    let r = client
        .delete(format!("{}/v1/keys/{id}", p.api))
        .bearer_auth(secret)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    // No active key is left: the API stays closed, now and after the keys are re-read.
    for _ in 0..2 {
        let (status, b) = body(client.get(&usage).send().unwrap());
        assert_eq!((status, b["code"].as_str()), (401, Some("missing_api_key")));
        std::thread::sleep(Duration::from_millis(5_500));
    }
    drop(p);
    let p = start(dir.path(), &[]);
    let usage = format!("{}/v1/usage?customer=c-1&meter=api_requests", p.api);
    assert_eq!(
        body(client.get(&usage).send().unwrap()).0,
        401,
        "after a restart"
    );
}

#[test]
fn open_loopback_refuses_foreign_host() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let client = Client::new();
    let usage = format!("{}/v1/usage?customer=c-1&meter=api_requests", p.api);
    for host in [
        "evil.example",
        "evil.example:8080",
        "10.0.0.1",
        "localhost.evil.example",
    ] {
        let (status, b) = body(client.get(&usage).header("host", host).send().unwrap());
        assert_eq!(
            (status, b["code"].as_str()),
            (403, Some("host_not_allowed")),
            "{host}"
        );
    }
    for host in [
        "localhost",
        "localhost:1234",
        "127.0.0.1",
        "127.1.2.3:80",
        "[::1]:8080",
        "app.localhost",
    ] {
        let r = client.get(&usage).header("host", host).send().unwrap();
        assert_eq!(r.status(), 200, "{host}");
    }
    // An event posted through a foreign name is not taken.
    let (status, _) = body(
        client
            .post(format!("{}/v1/events", p.api))
            .header("host", "evil.example")
            .header("content-type", "application/json")
            .body(event("h-1", "c-1", "api_requests", 5))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 403);
    let (_, b) = body(client.get(&usage).send().unwrap());
    assert_eq!(b["usage"], 0);
}

/// Peak resident memory of a process, in bytes (`VmHWM`).
fn peak_rss(p: &Proc) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn memory_batch_of_zeros_is_refused_without_gigabytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let client = Client::new();
    let (status, _) = body(
        client
            .post(format!("{}/v1/events", p.api))
            .header("content-type", "application/json")
            .body(event("m-1", "c-mem", "api_requests", 3))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 202);
    // 16 MiB less a byte: under the body limit, 8 million elements.
    let n = 8 * 1024 * 1024 - 1;
    let mut zeros = String::with_capacity(2 * n + 2);
    zeros.push('[');
    zeros.push_str(&"0,".repeat(n - 1));
    zeros.push_str("0]");
    let lines = "0\n".repeat(n);
    for (content_type, zeros) in [
        ("application/cloudevents-batch+json", &zeros),
        ("application/json", &zeros),
        ("application/x-ndjson", &lines),
    ] {
        let (status, b) = body(
            client
                .post(format!("{}/v1/events", p.api))
                .header("content-type", content_type)
                .body(zeros.clone())
                .send()
                .unwrap(),
        );
        assert_eq!(
            (status, b["code"].as_str()),
            (413, Some("too_many_events")),
            "{content_type}: {b}"
        );
        assert!(
            b["message"].as_str().unwrap().contains(&n.to_string()),
            "{b}"
        );
    }
    let peak = peak_rss(&p);
    eprintln!(
        "peak resident memory after the zero batches: {} MiB",
        peak >> 20
    );
    assert!(peak < 300 << 20, "peak resident memory {} MiB", peak >> 20);
    // What was accepted before is still counted.
    let usage = format!("{}/v1/usage?customer=c-mem&meter=api_requests", p.api);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while body(client.get(&usage).send().unwrap()).1["usage"] != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the accepted event is lost"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The usage (period to date) the enforcer counted for `customer`.
fn checked_usage(client: &Client, p: &Proc, customer: &str) -> u64 {
    let (status, b) = body(
        client
            .get(format!(
                "{}/v1/check?customer={customer}&meter=api_requests&quantity=0",
                p.api
            ))
            .send()
            .unwrap(),
    );
    // 429 once blocked: the answer still carries the usage.
    assert!(status == 200 || status == 429, "{status}: {b}");
    b["usage"].as_u64().unwrap()
}

fn wait_for_usage(client: &Client, p: &Proc, customer: &str, want: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while checked_usage(client, p, customer) != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{customer} never reached {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn overflow_events_at_the_cap_are_refused_and_totals_stay_exact() {
    let max = i64::MAX as u64;
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), &[]);
    let client = Client::new();
    let post = |events: Vec<String>| {
        body(
            client
                .post(format!("{}/v1/events", p.api))
                .header("content-type", "application/cloudevents-batch+json")
                .body(format!("[{}]", events.join(",")))
                .send()
                .unwrap(),
        )
    };
    let (status, b) = post(vec![
        event("o-1", "c-big", "api_requests", max),
        event("o-2", "c-big2", "api_requests", max - 10),
    ]);
    assert_eq!((status, b["accepted"].as_u64()), (202, Some(2)), "{b}");
    wait_for_usage(&client, &p, "c-big", max);
    // One more unit for c-big would pass the cap: refused by index, the valid ones kept.
    let (status, b) = post(vec![
        event("o-3", "c-big", "api_requests", 1),
        event("o-4", "c-small", "api_requests", 5),
        event("o-5", "c-big2", "api_requests", 5),
        event("o-6", "c-big2", "api_requests", 6),
    ]);
    assert_eq!(status, 202, "{b}");
    assert_eq!(
        (b["accepted"].as_u64(), b["rejected"].as_u64()),
        (Some(2), Some(2)),
        "{b}"
    );
    // c-big's unit, and c-big2's 6 after its 5 of the same request.
    for (n, index) in [0, 3].into_iter().enumerate() {
        assert_eq!(b["errors"][n]["index"], index, "{b}");
        assert_eq!(b["errors"][n]["code"], "usage_cap_exceeded", "{b}");
    }
    let (status, b) = body(
        client
            .post(format!("{}/v1/events", p.api))
            .header("content-type", "application/json")
            .body(event("o-7", "c-big", "api_requests", max))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (status, b["code"].as_str()),
        (400, Some("usage_cap_exceeded")),
        "{b}"
    );
    wait_for_usage(&client, &p, "c-big2", max - 5);
    wait_for_usage(&client, &p, "c-small", 5);

    // Every query still answers, exactly: c-big at the cap, the meter's total over customers
    // past 2^63.
    let query = |p: &Proc, path: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, b) = body(client.get(format!("{}{path}", p.api)).send().unwrap());
            assert_eq!(status, 200, "{path}: {b}");
            if b.to_string().contains("c-small") || b["meters"].is_array() {
                return b;
            }
            assert!(std::time::Instant::now() < deadline, "{path}: {b}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let meter_total = |p: &Proc| -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, b) = body(
                client
                    .get(format!("{}/v1/usage/totals", p.api))
                    .send()
                    .unwrap(),
            );
            assert_eq!(status, 200, "totals: {b}");
            let usage = b["meters"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["meter"] == "api_requests"))
                .and_then(|m| m["usage"].as_u64())
                .unwrap_or(0);
            if usage == 2 * max || std::time::Instant::now() > deadline {
                return usage;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(meter_total(&p), 2 * max);
    let top = query(&p, "/v1/usage/top?meter=api_requests");
    let customers: Vec<(&str, u64)> = top["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["customer"].as_str().unwrap(),
                c["usage"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        customers,
        [("c-big", max), ("c-big2", max - 5), ("c-small", 5)],
        "{top}"
    );
    // The enforcer's start-up snapshot reads the same totals.
    drop(p);
    let p = start(dir.path(), &[]);
    assert_eq!(checked_usage(&client, &p, "c-big"), max);
    assert_eq!(checked_usage(&client, &p, "c-small"), 5);
    assert_eq!(meter_total(&p), 2 * max);
}
