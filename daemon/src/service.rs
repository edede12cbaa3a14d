//! The daemon's core: every command, applied to the store and the kernel together.
//!
//! A change is written in a store transaction, applied to the maps, and only then
//! committed; if the maps refuse it, the transaction is rolled back and the kernel put back
//! as it was, so the caller's error means "nothing changed". Login checks are reads: they
//! are answered from an in-memory copy of the policy, never from the database.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex, RwLock,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipaccess_common::NEVER_EXPIRES;
use ipnet::IpNet;
use log::{info, warn};
use serde_json::{Value, json};

use crate::{
    activity::{Drops, Signin},
    datapath::{self, BindTarget, Binding, Datapath, DatapathError},
    logging::{self, PendingAudit},
    metrics::{self, CheckCounters},
    policy::{
        ACCOUNT_ID_RULE, AccountPolicy, LiveOverride, MAX_LABEL, MAX_REASON, MAX_TICKET, check_text, decide,
        effective_state, normalise_addr, normalise_cidr, suspended, valid_account_id,
    },
    protocol::{
        AccountState, ActivityKind, Caller, Command, EffectiveState, ErrorBody, ErrorCode, ImportAccount, Method, Mode,
        ReplaceEntry,
    },
    store::{
        AccountRow, ActivityRecord, BindingRow, Checkpointer, EntryRow, Readers, RecentSignin, Store, StoreError, Tx,
    },
};

pub use crate::activity::ActivityLog;

/// Longest override support may grant (the shortest is configured).
const MAX_OVERRIDE_TTL: u64 = 30 * 24 * 3600;
/// How far back a grant looks for the customer's denied attempts.
const DENIED_LOOKBACK: i64 = 7 * 24 * 3600;

/// An error for the caller: a stable code and a sentence.
#[derive(Debug)]
pub struct Failure(pub ErrorBody);

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure(ErrorBody { code, message: message.into(), details: None })
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::AccountExists(_) => ErrorCode::AccountExists,
            StoreError::UnknownAccount(_) | StoreError::UnknownParent(_) => ErrorCode::UnknownAccount,
            StoreError::EntryExists { .. } => ErrorCode::EntryExists,
            StoreError::BindingExists { .. } => ErrorCode::BindingExists,
            StoreError::NestedParent { .. } => ErrorCode::Refused,
            _ => ErrorCode::Internal,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<DatapathError> for Failure {
    fn from(e: DatapathError) -> Self {
        // Full tables are an operator's capacity problem with a known remedy, not a fault.
        let code = match &e {
            DatapathError::Table(datapath::tables::TableError::Full { .. }) => ErrorCode::TablesFull,
            _ => ErrorCode::Internal,
        };
        Failure::new(code, format!("the kernel refused the change, nothing was changed: {e}"))
    }
}

type Outcome = Result<Value, Failure>;

/// The one writer: store and maps change together under this lock.
struct Writer {
    store: Store,
    datapath: Datapath,
}

