//! One GPU's verdict: its reasons, each with evidence, NVIDIA's action and what clears it; the
//! XID history that escalates across reboots; the counters that reveal resets and rates.
use std::hash::{Hash, Hasher};

use gpulse_proto::{
    answer::health_rank,
    names::ShortName,
    time as ptime,
    v1::{self, HealthState},
};

use super::{
    Config,
    rules::{self, Clears, SampleRule, Shadow, Verdict},
};

/// Evidence kept per reason (the newest).
const MAX_EVIDENCE: usize = 8;
/// Reasons kept per GPU.
const MAX_REASONS: usize = 32;
/// XID codes remembered per GPU for escalation.
const MAX_HISTORY: usize = 32;

/// The counters of one sample that reveal resets and rates.
#[derive(Clone, Copy, Debug, Default)]
struct Reading {
    t: i128,
    ecc_unc: Option<u64>,
    energy: Option<u64>,
    thermal: Option<u64>,
    power: Option<u64>,
    nvlink: Option<u64>,
}

impl Reading {
    fn of(s: &v1::GpuSample, t: i128) -> Self {
        Self {
            t,
            ecc_unc: s.ecc_uncorrected_volatile,
            energy: s.energy_mj,
            thermal: s.thermal_violation_ns,
            power: s.power_violation_ns,
            nvlink: rules::nvlink_total(s),
        }
    }

    /// A counter that only grows while the GPU runs went down: the GPU was reset (or its driver
    /// reloaded), which starts volatile counters over.
    fn reset_since(&self, before: &Reading) -> Option<String> {
        let back = |name: &str, a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if b < a => Some(format!("{name} {a} -> {b}")),
            _ => None,
        };
        back("volatile uncorrectable ECC", before.ecc_unc, self.ecc_unc)
            .or_else(|| back("energy counter (mJ)", before.energy, self.energy))
    }
}

/// A reason's identity within a GPU: the rule, and for XIDs the code and process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReasonKey<'a> {
    pub rule: &'a str,
    pub xid: Option<u32>,
    pub pid: Option<u32>,
}

fn key_of(r: &v1::HealthReason) -> ReasonKey<'_> {
    ReasonKey {
        rule: &r.rule,
        xid: r.xid,
        pid: r.pid,
    }
}

fn ts(t: i128) -> Option<prost_types::Timestamp> {
    Some(ptime::from_unix_nanos(t))
}

fn ns(t: &Option<prost_types::Timestamp>) -> i128 {
    t.as_ref().map_or(0, ptime::to_unix_nanos)
}

/// What one piece of evidence was.
pub struct Seen<'a> {
    pub t: i128,
    pub cursor: u64,
    pub kind: &'a str,
    pub detail: String,
}

impl Seen<'_> {
    fn evidence(&self) -> v1::HealthEvidence {
        v1::HealthEvidence {
            cursor: self.cursor,
            time: ts(self.t),
            kind: self.kind.to_string(),
            detail: clip(&self.detail),
        }
    }
}

/// Longest evidence detail or reason summary kept. The evidence's cursor leads to the whole
/// event; a verdict restates, and with 32 reasons of 8 evidence each it stays ~200 KiB at
/// most (issue 27 #7: 249 XIDs with 256 KiB messages made one 62 MiB verdict event).
pub const MAX_DETAIL: usize = 512;

/// `s` cut to [`MAX_DETAIL`] bytes at a character boundary, marked with an ellipsis when cut.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_DETAIL {
        return s.to_string();
    }
    let mut end = MAX_DETAIL - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[derive(Clone, Debug, Default)]
pub struct GpuEntry {
    pub rec: v1::GpuHealthRecord,
    /// The record's signature when it was last written as a gpu_health event.
    pub written: u64,
    last: Option<Reading>,
    /// Where the current rate window started.
    window: Option<Reading>,
    /// Reasons dropped because the GPU had [`MAX_REASONS`] already.
    pub dropped_reasons: u64,
    /// When the latest nonfatal NVLink5 XIDs came (at most the threshold's count).
    nonfatal: std::collections::VecDeque<i128>,
    /// Since when the hang-suspect condition holds without a break.
    hang_since: Option<i128>,
    /// Since when the SM clock is stuck low without a break.
    low_clock_since: Option<i128>,
    /// The highest SM clock this GPU has run at (since this collector judged it).
    max_sm_clock: u32,
}

