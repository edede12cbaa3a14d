//! ipaccessd: keeps per-account allowlists in its store, enforces them with XDP, and answers
//! login checks and administration over its control socket.
//!
//! Start-up order: configuration, bpffs, the pinned maps and program, the state directory
//! locked and the store opened (refused, unless `--accept-empty-store`, when the store is
//! missing or empty while the pinned maps hold policy, and, unless `--accept-older-store`,
//! when it lost commits whose policy the maps hold or is no copy of their store), the
//! kernel reconciled with the store, the interfaces attached, the control socket (and the
//! metrics endpoint, if configured) bound, and only then systemd told READY=1. SIGHUP
//! re-reads the configuration (never detaching). Stopping (SIGTERM) leaves the filter
//! attached and enforcing; `--detach` removes it. Running it as a service:
//! docs/operations.md.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser};
use ipaccess::{
    capabilities,
    cluster::{self, Cluster},
    config::{self, Config},
    datapath::{self, Datapath, DatapathOptions, ensure_bpffs},
    kernel,
    location::Locator,
    logging, metrics, reload, server,
    service::Service,
    store::{Store, StoreError},
    systemd,
};
use log::{error, info, warn};
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{Signal, SignalKind, signal},
    sync::watch,
};

#[derive(Parser, Debug)]
#[command(name = "ipaccessd", version, about = "Per-account IP access control daemon")]
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
    /// Remove the filter from every interface it is attached to and exit (the package does
    /// this when it is removed).
    #[arg(long, conflicts_with_all = ["interfaces", "detach"])]
    detach_all: bool,
    /// Control socket path (overrides the configuration).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State directory holding the store (overrides the configuration).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Where bpffs is mounted (overrides the configuration).
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
    /// Start even though the store is missing or empty while the pinned maps still hold
    /// policy, and clear that policy from the kernel. Without it such a start is refused, so
    /// that a lost store never turns enforcement off; use it once, on purpose.
    #[arg(long)]
    accept_empty_store: bool,
    /// Start even though the store is behind the policy the pinned maps hold (it lost
    /// commits: a deleted write-ahead log, a restored older backup) or is not a copy of the
    /// store that policy came from, and enforce the store as it is. Without it such a start is refused, so that changes made since (a ban, a
    /// removed entry) are not quietly undone; use it once, on purpose.
    #[arg(long)]
    accept_older_store: bool,
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
    let destination = logging::init();
    let mut args = Args::parse();
    let config = load_config(&args)?;
    logging::set_level(config.log_level.filter());
    if destination == logging::Destination::Journal {
        info!("logging to the journal");
    }
    ensure_bpffs(&config.bpffs).context("preparing bpffs")?;
    if args.detach_all {
        args.detach = datapath::pinned_interfaces_under(&config.bpffs);
        if args.detach.is_empty() {
            info!("the filter is attached to no interface");
            return Ok(());
        }
    }
    let options =
        DatapathOptions { bpffs: config.bpffs.clone(), slots: config.maps.slots, accounts: config.maps.accounts };
    let mut datapath = explain_failure(Datapath::open(&options)).context("loading the XDP program")?;
    if !args.detach.is_empty() {
        for iface in &args.detach {
            if datapath.detach(iface)? {
                info!("{iface}: filter removed");
            } else {
                warn!("{iface}: was not attached");
            }
        }
        return Ok(());
    }

    // A named location database that does not load is a configuration error: refused here,
    // before the kernel is touched, rather than found missing by support later.
    let locator = Locator::load(config.location_database.as_deref())?;
    let (_lock, store) = open_store(&config, &datapath, args.accept_empty_store, args.accept_older_store)?;
    // Maps first, then interfaces: a newly attached filter starts with the store's policy.
    let mut interfaces = Vec::new();
    let service = {
        let (made_with, pin_dir) = (datapath.map_sizes(), datapath.pin_dir().to_owned());
        let service = Service::start(store, datapath, &config).map_err(|e| {
            let note = maps_made_otherwise(&config, &pin_dir, made_with).filter(|_| e.is_capacity());
            anyhow::Error::new(e).context(note.unwrap_or_else(|| "loading the store into the kernel".to_owned()))
        })?;
        if let Some(locator) = &locator {
            info!("locations from {}", locator.describe());
        }
        service.set_locator(locator);
        for iface in &config.interfaces {
            let how = explain_failure(service.attach(iface, config.xdp_mode))
                .with_context(|| format!("attaching to {iface}"))?;
            interfaces.push(format!("{iface} ({})", how.path));
        }
        // After an upgrade that changed the map layout, the old layout's pins outlive the
        // takeover of its links; free them once no interface uses them.
        service.retire_other_layouts();
        Arc::new(service)
    };
    // A fleet node starts enforcing its local copy at once, then follows etcd from there.
    let follower = match &config.cluster {
        Some(fleet) => {
            let applied = service.applied_revision().context("reading the applied revision")?;
            let cluster = Cluster::new(fleet, tokio::runtime::Handle::current(), applied);
            service.join(cluster.clone()).context("recording the node's name")?;
            info!("fleet node {} under {} (local copy at revision {applied})", fleet.node, fleet.prefix);
            // Denied checks are published for support on the other nodes (cluster::attempts).
            let attempts = tokio::spawn(cluster::attempts::publish(cluster.clone(), service.clone()));
            // Successful sign-ins are published for the lockout guard on the other nodes
            // (cluster::signins).
            let signins = tokio::spawn(cluster::signins::publish(cluster.clone(), service.clone()));
            Some([tokio::spawn(cluster::follow(cluster, service.clone())), attempts, signins])
        }
        None => {
            service.leave_fleet().context("reading the applied revision")?;
            None
        }
    };
    if config.interfaces.is_empty() {
        warn!("no interfaces configured (--iface NAME); the filter is loaded but attached nowhere");
    }

    let (listener, socket_file) = bind_socket(&config)?;
    let metrics_listener = match config.metrics.listen {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.with_context(|| format!("binding the metrics endpoint {addr}"))?)
        }
        None => None,
    };
    // Signal handlers before READY=1: from then on a HUP or TERM must not find the default action.
    let hangups = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let stop = shutdown().context("installing the SIGTERM handler")?;
    let status = format!("filtering on [{}], control socket {}", interfaces.join(", "), config.socket.display());
    info!("ready: {status}");
    let mut tasks =
        vec![tokio::spawn(sweep_forever(service.clone())), tokio::spawn(drain_samples_forever(service.clone()))];
    tasks.extend(follower.into_iter().flatten());
    if let Some(listener) = metrics_listener {
        info!("metrics on http://{}/metrics", config.metrics.listen.expect("bound above"));
        tasks.push(tokio::spawn(metrics::serve(listener, service.clone())));
    }
    let (config_tx, config_rx) = watch::channel(Arc::new(config));
    systemd::ready(&status);
    tasks.push(tokio::spawn(reload_on_sighup(hangups, args, service.clone(), config_tx)));
    if let Some(interval) = systemd::watchdog_interval() {
        tasks.push(tokio::spawn(watchdog(service.clone(), interval)));
    }
    server::serve(listener, service.clone(), config_rx, stop).await;
    systemd::stopping();
    socket_file.remove();
    tasks.iter().for_each(|task| task.abort());
    service.flush_activity();
    if keep_filter_pinned(&service, None) {
        info!("stopping; the filter stays attached (ipaccessd --detach IFACE removes it)");
    } else {
        error!("stopping; the filter leaves the interfaces named above with this process");
    }
    Ok(())
}

