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

    fn record(&mut self, r: RawRecord) -> Option<v1::Event> {
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
        Some(ev)
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
}
