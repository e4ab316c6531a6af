//! Stateless parser for one NVIDIA kernel log record.
//!
//! Input is the text of one record as the kernel stores it (what `printk:console` and
//! `/dev/kmsg` carry): no timestamp, level prefix stripped, possibly several lines joined by
//! `\n`. [`strip_rendering`] removes the prefixes that dmesg/journald renderings add, for text
//! copied from elsewhere. The parser never fails: a record it does not understand becomes a
//! [`ParsedRecord::DriverLog`], so nothing the driver says is lost.
use serde::Serialize;

use crate::{bdf::Bdf, severity::Severity};

/// What one record says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ParsedRecord {
    /// An XID report (or the no-Xid "fallen off the bus" message, reported as XID 79).
    Xid(XidReport),
    /// An NVSwitch SXid report.
    Sxid(SxidReport),
    /// The `GPU at PCI:...: GPU-<uuid>` preamble that maps a PCI address to a GPU UUID.
    GpuIdentity { pci: Bdf, uuid: String },
    /// Any other NVIDIA driver record, kept verbatim. `pci` is set when the text names one.
    DriverLog { pci: Option<Bdf>, text: String },
}

/// A decoded `NVRM: Xid (...)` record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct XidReport {
    pub code: u32,
    /// The GPU's PCI address, normalised; `None` when the record's address is unreadable.
    pub pci: Option<Bdf>,
    /// The address exactly as printed (e.g. `PCI:0000:91:00`, or `PCI:...` when redacted).
    pub pci_raw: String,
    /// The process the driver blamed, when it named one (`pid='<unknown>'` gives `None`).
    pub pid: Option<u32>,
    pub process_name: Option<String>,
    /// The channel the driver named (`Ch 0000003a`, `Channel ID 00000052`, `channel 0x0c`, ...).
    pub channel: Option<u32>,
    /// The driver's message after the code, pid and name fields.
    pub message: String,
    /// `... caused by previous Xid N`: the root cause the driver names.
    pub caused_by: Option<u32>,
    /// Xid 154: the GPU recovery action change.
    pub recovery_action: Option<RecoveryAction>,
    /// Xid 144-150 (NVLink5): the structured fields.
    pub nvlink: Option<NvlinkDetail>,
    /// A severity the record itself states (NVLink5 `Fatal` / `Nonfatal`).
    pub severity_hint: Option<Severity>,
    /// True when no Xid number was printed and the code was inferred (fallen off the bus -> 79).
    pub inferred: bool,
}

/// Xid 154's structured recovery action (NVML `nvmlDeviceGpuRecoveryAction_t`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecoveryAction {
    pub from: u32,
    pub from_name: String,
    pub to: u32,
    pub to_name: String,
}

/// NVIDIA's names for recovery actions, used when the record omits them.
pub fn recovery_action_name(code: u32) -> &'static str {
    match code {
        0 => "None",
        1 => "GPU Reset Required",
        2 => "Node Reboot Required",
        3 => "Drain P2P",
        4 => "Drain and Reset",
        5 => "Recover IMEX Domain",
        6 => "Bus Reset",
        7 => "System Reboot",
        _ => "Unknown",
    }
}

/// Xid 144-150 fields: `UNIT Fatal|Nonfatal XCn iN Link NN (0x.. 0x.. ...)`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NvlinkDetail {
    pub unit: String,
    pub fatal: bool,
    pub xc: Option<String>,
    pub instance: Option<u32>,
    pub link: Option<u32>,
    /// The hex words in parentheses; the first is intrinfo, the second errorStatus.
    pub words: Vec<u32>,
    pub intrinfo: Option<u32>,
    pub error_status: Option<u32>,
    /// Bits 20-25 of intrinfo: the sub-code NVIDIA's "XID 144-150 Decode" sheet keys on.
    pub sub_code: Option<u32>,
}

