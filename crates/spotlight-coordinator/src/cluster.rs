//! Coordinator replicas sharing their state through etcd.
//!
//! With `[cluster] etcd = [...]` set, two things that a single coordinator keeps to itself
//! live in etcd instead, so that every replica routes every frame the same way:
//!
//! - **The task**, one key (`<prefix>/task`) holding the operator's task as JSON. Its
//!   version is the key's etcd modification revision, so versions are ordered by etcd and
//!   every replica agrees on them (they increase, though not one by one). Any replica
//!   accepts a change: it validates it against the model, writes the key, and every replica
//!   (itself included) installs it from its watch.
//! - **The worker registry**, one key per worker (`<prefix>/workers/<lease>`) attached to
//!   an etcd lease of the coordinator's `lease_ttl_ms`. A worker registers, heartbeats and
//!   deregisters through whichever replica it reaches; the lease lives in etcd, so any
//!   replica can renew it, and when it ends etcd deletes the key. Every replica watches the
//!   prefix and routes to exactly the workers it lists.
//!
//! Lease ids are still 64 random bits chosen here (etcd accepts a caller's id), so holding
//! one is still what lets a worker renew or drop its lease.
//!
//! When etcd is unreachable a replica keeps routing under the last task and workers it saw,
//! refuses task changes and registrations with UNAVAILABLE, and catches up (a fresh read,
//! then the watch) once etcd is back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, EventType, GetOptions, LeaseGrantOptions, PutOptions, WatchOptions,
};
use serde::{Deserialize, Serialize};
use spotlight_model::TaskSpec;
use spotlight_service::Shutdown;

use crate::error::{ApiError, ErrorCode};
use crate::registry::{Registry, random_lease_id};

/// `[cluster]`: where replicas share their state (`configs/coordinator.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd endpoints (`http://host:2379`). Empty: one coordinator, with the task in
    /// `state_file` (or memory) and workers in memory.
    pub etcd: Vec<String>,
    /// Key prefix; coordinators sharing a prefix share a task and workers.
    pub prefix: String,
    /// Deadline of one etcd call, and of connecting to it.
    pub etcd_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            etcd: Vec::new(),
            prefix: "/spotlight".into(),
            etcd_timeout_ms: 2000,
        }
    }
}

impl ClusterConfig {
    /// Whether replicas share state through etcd.
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }

    /// Checks values that deserialisation cannot.
    pub fn validate(&self) -> Result<(), String> {
        for e in &self.etcd {
            if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() <= 8 {
                return Err(format!(
                    "cluster.etcd endpoint \"{e}\" is not an http:// URL (e.g. http://127.0.0.1:2379)"
                ));
            }
        }
        if self.enabled() && !self.prefix.starts_with('/') {
            return Err(format!(
                "cluster.prefix must start with '/', got \"{}\"",
                self.prefix
            ));
        }
        if self.etcd_timeout_ms == 0 {
            return Err("cluster.etcd_timeout_ms must be > 0".into());
        }
        Ok(())
    }
}

/// A worker's registration as stored in etcd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub worker_id: String,
    pub endpoint: String,
    pub segments: Vec<String>,
    pub model_hash: String,
}

/// A connection to the cluster's etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: String,
}

/// An etcd failure as the API answers it: the store is unreachable, try again.
fn unavailable(what: &str, endpoints: &str, e: etcd_client::Error) -> ApiError {
    ApiError::new(
        ErrorCode::Unavailable,
        format!("{what}: etcd ({endpoints}) failed: {e}"),
    )
}

