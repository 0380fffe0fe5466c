//! Live workers: what they host, their leases, how busy they are, and how healthy.
//!
//! Outlier ejection in the manner of Envoy's: a worker whose calls fail
//! `consecutive_failures` times in a row (unreachable, past its deadline, a bad answer) is
//! ejected — not picked while another replica can take the work — for `base` times the
//! number of times it has been ejected, at most `max`. When that time is over it is picked
//! again; one success clears its run of failures, and every `base` of health lowers the
//! multiplier by one. When every replica of a branch is ejected the least busy of them is
//! still picked (Envoy's panic mode), so an ejection never makes a frame wait for nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
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
    /// Frames sent to it since it registered (each frame once per call that carried it).
    pub routed: AtomicU64,
    /// Calls to it that failed because of it, since it registered.
    pub failures: AtomicU64,
    /// Its lease is kept by the replicas' shared store (etcd), not by this process.
    pub shared: bool,
    expires: Mutex<Instant>,
    health: Mutex<Health>,
}

/// A worker's run of failures and its ejection.
#[derive(Debug, Default, Clone, Copy)]
struct Health {
    /// Failures since its last success.
    consecutive: u32,
    /// The ejection multiplier: ejections not yet forgiven by health.
    ejections: u32,
    /// Ejections since it registered.
    ejections_total: u32,
    /// Not picked before this (unless every replica is ejected).
    ejected_until: Option<Instant>,
    /// Since when it has been healthy, for lowering the multiplier.
    healthy_since: Option<Instant>,
}

/// What a worker's health looks like from outside, for `GET /v1/workers` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthView {
    /// Failures since its last success.
    pub consecutive_failures: u32,
    /// Times it was ejected since it registered.
    pub ejections: u32,
    /// Time left on its current ejection (zero when it is not ejected).
    pub ejected_for: Duration,
}

/// Why a call to a worker failed; decides whether it counts towards ejection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Unreachable, past its deadline, or a malformed answer: counts towards ejection.
    Fault,
    /// It refused work for lack of room (RESOURCE_EXHAUSTED): counted, but an overloaded
    /// replica is not ejected, which would only push its load onto the others.
    Overloaded,
}

/// Outlier ejection settings (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    /// Failures in a row that eject a worker.
    pub consecutive_failures: u32,
    /// Ejection time of a first ejection; the n-th lasts n times as long.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_millis(2000),
            max: Duration::from_millis(30_000),
        }
    }
}

/// Registry settings.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    /// Lease time to live.
    pub ttl: Duration,
    /// Dials workers (TLS, the coordinator's bearer token).
    pub security: Security,
    /// Outlier ejection.
    pub ejection: Ejection,
    /// How long opening a run stream to a worker may take.
    pub open_timeout: Duration,
}

impl Health {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    /// A success ends the run of failures; every `base` of health forgives one ejection.
    fn succeed(&mut self, e: &Ejection, now: Instant) {
        self.consecutive = 0;
        if self.ejections > 0 && !self.ejected(now) {
            let since = *self.healthy_since.get_or_insert(now);
            if now.duration_since(since) >= e.base {
                self.ejections -= 1;
                self.healthy_since = Some(now);
            }
        }
    }

    /// A fault; returns the ejection time when it ejects.
    fn fail(&mut self, e: &Ejection, now: Instant) -> Option<Duration> {
        self.healthy_since = None;
        if self.ejected(now) {
            // Calls sent before the ejection are still failing: not a new run of faults.
            return None;
        }
        self.consecutive += 1;
        if self.consecutive < e.consecutive_failures {
            return None;
        }
        self.consecutive = 0;
        self.ejections = self.ejections.saturating_add(1);
        self.ejections_total = self.ejections_total.saturating_add(1);
        let time = e.base.saturating_mul(self.ejections).min(e.max);
        self.ejected_until = Some(now + time);
        Some(time)
    }
}

