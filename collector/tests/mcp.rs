//! The MCP server in-process: rmcp's own client over a tokio duplex pipe, against a collector
//! store fed through the real Ingest path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use gpulse_collector::{grpc::TelemetryService, shutdown::Shutdown};
use gpulse_mcp::GpulseMcp;
use gpulse_proto::{
    time as ptime,
    v1::{self, EventKind, event::Payload},
};
use rmcp::{
    ServiceExt,
    model::{CallToolRequestParams, GetPromptRequestParams, ReadResourceRequestParams},
};
use serde_json::{Value, json};

fn ago(secs: i64) -> Option<prost_types::Timestamp> {
    let now = ptime::to_unix_nanos(&ptime::now());
    Some(ptime::from_unix_nanos(
        now - i128::from(secs) * 1_000_000_000,
    ))
}

fn xid_at(code: u32, uuid: &str, secs_ago: i64, caused_by: Option<u32>) -> v1::Event {
    let mut e = xid(code, &format!("xid {code}"));
    e.time = ago(secs_ago);
    if let Some(Payload::Xid(x)) = &mut e.payload {
        x.gpu_uuid = uuid.into();
        x.mnemonic = gpulse_xid::catalog::lookup(code).unwrap().mnemonic.into();
        x.caused_by = caused_by;
    }
    e
}

