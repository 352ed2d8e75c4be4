//! `tally ingest`, `tally aggregator` and `tally enforcer` as separate processes sharing one
//! embedded data directory: events posted to ingest reach the enforcer and the store.

mod common;

use std::time::{Duration, Instant};

use common::process::{free_port, start_component};
use serde_json::{Value, json};

#[test]
fn separate_processes_share_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let ingest = start_component("ingest", dir.path(), free_port(), free_port(), "50ms");
    let aggregator = start_component("aggregator", dir.path(), free_port(), free_port(), "50ms");
    let enforcer = start_component("enforcer", dir.path(), free_port(), free_port(), "50ms");
    let client = reqwest::blocking::Client::new();
    // Each process serves only its own endpoints.
    let r = client
        .get(format!(
            "{}/v1/check?customer=c&meter=api_requests",
            ingest.api
        ))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let events: Vec<Value> = (0..30)
        .map(|i| json!({"specversion": "1.0", "id": format!("p-{i}"), "source": "edge", "type": "api_requests", "subject": "split", "data": {"value": 10}}))
        .collect();
    let r = ingest.post_batch(Value::Array(events).to_string());
    assert_eq!(r.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let check: Value = client
            .get(format!(
                "{}/v1/check?customer=split&meter=api_requests&quantity=0",
                enforcer.api
            ))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let usage: Value = client
            .get(format!(
                "{}/v1/usage?customer=split&meter=api_requests",
                aggregator.api
            ))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if check["usage"] == 300 && usage["usage"] == 300 {
            break;
        }
        assert!(Instant::now() < deadline, "enforcer {check}, store {usage}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
