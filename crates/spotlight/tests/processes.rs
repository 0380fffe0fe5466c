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
            "--insecure",
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
            "--insecure",
            "worker",
            "--coordinator",
            &grpc,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
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
            "--insecure",
            "worker",
            "--coordinator",
            &grpc,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--branches",
            "footwear",
            "--id",
            "w2",
        ],
        "registered with coordinator",
    );

    let out = spotlight(&[
        "--insecure",
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
        "--insecure",
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
        "--insecure",
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

#[test]
fn roles_refuse_to_start_without_credentials_unless_insecure() {
    for args in [
        &[
            "coordinator",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ][..],
        &["worker", "--listen", "127.0.0.1:0"],
        &["edge", "--limit", "1"],
        &["task", "get"],
    ] {
        let out = spotlight(args).output().unwrap();
        assert!(
            !out.status.success(),
            "{args:?} started without credentials"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("spotlight certs") && err.contains("--insecure"),
            "{args:?}: the refusal must say how to set up credentials: {err}"
        );
    }
}

/// `spotlight certs`, then every role with its own certificate and token over TLS: the
/// operator changes the task, a reader may not, nobody without a token may, and an edge
/// streams predictions.
#[test]
fn roles_run_over_tls_with_tokens_from_spotlight_certs() {
    let dir = std::env::temp_dir().join(format!("spotlight-certs-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.display().to_string();
    let out = spotlight(&["certs", "--out", &d]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = |name: &str| format!("{d}/{name}");
    let (_coordinator, line) = start(
        &[
            "coordinator",
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--ca",
            &f("ca.pem"),
            "--cert",
            &f("coordinator.pem"),
            "--key",
            &f("coordinator.key"),
            "--tokens",
            &f("tokens.toml"),
            "--token-file",
            &f("coordinator.token"),
        ],
        "coordinator serving",
    );
    let grpc = format!("https://{}", addr_after(&line, "\"grpc\""));
    let (_worker, _) = start(
        &[
            "worker",
            "--coordinator",
            &grpc,
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--id",
            "w-tls",
            "--ca",
            &f("ca.pem"),
            "--cert",
            &f("worker.pem"),
            "--key",
            &f("worker.key"),
            "--tokens",
            &f("tokens.toml"),
            "--token-file",
            &f("worker.token"),
        ],
        "registered with coordinator",
    );
    let task = |token: Option<&str>, set: bool| {
        let mut args = vec!["task".to_string()];
        args.push(if set { "set".into() } else { "get".into() });
        args.extend([
            "--coordinator".into(),
            grpc.clone(),
            "--ca".into(),
            f("ca.pem"),
        ]);
        if let Some(t) = token {
            args.extend(["--token-file".into(), f(t)]);
        }
        if set {
            args.extend(["--categories".into(), "Sneaker,Bag".into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        spotlight(&args).output().unwrap()
    };
    let set = task(Some("operator.token"), true);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(v["version"], 2);
    let denied = task(Some("reader.token"), true);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success() && err.contains("PermissionDenied"),
        "{err}"
    );
    let read = task(Some("reader.token"), false);
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(v["version"], 2, "the refused change changed nothing");
    // The edge token streams frames but is no operator.
    let edge_set = task(Some("edge.token"), true);
    assert!(!edge_set.status.success());
    // Plaintext to the TLS port is refused, not downgraded.
    let plain = spotlight(&[
        "task",
        "get",
        "--insecure",
        "--coordinator",
        &grpc.replace("https://", "http://"),
    ])
    .output()
    .unwrap();
    assert!(!plain.status.success());

    // An edge over TLS with `token`, `limit` test images, on `transport`.
    let edge = |transport: &str, token: &str, limit: &str| {
        spotlight(&[
            "edge",
            "--transport",
            transport,
            "--coordinator",
            &grpc,
            "--ca",
            &f("ca.pem"),
            "--token-file",
            &f(token),
            "--idx-images",
            "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
            "--limit",
            limit,
        ])
        .output()
        .unwrap()
    };
    // gRPC, then the same edge over QUIC: one flag, same address (UDP), same CA and token.
    for transport in ["grpc", "quic"] {
        let out = edge(transport, "edge.token", "100");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("frames 100  predictions 100  errors 0"),
            "{transport}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // An edge with a reader token is refused at once, with the reason.
    let out = edge("grpc", "reader.token", "5");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("refused the edge's credentials"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
