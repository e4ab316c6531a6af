//! The real nvml-wrapper code path against the fake libnvidia-ml.so (tests/fake-nvml), driven by
//! scenario files: several GPUs, unsupported fields, a GPU that errors, processes appearing and
//! disappearing, and no driver at all.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use gpulse_agent::nvml::{self, NvmlChoice};

/// The fake library holds one scenario per process: tests take turns.
static LOCK: Mutex<()> = Mutex::new(());

fn fake_lib() -> PathBuf {
    let dir = std::env::var_os("GPULSE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let lib = dir.join("libgpulse_fake_nvml.so");
    assert!(
        lib.exists(),
        "{} missing: run `cargo build -p gpulse-fake-nvml` (cargo xtask test does)",
        lib.display()
    );
    lib
}

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fake-nvml/scenarios")
        .join(name)
}

fn open(name: &str) -> Result<Option<nvml::Sampler>, nvml_wrapper::error::NvmlError> {
    // SAFETY: tests serialize on LOCK; no other thread reads the environment meanwhile.
    unsafe { std::env::set_var("GPULSE_FAKE_NVML_SCENARIO", scenario(name)) };
    nvml::open(&NvmlChoice::Path(fake_lib()))
}

#[test]
fn samples_several_gpus_with_unsupported_and_failing_fields() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let s = open("three-gpus.json").unwrap().unwrap();
    assert_eq!(s.driver_version(), "550.54.15");

    // Tick 0.
    let r = s.sample().unwrap();
    assert_eq!(r.len(), 3);
    let g0 = &r[0];
    assert_eq!(
        (g0.index, g0.uuid.as_str(), g0.pci.as_str()),
        (
            0,
            "GPU-11111111-2222-3333-4444-555555555555",
            "0000:3b:00.0"
        )
    );
    assert_eq!(g0.name, "NVIDIA H100 80GB HBM3");
    assert_eq!(g0.cuda_driver_version, "12.4");
    assert_eq!((g0.gpu_util_pct, g0.mem_util_pct), (Some(10), Some(5)));
    assert_eq!(
        (g0.mem_used_bytes, g0.mem_total_bytes),
        (Some(1073741824), Some(85899345920))
    );
    assert_eq!(
        (g0.temperature_c, g0.power_mw, g0.power_limit_mw),
        (Some(35), Some(70000), Some(700000))
    );
    assert_eq!((g0.sm_clock_mhz, g0.mem_clock_mhz), (Some(345), Some(2619)));
    assert_eq!(g0.throttle_reasons, Some(1));
    assert_eq!(g0.throttle_reason_names, vec!["gpu_idle"]);
    assert_eq!(
        (
            g0.ecc_corrected_volatile,
            g0.ecc_uncorrected_volatile,
            g0.pcie_replay_count
        ),
        (Some(0), Some(0), Some(0))
    );
    assert!(g0.processes.is_empty());
    assert!(g0.errors.is_empty(), "{:?}", g0.errors);

    // A GPU without power limit, ECC and PCIe replay support: absent, not zero, not errors.
    let g1 = &r[1];
    assert_eq!(g1.pci, "0001:af:00.0");
    assert_eq!(g1.power_limit_mw, None);
    assert_eq!(
        (g1.ecc_corrected_volatile, g1.ecc_uncorrected_volatile),
        (None, None)
    );
    assert_eq!(
        g1.pcie_replay_count, None,
        "listed as unsupported although a series exists"
    );
    assert_eq!(g1.power_mw, Some(15000));
    assert!(g1.errors.is_empty(), "{:?}", g1.errors);

    // A failing field is reported on its GPU only.
    let g2 = &r[2];
    assert_eq!(g2.temperature_c, None);
    assert_eq!(g2.errors.len(), 1);
    assert_eq!(g2.errors[0].field, "temperature");
    assert_eq!(g2.gpu_util_pct, Some(50));

    // Tick 1: values move; a compute process appeared on GPU 0.
    let r = s.sample().unwrap();
    assert_eq!(r[0].gpu_util_pct, Some(55));
    assert_eq!(r[0].processes.len(), 1);
    assert_eq!(
        (r[0].processes[0].pid, r[0].processes[0].used_memory_bytes),
        (4242, Some(41943040000))
    );
    assert_eq!(r[0].processes[0].r#type, "compute");

    // Tick 2: a graphics process joined (memory unknown); GPU 2 fell off: only its index and
    // the error, and the other GPUs are unaffected.
    let r = s.sample().unwrap();
    assert_eq!(r[0].processes.len(), 2);
    let gfx = r[0].processes.iter().find(|p| p.pid == 5151).unwrap();
    assert_eq!(
        (gfx.used_memory_bytes, gfx.r#type.as_str()),
        (None, "graphics")
    );
    assert_eq!(r[0].throttle_reason_names, vec!["sw_power_cap"]);
    assert_eq!(r[2].uuid, "");
    assert_eq!(r[2].errors.len(), 1);
    assert_eq!(r[2].errors[0].field, "handle");
    assert!(
        r[2].errors[0].error.contains("fell off the bus"),
        "{:?}",
        r[2].errors
    );
    assert_eq!(r[1].gpu_util_pct, Some(0));

    // Tick 3: the compute process is gone.
    let r = s.sample().unwrap();
    assert_eq!(
        r[0].processes.iter().map(|p| p.pid).collect::<Vec<_>>(),
        vec![5151]
    );
    // Past the end of a series the last value holds.
    assert_eq!(r[0].gpu_util_pct, Some(97));
}

#[test]
fn no_driver_is_a_clear_error_and_off_is_off() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let err = open("no-driver.json").err().expect("init must fail");
    assert!(
        matches!(err, nvml_wrapper::error::NvmlError::DriverNotLoaded),
        "{err:?}"
    );
    assert!(nvml::open(&NvmlChoice::Off).unwrap().is_none());
    let missing = nvml::open(&NvmlChoice::Path("/nonexistent/libnvidia-ml.so".into()));
    assert!(missing.is_err());
    assert!("".parse::<NvmlChoice>().is_err());
    assert_eq!("auto".parse::<NvmlChoice>(), Ok(NvmlChoice::Auto));
}

