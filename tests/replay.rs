//! `tally replay` against the real binary: a file of CloudEvents fed into a running pipeline's
//! embedded log from a second process counts once however often it is replayed, refused events
//! are reported with their codes (exit status 2), and an embedded log copied from another data
//! directory replays into a fresh pipeline with the same totals.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::process::{Proc, free_port, start};
use serde_json::{Value, json};

fn replay(data: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("replay")
        .args(args)
        .env("TALLY_DATA_DIR", data)
        .env("TALLY_LOG", "warn")
        .output()
        .expect("tally replay runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn usage(p: &Proc, customer: &str) -> u64 {
    let v: Value = reqwest::blocking::get(format!(
        "{}/v1/usage?customer={customer}&meter=api_requests",
        p.api
    ))
    .unwrap()
    .json()
    .unwrap();
    v["usage"].as_u64().unwrap()
}

fn wait_usage(p: &Proc, customer: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = usage(p, customer);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{customer}: {got}, want {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_replayed_file_counts_once_and_refusals_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = start(dir.path(), free_port(), free_port(), "50ms");
    // 12,000 events (three appends) for 3 customers, as NDJSON, plus one invalid event.
    let mut lines: Vec<String> = (0..12_000)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("r{i}"), "source": "backfill",
                   "type": "api_requests", "subject": format!("rc{}", i % 3),
                   "data": {"value": 2}})
            .to_string()
        })
        .collect();
    lines.insert(
        7,
        json!({"specversion": "1.0", "id": "bad", "source": "backfill", "type": "gpu_hours",
               "subject": "rc0"})
        .to_string(),
    );
    let file = dir.path().join("events.ndjson");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    let out = replay(
        dir.path(),
        &["--file", file.to_str().unwrap(), "--no-progress"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("read 12001, accepted 12000, duplicates 0, rejected 1\n"),
        "{text}"
    );
    assert!(text.contains("rejected unknown_meter: 1"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("refused at 8: unknown meter `gpu_hours`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for c in 0..3 {
        wait_usage(&p, &format!("rc{c}"), 8_000);
    }

    // Again: every event is a duplicate; the totals do not move.
    let out = replay(
        dir.path(),
        &["--file", file.to_str().unwrap(), "--no-progress"],
    );
    assert!(
        stdout(&out).starts_with("read 12001, accepted 0, duplicates 12000, rejected 1\n"),
        "{}",
        stdout(&out)
    );
    std::thread::sleep(Duration::from_millis(500));
    for c in 0..3 {
        assert_eq!(usage(&p, &format!("rc{c}")), 8_000);
    }

    // A JSON array with events older than the late window: refused, so that nothing replayed
    // can fall outside the de-duplication window.
    let array = json!([
        {"specversion": "1.0", "id": "old", "source": "backfill", "type": "api_requests",
         "subject": "rc0", "time": "2020-01-01T00:00:00Z"},
        {"specversion": "1.0", "id": "new", "source": "backfill", "type": "api_requests",
         "subject": "rc0", "data": {"value": 5}}
    ]);
    let file = dir.path().join("events.json");
    std::fs::write(&file, array.to_string()).unwrap();
    let out = replay(
        dir.path(),
        &["--file", file.to_str().unwrap(), "--no-progress"],
    );
    assert!(
        stdout(&out).contains("rejected event_too_old: 1"),
        "{}",
        stdout(&out)
    );
    wait_usage(&p, "rc0", 8_005);

    // Bad arguments get a clear error.
    let out = replay(dir.path(), &["--from-topic", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs kafka_brokers"));
}

#[test]
fn an_embedded_log_replays_into_another_pipeline() {
    let first = tempfile::tempdir().unwrap();
    let p = start(first.path(), free_port(), free_port(), "50ms");
    let batch: Vec<Value> = (0..300)
        .map(|i| {
            json!({"specversion": "1.0", "id": format!("m{i}"), "source": "edge",
                   "type": "api_requests", "subject": format!("mc{}", i % 2),
                   "data": {"value": 1 + i % 5}})
        })
        .collect();
    assert_eq!(
        p.post_batch(json!(batch).to_string()).status().as_u16(),
        202
    );
    let want: Vec<u64> = (0..2)
        .map(|c| (0..300).filter(|i| i % 2 == c).map(|i| 1 + i % 5).sum())
        .collect();
    wait_usage(&p, "mc0", want[0]);
    drop(p);
    let copy = tempfile::tempdir().unwrap();
    let db = copy.path().join("events.db");
    // A copy of the database with its write-ahead log (the process was killed).
    for suffix in ["", "-wal", "-shm"] {
        let from = first.path().join(format!("events.db{suffix}"));
        if from.exists() {
            std::fs::copy(from, copy.path().join(format!("events.db{suffix}"))).unwrap();
        }
    }

    let second = tempfile::tempdir().unwrap();
    let q = start(second.path(), free_port(), free_port(), "50ms");
    let out = replay(
        second.path(),
        &["--from-events-db", db.to_str().unwrap(), "--no-progress"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout(&out).starts_with("read 300, accepted 300, duplicates 0, rejected 0"),
        "{}",
        stdout(&out)
    );
    wait_usage(&q, "mc0", want[0]);
    wait_usage(&q, "mc1", want[1]);
    // A range: offsets [101, 151) of partition 0 again, all duplicates.
    let out = replay(
        second.path(),
        &[
            "--from-events-db",
            db.to_str().unwrap(),
            "--partition",
            "0",
            "--from-offset",
            "101",
            "--to-offset",
            "151",
            "--no-progress",
        ],
    );
    assert!(
        stdout(&out).starts_with("read 50, accepted 0, duplicates 50, rejected 0"),
        "{}",
        stdout(&out)
    );
    assert_eq!(usage(&q, "mc1"), want[1]);
}
