use std::path::PathBuf;

use super::*;
use crate::Manifest;

/// A small tree: a → {a.x: [0, 1], a.y: [2]}, b: [3].
fn model() -> Model {
    let seg = |id: &str,
               parent: Option<&str>,
               children: &[&str],
               direct: &[usize],
               cats: &[usize],
               macs: u64| {
        serde_json::json!({
            "id": id, "parent": parent, "children": children, "file": format!("segments/{id}.onnx"),
            "input": {"name": "x", "shape": [-1, 4, 2, 2]}, "gain_input": "gain",
            "features_output": if children.is_empty() { serde_json::Value::Null } else { serde_json::json!({"name": "features", "shape": [-1, 4, 2, 2]}) },
            "logits_output": if direct.is_empty() { serde_json::Value::Null } else { serde_json::json!({"name": "logits", "shape": [-1, direct.len()]}) },
            "direct_categories": direct, "categories": cats, "params": macs / 10, "macs": macs,
        })
    };
    let manifest: Manifest = serde_json::from_value(serde_json::json!({
        "schema": "spotlight.model/v2", "name": "toy", "content_hash": "sha256:00", "files": {},
        "gain": {"multiplies": "segment_output", "zero_is_cutout": true, "logit_effect": "adds_log_gain"},
        "input": {"name": "image", "shape": [-1, 1, 4, 4], "dtype": "float32", "color": "gray", "scale": 255.0, "mean": [0.0], "std": [1.0]},
        "categories": ["c0", "c1", "c2", "c3"],
        "backbone": {"file": "backbone.onnx", "input": "image", "output": "features", "output_shape": [-1, 4, 2, 2], "output_range": [-1.0, 1.0], "params": 1, "macs": 1},
        "segments": [
            seg("a", None, &["a.x", "a.y"], &[], &[0, 1, 2], 100),
            seg("a.x", Some("a"), &[], &[0, 1], &[0, 1], 200),
            seg("a.y", Some("a"), &[], &[2], &[2], 300),
            seg("b", None, &[], &[3], &[3], 400),
        ],
        "full": {"file": "full.onnx", "input": "image", "gains_input": "gains", "output": "logits"},
    }))
    .unwrap();
    Model::from_manifest(PathBuf::from("toy"), manifest).unwrap()
}

fn task(categories: &[&str], gains: &[(&str, f32)]) -> TaskSpec {
    TaskSpec {
        categories: categories.iter().map(|s| s.to_string()).collect(),
        gains: gains.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

#[test]
fn empty_task_runs_everything() {
    let plan = model().plan(&TaskSpec::default()).unwrap();
    assert_eq!(plan.relevant, vec![0, 1, 2, 3]);
    assert_eq!(plan.segments, vec![0, 1, 2, 3]);
    assert_eq!(plan.cloud_macs, 1000);
    assert_eq!(plan.cloud_macs_saved, 0);
}

#[test]
fn cutout_keeps_only_the_paths_to_relevant_categories() {
    let m = model();
    let plan = m.plan(&task(&["c2"], &[])).unwrap();
    assert_eq!(plan.segments, vec![0, 2], "a and a.y");
    assert_eq!(plan.cloud_macs, 400);
    assert_eq!(plan.cloud_macs_saved, 600);
    let plan = m.plan(&task(&["c3", "c0"], &[])).unwrap();
    assert_eq!(plan.relevant, vec![0, 3]);
    assert_eq!(plan.segments, vec![0, 1, 3]);
}

#[test]
fn gain_zero_cuts_out_a_segment_and_everything_under_it() {
    let plan = model().plan(&task(&[], &[("a", 0.0)])).unwrap();
    assert_eq!(plan.relevant, vec![3]);
    assert_eq!(plan.segments, vec![3]);
    let plan = model().plan(&task(&[], &[("c1", 0.0)])).unwrap();
    assert_eq!(plan.relevant, vec![0, 2, 3]);
}

#[test]
fn segment_gains_are_fed_and_category_gains_become_logit_offsets() {
    let plan = model()
        .plan(&task(&["c0", "c3"], &[("a", 2.0), ("c3", 0.5)]))
        .unwrap();
    assert_eq!(plan.segment_gains, vec![2.0, 1.0, 1.0]);
    assert_eq!(plan.log_gains, vec![0.0, 0.5f32.ln()]);
}

#[test]
fn bad_tasks_are_refused_with_the_valid_names() {
    let m = model();
    let err = m.plan(&task(&["sneakers"], &[])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown category \"sneakers\"; known: c0, c1, c2, c3"
    );
    let err = m.plan(&task(&[], &[("zzz", 2.0)])).unwrap_err();
    assert!(
        err.to_string().contains("a segment (a, a.x, a.y, b)"),
        "{err}"
    );
    assert!(matches!(
        m.plan(&task(&[], &[("c0", -1.0)])),
        Err(ModelError::BadGain { .. })
    ));
    assert!(matches!(
        m.plan(&task(&[], &[("c0", f32::NAN)])),
        Err(ModelError::BadGain { .. })
    ));
    assert!(matches!(
        m.plan(&task(&["c3"], &[("b", 0.0)])),
        Err(ModelError::EmptyTask)
    ));
}

#[test]
fn merge_normalises_over_relevant_categories_only() {
    let m = model();
    let plan = m.plan(&task(&["c0", "c1"], &[("c1", 2.0)])).unwrap();
    let logits = [1.0, 1.0, 50.0, f32::NAN];
    let scores = m.merge(&plan, &logits).unwrap();
    assert_eq!(scores.top(), Some(1), "the gain of 2 favours c1");
    let p1 = scores.scores[0].score;
    assert!((p1 - 2.0 / 3.0).abs() < 1e-6, "{p1}");
    assert!((scores.scores.iter().map(|s| s.score).sum::<f32>() - 1.0).abs() < 1e-6);
    assert_eq!(m.merge(&plan, &[f32::NAN; 4]), Err(MergeError::Missing(0)));
}

#[test]
fn validation_rejects_inconsistent_trees() {
    let m = model();
    let mut manifest = m.manifest().clone();
    manifest.segments[3].direct_categories = vec![2];
    manifest.segments[3].logits_output = Some(crate::TensorSpec {
        name: "logits".into(),
        shape: vec![-1, 1],
    });
    let err = manifest.validate().unwrap_err().to_string();
    assert!(err.contains("scored by more than one segment"), "{err}");
    let mut manifest = m.manifest().clone();
    manifest.schema = "spotlight.model/v0".into();
    let err = manifest.validate().unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedSchema { .. }), "{err}");
    assert!(
        err.to_string().contains(
            "schema \"spotlight.model/v0\" is not supported; this reader accepts spotlight.model/v2"
        ),
        "{err}"
    );
    let mut manifest = m.manifest().clone();
    manifest.gain.zero_is_cutout = false;
    let err = manifest.validate().unwrap_err().to_string();
    assert!(err.contains("zero_is_cutout"), "{err}");
    for range in [[1.0, -1.0], [f32::NAN, 1.0], [0.0, 0.0]] {
        let mut manifest = m.manifest().clone();
        manifest.backbone.output_range = range;
        let err = manifest.validate().unwrap_err().to_string();
        assert!(err.contains("output_range"), "{range:?}: {err}");
    }
}

