//! The container image (`cargo xtask image`, built twice by the test command): the two builds
//! are byte for byte one, the compressed image fits 40 MB, every digest checks out, and the
//! unpacked root file system runs as a container would (chroot): each binary's `--version`, then
//! a collector (as the image's non-root user) and an agent (kmsg source) on loopback deliver an
//! XID written to /dev/kmsg to `gpulse tail`, all three run from the image. Root only (chroot,
//! bind mounts, /dev/kmsg).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use gpulse_e2e::*;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

fn sha256(b: &[u8]) -> String {
    let h: String = Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    format!("sha256:{h}")
}

/// Every file of a tar by path.
fn files_of(tar_bytes: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut a = tar::Archive::new(tar_bytes);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            out.insert(path, b);
        }
    }
    out
}

/// A blob of the layout, its digest checked.
fn blob<'a>(files: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let path = format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    let b = files.get(&path).unwrap_or_else(|| panic!("{path} missing"));
    assert_eq!(sha256(b), digest, "{path} does not match its digest");
    b
}

/// Unpacks the image's root file system into `dir` (what `umoci unpack` does), checking the
/// index, manifest, config and layer digests and the layer's diff id. Returns the config.
fn unpack(archive: &Path, dir: &Path) -> (Value, u64) {
    let files = files_of(&std::fs::read(archive).unwrap());
    assert_eq!(files["oci-layout"], br#"{"imageLayoutVersion":"1.0.0"}"#);
    let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["org.opencontainers.image.ref.name"],
        "0.1.0"
    );
    let manifest: Value =
        serde_json::from_slice(blob(&files, m["digest"].as_str().unwrap())).unwrap();
    let config: Value =
        serde_json::from_slice(blob(&files, manifest["config"]["digest"].as_str().unwrap()))
            .unwrap();
    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let gz = blob(&files, layer["digest"].as_str().unwrap());
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        sha256(&tar_bytes),
        config["rootfs"]["diff_ids"][0],
        "diff id"
    );
    // docker load's manifest points at the same blobs.
    let docker: Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    assert_eq!(docker[0]["RepoTags"][0], "gpulse/gpulse:0.1.0");
    let mut a = tar::Archive::new(tar_bytes.as_slice());
    a.set_preserve_permissions(true);
    a.unpack(dir).unwrap();
    (config, gz.len() as u64)
}

/// Bind mounts undone when dropped (also when the test fails).
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn bind(&mut self, from: &str, to: PathBuf) {
        let st = Command::new("mount")
            .args(["--bind", from])
            .arg(&to)
            .status()
            .unwrap();
        assert!(st.success(), "mount --bind {from} {}", to.display());
        self.0.push(to);
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
    }
}

fn in_image(root: &Path, user: Option<&str>, args: &[&str]) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(u) = user {
        v.push(format!("--userspec={u}"));
    }
    v.push(root.display().to_string());
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

