//! Billing-sync against a Stripe-compatible fake: after 429s, 500s, a reply lost while the
//! process is SIGKILLed between sending and recording, and a restart, Stripe holds exactly
//! Tally's totals; Stripe's refusals are recorded and shown, not retried forever.

mod common;
#[path = "stripe_fake/mod.rs"]
mod stripe_fake;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::process::{Proc, free_port, start_with_env};
use serde_json::{Value, json};
use stripe_fake::{Fault, StripeFake};

fn now_rfc3339_minus(minutes: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    tally_schemas::period::rfc3339(now - minutes * 60_000)
}

fn put_customer(p: &Proc, id: &str, stripe: &str) {
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/v1/customers/{id}", p.api))
        .json(&json!({"stripe_customer_id": stripe}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
}

/// Posts events for customers `b-0..b-9` (and `b-bad`) at `time`; returns what Stripe should
/// hold per (Stripe customer, event name).
fn post_usage(p: &Proc, tag: &str, time: &str) -> BTreeMap<(String, String), u64> {
    let mut want = BTreeMap::new();
    let mut events = Vec::new();
    for c in 0..10 {
        for (i, (meter, value)) in [("api_requests", 3 + c), ("bandwidth_bytes", 1000 * (c + 1))]
            .into_iter()
            .enumerate()
        {
            events.push(json!({"specversion": "1.0", "id": format!("{tag}-{c}-{i}"),
                "source": "edge-billing", "type": meter, "subject": format!("b-{c}"),
                "time": time, "data": {"value": value}}));
            *want
                .entry((format!("cus_{c}"), meter.to_owned()))
                .or_insert(0) += value;
        }
    }
    events.push(
        json!({"specversion": "1.0", "id": format!("{tag}-bad"), "source": "edge-billing",
        "type": "api_requests", "subject": "b-bad", "time": time, "data": {"value": 1}}),
    );
    assert_eq!(
        p.post_batch(Value::Array(events).to_string())
            .status()
            .as_u16(),
        202
    );
    want
}

fn add(into: &mut BTreeMap<(String, String), u64>, from: BTreeMap<(String, String), u64>) {
    for (k, v) in from {
        *into.entry(k).or_insert(0) += v;
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn stripe_holds_exactly_tallys_totals_after_failures_and_a_kill() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_tally"),
        ("TALLY_STRIPE_API_BASE", fake.url.as_str()),
        ("TALLY_BILLING_SYNC_INTERVAL", "300ms"),
        ("TALLY_BILLING_SYNC_SETTLE", "1s"),
    ];
    let (api, admin) = (free_port(), free_port());
    let mut p = start_with_env("run", dir.path(), api, admin, "50ms", &env);
    for c in 0..10 {
        put_customer(&p, &format!("b-{c}"), &format!("cus_{c}"));
    }
    // Stripe does not know this one: its reports are refused.
    put_customer(&p, "b-bad", "acct_unknown");
    // The first requests fail as Stripe can, and one is accepted but its reply never arrives
    // before the process is killed.
    fake.inject(&[
        Fault::Status(429),
        Fault::Status(500),
        Fault::Status(429),
        Fault::Status(503),
        Fault::AcceptThenStall(Duration::from_secs(20)),
    ]);
    // Late events (ten minutes old) are in windows that are already settled.
    let mut want = post_usage(&p, "first", &now_rfc3339_minus(10));
    wait_for(
        "the stalled request never reached the fake",
        Duration::from_secs(30),
        || fake.inner.lock().unwrap().faults.is_empty() && fake.accepted_count() >= 10,
    );
    std::thread::sleep(Duration::from_millis(500));
    p.child.kill().unwrap();
    p.child.wait().unwrap();

    let p = start_with_env("run", dir.path(), api, admin, "50ms", &env);
    add(&mut want, post_usage(&p, "second", &now_rfc3339_minus(5)));
    wait_for(
        "Stripe's totals did not converge to Tally's",
        Duration::from_secs(60),
        || fake.totals() == want,
    );
    // Nothing more arrives: no report is sent twice.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fake.totals(), want);
    let inner = fake.inner.lock().unwrap();
    assert!(inner.replays >= 1, "the pending report was not sent again");
    assert!(inner.statuses.get(&429).is_some() && inner.statuses.get(&500).is_some());
    drop(inner);

    // The refusal is recorded and shown, and was not retried forever.
    let status: Value = reqwest::blocking::get(format!("{}/v1/billing/status", p.api))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["mode"], "stripe");
    let rejected = status["rejected"].as_array().unwrap();
    assert!(
        rejected
            .iter()
            .any(|r| r["report"]["customer"] == "b-bad" && r["status"] == 400),
        "{status}"
    );
    let refused_before = fake.inner.lock().unwrap().statuses[&400];
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fake.inner.lock().unwrap().statuses[&400], refused_before);
    // Tally's own totals agree with what Stripe holds.
    let client = reqwest::blocking::Client::new();
    for c in 0..10 {
        let v: Value = client
            .get(format!(
                "{}/v1/usage?customer=b-{c}&meter=bandwidth_bytes",
                p.api
            ))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(
            v["usage"].as_u64().unwrap(),
            want[&(format!("cus_{c}"), "bandwidth_bytes".to_owned())]
        );
    }
}