pub struct Service {
    writer: Mutex<Writer>,
    /// Connections for reads, so that they wait neither for the writer nor for each other.
    readers: Readers,
    /// Checkpoints the WAL beside the writer, so no change's commit does it.
    _checkpointer: Checkpointer,
    accounts: RwLock<HashMap<String, AccountPolicy>>,
    activity: ActivityLog,
    /// Settings a reload may change (see [`Service::reconfigure`]).
    retention_days: AtomicU32,
    min_override_ttl: AtomicU64,
    /// The widest IPv4 and IPv6 prefixes an override may cover.
    widest_override: (AtomicU8, AtomicU8),
    checks: CheckCounters,
    /// The kernel's packet counters, read without the writer lock.
    counters: datapath::CounterReader,
    /// How long [`Service::start`] took to make the kernel match the store.
    reconcile: Duration,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn to_mode(mode: Mode) -> datapath::Mode {
    match mode {
        Mode::Off => datapath::Mode::Off,
        Mode::Monitor => datapath::Mode::Monitor,
        Mode::Enforce => datapath::Mode::Enforce,
    }
}

fn to_binding(row: &BindingRow, slot: u32) -> Binding {
    let target = match row.target {
        Some((proto, port)) => BindTarget::Port { protocol: proto.number(), port },
        None => BindTarget::WholeAddress,
    };
    Binding { addr: row.addr, target, account: slot }
}

impl Service {
    /// Loads the store and makes the kernel's maps match it (changing only what differs).
    pub fn start(
        store: Store,
        mut datapath: Datapath,
        activity: ActivityLog,
        config: &crate::config::Config,
    ) -> Result<Service, Failure> {
        let started = std::time::Instant::now();
        let samples = config.drop_samples_per_second;
        datapath.set_sampling(samples, samples.max(1) * 10);
        let mut store = store;
        let (accounts, entries, bindings, overrides) = {
            let tx = store.transaction()?;
            (tx.accounts()?, tx.all_entries()?, tx.bindings()?, tx.live_overrides(None, now())?)
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
                    overrides: Vec::new(),
                };
                (a.id.clone(), cached)
            })
            .collect();
        for e in entries.into_iter().filter(|e| e.enabled) {
            if let Some(a) = cache.get_mut(&e.account) {
                a.entries.push(e.cidr);
            }
        }
        for o in overrides {
            if let Some(a) = cache.get_mut(&o.account) {
                a.overrides.push(LiveOverride { id: o.id, cidr: o.cidr, expires_at: o.expires_at });
            }
        }
        let stale: Vec<u32> = {
            let wanted: std::collections::HashSet<u32> = cache.values().map(|a| a.slot).collect();
            datapath.configured_slots().into_iter().filter(|s| !wanted.contains(s)).collect()
        };
        for slot in stale {
            datapath.remove_account(slot)?;
        }
        for (id, account) in &cache {
            apply_account(&mut datapath, account, suspended(|a| cache.get(a), id))?;
        }
        let slots: HashMap<&str, u32> = cache.iter().map(|(id, a)| (id.as_str(), a.slot)).collect();
        let bindings: Vec<Binding> = bindings.iter().map(|b| to_binding(b, slots[b.account.as_str()])).collect();
        datapath.set_bindings(&bindings)?;
        let reconcile = started.elapsed();
        info!("reconciled {} accounts and {} bindings with the kernel in {reconcile:.2?}", cache.len(), bindings.len());
        let counters = datapath.counter_reader()?;
        Ok(Service {
            readers: store.readers(4),
            _checkpointer: store.checkpoint_in_background()?,
            writer: Mutex::new(Writer { store, datapath }),
            accounts: RwLock::new(cache),
            activity,
            retention_days: config.retention_days.into(),
            min_override_ttl: config.min_override_ttl_seconds.max(1).into(),
            widest_override: (config.widest_override_ipv4.into(), config.widest_override_ipv6.into()),
            checks: CheckCounters::default(),
            counters,
            reconcile,
        })
    }

    /// Applies the settings of a reloaded configuration that the service holds: activity
    /// retention, the shortest override, and the drop-sample budget in the kernel.
    pub fn reconfigure(&self, config: &crate::config::Config) {
        self.retention_days.store(config.retention_days, Ordering::Relaxed);
        self.min_override_ttl.store(config.min_override_ttl_seconds.max(1), Ordering::Relaxed);
        self.widest_override.0.store(config.widest_override_ipv4, Ordering::Relaxed);
        self.widest_override.1.store(config.widest_override_ipv6, Ordering::Relaxed);
        let samples = config.drop_samples_per_second;
        self.writer.lock().expect("writer lock").datapath.set_sampling(samples, samples.max(1) * 10);
    }

    /// For the watchdog: the writer lock can be taken (no change is stuck holding it, and
    /// no change panicked while holding it) and the kernel's maps answer.
    pub fn healthy(&self) -> bool {
        self.writer.lock().is_ok_and(|writer| writer.datapath.host_counters().is_ok())
    }

    /// Attaches the filter to an interface (see [`Datapath::attach`]).
    pub fn attach(&self, iface: &str, mode: datapath::XdpMode) -> Result<datapath::Attachment, DatapathError> {
        self.writer.lock().expect("writer lock").datapath.attach(iface, mode)
    }

    /// Does the kernel show an XDP program on `iface` (this daemon's or any other)? No lock:
    /// the answer comes from rtnetlink.
    pub fn is_filtered(&self, iface: &str) -> bool {
        datapath::netlink::xdp_path(iface).is_ok_and(|path| path.is_some())
    }

    /// See [`Datapath::retire_other_layouts`].
    pub fn retire_other_layouts(&self) {
        self.writer.lock().expect("writer lock").datapath.retire_other_layouts();
    }

    /// Runs one command for `caller` (whose uid is recorded as the author of changes).
    pub fn execute(&self, command: Command, caller: &Caller) -> Outcome {
        let uid = caller.uid;
        let command = canonical(command)?;
        match command {
            Command::Check { account, addr, method, dry_run } => {
                self.check(&account, addr, method.unwrap_or_default(), caller, dry_run)
            }
            Command::AccountShow { account } => self.read(|tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                let view = account_view(&self.accounts.read().expect("cache lock"), row);
                Ok(json!({ "account": view, "entries": tx.entries(&account)?,
                           "bindings": tx.bindings()?.into_iter().filter(|b| b.account == account).collect::<Vec<_>>() }))
            }),
            Command::AccountList {} => self.read(|tx| {
                let cache = self.accounts.read().expect("cache lock");
                Ok(Value::Array(tx.accounts()?.into_iter().map(|row| account_view(&cache, row)).collect()))
            }),
            Command::AllowList { account } => self.read(|tx| {
                tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                Ok(json!(tx.entries(&account)?))
            }),
            Command::BindList {} => self.read(|tx| Ok(json!(tx.bindings()?))),
            Command::Status {} => self.status(),
            Command::AccountAdd { account, parent, unconfirmed } => self.account_add(&account, parent, unconfirmed, uid),
            Command::AccountRemove { account, recursive } => self.account_remove(&account, recursive, uid),
            Command::AccountState { account, state, reason } => {
                self.change(&account, |tx| {
                    let was = tx.account(&account)?.ok_or_else(|| unknown(&account))?.state;
                    tx.set_state(&account, state, reason.as_deref())?;
                    audit(tx, &account, uid, "state", json!({ "state": state, "was": was, "reason": reason }))?;
                    let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                    Ok((row.clone(), json!(row)))
                })
            }
            Command::AccountMode { account, mode, client_ip, force } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                let before = policy_from_store(tx, &row, now())?;
                let after = AccountPolicy { mode, ..before.clone() };
                guard_lockout(tx, &account, uid, client_ip, force, &before, &after)?;
                tx.set_mode(&account, mode)?;
                audit(tx, &account, uid, "mode", json!({ "mode": mode, "was": row.mode, "forced": force }))?;
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                Ok((row.clone(), json!(row)))
            }),
            Command::AllowAdd { account, cidr, label } => self.change(&account, |tx| {
                let (cidr, note) = network(cidr)?;
                let entry = tx.add_entry(&account, cidr, label.as_deref(), uid, now())?;
                audit(tx, &account, uid, "allow_add", json!({ "cidr": cidr, "label": label }))?;
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                Ok((row, with_notes(json!(entry), note.into_iter().collect())))
            }),
            Command::AllowRemove { account, cidr, client_ip, force } => self.change(&account, |tx| {
                let (cidr, note) = network(cidr)?;
                let (row, entry) = withdraw_entry(tx, &account, cidr, uid, client_ip, force)?;
                tx.remove_entry(&account, cidr)?;
                audit(tx, &account, uid, "allow_remove", json!({ "cidr": cidr, "label": entry.label, "forced": force }))?;
                Ok((row, with_notes(json!({ "account": account, "removed": cidr }), note.into_iter().collect())))
            }),
            Command::AllowDisable { account, cidr, client_ip, force } => self.change(&account, |tx| {
                let (cidr, note) = network(cidr)?;
                let (row, _) = withdraw_entry(tx, &account, cidr, uid, client_ip, force)?;
                tx.set_entry_enabled(&account, cidr, false)?;
                audit(tx, &account, uid, "allow_disable", json!({ "cidr": cidr, "forced": force }))?;
                Ok((row, with_notes(json!(tx.entry(&account, cidr)?), note.into_iter().collect())))
            }),
            Command::AllowEnable { account, cidr } => self.change(&account, |tx| {
                let (cidr, note) = network(cidr)?;
                let (row, _) = existing_entry(tx, &account, cidr)?;
                tx.set_entry_enabled(&account, cidr, true)?;
                audit(tx, &account, uid, "allow_enable", json!({ "cidr": cidr }))?;
                Ok((row, with_notes(json!(tx.entry(&account, cidr)?), note.into_iter().collect())))
            }),
            Command::AllowLabel { account, cidr, label } => self.change(&account, |tx| {
                let (cidr, note) = network(cidr)?;
                let (row, entry) = existing_entry(tx, &account, cidr)?;
                tx.set_entry_label(&account, cidr, label.as_deref())?;
                audit(tx, &account, uid, "allow_label", json!({ "cidr": cidr, "label": label, "was": entry.label }))?;
                Ok((row, with_notes(json!(tx.entry(&account, cidr)?), note.into_iter().collect())))
            }),
            Command::AllowReplace { account, entries, client_ip, force } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                let (wanted, notes) = distinct_entries(entries)?;
                let disabled: std::collections::HashSet<IpNet> =
                    tx.entries(&account)?.into_iter().filter(|e| !e.enabled).map(|e| e.cidr).collect();
                let before = policy_from_store(tx, &row, now())?;
                let mut after = before.clone();
                after.entries = wanted.iter().map(|(c, _)| *c).filter(|c| !disabled.contains(c)).collect();
                guard_lockout(tx, &account, uid, client_ip, force, &before, &after)?;
                tx.replace_entries(&account, &wanted, uid, now())?;
                audit(tx, &account, uid, "allow_replace", json!({ "entries": wanted.len(), "forced": force }))?;
                Ok((row, with_notes(json!({ "entries": tx.entries(&account)? }), notes)))
            }),
            Command::Import { accounts } => self.import(accounts, uid),
            Command::Stats { account } => self.stats(account.as_deref()),
            Command::Detach { interface } => {
                let detached = self.writer.lock().expect("writer lock").datapath.detach(&interface)?;
                logging::detached(&interface, uid, detached);
                Ok(json!({ "interface": interface, "detached": detached }))
            }
            Command::OverrideGrant { account, cidr, ttl_seconds, ticket, reason } => {
                self.override_grant(&account, cidr, ttl_seconds, &ticket, &reason, uid)
            }
            Command::OverrideRevoke { account, override_id } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                let revoked = tx.revoke_override(&account, override_id, now())?.ok_or_else(|| {
                    Failure::new(ErrorCode::UnknownOverride, format!("{account} has no live override {override_id}"))
                })?;
                audit(tx, &account, uid, "override_revoked", json!({ "override": override_id, "cidr": revoked.cidr }))?;
                Ok((row, json!(revoked)))
            }),
            Command::OverrideList { account } => self.read(|tx| {
                if let Some(a) = account.as_deref() {
                    tx.account(a)?.ok_or_else(|| unknown(a))?;
                }
                Ok(json!(tx.live_overrides(account.as_deref(), now())?))
            }),
            Command::Activity { account, since_seconds, denied_only, limit, kind, summary, unknown_accounts } => {
                let since = now() - since_seconds.unwrap_or(7 * 24 * 3600).min(i64::MAX as u64 / 2) as i64;
                let limit = limit.unwrap_or(100).min(10_000);
                let bad = |why: &str| Err(Failure::new(ErrorCode::BadRequest, why));
                let account = match (account, unknown_accounts) {
                    (None, true) if kind.is_none() && !summary && !denied_only => None,
                    (None, true) => {
                        return bad("unknown_accounts is a summary of its own: no kind, summary or denied_only");
                    }
                    (Some(_), true) => return bad("unknown_accounts is of no account: leave the account out"),
                    (None, false) => return bad("activity needs an account (or unknown_accounts)"),
                    (Some(account), false) => Some(account),
                };
                if summary && kind.is_some_and(|k| k != ActivityKind::Signin) {
                    return bad("a summary is of sign-ins only: leave kind out");
                }
                // Counts still in memory are written first, so the answer includes the latest.
                self.activity.flush();
                self.read(|tx| match account {
                    None => Ok(json!(tx.unknown_summary(since, limit)?)),
                    Some(account) => {
                        // An account that was removed keeps its history; a name that never
                        // existed has none (checks for unknown accounts are not kept by name).
                        if tx.account(&account)?.is_none() && !tx.has_activity(&account)? {
                            return Err(unknown(&account));
                        }
                        if summary {
                            Ok(json!(tx.signin_summary(&account, since, denied_only, limit)?))
                        } else {
                            Ok(json!(tx.activity(&account, since, kind, denied_only, limit)?))
                        }
                    }
                })
            }
            Command::BindAdd { account, addr, port, proto } => {
                let target = bind_target(port, proto)?;
                self.change_bindings(|tx| {
                    let row = tx.add_binding(&account, addr, target, now())?;
                    audit(tx, &account, uid, "bind_add", json!({ "addr": addr, "target": describe(target).trim() }))?;
                    Ok(json!(row))
                })
            }
            Command::BindRemove { addr, port, proto } => {
                let target = bind_target(port, proto)?;
                self.change_bindings(|tx| match tx.remove_binding(addr, target)? {
                    Some(row) => {
                        audit(tx, &row.account, uid, "bind_remove", json!({ "addr": addr, "target": describe(target).trim() }))?;
                        Ok(json!(row))
                    }
                    None => Err(Failure::new(ErrorCode::UnknownBinding, format!("no binding for {addr}{}", describe(target)))),
                })
            }
        }
    }

    fn account_add(&self, account: &str, parent: Option<String>, unconfirmed: bool, uid: u32) -> Outcome {
        if !valid_account_id(account) {
            return Err(Failure::new(ErrorCode::BadRequest, format!("{ACCOUNT_ID_RULE}; {account:?} is not one")));
        }
        let state = if unconfirmed { AccountState::Unconfirmed } else { AccountState::Active };
        // IP restriction is opt-in: a new account starts in mode `off`.
        self.change(account, |tx| {
            let row = tx.add_account(account, parent.as_deref(), state, Mode::Off, now())?;
            audit(tx, account, uid, "account_add", json!({ "parent": parent, "state": state }))?;
            Ok((row.clone(), json!(row)))
        })
    }

    /// Removes an account (and, with `recursive`, its sub-users) from the store and the
    /// kernel: bindings first, so that no endpoint points at a slot being cleared.
    fn account_remove(&self, account: &str, recursive: bool, uid: u32) -> Outcome {
        self.activity.flush();
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        tx.account(account)?.ok_or_else(|| unknown(account))?;
        let below = tx.descendants(account)?;
        if !below.is_empty() && !recursive {
            return Err(Failure::new(
                ErrorCode::HasSubUsers,
                format!(
                    "{account} has sub-users ({}); remove them first, or repeat with --recursive to remove them too",
                    below.join(", ")
                ),
            ));
        }
        // Deepest first: an account goes after everything below it.
        let removed: Vec<String> = below.into_iter().rev().chain([account.to_string()]).collect();
        let bindings = tx.bindings()?;
        for id in &removed {
            let bindings = bindings.iter().filter(|b| &b.account == id).count();
            audit(&tx, id, uid, "account_remove", json!({ "removed_with": account, "bindings": bindings }))?;
            tx.remove_account(id)?;
        }
        let cache = self.accounts.read().expect("cache lock");
        let slot = |id: &str| cache.get(id).map(|a| a.slot);
        let wanted: Vec<Binding> =
            tx.bindings()?.iter().filter_map(|b| Some(to_binding(b, slot(&b.account)?))).collect();
        let before = datapath.bindings();
        let applied = datapath
            .set_bindings(&wanted)
            .and_then(|()| removed.iter().filter_map(|id| slot(id)).try_for_each(|s| datapath.remove_account(s)))
            .map_err(Failure::from)
            .and_then(|()| Ok(tx.commit()?));
        if let Err(e) = applied {
            for id in &removed {
                if let Some(previous) = cache.get(id)
                    && let Err(undo) = apply_account(datapath, previous, suspended(|p| cache.get(p), id))
                {
                    warn!("could not restore account {id} in the kernel: {undo}");
                }
            }
            if let Err(undo) = datapath.set_bindings(&before) {
                warn!("could not restore the kernel's bindings after a failed removal: {undo}");
            }
            return Err(e);
        }
        drop(cache);
        let mut cache = self.accounts.write().expect("cache lock");
        removed.iter().for_each(|id| {
            cache.remove(id);
        });
        pending_audit.committed();
        Ok(json!({ "removed": removed }))
    }

    fn override_grant(
        &self,
        account: &str,
        cidr: IpNet,
        ttl_seconds: u64,
        ticket: &str,
        reason: &str,
        uid: u32,
    ) -> Outcome {
        let shortest = self.min_override_ttl.load(Ordering::Relaxed);
        if !(shortest..=MAX_OVERRIDE_TTL).contains(&ttl_seconds) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("an override lasts from {shortest} s to {MAX_OVERRIDE_TTL} s (30 days)"),
            ));
        }
        if ticket.trim().is_empty() || reason.trim().is_empty() {
            return Err(Failure::new(ErrorCode::BadRequest, "an override needs a ticket and a reason"));
        }
        let (cidr, note) = network(cidr)?;
        let widest = match cidr {
            IpNet::V4(_) => self.widest_override.0.load(Ordering::Relaxed),
            IpNet::V6(_) => self.widest_override.1.load(Ordering::Relaxed),
        };
        if cidr.prefix_len() < widest {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!(
                    "{cidr} is wider than an override may be: at most a /{widest} for {} (widest_override_ipv{} in \
                     the configuration); grant the customer's own address",
                    if cidr.addr().is_ipv4() { "IPv4" } else { "IPv6" },
                    if cidr.addr().is_ipv4() { 4 } else { 6 },
                ),
            ));
        }
        // `change` flushes the log first: the reply's denied attempts include the latest.
        self.change(account, |tx| {
            let row = tx.account(account)?.ok_or_else(|| unknown(account))?;
            self.refuse_useless_override(account, cidr)?;
            let at = now();
            let granted = tx.add_override(account, cidr, ticket, reason, uid, at, at + ttl_seconds as i64)?;
            audit(
                tx,
                account,
                uid,
                "override_granted",
                json!({
                "override": granted.id, "cidr": granted.cidr, "ticket": ticket,
                "reason": reason, "expires_at": granted.expires_at }),
            )?;
            let recent = tx.denied_summary(account, at - DENIED_LOOKBACK)?;
            let reply = json!({ "override": granted, "recent_denied": recent });
            Ok((row, with_notes(reply, note.into_iter().collect())))
        })
    }

    /// An override is for a customer locked out by its allowlist. It is refused, with the
    /// reason, where it cannot be that: the account (or an ancestor) is banned or terminated,
    /// its email is unconfirmed, it blocks nothing (mode off or monitor), or the addresses are
    /// already allowed.
    fn refuse_useless_override(&self, account: &str, cidr: IpNet) -> Result<(), Failure> {
        let refused = |why: String| Err(Failure::new(ErrorCode::Refused, why));
        let cache = self.accounts.read().expect("cache lock");
        let Some(policy) = cache.get(account) else { return Err(unknown(account)) };
        match effective_state(|id| cache.get(id), policy) {
            (EffectiveState::Banned, _) => refused(format!("{account} is banned; overrides cannot reactivate it")),
            (EffectiveState::ParentBanned, Some(p)) => {
                refused(format!("{account}'s parent account {p} is banned; overrides cannot reactivate it"))
            }
            (EffectiveState::Terminated, _) => refused(format!(
                "{account} was terminated for non-payment; billing must reactivate it, an override would not help"
            )),
            (EffectiveState::ParentTerminated, Some(p)) => refused(format!(
                "{account}'s parent account {p} was terminated for non-payment; billing must reactivate it, an \
                 override would not help"
            )),
            (EffectiveState::Unconfirmed, _) => refused(format!(
                "{account} has not confirmed its email address; an override would not let anyone in: confirm the \
                 email first"
            )),
            _ if policy.mode == Mode::Off => {
                refused(format!("{account} is in mode off: no address is blocked, so an override would change nothing"))
            }
            _ if policy.mode == Mode::Monitor => refused(format!(
                "{account} is in monitor mode: no address is blocked, so an override would change nothing"
            )),
            _ => {
                let at = now();
                if let Some(entry) = policy.entries.iter().find(|net| net.contains(&cidr)) {
                    return refused(format!("{cidr} is already allowed by {account}'s allowlist entry {entry}"));
                }
                if let Some(o) = policy.live_overrides(at).find(|o| o.cidr.contains(&cidr)) {
                    return refused(format!(
                        "{cidr} is already allowed by override {} until {} UTC",
                        o.id,
                        crate::time::format_utc(o.expires_at)
                    ));
                }
                Ok(())
            }
        }
    }

    /// A read of the store, on a reader connection: it waits for no change.
    fn read(&self, f: impl FnOnce(&Tx) -> Outcome) -> Outcome {
        self.readers.read(f)
    }

    fn stats(&self, account: Option<&str>) -> Outcome {
        let slots: Vec<(String, u32)> = {
            let accounts = self.accounts.read().expect("cache lock");
            match account {
                Some(id) => vec![(id.to_string(), accounts.get(id).ok_or_else(|| unknown(id))?.slot)],
                None => {
                    let mut all: Vec<_> = accounts.iter().map(|(id, a)| (id.clone(), a.slot)).collect();
                    all.sort();
                    all
                }
            }
        };
        let mut rows = Vec::with_capacity(slots.len());
        for (id, slot) in slots {
            let c = self.counters.account(slot)?;
            rows.push(json!({ "account": id, "passed_packets": c.passed_packets, "passed_bytes": c.passed_bytes,
                "dropped_packets": c.dropped_packets, "dropped_bytes": c.dropped_bytes,
                "would_drop_packets": c.would_drop_packets, "would_drop_bytes": c.would_drop_bytes }));
        }
        let host = self.counters.host()?;
        Ok(json!({ "accounts": rows, "host": { "non_ip": host.non_ip_packets, "unbound": host.unbound_packets,
            "ndp": host.ndp_packets, "malformed": host.malformed_packets } }))
    }

    fn status(&self) -> Outcome {
        // The writer lock only for what the datapath holds in memory; the interfaces' XDP
        // state is asked of the kernel without it.
        let (used, capacity, pin_dir, interfaces) = {
            let writer = self.writer.lock().expect("writer lock");
            let (used, capacity) = writer.datapath.slot_usage();
            (used, capacity, writer.datapath.pin_dir().to_path_buf(), writer.datapath.attached_interfaces())
        };
        let attachments: Vec<_> = interfaces
            .into_iter()
            .map(|interface| {
                let path = datapath::netlink::xdp_path(&interface).ok().flatten();
                (interface, path)
            })
            .collect();
        Ok(json!({
            "accounts": self.accounts.read().expect("cache lock").len(),
            "interfaces": attachments.iter().map(|(interface, _)| interface).collect::<Vec<_>>(),
            "xdp": attachments.iter().map(|(interface, path)| json!({ "interface": interface, "path": path }))
                .collect::<Vec<_>>(),
            "pin_dir": pin_dir,
            "table_slots_used": used,
            "table_slots": capacity,
            "host_counters": self.counters.host().ok().map(|c| json!({
                "non_ip": c.non_ip_packets, "unbound": c.unbound_packets,
                "ndp": c.ndp_packets, "malformed": c.malformed_packets })),
        }))
    }

    /// Everything the metrics endpoint reports. Every account's counters are read from the
    /// kernel (one map lookup per account) without the writer lock, so a scrape does not
    /// hold up changes; the lock is taken only for the table and interface figures.
    pub fn metrics(&self) -> Result<metrics::Snapshot, Failure> {
        let at = now();
        let mut accounts: Vec<(String, u32, usize)> = {
            let cache = self.accounts.read().expect("cache lock");
            cache.iter().map(|(id, a)| (id.clone(), a.slot, a.live_overrides(at).count())).collect()
        };
        accounts.sort_unstable();
        let mut rows = Vec::with_capacity(accounts.len());
        for (account, slot, live_overrides) in accounts {
            rows.push(metrics::AccountMetrics { account, counters: self.counters.account(slot)?, live_overrides });
        }
        let host = self.counters.host()?;
        let writer = self.writer.lock().expect("writer lock");
        let (table_slots_used, table_slots) = writer.datapath.slot_usage();
        Ok(metrics::Snapshot {
            accounts: rows,
            host,
            checks: self.checks.read(),
            table_slots_used,
            table_slots,
            account_slots: u64::from(writer.datapath.account_capacity().saturating_sub(1)),
            reconcile_seconds: self.reconcile.as_secs_f64(),
            interfaces: writer.datapath.attachments(),
        })
    }

    /// A change to one account (and, through banning, to its sub-users): store, then
    /// kernel, then commit; on any failure nothing is left changed.
    fn change(&self, account: &str, f: impl FnOnce(&Tx) -> Result<(AccountRow, Value), Failure>) -> Outcome {
        // The lockout guard and a grant read the account's recent sign-ins: those answered
        // before this change must be in the store first (and reach the log before its audit
        // record). Only this account's: flushing everyone's costs a durable write per change.
        self.activity.flush_account(account);
        self.change_accounts(|tx| {
            let (row, reply) = f(tx)?;
            debug_assert_eq!(row.id, account);
            Ok((vec![row], reply))
        })
    }

    /// A change to the accounts `f` returns (after it ran: their rows as changed) and, if
    /// they are parents, to their sub-users. The cache is not copied: the accounts' new
    /// versions are built beside it and moved in once the change is committed.
    fn change_accounts(&self, f: impl FnOnce(&Tx) -> Result<(Vec<AccountRow>, Value), Failure>) -> Outcome {
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let (rows, reply) = f(&tx)?;
        let at = now();
        let mut updated: HashMap<String, AccountPolicy> = HashMap::with_capacity(rows.len());
        let mut children = Vec::new();
        for row in rows {
            // A suspension reaches every account below, however deep an older store nests them.
            children.extend(tx.descendants(&row.id)?);
            let policy = policy_from_store(&tx, &row, at)?;
            updated.insert(row.id, policy);
        }
        // Only holders of the writer lock replace the cache, so until the end it holds the
        // previous state, which a failure puts back into the kernel.
        let cache = self.accounts.read().expect("cache lock");
        let next = |id: &str| updated.get(id).or_else(|| cache.get(id));
        let mut affected: Vec<&str> = updated.keys().map(String::as_str).collect();
        affected.extend(children.iter().map(String::as_str).filter(|id| !updated.contains_key(*id)));
        let applied = affected.iter().try_for_each(|&id| {
            let account = next(id).expect("affected accounts exist");
            apply_account(datapath, account, suspended(next, id))
        });
        if let Err(e) = applied.map_err(Failure::from).and_then(|()| Ok(tx.commit()?)) {
            for &id in &affected {
                let restored = match cache.get(id) {
                    Some(previous) => apply_account(datapath, previous, suspended(|p| cache.get(p), id)),
                    None => datapath.remove_account(updated[id].slot),
                };
                if let Err(e) = restored {
                    warn!("could not restore account {id} in the kernel: {e}");
                }
            }
            return Err(e);
        }
        drop(cache);
        self.accounts.write().expect("cache lock").extend(updated);
        pending_audit.committed();
        Ok(reply)
    }

    /// Creates or updates every account of the batch, with its allowlist, in one change.
    fn import(&self, accounts: Vec<ImportAccount>, uid: u32) -> Outcome {
        let mut seen = std::collections::HashSet::with_capacity(accounts.len());
        if let Some(twice) = accounts.iter().find(|a| !seen.insert(a.account.as_str())) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("account {} appears twice in the import", twice.account),
            ));
        }
        self.change_accounts(|tx| {
            let at = now();
            let (mut created, mut entries) = (0, 0);
            let mut rows = Vec::with_capacity(accounts.len());
            for import in accounts {
                let id = import.account.clone();
                let (row, added) = import_one(tx, import, uid, at).map_err(|Failure(mut body)| {
                    // The client maps the account back to its line in the file.
                    body.message = format!("account {id}: {}", body.message);
                    Failure(body)
                })?;
                created += usize::from(row.1);
                entries += added;
                rows.push(row.0);
            }
            info!("import by uid {uid}: {} accounts ({created} new), {entries} allowlist entries", rows.len());
            let reply = json!({ "accounts": rows.len(), "created": created, "entries": entries });
            Ok((rows, reply))
        })
    }

    fn change_bindings(&self, f: impl FnOnce(&Tx) -> Outcome) -> Outcome {
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let result = f(&tx)?;
        let cache = self.accounts.read().expect("cache lock");
        let wanted: Vec<Binding> =
            tx.bindings()?.iter().map(|b| to_binding(b, cache[b.account.as_str()].slot)).collect();
        let before = datapath.bindings();
        datapath.set_bindings(&wanted)?;
        if let Err(e) = tx.commit() {
            if let Err(undo) = datapath.set_bindings(&before) {
                warn!("could not restore the kernel's bindings after a failed commit: {undo}");
            }
            return Err(e.into());
        }
        pending_audit.committed();
        Ok(result)
    }

    /// A login check, answered from memory.
    pub fn check(&self, account: &str, addr: IpAddr, method: Method, caller: &Caller, dry_run: bool) -> Outcome {
        let at = now();
        let result = decide(&self.accounts.read().expect("cache lock"), account, addr, at);
        if dry_run {
            return Ok(json!(result));
        }
        // Every check is counted (unknown accounts too); the log counts it per hour, address
        // and outcome, under the caller's uid.
        self.checks.count(result.reason);
        self.activity.signin(Signin {
            time: at,
            account: account.to_string(),
            address: addr,
            method,
            reason: result.reason,
            uid: caller.uid,
            application: caller.is_application(),
        });
        Ok(json!(result))
    }

    /// Waits until recorded login checks are in the store (before shutting down).
    pub fn flush_activity(&self) {
        self.activity.flush();
    }

    /// Moves the kernel's drop samples into the activity log (kind "drop"), so that support
    /// sees refused packets next to refused sign-ins. Returns how many were moved.
    pub fn drain_drop_samples(&self) -> usize {
        let samples = self.writer.lock().expect("writer lock").datapath.drain_samples(4096);
        if samples.is_empty() {
            return 0;
        }
        let by_slot: HashMap<u32, String> =
            self.accounts.read().expect("cache lock").iter().map(|(id, a)| (a.slot, id.clone())).collect();
        let at = now();
        // Many samples of one flow come in one drain: they are counted per endpoint here.
        let mut counted: HashMap<(&str, IpAddr, IpAddr, u8, u16, &'static str), i64> = HashMap::new();
        for sample in &samples {
            let Some(account) = by_slot.get(&sample.account) else { continue };
            let reason = match sample.reason {
                ipaccess_common::reason::NOT_ALLOWED => "address_not_allowed",
                ipaccess_common::reason::WOULD_DROP => "monitor_would_deny",
                ipaccess_common::reason::SUSPENDED => "suspended",
                ipaccess_common::reason::MALFORMED => "malformed",
                _ => "account_unset",
            };
            let src = datapath::words_addr(sample.family as u64, sample.src_hi, sample.src_lo);
            let dst = datapath::words_addr(sample.family as u64, sample.dst_hi, sample.dst_lo);
            *counted.entry((account, src, dst, sample.protocol, sample.port, reason)).or_default() += 1;
        }
        let drops = counted
            .into_iter()
            .map(|((account, source, destination, protocol, port, reason), count)| Drops {
                time: at,
                account: account.to_string(),
                source,
                destination,
                protocol,
                port,
                reason,
                count,
            })
            .collect();
        self.activity.drops(drops);
        samples.len()
    }

    /// Periodic upkeep: expired overrides leave the cache and the kernel's tables (the
    /// kernel already ignores them), old activity is pruned.
    pub fn sweep(&self) -> Result<(), Failure> {
        let at = now();
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let expired: Vec<String> = {
            let accounts = self.accounts.read().expect("cache lock");
            accounts
                .iter()
                .filter(|(_, a)| a.overrides.iter().any(|o| o.expires_at <= at))
                .map(|(id, _)| id.clone())
                .collect()
        };
        if !expired.is_empty() {
            let mut accounts = self.accounts.write().expect("cache lock");
            for id in &expired {
                if let Some(a) = accounts.get_mut(id) {
                    a.overrides.retain(|o| o.expires_at > at);
                }
                apply_account(datapath, &accounts[id], suspended(|a| accounts.get(a), id))?;
                info!("account {id}: expired overrides swept");
            }
        }
        // Each expiry is audited once, also one that came while the daemon was stopped.
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        for ended in tx.unaudited_expiries(at)? {
            audit(
                &tx,
                &ended.account,
                ended.operator,
                "override_expired",
                json!({
                "override": ended.id, "cidr": ended.cidr, "ticket": ended.ticket, "expires_at": ended.expires_at }),
            )?;
            tx.mark_expiry_audited(ended.id)?;
        }
        tx.commit()?;
        pending_audit.committed();
        let tx = store.transaction()?;
        let retention_days = self.retention_days.load(Ordering::Relaxed);
        let pruned = tx.prune_activity(at - retention_days as i64 * 24 * 3600)?;
        tx.commit()?;
        if pruned > 0 {
            info!("pruned {pruned} activity records older than {retention_days} days");
        }
        Ok(())
    }
}

