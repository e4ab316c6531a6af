//! The gateway: the Telemetry API answered from several upstreams (the shards of one cluster,
//! or other clusters' collectors and gateways), so that the CLI, MCP and dashboards ask one
//! place. Every answer names each upstream with how it did and says `partial` when any is
//! missing; it fails as a whole only when none answered. Each upstream call is bounded by a
//! deadline, a concurrency limit and a circuit breaker (`upstream.rs`); answers are folded as
//! they arrive (`merge.rs`, `trend.rs`, `events.rs`); Subscribe is merged live
//! (`subscribe.rs`). `serve.rs` puts it on the network like a collector.
pub mod breaker;
pub mod events;
pub mod merge;
pub mod metrics;
pub mod serve;
pub mod subscribe;
pub mod trend;
pub mod upstream;

use std::sync::Arc;

use gpulse_proto::{
    api::{SELECT_UPSTREAMS, SharedTelemetry, SubscribeStream},
    v1::{
        GpuHealthRequest, GpuHealthResponse, ListEventsRequest, ListEventsResponse, NodesRequest,
        NodesResponse, ProcessesRequest, ProcessesResponse, StatusRequest, StatusResponse,
        SubscribeRequest, SummarizeRequest, SummarizeResponse, TrendRequest, TrendResponse,
        XidGroupsRequest, XidGroupsResponse, telemetry_server::Telemetry,
    },
};
use tonic::{Request, Response, Status};

pub use metrics::GatewayMetrics;
use upstream::{CallFuture, fan_out};
pub use upstream::{CallLimits, Upstream};

use crate::shutdown::Shutdown;

#[derive(Clone)]
pub struct Gateway {
    ups: Arc<Vec<Arc<Upstream>>>,
    limits: CallLimits,
    metrics: GatewayMetrics,
    /// Named on nodes whose collector does not name its cluster (`--cluster`).
    cluster: String,
    stop: Shutdown,
    /// One per open merged Subscribe stream (`CallLimits::max_subscribers`).
    subscribe_slots: Arc<tokio::sync::Semaphore>,
}

/// Most process rows one request reads from each upstream (offset + limit).
const MAX_PROCESS_ROWS: u32 = 1000;
/// Groups each upstream is asked for, whatever `top` is, so merged counts stay whole.
const XID_GROUPS_ASKED: u32 = 100;

