//! What `/metrics` shows besides the registry's own families, rendered at scrape time: per-node
//! and per-GPU gauges from the latest samples (so ingest pays nothing per sample for them), and
//! the store's gauges brought up to date from the stores themselves (the one way they are
//! exported).
use gpulse_proto::{
    metric::METRICS,
    names::ShortName,
    time as ptime,
    v1::{self, EventKind, event::Payload},
};

use super::Metrics;
use crate::store::{
    events::EventStore,
    series::{SeriesStore, Tier},
};

/// One node as its gauges see it.
pub struct NodeView<'a> {
    pub name: &'a str,
    /// An agent of the node has an open Ingest stream.
    pub connected: bool,
    pub last_seen: Option<&'a prost_types::Timestamp>,
    /// The latest sample event of each GPU.
    pub gpus: Vec<&'a v1::Event>,
}

fn seconds(t: &prost_types::Timestamp) -> f64 {
    (ptime::to_unix_nanos(t) / 1_000_000) as f64 / 1000.0
}

/// Node and GPU gauges in the text format, nodes in the order given.
pub fn node_gauges(nodes: &[NodeView<'_>]) -> String {
    let samples: Vec<(&str, &v1::Event, &v1::GpuSample)> = nodes
        .iter()
        .flat_map(|n| n.gpus.iter().map(move |e| (n.name, *e)))
        .filter_map(|(name, e)| match &e.payload {
            Some(Payload::GpuSample(g)) => Some((name, e, g)),
            _ => None,
        })
        .collect();
    let indexes: Vec<String> = samples
        .iter()
        .map(|(_, _, g)| g.index.to_string())
        .collect();
    let mut per_metric: Vec<Vec<GaugeSample<'_>>> = vec![Vec::new(); METRICS.len()];
    let mut sample_time = Vec::new();
    for ((name, e, g), index) in samples.iter().zip(&indexes) {
        let labels = vec![
            ("node", *name),
            ("gpu_uuid", g.uuid.as_str()),
            ("pci", g.pci.as_str()),
            ("index", index.as_str()),
            ("model", g.name.as_str()),
        ];
        for (i, def) in METRICS.iter().enumerate() {
            if let Some(v) = def.value(g) {
                per_metric[i].push((labels.clone(), v));
            }
        }
        if let Some(t) = e.time.or(e.received) {
            sample_time.push((labels, seconds(&t)));
        }
    }
    let connected: Vec<GaugeSample<'_>> = nodes
        .iter()
        .map(|n| (vec![("node", n.name)], f64::from(u8::from(n.connected))))
        .collect();
    let last_seen: Vec<GaugeSample<'_>> = nodes
        .iter()
        .filter_map(|n| Some((vec![("node", n.name)], seconds(n.last_seen?))))
        .collect();
    let mut out = String::new();
    gauge_family(
        &mut out,
        "gpulse_node_agent_connected",
        "1 while an agent of the node has an open Ingest stream.",
        &connected,
    );
    gauge_family(
        &mut out,
        "gpulse_node_last_seen_timestamp_seconds",
        "When the collector last received anything from the node.",
        &last_seen,
    );
    for (def, samples) in METRICS.iter().zip(&per_metric) {
        let help = format!("{} ({}), latest sample.", def.help, def.unit);
        gauge_family(&mut out, def.prom, &help, samples);
    }
    gauge_family(
        &mut out,
        "gpulse_gpu_last_sample_timestamp_seconds",
        "Time of the GPU's latest sample.",
        &sample_time,
    );
    out
}

/// `gpulse_gpu_health_state{node,gpu_uuid,pci,state}`: 1 for each GPU's state, 0 for the others
/// (every state present, so a change is a value change, not a vanished series).
pub fn health_gauges(out: &mut String, engine: &crate::verdict::Engine, now: i128) {
    use v1::HealthState;
    const STATES: [HealthState; 4] = [
        HealthState::Healthy,
        HealthState::Degraded,
        HealthState::Unhealthy,
        HealthState::Unknown,
    ];
    let mut samples: Vec<GaugeSample<'_>> = Vec::with_capacity(engine.len() * STATES.len());
    for (rec, state) in engine.records(now) {
        for s in STATES {
            let labels = vec![
                ("node", rec.node.as_str()),
                ("gpu_uuid", rec.gpu_uuid.as_str()),
                ("pci", rec.pci.as_str()),
                ("state", s.short_name()),
            ];
            samples.push((labels, f64::from(u8::from(s == state))));
        }
    }
    gauge_family(
        out,
        "gpulse_gpu_health_state",
        "1 for the GPU's health verdict (healthy, degraded, unhealthy, unknown), 0 for the others.",
        &samples,
    );
    // Reasons of one rule and action on one GPU (two XIDs, two processes) are one series.
    // Findings of rules on trial (--rules-shadow) go to a family of their own, so no alert on
    // the reasons fires for them.
    let mut reasons: std::collections::BTreeMap<[&str; 5], f64> = Default::default();
    let mut shadow: std::collections::BTreeMap<[&str; 5], f64> = Default::default();
    for (rec, _) in engine.records(now) {
        for r in &rec.reasons {
            let key = [
                rec.node.as_str(),
                rec.gpu_uuid.as_str(),
                rec.pci.as_str(),
                r.rule.as_str(),
                r.action.as_str(),
            ];
            let to = if r.shadow { &mut shadow } else { &mut reasons };
            *to.entry(key).or_default() += 1.0;
        }
    }
    fn reason_samples<'a>(
        m: std::collections::BTreeMap<[&'a str; 5], f64>,
    ) -> Vec<GaugeSample<'a>> {
        m.into_iter()
            .map(|([node, uuid, pci, rule, action], n)| {
                (
                    vec![
                        ("node", node),
                        ("gpu_uuid", uuid),
                        ("pci", pci),
                        ("rule", rule),
                        ("action", action),
                    ],
                    n,
                )
            })
            .collect()
    }
    gauge_family(
        out,
        "gpulse_gpu_health_reasons",
        "Reasons a GPU is not healthy, per rule and NVIDIA's recommended action.",
        &reason_samples(reasons),
    );
    gauge_family(
        out,
        "gpulse_gpu_health_shadow_findings",
        "Findings of rules on trial (--rules-shadow), per GPU and rule: recorded, never acted on.",
        &reason_samples(shadow),
    );
}