impl GpuEntry {
    pub fn new(node: &str, pci: &str, boot_id: &str) -> Self {
        let mut rec = v1::GpuHealthRecord {
            node: node.to_string(),
            pci: pci.to_string(),
            boot_id: boot_id.to_string(),
            state: HealthState::Healthy as i32,
            ..Default::default()
        };
        rec.state = HealthState::Healthy as i32;
        Self {
            rec,
            ..Default::default()
        }
    }

    /// A restarted collector resumes from the record a gpu_health event carried.
    pub fn restored(rec: v1::GpuHealthRecord) -> Self {
        let mut e = Self {
            rec,
            ..Default::default()
        };
        e.written = e.signature();
        e
    }

    /// What a gpu_health event must be written for: state, reasons and how far each is from
    /// clearing, escalation history, identity and boot. Not evidence or counts (an XID storm
    /// adds evidence without writing an event per XID).
    pub fn signature(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let r = &self.rec;
        (r.state, &r.gpu_uuid, &r.boot_id).hash(&mut h);
        for x in &r.reasons {
            (
                &x.rule,
                x.xid,
                x.pid,
                &x.action,
                x.escalated,
                x.clearing,
                x.state,
            )
                .hash(&mut h);
        }
        for x in &r.xid_history {
            (x.code, x.reboots).hash(&mut h);
        }
        h.finish()
    }

    fn reason_mut(&mut self, k: ReasonKey<'_>) -> Option<&mut v1::HealthReason> {
        self.rec.reasons.iter_mut().find(|r| key_of(r) == k)
    }

    /// A rule fired: a new reason, or more evidence for the one it had (which stops clearing).
    fn fired(&mut self, k: ReasonKey<'_>, v: Verdict, summary: String, seen: &Seen<'_>) {
        if let Some(r) = self.reason_mut(k) {
            r.last = ts(seen.t);
            r.occurrences += 1;
            r.summary = clip(&summary);
            r.state = v.state as i32;
            r.action = v.action.name().to_string();
            r.clears_on = v.clears.name().to_string();
            r.clearing = false;
            r.clean_samples = 0;
            if r.evidence.len() >= MAX_EVIDENCE {
                r.evidence.remove(0);
            }
            r.evidence.push(seen.evidence());
            return;
        }
        if self.rec.reasons.len() >= MAX_REASONS {
            // The least severe, oldest reason makes room.
            if let Some(i) = (0..self.rec.reasons.len()).min_by_key(|&i| {
                (
                    health_rank(self.rec.reasons[i].state),
                    ns(&self.rec.reasons[i].last),
                )
            }) {
                self.rec.reasons.remove(i);
                self.dropped_reasons += 1;
            }
        }
        self.rec.reasons.push(v1::HealthReason {
            rule: k.rule.to_string(),
            state: v.state as i32,
            action: v.action.name().to_string(),
            summary: clip(&summary),
            xid: k.xid,
            since: ts(seen.t),
            last: ts(seen.t),
            occurrences: 1,
            clears_on: v.clears.name().to_string(),
            evidence: vec![seen.evidence()],
            pid: k.pid,
            ..Default::default()
        });
    }

    /// A nonfatal NVLink5 XID: the link recovered by itself. One does not condemn the GPU (it
    /// used to make it unhealthy); `nvlink_nonfatal_count` of them within
    /// [`rules::NVLINK_NONFATAL_WINDOW_NS`] make it degraded, and each later one keeps it so.
    fn nvlink_nonfatal(&mut self, x: &v1::Xid, seen: &Seen<'_>, cfg: &Config) {
        let n = x.records();
        if n == 0 {
            return; // a storm's end: its records were counted as they came
        }
        let count = cfg
            .thresholds
            .nvlink_nonfatal_count
            .clamp(1, rules::MAX_NVLINK_NONFATAL_COUNT) as usize;
        for _ in 0..n.min(count as u64) {
            self.nonfatal.push_back(seen.t);
        }
        while self.nonfatal.len() > count {
            self.nonfatal.pop_front();
        }
        let repeated = self.nonfatal.len() >= count
            && self
                .nonfatal
                .front()
                .is_some_and(|first| seen.t - first <= rules::NVLINK_NONFATAL_WINDOW_NS);
        let rule = SampleRule::NvlinkNonfatal;
        let known = self
            .reason_mut(ReasonKey {
                rule: rule.name(),
                xid: None,
                pid: None,
            })
            .is_some();
        if repeated || known {
            let unit = x.nvlink.as_ref().map_or("", |d| d.unit.as_str());
            let summary = format!(
                "nonfatal NVLink5 XIDs repeating ({count} within {} min; latest XID {} {unit})",
                rules::NVLINK_NONFATAL_WINDOW_NS / 60_000_000_000,
                x.code
            );
            self.fire_rule(rule, rule.verdict(), summary, seen);
        }
    }

