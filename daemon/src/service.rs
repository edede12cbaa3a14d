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
        atomic::{AtomicU32, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipaccess_common::NEVER_EXPIRES;
use ipnet::IpNet;
use log::{info, warn};
use serde_json::{Value, json};

use crate::{
    datapath::{self, BindTarget, Binding, Datapath, DatapathError},
    logging::{self, PendingAudit},
    metrics::{self, CheckCounters},
    protocol::{AccountState, Caller, CheckResult, Command, ErrorBody, ErrorCode, ImportAccount, Method, Mode, Reason, ReplaceEntry},
    store::{AccountRow, ActivityRecord, BindingRow, Store, StoreError, Tx},
};

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
            StoreError::BindingExists(_) => ErrorCode::BindingExists,
            _ => ErrorCode::Internal,
        };
        Failure::new(code, e.to_string())
    }
}

impl From<DatapathError> for Failure {
    fn from(e: DatapathError) -> Self {
        Failure::new(ErrorCode::Internal, format!("the kernel refused the change, nothing was changed: {e}"))
    }
}

type Outcome = Result<Value, Failure>;

/// What a login check needs to know about an account.
#[derive(Clone, Debug)]
struct CachedAccount {
    slot: u32,
    parent: Option<String>,
    state: AccountState,
    mode: Mode,
    entries: Vec<IpNet>,
    /// Live overrides: (prefix, expiry in unix seconds).
    overrides: Vec<(IpNet, i64)>,
}

/// Login checks are recorded off the request path: a thread batches them into the store
/// through its own connection. Audit records of changes are not sent here; they are written
/// in the change's own transaction, so they cannot be lost.
pub struct ActivityLog {
    sender: mpsc::SyncSender<LogMessage>,
    /// Check records dropped because the log fell behind (the queue was full).
    dropped: AtomicU64,
}

enum LogMessage {
    Record(ActivityRecord),
    Flush(mpsc::SyncSender<()>),
}

impl ActivityLog {
    const QUEUE: usize = 65_536;
    const BATCH: usize = 2_048;

