//! The collector's store: events (per-kind lanes with a time index inside one byte budget),
//! GPU sample series (raw head, compressed chunks, 1 min / 1 h rollups), the write-ahead log,
//! snapshots, and group-commit syncing.
pub mod codec;
pub mod events;
pub mod recovery;
pub mod series;
pub mod snapshot;
pub mod syncer;
pub mod wal;
