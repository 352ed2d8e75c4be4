//! The real binary, killed with SIGKILL right after a 202: every acknowledged event is still
//! counted, once, after a restart.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{Proc, free_port, start, start_with_env};
use serde_json::{Value, json};

fn batch(k: usize) -> String {
    let events: Vec<Value> = (0..50)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("k{k}-{i}"), "source": "edge-crash",
                   "type": "api_requests", "subject": format!("crash-{}", i % 5),
                   "data": {"value": 1 + (i % 3)}})
        })
        .collect();
    Value::Array(events).to_string()
}

fn usage(client: &reqwest::blocking::Client, p: &Proc, customer: &str, path: &str) -> u64 {
    let url = match path {
        "check" => format!(
            "{}/v1/check?customer={customer}&meter=api_requests&quantity=0",
            p.api
        ),
        _ => format!("{}/v1/usage?customer={customer}&meter=api_requests", p.api),
    };
    let v: Value = client.get(url).send().expect("reply").json().expect("json");
    v["usage"].as_u64().expect("usage")
}

#[test]
fn kill_9_after_a_202_loses_nothing_and_counts_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (api_port, admin_port) = (free_port(), free_port());
    let client = reqwest::blocking::Client::new();
    // A long flush interval: the kill comes before the aggregator wrote anything, so the restart
    // must rebuild everything from the log.
    let mut p = start(dir.path(), api_port, admin_port, "30s");
    let mut expected = [0u64; 5];
    let mut acked = Vec::new();
    for k in 0..40 {
        let body = batch(k);
        let r = p.post_batch(body.clone());
        assert_eq!(r.status().as_u16(), 202);
        let reply: Value = r.json().unwrap();
        assert_eq!(reply["accepted"], 50);
        for i in 0..50 {
            expected[i % 5] += 1 + (i as u64 % 3);
        }
        acked.push(body);
    }
    // SIGKILL straight after the last 202: no chance to flush anything.
    p.child.kill().unwrap();
    p.child.wait().unwrap();

    let mut p = start(dir.path(), api_port, admin_port, "50ms");
    // Every acknowledged event counts, once, in the enforcer and in the store.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got: Vec<u64> = (0..5)
            .map(|c| usage(&client, &p, &format!("crash-{c}"), "usage"))
            .collect();
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored usage {got:?} never reached {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for (c, want) in expected.iter().enumerate() {
        assert_eq!(usage(&client, &p, &format!("crash-{c}"), "check"), *want);
    }
    // Edge nodes that retry after the crash are told their events are duplicates.
    for body in &acked[35..] {
        let r: Value = p.post_batch(body.clone()).json().unwrap();
        assert_eq!(
            (r["accepted"].clone(), r["duplicates"].clone()),
            (json!(0), json!(50))
        );
    }
    // A graceful stop (SIGTERM) and a restart keep the same totals.
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = p.child.wait().unwrap();
    assert!(status.success(), "graceful stop exits 0, got {status}");
    let mut p = start(dir.path(), api_port, admin_port, "50ms");
    for (c, want) in expected.iter().enumerate() {
        assert_eq!(usage(&client, &p, &format!("crash-{c}"), "check"), *want);
        assert_eq!(usage(&client, &p, &format!("crash-{c}"), "usage"), *want);
    }
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

/// Events of payload meters (a decimal quantity, dimensions, the largest and smallest value,
/// distinct users) through kill -9 mid-flush, three times, each batch sent again after every
/// restart as an edge node would: the totals by dimension and the decimal sums count every
/// event once, the extremes are those of the events sent, and each user counts once.
#[test]
fn kill_9_mid_flush_counts_payload_meters_by_dimension_once() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "{}\n{}",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML,
            include_str!("fixtures/payload_meters.toml")
        ),
    )
    .unwrap();
    let catalog = catalog.to_string_lossy().into_owned();
    let env = [("TALLY_CATALOG_FILE", catalog.as_str())];
    let (api_port, admin_port) = (free_port(), free_port());
    let client = reqwest::blocking::Client::new();
    let regions = ["eu", "us", "ap"];
    let batch = |k: usize| -> String {
        let events: Vec<Value> = (0..60)
            .map(|i| {
                let (ty, data) = if i % 2 == 0 {
                    (
                        "request",
                        json!({"bytes": 10 + i, "region": regions[i % 3]}),
                    )
                } else {
                    // The last batch holds the period's largest decimal value.
                    let hours = if k == 29 && i == 59 { "7.5" } else { "0.125" };
                    ("gpu", json!({"hours": hours}))
                };
                json!({"specversion": "1.0", "id": format!("p{k}-{i}"), "source": "edge-crash",
                       "type": ty, "subject": "crash-payload", "data": data})
            })
            .chain((0..5).map(|j| {
                // 150 sessions of 37 users, each user in several batches.
                let user = format!("user-{}", (k * 5 + j) % 37);
                json!({"specversion": "1.0", "id": format!("s{k}-{j}"), "source": "edge-crash",
                       "type": "session", "subject": "crash-payload", "data": {"user": user}})
            }))
            .collect();
        Value::Array(events).to_string()
    };
    let mut want_bytes = [0u64; 3];
    for _ in 0..30 {
        for i in (0..60).step_by(2) {
            want_bytes[i % 3] += 10 + i as u64;
        }
    }
    let want_gpu = 899 * 125 + 7_500; // 899 events of 0.125 h and one of 7.5 h, at scale 3
    let mut p = start_with_env("run", dir.path(), api_port, admin_port, "100ms", &env);
    for round in 0..3 {
        // Send every batch (again, after a restart): what was acknowledged before is a duplicate.
        for k in 0..30 {
            let r = p.post_batch(batch(k));
            assert_eq!(r.status().as_u16(), 202, "round {round}, batch {k}");
            if round < 2 && k == 10 + round * 7 {
                // Mid-stream: batches after this one are sent again in the next round.
                break;
            }
        }
        p.child.kill().unwrap();
        p.child.wait().unwrap();
        p = start_with_env("run", dir.path(), api_port, admin_port, "100ms", &env);
    }
    let get = |path: &str| -> Value {
        client
            .get(format!("{}{path}", p.api))
            .send()
            .expect("reply")
            .json()
            .expect("json")
    };
    let want_groups: Vec<Value> = {
        let mut g: Vec<(u64, &str)> = want_bytes.iter().copied().zip(regions).collect();
        g.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        g.into_iter()
            .map(|(usage, r)| json!({"dimensions": {"region": r}, "usage": usage}))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let by_region = get("/v1/usage?customer=crash-payload&meter=request_bytes&group_by=region");
        let gpu = get("/v1/usage?customer=crash-payload&meter=gpu_hours");
        let peak = get("/v1/usage?customer=crash-payload&meter=peak_request_bytes");
        let least = get("/v1/usage?customer=crash-payload&meter=least_request_bytes");
        let peak_gpu = get("/v1/usage?customer=crash-payload&meter=peak_gpu_hours");
        let users = get("/v1/usage?customer=crash-payload&meter=active_users");
        if by_region["groups"] == json!(want_groups)
            && gpu["usage"] == want_gpu
            && peak["usage"] == 68
            && least["usage"] == 10
            && peak_gpu["usage"] == 7_500
            && users["usage"] == 37
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stored {by_region} / {gpu} / {peak} / {least} / {peak_gpu} / {users}, \
             want {want_groups:?}, {want_gpu}, 68, 10, 7500 and 37"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let check = get("/v1/check?customer=crash-payload&meter=gpu_hours&quantity=0");
    assert_eq!(check["usage"], want_gpu, "the enforcer agrees");
    let total: u64 = want_bytes.iter().sum();
    let check = get("/v1/check?customer=crash-payload&meter=request_bytes&quantity=0");
    assert_eq!(check["usage"], total);
    for (meter, want) in [
        ("peak_request_bytes", 68),
        ("least_request_bytes", 10),
        ("peak_gpu_hours", 7_500),
        ("active_users", 37),
    ] {
        let check = get(&format!(
            "/v1/check?customer=crash-payload&meter={meter}&quantity=0"
        ));
        assert_eq!(check["usage"], want, "{meter}: the enforcer agrees");
    }
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}
