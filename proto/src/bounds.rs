//! How large an agent's event may be, field by field: the one home of these bounds.
//!
//! The collector refuses an event past any bound at ingest (INVALID_ARGUMENT naming the field;
//! the agent then sets that one event aside as a Gap and sends the rest), before it costs more
//! than reading it once. The agent fits every event it makes to the same bounds before spooling
//! it ([`fit`]: strings cut at a character boundary, lists cut, `truncated` set where the
//! payload has one), so an honest agent is never refused.
//!
//! Why bounds per field and not only per event: a GpuSample of 3.7 MiB with 1.3M empty
//! `processes` entries decodes to ~63 MB (issue 27 #2); strings that reach answers (AgentStatus
//! detail, driver versions, XID messages) made fleet-wide answers exceed the encode limit (#5);
//! `pci_raw` keys verdicts and labels (#8). The values are generous for real hardware: the
//! kernel prints at most ~1 KiB a record, NVML names are short, a GPU runs far fewer than 1,024
//! processes, NVLink 5 has 18 links.
use std::fmt;

use prost::Message as _;

use crate::v1::{self, event::Payload};

/// Largest encoded agent event accepted. Every answer bounds its bytes by construction (pages by
/// bytes), and this makes one event small against any of them.
pub const MAX_EVENT_BYTES: usize = 64 << 10;
/// Most bytes the listed items of one answer may take (events of a page, GPU records): the
/// encode limit is 4 MiB, and the rest of an answer (window, hints, upstreams) fits in what is
/// left. Pages end early, with a token for the rest, rather than fail (issue 27 #5).
pub const MAX_ANSWER_BYTES: usize = 3 << 20;

/// How many of `items`, from the front, fit in `budget` bytes as a repeated message field;
/// at least one (one item is far below any budget: events are bounded by
/// [`MAX_EVENT_BYTES`], verdicts where they are made).
pub fn fitting<T: prost::Message>(items: &[T], budget: usize) -> usize {
    let mut used = 0usize;
    for (i, it) in items.iter().enumerate() {
        let len = it.encoded_len();
        // Tag, length prefix and the message itself.
        used = used.saturating_add(1 + prost::length_delimiter_len(len) + len);
        if used > budget {
            return i.max(1);
        }
    }
    items.len()
}

/// Cuts a `Nodes` answer to [`MAX_ANSWER_BYTES`]: every node stays listed, but first the GPU
/// samples' process lists and then, from the last node by name, the GPU samples themselves are
/// left out, saying so. A node holds at most 256 GPUs of at most 64 KiB each, so without this a
/// few nodes with long process lists could make the fleet's answer fail to encode.
pub fn fit_nodes(r: &mut crate::v1::NodesResponse) {
    if r.encoded_len() <= MAX_ANSWER_BYTES {
        return;
    }
    let mut stripped = 0usize;
    for g in r.nodes.iter_mut().flat_map(|n| n.gpus.iter_mut()) {
        if !g.processes.is_empty() {
            g.processes = Vec::new();
            stripped += 1;
        }
    }
    r.truncated = true;
    if stripped > 0 {
        r.hints.push(format!(
            "the process lists of {stripped} GPU samples were left out to keep the answer within {} MiB; ask gpulse processes (Processes) for them",
            MAX_ANSWER_BYTES >> 20
        ));
    }
    let mut bare = 0usize;
    let mut len = r.encoded_len();
    for n in r.nodes.iter_mut().rev() {
        if len <= MAX_ANSWER_BYTES {
            break;
        }
        if n.gpus.is_empty() {
            continue;
        }
        let before = n.encoded_len();
        n.gpus = Vec::new();
        // The node's own bytes shrink, and with them its length prefix.
        len = len - before + n.encoded_len();
        bare += 1;
    }
    if bare > 0 {
        r.hints.push(format!(
            "the GPU samples of {bare} nodes (the last by name) were left out to keep the answer within {} MiB; ask for fewer nodes with a window",
            MAX_ANSWER_BYTES >> 20
        ));
    }
}

/// An event too large for any answer (stored before these bounds existed) as its envelope
/// only: cursor, seq, node, agent, kind, severity and times stay, the payload goes. An answer or
/// a replay then carries it without failing to encode, and says so. None for any other event.
pub fn envelope_if_oversized(ev: &crate::v1::Event) -> Option<crate::v1::Event> {
    (ev.encoded_len() > MAX_ANSWER_BYTES).then(|| crate::v1::Event {
        payload: None,
        unknown_fields: Vec::new(),
        ..ev.clone()
    })
}

