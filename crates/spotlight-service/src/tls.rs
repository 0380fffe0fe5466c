//! TLS for every listener and every client, with rustls (ring). Server certificates, keys
//! and the client CA are re-read when their files change, so certificates rotate without a
//! restart: connections made after the change use the new ones.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which application protocol a listener speaks (sent in ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC.
    H2,
    /// The HTTP/JSON APIs.
    Http1,
    /// The edge protocol over QUIC (TLS 1.3 only).
    Quic,
}

/// Where the PEM material comes from.
#[derive(Debug, Clone)]
enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
    },
    Memory {
        cert: Vec<u8>,
        key: Vec<u8>,
        client_ca: Option<Vec<u8>>,
    },
}

struct Loaded {
    h2: Arc<rustls::ServerConfig>,
    http1: Arc<rustls::ServerConfig>,
    quic: Arc<rustls::ServerConfig>,
    stamps: Vec<Option<SystemTime>>,
}

/// A server's certificate and key (and, for mutual TLS, the CA its clients' certificates
/// must chain to), reloadable.
pub struct ServerTls {
    source: Source,
    loaded: RwLock<Loaded>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Paths only; never key material.
        match &self.source {
            Source::Files {
                cert, client_ca, ..
            } => f
                .debug_struct("ServerTls")
                .field("cert", cert)
                .field("client_ca", client_ca)
                .finish_non_exhaustive(),
            Source::Memory { client_ca, .. } => f
                .debug_struct("ServerTls")
                .field("in_memory", &true)
                .field("mtls", &client_ca.is_some())
                .finish_non_exhaustive(),
        }
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// Parses every certificate in a PEM bundle.
pub(crate) fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what}: not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{what}: no certificate in the PEM file"));
    }
    Ok(certs)
}

fn roots(pem: &[u8], what: &str) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(pem, what)? {
        roots
            .add(c)
            .map_err(|e| format!("{what}: unusable CA certificate: {e}"))?;
    }
    Ok(roots)
}

impl ServerTls {
    /// From PEM files; reloaded by [`ServerTls::reload_if_changed`].
    pub fn from_files(
        cert: PathBuf,
        key: PathBuf,
        client_ca: Option<PathBuf>,
    ) -> Result<Self, String> {
        Self::new(Source::Files {
            cert,
            key,
            client_ca,
        })
    }

    /// From PEM text in memory (throwaway credentials, tests).
    pub fn from_pem(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<Self, String> {
        Self::new(Source::Memory {
            cert: cert.to_vec(),
            key: key.to_vec(),
            client_ca: client_ca.map(<[u8]>::to_vec),
        })
    }

    fn new(source: Source) -> Result<Self, String> {
        let loaded = build(&source)?;
        Ok(Self {
            source,
            loaded: RwLock::new(loaded),
        })
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        match &self.source {
            Source::Files { client_ca, .. } => client_ca.is_some(),
            Source::Memory { client_ca, .. } => client_ca.is_some(),
        }
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        match &self.source {
            Source::Files {
                cert,
                key,
                client_ca,
            } => [Some(cert), Some(key), client_ca.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| stamp(p))
                .collect(),
            Source::Memory { .. } => Vec::new(),
        }
    }

    /// Re-reads the files if any changed. A broken new set is refused and the old one stays
    /// in force (the error says why).
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        if matches!(self.source, Source::Memory { .. }) {
            return Ok(false);
        }
        if self.stamps() == self.read().stamps {
            return Ok(false);
        }
        let loaded = build(&self.source)?;
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(true)
    }

