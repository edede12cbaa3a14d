//! What every change shares: the writer lock, the store transaction, the kernel update,
//! and putting the kernel back when the commit fails. Reads, too, go through here.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use ipaccess_common::NEVER_EXPIRES;
use ipnet::IpNet;
use log::warn;
use serde_json::{Value, json};

use super::{Failure, Service, Writer, fleet::TouchedBindings, now, unknown};
use crate::{
    datapath::{self, Datapath, DatapathError},
    logging::{self, PendingAudit},
    policy::{AccountPolicy, ExpiringEntry, LiveOverride, SetUse, split_entries, suspended},
    protocol::Account,
    store::{ActivityRecord, StoreError, Tx},
};

/// An account a change touched, as the change left it.
pub(super) enum Touched {
    /// One that existed: its policy is read back in the change's transaction, and its
    /// sub-users follow it.
    Changed(Account),
    /// One that existed, whose change was to one allowlist entry: its policy is the cached
    /// one with the entry changed, with nothing to read back (the read-back's queries were
    /// an eighth of an `allow add` after an idle spell); an entry never changes how its
    /// sub-users stand.
    EntryChanged(Account, EntryChange),
    /// One the change created, with its allowlist (all enabled): nothing to read back, and
    /// no sub-users but those the same change created.
    Created(Account, Vec<IpNet>),
}

/// One allowlist entry changed, as it changes the account's policy.
pub(super) enum EntryChange {
    /// Added enabled (or an expired one renewed): it lets in until `expires_at`, if set.
    Added {
        cidr: IpNet,
        expires_at: Option<i64>,
    },
    Removed(IpNet),
}

impl EntryChange {
    /// `policy` with the change made, its entries kept in the store's order (by CIDR
    /// text) so that it equals what [`policy_from_store`] would read.
    fn apply(&self, policy: &mut AccountPolicy) {
        let cidr = match *self {
            EntryChange::Added { cidr, .. } | EntryChange::Removed(cidr) => cidr,
        };
        policy.withdraw(cidr);
        if let EntryChange::Added { cidr, expires_at } = *self {
            let text = cidr.to_string();
            match expires_at {
                None => {
                    let at = policy.entries.partition_point(|net| net.to_string() < text);
                    policy.entries.insert(at, cidr);
                }
                Some(expires_at) => {
                    let at = policy.expiring.partition_point(|e| e.cidr.to_string() < text);
                    policy.expiring.insert(at, ExpiringEntry { cidr, expires_at });
                }
            }
        }
    }
}

impl Touched {
    fn into_id(self) -> String {
        match self {
            Touched::Changed(row) | Touched::EntryChanged(row, _) | Touched::Created(row, _) => row.id,
        }
    }
}

impl Service {
    /// Runs `f` in a read transaction on a reader connection: it waits for no change.
    pub(super) fn read<T>(&self, f: impl FnOnce(&Tx) -> Result<T, Failure>) -> Result<T, Failure> {
        self.readers.read(f)
    }

    /// A change to one account (and, through banning, to its sub-users): store, then
    /// kernel, then commit; on any failure nothing is left changed. `f` returns the account
    /// as changed and the reply.
    pub(super) fn change<T>(
        &self,
        account: &str,
        f: impl FnOnce(&Tx) -> Result<(Account, T), Failure>,
    ) -> Result<T, Failure> {
        // The lockout guard and a grant read the account's recent sign-ins: those answered
        // before this change must be in the store first (and reach the log before its audit
        // record). Only this account's: flushing everyone's costs a durable write per change.
        self.activity.flush_account(account);
        self.change_accounts(|tx| {
            let (row, reply) = f(tx)?;
            debug_assert_eq!(row.id, account);
            Ok((vec![Touched::Changed(row)], reply))
        })
    }

    /// A change to one entry of one account's allowlist: as [`Service::change`], with the
    /// account's new policy made from the cached one (see [`Touched::EntryChanged`]).
    pub(super) fn change_entry<T>(
        &self,
        account: &str,
        f: impl FnOnce(&Tx) -> Result<(Account, EntryChange, T), Failure>,
    ) -> Result<T, Failure> {
        self.activity.flush_account(account);
        self.change_accounts(|tx| {
            let (row, change, reply) = f(tx)?;
            debug_assert_eq!(row.id, account);
            Ok((vec![Touched::EntryChanged(row, change)], reply))
        })
    }

