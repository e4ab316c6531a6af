//! The collector's store: the in-memory ring, the write-ahead log, and group-commit syncing.
pub mod ring;
pub mod syncer;
pub mod wal;
