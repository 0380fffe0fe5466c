//! Cutout plans: which segments a task needs, what they cost, and how their outputs merge.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{Model, ModelError};

/// Largest gain a task may set (category or segment). Gains beyond it only saturate: a
/// category gain of 1000 already shifts its logit by ln(1000) ≈ 6.9.
pub const MAX_GAIN: f32 = 1000.0;

/// Largest product of the segment gains along one path of the tree (root to leaf). Segment
/// gains multiply features inside the network, so their product scales the activations
/// of the deepest segment: with feature values bounded by `spotlight_codec::MAX_ABS_VALUE`
/// (1e4), activations stay within 1e4 × 1e4 = 1e8 of the shipped model's, which first
/// overflows f32 (non-finite logits) at about 1e17 (measured, see docs/reliability.md).
pub const MAX_PATH_GAIN: f64 = 1.0e4;

/// Longest category name or gain key accepted, in bytes (the shipped names have ≤ 11).
pub const MAX_NAME_LEN: usize = 128;

/// What the cloud should care about, as operators write it. Read only from an object
/// (`{"categories": [...], "gains": {...}}`): serde's derive would also take a sequence,
/// so that `[]` read as the all-categories task.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TaskSpec {
    /// Relevant category names; empty means every category.
    pub categories: Vec<String>,
    /// Top-down gains by category name or segment id; absent means 1. A key given twice
    /// is refused, not silently overwritten.
    pub gains: BTreeMap<String, f32>,
}

impl<'de> Deserialize<'de> for TaskSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const FIELDS: &[&str] = &["categories", "gains"];
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TaskSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a task object like {\"categories\": [...], \"gains\": {...}}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TaskSpec, A::Error> {
                let (mut categories, mut gains) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "categories" if categories.is_none() => {
                            categories = Some(map.next_value::<Vec<String>>()?);
                        }
                        "gains" if gains.is_none() => {
                            gains = Some(map.next_value::<UniqueGains>()?.0);
                        }
                        "categories" => {
                            return Err(serde::de::Error::duplicate_field("categories"));
                        }
                        "gains" => return Err(serde::de::Error::duplicate_field("gains")),
                        other => return Err(serde::de::Error::unknown_field(other, FIELDS)),
                    }
                }
                Ok(TaskSpec {
                    categories: categories.unwrap_or_default(),
                    gains: gains.unwrap_or_default(),
                })
            }
        }
        // As a struct, so that a `#[serde(flatten)]` around it takes these fields.
        d.deserialize_struct("TaskSpec", FIELDS, Visitor)
    }
}

/// Gains read from an object, refusing a key given twice (serde keeps the last by default).
struct UniqueGains(BTreeMap<String, f32>);

impl<'de> Deserialize<'de> for UniqueGains {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueGains;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of gains by category name or segment id")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueGains, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((key, gain)) = map.next_entry::<String, f32>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "gain for \"{}\" is given twice",
                            shorten(&key)
                        )));
                    }
                    out.insert(key, gain);
                }
                Ok(UniqueGains(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// A name as error messages quote it: at most `MAX_NAME_LEN` bytes.
fn shorten(name: &str) -> String {
    if name.len() <= MAX_NAME_LEN {
        return name.to_string();
    }
    let mut end = MAX_NAME_LEN;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end])
}

/// Why a frame's logits could not be merged into scores.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    /// A relevant category has no logit (no worker answered it).
    #[error("no logit for category {0}")]
    Missing(usize),
    /// A logit, its gain offset or the resulting score is not finite.
    #[error("category {category}: logit {logit} with gain offset {log_gain} gives no finite score")]
    NonFinite {
        category: usize,
        logit: f32,
        log_gain: f32,
    },
}

/// A task resolved against a model: what runs and how outputs are merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Relevant category indices, ascending (categories cut out by a gain of 0 removed).
    pub relevant: Vec<usize>,
    /// Additive logit offset per relevant category: `ln(category gain)`.
    pub log_gains: Vec<f32>,
    /// Segment indices to run, parents before children.
    pub segments: Vec<usize>,
    /// Gain fed to each segment in `segments`.
    pub segment_gains: Vec<f32>,
    /// Cloud MACs per frame under this plan.
    pub cloud_macs: u64,
    /// Cloud MACs per frame saved versus running every segment.
    pub cloud_macs_saved: u64,
    /// Cloud parameters the plan touches.
    pub cloud_params: u64,
}

/// One category's merged score.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryScore {
    pub index: usize,
    pub score: f32,
    pub logit: f32,
}

/// Merged prediction for one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// Relevant categories, best first.
    pub scores: Vec<CategoryScore>,
}

impl Scores {
    /// The predicted category index.
    pub fn top(&self) -> Option<usize> {
        self.scores.first().map(|s| s.index)
    }
}

