//! Shared named sets: a set's networks are stored once (in the store, the in-memory cache
//! and the kernel) and every account that references it is let in through them. A change to
//! a set is one store transaction and one kernel update (`set_shared_set`), so it reaches
//! every referencing account at the same moment; references are changes to one account.

use std::{collections::HashMap, net::IpAddr};

use ipaccess_common::{MAX_SETS, MAX_SETS_PER_ACCOUNT};
use ipnet::IpNet;
use log::warn;
use serde_json::json;

use super::{
    Failure, Reply, Service, Writer,
    allowlist::network,
    change::{audit, existing, policy_from_store, record_commit},
    lockout::{self, RECENT_SIGNINS},
    now,
};
use crate::{
    datapath::DatapathError,
    logging::{self, PendingAudit},
    policy::{AccountPolicy, MAX_LABEL, SetPolicy, check_text, valid_account_id},
    protocol::{
        AccountSignin, AllowAddSet, AllowDisableSet, AllowEnableSet, AllowRemoveSet, ErrorCode, ListedSet, Mode,
        SetAdd, SetDelete, SetDeleted, SetList, SetReference, SetRemove, SetShow, SetShutOut, SharedSet,
    },
    store::{SetRefRow, SignedInThroughSet, Tx},
};

/// The most networks one set may hold.
pub const MAX_SET_ENTRIES: u64 = 10_000;
/// How many accounts or addresses a refusal's message names (`details` has more).
const LISTED: usize = 10;
/// How many a refusal's `details` lists at most (a set may have 10,000 references).
const DETAILED: usize = 1000;

impl Service {
    pub(super) fn set_add(&self, SetAdd { set, cidrs, label }: SetAdd, uid: u32) -> Reply<SetAdd> {
        set_name(&set)?;
        if let Some(label) = &label {
            check_text("a label", label, MAX_LABEL).map_err(|why| Failure::new(ErrorCode::BadRequest, why))?;
        }
        let (cidrs, notes) = distinct(cidrs)?;
        self.change_set(&set, |tx| {
            let at = now();
            let created = match tx.set(&set)? {
                Some(_) => false,
                None => {
                    tx.add_set(&set, uid, at, MAX_SETS)?.ok_or_else(|| {
                        Failure::new(
                            ErrorCode::TablesFull,
                            format!("there are {} shared sets, as many as the kernel holds; delete one first", MAX_SETS - 1),
                        )
                    })?;
                    true
                }
            };
            for &cidr in &cidrs {
                if !tx.add_set_entry(&set, cidr, label.as_deref(), uid, at)? {
                    return Err(Failure::new(ErrorCode::EntryExists, format!("{cidr} is already in the set {set}")));
                }
            }
            let count = tx.set_entry_count(&set)?;
            if count > MAX_SET_ENTRIES {
                return Err(Failure::with_details(
                    ErrorCode::TooManyEntries,
                    format!("the set {set} would hold {count} networks; a set holds at most {MAX_SET_ENTRIES}; nothing was changed"),
                    json!({"set": set, "entries": count, "limit": "max_entries_per_set", "max": MAX_SET_ENTRIES}),
                ));
            }
            audit(tx, &set_subject(&set), uid, "set_add", json!({ "cidrs": cidrs, "label": label, "created": created }))?;
            Ok((Vec::new(), shared_set(tx, &set, notes)?))
        })
    }

    pub(super) fn set_remove(&self, SetRemove { set, cidrs, force }: SetRemove, uid: u32) -> Reply<SetRemove> {
        set_name(&set)?;
        let (cidrs, notes) = distinct(cidrs)?;
        self.change_set(&set, |tx| {
            let before: Vec<IpNet> = existing_set(tx, &set)?.into_iter().collect();
            for cidr in &cidrs {
                if !before.contains(cidr) {
                    return Err(Failure::new(ErrorCode::UnknownEntry, format!("{cidr} is not in the set {set}")));
                }
            }
            let after: Vec<IpNet> = before.iter().copied().filter(|c| !cidrs.contains(c)).collect();
            if !force {
                self.set_guard(tx, &set, &before, &after, uid)?;
            }
            for &cidr in &cidrs {
                tx.remove_set_entry(&set, cidr)?;
            }
            audit(tx, &set_subject(&set), uid, "set_remove", json!({ "cidrs": cidrs, "forced": force }))?;
            Ok((Vec::new(), shared_set(tx, &set, notes)?))
        })
    }

