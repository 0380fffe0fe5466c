//! Fused branch graphs (manifest `branches`): a worker that runs a whole top-level branch
//! for a batch runs it as one graph, with the same logits as its segments one by one.

use std::sync::Arc;

use spotlight_codec::Codec;
use spotlight_model::Model;
use spotlight_proto::v1 as pb;
use spotlight_tests::*;
use spotlight_worker::engine::{BatchSettings, Engine};

/// The package the test reads: `SPOTLIGHT_BRANCHES_PACKAGE`, else the shipped v2 package.
fn package() -> std::path::PathBuf {
    std::env::var_os("SPOTLIGHT_BRANCHES_PACKAGE")
        .map(Into::into)
        .unwrap_or_else(|| repo_root().join("models/fashion-mnist-nested-v2"))
}

/// A copy of the package at `src` without its fused graphs (re-sealed): what a package
/// without `branches` makes a worker do.
fn without_branches(src: &std::path::Path, dst: &std::path::Path) -> Model {
    resealed_copy(
        src,
        dst,
        |f| !f.starts_with("branches/"),
        |m| {
            m.as_object_mut().unwrap().remove("branches");
            m["files"]
                .as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("branches/"));
        },
    );
    Model::load(dst).expect("the package without branches loads")
}

/// Every frame asks for every segment, with its own gains: logits by (frame, segment).
async fn logits(
    engine: &Engine,
    model: &Model,
    feats: &[Vec<f32>],
) -> Vec<Vec<(String, Vec<f32>)>> {
    let runs = feats.iter().enumerate().map(|(i, f)| {
        let request = pb::RunRequest {
            model_hash: model.hash().to_string(),
            features: match frame(model, i as u64, f, Codec::F32).kind {
                Some(pb::edge_message::Kind::Frame(f)) => f.features,
                _ => unreachable!(),
            },
            segments: model
                .segments()
                .iter()
                .enumerate()
                .map(|(s, spec)| pb::SegmentRun {
                    segment_id: spec.id.clone(),
                    gain: 0.5 + ((i + s) % 4) as f32 * 0.5,
                })
                .collect(),
        };
        engine.run(request)
    });
    futures::future::join_all(runs)
        .await
        .into_iter()
        .map(|r| {
            r.expect("run")
                .outputs
                .into_iter()
                .map(|o| (o.segment_id, o.logits))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fused_branches_give_the_logits_of_their_segments() {
    let src = package();
    if !src.join("manifest.json").is_file() {
        panic!("{} is missing", src.display());
    }
    let _ = model(); // ONNX Runtime
    let fused = Arc::new(Model::load(&src).expect("package"));
    assert!(
        !fused.manifest().branches.is_empty(),
        "{} has no fused branches",
        src.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let plain = Arc::new(without_branches(&src, dir.path()));
    let metrics = spotlight_service::Metrics::new();
    let settings = BatchSettings::default();
    let a = Engine::load(fused.clone(), &[], settings, "fused", &metrics)
        .await
        .expect("engine");
    let metrics = spotlight_service::Metrics::new();
    let b = Engine::load(plain.clone(), &[], settings, "plain", &metrics)
        .await
        .expect("engine");
    let (images, _) = test_images(200);
    let feats = features(&fused, &images);
    let with = logits(&a, &fused, &feats).await;
    let without = logits(&b, &plain, &feats).await;
    assert!(a.fused_runs() > 0, "the fused graphs ran");
    assert_eq!(b.fused_runs(), 0);
    let mut worst = 0f32;
    for (x, y) in with.iter().zip(&without) {
        assert_eq!(
            x.iter().map(|o| &o.0).collect::<Vec<_>>(),
            y.iter().map(|o| &o.0).collect::<Vec<_>>()
        );
        for ((_, l), (_, m)) in x.iter().zip(y) {
            for (u, v) in l.iter().zip(m) {
                worst = worst.max((u - v).abs());
            }
        }
    }
    assert!(
        worst < 1e-4,
        "fused and per-segment logits differ by {worst}"
    );
    // A cutout (a child not asked for) runs the segments one by one, with the same answer.
    let before = a.fused_runs();
    let top = &fused.manifest().branches[0];
    let request = pb::RunRequest {
        model_hash: fused.hash().to_string(),
        features: match frame(&fused, 0, &feats[0], Codec::F32).kind {
            Some(pb::edge_message::Kind::Frame(f)) => f.features,
            _ => unreachable!(),
        },
        segments: top.segments[..2]
            .iter()
            .map(|id| pb::SegmentRun {
                segment_id: id.clone(),
                gain: 1.0,
            })
            .collect(),
    };
    let part = a.run(request.clone()).await.expect("run");
    assert_eq!(
        a.fused_runs(),
        before,
        "part of a branch does not run fused"
    );
    let mut same = request;
    same.model_hash = plain.hash().to_string();
    let alone = b.run(same).await.expect("run");
    assert!(!part.outputs.is_empty(), "{:?}", top.segments);
    assert_eq!(part.outputs, alone.outputs);
}
