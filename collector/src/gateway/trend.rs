//! Trend answers merged across upstreams. Per-GPU and per-node series are disjoint across shards
//! and pass through; a series two upstreams both hold (the fleet series, "other", a GPU whose
//! agent failed over) is merged point by point from what each point carries: its value, its
//! sample count and the time of its latest sample. That is exact for avg (sample-weighted), min,
//! max and last; a p95 across upstreams is not (the gateway takes the highest, and says so).
use std::collections::BTreeMap;

use gpulse_proto::v1::{
    Aggregation, SeriesStats, TrendPoint, TrendRequest, TrendResponse, TrendSeries,
};

use super::merge;

type Key = (bool, String, Option<u32>, String);

#[derive(Default)]
struct Point {
    sum: f64,
    samples: u64,
    min: f64,
    max: f64,
    last: f64,
    last_ms: i64,
}

struct Series {
    points: BTreeMap<i64, Point>,
    stats: Point,
    p95: f64,
    merged: u32,
}

impl Default for Series {
    fn default() -> Self {
        Self {
            points: BTreeMap::new(),
            stats: Point::default(),
            p95: f64::NEG_INFINITY,
            merged: 0,
        }
    }
}

pub struct Trend {
    agg: Aggregation,
    cap: usize,
    out: TrendResponse,
    series: BTreeMap<Key, Series>,
    tiers: Vec<i32>,
}

fn ms(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref()
        .map_or(i64::MIN, gpulse_proto::time::to_unix_millis)
}

impl Point {
    fn add(&mut self, value: f64, samples: u64, last_ms: i64, min: f64, max: f64) {
        if samples == 0 {
            return;
        }
        if self.samples == 0 {
            self.min = f64::INFINITY;
            self.max = f64::NEG_INFINITY;
            self.last_ms = i64::MIN;
        }
        self.sum += value * samples as f64;
        self.samples += samples;
        self.min = self.min.min(min);
        self.max = self.max.max(max);
        if last_ms >= self.last_ms {
            self.last = value;
            self.last_ms = last_ms;
        }
    }

    fn merge(&mut self, o: &Point) {
        if o.samples == 0 {
            return;
        }
        let avg = o.sum / o.samples as f64;
        let last_ms = o.last_ms;
        let (min, max, last) = (o.min, o.max, o.last);
        self.add(avg, o.samples, last_ms, min, max);
        if last_ms >= self.last_ms {
            self.last = last;
        }
    }
}

impl Trend {
    pub fn new(req: &TrendRequest) -> Self {
        let agg = Aggregation::try_from(req.aggregation)
            .ok()
            .filter(|a| *a != Aggregation::Unspecified)
            .unwrap_or(Aggregation::Avg);
        let cap = match req.max_series {
            0 => 20,
            n => n as usize,
        };
        Self {
            agg,
            cap,
            out: TrendResponse::default(),
            series: BTreeMap::new(),
            tiers: Vec::new(),
        }
    }

    pub fn add(&mut self, upstream: &str, r: TrendResponse) {
        let first = self.out.metric.is_empty();
        if first {
            self.out.metric = r.metric.clone();
            self.out.unit = r.unit.clone();
            self.out.aggregation = r.aggregation;
            self.out.group_by = r.group_by;
        }
        merge::window(&mut self.out.window, r.window);
        merge::hints(&mut self.out.hints, upstream, r.hints);
        self.out.step_seconds = self.out.step_seconds.max(r.step_seconds);
        self.out.series_total += r.series_total;
        self.out.approximate |= r.approximate;
        if !self.tiers.contains(&r.source) {
            self.tiers.push(r.source);
        }
        for src in r.sources {
            if !self.out.sources.contains(&src) {
                self.out.sources.push(src);
            }
        }
        for s in r.series {
            self.add_series(s);
        }
        self.cap_series();
    }

