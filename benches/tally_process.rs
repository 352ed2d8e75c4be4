//! What the process benchmarks share (`benches/pipeline.rs`, `benches/dimensions_pipeline.rs`):
//! a `tally` process started from `TALLY_BIN` on free loopback ports, its metrics and CPU time,
//! and HTTP batch posting from several clients.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `tally` process, in a data directory of its own.
pub struct Tally {
    pub child: Child,
    pub api: String,
    pub admin: String,
    _dir: tempfile::TempDir,
}

impl Tally {
    /// Starts `tally <command>` with `env` and waits until it is ready.
    pub fn start(command: &str, env: &[(&str, String)]) -> Tally {
        let bin = std::env::var("TALLY_BIN").expect("TALLY_BIN: the release tally binary");
        let dir = tempfile::tempdir().unwrap();
        let (api, admin) = (free_port(), free_port());
        let child = Command::new(bin)
            .arg(command)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("TALLY_DATA_DIR", dir.path())
            .env("TALLY_LISTEN", format!("127.0.0.1:{api}"))
            .env("TALLY_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("TALLY_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t = Tally {
            child,
            api: format!("http://127.0.0.1:{api}"),
            admin: format!("http://127.0.0.1:{admin}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::blocking::get(format!("http://127.0.0.1:{admin}/readyz"))
            .map(|r| !r.status().is_success())
            .unwrap_or(true)
        {
            assert!(Instant::now() < deadline, "tally {command} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        t
    }

    /// The value of an unlabelled metric (0 when absent).
    pub fn metric(&self, name: &str) -> f64 {
        let text = reqwest::blocking::get(format!("{}/metrics", self.admin))
            .and_then(|r| r.text())
            .unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// CPU seconds (user + system) used so far.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.child.id())
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// Posts every body (of `per_body` events each) with `clients` concurrent clients, each
/// answered 202; events/s.
pub fn post_all(api: &str, bodies: Vec<String>, per_body: usize, clients: usize) -> f64 {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let bodies = Arc::new(bodies);
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (next, bodies, api) = (next.clone(), bodies.clone(), api.to_owned());
            std::thread::spawn(move || {
                let client = reqwest::blocking::Client::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(body) = bodies.get(i) else { break };
                    let r = client
                        .post(format!("{api}/v1/events"))
                        .header("content-type", "application/cloudevents-batch+json")
                        .body(body.clone())
                        .send()
                        .unwrap();
                    assert_eq!(r.status().as_u16(), 202, "{}", r.text().unwrap_or_default());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (bodies.len() * per_body) as f64 / started.elapsed().as_secs_f64()
}
