//! `gpu_metric_trend`: a GPU metric over a window, from the collector's Trend.
use gpulse_proto::{
    names::ShortName,
    v1::{self, Aggregation, GroupBy, Tier, TrendRequest},
};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{arg_name, fit, limit, opt, stamp, tw, window_of, wire};
use crate::{
    GpulseMcp,
    types::Clusters,
    types::{MetricTrend, Sources, Stats, TrendArgs, TrendSeriesOut},
};

fn series_out(s: &v1::TrendSeries, include_points: bool) -> TrendSeriesOut {
    let num = |v: f64| v.is_finite().then_some(v);
    let st = s.stats.unwrap_or_default();
    TrendSeriesOut {
        node: opt(&s.node),
        gpu_uuid: opt(&s.gpu_uuid),
        gpu_index: s.gpu_index,
        other: s.other,
        merged_series: s.merged_series,
        stats: Stats {
            min: num(st.min),
            max: num(st.max),
            avg: num(st.avg),
            p95: num(st.p95),
            last: num(st.last),
            samples: st.samples,
        },
        points: if include_points {
            s.points
                .iter()
                .filter(|p| p.value.is_finite())
                .map(|p| (p.time.map_or(0, |t| t.seconds), p.value))
                .collect()
        } else {
            Vec::new()
        },
    }
}

#[tool_router(router = trend_router, vis = "pub(crate)")]
impl GpulseMcp {
    /// A GPU metric over a window per fleet, node or GPU, downsampled to at most max_points per
    /// series (the collector picks raw samples or a 1 min / 1 h rollup by the step), with
    /// min/max/avg/p95/last per series.
    #[tool(name = "gpu_metric_trend", title = "GPU metric trend")]
    async fn gpu_metric_trend(
        &self,
        Parameters(a): Parameters<TrendArgs>,
    ) -> Result<Json<MetricTrend>, String> {
        let src = self.source.scoped(&a.clusters()).await?;
        let max_points =
            limit(a.max_points, 120, 1000).map_err(|e| e.replace("limit", "max_points"))?;
        let max_series =
            limit(a.max_series, 20, 200).map_err(|e| e.replace("limit", "max_series"))?;
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let r = src
            .trend(TrendRequest {
                metric: a.metric.name().to_string(),
                window: Some(w),
                step_seconds: 0,
                max_points,
                aggregation: wire::<Aggregation>(a.aggregate) as i32,
                group_by: wire::<GroupBy>(a.group_by) as i32,
                nodes: a.nodes.clone(),
                gpus: a.gpus.clone(),
                max_series,
                tier: 0,
            })
            .await?;
        let include = a.include_points.unwrap_or(true);
        let series: Vec<TrendSeriesOut> = r.series.iter().map(|s| series_out(s, include)).collect();
        let mut hints = r.hints.clone();
        if series.is_empty() {
            hints.push("no samples for this selection: check list_nodes (GPUs report once NVML is available)".to_string());
        }
        let source = match Tier::try_from(r.source).unwrap_or_default() {
            Tier::Unspecified => Tier::Raw,
            t => t,
        };
        let mut out = MetricTrend {
            metric: r.metric.clone(),
            unit: r.unit.clone(),
            window: window_of(&r.window, defaulted),
            step_seconds: r.step_seconds,
            source: source.short_name().to_string(),
            aggregate: arg_name(a.aggregate),
            approximate: r.approximate,
            series_aggregated: r.series.iter().any(|s| s.other),
            series_total: r.series_total,
            series,
            truncated: false,
            hints,
            sources: Default::default(),
        };
        if let Some(reason) = fit(&mut out, |o| o.series.len(), |o, n| o.series.truncate(n)) {
            out.truncated = true;
            out.hints
                .push(format!("{reason}; lower max_points or max_series"));
        }
        stamp(
            Sources::of(&r.upstreams, r.partial),
            &mut out.sources,
            &mut out.hints,
        );
        Ok(Json(out))
    }
}

#[cfg(test)]
mod tests {
    use gpulse_proto::v1::{SeriesStats, TrendPoint, TrendResponse, TrendSeries};
    use serde_json::json;

    use super::*;
    use crate::tools::testing::{Answers, Session, at, window};

    fn answer() -> TrendResponse {
        TrendResponse {
            metric: "power_w".into(),
            unit: "watts".into(),
            window: window(),
            step_seconds: 60,
            source: Tier::Tier1m as i32,
            series: vec![TrendSeries {
                node: "gpu-1".into(),
                gpu_index: Some(0),
                points: vec![
                    TrendPoint {
                        time: at(60),
                        value: 300.0,
                        samples: 60,
                        last_time: Default::default(),
                    },
                    TrendPoint {
                        time: at(120),
                        value: f64::NAN,
                        samples: 0,
                        last_time: Default::default(),
                    },
                ],
                stats: Some(SeriesStats {
                    min: 300.0,
                    max: 300.0,
                    avg: 300.0,
                    p95: f64::NAN,
                    last: 300.0,
                    samples: 60,
                    last_time: Default::default(),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn maps_arguments_and_drops_empty_points() {
        let s = Session::new(Answers {
            trend: answer(),
            ..Default::default()
        })
        .await;
        let v = s
            .ok(
                "gpu_metric_trend",
                json!({"metric": "power_w", "aggregate": "p95", "group_by": "gpu", "max_points": 10}),
            )
            .await;
        let asked = &s.fake.asked("Trend")[0];
        for want in [
            "metric: \"power_w\"",
            "aggregation: P95",
            "group_by: Gpu",
            "max_points: 10",
        ] {
            assert!(asked.contains(want), "{want} in {asked}");
        }
        assert_eq!(v["source"], "1m");
        assert_eq!(v["aggregate"], "p95");
        assert_eq!(v["series"][0]["points"], json!([[1_764_000_060, 300.0]]));
        assert!(
            v["series"][0]["stats"]["p95"].is_null(),
            "NaN is absent, not a number"
        );
        let v = s
            .ok(
                "gpu_metric_trend",
                json!({"metric": "power_w", "include_points": false}),
            )
            .await;
        assert_eq!(v["series"][0]["points"], json!([]));
    }

    #[tokio::test]
    async fn refuses_unknown_metrics_and_ranges() {
        let s = Session::new(Answers::default()).await;
        let text = s
            .refused("gpu_metric_trend", json!({"metric": "fan_speed"}))
            .await;
        assert!(text.contains("unknown metric \"fan_speed\""), "{text}");
        assert!(
            text.contains("power_w"),
            "the catalog's names are offered: {text}"
        );
        let text = s
            .refused(
                "gpu_metric_trend",
                json!({"metric": "power_w", "max_series": 0}),
            )
            .await;
        assert!(
            text.contains("max_series") && text.contains("1-200"),
            "{text}"
        );
        let v = s.ok("gpu_metric_trend", json!({"metric": "power_w"})).await;
        assert!(v["hints"].to_string().contains("no samples"));
        assert_eq!(v["source"], "raw", "an unspecified tier is raw");
    }
}