/// A decoded NVSwitch `SXid` record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SxidReport {
    pub code: u32,
    /// N of `nvidia-nvswitchN`.
    pub switch_index: Option<u32>,
    pub pci: Option<Bdf>,
    pub pci_raw: String,
    /// `Fatal` / `Non-fatal` as printed; continuation records (`Data {...}`) state none.
    pub severity_hint: Option<Severity>,
    pub link: Option<u32>,
    /// The words of a `Data {...}` continuation record.
    pub data: Vec<u32>,
    pub message: String,
}

/// Removes dmesg / journald / `dmesg -x` rendering prefixes (`[6781741.548779] `,
/// `Nov 29 11:28:11 host kernel: `, `kern  :err   : 2025-01-25T10:34:54,859532+00:00 `, ...):
/// everything before the first `NVRM:` or `nvidia-nvswitch`.
pub fn strip_rendering(line: &str) -> &str {
    let line = line.trim_end_matches(['\r', '\n']);
    let at = [line.find("NVRM:"), line.find("nvidia-nvswitch")]
        .into_iter()
        .flatten()
        .min();
    match at {
        Some(i) => &line[i..],
        None => line,
    }
}

/// Parses one kernel record. Returns `None` for records that are not from NVIDIA's drivers.
pub fn parse_record(text: &str) -> Option<ParsedRecord> {
    let text = text.trim_end_matches(['\r', '\n', '\0']);
    if let Some(rest) = text.strip_prefix("nvidia-nvswitch") {
        return Some(match parse_sxid(rest) {
            Some(s) => ParsedRecord::Sxid(s),
            None => driver_log(text),
        });
    }
    let body = text.strip_prefix("NVRM:")?.trim_start();
    if let Some(x) = parse_xid(body) {
        return Some(ParsedRecord::Xid(x));
    }
    if let Some((pci, uuid)) = parse_identity(body) {
        return Some(ParsedRecord::GpuIdentity { pci, uuid });
    }
    if text.contains("fallen off the bus") {
        return Some(ParsedRecord::Xid(XidReport {
            code: 79,
            pci: find_bdf(text),
            pci_raw: String::new(),
            message: join_lines(body),
            inferred: true,
            ..XidReport::default()
        }));
    }
    Some(driver_log(text))
}

fn driver_log(text: &str) -> ParsedRecord {
    ParsedRecord::DriverLog {
        pci: find_bdf(text),
        text: text.to_string(),
    }
}

/// Multi-line records repeat `NVRM: ` on each line; join them into one readable message.
fn join_lines(body: &str) -> String {
    body.split('\n')
        .map(|l| l.trim().strip_prefix("NVRM:").unwrap_or(l.trim()).trim())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_xid(body: &str) -> Option<XidReport> {
    let after = body.strip_prefix("Xid (")?;
    let (dev, rest) = after.split_once("):")?;
    let rest = rest.trim_start();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let code: u32 = rest[..digits].parse().ok()?;
    let mut fields = rest[digits..].trim_start_matches(',').trim_start();

    let mut report = XidReport {
        code,
        pci: Bdf::parse(dev).ok(),
        pci_raw: dev.to_string(),
        ..XidReport::default()
    };
    if let Some(v) = fields.strip_prefix("pid=") {
        let (val, tail) = split_field(v);
        report.pid = val.trim_matches('\'').parse().ok();
        fields = tail;
    }
    if let Some(v) = fields.strip_prefix("name=") {
        let (val, tail) = split_field(v);
        let val = val.trim_matches('\'');
        if !val.is_empty() && val != "<unknown>" {
            report.process_name = Some(val.to_string());
        }
        fields = tail;
    }
    report.message = join_lines(fields);
    report.channel = find_channel(&report.message);
    report.caused_by = number_after(&report.message, "caused by previous Xid ");
    if code == 154 {
        report.recovery_action = parse_recovery_action(&report.message);
    }
    if (144..=150).contains(&code) {
        report.nvlink = parse_nvlink5(&report.message);
        report.severity_hint = report.nvlink.as_ref().map(|n| {
            if n.fatal {
                Severity::Fatal
            } else {
                Severity::Warning
            }
        });
    }
    Some(report)
}

/// Splits `value, rest` at the first `, `; a field that ends the record has no rest.
fn split_field(s: &str) -> (&str, &str) {
    match s.find(", ") {
        Some(i) => (&s[..i], &s[i + 2..]),
        None => (s.trim_end_matches(','), ""),
    }
}

fn parse_identity(body: &str) -> Option<(Bdf, String)> {
    let rest = body.strip_prefix("GPU at ")?;
    let (dev, uuid) = rest.split_once(": GPU-")?;
    let uuid_tail: String = uuid
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || *c == '-')
        .collect();
    if uuid_tail.len() < 8 {
        return None;
    }
    Some((Bdf::parse(dev).ok()?, format!("GPU-{uuid_tail}")))
}

