//! A fake `libnvidia-ml.so` for tests: exports the part of the NVML C API that gpulse's sampler
//! calls through nvml-wrapper, answering from a scenario file named by
//! `$GPULSE_FAKE_NVML_SCENARIO` (JSON). Format: docs/fake-nvml.md.
//!
//! The scenario clock advances once per `nvmlDeviceGetCount_v2` call (the sampler calls it once
//! per sample): a field's value at tick `t` is `series[min(t, len - 1)]`. An empty series means
//! the GPU does not support the field (`NVML_ERROR_NOT_SUPPORTED`).
#![allow(clippy::missing_safety_doc, non_snake_case)]
// The C ABI entry points below are called by NVML users exactly as the real library is.

use std::{
    ffi::{c_char, c_int, c_uint, c_ulonglong},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Deserialize;

pub const SUCCESS: u32 = 0;
pub const ERROR_UNINITIALIZED: u32 = 1;
pub const ERROR_INVALID_ARGUMENT: u32 = 2;
pub const ERROR_NOT_SUPPORTED: u32 = 3;
pub const ERROR_INSUFFICIENT_SIZE: u32 = 7;
pub const ERROR_DRIVER_NOT_LOADED: u32 = 9;
pub const ERROR_GPU_IS_LOST: u32 = 15;
pub const ERROR_UNKNOWN: u32 = 999;

/// NVML error names accepted in scenario files.
pub fn code_of(name: &str) -> u32 {
    match name {
        "UNINITIALIZED" => 1,
        "INVALID_ARGUMENT" => 2,
        "NOT_SUPPORTED" => 3,
        "NO_PERMISSION" => 4,
        "NOT_FOUND" => 6,
        "INSUFFICIENT_POWER" => 8,
        "DRIVER_NOT_LOADED" => 9,
        "TIMEOUT" => 10,
        "LIBRARY_NOT_FOUND" => 12,
        "GPU_IS_LOST" => 15,
        "RESET_REQUIRED" => 16,
        "NO_DATA" => 21,
        _ => ERROR_UNKNOWN,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    #[serde(default = "default_driver")]
    pub driver_version: String,
    #[serde(default)]
    pub cuda_driver_version: i32,
    /// nvmlInit fails with this error (e.g. "DRIVER_NOT_LOADED").
    #[serde(default)]
    pub init_error: Option<String>,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

fn default_driver() -> String {
    "550.54.15".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub uuid: String,
    pub name: String,
    /// As NVML prints it: `00000000:3B:00.0`.
    pub pci_bus_id: String,
    #[serde(default)]
    pub gpu_util: Vec<u32>,
    #[serde(default)]
    pub mem_util: Vec<u32>,
    #[serde(default)]
    pub memory_total: u64,
    #[serde(default)]
    pub memory_used: Vec<u64>,
    #[serde(default)]
    pub temperature: Vec<u32>,
    #[serde(default)]
    pub power_usage_mw: Vec<u32>,
    #[serde(default)]
    pub power_limit_mw: Vec<u32>,
    #[serde(default)]
    pub sm_clock_mhz: Vec<u32>,
    #[serde(default)]
    pub mem_clock_mhz: Vec<u32>,
    #[serde(default)]
    pub throttle_reasons: Vec<u64>,
    #[serde(default)]
    pub ecc_corrected: Vec<u64>,
    #[serde(default)]
    pub ecc_uncorrected: Vec<u64>,
    #[serde(default)]
    pub pcie_replay: Vec<u32>,
    #[serde(default)]
    pub processes: Vec<Proc>,
    /// Fields reported as NOT_SUPPORTED even when a series is given.
    #[serde(default)]
    pub unsupported: Vec<String>,
    /// Fields that fail with an error during a tick range.
    #[serde(default)]
    pub errors: Vec<FieldError>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proc {
    pub pid: u32,
    /// None: NVML reports "not available" for this process's memory.
    #[serde(default)]
    pub used_memory: Option<u64>,
    /// "compute" or "graphics".
    #[serde(default = "compute")]
    pub kind: String,
    /// Present from this tick (inclusive) ...
    #[serde(default)]
    pub from: u64,
    /// ... until this tick (exclusive); absent: forever.
    #[serde(default)]
    pub until: Option<u64>,
}

fn compute() -> String {
    "compute".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldError {
    /// A field name (see docs/fake-nvml.md) or "handle" for the whole GPU.
    pub field: String,
    pub code: String,
    #[serde(default)]
    pub from: u64,
    #[serde(default)]
    pub until: Option<u64>,
}

struct State {
    scenario: Scenario,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);
static COUNT_CALLS: AtomicU64 = AtomicU64::new(0);

fn tick() -> u64 {
    COUNT_CALLS.load(Ordering::SeqCst).saturating_sub(1)
}

fn load() -> Result<Scenario, u32> {
    let Some(path) = std::env::var_os("GPULSE_FAKE_NVML_SCENARIO") else {
        return Ok(Scenario {
            driver_version: default_driver(),
            ..Scenario::default()
        });
    };
    let text = std::fs::read_to_string(path).map_err(|_| ERROR_UNKNOWN)?;
    serde_json::from_str(&text).map_err(|_| ERROR_UNKNOWN)
}

fn with_state<T>(f: impl FnOnce(&State) -> Result<T, u32>) -> Result<T, u32> {
    let guard = STATE.lock().map_err(|_| ERROR_UNKNOWN)?;
    match guard.as_ref() {
        Some(s) => f(s),
        None => Err(ERROR_UNINITIALIZED),
    }
}

fn ret(r: Result<(), u32>) -> u32 {
    match r {
        Ok(()) => SUCCESS,
        Err(e) => e,
    }
}

/// The GPU behind a handle (handles are index + 1).
fn with_gpu<T>(
    device: *mut u8,
    field: &str,
    f: impl FnOnce(&Gpu, u64) -> Result<T, u32>,
) -> Result<T, u32> {
    with_state(|s| {
        let idx = (device as usize)
            .checked_sub(1)
            .ok_or(ERROR_INVALID_ARGUMENT)?;
        let gpu = s.scenario.gpus.get(idx).ok_or(ERROR_INVALID_ARGUMENT)?;
        let t = tick();
        for e in &gpu.errors {
            if (e.field == field || e.field == "handle")
                && t >= e.from
                && e.until.is_none_or(|u| t < u)
            {
                return Err(code_of(&e.code));
            }
        }
        if gpu.unsupported.iter().any(|u| u == field) {
            return Err(ERROR_NOT_SUPPORTED);
        }
        f(gpu, t)
    })
}

fn at<T: Copy>(series: &[T], t: u64) -> Result<T, u32> {
    if series.is_empty() {
        return Err(ERROR_NOT_SUPPORTED);
    }
    Ok(series[(t as usize).min(series.len() - 1)])
}

unsafe fn write_str(dst: *mut c_char, len: c_uint, s: &str) -> Result<(), u32> {
    if dst.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    let bytes = s.as_bytes();
    if bytes.len() + 1 > len as usize {
        return Err(ERROR_INSUFFICIENT_SIZE);
    }
    // SAFETY: the caller gave a buffer of `len` bytes; we checked it fits with the NUL.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.cast::<u8>(), bytes.len());
        *dst.add(bytes.len()) = 0;
    }
    Ok(())
}

unsafe fn put<T>(dst: *mut T, v: T) -> Result<(), u32> {
    if dst.is_null() {
        return Err(ERROR_INVALID_ARGUMENT);
    }
    // SAFETY: non-null out-pointer supplied by the caller.
    unsafe { *dst = v };
    Ok(())
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInit_v2() -> u32 {
    let scenario = match load() {
        Ok(s) => s,
        Err(e) => return e,
    };
    if let Some(err) = &scenario.init_error {
        return code_of(err);
    }
    match STATE.lock() {
        Ok(mut g) => {
            *g = Some(State { scenario });
            COUNT_CALLS.store(0, Ordering::SeqCst);
            SUCCESS
        }
        Err(_) => ERROR_UNKNOWN,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> u32 {
    nvmlInit_v2()
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlShutdown() -> u32 {
    match STATE.lock() {
        Ok(mut g) => {
            *g = None;
            SUCCESS
        }
        Err(_) => ERROR_UNKNOWN,
    }
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlErrorString(_result: u32) -> *const c_char {
    c"fake NVML error".as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(version: *mut c_char, length: c_uint) -> u32 {
    // SAFETY: forwarded caller buffer.
    ret(with_state(|s| unsafe {
        write_str(version, length, &s.scenario.driver_version)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(v: *mut c_int) -> u32 {
    // SAFETY: forwarded caller pointer.
    ret(with_state(|s| unsafe {
        put(v, s.scenario.cuda_driver_version)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> u32 {
    ret(with_state(|s| {
        COUNT_CALLS.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded caller pointer.
        unsafe { put(count, s.scenario.gpus.len() as c_uint) }
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(index: c_uint, device: *mut *mut u8) -> u32 {
    let handle = (index as usize + 1) as *mut u8;
    // SAFETY: forwarded caller pointer.
    ret(with_gpu(handle, "handle", |_, _| unsafe {
        put(device, handle)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(device: *mut u8, index: *mut c_uint) -> u32 {
    // SAFETY: forwarded caller pointer.
    ret(with_gpu(device, "index", |_, _| unsafe {
        put(index, (device as usize - 1) as c_uint)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: *mut u8,
    uuid: *mut c_char,
    length: c_uint,
) -> u32 {
    // SAFETY: forwarded caller buffer.
    ret(with_gpu(device, "uuid", |g, _| unsafe {
        write_str(uuid, length, &g.uuid)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: *mut u8,
    name: *mut c_char,
    length: c_uint,
) -> u32 {
    // SAFETY: forwarded caller buffer.
    ret(with_gpu(device, "name", |g, _| unsafe {
        write_str(name, length, &g.name)
    }))
}

/// `nvmlPciInfo_t` (v3 layout).
#[repr(C)]
pub struct PciInfo {
    pub bus_id_legacy: [c_char; 16],
    pub domain: c_uint,
    pub bus: c_uint,
    pub device: c_uint,
    pub pci_device_id: c_uint,
    pub pci_sub_system_id: c_uint,
    pub bus_id: [c_char; 32],
}

fn parse_bus_id(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.split(':');
    let d = u32::from_str_radix(parts.next()?, 16).ok()?;
    let b = u32::from_str_radix(parts.next()?, 16).ok()?;
    let dev = u32::from_str_radix(parts.next()?.split('.').next()?, 16).ok()?;
    Some((d, b, dev))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(device: *mut u8, pci: *mut PciInfo) -> u32 {
    ret(with_gpu(device, "pci", |g, _| {
        if pci.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let (domain, bus, dev) = parse_bus_id(&g.pci_bus_id).ok_or(ERROR_UNKNOWN)?;
        let mut info = PciInfo {
            bus_id_legacy: [0; 16],
            domain,
            bus,
            device: dev,
            pci_device_id: 0x2330_10de,
            pci_sub_system_id: 0x16c1_10de,
            bus_id: [0; 32],
        };
        let legacy = format!("{:04X}:{:02X}:{:02X}.0", domain, bus, dev);
        for (i, b) in legacy.bytes().take(15).enumerate() {
            info.bus_id_legacy[i] = b as c_char;
        }
        for (i, b) in g.pci_bus_id.bytes().take(31).enumerate() {
            info.bus_id[i] = b as c_char;
        }
        // SAFETY: non-null out-pointer.
        unsafe { pci.write(info) };
        Ok(())
    }))
}

#[repr(C)]
pub struct Utilization {
    pub gpu: c_uint,
    pub memory: c_uint,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: *mut u8,
    u: *mut Utilization,
) -> u32 {
    ret(with_gpu(device, "utilization", |g, t| {
        let v = Utilization {
            gpu: at(&g.gpu_util, t)?,
            memory: at(&g.mem_util, t).unwrap_or(0),
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(u, v) }
    }))
}

#[repr(C)]
pub struct MemoryV2 {
    pub version: c_uint,
    pub total: c_ulonglong,
    pub reserved: c_ulonglong,
    pub free: c_ulonglong,
    pub used: c_ulonglong,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(device: *mut u8, m: *mut MemoryV2) -> u32 {
    ret(with_gpu(device, "memory", |g, t| {
        let used = at(&g.memory_used, t)?;
        if g.memory_total == 0 {
            return Err(ERROR_NOT_SUPPORTED);
        }
        let v = MemoryV2 {
            version: (std::mem::size_of::<MemoryV2>() | (2 << 24)) as c_uint,
            total: g.memory_total,
            reserved: 0,
            free: g.memory_total.saturating_sub(used),
            used,
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(m, v) }
    }))
}

macro_rules! scalar {
    ($fn:ident, $field:literal, $series:ident, $ty:ty) => {
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn $fn(device: *mut u8, out: *mut $ty) -> u32 {
            // SAFETY: forwarded caller pointer.
            ret(with_gpu(device, $field, |g, t| unsafe {
                put(out, at(&g.$series, t)? as $ty)
            }))
        }
    };
}

scalar!(
    nvmlDeviceGetPowerUsage,
    "power_usage",
    power_usage_mw,
    c_uint
);
scalar!(
    nvmlDeviceGetEnforcedPowerLimit,
    "power_limit",
    power_limit_mw,
    c_uint
);
scalar!(
    nvmlDeviceGetPcieReplayCounter,
    "pcie_replay",
    pcie_replay,
    c_uint
);
scalar!(
    nvmlDeviceGetCurrentClocksThrottleReasons,
    "throttle_reasons",
    throttle_reasons,
    c_ulonglong
);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: *mut u8,
    sensor: c_uint,
    temp: *mut c_uint,
) -> u32 {
    if sensor != 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    // SAFETY: forwarded caller pointer.
    ret(with_gpu(device, "temperature", |g, t| unsafe {
        put(temp, at(&g.temperature, t)?)
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetClockInfo(
    device: *mut u8,
    ty: c_uint,
    clock: *mut c_uint,
) -> u32 {
    // 0 graphics, 1 SM, 2 memory, 3 video.
    let field = match ty {
        1 => "sm_clock",
        2 => "mem_clock",
        _ => return ERROR_NOT_SUPPORTED,
    };
    ret(with_gpu(device, field, |g, t| {
        let v = if ty == 1 {
            at(&g.sm_clock_mhz, t)?
        } else {
            at(&g.mem_clock_mhz, t)?
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(clock, v) }
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEccErrors(
    device: *mut u8,
    error_type: c_uint,
    counter_type: c_uint,
    count: *mut c_ulonglong,
) -> u32 {
    if counter_type > 1 || error_type > 1 {
        return ERROR_INVALID_ARGUMENT;
    }
    ret(with_gpu(device, "ecc", |g, t| {
        let v = if error_type == 0 {
            at(&g.ecc_corrected, t)?
        } else {
            at(&g.ecc_uncorrected, t)?
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(count, v) }
    }))
}

/// `nvmlProcessInfo_t` (v2 layout, used by the `_v3` functions).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProcessInfo {
    pub pid: c_uint,
    pub used_gpu_memory: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// NVML's "not available" marker for per-process memory.
const NOT_AVAILABLE: u64 = u64::MAX;

unsafe fn processes(
    device: *mut u8,
    kind: &str,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> u32 {
    ret(with_gpu(device, "processes", |g, t| {
        if count.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        let live: Vec<ProcessInfo> = g
            .processes
            .iter()
            .filter(|p| p.kind == kind && t >= p.from && p.until.is_none_or(|u| t < u))
            .map(|p| ProcessInfo {
                pid: p.pid,
                used_gpu_memory: p.used_memory.unwrap_or(NOT_AVAILABLE),
                gpu_instance_id: u32::MAX,
                compute_instance_id: u32::MAX,
            })
            .collect();
        // SAFETY: count checked non-null; infos must hold *count entries when large enough.
        unsafe {
            if (*count as usize) < live.len() {
                *count = live.len() as c_uint;
                return Err(ERROR_INSUFFICIENT_SIZE);
            }
            if !live.is_empty() && infos.is_null() {
                return Err(ERROR_INVALID_ARGUMENT);
            }
            for (i, p) in live.iter().enumerate() {
                *infos.add(i) = *p;
            }
            *count = live.len() as c_uint;
        }
        Ok(())
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: *mut u8,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> u32 {
    // SAFETY: forwarded caller pointers.
    unsafe { processes(device, "compute", count, infos) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: *mut u8,
    count: *mut c_uint,
    infos: *mut ProcessInfo,
) -> u32 {
    // SAFETY: forwarded caller pointers.
    unsafe { processes(device, "graphics", count, infos) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_clamp_and_codes() {
        assert_eq!(at(&[1, 2, 3], 0), Ok(1));
        assert_eq!(at(&[1, 2, 3], 10), Ok(3));
        assert_eq!(at::<u32>(&[], 0), Err(ERROR_NOT_SUPPORTED));
        assert_eq!(code_of("GPU_IS_LOST"), 15);
        assert_eq!(code_of("whatever"), ERROR_UNKNOWN);
        assert_eq!(parse_bus_id("00000000:3B:00.0"), Some((0, 0x3b, 0)));
        assert_eq!(parse_bus_id("nope"), None);
    }

    #[test]
    fn scenario_format_rejects_typos() {
        let ok: Result<Scenario, _> = serde_json::from_str(
            r#"{"gpus":[{"uuid":"GPU-1","name":"x","pci_bus_id":"00000000:01:00.0","gpu_util":[1]}]}"#,
        );
        assert!(ok.is_ok());
        let typo: Result<Scenario, _> = serde_json::from_str(
            r#"{"gpus":[{"uuid":"GPU-1","name":"x","pci_bus_id":"0","gpu_utl":[1]}]}"#,
        );
        assert!(typo.is_err());
    }
}
