//! The load generator against a real collector: every simulated node shows up with its GPUs,
//! and what it says was acknowledged is what the collector stored.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{sync::atomic::Ordering::Relaxed, time::Duration};

use gpulse_e2e::{
    loadgen::{self, Load},
    *,
};
use gpulse_proto::{
    client::ClientOptions,
    v1::{NodesRequest, StatusRequest, telemetry_client::TelemetryClient},
};

#[test]
fn simulated_nodes_are_stored_as_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[]).unwrap();
    let load = Load {
        nodes: 30,
        gpus: 8,
        period: Duration::from_millis(100),
        xids_per_node_hour: 36_000.0, // one period in ten
        processes_per_node_hour: 36_000.0,
        prefix: "lg".into(),
        nodes_per_channel: 8,
    };
    let rt = runtime();
    let counts = rt
        .block_on(loadgen::run(
            &c.url(),
            &ClientOptions::default(),
            &load,
            Duration::from_secs(2),
        ))
        .unwrap();
    assert_eq!(counts.errors.load(Relaxed), 0);
    let acked = counts.acked.load(Relaxed);
    assert_eq!(acked, counts.sent.load(Relaxed));
    assert!(acked >= 30 * 8 * 10, "{acked}");
    assert!(counts.xids.load(Relaxed) > 0);
    let url = c.url();
    let (status, nodes) = rt.block_on(async move {
        let mut t = TelemetryClient::connect(url).await.unwrap();
        let s = t.status(StatusRequest {}).await.unwrap().into_inner();
        let n = t.nodes(NodesRequest::default()).await.unwrap().into_inner();
        (s, n)
    });
    // Every acknowledged event stored (plus nothing else: no agent status, no gaps), and the
    // collector's verdicts on the GPUs the XIDs hit.
    assert_eq!(agent_events(&status), acked, "{status:?}");
    assert!(verdict_events(&status) > 0, "{status:?}");
    assert_eq!(nodes.nodes.len(), 30);
    assert!(
        nodes.nodes.iter().all(|n| n.gpus.len() == 8),
        "{:?}",
        nodes.nodes[0]
    );
}
