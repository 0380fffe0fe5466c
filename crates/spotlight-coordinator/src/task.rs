//! The current task: relevant categories and gains, versioned, persisted, watchable.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use spotlight_model::{Model, Plan, TaskSpec};
use tokio::sync::watch;

use crate::cluster::Etcd;
use crate::error::{ApiError, ErrorCode};

/// A task in force, with its resolved plan.
#[derive(Debug, Clone)]
pub struct ActiveTask {
    /// Increases by one with every change.
    pub version: u64,
    /// As the operator wrote it.
    pub spec: TaskSpec,
    /// Resolved against the model.
    pub plan: Plan,
    /// The plan's segments by top-level branch, as sent to workers (computed once per task,
    /// shared by every frame).
    pub groups: Vec<RouteGroup>,
}

/// The segments of one top-level branch that a plan runs: a branch's subtree lives on one
/// worker, so parent features never cross the network.
#[derive(Debug, Clone)]
pub struct RouteGroup {
    /// Segment indices, parents first.
    pub segments: Vec<usize>,
    /// The same segments with their gains, as the worker request carries them.
    pub runs: Arc<[spotlight_proto::v1::SegmentRun]>,
}

impl ActiveTask {
    /// Resolves the routing groups of `plan`.
    pub fn new(model: &Model, version: u64, spec: TaskSpec, plan: Plan) -> Self {
        let mut groups: Vec<(usize, Vec<usize>, Vec<spotlight_proto::v1::SegmentRun>)> = Vec::new();
        for (&s, &gain) in plan.segments.iter().zip(&plan.segment_gains) {
            let root = model.root_of(s);
            let run = spotlight_proto::v1::SegmentRun {
                segment_id: model.segments()[s].id.clone(),
                gain,
            };
            match groups.iter_mut().find(|g| g.0 == root) {
                Some(g) => {
                    g.1.push(s);
                    g.2.push(run);
                }
                None => groups.push((root, vec![s], vec![run])),
            }
        }
        Self {
            version,
            spec,
            plan,
            groups: groups
                .into_iter()
                .map(|(_, segments, runs)| RouteGroup {
                    segments,
                    runs: runs.into(),
                })
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Persisted {
    version: u64,
    #[serde(flatten)]
    spec: TaskSpec,
}

/// Where the task is kept.
enum Store {
    /// In this process, persisted to the file when one is given.
    Local(Option<PathBuf>),
    /// In etcd, shared by every coordinator replica (see `crate::cluster`).
    Shared(Box<Etcd>),
}

/// Holds the task; every change is validated, persisted, then published.
pub struct TaskState {
    model: Arc<Model>,
    store: Store,
    tx: watch::Sender<Arc<ActiveTask>>,
    // Serialises writers so versions and the file stay in step.
    write: tokio::sync::Mutex<()>,
}

impl TaskState {
    /// Loads the task from `state_file` if it exists, else starts at version 1 with every
    /// category relevant.
    pub fn open(model: Arc<Model>, state_file: Option<PathBuf>) -> Result<Self, ApiError> {
        let (version, spec) = match state_file.as_deref().filter(|p| p.exists()) {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ApiError::new(
                        ErrorCode::Internal,
                        format!("cannot read task state {}: {e}", path.display()),
                    )
                })?;
                let p: Persisted = serde_json::from_str(&text).map_err(|e| {
                    ApiError::new(
                        ErrorCode::Internal,
                        format!("invalid task state {}: {e}", path.display()),
                    )
                })?;
                (p.version, p.spec)
            }
            None => (1, TaskSpec::default()),
        };
        let plan = model.plan(&spec).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("task state does not fit model {}: {e}", model.name()),
            )
        })?;
        let (tx, _) = watch::channel(Arc::new(ActiveTask::new(&model, version, spec, plan)));
        Ok(Self {
            model,
            store: Store::Local(state_file),
            tx,
            write: tokio::sync::Mutex::new(()),
        })
    }

    /// Loads the task shared by the replicas from etcd (retrying for up to `wait` while
    /// etcd does not answer); returns it with the store revision to follow changes from
    /// (see [`TaskState::install`]). No task in etcd yet: version 1, every category.
    pub async fn open_shared(
        model: Arc<Model>,
        etcd: Etcd,
        wait: Duration,
    ) -> Result<(Self, i64), ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let (stored, revision) = loop {
            match etcd.read_task().await {
                Ok(r) => break r,
                Err(e)
                    if e.code == ErrorCode::Unavailable
                        && tokio::time::Instant::now() < deadline =>
                {
                    tracing::warn!(error = %e.message, "waiting for etcd");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        let (version, spec) = stored.unwrap_or((1, TaskSpec::default()));
        let plan = model.plan(&spec).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("the task in etcd does not fit model {}: {e}", model.name()),
            )
        })?;
        let (tx, _) = watch::channel(Arc::new(ActiveTask::new(&model, version, spec, plan)));
        let state = Self {
            model,
            store: Store::Shared(Box::new(etcd)),
            tx,
            write: tokio::sync::Mutex::new(()),
        };
        Ok((state, revision))
    }

    /// The shared store, when replicas share the task.
    pub fn etcd(&self) -> Option<&Etcd> {
        match &self.store {
            Store::Shared(etcd) => Some(etcd),
            Store::Local(_) => None,
        }
    }

    /// Installs a task seen in the shared store at `version` (`None`: the task was deleted,
    /// back to every category), unless a task as new is already in force. A stored task
    /// this model cannot plan is logged and skipped.
    pub fn install(&self, version: u64, spec: Option<TaskSpec>) {
        let spec = spec.unwrap_or_default();
        let plan = match self.model.plan(&spec) {
            Ok(plan) => plan,
            Err(e) => {
                tracing::error!(version, error = %e, "ignoring a stored task this model cannot run");
                return;
            }
        };
        self.publish(Arc::new(ActiveTask::new(&self.model, version, spec, plan)));
    }

    /// Puts `task` in force if it is newer than the task in force.
    fn publish(&self, task: Arc<ActiveTask>) {
        let newer = self.tx.send_if_modified(|current| {
            if task.version > current.version {
                *current = task.clone();
                true
            } else {
                false
            }
        });
        if newer {
            tracing::info!(version = task.version, categories = ?task.spec.categories, gains = ?task.spec.gains, "task changed");
        }
    }

    /// The task in force now.
    pub fn current(&self) -> Arc<ActiveTask> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ActiveTask>> {
        self.tx.subscribe()
    }

    /// Validates and installs a new task; it applies from the next frame routed.
    pub async fn set(&self, spec: TaskSpec) -> Result<Arc<ActiveTask>, ApiError> {
        let plan = self.model.plan(&spec).map_err(crate::error::model_error)?;
        let _guard = self.write.lock().await;
        let version = match &self.store {
            Store::Local(file) => {
                let version = self.current().version + 1;
                if let Some(path) = file {
                    persist(
                        path,
                        &Persisted {
                            version,
                            spec: spec.clone(),
                        },
                    )
                    .await?;
                }
                version
            }
            // The write's revision orders it among every replica's changes.
            Store::Shared(etcd) => etcd.write_task(&spec).await?,
        };
        let task = Arc::new(ActiveTask::new(&self.model, version, spec, plan));
        self.publish(task.clone());
        Ok(task)
    }
}