    /// An XID on this GPU; `severity` is its event's (the agent's policy).
    pub fn xid(&mut self, x: &v1::Xid, severity: i32, seen: &Seen<'_>, cfg: &Config) {
        if rules::is_nvlink5(x.code) && x.nvlink.as_ref().is_some_and(|d| !d.fatal) {
            self.nvlink_nonfatal(x, seen, cfg);
            return;
        }
        let Some(mut v) = rules::xid(x.code, x.recovery_action.as_ref(), x.pid.is_some()) else {
            return;
        };
        let reboots = self.recur(x.code, seen.t);
        let after_reboots = matches!(v.clears, Clears::Reboot | Clears::ResetOrReboot)
            && reboots >= cfg.escalate_after_reboots;
        let fatal_in_window = if severity >= v1::Severity::Fatal as i32 {
            self.note_fatal(seen.t, x.records())
        } else {
            0
        };
        let escalates = after_reboots;
        let name = if x.mnemonic.is_empty() {
            String::new()
        } else {
            format!(" {}", x.mnemonic)
        };
        let summary = if escalates {
            v = Verdict {
                state: HealthState::Unhealthy,
                action: rules::ESCALATED_ACTION,
                clears: Clears::Replacement,
            };
            format!(
                "XID {}{name} came back after {reboots} reboots: hardware inspection",
                x.code
            )
        } else {
            format!("XID {}{name}", x.code)
        };
        let pid = (v.clears == Clears::ProcessExit).then_some(x.pid).flatten();
        if x.records() == 0 {
            return; // a storm's end: its records were judged as they were counted
        }
        self.fired(
            ReasonKey {
                rule: "xid",
                xid: Some(x.code),
                pid,
            },
            v,
            summary,
            seen,
        );
        if let Some(r) = self.reason_mut(ReasonKey {
            rule: "xid",
            xid: Some(x.code),
            pid,
        }) {
            r.escalated |= escalates;
            r.severity = r.severity.max(severity);
            // A storm summary stands for more than one occurrence.
            r.occurrences += x.records().saturating_sub(1);
            if let Some(p) = &x.pod {
                r.pod = format!("{}/{}", p.namespace, p.name);
            }
        }
        if fatal_in_window >= rules::FATAL_XIDS_ESCALATE {
            // A reason of its own (a row of the rule table), so it can be put on trial with
            // --rules-shadow before it takes GPUs out of service.
            let rule = SampleRule::FatalRepeats;
            let summary = format!(
                "{fatal_in_window} fatal XIDs on this GPU within 24 h (latest XID {}{name}): hardware inspection",
                x.code
            );
            self.fire_rule(rule, rule.verdict(), summary, seen);
            if let Some(r) = self.reason_mut(ReasonKey {
                rule: rule.name(),
                xid: None,
                pid: None,
            }) {
                r.escalated = true;
            }
        }
    }

    /// Notes `records` fatal XIDs at `t` (the latest [`rules::FATAL_XIDS_ESCALATE`] are kept in
    /// the record, so a restart remembers them); returns how many lie within 24 h of `t`.
    fn note_fatal(&mut self, t: i128, records: u64) -> usize {
        let keep = rules::FATAL_XIDS_ESCALATE;
        let times = &mut self.rec.recent_fatal_xids;
        for _ in 0..records.min(keep as u64) {
            times.push(ptime::from_unix_nanos(t));
        }
        if times.len() > keep {
            let extra = times.len() - keep;
            times.drain(..extra);
        }
        times
            .iter()
            .filter(|x| t - ptime::to_unix_nanos(x) <= rules::FATAL_XIDS_WINDOW_NS)
            .count()
    }

