//! Run statistics: counts, accuracy overall and per task version, throughput, latency
//! percentiles, bytes on the wire and cloud cost.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::record::Record;

/// Statistics of the predictions made under one task version.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VersionStats {
    /// Predictions stamped with this version.
    pub predictions: u64,
    /// Of those, frames whose known label is among the task's relevant categories.
    pub relevant_labelled: u64,
    /// Of those, correct predictions.
    pub correct: u64,
    /// Sum of cloud MACs spent.
    pub cloud_macs: u64,
}

impl VersionStats {
    /// Accuracy on relevant labelled frames.
    pub fn accuracy(&self) -> Option<f64> {
        ratio(self.correct, self.relevant_labelled)
    }

    /// Mean cloud MACs per prediction.
    pub fn mean_cloud_macs(&self) -> Option<f64> {
        ratio(self.cloud_macs, self.predictions)
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Inputs that got a record (prediction or error).
    pub frames: u64,
    /// Predictions.
    pub predictions: u64,
    /// Errors.
    pub errors: u64,
    /// Predictions whose label is known and relevant to the task that answered them.
    pub labelled: u64,
    /// Of those, correct.
    pub correct: u64,
    /// Per task version.
    pub per_version: BTreeMap<u64, VersionStats>,
    /// From the start of the pipeline to the last record.
    pub elapsed_s: f64,
    /// Backbone start to prediction, median.
    pub latency_p50_ms: Option<f64>,
    /// Backbone start to prediction, 99th percentile.
    pub latency_p99_ms: Option<f64>,
    /// Mean feature payload per frame sent.
    pub mean_bytes: Option<f64>,
    /// Cloud MACs with every segment active (sum over the manifest's segments).
    pub cloud_macs_all_active: u64,
}

impl Summary {
    /// Accuracy over all versions, on labelled relevant frames.
    pub fn accuracy(&self) -> Option<f64> {
        ratio(self.correct, self.labelled)
    }

    /// Records per second.
    pub fn frames_per_sec(&self) -> f64 {
        if self.elapsed_s > 0.0 {
            self.frames as f64 / self.elapsed_s
        } else {
            0.0
        }
    }
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Nearest-rank percentile of `sorted` (ascending), `p` in `0..=100`.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Accumulates records into a [`Summary`].
#[derive(Debug, Default)]
pub struct SummaryBuilder {
    summary: Summary,
    latencies_ms: Vec<f64>,
    bytes_total: u64,
    bytes_frames: u64,
}

impl SummaryBuilder {
    pub fn new(cloud_macs_all_active: u64) -> Self {
        Self {
            summary: Summary {
                cloud_macs_all_active,
                ..Summary::default()
            },
            ..Self::default()
        }
    }

    /// Counts one record.
    pub fn record(&mut self, r: &Record) {
        let s = &mut self.summary;
        s.frames += 1;
        if let Some(b) = r.bytes {
            self.bytes_total += b as u64;
            self.bytes_frames += 1;
        }
        let p = match &r.outcome {
            Ok(p) => p,
            Err(_) => {
                s.errors += 1;
                return;
            }
        };
        s.predictions += 1;
        if let Some(l) = r.latency {
            self.latencies_ms.push(l.as_secs_f64() * 1e3);
        }
        let v = s.per_version.entry(p.task_version).or_default();
        v.predictions += 1;
        v.cloud_macs += p.cloud_macs;
        if let Some((label, _)) = r.label
            && p.is_relevant(label)
        {
            let correct = u64::from(p.top_index as usize == label);
            v.relevant_labelled += 1;
            v.correct += correct;
            s.labelled += 1;
            s.correct += correct;
        }
    }

