//! When an agent's events count as durable (the syncer made them so), what happens when an
//! fsync fails (nothing is vouched for again), and the final sync at shutdown.
use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::{info, warn};

use super::State;
use crate::store::{events::Origin, syncer::SyncDone};

impl State {
    /// Asks the syncer to make everything written so far durable; `origin`'s agent is durable
    /// through `through` once it did. Without fsync, a write counts as durable at once.
    pub(super) fn request_sync(
        &mut self,
        origin: Arc<Origin>,
        through: u64,
    ) -> oneshot::Receiver<Result<(), String>> {
        if !self.cfg.fsync {
            self.agents.made_durable(&origin.agent_id, through);
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(Ok(()));
            return rx;
        }
        self.write_gen += 1;
        self.pending_durable
            .push_back((self.write_gen, origin, through));
        self.syncer.request(self.wal.sync_handle(), self.write_gen)
    }

    /// A round of fsyncs finished: advance each agent's durable seq, or fail the store.
    pub(super) fn synced(&mut self, done: SyncDone) {
        while let Some((generation, _, _)) = self.pending_durable.front()
            && *generation <= done.through_gen
        {
            let Some((_, origin, through)) = self.pending_durable.pop_front() else {
                break;
            };
            self.agents.made_durable(&origin.agent_id, through);
        }
        if let Some(e) = done.error {
            self.fail(e);
        }
    }

    /// An fsync failed. The dirty pages may be gone while the file system reports later syncs
    /// as fine, so nothing written since the last good sync can be vouched for: stop
    /// acknowledging for good (the process exits and its successor replays the log).
    pub(super) fn fail(&mut self, error: String) {
        if self.failed.is_some() {
            return;
        }
        self.metrics.store_sync_errors.inc();
        self.metrics.store_writable.set(0);
        self.syncer.poison(error.clone());
        self.health.sync_failed(&error);
        self.pending_durable.clear();
        warn!(error = %error, "fsync failed: the store stops acknowledging; restart to replay the log");
        self.failed = Some(error);
    }

    /// Final sync of the log and a sample snapshot, so a restart replays little.
    pub(super) fn shut_down(&mut self) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(format!("store failed earlier: {e}"));
        }
        if let Err(e) = self.wal.sync_handle().sync_data() {
            self.fail(e.to_string());
            return Err(format!("final fsync: {e}"));
        }
        if self.series.rows() != self.rows_at_last_snapshot || self.series_snap_through == 0 {
            let through = self.events.next_cursor() - 1;
            self.series_snapshot_job(through)(&self.cfg.data_dir)
                .map_err(|e| format!("final series snapshot: {e}"))?;
        }
        info!(
            events = self.events.len(),
            wal_bytes = self.wal.bytes(),
            "store synced and stopped"
        );
        Ok(())
    }
}