    /// Notes an XID in the history; returns the reboots since its first occurrence.
    fn recur(&mut self, code: u32, t: i128) -> u32 {
        if let Some(h) = self.rec.xid_history.iter_mut().find(|h| h.code == code) {
            h.last = ts(t);
            return h.reboots;
        }
        if self.rec.xid_history.len() >= MAX_HISTORY
            && let Some(i) =
                (0..self.rec.xid_history.len()).min_by_key(|&i| ns(&self.rec.xid_history[i].last))
        {
            self.rec.xid_history.remove(i);
        }
        self.rec.xid_history.push(v1::XidRecurrence {
            code,
            first: ts(t),
            last: ts(t),
            reboots: 0,
        });
        0
    }

    /// The node rebooted: processes are gone, reboot-cleared reasons start counting clean
    /// samples, every remembered XID is one reboot older.
    pub fn reboot(&mut self, boot_id: &str) {
        self.rec.boot_id = boot_id.to_string();
        for h in &mut self.rec.xid_history {
            h.reboots = h.reboots.saturating_add(1);
        }
        self.rec.reasons.retain(|r| {
            !matches!(
                Clears::from_name(&r.clears_on),
                Clears::ProcessExit | Clears::QuietPeriod
            )
        });
        for r in &mut self.rec.reasons {
            if matches!(
                Clears::from_name(&r.clears_on),
                Clears::Reboot | Clears::ResetOrReboot
            ) {
                r.clearing = true;
                r.clean_samples = 0;
            }
        }
        // Counters start over with the driver: no reset evidence or rate across a reboot.
        self.last = None;
        self.window = None;
    }

    /// The GPU was reset: reset-cleared reasons start counting clean samples.
    fn reset(&mut self, detail: &str) {
        for r in &mut self.rec.reasons {
            if Clears::from_name(&r.clears_on) == Clears::ResetOrReboot && !r.clearing {
                r.clearing = true;
                r.clean_samples = 0;
                if r.evidence.len() >= MAX_EVIDENCE {
                    r.evidence.remove(0);
                }
                r.evidence.push(v1::HealthEvidence {
                    kind: "gpu_sample".into(),
                    detail: format!("GPU reset seen: {detail}"),
                    ..Default::default()
                });
            }
        }
        self.window = None;
    }

    /// A process of this node exited: the application XIDs it caused are over.
    pub fn process_exit(&mut self, pid: u32) {
        self.rec.reasons.retain(|r| {
            !(Clears::from_name(&r.clears_on) == Clears::ProcessExit && r.pid == Some(pid))
        });
    }

    /// A different GPU sits at this address: the old one's reasons and history leave with it.
    fn replaced(&mut self, uuid: &str) {
        self.rec.reasons.clear();
        self.rec.xid_history.clear();
        self.rec.gpu_uuid = uuid.to_string();
        self.last = None;
        self.window = None;
    }

    /// This GPU stopped sampling while another GPU of its node goes on.
    pub fn vanished(&mut self, seen: &Seen<'_>) {
        let k = ReasonKey {
            rule: SampleRule::Vanished.name(),
            xid: None,
            pid: None,
        };
        if self.reason_mut(k).is_some_and(|r| !r.clearing) {
            return; // already judged; evidence would only repeat
        }
        self.fired(
            k,
            SampleRule::Vanished.verdict(),
            "GPU stopped answering NVML while the node's other GPUs go on".into(),
            seen,
        );
    }

