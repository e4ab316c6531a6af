//! GPU sample history: per GPU, a raw head of recent rows (plain arrays, fast to scan), sealed
//! chunks compressed column by column (see `codec`), and two rollup tiers (1 min and 1 h buckets
//! holding min/max/sum/count/last per metric). Each of the three has its own byte budget and
//! expires oldest first; what each holds (bytes, oldest time, expirations) is exported.
//!
//! A GPU is identified by (node, index); its UUID is kept as an attribute. Every metric column of
//! a GPU shares the row timestamps, so "per GPU metric series" are the columns of that GPU.
use std::{cell::RefCell, collections::VecDeque, sync::Arc};

use super::codec::{self, CodecError};
use gpulse_proto::v1;

use crate::FastMap;

/// Rows per sealed chunk (2 min at the default 1 s sampling interval).
pub const CHUNK_ROWS: usize = 120;
/// Fixed bookkeeping bytes counted per chunk / per bucket row, so budgets bound real memory.
const CHUNK_OVERHEAD: usize = 96;
const BUCKET_ROW_OVERHEAD: usize = 24;
const GPU_OVERHEAD: usize = 256;
/// While the raw tier is over its budget with no sealed chunk left to expire (more GPUs than
/// the budget holds heads for), a GPU's head is sealed once it has this many rows, so that its
/// rows are compressed (and expire oldest first) instead of held plain.
const PRESSURE_SEAL_ROWS: usize = 8;

/// Memory of a GPU's head as allocated (its columns grow with their rows and are released when
/// sealed), which is what the raw budget counts.
fn head_bytes(g: &GpuSeries) -> usize {
    (g.head_ts.capacity() + g.head.iter().map(Vec::capacity).sum::<usize>()) * 8
}

/// The three retention tiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Raw,
    Minute,
    Hour,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Raw, Tier::Minute, Tier::Hour];

    /// Bucket width in ms (raw: 0, every sample).
    pub fn resolution_ms(self) -> i64 {
        match self {
            Tier::Raw => 0,
            Tier::Minute => 60_000,
            Tier::Hour => 3_600_000,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Raw => "raw",
            Tier::Minute => "1m",
            Tier::Hour => "1h",
        }
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// One rollup bucket's figures for one metric.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agg {
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub count: u32,
    pub last: f64,
    /// Time of `last` (ms), so merged buckets keep the latest value.
    pub last_ms: i64,
}

impl Agg {
    pub const EMPTY: Agg = Agg {
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        sum: 0.0,
        count: 0,
        last: f64::NAN,
        last_ms: i64::MIN,
    };

    pub fn add(&mut self, ts: i64, v: f64) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.sum += v;
        self.count += 1;
        if ts >= self.last_ms {
            self.last = v;
            self.last_ms = ts;
        }
    }

    /// Adds rows already in time order (NaN = absent) in a branch-free loop over four lanes of
    /// accumulators (the compiler keeps them in vector registers). The sum's order differs from
    /// one value at a time only in rounding, and not at all for the integer values NVML gives.
    pub fn add_run(&mut self, ts: &[i64], vals: &[f64]) {
        const L: usize = 4;
        let mut min = [self.min; L];
        let mut max = [self.max; L];
        let mut sum = [0.0f64; L];
        let mut n = [0u32; L];
        let chunks = vals.chunks_exact(L);
        let tail = chunks.remainder();
        let mut lane = |k: usize, v: f64| {
            // Plain comparisons: NaN (absent) fails both; it adds 0 and counts 0.
            let present = !v.is_nan();
            min[k] = if v < min[k] { v } else { min[k] };
            max[k] = if v > max[k] { v } else { max[k] };
            sum[k] += if present { v } else { 0.0 };
            n[k] += u32::from(present);
        };
        for c in chunks {
            for (k, v) in c.iter().enumerate() {
                lane(k, *v);
            }
        }
        for (k, v) in tail.iter().enumerate() {
            lane(k, *v);
        }
        let n: u32 = n.iter().sum();
        if n == 0 {
            return;
        }
        self.min = min
            .iter()
            .fold(f64::INFINITY, |a, b| if *b < a { *b } else { a });
        self.max = max
            .iter()
            .fold(f64::NEG_INFINITY, |a, b| if *b > a { *b } else { a });
        self.sum += (sum[0] + sum[1]) + (sum[2] + sum[3]);
        self.count += n;
        if let Some(k) = vals.iter().rposition(|v| !v.is_nan())
            && ts[k] >= self.last_ms
        {
            self.last = vals[k];
            self.last_ms = ts[k];
        }
    }

    pub fn merge(&mut self, o: &Agg) {
        if o.count == 0 {
            return;
        }
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
        self.sum += o.sum;
        self.count += o.count;
        if o.last_ms >= self.last_ms {
            self.last = o.last;
            self.last_ms = o.last_ms;
        }
    }
}

