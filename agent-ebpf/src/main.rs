//! gpulse kernel programs.
//!
//! * `printk_console` on `printk:console`: every kernel log record passes here; only NVIDIA driver
//!   records (see [`gpulse_ebpf_common::keep_line`]) are copied into the `EVENTS` ring buffer.
//! * `nvidia_dev_xid` on `nvidia:nvidia_dev_xid`: the open driver's own XID tracepoint, attached
//!   by the agent only when it exists. The agent removes records seen through both paths.
//!
//! * `openat_enter` / `openat_exit` on `syscalls:sys_{enter,exit}_openat`: a successful open of a
//!   path under the GPU device prefix makes the process a tracked GPU process (`TRACKED`); the
//!   open is reported. Failed opens are not (the exit side sees the result).
//! * `process_exec` / `process_exit` on `sched:sched_process_{exec,exit}`: reported for tracked
//!   processes only. An exit that cannot be reported (ring buffer full) is flagged in `TRACKED` so
//!   the agent reports it from its garbage collection: exits are never lost silently.
//!
//! Tracepoint field offsets are load-time globals filled in by the agent from tracefs format files,
//! so nothing here depends on one kernel's layout. Every lost record is counted in `STATS`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_smp_processor_id, bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use gpulse_ebpf_common::{
    DEV_MAX, DEVICE_PREFIX_MAX, FILTER_PREFIX_LEN, MSG_MAX, NvDevXidRecord, PATH_MAX_BPF,
    PrintkRecord, ProcRecord, RecordHeader, RecordKind, TRACKED_DEVICES, Tracked, XID_MSG_MAX,
    flags, keep_line, path_hash, stats,
};

/// `bpf_ringbuf_submit` flags. XIDs always wake the agent at once; process records do not (the
/// agent also drains every few milliseconds), so a storm of them costs no wake-up per record.
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Records for userspace. Size is overridden by the agent (`--bpf-ring-bytes`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU counters, indexed by `gpulse_ebpf_common::stats`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

/// A path buffer (per-CPU scratch and pending-open values).
#[repr(C)]
pub struct PathBuf {
    pub buf: [u8; PATH_MAX_BPF],
}

/// Per-CPU scratch for the filename an openat is about to open.
#[map]
static SCRATCH: PerCpuArray<PathBuf> = PerCpuArray::with_max_entries(1, 0);

/// Opens of GPU device paths in flight, by pid_tgid (LRU: a thread killed mid-syscall cannot leak).
#[map]
static PENDING: LruHashMap<u64, PathBuf> = LruHashMap::with_max_entries(4096, 0);

/// Tracked GPU processes by tgid. Size overridden by the agent (`--max-tracked-processes`).
#[map]
static TRACKED: HashMap<u32, Tracked> = HashMap::with_max_entries(16384, 0);

// Load-time globals, set by the agent from tracefs and its flags: one `#[no_mangle]` static per
// entry of the shared table (`gpulse_ebpf_common::with_globals!`), named and valued as there.
macro_rules! load_time_statics {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr;)+) => {
        $(
            $(#[$doc])*
            #[unsafe(no_mangle)]
            static $name: $ty = $default;
        )+
    };
}
gpulse_ebpf_common::with_globals!(load_time_statics);

#[inline(always)]
fn global_u32(v: &'static u32) -> u32 {
    // SAFETY: reading our own static; volatile so the loader-patched value is not const-folded.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn debug_enabled() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&DEBUG_LOG) != 0 }
}

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += 1 };
    }
}

/// Resolves a `__data_loc` field: a u32 at `field_off` whose low 16 bits are the data's offset
/// from the start of the record.
#[inline(always)]
fn data_loc(ctx: &TracePointContext, field_off: u32) -> Result<*const u8, i64> {
    // SAFETY: read_at bounds-checks through bpf_probe_read.
    let loc: u32 = unsafe { ctx.read_at(field_off as usize) }.map_err(|e| e as i64)?;
    let off = (loc & 0xffff) as usize;
    Ok(unsafe { (ctx.as_ptr() as *const u8).add(off) })
}

#[inline(always)]
fn header(kind: RecordKind, len: usize, truncated: bool) -> RecordHeader {
    RecordHeader {
        kind: kind as u16,
        flags: if truncated { flags::TRUNCATED } else { 0 },
        len: len as u32,
        // SAFETY: helper with no preconditions.
        ts_boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        // SAFETY: helper with no preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
    }
}