#[test]
fn health_evidence_remaps_retired_pages_nvlink_violations_fabric() {
    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let s = open("health-evidence.json").unwrap().unwrap();

    // Tick 0: a healthy Hopper with NVLink and a fabric still registering; a Volta that
    // retires pages instead of remapping rows.
    let r = s.sample().unwrap();
    let (h, v) = (&r[0], &r[1]);
    assert!(h.errors.is_empty(), "{:?}", h.errors);
    assert_eq!(h.memory_temperature_c, Some(45));
    assert_eq!(h.energy_mj, Some(1_000_000));
    assert_eq!(h.power_violation_ns, Some(0));
    assert_eq!(
        h.thermal_violation_ns, None,
        "unsupported: absent, not zero"
    );
    let remap = h.row_remap.unwrap();
    assert_eq!(
        (
            remap.correctable,
            remap.uncorrectable,
            remap.pending,
            remap.failure
        ),
        (0, 0, false, false)
    );
    assert_eq!(
        h.retired_pages, None,
        "a GPU that remaps rows retires no pages"
    );
    assert_eq!(
        h.nvlink.iter().map(|l| l.link).collect::<Vec<_>>(),
        vec![0, 1],
        "the inactive link 2 is skipped"
    );
    assert_eq!(h.nvlink[0].crc_flit, Some(0));
    let fabric = h.fabric.as_ref().unwrap();
    assert_eq!(fabric.state, "in_progress");
    assert_eq!(fabric.cluster_uuid, "01234567-89ab-cdef-0123-456789abcdef");

    assert_eq!(v.row_remap, None);
    let pages = v.retired_pages.unwrap();
    assert_eq!(
        (pages.single_bit, pages.double_bit, pages.pending),
        (1, 0, false)
    );
    assert!(v.nvlink.is_empty() && v.fabric.is_none() && v.memory_temperature_c.is_none());
    // A failing field is an error on that GPU, never a zero.
    assert_eq!(v.energy_mj, None);
    assert_eq!(
        v.errors
            .iter()
            .map(|e| e.field.as_str())
            .collect::<Vec<_>>(),
        vec!["energy"]
    );

    // Tick 1: a remap is pending, NVLink counts errors, the power limit held the clocks.
    let r = s.sample().unwrap();
    let h = &r[0];
    let remap = h.row_remap.unwrap();
    assert_eq!((remap.uncorrectable, remap.pending), (1, true));
    assert_eq!(
        (
            h.nvlink[0].crc_flit,
            h.nvlink[0].crc_data,
            h.nvlink[0].replay
        ),
        (Some(3), Some(1), Some(2))
    );
    assert_eq!(h.power_violation_ns, Some(500_000_000));
    let fabric = h.fabric.as_ref().unwrap();
    assert_eq!(
        (
            fabric.state.as_str(),
            fabric.status.as_str(),
            fabric.clique_id
        ),
        ("completed", "success", 7)
    );
    let pages = r[1].retired_pages.unwrap();
    assert_eq!((pages.double_bit, pages.pending), (1, true));

    // Tick 2: the remap failed; HBM runs warmer; link 1 recovered 4 times.
    let r = s.sample().unwrap();
    let h = &r[0];
    let remap = h.row_remap.unwrap();
    assert_eq!((remap.uncorrectable, remap.failure), (2, true));
    assert_eq!(h.memory_temperature_c, Some(58));
    assert_eq!(h.nvlink[1].recovery, Some(4));
}

#[test]
fn nvml_xid_events_are_captured_from_the_gpus_that_support_them() {
    use gpulse_agent::record::Captured;
    use gpulse_proto::v1::RecordSource;

    let _l = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let s = open("health-evidence.json").unwrap().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let stats = std::sync::Arc::new(gpulse_agent::stats::AgentStats::default());
    let watched = nvml::spawn_xid_events(&s, tx, stats.clone()).unwrap();
    assert_eq!(watched, 1, "GPU 1 does not support XID events");
    // Nothing is due before the scenario's tick 1.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(rx.try_recv().is_err());
    s.sample().unwrap(); // tick 1
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let rec = loop {
        match rx.try_recv() {
            Ok(Captured::Record(r)) => break r,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("no NVML XID event: {e:?}"),
        }
    };
    assert_eq!(rec.source, RecordSource::NvmlEvent);
    let dev = rec.dev_xid.unwrap();
    assert_eq!((dev.code, dev.dev.as_str()), (79, "0000:3b:00.0"));
    assert!(
        rec.text.starts_with("NVRM: Xid (PCI:0000:3b:00.0): 79,"),
        "{}",
        rec.text
    );
    assert_eq!(
        gpulse_agent::stats::AgentStats::get(&stats.nvml_xid_events),
        1
    );
    // The thread stops once nobody listens.
    drop(rx);
    std::thread::sleep(std::time::Duration::from_millis(1200));
}
