//! The public contract, end to end through the router: ingest content types and errors,
//! duplicates, quota thresholds, grace expiry, customers, usage queries, restarts.

mod common;

use std::time::Duration;

use common::{NOW, Tally, event, ms};
use serde_json::{Value, json};

#[tokio::test]
async fn every_content_type_is_accepted() {
    let t = Tally::start().await;
    let e = |id: &str| event(id, "ct", "api_requests", 1, NOW);
    let (s, b) = t.post("/v1/events", "application/json", e("1")).await;
    assert_eq!((s.as_u16(), &b["accepted"]), (202, &json!(1)), "{b}");
    let (s, b) = t
        .post(
            "/v1/events",
            "application/cloudevents+json; charset=utf-8",
            e("2"),
        )
        .await;
    assert_eq!((s.as_u16(), &b["accepted"]), (202, &json!(1)), "{b}");
    let batch = format!("[{},{}]", e("3"), e("4"));
    let (s, b) = t
        .post(
            "/v1/events",
            "application/cloudevents-batch+json",
            batch.clone(),
        )
        .await;
    assert_eq!((s.as_u16(), &b["accepted"]), (202, &json!(2)), "{b}");
    let batch = format!("[{},{}]", e("5"), e("6"));
    let (s, b) = t.post("/v1/events", "application/json", batch).await;
    assert_eq!((s.as_u16(), &b["accepted"]), (202, &json!(2)), "{b}");
    let nd = format!("{}\n{}\n\n{}\n", e("7"), e("8"), e("9"));
    let (s, b) = t.post("/v1/events", "application/x-ndjson", nd).await;
    assert_eq!((s.as_u16(), &b["accepted"]), (202, &json!(3)), "{b}");
    let (s, b) = t.post("/v1/events", "text/plain", e("10")).await;
    assert_eq!(
        (s.as_u16(), &b["code"]),
        (415, &json!("unsupported_media_type"))
    );
    t.wait_usage("ct", "api_requests", 9).await;
    t.wait_stored("ct", "api_requests", 9).await;
}

#[tokio::test]
async fn a_batch_of_ten_thousand_events_is_accepted() {
    let t = Tally::start().await;
    let body: Vec<String> = (0..10_000)
        .map(|i| {
            event(
                &format!("big-{i}"),
                &format!("c{}", i % 100),
                "bandwidth_bytes",
                1_000,
                NOW,
            )
        })
        .collect();
    let (s, b) = t
        .post(
            "/v1/events",
            "application/cloudevents-batch+json",
            format!("[{}]", body.join(",")),
        )
        .await;
    assert_eq!(s.as_u16(), 202);
    assert_eq!(b["accepted"], 10_000);
    t.wait_usage("c7", "bandwidth_bytes", 100_000).await;
    t.wait_stored("c99", "bandwidth_bytes", 100_000).await;
}