impl Gateway {
    pub fn new(
        upstreams: Vec<(String, SharedTelemetry)>,
        limits: CallLimits,
        metrics: GatewayMetrics,
        cluster: String,
        stop: Shutdown,
    ) -> Self {
        let ups = upstreams
            .into_iter()
            .map(|(name, api)| Arc::new(Upstream::new(name, api, &limits)))
            .collect();
        Self {
            ups: Arc::new(ups),
            subscribe_slots: Arc::new(tokio::sync::Semaphore::new(limits.max_subscribers.max(1))),
            limits,
            metrics,
            cluster,
            stop,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.ups
    }

    pub fn metrics(&self) -> &GatewayMetrics {
        &self.metrics
    }

    /// Circuit breaker gauges as of now (read at scrape time).
    pub fn refresh_gauges(&self) {
        for u in self.ups.iter() {
            self.metrics
                .circuit_open
                .with_label_values(&[&u.name])
                .set(i64::from(u.circuit_open()));
        }
    }

    /// The upstreams a request selects (`SELECT_UPSTREAMS`; all without it), each with the
    /// selection it passes on (empty: all of its own).
    pub fn route(&self, md: &tonic::metadata::MetadataMap) -> Result<Route, Status> {
        let all = || self.ups.iter().map(|u| (u.clone(), Vec::new())).collect();
        let Some(v) = md.get(SELECT_UPSTREAMS) else {
            return Ok(all());
        };
        let v = v
            .to_str()
            .map_err(|_| Status::invalid_argument(format!("{SELECT_UPSTREAMS} is not text")))?;
        let mut items: Vec<String> = v
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if items.is_empty() {
            return Ok(all());
        }
        let mut picks: Vec<Pick> = vec![Pick::No; self.ups.len()];
        while let Some(item) = items.pop() {
            let (head, rest) = item.split_once('/').unwrap_or((item.as_str(), ""));
            if !self.cluster.is_empty() && head == self.cluster {
                // This gateway's own cluster: all of it, or a part of it named below.
                match rest {
                    "" => picks.iter_mut().for_each(|p| *p = Pick::Whole),
                    r => items.push(r.to_string()),
                }
                continue;
            }
            let Some(i) = self.ups.iter().position(|u| u.name == head) else {
                let known: Vec<&str> = self.ups.iter().map(|u| u.name.as_str()).collect();
                return Err(Status::invalid_argument(format!(
                    "unknown cluster or upstream {head:?}; this gateway{} has {}",
                    if self.cluster.is_empty() {
                        String::new()
                    } else {
                        format!(" (cluster {})", self.cluster)
                    },
                    known.join(", ")
                )));
            };
            picks[i] = match (std::mem::replace(&mut picks[i], Pick::No), rest) {
                (_, "") | (Pick::Whole, _) => Pick::Whole,
                (Pick::Inner(mut v), r) => {
                    v.push(r.to_string());
                    Pick::Inner(v)
                }
                (Pick::No, r) => Pick::Inner(vec![r.to_string()]),
            };
        }
        Ok(self
            .ups
            .iter()
            .zip(picks)
            .filter_map(|(u, p)| match p {
                Pick::No => None,
                Pick::Whole => Some((u.clone(), Vec::new())),
                Pick::Inner(v) => Some((u.clone(), v)),
            })
            .collect())
    }

    /// One unary RPC to every selected upstream, each with a clone of `req`.
    async fn all<Req, Resp, A>(
        &self,
        rpc: &'static str,
        route: Route,
        req: Req,
        call: fn(SharedTelemetry, Request<Req>) -> CallFuture<Resp>,
        acc: &mut A,
        fold: impl FnMut(&mut A, &str, Resp),
    ) -> Result<upstream::Outcome, Status>
    where
        Req: Clone + Send + 'static,
        Resp: upstream::Upstreamed,
    {
        let mut fold = fold;
        let ups: Vec<Arc<Upstream>> = route.iter().map(|(u, _)| u.clone()).collect();
        let out = fan_out(
            &ups,
            &self.limits,
            &self.metrics,
            rpc,
            |i, u| call(u.api.clone(), selecting(req.clone(), &route[i].1)),
            acc,
            |acc, i, r| fold(acc, &ups[i].name, r),
        )
        .await;
        match out.all_failed() {
            Some(s) => Err(s),
            None => Ok(out),
        }
    }
}

/// The upstreams a request goes to, each with what it passes on.
pub type Route = Vec<(Arc<Upstream>, Vec<String>)>;

#[derive(Clone, Debug)]
enum Pick {
    No,
    Whole,
    Inner(Vec<String>),
}

/// `msg` as a request to an upstream, carrying the part of the selection meant for it.
fn selecting<T>(msg: T, inner: &[String]) -> Request<T> {
    let mut r = Request::new(msg);
    if !inner.is_empty()
        && let Ok(v) = inner.join(",").parse()
    {
        r.metadata_mut().insert(SELECT_UPSTREAMS, v);
    }
    r
}

macro_rules! call {
    ($method:ident) => {
        |api, req| Box::pin(async move { api.$method(req).await.map(Response::into_inner) })
    };
}

#[tonic::async_trait]
impl Telemetry for Gateway {
    type SubscribeStream = SubscribeStream;

    async fn subscribe(
        &self,
        req: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let route = self.route(req.metadata())?;
        // Each merged stream holds one stream on every upstream it follows: bounded, so one
        // reader cannot take every upstream's subscriber slots.
        let Ok(slot) = self.subscribe_slots.clone().try_acquire_owned() else {
            self.metrics.subscribers_refused.inc();
            return Err(Status::resource_exhausted(format!(
                "{} merged Subscribe streams are open (--max-subscribers); try again later",
                self.limits.max_subscribers
            )));
        };
        let s = subscribe::subscribe(
            route,
            req.into_inner(),
            self.metrics.clone(),
            self.stop.clone(),
        )
        .await?;
        // The slot goes back when the stream is dropped.
        let s = futures::StreamExt::map(s, move |m| {
            let _held = &slot;
            m
        });
        Ok(Response::new(Box::pin(s)))
    }

