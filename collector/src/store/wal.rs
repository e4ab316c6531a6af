//! Write-ahead log in `--data-dir`: what the collector acknowledges survives `kill -9`.
//!
//! Segments `wal-<first cursor>.seg` (mode 0600) hold frames of the one log frame format
//! (`gpulse_proto::frame`: `[u32 len][u32 crc32][u8 type][payload]`, the CRC over type and
//! payload). Type 3 is a run of one batch's events: a length-prefixed [`BatchHeader`] (node,
//! agent id, received time, first cursor) followed by length-prefixed encoded `Event`s to the
//! end of the frame, exactly as the agent sent them; replay sets the header's fields on each (the
//! collector overwrites them at ingest), so nothing is encoded twice on the hot path. Type 2 is
//! a `StoreCheckpoint` (agent de-duplication state), written first in every segment so old
//! segments can be deleted once the ring has expired their events. Type 1, one encoded `Event`
//! with its envelope, is what earlier collectors wrote; replay still reads it. On start-up every segment is replayed; a damaged or truncated
//! frame ends that segment's replay, is reported, and (in the newest segment) is cut off so new
//! frames never follow garbage.
use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use gpulse_proto::{
    frame,
    v1::{self, StoreCheckpoint},
};
use prost::{Message, bytes::Bytes};
use tracing::{info, warn};

const TYPE_EVENT: u8 = 1;
const TYPE_CHECKPOINT: u8 = 2;
const TYPE_BATCH: u8 = 3;
/// Frames larger than this are corruption, not data: one event is at most the largest gRPC
/// message (`--max-message-bytes` <= 256 MiB) and batch frames are split far below.
const MAX_FRAME: usize = 272 << 20;
/// A batch's run is split into frames of about this size, so replay never holds a huge one.
const BATCH_FRAME_BYTES: usize = 4 << 20;

/// What the collector sets on every event of a batch frame (see the module docs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BatchHeader {
    #[prost(string, tag = "1")]
    pub node: String,
    #[prost(string, tag = "2")]
    pub agent_id: String,
    #[prost(message, optional, tag = "3")]
    pub received: Option<prost_types::Timestamp>,
    /// Cursor of the first event; the rest follow one by one.
    #[prost(uint64, tag = "4")]
    pub first_cursor: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("data dir {path}: {err}")]
    Dir { path: String, err: io::Error },
    #[error("WAL segment {path}: {err}")]
    Segment { path: String, err: io::Error },
}

/// Damage found while replaying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Corruption {
    pub segment: String,
    pub offset: u64,
    pub skipped_bytes: u64,
    pub reason: String,
    /// Events the skipped bytes held, from the cursors around them (cursors are dense in the
    /// log); None for the newest segment's tail, whose events no later frame bounds (a crash
    /// mid-write: they were never acknowledged).
    pub events_lost: Option<u64>,
}

/// What replay recovered.
#[derive(Debug, Default)]
pub struct Replay {
    /// Events with the collector's envelope set, oldest first.
    pub events: Vec<v1::Event>,
    /// Each event's bytes as the log holds them (`encoded[i]` is `events[i]`), slices of the
    /// segments read: the store keeps these, as it did when the events arrived.
    pub encoded: Vec<Bytes>,
    pub checkpoints: Vec<StoreCheckpoint>,
    pub corruptions: Vec<Corruption>,
    pub segments: usize,
    pub bytes: u64,
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    first_cursor: u64,
    last_cursor: u64,
    bytes: u64,
}

/// How frames reach the file: `write_all`, or in tests a layer that fails part-way as a full
/// disk does.
pub type WriteFn = Box<dyn FnMut(&File, &[u8]) -> io::Result<()> + Send>;

fn write_all(f: &File, buf: &[u8]) -> io::Result<()> {
    let mut f = f;
    f.write_all(buf)
}

/// Why a segment could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// Syncing the full segment failed: fatal to the store (see `syncer`).
    #[error("fsync before rotation: {0}")]
    Sync(io::Error),
    #[error("starting a new segment: {0}")]
    Write(io::Error),
}