async fn persist(path: &Path, state: &Persisted) -> Result<(), ApiError> {
    let err = |e: std::io::Error| {
        ApiError::new(
            ErrorCode::Internal,
            format!("cannot persist task to {}: {e}", path.display()),
        )
    };
    let json = serde_json::to_vec_pretty(state)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(dir).await.map_err(err)?;
    }
    // Write then rename, so a crash never leaves half a file.
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, json).await.map_err(err)?;
    tokio::fs::rename(&tmp, path).await.map_err(err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn persisted_tasks_round_trip_and_refuse_a_gain_given_twice() {
        let state = Persisted {
            version: 7,
            spec: TaskSpec {
                categories: vec!["Bag".into()],
                gains: [("Bag".to_string(), 2.0f32), ("footwear".to_string(), 0.5)]
                    .into_iter()
                    .collect(),
            },
        };
        let json = serde_json::to_string(&state).unwrap();
        let back: Persisted = serde_json::from_str(&json).unwrap();
        assert_eq!((back.version, back.spec), (7, state.spec));
        let twice = r#"{"version": 2, "categories": [], "gains": {"Bag": 2, "Bag": 3}}"#;
        let err = serde_json::from_str::<Persisted>(twice)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .unwrap_or("")
                .contains("gain for \"Bag\" is given twice"),
            "{err:?}"
        );
    }
}
