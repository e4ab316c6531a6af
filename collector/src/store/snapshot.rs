//! Snapshots in `--data-dir`: the sample series (`series.snap`, written periodically so history
//! outlives the write-ahead log) and the event store (`events.snap`, written when old events
//! would otherwise pin too much log). Each records the last cursor it covers; at start-up the
//! log replays only what comes after it.
//!
//! Format: 8-byte magic, little-endian fields, CRC-32 of everything before it as the last 4
//! bytes. Files are written to a temporary name (0600), fsynced, renamed, and the directory
//! fsynced, so a crash leaves either the old snapshot or the new one. A damaged snapshot is
//! reported and ignored, never fatal.
use std::{
    collections::{HashMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use gpulse_proto::v1;
use prost::{Message, bytes::Bytes};
use thiserror::Error;

use super::{
    events::{EventsView, Origin},
    series::{Agg, Buckets, Chunk, GpuSeries},
};

pub const SERIES_FILE: &str = "series.snap";
pub const EVENTS_FILE: &str = "events.snap";
pub const COUNTERS_FILE: &str = "counters.snap";
/// v3 names its metric columns (mapped by name at load) and leaves the counters to their own
/// file; v2 (still read) had positional columns and the counters inside.
const SERIES_MAGIC: &[u8; 8] = b"GPSER003";
const SERIES_MAGIC_V2: &[u8; 8] = b"GPSER002";
const COUNTERS_MAGIC: &[u8; 8] = b"GPCNT001";
const EVENTS_MAGIC: &[u8; 8] = b"GPEVT002";
/// Earlier collectors' events snapshots (still read).
const EVENTS_MAGIC_V1: &[u8; 8] = b"GPEVT001";
const ENTRY_SENDER: u8 = 0;
const ENTRY_EVENT: u8 = 1;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{path}: {err}")]
    Io { path: String, err: io::Error },
    #[error("{path}: damaged snapshot ({reason})")]
    Corrupt { path: String, reason: String },
}

#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn finish(mut self) -> Vec<u8> {
        let crc = crc32fast::hash(&self.0);
        self.u32(crc);
        self.0
    }
}

/// Reads a snapshot body front to back, from memory or straight from its file (so loading a
/// large sample history never holds the file and what it decodes to at once). `left` is what
/// remains of the body: counts are checked against it so a damaged one cannot make us
/// allocate wildly.
struct In<'a> {
    src: Box<dyn io::Read + 'a>,
    left: usize,
    pos: usize,
}

impl<'a> In<'a> {
    fn slice(buf: &'a [u8]) -> Self {
        Self {
            left: buf.len(),
            src: Box::new(buf),
            pos: 0,
        }
    }

    fn fill(&mut self, out: &mut [u8]) -> Result<(), String> {
        if out.len() > self.left {
            return Err(format!("ends early at byte {}", self.pos));
        }
        self.src
            .read_exact(out)
            .map_err(|e| format!("reading at byte {}: {e}", self.pos))?;
        self.left -= out.len();
        self.pos += out.len();
        Ok(())
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        self.fill(&mut a)?;
        Ok(a)
    }
    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.arr::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(self.arr()?))
    }
    fn f64(&mut self) -> Result<f64, String> {
        Ok(f64::from_le_bytes(self.arr()?))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        if n > self.left {
            return Err(format!("ends early at byte {}", self.pos));
        }
        let mut b = vec![0u8; n];
        self.fill(&mut b)?;
        Ok(b)
    }
    fn str(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "a name is not UTF-8".to_string())
    }
    /// A count of items each at least `min_bytes` long, checked against what is left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, String> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_bytes.max(1)) > self.left {
            return Err(format!("count {n} exceeds the file"));
        }
        Ok(n)
    }
    fn at_end(&self) -> bool {
        self.left == 0
    }
}

/// Checks magic and CRC; returns the body between them.
fn open_body<'a>(data: &'a [u8], magic: &[u8; 8]) -> Result<&'a [u8], String> {
    if data.len() < 12 || &data[..8] != magic {
        return Err("not a gpulse snapshot of this kind".into());
    }
    let (body, crc) = data.split_at(data.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != want {
        return Err("checksum mismatch".into());
    }
    Ok(&body[8..])
}

/// A counter total: family, label values, value.
pub type CounterRow = (u8, Vec<String>, u64);

/// The two snapshots the collector writes: the sample history (with the counters) and the
/// event store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SnapKind {
    Series,
    Events,
}

impl SnapKind {
    /// The `kind` label of the snapshot metrics.
    pub fn name(self) -> &'static str {
        match self {
            SnapKind::Series => "series",
            SnapKind::Events => "events",
        }
    }
}

