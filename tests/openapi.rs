//! The OpenAPI document and the server agree: the committed copy (`schemas/openapi.json`) is
//! the document generated from the code, every documented operation is served and answers a
//! probe with a status the document lists for it, and every event error code the decoder can
//! produce is documented.

mod common;

use axum::body::Body;
use axum::http::Request;
use common::Tally;
use serde_json::Value;
use tower::ServiceExt;

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/openapi.json");

fn document() -> Value {
    serde_json::from_str(&tally::openapi::pretty()).expect("valid JSON")
}

#[test]
fn the_committed_document_is_the_generated_one() {
    let committed = std::fs::read_to_string(COMMITTED).expect("schemas/openapi.json");
    assert!(
        committed == tally::openapi::pretty(),
        "schemas/openapi.json differs from the code's document; \
         regenerate it with `cargo run -- openapi > schemas/openapi.json`"
    );
}

#[tokio::test]
async fn the_document_is_served() {
    let t = Tally::start().await;
    let resp = t
        .app
        .router
        .clone()
        .oneshot(probe("/openapi.json", "get"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let served: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(served, document());
    assert_eq!(served["openapi"], "3.1.0");
}

fn probe(path: &str, method: &str) -> Request<Body> {
    let uri = path
        .replace("{id}", "probe-customer")
        .replace("{gateway}", "nginx")
        .replace("{name}", "api_requests");
    let uri = match uri.as_str() {
        "/v1/check" if method == "get" => "/v1/check?customer=probe&meter=api_requests".to_string(),
        "/v1/usage" => "/v1/usage?customer=probe&meter=api_requests".to_string(),
        "/v1/usage/summary" => "/v1/usage/summary?customer=probe".to_string(),
        "/v1/usage/top" => "/v1/usage/top?meter=api_requests".to_string(),
        u => u.to_string(),
    };
    let body = match (path, method) {
        ("/v1/events", _) => {
            r#"{"specversion":"1.0","id":"p","source":"s","type":"api_requests","subject":"probe"}"#
        }
        ("/v1/check", "post") => r#"{"customer":"probe","meter":"api_requests"}"#,
        ("/v1/customers/{id}", "put") => r#"{"plan":"starter"}"#,
        _ => "",
    };
    Request::builder()
        .method(method.to_ascii_uppercase().as_str())
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("request")
}

#[tokio::test]
async fn every_documented_operation_is_served_with_a_documented_status() {
    let t = Tally::start().await;
    let doc = document();
    let paths = doc["paths"].as_object().expect("paths");
    let mut probed = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                continue;
            }
            let admin = ["/metrics", "/healthz", "/readyz"].contains(&path.as_str());
            let router = if admin {
                t.app.admin.clone()
            } else {
                t.app.router.clone()
            };
            let resp = router
                .oneshot(probe(path, method))
                .await
                .expect("infallible");
            let status = resp.status().as_u16().to_string();
            let documented = op["responses"].as_object().expect("responses");
            assert!(
                documented.contains_key(&status),
                "{method} {path} answered {status}, not among {:?}",
                documented.keys().collect::<Vec<_>>()
            );
            probed += 1;
        }
    }
    assert_eq!(probed, 27, "operations probed");
    // And an undocumented path is not served.
    let resp = t
        .app
        .router
        .clone()
        .oneshot(probe("/v1/nothing", "get"))
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

#[test]
fn every_event_error_code_is_documented() {
    use tally_schemas::EventError as E;
    let doc = document();
    let documented: Vec<&str> =
        doc["components"]["schemas"]["EventFault"]["properties"]["code"]["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .filter_map(Value::as_str)
            .collect();
    let all = [
        E::MalformedJson(String::new()),
        E::NotAnObject,
        E::MissingField("id"),
        E::InvalidType(String::new()),
        E::UnsupportedSpecVersion,
        E::EmptyField("id"),
        E::FieldTooLong {
            field: "id",
            max: 1,
        },
        E::InvalidCustomer,
        E::UnknownMeter(String::new()),
        E::InvalidTime,
        E::TooOld { window_hours: 1 },
        E::InFuture { tolerance_secs: 1 },
        E::NotInteger,
        E::NegativeValue,
        E::ValueOutOfRange,
        E::UsageCapExceeded,
        E::MissingValue(String::new()),
        E::InvalidValue(String::new()),
        E::ValuePrecision(String::new()),
        E::InvalidDimension(String::new()),
        E::DimensionCapExceeded { cap: 1 },
        E::DistinctCapExceeded { cap: 1 },
    ];
    // A new variant must be added to `all` (and to the document): this match stops compiling.
    fn _every_variant_listed(e: &E) {
        match e {
            E::MalformedJson(_)
            | E::NotAnObject
            | E::MissingField(_)
            | E::InvalidType(_)
            | E::UnsupportedSpecVersion
            | E::EmptyField(_)
            | E::FieldTooLong { .. }
            | E::InvalidCustomer
            | E::UnknownMeter(_)
            | E::InvalidTime
            | E::TooOld { .. }
            | E::InFuture { .. }
            | E::NotInteger
            | E::NegativeValue
            | E::ValueOutOfRange
            | E::UsageCapExceeded
            | E::MissingValue(_)
            | E::InvalidValue(_)
            | E::ValuePrecision(_)
            | E::InvalidDimension(_)
            | E::DimensionCapExceeded { .. }
            | E::DistinctCapExceeded { .. } => {}
        }
    }
    let codes: Vec<&str> = all.iter().map(|e| e.code()).collect();
    assert_eq!(codes, documented);
    assert_eq!(codes, E::CODES);
}
