//! One frame's compute stages, each measured alone on one thread, beside the end-to-end
//! latency of the cloud at one frame in flight: overhead = end-to-end − compute.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use spotlight_codec::Codec;
use spotlight_model::{Model, preprocess};
use spotlight_runtime::{BackboneSession, BranchSession, FullSession, SegmentSession};

/// Median microseconds per frame of each stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stages {
    /// Edge: image → normalised tensor.
    pub preprocess_us: f64,
    /// Edge: backbone, batch of one.
    pub backbone_us: f64,
    /// Edge: int8 encoding of the features.
    pub encode_us: f64,
    /// Worker: int8 decoding.
    pub decode_us: f64,
    /// Worker: every segment of the all-categories plan, batch of one (the cloud's compute).
    pub segments_us: f64,
    /// Worker: the compute on a frame's critical path at batch 1: the slowest top-level
    /// branch alone, or all segments spread over the machine's cores if that is longer
    /// (workers run their branches in parallel).
    pub critical_path_us: f64,
    /// Worker: the same segments in batches of 64, per frame.
    pub segments_batched_us: f64,
    /// Peer: `full.onnx` (backbone and every segment) at batch 1, measured interleaved
    /// with the stages above on the same thread.
    pub full_us: f64,
    /// Peer: `full.onnx` in batches of 64, per frame.
    pub full_batched_us: f64,
    /// Cloud end-to-end at one frame in flight (client → coordinator → worker → client),
    /// from the `cloud window 1` scenario, p50 and p99.
    pub cloud_e2e_p50_us: f64,
    pub cloud_e2e_p99_us: f64,
    /// The same path through stub workers that answer at once, p50 (`router window 1`):
    /// transport (two gRPC hops each way), routing and merge, with no worker compute, queue
    /// or wake-up of a worker process.
    pub stub_e2e_p50_us: f64,
    /// Coordinator: merging one frame's logits under the all-categories plan.
    pub merge_us: f64,
    /// Per P3 task: the compute floor of its cloud CPU, (task name, ratio). The branch
    /// graphs the workers run for the task (fused, `branches/*.onnx`) ÷ `full.onnx`, both at
    /// batch 64 on one thread, timed by the thread's CPU clock, batch after batch
    /// alternated; the median of the per-batch ratios. No transport, no coordinator.
    /// Beside it, the task's cloud MACs as a share of the whole model's.
    pub floor: Vec<(String, f64, f64)>,
}

impl Stages {
    /// Per-frame overhead of the cloud path at p50: end-to-end − (decode + the compute on
    /// the critical path).
    pub fn overhead_p50_us(&self) -> f64 {
        self.cloud_e2e_p50_us - self.decode_us - self.critical_path_us
    }

