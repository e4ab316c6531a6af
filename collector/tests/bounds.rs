//! No one client blinds the fleet (issue 27): what one agent credential could send to stall or
//! bloat the collector is refused at the edge, naming the field, and loses nothing else; answers
//! stay within the encode limit whatever is stored. In-process gRPC (tokio duplex).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
mod common;

use common::*;
use gpulse_proto::{
    bounds,
    raw::RawBatch,
    v1::{self, Ack, ListEventsRequest, TimeWindow, event::Payload},
};
use prost::Message as _;

/// Pushes raw encoded events as one batch on a new stream; the ack or the refusal.
async fn push_raw(
    h: &Harness,
    agent: &str,
    node: &str,
    first_seq: u64,
    events: Vec<Vec<u8>>,
) -> Result<Ack, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(h.channel.clone());
    grpc.ready().await.unwrap();
    let hello = RawBatch {
        agent_id: agent.into(),
        node: node.into(),
        boot_id: "b".into(),
        ..Default::default()
    };
    let batch = RawBatch {
        first_seq,
        events: events.into_iter().map(Into::into).collect(),
        ..hello.clone()
    };
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/gpulse.v1.Ingest/Push");
    let codec = tonic_prost::ProstCodec::<RawBatch, Ack>::default();
    let mut acks = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![hello, batch])),
            path,
            codec,
        )
        .await?
        .into_inner();
    acks.message().await?;
    acks.message()
        .await?
        .ok_or_else(|| tonic::Status::unavailable("stream ended"))
}

/// A subscription replaying everything retained, then live.
async fn replay_from_start(h: &Harness) -> tonic::Streaming<v1::SubscribeResponse> {
    subscribe(
        h,
        v1::SubscribeRequest {
            after_cursor: Some(0),
            ..Default::default()
        },
    )
    .await
}

fn refused(r: Result<Ack, tonic::Status>, want: &str) {
    let e = r.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(
        e.message().contains(want),
        "{:?} should say {want:?}",
        e.message()
    );
}

fn sample(processes: usize) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::GpuSample as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            uuid: "GPU-0".into(),
            pci: "0000:3b:00.0".into(),
            processes: vec![v1::GpuProcessMemory::default(); processes],
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// #1, #2, #5, #8: each oversized field is refused by name (or the event by its size before it
/// is decoded), and the same agent's good events after it are stored.
#[tokio::test(flavor = "multi_thread")]
async fn oversized_events_are_refused_by_name_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let h = start_with_limit(store_config(dir.path()), 16 << 20).await;

    // #1: 4 MiB of distinct unknown fields (891k) was 83 s of CPU; refused by its size now.
    let mut many = Vec::new();
    let mut f = 1000u32;
    while many.len() < 4 << 20 {
        prost::encoding::encode_key(f, prost::encoding::WireType::Varint, &mut many);
        many.push(0);
        f += 1;
    }
    refused(
        push_raw(&h, "n/1", "n", 1, vec![many]).await,
        "bytes; at most 65536 are allowed",
    );
    // And within the size bound, too many distinct unknown fields.
    let mut forty = Vec::new();
    for f in 1000u32..1040 {
        prost::encoding::encode_key(f, prost::encoding::WireType::Varint, &mut forty);
        forty.push(0);
    }
    refused(
        push_raw(&h, "n/1", "n", 1, vec![forty]).await,
        "more than 32 unknown fields",
    );

    // #2: 1.3M empty processes (3.7 MiB, 63 MB decoded), and 1,025 in a small event.
    refused(
        push_raw(&h, "n/1", "n", 1, vec![sample(1_300_000).encode_to_vec()]).await,
        "bytes; at most",
    );
    refused(
        push_raw(&h, "n/1", "n", 1, vec![sample(1025).encode_to_vec()]).await,
        "events[0] (seq 1) gpu_sample.processes has 1025 entries; at most 1024",
    );

    // #5: strings that reach every fleet-wide answer.
    let status = v1::Event {
        kind: v1::EventKind::AgentStatus as i32,
        payload: Some(Payload::AgentStatus(v1::AgentStatus {
            detail: "d".repeat(5000),
            ..Default::default()
        })),
        ..Default::default()
    };
    refused(
        push_raw(&h, "n/1", "n", 1, vec![status.encode_to_vec()]).await,
        "agent_status.detail has 5000 bytes",
    );
    let mut drv = sample(1);
    if let Some(Payload::GpuSample(s)) = &mut drv.payload {
        s.driver_version = "5".repeat(100);
    }
    refused(
        push_raw(&h, "n/1", "n", 1, vec![drv.encode_to_vec()]).await,
        "gpu_sample.driver_version",
    );

    // #8: pci_raw keys verdicts and labels series.
    for (raw, want) in [
        ("P".repeat(64 << 10), "bytes; at most"),
        ("P".repeat(65), "xid.pci_raw has 65 bytes"),
        ("PCI:0\"} 1".to_string(), "xid.pci_raw: "),
    ] {
        let mut x = xid(79, "evil");
        if let Some(Payload::Xid(p)) = &mut x.payload {
            p.pci = String::new();
            p.pci_raw = raw;
        }
        refused(
            push_raw(&h, "n/1", "n", 1, vec![x.encode_to_vec()]).await,
            want,
        );
    }

    // Nothing of the refused batches was stored; the agent's next events are.
    let st = h.store.status().await.unwrap();
    assert_eq!(agent_events(&st), 0);
    let ack = push_raw(
        &h,
        "n/1",
        "n",
        1,
        vec![xid(79, "real").encode_to_vec(), sample(8).encode_to_vec()],
    )
    .await
    .unwrap();
    assert_eq!(ack.through_seq, 2);
    let st = h.store.status().await.unwrap();
    assert_eq!(agent_events(&st), 2);
}

