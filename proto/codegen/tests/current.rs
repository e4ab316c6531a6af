//! The committed generated code is what the `.proto` files generate today: a `.proto` edit
//! without `cargo xtask codegen` fails here, naming the stale file.
use gpulse_proto_codegen::{OUTPUTS, committed_dir, generate};

#[test]
fn committed_code_matches_the_protos() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path()).unwrap();
    for name in OUTPUTS {
        let fresh = std::fs::read(dir.path().join(name)).unwrap();
        let committed = std::fs::read(committed_dir().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}; run `cargo xtask codegen`"));
        assert!(
            fresh == committed,
            "proto/src/generated/{name} is stale: run `cargo xtask codegen` and commit the result"
        );
    }
    let extra: Vec<String> = std::fs::read_dir(committed_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !OUTPUTS.contains(&n.as_str()))
        .collect();
    assert!(
        extra.is_empty(),
        "files in proto/src/generated that codegen does not write: {extra:?}"
    );
}
