//! Baseline for the HTTP check benchmark: an axum server whose `GET /v1/check` does no work and
//! answers a constant body of the same size as Tally's reply. `benches/enforcer_http.sh` runs it
//! beside Tally on the same machine.
//!
//! Usage: `baseline_axum 127.0.0.1:PORT`

use axum::Router;
use axum::http::header;
use axum::routing::get;

const BODY: &str = r#"{"decision":"allow","state":"ok","customer":"bench-000","meter":"api_requests","plan":"free","quantity":1,"usage":0,"limit":10000,"remaining":9999,"percent":0.01,"threshold":null,"period_start":"2026-11-01T00:00:00Z","period_end":"2026-12-01T00:00:00Z","grace_until":null}"#;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8090".into());
    let app = Router::new().route(
        "/v1/check",
        get(|| async { ([(header::CONTENT_TYPE, "application/json")], BODY) }),
    );
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app).await
}
