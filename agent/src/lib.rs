//! gpulse node agent.
//!
//! Capture (eBPF ring buffer or the /dev/kmsg fallback) -> [`record::RawRecord`] over a bounded
//! channel -> [`pipeline`] (XID decode, catalog, dual-path de-duplication, wall-clock time) ->
//! [`spool`] (bounded, sequence-numbered, survives collector outages) -> [`client`] (gRPC Ingest
//! stream with acks, reconnect with backoff, resend of everything unacknowledged).
pub mod client;
pub mod clock;
pub mod ebpf;
pub mod health;
pub mod kmsg;
pub mod nvml;
pub mod pipeline;
pub mod pods;
pub mod procs;
pub mod record;
pub mod shards;
pub mod source;
pub mod spool;
pub mod spool_log;
pub mod state_dir;
pub mod stats;
pub mod storm;
pub mod tracefs;
