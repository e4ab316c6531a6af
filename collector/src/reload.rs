//! Files the collector re-reads when they change on disk (certificates cert-manager rotates, the
//! static token file): the last good contents stay in force while a new version fails to load,
//! and every reload is logged and counted.
use std::{
    path::PathBuf,
    sync::{Arc, RwLock, Weak},
    time::{Duration, SystemTime},
};

use prometheus::IntCounterVec;
use tracing::{info, warn};

/// How often watched files are checked for a change.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// A value loaded from files, replaced when they change.
pub struct Reloading<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Reloading<T> {
    pub fn new(v: T) -> Self {
        Self {
            current: RwLock::new(Arc::new(v)),
        }
    }

    /// Puts `v` in force (a source other than a watched file: a fetched JWKS).
    pub fn replace(&self, v: T) {
        self.set(v);
    }

    /// The value now in force.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, v: T) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
    }
}

/// A file's text, refused when larger than `max` bytes (the error names the file).
pub fn read_bounded(path: &std::path::Path, max: u64) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > max {
        return Err(format!("{}: larger than {max} bytes", path.display()));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// What identifies a version of a file: a change of any part means it was replaced or written
/// (a Kubernetes Secret volume swaps a symlink, so the target's inode changes).
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p).ok().map(|m| {
                (
                    m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                    m.len(),
                    m.ino(),
                )
            })
        })
        .collect()
}

/// Loads `what` from `paths` now (an error is a start-up error) and then every `interval` when
/// any of them changed. Reload results are counted in `reloads{file=what,result=ok|error}`.
/// The watch ends when the returned value is dropped.
pub fn watch<T, F>(
    what: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    reloads: IntCounterVec,
    load: F,
) -> Result<Arc<Reloading<T>>, String>
where
    T: Send + Sync + 'static,
    F: Fn() -> Result<T, String> + Send + 'static,
{
    let mut seen = stamp(&paths);
    let value = Arc::new(Reloading {
        current: RwLock::new(Arc::new(load()?)),
    });
    let weak: Weak<Reloading<T>> = Arc::downgrade(&value);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(target) = weak.upgrade() else {
                return;
            };
            let now = stamp(&paths);
            if now == seen {
                continue;
            }
            match load() {
                Ok(v) => {
                    target.set(v);
                    seen = now;
                    reloads.with_label_values(&[what, "ok"]).inc();
                    info!(file = what, "reloaded");
                }
                Err(e) => {
                    // Tried again at the next change; a half-written pair (a new certificate
                    // before its key) loads once the second file lands.
                    seen = now;
                    reloads.with_label_values(&[what, "error"]).inc();
                    warn!(file = what, error = %e, "reload failed; the previous version stays in force");
                }
            }
        }
    });
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_last_good_value() {
        let dir = tempfile_dir();
        let path = dir.join("v");
        std::fs::write(&path, "1").unwrap();
        let reloads =
            IntCounterVec::new(prometheus::Opts::new("r", "r"), &["file", "result"]).unwrap();
        let p = path.clone();
        let v = watch(
            "v",
            vec![path.clone()],
            Duration::from_millis(20),
            reloads.clone(),
            move || {
                std::fs::read_to_string(&p)
                    .map_err(|e| e.to_string())?
                    .trim()
                    .parse::<u32>()
                    .map_err(|e| e.to_string())
            },
        )
        .unwrap();
        assert_eq!(*v.current(), 1);
        std::fs::write(&path, "22").unwrap();
        wait_for(|| *v.current() == 22).await;
        std::fs::write(&path, "not a number").unwrap();
        wait_for(|| reloads.with_label_values(&["v", "error"]).get() == 1).await;
        assert_eq!(*v.current(), 22, "the last good value stays");
        std::fs::write(&path, "333").unwrap();
        wait_for(|| *v.current() == 333).await;
        assert_eq!(reloads.with_label_values(&["v", "ok"]).get(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gpulse-reload-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn wait_for(f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
