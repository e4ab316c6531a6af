//! Column codecs for sealed sample chunks.
//!
//! A chunk holds the rows of one GPU (one timestamp per row, one column per metric), so a row's
//! timestamp is stored once however many metrics it carries; each column is encoded on its own
//! and can be decoded without touching the others.
//!
//! - Timestamps (ms): offsets from a regular grid (sampler jitter only), or delta-of-delta with
//!   Gorilla's prefix buckets when the rows are irregular.
//! - Values: a constant column is stored once; if every value in the column is an integer (all
//!   NVML fields are), the smallest of zig-zag deltas or delta-of-deltas in prefix buckets, or
//!   frame-of-reference bit packing (noisy gauges), chosen per column at seal time; otherwise Gorilla's XOR encoding of the f64 bits. Absent values (NaN) cost one bit
//!   each, and nothing when the whole column is present.
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("column ends early")]
    Truncated,
    #[error("unknown column mode {0}")]
    Mode(u8),
}

/// Appends bits MSB-first.
#[derive(Default)]
pub struct BitWriter {
    buf: Vec<u8>,
    /// Bits used in the last byte (0 = byte-aligned).
    used: u32,
}

impl BitWriter {
    pub fn write(&mut self, value: u64, bits: u32) {
        let mut left = bits;
        while left > 0 {
            if self.used == 0 {
                self.buf.push(0);
            }
            let room = 8 - self.used;
            let take = room.min(left);
            let chunk = ((value >> (left - take)) & ((1u64 << take) - 1)) as u8;
            if let Some(last) = self.buf.last_mut() {
                *last |= chunk << (room - take);
            }
            self.used = (self.used + take) % 8;
            left -= take;
        }
    }

