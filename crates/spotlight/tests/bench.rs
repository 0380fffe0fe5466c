//! `spotlight bench --quick` runs every section end to end (tiny frame counts, debug build)
//! and writes a report whose figures are real numbers.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn bench_quick_runs_every_section_and_writes_the_report() {
    let out = std::env::temp_dir().join(format!("spotlight-bench-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_spotlight"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args([
            "bench",
            "--quick",
            "--frames",
            "256",
            "--latency-frames",
            "64",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "spotlight bench failed: {status}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let rows = json["results"]["rows"].as_array().unwrap();
    for section in ["peer", "cloud", "router", "split", "processes", "rounds"] {
        let of: Vec<_> = rows.iter().filter(|r| r["section"] == section).collect();
        assert!(!of.is_empty(), "no {section} rows");
        for r in of {
            let m = &r["measured"];
            assert!(m["frames"].as_u64().unwrap() > 0, "{r}");
            assert!(m["frames_per_s"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(m["errors"].as_object().unwrap().len(), 0, "{r}");
            // CPU is read from /proc for every process measured.
            for (name, cpu) in m["cpu"].as_array().unwrap().iter().map(|c| (&c[0], &c[1])) {
                assert!(cpu.as_f64().is_some_and(|c| c >= 0.0), "{name}: {cpu}");
            }
        }
    }
    let cloud = rows.iter().find(|r| r["name"] == "cloud task 0").unwrap();
    let procs: Vec<&str> = cloud["measured"]["cpu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[0].as_str().unwrap())
        .collect();
    assert!(procs.contains(&"coordinator"), "{procs:?}");
    assert_eq!(
        procs.iter().filter(|p| p.starts_with("worker")).count(),
        3,
        "{procs:?}"
    );
    let targets = json["targets"].as_array().unwrap();
    for id in ["P1", "P2", "P3", "P5"] {
        assert!(targets.iter().any(|t| t["id"] == id), "target {id} missing");
    }
    // The compute floor of every P3 task: its branch graphs cost a positive share of the
    // whole model, below the whole model, and more for more branches.
    let floor = json["results"]["stages"]["floor"].as_array().unwrap();
    let share = |task: &str| -> (f64, f64) {
        let row = floor
            .iter()
            .find(|f| f[0] == task)
            .unwrap_or_else(|| panic!("no floor for {task}: {floor:?}"));
        (row[1].as_f64().unwrap(), row[2].as_f64().unwrap())
    };
    let (all, all_macs) = share("all");
    let (one, one_macs) = share("one group (footwear)");
    assert!(one > 0.0 && one < all && all < 1.0, "floor {floor:?}");
    assert!(one_macs < all_macs && all_macs < 1.0, "floor {floor:?}");
    // The window-1 overhead is split: the stub path (transport, routing, merge) is measured,
    // and it is faster than the path through real workers.
    let stages = &json["results"]["stages"];
    let stub = stages["stub_e2e_p50_us"].as_f64().unwrap();
    let real = stages["cloud_e2e_p50_us"].as_f64().unwrap();
    assert!(
        stub > 0.0 && stub < real,
        "stub {stub} µs, real workers {real} µs"
    );
    let merge = stages["merge_us"].as_f64().unwrap();
    assert!(merge > 0.0 && merge < stub, "merge {merge} µs");
    let md = std::fs::read_to_string(out.join("benchmarks.md")).unwrap();
    assert!(md.contains("## Targets") && md.contains("cpu_per_frame.svg"));
    assert!(
        md.contains("| of which the worker side"),
        "no split of the overhead"
    );
    assert!(md.contains("### The compute floor of P3"));
    assert!(
        std::fs::read_to_string(out.join("cpu_per_frame.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// The overload soak, short: 64 streams × 32 frames in flight for 12 s against the cloud
/// processes. Every frame sent is answered exactly once (the load client waits for each),
/// nothing is answered twice, and no process's memory keeps growing. `scripts/soak.sh`
/// runs the 5-minute version.
#[test]
fn soak_answers_every_frame_once_and_memory_stays_flat() {
    let out = std::env::temp_dir().join(format!("spotlight-soak-test-{}", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_spotlight"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .args([
            "bench",
            "--soak",
            "12",
            "--streams",
            "64",
            "--window",
            "32",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "spotlight bench --soak failed: {status}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("soak.json")).unwrap()).unwrap();
    assert!(r["frames"].as_u64().unwrap() > 1000, "{r}");
    let errors = r["errors"].as_object().unwrap();
    assert!(
        !errors.contains_key("DUPLICATE"),
        "a frame answered twice: {errors:?}"
    );
    // Overload may be refused explicitly, never lost: the only acceptable error code is
    // RESOURCE_EXHAUSTED.
    for code in errors.keys() {
        assert_eq!(code, "ResourceExhausted", "{errors:?}");
    }
    let memory = r["memory"].as_array().unwrap();
    assert_eq!(
        memory.len(),
        5,
        "coordinator, 3 workers, load client: {memory:?}"
    );
    for m in memory {
        let (middle, last) = (
            m["middle_peak_mib"].as_f64().unwrap(),
            m["last_peak_mib"].as_f64().unwrap(),
        );
        assert!(middle > 0.0, "{m}");
        // Bounded queues: the last third may not grow past the middle third by more than a
        // quarter (allocator noise), whatever the load.
        assert!(
            last <= middle * 1.25 + 8.0,
            "{} grows: {middle} → {last} MiB",
            m["process"]
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
