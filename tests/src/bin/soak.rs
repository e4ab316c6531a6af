//! `gpulse-soak [--short]`: the fault matrix against the built binaries (`$GPULSE_BIN_DIR`),
//! printed as one table; exits non-zero if a row failed. `cargo xtask soak` builds release
//! binaries and runs the full form; the test command runs the short one.
#![allow(clippy::print_stdout, clippy::print_stderr)] // a harness reporting to its user

use std::time::{Duration, Instant};

use gpulse_e2e::soak;

fn main() -> anyhow::Result<()> {
    let short = std::env::args().any(|a| a == "--short");
    let s = Duration::from_secs;
    let t = Instant::now();
    let rows = if short {
        vec![
            soak::kill9_loop(s(4), s(16), 4, 5000, 4),
            soak::stalled_subscriber(64, 10_000, s(4)),
            soak::restart_memory(24, 48),
            soak::sigterm_streams(100),
            soak::unknown_payload(),
            soak::collector_outage(s(10), false),
            soak::agent_kill_restart(),
            soak::collector_outage(s(3), true),
            soak::data_dir_full(),
        ]
    } else {
        vec![
            soak::kill9_loop(s(20), s(120), 4, 5000, 4),
            soak::stalled_subscriber(64, 10_000, s(20)),
            soak::restart_memory(256, 512),
            soak::sigterm_streams(100),
            soak::unknown_payload(),
            soak::collector_outage(s(300), false),
            soak::agent_kill_restart(),
            soak::collector_outage(s(10), true),
            soak::data_dir_full(),
        ]
    };
    println!("{}", soak::table(&rows));
    println!(
        "soak ({}): {:.0} s",
        if short { "short" } else { "full" },
        t.elapsed().as_secs_f64()
    );
    let failed = rows.iter().filter(|r| r.ok == Some(false)).count();
    anyhow::ensure!(failed == 0, "{failed} row(s) failed");
    Ok(())
}
