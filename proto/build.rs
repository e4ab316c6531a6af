//! Generates the gpulse.v1 Rust types with a vendored protoc, so no system protoc is needed,
//! and the collector's raw `Ingest` server (see `src/raw.rs`).
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("gpulse_descriptor.bin"))
        .compile_protos(&["gpulse/v1/gpulse.proto"], &["."])?;

    // The same `gpulse.v1.Ingest/Push` route, taking `RawBatch` (each event left as the bytes
    // the agent encoded) instead of `Batch`: the collector writes those bytes to its log as
    // they came. Server side only; agents send `RawBatch` through a plain tonic client too, with
    // each event as the bytes their spool keeps.
    let ingest = tonic_build::manual::Service::builder()
        .name("Ingest")
        .package("gpulse.v1")
        .method(
            tonic_build::manual::Method::builder()
                .name("push")
                .route_name("Push")
                .input_type("crate::raw::RawBatch")
                .output_type("crate::v1::Ack")
                .codec_path("tonic_prost::ProstCodec")
                .client_streaming()
                .server_streaming()
                .build(),
        )
        .build();
    std::fs::create_dir_all(out.join("raw"))?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .out_dir(out.join("raw"))
        .compile(&[ingest]);
    println!("cargo:rerun-if-changed=gpulse/v1/gpulse.proto");
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