impl WorkerEntry {
    fn alive(&self, now: Instant) -> bool {
        self.expires.lock().map(|e| *e > now).unwrap_or(false)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // Plain data: a panic while holding the lock cannot leave it inconsistent.
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether it is ejected at `now`.
    pub fn ejected(&self, now: Instant) -> bool {
        self.health().ejected(now)
    }

    /// Its run of failures and ejection.
    pub fn health_view(&self) -> HealthView {
        let h = *self.health();
        HealthView {
            consecutive_failures: h.consecutive,
            ejections: h.ejections_total,
            ejected_for: h
                .ejected_until
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or_default(),
        }
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
        worker
            .routed
            .fetch_add(u64::from(frames), Ordering::Relaxed);
        Self(worker, frames)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// A random non-zero lease id from the OS.
pub fn random_lease_id() -> Result<u64, ApiError> {
    loop {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("no randomness for a lease id: {e}"),
            )
        })?;
        let id = u64::from_le_bytes(bytes);
        if id != 0 {
            return Ok(id);
        }
    }
}

/// The worker registry.
pub struct Registry {
    model: Arc<Model>,
    ttl: Duration,
    security: Security,
    ejection: Ejection,
    open_timeout: Duration,
    workers: Mutex<HashMap<u64, Arc<WorkerEntry>>>,
    changed: tokio::sync::Notify,
}