    /// The summary so far.
    pub fn finish(&self, elapsed: Duration) -> Summary {
        let mut lat = self.latencies_ms.clone();
        lat.sort_by(f64::total_cmp);
        Summary {
            elapsed_s: elapsed.as_secs_f64(),
            latency_p50_ms: percentile(&lat, 50.0),
            latency_p99_ms: percentile(&lat, 99.0),
            mean_bytes: ratio(self.bytes_total, self.bytes_frames),
            ..self.summary.clone()
        }
    }
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}{unit}"))
}

fn pct(v: Option<f64>) -> String {
    opt(v.map(|a| a * 100.0), 2, "%")
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "frames {}  predictions {}  errors {}  accuracy {} ({} labelled)",
            self.frames,
            self.predictions,
            self.errors,
            pct(self.accuracy()),
            self.labelled
        )?;
        writeln!(
            f,
            "throughput {:.1} frames/s  latency p50 {}  p99 {}  mean bytes/frame {}",
            self.frames_per_sec(),
            opt(self.latency_p50_ms, 2, " ms"),
            opt(self.latency_p99_ms, 2, " ms"),
            opt(self.mean_bytes, 0, ""),
        )?;
        for (version, v) in &self.per_version {
            let share = v
                .mean_cloud_macs()
                .filter(|_| self.cloud_macs_all_active > 0)
                .map(|m| m / self.cloud_macs_all_active as f64);
            writeln!(
                f,
                "task v{version}: predictions {}  accuracy {} ({} relevant labelled)  cloud MACs/frame {} of {} all-active ({})",
                v.predictions,
                pct(v.accuracy()),
                v.relevant_labelled,
                opt(v.mean_cloud_macs(), 0, ""),
                self.cloud_macs_all_active,
                pct(share),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{CloudPrediction, FrameFailure, Score};

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[3.0], 99.0), Some(3.0));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50.0), Some(2.0));
    }

    fn rec(version: u64, label: Option<usize>, top: u32, relevant: &[u32], macs: u64) -> Record {
        Record {
            seq: 0,
            item: "i".into(),
            label: label.map(|l| (l, format!("c{l}"))),
            outcome: Ok(CloudPrediction {
                task_version: version,
                top_index: top,
                top_name: format!("c{top}"),
                scores: relevant
                    .iter()
                    .map(|&i| Score {
                        index: i,
                        name: format!("c{i}"),
                        score: 0.5,
                    })
                    .collect(),
                segments_run: vec![],
                cloud_macs: macs,
                cloud_macs_saved: 0,
            }),
            latency: Some(Duration::from_millis(10)),
            bytes: Some(392),
        }
    }

    #[test]
    fn accuracy_per_version_counts_only_relevant_labels() {
        let mut b = SummaryBuilder::new(1000);
        // v1: all categories relevant; 2 of 3 correct.
        b.record(&rec(1, Some(0), 0, &[0, 1, 2], 1000));
        b.record(&rec(1, Some(1), 1, &[0, 1, 2], 1000));
        b.record(&rec(1, Some(2), 0, &[0, 1, 2], 1000));
        // v2: only 0 and 1 relevant; label 2 is not counted; 1 of 2 correct.
        b.record(&rec(2, Some(0), 0, &[0, 1], 400));
        b.record(&rec(2, Some(1), 0, &[0, 1], 400));
        b.record(&rec(2, Some(2), 1, &[0, 1], 400));
        b.record(&rec(2, None, 1, &[0, 1], 400));
        let mut err = rec(2, Some(0), 0, &[], 0);
        err.outcome = Err(FrameFailure::new(14, "down"));
        err.bytes = None;
        b.record(&err);

        let s = b.finish(Duration::from_secs(2));
        assert_eq!((s.frames, s.predictions, s.errors), (8, 7, 1));
        assert_eq!(s.per_version[&1].accuracy(), Some(2.0 / 3.0));
        assert_eq!(s.per_version[&2].relevant_labelled, 2);
        assert_eq!(s.per_version[&2].accuracy(), Some(0.5));
        assert_eq!(s.per_version[&2].mean_cloud_macs(), Some(400.0));
        assert_eq!((s.labelled, s.correct), (5, 3));
        assert_eq!(s.accuracy(), Some(0.6));
        assert_eq!(s.mean_bytes, Some(392.0));
        assert_eq!(s.frames_per_sec(), 4.0);
        assert_eq!(s.latency_p50_ms, Some(10.0));
        let text = s.to_string();
        assert!(
            text.contains("task v2: predictions 4  accuracy 50.00%"),
            "{text}"
        );
        assert!(text.contains("400 of 1000 all-active (40.00%)"), "{text}");
    }
}
