//! Kernel/user record layout for gpulse.
//!
//! Every record the eBPF side writes into the `EVENTS` ring buffer starts with a fixed
//! [`RecordHeader`]; `kind` says which body follows. The layouts are `repr(C)` with explicit
//! padding and are checked by compile-time size/offset assertions on both sides, so a change on
//! one side that the other has not followed fails to build instead of silently misparsing.
#![no_std]

/// Largest log line the kernel side captures. Longer lines are truncated and flagged.
pub const MSG_MAX: usize = 512;
/// Room for the PCI device name of `nvidia:nvidia_dev_xid` (`pci_name()`, e.g. `0000:3b:00.0`).
pub const DEV_MAX: usize = 32;
/// Room for the message of `nvidia:nvidia_dev_xid`.
pub const XID_MSG_MAX: usize = 448;
/// Bytes of a printk line copied to the stack for the in-kernel prefix filter.
pub const FILTER_PREFIX_LEN: usize = 16;

/// What follows a [`RecordHeader`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A kernel log record seen on `printk:console` that passed the NVIDIA prefix filter.
    PrintkLine = 1,
    /// A record from the open driver's own `nvidia:nvidia_dev_xid` tracepoint.
    NvDevXid = 2,
}

impl RecordKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::PrintkLine),
            2 => Some(Self::NvDevXid),
            _ => None,
        }
    }
}

/// Header flags.
pub mod flags {
    /// The message filled its buffer: the kernel line was longer and was cut.
    pub const TRUNCATED: u16 = 1 << 0;
}

/// Fixed header at the start of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RecordHeader {
    /// A [`RecordKind`] value.
    pub kind: u16,
    /// Bit set of [`flags`].
    pub flags: u16,
    /// Bytes of text in the body's main string, without the terminating NUL.
    pub len: u32,
    /// `bpf_ktime_get_boot_ns()` when the tracepoint fired (CLOCK_BOOTTIME).
    pub ts_boot_ns: u64,
    /// Thread group (process) that was running when the record was emitted.
    pub tgid: u32,
    /// CPU the tracepoint ran on.
    pub cpu: u32,
}

/// A kernel log line kept by the `printk:console` program.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PrintkRecord {
    pub header: RecordHeader,
    /// NUL-terminated text (level prefix already stripped by the kernel).
    pub msg: [u8; MSG_MAX],
}

/// A record from `nvidia:nvidia_dev_xid`: the driver hands us code, device and message directly.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NvDevXidRecord {
    pub header: RecordHeader,
    pub error_code: u32,
    /// Bytes of text in `dev`, without the NUL.
    pub dev_len: u32,
    pub dev: [u8; DEV_MAX],
    /// The message without the `Xid (PCI:..): N, ` prefix; `header.len` is its length.
    pub msg: [u8; XID_MSG_MAX],
}

/// Indices into the per-CPU `STATS` array; userspace sums them across CPUs.
pub mod stats {
    /// printk:console records inspected.
    pub const PRINTK_SEEN: u32 = 0;
    /// printk:console records that matched the NVIDIA filter and were submitted.
    pub const PRINTK_MATCHED: u32 = 1;
    /// Records lost because the ring buffer had no room (reserve failed).
    pub const RING_RESERVE_FAILED: u32 = 2;
    /// Records lost because the tracepoint data could not be read.
    pub const READ_FAILED: u32 = 3;
    /// nvidia:nvidia_dev_xid records submitted.
    pub const DEV_XID_SUBMITTED: u32 = 4;
    /// Number of slots.
    pub const COUNT: u32 = 5;
}

/// Names of the load-time globals the agent sets from tracefs format files.
pub mod globals {
    /// Offset of the `__data_loc char[] msg` field in `printk:console`.
    pub const PRINTK_MSG_LOC: &str = "PRINTK_MSG_LOC";
    /// Offsets of the `nvidia:nvidia_dev_xid` fields.
    pub const XID_DEV_LOC: &str = "XID_DEV_LOC";
    pub const XID_CODE_OFF: &str = "XID_CODE_OFF";
    pub const XID_MSG_LOC: &str = "XID_MSG_LOC";
    /// Non-zero enables aya-log diagnostics on the kernel side.
    pub const DEBUG_LOG: &str = "DEBUG_LOG";
}

/// The prefixes the in-kernel filter keeps: NVIDIA's resource manager and NVSwitch drivers.
pub const KEEP_PREFIXES: [&[u8]; 2] = [b"NVRM: ", b"nvidia-nvswitch"];

/// True when `line` starts with one of [`KEEP_PREFIXES`]. Shared so the userspace /dev/kmsg
/// fallback applies exactly the same filter as the kernel program.
pub fn keep_line(line: &[u8]) -> bool {
    let mut i = 0;
    while i < KEEP_PREFIXES.len() {
        let p = KEEP_PREFIXES[i];
        if line.len() >= p.len() && starts_with(line, p) {
            return true;
        }
        i += 1;
    }
    false
}

fn starts_with(line: &[u8], p: &[u8]) -> bool {
    let mut j = 0;
    while j < p.len() {
        if line[j] != p[j] {
            return false;
        }
        j += 1;
    }
    true
}

// Layout assertions: both sides compile these, so drift breaks the build.
const _: () = assert!(core::mem::size_of::<RecordHeader>() == 24);
const _: () = assert!(core::mem::align_of::<RecordHeader>() == 8);
const _: () = assert!(core::mem::size_of::<PrintkRecord>() == 24 + MSG_MAX);
const _: () = assert!(core::mem::size_of::<NvDevXidRecord>() == 24 + 8 + DEV_MAX + XID_MSG_MAX);
const _: () = assert!(core::mem::offset_of!(PrintkRecord, msg) == 24);
const _: () = assert!(core::mem::offset_of!(NvDevXidRecord, dev) == 32);
const _: () = assert!(core::mem::offset_of!(NvDevXidRecord, msg) == 32 + DEV_MAX);
const _: () = assert!(FILTER_PREFIX_LEN >= 15); // "nvidia-nvswitch" must fit

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain repr(C) integers and byte arrays; every bit pattern is valid.
    unsafe impl aya::Pod for super::RecordHeader {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_keeps_nvidia_lines_only() {
        assert!(keep_line(
            b"NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus."
        ));
        assert!(keep_line(
            b"nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal"
        ));
        assert!(!keep_line(b"NVRM:Xid without space"));
        assert!(!keep_line(b"usb 1-1: new high-speed USB device"));
        assert!(!keep_line(b"NVR"));
        assert!(!keep_line(b""));
    }

    #[test]
    fn kinds_round_trip() {
        assert_eq!(RecordKind::from_u16(1), Some(RecordKind::PrintkLine));
        assert_eq!(RecordKind::from_u16(2), Some(RecordKind::NvDevXid));
        assert_eq!(RecordKind::from_u16(0), None);
        assert_eq!(RecordKind::from_u16(99), None);
    }
}
