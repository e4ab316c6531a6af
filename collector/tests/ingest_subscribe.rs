//! In-process gRPC tests (tokio duplex): ingest, de-duplication, subscriber filters, resume,
//! slow-subscriber policy, bad input, and restart from the write-ahead log.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod common;

use std::time::{Duration, Instant};

use common::*;
use gpulse_proto::v1::{self, EventFilter, EventKind, SubscribeRequest, subscribe_response::Msg};

#[tokio::test]
async fn ingest_acks_dedupes_resends_and_fans_out() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let mut sub = subscribe(&h, SubscribeRequest::default()).await;
    let (mut a, hello) = AgentStream::open(&h, "node-a/1", "node-a").await;
    assert_eq!(hello.through_seq, 0);

    let ack = a
        .send(1, vec![xid(79, "x1"), xid(13, "x2"), log("l3")])
        .await
        .unwrap();
    assert_eq!((ack.through_seq, ack.duplicates), (3, 0));
    // A resend after a reconnect: everything already stored is dropped, the new event kept.
    let ack = a
        .send(2, vec![xid(13, "x2"), log("l3"), xid(48, "x4")])
        .await
        .unwrap();
    assert_eq!((ack.through_seq, ack.duplicates), (4, 2));

    let got: Vec<String> = futures_collect(&mut sub, 4).await;
    assert_eq!(got, vec!["x1", "x2", "l3", "x4"]);
    assert_eq!(h.metrics.ingest_duplicates.get(), 2);
    assert_eq!(h.metrics.ingest_events.get(), 4);
    let st = h.store.status().await.unwrap();
    // Cursors 4 and 6 are the collector's verdicts on the GPU (XID 79, then 48 joins it).
    assert_eq!(
        (agent_events(&st), st.last_cursor, st.duplicates_dropped),
        (4, 6, 2)
    );

    // A second connection of the same agent learns where to resume.
    drop(a);
    let (_a2, hello) = AgentStream::open(&h, "node-a/1", "node-a").await;
    assert_eq!(hello.through_seq, 4);
}

async fn futures_collect(
    sub: &mut tonic::Streaming<v1::SubscribeResponse>,
    n: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(message_of(&next(sub).await.unwrap()));
    }
    out
}

#[tokio::test]
async fn filters_select_events() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let mut fatal_xids = subscribe(
        &h,
        SubscribeRequest {
            filter: Some(EventFilter {
                kinds: vec![EventKind::Xid as i32],
                min_severity: v1::Severity::Fatal as i32,
                ..Default::default()
            }),
            after_cursor: None,
            resume_token: Default::default(),
        },
    )
    .await;
    let mut other_node = subscribe(
        &h,
        SubscribeRequest {
            filter: Some(EventFilter {
                nodes: vec!["node-b".into()],
                ..Default::default()
            }),
            after_cursor: None,
            resume_token: Default::default(),
        },
    )
    .await;
    let mut code13 = subscribe(
        &h,
        SubscribeRequest {
            filter: Some(EventFilter {
                xid_codes: vec![13],
                ..Default::default()
            }),
            after_cursor: None,
            resume_token: Default::default(),
        },
    )
    .await;
    let (mut a, _) = AgentStream::open(&h, "node-a/1", "node-a").await;
    a.send(1, vec![log("l"), xid(13, "x13"), xid(79, "x79")])
        .await
        .unwrap();
    assert_eq!(message_of(&next(&mut fatal_xids).await.unwrap()), "x79");
    assert_eq!(message_of(&next(&mut code13).await.unwrap()), "x13");
    let (mut b, _) = AgentStream::open(&h, "node-b/1", "node-b").await;
    b.send(1, vec![log("from b")]).await.unwrap();
    assert_eq!(
        message_of(&next(&mut other_node).await.unwrap()),
        "from b",
        "node-a events were filtered out"
    );
}

#[tokio::test]
async fn resume_after_cursor_replays_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
    a.send(1, (0..10).map(|i| log(&format!("e{i}"))).collect())
        .await
        .unwrap();
    let mut sub = subscribe(
        &h,
        SubscribeRequest {
            filter: None,
            after_cursor: Some(7),
            resume_token: Default::default(),
        },
    )
    .await;
    let got = futures_collect(&mut sub, 3).await;
    assert_eq!(got, vec!["e7", "e8", "e9"]);
    a.send(11, vec![log("live")]).await.unwrap();
    assert_eq!(message_of(&next(&mut sub).await.unwrap()), "live");
}

