//! `cluster_import`: a standalone host's store seeds an empty fleet.
//!
//! The import writes exactly the keys the fleet's own changes would have written for this
//! store (each shared set's document, each account's document and slot, each binding
//! fleet-wide, the override sequence), as the units of one change, so that afterwards the fleet equals this store and
//! this node's next resynchronisation changes nothing: it then follows the fleet without
//! having stopped enforcing its own policy.
//!
//! etcd takes a large store in several transactions. A run that stops part-way (the node
//! killed, etcd lost) leaves the parts before it; a second run accepts every key that
//! already holds exactly what it would write and writes the rest. Anything else under the
//! prefix (another policy, an audit record: a fleet that has already started) refuses it.
//! The import's audit record goes with the last part, so its presence marks a finished one.

use std::collections::HashMap;

use serde_json::json;

use super::{Failure, Reply, Service, Writer, now};
use crate::{
    cluster::{self, BindingValue, Committed, FLEET_WIDE, Guard, Key, Unit, Write},
    policy::{ACCOUNT_ID_RULE, valid_account_id},
    protocol::{ClusterImport, ClusterImported, ErrorCode},
    store::{AccountDoc, ActivityRecord},
};

/// What one key of the import must hold: account documents are compared as documents
/// (overrides that expired since an earlier run wrote them do not count), the rest as bytes.
enum Wanted {
    Account(AccountDoc),
    Bytes(Vec<u8>),
}

impl Service {
    pub(super) fn cluster_import(&self, _: ClusterImport, uid: u32) -> Reply<ClusterImport> {
        let Some(cluster) = self.fleet() else {
            return Err(Failure::new(
                ErrorCode::Refused,
                "this host has no [cluster] section: there is no fleet to import its store into. Add [cluster] to \
                 its configuration and restart it, then import",
            ));
        };
        let keys = cluster.keys().clone();
        let prefix = keys.prefix().to_owned();
        let refused = |why: String| Failure::new(ErrorCode::Refused, why);
        let mut guard = self.writer.lock().expect("writer lock");
        let tx = guard.store.transaction()?;
        let applied = tx.applied_revision()?;
        if applied > 0 {
            return Err(refused(format!(
                "this node already follows the fleet under {prefix} (revision {applied}): its store is the fleet's \
                 copy, not a policy of its own; nothing was imported"
            )));
        }
        let at = now();
        let mut accounts = tx.accounts()?;
        if accounts.is_empty() {
            return Err(refused(format!("this host's store has no accounts: nothing to import into {prefix}")));
        }
        // Names the fleet's keys cannot hold (an older version's: an id with `/` would read
        // as another key, and the import would never be seen as finished) are refused here.
        let sets = tx.sets()?;
        let names = accounts.iter().map(|a| ("account", &a.id)).chain(sets.iter().map(|s| ("set", &s.name)));
        if let Some((what, name)) = names.filter(|(_, name)| !valid_account_id(name)).min_by_key(|(_, name)| *name) {
            return Err(refused(format!(
                "this host's store has the {what} {name:?}, a name the fleet cannot hold ({}); remove it or make it \
                 again under a valid name, then import; nothing was imported",
                ACCOUNT_ID_RULE.replacen("an account id", "a name", 1)
            )));
        }
        // Parents before sub-users at any depth (an older store's grandchildren), so that a
        // node applying the parts one by one always has the parent first.
        let depth: HashMap<String, usize> =
            super::fleet::depths(accounts.iter().map(|a| (a.id.as_str(), a.parent.as_deref())))
                .into_iter()
                .map(|(id, d)| (id.to_owned(), d))
                .collect();
        accounts.sort_by_key(|a| depth[&a.id]);
        let bindings = tx.bindings()?;
        let last_override = tx.last_override()?;
        // Each unit's keys and what they must hold, in the order the parts are written:
        // sets before the accounts that reference them.
        let mut planned: Vec<Vec<(String, Wanted)>> = Vec::new();
        for set in &sets {
            let doc = tx.set_doc(&set.name)?.ok_or_else(|| super::sets::unknown_set(&set.name))?;
            let value = serde_json::to_vec(&doc).expect("a set serializes");
            if value.len() > cluster::MAX_DOCUMENT_BYTES {
                return Err(refused(format!(
                    "the set {} takes {} bytes, more than one etcd key of a fleet holds ({} bytes); shorten its \
                     labels or split it, then import; nothing was imported",
                    set.name,
                    value.len(),
                    cluster::MAX_DOCUMENT_BYTES
                )));
            }
            planned.push(vec![(keys.set(&set.name), Wanted::Bytes(value))]);
        }
        for account in &accounts {
            let doc = tx.account_doc(&account.id, at)?.ok_or_else(|| super::unknown(&account.id))?;
            planned.push(vec![
                (keys.slot(doc.slot), Wanted::Bytes(account.id.as_bytes().to_vec())),
                (keys.account(&account.id), Wanted::Account(doc)),
            ]);
        }
        for b in &bindings {
            let value = serde_json::to_vec(&BindingValue::of(b)).expect("a binding serializes");
            planned.push(vec![(keys.binding(b.addr, b.target, FLEET_WIDE), Wanted::Bytes(value))]);
        }
        if last_override > 0 {
            planned.push(vec![(keys.override_sequence(), Wanted::Bytes(last_override.to_string().into_bytes()))]);
        }
        drop(tx);

        let (revision, present) = cluster.policy_keys()?;
        let mut present: HashMap<String, Vec<u8>> = present.into_iter().collect();
        let (mut units, mut written, mut already) = (Vec::new(), 0u64, 0u64);
        for unit_keys in planned {
            let mut unit = Unit::default();
            for (key, wanted) in unit_keys {
                match present.remove(&key) {
                    None => {
                        // Absent when the prefix was read, and still absent when written.
                        unit.guards.push(Guard::Key(key.clone()));
                        let value = match wanted {
                            Wanted::Account(doc) => cluster::keys::encode(&doc),
                            Wanted::Bytes(bytes) => bytes,
                        };
                        unit.writes.push(Write::Put(key, value));
                        written += 1;
                    }
                    Some(value) if holds(&value, &wanted, at) => {
                        unit.guards.push(Guard::Existing(key));
                        already += 1;
                    }
                    Some(_) => {
                        return Err(refused(format!(
                            "the fleet's prefix {prefix} is not empty: {key} holds something other than this host's \
                             store would write there; nothing was imported. An import only seeds an empty prefix \
                             (or finishes one of the same store that stopped part-way)"
                        )));
                    }
                }
            }
            if !unit.writes.is_empty() {
                units.push(unit);
            }
        }
        // Whatever is left is under the prefix and not this store's: another policy, or the
        // audit record of a finished import or of changes made through the fleet.
        if let Some(key) = present.keys().min() {
            let what = match keys.parse(key.as_bytes()) {
                Key::Audit => "an audit record: the fleet has already been seeded or changed",
                _ => "a key this host's store would not write",
            };
            return Err(refused(format!(
                "the fleet's prefix {prefix} is not empty: {key} is there ({what}); nothing was imported"
            )));
        }
        // Nothing under the prefix may change between the read and the first part.
        let (start, end) = keys.policy_range();
        match units.first_mut() {
            Some(first) => first.guards.push(Guard::Range(start, end)),
            None => {
                return Err(refused(format!(
                    "every key of this store is already under {prefix}, without the import's audit record: write \
                     nothing more; restart this node to follow the fleet"
                )));
            }
        }
        let detail = json!({
            "prefix": prefix, "node": cluster.node(), "accounts": accounts.len(), "bindings": bindings.len(),
            "sets": sets.len(), "uid": uid, "action": "cluster_import",
        });
        let record = ActivityRecord { time: at, account: String::new(), uid, action: "cluster_import".into(), detail };
        units.last_mut().expect("one unit").audit.push(record);
        // The store is not the fleet's copy yet: its guard is the empty prefix's range.
        let committed = cluster.commit_units(units, revision, None);
        drop(guard);
        let revision = match committed? {
            Committed::At(revision) => revision,
            Committed::Conflict(_) => {
                return Err(Failure::new(
                    ErrorCode::Conflict,
                    format!(
                        "a key under {prefix} was written by someone else while the import ran; nothing was \
                         imported. Make no changes through the fleet until the import is done"
                    ),
                ));
            }
            Committed::Partial { done, parts, .. } => return Err(cluster::partial(done, parts, None)),
        };
        // The node's follower takes the fleet once it finds this store's policy there: from
        // then on it is a node like the others.
        if !cluster.wait_enforced(revision) {
            return Err(Failure::new(
                ErrorCode::Internal,
                format!(
                    "the store is imported under {prefix} (revision {revision}) but this node does not follow the \
                     fleet yet; see its log"
                ),
            ));
        }
        // The record reaches this node too: its snapshot brings every audit record newer than
        // the revision it had applied (none).
        Ok(ClusterImported {
            prefix,
            accounts: accounts.len() as u64,
            bindings: bindings.len() as u64,
            sets: sets.len() as u64,
            written,
            already_present: already,
            revision,
        })
    }
}