/// Pins again the filter's link on each interface whose pin was removed while the daemon
/// ran (see [`Service::restore_link_pins`]), saying so. False if one could not be: the
/// filter leaves that interface when this process exits. A failure already in `reported`
/// is not logged again (the sweep tries every ten seconds).
fn keep_filter_pinned(service: &Service, mut reported: Option<&mut BTreeSet<String>>) -> bool {
    let mut all = true;
    for (iface, restored) in service.restore_link_pins() {
        if let Some(reported) = reported.as_deref_mut() {
            let new = if restored.is_err() { reported.insert(iface.clone()) } else { reported.remove(&iface) };
            if restored.is_err() && !new {
                all = false;
                continue;
            }
        }
        match restored {
            Ok(pin) => warn!(
                "{iface}: the filter's pin was removed while ipaccessd ran; pinned again at {}, so that the filter \
                 stays after ipaccessd exits",
                pin.display()
            ),
            Err(e) => {
                error!(
                    "{iface}: the filter's pin was removed while ipaccessd ran and cannot be made again ({e}): the \
                     filter stays only while ipaccessd runs"
                );
                all = false;
            }
        }
    }
    all
}

/// When the pinned maps were made with other sizes than `[maps]` now gives (they outlive the
/// daemon and are reused), what that means and how to get maps of the configured sizes: a
/// raised size does nothing until then, which an operator who just raised it cannot guess.
fn maps_made_otherwise(config: &Config, pin_dir: &Path, (slots, accounts): (u32, u32)) -> Option<String> {
    let wanted = (config.maps.slots, config.maps.accounts);
    (wanted != (slots, accounts)).then(|| {
        format!(
            "the pinned maps in {} were made with {slots} slots and {accounts} accounts, and [maps] now asks for {} \
             and {}: the maps outlive the daemon, and new sizes apply only to new maps. To make them, stop ipaccessd, \
             run `ipaccessd --detach-all` (nothing is filtered from then until the next start), remove that \
             directory, and start ipaccessd again",
            pin_dir.display(),
            wanted.0,
            wanted.1
        )
    })
}

