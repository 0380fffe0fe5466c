//! What every networked role shares: TLS on every listener and client (reloadable server
//! certificates, optional mutual TLS), bearer tokens with roles, and a development PKI.
//!
//! The libraries default to [`Security::insecure`] (plaintext, no authentication) so tests
//! and embedders choose; the `spotlight` binary refuses to start a role that way unless told
//! `--insecure` (see [`SecurityConfig::require`]).

pub mod auth;
pub mod certs;
pub mod error;
pub mod metrics;
pub mod quic;
mod secret;
pub mod shutdown;
pub mod tls;

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::Endpoint;

pub use auth::{Access, AuthError, Principal, Role, TokenEntry, TokenStore};
pub use error::{ApiError, ErrorCode};
pub use metrics::Metrics;
pub use secret::Secret;
pub use shutdown::Shutdown;
pub use tls::{Alpn, ClientTls, Conn, Incoming, ServerTls};

/// `[security]`: certificates and credentials of one process. Paths are PEM files except
/// `tokens` (see `spotlight certs`) and `token` (a file holding one bearer token).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// Plaintext and no authentication. Only for a network you trust.
    pub insecure: bool,
    /// CA that peers' certificates must chain to (servers this process calls; with `mtls`,
    /// also clients calling it).
    pub ca: Option<PathBuf>,
    /// This process's certificate chain: served by coordinators and workers, presented as a
    /// client certificate with `mtls`.
    pub cert: Option<PathBuf>,
    /// The private key of `cert`.
    pub key: Option<PathBuf>,
    /// Mutual TLS: servers require a client certificate signed by `ca`; clients present
    /// `cert`.
    pub mtls: bool,
    /// Servers: the tokens accepted, with their roles (SHA-256 digests, not the tokens).
    pub tokens: Option<PathBuf>,
    /// Clients: the file holding this process's bearer token.
    pub token: Option<PathBuf>,
    /// Name to verify the server's certificate against instead of the URL's host (e.g.
    /// `spotlight-worker` when workers are dialled by pod IP).
    pub server_name: Option<String>,
    /// How often certificate, key, CA and tokens files are checked for changes.
    pub reload_ms: u64,
    /// `GET /metrics` needs a reader (or operator) token, like the other reads. Off by
    /// default: Prometheus scrapers usually carry no token, and the metrics hold no task,
    /// feature or credential.
    pub protect_metrics: bool,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            insecure: false,
            ca: None,
            cert: None,
            key: None,
            mtls: false,
            tokens: None,
            token: None,
            server_name: None,
            reload_ms: 5000,
            protect_metrics: false,
        }
    }
}

/// The kind of process, for what it must have configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Serves edges, workers and operators; calls workers.
    Coordinator,
    /// Serves the coordinator; calls it to register.
    Worker,
    /// Calls the coordinator.
    Edge,
    /// `spotlight task …`: calls the coordinator.
    Client,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Coordinator => "coordinator",
            Side::Worker => "worker",
            Side::Edge => "edge",
            Side::Client => "operator client",
        }
    }
}

/// Failures loading security material.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SecurityError(pub String);

impl From<String> for SecurityError {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl SecurityConfig {
    /// Secure by default: `Ok` when `--insecure` was given or every piece `side` needs is
    /// configured; otherwise an error that names what is missing and how to set it up.
    pub fn require(&self, side: Side) -> Result<(), String> {
        if self.insecure {
            return Ok(());
        }
        let mut missing = Vec::new();
        let server = matches!(side, Side::Coordinator | Side::Worker);
        if server || self.mtls {
            if self.cert.is_none() {
                missing.push("cert");
            }
            if self.key.is_none() {
                missing.push("key");
            }
        }
        if self.ca.is_none() {
            missing.push("ca");
        }
        if server && self.tokens.is_none() {
            missing.push("tokens");
        }
        if self.token.is_none() {
            missing.push("token");
        }
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the {} has no {} configured, and spotlight does not run without TLS and \
             credentials unless told to. Either create a development CA, certificates and \
             tokens with `spotlight certs --out secrets` and set [security] {} (or the flags \
             --ca/--cert/--key/--tokens/--token-file; `spotlight certs` prints the lines for \
             each role), or pass --insecure to run plaintext without authentication on a \
             network you trust.",
            side.name(),
            missing
                .iter()
                .map(|m| format!("`{m}`"))
                .collect::<Vec<_>>()
                .join(", "),
            missing.join(", "),
        ))
    }
}

