//! `cargo xtask image`: the container image, written as an OCI image layout directly (no
//! registry, no base image, no daemon): one layer FROM scratch holding the stripped release
//! binaries, the shared libraries they link (found with ldd), CA certificates, /etc/passwd with
//! the non-root user the collector runs as, and /tmp. Every byte is a function of the commit and
//! SOURCE_DATE_EPOCH (sorted entries, fixed times and owners, gzip without a timestamp), so two
//! builds of one commit have one digest. Also writes a CycloneDX SBOM of the Rust dependencies.
//! The archive holds the OCI layout (`podman load`, `ctr images import`, `skopeo`) and a
//! `manifest.json` (`docker load`). Format: docs/deploy.md, "Container image".
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// The binaries the image holds, at /usr/local/bin.
pub const BINARIES: [&str; 3] = ["gpulse-agent", "gpulse-collector", "gpulse"];
/// The image's name (the kustomize base references it with the workspace version).
pub const NAME: &str = "gpulse/gpulse";
/// The non-root user the collector and gateway run as (deploy/kubernetes: runAsUser 65532).
const USER: u32 = 65532;

/// One file system entry of the layer.
enum Entry {
    Dir(u32),
    File(u32, Vec<u8>),
}

/// What a build produced.
pub struct Built {
    pub archive: PathBuf,
    pub sbom: PathBuf,
    /// The manifest's digest (`sha256:...`): the image's identity.
    pub digest: String,
    /// Bytes of the compressed layer (what a registry stores and a node pulls).
    pub compressed: u64,
}

/// Builds the image from release binaries in `bins` into `out` (`target/images`).
pub fn build(root: &Path, bins: &Path, out: &Path) -> anyhow::Result<Built> {
    let version = workspace_version(root)?;
    let epoch = source_date_epoch(root)?;
    let revision = git(root, &["rev-parse", "HEAD"]).unwrap_or_else(|_| "unknown".into());
    let mut files: BTreeMap<String, Entry> = BTreeMap::new();
    for b in BINARIES {
        let path = bins.join(b);
        add_file(
            &mut files,
            &format!("usr/local/bin/{b}"),
            0o755,
            stripped(&path)?,
        );
        for lib in linked_libraries(&path)? {
            let bytes = fs::read(&lib).with_context(|| format!("reading {}", lib.display()))?;
            let at = lib.to_string_lossy().trim_start_matches('/').to_string();
            add_file(&mut files, &at, 0o755, bytes);
        }
    }
    let certs = fs::read("/etc/ssl/certs/ca-certificates.crt")
        .context("CA certificates: /etc/ssl/certs/ca-certificates.crt (Debian ca-certificates)")?;
    add_file(
        &mut files,
        "etc/ssl/certs/ca-certificates.crt",
        0o644,
        certs,
    );
    let passwd = format!(
        "root:x:0:0:root:/root:/sbin/nologin\ngpulse:x:{USER}:{USER}:gpulse:/nonexistent:/sbin/nologin\n"
    );
    add_file(&mut files, "etc/passwd", 0o644, passwd.into_bytes());
    add_file(
        &mut files,
        "etc/group",
        0o644,
        format!("root:x:0:\ngpulse:x:{USER}:\n").into_bytes(),
    );
    // The NVIDIA container runtime mounts the host's libnvidia-ml.so.1 into one of these and
    // runs ldconfig; listing them here lets that work with or without its cache.
    add_file(
        &mut files,
        "etc/ld.so.conf",
        0o644,
        b"/usr/local/nvidia/lib64\n/usr/lib/x86_64-linux-gnu\n/lib/x86_64-linux-gnu\n".to_vec(),
    );
    files.insert("tmp".into(), Entry::Dir(0o1777));
    for d in [
        "proc",
        "sys",
        "dev",
        "var/lib/gpulse",
        "var/lib/gpulse-agent",
    ] {
        files.entry(d.into()).or_insert(Entry::Dir(0o755));
    }
    add_parents(&mut files);

    let layer_tar = layer(&files, epoch)?;
    let diff_id = sha256(&layer_tar);
    let layer_gz = gzip(&layer_tar)?;
    let created = rfc3339(epoch);
    let labels = json!({
        "org.opencontainers.image.title": "gpulse",
        "org.opencontainers.image.description": "gpulse GPU node agent, collector and CLI",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.source": repository(root)?,
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.licenses": "Apache-2.0",
    });
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "User": format!("{USER}:{USER}"),
            "Env": [
                "PATH=/usr/local/bin",
                "LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu",
                "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            ],
            "Entrypoint": ["/usr/local/bin/gpulse-collector"],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    });
    let config = canonical(&config)?;
    let manifest = canonical(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer_gz)],
        "annotations": labels,
    }))?;
    let digest = sha256(&manifest);
    let tag = format!("{NAME}:{version}");
    let index = canonical(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": manifest.len(),
            "annotations": {
                "org.opencontainers.image.ref.name": version,
                "io.containerd.image.name": format!("docker.io/{tag}"),
            },
        }],
    }))?;
    let blob = |b: &[u8]| format!("blobs/sha256/{}", hex_of(b));
    let docker = canonical(&json!([{
        "Config": blob(&config),
        "RepoTags": [tag],
        "Layers": [blob(&layer_gz)],
    }]))?;
    let mut archive: BTreeMap<String, Entry> = BTreeMap::new();
    add_file(
        &mut archive,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
    );
    add_file(&mut archive, "index.json", 0o644, index);
    add_file(&mut archive, "manifest.json", 0o644, docker);
    add_file(&mut archive, &blob(&config), 0o644, config.clone());
    add_file(&mut archive, &blob(&manifest), 0o644, manifest.clone());
    add_file(&mut archive, &blob(&layer_gz), 0o644, layer_gz.clone());
    add_parents(&mut archive);
    fs::create_dir_all(out)?;
    let path = out.join(format!("gpulse-{version}.tar"));
    write_atomic(&path, &layer(&archive, epoch)?)?;
    let sbom = out.join(format!("gpulse-{version}.cdx.json"));
    write_atomic(&sbom, &sbom_json(root, &version, epoch)?)?;
    Ok(Built {
        archive: path,
        sbom,
        digest,
        compressed: layer_gz.len() as u64,
    })
}