#[tokio::test]
async fn slow_subscriber_gets_lag_notice_and_never_stalls_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.subscriber_queue = 4;
    cfg.fsync = false;
    let h = start(cfg).await;
    let mut slow = subscribe(&h, SubscribeRequest::default()).await;
    let mut fast = subscribe(&h, SubscribeRequest::default()).await;
    let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
    let started = Instant::now();
    let mut fast_seen = 0;
    // Big events so the slow subscriber's HTTP/2 window fills quickly and its queue overflows.
    let pad = "x".repeat(4000);
    for i in 0..1000u64 {
        a.send(
            i * 4 + 1,
            (0..4)
                .map(|j| log(&format!("e{} {pad}", i * 4 + j)))
                .collect(),
        )
        .await
        .unwrap();
        // The fast subscriber keeps up: a batch never exceeds its queue.
        while fast_seen < (i + 1) * 4 {
            let m = next(&mut fast).await.unwrap();
            assert!(
                matches!(m.msg, Some(Msg::Event(_))),
                "fast subscriber lagged: {m:?}"
            );
            fast_seen += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "ingest stalled behind a slow subscriber"
    );
    // The slow one gets what fit (plus what the transport buffered), then Lagged notices that
    // account for every event it did not receive.
    let mut events = 0u64;
    let mut missed = 0u64;
    while events + missed < 4000 {
        match next(&mut slow).await.unwrap().msg {
            Some(Msg::Event(_)) => events += 1,
            Some(Msg::Lagged(l)) => missed += l.missed,
            Some(Msg::Upstream(u)) => panic!("a collector sent an upstream note: {u:?}"),
            None => {}
        }
    }
    assert_eq!(events + missed, 4000);
    assert!(
        missed > 0,
        "a queue of 4 behind a full HTTP/2 window cannot have held 4000 events"
    );
    assert_eq!(h.metrics.subscriber_dropped.get(), missed);
    assert!(h.metrics.subscriber_lag_notices.get() >= 1);
}

#[tokio::test]
async fn malformed_batches_get_clear_errors_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut good, _) = AgentStream::open(&h, "good/1", "good").await;
    good.send(1, vec![xid(79, "keep")]).await.unwrap();

    let (mut bad, _) = AgentStream::open(&h, "bad/1", "bad").await;
    let mut no_payload = log("x");
    no_payload.payload = None;
    let err = bad.send(1, vec![no_payload]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("no payload"), "{}", err.message());
    let (mut bad2, _) = AgentStream::open(&h, "bad/2", "bad").await;
    let err = bad2
        .send(
            5,
            vec![log("a"), {
                let mut e = log("b");
                e.seq = 9;
                e
            }],
        )
        .await
        .unwrap_err();
    assert!(err.message().contains("contiguous"), "{}", err.message());
    assert_eq!(h.metrics.ingest_rejected_batches.get(), 2);

    // The good agent and the store are unaffected.
    good.send(2, vec![xid(48, "still fine")]).await.unwrap();
    let mut sub = subscribe(
        &h,
        SubscribeRequest {
            filter: None,
            after_cursor: Some(0),
            resume_token: Default::default(),
        },
    )
    .await;
    assert_eq!(
        futures_collect(&mut sub, 2).await,
        vec!["keep", "still fine"]
    );
}

#[tokio::test]
async fn oversized_messages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_with_limit(store_config(dir.path()), 64 << 10).await;
    let (mut a, _) = AgentStream::open(&h, "big/1", "big").await;
    let huge = log(&"x".repeat(200 << 10));
    let err = a.send(1, vec![huge]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("message length too large") || err.message().contains("too large"),
        "{}",
        err.message()
    );
    // Nothing was stored and other agents still work.
    let (mut b, _) = AgentStream::open(&h, "ok/1", "ok").await;
    assert_eq!(b.send(1, vec![log("small")]).await.unwrap().through_seq, 1);
    assert_eq!(agent_events(&h.store.status().await.unwrap()), 1);
}

#[tokio::test]
async fn bad_subscribe_filters_are_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let err = gpulse_proto::v1::telemetry_client::TelemetryClient::new(h.channel.clone())
        .subscribe(SubscribeRequest {
            filter: Some(EventFilter {
                kinds: vec![99],
                ..Default::default()
            }),
            after_cursor: None,
            resume_token: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("unknown event kind 99"));
}