/// Serialises the XID/SXid counter totals (`through` = last cursor they include). Kept apart
/// from the sample history so no change of the metric catalog can take them away (a counter
/// that comes back lower is a reset to Prometheus, and `increase()` alerts fire again).
pub fn encode_counters(through: u64, counters: &[CounterRow]) -> Vec<u8> {
    let mut o = Out::default();
    o.0.extend_from_slice(COUNTERS_MAGIC);
    o.u64(through);
    write_counter_rows(&mut o, counters);
    o.finish()
}

fn write_counter_rows(o: &mut Out, counters: &[CounterRow]) {
    o.u32(counters.len() as u32);
    for (family, labels, value) in counters {
        o.0.push(*family);
        o.u32(labels.len() as u32);
        for l in labels {
            o.bytes(l.as_bytes());
        }
        o.u64(*value);
    }
}

fn read_counter_rows(r: &mut In<'_>) -> Result<Vec<CounterRow>, String> {
    let nc = r.count(13)?;
    let mut counters = Vec::with_capacity(nc);
    for _ in 0..nc {
        let family = r.byte()?;
        let nl = r.count(4)?;
        let labels = (0..nl).map(|_| r.str()).collect::<Result<Vec<_>, _>>()?;
        counters.push((family, labels, r.u64()?));
    }
    Ok(counters)
}

/// Counter totals and the last cursor they include.
pub fn decode_counters(data: &[u8]) -> Result<(u64, Vec<CounterRow>), String> {
    let mut r = In::slice(open_body(data, COUNTERS_MAGIC)?);
    let through = r.u64()?;
    let rows = read_counter_rows(&mut r)?;
    if !r.at_end() {
        return Err("trailing bytes".into());
    }
    Ok((through, rows))
}

/// Serialises the series store's GPUs (`through` = last cursor whose samples they include),
/// naming each metric column so a collector with another metric catalog maps them by name.
pub fn encode_series(through: u64, names: &[&str], gpus: &[GpuSeries]) -> Vec<u8> {
    let mut o = Out::default();
    o.0.extend_from_slice(SERIES_MAGIC);
    o.u64(through);
    o.u32(names.len() as u32);
    for n in names {
        o.bytes(n.as_bytes());
    }
    o.u32(gpus.len() as u32);
    for g in gpus {
        o.bytes(g.node.as_bytes());
        o.u32(g.index);
        o.bytes(g.uuid.as_bytes());
        o.i64(g.last_ms);
        o.u32(g.head_ts.len() as u32);
        for t in &g.head_ts {
            o.i64(*t);
        }
        for col in &g.head {
            for v in col {
                o.f64(*v);
            }
        }
        o.u32(g.chunks.len() as u32);
        for c in &g.chunks {
            o.i64(c.first_ms);
            o.i64(c.last_ms);
            o.u32(c.rows);
            o.bytes(&c.data);
            o.u32(c.offsets.len() as u32);
            for off in c.offsets.iter() {
                o.u32(*off);
            }
        }
        for t in &g.tiers {
            o.u32(t.starts.len() as u32);
            for (s, aggs) in t.starts.iter().zip(&t.aggs) {
                o.i64(*s);
                for a in aggs.iter() {
                    o.f64(a.min);
                    o.f64(a.max);
                    o.f64(a.sum);
                    o.u32(a.count);
                    o.f64(a.last);
                    o.i64(a.last_ms);
                }
            }
        }
    }
    o.finish()
}

pub struct SeriesSnapshot {
    pub through: u64,
    /// In the loading collector's column order (see [`decode_series`]).
    pub gpus: Vec<GpuSeries>,
    /// Counter totals of a v2 snapshot (they lived inside it then).
    pub counters: Option<Vec<CounterRow>>,
    /// Metric names the snapshot has and this collector does not (their history is dropped),
    /// and the other way round (their history starts empty).
    pub dropped: Vec<String>,
    pub added: Vec<String>,
}

/// Reads a series snapshot into the column order of `names` (this collector's metric catalog):
/// columns are matched by name, a metric the snapshot lacks starts empty, one it has and the
/// catalog does not is dropped. A v2 snapshot (positional columns) maps only when its column
/// count is the catalog's; otherwise its samples are dropped and its counters kept.
pub fn decode_series(data: &[u8], names: &[&str]) -> Result<SeriesSnapshot, String> {
    let v2 = data.get(..8) == Some(SERIES_MAGIC_V2.as_slice());
    let r = In::slice(open_body(
        data,
        if v2 { SERIES_MAGIC_V2 } else { SERIES_MAGIC },
    )?);
    series_body(r, v2, names)
}

