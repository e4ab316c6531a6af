//! Stateful decoding over [`parse_record`]: context that spans records.
//!
//! * `GPU at PCI:...: GPU-<uuid>` preambles fill a PCI -> UUID map used to enrich later XIDs
//!   (NVML is the better source; this is the fallback that works without it).
//! * The no-Xid "fallen off the bus" message may be split over records; the PCI address named by
//!   a recent record fills in an inferred XID 79 that lacks one, and an inferred 79 that repeats an
//!   explicit `Xid ...: 79` for the same GPU is demoted to a driver log line (no double count).
//! * SXid records arrive in groups sharing one code; continuation records (`Data {...}`) inherit
//!   the severity the group's first record stated.
//!
//! All state is bounded: a handful of entries per GPU or switch, expired by age.
use std::collections::HashMap;

use crate::{
    bdf::Bdf,
    parse::{ParsedRecord, parse_record},
    severity::{Severity, SeverityPolicy},
};

/// How long context from one record may inform the next.
const CONTEXT_WINDOW_NS: u64 = 10_000_000_000;
/// Cap on remembered GPUs/switches; a node has at most a few dozen.
const MAX_ENTRIES: usize = 256;

/// A decoded record with the context applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub record: ParsedRecord,
    /// Severity under the policy (driver log lines are `Info`, identity preambles too).
    pub severity: Severity,
    /// The GPU UUID for the record's PCI address, when known from a preamble.
    pub gpu_uuid: Option<String>,
}

/// Stateful decoder; one per record source.
#[derive(Debug, Default)]
pub struct Decoder {
    policy: SeverityPolicy,
    uuid_by_pci: HashMap<Bdf, String>,
    /// Last PCI address named by any record, for multi-record messages.
    last_pci: Option<(Bdf, u64)>,
    /// Time of the last explicit Xid 79 per GPU.
    last_explicit_79: HashMap<Option<Bdf>, u64>,
    /// Severity stated by the last SXid per (switch, code).
    sxid_groups: HashMap<(Option<u32>, u32), (Severity, u64)>,
}

