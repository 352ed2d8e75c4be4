//! A fixed-rate gRPC load generator for the check benchmark: calls Envoy's
//! `RateLimitService/ShouldRateLimit` (one descriptor: a random customer of 1,000 and
//! `api_requests`) over several HTTP/2 connections, and prints a JSON line with the achieved
//! rate and latency percentiles. At a fixed rate each call's latency is measured from the time
//! it was scheduled, not from when it was sent, so a slow server cannot hide its queueing
//! (coordinated omission). `benches/enforcer_http.sh` runs it against Tally and
//! `benches/baseline_grpc.rs`.
//!
//! Usage: `grpc_load http://127.0.0.1:PORT RATE|max SECONDS CONNECTIONS`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tally_enforcer::grpc::rls::rate_limit_descriptor::Entry;
use tally_enforcer::grpc::rls::rate_limit_service_client::RateLimitServiceClient;
use tally_enforcer::grpc::rls::{RateLimitDescriptor, RateLimitRequest};
use tonic::transport::{Channel, Endpoint};

/// Calls in flight per connection (HTTP/2 streams).
const STREAMS: usize = 16;

fn request(n: u64) -> RateLimitRequest {
    let entry = |key: &str, value: String| Entry {
        key: key.into(),
        value,
    };
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                entry("customer", format!("bench-{:03}", n % 1000)),
                entry("meter", "api_requests".into()),
            ],
            hits_addend: None,
        }],
        hits_addend: 1,
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, rate, secs, connections] = &args[..] else {
        return Err("usage: grpc_load URL RATE|max SECONDS CONNECTIONS".into());
    };
    let rate: Option<f64> = (rate != "max").then(|| rate.parse()).transpose()?;
    let duration = Duration::from_secs_f64(secs.parse()?);
    let connections: usize = connections.parse()?;
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..connections {
        channels.push(Endpoint::from_shared(url.clone())?.connect().await?);
    }
    let issued = Arc::new(AtomicU64::new(0));
    let total = rate.map_or(u64::MAX, |r| (r * duration.as_secs_f64()) as u64);
    let start = Instant::now() + Duration::from_millis(100);
    let deadline = start + duration;
    let mut workers = Vec::new();
    for w in 0..connections * STREAMS {
        let mut client = RateLimitServiceClient::new(channels[w % connections].clone());
        let issued = issued.clone();
        workers.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("histogram");
            let (mut ok, mut errors) = (0u64, 0u64);
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let scheduled = match rate {
                    Some(r) => start + Duration::from_secs_f64(n as f64 / r),
                    None => Instant::now().max(start),
                };
                if scheduled >= deadline {
                    break;
                }
                tokio::time::sleep_until(scheduled.into()).await;
                match client.should_rate_limit(request(n)).await {
                    Ok(_) => ok += 1,
                    Err(_) => errors += 1,
                }
                let _ = hist.record(scheduled.elapsed().as_micros() as u64);
            }
            (hist, ok, errors)
        }));
    }
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut ok, mut errors) = (0u64, 0u64);
    for w in workers {
        let (h, o, e) = w.await?;
        hist.add(h)?;
        ok += o;
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{{\"rps\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"ok\": {ok}, \"errors\": {errors}}}",
        ok as f64 / elapsed,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999)
    );
    Ok(())
}