/// A snapshot file whose magic is one of `magics` and whose checksum holds (verified by a
/// streaming pass), positioned after the magic: the file, its body length (between magic and
/// checksum) and which magic it has. `Ok(None)` when there is no such file.
fn open_verified(
    dir: &Path,
    name: &str,
    magics: &[&[u8; 8]],
    min_body: u64,
) -> Result<Option<(File, u64, usize)>, SnapshotError> {
    use io::{Read, Seek};
    let path = dir.join(name);
    let io_err = |err| SnapshotError::Io {
        path: path.display().to_string(),
        err,
    };
    let mut f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let len = f.metadata().map_err(io_err)?.len();
    let not_ours = || corrupt(dir, name, "not a gpulse snapshot of this kind".into());
    let mut magic = [0u8; 8];
    if len < 12 + min_body || f.read_exact(&mut magic).is_err() {
        return Err(not_ours());
    }
    let which = magics
        .iter()
        .position(|m| **m == magic)
        .ok_or_else(not_ours)?;
    if !verify_crc(&mut f, len).map_err(io_err)? {
        return Err(corrupt(dir, name, "checksum mismatch".into()));
    }
    f.seek(io::SeekFrom::Start(8)).map_err(io_err)?;
    Ok(Some((f, len - 12, which)))
}

/// What a damaged events snapshot's header says it held: (through cursor, event count), read
/// without the checksum that failed (None when the header itself is unreadable or implausible).
/// Recovery counts what was lost with it, instead of saying only that it was skipped.
pub fn peek_events_header(dir: &Path, name: &str) -> Option<(u64, u64)> {
    use io::Read;
    let mut f = File::open(dir.join(name)).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; 8 + 8 + 4];
    f.read_exact(&mut head).ok()?;
    if ![EVENTS_MAGIC, EVENTS_MAGIC_V1]
        .iter()
        .any(|m| head[..8] == m[..])
    {
        return None;
    }
    let through = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let cp_len = u64::from(u32::from_le_bytes(head[16..20].try_into().ok()?));
    if 20 + cp_len + 8 > len {
        return None;
    }
    io::Seek::seek(&mut f, io::SeekFrom::Start(20 + cp_len)).ok()?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n).ok()?;
    let total = u64::from_le_bytes(n);
    // Each event takes at least 4 bytes: a count beyond that is damage too.
    (total.saturating_mul(4) <= len).then_some((through, total))
}

/// [`decode_series`] straight from `dir/name` (its checksum verified by a first streaming
/// pass): the file is never held in memory. `Ok(None)` when there is none.
pub fn read_series(
    dir: &Path,
    name: &str,
    names: &[&str],
) -> Result<Option<SeriesSnapshot>, SnapshotError> {
    let Some((f, body, which)) = open_verified(dir, name, &[SERIES_MAGIC, SERIES_MAGIC_V2], 0)?
    else {
        return Ok(None);
    };
    let v2 = which == 1;
    let r = In {
        src: Box::new(io::BufReader::with_capacity(1 << 20, f)),
        left: body as usize,
        pos: 0,
    };
    series_body(r, v2, names)
        .map(Some)
        .map_err(|reason| corrupt(dir, name, reason))
}

