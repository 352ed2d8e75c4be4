//! A private ClickHouse server for tests: its own data directory, free ports, listening on
//! loopback only, stopped when dropped. Uses Debian's `clickhouse-server` (tests/run.sh installs
//! it).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ClickHouse {
    child: Child,
    pub http: String,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn server_binary() -> PathBuf {
    for p in [
        "/usr/bin/clickhouse-server",
        "/usr/sbin/clickhouse-server",
        "/usr/bin/clickhouse",
    ] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("clickhouse-server is not installed: tests/run.sh installs Debian's package");
}

impl ClickHouse {
    pub fn start() -> ClickHouse {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let root = root.as_path();
        let (http, tcp, inter) = (free_port(), free_port(), free_port());
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{r}/server.log</log><errorlog>{r}/error.log</errorlog><console>0</console></logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{inter}</interserver_http_port>
    <path>{r}/data/</path>
    <tmp_path>{r}/tmp/</tmp_path>
    <user_files_path>{r}/user_files/</user_files_path>
    <format_schema_path>{r}/format_schemas/</format_schema_path>
    <users_config>{r}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mark_cache_size>268435456</mark_cache_size>
</yandex>
"#,
            r = root.display()
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
    <profiles><default></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
"#;
        std::fs::write(root.join("config.xml"), config).unwrap();
        std::fs::write(root.join("users.xml"), users).unwrap();
        let child = Command::new(server_binary())
            .arg(format!(
                "--config-file={}",
                root.join("config.xml").display()
            ))
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("clickhouse-server starts");
        let ch = ClickHouse {
            child,
            http: format!("http://127.0.0.1:{http}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while ch
            .query("SELECT 1")
            .map(|r| r.trim() != "1")
            .unwrap_or(true)
        {
            assert!(
                Instant::now() < deadline,
                "clickhouse did not start: {}",
                std::fs::read_to_string(root.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ch
    }

    /// Runs one statement over the HTTP interface; the server's error text on failure.
    pub fn query(&self, sql: &str) -> Result<String, String> {
        let r = reqwest::blocking::Client::new()
            .post(&self.http)
            .body(sql.to_owned())
            .send()
            .map_err(|e| e.to_string())?;
        let ok = r.status().is_success();
        let text = r.text().map_err(|e| e.to_string())?;
        if ok { Ok(text) } else { Err(text) }
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
