//! `cargo xtask`: installs the toolchain the eBPF build needs and drives build, run, test,
//! bench and package. Every command runs `setup` first, so a fresh machine needs nothing but
//! `cargo xtask <command>`.

mod demo;
mod demo_fleet;
mod package;
mod setup;

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", about = "Development tasks for ipaccess")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the XDP program needs (LLVM, rust-src, bpf-linker), skipping
    /// what is already present.
    Setup,
    /// Build the daemon binaries (ipaccessd, ipaccessctl).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// The gates CI runs before the tests: rustfmt (check only), and clippy with warnings
    /// as errors on every crate, the XDP program's included (nightly, BPF target).
    Lint,
    /// Run every test (needs root). Arguments after `--` go to the test harness,
    /// e.g. `cargo xtask test -- differential --nocapture`.
    Test {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Build in release mode and run ipaccessd (needs root) with the arguments after `--`.
    Run {
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// A narrated tour (needs root): two namespaced hosts, the real daemon filtering one of
    /// them, allowed and blocked clients, a refused login, a support override, counters and
    /// the activity log. Removes everything it made, also on Ctrl-C.
    Demo {
        /// A fleet instead: a 3-member etcd and 3 nodes; a change through one node enforced on
        /// all, and every node still enforcing while etcd has lost its quorum.
        #[arg(long)]
        fleet: bool,
    },
    /// Build the Debian package: binaries, systemd unit, configuration, man pages and shell
    /// completions in target/debian/ipaccess_<version>_<arch>.deb.
    Package,
    /// Run the benchmark binary `bench-<NAME>` from the tests crate, e.g. `cargo xtask bench
    /// datapath -- <args>`.
    Bench {
        /// Benchmark name: `datapath` runs `bench-datapath`.
        name: String,
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

fn main() {
    // Print the error chain on one line; no backtrace dump even when RUST_BACKTRACE is set.
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            let mut cargo = cargo(["build", "-p", "ipaccess", "--bins"]);
            if release {
                cargo.arg("--release");
            }
            status(&mut cargo)
        }
        Cmd::Test { args } => {
            // The tests load XDP programs, create network namespaces and mount bpffs.
            require_root("test")?;
            setup::run()?;
            // The eBPF crate only builds for the BPF target; daemon/build.rs builds it.
            // --no-fail-fast: report every failing test binary, not just the first.
            let mut cargo = cargo(["test", "--release", "--no-fail-fast", "--workspace"]);
            cargo.args(["--exclude", "ipaccess-ebpf", "--"]);
            // The tests each set up namespaces and veth pairs; two at a time keeps them from
            // starving each other on small machines.
            if !args.iter().any(|a| a.to_string_lossy().starts_with("--test-threads")) {
                cargo.arg("--test-threads=2");
            }
            run_tests(cargo.args(args))
        }
        Cmd::Run { args } => {
            require_root("run")?;
            setup::run()?;
            status(&mut cargo(["build", "--release", "-p", "ipaccess", "--bins"]))?;
            let daemon = target_dir().join("release/ipaccessd");
            let err = command(&daemon).args(args).exec();
            Err(err).with_context(|| format!("failed to exec {}", daemon.display()))
        }
        Cmd::Lint => {
            setup::run()?;
            status(&mut cargo(["fmt", "--all", "--check"]))?;
            status(&mut cargo([
                "clippy",
                "--workspace",
                "--exclude",
                "ipaccess-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))?;
            // The XDP program builds only for the BPF target, with nightly and core from source,
            // as aya-build builds it.
            let mut ebpf = command("cargo");
            ebpf.current_dir(workspace_root().join("ebpf")).args([
                "+nightly",
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--bins",
                "--",
                "-D",
                "warnings",
            ]);
            // A separate target directory: the nightly, BPF-target build must not evict the
            // stable host build that the tests use.
            status(ebpf.env("CARGO_TARGET_DIR", target_dir().join("lint-ebpf")))
        }
        Cmd::Demo { fleet } => {
            require_root("demo")?;
            setup::run()?;
            if fleet { demo_fleet::run() } else { demo::run() }
        }
        Cmd::Package => {
            setup::run()?;
            let deb = package::run()?;
            println!("package: {}", deb.display());
            Ok(())
        }
        Cmd::Bench { name, args } => {
            setup::run()?;
            // The control and fleet benchmarks start the real ipaccessd and ipaccessctl from
            // target/release; a fresh checkout has not built them yet.
            status(&mut cargo(["build", "--release", "-p", "ipaccess", "--bins"]))?;
            let mut cargo = cargo(["run", "--release", "-p", "ipaccess-tests"]);
            cargo.args(["--bin", &format!("bench-{name}"), "--"]);
            status(cargo.args(args))
        }
    }
}

/// Runs `cargo test`, passing its output through, and ends with one line that totals every
/// test binary's result (CI reads the last line; cargo's own last line is often a doc-test
/// binary with nothing in it).
fn run_tests(cargo: &mut Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut child = cargo.stdout(std::process::Stdio::piped()).spawn().context("failed to run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            passed += count_before(result, " passed");
            failed += count_before(result, " failed");
        }
    }
    let status = child.wait()?;
    std::io::stdout().flush()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}

/// The number just before `label` in a libtest summary such as "ok. 8 passed; 0 failed; ...".
fn count_before(summary: &str, label: &str) -> u64 {
    summary
        .split(';')
        .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(label))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// A command run from the workspace root with `~/.cargo/bin` on PATH, where `cargo install`
/// puts bpf-linker; aya-build looks for it there through PATH.
pub(crate) fn command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(workspace_root()).env("PATH", path_with_cargo_bin());
    cmd
}

/// The cargo that runs us (`$CARGO`), so the toolchain stays the one the user picked.
pub(crate) fn cargo<'a>(args: impl IntoIterator<Item = &'a str>) -> Command {
    let mut cmd = command(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args);
    cmd
}

fn path_with_cargo_bin() -> OsString {
    let path = env::var_os("PATH").unwrap_or_default();
    let Some(home) = env::var_os("HOME") else {
        return path;
    };
    let cargo_bin = Path::new(&home).join(".cargo/bin");
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if !dirs.contains(&cargo_bin) {
        dirs.insert(0, cargo_bin);
    }
    env::join_paths(dirs).unwrap_or(path)
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub(crate) fn status(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

/// `program args…`, without the environment and directory that `{:?}` adds.
fn show(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program()).file_name().unwrap_or(cmd.get_program());
    let mut line = program.to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "`cargo xtask {what}` must run as root: it loads XDP programs (CAP_BPF, \
             CAP_NET_ADMIN) and mounts bpffs; try `sudo -E env PATH=$PATH cargo xtask {what}`"
        );
    }
    Ok(())
}
