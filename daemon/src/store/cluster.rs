//! The store as a fleet node's local copy of the cluster's policy: each account read and
//! written as one document (its row, allowlist and live overrides), the etcd revision the
//! copy has reached, and the audit records a change wrote.
//!
//! A document is what one etcd key holds (see `cluster::keys`). Applying one replaces the
//! account's rows with what it says; reading one back gives the same document, so a node
//! can tell which accounts differ from a snapshot without touching the others. A shared
//! set is one document too ([`SetDoc`]); its kernel id is not in it: each node picks its own.

use std::collections::HashMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{ActivityRecord, StoreError, Tx, account_row, int};
use crate::{
    policy::{AccountPolicy, LiveOverride, split_entries},
    protocol::{Account, AccountState, Binding, Mode, Proto},
};

/// One account as the fleet shares it. Fields added later must default, so that nodes of
/// two versions can share a cluster during an upgrade.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountDoc {
    pub slot: u32,
    pub parent: Option<String>,
    pub state: AccountState,
    pub state_reason: Option<String>,
    pub mode: Mode,
    pub created_at: i64,
    /// Sorted by CIDR text, so equal allowlists give equal documents.
    pub entries: Vec<EntryDoc>,
    /// Live overrides (neither revoked nor expired when the document was written), by id.
    #[serde(default)]
    pub overrides: Vec<OverrideDoc>,
    /// References to shared sets, by set name. Left out when there are none, so documents
    /// of accounts without sets read the same to nodes of older versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<SetRefDoc>,
}

/// An account's reference to a shared set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRefDoc {
    pub set: String,
    pub enabled: bool,
    pub created_at: i64,
    pub created_by: u32,
}

