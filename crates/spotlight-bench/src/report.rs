//! `results.json`, SVG bar charts and the Markdown report, all from one [`Results`].

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::{BenchOptions, Results, Row};

/// A target, its measured value and whether it was met.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    pub id: String,
    pub what: String,
    pub measured: f64,
    pub limit: f64,
    /// `measured <= limit` (or `>=` where `at_least`).
    pub at_least: bool,
    pub unit: String,
}

impl Target {
    pub fn met(&self) -> bool {
        if self.at_least {
            self.measured >= self.limit
        } else {
            self.measured <= self.limit
        }
    }
}

fn find<'a>(r: &'a Results, name: &str) -> Option<&'a Row> {
    r.rows.iter().find(|x| x.name == name)
}

/// Whole-model MACs per frame (backbone + every segment), from the peer rows.
fn whole_macs(r: &Results) -> f64 {
    r.rows
        .iter()
        .filter(|x| x.name.contains("peer batch"))
        .find_map(|p| p.measured.cloud_macs)
        .unwrap_or(0) as f64
}

/// (task name, cloud MACs per frame) of the tasks measured in the P3 rounds.
fn p3_tasks(r: &Results) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    for row in r.rows.iter().filter(|x| x.section == "rounds") {
        if let (Some(task), Some(macs)) = (row.params.get("task"), row.measured.cloud_macs)
            && !out.iter().any(|(t, _)| t == task)
        {
            out.push((task.clone(), macs as f64));
        }
    }
    out
}

/// Per round: cloud CPU/frame of `task` ÷ peer CPU/frame at `batch`, both of that round.
pub fn p3_ratios(r: &Results, task: &str, batch: &str) -> Vec<f64> {
    let rounds = r.rows.iter().filter(|x| x.section == "rounds");
    let mut ratios = Vec::new();
    for cloud in rounds
        .clone()
        .filter(|x| x.params.get("task").is_some_and(|t| t == task))
    {
        let round = cloud.params.get("round");
        let peer = rounds.clone().find(|x| {
            x.params.get("round") == round && x.params.get("batch").is_some_and(|b| b == batch)
        });
        if let Some(peer) = peer {
            let p = peer.measured.total_cpu_ms_per_frame();
            if p > 0.0 {
                ratios.push(cloud.measured.total_cpu_ms_per_frame() / p);
            }
        }
    }
    ratios
}

/// (min, median, max).
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

/// The issue's targets, computed from the rows.
pub fn targets(r: &Results) -> Vec<Target> {
    let mut t = Vec::new();
    let s = &r.stages;
    if s.cloud_e2e_p50_us > 0.0 {
        t.push(Target {
            id: "P1".into(),
            what:
                "per-frame overhead at window 1, p50 (end-to-end − decode − critical-path compute)"
                    .into(),
            measured: s.overhead_p50_us() / 1e3,
            limit: 0.25,
            at_least: false,
            unit: "ms".into(),
        });
        t.push(Target {
            id: "P1".into(),
            what: "per-frame overhead at window 1, p99 (p99 end-to-end against the median compute)"
                .into(),
            measured: s.overhead_p99_us() / 1e3,
            limit: 1.0,
            at_least: false,
            unit: "ms".into(),
        });
    }
    let peer_best = r
        .rows
        .iter()
        .filter(|x| x.section == "peer")
        .map(|x| x.measured.frames_per_s)
        .fold(0.0, f64::max);
    let best_split = r
        .rows
        .iter()
        .filter(|x| x.section == "split" && x.params.get("task").is_some_and(|t| t == "all"))
        .max_by(|a, b| a.measured.frames_per_s.total_cmp(&b.measured.frames_per_s));
    if let (Some(split), true) = (best_split, peer_best > 0.0) {
        t.push(Target {
            id: "P2".into(),
            what: format!(
                "split path frames/s, all roles in one process, all categories (best: {}), ÷ best peer frames/s",
                split.name
            ),
            measured: split.measured.frames_per_s / peer_best,
            limit: 0.90,
            at_least: true,
            unit: "×".into(),
        });
    }
    let whole = whole_macs(r);
    for (task, macs) in p3_tasks(r) {
        let limit = 1.1 * macs / whole.max(1.0);
        for batch in ["1", "64"] {
            let ratios = p3_ratios(r, &task, batch);
            if ratios.is_empty() {
                continue;
            }
            let (lo, mid, hi) = spread(&ratios);
            // The compute floor is measured at batch 64, so it is shown against that peer.
            let floor = r
                .stages
                .floor
                .iter()
                .find(|(name, ..)| *name == task)
                .filter(|_| batch == "64")
                .map(|(_, f, _)| format!("; compute alone {f:.3}"))
                .unwrap_or_default();
            t.push(Target {
                id: "P3".into(),
                what: format!(
                    "cloud CPU/frame, {task} (cloud MACs {:.3} of the model), ÷ peer batch {batch} CPU/frame; median of {} alternating rounds (range {lo:.3}–{hi:.3}){floor}",
                    macs / whole.max(1.0),
                    ratios.len()
                ),
                measured: mid,
                limit,
                at_least: false,
                unit: "×".into(),
            });
        }
    }
    if let (Some(one), Some(two)) = (find(r, "router all"), find(r, "router 2 replicas")) {
        t.push(Target {
            id: "P6".into(),
            what: "routing throughput of two coordinator replicas sharing etcd ÷ one, stub workers, same load spread over the replicas".into(),
            measured: two.measured.frames_per_s / one.measured.frames_per_s.max(1e-9),
            limit: 1.8,
            at_least: true,
            unit: "×".into(),
        });
    }
    if let Some(router) = find(r, "router all") {
        let coord = router.measured.cpu_ms_per_frame(|n| n == "coordinator");
        t.push(Target {
            id: "P5".into(),
            what: "coordinator routing capacity with stub workers (frames per CPU-second)".into(),
            measured: 1e3 / coord.max(1e-9),
            limit: 20_000.0,
            at_least: true,
            unit: "frames/s/core".into(),
        });
    }
    t
}