/// Locks the state directory and opens the store, before anything in the kernel changes.
/// Refuses (unless `accept_empty`) a store that is missing or holds no account while the
/// pinned maps hold policy: starting would clear the kernel's tables and leave every bound
/// address unfiltered. Refuses too (unless `accept_older`; a fleet node's copy of etcd's
/// policy as well) a store whose commit count is below the one the maps recorded: it lost
/// commits whose policy the kernel enforces; and a store not on the line of commits the
/// maps recorded, whose count says nothing. A store taken on purpose starts a line of its
/// own. The lock is held for the life of the process.
fn open_store(
    config: &Config,
    datapath: &Datapath,
    accept_empty: bool,
    accept_older: bool,
) -> anyhow::Result<(fs::File, Store)> {
    let (dir, db) = (&config.state_dir, config.database());
    // Ok(true): the store is taken over the policy in the maps on purpose.
    let guard = |found: &str| -> anyhow::Result<bool> {
        let (accounts, bindings) = (datapath.configured_slots().len(), datapath.bindings().len());
        if accounts == 0 && bindings == 0 {
            return Ok(false);
        }
        let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let what = format!(
            "the store {} {found}, but the pinned maps in {} hold policy ({}, {})",
            db.display(),
            datapath.pin_dir().display(),
            count(accounts, "account"),
            count(bindings, "binding")
        );
        if accept_empty {
            warn!("{what}; --accept-empty-store: starting with an empty store and clearing them");
            return Ok(true);
        }
        anyhow::bail!(
            "refusing to start: {what}. Starting would clear them and leave those addresses unfiltered; the kernel \
             keeps enforcing them meanwhile. Restore the store (from a backup) and start again, or start once \
             with --accept-empty-store to begin with no policy on purpose"
        )
    };
    // Each way of finding the store lost is judged once, the first that applies.
    let mut judged = !dir.exists();
    let mut overridden = judged && guard("is missing, and so is its directory")?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    if let Some(why) = open_to_others(dir).with_context(|| format!("reading {}", dir.display()))? {
        warn!("{why}");
    }
    let lock = lock_state_dir(dir)?;
    let found = match fs::metadata(&db) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("is missing"),
        Err(e) => return Err(e).with_context(|| format!("reading {}", db.display())),
        // An empty database file with an empty (or no) write-ahead log holds nothing; opening
        // it would write a new schema into it, so it is judged before it is opened.
        Ok(meta) if meta.len() == 0 && fs::metadata(Store::sibling(&db, "-wal")).map_or(true, |w| w.len() == 0) => {
            Some("is an empty file (0 bytes)")
        }
        Ok(_) => None,
    };
    if let Some(found) = found.filter(|_| !judged) {
        overridden = guard(found)?;
        judged = true;
    }
    let mut store = Store::open(&db).map_err(|e| store_not_opened(e, &db, dir))?;
    if !judged && store.read().and_then(|tx| tx.accounts()).context("reading the store")?.is_empty() {
        overridden = guard("holds no account")?;
        judged = true;
    }
    let (stored, line) = store.read().and_then(|tx| Ok((tx.commits()?, tx.line()?))).context("reading the store")?;
    let (enforced, enforced_line) = (datapath.store_commits(), datapath.store_line());
    // Counts compare within one line only (see `Tx::start_new_line`); 0: none recorded.
    let parted = enforced_line != 0 && line != enforced_line;
    if !judged && (stored < enforced || parted) {
        let what = if parted {
            format!(
                "the store {} is not a copy of the one whose policy the pinned maps in {} hold: it parted from it \
                 when a start accepted an older copy (--accept-older-store), or it is another host's store, so its \
                 {stored} commits do not compare with theirs and it may lack any of their changes",
                db.display(),
                datapath.pin_dir().display()
            )
        } else {
            format!(
                "the store {} is behind the policy the pinned maps in {} hold: it has {stored} commits, and the \
                 maps hold the policy of its commit {enforced}, so {} commits are lost (a deleted or damaged \
                 write-ahead log, a store restored from an older backup)",
                db.display(),
                datapath.pin_dir().display(),
                enforced - stored
            )
        };
        // A fleet node's copy is refused too: etcd may be unreachable, and then the older
        // copy would be enforced until it comes back.
        let put_back = if parted { "Put back the store this host last ran on" } else { "Restore the newer store" };
        let remedy = if config.cluster.is_some() {
            format!(
                "{put_back} and start again, or, once etcd is reachable, start once with --accept-older-store: the \
                 node enforces this copy until it has taken the fleet's policy from etcd, moments later"
            )
        } else {
            format!(
                "{put_back} and start again, or start once with --accept-older-store to enforce this one on purpose"
            )
        };
        if accept_older {
            warn!("{what}; --accept-older-store: enforcing the store as it is");
            overridden = true;
        } else {
            anyhow::bail!(
                "refusing to start: {what}. Starting would enforce the older policy and undo those changes (a ban, \
                 a removed entry); the kernel keeps enforcing them meanwhile. {remedy}"
            );
        }
    }
    // A store taken over the policy in the maps starts a line of its own: its copies from
    // before, some with higher counts, must not pass for it later.
    if overridden || line == 0 {
        let tx = store.transaction().context("writing to the store")?;
        tx.start_new_line().context("writing to the store")?;
        tx.commit().context("writing to the store")?;
    }
    Ok((lock, store))
}

