//! Every record in the shared corpus of real NVIDIA kernel log lines, plus gpulse's variants file,
//! parses to the expected kind, code and GPU, and the dmesg/journald renderings of each record
//! parse to the same thing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report
use gpulse_xid::{
    Decoder, ParsedRecord, Severity,
    parse::{parse_record, strip_rendering},
};

const CORPUS: &str = include_str!("../../../tests/corpus/nvrm-lines.txt");
const VARIANTS: &str = include_str!("../../../tests/corpus/variants.txt");

/// Records of a corpus file; a literal `\n` marks a newline inside one record.
fn records(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.replace("\\n", "\n"))
        .collect()
}

/// (kind, code, pci) summary used for the expectations below.
fn summary(r: &ParsedRecord) -> (String, u32, String) {
    match r {
        ParsedRecord::Xid(x) => (
            if x.inferred { "xid79?" } else { "xid" }.into(),
            x.code,
            x.pci.map(|p| p.to_string()).unwrap_or_default(),
        ),
        ParsedRecord::Sxid(s) => (
            "sxid".into(),
            s.code,
            s.pci.map(|p| p.to_string()).unwrap_or_default(),
        ),
        ParsedRecord::GpuIdentity { pci, .. } => ("identity".into(), 0, pci.to_string()),
        ParsedRecord::DriverLog { pci, .. } => (
            "log".into(),
            0,
            pci.map(|p| p.to_string()).unwrap_or_default(),
        ),
    }
}

fn check(file: &str, want: &[(&str, u32, &str)]) {
    let recs = records(file);
    assert_eq!(recs.len(), want.len(), "record count");
    for (rec, (kind, code, pci)) in recs.iter().zip(want) {
        let parsed = parse_record(rec).unwrap_or_else(|| panic!("not recognised: {rec}"));
        assert_eq!(
            summary(&parsed),
            (kind.to_string(), *code, pci.to_string()),
            "{rec}"
        );
        for prefix in [
            "[6781741.548779] ",
            "[Fri Aug 30 11:43:09 2024] ",
            "Nov 29 11:28:11 zeus kernel: ",
            "kern  :err   : 2025-01-25T10:34:54,859532+00:00 ",
        ] {
            let rendered = format!("{prefix}{rec}");
            assert_eq!(
                parse_record(strip_rendering(&rendered)).as_ref(),
                Some(&parsed),
                "{rendered}"
            );
        }
    }
}

#[test]
fn shared_corpus() {
    check(
        CORPUS,
        &[
            ("identity", 0, "0000:03:00.0"),
            ("xid", 14, "0000:03:00.0"),
            ("identity", 0, "0000:91:00.0"),
            ("log", 0, ""),
            ("xid", 79, "0000:91:00.0"),
            ("xid", 13, "0000:cb:00.0"),
            ("xid", 13, "0000:cb:00.0"),
            ("xid", 119, "0000:9b:00.0"),
            ("log", 0, "0000:9b:00.0"),
            ("xid", 119, "0000:9b:00.0"),
            ("log", 0, ""),
            ("xid", 31, "0000:01:00.0"),
            ("xid", 31, "0000:01:00.0"),
            ("xid", 13, "0000:01:00.0"),
            ("xid", 32, "0000:01:00.0"),
            ("xid", 31, "0000:01:00.0"),
            ("xid", 63, "0000:10:1c.0"),
            ("xid", 145, "0018:01:00.0"),
            ("xid", 149, "0000:00:00.0"),
            ("xid", 137, ""),
            ("log", 0, ""),
            ("sxid", 20034, "0000:06:00.0"),
            ("sxid", 20034, "0000:05:00.0"),
            ("sxid", 12028, "0000:84:00.0"),
            ("sxid", 22013, "0000:04:00.0"),
        ],
    );
}

#[test]
fn variants() {
    check(
        VARIANTS,
        &[
            ("xid", 48, "0000:3b:00.0"),
            ("xid", 94, "0000:af:00.1"),
            ("xid", 45, "0002:c1:00.0"),
            ("xid", 154, "0000:3b:00.0"),
            ("xid", 154, "0000:3b:00.0"),
            ("xid79?", 79, "0000:4b:00.0"),
            ("xid79?", 79, "0000:01:00.0"),
            ("xid", 64, "0000:3b:00.0"),
            ("xid", 173, "0000:3b:00.0"),
            ("xid", 999, "0000:3b:00.0"),
        ],
    );
}

#[test]
fn corpus_fields_and_severities_through_the_decoder() {
    let mut d = Decoder::default();
    let mut out = Vec::new();
    for (i, rec) in records(CORPUS).iter().enumerate() {
        out.push(d.feed(i as u64 * 1_000_000, rec).unwrap());
    }
    // The 79 after its preamble carries the UUID and is fatal.
    assert_eq!(
        out[4].gpu_uuid.as_deref(),
        Some("GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b")
    );
    assert_eq!(out[4].severity, Severity::Fatal);
    // Xid 14 on the GPU whose preamble came first.
    assert_eq!(
        out[1].gpu_uuid.as_deref(),
        Some("GPU-b850f46d-d5ea-c752-ddf3-c4453e44d3f7")
    );
    let ParsedRecord::Xid(x119) = &out[7].record else {
        panic!()
    };
    assert_eq!(
        (x119.pid, x119.process_name.as_deref()),
        (Some(2024380), Some("nvidia-smi"))
    );
    assert!(x119.message.starts_with("Timeout after 6s"));
    let ParsedRecord::Xid(x63) = &out[16].record else {
        panic!()
    };
    assert_eq!((x63.pid, x63.process_name.as_deref()), (Some(1896), None));
    assert_eq!(
        x63.message,
        "Row Remapper: New row marked for remapping, reset gpu to activate."
    );
    assert_eq!(out[18].severity, Severity::Fatal, "149 Fatal from its text");
    assert_eq!(out[17].severity, Severity::Warning, "145 Nonfatal");
    // SXid continuation from another switch does not inherit; 22013 Non-fatal is a warning.
    assert_eq!(out[21].severity, Severity::Fatal);
    assert_eq!(out[24].severity, Severity::Warning);
}

#[test]
fn shared_copy_matches_when_present() {
    // The repository carries a copy of ../shared/corpus so tests stand alone; when the shared
    // original is beside the checkout, make sure the copy has not drifted.
    let shared = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/corpus/nvrm-lines.txt"
    );
    if let Ok(orig) = std::fs::read_to_string(shared) {
        assert_eq!(
            orig, CORPUS,
            "tests/corpus/nvrm-lines.txt differs from shared/corpus"
        );
    }
}
