//! The health rules, in one place (docs/gpu-health.md has the same table): what an XID or an NVML
//! reading says about a GPU, what NVIDIA recommends doing, and what evidence clears it.
use gpulse_proto::v1::{self, HealthState};
use gpulse_xid::action::Action;

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
    pub action: Action,
    pub clears: Clears,
}

const fn v(state: HealthState, action: Action, clears: Clears) -> Verdict {
    Verdict {
        state,
        action,
        clears,
    }
}

/// The action once the same XID came back after enough reboots: hardware inspection.
pub const ESCALATED_ACTION: Action = Action::ContactSupport;

/// What an XID says, from the catalog's immediate action (Xid 154 from the recovery action it
/// carries). `None`: the XID does not change the GPU's health (IGNORE, informational, or a
/// workflow that follows another XID).
pub fn xid(code: u32, recovery: Option<&v1::RecoveryAction>, has_pid: bool) -> Option<Verdict> {
    use Action as A;
    use HealthState::{Degraded, Unhealthy};
    let action =
        gpulse_xid::catalog::lookup(code).and_then(|i| A::from_name(i.immediate_action))?;
    let app = if has_pid {
        Clears::ProcessExit
    } else {
        Clears::QuietPeriod
    };
    Some(match action {
        A::RestartApp => v(Degraded, action, app),
        A::ResetGpu => v(Unhealthy, action, Clears::ResetOrReboot),
        // A double-bit error: NVIDIA's workflow ends in a GPU reset (and a remap on Ampere+).
        A::WorkflowXid48 => v(Unhealthy, A::ResetGpu, Clears::ResetOrReboot),
        A::WorkflowNvlinkErr | A::WorkflowNvlink5Err => v(Unhealthy, action, Clears::ResetOrReboot),
        A::RestartBm | A::RestartVm => v(Unhealthy, action, Clears::Reboot),
        A::ContactSupport => v(Unhealthy, action, Clears::Replacement),
        A::CheckMechanicals | A::CheckUvm | A::UpdateSwfw => {
            v(Degraded, action, Clears::ResetOrReboot)
        }
        A::Xid154 => return recovery.and_then(recovery_verdict),
        A::Ignore
        | A::WorkflowXid45
        | A::CheckPower
        | A::RestartFm
        | A::DrainP2p
        | A::CheckWorkload => return None,
    })
}

/// Xid 154: the driver says which recovery the GPU needs.
fn recovery_verdict(r: &v1::RecoveryAction) -> Option<Verdict> {
    use HealthState::{Degraded, Unhealthy};
    Some(match r.to {
        1 | 4 | 6 => v(Unhealthy, Action::ResetGpu, Clears::ResetOrReboot),
        2 | 7 => v(Unhealthy, Action::RestartBm, Clears::Reboot),
        3 | 5 => v(Degraded, Action::DrainP2p, Clears::ResetOrReboot),
        _ => return None,
    })
}

/// How a rule reads its evidence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// One sample shows the condition ([`Rule::condition`]).
    Instant,
    /// A counter rises between two samples of the GPU.
    Delta,
    /// A rate or a share over a window of at least [`RATE_WINDOW_NS`].
    Rate,
    /// Something expected did not happen for a while (a GPU stopped sampling).
    Window,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Instant => "instant",
            Self::Delta => "delta",
            Self::Rate => "rate",
            Self::Window => "window",
        }
    }
}

/// One rule judged from NVML samples: everything about it in one value (the shape of
/// tokio-console's `Warn<T>`). The engine iterates [`RULES`]; docs/gpu-health.md's table is held
/// to it by a test.
#[derive(Debug)]
pub struct Rule {
    pub id: SampleRule,
    /// `HealthReason.rule`.
    pub name: &'static str,
    pub kind: Kind,
    pub state: HealthState,
    pub action: Action,
    pub clears: Clears,
    /// For [`Kind::Instant`] rules: what one sample shows, as the evidence's words.
    pub condition: Option<fn(&v1::GpuSample) -> Option<String>>,
    /// Where the rule comes from.
    pub source: &'static str,
}