fn parse_sxid(rest: &str) -> Option<SxidReport> {
    // rest: "N: SXid (PCI:dddd:bb:dd.f): CODE, ..."
    let (idx, rest) = rest.split_once(':')?;
    let rest = rest.trim_start().strip_prefix("SXid (")?;
    let (dev, rest) = rest.split_once("):")?;
    let rest = rest.trim_start();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    let code: u32 = rest[..digits].parse().ok()?;
    let mut msg = rest[digits..].trim_start_matches(',').trim_start();
    let mut severity_hint = None;
    for (prefix, sev) in [
        ("Non-fatal", Severity::Warning),
        ("Nonfatal", Severity::Warning),
        ("Fatal", Severity::Fatal),
    ] {
        if let Some(tail) = msg.strip_prefix(prefix) {
            severity_hint = Some(sev);
            msg = tail.trim_start_matches(',').trim_start();
            break;
        }
    }
    let data = match (msg.find("Data {"), msg.rfind('}')) {
        (Some(a), Some(b)) if b > a => hex_words(&msg[a + 6..b]),
        _ => Vec::new(),
    };
    Some(SxidReport {
        code,
        switch_index: idx.trim().parse().ok(),
        pci: Bdf::parse(dev).ok(),
        pci_raw: dev.to_string(),
        severity_hint,
        link: number_after(msg, "Link "),
        data,
        message: msg.to_string(),
    })
}

fn parse_recovery_action(msg: &str) -> Option<RecoveryAction> {
    let rest = &msg[msg.find("changed from ")? + "changed from ".len()..];
    let (from, rest) = parse_num_token(rest)?;
    let (from_name, rest) = paren_name(rest);
    let rest = rest.trim_start().strip_prefix("to ")?;
    let (to, rest) = parse_num_token(rest)?;
    let (to_name, _) = paren_name(rest);
    Some(RecoveryAction {
        from,
        from_name: from_name.unwrap_or_else(|| recovery_action_name(from).to_string()),
        to,
        to_name: to_name.unwrap_or_else(|| recovery_action_name(to).to_string()),
    })
}

fn paren_name(s: &str) -> (Option<String>, &str) {
    let t = s.trim_start();
    if let Some(inner) = t.strip_prefix('(')
        && let Some(end) = inner.find(')')
    {
        return (Some(inner[..end].to_string()), &inner[end + 1..]);
    }
    (None, s)
}

/// Parses `0x1f` or `31` at the start of `s`.
fn parse_num_token(s: &str) -> Option<(u32, &str)> {
    let s = s.trim_start();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let n = h.bytes().take_while(u8::is_ascii_hexdigit).count();
        Some((u32::from_str_radix(&h[..n], 16).ok()?, &h[n..]))
    } else {
        let n = s.bytes().take_while(u8::is_ascii_digit).count();
        Some((s[..n].parse().ok()?, &s[n..]))
    }
}

