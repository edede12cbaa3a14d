//! ipaccessd: loads the XDP filter, attaches it to the given interfaces and keeps it there.
//!
//! This is the datapath half of the daemon: it starts with the policy the pinned maps
//! already hold (empty on a fresh host). The control socket and the policy store come with
//! the daemon proper. Stopping the daemon never removes the filter; `--detach` does.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;
use ipaccess::datapath::{Datapath, DatapathOptions, ensure_bpffs};
use log::{info, warn};

#[derive(Parser, Debug)]
#[command(version, about = "Per-account IP access control: the XDP datapath daemon")]
struct Args {
    /// Interface to filter (repeat for several).
    #[arg(long = "iface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Remove the filter from these interfaces and exit.
    #[arg(long = "detach", value_name = "NAME", conflicts_with = "interfaces")]
    detach: Vec<String>,
    /// Where bpffs is (mounted there if it is not yet).
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// Capacity of the table slot array, used when the maps are first created.
    #[arg(long, default_value_t = ipaccess_common::DEFAULT_SLOTS)]
    slots: u32,
    /// Number of account slots, used when the maps are first created.
    #[arg(long, default_value_t = ipaccess_common::DEFAULT_ACCOUNTS)]
    accounts: u32,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    ensure_bpffs(&args.bpffs).context("preparing bpffs")?;
    let options = DatapathOptions { bpffs: args.bpffs.clone(), slots: args.slots, accounts: args.accounts };
    let mut datapath = Datapath::open(&options).context("loading the XDP program")?;
    if !args.detach.is_empty() {
        for iface in &args.detach {
            if !datapath.detach(iface)? {
                warn!("{iface}: was not attached");
            }
        }
        return Ok(());
    }
    for iface in &args.interfaces {
        let how = datapath.attach(iface).with_context(|| format!("attaching to {iface}"))?;
        info!("{iface}: filtering ({how:?})");
    }
    if args.interfaces.is_empty() {
        warn!("no interfaces given (--iface NAME); the program is loaded but filters nothing");
    }
    let attached = datapath.attached_interfaces();
    info!("ready; filtering on {attached:?}; pins in {}", datapath.pin_dir().display());
    wait_for_shutdown().await?;
    info!("stopping; the filter stays attached (use --detach to remove it)");
    Ok(())
}

async fn wait_for_shutdown() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