    /// The rustls configuration in force for `alpn`.
    pub fn config(&self, alpn: Alpn) -> Arc<rustls::ServerConfig> {
        let loaded = self.read();
        match alpn {
            Alpn::H2 => loaded.h2.clone(),
            Alpn::Http1 => loaded.http1.clone(),
            Alpn::Quic => loaded.quic.clone(),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn build(source: &Source) -> Result<Loaded, String> {
    let (cert_pem, key_pem, ca_pem, stamps) = match source {
        Source::Files {
            cert,
            key,
            client_ca,
        } => {
            // Stamps first: a file replaced while we read it is read again next time.
            let stamps = [Some(cert), Some(key), client_ca.as_ref()]
                .into_iter()
                .flatten()
                .map(|p| stamp(p))
                .collect();
            (
                read(cert, "certificate")?,
                read(key, "private key")?,
                client_ca
                    .as_ref()
                    .map(|p| read(p, "client CA"))
                    .transpose()?,
                stamps,
            )
        }
        Source::Memory {
            cert,
            key,
            client_ca,
        } => (cert.clone(), key.clone(), client_ca.clone(), Vec::new()),
    };
    let chain = certs(&cert_pem, "certificate")?;
    let make = |alpn: &[&[u8]], tls13_only: bool| -> Result<Arc<rustls::ServerConfig>, String> {
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| format!("private key: not a PEM private key: {e}"))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider());
        let builder = if tls13_only {
            builder.with_protocol_versions(&[&rustls::version::TLS13])
        } else {
            builder.with_safe_default_protocol_versions()
        }
        .map_err(|e| e.to_string())?;
        let builder = match &ca_pem {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca, "client CA")?),
                    provider(),
                )
                .build()
                .map_err(|e| format!("client CA: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain.clone(), key)
            .map_err(|e| format!("certificate and key do not match or are unusable: {e}"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    };
    Ok(Loaded {
        h2: make(&[b"h2"], false)?,
        http1: make(&[b"http/1.1"], false)?,
        quic: make(&[crate::quic::ALPN], true)?,
        stamps,
    })
}

/// What a client trusts and, for mutual TLS, presents.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("mtls", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// A rustls client configuration (QUIC) that trusts the CA and, for mutual TLS,
    /// presents the identity.
    pub fn rustls(&self, alpn: &[u8]) -> Result<rustls::ClientConfig, String> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(&self.ca_pem, "CA")?);
        let mut config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    certs(cert, "client certificate")?,
                    PrivateKeyDer::from_pem_slice(key)
                        .map_err(|e| format!("client key: not a PEM private key: {e}"))?,
                )
                .map_err(|e| format!("client certificate: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Ok(config)
    }

    /// The name to verify the server under, if not the address's host.
    pub fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Trusts the CA in `ca_pem`; presents `identity` (certificate, key PEM) when set;
    /// verifies the server under `server_name` instead of the URL's host when set.
    pub fn new(
        ca_pem: Vec<u8>,
        identity: Option<(Vec<u8>, Vec<u8>)>,
        server_name: Option<String>,
    ) -> Result<Self, String> {
        roots(&ca_pem, "CA")?;
        if let Some((cert, key)) = &identity {
            certs(cert, "client certificate")?;
            PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("client key: not a PEM private key: {e}"))?;
        }
        Ok(Self {
            ca_pem,
            identity,
            server_name,
        })
    }

    /// The tonic client configuration.
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let mut c = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem));
        if let Some((cert, key)) = &self.identity {
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        if let Some(name) = &self.server_name {
            c = c.domain_name(name.clone());
        }
        c
    }
}

/// An accepted connection, plaintext or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.tcp().connect_info()
    }
}

/// Accepted connections of one listener: a stream for tonic, a listener for axum. The TCP
/// accept loop runs on its own task and TLS handshakes each on theirs, so a slow client never
/// holds up the next one. Every socket gets TCP_NODELAY (small answers must not wait for the
/// peer's delayed ACK).
pub struct Incoming {
    rx: mpsc::Receiver<(Conn, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Incoming {
    /// Serves `listener`, plaintext when `tls` is `None`.
    pub fn new(listener: TcpListener, tls: Option<(Arc<ServerTls>, Alpn)>) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(accept_loop(listener, tls, tx));
        Ok(Self { rx, local, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<(Arc<ServerTls>, Alpn)>,
    tx: mpsc::Sender<(Conn, SocketAddr)>,
) {
    loop {
        let (tcp, addr) = tokio::select! {
            _ = tx.closed() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        match &tls {
            None => {
                if tx.send((Conn::Plain(tcp), addr)).await.is_err() {
                    break;
                }
            }
            Some((server, alpn)) => {
                let acceptor = TlsAcceptor::from(server.config(*alpn));
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((Conn::Tls(Box::new(stream)), addr)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Conn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(|(conn, _)| Ok(conn)))
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop only ends when this receiver is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
