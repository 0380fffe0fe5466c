use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ModelError;

/// The current manifest schema version: what the exporter writes.
pub const SCHEMA: &str = "spotlight.model/v2";

/// Every schema version this reader accepts. A package of any other version is refused with
/// [`ModelError::UnsupportedSchema`], before anything else of it is read: a new version is
/// one whose meaning an older reader cannot know (see `docs/model-package.md`, "Schema
/// versions").
pub const SUPPORTED_SCHEMAS: &[&str] = &[SCHEMA];

/// `manifest.json` of a model package (see `docs/model-package.md`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// One of [`SUPPORTED_SCHEMAS`].
    pub schema: String,
    /// Model name.
    pub name: String,
    /// `sha256:<hex>` of the canonical manifest without this field (see
    /// [`crate::content_hash`]); the identity peers compare.
    pub content_hash: String,
    /// Every file of the package the runtime reads, by relative path, with its
    /// `sha256:<hex>` digest.
    pub files: BTreeMap<String, String>,
    /// How a segment's gain enters the network.
    pub gain: GainSpec,
    /// Image input and preprocessing.
    pub input: InputSpec,
    /// Category names; the index is the class id.
    pub categories: Vec<String>,
    /// The edge part.
    pub backbone: BackboneSpec,
    /// The high-level segments, parents before children.
    pub segments: Vec<SegmentSpec>,
    /// Optional: top-level segments fused with their whole subtree into one graph each, for
    /// workers that run the whole subtree for a batch (one ONNX Runtime run instead of one
    /// per segment; the same arithmetic). Readers that ignore them run the segments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<BranchSpec>,
    /// The monolithic graph.
    pub full: FullSpec,
}

/// A top-level segment and every segment under it as one graph: features and one gain per
/// segment in, the logits of each segment that scores categories out.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchSpec {
    /// The top-level segment's id.
    pub id: String,
    /// ONNX file, relative to the package.
    pub file: String,
    /// The features input (the backbone's output).
    pub input: String,
    /// `[N, segments.len()]` gains, columns in `segments` order.
    pub gains_input: String,
    /// The top-level segment and its whole subtree, in manifest order.
    pub segments: Vec<String>,
    /// Output name of the logits of each segment that has direct categories.
    pub logits_outputs: BTreeMap<String, String>,
}

/// Image input and its normalisation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputSpec {
    /// Input tensor name.
    pub name: String,
    /// NCHW shape, `-1` for the batch axis.
    pub shape: Vec<i64>,
    /// Element type; only `float32` is supported.
    pub dtype: String,
    /// `gray` or `rgb`.
    pub color: String,
    /// Pixels are divided by this first.
    pub scale: f32,
    /// Per-channel mean subtracted after scaling.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by last.
    pub std: Vec<f32>,
}

impl InputSpec {
    /// (channels, height, width).
    pub fn chw(&self) -> (usize, usize, usize) {
        let d = |i: usize| self.shape.get(i).copied().unwrap_or(1).max(1) as usize;
        (d(1), d(2), d(3))
    }
}

/// The backbone graph.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackboneSpec {
    pub file: String,
    pub input: String,
    pub output: String,
    pub output_shape: Vec<i64>,
    /// `[low, high]`: every value of the output lies in it (the bottleneck's activation
    /// bounds it; codecs may rely on it).
    pub output_range: [f32; 2],
    pub params: u64,
    pub macs: u64,
}

/// What a segment's gain input does, as the package declares it. The coordinator relies on
/// each of these: it cuts out a segment whose gain is 0 instead of running it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GainSpec {
    /// What the gain multiplies.
    pub multiplies: GainTarget,
    /// Gain 0 on a segment gives the same prediction as cutting the segment and its subtree
    /// out; must be `true`.
    pub zero_is_cutout: bool,
    /// What a gain does to the logits under its segment.
    pub logit_effect: LogitEffect,
}

/// Where a gain enters a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GainTarget {
    /// The segment's output features: what its head scores and its children read.
    SegmentOutput,
}

/// What a gain does to the logits of the categories under its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogitEffect {
    /// Adds exactly `ln(gain)` to each of them (a positively homogeneous subtree and head):
    /// the gain is a log-prior on the group, it cannot reorder categories inside it.
    AddsLogGain,
}

/// A named tensor with its shape.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<i64>,
}

