//! Security configured: TLS on every channel, a bearer token per role. Unauthenticated and
//! unauthorised calls are refused and change nothing, an impostor worker gets no frame,
//! mutual TLS refuses clients without a certificate, and certificates and tokens rotate
//! without a restart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use spotlight_codec::Codec;
use spotlight_coordinator::CoordinatorConfig;
use spotlight_proto::v1 as pb;
use spotlight_service::certs::DevPki;
use spotlight_service::{AuthChannel, PemSecurity, Role, Security, SecurityConfig};
use spotlight_tests::{Sandbox, collect, features, frames, hello, model, test_images};
use spotlight_worker::WorkerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;

type Control = pb::control_client::ControlClient<AuthChannel>;

/// A client that trusts `ca_pem` and carries `token` (none: no token at all).
fn client_security(ca_pem: &str, token: Option<&spotlight_service::Secret>) -> Security {
    Security::from_pem(PemSecurity {
        server: None,
        ca: ca_pem.as_bytes().to_vec(),
        mtls: false,
        client_identity: None,
        tokens: None,
        token: token.cloned(),
    })
    .expect("client security")
}

/// Whether a QUIC handshake with the coordinator at `addr` succeeds for a client that
/// verifies it against `security`'s CA.
async fn quic_handshake(security: &Security, addr: std::net::SocketAddr) -> bool {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("socket");
    endpoint.set_default_client_config(security.quic_client_config().expect("QUIC config"));
    let done = match endpoint.connect(addr, security.quic_server_name("127.0.0.1")) {
        Ok(connecting) => matches!(
            tokio::time::timeout(Duration::from_secs(5), connecting).await,
            Ok(Ok(_))
        ),
        Err(_) => false,
    };
    endpoint.close(0u32.into(), b"checked");
    done
}

async fn channel(security: &Security, url: &str) -> Result<AuthChannel, tonic::transport::Error> {
    let endpoint = security
        .endpoint(url)
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint.connect().await?;
    Ok(tonic::service::interceptor::InterceptedService::new(
        channel,
        security.interceptor(),
    ))
}

async fn control(security: &Security, url: &str) -> Control {
    pb::control_client::ControlClient::new(channel(security, url).await.expect("connect"))
}

/// Starts a coordinator with `security`.
async fn coordinator(security: Security) -> Sandbox {
    let config = CoordinatorConfig {
        lease_ttl_ms: 2000,
        no_worker_wait_ms: 2000,
        security,
        ..CoordinatorConfig::default()
    };
    Sandbox::start_coordinator(model(), config).await
}

/// Starts a worker hosting every branch; returns its address and stopper.
async fn worker(
    sandbox: &Sandbox,
    security: Security,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), spotlight_worker::WorkerError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = WorkerConfig {
        worker_id: "w-secure".into(),
        coordinator: format!("https://{}", sandbox.grpc),
        heartbeat_ms: 300,
        security,
        ..WorkerConfig::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(spotlight_worker::run(config, model(), listener, async {
        let _ = rx.await;
    }));
    (addr, tx, join)
}

