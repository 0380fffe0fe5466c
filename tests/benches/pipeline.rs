//! Side-by-side figures in one run (the machine is shared and noisy, so compare ratios):
//! monolithic `full.onnx` vs. the split pipeline over loopback, per codec and task.
//!
//!     cargo bench -p spotlight-tests --bench pipeline            # 2000 test images
//!     SPOTLIGHT_BENCH_FRAMES=10000 cargo bench -p spotlight-tests --bench pipeline

use std::time::{Duration, Instant};

use spotlight_codec::Codec;
use spotlight_model::preprocess;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind;
use spotlight_runtime::FullSession;
use spotlight_tests::*;

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn png_size(pixels: &[u8]) -> usize {
    let mut out = std::io::Cursor::new(Vec::new());
    image::GrayImage::from_raw(28, 28, pixels.to_vec())
        .expect("28x28")
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner().len()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("SPOTLIGHT_BENCH_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let model = model();
    let (images, labels) = test_images(n);
    let n = images.len();
    println!(
        "model {} ({}), {n} Fashion-MNIST test images, 2 cores shared\n",
        model.name(),
        model.hash()
    );

    let png: f64 = images.iter().map(|i| png_size(i) as f64).sum::<f64>() / n as f64;
    println!("mean PNG size of the images: {png:.0} B\n");

    // Monolithic baseline: full.onnx, one image at a time, in-process.
    let mut full = FullSession::open(&model, 1).expect("full.onnx");
    let nseg = model.segments().len();
    let ncat = model.categories().len();
    let mut buf = Vec::new();
    let mut lat = Vec::with_capacity(n);
    let mut correct = 0;
    let t0 = Instant::now();
    for (img, &label) in images.iter().zip(&labels) {
        let t = Instant::now();
        preprocess(&model.manifest().input, img, &mut buf);
        let logits = full.run(buf.clone(), 1, vec![1.0; nseg]).expect("run");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        let top = (0..ncat)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .expect("top");
        correct += usize::from(top == usize::from(label));
    }
    let elapsed = t0.elapsed();
    lat.sort_by(f64::total_cmp);
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>8} {:>12}",
        "configuration", "frames/s", "p50 ms", "p99 ms", "B/frame", "accuracy"
    );
    println!(
        "{:<44} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>11.2}%",
        "monolithic full.onnx (in-process, batch 1)",
        n as f64 / elapsed.as_secs_f64(),
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        "-",
        100.0 * correct as f64 / n as f64
    );

    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let feats = features(&model, &images);
    let footwear = ["Sandal", "Sneaker", "Ankle boot"];
    for (task_name, categories) in [
        ("all categories", vec![]),
        (
            "footwear only",
            footwear.iter().map(|s| s.to_string()).collect(),
        ),
    ] {
        sandbox
            .control()
            .await
            .set_task(pb::SetTaskRequest {
                categories: categories.clone(),
                gains: Default::default(),
            })
            .await
            .expect("task");
        for codec in [Codec::F32, Codec::F16, Codec::Int8] {
            for window in [1usize, 64] {
                let (tx, mut inbound) = sandbox.open_stream().await;
                let mut sent_at = vec![Instant::now(); n];
                let mut lat = Vec::with_capacity(n);
                let (mut correct, mut relevant, mut macs, mut bytes) =
                    (0usize, 0usize, 0u64, 0usize);
                let t0 = Instant::now();
                let mut next = 0;
                let mut done = 0;
                while done < n {
                    while next < n && next - done < window {
                        let f = frame(&model, next as u64, &feats[next], codec);
                        if let Some(pb::edge_message::Kind::Frame(fr)) = &f.kind {
                            bytes += fr.features.as_ref().map_or(0, |t| t.data.len());
                        }
                        sent_at[next] = Instant::now();
                        tx.send(f).await.expect("send");
                        next += 1;
                    }
                    let msg = tokio::time::timeout(Duration::from_secs(30), inbound.message())
                        .await
                        .expect("answer")
                        .expect("ok")
                        .expect("open");
                    let Some(Kind::Prediction(p)) = msg.kind else {
                        panic!("unexpected {msg:?}")
                    };
                    let i = p.seq as usize;
                    lat.push(sent_at[i].elapsed().as_secs_f64() * 1e3);
                    let label = usize::from(labels[i]);
                    if p.scores.iter().any(|s| s.index as usize == label) {
                        relevant += 1;
                        correct += usize::from(p.top_index as usize == label);
                    }
                    macs += p.cost.map_or(0, |c| c.cloud_macs);
                    done += 1;
                }
                let elapsed = t0.elapsed();
                drop(tx);
                lat.sort_by(f64::total_cmp);
                println!(
                    "{:<44} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>11.2}%   cloud MACs/frame {:.2} M of {:.2} M",
                    format!("split, {task_name}, {codec:?}, window {window}"),
                    n as f64 / elapsed.as_secs_f64(),
                    pct(&lat, 0.5),
                    pct(&lat, 0.99),
                    bytes / n,
                    100.0 * correct as f64 / relevant.max(1) as f64,
                    macs as f64 / n as f64 / 1e6,
                    model.cloud_macs_total() as f64 / 1e6,
                );
            }
        }
    }
    println!(
        "\naccuracy of the one-group task is over the test images of that group, among its categories"
    );
    sandbox.stop().await;
}