/// Security material held in memory (throwaway credentials, tests).
pub struct PemSecurity {
    /// Server certificate and key (coordinators and workers).
    pub server: Option<(Vec<u8>, Vec<u8>)>,
    /// The CA.
    pub ca: Vec<u8>,
    /// Require client certificates (servers) signed by `ca`.
    pub mtls: bool,
    /// Client certificate and key to present.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Accepted tokens (servers).
    pub tokens: Option<Vec<TokenEntry>>,
    /// Own bearer token.
    pub token: Option<Secret>,
}

/// The loaded security of one process. Cheap to clone; reloads happen in place.
#[derive(Debug, Clone, Default)]
pub struct Security {
    server: Option<Arc<ServerTls>>,
    client: Option<ClientTls>,
    tokens: Option<Arc<TokenStore>>,
    bearer: Option<AsciiMetadataValue>,
    reload: Option<Duration>,
    protect_metrics: bool,
}

impl Security {
    /// Plaintext, unauthenticated.
    pub fn insecure() -> Self {
        Self::default()
    }

    /// Loads whatever `config` names (nothing when `insecure`).
    pub fn load(config: &SecurityConfig) -> Result<Self, SecurityError> {
        if config.insecure {
            return Ok(Self::insecure());
        }
        let server = match (&config.cert, &config.key) {
            (Some(cert), Some(key)) => {
                let client_ca = if config.mtls {
                    Some(config.ca.clone().ok_or_else(|| {
                        SecurityError("mtls needs `ca`: the CA client certificates chain to".into())
                    })?)
                } else {
                    None
                };
                Some(Arc::new(ServerTls::from_files(
                    cert.clone(),
                    key.clone(),
                    client_ca,
                )?))
            }
            (None, None) => None,
            _ => return Err(SecurityError("`cert` and `key` go together".into())),
        };
        let client = match &config.ca {
            Some(ca) => {
                let ca_pem = std::fs::read(ca)
                    .map_err(|e| SecurityError(format!("CA {}: {e}", ca.display())))?;
                let identity = if config.mtls {
                    match (&config.cert, &config.key) {
                        (Some(c), Some(k)) => Some((
                            std::fs::read(c)
                                .map_err(|e| SecurityError(format!("{}: {e}", c.display())))?,
                            std::fs::read(k)
                                .map_err(|e| SecurityError(format!("{}: {e}", k.display())))?,
                        )),
                        _ => {
                            return Err(SecurityError(
                                "mtls needs `cert` and `key`: the client certificate to present"
                                    .into(),
                            ));
                        }
                    }
                } else {
                    None
                };
                Some(ClientTls::new(
                    ca_pem,
                    identity,
                    config.server_name.clone(),
                )?)
            }
            None => None,
        };
        let tokens = config
            .tokens
            .as_ref()
            .map(|p| TokenStore::load(p).map(Arc::new))
            .transpose()?;
        let token = match &config.token {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| SecurityError(format!("token file {}: {e}", p.display())))?;
                let t = text.trim();
                if t.is_empty() {
                    return Err(SecurityError(format!(
                        "token file {} is empty",
                        p.display()
                    )));
                }
                Some(Secret::new(t))
            }
            None => None,
        };
        let mut s = Self {
            server,
            client,
            tokens,
            bearer: None,
            reload: Some(Duration::from_millis(config.reload_ms.max(100))),
            protect_metrics: config.protect_metrics,
        };
        s.set_token(token)?;
        Ok(s)
    }

    /// From PEM material in memory.
    pub fn from_pem(p: PemSecurity) -> Result<Self, SecurityError> {
        let server = p
            .server
            .map(|(cert, key)| {
                ServerTls::from_pem(&cert, &key, p.mtls.then_some(p.ca.as_slice())).map(Arc::new)
            })
            .transpose()?;
        let client = Some(ClientTls::new(p.ca, p.client_identity, None)?);
        let tokens = p
            .tokens
            .map(|t| TokenStore::from_entries(t).map(Arc::new))
            .transpose()?;
        let mut s = Self {
            server,
            client,
            tokens,
            bearer: None,
            reload: None,
            protect_metrics: false,
        };
        s.set_token(p.token)?;
        Ok(s)
    }

    fn set_token(&mut self, token: Option<Secret>) -> Result<(), SecurityError> {
        self.bearer = token
            .map(|t| {
                let mut v = AsciiMetadataValue::try_from(format!("Bearer {}", t.expose()))
                    .map_err(|_| {
                        SecurityError("the token holds characters a header cannot carry".into())
                    })?;
                v.set_sensitive(true);
                Ok::<_, SecurityError>(v)
            })
            .transpose()?;
        Ok(())
    }

    /// Whether this process serves and dials TLS.
    pub fn tls(&self) -> bool {
        self.server.is_some() || self.client.is_some()
    }

    /// `https` with TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.server.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Whether calls are checked against a tokens file.
    pub fn authenticates(&self) -> bool {
        self.tokens.is_some()
    }

    /// Checks an `authorization` header value for `access`. Open (returns `None`) when no
    /// tokens are configured.
    pub fn authorize(
        &self,
        header: Option<&str>,
        access: Access,
    ) -> Result<Option<Principal>, AuthError> {
        match &self.tokens {
            None => Ok(None),
            Some(store) => store.authorize(header, access).map(Some),
        }
    }

    /// [`Security::authorize`] for gRPC metadata.
    pub fn authorize_grpc(
        &self,
        metadata: &MetadataMap,
        access: Access,
    ) -> Result<Option<Principal>, tonic::Status> {
        let header = metadata
            .get("authorization")
            .map(|v| v.to_str().unwrap_or("<not ascii>"));
        self.authorize(header, access).map_err(|e| {
            tracing::debug!(?access, error = %e, "call refused");
            e.into()
        })
    }

    /// [`Security::authorize`] for HTTP headers.
    pub fn authorize_http(
        &self,
        headers: &axum::http::HeaderMap,
        access: Access,
    ) -> Result<Option<Principal>, AuthError> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("<not ascii>"));
        self.authorize(header, access)
    }

    /// Whether `GET /metrics` needs a reader token (`[security] protect_metrics`).
    pub fn with_protected_metrics(mut self, protect: bool) -> Self {
        self.protect_metrics = protect;
        self
    }

    /// Checks a `GET /metrics`: open unless `protect_metrics`, then like any read.
    pub fn authorize_metrics(&self, headers: &axum::http::HeaderMap) -> Result<(), AuthError> {
        if self.protect_metrics {
            self.authorize_http(headers, Access::Read)?;
        }
        Ok(())
    }

    /// Adds this process's bearer token (if any) to an outgoing call.
    pub fn attach<T>(&self, request: &mut tonic::Request<T>) {
        if let Some(v) = &self.bearer {
            request.metadata_mut().insert("authorization", v.clone());
        }
    }

    /// An interceptor that adds this process's bearer token to every call of a client.
    pub fn interceptor(&self) -> BearerInterceptor {
        BearerInterceptor(self.bearer.clone())
    }

    /// The bearer header value, for HTTP clients.
    pub fn bearer(&self) -> Option<&AsciiMetadataValue> {
        self.bearer.as_ref()
    }

    /// A gRPC endpoint for `url`, with TLS when this process has a CA configured. A URL whose
    /// scheme disagrees with the configuration is an error, not a silent downgrade.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let https = url.starts_with("https://");
        if !https && !url.starts_with("http://") {
            return Err(format!("\"{url}\" must start with http:// or https://"));
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("\"{url}\" is not a valid URI: {e}"))?;
        match (&self.client, https) {
            (Some(tls), true) => endpoint
                .tls_config(tls.tonic())
                .map_err(|e| format!("TLS for {url}: {e}")),
            (Some(_), false) => Err(format!(
                "\"{url}\" is plaintext but TLS is configured: use https://"
            )),
            (None, true) => Err(format!(
                "\"{url}\" needs TLS but no CA is configured to verify it: set [security] ca \
                 (or --ca), or use http:// with --insecure"
            )),
            (None, false) => Ok(endpoint),
        }
    }

    /// Accepted connections of `listener`: TLS when this process has a certificate.
    pub fn incoming(
        &self,
        listener: tokio::net::TcpListener,
        alpn: Alpn,
    ) -> std::io::Result<Incoming> {
        Incoming::new(listener, self.server.clone().map(|s| (s, alpn)))
    }

    /// Starts checking the files for changes every `reload_ms` (no-op for in-memory
    /// material). Stops by itself once every clone of this `Security` is gone.
    pub fn spawn_reloader(&self) {
        let Some(period) = self.reload else { return };
        let server: Option<Weak<ServerTls>> = self.server.as_ref().map(Arc::downgrade);
        let tokens: Option<Weak<TokenStore>> = self.tokens.as_ref().map(Arc::downgrade);
        if server.is_none() && tokens.is_none() {
            return;
        }
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let s = server.as_ref().and_then(Weak::upgrade);
                let t = tokens.as_ref().and_then(Weak::upgrade);
                if s.is_none() && t.is_none() {
                    break;
                }
                if let Some(s) = s {
                    match s.reload_if_changed() {
                        Ok(true) => tracing::info!("TLS certificate reloaded"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "TLS certificate not reloaded; the old one stays")
                        }
                    }
                }
                if let Some(t) = t {
                    match t.reload_if_changed() {
                        Ok(true) => tracing::info!("tokens reloaded"),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "tokens not reloaded; the old ones stay")
                        }
                    }
                }
            }
        });
    }
}

