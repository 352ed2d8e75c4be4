//! The query API on the embedded store: the current-period summary with states and grace,
//! top customers, totals per meter, billing-period series, streamed long series, and CSV.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::{Tally, event, ms};
use serde_json::{Value, json};

async fn ingest(t: &Tally, events: &[(&str, &str, &str, u64, &str)]) {
    let body: Vec<String> = events
        .iter()
        .map(|(id, c, m, v, at)| event(id, c, m, *v, at))
        .collect();
    let (s, b) = t
        .post("/v1/events", "application/x-ndjson", body.join("\n"))
        .await;
    assert_eq!(s.as_u16(), 202, "{b}");
}

/// The body as text, with the content type.
async fn text(t: &Tally, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut req = Request::get(path);
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let (s, h, b) = t.send(req.body(Body::empty()).unwrap()).await;
    let ct = h
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = match b {
        Value::String(s) => s,
        other => other.to_string(),
    };
    (s.as_u16(), ct, text)
}

fn meter<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == name)
        .unwrap_or_else(|| panic!("{name} in {summary}"))
}

#[tokio::test]
async fn the_period_summary_shows_every_meter_with_its_state_and_grace() {
    let t = Tally::start().await;
    ingest(
        &t,
        &[
            ("a1", "sum1", "api_requests", 8_500, "2026-11-21T08:00:00Z"),
            ("b1", "sum1", "build_minutes", 60, "2026-11-20T11:00:00Z"),
            ("b2", "sum1", "build_minutes", 45, "2026-11-20T12:00:30Z"),
            (
                "w1",
                "sum1",
                "bandwidth_bytes",
                1_200_000_000,
                "2026-11-21T09:00:00Z",
            ),
            ("m1", "sum1", "wasm_modules", 2, "2026-11-21T09:00:00Z"),
            // Last period: not in this one.
            ("old", "sum1", "api_requests", 500, "2026-10-30T00:00:00Z"),
        ],
    )
    .await;
    t.wait_stored("sum1", "wasm_modules", 2).await;
    t.wait_stored("sum1", "api_requests", 8_500).await;
    let (s, b) = t.get("/v1/usage/summary?customer=sum1").await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(
        (&b["plan"], &b["period_start"], &b["period_end"]),
        (
            &json!("free"),
            &json!("2026-11-01T00:00:00Z"),
            &json!("2026-12-01T00:00:00Z")
        )
    );
    let names: Vec<&str> = b["meters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["meter"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "api_requests",
            "bandwidth_bytes",
            "build_minutes",
            "collaborators",
            "edge_deployments",
            "storage_bytes",
            "wasm_modules"
        ]
    );
    assert_eq!(
        meter(&b, "api_requests"),
        &json!({"meter": "api_requests", "unit": "requests", "usage": 8500, "limit": 10000,
                "percent": 85.0, "threshold": 80, "state": "warn", "grace_until": null})
    );
    assert_eq!(
        meter(&b, "bandwidth_bytes")["state"],
        json!("blocked"),
        "120 %"
    );
    // 105 % since 12:00 yesterday: over the soft limit, 48 h of grace from that minute.
    let build = meter(&b, "build_minutes");
    assert_eq!(
        (&build["usage"], &build["state"], &build["grace_until"]),
        (&json!(105), &json!("over"), &json!("2026-11-22T12:00:00Z"))
    );
    assert_eq!(meter(&b, "wasm_modules")["state"], json!("ok"));
    let storage = meter(&b, "storage_bytes");
    assert_eq!(
        (&storage["limit"], &storage["state"]),
        (&json!(null), &json!("ok"))
    );

    // Once the grace has run out the same usage is blocked.
    t.clock.set(ms("2026-11-22T12:00:00Z"));
    let (_, b) = t.get("/v1/usage/summary?customer=sum1").await;
    assert_eq!(meter(&b, "build_minutes")["state"], json!("blocked"));

    // CSV: one row per meter under a header.
    let (s, ct, csv) = text(&t, "/v1/usage/summary?customer=sum1&format=csv", None).await;
    assert_eq!((s, ct.as_str()), (200, "text/csv; charset=utf-8"));
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 8, "{csv}");
    assert_eq!(
        lines[0],
        "customer,meter,unit,plan,period_start,period_end,usage,limit,percent,threshold,state,grace_until"
    );
    assert_eq!(
        lines[1],
        "sum1,api_requests,requests,free,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,8500,10000,85.0,80,warn,"
    );

    let (s, b) = t.get("/v1/usage/summary?customer=").await;
    assert_eq!((s.as_u16(), &b["code"]), (400, &json!("invalid_customer")));
    let (s, b) = t.get("/v1/usage/summary").await;
    assert_eq!((s.as_u16(), &b["code"]), (400, &json!("missing_parameter")));
}

