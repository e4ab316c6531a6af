//! The gateway's own metrics (it holds no events): calls per upstream by result, their latency,
//! open circuits, partial answers, merged subscribers, and the trust counters its listeners share
//! with the collector's.
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::upstream::Failure;
use crate::telemetry::MetricsError;

#[derive(Clone)]
pub struct GatewayMetrics {
    pub registry: Registry,
    /// Calls per upstream, RPC and result (ok, error, timeout, circuit_open).
    pub calls: IntCounterVec,
    pub call_seconds: HistogramVec,
    /// 1 while an upstream's circuit breaker is open or probing.
    pub circuit_open: IntGaugeVec,
    /// Answers missing at least one upstream, per RPC.
    pub partial: IntCounterVec,
    pub subscribers: IntGauge,
    /// Merged Subscribe calls refused at `--max-subscribers`.
    pub subscribers_refused: IntCounter,
    /// Merged Subscribe streams re-opened to an upstream after it dropped out.
    pub subscribe_reconnects: IntCounterVec,
    /// Events a merged Subscribe or ListEvents dropped as the second copy of one event held by
    /// two upstreams (an agent that failed over resent it).
    pub duplicates_dropped: IntCounter,
    pub auth_refused: IntCounterVec,
    pub reloads: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    pub conns: crate::conn::ConnMetrics,
}

impl GatewayMetrics {
    pub fn new(upstreams: &[String]) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let reg = |m: Box<dyn prometheus::core::Collector>| registry.register(m);
        let calls = IntCounterVec::new(
            Opts::new(
                "gpulse_gateway_upstream_calls_total",
                "Calls the gateway made to each upstream, by RPC and result.",
            ),
            &["upstream", "rpc", "result"],
        )?;
        reg(Box::new(calls.clone()))?;
        let call_seconds = HistogramVec::new(
            HistogramOpts::new(
                "gpulse_gateway_upstream_call_seconds",
                "Time each upstream took to answer (or to fail).",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["upstream", "rpc"],
        )?;
        reg(Box::new(call_seconds.clone()))?;
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "gpulse_gateway_upstream_circuit_open",
                "1 while the upstream's circuit breaker is open (it is not asked until a probe succeeds).",
            ),
            &["upstream"],
        )?;
        reg(Box::new(circuit_open.clone()))?;
        let partial = IntCounterVec::new(
            Opts::new(
                "gpulse_gateway_partial_answers_total",
                "Answers missing at least one upstream, by RPC.",
            ),
            &["rpc"],
        )?;
        reg(Box::new(partial.clone()))?;
        let subscribers = IntGauge::new(
            "gpulse_gateway_subscribers",
            "Open merged Subscribe streams.",
        )?;
        reg(Box::new(subscribers.clone()))?;
        let subscribers_refused = IntCounter::new(
            "gpulse_gateway_subscribers_refused_total",
            "Merged Subscribe calls refused with RESOURCE_EXHAUSTED because --max-subscribers streams were open.",
        )?;
        reg(Box::new(subscribers_refused.clone()))?;
        let subscribe_reconnects = IntCounterVec::new(
            Opts::new(
                "gpulse_gateway_subscribe_reconnects_total",
                "Merged Subscribe streams re-opened to an upstream after it dropped out.",
            ),
            &["upstream"],
        )?;
        reg(Box::new(subscribe_reconnects.clone()))?;
        let duplicates_dropped = IntCounter::new(
            "gpulse_gateway_duplicates_dropped_total",
            "Second copies of one event held by two upstreams, left out of merged answers.",
        )?;
        reg(Box::new(duplicates_dropped.clone()))?;
        let auth_refused = IntCounterVec::new(
            Opts::new(
                "gpulse_auth_refused_total",
                "Calls refused by authentication or authorization, by reason.",
            ),
            &["reason"],
        )?;
        reg(Box::new(auth_refused.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "gpulse_reloads_total",
                "Reloads of watched files (TLS certificate, token file), by file and result.",
            ),
            &["file", "result"],
        )?;
        reg(Box::new(reloads.clone()))?;
        let tls_handshake_failures = IntCounter::new(
            "gpulse_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out.",
        )?;
        reg(Box::new(tls_handshake_failures.clone()))?;
        let conns = crate::conn::ConnMetrics::new(&registry)?;
        for u in upstreams {
            circuit_open.with_label_values(&[u]).set(0);
            subscribe_reconnects.with_label_values(&[u]);
        }
        Ok(Self {
            registry,
            calls,
            call_seconds,
            circuit_open,
            partial,
            subscribers,
            subscribers_refused,
            subscribe_reconnects,
            duplicates_dropped,
            auth_refused,
            reloads,
            tls_handshake_failures,
            conns,
        })
    }

    pub fn observe<T>(
        &self,
        upstream: &str,
        rpc: &str,
        r: &Result<T, Failure>,
        took: std::time::Duration,
    ) {
        let result = match r {
            Ok(_) => "ok",
            Err(Failure::Error(..)) => "error",
            Err(Failure::Timeout) => "timeout",
            Err(Failure::CircuitOpen) => "circuit_open",
        };
        self.calls.with_label_values(&[upstream, rpc, result]).inc();
        if !matches!(r, Err(Failure::CircuitOpen)) {
            self.call_seconds
                .with_label_values(&[upstream, rpc])
                .observe(took.as_secs_f64());
        }
    }

    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}
