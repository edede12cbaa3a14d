//! The daemon's core: every command, applied to the store and the kernel together.
//!
//! A change is written in a store transaction, applied to the maps, and only then
//! committed; if the maps refuse it, the transaction is rolled back and the kernel put back
//! as it was, so the caller's error means "nothing changed". Login checks are reads: they
//! are answered from an in-memory copy of the policy, never from the database.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Mutex, RwLock},
    time::{SystemTime, UNIX_EPOCH},
};

use ipaccess_common::NEVER_EXPIRES;
use ipnet::IpNet;
use log::{info, warn};
use serde_json::{Value, json};

use crate::{
    datapath::{self, BindTarget, Binding, Datapath, DatapathError},
    protocol::{AccountState, CheckResult, Command, ErrorBody, ErrorCode, Method, Mode, Reason},
    store::{AccountRow, BindingRow, Store, StoreError, Tx},
};

/// An error for the caller: a stable code and a sentence.
#[derive(Debug)]
pub struct Failure(pub ErrorBody);

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Failure(ErrorBody { code, message: message.into() })
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
}

/// The one writer: store and maps change together under this lock.
struct Writer {
    store: Store,
    datapath: Datapath,
}

pub struct Service {
    writer: Mutex<Writer>,
    accounts: RwLock<HashMap<String, CachedAccount>>,
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
    pub fn start(store: Store, mut datapath: Datapath) -> Result<Service, Failure> {
        let mut store = store;
        let (accounts, entries, bindings) = {
            let tx = store.transaction()?;
            (tx.accounts()?, tx.all_entries()?, tx.bindings()?)
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
                };
                (a.id.clone(), cached)
            })
            .collect();
        for e in entries {
            if let Some(a) = cache.get_mut(&e.account) {
                a.entries.push(e.cidr);
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
            apply_account(&mut datapath, account, suspended(&cache, id))?;
        }
        let slots: HashMap<&str, u32> = cache.iter().map(|(id, a)| (id.as_str(), a.slot)).collect();
        let bindings: Vec<Binding> = bindings.iter().map(|b| to_binding(b, slots[b.account.as_str()])).collect();
        datapath.set_bindings(&bindings)?;
        info!("reconciled {} accounts and {} bindings with the kernel", cache.len(), bindings.len());
        Ok(Service { writer: Mutex::new(Writer { store, datapath }), accounts: RwLock::new(cache) })
    }

    /// Attaches the filter to an interface (see [`Datapath::attach`]).
    pub fn attach(&self, iface: &str) -> Result<datapath::Attachment, DatapathError> {
        self.writer.lock().expect("writer lock").datapath.attach(iface)
    }

    /// Runs one command for a caller whose uid is `uid` (recorded as the author of changes).
    pub fn execute(&self, command: Command, uid: u32) -> Outcome {
        let command = canonical(command)?;
        match command {
            Command::Check { account, addr, method } => self.check(&account, addr, method.unwrap_or_default()),
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
                info!("account {account}: state {state:?} by uid {uid} ({})", reason.as_deref().unwrap_or("no reason"));
                self.change(&account, |tx| {
                    tx.set_state(&account, state, reason.as_deref())?;
                    let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                    Ok((row.clone(), json!(row)))
                })
            }
            Command::AccountMode { account, mode, client_ip, force } => self.change(&account, |tx| {
                let row = tx.account(&account)?.ok_or_else(|| unknown(&account))?;
                if mode == Mode::Enforce && !force {
                    let entries: Vec<IpNet> = tx.entries(&account)?.into_iter().map(|e| e.cidr).collect();
                    refuse_lockout(&account, client_ip, &entries)?;
                }
                tx.set_mode(&account, mode)?;
                info!("account {account}: mode {mode:?} by uid {uid} (was {:?})", row.mode);
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
                    refuse_lockout(&account, client_ip, &rest)?;
                }
                Ok((row, json!({ "account": account, "removed": cidr.trunc() })))
            }),
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
        }
    }

    fn read(&self, f: impl FnOnce(&Tx) -> Outcome) -> Outcome {
        let mut writer = self.writer.lock().expect("writer lock");
        let tx = writer.store.transaction()?;
        f(&tx)
    }

    fn status(&self) -> Outcome {
        let writer = self.writer.lock().expect("writer lock");
        let (used, capacity) = writer.datapath.slot_usage();
        Ok(json!({
            "accounts": self.accounts.read().expect("cache lock").len(),
            "interfaces": writer.datapath.attached_interfaces(),
            "pin_dir": writer.datapath.pin_dir(),
            "table_slots_used": used,
            "table_slots": capacity,
            "host_counters": writer.datapath.host_counters().ok().map(|c| json!({
                "non_ip": c.non_ip_packets, "unbound": c.unbound_packets,
                "ndp": c.ndp_packets, "malformed": c.malformed_packets })),
        }))
    }

    /// A change to one account (and, through banning, to its sub-users): store, then
    /// kernel, then commit; on any failure nothing is left changed.
    fn change(&self, account: &str, f: impl FnOnce(&Tx) -> Result<(AccountRow, Value), Failure>) -> Outcome {
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let tx = store.transaction()?;
        let (row, reply) = f(&tx)?;
        let mut next = self.accounts.read().expect("cache lock").clone();
        let entries = tx.entries(account)?.into_iter().map(|e| e.cidr).collect();
        next.insert(
            account.to_string(),
            CachedAccount { slot: row.slot, parent: row.parent.clone(), state: row.state, mode: row.mode, entries },
        );
        // The account itself and, if it is a parent, its sub-users (banning cascades).
        let affected: Vec<String> =
            next.iter().filter(|(id, a)| *id == account || a.parent.as_deref() == Some(account)).map(|(id, _)| id.clone()).collect();
        let previous = self.accounts.read().expect("cache lock").clone();
        if let Err(e) = affected.iter().try_for_each(|id| apply_account(datapath, &next[id], suspended(&next, id))) {
            restore(datapath, &previous, &next, &affected);
            return Err(e.into());
        }
        if let Err(e) = tx.commit() {
            restore(datapath, &previous, &next, &affected);
            return Err(e.into());
        }
        *self.accounts.write().expect("cache lock") = next;
        Ok(reply)
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
    pub fn check(&self, account: &str, addr: IpAddr, method: Method) -> Outcome {
        let accounts = self.accounts.read().expect("cache lock");
        let result = decide(&accounts, account, addr);
        let _ = method;
        Ok(json!(result))
    }
}

