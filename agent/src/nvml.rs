//! NVML sampling through nvml-wrapper: per-GPU identity and, each interval, utilisation, memory,
//! temperatures, power, energy, clocks, throttle reasons and violation time, volatile ECC counts,
//! row remapping or page retirement, NVLink error counters, NVSwitch fabric state, PCIe replays
//! and per-process GPU memory. NVML's critical-XID events are watched on a thread of their own
//! ([`spawn_xid_events`]).
//!
//! A field the GPU does not support (`NotSupported`) is absent, never zero and never an error.
//! Any other failure of one field is reported in that sample's `errors` and the other fields and
//! GPUs go on; a GPU whose handle cannot be obtained yields a sample with only its index and the
//! error. NVML calls block, so the sampler runs on its own thread.
use std::{ffi::OsStr, path::PathBuf, sync::Arc, time::Duration};

use gpulse_proto::v1::{
    FabricInfo, FieldError, GpuProcessMemory, GpuSample, NvLinkErrors, RecordSource, RetiredPages,
    RowRemap,
};
use nvml_wrapper::{
    Device, Nvml,
    bitmasks::event::EventTypes,
    enum_wrappers::{
        device::{
            Clock, EccCounter, MemoryError, PerformancePolicy, RetirementCause, TemperatureSensor,
        },
        nv_link::ErrorCounter,
    },
    enums::{
        device::{SampleValue, UsedGpuMemory},
        event::XidError,
    },
    error::{NvmlError, nvml_sym, nvml_try},
    struct_wrappers::device::FieldValueSample,
    structs::device::FieldId,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    record::{Captured, DevXid, RawRecord},
    stats::AgentStats,
};

/// NVML's field id for the memory (HBM) temperature.
const FI_DEV_MEMORY_TEMP: u32 = 82;
/// Links NVML numbers per GPU at most (NVML_NVLINK_MAX_LINKS).
const NVLINK_MAX_LINKS: u32 = 18;

/// `--nvml auto|off|PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NvmlChoice {
    Auto,
    Off,
    Path(PathBuf),
}

impl std::str::FromStr for NvmlChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "" => Err("--nvml needs auto, off or a path to libnvidia-ml.so".into()),
            "auto" => Ok(Self::Auto),
            "off" => Ok(Self::Off),
            p => Ok(Self::Path(PathBuf::from(p))),
        }
    }
}

pub struct Sampler {
    nvml: Arc<Nvml>,
    driver_version: String,
    cuda_driver_version: String,
}

/// Opens NVML. `Ok(None)` when turned off; `Err` says why NVML is unavailable.
pub fn open(choice: &NvmlChoice) -> Result<Option<Sampler>, NvmlError> {
    let nvml = match choice {
        NvmlChoice::Off => return Ok(None),
        NvmlChoice::Auto => Nvml::init()?,
        NvmlChoice::Path(p) => Nvml::builder().lib_path(OsStr::new(p)).init()?,
    };
    let driver_version = nvml.sys_driver_version().unwrap_or_default();
    let cuda_driver_version = nvml
        .sys_cuda_driver_version()
        .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10))
        .unwrap_or_default();
    Ok(Some(Sampler {
        nvml: Arc::new(nvml),
        driver_version,
        cuda_driver_version,
    }))
}

/// Field value, absent when unsupported, error recorded otherwise.
fn field<T>(errors: &mut Vec<FieldError>, name: &str, r: Result<T, NvmlError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        // A driver too old to have the function does not support the field either.
        Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => None,
        Err(e) => {
            errors.push(FieldError {
                field: name.to_string(),
                error: e.to_string(),
            });
            None
        }
    }
}

impl Sampler {
    /// Row remapping counts (nvml-wrapper has no call for them: the C function directly).
    fn row_remap(&self, errors: &mut Vec<FieldError>, d: &Device<'_>) -> Option<RowRemap> {
        let lib = self.nvml.lib();
        let call = nvml_sym(lib.nvmlDeviceGetRemappedRows.as_ref());
        let r = call.and_then(|f| {
            let (mut corr, mut unc, mut pending, mut failure) = (0, 0, 0, 0);
            // SAFETY: a live handle of this NVML instance and four valid out-pointers.
            nvml_try(unsafe { f(d.handle(), &mut corr, &mut unc, &mut pending, &mut failure) })?;
            Ok(RowRemap {
                correctable: corr,
                uncorrectable: unc,
                pending: pending != 0,
                failure: failure != 0,
            })
        });
        field(errors, "row_remap", r)
    }

