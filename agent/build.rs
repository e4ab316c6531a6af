//! Builds the eBPF object (agent-ebpf) with the nightly toolchain through aya-build and leaves
//! it in OUT_DIR for `include_bytes_aligned!`.
//!
//! bpf-linker is looked up on PATH and in the gpulse tools directory that `cargo xtask setup`
//! fills (`$GPULSE_TOOLS_DIR`, default `~/.local/share/gpulse-tools`). `AYA_BUILD_SKIP=1` skips
//! the eBPF build; the agent then runs with the /dev/kmsg source only and says so.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn tools_dir() -> Option<PathBuf> {
    if let Some(d) = env::var_os("GPULSE_TOOLS_DIR") {
        return Some(PathBuf::from(d));
    }
    env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share/gpulse-tools"))
}

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=GPULSE_TOOLS_DIR");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let obj = out_dir.join("gpulse-ebpf");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // An empty object tells the agent at run time that eBPF was left out of this build.
        fs::write(&obj, b"").context("writing empty eBPF placeholder")?;
        return Ok(());
    }
    if let Some(tools) = tools_dir() {
        let bin = tools.join("bin");
        let path = env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.clone()];
        paths.extend(env::split_paths(&path));
        let joined = env::join_paths(paths).context("joining PATH")?;
        // SAFETY: build scripts are single-threaded; aya-build's nested cargo inherits PATH.
        unsafe { env::set_var("PATH", joined) };
        println!(
            "cargo:rerun-if-changed={}",
            bin.join("bpf-linker").display()
        );
    }
    // The eBPF crate found the aya-build way: by name in the workspace's metadata.
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "gpulse-agent-ebpf")
        .ok_or_else(|| anyhow!("gpulse-agent-ebpf is not in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF object failed; run `cargo xtask setup` (installs nightly rust-src and bpf-linker)")?;
    Ok(())
}
