//! The gRPC checks (Envoy's rate limit service and ext_authz) as the enforcer's public router
//! serves them: the first byte picks the service, the rest is the protobuf message, sent in one
//! gRPC frame. Any message is answered (a gRPC status, HTTP 200), never a panic.
#![no_main]

use std::sync::{Arc, LazyLock};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tally_enforcer::State;
use tally_schemas::{Catalog, ManualClock};
use tower::ServiceExt;

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

static ROUTER: LazyLock<axum::Router> = LazyLock::new(|| {
    let clock = Arc::new(ManualClock::new(1_795_255_200_000));
    let state = Arc::new(State::new(Arc::new(Catalog::builtin()), clock, true));
    state.set_ready();
    tally_enforcer::grpc::router(state)
});

fuzz_target!(|data: &[u8]| {
    let Some((&pick, message)) = data.split_first() else {
        return;
    };
    let path = if pick % 2 == 0 {
        "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
    } else {
        "/envoy.service.auth.v3.Authorization/Check"
    };
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let req = Request::post(path)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Body::from(frame))
        .unwrap();
    RUNTIME.block_on(async {
        let resp = ROUTER.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let _ = resp.into_body().collect().await;
    });
});
