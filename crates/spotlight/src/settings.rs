//! Layered configuration: defaults < TOML file < `SPOTLIGHT_…` environment < flags.
//! Loading is a pure function of its sources, so tests never touch the process env.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use spotlight_coordinator::CoordinatorConfig;
use spotlight_coordinator::cluster::ClusterConfig;
use spotlight_edge::EdgeConfig;
use spotlight_service::SecurityConfig;
use spotlight_worker::WorkerConfig;

/// Everything every role reads; each role uses its own section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Model package directory.
    pub model: PathBuf,
    /// ONNX Runtime shared library; unset = `ORT_DYLIB_PATH`, then `build/onnxruntime/`.
    pub onnxruntime: Option<PathBuf>,
    pub log: LogSettings,
    /// TLS and credentials of this process (`spotlight certs` writes a development set).
    pub security: SecurityConfig,
    pub coordinator: CoordinatorConfig,
    pub cluster: ClusterConfig,
    pub worker: WorkerConfig,
    pub edge: EdgeConfig,
    pub up: UpSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: PathBuf::from("models/fashion-mnist-nested-v2"),
            onnxruntime: None,
            log: LogSettings::default(),
            security: SecurityConfig::default(),
            coordinator: CoordinatorConfig::default(),
            cluster: ClusterConfig::default(),
            worker: WorkerConfig::default(),
            edge: EdgeConfig::default(),
            up: UpSettings::default(),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `text` or `json`.
    pub format: LogFormat,
    /// `tracing` filter directives; unset = a quiet default per command.
    pub filter: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `spotlight up`: every role in one process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpSettings {
    /// Replicas started per top-level branch.
    pub replicas: usize,
    /// Task switched to when `switch_at` of the frames are answered; empty = no switch.
    pub switch_to: Vec<String>,
    /// Fraction of the frames after which the task switches.
    pub switch_at: f64,
    /// Keep serving after the source is exhausted, until Ctrl-C.
    pub serve: bool,
}

impl Default for UpSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            switch_to: vec!["Sandal".into(), "Sneaker".into(), "Ankle boot".into()],
            switch_at: 0.5,
            serve: false,
        }
    }
}

/// The sources of one load.
#[derive(Debug, Default)]
pub struct Sources {
    /// `--config` file.
    pub file: Option<PathBuf>,
    /// The process environment (only `SPOTLIGHT_*` keys are read).
    pub env: HashMap<String, String>,
    /// Flag overrides as (dotted key, value).
    pub overrides: Vec<(String, String)>,
}

/// `SPOTLIGHT_…` variables that are not settings: clap's `SPOTLIGHT_CONFIG` (the config
/// file's path), and the service links Kubernetes injects for a Service named `spotlight-…`
/// (`SPOTLIGHT_COORDINATOR_SERVICE_HOST`, `SPOTLIGHT_COORDINATOR_PORT_7000_TCP`, …), which have
/// no `__` section separator. Anything else unknown is still an error, so typos show.
fn not_a_setting(key: &str) -> bool {
    key == "SPOTLIGHT_CONFIG"
        || (!key.contains("__") && (key.contains("_SERVICE_") || key.contains("_PORT")))
}

