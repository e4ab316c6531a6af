//! The `GpuHealth` answer: GPUs worst first, counts per state, bounded.
use gpulse_proto::v1::{self, HealthState};

use super::{Engine, gpu::rank};

/// GPUs listed when the request names no limit.
pub const DEFAULT_LIMIT: usize = 1_000;
/// GPUs listed at most, whatever the request says.
pub const MAX_LIMIT: usize = 10_000;

/// Answers a GpuHealth request from the engine's records as they stand at `now` (unix ns).
pub fn answer(engine: &Engine, req: &v1::GpuHealthRequest, now: i128) -> v1::GpuHealthResponse {
    let limit = match req.limit as usize {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    };
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
    listed.sort_by(|(a, sa), (b, sb)| {
        rank(*sb as i32)
            .cmp(&rank(*sa as i32))
            .then_with(|| a.node.cmp(&b.node))
            .then_with(|| a.pci.cmp(&b.pci))
    });
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
    fit_answer(&mut out);
    out
}

/// Lists only the worst GPUs that fit in an answer's byte budget (`bounds::MAX_ANSWER_BYTES`),
/// saying so: a fleet of GPUs with long evidence must not make the answer fail to encode.
pub fn fit_answer(out: &mut v1::GpuHealthResponse) {
    use gpulse_proto::bounds::{MAX_ANSWER_BYTES, fitting};
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
