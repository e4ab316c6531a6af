//! Windowed queries over the store: `ListEvents` (filtered, paged by opaque tokens that pin the
//! resolved window) and `Trend` (a metric per GPU, node or fleet, from raw samples or the rollup
//! tier that fits the requested resolution). Pure functions of the store, so the state task runs
//! them without I/O and tests and benchmarks call them directly.
pub mod aggregate;

use std::collections::BTreeMap;

use gpulse_proto::{
    time as ptime,
    v1::{
        self, Aggregation, EventKind, GroupBy, ListEventsRequest, ListEventsResponse, Order,
        ResolvedWindow, SeriesStats, Tier as WireTier, TrendPoint, TrendRequest, TrendResponse,
        TrendSeries, event::Payload,
    },
    window::{self, Window, WindowError},
};
use prost::Message;
use thiserror::Error;

use gpulse_proto::metric::{self, METRICS};

use crate::{
    filter::{Filter, FilterError},
    store::{
        codec::CodecError,
        events::{self, EventStore},
        series::{Agg, GpuSeries, SeriesStore, Tier},
    },
};

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
pub const DEFAULT_POINTS: u32 = 120;
pub const MAX_POINTS: u32 = 1000;
pub const DEFAULT_SERIES: u32 = 20;
pub const MAX_SERIES: u32 = 200;
const HOUR_NS: i128 = 3_600_000_000_000;

#[derive(Debug, Error)]
pub enum QueryError {
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("{field} {value} is out of range; {allowed}")]
    Range {
        field: &'static str,
        value: u64,
        allowed: &'static str,
    },
    #[error(
        "page_token is not one this collector issued for this query ({0}); start again without it"
    )]
    Token(&'static str),
    #[error("unknown metric {0:?}; known metrics: {1}")]
    Metric(String, String),
    #[error("stored samples could not be decoded: {0}")]
    Decode(#[from] CodecError),
}

fn to_ts(ns: i128) -> prost_types::Timestamp {
    ptime::from_unix_nanos(ns)
}

fn ms_ts(ms: i64) -> prost_types::Timestamp {
    ptime::from_unix_millis(ms)
}

fn resolved(w: &Window, oldest_ms: Option<i64>) -> ResolvedWindow {
    ResolvedWindow {
        start: Some(to_ts(w.start_ns)),
        end: Some(to_ts(w.end_ns)),
        defaulted: w.defaulted,
        oldest_data: oldest_ms.map(ms_ts),
        partial: oldest_ms.is_none_or(|o| o > w.start_ms()),
    }
}

fn rfc(ms: i64) -> String {
    ptime::rfc3339(&ms_ts(ms))
}

/// FNV-1a over bytes: a stable fingerprint of the query a token belongs to.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What a page token pins: where the last page stopped, the resolved window (so a relative
/// window does not slide between pages), the query's fingerprint, and the store's expiry count
/// when paging began.
#[derive(Debug, PartialEq, Eq)]
struct PageToken {
    key: u64,
    /// Newest cursor when paging began: later arrivals are not part of this listing.
    ceiling: u64,
    start_ns: i64,
    end_ns: i64,
    query: u64,
    expired_at_start: u64,
}

impl PageToken {
    fn encode(&self) -> String {
        let mut b = Vec::with_capacity(48);
        for v in [
            self.key,
            self.ceiling,
            self.start_ns as u64,
            self.end_ns as u64,
            self.query,
            self.expired_at_start,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        let check = fnv(&b) as u32;
        b.extend_from_slice(&check.to_be_bytes());
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        format!("e1.{hex}")
    }

    fn decode(s: &str) -> Result<Self, QueryError> {
        let hex = s
            .strip_prefix("e1.")
            .ok_or(QueryError::Token("unknown format"))?;
        if hex.len() != 104 || !hex.is_ascii() {
            return Err(QueryError::Token("wrong length"));
        }
        let b: Vec<u8> = (0..52)
            .map(|i| u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| QueryError::Token("not hex"))?;
        let (body, check) = b.split_at(48);
        if (fnv(body) as u32).to_be_bytes() != check {
            return Err(QueryError::Token("checksum"));
        }
        let w = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[i * 8..i * 8 + 8]);
            u64::from_be_bytes(a)
        };
        Ok(Self {
            key: w(0),
            ceiling: w(1),
            start_ns: w(2) as i64,
            end_ns: w(3) as i64,
            query: w(4),
            expired_at_start: w(5),
        })
    }
}