#[tokio::test]
async fn restart_restores_events_cursors_and_dedupe_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = start(store_config(dir.path())).await;
        let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
        a.send(1, (0..5).map(|i| xid(13, &format!("before{i}"))).collect())
            .await
            .unwrap();
    }
    // Same data dir: a new collector process.
    let h = start(store_config(dir.path())).await;
    let (mut a, hello) = AgentStream::open(&h, "n/1", "n").await;
    assert_eq!(hello.through_seq, 5, "dedupe state restored");
    // The agent resends what it never saw acked plus new events: no duplicates stored.
    let ack = a
        .send(
            4,
            vec![xid(13, "before3"), xid(13, "before4"), xid(79, "after")],
        )
        .await
        .unwrap();
    assert_eq!((ack.through_seq, ack.duplicates), (6, 2));
    let mut sub = subscribe(
        &h,
        SubscribeRequest {
            filter: None,
            after_cursor: Some(0),
            resume_token: Default::default(),
        },
    )
    .await;
    let mut cursors = Vec::new();
    let mut msgs = Vec::new();
    for _ in 0..6 {
        if let Some(Msg::Event(e)) = next(&mut sub).await.unwrap().msg {
            cursors.push(e.cursor);
            msgs.push(match e.payload {
                Some(v1::event::Payload::Xid(x)) => x.message,
                _ => String::new(),
            });
        }
    }
    // Cursor 6 is the collector's verdict on the GPU the XID 13s degraded (written with them).
    assert_eq!(cursors, vec![1, 2, 3, 4, 5, 7]);
    assert_eq!(
        msgs,
        vec![
            "before0", "before1", "before2", "before3", "before4", "after"
        ]
    );
}

async fn all_events(h: &Harness, n: usize) -> Vec<v1::Event> {
    let mut sub = subscribe(
        h,
        SubscribeRequest {
            filter: None,
            after_cursor: Some(0),
            resume_token: Default::default(),
        },
    )
    .await;
    let mut out = Vec::new();
    for _ in 0..n {
        match next(&mut sub).await.unwrap().msg {
            Some(Msg::Event(e)) => out.push(e),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    out
}

/// Every event as stored (envelope set by the collector, seqs and kinds it filled in, the gap
/// it recorded) comes back byte for byte after a restart, and so does the store's accounting.
#[tokio::test]
async fn restart_replays_exactly_what_was_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (before, bytes_before) = {
        let h = start(store_config(dir.path())).await;
        let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
        // What an agent should not set, set anyway: the collector's envelope wins.
        let lie = |mut e: v1::Event| {
            e.node = "not-n".into();
            e.agent_id = "someone/else".into();
            e.cursor = 999;
            e.received = Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 2,
            });
            e
        };
        a.send(
            1,
            vec![
                lie(xid(79, "fell off the bus")),
                log("seq and kind left at 0"),
            ],
        )
        .await
        .unwrap();
        // Seqs 3..=4 never arrive: a gap event is stored before seq 5.
        let mut late = log("after the jump");
        late.seq = 5;
        a.send(5, vec![late, lie(xid(13, "warp"))]).await.unwrap();
        let stored = all_events(&h, 5).await;
        let bytes = h.store.status().await.unwrap().ring_bytes;
        (stored, bytes)
    };
    assert_eq!(before[0].node, "n");
    assert_eq!(before[0].agent_id, "n/1");
    assert_eq!(before[0].cursor, 1);
    assert_ne!(before[0].received.unwrap().seconds, 1);
    assert_eq!(before[1].seq, 2);
    assert_eq!(before[1].kind, v1::EventKind::DriverLog as i32);
    assert_eq!(before[2].kind, v1::EventKind::Gap as i32);
    let h = start(store_config(dir.path())).await;
    let after = all_events(&h, 5).await;
    assert_eq!(after, before);
    assert_eq!(h.store.status().await.unwrap().ring_bytes, bytes_before);
}

#[tokio::test]
async fn restart_with_damaged_log_skips_damage_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let h = start(store_config(dir.path())).await;
        let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
        a.send(1, (0..3).map(|i| log(&format!("e{i}"))).collect())
            .await
            .unwrap();
    }
    let seg = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut data = std::fs::read(&seg).unwrap();
    data.extend_from_slice(b"\xff\xff\x00\x00garbage-after-a-crash");
    std::fs::write(&seg, data).unwrap();
    let h = start(store_config(dir.path())).await;
    assert_eq!(h.metrics.wal_corruptions.get(), 1);
    assert_eq!(agent_events(&h.store.status().await.unwrap()), 3);
    let (mut a, hello) = AgentStream::open(&h, "n/1", "n").await;
    assert_eq!(hello.through_seq, 3);
    assert_eq!(a.send(4, vec![log("e3")]).await.unwrap().through_seq, 4);
    // The damaged bytes could have held frames with cursors 4.. that a subscriber saw before the
    // crash: the new event's cursor lies beyond all of them, and resuming after 3 still finds it.
    let st = h.store.status().await.unwrap();
    assert!(
        st.last_cursor > 4 + 25 / 9,
        "cursor {} may reuse a lost one",
        st.last_cursor
    );
    let mut sub = subscribe(
        &h,
        SubscribeRequest {
            filter: None,
            after_cursor: Some(3),
            resume_token: Default::default(),
        },
    )
    .await;
    assert_eq!(message_of(&next(&mut sub).await.unwrap()), "e3");
}

