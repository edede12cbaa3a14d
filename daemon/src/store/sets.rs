//! Shared named sets: a set's entries, stored once, and the accounts that reference it
//! (migration v11). A set's `kernel_id` is its key in this node's kernel set tables.

use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;
use rusqlite::Row;

use super::{StoreError, Tx, UseColumn, UseTable};
use crate::protocol::{RecentSignin, SetEntry};

/// A set as stored (its entries are read apart: a set may hold many).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetRow {
    pub name: String,
    pub kernel_id: u32,
    pub created_at: i64,
    pub created_by: u32,
}

/// One account's reference to a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetRefRow {
    pub account: String,
    pub set: String,
    /// The set's kernel id (what the account's kernel reference list holds).
    pub kernel_id: u32,
    pub enabled: bool,
    pub created_at: i64,
    pub created_by: u32,
}

/// A successful sign-in of an enforcing account through an enabled reference to a set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedInThroughSet {
    pub account: String,
    pub signin: RecentSignin,
}

const SET_COLUMNS: &str = "SELECT name, kernel_id, created_at, created_by FROM sets";
const REF_COLUMNS: &str = "SELECT r.account, r.set_name, s.kernel_id, r.enabled, r.created_at, r.created_by
                           FROM set_refs r JOIN sets s ON s.name = r.set_name";

