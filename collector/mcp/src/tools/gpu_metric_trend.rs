//! `gpu_metric_trend`: a GPU metric over a window, from the collector's Trend.
use gpulse_proto::{
    names::ShortName,
    v1::{self, Aggregation, GroupBy, Tier, TrendRequest},
};
use rmcp::{Json, handler::server::wrapper::Parameters, tool, tool_router};

use super::{arg_name, fit, limit, opt, tw, window_of, wire};
use crate::{
    GpulseMcp,
    types::{MetricTrend, Stats, TrendArgs, TrendSeriesOut},
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
        let max_points =
            limit(a.max_points, 120, 1000).map_err(|e| e.replace("limit", "max_points"))?;
        let max_series =
            limit(a.max_series, 20, 200).map_err(|e| e.replace("limit", "max_series"))?;
        let (w, defaulted) = tw(&a.since, &a.until, "1h");
        let r = self
            .source
            .trend(TrendRequest {
                metric: arg_name(a.metric),
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
        };
        if let Some(reason) = fit(&mut out, |o| o.series.len(), |o, n| o.series.truncate(n)) {
            out.truncated = true;
            out.hints
                .push(format!("{reason}; lower max_points or max_series"));
        }
        Ok(Json(out))
    }
}