    async fn status(
        &self,
        req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let mut acc = StatusResponse::default();
        let route = self.route(req.metadata())?;
        let out = self
            .all(
                "Status",
                route,
                req.into_inner(),
                call!(status),
                &mut acc,
                |a, _, r| merge::status(a, r),
            )
            .await?;
        acc.version = env!("CARGO_PKG_VERSION").to_string();
        acc.cluster.clone_from(&self.cluster);
        out.stamp(&mut acc);
        Ok(Response::new(acc))
    }

    async fn nodes(&self, req: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        let route = self.route(req.metadata())?;
        let mut req = req.into_inner();
        req.window = merge::pin(req.window)?;
        let mut acc = merge::Nodes::default();
        let cluster = self.cluster.clone();
        let out = self
            .all("Nodes", route, req, call!(nodes), &mut acc, |a, _, r| {
                a.add(r, &cluster)
            })
            .await?;
        let mut r = acc.finish();
        out.stamp(&mut r);
        Ok(Response::new(r))
    }

    async fn list_events(
        &self,
        req: Request<ListEventsRequest>,
    ) -> Result<Response<ListEventsResponse>, Status> {
        let route = self.route(req.metadata())?;
        let names: Vec<String> = route.iter().map(|(u, _)| u.name.clone()).collect();
        let plan = events::Plan::new(req.into_inner(), &names)?;
        let up_req = plan.upstream_req.clone();
        let mut acc = events::Merge::new(plan);
        let out = self
            .all(
                "ListEvents",
                route,
                up_req,
                call!(list_events),
                &mut acc,
                |a, n, r| a.add(n, r),
            )
            .await?;
        self.metrics.duplicates_dropped.inc_by(acc.duplicates);
        let mut r = acc.finish();
        out.stamp(&mut r);
        Ok(Response::new(r))
    }

    async fn trend(&self, req: Request<TrendRequest>) -> Result<Response<TrendResponse>, Status> {
        let route = self.route(req.metadata())?;
        let mut req = req.into_inner();
        req.window = Some(merge::pin_or_now(req.window)?);
        let mut acc = trend::Trend::new(&req);
        let out = self
            .all("Trend", route, req, call!(trend), &mut acc, |a, n, r| {
                a.add(n, r)
            })
            .await?;
        let mut r = acc.finish();
        out.stamp(&mut r);
        Ok(Response::new(r))
    }

    async fn summarize(
        &self,
        req: Request<SummarizeRequest>,
    ) -> Result<Response<SummarizeResponse>, Status> {
        let route = self.route(req.metadata())?;
        let mut req = req.into_inner();
        req.window = Some(merge::pin_or_now(req.window)?);
        let mut acc = merge::Summary::default();
        let out = self
            .all(
                "Summarize",
                route,
                req,
                call!(summarize),
                &mut acc,
                |a, n, r| a.add(n, r),
            )
            .await?;
        let mut r = acc.finish();
        out.stamp(&mut r);
        Ok(Response::new(r))
    }

    async fn xid_groups(
        &self,
        req: Request<XidGroupsRequest>,
    ) -> Result<Response<XidGroupsResponse>, Status> {
        let route = self.route(req.metadata())?;
        let mut req = req.into_inner();
        let top = match req.top {
            0 => 20,
            n if n <= 100 => n as usize,
            n => {
                return Err(Status::invalid_argument(format!(
                    "top {n} is out of range; 1..=100 (0 = 20)"
                )));
            }
        };
        req.window = Some(merge::pin_or_now(req.window)?);
        req.top = XID_GROUPS_ASKED;
        let mut acc = merge::XidGroups::default();
        let out = self
            .all(
                "XidGroups",
                route,
                req,
                call!(xid_groups),
                &mut acc,
                |a, n, r| a.add(n, r),
            )
            .await?;
        let mut r = acc.finish(top);
        out.stamp(&mut r);
        Ok(Response::new(r))
    }

