//! Agent counters, shared between tasks (lock-free).
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub struct AgentStats {
    /// Records read from the kernel (ring buffer or /dev/kmsg) that passed the NVIDIA filter.
    pub records_captured: AtomicU64,
    /// Records the kernel program could not hand over (ring reserve failed).
    pub kernel_ring_dropped: AtomicU64,
    /// Records overwritten in the kernel log before the kmsg reader saw them.
    pub kmsg_missed: AtomicU64,
    /// Records removed because the other capture path already reported them.
    pub dual_path_duplicates: AtomicU64,
    /// Records that were not valid UTF-8 or not parseable (kept as driver logs).
    pub malformed_records: AtomicU64,
    pub xids: AtomicU64,
    /// Events dropped from the spool because it was full.
    pub spool_dropped: AtomicU64,
    /// GPU samples dropped under pressure (capture queue or spool full).
    pub samples_shed: AtomicU64,
    pub events_sent: AtomicU64,
    pub events_acked: AtomicU64,
    pub reconnects: AtomicU64,
    /// Streams the collector refused for our credentials (UNAUTHENTICATED, PERMISSION_DENIED).
    pub auth_refused: AtomicU64,
    /// Moves to a next-ranked collector shard because the first was unreachable.
    pub failovers: AtomicU64,
    /// Events the collector refused on their own, set aside as `Gap{COLLECTOR_REFUSED}`.
    pub events_refused: AtomicU64,
    /// Spool log writes or fsyncs that failed (those events are kept in memory only).
    pub spool_log_errors: AtomicU64,
    /// Kernel log backlog records an earlier run had already delivered (skipped).
    pub backlog_duplicates: AtomicU64,
    /// NVIDIA records read from the kernel log's backlog at start-up.
    pub backlog_records: AtomicU64,
    /// Critical-XID events NVML reported (before de-duplication against the kernel log).
    pub nvml_xid_events: AtomicU64,
    /// NVML XID events dropped because the kernel log reported the same XID.
    pub nvml_xid_duplicates: AtomicU64,
    /// XID records coalesced into storm summaries (each counted in a summary's `storm.count`).
    pub storm_coalesced: AtomicU64,
}

impl AgentStats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}
