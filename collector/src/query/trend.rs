//! `Trend`: one GPU metric over a window, per GPU, node or fleet, from raw samples or the rollup
//! tier that fits the step. Planned (limits, step grid, tier), folded GPU by GPU into steps,
//! grouped with a bound on the series kept, then turned into points and stats.
use std::collections::BTreeMap;

use gpulse_proto::{
    metric,
    v1::{
        Aggregation, GroupBy, ResolvedWindow, SeriesStats, Tier as WireTier, TrendPoint,
        TrendRequest, TrendResponse, TrendSeries,
    },
    window::{self, Window},
};

use super::{
    DEFAULT_POINTS, DEFAULT_SERIES, HOUR_NS, MAX_POINTS, MAX_SERIES, QueryError, bounded, ms_ts,
    resolved, rfc, wire_enum,
};
use crate::store::series::{Agg, GpuSeries, SeriesStore, Tier};
use gpulse_proto::filter::FilterError;

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

/// What a `Trend` request resolves to: limits, aggregation, grouping, tier and the step grid.
struct Plan {
    max_series: u32,
    agg: Aggregation,
    group: GroupBy,
    tier: Tier,
    window: Window,
    step_s: i64,
    /// Grid start (ms, a multiple of the step), end (ms) and number of steps.
    start: i64,
    end: i64,
    n: usize,
    hints: Vec<String>,
}

impl Plan {
    fn step_ms(&self) -> i64 {
        self.step_s * 1000
    }

    fn p95(&self) -> bool {
        self.agg == Aggregation::P95
    }
}

/// Validates the request and lays out the step grid: the step from `max_points` (or asked, and
/// raised when it would give too many points), the tier (asked, or the one that fits the step and
/// reaches back), the step rounded to the tier's resolution.
fn plan(series: &SeriesStore, req: &TrendRequest, now_ns: i128) -> Result<Plan, QueryError> {
    let max_points = bounded(
        "max_points",
        req.max_points,
        DEFAULT_POINTS,
        MAX_POINTS,
        "1..=1000 (0 = 120)",
    )?;
    let max_series = bounded(
        "max_series",
        req.max_series,
        DEFAULT_SERIES,
        MAX_SERIES,
        "1..=200 (0 = 20)",
    )?;
    let agg = wire_enum("aggregation", req.aggregation, Aggregation::Avg, "0..=5")?;
    let group = wire_enum("group_by", req.group_by, GroupBy::Gpu, "0..=3")?;
    for (field, n) in [("nodes", req.nodes.len()), ("gpus", req.gpus.len())] {
        if n > gpulse_proto::filter::MAX_FILTER_ITEMS {
            return Err(QueryError::Filter(FilterError::TooMany { field, n }));
        }
    }
    let tw = req.window.clone().unwrap_or_default();
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
    Ok(Plan {
        max_series,
        agg,
        group,
        tier,
        window: w,
        step_s,
        start,
        end,
        n: ((end - start) as usize).div_ceil(step as usize).max(1),
        hints,
    })
}