/// Why the store at `db` did not open, and what to do. A file that is no SQLite database
/// (or a damaged one) is named as such. SQLite says only "disk I/O error" when it cannot
/// grow its write-ahead log or the index beside it (-shm), so a failure to read or write is
/// put down to the room left when the state directory is (nearly) full; nothing else is.
fn store_not_opened(e: StoreError, db: &Path, dir: &Path) -> anyhow::Error {
    use rusqlite::ErrorCode as Sqlite;
    let sqlite = match &e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(failure, _)) => Some(failure.code),
        _ => None,
    };
    let next = match sqlite {
        Some(Sqlite::NotADatabase | Sqlite::DatabaseCorrupt) => format!(
            ": the file is damaged, or no store. The kernel keeps enforcing the policy it has meanwhile. Put back the \
             newest backup of {} (with --accept-older-store if it is older than what the kernel enforces) and start \
             again",
            db.display()
        ),
        Some(Sqlite::SystemIoFailure | Sqlite::DiskFull | Sqlite::CannotOpen) => low_room(dir),
        None if matches!(e, StoreError::Io(_)) => low_room(dir),
        _ => String::new(),
    };
    anyhow::Error::new(e).context(format!("opening the store {}{next}", db.display()))
}

/// Below this, a failure to write the lock or open the store is put down to the room left
/// (see [`low_room`]).
const LOW_ROOM: u64 = 4 << 20;

/// `; the state directory … has only N bytes free …` when `dir`'s file system has less than
/// [`LOW_ROOM`] left for the daemon, otherwise nothing.
fn low_room(dir: &std::path::Path) -> String {
    match rustix::fs::statvfs(dir) {
        Ok(fs) if fs.f_bavail.saturating_mul(fs.f_frsize) < LOW_ROOM => format!(
            "; the state directory {} has only {} bytes free, and the store needs room for its write-ahead log and \
             the index beside it (ipaccess.db-wal, ipaccess.db-shm): free some space",
            dir.display(),
            fs.f_bavail.saturating_mul(fs.f_frsize)
        ),
        _ => String::new(),
    }
}