#[test]
fn the_image_is_reproducible_small_and_runs_from_its_root_file_system() {
    if !require_root("the_image_is_reproducible_small_and_runs_from_its_root_file_system") {
        return;
    }
    let (Some(image), Some(again)) = (
        std::env::var_os("GPULSE_IMAGE"),
        std::env::var_os("GPULSE_IMAGE_AGAIN"),
    ) else {
        panic!(
            "GPULSE_IMAGE / GPULSE_IMAGE_AGAIN unset: run through `cargo xtask test`, which builds the image twice"
        );
    };
    let (image, again) = (PathBuf::from(image), PathBuf::from(again));
    assert_eq!(
        std::fs::read(&image).unwrap(),
        std::fs::read(&again).unwrap(),
        "two builds of one commit differ"
    );
    let _k = kernel_lock();
    let dir = tempfile::tempdir().unwrap();
    // podman accepts the archive, and names it with the digest the index gives.
    let podman = system_tool("podman", "podman").unwrap();
    // Its own storage (vfs: no overlay mounts needed), gone with the temporary directory.
    let (root_dir, run_dir) = (dir.path().join("podman"), dir.path().join("podman-run"));
    let podman_cmd = || {
        let mut c = Command::new(&podman);
        c.args(["--storage-driver", "vfs", "--root"])
            .arg(&root_dir)
            .arg("--runroot")
            .arg(&run_dir);
        c
    };
    let load = podman_cmd()
        .args(["load", "-i"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(load.status.success(), "podman load: {load:?}");
    let inspect = podman_cmd()
        .args([
            "inspect",
            "--format",
            "{{.Digest}} {{.Config.User}}",
            "gpulse/gpulse:0.1.0",
        ])
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&inspect.stdout).trim().to_string();
    let root = dir.path().join("rootfs");
    let (config, compressed) = unpack(&image, &root);
    eprintln!("image: {compressed} bytes compressed");
    assert!(compressed <= 40 << 20, "{compressed} bytes compressed");
    let labels = &config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], "0.1.0");
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap()
            .len()
            >= 7
    );
    assert!(
        labels["org.opencontainers.image.created"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(config["config"]["User"], "65532:65532");
    let files = files_of(&std::fs::read(&image).unwrap());
    let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    assert_eq!(seen, format!("{digest} 65532:65532"), "podman inspect");

    let chroot = Path::new("/usr/sbin/chroot");
    for b in ["gpulse-agent", "gpulse-collector", "gpulse"] {
        let out = Command::new(chroot)
            .args(in_image(
                &root,
                None,
                &[&format!("/usr/local/bin/{b}"), "--version"],
            ))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("0.1.0"),
            "{b}: {out:?}"
        );
    }

    // A container gets /proc and /dev from its runtime; the agent reads both.
    let mut mounts = Mounts(Vec::new());
    mounts.bind("/proc", root.join("proc"));
    mounts.bind("/dev", root.join("dev"));
    let (grpc, http) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{grpc}");
    let _collector = Proc::spawn_path(
        chroot,
        &in_image(
            &root,
            Some("65532:65532"),
            &[
                "/usr/local/bin/gpulse-collector",
                "--grpc-listen",
                &format!("127.0.0.1:{grpc}"),
                "--http-listen",
                &format!("127.0.0.1:{http}"),
                "--data-dir",
                "/tmp/data",
            ],
        ),
        &dir.path().join("collector.log"),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !http_get(http, "/readyz").is_ok_and(|(c, _)| c == 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "collector from the image not ready: {}",
            std::fs::read_to_string(dir.path().join("collector.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let node = marker("image");
    let agent_log = dir.path().join("agent.log");
    let _agent = Proc::spawn_path(
        chroot,
        &in_image(
            &root,
            None,
            &[
                "/usr/local/bin/gpulse-agent",
                "--collector",
                &url,
                "--node",
                &node,
                "--xid-source",
                "kmsg",
                "--nvml",
                "off",
                "--kube",
                "off",
                "--state-dir",
                "/tmp/agent",
                // Only what is written from now on (the kernel log holds other tests' XIDs).
                "--backlog",
                "none",
            ],
        ),
        &agent_log,
    )
    .unwrap();
    wait_agent_live(&agent_log, Duration::from_secs(20)).unwrap();
    let tail = Command::new(chroot)
        .args(in_image(
            &root,
            Some("65532:65532"),
            &[
                "/usr/local/bin/gpulse",
                "tail",
                "--collector",
                &url,
                "--kind",
                "xid",
                "--count",
                "1",
                "--no-reconnect",
            ],
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let m = marker("from-the-image");
    inject(&format!(
        "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus. {m}"
    ))
    .unwrap();
    let out = tail.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&m) && text.contains("XID 79"),
        "gpulse tail from the image: {out:?}; agent log:\n{}",
        std::fs::read_to_string(&agent_log).unwrap_or_default()
    );
}
