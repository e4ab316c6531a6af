//! The Debian packages the test suite runs, in one table: found, installed when root, or named in
//! one line when not.
//!
//! `cargo xtask test` (and `cargo xtask setup`) call [`ensure`] before anything is built, so the
//! README's test command works on a fresh Debian machine as it stands, and a plain user learns
//! what to install before minutes of compiling. `.ci/run` has no list of its own: it calls the
//! same path.

use std::{
    env,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// How to tell a package is there without asking dpkg (a program from elsewhere on `PATH` serves
/// the tests just as well).
#[derive(Debug, Clone, Copy)]
pub enum Probe {
    /// Every one of these programs is on `PATH`.
    Programs(&'static [&'static str]),
    /// `python3 -c "import <modules>"` succeeds.
    Python(&'static str),
    /// This file exists.
    File(&'static str),
}

/// One package and what the suite does with it.
#[derive(Debug)]
pub struct Need {
    pub package: &'static str,
    pub probe: Probe,
    pub why: &'static str,
}

/// Everything beyond the Rust toolchain that `cargo xtask test` needs (the toolchain's own
/// pieces, nightly `rust-src` and bpf-linker, are `setup`'s).
pub const NEEDS: &[Need] = &[
    Need {
        package: "prometheus",
        probe: Probe::Programs(&["promtool", "prometheus"]),
        why: "promtool test rules, the Prometheus end-to-end test",
    },
    Need {
        package: "victoria-metrics",
        probe: Probe::Programs(&["victoria-metrics"]),
        why: "the remote-write test reads rollups back from it",
    },
    Need {
        package: "python3-venv",
        probe: Probe::Python("ensurepip, venv"),
        why: "venvs for the Python mcp/grpcio clients and kubernetes-validate",
    },
    Need {
        package: "npm",
        probe: Probe::Programs(&["npm"]),
        why: "the MCP conformance suite (it installs Node 22 from the npm registry)",
    },
    Need {
        package: "podman",
        probe: Probe::Programs(&["podman"]),
        why: "loads the container image archive",
    },
    Need {
        package: "binutils",
        probe: Probe::Programs(&["strip"]),
        why: "strips the image's binaries",
    },
    Need {
        package: "libc-bin",
        probe: Probe::Programs(&["ldd"]),
        why: "lists the libraries the image ships",
    },
    Need {
        package: "ca-certificates",
        probe: Probe::File("/etc/ssl/certs/ca-certificates.crt"),
        why: "the CA bundle the image ships",
    },
    Need {
        package: "systemd",
        probe: Probe::Programs(&["systemd-analyze"]),
        why: "systemd-analyze verify on the .deb's units",
    },
    Need {
        package: "dpkg",
        probe: Probe::Programs(&["dpkg-deb"]),
        why: "builds and unpacks the .deb packages",
    },
];

/// What to do about the missing packages.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing is missing.
    Ready,
    /// Root on a machine with apt-get: install these.
    Install(Vec<&'static str>),
    /// Stop before building, with this one line.
    Stop(String),
}

/// The decision, apart from the machine so a test can hold it.
pub fn plan(missing: &[&'static str], root: bool, apt_get: bool) -> Plan {
    if missing.is_empty() {
        return Plan::Ready;
    }
    let list = missing.join(" ");
    if !apt_get {
        return Plan::Stop(format!(
            "the tests need these Debian packages (or their equivalents on PATH), and there is no apt-get here: {list}"
        ));
    }
    if !root {
        return Plan::Stop(format!(
            "the tests need Debian packages this machine lacks; install them with `sudo apt-get install -y --no-install-recommends {list}` (or run `sudo -E cargo xtask test`, which installs them)"
        ));
    }
    Plan::Install(missing.to_vec())
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH").is_some_and(|p| env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn present(probe: Probe) -> bool {
    match probe {
        Probe::Programs(names) => names.iter().all(|n| on_path(n)),
        Probe::Python(modules) => Command::new("python3")
            .args(["-c", &format!("import {modules}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        Probe::File(path) => Path::new(path).exists(),
    }
}

/// The packages of [`NEEDS`] this machine lacks.
pub fn missing() -> Vec<&'static str> {
    NEEDS
        .iter()
        .filter(|n| !present(n.probe))
        .map(|n| n.package)
        .collect()
}

/// Finds, installs (root) or names (otherwise, as an error that stops the task) the packages.
pub fn ensure(root: bool) -> anyhow::Result<()> {
    let missing = missing();
    match plan(&missing, root, on_path("apt-get")) {
        Plan::Ready => Ok(()),
        Plan::Stop(line) => bail!(line),
        Plan::Install(packages) => {
            println!(
                "setup: installing Debian packages the tests use: {}",
                packages.join(" ")
            );
            for n in NEEDS.iter().filter(|n| packages.contains(&n.package)) {
                println!("setup:   {} ({})", n.package, n.why);
            }
            let apt = |args: &[&str]| -> anyhow::Result<()> {
                let status = Command::new("apt-get")
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .status()
                    .context("running apt-get")?;
                if !status.success() {
                    bail!("apt-get {} failed: {status}", args.join(" "));
                }
                Ok(())
            };
            apt(&["update", "-q"])?;
            let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
            args.extend(packages.iter().copied());
            apt(&args)?;
            let still = self::missing();
            if !still.is_empty() {
                bail!(
                    "apt-get installed {} but these are still not found: {}",
                    packages.join(" "),
                    still.join(" ")
                );
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_missing_is_ready_whoever_runs_it() {
        assert_eq!(plan(&[], false, false), Plan::Ready);
        assert_eq!(plan(&[], true, true), Plan::Ready);
    }

    #[test]
    fn root_with_apt_installs_exactly_what_is_missing() {
        assert_eq!(
            plan(&["prometheus", "npm"], true, true),
            Plan::Install(vec!["prometheus", "npm"])
        );
    }

    #[test]
    fn a_plain_user_gets_one_line_naming_every_package_and_the_command() {
        let Plan::Stop(line) = plan(&["prometheus", "podman"], false, true) else {
            panic!("a plain user must not install");
        };
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.contains("apt-get install -y --no-install-recommends prometheus podman"),
            "{line}"
        );
        assert!(line.contains("sudo -E cargo xtask test"), "{line}");
    }

    #[test]
    fn without_apt_even_root_stops_and_names_the_packages() {
        let Plan::Stop(line) = plan(&["victoria-metrics"], true, false) else {
            panic!("no apt-get: nothing to run");
        };
        assert!(line.contains("victoria-metrics"), "{line}");
        assert!(line.contains("no apt-get"), "{line}");
    }

    #[test]
    fn the_table_names_each_package_once_and_every_probe_names_something() {
        let mut seen = std::collections::HashSet::new();
        for n in NEEDS {
            assert!(seen.insert(n.package), "{} listed twice", n.package);
            assert!(!n.why.is_empty());
            match n.probe {
                Probe::Programs(p) => assert!(!p.is_empty()),
                Probe::Python(m) => assert!(!m.is_empty()),
                Probe::File(f) => assert!(f.starts_with('/')),
            }
        }
    }

    /// The tests find these programs by name; each must be probed by the table, or a fresh
    /// machine would pass the check and then fail a test.
    #[test]
    fn every_program_the_tests_look_up_is_probed() {
        let probed: Vec<&str> = NEEDS
            .iter()
            .flat_map(|n| match n.probe {
                Probe::Programs(p) => p.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        for program in [
            "promtool",
            "prometheus",
            "victoria-metrics",
            "npm",
            "podman",
            "systemd-analyze",
            "dpkg-deb",
        ] {
            assert!(probed.contains(&program), "{program} is not probed");
        }
    }
}
