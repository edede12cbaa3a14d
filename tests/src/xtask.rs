//! Running `cargo xtask <command>` from a test, the way a developer runs it, bounded in time.

use std::process::Output;
use std::time::Duration;

use crate::netns::run_cmd;

/// `cargo xtask ARGS` with the cargo that runs the tests, killed after `timeout`. Tests run in
/// the tests crate's directory, inside the workspace, so cargo finds the `xtask` alias in the
/// workspace's .cargo/config.toml. Fails only if it could not run or timed out: the caller
/// judges the exit status and output.
pub fn cargo_xtask(args: &[&str], timeout: Duration) -> anyhow::Result<Output> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut full = vec!["xtask"];
    full.extend_from_slice(args);
    run_cmd(&cargo, &full, timeout)
}
