//! The service as a fleet node: changes go to etcd instead of the local store, and what
//! etcd holds comes back through the watch into the store, the kernel and the cache.
//!
//! A change runs exactly as on a single host, with every check, in a store transaction;
//! that transaction is then rolled back, and the documents it left become one etcd
//! transaction, guarded by "none of these keys changed after the revision my copy has"
//! (see `cluster::keys` for why that is each rule's check). The change is acknowledged
//! once this node's watch has applied it: committed in etcd and enforced here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use log::{error, info, warn};

use super::{Failure, Service, Writer, change::apply_account, now};
use crate::datapath::Datapath;
use ipaccess_common::MAX_SETS;

use crate::{
    cluster::{self, BindingValue, Change, Cluster, Committed, Guard, Replica, Snapshot, Unit, Write},
    logging::PendingAudit,
    policy::{AccountPolicy, MAX_ANCESTRY, SetPolicy, suspended},
    protocol::{Binding, ErrorCode},
    store::{SetDoc, StoreError, Tx},
};

/// The bindings a change submitted to the fleet may change: the copy's bindings there are
/// read before and after it, and what differs is written to etcd.
pub(super) enum TouchedBindings<'a> {
    None,
    /// Those at these addresses.
    At(&'a BTreeSet<IpAddr>),
    /// Those of an account and its sub-users (the account's removal).
    OfTree(&'a str),
}

impl Service {
    pub(super) fn fleet(&self) -> Option<&Cluster> {
        self.cluster.get().map(|c| &**c)
    }

    /// Makes this service a node of `cluster`: from now on changes go through etcd.
    pub fn join(&self, cluster: std::sync::Arc<Cluster>) -> Result<(), StoreError> {
        // Remembered for the way back: a host that leaves the fleet keeps the bindings that
        // were scoped to it ([`Service::leave_fleet`]).
        let mut guard = self.writer.lock().expect("writer lock");
        let tx = guard.store.transaction()?;
        tx.set_node_name(cluster.node())?;
        tx.commit()?;
        if self.cluster.set(cluster).is_err() {
            warn!("this node already belongs to a cluster");
        }
        Ok(())
    }

    /// The etcd revision the local copy has applied (0: none).
    pub fn applied_revision(&self) -> Result<i64, StoreError> {
        self.readers.read(|tx| tx.applied_revision())
    }

    /// Runs a change against the local copy without keeping it, and writes what it left to
    /// etcd. `f` returns the accounts it touched (created, changed or removed) and the reply;
    /// `bindings` says which bindings it may change (only those are compared).
    /// `set` names the shared set it may change, if any.
    pub(super) fn submit<T>(
        &self,
        cluster: &Cluster,
        bindings: TouchedBindings,
        set: Option<&str>,
        f: impl FnOnce(&Tx) -> Result<(Vec<String>, T), Failure>,
    ) -> Result<T, Failure> {
        // A node that has just started, or reconnected, takes the fleet's policy within
        // moments: a change sent meanwhile waits for it rather than being refused.
        let step = cluster.wait_in_step();
        let mut guard = self.writer.lock().expect("writer lock");
        let pending_audit = PendingAudit::begin();
        let tx = guard.store.transaction()?;
        // Only the writer lock's holder applies the watch, so this revision holds while the
        // change runs against the copy.
        let applied = tx.applied_revision()?;
        if applied == 0 {
            return Err(not_following(&tx, cluster)?);
        }
        // The copy's revision counts in etcd's history only if the node is still in the
        // stretch in step it waited for (a resync in between would be a new one).
        let Some(step) = step.filter(|&step| step == cluster.step()) else {
            return Err(cluster::unavailable(
                "this node is reconnecting to etcd and has not taken its policy again yet",
            ));
        };
        let marks = tx.marks()?;
        let addrs = match bindings {
            TouchedBindings::None => None,
            TouchedBindings::At(addrs) => Some(addrs.clone()),
            TouchedBindings::OfTree(account) => {
                let mut tree = tx.descendants(account)?;
                tree.push(account.to_owned());
                let mut addrs = BTreeSet::new();
                for id in &tree {
                    addrs.extend(tx.bindings_of(id)?.into_iter().map(|b| b.addr));
                }
                Some(addrs)
            }
        };
        // The addresses whose bindings this node's kernel must take before the change is
        // acknowledged here, as the accounts touched must be.
        let binding_subjects: Vec<String> = addrs.iter().flatten().map(binding_subject).collect();
        let before = addrs.map(|addrs| Ok::<_, StoreError>((tx.bindings_at(&addrs)?, addrs))).transpose()?;
        let (touched, reply) = f(&tx)?;
        let units = self.transaction(cluster, &tx, marks, &touched, before, set)?;
        drop(tx);
        // etcd's answer is not waited for under the lock. The transaction's guards compare
        // with `applied`, the revision the change was checked at, whatever the store applies
        // meanwhile; holding the lock would only queue this node's other changes behind
        // etcd's round trip, and keep the watch from applying this one (its event usually
        // arrives before etcd's answer does).
        drop(guard);
        let committed = cluster.commit_units(units, applied, Some(step));
        match committed? {
            Committed::At(revision) => {
                if !cluster.wait_enforced(revision) {
                    return Err(Failure::new(
                        ErrorCode::Internal,
                        format!(
                            "the change is committed in the fleet (revision {revision}) but this node has not applied it \
                             yet; see its log"
                        ),
                    ));
                }
                pending_audit.committed();
                let mut enforced_here = touched;
                enforced_here.extend(set.map(super::sets::set_subject));
                enforced_here.extend(binding_subjects);
                self.refused_here(&enforced_here, revision)?;
                Ok(reply)
            }
            Committed::Conflict(revision) => {
                cluster.wait_applied(revision);
                Err(cluster::conflict())
            }
            Committed::Partial { revision, done, parts } => {
                cluster.wait_enforced(revision);
                pending_audit.committed();
                Err(cluster::partial(done, parts, set))
            }
        }
    }

    /// `tables_full` if this node's kernel refused one of `accounts` (or a set, `set:NAME`)
    /// as the fleet has it since `revision` (a change of ours committed then): the fleet has
    /// the change, but it is not enforced here, so it is not acknowledged as if it were.
    fn refused_here(&self, accounts: &[String], revision: i64) -> Result<(), Failure> {
        let unenforced = self.unenforced.lock().expect("unenforced lock");
        let Some((id, _)) =
            accounts.iter().find_map(|id| unenforced.get_key_value(id).filter(|(_, r)| **r >= revision))
        else {
            return Ok(());
        };
        Err(Failure::with_details(
            ErrorCode::TablesFull,
            format!(
                "the change is committed in the fleet (revision {revision}), but this node's kernel tables have no room \
                 for {}: this node keeps enforcing what it enforced before (raise [maps] slots, or remove entries)",
                describe_subject(id)
            ),
            // A client must not read this `tables_full` as "nothing was changed".
            serde_json::json!({ "committed_revision": revision }),
        ))
    }

    /// Enforces again what this node's kernel refused from the fleet (full tables): room may
    /// have been made since, by entries or accounts removed. Run by the sweep, under the
    /// writer lock, so the kernel meets each refused account or set every ten seconds rather
    /// than only when the fleet next changes it. A set that found no kernel id cannot be
    /// put from here (the store holds no copy of it): once an id is free, this node asks for
    /// a resync, which takes it from etcd.
    pub(super) fn retry_unenforced(&self, tx: &Tx, datapath: &mut Datapath) -> Result<(), StoreError> {
        let mut unenforced = self.unenforced.lock().expect("unenforced lock");
        if unenforced.is_empty() {
            return Ok(());
        }
        let sets = self.sets.read().expect("set cache lock");
        let accounts = self.accounts.read().expect("cache lock");
        // Sets before accounts: an account's reference then finds its set in the kernel.
        let mut subjects: Vec<String> = unenforced.keys().filter(|s| binding_address(s).is_none()).cloned().collect();
        subjects.sort_by_key(|s| (!s.starts_with(super::sets::SET_SUBJECT), s.clone()));
        for subject in subjects {
            let result = match subject.strip_prefix(super::sets::SET_SUBJECT) {
                Some(name) => match sets.get(name) {
                    Some(set) => datapath.set_shared_set(set.kernel_id, &set.entries),
                    None => {
                        if sets.len() < MAX_SETS as usize - 1 {
                            self.resync_wanted.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        continue;
                    }
                },
                None => match accounts.get(&subject) {
                    Some(policy) => apply_account(datapath, policy, suspended(|a| accounts.get(a), &subject)),
                    // Gone since: nothing of it is left to enforce.
                    None => {
                        unenforced.remove(&subject);
                        continue;
                    }
                },
            };
            match result {
                Ok(()) => {
                    info!("cluster: {} is now enforced here as the fleet has it", describe_subject(&subject));
                    unenforced.remove(&subject);
                }
                Err(e) => warn!("cluster: {} is still not enforced here: {e}", describe_subject(&subject)),
            }
        }
        // Then bindings, as at start: every address still behind, in one write.
        let addrs: BTreeSet<IpAddr> = unenforced.keys().filter_map(|s| binding_address(s)).collect();
        if !addrs.is_empty() {
            let slot = |id: &str| accounts.get(id).map(|a| a.slot);
            let wanted = super::bindings::for_kernel(&tx.bindings_at(&addrs)?, self.node.as_deref(), slot);
            match datapath.set_bindings_at(&addrs, &wanted) {
                Ok(()) => {
                    info!(
                        "cluster: the bindings at {} are now enforced here as the fleet has them",
                        describe_addrs(&addrs)
                    );
                    unenforced.retain(|s, _| binding_address(s).is_none());
                }
                Err(e) => warn!("cluster: the bindings at {} are still not enforced here: {e}", describe_addrs(&addrs)),
            }
        }
        Ok(())
    }

    /// The accounts, sets (`set:NAME`) and bound addresses (`bind:ADDR`) this node's kernel
    /// does not enforce as the fleet has them, by name.
    pub(super) fn unenforced(&self) -> Vec<String> {
        let mut names: Vec<String> = self.unenforced.lock().expect("unenforced lock").keys().cloned().collect();
        names.sort();
        names
    }

    /// What `tx` holds now, as the units of an etcd transaction: for each key written, the
    /// keys whose change since the local copy's revision would invalidate it.
    fn transaction(
        &self,
        cluster: &Cluster,
        tx: &Tx,
        marks: crate::store::Marks,
        touched: &[String],
        bindings_before: Option<(Vec<Binding>, BTreeSet<IpAddr>)>,
        set: Option<&str>,
    ) -> Result<Vec<Unit>, Failure> {
        let keys = cluster.keys();
        let at = now();
        let set_unit = set.map(|name| self.set_unit(cluster, tx, name)).transpose()?;
        let cache = self.accounts.read().expect("cache lock");
        // An account this copy has must still exist unchanged; one it lacks must still be
        // absent (a deleted key compares as never written, so existence is checked apart).
        let known = |id: &str| {
            let key = keys.account(id);
            if cache.contains_key(id) { Guard::Existing(key) } else { Guard::Key(key) }
        };
        let mut accounts: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut touch = |id: &str, accounts: &mut Vec<String>| {
            if seen.insert(id.to_owned()) {
                accounts.push(id.to_owned());
            }
        };
        for id in touched {
            touch(id, &mut accounts);
        }
        let mut binding_units = Vec::new();
        if let Some((bindings_before, addrs)) = bindings_before {
            let after = tx.bindings_at(&addrs)?;
            // One key per endpoint and scope.
            let endpoint = |b: &Binding| (b.addr, b.target, cluster::keys::scope_of(b).to_owned());
            let old: HashMap<_, &Binding> = bindings_before.iter().map(|b| (endpoint(b), b)).collect();
            let new: HashMap<_, &Binding> = after.iter().map(|b| (endpoint(b), b)).collect();
            for ((addr, target, scope), gone) in &old {
                let (addr, target) = (*addr, *target);
                if new.get(&(addr, target, scope.clone())).is_none_or(|b| b.account != gone.account) {
                    let key = keys.binding(addr, target, scope);
                    binding_units.push(Unit {
                        guards: vec![Guard::Existing(key.clone())],
                        writes: vec![Write::Delete(key)],
                        audit: Vec::new(),
                    });
                }
            }
            for ((addr, target, scope), &binding) in &new {
                let (addr, target) = (*addr, *target);
                if old.get(&(addr, target, scope.clone())).is_none_or(|b| b.account != binding.account) {
                    // An endpoint has one owner in every scope: no key of it may have
                    // appeared since the local copy's revision. The owner's document is
                    // rewritten too (below), so a concurrent removal of the owner conflicts.
                    let (start, end) = keys.endpoint_range(addr, target);
                    let value = serde_json::to_vec(&BindingValue::of(binding)).expect("a binding serializes");
                    binding_units.push(Unit {
                        guards: vec![Guard::Range(start, end), known(&binding.account)],
                        writes: vec![Write::Put(keys.binding(addr, target, scope), value)],
                        audit: Vec::new(),
                    });
                    if tx.account(&binding.account)?.is_some() {
                        touch(&binding.account, &mut accounts);
                    }
                }
            }
        }
        // A new sub-user rewrites its parent's document too, for the same reason.
        let mut parent_of = HashMap::new();
        for id in accounts.clone() {
            if !cache.contains_key(&id)
                && let Some(row) = tx.account(&id)?
                && let Some(parent) = row.parent
            {
                touch(&parent, &mut accounts);
                parent_of.insert(id, parent);
            }
        }
        let mut units = Vec::with_capacity(accounts.len() + binding_units.len() + 2);
        for id in &accounts {
            let key = keys.account(id);
            let mut unit = Unit { guards: vec![known(id)], ..Unit::default() };
            if let Some(parent) = parent_of.get(id) {
                unit.guards.push(known(parent));
            }
            match tx.account_doc(id, at)? {
                Some(doc) => {
                    // Its references were checked against the sets as this copy has them
                    // (that each exists; its lockout check counts their networks).
                    unit.guards.extend(doc.sets.iter().map(|r| Guard::Existing(keys.set(&r.set))));
                    if cache.get(id).is_none_or(|known| known.slot != doc.slot) {
                        let slot = keys.slot(doc.slot);
                        unit.guards.push(Guard::Key(slot.clone()));
                        unit.writes.push(Write::Put(slot, id.as_bytes().to_vec()));
                    }
                    unit.writes.push(Write::Put(key, cluster::keys::encode(&doc)));
                }
                None => {
                    unit.writes.push(Write::Delete(key));
                    if let Some(known) = cache.get(id) {
                        let slot = keys.slot(known.slot);
                        unit.guards.push(Guard::Existing(slot.clone()));
                        unit.writes.push(Write::Delete(slot));
                    }
                }
            }
            units.push(unit);
        }
        // A set before the accounts, so that a new reference never names a set a node
        // applying the parts in order lacks; a deleted set after them, so that a change
        // written in parts (a forced delete of a set hundreds reference) never leaves etcd
        // with references to a set it no longer holds. A set losing networks holds every
        // account's document in every part (see `set_unit`).
        let mut set_at = None;
        if let Some(unit) = set_unit {
            let ranges: Vec<Guard> = unit.guards.iter().filter(|g| matches!(g, Guard::Range(..))).cloned().collect();
            for account in &mut units {
                account.guards.extend(ranges.iter().cloned());
            }
            let deleted = unit.writes.iter().any(|w| matches!(w, Write::Delete(_)));
            let at = if deleted { units.len() } else { 0 };
            units.insert(at, unit);
            set_at = Some(at);
        }
        let first_account = usize::from(set_at == Some(0));
        // Bindings after the accounts they name, so a node applying the events in order
        // never meets a binding to an account it does not have yet.
        units.extend(binding_units);
        let last_override = tx.last_override()?;
        if last_override > marks.last_override {
            // Override ids are the fleet's: two nodes granting at once must not pick the same.
            let key = keys.override_sequence();
            units.push(Unit {
                guards: vec![Guard::Key(key.clone())],
                writes: vec![Write::Put(key, last_override.to_string().into_bytes())],
                audit: Vec::new(),
            });
        }
        // Each audit record goes with its account's unit (so with the part that writes it);
        // the rest (a set's, under `set:NAME`) with the first.
        let mut unit_of: HashMap<&str, usize> =
            accounts.iter().enumerate().map(|(i, id)| (id.as_str(), first_account + i)).collect();
        let subject = set.map(super::sets::set_subject);
        if let (Some(subject), Some(at)) = (&subject, set_at) {
            unit_of.insert(subject.as_str(), at);
        }
        for record in tx.audit_since(marks)? {
            let at = unit_of.get(record.account.as_str()).copied().unwrap_or(0);
            if units.is_empty() {
                units.push(Unit::default());
            }
            let last = units.len() - 1;
            units[at.min(last)].audit.push(record);
        }
        Ok(units)
    }

    /// The unit of a change to shared set `name`: its document as `tx` leaves it (or its
    /// deletion). A set that loses networks (or goes) holds every account's document too:
    /// whatever an account changed meanwhile was checked against the set as it was.
    fn set_unit(&self, cluster: &Cluster, tx: &Tx, name: &str) -> Result<Unit, Failure> {
        let keys = cluster.keys();
        let key = keys.set(name);
        let before = self.sets.read().expect("set cache lock").get(name).cloned();
        let after = tx.set_doc(name)?;
        let mut unit = Unit::default();
        unit.guards.push(if before.is_some() { Guard::Existing(key.clone()) } else { Guard::Key(key.clone()) });
        // A set holds up to 10,000 networks: compared through a hash set, not pair by pair.
        // A deletion holds the accounts even when the set is empty: a reference made
        // meanwhile would name a set that is gone.
        let lost = before.as_ref().is_some_and(|before| match &after {
            None => true,
            Some(after) => {
                let kept: HashSet<ipnet::IpNet> = after.entries.iter().map(|e| e.cidr).collect();
                before.entries.iter().any(|c| !kept.contains(c))
            }
        });
        if lost {
            let (start, end) = keys.accounts_range();
            unit.guards.push(Guard::Range(start, end));
        }
        match after {
            Some(doc) => {
                let value = serde_json::to_vec(&doc).expect("a set serializes");
                if value.len() > cluster::MAX_DOCUMENT_BYTES {
                    return Err(Failure::with_details(
                        ErrorCode::TooManyEntries,
                        format!(
                            "the set {name} would take {} bytes in etcd; a fleet keeps a set in one key of at most {} \
                             bytes (about 10,000 networks with short labels); nothing was changed",
                            value.len(),
                            cluster::MAX_DOCUMENT_BYTES
                        ),
                        serde_json::json!({
                            "set": name, "entries": doc.entries.len(), "limit": "max_document_bytes",
                            "bytes": value.len(), "max": cluster::MAX_DOCUMENT_BYTES,
                        }),
                    ));
                }
                unit.writes.push(Write::Put(key, value));
            }
            None => unit.writes.push(Write::Delete(key)),
        }
        Ok(unit)
    }

    /// Applies a batch of the fleet's changes to the store, the kernel and the cache, under
    /// the writer lock, and records `revision`. The kernel cannot refuse what the fleet has
    /// committed: a failure there is logged and counted, and the store still follows etcd.
    fn apply_locked(&self, writer: &mut Writer, changes: Vec<Change>, revision: i64) -> Result<(), StoreError> {
        let Writer { store, datapath } = writer;
        let tx = store.transaction()?;
        let at = now();
        let changes = in_order(changes);
        // The policy of each account put comes from its document, as the store now holds
        // it: no reading back. A resync's batch holds every account: maps, not lists.
        let (mut updated, mut removed) = (HashMap::new(), Vec::new());
        // Where bindings changed: the kernel's keys there are rewritten.
        let mut binding_addrs = BTreeSet::new();
        let mut removed_set = HashSet::new();
        // Shared sets put (with this node's kernel id for each) and removed (with the id
        // they had); accounts that lost a reference with a removed set.
        let (mut sets_put, mut sets_removed, mut dereferenced) = (HashMap::new(), Vec::new(), Vec::new());
        let mut failures = 0;
        // Slots first: an account the fleet removed and made again while this node was away
        // (or within this batch) may have taken a slot another account still holds here, and
        // that account may have moved to the first one's (a swap). Every account that moves
        // leaves its slot before any is written (removals have freed theirs by then).
        for change in &changes {
            if let Change::Account(id, Some(doc)) = change {
                tx.release_slot(id, doc.slot)?;
            }
        }
        let mut unenforced = self.unenforced.lock().expect("unenforced lock");
        for change in changes {
            match change {
                Change::Set(name, Some(doc)) => match tx.put_set_doc(&name, &doc, MAX_SETS)? {
                    Some(kernel_id) => {
                        let entries = doc.entries.iter().map(|e| e.cidr).collect();
                        sets_put.insert(name, SetPolicy { kernel_id, entries });
                    }
                    None => {
                        error!(
                            "cluster: the set {name} cannot be enforced here (revision {revision}): this node's kernel \
                             holds {} sets",
                            MAX_SETS - 1
                        );
                        unenforced.insert(super::sets::set_subject(&name), revision);
                        failures += 1;
                    }
                },
                Change::Set(name, None) => {
                    if let Some(row) = tx.set(&name)? {
                        dereferenced.extend(tx.remove_set_doc(&name)?);
                        sets_put.remove(&name);
                        sets_removed.push((name, row.kernel_id));
                    }
                }
                Change::Account(id, None) => {
                    if tx.account(&id)?.is_some() {
                        // Sub-users go first: the fleet removes them in the same transaction.
                        for child in tx.descendants(&id)?.into_iter().rev() {
                            tx.remove_account(&child)?;
                            removed_set.insert(child.clone());
                            removed.push(child);
                        }
                        tx.remove_account(&id)?;
                        updated.remove(&id);
                        removed_set.insert(id.clone());
                        removed.push(id);
                    }
                }
                Change::Account(id, Some(doc)) => {
                    tx.put_account_doc(&id, &doc, at)?;
                    if removed_set.remove(&id) {
                        removed.retain(|r| r != &id);
                    }
                    let mut policy = doc.policy(at);
                    policy.sets = super::change::enabled_sets(&tx, &id)?;
                    updated.insert(id, policy);
                }
                Change::Binding(binding, true) => {
                    if tx.account(&binding.account)?.is_some() {
                        tx.put_binding(&binding)?;
                        binding_addrs.insert(binding.addr);
                    } else {
                        warn!("cluster: a binding names account {} which this node does not have", binding.account);
                    }
                }
                Change::Binding(binding, false) => {
                    let node = binding.node.as_deref();
                    if tx.remove_binding_on(binding.addr, binding.target, node)?.is_some() {
                        binding_addrs.insert(binding.addr);
                    }
                }
                Change::Audit(records) => tx.add_activity(&records)?,
                Change::OverrideSequence(n) => tx.raise_override_sequence(n)?,
            }
        }
        tx.set_applied_revision(revision)?;
        let cache = self.accounts.read().expect("cache lock");
        // Accounts whose reference went with its set (the fleet drops references first, so
        // these are only a damaged or hand-written fleet's): enforced without it.
        for id in dereferenced {
            if let (false, Some(policy)) = (updated.contains_key(&id), cache.get(&id)) {
                let mut policy = policy.clone();
                policy.sets = super::change::enabled_sets(&tx, &id)?;
                updated.insert(id, policy);
            }
        }
        let gone: HashSet<&str> = removed.iter().map(String::as_str).collect();
        let next = |id: &str| updated.get(id).or_else(|| if gone.contains(id) { None } else { cache.get(id) });
        // A kernel id a set removed in this batch freed and a new set took (at the limit of
        // ids, the only one free): until the accounts below are applied, the removed set's
        // referrers still point at it, so the id is emptied now and filled after them.
        let put_ids: HashSet<u32> = sets_put.values().map(|s| s.kernel_id).collect();
        let reused: HashSet<u32> = sets_removed.iter().map(|&(_, id)| id).filter(|id| put_ids.contains(id)).collect();
        for id in &reused {
            if let Err(e) = datapath.remove_shared_set(*id) {
                error!("cluster: set id {id} could not be emptied in the kernel (revision {revision}): {e}");
                failures += 1;
            }
        }
        let put_set = |datapath: &mut Datapath, name: &str, set: &SetPolicy, unenforced: &mut HashMap<String, i64>| {
            let result = datapath.set_shared_set(set.kernel_id, &set.entries);
            match &result {
                Err(e) => {
                    error!(
                        "cluster: the set {name} could not be enforced as the fleet has it (revision {revision}): {e}"
                    );
                    unenforced.insert(super::sets::set_subject(name), revision);
                }
                Ok(()) => {
                    unenforced.remove(&super::sets::set_subject(name));
                }
            }
            u64::from(result.is_err())
        };
        // Sets first: an account's new reference then finds its set in the kernel.
        for (name, set) in sets_put.iter().filter(|(_, s)| !reused.contains(&s.kernel_id)) {
            failures += put_set(datapath, name, set, &mut unenforced);
        }
        let slots_in_use: HashSet<u32> = updated.values().map(|a| a.slot).collect();
        // Slots vacated: removed accounts', and those of accounts the fleet moved.
        let vacated: Vec<u32> = removed
            .iter()
            .filter_map(|id| cache.get(id).map(|a| a.slot))
            .chain(updated.iter().filter_map(|(id, a)| cache.get(id).map(|old| old.slot).filter(|&s| s != a.slot)))
            .collect();
        // A slot that changes hands in this batch (vacated by one account, taken by another)
        // still has the old owner's bindings pointing at it in the kernel, and writing the
        // new owner there would put its allowlist behind them. So the slot is cleared first
        // (its bindings then drop every packet, as an unset account's do), and the bindings
        // at the old owner's addresses are written as the fleet has them, before the new
        // owner is (below). Cleared, the old allowlist's region waits out its quarantine.
        let handed_over: BTreeSet<u32> = vacated.iter().copied().filter(|s| slots_in_use.contains(s)).collect();
        if !handed_over.is_empty() {
            let mut addrs = BTreeSet::new();
            for &slot in &handed_over {
                addrs.extend(datapath.binding_addresses_of(slot));
                if let Err(e) = datapath.remove_account(slot) {
                    error!("cluster: slot {slot} could not be cleared in the kernel for its new account: {e}");
                    failures += 1;
                }
            }
            if !addrs.is_empty() {
                let slot = |id: &str| Some(next(id)?.slot);
                let wanted = super::bindings::for_kernel(&tx.bindings_at(&addrs)?, self.node.as_deref(), slot);
                // A failure here is counted below, where these addresses are written again.
                if let Err(e) = datapath.set_bindings_at(&addrs, &wanted) {
                    warn!(
                        "cluster: the bindings at {} could not be moved off their old slots yet: {e}",
                        describe_addrs(&addrs)
                    );
                }
            }
            binding_addrs.extend(addrs);
        }
        // Sub-users of a changed account may change with it (a ban reaches them).
        let children = descendants(&tx, &updated, &cache, &gone)?;
        let mut affected: Vec<&str> = updated.keys().map(String::as_str).collect();
        affected.extend(children.iter().map(String::as_str).filter(|id| !updated.contains_key(*id)));
        for &id in &affected {
            let Some(account) = next(id) else { continue };
            if let Err(e) = apply_account(datapath, account, suspended(next, id)) {
                error!("cluster: account {id} could not be enforced as the fleet has it (revision {revision}): {e}");
                unenforced.insert(id.to_owned(), revision);
                failures += 1;
            } else {
                unenforced.remove(id);
            }
        }
        for id in &removed {
            unenforced.remove(id);
        }
        for (name, set) in sets_put.iter().filter(|(_, s)| reused.contains(&s.kernel_id)) {
            failures += put_set(datapath, name, set, &mut unenforced);
        }
        // A set goes from the kernel once no account's kernel list names it.
        for (name, kernel_id) in &sets_removed {
            unenforced.remove(&super::sets::set_subject(name));
            if reused.contains(kernel_id) {
                continue;
            }
            if let Err(e) = datapath.remove_shared_set(*kernel_id) {
                error!("cluster: the set {name} could not be removed from the kernel (revision {revision}): {e}");
                failures += 1;
            }
        }
        drop(unenforced);
        // An account that keeps its slot had its binding words rewritten in place above
        // (`apply_account`). The keys rewritten here are those where bindings changed, and
        // those of accounts removed or moved to another slot (at the old slot's addresses):
        // a walk of those addresses, not of every binding.
        for &slot in &vacated {
            binding_addrs.extend(datapath.binding_addresses_of(slot));
        }
        // Addresses an earlier batch could not write are written again with these: a binding
        // the kernel refused stays named in `unenforced` until it is written.
        let mut unenforced = self.unenforced.lock().expect("unenforced lock");
        binding_addrs.extend(unenforced.keys().filter_map(|s| binding_address(s)));
        if !binding_addrs.is_empty() {
            let slot = |id: &str| Some(next(id)?.slot);
            let wanted = super::bindings::for_kernel(&tx.bindings_at(&binding_addrs)?, self.node.as_deref(), slot);
            match datapath.set_bindings_at(&binding_addrs, &wanted) {
                Ok(()) => unenforced.retain(|s, _| binding_address(s).is_none_or(|a| !binding_addrs.contains(&a))),
                Err(e) => {
                    error!(
                        "cluster: the bindings at {} could not be written to the kernel (revision {revision}): {e}",
                        describe_addrs(&binding_addrs)
                    );
                    unenforced.extend(binding_addrs.iter().map(|a| (binding_subject(a), revision)));
                    failures += 1;
                }
            }
        }
        drop(unenforced);
        for slot in vacated.into_iter().filter(|s| !slots_in_use.contains(s)) {
            if let Err(e) = datapath.remove_account(slot) {
                error!("cluster: slot {slot} could not be cleared in the kernel: {e}");
                failures += 1;
            }
        }
        // Counted as a standalone host's changes are: a copy put back from before this
        // commit (while etcd is unreachable, say) is then refused at start, not enforced.
        let count = tx.commit_counted()?;
        super::change::record_commit(datapath, count);
        drop(cache);
        {
            let mut sets = self.sets.write().expect("set cache lock");
            for (name, _) in &sets_removed {
                sets.remove(name);
            }
            sets.extend(sets_put);
        }
        let mut cache = self.accounts.write().expect("cache lock");
        for id in &removed {
            cache.remove(id);
        }
        cache.extend(updated);
        drop(cache);
        if failures > 0 {
            self.cluster_apply_failures.fetch_add(failures, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
}

impl Replica for Service {
    fn wants_resync(&self) -> bool {
        self.resync_wanted.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    fn apply(&self, changes: Vec<Change>, revision: i64) -> Result<(), String> {
        let mut writer = self.writer.lock().expect("writer lock");
        self.apply_locked(&mut writer, changes, revision).map_err(|e| e.to_string())
    }

    /// Compares every set's and account's document and every binding with the snapshot, and
    /// applies only the differences.
    fn resync(&self, snapshot: Snapshot) -> Result<(), String> {
        let mut writer = self.writer.lock().expect("writer lock");
        let changes = {
            let tx = writer.store.transaction().map_err(|e| e.to_string())?;
            // A host's own policy is never wiped by a fleet it has not been part of: an
            // empty prefix (a wrong prefix, or a fleet not seeded yet) would switch its
            // enforcement off.
            // Nor is it merged into another: such a host follows a fleet only once the fleet
            // holds exactly its policy (after `ipaccessctl cluster import`), so a fleet seeded
            // part-way is never taken either.
            let local = tx.accounts().map_err(|e| e.to_string())?.len();
            let own = local > 0 && tx.applied_revision().map_err(|e| e.to_string())? == 0;
            let (fleet_accounts, empty) = (snapshot.accounts.len(), snapshot.accounts.is_empty());
            let mut changes = set_differences(&tx, snapshot.sets).map_err(|e| e.to_string())?;
            changes.extend(differences(&tx, snapshot.accounts, snapshot.bindings).map_err(|e| e.to_string())?);
            if own && !changes.is_empty() {
                let fleet = if empty {
                    "whose prefix is empty".to_owned()
                } else {
                    format!("which has {fleet_accounts} other accounts")
                };
                return Err(format!(
                    "this host's store holds {local} accounts and has never followed this fleet, {fleet}; it keeps \
                     enforcing them and takes nothing from etcd. Seed an empty fleet from it (ipaccessctl cluster \
                     import), join with an empty store, or check [cluster] prefix"
                ));
            }
            let mut audit = snapshot.audit;
            if snapshot.audit_may_repeat {
                let mut kept = Vec::with_capacity(audit.len());
                for record in audit {
                    if !tx.has_audit(&record).map_err(|e| e.to_string())? {
                        kept.push(record);
                    }
                }
                audit = kept;
            }
            if !audit.is_empty() {
                changes.push(Change::Audit(audit));
            }
            changes.push(Change::OverrideSequence(snapshot.override_sequence));
            changes
        };
        self.apply_locked(&mut writer, changes, snapshot.revision).map_err(|e| e.to_string())
    }
}

/// An entry of `unenforced` as a person reads it: "account acme", "the set corp-vpn", "the
/// bindings at 198.18.0.1".
fn describe_subject(subject: &str) -> String {
    if let Some(set) = subject.strip_prefix(super::sets::SET_SUBJECT) {
        return format!("the set {set}");
    }
    match binding_address(subject) {
        Some(addr) => format!("the bindings at {addr}"),
        None => format!("account {subject}"),
    }
}

/// The prefix of [`binding_subject`].
const BINDING_SUBJECT: &str = "bind:";

/// How the bindings at `addr` are named in `unenforced` (`bind:198.18.0.1`): no account id
/// holds a colon.
fn binding_subject(addr: &IpAddr) -> String {
    format!("{BINDING_SUBJECT}{addr}")
}

/// The address of a [`binding_subject`], or `None` for an account's or a set's.
fn binding_address(subject: &str) -> Option<IpAddr> {
    subject.strip_prefix(BINDING_SUBJECT)?.parse().ok()
}

/// A few addresses for a log line: the first three and how many more.
fn describe_addrs(addrs: &BTreeSet<IpAddr>) -> String {
    let shown: Vec<String> = addrs.iter().take(3).map(IpAddr::to_string).collect();
    match addrs.len().saturating_sub(3) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// The sub-users (at any depth, for trees written by older versions) of the accounts in
/// `updated`. A few accounts ask the store; a large batch (a resync) walks one map of the
/// whole cache instead of a query per account.
fn descendants(
    tx: &Tx,
    updated: &HashMap<String, AccountPolicy>,
    cache: &HashMap<String, AccountPolicy>,
    gone: &HashSet<&str>,
) -> Result<Vec<String>, StoreError> {
    const FEW: usize = 256;
    if updated.len() <= FEW {
        let mut all = Vec::new();
        for id in updated.keys() {
            all.extend(tx.descendants(id)?);
        }
        return Ok(all);
    }
    let mut below: HashMap<&str, Vec<&str>> = HashMap::new();
    let accounts = cache.iter().filter(|(id, _)| !updated.contains_key(*id) && !gone.contains(id.as_str()));
    for (id, policy) in updated.iter().chain(accounts) {
        if let Some(parent) = &policy.parent {
            below.entry(parent.as_str()).or_default().push(id.as_str());
        }
    }
    let (mut found, mut seen) = (Vec::new(), HashSet::new());
    let mut queue: Vec<&str> = updated.keys().map(String::as_str).collect();
    while let Some(id) = queue.pop() {
        for &child in below.get(id).map(Vec::as_slice).unwrap_or_default() {
            // A cycle in a damaged store ends here.
            if seen.insert(child) {
                found.push(child.to_owned());
                queue.push(child);
            }
        }
    }
    Ok(found)
}

/// Why a node whose copy has never taken the fleet's policy refuses a change: checked
/// against that copy, it could undo the fleet (or, on a host with its own policy, seed it with
/// one account).
fn not_following(tx: &Tx, cluster: &Cluster) -> Result<Failure, Failure> {
    let prefix = cluster.keys().prefix();
    Ok(if tx.accounts()?.is_empty() {
        cluster::unavailable(&format!("this node has not taken the fleet's policy under {prefix} yet"))
    } else {
        Failure::new(
            ErrorCode::Refused,
            format!(
                "this host enforces its own store and does not follow the fleet under {prefix} yet: seed the fleet \
                 from it first (ipaccessctl cluster import); nothing was changed"
            ),
        )
    })
}

/// A batch as the store can take it: only the last change to each key (a batch may span
/// several revisions), removals first (a removed set's too, so that its kernel id is free
/// for a set put), sets before the accounts that reference them, parents before sub-users
/// at any depth (an older store's grandchildren), accounts before the bindings that name
/// them.
fn in_order(changes: Vec<Change>) -> Vec<Change> {
    let key = |change: &Change| match change {
        Change::Account(id, _) => Some(format!("account {id}")),
        Change::Set(name, _) => Some(format!("set {name}")),
        Change::Binding(b, _) => Some(format!("binding {} {:?} {:?}", b.addr, b.target, b.node)),
        Change::Audit(_) | Change::OverrideSequence(_) => None,
    };
    let last: HashMap<String, usize> =
        changes.iter().enumerate().filter_map(|(i, change)| Some((key(change)?, i))).collect();
    let rank = |change: &Change| match change {
        Change::Binding(_, false) => 0,
        Change::Account(_, None) => 1,
        // Removed before those put: the kernel id a removed set frees may be the only one
        // left for a new set (`apply_locked` keeps the kernel's order safe).
        Change::Set(_, None) => 2,
        Change::Set(_, Some(_)) => 3,
        // Then by depth below the accounts put with them.
        Change::Account(_, Some(_)) => 4,
        Change::Binding(_, true) => 5,
        Change::Audit(_) | Change::OverrideSequence(_) => 6,
    };
    let kept: Vec<(usize, Change)> =
        changes.into_iter().enumerate().filter(|(i, change)| key(change).is_none_or(|k| last[&k] == *i)).collect();
    let depth_of: Vec<usize> = {
        let depths = depths(kept.iter().filter_map(|(_, change)| match change {
            Change::Account(id, Some(doc)) => Some((id.as_str(), doc.parent.as_deref())),
            _ => None,
        }));
        kept.iter()
            .map(|(_, change)| match change {
                Change::Account(id, Some(_)) => depths[id.as_str()],
                _ => 0,
            })
            .collect()
    };
    let mut ranked: Vec<((u8, usize, usize), Change)> =
        kept.into_iter().zip(depth_of).map(|((i, change), depth)| ((rank(&change), depth, i), change)).collect();
    ranked.sort_by_key(|(order, _)| *order);
    ranked.into_iter().map(|(_, change)| change).collect()
}

/// How far below the others of `accounts` (each with its parent) each account is: 0 for one
/// whose parent is not among them, its parent's depth + 1 otherwise. A chain is followed at
/// most [`MAX_ANCESTRY`] steps, so a cycle (a damaged fleet) ends; its members then sort
/// after every account of a sound tree.
pub(super) fn depths<'a>(accounts: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> HashMap<&'a str, usize> {
    let parents: HashMap<&str, Option<&str>> = accounts.into_iter().collect();
    parents
        .keys()
        .map(|&id| {
            let (mut depth, mut at) = (0, id);
            while depth < MAX_ANCESTRY
                && let Some(Some(parent)) = parents.get(at)
                && parents.contains_key(parent)
            {
                depth += 1;
                at = parent;
            }
            (id, depth)
        })
        .collect()
}

/// What must change locally to match the fleet's shared sets (`in_order` puts them around
/// the accounts).
fn set_differences(tx: &Tx, sets: Vec<(String, SetDoc)>) -> Result<Vec<Change>, StoreError> {
    let wanted: HashSet<&str> = sets.iter().map(|(name, _)| name.as_str()).collect();
    let mut changes: Vec<Change> = tx
        .sets()?
        .into_iter()
        .filter(|s| !wanted.contains(s.name.as_str()))
        .map(|s| Change::Set(s.name, None))
        .collect();
    for (name, doc) in sets {
        if tx.set_doc(&name)?.as_ref() != Some(&doc) {
            changes.push(Change::Set(name, Some(doc)));
        }
    }
    Ok(changes)
}

/// What must change locally to match the fleet's accounts and bindings: removals first
/// (so that slots and endpoints are free), then what differs.
fn differences(
    tx: &Tx,
    accounts: Vec<(String, crate::store::AccountDoc)>,
    bindings: Vec<Binding>,
) -> Result<Vec<Change>, StoreError> {
    let at = now();
    let wanted: HashSet<&str> = accounts.iter().map(|(id, _)| id.as_str()).collect();
    let local_accounts = tx.accounts()?;
    // In any order: removing an account takes its sub-users with it (`apply_locked`).
    let mut changes: Vec<Change> = local_accounts
        .iter()
        .filter(|a| !wanted.contains(a.id.as_str()))
        .map(|a| Change::Account(a.id.clone(), None))
        .collect();
    let local: HashSet<&str> = local_accounts.iter().map(|a| a.id.as_str()).collect();
    let local_bindings = tx.bindings()?;
    let endpoint = |b: &Binding| (b.addr, b.target, b.node.clone());
    let fleet_endpoints: HashMap<_, &Binding> = bindings.iter().map(|b| (endpoint(b), b)).collect();
    for b in &local_bindings {
        if !fleet_endpoints.contains_key(&endpoint(b)) {
            changes.push(Change::Binding(b.clone(), false));
        }
    }
    // In any order: `in_order` puts parents before sub-users when the batch is applied.
    for (id, doc) in accounts {
        // An account this copy lacks is put without reading (a joining node lacks all).
        let ours = if local.contains(id.as_str()) { tx.account_doc(&id, at)? } else { None };
        // Local overrides that expired since the fleet's document was written are left out
        // of ours: compare without them.
        let same = ours.as_ref().is_some_and(|ours| {
            let mut theirs = doc.clone();
            theirs.overrides.retain(|o| o.expires_at > at);
            *ours == theirs
        });
        if !same {
            changes.push(Change::Account(id, Some(doc)));
        }
    }
    let local: HashMap<_, &Binding> = local_bindings.iter().map(|b| (endpoint(b), b)).collect();
    for b in bindings {
        if local.get(&endpoint(&b)).is_none_or(|ours| ours.account != b.account) {
            changes.push(Change::Binding(b, true));
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depths_put_parents_first_at_any_depth_and_end_on_a_cycle() {
        // `low` sorts first, as a snapshot lists it; `top`'s parent is not in the batch.
        let found = depths([("low", Some("mid")), ("mid", Some("top")), ("top", Some("outside")), ("lone", None)]);
        assert_eq!((found["top"], found["mid"], found["low"], found["lone"]), (0, 1, 2, 0));
        // A damaged fleet's loop ends after MAX_ANCESTRY steps, below every sound tree.
        assert!(depths([("a", Some("b")), ("b", Some("a"))]).values().all(|&d| d == MAX_ANCESTRY));
    }
}
