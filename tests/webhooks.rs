//! Two enforcer replicas follow the same log; each threshold notification reaches the webhook
//! receiver once, signed, and is retried when the receiver fails.

mod common;
#[path = "servers/mod.rs"]
mod servers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::process::{free_port, start_with_env};
use serde_json::{Value, json};

#[derive(Default)]
struct Receiver {
    /// Attempts per webhook id.
    attempts: HashMap<String, u32>,
    /// Accepted deliveries: (id, signature header, body).
    delivered: Vec<(String, String, Vec<u8>)>,
}

async fn hook(
    State(r): State<Arc<Mutex<Receiver>>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let id = headers["tally-webhook-id"].to_str().unwrap().to_owned();
    let sig = headers
        .get("tally-signature")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let mut r = r.lock().unwrap();
    let n = r.attempts.entry(id.clone()).or_default();
    *n += 1;
    if *n == 1 {
        return StatusCode::INTERNAL_SERVER_ERROR; // the first attempt of each fails
    }
    r.delivered.push((id, sig, body.to_vec()));
    StatusCode::NO_CONTENT
}

/// Serves `route` at `/hook` on a free port; the runtime keeps it running.
fn serve_hook(route: axum::routing::MethodRouter) -> (tokio::runtime::Runtime, String) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new().route("/hook", route);
    rt.spawn(async move { axum::serve(listener, app).await });
    (rt, url)
}

#[test]
fn each_notification_is_delivered_once_by_one_of_two_replicas() {
    two_replicas(&[]);
}

/// The same on the production path: the replicas follow a Kafka topic and claim notifications
/// on `<topic>.notifications`.
#[test]
fn each_notification_is_delivered_once_on_kafka_and_clickhouse() {
    if servers::skip_without_servers(false) {
        return;
    }
    let backends = servers::Backends::shared();
    let env = backends.env();
    let env = servers::pairs(&env);
    two_replicas(&env);
}

fn two_replicas(backends: &[(&str, &str)]) {
    let receiver = Arc::new(Mutex::new(Receiver::default()));
    let (_rt, url) = serve_hook(post(hook).with_state(receiver.clone()));

    let dir = tempfile::tempdir().unwrap();
    let mut env = vec![
        ("TALLY_WEBHOOK_URLS", url.as_str()),
        ("TALLY_WEBHOOK_SECRET", "whsec_test"),
        ("TALLY_WEBHOOK_RETRY_BASE", "100ms"),
    ];
    env.extend_from_slice(backends);
    let ingest = start_with_env(
        "ingest",
        dir.path(),
        free_port(),
        free_port(),
        "50ms",
        backends,
    );
    let a = start_with_env(
        "enforcer",
        dir.path(),
        free_port(),
        free_port(),
        "50ms",
        &env,
    );
    let b = start_with_env(
        "enforcer",
        dir.path(),
        free_port(),
        free_port(),
        "50ms",
        &env,
    );

    let client = servers::client();
    let events = json!([
        {"specversion": "1.0", "id": "w1", "source": "edge", "type": "api_requests", "subject": "hooked", "data": {"value": 8000}},
        {"specversion": "1.0", "id": "w2", "source": "edge", "type": "api_requests", "subject": "hooked", "data": {"value": 3000}}
    ]);
    let r = ingest.post_batch(events.to_string());
    assert_eq!(r.status().as_u16(), 202);

    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.lock().unwrap().delivered.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "deliveries: {:?}",
            receiver.lock().unwrap().attempts
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Give a second sender time to show up if there were one.
    std::thread::sleep(Duration::from_secs(1));
    let r = receiver.lock().unwrap();
    let mut thresholds: Vec<u64> = Vec::new();
    for (id, sig, body) in &r.delivered {
        let v: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["id"], id.as_str());
        assert_eq!(
            (
                v["customer"].clone(),
                v["meter"].clone(),
                v["limit"].clone()
            ),
            (json!("hooked"), json!("api_requests"), json!(10000))
        );
        let t: i64 = sig
            .strip_prefix("t=")
            .and_then(|s| s.split(',').next())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            sig,
            &tally_enforcer::webhooks::signature("whsec_test", t, body)
        );
        thresholds.push(v["threshold"].as_u64().unwrap());
        assert_eq!(
            r.attempts[id], 2,
            "one failed attempt, one retry, no second sender: {id}"
        );
    }
    thresholds.sort();
    assert_eq!(thresholds, vec![80, 100, 110]);
    assert_eq!(r.delivered.len(), 3);
    // Both replicas give the same answer after the same events.
    let answers: Vec<Value> = [&a, &b]
        .iter()
        .map(|p| {
            let mut v: Value = client
                .get(format!(
                    "{}/v1/check?customer=hooked&meter=api_requests&quantity=1",
                    p.api
                ))
                .send()
                .unwrap()
                .json()
                .unwrap();
            v.as_object_mut().unwrap().remove("detail");
            v
        })
        .collect();
    assert_eq!(answers[0], answers[1]);
    assert_eq!(
        (answers[0]["decision"].clone(), answers[0]["usage"].clone()),
        (json!("block"), json!(11000))
    );
}