impl Rule {
    pub fn verdict(&self) -> Verdict {
        v(self.state, self.action, self.clears)
    }

    /// A reason of this rule starts clearing as soon as a sample lacks the condition (the other
    /// rules clear by a window under the rate, a reset, or a reboot).
    pub fn clears_when_absent(&self) -> bool {
        self.clears == Clears::Evidence && matches!(self.kind, Kind::Instant | Kind::Window)
    }
}

macro_rules! sample_rules {
    ($($variant:ident { $($field:ident: $value:expr),+ $(,)? })+) => {
        /// The rules besides the catalog's per-XID one, judged from NVML samples or from XIDs
        /// over a window (one per row of [`RULES`]).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum SampleRule {
            $($variant,)+
        }

        /// The sample rules, in the order they are judged and documented.
        pub const RULES: &[Rule] = &[$({
            #[allow(unused_imports, reason = "each row uses some of them")]
            use {Action::*, Clears::*, HealthState::*, Kind::*};
            Rule { id: SampleRule::$variant, $($field: $value),+ }
        },)+];
    };
}

sample_rules! {
    FallenOffBus {
        name: "fallen_off_bus", kind: Instant, state: Unhealthy,
        action: RestartBm, clears: Reboot, condition: Some(lost),
        source: "NVIDIA XID catalog (XID 79: GPU has fallen off the bus)",
    }
    RowRemapFailure {
        name: "row_remap_failure", kind: Instant,
        state: Unhealthy, action: ContactSupport, clears: Evidence, condition: Some(remap_failure),
        source: "NVIDIA GPU memory error management (row remapping failure: RMA)",
    }
    RowRemapPending {
        name: "row_remap_pending", kind: Instant,
        state: Degraded, action: ResetGpu, clears: Evidence, condition: Some(remap_pending),
        source: "NVIDIA GPU memory error management (a remap takes effect at the next reset)",
    }
    RetiredPagesPending {
        name: "retired_pages_pending", kind: Instant,
        state: Degraded, action: RestartBm, clears: Evidence, condition: Some(pages_pending),
        source: "NVIDIA dynamic page retirement (pending until the next reboot)",
    }
    RetiredPagesLimit {
        name: "retired_pages_limit", kind: Instant,
        state: Unhealthy, action: ContactSupport, clears: Evidence, condition: Some(pages_limit),
        source: "NVIDIA dynamic page retirement (64 pages: the board needs service)",
    }
    UncorrectableEcc {
        name: "uncorrectable_ecc", kind: Delta,
        state: Unhealthy, action: ResetGpu, clears: ResetOrReboot, condition: None,
        source: "DCGM health watch (memory: volatile DBE)",
    }
    NvlinkErrors {
        name: "nvlink_errors", kind: Rate, state: Degraded,
        action: WorkflowNvlinkErr, clears: Evidence, condition: None,
        source: "DCGM health watch (NVLink CRC and replay errors)",
    }
    ThermalViolation {
        name: "thermal_violation", kind: Rate, state: Degraded,
        action: CheckMechanicals, clears: Evidence, condition: None,
        source: "DCGM health watch (thermal violations)",
    }
    PowerViolation {
        name: "power_violation", kind: Rate, state: Degraded,
        action: CheckPower, clears: Evidence, condition: None,
        source: "DCGM health watch (power violations)",
    }
    Fabric {
        name: "fabric", kind: Instant, state: Unhealthy,
        action: RestartFm, clears: Evidence, condition: Some(fabric_failed),
        source: "NVIDIA Fabric Manager user guide (GPU fabric registration)",
    }
    NvlinkNonfatal {
        name: "nvlink_nonfatal", kind: Rate, state: Degraded, action: WorkflowNvlink5Err,
        clears: QuietPeriod, condition: None,
        source: "NVIDIA XID 144-150 decode (Fatal/Nonfatal); NVSentinel health-events-analyzer (repeats)",
    }
    FatalRepeats {
        name: "fatal_repeats", kind: Window, state: Unhealthy, action: ContactSupport,
        clears: Replacement, condition: None,
        source: "NVSentinel health-events-analyzer (a fatal XID repeated on one GPU in 24 h)",
    }
    HangSuspect {
        name: "hang_suspect", kind: Window, state: Degraded, action: CheckWorkload,
        clears: Evidence, condition: None,
        source: "scitix/sichek (GPU hang: SM busy, low power, no memory traffic for 60 s)",
    }
    SmClockStuckLow {
        name: "sm_clock_stuck_low", kind: Window, state: Degraded, action: ResetGpu,
        clears: Evidence, condition: None,
        source: "scitix/sichek (SM clock stuck low for 15 min); DCGM 4.5 diag (clocks against peers)",
    }
    Vanished {
        name: "vanished", kind: Window, state: Unhealthy,
        action: RestartBm, clears: Evidence, condition: None,
        source: "AKS GPUMissing, gpud (expected GPU count)",
    }
}