/// A sealed, compressed run of rows.
#[derive(Clone, Debug)]
pub struct Chunk {
    pub first_ms: i64,
    pub last_ms: i64,
    pub rows: u32,
    /// Timestamps column then one column per metric, back to back.
    pub data: Arc<[u8]>,
    /// Start of each column in `data` (ts first), plus the end.
    pub offsets: Arc<[u32]>,
}

impl Chunk {
    fn seal(ts: &[i64], cols: &[Vec<f64>]) -> Chunk {
        let mut data = codec::encode_ts(ts);
        let mut offsets = Vec::with_capacity(cols.len() + 2);
        offsets.push(0);
        offsets.push(data.len() as u32);
        for c in cols {
            data.extend_from_slice(&codec::encode_values(c));
            offsets.push(data.len() as u32);
        }
        Chunk {
            first_ms: ts.first().copied().unwrap_or(0),
            last_ms: ts.last().copied().unwrap_or(0),
            rows: ts.len() as u32,
            data: data.into(),
            offsets: offsets.into(),
        }
    }

    pub fn bytes(&self) -> usize {
        self.data.len() + self.offsets.len() * 4 + CHUNK_OVERHEAD
    }

    pub fn timestamps(&self, out: &mut Vec<i64>) -> Result<(), CodecError> {
        let end = *self.offsets.get(1).ok_or(CodecError::Truncated)? as usize;
        codec::decode_ts(
            self.data.get(..end).ok_or(CodecError::Truncated)?,
            self.rows as usize,
            out,
        )
    }

    pub fn column(&self, metric: usize, out: &mut Vec<f64>) -> Result<(), CodecError> {
        let a = *self.offsets.get(metric + 1).ok_or(CodecError::Truncated)? as usize;
        let b = *self.offsets.get(metric + 2).ok_or(CodecError::Truncated)? as usize;
        codec::decode_values(
            self.data.get(a..b).ok_or(CodecError::Truncated)?,
            self.rows as usize,
            out,
        )
    }
}

/// A rollup tier of one GPU: bucket start times and per-metric aggregates.
#[derive(Clone, Debug, Default)]
pub struct Buckets {
    pub starts: VecDeque<i64>,
    pub aggs: VecDeque<Box<[Agg]>>,
}

/// Everything stored for one GPU.
#[derive(Clone, Debug)]
pub struct GpuSeries {
    pub node: Arc<str>,
    pub index: u32,
    pub uuid: String,
    pub head_ts: Vec<i64>,
    pub head: Vec<Vec<f64>>,
    pub chunks: VecDeque<Chunk>,
    pub tiers: [Buckets; 2],
    pub last_ms: i64,
}

impl GpuSeries {
    fn new(node: Arc<str>, index: u32, uuid: String, metrics: usize) -> Self {
        Self {
            node,
            index,
            uuid,
            // Grown as rows arrive: a GPU costs its rows, not a chunk's worth up front.
            head_ts: Vec::new(),
            head: vec![Vec::new(); metrics],
            chunks: VecDeque::new(),
            tiers: [Buckets::default(), Buckets::default()],
            last_ms: i64::MIN,
        }
    }
}

/// Budgets for the three tiers (bytes).
#[derive(Clone, Copy, Debug)]
pub struct SeriesBudgets {
    pub raw: usize,
    pub minute: usize,
    pub hour: usize,
    pub max_gpus: usize,
}

impl Default for SeriesBudgets {
    fn default() -> Self {
        Self {
            raw: 64 << 20,
            minute: 32 << 20,
            hour: 8 << 20,
            max_gpus: 65_536,
        }
    }
}

/// Per tier accounting.
#[derive(Clone, Copy, Debug, Default)]
pub struct TierStats {
    pub bytes: usize,
    pub budget: usize,
    /// Chunks (raw) or bucket rows (rollups) expired so far.
    pub expired: u64,
    /// Oldest time still held (ms), if any.
    pub oldest_ms: Option<i64>,
}

/// Why a row was not stored.
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Older than or equal to the GPU's previous row (clock stepped back or a replayed row).
    OutOfOrder,
    /// The store already tracks `max_gpus` GPUs.
    TooManyGpus,
    /// The GPU's node already holds its share (`share::GPUS_PER_NODE`).
    NodeShare,
}

pub type GpuId = u32;

/// A GPU silent this long may give its slot to a new one when `max_gpus` are tracked.
pub const RETIRE_AFTER_MS: i64 = 3_600_000;

/// A sample this far before its GPU's latest means the node's clock stepped back: the series
/// starts again (smaller steps back are refused as out of order).
pub const BACKWARD_RESTART_MS: i64 = 60_000;