impl Registry {
    pub fn new(model: Arc<Model>, settings: RegistrySettings) -> Self {
        Self {
            model,
            ttl: settings.ttl,
            security: settings.security,
            ejection: settings.ejection,
            open_timeout: settings.open_timeout,
            workers: Mutex::new(HashMap::new()),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Lease time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Adds a worker under a new lease held in this process; refuses a different model or
    /// unknown segments.
    pub fn register(
        &self,
        worker_id: String,
        endpoint: String,
        segments: &[String],
        model_hash: &str,
    ) -> Result<u64, ApiError> {
        let indices = self.admit(&worker_id, &endpoint, segments, model_hash)?;
        let lease_id = self.new_lease_id()?;
        self.insert(lease_id, worker_id, endpoint, indices, Some(self.ttl))?;
        Ok(lease_id)
    }

    /// Checks a worker's registration: a stable id, this coordinator's model, known segments
    /// and a well-formed endpoint. Returns the hosted segments' indices.
    pub fn admit(
        &self,
        worker_id: &str,
        endpoint: &str,
        segments: &[String],
        model_hash: &str,
    ) -> Result<Vec<usize>, ApiError> {
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
        self.security.endpoint(endpoint).map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidArgument,
                format!("bad worker endpoint from \"{worker_id}\": {e}"),
            )
        })?;
        Ok(indices)
    }

    /// Starts routing to an admitted worker under `lease_id`. `ttl` is the lease's time to
    /// live when this process keeps the lease; `None` when a cluster store keeps it (the
    /// store's watch removes the worker when its lease ends). A lease already present is
    /// left as it is.
    pub fn insert(
        &self,
        lease_id: u64,
        worker_id: String,
        endpoint: String,
        segments: Vec<usize>,
        ttl: Option<Duration>,
    ) -> Result<(), ApiError> {
        if self.lock().contains_key(&lease_id) {
            return Ok(());
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
        let names: Vec<&str> = segments
            .iter()
            .map(|&s| self.model.segments()[s].id.as_str())
            .collect();
        tracing::info!(
            lease_id,
            worker_id,
            endpoint,
            segments = ?names,
            shared = ttl.is_none(),
            "worker registered"
        );
        // Leases kept by a cluster store never expire here.
        let expires = Instant::now() + ttl.unwrap_or(Duration::from_secs(10 * 365 * 86_400));
        let entry = Arc::new(WorkerEntry {
            lease_id,
            worker_id: worker_id.clone(),
            endpoint,
            segments,
            link: WorkerLink::spawn(
                worker_id,
                BranchesClient::new(channel).max_decoding_message_size(64 << 20),
                self.model.clone(),
                self.security.clone(),
                self.open_timeout,
            ),
            outstanding: AtomicU32::new(0),
            routed: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            shared: ttl.is_none(),
            expires: Mutex::new(expires),
            health: Mutex::new(Health::default()),
        });
        self.lock().entry(lease_id).or_insert(entry);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Stops routing to the worker under `lease_id`; whether it was there.
    pub fn remove(&self, lease_id: u64, why: &str) -> bool {
        match self.lock().remove(&lease_id) {
            Some(w) => {
                tracing::info!(lease_id, worker_id = w.worker_id, why, "worker removed");
                true
            }
            None => false,
        }
    }

    /// Every lease present, for reconciling with a cluster store.
    pub fn lease_ids(&self) -> Vec<u64> {
        self.lock().keys().copied().collect()
    }

    /// The worker id holding `lease_id`, if present.
    pub fn holder(&self, lease_id: u64) -> Option<String> {
        self.lock().get(&lease_id).map(|w| w.worker_id.clone())
    }

    /// A lease id nobody can guess (64 random bits from the OS) and not in use: holding it is
    /// what lets a worker renew or drop its lease, and ids never repeat across restarts.
    fn new_lease_id(&self) -> Result<u64, ApiError> {
        loop {
            let id = random_lease_id()?;
            if !self.lock().contains_key(&id) {
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
        if self.remove(lease_id, "deregistered") {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::NotFound,
                format!("lease {lease_id} is unknown"),
            ))
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
    /// skipping `exclude`; an ejected worker only when every candidate is ejected.
    pub fn pick(&self, segments: &[usize], exclude: &[u64]) -> Option<Arc<WorkerEntry>> {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|w| w.alive(now) && w.hosts_all(segments) && !exclude.contains(&w.lease_id))
            .min_by_key(|w| {
                (
                    w.ejected(now),
                    w.outstanding.load(Ordering::Relaxed),
                    w.lease_id,
                )
            })
            .cloned()
    }

    /// A call to `worker` succeeded: its run of failures ends.
    pub fn succeeded(&self, worker: &WorkerEntry) {
        worker.health().succeed(&self.ejection, Instant::now());
    }

    /// A call to `worker` failed because of it: counts it, and ejects the worker after
    /// `consecutive_failures` faults in a row. Returns whether this failure ejected it.
    pub fn failed(&self, worker: &WorkerEntry, failure: Failure, why: &str) -> bool {
        let failures = worker.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failure == Failure::Overloaded {
            return false;
        }
        let mut h = worker.health();
        let Some(time) = h.fail(&self.ejection, Instant::now()) else {
            return false;
        };
        tracing::warn!(
            lease_id = worker.lease_id,
            worker_id = worker.worker_id,
            failures,
            ejections = h.ejections_total,
            ejected_ms = time.as_millis() as u64,
            why,
            "worker ejected after consecutive failures"
        );
        true
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

#[cfg(test)]
mod tests {
    use super::*;

    const E: Ejection = Ejection {
        consecutive_failures: 3,
        base: Duration::from_secs(1),
        max: Duration::from_secs(3),
    };

    #[test]
    fn ejects_after_consecutive_faults_for_a_growing_capped_time() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.fail(&E, t0), None);
        assert_eq!(h.fail(&E, t0), None);
        assert_eq!(h.fail(&E, t0), Some(Duration::from_secs(1)));
        assert!(h.ejected(t0) && !h.ejected(t0 + Duration::from_secs(1)));
        // Calls still failing from before the ejection start no new run.
        assert_eq!(h.fail(&E, t0), None);
        assert_eq!(h.consecutive, 0);
        // Retried after the ejection time and still failing: twice as long, then capped.
        let t1 = t0 + Duration::from_secs(1);
        h.fail(&E, t1);
        h.fail(&E, t1);
        assert_eq!(h.fail(&E, t1), Some(Duration::from_secs(2)));
        let t2 = t1 + Duration::from_secs(2);
        for _ in 0..2 {
            h.fail(&E, t2);
        }
        assert_eq!(h.fail(&E, t2), Some(Duration::from_secs(3)));
        let t3 = t2 + Duration::from_secs(3);
        for _ in 0..2 {
            h.fail(&E, t3);
        }
        assert_eq!(
            h.fail(&E, t3),
            Some(Duration::from_secs(3)),
            "capped at max"
        );
        assert_eq!(h.ejections_total, 4);
    }

    #[test]
    fn a_success_ends_the_run_and_health_forgives_ejections() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.fail(&E, t0);
        h.fail(&E, t0);
        h.succeed(&E, t0);
        assert_eq!(h.fail(&E, t0), None, "the run started again");
        h.fail(&E, t0);
        assert!(h.fail(&E, t0).is_some());
        assert_eq!(h.ejections, 1);
        let back = t0 + Duration::from_secs(1);
        h.succeed(&E, back);
        assert_eq!(h.ejections, 1, "not yet healthy for a base time");
        h.succeed(&E, back + Duration::from_secs(1));
        assert_eq!(h.ejections, 0);
        assert_eq!(h.ejections_total, 1);
    }
}
