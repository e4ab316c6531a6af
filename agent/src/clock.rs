//! Kernel clocks to UTC wall clock, converted once, in the agent.
//!
//! eBPF records carry `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME, counts suspend); /dev/kmsg
//! records carry the printk clock (`local_clock()`, which tracks CLOCK_MONOTONIC and stops in
//! suspend). Each is converted with `realtime - <that clock>`, sampled tightly around the read so
//! NTP steps and slews since start-up are honoured.

/// Which kernel clock a timestamp was taken on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelClock {
    Boottime,
    Monotonic,
}

fn read(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out-pointer; clock_gettime cannot fail for these clocks.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Current `realtime - clock` offset in nanoseconds, from the tightest of a few samples.
pub fn offset_ns(clock: KernelClock) -> i128 {
    let id = match clock {
        KernelClock::Boottime => libc::CLOCK_BOOTTIME,
        KernelClock::Monotonic => libc::CLOCK_MONOTONIC,
    };
    let mut best: Option<(i128, i128)> = None;
    for _ in 0..3 {
        let r1 = read(libc::CLOCK_REALTIME);
        let k = read(id);
        let r2 = read(libc::CLOCK_REALTIME);
        let width = r2 - r1;
        let off = r1 + width / 2 - k;
        if best.is_none_or(|(w, _)| width < w) {
            best = Some((width, off));
        }
    }
    best.map_or(0, |(_, off)| off)
}

/// Converts a kernel timestamp to Unix nanoseconds (UTC).
pub fn to_unix_ns(clock: KernelClock, kernel_ns: u64) -> i128 {
    i128::from(kernel_ns) + offset_ns(clock)
}

/// Now on the given kernel clock (for tests and staleness checks).
pub fn now_ns(clock: KernelClock) -> u64 {
    let id = match clock {
        KernelClock::Boottime => libc::CLOCK_BOOTTIME,
        KernelClock::Monotonic => libc::CLOCK_MONOTONIC,
    };
    read(id).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{SystemTime, UNIX_EPOCH};

    #[test]
    fn boot_time_converts_to_now() {
        for clock in [KernelClock::Boottime, KernelClock::Monotonic] {
            let wall = to_unix_ns(clock, now_ns(clock));
            let sys = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as i128;
            assert!(
                (wall - sys).abs() < 50_000_000,
                "{clock:?}: off by {} ns",
                wall - sys
            );
        }
        // Boottime never runs behind monotonic.
        assert!(now_ns(KernelClock::Boottime) + 1_000_000 >= now_ns(KernelClock::Monotonic));
    }
}