fn apply_account(datapath: &mut Datapath, account: &AccountPolicy, suspended: bool) -> Result<(), DatapathError> {
    let mut entries: Vec<(IpNet, u64)> = account.entries.iter().map(|&net| (net, NEVER_EXPIRES)).collect();
    // Overrides expire in the kernel on their own: their expiry moves to the kernel's clock.
    let (unix_now, boot_now) = (now(), datapath::boot_time_ns());
    for &LiveOverride { cidr: net, expires_at: expires, .. } in &account.overrides {
        if expires > unix_now {
            entries.push((net, boot_now.saturating_add((expires - unix_now) as u64 * 1_000_000_000)));
        }
    }
    datapath.set_allowlist(account.slot, &entries)?;
    datapath.set_policy(account.slot, to_mode(account.mode), suspended)
}

/// A replacement allowlist: each network with its label.
type Wanted = Vec<(IpNet, Option<String>)>;

/// The entries of a replacement in canonical form (see [`network`]); where a CIDR is given
/// twice, the later one (and its label) counts. Also returns the notes on rewritten entries.
fn distinct_entries(entries: Vec<ReplaceEntry>) -> Result<(Wanted, Vec<String>), Failure> {
    let mut positions: HashMap<IpNet, usize> = HashMap::with_capacity(entries.len());
    let mut wanted: Wanted = Vec::with_capacity(entries.len());
    let mut notes = Vec::new();
    for (n, entry) in entries.into_iter().enumerate() {
        let (cidr, note) = network(entry.cidr).map_err(|Failure(mut body)| {
            body.message = format!("entry {}: {}", n + 1, body.message);
            Failure(body)
        })?;
        notes.extend(note);
        match positions.get(&cidr) {
            Some(&at) => wanted[at].1 = entry.label,
            None => {
                positions.insert(cidr, wanted.len());
                wanted.push((cidr, entry.label));
            }
        }
    }
    Ok((wanted, notes))
}

