//! The `gpulse` CLI's offline commands, run as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
use std::{
    io::Write,
    process::{Command, Stdio},
};

use gpulse_e2e::bin;

#[test]
fn xid_explain_known_and_unknown_codes() {
    let out = Command::new(bin("gpulse"))
        .args(["xid", "explain", "79"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS"),
        "{text}"
    );
    assert!(text.contains("RESTART_BM"));
    let out = Command::new(bin("gpulse"))
        .args(["xid", "explain", "48", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mnemonic"], "ROBUST_CHANNEL_GPU_ECC_DBE");
    assert_eq!(v["severity"], "fatal");
    let out = Command::new(bin("gpulse"))
        .args(["xid", "explain", "999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the catalog"));
    let out = Command::new(bin("gpulse"))
        .args(["xid", "explain", "abc"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "clap rejects a non-number");
}

#[test]
fn xid_parse_decodes_rendered_dmesg() {
    let mut child = Command::new(bin("gpulse"))
        .args(["xid", "parse"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"[6781741.548779] NVRM: Xid (PCI:0000:9b:00): 119, pid=2024380, name=nvidia-smi, Timeout after 6s\nusb 1-1: not nvidia\nNov 29 11:28:11 zeus kernel: nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal, Link 44 Minion Link DLREQ interrupt\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["record"]["type"], "xid");
    assert_eq!(lines[0]["record"]["code"], 119);
    assert_eq!(lines[0]["record"]["pid"], 2024380);
    assert_eq!(lines[0]["severity"], "fatal");
    assert_eq!(lines[1]["record"]["type"], "sxid");
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2: not an NVIDIA driver record"));
}

#[test]
fn bad_flags_are_clear_errors() {
    // The current spelling and the former one (a hidden alias for one release).
    for flag in ["--events-bytes", "--ring-bytes"] {
        let out = Command::new(bin("gpulse-collector"))
            .args([flag, "lots"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a byte size"),
            "{flag}"
        );
    }
    let out = Command::new(bin("gpulse-agent"))
        .args(["--xid-source", "magic"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));
    let out = Command::new(bin("gpulse-agent"))
        .args(["--xid-severity", "13=meh", "--xid-source", "kmsg"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown severity"));
    let out = Command::new(bin("gpulse"))
        .args([
            "tail",
            "--kind",
            "nope",
            "--collector",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap refuses it before connecting"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'nope' for '--kind"), "{err}");
    assert!(
        err.contains("gpu_sample"),
        "the valid kinds are listed: {err}"
    );
}

/// Every argument is checked before the CLI connects: nothing listens on port 1, so an answer
/// that names the flag with exit status 2 (not a connection error, status 1) proves the order.
#[test]
fn arguments_are_validated_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let missing = missing.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["events", "--since", "banana"], "--since"),
        (&["events", "--since", "1h", "--until", "now-2h"], "--since"),
        (&["events", "--until", "yesterday"], "--until"),
        (&["trend", "--metric", "gpu_utilisation"], "--metric"),
        (
            &["trend", "--metric", "power_w", "--since", "9999d"],
            "--since",
        ),
        (&["nodes", "--since", "1 hour"], "--since"),
        (&["status", "--ca-file", missing], "--ca-file"),
        (
            &["health", "--tls-client-cert", missing],
            "--tls-client-key",
        ),
        (&["tail", "--collector", "ht tp://x"], "--collector"),
    ];
    for (args, flag) in cases {
        let mut all = args.to_vec();
        if !args.contains(&"--collector") {
            let url = if args.contains(&"--ca-file") || args.contains(&"--tls-client-cert") {
                "https://127.0.0.1:1"
            } else {
                "http://127.0.0.1:1"
            };
            all.extend(["--collector", url]);
        }
        let out = Command::new(bin("gpulse")).args(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} names {flag}: {err}");
        assert!(!err.contains("connect"), "{args:?} did not connect: {err}");
    }
    // A token for a plain http:// collector off loopback is refused before anything is sent.
    let token = dir.path().join("token");
    std::fs::write(&token, "secret\n").unwrap();
    let out = Command::new(bin("gpulse"))
        .args([
            "status",
            "--collector",
            "http://192.0.2.1:7700",
            "--token-file",
        ])
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--token-file'"));
}

/// A connection error says each cause once ("tcp connect error" came twice).
#[test]
fn a_connection_error_says_each_cause_once() {
    let out = Command::new(bin("gpulse"))
        .args(["status", "--collector", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("gpulse: connecting to http://127.0.0.1:1"),
        "{err}"
    );
    let parts: Vec<&str> = err.trim().split(": ").collect();
    let mut seen = std::collections::HashSet::new();
    for p in &parts {
        assert!(seen.insert(*p), "{p:?} repeated in {err}");
    }
}
