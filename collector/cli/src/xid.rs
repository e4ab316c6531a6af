//! `gpulse xid explain|parse`: NVIDIA's catalog and the kernel-record decoder, offline.
use std::io::{self, BufRead, Write};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use gpulse_xid::{Decoder, catalog, parse::strip_rendering};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum XidCmd {
    /// What an XID code means and what to do about it.
    Explain {
        /// XID code, e.g. 79.
        code: u32,
        #[arg(long)]
        json: bool,
    },
    /// Decode kernel log lines from stdin (dmesg, journalctl or /dev/kmsg text) as JSON lines.
    Parse,
}

pub fn render_explain(info: &catalog::XidInfo) -> String {
    let or_none = |s: &'static str| if s.is_empty() { "(none given)" } else { s };
    format!(
        "XID {}: {}\n  meaning:            {}\n  severity (default): {}\n  immediate action:   {}\n  investigate:        {}\n",
        info.code,
        info.mnemonic,
        info.description,
        info.severity,
        or_none(info.immediate_action),
        or_none(info.investigatory_action)
    )
}

fn explain(code: u32, as_json: bool) -> anyhow::Result<()> {
    let Some(info) = catalog::lookup(code) else {
        bail!(catalog::not_catalogued(code));
    };
    let mut out = io::stdout().lock();
    if as_json {
        writeln!(out, "{}", serde_json::to_string(info)?)?;
    } else {
        write!(out, "{}", render_explain(info))?;
    }
    Ok(())
}

fn parse_stdin() -> anyhow::Result<()> {
    let mut d = Decoder::default();
    let mut out = io::stdout().lock();
    for (i, line) in io::stdin().lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        match d.feed(i as u64, strip_rendering(&line)) {
            Some(dec) => writeln!(
                out,
                "{}",
                json!({"severity": dec.severity, "gpu_uuid": dec.gpu_uuid, "record": dec.record})
            )?,
            None => eprintln!("gpulse: line {}: not an NVIDIA driver record", i + 1),
        }
    }
    Ok(())
}

pub fn run(cmd: XidCmd) -> anyhow::Result<()> {
    match cmd {
        XidCmd::Explain { code, json } => explain(code, json),
        XidCmd::Parse => parse_stdin(),
    }
}
