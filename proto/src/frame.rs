//! The log frame, one home for both append-only logs: the agent's spool log
//! (`agent/src/spool_log.rs`) and the collector's write-ahead log (`collector/src/store/wal.rs`).
//!
//! `[u32 len][u32 crc32][u8 type][payload]`, little-endian; the CRC (IEEE, crc32fast) covers the
//! type byte and the payload, so a frame whose type was flipped is as damaged as one whose
//! payload was. Each log gives the types their meaning and its own largest frame; docs/store.md
//! is the format page.
use std::ops::Range;

/// Bytes before the payload.
pub const HEADER: usize = 9;

/// Why the bytes at an offset are not a whole, intact frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("truncated frame header")]
    TruncatedHeader,
    #[error("frame length {len} is more than the largest frame ({max})")]
    TooLong { len: usize, max: usize },
    #[error("frame length {0} runs past the end")]
    PastEnd(usize),
    #[error("checksum mismatch")]
    Checksum,
}

/// An intact frame: its type, where its payload lies, where the next frame starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub ty: u8,
    pub payload: Range<usize>,
    pub end: usize,
}

fn crc(ty: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[ty]);
    h.update(payload);
    h.finalize()
}

/// Appends one frame to `buf`.
pub fn write(buf: &mut Vec<u8>, ty: u8, payload: &[u8]) {
    buf.reserve(HEADER + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc(ty, payload).to_le_bytes());
    buf.push(ty);
    buf.extend_from_slice(payload);
}

/// A frame begun in `buf` whose payload is then appended in place (a batch written entry by
/// entry, without a copy); [`Open::finish`] fills in its length and checksum.
#[derive(Debug)]
pub struct Open {
    start: usize,
}

impl Open {
    pub fn begin(buf: &mut Vec<u8>, ty: u8) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&[0; HEADER - 1]);
        buf.push(ty);
        Self { start }
    }

    /// Payload bytes appended so far.
    pub fn payload_len(&self, buf: &[u8]) -> usize {
        buf.len() - self.start - HEADER
    }

    /// Seals the frame: everything after its header up to the end of `buf` is its payload.
    pub fn finish(&self, buf: &mut [u8]) {
        let len = self.payload_len(buf) as u32;
        buf[self.start..self.start + 4].copy_from_slice(&len.to_le_bytes());
        let sum = crc32fast::hash(&buf[self.start + 8..]);
        buf[self.start + 4..self.start + 8].copy_from_slice(&sum.to_le_bytes());
    }
}

fn length_at(data: &[u8], off: usize) -> Option<usize> {
    let h = data.get(off..off.checked_add(HEADER)?)?;
    Some(u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)
}

/// Where the frame at `off` ends by its length field alone (no checksum), if that length is at
/// most `max` and fits `data`: how a reader steps over a damaged frame to the next one.
pub fn end_by_length(data: &[u8], off: usize, max: usize) -> Option<usize> {
    let len = length_at(data, off)?;
    let end = off.checked_add(HEADER)?.checked_add(len)?;
    (len <= max && end <= data.len()).then_some(end)
}

/// The frame at `off` of `data`, checked: whole, at most `max` payload bytes, checksum right.
pub fn read(data: &[u8], off: usize, max: usize) -> Result<Frame, FrameError> {
    let len = length_at(data, off).ok_or(FrameError::TruncatedHeader)?;
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    let start = off + HEADER;
    if data.len() - start < len {
        return Err(FrameError::PastEnd(len));
    }
    let stored = u32::from_le_bytes([data[off + 4], data[off + 5], data[off + 6], data[off + 7]]);
    let ty = data[off + 8];
    if crc(ty, &data[start..start + len]) != stored {
        return Err(FrameError::Checksum);
    }
    Ok(Frame {
        ty,
        payload: start..start + len,
        end: start + len,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_in_place_or_whole() {
        let mut buf = Vec::new();
        write(&mut buf, 1, b"hello");
        let open = Open::begin(&mut buf, 3);
        buf.extend_from_slice(b"batch");
        assert_eq!(open.payload_len(&buf), 5);
        open.finish(&mut buf);
        let a = read(&buf, 0, 64).unwrap();
        assert_eq!((a.ty, &buf[a.payload.clone()]), (1, &b"hello"[..]));
        let b = read(&buf, a.end, 64).unwrap();
        assert_eq!((b.ty, &buf[b.payload.clone()]), (3, &b"batch"[..]));
        assert_eq!(b.end, buf.len());
        // Both ways of writing give the same bytes.
        let mut whole = Vec::new();
        write(&mut whole, 1, b"hello");
        write(&mut whole, 3, b"batch");
        assert_eq!(whole, buf);
    }

    #[test]
    fn damage_of_every_kind_is_named() {
        let mut buf = Vec::new();
        write(&mut buf, 2, b"payload");
        assert_eq!(read(&buf[..5], 0, 64), Err(FrameError::TruncatedHeader));
        assert_eq!(read(&buf[..12], 0, 64), Err(FrameError::PastEnd(7)));
        assert_eq!(
            read(&buf, 0, 4),
            Err(FrameError::TooLong { len: 7, max: 4 })
        );
        for i in 4..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert_eq!(read(&bad, 0, 64), Err(FrameError::Checksum), "byte {i}");
            // The length still says where the next frame starts.
            assert_eq!(end_by_length(&bad, 0, 64), Some(buf.len()));
        }
        assert_eq!(end_by_length(&buf, 0, 4), None);
        assert_eq!(end_by_length(&buf[..10], 0, 64), None);
    }
}