/// The decision order of DESIGN.md: the first reason that applies wins.
fn decide(accounts: &HashMap<String, CachedAccount>, id: &str, addr: IpAddr) -> CheckResult {
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
    let covered = account.entries.iter().any(|net| net.contains(&addr));
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

/// Banned or terminated accounts, and sub-users of banned parents, have their traffic dropped.
fn suspended(accounts: &HashMap<String, CachedAccount>, id: &str) -> bool {
    let account = &accounts[id];
    account.state.suspended()
        || account.parent.as_deref().and_then(|p| accounts.get(p)).is_some_and(|p| p.state == AccountState::Banned)
}

fn apply_account(datapath: &mut Datapath, account: &CachedAccount, suspended: bool) -> Result<(), DatapathError> {
    let entries: Vec<(IpNet, u64)> = account.entries.iter().map(|&net| (net, NEVER_EXPIRES)).collect();
    datapath.set_allowlist(account.slot, &entries)?;
    datapath.set_policy(account.slot, to_mode(account.mode), suspended)
}

/// Puts the kernel back to `previous` for `ids` after a change could not be completed
/// (an account that did not exist before is removed again).
fn restore(
    datapath: &mut Datapath,
    previous: &HashMap<String, CachedAccount>,
    next: &HashMap<String, CachedAccount>,
    ids: &[String],
) {
    for id in ids {
        let result = match previous.get(id) {
            Some(account) => apply_account(datapath, account, suspended(previous, id)),
            None => datapath.remove_account(next[id].slot),
        };
        if let Err(e) = result {
            warn!("could not restore account {id} in the kernel: {e}");
        }
    }
}

fn refuse_lockout(account: &str, client_ip: Option<IpAddr>, entries: &[IpNet]) -> Result<(), Failure> {
    match client_ip {
        Some(ip) if !entries.iter().any(|net| net.contains(&ip)) => Err(Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account}'s allowlist would not include {ip}, the address you are using; add it first \
                 or repeat with force"
            ),
        )),
        _ => Ok(()),
    }
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
        | Command::BindAdd { account, .. }
        | Command::Check { account, .. } => Some(account.as_str()),
        _ => None,
    };
    if account.is_some_and(bad_id) {
        return Err(Failure::new(
            ErrorCode::BadRequest,
            "an account id is 1 to 256 characters, without control characters",
        ));
    }
    let ip = |a: IpAddr| a.to_canonical();
    Ok(match command {
        Command::Check { account, addr, method } => Command::Check { account, addr: ip(addr), method },
        Command::AccountMode { account, mode, client_ip, force } => {
            Command::AccountMode { account, mode, client_ip: client_ip.map(ip), force }
        }
        Command::AllowRemove { account, cidr, client_ip, force } => {
            Command::AllowRemove { account, cidr, client_ip: client_ip.map(ip), force }
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