/// Records a change in the activity log, in the change's own transaction, and in the
/// daemon's log once it commits.
fn audit(tx: &Tx, account: &str, uid: u32, action: &str, detail: Value) -> Result<(), Failure> {
    let mut detail = detail;
    detail["uid"] = json!(uid);
    detail["action"] = json!(action);
    logging::audit(account, uid, action, &detail);
    let record = ActivityRecord { time: now(), account: account.to_string(), uid, action: action.to_string(), detail };
    tx.add_activity(&[record])?;
    Ok(())
}

/// An account row as replies show it: with the state that takes effect, which differs from
/// its own when an ancestor is banned or terminated.
fn account_view(cache: &HashMap<String, AccountPolicy>, row: AccountRow) -> Value {
    let effective = cache.get(&row.id).map(|a| effective_state(|id| cache.get(id), a).0);
    let mut view = json!(row);
    view["effective_state"] = json!(effective);
    view
}

/// How far back a successful sign-in counts for the lockout guard.
const RECENT_SIGNINS: i64 = 7 * 24 * 3600;

/// The lockout guard: unless `force`, a change that leaves the account enforcing (`before`
/// and `after` are its policy as it is and as the change would leave it) is refused when it
/// would shut out the address the caller says it uses, newly leave nothing allowed at all, or
/// shut out an address that signed in successfully in the last seven days and is let in now
/// (the refusal lists those, in `details`). A change that shuts out nobody who gets in today,
/// such as removing a disabled entry, is not refused.
fn guard_lockout(
    tx: &Tx,
    account: &str,
    uid: u32,
    client_ip: Option<IpAddr>,
    force: bool,
    before: &AccountPolicy,
    after: &AccountPolicy,
) -> Result<(), Failure> {
    if force || after.mode != Mode::Enforce {
        return Ok(());
    }
    let at = now();
    if let Some(ip) = client_ip.filter(|&ip| !after.covers(ip, at)) {
        logging::lockout_refused(account, uid, ip);
        return Err(Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account}'s allowlist would not include {ip}, the address you are using; add it first, or \
                 repeat with --force (\"force\": true)"
            ),
        ));
    }
    let lets_in_now = |addr: IpAddr| before.mode != Mode::Enforce || before.covers(addr, at);
    let allows_nothing = |p: &AccountPolicy| p.entries.is_empty() && p.live_overrides(at).next().is_none();
    if allows_nothing(after) && (before.mode != Mode::Enforce || !allows_nothing(before)) {
        logging::lockout_refused_because(account, uid, "nothing allowed");
        return Err(Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account} would be enforcing with no enabled entry and no live override, which shuts \
                 everyone out; add an entry first, use mode off to stop restricting it, or repeat with --force"
            ),
        ));
    }
    let shut_out: Vec<RecentSignin> = tx
        .recent_signins(account, at - RECENT_SIGNINS)?
        .into_iter()
        .filter(|s| lets_in_now(s.address) && !after.covers(s.address, at))
        .collect();
    if let Some(first) = shut_out.first() {
        logging::lockout_refused_because(account, uid, "recent sign-ins shut out");
        const LISTED: usize = 10;
        let mut listed: Vec<String> = shut_out
            .iter()
            .take(LISTED)
            .map(|s| format!("{} (last {} UTC)", s.address, crate::time::format_utc(s.last_seen)))
            .collect();
        if shut_out.len() > LISTED {
            listed.push(format!("and {} more", shut_out.len() - LISTED));
        }
        let mut refusal = Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account} would shut out {} address{} that signed in successfully in the last 7 days: {}; \
                 add {} first, or repeat with --force",
                shut_out.len(),
                if shut_out.len() == 1 { "" } else { "es" },
                listed.join(", "),
                if shut_out.len() == 1 { first.address.to_string() } else { "them".into() },
            ),
        );
        refusal.0.details = Some(json!({ "shut_out": shut_out }));
        return Err(refusal);
    }
    Ok(())
}

