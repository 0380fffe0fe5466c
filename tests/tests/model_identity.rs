//! A package that differs from the coordinator's only in its manifest — here the order of two
//! category names, re-hashed so that it loads — is another model: the coordinator refuses its
//! workers and its edges, as it would a package with other weights.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use spotlight_edge::{EdgeConfig, EdgeError, RunOptions, SourceConfig};
use spotlight_model::Model;
use spotlight_tests::*;

/// The shipped package with Sandal and Sneaker swapped in `categories`, its content hash
/// recomputed: the same ONNX files, tree and indices.
fn swapped_package() -> (tempfile::TempDir, Arc<Model>) {
    let src = repo_root().join("models/fashion-mnist-nested");
    let dir = tempfile::tempdir().expect("temp dir");
    let copy = |rel: &str| {
        let to = dir.path().join(rel);
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(src.join(rel), to).expect("copy");
    };
    copy("manifest.json");
    let model = model();
    for rel in model.manifest().files.keys() {
        copy(rel);
    }
    let path = dir.path().join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    manifest["categories"]
        .as_array_mut()
        .expect("categories")
        .swap(5, 7);
    // Not re-hashed, the edited package does not even load.
    std::fs::write(&path, manifest.to_string()).expect("write");
    let err = Model::load(dir.path()).expect_err("stale hash");
    assert!(err.to_string().contains("is corrupt or modified"), "{err}");
    manifest["content_hash"] = spotlight_model::content_hash(&manifest.to_string())
        .expect("hash")
        .into();
    std::fs::write(&path, manifest.to_string()).expect("write");
    let other = Arc::new(Model::load(dir.path()).expect("re-hashed package loads"));
    assert_eq!(other.categories()[5], "Sneaker");
    (dir, other)
}

fn edge_config(coordinator: String, dataset: &Path) -> EdgeConfig {
    EdgeConfig {
        coordinator,
        source: SourceConfig::Idx {
            images: dataset.join("t10k-images-idx3-ubyte.gz"),
            labels: None,
        },
        limit: Some(8),
        ..EdgeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_package_differing_only_in_category_order_is_refused_as_another_model() {
    let (_dir, other) = swapped_package();
    let sandbox = SandboxBuilder::new().start().await;
    assert_ne!(other.hash(), sandbox.model.hash());
    assert_eq!(other.manifest().files, sandbox.model.manifest().files);

    let worker = sandbox
        .start_worker("swapped", &["footwear".to_string()], other.clone())
        .await;
    let err = tokio::time::timeout(Duration::from_secs(15), worker.join)
        .await
        .expect("worker exits")
        .expect("join")
        .expect_err("registration must be refused")
        .to_string();
    assert!(
        err.contains("refused worker \"swapped\"")
            && err.contains(&format!("runs model {}", other.hash())),
        "{err}"
    );

    let dataset = std::env::var_os("SPOTLIGHT_FASHION_MNIST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/usr/share/datasets/fashion-mnist".into());
    let config = edge_config(format!("http://{}", sandbox.grpc), &dataset);
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        spotlight_edge::run_with(
            config,
            other.clone(),
            RunOptions::default(),
            std::future::pending(),
        ),
    )
    .await
    .expect("edge gives up")
    .expect_err("the edge must be refused");
    assert!(
        matches!(&err, EdgeError::ModelMismatch { model_hash, .. } if model_hash == other.hash()),
        "{err}"
    );
    sandbox.stop().await;
}