pub struct SeriesStore {
    metrics: usize,
    budgets: SeriesBudgets,
    gpus: Vec<GpuSeries>,
    by_node: FastMap<Arc<str>, FastMap<u32, GpuId>>,
    /// Sealed chunks in seal order (gpu), for oldest-first expiry across GPUs.
    chunk_fifo: VecDeque<GpuId>,
    /// Bucket rows in creation order per rollup tier.
    bucket_fifo: [VecDeque<GpuId>; 2],
    bytes: [usize; 3],
    expired: [u64; 3],
    rows: u64,
    rejected_out_of_order: u64,
    rejected_gpus: u64,
    retired_gpus: u64,
    restarted: u64,
    /// No tracked GPU can be stale (see [`SeriesStore::retire_stale`]) at or before this time
    /// (ms): set by a scan that found none, cleared when the set of GPUs changes. At the GPU cap
    /// every refused sample scanned every GPU (a 10k-sample batch held the state task for
    /// seconds, issue 27 #12); now one scan answers until the oldest GPU could be stale.
    none_stale_until: i64,
    /// Counts GPUs refused past their node's share (None: counted nowhere).
    share: Option<crate::share::ShareRefusals>,
    /// Decoded timestamp columns of recently read chunks, keyed by (GPU, chunk start): every
    /// metric of a chunk shares them, so a query over many metrics decodes them once. Bounded
    /// (cleared when full); chunks never change, and a GPU's chunk starts are unique.
    ts_cache: RefCell<TsCache>,
}

/// Decoded timestamps by (GPU, chunk start).
type TsCache = FastMap<(GpuId, i64), Arc<[i64]>>;

/// Chunks whose decoded timestamps are cached (~1 KiB each at 120 rows).
const TS_CACHE_CHUNKS: usize = 4096;

fn floor_to(ts: i64, res: i64) -> i64 {
    ts.div_euclid(res) * res
}

impl SeriesStore {
    pub fn new(metrics: usize, budgets: SeriesBudgets) -> Self {
        Self {
            metrics,
            budgets,
            gpus: Vec::new(),
            by_node: FastMap::default(),
            chunk_fifo: VecDeque::new(),
            bucket_fifo: [VecDeque::new(), VecDeque::new()],
            bytes: [0; 3],
            expired: [0; 3],
            rows: 0,
            rejected_out_of_order: 0,
            rejected_gpus: 0,
            retired_gpus: 0,
            restarted: 0,
            none_stale_until: i64::MIN,
            share: None,
            ts_cache: RefCell::new(FastMap::default()),
        }
    }

    pub fn metrics(&self) -> usize {
        self.metrics
    }

    /// Where GPUs refused past their node's share are counted.
    pub fn count_share_refusals(&mut self, share: crate::share::ShareRefusals) {
        self.share = Some(share);
    }

    fn bucket_row_bytes(&self) -> usize {
        BUCKET_ROW_OVERHEAD + self.metrics * std::mem::size_of::<Agg>()
    }

    /// A GPU sample event into the history (live ingest and recovery alike); false for any
    /// other event or a row the store refused.
    pub fn add_event(&mut self, ev: &v1::Event) -> bool {
        let Some(v1::event::Payload::GpuSample(g)) = &ev.payload else {
            return false;
        };
        let ms = gpulse_proto::listing::event_ms(ev);
        self.push(
            &ev.node,
            g.index,
            &g.uuid,
            ms,
            &gpulse_proto::metric::row(g),
        )
        .is_ok()
    }

