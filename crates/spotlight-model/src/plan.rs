//! Cutout plans: which segments a task needs, what they cost, and how their outputs merge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Model, ModelError};

/// What the cloud should care about, as operators write it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// Relevant category names; empty means every category.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Top-down gains by category name or segment id; absent means 1.
    #[serde(default)]
    pub gains: BTreeMap<String, f32>,
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
    pub fn plan(&self, task: &TaskSpec) -> Result<Plan, ModelError> {
        let n = self.categories().len();
        let mut relevant = vec![task.categories.is_empty(); n];
        for name in &task.categories {
            let c = self
                .category_index(name)
                .ok_or_else(|| ModelError::UnknownCategory {
                    name: name.clone(),
                    known: self.category_list(),
                })?;
            relevant[c] = true;
        }
        let mut segment_gain = vec![1.0f32; self.segments().len()];
        let mut category_gain = vec![1.0f32; n];
        for (name, &gain) in &task.gains {
            if !gain.is_finite() || gain < 0.0 {
                return Err(ModelError::BadGain {
                    name: name.clone(),
                    gain,
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
        // A gain of 0 cuts out: a category whose own gain, or any gain on its path, is 0.
        for (c, keep) in relevant.iter_mut().enumerate() {
            if !*keep {
                continue;
            }
            let mut s = Some(self.owner_of(c));
            let mut path_gain = category_gain[c];
            while let Some(i) = s {
                path_gain *= segment_gain[i];
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
    /// plan's relevant categories. Errors name the first relevant category with no logit.
    pub fn merge(&self, plan: &Plan, logits: &[f32]) -> Result<Scores, usize> {
        let mut adjusted = Vec::with_capacity(plan.relevant.len());
        for (&c, &g) in plan.relevant.iter().zip(&plan.log_gains) {
            let z = logits.get(c).copied().unwrap_or(f32::NAN);
            if z.is_nan() {
                return Err(c);
            }
            adjusted.push((c, z, z + g));
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
        scores.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
        Ok(Scores { scores })
    }
}

#[cfg(test)]
mod tests;