impl Tx<'_> {
    /// Creates an empty set with the lowest kernel id from 1 below `max_id` that no set holds;
    /// `None` when every id is taken.
    pub fn add_set(&self, name: &str, created_by: u32, now: i64, max_id: u32) -> Result<Option<SetRow>, StoreError> {
        let used: Vec<u32> = self.rows("SELECT kernel_id FROM sets ORDER BY kernel_id", [], |r| Ok(r.get(0)?))?;
        let mut kernel_id = 1;
        for id in used {
            if id == kernel_id {
                kernel_id += 1;
            } else if id > kernel_id {
                break;
            }
        }
        if kernel_id >= max_id {
            return Ok(None);
        }
        self.execute(
            "INSERT INTO sets (name, kernel_id, created_at, created_by) VALUES (?1, ?2, ?3, ?4)",
            (name, kernel_id, now, created_by),
        )?;
        Ok(Some(SetRow { name: name.to_owned(), kernel_id, created_at: now, created_by }))
    }

    pub fn set(&self, name: &str) -> Result<Option<SetRow>, StoreError> {
        Ok(self.rows(&format!("{SET_COLUMNS} WHERE name = ?1"), [name], set_row)?.pop())
    }

    /// Every set, by name.
    pub fn sets(&self) -> Result<Vec<SetRow>, StoreError> {
        self.rows(&format!("{SET_COLUMNS} ORDER BY name"), [], set_row)
    }

    /// Deletes a set and its entries; its references must be gone first (the foreign key
    /// refuses otherwise). False if there was no such set.
    pub fn remove_set(&self, name: &str) -> Result<bool, StoreError> {
        let removed = self.execute("DELETE FROM sets WHERE name = ?1", [name])? > 0;
        if removed {
            self.execute("DELETE FROM set_entry_use WHERE set_name = ?1", [name])?;
        }
        Ok(removed)
    }

    /// Records the last packet each (set, network) let through, keeping the later time (to
    /// [`super::USE_RESOLUTION_SECONDS`]).
    pub fn note_set_packets(&self, uses: &HashMap<(String, IpNet), i64>) -> Result<(), StoreError> {
        self.note_entry_uses(UseTable::Sets, UseColumn::Packet, uses)
    }

    /// Records the last sign-in each (set, network) let through (to any account
    /// referencing the set), keeping the later time (to [`super::USE_RESOLUTION_SECONDS`]).
    pub fn note_set_signins(&self, uses: &HashMap<(String, IpNet), i64>) -> Result<(), StoreError> {
        self.note_entry_uses(UseTable::Sets, UseColumn::Signin, uses)
    }

    /// A set's networks with their last sign-in and last packet filled in (evidence older
    /// than the network is an earlier one's of the same CIDR, removed and added again).
    pub fn set_entries_with_use(&self, set: &str) -> Result<Vec<SetEntry>, StoreError> {
        let mut entries = self.set_entries(set)?;
        let sql = "SELECT cidr, last_signin, last_packet FROM set_entry_use WHERE set_name = ?1";
        let used: HashMap<String, (Option<i64>, Option<i64>)> =
            self.rows(sql, [set], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?.into_iter().collect();
        for e in &mut entries {
            let (signin, packet) = used.get(&e.cidr.to_string()).copied().unwrap_or_default();
            e.last_signin_at = signin.filter(|&t| t >= e.created_at);
            e.last_packet_at = packet.filter(|&t| t >= e.created_at);
        }
        Ok(entries)
    }

    /// Adds `cidr` (canonical) to a set; false if the set holds it already.
    pub fn add_set_entry(
        &self,
        set: &str,
        cidr: IpNet,
        label: Option<&str>,
        created_by: u32,
        now: i64,
    ) -> Result<bool, StoreError> {
        let sql = "INSERT INTO set_entries (set_name, cidr, label, created_at, created_by)
                   VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING";
        Ok(self.execute(sql, (set, cidr.to_string(), label, now, created_by))? > 0)
    }

    /// Removes an entry of a set; false if the set does not hold it.
    pub fn remove_set_entry(&self, set: &str, cidr: IpNet) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM set_entries WHERE set_name = ?1 AND cidr = ?2", (set, cidr.to_string()))? > 0)
    }

    /// A set's entries, in CIDR text order.
    pub fn set_entries(&self, set: &str) -> Result<Vec<SetEntry>, StoreError> {
        let sql = "SELECT cidr, label, created_at, created_by FROM set_entries WHERE set_name = ?1 ORDER BY cidr";
        self.rows(sql, [set], set_entry_row)
    }

    /// Every set's entries, by set then CIDR text (to load the sets at start).
    pub fn all_set_entries(&self) -> Result<Vec<(String, SetEntry)>, StoreError> {
        let sql = "SELECT cidr, label, created_at, created_by, set_name FROM set_entries ORDER BY set_name, cidr";
        self.rows(sql, [], |r| Ok((r.get(4)?, set_entry_row(r)?)))
    }

    pub fn set_entry_count(&self, set: &str) -> Result<u64, StoreError> {
        Ok(self.count("SELECT COUNT(*) FROM set_entries WHERE set_name = ?1", [set])? as u64)
    }

    /// References `set` from `account`, enabled; false if the account references it already.
    pub fn add_set_ref(&self, account: &str, set: &str, created_by: u32, now: i64) -> Result<bool, StoreError> {
        let sql = "INSERT INTO set_refs (account, set_name, enabled, created_at, created_by)
                   VALUES (?1, ?2, 1, ?3, ?4) ON CONFLICT DO NOTHING";
        Ok(self.execute(sql, (account, set, now, created_by))? > 0)
    }

    pub fn remove_set_ref(&self, account: &str, set: &str) -> Result<bool, StoreError> {
        Ok(self.execute("DELETE FROM set_refs WHERE account = ?1 AND set_name = ?2", (account, set))? > 0)
    }

    pub fn set_set_ref_enabled(&self, account: &str, set: &str, enabled: bool) -> Result<bool, StoreError> {
        let sql = "UPDATE set_refs SET enabled = ?3 WHERE account = ?1 AND set_name = ?2";
        Ok(self.execute(sql, (account, set, enabled))? > 0)
    }

    /// The account's references, enabled and disabled, by set name.
    pub fn set_refs(&self, account: &str) -> Result<Vec<SetRefRow>, StoreError> {
        self.rows(&format!("{REF_COLUMNS} WHERE r.account = ?1 ORDER BY r.set_name"), [account], ref_row)
    }

    /// The references to `set`, by account.
    pub fn set_referrers(&self, set: &str) -> Result<Vec<SetRefRow>, StoreError> {
        self.rows(&format!("{REF_COLUMNS} WHERE r.set_name = ?1 ORDER BY r.account"), [set], ref_row)
    }

    /// Every reference (to load them at start), by account then set.
    pub fn all_set_refs(&self) -> Result<Vec<SetRefRow>, StoreError> {
        self.rows(&format!("{REF_COLUMNS} ORDER BY r.account, r.set_name"), [], ref_row)
    }

    /// In one query, however many accounts reference the set: the addresses an application
    /// signed in from successfully since `since`, per enforcing account that references
    /// `set` and has the reference enabled (what the lockout guard weighs when the set
    /// loses entries or goes).
    pub fn signins_through_set(&self, set: &str, since: i64) -> Result<Vec<SignedInThroughSet>, StoreError> {
        let sql = "SELECT s.account, s.address, MAX(s.last_seen) FROM set_refs r
                   JOIN accounts a ON a.id = r.account AND a.mode = 'enforce'
                   JOIN signins s ON s.account = r.account
                   WHERE r.set_name = ?1 AND r.enabled = 1 AND s.last_seen >= ?2 AND s.bucket > ?2 - 3600 AND s.application = 1
                         AND s.allowed = 1 AND s.address <> '*' AND s.last_seen >= a.created_at
                   GROUP BY s.account, s.address ORDER BY s.account, MAX(s.last_seen) DESC";
        self.rows(sql, (set, since), |r| {
            let address: String = r.get(1)?;
            let address: IpAddr =
                address.parse().map_err(|_| StoreError::Corrupt(format!("bad address {address:?}")))?;
            Ok(SignedInThroughSet { account: r.get(0)?, signin: RecentSignin { address, last_seen: r.get(2)? } })
        })
    }
}