/// Writes `results.json`, the plots and the Markdown report.
pub fn write_all(r: &Results, opts: &BenchOptions, command: &str) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let mut written = Vec::new();
    let json = opts.out.join("results.json");
    let value = serde_json::json!({ "results": r, "targets": targets(r) });
    std::fs::write(&json, serde_json::to_string_pretty(&value)?)?;
    written.push(json);
    for (file, svg) in plots(r) {
        let path = opts.out.join(file);
        std::fs::write(&path, svg)?;
        written.push(path);
    }
    if let Some(parent) = opts.markdown.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&opts.markdown, markdown(r, opts, command))?;
    written.push(opts.markdown.clone());
    Ok(written)
}

/// `to` relative to the directory of `from` where `to` lies under it.
fn relative(from: &Path, to: &Path) -> String {
    let base = from.parent().unwrap_or(Path::new(""));
    to.strip_prefix(base).unwrap_or(to).display().to_string()
}

/// A measured end-to-end time, or NaN where the scenario did not run (0).
fn stub_or_nan(us: f64) -> f64 {
    if us > 0.0 { us } else { f64::NAN }
}

fn f(x: f64, digits: usize) -> String {
    if x.is_finite() {
        format!("{x:.digits$}")
    } else {
        "–".into()
    }
}