/// The account's policy as a change would leave it, read inside the change's transaction.
fn policy_from_store(tx: &Tx, row: &AccountRow, now: i64) -> Result<AccountPolicy, Failure> {
    let entries = tx.entries(&row.id)?.into_iter().filter(|e| e.enabled).map(|e| e.cidr).collect();
    let overrides = tx
        .live_overrides(Some(&row.id), now)?
        .into_iter()
        .map(|o| LiveOverride { id: o.id, cidr: o.cidr, expires_at: o.expires_at })
        .collect();
    Ok(AccountPolicy {
        slot: row.slot,
        parent: row.parent.clone(),
        state: row.state,
        mode: row.mode,
        entries,
        overrides,
    })
}

/// The account and one of its entries, or `unknown_entry`.
fn existing_entry(tx: &Tx, account: &str, cidr: IpNet) -> Result<(AccountRow, EntryRow), Failure> {
    let row = tx.account(account)?.ok_or_else(|| unknown(account))?;
    let entry = tx
        .entry(account, cidr)?
        .ok_or_else(|| Failure::new(ErrorCode::UnknownEntry, format!("{cidr} is not on {account}'s allowlist")))?;
    Ok((row, entry))
}

/// An entry about to stop letting anything in (removed or disabled): the account and the
/// entry, once the lockout guard has accepted the account's policy without it.
fn withdraw_entry(
    tx: &Tx,
    account: &str,
    cidr: IpNet,
    uid: u32,
    client_ip: Option<IpAddr>,
    force: bool,
) -> Result<(AccountRow, EntryRow), Failure> {
    let (row, entry) = existing_entry(tx, account, cidr)?;
    let before = policy_from_store(tx, &row, now())?;
    let mut after = before.clone();
    after.entries.retain(|&net| net != cidr);
    guard_lockout(tx, account, uid, client_ip, force, &before, &after)?;
    Ok((row, entry))
}

