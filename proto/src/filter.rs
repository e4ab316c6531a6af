//! Event filters as the contract defines them (`EventFilter`): validated from the wire, with one
//! matching rule that the collector (Subscribe, ListEvents, aggregations) and the gateway (its
//! merged streams) both apply. What is matched is a [`Subject`]: a decoded event here, a stored
//! one in the collector.
use std::collections::HashSet;

use crate::v1::{self, EventFilter, EventKind, Severity, event::Payload};

/// Upper bound on list sizes in one filter, so a request cannot make matching expensive.
pub const MAX_FILTER_ITEMS: usize = 1024;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    nodes: HashSet<String>,
    kinds: HashSet<i32>,
    min_severity: i32,
    xid_codes: HashSet<u32>,
    gpus: HashSet<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("filter.{field} has {n} entries; at most {MAX_FILTER_ITEMS} are allowed")]
    TooMany { field: &'static str, n: usize },
    #[error("filter.kinds contains unknown event kind {0}")]
    UnknownKind(i32),
    #[error("filter.min_severity {0} is not a known severity")]
    UnknownSeverity(i32),
}

impl Filter {
    pub fn from_wire(f: Option<EventFilter>) -> Result<Self, FilterError> {
        let f = f.unwrap_or_default();
        for (field, n) in [
            ("nodes", f.nodes.len()),
            ("kinds", f.kinds.len()),
            ("xid_codes", f.xid_codes.len()),
            ("gpus", f.gpus.len()),
        ] {
            if n > MAX_FILTER_ITEMS {
                return Err(FilterError::TooMany { field, n });
            }
        }
        for k in &f.kinds {
            if EventKind::try_from(*k).is_err() || *k == EventKind::Unspecified as i32 {
                return Err(FilterError::UnknownKind(*k));
            }
        }
        if Severity::try_from(f.min_severity).is_err() {
            return Err(FilterError::UnknownSeverity(f.min_severity));
        }
        Ok(Self {
            nodes: f.nodes.into_iter().collect(),
            kinds: f.kinds.into_iter().collect(),
            min_severity: f.min_severity,
            xid_codes: f.xid_codes.into_iter().collect(),
            gpus: f.gpus.into_iter().map(|g| g.to_ascii_lowercase()).collect(),
        })
    }

    /// The kinds this filter can match (empty = all); with XID codes only XIDs can match.
    pub fn lanes(&self) -> Vec<EventKind> {
        if !self.xid_codes.is_empty() {
            return vec![EventKind::Xid];
        }
        let mut k: Vec<EventKind> = self
            .kinds
            .iter()
            .filter_map(|k| EventKind::try_from(*k).ok())
            .collect();
        k.sort_by_key(|k| *k as i32);
        k
    }

    /// Whether the filter needs an event's GPU identities (which a stored event gives only
    /// decoded).
    pub fn needs_gpus(&self) -> bool {
        !self.gpus.is_empty()
    }

    pub fn matches(&self, ev: &impl Subject) -> bool {
        if !self.nodes.is_empty() && !self.nodes.contains(ev.node()) {
            return false;
        }
        if !self.kinds.is_empty() && !self.kinds.contains(&ev.kind()) {
            return false;
        }
        if ev.severity() < self.min_severity {
            return false;
        }
        if !self.xid_codes.is_empty() && !ev.xid_code().is_some_and(|c| self.xid_codes.contains(&c))
        {
            return false;
        }
        if !self.gpus.is_empty() {
            return ev.gpu_keys_match(&mut |keys| {
                keys.iter()
                    .any(|k| !k.is_empty() && self.gpus.contains(&k.to_ascii_lowercase()))
            });
        }
        true
    }
}

/// What a filter looks at: a decoded event, or a stored one (whose indexed fields need no
/// decoding).
pub trait Subject {
    fn node(&self) -> &str;
    fn kind(&self) -> i32;
    fn severity(&self) -> i32;
    fn xid_code(&self) -> Option<u32>;
    /// `f` applied to the event's GPU identities (UUID and PCI address).
    fn gpu_keys_match(&self, f: &mut dyn FnMut([&str; 2]) -> bool) -> bool;
}

impl Subject for v1::Event {
    fn node(&self) -> &str {
        &self.node
    }
    fn kind(&self) -> i32 {
        self.kind
    }
    fn severity(&self) -> i32 {
        self.severity
    }
    fn xid_code(&self) -> Option<u32> {
        match &self.payload {
            Some(Payload::Xid(x)) => Some(x.code),
            _ => None,
        }
    }
    fn gpu_keys_match(&self, f: &mut dyn FnMut([&str; 2]) -> bool) -> bool {
        f(self.gpu_keys())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xid(node: &str, code: u32, sev: Severity, uuid: &str) -> v1::Event {
        v1::Event {
            node: node.into(),
            kind: EventKind::Xid as i32,
            severity: sev as i32,
            payload: Some(Payload::Xid(v1::Xid {
                code,
                gpu_uuid: uuid.into(),
                pci: "0000:3b:00.0".into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn filters_by_every_field() {
        let all = Filter::from_wire(None).unwrap();
        assert!(all.matches(&xid("a", 13, Severity::Info, "")));
        let f = Filter::from_wire(Some(EventFilter {
            nodes: vec!["a".into()],
            kinds: vec![EventKind::Xid as i32],
            min_severity: Severity::Error as i32,
            xid_codes: vec![79, 48],
            gpus: vec!["GPU-ABC".into()],
        }))
        .unwrap();
        assert!(f.matches(&xid("a", 79, Severity::Fatal, "GPU-abc")));
        assert!(
            !f.matches(&xid("b", 79, Severity::Fatal, "GPU-abc")),
            "node"
        );
        assert!(
            !f.matches(&xid("a", 13, Severity::Fatal, "GPU-abc")),
            "code"
        );
        assert!(
            !f.matches(&xid("a", 79, Severity::Warning, "GPU-abc")),
            "severity"
        );
        assert!(
            !f.matches(&xid("a", 79, Severity::Fatal, "GPU-other")),
            "gpu"
        );
        let by_pci = Filter::from_wire(Some(EventFilter {
            gpus: vec!["0000:3b:00.0".into()],
            ..Default::default()
        }))
        .unwrap();
        assert!(by_pci.matches(&xid("a", 79, Severity::Fatal, "")));
    }

    #[test]
    fn rejects_bad_filters() {
        assert_eq!(
            Filter::from_wire(Some(EventFilter {
                kinds: vec![42],
                ..Default::default()
            })),
            Err(FilterError::UnknownKind(42))
        );
        assert_eq!(
            Filter::from_wire(Some(EventFilter {
                min_severity: 9,
                ..Default::default()
            })),
            Err(FilterError::UnknownSeverity(9))
        );
        let many = EventFilter {
            nodes: (0..2000).map(|i| i.to_string()).collect(),
            ..Default::default()
        };
        assert!(matches!(
            Filter::from_wire(Some(many)),
            Err(FilterError::TooMany { field: "nodes", .. })
        ));
    }
}
