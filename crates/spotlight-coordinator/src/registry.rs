//! Live workers: what they host, their leases, and how busy they are.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spotlight_model::Model;
use spotlight_proto::v1::branches_client::BranchesClient;
use spotlight_service::Security;

use crate::error::{ApiError, ErrorCode};
use crate::link::WorkerLink;

/// One registered worker.
#[derive(Debug)]
pub struct WorkerEntry {
    pub lease_id: u64,
    pub worker_id: String,
    pub endpoint: String,
    /// Segment indices hosted.
    pub segments: Vec<usize>,
    /// The long-lived run stream to it.
    pub link: WorkerLink,
    /// Frames in flight to this worker.
    pub outstanding: AtomicU32,
    expires: Mutex<Instant>,
}

impl WorkerEntry {
    fn alive(&self, now: Instant) -> bool {
        self.expires.lock().map(|e| *e > now).unwrap_or(false)
    }

    /// Time left on the lease.
    pub fn lease_remaining(&self) -> Duration {
        self.expires
            .lock()
            .map(|e| e.saturating_duration_since(Instant::now()))
            .unwrap_or_default()
    }

    /// Whether it hosts every segment in `segments`.
    pub fn hosts_all(&self, segments: &[usize]) -> bool {
        segments.iter().all(|s| self.segments.contains(s))
    }
}

/// Keeps a worker's count of frames in flight up while a call is in flight.
pub struct InFlight(Arc<WorkerEntry>, u32);

impl InFlight {
    pub fn new(worker: Arc<WorkerEntry>, frames: u32) -> Self {
        worker.outstanding.fetch_add(frames, Ordering::Relaxed);
        Self(worker, frames)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// The worker registry.
pub struct Registry {
    model: Arc<Model>,
    ttl: Duration,
    security: Security,
    workers: Mutex<HashMap<u64, Arc<WorkerEntry>>>,
    changed: tokio::sync::Notify,
}

impl Registry {
    /// `security` dials workers (TLS, the coordinator's bearer token).
    pub fn new(model: Arc<Model>, ttl: Duration, security: Security) -> Self {
        Self {
            model,
            ttl,
            security,
            workers: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Lease time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Adds a worker; refuses a different model or unknown segments.
    pub fn register(
        &self,
        worker_id: String,
        endpoint: String,
        segments: &[String],
        model_hash: &str,
    ) -> Result<u64, ApiError> {
        if worker_id.is_empty() {
            // Heartbeats and logs name the worker; an empty id would match any lease.
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                "worker id is empty; give a stable id such as the pod name",
            ));
        }
        if model_hash != self.model.hash() {
            return Err(ApiError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "worker \"{worker_id}\" runs model {model_hash}, but this coordinator serves {} ({})",
                    self.model.hash(),
                    self.model.name()
                ),
            ));
        }
        let mut indices = Vec::with_capacity(segments.len());
        for id in segments {
            let i = self.model.segment_index(id).ok_or_else(|| {
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "worker \"{worker_id}\" hosts unknown segment \"{id}\"; known: {}",
                        self.model
                            .segments()
                            .iter()
                            .map(|s| s.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })?;
            indices.push(i);
        }
        if indices.is_empty() {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("worker \"{worker_id}\" hosts no segment"),
            ));
        }
        let channel = self
            .security
            .endpoint(&endpoint)
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidArgument,
                    format!("bad worker endpoint from \"{worker_id}\": {e}"),
                )
            })?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        let lease_id = self.new_lease_id()?;
        let entry = Arc::new(WorkerEntry {
            lease_id,
            worker_id: worker_id.clone(),
            endpoint: endpoint.clone(),
            segments: indices,
            link: WorkerLink::spawn(
                worker_id.clone(),
                BranchesClient::new(channel).max_decoding_message_size(64 << 20),
                self.model.clone(),
                self.security.clone(),
            ),
            outstanding: AtomicU32::new(0),
            expires: Mutex::new(Instant::now() + self.ttl),
        });
        self.lock().insert(lease_id, entry);
        tracing::info!(
            lease_id,
            worker_id,
            endpoint,
            ?segments,
            "worker registered"
        );
        self.changed.notify_waiters();
        Ok(lease_id)
    }

    /// A lease id nobody can guess (64 random bits from the OS) and not in use: holding it is
    /// what lets a worker renew or drop its lease, and ids never repeat across restarts.
    fn new_lease_id(&self) -> Result<u64, ApiError> {
        let workers = self.lock();
        loop {
            let mut bytes = [0u8; 8];
            getrandom::fill(&mut bytes).map_err(|e| {
                ApiError::new(
                    ErrorCode::Internal,
                    format!("no randomness for a lease id: {e}"),
                )
            })?;
            let id = u64::from_le_bytes(bytes);
            if id != 0 && !workers.contains_key(&id) {
                return Ok(id);
            }
        }
    }

    /// Renews a lease held by `worker_id` (empty: any holder, for old clients).
    pub fn heartbeat(&self, lease_id: u64, worker_id: &str) -> Result<(), ApiError> {
        let now = Instant::now();
        let workers = self.lock();
        match workers.get(&lease_id) {
            Some(w) if w.alive(now) && (worker_id.is_empty() || w.worker_id == worker_id) => {
                if let Ok(mut e) = w.expires.lock() {
                    *e = now + self.ttl;
                }
                Ok(())
            }
            _ => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("lease {lease_id} is unknown or expired; register again"),
            )),
        }
    }

    /// Removes a worker.
    pub fn deregister(&self, lease_id: u64) -> Result<(), ApiError> {
        match self.lock().remove(&lease_id) {
            Some(w) => {
                tracing::info!(lease_id, worker_id = w.worker_id, "worker deregistered");
                Ok(())
            }
            None => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("lease {lease_id} is unknown"),
            )),
        }
    }

    /// Live workers, by lease id.
    pub fn live(&self) -> Vec<Arc<WorkerEntry>> {
        let now = Instant::now();
        let mut live: Vec<_> = self
            .lock()
            .values()
            .filter(|w| w.alive(now))
            .cloned()
            .collect();
        live.sort_by_key(|w| w.lease_id);
        live
    }

    /// The live worker hosting all of `segments` with the fewest requests in flight,
    /// skipping `exclude`.
    pub fn pick(&self, segments: &[usize], exclude: &[u64]) -> Option<Arc<WorkerEntry>> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|w| w.alive(now) && w.hosts_all(segments) && !exclude.contains(&w.lease_id))
            .min_by_key(|w| (w.outstanding.load(Ordering::Relaxed), w.lease_id))
            .cloned()
    }

    /// Like [`Registry::pick`], waiting up to `wait` for such a worker to register.
    pub async fn pick_within(
        &self,
        segments: &[usize],
        exclude: &[u64],
        wait: Duration,
    ) -> Option<Arc<WorkerEntry>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            if let Some(w) = self.pick(segments, exclude) {
                return Some(w);
            }
            // Leases expire without a notification, so poll too.
            let step = tokio::time::Instant::now() + Duration::from_millis(50);
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(step.min(deadline)) => {}
            }
        }
    }

    /// Drops expired leases; returns how many.
    pub fn reap(&self) -> usize {
        let now = Instant::now();
        let mut workers = self.lock();
        let before = workers.len();
        workers.retain(|_, w| {
            let alive = w.alive(now);
            if !alive {
                tracing::warn!(
                    lease_id = w.lease_id,
                    worker_id = w.worker_id,
                    "worker lease expired"
                );
            }
            alive
        });
        before - workers.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<WorkerEntry>>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }
}