    /// One NVML sample of this GPU.
    pub fn sample(&mut self, s: &v1::GpuSample, seen: &Seen<'_>, cfg: &Config) {
        if !s.uuid.is_empty() {
            if !self.rec.gpu_uuid.is_empty() && self.rec.gpu_uuid != s.uuid {
                self.replaced(&s.uuid);
            }
            self.rec.gpu_uuid.clone_from(&s.uuid);
        }
        self.rec.index = Some(s.index);
        if !s.name.is_empty() && self.rec.model != s.name {
            self.rec.model.clone_from(&s.name);
        }
        self.rec.last_sample = ts(seen.t);
        let now = Reading::of(s, seen.t);
        if let Some(before) = self.last {
            if let Some(detail) = now.reset_since(&before) {
                self.reset(&detail);
            } else if let (Some(a), Some(b)) = (before.ecc_unc, now.ecc_unc)
                && b > a
            {
                let ev = Seen {
                    detail: format!("volatile uncorrectable ECC errors {a} -> {b}"),
                    kind: "gpu_sample",
                    ..*seen
                };
                let v = SampleRule::UncorrectableEcc.verdict();
                self.fire_rule(
                    SampleRule::UncorrectableEcc,
                    v,
                    format!("{b} uncorrectable ECC errors"),
                    &ev,
                );
            }
        }
        let conds = rules::sample_conditions(s);
        for (rule, detail) in &conds {
            let ev = Seen {
                detail: detail.clone(),
                kind: "gpu_sample",
                ..*seen
            };
            self.fire_rule(*rule, rule.verdict(), detail.clone(), &ev);
        }
        self.rate_rules(now, seen, cfg);
        let holding = self.window_rules(s, seen, cfg);
        // Instant and window rules whose condition is gone, and a vanished GPU that answers
        // again, start clearing.
        for r in &mut self.rec.reasons {
            let Some(rule) = SampleRule::from_name(&r.rule) else {
                continue;
            };
            if rule.rule().clears_when_absent()
                && !r.clearing
                && !conds.iter().any(|(c, _)| *c == rule)
                && !holding.contains(&rule)
            {
                r.clearing = true;
                r.clean_samples = 0;
            }
        }
        self.count_clean(s, &conds, seen.t, cfg);
        self.last = Some(now);
    }

    /// Conditions that must hold without a break for a while (a hang suspect for a minute, a
    /// clock stuck low for 15): fired once they have; returns the rules whose condition holds
    /// in this sample (fired or not yet), so their reasons do not start clearing.
    fn window_rules(
        &mut self,
        s: &v1::GpuSample,
        seen: &Seen<'_>,
        cfg: &Config,
    ) -> Vec<SampleRule> {
        let th = cfg.thresholds;
        // Judged against the clocks seen before this sample.
        let low = rules::clock_low_reading(s, self.max_sm_clock, &th);
        if let Some(c) = s.sm_clock_mhz {
            self.max_sm_clock = self.max_sm_clock.max(c);
        }
        let hang = rules::hang_reading(s, &th);
        let mut holding = Vec::new();
        let mut due = Vec::new();
        for (rule, reading, after, since) in [
            (
                SampleRule::HangSuspect,
                hang,
                th.hang_after_ns,
                &mut self.hang_since,
            ),
            (
                SampleRule::SmClockStuckLow,
                low,
                th.clock_low_after_ns,
                &mut self.low_clock_since,
            ),
        ] {
            match reading {
                Some(detail) => {
                    let start = *since.get_or_insert(seen.t);
                    holding.push(rule);
                    if seen.t - start >= after {
                        due.push((rule, detail, seen.t - start));
                    }
                }
                None => *since = None,
            }
        }
        for (rule, detail, held) in due {
            let summary = format!("{detail}, for {} s", held / 1_000_000_000);
            let ev = Seen {
                detail: summary.clone(),
                kind: "gpu_sample",
                ..*seen
            };
            self.fire_rule(rule, rule.verdict(), summary, &ev);
        }
        holding
    }

    fn fire_rule(&mut self, rule: SampleRule, v: Verdict, summary: String, seen: &Seen<'_>) {
        self.fired(
            ReasonKey {
                rule: rule.name(),
                xid: None,
                pid: None,
            },
            v,
            summary,
            seen,
        );
    }