/// A receiver that refuses every delivery while `refusing` is set.
#[derive(Default)]
struct Flaky {
    refusing: bool,
    /// Ids of the attempts, in order, and whether each was accepted.
    attempts: Vec<(String, bool)>,
}

async fn flaky(State(r): State<Arc<Mutex<Flaky>>>, headers: HeaderMap) -> StatusCode {
    let id = headers["tally-webhook-id"].to_str().unwrap().to_owned();
    let mut r = r.lock().unwrap();
    let accepted = !r.refusing;
    r.attempts.push((id, accepted));
    if accepted {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// A delivery being retried when the process is SIGKILLed is resumed from the outbox after the
/// restart, and delivered once the receiver accepts it.
#[test]
fn a_delivery_interrupted_by_a_crash_resumes_after_the_restart() {
    let receiver = Arc::new(Mutex::new(Flaky {
        refusing: true,
        ..Flaky::default()
    }));
    let (_rt, url) = serve_hook(post(flaky).with_state(receiver.clone()));

    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("TALLY_WEBHOOK_URLS", url.as_str()),
        ("TALLY_WEBHOOK_RETRY_BASE", "200ms"),
        ("TALLY_WEBHOOK_TIMEOUT", "1s"),
        ("TALLY_WEBHOOK_MAX_ATTEMPTS", "50"),
    ];
    let (api, admin) = (free_port(), free_port());
    let mut first = start_with_env("run", dir.path(), api, admin, "50ms", &env);
    let r = first.post_batch(
        json!([{"specversion": "1.0", "id": "c1", "source": "edge", "type": "api_requests",
                "subject": "crashy", "data": {"value": 8500}}])
        .to_string(),
    );
    assert_eq!(r.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    while receiver.lock().unwrap().attempts.len() < 2 {
        assert!(Instant::now() < deadline, "no retried delivery");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let refused_before_crash = {
        let mut r = receiver.lock().unwrap();
        r.refusing = false;
        r.attempts.len()
    };
    assert!(receiver.lock().unwrap().attempts.iter().all(|(_, ok)| !ok));

    let _second = start_with_env("run", dir.path(), api, admin, "50ms", &env);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !receiver.lock().unwrap().attempts.iter().any(|(_, ok)| *ok) {
        assert!(Instant::now() < deadline, "the delivery was not resumed");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Time for a second, wrong, resumption to show up.
    std::thread::sleep(Duration::from_secs(3));
    let r = receiver.lock().unwrap();
    let id = "crashy:api_requests:";
    assert!(
        r.attempts
            .iter()
            .all(|(i, _)| i.starts_with(id) && i.ends_with(":80"))
    );
    let after: Vec<bool> = r.attempts[refused_before_crash..]
        .iter()
        .map(|(_, ok)| *ok)
        .collect();
    assert_eq!(after, vec![true], "one attempt after the restart, accepted");
}
