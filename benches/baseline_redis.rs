//! Baseline for the HTTP check benchmark: a quota check the way many gateways do it, an HTTP
//! handler that runs INCRBY in a Redis Lua script per request (Redis from Debian's packages).
//! `benches/enforcer_http.sh` runs it beside Tally on the same machine.
//!
//! Usage: `baseline_redis 127.0.0.1:PORT redis://127.0.0.1:REDIS_PORT`

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use redis::Script;
use redis::aio::MultiplexedConnection;
use serde::Deserialize;
use serde_json::{Value, json};

/// Adds the quantity to the customer's counter for the month; allows while within the limit.
const QUOTA: &str = r#"
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
if used == tonumber(ARGV[1]) then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if used > tonumber(ARGV[2]) then return {0, used} end
return {1, used}
"#;

#[derive(Deserialize)]
struct Check {
    customer: String,
    meter: String,
    quantity: Option<u64>,
}

#[derive(Clone)]
struct App {
    conn: MultiplexedConnection,
    script: Script,
}

async fn check(State(app): State<App>, Query(q): Query<Check>) -> (StatusCode, Json<Value>) {
    let key = format!("quota:{}:{}:2026-11", q.customer, q.meter);
    let quantity = q.quantity.unwrap_or(1);
    let mut conn = app.conn.clone();
    let result: redis::RedisResult<(i64, i64)> = app
        .script
        .key(key)
        .arg(quantity)
        .arg(10_000_000_000u64)
        .arg(2_592_000)
        .invoke_async(&mut conn)
        .await;
    match result {
        Ok((allowed, used)) => {
            let status = if allowed == 1 {
                StatusCode::OK
            } else {
                StatusCode::TOO_MANY_REQUESTS
            };
            let decision = if allowed == 1 { "allow" } else { "block" };
            (
                status,
                Json(
                    json!({"decision": decision, "customer": q.customer, "meter": q.meter, "usage": used}),
                ),
            )
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"code": "unavailable", "message": e.to_string()})),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8091".into());
    let redis_url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let app = App {
        conn,
        script: Script::new(QUOTA),
    };
    let router = Router::new().route("/v1/check", get(check)).with_state(app);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, router).await?;
    Ok(())
}