#[test]
fn an_unknown_gain_semantics_does_not_parse() {
    let mut raw = serde_json::to_value(model().manifest()).unwrap();
    raw["gain"]["multiplies"] = "segment_input".into();
    let err = serde_json::from_value::<Manifest>(raw)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown variant `segment_input`, expected `segment_output`"),
        "{err}"
    );
}

#[test]
fn gains_outside_the_stated_range_are_refused_naming_the_key_and_value() {
    let m = model();
    for bad in [f32::INFINITY, f32::NAN, -0.5, MAX_GAIN * 1.01, 1e30] {
        let err = m.plan(&task(&[], &[("c0", bad)])).unwrap_err();
        assert!(matches!(err, ModelError::BadGain { .. }), "{bad}: {err}");
        assert_eq!(
            err.to_string(),
            format!("gain for \"c0\" must be a finite number in [0, 1000], got {bad}")
        );
    }
    // The limit itself is accepted, and its ln is a modest logit offset.
    let plan = m.plan(&task(&[], &[("c0", MAX_GAIN)])).unwrap();
    assert!((plan.log_gains[0] - MAX_GAIN.ln()).abs() < 1e-6);
}

#[test]
fn segment_gains_multiplying_past_the_limit_along_a_path_are_refused() {
    let m = model();
    let err = m
        .plan(&task(&[], &[("a", 1000.0), ("a.x", 1000.0)]))
        .unwrap_err();
    assert!(matches!(err, ModelError::BadTask(_)), "{err}");
    assert!(
        err.to_string()
            .contains("segment gains along a=1000 → a.x=1000 multiply to 1000000; at most 10000"),
        "{err}"
    );
    // Within the limit, and a category gain does not count (it is a logit offset).
    assert!(
        m.plan(&task(&[], &[("a", 100.0), ("a.x", 100.0), ("c0", 1000.0)]))
            .is_ok()
    );
}

#[test]
fn small_gains_do_not_underflow_into_a_cut_out() {
    let plan = model()
        .plan(&task(&[], &[("a", 1e-30), ("a.x", 1e-30)]))
        .unwrap();
    assert_eq!(plan.relevant, vec![0, 1, 2, 3], "only a gain of 0 cuts out");
}

