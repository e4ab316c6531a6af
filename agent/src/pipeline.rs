//! Captured records -> wire events: decode, catalog, severity, de-duplication across the two
//! eBPF paths, and gap notes.
use std::{collections::VecDeque, sync::Arc};

use gpulse_proto::{
    convert::payload_from_decoded,
    time::from_unix_nanos,
    v1::{self, EventKind, RecordSource, event::Payload},
};
use gpulse_xid::{Decoder, ParsedRecord, SeverityPolicy};

use crate::{
    procs::ProcessTracker,
    record::{Captured, RawRecord, SourceNote},
    stats::AgentStats,
};

/// Records seen on both `printk:console` and `nvidia:nvidia_dev_xid` within this window are one.
const DUAL_PATH_WINDOW_NS: i128 = 2_000_000_000;
const DUAL_PATH_MAX: usize = 1024;
/// An NVML XID event waits this long for the kernel record of the same XID before it is reported
/// on its own (NVML's event carries no message, pid or process name; the kernel record does).
pub const NVML_HOLD_NS: i128 = 2_000_000_000;
/// An NVML XID event this close to a kernel record of the same GPU and code is that record.
const NVML_MATCH_NS: i128 = 5_000_000_000;
const NVML_HELD_MAX: usize = 1024;
/// How far apart two runs' times of one kernel record may be and still be the same record.
const BACKLOG_MATCH_NS: i128 = 5_000_000_000;

/// A delivered kernel record, as the backlog recognises it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Delivered {
    Xid(XidKey),
    Text(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct XidKey {
    pci: String,
    code: u32,
    message: String,
}

/// Turns captured items into events (seq 0: the spool numbers them).
pub struct Pipeline {
    decoder: Decoder,
    node: String,
    agent_id: String,
    recent: VecDeque<(XidKey, i128, RecordSource)>,
    /// Kernel records an earlier run of this agent delivered (from the spool log), so the
    /// kernel log's backlog does not report them twice.
    delivered: Vec<(Delivered, i128)>,
    procs: ProcessTracker,
    pods: Option<crate::pods::Attributor>,
    stats: Arc<AgentStats>,
    /// NVML XID events waiting for their kernel record, oldest first.
    nvml_held: VecDeque<(GpuXid, RawRecord)>,
    /// Kernel XIDs recently reported, oldest first, for NVML events that arrive after them.
    kernel_xids: VecDeque<(GpuXid, i128)>,
    storms: crate::storm::StormControl,
}

/// One XID of one GPU, as NVML and the kernel log both name it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct GpuXid {
    pci: String,
    code: u32,
}

impl Pipeline {
    pub fn new(
        node: String,
        agent_id: String,
        policy: SeverityPolicy,
        stats: Arc<AgentStats>,
    ) -> Self {
        Self {
            decoder: Decoder::new(policy),
            node,
            agent_id,
            recent: VecDeque::new(),
            delivered: Vec::new(),
            procs: ProcessTracker::new(16384),
            pods: None,
            stats,
            nvml_held: VecDeque::new(),
            kernel_xids: VecDeque::new(),
            storms: crate::storm::StormControl::default(),
        }
    }

    /// Attributes XIDs that name a pid to that pid's pod.
    pub fn with_attributor(mut self, a: crate::pods::Attributor) -> Self {
        self.pods = Some(a);
        self
    }

    /// Replaces the process tracker (bounds, or a fake /proc in tests).
    pub fn with_process_tracker(mut self, t: ProcessTracker) -> Self {
        self.procs = t;
        self
    }

    pub fn process_tracker(&self) -> &ProcessTracker {
        &self.procs
    }

    /// Periodic work: exits of GPU processes that vanished without a reported exit.
    pub fn collect(&mut self, now_unix_ns: i128) -> Vec<v1::Event> {
        self.procs
            .gc(now_unix_ns)
            .into_iter()
            .map(|p| {
                self.envelope(
                    now_unix_ns,
                    EventKind::GpuProcess,
                    v1::Severity::Info,
                    Payload::GpuProcess(p),
                )
            })
            .collect()
    }

    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// An envelope for this node.
    pub fn envelope(
        &self,
        unix_ns: i128,
        kind: EventKind,
        severity: v1::Severity,
        payload: Payload,
    ) -> v1::Event {
        v1::Event {
            time: Some(from_unix_nanos(unix_ns)),
            node: self.node.clone(),
            kind: kind as i32,
            severity: severity as i32,
            agent_id: self.agent_id.clone(),
            payload: Some(payload),
            ..Default::default()
        }
    }