    /// Starts the writer thread on `store` (a second connection to the daemon's database).
    pub fn start(mut store: Store) -> ActivityLog {
        let (sender, receiver) = mpsc::sync_channel(Self::QUEUE);
        thread::Builder::new()
            .name("activity-log".into())
            .spawn(move || {
                let mut batch = Vec::with_capacity(Self::BATCH);
                let mut waiting = Vec::new();
                loop {
                    match receiver.recv_timeout(Duration::from_millis(200)) {
                        Ok(LogMessage::Record(r)) => batch.push(r),
                        Ok(LogMessage::Flush(done)) => waiting.push(done),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    while batch.len() < Self::BATCH {
                        match receiver.try_recv() {
                            Ok(LogMessage::Record(r)) => batch.push(r),
                            Ok(LogMessage::Flush(done)) => waiting.push(done),
                            Err(_) => break,
                        }
                    }
                    if !batch.is_empty() {
                        let written = store.transaction().and_then(|tx| {
                            tx.add_activity(&batch)?;
                            tx.commit()
                        });
                        if let Err(e) = written {
                            warn!("could not record {} login checks: {e}", batch.len());
                        }
                        batch.clear();
                    }
                    waiting.drain(..).for_each(|done| {
                        let _ = done.send(());
                    });
                }
            })
            .expect("spawn the activity log thread");
        ActivityLog { sender, dropped: AtomicU64::new(0) }
    }

    fn record(&self, record: ActivityRecord) {
        if self.sender.try_send(LogMessage::Record(record)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until everything recorded so far is in the store.
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.sender.send(LogMessage::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        }
    }
}

/// The one writer: store and maps change together under this lock.
struct Writer {
    store: Store,
    datapath: Datapath,
}

pub struct Service {
    writer: Mutex<Writer>,
    accounts: RwLock<HashMap<String, CachedAccount>>,
    activity: ActivityLog,
    /// Settings a reload may change (see [`Service::reconfigure`]).
    retention_days: AtomicU32,
    min_override_ttl: AtomicU64,
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
        let mut cache: HashMap<String, CachedAccount> = accounts
            .iter()
            .map(|a| {
                let cached = CachedAccount {
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
        for e in entries {
            if let Some(a) = cache.get_mut(&e.account) {
                a.entries.push(e.cidr);
            }
        }
        for o in overrides {
            if let Some(a) = cache.get_mut(&o.account) {
                a.overrides.push((o.cidr, o.expires_at));
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
            writer: Mutex::new(Writer { store, datapath }),
            accounts: RwLock::new(cache),
            activity,
            retention_days: config.retention_days.into(),
            min_override_ttl: config.min_override_ttl_seconds.max(1).into(),
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
                Ok(json!({ "account": row, "entries": tx.entries(&account)?,
                           "bindings": tx.bindings()?.into_iter().filter(|b| b.account == account).collect::<Vec<_>>() }))
            }),
            Command::AccountList {} => self.read(|tx| Ok(json!(tx.accounts()?))),
            Command::AllowList { account } => self.read(|tx| {
                tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                Ok(json!(tx.entries(&account)?))
            }),
            Command::BindList {} => self.read(|tx| Ok(json!(tx.bindings()?))),
            Command::Status {} => self.status(),
            Command::AccountAdd { account, parent, unconfirmed } => {
                let state = if unconfirmed { AccountState::Unconfirmed } else { AccountState::Active };
                // IP restriction is opt-in: a new account starts in mode `off`.
                self.change(&account, |tx| {
                    let row = tx.add_account(&account, parent.as_deref(), state, Mode::Off, now())?;
                    Ok((row.clone(), json!(row)))
                })
            }
            Command::AccountState { account, state, reason } => {
                self.change(&account, |tx| {
                    tx.set_state(&account, state, reason.as_deref())?;
                    audit(tx, &account, uid, "state", json!({ "state": state, "reason": reason }))?;
                    let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                    Ok((row.clone(), json!(row)))
                })
            }
            Command::AccountMode { account, mode, client_ip, force } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                if mode == Mode::Enforce && !force {
                    let entries: Vec<IpNet> = tx.entries(&account)?.into_iter().map(|e| e.cidr).collect();
                    refuse_lockout(&account, uid, client_ip, &entries)?;
                }
                tx.set_mode(&account, mode)?;
                audit(tx, &account, uid, "mode", json!({ "mode": mode, "was": row.mode, "forced": force }))?;
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                Ok((row.clone(), json!(row)))
            }),
            Command::AllowAdd { account, cidr, label } => self.change(&account, |tx| {
                let entry = tx.add_entry(&account, cidr, label.as_deref(), uid, now())?;
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                Ok((row, json!(entry)))
            }),
            Command::AllowRemove { account, cidr, client_ip, force } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                if !tx.remove_entry(&account, cidr)? {
                    return Err(Failure::new(ErrorCode::UnknownEntry, format!("{cidr} is not on {account}'s allowlist")));
                }
                if row.mode == Mode::Enforce && !force {
                    let rest: Vec<IpNet> = tx.entries(&account)?.into_iter().map(|e| e.cidr).collect();
                    refuse_lockout(&account, uid, client_ip, &rest)?;
                }
                Ok((row, json!({ "account": account, "removed": cidr.trunc() })))
            }),
            Command::AllowReplace { account, entries, client_ip, force } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                let wanted = distinct_entries(entries);
                if row.mode == Mode::Enforce && !force {
                    let nets: Vec<IpNet> = wanted.iter().map(|(c, _)| *c).collect();
                    refuse_lockout(&account, uid, client_ip, &nets)?;
                }
                tx.replace_entries(&account, &wanted, uid, now())?;
                audit(tx, &account, uid, "allow_replace", json!({ "entries": wanted.len(), "forced": force }))?;
                Ok((row, json!(tx.entries(&account)?)))
            }),
            Command::Import { accounts } => self.import(accounts, uid),
            Command::Stats { account } => self.stats(account.as_deref()),
            Command::Detach { interface } => {
                let detached = self.writer.lock().expect("writer lock").datapath.detach(&interface)?;
                logging::detached(&interface, uid, detached);
                Ok(json!({ "interface": interface, "detached": detached }))
            }
            Command::OverrideGrant { account, cidr, ttl_seconds, ticket, reason } => {
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
                // `change` flushes the log first: the reply's denied attempts include the latest.
                self.change(&account, |tx| {
                    let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                    let parent = match row.parent.as_deref() {
                        Some(p) => tx.account(p)?,
                        None => None,
                    };
                    refuse_override(&row, parent.as_ref())?;
                    let at = now();
                    let granted = tx.add_override(&account, cidr, &ticket, &reason, uid, at, at + ttl_seconds as i64)?;
                    audit(tx, &account, uid, "override_granted", json!({
                        "override": granted.id, "cidr": granted.cidr, "ticket": ticket,
                        "reason": reason, "expires_at": granted.expires_at }))?;
                    let recent = tx.denied_summary(&account, at - DENIED_LOOKBACK)?;
                    Ok((row, json!({ "override": granted, "recent_denied": recent })))
                })
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
            Command::Activity { account, since_seconds, denied_only, limit } => {
                self.activity.flush();
                let since = now() - since_seconds.unwrap_or(7 * 24 * 3600).min(i64::MAX as u64 / 2) as i64;
                let limit = limit.unwrap_or(100).min(10_000);
                self.read(|tx| Ok(json!(tx.activity(&account, since, denied_only, limit)?)))
            }
            Command::BindAdd { account, addr, port, proto } => {
                let target = bind_target(port, proto)?;
                self.change_bindings(|tx| Ok(json!(tx.add_binding(&account, addr, target, now())?)))
            }
            Command::BindRemove { addr, port, proto } => {
                let target = bind_target(port, proto)?;
                self.change_bindings(|tx| match tx.remove_binding(addr, target)? {
                    Some(row) => Ok(json!(row)),
                    None => Err(Failure::new(ErrorCode::UnknownBinding, format!("no binding for {addr}{}", describe(target)))),
                })
            }
            // Placeholder so the client's wire format builds; the policy work implements these.
            Command::AccountRemove { .. }
            | Command::AllowEnable { .. }
            | Command::AllowDisable { .. }
            | Command::AllowLabel { .. } => Err(Failure::new(ErrorCode::BadRequest, "not supported by this daemon yet")),
        }
    }

    fn read(&self, f: impl FnOnce(&Tx) -> Outcome) -> Outcome {
        let mut writer = self.writer.lock().expect("writer lock");
        let tx = writer.store.transaction()?;
        f(&tx)
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
        let writer = self.writer.lock().expect("writer lock");
        let (used, capacity) = writer.datapath.slot_usage();
        let attachments = writer.datapath.attachments();
        Ok(json!({
            "accounts": self.accounts.read().expect("cache lock").len(),
            "interfaces": attachments.iter().map(|(interface, _)| interface).collect::<Vec<_>>(),
            "xdp": attachments.iter().map(|(interface, path)| json!({ "interface": interface, "path": path }))
                .collect::<Vec<_>>(),
            "pin_dir": writer.datapath.pin_dir(),
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
            cache.iter().map(|(id, a)| (id.clone(), a.slot, a.overrides.iter().filter(|&&(_, e)| e > at).count())).collect()
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
        // Checks answered before this change reach the log before its audit record, so the
        // log's order is the order things happened in.
        self.activity.flush();
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let (rows, reply) = f(&tx)?;
        let at = now();
        let mut updated: HashMap<String, CachedAccount> = HashMap::with_capacity(rows.len());
        let mut children = Vec::new();
        for row in rows {
            children.extend(tx.children(&row.id)?);
            let entries = tx.entries(&row.id)?.into_iter().map(|e| e.cidr).collect();
            let overrides =
                tx.live_overrides(Some(&row.id), at)?.into_iter().map(|o| (o.cidr, o.expires_at)).collect();
            let cached = CachedAccount { slot: row.slot, parent: row.parent, state: row.state, mode: row.mode, entries, overrides };
            updated.insert(row.id, cached);
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
            return Err(Failure::new(ErrorCode::BadRequest, format!("account {} appears twice in the import", twice.account)));
        }
        self.change_accounts(|tx| {
            let at = now();
            let (mut created, mut entries) = (0, 0);
            let mut rows = Vec::with_capacity(accounts.len());
            for import in accounts {
                let id = import.account.as_str();
                let mut row = match tx.account(id)? {
                    Some(row) => {
                        if import.parent.is_some() && import.parent != row.parent {
                            return Err(Failure::new(
                                ErrorCode::BadRequest,
                                format!("{id} exists with another parent; a parent cannot be changed"),
                            ));
                        }
                        row
                    }
                    None => {
                        created += 1;
                        let state = import.state.unwrap_or(AccountState::Active);
                        tx.add_account(id, import.parent.as_deref(), state, import.mode.unwrap_or(Mode::Off), at)?
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
                let replaced = import.entries.map(distinct_entries);
                if let Some(wanted) = &replaced {
                    tx.replace_entries(id, wanted, uid, at)?;
                    entries += wanted.len();
                }
                audit(tx, id, uid, "import", json!({
                    "state": import.state, "mode": import.mode, "entries": replaced.as_ref().map(Vec::len) }))?;
                rows.push(row);
            }
            info!("import by uid {uid}: {} accounts ({created} new), {entries} allowlist entries", rows.len());
            let reply = json!({ "accounts": rows.len(), "created": created, "entries": entries });
            Ok((rows, reply))
        })
    }

    fn change_bindings(&self, f: impl FnOnce(&Tx) -> Outcome) -> Outcome {
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let tx = store.transaction()?;
        let result = f(&tx)?;
        let cache = self.accounts.read().expect("cache lock");
        let wanted: Vec<Binding> = tx.bindings()?.iter().map(|b| to_binding(b, cache[b.account.as_str()].slot)).collect();
        let before = datapath.bindings();
        datapath.set_bindings(&wanted)?;
        if let Err(e) = tx.commit() {
            if let Err(undo) = datapath.set_bindings(&before) {
                warn!("could not restore the kernel's bindings after a failed commit: {undo}");
            }
            return Err(e.into());
        }
        Ok(result)
    }

    /// A login check, answered from memory.
    pub fn check(&self, account: &str, addr: IpAddr, method: Method, caller: &Caller, dry_run: bool) -> Outcome {
        let at = now();
        let result = decide(&self.accounts.read().expect("cache lock"), account, addr, at);
        if dry_run {
            return Ok(json!(result));
        }
        let _ = caller;
        self.checks.count(result.reason);
        self.activity.record(ActivityRecord {
            time: at,
            account: account.to_string(),
            kind: "check",
            address: Some(addr),
            method: serde_json::to_value(method).ok().and_then(|v| v.as_str().map(str::to_string)),
            allowed: Some(result.allowed),
            reason: serde_json::to_value(result.reason).ok().and_then(|v| v.as_str().map(str::to_string)),
            detail: None,
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
            self.activity.record(ActivityRecord {
                time: at,
                account: account.clone(),
                kind: "drop",
                address: Some(src),
                method: None,
                allowed: Some(sample.reason == ipaccess_common::reason::WOULD_DROP),
                reason: Some(reason.to_string()),
                detail: Some(json!({ "destination": dst, "protocol": sample.protocol, "port": sample.port })),
            });
        }
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
            accounts.iter().filter(|(_, a)| a.overrides.iter().any(|&(_, e)| e <= at)).map(|(id, _)| id.clone()).collect()
        };
        if !expired.is_empty() {
            let mut accounts = self.accounts.write().expect("cache lock");
            for id in &expired {
                if let Some(a) = accounts.get_mut(id) {
                    a.overrides.retain(|&(_, e)| e > at);
                }
                apply_account(datapath, &accounts[id], suspended(|a| accounts.get(a), id))?;
                info!("account {id}: expired overrides swept");
            }
        }
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

/// The decision order of DESIGN.md: the first reason that applies wins.
fn decide(accounts: &HashMap<String, CachedAccount>, id: &str, addr: IpAddr, now: i64) -> CheckResult {
    let result = |allowed, reason, hint: String| CheckResult { allowed, reason, hint };
    let Some(account) = accounts.get(id) else {
        return result(false, Reason::UnknownAccount, format!("There is no account {id}. Check the account name."));
    };
    if account.state == AccountState::Banned {
        return result(false, Reason::Banned, "This account is banned. Support cannot reactivate it.".into());
    }
    if let Some(parent) = account.parent.as_deref()
        && accounts.get(parent).is_some_and(|p| p.state == AccountState::Banned)
    {
        return result(
            false,
            Reason::ParentBanned,
            format!("The parent account {parent} is banned, and with it all its sub-users. Support cannot reactivate it."),
        );
    }
    if account.state == AccountState::Terminated {
        return result(
            false,
            Reason::Terminated,
            "This account was terminated for non-payment. Settle the balance with billing to reactivate it.".into(),
        );
    }
    if account.state == AccountState::Unconfirmed {
        return result(
            false,
            Reason::Unconfirmed,
            "The account's email address is not confirmed yet. Follow the link in the confirmation email.".into(),
        );
    }
    let covered = account.entries.iter().any(|net| net.contains(&addr))
        || account.overrides.iter().any(|(net, expires)| *expires > now && net.contains(&addr));
    match account.mode {
        Mode::Enforce if !covered => result(
            false,
            Reason::AddressNotAllowed,
            format!(
                "Sign-in from {addr} is not allowed for this account. Sign in from an address already on the \
                 account's allowlist and add this one, or ask support to verify ownership and grant temporary access."
            ),
        ),
        Mode::Monitor if !covered => result(
            true,
            Reason::MonitorWouldDeny,
            format!("{addr} is not on the allowlist; allowed because the account is in monitor mode."),
        ),
        _ => result(true, Reason::Allowed, String::new()),
    }
}

/// Banned or terminated accounts, and sub-users of banned parents, have their traffic
/// dropped. `account` looks an account up by id (in the cache, or in a change's view of it).
fn suspended<'a>(account: impl Fn(&str) -> Option<&'a CachedAccount>, id: &str) -> bool {
    let this = account(id).expect("the account exists");
    this.state.suspended()
        || this.parent.as_deref().and_then(&account).is_some_and(|p| p.state == AccountState::Banned)
}

fn apply_account(datapath: &mut Datapath, account: &CachedAccount, suspended: bool) -> Result<(), DatapathError> {
    let mut entries: Vec<(IpNet, u64)> = account.entries.iter().map(|&net| (net, NEVER_EXPIRES)).collect();
    // Overrides expire in the kernel on their own: their expiry moves to the kernel's clock.
    let (unix_now, boot_now) = (now(), datapath::boot_time_ns());
    for &(net, expires) in &account.overrides {
        if expires > unix_now {
            entries.push((net, boot_now.saturating_add((expires - unix_now) as u64 * 1_000_000_000)));
        }
    }
    datapath.set_allowlist(account.slot, &entries)?;
    datapath.set_policy(account.slot, to_mode(account.mode), suspended)
}

/// The entries of a replacement, truncated to their networks; where a CIDR is given twice,
/// the later one (and its label) counts.
fn distinct_entries(entries: Vec<ReplaceEntry>) -> Vec<(IpNet, Option<String>)> {
    let mut positions: HashMap<IpNet, usize> = HashMap::with_capacity(entries.len());
    let mut wanted: Vec<(IpNet, Option<String>)> = Vec::with_capacity(entries.len());
    for entry in entries {
        let cidr = entry.cidr.trunc();
        match positions.get(&cidr) {
            Some(&at) => wanted[at].1 = entry.label,
            None => {
                positions.insert(cidr, wanted.len());
                wanted.push((cidr, entry.label));
            }
        }
    }
    wanted
}

/// Support cannot let anyone into a banned account (or a banned parent's sub-user), nor
/// into one terminated for non-payment: those are not lockouts.
fn refuse_override(account: &AccountRow, parent: Option<&AccountRow>) -> Result<(), Failure> {
    let refused = |why: String| Err(Failure::new(ErrorCode::Refused, why));
    match (account.state, parent.map(|p| (p.id.as_str(), p.state))) {
        (AccountState::Banned, _) => refused(format!("{} is banned; overrides cannot reactivate it", account.id)),
        (_, Some((p, AccountState::Banned))) => {
            refused(format!("{}'s parent account {p} is banned; overrides cannot reactivate it", account.id))
        }
        (AccountState::Terminated, _) => refused(format!(
            "{} was terminated for non-payment; billing must reactivate it, an override would not help",
            account.id
        )),
        _ => Ok(()),
    }
}

/// Records a change in the activity log, in the change's own transaction, and in the
/// daemon's log once it commits.
fn audit(tx: &Tx, account: &str, uid: u32, action: &str, detail: Value) -> Result<(), Failure> {
    let mut detail = detail;
    detail["uid"] = json!(uid);
    detail["action"] = json!(action);
    logging::audit(account, uid, action, &detail);
    tx.add_activity(&[ActivityRecord {
        time: now(),
        account: account.to_string(),
        kind: "audit",
        address: None,
        method: None,
        allowed: None,
        reason: Some(action.to_string()),
        detail: Some(detail),
    }])?;
    Ok(())
}

fn refuse_lockout(account: &str, uid: u32, client_ip: Option<IpAddr>, entries: &[IpNet]) -> Result<(), Failure> {
    let Some(ip) = client_ip.filter(|ip| !entries.iter().any(|net| net.contains(ip))) else {
        return Ok(());
    };
    logging::lockout_refused(account, uid, ip);
    Err(Failure::new(
        ErrorCode::Lockout,
        format!(
            "refused: {account}'s allowlist would not include {ip}, the address you are using; add it first or \
             repeat with force"
        ),
    ))
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

/// Validates account ids and writes addresses in one form: an IPv4 address that arrives
/// IPv4-mapped (`::ffff:198.18.0.10`, as dual-stack sockets report it) is the IPv4 address.
fn canonical(command: Command) -> Result<Command, Failure> {
    let bad_id = |id: &str| id.is_empty() || id.len() > 256 || id.chars().any(char::is_control);
    let account = match &command {
        Command::AccountAdd { account, .. }
        | Command::AccountShow { account }
        | Command::AccountState { account, .. }
        | Command::AccountMode { account, .. }
        | Command::AllowAdd { account, .. }
        | Command::AllowRemove { account, .. }
        | Command::AllowList { account }
        | Command::AllowReplace { account, .. }
        | Command::BindAdd { account, .. }
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
        return Err(Failure::new(
            ErrorCode::BadRequest,
            "an account id is 1 to 256 characters, without control characters",
        ));
    }
    let ip = |a: IpAddr| a.to_canonical();
    Ok(match command {
        Command::Check { account, addr, method, dry_run } => Command::Check { account, addr: ip(addr), method, dry_run },
        Command::AccountMode { account, mode, client_ip, force } => {
            Command::AccountMode { account, mode, client_ip: client_ip.map(ip), force }
        }
        Command::AllowRemove { account, cidr, client_ip, force } => {
            Command::AllowRemove { account, cidr, client_ip: client_ip.map(ip), force }
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
