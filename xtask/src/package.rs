//! `cargo xtask package`: Debian packages of the agent and the collector for hosts run by
//! systemd (bare metal, Slurm), into `target/packages/`.
//!
//! Each package holds its stripped release binaries, a hardened unit from `deploy/systemd/`, an
//! environment file for its flags (a conffile), its copyright, and maintainer scripts that do
//! what debhelper's `dh_installsystemd` writes (enable on first install, restart on upgrade, stop
//! on removal, forget on purge), and that also work for a root being assembled offline
//! (`dpkg --root` with `DPKG_ROOT` set: the unit is enabled with `systemctl --root`, nothing is
//! started). `Depends` is computed from the binaries: each library `ldd` resolves, owned by a
//! package per `dpkg -S`, with libc6 at the newest `GLIBC_` symbol version the binaries need.
//! `dpkg-deb` builds the archive with SOURCE_DATE_EPOCH (the commit's time) as every mtime.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::image;

/// One package: what it installs and how it is described.
pub struct Package {
    pub name: &'static str,
    /// Binaries from the release build, installed into /usr/bin.
    pub binaries: &'static [&'static str],
    /// The directory its unit's StateDirectory= keeps under /var/lib (removed on purge).
    pub state_dir: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
}

pub const PACKAGES: &[Package] = &[
    Package {
        name: "gpulse-agent",
        binaries: &["gpulse-agent"],
        state_dir: "gpulse-agent",
        summary: "gpulse node agent: NVIDIA XIDs and GPU events to a collector",
        description: "Captures NVIDIA XID reports and GPU process events with eBPF the moment \
                      the kernel sees them, adds NVML samples, and streams everything to a \
                      gpulse collector over gRPC without losing events across restarts.",
    },
    Package {
        name: "gpulse-collector",
        binaries: &["gpulse-collector", "gpulse"],
        state_dir: "gpulse",
        summary: "gpulse collector: GPU health verdicts, history, gRPC, MCP and Prometheus",
        description: "Stores the events of gpulse agents durably within a memory budget, \
                      judges every GPU's health, and serves live streams and queries over \
                      gRPC, MCP for AI assistants and Prometheus metrics; with the gpulse CLI.",
    },
];

const MAINTAINER: &str = "gpulse developers <gpulse@example.invalid>";

/// The newest `GLIBC_x.y[.z]` version among a binary's dynamic symbols.
fn glibc_needed(binary: &Path) -> anyhow::Result<Option<(u32, u32, u32)>> {
    let text = crate::output(Command::new("objdump").arg("-T").arg(binary))?;
    Ok(text
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
        .filter_map(|w| w.strip_prefix("GLIBC_"))
        .filter_map(parse_version)
        .max())
}

fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    let major = it.next()??;
    let minor = it.next().flatten().unwrap_or(0);
    let patch = it.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

fn version_text((a, b, c): (u32, u32, u32)) -> String {
    if c == 0 {
        format!("{a}.{b}")
    } else {
        format!("{a}.{b}.{c}")
    }
}

/// The package that owns a library file, trying the path as given and its /usr twin (Debian's
/// merged /usr records either).
fn owner(path: &Path) -> anyhow::Result<String> {
    let s = path.display().to_string();
    let twin = match s.strip_prefix("/usr") {
        Some(rest) => rest.to_string(),
        None => format!("/usr{s}"),
    };
    for p in [s.clone(), twin] {
        if let Ok(out) = crate::output(Command::new("dpkg").args(["-S", &p])) {
            // "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6"
            if let Some((pkg, _)) = out.lines().next().and_then(|l| l.split_once(": ")) {
                return Ok(pkg.split(':').next().unwrap_or(pkg).to_string());
            }
        }
    }
    bail!("no Debian package owns {s} (dpkg -S)")
}

/// `Depends:` for these binaries.
pub fn depends(binaries: &[PathBuf]) -> anyhow::Result<String> {
    let mut packages = BTreeSet::new();
    let mut glibc = None;
    for b in binaries {
        for lib in image::linked_libraries(b)? {
            packages.insert(owner(&lib)?);
        }
        glibc = glibc.max(glibc_needed(b)?);
    }
    Ok(packages
        .into_iter()
        .map(|p| match (p.as_str(), glibc) {
            ("libc6", Some(v)) => format!("libc6 (>= {})", version_text(v)),
            _ => p,
        })
        .collect::<Vec<_>>()
        .join(", "))
}