/// A shared set as the fleet shares it: one key, its networks sorted by CIDR text, so equal
/// sets give equal bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetDoc {
    pub created_at: i64,
    pub created_by: u32,
    pub entries: Vec<SetEntryDoc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetEntryDoc {
    pub cidr: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub created_at: i64,
    pub created_by: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryDoc {
    pub cidr: IpNet,
    pub label: Option<String>,
    pub enabled: bool,
    pub created_at: i64,
    pub created_by: u32,
    /// Unix s; absent (as in documents of older versions) never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideDoc {
    pub id: i64,
    pub cidr: IpNet,
    pub ticket: String,
    pub reason: String,
    pub operator: u32,
    pub created_at: i64,
    pub expires_at: i64,
}

impl AccountDoc {
    /// What the kernel and the checks enforce for this document at `now`: its enabled
    /// entries and the overrides still live.
    pub fn policy(&self, now: i64) -> AccountPolicy {
        let (entries, expiring) = split_entries(self.entries.iter().map(|e| (e.cidr, e.enabled, e.expires_at)), now);
        AccountPolicy {
            slot: self.slot,
            parent: self.parent.clone(),
            state: self.state,
            mode: self.mode,
            entries,
            expiring,
            overrides: self
                .overrides
                .iter()
                .filter(|o| o.expires_at > now)
                .map(|o| LiveOverride { id: o.id, cidr: o.cidr, expires_at: o.expires_at })
                .collect(),
            // Which kernel id each set has is this node's: the caller fills them in from the
            // store once the document is applied (`service::change::enabled_sets`).
            sets: Vec::new(),
        }
    }

    pub fn account(&self, id: &str) -> Account {
        Account {
            id: id.to_owned(),
            slot: self.slot,
            parent: self.parent.clone(),
            state: self.state,
            mode: self.mode,
            state_reason: self.state_reason.clone(),
            created_at: self.created_at,
        }
    }
}

/// Where a change began, so that what it wrote can be found afterwards: the last audit
/// record and the last override id before it.
#[derive(Clone, Copy, Debug)]
pub struct Marks {
    last_activity: i64,
    pub last_override: i64,
}

impl Tx<'_> {
    /// The account as a document, or `None` if there is no such account. Overrides live at
    /// `now` are included.
    pub fn account_doc(&self, id: &str, now: i64) -> Result<Option<AccountDoc>, StoreError> {
        let sql = "SELECT id, slot, parent, state, mode, state_reason, created_at FROM accounts WHERE id = ?1";
        let Some(row) = self.rows(sql, [id], account_row)?.pop() else {
            return Ok(None);
        };
        let mut entries: Vec<EntryDoc> = self
            .entries(id)?
            .into_iter()
            .map(|e| EntryDoc {
                cidr: e.cidr,
                label: e.label,
                enabled: e.enabled,
                created_at: e.created_at,
                created_by: e.created_by,
                expires_at: e.expires_at,
            })
            .collect();
        entries.sort_by_key(|e| e.cidr.to_string());
        let overrides = self
            .live_overrides(Some(id), now)?
            .into_iter()
            .map(|o| OverrideDoc {
                id: o.id,
                cidr: o.cidr,
                ticket: o.ticket,
                reason: o.reason,
                operator: o.operator,
                created_at: o.created_at,
                expires_at: o.expires_at,
            })
            .collect();
        let sets = self
            .set_refs(id)?
            .into_iter()
            .map(|r| SetRefDoc { set: r.set, enabled: r.enabled, created_at: r.created_at, created_by: r.created_by })
            .collect();
        Ok(Some(AccountDoc {
            slot: row.slot,
            parent: row.parent,
            state: row.state,
            state_reason: row.state_reason,
            mode: row.mode,
            created_at: row.created_at,
            entries,
            overrides,
            sets,
        }))
    }

    /// The set as a document, or `None` if there is no such set.
    pub fn set_doc(&self, name: &str) -> Result<Option<SetDoc>, StoreError> {
        let Some(row) = self.set(name)? else {
            return Ok(None);
        };
        let mut entries: Vec<SetEntryDoc> = self
            .set_entries(name)?
            .into_iter()
            .map(|e| SetEntryDoc { cidr: e.cidr, label: e.label, created_at: e.created_at, created_by: e.created_by })
            .collect();
        entries.sort_by_key(|e| e.cidr.to_string());
        Ok(Some(SetDoc { created_at: row.created_at, created_by: row.created_by, entries }))
    }

    /// Makes the set's rows say what `doc` says: created with the lowest free kernel id below
    /// `max_id` if this copy lacks it, its networks replaced. Returns its kernel id, or `None`
    /// when no id is free (the fleet holds more sets than this node's kernel).
    pub fn put_set_doc(&self, name: &str, doc: &SetDoc, max_id: u32) -> Result<Option<u32>, StoreError> {
        let kernel_id = match self.set(name)? {
            Some(row) => {
                self.execute(
                    "UPDATE sets SET created_at = ?2, created_by = ?3 WHERE name = ?1",
                    (name, doc.created_at, doc.created_by),
                )?;
                row.kernel_id
            }
            None => match self.add_set(name, doc.created_by, doc.created_at, max_id)? {
                Some(row) => row.kernel_id,
                None => return Ok(None),
            },
        };
        // Only the networks that differ are written, as for an account's entries: a network
        // that stays keeps its last uses (a removed one's go with its row).
        type NetworkRow = (Option<String>, i64, u32);
        let mut had: HashMap<String, NetworkRow> = self
            .set_entries(name)?
            .into_iter()
            .map(|e| (e.cidr.to_string(), (e.label, e.created_at, e.created_by)))
            .collect();
        for e in &doc.entries {
            let cidr = e.cidr.to_string();
            let row: NetworkRow = (e.label.clone(), e.created_at, e.created_by);
            match had.remove(&cidr) {
                Some(old) if old == row => {}
                Some(_) => {
                    self.execute(
                        "UPDATE set_entries SET label = ?3, created_at = ?4, created_by = ?5
                         WHERE set_name = ?1 AND cidr = ?2",
                        (name, &cidr, &e.label, e.created_at, e.created_by),
                    )?;
                }
                None => {
                    self.add_set_entry(name, e.cidr, e.label.as_deref(), e.created_by, e.created_at)?;
                }
            }
        }
        for cidr in had.keys() {
            self.execute("DELETE FROM set_entries WHERE set_name = ?1 AND cidr = ?2", (name, cidr))?;
        }
        Ok(Some(kernel_id))
    }

    /// Removes a set the fleet no longer has, with any reference this copy still holds to it
    /// (the fleet removes them in the same change): returns the accounts that lost one.
    pub fn remove_set_doc(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let referrers: Vec<String> = self.set_referrers(name)?.into_iter().map(|r| r.account).collect();
        self.execute("DELETE FROM set_refs WHERE set_name = ?1", [name])?;
        self.remove_set(name)?;
        Ok(referrers)
    }

    /// Frees the kernel slot this copy has the account in, if the fleet has it in another
    /// (`slot`): removed and made again while this node was away, it took whatever slot was
    /// free then, possibly one another account here still holds. The row moves to the
    /// negative of its slot, which no other row holds (slots start at 1), until
    /// [`Tx::put_account_doc`] gives it `slot` in the same transaction: a batch frees every
    /// slot that changes hands before it writes any. Returns whether it was moved.
    pub fn release_slot(&self, id: &str, slot: u32) -> Result<bool, StoreError> {
        let moved =
            self.execute("UPDATE accounts SET slot = -slot WHERE id = ?1 AND slot > 0 AND slot != ?2", (id, slot))?;
        Ok(moved > 0)
    }

    /// Makes the account's rows say what `doc` says: the row written, the allowlist
    /// replaced, its overrides added; a local live override the document no longer holds
    /// was revoked elsewhere and is ended `now`. The slot must be free, or the account's
    /// own: [`Tx::release_slot`] first for every account of a batch that moves.
    pub fn put_account_doc(&self, id: &str, doc: &AccountDoc, now: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO accounts (id, slot, parent, state, mode, state_reason, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (id) DO UPDATE SET slot = ?2, parent = ?3, state = ?4, mode = ?5,
                 state_reason = ?6, created_at = ?7",
            (
                id,
                doc.slot,
                &doc.parent,
                <&str>::from(doc.state),
                <&str>::from(doc.mode),
                &doc.state_reason,
                doc.created_at,
            ),
        )?;
        // Every event carries the whole document, and most change one entry: only the rows
        // that differ are written. Which expiries this node has audited is local, so it
        // stays while an entry's expiry does.
        type EntryRow = (Option<String>, i64, u32, bool, Option<i64>);
        let mut had: HashMap<String, EntryRow> = self
            .rows(
                "SELECT cidr, label, created_at, created_by, enabled, expires_at FROM allow_entries WHERE account = ?1",
                [id],
                |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))),
            )?
            .into_iter()
            .collect();
        for e in &doc.entries {
            let cidr = e.cidr.to_string();
            let row: EntryRow = (e.label.clone(), e.created_at, e.created_by, e.enabled, e.expires_at);
            match had.remove(&cidr) {
                Some(old) if old == row => {}
                Some(_) => {
                    self.execute(
                        "UPDATE allow_entries SET label = ?3, created_at = ?4, created_by = ?5, enabled = ?6,
                             expires_at = ?7, expiry_audited = expiry_audited AND expires_at IS ?7
                         WHERE account = ?1 AND cidr = ?2",
                        (id, &cidr, &e.label, e.created_at, e.created_by, e.enabled, e.expires_at),
                    )?;
                }
                None => {
                    self.execute(
                        "INSERT INTO allow_entries (account, cidr, label, created_at, created_by, enabled, expires_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        (id, &cidr, &e.label, e.created_at, e.created_by, e.enabled, e.expires_at),
                    )?;
                }
            }
        }
        for cidr in had.keys() {
            self.execute("DELETE FROM allow_entries WHERE account = ?1 AND cidr = ?2", (id, cidr))?;
        }
        for o in &doc.overrides {
            self.execute(
                "INSERT INTO overrides (id, account, cidr, ticket, reason, operator, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (id) DO NOTHING",
                (o.id, id, o.cidr.to_string(), &o.ticket, &o.reason, o.operator, o.created_at, o.expires_at),
            )?;
        }
        let kept: Vec<i64> = doc.overrides.iter().map(|o| o.id).collect();
        for live in self.live_overrides(Some(id), now)? {
            if !kept.contains(&live.id) {
                self.revoke_override(id, live.id, now)?;
            }
        }
        self.execute("DELETE FROM set_refs WHERE account = ?1", [id])?;
        for r in &doc.sets {
            // The fleet writes a set before any reference to it; a reference to a set this
            // copy lacks (written by hand, or by a newer version) lets nothing in.
            if self.set(&r.set)?.is_none() {
                log::warn!("cluster: account {id} references the set {} which this node does not have", r.set);
                continue;
            }
            self.add_set_ref(id, &r.set, r.created_by, r.created_at)?;
            if !r.enabled {
                self.set_set_ref_enabled(id, &r.set, false)?;
            }
        }
        Ok(())
    }

    /// Makes the binding table hold `binding` for its endpoint and scope (whoever held it
    /// before).
    pub fn put_binding(&self, binding: &Binding) -> Result<(), StoreError> {
        let (proto, port): (&str, u16) = binding.target.map_or(("", 0), |(p, port): (Proto, u16)| (p.into(), port));
        let node = binding.node.as_deref().unwrap_or("");
        self.execute(
            "INSERT INTO bindings (addr, proto, port, node, account, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (addr, proto, port, node) DO UPDATE SET account = ?5, created_at = ?6",
            (binding.addr.to_string(), proto, port, node, &binding.account, binding.created_at),
        )?;
        Ok(())
    }

    /// The etcd revision this copy has applied (0: none yet).
    pub fn applied_revision(&self) -> Result<i64, StoreError> {
        self.count("SELECT COALESCE(MAX(value), 0) FROM cluster WHERE name = 'applied_revision'", [])
    }

    /// Records that the fleet has granted override ids up to `n`: the next one granted here
    /// is above it ([`Tx::add_override`]).
    pub fn raise_override_sequence(&self, n: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO cluster (name, value) VALUES ('override_sequence', ?1)
             ON CONFLICT (name) DO UPDATE SET value = MAX(value, ?1)",
            [n],
        )?;
        Ok(())
    }

    /// The node name this copy followed a fleet as (a text value in the `cluster` table).
    pub fn set_node_name(&self, name: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO cluster (name, value) VALUES ('node_name', ?1) ON CONFLICT (name) DO UPDATE SET value = ?1",
            [name],
        )?;
        Ok(())
    }

    pub fn node_name(&self) -> Result<Option<String>, StoreError> {
        let sql = "SELECT CAST(value AS TEXT) FROM cluster WHERE name = 'node_name'";
        Ok(self.rows(sql, [], |r| Ok(r.get::<_, String>(0)?))?.pop())
    }

    /// A fleet node's copy becomes a standalone host's store: the bindings scoped to
    /// `node` become its own (unscoped), those of other nodes (endpoints of other hosts)
    /// go. Returns how many of each.
    pub fn keep_bindings_of(&self, node: Option<&str>) -> Result<(usize, usize), StoreError> {
        let kept = match node {
            Some(node) => self.execute("UPDATE bindings SET node = '' WHERE node = ?1", [node])?,
            None => 0,
        };
        let dropped = self.execute("DELETE FROM bindings WHERE node != ''", [])?;
        Ok((kept, dropped))
    }

    pub fn set_applied_revision(&self, revision: i64) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO cluster (name, value) VALUES ('applied_revision', ?1)
             ON CONFLICT (name) DO UPDATE SET value = ?1",
            [revision],
        )?;
        Ok(())
    }

    pub fn marks(&self) -> Result<Marks, StoreError> {
        Ok(Marks {
            last_activity: self.count("SELECT COALESCE(MAX(id), 0) FROM activity", [])?,
            last_override: self.last_override()?,
        })
    }

    /// The highest override id now (compared with [`Marks::last_override`]: did this change
    /// grant one?).
    pub fn last_override(&self) -> Result<i64, StoreError> {
        self.count("SELECT COALESCE(MAX(id), 0) FROM overrides", [])
    }

    /// The audit records written since `marks` were taken, oldest first.
    pub fn audit_since(&self, marks: Marks) -> Result<Vec<ActivityRecord>, StoreError> {
        let sql = "SELECT time, account, reason, detail FROM activity WHERE id > ?1 AND kind = 'audit' ORDER BY id";
        self.rows(sql, [marks.last_activity], |r| {
            let detail: String = r.get(3)?;
            let detail: serde_json::Value =
                serde_json::from_str(&detail).map_err(|e| StoreError::Corrupt(format!("audit detail: {e}")))?;
            let uid = detail.get("uid").and_then(serde_json::Value::as_i64).unwrap_or(0);
            Ok(ActivityRecord { time: r.get(0)?, account: r.get(1)?, uid: int(uid, "uid")?, action: r.get(2)?, detail })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[test]
    fn an_older_document_reads_and_an_audited_expiry_stays_audited() {
        let old = r#"{"cidr":"198.18.0.0/24","label":null,"enabled":true,"created_at":1,"created_by":0}"#;
        assert_eq!(serde_json::from_str::<EntryDoc>(old).unwrap().expires_at, None);
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let tx = store.transaction().unwrap();
        tx.add_account("acme", None, AccountState::Active, Mode::Enforce, 0).unwrap();
        tx.add_entry("acme", "198.18.0.0/24".parse().unwrap(), None, 0, 1).unwrap();
        tx.set_entry_expiry("acme", "198.18.0.0/24".parse().unwrap(), Some(50)).unwrap();
        let doc = tx.account_doc("acme", 100).unwrap().unwrap();
        assert_eq!(doc.entries[0].expires_at, Some(50));
        assert!(doc.policy(100).live_entries(100).next().is_none(), "expired at 50");
        let ended = tx.unaudited_entry_expiries(100).unwrap();
        tx.mark_entry_expiry_audited("acme", ended[0].cidr).unwrap();
        // The document applied again (another change to the account) is not a new expiry.
        tx.put_account_doc("acme", &doc, 100).unwrap();
        assert!(tx.unaudited_entry_expiries(100).unwrap().is_empty());
        let mut renewed = doc.clone();
        renewed.entries[0].expires_at = Some(200);
        tx.put_account_doc("acme", &renewed, 100).unwrap();
        assert_eq!(tx.unaudited_entry_expiries(200).unwrap().len(), 1, "a renewed entry's end is audited again");
    }

    #[test]
    fn a_document_applied_over_another_reads_back_as_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let tx = store.transaction().unwrap();
        tx.add_account("acme", None, AccountState::Active, Mode::Enforce, 0).unwrap();
        for cidr in ["198.18.0.0/24", "198.18.1.1/32", "fd00::/64"] {
            tx.add_entry("acme", cidr.parse().unwrap(), None, 0, 1).unwrap();
        }
        let mut doc = tx.account_doc("acme", 100).unwrap().unwrap();
        // One entry kept as it is, one relabelled and disabled, one given an end, one gone
        // and one new: each kind of row the apply writes differently.
        doc.entries.retain(|e| e.cidr.to_string() != "198.18.1.1/32");
        doc.entries[0].label = Some("office".into());
        doc.entries[0].enabled = false;
        doc.entries[1].expires_at = Some(500);
        doc.entries.push(EntryDoc {
            cidr: "198.18.2.0/24".parse().unwrap(),
            label: Some("branch".into()),
            enabled: true,
            created_at: 7,
            created_by: 3,
            expires_at: None,
        });
        tx.put_account_doc("acme", &doc, 100).unwrap();
        let mut expected = doc.entries.clone();
        expected.sort_by_key(|e| e.cidr.to_string());
        let mut read = tx.account_doc("acme", 100).unwrap().unwrap().entries;
        read.sort_by_key(|e| e.cidr.to_string());
        assert_eq!(read, expected);
    }
}
