//! The `GpuHealth` answer: GPUs worst first, counts per state, bounded.
use gpulse_proto::v1::{self, HealthState};

use gpulse_proto::answer::{fit_health, health_cmp, health_limit};

use super::Engine;

/// Answers a GpuHealth request from the engine's records as they stand at `now` (unix ns).
pub fn answer(engine: &Engine, req: &v1::GpuHealthRequest, now: i128) -> v1::GpuHealthResponse {
    let limit = health_limit(req.limit);
    let mut out = v1::GpuHealthResponse::default();
    let mut listed: Vec<(&v1::GpuHealthRecord, HealthState)> = Vec::new();
    for (rec, state) in engine.records(now) {
        if !req.node.is_empty() && rec.node != req.node {
            continue;
        }
        match state {
            HealthState::Healthy => out.healthy += 1,
            HealthState::Degraded => out.degraded += 1,
            HealthState::Unhealthy => out.unhealthy += 1,
            HealthState::Unknown | HealthState::Unspecified => out.unknown += 1,
        }
        if state != HealthState::Healthy || req.include_healthy {
            listed.push((rec, state));
        }
    }
    if !req.node.is_empty() && out.healthy + out.degraded + out.unhealthy + out.unknown == 0 {
        out.hints.push(format!(
            "no GPU of node {:?} has been judged: the node is unknown here, or its agent sent no GPU samples or XIDs",
            req.node
        ));
    }
    listed.sort_by(|(a, sa), (b, sb)| health_cmp((a, *sa as i32), (b, *sb as i32)));
    out.truncated = listed.len() > limit;
    out.gpus = listed
        .into_iter()
        .take(limit)
        .map(|(rec, state)| {
            let mut r = rec.clone();
            r.state = state as i32;
            r
        })
        .collect();
    fit_health(&mut out);
    out
}