    /// NVLink error rate and violation shares, judged once per window of a minute or more.
    fn rate_rules(&mut self, now: Reading, seen: &Seen<'_>, cfg: &Config) {
        let Some(start) = self.window else {
            self.window = Some(now);
            return;
        };
        let span = now.t - start.t;
        if span < rules::RATE_WINDOW_NS {
            return;
        }
        self.window = Some(now);
        let minutes = span as f64 / 60e9;
        let th = cfg.thresholds;
        let delta = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if b >= a => Some((b - a) as f64),
            _ => None,
        };
        let judged = [
            (
                SampleRule::NvlinkErrors,
                delta(start.nvlink, now.nvlink).map(|d| d / minutes),
                th.nvlink_errors_per_min,
                "NVLink errors per minute",
            ),
            (
                SampleRule::ThermalViolation,
                delta(start.thermal, now.thermal).map(|d| d / span as f64),
                th.thermal_share,
                "share of time held down by thermal limits",
            ),
            (
                SampleRule::PowerViolation,
                delta(start.power, now.power).map(|d| d / span as f64),
                th.power_share,
                "share of time held down by the power limit",
            ),
        ];
        for (rule, value, limit, what) in judged {
            let Some(value) = value else { continue };
            if value >= limit {
                let detail = format!("{what}: {value:.2} over {minutes:.1} min (limit {limit})");
                let ev = Seen {
                    detail: detail.clone(),
                    kind: "gpu_sample",
                    ..*seen
                };
                self.fire_rule(rule, rule.verdict(), detail, &ev);
            } else if let Some(r) = self.reason_mut(ReasonKey {
                rule: rule.name(),
                xid: None,
                pid: None,
            }) && !r.clearing
            {
                r.clearing = true;
                r.clean_samples = 0;
            }
        }
    }

    /// Counts clean samples for the reasons that are clearing; removes those with enough. A
    /// clean sample: the GPU answered and shows no unhealthy condition.
    fn count_clean(
        &mut self,
        s: &v1::GpuSample,
        conds: &[(SampleRule, String)],
        t: i128,
        cfg: &Config,
    ) {
        // A rule on trial changes nothing, the clearing of other reasons included.
        let clean = rules::is_lost(s).is_none()
            && conds.iter().all(|(r, _)| {
                r.verdict().state != HealthState::Unhealthy || cfg.shadow.contains(r.name())
            });
        for r in &mut self.rec.reasons {
            if Clears::from_name(&r.clears_on) == Clears::QuietPeriod
                && !r.clearing
                && clean
                && t - ns(&r.last) >= cfg.quiet_period.as_nanos() as i128
            {
                r.clearing = true;
                r.clean_samples = 0;
            }
            if r.clearing {
                // A reading's own reason needs samples without that reading (it would have
                // fired again otherwise); the others need samples without any problem.
                let ok = clean || Clears::from_name(&r.clears_on) == Clears::Evidence;
                r.clean_samples = if ok { r.clean_samples + 1 } else { 0 };
            }
        }
        let need = cfg.clean_samples;
        self.rec
            .reasons
            .retain(|r| !(r.clearing && r.clean_samples >= need));
    }

    /// The state from the reasons (worst wins; none: healthy), reasons worst first.
    pub fn settle(&mut self, t: i128, shadow: Shadow) {
        for r in &mut self.rec.reasons {
            r.shadow = shadow.contains(&r.rule);
        }
        // Rules on trial last: the state is the worst of the others.
        self.rec.reasons.sort_by_key(|r| {
            (
                r.shadow,
                std::cmp::Reverse(health_rank(r.state)),
                ns(&r.since),
            )
        });
        let state = self
            .rec
            .reasons
            .iter()
            .find(|r| !r.shadow)
            .map_or(HealthState::Healthy as i32, |r| r.state);
        if state != self.rec.state || self.rec.since.is_none() {
            self.rec.state = state;
            self.rec.since = ts(t);
        }
        self.rec.updated = ts(t);
    }

    /// The state shown now: a healthy verdict without a recent sample is unknown (the evidence
    /// of a problem stands without new samples; the evidence of health does not).
    pub fn state_at(&self, now: i128, cfg: &Config) -> HealthState {
        let state = HealthState::try_from(self.rec.state).unwrap_or_default();
        if state == HealthState::Healthy
            && self
                .rec
                .last_sample
                .as_ref()
                .is_none_or(|t| now - ptime::to_unix_nanos(t) > cfg.stale_after.as_nanos() as i128)
        {
            return HealthState::Unknown;
        }
        state
    }

    /// "healthy -> unhealthy: XID 79 ROBUST_CHANNEL_... (RESTART_BM)".
    pub fn change_line(&self, previous: i32) -> String {
        let now = HealthState::name_of(self.rec.state);
        let why = self.rec.reasons.iter().find(|r| !r.shadow).map_or_else(
            || "no reasons left".to_string(),
            |r| {
                let clearing = if r.clearing { ", clearing" } else { "" };
                format!("{} ({}{clearing})", r.summary, r.action)
            },
        );
        format!("{} -> {now}: {why}", HealthState::name_of(previous))
    }
}
