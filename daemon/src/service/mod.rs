//! The daemon's core: every command, applied to the store and the kernel together.
//!
//! A change is written in a store transaction, applied to the maps, and only then
//! committed; if the maps refuse it, the transaction is rolled back and the kernel put back
//! as it was, so the caller's error means "nothing changed" (see [`change`]). Login checks
//! are answered from an in-memory copy of the policy, never from the database; other reads
//! run on the store's read connections, beside the writer.
//!
//! One module per command family: [`accounts`], [`allowlist`], [`bindings`], [`check`],
//! [`support`] (overrides and activity), [`sets`] (shared named sets) and [`operations`]
//! (status, counters, detach, metrics). [`upkeep`] holds the periodic work: override sweeps and drop samples.

mod accounts;
mod allowlist;
mod attempts;
mod bindings;
mod change;
mod check;
mod fleet;
mod lockout;
mod operations;
mod seed;
mod sets;
mod support;
mod upkeep;
mod validate;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use log::{info, warn};
use serde_json::value::RawValue;

pub use crate::activity::ActivityLog;
use crate::{
    datapath::{self, Datapath, DatapathError},
    metrics::CheckCounters,
    policy::{AccountCache, AccountPolicy, LiveOverride, SetPolicy, SetUse, Sets},
    protocol::{Call, Caller, Command, ErrorBody, ErrorCode},
    store::{Checkpointer, Readers, Store, StoreError},
};

/// Read connections beside the writer (the machine this runs on has a few cores; reads are
/// short).
const READERS: usize = 4;

/// An error for the caller: a stable code and a sentence.
#[derive(Debug)]
pub struct Failure(pub ErrorBody);

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure(ErrorBody { code, message: message.into(), details: None })
    }

    /// A failure whose `details` tell a client what it ran into (a limit, the accounts in
    /// the way) without parsing the message.
    pub fn with_details(code: ErrorCode, message: impl Into<String>, details: serde_json::Value) -> Self {
        Failure(ErrorBody { code, message: message.into(), details: Some(details) })
    }

    /// The same failure, its message starting with what it is about (`entry 3`, `account
    /// acme`), as clients map it back to a line of their file.
    pub fn prefixed(mut self, place: &str) -> Self {
        self.0.message = format!("{place}: {}", self.0.message);
        self
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::AccountExists(_) => ErrorCode::AccountExists,
            StoreError::UnknownAccount(_) | StoreError::UnknownParent(_) => ErrorCode::UnknownAccount,
            StoreError::EntryExists { .. } => ErrorCode::EntryExists,
            StoreError::BindingExists { .. } | StoreError::BindingScope { .. } => ErrorCode::BindingExists,
            StoreError::NestedParent { .. } => ErrorCode::Refused,
            StoreError::Corrupt(_) | StoreError::Sqlite(_) | StoreError::Io(_) | StoreError::Gone(_) => {
                ErrorCode::Internal
            }
        };
        Failure::new(code, e.to_string())
    }
}

impl From<DatapathError> for Failure {
    fn from(e: DatapathError) -> Self {
        // Full tables are an operator's capacity problem with a known remedy, not a fault.
        let code = match &e {
            _ if e.is_capacity() => ErrorCode::TablesFull,
            DatapathError::TooManySets(_) => ErrorCode::TooManySets,
            _ => ErrorCode::Internal,
        };
        Failure::new(code, format!("the kernel refused the change, nothing was changed: {e}"))
    }
}

/// What went wrong in the daemon's own work (starting, upkeep, metrics), for its log: not a
/// caller's error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the kernel's maps: {0}")]
    Datapath(#[from] DatapathError),
}

impl ServiceError {
    /// The kernel's maps had no room (see [`DatapathError::is_capacity`]).
    pub fn is_capacity(&self) -> bool {
        matches!(self, Self::Datapath(e) if e.is_capacity())
    }
}

/// A command's reply, serialized once (the server writes it as it is), or its error.
pub type Outcome = Result<Box<RawValue>, Failure>;

/// The one writer: store and maps change together under this lock.
struct Writer {
    store: Store,
    datapath: Datapath,
}

