//! Severity scale and the configurable per-code policy.
use std::{collections::BTreeMap, fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::catalog;

/// How bad an event is. Ordered: `Info < Warning < Error < Fatal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Informational; no action.
    Info,
    /// Worth a look; the GPU keeps working.
    Warning,
    /// The running application was affected (restart the app).
    Error,
    /// The GPU needs a reset or the node a restart.
    Fatal,
}

impl Severity {
    pub const ALL: [Severity; 4] = [Self::Info, Self::Warning, Self::Error, Self::Fatal];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Fatal => "fatal",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("unknown severity {0:?} (expected info, warning, error or fatal)")]
    UnknownSeverity(String),
    #[error("bad severity override {0:?} (expected CODE=SEVERITY, e.g. 13=warning)")]
    BadOverride(String),
    #[error("XID code {0} is outside 1..=65535")]
    BadCode(u64),
}

impl FromStr for Severity {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "info" | "informational" => Ok(Self::Info),
            "warning" | "warn" => Ok(Self::Warning),
            "error" | "err" | "critical" => Ok(Self::Error),
            "fatal" => Ok(Self::Fatal),
            other => Err(PolicyError::UnknownSeverity(other.to_string())),
        }
    }
}

/// Maps an XID code to a severity: the catalog default unless overridden.
///
/// Peers disagree about which codes are critical (DCGM, AWS, Azure and the k8s device plugin all
/// publish different lists), so operators can override any code, e.g. `94=warning,13=info`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeverityPolicy {
    overrides: BTreeMap<u32, Severity>,
}

impl SeverityPolicy {
    /// Parses a comma-separated list of `CODE=SEVERITY` overrides (empty means catalog defaults).
    pub fn parse(spec: &str) -> Result<Self, PolicyError> {
        let mut overrides = BTreeMap::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (code, sev) = item
                .split_once('=')
                .ok_or_else(|| PolicyError::BadOverride(item.to_string()))?;
            let code: u64 = code
                .trim()
                .parse()
                .map_err(|_| PolicyError::BadOverride(item.to_string()))?;
            if code == 0 || code > u64::from(u16::MAX) {
                return Err(PolicyError::BadCode(code));
            }
            overrides.insert(code as u32, sev.parse()?);
        }
        Ok(Self { overrides })
    }

    /// The overrides in force, by code.
    pub fn overrides(&self) -> &BTreeMap<u32, Severity> {
        &self.overrides
    }

    /// Severity of an XID. `text_hint` is a severity the record itself states (NVLink5 144-150
    /// say `Fatal`/`Nonfatal`); it raises the catalog default but never an explicit override.
    pub fn xid(&self, code: u32, text_hint: Option<Severity>) -> Severity {
        if let Some(s) = self.overrides.get(&code) {
            return *s;
        }
        let base = catalog::lookup(code).map_or(Severity::Warning, |i| i.severity);
        match text_hint {
            Some(h) if h > base => h,
            _ => base,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_catalog() {
        let p = SeverityPolicy::default();
        assert_eq!(p.xid(79, None), Severity::Fatal);
        assert_eq!(p.xid(48, None), Severity::Fatal);
        assert_eq!(p.xid(13, None), Severity::Error);
        assert_eq!(p.xid(63, None), Severity::Info);
        assert_eq!(p.xid(43, None), Severity::Warning);
        // Unknown codes are warnings: worth a look, not an emergency.
        assert_eq!(p.xid(999, None), Severity::Warning);
    }

    #[test]
    fn text_hint_raises_but_override_wins() {
        let p = SeverityPolicy::default();
        assert_eq!(p.xid(149, Some(Severity::Fatal)), Severity::Fatal);
        assert_eq!(p.xid(149, Some(Severity::Info)), Severity::Warning);
        let p = SeverityPolicy::parse("149=info, 94 = warning").unwrap();
        assert_eq!(p.xid(149, Some(Severity::Fatal)), Severity::Info);
        assert_eq!(p.xid(94, None), Severity::Warning);
        assert_eq!(p.overrides().len(), 2);
    }

    #[test]
    fn bad_policies_are_rejected_clearly() {
        assert_eq!(
            SeverityPolicy::parse("13"),
            Err(PolicyError::BadOverride("13".into()))
        );
        assert_eq!(
            SeverityPolicy::parse("13=meh"),
            Err(PolicyError::UnknownSeverity("meh".into()))
        );
        assert_eq!(
            SeverityPolicy::parse("0=info"),
            Err(PolicyError::BadCode(0))
        );
        assert!(SeverityPolicy::parse("x=info").is_err());
        assert_eq!(
            SeverityPolicy::parse(" , ").unwrap(),
            SeverityPolicy::default()
        );
    }

    #[test]
    fn severity_orders_and_parses() {
        assert!(Severity::Info < Severity::Warning && Severity::Error < Severity::Fatal);
        for s in Severity::ALL {
            assert_eq!(s.as_str().parse::<Severity>().unwrap(), s);
        }
    }
}
