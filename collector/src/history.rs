//! Windows older than local retention, answered from the TSDB the collectors push to
//! (`--history-url`, its PromQL API: VictoriaMetrics, Prometheus, Mimir, Thanos). A Trend whose
//! window starts before the collector's oldest data of the tier it used asks the TSDB for the
//! steps before that (PromQL over the pushed 1-minute rollups, this collector's cluster and shard
//! only), splices them in front of the local points, and says which store answered which span.
//! If the TSDB fails, the local answer stands and says what is missing.
use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use bytes::Bytes;
use gpulse_proto::{
    metric::METRICS,
    time as ptime,
    v1::{Aggregation, GroupBy, TrendPoint, TrendRequest, TrendResponse, TrendSeries, TrendSource},
};
use tokio::sync::Mutex;

use crate::remote_write::{Place, post};

#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// The PromQL API root (e.g. http://victoria-metrics:8428, http://prometheus:9090).
    pub url: String,
    pub ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub timeout: Duration,
}

pub struct History {
    client: Mutex<post::Client>,
    base_path: String,
    place: Place,
    url: String,
}

/// Most points one PromQL answer may bring (series x steps).
const MAX_POINTS: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{0}")]
    Post(#[from] post::PostError),
    #[error("HTTP {0}: {1}")]
    Status(u16, String),
    #[error("the answer is not a PromQL matrix: {0}")]
    Shape(String),
}

/// A PromQL label matcher value: regex-quoted for `=~`, escaped for a string literal.
fn quote(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"")
}