#[test]
fn duplicates_and_oversize_tasks_are_refused_stating_the_limit() {
    let m = model();
    let err = m.plan(&task(&["c1", "c0", "c1"], &[])).unwrap_err();
    assert_eq!(err.to_string(), "category \"c1\" is listed twice");
    let err = m.plan(&task(&["c0"; 5], &[])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "task lists 5 categories; the model has 4, each may be listed once"
    );
    let many: Vec<(String, f32)> = (0..9).map(|i| (format!("k{i}"), 1.0)).collect();
    let spec = TaskSpec {
        categories: vec![],
        gains: many.into_iter().collect(),
    };
    let err = m.plan(&spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "task has 9 gains; at most 8 (one per category or segment)"
    );
    let long = "x".repeat(5000);
    let err = m
        .plan(&task(&[long.as_str()], &[]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is 5000 bytes; names are at most 128"),
        "{err}"
    );
    assert!(
        err.len() < 300,
        "the name is not echoed whole: {} bytes",
        err.len()
    );
}

#[test]
fn a_gain_key_given_twice_in_json_is_refused() {
    let err = serde_json::from_str::<TaskSpec>(r#"{"gains": {"c0": 2, "c0": 3}}"#).unwrap_err();
    assert!(
        err.to_string().contains("gain for \"c0\" is given twice"),
        "{err}"
    );
    let ok: TaskSpec = serde_json::from_str(r#"{"gains": {"c0": 2, "a": 3}}"#).unwrap();
    assert_eq!(ok.gains.len(), 2);
    assert_eq!(
        serde_json::from_str::<TaskSpec>(r#"{"categories": ["c1"]}"#).unwrap(),
        task(&["c1"], &[])
    );
}

#[test]
fn a_task_is_read_only_from_an_object_of_known_fields() {
    for (json, err) in [
        ("[]", "invalid type: sequence, expected a task object"),
        (
            r#"[["c0"], {}]"#,
            "invalid type: sequence, expected a task object",
        ),
        (
            r#"{"category": []}"#,
            "unknown field `category`, expected `categories` or `gains`",
        ),
        (r#"{"gains": {}, "gains": {}}"#, "duplicate field `gains`"),
        (
            r#"{"categories": "c0"}"#,
            "invalid type: string \"c0\", expected a sequence",
        ),
    ] {
        let got = serde_json::from_str::<TaskSpec>(json)
            .unwrap_err()
            .to_string();
        assert!(got.contains(err), "{json}: {got}");
    }
    assert_eq!(
        serde_json::from_str::<TaskSpec>("{}").unwrap(),
        TaskSpec::default()
    );
}

#[test]
fn merge_never_returns_a_non_finite_score() {
    let m = model();
    let plan = m.plan(&TaskSpec::default()).unwrap();
    // An infinite logit used to give inf - inf = NaN for every score.
    let err = m.merge(&plan, &[f32::INFINITY, 1.0, 2.0, 3.0]).unwrap_err();
    assert!(
        matches!(err, MergeError::NonFinite { category: 0, .. }),
        "{err:?}"
    );
    assert!(m.merge(&plan, &[f32::NEG_INFINITY; 4]).is_err());
    // Huge finite logits still merge into finite scores.
    let scores = m.merge(&plan, &[f32::MAX, -f32::MAX, 0.0, 1.0]).unwrap();
    assert!(scores.scores.iter().all(|s| s.score.is_finite()));
    assert_eq!(scores.top(), Some(0));
}

#[test]
fn validation_rejects_shapes_without_a_batch_axis() {
    // Found by the manifest_parse fuzz target (fuzz/): the shipped manifest with a nested
    // segment's input shape `[]` made `validate` index past the end of the shape and panic.
    let m = model();
    let mut manifest = m.manifest().clone();
    manifest.segments[2].input.shape = vec![];
    let err = manifest.validate().unwrap_err().to_string();
    assert!(
        err.contains("\"a.y\" tensor \"x\" has an empty shape"),
        "{err}"
    );
    let mut manifest = m.manifest().clone();
    manifest.backbone.output_shape = vec![];
    let err = manifest.validate().unwrap_err().to_string();
    assert!(err.contains("backbone output shape is empty"), "{err}");
    let mut manifest = m.manifest().clone();
    if let Some(f) = manifest.segments[0].features_output.as_mut() {
        f.shape = vec![];
    }
    assert!(manifest.validate().is_err());
}

#[test]
fn validation_rejects_costs_and_shapes_that_overflow() {
    // Found by the manifest_parse fuzz target (fuzz/): a segment with `"macs":
    // 18446744073709551615` validated, then `cloud_macs_total` overflowed (a panic in debug
    // builds, a wrapped total in release).
    let m = model();
    let mut manifest = m.manifest().clone();
    manifest.segments[2].macs = u64::MAX;
    let err = manifest.validate().unwrap_err().to_string();
    assert!(err.contains("add up to more than 2^64"), "{err}");
    let mut manifest = m.manifest().clone();
    manifest.segments[3].params = u64::MAX;
    assert!(manifest.validate().is_err());
    // The same for `feature_len` (found by hand next to it, and checked with the fuzz target
    // binary): dimensions whose product overflows usize.
    let mut manifest = m.manifest().clone();
    manifest.backbone.output_shape = vec![-1, 1 << 40, 1 << 40];
    for s in &mut manifest.segments {
        s.input.shape = manifest.backbone.output_shape.clone();
    }
    let err = manifest.validate().unwrap_err().to_string();
    assert!(err.contains("more values than fit in memory"), "{err}");
}
