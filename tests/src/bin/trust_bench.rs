//! What trust costs: the same collector binary twice in one run, plaintext without auth and
//! TLS with a token file, side by side and interleaved round by round (these machines are noisy):
//!
//! * ingest throughput: one agent-like stream pushes batches of XIDs and waits for each ack;
//! * XID -> subscriber latency: one XID at a time pushed over an authenticated Ingest stream and
//!   timed until a reader's Subscribe stream delivers it (both gRPC hops TLS in the TLS case).
//!
//! The kernel and agent parts of the path do not change with TLS, so this measures exactly what
//! TLS and authentication add. Usage: gpulse-trust-bench [--rounds 3] [--batches 200]
//! [--batch-events 500] [--latency-samples 500] [--fsync always|never] [--baseline BIN]. No
//! root needed.
//!
//! With `--baseline BIN` (a `gpulse-collector` of an earlier build) it compares builds instead:
//! that binary and this build's, both plaintext, in the same interleaved rounds, so a change's
//! cost to ingest shows as a ratio measured side by side.
#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is this program's output

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gpulse_e2e::*;
use gpulse_proto::{
    client::{AuthChannel, ClientOptions},
    v1::{
        self, Batch, EventFilter, EventKind, SubscribeRequest, ingest_client::IngestClient,
        subscribe_response::Msg, telemetry_client::TelemetryClient,
    },
};
use hdrhistogram::Histogram;

struct Opts {
    rounds: usize,
    batches: usize,
    batch_events: usize,
    latency_samples: usize,
    fsync: String,
    baseline: Option<std::path::PathBuf>,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        rounds: 3,
        batches: 200,
        batch_events: 500,
        latency_samples: 500,
        fsync: "never".into(),
        baseline: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => o.rounds = val()?.parse().context("--rounds")?,
            "--batches" => o.batches = val()?.parse().context("--batches")?,
            "--batch-events" => o.batch_events = val()?.parse().context("--batch-events")?,
            "--latency-samples" => {
                o.latency_samples = val()?.parse().context("--latency-samples")?
            }
            "--fsync" => o.fsync = val()?,
            "--baseline" => o.baseline = Some(val()?.into()),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if o.rounds == 0 || o.batches == 0 || o.batch_events == 0 || o.latency_samples == 0 {
        bail!("every count must be >= 1");
    }
    Ok(o)
}

const AGENT: &str = "bench-agent-token-000000001";
const READER: &str = "bench-reader-token-00000002";

/// One collector under test and how its clients reach it.
struct Target {
    name: &'static str,
    _proc: Proc,
    url: String,
    agent: ClientOptions,
    reader: ClientOptions,
}

fn start(
    dir: &Path,
    name: &'static str,
    tls: bool,
    fsync: &str,
    binary: Option<&Path>,
) -> anyhow::Result<Target> {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub)?;
    let (grpc, http) = (free_port(), free_port());
    let (g, h, d) = (
        format!("127.0.0.1:{grpc}"),
        format!("127.0.0.1:{http}"),
        sub.join("data").display().to_string(),
    );
    let mut args: Vec<String> = [
        "--grpc-listen",
        &g,
        "--http-listen",
        &h,
        "--data-dir",
        &d,
        "--fsync",
        fsync,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (mut agent, mut reader) = (ClientOptions::default(), ClientOptions::default());
    if tls {
        let pki::Pki { ca, cert, key } = pki::pki(&sub)?;
        let tokens = sub.join("tokens");
        std::fs::write(
            &tokens,
            format!("agent {AGENT} node=bench\nreader {READER}\n"),
        )?;
        for (flag, p) in [
            ("--tls-cert", &cert),
            ("--tls-key", &key),
            ("--auth-tokens", &tokens),
        ] {
            args.push(flag.into());
            args.push(p.display().to_string());
        }
        let (at, rt) = (sub.join("agent-token"), sub.join("reader-token"));
        std::fs::write(&at, AGENT)?;
        std::fs::write(&rt, READER)?;
        agent = ClientOptions {
            ca_file: Some(ca.clone()),
            token_file: Some(at),
            ..Default::default()
        };
        reader = ClientOptions {
            ca_file: Some(ca),
            token_file: Some(rt),
            ..Default::default()
        };
    }
    let log = sub.join("collector.log");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let proc = match binary {
        Some(b) => Proc::spawn_path(b, &args, &log)?,
        None => Proc::spawn("gpulse-collector", &argv, &log)?,
    };
    wait_serving(&log, Duration::from_secs(20))?;
    let scheme = if tls { "https" } else { "http" };
    Ok(Target {
        name,
        _proc: proc,
        url: format!("{scheme}://127.0.0.1:{grpc}"),
        agent,
        reader,
    })
}

async fn channel(url: &str, opts: &ClientOptions) -> anyhow::Result<AuthChannel> {
    let ch = opts.endpoint(url)?.tcp_nodelay(true).connect().await?;
    Ok(opts.credentials()?.wrap(ch))
}