#[tokio::test]
async fn invalid_events_get_codes_and_never_block_valid_ones() {
    let t = Tally::start().await;
    let cases = [
        (r#"{"specversion":"1.0","source":"s","type":"api_requests","subject":"c"}"#.to_string(), "missing_field"),
        (r#"{"specversion":"1.0","id":5,"source":"s","type":"api_requests","subject":"c"}"#.to_string(), "invalid_type"),
        (r#"{"specversion":"1.0","id":"x","source":"s","type":"api_requests","subject":"c","data":{"value":-3}}"#.to_string(), "negative_value"),
        (r#"{"specversion":"1.0","id":"x","source":"s","type":"api_requests","subject":"c","data":{"value":2.5}}"#.to_string(), "value_not_integer"),
        (r#"{"specversion":"1.0","id":"x","source":"s","type":"gpu_seconds","subject":"c"}"#.to_string(), "unknown_meter"),
        (r#"{"specversion":"1.0","id":"x","source":"s","type":"api_requests","subject":"c","time":"2026-01-01T00:00:00Z"}"#.to_string(), "event_too_old"),
        ("{not json".to_string(), "malformed_json"),
    ];
    for (body, code) in &cases {
        let (s, b) = t.post("/v1/events", "application/json", body.clone()).await;
        assert_eq!(s.as_u16(), 400, "{body}: {b}");
        assert_eq!(b["code"], *code, "{body}: {b}");
        assert!(b["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A batch mixing valid and invalid events: the valid ones are accepted, the others listed
    // by index.
    let batch = format!(
        "[{},{},{},{}]",
        event("ok-1", "mix", "api_requests", 2, NOW),
        cases[2].0,
        event("ok-2", "mix", "api_requests", 3, NOW),
        cases[4].0
    );
    let (s, b) = t
        .post("/v1/events", "application/cloudevents-batch+json", batch)
        .await;
    assert_eq!(s.as_u16(), 202, "{b}");
    assert_eq!(
        (b["accepted"].clone(), b["rejected"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(
        b["errors"][0],
        json!({"index": 1, "code": "negative_value", "message": "data.value must not be negative"})
    );
    assert_eq!(b["errors"][1]["index"], 3);
    assert_eq!(b["errors"][1]["code"], "unknown_meter");
    // NDJSON: a bad line is reported by its index too.
    let nd = format!("{}\nnope\n", event("ok-3", "mix", "api_requests", 5, NOW));
    let (s, b) = t.post("/v1/events", "application/x-ndjson", nd).await;
    assert_eq!(
        (s.as_u16(), b["errors"][0]["index"].clone()),
        (202, json!(1)),
        "{b}"
    );
    assert_eq!(b["errors"][0]["code"], "malformed_json");
    // All invalid: 400 with every fault listed.
    let (s, b) = t
        .post(
            "/v1/events",
            "application/json",
            format!("[{},{}]", cases[0].0, cases[1].0),
        )
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone(), b["rejected"].clone()),
        (400, json!("invalid_events"), json!(2))
    );
    // Not an array for the batch content type.
    let (s, b) = t
        .post("/v1/events", "application/cloudevents-batch+json", "{}")
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("invalid_type"))
    );
    t.wait_usage("mix", "api_requests", 10).await;
}

#[tokio::test]
async fn oversize_bodies_and_batches_are_refused_without_losing_accepted_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(dir.path());
    config.max_body_bytes = 4_096;
    config.max_batch_events = 3;
    let t = Tally::start_with(dir, config).await;
    let (s, _) = t
        .post(
            "/v1/events",
            "application/json",
            event("kept", "big", "api_requests", 7, NOW),
        )
        .await;
    assert_eq!(s.as_u16(), 202);
    let huge = format!(
        "[{}]",
        vec![event("x", "big", "api_requests", 1, NOW); 40].join(",")
    );
    let (s, b) = t.post("/v1/events", "application/json", huge).await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (413, json!("body_too_large")),
        "{b}"
    );
    let four = format!(
        "[{}]",
        (0..4)
            .map(|i| event(&i.to_string(), "big", "api_requests", 1, NOW))
            .collect::<Vec<_>>()
            .join(",")
    );
    let (s, b) = t.post("/v1/events", "application/json", four).await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (413, json!("too_many_events")),
        "{b}"
    );
    t.wait_stored("big", "api_requests", 7).await;
}

#[tokio::test]
async fn the_same_source_and_id_counts_once() {
    let t = Tally::start().await;
    let e = event("dup-1", "dup", "api_requests", 5, NOW);
    let (_, b) = t.post("/v1/events", "application/json", e.clone()).await;
    assert_eq!(
        (b["accepted"].clone(), b["duplicates"].clone()),
        (json!(1), json!(0))
    );
    let (_, b) = t
        .post("/v1/events", "application/json", format!("[{e},{e}]"))
        .await;
    assert_eq!(
        (b["accepted"].clone(), b["duplicates"].clone()),
        (json!(0), json!(2))
    );
    // The same id from another source is another event.
    let other = e.replace("edge-test", "edge-other");
    let (_, b) = t.post("/v1/events", "application/json", other).await;
    assert_eq!(b["accepted"], 1);
    t.wait_usage("dup", "api_requests", 10).await;
    t.wait_stored("dup", "api_requests", 10).await;
}

#[tokio::test]
async fn thresholds_at_each_boundary() {
    let t = Tally::start().await;
    // Free plan: 10,000 requests. Usage -> (status, decision, threshold).
    let cases = [
        (7_990, 200, "allow", json!(null)),
        (8_000, 200, "warn", json!(80)),
        (9_990, 200, "warn", json!(80)),
        (10_000, 200, "warn", json!(100)),
        (10_990, 200, "warn", json!(100)),
        (11_000, 429, "block", json!(110)),
    ];
    for (i, (usage, status, decision, threshold)) in cases.into_iter().enumerate() {
        let customer = format!("edge-{i}");
        t.post(
            "/v1/events",
            "application/json",
            event(&customer, &customer, "api_requests", usage, NOW),
        )
        .await;
        t.wait_usage(&customer, "api_requests", usage).await;
        let (s, h, b) = t.check(&customer, "api_requests", 0).await;
        assert_eq!(s.as_u16(), status, "{usage}: {b}");
        assert_eq!(b["decision"], decision, "{usage}: {b}");
        assert_eq!(b["threshold"], threshold, "{usage}: {b}");
        assert_eq!(b["limit"], 10_000);
        assert_eq!(b["percent"], json!(usage as f64 / 100.0));
        assert_eq!(h["ratelimit-policy"], "\"quota\";q=10000;w=2592000");
        if status == 429 {
            assert_eq!(h["content-type"], "application/problem+json");
            assert_eq!(b["status"], 429);
            assert!(h.contains_key("retry-after"));
        }
    }
    // The quantity about to be used counts: 7,990 + 10 reaches 80 %.
    let (_, _, b) = t.check("edge-0", "api_requests", 10).await;
    assert_eq!(
        (b["decision"].clone(), b["threshold"].clone()),
        (json!("warn"), json!(80))
    );
    // A check does not count usage.
    let (_, _, b) = t.check("edge-0", "api_requests", 0).await;
    assert_eq!(b["usage"], 7_990);
}

#[tokio::test]
async fn the_soft_limit_grace_expires_after_48_hours() {
    let t = Tally::start().await;
    t.post(
        "/v1/events",
        "application/json",
        event("g", "grace", "api_requests", 10_500, NOW),
    )
    .await;
    t.wait_usage("grace", "api_requests", 10_500).await;
    let (s, _, b) = t.check("grace", "api_requests", 1).await;
    assert_eq!((s.as_u16(), b["decision"].clone()), (200, json!("warn")));
    assert_eq!(b["grace_until"], "2026-11-23T10:00:00Z");
    assert_eq!(b["state"], "over");
    t.clock.set(ms("2026-11-23T09:59:59Z"));
    let (s, _, _) = t.check("grace", "api_requests", 1).await;
    assert_eq!(s.as_u16(), 200);
    t.clock.set(ms("2026-11-23T10:00:00Z"));
    let (s, _, b) = t.check("grace", "api_requests", 1).await;
    assert_eq!(
        (s.as_u16(), b["decision"].clone(), b["state"].clone()),
        (429, json!("block"), json!("blocked"))
    );
    // The grace survives a restart: it is rebuilt from the published notification.
    let t = t.restart().await;
    let (s, _, b) = t.check("grace", "api_requests", 1).await;
    assert_eq!(s.as_u16(), 429, "{b}");
    assert_eq!(b["grace_until"], "2026-11-23T10:00:00Z");
}

/// The enforcer's check and the query API's period usage of customer `lc` agree on the grace.
async fn grace_agrees(t: &Tally, decision: &str, state: &str, until: &str) {
    let (_, _, check) = t.check("lc", "api_requests", 0).await;
    let (_, usage) = t.get("/v1/usage?customer=lc&meter=api_requests").await;
    assert_eq!(
        (&check["decision"], &check["grace_until"]),
        (&json!(decision), &json!(until)),
        "{check}"
    );
    assert_eq!(
        (&usage["state"], &usage["grace_until"], &usage["limit"]),
        (&json!(state), &json!(until), &json!(100_000)),
        "{usage}"
    );
}

#[tokio::test]
async fn a_limit_changed_mid_period_gives_a_fresh_grace_in_the_enforcer_and_the_query_api() {
    let t = Tally::start().await;
    let (s, _) = t
        .put("/v1/customers/lc", json!({"plan": "professional"}))
        .await;
    assert_eq!(s.as_u16(), 200);
    t.post(
        "/v1/events",
        "application/json",
        event(
            "lc-1",
            "lc",
            "api_requests",
            105_000,
            "2026-11-02T10:00:00Z",
        ),
    )
    .await;
    t.wait_usage("lc", "api_requests", 105_000).await;
    // Down to starter (100k) at NOW: 105 % of the new limit, with no event crossing it.
    let (s, _) = t.put("/v1/customers/lc", json!({"plan": "starter"})).await;
    assert_eq!(s.as_u16(), 200);
    let until = "2026-11-23T10:00:00Z";
    // The query API reads the store: wait for the aggregator.
    for _ in 0..500 {
        let (_, usage) = t.get("/v1/usage?customer=lc&meter=api_requests").await;
        if usage["usage"] == 105_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    grace_agrees(&t, "warn", "over", until).await;
    t.clock.set(ms("2026-11-23T09:59:59Z"));
    grace_agrees(&t, "warn", "over", until).await;
    t.clock.set(ms(until));
    grace_agrees(&t, "block", "blocked", until).await;
    // The change time is kept with the customer: the same after a restart.
    let t = t.restart().await;
    grace_agrees(&t, "block", "blocked", until).await;
    // Back up to professional: under its soft limit, no grace anywhere.
    let (s, _) = t
        .put("/v1/customers/lc", json!({"plan": "professional"}))
        .await;
    assert_eq!(s.as_u16(), 200);
    let (_, _, check) = t.check("lc", "api_requests", 0).await;
    let (_, usage) = t.get("/v1/usage?customer=lc&meter=api_requests").await;
    assert_eq!(
        (&check["decision"], &check["grace_until"]),
        (&json!("allow"), &Value::Null)
    );
    assert_eq!(
        (&usage["state"], &usage["grace_until"]),
        (&json!("ok"), &Value::Null)
    );
}

#[tokio::test]
async fn customers_get_plans_overrides_and_anchored_periods() {
    let t = Tally::start().await;
    let (s, b) = t.get("/v1/customers/acme").await;
    assert_eq!(
        (s.as_u16(), b["plan"].clone(), b["known"].clone()),
        (200, json!("free"), json!(false))
    );
    let (s, b) = t
        .put("/v1/customers/acme", json!({"plan": "starter"}))
        .await;
    assert_eq!(
        (s.as_u16(), b["plan"].clone()),
        (200, json!("starter")),
        "{b}"
    );
    t.post(
        "/v1/events",
        "application/json",
        event("a1", "acme", "api_requests", 90_000, NOW),
    )
    .await;
    t.wait_usage("acme", "api_requests", 90_000).await;
    let (_, _, b) = t.check("acme", "api_requests", 0).await;
    assert_eq!(
        (
            b["limit"].clone(),
            b["threshold"].clone(),
            b["plan"].clone()
        ),
        (json!(100_000), json!(80), json!("starter"))
    );
    // Overrides, then an anchor: the period follows it, and the usage of the new period is
    // read back from the store.
    t.wait_stored("acme", "api_requests", 90_000).await;
    let (s, b) = t
        .put(
            "/v1/customers/acme",
            json!({"limits": {"api_requests": 1_000_000}, "period_anchor": "2026-03-15T00:00:00Z"}),
        )
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(
        (b["period_start"].clone(), b["period_end"].clone()),
        (json!("2026-11-15T00:00:00Z"), json!("2026-12-15T00:00:00Z"))
    );
    assert_eq!(b["plan"], "starter", "members left out keep their value");
    let (_, _, b) = t.check("acme", "api_requests", 0).await;
    assert_eq!(
        (
            b["limit"].clone(),
            b["usage"].clone(),
            b["decision"].clone()
        ),
        (json!(1_000_000), json!(90_000), json!("allow"))
    );
    assert_eq!(b["period_start"], "2026-11-15T00:00:00Z");
    // Bad input.
    let (s, b) = t
        .put("/v1/customers/acme", json!({"plan": "platinum"}))
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("unknown_plan"))
    );
    let (s, b) = t
        .put("/v1/customers/acme", json!({"limits": {"gpu": 1}}))
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("unknown_meter"))
    );
    let (s, b) = t
        .put(
            "/v1/customers/acme",
            json!({"plan": "pro", "colour": "red"}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (422, json!("invalid_request")),
        "{b}"
    );
    let (s, b) = t
        .put("/v1/customers/bad%20id", json!({"plan": "starter"}))
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("invalid_customer"))
    );
    // A failed payment: the plan holds for 7 days, then Free applies.
    let (s, _) = t
        .put(
            "/v1/customers/acme",
            json!({"limits": null, "payment_failed_at": "2026-11-21T10:00:00Z"}),
        )
        .await;
    assert_eq!(s.as_u16(), 200);
    let (_, _, b) = t.check("acme", "api_requests", 0).await;
    assert_eq!(
        (b["plan"].clone(), b["limit"].clone()),
        (json!("starter"), json!(100_000))
    );
    t.clock.set(ms("2026-11-28T10:00:00Z"));
    let (s, _, b) = t.check("acme", "api_requests", 0).await;
    assert_eq!(
        (s.as_u16(), b["plan"].clone(), b["limit"].clone()),
        (429, json!("free"), json!(10_000))
    );
}

#[tokio::test]
async fn check_by_query_string_and_its_errors() {
    let t = Tally::start().await;
    let (s, b) = t
        .get("/v1/check?customer=q1&meter=build_minutes&quantity=30")
        .await;
    assert_eq!(
        (s.as_u16(), b["decision"].clone(), b["remaining"].clone()),
        (200, json!("allow"), json!(70))
    );
    let (s, b) = t
        .get("/v1/check?customer=q1&meter=build_minutes&quantity=-1")
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("invalid_request")),
        "{b}"
    );
    let (s, b) = t.get("/v1/check?meter=build_minutes").await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("missing_parameter"))
    );
    let (s, b) = t.get("/v1/check?customer=q1&meter=gpu").await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (404, json!("unknown_meter"))
    );
    let (s, b) = t.post("/v1/check", "application/json", "{").await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("invalid_request")),
        "{b}"
    );
    let (s, b) = t.get("/v1/nothing").await;
    assert_eq!((s.as_u16(), b["code"].clone()), (404, json!("not_found")));
    // Unlimited meters never block and carry no RateLimit policy.
    let (s, h, b) = t.check("q1", "storage_bytes", u64::MAX / 2).await;
    assert_eq!((s.as_u16(), b["limit"].clone()), (200, json!(null)));
    assert!(!h["ratelimit-policy"].to_str().unwrap().contains("quota"));
}