impl Decoder {
    pub fn new(policy: SeverityPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    pub fn policy(&self) -> &SeverityPolicy {
        &self.policy
    }

    /// Teaches the decoder a PCI -> UUID mapping from another source (NVML).
    pub fn learn_uuid(&mut self, pci: Bdf, uuid: String) {
        bounded_insert(&mut self.uuid_by_pci, pci, uuid);
    }

    pub fn uuid_for(&self, pci: &Bdf) -> Option<&str> {
        self.uuid_by_pci.get(pci).map(String::as_str)
    }

    /// Decodes one record seen at `now_ns` (any monotonic clock). `None` when the record is not
    /// from an NVIDIA driver.
    pub fn feed(&mut self, now_ns: u64, text: &str) -> Option<Decoded> {
        let record = parse_record(text)?;
        Some(self.apply(now_ns, record))
    }

    /// Applies context to an already-parsed record (also used for the `nvidia_dev_xid` path).
    pub fn apply(&mut self, now_ns: u64, mut record: ParsedRecord) -> Decoded {
        let fresh = |t: u64| now_ns.saturating_sub(t) <= CONTEXT_WINDOW_NS;
        let severity;
        match &mut record {
            ParsedRecord::Xid(x) => {
                if x.inferred {
                    if x.pci.is_none() {
                        x.pci = self.last_pci.filter(|(_, t)| fresh(*t)).map(|(p, _)| p);
                    }
                    let explicit = self.last_explicit_79.get(&x.pci).copied();
                    if explicit.is_some_and(fresh) {
                        // Same failure already reported with its number: keep the text only.
                        let text = format!("NVRM: {}", x.message);
                        let pci = x.pci;
                        return self.apply(now_ns, ParsedRecord::DriverLog { pci, text });
                    }
                } else if x.code == 79 {
                    if self.last_explicit_79.len() >= MAX_ENTRIES {
                        self.last_explicit_79.retain(|_, t| fresh(*t));
                    }
                    if self.last_explicit_79.len() < MAX_ENTRIES {
                        self.last_explicit_79.insert(x.pci, now_ns);
                    }
                }
                severity = self.policy.xid(x.code, x.severity_hint);
                if let Some(p) = x.pci {
                    self.last_pci = Some((p, now_ns));
                }
            }
            ParsedRecord::Sxid(s) => {
                let key = (s.switch_index, s.code);
                severity = match s.severity_hint {
                    Some(h) => {
                        if self.sxid_groups.len() >= MAX_ENTRIES {
                            self.sxid_groups.retain(|_, (_, t)| fresh(*t));
                        }
                        if self.sxid_groups.len() < MAX_ENTRIES {
                            self.sxid_groups.insert(key, (h, now_ns));
                        }
                        h
                    }
                    None => match self.sxid_groups.get(&key) {
                        Some((h, t)) if fresh(*t) => *h,
                        _ => Severity::Warning,
                    },
                };
            }
            ParsedRecord::GpuIdentity { pci, uuid } => {
                bounded_insert(&mut self.uuid_by_pci, *pci, uuid.clone());
                self.last_pci = Some((*pci, now_ns));
                severity = Severity::Info;
            }
            ParsedRecord::DriverLog { pci, .. } => {
                if let Some(p) = pci {
                    self.last_pci = Some((*p, now_ns));
                }
                severity = Severity::Info;
            }
        }
        let pci = match &record {
            ParsedRecord::Xid(x) => x.pci,
            ParsedRecord::GpuIdentity { pci, .. } => Some(*pci),
            ParsedRecord::DriverLog { pci, .. } => *pci,
            ParsedRecord::Sxid(_) => None,
        };
        let gpu_uuid = pci.and_then(|p| self.uuid_by_pci.get(&p).cloned());
        Decoded {
            record,
            severity,
            gpu_uuid,
        }
    }
}

fn bounded_insert<V>(map: &mut HashMap<Bdf, V>, k: Bdf, v: V) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&k) {
        // A node never has this many GPUs; forget everything rather than grow without bound.
        map.clear();
    }
    map.insert(k, v);
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn preamble_maps_pci_to_uuid() {
        let mut d = Decoder::default();
        d.feed(
            0,
            "NVRM: GPU at PCI:0000:91:00: GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b",
        )
        .unwrap();
        let x = d.feed(S, "NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.").unwrap();
        assert_eq!(
            x.gpu_uuid.as_deref(),
            Some("GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b")
        );
        assert_eq!(x.severity, Severity::Fatal);
        // Another GPU is not given that UUID.
        let y = d
            .feed(2 * S, "NVRM: Xid (PCI:0000:92:00): 13, Graphics Exception")
            .unwrap();
        assert_eq!(y.gpu_uuid, None);
    }

    #[test]
    fn inferred_79_takes_pci_from_previous_record_and_is_not_double_counted() {
        let mut d = Decoder::default();
        d.feed(0, "NVRM: The NVIDIA GPU 0000:01:00.0").unwrap();
        let x = d
            .feed(
                S,
                "NVRM: fallen off the bus and is not responding to commands.",
            )
            .unwrap();
        let ParsedRecord::Xid(r) = &x.record else {
            panic!("{x:?}")
        };
        assert!(r.inferred);
        assert_eq!(r.pci.unwrap().to_string(), "0000:01:00.0");

        let mut d = Decoder::default();
        d.feed(0, "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.").unwrap();
        let dup = d
            .feed(S, "NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.")
            .unwrap();
        assert!(
            matches!(dup.record, ParsedRecord::DriverLog { .. }),
            "{dup:?}"
        );
        // Much later it is a new failure again.
        let again = d
            .feed(
                60 * S,
                "NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.",
            )
            .unwrap();
        assert!(matches!(again.record, ParsedRecord::Xid(_)));
    }

    #[test]
    fn sxid_continuations_inherit_group_severity() {
        let mut d = Decoder::default();
        let a = d
            .feed(
                0,
                "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 48 LTSSM Fault Up",
            )
            .unwrap();
        assert_eq!(a.severity, Severity::Fatal);
        let b = d
            .feed(
                S / 10,
                "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Data {0x10000000, 0x00000000}",
            )
            .unwrap();
        assert_eq!(b.severity, Severity::Fatal);
        let c = d
            .feed(
                S / 10,
                "nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 20034, Data {0x1}",
            )
            .unwrap();
        assert_eq!(c.severity, Severity::Warning, "other switch, no group");
    }

    #[test]
    fn policy_applies() {
        let mut d = Decoder::new(SeverityPolicy::parse("13=info").unwrap());
        let x = d
            .feed(0, "NVRM: Xid (PCI:0000:cb:00): 13, Graphics Exception")
            .unwrap();
        assert_eq!(x.severity, Severity::Info);
    }

    #[test]
    fn state_stays_bounded() {
        let mut d = Decoder::default();
        for i in 0..2000u32 {
            let text = format!(
                "NVRM: GPU at PCI:{:04x}:{:02x}:00: GPU-00000000-0000-0000-0000-{:012x}",
                i / 256,
                i % 256,
                i
            );
            d.feed(u64::from(i), &text).unwrap();
            let text = format!("NVRM: Xid (PCI:{:04x}:{:02x}:00): 79, x", i / 256, i % 256);
            d.feed(u64::from(i), &text).unwrap();
        }
        assert!(d.uuid_by_pci.len() <= MAX_ENTRIES);
        assert!(d.last_explicit_79.len() <= MAX_ENTRIES);
    }
}
