//! Package integrity on the shipped package and on altered copies of it: the content hash
//! covers the manifest (category order included) and every file, a bad file is named, an
//! unknown schema version is refused saying which ones are accepted. The canonical-JSON
//! vectors are shared with the Python exporter's tests.

use std::path::{Path, PathBuf};

use serde_json::Value;
use spotlight_model::{Model, ModelError, canonical_json, content_hash};

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-nested")
}

/// A copy of the shipped package in a temporary directory (ONNX files and manifest).
fn copy_shipped() -> tempfile::TempDir {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("create dir");
        for entry in std::fs::read_dir(from).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let target = to.join(path.file_name().expect("file name"));
            if path.is_dir() {
                copy(&path, &target);
            } else {
                std::fs::copy(&path, &target).expect("copy file");
            }
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    copy(&shipped(), dir.path());
    dir
}

fn read_manifest(dir: &Path) -> Value {
    let bytes = std::fs::read(dir.join("manifest.json")).expect("read manifest");
    serde_json::from_slice(&bytes).expect("manifest JSON")
}

fn write_manifest(dir: &Path, manifest: &Value) {
    let bytes = serde_json::to_vec_pretty(manifest).expect("serialise manifest");
    std::fs::write(dir.join("manifest.json"), bytes).expect("write manifest");
}

/// Swaps two category names: the ONNX files, the tree and every index stay the same.
fn swap_categories(manifest: &mut Value, a: usize, b: usize) {
    manifest["categories"]
        .as_array_mut()
        .expect("categories")
        .swap(a, b);
}

/// An edit of a manifest, named.
type Edit = (&'static str, fn(&mut Value));

#[test]
fn the_shipped_package_verifies() {
    let model = Model::load(shipped()).expect("shipped package");
    let text = std::fs::read_to_string(shipped().join("manifest.json")).expect("manifest");
    assert_eq!(model.hash(), content_hash(&text).unwrap());
    assert_eq!(model.manifest().files.len(), 7);
}

#[test]
fn a_manifest_differing_only_in_category_order_is_refused() {
    let dir = copy_shipped();
    let mut manifest = read_manifest(dir.path());
    swap_categories(&mut manifest, 5, 7); // Sandal <-> Sneaker
    write_manifest(dir.path(), &manifest);
    let err = Model::load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::HashMismatch { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("is corrupt or modified: manifest.json says content_hash sha256:")
            && text.contains(&content_hash(&manifest.to_string()).unwrap()),
        "{text}"
    );

    // Re-hashed, it is a valid package, but another model: another identity.
    manifest["content_hash"] = content_hash(&manifest.to_string()).unwrap().into();
    write_manifest(dir.path(), &manifest);
    let other = Model::load(dir.path()).expect("re-hashed package");
    let original = Model::load(shipped()).unwrap();
    assert_ne!(other.hash(), original.hash());
    assert_eq!(other.manifest().files, original.manifest().files);
}

#[test]
fn every_semantic_field_is_covered_by_the_hash() {
    let original = read_manifest(&shipped());
    let edits: [Edit; 6] = [
        ("input mean", |m| m["input"]["mean"][0] = 0.5.into()),
        ("segment file", |m| {
            m["segments"][3]["file"] = "segments/other.onnx".into()
        }),
        ("tree", |m| {
            m["segments"][1]["direct_categories"] = serde_json::json!([6, 0])
        }),
        ("bottleneck range", |m| {
            m["backbone"]["output_range"] = serde_json::json!([-2.0, 2.0])
        }),
        ("gain semantics", |m| {
            m["gain"]["zero_is_cutout"] = false.into()
        }),
        ("a file digest", |m| {
            m["files"]["full.onnx"] = format!("sha256:{}", "0".repeat(64)).into()
        }),
    ];
    for (what, edit) in edits {
        let mut m = original.clone();
        edit(&mut m);
        assert_ne!(
            content_hash(&m.to_string()).unwrap(),
            original["content_hash"].as_str().unwrap(),
            "{what}"
        );
    }
}

#[test]
fn a_modified_file_is_named() {
    let dir = copy_shipped();
    let file = dir.path().join("segments/footwear.onnx");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let err = Model::load(dir.path()).unwrap_err();
    match &err {
        ModelError::FileHashMismatch { file, .. } => assert_eq!(file, "segments/footwear.onnx"),
        other => panic!("expected a file hash mismatch, got {other}"),
    }
    assert!(
        err.to_string()
            .contains("segments/footwear.onnx hashes to sha256:"),
        "{err}"
    );
}

#[test]
fn a_missing_or_unlisted_file_is_refused() {
    let dir = copy_shipped();
    std::fs::copy(
        dir.path().join("full.onnx"),
        dir.path().join("segments/extra.onnx"),
    )
    .unwrap();
    let err = Model::load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnlistedFile { file, .. } if file == "segments/extra.onnx"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("segments/extra.onnx")).unwrap();

    std::fs::remove_file(dir.path().join("segments/tops.warm.onnx")).unwrap();
    let err = Model::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("segments/tops.warm.onnx"), "{err}");

    // A manifest that lists a path outside the package is refused before anything is read.
    let dir = copy_shipped();
    let mut manifest = read_manifest(dir.path());
    manifest["files"]["../outside.onnx"] = "sha256:00".into();
    manifest["content_hash"] = content_hash(&manifest.to_string()).unwrap().into();
    write_manifest(dir.path(), &manifest);
    let err = Model::load(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("files lists \"../outside.onnx\"; expected a relative path"),
        "{err}"
    );
}

