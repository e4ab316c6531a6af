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
pub const ERROR_TIMEOUT: u32 = 10;
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
    #[serde(default)]
    pub memory_temperature: Vec<u32>,
    #[serde(default)]
    pub energy_mj: Vec<u64>,
    #[serde(default)]
    pub power_violation_ns: Vec<u64>,
    #[serde(default)]
    pub thermal_violation_ns: Vec<u64>,
    #[serde(default)]
    pub row_remap: Vec<RowRemap>,
    #[serde(default)]
    pub retired_pages: Vec<RetiredPages>,
    /// NVLinks in link order (link i is `nvlink[i]`); empty: no NVLink.
    #[serde(default)]
    pub nvlink: Vec<NvLink>,
    #[serde(default)]
    pub fabric: Vec<Fabric>,
    /// 32 hex digits, the fabric's cluster UUID.
    #[serde(default)]
    pub fabric_cluster_uuid: String,
    /// Critical-XID events, each delivered once the scenario clock reaches its tick.
    #[serde(default)]
    pub xid_events: Vec<XidEvent>,
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

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RowRemap {
    #[serde(default)]
    pub correctable: u32,
    #[serde(default)]
    pub uncorrectable: u32,
    #[serde(default)]
    pub pending: bool,
    #[serde(default)]
    pub failure: bool,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetiredPages {
    #[serde(default)]
    pub single_bit: u32,
    #[serde(default)]
    pub double_bit: u32,
    #[serde(default)]
    pub pending: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvLink {
    #[serde(default = "yes")]
    pub active: bool,
    #[serde(default)]
    pub crc_flit: Vec<u64>,
    #[serde(default)]
    pub crc_data: Vec<u64>,
    #[serde(default)]
    pub replay: Vec<u64>,
    #[serde(default)]
    pub recovery: Vec<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fabric {
    /// NVML_GPU_FABRIC_STATE_*: 0 not supported, 1 not started, 2 in progress, 3 completed.
    pub state: u8,
    /// The registration's NVML return code (0 success).
    #[serde(default)]
    pub status: u32,
    #[serde(default)]
    pub clique_id: u32,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XidEvent {
    pub tick: u64,
    pub code: u64,
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
/// XID events already delivered: (GPU index, event index).
static DELIVERED: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
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
            if let Ok(mut d) = DELIVERED.lock() {
                d.clear();
            }
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

scalar!(
    nvmlDeviceGetTotalEnergyConsumption,
    "energy",
    energy_mj,
    c_ulonglong
);

/// `nvmlViolationTime_t`.
#[repr(C)]
pub struct ViolationTime {
    pub reference_time: c_ulonglong,
    pub violation_time: c_ulonglong,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetViolationStatus(
    device: *mut u8,
    policy: c_uint,
    out: *mut ViolationTime,
) -> u32 {
    ret(with_gpu(device, "violation", |g, t| {
        // NVML_PERF_POLICY_POWER = 0, NVML_PERF_POLICY_THERMAL = 1.
        let v = match policy {
            0 => at(&g.power_violation_ns, t)?,
            1 => at(&g.thermal_violation_ns, t)?,
            _ => return Err(ERROR_NOT_SUPPORTED),
        };
        let r = ViolationTime {
            reference_time: t * 1_000_000,
            violation_time: v,
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(out, r) }
    }))
}

/// `nvmlFieldValue_t`.
#[repr(C)]
pub struct FieldValue {
    pub field_id: c_uint,
    pub scope_id: c_uint,
    pub timestamp: i64,
    pub latency_usec: i64,
    /// nvmlValueType_t: 1 unsigned int.
    pub value_type: c_uint,
    pub nvml_return: c_uint,
    pub value: c_ulonglong,
}

/// NVML_FI_DEV_MEMORY_TEMP.
const FI_DEV_MEMORY_TEMP: u32 = 82;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: *mut u8,
    count: c_int,
    values: *mut FieldValue,
) -> u32 {
    ret(with_gpu(device, "field_values", |g, t| {
        if values.is_null() || count <= 0 {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        for i in 0..count as usize {
            // SAFETY: the caller passed `count` entries.
            let v = unsafe { &mut *values.add(i) };
            let r = if v.field_id == FI_DEV_MEMORY_TEMP
                && !g.unsupported.iter().any(|u| u == "memory_temperature")
            {
                at(&g.memory_temperature, t)
            } else {
                Err(ERROR_NOT_SUPPORTED)
            };
            v.value_type = 1;
            match r {
                Ok(x) => {
                    v.nvml_return = SUCCESS;
                    v.value = u64::from(x);
                }
                Err(e) => v.nvml_return = e,
            }
        }
        Ok(())
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRemappedRows(
    device: *mut u8,
    corr: *mut c_uint,
    unc: *mut c_uint,
    pending: *mut c_uint,
    failure: *mut c_uint,
) -> u32 {
    ret(with_gpu(device, "row_remap", |g, t| {
        let r = at(&g.row_remap, t)?;
        // SAFETY: forwarded caller pointers.
        unsafe {
            put(corr, r.correctable)?;
            put(unc, r.uncorrectable)?;
            put(pending, u32::from(r.pending))?;
            put(failure, u32::from(r.failure))
        }
    }))
}

/// Retired pages of `cause` (0 multiple single-bit, 1 double-bit) at the current tick.
fn retired(g: &Gpu, t: u64, cause: c_uint) -> Result<u32, u32> {
    let r = at(&g.retired_pages, t)?;
    match cause {
        0 => Ok(r.single_bit),
        1 => Ok(r.double_bit),
        _ => Err(ERROR_INVALID_ARGUMENT),
    }
}

unsafe fn retired_pages(
    device: *mut u8,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> u32 {
    ret(with_gpu(device, "retired_pages", |g, t| {
        let n = retired(g, t, cause)?;
        if count.is_null() {
            return Err(ERROR_INVALID_ARGUMENT);
        }
        // SAFETY: count checked non-null; the arrays hold *count entries when large enough.
        unsafe {
            if *count < n {
                *count = n;
                return Err(ERROR_INSUFFICIENT_SIZE);
            }
            for i in 0..n as usize {
                if !addresses.is_null() {
                    *addresses.add(i) = 0x1000 * (i as u64 + 1);
                }
                if !timestamps.is_null() {
                    *timestamps.add(i) = 1_700_000_000 + i as u64;
                }
            }
            *count = n;
        }
        Ok(())
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages(
    device: *mut u8,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
) -> u32 {
    // SAFETY: forwarded caller pointers.
    unsafe { retired_pages(device, cause, count, addresses, std::ptr::null_mut()) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPages_v2(
    device: *mut u8,
    cause: c_uint,
    count: *mut c_uint,
    addresses: *mut c_ulonglong,
    timestamps: *mut c_ulonglong,
) -> u32 {
    // SAFETY: forwarded caller pointers.
    unsafe { retired_pages(device, cause, count, addresses, timestamps) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetRetiredPagesPendingStatus(
    device: *mut u8,
    pending: *mut c_uint,
) -> u32 {
    ret(with_gpu(device, "retired_pages", |g, t| {
        let r = at(&g.retired_pages, t)?;
        // SAFETY: forwarded caller pointer.
        unsafe { put(pending, u32::from(r.pending)) }
    }))
}

/// The scenario's NVLink `link` of a GPU: NOT_SUPPORTED without NVLink, INVALID_ARGUMENT past
/// its last link (as NVML answers).
fn link_of(g: &Gpu, link: c_uint) -> Result<&NvLink, u32> {
    if g.nvlink.is_empty() {
        return Err(ERROR_NOT_SUPPORTED);
    }
    g.nvlink.get(link as usize).ok_or(ERROR_INVALID_ARGUMENT)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkState(
    device: *mut u8,
    link: c_uint,
    active: *mut c_uint,
) -> u32 {
    ret(with_gpu(device, "nvlink", |g, _| {
        let l = link_of(g, link)?;
        // SAFETY: forwarded caller pointer.
        unsafe { put(active, u32::from(l.active)) }
    }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetNvLinkErrorCounter(
    device: *mut u8,
    link: c_uint,
    counter: c_uint,
    value: *mut c_ulonglong,
) -> u32 {
    ret(with_gpu(device, "nvlink", |g, t| {
        let l = link_of(g, link)?;
        // NVML_NVLINK_ERROR_DL_REPLAY 0, _RECOVERY 1, _CRC_FLIT 2, _CRC_DATA 3.
        let series = match counter {
            0 => &l.replay,
            1 => &l.recovery,
            2 => &l.crc_flit,
            3 => &l.crc_data,
            _ => return Err(ERROR_INVALID_ARGUMENT),
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(value, at(series, t)?) }
    }))
}

/// `nvmlGpuFabricInfo_t`.
#[repr(C)]
pub struct FabricInfo {
    pub cluster_uuid: [u8; 16],
    pub status: c_uint,
    pub clique_id: c_uint,
    pub state: u8,
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuFabricInfo(device: *mut u8, out: *mut FabricInfo) -> u32 {
    ret(with_gpu(device, "fabric", |g, t| {
        let f = at(&g.fabric, t)?;
        let mut cluster_uuid = [0u8; 16];
        for (i, b) in cluster_uuid.iter_mut().enumerate() {
            *b = g
                .fabric_cluster_uuid
                .get(2 * i..2 * i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .unwrap_or(0);
        }
        let v = FabricInfo {
            cluster_uuid,
            status: f.status,
            clique_id: f.clique_id,
            state: f.state,
        };
        // SAFETY: forwarded caller pointer.
        unsafe { put(out, v) }
    }))
}

/// nvmlEventTypeXidCriticalError.
const EVENT_XID_CRITICAL: u64 = 0x8;
/// The one event set this library hands out (any non-null value works as a handle).
const EVENT_SET: usize = 0x5e7;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut *mut u8) -> u32 {
    // SAFETY: forwarded caller pointer.
    ret(with_state(|_| unsafe { put(set, EVENT_SET as *mut u8) }))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlEventSetFree(set: *mut u8) -> u32 {
    if set as usize == EVENT_SET {
        SUCCESS
    } else {
        ERROR_INVALID_ARGUMENT
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(device: *mut u8, types: *mut u64) -> u32 {
    // SAFETY: forwarded caller pointer.
    ret(with_gpu(device, "xid_events", |_, _| unsafe {
        put(types, EVENT_XID_CRITICAL)
    }))
}

#[unsafe(no_mangle)]
pub extern "C" fn nvmlDeviceRegisterEvents(device: *mut u8, types: u64, set: *mut u8) -> u32 {
    if set as usize != EVENT_SET || types & !EVENT_XID_CRITICAL != 0 {
        return ERROR_INVALID_ARGUMENT;
    }
    ret(with_gpu(device, "xid_events", |_, _| Ok(())))
}

/// `nvmlEventData_t`.
#[repr(C)]
pub struct EventData {
    pub device: *mut u8,
    pub event_type: c_ulonglong,
    pub event_data: c_ulonglong,
    pub gpu_instance_id: c_uint,
    pub compute_instance_id: c_uint,
}

/// The first XID event due (its tick reached) and not yet delivered; marks it delivered.
fn next_xid_event() -> Result<Option<(usize, u64)>, u32> {
    with_state(|s| {
        let t = tick();
        let mut delivered = DELIVERED.lock().map_err(|_| ERROR_UNKNOWN)?;
        for (gi, g) in s.scenario.gpus.iter().enumerate() {
            for (ei, e) in g.xid_events.iter().enumerate() {
                if e.tick <= t && !delivered.contains(&(gi, ei)) {
                    delivered.push((gi, ei));
                    return Ok(Some((gi, e.code)));
                }
            }
        }
        Ok(None)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: *mut u8,
    data: *mut EventData,
    timeout_ms: c_uint,
) -> u32 {
    if set as usize != EVENT_SET || data.is_null() {
        return ERROR_INVALID_ARGUMENT;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms.into());
    loop {
        match next_xid_event() {
            Err(e) => return e,
            Ok(Some((gpu, code))) => {
                let ev = EventData {
                    device: (gpu + 1) as *mut u8,
                    event_type: EVENT_XID_CRITICAL,
                    event_data: code,
                    gpu_instance_id: u32::MAX,
                    compute_instance_id: u32::MAX,
                };
                // SAFETY: checked non-null above.
                unsafe { data.write(ev) };
                return SUCCESS;
            }
            Ok(None) if std::time::Instant::now() >= deadline => return ERROR_TIMEOUT,
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
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