    pub(super) fn set_delete(&self, SetDelete { set, force }: SetDelete, uid: u32) -> Reply<SetDelete> {
        set_name(&set)?;
        self.change_set(&set, |tx| {
            let before: Vec<IpNet> = existing_set(tx, &set)?.into_iter().collect();
            let referrers = tx.set_referrers(&set)?;
            if !referrers.is_empty() && !force {
                return Err(in_use(&set, &referrers));
            }
            // Forced: the references go too. The guard is passed by the same `force`.
            let mut removed = Vec::with_capacity(referrers.len());
            for r in referrers {
                tx.remove_set_ref(&r.account, &set)?;
                audit(
                    tx,
                    &r.account,
                    uid,
                    "allow_remove_set",
                    json!({ "set": set, "forced": true, "set_deleted": true }),
                )?;
                removed.push(r.account);
            }
            tx.remove_set(&set)?;
            audit(
                tx,
                &set_subject(&set),
                uid,
                "set_delete",
                json!({ "references_removed": removed.len(), "forced": force, "entries": before.len() }),
            )?;
            Ok((removed.clone(), SetDeleted { set: set.clone(), references_removed: removed }))
        })
    }

    pub(super) fn set_list(&self, _: SetList) -> Reply<SetList> {
        self.read(|tx| {
            let mut refs: HashMap<String, (u64, u64)> = HashMap::new();
            for r in tx.all_set_refs()? {
                let counts = refs.entry(r.set).or_default();
                counts.0 += 1;
                counts.1 += u64::from(r.enabled);
            }
            let mut entries: HashMap<String, u64> = HashMap::new();
            for (set, _) in tx.all_set_entries()? {
                *entries.entry(set).or_default() += 1;
            }
            Ok(tx
                .sets()?
                .into_iter()
                .map(|s| {
                    let (references, enabled_references) = refs.get(&s.name).copied().unwrap_or_default();
                    ListedSet {
                        entries: entries.get(&s.name).copied().unwrap_or_default(),
                        references,
                        enabled_references,
                        set: s.name,
                        created_at: s.created_at,
                        created_by: s.created_by,
                    }
                })
                .collect())
        })
    }

    pub(super) fn set_show(&self, SetShow { set }: SetShow) -> Reply<SetShow> {
        set_name(&set)?;
        self.read(|tx| {
            existing_set(tx, &set)?;
            let mut shown = shared_set(tx, &set, Vec::new())?;
            shown.entries = tx.set_entries_with_use(&set)?;
            Ok(shown)
        })
    }

    pub(super) fn allow_add_set(&self, AllowAddSet { account, set }: AllowAddSet, uid: u32) -> Reply<AllowAddSet> {
        set_name(&set)?;
        self.change(&account, |tx| {
            let row = existing(tx, &account)?;
            existing_set(tx, &set)?;
            if !tx.add_set_ref(&account, &set, uid, now())? {
                return Err(Failure::new(
                    ErrorCode::EntryExists,
                    format!("{account} references the set {set} already"),
                ));
            }
            reference_limit(tx, &account)?;
            audit(tx, &account, uid, "allow_add_set", json!({ "set": set }))?;
            Ok((row, reference(tx, &account, &set)?))
        })
    }

    pub(super) fn allow_remove_set(&self, request: AllowRemoveSet, uid: u32) -> Reply<AllowRemoveSet> {
        let AllowRemoveSet { account, set, client_ip, force } = request;
        set_name(&set)?;
        self.change(&account, |tx| {
            let (row, was) = self.withdraw_reference(tx, &account, &set, uid, client_ip, force)?;
            tx.remove_set_ref(&account, &set)?;
            audit(tx, &account, uid, "allow_remove_set", json!({ "set": set, "forced": force }))?;
            Ok((row, was))
        })
    }

