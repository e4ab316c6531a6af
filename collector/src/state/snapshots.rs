//! Snapshots written off the state task (the sample history with the counters, and the event
//! store when old events pin too much log), and deleting the log segments they make unneeded.
use std::{path::Path, time::Instant};

use gpulse_proto::v1::StoreCheckpoint;
use tracing::{info, warn};

use super::State;
use crate::store::snapshot::{
    self, COUNTERS_FILE, EVENTS_FILE, SERIES_FILE, SnapKind, SnapshotError,
};

/// A snapshot written in the background finished.
pub(super) struct SnapshotDone {
    kind: SnapKind,
    through: u64,
    result: Result<(), String>,
}

/// Writes one snapshot into the data directory.
type Job = Box<dyn FnOnce(&Path) -> Result<(), SnapshotError> + Send + 'static>;

impl State {
    /// The first cursor the event store still needs from the log.
    fn events_need_from(&self) -> u64 {
        self.events
            .oldest_cursor()
            .unwrap_or(self.events.next_cursor())
            .max(self.events_snap_through + 1)
    }

    /// Deletes log segments nothing needs: the event store needs cursors from its oldest
    /// retained event (or after its snapshot), the sample history from after its snapshot.
    pub(super) fn truncate_wal(&mut self) {
        let keep_from = self.events_need_from().min(self.series_snap_through + 1);
        self.wal.truncate_before(keep_from);
        self.check_log_room();
    }

    /// The log's hard limit: `--wal-max-bytes` plus a segment (the one being written while a
    /// snapshot makes the older ones unneeded). Past it, ingest waits for the snapshot: at a high
    /// enough rate the log would otherwise outgrow any limit while a snapshot is written.
    fn wal_hard_limit(&self) -> u64 {
        self.wal_max_bytes() + self.cfg.wal_segment_bytes
    }

    /// Tells ingest streams whether the log has room, and starts the snapshot that makes room.
    pub(super) fn check_log_room(&mut self) {
        let full = self.wal.bytes() > self.wal_hard_limit();
        self.health.set_log_full(full);
        if full {
            self.maybe_snapshot();
        }
    }

    fn wal_max_bytes(&self) -> u64 {
        if self.cfg.wal_max_bytes > 0 {
            self.cfg.wal_max_bytes
        } else {
            (self.cfg.events_bytes as u64 * 2).max(self.cfg.wal_segment_bytes * 4)
        }
    }

    /// Starts a background snapshot when one is due: the sample history every
    /// `snapshot_interval` (if it changed), the event store when old events pin too much log.
    pub(super) fn maybe_snapshot(&mut self) {
        if self.snapshot_in_flight {
            return;
        }
        let through = self.events.next_cursor() - 1;
        let over = self.wal.bytes() > self.wal_max_bytes();
        let events_due = over
            && self.events_need_from() <= self.series_snap_through
            && through > self.events_snap_through;
        let series_due = (self.last_series_snapshot.elapsed() >= self.cfg.snapshot_interval
            && self.series.rows() != self.rows_at_last_snapshot)
            || (over && through > self.series_snap_through);
        if events_due {
            // Only the blocks are shared here; writing streams them to disk off this task.
            let events = self.events.view();
            let checkpoint = self.checkpoint();
            self.spawn_snapshot(
                SnapKind::Events,
                through,
                Box::new(move |dir| {
                    snapshot::write_atomic_with(dir, EVENTS_FILE, |w| {
                        snapshot::write_events(w, through, &checkpoint, events)
                    })
                }),
            );
        } else if series_due {
            let job = self.series_snapshot_job(through);
            self.last_series_snapshot = Instant::now();
            self.rows_at_last_snapshot = self.series.rows();
            self.spawn_snapshot(SnapKind::Series, through, Box::new(job));
        }
    }

    /// The sample history and the counter totals as of `through`, encoded here (compressed
    /// chunks are shared, the rest is small) and written by the returned job: the counters
    /// first, so their file is never older than the history's.
    pub(super) fn series_snapshot_job(
        &self,
        through: u64,
    ) -> impl FnOnce(&Path) -> Result<(), SnapshotError> + Send + 'static {
        let counters = snapshot::encode_counters(through, &self.counters.rows());
        let series =
            snapshot::encode_series(through, &gpulse_proto::metric::names(), self.series.gpus());
        move |dir| {
            snapshot::write_atomic(dir, COUNTERS_FILE, &counters)?;
            snapshot::write_atomic(dir, SERIES_FILE, &series)
        }
    }

    fn spawn_snapshot(&mut self, kind: SnapKind, through: u64, job: Job) {
        self.snapshot_in_flight = true;
        let dir = self.cfg.data_dir.clone();
        let me = self.snap_tx.clone();
        tokio::task::spawn_blocking(move || {
            let result = job(&dir).map_err(|e| e.to_string());
            let _ = me.blocking_send(SnapshotDone {
                kind,
                through,
                result,
            });
        });
    }

    pub(super) fn snapshot_done(&mut self, done: SnapshotDone) {
        let SnapshotDone {
            kind,
            through,
            result,
        } = done;
        self.snapshot_in_flight = false;
        if let Err(e) = result {
            self.metrics
                .snapshot_failures
                .with_label_values(&[kind.name(), "write"])
                .inc();
            warn!(kind = kind.name(), error = %e, "snapshot failed; the write-ahead log keeps the data");
            return;
        }
        self.metrics
            .snapshots
            .with_label_values(&[kind.name()])
            .inc();
        match kind {
            SnapKind::Series => self.series_snap_through = through,
            SnapKind::Events => self.events_snap_through = through,
        }
        info!(
            kind = kind.name(),
            through_cursor = through,
            "snapshot written"
        );
        self.truncate_wal();
        // Still over the limit (ingest went on while it was written): the next one at once.
        self.maybe_snapshot();
    }

    /// What a new log segment starts with: every agent's progress and the next cursor.
    pub(super) fn checkpoint(&self) -> StoreCheckpoint {
        StoreCheckpoint {
            agents: self.agents.progress(),
            next_cursor: self.events.next_cursor(),
        }
    }
}