    /// Stores one row (`values[m]` is metric m; NaN = absent).
    pub fn push(
        &mut self,
        node: &str,
        index: u32,
        uuid: &str,
        ts_ms: i64,
        values: &[f64],
    ) -> Result<(), Rejected> {
        let known = self
            .by_node
            .get(node)
            .and_then(|m| m.get(&index))
            .copied()
            .filter(|id| {
                // The node's clock stepped back further than a reordering explains: the GPU's
                // series starts again here (the old one keeps its history, queried with it, and
                // expires by the budgets) instead of refusing every sample until the clock has
                // caught up with the last one.
                let last = self.gpus[*id as usize].last_ms;
                let stepped_back = ts_ms < last.saturating_sub(BACKWARD_RESTART_MS);
                if stepped_back {
                    self.restarted += 1;
                }
                !stepped_back
            });
        let id = match known {
            Some(id) => id,
            None => {
                // A node past its share never takes a slot another node's GPU could have.
                if self.by_node.get(node).map_or(0, |m| m.len()) >= crate::share::GPUS_PER_NODE {
                    self.rejected_gpus += 1;
                    if let Some(s) = &self.share {
                        s.refused(node, crate::share::table::SAMPLES, 1);
                    }
                    return Err(Rejected::NodeShare);
                }
                let node: Arc<str> = Arc::from(node);
                let fresh = GpuSeries::new(node.clone(), index, uuid.to_string(), self.metrics);
                let id = if self.gpus.len() < self.budgets.max_gpus {
                    self.gpus.push(fresh);
                    self.none_stale_until = i64::MIN;
                    self.bytes[0] += GPU_OVERHEAD;
                    (self.gpus.len() - 1) as GpuId
                } else if let Some(id) = self.retire_stale(ts_ms) {
                    self.gpus[id as usize] = fresh;
                    id
                } else {
                    self.rejected_gpus += 1;
                    return Err(Rejected::TooManyGpus);
                };
                self.by_node.entry(node).or_default().insert(index, id);
                id
            }
        };
        let bucket_row = self.bucket_row_bytes();
        let metrics = self.metrics;
        let pressure = self.bytes[0] > self.budgets.raw && self.chunk_fifo.is_empty();
        let g = &mut self.gpus[id as usize];
        if ts_ms <= g.last_ms {
            self.rejected_out_of_order += 1;
            return Err(Rejected::OutOfOrder);
        }
        if !uuid.is_empty() && g.uuid != uuid {
            g.uuid = uuid.to_string();
        }
        g.last_ms = ts_ms;
        let before = head_bytes(g);
        g.head_ts.push(ts_ms);
        for m in 0..metrics {
            g.head[m].push(values.get(m).copied().unwrap_or(f64::NAN));
        }
        self.bytes[0] += head_bytes(g) - before;
        for t in 0..2 {
            let res = [60_000, 3_600_000][t];
            let start = floor_to(ts_ms, res);
            let b = &mut g.tiers[t];
            if b.starts.back() != Some(&start) {
                b.starts.push_back(start);
                b.aggs
                    .push_back(vec![Agg::EMPTY; metrics].into_boxed_slice());
                self.bucket_fifo[t].push_back(id);
                self.bytes[t + 1] += bucket_row;
            }
            if let Some(aggs) = b.aggs.back_mut() {
                for (m, a) in aggs.iter_mut().enumerate() {
                    let v = values.get(m).copied().unwrap_or(f64::NAN);
                    if !v.is_nan() {
                        a.add(ts_ms, v);
                    }
                }
            }
        }
        if g.head_ts.len() >= CHUNK_ROWS || (pressure && g.head_ts.len() >= PRESSURE_SEAL_ROWS) {
            let chunk = Chunk::seal(&g.head_ts, &g.head);
            self.bytes[0] += chunk.bytes();
            self.bytes[0] -= head_bytes(g);
            g.head_ts = Vec::new();
            for c in &mut g.head {
                *c = Vec::new();
            }
            g.chunks.push_back(chunk);
            self.chunk_fifo.push_back(id);
        }
        self.rows += 1;
        self.expire();
        Ok(())
    }

    /// At the GPU cap: frees the slot of the GPU whose latest sample is oldest, if that is
    /// more than [`RETIRE_AFTER_MS`] before `now_ms` (a GPU gone from the fleet must not keep a
    /// new one out). Its history goes with it. None while every tracked GPU is recent.
    fn retire_stale(&mut self, now_ms: i64) -> Option<GpuId> {
        // A GPU's latest sample time only grows (older samples are refused or start a new
        // series), so the oldest one bounds when any could be stale.
        if now_ms <= self.none_stale_until {
            return None;
        }
        let (id, g) = self
            .gpus
            .iter()
            .enumerate()
            .min_by_key(|(_, g)| g.last_ms)?;
        if g.last_ms >= now_ms.saturating_sub(RETIRE_AFTER_MS) {
            self.none_stale_until = g.last_ms.saturating_add(RETIRE_AFTER_MS);
            return None;
        }
        self.none_stale_until = i64::MIN;
        let id = id as GpuId;
        let g = &self.gpus[id as usize];
        self.bytes[0] -= head_bytes(g) + g.chunks.iter().map(Chunk::bytes).sum::<usize>();
        for t in 0..2 {
            self.bytes[t + 1] -= g.tiers[t].starts.len() * self.bucket_row_bytes();
        }
        if let Some(m) = self.by_node.get_mut(&g.node) {
            m.remove(&g.index);
            if m.is_empty() {
                let node = g.node.clone();
                self.by_node.remove(&node);
            }
        }
        // The slot is reused: no queued expiry may reach the new GPU's data.
        self.chunk_fifo.retain(|x| *x != id);
        for f in &mut self.bucket_fifo {
            f.retain(|x| *x != id);
        }
        self.ts_cache.borrow_mut().clear();
        self.retired_gpus += 1;
        Some(id)
    }

    /// GPUs whose history was dropped to make room for new ones.
    pub fn retired_gpus(&self) -> u64 {
        self.retired_gpus
    }

