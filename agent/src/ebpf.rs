//! Loading the kernel programs, attaching them, and draining their ring buffer.
use std::{
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use gpulse_ebpf_common::{
    DEV_MAX, MSG_MAX, RecordHeader, RecordKind, XID_MSG_MAX, flags, globals, stats as kstats,
};
use gpulse_proto::v1::{GapStage, RecordSource};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    clock::{self, KernelClock},
    record::{Captured, DevXid, RawRecord, SourceNote},
    stats::AgentStats,
    tracefs,
};

/// The BPF object built by agent/build.rs (empty when built with AYA_BUILD_SKIP=1).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gpulse-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this agent was built without its eBPF object (AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {err}")]
    Program {
        name: &'static str,
        err: aya::programs::ProgramError,
    },
    #[error("map {name}: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("ring buffer poll: {0}")]
    Io(#[from] std::io::Error),
}

/// What to load.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    /// Ring buffer size in bytes (rounded up to a power of two of at least one page).
    pub ring_bytes: u32,
    /// Attach `nvidia:nvidia_dev_xid` when it exists.
    pub nvidia_tracepoint: bool,
    /// Turn on aya-log diagnostics from the kernel side.
    pub debug_log: bool,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 1 << 20,
            nvidia_tracepoint: true,
            debug_log: false,
        }
    }
}

/// Loaded and attached programs plus the maps userspace reads.
pub struct EbpfSource {
    // Owns the programs and links: dropping it detaches everything.
    _ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    stats: PerCpuArray<MapData, u64>,
    logger: Option<AsyncFd<LoggerFd>>,
    /// True when the nvidia:nvidia_dev_xid program is attached.
    pub nvidia_attached: bool,
    pub tracefs_mounted_by_us: bool,
}

