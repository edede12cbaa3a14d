//! `cargo xtask package`: the Debian package, `target/debian/ipaccess_<version>_<arch>.deb`.
//!
//! cargo-deb does the packaging from `[package.metadata.deb]` in daemon/Cargo.toml. Before it
//! runs, the freshly built binaries write their own man pages and completions under
//! `target/release/docs`, where that metadata's assets pick them up.

use std::{fs, io, path::PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, command, status, target_dir};

pub fn run() -> Result<PathBuf> {
    status(&mut cargo(["build", "--release", "-p", "ipaccess", "--bins"]))?;
    let release = target_dir().join("release");
    let docs = release.join("docs");
    // From scratch, so that the page of a subcommand that no longer exists cannot linger.
    match fs::remove_dir_all(&docs) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", docs.display()));
        }
        _ => {}
    }
    for bin in ["ipaccessd", "ipaccessctl"] {
        status(command(release.join(bin)).arg("--generate-docs").arg(&docs))?;
    }
    // Debian policy: man pages gzipped; -n leaves out name and time so builds are reproducible.
    let man = docs.join("man");
    let pages: Vec<PathBuf> = fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<io::Result<_>>()?;
    status(command("gzip").args(["-9nf"]).args(&pages))?;

    // --strip: the release profile keeps line tables for backtraces in development; the
    // package does not need to carry them.
    let out = cargo(["deb", "-p", "ipaccess", "--no-build", "--strip"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("failed to run cargo deb (is cargo-deb installed? `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!("`cargo deb` failed ({})", out.status);
    }
    // cargo-deb prints the path of the package it wrote as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout.lines().rev().find(|l| l.ends_with(".deb")).context("cargo deb printed no package path")?;
    Ok(PathBuf::from(deb.trim()))
}