fn series_body(mut r: In<'_>, v2: bool, names: &[&str]) -> Result<SeriesSnapshot, String> {
    let through = r.u64()?;
    let metrics = r.u32()? as usize;
    if metrics > 4096 {
        return Err(format!("{metrics} metrics per GPU is not plausible"));
    }
    let have: Vec<String> = if v2 {
        if metrics == names.len() {
            names.iter().map(|n| n.to_string()).collect()
        } else {
            (0..metrics).map(|i| format!("#{i}")).collect()
        }
    } else {
        (0..metrics).map(|_| r.str()).collect::<Result<_, _>>()?
    };
    let n = r.count(32)?;
    let mut gpus = Vec::with_capacity(n);
    for _ in 0..n {
        let node: Arc<str> = Arc::from(r.str()?);
        let index = r.u32()?;
        let uuid = r.str()?;
        let last_ms = r.i64()?;
        let rows = r.count(8)?;
        let head_ts = (0..rows).map(|_| r.i64()).collect::<Result<Vec<_>, _>>()?;
        let mut head = Vec::with_capacity(metrics);
        for _ in 0..metrics {
            head.push((0..rows).map(|_| r.f64()).collect::<Result<Vec<_>, _>>()?);
        }
        let nc = r.count(28)?;
        let mut chunks = VecDeque::with_capacity(nc);
        for _ in 0..nc {
            let first_ms = r.i64()?;
            let last_ms = r.i64()?;
            let rows = r.u32()?;
            let data: Arc<[u8]> = r.bytes()?.into();
            let no = r.count(4)?;
            let offsets = (0..no).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
            if no != metrics + 2 || offsets.iter().any(|o| *o as usize > data.len()) {
                return Err("a chunk's column offsets do not fit its data".into());
            }
            chunks.push_back(Chunk {
                first_ms,
                last_ms,
                rows,
                data,
                offsets: offsets.into(),
            });
        }
        let mut tiers = [Buckets::default(), Buckets::default()];
        for t in &mut tiers {
            let nb = r.count(8 + metrics * 44)?;
            for _ in 0..nb {
                t.starts.push_back(r.i64()?);
                let mut aggs = Vec::with_capacity(metrics);
                for _ in 0..metrics {
                    aggs.push(Agg {
                        min: r.f64()?,
                        max: r.f64()?,
                        sum: r.f64()?,
                        count: r.u32()?,
                        last: r.f64()?,
                        last_ms: r.i64()?,
                    });
                }
                t.aggs.push_back(aggs.into_boxed_slice());
            }
        }
        gpus.push(GpuSeries {
            node,
            index,
            uuid,
            head_ts,
            head,
            chunks,
            tiers,
            last_ms,
        });
    }
    let counters = if v2 {
        Some(read_counter_rows(&mut r)?)
    } else {
        None
    };
    if !r.at_end() {
        return Err("trailing bytes".into());
    }
    // Snapshot column of each catalog metric, if it has one.
    let from: Vec<Option<usize>> = names
        .iter()
        .map(|n| have.iter().position(|h| h == n))
        .collect();
    let added: Vec<String> = names
        .iter()
        .zip(&from)
        .filter(|(_, f)| f.is_none())
        .map(|(n, _)| n.to_string())
        .collect();
    let dropped: Vec<String> = have
        .iter()
        .filter(|h| !names.contains(&h.as_str()))
        .cloned()
        .collect();
    let gpus = if v2 && metrics != names.len() {
        Vec::new()
    } else if from.iter().enumerate().all(|(i, f)| *f == Some(i)) && metrics == names.len() {
        gpus
    } else {
        gpus.into_iter().map(|g| remap_columns(g, &from)).collect()
    };
    Ok(SeriesSnapshot {
        through,
        gpus,
        counters,
        dropped,
        added,
    })
}

/// Rearranges one GPU's columns: column `i` becomes the snapshot's `from[i]` (empty if None).
fn remap_columns(g: GpuSeries, from: &[Option<usize>]) -> GpuSeries {
    let rows = g.head_ts.len();
    let head = from
        .iter()
        .map(|f| match f {
            Some(j) => g.head[*j].clone(),
            None => vec![f64::NAN; rows],
        })
        .collect();
    let chunks = g
        .chunks
        .iter()
        .map(|c| {
            // offsets: [0, end of timestamps, end of column 0, end of column 1, ...].
            let col = |j: usize| -> &[u8] {
                let (a, b) = (c.offsets[j + 1] as usize, c.offsets[j + 2] as usize);
                &c.data[a..b]
            };
            let empty = super::codec::encode_values(&vec![f64::NAN; c.rows as usize]);
            let mut data = c.data[..c.offsets[1] as usize].to_vec();
            let mut offsets = vec![0, data.len() as u32];
            for f in from {
                data.extend_from_slice(f.map_or(empty.as_slice(), col));
                offsets.push(data.len() as u32);
            }
            Chunk {
                first_ms: c.first_ms,
                last_ms: c.last_ms,
                rows: c.rows,
                data: data.into(),
                offsets: offsets.into(),
            }
        })
        .collect();
    let tiers = g.tiers.map(|t| Buckets {
        starts: t.starts,
        aggs: t
            .aggs
            .into_iter()
            .map(|a| {
                from.iter()
                    .map(|f| f.map_or(Agg::EMPTY, |j| a[j]))
                    .collect::<Vec<_>>()
                    .into_boxed_slice()
            })
            .collect(),
    });
    GpuSeries {
        head,
        chunks,
        tiers,
        ..g
    }
}