/// Why another user could replace or delete the store in the state directory `dir`, if one
/// could: the directory is writable by group or others, or owned by another user (not
/// root). Only said, never changed: a directory that is not the daemon's own (say
/// /var/lib) must keep its mode.
fn open_to_others(dir: &Path) -> std::io::Result<Option<String>> {
    let found = fs::metadata(dir)?;
    let (mode, owner, me) = (found.mode() & 0o7777, found.uid(), rustix::process::geteuid().as_raw());
    let why = if mode & 0o022 != 0 {
        format!("is writable by other users (mode {mode:04o})")
    } else if owner != me && owner != 0 {
        format!("belongs to uid {owner}")
    } else {
        return Ok(None);
    };
    Ok(Some(format!(
        "the state directory {} {why}: whoever can write there can replace or delete the store, and with it the \
         policy; give ipaccessd a directory of its own (root's, mode 0700, as the unit's StateDirectory= makes)",
        dir.display()
    )))
}

/// An exclusive lock on `dir/ipaccessd.lock`, which holds the locking daemon's pid: a second
/// daemon on the same state directory is refused, naming the first.
fn lock_state_dir(dir: &std::path::Path) -> anyhow::Result<fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = dir.join("ipaccessd.lock");
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    if let Err(error) = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if error != rustix::io::Errno::WOULDBLOCK {
            return Err(std::io::Error::from(error)).with_context(|| format!("locking {}", path.display()));
        }
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = match holder.trim() {
            "" => "another ipaccessd".to_string(),
            pid => format!("another ipaccessd (pid {pid})"),
        };
        let (dir, path) = (dir.display(), path.display());
        anyhow::bail!("{holder} is using the state directory {dir} (it holds {path}); stop it first");
    }
    // The pid needs a block of its own when the file is new: on a full disk this is where
    // the start stops, so it says so.
    let written = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
    written.with_context(|| format!("writing this daemon's pid to {}{}", path.display(), low_room(dir)))?;
    Ok(file)
}

/// Adds to an error from loading or attaching what the kernel's EPERM or EINVAL does not
/// say: which required capabilities the process lacks, and whether the kernel is too old.
fn explain_failure<T, E>(result: Result<T, E>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    result.map_err(|e| {
        let hints: Vec<String> = [capabilities::hint(), kernel::hint()].into_iter().flatten().collect();
        let error = anyhow::Error::new(e);
        if hints.is_empty() { error } else { error.context(hints.join("; ")) }
    })
}

/// SIGHUP: read the configuration again and apply it (see `ipaccess::reload`), between
/// RELOADING=1 and READY=1. A configuration that does not load is refused, with an error
/// in the log, and the one in force is kept.
async fn reload_on_sighup(mut hangups: Signal, args: Args, service: Arc<Service>, config: watch::Sender<Arc<Config>>) {
    while hangups.recv().await.is_some() {
        systemd::reloading();
        let status = match load_config(&args) {
            Err(e) => {
                error!("reload refused, the configuration in force is kept: {e:#}");
                format!("reload refused ({e}); running with the previous configuration")
            }
            Ok(next) => {
                let (service, current) = (service.clone(), config.borrow().clone());
                // The location database is read again first (a newer file at the same path
                // is how it is updated); one that does not load refuses the whole reload.
                let reloaded = tokio::task::spawn_blocking(move || {
                    let locator = Locator::load(next.location_database.as_deref())?;
                    if let Some(locator) = &locator {
                        info!("reload: locations from {}", locator.describe());
                    }
                    service.set_locator(locator);
                    Ok::<_, ipaccess::location::LocationError>(reload::apply(&service, &current, next))
                });
                match reloaded.await {
                    Ok(Ok((in_force, status))) => {
                        config.send_replace(Arc::new(in_force));
                        info!("{status}");
                        status
                    }
                    Ok(Err(e)) => {
                        error!("reload refused, the configuration in force is kept: {e}");
                        format!("reload refused ({e}); running with the previous configuration")
                    }
                    Err(e) => {
                        error!("reload failed: {e}");
                        format!("reload failed ({e})")
                    }
                }
            }
        };
        systemd::ready(&status);
    }
}

