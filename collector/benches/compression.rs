//! Bytes per stored sample: gpulse's chunk codec vs the `tsz` Gorilla encoder on the same
//! samples (GPU-shaped, constant, random), and encode speed for both.
//!
//! `cargo bench -p gpulse-collector --bench compression`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

#[path = "support/gpu_data.rs"]
mod gpu_data;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gpu_data::FIELDS;
use gpulse_collector::store::series::{CHUNK_ROWS, SeriesBudgets, SeriesStore};
use tsz::{DataPoint, Encode, StdEncoder, stream::BufferedWriter};

type Rows = Vec<(u32, i64, [f64; FIELDS])>;

const GPUS: u32 = 8;
const SECONDS: i64 = 7200;
const T0: i64 = 1_764_000_000_000;

fn store_all(rows: &Rows) -> SeriesStore {
    let mut s = SeriesStore::new(
        FIELDS,
        SeriesBudgets {
            raw: 1 << 30,
            ..Default::default()
        },
    );
    for (g, ts, row) in rows {
        s.push("node-0", *g, "", *ts, row).unwrap();
    }
    s
}

/// (encoded bytes, bytes with chunk bookkeeping, samples) over sealed chunks.
fn ours(rows: &Rows) -> (usize, usize, usize) {
    let s = store_all(rows);
    let (mut data, mut total, mut samples) = (0, 0, 0);
    for g in s.gpus() {
        for c in &g.chunks {
            data += c.data.len();
            total += c.bytes();
            samples += c.rows as usize * FIELDS;
        }
    }
    (data, total, samples)
}

/// Gorilla via `tsz`: one stream per GPU field, each with its own timestamps, cut into the same
/// 120-row blocks (so neither side gets longer runs). `div` = 1 keeps ms, 1000 rounds to s.
fn gorilla(rows: &Rows, div: i64) -> (usize, usize) {
    let mut per: Vec<Vec<Vec<(u64, f64)>>> = vec![vec![Vec::new(); FIELDS]; GPUS as usize];
    for (g, ts, row) in rows {
        for (f, v) in row.iter().enumerate() {
            per[*g as usize][f].push(((*ts / div) as u64, *v));
        }
    }
    let (mut bytes, mut samples) = (0, 0);
    for gpu in &per {
        for series in gpu {
            for block in series.chunks(CHUNK_ROWS) {
                if block.len() < CHUNK_ROWS {
                    continue;
                }
                let mut e = StdEncoder::new(block[0].0, BufferedWriter::new());
                for (t, v) in block {
                    e.encode(DataPoint::new(*t, *v));
                }
                bytes += e.close().len();
                samples += block.len();
            }
        }
    }
    (bytes, samples)
}

fn report() {
    println!(
        "\nbytes per stored sample, {GPUS} GPUs x {FIELDS} fields x {SECONDS} s at 1 s (same samples for every encoder)"
    );
    println!(
        "{:<12} {:>14} {:>20} {:>16} {:>16}",
        "data", "gpulse codec", "gpulse + bookkeeping", "tsz Gorilla (ms)", "tsz Gorilla (s)"
    );
    for (name, rows) in [
        ("gpu-shaped", gpu_data::gpu_shaped(GPUS, SECONDS, T0)),
        ("constant", gpu_data::constant(GPUS, SECONDS, T0)),
        ("random", gpu_data::random(GPUS, SECONDS, T0)),
    ] {
        let (data, total, n) = ours(&rows);
        let (gb, gn) = gorilla(&rows, 1);
        let (gs, gsn) = gorilla(&rows, 1000);
        println!(
            "{name:<12} {:>14.3} {:>20.3} {:>16.3} {:>16.3}",
            data as f64 / n as f64,
            total as f64 / n as f64,
            gb as f64 / gn as f64,
            gs as f64 / gsn as f64
        );
    }
    println!();
}

fn bench(c: &mut Criterion) {
    report();
    let rows = gpu_data::gpu_shaped(GPUS, 1200, T0);
    let samples = rows.len() * FIELDS;
    let mut g = c.benchmark_group("encode_gpu_shaped");
    g.throughput(Throughput::Elements(samples as u64));
    g.sample_size(20);
    g.bench_function("gpulse_store_push_and_seal", |b| {
        b.iter_batched(|| (), |_| store_all(&rows), BatchSize::PerIteration)
    });
    g.bench_function("tsz_gorilla", |b| b.iter(|| gorilla(&rows, 1)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
