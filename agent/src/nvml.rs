//! NVML sampling through nvml-wrapper: per-GPU identity and, each interval, utilisation, memory,
//! temperature, power, clocks, throttle reasons, volatile ECC counts, PCIe replays and per-process
//! GPU memory.
//!
//! A field the GPU does not support (`NotSupported`) is absent, never zero and never an error.
//! Any other failure of one field is reported in that sample's `errors` and the other fields and
//! GPUs go on; a GPU whose handle cannot be obtained yields a sample with only its index and the
//! error. NVML calls block, so the sampler runs on its own thread.
use std::{ffi::OsStr, path::PathBuf, sync::Arc, time::Duration};

use gpulse_proto::v1::{FieldError, GpuProcessMemory, GpuSample};
use nvml_wrapper::{
    Device, Nvml,
    enum_wrappers::device::{Clock, EccCounter, MemoryError, TemperatureSensor},
    enums::device::UsedGpuMemory,
    error::NvmlError,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{record::Captured, stats::AgentStats};

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
    nvml: Nvml,
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
        nvml,
        driver_version,
        cuda_driver_version,
    }))
}

/// Field value, absent when unsupported, error recorded otherwise.
fn field<T>(errors: &mut Vec<FieldError>, name: &str, r: Result<T, NvmlError>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => None,
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