    /// NVSwitch fabric registration; absent on systems without a fabric.
    fn fabric(&self, errors: &mut Vec<FieldError>, d: &Device<'_>) -> Option<FabricInfo> {
        let lib = self.nvml.lib();
        let call = nvml_sym(lib.nvmlDeviceGetGpuFabricInfo.as_ref());
        let r = call.and_then(|f| {
            // SAFETY: a plain C struct; all-zero is a valid value of it.
            let mut info: nvml_wrapper_sys::bindings::nvmlGpuFabricInfo_t =
                unsafe { std::mem::zeroed() };
            // SAFETY: a live handle of this NVML instance and a valid out-pointer.
            nvml_try(unsafe { f(d.handle(), &mut info) })?;
            Ok(info)
        });
        let info = field(errors, "fabric", r)?;
        if u32::from(info.state) == 0 {
            return None; // NVML_GPU_FABRIC_STATE_NOT_SUPPORTED
        }
        let status = match nvml_try(info.status) {
            Ok(()) => "success".to_string(),
            Err(e) => e.to_string(),
        };
        Some(FabricInfo {
            state: fabric_state_name(u32::from(info.state)),
            status,
            cluster_uuid: uuid_text(&info.clusterUuid),
            clique_id: info.cliqueId,
        })
    }

    pub fn driver_version(&self) -> &str {
        &self.driver_version
    }

    /// One sample of every GPU. `Err` only when the GPU count itself cannot be read.
    pub fn sample(&self) -> Result<Vec<GpuSample>, NvmlError> {
        let count = self.nvml.device_count()?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut s = GpuSample {
                index,
                driver_version: self.driver_version.clone(),
                cuda_driver_version: self.cuda_driver_version.clone(),
                ..Default::default()
            };
            match self.nvml.device_by_index(index) {
                Ok(d) => self.fill(&d, &mut s),
                Err(e) => s.errors.push(FieldError {
                    field: "handle".into(),
                    error: e.to_string(),
                }),
            }
            out.push(s);
        }
        Ok(out)
    }

    fn fill(&self, d: &Device<'_>, s: &mut GpuSample) {
        let e = &mut s.errors;
        s.uuid = field(e, "uuid", d.uuid()).unwrap_or_default();
        s.name = field(e, "name", d.name()).unwrap_or_default();
        if let Some(pci) = field(e, "pci", d.pci_info()) {
            s.pci = gpulse_xid::Bdf::parse(&pci.bus_id)
                .map(|b| b.to_string())
                .unwrap_or(pci.bus_id);
        }
        if let Some(u) = field(e, "utilization", d.utilization_rates()) {
            s.gpu_util_pct = Some(u.gpu);
            s.mem_util_pct = Some(u.memory);
        }
        if let Some(m) = field(e, "memory", d.memory_info()) {
            s.mem_used_bytes = Some(m.used);
            s.mem_total_bytes = Some(m.total);
        }
        s.temperature_c = field(e, "temperature", d.temperature(TemperatureSensor::Gpu));
        s.power_mw = field(e, "power_usage", d.power_usage());
        s.power_limit_mw = field(e, "power_limit", d.enforced_power_limit());
        s.sm_clock_mhz = field(e, "sm_clock", d.clock_info(Clock::SM));
        s.mem_clock_mhz = field(e, "mem_clock", d.clock_info(Clock::Memory));
        if let Some(r) = field(e, "throttle_reasons", d.current_throttle_reasons()) {
            s.throttle_reasons = Some(r.bits());
            s.throttle_reason_names = r
                .iter_names()
                .map(|(n, _)| n.to_ascii_lowercase())
                .collect();
        }
        s.ecc_corrected_volatile = field(
            e,
            "ecc",
            d.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
        );
        s.ecc_uncorrected_volatile = field(
            e,
            "ecc",
            d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
        );
        s.pcie_replay_count = field(e, "pcie_replay", d.pcie_replay_counter());
        s.memory_temperature_c = memory_temperature(e, d);
        s.energy_mj = field(e, "energy", d.total_energy_consumption());
        s.power_violation_ns = field(e, "violation", d.violation_status(PerformancePolicy::Power))
            .map(|v| v.violation_time);
        s.thermal_violation_ns = field(
            e,
            "violation",
            d.violation_status(PerformancePolicy::Thermal),
        )
        .map(|v| v.violation_time);
        s.row_remap = self.row_remap(e, d);
        s.retired_pages = retired_pages(e, d);
        s.nvlink = nvlink_errors(e, d);
        s.fabric = self.fabric(e, d);
        for (kind, r) in [
            ("compute", d.running_compute_processes()),
            ("graphics", d.running_graphics_processes()),
        ] {
            if let Some(ps) = field(e, "processes", r) {
                s.processes.extend(ps.into_iter().map(|p| GpuProcessMemory {
                    pid: p.pid,
                    used_memory_bytes: match p.used_gpu_memory {
                        UsedGpuMemory::Used(b) => Some(b),
                        UsedGpuMemory::Unavailable => None,
                    },
                    r#type: kind.to_string(),
                }));
            }
        }
    }
}

