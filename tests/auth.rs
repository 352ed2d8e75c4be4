//! Access control against the real binary: open on loopback until the first key, scopes, a
//! read key limited to its customer, revocation and rotation with overlap (CLI and admin API),
//! per-key event rates (429 + Retry-After, nothing of the refused request counted), a process
//! beyond loopback or with `TALLY_ADMIN_KEY` never open, slow clients cut off, and no key in
//! the logs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::free_port;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

struct Tally {
    child: Child,
    api: String,
    log: std::path::PathBuf,
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tally run` on `data` listening on `host`, with its log (debug) in `data/tally.log`.
fn start(data: &Path, host: &str, env: &[(&str, &str)]) -> Tally {
    let (port, admin) = (free_port(), free_port());
    let log = data.join("tally.log");
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("run")
        .envs(env.iter().copied())
        .env("TALLY_DATA_DIR", data)
        .env("TALLY_LISTEN", format!("{host}:{port}"))
        .env("TALLY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
        .env("TALLY_FLUSH_INTERVAL", "20ms")
        .env("TALLY_LOG", "debug")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tally starts");
    let t = Tally {
        child,
        api: format!("http://127.0.0.1:{port}"),
        log,
    };
    let client = Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .is_ok_and(|r| r.status().is_success())
        {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("tally did not become ready");
}

/// `tally keys ...` on `data`: standard output.
fn keys_cli(data: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("keys")
        .args(args)
        .env("TALLY_DATA_DIR", data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tally keys {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn with_key(req: RequestBuilder, key: Option<&str>) -> RequestBuilder {
    match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

fn events(prefix: &str, customer: &str, n: usize) -> String {
    Value::Array(
        (0..n)
            .map(|i| {
                json!({"specversion": "1.0", "id": format!("{prefix}-{i}"), "source": "edge",
                       "type": "api_requests", "subject": customer, "data": {"value": 1}})
            })
            .collect(),
    )
    .to_string()
}

fn ingest(t: &Tally, key: Option<&str>, body: String) -> Response {
    with_key(Client::new().post(format!("{}/v1/events", t.api)), key)
        .header("content-type", "application/cloudevents-batch+json")
        .body(body)
        .send()
        .unwrap()
}

fn get(t: &Tally, path: &str, key: Option<&str>) -> Response {
    with_key(Client::new().get(format!("{}{path}", t.api)), key)
        .send()
        .unwrap()
}

fn code(r: Response) -> (u16, String) {
    let status = r.status().as_u16();
    let body: Value = r.json().unwrap_or(Value::Null);
    (status, body["code"].as_str().unwrap_or("").to_owned())
}

/// Polls until `f` is true (keys reach a running process within its refresh interval).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 20 s");
}

#[test]
fn keys_scopes_revocation_rotation_and_rates() {
    let dir = tempfile::tempdir().unwrap();
    let t = start(
        dir.path(),
        "127.0.0.1",
        &[("TALLY_MAX_BATCH_EVENTS", "100")],
    );

    // Open on loopback while no key exists, and loud about it.
    assert_eq!(ingest(&t, None, events("open", "cust_1", 3)).status(), 202);
    let log = std::fs::read_to_string(&t.log).unwrap();
    assert!(log.contains("API OPEN"), "no open-mode warning in the log");

    // The first key, made with the CLI while the process runs, closes it.
    let admin = keys_cli(dir.path(), &["create", "--name", "ops", "--scope", "admin"]);
    let admin = admin.trim().to_owned();
    assert!(admin.starts_with("tly_"), "{admin}");
    eventually("the API requires keys", || {
        // Until then a probe may still be taken: another customer.
        ingest(&t, None, events("closed", "probe", 1)).status() == 401
    });
    assert_eq!(
        code(ingest(&t, None, events("closed", "probe", 1))),
        (401, "missing_api_key".into())
    );
    let last = if admin.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &admin[..admin.len() - 1]);
    assert_eq!(
        code(ingest(&t, Some(&forged), events("forged", "cust_1", 1))),
        (401, "invalid_api_key".into())
    );
    assert_eq!(
        code(ingest(&t, Some("not-a-key"), events("forged", "cust_1", 1))),
        (401, "invalid_api_key".into())
    );
    // Public without a key: the OpenAPI document and the dashboard page.
    assert_eq!(get(&t, "/openapi.json", None).status(), 200);
    assert_eq!(get(&t, "/dashboard", None).status(), 200);

    // Keys through the admin API.
    let client = Client::new();
    let create = |grant: Value| -> Value {
        let r = client
            .post(format!("{}/v1/keys", t.api))
            .bearer_auth(&admin)
            .json(&grant)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        r.json().unwrap()
    };
    let edge = create(json!({"name": "edge", "scopes": ["ingest"], "ingest_rate": 10}));
    let edge_key = edge["key"].as_str().unwrap().to_owned();
    let gateway = create(json!({"name": "gw", "scopes": ["check"]}));
    let gw_key = gateway["key"].as_str().unwrap().to_owned();
    let dash = create(json!({"name": "portal", "scopes": ["read"], "customer": "cust_1"}));
    let dash_key = dash["key"].as_str().unwrap().to_owned();
    // Not a valid grant.
    let r = client
        .post(format!("{}/v1/keys", t.api))
        .bearer_auth(&admin)
        .json(&json!({"name": "x", "scopes": ["ingest"], "customer": "cust_1"}))
        .send()
        .unwrap();
    assert_eq!(code(r), (400, "invalid_key_request".into()));

    // Scopes.
    assert_eq!(
        ingest(&t, Some(&edge_key), events("edge", "cust_1", 100)).status(),
        202
    );
    let check = "/v1/check?customer=cust_1&meter=api_requests";
    assert_eq!(
        code(get(&t, check, Some(&edge_key))),
        (403, "forbidden".into())
    );
    assert_eq!(get(&t, check, Some(&gw_key)).status(), 200);
    assert_eq!(
        code(ingest(&t, Some(&gw_key), events("gw", "cust_1", 1))).0,
        403
    );
    assert_eq!(get(&t, "/v1/keys", Some(&gw_key)).status(), 403);

    // The per-key event rate: 10 events/s with a burst of one full request (100 events). The
    // second request of 100 right after is refused whole, with Retry-After.
    let r = ingest(&t, Some(&edge_key), events("burst", "cust_2", 100));
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(code(r).1, "rate_limited");

    // A read key limited to cust_1 reads cust_1 only.
    let summary =
        |c: &str, key: &str| get(&t, &format!("/v1/usage/summary?customer={c}"), Some(key));
    eventually("cust_1's usage is stored", || {
        let r = summary("cust_1", &dash_key);
        assert_eq!(r.status(), 200);
        r.json::<Value>().unwrap()["meters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["meter"] == "api_requests" && m["usage"] == 103)
    });
    assert_eq!(
        code(summary("cust_2", &dash_key)),
        (403, "forbidden".into())
    );
    assert_eq!(
        code(get(
            &t,
            "/v1/usage?customer=cust_2&meter=api_requests",
            Some(&dash_key)
        ))
        .0,
        403
    );
    assert_eq!(
        code(get(
            &t,
            "/v1/usage?customer=cust_1&customer=cust_2&meter=api_requests",
            Some(&dash_key)
        ))
        .0,
        403
    );
    assert_eq!(
        get(&t, "/v1/usage/top?meter=api_requests", Some(&dash_key)).status(),
        403
    );
    assert_eq!(
        get(&t, "/v1/customers/cust_1", Some(&dash_key)).status(),
        200
    );
    assert_eq!(
        get(&t, "/v1/customers/cust_2", Some(&dash_key)).status(),
        403
    );
    // The refused request counted nothing: cust_2 has no usage.
    let r: Value = summary("cust_2", &admin).json().unwrap();
    let used = r["meters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["meter"] == "api_requests")
        .unwrap()["usage"]
        .clone();
    assert_eq!(used, 0);

    // Revocation applies at once in the process that made it.
    let r = client
        .delete(format!(
            "{}/v1/keys/{}",
            t.api,
            gateway["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        code(get(&t, check, Some(&gw_key))),
        (401, "invalid_api_key".into())
    );

    // Rotation with a 3 s overlap: both keys work, then only the new one.
    let r = client
        .post(format!(
            "{}/v1/keys/{}/rotate",
            t.api,
            dash["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin)
        .json(&json!({"overlap_seconds": 3}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let rotated: Value = r.json().unwrap();
    let new_key = rotated["key"].as_str().unwrap().to_owned();
    assert_eq!(rotated["customer"], "cust_1");
    assert_eq!(rotated["rotated_from"], dash["id"]);
    assert_eq!(summary("cust_1", &new_key).status(), 200);
    assert_eq!(summary("cust_1", &dash_key).status(), 200);
    eventually("the old key expires after the overlap", || {
        summary("cust_1", &dash_key).status() == 401
    });
    assert_eq!(summary("cust_1", &new_key).status(), 200);

    // The list shows states, never keys or hashes.
    let listed = get(&t, "/v1/keys", Some(&admin)).text().unwrap();
    let list: Value = serde_json::from_str(&listed).unwrap();
    let state = |id: &Value| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == *id)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state(&gateway["id"]), "revoked");
    assert_eq!(state(&dash["id"]), "expired");
    assert_eq!(state(&rotated["id"]), "active");
    let cli_list = keys_cli(dir.path(), &["list"]);
    let log = std::fs::read_to_string(&t.log).unwrap();
    for key in [&admin, &edge_key, &gw_key, &dash_key, &new_key] {
        let secret = key.rsplit('_').next().unwrap();
        assert!(!listed.contains(secret), "a key in the key list");
        assert!(!cli_list.contains(secret), "a key in `tally keys list`");
        assert!(!log.contains(secret), "a key in the log");
    }
    // The store holds hashes only.
    let mut db = std::fs::read(dir.path().join("usage.db")).unwrap();
    db.extend(std::fs::read(dir.path().join("usage.db-wal")).unwrap_or_default());
    let db = String::from_utf8_lossy(&db);
    assert!(
        db.contains(edge["id"].as_str().unwrap()),
        "the key's record is in usage.db"
    );
    assert!(!db.contains(edge_key.rsplit('_').next().unwrap()));
}

#[test]
fn never_open_beyond_loopback_or_with_an_admin_key() {
    // Listening on every interface with no key: closed, and it says why.
    let dir = tempfile::tempdir().unwrap();
    let t = start(dir.path(), "0.0.0.0", &[]);
    assert_eq!(
        code(ingest(&t, None, events("wide", "c", 1))),
        (401, "missing_api_key".into())
    );
    drop(t);

    // Loopback with a bootstrap admin key: closed; the admin key works and is not stored.
    let dir = tempfile::tempdir().unwrap();
    let admin = "bootstrap-admin-key-0123456789abcdef";
    let t = start(dir.path(), "127.0.0.1", &[("TALLY_ADMIN_KEY", admin)]);
    assert_eq!(ingest(&t, None, events("b", "c", 1)).status(), 401);
    assert_eq!(ingest(&t, Some(admin), events("b", "c", 1)).status(), 202);
    assert_eq!(
        get(&t, "/v1/keys", Some(admin)).json::<Value>().unwrap(),
        json!([])
    );
    // Too short a bootstrap key is a configuration error.
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("config")
        .env("TALLY_ADMIN_KEY", "short")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 32 characters"));
}

#[test]
fn slow_clients_are_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let t = start(
        dir.path(),
        "127.0.0.1",
        &[("TALLY_HEADER_TIMEOUT", "1s"), ("TALLY_BODY_TIMEOUT", "1s")],
    );
    let addr = t.api.trim_start_matches("http://").to_owned();

    // Headers that never end: the server closes the connection.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let closed = s.read_to_end(&mut buf).is_ok();
    assert!(closed, "the connection stayed open");
    assert!(started.elapsed() < Duration::from_secs(15));

    // A body that never arrives in full: 408, and nothing of it is taken.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"specversion\"",
    )
    .unwrap();
    let mut reply = [0u8; 64];
    let n = s.read(&mut reply).unwrap();
    let head = String::from_utf8_lossy(&reply[..n]);
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");

    // An idle kept-alive connection is closed too, and the server still serves others.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = Vec::new();
    assert!(s.read_to_end(&mut buf).is_ok() && buf.is_empty());
    assert_eq!(ingest(&t, None, events("ok", "c", 1)).status(), 202);
}
