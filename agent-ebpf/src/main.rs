//! gpulse kernel programs.
//!
//! * `printk_console` on `printk:console`: every kernel log record passes here; only NVIDIA driver
//!   records (see [`gpulse_ebpf_common::keep_line`]) are copied into the `EVENTS` ring buffer.
//! * `nvidia_dev_xid` on `nvidia:nvidia_dev_xid`: the open driver's own XID tracepoint, attached
//!   by the agent only when it exists. The agent removes records seen through both paths.
//!
//! Tracepoint field offsets are load-time globals filled in by the agent from tracefs format files,
//! so nothing here depends on one kernel's layout. Every lost record is counted in `STATS`.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_boot_ns,
        bpf_probe_read_kernel_str_bytes,
    },
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use aya_log_ebpf::debug;
use gpulse_ebpf_common::{
    DEV_MAX, FILTER_PREFIX_LEN, MSG_MAX, NvDevXidRecord, PrintkRecord, RecordHeader, RecordKind,
    XID_MSG_MAX, flags, keep_line, stats,
};

/// Records for userspace. Size is overridden by the agent (`--ring-bytes`) before load.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU counters, indexed by `gpulse_ebpf_common::stats`.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stats::COUNT, 0);

// Load-time globals (set by the agent from tracefs; defaults match Linux 6.x).
#[unsafe(no_mangle)]
static PRINTK_MSG_LOC: u32 = 8;
#[unsafe(no_mangle)]
static XID_DEV_LOC: u32 = 8;
#[unsafe(no_mangle)]
static XID_CODE_OFF: u32 = 12;
#[unsafe(no_mangle)]
static XID_MSG_LOC: u32 = 16;
#[unsafe(no_mangle)]
static DEBUG_LOG: u8 = 0;

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
    entry.submit(0);
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
    entry.submit(0);
    bump(stats::DEV_XID_SUBMITTED);
    if debug_enabled() {
        debug!(ctx, "gpulse: nvidia_dev_xid code {}", code);
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
