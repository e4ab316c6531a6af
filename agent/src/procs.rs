//! GPU process tracking in user space: turns the kernel's open/exec/exit records into
//! `GpuProcess` events with parent, executable and device list, and garbage-collects processes
//! whose exit was never seen (ring buffer full, exit before the agent started watching, PID
//! reuse), reporting those exits as `inferred`. The table is bounded.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use gpulse_proto::{
    time::from_unix_nanos,
    v1::{GpuProcess, PodRef, ProcessEventType},
};

use crate::pods::Attributor;

/// Most device nodes remembered per process (a node has a few dozen at most).
const MAX_DEVICES: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProcKind {
    Open,
    Exec,
    Exit,
}

/// A process record from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcCapture {
    pub kind: ProcKind,
    pub unix_ns: i128,
    pub pid: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    /// Open: device node; exec: new executable.
    pub path: String,
}

#[derive(Clone, Debug)]
struct ProcInfo {
    pid: u32,
    ppid: u32,
    comm: String,
    exe: String,
    cgroup_id: u64,
    devices: Vec<String>,
    start_unix_ns: i128,
    /// /proc/<tgid>/stat starttime (clock ticks since boot), to tell PID reuse apart.
    proc_start: Option<u64>,
    /// The pod at the time of the open/exec (kept for the exit, when /proc is gone).
    pod: Option<PodRef>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrackerStats {
    pub tracked: usize,
    pub table_full: u64,
    pub inferred_exits: u64,
    pub coalesced_opens: u64,
}

pub struct ProcessTracker {
    table: HashMap<u32, ProcInfo>,
    max: usize,
    proc_root: PathBuf,
    stats: TrackerStats,
    pods: Option<Attributor>,
}

/// `(ppid, starttime)` from `/proc/<pid>/stat`. The comm field may hold spaces and parentheses,
/// so fields are counted after the last `)`.
pub fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state(0) ppid(1) ... starttime is field 22 of the whole line = index 19 here.
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

impl ProcessTracker {
    pub fn new(max: usize) -> Self {
        Self::with_proc_root(max, PathBuf::from("/proc"))
    }

    /// A tracker reading another /proc (tests use a fake one).
    pub fn with_proc_root(max: usize, proc_root: PathBuf) -> Self {
        Self {
            table: HashMap::new(),
            max,
            proc_root,
            stats: TrackerStats::default(),
            pods: None,
        }
    }

    /// Attributes processes to pods (at open and exec time).
    pub fn with_attributor(mut self, a: Attributor) -> Self {
        self.pods = Some(a);
        self
    }

