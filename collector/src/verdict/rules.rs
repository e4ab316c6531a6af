//! The health rules, in one place (docs/gpu-health.md has the same table): what an XID or an NVML
//! reading says about a GPU, what NVIDIA recommends doing, and what evidence clears it.
use gpulse_proto::v1::{self, HealthState};

/// What clears a reason. Nothing clears one by a write from outside: each is evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clears {
    /// The process the XID named exited (the pod's lifetime, for RESTART_APP).
    ProcessExit,
    /// No process named: a quiet period of clean samples with no recurrence.
    QuietPeriod,
    /// A GPU reset (its volatile counters start over) or a node reboot, then clean samples.
    ResetOrReboot,
    /// A node reboot (a new boot id), then clean samples.
    Reboot,
    /// Only a different GPU in the slot (a new UUID at the address): hardware was replaced.
    Replacement,
    /// The reading itself: samples without the condition.
    Evidence,
}

impl Clears {
    pub fn name(self) -> &'static str {
        match self {
            Self::ProcessExit => "process_exit",
            Self::QuietPeriod => "quiet_period",
            Self::ResetOrReboot => "reset_or_reboot",
            Self::Reboot => "reboot",
            Self::Replacement => "replacement",
            Self::Evidence => "evidence",
        }
    }

    pub fn from_name(s: &str) -> Self {
        match s {
            "process_exit" => Self::ProcessExit,
            "quiet_period" => Self::QuietPeriod,
            "reset_or_reboot" => Self::ResetOrReboot,
            "reboot" => Self::Reboot,
            "replacement" => Self::Replacement,
            _ => Self::Evidence,
        }
    }
}

/// A rule's verdict: the state it implies, the action, what clears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub state: HealthState,
    pub action: &'static str,
    pub clears: Clears,
}

const fn v(state: HealthState, action: &'static str, clears: Clears) -> Verdict {
    Verdict {
        state,
        action,
        clears,
    }
}

/// The action once the same XID came back after enough reboots: hardware inspection.
pub const ESCALATED_ACTION: &str = "CONTACT_SUPPORT";

/// What an XID says, from the catalog's immediate action (Xid 154 from the recovery action it
/// carries). `None`: the XID does not change the GPU's health (IGNORE, informational, or a
/// workflow that follows another XID).
pub fn xid(code: u32, recovery: Option<&v1::RecoveryAction>, has_pid: bool) -> Option<Verdict> {
    use HealthState::{Degraded, Unhealthy};
    let action = gpulse_xid::catalog::lookup(code).map_or("", |i| i.immediate_action);
    let app = if has_pid {
        Clears::ProcessExit
    } else {
        Clears::QuietPeriod
    };
    Some(match action {
        "RESTART_APP" => v(Degraded, "RESTART_APP", app),
        "RESET_GPU" => v(Unhealthy, "RESET_GPU", Clears::ResetOrReboot),
        // A double-bit error: NVIDIA's workflow ends in a GPU reset (and a remap on Ampere+).
        "WORKFLOW_XID_48" => v(Unhealthy, "RESET_GPU", Clears::ResetOrReboot),
        "WORKFLOW_NVLINK_ERR" | "WORKFLOW_NVLINK5_ERR" => {
            v(Unhealthy, action_static(action), Clears::ResetOrReboot)
        }
        "RESTART_BM" | "RESTART_VM" => v(Unhealthy, action_static(action), Clears::Reboot),
        "CONTACT_SUPPORT" => v(Unhealthy, "CONTACT_SUPPORT", Clears::Replacement),
        "CHECK_MECHANICALS" | "CHECK_UVM" | "UPDATE_SWFW" => {
            v(Degraded, action_static(action), Clears::ResetOrReboot)
        }
        "XID_154" => return recovery.and_then(recovery_verdict),
        _ => return None,
    })
}

/// The catalog's action strings are `'static` already; this keeps the match above readable.
fn action_static(a: &str) -> &'static str {
    gpulse_xid::catalog::all()
        .iter()
        .map(|i| i.immediate_action)
        .find(|x| *x == a)
        .unwrap_or("")
}

/// Xid 154: the driver says which recovery the GPU needs.
fn recovery_verdict(r: &v1::RecoveryAction) -> Option<Verdict> {
    use HealthState::{Degraded, Unhealthy};
    Some(match r.to {
        1 | 4 | 6 => v(Unhealthy, "RESET_GPU", Clears::ResetOrReboot),
        2 | 7 => v(Unhealthy, "RESTART_BM", Clears::Reboot),
        3 | 5 => v(Degraded, "DRAIN_P2P", Clears::ResetOrReboot),
        _ => return None,
    })
}

