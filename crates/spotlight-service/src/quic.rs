//! QUIC between edge and coordinator (quinn over rustls): the protocol name, TLS
//! configurations from this process's [`Security`], and message framing.
//!
//! The protocol: the edge opens one bidirectional *control* stream and sends its hello (an
//! `EdgeMessage`, with the bearer token in `Hello.authorization`); the coordinator answers
//! `Ready` on it, or closes the connection with the gRPC status code as the application
//! error code and the message as the reason. Then every edge message (a frame or a frame
//! batch) goes on a bidirectional stream of its own, and its answers come back on that
//! stream: a lost packet delays only the frames of its own stream. Each message on a stream
//! is a 4-byte big-endian length and the protobuf.

use std::sync::Arc;

use crate::{Security, SecurityError};

/// ALPN protocol name.
pub const ALPN: &[u8] = b"spotlight/1";

/// Largest message read from a stream (as gRPC's limit on the coordinator).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Writes one length-prefixed message.
pub async fn write_msg<M: prost::Message>(
    send: &mut quinn::SendStream,
    message: &M,
) -> Result<(), String> {
    let body = message.encode_to_vec();
    let len = u32::try_from(body.len()).map_err(|_| "message too large".to_string())?;
    let mut framed = Vec::with_capacity(4 + body.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&body);
    send.write_all(&framed).await.map_err(|e| e.to_string())
}

/// Reads one length-prefixed message; `None` at a clean end of the stream.
pub async fn read_msg<M: prost::Message + Default>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<M>, String> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(format!(
            "message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES}"
        ));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    M::decode(body.as_slice())
        .map(Some)
        .map_err(|e| format!("not a valid message: {e}"))
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    // Room for every frame of a full window on its own stream.
    t.max_concurrent_bidi_streams(4096u32.into());
    t.keep_alive_interval(Some(std::time::Duration::from_secs(5)));
    // Random loss on a radio link is not congestion: BBR (as the kernel's TCP here) keeps
    // its rate where loss-based controllers halve it.
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    Arc::new(t)
}

impl Security {
    /// The rustls configuration QUIC connections get now (certificate files are reloaded
    /// when they change); `None` under `--insecure`. A server compares it with the one its
    /// endpoint was given and, when it differs, gives the endpoint a fresh
    /// [`Security::quic_server_config`], so new connections see rotated certificates.
    pub fn quic_server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.server.as_ref().map(|s| s.config(crate::Alpn::Quic))
    }

    /// The coordinator's QUIC server configuration: its certificate (with mutual TLS when
    /// configured), or, under `--insecure`, a throwaway self-signed one.
    pub fn quic_server_config(&self) -> Result<quinn::ServerConfig, SecurityError> {
        let tls = match &self.server {
            Some(server) => server.config(crate::Alpn::Quic),
            None => {
                let throwaway =
                    rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
                        .map_err(|e| SecurityError(format!("throwaway QUIC certificate: {e}")))?;
                crate::ServerTls::from_pem(
                    throwaway.cert.pem().as_bytes(),
                    throwaway.signing_key.serialize_pem().as_bytes(),
                    None,
                )?
                .config(crate::Alpn::Quic)
            }
        };
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| SecurityError(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport());
        Ok(config)
    }

    /// The edge's QUIC client configuration: it verifies the coordinator against the CA
    /// (presenting its certificate under mutual TLS), or, under `--insecure`, not at all.
    pub fn quic_client_config(&self) -> Result<quinn::ClientConfig, SecurityError> {
        let tls = match &self.client {
            Some(client) => client.rustls(ALPN)?,
            None => {
                let mut c = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| SecurityError(e.to_string()))?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerification))
                    .with_no_client_auth();
                c.alpn_protocols = vec![ALPN.to_vec()];
                c
            }
        };
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| SecurityError(format!("QUIC TLS: {e}")))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport());
        Ok(config)
    }

    /// The name to verify the coordinator under: the configured `server_name`, else `host`.
    pub fn quic_server_name<'a>(&'a self, host: &'a str) -> &'a str {
        self.client
            .as_ref()
            .and_then(|c| c.server_name())
            .unwrap_or(host)
    }

    /// `Bearer <token>` for `Hello.authorization`, if this process has a token.
    pub fn bearer_string(&self) -> String {
        self.bearer
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }
}

/// `--insecure` over QUIC: TLS still encrypts, but the server is not authenticated.
#[derive(Debug)]
struct NoVerification;

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &crate::tls::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &crate::tls::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        crate::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