fn add_file(files: &mut BTreeMap<String, Entry>, path: &str, mode: u32, bytes: Vec<u8>) {
    files.insert(path.to_string(), Entry::File(mode, bytes));
}

/// Every parent directory of every entry, as a directory entry of its own.
fn add_parents(files: &mut BTreeMap<String, Entry>) {
    let paths: Vec<String> = files.keys().cloned().collect();
    for p in paths {
        let mut dir = Path::new(&p).parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
            files
                .entry(d.to_string_lossy().into_owned())
                .or_insert(Entry::Dir(0o755));
            dir = d.parent();
        }
    }
}

/// A tar of `files` in path order, every entry owned by root with the same time.
fn layer(files: &BTreeMap<String, Entry>, epoch: u64) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    for (path, e) in files {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(epoch);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir(mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File(mode, bytes) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(bytes.len() as u64);
                b.append_data(&mut h, path, bytes.as_slice())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// gzip with no name and time 0: the bytes depend on the input only.
fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut e = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    e.write_all(data)?;
    Ok(e.finish()?)
}

fn hex_of(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex_of(data))
}

fn descriptor(media_type: &str, blob: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(blob), "size": blob.len()})
}

/// JSON with keys in order (serde_json's map is a BTreeMap) and no spaces.
fn canonical(v: &Value) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The binary without symbols or debug info (`strip` is deterministic).
pub fn stripped(path: &Path) -> anyhow::Result<Vec<u8>> {
    let tmp = std::env::temp_dir().join(format!(
        "gpulse-image-{}-{}",
        std::process::id(),
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    fs::copy(path, &tmp).with_context(|| format!("{} (build it first)", path.display()))?;
    let st = std::process::Command::new("strip")
        .arg("--strip-all")
        .arg(&tmp)
        .status()
        .context("running strip (binutils)")?;
    if !st.success() {
        bail!("strip {} failed", path.display());
    }
    let bytes = fs::read(&tmp)?;
    let _ = fs::remove_file(&tmp);
    Ok(bytes)
}

/// The shared libraries a binary loads, and the loader, as `ldd` resolves them on this machine.
pub fn linked_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!(
            "ldd {}: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => libs.push(PathBuf::from(p)),
            Some("not") => bail!("{}: a library is missing: {line}", binary.display()),
            _ => {} // linux-vdso: in the kernel
        }
    }
    Ok(libs)
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(root)
        .output()?;
    if !out.status.success() {
        bail!("git {args:?} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// SOURCE_DATE_EPOCH, else the commit's time: the image's only clock.
pub fn source_date_epoch(root: &Path) -> anyhow::Result<u64> {
    if let Ok(v) = std::env::var("SOURCE_DATE_EPOCH") {
        return v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"));
    }
    Ok(git(root, &["log", "-1", "--format=%ct"])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

fn workspace_package(root: &Path, key: &str) -> anyhow::Result<String> {
    let text = fs::read_to_string(root.join("Cargo.toml"))?;
    let section = text
        .split("[workspace.package]")
        .nth(1)
        .context("no [workspace.package] in Cargo.toml")?;
    section
        .lines()
        .take_while(|l| !l.starts_with('['))
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
        })
        .with_context(|| format!("no {key} in [workspace.package]"))
}

pub fn workspace_version(root: &Path) -> anyhow::Result<String> {
    workspace_package(root, "version")
}

pub fn repository(root: &Path) -> anyhow::Result<String> {
    workspace_package(root, "repository")
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, so no date crate is needed).
fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// A CycloneDX 1.5 SBOM of the Rust packages the three binaries are built from (normal
/// dependencies of the agent, collector and CLI, resolved by cargo metadata), with a serial
/// number and time derived from the commit so it is as reproducible as the image.
fn sbom_json(root: &Path, version: &str, epoch: u64) -> anyhow::Result<Vec<u8>> {
    use cyclonedx_bom::{
        external_models::{date_time::DateTime, uri::Purl},
        models::{
            bom::{Bom, UrnUuid},
            component::{Classification, Component, Components},
            license::{LicenseChoice, Licenses},
            metadata::Metadata,
        },
    };
    let meta = cargo_metadata::MetadataCommand::new()
        .current_dir(root)
        .exec()
        .context("cargo metadata")?;
    let resolve = meta
        .resolve
        .as_ref()
        .context("cargo metadata without a resolve graph")?;
    let by_id: BTreeMap<_, _> = meta.packages.iter().map(|p| (&p.id, p)).collect();
    let nodes: BTreeMap<_, _> = resolve.nodes.iter().map(|n| (&n.id, n)).collect();
    // Walk the normal (not build, not dev) dependencies from the three binaries' packages.
    let mut todo: Vec<&cargo_metadata::PackageId> = meta
        .packages
        .iter()
        .filter(|p| {
            matches!(
                p.name.as_str(),
                "gpulse-agent" | "gpulse-collector" | "gpulse-cli"
            )
        })
        .map(|p| &p.id)
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(n) = nodes.get(id) {
            for d in &n.deps {
                let normal = d
                    .dep_kinds
                    .iter()
                    .any(|k| k.kind == cargo_metadata::DependencyKind::Normal);
                if normal {
                    todo.push(&d.pkg);
                }
            }
        }
    }
    let mut components = Vec::new();
    for id in &seen {
        let Some(p) = by_id.get(id) else { continue };
        let v = p.version.to_string();
        let mut c = Component::new(
            Classification::Library,
            &p.name,
            &v,
            Some(format!("{}@{v}", p.name)),
        );
        c.purl = Purl::new("cargo", &p.name, &v).ok();
        c.licenses = p
            .license
            .as_ref()
            .map(|l| Licenses(vec![LicenseChoice::expression(l)]));
        components.push(c);
    }
    components.sort_by(|a, b| a.bom_ref.cmp(&b.bom_ref));
    let mut image = Component::new(Classification::Container, NAME, version, Some(NAME.into()));
    image.description = Some(cyclonedx_bom::prelude::NormalizedString::new(
        "gpulse GPU node agent, collector and CLI",
    ));
    // A name-based serial (version 5-like: the hash of what it describes), not a random one.
    let h = hex_of(format!("{NAME}@{version}@{epoch}@{}", seen.len()).as_bytes());
    let serial = format!(
        "urn:uuid:{}-{}-5{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    );
    let bom = Bom {
        serial_number: Some(UrnUuid::new(serial).map_err(|e| anyhow::anyhow!("{e:?}"))?),
        metadata: Some(Metadata {
            timestamp: DateTime::try_from(rfc3339(epoch)).ok(),
            component: Some(image),
            ..Default::default()
        }),
        components: Some(Components(components)),
        ..Default::default()
    };
    let mut out = Vec::new();
    bom.output_as_json_v1_5(&mut out)
        .map_err(|e| anyhow::anyhow!("writing the SBOM: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_digests() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_547_200), "2025-12-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(
            sha256(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn layers_are_reproducible_and_parents_listed() {
        let mut f = BTreeMap::new();
        add_file(&mut f, "usr/local/bin/x", 0o755, b"x".to_vec());
        add_parents(&mut f);
        assert!(matches!(f.get("usr/local"), Some(Entry::Dir(0o755))));
        let a = gzip(&layer(&f, 42).unwrap()).unwrap();
        let b = gzip(&layer(&f, 42).unwrap()).unwrap();
        assert_eq!(a, b);
        assert_ne!(
            gzip(&layer(&f, 43).unwrap()).unwrap(),
            a,
            "the time is in the bytes"
        );
    }
}