/// A writer that keeps the CRC-32 of everything written through it.
struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Streams retained events (oldest cursor first) and the agents' progress into `w`, one event
/// at a time, from the store's own blocks: no copy of the store is built in memory, and blocks
/// are let go as they are written.
///
/// Body: `through`, the checkpoint, the event count, then entries: a sender (tag 0: `node`,
/// `agent_id`; numbered in order of appearance) before the first event that names it, and
/// events (tag 1: cursor, received time in ns, sender number, encoding).
pub fn write_events(
    w: &mut impl Write,
    through: u64,
    checkpoint: &v1::StoreCheckpoint,
    events: EventsView,
) -> io::Result<()> {
    let mut w = CrcWriter {
        inner: w,
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(EVENTS_MAGIC)?;
    w.write_all(&through.to_le_bytes())?;
    let cp = checkpoint.encode_to_vec();
    w.write_all(&(cp.len() as u32).to_le_bytes())?;
    w.write_all(&cp)?;
    w.write_all(&events.len().to_le_bytes())?;
    // Senders by identity: every record of one agent's batches shares one. The map's keys stay
    // valid because `senders` holds each Arc until the end.
    let mut index: HashMap<*const Origin, u32> = HashMap::new();
    let mut senders: Vec<Arc<Origin>> = Vec::new();
    let mut result = Ok(());
    events.drain(|e| {
        if result.is_err() {
            return;
        }
        result = (|| {
            let o = e.origin();
            let sender = match index.get(&Arc::as_ptr(o)) {
                Some(i) => *i,
                None => {
                    let i = senders.len() as u32;
                    w.write_all(&[ENTRY_SENDER])?;
                    for s in [&o.node, &o.agent_id] {
                        w.write_all(&(s.len() as u32).to_le_bytes())?;
                        w.write_all(s.as_bytes())?;
                    }
                    index.insert(Arc::as_ptr(o), i);
                    senders.push(o.clone());
                    i
                }
            };
            let b = e.encoded();
            w.write_all(&[ENTRY_EVENT])?;
            w.write_all(&e.cursor().to_le_bytes())?;
            w.write_all(&e.received_ns().to_le_bytes())?;
            w.write_all(&sender.to_le_bytes())?;
            w.write_all(&(b.len() as u32).to_le_bytes())?;
            w.write_all(b)
        })();
    });
    result?;
    let crc = w.crc.clone().finalize();
    w.inner.write_all(&crc.to_le_bytes())
}

/// [`write_events`] into memory (tests).
pub fn encode_events(
    through: u64,
    checkpoint: &v1::StoreCheckpoint,
    events: EventsView,
) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = write_events(&mut out, through, checkpoint, events);
    out
}

/// An events snapshot read one entry at a time from the file (restart memory stays within the
/// store's budget: neither the file nor a list of its events is ever held whole). The checksum
/// is verified by a first streaming pass before any entry is handed out.
pub struct EventsReader {
    r: io::BufReader<File>,
    pub through: u64,
    pub checkpoint: v1::StoreCheckpoint,
    v1: bool,
    total: u64,
    read: u64,
    /// Body bytes left before the checksum (entries never read past it).
    left: u64,
    senders: Vec<(String, String)>,
    failed: bool,
}

/// Streams `f` once to check the trailing CRC-32 over everything before it.
fn verify_crc(f: &mut File, len: u64) -> io::Result<bool> {
    use io::{Read, Seek};
    f.seek(io::SeekFrom::Start(0))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len - 4;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    let mut crc = [0u8; 4];
    f.read_exact(&mut crc)?;
    Ok(h.finalize() == u32::from_le_bytes(crc))
}

impl EventsReader {
    /// Opens `dir/name`: `Ok(None)` when it does not exist; `Err(Corrupt)` when its magic or
    /// checksum is wrong.
    pub fn open(dir: &Path, name: &str) -> Result<Option<Self>, SnapshotError> {
        // Smallest body: through, an empty checkpoint's length, a count.
        let Some((f, body, which)) =
            open_verified(dir, name, &[EVENTS_MAGIC, EVENTS_MAGIC_V1], 8 + 4 + 8)?
        else {
            return Ok(None);
        };
        let v1 = which == 1;
        let mut me = Self {
            r: io::BufReader::with_capacity(1 << 20, f),
            through: 0,
            checkpoint: v1::StoreCheckpoint::default(),
            v1,
            total: 0,
            read: 0,
            left: body,
            senders: Vec::new(),
            failed: false,
        };
        let head = (|| {
            me.through = me.u64()?;
            let cp = me.bytes()?;
            me.checkpoint = v1::StoreCheckpoint::decode(cp.as_slice())
                .map_err(|e| format!("checkpoint: {e}"))?;
            me.total = me.u64()?;
            // The smallest entry: a length (v1); a tag, cursor, time, sender and length (v2).
            if me.total.saturating_mul(if v1 { 4 } else { 25 }) > me.left {
                return Err(format!("count {} exceeds the file", me.total));
            }
            Ok(())
        })();
        head.map_err(|reason| corrupt(dir, name, reason))?;
        Ok(Some(me))
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), String> {
        use io::Read;
        if buf.len() as u64 > self.left {
            return Err("an entry runs past the end".into());
        }
        self.r
            .read_exact(buf)
            .map_err(|e| format!("reading: {e}"))?;
        self.left -= buf.len() as u64;
        Ok(())
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        self.take(&mut a)?;
        Ok(a)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = u64::from(u32::from_le_bytes(self.arr()?));
        if n > self.left {
            return Err("an entry runs past the end".into());
        }
        let mut b = vec![0u8; n as usize];
        self.take(&mut b)?;
        Ok(b)
    }

