//! The MCP server driven by the official Python `mcp` client (pinned, in a venv this test
//! creates), over Streamable HTTP and stdio, in both protocol eras (2026-07-28 via the client's
//! auto mode, 2025-11-25 via its legacy handshake). As root the data comes through the real
//! pipeline (an XID written to /dev/kmsg, captured by the agent, GPU samples from the fake NVML);
//! otherwise the same events are sent over gRPC Ingest.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::Command,
    time::Duration,
};

use gpulse_e2e::*;
use gpulse_proto::v1::{EventFilter, EventKind};

const MCP_PACKAGE: &str = "mcp==2.3.0";
const TOKEN: &str = "test-token-0123456789abcdef";

fn script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("mcp/mcp_client.py")
        .display()
        .to_string()
}

/// Starts an agent with the fake NVML and writes an XID 79 to /dev/kmsg (the root path).
fn feed_through_pipeline(url: &str, node: &str, dir: &Path) -> Proc {
    let (lib, scenarios) = fake_nvml();
    let scenario = scenarios.join("three-gpus.json").display().to_string();
    let log = dir.join("agent.log");
    let lib_s = lib.display().to_string();
    let health_port = free_port();
    let health = format!("127.0.0.1:{health_port}");
    let agent = Proc::spawn_env(
        "gpulse-agent",
        &[
            "--health-listen",
            &health,
            "--collector",
            url,
            "--node",
            node,
            "--nvml",
            &lib_s,
            "--sample-interval-ms",
            "200",
        ],
        &log,
        &[("GPULSE_FAKE_NVML_SCENARIO", scenario.as_str())],
    )
    .unwrap();
    wait_agent_live(&log, Duration::from_secs(20)).unwrap();
    // The probe endpoint the DaemonSet uses answers with the agent's counters. The agent binds
    // it after its source is live (and the client started): on a loaded machine a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (code, body) = loop {
        match http_get(health_port, "/healthz") {
            Ok(r) => break r,
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the agent's health endpoint never answered: {e}"),
        }
    };
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ok source=") && body.contains("captured="),
        "{body}"
    );
    assert_eq!(http_get(health_port, "/nope").unwrap().0, 404);
    let m = marker("mcp");
    inject(&format!(
        "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus. {m}"
    ))
    .unwrap();
    let rt = runtime();
    let got = rt
        .block_on(collect_events(
            url,
            EventFilter {
                nodes: vec![node.to_string()],
                kinds: vec![EventKind::Xid as i32],
                ..Default::default()
            },
            Some(0),
            Duration::from_secs(15),
            |e| !e.is_empty(),
        ))
        .unwrap();
    assert_eq!(xid_of(&got[0]).unwrap().code, 79);
    // Let a few samples arrive too.
    std::thread::sleep(Duration::from_millis(800));
    agent
}

fn run_client(python: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python)
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mcp_client.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// Raw HTTP POST to /mcp; returns the status code.
fn post_status(port: u16, headers: &[(&str, &str)]) -> u16 {
    post(port, headers)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Raw HTTP POST of an initialize request to /mcp; returns the whole response.
fn post(port: u16, headers: &[(&str, &str)]) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp
}