/// Rules judged from NVML samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SampleRule {
    FallenOffBus,
    RowRemapFailure,
    RowRemapPending,
    RetiredPagesPending,
    RetiredPagesLimit,
    UncorrectableEcc,
    NvlinkErrors,
    ThermalViolation,
    PowerViolation,
    Fabric,
    Vanished,
}

impl SampleRule {
    pub const ALL: [Self; 11] = [
        Self::FallenOffBus,
        Self::RowRemapFailure,
        Self::RowRemapPending,
        Self::RetiredPagesPending,
        Self::RetiredPagesLimit,
        Self::UncorrectableEcc,
        Self::NvlinkErrors,
        Self::ThermalViolation,
        Self::PowerViolation,
        Self::Fabric,
        Self::Vanished,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::FallenOffBus => "fallen_off_bus",
            Self::RowRemapFailure => "row_remap_failure",
            Self::RowRemapPending => "row_remap_pending",
            Self::RetiredPagesPending => "retired_pages_pending",
            Self::RetiredPagesLimit => "retired_pages_limit",
            Self::UncorrectableEcc => "uncorrectable_ecc",
            Self::NvlinkErrors => "nvlink_errors",
            Self::ThermalViolation => "thermal_violation",
            Self::PowerViolation => "power_violation",
            Self::Fabric => "fabric",
            Self::Vanished => "vanished",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    pub fn verdict(self) -> Verdict {
        use HealthState::{Degraded, Unhealthy};
        match self {
            Self::FallenOffBus => v(Unhealthy, "RESTART_BM", Clears::Reboot),
            Self::RowRemapFailure => v(Unhealthy, "CONTACT_SUPPORT", Clears::Evidence),
            Self::RowRemapPending => v(Degraded, "RESET_GPU", Clears::Evidence),
            Self::RetiredPagesPending => v(Degraded, "RESTART_BM", Clears::Evidence),
            Self::RetiredPagesLimit => v(Unhealthy, "CONTACT_SUPPORT", Clears::Evidence),
            Self::UncorrectableEcc => v(Unhealthy, "RESET_GPU", Clears::ResetOrReboot),
            Self::NvlinkErrors => v(Degraded, "WORKFLOW_NVLINK_ERR", Clears::Evidence),
            Self::ThermalViolation => v(Degraded, "CHECK_MECHANICALS", Clears::Evidence),
            Self::PowerViolation => v(Degraded, "CHECK_POWER", Clears::Evidence),
            Self::Fabric => v(Unhealthy, "RESTART_FM", Clears::Evidence),
            Self::Vanished => v(Unhealthy, "RESTART_BM", Clears::Evidence),
        }
    }
}

/// Retired pages at which NVIDIA's dynamic page retirement is exhausted (the board needs service).
pub const RETIRED_PAGES_LIMIT: u32 = 64;

/// Thresholds of the rate rules, judged over windows of at least [`RATE_WINDOW_NS`].
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    /// NVLink CRC + replay + recovery errors per minute, all links together.
    pub nvlink_errors_per_min: f64,
    /// Share of wall time the clocks were held down by thermal limits.
    pub thermal_share: f64,
    /// Share of wall time the clocks were held down by the power limit.
    pub power_share: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            nvlink_errors_per_min: 60.0,
            thermal_share: 0.5,
            power_share: 0.9,
        }
    }
}

/// The shortest window a rate rule is judged over (one minute of samples).
pub const RATE_WINDOW_NS: i128 = 60_000_000_000;

/// A sample's handle error that says the GPU is gone from the bus.
pub fn is_lost(s: &v1::GpuSample) -> Option<&str> {
    s.errors
        .iter()
        .find(|e| {
            e.field == "handle" && {
                let m = e.error.to_ascii_lowercase();
                m.contains("off the bus") || m.contains("gpu is lost") || m.contains("gpu_is_lost")
            }
        })
        .map(|e| e.error.as_str())
}