/// The memory (HBM) temperature, read as an NVML field value.
fn memory_temperature(errors: &mut Vec<FieldError>, d: &Device<'_>) -> Option<u32> {
    let values = field(
        errors,
        "memory_temperature",
        d.field_values_for(&[FieldId(FI_DEV_MEMORY_TEMP)]),
    )?;
    let sample: FieldValueSample = values.into_iter().next()?.ok()?;
    let v = match field(errors, "memory_temperature", sample.value)? {
        SampleValue::U32(v) => u64::from(v),
        SampleValue::U64(v) => v,
        SampleValue::I64(v) => u64::try_from(v).ok()?,
        SampleValue::F64(v) => v as u64,
    };
    // 0 is what GPUs without an HBM sensor report through the field API.
    u32::try_from(v).ok().filter(|t| *t > 0)
}

/// Pages retired for each cause and whether more wait for a reboot; absent on GPUs that remap
/// rows instead.
fn retired_pages(errors: &mut Vec<FieldError>, d: &Device<'_>) -> Option<RetiredPages> {
    let single = field(
        errors,
        "retired_pages",
        d.retired_pages(RetirementCause::MultipleSingleBitEccErrors),
    )?;
    let double = field(
        errors,
        "retired_pages",
        d.retired_pages(RetirementCause::DoubleBitEccError),
    )?;
    let pending = field(errors, "retired_pages", d.are_pages_pending_retired())?;
    Some(RetiredPages {
        single_bit: single.len() as u32,
        double_bit: double.len() as u32,
        pending,
    })
}

/// Error counters of every active NVLink. Numbering stops at the first link NVML does not know
/// (GPUs without NVLink answer NotSupported for link 0).
fn nvlink_errors(errors: &mut Vec<FieldError>, d: &Device<'_>) -> Vec<NvLinkErrors> {
    let mut out = Vec::new();
    for link in 0..NVLINK_MAX_LINKS {
        let l = d.link_wrapper_for(link);
        match l.is_active() {
            Ok(true) => {}
            Ok(false) => continue,
            Err(NvmlError::NotSupported | NvmlError::InvalidArg) => break,
            Err(e) => {
                errors.push(FieldError {
                    field: "nvlink".into(),
                    error: format!("link {link}: {e}"),
                });
                continue;
            }
        }
        let mut count = |c| field(errors, "nvlink", l.error_counter(c));
        out.push(NvLinkErrors {
            link,
            crc_flit: count(ErrorCounter::DlCrcFlit),
            crc_data: count(ErrorCounter::DlCrcData),
            replay: count(ErrorCounter::DlReplay),
            recovery: count(ErrorCounter::DlRecovery),
        });
    }
    out
}

/// The name of an NVSwitch fabric registration state.
fn fabric_state_name(state: u32) -> String {
    match state {
        1 => "not_started".into(),
        2 => "in_progress".into(),
        3 => "completed".into(),
        n => format!("unknown({n})"),
    }
}

