//! The remote-write queue on disk: one file per request body (`q-<seq>.bin`), written to a
//! temporary name, synced and renamed, so a request is either whole in the queue or absent; the
//! oldest is sent first and deleted once the receiver took it. Bounded in bytes: past the bound
//! the oldest requests are dropped, and counted. It survives restarts and receiver outages.
use std::{
    collections::VecDeque,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> QueueError + '_ {
    move |e| QueueError::Io(p.to_path_buf(), e)
}

#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    /// (seq, bytes, samples) oldest first.
    files: VecDeque<(u64, u64, u64)>,
    bytes: u64,
    max_bytes: u64,
    next: u64,
}

/// What making room dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub requests: u64,
    pub samples: u64,
}

fn name(seq: u64, samples: u64) -> String {
    format!("q-{seq:016}-{samples}.bin")
}

fn parse(file: &str) -> Option<(u64, u64)> {
    let rest = file.strip_prefix("q-")?.strip_suffix(".bin")?;
    let (seq, samples) = rest.split_once('-')?;
    Some((seq.parse().ok()?, samples.parse().ok()?))
}

impl DiskQueue {
    /// Opens (creating) the queue in `dir`, keeping what an earlier run left; half-written
    /// temporary files are removed.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, QueueError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let mut files = Vec::new();
        for e in fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".tmp") {
                let _ = fs::remove_file(e.path());
                continue;
            }
            if let Some((seq, samples)) = parse(&n) {
                let len = e.metadata().map_err(io(&e.path()))?.len();
                files.push((seq, len, samples));
            }
        }
        files.sort_unstable();
        let next = files.last().map_or(1, |f| f.0 + 1);
        let bytes = files.iter().map(|f| f.1).sum();
        Ok(Self {
            dir: dir.to_path_buf(),
            files: files.into(),
            bytes,
            max_bytes,
            next,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    fn path(&self, seq: u64, samples: u64) -> PathBuf {
        self.dir.join(name(seq, samples))
    }

    /// Appends one request body of `samples` samples, durably; drops the oldest requests first
    /// while it would not fit.
    pub fn push(&mut self, body: &[u8], samples: u64) -> Result<Dropped, QueueError> {
        let mut dropped = Dropped::default();
        while !self.files.is_empty() && self.bytes + body.len() as u64 > self.max_bytes {
            let (_, s) = self.pop()?;
            dropped.requests += 1;
            dropped.samples += s;
        }
        let seq = self.next;
        let path = self.path(seq, samples);
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(body).map_err(io(&tmp))?;
        f.sync_data().map_err(io(&tmp))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        self.next += 1;
        self.bytes += body.len() as u64;
        self.files.push_back((seq, body.len() as u64, samples));
        Ok(dropped)
    }

    /// The oldest request: its body and sample count.
    pub fn peek(&self) -> Result<Option<(Vec<u8>, u64)>, QueueError> {
        let Some(&(seq, _, samples)) = self.files.front() else {
            return Ok(None);
        };
        let p = self.path(seq, samples);
        Ok(Some((fs::read(&p).map_err(io(&p))?, samples)))
    }

    /// Removes the oldest request (sent, or dropped); returns (bytes, samples).
    pub fn pop(&mut self) -> Result<(u64, u64), QueueError> {
        let Some((seq, len, samples)) = self.files.pop_front() else {
            return Ok((0, 0));
        };
        let p = self.path(seq, samples);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(QueueError::Io(p, e)),
        }
        self.bytes -= len;
        Ok((len, samples))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_in_order_and_drops_the_oldest_past_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut q = DiskQueue::open(dir.path(), 100).unwrap();
        for i in 0..3u8 {
            assert_eq!(q.push(&[i; 30], 10).unwrap(), Dropped::default());
        }
        // A fourth does not fit: the oldest goes.
        assert_eq!(
            q.push(&[3; 30], 10).unwrap(),
            Dropped {
                requests: 1,
                samples: 10
            }
        );
        assert_eq!(q.bytes(), 90);
        drop(q);
        std::fs::write(dir.path().join("q-0000000000000099-1.tmp"), b"half").unwrap();
        let mut q = DiskQueue::open(dir.path(), 100).unwrap();
        assert_eq!(q.len(), 3);
        assert_eq!(q.peek().unwrap().unwrap(), (vec![1; 30], 10));
        q.pop().unwrap();
        assert_eq!(q.peek().unwrap().unwrap().0, vec![2; 30]);
        q.push(&[4; 5], 1).unwrap();
        let q = DiskQueue::open(dir.path(), 100).unwrap();
        assert_eq!(
            q.len(),
            3,
            "the new request kept a higher seq than the ones before it"
        );
        assert!(!dir.path().join("q-0000000000000099-1.tmp").exists());
    }
}
