//! `spotlight bench`: the split path beside the monolithic peer, every scenario on the same
//! images and cores in one run. Writes `results.json`, SVG plots and a Markdown report.
//!
//! Scenarios:
//! - **peer**: `full.onnx` in ONNX Runtime on every core, per frame and batched;
//! - **cloud**: coordinator and workers as separate processes, loaded by a client that sends
//!   precomputed backbone features; CPU time per process from the OS (`/proc`);
//! - **split**: every role in one process from raw image to prediction;
//! - **router**: the coordinator process against stub workers (routing capacity);
//! - **stages**: one frame's compute stages measured alone, beside the end-to-end latency.

pub mod cloud;
pub mod cpu;
pub mod eval;
pub mod inproc;
pub mod peer;
pub mod report;
pub mod soak;
pub mod stages;
pub mod stub;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use spotlight_codec::Codec;
use spotlight_model::Model;

/// Figures of one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Frames answered (predictions + errors).
    pub frames: usize,
    /// Errors by gRPC code name.
    pub errors: BTreeMap<String, usize>,
    pub wall_s: f64,
    pub frames_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    /// CPU seconds per process (or role) over the run.
    pub cpu: Vec<(String, f64)>,
    /// Bytes of one frame message (protobuf) on the edge link.
    pub bytes_per_frame: Option<f64>,
    /// Cloud MACs per frame (peer: the whole model's MACs).
    pub cloud_macs: Option<u64>,
    pub accuracy: Option<f64>,
    /// Mean frames per ONNX Runtime run on the workers (segment runs ÷ batches).
    pub mean_worker_batch: Option<f64>,
}

impl Measured {
    /// Frames, wall time and per-frame latencies (ms, any order).
    pub fn new(frames: usize, wall_s: f64, mut latencies: Vec<f64>) -> Self {
        latencies.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            if latencies.is_empty() {
                f64::NAN
            } else {
                latencies[((latencies.len() - 1) as f64 * p).round() as usize]
            }
        };
        Self {
            frames,
            errors: BTreeMap::new(),
            wall_s,
            frames_per_s: frames as f64 / wall_s.max(1e-9),
            p50_ms: pct(0.5),
            p95_ms: pct(0.95),
            p99_ms: pct(0.99),
            cpu: Vec::new(),
            bytes_per_frame: None,
            cloud_macs: None,
            accuracy: None,
            mean_worker_batch: None,
        }
    }

    /// CPU milliseconds per frame, summed over the processes whose name passes `filter`.
    pub fn cpu_ms_per_frame(&self, filter: impl Fn(&str) -> bool) -> f64 {
        let s: f64 = self
            .cpu
            .iter()
            .filter(|(n, _)| filter(n))
            .map(|(_, c)| c)
            .sum();
        s * 1e3 / self.frames.max(1) as f64
    }

    /// CPU milliseconds per frame of every process measured.
    pub fn total_cpu_ms_per_frame(&self) -> f64 {
        self.cpu_ms_per_frame(|_| true)
    }

    /// Frames answered with an error.
    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }
}

/// One scenario's name, parameters and figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Section: peer, cloud, split, router.
    pub section: String,
    /// Short name, unique in the run.
    pub name: String,
    /// Parameters (task, streams, window, codec, replicas, worker batch …).
    pub params: BTreeMap<String, String>,
    pub measured: Measured,
}

/// How big a run is.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `spotlight` binary (for the role processes).
    pub exe: PathBuf,
    /// Fashion-MNIST directory (idx .gz files).
    pub dataset: PathBuf,
    /// Frames per loaded scenario.
    pub frames: usize,
    /// Frames per window-1 (latency) scenario.
    pub latency_frames: usize,
    /// Fewer sweep points (smoke runs and CI).
    pub quick: bool,
    /// Only the scenarios whose name contains this.
    pub only: Option<String>,
    /// Where results.json and the plots go.
    pub out: PathBuf,
    /// Where the Markdown report goes.
    pub markdown: PathBuf,
}

/// Machine facts for the report.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub onnxruntime: String,
}

impl Machine {
    pub fn probe() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        // Relative to the working directory where possible: reports are committed.
        let onnxruntime = spotlight_runtime::resolve_library(None)
            .ok()
            .map(|p| {
                let cwd = std::env::current_dir().unwrap_or_default();
                p.strip_prefix(&cwd).unwrap_or(&p).display().to_string()
            })
            .unwrap_or_else(|| "unknown".into());
        Self {
            cores: cores(),
            cpu_model,
            kernel,
            onnxruntime,
        }
    }
}

/// Cores this process may use.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub model: String,
    pub model_hash: String,
    pub machine: Machine,
    pub started: String,
    pub images: usize,
    pub rows: Vec<Row>,
    pub stages: stages::Stages,
}

/// Names the groups of categories the sweeps use.
pub fn task_sets(model: &Model) -> Vec<(String, Vec<String>)> {
    let roots: Vec<usize> = (0..model.segments().len())
        .filter(|&s| model.segments()[s].parent.is_none())
        .collect();
    let names = |s: usize| -> Vec<String> {
        model.segments()[s]
            .categories
            .iter()
            .map(|&c| model.categories()[c].clone())
            .collect()
    };
    let mut sets = vec![("all".to_string(), Vec::new())];
    // One group: the last top-level branch with the fewest MACs under it (footwear here).
    if let Some(&one) = roots
        .iter()
        .find(|&&r| model.segments()[r].id == "footwear")
        .or(roots.last())
    {
        sets.push((
            format!("one group ({})", model.segments()[one].id),
            names(one),
        ));
    }
    if roots.len() > 2 {
        let two: Vec<String> = roots[roots.len() - 2..]
            .iter()
            .flat_map(|&r| names(r))
            .collect();
        sets.push(("two groups".to_string(), two));
    }
    sets
}

/// Codec by name for reports.
pub fn codec_name(c: Codec) -> &'static str {
    c.name()
}

pub use report::write_all;
pub mod run;
pub use run::run;