#[tokio::test]
async fn agent_sequence_jump_is_recorded_as_gap() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
    a.send(1, vec![log("a")]).await.unwrap();
    a.send(5, vec![log("b")]).await.unwrap();
    let mut sub = subscribe(
        &h,
        SubscribeRequest {
            filter: Some(EventFilter {
                kinds: vec![EventKind::Gap as i32],
                ..Default::default()
            }),
            after_cursor: Some(0),
            resume_token: Default::default(),
        },
    )
    .await;
    let Some(Msg::Event(e)) = next(&mut sub).await.unwrap().msg else {
        panic!()
    };
    let Some(v1::event::Payload::Gap(g)) = e.payload else {
        panic!()
    };
    assert_eq!(g.missed, 3);
    assert_eq!(h.metrics.ingest_seq_gap_events.get(), 3);
}

#[tokio::test]
async fn a_handover_between_shards_is_no_loss_but_a_jump_past_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
    a.send(1, vec![log("a")]).await.unwrap();
    // The agent spent seqs 2..=9 on another shard, which acknowledged them.
    let send = |first_seq: u64, delivered_through: u64| {
        let tx = a.tx.clone();
        async move {
            tx.send(v1::Batch {
                agent_id: "n/1".into(),
                node: "n".into(),
                boot_id: "b".into(),
                first_seq,
                events: vec![log("x")],
                delivered_through,
            })
            .await
            .unwrap();
        }
    };
    send(10, 9).await;
    assert_eq!(a.acks.message().await.unwrap().unwrap().through_seq, 10);
    assert_eq!(h.metrics.ingest_seq_gap_events.get(), 0, "a handover");
    // Seqs 11..=12 acknowledged elsewhere, 13..=14 nowhere: only those are a loss.
    send(15, 12).await;
    assert_eq!(a.acks.message().await.unwrap().unwrap().through_seq, 15);
    assert_eq!(h.metrics.ingest_seq_gap_events.get(), 2);
}

#[tokio::test]
async fn agent_spool_notice_explains_its_own_sequence_jump() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
    a.send(1, vec![log("a")]).await.unwrap();
    // The agent dropped seqs 2..=5 and put its notice in place of seq 5.
    let notice = v1::Event {
        kind: EventKind::Gap as i32,
        severity: v1::Severity::Warning as i32,
        payload: Some(v1::event::Payload::Gap(v1::Gap {
            stage: v1::GapStage::AgentSpool as i32,
            missed: 4,
            detail: "spool".into(),
        })),
        ..Default::default()
    };
    let ack = a.send(5, vec![notice, log("b")]).await.unwrap();
    assert_eq!(ack.through_seq, 6);
    assert_eq!(
        h.metrics.ingest_seq_gap_events.get(),
        0,
        "the agent explained the jump"
    );
    let reported = h
        .metrics
        .agent_reported_drops
        .with_label_values(&["n", "agent_spool"])
        .get();
    assert_eq!(reported, 4);
    assert_eq!(agent_events(&h.store.status().await.unwrap()), 3);
}

#[tokio::test]
async fn nodes_report_latest_gpu_samples_and_agent_state_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let sample = |index: u32, util: u32| v1::Event {
        kind: EventKind::GpuSample as i32,
        severity: v1::Severity::Info as i32,
        payload: Some(v1::event::Payload::GpuSample(v1::GpuSample {
            index,
            uuid: format!("GPU-{index}"),
            gpu_util_pct: Some(util),
            ..Default::default()
        })),
        ..Default::default()
    };
    let status = v1::Event {
        kind: EventKind::AgentStatus as i32,
        severity: v1::Severity::Info as i32,
        payload: Some(v1::event::Payload::AgentStatus(v1::AgentStatus {
            xid_source: "ebpf".into(),
            detail: "started".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    {
        let h = start(store_config(dir.path())).await;
        let (mut a, _) = AgentStream::open(&h, "gpu-node/1", "gpu-node").await;
        a.send(1, vec![status, sample(0, 10), sample(1, 20), sample(0, 30)])
            .await
            .unwrap();
        let r = h.store.nodes(None).await.unwrap().unwrap();
        assert_eq!(r.nodes.len(), 1);
        let n = &r.nodes[0];
        assert_eq!(
            (n.node.as_str(), n.xid_source.as_str()),
            ("gpu-node", "ebpf")
        );
        assert_eq!(n.connected_agents, vec!["gpu-node/1"]);
        assert_eq!(n.gpus.len(), 2);
        assert_eq!(n.gpus[0].gpu_util_pct, Some(30), "latest sample wins");
        assert!(n.last_seen.is_some());
    }
    // Restored from the WAL; nobody connected now.
    let h = start(store_config(dir.path())).await;
    let r = h.store.nodes(None).await.unwrap().unwrap();
    assert_eq!(r.nodes[0].gpus.len(), 2);
    assert!(r.nodes[0].connected_agents.is_empty());
}