impl Model {
    /// Resolves a task: validates names and gains, then computes the cutout plan.
    ///
    /// Limits: each category at most once (so at most as many as the model has), at most one
    /// gain per category and segment, names of at most [`MAX_NAME_LEN`] bytes, gains finite
    /// in [0, [`MAX_GAIN`]], and segment gains multiplying to at most [`MAX_PATH_GAIN`]
    /// along any path of the tree.
    pub fn plan(&self, task: &TaskSpec) -> Result<Plan, ModelError> {
        let n = self.categories().len();
        let nseg = self.segments().len();
        if task.categories.len() > n {
            return Err(ModelError::BadTask(format!(
                "task lists {} categories; the model has {n}, each may be listed once",
                task.categories.len()
            )));
        }
        if task.gains.len() > n + nseg {
            return Err(ModelError::BadTask(format!(
                "task has {} gains; at most {} (one per category or segment)",
                task.gains.len(),
                n + nseg
            )));
        }
        for name in task.categories.iter().chain(task.gains.keys()) {
            if name.len() > MAX_NAME_LEN {
                return Err(ModelError::BadTask(format!(
                    "name \"{}\" is {} bytes; names are at most {MAX_NAME_LEN}",
                    shorten(name),
                    name.len()
                )));
            }
        }
        let mut relevant = vec![task.categories.is_empty(); n];
        for name in &task.categories {
            let c = self
                .category_index(name)
                .ok_or_else(|| ModelError::UnknownCategory {
                    name: name.clone(),
                    known: self.category_list(),
                })?;
            if relevant[c] {
                return Err(ModelError::BadTask(format!(
                    "category \"{name}\" is listed twice"
                )));
            }
            relevant[c] = true;
        }
        let mut segment_gain = vec![1.0f32; nseg];
        let mut category_gain = vec![1.0f32; n];
        for (name, &gain) in &task.gains {
            if !gain.is_finite() || !(0.0..=MAX_GAIN).contains(&gain) {
                return Err(ModelError::BadGain {
                    name: name.clone(),
                    gain,
                    max: MAX_GAIN,
                });
            }
            if let Some(c) = self.category_index(name) {
                category_gain[c] = gain;
            } else if let Some(s) = self.segment_index(name) {
                segment_gain[s] = gain;
            } else {
                return Err(ModelError::UnknownGainTarget {
                    name: name.clone(),
                    categories: self.category_list(),
                    segments: self
                        .segments()
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        // Segment gains multiply features on the way down: bound their product per path.
        for leaf in (0..nseg).filter(|&s| self.segments()[s].children.is_empty()) {
            let mut path = Vec::new();
            let mut s = Some(leaf);
            while let Some(i) = s {
                path.push(i);
                s = self.parent_of(i);
            }
            let product: f64 = path.iter().map(|&i| f64::from(segment_gain[i])).product();
            if product > MAX_PATH_GAIN {
                let ids: Vec<String> = path
                    .iter()
                    .rev()
                    .map(|&i| format!("{}={}", self.segments()[i].id, segment_gain[i]))
                    .collect();
                return Err(ModelError::BadTask(format!(
                    "segment gains along {} multiply to {product}; at most {MAX_PATH_GAIN} \
                     (the features would overflow)",
                    ids.join(" → ")
                )));
            }
        }
        // A gain of 0 cuts out: a category whose own gain, or any gain on its path, is 0.
        // The product is taken in f64 so that small gains do not underflow to a cut-out.
        for (c, keep) in relevant.iter_mut().enumerate() {
            if !*keep {
                continue;
            }
            let mut s = Some(self.owner_of(c));
            let mut path_gain = f64::from(category_gain[c]);
            while let Some(i) = s {
                path_gain *= f64::from(segment_gain[i]);
                s = self.parent_of(i);
            }
            if path_gain == 0.0 {
                *keep = false;
            }
        }
        let relevant: Vec<usize> = (0..n).filter(|&c| relevant[c]).collect();
        if relevant.is_empty() {
            return Err(ModelError::EmptyTask);
        }
        let mut needed = vec![false; self.segments().len()];
        for &c in &relevant {
            let mut s = Some(self.owner_of(c));
            while let Some(i) = s {
                needed[i] = true;
                s = self.parent_of(i);
            }
        }
        let segments: Vec<usize> = (0..needed.len()).filter(|&i| needed[i]).collect();
        let segment_gains = segments.iter().map(|&i| segment_gain[i]).collect();
        let cloud_macs: u64 = segments.iter().map(|&i| self.segments()[i].macs).sum();
        let cloud_params = segments.iter().map(|&i| self.segments()[i].params).sum();
        let log_gains = relevant.iter().map(|&c| category_gain[c].ln()).collect();
        Ok(Plan {
            relevant,
            log_gains,
            segments,
            segment_gains,
            cloud_macs,
            cloud_macs_saved: self.cloud_macs_total() - cloud_macs,
            cloud_params,
        })
    }

    /// Merges per-category logits (NaN where missing) into normalised scores over the
    /// plan's relevant categories. Errors name the first relevant category with no logit,
    /// or with a logit or gain that would make any score non-finite: a merge never returns
    /// a NaN score.
    pub fn merge(&self, plan: &Plan, logits: &[f32]) -> Result<Scores, MergeError> {
        let mut adjusted = Vec::with_capacity(plan.relevant.len());
        for (&c, &g) in plan.relevant.iter().zip(&plan.log_gains) {
            let z = logits.get(c).copied().unwrap_or(f32::NAN);
            if z.is_nan() {
                return Err(MergeError::Missing(c));
            }
            let a = z + g;
            if !a.is_finite() {
                return Err(MergeError::NonFinite {
                    category: c,
                    logit: z,
                    log_gain: g,
                });
            }
            adjusted.push((c, z, a));
        }
        let max = adjusted
            .iter()
            .map(|a| a.2)
            .fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = adjusted
            .iter()
            .map(|a| f64::from(a.2 - max).exp())
            .collect();
        let sum: f64 = exps.iter().sum();
        let mut scores: Vec<CategoryScore> = adjusted
            .iter()
            .zip(&exps)
            .map(|(&(index, logit, _), &e)| CategoryScore {
                index,
                score: (e / sum) as f32,
                logit,
            })
            .collect();
        if let Some(bad) = scores.iter().find(|s| !s.score.is_finite()) {
            let g = plan.relevant.iter().position(|&c| c == bad.index);
            return Err(MergeError::NonFinite {
                category: bad.index,
                logit: bad.logit,
                log_gain: g.map(|i| plan.log_gains[i]).unwrap_or(f32::NAN),
            });
        }
        scores.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        Ok(Scores { scores })
    }
}

#[cfg(test)]
mod tests;