async fn wait_for_workers(control: &mut Control, n: usize) {
    for _ in 0..300 {
        let live = control
            .list_workers(pb::ListWorkersRequest {})
            .await
            .expect("list workers")
            .into_inner()
            .workers
            .len();
        if live == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{n} workers did not register within 15 s");
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Streams `n` test frames with `security`; returns the answers by seq.
async fn stream(
    security: &Security,
    url: &str,
    n: usize,
) -> Result<std::collections::BTreeMap<u64, pb::cloud_message::Kind>, tonic::Status> {
    let m = model();
    let (images, _) = test_images(n);
    let msgs = frames(&m, &features(&m, &images), Codec::Int8);
    let (tx, rx) = tokio::sync::mpsc::channel(n + 1);
    tx.send(hello(m.hash())).await.expect("hello");
    for f in msgs {
        tx.send(f).await.expect("frame");
    }
    let mut client = pb::inference_client::InferenceClient::new(
        channel(security, url)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?,
    );
    let mut inbound = client
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    match inbound.message().await?.and_then(|m| m.kind) {
        Some(pb::cloud_message::Kind::Ready(_)) => {}
        other => panic!("expected ready, got {other:?}"),
    }
    Ok(collect(&mut inbound, n).await)
}

fn all_predictions(answers: &std::collections::BTreeMap<u64, pb::cloud_message::Kind>) -> usize {
    answers
        .values()
        .filter(|k| matches!(k, pb::cloud_message::Kind::Prediction(_)))
        .count()
}

/// One HTTP/1.1 request over TLS; returns the status code and the whole response.
async fn https(
    ca_pem: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&spotlight_service::Secret>,
    body: &str,
) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");
    let auth = token
        .map(|t| format!("Authorization: Bearer {}\r\n", t.expose()))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    // The server may close without close_notify; what arrived is the response.
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_is_checked_against_its_role_and_impostors_get_nothing() {
    let pki = DevPki::generate(&[]).expect("pki");
    let sandbox = coordinator(pki.security(Role::Coordinator, false).expect("sec")).await;
    let url = format!("https://{}", sandbox.grpc);
    let (worker_addr, stop_worker, worker_join) =
        worker(&sandbox, pki.security(Role::Worker, false).expect("sec")).await;
    let ca = pki.ca_pem.as_str();
    let as_role = |r: Role| client_security(ca, Some(pki.token(r)));
    let anonymous = client_security(ca, None);

    let mut operator = control(&as_role(Role::Operator), &url).await;
    wait_for_workers(&mut operator, 1).await;
    let mut reader = control(&as_role(Role::Reader), &url).await;
    let mut edge = control(&as_role(Role::Edge), &url).await;
    let mut nobody = control(&anonymous, &url).await;
    let set = |c: &'static str| pb::SetTaskRequest {
        categories: vec![c.to_string()],
        gains: Default::default(),
    };

    // Control: reads need reader or operator; changes need operator.
    assert_eq!(
        code(nobody.get_task(pb::GetTaskRequest {}).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(nobody.set_task(set("Bag")).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(reader.set_task(set("Bag")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(edge.set_task(set("Bag")).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(edge.list_workers(pb::ListWorkersRequest {}).await),
        Code::PermissionDenied
    );
    assert_eq!(
        reader
            .get_task(pb::GetTaskRequest {})
            .await
            .expect("reader reads")
            .into_inner()
            .version,
        1,
        "refused changes changed nothing"
    );
    let t = operator
        .set_task(pb::SetTaskRequest::default())
        .await
        .expect("operator changes the task")
        .into_inner();
    assert_eq!(t.version, 2);

    // Registry: only worker credentials register, renew or deregister; lease ids cannot be
    // guessed.
    let impostor = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let impostor_addr = impostor.local_addr().expect("addr");
    let dialled = Arc::new(AtomicUsize::new(0));
    {
        let dialled = dialled.clone();
        tokio::spawn(async move {
            while impostor.accept().await.is_ok() {
                dialled.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let register = pb::RegisterRequest {
        worker_id: "impostor".into(),
        endpoint: format!("https://{impostor_addr}"),
        segments: model().segments().iter().map(|s| s.id.clone()).collect(),
        model_hash: model().hash().to_string(),
    };
    for (who, expected) in [
        (None, Code::Unauthenticated),
        (Some(Role::Edge), Code::PermissionDenied),
        (Some(Role::Operator), Code::PermissionDenied),
        (Some(Role::Reader), Code::PermissionDenied),
    ] {
        let security = match who {
            Some(r) => as_role(r),
            None => anonymous.clone(),
        };
        let mut registry = pb::registry_client::RegistryClient::new(
            channel(&security, &url).await.expect("connect"),
        );
        assert_eq!(
            code(registry.register(register.clone()).await),
            expected,
            "{who:?}"
        );
        assert_eq!(
            code(
                registry
                    .heartbeat(pb::HeartbeatRequest {
                        lease_id: 1,
                        worker_id: "w-secure".into()
                    })
                    .await
            ),
            expected
        );
        assert_eq!(
            code(
                registry
                    .deregister(pb::DeregisterRequest { lease_id: 1 })
                    .await
            ),
            expected
        );
    }
    let mut registry = pb::registry_client::RegistryClient::new(
        channel(&as_role(Role::Worker), &url)
            .await
            .expect("connect"),
    );
    for lease_id in 0..500u64 {
        assert_eq!(
            code(
                registry
                    .deregister(pb::DeregisterRequest { lease_id })
                    .await
            ),
            Code::NotFound,
            "lease {lease_id} guessed"
        );
    }
    let listed = reader
        .list_workers(pb::ListWorkersRequest {})
        .await
        .expect("list")
        .into_inner()
        .workers;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].worker_id, "w-secure", "{listed:?}");

    // Inference: only edge tokens stream; frames reach the real worker, never the impostor.
    assert_eq!(
        code(stream(&anonymous, &url, 5).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(stream(&as_role(Role::Reader), &url, 5).await),
        Code::PermissionDenied
    );
    let answers = stream(&as_role(Role::Edge), &url, 50)
        .await
        .expect("edge streams");
    assert_eq!(all_predictions(&answers), 50, "{answers:?}");
    assert_eq!(
        dialled.load(Ordering::SeqCst),
        0,
        "the impostor was never dialled"
    );

    // A worker's Branches service answers only the coordinator.
    let worker_url = format!("https://{worker_addr}");
    for (who, expected) in [
        (anonymous.clone(), Code::Unauthenticated),
        (as_role(Role::Edge), Code::PermissionDenied),
        (as_role(Role::Worker), Code::PermissionDenied),
    ] {
        let mut b = pb::branches_client::BranchesClient::new(
            channel(&who, &worker_url).await.expect("connect worker"),
        );
        assert_eq!(code(b.stats(pb::StatsRequest {}).await), expected);
        assert_eq!(
            code(
                b.run(pb::RunRequest {
                    model_hash: model().hash().to_string(),
                    ..Default::default()
                })
                .await
            ),
            expected
        );
    }

    // Plaintext against a TLS port gets nothing.
    let plain = Security::insecure();
    let plain_call = async {
        let ch = channel(&plain, &format!("http://{}", sandbox.grpc)).await?;
        Ok::<_, tonic::transport::Error>(
            pb::control_client::ControlClient::new(ch)
                .get_task(pb::GetTaskRequest {})
                .await,
        )
    };
    match tokio::time::timeout(Duration::from_secs(10), plain_call).await {
        Ok(Ok(Ok(task))) => panic!("plaintext call answered: {task:?}"),
        Ok(_) => {}
        Err(_) => panic!("plaintext call neither failed nor answered within 10 s"),
    }

    // HTTP: probes open; reads need reader or operator; changes need operator.
    let h = sandbox.http;
    assert_eq!(https(ca, h, "GET", "/livez", None, "").await.0, 200);
    let (status, text) = https(ca, h, "GET", "/v1/task", None, "").await;
    assert_eq!(status, 401, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{text}"
    );
    assert_eq!(
        https(ca, h, "GET", "/v1/task", Some(pki.token(Role::Reader)), "")
            .await
            .0,
        200
    );
    assert_eq!(
        https(ca, h, "GET", "/v1/workers", Some(pki.token(Role::Edge)), "")
            .await
            .0,
        403
    );
    let body = r#"{"categories": ["Bag"]}"#;
    let (status, text) = https(
        ca,
        h,
        "PUT",
        "/v1/task",
        Some(pki.token(Role::Reader)),
        body,
    )
    .await;
    assert_eq!(status, 403, "{text}");
    assert!(text.contains("permission_denied"), "{text}");
    let (status, text) = https(
        ca,
        h,
        "PUT",
        "/v1/task",
        Some(pki.token(Role::Operator)),
        body,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\"version\":3"), "{text}");

    let _ = stop_worker.send(());
    let r = tokio::time::timeout(Duration::from_secs(10), worker_join).await;
    assert!(matches!(r, Ok(Ok(Ok(())))), "worker stopped cleanly: {r:?}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_without_worker_credentials_is_refused_at_once() {
    let pki = DevPki::generate(&[]).expect("pki");
    let sandbox = coordinator(pki.security(Role::Coordinator, false).expect("sec")).await;
    // A worker process holding an edge token instead of a worker token.
    let leaf = pki.leaf("worker");
    let wrong = Security::from_pem(PemSecurity {
        server: Some((
            leaf.cert_pem.as_bytes().to_vec(),
            leaf.key_pem.expose().as_bytes().to_vec(),
        )),
        ca: pki.ca_pem.as_bytes().to_vec(),
        mtls: false,
        client_identity: None,
        tokens: Some(pki.token_entries()),
        token: Some(pki.token(Role::Edge).clone()),
    })
    .expect("sec");
    let (_, _stop, join) = worker(&sandbox, wrong).await;
    let result = tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("a refused worker exits instead of retrying")
        .expect("join");
    let err = result.expect_err("refused").to_string();
    assert!(err.contains("may not register workers"), "{err}");
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_refuses_clients_without_a_certificate() {
    let pki = DevPki::generate(&[]).expect("pki");
    let sandbox = coordinator(pki.security(Role::Coordinator, true).expect("sec")).await;
    let url = format!("https://{}", sandbox.grpc);
    // The worker presents its certificate to register, and requires the coordinator's.
    let (_, stop_worker, _) =
        worker(&sandbox, pki.security(Role::Worker, true).expect("sec")).await;
    let operator = pki.security(Role::Operator, true).expect("sec");
    wait_for_workers(&mut control(&operator, &url).await, 1).await;

    // Right token, trusted CA, but no client certificate: no call gets through.
    let no_cert = client_security(&pki.ca_pem, Some(pki.token(Role::Edge)));
    let refused = tokio::time::timeout(Duration::from_secs(10), stream(&no_cert, &url, 3))
        .await
        .expect("refused promptly");
    assert!(refused.is_err(), "a client without a certificate streamed");

    let answers = stream(&pki.security(Role::Edge, true).expect("sec"), &url, 20)
        .await
        .expect("an edge with its certificate streams");
    assert_eq!(all_predictions(&answers), 20);
    let _ = stop_worker.send(());
    sandbox.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_and_tokens_rotate_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = DevPki::generate(&[]).expect("pki");
    old.write(dir.path(), false).expect("write");
    let f = |n: &str| Some(dir.path().join(n));
    let config = SecurityConfig {
        ca: f("ca.pem"),
        cert: f("coordinator.pem"),
        key: f("coordinator.key"),
        tokens: f("tokens.toml"),
        token: f("coordinator.token"),
        reload_ms: 100,
        ..SecurityConfig::default()
    };
    let sandbox = coordinator(Security::load(&config).expect("load")).await;
    let url = format!("https://{}", sandbox.grpc);
    let old_reader = client_security(&old.ca_pem, Some(old.token(Role::Reader)));
    control(&old_reader, &url)
        .await
        .get_task(pb::GetTaskRequest {})
        .await
        .expect("old credentials work");
    assert!(
        quic_handshake(&old_reader, sandbox.grpc).await,
        "QUIC serves the first certificate"
    );

    let new = DevPki::generate(&[]).expect("pki");
    new.write(dir.path(), true).expect("rotate");
    let new_reader = client_security(&new.ca_pem, Some(new.token(Role::Reader)));
    let mut rotated = false;
    for _ in 0..100 {
        if let Ok(ch) = channel(&new_reader, &url).await
            && pb::control_client::ControlClient::new(ch)
                .get_task(pb::GetTaskRequest {})
                .await
                .is_ok()
        {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rotated, "new certificate and token not in force within 5 s");
    // A client that trusts only the old CA cannot verify the new certificate.
    let old_ca_refused = match channel(&old_reader, &url).await {
        Err(_) => true,
        Ok(ch) => pb::control_client::ControlClient::new(ch)
            .get_task(pb::GetTaskRequest {})
            .await
            .is_err(),
    };
    assert!(old_ca_refused, "the old certificate is still served");
    // QUIC (same address, UDP) serves the new certificate to new connections too.
    assert!(
        quic_handshake(&new_reader, sandbox.grpc).await,
        "QUIC does not serve the rotated certificate"
    );
    assert!(
        !quic_handshake(&old_reader, sandbox.grpc).await,
        "QUIC still serves the old certificate"
    );
    let mixed = client_security(&new.ca_pem, Some(old.token(Role::Reader)));
    assert_eq!(
        code(
            control(&mixed, &url)
                .await
                .get_task(pb::GetTaskRequest {})
                .await
        ),
        Code::Unauthenticated,
        "the old token was revoked by the new tokens file"
    );
    sandbox.stop().await;
}