    fn add_series(&mut self, s: TrendSeries) {
        let key = (s.other, s.node.clone(), s.gpu_index, s.gpu_uuid.clone());
        let e = self.series.entry(key).or_default();
        e.merged += s.merged_series.max(1);
        for p in &s.points {
            // The value is the upstream's aggregate of the point: under min it is the minimum,
            // under max the maximum, under last the latest, under avg the mean; `value` picks
            // the field the aggregation reads.
            e.points.entry(ms(&p.time)).or_default().add(
                p.value,
                p.samples,
                ms(&p.last_time),
                p.value,
                p.value,
            );
        }
        if let Some(st) = s.stats {
            e.p95 = e.p95.max(st.p95);
            let mut one = Point::default();
            one.add(st.avg, st.samples, ms(&st.last_time), st.min, st.max);
            one.last = st.last;
            e.stats.merge(&one);
        }
    }

    /// More series than asked for: the first `cap - 1` keys stay, the rest become "other"
    /// (the collector's own rule, so one shard or four give the same cut).
    fn cap_series(&mut self) {
        let individual = self.series.keys().filter(|k| !k.0).count();
        if individual <= self.cap && !(individual == self.cap && self.has_other()) {
            return;
        }
        let keep = self.cap.saturating_sub(1);
        let over: Vec<Key> = self
            .series
            .keys()
            .filter(|k| !k.0)
            .skip(keep)
            .cloned()
            .collect();
        let other_key: Key = (true, String::new(), None, String::new());
        for k in over {
            if let Some(s) = self.series.remove(&k) {
                let o = self.series.entry(other_key.clone()).or_default();
                o.merged += s.merged;
                o.p95 = o.p95.max(s.p95);
                o.stats.merge(&s.stats);
                for (t, p) in s.points {
                    o.points.entry(t).or_default().merge(&p);
                }
            }
        }
    }

    fn has_other(&self) -> bool {
        self.series.keys().any(|k| k.0)
    }

    pub fn finish(mut self) -> TrendResponse {
        let step_ms = i64::from(self.out.step_seconds.max(1)) * 1000;
        let agg = self.agg;
        let mut mixed_steps = false;
        self.out.series = std::mem::take(&mut self.series)
            .into_iter()
            .map(|((other, node, gpu_index, gpu_uuid), s)| {
                // Upstreams that chose a finer step are folded into the coarsest one.
                let mut points: BTreeMap<i64, Point> = BTreeMap::new();
                for (t, p) in s.points {
                    let at = t.div_euclid(step_ms) * step_ms;
                    mixed_steps |= at != t;
                    points.entry(at).or_default().merge(&p);
                }
                TrendSeries {
                    node,
                    gpu_index,
                    gpu_uuid,
                    points: points
                        .into_iter()
                        .map(|(t, p)| TrendPoint {
                            time: Some(gpulse_proto::time::from_unix_millis(t)),
                            value: value(agg, &p),
                            samples: p.samples,
                            last_time: (p.last_ms != i64::MIN)
                                .then(|| gpulse_proto::time::from_unix_millis(p.last_ms)),
                        })
                        .collect(),
                    stats: Some(SeriesStats {
                        min: s.stats.min,
                        max: s.stats.max,
                        avg: s.stats.sum / s.stats.samples.max(1) as f64,
                        p95: if agg == Aggregation::P95 {
                            s.p95
                        } else {
                            f64::NAN
                        },
                        last: s.stats.last,
                        samples: s.stats.samples,
                        last_time: (s.stats.last_ms != i64::MIN)
                            .then(|| gpulse_proto::time::from_unix_millis(s.stats.last_ms)),
                    }),
                    merged_series: s.merged,
                    other,
                }
            })
            .collect();
        let merged_any = self
            .out
            .series
            .iter()
            .any(|s| s.merged_series > 1 || s.other);
        if agg == Aggregation::P95 && merged_any {
            self.out.approximate = true;
            self.out.hints.push(
                "p95 of a series merged across upstreams is the highest upstream p95, not the p95 of all samples"
                    .into(),
            );
        }
        if mixed_steps {
            self.out.hints.push(format!(
                "upstreams answered at different steps; points are merged at the coarsest, {} s",
                self.out.step_seconds
            ));
        }
        if self.tiers.len() > 1 {
            self.out.hints.push(
                "upstreams answered from different tiers (their retention differs); source names the first".into(),
            );
        }
        self.out.source = self.tiers.first().copied().unwrap_or_default();
        self.out
            .sources
            .sort_by_key(|s| s.start.map(|t| (t.seconds, t.nanos)));
        self.out
    }
}

