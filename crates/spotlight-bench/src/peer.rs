//! The peer: `full.onnx` (backbone and every segment in one graph) in ONNX Runtime on every
//! core, from raw image to prediction. The compute bound the split path is measured against.

use std::sync::Arc;
use std::time::Instant;

use spotlight_model::{Model, preprocess};
use spotlight_runtime::FullSession;

use crate::Measured;
use crate::cpu;

/// Runs `images` through `full.onnx` on `threads` threads (one single-threaded session
/// each, opened before the CPU and wall clocks start), `batch` images per run.
pub fn run(
    model: &Arc<Model>,
    images: &[Vec<u8>],
    labels: &[u8],
    threads: usize,
    batch: usize,
) -> anyhow::Result<Measured> {
    let n = images.len();
    let chunks: Vec<Vec<usize>> = (0..threads)
        .map(|t| (0..n).filter(|i| i % threads == t).collect())
        .collect();
    // Sessions open before the clock starts: the cloud's workers keep theirs for their
    // lifetime, so neither side is charged for loading and optimising graphs.
    // One warm-up run each at this batch size, so that ONNX Runtime's first-run allocations
    // are not charged either.
    let nseg = model.segments().len();
    let mut sessions = (0..threads)
        .map(|_| FullSession::open(model, 1))
        .collect::<Result<Vec<_>, _>>()?;
    let warm = batch.min(n);
    let mut x = Vec::with_capacity(warm * 784);
    let mut buf = Vec::new();
    for image in &images[..warm] {
        preprocess(&model.manifest().input, image, &mut buf);
        x.extend_from_slice(&buf);
    }
    for session in sessions.iter_mut().filter(|_| warm > 0) {
        session.run(x.clone(), warm, vec![1.0; warm * nseg])?;
    }
    let cpu0 = cpu::self_cpu_seconds();
    let t0 = Instant::now();
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .iter()
            .zip(sessions)
            .map(|(mine, mut session)| {
                let model = model.clone();
                scope.spawn(move || -> anyhow::Result<(Vec<f64>, usize)> {
                    let ncat = model.categories().len();
                    let mut buf = Vec::new();
                    let mut latencies = Vec::with_capacity(mine.len());
                    let mut correct = 0;
                    for group in mine.chunks(batch) {
                        let t = Instant::now();
                        let mut x = Vec::with_capacity(group.len() * 784);
                        for &i in group {
                            preprocess(&model.manifest().input, &images[i], &mut buf);
                            x.extend_from_slice(&buf);
                        }
                        let logits = session.run(x, group.len(), vec![1.0; group.len() * nseg])?;
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        for (row, &i) in logits.chunks(ncat).zip(group) {
                            let top = (0..ncat)
                                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                                .unwrap_or(0);
                            correct += usize::from(top == usize::from(labels[i]));
                            latencies.push(ms);
                        }
                    }
                    Ok((latencies, correct))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("peer thread panicked"))?
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })?;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu::self_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => f64::NAN,
    };
    let mut latencies = Vec::with_capacity(n);
    let mut correct = 0;
    for (l, c) in results {
        latencies.extend(l);
        correct += c;
    }
    let mut m = Measured::new(n, wall, latencies);
    m.accuracy = Some(correct as f64 / n.max(1) as f64);
    m.cpu.push(("peer".into(), cpu));
    m.cloud_macs = Some(model.manifest().backbone.macs + model.cloud_macs_total());
    Ok(m)
}
