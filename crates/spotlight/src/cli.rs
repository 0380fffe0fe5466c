//! Command line: clap owns the flags; each flag becomes a config override.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// spotlight: split inference for nested-feature networks. The edge runs the backbone, the
/// cloud runs only the branches the current task needs.
#[derive(Debug, Parser)]
#[command(name = "spotlight", version, about, long_about = None)]
pub struct Cli {
    /// TOML config file (see configs/); env `SPOTLIGHT_…` and flags override it.
    #[arg(long, short = 'c', global = true, env = "SPOTLIGHT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model package directory.
    #[arg(long, global = true)]
    pub model: Option<PathBuf>,
    /// Log format: text or json.
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// Run plaintext without authentication: anyone who reaches a port may call it. Only on
    /// a network you trust; without it, roles refuse to start with no certificates.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// CA certificate (PEM) that peers' certificates chain to.
    #[arg(long, global = true, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// This process's certificate chain (PEM): served by coordinator and worker, presented
    /// as client certificate with --mtls.
    #[arg(long, global = true, value_name = "PEM")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long, global = true, value_name = "PEM")]
    pub key: Option<PathBuf>,
    /// Tokens file (coordinator, worker): who may call, by role (see `spotlight certs`).
    #[arg(long, global = true, value_name = "TOML")]
    pub tokens: Option<PathBuf>,
    /// File holding this process's bearer token.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Mutual TLS: servers require client certificates signed by --ca; clients present --cert.
    #[arg(long, global = true)]
    pub mtls: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every role in one process on loopback: coordinator, a worker per branch, an edge
    /// agent streaming the Fashion-MNIST test set, with a task switch half-way.
    Up(UpArgs),
    /// The edge agent: backbone on the device, frames to the coordinator.
    Edge(EdgeArgs),
    /// The coordinator: task, registry, routing, control API.
    Coordinator(CoordinatorArgs),
    /// A branch worker hosting some top-level branches.
    Worker(WorkerArgs),
    /// Read or change the task of a running coordinator.
    Task(TaskArgs),
    /// Show a model's segment tree and what a task keeps and excludes.
    Inspect(InspectArgs),
    /// Write a development CA, a certificate per role and a bearer token per role, and
    /// print the settings each role needs.
    Certs(CertsArgs),
    /// Measure the split path beside the monolithic model in one run: peer, cloud roles as
    /// separate processes (CPU per frame), every role in one process, routing capacity.
    /// Writes results.json, SVG plots and a Markdown report.
    Bench(BenchArgs),
    /// Accuracy against bytes on the wire for every feature codec, exactly as deployed,
    /// beside sending the image (PNG, WebP, JPEG) to `full.onnx`. Writes a Markdown table
    /// and an SVG plot.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Only the first N test images (default: all 10 000).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Markdown report; the SVG plot goes next to it with the same stem.
    #[arg(long, default_value = "docs/codecs.md")]
    pub out: PathBuf,
    /// Fashion-MNIST directory (idx .gz files).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub dataset: PathBuf,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Also print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Frames per loaded scenario.
    #[arg(long, default_value_t = 4000)]
    pub frames: usize,
    /// Frames per one-in-flight (latency) scenario.
    #[arg(long, default_value_t = 1000)]
    pub latency_frames: usize,
    /// Fewer sweep points (a smoke run).
    #[arg(long)]
    pub quick: bool,
    /// Only the scenarios whose name contains this (e.g. "cloud window", "peer").
    #[arg(long)]
    pub only: Option<String>,
    /// Directory for results.json and the SVG plots.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Markdown report (default: <out>/benchmarks.md).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Fashion-MNIST directory (idx .gz files).
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub dataset: PathBuf,
    /// Instead of the scenarios: a soak of this many seconds (many streams against the
    /// cloud processes; frames, errors by code, latency, memory per process over time).
    #[arg(long, value_name = "SECONDS")]
    pub soak: Option<u64>,
    /// Soak: concurrent edge streams.
    #[arg(long, default_value_t = 64)]
    pub streams: usize,
    /// Soak: frames in flight per stream.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write into.
    #[arg(long, default_value = "secrets")]
    pub out: PathBuf,
    /// Extra name or IP address the coordinator and worker certificates are valid for
    /// (repeatable); localhost, 127.0.0.1 and ::1 are always included.
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Frames to stream (default: the whole test set).
    #[arg(long)]
    pub limit: Option<u64>,
    /// Categories of the task switched to half-way (comma-separated); "none" = no switch.
    #[arg(long)]
    pub switch_to: Option<String>,
    /// Keep serving after the stream ends, until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Coordinator gRPC address.
    #[arg(long)]
    pub grpc_listen: Option<String>,
    /// Coordinator HTTP address.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Feature codec: f32, f16 or int8.
    #[arg(long)]
    pub codec: Option<String>,
    /// Replicas per branch.
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Edge transport: grpc or quic.
    #[arg(long)]
    pub transport: Option<String>,
}