    /// Series started again because a GPU's sample times stepped back.
    pub fn restarted(&self) -> u64 {
        self.restarted
    }

    fn expire(&mut self) {
        while self.bytes[0] > self.budgets.raw {
            let Some(id) = self.chunk_fifo.pop_front() else {
                break;
            };
            if let Some(c) = self.gpus[id as usize].chunks.pop_front() {
                self.bytes[0] -= c.bytes();
                self.expired[0] += 1;
            }
        }
        let row = self.bucket_row_bytes();
        let budgets = [self.budgets.minute, self.budgets.hour];
        for (t, budget) in budgets.into_iter().enumerate() {
            // One FIFO entry per bucket row, in creation order: the front is the oldest row.
            while self.bytes[t + 1] > budget {
                let Some(id) = self.bucket_fifo[t].pop_front() else {
                    break;
                };
                let b = &mut self.gpus[id as usize].tiers[t];
                if b.starts.pop_front().is_some() {
                    b.aggs.pop_front();
                    self.bytes[t + 1] -= row;
                    self.expired[t + 1] += 1;
                }
            }
        }
    }

    pub fn gpus(&self) -> &[GpuSeries] {
        &self.gpus
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    pub fn rejected(&self) -> (u64, u64) {
        (self.rejected_out_of_order, self.rejected_gpus)
    }

    pub fn budgets(&self) -> SeriesBudgets {
        self.budgets
    }

    pub fn tier_stats(&self, tier: Tier) -> TierStats {
        let i = tier.idx();
        let oldest_ms = match tier {
            Tier::Raw => self
                .gpus
                .iter()
                .filter_map(|g| {
                    g.chunks
                        .front()
                        .map(|c| c.first_ms)
                        .or(g.head_ts.first().copied())
                })
                .min(),
            Tier::Minute | Tier::Hour => self
                .gpus
                .iter()
                .filter_map(|g| g.tiers[i - 1].starts.front().copied())
                .min(),
        };
        TierStats {
            bytes: self.bytes[i],
            budget: [self.budgets.raw, self.budgets.minute, self.budgets.hour][i],
            expired: self.expired[i],
            oldest_ms,
        }
    }

    /// Raw rows of `metric` for one GPU with `start <= ts < end`, oldest first (absent
    /// values skipped).
    pub fn raw_points(
        &self,
        g: &GpuSeries,
        metric: usize,
        start: i64,
        end: i64,
        mut f: impl FnMut(i64, f64),
    ) -> Result<(), CodecError> {
        self.raw_runs(g, metric, start, end, |ts, vals| {
            for (t, v) in ts.iter().zip(vals) {
                if *t >= start && *t < end && !v.is_nan() {
                    f(*t, *v);
                }
            }
        })
    }

    /// Runs of raw rows of `metric` (timestamps and values, oldest first, NaN = absent) from
    /// every chunk and head that meets `[start, end)`; rows at the edges may lie outside it.
    /// Chunks outside the window are skipped by their time bounds without decoding.
    pub fn raw_runs(
        &self,
        g: &GpuSeries,
        metric: usize,
        start: i64,
        end: i64,
        mut f: impl FnMut(&[i64], &[f64]),
    ) -> Result<(), CodecError> {
        let mut vals = Vec::with_capacity(CHUNK_ROWS);
        let first = g.chunks.partition_point(|c| c.last_ms < start);
        let id = self
            .by_node
            .get(&*g.node)
            .and_then(|m| m.get(&g.index))
            .copied()
            .unwrap_or(GpuId::MAX);
        for c in g.chunks.iter().skip(first) {
            if c.first_ms >= end {
                break;
            }
            let ts = self.chunk_ts(id, c)?;
            vals.clear();
            c.column(metric, &mut vals)?;
            f(&ts, &vals);
        }
        if let Some(col) = g.head.get(metric) {
            let from = g.head_ts.partition_point(|t| *t < start);
            f(&g.head_ts[from..], &col[from..]);
        }
        Ok(())
    }

    fn chunk_ts(&self, id: GpuId, c: &Chunk) -> Result<Arc<[i64]>, CodecError> {
        let key = (id, c.first_ms);
        if let Some(ts) = self.ts_cache.borrow().get(&key) {
            return Ok(ts.clone());
        }
        let mut ts = Vec::with_capacity(c.rows as usize);
        c.timestamps(&mut ts)?;
        let ts: Arc<[i64]> = ts.into();
        let mut cache = self.ts_cache.borrow_mut();
        if cache.len() >= TS_CACHE_CHUNKS {
            cache.clear();
        }
        cache.insert(key, ts.clone());
        Ok(ts)
    }

    /// Rollup buckets of `metric` for one GPU whose start lies in `[start, end)`.
    pub fn buckets(
        &self,
        g: &GpuSeries,
        tier: Tier,
        metric: usize,
        start: i64,
        end: i64,
        mut f: impl FnMut(i64, &Agg),
    ) {
        let Some(b) = g.tiers.get(tier.idx().wrapping_sub(1)) else {
            return;
        };
        let from = b.starts.partition_point(|s| *s < start);
        for (s, aggs) in b.starts.iter().skip(from).zip(b.aggs.iter().skip(from)) {
            if *s >= end {
                break;
            }
            if let Some(a) = aggs.get(metric)
                && a.count > 0
            {
                f(*s, a);
            }
        }
    }

    /// Rebuilds a store from snapshot parts (see `snapshot`). Accounting and FIFOs are
    /// recomputed from what is loaded.
    pub fn restore(metrics: usize, budgets: SeriesBudgets, gpus: Vec<GpuSeries>) -> Self {
        let mut s = Self::new(metrics, budgets);
        let bucket_row = s.bucket_row_bytes();
        let mut chunks: Vec<(i64, GpuId)> = Vec::new();
        let mut buckets: [Vec<(i64, GpuId)>; 2] = [Vec::new(), Vec::new()];
        for g in gpus.into_iter().take(budgets.max_gpus) {
            if g.head.len() != metrics || g.tiers.iter().any(|t| t.starts.len() != t.aggs.len()) {
                continue;
            }
            let id = s.gpus.len() as GpuId;
            s.bytes[0] += GPU_OVERHEAD + head_bytes(&g);
            for c in &g.chunks {
                s.bytes[0] += c.bytes();
                chunks.push((c.first_ms, id));
            }
            for (t, list) in buckets.iter_mut().enumerate() {
                for st in &g.tiers[t].starts {
                    s.bytes[t + 1] += bucket_row;
                    list.push((*st, id));
                }
            }
            s.by_node
                .entry(g.node.clone())
                .or_default()
                .insert(g.index, id);
            s.gpus.push(g);
        }
        chunks.sort();
        s.chunk_fifo = chunks.into_iter().map(|(_, id)| id).collect();
        for (fifo, mut list) in s.bucket_fifo.iter_mut().zip(buckets) {
            list.sort();
            *fifo = list.into_iter().map(|(_, id)| id).collect();
        }
        s.expire();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: i64) -> Vec<f64> {
        vec![
            (i % 100) as f64,
            1000.0,
            if i % 2 == 0 { f64::NAN } else { 5.0 },
        ]
    }

    #[test]
    fn rows_seal_into_chunks_and_read_back() {
        let mut s = SeriesStore::new(3, SeriesBudgets::default());
        let t0 = 1_764_000_000_000;
        for i in 0..1000 {
            s.push("n1", 0, "GPU-a", t0 + i * 1000, &row(i)).unwrap();
        }
        let g = &s.gpus()[0];
        assert_eq!(g.chunks.len(), 1000 / CHUNK_ROWS);
        assert_eq!(g.head_ts.len(), 1000 % CHUNK_ROWS);
        let mut got = Vec::new();
        s.raw_points(g, 0, t0 + 100_000, t0 + 900_000, |t, v| got.push((t, v)))
            .unwrap();
        assert_eq!(got.len(), 800);
        assert_eq!(got[0], (t0 + 100_000, 0.0));
        assert!(
            got.iter()
                .all(|(t, v)| *v == ((t - t0) / 1000 % 100) as f64)
        );
        let mut absent = 0;
        s.raw_points(g, 2, t0, t0 + 1_000_000, |_, _| absent += 1)
            .unwrap();
        assert_eq!(absent, 500, "absent values are skipped");
        // Seconds back: a reordering, refused (a step back of over a minute restarts the series).
        assert_eq!(
            s.push("n1", 0, "GPU-a", t0 + 990_000, &row(0)),
            Err(Rejected::OutOfOrder)
        );
    }

    #[test]
    fn rollups_match_raw() {
        let mut s = SeriesStore::new(3, SeriesBudgets::default());
        let t0 = 1_764_000_000_000; // a whole hour
        for i in 0..7200 {
            s.push("n1", 0, "", t0 + i * 1000, &row(i)).unwrap();
        }
        let g = &s.gpus()[0];
        let mut mins = Vec::new();
        s.buckets(g, Tier::Minute, 0, t0, t0 + 7_200_000, |st, a| {
            mins.push((st, *a))
        });
        assert_eq!(mins.len(), 120);
        let mut raw = Agg::EMPTY;
        s.raw_points(g, 0, t0 + 60_000, t0 + 120_000, |t, v| raw.add(t, v))
            .unwrap();
        let m = mins[1].1;
        assert_eq!(
            (m.min, m.max, m.sum, m.count, m.last),
            (raw.min, raw.max, raw.sum, raw.count, raw.last)
        );
        let mut hours = Vec::new();
        s.buckets(g, Tier::Hour, 0, t0, t0 + 7_200_000, |st, a| {
            hours.push((st, *a))
        });
        assert_eq!(hours.len(), 2);
        assert_eq!(hours[0].1.count, 3600);
    }

    #[test]
    fn each_tier_stays_within_its_budget_and_expires_oldest() {
        let budgets = SeriesBudgets {
            raw: 40_000,
            minute: 20_000,
            hour: 4_000,
            max_gpus: 4,
        };
        let mut s = SeriesStore::new(3, budgets);
        let t0 = 1_764_000_000_000;
        for i in 0..50_000 {
            for gpu in 0..4 {
                s.push("n1", gpu, "", t0 + i * 1000, &row(i + gpu as i64))
                    .unwrap();
            }
        }
        for t in Tier::ALL {
            let st = s.tier_stats(t);
            assert!(st.bytes <= st.budget, "{t:?} {st:?}");
            assert!(st.expired > 0, "{t:?} expired nothing");
            assert!(st.oldest_ms.unwrap() > t0);
        }
        // Every tracked GPU is recent: a fifth is refused rather than dropping a live one.
        let last = t0 + 49_999 * 1000;
        assert_eq!(
            s.push("n1", 9, "", last, &row(0)),
            Err(Rejected::TooManyGpus)
        );
        // Oldest first: every GPU keeps a suffix of its history.
        let raw_oldest = s.tier_stats(Tier::Raw).oldest_ms.unwrap();
        for g in s.gpus() {
            assert!(g.chunks.front().unwrap().first_ms >= raw_oldest);
        }
    }

    /// At the cap, a GPU silent for over an hour gives its slot (and its history) to a new one;
    /// accounting and expiry stay exact for the new GPU.
    #[test]
    fn a_stale_gpu_gives_its_slot_to_a_new_one() {
        let budgets = SeriesBudgets {
            raw: 1 << 20,
            minute: 1 << 20,
            hour: 1 << 20,
            max_gpus: 2,
        };
        let mut s = SeriesStore::new(3, budgets);
        let t0 = 1_764_000_000_000;
        for i in 0..600 {
            s.push("old", 0, "GPU-old", t0 + i * 1000, &row(i)).unwrap();
        }
        let later = t0 + 2 * RETIRE_AFTER_MS;
        for i in 0..600 {
            s.push("live", 0, "GPU-live", later + i * 1000, &row(i))
                .unwrap();
        }
        let raw_before = s.tier_stats(Tier::Raw).bytes;
        s.push("new", 0, "GPU-new", later + 700_000, &row(1))
            .unwrap();
        assert_eq!(s.retired_gpus(), 1);
        assert_eq!(s.gpus().len(), 2);
        assert!(s.gpus().iter().all(|g| &*g.node != "old"));
        assert!(
            s.tier_stats(Tier::Raw).bytes < raw_before,
            "the old GPU's chunks are freed"
        );
        // The freed GPU's data is gone from the accounting: recomputing from scratch agrees
        // (the raw tier directly: a copy's heads are allocated to their length only).
        let again = SeriesStore::restore(3, budgets, s.gpus().to_vec());
        for t in [Tier::Minute, Tier::Hour] {
            assert_eq!(again.tier_stats(t).bytes, s.tier_stats(t).bytes, "{t:?}");
        }
        let direct: usize = s
            .gpus()
            .iter()
            .map(|g| {
                GPU_OVERHEAD + head_bytes(g) + g.chunks.iter().map(Chunk::bytes).sum::<usize>()
            })
            .sum();
        assert_eq!(direct, s.tier_stats(Tier::Raw).bytes);
        // The live GPU was recent: it is never the one retired.
        assert_eq!(
            s.push("newer", 0, "GPU-newer", later + 700_001, &row(1)),
            Err(Rejected::TooManyGpus)
        );
    }

    /// Issue 27 #12: at the cap, every refused sample scanned every GPU for a stale one. One
    /// scan now answers until the oldest GPU could be stale, and a GPU that becomes stale is
    /// still retired then.
    #[test]
    fn refusals_at_the_cap_do_not_rescan_and_stale_gpus_still_retire() {
        let n = 20_000u32;
        let budgets = SeriesBudgets {
            raw: 64 << 20,
            minute: 1 << 20,
            hour: 1 << 20,
            max_gpus: n as usize,
        };
        let mut s = SeriesStore::new(3, budgets);
        let t0 = 1_764_000_000_000;
        for i in 0..n {
            let node = format!("full-{}", i / 8);
            s.push(&node, i % 8, "", t0 + i64::from(i), &row(1))
                .unwrap();
        }
        let started = std::time::Instant::now();
        for i in 0..n {
            let node = format!("late-{}", i / 8);
            assert_eq!(
                s.push(&node, i % 8, "", t0 + 60_000, &row(1)),
                Err(Rejected::TooManyGpus)
            );
        }
        // A guard with a wide margin (20,000 x 20,000 GPUs scanned took far longer).
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // Once the oldest GPU is past the retire age, a new one takes its slot.
        let later = t0 + RETIRE_AFTER_MS + 1;
        s.push("late-0", 0, "", later, &row(1)).unwrap();
        assert_eq!(s.retired_gpus(), 1);
        assert!(s.gpus().iter().any(|g| &*g.node == "late-0"));
    }

    /// Issue 27 #3: a node past its share of GPUs is refused for itself; another node's new
    /// GPU still gets a slot.
    #[test]
    fn a_node_past_its_share_leaves_room_for_others() {
        let budgets = SeriesBudgets {
            raw: 8 << 20,
            minute: 1 << 20,
            hour: 1 << 20,
            max_gpus: crate::share::GPUS_PER_NODE + 10,
        };
        let mut s = SeriesStore::new(3, budgets);
        let t0 = 1_764_000_000_000;
        for i in 0..1000u32 {
            let r = s.push("evil", i, "", t0, &row(1));
            if (i as usize) < crate::share::GPUS_PER_NODE {
                r.unwrap();
            } else {
                assert_eq!(r, Err(Rejected::NodeShare));
            }
        }
        s.push("good", 0, "", t0, &row(1)).unwrap();
        assert_eq!(s.gpus().len(), crate::share::GPUS_PER_NODE + 1);
    }

    /// More GPUs than the raw budget holds heads for: heads are sealed early and chunks
    /// expire, so what the raw tier holds (its heads as allocated included) stays near its
    /// budget, and the accounting is exact.
    #[test]
    fn many_gpus_keep_the_raw_tier_near_its_budget() {
        let budgets = SeriesBudgets {
            raw: 2 << 20,
            minute: 64 << 20,
            hour: 64 << 20,
            max_gpus: 100_000,
        };
        let metrics = 14;
        let mut s = SeriesStore::new(metrics, budgets);
        let t0 = 1_764_000_000_000;
        let vals: Vec<f64> = (0..metrics).map(|m| m as f64).collect();
        for i in 0..100i64 {
            for gpu in 0..4000u32 {
                // 8 GPUs a node: a node's share is far above that.
                let node = format!("n{}", gpu / 8);
                s.push(&node, gpu % 8, "", t0 + i * 1000, &vals).unwrap();
            }
        }
        let raw = s.tier_stats(Tier::Raw).bytes;
        let direct: usize = s
            .gpus()
            .iter()
            .map(|g| {
                GPU_OVERHEAD + head_bytes(g) + g.chunks.iter().map(Chunk::bytes).sum::<usize>()
            })
            .sum();
        assert_eq!(direct, raw, "accounting counts the heads as allocated");
        // Per GPU at most an early-sealed head's worth beyond the budget (fixed overhead and
        // fewer than 2 x 8 rows of 15 columns).
        let floor = 4000 * (GPU_OVERHEAD + 15 * 16 * 8);
        assert!(
            raw <= budgets.raw.max(floor),
            "{raw} > {} and > {floor}",
            budgets.raw
        );
        assert!(s.tier_stats(Tier::Raw).expired > 0);
        // Before, every GPU kept a preallocated head of 120 rows: 4000 x 14 KiB = 55 MiB.
        assert!(raw < 12 << 20, "{raw}");
    }

    /// A node clock that steps back an hour: the GPU's series starts again instead of refusing
    /// every sample for an hour; both parts stay queryable.
    #[test]
    fn a_clock_stepping_back_restarts_the_series() {
        let mut s = SeriesStore::new(3, SeriesBudgets::default());
        let t0 = 1_764_000_000_000;
        for i in 0..300 {
            s.push("n", 0, "GPU-a", t0 + i * 1000, &row(i)).unwrap();
        }
        // A few seconds back: a reordering, refused.
        assert_eq!(
            s.push("n", 0, "GPU-a", t0 + 295_000, &row(1)),
            Err(Rejected::OutOfOrder)
        );
        let back = t0 - 3_600_000;
        for i in 0..10 {
            s.push("n", 0, "GPU-a", back + i * 1000, &row(i)).unwrap();
        }
        assert_eq!(s.restarted(), 1);
        assert_eq!(s.gpus().len(), 2, "the old series keeps its history");
        let total: usize = s
            .gpus()
            .iter()
            .map(|g| {
                let mut n = 0;
                s.raw_points(g, 0, i64::MIN, i64::MAX, |_, _| n += 1)
                    .unwrap();
                n
            })
            .sum();
        assert_eq!(total, 310);
    }
}