    pub(super) fn allow_disable_set(&self, request: AllowDisableSet, uid: u32) -> Reply<AllowDisableSet> {
        let AllowDisableSet { account, set, client_ip, force } = request;
        set_name(&set)?;
        self.change(&account, |tx| {
            let (row, _) = self.withdraw_reference(tx, &account, &set, uid, client_ip, force)?;
            tx.set_set_ref_enabled(&account, &set, false)?;
            audit(tx, &account, uid, "allow_disable_set", json!({ "set": set, "forced": force }))?;
            Ok((row, reference(tx, &account, &set)?))
        })
    }

    pub(super) fn allow_enable_set(
        &self,
        AllowEnableSet { account, set }: AllowEnableSet,
        uid: u32,
    ) -> Reply<AllowEnableSet> {
        set_name(&set)?;
        self.change(&account, |tx| {
            let row = existing(tx, &account)?;
            reference(tx, &account, &set)?;
            tx.set_set_ref_enabled(&account, &set, true)?;
            reference_limit(tx, &account)?;
            audit(tx, &account, uid, "allow_enable_set", json!({ "set": set }))?;
            Ok((row, reference(tx, &account, &set)?))
        })
    }

    /// A reference about to stop letting anything in (removed or disabled): the account and
    /// the reference, once the lockout guard has accepted the account without it.
    fn withdraw_reference(
        &self,
        tx: &Tx,
        account: &str,
        set: &str,
        uid: u32,
        client_ip: Option<IpAddr>,
        force: bool,
    ) -> Result<(crate::protocol::Account, SetReference), Failure> {
        let row = existing(tx, account)?;
        let was = reference(tx, account, set)?;
        let before = policy_from_store(tx, &row, now())?;
        let mut after = before.clone();
        after.sets.retain(|s| s.name != set);
        lockout::guard(tx, self, account, uid, client_ip, force, &before, &after)?;
        Ok((row, was))
    }

