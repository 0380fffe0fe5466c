//! Any bytes as `manifest.json`: content hash, parse, validate, and for a manifest that
//! validates, build the model and use it the way every role does at startup (feature shape,
//! tree walks, the all-categories plan). An error is fine; a panic is a bug. Mutations are JSON-aware (see
//! `spotlight_fuzz::mutate_json`), so most inputs stay JSON and reach `validate`.

#![no_main]

use std::path::PathBuf;

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use spotlight_model::{Manifest, Model, TaskSpec};

fuzz_target!(|data: &[u8]| {
    // The canonical form behind the content hash reads untrusted manifests too: it may refuse
    // one, never panic.
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = spotlight_model::content_hash(text);
    }
    let Ok(manifest) = Manifest::from_json(data) else {
        return;
    };
    if manifest.validate().is_err() {
        return;
    }
    let model = match Model::from_manifest(PathBuf::from("fuzz"), manifest) {
        Ok(model) => model,
        Err(e) => panic!("validated manifest refused by Model::from_manifest: {e}"),
    };
    let len = model.feature_len();
    let shape = model.feature_shape(1);
    assert_eq!(shape.len(), model.manifest().backbone.output_shape.len());
    let _ = (len, model.manifest().input.chw());
    for s in 0..model.segments().len() {
        let root = model.root_of(s);
        assert!(model.parent_of(root).is_none());
        assert_eq!(model.segment_index(&model.segments()[s].id), Some(s));
    }
    for c in 0..model.categories().len() {
        let owner = model.owner_of(c);
        assert!(model.segments()[owner].direct_categories.contains(&c));
    }
    let _ = (model.cloud_macs_total(), model.cloud_params_total());
    let plan = match model.plan(&TaskSpec::default()) {
        Ok(plan) => plan,
        Err(e) => panic!("a valid model has no all-categories plan: {e}"),
    };
    assert_eq!(plan.relevant.len(), model.categories().len());
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    spotlight_fuzz::mutate_json(data, size, max_size, seed)
});