    /// The next event with its envelope set and its encoding as stored.
    fn entry(&mut self) -> Result<(v1::Event, Bytes), String> {
        let i = self.read;
        if self.v1 {
            let b = Bytes::from(self.bytes()?);
            let ev = v1::Event::decode(b.as_ref()).map_err(|e| format!("event {i}: {e}"))?;
            return Ok((ev, b));
        }
        loop {
            match self.arr::<1>()?[0] {
                ENTRY_SENDER => {
                    let mut s = || {
                        self.bytes().and_then(|b| {
                            String::from_utf8(b)
                                .map_err(|_| format!("a sender before event {i} is not UTF-8"))
                        })
                    };
                    let sender = (s()?, s()?);
                    self.senders.push(sender);
                }
                ENTRY_EVENT => {
                    let cursor = self.u64()?;
                    let received_ns = i64::from_le_bytes(self.arr()?);
                    let sender = u32::from_le_bytes(self.arr()?) as usize;
                    let b = Bytes::from(self.bytes()?);
                    let mut ev =
                        v1::Event::decode(b.as_ref()).map_err(|e| format!("event {i}: {e}"))?;
                    let (node, agent_id) = self
                        .senders
                        .get(sender)
                        .ok_or_else(|| format!("event {i}: sender {sender} was never named"))?;
                    ev.node.clone_from(node);
                    ev.agent_id.clone_from(agent_id);
                    ev.cursor = cursor;
                    ev.received = (received_ns != i64::MIN)
                        .then(|| gpulse_proto::time::from_unix_nanos(i128::from(received_ns)));
                    return Ok((ev, b));
                }
                t => return Err(format!("entry before event {i} has unknown tag {t}")),
            }
        }
    }
}

impl Iterator for EventsReader {
    type Item = Result<(v1::Event, Bytes), String>;

    /// Events oldest cursor first. After an error (only possible if the file changed while it
    /// was read, since its checksum was verified) nothing more is returned.
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.read >= self.total {
            return None;
        }
        let r = self.entry();
        self.read += 1;
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

/// Writes `data` to `dir/name` atomically (0600).
pub fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> Result<(), SnapshotError> {
    write_atomic_with(dir, name, |w| w.write_all(data))
}

/// Writes `dir/name` atomically (0600) from `fill`, through a buffer: a temporary file is
/// written and fsynced, renamed over the old one, and the directory fsynced.
pub fn write_atomic_with(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut io::BufWriter<File>) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let io_err = |p: &PathBuf| {
        let p = p.display().to_string();
        move |err| SnapshotError::Io { path: p, err }
    };
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    let mut w = io::BufWriter::with_capacity(1 << 20, f);
    fill(&mut w).map_err(io_err(&tmp))?;
    let f = w.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(&dir.to_path_buf()))?;
    Ok(())
}

/// Reads `dir/name`; `Ok(None)` when it does not exist.
pub fn read(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, SnapshotError> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(SnapshotError::Io {
            path: path.display().to_string(),
            err,
        }),
    }
}

