//! The GPU metrics kept as sample series, and how each is read from a `GpuSample`.
//!
//! Values are stored exactly as the agent reports them (integers: mW, bytes, MHz), which is what
//! makes the integer codec apply; `scale` converts to the unit shown to users.
use crate::v1::{GpuSample, NvLinkErrors};

#[derive(Clone, Copy, Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub unit: &'static str,
    pub help: &'static str,
    /// Multiply stored values by this for display (mW -> W).
    pub scale: f64,
    /// The Prometheus gauge carrying each GPU's latest value (in `unit`, i.e. scaled).
    pub prom: &'static str,
    read: fn(&GpuSample) -> Option<f64>,
}

/// NVML's "GPU idle" clock-event bit: not a throttle anyone acts on.
const THROTTLE_GPU_IDLE: u64 = 0x1;

/// Number of metrics kept per GPU.
pub const COUNT: usize = 28;

pub const METRICS: &[MetricDef; COUNT] = &[
    MetricDef {
        name: "gpu_util_pct",
        prom: "gpulse_gpu_utilization_percent",
        unit: "percent",
        help: "GPU (SM) utilisation",
        scale: 1.0,
        read: |s| s.gpu_util_pct.map(f64::from),
    },
    MetricDef {
        name: "mem_util_pct",
        prom: "gpulse_gpu_memory_utilization_percent",
        unit: "percent",
        help: "memory controller utilisation",
        scale: 1.0,
        read: |s| s.mem_util_pct.map(f64::from),
    },
    MetricDef {
        name: "mem_used_bytes",
        prom: "gpulse_gpu_memory_used_bytes",
        unit: "bytes",
        help: "framebuffer memory in use",
        scale: 1.0,
        read: |s| s.mem_used_bytes.map(|v| v as f64),
    },
    MetricDef {
        name: "mem_total_bytes",
        prom: "gpulse_gpu_memory_total_bytes",
        unit: "bytes",
        help: "framebuffer memory size",
        scale: 1.0,
        read: |s| s.mem_total_bytes.map(|v| v as f64),
    },
    MetricDef {
        name: "temperature_c",
        prom: "gpulse_gpu_temperature_celsius",
        unit: "celsius",
        help: "GPU core temperature",
        scale: 1.0,
        read: |s| s.temperature_c.map(f64::from),
    },
    MetricDef {
        name: "power_w",
        prom: "gpulse_gpu_power_watts",
        unit: "watts",
        help: "board power draw",
        scale: 0.001,
        read: |s| s.power_mw.map(f64::from),
    },
    MetricDef {
        name: "power_limit_w",
        prom: "gpulse_gpu_power_limit_watts",
        unit: "watts",
        help: "enforced power limit",
        scale: 0.001,
        read: |s| s.power_limit_mw.map(f64::from),
    },
    MetricDef {
        name: "sm_clock_mhz",
        prom: "gpulse_gpu_sm_clock_mhz",
        unit: "MHz",
        help: "SM clock",
        scale: 1.0,
        read: |s| s.sm_clock_mhz.map(f64::from),
    },
    MetricDef {
        name: "mem_clock_mhz",
        prom: "gpulse_gpu_memory_clock_mhz",
        unit: "MHz",
        help: "memory clock",
        scale: 1.0,
        read: |s| s.mem_clock_mhz.map(f64::from),
    },
    MetricDef {
        name: "ecc_corrected",
        prom: "gpulse_gpu_ecc_corrected_errors",
        unit: "errors",
        help: "volatile corrected ECC error count",
        scale: 1.0,
        read: |s| s.ecc_corrected_volatile.map(|v| v as f64),
    },
    MetricDef {
        name: "ecc_uncorrected",
        prom: "gpulse_gpu_ecc_uncorrected_errors",
        unit: "errors",
        help: "volatile uncorrected ECC error count",
        scale: 1.0,
        read: |s| s.ecc_uncorrected_volatile.map(|v| v as f64),
    },
    MetricDef {
        name: "pcie_replays",
        prom: "gpulse_gpu_pcie_replays",
        unit: "replays",
        help: "PCIe replay counter",
        scale: 1.0,
        read: |s| s.pcie_replay_count.map(f64::from),
    },
    MetricDef {
        name: "throttled",
        prom: "gpulse_gpu_throttled",
        unit: "bool",
        help: "1 when any clock-event reason other than idle is active",
        scale: 1.0,
        read: |s| {
            s.throttle_reasons
                .map(|r| f64::from(u8::from(r & !THROTTLE_GPU_IDLE != 0)))
        },
    },
    MetricDef {
        name: "process_count",
        prom: "gpulse_gpu_processes",
        unit: "processes",
        help: "processes holding GPU memory (as NVML lists them)",
        scale: 1.0,
        read: |s| {
            // NVML lists no processes when the query failed; a field error says so.
            if s.errors.iter().any(|e| e.field == "processes") {
                None
            } else {
                Some(s.processes.len() as f64)
            }
        },
    },
    MetricDef {
        name: "memory_temperature_c",
        prom: "gpulse_gpu_memory_temperature_celsius",
        unit: "celsius",
        help: "memory (HBM) temperature",
        scale: 1.0,
        read: |s| s.memory_temperature_c.map(f64::from),
    },
    MetricDef {
        name: "energy_j",
        prom: "gpulse_gpu_energy_joules",
        unit: "joules",
        help: "energy used since the driver loaded (a counter)",
        scale: 0.001,
        read: |s| s.energy_mj.map(|v| v as f64),
    },
    MetricDef {
        name: "power_violation_s",
        prom: "gpulse_gpu_power_violation_seconds",
        unit: "seconds",
        help: "time clocks were held down by the power limit since the driver loaded (a counter)",
        scale: 1e-9,
        read: |s| s.power_violation_ns.map(|v| v as f64),
    },
    MetricDef {
        name: "thermal_violation_s",
        prom: "gpulse_gpu_thermal_violation_seconds",
        unit: "seconds",
        help: "time clocks were held down by thermal limits since the driver loaded (a counter)",
        scale: 1e-9,
        read: |s| s.thermal_violation_ns.map(|v| v as f64),
    },
    MetricDef {
        name: "remapped_rows_correctable",
        prom: "gpulse_gpu_remapped_rows_correctable",
        unit: "rows",
        help: "memory rows remapped for correctable errors",
        scale: 1.0,
        read: |s| s.row_remap.as_ref().map(|r| f64::from(r.correctable)),
    },
    MetricDef {
        name: "remapped_rows_uncorrectable",
        prom: "gpulse_gpu_remapped_rows_uncorrectable",
        unit: "rows",
        help: "memory rows remapped for uncorrectable errors",
        scale: 1.0,
        read: |s| s.row_remap.as_ref().map(|r| f64::from(r.uncorrectable)),
    },
    MetricDef {
        name: "row_remap_pending",
        prom: "gpulse_gpu_row_remap_pending",
        unit: "bool",
        help: "1 when a row remap waits for a GPU reset",
        scale: 1.0,
        read: |s| s.row_remap.as_ref().map(|r| f64::from(u8::from(r.pending))),
    },
    MetricDef {
        name: "row_remap_failure",
        prom: "gpulse_gpu_row_remap_failure",
        unit: "bool",
        help: "1 when a row remap failed (the GPU needs service)",
        scale: 1.0,
        read: |s| s.row_remap.as_ref().map(|r| f64::from(u8::from(r.failure))),
    },
    MetricDef {
        name: "retired_pages_sbe",
        prom: "gpulse_gpu_retired_pages_single_bit",
        unit: "pages",
        help: "pages retired for multiple single-bit ECC errors",
        scale: 1.0,
        read: |s| s.retired_pages.as_ref().map(|r| f64::from(r.single_bit)),
    },
    MetricDef {
        name: "retired_pages_dbe",
        prom: "gpulse_gpu_retired_pages_double_bit",
        unit: "pages",
        help: "pages retired for double-bit ECC errors",
        scale: 1.0,
        read: |s| s.retired_pages.as_ref().map(|r| f64::from(r.double_bit)),
    },
    MetricDef {
        name: "retired_pages_pending",
        prom: "gpulse_gpu_retired_pages_pending",
        unit: "bool",
        help: "1 when pages wait for a reboot to be retired",
        scale: 1.0,
        read: |s| {
            s.retired_pages
                .as_ref()
                .map(|r| f64::from(u8::from(r.pending)))
        },
    },
    MetricDef {
        name: "nvlink_crc_errors",
        prom: "gpulse_gpu_nvlink_crc_errors",
        unit: "errors",
        help: "NVLink CRC errors (flit and data), all links",
        scale: 1.0,
        read: |s| {
            nvlink_sum(s, |l| match (l.crc_flit, l.crc_data) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            })
        },
    },
    MetricDef {
        name: "nvlink_replay_errors",
        prom: "gpulse_gpu_nvlink_replay_errors",
        unit: "errors",
        help: "NVLink replay errors, all links",
        scale: 1.0,
        read: |s| nvlink_sum(s, |l| l.replay),
    },
    MetricDef {
        name: "nvlink_recovery_errors",
        prom: "gpulse_gpu_nvlink_recovery_errors",
        unit: "errors",
        help: "NVLink recovery errors, all links",
        scale: 1.0,
        read: |s| nvlink_sum(s, |l| l.recovery),
    },
];

