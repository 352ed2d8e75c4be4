//! Shared helpers: an in-process Tally on a temporary data directory with a controlled clock,
//! driven through its router without sockets.
#![allow(dead_code)]

pub mod process;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tally::{App, Component, Config};
use tally_schemas::ManualClock;
use tally_schemas::period::parse_rfc3339;
use tower::ServiceExt;

pub const NOW: &str = "2026-11-21T10:00:00Z";

pub fn ms(t: &str) -> i64 {
    parse_rfc3339(t).expect("test timestamps are valid")
}

pub struct Tally {
    pub app: App,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    pub config: Config,
}

pub fn config(dir: &std::path::Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        flush_interval: Duration::from_millis(20),
        ..Config::default()
    }
}

impl Tally {
    pub async fn start() -> Tally {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(dir.path());
        Tally::start_with(dir, config).await
    }

    pub async fn start_with(dir: tempfile::TempDir, config: Config) -> Tally {
        Tally::launch(dir, config, Arc::new(ManualClock::new(ms(NOW)))).await
    }

    async fn launch(dir: tempfile::TempDir, config: Config, clock: Arc<ManualClock>) -> Tally {
        let app = App::start(&config, &Component::ALL, clock.clone())
            .await
            .expect("tally starts");
        let t = Tally {
            app,
            clock,
            dir,
            config,
        };
        t.wait_ready().await;
        t
    }

    /// Stops the pipeline and starts it again on the same data directory.
    pub async fn restart(self) -> Tally {
        let Tally {
            app,
            clock,
            dir,
            config,
        } = self;
        app.stop(Duration::from_secs(10)).await.expect("clean stop");
        Tally::launch(dir, config, clock).await
    }

    async fn wait_ready(&self) {
        let state = self.app.enforcer.clone().expect("enforcer runs");
        for _ in 0..500 {
            if state.is_ready() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("enforcer did not become ready");
    }

    pub async fn send(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = self
            .app
            .router
            .clone()
            .oneshot(req)
            .await
            .expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, body)
    }

    pub async fn post(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<String>,
    ) -> (StatusCode, Value) {
        let req = Request::post(path)
            .header("content-type", content_type)
            .body(Body::from(body.into()))
            .expect("request");
        let (s, _, b) = self.send(req).await;
        (s, b)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, b) = self
            .send(Request::get(path).body(Body::empty()).expect("request"))
            .await;
        (s, b)
    }

    /// A request of any method with a JSON body (`Value::Null`: none).
    pub async fn call(&self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::builder().method(method).uri(path);
        let req = if body.is_null() {
            req.body(Body::empty())
        } else {
            req.header("content-type", "application/json")
                .body(Body::from(body.to_string()))
        };
        let (s, _, b) = self.send(req.expect("request")).await;
        (s, b)
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let req = Request::put(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let (s, _, b) = self.send(req).await;
        (s, b)
    }

    /// A quota check with `quantity`, returning status, headers and body.
    pub async fn check(
        &self,
        customer: &str,
        meter: &str,
        quantity: u64,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let body = serde_json::json!({"customer": customer, "meter": meter, "quantity": quantity});
        let req = Request::post("/v1/check")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        self.send(req).await
    }

    /// Waits until the enforcer reports `usage` for the customer and meter.
    pub async fn wait_usage(&self, customer: &str, meter: &str, usage: u64) {
        let mut last = Value::Null;
        for _ in 0..500 {
            let (_, _, b) = self.check(customer, meter, 0).await;
            if b["usage"] == usage {
                return;
            }
            last = b;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("usage of {customer}/{meter} never reached {usage}: {last}");
    }

    /// Waits until the query API (the store) reports `usage` for the current period.
    pub async fn wait_stored(&self, customer: &str, meter: &str, usage: u64) {
        let mut last = Value::Null;
        for _ in 0..500 {
            let (_, b) = self
                .get(&format!("/v1/usage?customer={customer}&meter={meter}"))
                .await;
            if b["usage"] == usage {
                return;
            }
            last = b;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("stored usage of {customer}/{meter} never reached {usage}: {last}");
    }
}

/// A CloudEvent as JSON text.
pub fn event(id: &str, customer: &str, meter: &str, value: u64, time: &str) -> String {
    serde_json::json!({
        "specversion": "1.0", "id": id, "source": "edge-test", "type": meter,
        "subject": customer, "time": time, "data": {"value": value}
    })
    .to_string()
}
