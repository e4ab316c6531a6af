//! /dev/kmsg: the fallback record source when eBPF cannot be used, with the same parser.
//!
//! Each read() returns one record: `PRIO,SEQ,TS_USEC,FLAGS[,..];TEXT\n` plus optional
//! ` KEY=VALUE` continuation lines. Non-printable bytes in TEXT (including newlines inside one
//! record) are escaped as `\xNN`. A read that fails with EPIPE means the kernel overwrote records
//! we had not read yet; the jump in SEQ says how many.
use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
};

use gpulse_ebpf_common::keep_line;
use gpulse_proto::v1::{GapStage, RecordSource};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, warn};

use crate::{
    clock::{self, KernelClock},
    record::{Captured, RawRecord, SourceNote},
    stats::AgentStats,
};

/// One parsed /dev/kmsg record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsgRecord {
    pub priority: u8,
    pub facility: u32,
    pub seq: u64,
    /// Microseconds on the printk clock (CLOCK_MONOTONIC-like).
    pub ts_us: u64,
    pub text: String,
}

/// Parses one /dev/kmsg record (`None` when the header is malformed).
pub fn parse_record(buf: &[u8]) -> Option<KmsgRecord> {
    let semi = buf.iter().position(|&b| b == b';')?;
    let header = std::str::from_utf8(&buf[..semi]).ok()?;
    let mut parts = header.split(',');
    let prefix: u32 = parts.next()?.parse().ok()?;
    let seq: u64 = parts.next()?.parse().ok()?;
    let ts_us: u64 = parts.next()?.parse().ok()?;
    let body = &buf[semi + 1..];
    let end = body.iter().position(|&b| b == b'\n').unwrap_or(body.len());
    Some(KmsgRecord {
        priority: (prefix & 7) as u8,
        facility: prefix >> 3,
        seq,
        ts_us,
        text: unescape(&body[..end]),
    })
}

/// Undoes the kernel's `\xNN` escaping.
pub fn unescape(s: &[u8]) -> String {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'\\'
            && i + 3 < s.len()
            && s[i + 1] == b'x'
            && let (Some(h), Some(l)) = (hex(s[i + 2]), hex(s[i + 3]))
        {
            out.push(h << 4 | l);
            i += 4;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Opens `path` (/dev/kmsg) read-only and non-blocking; we own the descriptor.
fn open_nonblocking(path: &str) -> io::Result<OwnedFd> {
    let c = CString::new(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid path; we own the returned fd.
    let raw = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Upper bound on how long a record can sit unread when the kernel's wakeup is late.
const KMSG_POLL: std::time::Duration = std::time::Duration::from_millis(5);

struct KmsgFd(OwnedFd);

impl AsRawFd for KmsgFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An open /dev/kmsg positioned at the end (only new records are reported: replaying the
/// kernel's buffer at every agent start would re-report old XIDs).
pub struct KmsgReader {
    fd: AsyncFd<KmsgFd>,
    last_seq: Option<u64>,
}

impl KmsgReader {
    pub fn open(path: &str) -> io::Result<Self> {
        let fd = open_nonblocking(path)?;
        // SAFETY: lseek on our own fd; SEEK_END on /dev/kmsg skips to the newest record.
        if unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd: crate::record::async_fd(KmsgFd(fd))?,
            last_seq: None,
        })
    }

    /// Reads the next record, waiting for one. Records lost to overwrite are reported as
    /// `Err(Lost(n))` once, then reading continues.
    pub async fn next(&mut self) -> io::Result<Result<KmsgRecord, u64>> {
        let mut buf = [0u8; 8192];
        loop {
            // printk wakes /dev/kmsg readers through a deferred irq_work that an idle tickless CPU
            // may not run until the next printk; poll as well so a record never waits long.
            let mut guard = match tokio::time::timeout(KMSG_POLL, self.fd.readable()).await {
                Ok(g) => Some(g?),
                Err(_) => None,
            };
            let fd = self.fd.get_ref().as_raw_fd();
            // SAFETY: reading into our own stack buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let err = io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        if let Some(g) = guard.as_mut() {
                            g.clear_ready();
                        }
                        continue;
                    }
                    // Overwritten: the next read returns the oldest record still there; the seq
                    // jump gives the count.
                    Some(libc::EPIPE) => continue,
                    Some(libc::EINTR) => continue,
                    _ => return Err(err),
                }
            }
            let Some(rec) = parse_record(&buf[..n as usize]) else {
                debug!(bytes = n, "unparseable /dev/kmsg record header");
                continue;
            };
            let missed = match self.last_seq {
                Some(last) if rec.seq > last + 1 => rec.seq - last - 1,
                _ => 0,
            };
            self.last_seq = Some(rec.seq);
            if missed > 0 {
                return Ok(Err(missed));
            }
            return Ok(Ok(rec));
        }
    }
}

