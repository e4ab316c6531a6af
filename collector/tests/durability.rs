//! Acks only for what is on disk, a failed fsync stops the store, a bounded number of
//! subscribers, and a stop that ends every stream. In-process gRPC (tokio duplex) with a
//! fault-injecting fsync, plus one real listener for the stop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

mod common;

use std::{
    io,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use gpulse_collector::{
    readiness::Problem,
    server::{self, ServerConfig},
    state::StoreConfig,
    store::syncer::SyncHook,
};
use gpulse_proto::v1::{SubscribeRequest, telemetry_client::TelemetryClient};

/// An fsync that waits until the gate opens (a slow disk).
#[derive(Clone, Default)]
struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    fn open(&self) {
        *self.0.0.lock().unwrap() = true;
        self.0.1.notify_all();
    }

    fn hook(&self) -> SyncHook {
        let g = self.clone();
        SyncHook(Arc::new(move |f| {
            let (lock, cv) = &*g.0;
            let open = cv
                .wait_timeout_while(lock.lock().unwrap(), Duration::from_secs(20), |o| !*o)
                .unwrap();
            drop(open);
            f.sync_data()
        }))
    }
}

/// Opens a stream for `agent` and returns what its Hello was answered with.
async fn hello(h: &Harness, agent: &str) -> (AgentStream, u64) {
    let (s, ack) = AgentStream::open(h, agent, "node-a").await;
    (s, ack.through_seq)
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_wait_for_the_sync_and_hello_reports_only_what_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::default();
    let mut cfg = store_config(dir.path());
    cfg.sync_hook = Some(gate.hook());
    let h = start(cfg).await;

    let (mut a, through) = hello(&h, "agent-1").await;
    assert_eq!(through, 0);
    a.tx.send(gpulse_proto::v1::Batch {
        agent_id: "agent-1".into(),
        node: "node-a".into(),
        boot_id: "b".into(),
        first_seq: 1,
        events: vec![xid(79, "one"), xid(79, "two"), xid(79, "three")],
        delivered_through: 0,
    })
    .await
    .unwrap();
    // Written, not synced: no ack yet, and a reconnecting agent is told nothing is safe.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), a.acks.message())
            .await
            .is_err(),
        "acknowledged before the fsync finished"
    );
    let (mut b, through) = hello(&h, "agent-1").await;
    assert_eq!(through, 0, "Hello vouched for data still in the page cache");

    // The resend is all duplicates: its answer waits for the sync too.
    let resend = tokio::spawn(async move {
        let ack = b
            .send(1, vec![xid(79, "one"), xid(79, "two"), xid(79, "three")])
            .await;
        (b, ack)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !resend.is_finished(),
        "duplicate-only answer before the sync"
    );
    gate.open();
    let ack = tokio::time::timeout(Duration::from_secs(5), a.acks.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ack.through_seq, 3);
    let (_b, dup) = tokio::time::timeout(Duration::from_secs(5), resend)
        .await
        .unwrap()
        .unwrap();
    let dup = dup.unwrap();
    assert_eq!((dup.through_seq, dup.duplicates), (3, 3));

    // Once the sync is reported to the store, Hello says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_c, through) = hello(&h, "agent-1").await;
        if through == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Hello never reached 3: {through}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_fsync_stops_acks_for_good_and_fails_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let mut cfg = store_config(dir.path());
    cfg.sync_hook = Some(SyncHook(Arc::new(move |file| {
        if f.load(Ordering::SeqCst) {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            file.sync_data()
        }
    })));
    let h = start(cfg).await;
    let (mut a, _) = hello(&h, "agent-1").await;
    assert_eq!(
        a.send(1, vec![xid(79, "safe")]).await.unwrap().through_seq,
        1
    );

    failing.store(true, Ordering::SeqCst);
    let err = a.send(2, vec![xid(79, "lost?")]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    // The ack hears of the failure first; the store a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !h.store.health().is_sync_failed() {
        assert!(
            Instant::now() < deadline,
            "the store never heard of the failed fsync"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let p = h.store.health().readiness(Instant::now());
    assert!(matches!(p, Some(Problem::SyncFailed(_))), "{p:?}");
    assert_eq!(h.metrics.store_sync_errors.get(), 1);
    assert_eq!(h.metrics.store_writable.get(), 0);

    // The disk "recovers"; the store does not believe it: nothing more is acknowledged, and a
    // reconnecting agent keeps everything after seq 1.
    failing.store(false, Ordering::SeqCst);
    let (mut b, through) = hello(&h, "agent-1").await;
    assert_eq!(through, 1);
    let err = b.send(2, vec![xid(79, "lost?")]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("fsync"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribers_beyond_the_cap_are_refused_until_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.max_subscribers = 2;
    let h = start(cfg).await;
    let s1 = subscribe(&h, SubscribeRequest::default()).await;
    let _s2 = subscribe(&h, SubscribeRequest::default()).await;
    let err = TelemetryClient::new(h.channel.clone())
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("--max-subscribers"), "{err}");
    assert_eq!(h.metrics.subscribers_refused.get(), 1);
    drop(s1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TelemetryClient::new(h.channel.clone())
            .subscribe(SubscribeRequest::default())
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted);
                assert!(
                    Instant::now() < deadline,
                    "the closed stream's slot never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The stop of `SIGTERM`: 100 subscribers and an agent stream open, every stream ends with
/// UNAVAILABLE and both servers finish within the default 5 s budget.
#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_every_stream_with_unavailable_and_the_servers_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = ServerConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
        StoreConfig::new(dir.path().to_path_buf()),
    );
    let running = server::start(cfg, async move {
        let _ = stop_rx.await;
    })
    .await
    .unwrap();
    let url = format!("http://{}", running.grpc_addr);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut subs = Vec::new();
    for _ in 0..100 {
        subs.push(
            TelemetryClient::new(channel.clone())
                .subscribe(SubscribeRequest::default())
                .await
                .unwrap()
                .into_inner(),
        );
    }
    let h = Harness {
        store: running.store.clone(),
        metrics: running.metrics.clone(),
        channel: channel.clone(),
    };
    let (mut agent, _) = hello(&h, "agent-1").await;
    assert_eq!(
        agent.send(1, vec![xid(79, "x")]).await.unwrap().through_seq,
        1
    );

    let t = Instant::now();
    stop_tx.send(()).unwrap();
    for (i, s) in subs.iter_mut().enumerate() {
        // The event sent above may come first; then the stream must end with UNAVAILABLE.
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(5), s.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(r) => break r,
                Err(_) => panic!("subscriber {i} still open 5 s after the stop"),
            }
        };
        let status = end.expect_err("a stream that just ends leaves tail unsure why");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(status.message().contains("shutting down"), "{status}");
    }
    let status = tokio::time::timeout(Duration::from_secs(5), agent.acks.message())
        .await
        .expect("the agent stream stays open after the stop")
        .expect_err("the agent stream must end with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    drop((subs, agent, channel, h));
    let (g, w) = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::join!(running.grpc, running.http)
    })
    .await
    .expect("servers still running 5 s after the stop");
    g.unwrap().unwrap();
    w.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    running.store.shutdown().await.unwrap();
    assert!(running.store.is_closed() || running.store.status().await.is_err());
}