/// `ListEvents`: events whose time lies in the window, newest first unless asked otherwise.
pub fn list_events(
    store: &EventStore,
    req: ListEventsRequest,
    now_ns: i128,
) -> Result<ListEventsResponse, QueryError> {
    let limit = match req.limit {
        0 => DEFAULT_LIMIT,
        n if n <= MAX_LIMIT => n,
        n => {
            return Err(QueryError::Range {
                field: "limit",
                value: u64::from(n),
                allowed: "1..=1000 (0 = 100)",
            });
        }
    };
    let order = match Order::try_from(req.order) {
        Ok(Order::OldestFirst) => events::Order::OldestFirst,
        Ok(_) => events::Order::NewestFirst,
        Err(_) => {
            return Err(QueryError::Range {
                field: "order",
                value: req.order as u64,
                allowed: "0 (newest first), 1 (newest first), 2 (oldest first)",
            });
        }
    };
    let fingerprint = {
        let mut b = req.filter.clone().unwrap_or_default().encode_to_vec();
        b.push(matches!(order, events::Order::OldestFirst) as u8);
        fnv(&b)
    };
    let filter = Filter::from_wire(req.filter)?;
    let tw = req.window.unwrap_or_default();
    let expired_now = store.expired_total();
    let (w, key, ceiling, expired_at_start) = if req.page_token.is_empty() {
        let w = window::resolve(&tw.since, &tw.until, now_ns, HOUR_NS)?;
        (w, None, store.next_cursor() - 1, expired_now)
    } else {
        let t = PageToken::decode(&req.page_token)?;
        if t.query != fingerprint {
            return Err(QueryError::Token(
                "the filter or order differs from the first page",
            ));
        }
        let w = Window {
            start_ns: i128::from(t.start_ns),
            end_ns: i128::from(t.end_ns),
            defaulted: tw.since.is_empty(),
        };
        (w, Some(t.key), t.ceiling, t.expired_at_start)
    };
    let lanes = filter.lanes();
    let page = store.window(
        w.start_ms(),
        w.end_ms(),
        &lanes,
        order,
        key,
        limit as usize,
        |e| e.cursor() <= ceiling && filter.matches(e),
    );
    let (window, mut hints) = window_notes(store, &w, &lanes, page.total_matched);
    let expired_while_paging = expired_now.saturating_sub(expired_at_start);
    if expired_while_paging > 0 {
        hints.push(format!(
            "{expired_while_paging} events (any kind) expired from the store since paging began; \
             pages skip nothing still retained"
        ));
    }
    let next_page_token = match (page.more, page.events.last()) {
        (true, Some(last)) => PageToken {
            key: last.cursor,
            ceiling,
            start_ns: w.start_ns as i64,
            end_ns: w.end_ns as i64,
            query: fingerprint,
            expired_at_start,
        }
        .encode(),
        _ => String::new(),
    };
    Ok(ListEventsResponse {
        window: Some(window),
        events: page.events,
        next_page_token,
        total_matched: page.total_matched,
        expired_while_paging,
        hints,
    })
}

/// The resolved window of an event query over `lanes` (all when empty) and what to tell the
/// caller about it: the window reaching past the oldest retained event, nothing matching.
pub(crate) fn window_notes(
    store: &EventStore,
    w: &Window,
    lanes: &[EventKind],
    total_matched: u64,
) -> (ResolvedWindow, Vec<String>) {
    let oldest = if lanes.is_empty() {
        store.oldest_ms(None)
    } else {
        lanes.iter().filter_map(|k| store.oldest_ms(Some(*k))).min()
    };
    let window = resolved(w, oldest);
    let mut hints = Vec::new();
    if window.partial {
        hints.push(match oldest {
            Some(o) => format!(
                "the window starts before the oldest retained event of these kinds ({})",
                rfc(o)
            ),
            None => "the collector holds no events of these kinds".to_string(),
        });
    }
    if total_matched == 0 && oldest.is_some() {
        hints.push("no stored event in the window matches the filter".to_string());
    }
    (window, hints)
}

