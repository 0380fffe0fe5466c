//! Soak: many concurrent edge streams against the cloud processes for minutes. Reports frames,
//! errors by code, latency, and each process's resident memory over time, which must stay
//! flat: every queue is bounded, so load beyond capacity becomes backpressure or
//! RESOURCE_EXHAUSTED, never memory.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use spotlight_codec::Codec;
use spotlight_model::Model;

use crate::BenchOptions;
use crate::cloud::{Cluster, ClusterSpec, drive_for, log_dir};

/// How long and how hard.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub duration: Duration,
    /// Concurrent edge streams.
    pub streams: usize,
    /// Frames in flight per stream.
    pub window: usize,
}

/// Resident memory of one process over the run.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub process: String,
    /// (seconds since start, MiB).
    pub samples: Vec<(f64, f64)>,
    pub peak_mib: f64,
    /// Peak over the middle third of the run (after warm-up).
    pub middle_peak_mib: f64,
    /// Peak over the last third.
    pub last_peak_mib: f64,
}

impl Memory {
    /// Growth of the last third's peak over the middle third's.
    pub fn growth_mib(&self) -> f64 {
        self.last_peak_mib - self.middle_peak_mib
    }
}

/// What a soak measured.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub streams: usize,
    pub window: usize,
    /// Frames answered (predictions and errors).
    pub frames: usize,
    pub frames_per_s: f64,
    /// Errors by gRPC code; `DUPLICATE` counts second answers to a frame.
    pub errors: BTreeMap<String, usize>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub memory: Vec<Memory>,
}

impl SoakReport {
    /// Markdown table of the run.
    pub fn markdown(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!(
            "Soak: {} streams × {} frames in flight for {:.0} s against a coordinator and a \
             worker per top-level branch (separate processes, loopback).\n\n\
             | frames answered | frames/s | errors by code | p50 ms | p99 ms |\n\
             |---:|---:|---|---:|---:|\n\
             | {} | {:.0} | {} | {:.1} | {:.1} |\n\n\
             | process | RSS peak MiB | peak, middle third | peak, last third | growth MiB |\n\
             |---|---:|---:|---:|---:|\n",
            self.streams,
            self.window,
            self.duration_s,
            self.frames,
            self.frames_per_s,
            errors,
            self.p50_ms,
            self.p99_ms
        );
        for m in &self.memory {
            s.push_str(&format!(
                "| {} | {:.1} | {:.1} | {:.1} | {:+.1} |\n",
                m.process,
                m.peak_mib,
                m.middle_peak_mib,
                m.last_peak_mib,
                m.growth_mib()
            ));
        }
        s
    }
}

/// Resident set size of `pid` in MiB (Linux `/proc`).
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Runs the soak against worker processes started here.
pub async fn run(
    opts: &BenchOptions,
    soak: &SoakOptions,
    model: Arc<Model>,
) -> anyhow::Result<SoakReport> {
    let (images, _) = crate::run::load_images(opts, 1000)?;
    let tensors = Arc::new(crate::run::tensors(&model, &images, Codec::Int8)?);
    let logs = log_dir()?;
    let cluster = Cluster::start(&opts.exe, &model, &logs, ClusterSpec::default())
        .await
        .context("starting the cloud processes")?;
    let mut pids = cluster.pids();
    pids.push(("load client".to_string(), std::process::id()));

    let answered = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let sampler = {
        let pids = pids.clone();
        let answered = answered.clone();
        let period =
            (soak.duration / 150).clamp(Duration::from_millis(200), Duration::from_secs(2));
        tokio::spawn(async move {
            let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); pids.len()];
            let mut last_report = Instant::now();
            loop {
                let t = started.elapsed().as_secs_f64();
                for (i, (_, pid)) in pids.iter().enumerate() {
                    if let Some(mib) = rss_mib(*pid) {
                        samples[i].push((t, mib));
                    }
                }
                if last_report.elapsed() >= Duration::from_secs(30) {
                    eprintln!(
                        "soak: {t:.0} s, {} frames answered",
                        answered.load(Ordering::Relaxed)
                    );
                    last_report = Instant::now();
                }
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stopped.changed() => break,
                }
            }
            samples
        })
    };
    let measured = drive_for(
        cluster.grpc,
        model.hash(),
        tensors,
        soak.streams,
        soak.window,
        soak.duration,
        answered,
    )
    .await;
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    let samples = sampler.await.context("memory sampler")?;
    cluster.stop().await;
    let measured = measured?;
    let third = elapsed.as_secs_f64() / 3.0;
    let peak = |s: &[(f64, f64)], from: f64, to: f64| {
        s.iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, m)| *m)
            .fold(0.0, f64::max)
    };
    let memory = pids
        .iter()
        .zip(samples)
        .map(|((name, _), s)| Memory {
            process: name.clone(),
            peak_mib: peak(&s, 0.0, f64::MAX),
            middle_peak_mib: peak(&s, third, 2.0 * third),
            last_peak_mib: peak(&s, 2.0 * third, f64::MAX),
            samples: s,
        })
        .collect();
    Ok(SoakReport {
        duration_s: elapsed.as_secs_f64(),
        streams: soak.streams,
        window: soak.window,
        frames: measured.frames,
        frames_per_s: measured.frames as f64 / elapsed.as_secs_f64(),
        errors: measured.errors.clone(),
        p50_ms: measured.p50_ms,
        p99_ms: measured.p99_ms,
        memory,
    })
}
