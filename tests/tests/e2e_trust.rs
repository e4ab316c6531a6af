//! Trust end to end, through the real kernel and real processes: a collector with TLS and a token
//! file, an agent with its token file and the CA, an XID written to /dev/kmsg reaching a reader
//! subscriber over TLS; and forged pushes from an outside client (Python grpcio over TLS)
//! refused: without a token, with a reader's token, and with node A's agent token for a victim
//! node. Nothing forged is stored. Root only (CI runs as root); the grpcio part needs PyPI.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use gpulse_e2e::*;
use gpulse_proto::{
    client::ClientOptions,
    v1::{
        self, EventFilter, EventKind, ListEventsRequest, SubscribeRequest, subscribe_response::Msg,
        telemetry_client::TelemetryClient,
    },
};
use prost::Message as _;

const GRPCIO: &str = "grpcio==1.76.0";
const AGENT_TOKEN: &str = "agent-token-e2e-trust-0001";
const READER_TOKEN: &str = "reader-token-e2e-trust-0002";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Starts the collector with TLS and tokens; waits until it serves.
fn start_collector(dir: &Path, pki: &pki::Pki, tokens: &Path) -> (Proc, u16, PathBuf) {
    start_tls_collector(dir, pki, &["--auth-tokens", tokens.to_str().unwrap()]).unwrap()
}

async fn reader(
    url: &str,
    opts: &ClientOptions,
) -> TelemetryClient<gpulse_proto::client::AuthChannel> {
    let ch = opts.endpoint(url).unwrap().connect().await.unwrap();
    TelemetryClient::new(opts.credentials().unwrap().wrap(ch))
}

#[test]
fn tls_and_tokens_from_kernel_to_reader_and_forged_pushes_refused() {
    if !require_root("e2e_trust") {
        return;
    }
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::pki(dir.path()).unwrap();
    let node = marker("e2e-trust");
    let tokens = write(
        dir.path(),
        "tokens",
        &format!("agent {AGENT_TOKEN} node={node}\nreader {READER_TOKEN}\n"),
    );
    let (_collector, grpc, collector_log) = start_collector(dir.path(), &pki, &tokens);
    let url = format!("https://127.0.0.1:{grpc}");
    let agent_token = write(dir.path(), "agent-token", AGENT_TOKEN);
    let agent_log = dir.path().join("agent.log");
    let _agent = start_agent(
        &url,
        &node,
        "auto",
        &agent_log,
        &[
            "--ca-file",
            pki.ca.to_str().unwrap(),
            "--token-file",
            agent_token.to_str().unwrap(),
        ],
    )
    .unwrap();
    wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();

    let opts = ClientOptions {
        ca_file: Some(pki.ca.clone()),
        token_file: Some(write(dir.path(), "reader-token", READER_TOKEN)),
        ..Default::default()
    };
    let rt = runtime();
    let (u, o, n) = (url.clone(), opts.clone(), node.clone());
    let sub = rt.spawn(async move {
        let mut stream = reader(&u, &o)
            .await
            .subscribe(SubscribeRequest {
                filter: Some(EventFilter {
                    nodes: vec![n],
                    kinds: vec![EventKind::Xid as i32],
                    ..Default::default()
                }),
                after_cursor: None,
                resume_token: Default::default(),
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), stream.message()).await {
                Ok(Ok(Some(v1::SubscribeResponse {
                    msg: Some(Msg::Event(e)),
                    ..
                }))) => return Some(e),
                Ok(Ok(Some(_))) => continue,
                _ => return None,
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let m = marker("m");
    inject(&format!(
        "NVRM: Xid (PCI:0000:5e:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus. {m}"
    ))
    .unwrap();
    let ev = rt.block_on(sub).unwrap().unwrap_or_else(|| {
        panic!(
            "no XID reached the reader over TLS; agent log:\n{}\ncollector log:\n{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default(),
            std::fs::read_to_string(&collector_log).unwrap_or_default()
        )
    });
    assert_eq!(xid_of(&ev).map(|x| x.code), Some(79), "{ev:?}");
    assert_eq!(ev.node, node);

    // `gpulse` as a person runs it: https, the CA, a reader's token file.
    let reader_file = opts.token_file.clone().unwrap();
    let gpulse = |extra: &[&str]| {
        Command::new(bin("gpulse"))
            .args(["status", "--json", "--collector", &url, "--ca-file"])
            .arg(&pki.ca)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = gpulse(&["--token-file", reader_file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(st["events_stored"].as_u64().unwrap() >= 1, "{st}");
    let out = gpulse(&[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("credentials required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A token is never sent in clear off loopback.
    let out = Command::new(bin("gpulse"))
        .args([
            "status",
            "--collector",
            "http://collector.example:7700",
            "--token-file",
        ])
        .arg(&reader_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in clear"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Forged pushes from an outside client.
    let python = python_venv("grpc", &[GRPCIO]).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("grpc/forged_push.py");
    let forged = |token: &str, victim: &str| -> String {
        let batch = |first_seq: u64, events: Vec<v1::Event>| {
            v1::Batch {
                agent_id: format!("{victim}/forged"),
                node: victim.into(),
                boot_id: "b".into(),
                first_seq,
                events,
                delivered_through: 0,
            }
            .encode_to_vec()
        };
        let xid = v1::Event {
            kind: EventKind::Xid as i32,
            severity: v1::Severity::Fatal as i32,
            time: Some(gpulse_proto::time::now()),
            payload: Some(v1::event::Payload::Xid(v1::Xid {
                code: 79,
                pci: "0000:3b:00.0".into(),
                message: "forged".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let hex = |b: Vec<u8>| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let out = Command::new(&python)
            .arg(&script)
            .arg(format!("127.0.0.1:{grpc}"))
            .arg(&pki.ca)
            .arg(token)
            .arg(hex(batch(0, vec![])))
            .arg(hex(batch(1, vec![xid])))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let victim = "victim-node";
    let none = forged("-", victim);
    assert!(none.starts_with("CODE UNAUTHENTICATED"), "{none}");
    let as_reader = forged(READER_TOKEN, victim);
    assert!(
        as_reader.starts_with("CODE PERMISSION_DENIED"),
        "{as_reader}"
    );
    let other_node = forged(AGENT_TOKEN, victim);
    assert!(
        other_node.starts_with("CODE PERMISSION_DENIED"),
        "{other_node}"
    );
    assert!(
        other_node.contains(&node),
        "names the node it may push for: {other_node}"
    );

    // An agent holding a reader's token is refused, says why, and keeps trying.
    let bad_log = dir.path().join("bad-agent.log");
    let _bad = start_agent(
        &url,
        victim,
        "kmsg",
        &bad_log,
        &[
            "--ca-file",
            pki.ca.to_str().unwrap(),
            "--token-file",
            reader_file.to_str().unwrap(),
        ],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&bad_log)
        .unwrap_or_default()
        .contains("collector refused our credentials")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&bad_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Nothing of the victim was stored.
    let (u, o) = (url.clone(), opts.clone());
    let victim_events = rt.block_on(async move {
        reader(&u, &o)
            .await
            .list_events(ListEventsRequest {
                filter: Some(EventFilter {
                    nodes: vec![victim.into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
            .len()
    });
    assert_eq!(victim_events, 0);
}
