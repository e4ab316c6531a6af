//! Trust, through the assembled server on loopback with TLS: static tokens (plain and sha256,
//! reloaded), roles, node-bound pushes, client certificates from a test CA (rcgen), certificate
//! reload, takeover attempts, and the refusal to serve gRPC off loopback without auth. Every
//! refusal asserts its status code, that nothing was stored, and the counter that counts it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::{sync::Arc, time::Duration};

use gpulse_collector::{
    auth::{AuthConfig, ServiceAccounts, keys::KeySource},
    server::{self, Running, ServerConfig},
    state::StoreConfig,
    tls::TlsFiles,
};
use gpulse_proto::{
    client::ClientOptions,
    v1::{Batch, StatusRequest, ingest_client::IngestClient, telemetry_client::TelemetryClient},
};
use gpulse_test_pki::{CLUSTER_ISSUER, TestCa, TestIssuer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

const AGENT_A: &str = "agent-token-for-node-a-0001";
const READER: &str = "reader-token-for-dashboards-0002";
const HASHED_READER: &str = "reader-token-kept-hashed-0003";

fn sha256_hex(token: &str) -> String {
    gpulse_collector::auth::tokens::digest(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
    issuer: TestIssuer,
    jwks: std::path::PathBuf,
    ca: TestCa,
    ca_file: std::path::PathBuf,
    tokens: std::path::PathBuf,
    running: Running,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Setup {
    async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let ca = TestCa::new("gpulse test CA").unwrap();
        let ca_file = ca.write(&dir, "ca.crt").unwrap();
        let (cert, key) = ca
            .write_pair(&dir, "server", &["localhost", "127.0.0.1"])
            .unwrap();
        let tokens = dir.join("tokens");
        std::fs::write(
            &tokens,
            format!(
                "# test tokens\nagent {AGENT_A} node=node-a\nreader {READER}\nreader sha256:{}\n",
                sha256_hex(HASHED_READER)
            ),
        )
        .unwrap();
        let mut cfg = ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            StoreConfig::new(dir.join("data")),
        );
        cfg.tls = Some(TlsFiles {
            cert,
            key,
            client_ca: Some(ca_file.clone()),
        });
        let issuer = TestIssuer::new("k1").unwrap();
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, TestIssuer::jwks(&[&issuer])).unwrap();
        cfg.auth = AuthConfig {
            tokens: Some(tokens.clone()),
            service_accounts: Some(ServiceAccounts {
                jwks: KeySource::file(jwks.clone()),
                issuer: CLUSTER_ISSUER.into(),
                audience: "gpulse".into(),
                agents: vec!["gpulse:gpulse-agent".into()],
                readers: vec!["monitoring:grafana".into()],
            }),
            client_certs: true,
        };
        cfg.mcp = Some(gpulse_mcp::http::HttpOptions {
            loopback: true,
            ..Default::default()
        });
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = server::start(cfg, async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
        Self {
            _dir: tmp,
            dir,
            issuer,
            jwks,
            ca,
            ca_file,
            tokens,
            running,
            _stop: stop,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running.grpc_addr.port())
    }

    fn token_file(&self, token: &str) -> std::path::PathBuf {
        let p = self.dir.join(format!("tok-{}", &sha256_hex(token)[..8]));
        std::fs::write(&p, format!("{token}\n")).unwrap();
        p
    }

    /// Client options trusting the test CA, with this token (if any).
    fn opts(&self, token: Option<&str>) -> ClientOptions {
        ClientOptions {
            ca_file: Some(self.ca_file.clone()),
            token_file: token.map(|t| self.token_file(t)),
            ..Default::default()
        }
    }

    async fn channel(&self, opts: &ClientOptions) -> gpulse_proto::client::AuthChannel {
        let ch = opts.endpoint(&self.url()).unwrap().connect().await.unwrap();
        opts.credentials().unwrap().wrap(ch)
    }

    async fn stored(&self) -> u64 {
        let ch = self.channel(&self.opts(Some(READER))).await;
        common::agent_events(
            &TelemetryClient::new(ch)
                .status(StatusRequest {})
                .await
                .unwrap()
                .into_inner(),
        )
    }

    fn refused(&self, reason: &str) -> u64 {
        self.running
            .metrics
            .auth_refused
            .with_label_values(&[reason])
            .get()
    }
}

/// Opens a Push stream, says hello and sends one XID for `node` under `agent_id`; the first
/// error status, or Ok once the XID is acknowledged.
async fn push_one(
    ch: gpulse_proto::client::AuthChannel,
    agent_id: &str,
    node: &str,
) -> Result<(), tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let batch = |first_seq, events| Batch {
        agent_id: agent_id.into(),
        node: node.into(),
        boot_id: "b".into(),
        first_seq,
        events,
        delivered_through: 0,
    };
    tx.send(batch(0, vec![])).await.unwrap();
    tx.send(batch(1, vec![common::xid(79, "fell off the bus")]))
        .await
        .unwrap();
    let mut acks = IngestClient::new(ch)
        .push(ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), acks.message())
            .await
            .expect("no answer within 5 s")?
        {
            Some(a) if a.through_seq >= 1 => return Ok(()),
            Some(_) => continue,
            None => return Err(tonic::Status::unavailable("stream ended")),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_roles_and_node_binding() {
    let s = Setup::start().await;
    let url = s.url();

    // No credentials at all.
    let e = push_one(s.channel(&s.opts(None)).await, "node-a/1", "node-a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(s.refused("missing_credentials"), 1);
    // A token nobody issued.
    let e = push_one(
        s.channel(&s.opts(Some("forged-token-forged-token"))).await,
        "node-a/1",
        "node-a",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert_eq!(s.refused("bad_token"), 1);
    // A reader may not push.
    let e = push_one(s.channel(&s.opts(Some(READER))).await, "node-a/1", "node-a")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(s.refused("wrong_role"), 1);
    // node-a's agent may not speak for node-b, nor under node-b's agent id.
    let agent = s.opts(Some(AGENT_A));
    for (id, node) in [
        ("node-b/1", "node-b"),
        ("node-a/1", "node-b"),
        ("node-b/1", "node-a"),
    ] {
        let e = push_one(s.channel(&agent).await, id, node)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{id} {node}: {e:?}");
        assert!(e.message().contains("node-a"), "{e:?}");
    }
    assert_eq!(s.refused("other_node"), 3);
    assert_eq!(s.stored().await, 0, "nothing refused was stored");
    let exposition = s.running.metrics.render().unwrap();
    assert!(!exposition.contains("node=\"node-b\""), "nor counted");
    assert!(
        !exposition.contains("gpulse_xid_events_total{"),
        "nor counted"
    );

    // Its own node: stored.
    push_one(s.channel(&agent).await, "node-a/1", "node-a")
        .await
        .unwrap();
    assert_eq!(s.stored().await, 1);
    // An agent token reads nothing.
    let e = TelemetryClient::new(s.channel(&agent).await)
        .status(StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Readers read, with the plain or the hashed token.
    for t in [READER, HASHED_READER] {
        let st = TelemetryClient::new(s.channel(&s.opts(Some(t))).await)
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(common::agent_events(&st), 1, "{t}");
    }
    // Health answers probes without credentials.
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(s.channel(&s.opts(None)).await);
    let st = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.status, 1, "SERVING");

    // The token file is re-read: a new reader is admitted, a removed one revoked.
    let late = "reader-token-added-later-0004";
    std::fs::write(
        &s.tokens,
        format!("agent {AGENT_A} node=node-a\nreader {late}\n"),
    )
    .unwrap();
    let mut admitted = false;
    for _ in 0..100 {
        let r = TelemetryClient::new(s.channel(&s.opts(Some(late))).await)
            .status(StatusRequest {})
            .await;
        if r.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(admitted, "the reloaded token file admits the new reader");
    let e = TelemetryClient::new(s.channel(&s.opts(Some(READER))).await)
        .status(StatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "revoked: {e:?}");
    // A broken file keeps the last good one in force (and is counted).
    std::fs::write(&s.tokens, "superuser whatever\n").unwrap();
    let mut counted = false;
    for _ in 0..100 {
        if s.running
            .metrics
            .reloads
            .with_label_values(&["auth_tokens", "error"])
            .get()
            >= 1
        {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(counted);
    TelemetryClient::new(s.channel(&s.opts(Some(late))).await)
        .status(StatusRequest {})
        .await
        .unwrap();
    drop(url);
}

/// GET `path` over TLS (HTTP/1.1), with an optional bearer token: (status, body).
async fn https_get(s: &Setup, path: &str, token: Option<&str>) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(s.ca.issuer.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.running.http_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, text)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_metrics_need_a_reader_and_probes_stay_open() {
    let s = Setup::start().await;
    assert_eq!(https_get(&s, "/healthz", None).await.0, 200);
    let (code, body) = https_get(&s, "/metrics", None).await;
    assert_eq!(code, 401, "{body}");
    assert!(
        body.to_lowercase().contains("www-authenticate: bearer"),
        "{body}"
    );
    assert_eq!(https_get(&s, "/metrics", Some(AGENT_A)).await.0, 403);
    let (code, body) = https_get(&s, "/metrics", Some(READER)).await;
    assert_eq!(code, 200);
    assert!(
        body.contains("gpulse_auth_refused_total{reason=\"missing_credentials\"} 1"),
        "{body}"
    );
    assert!(body.contains("gpulse_auth_refused_total{reason=\"wrong_role\"} 1"));
    // Plain HTTP to the TLS port is not answered as HTTP.
    let mut tcp = tokio::net::TcpStream::connect(s.running.http_addr)
        .await
        .unwrap();
    tcp.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(
        !String::from_utf8_lossy(&out).contains("gpulse_"),
        "no metrics in clear"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificates_bind_an_agent_to_its_node() {
    let s = Setup::start().await;
    let (cert, key) = s.ca.write_pair(&s.dir, "node-a", &["node-a"]).unwrap();
    let mtls = ClientOptions {
        ca_file: Some(s.ca_file.clone()),
        cert_file: Some(cert),
        key_file: Some(key),
        token_file: None,
    };
    push_one(s.channel(&mtls).await, "node-a/7", "node-a")
        .await
        .unwrap();
    let e = push_one(s.channel(&mtls).await, "node-c/7", "node-c")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A certificate from another CA does not get through the handshake.
    let other = TestCa::new("someone else's CA").unwrap();
    let (c2, k2) = other.write_pair(&s.dir, "forged", &["node-a"]).unwrap();
    let forged = ClientOptions {
        cert_file: Some(c2),
        key_file: Some(k2),
        ..mtls.clone()
    };
    let r = match forged.endpoint(&s.url()).unwrap().connect().await {
        Err(_) => None,
        Ok(ch) => Some(push_one(Credentials::wrap_none(ch), "node-a/8", "node-a").await),
    };
    assert!(
        !matches!(r, Some(Ok(()))),
        "a certificate from an unknown CA must not push: {r:?}"
    );
    // A client that does not trust the server's CA refuses the server.
    let stranger = ClientOptions {
        ca_file: Some(other.write(&s.dir, "other-ca.crt").unwrap()),
        ..Default::default()
    };
    assert!(
        stranger
            .endpoint(&s.url())
            .unwrap()
            .connect()
            .await
            .is_err()
    );
    assert_eq!(s.stored().await, 1, "only node-a's own push");
    assert!(
        s.running.metrics.tls_handshake_failures.get() >= 1,
        "failed handshakes are counted"
    );
}

/// `Credentials::none().wrap`, named for what the test means.
struct Credentials;
impl Credentials {
    fn wrap_none(ch: tonic::transport::Channel) -> gpulse_proto::client::AuthChannel {
        gpulse_proto::client::Credentials::none().wrap(ch)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_certificate_is_reloaded_when_its_files_change() {
    let s = Setup::start().await;
    let next_ca = TestCa::new("next CA").unwrap();
    let next_ca_file = next_ca.write(&s.dir, "next-ca.crt").unwrap();
    let trusts_next = ClientOptions {
        ca_file: Some(next_ca_file),
        token_file: Some(s.token_file(READER)),
        ..Default::default()
    };
    assert!(
        trusts_next
            .endpoint(&s.url())
            .unwrap()
            .connect()
            .await
            .is_err()
    );
    // cert-manager writes the renewed pair in place.
    let pair = next_ca.issue(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(s.dir.join("server.key"), &pair.1).unwrap();
    std::fs::write(s.dir.join("server.crt"), &pair.0).unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(ch) = trusts_next.endpoint(&s.url()).unwrap().connect().await {
            let creds = trusts_next.credentials().unwrap();
            TelemetryClient::new(creds.wrap(ch))
                .status(StatusRequest {})
                .await
                .unwrap();
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "new connections get the renewed certificate");
    assert!(
        s.running
            .metrics
            .reloads
            .with_label_values(&["tls", "ok"])
            .get()
            >= 1
    );
}

/// One agent's Push stream: its sender and the acks.
struct Stream {
    tx: tokio::sync::mpsc::Sender<Batch>,
    acks: tonic::Streaming<gpulse_proto::v1::Ack>,
}

impl Stream {
    /// Opens a stream from `from` (a loopback address) and says hello: the stream, or the
    /// refusal of the hello.
    async fn open(grpc: std::net::SocketAddr, from: &str) -> Result<(Self, u64), tonic::Status> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
            .unwrap()
            .local_address(Some(from.parse().unwrap()))
            .connect()
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(batch(0, vec![])).await.unwrap();
        let mut acks = IngestClient::new(ch)
            .push(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let hello = acks.message().await?.expect("a hello answer");
        Ok((Self { tx, acks }, hello.through_seq))
    }

    async fn send(&mut self, first_seq: u64, code: u32) -> Result<u64, tonic::Status> {
        self.tx
            .send(batch(first_seq, vec![common::xid(code, "x")]))
            .await
            .unwrap();
        let a = tokio::time::timeout(Duration::from_secs(5), self.acks.message())
            .await
            .expect("no answer within 5 s")?
            .expect("an ack");
        Ok(a.through_seq)
    }
}

fn batch(first_seq: u64, events: Vec<gpulse_proto::v1::Event>) -> Batch {
    Batch {
        agent_id: "node-a/1".into(),
        node: "node-a".into(),
        boot_id: "b".into(),
        first_seq,
        events,
        delivered_through: 0,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connected_agent_id_cannot_be_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = server::start(
        ServerConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "127.0.0.1:0".parse().unwrap(),
            StoreConfig::new(dir.path().to_path_buf()),
        ),
        async move {
            let _ = stop_rx.await;
        },
    )
    .await
    .unwrap();
    let grpc = running.grpc_addr;
    let takeovers = |reason: &str| {
        running
            .metrics
            .ingest_takeover_refused
            .with_label_values(&[reason])
            .get()
    };
    let (mut real, _) = Stream::open(grpc, "127.0.0.1").await.unwrap();
    assert_eq!(real.send(1, 13).await.unwrap(), 1);

    // A second stream for the connected id from another address, as a forger would open it.
    let e = Stream::open(grpc, "127.0.0.2")
        .await
        .err()
        .expect("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("connected on another stream"), "{e:?}");
    assert_eq!(takeovers("connected"), 1);
    // The real agent goes on undisturbed.
    assert_eq!(real.send(2, 13).await.unwrap(), 2);
    // From its own address it is the agent reconnecting (its old connection may be half-open).
    let (mut again, through) = Stream::open(grpc, "127.0.0.1").await.unwrap();
    // The ack of seq 2 may go out (its sync done) a moment before the store records it as
    // durable, so a Hello right after may vouch for less; never for more.
    assert!((1..=2).contains(&through), "{through}");

    // A jump no spool explains (the real agent's next events would be dropped as resends).
    let e = again.send(3 + 5_000_000_000, 79).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert_eq!(takeovers("seq_jump"), 1);
    assert_eq!(
        common::agent_events(&running.store.status().await.unwrap()),
        2,
        "nothing refused stored"
    );
    assert_eq!(real.send(3, 13).await.unwrap(), 3);
    assert_eq!(takeovers("connected"), 1);
}

#[test]
fn grpc_off_loopback_without_auth_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_gpulse-collector");
    let base = |extra: &[&str]| {
        let mut c = std::process::Command::new(bin);
        c.args([
            "--grpc-listen",
            "0.0.0.0:0",
            "--http-listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        c
    };
    let out = base(&[]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not loopback and no authentication is configured"),
        "{err}"
    );
    // A token file counts as authentication (a broken one is a start-up error naming it).
    let bad = dir.path().join("tokens");
    std::fs::write(&bad, "agent short node=a\n").unwrap();
    let out = base(&["--auth-tokens", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1: a token must be at least 16"), "{err}");
    // Told the network is trusted, it serves.
    let mut child = base(&["--grpc-allow-unauthenticated"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let still = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still.is_none(), "exited: {still:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_tokens_verified_against_the_cluster_keys() {
    let setup = Setup::start().await;
    let s = &setup;
    let agent = |node: Option<&str>, edit: fn(&mut serde_json::Value)| {
        s.issuer
            .service_account("gpulse:gpulse-agent", node, edit)
            .unwrap()
    };
    let push = |token: String, node: &'static str| {
        let opts = s.opts(Some(&token));
        async move { push_one(s.channel(&opts).await, &format!("{node}/1"), node).await }
    };
    // The node's own agent.
    push(agent(Some("node-a"), |_| {}), "node-a").await.unwrap();
    assert_eq!(s.stored().await, 1);

    let refused_before = s.refused("bad_token");
    // One character inside the signature changed (not the last: its spare bits may make the
    // base64 itself invalid, a different refusal).
    let mut tampered = agent(Some("node-a"), |_| {}).into_bytes();
    let at = tampered.len() - 10;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let other_key = TestIssuer::new("k1")
        .unwrap()
        .service_account("gpulse:gpulse-agent", Some("node-a"), |_| {})
        .unwrap();
    let unknown_kid = TestIssuer::new("k9")
        .unwrap()
        .service_account("gpulse:gpulse-agent", Some("node-a"), |_| {})
        .unwrap();
    for (what, token, want) in [
        (
            "expired",
            agent(Some("node-a"), |c| {
                c["exp"] = serde_json::json!(1_000_000);
                c["nbf"] = serde_json::json!(999_000);
                c["iat"] = serde_json::json!(999_000);
            }),
            "expired",
        ),
        (
            "wrong audience",
            agent(Some("node-a"), |c| {
                c["aud"] = serde_json::json!(["kubernetes"])
            }),
            "audience",
        ),
        (
            "wrong issuer",
            agent(Some("node-a"), |c| {
                c["iss"] = serde_json::json!("https://evil.example")
            }),
            "issuer",
        ),
        ("tampered signature", tampered, "signature"),
        (
            "signed by another key under a known kid",
            other_key,
            "signature",
        ),
        ("unknown key id", unknown_kid, "unknown key id"),
        (
            "not bound to a node",
            agent(None, |_| {}),
            "not bound to a node",
        ),
        (
            "another service account",
            s.issuer
                .service_account("default:default", Some("node-a"), |_| {})
                .unwrap(),
            "neither an agent nor a reader",
        ),
    ] {
        let e = push(token, "node-a").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        assert!(e.message().contains(want), "{what}: {e:?}");
    }
    assert_eq!(s.refused("bad_token"), refused_before + 8);
    // Bound to node-b, pushing for node-a.
    let e = push_one(
        s.channel(&s.opts(Some(&agent(Some("node-b"), |_| {}))))
            .await,
        "node-a/1",
        "node-a",
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(s.stored().await, 1, "nothing refused was stored");

    // A reader service account reads; an agent's token does not.
    let grafana = s
        .issuer
        .service_account("monitoring:grafana", None, |_| {})
        .unwrap();
    TelemetryClient::new(s.channel(&s.opts(Some(&grafana))).await)
        .status(StatusRequest {})
        .await
        .unwrap();

    // Key rotation: the new key is published beside the old, then the old one withdrawn.
    let next = TestIssuer::new("k2").unwrap();
    std::fs::write(&s.jwks, TestIssuer::jwks(&[&s.issuer, &next])).unwrap();
    let signed_by_next = next
        .service_account("gpulse:gpulse-agent", Some("node-a"), |_| {})
        .unwrap();
    let mut admitted = false;
    for _ in 0..100 {
        if push(signed_by_next.clone(), "node-a").await.is_ok() {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        admitted,
        "a token from the new key is accepted once the JWKS has it"
    );
    std::fs::write(&s.jwks, TestIssuer::jwks(&[&next])).unwrap();
    let old = agent(Some("node-a"), |_| {});
    let mut withdrawn = false;
    for _ in 0..100 {
        if push(old.clone(), "node-a").await.is_err() {
            withdrawn = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(withdrawn, "tokens from a withdrawn key are refused");
}

/// The API server's JWKS endpoint, over TLS from a test CA, wanting the collector's token: what
/// it serves can change (a key rotation), and what it was asked with is recorded.
struct JwksServer {
    url: String,
    ca: std::path::PathBuf,
    served: Arc<std::sync::Mutex<String>>,
    asked_with: Arc<std::sync::Mutex<Vec<String>>>,
}

async fn jwks_server(dir: &std::path::Path, jwks: String) -> JwksServer {
    use gpulse_collector::tls;
    let ca = TestCa::new("API server CA").unwrap();
    let ca_file = ca.write(dir, "api-ca.crt").unwrap();
    let (cert, key) = ca.write_pair(dir, "api", &["127.0.0.1"]).unwrap();
    let served = Arc::new(std::sync::Mutex::new(jwks));
    let asked_with = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (s2, a2) = (served.clone(), asked_with.clone());
    let app = axum::Router::new().route(
        "/openid/v1/jwks",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let auth = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            a2.lock().unwrap().push(auth.clone());
            let body = s2.lock().unwrap().clone();
            async move {
                if auth == "Bearer collector-sa-token" {
                    (axum::http::StatusCode::OK, body)
                } else {
                    (axum::http::StatusCode::UNAUTHORIZED, String::new())
                }
            }
        }),
    );
    let reloads = prometheus::IntCounterVec::new(
        prometheus::Opts::new("reloads", "test"),
        &["file", "result"],
    )
    .unwrap();
    let configs = tls::TlsFiles {
        cert,
        key,
        client_ca: None,
    }
    .watch(reloads)
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    let rx = tls::accept(
        listener,
        configs,
        tls::Listener::Http,
        prometheus::IntCounter::new("failures", "test").unwrap(),
        gpulse_collector::conn::Gate::new(
            "http",
            gpulse_collector::conn::Limits::default(),
            gpulse_collector::conn::ConnMetrics::new(&prometheus::Registry::new()).unwrap(),
        ),
        Duration::from_secs(20),
        gpulse_collector::shutdown::Shutdown::never(),
    );
    tokio::spawn(async move {
        axum::serve(gpulse_collector::conn::ChannelListener { rx, local }, app).await
    });
    JwksServer {
        url: format!("https://127.0.0.1:{}/openid/v1/jwks", local.port()),
        ca: ca_file,
        served,
        asked_with,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cluster_keys_are_fetched_from_the_api_server_and_again_on_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let k1 = TestIssuer::new("k1").unwrap();
    let api = jwks_server(dir, TestIssuer::jwks(&[&k1])).await;
    let sa_token = dir.join("collector-sa-token");
    std::fs::write(&sa_token, "collector-sa-token\n").unwrap();
    let mut cfg = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        StoreConfig::new(dir.join("data")),
    );
    cfg.auth = AuthConfig {
        service_accounts: Some(ServiceAccounts {
            jwks: KeySource {
                location: api.url.clone(),
                ca: Some(api.ca.clone()),
                token_file: Some(sa_token),
            },
            issuer: CLUSTER_ISSUER.into(),
            audience: "gpulse".into(),
            agents: vec!["gpulse:gpulse-agent".into()],
            readers: vec![],
        }),
        ..Default::default()
    };
    let (_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = server::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let url = format!("http://127.0.0.1:{}", running.grpc_addr.port());
    let push = |token: String| {
        let url = url.clone();
        let file = dir.join(format!("t-{}", &sha256_hex(&token)[..8]));
        async move {
            std::fs::write(&file, token).unwrap();
            let opts = ClientOptions {
                token_file: Some(file),
                ..Default::default()
            };
            let ch = opts.endpoint(&url).unwrap().connect().await.unwrap();
            push_one(opts.credentials().unwrap().wrap(ch), "node-a/1", "node-a").await
        }
    };
    let token = |k: &TestIssuer| {
        k.service_account("gpulse:gpulse-agent", Some("node-a"), |_| {})
            .unwrap()
    };
    push(token(&k1)).await.unwrap();

    // The cluster rotates its signing key: the first token from the new key names an unknown
    // key id, which makes the collector fetch the set again (at most every 10 s).
    let k2 = TestIssuer::new("k2").unwrap();
    *api.served.lock().unwrap() = TestIssuer::jwks(&[&k2]);
    let e = push(token(&k2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("unknown key id"), "{e:?}");
    let started = std::time::Instant::now();
    let mut accepted = false;
    while started.elapsed() < Duration::from_secs(20) {
        if push(token(&k2)).await.is_ok() {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(accepted, "the new key is fetched after an unknown key id");
    let asked = api.asked_with.lock().unwrap().clone();
    assert!(asked.len() >= 2, "{asked:?}");
    assert!(
        asked.iter().all(|a| a == "Bearer collector-sa-token"),
        "every fetch carries the collector's token: {asked:?}"
    );
    assert!(
        running
            .metrics
            .reloads
            .with_label_values(&["auth_jwks", "ok"])
            .get()
            >= 1
    );
}