fn sample_at(t: prost_types::Timestamp, util: u32) -> gpulse_proto::v1::Event {
    use gpulse_proto::v1::{self, event::Payload};
    v1::Event {
        kind: v1::EventKind::GpuSample as i32,
        severity: v1::Severity::Info as i32,
        time: Some(t),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            index: 0,
            uuid: "GPU-clock".into(),
            gpu_util_pct: Some(util),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// One sample dated an hour ahead (a node clock that jumped) is stored at its arrival time and
/// flagged; the samples after it are not refused as out of order, and the correction survives
/// a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_clock_far_off_is_clamped_flagged_and_freezes_nothing() {
    use gpulse_proto::{time as ptime, v1::subscribe_response::Msg};
    let dir = tempfile::tempdir().unwrap();
    let now = ptime::now();
    let ahead = prost_types::Timestamp {
        seconds: now.seconds + 3600,
        nanos: 0,
    };
    let fine = |s: i64| prost_types::Timestamp {
        seconds: now.seconds + s,
        nanos: 0,
    };
    {
        let h = start(store_config(dir.path())).await;
        let (mut a, _) = hello(&h, "agent-clock").await;
        a.send(1, vec![sample_at(ahead, 10)]).await.unwrap();
        a.send(2, vec![sample_at(fine(1), 20), sample_at(fine(2), 30)])
            .await
            .unwrap();
        assert_eq!(h.metrics.ingest_clock_clamped.get(), 1);
        let st = h.store.status().await.unwrap();
        assert_eq!(
            st.samples_out_of_order, 0,
            "a future sample froze the series"
        );
    }
    let h = start(store_config(dir.path())).await;
    let mut s = subscribe(
        &h,
        SubscribeRequest {
            after_cursor: Some(0),
            ..Default::default()
        },
    )
    .await;
    let first = match next(&mut s).await.and_then(|m| m.msg) {
        Some(Msg::Event(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(first.reported_time, Some(ahead), "the agent's time is kept");
    let t = first.time.unwrap();
    assert!(
        (t.seconds - now.seconds).abs() < 60,
        "stored at its arrival, not an hour ahead: {t:?}"
    );
    let second = match next(&mut s).await.and_then(|m| m.msg) {
        Some(Msg::Event(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(second.reported_time, None);
    assert_eq!(second.time, Some(fine(1)));
}

/// A disconnected agent and its node are forgotten after their retention: the node leaves
/// `Nodes` and the gauges, the agent id the de-duplication table.
#[tokio::test(flavor = "multi_thread")]
async fn agents_and_nodes_past_their_retention_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.agent_retention = Duration::from_secs(2);
    cfg.node_retention = Duration::from_secs(2);
    let h = start(cfg).await;
    {
        let (mut gone, _) = AgentStream::open(&h, "gone-agent", "gone-node").await;
        gone.send(1, vec![xid(79, "last words")]).await.unwrap();
    }
    // A connected one stays however long it is quiet.
    let (mut live, _) = AgentStream::open(&h, "live-agent", "live-node").await;
    live.send(1, vec![xid(13, "still here")]).await.unwrap();
    let names = |r: gpulse_proto::v1::NodesResponse| -> Vec<String> {
        r.nodes.into_iter().map(|n| n.node).collect()
    };
    assert!(names(h.store.nodes(None).await.unwrap().unwrap()).contains(&"gone-node".to_string()));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n = names(h.store.nodes(None).await.unwrap().unwrap());
        if !n.contains(&"gone-node".to_string()) {
            assert!(n.contains(&"live-node".to_string()), "{n:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never forgotten: {n:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!h.store.exposition().await.unwrap().contains("gone-node"));
    assert_eq!(h.metrics.nodes_retired.get(), 1);
    // The agent's retention counts from its disconnect, a moment after its last event: it may
    // leave one sweep after its node.
    while h.metrics.agents_retired.get() < 1 {
        assert!(
            Instant::now() < deadline,
            "the agent id was never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(h.metrics.agents_retired.get(), 1);
    let (_again, through) = hello(&h, "gone-agent").await;
    assert_eq!(through, 0, "the id left the table");
}

/// A resume from the start of a long history is served in bounded steps, in order, with no
/// gap or duplicate at the step boundaries or at the hand-over to live events.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_replay_comes_in_bounded_steps_then_goes_live() {
    use gpulse_proto::v1::{EventFilter, subscribe_response::Msg};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.replay_chunk = 100;
    let h = start(cfg).await;
    let (mut a, _) = hello(&h, "replayer").await;
    let mut seq = 1;
    for b in 0..25 {
        let events: Vec<_> = (0..200)
            .map(|i| {
                let n = b * 200 + i;
                // One XID in fifty: a filtered replay scans far more than it returns. XID 63
                // (IGNORE in the catalog) changes no GPU's health, so no verdict event joins.
                if n % 50 == 0 {
                    xid(63, &format!("x{n}"))
                } else {
                    log(&format!("l{n}"))
                }
            })
            .collect();
        a.send(seq, events).await.unwrap();
        seq += 200;
    }
    let mut all = subscribe(
        &h,
        SubscribeRequest {
            after_cursor: Some(0),
            ..Default::default()
        },
    )
    .await;
    let mut xids = subscribe(
        &h,
        SubscribeRequest {
            after_cursor: Some(0),
            filter: Some(EventFilter {
                kinds: vec![gpulse_proto::v1::EventKind::Xid as i32],
                ..Default::default()
            }),
            resume_token: Default::default(),
        },
    )
    .await;
    a.send(seq, vec![xid(63, "live")]).await.unwrap();
    let mut last = 0;
    for n in 0..5000 {
        match next(&mut all).await.and_then(|m| m.msg) {
            Some(Msg::Event(e)) => {
                assert_eq!(e.cursor, last + 1, "gap or duplicate at event {n}");
                last = e.cursor;
            }
            other => panic!("event {n}: {other:?}"),
        }
    }
    assert_eq!(message_of(&next(&mut all).await.unwrap()), "live");
    for n in 0..100 {
        let m = next(&mut xids).await.unwrap();
        assert_eq!(message_of(&m), format!("x{}", n * 50));
    }
    assert_eq!(message_of(&next(&mut xids).await.unwrap()), "live");
}

/// What a newer agent sends: an event whose payload this collector does not know, between two
/// XIDs. Stored (as received) as `unknown` with the field number, the XIDs behind it too, and
/// still there after a restart; an event with no payload at all is still refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_payload_is_stored_as_unknown_and_the_events_after_it_too() {
    use gpulse_proto::{
        raw::RawBatch,
        v1::{Ack, EventKind, subscribe_response::Msg},
    };
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let newer = {
        let mut b = gpulse_proto::v1::Event {
            kind: 9,
            severity: gpulse_proto::v1::Severity::Warning as i32,
            time: Some(gpulse_proto::time::now()),
            ..Default::default()
        }
        .encode_to_vec();
        // Field 99, a message: the newer agent's payload.
        b.extend_from_slice(&[0x9a, 0x06, 3, 0x0a, 1, b'x']);
        b
    };
    let push = |h: &Harness, events: Vec<Vec<u8>>| {
        let channel = h.channel.clone();
        async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            grpc.ready().await.unwrap();
            let batches = vec![
                RawBatch {
                    agent_id: "newer-agent".into(),
                    node: "n".into(),
                    boot_id: "b".into(),
                    ..Default::default()
                },
                RawBatch {
                    agent_id: "newer-agent".into(),
                    node: "n".into(),
                    boot_id: "b".into(),
                    first_seq: 1,
                    events: events.into_iter().map(Into::into).collect(),
                    delivered_through: 0,
                },
            ];
            let path =
                tonic::codegen::http::uri::PathAndQuery::from_static("/gpulse.v1.Ingest/Push");
            let codec = tonic_prost::ProstCodec::<RawBatch, Ack>::default();
            let mut acks = grpc
                .streaming(
                    tonic::Request::new(tokio_stream::iter(batches)),
                    path,
                    codec,
                )
                .await
                .unwrap()
                .into_inner();
            acks.message().await.unwrap();
            acks.message().await
        }
    };
    {
        let h = start(store_config(dir.path())).await;
        let x = |m: &str| {
            let mut e = xid(79, m);
            e.node = "n".into();
            e.encode_to_vec()
        };
        let ack = push(&h, vec![x("before"), newer.clone(), x("after")])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack.through_seq, 3);
        // No payload at all is still an error, named.
        let bare = gpulse_proto::v1::Event {
            severity: 1,
            ..Default::default()
        }
        .encode_to_vec();
        let err = push(&h, vec![bare]).await.unwrap_err();
        assert!(err.message().contains("has no payload"), "{err}");
    }
    let h = start(store_config(dir.path())).await;
    let mut s = subscribe(
        &h,
        SubscribeRequest {
            after_cursor: Some(0),
            ..Default::default()
        },
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        match next(&mut s).await.and_then(|m| m.msg) {
            Some(Msg::Event(e)) => got.push(e),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(message_of_event(&got[0]), "before");
    assert_eq!(got[1].kind, EventKind::Unknown as i32);
    assert_eq!(got[1].unknown_fields, [99]);
    assert_eq!(got[1].seq, 2);
    assert_eq!(message_of_event(&got[2]), "after");
    // Listed by kind like any other, and counted in the status.
    let st = h.store.status().await.unwrap();
    let unknown = st
        .kinds
        .iter()
        .find(|k| k.kind == EventKind::Unknown as i32)
        .expect("an unknown kind in the status");
    assert_eq!(unknown.events, 1);
}

fn message_of_event(e: &gpulse_proto::v1::Event) -> String {
    match &e.payload {
        Some(gpulse_proto::v1::event::Payload::Xid(x)) => x.message.clone(),
        other => format!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gpu_verdicts_survive_a_restart_and_agents_cannot_forge_them() {
    use gpulse_proto::v1::{
        self, AgentState, AgentStatus, EventKind, GpuHealth, GpuHealthRecord, GpuHealthRequest,
        HealthState, event::Payload,
    };
    let dir = tempfile::tempdir().unwrap();
    let status = |boot: &str| v1::Event {
        kind: EventKind::AgentStatus as i32,
        severity: v1::Severity::Info as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::AgentStatus(AgentStatus {
            state: AgentState::Started as i32,
            boot_id: boot.into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let ask = |h: &Harness| {
        let store = h.store.clone();
        async move {
            store
                .gpu_health(GpuHealthRequest {
                    include_healthy: true,
                    ..Default::default()
                })
                .await
                .unwrap()
        }
    };
    {
        let h = start(store_config(dir.path())).await;
        let (mut a, _) = AgentStream::open(&h, "n/a", "n").await;
        a.send(1, vec![status("boot-1"), xid(48, "DBE")])
            .await
            .unwrap();
        let r = ask(&h).await;
        assert_eq!(r.unhealthy, 1, "{r:?}");
        // An agent's verdict would be a forgery: refused, and nothing changes.
        let forged = v1::Event {
            kind: EventKind::GpuHealth as i32,
            severity: v1::Severity::Info as i32,
            payload: Some(Payload::GpuHealth(GpuHealth {
                record: Some(GpuHealthRecord {
                    node: "n".into(),
                    pci: "0000:3b:00.0".into(),
                    state: HealthState::Healthy as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })),
            ..Default::default()
        };
        let err = a.send(3, vec![forged]).await.unwrap_err();
        assert!(err.message().contains("gpu_health"), "{err}");
        assert_eq!(ask(&h).await.unhealthy, 1);
    }
    // A restart resumes from the verdict event written with the evidence.
    let h = start(store_config(dir.path())).await;
    let r = ask(&h).await;
    assert_eq!((r.unhealthy, r.gpus.len()), (1, 1), "{r:?}");
    let g = &r.gpus[0];
    assert_eq!(g.pci, "0000:3b:00.0");
    assert_eq!(g.boot_id, "boot-1");
    let reason = &g.reasons[0];
    assert_eq!(
        (reason.xid, reason.action.as_str()),
        (Some(48), "RESET_GPU")
    );
    assert_eq!(reason.evidence[0].cursor, 2, "the XID's own cursor");
    assert_eq!(g.xid_history[0].code, 48);
}