pub struct Wal {
    dir: PathBuf,
    segments: Vec<Segment>,
    file: Arc<File>,
    max_segment_bytes: u64,
    buf: Vec<u8>,
    write: WriteFn,
    /// A failed write could not be cut off: the open segment ends in a torn frame that must be
    /// cut before anything else is appended.
    torn: bool,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.dir)
            .field("segments", &self.segments)
            .field("torn", &self.torn)
            .finish_non_exhaustive()
    }
}

fn seg_name(first_cursor: u64) -> String {
    format!("wal-{first_cursor:020}.seg")
}

fn open_segment(path: &Path) -> Result<File, WalError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|err| WalError::Segment {
            path: path.display().to_string(),
            err,
        })
}

impl Wal {
    /// Opens (creating) the log in `dir` and replays it into memory (tests and tools; the
    /// collector streams with [`Wal::replay`]).
    pub fn open(dir: &Path, max_segment_bytes: u64) -> Result<(Self, Replay), WalError> {
        let mut r = Self::replay(dir, max_segment_bytes)?;
        let mut replay = Replay::default();
        for item in &mut r {
            match item {
                Replayed::Event(ev, encoded) => replay.push(*ev, encoded),
                Replayed::Checkpoint(cp) => replay.checkpoints.push(cp),
            }
        }
        let (wal, summary) = r.finish()?;
        replay.corruptions = summary.corruptions;
        replay.segments = summary.segments;
        replay.bytes = summary.bytes;
        Ok((wal, replay))
    }

    /// Opens (creating) the log in `dir` for replay: the returned iterator yields what the
    /// segments hold one frame at a time, holding one segment in memory; its
    /// [`WalReplay::finish`] then gives the log, ready for appends.
    pub fn replay(dir: &Path, max_segment_bytes: u64) -> Result<WalReplay, WalError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|err| WalError::Dir {
                path: dir.display().to_string(),
                err,
            })?;
        let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|err| WalError::Dir {
                path: dir.display().to_string(),
                err,
            })?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let n = name
                    .strip_prefix("wal-")?
                    .strip_suffix(".seg")?
                    .parse()
                    .ok()?;
                Some((n, e.path()))
            })
            .collect();
        names.sort();
        Ok(WalReplay {
            dir: dir.to_path_buf(),
            max_segment_bytes,
            names: names.into(),
            current: None,
            pending: VecDeque::new(),
            segments: Vec::new(),
            summary: ReplaySummary::default(),
            error: None,
        })
    }

    /// Replaces how frames are written (fault injection in tests).
    pub fn set_write_fn(&mut self, write: WriteFn) {
        self.write = write;
    }

    /// Cuts the open segment back to its last complete frame.
    fn cut_torn_tail(&mut self) -> io::Result<()> {
        let good = self.segments.last().map_or(0, |s| s.bytes);
        self.file.set_len(good)?;
        self.torn = false;
        Ok(())
    }

    /// Appends one batch's events (each encoded without the header's fields, cursors from
    /// `header.first_cursor` on) with one write. Not yet durable: pass [`Wal::sync_handle`] to
    /// the syncer.
    ///
    /// A failed write (a full disk) may leave part of the frames in the file; they are cut off
    /// again at once, so the next batch follows the last good frame and replay never meets a
    /// torn frame with acknowledged data behind it. Nothing of a failed batch is kept.
    pub fn append_batch<'a>(
        &mut self,
        header: &BatchHeader,
        events: impl IntoIterator<Item = &'a [u8]>,
    ) -> io::Result<()> {
        if self.torn {
            self.cut_torn_tail()?;
        }
        self.buf.clear();
        let mut frame = BatchFrame::start(&mut self.buf, header);
        let mut count = 0u64;
        for ev in events {
            if frame.count > 0 && frame.payload_len(&self.buf) + ev.len() > BATCH_FRAME_BYTES {
                frame.finish(&mut self.buf);
                let next = BatchHeader {
                    first_cursor: header.first_cursor + count,
                    ..header.clone()
                };
                frame = BatchFrame::start(&mut self.buf, &next);
            }
            prost::encoding::encode_varint(ev.len() as u64, &mut self.buf);
            self.buf.extend_from_slice(ev);
            frame.count += 1;
            count += 1;
        }
        if count == 0 {
            self.buf.clear();
            return Ok(());
        }
        frame.finish(&mut self.buf);
        if let Err(e) = (self.write)(&self.file, &self.buf) {
            self.torn = true;
            if let Err(cut) = self.cut_torn_tail() {
                warn!(error = %cut, "could not cut a failed WAL write; retried before the next append");
            }
            return Err(e);
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.bytes += self.buf.len() as u64;
            seg.last_cursor = seg.last_cursor.max(header.first_cursor + count - 1);
        }
        Ok(())
    }

    /// The open segment is full: the next [`Wal::maybe_rotate`] starts a new one.
    pub fn needs_rotation(&self) -> bool {
        self.segments
            .last()
            .is_some_and(|s| s.bytes >= self.max_segment_bytes)
    }

    /// Starts a new segment (beginning with `checkpoint`) once the current one is full. The
    /// previous segment is synced first so its data is durable before we stop tracking it.
    pub fn maybe_rotate(
        &mut self,
        next_cursor: u64,
        checkpoint: &StoreCheckpoint,
    ) -> Result<bool, RotateError> {
        let full = self
            .segments
            .last()
            .is_some_and(|s| s.bytes >= self.max_segment_bytes);
        if !full || self.torn {
            return Ok(false);
        }
        self.file.sync_data().map_err(RotateError::Sync)?;
        let path = self.dir.join(seg_name(next_cursor));
        let mut buf = Vec::new();
        frame::write(&mut buf, TYPE_CHECKPOINT, &checkpoint.encode_to_vec());
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|file| (self.write)(&file, &buf).map(|()| file));
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                // A half-written checkpoint must not start the segment a later attempt appends
                // to (the name is the same): remove it and stay in the current segment.
                if e.kind() != io::ErrorKind::AlreadyExists {
                    let _ = fs::remove_file(&path);
                }
                return Err(RotateError::Write(e));
            }
        };
        self.file = Arc::new(file);
        self.segments.push(Segment {
            path,
            first_cursor: next_cursor,
            last_cursor: next_cursor - 1,
            bytes: buf.len() as u64,
        });
        Ok(true)
    }

    /// Deletes whole segments whose events all have cursors below `oldest_retained` (the ring no
    /// longer holds them). The newest segment is never deleted.
    pub fn truncate_before(&mut self, oldest_retained: u64) -> usize {
        let mut removed = 0;
        while self.segments.len() > 1 && self.segments[0].last_cursor < oldest_retained {
            let seg = self.segments.remove(0);
            if let Err(e) = fs::remove_file(&seg.path) {
                warn!(path = %seg.path.display(), error = %e, "could not delete expired WAL segment");
            }
            removed += 1;
        }
        removed
    }

    /// The open segment, for the syncer to `fdatasync`.
    pub fn sync_handle(&self) -> Arc<File> {
        self.file.clone()
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    pub fn first_cursor(&self) -> u64 {
        self.segments.first().map_or(1, |s| s.first_cursor)
    }
}