impl Service {
    /// On a host started without `[cluster]`: a store that was a fleet node's copy is from
    /// now on this host's own policy (the way back from a fleet). Forgetting the fleet's
    /// revision means that, pointed at a fleet again, it is treated as a host with its own
    /// policy: it neither takes an empty prefix nor is merged into another policy.
    pub fn leave_fleet(&self) -> Result<(), crate::store::StoreError> {
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        let tx = store.transaction()?;
        let applied = tx.applied_revision()?;
        let node = tx.node_name()?;
        let (kept, dropped) = tx.keep_bindings_of(node.as_deref())?;
        if applied == 0 && kept + dropped == 0 {
            return Ok(());
        }
        tx.set_applied_revision(0)?;
        if kept > 0 {
            // Started without a node name, the service left these out of the kernel.
            let cache = self.accounts.read().expect("cache lock");
            let wanted = super::bindings::for_kernel(&tx.bindings()?, None, |id| cache.get(id).map(|a| a.slot));
            if let Err(e) = datapath.set_bindings(&wanted) {
                // Nothing is committed: the next start tries again.
                log::error!("leaving the fleet: the bindings could not be written to the kernel: {e}");
                return Ok(());
            }
        }
        tx.commit()?;
        log::info!(
            "this store was fleet node {}'s copy (revision {applied}); without [cluster] it is now this host's own \
             policy: {kept} bindings scoped to this node are now its own, {dropped} of other nodes were dropped",
            node.as_deref().unwrap_or("?")
        );
        Ok(())
    }
}

/// Does `value`, found under the prefix, hold what the import would write there?
fn holds(value: &[u8], wanted: &Wanted, at: i64) -> bool {
    match wanted {
        Wanted::Bytes(bytes) => value == bytes.as_slice(),
        Wanted::Account(doc) => serde_json::from_slice::<AccountDoc>(value).is_ok_and(|mut found| {
            found.overrides.retain(|o| o.expires_at > at);
            found == *doc
        }),
    }
}
