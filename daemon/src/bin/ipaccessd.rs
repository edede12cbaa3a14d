//! ipaccessd: keeps per-account allowlists in its store, enforces them with XDP, and answers
//! login checks and administration over its control socket.
//!
//! Start-up order: configuration, bpffs, the pinned maps and program, the store, the kernel
//! reconciled with the store, the interfaces attached, and only then the socket. Stopping
//! (SIGTERM) leaves the filter attached and enforcing; `--detach` removes it.

use std::{fs, os::unix::fs::PermissionsExt as _, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser};
use ipaccess::{
    config::{self, Config},
    datapath::{Datapath, DatapathOptions, ensure_bpffs},
    server,
    service::{ActivityLog, Service},
    store::Store,
};
use log::{info, warn};
use tokio::net::UnixListener;

#[derive(Parser, Debug)]
#[command(version, about = "Per-account IP access control daemon")]
struct Args {
    /// Configuration file (default /etc/ipaccess/ipaccessd.toml, optional).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Interface to filter, in addition to the configuration's (repeatable).
    #[arg(long = "iface", value_name = "NAME")]
    interfaces: Vec<String>,
    /// Remove the filter from these interfaces and exit.
    #[arg(long = "detach", value_name = "NAME", conflicts_with = "interfaces")]
    detach: Vec<String>,
    /// Control socket path (overrides the configuration).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory holding the store (overrides the configuration).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where bpffs is mounted (overrides the configuration).
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
}

fn load_config(args: &Args) -> anyhow::Result<Config> {
    let (path, required) = match &args.config {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    let mut config = Config::load(&path, required)?;
    config.interfaces.extend(args.interfaces.iter().cloned());
    if let Some(socket) = &args.socket {
        config.socket = socket.clone();
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    if let Some(bpffs) = &args.bpffs {
        config.bpffs = bpffs.clone();
    }
    Ok(config)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    if let Some(status) = ipaccess::docs::generate_if_requested(Args::command, "ipaccessd") {
        std::process::exit(status);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = load_config(&args)?;
    ensure_bpffs(&config.bpffs).context("preparing bpffs")?;
    let options = DatapathOptions { bpffs: config.bpffs.clone(), slots: config.maps.slots, accounts: config.maps.accounts };
    let mut datapath = Datapath::open(&options).context("loading the XDP program")?;
    if !args.detach.is_empty() {
        for iface in &args.detach {
            if !datapath.detach(iface)? {
                warn!("{iface}: was not attached");
            }
        }
        return Ok(());
    }

    fs::create_dir_all(&config.state_dir).with_context(|| format!("creating {}", config.state_dir.display()))?;
    let store = Store::open(&config.database()).context("opening the store")?;
    let activity = ActivityLog::start(Store::open(&config.database()).context("opening the store")?);
    // Maps first, then interfaces: a newly attached filter starts with the store's policy.
    let mut interfaces = Vec::new();
    let service = {
        let service = Service::start(store, datapath, activity, &config)
            .map_err(|f| anyhow::anyhow!("{}", f.0.message))?;
        for iface in &config.interfaces {
            let how = service.attach(iface).with_context(|| format!("attaching to {iface}"))?;
            interfaces.push(format!("{iface} ({how:?})"));
        }
        Arc::new(service)
    };
    if config.interfaces.is_empty() {
        warn!("no interfaces configured (--iface NAME); the filter is loaded but attached nowhere");
    }

    let listener = bind_socket(&config)?;
    info!("ready: filtering on [{}], control socket {}", interfaces.join(", "), config.socket.display());
    let sweeper = tokio::spawn(sweep_forever(service.clone()));
    let sampler = tokio::spawn(drain_samples_forever(service.clone()));
    server::serve(listener, service.clone(), Arc::new(config), shutdown()).await;
    sweeper.abort();
    sampler.abort();
    service.flush_activity();
    info!("stopping; the filter stays attached (ipaccessd --detach IFACE removes it)");
    Ok(())
}

/// Expired overrides and old activity are swept every ten seconds.
async fn sweep_forever(service: Arc<Service>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        every.tick().await;
        let service = service.clone();
        match tokio::task::spawn_blocking(move || service.sweep()).await {
            Ok(Err(e)) => warn!("sweep failed: {}", e.0.message),
            Err(e) => warn!("sweep failed: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// The kernel's drop samples are moved into the activity log every second.
async fn drain_samples_forever(service: Arc<Service>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        let service = service.clone();
        let _ = tokio::task::spawn_blocking(move || service.drain_drop_samples()).await;
    }
}

/// Binds the control socket, replacing a stale one left by a previous run.
fn bind_socket(config: &Config) -> anyhow::Result<UnixListener> {
    if let Some(dir) = config.socket.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(&config.socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale {}", config.socket.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(&config.socket).with_context(|| format!("binding {}", config.socket.display()))?;
    fs::set_permissions(&config.socket, fs::Permissions::from_mode(config.socket_mode))
        .with_context(|| format!("setting the mode of {}", config.socket.display()))?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(&config.socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", config.socket.display()))?;
    }
    Ok(listener)
}

async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        warn!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