#[tokio::test]
async fn usage_series_by_window_and_gauges() {
    let t = Tally::start().await;
    let events = [
        ("s1", "api_requests", 2, "2026-11-21T08:10:00Z"),
        ("s2", "api_requests", 3, "2026-11-21T08:50:00Z"),
        ("s3", "api_requests", 4, "2026-11-21T09:05:00Z"),
        ("s4", "api_requests", 8, "2026-11-20T12:00:00Z"),
        ("g1", "wasm_modules", 2, "2026-11-21T08:00:00Z"),
        ("g2", "wasm_modules", 3, "2026-11-21T09:30:00Z"),
    ];
    let body: Vec<String> = events
        .iter()
        .map(|(id, m, v, at)| event(id, "ser", m, *v, at))
        .collect();
    t.post("/v1/events", "application/x-ndjson", body.join("\n"))
        .await;
    t.wait_stored("ser", "api_requests", 17).await;
    let (s, b) = t.get("/v1/usage?customer=ser&meter=api_requests&from=2026-11-21T00:00:00Z&to=2026-11-21T10:00:00Z&window=hour").await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(
        b["points"],
        json!([
            {"start": "2026-11-21T08:00:00Z", "end": "2026-11-21T09:00:00Z", "value": 5},
            {"start": "2026-11-21T09:00:00Z", "end": "2026-11-21T10:00:00Z", "value": 4}
        ])
    );
    let (_, b) = t
        .get("/v1/usage?customer=ser&meter=api_requests&from=2026-11-01T00:00:00Z&window=day")
        .await;
    assert_eq!(
        b["points"],
        json!([
            {"start": "2026-11-20T00:00:00Z", "end": "2026-11-21T00:00:00Z", "value": 8},
            {"start": "2026-11-21T00:00:00Z", "end": "2026-11-22T00:00:00Z", "value": 9}
        ])
    );
    let (_, b) = t
        .get("/v1/usage?customer=ser&meter=api_requests&from=2026-01-01T00:00:00Z&window=month")
        .await;
    assert_eq!(
        b["points"],
        json!([{"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z", "value": 17}])
    );
    t.wait_stored("ser", "wasm_modules", 3).await;
    let (_, b) = t.get("/v1/usage?customer=ser&meter=wasm_modules").await;
    assert_eq!(
        (
            b["limit"].clone(),
            b["percent"].clone(),
            b["threshold"].clone()
        ),
        (json!(3), json!(100.0), json!(100))
    );
    let (s, b) = t.get("/v1/usage?customer=ser&meter=api_requests&from=2026-11-21T10:00:00Z&to=2026-11-21T09:00:00Z").await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("invalid_range"))
    );
    let (s, b) = t
        .get("/v1/usage?customer=ser&meter=api_requests&from=2020-01-01T00:00:00Z&window=minute")
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("range_too_large"))
    );
    let (s, b) = t
        .get("/v1/usage?customer=ser&meter=api_requests&from=yesterday")
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (400, json!("invalid_time"))
    );
}

