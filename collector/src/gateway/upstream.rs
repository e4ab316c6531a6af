//! One upstream (a collector or another gateway) and the fan-out of one request to all of them:
//! each call bounded by the per-upstream deadline, the upstream's concurrency limit and its
//! circuit breaker; each answer folded into the merged one as it arrives (never collected whole);
//! every upstream named in the answer with how it did.
use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream::FuturesUnordered};
use gpulse_proto::{
    api::SharedTelemetry,
    v1::{UpstreamState, UpstreamStatus},
};
use tokio::sync::Semaphore;
use tonic::{Code, Status};

use super::{
    breaker::{Admit, Breaker, BreakerConfig},
    metrics::GatewayMetrics,
};

/// Limits applied to every call to an upstream.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// Per upstream and call: past it the upstream is reported `timeout` and left out.
    pub deadline: Duration,
    /// Calls in flight to one upstream; more wait (within the deadline).
    pub concurrency: usize,
    pub breaker: BreakerConfig,
    /// Merged Subscribe streams open at once (each holds a stream on every upstream it
    /// follows); more are refused with RESOURCE_EXHAUSTED, as a collector's `--max-subscribers`.
    pub max_subscribers: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(3),
            concurrency: 64,
            breaker: BreakerConfig::default(),
            max_subscribers: 1024,
        }
    }
}

pub struct Upstream {
    pub name: String,
    pub api: SharedTelemetry,
    breaker: Mutex<Breaker>,
    permits: Semaphore,
}

/// Why an upstream is missing from an answer.
#[derive(Clone, Debug)]
pub enum Failure {
    /// It answered with this error (or could not be reached).
    Error(Code, String),
    Timeout,
    CircuitOpen,
}

impl Failure {
    fn state(&self) -> UpstreamState {
        match self {
            Failure::Error(..) => UpstreamState::Error,
            Failure::Timeout => UpstreamState::Timeout,
            Failure::CircuitOpen => UpstreamState::CircuitOpen,
        }
    }

    fn reason(&self, deadline: Duration) -> String {
        match self {
            Failure::Error(code, msg) => format!("{code:?}: {msg}"),
            Failure::Timeout => format!("no answer within {} ms", deadline.as_millis()),
            Failure::CircuitOpen => "failing repeatedly; not asked until a probe succeeds".into(),
        }
    }
}

/// Resets a half-open probe that never finished (its request was cancelled), so the upstream
/// is not left refused for good.
struct ProbeGuard<'a> {
    up: &'a Upstream,
    done: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Ok(mut b) = self.up.breaker.lock()
        {
            b.probe_abandoned(Instant::now());
        }
    }
}

pub type CallFuture<T> = Pin<Box<dyn Future<Output = Result<T, Status>> + Send + 'static>>;

impl Upstream {
    pub fn new(name: String, api: SharedTelemetry, limits: &CallLimits) -> Self {
        Self {
            name,
            api,
            breaker: Mutex::new(Breaker::new(limits.breaker)),
            permits: Semaphore::new(limits.concurrency.max(1)),
        }
    }

    pub fn circuit_open(&self) -> bool {
        self.breaker.lock().is_ok_and(|b| b.is_open())
    }

    /// One call within the limits; the breaker learns from its outcome.
    pub async fn call<T>(&self, limits: &CallLimits, call: CallFuture<T>) -> Result<T, Failure> {
        let admit = match self.breaker.lock() {
            Ok(mut b) => b.admit(Instant::now()),
            Err(_) => Admit::Call,
        };
        if admit == Admit::Refuse {
            return Err(Failure::CircuitOpen);
        }
        let mut guard = ProbeGuard {
            up: self,
            done: admit != Admit::Probe,
        };
        let outcome = tokio::time::timeout(limits.deadline, async {
            let _permit = self.permits.acquire().await;
            call.await
        })
        .await;
        let result = match outcome {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(s)) => Err(Failure::Error(s.code(), s.message().to_string())),
            Err(_) => Err(Failure::Timeout),
        };
        guard.done = true;
        if let Ok(mut b) = self.breaker.lock() {
            match &result {
                Ok(_) => b.success(),
                // The caller's mistake (every upstream refuses it alike), not the upstream's.
                Err(Failure::Error(Code::InvalidArgument | Code::OutOfRange, _)) => b.success(),
                Err(_) => b.failure(Instant::now()),
            }
        }
        result
    }
}

/// Answers that carry the upstreams they came from (every Telemetry answer but Subscribe's).
pub trait Upstreamed {
    fn upstreams_mut(&mut self) -> &mut Vec<UpstreamStatus>;
    fn partial_mut(&mut self) -> &mut bool;
}

macro_rules! upstreamed {
    ($($t:ty),+) => {$(
        impl Upstreamed for $t {
            fn upstreams_mut(&mut self) -> &mut Vec<UpstreamStatus> {
                &mut self.upstreams
            }
            fn partial_mut(&mut self) -> &mut bool {
                &mut self.partial
            }
        }
    )+};
}

