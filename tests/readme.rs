//! The README's walk-through, run verbatim (with the port changed) against the real binary on a
//! fresh data directory; each reply must match the one the README shows, except for members
//! that depend on the date.

mod common;
#[path = "servers/mod.rs"]
mod servers;

use std::process::Command;
use std::time::{Duration, Instant};

use common::process::{free_port, start, start_with_env};
use serde_json::Value;

/// Members whose value depends on when the walk-through runs.
const VOLATILE: &[&str] = &[
    "period_start",
    "period_end",
    "grace_until",
    "from",
    "to",
    "start",
    "end",
];

/// `want` with the volatile members of `got` copied over, for comparison.
fn align(want: &Value, got: &Value) -> Value {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => Value::Object(
            w.iter()
                .map(|(k, v)| {
                    let v = match g.get(k) {
                        Some(gv) if VOLATILE.contains(&k.as_str()) => gv.clone(),
                        Some(gv) => align(v, gv),
                        None => v.clone(),
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            Value::Array(w.iter().zip(g).map(|(a, b)| align(a, b)).collect())
        }
        _ => want.clone(),
    }
}

/// (command, expected reply) pairs of the walk-through.
fn steps() -> Vec<(String, Value)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough")
        .expect("walk-through start marker");
    let end = readme
        .find("<!-- end of walkthrough -->")
        .expect("walk-through end marker");
    let section = &readme[start..end];
    let mut steps = Vec::new();
    let mut pending: Option<String> = None;
    let mut rest = section;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        let lang_end = after.find('\n').unwrap();
        let lang = &after[..lang_end];
        let body_end = after[lang_end..].find("```").unwrap() + lang_end;
        let body = after[lang_end + 1..body_end].to_string();
        match lang {
            "sh" => pending = Some(body),
            "json" => {
                let cmd = pending.take().expect("a reply follows a command");
                steps.push((
                    cmd,
                    serde_json::from_str(&body).expect("README reply is JSON"),
                ));
            }
            other => panic!("unexpected block `{other}` in the walk-through"),
        }
        rest = &after[body_end + 3..];
    }
    steps
}

#[test]
fn the_readme_walkthrough_works_verbatim() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = start(dir.path(), port, free_port(), "200ms");
    walk(port, None);
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

/// The same walk-through on the production path: `tally run` on a real Kafka-compatible broker
/// and a real ClickHouse (fresh topic and database), after `tally migrate`. That process
/// requires API keys: curl sends the bootstrap admin key from a curl config file, so the
/// commands still run verbatim.
#[test]
fn the_readme_walkthrough_works_on_kafka_and_clickhouse() {
    if servers::skip_without_servers(false) {
        return;
    }
    let backends = servers::Backends::shared();
    let env = backends.env();
    let env = servers::pairs(&env);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut p = start_with_env("run", dir.path(), port, free_port(), "200ms", &env);
    walk(port, Some(servers::ADMIN_KEY));
    p.child.kill().unwrap();
    p.child.wait().unwrap();
}

/// Runs every step against the API on `port`, comparing each reply with the README's.
fn walk(port: u16, key: Option<&str>) {
    let curl_home = tempfile::tempdir().unwrap();
    if let Some(key) = key {
        std::fs::write(
            curl_home.path().join(".curlrc"),
            format!("header = \"Authorization: Bearer {key}\"\n"),
        )
        .unwrap();
    }
    let steps = steps();
    assert!(
        steps.len() >= 8,
        "walk-through steps found: {}",
        steps.len()
    );
    for (cmd, want) in &steps {
        assert!(cmd.trim_start().starts_with("curl "), "{cmd}");
        let cmd = cmd.replace("localhost:8080", &format!("127.0.0.1:{port}"));
        // Reads may trail the writes before them by the flush interval: retry those.
        let read_only = cmd.contains("/v1/check") || cmd.contains("/v1/usage");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = Command::new("sh")
                .arg("-c")
                .arg(&cmd)
                .env("CURL_HOME", curl_home.path())
                .output()
                .expect("sh runs");
            assert!(
                out.status.success(),
                "{cmd} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let got: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "{cmd}: reply is not JSON ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
            let want = align(want, &got);
            if got == want {
                break;
            }
            if !read_only || Instant::now() > deadline {
                panic!("{cmd}\n  replied {got}\n  README {want}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