/// Adds a bearer token to every call (`Client::with_interceptor`).
#[derive(Clone)]
pub struct BearerInterceptor(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for BearerInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A gRPC channel that carries a bearer token on every call.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerInterceptor>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_configured_is_refused_with_how_to() {
        let e = SecurityConfig::default()
            .require(Side::Coordinator)
            .unwrap_err();
        for needle in ["spotlight certs", "--insecure", "`cert`", "`tokens`"] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let insecure = SecurityConfig {
            insecure: true,
            ..SecurityConfig::default()
        };
        assert!(insecure.require(Side::Coordinator).is_ok());
        let edge = SecurityConfig {
            ca: Some("ca.pem".into()),
            token: Some("edge.token".into()),
            ..SecurityConfig::default()
        };
        assert!(edge.require(Side::Edge).is_ok());
        assert!(edge.require(Side::Worker).unwrap_err().contains("`cert`"));
    }

    #[test]
    fn endpoint_refuses_a_scheme_that_disagrees() {
        let plain = Security::insecure();
        assert!(plain.endpoint("http://127.0.0.1:1").is_ok());
        assert!(
            plain
                .endpoint("https://127.0.0.1:1")
                .unwrap_err()
                .contains("no CA")
        );
        assert!(plain.endpoint("127.0.0.1:1").is_err());
        let pki = certs::DevPki::generate(&[]).unwrap();
        let edge = pki.security(Role::Edge, false).unwrap();
        assert!(
            edge.endpoint("http://127.0.0.1:1")
                .unwrap_err()
                .contains("https://")
        );
        assert!(edge.endpoint("https://127.0.0.1:1").is_ok());
    }

    #[test]
    fn metrics_are_open_unless_protected_then_need_a_reader() {
        let pki = certs::DevPki::generate(&[]).unwrap();
        let server = pki.security(Role::Coordinator, false).unwrap();
        let none = axum::http::HeaderMap::new();
        assert!(server.authorize_metrics(&none).is_ok(), "open by default");
        let server = server.with_protected_metrics(true);
        assert!(matches!(
            server.authorize_metrics(&none),
            Err(AuthError::Unauthenticated(_))
        ));
        let bearer = |role: Role| {
            let mut h = axum::http::HeaderMap::new();
            let v = format!("Bearer {}", pki.token(role).expose());
            h.insert(axum::http::header::AUTHORIZATION, v.parse().unwrap());
            h
        };
        assert!(server.authorize_metrics(&bearer(Role::Reader)).is_ok());
        assert!(server.authorize_metrics(&bearer(Role::Operator)).is_ok());
        assert!(server.authorize_metrics(&bearer(Role::Edge)).is_err());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let pki = certs::DevPki::generate(&[]).unwrap();
        let s = pki.security(Role::Edge, false).unwrap();
        let token = pki.token(Role::Edge).expose().to_string();
        assert!(!format!("{s:?}").contains(&token));
    }
}