    fn pod(&self, tgid: u32) -> Option<PodRef> {
        self.pods.as_ref().and_then(|a| a.pod_of(tgid))
    }

    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            tracked: self.table.len(),
            ..self.stats
        }
    }

    fn stat(&self, tgid: u32) -> Option<(u32, u64)> {
        let text = fs::read_to_string(self.proc_root.join(tgid.to_string()).join("stat")).ok()?;
        parse_stat(&text)
    }

    fn exe(&self, tgid: u32) -> String {
        fs::read_link(self.proc_root.join(tgid.to_string()).join("exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn event(ty: ProcessEventType, tgid: u32, info: &ProcInfo, device: &str) -> GpuProcess {
        GpuProcess {
            r#type: ty as i32,
            pid: info.pid,
            tgid,
            ppid: info.ppid,
            comm: info.comm.clone(),
            exe: info.exe.clone(),
            cgroup_id: info.cgroup_id,
            device: device.to_string(),
            devices: info.devices.clone(),
            start_time: Some(from_unix_nanos(info.start_unix_ns)),
            end_time: None,
            inferred: false,
            pod: info.pod.clone(),
        }
    }

    /// Applies one kernel record; returns the event to report, if any.
    pub fn handle(&mut self, c: ProcCapture) -> Option<GpuProcess> {
        match c.kind {
            ProcKind::Open => {
                if let Some(info) = self.table.get_mut(&c.tgid) {
                    if info.devices.contains(&c.path) {
                        // Same process, same node again (CUDA opens nodes many times).
                        self.stats.coalesced_opens += 1;
                        return None;
                    }
                    if info.devices.len() < MAX_DEVICES {
                        info.devices.push(c.path.clone());
                    }
                    info.pid = c.pid;
                    let info = info.clone();
                    return Some(Self::event(
                        ProcessEventType::DeviceOpen,
                        c.tgid,
                        &info,
                        &c.path,
                    ));
                }
                let (ppid, proc_start) = self.stat(c.tgid).map_or((0, None), |(p, s)| (p, Some(s)));
                let info = ProcInfo {
                    pid: c.pid,
                    ppid,
                    comm: c.comm,
                    exe: self.exe(c.tgid),
                    cgroup_id: c.cgroup_id,
                    devices: vec![c.path.clone()],
                    start_unix_ns: c.unix_ns,
                    proc_start,
                    pod: self.pod(c.tgid),
                };
                let ev = Self::event(ProcessEventType::Open, c.tgid, &info, &c.path);
                if self.table.len() >= self.max {
                    // Reported, but its exit will not be: say so through the counter.
                    self.stats.table_full += 1;
                } else {
                    self.table.insert(c.tgid, info);
                }
                Some(ev)
            }
            ProcKind::Exec => {
                let exe = if c.path.is_empty() {
                    self.exe(c.tgid)
                } else {
                    c.path.clone()
                };
                // exec keeps the PID but /proc's start time too; re-read it anyway (cheap).
                let start = self.proc_start_of(c.tgid);
                let pod = self.pod(c.tgid);
                let info = match self.table.get_mut(&c.tgid) {
                    Some(info) => {
                        info.exe = exe;
                        info.comm = c.comm;
                        info.pid = c.pid;
                        info.proc_start = start.or(info.proc_start);
                        if pod.is_some() {
                            info.pod = pod;
                        }
                        info.clone()
                    }
                    None => ProcInfo {
                        pid: c.pid,
                        ppid: self.stat(c.tgid).map_or(0, |s| s.0),
                        comm: c.comm,
                        exe,
                        cgroup_id: c.cgroup_id,
                        devices: Vec::new(),
                        start_unix_ns: c.unix_ns,
                        proc_start: None,
                        pod,
                    },
                };
                Some(Self::event(ProcessEventType::Exec, c.tgid, &info, ""))
            }
            ProcKind::Exit => {
                let info = self.table.remove(&c.tgid).unwrap_or(ProcInfo {
                    pid: c.pid,
                    ppid: 0,
                    comm: c.comm.clone(),
                    exe: String::new(),
                    cgroup_id: c.cgroup_id,
                    devices: Vec::new(),
                    start_unix_ns: c.unix_ns,
                    proc_start: None,
                    pod: None,
                });
                let mut ev = Self::event(ProcessEventType::Exit, c.tgid, &info, "");
                ev.end_time = Some(from_unix_nanos(c.unix_ns));
                Some(ev)
            }
        }
    }

    fn proc_start_of(&self, tgid: u32) -> Option<u64> {
        self.stat(tgid).map(|s| s.1)
    }

    /// Reports as exited every tracked process that is gone from /proc, or whose PID now
    /// belongs to a different process.
    pub fn gc(&mut self, now_unix_ns: i128) -> Vec<GpuProcess> {
        let gone: Vec<u32> = self
            .table
            .iter()
            .filter(|(tgid, info)| match self.stat(**tgid) {
                None => !self.proc_root.join(tgid.to_string()).exists(),
                Some((_, start)) => info.proc_start.is_some_and(|s| s != start),
            })
            .map(|(t, _)| *t)
            .collect();
        let mut out = Vec::new();
        for tgid in gone {
            if let Some(info) = self.table.remove(&tgid) {
                let mut ev = Self::event(ProcessEventType::Exit, tgid, &info, "");
                ev.end_time = Some(from_unix_nanos(now_unix_ns));
                ev.inferred = true;
                self.stats.inferred_exits += 1;
                out.push(ev);
            }
        }
        out
    }

    pub fn is_tracked(&self, tgid: u32) -> bool {
        self.table.contains_key(&tgid)
    }
}

/// True when `/proc/<tgid>` still exists under `root`.
pub fn alive(root: &Path, tgid: u32) -> bool {
    root.join(tgid.to_string()).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(kind: ProcKind, tgid: u32, path: &str) -> ProcCapture {
        ProcCapture {
            kind,
            unix_ns: 1_000,
            pid: tgid,
            tgid,
            cgroup_id: 7,
            comm: "python".into(),
            path: path.into(),
        }
    }

    fn fake_proc(dir: &Path, tgid: u32, ppid: u32, start: u64) {
        let d = dir.join(tgid.to_string());
        fs::create_dir_all(&d).unwrap();
        // comm with spaces and parentheses, as the kernel allows.
        let stat = format!(
            "{tgid} (my (odd) comm) S {ppid} 1 1 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 10"
        );
        fs::write(d.join("stat"), stat).unwrap();
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        assert_eq!(
            parse_stat("42 (a) b) S 7 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9999 0 0"),
            Some((7, 9999))
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn open_device_open_exec_exit_lifecycle() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), 100, 1, 5000);
        let mut t = ProcessTracker::with_proc_root(16, dir.path().to_path_buf());
        let e = t
            .handle(cap(ProcKind::Open, 100, "/dev/nvidiactl"))
            .unwrap();
        assert_eq!(e.r#type, ProcessEventType::Open as i32);
        assert_eq!(
            (e.ppid, e.device.as_str(), e.cgroup_id),
            (1, "/dev/nvidiactl", 7)
        );
        assert!(
            t.handle(cap(ProcKind::Open, 100, "/dev/nvidiactl"))
                .is_none(),
            "same node again is coalesced"
        );
        let e = t.handle(cap(ProcKind::Open, 100, "/dev/nvidia0")).unwrap();
        assert_eq!(e.r#type, ProcessEventType::DeviceOpen as i32);
        assert_eq!(e.devices, vec!["/dev/nvidiactl", "/dev/nvidia0"]);
        let e = t
            .handle(cap(ProcKind::Exec, 100, "/usr/bin/python3"))
            .unwrap();
        assert_eq!(
            (e.r#type, e.exe.as_str()),
            (ProcessEventType::Exec as i32, "/usr/bin/python3")
        );
        let e = t.handle(cap(ProcKind::Exit, 100, "")).unwrap();
        assert_eq!(e.r#type, ProcessEventType::Exit as i32);
        assert!(e.end_time.is_some() && !e.inferred);
        assert_eq!(e.devices.len(), 2);
        assert!(!t.is_tracked(100));
        assert_eq!(t.stats().coalesced_opens, 1);
    }

    #[test]
    fn gc_reports_vanished_and_reused_pids() {
        let dir = tempfile::tempdir().unwrap();
        fake_proc(dir.path(), 200, 1, 10);
        fake_proc(dir.path(), 201, 1, 20);
        fake_proc(dir.path(), 202, 1, 30);
        let mut t = ProcessTracker::with_proc_root(16, dir.path().to_path_buf());
        for tgid in [200, 201, 202] {
            t.handle(cap(ProcKind::Open, tgid, "/dev/nvidia0")).unwrap();
        }
        fs::remove_dir_all(dir.path().join("200")).unwrap();
        fake_proc(dir.path(), 201, 1, 99); // same PID, different process
        let mut exits = t.gc(5_000);
        exits.sort_by_key(|e| e.tgid);
        assert_eq!(
            exits.iter().map(|e| e.tgid).collect::<Vec<_>>(),
            vec![200, 201]
        );
        assert!(
            exits
                .iter()
                .all(|e| e.inferred && e.r#type == ProcessEventType::Exit as i32)
        );
        assert!(t.is_tracked(202));
        assert_eq!(t.stats().inferred_exits, 2);
        assert!(t.gc(6_000).is_empty());
    }

    #[test]
    fn table_is_bounded_but_opens_are_still_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = ProcessTracker::with_proc_root(2, dir.path().to_path_buf());
        for tgid in 1..=5 {
            assert!(
                t.handle(cap(ProcKind::Open, tgid, "/dev/nvidia0"))
                    .is_some()
            );
        }
        assert_eq!(t.stats().tracked, 2);
        assert_eq!(t.stats().table_full, 3);
        // An exit for an untracked process is still reported.
        assert!(t.handle(cap(ProcKind::Exit, 5, "")).is_some());
    }
}