fn parse_nvlink5(msg: &str) -> Option<NvlinkDetail> {
    let mut tokens = msg.split_whitespace();
    let unit = tokens.next()?;
    if !unit
        .bytes()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return None;
    }
    let head = msg.split('(').next().unwrap_or(msg);
    let fatal = head.split_whitespace().any(|t| t == "Fatal");
    let xc = head
        .split_whitespace()
        .find(|t| t.starts_with("XC"))
        .map(str::to_string);
    let instance = head
        .split_whitespace()
        .find_map(|t| t.strip_prefix('i').and_then(|n| n.parse().ok()));
    let words = match (msg.find('('), msg.rfind(')')) {
        (Some(a), Some(b)) if b > a => hex_words(&msg[a + 1..b]),
        _ => Vec::new(),
    };
    let intrinfo = words.first().copied();
    Some(NvlinkDetail {
        unit: unit.to_string(),
        fatal,
        xc,
        instance,
        link: number_after(head, "Link "),
        error_status: words.get(1).copied(),
        sub_code: intrinfo.map(|v| (v >> 20) & 0x3f),
        intrinfo,
        words,
    })
}

fn hex_words(s: &str) -> Vec<u32> {
    s.split([',', ' '])
        .filter_map(|w| {
            let w = w.trim();
            let h = w.strip_prefix("0x").or_else(|| w.strip_prefix("0X"))?;
            u32::from_str_radix(h, 16).ok()
        })
        .collect()
}

/// Decimal number right after `pat`.
fn number_after(s: &str, pat: &str) -> Option<u32> {
    let rest = &s[s.find(pat)? + pat.len()..];
    let n = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest[..n].parse().ok()
}

fn find_channel(msg: &str) -> Option<u32> {
    for pat in [
        "Channel ID ",
        "ChID ",
        "channel 0x",
        "Channel 0x",
        "Channel ",
        "Ch ",
    ] {
        if let Some(i) = msg.find(pat) {
            let rest = &msg[i + pat.len()..];
            let rest = rest.strip_prefix("0x").unwrap_or(rest);
            let n = rest.bytes().take_while(u8::is_ascii_hexdigit).count();
            if n > 0
                && let Ok(v) = u32::from_str_radix(&rest[..n.min(8)], 16)
            {
                return Some(v);
            }
        }
    }
    None
}