#[tokio::test]
async fn top_customers_and_totals_per_meter() {
    let t = Tally::start().await;
    ingest(
        &t,
        &[
            ("1", "a", "api_requests", 300, "2026-11-02T00:00:00Z"),
            ("2", "b", "api_requests", 100, "2026-11-03T00:00:00Z"),
            ("3", "c", "api_requests", 150, "2026-11-04T00:00:00Z"),
            ("4", "c", "api_requests", 50, "2026-11-21T09:00:00Z"),
            ("5", "d", "api_requests", 50, "2026-10-25T00:00:00Z"),
            ("6", "a", "wasm_modules", 5, "2026-11-02T00:00:00Z"),
            ("7", "a", "wasm_modules", 1, "2026-11-05T00:00:00Z"),
            ("8", "b", "wasm_modules", 3, "2026-11-05T00:00:00Z"),
        ],
    )
    .await;
    t.wait_stored("c", "api_requests", 200).await;
    t.wait_stored("b", "wasm_modules", 3).await;

    let (s, b) = t.get("/v1/usage/top?meter=api_requests&limit=2").await;
    assert_eq!(s.as_u16(), 200, "{b}");
    assert_eq!(
        b,
        json!({"meter": "api_requests", "unit": "requests", "from": "2026-11-01T00:00:00Z",
               "to": "2026-11-21T10:00:00Z",
               "customers": [{"customer": "a", "usage": 300}, {"customer": "c", "usage": 200}]})
    );
    // Gauges rank by the latest value.
    let (_, b) = t.get("/v1/usage/top?meter=wasm_modules").await;
    assert_eq!(
        b["customers"],
        json!([{"customer": "b", "usage": 3}, {"customer": "a", "usage": 1}])
    );
    // A range: October on.
    let (_, b) = t
        .get("/v1/usage/top?meter=api_requests&from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z")
        .await;
    assert_eq!(b["customers"], json!([{"customer": "d", "usage": 50}]));

    let (s, b) = t.get("/v1/usage/totals").await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let totals: Vec<(String, u64, u64)> = b["meters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["meter"].as_str().unwrap().to_owned(),
                m["usage"].as_u64().unwrap(),
                m["customers"].as_u64().unwrap(),
            )
        })
        .filter(|(_, u, _)| *u > 0)
        .collect();
    assert_eq!(
        totals,
        [
            ("api_requests".to_owned(), 600, 3),
            ("wasm_modules".to_owned(), 4, 2)
        ]
    );
    let (_, b) = t
        .get("/v1/usage/totals?from=2026-10-01T00:00:00Z&to=2026-12-01T00:00:00Z")
        .await;
    assert_eq!(
        (&b["meters"][0]["usage"], &b["meters"][0]["customers"]),
        (&json!(650), &json!(4))
    );

    // CSV through the Accept header.
    let (s, ct, csv) = text(&t, "/v1/usage/top?meter=api_requests", Some("text/csv")).await;
    assert_eq!((s, ct.as_str()), (200, "text/csv; charset=utf-8"));
    assert_eq!(csv, "customer,usage\na,300\nc,200\nb,100\n");
    let (_, _, csv) = text(&t, "/v1/usage/totals?format=csv", None).await;
    assert!(
        csv.starts_with("meter,unit,usage,customers\napi_requests,requests,600,3\n"),
        "{csv}"
    );

    for (path, status, code) in [
        (
            "/v1/usage/top?meter=api_requests&limit=0",
            400,
            "invalid_limit",
        ),
        (
            "/v1/usage/top?meter=api_requests&limit=10001",
            400,
            "invalid_limit",
        ),
        ("/v1/usage/top?meter=nope", 404, "unknown_meter"),
        ("/v1/usage/top", 400, "missing_parameter"),
        (
            "/v1/usage/top?meter=api_requests&format=xml",
            400,
            "invalid_format",
        ),
        (
            "/v1/usage/totals?from=2026-11-10T00:00:00Z&to=2026-11-09T00:00:00Z",
            400,
            "invalid_range",
        ),
        ("/v1/usage/totals?to=soon", 400, "invalid_time"),
        ("/v1/usage/totals?top=1", 400, "invalid_request"),
    ] {
        let (s, b) = t.get(path).await;
        assert_eq!(
            (s.as_u16(), b["code"].as_str()),
            (status, Some(code)),
            "{path}: {b}"
        );
    }
}