/// XIDs per node in a window: (all, error or fatal).
pub fn xid_counts(store: &EventStore, start_ms: i64, end_ms: i64) -> BTreeMap<String, (u64, u64)> {
    let mut out: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    store.scan(start_ms, end_ms, &[EventKind::Xid], |e| {
        let c = match out.get_mut(e.node()) {
            Some(c) => c,
            None => out.entry(e.node().to_string()).or_default(),
        };
        c.0 += 1;
        if e.severity() >= v1::Severity::Error as i32 {
            c.1 += 1;
        }
    });
    out
}

fn wire_tier(t: Tier) -> WireTier {
    match t {
        Tier::Raw => WireTier::Raw,
        Tier::Minute => WireTier::Tier1m,
        Tier::Hour => WireTier::Tier1h,
    }
}

/// Picks the tier for a step: the coarsest whose resolution fits the step and whose data reaches
/// back to the window start; p95 prefers raw samples when they cover the window (rollups only
/// give an approximation); if nothing reaches back far enough, the fitting tier that reaches
/// furthest.
pub fn choose_tier(series: &SeriesStore, start_ms: i64, step_ms: i64, agg: Aggregation) -> Tier {
    let oldest = |t: Tier| series.tier_stats(t).oldest_ms;
    let covers = |t: Tier| oldest(t).is_some_and(|o| o <= start_ms);
    if agg == Aggregation::P95 && covers(Tier::Raw) {
        return Tier::Raw;
    }
    let fitting: Vec<Tier> = [Tier::Hour, Tier::Minute, Tier::Raw]
        .into_iter()
        .filter(|t| t.resolution_ms() <= step_ms)
        .collect();
    if let Some(t) = fitting.iter().find(|t| covers(**t)) {
        return *t;
    }
    fitting
        .into_iter()
        .filter(|t| oldest(*t).is_some())
        .min_by_key(|t| (oldest(*t), -t.resolution_ms()))
        .unwrap_or(Tier::Raw)
}

/// Ceiling division for positive operands.
fn ceil_div(a: i64, b: i64) -> i64 {
    (a + b - 1) / b
}

/// A 1-2-5 style step (seconds) no smaller than `min_s`.
fn nice_step(min_s: i64) -> i64 {
    const NICE: [i64; 18] = [
        1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
    ];
    NICE.iter()
        .copied()
        .find(|s| *s >= min_s)
        .unwrap_or_else(|| ceil_div(min_s, 86400) * 86400)
}

/// A group's key (node, GPU index), steps, UUID, and whether it is the merged "other".
type Grouped = ((String, Option<u32>), Steps, String, bool);

type GroupKey = (String, Option<u32>);

/// Most time one Trend may spend on the state task; past it the answer is partial and says so.
const QUERY_TIME_BUDGET: std::time::Duration = std::time::Duration::from_millis(2000);

/// Groups kept while a Trend runs: the `cap` smallest keys individually, every later key merged
/// into one "other" series as it arrives, so memory is `cap + 1` series whatever the fleet.
/// Answers are the same as grouping everything and then cutting: with more than `cap` groups,
/// the first `cap - 1` keys are returned and the rest merged.
struct Groups {
    cap: usize,
    kept: BTreeMap<GroupKey, (Steps, String)>,
    other: Option<Steps>,
    /// Keys merged into `other` (to count the series the answer stands for).
    overflow: std::collections::HashSet<GroupKey>,
}