fn set_row(r: &Row) -> Result<SetRow, StoreError> {
    Ok(SetRow { name: r.get(0)?, kernel_id: r.get(1)?, created_at: r.get(2)?, created_by: r.get(3)? })
}

fn set_entry_row(r: &Row) -> Result<SetEntry, StoreError> {
    let cidr: String = r.get(0)?;
    Ok(SetEntry {
        cidr: cidr.parse().map_err(|_| StoreError::Corrupt(format!("bad CIDR {cidr:?}")))?,
        label: r.get(1)?,
        created_at: r.get(2)?,
        created_by: r.get(3)?,
        last_signin_at: None,
        last_packet_at: None,
    })
}

fn ref_row(r: &Row) -> Result<SetRefRow, StoreError> {
    Ok(SetRefRow {
        account: r.get(0)?,
        set: r.get(1)?,
        kernel_id: r.get(2)?,
        enabled: r.get(3)?,
        created_at: r.get(4)?,
        created_by: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use crate::{
        protocol::{AccountState, Mode},
        store::Store,
    };

    #[test]
    fn sets_hold_entries_once_and_references_hold_their_set() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let tx = store.transaction().unwrap();
        let a = tx.add_set("a", 0, 1, 4).unwrap().unwrap();
        let b = tx.add_set("b", 0, 1, 4).unwrap().unwrap();
        assert_eq!((a.kernel_id, b.kernel_id), (1, 2));
        assert!(tx.remove_set("a").unwrap());
        assert_eq!(tx.add_set("c", 0, 1, 4).unwrap().unwrap().kernel_id, 1, "a freed id is reused");
        assert_eq!(tx.add_set("d", 0, 1, 4).unwrap().unwrap().kernel_id, 3);
        assert!(tx.add_set("e", 0, 1, 4).unwrap().is_none(), "ids stop below the maximum");
        let net = "198.18.40.0/24".parse().unwrap();
        assert!(tx.add_set_entry("b", net, Some("vpn"), 0, 1).unwrap());
        assert!(!tx.add_set_entry("b", net, None, 0, 1).unwrap(), "once");
        tx.add_account("acme", None, AccountState::Active, Mode::Enforce, 0).unwrap();
        assert!(tx.add_set_ref("acme", "b", 0, 1).unwrap());
        assert!(tx.remove_set("b").is_err(), "a referenced set cannot go while referenced");
        assert!(tx.set_set_ref_enabled("acme", "b", false).unwrap());
        let refs = tx.set_refs("acme").unwrap();
        assert_eq!((refs.len(), refs[0].kernel_id, refs[0].enabled), (1, 2, false));
        tx.remove_account("acme").unwrap();
        assert!(tx.set_referrers("b").unwrap().is_empty(), "an account's references go with it");
        assert!(tx.remove_set("b").unwrap());
        assert!(tx.all_set_entries().unwrap().is_empty(), "a set's entries go with it");
    }
}
