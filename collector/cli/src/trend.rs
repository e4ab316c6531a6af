//! `gpulse trend`: a GPU metric over a window, per GPU, node or fleet.
use std::io::{self, Write};

use clap::Args;
use gpulse_proto::{
    metric,
    names::ShortName,
    render,
    v1::{Aggregation, GroupBy, Tier, TimeWindow, TrendRequest, TrendResponse, TrendSeries},
};

use crate::{
    args::{CollectorArg, short},
    window_line,
};

#[derive(Args, Debug)]
pub struct TrendArgs {
    #[command(flatten)]
    pub collector: CollectorArg,
    /// Metric name (see --list-metrics).
    #[arg(long, required_unless_present = "list_metrics", value_parser = metric_name)]
    pub metric: Option<String>,
    /// Window start: a duration back from now (90s, 15m, 24h, 7d), now-<duration>, or RFC 3339.
    #[arg(long, default_value = "1h", value_parser = crate::args::since)]
    pub since: String,
    /// Window end: now, now-<duration> or RFC 3339.
    #[arg(long, default_value = "now", value_parser = crate::args::until)]
    pub until: String,
    /// Step in seconds (default: chosen from --max-points).
    #[arg(long, default_value_t = 0)]
    pub step: u32,
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max_points: u32,
    /// avg, min, max, p95 or last.
    #[arg(long, default_value = "avg", value_parser = short::<Aggregation>)]
    pub agg: Aggregation,
    /// gpu, node or fleet.
    #[arg(long, default_value = "gpu", value_parser = short::<GroupBy>)]
    pub group_by: GroupBy,
    /// Only these nodes (repeatable).
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// Only these GPUs: UUID or node/index (repeatable).
    #[arg(long = "gpu")]
    pub gpus: Vec<String>,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=200))]
    pub max_series: u32,
    /// Source tier: auto (by step and coverage), raw, 1m or 1h.
    #[arg(long, default_value = "auto", value_parser = tier)]
    pub tier: Tier,
    /// List the metrics the collector keeps and exit.
    #[arg(long)]
    pub list_metrics: bool,
    #[arg(long)]
    pub json: bool,
}

/// A metric of the catalog (`--list-metrics` prints them).
fn metric_name(s: &str) -> Result<String, String> {
    match metric::by_name(s) {
        Some(_) => Ok(s.to_string()),
        None => Err(format!(
            "unknown metric; one of: {}",
            metric::names().join(", ")
        )),
    }
}

/// `auto` (the collector chooses) or a tier's short name.
fn tier(s: &str) -> Result<Tier, String> {
    if s == "auto" {
        Ok(Tier::Unspecified)
    } else {
        short::<Tier>(s).map_err(|e| format!("{e} or auto"))
    }
}

pub fn render_metrics() -> String {
    let width = metric::METRICS
        .iter()
        .map(|m| m.name.len())
        .max()
        .unwrap_or(0);
    metric::METRICS
        .iter()
        .map(|m| format!("{:<width$} {:<10} {}\n", m.name, m.unit, m.help))
        .collect()
}

/// Eight-level bar for one value between lo and hi.
fn spark(v: f64, lo: f64, hi: f64) -> char {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if !v.is_finite() || hi <= lo {
        return BARS[0];
    }
    let i = ((v - lo) / (hi - lo) * 7.0).round().clamp(0.0, 7.0) as usize;
    BARS[i]
}

fn series_name(s: &TrendSeries) -> String {
    if s.other {
        format!("other ({} series)", s.merged_series)
    } else if s.node.is_empty() {
        "fleet".to_string()
    } else if let Some(i) = s.gpu_index {
        format!("{}/{}", s.node, i)
    } else {
        s.node.clone()
    }
}

pub fn render_text(r: &TrendResponse) -> String {
    let mut out = format!(
        "{} ({}), {} per {}, step {}s from {}{}; {}\n",
        r.metric,
        r.unit,
        Aggregation::name_of(r.aggregation),
        GroupBy::name_of(r.group_by),
        r.step_seconds,
        Tier::name_of(r.source),
        if r.approximate { " (approximate)" } else { "" },
        window_line(r.window.as_ref())
    );
    if r.series.is_empty() {
        out.push_str("no data\n");
    }
    for s in &r.series {
        let st = s.stats.unwrap_or_default();
        let line: String = s
            .points
            .iter()
            .map(|p| spark(p.value, st.min, st.max))
            .collect();
        out.push_str(&format!(
            "{:<24} min {:.1} avg {:.1} max {:.1} last {:.1}  {line}\n",
            series_name(s),
            st.min,
            st.avg,
            st.max,
            st.last
        ));
    }
    out
}

pub async fn run(a: TrendArgs) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    if a.list_metrics {
        write!(out, "{}", render_metrics())?;
        return Ok(());
    }
    let mut client = a.collector.connect().await?;
    let r = client
        .trend(TrendRequest {
            metric: a.metric.clone().unwrap_or_default(),
            window: Some(TimeWindow {
                since: a.since.clone(),
                until: a.until.clone(),
            }),
            step_seconds: a.step,
            max_points: a.max_points,
            aggregation: a.agg as i32,
            group_by: a.group_by as i32,
            nodes: a.nodes.clone(),
            gpus: a.gpus.clone(),
            max_series: a.max_series,
            tier: a.tier as i32,
        })
        .await?
        .into_inner();
    if a.json {
        writeln!(out, "{}", render::trend(&r))?;
        return Ok(());
    }
    write!(out, "{}", render_text(&r))?;
    if r.partial {
        eprintln!("gpulse: {}", render::partial_note(&r.upstreams));
    }
    for h in &r.hints {
        eprintln!("gpulse: note: {h}");
    }
    Ok(())
}
