//! `cargo xtask codegen`: regenerates `proto/src/generated/` from the `.proto` files.
fn main() -> anyhow::Result<()> {
    let out = gpulse_proto_codegen::committed_dir();
    gpulse_proto_codegen::generate(&out)?;
    eprintln!("generated {}", out.display());
    Ok(())
}