fn sample(index: u32, secs_ago: i64, util: u32) -> v1::Event {
    v1::Event {
        kind: EventKind::GpuSample as i32,
        severity: v1::Severity::Info as i32,
        time: ago(secs_ago),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            index,
            uuid: format!("GPU-{index}"),
            pci: format!("0000:{:02x}:00.0", 0x3b + index),
            name: "NVIDIA H100 80GB HBM3".into(),
            driver_version: "570.124.06".into(),
            gpu_util_pct: Some(util),
            power_mw: Some(500_000),
            temperature_c: Some(60),
            // The process holds memory on GPU 0 only.
            processes: if index == 0 {
                vec![v1::GpuProcessMemory {
                    pid: 4242,
                    used_memory_bytes: Some(1 << 30),
                    r#type: "compute".into(),
                }]
            } else {
                vec![]
            },
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn proc_event(kind: v1::ProcessEventType, secs_ago: i64) -> v1::Event {
    v1::Event {
        kind: EventKind::GpuProcess as i32,
        severity: v1::Severity::Info as i32,
        time: ago(secs_ago),
        payload: Some(Payload::GpuProcess(v1::GpuProcess {
            r#type: kind as i32,
            pid: 4242,
            tgid: 4242,
            comm: "python3".into(),
            device: "/dev/nvidia0".into(),
            pod: Some(v1::PodRef {
                namespace: "ml".into(),
                name: "trainer-0".into(),
                ..Default::default()
            }),
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn call(
    client: &rmcp::service::RunningService<rmcp::RoleClient, ()>,
    tool: &str,
    args: Value,
) -> (bool, Value, String) {
    let r = client
        .call_tool(
            CallToolRequestParams::new(tool.to_string())
                .with_arguments(args.as_object().cloned().unwrap_or_default()),
        )
        .await
        .unwrap();
    let text = r
        .content
        .first()
        .and_then(|c| c.as_text().map(|t| t.text.clone()))
        .unwrap_or_default();
    (
        r.is_error.unwrap_or(false),
        r.structured_content.unwrap_or(Value::Null),
        text,
    )
}

/// The test data set: two nodes, XIDs on two GPUs (one burst with a cause), a GPU process, samples.
async fn fed_store(dir: &std::path::Path) -> Harness {
    let mut cfg = store_config(dir);
    cfg.fsync = false;
    let h = start(cfg).await;
    let (mut a, _) = AgentStream::open(&h, "gpu-node-1/a", "gpu-node-1").await;
    let events = vec![
        sample(0, 300, 90),
        sample(1, 300, 10),
        proc_event(v1::ProcessEventType::Open, 250),
        xid_at(119, "GPU-0", 200, None),
        xid_at(154, "GPU-0", 190, Some(119)),
        xid_at(79, "GPU-1", 100, None),
        sample(0, 60, 95),
        sample(1, 60, 0),
    ];
    a.send(1, events).await.unwrap();
    let (mut b, _) = AgentStream::open(&h, "gpu-node-2/a", "gpu-node-2").await;
    b.send(1, vec![sample(0, 30, 50)]).await.unwrap();
    // The streams stay open (agents connected) for as long as the store runs.
    std::mem::forget((a, b));
    h
}

async fn mcp_client(h: &Harness) -> rmcp::service::RunningService<rmcp::RoleClient, ()> {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let server = GpulseMcp::new(std::sync::Arc::new(TelemetryService {
        store: h.store.clone(),
        stop: Shutdown::never(),
        history: Default::default(),
    }));
    tokio::spawn(async move {
        let s = server.serve(server_io).await.unwrap();
        let _ = s.waiting().await;
    });
    ().serve(client_io).await.unwrap()
}

#[tokio::test]
async fn tools_answer_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let h = fed_store(dir.path()).await;
    let client = mcp_client(&h).await;

    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<String> = tools.iter().map(|t| t.name.to_string()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "collector_status",
            "describe_node",
            "describe_xid",
            "events_summary",
            "gpu_health",
            "gpu_metric_trend",
            "list_events",
            "list_gpu_processes",
            "list_nodes",
            "xid_summary"
        ]
    );
    for t in &tools {
        assert!(t.output_schema.is_some(), "{} has no output schema", t.name);
        let ann = t.annotations.as_ref().unwrap();
        assert_eq!(ann.read_only_hint, Some(true), "{}", t.name);
        assert_eq!(ann.destructive_hint, Some(false), "{}", t.name);
    }
    // The metric enum in the schema is exactly the collector's metric list.
    let trend = tools.iter().find(|t| t.name == "gpu_metric_trend").unwrap();
    let schema = serde_json::to_value(&trend.input_schema).unwrap();
    let metric_enum = find_enum(&schema, "metric").expect("metric enum in schema");
    assert_eq!(metric_enum, gpulse_proto::metric::names());

    let (err, s, _) = call(&client, "collector_status", json!({})).await;
    assert!(!err);
    assert_eq!(s["nodes_known"], 2);
    assert_eq!(s["agents_connected"], 2);
    assert_eq!(s["history_tiers"].as_array().unwrap().len(), 3);

    let (err, s, text) = call(&client, "events_summary", json!({"since": "1h"})).await;
    assert!(!err, "{text}");
    assert_eq!(s["counts_by_kind"]["xid"], 3);
    assert_eq!(s["counts_by_kind"]["process_start"], 1);
    assert_eq!(s["window"]["window_defaulted"], false);
    assert_eq!(s["top_nodes"][0]["node"], "gpu-node-1");
    let incidents = s["incidents"].as_array().unwrap();
    assert_eq!(incidents.len(), 2, "{incidents:?}");
    let gpu0 = incidents.iter().find(|i| i["gpu"] == "GPU-0").unwrap();
    assert_eq!(gpu0["root_cause_xid"], 119, "154 names 119 as its cause");
    assert_eq!(gpu0["xid_count"], 2);
    assert!(!s["notable"].as_array().unwrap().is_empty());
    // The text block carries the same JSON.
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), s);

    let (err, s, _) = call(
        &client,
        "list_events",
        json!({"kinds": ["xid"], "limit": 2}),
    )
    .await;
    assert!(!err);
    assert_eq!(s["events"].as_array().unwrap().len(), 2);
    assert_eq!(s["events"][0]["xid"], 79, "newest first");
    assert_eq!(s["total_matched"], 3);
    let cursor = s["next_cursor"].as_str().unwrap().to_string();
    let (err, s2, _) = call(
        &client,
        "list_events",
        json!({"kinds": ["xid"], "limit": 2, "cursor": cursor}),
    )
    .await;
    assert!(!err);
    assert_eq!(s2["events"].as_array().unwrap().len(), 1);
    assert!(s2["next_cursor"].is_null());

    let (err, s, _) = call(&client, "xid_summary", json!({"group_by": "gpu"})).await;
    assert!(!err);
    assert_eq!(s["total"], 3);
    assert_eq!(s["groups"].as_array().unwrap().len(), 2);
    assert_eq!(s["window"]["window_defaulted"], true, "24h default");

    let (err, s, _) = call(&client, "describe_xid", json!({"xid": 79})).await;
    assert!(!err);
    assert_eq!(s["name"], "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
    assert_eq!(s["severity"], "fatal");

    let (err, s, _) = call(
        &client,
        "gpu_metric_trend",
        json!({"metric": "gpu_util_pct", "group_by": "gpu", "nodes": ["gpu-node-1"]}),
    )
    .await;
    assert!(!err);
    assert_eq!(s["series"].as_array().unwrap().len(), 2);
    assert_eq!(s["source"], "raw");
    assert_eq!(s["series"][0]["stats"]["max"], 95.0);

    let (err, s, _) = call(&client, "describe_node", json!({"node": "gpu-node-1"})).await;
    assert!(!err);
    assert_eq!(s["gpus"].as_array().unwrap().len(), 2);
    assert_eq!(s["xid_count_window"], 3);
    assert_eq!(s["processes"][0]["pid"], 4242);
    assert_eq!(s["processes"][0]["pod"], "ml/trainer-0");
    assert_eq!(s["processes"][0]["gpu_mem_bytes"], 1u64 << 30);
    assert_eq!(s["agent"]["driver"], "570.124.06");

    let (err, s, _) = call(
        &client,
        "list_gpu_processes",
        json!({"state": "running", "gpu": "0"}),
    )
    .await;
    assert!(!err);
    assert_eq!(s["total_matched"], 1);

    // The XIDs judged GPU 0 unhealthy: RESET_GPU (119) worst-first with RESTART_BM (79), each
    // with the event it came from; the others are healthy.
    let (err, s, text) = call(&client, "gpu_health", json!({})).await;
    assert!(!err, "{text}");
    assert_eq!(
        (s["unhealthy"].clone(), s["healthy"].clone()),
        (json!(1), json!(2)),
        "{s}"
    );
    let g = &s["gpus"][0];
    assert_eq!(g["gpu_pci"], "0000:3b:00.0");
    let actions: Vec<&str> = g["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"RESET_GPU") && actions.contains(&"RESTART_BM"),
        "{actions:?}"
    );
    assert!(g["reasons"][0]["evidence"][0]["cursor"].as_u64().unwrap() > 0);
    let (err, s, _) = call(
        &client,
        "gpu_health",
        json!({"node": "gpu-node-2", "include_healthy": true}),
    )
    .await;
    assert!(!err);
    assert_eq!(s["gpus"][0]["state"], "healthy");

    let (err, s, _) = call(&client, "list_nodes", json!({"only_unhealthy": true})).await;
    assert!(!err);
    assert_eq!(s["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(s["nodes"][0]["health"], "critical");

    // Bad arguments: isError with actionable text, never a crash.
    for (tool, args, want) in [
        ("list_events", json!({"since": "yesterday"}), "RFC 3339"),
        ("list_events", json!({"limit": 5000}), "1-500"),
        ("list_events", json!({"cursor": "bogus"}), "cursor"),
        ("describe_node", json!({"node": "gpu-node-7"}), "gpu-node-1"),
        ("describe_xid", json!({"xid": 999}), "not in the catalog"),
        (
            "gpu_metric_trend",
            json!({"metric": "fan_speed"}),
            "unknown metric",
        ),
        ("xid_summary", json!({"node": "nope"}), "unknown node"),
        ("list_nodes", json!({"cursor": "x"}), "cursor"),
    ] {
        let (err, _, text) = call(&client, tool, args.clone()).await;
        assert!(err, "{tool} {args}: expected isError, got {text}");
        assert!(text.contains(want), "{tool} {args}: {text}");
    }

    let prompts = client.list_all_prompts().await.unwrap();
    assert_eq!(prompts.len(), 2);
    let p = client
        .get_prompt(
            GetPromptRequestParams::new("triage_node")
                .with_arguments(json!({"node": "gpu-node-1"}).as_object().cloned().unwrap()),
        )
        .await
        .unwrap();
    assert!(format!("{:?}", p.messages).contains("describe_node(node=\\\"gpu-node-1\\\""));
    let r = client
        .read_resource(ReadResourceRequestParams::new(gpulse_mcp::CATALOG_URI))
        .await
        .unwrap();
    let body = format!("{:?}", r.contents);
    assert!(body.contains("ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS"));
    client.cancel().await.unwrap();
}

/// The `enum` of a property named `name` anywhere in a JSON schema (following `$defs`).
fn find_enum(schema: &Value, name: &str) -> Option<Vec<String>> {
    let prop = &schema["properties"][name];
    let target = match prop.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let key = r.rsplit('/').next()?;
            schema
                .get("$defs")
                .or_else(|| schema.get("definitions"))?
                .get(key)?
                .clone()
        }
        None => prop.clone(),
    };
    let list = target.get("enum").or_else(|| {
        target
            .get("oneOf")
            .and_then(|o| o.as_array())
            .map(|_| &Value::Null)
    })?;
    match list {
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        _ => target.get("oneOf").and_then(Value::as_array).map(|arr| {
            arr.iter()
                .filter_map(|v| v.get("const").and_then(Value::as_str).map(str::to_string))
                .collect()
        }),
    }
}

/// Every tool's structured answer for the test data set, with times and tokens (which depend on
/// when the test runs) replaced by placeholders, compared with `tests/mcp_answers.json`. A change
/// to any answer fails here; `UPDATE_ANSWERS=1` rewrites the file for a deliberate one.
#[tokio::test]
async fn tool_answers_are_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let h = fed_store(dir.path()).await;
    let client = mcp_client(&h).await;
    let calls = [
        ("events_summary", json!({"since": "1h"})),
        (
            "events_summary",
            json!({"nodes": ["gpu-node-2"], "kinds": ["gpu_sample"]}),
        ),
        ("list_events", json!({"limit": 3})),
        (
            "list_events",
            json!({"kinds": ["xid"], "order": "oldest_first", "min_severity": "error"}),
        ),
        ("xid_summary", json!({})),
        ("xid_summary", json!({"group_by": "gpu"})),
        (
            "xid_summary",
            json!({"group_by": "node", "node": "gpu-node-1"}),
        ),
        ("describe_xid", json!({"xid": 119})),
        (
            "gpu_metric_trend",
            json!({"metric": "gpu_util_pct", "group_by": "gpu", "include_points": false}),
        ),
        (
            "gpu_metric_trend",
            json!({"metric": "power_w", "group_by": "fleet", "aggregate": "max", "include_points": false}),
        ),
        ("describe_node", json!({"node": "gpu-node-1"})),
        (
            "describe_node",
            json!({"node": "gpu-node-2", "max_events": 0}),
        ),
        ("list_gpu_processes", json!({})),
        ("list_gpu_processes", json!({"state": "exited"})),
        ("list_nodes", json!({})),
        (
            "list_nodes",
            json!({"only_unhealthy": true, "node_match": "gpu-*"}),
        ),
    ];
    let mut answers = Vec::new();
    for (tool, args) in calls {
        let (err, mut s, text) = call(&client, tool, args.clone()).await;
        assert!(!err, "{tool} {args}: {text}");
        placeholders(&mut s);
        answers.push(json!({"tool": tool, "arguments": args, "answer": s}));
    }
    let got = serde_json::to_string_pretty(&answers).unwrap() + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp_answers.json");
    if std::env::var_os("UPDATE_ANSWERS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap();
    if got != want {
        let at = got.lines().zip(want.lines()).position(|(a, b)| a != b);
        panic!(
            "MCP answers differ from {} (first at line {:?}):\n{}",
            path.display(),
            at.map(|i| i + 1),
            got.lines()
                .skip(at.unwrap_or(0).saturating_sub(3))
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    client.cancel().await.unwrap();
}

/// Replaces what depends on the clock: RFC 3339 times, page tokens.
fn placeholders(v: &mut Value) {
    match v {
        Value::String(s) => {
            let b = s.as_bytes();
            let is_time = b.len() >= 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T';
            if is_time {
                *s = "<time>".into();
            } else if s.starts_with("e2.") || s.starts_with("g1.") {
                *s = "<page token>".into();
            } else if s.contains("(20") {
                // Hints that quote a time: "... oldest retained event of these kinds (2026-...)".
                if let Some(i) = s.find("(20") {
                    s.replace_range(i.., "(<time>)");
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(placeholders),
        Value::Object(o) => o.values_mut().for_each(placeholders),
        _ => {}
    }
}