#[tokio::test]
async fn a_restart_keeps_every_count_once() {
    let t = Tally::start().await;
    for i in 0..20 {
        let (s, _) = t
            .post(
                "/v1/events",
                "application/json",
                event(&format!("r{i}"), "rs", "api_requests", 100, NOW),
            )
            .await;
        assert_eq!(s.as_u16(), 202);
    }
    t.wait_usage("rs", "api_requests", 2_000).await;
    let t = t.restart().await;
    t.wait_usage("rs", "api_requests", 2_000).await;
    t.wait_stored("rs", "api_requests", 2_000).await;
    // Replayed after the restart: still counted once.
    let (_, b) = t
        .post(
            "/v1/events",
            "application/json",
            event("r3", "rs", "api_requests", 100, NOW),
        )
        .await;
    assert_eq!(b["duplicates"], 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_, _, b) = t.check("rs", "api_requests", 0).await;
    assert_eq!(b["usage"], 2_000);
}

#[tokio::test]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let t = Tally::start().await;
    t.post(
        "/v1/events",
        "application/json",
        event("m1", "met", "api_requests", 1, NOW),
    )
    .await;
    t.post("/v1/events", "application/json", "{").await;
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    for path in ["/healthz", "/readyz"] {
        let resp = t.app.admin.clone().oneshot(get(path)).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{path}");
    }
    let resp = t.app.admin.clone().oneshot(get("/metrics")).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    for needle in [
        "tally_ingest_events_total{outcome=\"accepted\"}",
        "tally_ingest_rejected_events_total{code=\"malformed_json\"}",
        "tally_http_requests_total{method=\"POST\",route=\"/v1/events\",status=\"202\"}",
        "tally_log_commit_seconds_count",
    ] {
        assert!(text.contains(needle), "missing {needle}");
    }
    // Never labelled by customer.
    assert!(!text.contains("met\""));
}