impl Etcd {
    /// Connects (lazily: an unreachable etcd shows in the first call, not here).
    pub async fn connect(config: &ClusterConfig) -> Result<Self, String> {
        let timeout = Duration::from_millis(config.etcd_timeout_ms);
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(5), timeout);
        let client = Client::connect(&config.etcd, Some(options))
            .await
            .map_err(|e| format!("etcd {}: {e}", config.etcd.join(",")))?;
        Ok(Self {
            client,
            prefix: config.prefix.trim_end_matches('/').to_string(),
            endpoints: config.etcd.join(","),
        })
    }

    fn task_key(&self) -> String {
        format!("{}/task", self.prefix)
    }

    fn workers_prefix(&self) -> String {
        format!("{}/workers/", self.prefix)
    }

    fn worker_key(&self, lease_id: u64) -> String {
        format!("{}{lease_id:016x}", self.workers_prefix())
    }

    /// The stored task and its version (the key's revision); `None` when no task was ever
    /// set. Also the store's revision, to watch from.
    pub async fn read_task(&self) -> Result<(Option<(u64, TaskSpec)>, i64), ApiError> {
        let mut c = self.client.clone();
        let r = c
            .get(self.task_key(), None)
            .await
            .map_err(|e| unavailable("reading the task", &self.endpoints, e))?;
        let revision = r.header().map(|h| h.revision()).unwrap_or(0);
        let task = match r.kvs().first() {
            Some(kv) => Some((
                kv.mod_revision() as u64,
                parse_task(kv.value()).map_err(|e| ApiError::new(ErrorCode::Internal, e))?,
            )),
            None => None,
        };
        Ok((task, revision))
    }

    /// Writes the task; returns its version (the revision of the write).
    pub async fn write_task(&self, spec: &TaskSpec) -> Result<u64, ApiError> {
        let json = serde_json::to_vec(spec)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let mut c = self.client.clone();
        let r = c
            .put(self.task_key(), json, None)
            .await
            .map_err(|e| unavailable("storing the task", &self.endpoints, e))?;
        r.header()
            .map(|h| h.revision() as u64)
            .ok_or_else(|| ApiError::new(ErrorCode::Internal, "etcd answered without a header"))
    }

    /// Watches the task key from `revision`, calling `apply(version, spec)` for every change
    /// (`None` when the key was deleted), until `stop`. Re-reads and watches again after any
    /// break, so a replica catches up with what it missed.
    pub async fn follow_task(
        &self,
        mut revision: i64,
        stop: Shutdown,
        apply: impl Fn(u64, Option<TaskSpec>),
    ) {
        loop {
            let watched = async {
                let mut c = self.client.clone();
                let mut stream = c
                    .watch(
                        self.task_key(),
                        Some(WatchOptions::new().with_start_revision(revision + 1)),
                    )
                    .await?;
                while let Some(r) = stream.message().await? {
                    if r.canceled() {
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch cancelled: {} (compacted at {})",
                            r.cancel_reason(),
                            r.compact_revision()
                        )));
                    }
                    for event in r.events() {
                        let Some(kv) = event.kv() else { continue };
                        revision = revision.max(kv.mod_revision());
                        match event.event_type() {
                            EventType::Put => match parse_task(kv.value()) {
                                Ok(spec) => apply(kv.mod_revision() as u64, Some(spec)),
                                Err(e) => {
                                    tracing::error!(error = %e, "ignoring an unreadable task in etcd")
                                }
                            },
                            EventType::Delete => apply(kv.mod_revision() as u64, None),
                        }
                    }
                }
                Ok::<(), etcd_client::Error>(())
            };
            tokio::select! {
                _ = stop.begun() => return,
                r = watched => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "task watch broke; reading again");
                    }
                }
            }
            // Catch up with a fresh read, then watch again from there.
            loop {
                tokio::select! {
                    _ = stop.begun() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                match self.read_task().await {
                    Ok((task, rev)) => {
                        if let Some((version, spec)) = task {
                            apply(version, Some(spec));
                        }
                        revision = rev;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, "etcd unreachable; routing under the last task seen")
                    }
                }
            }
        }
    }

    /// Registers an admitted worker under a new etcd lease of `ttl`; returns the lease id
    /// and the TTL etcd granted.
    pub async fn register(
        &self,
        record: &WorkerRecord,
        ttl: Duration,
    ) -> Result<(u64, Duration), ApiError> {
        let json = serde_json::to_vec(record)
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let ttl_s = ttl.as_millis().div_ceil(1000).max(1) as i64;
        let mut c = self.client.clone();
        let mut tries = 0;
        let (id, granted) = loop {
            // etcd lease ids are positive i64.
            let id = random_lease_id()? >> 1;
            if id == 0 {
                continue;
            }
            match c
                .lease_grant(ttl_s, Some(LeaseGrantOptions::new().with_id(id as i64)))
                .await
            {
                Ok(r) => break (id, r.ttl()),
                // A lease id already in use (one chance in 2^63): draw again.
                Err(etcd_client::Error::GRpcStatus(s))
                    if s.message().contains("lease already exists") && tries < 3 =>
                {
                    tries += 1;
                }
                Err(e) => return Err(unavailable("granting a worker lease", &self.endpoints, e)),
            }
        };
        let put = c
            .put(
                self.worker_key(id),
                json,
                Some(PutOptions::new().with_lease(id as i64)),
            )
            .await;
        if let Err(e) = put {
            let _ = c.lease_revoke(id as i64).await;
            return Err(unavailable("storing a worker", &self.endpoints, e));
        }
        Ok((id, Duration::from_secs(granted.max(1) as u64)))
    }

    /// Renews `lease_id` for the worker `worker_id` (empty: any holder); NOT_FOUND when the
    /// lease ended or belongs to another worker, so the worker registers again.
    pub async fn heartbeat(&self, lease_id: u64, worker_id: &str) -> Result<(), ApiError> {
        let gone = || {
            ApiError::new(
                ErrorCode::NotFound,
                format!("lease {lease_id} is unknown or expired; register again"),
            )
        };
        let mut c = self.client.clone();
        let r = c
            .get(self.worker_key(lease_id), None)
            .await
            .map_err(|e| unavailable("renewing a worker lease", &self.endpoints, e))?;
        let Some(kv) = r.kvs().first() else {
            return Err(gone());
        };
        let record: WorkerRecord = serde_json::from_slice(kv.value()).map_err(|_| gone())?;
        if !worker_id.is_empty() && record.worker_id != worker_id {
            return Err(gone());
        }
        if kv.lease() as u64 != lease_id {
            return Err(gone());
        }
        let (mut keeper, mut answers) = c
            .lease_keep_alive(lease_id as i64)
            .await
            .map_err(|e| unavailable("renewing a worker lease", &self.endpoints, e))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| unavailable("renewing a worker lease", &self.endpoints, e))?;
        match answers.message().await {
            Ok(Some(a)) if a.ttl() > 0 => Ok(()),
            Ok(_) => Err(gone()),
            Err(e) => Err(unavailable("renewing a worker lease", &self.endpoints, e)),
        }
    }

    /// Ends `lease_id`; etcd deletes the worker's key and every replica stops routing to it.
    pub async fn deregister(&self, lease_id: u64) -> Result<(), ApiError> {
        let mut c = self.client.clone();
        match c.lease_revoke(lease_id as i64).await {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("not found") => Err(
                ApiError::new(ErrorCode::NotFound, format!("lease {lease_id} is unknown")),
            ),
            Err(e) => Err(unavailable("ending a worker lease", &self.endpoints, e)),
        }
    }

    /// Keeps `registry` equal to the workers in etcd until `stop`: a full read, then the
    /// prefix's watch; after any break, a full read again.
    pub async fn follow_workers(&self, registry: Arc<Registry>, stop: Shutdown) {
        loop {
            let synced = async {
                let mut c = self.client.clone();
                let r = c
                    .get(self.workers_prefix(), Some(GetOptions::new().with_prefix()))
                    .await?;
                let revision = r.header().map(|h| h.revision()).unwrap_or(0);
                let mut present = HashSet::new();
                for kv in r.kvs() {
                    if let Some(lease) = self.admit(&registry, kv.key(), kv.value()) {
                        present.insert(lease);
                    }
                }
                for lease in registry.lease_ids() {
                    if !present.contains(&lease) {
                        registry.remove(lease, "no longer in etcd");
                    }
                }
                let mut stream = c
                    .watch(
                        self.workers_prefix(),
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision + 1),
                        ),
                    )
                    .await?;
                while let Some(r) = stream.message().await? {
                    if r.canceled() {
                        return Err(etcd_client::Error::WatchError(format!(
                            "watch cancelled: {}",
                            r.cancel_reason()
                        )));
                    }
                    for event in r.events() {
                        let Some(kv) = event.kv() else { continue };
                        match event.event_type() {
                            EventType::Put => {
                                self.admit(&registry, kv.key(), kv.value());
                            }
                            EventType::Delete => {
                                if let Some(lease) = self.lease_of(kv.key()) {
                                    registry.remove(lease, "lease ended in etcd");
                                }
                            }
                        }
                    }
                }
                Ok::<(), etcd_client::Error>(())
            };
            tokio::select! {
                _ = stop.begun() => return,
                r = synced => {
                    if let Err(e) = r {
                        tracing::warn!(error = %e, "worker watch broke; routing to the workers last seen until etcd answers");
                    }
                }
            }
            tokio::select! {
                _ = stop.begun() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    fn lease_of(&self, key: &[u8]) -> Option<u64> {
        let key = std::str::from_utf8(key).ok()?;
        u64::from_str_radix(key.strip_prefix(&self.workers_prefix())?, 16).ok()
    }

    /// Starts routing to a worker found in etcd; returns its lease. A record that does not
    /// fit this replica's model is logged and skipped.
    fn admit(&self, registry: &Registry, key: &[u8], value: &[u8]) -> Option<u64> {
        let lease = self.lease_of(key)?;
        let record: WorkerRecord = match serde_json::from_slice(value) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(lease, error = %e, "ignoring an unreadable worker record in etcd");
                return None;
            }
        };
        let admitted = registry
            .admit(
                &record.worker_id,
                &record.endpoint,
                &record.segments,
                &record.model_hash,
            )
            .and_then(|segments| {
                registry.insert(lease, record.worker_id, record.endpoint, segments, None)
            });
        match admitted {
            Ok(()) => Some(lease),
            Err(e) => {
                tracing::error!(lease, error = %e.message, "ignoring a worker record this replica cannot route to");
                None
            }
        }
    }
}

fn parse_task(bytes: &[u8]) -> Result<TaskSpec, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("task in etcd is not valid: {e}"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn config_checks_endpoints_and_prefix() {
        let mut c = ClusterConfig::default();
        assert!(!c.enabled());
        c.validate().unwrap();
        c.etcd = vec!["127.0.0.1:2379".into()];
        assert!(c.validate().unwrap_err().contains("not an http:// URL"));
        c.etcd = vec!["http://127.0.0.1:2379".into()];
        c.prefix = "spotlight".into();
        assert!(c.validate().unwrap_err().contains("start with '/'"));
        c.prefix = "/spotlight/a".into();
        c.validate().unwrap();
    }
}