#[test]
fn python_mcp_client_over_http_and_stdio_in_both_eras() {
    let python = python_venv("mcp", &[MCP_PACKAGE]).unwrap();
    let _k = is_root().then(kernel_lock);
    let dir = tempfile::tempdir().unwrap();
    let (g, h) = (free_port(), free_port());
    let c = Collector::start(&dir.path().join("data"), g, h, &["--mcp-token", TOKEN]).unwrap();
    let node = marker("mcp-node");
    let _agent = if is_root() {
        Some(feed_through_pipeline(&c.url(), &node, dir.path()))
    } else {
        eprintln!("not root: feeding the collector over gRPC instead of through the kernel");
        feed_over_grpc(&c.url(), &node).unwrap();
        None
    };
    let http = format!("http://127.0.0.1:{h}/mcp");
    for (mode, want) in [("auto", "2026-07-28"), ("legacy", "2025-11-25")] {
        let v = run_client(
            &python,
            &[
                "--http", &http, "--token", TOKEN, "--mode", mode, "--node", &node,
            ],
        );
        assert_eq!(v["protocol"], want, "HTTP {mode}");
    }
    let collector_bin = bin("gpulse-collector").display().to_string();
    let url = c.url();
    for (mode, want) in [("auto", "2026-07-28"), ("legacy", "2025-11-25")] {
        let v = run_client(
            &python,
            &[
                "--stdio",
                "--mode",
                mode,
                "--node",
                &node,
                "--",
                &collector_bin,
                "mcp",
                "--stdio",
                "--collector",
                &url,
            ],
        );
        assert_eq!(v["protocol"], want, "stdio {mode}");
    }
    // Security: no token, a wrong token, or a foreign Origin are refused before any MCP work.
    assert_eq!(post_status(h, &[]), 401);
    assert_eq!(
        post_status(h, &[("Authorization", "Bearer wrong-token-000000000")]),
        401
    );
    let auth = format!("Bearer {TOKEN}");
    assert_eq!(
        post_status(
            h,
            &[("Authorization", &auth), ("Origin", "http://evil.example")]
        ),
        403
    );
    assert_eq!(post_status(h, &[("Authorization", &auth)]), 200);
    // On a loopback listener, pages of this machine may call it (MCP security guidance; the
    // conformance suite's dns-rebinding scenario): localhost origins on any port.
    for origin in [
        format!("http://127.0.0.1:{h}"),
        "http://localhost:5173".to_string(),
        "http://[::1]:8080".to_string(),
    ] {
        assert_eq!(
            post_status(h, &[("Authorization", &auth), ("Origin", &origin)]),
            200,
            "{origin}"
        );
    }
    // A foreign page that merely resolves to 127.0.0.1 (DNS rebinding) is still refused.
    assert_eq!(
        post_status(
            h,
            &[
                ("Authorization", &auth),
                ("Origin", "http://127.0.0.1.evil.example:80")
            ]
        ),
        403
    );
    // Refuses to serve /mcp without a token off loopback unless told to.
    let out = Command::new(bin("gpulse-collector"))
        .args(["--http-listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mcp-token"));
}

/// `/mcp` as an OAuth 2.1 resource server: Protected Resource Metadata served, a 401 pointing at
/// it, and the Python `mcp` client running the whole suite with a JWT access token from a test
/// authorization server (its JWKS a file here); tokens for another audience or without the scope
/// refused.
#[test]
fn python_mcp_client_with_an_oauth_access_token() {
    let python = python_venv("mcp", &[MCP_PACKAGE]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (g, h) = (free_port(), free_port());
    let issuer = pki::TestIssuer::new("as-key-1").unwrap();
    let jwks = dir.path().join("as-jwks.json");
    std::fs::write(&jwks, pki::TestIssuer::jwks(&[&issuer])).unwrap();
    let auth_server = "https://auth.example.test";
    let resource = format!("http://127.0.0.1:{h}/mcp");
    let c = Collector::start(
        &dir.path().join("data"),
        g,
        h,
        &[
            "--mcp-oauth-issuer",
            auth_server,
            "--mcp-oauth-jwks",
            jwks.to_str().unwrap(),
            "--mcp-resource-url",
            &resource,
        ],
    )
    .unwrap();
    let node = marker("mcp-oauth");
    feed_over_grpc(&c.url(), &node).unwrap();

    let (code, body) = http_get(h, "/.well-known/oauth-protected-resource/mcp").unwrap();
    assert_eq!(code, 200, "{body}");
    let prm: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(prm["resource"], resource.as_str());
    assert_eq!(prm["authorization_servers"][0], auth_server);
    assert_eq!(prm["scopes_supported"][0], "gpulse:read");

    let refused = post(h, &[]);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let want = format!(
        "resource_metadata=\"http://127.0.0.1:{h}/.well-known/oauth-protected-resource/mcp\""
    );
    assert!(
        refused.to_lowercase().contains("www-authenticate"),
        "{refused}"
    );
    assert!(refused.contains(&want), "{refused}");

    let token = issuer
        .access_token(auth_server, &resource, "gpulse:read")
        .unwrap();
    let v = run_client(
        &python,
        &[
            "--http", &resource, "--token", &token, "--mode", "auto", "--node", &node,
        ],
    );
    assert_eq!(v["protocol"], "2026-07-28");

    let other_audience = issuer
        .access_token(auth_server, "https://other.example/mcp", "gpulse:read")
        .unwrap();
    let other_issuer = issuer
        .access_token("https://evil.example", &resource, "gpulse:read")
        .unwrap();
    let forged_key = pki::TestIssuer::new("as-key-1")
        .unwrap()
        .access_token(auth_server, &resource, "gpulse:read")
        .unwrap();
    for t in [other_audience, other_issuer, forged_key] {
        let bearer = format!("Bearer {t}");
        assert_eq!(post_status(h, &[("Authorization", &bearer)]), 401);
    }
    let no_scope = issuer
        .access_token(auth_server, &resource, "profile")
        .unwrap();
    let r = post(h, &[("Authorization", &format!("Bearer {no_scope}"))]);
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("error=\"insufficient_scope\""), "{r}");
}
