//! The roles as separate processes, as on separate hosts: coordinator, two workers, an edge,
//! and the task CLI, all on loopback with ports chosen by the OS.

// Test helpers may panic; `Proc` waits for its child on drop.
#![allow(clippy::unwrap_used, clippy::zombie_processes)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_spotlight");

/// Kills the process when dropped, so a failing test leaves nothing behind.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spotlight(args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .env("RUST_LOG", "info");
    c
}

/// Starts a role with JSON logs and returns it with the first log line containing `marker`.
fn start(args: &[&str], marker: &str) -> (Proc, String) {
    let mut child = spotlight(args)
        .arg("--log-format")
        .arg("json")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no \"{marker}\" from {args:?}"));
        if line.contains(marker) {
            // Keep draining so the child never blocks on a full pipe.
            std::thread::spawn(move || while rx.recv().is_ok() {});
            return (Proc(child), line);
        }
    }
}

/// Extracts `127.0.0.1:PORT` following `key` in a log line.
fn addr_after(line: &str, key: &str) -> String {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("{key} in {line}")) + key.len()..];
    let start = rest.find("127.0.0.1:").unwrap();
    rest[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect()
}

#[test]
fn roles_run_as_separate_processes() {
    let (_coordinator, line) = start(
        &[
            "coordinator",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
        "coordinator serving",
    );
    let grpc = format!("http://{}", addr_after(&line, "\"grpc\""));
    let (_w1, _) = start(
        &[
            "worker",
            "--coordinator",
            &grpc,
            "--listen",
            "127.0.0.1:0",
            "--branches",
            "tops,other",
            "--id",
            "w1",
        ],
        "registered with coordinator",
    );
    let (_w2, _) = start(
        &[
            "worker",
            "--coordinator",
            &grpc,
            "--listen",
            "127.0.0.1:0",
            "--branches",
            "footwear",
            "--id",
            "w2",
        ],
        "registered with coordinator",
    );

    let out = spotlight(&[
        "task",
        "set",
        "--coordinator",
        &grpc,
        "--categories",
        "Bag,Sneaker,Coat",
        "--gain",
        "tops=1.5",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let task: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(task["version"], 2);

    let out = spotlight(&[
        "task",
        "set",
        "--coordinator",
        &grpc,
        "--categories",
        "Sneakers",
    ])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown category \"Sneakers\"; known: T-shirt/top")
            && err.contains("InvalidArgument"),
        "{err}"
    );

    let out = spotlight(&[
        "edge",
        "--coordinator",
        &grpc,
        "--idx-images",
        "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
        "--idx-labels",
        "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz",
        "--limit",
        "200",
        "--output",
        "-",
    ])
    .output()
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let records: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(records.len(), 200, "one JSON line per frame:\n{stdout}");
    for r in &records {
        assert_eq!(r["task_version"], 2, "{r}");
        let predicted = r["predicted"].as_str().unwrap();
        assert!(["Bag", "Sneaker", "Coat"].contains(&predicted), "{r}");
    }
    assert!(
        stdout.contains("frames 200  predictions 200  errors 0"),
        "summary missing:\n{stdout}"
    );
}
