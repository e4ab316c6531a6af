//! The XID catalog (codes 1-173) and a small NVSwitch SXid catalog.
//!
//! The XID table lives in `catalog.tsv` next to this file so it can be reviewed and diffed as
//! data; it is parsed once, on first use, and its shape is checked by tests.
use std::sync::LazyLock;

use serde::Serialize;

use crate::severity::Severity;

/// One catalog entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct XidInfo {
    pub code: u32,
    pub mnemonic: &'static str,
    pub description: &'static str,
    /// NVIDIA's immediate resolution bucket (e.g. `RESET_GPU`), empty when NVIDIA gives none.
    pub immediate_action: &'static str,
    /// NVIDIA's investigatory resolution bucket, empty when NVIDIA gives none.
    pub investigatory_action: &'static str,
    /// gpulse's default severity (see [`crate::SeverityPolicy`] for overrides).
    pub severity: Severity,
}

const TSV: &str = include_str!("catalog.tsv");

static XIDS: LazyLock<Vec<XidInfo>> = LazyLock::new(|| parse_tsv(TSV));

fn parse_tsv(tsv: &'static str) -> Vec<XidInfo> {
    let mut out = Vec::new();
    for line in tsv.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&'static str> = line.split('\t').collect();
        // The table is compiled in and its shape is asserted by tests; a malformed row is skipped
        // rather than panicking in library code.
        let [
            code,
            mnemonic,
            description,
            immediate,
            investigatory,
            severity,
        ] = cols[..]
        else {
            continue;
        };
        let (Ok(code), Ok(severity)) = (code.parse::<u32>(), severity.parse::<Severity>()) else {
            continue;
        };
        out.push(XidInfo {
            code,
            mnemonic,
            description,
            immediate_action: immediate,
            investigatory_action: investigatory,
            severity,
        });
    }
    out.sort_by_key(|i| i.code);
    out
}

/// The catalog entry for `code`, if the code is known.
pub fn lookup(code: u32) -> Option<&'static XidInfo> {
    let all: &'static [XidInfo] = &XIDS;
    all.binary_search_by_key(&code, |i| i.code)
        .ok()
        .map(|i| &all[i])
}

/// Every catalog entry, ordered by code.
pub fn all() -> &'static [XidInfo] {
    &XIDS
}

/// "1-173": the codes the catalog covers, for messages (a row added to `catalog.tsv` shows
/// up in every one of them).
pub fn known_codes() -> String {
    match (XIDS.first(), XIDS.last()) {
        (Some(a), Some(b)) => format!("{}-{}", a.code, b.code),
        _ => "none".to_string(),
    }
}

/// What the CLI and MCP say of a code the catalog lacks.
pub fn not_catalogued(code: u32) -> String {
    format!(
        "XID {code} is not in the catalog (codes {} are known); newer drivers may define it: check NVIDIA's Xid catalog",
        known_codes()
    )
}

/// An NVSwitch SXid catalog entry (NVIDIA Fabric Manager user guide).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SxidInfo {
    pub code: u32,
    pub description: &'static str,
}

/// SXids operators meet most often. Unknown SXids are still reported, with the severity the
/// record states (`Fatal` / `Non-fatal`).
const SXIDS: &[SxidInfo] = &[
    SxidInfo {
        code: 11004,
        description: "Ingress invalid ACL",
    },
    SxidInfo {
        code: 11012,
        description: "Single-bit ECC error on ingress",
    },
    SxidInfo {
        code: 11021,
        description: "Ingress invalid VC set",
    },
    SxidInfo {
        code: 12028,
        description: "Egress non-posted PRIV error",
    },
    SxidInfo {
        code: 15008,
        description: "Route timeout",
    },
    SxidInfo {
        code: 19084,
        description: "AN1 heartbeat timeout",
    },
    SxidInfo {
        code: 20034,
        description: "LTSSM fault: NVLink went down",
    },
    SxidInfo {
        code: 22013,
        description: "Minion link DLREQ interrupt",
    },
    SxidInfo {
        code: 24007,
        description: "Internal SOE error",
    },
];

/// The SXid catalog entry for `code`, if known.
pub fn lookup_sxid(code: u32) -> Option<&'static SxidInfo> {
    SXIDS.iter().find(|s| s.code == code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_every_code_from_1_to_173_once() {
        let all = all();
        assert_eq!(all.len(), 173, "catalog rows");
        for (i, info) in all.iter().enumerate() {
            assert_eq!(info.code, i as u32 + 1);
            assert!(!info.mnemonic.is_empty(), "mnemonic for {}", info.code);
            assert!(
                !info.description.is_empty(),
                "description for {}",
                info.code
            );
        }
        // Every non-comment line parsed: nothing was silently skipped.
        let rows = TSV
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count();
        assert_eq!(rows, all.len());
    }

    #[test]
    fn key_codes_match_nvidia() {
        let x79 = lookup(79).unwrap();
        assert_eq!(x79.mnemonic, "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS");
        assert_eq!(x79.immediate_action, "RESTART_BM");
        assert_eq!(x79.severity, Severity::Fatal);
        assert_eq!(lookup(48).unwrap().immediate_action, "WORKFLOW_XID_48");
        assert_eq!(lookup(119).unwrap().mnemonic, "GSP_RPC_TIMEOUT");
        assert_eq!(
            lookup(64).unwrap().description,
            "GPU memory remapping failure"
        );
        assert_eq!(lookup(154).unwrap().severity, Severity::Info);
        // DCGM's "devastating" set is fatal under the default policy.
        for code in [48, 74, 79, 95, 119, 120, 140] {
            assert_eq!(
                lookup(code).unwrap().severity,
                Severity::Fatal,
                "xid {code}"
            );
        }
        assert!(lookup(0).is_none());
        assert!(lookup(174).is_none());
    }

    #[test]
    fn sxid_lookup() {
        assert_eq!(lookup_sxid(20034).unwrap().code, 20034);
        assert!(lookup_sxid(1).is_none());
    }
}
