//! `cargo xtask <command>`: gpulse developer tasks.
//!
//! * `setup`  installs what a fresh machine lacks: nightly rust-src and bpf-linker built against the
//!   nightly's own libLLVM, and (as root) the Debian packages the tests run (`host.rs`; a plain
//!   user is told in one line what to install); idempotent and quick when nothing is missing.
//! * `build`  setup + build every binary (`--release` for optimised ones).
//! * `demo`   builds, starts a collector and an agent on loopback, and prints live decoded
//!   events (needs root for eBPF).
//! * `test`   setup, then the whole suite: fmt, clippy, unit, in-process gRPC, CLI and, as root,
//!   the end-to-end tests through the real kernel.
//! * `bench`  the XID latency benchmark, with `--overhead` the agent overhead one (root), with
//!   `--storm` an XID storm through the kernel and the decoder (root), with `--mcp` MCP tool
//!   latency and /metrics size, with `--trust` TLS+auth against plaintext, with `--gateway` a
//!   gateway over shards against one collector.
//! * `soak`   the fault matrix (kill -9 loops, outages, a full disk, stalled subscribers,
//!   restarts) against release binaries; one table; `--short` for the quick form.
//! * `fuzz`   runs the XID parser fuzz target (`--seconds N`).
//! * `package` `.deb` packages of the agent and the collector (with the CLI) for hosts run by
//!   systemd, into `target/packages` (`package.rs`; units in `deploy/systemd`).
//! * `image`  the container image as an OCI archive with its SBOM in `target/images`
//!   (`--out DIR` elsewhere); prints its name, digest and size.
#![expect(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a developer tool talking to its user"
)]

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

mod host;
mod image;
mod package;

const BPF_LINKER_VERSION: &str = "0.13.0";

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn tools_dir() -> PathBuf {
    if let Some(d) = env::var_os("GPULSE_TOOLS_DIR") {
        return PathBuf::from(d);
    }
    let home = env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/gpulse-tools")
}

fn path_with_tools() -> OsString {
    let mut paths = vec![tools_dir().join("bin")];
    if let Some(p) = env::var_os("PATH") {
        paths.extend(env::split_paths(&p));
    }
    env::join_paths(paths).unwrap_or_default()
}

fn cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.current_dir(root_dir()).env("PATH", path_with_tools());
    c
}

fn run(c: &mut Command) -> anyhow::Result<()> {
    let desc = format!("{c:?}");
    let status = c.status().with_context(|| format!("running {desc}"))?;
    if !status.success() {
        bail!("{desc} failed: {status}");
    }
    Ok(())
}

