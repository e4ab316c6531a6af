//! Generates the gpulse.v1 Rust types with a vendored protoc, so no system protoc is needed.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("gpulse_descriptor.bin"))
        .compile_protos(&["gpulse/v1/gpulse.proto"], &["."])?;
    println!("cargo:rerun-if-changed=gpulse/v1/gpulse.proto");
    Ok(())
}
