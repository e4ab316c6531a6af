//! The host packages (`cargo xtask package`, built by the test command as root): each .deb's
//! control fields and file modes; installed with dpkg into a scratch root (maintainer scripts
//! run, offline), the unit enabled there and passing `systemd-analyze verify` with no word said
//! and `systemd-analyze security` at "OK" or better; the installed binaries run; an upgrade keeps
//! an edited environment file; removal keeps it and purge removes it with the state directory.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is the failure report

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use gpulse_e2e::*;

/// Package, binaries, state directory under /var/lib.
const PACKAGES: &[(&str, &[&str], &str)] = &[
    ("gpulse-agent", &["gpulse-agent"], "gpulse-agent"),
    (
        "gpulse-collector",
        &["gpulse-collector", "gpulse"],
        "gpulse",
    ),
];

fn out(c: &mut Command) -> (bool, String) {
    let o = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn ok(c: &mut Command) -> String {
    let (good, text) = out(c);
    assert!(good, "{c:?}: {text}");
    text
}

fn deb_of(dir: &Path, name: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
        })
        .unwrap_or_else(|| panic!("no {name}_*.deb in {}", dir.display()))
}

fn dpkg(root: &Path) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display())).args([
        "--force-script-chrootless",
        // The scratch root has no libc6 package; the host's libraries serve the binaries.
        "--force-depends",
        "--log=/dev/null",
    ]);
    c
}

#[test]
fn host_packages_install_verify_run_upgrade_and_purge() {
    if !require_root("host_packages_install_verify_run_upgrade_and_purge") {
        return;
    }
    let Some(dir) = std::env::var_os("GPULSE_PACKAGES").map(PathBuf::from) else {
        panic!("GPULSE_PACKAGES unset: run through `cargo xtask test`, which builds the packages");
    };
    let version = ok(Command::new(bin("gpulse")).arg("--version"));
    let version = version.split_whitespace().nth(1).unwrap().to_string();
    let arch = ok(Command::new("dpkg").arg("--print-architecture"));
    let arch = arch.trim();

    for (name, bins, _) in PACKAGES {
        let deb = deb_of(&dir, name);
        let field = |f: &str| ok(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(f));
        assert_eq!(field("Package").trim(), *name);
        assert_eq!(field("Version").trim(), version);
        assert_eq!(field("Architecture").trim(), arch);
        let depends = field("Depends");
        assert!(depends.contains("libc6 (>= 2."), "{name}: {depends}");
        let contents = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
        for line in contents.lines() {
            assert!(line.contains(" root/root "), "{name}: {line}");
        }
        let mode_of = |path: &str| {
            contents
                .lines()
                .find(|l| l.ends_with(&format!(" ./{path}")))
                .unwrap_or_else(|| panic!("{name} lacks {path}: {contents}"))
                .split_whitespace()
                .next()
                .unwrap()
                .to_string()
        };
        for b in *bins {
            assert_eq!(mode_of(&format!("usr/bin/{b}")), "-rwxr-xr-x");
        }
        assert_eq!(
            mode_of(&format!("usr/lib/systemd/system/{name}.service")),
            "-rw-r--r--"
        );
        assert_eq!(mode_of(&format!("etc/default/{name}")), "-rw-r--r--");
        assert_eq!(
            mode_of(&format!("usr/share/doc/{name}/copyright")),
            "-rw-r--r--"
        );
        let control = tempfile::tempdir().unwrap();
        ok(Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(control.path()));
        assert_eq!(
            std::fs::read_to_string(control.path().join("conffiles")).unwrap(),
            format!("/etc/default/{name}\n")
        );
    }

    // A scratch root with an empty dpkg database.
    let scratch = tempfile::tempdir().unwrap();
    let root = scratch.path();
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "etc/systemd/system",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let debs: Vec<PathBuf> = PACKAGES.iter().map(|(n, _, _)| deb_of(&dir, n)).collect();
    ok(dpkg(root).arg("-i").args(&debs));
    for (name, bins, _) in PACKAGES {
        let status = ok(dpkg(root).args(["--status", name]));
        assert!(status.contains("Status: install ok installed"), "{status}");
        assert!(
            status.contains(&format!("/etc/default/{name} ")),
            "{status}"
        );
        let wants = root.join(format!(
            "etc/systemd/system/multi-user.target.wants/{name}.service"
        ));
        assert_eq!(
            std::fs::read_link(&wants).unwrap(),
            Path::new(&format!("/usr/lib/systemd/system/{name}.service")),
            "postinst enables the unit offline"
        );
        for b in *bins {
            let v = ok(Command::new(root.join("usr/bin").join(b)).arg("--version"));
            assert!(v.contains(&version), "{b} --version: {v}");
        }
    }

    // systemd-analyze reads the units inside the root; the root needs systemd's own targets
    // (sysinit.target, ...) to resolve dependencies, as any installed system has.
    let units = root.join("usr/lib/systemd/system");
    for e in std::fs::read_dir("/usr/lib/systemd/system").unwrap() {
        let e = e.unwrap();
        let to = units.join(e.file_name());
        if !to.exists() && e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to).unwrap();
        }
    }
    let analyze = system_tool("systemd-analyze", "systemd").unwrap();
    let names: Vec<String> = PACKAGES
        .iter()
        .map(|(n, _, _)| format!("{n}.service"))
        .collect();
    let (good, said) = out(Command::new(&analyze)
        .args(["verify", "--man=no"])
        .arg(format!("--root={}", root.display()))
        .args(&names));
    assert!(
        good && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    for unit in &names {
        let said = ok(Command::new(&analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--root={}", root.display()))
            .arg(unit));
        let level: f64 = said
            .lines()
            .find_map(|l| l.split_once(&format!("exposure level for {unit}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level: {said}"));
        eprintln!("{unit}: exposure level {level}");
        assert!(level <= 3.5, "{unit} exposure {level}: {said}");
    }

    // An upgrade (the same package again) keeps an operator's edit of the environment file.
    let env = root.join("etc/default/gpulse-collector");
    let edited = std::fs::read_to_string(&env).unwrap() + "GPULSE_COLLECTOR_ARGS=\"--edited\"\n";
    std::fs::write(&env, &edited).unwrap();
    ok(dpkg(root).arg("-i").args(&debs));
    assert_eq!(std::fs::read_to_string(&env).unwrap(), edited);

    // Removal keeps configuration and data; purge removes both and the enablement.
    let state = root.join("var/lib/gpulse");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("wal-0001"), "x").unwrap();
    ok(dpkg(root).args(["-r", "gpulse-collector"]));
    assert!(!root.join("usr/bin/gpulse-collector").exists());
    assert!(env.exists() && state.exists());
    ok(dpkg(root).args(["-P", "gpulse-collector", "gpulse-agent"]));
    for (name, _, state_dir) in PACKAGES {
        assert!(!root.join(format!("etc/default/{name}")).exists(), "{name}");
        assert!(!root.join("var/lib").join(state_dir).exists(), "{name}");
        assert!(
            !root
                .join(format!(
                    "etc/systemd/system/multi-user.target.wants/{name}.service"
                ))
                .exists(),
            "{name}"
        );
    }
}
