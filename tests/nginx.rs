//! nginx (Debian's package) in front of a test upstream, asking the enforcer through
//! `auth_request` with the snippets shipped in deploy/nginx: allowed customers reach the
//! upstream, blocked ones get 429 with Retry-After, requests without a customer get 401.

mod common;
mod servers;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::process::{free_port, start_with_env};
use serde_json::{Value, json};

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx_binary() -> Option<String> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|c| std::path::Path::new(c).exists())
        .map(str::to_owned)
}

#[test]
fn nginx_auth_request_allows_and_blocks_through_the_enforcer() {
    let Some(nginx) = nginx_binary() else {
        assert!(servers::skip_without_tool(
            "nginx (Debian's nginx-light)",
            false
        ));
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tally_port = free_port();
    // Keys required (a bootstrap admin key): nginx sends the key the snippet is given.
    let key = "nginx-test-admin-key-0123456789abcdef";
    let tally = start_with_env(
        "run",
        &dir.path().join("data"),
        tally_port,
        free_port(),
        "50ms",
        &[("TALLY_ADMIN_KEY", key)],
    );
    let (gateway_port, upstream_port) = (free_port(), free_port());
    let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx");
    let prefix = dir.path().join("nginx");
    std::fs::create_dir_all(prefix.join("tmp")).unwrap();
    let conf = format!(
        r#"
daemon off;
master_process off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    upstream tally_enforcer {{ server 127.0.0.1:{tally_port}; }}
    server {{
        listen 127.0.0.1:{upstream_port};
        location / {{ return 200 "upstream ok\n"; }}
    }}
    server {{
        listen 127.0.0.1:{gateway_port};
        set $tally_key {key};
        include {deploy}/tally-check.conf;
        location / {{
            set $tally_customer $http_x_customer_id;
            set $tally_meter api_requests;
            include {deploy}/tally-protect.conf;
            proxy_pass http://127.0.0.1:{upstream_port};
        }}
    }}
}}
"#,
        p = prefix.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let _nginx = Nginx(
        Command::new(&nginx)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx starts"),
    );
    let client = reqwest::blocking::Client::new();
    let gateway = format!("http://127.0.0.1:{gateway_port}/orders");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&gateway).send().is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Usage: one customer well under its limit, one past 110 %.
    let events = json!([
        {"specversion": "1.0", "id": "n1", "source": "edge", "type": "api_requests", "subject": "ngx-ok", "data": {"value": 100}},
        {"specversion": "1.0", "id": "n2", "source": "edge", "type": "api_requests", "subject": "ngx-over", "data": {"value": 12000}},
        {"specversion": "1.0", "id": "n3", "source": "edge", "type": "api_requests", "subject": "ngx-edge", "data": {"value": 10999}}
    ]);
    let r = tally.post_batch(events.to_string());
    assert_eq!(r.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: Value = client
            .get(format!(
                "{}/v1/check?customer=ngx-over&meter=api_requests&quantity=0",
                tally.api
            ))
            .bearer_auth(key)
            .send()
            .unwrap()
            .json()
            .unwrap();
        if v["usage"] == 12000 {
            break;
        }
        assert!(Instant::now() < deadline, "usage not applied: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let r = client
        .get(&gateway)
        .header("x-customer-id", "ngx-ok")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["tally-quota-state"], "ok");
    assert!(
        r.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains("\"quota\";q=10000")
    );
    assert_eq!(r.text().unwrap(), "upstream ok\n");

    let r = client
        .get(&gateway)
        .header("x-customer-id", "ngx-over")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(
        r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(r.headers()["tally-quota-state"], "blocked");
    let body: Value = r.json().unwrap();
    assert_eq!(body["status"], 429);

    let r = client.get(&gateway).send().unwrap();
    assert_eq!(r.status().as_u16(), 401, "no customer header");

    // What a client sends in X-Tally-* headers never reaches Tally. At 10,999 of 10,000 one
    // more request reaches 110 % and is blocked; a client claiming quantity 0 (which would
    // stay under 110 %) or another customer's id is blocked all the same.
    for (name, value) in [
        ("x-tally-quantity", "0"),
        ("x-tally-customer", "ngx-ok"),
        ("x-tally-meter", "build_minutes"),
    ] {
        let r = client
            .get(&gateway)
            .header("x-customer-id", "ngx-edge")
            .header(name, value)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 429, "{name}: {value}");
    }
}