    async fn processes(
        &self,
        req: Request<ProcessesRequest>,
    ) -> Result<Response<ProcessesResponse>, Status> {
        let route = self.route(req.metadata())?;
        let mut req = req.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n <= 1000 => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit {n} is out of range; 1..=1000 (0 = 100)"
                )));
            }
        };
        let offset = req.offset;
        let rows = offset.saturating_add(limit).min(MAX_PROCESS_ROWS);
        req.window = Some(merge::pin_or_now(req.window)?);
        req.offset = 0;
        req.limit = rows;
        let mut acc = merge::Processes::new(rows as usize);
        let out = self
            .all(
                "Processes",
                route,
                req,
                call!(processes),
                &mut acc,
                |a, n, r| a.add(n, r),
            )
            .await?;
        let mut r = acc.finish(offset as usize, limit as usize);
        if offset.saturating_add(limit) > MAX_PROCESS_ROWS {
            r.hints.push(format!(
                "through a gateway offset + limit reaches at most {MAX_PROCESS_ROWS} rows; narrow the window or the nodes"
            ));
            r.truncated = true;
        }
        out.stamp(&mut r);
        Ok(Response::new(r))
    }

    async fn gpu_health(
        &self,
        req: Request<GpuHealthRequest>,
    ) -> Result<Response<GpuHealthResponse>, Status> {
        let route = self.route(req.metadata())?;
        let req = req.into_inner();
        let limit = gpulse_proto::answer::health_limit(req.limit);
        let mut acc = merge::Health::new(limit, &self.cluster);
        let out = self
            .all(
                "GpuHealth",
                route,
                req,
                call!(gpu_health),
                &mut acc,
                |a, n, r| a.add(n, r),
            )
            .await?;
        let mut r = acc.finish();
        out.stamp(&mut r);
        Ok(Response::new(r))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    /// The modules of this crate the gateway may use: the edge (who calls, how it listens and
    /// stops, its connections, its metrics registry's error). Answer rules come from the
    /// contract (`gpulse_proto::answer`, `filter`); the store, queries, verdicts and state task
    /// are a collector's, which the gateway never reaches.
    const EDGE: &[&str] = &[
        "auth",
        "conn",
        "http",
        "listen",
        "shutdown",
        "tls",
        "telemetry::MetricsError",
    ];

    /// `crate::` paths named in `src`: `crate::a::b` and each item of `crate::{a::b, c}`.
    fn crate_paths(src: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (i, _) in src.match_indices("crate::") {
            let rest = &src[i + "crate::".len()..];
            if let Some(list) = rest.strip_prefix('{') {
                // Top-level items of the brace list.
                let (mut depth, mut item) = (0, String::new());
                for c in list.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            out.push(std::mem::take(&mut item).trim().to_string());
                            continue;
                        }
                        _ => {}
                    }
                    item.push(c);
                }
                if !item.trim().is_empty() {
                    out.push(item.trim().to_string());
                }
            } else {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                    .unwrap_or(rest.len());
                out.push(rest[..end].trim_end_matches(':').to_string());
            }
        }
        out
    }

    #[test]
    fn the_gateway_uses_only_the_contract_and_the_edge() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gateway");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let path = e.unwrap().path();
            let src = std::fs::read_to_string(&path).unwrap();
            // Product code only: tests may build whatever they check against.
            let product = src.split("#[cfg(test)]").next().unwrap_or_default();
            for p in crate_paths(product) {
                seen += 1;
                assert!(
                    EDGE.iter()
                        .any(|edge| p == *edge || p.starts_with(&format!("{edge}::"))),
                    "{} uses crate::{p}: gateway code may use the contract and the edge only",
                    path.display()
                );
            }
        }
        assert!(seen > 5, "found {seen} crate paths: the scan is broken");
        assert_eq!(
            crate_paths("use crate::{a::b, c::{d, e}};\nx = crate::f::g(1);"),
            vec!["a::b", "c::{d, e}", "f::g"]
        );
    }
}