#[tracepoint]
pub fn printk_console(ctx: TracePointContext) -> u32 {
    match try_printk_console(&ctx) {
        Ok(()) => 0,
        Err(_) => {
            bump(stats::READ_FAILED);
            0
        }
    }
}

fn try_printk_console(ctx: &TracePointContext) -> Result<(), i64> {
    bump(stats::PRINTK_SEEN);
    let msg = data_loc(ctx, global_u32(&PRINTK_MSG_LOC))?;

    // Cheap filter on a stack copy of the first bytes before touching the ring buffer.
    let mut head = [0u8; FILTER_PREFIX_LEN];
    // SAFETY: kernel string read into a fixed stack buffer.
    let prefix =
        unsafe { bpf_probe_read_kernel_str_bytes(msg, &mut head) }.map_err(|e| e as i64)?;
    if !keep_line(prefix) {
        return Ok(());
    }

    let Some(mut entry) = EVENTS.reserve::<PrintkRecord>(0) else {
        bump(stats::RING_RESERVE_FAILED);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at reserved ring memory of the right size.
    let read = unsafe { bpf_probe_read_kernel_str_bytes(msg, &mut (*rec).msg) };
    let len = match read {
        Ok(s) => s.len(),
        Err(_) => {
            entry.discard(0);
            return Err(-1);
        }
    };
    // SAFETY: as above.
    unsafe {
        (*rec).header = header(RecordKind::PrintkLine, len, len + 1 >= MSG_MAX);
    }
    entry.submit(BPF_RB_FORCE_WAKEUP);
    bump(stats::PRINTK_MATCHED);
    if debug_enabled() {
        debug!(ctx, "gpulse: kept printk line of {} bytes", len);
    }
    Ok(())
}

#[tracepoint]
pub fn nvidia_dev_xid(ctx: TracePointContext) -> u32 {
    match try_nvidia_dev_xid(&ctx) {
        Ok(()) => 0,
        Err(_) => {
            bump(stats::READ_FAILED);
            0
        }
    }
}

fn try_nvidia_dev_xid(ctx: &TracePointContext) -> Result<(), i64> {
    let dev = data_loc(ctx, global_u32(&XID_DEV_LOC))?;
    let msg = data_loc(ctx, global_u32(&XID_MSG_LOC))?;
    // SAFETY: bounds-checked tracepoint read.
    let code: u32 =
        unsafe { ctx.read_at(global_u32(&XID_CODE_OFF) as usize) }.map_err(|e| e as i64)?;

    let Some(mut entry) = EVENTS.reserve::<NvDevXidRecord>(0) else {
        bump(stats::RING_RESERVE_FAILED);
        return Ok(());
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at reserved ring memory of the right size.
    let dev_len = match unsafe { bpf_probe_read_kernel_str_bytes(dev, &mut (*rec).dev) } {
        Ok(s) => s.len(),
        Err(_) => 0,
    };
    let msg_len = match unsafe { bpf_probe_read_kernel_str_bytes(msg, &mut (*rec).msg) } {
        Ok(s) => s.len(),
        Err(_) => {
            entry.discard(0);
            return Err(-1);
        }
    };
    // SAFETY: as above.
    unsafe {
        (*rec).error_code = code;
        (*rec).dev_len = dev_len.min(DEV_MAX) as u32;
        (*rec).header = header(RecordKind::NvDevXid, msg_len, msg_len + 1 >= XID_MSG_MAX);
    }
    entry.submit(BPF_RB_FORCE_WAKEUP);
    bump(stats::DEV_XID_SUBMITTED);
    if debug_enabled() {
        debug!(ctx, "gpulse: nvidia_dev_xid code {}", code);
    }
    Ok(())
}

/// True when `tgid` is tracked and has already reported a device with this path hash.
#[inline(always)]
fn known_device(tracked: &HashMap<u32, Tracked>, tgid: u32, hash: u32) -> bool {
    // SAFETY: plain map lookup; the value is only read.
    let Some(t) = (unsafe { tracked.get(&tgid) }) else {
        return false;
    };
    let n = t.n_devices as usize;
    let mut i = 0;
    while i < TRACKED_DEVICES {
        if i >= n {
            return false;
        }
        if t.devices[i] == hash {
            return true;
        }
        i += 1;
    }
    false
}

/// True when `path` starts with the configured GPU device prefix.
#[inline(always)]
fn device_prefix_matches(path: &[u8], plen: usize) -> bool {
    if plen == 0 || plen > DEVICE_PREFIX_MAX || path.len() < plen {
        return false;
    }
    let mut i = 0;
    while i < DEVICE_PREFIX_MAX {
        if i >= plen {
            return true;
        }
        // SAFETY: i < DEVICE_PREFIX_MAX; volatile so the loader-patched bytes are read.
        let want = unsafe { core::ptr::read_volatile(&DEVICE_PREFIX[i]) };
        match path.get(i) {
            Some(b) if *b == want => {}
            _ => return false,
        }
        i += 1;
    }
    true
}

#[tracepoint]
pub fn openat_enter(ctx: TracePointContext) -> u32 {
    if try_openat_enter(&ctx).is_err() {
        bump(stats::READ_FAILED);
    }
    0
}

fn try_openat_enter(ctx: &TracePointContext) -> Result<(), i64> {
    let plen = global_u32(&DEVICE_PREFIX_LEN) as usize;
    if plen == 0 {
        return Ok(());
    }
    // SAFETY: bounds-checked tracepoint read of the user pointer argument.
    let fname: u64 =
        unsafe { ctx.read_at(global_u32(&OPENAT_FILENAME_OFF) as usize) }.map_err(|e| e as i64)?;
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(-1i64)?;
    // SAFETY: per-CPU scratch slot; user string read with a fault-tolerant helper.
    let path = unsafe { bpf_probe_read_user_str_bytes(fname as *const u8, &mut (*scratch).buf) };
    let Ok(path) = path else {
        // Unreadable filename (e.g. not yet faulted in): not a GPU open we can see.
        return Ok(());
    };
    if !device_prefix_matches(path, plen) {
        return Ok(());
    }
    let key = bpf_get_current_pid_tgid();
    // A device this process has already reported: nothing to learn from the result, so skip the
    // pending-open bookkeeping entirely (CUDA reopens its nodes constantly).
    // SAFETY: scratch holds a NUL-terminated path.
    if known_device(
        &TRACKED,
        (key >> 32) as u32,
        path_hash(unsafe { &(*scratch).buf }),
    ) {
        bump(stats::PROC_OPEN_REPEAT);
        return Ok(());
    }
    // SAFETY: scratch holds a fully written PathBuf.
    PENDING
        .insert(&key, unsafe { &*scratch }, 0)
        .map_err(|e| e as i64)?;
    Ok(())
}

#[tracepoint]
pub fn openat_exit(ctx: TracePointContext) -> u32 {
    if try_openat_exit(&ctx).is_err() {
        bump(stats::READ_FAILED);
    }
    0
}

fn try_openat_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: map lookup; the value is copied out below before any other map operation.
    let Some(pending) = (unsafe { PENDING.get(&key) }) else {
        return Ok(());
    };
    let pending: *const PathBuf = pending;
    // SAFETY: bounds-checked tracepoint read.
    let ret: i64 =
        unsafe { ctx.read_at(global_u32(&OPENAT_RET_OFF) as usize) }.map_err(|e| e as i64)?;
    if ret < 0 {
        let _ = PENDING.remove(&key);
        return Ok(());
    }
    let tgid = (key >> 32) as u32;
    // SAFETY: `pending` points into a present map value; the hash reads at most PATH_MAX_BPF.
    let hash = path_hash(unsafe { &(*pending).buf });
    match TRACKED.get_ptr_mut(&tgid) {
        Some(t) => {
            // SAFETY: pointer from get_ptr_mut on a present key.
            let n = unsafe { (*t).n_devices } as usize;
            let mut i = 0;
            while i < TRACKED_DEVICES {
                if i >= n {
                    break;
                }
                // SAFETY: i < TRACKED_DEVICES.
                if unsafe { (*t).devices[i] } == hash {
                    let _ = PENDING.remove(&key);
                    bump(stats::PROC_OPEN_REPEAT);
                    return Ok(());
                }
                i += 1;
            }
            if n < TRACKED_DEVICES {
                // SAFETY: n < TRACKED_DEVICES.
                unsafe {
                    (*t).devices[n] = hash;
                    (*t).n_devices = n as u32 + 1;
                }
            }
        }
        None => {
            let mut t = Tracked {
                // SAFETY: helper with no preconditions.
                first_open_ns: unsafe { bpf_ktime_get_boot_ns() },
                exit_lost: 0,
                n_devices: 1,
                devices: [0; TRACKED_DEVICES],
            };
            t.devices[0] = hash;
            if TRACKED.insert(&tgid, &t, 0).is_err() {
                // Reported anyway; the agent tracks it from user space and collects its exit.
                bump(stats::TRACKED_FULL);
            }
        }
    }
    let r = emit_proc(RecordKind::ProcOpen, key, |dst| {
        // SAFETY: `pending` points into a map value that is still present.
        unsafe { bpf_probe_read_kernel_str_bytes((*pending).buf.as_ptr(), dst) }.map(|s| s.len())
    });
    let _ = PENDING.remove(&key);
    if r {
        bump(stats::PROC_OPEN_SUBMITTED);
    }
    Ok(())
}

/// Reserves and submits a process record; `fill` writes the path. False when the ring was full.
#[inline(always)]
fn emit_proc(
    kind: RecordKind,
    pid_tgid: u64,
    fill: impl FnOnce(&mut [u8]) -> Result<usize, i32>,
) -> bool {
    let Some(mut entry) = EVENTS.reserve::<ProcRecord>(0) else {
        bump(stats::RING_RESERVE_FAILED);
        return false;
    };
    let rec = entry.as_mut_ptr();
    // SAFETY: `rec` points at reserved ring memory of the right size.
    unsafe {
        let len = fill(&mut (*rec).path).unwrap_or(0);
        (*rec).header = header(kind, len, false);
        (*rec).header.tgid = (pid_tgid >> 32) as u32;
        (*rec).pid = pid_tgid as u32;
        (*rec).reserved = 0;
        (*rec).cgroup_id = bpf_get_current_cgroup_id();
        (*rec).comm = bpf_get_current_comm().unwrap_or([0; 16]);
    }
    entry.submit(BPF_RB_NO_WAKEUP);
    true
}

#[tracepoint]
pub fn process_exec(ctx: TracePointContext) -> u32 {
    if try_process_exec(&ctx).is_err() {
        bump(stats::READ_FAILED);
    }
    0
}

fn try_process_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let key = bpf_get_current_pid_tgid();
    let tgid = (key >> 32) as u32;
    // SAFETY: plain map lookup.
    if unsafe { TRACKED.get(&tgid) }.is_none() {
        return Ok(());
    }
    let filename = data_loc(ctx, global_u32(&EXEC_FILENAME_LOC))?;
    // SAFETY: kernel string from the tracepoint record.
    if emit_proc(RecordKind::ProcExec, key, |dst| {
        unsafe { bpf_probe_read_kernel_str_bytes(filename, dst) }.map(|s| s.len())
    }) {
        bump(stats::PROC_EXEC_SUBMITTED);
    }
    Ok(())
}

