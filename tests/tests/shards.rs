//! Collector shards, as agents see them: the real agent client (in-process, with its spool)
//! against three collector processes. The node's first-ranked shard (rendezvous hashing) gets its
//! events; killed, the agent fails over to the next-ranked one; restarted, the agent returns to it.
//! Across the three shards every seq is stored (0 lost), merged by (agent id, seq) nothing shows
//! twice, no shard records a loss for seqs another shard holds, and a gateway over the three
//! lists every seq exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use gpulse_agent::{
    client::{self, ClientConfig},
    shards::{self, Shard},
    spool::{SharedSpool, SpoolLimits},
    stats::AgentStats,
};
use gpulse_e2e::*;
use gpulse_proto::v1::{
    self, EventFilter, GapStage, ListEventsRequest, event::Payload,
    telemetry_client::TelemetryClient,
};

const NODE: &str = "shard-node";

fn log(i: u64) -> v1::Event {
    v1::Event {
        node: NODE.into(),
        kind: v1::EventKind::DriverLog as i32,
        severity: v1::Severity::Info as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::DriverLog(v1::DriverLog {
            text: format!("line {i}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Every event a collector holds for NODE, paging through ListEvents.
async fn stored(url: &str) -> Vec<v1::Event> {
    let mut c = TelemetryClient::connect(url.to_string()).await.unwrap();
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let r = c
            .list_events(ListEventsRequest {
                filter: Some(EventFilter {
                    nodes: vec![NODE.into()],
                    ..Default::default()
                }),
                limit: 500,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(r.events);
        if r.next_page_token.is_empty() {
            return out;
        }
        token = r.next_page_token;
    }
}

fn texts(evs: &[v1::Event]) -> usize {
    evs.iter()
        .filter(|e| matches!(e.payload, Some(Payload::DriverLog(_))))
        .count()
}

#[test]
fn failover_to_the_next_shard_and_back_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let start = |i: usize| {
        Collector::start(
            &dir.path().join(format!("shard-{i}")),
            ports[i].0,
            ports[i].1,
            &[],
        )
        .unwrap()
    };
    let mut collectors: Vec<Option<Collector>> = (0..3).map(|i| Some(start(i))).collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|(g, _)| format!("http://127.0.0.1:{g}"))
        .collect();
    let list: Vec<Shard> = urls
        .iter()
        .map(|u| Shard {
            key: u.clone(),
            url: u.clone(),
            tls_name: None,
        })
        .collect();
    let ranked = shards::rank(NODE, &list);
    let index = |u: &str| urls.iter().position(|x| x == u).unwrap();
    let (owner, second) = (index(&ranked[0].url), index(&ranked[1].url));

    let stats = Arc::new(AgentStats::default());
    let spool = SharedSpool::new(SpoolLimits::default(), stats.clone());
    let rt = runtime();
    let mut cfg = ClientConfig::new(
        urls.join(","),
        format!("{NODE}/agent"),
        "boot".into(),
        NODE.into(),
    );
    cfg.return_check = Duration::from_millis(500);
    cfg.backoff_max = Duration::from_millis(500);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = rt.spawn(client::run(cfg, spool.clone(), stats.clone(), stop_rx));
    let mut seq = 0u64;
    let mut feed = |n: u64, spool: &Arc<SharedSpool>| {
        for _ in 0..n {
            seq += 1;
            spool.push(log(seq));
        }
    };
    let drained = |spool: &Arc<SharedSpool>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !spool.lock().is_empty() {
            assert!(std::time::Instant::now() < deadline, "not all acknowledged");
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    feed(200, &spool);
    drained(&spool);
    let before = rt.block_on(stored(&urls[owner]));
    assert_eq!(
        texts(&before),
        200,
        "the first-ranked shard gets the node's events"
    );

    // The owner dies: events go to the next-ranked shard.
    collectors[owner].as_mut().unwrap().proc.kill9();
    collectors[owner] = None;
    for _ in 0..10 {
        feed(30, &spool);
        std::thread::sleep(Duration::from_millis(50));
    }
    drained(&spool);
    assert!(AgentStats::get(&stats.failovers) >= 1);
    let on_second = rt.block_on(stored(&urls[second]));
    assert!(texts(&on_second) >= 300, "{}", texts(&on_second));

    // The owner is back (same data): the agent returns to it.
    collectors[owner] = Some(start(owner));
    std::thread::sleep(Duration::from_millis(1500));
    feed(200, &spool);
    drained(&spool);
    stop_tx.send(true).unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await })
        .expect("client did not stop")
        .unwrap()
        .unwrap();

    let per_shard: Vec<Vec<v1::Event>> = urls.iter().map(|u| rt.block_on(stored(u))).collect();
    let after_return = texts(&per_shard[owner]) - 200;
    assert!(
        after_return > 0,
        "the agent returned to its first-ranked shard"
    );
    // Merged by (agent id, seq): every seq once.
    let mut seqs = BTreeSet::new();
    let mut all = 0;
    for evs in &per_shard {
        for e in evs {
            if matches!(e.payload, Some(Payload::DriverLog(_))) {
                all += 1;
                seqs.insert((e.agent_id.clone(), e.seq));
            }
        }
    }
    assert_eq!(
        seqs.len() as u64,
        seq,
        "lost events: {} of {seq} stored",
        seqs.len()
    );
    eprintln!(
        "shards: {seq} events, owner {} (after return {after_return}), second {}, third {}; stored {all} (resent to two shards: {})",
        texts(&per_shard[owner]),
        texts(&per_shard[second]),
        texts(&per_shard[3 - owner - second]),
        all - seqs.len()
    );
    // No shard records a loss for what another shard holds.
    for (i, evs) in per_shard.iter().enumerate() {
        let gaps: Vec<&v1::Gap> = evs
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Gap(g)) if g.stage == GapStage::CollectorSeq as i32 => Some(g),
                _ => None,
            })
            .collect();
        assert!(gaps.is_empty(), "shard {i} recorded a loss: {gaps:?}");
    }
    assert_eq!(
        texts(&per_shard[3 - owner - second]),
        0,
        "the third shard saw nothing"
    );

    // Through a gateway over the three shards: the merged listing has every seq exactly once
    // (a copy two shards hold is listed once), in order.
    let gw = Gateway::start(
        dir.path(),
        &[
            ("s0", urls[0].clone()),
            ("s1", urls[1].clone()),
            ("s2", urls[2].clone()),
        ],
        &[],
    )
    .unwrap();
    let merged = rt.block_on(stored(&gw.url()));
    let logs: Vec<(String, u64)> = merged
        .iter()
        .filter(|e| matches!(e.payload, Some(Payload::DriverLog(_))))
        .map(|e| (e.agent_id.clone(), e.seq))
        .collect();
    assert_eq!(logs.len() as u64, seq, "merged through the gateway");
    let unique: BTreeSet<_> = logs.iter().cloned().collect();
    assert_eq!(unique.len(), logs.len(), "an event listed twice");
}
