//! Real servers for the integration tests: a Kafka-compatible broker (tansu) and ClickHouse.
//!
//! [`Kafka::shared`] and [`ClickHouse::shared`] return the servers that `tests/run.sh` started
//! for the whole suite (addresses in `TALLY_TEST_KAFKA_BROKERS` and `TALLY_TEST_CLICKHOUSE_URL`)
//! or, when a test runs on its own, start private ones. Tests isolate themselves with a fresh
//! topic and database each ([`unique_name`]). Fault tests use [`Kafka::private`] and
//! [`ClickHouse::private`], which they may stop and restart. Servers are started by
//! `tests/servers.sh` and stopped when dropped.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Whether a test that needs a Kafka broker and ClickHouse must be skipped on this machine:
/// neither the suite's servers (`tests/run.sh` starts them) nor, when `private` or those are
/// not configured, tansu and clickhouse-server to start the test's own. A skipped test says so
/// on stderr (past the test harness's capture) and passes; with `TALLY_TEST_REQUIRE_SERVERS`
/// set (`tests/run.sh` sets it) it fails instead, so the full suite never skips silently.
pub fn skip_without_servers(private: bool) -> bool {
    let set = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty());
    if !private && set("TALLY_TEST_KAFKA_BROKERS") && set("TALLY_TEST_CLICKHOUSE_URL") {
        return false;
    }
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
    };
    let tansu =
        std::env::var_os("TANSU_BIN").is_some_and(|p| Path::new(&p).is_file()) || on_path("tansu");
    let clickhouse = [
        "/usr/bin/clickhouse-server",
        "/usr/sbin/clickhouse-server",
        "/usr/bin/clickhouse",
    ]
    .iter()
    .any(|p| Path::new(p).is_file());
    if tansu && clickhouse {
        return false;
    }
    skip_because(&format!(
        "needs a Kafka broker and ClickHouse (tansu found: {tansu}, clickhouse-server found: \
         {clickhouse}); tests/run.sh installs and starts them"
    ))
}

/// Whether a test that needs `tool` must be skipped: it is not found here. Reported and
/// failed like [`skip_without_servers`].
pub fn skip_without_tool(tool: &str, found: bool) -> bool {
    !found && skip_because(&format!("needs {tool}, which tests/run.sh installs"))
}

/// Skips (returns true, saying why) unless `TALLY_TEST_REQUIRE_SERVERS` is set (tests/run.sh:
/// servers and tools alike): then fails.
fn skip_because(why: &str) -> bool {
    assert!(
        std::env::var_os("TALLY_TEST_REQUIRE_SERVERS").is_none(),
        "{why}"
    );
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    // Written past the harness's capture of print!, so that a plain `cargo test` shows it.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("skipped {test}: {why}\n").as_bytes(),
    );
    true
}

