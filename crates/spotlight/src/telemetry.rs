//! Logging: text by default, JSON on request; quiet for dependencies.

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Installs the global subscriber. `RUST_LOG` wins over the configured filter, which wins
/// over `default_filter`.
pub fn init(log: &LogSettings, default_filter: &str) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| log.filter.clone())
        .unwrap_or_else(|| format!("{default_filter},h2=warn,hyper=warn,tower=warn,ort=warn"));
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|e| {
        eprintln!("invalid log filter \"{filter}\": {e}; using \"info\"");
        EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
