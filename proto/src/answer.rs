//! Answer rules that every server of the Telemetry API applies the same way: a collector
//! computing an answer from its store and a gateway merging its upstreams' answers. Ranking,
//! limits and byte bounds live here, in the contract, so the two cannot drift apart (and the
//! gateway needs nothing of the collector's store to apply them).
use std::collections::HashMap;

use crate::{
    bounds::{MAX_ANSWER_BYTES, fitting},
    v1::{self, HealthState, NodeCount, XidCount},
};

/// `Summarize.top_nodes`: at most this many nodes.
pub const TOP_NODES: usize = 10;
/// `Summarize.xids`: at most this many codes.
pub const MAX_XID_CODES: usize = 256;

/// `Summarize.top_nodes` from (node, (events, severe events)) counts: the nodes with the most
/// severe, then the most events (then by name), at most [`TOP_NODES`].
pub fn top_nodes(counts: impl IntoIterator<Item = (String, (u64, u64))>) -> Vec<NodeCount> {
    let mut v: Vec<NodeCount> = counts
        .into_iter()
        .map(|(node, (count, severe))| NodeCount {
            node,
            count,
            severe,
        })
        .collect();
    rank_nodes(&mut v);
    v
}

/// The nodes with the most severe, then the most events (then by name), at most [`TOP_NODES`].
pub fn rank_nodes(nodes: &mut Vec<NodeCount>) {
    nodes.sort_by(|a, b| {
        (b.severe, b.count)
            .cmp(&(a.severe, a.count))
            .then(a.node.cmp(&b.node))
    });
    nodes.truncate(TOP_NODES);
}