/// The first PCI address in free text (`PCI:dddd:bb:dd`, `dddd:bb:dd.f`, ...).
pub fn find_bdf(text: &str) -> Option<Bdf> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '(' | ')' | ',' | '\'' | '"'))
        .filter(|t| t.contains(':'))
        .find_map(|t| {
            let t = t.trim_end_matches([':', '.', ';']);
            let core = t.strip_prefix("PCI:").unwrap_or(t);
            // Require a 4-digit domain or an explicit function so times like 11:43:09 never match.
            let plausible =
                core.split(':').next().is_some_and(|d| d.len() >= 4) || core.contains('.');
            if plausible { Bdf::parse(t).ok() } else { None }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xid(text: &str) -> XidReport {
        match parse_record(text) {
            Some(ParsedRecord::Xid(x)) => x,
            other => panic!("not an xid: {other:?}"),
        }
    }

    #[test]
    fn full_xid_with_quoted_pid() {
        let x = xid(
            "NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
        );
        assert_eq!(x.code, 79);
        assert_eq!(x.pci.unwrap().to_string(), "0000:91:00.0");
        assert_eq!(x.pci_raw, "PCI:0000:91:00");
        assert_eq!(x.pid, None);
        assert_eq!(x.process_name, None);
        assert_eq!(x.message, "GPU has fallen off the bus.");
        assert!(!x.inferred);
    }

    #[test]
    fn pid_and_name_with_colons() {
        let x = xid(
            "NVRM: Xid (PCI:0018:01:00): 145, pid=876767, name=ray::WorkerDict, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x0409a0c2 0x00000008 0x00000001 0x00000000 0x00100000 0x00000004)",
        );
        assert_eq!(x.pid, Some(876767));
        assert_eq!(x.process_name.as_deref(), Some("ray::WorkerDict"));
        assert_eq!(x.pci.unwrap().to_string(), "0018:01:00.0");
        let n = x.nvlink.unwrap();
        assert_eq!(n.unit, "RLW_RXPIPE");
        assert!(!n.fatal);
        assert_eq!(n.link, Some(13));
        assert_eq!(n.instance, Some(0));
        assert_eq!(n.xc.as_deref(), Some("XC0"));
        assert_eq!(n.words.len(), 6);
        assert_eq!(n.error_status, Some(8));
        assert_eq!(x.severity_hint, Some(Severity::Warning));
    }

    #[test]
    fn nvlink5_149_subcode() {
        let x = xid(
            "NVRM: Xid (PCI:0000:00:00): 149, NETIR_LINK_EVT Fatal XC0 i0 Link 00 (0x025001c6 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)",
        );
        let n = x.nvlink.unwrap();
        assert!(n.fatal);
        assert_eq!(n.sub_code, Some(37));
        assert_eq!(n.link, Some(0));
        assert_eq!(x.severity_hint, Some(Severity::Fatal));
    }

    #[test]
    fn channels_in_every_spelling() {
        assert_eq!(
            xid("NVRM: Xid (0000:03:00): 14, Channel 00000001").channel,
            Some(1)
        );
        assert_eq!(
            xid("NVRM: Xid (PCI:0000:01:00): 31, Ch 0000003a, intr 10000000. MMU Fault").channel,
            Some(0x3a)
        );
        assert_eq!(
            xid("NVRM: Xid (PCI:0000:01:00): 32, Channel ID 00000052 intr 02000000").channel,
            Some(0x52)
        );
        assert_eq!(
            xid("NVRM: Xid (PCI:0000:01:00): 13, Graphics Exception: ChID 0052, Class 00000000")
                .channel,
            Some(0x52)
        );
        assert_eq!(xid("NVRM: Xid (PCI:0000:01:00): 31, pid=13705, name=UnrealEditor, channel 0x0000000c, intr 00000000.").channel, Some(0xc));
    }

    #[test]
    fn caused_by_and_recovery_action() {
        let x = xid(
            "NVRM: Xid (PCI:0000:3b:00): 45, pid=1234, name=python, Ch 00000010, caused by previous Xid 149",
        );
        assert_eq!(x.caused_by, Some(149));
        let x = xid(
            "NVRM: Xid (PCI:0000:3b:00): 154, GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)",
        );
        let r = x.recovery_action.unwrap();
        assert_eq!((r.from, r.to), (0, 1));
        assert_eq!(r.to_name, "GPU Reset Required");
        let x = xid("NVRM: Xid (PCI:0000:3b:00): 154, GPU recovery action changed from 0x0 to 0x2");
        assert_eq!(x.recovery_action.unwrap().to_name, "Node Reboot Required");
    }

    #[test]
    fn redacted_address_keeps_raw() {
        let x = xid(
            "NVRM: Xid (PCI:...): 137, RLW_RXPIPE interrupt hit on link 11 on GPU0: PRIV Error",
        );
        assert_eq!(x.code, 137);
        assert_eq!(x.pci, None);
        assert_eq!(x.pci_raw, "PCI:...");
    }

    #[test]
    fn fallen_off_the_bus_without_xid() {
        let x = xid("NVRM: GPU 0000:3b:00.0: GPU has fallen off the bus.");
        assert!(x.inferred);
        assert_eq!(x.code, 79);
        assert_eq!(x.pci.unwrap().to_string(), "0000:3b:00.0");
        let x = xid(
            "NVRM: The NVIDIA GPU 0000:01:00.0\nNVRM: (PCI ID: 10de:1eb8) installed in this system has\nNVRM: fallen off the bus and is not responding to commands.",
        );
        assert!(x.inferred);
        assert_eq!(x.pci.unwrap().to_string(), "0000:01:00.0");
        assert!(x.message.starts_with("The NVIDIA GPU 0000:01:00.0 (PCI ID"));
        let x = xid("NVRM: fallen off the bus and is not responding to commands.");
        assert_eq!(x.pci, None);
    }

    #[test]
    fn identity_preamble() {
        assert_eq!(
            parse_record("NVRM: GPU at PCI:0000:91:00: GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b"),
            Some(ParsedRecord::GpuIdentity {
                pci: Bdf::parse("0000:91:00.0").unwrap(),
                uuid: "GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b".into()
            })
        );
    }

    #[test]
    fn sxid_shapes() {
        let Some(ParsedRecord::Sxid(s)) = parse_record(
            "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 48 LTSSM Fault Up",
        ) else {
            panic!()
        };
        assert_eq!((s.code, s.switch_index, s.link), (20034, Some(1), Some(48)));
        assert_eq!(s.severity_hint, Some(Severity::Fatal));
        assert_eq!(s.message, "Link 48 LTSSM Fault Up");
        let Some(ParsedRecord::Sxid(s)) = parse_record(
            "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Data {0x10000000, 0x10000000, 0x00000000}",
        ) else {
            panic!()
        };
        assert_eq!(s.data, vec![0x10000000, 0x10000000, 0]);
        assert_eq!(s.severity_hint, None);
        let Some(ParsedRecord::Sxid(s)) = parse_record(
            "nvidia-nvswitch3: SXid (PCI:0000:04:00.0): 22013, Non-fatal, Link 44 Minion Link DLREQ interrupt",
        ) else {
            panic!()
        };
        assert_eq!(s.severity_hint, Some(Severity::Warning));
    }

    #[test]
    fn unknown_shapes_become_driver_logs() {
        let Some(ParsedRecord::DriverLog { pci, text }) = parse_record(
            "NVRM: Rate limiting GSP RPC error prints for GPU at PCI:0000:9b:00 (printing 1 of every 30).  The GPU likely needs to be reset.",
        ) else {
            panic!()
        };
        assert_eq!(pci.unwrap().to_string(), "0000:9b:00.0");
        assert!(text.starts_with("NVRM: Rate limiting"));
        assert!(matches!(
            parse_record("NVRM: Xid (PCI:0000:01:00): notanumber"),
            Some(ParsedRecord::DriverLog { .. })
        ));
        assert!(matches!(
            parse_record("nvidia-nvswitch: garbage"),
            Some(ParsedRecord::DriverLog { .. })
        ));
        assert_eq!(parse_record("usb 1-1: new device"), None);
        assert_eq!(parse_record(""), None);
    }

    #[test]
    fn renderings_are_stripped() {
        for line in [
            "[6781741.548779] NVRM: Xid (PCI:0000:91:00): 79, GPU has fallen off the bus.",
            "[Fri Aug 30 11:43:09 2024] NVRM: Xid (PCI:0000:91:00): 79, GPU has fallen off the bus.",
            "Nov 29 11:28:11 zeus kernel: NVRM: Xid (PCI:0000:91:00): 79, GPU has fallen off the bus.",
            "kern  :err   : 2025-01-25T10:34:54,859532+00:00 NVRM: Xid (PCI:0000:91:00): 79, GPU has fallen off the bus.",
        ] {
            let x = xid(strip_rendering(line));
            assert_eq!(
                (x.code, x.pci.unwrap().to_string()),
                (79, "0000:91:00.0".to_string()),
                "{line}"
            );
        }
    }

    #[test]
    fn find_bdf_ignores_times_and_pci_ids() {
        assert_eq!(find_bdf("at 11:43:09 with 10de:1eb8"), None);
        assert_eq!(
            find_bdf("GPU 0000:3b:00.0: x").unwrap().to_string(),
            "0000:3b:00.0"
        );
    }
}