/// A merged point's value under the aggregation.
fn value(agg: Aggregation, p: &Point) -> f64 {
    match agg {
        Aggregation::Min => p.min,
        // The highest upstream p95: the answer is marked approximate.
        Aggregation::Max | Aggregation::P95 => p.max,
        Aggregation::Last => p.last,
        _ => p.sum / p.samples.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::time::from_unix_millis;

    fn point(t: i64, value: f64, samples: u64, last: i64) -> TrendPoint {
        TrendPoint {
            time: Some(from_unix_millis(t)),
            value,
            samples,
            last_time: Some(from_unix_millis(last)),
        }
    }

    fn fleet(points: Vec<TrendPoint>) -> TrendResponse {
        TrendResponse {
            metric: "gpu_util_pct".into(),
            step_seconds: 60,
            series_total: 1,
            series: vec![TrendSeries {
                points,
                merged_series: 8,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn merged(agg: Aggregation, a: Vec<TrendPoint>, b: Vec<TrendPoint>) -> Vec<(f64, u64)> {
        let mut m = Trend::new(&TrendRequest {
            aggregation: agg as i32,
            ..Default::default()
        });
        m.add("a", fleet(a));
        m.add("b", fleet(b));
        let r = m.finish();
        assert_eq!(r.series.len(), 1);
        assert_eq!(r.series[0].merged_series, 16);
        r.series[0]
            .points
            .iter()
            .map(|p| (p.value, p.samples))
            .collect()
    }

    #[test]
    fn fleet_series_merge_exactly() {
        let a = vec![point(0, 10.0, 8, 50), point(60_000, 20.0, 8, 60_050)];
        let b = vec![point(0, 40.0, 24, 40), point(120_000, 5.0, 1, 120_001)];
        // avg weighted by samples: (10*8 + 40*24) / 32 = 32.5
        assert_eq!(
            merged(Aggregation::Avg, a.clone(), b.clone()),
            [(32.5, 32), (20.0, 8), (5.0, 1)]
        );
        assert_eq!(
            merged(Aggregation::Min, a.clone(), b.clone())[0],
            (10.0, 32)
        );
        assert_eq!(
            merged(Aggregation::Max, a.clone(), b.clone())[0],
            (40.0, 32)
        );
        // last: the value of the latest sample (a's at 50 ms beats b's at 40 ms).
        assert_eq!(merged(Aggregation::Last, a, b)[0], (10.0, 32));
    }

    #[test]
    fn p95_across_upstreams_is_marked_approximate() {
        let mut m = Trend::new(&TrendRequest {
            aggregation: Aggregation::P95 as i32,
            ..Default::default()
        });
        m.add("a", fleet(vec![point(0, 90.0, 8, 1)]));
        m.add("b", fleet(vec![point(0, 70.0, 8, 1)]));
        let r = m.finish();
        assert!(r.approximate);
        assert_eq!(r.series[0].points[0].value, 90.0);
    }

    #[test]
    fn disjoint_series_pass_through_and_the_cap_folds_the_rest_into_other() {
        let gpu = |node: &str, i: u32| TrendSeries {
            node: node.into(),
            gpu_index: Some(i),
            points: vec![point(0, f64::from(i), 1, 1)],
            merged_series: 1,
            ..Default::default()
        };
        let mut m = Trend::new(&TrendRequest {
            max_series: 3,
            ..Default::default()
        });
        let resp = |s: Vec<TrendSeries>| TrendResponse {
            step_seconds: 60,
            series_total: s.len() as u32,
            series: s,
            ..Default::default()
        };
        m.add("a", resp(vec![gpu("n1", 0), gpu("n1", 1)]));
        m.add("b", resp(vec![gpu("n2", 0), gpu("n2", 1)]));
        let r = m.finish();
        assert_eq!(r.series_total, 4);
        assert_eq!(r.series.len(), 3);
        let names: Vec<_> = r
            .series
            .iter()
            .map(|s| (s.node.as_str(), s.gpu_index, s.other))
            .collect();
        assert_eq!(names[..2], [("n1", Some(0), false), ("n1", Some(1), false)]);
        assert!(r.series[2].other);
        assert_eq!(r.series[2].merged_series, 2);
        assert_eq!(r.series[2].points[0].samples, 2);
    }
}