pub struct Service {
    /// Writes through the writer (see [`crate::activity`]); before it, so that dropping it
    /// writes out its counts while the writer is there.
    activity: ActivityLog,
    writer: Arc<Mutex<Writer>>,
    /// Connections for reads, so that they wait neither for the writer nor for each other.
    readers: Readers,
    /// Checkpoints the WAL beside the writer, so no change's commit does it.
    _checkpointer: Checkpointer,
    /// Every account's policy, as committed; login checks read only this.
    accounts: RwLock<AccountCache>,
    /// Every shared set's networks, as committed, held once for all referencing accounts.
    sets: RwLock<Sets>,
    /// Settings a reload may change (see [`Service::reconfigure`]).
    retention_days: AtomicU32,
    /// When (unix s) the sweep next searches all audit records for expired ones, not only
    /// the oldest (see [`Tx::prune_activity`](crate::store::Tx::prune_activity)).
    thorough_prune_at: AtomicI64,
    min_override_ttl: AtomicU64,
    /// The widest IPv4 and IPv6 prefixes an override may cover.
    widest_override: (AtomicU8, AtomicU8),
    checks: CheckCounters,
    /// The kernel's packet counters, read without the writer lock.
    counters: datapath::CounterReader,
    /// How long [`Service::start`] took to make the kernel match the store.
    reconcile: Duration,
    /// The fleet this node belongs to, if any (see [`fleet`]).
    cluster: OnceLock<Arc<crate::cluster::Cluster>>,
    /// This node's name in its fleet (`[cluster] node`): which node-scoped bindings its
    /// kernel enforces, from the start (also before it reaches etcd).
    node: Option<String>,
    /// Changes the fleet committed that this node's kernel refused (full tables).
    cluster_apply_failures: AtomicU64,
    /// Accounts, sets (`set:NAME`) and bound addresses (`bind:ADDR`) whose latest version
    /// from the fleet this node's kernel refused, with that version's revision: a change to
    /// them made here is not acknowledged as enforced.
    unenforced: Mutex<HashMap<String, i64>>,
    /// A set waits for a kernel id and one is free: the watch resynchronises (see
    /// `retry_unenforced`).
    resync_wanted: AtomicBool,
    /// Which length lets each account's packets through (`note_packets`, each second): its
    /// own lock, so that the tally of a busy second does not hold the writer's.
    probe_order: Mutex<crate::datapath::order::ProbeOrder>,
    /// `[limits] max_entries_per_account` (a reload may change it).
    max_entries: AtomicU32,
    /// `[limits] max_overrides_per_account` and `max_overrides` (a reload may change them).
    max_overrides: (AtomicU32, AtomicU32),
    /// Changes refused for want of room: the kernel's tables, the per-account limit.
    refusals: crate::metrics::RefusalCounters,
    /// The location database, if one is configured (replaced whole on reload).
    locator: RwLock<Option<Arc<crate::location::Locator>>>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn unknown(account: &str) -> Failure {
    Failure::new(ErrorCode::UnknownAccount, format!("there is no account {account}"))
}

impl Service {
    /// Loads the store and makes the kernel's maps match it (changing only what differs).
    pub fn start(
        mut store: Store,
        mut datapath: Datapath,
        config: &crate::config::Config,
    ) -> Result<Service, ServiceError> {
        let started = std::time::Instant::now();
        let samples = config.drop_samples_per_second;
        datapath.set_sampling(samples, samples.max(1) * 10);
        let loaded_at = now();
        let (accounts, entries, bindings, overrides) = {
            let tx = store.transaction()?;
            (tx.accounts()?, tx.all_entries()?, tx.bindings()?, tx.live_overrides(None, loaded_at)?)
        };
        let (set_rows, set_entries, set_refs) = {
            let tx = store.transaction()?;
            (tx.sets()?, tx.all_set_entries()?, tx.all_set_refs()?)
        };
        let mut cache: HashMap<String, AccountPolicy> = accounts
            .iter()
            .map(|a| {
                let cached = AccountPolicy {
                    slot: a.slot,
                    parent: a.parent.clone(),
                    state: a.state,
                    mode: a.mode,
                    entries: Vec::new(),
                    expiring: Vec::new(),
                    overrides: Vec::new(),
                    sets: Vec::new(),
                };
                (a.id.clone(), cached)
            })
            .collect();
        for e in entries.into_iter().filter(|e| e.enabled) {
            // Such an entry is refused today; one from an older version keeps being
            // enforced as it was (the store is not rewritten behind the customer's back).
            if e.cidr.prefix_len() == 0 {
                warn!(
                    "account {:?}: allowlist entry {} allows every address; it is kept and enforced, but it is refused \
                     today: set the account's mode to off and remove the entry",
                    e.account, e.cidr
                );
            } else if let Some(today) = crate::policy::stored_otherwise_today(e.cidr) {
                warn!(
                    "account {:?}: allowlist entry {} was stored by an older version and is enforced as stored{}; {today}: \
                     remove it (`allow remove` with this spelling) and add the network it means",
                    e.account,
                    e.cidr,
                    if crate::policy::is_ipv4_mapped(e.cidr) {
                        ", which lets nobody in (addresses are checked as IPv4)"
                    } else {
                        ""
                    }
                );
            }
            let Some(a) = cache.get_mut(&e.account) else { continue };
            // One that has ended lets nobody in (as in `policy::split_entries`).
            match e.expires_at {
                None => a.entries.push(e.cidr),
                Some(expires_at) if expires_at > loaded_at => {
                    a.expiring.push(crate::policy::ExpiringEntry { cidr: e.cidr, expires_at })
                }
                Some(_) => {}
            }
        }
        for o in overrides {
            if let Some(a) = cache.get_mut(&o.account) {
                a.overrides.push(LiveOverride { id: o.id, cidr: o.cidr, expires_at: o.expires_at });
            }
        }
        let mut sets: Sets = set_rows
            .iter()
            .map(|s| (s.name.clone(), SetPolicy { kernel_id: s.kernel_id, entries: Vec::new() }))
            .collect();
        for (name, entry) in set_entries {
            if let Some(set) = sets.get_mut(&name) {
                set.entries.push(entry.cidr);
            }
        }
        for r in set_refs.into_iter().filter(|r| r.enabled) {
            if let Some(a) = cache.get_mut(&r.account) {
                a.sets.push(SetUse { name: r.set, kernel_id: r.kernel_id });
            }
        }
        // Into empty maps (after a reboot), a policy that packed the tables past half full in
        // place must load as tightly. Keys: entries, overrides, set networks and bindings;
        // tables: an allowlist and a set group an account, a table a set, the bindings'.
        let own: usize = cache.values().map(|a| a.entries.len() + a.expiring.len() + a.overrides.len()).sum();
        let keys = own + sets.values().map(|s| s.entries.len()).sum::<usize>() + bindings.len();
        let tables = 2 * cache.len() + sets.len() + 1;
        if datapath.load_densely(keys as u64, tables as u64) {
            info!("loading {keys} keys into empty maps with tables fuller than half: the slots are tight");
        }
        // Sets before accounts, so that no account's reference names a set the kernel lacks.
        // The kernel's tables are per combination of sets (a set group). A group an earlier
        // daemon left is brought up to these sets in place when all its accounts still want
        // the same ones; any other goes on enforcing until each account is given its sets
        // again below, which moves it to a group built from these. No stale set outlives this.
        for set in sets.values() {
            datapath.set_shared_set(set.kernel_id, &set.entries)?;
        }
        let wanted: HashSet<u32> = cache.values().map(|a| a.slot).collect();
        for slot in datapath.configured_slots().into_iter().filter(|s| !wanted.contains(s)) {
            datapath.remove_account(slot)?;
        }
        let sets_wanted: HashMap<u32, Vec<u32>> =
            cache.values().map(|a| (a.slot, a.sets.iter().map(|s| s.kernel_id).collect())).collect();
        datapath.adopt_found_set_groups(&sets_wanted)?;
        for (id, account) in &cache {
            change::apply_account(&mut datapath, account, crate::policy::suspended(|a| cache.get(a), id))?;
        }
        let node = config.cluster.as_ref().map(|c| c.node.clone());
        let bindings = bindings::for_kernel(&bindings, node.as_deref(), |id| cache.get(id).map(|a| a.slot));
        datapath.set_bindings(&bindings)?;
        datapath.end_dense_load();
        // The maps now hold this store's policy (see `Tx::commit_counted`, `Tx::start_new_line`).
        let (commits, line) = store.read().and_then(|tx| Ok((tx.commits()?, tx.line()?)))?;
        datapath.set_store_commits(commits)?;
        datapath.set_store_line(line)?;
        let reconcile = started.elapsed();
        info!(
            "reconciled {} accounts, {} shared sets and {} bindings with the kernel in {reconcile:.2?}",
            cache.len(),
            sets.len(),
            bindings.len()
        );
        let counters = datapath.counter_reader()?;
        if config.cluster.is_some() {
            store.as_copy_of_a_durable_source()?;
        }
        let readers = store.readers(READERS);
        let checkpointer = store.checkpoint_in_background()?;
        let writer = Arc::new(Mutex::new(Writer { store, datapath }));
        let activity = ActivityLog::start(crate::activity::shared_access(&writer, |w| &mut w.store));
        Ok(Service {
            readers,
            _checkpointer: checkpointer,
            activity,
            writer,
            accounts: RwLock::new(AccountCache::new(cache)),
            sets: RwLock::new(sets),
            retention_days: config.retention_days.into(),
            thorough_prune_at: AtomicI64::new(0),
            min_override_ttl: config.min_override_ttl_seconds.max(1).into(),
            widest_override: (config.widest_override_ipv4.into(), config.widest_override_ipv6.into()),
            checks: CheckCounters::default(),
            counters,
            reconcile,
            cluster: OnceLock::new(),
            node,
            cluster_apply_failures: AtomicU64::new(0),
            unenforced: Mutex::default(),
            resync_wanted: AtomicBool::new(false),
            probe_order: Mutex::default(),
            max_entries: config.limits.max_entries_per_account.into(),
            max_overrides: (config.limits.max_overrides_per_account.into(), config.limits.max_overrides.into()),
            refusals: Default::default(),
            locator: RwLock::new(None),
        })
    }

