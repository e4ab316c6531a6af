//! Per-node shares of the fleet-wide tables: the one home of how much one node may hold.
//!
//! Each table keyed by what agents send (GPU verdicts, sample history, XID counter series, the
//! nodes' latest samples) has a global bound, and before this a node could fill it: after
//! 100,000 XIDs from one node, a new GPU on another node got XID 79 and no verdict, no
//! `gpulse_xid_events_total` series and no history, so the shipped alerts could not fire for it
//! (issue 27 #3). Now each node also has a share of every table; what a node sends past its
//! share is refused for that node only and counted by node and table
//! (`gpulse_node_share_refused_total`, alert `GpulseNodeOverShare`), so one node at its share
//! never displaces another node's data.
use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use prometheus::IntCounterVec;

/// GPUs one node may hold in the verdicts, the sample history and the Nodes table. A node has
/// at most a few dozen GPUs (MIG instances report under their parent GPU).
pub const GPUS_PER_NODE: usize = 256;
/// XID and SXid counter series one node may hold (GPUs x codes x severities).
pub const COUNTER_SERIES_PER_NODE: usize = 4096;
/// Nodes named in the refusal counter; others are counted under `node="_other"`, so the
/// counter's own cardinality is bounded too.
pub const LABELLED_NODES: usize = 1024;

/// The tables, the `table` label.
pub mod table {
    pub const VERDICTS: &str = "verdicts";
    pub const SAMPLES: &str = "samples";
    pub const XID_COUNTERS: &str = "xid_counters";
    pub const ALL: [&str; 3] = [VERDICTS, SAMPLES, XID_COUNTERS];
}

/// Counts refusals past a node's share (cheap to clone: every table holds one).
#[derive(Clone)]
pub struct ShareRefusals {
    counter: IntCounterVec,
    labelled: Arc<Mutex<HashSet<String>>>,
}

impl ShareRefusals {
    pub fn new(counter: IntCounterVec) -> Self {
        for t in table::ALL {
            counter.with_label_values(&["_other", t]);
        }
        Self {
            counter,
            labelled: Arc::default(),
        }
    }

    /// `n` of `node`'s entries refused by `table`'s share.
    pub fn refused(&self, node: &str, table: &'static str, n: u64) {
        let label = {
            let mut l = self.labelled.lock().unwrap_or_else(|p| p.into_inner());
            if l.contains(node) || (l.len() < LABELLED_NODES && l.insert(node.to_string())) {
                node
            } else {
                "_other"
            }
        };
        self.counter.with_label_values(&[label, table]).inc_by(n);
    }

    /// What was counted for `node` in `table` (tests).
    pub fn get(&self, node: &str, table: &str) -> u64 {
        self.counter.with_label_values(&[node, table]).get()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn counted_by_node_with_a_bounded_label_set() {
        let c = IntCounterVec::new(
            prometheus::Opts::new("gpulse_node_share_refused_total", "t"),
            &["node", "table"],
        )
        .unwrap();
        let r = ShareRefusals::new(c);
        r.refused("evil", table::VERDICTS, 3);
        r.refused("evil", table::VERDICTS, 2);
        assert_eq!(r.get("evil", table::VERDICTS), 5);
        for i in 0..LABELLED_NODES + 10 {
            r.refused(&format!("n{i}"), table::SAMPLES, 1);
        }
        assert_eq!(r.get("_other", table::SAMPLES), 11);
        assert_eq!(r.labelled.lock().unwrap().len(), LABELLED_NODES);
    }
}