#[tokio::test]
async fn series_by_billing_period_and_long_streamed_series() {
    let t = Tally::start().await;
    let (s, b) = t
        .put(
            "/v1/customers/anch",
            json!({"plan": "starter", "period_anchor": "2026-10-18T00:00:00Z"}),
        )
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    ingest(
        &t,
        &[
            ("p1", "anch", "api_requests", 5, "2026-10-20T00:00:00Z"),
            ("p2", "anch", "api_requests", 7, "2026-11-10T00:00:00Z"),
            ("p3", "anch", "api_requests", 11, "2026-11-19T00:00:00Z"),
            // The last minute of the first chunk of a minute series from 11-10 and the first
            // minute of the second (chunks are 10,000 minutes).
            ("c1", "anch", "api_requests", 1, "2026-11-16T22:39:00Z"),
            ("c2", "anch", "api_requests", 2, "2026-11-16T22:40:00Z"),
        ],
    )
    .await;
    t.wait_stored("anch", "api_requests", 11).await;
    let path = "/v1/usage?customer=anch&meter=api_requests&from=2026-10-18T00:00:00Z&window=period";
    let mut b = Value::Null;
    for _ in 0..500 {
        b = t.get(path).await.1;
        if b["points"][0]["value"] == 15 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(b["window"], json!("period"));
    assert_eq!(
        b["points"],
        json!([
            {"start": "2026-10-18T00:00:00Z", "end": "2026-11-18T00:00:00Z", "value": 15},
            {"start": "2026-11-18T00:00:00Z", "end": "2026-12-18T00:00:00Z", "value": 11}
        ])
    );

    // 16,440 minutes: streamed in two chunks; nothing lost at the seam, valid JSON.
    let (s, b) = t
        .get("/v1/usage?customer=anch&meter=api_requests&from=2026-11-10T00:00:00Z&window=minute")
        .await;
    assert_eq!(s.as_u16(), 200, "{b}");
    let points: Vec<(&str, u64)> = b["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].as_str().unwrap(), p["value"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        points,
        [
            ("2026-11-10T00:00:00Z", 7),
            ("2026-11-16T22:39:00Z", 1),
            ("2026-11-16T22:40:00Z", 2),
            ("2026-11-19T00:00:00Z", 11)
        ]
    );
    let (s, ct, csv) = text(
        &t,
        "/v1/usage?customer=anch&meter=api_requests&from=2026-11-16T00:00:00Z&window=day",
        Some("text/csv"),
    )
    .await;
    assert_eq!((s, ct.as_str()), (200, "text/csv; charset=utf-8"));
    assert_eq!(
        csv,
        "customer,meter,unit,window,start,end,value\n\
         anch,api_requests,requests,day,2026-11-16T00:00:00Z,2026-11-17T00:00:00Z,3\n\
         anch,api_requests,requests,day,2026-11-19T00:00:00Z,2026-11-20T00:00:00Z,11\n"
    );
    // The current period of the anchored customer.
    let (_, b) = t.get("/v1/usage?customer=anch&meter=api_requests").await;
    assert_eq!(
        (&b["period_start"], &b["usage"], &b["state"]),
        (&json!("2026-11-18T00:00:00Z"), &json!(11), &json!("ok"))
    );
    let (s, b) = t
        .get("/v1/usage?customer=anch&meter=api_requests&from=2026-11-10T00:00:00Z&window=week")
        .await;
    assert_eq!((s.as_u16(), &b["code"]), (400, &json!("invalid_window")));
}
