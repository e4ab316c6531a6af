//! The renderings of an event that every client shares: one JSON object (`gpulse tail --json`
//! and other machine readers) and one line of text (`gpulse tail`, MCP rows).
//!
//! JSON shape: envelope fields at the top (`cursor`, `seq`, `time`, `received`, `node`, `agent_id`,
//! `kind`, `severity`) and the payload under its kind's name (`xid`, `sxid`, `driver_log`,
//! `agent_status`, `gap`). Absent optional values are `null`, never zero.
use crate::{
    names::ShortName,
    time::{self as ptime, rfc3339},
    v1::{
        self, AgentState, Aggregation, EventKind, GapStage, GroupBy, HealthState, ProcessEventType,
        RecordSource, Severity, Tier, UpstreamState, event::Payload,
    },
};
use serde_json::{Value, json};

fn pod(p: Option<&v1::PodRef>) -> Value {
    match p {
        Some(p) => json!({"namespace": p.namespace, "name": p.name, "uid": p.uid,
                          "container": opt_str(&p.container), "container_id": opt_str(&p.container_id)}),
        None => Value::Null,
    }
}

fn opt_str(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

fn source_name(s: i32) -> &'static str {
    RecordSource::name_of(s)
}

fn severity_name(s: i32) -> &'static str {
    Severity::name_of(s)
}