    /// The lockout guard for a set losing networks (`before` to `after`): refused when an
    /// enforcing account that references it (enabled) would shut out an address that signed
    /// in successfully in the last 7 days and that nothing else of the account lets in, or
    /// would be left letting nobody in. One query reads the sign-ins of every referencing
    /// account; only the accounts with such a sign-in, or left with nothing, are looked at.
    fn set_guard(&self, tx: &Tx, set: &str, before: &[IpNet], after: &[IpNet], uid: u32) -> Result<(), Failure> {
        let at = now();
        let covered = |list: &[IpNet], addr: IpAddr| list.iter().any(|n| n.contains(&addr));
        let accounts = self.accounts.read().expect("cache lock");
        let sets = self.sets.read().expect("set cache lock");
        // Whether anything of the account but this set lets `addr` in (its own entries,
        // overrides and other sets, as committed: nothing else changes in this transaction).
        let elsewhere = |p: &AccountPolicy, addr: IpAddr| {
            p.covers(addr, at)
                || p.sets
                    .iter()
                    .filter(|s| s.name != set)
                    .any(|s| sets.get(&s.name).is_some_and(|s| covered(&s.entries, addr)))
        };
        let mut shut_out = Vec::new();
        for s in self.signins_through_set(tx, set, &accounts, at - RECENT_SIGNINS)? {
            let addr = s.signin.address;
            if !covered(before, addr) || covered(after, addr) {
                continue;
            }
            let Some(p) = accounts.get(&s.account) else { continue };
            if !elsewhere(p, addr) {
                shut_out.push(s);
            }
        }
        // Emptied: an enforcing account that had only this set would let nobody in.
        let mut nothing = Vec::new();
        if after.is_empty() && !before.is_empty() {
            for r in tx.set_referrers(set)?.into_iter().filter(|r| r.enabled) {
                let Some(p) = accounts.get(&r.account) else { continue };
                let others = p
                    .sets
                    .iter()
                    .filter(|s| s.name != set)
                    .any(|s| sets.get(&s.name).is_some_and(|s| !s.entries.is_empty()));
                if p.mode == Mode::Enforce
                    && p.live_entries(at).next().is_none()
                    && p.live_overrides(at).next().is_none()
                    && !others
                {
                    nothing.push(r.account);
                }
            }
        }
        if shut_out.is_empty() && nothing.is_empty() {
            return Ok(());
        }
        logging::lockout_refused_because(&set_subject(set), uid, "a set change shuts out accounts");
        let mut listed: Vec<String> = shut_out
            .iter()
            .take(LISTED)
            .map(|s| {
                format!(
                    "{} from {} (last {} UTC)",
                    s.account,
                    s.signin.address,
                    crate::time::format_utc(s.signin.last_seen)
                )
            })
            .collect();
        if shut_out.len() > LISTED {
            listed.push(format!("and {} more", shut_out.len() - LISTED));
        }
        let mut why = Vec::new();
        if !shut_out.is_empty() {
            why.push(format!(
                "it would shut out {} recent successful sign-in address{} of accounts that reference it: {}",
                shut_out.len(),
                if shut_out.len() == 1 { "" } else { "es" },
                listed.join(", ")
            ));
        }
        if !nothing.is_empty() {
            let named: Vec<&str> = nothing.iter().take(LISTED).map(String::as_str).collect();
            why.push(format!(
                "{} enforcing account{} would let nobody in: {}{}",
                nothing.len(),
                if nothing.len() == 1 { "" } else { "s" },
                named.join(", "),
                if nothing.len() > LISTED { format!(" and {} more", nothing.len() - LISTED) } else { String::new() }
            ));
        }
        let message = format!(
            "refused: changing the set {set}: {}; add the addresses elsewhere first, or repeat with --force",
            why.join("; ")
        );
        let shut_out = shut_out
            .into_iter()
            .take(DETAILED)
            .map(|s| AccountSignin { account: s.account, address: s.signin.address, last_seen: s.signin.last_seen })
            .collect();
        nothing.truncate(DETAILED);
        Err(Failure::with_details(ErrorCode::Lockout, message, json!(SetShutOut { shut_out, allows_nothing: nothing })))
    }

    /// [`Tx::signins_through_set`], with (on a fleet node) the sign-ins the other nodes
    /// published of the same accounts: enforcing, with the reference enabled. One read for
    /// them all, however many (`Cluster::signins` picks per-account ranges or the whole one).
    fn signins_through_set(
        &self,
        tx: &Tx,
        set: &str,
        accounts: &HashMap<String, AccountPolicy>,
        since: i64,
    ) -> Result<Vec<SignedInThroughSet>, Failure> {
        let mut signins = tx.signins_through_set(set, since)?;
        if self.fleet().is_none() {
            return Ok(signins);
        }
        let referrers = tx.set_referrers(set)?;
        let enforcing: Vec<&str> = referrers
            .iter()
            .filter(|r| r.enabled && accounts.get(&r.account).is_some_and(|p| p.mode == Mode::Enforce))
            .map(|r| r.account.as_str())
            .collect();
        if enforcing.is_empty() {
            return Ok(signins);
        }
        let remote = lockout::OtherNodes::signins(self, &enforcing, since)?;
        // As in the store's query, only sign-ins since each account was made.
        let mut made_at: HashMap<String, i64> = HashMap::new();
        for r in remote {
            if !made_at.contains_key(&r.account) {
                made_at.insert(r.account.clone(), lockout::made_at(tx, &r.account)?);
            }
            if r.signin.last_seen >= made_at[&r.account] {
                signins.push(SignedInThroughSet { account: r.account, signin: r.signin });
            }
        }
        // One per account and address, its latest, as the store's query gives them.
        signins.sort_by(|a, b| {
            (&a.account, a.signin.address, b.signin.last_seen).cmp(&(&b.account, b.signin.address, a.signin.last_seen))
        });
        signins.dedup_by(|a, b| a.account == b.account && a.signin.address == b.signin.address);
        signins.sort_by(|a, b| (&a.account, b.signin.last_seen).cmp(&(&b.account, a.signin.last_seen)));
        Ok(signins)
    }

