//! The one table of enum short names: `fatal` for `SEVERITY_FATAL`, `gpu_sample` for
//! `EVENT_KIND_GPU_SAMPLE`. JSON, text lines, Prometheus labels, MCP answers and CLI flags all
//! use these, and parse them back with [`ShortName::from_short_name`]. Each table is an
//! exhaustive match, so a new enum value fails to compile until it has a name here.
use crate::v1::{
    AgentState, Aggregation, EventKind, GapStage, GroupBy, HealthState, Order, ProcessEventType,
    ProcessState, RecordSource, Severity, Tier, UpstreamState, XidGrouping,
};

/// A wire enum's short, lowercase name.
pub trait ShortName: Sized + Copy + Default + TryFrom<i32> + 'static {
    /// Every value, `Unspecified` first, in wire order.
    const VALUES: &'static [Self];
    fn short_name(self) -> &'static str;
    /// The value named `s` (case-insensitive, `-` for `_`, and a few aliases); never
    /// `Unspecified`.
    fn from_short_name(s: &str) -> Option<Self>;
    /// The short name of a raw wire value; a value this build does not know reads as
    /// the enum's `unspecified`.
    fn name_of(v: i32) -> &'static str {
        Self::try_from(v).unwrap_or_default().short_name()
    }
    /// Every short name but `unspecified`, for help texts and error messages.
    fn names() -> Vec<&'static str> {
        Self::VALUES[1..].iter().map(|v| v.short_name()).collect()
    }
}

macro_rules! short_names {
    ($ty:ident { $($v:ident => $s:literal $(| $alias:literal)*),+ $(,)? }) => {
        impl ShortName for $ty {
            const VALUES: &'static [Self] = &[Self::Unspecified, $(Self::$v),+];
            fn short_name(self) -> &'static str {
                match self {
                    Self::Unspecified => "unspecified",
                    $(Self::$v => $s),+
                }
            }
            fn from_short_name(s: &str) -> Option<Self> {
                match s.to_ascii_lowercase().replace('-', "_").as_str() {
                    $($s $(| $alias)* => Some(Self::$v),)+
                    _ => None,
                }
            }
        }
    };
}

short_names!(Severity {
    Info => "info" | "informational",
    Warning => "warning" | "warn",
    Error => "error" | "err" | "critical",
    Fatal => "fatal",
});
short_names!(EventKind {
    Xid => "xid",
    Sxid => "sxid",
    DriverLog => "driver_log" | "log",
    AgentStatus => "agent_status" | "status",
    Gap => "gap",
    GpuProcess => "gpu_process" | "process",
    GpuSample => "gpu_sample" | "sample",
    GpuHealth => "gpu_health" | "health",
    Unknown => "unknown",
});
short_names!(RecordSource {
    EbpfPrintk => "ebpf_printk",
    EbpfNvidiaTracepoint => "ebpf_nvidia_tracepoint",
    Kmsg => "kmsg",
    KmsgBacklog => "kmsg_backlog",
    NvmlEvent => "nvml_event",
});
short_names!(ProcessEventType {
    Open => "open",
    DeviceOpen => "device_open",
    Exec => "exec",
    Exit => "exit",
});
short_names!(UpstreamState {
    Ok => "ok",
    Error => "error",
    Timeout => "timeout",
    CircuitOpen => "circuit_open",
});
short_names!(AgentState { Started => "started", Degraded => "degraded", Stopping => "stopping" });
short_names!(GapStage {
    KernelRing => "kernel_ring",
    AgentSpool => "agent_spool",
    Kmsg => "kmsg",
    AgentQueue => "agent_queue",
    CollectorSeq => "collector_seq",
    SamplesShed => "samples_shed",
    CollectorRefused => "collector_refused",
});
short_names!(Tier { Raw => "raw", Tier1m => "1m", Tier1h => "1h" });
short_names!(Order { NewestFirst => "newest_first" | "newest", OldestFirst => "oldest_first" | "oldest" });
short_names!(Aggregation { Avg => "avg", Min => "min", Max => "max", P95 => "p95", Last => "last" });
short_names!(GroupBy { Fleet => "fleet", Node => "node", Gpu => "gpu" });
short_names!(XidGrouping { Code => "code" | "xid", Gpu => "gpu", Node => "node" });
short_names!(ProcessState { Running => "running", Exited => "exited" });
short_names!(HealthState {
    Healthy => "healthy",
    Degraded => "degraded",
    Unhealthy => "unhealthy",
    Unknown => "unknown",
});

