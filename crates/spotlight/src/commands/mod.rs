//! One module per subcommand.

mod bench;
mod certs;
mod eval;
mod inspect;
mod roles;
mod task;
mod up;

use std::sync::Arc;

use anyhow::Context;
use spotlight_model::Model;

use crate::cli::{Cli, Command};
use crate::settings::{Settings, Sources};

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(m) = &cli.model {
        overrides.push(("model".to_string(), m.display().to_string()));
    }
    if let Some(f) = &cli.log_format {
        overrides.push(("log.format".to_string(), f.clone()));
    }
    if cli.insecure {
        overrides.push(("security.insecure".to_string(), "true".to_string()));
    }
    if cli.mtls {
        overrides.push(("security.mtls".to_string(), "true".to_string()));
    }
    for (key, path) in [
        ("security.ca", &cli.ca),
        ("security.cert", &cli.cert),
        ("security.key", &cli.key),
        ("security.tokens", &cli.tokens),
        ("security.token", &cli.token_file),
    ] {
        if let Some(p) = path {
            overrides.push((key.to_string(), p.display().to_string()));
        }
    }
    let command_overrides = match &cli.command {
        Command::Up(a) => up::overrides(a),
        Command::Edge(a) => roles::edge_overrides(a),
        Command::Coordinator(a) => roles::coordinator_overrides(a),
        Command::Worker(a) => roles::worker_overrides(a),
        Command::Task(_)
        | Command::Inspect(_)
        | Command::Bench(_)
        | Command::Eval(_)
        | Command::Certs(_) => Vec::new(),
    };
    overrides.extend(command_overrides);
    let sources = Sources {
        file: cli.config.clone(),
        env: std::env::vars().collect(),
        overrides,
    };
    let settings = Settings::load(&sources).map_err(anyhow::Error::msg)?;
    let default_filter = match cli.command {
        Command::Up(_)
        | Command::Task(_)
        | Command::Inspect(_)
        | Command::Bench(_)
        | Command::Eval(_)
        | Command::Certs(_) => "warn",
        _ => "info",
    };
    crate::telemetry::init(&settings.log, default_filter);
    match cli.command {
        Command::Up(a) => up::run(settings, a).await,
        Command::Edge(_) => roles::edge(settings).await,
        Command::Coordinator(_) => roles::coordinator(settings).await,
        Command::Worker(_) => roles::worker(settings).await,
        Command::Task(a) => task::run(settings, a).await,
        Command::Certs(a) => certs::run(a),
        Command::Inspect(a) => inspect::run(settings, a),
        Command::Bench(a) => bench::run(settings, a).await,
        Command::Eval(a) => eval::run(settings, a),
    }
}

/// Loads the configured model package (hash checked).
fn load_model(settings: &Settings) -> anyhow::Result<Arc<Model>> {
    let dir = settings.model_dir();
    let model =
        Model::load(&dir).with_context(|| format!("loading model package {}", dir.display()))?;
    Ok(Arc::new(model))
}

/// Secure by default: the role's TLS and credentials, or a refusal that says how to set
/// them up, unless `--insecure`.
fn load_security(
    settings: &Settings,
    side: spotlight_service::Side,
) -> anyhow::Result<spotlight_service::Security> {
    settings
        .security
        .require(side)
        .map_err(anyhow::Error::msg)?;
    if settings.security.insecure {
        tracing::warn!("--insecure: plaintext, and every caller is trusted");
    }
    spotlight_service::Security::load(&settings.security).context("loading [security]")
}

/// Loads ONNX Runtime (only roles that run models need it).
fn init_onnxruntime(settings: &Settings) -> anyhow::Result<()> {
    spotlight_runtime::init_onnxruntime(settings.onnxruntime.as_deref())?;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutdown requested");
}