fn params(row: &Row, keys: &[&str]) -> String {
    keys.iter()
        .filter_map(|k| row.params.get(*k).map(|v| format!("{k} {v}")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The Markdown report.
pub fn markdown(r: &Results, opts: &BenchOptions, command: &str) -> String {
    let mut md = String::new();
    let m = &r.machine;
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Every figure below comes from one run of `{command}` (written by it; do not edit by hand). \
         Machine: {} cores, {}, Linux {}. Model `{}` ({}), {} Fashion-MNIST test images. \
         CPU time is read from the OS per process (its CPU clock, `clock_getcpuclockid`: user + system \
         of every thread, in nanoseconds); the machine may be shared, so compare figures of the same run.\n",
        m.cores, m.cpu_model, m.kernel, r.model, r.model_hash, r.images
    );
    let _ = writeln!(
        md,
        "## Targets\n\n| target | what | measured | limit | met |\n|---|---|---:|---:|---|"
    );
    for t in targets(r) {
        let _ = writeln!(
            md,
            "| {} | {} | {} {} | {} {} {} | {} |",
            t.id,
            t.what,
            f(t.measured, 3),
            t.unit,
            if t.at_least { "≥" } else { "≤" },
            f(t.limit, 3),
            t.unit,
            if t.met() { "yes" } else { "**no**" }
        );
    }

    let _ = writeln!(
        md,
        "\n## Cloud CPU per frame (the saving users come for)\n\n\
         Coordinator and workers as separate processes on loopback; a client sends precomputed \
         int8 backbone features (its own CPU is not counted). The peer runs `full.onnx` (backbone \
         and every branch) from raw image to prediction on every core; its CPU is the whole \
         process's.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | parameters | frames/s | p50 ms | p99 ms | CPU ms/frame | of which coordinator | workers | mean worker batch | MACs/frame (M) | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in r
        .rows
        .iter()
        .filter(|x| x.section == "peer" || x.section == "cloud")
    {
        let mm = &row.measured;
        let coord = mm.cpu_ms_per_frame(|n| n == "coordinator");
        let workers = mm.cpu_ms_per_frame(|n| n.starts_with("worker"));
        let is_peer = row.section == "peer";
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            params(
                row,
                &[
                    "task",
                    "batch",
                    "threads",
                    "streams",
                    "window",
                    "codec",
                    "worker max_batch",
                    "queue delay us",
                    "replicas"
                ]
            ),
            f(mm.frames_per_s, 0),
            f(mm.p50_ms, 2),
            f(mm.p99_ms, 2),
            f(mm.total_cpu_ms_per_frame(), 3),
            if is_peer { "–".into() } else { f(coord, 3) },
            if is_peer { "–".into() } else { f(workers, 3) },
            mm.mean_worker_batch.map_or("–".into(), |b| f(b, 1)),
            f(mm.cloud_macs.unwrap_or(0) as f64 / 1e6, 2),
            mm.error_count()
        );
    }
    let rounds: Vec<&Row> = r.rows.iter().filter(|x| x.section == "rounds").collect();
    if !rounds.is_empty() {
        let _ = writeln!(
            md,
            "\n## P3 rounds: CPU ms per frame, peer and cloud alternated\n\n\
             The machine is shared and its speed drifts by tens of percent within minutes, so the P3 \
             targets compare each cloud slice with the peer slices of the same round (seconds apart) \
             and report the median ratio.\n"
        );
        let names: Vec<String> = rounds
            .iter()
            .filter(|x| x.params.get("round").is_some_and(|r| r == "0"))
            .map(|x| x.name.trim_start_matches("round 0 ").to_string())
            .collect();
        let _ = writeln!(md, "| round | {} |", names.join(" | "));
        let _ = writeln!(md, "|---|{}", "---:|".repeat(names.len()));
        let mut round = 0;
        loop {
            let of: Vec<&&Row> = rounds
                .iter()
                .filter(|x| x.params.get("round") == Some(&round.to_string()))
                .collect();
            if of.is_empty() {
                break;
            }
            let cells: Vec<String> = of
                .iter()
                .map(|x| f(x.measured.total_cpu_ms_per_frame(), 3))
                .collect();
            let _ = writeln!(md, "| {round} | {} |", cells.join(" | "));
            round += 1;
        }
    }
    let s = &r.stages;
    let _ = writeln!(
        md,
        "\n## One frame, stage by stage\n\nEach compute stage measured alone on one thread (median µs); the cloud's end-to-end \
         time comes from the `cloud window 1` scenario (one frame in flight). Overhead = end-to-end − decode − the compute on the critical path (the slowest branch; each branch runs on its own worker): \
         transport (two gRPC hops each way over loopback), routing, the worker's queue, and merge.\n\n\
         | stage | µs |\n|---|---:|\n\
         | edge: preprocess | {} |\n| edge: backbone (batch 1) | {} |\n| edge: int8 encode | {} |\n\
         | worker: int8 decode | {} |\n| worker: segments, all categories (batch 1, one after another) | {} |\n\
         | worker: critical path (slowest branch alone, or all segments ÷ cores if longer; batch 1) | {} |\n\
         | worker: segments, all categories (batch 64, per frame) | {} |\n\
         | peer: `full.onnx`, batch 1 | {} |\n| peer: `full.onnx`, batch 64, per frame | {} |\n\
         | compute alone, segments ÷ `full.onnx`, batch 1 | {} |\n| compute alone, segments ÷ `full.onnx`, batch 64 | {} |\n\
         | cloud end-to-end, p50 | {} |\n| cloud end-to-end, p99 | {} |\n\
         | coordinator: merge, all categories | {} |\n\
         | **overhead, p50** | {} |\n\
         | of which transport, routing and merge: end-to-end through stub workers that answer at once (`router window 1`), p50 | {} |\n\
         | of which the worker side: the rest (the worker's wake-up, hand-off to its batcher thread and back, workers sharing the cores) | {} |\n\
         | **overhead, p99** | {} |",
        f(s.preprocess_us, 1),
        f(s.backbone_us, 1),
        f(s.encode_us, 1),
        f(s.decode_us, 1),
        f(s.segments_us, 1),
        f(s.critical_path_us, 1),
        f(s.segments_batched_us, 1),
        f(s.full_us, 1),
        f(s.full_batched_us, 1),
        f(s.segments_us / s.full_us, 3),
        f(s.segments_batched_us / s.full_batched_us, 3),
        f(s.cloud_e2e_p50_us, 1),
        f(s.cloud_e2e_p99_us, 1),
        f(s.merge_us, 2),
        f(s.overhead_p50_us(), 1),
        // Without the `router window 1` scenario (e.g. under --only) there is nothing to split by.
        f(stub_or_nan(s.stub_e2e_p50_us), 1),
        f(s.overhead_p50_us() - stub_or_nan(s.stub_e2e_p50_us), 1),
        f(s.overhead_p99_us(), 1),
    );
    if !s.floor.is_empty() {
        let _ = writeln!(
            md,
            "\n### The compute floor of P3\n\nThe branch graphs the workers run for each P3 task \
             (`branches/*.onnx`, on int8-decoded backbone features) ÷ `full.onnx`, both at batch 64 \
             on one thread, timed by the thread's CPU clock, batch after batch alternated (median of \
             the per-batch ratios). No transport, no coordinator: the cloud's CPU per frame cannot be \
             below this share of the batch-64 peer's, and its P3 limit is 1.1 × the MAC share.\n\n\
             | task | compute alone ÷ `full.onnx` | cloud MAC share | P3 limit |\n|---|---:|---:|---:|"
        );
        for (task, floor, share) in &s.floor {
            let _ = writeln!(
                md,
                "| {task} | {} | {} | {} |",
                f(*floor, 3),
                f(*share, 3),
                f(1.1 * share, 3),
            );
        }
    }

    let _ = writeln!(
        md,
        "\n## Whole split path, every role in one process\n\nRaw test images through the edge agent \
         (preprocess, backbone, int8 encode, gRPC stream), coordinator and a worker per branch, \
         all in one process on the same cores as the peer above. CPU is the whole process's.\n\n\
         | scenario | parameters | frames/s | ÷ best peer | p50 ms | p99 ms | CPU ms/frame | bytes/frame | accuracy | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let peer_best = r
        .rows
        .iter()
        .filter(|x| x.section == "peer")
        .map(|x| x.measured.frames_per_s)
        .fold(0.0, f64::max);
    for row in r
        .rows
        .iter()
        .filter(|x| x.section == "split" || x.section == "peer")
    {
        let mm = &row.measured;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            params(
                row,
                &[
                    "task",
                    "batch",
                    "threads",
                    "window",
                    "codec",
                    "backbone threads"
                ]
            ),
            f(mm.frames_per_s, 0),
            if peer_best > 0.0 {
                f(mm.frames_per_s / peer_best, 2)
            } else {
                "–".into()
            },
            f(mm.p50_ms, 2),
            f(mm.p99_ms, 2),
            f(mm.total_cpu_ms_per_frame(), 3),
            mm.bytes_per_frame.map_or("–".into(), |b| f(b, 0)),
            mm.accuracy
                .map_or("–".into(), |a| format!("{} %", f(100.0 * a, 2))),
            mm.error_count()
        );
    }

    let _ = writeln!(
        md,
        "\n## Whole split path, every role a process of its own\n\n`spotlight edge` reads the raw test images \
         (preprocess, backbone, int8 encode) and streams them to the coordinator and worker processes; CPU per \
         frame per role from `/proc` (the edge's includes its start-up: loading the model). Frames/s and latency \
         are the edge's own summary.\n\n\
         | scenario | parameters | frames/s | p50 ms | p99 ms | edge CPU ms/frame | coordinator | workers | all roles | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in r.rows.iter().filter(|x| x.section == "processes") {
        let mm = &row.measured;
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            params(row, &["task", "window", "codec"]),
            f(mm.frames_per_s, 0),
            f(mm.p50_ms, 2),
            f(mm.p99_ms, 2),
            f(mm.cpu_ms_per_frame(|n| n == "edge"), 3),
            f(mm.cpu_ms_per_frame(|n| n == "coordinator"), 3),
            f(mm.cpu_ms_per_frame(|n| n.starts_with("worker")), 3),
            f(mm.total_cpu_ms_per_frame(), 3),
            mm.error_count()
        );
    }

    let _ = writeln!(
        md,
        "\n## Routing capacity (stub workers)\n\nThe coordinator process against stub workers in the bench process that \
         answer at once with zero logits: what routing alone costs.\n\n\
         | scenario | parameters | frames/s | p50 ms | p99 ms | coordinator CPU ms/frame | frames per coordinator CPU-second | errors |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for row in r.rows.iter().filter(|x| x.section == "router") {
        let mm = &row.measured;
        let c = mm.cpu_ms_per_frame(|n| n == "coordinator");
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            row.name,
            params(row, &["task", "streams", "window", "coordinators"]),
            f(mm.frames_per_s, 0),
            f(mm.p50_ms, 3),
            f(mm.p99_ms, 3),
            f(c, 4),
            f(1e3 / c.max(1e-9), 0),
            mm.error_count()
        );
    }
    let _ = writeln!(md, "\n## Plots\n");
    for (file, _) in plots(r) {
        let _ = writeln!(
            md,
            "![{file}]({})\n",
            relative(&opts.markdown, &opts.out.join(&file))
        );
    }
    // `make bench` runs the default model with every scenario; other runs need their command.
    let how = if command.contains(" --model ") || command.contains(" --only ") {
        format!("cargo build --release --bin spotlight && ./target/release/{command}")
    } else {
        format!("make bench        # = cargo build --release && {command}")
    };
    let _ = writeln!(
        md,
        "## Reproduce\n\n```sh\n{how}\n```\n\n\
         `spotlight bench --help` lists the options (`--frames`, `--quick`, `--out`, `--markdown`). \
         Raw figures: `results.json` beside the plots. Criterion micro-benchmarks: \
         `cargo bench -p spotlight-tests --bench codecs` and `--bench router`."
    );
    md
}