/// #14: seqs are checked, never wrapped; a new agent cannot count a loss of 2^63 events.
#[tokio::test(flavor = "multi_thread")]
async fn client_sequence_numbers_never_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let two = || vec![log("a").encode_to_vec(), log("b").encode_to_vec()];
    refused(
        push_raw(&h, "n/1", "n", u64::MAX, two()).await,
        "passes the largest seq",
    );
    refused(
        push_raw(&h, "n/1", "n", i64::MAX as u64, two()).await,
        "passes the largest seq",
    );
    // Within range but further than any spool explains, for an agent never seen.
    let e = push_raw(&h, "n/2", "n", 1 << 62, two()).await.unwrap_err();
    assert!(
        e.message().contains("further than any spool explains"),
        "{e}"
    );
    assert_eq!(h.metrics.ingest_seq_gap_events.get(), 0);
    let st = h.store.status().await.unwrap();
    assert_eq!(
        agent_events(&st),
        0,
        "no event with a wrapped seq was stored"
    );
    // An honest jump is still a counted gap.
    let ack = push_raw(&h, "n/3", "n", 11, two()).await.unwrap();
    assert_eq!(ack.through_seq, 12);
    assert_eq!(h.metrics.ingest_seq_gap_events.get(), 10);
}

/// #5: pages of large (but allowed) events end early by bytes instead of failing to encode;
/// paging lists every event once; a replay from cursor 0 delivers them all.
#[tokio::test(flavor = "multi_thread")]
async fn answers_stay_within_the_encode_limit() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let big = |i: usize| {
        let mut x = xid(13, &format!("{i:04}{}", "m".repeat(bounds::MAX_TEXT - 4)));
        if let Some(Payload::Xid(p)) = &mut x.payload {
            p.raw = "r".repeat(bounds::MAX_TEXT);
            p.description = "d".repeat(bounds::MAX_TEXT);
            p.immediate_action = "a".repeat(bounds::MAX_TEXT);
            p.investigatory_action = "i".repeat(bounds::MAX_TEXT);
        }
        x
    };
    // 300 events of ~20 KiB: 6 MiB, past the 4 MiB encode limit of one answer.
    let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
    for chunk in 0..10 {
        let evs = (0..30).map(|i| big(chunk * 30 + i)).collect();
        a.send(1 + chunk as u64 * 30, evs).await.unwrap();
    }
    let mut c = gpulse_proto::v1::telemetry_client::TelemetryClient::new(h.channel.clone());
    let mut token = String::new();
    let mut got = Vec::new();
    let mut pages = 0;
    loop {
        let r = c
            .list_events(ListEventsRequest {
                limit: 1000,
                page_token: token.clone(),
                window: Some(TimeWindow {
                    since: "1h".into(),
                    ..Default::default()
                }),
                filter: Some(v1::EventFilter {
                    kinds: vec![v1::EventKind::Xid as i32],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("a page always fits")
            .into_inner();
        assert!(r.encoded_len() <= 4 << 20);
        pages += 1;
        got.extend(r.events.iter().map(|e| e.seq));
        if r.next_page_token.is_empty() {
            break;
        }
        assert!(
            r.hints.iter().any(|h| h.contains("to stay within 3 MiB")),
            "{:?}",
            r.hints
        );
        token = r.next_page_token;
    }
    assert!(pages >= 2, "{pages} pages");
    got.sort_unstable();
    assert_eq!(got, (1..=300).collect::<Vec<u64>>());

    // A replay from cursor 0 delivers every event, one per message.
    let mut s = replay_from_start(&h).await;
    for _ in 0..300 {
        let m = next(&mut s).await.expect("stream open");
        assert!(message_of(&m).len() >= bounds::MAX_TEXT);
    }
}

/// Opens a stream for `agent` of `node`, takes the Hello answer, and closes it.
async fn hello_only(h: &Harness, agent: &str, node: &str) -> Result<Ack, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(v1::Batch {
        agent_id: agent.into(),
        node: node.into(),
        boot_id: "b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = v1::ingest_client::IngestClient::new(h.channel.clone())
        .push(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let r = acks
        .message()
        .await?
        .ok_or_else(|| tonic::Status::unavailable("ended"));
    drop(tx);
    while let Ok(Some(_)) = acks.message().await {}
    r
}

/// #9: Hello-only agent ids made every later batch rotate the log (their progress filled each
/// checkpoint): 212 MB of WAL for 24 KB of events. Ids that stored nothing stay out of
/// checkpoints, and one node holds at most 64 ids.
#[tokio::test(flavor = "multi_thread")]
async fn hello_only_agent_ids_neither_grow_the_log_nor_crowd_other_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let (mut good, _) = AgentStream::open(&h, "good/1", "good").await;
    good.send(1, vec![log("first")]).await.unwrap();
    for i in 0..3000 {
        let _ = hello_only(&h, &format!("evil/{i:05}-{}", "x".repeat(40)), "evil").await;
    }
    let before = h.store.status().await.unwrap().wal_bytes;
    for seq in 2..52 {
        good.send(seq, vec![log("more")]).await.unwrap();
    }
    let after = h.store.status().await.unwrap().wal_bytes;
    // 50 small events: a few KiB of log, not 50 checkpoints of 3,000 agents (~200 KiB each).
    assert!(
        after.saturating_sub(before) < 256 << 10,
        "the log grew {} bytes for 50 events",
        after.saturating_sub(before)
    );
    let evicted = h.metrics.agent_ids_evicted.get();
    assert!(evicted >= 3000 - 64 - 64, "{evicted} evicted");
    // The good node's agent is still known: its resend is a duplicate, not new.
    let ack = good.send(51, vec![log("more")]).await.unwrap();
    assert_eq!((ack.through_seq, ack.duplicates), (51, 1));
}

/// #13: one flipped byte in `events.snap` dropped 13,429 events, logged as "skipped". The loss
/// is now counted in events (the snapshot's own count less what the log still replays), in
/// Status, the metric and the log; what the log holds is kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_events_snapshot_counts_the_events_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.wal_max_bytes = 128 << 10;
    let total = 3000u64;
    {
        let h = start(cfg.clone()).await;
        let (mut a, _) = AgentStream::open(&h, "n/1", "n").await;
        for chunk in 0..30u64 {
            let evs = (0..100)
                .map(|i| log(&format!("{:05} {}", chunk * 100 + i, "x".repeat(200))))
                .collect();
            a.send(1 + chunk * 100, evs).await.unwrap();
        }
        // Wait until a snapshot covers events and the log was cut behind it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let s = h.store.status().await.unwrap();
            if dir.path().join("events.snap").exists() && s.wal_bytes < 256 << 10 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no snapshot: {s:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        h.store.shutdown().await.unwrap();
    }
    let snap = dir.path().join("events.snap");
    let mut data = std::fs::read(&snap).unwrap();
    let n = data.len();
    data[n / 2] ^= 0xff;
    std::fs::write(&snap, &data).unwrap();

    let h = start(cfg).await;
    let st = h.store.status().await.unwrap();
    let kept = agent_events(&st);
    let lost = st.events_lost_at_recovery;
    assert!(lost > 0, "the loss is counted");
    assert_eq!(kept + lost, total, "kept {kept} + lost {lost}");
    assert_eq!(h.metrics.recovery_events_lost.get(), lost);
}

fn xid_on(code: u32, pci: &str) -> v1::Event {
    let mut x = xid(code, "xid");
    if let Some(Payload::Xid(p)) = &mut x.payload {
        p.pci = pci.into();
    }
    x
}

fn sample_on(index: u32, pci: &str) -> v1::Event {
    v1::Event {
        kind: v1::EventKind::GpuSample as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::GpuSample(v1::GpuSample {
            index,
            uuid: format!("GPU-{index}"),
            pci: pci.into(),
            gpu_util_pct: Some(50),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// #3: one node filled the fleet-wide tables (verdicts, XID counter series, sample history),
/// and a new GPU on another node got XID 79 with no verdict, no counter series and no history.
/// Each node now has a share of each table; what it sends past it is refused for it alone and
/// counted by node.
#[tokio::test(flavor = "multi_thread")]
async fn one_node_at_its_share_never_displaces_another_nodes_gpus() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = store_config(dir.path());
    cfg.verdict.max_gpus = 300;
    cfg.series.max_gpus = 300;
    let h = start(cfg).await;
    let pci = |i: u32| format!("0000:{:02x}:{:02x}.0", i / 32, i % 32);
    let (mut evil, _) = AgentStream::open(&h, "evil/1", "evil").await;
    let mut seq = 1;
    // 1,000 GPUs x 5 codes of XIDs (5,000 counter series), and a sample of each GPU.
    for code in [79u32, 48, 63, 64, 94] {
        for chunk in 0..2u32 {
            let evs: Vec<v1::Event> = (chunk * 500..chunk * 500 + 500)
                .map(|i| xid_on(code, &pci(i)))
                .collect();
            let n = evs.len() as u64;
            evil.send(seq, evs).await.unwrap();
            seq += n;
        }
    }
    let evs: Vec<v1::Event> = (0..1000).map(|i| sample_on(i, &pci(i))).collect();
    evil.send(seq, evs).await.unwrap();

    let (mut good, _) = AgentStream::open(&h, "good/1", "good").await;
    good.send(
        1,
        vec![sample_on(0, "0000:3b:00.0"), xid_on(79, "0000:3b:00.0")],
    )
    .await
    .unwrap();

    // The good node's GPU has its verdict...
    let mut c = gpulse_proto::v1::telemetry_client::TelemetryClient::new(h.channel.clone());
    let health = c
        .gpu_health(v1::GpuHealthRequest {
            node: "good".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.unhealthy, 1, "{health:?}");
    // ... its XID counter series ...
    let text = h.metrics.render().unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("gpulse_xid_events_total{") && l.contains("node=\"good\"")),
        "no counter series for the good node"
    );
    // ... and its history.
    let trend = c
        .trend(v1::TrendRequest {
            metric: "gpu_util_pct".into(),
            window: Some(TimeWindow {
                since: "1h".into(),
                ..Default::default()
            }),
            nodes: vec!["good".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!trend.series.is_empty(), "no history for the good node");
    // The evil node holds its share, and what it sent past it is counted against it.
    use gpulse_collector::share::{COUNTER_SERIES_PER_NODE, GPUS_PER_NODE, table};
    let share = &h.metrics.share;
    // Five XIDs and one sample of each GPU past the share.
    assert_eq!(
        share.get("evil", table::VERDICTS),
        6 * (1000 - GPUS_PER_NODE as u64)
    );
    assert_eq!(
        share.get("evil", table::SAMPLES),
        1000 - GPUS_PER_NODE as u64
    );
    assert_eq!(
        share.get("evil", table::XID_COUNTERS),
        5000 - COUNTER_SERIES_PER_NODE as u64
    );
    assert_eq!(share.get("good", table::VERDICTS), 0);
}

/// #5: a node's latest samples with full process lists made the fleet-wide `Nodes` answer
/// exceed the encode limit. It is cut to its byte budget instead, every node still listed.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_answers_fit_whatever_the_nodes_sent() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(store_config(dir.path())).await;
    let full = |index: u32| {
        let mut e = sample_on(index, &format!("0000:{:02x}:00.0", index));
        if let Some(Payload::GpuSample(s)) = &mut e.payload {
            s.processes = (0..bounds::MAX_PROCESSES as u32)
                .map(|pid| v1::GpuProcessMemory {
                    pid: 100_000 + pid,
                    used_memory_bytes: Some(1 << 30),
                    r#type: "compute".into(),
                })
                .collect();
        }
        e
    };
    for n in 0..2u32 {
        let (mut a, _) = AgentStream::open(&h, &format!("big{n}/1"), &format!("big{n}")).await;
        for chunk in 0..4u32 {
            let evs = (chunk * 32..chunk * 32 + 32).map(full).collect();
            a.send(1 + u64::from(chunk) * 32, evs).await.unwrap();
        }
    }
    let mut c = gpulse_proto::v1::telemetry_client::TelemetryClient::new(h.channel.clone());
    let r = c
        .nodes(v1::NodesRequest::default())
        .await
        .expect("the answer fits")
        .into_inner();
    assert!(r.encoded_len() <= 4 << 20);
    assert_eq!(r.nodes.len(), 2);
    assert!(r.truncated);
    assert!(
        r.hints.iter().any(|h| h.contains("process lists")),
        "{:?}",
        r.hints
    );
    assert!(r.nodes.iter().all(|n| n.gpus.len() == 128));
}

/// #5, the rest: an event stored before the bounds existed (here 5 MiB, written straight into
/// the log) made every default `ListEvents` fail and every replay from cursor 0 end at it. It is
/// listed and replayed as its envelope, and the events after it arrive.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_too_large_for_any_answer_does_not_break_listings_or_replays() {
    use gpulse_collector::store::wal::{BatchHeader, Wal};
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut w, _) = Wal::open(dir.path(), 64 << 20).unwrap();
        let evs = [log("before"), log(&"x".repeat(5 << 20)), log("after")];
        let encoded: Vec<Vec<u8>> = evs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let mut e = e.clone();
                e.seq = i as u64 + 1;
                e.time = Some(gpulse_proto::time::now());
                e.encode_to_vec()
            })
            .collect();
        w.append_batch(
            &BatchHeader {
                node: "old".into(),
                agent_id: "old/1".into(),
                received: Some(gpulse_proto::time::now()),
                first_cursor: 1,
            },
            encoded.iter().map(Vec::as_slice),
        )
        .unwrap();
    }
    let h = start(store_config(dir.path())).await;
    let mut c = gpulse_proto::v1::telemetry_client::TelemetryClient::new(h.channel.clone());
    let r = c
        .list_events(ListEventsRequest::default())
        .await
        .expect("the listing answers")
        .into_inner();
    assert_eq!(r.events.len(), 3);
    assert!(r.events.iter().any(|e| e.payload.is_none() && e.seq == 2));
    assert!(
        r.hints.iter().any(|h| h.contains("without their payload")),
        "{:?}",
        r.hints
    );
    let mut s = replay_from_start(&h).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = next(&mut s).await.expect("the replay goes on");
        if let Some(v1::subscribe_response::Msg::Event(e)) = m.msg {
            got.push((e.seq, e.payload.is_some()));
        }
    }
    assert_eq!(got, [(1, true), (2, false), (3, true)]);
}
