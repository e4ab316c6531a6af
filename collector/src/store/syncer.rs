//! Group commit: one thread runs `fdatasync` for every write that waits on it, batching all
//! requests that queued up during the previous sync. Acks to agents wait for this, so an ack
//! means the data is on disk; live subscribers do not (a written-but-unsynced frame already
//! survives a process crash, which is what `kill -9` tests).
//!
//! Every request carries a generation (increasing in request order). After each round the
//! thread reports the highest generation made durable to the state task, which advances each
//! agent's "durable through" from it: Hello answers and duplicate-only answers use that, never
//! what was merely written.
//!
//! A failed fsync is final (the PostgreSQL lesson): the kernel may have dropped the dirty pages
//! and a later fsync can succeed without them. From the first failure on, every request is
//! answered with an error and nothing more is reported durable; the store must be replayed from
//! disk by a restart.
use std::{
    fs::File,
    io,
    sync::{Arc, Mutex},
    thread,
};

use tokio::sync::{mpsc, oneshot};
use tracing::error;

struct Req {
    file: Arc<File>,
    generation: u64,
    done: oneshot::Sender<Result<(), String>>,
}

/// One round of syncs finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncDone {
    /// Every request up to this generation is durable (0: none of this round's).
    pub through_gen: u64,
    /// The first failure of the round (then, and forever after, nothing more is durable).
    pub error: Option<String>,
}

/// How one file is made durable; tests inject failures here.
pub type SyncFn = Box<dyn Fn(&File) -> io::Result<()> + Send>;

/// A replacement for `fdatasync` carried in the store's configuration (fault injection: a slow
/// or failing disk in tests).
#[derive(Clone)]
pub struct SyncHook(pub Arc<SharedSyncFn>);

/// The shareable form of [`SyncFn`].
pub type SharedSyncFn = dyn Fn(&File) -> io::Result<()> + Send + Sync;

impl std::fmt::Debug for SyncHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncHook")
    }
}

impl SyncHook {
    pub fn sync_fn(&self) -> SyncFn {
        let h = self.0.clone();
        Box::new(move |f| h(f))
    }
}

/// The first fsync failure, shared with the store (which also syncs when it rotates segments).
type Failed = Arc<Mutex<Option<String>>>;

#[derive(Clone)]
pub struct Syncer {
    tx: std::sync::mpsc::Sender<Req>,
    failed: Failed,
}

impl Syncer {
    /// A syncer using `fdatasync`, reporting every round to `report`.
    pub fn start(report: mpsc::UnboundedSender<SyncDone>) -> io::Result<Self> {
        Self::start_with(report, Box::new(|f: &File| f.sync_data()))
    }

    pub fn start_with(report: mpsc::UnboundedSender<SyncDone>, sync: SyncFn) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Req>();
        let failed: Failed = Arc::default();
        let shared = failed.clone();
        thread::Builder::new()
            .name("gpulse-wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let done = match shared.lock() {
                        Ok(mut failed) => sync_round(&sync, batch, &mut failed),
                        Err(_) => return,
                    };
                    let _ = report.send(done);
                }
            })?;
        Ok(Self { tx, failed })
    }

    /// An fsync outside the syncer failed (a segment synced before rotation): from now on
    /// nothing is reported durable.
    pub fn poison(&self, error: String) {
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(error);
        }
    }

    /// Asks for `file` to be synced for the write of generation `generation`; the receiver resolves
    /// when it is.
    pub fn request(
        &self,
        file: Arc<File>,
        generation: u64,
    ) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        if let Err(e) = self.tx.send(Req {
            file,
            generation,
            done,
        }) {
            let _ = e.0.done.send(Err("WAL sync thread stopped".into()));
        }
        rx
    }
}

/// Syncs each distinct file of the round once, in request order, and answers every request.
fn sync_round(sync: &SyncFn, batch: Vec<Req>, failed: &mut Option<String>) -> SyncDone {
    let mut synced: Vec<(*const File, Result<(), String>)> = Vec::new();
    let mut out = SyncDone {
        through_gen: 0,
        error: None,
    };
    for req in batch {
        let res = if let Some(e) = failed.as_ref() {
            Err(format!("an earlier fsync failed: {e}"))
        } else {
            let key = Arc::as_ptr(&req.file);
            match synced.iter().find(|(k, _)| *k == key) {
                Some((_, r)) => r.clone(),
                None => {
                    let r = sync(&req.file).map_err(|e| e.to_string());
                    if let Err(e) = &r {
                        error!(error = %e, "fdatasync of the WAL failed; the store stops acknowledging until a restart replays it");
                        *failed = Some(e.clone());
                        out.error = Some(e.clone());
                    }
                    synced.push((key, r.clone()));
                    r
                }
            }
        };
        if res.is_ok() && out.error.is_none() {
            out.through_gen = out.through_gen.max(req.generation);
        }
        let _ = req.done.send(res);
    }
    if out.error.is_none()
        && let Some(e) = failed.as_ref()
    {
        out.error = Some(e.clone());
        out.through_gen = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn file() -> Arc<File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    #[tokio::test]
    async fn reports_the_durable_generation_and_latches_the_first_failure() {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        // The second sync fails; a later one would "succeed" without the lost pages.
        let sync: SyncFn = Box::new(move |_f| {
            if c.fetch_add(1, Ordering::SeqCst) == 1 {
                Err(io::Error::from_raw_os_error(libc::EIO))
            } else {
                Ok(())
            }
        });
        let (rtx, mut rrx) = mpsc::unbounded_channel();
        let s = Syncer::start_with(rtx, sync).unwrap();
        let f = file();
        assert_eq!(s.request(f.clone(), 1).await.unwrap(), Ok(()));
        assert_eq!(
            rrx.recv().await.unwrap(),
            SyncDone {
                through_gen: 1,
                error: None
            }
        );
        let e = s.request(f.clone(), 2).await.unwrap().unwrap_err();
        assert!(e.contains("os error 5"), "{e}");
        let d = rrx.recv().await.unwrap();
        assert_eq!(d.through_gen, 0);
        assert!(d.error.is_some());
        // The file system would now say yes; the syncer must not.
        let e = s.request(f, 3).await.unwrap().unwrap_err();
        assert!(e.contains("earlier fsync failed"), "{e}");
        let d = rrx.recv().await.unwrap();
        assert_eq!((d.through_gen, d.error.is_some()), (0, true));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "no fsync after the failure"
        );
    }

    #[test]
    fn one_round_syncs_each_file_once_and_stops_at_the_first_failure() {
        let (a, b) = (file(), file());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let bad = Arc::as_ptr(&b) as usize;
        let sync: SyncFn = Box::new(move |f| {
            c.fetch_add(1, Ordering::SeqCst);
            if std::ptr::from_ref(f) as usize == bad {
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            } else {
                Ok(())
            }
        });
        let mut failed = None;
        let mut rxs = Vec::new();
        let mut batch = Vec::new();
        for (generation, f) in [(1, &a), (2, &a), (3, &b), (4, &a)] {
            let (done, rx) = oneshot::channel();
            rxs.push(rx);
            batch.push(Req {
                file: f.clone(),
                generation,
                done,
            });
        }
        let d = sync_round(&sync, batch, &mut failed);
        assert_eq!(
            d.through_gen, 2,
            "generation 3 failed, so 4 is not durable either"
        );
        assert!(d.error.is_some() && failed.is_some());
        let results: Vec<bool> = rxs
            .into_iter()
            .map(|mut r| r.try_recv().unwrap().is_ok())
            .collect();
        assert_eq!(results, [true, true, false, false]);
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a synced once, b once");
    }
}