    /// Processes one captured item. `None` when it is not reportable (not NVIDIA, or a
    /// duplicate of the other capture path).
    pub fn process(&mut self, item: Captured, now_unix_ns: i128) -> Option<v1::Event> {
        match item {
            Captured::Record(r) => self.record(r),
            Captured::Note(SourceNote::Lost {
                stage,
                missed,
                detail,
            }) => Some(self.envelope(
                now_unix_ns,
                EventKind::Gap,
                v1::Severity::Warning,
                Payload::Gap(v1::Gap {
                    stage: stage as i32,
                    missed,
                    detail,
                }),
            )),
            Captured::Proc(c) => {
                let t = c.unix_ns;
                let p = self.procs.handle(c)?;
                Some(self.envelope(
                    t,
                    EventKind::GpuProcess,
                    v1::Severity::Info,
                    Payload::GpuProcess(p),
                ))
            }
            Captured::Sample { unix_ns, sample } => {
                // NVML is the better PCI -> UUID source for XIDs; the log preamble is the fallback.
                if let (Ok(pci), false) =
                    (gpulse_xid::Bdf::parse(&sample.pci), sample.uuid.is_empty())
                {
                    self.decoder.learn_uuid(pci, sample.uuid.clone());
                }
                Some(self.envelope(
                    unix_ns,
                    EventKind::GpuSample,
                    v1::Severity::Info,
                    Payload::GpuSample(*sample),
                ))
            }
            Captured::Status(st) => {
                let severity = if st.state == v1::AgentState::Degraded as i32 {
                    v1::Severity::Warning
                } else {
                    v1::Severity::Info
                };
                Some(self.envelope(
                    now_unix_ns,
                    EventKind::AgentStatus,
                    severity,
                    Payload::AgentStatus(st),
                ))
            }
        }
    }

    /// Remembers what an earlier run delivered (kernel-record events from the spool log).
    pub fn remember_delivered(&mut self, history: &[v1::Event]) {
        self.delivered = history
            .iter()
            .filter_map(|e| {
                let t = e.time.as_ref().map(gpulse_proto::time::to_unix_nanos)?;
                let key = match &e.payload {
                    Some(Payload::Xid(x)) => Delivered::Xid(XidKey {
                        pci: if x.pci.is_empty() {
                            x.pci_raw.clone()
                        } else {
                            x.pci.clone()
                        },
                        code: x.code,
                        message: x.message.clone(),
                    }),
                    Some(Payload::Sxid(x)) => Delivered::Text(x.raw.clone()),
                    Some(Payload::DriverLog(d)) => Delivered::Text(d.text.clone()),
                    _ => return None,
                };
                Some((key, t))
            })
            .collect();
    }