    /// The same at p99 (p99 end-to-end against the median compute).
    pub fn overhead_p99_us(&self) -> f64 {
        self.cloud_e2e_p99_us - self.decode_us - self.critical_path_us
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures the stages on `images` (one thread, batch of one unless stated).
pub fn measure(model: &Arc<Model>, images: &[Vec<u8>]) -> anyhow::Result<Stages> {
    let roots: Vec<usize> = (0..model.segments().len())
        .filter(|&s| model.parent_of(s).is_none())
        .collect();
    let mut per_root: Vec<Vec<f64>> = vec![Vec::new(); roots.len()];
    let mut backbone = BackboneSession::open(model, 1)?;
    let mut full = FullSession::open(model, 1)?;
    let nseg = model.segments().len();
    let mut sessions = (0..model.segments().len())
        .map(|s| SegmentSession::open(model, s, 1))
        .collect::<Result<Vec<_>, _>>()?;
    let len = model.feature_len();
    let (mut pre, mut bb, mut enc, mut dec, mut seg, mut whole) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let mut all_images = Vec::with_capacity(images.len() * 784);
    let mut buf = Vec::new();
    let mut all_features = Vec::with_capacity(images.len() * len);
    for img in images {
        let t = Instant::now();
        preprocess(&model.manifest().input, img, &mut buf);
        pre.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let f = backbone.run(buf.clone(), 1)?;
        bb.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let e = spotlight_codec::encode(Codec::Int8, &f);
        enc.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let d = spotlight_codec::decode(Codec::Int8, &e.data, e.scale, e.zero_point, len)?;
        dec.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        run_tree(model, &mut sessions, d.clone(), 1, None)?;
        seg.push(t.elapsed().as_secs_f64() * 1e6);
        for (i, &r) in roots.iter().enumerate() {
            let t = Instant::now();
            run_tree(model, &mut sessions, d.clone(), 1, Some(r))?;
            per_root[i].push(t.elapsed().as_secs_f64() * 1e6);
        }
        all_features.extend_from_slice(&d);
        let t = Instant::now();
        full.run(buf.clone(), 1, vec![1.0; nseg])?;
        whole.push(t.elapsed().as_secs_f64() * 1e6);
        all_images.extend_from_slice(&buf);
    }
    // Batched: 64 frames per run, segments and the whole model interleaved.
    let (mut batched, mut whole_batched) = (Vec::new(), Vec::new());
    let image_len = all_images.len() / images.len().max(1);
    for (chunk, imgs) in all_features
        .chunks(64 * len)
        .zip(all_images.chunks(64 * image_len.max(1)))
    {
        let n = chunk.len() / len;
        let t = Instant::now();
        run_tree(model, &mut sessions, chunk.to_vec(), n, None)?;
        batched.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
        let t = Instant::now();
        full.run(imgs.to_vec(), n, vec![1.0; n * nseg])?;
        whole_batched.push(t.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    // The coordinator's merge of one frame under the all-categories plan (1000 merges per
    // sample, 21 samples).
    let plan = model.plan(&spotlight_model::TaskSpec {
        categories: model.categories().to_vec(),
        gains: Default::default(),
    })?;
    let logits: Vec<f32> = (0..model.categories().len())
        .map(|c| (c as f32 * 0.37).sin())
        .collect();
    let merges = (0..21)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..1000 {
                std::hint::black_box(model.merge(&plan, std::hint::black_box(&logits)).ok());
            }
            t.elapsed().as_secs_f64() * 1e6 / 1000.0
        })
        .collect();
    Ok(Stages {
        merge_us: median(merges),
        preprocess_us: median(pre),
        backbone_us: median(bb),
        encode_us: median(enc),
        decode_us: median(dec),
        segments_us: median(seg.clone()),
        // The branches run in parallel, each on its own worker, but on no more cores than
        // the machine has.
        critical_path_us: per_root
            .into_iter()
            .map(median)
            .fold(0.0, f64::max)
            .max(median(seg.clone()) / crate::cores() as f64),
        segments_batched_us: median(batched),
        full_us: median(whole),
        full_batched_us: median(whole_batched),
        ..Stages::default()
    })
}

/// The compute floor of each task in `tasks` ((name, categories), as the P3 rounds run
/// them): see [`Stages::floor`]. Only tasks that run whole top-level branches, each with a
/// fused graph in the package, have one (a worker runs single segments otherwise); none
/// when `images` holds less than one batch of 64.
pub fn compute_floor(
    model: &Arc<Model>,
    images: &[Vec<u8>],
    tasks: &[(String, Vec<String>)],
) -> anyhow::Result<Vec<(String, f64, f64)>> {
    const BATCH: usize = 64;
    let whole = (model.manifest().backbone.macs + model.cloud_macs_total()) as f64;
    let mut backbone = BackboneSession::open(model, 1)?;
    let mut full = FullSession::open(model, 1)?;
    let nseg = model.segments().len();
    let mut branches = (0..model.manifest().branches.len())
        .map(|b| BranchSession::open(model, b, 1))
        .collect::<Result<Vec<_>, _>>()?;
    // Each task's branch graphs: the fused graph of every top-level segment its plan runs,
    // where the plan runs the whole branch (the worker's rule for running a fused graph).
    let mut uses: Vec<(String, Vec<usize>, f64)> = Vec::new();
    for (name, categories) in tasks {
        let plan = model.plan(&spotlight_model::TaskSpec {
            categories: categories.clone(),
            gains: Default::default(),
        })?;
        let roots: Vec<usize> = plan
            .segments
            .iter()
            .copied()
            .filter(|&s| model.parent_of(s).is_none())
            .collect();
        let graphs: Vec<usize> = roots
            .iter()
            .filter_map(|&r| branches.iter().position(|b| b.segments()[0] == r))
            .filter(|&b| {
                branches[b]
                    .segments()
                    .iter()
                    .all(|t| plan.segments.contains(t))
            })
            .collect();
        if !roots.is_empty() && graphs.len() == roots.len() {
            uses.push((
                name.clone(),
                graphs,
                plan.cloud_macs as f64 / whole.max(1.0),
            ));
        }
    }
    let len = model.feature_len();
    let mut buf = Vec::new();
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); uses.len()];
    for group in images.chunks(BATCH).filter(|g| g.len() == BATCH) {
        let mut x = Vec::with_capacity(BATCH * 784);
        for img in group {
            preprocess(&model.manifest().input, img, &mut buf);
            x.extend_from_slice(&buf);
        }
        // The features the workers would get: the backbone's output through the int8 codec.
        let features = backbone.run(x.clone(), BATCH)?;
        let mut decoded = Vec::with_capacity(features.len());
        for row in features.chunks(len) {
            let e = spotlight_codec::encode(Codec::Int8, row);
            decoded.extend(spotlight_codec::decode(
                Codec::Int8,
                &e.data,
                e.scale,
                e.zero_point,
                len,
            )?);
        }
        let t = crate::cpu::thread_cpu_seconds();
        full.run(x, BATCH, vec![1.0; BATCH * nseg])?;
        let full_s = crate::cpu::thread_cpu_seconds() - t;
        let mut per_graph = vec![0.0; branches.len()];
        for (b, session) in branches.iter_mut().enumerate() {
            let k = session.segments().len();
            let t = crate::cpu::thread_cpu_seconds();
            session.run(decoded.clone(), vec![1.0; BATCH * k], BATCH)?;
            per_graph[b] = crate::cpu::thread_cpu_seconds() - t;
        }
        if full_s > 0.0 {
            for ((_, graphs, _), out) in uses.iter().zip(&mut ratios) {
                out.push(graphs.iter().map(|&b| per_graph[b]).sum::<f64>() / full_s);
            }
        }
    }
    Ok(uses
        .into_iter()
        .zip(ratios)
        .filter(|(_, r)| !r.is_empty())
        .map(|((name, _, share), r)| (name, median(r), share))
        .collect())
}

/// Runs every segment (parents first), or those under top-level segment `only`, on `n`
/// frames of backbone features.
fn run_tree(
    model: &Model,
    sessions: &mut [SegmentSession],
    features: Vec<f32>,
    n: usize,
    only: Option<usize>,
) -> anyhow::Result<()> {
    let mut outputs: Vec<Option<Vec<f32>>> = vec![None; sessions.len()];
    for s in 0..sessions.len() {
        if only.is_some_and(|r| model.root_of(s) != r) {
            continue;
        }
        let input = match model.parent_of(s) {
            None => features.clone(),
            Some(p) => outputs[p].clone().unwrap_or_default(),
        };
        let out = sessions[s].run(input, vec![1.0; n])?;
        outputs[s] = out.features;
    }
    Ok(())
}