/// A 16-byte UUID as text (8-4-4-4-12 hex digits); empty when all zero.
fn uuid_text(b: &[u8; 16]) -> String {
    if b.iter().all(|x| *x == 0) {
        return String::new();
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// How long the event thread waits for NVML per call; also how soon it notices the agent stop.
const XID_WAIT_MS: u32 = 1000;

/// Watches NVML's critical-XID events on a thread of its own and hands each to the pipeline as a
/// record of source `NVML_EVENT` (the pipeline holds it briefly and drops it when the kernel log
/// reported the same XID). Returns how many GPUs are watched; `Ok(0)` when no GPU supports the
/// event.
pub fn spawn_xid_events(
    sampler: &Sampler,
    tx: mpsc::Sender<Captured>,
    stats: Arc<AgentStats>,
) -> std::io::Result<u32> {
    let nvml = sampler.nvml.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("gpulse-nvml-xid".into())
        .spawn(move || {
            let watched = match register_xid_events(&nvml) {
                Ok((set, 0)) => {
                    drop(set);
                    let _ = ready_tx.send(0);
                    return;
                }
                Ok((set, n)) => {
                    let _ = ready_tx.send(n);
                    set
                }
                Err(e) => {
                    warn!(error = %e, "NVML XID events unavailable; XIDs come from the kernel log only");
                    let _ = ready_tx.send(0);
                    return;
                }
            };
            watch_xid_events(&watched, &tx, &stats);
        })?;
    Ok(ready_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default())
}

/// One event set with every GPU that supports critical-XID events registered on it.
fn register_xid_events(nvml: &Nvml) -> Result<(nvml_wrapper::EventSet<'_>, u32), NvmlError> {
    let set = nvml.create_event_set()?;
    let register = nvml_sym(nvml.lib().nvmlDeviceRegisterEvents.as_ref())?;
    let mut watched = 0;
    for index in 0..nvml.device_count()? {
        let d = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                warn!(index, error = %e, "GPU not watched for NVML XID events");
                continue;
            }
        };
        match d.supported_event_types() {
            Ok(t) if t.contains(EventTypes::CRITICAL_XID_ERROR) => {}
            _ => continue,
        }
        // The C call directly: the wrapper's register_events frees the whole set when one GPU
        // fails, which would unwatch the GPUs registered before it.
        // SAFETY: a live device handle and event set of this NVML instance.
        let r = nvml_try(unsafe {
            register(
                d.handle(),
                EventTypes::CRITICAL_XID_ERROR.bits(),
                set.handle(),
            )
        });
        match r {
            Ok(()) => watched += 1,
            Err(e) => warn!(index, error = %e, "GPU not watched for NVML XID events"),
        }
    }
    Ok((set, watched))
}

fn watch_xid_events(
    set: &nvml_wrapper::EventSet<'_>,
    tx: &mpsc::Sender<Captured>,
    stats: &AgentStats,
) {
    let mut failing = false;
    while !tx.is_closed() {
        let ev = match set.wait(XID_WAIT_MS) {
            Ok(ev) => ev,
            Err(NvmlError::Timeout) => continue,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "waiting for NVML XID events failed; retrying");
                    failing = true;
                }
                std::thread::sleep(Duration::from_millis(u64::from(XID_WAIT_MS)));
                continue;
            }
        };
        failing = false;
        let Some(XidError::Value(code)) = ev.event_data else {
            continue; // an event without an XID number says nothing the kernel log does not
        };
        let Ok(code) = u32::try_from(code) else {
            continue;
        };
        let pci = ev
            .device
            .pci_info()
            .map(|p| {
                gpulse_xid::Bdf::parse(&p.bus_id)
                    .map(|b| b.to_string())
                    .unwrap_or(p.bus_id)
            })
            .unwrap_or_default();
        let now = gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
        let record = RawRecord {
            unix_ns: now,
            source: RecordSource::NvmlEvent,
            // In the printk shape so the one parser and catalog serve every path.
            text: format!("NVRM: Xid (PCI:{pci}): {code}, reported by NVML (critical XID event)"),
            truncated: false,
            dev_xid: Some(DevXid { code, dev: pci }),
        };
        AgentStats::add(&stats.nvml_xid_events, 1);
        if tx.blocking_send(Captured::Record(record)).is_err() {
            return;
        }
    }
}

/// Runs the sampler on its own thread until `tx` closes. Samples never wait for room: when the
/// capture queue is full the round is shed and counted (events take precedence).
pub fn spawn(
    sampler: Sampler,
    interval: Duration,
    tx: mpsc::Sender<Captured>,
    stats: Arc<AgentStats>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("gpulse-nvml".into()).spawn(move || {
        let mut failing = false;
        let mut next = std::time::Instant::now();
        loop {
            match sampler.sample() {
                Ok(samples) => {
                    if failing {
                        info!("NVML answers again");
                        failing = false;
                    }
                    let now = gpulse_proto::time::to_unix_nanos(&gpulse_proto::time::now());
                    for s in samples {
                        match tx.try_send(Captured::Sample { unix_ns: now, sample: Box::new(s) }) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => AgentStats::add(&stats.samples_shed, 1),
                            Err(mpsc::error::TrySendError::Closed(_)) => return,
                        }
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "NVML sampling failed (no GPU count); retrying each interval");
                        failing = true;
                    }
                }
            }
            if tx.is_closed() {
                return;
            }
            next += interval;
            let now = std::time::Instant::now();
            match next.checked_duration_since(now) {
                Some(d) => std::thread::sleep(d),
                // Fell behind (a slow NVML call): skip missed ticks instead of bursting.
                None => next = now,
            }
        }
    })?;
    Ok(())
}
