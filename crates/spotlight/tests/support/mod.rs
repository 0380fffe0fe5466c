//! Helpers shared by the tests that run real `spotlight` processes on loopback.

// Test helpers may panic; `Proc` waits for its child on drop.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::zombie_processes,
    dead_code
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_spotlight");

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A role process, killed when dropped; its log lines are kept.
pub struct Proc {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (STOP, CONT, TERM) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} {}", self.pid());
    }

    pub fn logged(&self, text: &str) -> bool {
        self.lines.lock().unwrap().iter().any(|l| l.contains(text))
    }
}

/// Starts a role with JSON logs and `env`; returns it with its first log line containing
/// `marker` (30 s at most).
pub fn start(args: &[&str], env: &[(&str, &str)], marker: &str) -> (Proc, String) {
    start_in(None, args, env, marker)
}

/// Like [`start`], inside the network namespace `netns` (`ip netns exec`) when given.
pub fn start_in(
    netns: Option<&str>,
    args: &[&str],
    env: &[(&str, &str)],
    marker: &str,
) -> (Proc, String) {
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    let mut child = command
        .arg("--insecure")
        .args(args)
        .args(["--log-format", "json"])
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let lines = lines.clone();
        let marker = marker.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(&marker) {
                    let _ = tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
    }
    let proc = Proc { child, lines };
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("no \"{marker}\" from {args:?}"));
    (proc, line)
}

/// Extracts `127.0.0.1:PORT` following `key` in a log line.
pub fn addr_after(line: &str, key: &str) -> SocketAddr {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
    let start = rest.find("127.0.0.1:").unwrap();
    rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect::<String>()
        .parse()
        .unwrap()
}

/// A coordinator process and its addresses.
pub struct Coordinator {
    pub proc: Proc,
    pub grpc: String,
    pub http: SocketAddr,
}

pub fn coordinator(env: &[(&str, &str)]) -> Coordinator {
    let (proc, line) = start(
        &[
            "coordinator",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        env,
        "coordinator serving",
    );
    Coordinator {
        grpc: format!("http://{}", addr_after(&line, "\"grpc\"")),
        http: addr_after(&line, "\"http\""),
        proc,
    }
}

impl Coordinator {
    /// A worker hosting every branch, registered.
    pub fn worker(&self, id: &str, env: &[(&str, &str)]) -> Proc {
        start(
            &[
                "worker",
                "--coordinator",
                &self.grpc,
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--id",
                id,
            ],
            env,
            "registered with coordinator",
        )
        .0
    }

    /// `GET /v1/workers`, by worker id.
    pub fn workers(&self) -> HashMap<String, serde_json::Value> {
        let (status, body) = http_get(self.http, "/v1/workers");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| (w["worker_id"].as_str().unwrap().to_string(), w.clone()))
            .collect()
    }

    /// Polls `GET /v1/workers` until `done` holds (every 20 ms, `limit` at most); returns
    /// how long it took.
    pub fn wait_workers(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&HashMap<String, serde_json::Value>) -> bool,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let w = self.workers();
            if done(&w) {
                return started.elapsed();
            }
            assert!(started.elapsed() < limit, "{what} within {limit:?}: {w:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A plain HTTP/1.1 GET; returns the status and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, None)
}

/// A plain HTTP/1.1 PUT of a JSON body; returns the status and the body.
pub fn http_put(addr: SocketAddr, path: &str, json: &str) -> (u16, String) {
    http_request(addr, "PUT", path, Some(json))
}

fn http_request(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = json.unwrap_or("");
    let content = match json {
        Some(b) => format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ),
        None => String::new(),
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{content}Connection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_string())
}

// Probes, metrics and exits.

impl Proc {
    /// The first log line containing `text`.
    pub fn line(&self, text: &str) -> Option<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains(text))
            .cloned()
    }

    /// Waits (bounded by `limit`) for the process to exit; its status and how long it took.
    pub fn wait_exit(
        &mut self,
        since: Instant,
        limit: Duration,
    ) -> (std::process::ExitStatus, Duration) {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, since.elapsed());
            }
            assert!(
                since.elapsed() < limit,
                "still running {limit:?} after the signal"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The status of a `GET`, or `None` when nothing answers.
pub fn try_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split(' ').nth(1)?.parse().ok()
}

/// `GET /metrics` at `addr`, as sample values by name with labels.
pub fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    spotlight_service::metrics::parse_text(&body)
}

/// A sample's value, 0 when absent.
pub fn value(m: &HashMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

/// The sum of every sample whose name (with labels) starts with `prefix`.
pub fn sum(m: &HashMap<String, f64>, prefix: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0
}

impl Coordinator {
    /// A worker hosting every branch, with its HTTP (probes, metrics) address.
    pub fn worker_with_http(&self, id: &str, env: &[(&str, &str)]) -> (Proc, SocketAddr) {
        let w = self.worker(id, env);
        let line = w
            .line("worker probes and metrics listening")
            .expect("the worker logs its HTTP address");
        let http = addr_after(&line, "\"http\"");
        (w, http)
    }
}
