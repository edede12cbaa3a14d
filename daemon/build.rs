//! Builds the XDP program (ebpf/) for the BPF target with the nightly toolchain and
//! bpf-linker, and leaves its objects in OUT_DIR for `include_bytes_aligned!`: `ipaccess-ebpf`
//! (the filter ipaccessd loads), `ipaccess-bench` (the benchmark's reference programs) and
//! `ipaccess-bench-no-stamp` (the filter built with the ebpf crate's `no-stamp` feature, which
//! only the benchmark loads). `cargo xtask setup` installs what this needs.
//!
//! aya-build forwards the inner cargo's whole log as `cargo:warning=` lines, so every build
//! would print a dozen `warning:` lines that warn of nothing. The script therefore runs
//! aya-build in a second copy of itself and keeps that log back: it is printed as the error
//! when the build fails, and as warnings only when it holds something more than cargo's
//! progress lines (a compiler warning, a skipped build).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Context;

/// Set in the environment of the copy that runs aya-build: the ebpf crate's features, comma
/// separated (empty for the objects ipaccessd and the benchmark load as they are).
const INNER: &str = "IPACCESS_EBPF_BUILD_INNER";

/// The variant's own output directory under OUT_DIR: aya-build names each object after its
/// binary, so the variant's filter would otherwise overwrite the production one.
const NO_STAMP_DIR: &str = "no-stamp";

fn main() -> anyhow::Result<()> {
    if let Some(features) = env::var_os(INNER) {
        let features = features.to_string_lossy().into_owned();
        // Said without a backtrace: the cargo log above it tells what went wrong.
        if let Err(error) = build(&features) {
            eprintln!("{error:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    run_inner("", &out_dir)?;
    let variant_dir = out_dir.join(NO_STAMP_DIR);
    fs::create_dir_all(&variant_dir).with_context(|| format!("creating {}", variant_dir.display()))?;
    run_inner("no-stamp", &variant_dir)?;
    let (from, to) = (variant_dir.join("ipaccess-ebpf"), out_dir.join("ipaccess-bench-no-stamp"));
    fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

/// Runs aya-build in a copy of this script with the ebpf crate's `features`, leaving the
/// objects in `out_dir`, and passes its log on as described above.
fn run_inner(features: &str, out_dir: &Path) -> anyhow::Result<()> {
    let me = env::current_exe().context("locating the build script")?;
    let output = Command::new(&me)
        .env(INNER, features)
        .env("OUT_DIR", out_dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", me.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut log = Vec::new();
    for line in stdout.lines() {
        match line.strip_prefix("cargo:warning=") {
            Some(message) => log.push(message),
            // Instructions to cargo (rerun-if-changed and the like) pass through.
            None => println!("{line}"),
        }
    }
    if !output.status.success() {
        for line in &log {
            eprintln!("{line}");
        }
        eprint!("{}", String::from_utf8_lossy(&output.stderr));
        eprintln!("building the XDP program (ebpf/) failed; its cargo log is above");
        std::process::exit(1);
    }
    if !log.iter().all(|line| is_progress(line)) {
        for line in &log {
            println!("cargo:warning={line}");
        }
    }
    Ok(())
}

fn build(features: &str) -> anyhow::Result<()> {
    let features: Vec<&str> = features.split(',').filter(|f| !f.is_empty()).collect();
    let ebpf = aya_build::Package {
        name: "ipaccess-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        features: &features,
        ..Default::default()
    };
    println!("cargo:rerun-if-changed=../common/src");
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

/// Cargo's status lines ("   Compiling ipaccess-ebpf v0.1.0 (…)", "    Finished …"): an
/// indented capitalised verb. Blank lines count too.
fn is_progress(line: &str) -> bool {
    let rest = line.trim_start();
    if rest.is_empty() {
        return true;
    }
    let verb = rest.split(' ').next().unwrap_or_default();
    rest.len() < line.len()
        && verb.len() > 1
        && verb.starts_with(|c: char| c.is_ascii_uppercase())
        && verb[1..].chars().all(|c| c.is_ascii_lowercase())
}
