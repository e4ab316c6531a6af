//! Re-run the eBPF build when the bpf-linker on PATH changes (it is rebuilt when the nightly's
//! LLVM changes; see `cargo xtask setup`).
use std::path::PathBuf;

fn main() {
    if let Ok(p) = which::which("bpf-linker") {
        let p: PathBuf = p;
        println!("cargo:rerun-if-changed={}", p.display());
    }
}