/// A control file's extended description: lines of at most 79 columns, each starting with a
/// space.
fn wrap(text: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && line.len() + 1 + word.len() > 78 {
            out.push_str(&format!(" {line}\n"));
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        out.push_str(&format!(" {line}\n"));
    }
    out
}

fn arch() -> anyhow::Result<String> {
    Ok(
        crate::output(Command::new("dpkg").arg("--print-architecture"))?
            .trim()
            .to_string(),
    )
}

/// The maintainer scripts: debhelper's systemd snippets, plus an offline path for `dpkg --root`.
pub fn scripts(p: &Package) -> BTreeMap<&'static str, String> {
    let unit = format!("{}.service", p.name);
    let state = p.state_dir;
    let online = r#"[ -z "${DPKG_ROOT:-}" ] && command -v deb-systemd-helper >/dev/null"#;
    let postinst = format!(
        r#"#!/bin/sh
# {name} postinst: enable {unit} on first install (Debian's convention for services; a later
# `systemctl disable` is remembered across upgrades), restart it on upgrade.
set -e
case "$1" in
configure|abort-upgrade|abort-deconfigure|abort-remove)
    if {online}; then
        if deb-systemd-helper --quiet was-enabled '{unit}'; then
            deb-systemd-helper enable '{unit}' >/dev/null || true
        else
            deb-systemd-helper update-state '{unit}' >/dev/null || true
        fi
        if [ -d /run/systemd/system ]; then
            systemctl --system daemon-reload >/dev/null || true
            if [ -n "$2" ]; then
                deb-systemd-invoke try-restart '{unit}' >/dev/null || true
            else
                deb-systemd-invoke start '{unit}' >/dev/null || true
            fi
        fi
    elif [ -z "$2" ]; then
        # A root assembled offline (dpkg --root): enabled there, nothing started.
        systemctl --root="${{DPKG_ROOT:-/}}" enable '{unit}' >/dev/null 2>&1 || true
    fi
    ;;
esac
exit 0
"#,
        name = p.name,
    );
    let prerm = format!(
        r#"#!/bin/sh
# {name} prerm: stop {unit} before its files go.
set -e
if [ -z "${{DPKG_ROOT:-}}" ] && [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    deb-systemd-invoke stop '{unit}' >/dev/null || true
fi
exit 0
"#,
        name = p.name,
    );
    let postrm = format!(
        r#"#!/bin/sh
# {name} postrm: forget {unit} on purge, with its state in /var/lib/{state}.
set -e
if [ "$1" = remove ] && [ -z "${{DPKG_ROOT:-}}" ] && [ -d /run/systemd/system ]; then
    systemctl --system daemon-reload >/dev/null || true
fi
if [ "$1" = purge ]; then
    if {online}; then
        deb-systemd-helper purge '{unit}' >/dev/null || true
        deb-systemd-helper unmask '{unit}' >/dev/null || true
    else
        rm -f "${{DPKG_ROOT:-}}/etc/systemd/system/multi-user.target.wants/{unit}"
    fi
    # DynamicUser= keeps the directory under /var/lib/private, with a link in /var/lib.
    rm -rf "${{DPKG_ROOT:-}}/var/lib/{state}" "${{DPKG_ROOT:-}}/var/lib/private/{state}"
fi
exit 0
"#,
        name = p.name,
    );
    BTreeMap::from([("postinst", postinst), ("prerm", prerm), ("postrm", postrm)])
}

fn put(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d)?;
    }
    fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Every directory under `dir` 0755 (the umask must not leak into the archive).
fn normalize_dirs(dir: &Path) -> anyhow::Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for e in fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            normalize_dirs(&e.path())?;
        }
    }
    Ok(())
}

fn md5sums(staging: &Path, files: &[String]) -> anyhow::Result<String> {
    let mut c = Command::new("md5sum");
    c.current_dir(staging).args(files);
    crate::output(&mut c)
}