fn output(c: &mut Command) -> anyhow::Result<String> {
    let desc = format!("{c:?}");
    let out = c.output().with_context(|| format!("running {desc}"))?;
    if !out.status.success() {
        bail!("{desc} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    // No libc dependency here: /proc tells us our effective uid.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|v| v.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// setup

/// `cargo xtask setup`: the host packages first (a plain user missing some stops here, before any
/// building), then the toolchain.
fn setup() -> anyhow::Result<()> {
    host::ensure(is_root())?;
    toolchain()
}

/// The toolchain pieces every task needs (nightly rust-src, bpf-linker).
fn toolchain() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut did = Vec::new();

    let toolchains = output(cmd("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (builds the BPF object)");
        run(cmd("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        did.push("nightly");
    }
    let comps =
        output(cmd("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: adding rust-src to nightly (-Z build-std=core)");
        run(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        did.push("rust-src");
    }

    let sysroot = output(cmd("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&lib)
        .with_context(|| format!("listing {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {} (nightly without LLVM?)",
                lib.display()
            )
        })?;
    let major = llvm
        .strip_prefix("libLLVM.so.")
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .with_context(|| format!("cannot read the LLVM major version from {llvm}"))?;

    let tools = tools_dir();
    let stamp_path = tools.join("bpf-linker.stamp");
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} against {}\n",
        lib.join(&llvm).display()
    );
    let linker = tools.join("bin/bpf-linker");
    let linker_ok = Command::new(&linker)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let stamp_ok = fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp);
    if !(linker_ok && stamp_ok) {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's {llvm} (about a minute)"
        );
        // bpf-linker links libLLVM.so and keeps an rpath to this prefix, so the prefix lives in
        // the persistent tools dir, and is rebuilt when the nightly's LLVM changes (the stamp).
        let prefix = tools.join("llvm");
        let plib = prefix.join("lib");
        fs::create_dir_all(&plib)?;
        for name in ["libLLVM.so".to_string(), llvm.clone()] {
            let link = plib.join(&name);
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&llvm), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        let mut c = cmd("cargo");
        c.args([
            "+nightly",
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
            "--root",
        ])
        .arg(&tools)
        .env("LLVM_PREFIX", &prefix);
        run(&mut c)?;
        let v = output(Command::new(&linker).arg("--version"))?;
        fs::write(&stamp_path, &stamp)?;
        did.push("bpf-linker");
        println!("setup: {}", v.trim());
    }
    if did.is_empty() {
        println!("setup: toolchain complete ({:.1?})", started.elapsed());
    } else {
        println!(
            "setup: installed {} ({:.1?})",
            did.join(", "),
            started.elapsed()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// build / test

fn build(release: bool) -> anyhow::Result<PathBuf> {
    // Binaries and libraries (the fake libnvidia-ml.so the NVML tests load is a cdylib).
    let mut c = cmd("cargo");
    c.args([
        "build",
        "--workspace",
        "--exclude",
        "gpulse-agent-ebpf",
        "--lib",
        "--bins",
    ]);
    if release {
        c.arg("--release");
    } else {
        // Test targets too: with them, dev-dependencies take part in feature resolution, so the
        // binaries are built in the very configuration `cargo test` then reuses. Without them
        // every crate above a dev-dependency's features (the agent and its eBPF object among
        // them) was built twice, which doubled the CI machine's target/ (8 GB).
        c.arg("--tests");
    }
    run(&mut c)?;
    Ok(root_dir()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    let lint = !args.iter().any(|a| a == "--no-lint");
    if lint {
        println!("== cargo fmt --check");
        run(cmd("cargo").args(["fmt", "--all", "--", "--check"]))?;
        println!("== cargo clippy -D warnings");
        // Lints do not need the eBPF object: without AYA_BUILD_SKIP clippy's build-script run
        // (a unit apart from the build's) compiled it a second time (a minute, 300 MB).
        run(cmd("cargo")
            .args(["clippy", "--all-targets", "--", "-D", "warnings"])
            .env("AYA_BUILD_SKIP", "1"))?;
    }
    println!("== build binaries");
    let bins = build(false)?;
    // The container image, built twice (the second must be byte for byte the first): its test
    // runs the binaries from the unpacked image in a chroot, which needs root.
    let mut images = Vec::new();
    if is_root() {
        println!("== container image (twice: reproducible)");
        for dir in ["images", "images-again"] {
            let out = root_dir().join("target").join(dir);
            images.push(image_build(&out)?.archive);
        }
    }
    let packages = root_dir().join("target/packages");
    if is_root() {
        println!("== host packages (.deb)");
        package_build(&packages)?;
    }
    if is_root() {
        println!("== running as root: end-to-end tests through the real kernel are included");
    } else {
        println!("== not root: end-to-end tests that need eBPF and /dev/kmsg writes will say SKIP");
    }
    println!("== cargo test");
    let mut c = cmd("cargo");
    c.args(["test", "--no-fail-fast"])
        .env("GPULSE_BIN_DIR", &bins)
        .stdout(Stdio::piped());
    if let [a, b] = &images[..] {
        c.env("GPULSE_IMAGE", a).env("GPULSE_IMAGE_AGAIN", b);
        c.env("GPULSE_PACKAGES", &packages);
    }
    let mut child = c.spawn().context("running cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split(['.', ';']) {
                    let mut w = part.split_whitespace();
                    if let (Some(n), Some(what)) =
                        (w.next().and_then(|n| n.parse::<u64>().ok()), w.next())
                    {
                        match what {
                            "passed" => passed += n,
                            "failed" => failed += n,
                            "ignored" => ignored += n,
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    // One closing line over every test binary (cargo's own last line is a crate's doc-tests).
    println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// image

/// The three shipped binaries (agent, collector, CLI) in release form; their directory.
fn release_bins() -> anyhow::Result<PathBuf> {
    // Only the binaries the image and packages hold (the benchmarks' and tools' are not).
    let mut c = cmd("cargo");
    c.args(["build", "--release", "--bins"]);
    for p in ["gpulse-agent", "gpulse-collector", "gpulse-cli"] {
        c.args(["-p", p]);
    }
    run(&mut c)?;
    Ok(root_dir().join("target/release"))
}

/// Release binaries, then the image from them into `out`; prints what it wrote.
fn image_build(out: &Path) -> anyhow::Result<image::Built> {
    let bins = release_bins()?;
    let b = image::build(&root_dir(), &bins, out)?;
    let size = fs::metadata(&b.archive)?.len();
    println!(
        "image {}:{} digest {} layer {:.1} MB compressed, archive {} ({:.1} MB); SBOM {}",
        image::NAME,
        image::workspace_version(&root_dir())?,
        b.digest,
        b.compressed as f64 / 1e6,
        b.archive.display(),
        size as f64 / 1e6,
        b.sbom.display()
    );
    Ok(b)
}

/// `cargo xtask package`: the .deb packages into `out` (`target/packages`); prints each.
fn package_build(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let bins = release_bins()?;
    let debs = package::build(&root_dir(), &bins, out)?;
    for d in &debs {
        println!(
            "package {} ({:.1} MB)",
            d.display(),
            fs::metadata(d)?.len() as f64 / 1e6
        );
    }
    Ok(debs)
}

fn image_cmd(args: &[String]) -> anyhow::Result<()> {
    let out = match args.iter().position(|a| a == "--out") {
        Some(i) => PathBuf::from(args.get(i + 1).context("--out needs a directory")?),
        None => root_dir().join("target/images"),
    };
    image_build(&out).map(|_| ())
}

// ---------------------------------------------------------------------------------------------
// demo

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_http_ok(port: u16, path: &str, within: Duration) -> bool {
    use std::io::{Read, Write};
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(s, "GET {path} HTTP/1.0\r\n\r\n");
            let mut b = String::new();
            let _ = s.read_to_string(&mut b);
            if b.starts_with("HTTP/1.0 200") || b.starts_with("HTTP/1.1 200") {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

const DEMO_RECORDS: [&str; 5] = [
    "NVRM: GPU at PCI:0000:91:00: GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b",
    "NVRM: Xid (PCI:0000:91:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:9b:00): 119, pid=2024380, name=nvidia-smi, Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 103 (GSP_RM_ALLOC) (0x2081 0x4).",
    "NVRM: Xid (PCI:0018:01:00): 145, pid=876767, name=ray::WorkerDict, RLW_RXPIPE Nonfatal XC0 i0 Link 13 (0x0409a0c2 0x00000008 0x00000001 0x00000000 0x00100000 0x00000004)",
    "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 48 LTSSM Fault Up",
];

fn demo(args: &[String]) -> anyhow::Result<()> {
    let seconds: Option<u64> = match args.iter().position(|a| a == "--seconds") {
        Some(i) => Some(
            args.get(i + 1)
                .context("--seconds needs a value")?
                .parse()
                .context("--seconds")?,
        ),
        None => None,
    };
    if !is_root() {
        bail!(
            "the demo loads eBPF programs and writes sample records to /dev/kmsg, which needs root \
             (or CAP_BPF + CAP_PERFMON + write access to /dev/kmsg).\nRe-run as root: sudo -E cargo xtask demo"
        );
    }
    toolchain()?;
    let bins = build(true)?;
    let dir = env::temp_dir().join(format!("gpulse-demo-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let (gp, hp) = (free_port(), free_port());
    let grpc = format!("127.0.0.1:{gp}");
    let url = format!("http://{grpc}");
    println!(
        "demo: collector on {grpc} (HTTP 127.0.0.1:{hp}), data in {}",
        dir.display()
    );
    let _collector = Kill(
        Command::new(bins.join("gpulse-collector"))
            .args([
                "--grpc-listen",
                &grpc,
                "--http-listen",
                &format!("127.0.0.1:{hp}"),
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .stderr(fs::File::create(dir.join("collector.log"))?)
            .spawn()?,
    );
    if !wait_http_ok(hp, "/readyz", Duration::from_secs(20)) {
        bail!(
            "collector did not become ready; see {}",
            dir.join("collector.log").display()
        );
    }
    let agent_log = dir.join("agent.log");
    let _agent = Kill(
        Command::new(bins.join("gpulse-agent"))
            .args([
                "--collector",
                &url,
                "--node",
                "demo-node",
                "--backlog",
                "none",
            ])
            .arg("--state-dir")
            .arg(dir.join("agent-state"))
            .stderr(fs::File::create(&agent_log)?)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = fs::read_to_string(&agent_log).unwrap_or_default();
        if let Some(l) = log.lines().find(|l| l.contains("XID source live")) {
            println!("demo: agent: {}", l.split("why=").nth(1).unwrap_or(l));
            break;
        }
        if Instant::now() > deadline {
            bail!("agent did not start; see {}", agent_log.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "demo: live events follow (gpulse tail). Injecting {} sample NVIDIA records through /dev/kmsg; real ones appear too. Ctrl-C stops.",
        DEMO_RECORDS.len()
    );
    let mut tail = Kill(
        Command::new(bins.join("gpulse"))
            .args(["tail", "--collector", &url, "--after", "0"])
            .stdout(Stdio::inherit())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(800));
    for r in DEMO_RECORDS {
        let mut f = fs::OpenOptions::new().write(true).open("/dev/kmsg")?;
        std::io::Write::write_all(&mut f, format!("<3>{r}\n").as_bytes())?;
        std::thread::sleep(Duration::from_millis(300));
    }
    match seconds {
        Some(s) => std::thread::sleep(Duration::from_secs(s)),
        None => {
            let _ = tail.0.wait();
        }
    }
    println!("demo: stopping; logs in {}", dir.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// bench / fuzz

fn bench(args: &[String]) -> anyhow::Result<()> {
    if args.iter().any(|a| a == "--mcp") {
        // MCP tool latency and /metrics size: no eBPF, no root needed.
        let bins = build(true)?;
        let mut c = Command::new(bins.join("gpulse-mcp-bench"));
        c.env("GPULSE_BIN_DIR", &bins);
        return run(&mut c);
    }
    if args.iter().any(|a| a == "--gateway") {
        // One collector vs a gateway over shards holding the same data: no root needed.
        let bins = build(true)?;
        let mut c = Command::new(bins.join("gpulse-gateway-bench"));
        c.args(args.iter().filter(|a| *a != "--gateway"))
            .env("GPULSE_BIN_DIR", &bins);
        return run(&mut c);
    }
    if args.iter().any(|a| a == "--trust") {
        // What TLS and authentication cost (plaintext vs TLS+auth collectors): no root needed.
        let bins = build(true)?;
        let mut c = Command::new(bins.join("gpulse-trust-bench"));
        c.args(args.iter().filter(|a| *a != "--trust"))
            .env("GPULSE_BIN_DIR", &bins);
        return run(&mut c);
    }
    if !is_root() {
        bail!(
            "the benchmarks load eBPF and write /dev/kmsg: run them as root (sudo -E cargo xtask bench)"
        );
    }
    let bins = build(true)?;
    // `--overhead`: agent CPU/RSS under storms; otherwise the XID latency benchmark.
    let (harness, rest): (&str, Vec<&String>) = if args.iter().any(|a| a == "--overhead") {
        (
            "gpulse-overhead-bench",
            args.iter().filter(|a| *a != "--overhead").collect(),
        )
    } else if args.iter().any(|a| a == "--storm") {
        // An XID storm through the kernel and through the decoder (docs/benchmarks.md).
        (
            "gpulse-storm-bench",
            args.iter().filter(|a| *a != "--storm").collect(),
        )
    } else {
        ("gpulse-latency-bench", args.iter().collect())
    };
    let mut c = Command::new(bins.join(harness));
    c.args(rest).env("GPULSE_BIN_DIR", &bins);
    run(&mut c)
}

/// The fault matrix (docs/benchmarks.md): release binaries, the full form unless `--short`.
/// Rows that need the kernel (eBPF, /dev/kmsg, tmpfs) say "skipped" unless run as root.
fn soak(args: &[String]) -> anyhow::Result<()> {
    let bins = build(true)?;
    let mut c = Command::new(bins.join("gpulse-soak"));
    c.args(args).env("GPULSE_BIN_DIR", &bins);
    run(&mut c)
}

fn fuzz(args: &[String]) -> anyhow::Result<()> {
    let seconds: u64 = match args.iter().position(|a| a == "--seconds") {
        Some(i) => args
            .get(i + 1)
            .context("--seconds needs a value")?
            .parse()
            .context("--seconds")?,
        None => 60,
    };
    let tools = tools_dir();
    if !tools.join("bin/cargo-fuzz").exists() {
        println!("fuzz: installing cargo-fuzz into {}", tools.display());
        let mut c = cmd("cargo");
        c.args(["install", "cargo-fuzz", "--locked", "--root"])
            .arg(&tools);
        run(&mut c)?;
    }
    // New inputs land in fuzz/corpus (ignored by git); fuzz/seeds holds the committed corpus
    // records every run starts from.
    fs::create_dir_all(root_dir().join("proto/xid/fuzz/corpus/parse_record"))?;
    let mut c = cmd("cargo");
    c.current_dir(root_dir().join("proto/xid")).args([
        "+nightly",
        "fuzz",
        "run",
        "parse_record",
        "fuzz/corpus/parse_record",
        "fuzz/seeds",
        "--",
        &format!("-max_total_time={seconds}"),
        "-max_len=4096",
    ]);
    run(&mut c)
}

/// Errors end the task with one line on stderr (an anyhow `Result` from `main` would add a
/// backtrace wherever RUST_BACKTRACE is set, as it is in CI).
fn main() -> std::process::ExitCode {
    match task() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn task() -> anyhow::Result<()> {
    let args: Vec<String> = env::args().skip(1).collect();
    let Some((task, rest)) = args.split_first() else {
        bail!(
            "usage: cargo xtask <setup|build [--release]|demo [--seconds N]|test [--no-lint]|bench [ARGS]|soak [--short]|fuzz [--seconds N]|image [--out DIR]|package|codegen>"
        );
    };
    match task.as_str() {
        "setup" => setup(),
        "build" => {
            toolchain()?;
            build(rest.iter().any(|a| a == "--release")).map(|_| ())
        }
        "demo" => demo(rest),
        "test" => {
            setup()?;
            test(rest)
        }
        "bench" => {
            toolchain()?;
            bench(rest)
        }
        "fuzz" => {
            toolchain()?;
            fuzz(rest)
        }
        "soak" => {
            toolchain()?;
            soak(rest)
        }
        "image" => {
            toolchain()?;
            image_cmd(rest)
        }
        "package" => {
            toolchain()?;
            package_build(&root_dir().join("target/packages")).map(|_| ())
        }
        // Regenerates proto/src/generated from the .proto files (committed; a test checks it).
        "codegen" => run(cmd("cargo").args(["run", "-q", "-p", "gpulse-proto-codegen"])),
        other => bail!(
            "unknown task {other:?}: try setup, build, demo, test, bench, soak, fuzz, image, package or codegen"
        ),
    }
}
