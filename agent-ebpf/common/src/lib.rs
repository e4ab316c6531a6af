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
/// Room for a path (opened device node, exec'd file) in a process record.
pub const PATH_MAX_BPF: usize = 128;
/// Longest GPU device prefix the kernel filter compares (`--gpu-device-prefix`).
pub const DEVICE_PREFIX_MAX: usize = 64;
/// Length of a task's comm.
pub const COMM_LEN: usize = 16;

/// What follows a [`RecordHeader`].
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// A kernel log record seen on `printk:console` that passed the NVIDIA prefix filter.
    PrintkLine = 1,
    /// A record from the open driver's own `nvidia:nvidia_dev_xid` tracepoint.
    NvDevXid = 2,
    /// A successful open of a GPU device node ([`ProcRecord`]).
    ProcOpen = 3,
    /// A tracked GPU process called exec ([`ProcRecord`], path = new executable).
    ProcExec = 4,
    /// A tracked GPU process exited ([`ProcRecord`]).
    ProcExit = 5,
}

impl RecordKind {
    pub const fn from_u16(v: u16) -> Option<Self> {
        match v {
            1 => Some(Self::PrintkLine),
            2 => Some(Self::NvDevXid),
            3 => Some(Self::ProcOpen),
            4 => Some(Self::ProcExec),
            5 => Some(Self::ProcExit),
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

/// A GPU process lifecycle record (open of a GPU device node, exec, exit).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcRecord {
    /// `header.len` is the length of `path`; `header.tgid` the process.
    pub header: RecordHeader,
    /// Thread that did it.
    pub pid: u32,
    /// Padding before `cgroup_id` (8-aligned); zero. (Exits are only recorded when the whole
    /// thread group is gone, so there is no per-thread flag to carry.)
    pub reserved: u32,
    /// `bpf_get_current_cgroup_id()` (cgroup v2 id of the task).
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    /// Open: the device node; exec: the new executable; exit: empty.
    pub path: [u8; PATH_MAX_BPF],
}

/// Value of the kernel's tracked-process map, keyed by tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Tracked {
    /// CLOCK_BOOTTIME of the first GPU device open.
    pub first_open_ns: u64,
    /// Set when the exit could not be reported through the ring buffer: userspace reports it
    /// from its garbage collection instead, so an exit is never lost silently.
    pub exit_lost: u32,
    /// Used slots of `devices`.
    pub n_devices: u32,
    /// FNV-1a hashes of the device paths already reported for this process: CUDA opens the
    /// same nodes many times, and only the first open of each is worth a record.
    pub devices: [u32; TRACKED_DEVICES],
}

/// Device paths remembered per tracked process in the kernel (more are reported every time).
pub const TRACKED_DEVICES: usize = 14;

/// FNV-1a over a NUL-terminated path (bytes after the NUL are ignored), the same on both sides.
pub fn path_hash(p: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < p.len() && i < PATH_MAX_BPF {
        if p[i] == 0 {
            break;
        }
        h ^= p[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
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
    /// GPU device opens submitted.
    pub const PROC_OPEN_SUBMITTED: u32 = 5;
    /// Exec / exit records of tracked processes submitted.
    pub const PROC_EXEC_SUBMITTED: u32 = 6;
    pub const PROC_EXIT_SUBMITTED: u32 = 7;
    /// Exits that could not go through the ring buffer (left flagged in the tracked map).
    pub const PROC_EXIT_LOST: u32 = 8;
    /// Processes not tracked because the tracked map was full.
    pub const TRACKED_FULL: u32 = 9;
    /// Repeated opens of an already reported device by the same process (not sent).
    pub const PROC_OPEN_REPEAT: u32 = 10;
    /// Number of slots.
    pub const COUNT: u32 = 11;
}

/// The load-time globals, written once: each with its type and the value the object carries
/// until the agent overrides it (from tracefs format files and its flags). Expands `$m` with the
/// list; [`globals`] (names and defaults for the agent) and the kernel program's statics are
/// both generated from it, so a name or default cannot differ between the two sides.
#[macro_export]
macro_rules! with_globals {
    ($m:ident) => {
        $m! {
            /// Offset of the `__data_loc char[] msg` field in `printk:console`.
            PRINTK_MSG_LOC: u32 = 8;
            /// Offsets of the `nvidia:nvidia_dev_xid` fields.
            XID_DEV_LOC: u32 = 8;
            XID_CODE_OFF: u32 = 12;
            XID_MSG_LOC: u32 = 16;
            /// Non-zero enables aya-log diagnostics on the kernel side.
            DEBUG_LOG: u8 = 0;
            /// Process tracepoint offsets.
            OPENAT_FILENAME_OFF: u32 = 24;
            OPENAT_RET_OFF: u32 = 16;
            EXEC_FILENAME_LOC: u32 = 8;
            /// Offset of `group_dead` in sched_process_exit; `u32::MAX` when the kernel lacks
            /// it (the thread group leader's exit then stands for the process).
            EXIT_GROUP_DEAD_OFF: u32 = u32::MAX;
            /// The GPU device path prefix and its length; a length of 0 disables process
            /// tracking.
            DEVICE_PREFIX: [u8; $crate::DEVICE_PREFIX_MAX] = [0; $crate::DEVICE_PREFIX_MAX];
            DEVICE_PREFIX_LEN: u32 = 0;
        }
    };
}

macro_rules! names_and_defaults {
    ($($(#[$doc:meta])* $name:ident: $ty:ty = $default:expr;)+) => {
        /// Each load-time global's symbol name (`NAME`) and the object's value (`DEFAULT`).
        #[allow(non_snake_case, reason = "the constants are named after the globals' symbols")]
        pub mod globals {
            $(
                $(#[$doc])*
                pub mod $name {
                    pub const NAME: &str = stringify!($name);
                    pub const DEFAULT: $ty = $default;
                }
            )+
        }
    };
}

with_globals!(names_and_defaults);

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
const _: () = assert!(core::mem::size_of::<ProcRecord>() == 24 + 8 + 8 + COMM_LEN + PATH_MAX_BPF);
const _: () = assert!(core::mem::offset_of!(ProcRecord, cgroup_id) == 32);
const _: () = assert!(core::mem::offset_of!(ProcRecord, path) == 40 + COMM_LEN);
const _: () = assert!(core::mem::size_of::<Tracked>() == 16 + 4 * TRACKED_DEVICES);

const _: () = assert!(core::mem::offset_of!(ProcRecord, pid) == 24);
const _: () = assert!(core::mem::offset_of!(NvDevXidRecord, error_code) == 24);
const _: () = assert!(core::mem::offset_of!(NvDevXidRecord, dev_len) == 28);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each is repr(C) of integers and byte arrays with explicit padding (checked by the
    // layout assertions above): every bit pattern is a valid value.
    unsafe impl aya::Pod for RecordHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PrintkRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NvDevXidRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProcRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Tracked {}
}

/// Reads a record of type `T` from the start of a ring-buffer item; `None` when the item is
/// shorter than `T` (a malformed record).
#[cfg(feature = "user")]
pub fn read_record<T: aya::Pod>(item: &[u8]) -> Option<T> {
    if item.len() < core::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` makes any bytes a valid `T`; the length is checked above and
    // `read_unaligned` copes with any alignment of the ring buffer's memory.
    Some(unsafe { core::ptr::read_unaligned(item.as_ptr().cast::<T>()) })
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
    fn path_hash_stops_at_nul() {
        let mut a = [0u8; PATH_MAX_BPF];
        a[..12].copy_from_slice(b"/dev/nvidia0");
        let mut b = [0xffu8; PATH_MAX_BPF];
        b[..13].copy_from_slice(b"/dev/nvidia0\0");
        assert_eq!(path_hash(&a), path_hash(&b));
        assert_ne!(path_hash(b"/dev/nvidia0"), path_hash(b"/dev/nvidia1"));
    }

    #[test]
    fn kinds_round_trip() {
        assert_eq!(RecordKind::from_u16(1), Some(RecordKind::PrintkLine));
        assert_eq!(RecordKind::from_u16(2), Some(RecordKind::NvDevXid));
        assert_eq!(RecordKind::from_u16(5), Some(RecordKind::ProcExit));
        assert_eq!(RecordKind::from_u16(0), None);
        assert_eq!(RecordKind::from_u16(99), None);
    }
}