#[tokio::test]
async fn every_gateway_protocol_answers_the_same_decision() {
    use axum::body::Body;
    use axum::http::Request;
    let t = Tally::start().await;
    let usage = [("fa-ok", 100), ("fa-warn", 8_500), ("fa-block", 12_000)];
    for (c, v) in usage {
        t.post(
            "/v1/events",
            "application/json",
            event(c, c, "api_requests", v, NOW),
        )
        .await;
        t.wait_usage(c, "api_requests", v).await;
    }
    // customer, decision, JSON status, nginx status, Traefik and Envoy status
    let cases = [
        ("fa-ok", "allow", 200, 200, 200),
        ("fa-warn", "warn", 200, 200, 200),
        ("fa-block", "block", 429, 403, 429),
    ];
    for (customer, decision, json_status, nginx_status, other_status) in cases {
        let (s, _, b) = t.check(customer, "api_requests", 1).await;
        assert_eq!(
            (s.as_u16(), b["decision"].clone()),
            (json_status, json!(decision))
        );
        let requests = [
            ("/v1/forward-auth/nginx".to_string(), true, nginx_status),
            (
                format!("/v1/forward-auth/nginx/{customer}/api_requests"),
                false,
                nginx_status,
            ),
            ("/v1/forward-auth/traefik".to_string(), true, other_status),
            (
                format!("/v1/forward-auth/traefik/{customer}"),
                false,
                other_status,
            ),
            (
                "/v1/forward-auth/envoy/app/orders?id=7".to_string(),
                true,
                other_status,
            ),
        ];
        for (uri, by_header, status) in requests {
            let mut req = Request::get(uri.as_str());
            if by_header {
                req = req
                    .header("x-tally-customer", customer)
                    .header("x-tally-meter", "api_requests");
            }
            let (s, h, _) = t.send(req.body(Body::empty()).unwrap()).await;
            assert_eq!(s.as_u16(), status, "{uri} for {customer}");
            assert_eq!(h["tally-decision"], decision, "{uri}");
            assert!(
                h["ratelimit-policy"]
                    .to_str()
                    .unwrap()
                    .contains("\"quota\";q=10000")
            );
            assert_eq!(h.contains_key("retry-after"), decision == "block", "{uri}");
        }
    }
    // The URL is the gateway's configuration and wins over headers a client may send.
    for uri in [
        "/v1/forward-auth/nginx/fa-block/api_requests/1",
        "/v1/forward-auth/traefik?customer=fa-block&meter=api_requests&quantity=1",
    ] {
        let req = Request::get(uri)
            .header("x-tally-customer", "fa-ok")
            .header("x-tally-meter", "build_minutes")
            .header("x-tally-quantity", "0")
            .body(Body::empty())
            .unwrap();
        let (_, h, _) = t.send(req).await;
        assert_eq!(h["tally-decision"], "block", "{uri}");
    }
    // Envoy's URL ends with the client's path and query: never read.
    let req = Request::get("/v1/forward-auth/envoy/x?customer=fa-block")
        .header("x-tally-customer", "fa-ok")
        .body(Body::empty())
        .unwrap();
    let (_, h, _) = t.send(req).await;
    assert_eq!(h["tally-decision"], "allow");
    let (s, _, b) = t
        .send(
            Request::get("/v1/forward-auth/envoy/x")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (401, json!("missing_customer"))
    );
    let (s, _, b) = t
        .send(
            Request::get("/v1/forward-auth/kong")
                .header("x-tally-customer", "c")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(
        (s.as_u16(), b["code"].clone()),
        (404, json!("unknown_gateway"))
    );
}

#[tokio::test]
async fn plan_rate_limits_allow_bursts_then_answer_429() {
    use axum::body::Body;
    use axum::http::Request;
    let dir = tempfile::tempdir().unwrap();
    let catalog = tally_schemas::catalog::DEFAULT_CATALOG_TOML.replace(
        "rate_limit = { per_second = 20, burst = 40 }",
        "rate_limit = { per_second = 1, burst = 3 }",
    );
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, catalog).unwrap();
    let mut config = common::config(dir.path());
    config.catalog_file = Some(path);
    let t = Tally::start_with(dir, config).await;
    for n in 0..3 {
        let (s, h, _) = t.check("rl", "api_requests", 1).await;
        assert_eq!(s.as_u16(), 200, "check {n}");
        assert_eq!(
            h["ratelimit"].to_str().unwrap(),
            format!("\"quota\";r=9999;t=828000, \"rate\";r={};t=0", 2 - n)
        );
    }
    let (s, h, b) = t.check("rl", "api_requests", 1).await;
    assert_eq!(
        (s.as_u16(), b["reason"].clone(), b["type"].clone()),
        (
            429,
            json!("rate_limit"),
            json!("urn:tally:problem:rate-limited")
        )
    );
    assert_eq!(h["retry-after"], "1");
    assert!(
        h["ratelimit-policy"]
            .to_str()
            .unwrap()
            .ends_with("\"rate\";q=1;w=1")
    );
    // A status check (quantity 0 on the check API) does not count; a request passing through
    // a gateway does, whatever quantity it names.
    for _ in 0..5 {
        let (s, _, _) = t.check("rl-gw", "api_requests", 0).await;
        assert_eq!(s.as_u16(), 200);
    }
    for n in 0..4 {
        let req = Request::get("/v1/forward-auth/traefik/rl-gw")
            .header("x-tally-quantity", "0")
            .body(Body::empty())
            .unwrap();
        let (s, _, _) = t.send(req).await;
        assert_eq!(s.as_u16(), if n < 3 { 200 } else { 429 }, "request {n}");
    }
    // Quota blocks say so.
    t.post(
        "/v1/events",
        "application/json",
        event("q", "rl-quota", "api_requests", 11_000, NOW),
    )
    .await;
    t.wait_usage("rl-quota", "api_requests", 11_000).await;
    let (_, _, b) = t.check("rl-quota", "api_requests", 1).await;
    assert_eq!(b["reason"], "quota");
}

