//! The real `tally` binary as a child process on free ports.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct Proc {
    pub child: Child,
    pub api: String,
    pub admin: String,
    /// `TALLY_ADMIN_KEY` of the process, sent by [`Proc::post_batch`].
    pub key: Option<String>,
}

pub fn start(data: &std::path::Path, api_port: u16, admin_port: u16, flush: &str) -> Proc {
    start_component("run", data, api_port, admin_port, flush)
}

/// Starts `tally <command>` (`run`, `ingest`, `aggregator`, `enforcer`, `billing-sync`).
pub fn start_component(
    command: &str,
    data: &std::path::Path,
    api_port: u16,
    admin_port: u16,
    flush: &str,
) -> Proc {
    start_with_env(command, data, api_port, admin_port, flush, &[])
}

/// [`start_component`] with more `TALLY_*` settings.
pub fn start_with_env(
    command: &str,
    data: &std::path::Path,
    api_port: u16,
    admin_port: u16,
    flush: &str,
    env: &[(&str, &str)],
) -> Proc {
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg(command)
        .envs(env.iter().copied())
        .env("TALLY_DATA_DIR", data)
        .env("TALLY_LISTEN", format!("127.0.0.1:{api_port}"))
        .env("TALLY_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
        .env("TALLY_FLUSH_INTERVAL", flush)
        // TALLY_TEST_LOG shows the processes' logs (stdout) at that level, to investigate a test.
        .env(
            "TALLY_LOG",
            std::env::var("TALLY_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(match std::env::var_os("TALLY_TEST_LOG") {
            Some(_) => Stdio::inherit(),
            None => Stdio::null(),
        })
        .stderr(Stdio::inherit())
        .spawn()
        .expect("tally starts");
    let p = Proc {
        child,
        api: format!("http://127.0.0.1:{api_port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
        key: env
            .iter()
            .find(|(k, _)| *k == "TALLY_ADMIN_KEY")
            .map(|(_, v)| v.to_string()),
    };
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = client.get(format!("{}/readyz", p.admin)).send()
            && r.status().is_success()
        {
            return p;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("tally did not become ready");
}

impl Proc {
    /// POSTs a CloudEvents batch to this process's `/v1/events`.
    pub fn post_batch(&self, body: impl Into<String>) -> reqwest::blocking::Response {
        let req = reqwest::blocking::Client::new().post(format!("{}/v1/events", self.api));
        let req = match &self.key {
            Some(k) => req.bearer_auth(k),
            None => req,
        };
        req.header("content-type", "application/cloudevents-batch+json")
            .body(body.into())
            .send()
            .expect("ingest replies")
    }
}

impl Drop for Proc {
    /// A failing test must not leave the server running (it would also hold the test's output
    /// pipe open).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
