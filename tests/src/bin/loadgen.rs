//! `gpulse-loadgen`: many simulated GPU nodes speaking `Ingest` to a collector (or a gateway),
//! for capacity tests and benchmarks (`gpulse_e2e::loadgen`).
//!
//! Usage: gpulse-loadgen --collector URL [--nodes 100] [--gpus 8] [--period-ms 1000]
//!        [--seconds 60] [--xids-per-node-hour 2] [--processes-per-node-hour 60]
//!        [--prefix sim] [--ca-file PEM] [--token-file FILE]
#![allow(clippy::print_stdout)] // the report is this program's output

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use gpulse_e2e::loadgen::{self, Load};
use gpulse_proto::client::ClientOptions;

fn main() -> anyhow::Result<()> {
    let mut load = Load::default();
    let mut url = String::from("http://127.0.0.1:7700");
    let mut opts = ClientOptions::default();
    let mut seconds = 60u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--collector" => url = val()?,
            "--nodes" => load.nodes = val()?.parse().context("--nodes")?,
            "--gpus" => load.gpus = val()?.parse().context("--gpus")?,
            "--period-ms" => {
                load.period = Duration::from_millis(val()?.parse().context("--period-ms")?)
            }
            "--seconds" => seconds = val()?.parse().context("--seconds")?,
            "--xids-per-node-hour" => {
                load.xids_per_node_hour = val()?.parse().context("--xids-per-node-hour")?
            }
            "--processes-per-node-hour" => {
                load.processes_per_node_hour =
                    val()?.parse().context("--processes-per-node-hour")?
            }
            "--prefix" => load.prefix = val()?,
            "--ca-file" => opts.ca_file = Some(val()?.into()),
            "--token-file" => opts.token_file = Some(val()?.into()),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if load.nodes == 0 || load.gpus == 0 || load.period.is_zero() {
        bail!("--nodes, --gpus and --period-ms must be >= 1");
    }
    let started = Instant::now();
    let counts = gpulse_e2e::runtime().block_on(loadgen::run(
        &url,
        &opts,
        &load,
        Duration::from_secs(seconds),
    ))?;
    let secs = started.elapsed().as_secs_f64();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let batches = get(&counts.acked_batches).max(1);
    println!(
        "{} nodes x {} GPUs every {} ms for {secs:.1} s: sent {} events, acked {} ({:.0}/s), XIDs {}, \
         mean ack {:.2} ms, failed streams {}",
        load.nodes,
        load.gpus,
        load.period.as_millis(),
        get(&counts.sent),
        get(&counts.acked),
        get(&counts.acked) as f64 / secs,
        get(&counts.xids),
        get(&counts.ack_us) as f64 / batches as f64 / 1000.0,
        get(&counts.errors),
    );
    Ok(())
}