    /// A change to the accounts `f` returns (after it ran: as changed) and, if they are
    /// parents, to their sub-users. The cache is not copied: the accounts' new versions are
    /// built beside it and moved in once the change is committed.
    pub(super) fn change_accounts<T>(
        &self,
        f: impl FnOnce(&Tx) -> Result<(Vec<Touched>, T), Failure>,
    ) -> Result<T, Failure> {
        if let Some(cluster) = self.fleet() {
            return self.submit(cluster, TouchedBindings::None, None, |tx| {
                let (rows, reply) = f(tx)?;
                Ok((rows.into_iter().map(Touched::into_id).collect(), reply))
            });
        }
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let (rows, reply) = f(&tx)?;
        let at = now();
        // Only holders of the writer lock replace the cache, so until the end it holds the
        // previous state, which a failure puts back into the kernel.
        let cache = self.accounts.read().expect("cache lock");
        let mut updated: HashMap<String, AccountPolicy> = HashMap::with_capacity(rows.len());
        let mut children = Vec::new();
        for touched in rows {
            let (id, policy) = match touched {
                Touched::Changed(row) => {
                    // A suspension reaches every account below, however deep an older store
                    // nests them.
                    children.extend(tx.descendants(&row.id)?);
                    let policy = policy_from_store(&tx, &row, at)?;
                    (row.id, policy)
                }
                Touched::EntryChanged(row, change) => {
                    let policy = match cache.get(&row.id) {
                        Some(cached) => {
                            // The account's own fields from its row, as a read-back takes them.
                            let mut policy = AccountPolicy {
                                slot: row.slot,
                                parent: row.parent,
                                state: row.state,
                                mode: row.mode,
                                ..cached.clone()
                            };
                            change.apply(&mut policy);
                            policy
                        }
                        None => policy_from_store(&tx, &row, at)?,
                    };
                    (row.id, policy)
                }
                Touched::Created(row, entries) => {
                    let policy = AccountPolicy {
                        slot: row.slot,
                        parent: row.parent,
                        state: row.state,
                        mode: row.mode,
                        entries,
                        expiring: Vec::new(),
                        overrides: Vec::new(),
                        sets: Vec::new(),
                    };
                    (row.id, policy)
                }
            };
            updated.insert(id, policy);
        }
        let next = |id: &str| updated.get(id).or_else(|| cache.get(id));
        let mut affected: Vec<&str> = updated.keys().map(String::as_str).collect();
        affected.extend(children.iter().map(String::as_str).filter(|id| !updated.contains_key(*id)));
        let applied = affected.iter().try_for_each(|&id| {
            let account = next(id).expect("affected accounts exist");
            apply_account(datapath, account, suspended(next, id))
        });
        let committed = applied.map_err(Failure::from).and_then(|()| Ok(tx.commit_counted()?));
        let count = match committed {
            Ok(count) => count,
            Err(e) => {
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
        };
        record_commit(datapath, count);
        drop(cache);
        self.accounts.write().expect("cache lock").extend(updated);
        pending_audit.committed();
        Ok(reply)
    }

    /// A change to the bindings at `addrs`: `f` changes the store, then the kernel's keys
    /// for those addresses are rewritten from it, then the change commits (the keys are put
    /// back if that fails). Only those addresses' bindings are read and compared, so the
    /// change costs the same however many bindings the host has.
    pub(super) fn change_bindings<T>(
        &self,
        addrs: &BTreeSet<IpAddr>,
        f: impl FnOnce(&Tx) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        if let Some(cluster) = self.fleet() {
            return self.submit(cluster, TouchedBindings::At(addrs), None, |tx| Ok((Vec::new(), f(tx)?)));
        }
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let result = f(&tx)?;
        let cache = self.accounts.read().expect("cache lock");
        let slot = |id: &str| cache.get(id).map(|a| a.slot);
        let wanted = super::bindings::for_kernel(&tx.bindings_at(addrs)?, self.node.as_deref(), slot);
        let before = datapath.bindings_at(addrs);
        datapath.set_bindings_at(addrs, &wanted)?;
        match tx.commit_counted() {
            Ok(count) => record_commit(datapath, count),
            Err(e) => {
                if let Err(undo) = datapath.set_bindings_at(addrs, &before) {
                    warn!("could not restore the kernel's bindings after a failed commit: {undo}");
                }
                return Err(e.into());
            }
        }
        pending_audit.committed();
        Ok(result)
    }

    /// Removes accounts (`account` and sub-users of it, listed deepest first) from the
    /// store and the kernel: bindings first, so that no endpoint points at a slot being
    /// cleared. `f` runs first, in the same transaction, and returns the ids to remove.
    pub(super) fn remove_accounts(
        &self,
        account: &str,
        f: impl FnOnce(&Tx) -> Result<Vec<String>, Failure>,
    ) -> Result<Vec<String>, Failure> {
        self.activity.flush();
        if let Some(cluster) = self.fleet() {
            return self.submit(cluster, TouchedBindings::OfTree(account), None, |tx| {
                let removed = f(tx)?;
                for id in &removed {
                    tx.remove_account(id)?;
                }
                Ok((removed.clone(), removed))
            });
        }
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        let removed = f(&tx)?;
        for id in &removed {
            tx.remove_account(id)?;
        }
        let cache = self.accounts.read().expect("cache lock");
        let slot = |id: &str| cache.get(id).map(|a| a.slot);
        // The kernel's keys that change are those at the removed accounts' addresses.
        let addrs: BTreeSet<IpAddr> =
            removed.iter().filter_map(|id| slot(id)).flat_map(|s| datapath.binding_addresses_of(s)).collect();
        let wanted = super::bindings::for_kernel(&tx.bindings_at(&addrs)?, self.node.as_deref(), slot);
        let before = datapath.bindings_at(&addrs);
        let applied = datapath
            .set_bindings_at(&addrs, &wanted)
            .and_then(|()| removed.iter().filter_map(|id| slot(id)).try_for_each(|s| datapath.remove_account(s)))
            .map_err(Failure::from)
            .and_then(|()| Ok(tx.commit_counted()?));
        let count = match applied {
            Ok(count) => count,
            Err(e) => {
                for id in &removed {
                    if let Some(previous) = cache.get(id)
                        && let Err(undo) = apply_account(datapath, previous, suspended(|p| cache.get(p), id))
                    {
                        warn!("could not restore account {id} in the kernel: {undo}");
                    }
                }
                if let Err(undo) = datapath.set_bindings_at(&addrs, &before) {
                    warn!("could not restore the kernel's bindings after a failed removal: {undo}");
                }
                return Err(e);
            }
        };
        record_commit(datapath, count);
        drop(cache);
        let mut cache = self.accounts.write().expect("cache lock");
        for id in &removed {
            cache.remove(id);
        }
        pending_audit.committed();
        Ok(removed)
    }
}

/// Records in the kernel the store's commit count of the policy it now enforces (see
/// [`crate::store::Tx::commit_counted`]; `None`: the commit changed nothing). A failure
/// leaves an older count there, which only makes a lost store harder to notice at start.
pub(super) fn record_commit(datapath: &mut Datapath, count: Option<u64>) {
    if let Some(count) = count
        && let Err(e) = datapath.set_store_commits(count)
    {
        warn!("could not record the store's commit count in the kernel: {e}");
    }
}

/// Writes one account's allowlist (entries and live overrides) and policy to the kernel.
pub(super) fn apply_account(
    datapath: &mut Datapath,
    account: &AccountPolicy,
    suspended: bool,
) -> Result<(), DatapathError> {
    let mut entries: Vec<(IpNet, u64)> = account.entries.iter().map(|&net| (net, NEVER_EXPIRES)).collect();
    // Overrides and expiring entries end in the kernel on their own: their expiry moves to
    // the kernel's clock.
    // Measured to the nanosecond: in whole seconds the kernel could let in up to a second
    // after the checks stop.
    let unix_now_ns = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i128);
    let boot_now = datapath::boot_time_ns();
    let timed = account.overrides.iter().map(|o| (o.cidr, o.expires_at));
    let timed = timed.chain(account.expiring.iter().map(|e| (e.cidr, e.expires_at)));
    for (net, expires) in timed {
        if let Some(expires) = kernel_expiry(expires, unix_now_ns, boot_now) {
            entries.push((net, expires));
        }
    }
    // One key holds one expiry: where an entry and an override share a network, the later.
    entries.sort_unstable_by_key(|&(net, expires)| (net, std::cmp::Reverse(expires)));
    entries.dedup_by_key(|&mut (net, _)| net);
    datapath.set_allowlist(account.slot, &entries)?;
    let sets: Vec<u32> = account.sets.iter().map(|s| s.kernel_id).collect();
    datapath.set_account_sets(account.slot, &sets)?;
    datapath.set_policy(account.slot, account.mode, suspended)
}