/// A batch frame being written into the append buffer: frame header placeholder, the
/// length-prefixed header message, then entries; `finish` fills in the length and CRC.
struct BatchFrame {
    open: frame::Open,
    count: usize,
}

impl BatchFrame {
    fn start(buf: &mut Vec<u8>, header: &BatchHeader) -> Self {
        let open = frame::Open::begin(buf, TYPE_BATCH);
        // Encoding into a Vec cannot fail.
        let _ = header.encode_length_delimited(buf);
        Self { open, count: 0 }
    }

    fn payload_len(&self, buf: &[u8]) -> usize {
        self.open.payload_len(buf)
    }

    fn finish(&self, buf: &mut [u8]) {
        self.open.finish(buf);
    }
}

impl Replay {
    fn push(&mut self, ev: v1::Event, encoded: Bytes) {
        self.events.push(ev);
        self.encoded.push(encoded);
    }
}

/// One batch frame's events, or why it is damaged (then none of them: the frame is one unit).
fn read_batch(payload: &Bytes, out: &mut VecDeque<Replayed>) -> Result<Option<u64>, String> {
    let mut buf: &[u8] = payload;
    let header = BatchHeader::decode_length_delimited(&mut buf)
        .map_err(|e| format!("undecodable batch header: {e}"))?;
    let mut last = None;
    let mut events = Vec::new();
    let mut i = 0;
    while !buf.is_empty() {
        let len = prost::encoding::decode_varint(&mut buf)
            .map_err(|e| format!("batch entry {i}: {e}"))?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > buf.len() {
            return Err(format!("batch entry {i} runs past the frame"));
        }
        let start = payload.len() - buf.len();
        let encoded = payload.slice(start..start + len);
        let mut ev = v1::Event::decode(encoded.as_ref())
            .map_err(|e| format!("undecodable event in batch entry {i}: {e}"))?;
        buf = &buf[len..];
        ev.node.clone_from(&header.node);
        ev.agent_id.clone_from(&header.agent_id);
        ev.received = header.received;
        ev.cursor = header.first_cursor + i;
        last = Some(ev.cursor);
        events.push(Replayed::Event(Box::new(ev), encoded));
        i += 1;
    }
    out.extend(events);
    Ok(last)
}

