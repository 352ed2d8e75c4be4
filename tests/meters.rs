//! Meters over the event's payload through the embedded pipeline: one event feeding several
//! meters (value paths, filters, decimals, sums and the largest and smallest values), read back
//! exactly from the enforcer and the store, after a restart too; bad payloads refused with their
//! codes and nothing of the request lost; the catalogue read back from `/v1/meters` and
//! `/v1/plans`; meters created, changed and archived through `/v1/meters` at runtime.

mod common;

use common::{NOW, Tally};
use serde_json::{Value, json};

const METERS: &str = include_str!("fixtures/payload_meters.toml");

async fn start() -> Tally {
    start_with("", |_| {}).await
}

/// The embedded pipeline with the payload meters and `more` (TOML) added to the default
/// catalogue, and the test configuration changed by `tweak`.
async fn start_with(more: &str, tweak: impl FnOnce(&mut tally::Config)) -> Tally {
    let dir = tempfile::tempdir().unwrap();
    let catalog = format!(
        "{}\n{METERS}\n{more}",
        tally_schemas::catalog::DEFAULT_CATALOG_TOML
    );
    let path = dir.path().join("catalog.toml");
    std::fs::write(&path, catalog).unwrap();
    let mut config = common::config(dir.path());
    config.catalog_file = Some(path);
    tweak(&mut config);
    Tally::start_with(dir, config).await
}

fn event(id: &str, customer: &str, ty: &str, data: Value) -> Value {
    json!({
        "specversion": "1.0", "id": id, "source": "edge-test", "type": ty,
        "subject": customer, "time": NOW, "data": data
    })
}