    /// A change to one set: `f` changes the store and returns the accounts whose references
    /// it changed (a forced delete) with the reply; then the set's one kernel table is
    /// replaced (every referencing account sees the change at once), those accounts' kernel
    /// references rewritten, and the change committed. If the kernel refuses or the commit
    /// fails, the kernel is put back and nothing is changed. On a fleet node the change goes
    /// to etcd as the set's document (and those accounts' documents), and comes back through
    /// the watch as every other change does.
    fn change_set<T>(&self, set: &str, f: impl FnOnce(&Tx) -> Result<(Vec<String>, T), Failure>) -> Result<T, Failure> {
        // The guard reads the sign-ins of every referencing account: those answered before
        // the change must be in the store.
        self.activity.flush();
        if let Some(cluster) = self.fleet() {
            return self.submit(cluster, super::fleet::TouchedBindings::None, Some(set), f);
        }
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let (references_changed, reply) = f(&tx)?;
        let after = match tx.set(set)? {
            Some(row) => {
                let entries = tx.set_entries(set)?.into_iter().map(|e| e.cidr).collect();
                Some(SetPolicy { kernel_id: row.kernel_id, entries })
            }
            None => None,
        };
        let before = self.sets.read().expect("set cache lock").get(set).cloned();
        let mut updated: HashMap<String, AccountPolicy> = HashMap::with_capacity(references_changed.len());
        for id in &references_changed {
            if let Some(row) = tx.account(id)? {
                updated.insert(id.clone(), policy_from_store(&tx, &row, now())?);
            }
        }
        let kernel_ids = |p: &AccountPolicy| p.sets.iter().map(|s| s.kernel_id).collect::<Vec<u32>>();
        let mut applied = || -> Result<(), DatapathError> {
            if let Some(after) = &after {
                datapath.set_shared_set(after.kernel_id, &after.entries)?;
            }
            for p in updated.values() {
                datapath.set_account_sets(p.slot, &kernel_ids(p))?;
            }
            // Gone: once no account's kernel list names it.
            if let (Some(before), None) = (&before, &after) {
                datapath.remove_shared_set(before.kernel_id)?;
            }
            Ok(())
        };
        let committed = applied().map_err(Failure::from).and_then(|()| Ok(tx.commit_counted()?));
        let count = match committed {
            Ok(count) => count,
            Err(e) => {
                let restored = match (&before, &after) {
                    (Some(before), _) => datapath.set_shared_set(before.kernel_id, &before.entries),
                    (None, Some(after)) => datapath.remove_shared_set(after.kernel_id),
                    (None, None) => Ok(()),
                };
                if let Err(undo) = restored {
                    warn!("could not restore the set {set} in the kernel: {undo}");
                }
                let cache = self.accounts.read().expect("cache lock");
                for id in updated.keys() {
                    if let Some(previous) = cache.get(id)
                        && let Err(undo) = datapath.set_account_sets(previous.slot, &kernel_ids(previous))
                    {
                        warn!("could not restore account {id}'s sets in the kernel: {undo}");
                    }
                }
                return Err(e);
            }
        };
        record_commit(datapath, count);
        {
            let mut sets = self.sets.write().expect("set cache lock");
            match after {
                Some(after) => sets.insert(set.to_owned(), after),
                None => sets.remove(set),
            };
        }
        self.accounts.write().expect("cache lock").extend(updated);
        pending_audit.committed();
        Ok(reply)
    }
}

/// What a set change is recorded under in the activity log (`activity set:corp-vpn`): no
/// account id holds a colon.
pub(super) fn set_subject(set: &str) -> String {
    format!("{SET_SUBJECT}{set}")
}

/// The prefix of [`set_subject`].
pub(super) const SET_SUBJECT: &str = "set:";

/// Set names follow the account id rule.
fn set_name(set: &str) -> Result<(), Failure> {
    if valid_account_id(set) {
        return Ok(());
    }
    Err(Failure::new(
        ErrorCode::BadRequest,
        "a set name is 1 to 128 characters: ASCII letters, digits and . _ @ + -, starting with a letter or digit",
    ))
}

