//! Window queries over 8 GPUs x 30 fields sampled every second for 24 h, next to a brute-force
//! scan of the same samples held as plain rows:
//! - `window_1h`: the last hour of all 30 fields per GPU at 30 s steps (120 points), from raw
//!   samples (compressed chunks + head);
//! - `trend_24h`: one field over 24 h at 15 min steps (96 points), from the 1 min rollup tier.
//!
//! Prints p50/p99 of each (300 runs) before Criterion's own measurement.
//! `cargo bench -p gpulse-collector --bench queries`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "support/gpu_data.rs"]
mod gpu_data;

use std::{hint::black_box, time::Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use gpu_data::FIELDS;
use gpulse_collector::{
    query,
    store::series::{SeriesBudgets, SeriesStore},
};
use gpulse_proto::v1::{Aggregation, GroupBy, TimeWindow, TrendRequest, TrendResponse};

const GPUS: u32 = 8;
const SECONDS: i64 = 86_400;
const T0: i64 = 1_764_000_000_000;

type Rows = Vec<(u32, i64, [f64; FIELDS])>;

struct Data {
    store: SeriesStore,
    rows: Rows,
    now_ns: i128,
}

fn build() -> Data {
    let rows = gpu_data::gpu_shaped(GPUS, SECONDS, T0);
    let mut store = SeriesStore::new(
        FIELDS,
        SeriesBudgets {
            raw: 512 << 20,
            minute: 128 << 20,
            hour: 16 << 20,
            max_gpus: 64,
        },
    );
    for (g, ts, row) in &rows {
        store.push("node-0", *g, "", *ts, row).unwrap();
    }
    let now_ns = i128::from(T0 + SECONDS * 1000) * 1_000_000;
    Data {
        store,
        rows,
        now_ns,
    }
}

fn req(since: &str, max_points: u32) -> TrendRequest {
    TrendRequest {
        metric: String::new(),
        window: Some(TimeWindow {
            since: since.into(),
            until: String::new(),
        }),
        max_points,
        aggregation: Aggregation::Avg as i32,
        group_by: GroupBy::Gpu as i32,
        max_series: 200,
        ..Default::default()
    }
}

fn store_window_1h(d: &Data) -> Vec<TrendResponse> {
    (0..FIELDS)
        .map(|f| query::trend_column(&d.store, f, "f", "u", 1.0, req("1h", 120), d.now_ns).unwrap())
        .collect()
}

fn store_trend_24h(d: &Data) -> TrendResponse {
    query::trend_column(&d.store, 0, "f", "u", 1.0, req("24h", 96), d.now_ns).unwrap()
}

/// Brute force: one pass over every stored row, keeping those in the window, averaging each
/// field per GPU per step.
fn brute(d: &Data, fields: &[usize], since_ms: i64, step_ms: i64) -> Vec<(f64, u32)> {
    let end = (d.now_ns / 1_000_000) as i64;
    let start = (end - since_ms).div_euclid(step_ms) * step_ms;
    let steps = ((end - start + step_ms - 1) / step_ms) as usize;
    let mut acc = vec![(0.0f64, 0u32); GPUS as usize * fields.len() * steps];
    for (g, ts, row) in &d.rows {
        if *ts < start || *ts >= end {
            continue;
        }
        let s = ((ts - start) / step_ms) as usize;
        for (k, f) in fields.iter().enumerate() {
            let a = &mut acc[(*g as usize * fields.len() + k) * steps + s];
            a.0 += row[*f];
            a.1 += 1;
        }
    }
    acc
}

fn percentiles(name: &str, mut f: impl FnMut()) {
    let mut h = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for _ in 0..300 {
        let t = Instant::now();
        f();
        h.record(t.elapsed().as_micros() as u64).unwrap();
    }
    println!(
        "{name:<34} p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0
    );
}

fn bench(c: &mut Criterion) {
    let t = Instant::now();
    let d = build();
    let all: Vec<usize> = (0..FIELDS).collect();
    println!(
        "\nbuilt {} rows x {FIELDS} fields in {:.1} s; raw {} B, 1m {} B, 1h {} B",
        d.rows.len(),
        t.elapsed().as_secs_f64(),
        d.store
            .tier_stats(gpulse_collector::store::series::Tier::Raw)
            .bytes,
        d.store
            .tier_stats(gpulse_collector::store::series::Tier::Minute)
            .bytes,
        d.store
            .tier_stats(gpulse_collector::store::series::Tier::Hour)
            .bytes,
    );
    // Same answers: the store's avg per GPU per step equals the brute-force one.
    let ours = store_window_1h(&d);
    let theirs = brute(&d, &all, 3_600_000, 30_000);
    let steps = theirs.len() / (GPUS as usize * FIELDS);
    for (f, r) in ours.iter().enumerate() {
        assert_eq!(r.step_seconds, 30);
        for s in &r.series {
            let g = s.gpu_index.unwrap() as usize;
            for (i, p) in s.points.iter().enumerate() {
                let (sum, n) = theirs[(g * FIELDS + f) * steps + i];
                assert_eq!(u64::from(n), p.samples);
                assert!((sum / f64::from(n) - p.value).abs() <= 1e-9 * p.value.abs().max(1.0));
            }
        }
    }
    let t24 = store_trend_24h(&d);
    assert_eq!(
        (t24.step_seconds, t24.source),
        (900, 2),
        "1m tier at 15 min steps"
    );
    println!("query latency, 300 runs each (same data, same process)");
    percentiles("window_1h store (30 fields, raw)", || {
        black_box(store_window_1h(&d));
    });
    percentiles("window_1h brute force", || {
        black_box(brute(&d, &all, 3_600_000, 30_000));
    });
    percentiles("trend_24h store (1 field, 1m tier)", || {
        black_box(store_trend_24h(&d));
    });
    percentiles("trend_24h brute force", || {
        black_box(brute(&d, &[0], 86_400_000, 900_000));
    });
    println!();
    let mut g = c.benchmark_group("queries");
    g.sample_size(30);
    g.bench_function("window_1h_store", |b| b.iter(|| store_window_1h(&d)));
    g.bench_function("window_1h_brute_force", |b| {
        b.iter(|| brute(&d, &all, 3_600_000, 30_000))
    });
    g.bench_function("trend_24h_store", |b| b.iter(|| store_trend_24h(&d)));
    g.bench_function("trend_24h_brute_force", |b| {
        b.iter(|| brute(&d, &[0], 86_400_000, 900_000))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
