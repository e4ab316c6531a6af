//! Generates the gpulse.v1 Rust types, the file descriptor set (for gRPC reflection) and the
//! collector's raw `Ingest` server into `proto/src/generated/`, with a vendored protoc so no system
//! protoc is needed. The output is committed: every crate that speaks the contract builds without
//! protoc, and `tests/current.rs` fails when a `.proto` changed without `cargo xtask codegen`.
use std::path::{Path, PathBuf};

/// The `.proto` files, one per domain, relative to [`proto_root`].
pub const PROTOS: &[&str] = &[
    "gpulse/v1/health.proto",
    "gpulse/v1/events.proto",
    "gpulse/v1/ingest.proto",
    "gpulse/v1/telemetry.proto",
    "gpulse/v1/store.proto",
];

/// The generated files, relative to the output directory.
pub const OUTPUTS: &[&str] = &[
    "gpulse.v1.rs",
    "gpulse_descriptor.bin",
    "gpulse.v1.Ingest.raw.rs",
];

/// `proto/` in the source tree.
pub fn proto_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the committed generated code lives.
pub fn committed_dir() -> PathBuf {
    proto_root().join("src").join("generated")
}

/// Writes every file of [`OUTPUTS`] into `out`.
pub fn generate(out: &Path) -> anyhow::Result<()> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::fs::create_dir_all(out)?;
    let root = proto_root();
    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .out_dir(out)
        .file_descriptor_set_path(out.join("gpulse_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    raw_ingest(out)
}

/// The same `gpulse.v1.Ingest/Push` route, taking `RawBatch` (each event left as the bytes the
/// agent encoded) instead of `Batch`: the collector writes those bytes to its log as they came.
/// Server side only; agents send `RawBatch` through a plain tonic client, with each event as the
/// bytes their spool keeps.
fn raw_ingest(out: &Path) -> anyhow::Result<()> {
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
    let tmp = out.join("raw.tmp");
    std::fs::create_dir_all(&tmp)?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .out_dir(&tmp)
        .compile(&[ingest]);
    std::fs::rename(
        tmp.join("gpulse.v1.Ingest.rs"),
        out.join("gpulse.v1.Ingest.raw.rs"),
    )?;
    std::fs::remove_dir(&tmp)?;
    Ok(())
}
