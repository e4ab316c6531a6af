//! Long-term history in an existing TSDB: every minute the collector pushes the 1-minute rollups
//! of every GPU metric (avg, min, max and sample count per GPU) and its XID/SXid counters with
//! Prometheus remote-write 1.0 to `--remote-write-url` (VictoriaMetrics, Mimir, Thanos Receive,
//! Prometheus with its receiver), labelled with `cluster` and `shard`.
//!
//! The exporter (`export`) turns each completed minute into requests and puts them in a queue
//! on disk (`queue.rs`) before it moves its cursor on, so nothing it has taken from the store is
//! lost to a crash; the sender (`send`) posts the oldest request until the receiver takes it,
//! backing off on 429/5xx and connection errors. The queue is bounded: past `--remote-write-queue-
//! bytes` the oldest requests are dropped and counted. Figures: `gpulse_remote_write_*`.
pub mod post;
pub mod queue;
pub mod wire;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use gpulse_proto::metric::METRICS;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::{
    shutdown::Shutdown,
    state::StoreHandle,
    store::series::{SeriesStore, Tier},
    telemetry::Metrics,
};
use queue::DiskQueue;
use wire::{Sample, TimeSeries, WriteRequest};

const MINUTE_MS: i64 = 60_000;
/// Series per request (receivers take a few thousand comfortably).
const SERIES_PER_REQUEST: usize = 2000;
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct RemoteWriteConfig {
    pub url: String,
    /// CA bundle for an https URL (the system roots otherwise).
    pub ca: Option<PathBuf>,
    /// Bearer token file, re-read for every request.
    pub token_file: Option<PathBuf>,
    /// How often completed minutes and the counters are exported.
    pub interval: Duration,
    /// A minute is exported once it ended this long ago (late samples still land in it).
    pub delay: Duration,
    pub queue_bytes: u64,
    /// Per request.
    pub timeout: Duration,
    /// On the first start, how far back the 1-minute tier is exported.
    pub backfill: Duration,
}

impl RemoteWriteConfig {
    pub fn new(url: String) -> Self {
        Self {
            url,
            ca: None,
            token_file: None,
            interval: Duration::from_secs(15),
            delay: Duration::from_secs(30),
            queue_bytes: 256 << 20,
            timeout: Duration::from_secs(30),
            backfill: Duration::from_secs(6 * 3600),
        }
    }
}

/// The labels every series carries besides its own.
#[derive(Clone, Debug, Default)]
pub struct Place {
    pub cluster: String,
    pub shard: String,
}

/// Per GPU (node, UUID, index): the start of the first minute not yet exported.
pub type Cursors = HashMap<(String, String, u32), i64>;

/// The rollups of each GPU's completed minutes not yet exported: for each metric, four series
/// (`<gauge>:avg_1m`, `:min_1m`, `:max_1m`, `:count_1m`), values in the gauge's unit, timestamped
/// at the start of their minute. A GPU's minute is complete once a later sample arrived (a
/// GPU's samples arrive in order) or once the minute ended `delay_ms` ago by the wall clock.
/// Moves each GPU's cursor past what it returns; GPUs the store no longer has are forgotten.
pub fn rollups(
    series: &SeriesStore,
    cursors: &mut Cursors,
    first: i64,
    now_ms: i64,
    delay_ms: i64,
    place: &Place,
) -> Vec<TimeSeries> {
    let mut out = Vec::new();
    let by_clock = (now_ms - delay_ms).div_euclid(MINUTE_MS) * MINUTE_MS;
    let mut seen = Cursors::with_capacity(series.gpus().len());
    for g in series.gpus() {
        let key = (g.node.to_string(), g.uuid.clone(), g.index);
        let from = cursors.get(&key).copied().unwrap_or(first);
        let to = by_clock.max(g.last_ms.div_euclid(MINUTE_MS) * MINUTE_MS);
        if to <= from {
            seen.insert(key, from);
            continue;
        }
        let index = g.index.to_string();
        for (m, def) in METRICS.iter().enumerate() {
            let labels = [
                ("node", &*g.node),
                ("gpu_uuid", g.uuid.as_str()),
                ("index", index.as_str()),
                ("cluster", place.cluster.as_str()),
                ("shard", place.shard.as_str()),
            ];
            let mut four = ["avg_1m", "min_1m", "max_1m", "count_1m"]
                .map(|stat| wire::series(&format!("{}:{stat}", def.prom), &labels));
            series.buckets(g, Tier::Minute, m, from, to, |start, a| {
                let n = f64::from(a.count);
                for (s, v) in four.iter_mut().zip([
                    a.sum / n * def.scale,
                    a.min * def.scale,
                    a.max * def.scale,
                    n,
                ]) {
                    s.samples.push(Sample {
                        value: v,
                        timestamp: start,
                    });
                }
            });
            out.extend(four.into_iter().filter(|s| !s.samples.is_empty()));
        }
        seen.insert(key, to);
    }
    *cursors = seen;
    out
}