/// The health engine's drop counters, brought up to its totals (at scrape).
pub fn health_counters(m: &Metrics, engine: &crate::verdict::Engine) {
    raise(
        &m.health_dropped.with_label_values(&["gpus"]),
        engine.dropped_gpus,
    );
    raise(
        &m.health_dropped.with_label_values(&["reasons"]),
        engine.dropped_reasons(),
    );
}

/// Brings a counter up to a total kept elsewhere (counters only go up).
fn raise(c: &prometheus::IntCounter, total: u64) {
    if total > c.get() {
        c.inc_by(total - c.get());
    }
}

/// Sets the store's gauges (and the counters it keeps totals of) from the stores, at scrape.
pub fn store_gauges(
    m: &Metrics,
    events: &EventStore,
    series: &SeriesStore,
    wal_bytes: u64,
    agents_connected: usize,
) {
    for t in Tier::ALL {
        let st = series.tier_stats(t);
        let l = [t.name()];
        m.series_bytes.with_label_values(&l).set(st.bytes as i64);
        m.series_budget_bytes
            .with_label_values(&l)
            .set(st.budget as i64);
        raise(&m.series_expired.with_label_values(&l), st.expired);
        if let Some(o) = st.oldest_ms {
            m.series_oldest_seconds
                .with_label_values(&l)
                .set(o.div_euclid(1000));
        }
    }
    let (out_of_order, too_many) = series.rejected();
    for (reason, n) in [
        ("out_of_order", out_of_order),
        ("too_many_gpus", too_many),
        ("clock_stepped_back", series.restarted()),
    ] {
        raise(&m.series_rejected.with_label_values(&[reason]), n);
    }
    m.series_gpus.set(series.gpus().len() as i64);
    raise(&m.series_gpus_retired, series.retired_gpus());
    for kind in EventKind::ALL {
        let k = [kind.short_name()];
        m.ring_share_bytes
            .with_label_values(&k)
            .set(events.share(kind) as i64);
        if let Some(o) = events.oldest_ms(Some(kind)) {
            m.ring_oldest_seconds
                .with_label_values(&k)
                .set(o.div_euclid(1000));
        }
        m.ring_bytes
            .with_label_values(&k)
            .set(events.bytes_by_kind(kind) as i64);
        m.ring_events
            .with_label_values(&k)
            .set(events.events_by_kind(kind) as i64);
        raise(
            &m.ring_expired.with_label_values(&k),
            events.expired_by_kind(kind),
        );
    }
    m.ring_budget_bytes.set(events.budget() as i64);
    m.wal_bytes.set(wal_bytes as i64);
    m.agents_connected.set(agents_connected as i64);
}

/// Escapes a label value for the text exposition format.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One gauge sample: label pairs and value.
pub type GaugeSample<'a> = (Vec<(&'a str, &'a str)>, f64);

/// Writes one family of gauges (`HELP`, `TYPE`, then samples) in the text format.
pub fn gauge_family(out: &mut String, name: &str, help: &str, samples: &[GaugeSample<'_>]) {
    if samples.is_empty() {
        return;
    }
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
    for (labels, v) in samples {
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&format!("{k}=\"{}\"", esc(val)));
            }
            out.push('}');
        }
        out.push_str(&format!(" {v}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_escapes_and_skips_empty_families() {
        let mut s = String::new();
        gauge_family(&mut s, "x", "h", &[]);
        assert!(s.is_empty());
        gauge_family(
            &mut s,
            "gpulse_gpu_temperature_celsius",
            "t",
            &[(vec![("node", "a\"b"), ("gpu", "0")], 61.0)],
        );
        assert!(s.contains("gpulse_gpu_temperature_celsius{node=\"a\\\"b\",gpu=\"0\"} 61\n"));
        assert!(s.starts_with("# HELP gpulse_gpu_temperature_celsius t\n# TYPE"));
    }
}
