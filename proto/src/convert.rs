//! Conversions between the XID crate's decoded records and wire messages.
use gpulse_xid::{
    Decoded, ParsedRecord, catalog,
    parse::{NvlinkDetail as PNvlink, RecoveryAction as PRecovery},
};

use crate::v1;

impl From<gpulse_xid::Severity> for v1::Severity {
    fn from(s: gpulse_xid::Severity) -> Self {
        match s {
            gpulse_xid::Severity::Info => Self::Info,
            gpulse_xid::Severity::Warning => Self::Warning,
            gpulse_xid::Severity::Error => Self::Error,
            gpulse_xid::Severity::Fatal => Self::Fatal,
        }
    }
}

/// Top-level `Event` field numbers this build knows (see the test against the descriptor).
const KNOWN_EVENT_FIELDS: [u32; 18] = [
    1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20,
];

/// Marks an event whose payload this build does not know (`EVENT_KIND_UNKNOWN`), with the
/// unknown field numbers read from its bytes (one linear pass; ingest refuses events with more
/// than `bounds::MAX_UNKNOWN_FIELDS`, and events stored before that bound show that many).
pub fn mark_unknown(ev: &mut crate::v1::Event, encoded: &[u8]) {
    let mut fields = unknown_event_fields(encoded).unwrap_or_default();
    fields.truncate(crate::bounds::MAX_UNKNOWN_FIELDS);
    mark_unknown_fields(ev, fields);
}

/// [`mark_unknown`] with the field numbers already read (ingest reads them once).
pub fn mark_unknown_fields(ev: &mut crate::v1::Event, fields: Vec<u32>) {
    ev.kind = crate::v1::EventKind::Unknown as i32;
    ev.unknown_fields = fields;
}