/// The XID and SXid counters as they stand, timestamped now.
pub fn counters(metrics: &Metrics, place: &Place, now_ms: i64) -> Vec<TimeSeries> {
    let mut out = Vec::new();
    for fam in metrics.registry.gather() {
        if !matches!(
            fam.name(),
            "gpulse_xid_events_total" | "gpulse_sxid_events_total"
        ) {
            continue;
        }
        for m in fam.get_metric() {
            let mut labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            labels.push(("cluster", place.cluster.as_str()));
            labels.push(("shard", place.shard.as_str()));
            let mut s = wire::series(fam.name(), &labels);
            s.samples.push(Sample {
                value: m.get_counter().get_value(),
                timestamp: now_ms,
            });
            out.push(s);
        }
    }
    out
}

struct Shared {
    queue: Mutex<DiskQueue>,
    wake: Notify,
    metrics: Metrics,
}

/// Starts the exporter and the sender; both end when `stop` fires.
pub fn start(
    cfg: RemoteWriteConfig,
    data_dir: &Path,
    place: Place,
    store: StoreHandle,
    metrics: Metrics,
    stop: Shutdown,
) -> anyhow::Result<()> {
    let dir = data_dir.join("remote-write");
    let queue = DiskQueue::open(&dir, cfg.queue_bytes)?;
    let client = post::Client::new(
        &cfg.url,
        cfg.ca.as_ref(),
        cfg.token_file.clone(),
        cfg.timeout,
    )?;
    for r in ["sent", "queue_full", "rejected"] {
        metrics.remote_write_samples.with_label_values(&[r]);
    }
    metrics.remote_write_queue_bytes.set(queue.bytes() as i64);
    info!(url = %cfg.url, queued_requests = queue.len(), "remote write on");
    let shared = Arc::new(Shared {
        queue: Mutex::new(queue),
        wake: Notify::new(),
        metrics,
    });
    let cursors = CursorFile {
        path: dir.join("cursors"),
    };
    tokio::spawn(export(
        cfg.clone(),
        cursors,
        place,
        store,
        shared.clone(),
        stop.clone(),
    ));
    tokio::spawn(send(client, shared, stop));
    Ok(())
}

/// Where the export stands, per GPU, on disk: one `<ms> <index> <node> <uuid>` line each
/// (node names and UUIDs have no spaces), written whole or not at all.
struct CursorFile {
    path: PathBuf,
}

impl CursorFile {
    fn load(&self) -> Cursors {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return Cursors::new();
        };
        text.lines()
            .filter_map(|l| {
                let mut f = l.splitn(4, ' ');
                let ms = f.next()?.parse().ok()?;
                let index = f.next()?.parse().ok()?;
                let node = f.next()?.to_string();
                let uuid = f.next()?.to_string();
                Some(((node, uuid, index), ms))
            })
            .collect()
    }

    fn save(&self, c: &Cursors) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for ((node, uuid, index), ms) in c {
            writeln!(f, "{ms} {index} {node} {uuid}")?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

fn now_ms() -> i64 {
    gpulse_proto::time::to_unix_millis(&gpulse_proto::time::now())
}

async fn export(
    cfg: RemoteWriteConfig,
    file: CursorFile,
    place: Place,
    store: StoreHandle,
    shared: Arc<Shared>,
    mut stop: Shutdown,
) {
    let mut cursors = file.load();
    // A GPU first seen now is exported from this far back (the 1-minute tier's history).
    let first = now_ms() - cfg.backfill.as_millis() as i64;
    let delay = cfg.delay.as_millis() as i64;
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.wait() => return,
        }
        let now = now_ms();
        let (p, before) = (place.clone(), cursors.clone());
        let (mut series, moved) = match store
            .read_series("RemoteWrite", move |s| {
                let mut c = before;
                let r = rollups(s, &mut c, first, now, delay, &p);
                (r, c)
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "remote write: the store did not answer; retrying");
                continue;
            }
        };
        let exported = !series.is_empty();
        series.extend(counters(&shared.metrics, &place, now));
        if let Err(e) = enqueue(&shared, series).await {
            // The cursors stay: the same minutes are exported at the next tick.
            warn!(error = %e, "remote write: queueing failed; retrying");
            continue;
        }
        if exported || moved.len() != cursors.len() {
            cursors = moved;
            if let Err(e) = file.save(&cursors) {
                warn!(error = %e, "remote write: saving the export cursors failed");
            }
            if let Some(low) = cursors.values().min() {
                shared
                    .metrics
                    .remote_write_exported_until
                    .set(low.div_euclid(1000));
            }
        } else {
            cursors = moved;
        }
        shared.wake.notify_one();
    }
}