impl Groups {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            kept: BTreeMap::new(),
            other: None,
            overflow: std::collections::HashSet::new(),
        }
    }

    fn merge_into_other(&mut self, key: GroupKey, s: &Steps) {
        match &mut self.other {
            Some(o) => o.merge(s),
            None => self.other = Some(s.clone()),
        }
        self.overflow.insert(key);
    }

    fn add(&mut self, key: GroupKey, s: Steps, uuid: String) {
        if let Some((acc, _)) = self.kept.get_mut(&key) {
            acc.merge(&s);
            return;
        }
        let beyond = self.kept.len() >= self.cap
            && self.kept.last_key_value().is_some_and(|(k, _)| key > *k);
        if beyond || self.overflow.contains(&key) {
            self.merge_into_other(key, &s);
            return;
        }
        self.kept.insert(key, (s, uuid));
        if self.kept.len() > self.cap
            && let Some((k, (evicted, _))) = self.kept.pop_last()
        {
            self.merge_into_other(k, &evicted);
        }
    }

    /// The series to return, the merged rest, and how many series there were.
    fn finish(mut self) -> (Vec<Grouped>, Option<Steps>, u32) {
        let total = (self.kept.len() + self.overflow.len()) as u32;
        if self.other.is_some()
            && let Some((k, (s, _))) = self.kept.pop_last()
        {
            // With an "other" series the answer holds cap - 1 individual ones.
            self.merge_into_other(k, &s);
        }
        let list = self
            .kept
            .into_iter()
            .map(|(k, (s, u))| (k, s, u, false))
            .collect();
        (list, self.other, total)
    }
}

/// Per step figures of one group.
#[derive(Clone)]
struct Steps {
    aggs: Vec<Agg>,
    /// Values behind each step, for p95 (raw samples or bucket averages).
    values: Option<Vec<Vec<f64>>>,
    merged: u32,
}

impl Steps {
    fn new(n: usize, p95: bool) -> Self {
        Self {
            aggs: vec![Agg::EMPTY; n],
            values: p95.then(|| vec![Vec::new(); n]),
            merged: 0,
        }
    }