/// The instant conditions of one sample (rate rules and vanishing are judged elsewhere), with
/// what showed each.
pub fn sample_conditions(s: &v1::GpuSample) -> Vec<(SampleRule, String)> {
    let mut out = Vec::new();
    if let Some(e) = is_lost(s) {
        out.push((SampleRule::FallenOffBus, format!("NVML: {e}")));
    }
    if let Some(r) = &s.row_remap {
        if r.failure {
            out.push((
                SampleRule::RowRemapFailure,
                format!(
                    "row_remap.failure = true ({} uncorrectable rows)",
                    r.uncorrectable
                ),
            ));
        }
        if r.pending {
            out.push((
                SampleRule::RowRemapPending,
                format!(
                    "row_remap.pending = true ({} uncorrectable rows)",
                    r.uncorrectable
                ),
            ));
        }
    }
    if let Some(p) = &s.retired_pages {
        if p.pending {
            out.push((
                SampleRule::RetiredPagesPending,
                "retired_pages.pending = true".to_string(),
            ));
        }
        let total = p.single_bit.saturating_add(p.double_bit);
        if total >= RETIRED_PAGES_LIMIT {
            out.push((
                SampleRule::RetiredPagesLimit,
                format!(
                    "{total} retired pages ({} single-bit, {} double-bit), limit {RETIRED_PAGES_LIMIT}",
                    p.single_bit, p.double_bit
                ),
            ));
        }
    }
    if let Some(f) = &s.fabric
        && f.state == "completed"
        && f.status != "success"
    {
        out.push((
            SampleRule::Fabric,
            format!("NVSwitch fabric registration failed: {}", f.status),
        ));
    }
    out
}

/// All NVLink error counters of a sample summed; absent without NVLink.
pub fn nvlink_total(s: &v1::GpuSample) -> Option<u64> {
    if s.nvlink.is_empty() {
        return None;
    }
    Some(
        s.nvlink
            .iter()
            .flat_map(|l| [l.crc_flit, l.crc_data, l.replay, l.recovery])
            .flatten()
            .fold(0u64, u64::saturating_add),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xid_actions_follow_the_catalog() {
        let s = |code, pid| xid(code, None, pid).map(|v| (v.state, v.action, v.clears));
        assert_eq!(
            s(79, false),
            Some((HealthState::Unhealthy, "RESTART_BM", Clears::Reboot))
        );
        assert_eq!(
            s(13, true),
            Some((HealthState::Degraded, "RESTART_APP", Clears::ProcessExit))
        );
        assert_eq!(
            s(13, false),
            Some((HealthState::Degraded, "RESTART_APP", Clears::QuietPeriod))
        );
        assert_eq!(
            s(48, false),
            Some((HealthState::Unhealthy, "RESET_GPU", Clears::ResetOrReboot))
        );
        assert_eq!(
            s(95, false),
            Some((HealthState::Unhealthy, "RESET_GPU", Clears::ResetOrReboot))
        );
        assert_eq!(
            s(74, false),
            Some((
                HealthState::Unhealthy,
                "WORKFLOW_NVLINK_ERR",
                Clears::ResetOrReboot
            ))
        );
        assert_eq!(s(63, false), None, "IGNORE");
        assert_eq!(s(43, false), None, "IGNORE");
        assert_eq!(s(100_000, false), None, "unknown code");
        let reboot = v1::RecoveryAction {
            to: 2,
            ..Default::default()
        };
        assert_eq!(
            xid(154, Some(&reboot), false).map(|v| v.action),
            Some("RESTART_BM")
        );
        assert_eq!(xid(154, None, false), None);
        // Every catalog action is either judged or deliberately ignored.
        for info in gpulse_xid::catalog::all() {
            let judged = xid(info.code, None, false).is_some();
            let ignored = matches!(
                info.immediate_action,
                "IGNORE" | "" | "XID_154" | "WORKFLOW_XID_45"
            );
            assert!(
                judged != ignored,
                "XID {} {:?}",
                info.code,
                info.immediate_action
            );
        }
    }

    #[test]
    fn sample_conditions_name_their_evidence() {
        let s = v1::GpuSample {
            row_remap: Some(v1::RowRemap {
                uncorrectable: 2,
                failure: true,
                pending: true,
                ..Default::default()
            }),
            retired_pages: Some(v1::RetiredPages {
                single_bit: 40,
                double_bit: 24,
                pending: false,
            }),
            errors: vec![v1::FieldError {
                field: "handle".into(),
                error: "the GPU has fallen off the bus or is otherwise inaccessible".into(),
            }],
            ..Default::default()
        };
        let rules: Vec<SampleRule> = sample_conditions(&s).into_iter().map(|(r, _)| r).collect();
        assert_eq!(
            rules,
            vec![
                SampleRule::FallenOffBus,
                SampleRule::RowRemapFailure,
                SampleRule::RowRemapPending,
                SampleRule::RetiredPagesLimit
            ]
        );
        assert!(sample_conditions(&v1::GpuSample::default()).is_empty());
        for r in SampleRule::ALL {
            assert_eq!(SampleRule::from_name(r.name()), Some(r));
        }
    }
}
