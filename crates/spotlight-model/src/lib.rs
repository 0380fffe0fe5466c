//! The model package: manifest, segment tree, cutout plans, cost accounting and merge. Pure:
//! no ONNX Runtime here (that is `spotlight-runtime`), so the coordinator does not link it.
//!
//! The on-disk format is documented in `docs/model-package.md`.

mod error;
mod integrity;
mod manifest;
mod plan;
mod preprocess;

pub use error::ModelError;
pub use integrity::{canonical_json, content_hash, sha256_digest, verify_package};
pub use manifest::{
    BackboneSpec, BranchSpec, FullSpec, GainSpec, GainTarget, InputSpec, LogitEffect, Manifest,
    SCHEMA, SUPPORTED_SCHEMAS, SegmentSpec, TensorSpec,
};
pub use plan::{
    CategoryScore, MAX_GAIN, MAX_NAME_LEN, MAX_PATH_GAIN, MergeError, Plan, Scores, TaskSpec,
};
pub use preprocess::preprocess;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A loaded, validated model package.
#[derive(Debug, Clone)]
pub struct Model {
    dir: PathBuf,
    manifest: Manifest,
    segment_index: HashMap<String, usize>,
    category_index: HashMap<String, usize>,
    /// For each category, the segment that scores it directly.
    owner: Vec<usize>,
}

impl Model {
    /// Loads `dir/manifest.json`: refuses an unsupported schema version, checks the content
    /// hash over the manifest and the digest of every file ([`verify_package`]), then
    /// validates the tree.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self, ModelError> {
        let dir = dir.as_ref().to_path_buf();
        let (manifest, raw) = Manifest::read_raw(&dir)?;
        verify_package(&dir, &raw, &manifest)?;
        Self::from_manifest(dir, manifest)
    }

    /// Builds the model from an already parsed manifest (no hash or file check).
    pub fn from_manifest(dir: PathBuf, manifest: Manifest) -> Result<Self, ModelError> {
        manifest.validate()?;
        let segment_index = manifest
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.clone(), i))
            .collect();
        let category_index = manifest
            .categories
            .iter()
            .enumerate()
            .map(|(i, c)| (c.clone(), i))
            .collect();
        let mut owner = vec![usize::MAX; manifest.categories.len()];
        for (i, s) in manifest.segments.iter().enumerate() {
            for &c in &s.direct_categories {
                owner[c] = i;
            }
        }
        Ok(Self {
            dir,
            manifest,
            segment_index,
            category_index,
            owner,
        })
    }

    /// The package directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The parsed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Model name.
    pub fn name(&self) -> &str {
        &self.manifest.name
    }

    /// Content hash (`sha256:…`).
    pub fn hash(&self) -> &str {
        &self.manifest.content_hash
    }

    /// Category names, by index.
    pub fn categories(&self) -> &[String] {
        &self.manifest.categories
    }

    /// Segments, parents before children.
    pub fn segments(&self) -> &[SegmentSpec] {
        &self.manifest.segments
    }

    /// Index of a segment id.
    pub fn segment_index(&self, id: &str) -> Option<usize> {
        self.segment_index.get(id).copied()
    }

    /// Index of a category name.
    pub fn category_index(&self, name: &str) -> Option<usize> {
        self.category_index.get(name).copied()
    }

    /// The segment that scores category `c` directly.
    pub fn owner_of(&self, c: usize) -> usize {
        self.owner[c]
    }

    /// Index of the top-level segment above segment `s` (itself if top-level).
    pub fn root_of(&self, mut s: usize) -> usize {
        while let Some(p) = self.parent_of(s) {
            s = p;
        }
        s
    }

    /// Parent segment index.
    pub fn parent_of(&self, s: usize) -> Option<usize> {
        self.manifest.segments[s]
            .parent
            .as_deref()
            .and_then(|p| self.segment_index(p))
    }

    /// Sum of MACs of every segment: the cloud cost with everything active.
    pub fn cloud_macs_total(&self) -> u64 {
        self.manifest.segments.iter().map(|s| s.macs).sum()
    }

    /// Sum of parameters of every segment.
    pub fn cloud_params_total(&self) -> u64 {
        self.manifest.segments.iter().map(|s| s.params).sum()
    }

    /// Number of values in one backbone output (batch of one).
    pub fn feature_len(&self) -> usize {
        self.manifest.backbone.output_shape[1..]
            .iter()
            .map(|&d| d.max(1) as usize)
            .product()
    }

    /// Backbone output shape for a batch of `n`.
    pub fn feature_shape(&self, n: usize) -> Vec<i64> {
        let mut shape = self.manifest.backbone.output_shape.clone();
        shape[0] = n as i64;
        shape
    }

    /// Comma-separated category names, for error messages.
    pub fn category_list(&self) -> String {
        self.manifest.categories.join(", ")
    }

    /// Path of a file of the package.
    pub fn path_of(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}