    fn merge(&mut self, o: &Steps) {
        for (a, b) in self.aggs.iter_mut().zip(&o.aggs) {
            a.merge(b);
        }
        if let (Some(a), Some(b)) = (&mut self.values, &o.values) {
            for (x, y) in a.iter_mut().zip(b) {
                x.extend_from_slice(y);
            }
        }
        self.merged += o.merged;
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable_by(f64::total_cmp);
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn gpu_selected(g: &GpuSeries, nodes: &[String], gpus: &[String]) -> bool {
    if !nodes.is_empty() && !nodes.iter().any(|n| *n == *g.node) {
        return false;
    }
    if gpus.is_empty() {
        return true;
    }
    let slash = format!("{}/{}", g.node, g.index);
    gpus.iter()
        .any(|want| want.eq_ignore_ascii_case(&g.uuid) || *want == slash)
}

/// `Trend`: one metric over a window.
pub fn trend(
    series: &SeriesStore,
    req: TrendRequest,
    now_ns: i128,
) -> Result<TrendResponse, QueryError> {
    let (mi, def) = metric::by_name(&req.metric)
        .filter(|(i, _)| *i < series.metrics())
        .ok_or_else(|| QueryError::Metric(req.metric.clone(), metric::names().join(", ")))?;
    trend_column(series, mi, def.name, def.unit, def.scale, req, now_ns)
}

/// `Trend` over column `mi` of the store (named `name`, in `unit`, values times `scale`).
pub fn trend_column(
    series: &SeriesStore,
    mi: usize,
    name: &str,
    unit: &str,
    scale: f64,
    req: TrendRequest,
    now_ns: i128,
) -> Result<TrendResponse, QueryError> {
    let max_points = match req.max_points {
        0 => DEFAULT_POINTS,
        n if n <= MAX_POINTS => n,
        n => {
            return Err(QueryError::Range {
                field: "max_points",
                value: u64::from(n),
                allowed: "1..=1000 (0 = 120)",
            });
        }
    };
    let max_series = match req.max_series {
        0 => DEFAULT_SERIES,
        n if n <= MAX_SERIES => n,
        n => {
            return Err(QueryError::Range {
                field: "max_series",
                value: u64::from(n),
                allowed: "1..=200 (0 = 20)",
            });
        }
    };
    let agg = Aggregation::try_from(req.aggregation).map_err(|_| QueryError::Range {
        field: "aggregation",
        value: req.aggregation as u64,
        allowed: "0..=5",
    })?;
    let agg = if agg == Aggregation::Unspecified {
        Aggregation::Avg
    } else {
        agg
    };
    let group = GroupBy::try_from(req.group_by).map_err(|_| QueryError::Range {
        field: "group_by",
        value: req.group_by as u64,
        allowed: "0..=3",
    })?;
    let group = if group == GroupBy::Unspecified {
        GroupBy::Gpu
    } else {
        group
    };
    for (field, n) in [("nodes", req.nodes.len()), ("gpus", req.gpus.len())] {
        if n > crate::filter::MAX_FILTER_ITEMS {
            return Err(QueryError::Filter(FilterError::TooMany { field, n }));
        }
    }
    let tw = req.window.unwrap_or_default();
    let w = window::resolve(&tw.since, &tw.until, now_ns, HOUR_NS)?;
    let span_s = ((w.end_ns - w.start_ns) / 1_000_000_000).max(1) as i64;
    let mut hints = Vec::new();
    let min_step = ceil_div(span_s, i64::from(max_points));
    let mut step_s = if req.step_seconds > 0 {
        i64::from(req.step_seconds)
    } else {
        nice_step(min_step)
    };
    if step_s < min_step {
        hints.push(format!(
            "step {step_s}s would give more than {max_points} points; raised to {}s",
            nice_step(min_step)
        ));
        step_s = nice_step(min_step);
    }
    let tier = match WireTier::try_from(req.tier) {
        Ok(WireTier::Unspecified) => choose_tier(series, w.start_ms(), step_s * 1000, agg),
        Ok(WireTier::Raw) => Tier::Raw,
        Ok(WireTier::Tier1m) => Tier::Minute,
        Ok(WireTier::Tier1h) => Tier::Hour,
        Err(_) => {
            return Err(QueryError::Range {
                field: "tier",
                value: req.tier as u64,
                allowed: "0 (auto), 1 (raw), 2 (1m), 3 (1h)",
            });
        }
    };
    let res_s = tier.resolution_ms() / 1000;
    if res_s > 0 && step_s % res_s != 0 {
        step_s = ceil_div(step_s, res_s) * res_s;
    }
    let step = step_s * 1000;
    let start = w.start_ms().div_euclid(step) * step;
    let end = w.end_ms();
    let n = ((end - start) as usize).div_ceil(step as usize).max(1);
    let p95 = agg == Aggregation::P95;

    // Per GPU steps, grouped as asked; only the series the answer returns are kept.
    let mut groups = Groups::new(max_series as usize);
    let started = std::time::Instant::now();
    let selected = series.gpus().len();
    for (done, g) in series.gpus().iter().enumerate() {
        if !gpu_selected(g, &req.nodes, &req.gpus) {
            continue;
        }
        if done % 64 == 0 && started.elapsed() > QUERY_TIME_BUDGET {
            hints.push(format!(
                "query time budget ({} ms) hit after {done} of {selected} GPUs: the answer is partial; narrow nodes/gpus or the window",
                QUERY_TIME_BUDGET.as_millis()
            ));
            break;
        }
        let mut s = Steps::new(n, p95);
        s.merged = 1;
        let mut any = false;
        match tier {
            Tier::Raw => {
                // Rows come oldest first: find each step's run of rows by binary search and
                // fold it in one tight loop.
                series.raw_runs(g, mi, start, end, |ts, vals| {
                    let mut lo = ts.partition_point(|t| *t < start);
                    let hi = ts.partition_point(|t| *t < end);
                    while lo < hi {
                        let i = ((ts[lo] - start) / step) as usize;
                        let bound = start + (i as i64 + 1) * step;
                        let j = lo + ts[lo..hi].partition_point(|t| *t < bound);
                        if let Some(a) = s.aggs.get_mut(i) {
                            let before = a.count;
                            a.add_run(&ts[lo..j], &vals[lo..j]);
                            any |= a.count > before;
                        }
                        if let Some(v) = s.values.as_mut().and_then(|x| x.get_mut(i)) {
                            v.extend(vals[lo..j].iter().filter(|x| !x.is_nan()));
                        }
                        lo = j;
                    }
                })?
            }
            Tier::Minute | Tier::Hour => series.buckets(g, tier, mi, start, end, |b, a| {
                let i = ((b - start) / step) as usize;
                if let Some(x) = s.aggs.get_mut(i) {
                    x.merge(a);
                    any = true;
                }
                if let Some(vals) = s.values.as_mut().and_then(|x| x.get_mut(i)) {
                    vals.push(a.sum / f64::from(a.count));
                }
            }),
        }
        if !any {
            continue;
        }
        let key = match group {
            GroupBy::Fleet => (String::new(), None),
            GroupBy::Node => (g.node.to_string(), None),
            _ => (g.node.to_string(), Some(g.index)),
        };
        let uuid = if group == GroupBy::Gpu {
            g.uuid.clone()
        } else {
            String::new()
        };
        groups.add(key, s, uuid);
    }
    let (mut list, other, series_total) = groups.finish();
    if let Some(o) = other {
        hints.push(format!(
            "{series_total} series exceed max_series {max_series}; the last {} are merged into one \"other\" series",
            o.merged
        ));
        list.push(((String::new(), None), o, String::new(), true));
    }
    let value = |a: &Agg, vals: Option<&mut Vec<f64>>| -> f64 {
        let v = match agg {
            Aggregation::Min => a.min,
            Aggregation::Max => a.max,
            Aggregation::Last => a.last,
            Aggregation::P95 => vals.map_or(f64::NAN, |v| percentile(v, 0.95)),
            _ => a.sum / f64::from(a.count),
        };
        v * scale
    };
    let out_series: Vec<TrendSeries> = list
        .into_iter()
        .map(|((node, index), mut s, uuid, is_other)| {
            let mut total = Agg::EMPTY;
            let mut all_vals = Vec::new();
            let mut points = Vec::with_capacity(n);
            for i in 0..n {
                let a = s.aggs[i];
                if a.count == 0 {
                    continue;
                }
                total.merge(&a);
                let vals = s.values.as_mut().map(|v| &mut v[i]);
                if let Some(v) = &vals {
                    all_vals.extend_from_slice(v);
                }
                points.push(TrendPoint {
                    time: Some(ms_ts(start + i as i64 * step)),
                    value: value(&a, vals),
                    samples: u64::from(a.count),
                });
            }
            if !p95 {
                // p95 over the whole window needs the values; collect them only for stats.
                all_vals.clear();
            }
            let stats = SeriesStats {
                min: total.min * scale,
                max: total.max * scale,
                avg: total.sum / f64::from(total.count.max(1)) * scale,
                p95: if p95 {
                    percentile(&mut all_vals, 0.95) * scale
                } else {
                    f64::NAN
                },
                last: total.last * scale,
                samples: u64::from(total.count),
            };
            TrendSeries {
                node,
                gpu_index: index,
                gpu_uuid: uuid,
                points,
                stats: Some(stats),
                merged_series: s.merged,
                other: is_other,
            }
        })
        .collect();
    let oldest = series.tier_stats(tier).oldest_ms;
    let window = resolved(&w, oldest);
    if window.partial {
        hints.push(match oldest {
            Some(o) => format!(
                "the window starts before the oldest {} data ({})",
                tier.name(),
                rfc(o)
            ),
            None => "the collector holds no GPU samples yet".to_string(),
        });
    }
    if out_series.is_empty()
        && series
            .gpus()
            .iter()
            .any(|g| gpu_selected(g, &req.nodes, &req.gpus))
    {
        hints.push(format!(
            "no {} samples in the window for the selected GPUs",
            name
        ));
    } else if out_series.is_empty() && !(req.nodes.is_empty() && req.gpus.is_empty()) {
        hints.push("no GPU matches the nodes/gpus selection".to_string());
    }
    Ok(TrendResponse {
        metric: name.to_string(),
        unit: unit.to_string(),
        window: Some(window),
        step_seconds: step_s as u32,
        source: wire_tier(tier) as i32,
        aggregation: agg as i32,
        group_by: group as i32,
        series: out_series,
        series_total,
        approximate: p95 && tier != Tier::Raw,
        hints,
    })
}

/// The metric's samples of a GPU sample event, for the series store.
pub fn sample_row(ev: &v1::Event) -> Option<(&v1::GpuSample, [f64; metric::COUNT])> {
    match &ev.payload {
        Some(Payload::GpuSample(g)) => Some((g, metric::row(g))),
        _ => None,
    }
}

/// Names of the metrics the store keeps, in column order.
pub fn metric_count() -> usize {
    METRICS.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming grouping keeps at most `cap` series and answers exactly as grouping all and
    /// cutting afterwards would, whatever order the GPUs come in.
    #[test]
    fn groups_keep_only_what_they_return_and_match_a_full_grouping() {
        let steps = |v: f64| {
            let mut s = Steps::new(1, false);
            s.merged = 1;
            s.aggs[0].add(0, v);
            s
        };
        // (node, gpu) pairs in a scrambled order, some nodes with several GPUs.
        let keys: Vec<GroupKey> = (0..40u32)
            .map(|i| (format!("n{}", (i * 7) % 13), Some((i * 5) % 3)))
            .collect();
        for cap in [1usize, 2, 5, 13, 39, 40, 100] {
            for by_node in [false, true] {
                let key = |k: &GroupKey| {
                    if by_node {
                        (k.0.clone(), None)
                    } else {
                        k.clone()
                    }
                };
                let mut g = Groups::new(cap);
                let mut full: BTreeMap<GroupKey, f64> = BTreeMap::new();
                for (i, k) in keys.iter().enumerate() {
                    g.add(key(k), steps(i as f64), String::new());
                    *full.entry(key(k)).or_default() += i as f64;
                    assert!(g.kept.len() <= cap, "held more than the cap");
                }
                let (list, other, total) = g.finish();
                assert_eq!(total as usize, full.len());
                let individual = if full.len() > cap {
                    cap - 1
                } else {
                    full.len()
                };
                let want: Vec<(GroupKey, f64)> =
                    full.clone().into_iter().take(individual).collect();
                let got: Vec<(GroupKey, f64)> = list
                    .iter()
                    .map(|(k, s, _, _)| (k.clone(), s.aggs[0].sum))
                    .collect();
                assert_eq!(got, want, "cap {cap} by_node {by_node}");
                let rest: f64 = full.values().skip(individual).sum();
                match other {
                    Some(o) => assert_eq!(o.aggs[0].sum, rest),
                    None => assert_eq!(individual, full.len()),
                }
            }
        }
    }

    #[test]
    fn tokens_roundtrip_and_reject_tampering() {
        let t = PageToken {
            key: 42,
            ceiling: 99,
            start_ns: -5,
            end_ns: 1_764_000_000_000_000_000,
            query: 7,
            expired_at_start: 3,
        };
        let s = t.encode();
        assert_eq!(PageToken::decode(&s).unwrap(), t);
        let mut bad = s.clone().into_bytes();
        bad[10] = if bad[10] == b'0' { b'1' } else { b'0' };
        assert!(PageToken::decode(std::str::from_utf8(&bad).unwrap()).is_err());
        assert!(PageToken::decode("e1.zz").is_err());
        assert!(PageToken::decode("").is_err());
    }

    #[test]
    fn steps_are_nice() {
        assert_eq!(nice_step(1), 1);
        assert_eq!(nice_step(31), 60);
        assert_eq!(nice_step(721), 900);
        assert_eq!(nice_step(90_000), 172_800);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.95), 95.0);
        assert!(percentile(&mut [], 0.95).is_nan());
    }
}