#[tokio::test]
async fn one_event_feeds_several_meters_exactly_in_the_enforcer_and_the_store() {
    let t = start().await;
    let batch = json!([
        event(
            "r1",
            "c1",
            "request",
            json!({"bytes": 1200, "region": "eu", "model": "m1"})
        ),
        event(
            "r2",
            "c1",
            "request",
            json!({"bytes": 800, "region": "us", "model": "m1"})
        ),
        event("r3", "c1", "request", json!({"bytes": 5, "region": "eu"})),
        event("g1", "c1", "gpu", json!({"hours": 1.25})),
        event("g2", "c1", "gpu", json!({"hours": "0.005"})),
    ]);
    let (s, b) = t
        .post("/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!((s.as_u16(), b["accepted"].clone()), (202, json!(5)), "{b}");
    // The same events again: duplicates, counted once.
    let (s, b) = t
        .post("/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!(
        (s.as_u16(), b["duplicates"].clone()),
        (202, json!(5)),
        "{b}"
    );
    for (meter, usage) in [
        ("requests", 3),
        ("request_bytes", 2005),
        ("eu_requests", 2),
        ("gpu_hours", 1255),
        ("peak_request_bytes", 1200),
        ("least_request_bytes", 5),
        ("peak_gpu_hours", 1250),
    ] {
        t.wait_usage("c1", meter, usage).await;
        t.wait_stored("c1", meter, usage).await;
    }
    let t = t.restart().await;
    for (meter, usage) in [
        ("request_bytes", 2005),
        ("gpu_hours", 1255),
        ("peak_request_bytes", 1200),
        ("least_request_bytes", 5),
        ("peak_gpu_hours", 1250),
    ] {
        t.wait_usage("c1", meter, usage).await;
        t.wait_stored("c1", meter, usage).await;
    }
    // Usage by dimension, from the store.
    let (s, b) = t
        .get("/v1/usage?customer=c1&meter=request_bytes&group_by=region")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(b["usage"], 2005);
    assert_eq!(
        b["groups"],
        json!([
            {"dimensions": {"region": "eu"}, "usage": 1205},
            {"dimensions": {"region": "us"}, "usage": 800},
        ])
    );
    let (_, b) = t
        .get("/v1/usage?customer=c1&meter=request_bytes&group_by=model&filter[region]=eu")
        .await;
    assert_eq!(
        b["groups"],
        json!([
            {"dimensions": {"model": "m1"}, "usage": 1200},
            {"dimensions": {"model": null}, "usage": 5},
        ])
    );
    let (_, b) = t
        .get("/v1/usage?customer=c1&meter=request_bytes&filter%5Bregion%5D=us")
        .await;
    assert_eq!(b["groups"], json!([{"dimensions": {}, "usage": 800}]));
    // A series by dimension: the events' day, per region.
    let (s, b) = t
        .get("/v1/usage?customer=c1&meter=request_bytes&from=2026-11-20T00:00:00Z&to=2026-11-22T00:00:00Z&window=day&group_by=region")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let point = |usage: u64| json!([{"start": "2026-11-21T00:00:00Z", "end": "2026-11-22T00:00:00Z", "value": usage}]);
    assert_eq!(
        b["groups"],
        json!([
            {"dimensions": {"region": "eu"}, "points": point(1205)},
            {"dimensions": {"region": "us"}, "points": point(800)},
        ])
    );
    assert_eq!(
        (b["window"].clone(), b["unit"].clone()),
        (json!("day"), json!("bytes"))
    );
    // The same breakdowns in CSV: a column per asked dimension, empty where a group has none.
    let csv = |b: Value| {
        b.as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{b}"))
    };
    let (s, b) = t
        .get("/v1/usage?customer=c1&meter=request_bytes&group_by=model,region&format=csv")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let period = "2026-11-01T00:00:00Z,2026-12-01T00:00:00Z";
    assert_eq!(
        csv(b),
        format!(
            "customer,meter,unit,period_start,period_end,model,region,usage\n\
             c1,request_bytes,bytes,{period},m1,eu,1200\n\
             c1,request_bytes,bytes,{period},m1,us,800\n\
             c1,request_bytes,bytes,{period},,eu,5\n"
        )
    );
    let (s, b) = t
        .get("/v1/usage?customer=c1&meter=request_bytes&from=2026-11-20T00:00:00Z&to=2026-11-22T00:00:00Z&window=day&group_by=region&format=csv")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(
        csv(b),
        "customer,meter,unit,window,region,start,end,value\n\
         c1,request_bytes,bytes,day,eu,2026-11-21T00:00:00Z,2026-11-22T00:00:00Z,1205\n\
         c1,request_bytes,bytes,day,us,2026-11-21T00:00:00Z,2026-11-22T00:00:00Z,800\n"
    );
    // The summary breaks down the meters that have the asked dimensions, and only those.
    let (s, b) = t
        .get("/v1/usage/summary?customer=c1&group_by=region&filter[model]=m1")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let meters = b["meters"].as_array().unwrap();
    let of = |name: &str| meters.iter().find(|m| m["meter"] == name).unwrap().clone();
    assert_eq!(of("request_bytes")["usage"], 2005);
    assert_eq!(
        of("request_bytes")["groups"],
        json!([
            {"dimensions": {"region": "eu"}, "usage": 1200},
            {"dimensions": {"region": "us"}, "usage": 800},
        ])
    );
    assert_eq!(of("requests")["usage"], 3);
    assert!(of("requests").get("groups").is_none(), "{b}");
    let (s, b) = t
        .get("/v1/usage/summary?customer=c1&group_by=region&format=csv")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(
        csv(b),
        format!(
            "customer,meter,unit,period_start,period_end,region,usage\n\
             c1,request_bytes,bytes,{period},eu,1205\n\
             c1,request_bytes,bytes,{period},us,800\n"
        )
    );
    for (query, code) in [
        ("group_by=colour", "unknown_dimension"),
        ("filter[colour]=red", "unknown_dimension"),
        ("groupby=region", "invalid_request"),
    ] {
        let (s, b) = t
            .get(&format!("/v1/usage/summary?customer=c1&{query}"))
            .await;
        assert_eq!(
            (s.as_u16(), b["code"].clone()),
            (400, json!(code)),
            "summary {query}"
        );
    }
    for (query, code) in [
        ("group_by=region&window=period", "unsupported_breakdown"),
        (
            "group_by=region&from=2020-01-01T00:00:00Z&window=minute",
            "range_too_large",
        ),
        ("group_by=colour", "unknown_dimension"),
        ("filter[colour]=red", "unknown_dimension"),
        ("groupby=region", "invalid_request"),
    ] {
        let (s, b) = t
            .get(&format!(
                "/v1/usage?customer=c1&meter=request_bytes&{query}"
            ))
            .await;
        assert_eq!(
            (s.as_u16(), b["code"].clone()),
            (400, json!(code)),
            "{query}"
        );
    }
}

#[tokio::test]
async fn bad_payloads_are_refused_with_codes_and_the_rest_of_the_request_kept() {
    let t = start().await;
    let batch = json!([
        event("ok", "c2", "request", json!({"bytes": 10, "region": "eu"})),
        event("no-bytes", "c2", "request", json!({"region": "eu"})),
        event("precise", "c2", "gpu", json!({"hours": 0.0001})),
        event("words", "c2", "gpu", json!({"hours": "lots"})),
        event(
            "dim",
            "c2",
            "request",
            json!({"bytes": 1, "region": {"name": "eu"}})
        ),
        event("ok-gpu", "c2", "gpu", json!({"hours": 2})),
    ]);
    let (s, b) = t
        .post("/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!(s.as_u16(), 202, "{b}");
    assert_eq!(
        (b["accepted"].clone(), b["rejected"].clone()),
        (json!(2), json!(4))
    );
    let codes: Vec<(u64, String)> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        codes,
        [
            (1, "value_missing".to_owned()),
            (2, "value_precision".to_owned()),
            (3, "invalid_value".to_owned()),
            (4, "invalid_dimension".to_owned()),
        ]
    );
    t.wait_stored("c2", "request_bytes", 10).await;
    t.wait_stored("c2", "gpu_hours", 2000).await;
}

#[tokio::test]
async fn the_catalogue_reads_back_from_the_api() {
    let t = start().await;
    let (s, b) = t.get("/v1/meters").await;
    assert_eq!(s.as_u16(), 200);
    let names: Vec<&str> = b["meters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"api_requests") && names.contains(&"request_bytes"),
        "{names:?}"
    );
    let (s, m) = t.get("/v1/meters/request_bytes").await;
    assert_eq!(s.as_u16(), 200);
    assert_eq!(
        m,
        json!({
            "name": "request_bytes", "aggregation": "sum", "unit": "bytes", "description": "",
            "event_type": "request", "value": "$.bytes",
            "group_by": {"model": "$.model", "region": "$.region"}, "source": "catalogue"
        })
    );
    let (_, m) = t.get("/v1/meters/gpu_hours").await;
    assert_eq!(m["scale"], 3);
    let (_, m) = t.get("/v1/meters/eu_requests").await;
    assert_eq!(m["filter"], json!([{"path": "$.region", "eq": "eu"}]));
    let (s, e) = t.get("/v1/meters/nope").await;
    assert_eq!(
        (s.as_u16(), e["code"].clone()),
        (404, json!("unknown_meter"))
    );
    let (s, p) = t.get("/v1/plans").await;
    assert_eq!(s.as_u16(), 200);
    assert_eq!(p["default_plan"], "free");
    let free = p["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "free")
        .unwrap();
    assert_eq!(free["limits"]["api_requests"], 10_000);
    assert_eq!(free["display_name"], "Free");
}

/// The README's example meters are a valid catalogue addition.
#[test]
fn the_readme_example_meters_load() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut examples = 0;
    for block in readme.split("```toml\n").skip(1) {
        let toml = block.split("```").next().unwrap();
        let catalog = format!("{}\n{toml}", tally_schemas::catalog::DEFAULT_CATALOG_TOML);
        let c =
            tally_schemas::Catalog::from_toml(&catalog).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert!(c.event_type("request").is_some());
        examples += 1;
    }
    assert_eq!(examples, 1);
}

/// Past `max_dimension_combinations` distinct combinations of a customer's meter in a month,
/// an event with a new one is refused; known combinations and other customers go on.
#[tokio::test]
async fn new_dimension_combinations_past_the_cap_are_refused() {
    let t = start_with("", |c| c.max_dimension_combinations = 2).await;
    let post = |events: Value| {
        let t = &t;
        async move {
            t.post("/v1/events", "application/json", events.to_string())
                .await
        }
    };
    let ev = |id: &str, customer: &str, region: &str| {
        event(
            id,
            customer,
            "request",
            json!({"bytes": 1, "region": region}),
        )
    };
    let (_, b) = post(json!([ev("1", "c3", "eu"), ev("2", "c3", "us")])).await;
    assert_eq!(b["accepted"], 2, "{b}");
    let (s, b) = post(json!([
        ev("3", "c3", "ap"),
        ev("4", "c3", "eu"),
        ev("5", "c4", "ap")
    ]))
    .await;
    assert_eq!(s.as_u16(), 202);
    assert_eq!(
        (b["accepted"].clone(), b["rejected"].clone()),
        (json!(2), json!(1)),
        "{b}"
    );
    assert_eq!(b["errors"][0]["index"], 0);
    assert_eq!(b["errors"][0]["code"], "dimension_cap_exceeded");
    t.wait_stored("c3", "request_bytes", 3).await;
    t.wait_stored("c4", "request_bytes", 1).await;
}

/// A `unique_count` meter counts each user once per period, in the enforcer and the store,
/// whichever requests and duplicates the users came in; past `max_distinct_values` new values a
/// customer's event with one more is refused with its code, and known values go on.
#[tokio::test]
async fn each_user_counts_once_and_new_values_past_the_cap_are_refused() {
    let t = start_with("", |c| c.max_distinct_values = 3).await;
    let post = |events: Value| {
        let t = &t;
        async move {
            t.post("/v1/events", "application/json", events.to_string())
                .await
        }
    };
    let ev = |id: &str, customer: &str, user: Value| {
        event(id, customer, "session", json!({ "user": user }))
    };
    let (s, b) = post(json!([
        ev("1", "u1", json!("ann")),
        ev("2", "u1", json!("ann")),
        ev("3", "u1", json!(42)),
        ev("4", "u2", json!("ann")),
    ]))
    .await;
    assert_eq!((s.as_u16(), b["accepted"].clone()), (202, json!(4)), "{b}");
    let (_, b) = post(json!([
        ev("5", "u1", json!("bob")),
        ev("6", "u1", json!("cy")),
        ev("7", "u1", json!(42)),
        ev("1", "u1", json!("ann")),
        ev("8", "u1", json!(null)),
    ]))
    .await;
    assert_eq!(b["rejected"], 2, "{b}");
    let codes: Vec<(Value, Value)> = b["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].clone(), e["code"].clone()))
        .collect();
    assert_eq!(
        codes,
        [
            (json!(1), json!("distinct_cap_exceeded")),
            (json!(4), json!("value_missing"))
        ],
        "{b}"
    );
    t.wait_stored("u1", "active_users", 3).await;
    t.wait_stored("u2", "active_users", 1).await;
    let (_, c) = t
        .get("/v1/check?customer=u1&meter=active_users&quantity=0")
        .await;
    assert_eq!(c["usage"], 3, "{c}");
    let (_, b) = t
        .get("/v1/usage?customer=u1&meter=active_users&from=2026-01-01T00:00:00Z&to=2026-12-01T00:00:00Z&window=month")
        .await;
    assert_eq!(
        b["points"],
        json!([{"start": "2026-11-01T00:00:00Z", "end": "2026-12-01T00:00:00Z", "value": 3}]),
        "{b}"
    );
}

/// A plan limits a meter within a filter: `eu_requests` counts the `request` events whose
/// region is `eu`, and a plan gives it a limit; requests of other regions never count toward
/// it, and the thresholds, the soft limit and the block apply to the filtered usage alone.
#[tokio::test]
async fn a_plan_limits_a_meter_within_a_filter() {
    let plan = r#"
[plans.edge_eu]
display_name = "Edge EU"
on_limit = "block"
limits = { eu_requests = 10 }
"#;
    let t = start_with(plan, |_| {}).await;
    let (s, b) = t.put("/v1/customers/c9", json!({"plan": "edge_eu"})).await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let requests = |from: usize, n: usize, region: &'static str| {
        Value::Array(
            (from..from + n)
                .map(|i| {
                    event(
                        &format!("{region}-{i}"),
                        "c9",
                        "request",
                        json!({"bytes": 1, "region": region}),
                    )
                })
                .collect(),
        )
    };
    let post = |events: Value| {
        let t = &t;
        async move {
            let (s, b) = t
                .post("/v1/events", "application/json", events.to_string())
                .await;
            assert_eq!(s.as_u16(), 202, "{b}");
        }
    };
    post(requests(0, 7, "eu")).await;
    post(requests(0, 30, "us")).await;
    t.wait_usage("c9", "eu_requests", 7).await;
    t.wait_usage("c9", "requests", 37).await;
    let decision = |b: &Value| (b["decision"].clone(), b["limit"].clone());
    // 7 + 1 of 10: warn; the other regions' 30 requests count only toward `requests`.
    let (s, _, b) = t.check("c9", "eu_requests", 1).await;
    assert_eq!(
        (s.as_u16(), decision(&b)),
        (200, (json!("warn"), json!(10))),
        "{b}"
    );
    let (s, _, b) = t.check("c9", "requests", 1).await;
    assert_eq!(
        (s.as_u16(), b["decision"].clone()),
        (200, json!("allow")),
        "{b}"
    );
    // 10 of 10: the soft limit, still allowed.
    post(requests(7, 3, "eu")).await;
    t.wait_usage("c9", "eu_requests", 10).await;
    let (s, _, b) = t.check("c9", "eu_requests", 0).await;
    assert_eq!(s.as_u16(), 200, "{b}");
    // 11 + 1 of 10 is past 110 %: blocked, while another region goes on.
    post(requests(10, 1, "eu")).await;
    t.wait_usage("c9", "eu_requests", 11).await;
    let (s, _, b) = t.check("c9", "eu_requests", 1).await;
    assert_eq!(
        (s.as_u16(), b["decision"].clone()),
        (429, json!("block")),
        "{b}"
    );
    t.wait_stored("c9", "eu_requests", 11).await;
    let (_, b) = t.get("/v1/usage?customer=c9&meter=eu_requests").await;
    assert_eq!(
        (b["usage"].clone(), b["limit"].clone(), b["state"].clone()),
        (json!(11), json!(10), json!("blocked")),
        "{b}"
    );
    let (s, _, b) = t.check("c9", "requests", 1).await;
    assert_eq!(
        (s.as_u16(), b["decision"].clone()),
        (200, json!("allow")),
        "{b}"
    );
}

#[tokio::test]
async fn a_meter_created_through_the_api_counts_at_once_and_its_history_stays() {
    let t = start().await;
    let tokens = json!({
        "name": "llm_tokens", "aggregation": "sum", "unit": "tokens", "event_type": "llm.call",
        "value": "$.tokens", "group_by": {"model": "$.model"}
    });
    let call = |id: &str, tokens: u64, model: &str| {
        event(
            id,
            "c1",
            "llm.call",
            json!({"tokens": tokens, "model": model, "region": "eu"}),
        )
    };
    // Before it exists, its events are refused, and nothing is counted.
    let (s, b) = t
        .post(
            "/v1/events",
            "application/json",
            json!([call("t0", 7, "m1")]).to_string(),
        )
        .await;
    assert_eq!(
        (s.as_u16(), b["errors"][0]["code"].clone()),
        (400, json!("unknown_meter")),
        "{b}"
    );
    let (s, m) = t.call("POST", "/v1/meters", tokens.clone()).await;
    assert_eq!(s.as_u16(), 201, "{m}");
    assert_eq!(
        (m["source"].clone(), m["value"].clone()),
        (json!("api"), json!("$.tokens"))
    );
    assert!(m["created"].is_string() && m["archived"].is_null(), "{m}");
    // Refusals, each with its code.
    for (body, status, code) in [
        (tokens.clone(), 409, "meter_exists"),
        (
            json!({"name": "api_requests", "aggregation": "sum", "unit": "r"}),
            409,
            "meter_exists",
        ),
        (
            json!({"name": "Bad-Name", "aggregation": "sum", "unit": "r"}),
            400,
            "invalid_meter",
        ),
        (
            json!({"name": "n1", "aggregation": "count", "unit": "r", "event_type": "x", "value": "$.v"}),
            400,
            "invalid_meter",
        ),
        (
            json!({"name": "n2", "aggregation": "sum", "unit": "r", "colour": "red"}),
            400,
            "invalid_meter",
        ),
        (
            json!({"aggregation": "sum", "unit": "r"}),
            400,
            "invalid_request",
        ),
        (json!([1]), 400, "invalid_request"),
    ] {
        let (s, e) = t.call("POST", "/v1/meters", body.clone()).await;
        assert_eq!(
            (s.as_u16(), e["code"].as_str()),
            (status, Some(code)),
            "{body}: {e}"
        );
    }
    // Counted from the next event, in the enforcer and the store, by dimension.
    let batch = json!([
        call("t1", 1200, "m1"),
        call("t2", 300, "m2"),
        call("t3", 5, "m1")
    ]);
    let (s, b) = t
        .post("/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!((s.as_u16(), b["accepted"].clone()), (202, json!(3)), "{b}");
    t.wait_usage("c1", "llm_tokens", 1505).await;
    t.wait_stored("c1", "llm_tokens", 1505).await;
    let (_, b) = t
        .get("/v1/usage?customer=c1&meter=llm_tokens&group_by=model")
        .await;
    assert_eq!(
        b["groups"],
        json!([
            {"dimensions": {"model": "m1"}, "usage": 1205},
            {"dimensions": {"model": "m2"}, "usage": 300},
        ]),
        "{b}"
    );
    // With usage counted: the description and new dimensions change; the rest does not.
    let (s, m) = t
        .call("PATCH", "/v1/meters/llm_tokens", json!({"description": "LLM tokens", "group_by": {"model": "$.model", "region": "$.region"}}))
        .await;
    assert_eq!(s.as_u16(), 200, "{m}");
    assert_eq!(m["group_by"]["region"], "$.region");
    for patch in [
        json!({"unit": "kilotokens"}),
        json!({"value": "$.other"}),
        json!({"group_by": {"region": "$.region"}}),
        json!({"filter": [{"path": "$.region", "eq": "eu"}]}),
    ] {
        let (s, e) = t
            .call("PATCH", "/v1/meters/llm_tokens", patch.clone())
            .await;
        assert_eq!(
            (s.as_u16(), e["code"].as_str()),
            (409, Some("immutable_field")),
            "{patch}: {e}"
        );
    }
    let (s, e) = t
        .call("PATCH", "/v1/meters/llm_tokens", json!({"name": "x"}))
        .await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (s, e) = t
        .call("PATCH", "/v1/meters/llm_tokens", json!({"scale": 99}))
        .await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (400, Some("invalid_meter")),
        "{e}"
    );
    let (s, e) = t
        .call(
            "PATCH",
            "/v1/meters/api_requests",
            json!({"description": "x"}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (409, Some("meter_in_catalogue"))
    );
    let (s, e) = t
        .call("DELETE", "/v1/meters/api_requests", Value::Null)
        .await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (409, Some("meter_in_catalogue"))
    );
    let (s, e) = t.call("PATCH", "/v1/meters/nope", json!({})).await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (404, Some("unknown_meter"))
    );
    // A new dimension reads from the next event on.
    let (s, b) = t
        .post(
            "/v1/events",
            "application/json",
            json!([call("t4", 10, "m2")]).to_string(),
        )
        .await;
    assert_eq!(s.as_u16(), 202, "{b}");
    t.wait_stored("c1", "llm_tokens", 1515).await;
    let (_, b) = t
        .get("/v1/usage?customer=c1&meter=llm_tokens&group_by=region")
        .await;
    assert_eq!(
        b["groups"],
        json!([
            {"dimensions": {"region": null}, "usage": 1505},
            {"dimensions": {"region": "eu"}, "usage": 10},
        ]),
        "{b}"
    );
    // A meter without usage yet changes freely.
    let (s, m) = t
        .call("POST", "/v1/meters", json!({"name": "llm_calls", "aggregation": "count", "unit": "calls", "event_type": "llm.call"}))
        .await;
    assert_eq!(s.as_u16(), 201, "{m}");
    let (s, m) = t
        .call(
            "PATCH",
            "/v1/meters/llm_calls",
            json!({"filter": [{"path": "$.model", "eq": "m2"}]}),
        )
        .await;
    assert_eq!(s.as_u16(), 200, "{m}");
    // Archived: reads no more events, its usage stays readable, its name taken; twice is fine.
    let (s, m) = t.call("DELETE", "/v1/meters/llm_tokens", Value::Null).await;
    assert_eq!(s.as_u16(), 200, "{m}");
    assert!(m["archived"].is_string(), "{m}");
    let (s, again) = t.call("DELETE", "/v1/meters/llm_tokens", Value::Null).await;
    assert_eq!(
        (s.as_u16(), again["archived"].clone()),
        (200, m["archived"].clone())
    );
    let (s, e) = t.call("POST", "/v1/meters", tokens.clone()).await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (409, Some("meter_exists"))
    );
    let (s, e) = t
        .call(
            "PATCH",
            "/v1/meters/llm_tokens",
            json!({"description": "y"}),
        )
        .await;
    assert_eq!(
        (s.as_u16(), e["code"].as_str()),
        (409, Some("meter_archived"))
    );
    let batch = json!([call("t5", 1000, "m2"), call("t6", 1000, "m1")]);
    let (s, b) = t
        .post("/v1/events", "application/json", batch.to_string())
        .await;
    assert_eq!((s.as_u16(), b["accepted"].clone()), (202, json!(2)), "{b}");
    // Of these, t5 (m2) feeds llm_calls (filtered to m2); t4 came before llm_calls existed.
    t.wait_stored("c1", "llm_calls", 1).await;
    t.wait_stored("c1", "llm_tokens", 1515).await;
    // Kept across a restart: both meters, the archive, the usage.
    let t = t.restart().await;
    let (_, m) = t.get("/v1/meters/llm_tokens").await;
    assert_eq!(
        (m["source"].as_str(), m["description"].as_str()),
        (Some("api"), Some("LLM tokens")),
        "{m}"
    );
    assert!(m["archived"].is_string(), "{m}");
    t.wait_usage("c1", "llm_tokens", 1515).await;
    t.wait_stored("c1", "llm_tokens", 1515).await;
    let (s, b) = t
        .post(
            "/v1/events",
            "application/json",
            json!([call("t7", 1, "m2")]).to_string(),
        )
        .await;
    assert_eq!((s.as_u16(), b["accepted"].clone()), (202, json!(1)), "{b}");
    t.wait_usage("c1", "llm_calls", 2).await;
    t.wait_stored("c1", "llm_calls", 2).await;
    let (_, list) = t.get("/v1/meters").await;
    let managed: Vec<&str> = list["meters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["source"] == "api")
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(managed, ["llm_calls", "llm_tokens"]);
}