    /// A backlog record an earlier run already delivered: same XID (or the same text) within
    /// [`BACKLOG_MATCH_NS`] (the clocks of two runs may disagree by that much).
    fn was_delivered(&mut self, key: &Delivered, t: i128) -> bool {
        match self
            .delivered
            .iter()
            .position(|(k, ts)| k == key && (t - ts).abs() <= BACKLOG_MATCH_NS)
        {
            Some(i) => {
                // Once: a repeat of the same line is a new record.
                self.delivered.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Periodic work (every 250 ms): NVML XID events whose hold ended without a kernel record
    /// of the same XID, and the summaries of XID storms.
    pub fn tick(&mut self, now_unix_ns: i128) -> Vec<v1::Event> {
        let mut out = self.release_held(now_unix_ns);
        out.extend(self.storms.tick(now_unix_ns));
        out
    }

    /// XID storms under way (coalesced into summaries).
    pub fn storms(&self) -> &crate::storm::StormControl {
        &self.storms
    }

    /// NVML XID events whose hold ended without a kernel record of the same XID: reported now.
    pub fn release_held(&mut self, now_unix_ns: i128) -> Vec<v1::Event> {
        let mut out = Vec::new();
        while self
            .nvml_held
            .front()
            .is_some_and(|(_, r)| now_unix_ns - r.unix_ns >= NVML_HOLD_NS)
        {
            if let Some((_, r)) = self.nvml_held.pop_front()
                && let Some(ev) = self.decode(r)
            {
                out.push(ev);
            }
        }
        out
    }

    /// An NVML XID event: dropped when the kernel log already reported it, held otherwise.
    fn nvml_xid(&mut self, r: RawRecord) -> Option<v1::Event> {
        let Some(dev) = &r.dev_xid else {
            return self.decode(r);
        };
        let key = GpuXid {
            pci: normalise_pci(&dev.dev),
            code: dev.code,
        };
        self.expire_kernel_xids(r.unix_ns);
        if let Some(i) = self
            .kernel_xids
            .iter()
            .position(|(k, t)| *k == key && (r.unix_ns - t).abs() <= NVML_MATCH_NS)
        {
            // One kernel record answers for one NVML event: a repeat is a new XID.
            self.kernel_xids.remove(i);
            AgentStats::add(&self.stats.nvml_xid_duplicates, 1);
            return None;
        }
        let overflow = if self.nvml_held.len() >= NVML_HELD_MAX {
            self.nvml_held
                .pop_front()
                .and_then(|(_, old)| self.decode(old))
        } else {
            None
        };
        self.nvml_held.push_back((key, r));
        overflow
    }

    /// A kernel XID record: the NVML event of the same XID, if one is held, is dropped; else the
    /// record is remembered for an NVML event that comes after it.
    fn kernel_xid(&mut self, key: GpuXid, t: i128) {
        if let Some(i) = self.nvml_held.iter().position(|(k, _)| *k == key) {
            self.nvml_held.remove(i);
            AgentStats::add(&self.stats.nvml_xid_duplicates, 1);
            return;
        }
        self.expire_kernel_xids(t);
        if self.kernel_xids.len() >= NVML_HELD_MAX {
            self.kernel_xids.pop_front();
        }
        self.kernel_xids.push_back((key, t));
    }

    fn expire_kernel_xids(&mut self, now: i128) {
        while self
            .kernel_xids
            .front()
            .is_some_and(|(_, t)| now - t > NVML_MATCH_NS)
        {
            self.kernel_xids.pop_front();
        }
    }

    fn record(&mut self, r: RawRecord) -> Option<v1::Event> {
        if r.source == RecordSource::NvmlEvent {
            return self.nvml_xid(r);
        }
        self.decode(r)
    }

    fn decode(&mut self, r: RawRecord) -> Option<v1::Event> {
        let decoded = self.decoder.feed(r.unix_ns.max(0) as u64, &r.text)?;
        // XIDs are recognised by their key below; other lines by their text.
        if r.source == RecordSource::KmsgBacklog
            && !self.delivered.is_empty()
            && !matches!(decoded.record, ParsedRecord::Xid(_))
            && self.was_delivered(&Delivered::Text(r.text.clone()), r.unix_ns)
        {
            AgentStats::add(&self.stats.backlog_duplicates, 1);
            return None;
        }
        if let ParsedRecord::Xid(x) = &decoded.record {
            let key = XidKey {
                pci: x
                    .pci
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| x.pci_raw.clone()),
                code: x.code,
                message: x.message.clone(),
            };
            if r.source == RecordSource::KmsgBacklog
                && self.was_delivered(&Delivered::Xid(key.clone()), r.unix_ns)
            {
                AgentStats::add(&self.stats.backlog_duplicates, 1);
                return None;
            }
            if self.is_dual_path_duplicate(&key, r.unix_ns, r.source) {
                AgentStats::add(&self.stats.dual_path_duplicates, 1);
                return None;
            }
            if r.source != RecordSource::NvmlEvent && r.source != RecordSource::KmsgBacklog {
                self.kernel_xid(
                    GpuXid {
                        pci: key.pci.clone(),
                        code: key.code,
                    },
                    r.unix_ns,
                );
            }
            AgentStats::add(&self.stats.xids, 1);
        }
        let (kind, mut payload) = payload_from_decoded(&decoded, &r.text, r.source, r.truncated);
        if let (Payload::Xid(x), Some(a)) = (&mut payload, &self.pods)
            && let Some(pid) = x.pid
        {
            // At the time of the event: the process may be gone by the time anyone asks.
            x.pod = a.pod_of(pid);
        }
        let mut ev = self.envelope(r.unix_ns, kind, decoded.severity.into(), payload);
        ev.backlog = r.source == RecordSource::KmsgBacklog;
        let before = self.storms.coalesced;
        let out = self.storms.admit(ev, r.unix_ns);
        AgentStats::add(&self.stats.storm_coalesced, self.storms.coalesced - before);
        out
    }

    /// The driver reports one XID on both its tracepoint and printk; keep whichever came first.
    fn is_dual_path_duplicate(&mut self, key: &XidKey, t: i128, source: RecordSource) -> bool {
        while self
            .recent
            .front()
            .is_some_and(|(_, ts, _)| t - ts > DUAL_PATH_WINDOW_NS)
        {
            self.recent.pop_front();
        }
        if let Some(i) = self.recent.iter().position(|(k, ts, s)| {
            *s != source && k == key && (t - ts).abs() <= DUAL_PATH_WINDOW_NS
        }) {
            // Matched once: a later third copy from the same pair is a real repeat.
            self.recent.remove(i);
            return true;
        }
        if self.recent.len() >= DUAL_PATH_MAX {
            self.recent.pop_front();
        }
        self.recent.push_back((key.clone(), t, source));
        false
    }
}

/// A PCI address as the decoder prints it (dddd:bb:dd.f), or as given when it does not parse.
fn normalise_pci(dev: &str) -> String {
    gpulse_xid::Bdf::parse(dev)
        .map(|b| b.to_string())
        .unwrap_or_else(|_| dev.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::DevXid;

    fn rec(t: i128, source: RecordSource, text: &str) -> Captured {
        Captured::Record(RawRecord {
            unix_ns: t,
            source,
            text: text.into(),
            truncated: false,
            dev_xid: None,
        })
    }

    fn pipeline() -> (Pipeline, Arc<AgentStats>) {
        let stats = Arc::new(AgentStats::default());
        (
            Pipeline::new(
                "n1".into(),
                "n1/a".into(),
                SeverityPolicy::default(),
                stats.clone(),
            ),
            stats,
        )
    }

    #[test]
    fn xid_becomes_event_with_catalog_and_time() {
        let (mut p, stats) = pipeline();
        let ev = p.process(rec(1_764_000_000_000_000_000, RecordSource::EbpfPrintk, "NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."), 0).unwrap();
        assert_eq!(ev.kind, EventKind::Xid as i32);
        assert_eq!(ev.severity, v1::Severity::Fatal as i32);
        assert_eq!(ev.node, "n1");
        assert_eq!(ev.time.unwrap().seconds, 1_764_000_000);
        let Some(Payload::Xid(x)) = ev.payload else {
            panic!()
        };
        assert_eq!(
            (x.code, x.pci.as_str(), x.mnemonic.as_str()),
            (
                79,
                "0000:91:00.0",
                "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS"
            )
        );
        assert_eq!(AgentStats::get(&stats.xids), 1);
    }

    #[test]
    fn dual_path_records_are_counted_once() {
        let (mut p, stats) = pipeline();
        let tp = Captured::Record(RawRecord {
            unix_ns: 1_000,
            source: RecordSource::EbpfNvidiaTracepoint,
            text: "NVRM: Xid (PCI:0000:3b:00.0): 48, pid=1, name=x, DBE".into(),
            truncated: false,
            dev_xid: Some(DevXid {
                code: 48,
                dev: "0000:3b:00.0".into(),
            }),
        });
        assert!(p.process(tp, 0).is_some());
        // printk prints the same XID with the short BDF form.
        assert!(
            p.process(
                rec(
                    2_000,
                    RecordSource::EbpfPrintk,
                    "NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=x, DBE"
                ),
                0
            )
            .is_none()
        );
        assert_eq!(AgentStats::get(&stats.dual_path_duplicates), 1);
        // A real repeat on printk is reported.
        assert!(
            p.process(
                rec(
                    3_000,
                    RecordSource::EbpfPrintk,
                    "NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=x, DBE"
                ),
                0
            )
            .is_some()
        );
        // Same source twice is never a dual-path duplicate (one fault can print several lines).
        assert!(
            p.process(
                rec(
                    4_000,
                    RecordSource::EbpfPrintk,
                    "NVRM: Xid (PCI:0000:3b:00): 48, pid=1, name=x, DBE"
                ),
                0
            )
            .is_some()
        );
        // Outside the window it is a new event even across paths.
        let tp2 = rec(
            10_000_000_000,
            RecordSource::EbpfNvidiaTracepoint,
            "NVRM: Xid (PCI:0000:3b:00.0): 48, pid=1, name=x, DBE",
        );
        assert!(p.process(tp2, 0).is_some());
    }

    #[test]
    fn notes_become_gap_events_and_other_text_is_ignored() {
        let (mut p, _) = pipeline();
        let ev = p
            .process(
                Captured::Note(SourceNote::Lost {
                    stage: v1::GapStage::KernelRing,
                    missed: 3,
                    detail: "x".into(),
                }),
                5,
            )
            .unwrap();
        assert_eq!(ev.kind, EventKind::Gap as i32);
        let Some(Payload::Gap(g)) = ev.payload else {
            panic!()
        };
        assert_eq!(g.missed, 3);
        assert!(
            p.process(rec(1, RecordSource::Kmsg, "usb 1-1: new device"), 0)
                .is_none()
        );
        let ev = p
            .process(
                rec(
                    1,
                    RecordSource::Kmsg,
                    "NVRM: loading NVIDIA UNIX x86_64 Kernel Module",
                ),
                0,
            )
            .unwrap();
        assert_eq!(ev.kind, EventKind::DriverLog as i32);
    }

    #[test]
    fn dedupe_state_is_bounded() {
        let (mut p, _) = pipeline();
        for i in 0..5000 {
            p.process(
                rec(
                    i,
                    RecordSource::EbpfPrintk,
                    &format!("NVRM: Xid (PCI:0000:3b:00): 13, n{i}"),
                ),
                0,
            );
        }
        assert!(p.recent.len() <= DUAL_PATH_MAX);
    }

    fn nvml(t: i128, pci: &str, code: u32) -> Captured {
        Captured::Record(RawRecord {
            unix_ns: t,
            source: RecordSource::NvmlEvent,
            text: format!("NVRM: Xid (PCI:{pci}): {code}, reported by NVML (critical XID event)"),
            truncated: false,
            dev_xid: Some(DevXid {
                code,
                dev: pci.into(),
            }),
        })
    }

    const S: i128 = 1_000_000_000;

    #[test]
    fn nvml_xid_after_the_kernel_record_is_dropped() {
        let (mut p, stats) = pipeline();
        let k = rec(
            10 * S,
            RecordSource::EbpfPrintk,
            "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
        );
        assert!(p.process(k, 0).is_some());
        assert!(
            p.process(nvml(10 * S + 300_000, "0000:3b:00.0", 79), 0)
                .is_none()
        );
        assert!(p.release_held(20 * S).is_empty());
        assert_eq!(AgentStats::get(&stats.nvml_xid_duplicates), 1);
        assert_eq!(AgentStats::get(&stats.xids), 1);
        // A second NVML event of the same XID is a new XID: one kernel record answers for one.
        assert!(p.process(nvml(11 * S, "0000:3b:00.0", 79), 0).is_none());
        assert_eq!(p.release_held(13 * S).len(), 1);
    }

    #[test]
    fn nvml_xid_before_the_kernel_record_gives_way_to_it() {
        let (mut p, stats) = pipeline();
        assert!(
            p.process(nvml(10 * S, "0000:3b:00.0", 48), 0).is_none(),
            "held"
        );
        assert!(
            p.release_held(10 * S + S).is_empty(),
            "still within the hold"
        );
        let k = rec(
            10 * S + S / 2,
            RecordSource::Kmsg,
            "NVRM: Xid (PCI:0000:3b:00): 48, pid=1234, name=python, An uncorrectable double bit error",
        );
        let ev = p.process(k, 0).unwrap();
        let Some(Payload::Xid(x)) = ev.payload else {
            panic!()
        };
        assert_eq!(
            (x.code, x.pid),
            (48, Some(1234)),
            "the richer kernel record is kept"
        );
        assert!(p.release_held(20 * S).is_empty());
        assert_eq!(AgentStats::get(&stats.nvml_xid_duplicates), 1);
    }

    #[test]
    fn nvml_only_xid_is_reported_after_the_hold_with_the_catalog() {
        let (mut p, stats) = pipeline();
        assert!(p.process(nvml(10 * S, "0000:3b:00.0", 79), 0).is_none());
        // Another GPU's kernel XID, and another code on this GPU, do not match it.
        p.process(
            rec(
                10 * S,
                RecordSource::Kmsg,
                "NVRM: Xid (PCI:0000:86:00): 79, GPU has fallen off the bus.",
            ),
            0,
        );
        p.process(
            rec(
                10 * S,
                RecordSource::Kmsg,
                "NVRM: Xid (PCI:0000:3b:00): 13, Graphics Exception",
            ),
            0,
        );
        let out = p.release_held(10 * S + NVML_HOLD_NS);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].time.unwrap().seconds,
            10,
            "the time NVML reported it"
        );
        let Some(Payload::Xid(x)) = &out[0].payload else {
            panic!()
        };
        assert_eq!(
            (x.code, x.pci.as_str(), x.source),
            (79, "0000:3b:00.0", RecordSource::NvmlEvent as i32)
        );
        assert_eq!(x.mnemonic, "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
        assert_eq!(out[0].severity, v1::Severity::Fatal as i32);
        assert_eq!(AgentStats::get(&stats.nvml_xid_duplicates), 0);
    }

    #[test]
    fn nvml_hold_is_bounded() {
        let (mut p, _) = pipeline();
        let mut released = 0;
        for i in 0..(NVML_HELD_MAX as i128 + 10) {
            released += usize::from(p.process(nvml(i, "0000:3b:00.0", 31), 0).is_some());
        }
        assert_eq!(
            released, 10,
            "the oldest held events are reported, not lost"
        );
        assert_eq!(p.nvml_held.len(), NVML_HELD_MAX);
    }
}