    pub fn bit(&mut self, b: bool) {
        self.write(u64::from(b), 1);
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads bits MSB-first through a 64-bit window.
pub struct BitReader<'a> {
    buf: &'a [u8],
    /// Next byte of `buf` to load.
    pos: usize,
    /// Loaded bits, MSB-aligned.
    acc: u64,
    bits: u32,
}

impl<'a> BitReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            acc: 0,
            bits: 0,
        }
    }

    #[inline]
    fn refill(&mut self) {
        while self.bits <= 56 {
            let Some(b) = self.buf.get(self.pos) else {
                return;
            };
            self.acc |= u64::from(*b) << (56 - self.bits);
            self.bits += 8;
            self.pos += 1;
        }
    }

    pub fn read(&mut self, n: u32) -> Result<u64, CodecError> {
        if n > 56 {
            let hi = self.read_small(n - 32)?;
            let lo = self.read_small(32)?;
            return Ok((hi << 32) | lo);
        }
        self.read_small(n)
    }

    /// At most 56 bits.
    #[inline(always)]
    fn read_small(&mut self, n: u32) -> Result<u64, CodecError> {
        if n == 0 {
            return Ok(0);
        }
        if self.bits < n {
            self.refill();
            if self.bits < n {
                return Err(CodecError::Truncated);
            }
        }
        let v = self.acc >> (64 - n);
        self.acc <<= n;
        self.bits -= n;
        Ok(v)
    }

    /// Bits consumed so far.
    fn bit_pos(&self) -> usize {
        self.pos * 8 - self.bits as usize
    }

    /// Continues reading at bit `pos` (at or beyond the current position, within the buffer).
    fn skip_to(&mut self, pos: usize) {
        self.pos = pos / 8;
        self.acc = 0;
        self.bits = 0;
        let rem = (pos % 8) as u32;
        if rem > 0 {
            self.refill();
            self.acc <<= rem;
            self.bits = self.bits.saturating_sub(rem);
        }
    }

    #[inline]
    pub fn bit(&mut self) -> Result<bool, CodecError> {
        Ok(self.read_small(1)? == 1)
    }

    /// Consecutive one bits (at most `max`), consuming them and the zero that ends them.
    #[inline]
    fn ones(&mut self, max: u32) -> Result<u32, CodecError> {
        if self.bits <= max {
            self.refill();
        }
        let avail = self.bits.min(max + 1);
        let n = self.acc.leading_ones().min(max);
        if n >= avail {
            return Err(CodecError::Truncated);
        }
        // Consume the ones and, below `max`, the terminating zero.
        let used = if n < max { n + 1 } else { n };
        self.acc <<= used;
        self.bits -= used;
        Ok(n)
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Prefix buckets for signed integers: `0` = zero, then `10`/`110`/`1110`/`11110` + 5/9/16/32
/// zig-zag bits, `11111` + 64 bits.
const BUCKETS: [u32; 4] = [5, 9, 16, 32];

fn put_signed(w: &mut BitWriter, v: i64) {
    if v == 0 {
        w.bit(false);
        return;
    }
    let z = zigzag(v);
    for (i, bits) in BUCKETS.iter().enumerate() {
        if z < (1u64 << bits) {
            // i+1 ones then a zero.
            w.write(((1u64 << (i + 1)) - 1) << 1, i as u32 + 2);
            w.write(z, *bits);
            return;
        }
    }
    w.write(0b11111, 5);
    w.write(z, 64);
}

#[inline]
fn get_signed(r: &mut BitReader) -> Result<i64, CodecError> {
    let ones = r.ones(5)? as usize;
    if ones == 0 {
        return Ok(0);
    }
    let bits = if ones == 5 { 64 } else { BUCKETS[ones - 1] };
    Ok(unzigzag(r.read(bits)?))
}

fn signed_cost(v: i64) -> usize {
    if v == 0 {
        return 1;
    }
    let z = zigzag(v);
    for (i, bits) in BUCKETS.iter().enumerate() {
        if z < (1u64 << bits) {
            return i + 2 + *bits as usize;
        }
    }
    69
}

/// Widest residual the grid layout is used for; beyond it timestamps are irregular.
const GRID_MAX_WIDTH: u32 = 24;

/// Timestamps (ms). Samplers tick at a fixed interval with a little jitter, so the usual layout
/// is a grid: 1 bit tag, first time (64 bits), interval (32), smallest residual (64), residual
/// width (6), then each row's offset from the grid point `first + i * interval` in that width:
/// smaller than delta-of-delta (jitter, not jitter differences) and decoded without branches.
/// Irregular rows fall back to delta-of-delta with Gorilla's prefix buckets.
pub fn encode_ts(ts: &[i64]) -> Vec<u8> {
    let mut w = BitWriter::default();
    if let Some(grid) = grid(ts) {
        let (first, interval, min, width) = grid;
        w.bit(true);
        w.write(first as u64, 64);
        w.write(interval as u64, 32);
        w.write(min as u64, 64);
        w.write(u64::from(width), 6);
        for (i, t) in ts.iter().enumerate() {
            let r = t - (first + i as i64 * interval);
            w.write((r - min) as u64, width);
        }
        return w.finish();
    }
    w.bit(false);
    let mut prev = 0i64;
    let mut prev_delta = 0i64;
    for (i, &t) in ts.iter().enumerate() {
        if i == 0 {
            w.write(t as u64, 64);
        } else {
            let delta = t.wrapping_sub(prev);
            put_signed(&mut w, delta.wrapping_sub(prev_delta));
            prev_delta = delta;
        }
        prev = t;
    }
    w.finish()
}

/// (first, interval, smallest residual, residual width) when the rows sit close to a grid.
fn grid(ts: &[i64]) -> Option<(i64, i64, i64, u32)> {
    let (first, last) = (*ts.first()?, *ts.last()?);
    let n = ts.len() as i64;
    let interval = if n > 1 {
        last.checked_sub(first)? / (n - 1)
    } else {
        0
    };
    if !(0..=i64::from(u32::MAX)).contains(&interval) {
        return None;
    }
    let mut min = i64::MAX;
    let mut max = i64::MIN;
    for (i, t) in ts.iter().enumerate() {
        let r = t.checked_sub(first.checked_add((i as i64).checked_mul(interval)?)?)?;
        min = min.min(r);
        max = max.max(r);
    }
    let width = 64 - (max.checked_sub(min)? as u64).leading_zeros();
    (width <= GRID_MAX_WIDTH).then_some((first, interval, min, width))
}

pub fn decode_ts(buf: &[u8], n: usize, out: &mut Vec<i64>) -> Result<(), CodecError> {
    let mut r = BitReader::new(buf);
    if n == 0 {
        return Ok(());
    }
    if r.bit()? {
        let first = r.read(64)? as i64;
        let interval = r.read(32)? as i64;
        let min = r.read(64)? as i64;
        let width = r.read(6)? as u32;
        if width > GRID_MAX_WIDTH {
            return Err(CodecError::Mode(width as u8));
        }
        let mut base = first.wrapping_add(min);
        for _ in 0..n {
            out.push(base.wrapping_add(r.read_small(width)? as i64));
            base = base.wrapping_add(interval);
        }
        return Ok(());
    }
    let mut prev = 0i64;
    let mut prev_delta = 0i64;
    for i in 0..n {
        let t = if i == 0 {
            r.read(64)? as i64
        } else {
            let delta = prev_delta.wrapping_add(get_signed(&mut r)?);
            prev_delta = delta;
            prev.wrapping_add(delta)
        };
        out.push(t);
        prev = t;
    }
    Ok(())
}

const MODE_EMPTY: u8 = 0;
const MODE_DELTA: u8 = 1;
const MODE_DOD: u8 = 2;
const MODE_XOR: u8 = 3;
const MODE_CONST: u8 = 4;
const MODE_FOR: u8 = 5;
/// Largest magnitude stored as an integer (f64 represents every integer up to 2^53 exactly).
const MAX_INT: f64 = 9_007_199_254_740_992.0;

/// Encodes one column (NaN = absent). Layout: 3 bits mode (empty, delta, delta-of-delta, XOR,
/// constant, frame-of-reference), 1 bit "all present" (else one
/// presence bit per row), then the present values.
pub fn encode_values(vals: &[f64]) -> Vec<u8> {
    let present: Vec<f64> = vals.iter().copied().filter(|v| !v.is_nan()).collect();
    let all = present.len() == vals.len();
    let ints = present
        .iter()
        .all(|v| v.fract() == 0.0 && v.abs() <= MAX_INT);
    let mode = if present.is_empty() {
        MODE_EMPTY
    } else if present.iter().all(|v| v.to_bits() == present[0].to_bits()) {
        MODE_CONST
    } else if ints {
        let iv: Vec<i64> = present.iter().map(|v| *v as i64).collect();
        let (d, dd) = int_costs(&iv);
        let (_, w) = frame(&iv);
        let f = 71 + iv.len() * w as usize;
        if f < d && f < dd {
            MODE_FOR
        } else if dd < d {
            MODE_DOD
        } else {
            MODE_DELTA
        }
    } else {
        MODE_XOR
    };
    let mut w = BitWriter::default();
    w.write(u64::from(mode), 3);
    w.bit(all);
    if !all {
        for v in vals {
            w.bit(!v.is_nan());
        }
    }
    match mode {
        MODE_DELTA | MODE_DOD => {
            let mut prev = 0i64;
            let mut prev_delta = 0i64;
            for (i, v) in present.iter().enumerate() {
                let x = *v as i64;
                if i == 0 {
                    put_signed(&mut w, x);
                } else {
                    let delta = x.wrapping_sub(prev);
                    if mode == MODE_DELTA {
                        put_signed(&mut w, delta);
                    } else {
                        put_signed(&mut w, delta.wrapping_sub(prev_delta));
                    }
                    prev_delta = delta;
                }
                prev = x;
            }
        }
        MODE_XOR => xor_encode(&mut w, &present),
        MODE_CONST => w.write(present[0].to_bits(), 64),
        MODE_FOR => {
            let iv: Vec<i64> = present.iter().map(|v| *v as i64).collect();
            let (min, width) = frame(&iv);
            w.write(min as u64, 64);
            w.write(u64::from(width), 7);
            for x in iv {
                w.write(x.wrapping_sub(min) as u64, width);
            }
        }
        _ => {}
    }
    w.finish()
}

/// Frame of reference: the minimum and the bit width of the largest offset from it.
fn frame(iv: &[i64]) -> (i64, u32) {
    let min = iv.iter().copied().min().unwrap_or(0);
    let max = iv.iter().copied().max().unwrap_or(0);
    let span = max.wrapping_sub(min) as u64;
    (min, 64 - span.leading_zeros())
}

fn int_costs(iv: &[i64]) -> (usize, usize) {
    let (mut d, mut dd) = (0, 0);
    let mut prev_delta = 0i64;
    for i in 1..iv.len() {
        let delta = iv[i].wrapping_sub(iv[i - 1]);
        d += signed_cost(delta);
        dd += signed_cost(delta.wrapping_sub(prev_delta));
        prev_delta = delta;
    }
    (d, dd)
}

/// Gorilla XOR: `0` same value; `10` + meaningful bits inside the previous window; `11` + 6 bits
/// leading zeros + 6 bits (length - 1) + the bits.
fn xor_encode(w: &mut BitWriter, vals: &[f64]) {
    let mut prev = 0u64;
    let (mut lead, mut trail) = (u32::MAX, 0u32);
    for (i, v) in vals.iter().enumerate() {
        let bits = v.to_bits();
        if i == 0 {
            w.write(bits, 64);
            prev = bits;
            continue;
        }
        let x = bits ^ prev;
        prev = bits;
        if x == 0 {
            w.bit(false);
            continue;
        }
        w.bit(true);
        let l = x.leading_zeros().min(63);
        let t = x.trailing_zeros();
        if lead != u32::MAX && l >= lead && t >= trail {
            w.bit(false);
            w.write(x >> trail, 64 - lead - trail);
        } else {
            w.bit(true);
            lead = l;
            trail = t;
            let len = 64 - l - t;
            w.write(u64::from(l), 6);
            w.write(u64::from(len - 1), 6);
            w.write(x >> t, len);
        }
    }
}

fn xor_decode(r: &mut BitReader, n: usize, out: &mut Vec<f64>) -> Result<(), CodecError> {
    let mut prev = 0u64;
    let (mut lead, mut trail) = (0u32, 0u32);
    for i in 0..n {
        if i == 0 {
            prev = r.read(64)?;
        } else if r.bit()? {
            if r.bit()? {
                lead = r.read(6)? as u32;
                let len = r.read(6)? as u32 + 1;
                trail = 64u32.saturating_sub(lead + len);
            }
            let len = 64 - lead - trail;
            prev ^= r.read(len)? << trail;
        }
        out.push(f64::from_bits(prev));
    }
    Ok(())
}

/// Decodes a column of `n` rows into `out` (NaN where absent).
pub fn decode_values(buf: &[u8], n: usize, out: &mut Vec<f64>) -> Result<(), CodecError> {
    let mut r = BitReader::new(buf);
    let mode = r.read(3)? as u8;
    if r.bit()? {
        // Every row present (the usual case): decode straight into `out`.
        if mode == MODE_EMPTY {
            out.extend(std::iter::repeat_n(f64::NAN, n));
            return Ok(());
        }
        return decode_present(&mut r, mode, n, out);
    }
    let mut presence = Vec::with_capacity(n);
    for _ in 0..n {
        presence.push(r.bit()?);
    }
    let count = presence.iter().filter(|p| **p).count();
    let mut present = Vec::with_capacity(count);
    if mode != MODE_EMPTY {
        decode_present(&mut r, mode, count, &mut present)?;
    }
    let mut it = present.into_iter();
    for p in presence {
        out.push(if p {
            it.next().ok_or(CodecError::Truncated)?
        } else {
            f64::NAN
        });
    }
    Ok(())
}

/// Frame-of-reference values: `count` fields of `width` (1..=56) bits from the reader's
/// position, each added to `min`. Each field is read straight out of the 8 bytes that hold it
/// (a field plus its bit offset fits in 64 bits at these widths): no per-value refill or error
/// path, which made this loop most of a window query's decode time.
fn unpack(
    r: &mut BitReader,
    min: i64,
    width: u32,
    count: usize,
    out: &mut Vec<f64>,
) -> Result<(), CodecError> {
    if width == 0 {
        out.extend(std::iter::repeat_n(min as f64, count));
        return Ok(());
    }
    let buf = r.buf;
    let base = r.bit_pos();
    let w = width as usize;
    let end = count
        .checked_mul(w)
        .and_then(|b| b.checked_add(base))
        .ok_or(CodecError::Truncated)?;
    if end > buf.len() * 8 {
        return Err(CodecError::Truncated);
    }
    let field = |word: u64, bit: usize| {
        let v = (word << (bit & 7)) >> (64 - width);
        min.wrapping_add(v as i64) as f64
    };
    let mut i = 0;
    while i < count {
        let bit = base + i * w;
        let Some(b) = buf.get(bit >> 3..(bit >> 3) + 8) else {
            break;
        };
        let mut word = [0u8; 8];
        word.copy_from_slice(b);
        out.push(field(u64::from_be_bytes(word), bit));
        i += 1;
    }
    // The last few fields: their 8-byte window runs past the end, which reads as zeros.
    for i in i..count {
        let bit = base + i * w;
        let mut word = [0u8; 8];
        let tail = buf.get(bit >> 3..).unwrap_or_default();
        word[..tail.len().min(8)].copy_from_slice(&tail[..tail.len().min(8)]);
        out.push(field(u64::from_be_bytes(word), bit));
    }
    r.skip_to(end);
    Ok(())
}

/// The `count` present values of a column in `mode`.
fn decode_present(
    r: &mut BitReader,
    mode: u8,
    count: usize,
    out: &mut Vec<f64>,
) -> Result<(), CodecError> {
    out.reserve(count);
    match mode {
        MODE_DELTA | MODE_DOD => {
            let mut prev = 0i64;
            let mut prev_delta = 0i64;
            for i in 0..count {
                let x = if i == 0 {
                    get_signed(r)?
                } else {
                    let delta = if mode == MODE_DELTA {
                        get_signed(r)?
                    } else {
                        prev_delta.wrapping_add(get_signed(r)?)
                    };
                    prev_delta = delta;
                    prev.wrapping_add(delta)
                };
                out.push(x as f64);
                prev = x;
            }
        }
        MODE_XOR => xor_decode(r, count, out)?,
        MODE_CONST => {
            let v = f64::from_bits(r.read(64)?);
            out.extend(std::iter::repeat_n(v, count));
        }
        MODE_FOR => {
            let min = r.read(64)? as i64;
            let width = r.read(7)? as u32;
            if width > 64 {
                return Err(CodecError::Mode(MODE_FOR));
            }
            if width <= 56 {
                unpack(r, min, width, count, out)?;
            } else {
                for _ in 0..count {
                    out.push(min.wrapping_add(r.read(width)? as i64) as f64);
                }
            }
        }
        m => return Err(CodecError::Mode(m)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(vals: &[f64]) -> usize {
        let enc = encode_values(vals);
        let mut out = Vec::new();
        decode_values(&enc, vals.len(), &mut out).unwrap();
        assert_eq!(out.len(), vals.len());
        for (a, b) in vals.iter().zip(&out) {
            assert!(
                (a.is_nan() && b.is_nan()) || a.to_bits() == b.to_bits(),
                "{a} != {b}"
            );
        }
        enc.len()
    }

    #[test]
    fn timestamps_roundtrip_with_jitter_and_steps() {
        let mut ts = vec![1_764_000_000_000i64];
        for i in 1..500 {
            let jitter = [0, 3, -2, 0, 1][i % 5];
            let step = if i == 250 { -7_000 } else { 1000 };
            ts.push(ts[i - 1] + step + jitter);
        }
        let enc = encode_ts(&ts);
        let mut out = Vec::new();
        decode_ts(&enc, ts.len(), &mut out).unwrap();
        assert_eq!(out, ts);
        // Regular 1 s samples with 0-4 ms of jitter: 3 bits a row after a 21-byte header.
        let reg: Vec<i64> = (0..120)
            .map(|i| 1_764_000_000_000 + i * 1000 + (i * 7919) % 5)
            .collect();
        let enc = encode_ts(&reg);
        assert!(enc.len() <= 21 + 45, "{}", enc.len());
        let mut out = Vec::new();
        decode_ts(&enc, reg.len(), &mut out).unwrap();
        assert_eq!(out, reg);
        for odd in [
            vec![5],
            vec![],
            vec![i64::MIN, i64::MAX],
            vec![0, 10, 5, 1 << 40],
        ] {
            let mut out = Vec::new();
            decode_ts(&encode_ts(&odd), odd.len(), &mut out).unwrap();
            assert_eq!(out, odd);
        }
    }

    #[test]
    fn values_roundtrip_in_every_mode() {
        assert!(
            roundtrip(&[42.0; 120]) <= 9,
            "a constant column is one value"
        );
        assert!(roundtrip(&[0.25, 0.25, f64::NAN, 0.25]) <= 10);
        roundtrip(&(0..120).map(|i| (i * 7 % 101) as f64).collect::<Vec<_>>());
        roundtrip(
            &(0..120)
                .map(|i| 1e15 + (i * 1_000_003) as f64)
                .collect::<Vec<_>>(),
        );
        roundtrip(&[i64::MAX as f64, -(i64::MAX as f64), 0.0, 1e300, -0.5, 3.25]);
        roundtrip(
            &(0..120)
                .map(|i| (i as f64 * 0.37).sin() * 250.0)
                .collect::<Vec<_>>(),
        );
        roundtrip(&[f64::NAN, 1.0, f64::NAN, 2.0, 2.0]);
        roundtrip(&[f64::NAN; 7]);
        roundtrip(&[f64::NAN, 0.1, f64::NAN, 0.30000000000000004]);
        roundtrip(&[]);
        roundtrip(&[f64::INFINITY, f64::NEG_INFINITY, 1.0, -0.0]);
    }

    #[test]
    fn noisy_gauges_pack_to_their_range() {
        // Power in mW jittering over a 100 W range: ~17 bits each, not 36.
        let vals: Vec<f64> = (0..120u64)
            .map(|i| (550_000 + (i.wrapping_mul(2_654_435_761) % 100_000)) as f64)
            .collect();
        let n = roundtrip(&vals);
        assert!(n <= 10 + 120 * 17 / 8, "{n} bytes");
        roundtrip(&[i64::MIN as f64 / 2.0, i64::MAX as f64 / 2.0, 0.0, 5.0]);
    }

    #[test]
    fn counters_pick_delta_of_delta() {
        // An energy counter growing ~300 J/s: deltas are large, delta-of-deltas small.
        let vals: Vec<f64> = (0..120)
            .map(|i| 5_000_000_000.0 + (i * 300_000 + (i % 3) * 7) as f64)
            .collect();
        let n = roundtrip(&vals);
        assert!(n < 120 * 2, "{n} bytes");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let enc = encode_values(&(0..50).map(|i| (i * i) as f64).collect::<Vec<_>>());
        for cut in 0..enc.len() {
            let mut out = Vec::new();
            let _ = decode_values(&enc[..cut], 50, &mut out);
        }
        let mut out = Vec::new();
        assert_eq!(decode_ts(&[1, 2], 3, &mut out), Err(CodecError::Truncated));
    }

    /// Frame-of-reference columns at every width, any length, with and without absent values,
    /// read back exactly (the unpacker reads 8-byte windows, so widths and ends matter); cut
    /// short, they fail instead of inventing values.
    #[test]
    fn packed_columns_roundtrip_at_every_width() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for width in 1..=52u32 {
            for n in [1usize, 2, 7, 8, 9, 63, 120, 121] {
                let base = (next() % 1_000_000) as i64 - 500_000;
                let vals: Vec<f64> = (0..n)
                    .map(|i| {
                        if n > 8 && i % 11 == 3 {
                            f64::NAN
                        } else {
                            (base + (next() & ((1u64 << width) - 1)) as i64) as f64
                        }
                    })
                    .collect();
                let enc = encode_values(&vals);
                if n >= 63 {
                    assert_eq!(enc[0] >> 5, MODE_FOR, "width {width}: packed");
                }
                let mut out = Vec::new();
                decode_values(&enc, n, &mut out).unwrap();
                for (a, b) in vals.iter().zip(&out) {
                    assert!(
                        (a.is_nan() && b.is_nan()) || a == b,
                        "width {width} n {n}: {a} != {b}"
                    );
                }
                assert_eq!(out.len(), n);
                for cut in [enc.len() / 2, enc.len().saturating_sub(1)] {
                    let mut out = Vec::new();
                    if cut < enc.len() && decode_values(&enc[..cut], n, &mut out).is_ok() {
                        // Only trailing zero bits may be cut without losing a value.
                        assert!(enc[cut..].iter().all(|b| *b == 0), "width {width} n {n}");
                    }
                }
            }
        }
    }
}