/// A CIDR as the store keeps it (see [`normalise_cidr`]), or `bad_request` saying why not.
fn network(cidr: IpNet) -> Result<(IpNet, Option<String>), Failure> {
    normalise_cidr(cidr).map_err(|why| Failure::new(ErrorCode::BadRequest, why))
}

/// Adds `notes` (what was rewritten, e.g. an IPv4-mapped network) to an object reply.
fn with_notes(mut reply: Value, notes: Vec<String>) -> Value {
    if !notes.is_empty() {
        reply["notes"] = json!(notes);
    }
    reply
}

/// One account of an import: created or updated, its allowlist replaced when given.
/// Returns its row, whether it was created, and how many entries it now lists.
fn import_one(tx: &Tx, import: ImportAccount, uid: u32, at: i64) -> Result<((AccountRow, bool), usize), Failure> {
    let id = import.account.as_str();
    let (mut row, created) = match tx.account(id)? {
        Some(row) => {
            if import.parent.is_some() && import.parent != row.parent {
                return Err(Failure::new(
                    ErrorCode::BadRequest,
                    "it exists with another parent; a parent cannot be changed",
                ));
            }
            (row, false)
        }
        None => {
            if !valid_account_id(id) {
                return Err(Failure::new(ErrorCode::BadRequest, ACCOUNT_ID_RULE));
            }
            let state = import.state.unwrap_or(AccountState::Active);
            (tx.add_account(id, import.parent.as_deref(), state, import.mode.unwrap_or(Mode::Off), at)?, true)
        }
    };
    if let Some(state) = import.state.filter(|&s| s != row.state) {
        tx.set_state(id, state, Some("import"))?;
        (row.state, row.state_reason) = (state, Some("import".into()));
    }
    if let Some(mode) = import.mode.filter(|&m| m != row.mode) {
        tx.set_mode(id, mode)?;
        row.mode = mode;
    }
    let replaced = import.entries.map(distinct_entries).transpose()?.map(|(wanted, _)| wanted);
    if let Some(wanted) = &replaced {
        tx.replace_entries(id, wanted, uid, at)?;
    }
    let entries = replaced.as_ref().map_or(0, Vec::len);
    audit(
        tx,
        id,
        uid,
        "import",
        json!({ "created": created, "state": import.state, "mode": import.mode,
        "entries": replaced.as_ref().map(Vec::len) }),
    )?;
    Ok(((row, created), entries))
}