pub fn event(ev: &v1::Event) -> Value {
    let mut obj = json!({
        "cursor": ev.cursor,
        "seq": ev.seq,
        "time": ev.time.as_ref().map(rfc3339),
        "received": ev.received.as_ref().map(rfc3339),
        "backlog": ev.backlog,
        "node": ev.node,
        "agent_id": ev.agent_id,
        "kind": EventKind::name_of(ev.kind),
        "severity": severity_name(ev.severity),
    });
    let (key, body) = match &ev.payload {
        Some(Payload::Xid(x)) => (
            "xid",
            json!({
                "code": x.code,
                "pci": opt_str(&x.pci),
                "pci_raw": opt_str(&x.pci_raw),
                "gpu_uuid": opt_str(&x.gpu_uuid),
                "pid": x.pid,
                "process_name": opt_str(&x.process_name),
                "channel": x.channel,
                "message": x.message,
                "mnemonic": opt_str(&x.mnemonic),
                "description": x.description,
                "severity": severity_name(ev.severity),
                "immediate_action": opt_str(&x.immediate_action),
                "investigatory_action": opt_str(&x.investigatory_action),
                "caused_by": x.caused_by,
                "recovery_action": x.recovery_action.as_ref().map(|r| json!({"from": r.from, "from_name": r.from_name, "to": r.to, "to_name": r.to_name})),
                "nvlink": x.nvlink.as_ref().map(|n| json!({
                    "unit": n.unit, "fatal": n.fatal, "xc": opt_str(&n.xc), "instance": n.instance, "link": n.link,
                    "words": n.words, "intrinfo": n.intrinfo, "error_status": n.error_status, "sub_code": n.sub_code,
                })),
                "inferred": x.inferred,
                "pod": pod(x.pod.as_ref()),
                "storm": x.storm.as_ref().map(|s| json!({
                    "count": s.count, "first": s.first.as_ref().map(rfc3339), "last": s.last.as_ref().map(rfc3339),
                    "total": s.total, "started": s.started.as_ref().map(rfc3339), "ended": s.ended,
                })),
                "source": source_name(x.source),
                "truncated": x.truncated,
                "raw": x.raw,
            }),
        ),
        Some(Payload::Sxid(s)) => (
            "sxid",
            json!({
                "code": s.code, "switch_index": s.switch_index, "pci": opt_str(&s.pci), "pci_raw": opt_str(&s.pci_raw),
                "link": s.link, "data": s.data, "message": s.message, "description": opt_str(&s.description),
                "severity": severity_name(ev.severity), "source": source_name(s.source), "raw": s.raw,
            }),
        ),
        Some(Payload::DriverLog(d)) => (
            "driver_log",
            json!({
                "text": d.text, "pci": opt_str(&d.pci), "gpu_uuid": opt_str(&d.gpu_uuid), "source": source_name(d.source), "truncated": d.truncated,
            }),
        ),
        Some(Payload::AgentStatus(a)) => (
            "agent_status",
            json!({
                "state": AgentState::name_of(a.state),
                "xid_source": a.xid_source, "detail": a.detail, "version": a.version, "boot_id": opt_str(&a.boot_id),
            }),
        ),
        Some(Payload::Gap(g)) => (
            "gap",
            json!({
                "stage": GapStage::name_of(g.stage),
                "missed": g.missed, "detail": g.detail,
            }),
        ),
        Some(Payload::GpuProcess(p)) => (
            "gpu_process",
            json!({
                "type": ProcessEventType::name_of(p.r#type),
                "pid": p.pid, "tgid": p.tgid, "ppid": if p.ppid == 0 { Value::Null } else { json!(p.ppid) },
                "comm": p.comm, "exe": opt_str(&p.exe), "cgroup_id": p.cgroup_id,
                "device": opt_str(&p.device), "devices": p.devices,
                "start_time": p.start_time.as_ref().map(rfc3339), "end_time": p.end_time.as_ref().map(rfc3339),
                "inferred": p.inferred,
                "pod": pod(p.pod.as_ref()),
            }),
        ),
        Some(Payload::GpuSample(g)) => ("gpu_sample", gpu_sample(g)),
        Some(Payload::GpuHealth(h)) => (
            "gpu_health",
            json!({
                "previous": HealthState::name_of(h.previous),
                "change": h.change,
                "record": h.record.as_ref().map(gpu_health),
            }),
        ),
        // A payload this collector does not know (a newer agent's): its field numbers.
        None => ("unknown", json!({ "fields": ev.unknown_fields })),
    };
    if let Some(map) = obj.as_object_mut() {
        map.insert(key.to_string(), body);
    }
    obj
}

/// One GPU sample as JSON (absent measurements are `null`).
pub fn gpu_sample(g: &v1::GpuSample) -> Value {
    json!({
        "index": g.index, "uuid": opt_str(&g.uuid), "pci": opt_str(&g.pci), "name": opt_str(&g.name),
        "driver_version": opt_str(&g.driver_version), "cuda_driver_version": opt_str(&g.cuda_driver_version),
        "gpu_util_pct": g.gpu_util_pct, "mem_util_pct": g.mem_util_pct,
        "mem_used_bytes": g.mem_used_bytes, "mem_total_bytes": g.mem_total_bytes,
        "temperature_c": g.temperature_c, "power_mw": g.power_mw, "power_limit_mw": g.power_limit_mw,
        "sm_clock_mhz": g.sm_clock_mhz, "mem_clock_mhz": g.mem_clock_mhz,
        "throttle_reasons": g.throttle_reasons, "throttle_reason_names": g.throttle_reason_names,
        "ecc_corrected_volatile": g.ecc_corrected_volatile, "ecc_uncorrected_volatile": g.ecc_uncorrected_volatile,
        "pcie_replay_count": g.pcie_replay_count,
        "memory_temperature_c": g.memory_temperature_c, "energy_mj": g.energy_mj,
        "power_violation_ns": g.power_violation_ns, "thermal_violation_ns": g.thermal_violation_ns,
        "row_remap": g.row_remap.as_ref().map(|r| json!({"correctable": r.correctable, "uncorrectable": r.uncorrectable, "pending": r.pending, "failure": r.failure})),
        "retired_pages": g.retired_pages.as_ref().map(|r| json!({"single_bit": r.single_bit, "double_bit": r.double_bit, "pending": r.pending})),
        "nvlink": g.nvlink.iter().map(|l| json!({"link": l.link, "crc_flit": l.crc_flit, "crc_data": l.crc_data, "replay": l.replay, "recovery": l.recovery})).collect::<Vec<_>>(),
        "fabric": g.fabric.as_ref().map(|f| json!({"state": f.state, "status": f.status, "cluster_uuid": opt_str(&f.cluster_uuid), "clique_id": f.clique_id})),
        "processes": g.processes.iter().map(|p| json!({"pid": p.pid, "used_memory_bytes": p.used_memory_bytes, "type": p.r#type})).collect::<Vec<_>>(),
        "errors": g.errors.iter().map(|e| json!({"field": e.field, "error": e.error})).collect::<Vec<_>>(),
    })
}

/// " x812,344 in 60 s (storm ended)": what a storm summary stands for.
fn storm_note(s: &v1::XidStorm) -> String {
    let span = |a: &Option<prost_types::Timestamp>, b: &Option<prost_types::Timestamp>| match (a, b)
    {
        (Some(a), Some(b)) => {
            (ptime::to_unix_nanos(b) - ptime::to_unix_nanos(a)).max(0) / 1_000_000_000
        }
        _ => 0,
    };
    let (n, secs, what) = if s.ended {
        (
            s.total,
            span(&s.started, &s.last.or(s.started)),
            "storm ended",
        )
    } else {
        (s.count, span(&s.first, &s.last), "storm")
    };
    format!(" x{} in {secs} s ({what})", thousands(n))
}

/// 812344 -> "812,344".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One GPU's health verdict as JSON.
pub fn gpu_health(r: &v1::GpuHealthRecord) -> Value {
    let t = |x: &Option<prost_types::Timestamp>| x.as_ref().map(ptime::rfc3339);
    let reasons: Vec<Value> = r
        .reasons
        .iter()
        .map(|x| {
            json!({
                "rule": x.rule, "state": HealthState::name_of(x.state), "action": x.action,
                "summary": x.summary, "xid": x.xid, "since": t(&x.since), "last": t(&x.last),
                "occurrences": x.occurrences, "escalated": x.escalated, "clears_on": x.clears_on,
                "clearing": x.clearing, "clean_samples": x.clean_samples,
                "pid": x.pid, "pod": opt_str(&x.pod), "shadow": x.shadow,
                "evidence": x.evidence.iter().map(|e| json!({
                    "cursor": if e.cursor == 0 { Value::Null } else { json!(e.cursor) },
                    "time": t(&e.time), "kind": e.kind, "detail": e.detail,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "node": r.node, "pci": r.pci, "gpu_uuid": opt_str(&r.gpu_uuid), "index": r.index,
        "model": opt_str(&r.model), "cluster": opt_str(&r.cluster),
        "state": HealthState::name_of(r.state), "since": t(&r.since), "updated": t(&r.updated),
        "last_sample": t(&r.last_sample), "boot_id": opt_str(&r.boot_id),
        "reasons": reasons,
        "xid_history": r.xid_history.iter().map(|h| json!({
            "xid": h.code, "first": t(&h.first), "last": t(&h.last), "reboots": h.reboots,
        })).collect::<Vec<_>>(),
    })
}

/// A resolved query window with its coverage.
pub fn window(w: &v1::ResolvedWindow) -> Value {
    let t = |x: &Option<prost_types::Timestamp>| x.as_ref().map(ptime::rfc3339);
    json!({
        "start": t(&w.start),
        "end": t(&w.end),
        "defaulted": w.defaulted,
        "oldest_data": t(&w.oldest_data),
        "partial": w.partial,
    })
}

/// A trend answer: window, step, source tier, series with points `[time, value, samples]`.
pub fn trend(r: &v1::TrendResponse) -> Value {
    let series: Vec<Value> = r
        .series
        .iter()
        .map(|s| {
            let points: Vec<Value> = s
                .points
                .iter()
                .map(|p| json!([p.time.as_ref().map(ptime::rfc3339), p.value, p.samples]))
                .collect();
            let st = s.stats.unwrap_or_default();
            json!({
                "node": opt_str(&s.node),
                "gpu_index": s.gpu_index,
                "gpu_uuid": opt_str(&s.gpu_uuid),
                "other": s.other,
                "merged_series": s.merged_series,
                "stats": {"min": st.min, "max": st.max, "avg": st.avg, "p95": st.p95, "last": st.last, "samples": st.samples},
                "points": points,
            })
        })
        .collect();
    let tier = Tier::name_of(r.source);
    let agg = Aggregation::name_of(r.aggregation);
    let group = GroupBy::name_of(r.group_by);
    json!({
        "metric": r.metric,
        "unit": r.unit,
        "window": r.window.as_ref().map(window),
        "step_seconds": r.step_seconds,
        "source": tier,
        "aggregation": agg,
        "group_by": group,
        "approximate": r.approximate,
        "series_total": r.series_total,
        "series": series,
        "hints": r.hints,
        "upstreams": upstreams(&r.upstreams),
        "partial": r.partial,
        "sources": r.sources.iter().map(|s| json!({
            "source": s.source,
            "start": s.start.as_ref().map(ptime::rfc3339),
            "end": s.end.as_ref().map(ptime::rfc3339),
        })).collect::<Vec<_>>(),
    })
}

/// Where a gateway's answer came from: each upstream with its state, the reason when it is
/// missing, and how long it took (empty from a collector).
pub fn upstreams(u: &[v1::UpstreamStatus]) -> Value {
    Value::Array(
        u.iter()
            .map(|u| {
                json!({
                    "name": u.name,
                    "state": UpstreamState::name_of(u.state),
                    "reason": opt_str(&u.reason),
                    "elapsed_ms": u.elapsed_ms,
                })
            })
            .collect(),
    )
}

/// One line for a person: which upstreams a partial answer is missing, and why.
pub fn partial_note(u: &[v1::UpstreamStatus]) -> String {
    let missing: Vec<String> = u
        .iter()
        .filter(|u| u.state != UpstreamState::Ok as i32)
        .map(|u| {
            format!(
                "{} {} ({})",
                u.name,
                UpstreamState::name_of(u.state),
                u.reason
            )
        })
        .collect();
    format!("partial answer: missing {}", missing.join("; "))
}

/// One line of text: time, severity, node, kind and the [`summary`].
pub fn line(ev: &v1::Event) -> String {
    let time = ev.time.as_ref().map(rfc3339).unwrap_or_default();
    format!(
        "{time} {:<7} {:<12} {:<10} {}",
        severity_name(ev.severity),
        ev.node,
        EventKind::name_of(ev.kind),
        summary(ev)
    )
}

/// What the event says, in a few words (the payload part of [`line`]).
pub fn summary(ev: &v1::Event) -> String {
    match &ev.payload {
        Some(Payload::Xid(x)) => {
            let who = match (x.pid, x.process_name.as_str()) {
                (Some(p), "") => format!(" pid={p}"),
                (Some(p), n) => format!(" pid={p} ({n})"),
                (None, "") => String::new(),
                (None, n) => format!(" ({n})"),
            };
            let gpu = if x.gpu_uuid.is_empty() {
                x.pci.clone()
            } else {
                format!("{} {}", x.pci, x.gpu_uuid)
            };
            let pod = x
                .pod
                .as_ref()
                .map(|p| format!(" pod={}/{}", p.namespace, p.name))
                .unwrap_or_default();
            let storm = x.storm.as_ref().map(storm_note).unwrap_or_default();
            format!(
                "XID {} {}{storm} on {}{}{}: {}",
                x.code,
                x.mnemonic,
                if gpu.is_empty() {
                    x.pci_raw.clone()
                } else {
                    gpu
                },
                who,
                pod,
                x.message
            )
        }
        Some(Payload::Sxid(s)) => format!(
            "SXID {} on nvswitch{} {}: {}",
            s.code,
            s.switch_index.map(|i| i.to_string()).unwrap_or_default(),
            s.pci,
            s.message
        ),
        Some(Payload::DriverLog(d)) => d.text.clone(),
        Some(Payload::AgentStatus(a)) => format!(
            "agent {} ({}): {}",
            AgentState::name_of(a.state),
            a.xid_source,
            a.detail
        ),
        Some(Payload::Gap(g)) => format!("GAP {} events lost: {}", g.missed, g.detail),
        Some(Payload::GpuHealth(h)) => {
            let gpu = h.record.as_ref().map_or(String::new(), |r| {
                if r.gpu_uuid.is_empty() {
                    r.pci.clone()
                } else {
                    format!("{} {}", r.pci, r.gpu_uuid)
                }
            });
            format!("GPU {gpu} health {}", h.change)
        }
        Some(Payload::GpuProcess(p)) => {
            let what = match ProcessEventType::try_from(p.r#type).unwrap_or_default() {
                ProcessEventType::Open | ProcessEventType::DeviceOpen => {
                    format!("opened {}", p.device)
                }
                ProcessEventType::Exec => format!("exec {}", p.exe),
                ProcessEventType::Exit if p.inferred => "exited (found gone)".to_string(),
                ProcessEventType::Exit => "exited".to_string(),
                ProcessEventType::Unspecified => String::new(),
            };
            let pod = p
                .pod
                .as_ref()
                .map(|p| format!(" pod={}/{}", p.namespace, p.name))
                .unwrap_or_default();
            format!(
                "GPU process {} ({}) ppid={}{pod} {what}",
                p.tgid, p.comm, p.ppid
            )
        }
        Some(Payload::GpuSample(g)) => gpu_sample_line(g),
        None => format!(
            "payload this collector does not know (fields {:?}; kept as received)",
            ev.unknown_fields
        ),
    }
}

/// One GPU sample in a few words: index, UUID (or PCI address), utilisation, memory,
/// temperature, power, processes, and how many fields NVML could not read.
pub fn gpu_sample_line(g: &v1::GpuSample) -> String {
    let opt = |v: Option<u64>, unit: &str| {
        v.map(|v| format!("{v}{unit}"))
            .unwrap_or_else(|| "-".into())
    };
    format!(
        "GPU {} {} util={} mem={}/{} MiB temp={} power={} procs={}{}",
        g.index,
        if g.uuid.is_empty() { &g.pci } else { &g.uuid },
        opt(g.gpu_util_pct.map(u64::from), "%"),
        opt(g.mem_used_bytes.map(|b| b >> 20), ""),
        opt(g.mem_total_bytes.map(|b| b >> 20), ""),
        opt(g.temperature_c.map(u64::from), "C"),
        opt(g.power_mw.map(|p| u64::from(p) / 1000), "W"),
        g.processes.len(),
        if g.errors.is_empty() {
            String::new()
        } else {
            format!(" errors={}", g.errors.len())
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field of GpuSample, and of each message inside it, has its key in the JSON: a field
    /// added to the .proto and forgotten here fails this, instead of silently missing from
    /// `gpulse nodes --json`, MCP and every other JSON answer.
    #[test]
    fn gpu_sample_json_has_every_field_of_the_message() {
        use std::collections::HashMap;

        use prost::Message as _;
        use prost_types::{
            DescriptorProto, FileDescriptorSet,
            field_descriptor_proto::{Label, Type},
        };

        fn collect<'a>(
            prefix: &str,
            msgs: &'a [DescriptorProto],
            out: &mut HashMap<String, &'a DescriptorProto>,
        ) {
            for m in msgs {
                let name = format!("{prefix}.{}", m.name());
                collect(&name, &m.nested_type, out);
                out.insert(name, m);
            }
        }
        fn check(
            msg: &DescriptorProto,
            json: &Value,
            all: &HashMap<String, &DescriptorProto>,
            path: &str,
        ) {
            for f in &msg.field {
                let key = format!("{path}.{}", f.name());
                let v = json
                    .get(f.name())
                    .unwrap_or_else(|| panic!("{key} is not in the JSON: {json}"));
                if f.r#type() == Type::Message {
                    let inner = all[f.type_name()];
                    let v = if f.label() == Label::Repeated {
                        &v[0]
                    } else {
                        v
                    };
                    assert!(v.is_object(), "{key}: {v}");
                    check(inner, v, all, &key);
                }
            }
        }

        let set = FileDescriptorSet::decode(v1::FILE_DESCRIPTOR_SET).unwrap();
        let mut all = HashMap::new();
        for f in &set.file {
            collect(&format!(".{}", f.package()), &f.message_type, &mut all);
        }
        // Every message-typed field present once, so its own fields can be looked for.
        let sample = v1::GpuSample {
            row_remap: Some(Default::default()),
            retired_pages: Some(Default::default()),
            nvlink: vec![Default::default()],
            fabric: Some(Default::default()),
            processes: vec![Default::default()],
            errors: vec![Default::default()],
            ..Default::default()
        };
        check(
            all[".gpulse.v1.GpuSample"],
            &gpu_sample(&sample),
            &all,
            "GpuSample",
        );
    }

    #[test]
    fn storm_summaries_say_how_many_over_how_long() {
        let at = |s: i64| Some(crate::time::from_unix_nanos(i128::from(s) * 1_000_000_000));
        let mut x = v1::Xid {
            code: 95,
            pci: "0000:3b:00.0".into(),
            mnemonic: "UNCONTAINED_ECC_ERROR".into(),
            storm: Some(v1::XidStorm {
                count: 13_544,
                first: at(100),
                last: at(101),
                total: 812_344,
                started: at(41),
                ended: false,
            }),
            ..Default::default()
        };
        let ev = |x: &v1::Xid| v1::Event {
            payload: Some(Payload::Xid(x.clone())),
            ..Default::default()
        };
        assert!(
            summary(&ev(&x))
                .starts_with("XID 95 UNCONTAINED_ECC_ERROR x13,544 in 1 s (storm) on 0000:3b:00.0"),
            "{}",
            summary(&ev(&x))
        );
        if let Some(s) = &mut x.storm {
            s.ended = true;
        }
        assert!(
            summary(&ev(&x)).contains("x812,344 in 60 s (storm ended)"),
            "{}",
            summary(&ev(&x))
        );
        assert_eq!(event(&ev(&x))["xid"]["storm"]["total"], 812_344);
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }

    #[test]
    fn xid_json_has_required_fields_and_nulls() {
        let ev = v1::Event {
            cursor: 3,
            seq: 9,
            node: "gpu-1".into(),
            kind: v1::EventKind::Xid as i32,
            severity: v1::Severity::Fatal as i32,
            time: Some(crate::time::from_unix_nanos(1_764_000_000_000_000_000)),
            payload: Some(Payload::Xid(v1::Xid {
                code: 79,
                pci: "0000:91:00.0".into(),
                message: "GPU has fallen off the bus.".into(),
                mnemonic: "ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS".into(),
                source: RecordSource::EbpfPrintk as i32,
                ..Default::default()
            })),
            ..Default::default()
        };
        let v = event(&ev);
        assert_eq!(v["kind"], "xid");
        assert_eq!(v["time"], "2025-11-24T16:00:00.000000Z");
        let x = &v["xid"];
        for k in [
            "code",
            "pci",
            "pid",
            "process_name",
            "message",
            "mnemonic",
            "severity",
        ] {
            assert!(x.get(k).is_some(), "missing {k}");
        }
        assert_eq!(x["code"], 79);
        assert_eq!(x["severity"], "fatal");
        assert!(x["pid"].is_null());
        assert!(x["process_name"].is_null());
        assert_eq!(x["source"], "ebpf_printk");
        assert!(
            line(&ev).contains("XID 79 ROBUST_CHANNEL_GPU_HAS_FALLEN_OFF_THE_BUS on 0000:91:00.0")
        );
    }
}