pub fn corrupt(dir: &Path, name: &str, reason: String) -> SnapshotError {
    SnapshotError::Corrupt {
        path: dir.join(name).display().to_string(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::series::{SeriesBudgets, SeriesStore};

    #[test]
    fn series_roundtrip_and_damage_is_detected() {
        let mut s = SeriesStore::new(3, SeriesBudgets::default());
        for i in 0..5000i64 {
            for gpu in 0..2 {
                s.push(
                    "n",
                    gpu,
                    "GPU-x",
                    1_764_000_000_000 + i * 1000,
                    &[i as f64, 1.5, f64::NAN],
                )
                .unwrap();
            }
        }
        let names = ["a", "b", "c"];
        let data = encode_series(77, &names, s.gpus());
        let snap = decode_series(&data, &names).unwrap();
        assert_eq!((snap.through, snap.gpus.len()), (77, 2));
        assert!(snap.counters.is_none() && snap.added.is_empty() && snap.dropped.is_empty());
        let back = SeriesStore::restore(3, SeriesBudgets::default(), snap.gpus);
        for t in crate::store::series::Tier::ALL {
            assert_eq!(back.tier_stats(t).bytes, s.tier_stats(t).bytes, "{t:?}");
            assert_eq!(back.tier_stats(t).oldest_ms, s.tier_stats(t).oldest_ms);
        }
        let mut a = Vec::new();
        let mut b = Vec::new();
        s.raw_points(&s.gpus()[1], 0, 0, i64::MAX, |t, v| a.push((t, v)))
            .unwrap();
        back.raw_points(&back.gpus()[1], 0, 0, i64::MAX, |t, v| b.push((t, v)))
            .unwrap();
        assert_eq!(a, b);
        for cut in [0, 7, 12, data.len() / 2, data.len() - 1] {
            assert!(decode_series(&data[..cut], &names).is_err());
        }
        let mut flipped = data.clone();
        flipped[data.len() / 3] ^= 0x40;
        assert!(
            decode_series(&flipped, &names)
                .err()
                .unwrap()
                .contains("checksum")
        );
    }

    #[test]
    fn series_stream_from_the_file_as_from_memory() {
        let mut s = SeriesStore::new(2, SeriesBudgets::default());
        for i in 0..2000i64 {
            s.push(
                "n",
                0,
                "GPU-x",
                1_764_000_000_000 + i * 1000,
                &[i as f64, 0.5],
            )
            .unwrap();
        }
        let data = encode_series(11, &["a", "b"], s.gpus());
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), SERIES_FILE, &data).unwrap();
        let from_file = read_series(dir.path(), SERIES_FILE, &["a", "b"])
            .unwrap()
            .unwrap();
        let in_memory = decode_series(&data, &["a", "b"]).unwrap();
        assert_eq!(from_file.through, 11);
        let (f, m) = (
            SeriesStore::restore(2, SeriesBudgets::default(), from_file.gpus),
            SeriesStore::restore(2, SeriesBudgets::default(), in_memory.gpus),
        );
        assert_eq!(points(&f, 0), points(&m, 0));
        assert_eq!(points(&f, 0).len(), 2000);
        assert!(read_series(dir.path(), "absent", &["a"]).unwrap().is_none());
        let mut bad = data.clone();
        bad[data.len() / 2] ^= 1;
        fs::write(dir.path().join("bad.snap"), &bad).unwrap();
        assert!(matches!(
            read_series(dir.path(), "bad.snap", &["a", "b"]),
            Err(SnapshotError::Corrupt { .. })
        ));
    }

    fn points(s: &SeriesStore, metric: usize) -> Vec<(i64, f64)> {
        let mut out = Vec::new();
        s.raw_points(&s.gpus()[0], metric, 0, i64::MAX, |t, v| out.push((t, v)))
            .unwrap();
        out
    }

    /// A collector with another metric catalog (a metric added, one removed, the order changed)
    /// keeps every column it shares with the snapshot, by name.
    #[test]
    fn series_columns_are_mapped_by_name() {
        let mut s = SeriesStore::new(3, SeriesBudgets::default());
        for i in 0..1000i64 {
            s.push(
                "n",
                0,
                "GPU-x",
                1_764_000_000_000 + i * 1000,
                &[i as f64, 2.0, (i % 7) as f64],
            )
            .unwrap();
        }
        let data = encode_series(9, &["util", "gone", "temp"], s.gpus());
        let snap = decode_series(&data, &["temp", "power", "util"]).unwrap();
        assert_eq!(snap.added, ["power"]);
        assert_eq!(snap.dropped, ["gone"]);
        let back = SeriesStore::restore(3, SeriesBudgets::default(), snap.gpus);
        assert_eq!(points(&back, 0), points(&s, 2), "temp");
        assert_eq!(points(&back, 2), points(&s, 0), "util");
        assert!(points(&back, 1).is_empty(), "a new metric starts empty");
        assert_eq!(points(&back, 0).len(), 1000, "chunks and head both mapped");
        // Rollups follow their columns too.
        let (sb, bb) = (&s.gpus()[0].tiers[0], &back.gpus()[0].tiers[0]);
        assert!(!sb.aggs.is_empty());
        for (x, y) in sb.aggs.iter().zip(&bb.aggs) {
            assert_eq!(x[2], y[0]);
            assert_eq!(x[0], y[2]);
            assert_eq!(y[1].count, 0);
        }
    }

    /// A v2 snapshot (positional columns, counters inside) from a v3 one.
    fn as_v2(v3: &[u8], counters: &[CounterRow]) -> Vec<u8> {
        let body = &v3[8..v3.len() - 4];
        let mut r = In::slice(body);
        let through = r.u64().unwrap();
        let n = r.u32().unwrap();
        for _ in 0..n {
            r.bytes().unwrap();
        }
        let mut o = Out::default();
        o.0.extend_from_slice(SERIES_MAGIC_V2);
        o.u64(through);
        o.u32(n);
        let pos = r.pos;
        o.0.extend_from_slice(&body[pos..]);
        write_counter_rows(&mut o, counters);
        o.finish()
    }

    #[test]
    fn counters_have_their_own_file_and_v2_snapshots_still_load() {
        let counters = vec![(1u8, vec!["n".to_string(), "79".to_string()], 5u64)];
        let data = encode_counters(41, &counters);
        assert_eq!(decode_counters(&data).unwrap(), (41, counters.clone()));
        assert!(decode_counters(&data[..data.len() - 1]).is_err());

        let mut s = SeriesStore::new(2, SeriesBudgets::default());
        for i in 0..300i64 {
            s.push(
                "n",
                0,
                "GPU-x",
                1_764_000_000_000 + i * 1000,
                &[i as f64, 1.0],
            )
            .unwrap();
        }
        let v2 = as_v2(&encode_series(5, &["x", "y"], s.gpus()), &counters);
        let same = decode_series(&v2, &["x", "y"]).unwrap();
        assert_eq!(same.counters.as_deref(), Some(counters.as_slice()));
        assert_eq!(same.gpus.len(), 1);
        // A v2 snapshot cannot be mapped to another catalog: samples go, counters stay.
        let other = decode_series(&v2, &["x", "y", "z"]).unwrap();
        assert!(other.gpus.is_empty());
        assert_eq!(other.counters.as_deref(), Some(counters.as_slice()));
    }

    #[test]
    fn events_roundtrip_atomically_on_disk() {
        use crate::store::events::EventStore;
        let dir = tempfile::tempdir().unwrap();
        let mut store = EventStore::new(1 << 20, 1);
        let senders = [
            Arc::new(Origin {
                node: "n".into(),
                agent_id: "n/a".into(),
            }),
            Arc::new(Origin {
                node: "m".into(),
                agent_id: "m/a".into(),
            }),
        ];
        let mut want = Vec::new();
        for c in 1..=3u64 {
            let mut ev = v1::Event {
                seq: c,
                kind: v1::EventKind::DriverLog as i32,
                received: Some(gpulse_proto::time::from_unix_nanos(
                    1_764_000_000_000_000_123,
                )),
                payload: Some(v1::event::Payload::DriverLog(v1::DriverLog {
                    text: format!("line {c}"),
                    ..Default::default()
                })),
                ..Default::default()
            };
            let o = &senders[(c % 2) as usize];
            store.push(&ev, &ev.encode_to_vec(), o);
            ev.cursor = c;
            ev.node.clone_from(&o.node);
            ev.agent_id.clone_from(&o.agent_id);
            want.push(ev);
        }
        let cp = v1::StoreCheckpoint {
            next_cursor: 4,
            ..Default::default()
        };
        write_atomic(
            dir.path(),
            EVENTS_FILE,
            &encode_events(3, &cp, store.view()),
        )
        .unwrap();
        let data = read(dir.path(), EVENTS_FILE).unwrap().unwrap();
        let snap = EventsReader::open(dir.path(), EVENTS_FILE)
            .unwrap()
            .unwrap();
        assert_eq!((snap.through, snap.checkpoint.next_cursor), (3, 4));
        let got: Vec<(v1::Event, Bytes)> = snap.map(Result::unwrap).collect();
        assert_eq!(got.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>(), want);
        for (e, b) in &got {
            let mut stored = v1::Event::decode(b.as_ref()).unwrap();
            stored.cursor = e.cursor;
            stored.node.clone_from(&e.node);
            stored.agent_id.clone_from(&e.agent_id);
            stored.received = e.received;
            assert_eq!(&stored, e, "the encoding is the event without its envelope");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join(EVENTS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(read(dir.path(), SERIES_FILE).unwrap().is_none());
        for cut in [0, 9, 30, data.len() / 2, data.len() - 2] {
            fs::write(dir.path().join("cut.snap"), &data[..cut]).unwrap();
            assert!(
                EventsReader::open(dir.path(), "cut.snap").is_err(),
                "cut at {cut}"
            );
        }
        for at in [8, 20, data.len() / 2, data.len() - 1] {
            let mut bad = data.clone();
            bad[at] ^= 0x40;
            fs::write(dir.path().join("flip.snap"), &bad).unwrap();
            assert!(
                matches!(
                    EventsReader::open(dir.path(), "flip.snap"),
                    Err(SnapshotError::Corrupt { .. })
                ),
                "flipped byte {at}"
            );
        }
        assert!(
            EventsReader::open(dir.path(), "absent.snap")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn events_snapshots_of_earlier_collectors_still_load() {
        let evs: Vec<v1::Event> = (1..=2)
            .map(|c| v1::Event {
                cursor: c,
                node: "n".into(),
                ..Default::default()
            })
            .collect();
        let mut out = Out::default();
        out.0.extend_from_slice(EVENTS_MAGIC_V1);
        out.u64(2);
        out.bytes(&v1::StoreCheckpoint::default().encode_to_vec());
        out.u64(2);
        for e in &evs {
            out.bytes(&e.encode_to_vec());
        }
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), EVENTS_FILE, &out.finish()).unwrap();
        let snap = EventsReader::open(dir.path(), EVENTS_FILE)
            .unwrap()
            .unwrap();
        let got: Vec<v1::Event> = snap.map(|r| r.unwrap().0).collect();
        assert_eq!(got, evs);
    }
}