/// When, by the kernel's boot clock (`boot_now` now), something that ends at `expires_at`
/// (Unix seconds) ends: `None` if it has ended. An end past the boot clock's range (a
/// document written by hand, say) is never: cut short, it would wrap to an arbitrary time.
fn kernel_expiry(expires_at: i64, unix_now_ns: i128, boot_now: u64) -> Option<u64> {
    let left = i128::from(expires_at) * 1_000_000_000 - unix_now_ns;
    (left > 0).then(|| u64::try_from(left).map_or(NEVER_EXPIRES, |left| boot_now.saturating_add(left)))
}

/// Records a change in the activity log, in the change's own transaction, and in the
/// daemon's log once it commits.
pub(super) fn audit(tx: &Tx, account: &str, uid: u32, action: &str, detail: Value) -> Result<(), StoreError> {
    let mut detail = detail;
    detail["uid"] = json!(uid);
    detail["action"] = json!(action);
    logging::audit(account, uid, action, &detail);
    let record = ActivityRecord { time: now(), account: account.to_string(), uid, action: action.to_string(), detail };
    tx.add_activity(&[record])
}

/// The account's policy as a change would leave it, read inside the change's transaction.
pub(super) fn policy_from_store(tx: &Tx, row: &Account, now: i64) -> Result<AccountPolicy, Failure> {
    let (entries, expiring) =
        split_entries(tx.entries(&row.id)?.iter().map(|e| (e.cidr, e.enabled, e.expires_at)), now);
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
        expiring,
        overrides,
        sets: enabled_sets(tx, &row.id)?,
    })
}

