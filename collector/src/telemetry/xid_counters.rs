//! XID and SXid counters that only go up, across restarts: their totals are kept here, written
//! into the history snapshot with the cursor they cover, and on start-up the snapshot's totals
//! plus the events replayed after it bring `/metrics` back to where it was, so Prometheus'
//! `increase()` never sees a false reset.
use std::collections::HashMap;

use gpulse_proto::{
    names::ShortName,
    v1::{self, event::Payload},
};

use super::Metrics;

/// Most label sets kept per family; beyond it new ones are counted as dropped (cardinality
/// bound: nodes x GPUs x codes x severities).
pub const MAX_SERIES: usize = 100_000;

pub const XID: u8 = 1;
pub const SXID: u8 = 2;

#[derive(Default)]
pub struct Counters {
    totals: HashMap<(u8, Vec<String>), u64>,
    /// Series per node (the node's share, `share::COUNTER_SERIES_PER_NODE`).
    per_node: HashMap<String, usize>,
    /// Increments refused by the cardinality bound.
    pub dropped: u64,
}

fn labels(ev: &v1::Event) -> Option<(u8, Vec<String>)> {
    let sev = v1::Severity::try_from(ev.severity)
        .unwrap_or_default()
        .short_name()
        .to_string();
    match &ev.payload {
        Some(Payload::Xid(x)) => Some((
            XID,
            vec![
                ev.node.clone(),
                x.gpu_uuid.clone(),
                x.pci.clone(),
                x.code.to_string(),
                sev,
            ],
        )),
        Some(Payload::Sxid(x)) => Some((
            SXID,
            vec![ev.node.clone(), x.pci.clone(), x.code.to_string(), sev],
        )),
        _ => None,
    }
}

impl Counters {
    /// Counts `ev` if it is an XID or SXid.
    pub fn count(&mut self, metrics: &Metrics, ev: &v1::Event) {
        let Some(key) = labels(ev) else { return };
        // A storm summary stands for `count` records: the counters stay exact.
        let n = match &ev.payload {
            Some(Payload::Xid(x)) => x.records(),
            _ => 1,
        };
        if n > 0 {
            self.add(metrics, key, n);
        }
    }

    fn add(&mut self, metrics: &Metrics, key: (u8, Vec<String>), n: u64) {
        let node = key.1.first().map_or("", String::as_str);
        if !self.totals.contains_key(&key) {
            if self.per_node.get(node).copied().unwrap_or(0)
                >= crate::share::COUNTER_SERIES_PER_NODE
            {
                self.dropped += n;
                metrics.counter_series_dropped.inc_by(n);
                metrics
                    .share
                    .refused(node, crate::share::table::XID_COUNTERS, n);
                return;
            }
            if self.totals.len() >= MAX_SERIES {
                self.dropped += n;
                metrics.counter_series_dropped.inc_by(n);
                return;
            }
            *self.per_node.entry(node.to_string()).or_default() += 1;
        }
        let refs: Vec<&str> = key.1.iter().map(String::as_str).collect();
        match key.0 {
            XID if refs.len() == 5 => metrics.xid_events.with_label_values(&refs).inc_by(n),
            SXID if refs.len() == 4 => metrics.sxid_events.with_label_values(&refs).inc_by(n),
            _ => return,
        }
        *self.totals.entry(key).or_default() += n;
    }

    /// Rows for the snapshot.
    pub fn rows(&self) -> Vec<(u8, Vec<String>, u64)> {
        let mut v: Vec<(u8, Vec<String>, u64)> = self
            .totals
            .iter()
            .map(|((f, l), n)| (*f, l.clone(), *n))
            .collect();
        v.sort();
        v
    }

    /// Brings counters back from a snapshot's rows.
    pub fn restore(&mut self, metrics: &Metrics, rows: Vec<(u8, Vec<String>, u64)>) {
        for (f, l, n) in rows {
            self.add(metrics, (f, l), n);
        }
    }

    pub fn len(&self) -> usize {
        self.totals.len()
    }

    pub fn is_empty(&self) -> bool {
        self.totals.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_restore_to_the_same_totals() {
        let m = Metrics::new().unwrap();
        let mut c = Counters::default();
        let ev = v1::Event {
            node: "n".into(),
            severity: v1::Severity::Fatal as i32,
            payload: Some(Payload::Xid(v1::Xid {
                code: 79,
                pci: "0000:3b:00.0".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        c.count(&m, &ev);
        c.count(&m, &ev);
        let rows = c.rows();
        assert_eq!(rows[0].2, 2);
        let m2 = Metrics::new().unwrap();
        let mut c2 = Counters::default();
        c2.restore(&m2, rows);
        assert_eq!(
            m2.xid_events
                .with_label_values(&["n", "", "0000:3b:00.0", "79", "fatal"])
                .get(),
            2
        );
    }

    #[test]
    fn a_storm_summary_counts_every_record_it_stands_for() {
        let m = Metrics::new().unwrap();
        let mut c = Counters::default();
        let ev = |storm: Option<v1::XidStorm>| v1::Event {
            node: "n".into(),
            severity: v1::Severity::Fatal as i32,
            payload: Some(Payload::Xid(v1::Xid {
                code: 95,
                pci: "0000:3b:00.0".into(),
                storm,
                ..Default::default()
            })),
            ..Default::default()
        };
        c.count(&m, &ev(None));
        c.count(
            &m,
            &ev(Some(v1::XidStorm {
                count: 812_343,
                ..Default::default()
            })),
        );
        // The event that only says the storm ended stands for no record.
        c.count(
            &m,
            &ev(Some(v1::XidStorm {
                count: 0,
                ended: true,
                ..Default::default()
            })),
        );
        assert_eq!(
            m.xid_events
                .with_label_values(&["n", "", "0000:3b:00.0", "95", "fatal"])
                .get(),
            812_344
        );
    }
}