/// Whether `program` is an executable file or found on `PATH`.
pub fn have_program(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// A name no other test of this run uses: `prefix_<pid>_<n>`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// One server process started by `tests/servers.sh`.
struct Server {
    args: Vec<String>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
    dir: PathBuf,
}

impl Server {
    fn start(kind: &str, ports: &[u16]) -> Server {
        let mut dir = tempfile::tempdir().expect("temp dir");
        // TALLY_TEST_KEEP_SERVER_DIRS=1 keeps the server's data and log (for a failing run).
        if std::env::var_os("TALLY_TEST_KEEP_SERVER_DIRS").is_some() {
            dir.disable_cleanup(true);
            eprintln!("{kind} server directory kept: {}", dir.path().display());
        }
        let mut args = vec![kind.to_owned(), dir.path().display().to_string()];
        args.extend(ports.iter().map(|p| p.to_string()));
        let mut s = Server {
            args,
            child: None,
            dir: dir.path().to_owned(),
            _dir: Some(dir),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers.sh");
        let child = Command::new(script)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("tests/servers.sh runs");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for(what: &str, deadline: Duration, mut ready: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !ready() {
        assert!(
            Instant::now() < until,
            "{what} did not start in {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub struct Kafka {
    /// Bootstrap servers.
    pub brokers: String,
    server: Option<Server>,
    port: u16,
}

impl Kafka {
    /// The suite's broker, or a private one when none is configured.
    pub fn shared() -> Kafka {
        match std::env::var("TALLY_TEST_KAFKA_BROKERS") {
            Ok(brokers) if !brokers.is_empty() => Kafka {
                brokers,
                server: None,
                port: 0,
            },
            _ => Kafka::private(),
        }
    }

    /// A broker of this test's own, which it may stop and restart.
    pub fn private() -> Kafka {
        let port = free_port();
        let k = Kafka {
            brokers: format!("127.0.0.1:{port}"),
            server: Some(Server::start("kafka", &[port])),
            port,
        };
        k.wait_ready();
        k
    }

    fn wait_ready(&self) {
        let addr = self.brokers.clone();
        wait_for("the Kafka broker", Duration::from_secs(30), || {
            TcpStream::connect(&addr).is_ok()
        });
    }

    /// Kills the broker (private brokers only); its data stays.
    pub fn stop(&mut self) {
        self.server.as_mut().expect("a private broker").kill();
    }

    /// Starts the broker again on the same port and data.
    pub fn restart(&mut self) {
        self.server.as_mut().expect("a private broker").spawn();
        self.wait_ready();
    }
}

pub struct ClickHouse {
    /// HTTP endpoint.
    pub http: String,
    server: Option<Server>,
}

impl ClickHouse {
    /// The suite's server, or a private one when none is configured.
    pub fn shared() -> ClickHouse {
        match std::env::var("TALLY_TEST_CLICKHOUSE_URL") {
            Ok(http) if !http.is_empty() => ClickHouse { http, server: None },
            _ => ClickHouse::private(),
        }
    }

    /// A server of this test's own, which it may stop and restart.
    pub fn private() -> ClickHouse {
        let (http, tcp, inter) = (free_port(), free_port(), free_port());
        let ch = ClickHouse {
            http: format!("http://127.0.0.1:{http}"),
            server: Some(Server::start("clickhouse", &[http, tcp, inter])),
        };
        ch.wait_ready();
        ch
    }

    /// The same as `start()` in earlier tests: a private server.
    pub fn start() -> ClickHouse {
        ClickHouse::private()
    }

    fn wait_ready(&self) {
        wait_for("ClickHouse", Duration::from_secs(30), || {
            self.query("SELECT 1").is_ok_and(|r| r.trim() == "1")
        });
    }

    pub fn stop(&mut self) {
        self.server.as_mut().expect("a private server").kill();
    }

    pub fn restart(&mut self) {
        self.server.as_mut().expect("a private server").spawn();
        self.wait_ready();
    }

    /// Runs one statement over the HTTP interface; the server's error text on failure.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let r = reqwest::blocking::Client::new()
            .post(&self.http)
            .timeout(Duration::from_secs(30))
            .body(sql.to_owned())
            .send()
            .map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let text = r.text().map_err(|e| e.to_string())?;
        if ok { Ok(text) } else { Err(text) }
    }

    /// Where a private server keeps its files.
    pub fn dir(&self) -> Option<&Path> {
        self.server.as_ref().map(|s| s.dir.as_path())
    }
}

/// A fresh topic, consumer group and database on a broker and a ClickHouse server, with the
/// schema and topics created by `tally migrate` (run twice: the second run must succeed too).
pub struct Backends {
    pub kafka: Kafka,
    pub ch: ClickHouse,
    pub topic: String,
    pub group: String,
    pub db: String,
}

impl Backends {
    pub fn new(kafka: Kafka, ch: ClickHouse) -> Backends {
        let b = Backends {
            kafka,
            ch,
            topic: unique_name("usage"),
            group: unique_name("aggregators"),
            db: unique_name("tally"),
        };
        for _ in 0..2 {
            let out = Command::new(env!("CARGO_BIN_EXE_tally"))
                .arg("migrate")
                .envs(b.env())
                .env("TALLY_LOG", "warn")
                .output()
                .expect("tally migrate runs");
            assert!(
                out.status.success(),
                "tally migrate: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        b
    }

    /// On the suite's servers.
    pub fn shared() -> Backends {
        Backends::new(Kafka::shared(), ClickHouse::shared())
    }

    /// The `TALLY_*` settings that point a process at these backends.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("TALLY_KAFKA_BROKERS", self.kafka.brokers.clone()),
            ("TALLY_KAFKA_TOPIC", self.topic.clone()),
            ("TALLY_KAFKA_CONSUMER_GROUP", self.group.clone()),
            ("TALLY_KAFKA_PARTITIONS", "4".into()),
            ("TALLY_KAFKA_SESSION_TIMEOUT", "6s".into()),
            ("TALLY_AGGREGATOR_STALL_REJOIN", "30s".into()),
            ("TALLY_KAFKA_DELIVERY_TIMEOUT", "3s".into()),
            ("TALLY_CLICKHOUSE_URL", self.ch.http.clone()),
            ("TALLY_CLICKHOUSE_DATABASE", self.db.clone()),
            // Kafka or ClickHouse: the API is never open.
            ("TALLY_ADMIN_KEY", ADMIN_KEY.into()),
        ]
    }
}

/// The bootstrap admin key of the processes started with [`Backends::env`].
pub const ADMIN_KEY: &str = "tally-test-admin-key-0123456789abcdef";

/// A client that sends [`ADMIN_KEY`] with every request.
pub fn client_builder() -> reqwest::blocking::ClientBuilder {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        reqwest::header::HeaderValue::from_str(&format!("Bearer {ADMIN_KEY}")).unwrap(),
    );
    reqwest::blocking::Client::builder().default_headers(headers)
}

pub fn client() -> reqwest::blocking::Client {
    client_builder().build().unwrap()
}

/// `env` as the borrowed pairs `start_with_env` takes.
pub fn pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}