/// Puts `series` in the queue as requests of at most `SERIES_PER_REQUEST` series.
async fn enqueue(shared: &Arc<Shared>, series: Vec<TimeSeries>) -> anyhow::Result<()> {
    for chunk in series.chunks(SERIES_PER_REQUEST) {
        let samples: u64 = chunk.iter().map(|s| s.samples.len() as u64).sum();
        let body = wire::encode(&WriteRequest {
            timeseries: chunk.to_vec(),
        })?;
        let shared = shared.clone();
        let dropped = tokio::task::spawn_blocking(move || {
            let mut q = shared
                .queue
                .lock()
                .map_err(|_| anyhow::anyhow!("queue lock poisoned"))?;
            let d = q.push(&body, samples)?;
            shared
                .metrics
                .remote_write_queue_bytes
                .set(q.bytes() as i64);
            if d.samples > 0 {
                shared
                    .metrics
                    .remote_write_samples
                    .with_label_values(&["queue_full"])
                    .inc_by(d.samples);
                warn!(
                    requests = d.requests,
                    samples = d.samples,
                    "remote write queue full: dropped the oldest requests"
                );
            }
            anyhow::Ok(())
        })
        .await?;
        dropped?;
    }
    Ok(())
}

async fn send(mut client: post::Client, shared: Arc<Shared>, mut stop: Shutdown) {
    let mut backoff = BACKOFF_START;
    loop {
        if stop.is_triggered() {
            return;
        }
        let s = shared.clone();
        let next = tokio::task::spawn_blocking(move || {
            s.queue
                .lock()
                .map_err(|_| "queue lock poisoned".to_string())?
                .peek()
                .map_err(|e| e.to_string())
        })
        .await;
        let (body, samples) = match next {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => {
                tokio::select! {
                    () = shared.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = stop.wait() => return,
                }
                continue;
            }
            Ok(Err(e)) => {
                warn!(error = %e, "remote write: reading the queue failed; dropping its oldest request");
                drop_oldest(&shared, "rejected").await;
                continue;
            }
            Err(e) => {
                warn!(error = %e, "remote write: reading the queue failed");
                continue;
            }
        };
        let headers = [
            ("content-type", "application/x-protobuf"),
            ("content-encoding", "snappy"),
            ("x-prometheus-remote-write-version", "0.1.0"),
        ];
        let outcome = tokio::select! {
            r = client.send(http::Method::POST, None, &headers, Bytes::from(body)) => r,
            () = stop.wait() => return,
        };
        let m = &shared.metrics;
        let wait = match outcome {
            Ok(a) if (200..300).contains(&a.status) => {
                m.remote_write_requests.with_label_values(&["2xx"]).inc();
                m.remote_write_samples
                    .with_label_values(&["sent"])
                    .inc_by(samples);
                m.remote_write_last_success.set(now_ms().div_euclid(1000));
                drop_oldest(&shared, "").await;
                backoff = BACKOFF_START;
                None
            }
            Ok(a) if a.status == 429 || a.status >= 500 => {
                m.remote_write_requests
                    .with_label_values(&[status_class(a.status)])
                    .inc();
                warn!(
                    status = a.status,
                    "remote write: the receiver is busy or failing; retrying"
                );
                Some(a.retry_after.unwrap_or(backoff).min(BACKOFF_MAX))
            }
            Ok(a) => {
                // Retrying a request the receiver refuses will not help (a bad label, a limit).
                m.remote_write_requests.with_label_values(&["4xx"]).inc();
                warn!(status = a.status, answer = %String::from_utf8_lossy(&a.body[..a.body.len().min(300)]), samples, "remote write: request refused; dropped");
                drop_oldest(&shared, "rejected").await;
                None
            }
            Err(e) => {
                m.remote_write_requests.with_label_values(&["error"]).inc();
                warn!(error = %e, "remote write: receiver unreachable; retrying");
                Some(backoff)
            }
        };
        if let Some(w) = wait {
            backoff = (backoff * 2).min(BACKOFF_MAX);
            tokio::select! {
                _ = tokio::time::sleep(w) => {}
                () = stop.wait() => return,
            }
        }
    }
}

fn status_class(s: u16) -> &'static str {
    match s {
        429 => "429",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// Removes the oldest queued request; `reason` non-empty counts its samples as dropped.
async fn drop_oldest(shared: &Arc<Shared>, reason: &'static str) {
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(mut q) = s.queue.lock() {
            match q.pop() {
                Ok((_, samples)) => {
                    if !reason.is_empty() {
                        s.metrics
                            .remote_write_samples
                            .with_label_values(&[reason])
                            .inc_by(samples);
                    }
                }
                Err(e) => warn!(error = %e, "remote write: removing a queued request failed"),
            }
            s.metrics.remote_write_queue_bytes.set(q.bytes() as i64);
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_through_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = CursorFile {
            path: dir.path().join("cursors"),
        };
        assert!(f.load().is_empty());
        let mut c = Cursors::new();
        c.insert(("node-1".into(), "GPU-a".into(), 0), 60_000);
        c.insert(("node-2".into(), "GPU-b b".into(), 7), -120_000);
        f.save(&c).unwrap();
        assert_eq!(f.load(), c);
        std::fs::write(&f.path, "garbage\n5 1 n GPU\n").unwrap();
        assert_eq!(f.load().len(), 1, "a bad line is skipped, the rest kept");
    }
}