/// Codes by count (most first, then ascending code), at most `cap`.
pub fn ranked_codes(counts: HashMap<u32, u64>, cap: usize) -> Vec<XidCount> {
    let mut v: Vec<XidCount> = counts
        .into_iter()
        .map(|(code, count)| XidCount { code, count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then(a.code.cmp(&b.code)));
    v.truncate(cap);
    v
}

/// `ListEvents`: events per page when the request names no limit.
pub const EVENTS_DEFAULT_LIMIT: u32 = 100;
/// `ListEvents`: events per page at most; a larger limit is refused.
pub const EVENTS_MAX_LIMIT: u32 = 1000;

/// What `ListEventsRequest.limit` accepts, in words.
pub const EVENTS_LIMIT_ACCEPTED: &str = "1..=1000 (0 = 100)";

/// A `ListEventsRequest.limit` as a page size, or what is accepted.
pub fn events_limit(requested: u32) -> Result<u32, String> {
    match requested {
        0 => Ok(EVENTS_DEFAULT_LIMIT),
        n if n <= EVENTS_MAX_LIMIT => Ok(n),
        n => Err(format!(
            "limit {n} is out of range; {EVENTS_LIMIT_ACCEPTED}"
        )),
    }
}

/// `GpuHealth`: GPUs listed when the request names no limit.
pub const HEALTH_DEFAULT_LIMIT: usize = 1_000;
/// `GpuHealth`: GPUs listed at most, whatever the request says.
pub const HEALTH_MAX_LIMIT: usize = 10_000;

/// The number of GPUs a `GpuHealthRequest.limit` asks for.
pub fn health_limit(requested: u32) -> usize {
    match requested as usize {
        0 => HEALTH_DEFAULT_LIMIT,
        n => n.min(HEALTH_MAX_LIMIT),
    }
}

/// Worst first: unhealthy, degraded, unknown, healthy.
pub fn health_rank(state: i32) -> u8 {
    match HealthState::try_from(state).unwrap_or_default() {
        HealthState::Unhealthy => 3,
        HealthState::Degraded => 2,
        HealthState::Unknown => 1,
        HealthState::Healthy | HealthState::Unspecified => 0,
    }
}

/// Answer order of two verdicts, each with the state it is listed in (a stale GPU is listed
/// unknown whatever its record says): worst first, then cluster, node and PCI address.
pub fn health_cmp(
    (a, a_state): (&v1::GpuHealthRecord, i32),
    (b, b_state): (&v1::GpuHealthRecord, i32),
) -> std::cmp::Ordering {
    health_rank(b_state)
        .cmp(&health_rank(a_state))
        .then_with(|| (&a.cluster, &a.node, &a.pci).cmp(&(&b.cluster, &b.node, &b.pci)))
}

/// Verdicts in answer order ([`health_cmp`] with each record's own state).
pub fn sort_health(records: &mut [v1::GpuHealthRecord]) {
    records.sort_by(|a, b| health_cmp((a, a.state), (b, b.state)));
}

/// Lists only the worst GPUs that fit in an answer's byte budget ([`MAX_ANSWER_BYTES`]),
/// saying so: a fleet of GPUs with long evidence must not make the answer fail to encode.
pub fn fit_health(out: &mut v1::GpuHealthResponse) {
    let fit = fitting(&out.gpus, MAX_ANSWER_BYTES);
    if fit < out.gpus.len() {
        let left = out.gpus.len() - fit;
        out.gpus.truncate(fit);
        out.truncated = true;
        out.hints.push(format!(
            "{left} more GPUs left out to keep the answer within {} MiB; ask per node or without include_healthy",
            MAX_ANSWER_BYTES >> 20
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn nodes_rank_by_severity_then_count_then_name_and_are_capped() {
        let mut v: Vec<NodeCount> = (0..15)
            .map(|i| NodeCount {
                node: format!("n{i:02}"),
                count: i % 3,
                severe: u64::from(i == 7),
            })
            .collect();
        rank_nodes(&mut v);
        assert_eq!(v.len(), TOP_NODES);
        assert_eq!(v[0].node, "n07", "the only severe one first");
        assert_eq!((v[1].node.as_str(), v[1].count), ("n02", 2));
    }

    #[test]
    fn codes_rank_by_count_then_code() {
        let v = ranked_codes(HashMap::from([(79, 2), (13, 5), (48, 2)]), 2);
        let got: Vec<(u32, u64)> = v.iter().map(|x| (x.code, x.count)).collect();
        assert_eq!(got, vec![(13, 5), (48, 2)]);
    }

    #[test]
    fn event_limits() {
        assert_eq!(events_limit(0), Ok(EVENTS_DEFAULT_LIMIT));
        assert_eq!(events_limit(EVENTS_MAX_LIMIT), Ok(EVENTS_MAX_LIMIT));
        assert!(
            events_limit(EVENTS_MAX_LIMIT + 1)
                .unwrap_err()
                .contains(EVENTS_LIMIT_ACCEPTED)
        );
        assert_eq!(
            EVENTS_LIMIT_ACCEPTED,
            format!("1..={EVENTS_MAX_LIMIT} (0 = {EVENTS_DEFAULT_LIMIT})"),
            "the words say what the numbers are"
        );
    }

    #[test]
    fn health_limits_and_order() {
        assert_eq!(health_limit(0), HEALTH_DEFAULT_LIMIT);
        assert_eq!(health_limit(5), 5);
        assert_eq!(health_limit(u32::MAX), HEALTH_MAX_LIMIT);
        let rec = |node: &str, state: HealthState| v1::GpuHealthRecord {
            node: node.into(),
            state: state as i32,
            ..Default::default()
        };
        let mut v = vec![
            rec("a", HealthState::Healthy),
            rec("b", HealthState::Unknown),
            rec("c", HealthState::Unhealthy),
            rec("a", HealthState::Degraded),
        ];
        sort_health(&mut v);
        let order: Vec<(&str, i32)> = v.iter().map(|r| (r.node.as_str(), r.state)).collect();
        assert_eq!(
            order,
            vec![
                ("c", HealthState::Unhealthy as i32),
                ("a", HealthState::Degraded as i32),
                ("b", HealthState::Unknown as i32),
                ("a", HealthState::Healthy as i32),
            ]
        );
    }
}
