//! Group commit: one thread runs `fdatasync` for every write that waits on it, batching all
//! requests that queued up during the previous sync. Acks to agents wait for this, so an ack
//! means the data is on disk; live subscribers do not (a written-but-unsynced frame already
//! survives a process crash, which is what `kill -9` tests).
use std::{fs::File, io, sync::Arc, thread};

use tokio::sync::oneshot;
use tracing::error;

struct Req {
    file: Arc<File>,
    done: oneshot::Sender<Result<(), String>>,
}

#[derive(Clone)]
pub struct Syncer {
    tx: std::sync::mpsc::Sender<Req>,
}

impl Syncer {
    pub fn start() -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Req>();
        thread::Builder::new().name("gpulse-wal-sync".into()).spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let mut synced: Vec<(*const File, Result<(), String>)> = Vec::new();
                for req in batch {
                    let key = Arc::as_ptr(&req.file);
                    let res = match synced.iter().find(|(k, _)| *k == key) {
                        Some((_, r)) => r.clone(),
                        None => {
                            let r = req.file.sync_data().map_err(|e| e.to_string());
                            if let Err(e) = &r {
                                error!(error = %e, "fdatasync of the WAL failed; acks are withheld");
                            }
                            synced.push((key, r.clone()));
                            r
                        }
                    };
                    let _ = req.done.send(res);
                }
            }
        })?;
        Ok(Self { tx })
    }

    /// Asks for `file` to be synced; the receiver resolves when it is.
    pub fn request(&self, file: Arc<File>) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        if let Err(e) = self.tx.send(Req { file, done }) {
            let _ = e.0.done.send(Err("WAL sync thread stopped".into()));
        }
        rx
    }
}
