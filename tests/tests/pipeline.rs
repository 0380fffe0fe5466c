//! Equivalence, cutout and runtime task change, on real servers over loopback.

use spotlight_codec::Codec;
use spotlight_proto::v1 as pb;
use spotlight_proto::v1::cloud_message::Kind;
use spotlight_runtime::FullSession;
use spotlight_tests::*;

fn prediction(k: &Kind) -> &pb::Prediction {
    match k {
        Kind::Prediction(p) => p,
        other => panic!("expected a prediction, got {other:?}"),
    }
}

/// The split pipeline (backbone here, segments on three workers over gRPC, merge on the
/// coordinator) gives the same scores as the monolithic `full.onnx`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_pipeline_matches_full_model_on_1000_test_images() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let model = sandbox.model.clone();
    let (images, labels) = test_images(1000);
    let feats = features(&model, &images);
    let frames = frames(&model, &feats, Codec::F32);
    let answers = sandbox.classify(frames).await;

    let mut full = FullSession::open(&model, 2).expect("full.onnx");
    let ncat = model.categories().len();
    let nseg = model.segments().len();
    let all: Vec<usize> = (0..ncat).collect();
    let mut max_diff = 0f32;
    let mut agree = 0;
    let mut correct = 0;
    for (chunk_index, chunk) in images.chunks(100).enumerate() {
        let mut batch = Vec::new();
        let mut buf = Vec::new();
        for img in chunk {
            spotlight_model::preprocess(&model.manifest().input, img, &mut buf);
            batch.extend_from_slice(&buf);
        }
        let logits = full
            .run(batch, chunk.len(), vec![1.0; chunk.len() * nseg])
            .expect("full run");
        for (j, row) in logits.chunks(ncat).enumerate() {
            let seq = (chunk_index * 100 + j) as u64;
            let p = prediction(&answers[&seq]);
            let expected = softmax(row, &all);
            assert_eq!(p.scores.len(), ncat);
            for s in &p.scores {
                max_diff = max_diff.max((s.score - expected[s.index as usize]).abs());
            }
            let full_top = (0..ncat)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .expect("non-empty");
            agree += usize::from(full_top == p.top_index as usize);
            correct += usize::from(p.top_index as usize == usize::from(labels[seq as usize]));
        }
    }
    println!("max |Δscore| = {max_diff:e}, top-1 agreement {agree}/1000, accuracy {correct}/1000");
    assert!(max_diff <= 1e-4, "max |Δscore| {max_diff} > 1e-4");
    assert_eq!(agree, 1000);
    assert!(
        correct >= 900,
        "accuracy {correct}/1000 is implausibly low for the shipped model"
    );
    sandbox.stop().await;
}

/// With a one-group task, workers of other groups receive nothing and the segments run
/// equal the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutout_sends_frames_only_to_relevant_workers() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let model = sandbox.model.clone();
    let mut control = sandbox.control().await;
    let footwear = ["Sandal", "Sneaker", "Ankle boot"];
    let task = control
        .set_task(pb::SetTaskRequest {
            categories: footwear.iter().map(|s| s.to_string()).collect(),
            gains: Default::default(),
        })
        .await
        .expect("set task")
        .into_inner();
    assert_eq!(task.version, 2);

    let (images, _) = test_images(40);
    let feats = features(&model, &images);
    let frames = frames(&model, &feats, Codec::Int8);
    let answers = sandbox.classify(frames).await;
    let footwear_macs = model.segments()[model.segment_index("footwear").expect("footwear")].macs;
    for k in answers.values() {
        let p = prediction(k);
        assert_eq!(p.task_version, 2);
        let cost = p.cost.as_ref().expect("cost");
        assert_eq!(cost.segments_run, vec!["footwear".to_string()]);
        assert_eq!(cost.cloud_macs, footwear_macs);
        assert_eq!(
            cost.cloud_macs + cost.cloud_macs_saved,
            model.cloud_macs_total()
        );
        let names: Vec<&str> = p.scores.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), 3);
        assert!(names.iter().all(|n| footwear.contains(n)), "{names:?}");
    }
    for w in &sandbox.workers {
        let stats = w.stats().await;
        let total: u64 = stats.segments_run.values().sum();
        if w.id == "footwear" {
            assert_eq!(stats.requests, 40);
            assert_eq!(stats.segments_run["footwear"], 40);
        } else {
            assert_eq!(
                (stats.requests, total),
                (0, 0),
                "worker {} received frames: {stats:?}",
                w.id
            );
        }
    }
    sandbox.stop().await;
}

/// A task change mid-stream applies from the next frame and each answer names its version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_change_mid_stream_takes_effect_and_is_versioned() {
    let sandbox = SandboxBuilder::new().worker_per_branch().start().await;
    let model = sandbox.model.clone();
    let (images, _) = test_images(40);
    let feats = features(&model, &images);
    let (tx, mut inbound) = sandbox.open_stream().await;

    for (i, f) in feats[..20].iter().enumerate() {
        tx.send(frame(&model, i as u64, f, Codec::Int8))
            .await
            .expect("send");
    }
    let first = collect(&mut inbound, 20).await;
    let mut control = sandbox.control().await;
    let task = control
        .set_task(pb::SetTaskRequest {
            categories: vec!["Bag".into(), "Trouser".into()],
            gains: [("Bag".to_string(), 2.0f32)].into_iter().collect(),
        })
        .await
        .expect("set task")
        .into_inner();
    for (i, f) in feats[20..].iter().enumerate() {
        tx.send(frame(&model, 20 + i as u64, f, Codec::Int8))
            .await
            .expect("send");
    }
    let second = collect(&mut inbound, 20).await;
    drop(tx);
    assert!(first.values().all(|k| prediction(k).task_version == 1));
    for k in second.values() {
        let p = prediction(k);
        assert_eq!(p.task_version, task.version);
        assert_eq!(
            p.cost.as_ref().expect("cost").segments_run,
            vec!["other".to_string()]
        );
        let mut names: Vec<&str> = p.scores.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        assert_eq!(names, vec!["Bag", "Trouser"]);
        // The gain of 2 on Bag doubles its evidence: p(Bag)/p(Trouser) = 2·exp(zBag − zTrouser).
        let bag = p.scores.iter().find(|s| s.name == "Bag").expect("bag");
        let trouser = p
            .scores
            .iter()
            .find(|s| s.name == "Trouser")
            .expect("trouser");
        let expected = 2.0 * f64::from(bag.logit - trouser.logit).exp();
        let got = f64::from(bag.score) / f64::from(trouser.score);
        assert!(
            (got / expected - 1.0).abs() < 1e-3,
            "ratio {got} vs {expected}"
        );
    }
    // The stream still closes cleanly once everything is answered.
    assert!(inbound.message().await.expect("clean end").is_none());

    let watched = control
        .watch_task(pb::WatchTaskRequest {})
        .await
        .expect("watch")
        .into_inner()
        .message()
        .await;
    assert_eq!(
        watched.expect("watch item").expect("task").version,
        task.version
    );
    sandbox.stop().await;
}