#[tokio::test]
async fn the_period_rolls_over_at_the_subscription_anchor() {
    let t = Tally::start().await;
    let (s, _) = t
        .put(
            "/v1/customers/roll",
            json!({"period_anchor": "2026-03-15T06:00:00Z"}),
        )
        .await;
    assert_eq!(s.as_u16(), 200);
    t.post(
        "/v1/events",
        "application/json",
        event("r1", "roll", "api_requests", 9_000, NOW),
    )
    .await;
    t.wait_usage("roll", "api_requests", 9_000).await;
    let (_, _, b) = t.check("roll", "api_requests", 0).await;
    assert_eq!(
        (b["period_start"].clone(), b["period_end"].clone()),
        (json!("2026-11-15T06:00:00Z"), json!("2026-12-15T06:00:00Z"))
    );
    t.clock.set(ms("2026-12-15T05:59:59Z"));
    let (_, _, b) = t.check("roll", "api_requests", 0).await;
    assert_eq!(
        (b["usage"].clone(), b["threshold"].clone()),
        (json!(9_000), json!(80))
    );
    t.clock.set(ms("2026-12-15T06:00:00Z"));
    let (_, _, b) = t.check("roll", "api_requests", 0).await;
    assert_eq!(
        (b["usage"].clone(), b["decision"].clone()),
        (json!(0), json!("allow"))
    );
    assert_eq!(b["period_start"], "2026-12-15T06:00:00Z");
    // Usage in the new period counts there.
    t.post(
        "/v1/events",
        "application/json",
        event("r2", "roll", "api_requests", 50, "2026-12-15T06:00:00Z"),
    )
    .await;
    t.wait_usage("roll", "api_requests", 50).await;
}
