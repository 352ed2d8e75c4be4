//! Envoy's gRPC rate limit service and ext_authz, over a real HTTP/2 connection to Tally's public
//! listener, answer the same decisions as `/v1/check`.

mod common;

use std::collections::HashMap;

use common::{NOW, Tally, event};
use serde_json::{Value, json};
use tally_enforcer::grpc::authz::authorization_client::AuthorizationClient;
use tally_enforcer::grpc::authz::{self, check_response::HttpResponse};
use tally_enforcer::grpc::rls::rate_limit_descriptor::Entry;
use tally_enforcer::grpc::rls::rate_limit_response::Code;
use tally_enforcer::grpc::rls::rate_limit_service_client::RateLimitServiceClient;
use tally_enforcer::grpc::rls::{RateLimitDescriptor, RateLimitRequest};

fn descriptor(pairs: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: pairs
            .iter()
            .map(|(k, v)| Entry {
                key: k.to_string(),
                value: v.to_string(),
            })
            .collect(),
        hits_addend: hits,
    }
}

fn authz_request(headers: &[(&str, &str)]) -> authz::CheckRequest {
    let headers: HashMap<String, String> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    authz::CheckRequest {
        attributes: Some(authz::AttributeContext {
            request: Some(authz::attribute_context::Request {
                http: Some(authz::attribute_context::HttpRequest {
                    method: "GET".into(),
                    path: "/orders".into(),
                    headers,
                    ..Default::default()
                }),
            }),
            context_extensions: HashMap::new(),
        }),
    }
}

#[tokio::test]
async fn envoy_grpc_protocols_answer_the_same_decisions() {
    let t = Tally::start().await;
    for (c, v) in [("grpc-ok", 7_900), ("grpc-over", 12_000)] {
        t.post(
            "/v1/events",
            "application/json",
            event(c, c, "api_requests", v, NOW),
        )
        .await;
        t.wait_usage(c, "api_requests", v).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let router = t.app.router.clone();
    tokio::spawn(async move { axum::serve(listener, router).await });

    // Rate limit service: one descriptor per customer, one that is not Tally's.
    let mut rls = RateLimitServiceClient::connect(addr.clone()).await.unwrap();
    let resp = rls
        .should_rate_limit(RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![
                descriptor(
                    &[("customer", "grpc-ok"), ("meter", "api_requests")],
                    Some(100),
                ),
                descriptor(&[("customer", "grpc-over")], None),
                descriptor(&[("remote_address", "10.0.0.1")], None),
            ],
            hits_addend: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.overall_code, Code::OverLimit as i32);
    let codes: Vec<i32> = resp.statuses.iter().map(|s| s.code).collect();
    assert_eq!(
        codes,
        vec![Code::Ok as i32, Code::OverLimit as i32, Code::Ok as i32]
    );
    let first = &resp.statuses[0];
    assert_eq!(
        first.current_limit.as_ref().unwrap().requests_per_unit,
        10_000
    );
    assert_eq!(first.limit_remaining, 2_000, "7,900 used + 100 about to be");
    assert!(
        resp.response_headers_to_add
            .iter()
            .any(|h| h.key == "tally-quota-state" && h.value == "warn")
    );
    // The same questions over JSON.
    let (_, _, b) = t.check("grpc-ok", "api_requests", 100).await;
    assert_eq!(
        (b["decision"].clone(), b["remaining"].clone()),
        (json!("warn"), json!(2_000))
    );
    let (s, _, _) = t.check("grpc-over", "api_requests", 1).await;
    assert_eq!(s.as_u16(), 429);

    // ext_authz.
    let mut authz = AuthorizationClient::connect(addr).await.unwrap();
    let ok = authz
        .check(authz_request(&[("x-tally-customer", "grpc-ok")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.status.unwrap().code, 0);
    let Some(HttpResponse::OkResponse(ok)) = ok.http_response else {
        panic!("allowed")
    };
    assert!(
        ok.response_headers_to_add
            .iter()
            .any(|h| h.header.as_ref().unwrap().key == "ratelimit-policy")
    );
    let over = authz
        .check(authz_request(&[("x-tally-customer", "grpc-over")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        over.status.unwrap().code,
        tonic::Code::PermissionDenied as i32
    );
    let Some(HttpResponse::DeniedResponse(denied)) = over.http_response else {
        panic!("denied")
    };
    assert_eq!(denied.status.unwrap().code, 429);
    let body: Value = serde_json::from_str(&denied.body).unwrap();
    assert_eq!(
        (body["decision"].clone(), body["usage"].clone()),
        (json!("block"), json!(12_000))
    );
    assert!(
        denied
            .headers
            .iter()
            .any(|h| h.header.as_ref().unwrap().key == "retry-after")
    );
    let anon = authz.check(authz_request(&[])).await.unwrap().into_inner();
    assert_eq!(
        anon.status.unwrap().code,
        tonic::Code::Unauthenticated as i32
    );
    let Some(HttpResponse::DeniedResponse(denied)) = anon.http_response else {
        panic!("denied")
    };
    assert_eq!(denied.status.unwrap().code, 401);
    // An unknown meter is the caller's mistake.
    let err = authz
        .check(authz_request(&[
            ("x-tally-customer", "grpc-ok"),
            ("x-tally-meter", "gpu"),
        ]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// With keys required, a gRPC check without a key is refused with UNAUTHENTICATED, one whose
/// key lacks the `check` scope with PERMISSION_DENIED, and one with a key in the metadata passes.
#[tokio::test]
async fn grpc_checks_need_a_check_key() {
    let dir = tempfile::tempdir().unwrap();
    let admin = "grpc-test-admin-key-0123456789abcdef";
    let config = tally::Config {
        admin_key: Some(admin.into()),
        ..common::config(dir.path())
    };
    let t = Tally::start_with(dir, config).await;
    let reader = t
        .app
        .keys
        .create(&tally::auth::KeyGrant {
            name: "reader".into(),
            scopes: vec![tally::auth::Scope::Read],
            ..Default::default()
        })
        .await
        .unwrap()
        .key;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let router = t.app.router.clone();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let mut rls = RateLimitServiceClient::connect(addr).await.unwrap();
    let ask = |key: Option<&str>| {
        let mut req = tonic::Request::new(RateLimitRequest {
            domain: "edge".into(),
            descriptors: vec![descriptor(&[("customer", "grpc-key")], None)],
            hits_addend: 0,
        });
        if let Some(k) = key {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        req
    };
    let e = rls.should_rate_limit(ask(None)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = rls.should_rate_limit(ask(Some(&reader))).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let resp = rls.should_rate_limit(ask(Some(admin))).await.unwrap();
    assert_eq!(resp.into_inner().overall_code, Code::Ok as i32);
}