/// The account's enabled set references, as this transaction sees them.
pub(super) fn enabled_sets(tx: &Tx, account: &str) -> Result<Vec<SetUse>, StoreError> {
    Ok(tx
        .set_refs(account)?
        .into_iter()
        .filter(|r| r.enabled)
        .map(|r| SetUse { name: r.set, kernel_id: r.kernel_id })
        .collect())
}

/// The account's row, or `unknown_account`.
pub(super) fn existing(tx: &Tx, account: &str) -> Result<Account, Failure> {
    tx.account(account)?.ok_or_else(|| unknown(account))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        protocol::{AccountState, Mode},
        store::Store,
    };

    /// An entry change made to the cached policy gives what reading the policy back from the
    /// store after the same change gives, through adds, renewals, expiring entries,
    /// disabled ones and removals, with CIDR texts that sort apart from their numbers.
    #[test]
    fn an_entry_change_to_the_cached_policy_equals_the_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let tx = store.transaction().unwrap();
        tx.add_account("acme", None, AccountState::Active, Mode::Enforce, 0).unwrap();
        for cidr in ["198.18.10.0/24", "198.18.9.0/24", "fd00::/64", "198.18.2.0/24"] {
            tx.add_entry("acme", net(cidr), None, 0, 1).unwrap();
        }
        tx.set_entry_enabled("acme", net("198.18.2.0/24"), false).unwrap();
        tx.add_entry("acme", net("198.18.100.0/24"), None, 0, 1).unwrap();
        tx.set_entry_expiry("acme", net("198.18.100.0/24"), Some(5)).unwrap();
        let row = tx.account("acme").unwrap().unwrap();
        let mut cached = policy_from_store(&tx, &row, 10).unwrap();
        let steps = [
            ("198.18.1.0/24", Some(None)),
            ("198.18.99.7/32", Some(Some(50))),
            ("198.18.100.0/24", Some(Some(60))), // an expired one renewed
            ("198.18.9.0/24", None),
            ("198.18.2.0/24", None), // a disabled one removed
            ("fd00:1::/64", Some(None)),
            ("198.18.100.0/24", None),
            ("198.18.9.0/24", Some(Some(70))),
        ];
        for (cidr, added) in steps {
            let cidr = net(cidr);
            let change = match added {
                Some(expires_at) => {
                    tx.remove_entry("acme", cidr).unwrap();
                    tx.add_entry("acme", cidr, None, 0, 10).unwrap();
                    tx.set_entry_expiry("acme", cidr, expires_at).unwrap();
                    EntryChange::Added { cidr, expires_at }
                }
                None => {
                    assert!(tx.remove_entry("acme", cidr).unwrap());
                    EntryChange::Removed(cidr)
                }
            };
            change.apply(&mut cached);
            assert_eq!(cached, policy_from_store(&tx, &row, 10).unwrap(), "after {cidr}");
        }
        assert_eq!(cached.entries.len(), 4);
        assert_eq!(cached.expiring.len(), 2);
    }

    /// Ends move to the kernel's clock to the nanosecond; an end too far off for it does not
    /// wrap to an earlier one.
    #[test]
    fn an_end_moves_to_the_boot_clock_without_wrapping() {
        let now_s = 1_800_000_000i64;
        let now_ns = i128::from(now_s) * 1_000_000_000 + 250;
        let boot = 5_000_000_000u64;
        assert_eq!(kernel_expiry(now_s + 10, now_ns, boot), Some(boot + 10_000_000_000 - 250));
        assert_eq!(kernel_expiry(now_s, now_ns, boot), None, "ended");
        assert_eq!(kernel_expiry(now_s - 3_600, now_ns, boot), None);
        // More than about 584 years ahead: more nanoseconds than a u64 holds.
        assert_eq!(kernel_expiry(now_s + 19_000_000_000, now_ns, boot), Some(NEVER_EXPIRES));
        assert_eq!(kernel_expiry(i64::MAX, now_ns, boot), Some(NEVER_EXPIRES));
        // Within range but past the boot clock's end once added: as late as it goes.
        assert_eq!(kernel_expiry(now_s + 10, now_ns, u64::MAX - 5), Some(u64::MAX));
    }
}
