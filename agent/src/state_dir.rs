//! The agent's state directory (`--state-dir`, a hostPath in the DaemonSet): its identity, so
//! its sequence numbers continue across restarts, and the spool log (`spool_log`).
//!
//! `identity.json`: `{"agent_id": ..., "boot_id": ...}`, written atomically (temporary file,
//! fsync, rename). The agent id is kept while the node name is the same (it starts with
//! `<node>/`); the boot id tells the next start whether the kernel log it reads is the one the
//! previous run saw.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

const FILE: &str = "identity.json";
const LOCK: &str = "lock";

/// Holds the state directory for this process: a second agent on the same directory would
/// interleave two spools in one log.
#[derive(Debug)]
pub struct DirLock(
    #[expect(
        dead_code,
        reason = "held, never read: the lock lasts as long as the open file"
    )]
    File,
);

/// Takes the state directory (creating it, 0700), or says which process has it.
pub fn lock(dir: &Path) -> io::Result<DirLock> {
    use std::os::fd::AsRawFd;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .mode(0o600)
        .open(dir.join(LOCK))?;
    // SAFETY: flock on a descriptor we own; released when the file is closed (process exit).
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = fs::read_to_string(dir.join(LOCK)).unwrap_or_default();
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is in use by another gpulse-agent (pid {})",
                dir.display(),
                holder.trim()
            ),
        ));
    }
    let mut w = &f;
    w.set_len(0)?;
    write!(w, "{}", std::process::id())?;
    Ok(DirLock(f))
}

/// Who this agent is, and what the previous run left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub agent_id: String,
    /// The boot id the previous run recorded (None on a first start).
    pub previous_boot: Option<String>,
}

fn read(dir: &Path) -> Option<(String, String)> {
    let text = fs::read_to_string(dir.join(FILE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some((
        v.get("agent_id")?.as_str()?.to_string(),
        v.get("boot_id")?.as_str()?.to_string(),
    ))
}

fn write(dir: &Path, agent_id: &str, boot_id: &str) -> io::Result<()> {
    let body = serde_json::json!({ "agent_id": agent_id, "boot_id": boot_id }).to_string();
    write_atomic(&dir.join(FILE), body.as_bytes())
}

/// Replaces `path` with `data` so a crash leaves the old file or the new one: a temporary file
/// (0600) written and fsynced, renamed over it, the directory fsynced.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Loads (or creates) the identity in `dir` for `node` on boot `boot_id`; `fresh` makes a new
/// instance id when there is none for this node. Records this boot for the next start.
pub fn identity(
    dir: &Path,
    node: &str,
    boot_id: &str,
    fresh: impl FnOnce() -> io::Result<String>,
) -> io::Result<Identity> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let prefix = format!("{node}/");
    let (agent_id, previous_boot) = match read(dir) {
        Some((id, boot)) if id.starts_with(&prefix) => (id, Some(boot)),
        _ => (format!("{prefix}{}", fresh()?), None),
    };
    if previous_boot.as_deref() != Some(boot_id) {
        write(dir, &agent_id, boot_id)?;
    }
    Ok(Identity {
        agent_id,
        previous_boot,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_id_survives_restarts_and_the_boot_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("state");
        let a = identity(&d, "n1", "boot-1", || Ok("u1".into())).unwrap();
        assert_eq!(a.agent_id, "n1/u1");
        assert_eq!(a.previous_boot, None);
        let b = identity(&d, "n1", "boot-1", || Ok("u2".into())).unwrap();
        assert_eq!(b.agent_id, "n1/u1", "same id after a restart");
        assert_eq!(b.previous_boot.as_deref(), Some("boot-1"));
        let c = identity(&d, "n1", "boot-2", || Ok("u3".into())).unwrap();
        assert_eq!(c.agent_id, "n1/u1", "and after a reboot");
        assert_eq!(c.previous_boot.as_deref(), Some("boot-1"));
        // A renamed node is a new agent.
        let r = identity(&d, "n2", "boot-2", || Ok("u4".into())).unwrap();
        assert_eq!(r.agent_id, "n2/u4");
        assert_eq!(r.previous_boot, None);
        // A damaged file is a first start, not an error.
        fs::write(d.join(FILE), "{not json").unwrap();
        let x = identity(&d, "n2", "boot-2", || Ok("u5".into())).unwrap();
        assert_eq!(x.agent_id, "n2/u5");
    }

    #[test]
    fn one_agent_per_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("in use by another gpulse-agent"),
            "{err}"
        );
        drop(held);
        lock(dir.path()).unwrap();
    }
}