/// Where the frame at `off` ends by its length field, if that fits the segment.
fn frame_end(data: &[u8], off: usize) -> Option<usize> {
    frame::end_by_length(data, off, MAX_FRAME)
}

/// Reads the frame at `off` of a segment: its items go to `out`, `last` follows the event
/// cursors. Returns the offset after it, or why the segment's valid part ends here.
fn read_frame(
    data: &Bytes,
    off: usize,
    out: &mut VecDeque<Replayed>,
    last: &mut Option<u64>,
) -> Result<usize, String> {
    let f = frame::read(data, off, MAX_FRAME).map_err(|e| e.to_string())?;
    let (ty, payload) = (f.ty, data.slice(f.payload));
    match ty {
        TYPE_EVENT => {
            let ev = v1::Event::decode(payload.as_ref())
                .map_err(|e| format!("undecodable event: {e}"))?;
            *last = Some(ev.cursor);
            out.push_back(Replayed::Event(Box::new(ev), payload));
        }
        TYPE_BATCH => {
            if let Some(l) = read_batch(&payload, out)? {
                *last = Some(l);
            }
        }
        TYPE_CHECKPOINT => {
            let cp = StoreCheckpoint::decode(payload.as_ref())
                .map_err(|e| format!("undecodable checkpoint: {e}"))?;
            out.push_back(Replayed::Checkpoint(cp));
        }
        other => return Err(format!("unknown frame type {other}")),
    }
    Ok(f.end)
}

/// One item of the log, in log order.
#[derive(Debug)]
pub enum Replayed {
    /// An event with the collector's envelope set, and its bytes as the log holds them (a
    /// slice of the segment read: copy what is kept, so the segment can be freed).
    Event(Box<v1::Event>, Bytes),
    /// Agents' progress as of a segment's start.
    Checkpoint(StoreCheckpoint),
}

/// What a finished replay found.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub corruptions: Vec<Corruption>,
    pub segments: usize,
    pub bytes: u64,
}

/// The segment being replayed.
struct Current {
    path: PathBuf,
    first_cursor: u64,
    data: Bytes,
    off: usize,
    last: Option<u64>,
    newest: bool,
    /// A damaged frame was skipped (its length was plausible): the index of its corruption,
    /// whose events lost are counted when the next frame reads. A second damaged frame in a
    /// row ends the segment.
    resync: Option<usize>,
}

/// The log being replayed, one segment in memory at a time (see [`Wal::replay`]).
pub struct WalReplay {
    dir: PathBuf,
    max_segment_bytes: u64,
    names: VecDeque<(u64, PathBuf)>,
    current: Option<Current>,
    pending: VecDeque<Replayed>,
    segments: Vec<Segment>,
    summary: ReplaySummary,
    /// A segment that could not be read or cut: replay stops, `finish` reports it.
    error: Option<WalError>,
}

impl WalReplay {
    fn open_next(&mut self) -> Option<()> {
        let (first_cursor, path) = self.names.pop_front()?;
        match fs::read(&path) {
            Ok(data) => {
                self.current = Some(Current {
                    path,
                    first_cursor,
                    data: Bytes::from(data),
                    off: 0,
                    last: None,
                    newest: self.names.is_empty(),
                    resync: None,
                });
                Some(())
            }
            Err(err) => {
                self.error = Some(WalError::Segment {
                    path: path.display().to_string(),
                    err,
                });
                self.names.clear();
                None
            }
        }
    }