impl Settings {
    /// Layers the sources over the defaults and validates the result.
    pub fn load(sources: &Sources) -> Result<Self, String> {
        let mut builder = config::Config::builder();
        if let Some(file) = &sources.file {
            if !file.is_file() {
                return Err(format!("config file {} does not exist", file.display()));
            }
            builder = builder
                .add_source(config::File::from(file.as_path()).format(config::FileFormat::Toml));
        }
        let env: HashMap<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("SPOTLIGHT_") && !not_a_setting(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("SPOTLIGHT")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("worker.branches")
                .with_list_parse_key("up.switch_to")
                .with_list_parse_key("cluster.etcd")
                .source(Some(env)),
        );
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(|e| format!("flag {key}: {e}"))?;
        }
        let settings: Settings = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| format!("invalid configuration: {e}"))?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), String> {
        self.coordinator.validate()?;
        self.cluster.validate()?;
        if self.cluster.enabled() && self.coordinator.state_file.is_some() {
            return Err(
                "coordinator.state_file and cluster.etcd are exclusive: with etcd the task lives in etcd"
                    .into(),
            );
        }
        if !(0.0..=1.0).contains(&self.up.switch_at) {
            return Err(format!(
                "up.switch_at must be within 0..1, got {}",
                self.up.switch_at
            ));
        }
        if self.up.replicas == 0 {
            return Err("up.replicas must be >= 1".into());
        }
        Ok(())
    }

    /// The model directory: as configured, or, for the default relative path, the copy in
    /// the source tree this binary was built from when the working directory has none.
    pub fn model_dir(&self) -> PathBuf {
        if self.model.is_relative() && !self.model.exists() {
            let built = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../..")
                .join(&self.model);
            if built.exists() {
                return built;
            }
        }
        self.model.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_without_sources() {
        let s = Settings::load(&Sources::default()).unwrap();
        assert_eq!(s.coordinator.grpc_listen.port(), 7000);
        assert_eq!(s.up.switch_to.len(), 3);
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let dir = std::env::temp_dir().join(format!("spotlight-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[coordinator]\nlease_ttl_ms = 1000\nworker_timeout_ms = 7\n[worker]\nbranches = [\"tops\"]\n").unwrap();
        let sources = Sources {
            file: Some(file),
            env: env(&[
                ("SPOTLIGHT_COORDINATOR__LEASE_TTL_MS", "2000"),
                ("SPOTLIGHT_WORKER__BRANCHES", "footwear,other"),
                ("OTHER", "x"),
            ]),
            overrides: vec![("coordinator.worker_timeout_ms".into(), "9".into())],
        };
        let s = Settings::load(&sources).unwrap();
        assert_eq!(s.coordinator.lease_ttl_ms, 2000, "env beats file");
        assert_eq!(s.coordinator.worker_timeout_ms, 9, "flag beats file");
        assert_eq!(
            s.worker.branches,
            vec!["footwear".to_string(), "other".to_string()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_config_path_and_kubernetes_service_links_are_not_settings() {
        let sources = Sources {
            env: env(&[
                ("SPOTLIGHT_CONFIG", "/etc/spotlight/coordinator.toml"),
                ("SPOTLIGHT_COORDINATOR_SERVICE_HOST", "10.0.0.1"),
                ("SPOTLIGHT_COORDINATOR_SERVICE_PORT_GRPC", "7000"),
                ("SPOTLIGHT_COORDINATOR_PORT", "tcp://10.0.0.1:7000"),
                ("SPOTLIGHT_COORDINATOR_PORT_7000_TCP_ADDR", "10.0.0.1"),
                ("SPOTLIGHT_CLUSTER__ETCD", "http://a:2379,http://b:2379"),
            ]),
            ..Sources::default()
        };
        let s = Settings::load(&sources).unwrap();
        assert_eq!(s.cluster.etcd, vec!["http://a:2379", "http://b:2379"]);
        let typo = Sources {
            env: env(&[("SPOTLIGHT_MODLE", "x")]),
            ..Sources::default()
        };
        assert!(Settings::load(&typo).unwrap_err().contains("modle"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let unknown = Sources {
            env: env(&[("SPOTLIGHT_COORDINATOR__LEASE_TTL", "5")]),
            ..Sources::default()
        };
        let err = Settings::load(&unknown).unwrap_err();
        assert!(err.contains("unknown field `lease_ttl`"), "{err}");
        let bad = Sources {
            overrides: vec![("coordinator.lease_ttl_ms".into(), "10".into())],
            ..Sources::default()
        };
        assert!(
            Settings::load(&bad)
                .unwrap_err()
                .contains("lease_ttl_ms must be >= 100")
        );
        let missing = Sources {
            file: Some("no/such.toml".into()),
            ..Sources::default()
        };
        assert!(
            Settings::load(&missing)
                .unwrap_err()
                .contains("does not exist")
        );
    }
}

#[cfg(test)]
mod reference_configs {
    use super::*;

    /// The reference files in configs/ must stay loadable: a renamed key fails here.
    #[test]
    fn every_reference_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let sources = Sources {
                    file: Some(path.clone()),
                    ..Sources::default()
                };
                Settings::load(&sources).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                n += 1;
            }
        }
        assert_eq!(n, 4, "coordinator, worker, edge, up");
    }
}
