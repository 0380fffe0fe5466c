//! Several hosts without a cluster: the coordinator, two workers per top-level branch and
//! an edge agent each run in a network namespace of their own, on their own address, joined
//! by veth pairs to a bridge in a "switch" namespace (every namespace made and removed by
//! this test). Proves that routing works across hosts, that cutout leaves the workers of
//! irrelevant branches idle (their frame counts, read from the coordinator, do not move),
//! and that a task change made from another host applies.
//!
//! Needs root (or CAP_NET_ADMIN) for `ip netns`; where namespaces are not permitted the test
//! says so and passes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::zombie_processes)]

mod support;

use std::collections::HashMap;
use std::process::{Command, Output, Stdio};

use support::{BIN, Proc, repo, start_in};

const IMAGES: &str = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
const LABELS: &str = "/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz";
const SUBNET: &str = "10.213.0";

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).output().expect("running ip")
}

fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one test run; removed (with their interfaces) when dropped.
struct Hosts {
    switch: String,
    /// Host name → (namespace, address).
    hosts: HashMap<String, (String, String)>,
}

impl Hosts {
    /// Makes the switch, or `None` (after saying why) where namespaces are not permitted.
    fn new(tag: &str) -> Option<Hosts> {
        let switch = format!("{tag}-switch");
        let out = ip(&["netns", "add", &switch]);
        if !out.status.success() {
            eprintln!(
                "SKIPPED: network namespaces are not permitted here (ip netns add: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let hosts = Hosts {
            switch,
            hosts: HashMap::new(),
        };
        ip_ok(&["-n", &hosts.switch, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &hosts.switch, "link", "set", "br0", "up"]);
        Some(hosts)
    }

    /// Adds a host `name` at `SUBNET.<n>`, cabled to the switch.
    fn add(&mut self, name: &str, n: u8) -> String {
        let ns = format!("{}-{name}", self.switch.trim_end_matches("-switch"));
        ip_ok(&["netns", "add", &ns]);
        let port = format!("p{n}");
        ip_ok(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip_ok(&["-n", &self.switch, "link", "set", &port, "master", "br0"]);
        ip_ok(&["-n", &self.switch, "link", "set", &port, "up"]);
        let addr = format!("{SUBNET}.{n}");
        ip_ok(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ]);
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
        self.hosts.insert(name.into(), (ns, addr.clone()));
        addr
    }

    fn ns(&self, name: &str) -> &str {
        &self.hosts[name].0
    }

    /// Runs `program args` on host `name`.
    fn exec(&self, name: &str, program: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", self.ns(name), program])
            .args(args)
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for (ns, _) in self.hosts.values() {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["netns", "del", &self.switch]);
    }
}

/// Frames routed to each worker, by worker id, as the coordinator counts them
/// (`GET /v1/workers`, fetched from `from`'s namespace).
fn routed(hosts: &Hosts, from: &str, http: &str) -> HashMap<String, (u64, String)> {
    let out = hosts.exec(from, "curl", &["-sf", &format!("http://{http}/v1/workers")]);
    assert!(
        out.status.success(),
        "curl /v1/workers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker_id"].as_str().unwrap().to_string(),
                (
                    w["frames_routed"].as_u64().unwrap(),
                    w["endpoint"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

/// Streams `frames` test images from the edge host; returns its summary lines.
fn stream(hosts: &Hosts, coordinator: &str, frames: usize, label: &str) -> Vec<String> {
    let out = hosts.exec(
        "edge",
        BIN,
        &[
            "--insecure",
            "edge",
            "--coordinator",
            coordinator,
            "--idx-images",
            IMAGES,
            "--idx-labels",
            LABELS,
            "--limit",
            &frames.to_string(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "edge ({label}) failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("frames ") || l.starts_with("task v"))
        .map(String::from)
        .collect();
    eprintln!("{label}:\n  {}", summary.join("\n  "));
    assert!(
        summary.first().is_some_and(
            |l| l.starts_with(&format!("frames {frames}  predictions {frames}  errors 0 "))
        ),
        "every frame predicted across hosts: {stdout}"
    );
    summary
}

#[test]
fn roles_on_separate_hosts_route_cut_out_and_change_task() {
    let tag = format!("sl{}", std::process::id() % 100_000);
    let Some(mut hosts) = Hosts::new(&tag) else {
        return;
    };
    let coord = hosts.add("coord", 1);
    let edge_addr = hosts.add("edge", 2);
    let branches = ["tops", "footwear", "other"];
    let mut worker_hosts = Vec::new();
    for (b, branch) in branches.iter().enumerate() {
        for r in 0..2 {
            let name = format!("{branch}-{r}");
            let n = 10 + (b * 2 + r) as u8;
            let addr = hosts.add(&name, n);
            worker_hosts.push((name, branch.to_string(), addr));
        }
    }
    let grpc = format!("{coord}:7000");
    let http = format!("{coord}:7080");
    let (_coordinator, _) = start_in(
        Some(hosts.ns("coord")),
        &[
            "coordinator",
            "--grpc-listen",
            &grpc,
            "--http-listen",
            &http,
        ],
        &[],
        "coordinator serving",
    );
    let coordinator_url = format!("http://{grpc}");
    let mut workers: Vec<Proc> = Vec::new();
    for (name, branch, addr) in &worker_hosts {
        let listen = format!("{addr}:7001");
        let http_listen = format!("{addr}:7081");
        let (p, _) = start_in(
            Some(hosts.ns(name)),
            &[
                "worker",
                "--coordinator",
                &coordinator_url,
                "--listen",
                &listen,
                "--http-listen",
                &http_listen,
                "--advertise",
                &format!("http://{listen}"),
                "--id",
                name,
                "--branches",
                branch,
            ],
            &[],
            "registered with coordinator",
        );
        workers.push(p);
    }

    // Every worker registered from its own host, and the coordinator dials it there.
    let before = routed(&hosts, "edge", &http);
    assert_eq!(before.len(), 6, "{before:?}");
    for (name, _, addr) in &worker_hosts {
        assert_eq!(before[name].1, format!("http://{addr}:7001"));
    }
    eprintln!(
        "coordinator {coord}, edge {edge_addr}, workers {:?}",
        worker_hosts
            .iter()
            .map(|(n, _, a)| format!("{n}@{a}"))
            .collect::<Vec<_>>()
    );

    // All categories: every branch's workers take frames.
    stream(&hosts, &coordinator_url, 600, "all categories");
    let all = routed(&hosts, "edge", &http);
    for branch in branches {
        let sum: u64 = (0..2).map(|r| all[&format!("{branch}-{r}")].0).sum();
        assert!(
            sum > 0,
            "{branch} workers idle under the all-category task: {all:?}"
        );
    }

    // The operator, on the edge's host, narrows the task to footwear.
    let out = hosts.exec(
        "edge",
        BIN,
        &[
            "--insecure",
            "task",
            "set",
            "--coordinator",
            &coordinator_url,
            "--categories",
            "Sandal,Sneaker,Ankle boot",
        ],
    );
    assert!(
        out.status.success(),
        "task set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = stream(&hosts, &coordinator_url, 600, "footwear only");
    assert!(
        summary
            .iter()
            .any(|l| l.contains("cloud MACs/frame") && !l.contains("(100.00%)")),
        "the footwear task runs fewer MACs than all branches: {summary:?}"
    );
    let after = routed(&hosts, "edge", &http);
    let delta = |name: &str| after[name].0 - all[name].0;
    let footwear: u64 = (0..2).map(|r| delta(&format!("footwear-{r}"))).sum();
    assert!(footwear >= 600, "footwear workers took {footwear} frames");
    for branch in ["tops", "other"] {
        for r in 0..2 {
            let name = format!("{branch}-{r}");
            assert_eq!(
                delta(&name),
                0,
                "{name} is irrelevant to the footwear task and must stay idle"
            );
        }
    }
    eprintln!(
        "footwear task: frames per worker {:?}",
        worker_hosts
            .iter()
            .map(|(n, _, _)| (n.clone(), delta(n)))
            .collect::<Vec<_>>()
    );
    drop(workers);
}