/// Pings the watchdog every `interval` (half of systemd's timeout) while the service is
/// healthy: the runtime schedules this task, and [`Service::healthy`] can take the writer
/// lock and read the kernel's maps. A check still running after `interval` is waited for
/// at the next tick rather than started again.
async fn watchdog(service: Arc<Service>, interval: Duration) {
    let mut every = tokio::time::interval(interval);
    let mut pending = None;
    loop {
        every.tick().await;
        let mut check = pending.take().unwrap_or_else(|| {
            let service = service.clone();
            tokio::task::spawn_blocking(move || service.healthy())
        });
        match tokio::time::timeout(interval, &mut check).await {
            Ok(Ok(true)) => systemd::watchdog_ping(),
            Ok(_) => warn!("health check failed; not pinging the watchdog"),
            Err(_) => {
                warn!("the writer lock has been busy for {interval:?}; not pinging the watchdog");
                pending = Some(check);
            }
        }
    }
}

/// Expired overrides and old activity are swept every ten seconds, and a removed pin of the
/// filter's is made again (so that a crash, too, leaves the filter on).
async fn sweep_forever(service: Arc<Service>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    let mut reported = BTreeSet::new();
    loop {
        every.tick().await;
        let service = service.clone();
        let swept = tokio::task::spawn_blocking(move || {
            keep_filter_pinned(&service, Some(&mut reported));
            (service.sweep(), reported)
        });
        match swept.await {
            Ok((Err(e), kept)) => {
                warn!("sweep failed: {e}");
                reported = kept;
            }
            Ok((Ok(()), kept)) => reported = kept,
            Err(e) => {
                warn!("sweep failed: {e}");
                reported = BTreeSet::new();
            }
        }
    }
}

/// The kernel's drop samples are moved into the activity log every second, and the entries
/// that let packets through are noted.
async fn drain_samples_forever(service: Arc<Service>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        let service = service.clone();
        let _ = tokio::task::spawn_blocking(move || {
            service.drain_drop_samples();
            service.note_packets();
        })
        .await;
    }
}

/// Binds the control socket, replacing a stale one left by a previous run. Returns the
/// listener and the socket file's identity, so that a stop removes only its own file.
fn bind_socket(config: &Config) -> anyhow::Result<(UnixListener, SocketFile)> {
    let path = &config.socket;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Only a socket nobody answers on is stale. Another daemon's live socket, taken over,
    // would leave its clients talking to this one (which may enforce nowhere) and that daemon
    // without a socket; a file that is no socket is not this daemon's to delete.
    match fs::symlink_metadata(path) {
        Ok(found) if !found.file_type().is_socket() => {
            anyhow::bail!("{} exists and is not a socket; remove it, or give another --socket", path.display())
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!(
                "another process answers on the control socket {} (another ipaccessd?); stop it first, or give this \
                 one another --socket",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                fs::remove_file(path).with_context(|| format!("removing the stale socket {}", path.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("looking whether {} is in use", path.display())),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let file = SocketFile::of(path).with_context(|| format!("reading {} once bound", path.display()))?;
    fs::set_permissions(&config.socket, fs::Permissions::from_mode(config.socket_mode))
        .with_context(|| format!("setting the mode of {}", config.socket.display()))?;
    if let Some(gid) = config.socket_group {
        std::os::unix::fs::chown(&config.socket, None, Some(gid))
            .with_context(|| format!("giving {} to group {gid}", config.socket.display()))?;
    }
    Ok((listener, file))
}

/// The control socket's file as this daemon bound it (device and inode).
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn of(path: &Path) -> std::io::Result<SocketFile> {
        let found = fs::symlink_metadata(path)?;
        Ok(SocketFile { path: path.to_owned(), id: (found.dev(), found.ino()) })
    }

    /// Removes the file, if it is still the one this daemon bound: a socket file with no
    /// daemon behind it is refused (ECONNREFUSED) until the next start replaces it; without
    /// it, clients see at once that the daemon is gone.
    fn remove(&self) {
        let path = &self.path;
        match SocketFile::of(path) {
            Ok(now) if now.id == self.id => {
                if let Err(e) = fs::remove_file(path) {
                    warn!("could not remove the control socket {}: {e}", path.display());
                }
            }
            Ok(_) => warn!("left {}: it is no longer the socket this daemon bound", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("could not read the control socket {}: {e}", path.display()),
        }
    }
}

/// Completes on SIGTERM or SIGINT; the handlers are installed when this is called.
fn shutdown() -> std::io::Result<impl Future<Output = ()>> {
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