    /// Ends the current segment at `valid` bytes (cutting a damaged tail of the newest one, so
    /// appends follow valid frames).
    fn close_current(&mut self, damage: Option<String>) {
        let Some(c) = self.current.take() else {
            return;
        };
        let valid = c.off;
        if let Some(reason) = damage {
            // A frame skipped just before is part of this damage.
            let (offset, earlier) = match c.resync {
                Some(i) if i + 1 == self.summary.corruptions.len() => {
                    let p = self.summary.corruptions.remove(i);
                    (p.offset, p.skipped_bytes)
                }
                _ => (valid as u64, 0),
            };
            // Everything up to the next segment's first cursor was in the bytes cut.
            let last = c.last.unwrap_or(c.first_cursor.saturating_sub(1));
            let events_lost = self
                .names
                .front()
                .map(|(next, _)| next.saturating_sub(last + 1));
            let skipped = (c.data.len() - valid) as u64 + earlier;
            warn!(segment = %c.path.display(), offset, skipped_bytes = skipped, events_lost, %reason, "damaged WAL frame; skipping the rest of this segment");
            self.summary.corruptions.push(Corruption {
                segment: c.path.display().to_string(),
                offset,
                skipped_bytes: skipped,
                reason,
                events_lost,
            });
            if c.newest {
                let cut = OpenOptions::new()
                    .write(true)
                    .open(&c.path)
                    .and_then(|f| f.set_len(valid as u64));
                if let Err(err) = cut {
                    self.error = Some(WalError::Segment {
                        path: c.path.display().to_string(),
                        err,
                    });
                }
            }
        } else if !c.data.is_empty() {
            info!(segment = %c.path.display(), bytes = c.data.len(), "replayed WAL segment");
        }
        self.summary.bytes += valid as u64;
        self.segments.push(Segment {
            path: c.path,
            first_cursor: c.first_cursor,
            last_cursor: c.last.unwrap_or(c.first_cursor.saturating_sub(1)),
            bytes: valid as u64,
        });
    }

    /// Reads the next frame of the log into `pending`; false at the end.
    fn step(&mut self) -> bool {
        if self.current.is_none() && self.open_next().is_none() {
            return false;
        }
        let Some(c) = self.current.as_mut() else {
            return false;
        };
        if c.off >= c.data.len() {
            self.close_current(None);
            return true;
        }
        let before = self.pending.len();
        let last_before = c.last;
        match read_frame(&c.data, c.off, &mut self.pending, &mut c.last) {
            Ok(next) => {
                c.off = next;
                if let Some(i) = c.resync.take()
                    && let Some(Replayed::Event(first, _)) = self.pending.get(before)
                    && let Some(k) = self.summary.corruptions.get_mut(i)
                {
                    let last = last_before.unwrap_or(c.first_cursor.saturating_sub(1));
                    let lost = first.cursor.saturating_sub(last + 1);
                    k.events_lost = Some(lost);
                    warn!(segment = %k.segment, offset = k.offset, skipped_bytes = k.skipped_bytes, events_lost = lost, reason = %k.reason, "damaged WAL frame skipped; replay goes on after it");
                }
            }
            Err(reason) => match frame_end(&c.data, c.off) {
                // One damaged frame whose length still fits the segment, in the middle of it
                // (issue 27 #13: a flipped byte dropped the whole segment, 3,000 events): skip
                // it, go on, and count its events from the cursors around it.
                Some(end) if c.resync.is_none() && end < c.data.len() => {
                    self.summary.corruptions.push(Corruption {
                        segment: c.path.display().to_string(),
                        offset: c.off as u64,
                        skipped_bytes: (end - c.off) as u64,
                        reason,
                        events_lost: None,
                    });
                    c.resync = Some(self.summary.corruptions.len() - 1);
                    c.off = end;
                }
                _ => self.close_current(Some(reason)),
            },
        }
        true
    }

    /// Replays whatever was not consumed, then opens the newest segment for appends (a new log
    /// when there was none).
    pub fn finish(mut self) -> Result<(Wal, ReplaySummary), WalError> {
        while self.next().is_some() {}
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let mut summary = std::mem::take(&mut self.summary);
        summary.segments = self.segments.len();
        let (file, segments) = match self.segments.last() {
            Some(s) => (open_segment(&s.path)?, self.segments),
            None => {
                let path = self.dir.join(seg_name(1));
                let f = open_segment(&path)?;
                (
                    f,
                    vec![Segment {
                        path,
                        first_cursor: 1,
                        last_cursor: 0,
                        bytes: 0,
                    }],
                )
            }
        };
        let wal = Wal {
            dir: self.dir,
            segments,
            file: Arc::new(file),
            max_segment_bytes: self.max_segment_bytes,
            buf: Vec::new(),
            write: Box::new(write_all),
            torn: false,
        };
        Ok((wal, summary))
    }
}