/// Rules on trial (`--rules-shadow`): their findings are judged and recorded as reasons marked
/// `shadow`, and change no state, alert or action (NVSentinel's store-only mode). A set of rows
/// of [`RULES`], so the engine's settings stay `Copy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shadow(u64);

impl Shadow {
    /// `fabric,nvlink_nonfatal`: names of [`RULES`]; an unknown one is an error that lists them.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut bits = 0u64;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some(i) = RULES.iter().position(|r| r.name == name) else {
                return Err(format!(
                    "unknown rule {name:?}; rules: {}",
                    RULES.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
                ));
            };
            bits |= 1 << i;
        }
        Ok(Self(bits))
    }

    /// Whether the rule of this `HealthReason.rule` is on trial.
    pub fn contains(self, rule: &str) -> bool {
        RULES
            .iter()
            .position(|r| r.name == rule)
            .is_some_and(|i| self.0 & (1 << i) != 0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl SampleRule {
    /// Its row of [`RULES`].
    pub fn rule(self) -> &'static Rule {
        // The table has one row per variant (a test holds them so), so the fallback is unreachable.
        RULES.iter().find(|r| r.id == self).unwrap_or(&RULES[0])
    }

    pub fn name(self) -> &'static str {
        self.rule().name
    }

    pub fn from_name(s: &str) -> Option<Self> {
        RULES.iter().find(|r| r.name == s).map(|r| r.id)
    }

    pub fn verdict(self) -> Verdict {
        self.rule().verdict()
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
    /// Nonfatal NVLink5 XIDs (144-150 printed `Nonfatal`) on one GPU within
    /// [`NVLINK_NONFATAL_WINDOW_NS`] that make it degraded; fewer change nothing.
    pub nvlink_nonfatal_count: u32,
    /// Hang suspect: SM utilisation at least this, ...
    pub hang_util_pct: u32,
    /// ... power at most this share of the limit, ...
    pub hang_power_share: f64,
    /// ... the memory controller at most this busy, ...
    pub hang_mem_util_pct: u32,
    /// ... for this long (ns).
    pub hang_after_ns: i128,
    /// SM clock stuck low: busy at least this, ...
    pub clock_busy_util_pct: u32,
    /// ... the SM clock under this share of the highest this GPU has run at, not explained by a
    /// power or thermal clock event, ...
    pub clock_low_share: f64,
    /// ... for this long (ns).
    pub clock_low_after_ns: i128,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            nvlink_errors_per_min: 60.0,
            thermal_share: 0.5,
            power_share: 0.9,
            nvlink_nonfatal_count: 3,
            hang_util_pct: 95,
            hang_power_share: 0.30,
            hang_mem_util_pct: 1,
            hang_after_ns: 60 * 1_000_000_000,
            clock_busy_util_pct: 80,
            clock_low_share: 0.5,
            clock_low_after_ns: 15 * 60 * 1_000_000_000,
        }
    }
}

