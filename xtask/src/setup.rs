//! `cargo xtask setup`: makes this machine able to build the XDP program and the Debian
//! package. Each step checks first and installs only what is missing, so a second run takes a
//! moment.

use anyhow::{Context as _, Result, bail};

use crate::{cargo, command, is_root, status};

/// Debian packages: LLVM 22 (+ polly, zstd, zlib, which its libLLVM links against) for
/// bpf-linker, iproute2 for the tests' network namespaces, dpkg-dev (dpkg-shlibdeps, which
/// cargo-deb asks for the package's library dependencies), and for the package test groff
/// (man pages must render cleanly) and adduser (the package's postinst runs it).
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    // systemd-analyze, for the test that verifies the unit file (systemd need not run).
    "systemd",
    // Packaging: dpkg-deb for cargo-deb, groff to check the man pages, adduser for postinst.
    "dpkg-dev",
    "groff-base",
    "adduser",
    // The fleet tests start real etcd members (etcd from etcd-server) and drive them with
    // etcdctl (Debian's etcd-client, only suggested by etcd-server); the Rust etcd-client
    // crate's build needs protoc.
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    // libfaketime: a fleet test runs one daemon with its wall clock shifted.
    "faketime",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds on stable Rust (1.85 or later).
const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn run() -> Result<()> {
    nightly()?;
    packages()?;
    nightly_component("rust-src")?;
    // `cargo xtask lint` checks the XDP program with nightly's clippy.
    nightly_component("clippy")?;
    bpf_linker()?;
    cargo_deb()
}

/// Output of a check command; None when it could not run or failed.
fn query(program: &str, args: &[&str]) -> Option<String> {
    let out = command(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly() -> Result<()> {
    let toolchains =
        query("rustup", &["toolchain", "list"]).context("`rustup toolchain list` failed; is rustup installed?")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "the nightly toolchain is missing; the XDP program needs it (`rustup toolchain \
             install nightly`), and it cannot be downloaded from here"
        );
    }
    println!("setup: nightly toolchain found");
    Ok(())
}

fn packages() -> Result<()> {
    let installed = |pkg: &str| {
        query("dpkg-query", &["-W", "-f=${Status}", pkg]).is_some_and(|s| s.trim() == "install ok installed")
    };
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("setup: Debian packages present ({})", PACKAGES.join(" "));
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(" "));
    if !is_root() {
        bail!("installing {} needs root; run `cargo xtask setup` as root", missing.join(" "));
    }
    status(command("apt-get").arg("update"))?;
    status(command("apt-get").env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y"]).args(missing))
}

fn nightly_component(name: &str) -> Result<()> {
    let args = ["component", "list", "--toolchain", "nightly", "--installed"];
    if query("rustup", &args).is_some_and(|s| s.lines().any(|l| l.trim().starts_with(name))) {
        println!("setup: {name} for nightly present");
        return Ok(());
    }
    println!("setup: adding {name} to nightly");
    status(command("rustup").args(["component", "add", name, "--toolchain", "nightly"]))
}

fn bpf_linker() -> Result<()> {
    if let Some(version) = query("bpf-linker", &["--version"]) {
        println!("setup: {} present", version.trim());
        return Ok(());
    }
    println!("setup: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22");
    let install = |locked: bool| {
        let mut cmd = cargo(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            cmd.arg("--locked");
        }
        // Without LLVM_PREFIX, bpf-linker's build script finds the distro's older
        // /usr/bin/llvm-config and fails to link -lLLVM.
        cmd.args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX);
        status(&mut cmd)
    };
    install(true).or_else(|err| {
        println!("setup: `cargo install --locked` failed ({err:#}); retrying without --locked");
        install(false)
    })
}

fn cargo_deb() -> Result<()> {
    if let Some(version) = query("cargo-deb", &["--version"]) {
        println!("setup: {} present", version.trim());
        return Ok(());
    }
    println!("setup: installing cargo-deb {CARGO_DEB_VERSION}");
    status(&mut cargo(["install", "cargo-deb", "--version", CARGO_DEB_VERSION, "--locked"]))
}