#[test]
fn an_unknown_schema_version_is_refused_naming_the_accepted_ones() {
    let dir = copy_shipped();
    for (schema, shown) in [
        (Value::from("spotlight.model/v1"), "\"spotlight.model/v1\""),
        (Value::from("spotlight.model/v3"), "\"spotlight.model/v3\""),
        (Value::Null, "none"),
    ] {
        let mut manifest = read_manifest(dir.path());
        manifest["schema"] = schema;
        // a v1 manifest has none of the v2 fields: the schema is what is reported
        manifest.as_object_mut().unwrap().remove("files");
        write_manifest(dir.path(), &manifest);
        let err = Model::load(dir.path()).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedSchema { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "manifest schema {shown} is not supported; this reader accepts spotlight.model/v2; \
                 re-export the package (`python -m spotlight_model export`), or upgrade a \
                 spotlight.model/v1 package in place, keeping its ONNX files (`python -m \
                 spotlight_model remanifest --out <package dir>`)"
            )
        );
    }
}

#[test]
fn canonical_json_matches_the_python_exporter() {
    #[derive(serde::Deserialize)]
    struct Case<'a> {
        what: String,
        #[serde(borrow)]
        value: &'a serde_json::value::RawValue,
        canonical: String,
        content_hash: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Doc<'a> {
        #[serde(borrow)]
        cases: Vec<Case<'a>>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/canonical.json");
    let text = std::fs::read_to_string(path).unwrap();
    let doc: Doc = serde_json::from_str(&text).unwrap();
    assert!(doc.cases.len() >= 5);
    for case in doc.cases {
        let value = case.value.get();
        assert_eq!(
            canonical_json(value).unwrap(),
            case.canonical,
            "{}",
            case.what
        );
        if let Some(hash) = case.content_hash {
            assert_eq!(content_hash(value).unwrap(), hash, "{}", case.what);
        }
    }
}

#[test]
fn the_manifest_fuzz_seeds_are_current_manifests() {
    // Seeds that no longer parse would stop at serde and never reach `validate`.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/manifest_parse");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let manifest = spotlight_model::Manifest::from_json(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            manifest.schema,
            spotlight_model::SCHEMA,
            "{}",
            path.display()
        );
        n += 1;
    }
    assert!(n >= 5);
}

#[test]
fn a_fused_branch_must_cover_a_whole_top_level_subtree() {
    let base = read_manifest(&shipped());
    let with = |branch: Value| {
        let mut m = base.clone();
        m["branches"] = Value::Array(vec![branch]);
        spotlight_model::Manifest::from_json(m.to_string().as_bytes())
            .expect("parses")
            .validate()
    };
    let branch = |segments: &[&str], outputs: &[&str]| {
        serde_json::json!({
            "id": segments[0], "file": "branches/x.onnx", "input": "x", "gains_input": "gains",
            "segments": segments,
            "logits_outputs": outputs.iter().map(|s| (s.to_string(), Value::String(format!("{s}/logits")))).collect::<serde_json::Map<_, _>>(),
        })
    };
    with(branch(
        &["tops", "tops.light", "tops.warm"],
        &["tops.light", "tops.warm"],
    ))
    .expect("the whole tops subtree is a branch");
    for (segments, outputs) in [
        // part of the subtree
        (&["tops", "tops.light"][..], &["tops.light"][..]),
        // not top-level
        (&["tops.light"][..], &["tops.light"][..]),
        // another order than the manifest's
        (
            &["tops", "tops.warm", "tops.light"][..],
            &["tops.light", "tops.warm"][..],
        ),
        // a scoring segment without its output
        (
            &["tops", "tops.light", "tops.warm"][..],
            &["tops.light"][..],
        ),
    ] {
        let err = with(branch(segments, outputs)).expect_err("refused");
        assert!(err.to_string().contains("branch \"tops"), "{err}");
    }
}
