//! Synthetic GPU-shaped sample data for the benchmarks: 30 integer fields per GPU per second,
//! modelled on NVML/DCGM fields of a training node. Jobs come and go (busy ~70 % of the time);
//! while busy, utilisation, power, PCIe/NVLink throughput and activity ratios are noisy every
//! second, memory in use steps now and then, temperatures drift by a degree, and clocks, limits
//! and error counters mostly hold still. Timestamps carry the sampler's few-ms jitter.
#![allow(dead_code)]

pub const FIELDS: usize = 30;

/// xorshift64*: deterministic, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next_u64() % ((hi - lo + 1) as u64)) as i64
    }
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// One GPU's sampler state.
pub struct Gpu {
    rng: Rng,
    busy: bool,
    phase_left: i64,
    mem_used: i64,
    temp: i64,
    mem_temp: i64,
    energy_mj: i64,
    clock: i64,
}

impl Gpu {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: Rng::new(seed * 7919 + 17),
            busy: true,
            phase_left: 1800,
            mem_used: 61_000_000_000,
            temp: 68,
            mem_temp: 72,
            energy_mj: 4_000_000_000,
            clock: 1980,
        }
    }

    /// The next second's row.
    pub fn row(&mut self) -> [f64; FIELDS] {
        let r = &mut self.rng;
        self.phase_left -= 1;
        if self.phase_left <= 0 {
            self.busy = !self.busy;
            self.phase_left = if self.busy {
                r.range(1200, 3600)
            } else {
                r.range(300, 1200)
            };
            self.mem_used = if self.busy {
                r.range(40_000, 78_000) * 1_000_000
            } else {
                536_870_912
            };
        }
        let b = self.busy;
        if b && r.chance(0.003) {
            self.mem_used += r.range(-2048, 2048) * 1_048_576;
        }
        let target = if b { 70 } else { 35 };
        if r.chance(0.1) {
            self.temp += (target - self.temp).signum();
        }
        if r.chance(0.08) {
            self.mem_temp += (target + 4 - self.mem_temp).signum();
        }
        if b && r.chance(0.01) {
            self.clock = if self.clock == 1980 { 1755 } else { 1980 };
        }
        let power = if b {
            r.range(560_000, 660_000)
        } else {
            r.range(68_000, 74_000)
        };
        self.energy_mj += power;
        let n = |r: &mut Rng, lo: i64, hi: i64| if b { r.range(lo, hi) } else { 0 };
        let row = [
            n(r, 90, 100),                      // gpu_util_pct
            n(r, 25, 60),                       // mem_util_pct
            self.mem_used,                      // mem_used_bytes
            85_899_345_920,                     // mem_total_bytes
            self.temp,                          // temperature_c
            power,                              // power_mw
            700_000,                            // power_limit_mw
            if b { self.clock } else { 345 },   // sm_clock_mhz
            2619,                               // mem_clock_mhz
            0,                                  // ecc_corrected
            0,                                  // ecc_uncorrected
            0,                                  // pcie_replays
            i64::from(b && self.clock != 1980), // throttled
            i64::from(b),                       // process_count
            self.energy_mj,                     // total_energy_mj (counter)
            n(r, 200, 25_000),                  // pcie_tx_kbps
            n(r, 200, 25_000),                  // pcie_rx_kbps
            n(r, 10_000, 60_000),               // nvlink_tx_mbps
            n(r, 10_000, 60_000),               // nvlink_rx_mbps
            0,                                  // fan_pct (passive cooling)
            self.mem_temp,                      // memory_temperature_c
            1755,                               // video_clock_mhz
            0,                                  // enc_util_pct
            0,                                  // dec_util_pct
            n(r, 80, 97),                       // sm_active_pct
            n(r, 35, 60),                       // sm_occupancy_pct
            n(r, 20, 70),                       // tensor_active_pct
            n(r, 25, 60),                       // dram_active_pct
            0,                                  // xid_count
            0,                                  // retired_pages
        ];
        row.map(|v| v as f64)
    }
}

/// `seconds` rows for `gpus` GPUs from `t0_ms`, 1 s apart with a few ms of jitter:
/// (gpu, ts_ms, row), time-major like an agent's stream.
pub fn gpu_shaped(gpus: u32, seconds: i64, t0_ms: i64) -> Vec<(u32, i64, [f64; FIELDS])> {
    let mut g: Vec<Gpu> = (0..gpus).map(|i| Gpu::new(u64::from(i) + 1)).collect();
    let mut jitter = Rng::new(99);
    let mut out = Vec::with_capacity((gpus as i64 * seconds) as usize);
    for s in 0..seconds {
        for (i, gpu) in g.iter_mut().enumerate() {
            let ts = t0_ms + s * 1000 + jitter.range(0, 4);
            out.push((i as u32, ts, gpu.row()));
        }
    }
    out
}

/// Same timestamps, every field constant.
pub fn constant(gpus: u32, seconds: i64, t0_ms: i64) -> Vec<(u32, i64, [f64; FIELDS])> {
    let mut v = gpu_shaped(gpus, seconds, t0_ms);
    for (_, _, row) in &mut v {
        for (i, x) in row.iter_mut().enumerate() {
            *x = (i * 1000) as f64;
        }
    }
    v
}

/// Same timestamps, every field uniformly random doubles in [0, 1).
pub fn random(gpus: u32, seconds: i64, t0_ms: i64) -> Vec<(u32, i64, [f64; FIELDS])> {
    let mut v = gpu_shaped(gpus, seconds, t0_ms);
    let mut r = Rng::new(4242);
    for (_, _, row) in &mut v {
        for x in row.iter_mut() {
            *x = (r.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        }
    }
    v
}