/// Most distinct unknown top-level fields one event may carry (a newer agent adds a few).
pub const MAX_UNKNOWN_FIELDS: usize = 32;
/// Kernel record text, messages and catalog texts.
pub const MAX_TEXT: usize = 4096;
/// A path (`/proc/PID/exe`: PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// Names, ids and other short strings.
pub const MAX_NAME: usize = 256;
/// Versions, states, types.
pub const MAX_SHORT: usize = 64;
/// Processes listed in one GPU sample.
pub const MAX_PROCESSES: usize = 1024;
/// NVML field errors in one sample.
pub const MAX_FIELD_ERRORS: usize = 64;
/// NVLink links in one sample.
pub const MAX_LINKS: usize = 64;
/// Throttle reason names in one sample.
pub const MAX_THROTTLE_NAMES: usize = 64;
/// Device nodes one process event names.
pub const MAX_DEVICES: usize = 256;
/// Words of an NVLink or SXid record.
pub const MAX_WORDS: usize = 64;

/// A byte allowed in a device name as the kernel spelled it (`pci_raw`): it keys verdicts and
/// labels series, so printable ASCII without quotes, backslashes, braces, `=` or `,`.
pub fn device_name_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !b"\"\\{}=,".contains(&b)
}

/// `pci_raw` with every byte a [`device_name_byte`] (others become `?`).
fn fit_device_name(s: &mut String) -> bool {
    if s.bytes().all(device_name_byte) {
        return false;
    }
    *s = s
        .chars()
        .map(|c| match u8::try_from(c) {
            Ok(b) if device_name_byte(b) => c,
            _ => '?',
        })
        .collect();
    true
}

/// The first bound an event breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
    pub unit: &'static str,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} has {} {}; at most {} are allowed",
            self.field, self.len, self.unit, self.max
        )
    }
}

impl std::error::Error for Violation {}