upstreamed!(
    gpulse_proto::v1::StatusResponse,
    gpulse_proto::v1::NodesResponse,
    gpulse_proto::v1::ListEventsResponse,
    gpulse_proto::v1::TrendResponse,
    gpulse_proto::v1::SummarizeResponse,
    gpulse_proto::v1::XidGroupsResponse,
    gpulse_proto::v1::ProcessesResponse,
    gpulse_proto::v1::GpuHealthResponse
);

/// How a fan-out went: every upstream's status (in configured order, then the inner ones of
/// gateway upstreams), and whether any answer is missing.
#[derive(Debug, Default)]
pub struct Outcome {
    pub upstreams: Vec<UpstreamStatus>,
    pub partial: bool,
    answered: usize,
    failures: Vec<(Code, String)>,
}

impl Outcome {
    /// The whole request's error when no upstream answered: the callers' mistake when every
    /// upstream refused the arguments, else unavailable with each upstream's reason.
    pub fn all_failed(&self) -> Option<Status> {
        if self.answered > 0 {
            return None;
        }
        if !self.failures.is_empty()
            && self.failures.len()
                == self
                    .upstreams
                    .iter()
                    .filter(|u| !u.name.contains('/'))
                    .count()
            && self
                .failures
                .iter()
                .all(|(c, _)| matches!(c, Code::InvalidArgument | Code::OutOfRange))
        {
            let (code, msg) = &self.failures[0];
            return Some(Status::new(*code, msg.clone()));
        }
        let why: Vec<String> = self
            .upstreams
            .iter()
            .map(|u| format!("{}: {}", u.name, u.reason))
            .collect();
        Some(Status::unavailable(format!(
            "no upstream answered ({})",
            why.join("; ")
        )))
    }

    /// Sets the answer's upstreams and partial flag.
    pub fn stamp<R: Upstreamed>(self, r: &mut R) {
        *r.upstreams_mut() = self.upstreams;
        *r.partial_mut() = self.partial;
    }
}

/// Sends one request to every upstream at once (each built by `call`) and folds each answer
/// into `acc` as it arrives. A gateway upstream's own upstreams are listed as `NAME/INNER`, and
/// its partial answer makes this one partial.
pub async fn fan_out<T, A>(
    ups: &[Arc<Upstream>],
    limits: &CallLimits,
    metrics: &GatewayMetrics,
    rpc: &'static str,
    call: impl Fn(usize, &Upstream) -> CallFuture<T>,
    acc: &mut A,
    mut fold: impl FnMut(&mut A, usize, T),
) -> Outcome
where
    T: Upstreamed,
{
    let mut pending: FuturesUnordered<_> = ups
        .iter()
        .enumerate()
        .map(|(i, up)| {
            let fut = call(i, up);
            async move {
                let t = Instant::now();
                let r = up.call(limits, fut).await;
                (i, r, t.elapsed())
            }
        })
        .collect();
    let mut statuses: Vec<Option<UpstreamStatus>> = vec![None; ups.len()];
    let mut inner: Vec<Vec<UpstreamStatus>> = vec![Vec::new(); ups.len()];
    let mut out = Outcome::default();
    while let Some((i, r, took)) = pending.next().await {
        let name = &ups[i].name;
        let elapsed_ms = took.as_millis().min(u128::from(u32::MAX)) as u32;
        metrics.observe(name, rpc, &r, took);
        let status = match r {
            Ok(mut answer) => {
                out.answered += 1;
                let nested = std::mem::take(answer.upstreams_mut());
                out.partial |= *answer.partial_mut();
                inner[i] = nested
                    .into_iter()
                    .map(|mut u| {
                        u.name = format!("{name}/{}", u.name);
                        u
                    })
                    .collect();
                fold(acc, i, answer);
                UpstreamStatus {
                    name: name.clone(),
                    state: UpstreamState::Ok as i32,
                    reason: String::new(),
                    elapsed_ms,
                }
            }
            Err(f) => {
                out.partial = true;
                if let Failure::Error(code, msg) = &f {
                    out.failures.push((*code, msg.clone()));
                } else {
                    out.failures
                        .push((Code::Unavailable, f.reason(limits.deadline)));
                }
                UpstreamStatus {
                    name: name.clone(),
                    state: f.state() as i32,
                    reason: f.reason(limits.deadline),
                    elapsed_ms,
                }
            }
        };
        statuses[i] = Some(status);
    }
    if out.partial {
        metrics.partial.with_label_values(&[rpc]).inc();
    }
    out.upstreams = statuses
        .into_iter()
        .zip(inner)
        .flat_map(|(s, inner)| s.into_iter().chain(inner))
        .collect();
    out
}