impl Iterator for WalReplay {
    type Item = Replayed;

    fn next(&mut self) -> Option<Replayed> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.error.is_some() || !self.step() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_proto::v1::event::Payload;
    use std::os::unix::fs::PermissionsExt;

    fn header(first_cursor: u64) -> BatchHeader {
        BatchHeader {
            node: "node-a".into(),
            agent_id: "a".into(),
            received: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            first_cursor,
        }
    }

    /// Appends the events with these cursors as one batch.
    fn append(w: &mut Wal, cursors: &[u64]) {
        let bytes: Vec<Vec<u8>> = cursors.iter().map(|c| ev(*c).encode_to_vec()).collect();
        w.append_batch(&header(cursors[0]), bytes.iter().map(Vec::as_slice))
            .unwrap();
    }

    fn ev(cursor: u64) -> v1::Event {
        v1::Event {
            cursor,
            seq: cursor,
            agent_id: "a".into(),
            kind: v1::EventKind::Xid as i32,
            payload: Some(Payload::Xid(v1::Xid {
                code: 79,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn append_replay_round_trip_with_0600_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, r) = Wal::open(dir.path(), 1 << 20).unwrap();
            assert!(r.events.is_empty());
            append(&mut w, &[1, 2, 3]);
        }
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            r.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(r.corruptions.is_empty());
        for e in fs::read_dir(dir.path()).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    /// A disk that fills up part-way through a write: the first `ok_writes` writes succeed,
    /// the next `failures` write half their bytes and fail with ENOSPC, then space is back.
    fn filling_disk(ok_writes: usize, failures: usize) -> WriteFn {
        let mut n = 0;
        Box::new(move |f, buf| {
            n += 1;
            if n > ok_writes && n <= ok_writes + failures {
                let mut f = f;
                f.write_all(&buf[..buf.len() / 2])?;
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            write_all(f, buf)
        })
    }

    #[test]
    fn a_failed_write_is_cut_back_so_later_frames_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        w.set_write_fn(filling_disk(1, 2));
        append(&mut w, &[1, 2]);
        let size = |d: &Path| fs::metadata(d.join(seg_name(1))).unwrap().len();
        let good = size(dir.path());
        for _ in 0..2 {
            let bytes = [ev(3).encode_to_vec()];
            let e = w
                .append_batch(&header(3), bytes.iter().map(Vec::as_slice))
                .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
            assert_eq!(size(dir.path()), good, "the half frame is cut at once");
            assert_eq!(w.bytes(), good);
        }
        // Space is back: the batch is written again and everything after it replays.
        append(&mut w, &[3, 4]);
        append(&mut w, &[5]);
        drop(w);
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert!(r.corruptions.is_empty(), "{:?}", r.corruptions);
        assert_eq!(
            r.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn a_failed_rotation_leaves_no_half_segment_and_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 64).unwrap();
        append(&mut w, &[1, 2, 3]);
        assert!(w.needs_rotation());
        w.set_write_fn(filling_disk(0, 1));
        let cp = StoreCheckpoint {
            agents: Vec::new(),
            next_cursor: 4,
        };
        assert!(matches!(w.maybe_rotate(4, &cp), Err(RotateError::Write(_))));
        assert!(!dir.path().join(seg_name(4)).exists());
        assert_eq!(w.segment_count(), 1);
        assert!(w.maybe_rotate(4, &cp).unwrap());
        append(&mut w, &[4]);
        drop(w);
        let (_, r) = Wal::open(dir.path(), 64).unwrap();
        assert!(r.corruptions.is_empty(), "{:?}", r.corruptions);
        assert_eq!(r.events.len(), 4);
    }

    #[test]
    fn torn_tail_is_reported_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        append(&mut w, &[1, 2]);
        drop(w);
        let seg = dir.path().join(seg_name(1));
        let mut data = fs::read(&seg).unwrap();
        let full = data.len();
        data.extend_from_slice(&[7, 0, 0, 0, 1, 2]); // half a frame, as after a crash mid-write
        fs::write(&seg, &data).unwrap();
        let (mut w, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(r.events.len(), 2);
        assert_eq!(r.corruptions.len(), 1);
        assert_eq!(r.corruptions[0].offset as usize, full);
        assert_eq!(fs::metadata(&seg).unwrap().len() as usize, full, "tail cut");
        append(&mut w, &[3]);
        drop(w);
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            r.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert!(r.corruptions.is_empty());
    }

    #[test]
    fn flipped_byte_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 1 << 20).unwrap();
        append(&mut w, &[1, 2, 3]);
        drop(w);
        let seg = dir.path().join(seg_name(1));
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n / 2] ^= 0xff;
        fs::write(&seg, &data).unwrap();
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert!(r.events.len() < 3);
        assert_eq!(r.corruptions.len(), 1);
        assert!(
            r.corruptions[0].reason.contains("checksum")
                || r.corruptions[0].reason.contains("length")
        );
    }

