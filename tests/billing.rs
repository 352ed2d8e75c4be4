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

/// `tally billing reconcile` over the last `minutes` (to a minute ahead) finds no difference.
fn assert_reconciled<I, K, V>(env: I, data_dir: &std::path::Path, minutes: i64)
where
    I: IntoIterator<Item = (K, V)>,
    K: AsRef<std::ffi::OsStr>,
    V: AsRef<std::ffi::OsStr>,
{
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "billing",
            "reconcile",
            "--from",
            &now_rfc3339_minus(minutes),
            "--to",
            &now_rfc3339_minus(-1),
        ])
        .envs(env)
        .env("TALLY_DATA_DIR", data_dir)
        .env("TALLY_LOG", "warn")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(printed.trim(), "no differences");
}

fn put_customer(p: &Proc, id: &str, stripe: &str) {
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/v1/customers/{id}", p.api))
        .json(&json!({"stripe_customer_id": stripe}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
}

/// Posts events for customers `b-0..b-9` at `time`; returns what Stripe should
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

/// `tally run` reporting to `fake` every 200 ms through v1 meter events.
fn reporting_to(fake: &StripeFake, dir: &std::path::Path) -> Proc {
    let env = [
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_tally"),
        ("TALLY_STRIPE_API_BASE", fake.url.as_str()),
        ("TALLY_BILLING_SYNC_INTERVAL", "200ms"),
        ("TALLY_BILLING_SYNC_SETTLE", "1s"),
    ];
    start_with_env("run", dir, free_port(), free_port(), "50ms", &env)
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
    fault_run("v1");
}

/// The same through the v2 meter event stream (batches of up to 100 events).
#[test]
fn the_v2_stream_holds_exactly_tallys_totals_after_failures_and_a_kill() {
    fault_run("v2");
}

fn fault_run(api: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_tally"),
        ("TALLY_STRIPE_API_BASE", fake.url.as_str()),
        ("TALLY_STRIPE_METER_EVENTS_BASE", fake.url.as_str()),
        ("TALLY_STRIPE_METER_API", api),
        ("TALLY_BILLING_SYNC_INTERVAL", "300ms"),
        ("TALLY_BILLING_SYNC_SETTLE", "1s"),
    ];
    let (api, admin) = (free_port(), free_port());
    let mut p = start_with_env("run", dir.path(), api, admin, "50ms", &env);
    for c in 0..10 {
        put_customer(&p, &format!("b-{c}"), &format!("cus_{c}"));
    }
    // The first requests fail as Stripe can (429, 500, a connection closed without an answer,
    // 503), and one is accepted but its reply never arrives before the process is killed.
    fake.inject(&[
        Fault::Status(429),
        Fault::Status(500),
        Fault::DropConnection,
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
    assert!(inner.statuses.contains_key(&429) && inner.statuses.contains_key(&500));
    drop(inner);

    // `tally billing reconcile` finds no difference.
    assert_reconciled(env, dir.path(), 30 * 1440);
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

/// `t=..,v1=..` over `body` with `secret`, as Stripe signs.
fn stripe_signature(secret: &str, t: i64, body: &str) -> String {
    tally_enforcer::webhooks::signature(secret, t, body.as_bytes())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn deliver(p: &Proc, body: &Value, signature: Option<String>) -> (u16, Value) {
    let text = body.to_string();
    let mut req = reqwest::blocking::Client::new()
        .post(format!("{}/v1/webhooks/stripe", p.api))
        .header("content-type", "application/json")
        .body(text.clone());
    if let Some(sig) = signature {
        req = req.header("stripe-signature", sig);
    }
    let r = req.send().unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

fn signed(p: &Proc, body: &Value) -> (u16, Value) {
    let sig = stripe_signature("whsec_test", unix_now(), &body.to_string());
    deliver(p, body, Some(sig))
}

fn subscription(id: &str, created: i64, kind: &str, price: &str, start: i64, end: i64) -> Value {
    json!({"id": id, "type": kind, "created": created, "data": {"object": {
        "id": "sub_1", "object": "subscription", "customer": "cus_w1", "status": "active",
        "metadata": {"tally_customer_id": "w-1"},
        "current_period_start": start, "current_period_end": end,
        "items": {"data": [{"price": {"id": price, "product": "prod_x"}}]}}}})
}

#[test]
fn stripe_webhooks_set_plans_periods_and_payment_state_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TALLY_STRIPE_WEBHOOK_SECRET", "whsec_test"),
        (
            "TALLY_STRIPE_PLANS",
            "price_pro=professional,price_starter=starter",
        ),
    ];
    let p = start_with_env("run", dir.path(), free_port(), free_port(), "50ms", &env);
    let customer = || -> Value {
        reqwest::blocking::get(format!("{}/v1/customers/w-1", p.api))
            .unwrap()
            .json()
            .unwrap()
    };
    let now = unix_now();
    let (start, end) = (now - 86_400, now + 29 * 86_400);
    let created = subscription(
        "evt_1",
        1_000,
        "customer.subscription.created",
        "price_pro",
        start,
        end,
    );

    // Refused: no signature, a tampered body, an expired signature, another secret.
    assert_eq!(deliver(&p, &created, None).1["code"], "missing_signature");
    let sig = stripe_signature("whsec_test", now, &created.to_string());
    let mut tampered = created.clone();
    tampered["data"]["object"]["items"]["data"][0]["price"]["id"] = json!("price_starter");
    assert_eq!(
        deliver(&p, &tampered, Some(sig)).1["code"],
        "invalid_signature"
    );
    let old = stripe_signature("whsec_test", now - 400, &created.to_string());
    assert_eq!(
        deliver(&p, &created, Some(old)).1["code"],
        "signature_expired"
    );
    let other = stripe_signature("whsec_other", now, &created.to_string());
    let (status, body) = deliver(&p, &created, Some(other));
    assert_eq!(
        (status, body["code"].clone()),
        (400, json!("invalid_signature"))
    );
    assert_eq!(
        customer()["known"],
        false,
        "a refused delivery changed nothing"
    );

    // Applied, and the enforcer sees the new plan at once.
    assert_eq!(
        signed(&p, &created),
        (200, json!({"received": true, "outcome": "applied"}))
    );
    let c = customer();
    assert_eq!(
        (
            c["plan"].clone(),
            c["stripe_customer_id"].clone(),
            c["period_start"].clone()
        ),
        (
            json!("professional"),
            json!("cus_w1"),
            json!(tally_schemas::period::rfc3339(start * 1000))
        )
    );
    let check: Value = reqwest::blocking::get(format!(
        "{}/v1/check?customer=w-1&meter=api_requests&quantity=0",
        p.api
    ))
    .unwrap()
    .json()
    .unwrap();
    assert_eq!(check["limit"], 1_000_000);

    // Stripe retries a delivery: acknowledged, not applied again. An older event arriving
    // late does not move the subscription backwards.
    assert_eq!(signed(&p, &created).1["outcome"], "stale");
    let older = subscription(
        "evt_0",
        900,
        "customer.subscription.updated",
        "price_starter",
        start,
        end,
    );
    assert_eq!(signed(&p, &older).1["outcome"], "stale");
    assert_eq!(customer()["plan"], "professional");

    // A failed payment starts the grace (found by the Stripe customer id), a payment ends it.
    let invoice = |id: &str, created: i64, kind: &str| {
        json!({"id": id, "type": kind, "created": created,
               "data": {"object": {"id": "in_1", "object": "invoice", "customer": "cus_w1"}}})
    };
    assert_eq!(
        signed(&p, &invoice("evt_2", now - 60, "invoice.payment_failed")).1["outcome"],
        "applied"
    );
    let c = customer();
    assert_eq!(
        c["payment_failed_at"],
        json!(tally_schemas::period::rfc3339((now - 60) * 1000))
    );
    assert!(c["payment_grace_until"].is_string());
    assert_eq!(
        signed(&p, &invoice("evt_3", now - 30, "invoice.payment_succeeded")).1["outcome"],
        "applied"
    );
    assert_eq!(
        signed(&p, &invoice("evt_2", now - 60, "invoice.payment_failed")).1["outcome"],
        "stale"
    );
    assert!(customer()["payment_failed_at"].is_null());

    // Cancelled: back to the default plan.
    let deleted = subscription(
        "evt_4",
        1_100,
        "customer.subscription.deleted",
        "price_pro",
        start,
        end,
    );
    assert_eq!(signed(&p, &deleted).1["outcome"], "applied");
    assert_eq!(customer()["plan"], "free");
    // Stripe's meter error reports are recorded and shown.
    let report = json!({"id": "evt_6", "type": "v1.billing.meter.error_report_triggered",
        "created": 1_300, "data": {"object": {"summary": "1 event failed",
        "reason": {"error_types": [{"code": "meter_event_customer_not_found"}]}}}});
    assert_eq!(signed(&p, &report).1["outcome"], "recorded");
    let status: Value = reqwest::blocking::get(format!("{}/v1/billing/status", p.api))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(status["error_reports"][0]["event"], "evt_6");
    // Event types Tally does not use are acknowledged.
    let other = json!({"id": "evt_5", "type": "charge.succeeded", "created": 1_200, "data": {"object": {}}});
    assert_eq!(signed(&p, &other).1["outcome"], "ignored");
}

fn billing_status(p: &Proc) -> Value {
    reqwest::blocking::get(format!("{}/v1/billing/status", p.api))
        .unwrap()
        .json()
        .unwrap()
}

#[test]
fn stripe_refusals_are_recorded_shown_and_not_retried_forever() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let p = reporting_to(&fake, dir.path());
    // Stripe faults the event itself: it is set aside.
    fake.inject(&[Fault::Refuse(400, "parameter_invalid")]);
    put_customer(&p, "b-bad", "cus_bad");
    let event = json!({"specversion": "1.0", "id": "bad-1", "source": "edge-billing",
        "type": "api_requests", "subject": "b-bad", "time": now_rfc3339_minus(10),
        "data": {"value": 2}});
    assert_eq!(
        p.post_batch(json!([event]).to_string()).status().as_u16(),
        202
    );
    let status = || billing_status(&p);
    wait_for(
        "the refusal was not recorded",
        Duration::from_secs(30),
        || !status()["rejected"].as_array().unwrap().is_empty(),
    );
    let s = status();
    assert_eq!(s["mode"], "stripe");
    let r = &s["rejected"][0];
    assert_eq!(
        (
            r["report"]["customer"].clone(),
            r["report"]["value"].clone(),
            r["status"].clone()
        ),
        (json!("b-bad"), json!(2), json!(400))
    );
    // Set aside: not sent again in the rounds that follow.
    let refused = fake.inner.lock().unwrap().statuses[&400];
    assert_eq!(refused, 1);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fake.inner.lock().unwrap().statuses[&400], refused);
    assert_eq!(fake.accepted_count(), 0);
}

/// An operator lowers a customer's usage (here straight in the embedded store): the report
/// Stripe accepted minutes ago is cancelled with a meter event adjustment and the corrected
/// usage is reported again, under a new identifier.
#[test]
fn a_downward_correction_cancels_the_recent_report_and_reports_again() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let p = reporting_to(&fake, dir.path());
    put_customer(&p, "d-1", "cus_d1");
    let event = json!({"specversion": "1.0", "id": "corr-1", "source": "edge-billing",
        "type": "api_requests", "subject": "d-1", "time": now_rfc3339_minus(10),
        "data": {"value": 10}});
    assert_eq!(
        p.post_batch(json!([event]).to_string()).status().as_u16(),
        202
    );
    let key = ("cus_d1".to_owned(), "api_requests".to_owned());
    wait_for(
        "the first report never arrived",
        Duration::from_secs(30),
        || fake.totals().get(&key) == Some(&10),
    );
    let db = rusqlite::Connection::open(dir.path().join("usage.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    let changed = db
        .execute(
            "UPDATE usage_minute SET value = 4 WHERE customer = 'd-1' AND meter = 'api_requests'",
            [],
        )
        .unwrap();
    assert_eq!(changed, 1);
    wait_for(
        "the correction never reached Stripe",
        Duration::from_secs(30),
        || fake.totals().get(&key) == Some(&4),
    );
    std::thread::sleep(Duration::from_secs(1));
    let inner = fake.inner.lock().unwrap();
    assert_eq!(inner.cancelled.len(), 1);
    assert_eq!(inner.cancelled[0].value, 10);
    let ids: Vec<&str> = inner
        .accepted
        .iter()
        .map(|e| e.identifier.as_str())
        .collect();
    assert_eq!(ids.len(), 1);
    assert!(ids[0].ends_with(":4:g1"), "{ids:?}");
}

/// Refusals about the key, the account or the configuration (401, 403, 404, a meter or a
/// customer Stripe does not have) are outages: the report stays pending, is shown as held, and
/// goes through once fixed. Nothing is written off, nothing is billed twice.
#[test]
fn stripe_auth_and_configuration_refusals_are_retried_not_written_off() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let p = reporting_to(&fake, dir.path());
    fake.inject(&[
        Fault::Refuse(401, "api_key_expired"),
        Fault::Refuse(403, "secret_key_required"),
        Fault::Refuse(404, "resource_missing"),
    ]);
    put_customer(&p, "h-1", "cus_h1");
    // A Stripe customer id Stripe does not have (an operator's typo).
    put_customer(&p, "h-2", "acct_typo");
    let mut events = Vec::new();
    for (c, value) in [("h-1", 7), ("h-2", 5)] {
        events.push(json!({"specversion": "1.0", "id": format!("held-{c}"),
            "source": "edge-billing", "type": "api_requests", "subject": c,
            "time": now_rfc3339_minus(10), "data": {"value": value}}));
    }
    assert_eq!(
        p.post_batch(Value::Array(events).to_string())
            .status()
            .as_u16(),
        202
    );
    let h1 = ("cus_h1".to_owned(), "api_requests".to_owned());
    wait_for(
        "the report refused with 401, 403 and 404 never went through",
        Duration::from_secs(30),
        || fake.totals().get(&h1) == Some(&7),
    );
    wait_for(
        "the unknown Stripe customer's report is not shown as held",
        Duration::from_secs(30),
        || {
            billing_status(&p)["held"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["report"]["customer"] == "h-2" && h["status"] == 400)
        },
    );
    // Tried again round after round, never set aside.
    let refused = fake.inner.lock().unwrap().statuses[&400];
    wait_for(
        "the held report is not retried",
        Duration::from_secs(30),
        || fake.inner.lock().unwrap().statuses[&400] > refused,
    );
    let s = billing_status(&p);
    assert_eq!(s["rejected"], json!([]), "{s}");
    // The operator fixes the Stripe customer id: the same report goes to it, once.
    put_customer(&p, "h-2", "cus_h2");
    let h2 = ("cus_h2".to_owned(), "api_requests".to_owned());
    wait_for(
        "the fixed customer's report never went through",
        Duration::from_secs(30),
        || fake.totals().get(&h2) == Some(&5),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fake.totals().get(&h1), Some(&7));
    assert_eq!(fake.totals().get(&h2), Some(&5));
    assert_eq!(fake.accepted_count(), 2);
    let s = billing_status(&p);
    assert_eq!(
        (s["rejected"].clone(), s["held"].clone()),
        (json!([]), json!([])),
        "{s}"
    );
    let statuses = fake.inner.lock().unwrap().statuses.clone();
    for status in [401, 403, 404] {
        assert_eq!(statuses.get(&status), Some(&1), "{statuses:?}");
    }
}

/// The billing period moves mid-period (`PUT period_anchor`): what was reported under the
/// old period is not reported again under the new ones, and what comes after is reported
/// once. Stripe's totals equal Tally's (this reported the first events a second time).
#[test]
fn billing_period_move_mid_period_reports_nothing_twice() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let p = reporting_to(&fake, dir.path());
    put_customer(&p, "m-1", "cus_m1");
    let post = |id: &str, minutes_ago: i64, value: u64| {
        let event = json!({"specversion": "1.0", "id": id, "source": "edge-billing",
            "type": "api_requests", "subject": "m-1", "time": now_rfc3339_minus(minutes_ago),
            "data": {"value": value}});
        assert_eq!(
            p.post_batch(json!([event]).to_string()).status().as_u16(),
            202
        );
    };
    post("move-1", 240, 5);
    post("move-2", 10, 10);
    let key = ("cus_m1".to_owned(), "api_requests".to_owned());
    wait_for("the first reports", Duration::from_secs(30), || {
        fake.totals().get(&key) == Some(&15)
    });
    // The period now starts three hours ago: the first event falls in the new previous
    // period, the second in the new current one, both already reported.
    let r = reqwest::blocking::Client::new()
        .put(format!("{}/v1/customers/m-1", p.api))
        .json(&json!({"period_anchor": now_rfc3339_minus(180)}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
    post("move-3", 5, 7);
    wait_for("the report after the move", Duration::from_secs(30), || {
        fake.totals().get(&key) == Some(&22)
    });
    // Rounds go on every 200 ms: nothing more is reported.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fake.totals().get(&key),
        Some(&22),
        "Stripe holds Tally's total"
    );
    let usage: Value = reqwest::blocking::Client::new()
        .get(format!(
            "{}/v1/usage?customer=m-1&meter=api_requests&from={}",
            p.api,
            now_rfc3339_minus(24 * 60)
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let counted: u64 = usage["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 22, "{usage}");
}

/// A catalogue with a `unique_count` and a `max` meter, reported to Stripe meters with the
/// `last` formula.
const LAST_METERS_CATALOG: &str = "
[meters.active_users]
event_type = 'session'
value = '$.user'
aggregation = 'unique_count'
unit = 'users'

[meters.peak_request_bytes]
event_type = 'request'
value = '$.bytes'
aggregation = 'max'
unit = 'bytes'
";

/// `unique_count` and `max` meters named in `stripe_last_meters` reach Stripe as their
/// period's figure: Stripe's last value is Tally's figure after every change, through a kill
/// and a restart, nothing is sent while the figure stays, and reconcile finds no difference.
#[test]
fn figures_reach_stripe_meters_of_the_last_formula() {
    figures_run("v1");
}

/// The same through the v2 meter event stream.
#[test]
fn figures_reach_stripe_through_the_v2_stream() {
    figures_run("v2");
}

fn figures_run(api: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = StripeFake::start(&rt);
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "{}\n{LAST_METERS_CATALOG}",
            tally_schemas::catalog::DEFAULT_CATALOG_TOML
        ),
    )
    .unwrap();
    let catalog = catalog.to_string_lossy().into_owned();
    let env = [
        ("TALLY_CATALOG_FILE", catalog.as_str()),
        (
            "TALLY_STRIPE_LAST_METERS",
            "active_users,peak_request_bytes",
        ),
        ("TALLY_STRIPE_SECRET_KEY", "sk_test_tally"),
        ("TALLY_STRIPE_API_BASE", fake.url.as_str()),
        ("TALLY_STRIPE_METER_EVENTS_BASE", fake.url.as_str()),
        ("TALLY_STRIPE_METER_API", api),
        ("TALLY_BILLING_SYNC_INTERVAL", "200ms"),
        ("TALLY_BILLING_SYNC_SETTLE", "1s"),
    ];
    let (api_port, admin) = (free_port(), free_port());
    let mut p = start_with_env("run", dir.path(), api_port, admin, "50ms", &env);
    put_customer(&p, "f-1", "cus_f1");
    put_customer(&p, "f-2", "cus_f2");
    let time = now_rfc3339_minus(10);
    let post = |p: &Proc, events: &[(&str, &str, &str, Value)]| {
        let events: Vec<Value> = events
            .iter()
            .map(|(id, customer, ty, data)| {
                json!({"specversion": "1.0", "id": id, "source": "edge-billing", "type": ty,
                       "subject": customer, "time": time, "data": data})
            })
            .collect();
        assert_eq!(
            p.post_batch(Value::Array(events).to_string())
                .status()
                .as_u16(),
            202
        );
    };
    post(
        &p,
        &[
            ("1", "f-1", "session", json!({"user": "ann"})),
            ("2", "f-1", "session", json!({"user": "bob"})),
            ("3", "f-1", "session", json!({"user": "ann"})),
            ("4", "f-2", "session", json!({"user": "ann"})),
            ("5", "f-1", "request", json!({"bytes": 10})),
            ("6", "f-1", "request", json!({"bytes": 50})),
            ("7", "f-1", "request", json!({"bytes": 30})),
        ],
    );
    let key = |c: &str, m: &str| (format!("cus_{c}"), m.to_owned());
    let first = BTreeMap::from([
        (key("f1", "active_users"), 2),
        (key("f1", "peak_request_bytes"), 50),
        (key("f2", "active_users"), 1),
    ]);
    wait_for(
        "Stripe's last values never reached Tally's figures",
        Duration::from_secs(30),
        || fake.lasts() == first,
    );
    let sent = fake.accepted_count();
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    p = start_with_env("run", dir.path(), api_port, admin, "50ms", &env);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fake.accepted_count(),
        sent,
        "a figure already accepted is not sent again"
    );
    post(
        &p,
        &[
            ("8", "f-1", "session", json!({"user": "cy"})),
            ("9", "f-1", "session", json!({"user": "bob"})),
            ("10", "f-1", "request", json!({"bytes": 70})),
            ("11", "f-2", "request", json!({"bytes": 20})),
            ("12", "f-2", "session", json!({"user": "ann"})),
        ],
    );
    let second = BTreeMap::from([
        (key("f1", "active_users"), 3),
        (key("f1", "peak_request_bytes"), 70),
        (key("f2", "active_users"), 1),
        (key("f2", "peak_request_bytes"), 20),
    ]);
    wait_for(
        "Stripe's last values never followed Tally's figures",
        Duration::from_secs(30),
        || fake.lasts() == second,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(fake.lasts(), second);
    let inner = fake.inner.lock().unwrap();
    assert_eq!(inner.accepted.len(), 6, "one report per changed figure");
    let ids: std::collections::HashSet<&str> = inner
        .accepted
        .iter()
        .map(|e| e.identifier.as_str())
        .collect();
    assert_eq!(ids.len(), 6);
    drop(inner);
    assert_reconciled(env, dir.path(), 1440);
}
