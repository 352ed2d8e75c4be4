//! The real binary, killed with SIGKILL right after a 202: every acknowledged event is still
//! counted, once, after a restart.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{Proc, free_port, start};
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