struct LoggerFd(aya_log::EbpfLogger<&'static dyn log::Log>);

impl AsRawFd for LoggerFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn round_ring(bytes: u32) -> u32 {
    bytes
        .max(4096)
        .checked_next_power_of_two()
        .unwrap_or(1 << 30)
}

impl EbpfSource {
    /// Loads the object with offsets from tracefs, attaches `printk:console`, and
    /// `nvidia:nvidia_dev_xid` when present.
    pub fn load(opts: &EbpfOptions) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let (root, mounted) = tracefs::ensure_mounted()?;
        if mounted {
            info!(path = %root.display(), "mounted tracefs");
        }
        let printk = tracefs::read_format(&root, "printk", "console")?;
        let msg = tracefs::field(&printk, "printk:console", "msg")?;

        let nv = if opts.nvidia_tracepoint
            && tracefs::tracepoint_exists(&root, "nvidia", "nvidia_dev_xid")
        {
            let f = tracefs::read_format(&root, "nvidia", "nvidia_dev_xid")?;
            Some((
                tracefs::field(&f, "nvidia:nvidia_dev_xid", "dev")?.offset,
                tracefs::field(&f, "nvidia:nvidia_dev_xid", "error_code")?.offset,
                tracefs::field(&f, "nvidia:nvidia_dev_xid", "msg")?.offset,
            ))
        } else {
            None
        };

        let debug_flag: u8 = u8::from(opts.debug_log);
        let (dev_off, code_off, nvmsg_off) = nv.unwrap_or((8, 12, 16));
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::PRINTK_MSG_LOC, &msg.offset, true)
            .override_global(globals::XID_DEV_LOC, &dev_off, true)
            .override_global(globals::XID_CODE_OFF, &code_off, true)
            .override_global(globals::XID_MSG_LOC, &nvmsg_off, true)
            .override_global(globals::DEBUG_LOG, &debug_flag, true)
            .map_max_entries("EVENTS", round_ring(opts.ring_bytes))
            .load(OBJECT)?;

        let logger = if opts.debug_log {
            match aya_log::EbpfLogger::init(&mut ebpf) {
                Ok(l) => Some(crate::record::async_fd(LoggerFd(l))?),
                Err(e) => {
                    warn!(error = %e, "kernel-side logging requested but unavailable");
                    None
                }
            }
        } else {
            None
        };

        attach(&mut ebpf, "printk_console", "printk", "console")?;
        let nvidia_attached = if nv.is_some() {
            match attach(&mut ebpf, "nvidia_dev_xid", "nvidia", "nvidia_dev_xid") {
                Ok(()) => true,
                Err(e) => {
                    // Partial failure: the printk path still sees every XID line.
                    warn!(error = %e, "nvidia:nvidia_dev_xid exists but could not be attached; using printk:console only");
                    false
                }
            }
        } else {
            false
        };

        let ring = ebpf.take_map("EVENTS").ok_or(EbpfError::Map {
            name: "EVENTS",
            detail: "missing".into(),
        })?;
        let ring = RingBuf::try_from(ring).map_err(|e| EbpfError::Map {
            name: "EVENTS",
            detail: e.to_string(),
        })?;
        let stats = ebpf.take_map("STATS").ok_or(EbpfError::Map {
            name: "STATS",
            detail: "missing".into(),
        })?;
        let stats = PerCpuArray::try_from(stats).map_err(|e| EbpfError::Map {
            name: "STATS",
            detail: e.to_string(),
        })?;
        Ok(Self {
            _ebpf: ebpf,
            ring: crate::record::async_fd(ring)?,
            stats,
            logger,
            nvidia_attached,
            tracefs_mounted_by_us: mounted,
        })
    }

    /// Sum over CPUs of one kernel counter.
    pub fn kernel_counter(&self, idx: u32) -> u64 {
        self.stats.get(&idx, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Drains the ring buffer into `tx` until the channel closes. Never blocks the kernel side:
    /// the ring is read as soon as epoll says it is readable, and kernel-side losses (failed
    /// reserves) are turned into gap notes once a second.
    pub async fn run(
        mut self,
        tx: mpsc::Sender<Captured>,
        stats: Arc<AgentStats>,
    ) -> Result<(), EbpfError> {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_lost = 0u64;
        let mut batch = Vec::with_capacity(64);
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    let ring = guard.get_inner_mut();
                    while let Some(item) = ring.next() {
                        match decode_item(&item) {
                            Some(rec) => batch.push(rec),
                            None => {
                                AgentStats::add(&stats.malformed_records, 1);
                                debug!(len = item.len(), "ring record with unknown kind or size");
                            }
                        }
                    }
                    guard.clear_ready();
                    for rec in batch.drain(..) {
                        AgentStats::add(&stats.records_captured, 1);
                        if tx.send(Captured::Record(rec)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
                guard = async {
                    match self.logger.as_mut() {
                        Some(l) => l.readable_mut().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let mut guard = guard?;
                    guard.get_inner_mut().0.flush();
                    guard.clear_ready();
                }
                _ = tick.tick() => {
                    let lost = self.kernel_counter(kstats::RING_RESERVE_FAILED);
                    if lost > reported_lost {
                        let missed = lost - reported_lost;
                        reported_lost = lost;
                        AgentStats::add(&stats.kernel_ring_dropped, missed);
                        warn!(missed, "BPF ring buffer was full; kernel records lost");
                        let note = Captured::Note(SourceNote::Lost {
                            stage: GapStage::KernelRing,
                            missed,
                            detail: format!("{missed} NVIDIA kernel records lost: BPF ring buffer full (raise --ring-bytes)"),
                        });
                        if tx.send(note).await.is_err() {
                            return Ok(());
                        }
                    }
                    if tx.is_closed() {
                        return Ok(());
                    }
                }
            }
        }
    }
}

fn attach(
    ebpf: &mut Ebpf,
    prog: &'static str,
    category: &str,
    name: &str,
) -> Result<(), EbpfError> {
    let p: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or(EbpfError::Map {
            name: prog,
            detail: "program missing from object".into(),
        })?
        .try_into()
        .map_err(|err| EbpfError::Program { name: prog, err })?;
    p.load()
        .map_err(|err| EbpfError::Program { name: prog, err })?;
    p.attach(category, name)
        .map_err(|err| EbpfError::Program { name: prog, err })?;
    Ok(())
}

/// Turns one ring-buffer record into a [`RawRecord`]; `None` for records that are malformed.
pub fn decode_item(buf: &[u8]) -> Option<RawRecord> {
    const H: usize = std::mem::size_of::<RecordHeader>();
    if buf.len() < H {
        return None;
    }
    // SAFETY: length checked; read_unaligned copes with any alignment.
    let header: RecordHeader = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
    let truncated = header.flags & flags::TRUNCATED != 0;
    let unix_ns = clock::to_unix_ns(KernelClock::Boottime, header.ts_boot_ns);
    match RecordKind::from_u16(header.kind)? {
        RecordKind::PrintkLine => {
            let len = (header.len as usize).min(MSG_MAX);
            let text = buf.get(H..H + len)?;
            Some(RawRecord {
                unix_ns,
                source: RecordSource::EbpfPrintk,
                text: String::from_utf8_lossy(text).into_owned(),
                truncated,
                dev_xid: None,
            })
        }
        RecordKind::NvDevXid => {
            let code = u32::from_ne_bytes(buf.get(H..H + 4)?.try_into().ok()?);
            let dev_len = u32::from_ne_bytes(buf.get(H + 4..H + 8)?.try_into().ok()?) as usize;
            let dev = buf.get(H + 8..H + 8 + dev_len.min(DEV_MAX))?;
            let msg_at = H + 8 + DEV_MAX;
            let msg = buf.get(msg_at..msg_at + (header.len as usize).min(XID_MSG_MAX))?;
            let dev = String::from_utf8_lossy(dev).into_owned();
            let msg = String::from_utf8_lossy(msg);
            Some(RawRecord {
                unix_ns,
                source: RecordSource::EbpfNvidiaTracepoint,
                // Rebuilt in the printk shape so one parser serves both paths.
                text: format!("NVRM: Xid (PCI:{dev}): {code}, {msg}"),
                truncated,
                dev_xid: Some(DevXid { code, dev }),
            })
        }
    }
}

/// True when this process may load BPF programs at all (root or CAP_BPF), for clear messages.
pub fn privileged() -> bool {
    // SAFETY: trivial syscall.
    let root = unsafe { libc::geteuid() } == 0;
    root || has_cap_bpf()
}

fn has_cap_bpf() -> bool {
    const CAP_BPF: u32 = 39;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_BPF) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_ebpf_common::{NvDevXidRecord, PrintkRecord};

    fn as_bytes<T>(v: &T) -> &[u8] {
        // SAFETY: test-only view of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast(), std::mem::size_of::<T>()) }
    }

    #[test]
    fn decodes_printk_and_dev_xid_records() {
        let mut rec = PrintkRecord {
            header: RecordHeader {
                kind: RecordKind::PrintkLine as u16,
                flags: 0,
                len: 0,
                ts_boot_ns: clock::now_ns(KernelClock::Boottime),
                tgid: 1,
                cpu: 0,
            },
            msg: [0; MSG_MAX],
        };
        let text = b"NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.";
        rec.msg[..text.len()].copy_from_slice(text);
        rec.header.len = text.len() as u32;
        let raw = decode_item(as_bytes(&rec)).unwrap();
        assert_eq!(raw.text.as_bytes(), text);
        assert_eq!(raw.source, RecordSource::EbpfPrintk);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        assert!((raw.unix_ns - now).abs() < 1_000_000_000);

        let mut x = NvDevXidRecord {
            header: RecordHeader {
                kind: RecordKind::NvDevXid as u16,
                flags: flags::TRUNCATED,
                len: 0,
                ts_boot_ns: 0,
                tgid: 0,
                cpu: 0,
            },
            error_code: 79,
            dev_len: 12,
            dev: [0; DEV_MAX],
            msg: [0; XID_MSG_MAX],
        };
        x.dev[..12].copy_from_slice(b"0000:3b:00.0");
        let m = b"pid='<unknown>', name=<unknown>, GPU has fallen off the bus.";
        x.msg[..m.len()].copy_from_slice(m);
        x.header.len = m.len() as u32;
        let raw = decode_item(as_bytes(&x)).unwrap();
        assert_eq!(
            raw.text,
            "NVRM: Xid (PCI:0000:3b:00.0): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
        );
        assert!(raw.truncated);
        assert_eq!(raw.dev_xid.unwrap().code, 79);
    }

    #[test]
    fn rejects_malformed_records() {
        assert!(decode_item(&[0u8; 4]).is_none());
        let h = RecordHeader {
            kind: 77,
            flags: 0,
            len: 5,
            ts_boot_ns: 0,
            tgid: 0,
            cpu: 0,
        };
        assert!(decode_item(as_bytes(&h)).is_none(), "unknown kind");
        let h = RecordHeader {
            kind: 1,
            flags: 0,
            len: 5,
            ts_boot_ns: 0,
            tgid: 0,
            cpu: 0,
        };
        assert!(decode_item(as_bytes(&h)).is_none(), "body shorter than len");
        assert_eq!(round_ring(1), 4096);
        assert_eq!(round_ring(5000), 8192);
    }
}
