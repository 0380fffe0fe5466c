//! Coordinator replicas sharing task and workers through a real etcd on loopback: every
//! replica sees a task change made on another within 100 ms, workers registered through
//! one replica are routed to by all and keep their leases through the others when it dies,
//! and an edge streaming through the replicas loses no frame when the one it uses is
//! SIGKILLed mid-stream.
//!
//! Needs Debian's `etcd-server` (`.ci/run` installs it); without `etcd` on the PATH the test
//! says so and passes, unless `CI` is set, where a missing etcd fails it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{BIN, Coordinator, Proc, coordinator, http_get, http_put, repo, start};

const IMAGES: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
const LABELS: &str = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A single-member etcd on loopback, in a temporary directory; killed when dropped.
struct Etcd {
    _proc: Proc,
    url: String,
    _dir: tempfile::TempDir,
}

/// Starts etcd, or returns `None` (after saying why) where it is not installed.
fn etcd() -> Option<Etcd> {
    if Command::new("etcd").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "etcd is not installed (apt-get install etcd-server; .ci/run does)"
        );
        eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "spotlight-test"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("spotlight-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let proc = Proc {
        child,
        lines: Default::default(),
    };
    // Ready once its client port answers a health check.
    let addr: SocketAddr = format!("127.0.0.1:{client}").parse().unwrap();
    let started = Instant::now();
    loop {
        if let Ok(mut s) = TcpStream::connect(addr) {
            let _ = write!(
                s,
                "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            );
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            if text.contains("\"health\":\"true\"") {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "etcd did not become healthy within 20 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "etcd ready at {url} in {} ms",
        started.elapsed().as_millis()
    );
    Some(Etcd {
        _proc: proc,
        url,
        _dir: dir,
    })
}

fn task_version(c: &Coordinator) -> u64 {
    let (status, body) = http_get(c.http, "/v1/task");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["version"].as_u64().unwrap()
}

#[test]
fn replicas_share_task_and_workers_and_lose_no_frame_when_one_is_killed() {
    let Some(etcd) = etcd() else { return };
    let env = [
        ("SPOTLIGHT_CLUSTER__ETCD", etcd.url.as_str()),
        ("SPOTLIGHT_COORDINATOR__LEASE_TTL_MS", "3000"),
    ];
    let mut replicas: Vec<Coordinator> = (0..3).map(|_| coordinator(&env)).collect();
    let grpc: Vec<String> = replicas.iter().map(|c| c.grpc.clone()).collect();

    // One worker per top-level branch, each registered through a different replica; every
    // worker knows every replica.
    let mut workers = Vec::new();
    for (i, branch) in ["tops", "footwear", "other"].iter().enumerate() {
        let mut list = grpc.clone();
        list.rotate_left(i);
        let id = format!("w-{branch}");
        let (proc, _) = start(
            &[
                "worker",
                "--coordinator",
                &list.join(","),
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--id",
                &id,
                "--branches",
                branch,
            ],
            &[("SPOTLIGHT_WORKER__HEARTBEAT_MS", "500")],
            "registered with coordinator",
        );
        workers.push(proc);
    }
    for c in &replicas {
        let took = c.wait_workers(Duration::from_secs(5), "all three workers", |w| {
            w.len() == 3
        });
        eprintln!("replica {} sees 3 workers after {took:?}", c.grpc);
    }

    // A task change on one replica is in force on every replica within 100 ms.
    let before = task_version(&replicas[0]);
    let (status, body) = http_put(
        replicas[1].http,
        "/v1/task",
        r#"{"categories": ["Sandal", "Sneaker", "Ankle boot", "T-shirt/top"]}"#,
    );
    let changed = Instant::now();
    assert_eq!(status, 200, "{body}");
    let version = serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"]
        .as_u64()
        .unwrap();
    assert!(version > before, "version {version} after {before}");
    for c in [&replicas[0], &replicas[2]] {
        while task_version(c) < version {
            assert!(
                changed.elapsed() < Duration::from_millis(100),
                "replica {} still below version {version} after 100 ms",
                c.grpc
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let seen = changed.elapsed();
    eprintln!("task v{version} set on one replica, in force on all three after {seen:?}");
    // Back to every category, so that every frame below is labelled and relevant.
    let (status, body) = http_put(replicas[2].http, "/v1/task", r#"{"categories": []}"#);
    assert_eq!(status, 200, "{body}");

    // An edge streams through the replicas; the one it uses is killed mid-stream.
    let frames = 6000;
    let mut edge = Command::new(BIN)
        .args(["--insecure", "edge", "--coordinator", &grpc.join(",")])
        .args(["--idx-images", IMAGES, "--idx-labels", LABELS])
        .args(["--limit", &frames.to_string()])
        .current_dir(repo())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut victim = replicas.remove(0);
    // The edge logs on stderr; kill the first replica (the one it uses) once its stream has
    // been up for a moment, with frames surely in flight.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = edge.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("stream ready") {
                let _ = tx.send(line.clone());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the edge's stream never became ready");
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        edge.try_wait().unwrap().is_none(),
        "the edge finished before the replica could be killed"
    );
    victim.proc.child.kill().unwrap();
    victim.proc.child.wait().unwrap();
    let killed = Instant::now();
    eprintln!("killed replica {} mid-stream", victim.grpc);

    let mut out = String::new();
    edge.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let err = reader.join().unwrap();
    let status = edge.wait().unwrap();
    eprintln!(
        "edge done {:?} after the kill:\n{}",
        killed.elapsed(),
        out.lines()
            .filter(|l| l.starts_with("frames") || l.starts_with("task"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(status.success(), "edge failed: {err}");
    assert!(
        err.contains("moving to another coordinator replica"),
        "the edge never moved to another replica: {err}"
    );
    let summary = out
        .lines()
        .find(|l| l.starts_with("frames "))
        .unwrap_or_else(|| panic!("no summary in {out}"));
    assert!(
        summary.starts_with(&format!("frames {frames}  predictions {frames}  errors 0 ")),
        "every frame predicted after a replica was killed: {summary}"
    );

    // The workers' leases outlive the replica they registered through: after more than
    // a lease time, both survivors still route to all three.
    std::thread::sleep(Duration::from_millis(3500));
    for c in &replicas {
        let w = c.workers();
        assert_eq!(w.len(), 3, "replica {} after the kill: {w:?}", c.grpc);
    }
    drop(workers);
}