/// (file name, SVG) of each plot.
pub fn plots(r: &Results) -> Vec<(String, String)> {
    let cpu: Vec<(String, f64)> = r
        .rows
        .iter()
        .filter(|x| {
            x.section == "peer"
                || x.name.starts_with("cloud task ")
                || x.name.starts_with("cloud worker batch")
        })
        .map(|x| {
            let label = match x.params.get("task") {
                Some(t) if x.name.starts_with("cloud task") => format!("cloud, {t}"),
                _ => x.name.clone(),
            };
            (label, x.measured.total_cpu_ms_per_frame())
        })
        .collect();
    let fps: Vec<(String, f64)> = r
        .rows
        .iter()
        .filter(|x| x.section == "peer" || x.section == "split")
        .map(|x| (x.name.clone(), x.measured.frames_per_s))
        .collect();
    let sweep: Vec<(String, f64)> = r
        .rows
        .iter()
        .filter(|x| x.section == "cloud")
        .map(|x| (x.name.clone(), x.measured.p99_ms))
        .collect();
    vec![
        (
            "cpu_per_frame.svg".into(),
            bar_chart(
                "Cloud CPU per frame (ms): split cloud vs the whole model",
                &cpu,
            ),
        ),
        (
            "throughput.svg".into(),
            bar_chart(
                "Frames per second: peer vs the whole split path in one process",
                &fps,
            ),
        ),
        (
            "cloud_p99.svg".into(),
            bar_chart("Cloud p99 latency (ms) per scenario", &sweep),
        ),
    ]
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart.
pub fn bar_chart(title: &str, bars: &[(String, f64)]) -> String {
    let (left, width, bar_h, gap, top) = (300.0, 420.0, 18.0, 6.0, 40.0);
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-12);
    let height = top + bars.len() as f64 * (bar_h + gap) + 20.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"#,
        w = left + width + 90.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="10" y="22" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + gap);
        let w = if v.is_finite() { v / max * width } else { 0.0 };
        let _ = writeln!(
            svg,
            r#"<text x="{lx}" y="{ty}" text-anchor="end">{}</text><rect x="{left}" y="{y}" width="{w:.1}" height="{bar_h}" fill="steelblue"/><text x="{vx:.1}" y="{ty}">{}</text>"#,
            escape(label),
            f(*v, 3),
            lx = left - 6.0,
            ty = y + 13.0,
            vx = left + w + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_chart_scales_bars_to_the_largest_value() {
        let svg = bar_chart(
            "t <1>",
            &[("a".into(), 1.0), ("b".into(), 2.0), ("c".into(), f64::NAN)],
        );
        assert!(svg.contains("t &lt;1&gt;"));
        assert!(svg.contains(r#"width="210.0""#), "{svg}");
        assert!(svg.contains(r#"width="420.0""#), "{svg}");
        assert!(svg.contains(r#"width="0.0""#), "{svg}");
        assert!(svg.contains(">–<"), "{svg}");
    }

    #[test]
    fn targets_compare_in_the_right_direction() {
        let t = |measured, at_least| Target {
            id: "x".into(),
            what: String::new(),
            measured,
            limit: 1.0,
            at_least,
            unit: String::new(),
        };
        assert!(t(0.5, false).met());
        assert!(!t(1.5, false).met());
        assert!(t(1.5, true).met());
        assert!(!t(0.5, true).met());
    }
}