    /// Issue 27 #13: one flipped byte dropped the whole segment (3,000 events), reported in
    /// bytes. Now the one damaged frame is skipped, the rest replays, and the loss is counted in
    /// events from the cursors around it.
    #[test]
    fn a_damaged_frame_mid_segment_loses_only_its_events_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 64 << 20).unwrap();
        let batch = |first: u64| (first..first + 1000).collect::<Vec<u64>>();
        append(&mut w, &batch(1));
        let second = fs::metadata(dir.path().join(seg_name(1))).unwrap().len() as usize;
        append(&mut w, &batch(1001));
        append(&mut w, &batch(2001));
        drop(w);
        let seg = dir.path().join(seg_name(1));
        let mut data = fs::read(&seg).unwrap();
        data[second + frame::HEADER + 500] ^= 0xff; // inside the second frame's payload
        fs::write(&seg, &data).unwrap();
        let (_, r) = Wal::open(dir.path(), 64 << 20).unwrap();
        let cursors: Vec<u64> = r.events.iter().map(|e| e.cursor).collect();
        assert_eq!(cursors, [batch(1), batch(2001)].concat());
        assert_eq!(r.corruptions.len(), 1);
        assert_eq!(r.corruptions[0].events_lost, Some(1000));
        assert_eq!(r.corruptions[0].offset as usize, second);
    }

    /// Damage that ends an older segment counts its events up to the next segment's first
    /// cursor; a torn tail of the newest one is not counted (never acknowledged).
    #[test]
    fn a_damaged_older_segment_counts_up_to_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 100).unwrap();
        append(&mut w, &[1, 2, 3]);
        append(&mut w, &[4, 5, 6]);
        assert!(w.maybe_rotate(7, &StoreCheckpoint::default()).unwrap());
        append(&mut w, &[7, 8]);
        drop(w);
        let seg = dir.path().join(seg_name(1));
        let mut data = fs::read(&seg).unwrap();
        let n = data.len();
        data[n - 3] ^= 0xff; // the last frame of the older segment
        fs::write(&seg, &data).unwrap();
        let (_, r) = Wal::open(dir.path(), 100).unwrap();
        let cursors: Vec<u64> = r.events.iter().map(|e| e.cursor).collect();
        assert_eq!(cursors, [1, 2, 3, 7, 8]);
        assert_eq!(r.corruptions.len(), 1);
        assert_eq!(r.corruptions[0].events_lost, Some(3));
    }

    #[test]
    fn rotation_checkpoints_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), 200).unwrap();
        let cp = StoreCheckpoint {
            agents: vec![v1::AgentProgress {
                agent_id: "a".into(),
                through_seq: 7,
                ..Default::default()
            }],
            next_cursor: 0,
        };
        for c in 1..=20 {
            append(&mut w, &[c]);
            w.maybe_rotate(c + 1, &cp).unwrap();
        }
        assert!(w.segment_count() > 2);
        let removed = w.truncate_before(15);
        assert!(removed > 0);
        assert!(w.first_cursor() <= 15);
        drop(w);
        let (_, r) = Wal::open(dir.path(), 200).unwrap();
        assert!(!r.checkpoints.is_empty());
        assert_eq!(r.checkpoints[0].agents[0].through_seq, 7);
        assert_eq!(r.events.last().unwrap().cursor, 20);
        assert!(r.events.first().unwrap().cursor <= 15);
    }

    #[test]
    fn batch_frames_restore_the_envelope_on_every_event() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, _) = Wal::open(dir.path(), 1 << 20).unwrap();
            // As received: no cursor, another node name (the batch envelope wins).
            let sent: Vec<Vec<u8>> = (1..=3)
                .map(|s| {
                    v1::Event {
                        cursor: 0,
                        node: "as-sent".into(),
                        ..ev(s)
                    }
                    .encode_to_vec()
                })
                .collect();
            w.append_batch(&header(10), sent.iter().map(Vec::as_slice))
                .unwrap();
            assert_eq!(w.segments[0].last_cursor, 12);
        }
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert!(r.corruptions.is_empty());
        let want: Vec<v1::Event> = (1..=3)
            .map(|s| v1::Event {
                cursor: 9 + s,
                node: "node-a".into(),
                agent_id: "a".into(),
                received: header(0).received,
                ..ev(s)
            })
            .collect();
        assert_eq!(r.events, want);
    }

    #[test]
    fn large_batches_are_split_into_bounded_frames() {
        let dir = tempfile::tempdir().unwrap();
        let big = vec![b'x'; 300 << 10];
        let one = v1::Event {
            payload: Some(Payload::DriverLog(v1::DriverLog {
                text: String::from_utf8(big).unwrap(),
                ..Default::default()
            })),
            ..ev(0)
        }
        .encode_to_vec();
        let n = 40; // 12 MiB in all: at least three frames
        {
            let (mut w, _) = Wal::open(dir.path(), 64 << 20).unwrap();
            w.append_batch(&header(100), (0..n).map(|_| one.as_slice()))
                .unwrap();
        }
        let data = fs::read(dir.path().join(seg_name(1))).unwrap();
        let mut frames = 0;
        let mut off = 0;
        while off < data.len() {
            let len = u32::from_le_bytes(data[off..off + 4].try_into().unwrap()) as usize;
            assert!(len <= BATCH_FRAME_BYTES + one.len());
            off += frame::HEADER + len;
            frames += 1;
        }
        assert!(frames >= 3, "{frames} frames");
        let (_, r) = Wal::open(dir.path(), 64 << 20).unwrap();
        assert!(r.corruptions.is_empty());
        assert_eq!(
            r.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            (100..100 + n).collect::<Vec<_>>()
        );
    }

    #[test]
    fn single_event_frames_from_earlier_collectors_still_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = Vec::new();
        for c in 1..=2 {
            frame::write(&mut data, TYPE_EVENT, &ev(c).encode_to_vec());
        }
        fs::write(dir.path().join(seg_name(1)), &data).unwrap();
        let (mut w, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(r.events, vec![ev(1), ev(2)]);
        append(&mut w, &[3]);
        drop(w);
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            r.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
    }

    #[test]
    fn a_damaged_entry_under_a_valid_checksum_drops_its_whole_frame() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut w, _) = Wal::open(dir.path(), 1 << 20).unwrap();
            append(&mut w, &[1, 2]);
        }
        let seg = dir.path().join(seg_name(1));
        let mut data = fs::read(&seg).unwrap();
        let good = data.len();
        // A frame whose CRC is right but whose second entry claims more bytes than it has.
        let mut payload = Vec::new();
        header(3).encode_length_delimited(&mut payload).unwrap();
        let e = ev(3).encode_to_vec();
        prost::encoding::encode_varint(e.len() as u64, &mut payload);
        payload.extend_from_slice(&e);
        prost::encoding::encode_varint(50, &mut payload);
        payload.extend_from_slice(&[1, 2, 3]);
        frame::write(&mut data, TYPE_BATCH, &payload);
        fs::write(&seg, &data).unwrap();
        let (_, r) = Wal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(
            r.events.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            vec![1, 2],
            "none of the damaged frame's events"
        );
        assert_eq!(r.corruptions.len(), 1);
        assert_eq!(r.corruptions[0].offset as usize, good);
        assert!(
            r.corruptions[0].reason.contains("entry 1"),
            "{:?}",
            r.corruptions
        );
    }
}
