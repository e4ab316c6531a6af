//! The GPU metrics kept as sample series, and how each is read from a `GpuSample`.
//!
//! Values are stored exactly as the agent reports them (integers: mW, bytes, MHz), which is what
//! makes the integer codec apply; `scale` converts to the unit shown to users.
use crate::v1::GpuSample;

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
pub const COUNT: usize = 14;

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
];

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
        let mut proms: Vec<&str> = METRICS.iter().map(|m| m.prom).collect();
        proms.sort();
        proms.dedup();
        assert_eq!(proms.len(), METRICS.len(), "one gauge per metric");
        assert!(proms.iter().all(|p| p.starts_with("gpulse_gpu_")));
        assert_eq!(def.value(&s), Some(312.456), "scaled to watts");
    }
}