impl EventKind {
    /// Every kind, in wire order.
    pub const ALL: [Self; 9] = [
        Self::Xid,
        Self::Sxid,
        Self::DriverLog,
        Self::AgentStatus,
        Self::Gap,
        Self::GpuProcess,
        Self::GpuSample,
        Self::GpuHealth,
        Self::Unknown,
    ];

    /// Every kind but GPU samples (one per GPU per second): what listings show by default.
    pub const EVENTS: [Self; 8] = [
        Self::Xid,
        Self::Sxid,
        Self::DriverLog,
        Self::AgentStatus,
        Self::Gap,
        Self::GpuProcess,
        Self::GpuHealth,
        Self::Unknown,
    ];
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The short name is the wire name without its prefix, lowercased (the tiers read better
    /// as `1m`/`1h`), and parses back.
    fn check<T: ShortName + std::fmt::Debug + PartialEq>(
        wire: fn(&T) -> &'static str,
        prefix: &str,
    ) {
        for &v in T::VALUES {
            let stripped = wire(&v).strip_prefix(prefix).unwrap().to_ascii_lowercase();
            let name = v.short_name();
            assert!(
                stripped == name || stripped == format!("tier_{name}"),
                "{stripped} vs {name}"
            );
            if name != "unspecified" {
                assert_eq!(T::from_short_name(name), Some(v));
                assert_eq!(
                    T::from_short_name(&name.to_ascii_uppercase().replace('_', "-")),
                    Some(v)
                );
            }
        }
        assert_eq!(T::from_short_name("unspecified"), None);
        assert_eq!(T::from_short_name("nope"), None);
        assert_eq!(T::name_of(9999), "unspecified");
    }

    #[test]
    fn every_table_matches_the_wire_names() {
        check::<Severity>(Severity::as_str_name, "SEVERITY_");
        check::<EventKind>(EventKind::as_str_name, "EVENT_KIND_");
        check::<RecordSource>(RecordSource::as_str_name, "RECORD_SOURCE_");
        check::<ProcessEventType>(ProcessEventType::as_str_name, "PROCESS_EVENT_TYPE_");
        check::<AgentState>(AgentState::as_str_name, "AGENT_STATE_");
        check::<GapStage>(GapStage::as_str_name, "GAP_STAGE_");
        check::<Tier>(Tier::as_str_name, "TIER_");
        check::<Order>(Order::as_str_name, "ORDER_");
        check::<Aggregation>(Aggregation::as_str_name, "AGGREGATION_");
        check::<GroupBy>(GroupBy::as_str_name, "GROUP_BY_");
        check::<XidGrouping>(XidGrouping::as_str_name, "XID_GROUPING_");
        check::<ProcessState>(ProcessState::as_str_name, "PROCESS_STATE_");
        check::<UpstreamState>(UpstreamState::as_str_name, "UPSTREAM_STATE_");
    }

    #[test]
    fn kind_lists_cover_every_kind() {
        assert_eq!(&EventKind::VALUES[1..], &EventKind::ALL[..]);
        assert_eq!(
            EventKind::from_short_name("log"),
            Some(EventKind::DriverLog)
        );
        assert!(!EventKind::EVENTS.contains(&EventKind::GpuSample));
    }
}