/// The top-level field numbers of an encoded `Event` that this build does not know (what a
/// newer agent's payload looks like to an older collector), in order, without repeats, at most
/// `bounds::MAX_UNKNOWN_FIELDS + 1` of them (one more than an event may carry, so a caller can
/// tell it has too many). None when the bytes are not a valid encoding.
///
/// Linear in the bytes: the list it keeps is bounded, so an event of 4 MiB naming 900k distinct
/// unknown fields costs one pass (it cost 83 s when every field was looked up in a growing
/// list, issue 27 #1).
pub fn unknown_event_fields(mut b: &[u8]) -> Option<Vec<u32>> {
    use prost::encoding::{WireType, decode_key, decode_varint};
    const KEEP: usize = crate::bounds::MAX_UNKNOWN_FIELDS + 1;
    let mut out: Vec<u32> = Vec::new();
    while !b.is_empty() {
        let (field, wire) = decode_key(&mut b).ok()?;
        let skip = match wire {
            WireType::Varint => {
                decode_varint(&mut b).ok()?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => usize::try_from(decode_varint(&mut b).ok()?).ok()?,
            WireType::StartGroup | WireType::EndGroup => return None,
        };
        b = b.get(skip..)?;
        if out.len() < KEEP
            && field != 18
            && !KNOWN_EVENT_FIELDS.contains(&field)
            && !out.contains(&field)
        {
            out.push(field);
        }
    }
    Some(out)
}

impl v1::Xid {
    /// Kernel records this event stands for: 1, or a storm summary's count (0 for the event
    /// that only says a storm ended).
    pub fn records(&self) -> u64 {
        self.storm.map_or(1, |s| s.count)
    }
}

impl v1::Event {
    /// The kind implied by the payload; envelopes are checked against it on ingest.
    pub fn payload_kind(&self) -> v1::EventKind {
        use v1::event::Payload;
        match &self.payload {
            None => v1::EventKind::Unspecified,
            Some(Payload::Xid(_)) => v1::EventKind::Xid,
            Some(Payload::Sxid(_)) => v1::EventKind::Sxid,
            Some(Payload::DriverLog(_)) => v1::EventKind::DriverLog,
            Some(Payload::AgentStatus(_)) => v1::EventKind::AgentStatus,
            Some(Payload::Gap(_)) => v1::EventKind::Gap,
            Some(Payload::GpuProcess(_)) => v1::EventKind::GpuProcess,
            Some(Payload::GpuSample(_)) => v1::EventKind::GpuSample,
            Some(Payload::GpuHealth(_)) => v1::EventKind::GpuHealth,
        }
    }

    /// The GPU identities (UUID and PCI address) the event belongs to, for filtering.
    pub fn gpu_keys(&self) -> [&str; 2] {
        use v1::event::Payload;
        match &self.payload {
            Some(Payload::Xid(x)) => [x.gpu_uuid.as_str(), x.pci.as_str()],
            Some(Payload::DriverLog(d)) => [d.gpu_uuid.as_str(), d.pci.as_str()],
            Some(Payload::Sxid(s)) => ["", s.pci.as_str()],
            Some(Payload::GpuSample(g)) => [g.uuid.as_str(), g.pci.as_str()],
            Some(Payload::GpuHealth(h)) => h
                .record
                .as_ref()
                .map_or(["", ""], |r| [r.gpu_uuid.as_str(), r.pci.as_str()]),
            _ => ["", ""],
        }
    }
}

fn nvlink(n: &PNvlink) -> v1::NvlinkDetail {
    v1::NvlinkDetail {
        unit: n.unit.clone(),
        fatal: n.fatal,
        xc: n.xc.clone().unwrap_or_default(),
        instance: n.instance,
        link: n.link,
        words: n.words.clone(),
        intrinfo: n.intrinfo,
        error_status: n.error_status,
        sub_code: n.sub_code,
    }
}

fn recovery(r: &PRecovery) -> v1::RecoveryAction {
    v1::RecoveryAction {
        from: r.from,
        from_name: r.from_name.clone(),
        to: r.to,
        to_name: r.to_name.clone(),
    }
}

/// Builds the wire payload for a decoded record: catalog fields filled in, raw text kept.
pub fn payload_from_decoded(
    d: &Decoded,
    raw: &str,
    source: v1::RecordSource,
    truncated: bool,
) -> (v1::EventKind, v1::event::Payload) {
    use v1::event::Payload;
    let uuid = d.gpu_uuid.clone().unwrap_or_default();
    match &d.record {
        ParsedRecord::Xid(x) => {
            let info = catalog::lookup(x.code);
            (
                v1::EventKind::Xid,
                Payload::Xid(v1::Xid {
                    code: x.code,
                    pci: x.pci.map(|p| p.to_string()).unwrap_or_default(),
                    pci_raw: x.pci_raw.clone(),
                    gpu_uuid: uuid,
                    pid: x.pid,
                    process_name: x.process_name.clone().unwrap_or_default(),
                    channel: x.channel,
                    message: x.message.clone(),
                    mnemonic: info.map(|i| i.mnemonic.to_string()).unwrap_or_default(),
                    description: info
                        .map(|i| i.description.to_string())
                        .unwrap_or_else(|| format!("Unknown XID {} (not in the catalog)", x.code)),
                    immediate_action: info
                        .map(|i| i.immediate_action.to_string())
                        .unwrap_or_default(),
                    investigatory_action: info
                        .map(|i| i.investigatory_action.to_string())
                        .unwrap_or_default(),
                    caused_by: x.caused_by,
                    recovery_action: x.recovery_action.as_ref().map(recovery),
                    nvlink: x.nvlink.as_ref().map(nvlink),
                    inferred: x.inferred,
                    source: source as i32,
                    raw: raw.to_string(),
                    truncated,
                    pod: None,
                    storm: None,
                }),
            )
        }
        ParsedRecord::Sxid(s) => (
            v1::EventKind::Sxid,
            Payload::Sxid(v1::Sxid {
                code: s.code,
                switch_index: s.switch_index,
                pci: s.pci.map(|p| p.to_string()).unwrap_or_default(),
                pci_raw: s.pci_raw.clone(),
                link: s.link,
                data: s.data.clone(),
                message: s.message.clone(),
                description: catalog::lookup_sxid(s.code)
                    .map(|i| i.description.to_string())
                    .unwrap_or_default(),
                source: source as i32,
                raw: raw.to_string(),
            }),
        ),
        ParsedRecord::GpuIdentity { pci, .. } => (
            v1::EventKind::DriverLog,
            Payload::DriverLog(v1::DriverLog {
                text: raw.to_string(),
                pci: pci.to_string(),
                gpu_uuid: uuid,
                source: source as i32,
                truncated,
            }),
        ),
        ParsedRecord::DriverLog { pci, text } => (
            v1::EventKind::DriverLog,
            Payload::DriverLog(v1::DriverLog {
                text: text.clone(),
                pci: pci.map(|p| p.to_string()).unwrap_or_default(),
                gpu_uuid: uuid,
                source: source as i32,
                truncated,
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpulse_xid::Decoder;

    #[test]
    fn xid_payload_carries_catalog_and_fields() {
        let mut d = Decoder::default();
        let raw = "NVRM: Xid (PCI:0000:9b:00): 119, pid=2024380, name=nvidia-smi, Timeout after 6s of waiting for RPC response";
        let dec = d.feed(0, raw).unwrap();
        let (kind, payload) = payload_from_decoded(&dec, raw, v1::RecordSource::Kmsg, false);
        assert_eq!(kind, v1::EventKind::Xid);
        let v1::event::Payload::Xid(x) = payload else {
            panic!()
        };
        assert_eq!(x.code, 119);
        assert_eq!(x.mnemonic, "GSP_RPC_TIMEOUT");
        assert_eq!(x.pci, "0000:9b:00.0");
        assert_eq!(x.pid, Some(2024380));
        assert_eq!(x.immediate_action, "RESET_GPU");
        assert_eq!(x.raw, raw);
        let ev = v1::Event {
            payload: Some(v1::event::Payload::Xid(x)),
            ..Default::default()
        };
        assert_eq!(ev.payload_kind(), v1::EventKind::Xid);
        assert_eq!(
            unknown_event_fields(&prost::Message::encode_to_vec(&ev)),
            Some(vec![])
        );
        assert_eq!(ev.gpu_keys()[1], "0000:9b:00.0");
    }

    #[test]
    fn unknown_code_says_so() {
        let mut d = Decoder::default();
        let raw = "NVRM: Xid (PCI:0000:9b:00): 4000, something new";
        let (_, payload) =
            payload_from_decoded(&d.feed(0, raw).unwrap(), raw, v1::RecordSource::Kmsg, false);
        let v1::event::Payload::Xid(x) = payload else {
            panic!()
        };
        assert!(x.description.contains("Unknown XID 4000"));
        assert!(x.mnemonic.is_empty());
    }

    #[test]
    fn known_event_fields_match_the_descriptor() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(crate::v1::FILE_DESCRIPTOR_SET).unwrap();
        let event = set
            .file
            .iter()
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "Event")
            .unwrap();
        let mut numbers: Vec<u32> = event.field.iter().map(|f| f.number() as u32).collect();
        numbers.sort_unstable();
        let mut known = KNOWN_EVENT_FIELDS.to_vec();
        known.push(18);
        known.sort_unstable();
        assert_eq!(numbers, known, "update KNOWN_EVENT_FIELDS with the proto");
    }

    #[test]
    fn a_newer_agents_payload_is_named_by_its_field_number() {
        use prost::Message as _;
        let mut b = v1::Event {
            seq: 3,
            kind: 9,
            ..Default::default()
        }
        .encode_to_vec();
        // Field 99, length-delimited: a payload message this build does not know.
        b.extend_from_slice(&[0x9a, 0x06, 3, 0x0a, 1, b'x']);
        assert_eq!(unknown_event_fields(&b), Some(vec![99]));
        let ev = v1::Event::decode(b.as_slice()).unwrap();
        assert!(ev.payload.is_none() && ev.seq == 3);
        assert_eq!(unknown_event_fields(&b[..b.len() - 1]), None, "truncated");
    }

    #[test]
    fn many_distinct_unknown_fields_are_read_in_one_bounded_pass() {
        // Issue 27 #1: 891,685 distinct unknown fields in 4 MiB were each looked up in the list
        // of those seen (83 s of CPU to ack). The list is now bounded.
        let mut b = Vec::new();
        for f in 1000u32..401_000 {
            prost::encoding::encode_key(f, prost::encoding::WireType::Varint, &mut b);
            b.push(0);
        }
        let got = unknown_event_fields(&b).unwrap();
        assert_eq!(got.len(), crate::bounds::MAX_UNKNOWN_FIELDS + 1);
        assert_eq!(got[0], 1000);
        // A broken encoding anywhere is still noticed.
        b.push(0x80);
        assert_eq!(unknown_event_fields(&b), None);
    }
}