/// Builds every package from the release binaries in `bins` into `out`; returns the .deb paths.
pub fn build(root: &Path, bins: &Path, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let version = image::workspace_version(root)?;
    let epoch = image::source_date_epoch(root)?;
    let arch = arch()?;
    fs::create_dir_all(out)?;
    let mut debs = Vec::new();
    for p in PACKAGES {
        let staging = out.join("staging").join(p.name);
        let _ = fs::remove_dir_all(&staging);
        let mut files = Vec::new();
        let mut installed_bytes = 0u64;
        let mut add = |rel: String, bytes: Vec<u8>, mode: u32| -> anyhow::Result<()> {
            installed_bytes += bytes.len() as u64;
            put(&staging.join(&rel), &bytes, mode)?;
            files.push(rel);
            Ok(())
        };
        let mut built = Vec::new();
        for b in p.binaries {
            let path = bins.join(b);
            add(format!("usr/bin/{b}"), image::stripped(&path)?, 0o755)?;
            built.push(path);
        }
        let unit = fs::read(root.join(format!("deploy/systemd/{}.service", p.name)))?;
        add(
            format!("usr/lib/systemd/system/{}.service", p.name),
            unit,
            0o644,
        )?;
        let default = fs::read(root.join(format!("deploy/systemd/{}.default", p.name)))?;
        add(format!("etc/default/{}", p.name), default, 0o644)?;
        let copyright = "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
             Upstream-Name: gpulse\n\n\
             Files: *\nCopyright: the gpulse developers\nLicense: Apache-2.0\n \
             On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n";
        add(
            format!("usr/share/doc/{}/copyright", p.name),
            copyright.as_bytes().to_vec(),
            0o644,
        )?;

        let control = format!(
            "Package: {}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\n\
             Installed-Size: {}\nDepends: {}\nSection: admin\nPriority: optional\n\
             Homepage: {}\nDescription: {}\n{}",
            p.name,
            installed_bytes.div_ceil(1024),
            depends(&built)?,
            image::repository(root)?,
            p.summary,
            wrap(p.description)
        );
        let debian = staging.join("DEBIAN");
        put(&debian.join("control"), control.as_bytes(), 0o644)?;
        put(
            &debian.join("conffiles"),
            format!("/etc/default/{}\n", p.name).as_bytes(),
            0o644,
        )?;
        let sums = md5sums(
            &staging,
            &files
                .iter()
                .filter(|f| !f.starts_with("etc/"))
                .cloned()
                .collect::<Vec<_>>(),
        )?;
        put(&debian.join("md5sums"), sums.as_bytes(), 0o644)?;
        for (name, text) in scripts(p) {
            put(&debian.join(name), text.as_bytes(), 0o755)?;
        }
        normalize_dirs(&staging)?;

        let deb = out.join(format!("{}_{version}_{arch}.deb", p.name));
        let mut c = Command::new("dpkg-deb");
        c.args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&staging)
            .arg(&deb)
            .env("SOURCE_DATE_EPOCH", epoch.to_string());
        crate::output(&mut c)?;
        debs.push(deb);
    }
    Ok(debs)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn glibc_versions_order_numerically() {
        assert!(parse_version("2.34") > parse_version("2.4"));
        assert_eq!(parse_version("2.2.5"), Some((2, 2, 5)));
        assert_eq!(version_text((2, 34, 0)), "2.34");
        assert_eq!(version_text((2, 2, 5)), "2.2.5");
        assert_eq!(parse_version("PRIVATE"), None);
    }

    #[test]
    fn descriptions_wrap_within_80_columns() {
        for p in PACKAGES {
            let w = wrap(p.description);
            assert!(w.lines().count() > 1);
            for l in w.lines() {
                assert!(l.starts_with(' ') && l.len() <= 79, "{l:?}");
            }
            let words: Vec<&str> = w.split_whitespace().collect();
            assert_eq!(words, p.description.split_whitespace().collect::<Vec<_>>());
        }
    }

    #[test]
    fn scripts_are_valid_shell_and_name_their_unit() {
        for p in PACKAGES {
            for (name, text) in scripts(p) {
                assert!(text.starts_with("#!/bin/sh\n"), "{name}");
                assert!(text.contains(&format!("{}.service", p.name)), "{name}");
                let out = Command::new("sh")
                    .args(["-n", "-c", &text])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{} {name}: {}",
                    p.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}
