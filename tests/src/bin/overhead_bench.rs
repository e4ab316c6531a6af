//! Agent overhead benchmark: CPU per event (agent user+system time plus the kernel programs' run
//! time from `kernel.bpf_stats_enabled`), kernel-side drops and RSS, with the agent sampling 8 fake
//! GPUs at 1 Hz, idle and under an open storm and an exec storm. Needs root. Run it with
//! `cargo xtask bench --overhead`.
#![allow(clippy::print_stdout, clippy::print_stderr)] // the report is this program's output

use std::{
    fs,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use gpulse_e2e::*;

/// Agent CPU (user + system) in nanoseconds.
fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    proc_cpu_ns(pid)
}

fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    proc_status_kib(pid, key)
}

/// Sum of run_time_ns / run_cnt over the BPF programs the agent holds open.
fn bpf_stats(pid: u32) -> (u64, u64) {
    let (mut t, mut n) = (0, 0);
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return (0, 0);
    };
    for e in dir.flatten() {
        let Ok(info) = fs::read_to_string(e.path()) else {
            continue;
        };
        if !info.contains("prog_type:") {
            continue;
        }
        for l in info.lines() {
            if let Some(v) = l.strip_prefix("run_time_ns:") {
                t += v.trim().parse::<u64>().unwrap_or(0);
            } else if let Some(v) = l.strip_prefix("run_cnt:") {
                n += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    (t, n)
}

struct Window {
    cpu: u64,
    bpf: u64,
    bpf_runs: u64,
    at: Instant,
}

fn window(pid: u32) -> anyhow::Result<Window> {
    let (bpf, bpf_runs) = bpf_stats(pid);
    Ok(Window {
        cpu: cpu_ns(pid)?,
        bpf,
        bpf_runs,
        at: Instant::now(),
    })
}

fn scenario_8_gpus(path: &Path) -> anyhow::Result<()> {
    let gpus: Vec<serde_json::Value> = (0..8)
        .map(|i| {
            serde_json::json!({
                "uuid": format!("GPU-0000000{i}-1111-2222-3333-444444444444"),
                "name": "NVIDIA H100 80GB HBM3",
                "pci_bus_id": format!("00000000:{:02X}:00.0", 0x18 + i * 0x10),
                "gpu_util": [10, 50, 90], "mem_util": [5, 25, 45],
                "memory_total": 85899345920u64, "memory_used": [1073741824u64, 42949672960u64],
                "temperature": [40, 60], "power_usage_mw": [100000, 500000], "power_limit_mw": [700000],
                "sm_clock_mhz": [1980], "mem_clock_mhz": [2619], "throttle_reasons": [0],
                "ecc_corrected": [0], "ecc_uncorrected": [0], "pcie_replay": [0],
                "processes": [{"pid": 1000 + i, "used_memory": 1073741824u64}]
            })
        })
        .collect();
    fs::write(path, serde_json::json!({"gpus": gpus}).to_string())?;
    Ok(())
}

/// Agent CPU per second when idle (sampling only), subtracted to get the marginal cost of events.
static IDLE_NS_PER_S: AtomicU64 = AtomicU64::new(0);

fn report(name: &str, a: &Window, b: &Window, events: u64, pid: u32) -> anyhow::Result<()> {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    let cpu = b.cpu - a.cpu;
    let idle = (IDLE_NS_PER_S.load(Ordering::Relaxed) as f64 * secs) as u64;
    let marginal = cpu.saturating_sub(idle);
    let bpf = b.bpf - a.bpf;
    let per = |ns: u64| {
        if events == 0 {
            0.0
        } else {
            ns as f64 / events as f64 / 1000.0
        }
    };
    println!(
        "{name:<36} {secs:>5.1} s  events={events:<7} ({:>6.0}/s)  agent cpu={:>6.1} ms ({:>5.2}% of a core)  bpf={:>6.1} ms / {} runs = {:.3} us/run  \
         per event: agent {:.3} us + bpf {:.3} us = {:.3} us (marginal over idle: {:.3} us)  RSS {} KiB (peak {} KiB)",
        events as f64 / secs,
        cpu as f64 / 1e6,
        cpu as f64 / secs / 1e7,
        bpf as f64 / 1e6,
        b.bpf_runs - a.bpf_runs,
        if b.bpf_runs > a.bpf_runs {
            bpf as f64 / (b.bpf_runs - a.bpf_runs) as f64 / 1000.0
        } else {
            0.0
        },
        per(cpu),
        per(bpf),
        per(cpu + bpf),
        per(marginal + bpf),
        status_kib(pid, "VmRSS:")?,
        status_kib(pid, "VmHWM:")?
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the overhead benchmark loads eBPF and enables kernel.bpf_stats_enabled: run it as root"
        );
    }
    let stats_path = "/proc/sys/kernel/bpf_stats_enabled";
    let old_stats = fs::read_to_string(stats_path).unwrap_or_else(|_| "0".into());
    fs::write(stats_path, "1").context("enabling kernel.bpf_stats_enabled")?;
    let res = run();
    let _ = fs::write(stats_path, old_stats.trim());
    res
}

fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dev = dir.path().join("dev");
    fs::create_dir_all(&dev)?;
    fs::write(dev.join("nvidia0"), b"")?;
    let scenario = dir.path().join("8gpus.json");
    scenario_8_gpus(&scenario)?;
    let (lib, _) = fake_nvml();
    let c = Collector::start(&dir.path().join("data"), free_port(), free_port(), &[])?;
    let node = marker("overhead");
    let log = dir.path().join("agent.log");
    let prefix = dev.join("nvidia").display().to_string();
    let url = c.url();
    let (lib_s, sc) = (lib.display().to_string(), scenario.display().to_string());
    let agent = Proc::spawn_env(
        "gpulse-agent",
        &[
            "--collector",
            &url,
            "--node",
            &node,
            "--gpu-device-prefix",
            &prefix,
            "--nvml",
            &lib_s,
            "--sample-interval-ms",
            "1000",
        ],
        &log,
        &[("GPULSE_FAKE_NVML_SCENARIO", sc.as_str())],
    )?;
    let pid = agent.child.id();
    wait_agent_live(&log, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(3));
    println!(
        "gpulse agent overhead: 8 fake GPUs sampled at 1 Hz, eBPF source, collector on loopback"
    );

    // Idle: sampling only.
    let a = window(pid)?;
    std::thread::sleep(Duration::from_secs(10));
    let b = window(pid)?;
    report("idle (8 GPUs @ 1 Hz)", &a, &b, 80, pid)?;
    let idle_secs = b.at.duration_since(a.at).as_secs_f64();
    IDLE_NS_PER_S.store(
        ((b.cpu - a.cpu) as f64 / idle_secs) as u64,
        Ordering::Relaxed,
    );
    let idle_rss = status_kib(pid, "VmRSS:")?;

    let devpath = dev.join("nvidia0");
    let plain = dir.path().join("not-a-gpu");
    fs::write(&plain, b"")?;
    let open_storm = |name: &str, path: &Path| -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let opens = Arc::new(AtomicU64::new(0));
        let a = window(pid)?;
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let (stop, opens, p) = (stop.clone(), opens.clone(), path.to_path_buf());
                std::thread::spawn(move || {
                    let start = Instant::now();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if fs::File::open(&p).is_ok() {
                            n += 1;
                            opens.fetch_add(1, Ordering::Relaxed);
                        }
                        // 5k/s per thread.
                        let due = start + Duration::from_micros(n * 200);
                        if let Some(d) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            let _ = w.join();
        }
        std::thread::sleep(Duration::from_millis(500));
        let b = window(pid)?;
        report(name, &a, &b, opens.load(Ordering::Relaxed), pid)
    };
    let exec_storm = |name: &str, script: &str, per_child: u64| -> anyhow::Result<()> {
        let a = window(pid)?;
        let started = Instant::now();
        let mut children = 0u64;
        while started.elapsed() < Duration::from_secs(8) {
            let mut batch = Vec::new();
            for _ in 0..16 {
                batch.push(
                    std::process::Command::new("/bin/sh")
                        .args(["-c", script])
                        .spawn()?,
                );
            }
            for mut ch in batch {
                ch.wait()?;
                children += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let b = window(pid)?;
        report(name, &a, &b, children * per_child, pid)
    };
    // The node's own work that is not GPU work: every openat and exec passes through the
    // programs and must cost little.
    open_storm("non-GPU open storm", &plain)?;
    // sh's exec of true: 2 execs + exits per child pass the tracepoints, none is a GPU process.
    exec_storm("non-GPU exec storm", "exec /bin/true", 2)?;
    // GPU work: a process reopening its device node (CUDA does) and short GPU processes.
    open_storm("GPU device reopen storm", &devpath)?;
    exec_storm(
        "GPU process storm (open+exec+exit)",
        &format!("exec 3<{}; exec /bin/true", devpath.display()),
        3,
    )?;

    std::thread::sleep(Duration::from_secs(2));
    let metrics = c.metrics()?;
    let dropped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("gpulse_agent_reported_dropped_events_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let gaps = value_of_metric(&metrics, "gpulse_ingest_seq_gap_events_total").unwrap_or(0.0);
    println!(
        "drops: agent-reported {dropped} (kernel ring, spool, samples shed), collector seq gaps {gaps}"
    );
    println!("idle RSS {idle_rss} KiB (target <= 12288 KiB)");
    Ok(())
}