/// A counter summed over a GPU's NVLinks; absent without NVLink or where no link counts it.
fn nvlink_sum(s: &GpuSample, f: fn(&NvLinkErrors) -> Option<u64>) -> Option<f64> {
    let mut seen = false;
    let mut total = 0u64;
    for v in s.nvlink.iter().filter_map(f) {
        seen = true;
        total = total.saturating_add(v);
    }
    seen.then_some(total as f64)
}

impl MetricDef {
    /// The value of this metric in a sample, in `unit` (scaled), if the agent sent it.
    pub fn value(&self, s: &GpuSample) -> Option<f64> {
        (self.read)(s).map(|v| v * self.scale)
    }
}

pub fn by_name(name: &str) -> Option<(usize, &'static MetricDef)> {
    METRICS.iter().enumerate().find(|(_, m)| m.name == name)
}

pub fn names() -> Vec<&'static str> {
    METRICS.iter().map(|m| m.name).collect()
}

/// One row of stored values for a sample (NaN where the agent sent no value).
pub fn row(s: &GpuSample) -> [f64; COUNT] {
    METRICS.map(|m| (m.read)(s).unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::FieldError;

    #[test]
    fn rows_follow_the_catalog() {
        let s = GpuSample {
            gpu_util_pct: Some(97),
            power_mw: Some(312_456),
            throttle_reasons: Some(THROTTLE_GPU_IDLE),
            ..Default::default()
        };
        let r = row(&s);
        assert_eq!(r.len(), METRICS.len());
        assert_eq!(r[by_name("gpu_util_pct").unwrap().0], 97.0);
        let (pw, def) = by_name("power_w").unwrap();
        assert_eq!(r[pw] * def.scale, 312.456);
        assert_eq!(r[by_name("throttled").unwrap().0], 0.0);
        assert!(r[by_name("temperature_c").unwrap().0].is_nan());
        assert_eq!(r[by_name("process_count").unwrap().0], 0.0);
        let failed = GpuSample {
            errors: vec![FieldError {
                field: "processes".into(),
                error: "x".into(),
            }],
            ..Default::default()
        };
        assert!(row(&failed)[by_name("process_count").unwrap().0].is_nan());
        assert!(by_name("nope").is_none());
        // NVLink counters are summed over links; absent without NVLink or a counted link.
        let links = GpuSample {
            nvlink: vec![
                NvLinkErrors {
                    link: 0,
                    crc_flit: Some(2),
                    crc_data: Some(3),
                    replay: Some(1),
                    recovery: None,
                },
                NvLinkErrors {
                    link: 1,
                    crc_flit: None,
                    crc_data: Some(5),
                    replay: Some(4),
                    recovery: None,
                },
            ],
            ..Default::default()
        };
        let r = row(&links);
        assert_eq!(r[by_name("nvlink_crc_errors").unwrap().0], 10.0);
        assert_eq!(r[by_name("nvlink_replay_errors").unwrap().0], 5.0);
        assert!(r[by_name("nvlink_recovery_errors").unwrap().0].is_nan());
        assert!(row(&s)[by_name("nvlink_crc_errors").unwrap().0].is_nan());
        let mut proms: Vec<&str> = METRICS.iter().map(|m| m.prom).collect();
        proms.sort();
        proms.dedup();
        assert_eq!(proms.len(), METRICS.len(), "one gauge per metric");
        assert!(proms.iter().all(|p| p.starts_with("gpulse_gpu_")));
        assert_eq!(def.value(&s), Some(312.456), "scaled to watts");
    }
}