/// Fatal XIDs on one GPU within [`FATAL_XIDS_WINDOW_NS`] that escalate it to hardware
/// inspection whatever their codes (NVSentinel's health-events-analyzer: a fatal XID repeated
/// on one GPU points at the hardware).
pub const FATAL_XIDS_ESCALATE: usize = 5;
/// 24 hours.
pub const FATAL_XIDS_WINDOW_NS: i128 = 24 * 3600 * 1_000_000_000;

/// The window in which repeated nonfatal NVLink5 XIDs count (10 minutes).
pub const NVLINK_NONFATAL_WINDOW_NS: i128 = 10 * 60_000_000_000;

/// Most `--health-nvlink-nonfatal` may be (the per-GPU memory of times is that long).
pub const MAX_NVLINK_NONFATAL_COUNT: u32 = 100;

/// NVLink5 XIDs carry their own `Fatal` / `Nonfatal` word (NVIDIA's "XID 144-150 decode").
pub fn is_nvlink5(code: u32) -> bool {
    (144..=150).contains(&code)
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
/// what showed each: every [`Kind::Instant`] rule of the table, in its order.
pub fn sample_conditions(s: &v1::GpuSample) -> Vec<(SampleRule, String)> {
    RULES
        .iter()
        .filter_map(|r| Some((r.id, r.condition?(s)?)))
        .collect()
}

fn lost(s: &v1::GpuSample) -> Option<String> {
    is_lost(s).map(|e| format!("NVML: {e}"))
}

fn remap_failure(s: &v1::GpuSample) -> Option<String> {
    let r = s.row_remap.as_ref().filter(|r| r.failure)?;
    Some(format!(
        "row_remap.failure = true ({} uncorrectable rows)",
        r.uncorrectable
    ))
}

fn remap_pending(s: &v1::GpuSample) -> Option<String> {
    let r = s.row_remap.as_ref().filter(|r| r.pending)?;
    Some(format!(
        "row_remap.pending = true ({} uncorrectable rows)",
        r.uncorrectable
    ))
}

fn pages_pending(s: &v1::GpuSample) -> Option<String> {
    s.retired_pages
        .as_ref()
        .filter(|p| p.pending)
        .map(|_| "retired_pages.pending = true".to_string())
}

fn pages_limit(s: &v1::GpuSample) -> Option<String> {
    let p = s.retired_pages.as_ref()?;
    let total = p.single_bit.saturating_add(p.double_bit);
    (total >= RETIRED_PAGES_LIMIT).then(|| {
        format!(
            "{total} retired pages ({} single-bit, {} double-bit), limit {RETIRED_PAGES_LIMIT}",
            p.single_bit, p.double_bit
        )
    })
}

fn fabric_failed(s: &v1::GpuSample) -> Option<String> {
    let f = s.fabric.as_ref()?;
    (f.state == "completed" && f.status != "success")
        .then(|| format!("NVSwitch fabric registration failed: {}", f.status))
}

/// NVML clock-event bits that explain low clocks by power or heat (SW power cap, HW slowdown,
/// SW and HW thermal slowdown, HW power brake): the violation rules judge those.
const EXPLAINED_CLOCK_EVENTS: u64 = 0x4 | 0x8 | 0x20 | 0x40 | 0x80;

/// The hang-suspect condition in one sample (it must hold for `hang_after_ns` to fire), with its
/// readings as evidence. Every reading is needed: a missing one never suggests a hang.
pub fn hang_reading(s: &v1::GpuSample, th: &Thresholds) -> Option<String> {
    let util = s.gpu_util_pct?;
    let (power, limit) = (s.power_mw?, s.power_limit_mw?);
    let mem = s.mem_util_pct?;
    let share = f64::from(power) / f64::from(limit.max(1));
    (util >= th.hang_util_pct && share <= th.hang_power_share && mem <= th.hang_mem_util_pct).then(
        || {
            format!(
                "SM busy {util} %, power {} W of {} W ({:.0} %), memory controller {mem} %",
                power / 1000,
                limit / 1000,
                share * 100.0
            )
        },
    )
}

/// The clock-stuck-low condition in one sample, against the highest SM clock this GPU has run at.
pub fn clock_low_reading(s: &v1::GpuSample, max_sm_clock: u32, th: &Thresholds) -> Option<String> {
    let (util, clock) = (s.gpu_util_pct?, s.sm_clock_mhz?);
    let explained = s.throttle_reasons.unwrap_or(0) & EXPLAINED_CLOCK_EVENTS != 0;
    (util >= th.clock_busy_util_pct
        && max_sm_clock > 0
        && f64::from(clock) < th.clock_low_share * f64::from(max_sm_clock)
        && !explained)
        .then(|| {
            format!(
                "SM clock {clock} MHz at {util} % busy, under {:.0} % of the {max_sm_clock} MHz this GPU ran at, no power or thermal clock event",
                th.clock_low_share * 100.0
            )
        })
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
    use gpulse_proto::names::ShortName as _;

    use super::*;

    #[test]
    fn xid_actions_follow_the_catalog() {
        let s = |code, pid| xid(code, None, pid).map(|v| (v.state, v.action, v.clears));
        assert_eq!(
            s(79, false),
            Some((HealthState::Unhealthy, Action::RestartBm, Clears::Reboot))
        );
        assert_eq!(
            s(13, true),
            Some((
                HealthState::Degraded,
                Action::RestartApp,
                Clears::ProcessExit
            ))
        );
        assert_eq!(
            s(13, false),
            Some((
                HealthState::Degraded,
                Action::RestartApp,
                Clears::QuietPeriod
            ))
        );
        assert_eq!(
            s(48, false),
            Some((
                HealthState::Unhealthy,
                Action::ResetGpu,
                Clears::ResetOrReboot
            ))
        );
        assert_eq!(
            s(95, false),
            Some((
                HealthState::Unhealthy,
                Action::ResetGpu,
                Clears::ResetOrReboot
            ))
        );
        assert_eq!(
            s(74, false),
            Some((
                HealthState::Unhealthy,
                Action::WorkflowNvlinkErr,
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
            Some(Action::RestartBm)
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
        for r in RULES {
            assert_eq!(SampleRule::from_name(r.name), Some(r.id));
            assert_eq!(r.id.rule().name, r.name, "one row per rule");
            assert_eq!(
                r.condition.is_some(),
                r.kind == Kind::Instant,
                "{}: an instant rule carries its condition, no other does",
                r.name
            );
        }
    }

    /// docs/gpu-health.md's rules table says what the code does: each sample rule has its row
    /// with the table's kind, state, action and source, and no row names a rule the code lacks.
    #[test]
    fn the_documented_rules_are_the_table() {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/gpu-health.md"),
        )
        .unwrap();
        let section = doc
            .split_once("\n## Rules")
            .and_then(|(_, rest)| rest.split("\n## ").next())
            .expect("docs/gpu-health.md has a Rules section");
        let rows: Vec<Vec<&str>> = section
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.split('|').map(str::trim).collect())
            .collect();
        for r in RULES {
            let name = format!("`{}`", r.name);
            let row = rows
                .iter()
                .find(|c| c[1] == name)
                .unwrap_or_else(|| panic!("docs/gpu-health.md has no row for {}", r.name));
            // | rule | kind | evidence | state | action | clears on | source |
            assert_eq!(row[2], r.kind.name(), "{} kind", r.name);
            assert_eq!(
                row[4],
                HealthState::name_of(r.state as i32),
                "{} state",
                r.name
            );
            assert_eq!(row[5], r.action.name(), "{} action", r.name);
            assert_eq!(row[7], r.source, "{} source", r.name);
        }
        for row in &rows {
            let rule = row[1].trim_matches('`');
            let known = rule == "xid"
                || row[1].starts_with("`xid`")
                || SampleRule::from_name(rule).is_some();
            assert!(
                known,
                "docs/gpu-health.md documents {rule}, which the code lacks"
            );
        }
    }
}
