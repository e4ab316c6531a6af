//! docs/development.md lists every test file, so a maintainer finds each test where the page
//! says it is.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::{Path, PathBuf};

/// Every `*.rs` directly in a `tests/` directory of the workspace (helpers in subfolders such as
/// `tests/common/` are not test files of their own).
fn test_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !matches!(
                name.as_str(),
                "target" | "node_modules" | ".git" | "fuzz" | "expected"
            ) {
                test_files(root, &path, out);
            }
        } else if name.ends_with(".rs")
            && path
                .parent()
                .and_then(Path::file_name)
                .is_some_and(|p| p == "tests")
        {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            out.push(rel);
        }
    }
}

#[test]
fn development_md_lists_every_test_file() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap();
    let page = std::fs::read_to_string(root.join("docs/development.md")).unwrap();
    let mut files = Vec::new();
    for top in ["agent", "collector", "proto", "tests"] {
        test_files(&root, &root.join(top), &mut files);
    }
    assert!(files.len() > 10, "found {files:?}");
    let missing: Vec<&String> = files
        .iter()
        .filter(|f| !page.contains(f.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/development.md does not list {missing:?}; add each to 'Tests, by level'"
    );
}

/// The recipes in docs/development.md ("Adding things") name real files: a move or rename that
/// leaves a recipe pointing at nothing fails here.
#[test]
fn development_md_recipes_name_files_that_exist() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let page = std::fs::read_to_string(root.join("docs/development.md")).unwrap();
    let recipes = page
        .split_once("### Recipes")
        .expect("docs/development.md has a Recipes section")
        .1;
    for heading in [
        "#### An MCP tool",
        "#### A Telemetry RPC",
        "#### An NVML field",
        "#### A metric",
        "#### A verdict rule",
        "#### An XID catalog row",
    ] {
        assert!(recipes.contains(heading), "no recipe {heading:?}");
    }
    let mut checked = 0;
    for (i, quoted) in recipes.split('`').enumerate() {
        // Odd pieces are inside backticks; paths have a slash and a file extension.
        let is_path = i % 2 == 1
            && quoted.contains('/')
            && !quoted.contains(['<', ' ', '*'])
            && quoted.rsplit('/').next().is_some_and(|f| f.contains('.'));
        if is_path {
            assert!(
                root.join(quoted).exists(),
                "the recipe names {quoted}, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} paths found in the recipes");
}