/// One high-level segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentSpec {
    /// Unique id; nested ids are `parent.child`.
    pub id: String,
    /// Parent segment id; `None` reads the backbone output.
    pub parent: Option<String>,
    /// Child segment ids.
    pub children: Vec<String>,
    /// ONNX file, relative to the package.
    pub file: String,
    /// Features input.
    pub input: TensorSpec,
    /// Name of the `[N, 1]` gain input.
    pub gain_input: String,
    /// Gained high-level features, read by the children.
    pub features_output: Option<TensorSpec>,
    /// Logits of the direct categories.
    pub logits_output: Option<TensorSpec>,
    /// Category indices scored here, in logit column order.
    pub direct_categories: Vec<usize>,
    /// Every category index under this segment.
    pub categories: Vec<usize>,
    pub params: u64,
    pub macs: u64,
}

/// The monolithic graph, for equivalence checks and baselines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FullSpec {
    pub file: String,
    pub input: String,
    pub gains_input: String,
    pub output: String,
}

impl Manifest {
    /// Reads `dir/manifest.json`, refusing a schema version this reader does not accept
    /// before looking at anything else (no integrity check: see [`crate::Model::load`]).
    pub fn read(dir: &Path) -> Result<Self, ModelError> {
        Self::read_raw(dir).map(|(manifest, _)| manifest)
    }

