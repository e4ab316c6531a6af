//! What `/healthz` and `/readyz` report, kept true by the state task itself.
//!
//! Liveness: the state task beats at least once a second (its tick) and after every command; a
//! task that has ended (panicked) or has not beaten for [`STUCK_AFTER`] is unhealthy, and the
//! orchestrator restarts the process. Readiness additionally requires a store that can make
//! writes durable: while the log cannot be written (a full disk) or after a failed fsync, agents
//! must go to another collector, so `/readyz` fails.
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// A state task silent for this long is reported stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct StoreHealth {
    origin: Instant,
    /// Milliseconds after `origin` of the state task's latest beat.
    beat_ms: AtomicU64,
    write_failing: AtomicBool,
    sync_failed: AtomicBool,
    /// The latest write or sync error, for the readiness answer.
    last_error: Mutex<String>,
    /// The log is over its hard limit while a snapshot catches up: ingest streams wait (their
    /// agents spool) instead of growing it further.
    log_full: tokio::sync::watch::Sender<bool>,
}

/// Why the store is not ready (or not alive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The state task has not beaten for this long.
    Stuck(Duration),
    /// The log cannot be written; the error.
    WriteFailing(String),
    /// An fsync failed: nothing more is acknowledged until the log is replayed from disk.
    SyncFailed(String),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Stuck(d) => write!(f, "state task has not answered for {} s", d.as_secs()),
            Problem::WriteFailing(e) => write!(f, "write-ahead log cannot be written: {e}"),
            Problem::SyncFailed(e) => write!(
                f,
                "fsync of the write-ahead log failed ({e}); nothing more is acknowledged until a restart replays it"
            ),
        }
    }
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            beat_ms: AtomicU64::new(0),
            write_failing: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            log_full: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl StoreHealth {
    /// The state task is alive and answering.
    pub fn beat(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.beat_ms.store(ms, Ordering::Relaxed);
    }

    fn set_error(&self, e: &str) {
        if let Ok(mut l) = self.last_error.lock() {
            e.clone_into(&mut l);
        }
    }

    fn error(&self) -> String {
        self.last_error
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    pub fn write_failed(&self, e: &str) {
        self.set_error(e);
        self.write_failing.store(true, Ordering::Relaxed);
    }

    pub fn write_ok(&self) {
        self.write_failing.store(false, Ordering::Relaxed);
    }

    pub fn sync_failed(&self, e: &str) {
        self.set_error(e);
        self.sync_failed.store(true, Ordering::Relaxed);
    }

    pub fn is_sync_failed(&self) -> bool {
        self.sync_failed.load(Ordering::Relaxed)
    }

    /// Sets whether the log is over its hard limit (wakes waiting ingest streams when not).
    pub fn set_log_full(&self, full: bool) {
        self.log_full
            .send_if_modified(|f| std::mem::replace(f, full) != full);
    }

    /// Waits while the log is full, at most `max`; whether it waited.
    pub async fn wait_log_room(&self, max: Duration) -> bool {
        if !*self.log_full.borrow() {
            return false;
        }
        let mut rx = self.log_full.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|full| !*full)).await;
        true
    }

    pub fn is_write_failing(&self) -> bool {
        self.write_failing.load(Ordering::Relaxed)
    }

    /// Liveness: `None` while the state task beats.
    pub fn liveness(&self, now: Instant) -> Option<Problem> {
        let beat = Duration::from_millis(self.beat_ms.load(Ordering::Relaxed));
        let since = now.saturating_duration_since(self.origin + beat);
        (since >= STUCK_AFTER).then_some(Problem::Stuck(since))
    }

    /// Readiness: alive, and the log takes writes and syncs.
    pub fn readiness(&self, now: Instant) -> Option<Problem> {
        if let Some(p) = self.liveness(now) {
            return Some(p);
        }
        if self.is_sync_failed() {
            return Some(Problem::SyncFailed(self.error()));
        }
        if self.is_write_failing() {
            return Some(Problem::WriteFailing(self.error()));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_task_is_stuck_and_a_beat_revives_it() {
        let h = StoreHealth::default();
        h.beat();
        let now = Instant::now();
        assert_eq!(h.liveness(now), None);
        let later = now + STUCK_AFTER + Duration::from_secs(1);
        assert!(matches!(h.liveness(later), Some(Problem::Stuck(d)) if d >= STUCK_AFTER));
        assert!(matches!(h.readiness(later), Some(Problem::Stuck(_))));
    }

    #[test]
    fn write_failures_clear_but_sync_failures_stay() {
        let h = StoreHealth::default();
        h.beat();
        let now = Instant::now();
        h.write_failed("No space left on device (os error 28)");
        assert_eq!(
            h.readiness(now),
            Some(Problem::WriteFailing(
                "No space left on device (os error 28)".into()
            ))
        );
        h.write_ok();
        assert_eq!(h.readiness(now), None);
        h.sync_failed("Input/output error (os error 5)");
        h.write_ok();
        let p = h
            .readiness(now)
            .expect("a failed fsync keeps the store unready");
        assert!(p.to_string().contains("fsync"), "{p}");
        assert_eq!(
            h.liveness(now),
            None,
            "still alive: it answers, it just must not ack"
        );
    }
}