/// What to do at each bounded field: check it, or cut it to fit.
trait Visit {
    fn text(&mut self, field: &'static str, s: &mut String, max: usize);
    fn list<T>(&mut self, field: &'static str, v: &mut Vec<T>, max: usize);
}

/// The first violation, changing nothing.
struct Check(Option<Violation>);

impl Visit for Check {
    fn text(&mut self, field: &'static str, s: &mut String, max: usize) {
        if self.0.is_none() && s.len() > max {
            self.0 = Some(Violation {
                field,
                len: s.len(),
                max,
                unit: "bytes",
            });
        }
    }
    fn list<T>(&mut self, field: &'static str, v: &mut Vec<T>, max: usize) {
        if self.0.is_none() && v.len() > max {
            self.0 = Some(Violation {
                field,
                len: v.len(),
                max,
                unit: "entries",
            });
        }
    }
}

/// Cuts what is too long; remembers whether it cut anything.
struct Fit(bool);

impl Visit for Fit {
    fn text(&mut self, _: &'static str, s: &mut String, max: usize) {
        if s.len() > max {
            let mut end = max;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            self.0 = true;
        }
    }
    fn list<T>(&mut self, _: &'static str, v: &mut Vec<T>, max: usize) {
        if v.len() > max {
            v.truncate(max);
            self.0 = true;
        }
    }
}

fn pod<V: Visit>(v: &mut V, p: &mut Option<v1::PodRef>, prefix: Pod) {
    let Some(p) = p else { return };
    let n = prefix.names();
    v.text(n[0], &mut p.namespace, MAX_NAME);
    v.text(n[1], &mut p.name, MAX_NAME);
    v.text(n[2], &mut p.uid, MAX_NAME);
    v.text(n[3], &mut p.container, MAX_NAME);
    v.text(n[4], &mut p.container_id, MAX_NAME);
}

#[derive(Clone, Copy)]
enum Pod {
    Xid,
    Process,
}

impl Pod {
    fn names(self) -> [&'static str; 5] {
        match self {
            Pod::Xid => [
                "xid.pod.namespace",
                "xid.pod.name",
                "xid.pod.uid",
                "xid.pod.container",
                "xid.pod.container_id",
            ],
            Pod::Process => [
                "gpu_process.pod.namespace",
                "gpu_process.pod.name",
                "gpu_process.pod.uid",
                "gpu_process.pod.container",
                "gpu_process.pod.container_id",
            ],
        }
    }
}

/// Every bounded field of an agent's event, in one place.
fn walk<V: Visit>(ev: &mut v1::Event, v: &mut V) {
    v.text("node", &mut ev.node, MAX_NAME);
    v.text("agent_id", &mut ev.agent_id, MAX_NAME);
    v.list("unknown_fields", &mut ev.unknown_fields, MAX_UNKNOWN_FIELDS);
    let Some(p) = &mut ev.payload else { return };
    match p {
        Payload::Xid(x) => {
            v.text("xid.pci", &mut x.pci, MAX_SHORT);
            v.text("xid.pci_raw", &mut x.pci_raw, MAX_SHORT);
            v.text("xid.gpu_uuid", &mut x.gpu_uuid, MAX_NAME);
            v.text("xid.process_name", &mut x.process_name, MAX_NAME);
            v.text("xid.message", &mut x.message, MAX_TEXT);
            v.text("xid.mnemonic", &mut x.mnemonic, MAX_NAME);
            v.text("xid.description", &mut x.description, MAX_TEXT);
            v.text("xid.immediate_action", &mut x.immediate_action, MAX_TEXT);
            v.text(
                "xid.investigatory_action",
                &mut x.investigatory_action,
                MAX_TEXT,
            );
            v.text("xid.raw", &mut x.raw, MAX_TEXT);
            if let Some(r) = &mut x.recovery_action {
                v.text("xid.recovery_action.from_name", &mut r.from_name, MAX_SHORT);
                v.text("xid.recovery_action.to_name", &mut r.to_name, MAX_SHORT);
            }
            if let Some(n) = &mut x.nvlink {
                v.text("xid.nvlink.unit", &mut n.unit, MAX_SHORT);
                v.text("xid.nvlink.xc", &mut n.xc, MAX_SHORT);
                v.list("xid.nvlink.words", &mut n.words, MAX_WORDS);
            }
            pod(v, &mut x.pod, Pod::Xid);
        }
        Payload::Sxid(s) => {
            v.text("sxid.pci", &mut s.pci, MAX_SHORT);
            v.text("sxid.pci_raw", &mut s.pci_raw, MAX_SHORT);
            v.list("sxid.data", &mut s.data, MAX_WORDS);
            v.text("sxid.message", &mut s.message, MAX_TEXT);
            v.text("sxid.description", &mut s.description, MAX_TEXT);
            v.text("sxid.raw", &mut s.raw, MAX_TEXT);
        }
        Payload::DriverLog(d) => {
            v.text("driver_log.text", &mut d.text, MAX_TEXT);
            v.text("driver_log.pci", &mut d.pci, MAX_SHORT);
            v.text("driver_log.gpu_uuid", &mut d.gpu_uuid, MAX_NAME);
        }
        Payload::AgentStatus(s) => {
            v.text("agent_status.xid_source", &mut s.xid_source, MAX_SHORT);
            v.text("agent_status.detail", &mut s.detail, MAX_TEXT);
            v.text("agent_status.version", &mut s.version, MAX_SHORT);
            v.text("agent_status.boot_id", &mut s.boot_id, MAX_SHORT);
        }
        Payload::Gap(g) => v.text("gap.detail", &mut g.detail, MAX_TEXT),
        Payload::GpuProcess(g) => {
            v.text("gpu_process.comm", &mut g.comm, MAX_NAME);
            v.text("gpu_process.exe", &mut g.exe, MAX_PATH);
            v.text("gpu_process.device", &mut g.device, MAX_NAME);
            v.list("gpu_process.devices", &mut g.devices, MAX_DEVICES);
            for d in &mut g.devices {
                v.text("gpu_process.devices[]", d, MAX_NAME);
            }
            pod(v, &mut g.pod, Pod::Process);
        }
        Payload::GpuSample(s) => {
            v.text("gpu_sample.uuid", &mut s.uuid, MAX_NAME);
            v.text("gpu_sample.pci", &mut s.pci, MAX_SHORT);
            v.text("gpu_sample.name", &mut s.name, MAX_NAME);
            v.text(
                "gpu_sample.driver_version",
                &mut s.driver_version,
                MAX_SHORT,
            );
            v.text(
                "gpu_sample.cuda_driver_version",
                &mut s.cuda_driver_version,
                MAX_SHORT,
            );
            v.list(
                "gpu_sample.throttle_reason_names",
                &mut s.throttle_reason_names,
                MAX_THROTTLE_NAMES,
            );
            for n in &mut s.throttle_reason_names {
                v.text("gpu_sample.throttle_reason_names[]", n, MAX_SHORT);
            }
            v.list("gpu_sample.processes", &mut s.processes, MAX_PROCESSES);
            for p in &mut s.processes {
                v.text("gpu_sample.processes[].type", &mut p.r#type, MAX_SHORT);
            }
            v.list("gpu_sample.errors", &mut s.errors, MAX_FIELD_ERRORS);
            for e in &mut s.errors {
                v.text("gpu_sample.errors[].field", &mut e.field, MAX_SHORT);
                v.text("gpu_sample.errors[].error", &mut e.error, MAX_NAME);
            }
            v.list("gpu_sample.nvlink", &mut s.nvlink, MAX_LINKS);
            if let Some(f) = &mut s.fabric {
                v.text("gpu_sample.fabric.state", &mut f.state, MAX_SHORT);
                v.text("gpu_sample.fabric.status", &mut f.status, MAX_SHORT);
                v.text(
                    "gpu_sample.fabric.cluster_uuid",
                    &mut f.cluster_uuid,
                    MAX_NAME,
                );
            }
        }
        // The collector's own; refused from agents elsewhere, and bounded where it is made.
        Payload::GpuHealth(_) => {}
    }
}

/// The first bound `ev` breaks, if any. Takes `&mut` only to share [`walk`] with [`fit`]:
/// nothing is changed.
pub fn check(ev: &mut v1::Event) -> Result<(), Violation> {
    let mut c = Check(None);
    walk(ev, &mut c);
    c.0.map_or(Ok(()), Err)
}

/// Cuts `ev` to the bounds; returns whether anything was cut (then `truncated` is set on
/// payloads that have it).
pub fn fit(ev: &mut v1::Event) -> bool {
    let mut f = Fit(false);
    walk(ev, &mut f);
    match &mut ev.payload {
        Some(Payload::Xid(x)) => f.0 |= fit_device_name(&mut x.pci_raw),
        Some(Payload::Sxid(x)) => f.0 |= fit_device_name(&mut x.pci_raw),
        _ => {}
    }
    if f.0 {
        match &mut ev.payload {
            Some(Payload::Xid(x)) => x.truncated = true,
            Some(Payload::DriverLog(d)) => d.truncated = true,
            _ => {}
        }
    }
    f.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prost::Message;

    fn sample(processes: usize, driver: &str) -> v1::Event {
        v1::Event {
            payload: Some(Payload::GpuSample(v1::GpuSample {
                uuid: "GPU-0".into(),
                driver_version: driver.into(),
                processes: vec![v1::GpuProcessMemory::default(); processes],
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn a_nodes_answer_is_cut_to_its_budget_keeping_every_node() {
        let sample = v1::GpuSample {
            processes: vec![
                v1::GpuProcessMemory {
                    pid: 1,
                    used_memory_bytes: Some(1 << 30),
                    r#type: "compute".into(),
                };
                MAX_PROCESSES
            ],
            name: "n".repeat(MAX_NAME),
            ..Default::default()
        };
        let node = |i: usize| v1::NodeInfo {
            node: format!("node-{i:04}"),
            gpus: vec![sample.clone(); 8],
            ..Default::default()
        };
        // 40 nodes x 8 GPUs with full process lists: ~8 MB.
        let mut r = v1::NodesResponse {
            nodes: (0..40).map(node).collect(),
            ..Default::default()
        };
        assert!(r.encoded_len() > 4 << 20);
        fit_nodes(&mut r);
        assert!(r.encoded_len() <= MAX_ANSWER_BYTES);
        assert_eq!(r.nodes.len(), 40);
        assert!(r.truncated && r.hints.len() == 1, "{:?}", r.hints);
        assert!(r.nodes.iter().all(|n| n.gpus.len() == 8), "samples kept");
        // 3,000 nodes x 8 bare GPUs with long names: samples of the last nodes go too.
        let bare = v1::GpuSample {
            name: "n".repeat(MAX_NAME),
            uuid: "u".repeat(MAX_NAME),
            driver_version: "d".repeat(MAX_SHORT),
            ..Default::default()
        };
        let mut r = v1::NodesResponse {
            nodes: (0..3000)
                .map(|i| v1::NodeInfo {
                    node: format!("node-{i:04}"),
                    gpus: vec![bare.clone(); 8],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        fit_nodes(&mut r);
        assert!(r.encoded_len() <= MAX_ANSWER_BYTES);
        assert_eq!(r.nodes.len(), 3000);
        assert!(r.nodes[0].gpus.len() == 8 && r.nodes[2999].gpus.is_empty());
        assert!(
            r.hints
                .iter()
                .any(|h| h.contains("nodes (the last by name)"))
        );
        // A small answer is left alone.
        let mut small = v1::NodesResponse {
            nodes: (0..3).map(node).collect(),
            ..Default::default()
        };
        let expect = small.clone();
        fit_nodes(&mut small);
        assert_eq!(small, expect);
    }

    #[test]
    fn fitting_counts_encoded_bytes() {
        let evs: Vec<v1::Event> = (0..10)
            .map(|_| v1::Event {
                agent_id: "a".repeat(1000),
                ..Default::default()
            })
            .collect();
        let one = 1 + 2 + evs[0].encoded_len();
        assert_eq!(fitting(&evs, 10 * one), 10);
        assert_eq!(fitting(&evs, 10 * one - 1), 9);
        assert_eq!(fitting(&evs, 3 * one + 5), 3);
        assert_eq!(fitting(&evs, 0), 1, "at least one");
        assert_eq!(fitting::<v1::Event>(&[], 0), 0);
    }

    #[test]
    fn check_names_the_first_field_past_its_bound() {
        assert_eq!(check(&mut sample(MAX_PROCESSES, "580.65")), Ok(()));
        let e = check(&mut sample(MAX_PROCESSES + 1, "580.65")).unwrap_err();
        assert_eq!(e.field, "gpu_sample.processes");
        assert_eq!(
            e.to_string(),
            "gpu_sample.processes has 1025 entries; at most 1024 are allowed"
        );
        let e = check(&mut sample(1, &"9".repeat(65))).unwrap_err();
        assert_eq!(e.field, "gpu_sample.driver_version");
        let mut x = v1::Event {
            payload: Some(Payload::Xid(v1::Xid {
                pci_raw: "P".repeat(64 << 10),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert_eq!(check(&mut x).unwrap_err().field, "xid.pci_raw");
    }

    #[test]
    fn fit_cuts_to_what_check_accepts() {
        let mut big = sample(MAX_PROCESSES * 3, &"é".repeat(100));
        assert!(fit(&mut big));
        assert_eq!(check(&mut big), Ok(()));
        let Some(Payload::GpuSample(s)) = &big.payload else {
            unreachable!()
        };
        assert_eq!(s.processes.len(), MAX_PROCESSES);
        // Cut at a character boundary: still valid UTF-8 and re-encodes.
        assert_eq!(s.driver_version.chars().count(), 32);
        assert!(big.encoded_len() < MAX_EVENT_BYTES);
        let mut x = v1::Event {
            payload: Some(Payload::Xid(v1::Xid {
                message: "m".repeat(MAX_TEXT + 1),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert!(fit(&mut x));
        assert!(
            matches!(&x.payload, Some(Payload::Xid(x)) if x.truncated && x.message.len() == MAX_TEXT)
        );
        let mut ok = sample(3, "580.65");
        assert!(!fit(&mut ok));
        let mut odd = v1::Event {
            payload: Some(Payload::Xid(v1::Xid {
                pci_raw: "PCI:0 \"x\"".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        assert!(fit(&mut odd));
        assert!(matches!(&odd.payload, Some(Payload::Xid(x)) if x.pci_raw == "PCI:0??x?"));
    }

    #[test]
    fn an_event_fitted_to_every_bound_is_within_the_byte_bound_for_real_shapes() {
        // A sample with every list at its bound and strings at theirs stays under the event
        // bound: an honest agent's sample is never refused for its size.
        let mut s = v1::GpuSample {
            uuid: "u".repeat(MAX_NAME),
            name: "n".repeat(MAX_NAME),
            driver_version: "d".repeat(MAX_SHORT),
            processes: vec![
                v1::GpuProcessMemory {
                    pid: u32::MAX,
                    used_memory_bytes: Some(u64::MAX),
                    r#type: "graphics".into(),
                };
                MAX_PROCESSES
            ],
            nvlink: vec![
                v1::NvLinkErrors {
                    link: 17,
                    crc_flit: Some(u64::MAX),
                    crc_data: Some(u64::MAX),
                    replay: Some(u64::MAX),
                    recovery: Some(u64::MAX),
                };
                18
            ],
            ..Default::default()
        };
        s.throttle_reason_names = vec!["sw_power_cap".into(); 16];
        let mut ev = v1::Event {
            payload: Some(Payload::GpuSample(s)),
            ..Default::default()
        };
        assert_eq!(check(&mut ev), Ok(()));
        assert!(ev.encoded_len() < MAX_EVENT_BYTES, "{}", ev.encoded_len());
    }
}
