//! Version skew and poison input: an event the collector refuses (here one whose payload it
//! does not know, as a newer agent would send) is set aside by the real agent client as a
//! counted `Gap{COLLECTOR_REFUSED}`, and every event behind it is delivered, against the real
//! collector binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::{sync::Arc, time::Duration};

use gpulse_agent::{
    client::{self, ClientConfig},
    spool::{SharedSpool, SpoolLimits},
    stats::AgentStats,
};
use gpulse_e2e::*;
use gpulse_proto::v1::{self, EventFilter, GapStage, event::Payload};

fn xid(msg: &str) -> v1::Event {
    v1::Event {
        node: "poison-node".into(),
        kind: v1::EventKind::Xid as i32,
        severity: v1::Severity::Error as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(Payload::Xid(v1::Xid {
            code: 13,
            message: msg.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

#[test]
fn a_refused_event_is_set_aside_and_everything_behind_it_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let stats = Arc::new(AgentStats::default());
    let spool = SharedSpool::new(SpoolLimits::default(), stats.clone());
    for i in 0..300 {
        spool.push(xid(&format!("before-{i}")));
    }
    // What this collector cannot read: no payload it knows (a newer agent's payload decodes so).
    spool.push(v1::Event {
        node: "poison-node".into(),
        kind: 42,
        time: Some(gpulse_proto::time::now()),
        ..Default::default()
    });
    for i in 0..300 {
        spool.push(xid(&format!("after-{i}")));
    }
    let rt = runtime();
    let got = rt.block_on(async {
        let mut cfg = ClientConfig::new(
            c.url(),
            "poison-agent".into(),
            "boot".into(),
            "poison-node".into(),
        );
        cfg.max_batch_events = 64;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(client::run(cfg, spool.clone(), stats.clone(), stop_rx));
        let got = collect_events(
            &c.url(),
            EventFilter::default(),
            Some(0),
            Duration::from_secs(30),
            |seen| seen.len() >= 601,
        )
        .await
        .unwrap();
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("client did not finish")
            .unwrap()
            .unwrap();
        got
    });
    let xids: Vec<&str> = got
        .iter()
        .filter_map(|e| xid_of(e).map(|x| x.message.as_str()))
        .collect();
    assert_eq!(xids.len(), 600, "events behind the refused one were lost");
    assert_eq!(xids[299], "before-299");
    assert_eq!(xids[300], "after-0");
    let gaps: Vec<&v1::Gap> = got
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::Gap(g)) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0].stage, GapStage::CollectorRefused as i32);
    assert_eq!(gaps[0].missed, 1);
    assert!(gaps[0].detail.contains("seq 301"), "{}", gaps[0].detail);
    assert!(gaps[0].detail.contains("no payload"), "{}", gaps[0].detail);
    assert_eq!(AgentStats::get(&stats.events_refused), 1);
    assert!(spool.lock().is_empty(), "everything acknowledged");
    let m = c.metrics().unwrap();
    assert_eq!(
        value_of_metric(
            &m,
            "gpulse_agent_reported_dropped_events_total{node=\"poison-node\",stage=\"collector_refused\"}"
        ),
        Some(1.0),
        "the set-aside event is counted where drops are"
    );
}