/// A port binding's (protocol, port): `tcp` when only a port is given; a protocol without a
/// port, or port 0, is refused rather than read as "the whole address".
fn bind_target(
    port: Option<u16>,
    proto: Option<crate::protocol::Proto>,
) -> Result<Option<(crate::protocol::Proto, u16)>, Failure> {
    match (port, proto) {
        (Some(0), _) => Err(Failure::new(ErrorCode::BadRequest, "port 0 cannot be bound")),
        (None, Some(_)) => Err(Failure::new(
            ErrorCode::BadRequest,
            "a protocol needs a port; leave both out to bind the whole address",
        )),
        (Some(port), proto) => Ok(Some((proto.unwrap_or(crate::protocol::Proto::Tcp), port))),
        (None, None) => Ok(None),
    }
}

/// Checks what every command carries before it runs: account ids (strictly for a new
/// account, see `account_add`; here only that a referenced id could be one that exists),
/// free text (labels, tickets, reasons), and addresses in one form: an address that arrives
/// IPv4-mapped (`::ffff:198.18.0.10`, as dual-stack sockets report it) is the IPv4 address.
fn canonical(command: Command) -> Result<Command, Failure> {
    let bad_id = |id: &str| id.is_empty() || id.len() > 256 || check_text("an account id", id, 256).is_err();
    let account = match &command {
        Command::AccountAdd { account, .. }
        | Command::AccountShow { account }
        | Command::AccountRemove { account, .. }
        | Command::AccountState { account, .. }
        | Command::AccountMode { account, .. }
        | Command::AllowAdd { account, .. }
        | Command::AllowRemove { account, .. }
        | Command::AllowDisable { account, .. }
        | Command::AllowEnable { account, .. }
        | Command::AllowLabel { account, .. }
        | Command::AllowList { account }
        | Command::AllowReplace { account, .. }
        | Command::BindAdd { account, .. }
        | Command::OverrideGrant { account, .. }
        | Command::OverrideRevoke { account, .. }
        | Command::Check { account, .. } => Some(account.as_str()),
        _ => None,
    };
    let imported_bad = match &command {
        Command::Import { accounts } => {
            accounts.iter().any(|a| bad_id(&a.account) || a.parent.as_deref().is_some_and(bad_id))
        }
        _ => false,
    };
    if account.is_some_and(bad_id) || imported_bad {
        return Err(Failure::new(ErrorCode::BadRequest, ACCOUNT_ID_RULE));
    }
    let text = |what: &str, value: Option<&str>, max: usize| match value {
        Some(value) => check_text(what, value, max).map_err(|why| Failure::new(ErrorCode::BadRequest, why)),
        None => Ok(()),
    };
    match &command {
        Command::AllowAdd { label, .. } | Command::AllowLabel { label, .. } => {
            text("a label", label.as_deref(), MAX_LABEL)?
        }
        Command::AllowReplace { entries, .. } => {
            entries.iter().try_for_each(|e| text("a label", e.label.as_deref(), MAX_LABEL))?
        }
        Command::Import { accounts } => accounts
            .iter()
            .flat_map(|a| a.entries.iter().flatten())
            .try_for_each(|e| text("a label", e.label.as_deref(), MAX_LABEL))?,
        Command::OverrideGrant { ticket, reason, .. } => {
            text("a ticket", Some(ticket), MAX_TICKET)?;
            text("a reason", Some(reason), MAX_REASON)?;
        }
        Command::AccountState { reason, .. } => text("a reason", reason.as_deref(), MAX_REASON)?,
        _ => {}
    }
    let ip = normalise_addr;
    Ok(match command {
        Command::Check { account, addr, method, dry_run } => {
            Command::Check { account, addr: ip(addr), method, dry_run }
        }
        Command::AccountMode { account, mode, client_ip, force } => {
            Command::AccountMode { account, mode, client_ip: client_ip.map(ip), force }
        }
        Command::AllowRemove { account, cidr, client_ip, force } => {
            Command::AllowRemove { account, cidr, client_ip: client_ip.map(ip), force }
        }
        Command::AllowDisable { account, cidr, client_ip, force } => {
            Command::AllowDisable { account, cidr, client_ip: client_ip.map(ip), force }
        }
        Command::AllowReplace { account, entries, client_ip, force } => {
            Command::AllowReplace { account, entries, client_ip: client_ip.map(ip), force }
        }
        Command::BindAdd { account, addr, port, proto } => Command::BindAdd { account, addr: ip(addr), port, proto },
        Command::BindRemove { addr, port, proto } => Command::BindRemove { addr: ip(addr), port, proto },
        other => other,
    })
}

fn unknown(account: &str) -> Failure {
    Failure::new(ErrorCode::UnknownAccount, format!("there is no account {account}"))
}

fn describe(target: Option<(crate::protocol::Proto, u16)>) -> String {
    match target {
        Some((proto, port)) => format!(" {proto:?} port {port}").to_lowercase(),
        None => " (whole address)".into(),
    }
}