#[tracepoint]
pub fn process_exit(ctx: TracePointContext) -> u32 {
    if try_process_exit(&ctx).is_err() {
        bump(stats::READ_FAILED);
    }
    0
}

fn try_process_exit(ctx: &TracePointContext) -> Result<(), i64> {
    let key = bpf_get_current_pid_tgid();
    let tgid = (key >> 32) as u32;
    let Some(tracked) = TRACKED.get_ptr_mut(&tgid) else {
        return Ok(());
    };
    let off = global_u32(&EXIT_GROUP_DEAD_OFF);
    let group_dead = if off == u32::MAX {
        // Older kernels: the leader's exit stands for the process.
        key as u32 == tgid
    } else {
        // SAFETY: bounds-checked tracepoint read.
        unsafe { ctx.read_at::<u8>(off as usize) }.map_err(|e| e as i64)? != 0
    };
    if !group_dead {
        return Ok(());
    }
    if emit_proc(RecordKind::ProcExit, key, |_| Ok(0)) {
        bump(stats::PROC_EXIT_SUBMITTED);
        let _ = TRACKED.remove(&tgid);
    } else {
        // Never silently: leave it flagged for the agent's garbage collection.
        bump(stats::PROC_EXIT_LOST);
        // SAFETY: pointer from get_ptr_mut on a present key.
        unsafe { (*tracked).exit_lost = 1 };
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