    /// [`Manifest::read`], also returning the text of `manifest.json`, which the content hash
    /// is computed over.
    pub fn read_raw(dir: &Path) -> Result<(Self, String), ModelError> {
        let path = dir.join("manifest.json");
        let io = |source| ModelError::Io {
            path: path.clone(),
            source,
        };
        let text = std::fs::read(&path).map_err(io)?;
        let text = String::from_utf8(text)
            .map_err(|e| io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        let json = |source| ModelError::Json {
            path: path.clone(),
            source,
        };
        let raw: Value = serde_json::from_str(&text).map_err(json)?;
        check_schema(raw.get("schema").and_then(Value::as_str))?;
        let manifest = Self::deserialize(&raw).map_err(json)?;
        Ok((manifest, text))
    }

    /// Parses manifest JSON without validating it (see [`Manifest::validate`]).
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// Checks the schema version and the consistency of the tree.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |m: String| Err(ModelError::Invalid(m));
        check_schema(Some(&self.schema))?;
        if !self.gain.zero_is_cutout {
            return bad(
                "gain.zero_is_cutout is false, but the coordinator cuts out a segment whose gain is 0"
                    .into(),
            );
        }
        let [low, high] = self.backbone.output_range;
        if !(low.is_finite() && high.is_finite() && low < high) {
            return bad(format!(
                "backbone output_range {:?} is not a finite [low, high] with low < high",
                self.backbone.output_range
            ));
        }
        if self.input.dtype != "float32" {
            return bad(format!(
                "input dtype \"{}\" is not supported; expected float32",
                self.input.dtype
            ));
        }
        if self.input.shape.len() != 4 {
            return bad(format!("input shape {:?} is not NCHW", self.input.shape));
        }
        let (c, _, _) = self.input.chw();
        if self.input.mean.len() != c || self.input.std.len() != c {
            return bad(format!(
                "input has {c} channels but mean/std have {}/{} values",
                self.input.mean.len(),
                self.input.std.len()
            ));
        }
        if !matches!(self.input.color.as_str(), "gray" | "rgb") {
            return bad(format!(
                "input color \"{}\" is not gray or rgb",
                self.input.color
            ));
        }
        let n = self.categories.len();
        if n == 0 {
            return bad("no categories".into());
        }
        // Every tensor shape starts with the batch axis; the checks below and
        // `Model::feature_len` take the dimensions after it.
        if self.backbone.output_shape.is_empty() {
            return bad("backbone output shape is empty; expected a batch axis first".into());
        }
        for s in &self.segments {
            let tensors = [
                Some(&s.input),
                s.features_output.as_ref(),
                s.logits_output.as_ref(),
            ];
            if let Some(t) = tensors.into_iter().flatten().find(|t| t.shape.is_empty()) {
                return bad(format!(
                    "segment \"{}\" tensor \"{}\" has an empty shape; expected a batch axis first",
                    s.id, t.name
                ));
            }
        }
        // `Model::feature_len` and the cost totals must not overflow.
        let values = self.backbone.output_shape[1..]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d.max(1) as usize));
        if values.is_none() {
            return bad(format!(
                "backbone output shape {:?} has more values than fit in memory",
                self.backbone.output_shape
            ));
        }
        let total = |f: fn(&SegmentSpec) -> u64| {
            self.segments
                .iter()
                .try_fold(0u64, |t, s| t.checked_add(f(s)))
        };
        if total(|s| s.macs).is_none() || total(|s| s.params).is_none() {
            return bad("segment MACs or parameters add up to more than 2^64".into());
        }
        let mut seen = HashSet::new();
        let mut scored = vec![false; n];
        for (i, s) in self.segments.iter().enumerate() {
            if !seen.insert(s.id.as_str()) {
                return bad(format!("segment id \"{}\" appears twice", s.id));
            }
            match &s.parent {
                None => {
                    if s.input.shape[1..] != self.backbone.output_shape[1..] {
                        return bad(format!(
                            "segment \"{}\" input shape {:?} does not match the backbone output {:?}",
                            s.id, s.input.shape, self.backbone.output_shape
                        ));
                    }
                }
                Some(p) => {
                    let Some(parent) = self.segments[..i].iter().find(|q| &q.id == p) else {
                        return bad(format!(
                            "segment \"{}\" has parent \"{p}\" that is not listed before it",
                            s.id
                        ));
                    };
                    if !parent.children.contains(&s.id) {
                        return bad(format!("segment \"{p}\" does not list child \"{}\"", s.id));
                    }
                    match &parent.features_output {
                        Some(f) if f.shape[1..] == s.input.shape[1..] => {}
                        _ => {
                            return bad(format!(
                                "segment \"{}\" input does not match the features output of \"{p}\"",
                                s.id
                            ));
                        }
                    }
                }
            }
            for child in &s.children {
                if !self
                    .segments
                    .iter()
                    .any(|q| &q.id == child && q.parent.as_deref() == Some(s.id.as_str()))
                {
                    return bad(format!(
                        "segment \"{}\" lists child \"{child}\" that does not name it as parent",
                        s.id
                    ));
                }
            }
            match (&s.logits_output, s.direct_categories.is_empty()) {
                (Some(l), false)
                    if l.shape.get(1).copied() == Some(s.direct_categories.len() as i64) => {}
                (None, true) => {}
                _ => {
                    return bad(format!(
                        "segment \"{}\" logits output does not match its {} direct categories",
                        s.id,
                        s.direct_categories.len()
                    ));
                }
            }
            for &c in &s.direct_categories {
                if c >= n {
                    return bad(format!(
                        "segment \"{}\" scores category {c}, but there are only {n}",
                        s.id
                    ));
                }
                if std::mem::replace(&mut scored[c], true) {
                    return bad(format!("category {c} is scored by more than one segment"));
                }
            }
        }
        if let Some(c) = scored.iter().position(|s| !s) {
            return bad(format!(
                "category \"{}\" is scored by no segment",
                self.categories[c]
            ));
        }
        let mut fused = HashSet::new();
        for b in &self.branches {
            let subtree: Vec<&str> = self
                .segments
                .iter()
                .filter(|s| s.id == b.id || s.id.starts_with(&format!("{}.", b.id)))
                .map(|s| s.id.as_str())
                .collect();
            let top_level = self
                .segments
                .iter()
                .any(|s| s.id == b.id && s.parent.is_none());
            if !top_level || b.segments != subtree || !fused.insert(b.id.as_str()) {
                return bad(format!(
                    "branch \"{}\" must be a top-level segment listed once, with its whole subtree in manifest order ({subtree:?}), not {:?}",
                    b.id, b.segments
                ));
            }
            let mut scoring: Vec<&str> = self
                .segments
                .iter()
                .filter(|s| subtree.contains(&s.id.as_str()) && s.logits_output.is_some())
                .map(|s| s.id.as_str())
                .collect();
            scoring.sort_unstable();
            if !b
                .logits_outputs
                .keys()
                .map(String::as_str)
                .eq(scoring.iter().copied())
            {
                return bad(format!(
                    "branch \"{}\" must name a logits output for exactly {scoring:?}",
                    b.id
                ));
            }
        }
        Ok(())
    }
}

/// Refuses a schema version not in [`SUPPORTED_SCHEMAS`] (or none).
fn check_schema(found: Option<&str>) -> Result<(), ModelError> {
    match found {
        Some(v) if SUPPORTED_SCHEMAS.contains(&v) => Ok(()),
        other => Err(ModelError::UnsupportedSchema {
            found: other.map_or_else(|| "none".into(), |v| format!("\"{v}\"")),
            accepted: SUPPORTED_SCHEMAS.join(", "),
        }),
    }
}