    /// Runs one command for `caller` (whose uid is recorded as the author of changes). Each
    /// family's handler takes its typed request and returns its typed reply.
    pub fn execute(&self, command: Command, caller: &Caller) -> Outcome {
        let outcome = self.dispatch(command, caller);
        // Counted here, once for every command family: what an operator watches is how often
        // a full table or the per-account limit turned a change away.
        if let Err(Failure(body)) = &outcome {
            self.refusals.count(body.code);
        }
        outcome
    }

    fn dispatch(&self, command: Command, caller: &Caller) -> Outcome {
        let uid = caller.uid;
        match validate::canonical(command)? {
            Command::Check(r) => run(r, |r| self.check(r, caller)),
            Command::AccountAdd(r) => run(r, |r| self.account_add(r, uid)),
            Command::AccountShow(r) => run(r, |r| self.account_show(r)),
            Command::AccountRemove(r) => run(r, |r| self.account_remove(r, uid)),
            Command::AccountList(r) => run(r, |r| self.account_list(r)),
            Command::AccountState(r) => run(r, |r| self.account_state(r, uid)),
            Command::AccountMode(r) => run(r, |r| self.account_mode(r, uid)),
            Command::Import(r) => run(r, |r| self.import(r, uid)),
            Command::AllowAdd(r) => run(r, |r| self.allow_add(r, uid)),
            Command::AllowRemove(r) => run(r, |r| self.allow_remove(r, uid)),
            Command::AllowList(r) => run(r, |r| self.allow_list(r)),
            Command::AllowDisable(r) => run(r, |r| self.allow_disable(r, uid)),
            Command::AllowEnable(r) => run(r, |r| self.allow_enable(r, uid)),
            Command::AllowLabel(r) => run(r, |r| self.allow_label(r, uid)),
            Command::AllowExpiry(r) => run(r, |r| self.allow_expiry(r, uid)),
            Command::AllowReplace(r) => run(r, |r| self.allow_replace(r, uid)),
            Command::BindAdd(r) => run(r, |r| self.bind_add(r, uid)),
            Command::BindRemove(r) => run(r, |r| self.bind_remove(r, uid)),
            Command::BindList(r) => run(r, |r| self.bind_list(r)),
            Command::OverrideGrant(r) => run(r, |r| self.override_grant(r, uid)),
            Command::OverrideRevoke(r) => run(r, |r| self.override_revoke(r, uid)),
            Command::OverrideList(r) => run(r, |r| self.override_list(r)),
            Command::Activity(r) => run(r, |r| self.activity(r)),
            Command::Stats(r) => run(r, |r| self.stats(r)),
            Command::Detach(r) => run(r, |r| self.detach(r, uid)),
            Command::Status(r) => run(r, |r| self.status(r)),
            Command::ClusterImport(r) => run(r, |r| self.cluster_import(r, uid)),
            Command::SetAdd(r) => run(r, |r| self.set_add(r, uid)),
            Command::SetRemove(r) => run(r, |r| self.set_remove(r, uid)),
            Command::SetDelete(r) => run(r, |r| self.set_delete(r, uid)),
            Command::SetList(r) => run(r, |r| self.set_list(r)),
            Command::SetShow(r) => run(r, |r| self.set_show(r)),
            Command::AllowAddSet(r) => run(r, |r| self.allow_add_set(r, uid)),
            Command::AllowRemoveSet(r) => run(r, |r| self.allow_remove_set(r, uid)),
            Command::AllowDisableSet(r) => run(r, |r| self.allow_disable_set(r, uid)),
            Command::AllowEnableSet(r) => run(r, |r| self.allow_enable_set(r, uid)),
        }
    }
}

/// Runs `handler` on its request and serializes its reply. The handler must return the
/// reply type the protocol gives request type `C` ([`Call::Reply`]); the compiler checks it.
fn run<C: Call>(request: C, handler: impl FnOnce(C) -> Reply<C>) -> Outcome {
    let reply = handler(request)?;
    serde_json::value::to_raw_value(&reply)
        .map_err(|e| Failure::new(ErrorCode::Internal, format!("could not write the reply: {e}")))
}

/// A handler's result for request type `C`.
type Reply<C> = Result<<C as Call>::Reply, Failure>;