/// Runs the /dev/kmsg source until the channel closes.
pub async fn run(
    mut reader: KmsgReader,
    tx: mpsc::Sender<Captured>,
    stats: Arc<AgentStats>,
) -> io::Result<()> {
    loop {
        match reader.next().await? {
            Err(missed) => {
                AgentStats::add(&stats.kmsg_missed, missed);
                warn!(
                    missed,
                    "kernel log records were overwritten before /dev/kmsg could read them"
                );
                let note = Captured::Note(SourceNote::Lost {
                    stage: GapStage::Kmsg,
                    missed,
                    detail: format!(
                        "{missed} kernel log records overwritten before they were read; NVIDIA records among them are lost"
                    ),
                });
                if tx.send(note).await.is_err() {
                    return Ok(());
                }
            }
            Ok(rec) => {
                if !keep_line(rec.text.as_bytes()) {
                    continue;
                }
                AgentStats::add(&stats.records_captured, 1);
                let raw = RawRecord {
                    unix_ns: clock::to_unix_ns(KernelClock::Monotonic, rec.ts_us * 1000),
                    source: RecordSource::Kmsg,
                    text: rec.text,
                    truncated: false,
                    dev_xid: None,
                };
                // Back-pressure, never drop: the kernel keeps records while we wait, and a
                // record overwritten meanwhile is reported through the seq jump above.
                if tx.send(Captured::Record(raw)).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Where the kernel log's backlog is read from at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BacklogFrom {
    /// Everything the kernel still holds of this boot (a first start, or a new boot).
    Boot,
    /// Records from this UTC time on (ns): the newest kernel record an earlier run of this
    /// agent delivered, less a margin; what it delivered is recognised and skipped.
    Since(i128),
}

/// What a backlog pass read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BacklogSummary {
    /// Kernel records read (all of them, NVIDIA or not).
    pub records: u64,
    /// NVIDIA records handed to the pipeline.
    pub sent: u64,
    /// Records the kernel overwrote while the pass ran.
    pub missed: u64,
    pub last_seq: Option<u64>,
}

/// Reads the kernel log's backlog once, oldest record first, up to the newest one (it does not
/// wait for more: the live source started before covers what comes next; records seen by both
/// in the hand-over are dropped by the pipeline's de-duplication). NVIDIA records go to `tx` as
/// `KMSG_BACKLOG` records with their own kernel time.
pub async fn read_backlog(
    path: &str,
    from: BacklogFrom,
    tx: &mpsc::Sender<Captured>,
) -> io::Result<BacklogSummary> {
    // A new open of /dev/kmsg starts at the oldest record.
    let fd = open_nonblocking(path)?;
    let mut out = BacklogSummary::default();
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: reading into our own stack buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(out),
                Some(libc::EPIPE) | Some(libc::EINTR) => continue,
                _ => return Err(err),
            }
        }
        let Some(rec) = parse_record(&buf[..n as usize]) else {
            continue;
        };
        if let Some(last) = out.last_seq
            && rec.seq > last + 1
        {
            out.missed += rec.seq - last - 1;
        }
        out.last_seq = Some(rec.seq);
        out.records += 1;
        if !keep_line(rec.text.as_bytes()) {
            continue;
        }
        let unix_ns = clock::to_unix_ns(KernelClock::Monotonic, rec.ts_us * 1000);
        if let BacklogFrom::Since(t) = from
            && unix_ns < t
        {
            continue;
        }
        out.sent += 1;
        let raw = RawRecord {
            unix_ns,
            source: RecordSource::KmsgBacklog,
            text: rec.text,
            truncated: false,
            dev_xid: None,
        };
        if tx.send(Captured::Record(raw)).await.is_err() {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records_and_escapes() {
        let r = parse_record(b"3,1234,5678901,-;NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.\n SUBSYSTEM=pci\n").unwrap();
        assert_eq!(
            (r.priority, r.facility, r.seq, r.ts_us),
            (3, 0, 1234, 5678901)
        );
        assert_eq!(
            r.text,
            "NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus."
        );
        let r = parse_record(
            b"12,9,1,-,caller=T1;NVRM: The NVIDIA GPU 0000:01:00.0\\x0aNVRM: fallen off the bus\n",
        )
        .unwrap();
        assert_eq!(r.facility, 1);
        assert_eq!(
            r.text,
            "NVRM: The NVIDIA GPU 0000:01:00.0\nNVRM: fallen off the bus"
        );
        assert_eq!(unescape(b"a\\x5cb\\xzz\\x4"), "a\\b\\xzz\\x4");
        assert!(parse_record(b"garbage").is_none());
        assert!(parse_record(b"x,1,2;text").is_none());
        assert!(parse_record(b"").is_none());
    }
}