fn regex_escape(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl History {
    pub fn new(cfg: &HistoryConfig, place: Place) -> Result<Self, post::PostError> {
        let client = post::Client::new(
            &cfg.url,
            cfg.ca.as_ref(),
            cfg.token_file.clone(),
            cfg.timeout,
        )?;
        let uri: http::Uri = cfg
            .url
            .parse()
            .map_err(|e| post::PostError::Setup(format!("{}: {e}", cfg.url)))?;
        Ok(Self {
            client: Mutex::new(client),
            base_path: uri.path().trim_end_matches('/').to_string(),
            place,
            url: cfg.url.clone(),
        })
    }

    /// The PromQL expression for one step of `req` (a range of `step_s`).
    pub fn promql(&self, req: &TrendRequest, step_s: i64) -> Option<String> {
        let def = METRICS.iter().find(|m| m.name == req.metric)?;
        let mut sel = Vec::new();
        for (k, v) in [
            ("cluster", &self.place.cluster),
            ("shard", &self.place.shard),
        ] {
            if !v.is_empty() {
                sel.push(format!("{k}=\"{}\"", quote(v)));
            }
        }
        if !req.nodes.is_empty() {
            let alt: Vec<String> = req.nodes.iter().map(|n| regex_escape(n)).collect();
            sel.push(format!("node=~\"{}\"", quote(&alt.join("|"))));
        }
        if !req.gpus.is_empty() {
            let alt: Vec<String> = req.gpus.iter().map(|n| regex_escape(n)).collect();
            sel.push(format!("gpu_uuid=~\"{}\"", quote(&alt.join("|"))));
        }
        let sel = sel.join(",");
        let m = |stat: &str| format!("{}:{stat}{{{sel}}}", def.prom);
        let r = format!("[{step_s}s]");
        let by = match GroupBy::try_from(req.group_by).unwrap_or_default() {
            GroupBy::Fleet => "",
            GroupBy::Node => " by (node)",
            _ => " by (node, index, gpu_uuid)",
        };
        let agg = Aggregation::try_from(req.aggregation).unwrap_or_default();
        Some(match agg {
            Aggregation::Min => format!("min{by} (min_over_time({}{r}))", m("min_1m")),
            Aggregation::Max => format!("max{by} (max_over_time({}{r}))", m("max_1m")),
            Aggregation::Last => format!("max{by} (last_over_time({}{r}))", m("avg_1m")),
            Aggregation::P95 => format!("max{by} (quantile_over_time(0.95, {}{r}))", m("avg_1m")),
            // The sample-weighted mean of the minutes' means: exact.
            _ => format!(
                "sum{by} (sum_over_time(({} * {})[{step_s}s:1m])) / sum{by} (sum_over_time({}{r}))",
                m("avg_1m"),
                m("count_1m"),
                m("count_1m")
            ),
        })
    }

    /// Steps `[from, to)` of `local`'s plan (its step) from the TSDB, as series keyed like the
    /// local ones.
    async fn fetch(
        &self,
        req: &TrendRequest,
        step_s: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<TrendSeries>, HistoryError> {
        let Some(q) = self.promql(req, step_s) else {
            return Ok(Vec::new());
        };
        let step = step_s * 1000;
        // A point at t stands for the step [t, t + step): evaluated at its last ms, the range
        // [t - 1 ms, t + step - 1 ms] holds exactly the minutes that start in it.
        let (start, end) = (from + step - 1, to - 1);
        if end < start {
            return Ok(Vec::new());
        }
        let path = format!(
            "{}/api/v1/query_range?query={}&start={:.3}&end={:.3}&step={step_s}",
            self.base_path,
            encode(&q),
            start as f64 / 1000.0,
            end as f64 / 1000.0
        );
        let answer = self
            .client
            .lock()
            .await
            .send(
                http::Method::GET,
                Some(&path),
                &[("accept", "application/json")],
                Bytes::new(),
            )
            .await?;
        if answer.status != 200 {
            // Both ends: receivers quote the query first and give the reason last.
            let text = String::from_utf8_lossy(&answer.body);
            let text: String = if text.chars().count() > 600 {
                let head: String = text.chars().take(200).collect();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(400)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                format!("{head} ... {tail}")
            } else {
                text.into_owned()
            };
            return Err(HistoryError::Status(answer.status, text));
        }
        parse_matrix(&answer.body, step)
    }

    /// `local` with the steps before its oldest local data answered from the TSDB, when the
    /// window reaches back past it.
    pub async fn complete(&self, req: &TrendRequest, mut local: TrendResponse) -> TrendResponse {
        let Some(w) = local.window else {
            return local;
        };
        let ms = |t: &Option<prost_types::Timestamp>| t.as_ref().map(ptime::to_unix_millis);
        let (Some(start), Some(end)) = (ms(&w.start), ms(&w.end)) else {
            return local;
        };
        let step_s = i64::from(local.step_seconds.max(1));
        let step = step_s * 1000;
        let first = start.div_euclid(step) * step;
        // Local data reaches back to its tier's oldest bucket; steps before that come from the
        // TSDB (a step only part of which is local stays local).
        let local_from = match ms(&w.oldest_data) {
            Some(o) => o.div_euclid(step) * step + if o.rem_euclid(step) == 0 { 0 } else { step },
            None => end.div_euclid(step) * step + step,
        };
        if local_from <= first {
            return local;
        }
        if step_s % 60 != 0 {
            local.hints.push(format!(
                "the window reaches back before local data, but history has 1-minute resolution; ask with a step that is a multiple of 60 s to get it from {}",
                self.url
            ));
            return local;
        }
        let to = local_from.min(end.div_euclid(step) * step + step);
        match self.fetch(req, step_s, first, to).await {
            Ok(hist) => {
                splice(&mut local, hist, to);
                let tier = tier_name(local.source);
                local.sources = vec![
                    TrendSource {
                        source: "history".into(),
                        start: Some(ptime::from_unix_millis(first.max(start))),
                        end: Some(ptime::from_unix_millis(to.min(end))),
                    },
                    TrendSource {
                        source: tier.into(),
                        start: Some(ptime::from_unix_millis(to.min(end))),
                        end: w.end,
                    },
                ];
                local.hints.push(format!(
                    "before {} the points come from the history store ({}): 1-minute rollups pushed by this collector; series stats cover the collector's part",
                    ptime::rfc3339(&ptime::from_unix_millis(to)),
                    self.url
                ));
                if let Some(win) = &mut local.window {
                    win.partial = false;
                    win.oldest_data = Some(ptime::from_unix_millis(first.max(start)));
                    local.hints.retain(|h| !h.contains("before the oldest"));
                }
            }
            Err(e) => {
                local.hints.push(format!(
                    "the history store ({}) did not answer ({e}); points before {} are missing",
                    self.url,
                    ptime::rfc3339(&ptime::from_unix_millis(to))
                ));
            }
        }
        local
    }
}

fn tier_name(t: i32) -> &'static str {
    match gpulse_proto::v1::Tier::try_from(t) {
        Ok(gpulse_proto::v1::Tier::Raw) => "raw",
        Ok(gpulse_proto::v1::Tier::Tier1m) => "1m",
        Ok(gpulse_proto::v1::Tier::Tier1h) => "1h",
        _ => "collector",
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

type Key = (String, Option<u32>, String);

/// A PromQL matrix as series of points at step starts (the evaluation time minus the step,
/// plus the millisecond it was moved by).
fn parse_matrix(body: &[u8], step: i64) -> Result<Vec<TrendSeries>, HistoryError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| HistoryError::Shape(e.to_string()))?;
    let result = v["data"]["result"]
        .as_array()
        .ok_or_else(|| HistoryError::Shape(v.to_string().chars().take(200).collect()))?;
    let mut out = Vec::new();
    let mut points = 0usize;
    for s in result {
        let m = &s["metric"];
        let label = |k: &str| m[k].as_str().unwrap_or_default().to_string();
        let mut series = TrendSeries {
            node: label("node"),
            gpu_index: m["index"].as_str().and_then(|i| i.parse().ok()),
            gpu_uuid: label("gpu_uuid"),
            merged_series: 1,
            ..Default::default()
        };
        for p in s["values"].as_array().into_iter().flatten() {
            let (Some(t), Some(v)) = (
                p[0].as_f64(),
                p[1].as_str().and_then(|v| v.parse::<f64>().ok()),
            ) else {
                continue;
            };
            if !v.is_finite() {
                continue;
            }
            points += 1;
            if points > MAX_POINTS {
                return Err(HistoryError::Shape(format!(
                    "more than {MAX_POINTS} points"
                )));
            }
            let at = (t * 1000.0).round() as i64 + 1 - step;
            series.points.push(TrendPoint {
                time: Some(ptime::from_unix_millis(at)),
                value: v,
                samples: 0,
                last_time: None,
            });
        }
        out.push(series);
    }
    Ok(out)
}

/// History's points (all before `to`) put in front of the local series with the same key; a
/// series only history knows is added.
fn splice(local: &mut TrendResponse, hist: Vec<TrendSeries>, to: i64) {
    let key = |s: &TrendSeries| -> Key { (s.node.clone(), s.gpu_index, s.gpu_uuid.clone()) };
    let mut by_key: BTreeMap<Key, TrendSeries> = hist.into_iter().map(|s| (key(&s), s)).collect();
    for s in &mut local.series {
        // Fleet and node series are keyed without the GPU.
        let k = key(s);
        if let Some(mut h) = by_key.remove(&k) {
            h.points.retain(|p| {
                p.time
                    .as_ref()
                    .is_some_and(|t| ptime::to_unix_millis(t) < to)
            });
            h.points.append(&mut s.points);
            s.points = h.points;
        }
    }
    for (_, mut h) in by_key {
        h.points.retain(|p| {
            p.time
                .as_ref()
                .is_some_and(|t| ptime::to_unix_millis(t) < to)
        });
        if !h.points.is_empty() {
            local.series.push(h);
        }
    }
    local.series_total = local.series_total.max(local.series.len() as u32);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> History {
        History::new(
            &HistoryConfig {
                url: "http://tsdb:8428/select/0/prometheus".into(),
                ca: None,
                token_file: None,
                timeout: Duration::from_secs(1),
            },
            Place {
                cluster: "c1".into(),
                shard: "s0".into(),
            },
        )
        .unwrap()
    }

    #[test]
    fn promql_per_aggregation_and_grouping() {
        let h = history();
        assert_eq!(h.base_path, "/select/0/prometheus");
        let req = |agg: Aggregation, group: GroupBy| TrendRequest {
            metric: "power_w".into(),
            aggregation: agg as i32,
            group_by: group as i32,
            nodes: vec!["gpu.node-1".into()],
            ..Default::default()
        };
        let sel = r#"{cluster="c1",shard="s0",node=~"gpu\\.node-1"}"#;
        assert_eq!(
            h.promql(&req(Aggregation::Avg, GroupBy::Fleet), 300)
                .unwrap(),
            format!(
                "sum (sum_over_time((gpulse_gpu_power_watts:avg_1m{sel} * gpulse_gpu_power_watts:count_1m{sel})[300s:1m])) / sum (sum_over_time(gpulse_gpu_power_watts:count_1m{sel}[300s]))"
            )
        );
        assert_eq!(
            h.promql(&req(Aggregation::Max, GroupBy::Node), 60).unwrap(),
            format!("max by (node) (max_over_time(gpulse_gpu_power_watts:max_1m{sel}[60s]))")
        );
        assert!(
            h.promql(&req(Aggregation::Min, GroupBy::Gpu), 60)
                .unwrap()
                .starts_with("min by (node, index, gpu_uuid) (min_over_time(")
        );
        let mut bad = req(Aggregation::Avg, GroupBy::Gpu);
        bad.metric = "nope".into();
        assert!(h.promql(&bad, 60).is_none());
    }

    #[test]
    fn matrices_become_step_start_points_spliced_before_local_ones() {
        let body = br#"{"status":"success","data":{"resultType":"matrix","result":[
            {"metric":{"node":"n1","index":"0","gpu_uuid":"GPU-a"},"values":[[119.999,"10"],[179.999,"20"],[239.999,"NaN"]]},
            {"metric":{"node":"n2","index":"1","gpu_uuid":"GPU-b"},"values":[[119.999,"5"]]}]}}"#;
        let hist = parse_matrix(body, 60_000).unwrap();
        let t = |s: &TrendSeries| -> Vec<(i64, f64)> {
            s.points
                .iter()
                .map(|p| (ptime::to_unix_millis(p.time.as_ref().unwrap()), p.value))
                .collect()
        };
        assert_eq!(t(&hist[0]), [(60_000, 10.0), (120_000, 20.0)]);
        let mut local = TrendResponse {
            series: vec![TrendSeries {
                node: "n1".into(),
                gpu_index: Some(0),
                gpu_uuid: "GPU-a".into(),
                points: vec![TrendPoint {
                    time: Some(ptime::from_unix_millis(180_000)),
                    value: 30.0,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            series_total: 1,
            ..Default::default()
        };
        splice(&mut local, hist, 180_000);
        assert_eq!(
            t(&local.series[0]),
            [(60_000, 10.0), (120_000, 20.0), (180_000, 30.0)]
        );
        assert_eq!(local.series.len(), 2, "a GPU only history knows is added");
        assert!(parse_matrix(b"{}", 60_000).is_err());
    }
}
