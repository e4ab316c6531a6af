//! Column codecs for sealed sample chunks.
//!
//! A chunk holds the rows of one GPU (one timestamp per row, one column per metric), so a row's
//! timestamp is stored once however many metrics it carries; each column is encoded on its own
//! and can be decoded without touching the others.
//!
//! - Timestamps (ms): delta-of-delta with Gorilla's prefix buckets.
//! - Values: a constant column is stored once; if every value in the column is an integer (all NVML fields are), zig-zag deltas or
//!   delta-of-deltas (whichever is smaller for this column, chosen at seal time) in prefix
//!   buckets; otherwise Gorilla's XOR encoding of the f64 bits. Absent values (NaN) cost one bit
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

pub struct BitReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn read(&mut self, bits: u32) -> Result<u64, CodecError> {
        let mut out = 0u64;
        let mut left = bits;
        while left > 0 {
            let byte = *self.buf.get(self.pos / 8).ok_or(CodecError::Truncated)?;
            let off = (self.pos % 8) as u32;
            let room = 8 - off;
            let take = room.min(left);
            let chunk = (byte >> (room - take)) & ((1u16 << take) - 1) as u8;
            out = (out << take) | u64::from(chunk);
            self.pos += take as usize;
            left -= take;
        }
        Ok(out)
    }

    pub fn bit(&mut self) -> Result<bool, CodecError> {
        Ok(self.read(1)? == 1)
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

fn get_signed(r: &mut BitReader) -> Result<i64, CodecError> {
    let mut ones = 0;
    while ones < 5 && r.bit()? {
        ones += 1;
    }
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

/// Timestamps (ms): first as 64 bits, then delta-of-delta.
pub fn encode_ts(ts: &[i64]) -> Vec<u8> {
    let mut w = BitWriter::default();
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

pub fn decode_ts(buf: &[u8], n: usize, out: &mut Vec<i64>) -> Result<(), CodecError> {
    let mut r = BitReader::new(buf);
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
/// Largest magnitude stored as an integer (f64 represents every integer up to 2^53 exactly).
const MAX_INT: f64 = 9_007_199_254_740_992.0;

/// Encodes one column (NaN = absent). Layout: 3 bits mode (empty, delta, delta-of-delta, XOR,
/// constant), 1 bit "all present" (else one
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
        if dd < d { MODE_DOD } else { MODE_DELTA }
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
        _ => {}
    }
    w.finish()
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
    let all = r.bit()?;
    let mut presence = Vec::new();
    let count = if all {
        n
    } else {
        presence.reserve(n);
        for _ in 0..n {
            presence.push(r.bit()?);
        }
        presence.iter().filter(|p| **p).count()
    };
    let mut present = Vec::with_capacity(count);
    match mode {
        MODE_EMPTY => {}
        MODE_DELTA | MODE_DOD => {
            let mut prev = 0i64;
            let mut prev_delta = 0i64;
            for i in 0..count {
                let x = if i == 0 {
                    get_signed(&mut r)?
                } else {
                    let delta = if mode == MODE_DELTA {
                        get_signed(&mut r)?
                    } else {
                        prev_delta.wrapping_add(get_signed(&mut r)?)
                    };
                    prev_delta = delta;
                    prev.wrapping_add(delta)
                };
                present.push(x as f64);
                prev = x;
            }
        }
        MODE_XOR => xor_decode(&mut r, count, &mut present)?,
        MODE_CONST => {
            let v = f64::from_bits(r.read(64)?);
            present.extend(std::iter::repeat_n(v, count));
        }
        m => return Err(CodecError::Mode(m)),
    }
    if all {
        if mode == MODE_EMPTY {
            out.extend(std::iter::repeat_n(f64::NAN, n));
        } else {
            out.extend_from_slice(&present);
        }
    } else {
        let mut it = present.into_iter();
        for p in presence {
            out.push(if p {
                it.next().ok_or(CodecError::Truncated)?
            } else {
                f64::NAN
            });
        }
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
        // Regular 1 s samples cost ~1 bit each after the first.
        let reg: Vec<i64> = (0..120).map(|i| 1_764_000_000_000 + i * 1000).collect();
        assert!(encode_ts(&reg).len() <= 8 + 3 + 16);
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
}