#[derive(Debug, Args)]
pub struct EdgeArgs {
    /// Coordinator gRPC endpoint, e.g. http://10.0.0.5:7000.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Transport to the coordinator: grpc, or quic (UDP to the same address).
    #[arg(long)]
    pub transport: Option<String>,
    /// Fashion-MNIST style images file (idx3, .gz or plain).
    #[arg(long, conflicts_with = "folder")]
    pub idx_images: Option<PathBuf>,
    /// Labels file matching --idx-images.
    #[arg(long, requires = "idx_images")]
    pub idx_labels: Option<PathBuf>,
    /// A folder of PNG/JPEG images.
    #[arg(long)]
    pub folder: Option<PathBuf>,
    /// Serve the local device API (POST /v1/classify) on this address.
    #[arg(long)]
    pub listen: Option<String>,
    /// Stop after this many inputs.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Feature codec: f32, f16 or int8.
    #[arg(long)]
    pub codec: Option<String>,
    /// JSON lines output: a path or - for stdout.
    #[arg(long)]
    pub output: Option<String>,
}

#[derive(Debug, Args)]
pub struct CoordinatorArgs {
    /// gRPC address (Inference, Control, Registry, health, reflection).
    #[arg(long)]
    pub grpc_listen: Option<String>,
    /// HTTP/JSON API address.
    #[arg(long)]
    pub http_listen: Option<String>,
    /// File the task is persisted to.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// etcd endpoints shared by coordinator replicas (comma-separated http:// URLs): the
    /// task and the worker registry live there. Unset: one coordinator, state_file.
    #[arg(long)]
    pub etcd: Option<String>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Coordinator gRPC endpoint to register with.
    #[arg(long)]
    pub coordinator: Option<String>,
    /// Address to serve Branches on.
    #[arg(long)]
    pub listen: Option<String>,
    /// Address of the HTTP probes and metrics (/livez, /readyz, /metrics).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Address the coordinator should call (default http://<listen>).
    #[arg(long)]
    pub advertise: Option<String>,
    /// Top-level branches hosted (comma-separated); default all.
    #[arg(long)]
    pub branches: Option<String>,
    /// Worker id.
    #[arg(long)]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct TaskArgs {
    /// Coordinator gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:7000", global = true)]
    pub coordinator: String,
    #[command(subcommand)]
    pub action: TaskAction,
}

#[derive(Debug, Subcommand)]
pub enum TaskAction {
    /// Print the current task.
    Get,
    /// Replace the task.
    Set {
        /// Relevant categories, comma-separated; empty = all.
        #[arg(long, default_value = "")]
        categories: String,
        /// A top-down gain: NAME=GAIN with NAME a category or segment id (repeatable).
        #[arg(long = "gain")]
        gains: Vec<String>,
    },
    /// Print the task, then every change, until Ctrl-C.
    Watch,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Model package directory (default: the configured model).
    pub dir: Option<PathBuf>,
    /// Categories of a task to plan, comma-separated.
    #[arg(long)]
    pub categories: Option<String>,
    /// A top-down gain: NAME=GAIN (repeatable).
    #[arg(long = "gain")]
    pub gains: Vec<String>,
}

/// Splits "a,b, c" into trimmed non-empty names.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// Parses NAME=GAIN pairs.
pub fn parse_gains(pairs: &[String]) -> Result<std::collections::BTreeMap<String, f32>, String> {
    pairs
        .iter()
        .map(|p| {
            let (k, v) = p
                .rsplit_once('=')
                .ok_or_else(|| format!("gain \"{p}\" must look like NAME=GAIN"))?;
            let g: f32 = v
                .trim()
                .parse()
                .map_err(|_| format!("gain \"{p}\": \"{v}\" is not a number"))?;
            Ok((k.trim().to_string(), g))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn gains_parse_and_refuse_garbage() {
        let g = parse_gains(&["footwear=2".into(), "T-shirt/top = 0.5".into()]).unwrap();
        assert_eq!(g["footwear"], 2.0);
        assert_eq!(g["T-shirt/top"], 0.5);
        assert!(
            parse_gains(&["footwear".into()])
                .unwrap_err()
                .contains("NAME=GAIN")
        );
        assert!(
            parse_gains(&["a=b".into()])
                .unwrap_err()
                .contains("not a number")
        );
        assert_eq!(
            split_list(" Sandal, Ankle boot ,,"),
            vec!["Sandal", "Ankle boot"]
        );
    }
}