/// One GPU's column `mi` folded into the plan's steps; `None` when it has no value there.
fn gpu_steps(
    series: &SeriesStore,
    g: &GpuSeries,
    mi: usize,
    p: &Plan,
) -> Result<Option<Steps>, QueryError> {
    let (start, end, step) = (p.start, p.end, p.step_ms());
    let mut s = Steps::new(p.n, p.p95());
    s.merged = 1;
    let mut any = false;
    match p.tier {
        Tier::Raw => {
            // Rows come oldest first: find each step's run of rows by binary search and fold it
            // in one tight loop.
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
        Tier::Minute | Tier::Hour => series.buckets(g, p.tier, mi, start, end, |b, a| {
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
    Ok(any.then_some(s))
}

/// Every selected GPU's steps, grouped as asked; only the series the answer returns are kept.
/// Stops at [`QUERY_TIME_BUDGET`] and says so.
fn group_gpus(
    series: &SeriesStore,
    mi: usize,
    req: &TrendRequest,
    p: &mut Plan,
) -> Result<Groups, QueryError> {
    let mut groups = Groups::new(p.max_series as usize);
    let started = std::time::Instant::now();
    let total = series.gpus().len();
    for (done, g) in series.gpus().iter().enumerate() {
        if !gpu_selected(g, &req.nodes, &req.gpus) {
            continue;
        }
        if done % 64 == 0 && started.elapsed() > QUERY_TIME_BUDGET {
            p.hints.push(format!(
                "query time budget ({} ms) hit after {done} of {total} GPUs: the answer is partial; narrow nodes/gpus or the window",
                QUERY_TIME_BUDGET.as_millis()
            ));
            break;
        }
        let Some(s) = gpu_steps(series, g, mi, p)? else {
            continue;
        };
        let key = match p.group {
            GroupBy::Fleet => (String::new(), None),
            GroupBy::Node => (g.node.to_string(), None),
            _ => (g.node.to_string(), Some(g.index)),
        };
        let uuid = if p.group == GroupBy::Gpu {
            g.uuid.clone()
        } else {
            String::new()
        };
        groups.add(key, s, uuid);
    }
    Ok(groups)
}

/// One group's points (one per step with data) and stats over the window, values times `scale`.
fn series_out(g: Grouped, p: &Plan, scale: f64) -> TrendSeries {
    let ((node, index), mut s, uuid, is_other) = g;
    let value = |a: &Agg, vals: Option<&mut Vec<f64>>| -> f64 {
        let v = match p.agg {
            Aggregation::Min => a.min,
            Aggregation::Max => a.max,
            Aggregation::Last => a.last,
            Aggregation::P95 => vals.map_or(f64::NAN, |v| percentile(v, 0.95)),
            _ => a.sum / f64::from(a.count),
        };
        v * scale
    };
    let mut total = Agg::EMPTY;
    let mut all_vals = Vec::new();
    let mut points = Vec::with_capacity(p.n);
    for i in 0..p.n {
        let a = s.aggs[i];
        if a.count == 0 {
            continue;
        }
        total.merge(&a);
        let vals = s.values.as_mut().map(|v| &mut v[i]);
        if let Some(v) = &vals {
            // p95 over the whole window needs the values (kept only for p95).
            all_vals.extend_from_slice(v);
        }
        points.push(TrendPoint {
            time: Some(ms_ts(p.start + i as i64 * p.step_ms())),
            value: value(&a, vals),
            samples: u64::from(a.count),
            last_time: (a.last_ms != i64::MIN).then(|| ms_ts(a.last_ms)),
        });
    }
    let stats = SeriesStats {
        min: total.min * scale,
        max: total.max * scale,
        avg: total.sum / f64::from(total.count.max(1)) * scale,
        p95: if p.p95() {
            percentile(&mut all_vals, 0.95) * scale
        } else {
            f64::NAN
        },
        last: total.last * scale,
        samples: u64::from(total.count),
        last_time: (total.last_ms != i64::MIN).then(|| ms_ts(total.last_ms)),
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
}

/// What to tell the caller about coverage: the window reaching past the tier's oldest data, no
/// samples for the selection, no GPU matching it.
fn coverage(
    series: &SeriesStore,
    req: &TrendRequest,
    p: &mut Plan,
    name: &str,
    empty: bool,
) -> ResolvedWindow {
    let oldest = series.tier_stats(p.tier).oldest_ms;
    let window = resolved(&p.window, oldest);
    if window.partial {
        p.hints.push(match oldest {
            Some(o) => format!(
                "the window starts before the oldest {} data ({})",
                p.tier.name(),
                rfc(o)
            ),
            None => "the collector holds no GPU samples yet".to_string(),
        });
    }
    let selected = || {
        series
            .gpus()
            .iter()
            .any(|g| gpu_selected(g, &req.nodes, &req.gpus))
    };
    if empty && selected() {
        p.hints.push(format!(
            "no {name} samples in the window for the selected GPUs"
        ));
    } else if empty && !(req.nodes.is_empty() && req.gpus.is_empty()) {
        p.hints
            .push("no GPU matches the nodes/gpus selection".to_string());
    }
    window
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
    let mut p = plan(series, &req, now_ns)?;
    let (mut list, other, series_total) = group_gpus(series, mi, &req, &mut p)?.finish();
    if let Some(o) = other {
        p.hints.push(format!(
            "{series_total} series exceed max_series {}; the last {} are merged into one \"other\" series",
            p.max_series, o.merged
        ));
        list.push(((String::new(), None), o, String::new(), true));
    }
    let out: Vec<TrendSeries> = list.into_iter().map(|g| series_out(g, &p, scale)).collect();
    let window = coverage(series, &req, &mut p, name, out.is_empty());
    Ok(TrendResponse {
        metric: name.to_string(),
        unit: unit.to_string(),
        window: Some(window),
        step_seconds: p.step_s as u32,
        source: wire_tier(p.tier) as i32,
        aggregation: p.agg as i32,
        group_by: p.group as i32,
        series: out,
        series_total,
        approximate: p.p95() && p.tier != Tier::Raw,
        hints: p.hints,
        partial: Default::default(),
        upstreams: Default::default(),
        sources: Default::default(),
    })
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