/// The networks of a request, canonical and each once; at least one.
fn distinct(cidrs: Vec<IpNet>) -> Result<(Vec<IpNet>, Vec<String>), Failure> {
    if cidrs.is_empty() {
        return Err(Failure::new(ErrorCode::BadRequest, "name at least one network"));
    }
    let mut out = Vec::with_capacity(cidrs.len());
    let mut notes = Vec::new();
    for given in cidrs {
        let (cidr, note) = network(given)?;
        notes.extend(note);
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok((out, notes))
}

/// The set's networks, or `unknown_set`.
fn existing_set(tx: &Tx, set: &str) -> Result<Vec<IpNet>, Failure> {
    if tx.set(set)?.is_none() {
        return Err(unknown_set(set));
    }
    Ok(tx.set_entries(set)?.into_iter().map(|e| e.cidr).collect())
}

pub(super) fn unknown_set(set: &str) -> Failure {
    Failure::new(ErrorCode::UnknownSet, format!("there is no shared set {set}; create it with set add"))
}

/// The set as the transaction holds it.
fn shared_set(tx: &Tx, set: &str, notes: Vec<String>) -> Result<SharedSet, Failure> {
    let row = tx.set(set)?.ok_or_else(|| unknown_set(set))?;
    Ok(SharedSet {
        set: row.name,
        created_at: row.created_at,
        created_by: row.created_by,
        entries: tx.set_entries(set)?,
        references: tx.set_referrers(set)?.into_iter().map(as_reference).collect(),
        notes,
    })
}

pub(super) fn as_reference(r: SetRefRow) -> SetReference {
    SetReference {
        account: r.account,
        set: r.set,
        enabled: r.enabled,
        created_at: r.created_at,
        created_by: r.created_by,
    }
}

/// The account's reference to the set: `unknown_set` without such a set, `unknown_entry`
/// when the account does not reference it.
fn reference(tx: &Tx, account: &str, set: &str) -> Result<SetReference, Failure> {
    if let Some(r) = tx.set_refs(account)?.into_iter().find(|r| r.set == set) {
        return Ok(as_reference(r));
    }
    existing_set(tx, set)?;
    Err(Failure::new(ErrorCode::UnknownEntry, format!("{account} does not reference the set {set}")))
}

/// Refuses, with `too_many_sets`, more enabled references than the kernel holds per account
/// (counted inside the change's transaction, after it).
fn reference_limit(tx: &Tx, account: &str) -> Result<(), Failure> {
    let enabled = tx.set_refs(account)?.iter().filter(|r| r.enabled).count();
    if enabled <= MAX_SETS_PER_ACCOUNT {
        return Ok(());
    }
    Err(Failure::with_details(
        ErrorCode::TooManySets,
        format!(
            "{account} would have {enabled} enabled set references; an account has at most {MAX_SETS_PER_ACCOUNT} \
             (disable or remove one first); nothing was changed"
        ),
        json!({ "account": account, "sets": enabled, "max": MAX_SETS_PER_ACCOUNT }),
    ))
}

/// `set_in_use`: the set is referenced, and the request did not say `force`.
fn in_use(set: &str, referrers: &[SetRefRow]) -> Failure {
    let named: Vec<&str> = referrers.iter().take(LISTED).map(|r| r.account.as_str()).collect();
    let more = if referrers.len() > LISTED { format!(" and {} more", referrers.len() - LISTED) } else { String::new() };
    let accounts: Vec<&str> = referrers.iter().take(DETAILED).map(|r| r.account.as_str()).collect();
    Failure::with_details(
        ErrorCode::SetInUse,
        format!(
            "the set {set} is referenced by {} account{}: {}{more}; remove the references first (allow remove-set), \
             or repeat with --force to remove them too",
            referrers.len(),
            if referrers.len() == 1 { "" } else { "s" },
            named.join(", ")
        ),
        json!({ "set": set, "references": referrers.len(), "accounts": accounts }),
    )
}