fn xid(i: u64) -> v1::Event {
    v1::Event {
        kind: EventKind::Xid as i32,
        severity: v1::Severity::Error as i32,
        time: Some(gpulse_proto::time::now()),
        payload: Some(v1::event::Payload::Xid(v1::Xid {
            code: 13,
            pci: "0000:3b:00.0".into(),
            message: format!("Graphics Exception #{i}"),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// An Ingest stream as agent `bench/<id>`: a sender and the acks, hello answered.
struct Pusher {
    tx: tokio::sync::mpsc::Sender<Batch>,
    acks: tonic::Streaming<v1::Ack>,
    agent_id: String,
    seq: u64,
}

impl Pusher {
    async fn open(t: &Target, id: &str) -> anyhow::Result<Self> {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let agent_id = format!("bench/{id}");
        tx.send(Batch {
            agent_id: agent_id.clone(),
            node: "bench".into(),
            boot_id: "b".into(),
            ..Default::default()
        })
        .await?;
        let mut acks = IngestClient::new(channel(&t.url, &t.agent).await?)
            .push(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        acks.message().await?.context("no hello answer")?;
        Ok(Self {
            tx,
            acks,
            agent_id,
            seq: 1,
        })
    }

    async fn push(&mut self, events: Vec<v1::Event>) -> anyhow::Result<()> {
        let n = events.len() as u64;
        self.tx
            .send(Batch {
                agent_id: self.agent_id.clone(),
                node: "bench".into(),
                boot_id: "b".into(),
                first_seq: self.seq,
                events,
                delivered_through: 0,
            })
            .await?;
        self.seq += n;
        self.acks.message().await?.context("stream ended")?;
        Ok(())
    }
}

/// Events per second through one stream.
async fn throughput(t: &Target, round: usize, o: &Opts) -> anyhow::Result<f64> {
    let mut p = Pusher::open(t, &format!("tput-{round}")).await?;
    let batches: Vec<Vec<v1::Event>> = (0..o.batches)
        .map(|b| {
            (0..o.batch_events)
                .map(|i| xid((b * o.batch_events + i) as u64))
                .collect()
        })
        .collect();
    let started = Instant::now();
    for b in batches {
        p.push(b).await?;
    }
    Ok((o.batches * o.batch_events) as f64 / started.elapsed().as_secs_f64())
}

/// Push -> subscriber latency of single XIDs, into `hist` (microseconds).
async fn latency(
    t: &Target,
    round: usize,
    o: &Opts,
    hist: &mut Histogram<u64>,
) -> anyhow::Result<()> {
    let mut sub = TelemetryClient::new(channel(&t.url, &t.reader).await?)
        .subscribe(SubscribeRequest {
            filter: Some(EventFilter {
                kinds: vec![EventKind::Xid as i32],
                ..Default::default()
            }),
            after_cursor: None,
            resume_token: Default::default(),
        })
        .await?
        .into_inner();
    let mut p = Pusher::open(t, &format!("lat-{round}")).await?;
    for i in 0..o.latency_samples {
        let marker = format!("lat {round} {i}");
        let mut ev = xid(i as u64);
        if let Some(v1::event::Payload::Xid(x)) = &mut ev.payload {
            x.message = marker.clone();
        }
        let t0 = Instant::now();
        p.tx.send(Batch {
            agent_id: p.agent_id.clone(),
            node: "bench".into(),
            boot_id: "b".into(),
            first_seq: p.seq,
            events: vec![ev],
            delivered_through: 0,
        })
        .await?;
        p.seq += 1;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), sub.message())
                .await
                .context("no event within 10 s")??
                .context("subscription ended")?;
            if let Some(Msg::Event(e)) = m.msg
                && xid_of(&e).is_some_and(|x| x.message == marker)
            {
                break;
            }
        }
        hist.record(t0.elapsed().as_micros() as u64)?;
        p.acks.message().await?.context("stream ended")?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let o = parse_args()?;
    let dir = tempfile::tempdir()?;
    let targets = match &o.baseline {
        Some(b) => [
            start(dir.path(), "baseline", false, &o.fsync, Some(b))?,
            start(dir.path(), "current", false, &o.fsync, None)?,
        ],
        None => [
            start(dir.path(), "plaintext", false, &o.fsync, None)?,
            start(dir.path(), "tls+auth", true, &o.fsync, None)?,
        ],
    };
    let rt = runtime();
    let mut tput: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut hists: Vec<Histogram<u64>> = (0..targets.len())
        .map(|_| Histogram::new(3))
        .collect::<Result<_, _>>()?;
    for round in 0..o.rounds {
        // Alternate which goes first, so drift in the machine's load hits both alike.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        for &k in &order {
            let t = &targets[k];
            tput[k].push(rt.block_on(throughput(t, round, &o))?);
            rt.block_on(latency(t, round, &o, &mut hists[k]))?;
        }
    }
    println!(
        "{} rounds interleaved; throughput: {} batches x {} XIDs per round, one stream, ack per batch; \
         latency: {} single XIDs per round, push -> reader subscriber; --fsync {}",
        o.rounds, o.batches, o.batch_events, o.latency_samples, o.fsync
    );
    println!(
        "{:<10} {:>14} {:>10} {:>10} {:>10}",
        "mode", "events/s (med)", "p50 ms", "p99 ms", "max ms"
    );
    let mut med = Vec::new();
    for (k, t) in targets.iter().enumerate() {
        let mut v = tput[k].clone();
        v.sort_by(f64::total_cmp);
        let m = v[v.len() / 2];
        med.push(m);
        let h = &hists[k];
        println!(
            "{:<10} {:>14.0} {:>10.3} {:>10.3} {:>10.3}",
            t.name,
            m,
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
            h.max() as f64 / 1000.0
        );
    }
    let cost = 100.0 * (1.0 - med[1] / med[0]);
    let added =
        (hists[1].value_at_quantile(0.5) as f64 - hists[0].value_at_quantile(0.5) as f64) / 1000.0;
    println!(
        "{} vs {}: throughput {cost:+.1} % cost (ratio {:.3}), p50 latency {added:+.3} ms",
        targets[1].name,
        targets[0].name,
        med[1] / med[0]
    );
    Ok(())
}
