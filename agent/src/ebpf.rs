//! Loading the kernel programs, attaching them, and draining their ring buffer.
use std::{
    os::fd::{AsRawFd, RawFd},
    sync::Arc,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use gpulse_ebpf_common::{
    DEVICE_PREFIX_MAX, NvDevXidRecord, PATH_MAX_BPF, PrintkRecord, ProcRecord, RecordHeader,
    RecordKind, Tracked, flags, globals, read_record, stats as kstats,
};
use gpulse_proto::v1::{GapStage, RecordSource};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    clock::{self, KernelClock},
    procs::{ProcCapture, ProcKind},
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
    /// GPU device path prefix for process tracking; `None` turns process tracking off.
    pub device_prefix: Option<String>,
    /// Size of the kernel's tracked-process table.
    pub max_tracked: u32,
}

impl Default for EbpfOptions {
    fn default() -> Self {
        Self {
            ring_bytes: 512 << 10,
            nvidia_tracepoint: true,
            debug_log: false,
            device_prefix: Some("/dev/nvidia".into()),
            max_tracked: 16384,
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
    /// Kernel tracked-process table (None when process tracking is off).
    tracked: Option<BpfHashMap<MapData, u32, Tracked>>,
    /// True when the nvidia:nvidia_dev_xid program is attached.
    pub nvidia_attached: bool,
    /// Why process tracking is off, when it is.
    pub process_tracking: Result<(), String>,
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

        // Process tracking: optional; a kernel without these tracepoints keeps XIDs working.
        let proc_offsets = match &opts.device_prefix {
            None => Err("disabled (--process-events off)".to_string()),
            Some(p) if p.is_empty() || p.len() > DEVICE_PREFIX_MAX => Err(format!(
                "--gpu-device-prefix must be 1..={DEVICE_PREFIX_MAX} bytes"
            )),
            Some(_) => process_offsets(&root).map_err(|e| e.to_string()),
        };
        let mut prefix = [0u8; DEVICE_PREFIX_MAX];
        let mut prefix_len: u32 = 0;
        if let (Ok(_), Some(p)) = (&proc_offsets, &opts.device_prefix) {
            prefix[..p.len()].copy_from_slice(p.as_bytes());
            prefix_len = p.len() as u32;
        }
        let (fname_off, ret_off, exec_loc, group_dead_off) = proc_offsets.clone().unwrap_or((
            globals::OPENAT_FILENAME_OFF::DEFAULT,
            globals::OPENAT_RET_OFF::DEFAULT,
            globals::EXEC_FILENAME_LOC::DEFAULT,
            globals::EXIT_GROUP_DEAD_OFF::DEFAULT,
        ));
        let debug_flag: u8 = u8::from(opts.debug_log);
        let (dev_off, code_off, nvmsg_off) = nv.unwrap_or((
            globals::XID_DEV_LOC::DEFAULT,
            globals::XID_CODE_OFF::DEFAULT,
            globals::XID_MSG_LOC::DEFAULT,
        ));
        let mut ebpf = EbpfLoader::new()
            .override_global(globals::PRINTK_MSG_LOC::NAME, &msg.offset, true)
            .override_global(globals::XID_DEV_LOC::NAME, &dev_off, true)
            .override_global(globals::XID_CODE_OFF::NAME, &code_off, true)
            .override_global(globals::XID_MSG_LOC::NAME, &nvmsg_off, true)
            .override_global(globals::DEBUG_LOG::NAME, &debug_flag, true)
            .override_global(globals::OPENAT_FILENAME_OFF::NAME, &fname_off, true)
            .override_global(globals::OPENAT_RET_OFF::NAME, &ret_off, true)
            .override_global(globals::EXEC_FILENAME_LOC::NAME, &exec_loc, true)
            .override_global(globals::EXIT_GROUP_DEAD_OFF::NAME, &group_dead_off, true)
            .override_global(globals::DEVICE_PREFIX::NAME, &prefix, true)
            .override_global(globals::DEVICE_PREFIX_LEN::NAME, &prefix_len, true)
            .map_max_entries("EVENTS", round_ring(opts.ring_bytes))
            .map_max_entries("TRACKED", opts.max_tracked.max(1))
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

        let mut process_tracking = proc_offsets.map(|_| ());
        if process_tracking.is_ok() {
            let attached = [
                ("openat_enter", "syscalls", "sys_enter_openat"),
                ("openat_exit", "syscalls", "sys_exit_openat"),
                ("process_exec", "sched", "sched_process_exec"),
                ("process_exit", "sched", "sched_process_exit"),
            ]
            .into_iter()
            .try_for_each(|(prog, cat, name)| attach(&mut ebpf, prog, cat, name));
            if let Err(e) = attached {
                warn!(error = %e, "GPU process tracking unavailable; XIDs are unaffected");
                process_tracking = Err(e.to_string());
            }
        }
        let tracked = match &process_tracking {
            Ok(()) => match ebpf.take_map("TRACKED").map(BpfHashMap::try_from) {
                Some(Ok(m)) => Some(m),
                _ => None,
            },
            Err(_) => None,
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
            tracked,
            nvidia_attached,
            process_tracking,
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
        // Process records are submitted without a wake-up (see agent-ebpf): drain every 20 ms.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reported_lost = 0u64;
        let mut ticks = 0u64;
        let mut batch = Vec::with_capacity(64);
        loop {
            tokio::select! {
                guard = self.ring.readable_mut() => {
                    let mut guard = guard?;
                    drain_ring(guard.get_inner_mut(), &mut batch, &stats);
                    guard.clear_ready();
                    if !forward(&mut batch, &tx, &stats).await {
                        return Ok(());
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
                    ticks += 1;
                    drain_ring(self.ring.get_mut(), &mut batch, &stats);
                    if !forward(&mut batch, &tx, &stats).await {
                        return Ok(());
                    }
                    if ticks.is_multiple_of(250) {
                        self.collect_kernel_table();
                    }
                    if !ticks.is_multiple_of(25) {
                        continue;
                    }
                    let lost = self.kernel_counter(kstats::RING_RESERVE_FAILED);
                    if lost > reported_lost {
                        let missed = lost - reported_lost;
                        reported_lost = lost;
                        AgentStats::add(&stats.kernel_ring_dropped, missed);
                        warn!(missed, "BPF ring buffer was full; kernel records lost");
                        let note = Captured::Note(SourceNote::Lost {
                            stage: GapStage::KernelRing,
                            missed,
                            detail: format!("{missed} NVIDIA kernel records lost: BPF ring buffer full (raise --bpf-ring-bytes)"),
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

/// Decodes everything waiting in the ring into `batch`.
fn drain_ring(ring: &mut RingBuf<MapData>, batch: &mut Vec<Captured>, stats: &AgentStats) {
    while let Some(item) = ring.next() {
        match decode_item(&item) {
            Some(c) => batch.push(c),
            None => {
                AgentStats::add(&stats.malformed_records, 1);
                debug!(len = item.len(), "ring record with unknown kind or size");
            }
        }
    }
}

/// Hands a drained batch to the pipeline; false when the pipeline is gone.
async fn forward(
    batch: &mut Vec<Captured>,
    tx: &mpsc::Sender<Captured>,
    stats: &AgentStats,
) -> bool {
    for c in batch.drain(..) {
        AgentStats::add(&stats.records_captured, 1);
        if tx.send(c).await.is_err() {
            return false;
        }
    }
    true
}

impl EbpfSource {
    /// Removes processes from the kernel's tracked table that are gone (exit seen but not
    /// reportable, or never seen). The user-space tracker reports their exits; this keeps the
    /// kernel table from filling up.
    fn collect_kernel_table(&mut self) {
        let Some(map) = self.tracked.as_mut() else {
            return;
        };
        let stale: Vec<u32> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(tgid, t)| {
                t.exit_lost != 0 || !crate::procs::alive(std::path::Path::new("/proc"), *tgid)
            })
            .map(|(tgid, _)| tgid)
            .collect();
        for tgid in stale {
            let _ = map.remove(&tgid);
        }
    }
}

/// Offsets for the process tracepoints: (openat filename, openat ret, exec filename data_loc,
/// exit group_dead or u32::MAX when the kernel has no such field).
fn process_offsets(root: &std::path::Path) -> Result<(u32, u32, u32, u32), tracefs::TracefsError> {
    let enter = tracefs::read_format(root, "syscalls", "sys_enter_openat")?;
    let exit = tracefs::read_format(root, "syscalls", "sys_exit_openat")?;
    let exec = tracefs::read_format(root, "sched", "sched_process_exec")?;
    let pexit = tracefs::read_format(root, "sched", "sched_process_exit")?;
    Ok((
        tracefs::field(&enter, "syscalls:sys_enter_openat", "filename")?.offset,
        tracefs::field(&exit, "syscalls:sys_exit_openat", "ret")?.offset,
        tracefs::field(&exec, "sched:sched_process_exec", "filename")?.offset,
        tracefs::field(&pexit, "sched:sched_process_exit", "group_dead")
            .map_or(u32::MAX, |f| f.offset),
    ))
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

fn c_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The bytes of `b` up to `len` (and its end), as text.
fn text(b: &[u8], len: u32) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(&b[..(len as usize).min(b.len())])
}

/// Turns one ring-buffer record into a [`Captured`] item; `None` for malformed records. Each
/// record is read as the shared `repr(C)` type the kernel program wrote.
pub fn decode_item(buf: &[u8]) -> Option<Captured> {
    let header: RecordHeader = read_record(buf)?;
    let truncated = header.flags & flags::TRUNCATED != 0;
    let unix_ns = clock::to_unix_ns(KernelClock::Boottime, header.ts_boot_ns);
    match RecordKind::from_u16(header.kind)? {
        RecordKind::PrintkLine => {
            let r: PrintkRecord = read_record(buf)?;
            Some(Captured::Record(RawRecord {
                unix_ns,
                source: RecordSource::EbpfPrintk,
                text: text(&r.msg, header.len).into_owned(),
                truncated,
                dev_xid: None,
            }))
        }
        RecordKind::NvDevXid => {
            let r: NvDevXidRecord = read_record(buf)?;
            let dev = text(&r.dev, r.dev_len).into_owned();
            let code = r.error_code;
            Some(Captured::Record(RawRecord {
                unix_ns,
                source: RecordSource::EbpfNvidiaTracepoint,
                // Rebuilt in the printk shape so one parser serves both paths.
                text: format!(
                    "NVRM: Xid (PCI:{dev}): {code}, {}",
                    text(&r.msg, header.len)
                ),
                truncated,
                dev_xid: Some(DevXid { code, dev }),
            }))
        }
        kind @ (RecordKind::ProcOpen | RecordKind::ProcExec | RecordKind::ProcExit) => {
            let r: ProcRecord = read_record(buf)?;
            let path = &r.path[..(header.len as usize).min(PATH_MAX_BPF)];
            Some(Captured::Proc(ProcCapture {
                kind: match kind {
                    RecordKind::ProcOpen => ProcKind::Open,
                    RecordKind::ProcExec => ProcKind::Exec,
                    _ => ProcKind::Exit,
                },
                unix_ns,
                pid: r.pid,
                tgid: header.tgid,
                cgroup_id: r.cgroup_id,
                comm: c_str(&r.comm),
                path: c_str(path),
            }))
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
    use gpulse_ebpf_common::{COMM_LEN, DEV_MAX, MSG_MAX, XID_MSG_MAX};

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
        let Some(Captured::Record(raw)) = decode_item(as_bytes(&rec)) else {
            panic!()
        };
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
        let Some(Captured::Record(raw)) = decode_item(as_bytes(&x)) else {
            panic!()
        };
        assert_eq!(
            raw.text,
            "NVRM: Xid (PCI:0000:3b:00.0): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
        );
        assert!(raw.truncated);
        assert_eq!(raw.dev_xid.unwrap().code, 79);
    }

    #[test]
    fn decodes_process_records() {
        let mut r = ProcRecord {
            header: RecordHeader {
                kind: RecordKind::ProcOpen as u16,
                flags: 0,
                len: 12,
                ts_boot_ns: 0,
                tgid: 4242,
                cpu: 0,
            },
            pid: 4243,
            reserved: 0,
            cgroup_id: 99,
            comm: [0; COMM_LEN],
            path: [0; PATH_MAX_BPF],
        };
        r.comm[..6].copy_from_slice(b"python");
        r.path[..12].copy_from_slice(b"/dev/nvidia0");
        let Some(Captured::Proc(p)) = decode_item(as_bytes(&r)) else {
            panic!()
        };
        assert_eq!(
            (p.kind, p.pid, p.tgid, p.cgroup_id),
            (ProcKind::Open, 4243, 4242, 99)
        );
        assert_eq!(
            (p.comm.as_str(), p.path.as_str()),
            ("python", "/dev/nvidia0")
        );
        r.header.kind = RecordKind::ProcExit as u16;
        r.header.len = 0;
        let Some(Captured::Proc(p)) = decode_item(as_bytes(&r)) else {
            panic!()
        };
        assert_eq!((p.kind, p.path.as_str()), (ProcKind::Exit, ""));
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
