//! The fleet's key layout in etcd, under the configured prefix `P`:
//!
//! | key | value |
//! |---|---|
//! | `P/accounts/<id>` | the account's [`AccountDoc`]: row, allowlist, live overrides, set references |
//! | `P/sets/<name>` | a shared set's [`crate::store::SetDoc`]: its networks |
//! | `P/slots/<slot>` | the id of the account in that kernel slot |
//! | `P/bindings/<addr>/<target>/<scope>` | the owning account; scope `*` is fleet-wide |
//! | `P/sequences/overrides` | the highest override id granted |
//! | `P/audit/<unix seconds>/<node>/<n>` | one audit record |
//! | `P/~nodes/<node>` | a live node's applied revision, under its lease |
//! | `P/~attempts/<account>/<addr>/<method>/<node>` | that node's denied checks, under a lease of the retention |
//! | `P/~signins/<account>/<addr>/<node>` | that node's last successful sign-in from there, under a lease of 8 days |
//!
//! The policy is everything before `P/~`: nodes watch and read only that range, so a node
//! publishing its revision is not itself an event every node must apply.
//!
//! Each rule is then a compare on the keys one change writes or reads: an account's own
//! document carries everything its lockout check weighs; a sub-user or a binding rewrites
//! the document of the account it hangs on, so a concurrent removal or ban of that account
//! conflicts with it; a slot or an endpoint has one key, so two owners conflict. A change
//! whose check reads a set (a reference made, an account's lockout check) holds the set's
//! key; a set change that takes networks away (or the set) holds every account's, since
//! any account may have come to depend on it. See docs/design.md, "A fleet".

use std::net::IpAddr;

use crate::protocol::{Binding, Proto};
use crate::store::AccountDoc;

/// Keys under one fleet's prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// What one key of the prefix is.
#[derive(Debug, PartialEq, Eq)]
pub enum Key {
    Account(String),
    Set(String),
    Slot(u32),
    /// An endpoint's binding: address, target, scope.
    Binding(IpAddr, Option<(Proto, u16)>, String),
    OverrideSequence,
    Audit,
    /// Written by a newer version, or by hand: ignored.
    Other,
}

/// The scope of a binding every node enforces.
pub const FLEET_WIDE: &str = "*";

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_owned() }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn account(&self, id: &str) -> String {
        format!("{}accounts/{id}", self.prefix)
    }

    pub fn set(&self, name: &str) -> String {
        format!("{}sets/{name}", self.prefix)
    }

    /// Every account's document: `[start, end)`.
    pub fn accounts_range(&self) -> (String, String) {
        (format!("{}accounts/", self.prefix), format!("{}accounts0", self.prefix))
    }

    pub fn slot(&self, slot: u32) -> String {
        format!("{}slots/{slot}", self.prefix)
    }

    pub fn binding(&self, addr: IpAddr, target: Option<(Proto, u16)>, scope: &str) -> String {
        format!("{}{}{scope}", self.prefix, endpoint_part(addr, target))
    }

    /// Every scope's key of one endpoint: `[start, end)` of a range.
    pub fn endpoint_range(&self, addr: IpAddr, target: Option<(Proto, u16)>) -> (String, String) {
        let start = format!("{}{}", self.prefix, endpoint_part(addr, target));
        let mut end = start.clone().into_bytes();
        *end.last_mut().expect("not empty") += 1;
        (start, String::from_utf8(end).expect("'/' + 1 is '0'"))
    }

    pub fn override_sequence(&self) -> String {
        format!("{}sequences/overrides", self.prefix)
    }

    /// `unique` tells apart the records one node writes in the same second.
    pub fn audit(&self, time: i64, node: &str, unique: &str) -> String {
        format!("{}audit/{time:011}/{node}/{unique}", self.prefix)
    }

    /// Audit keys older than `time`: `[start, end)`.
    pub fn audit_before(&self, time: i64) -> (String, String) {
        (format!("{}audit/", self.prefix), format!("{}audit/{time:011}", self.prefix))
    }

    /// What a snapshot reads, each `[start, end)`: sets, accounts, bindings, audit records
    /// and the sequence (slots are only guards; their content is in the documents).
    pub fn snapshot_ranges(&self) -> [(String, String); 5] {
        ["sets/", "accounts/", "bindings/", "audit/", "sequences/"].map(|part| {
            let start = format!("{}{part}", self.prefix);
            let end = format!("{}{}0", self.prefix, part.trim_end_matches('/'));
            (start, end)
        })
    }

    /// The policy's keys: `[start, end)`, everything a node follows.
    pub fn policy_range(&self) -> (String, String) {
        (self.prefix.clone(), format!("{}~", self.prefix))
    }

    /// Where live nodes publish their applied revision.
    pub fn nodes(&self) -> (String, String) {
        (format!("{}~nodes/", self.prefix), format!("{}~nodes0", self.prefix))
    }

    pub fn node(&self, name: &str) -> String {
        format!("{}~nodes/{name}", self.prefix)
    }

    /// Where `node` publishes the denied checks of `account` from `address` with `method`
    /// (see `cluster::attempts`). Account ids and methods have no `/`, nor do addresses.
    pub fn attempts(&self, account: &str, address: &str, method: &str, node: &str) -> String {
        format!("{}~attempts/{account}/{address}/{method}/{node}", self.prefix)
    }

    /// Every node's published denied checks of `account`: `[start, end)`.
    pub fn account_attempts(&self, account: &str) -> (String, String) {
        (format!("{}~attempts/{account}/", self.prefix), format!("{}~attempts/{account}0", self.prefix))
    }

    /// The address, method and node of a key of [`Keys::account_attempts`]`(account)`.
    pub fn parse_attempts<'k>(&self, account: &str, key: &'k str) -> Option<(&'k str, &'k str, &'k str)> {
        let rest = key.strip_prefix(self.account_attempts(account).0.as_str())?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(address), Some(method), Some(node), None) if !node.is_empty() => Some((address, method, node)),
            _ => None,
        }
    }

    /// Where `node` publishes the last successful sign-in of `account` from `address` (see
    /// `cluster::signins`).
    pub fn signins(&self, account: &str, address: &str, node: &str) -> String {
        format!("{}~signins/{account}/{address}/{node}", self.prefix)
    }

    /// Every node's published sign-ins of `account`: `[start, end)`.
    pub fn account_signins(&self, account: &str) -> (String, String) {
        (format!("{}~signins/{account}/", self.prefix), format!("{}~signins/{account}0", self.prefix))
    }

    /// Every node's published sign-ins of every account: `[start, end)`.
    pub fn all_signins(&self) -> (String, String) {
        (format!("{}~signins/", self.prefix), format!("{}~signins0", self.prefix))
    }

    /// The account, address and node of a key of [`Keys::all_signins`].
    pub fn parse_signins<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str, &'k str)> {
        let rest = key.strip_prefix(self.all_signins().0.as_str())?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(account), Some(address), Some(node), None) if !account.is_empty() && !node.is_empty() => {
                Some((account, address, node))
            }
            _ => None,
        }
    }

    /// What `key` is, if it is under this prefix.
    pub fn parse(&self, key: &[u8]) -> Key {
        let Some(rest) = std::str::from_utf8(key).ok().and_then(|k| k.strip_prefix(self.prefix.as_str())) else {
            return Key::Other;
        };
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("accounts"), Some(id), None, ..) if !id.is_empty() => Key::Account(id.to_owned()),
            (Some("sets"), Some(name), None, ..) if !name.is_empty() => Key::Set(name.to_owned()),
            (Some("slots"), Some(slot), None, ..) => slot.parse().map_or(Key::Other, Key::Slot),
            (Some("bindings"), Some(addr), Some(target), Some(scope), None) if !scope.is_empty() => {
                match (addr.parse(), parse_target(target)) {
                    (Ok(addr), Some(target)) => Key::Binding(addr, target, scope.to_owned()),
                    _ => Key::Other,
                }
            }
            (Some("sequences"), Some("overrides"), None, ..) => Key::OverrideSequence,
            (Some("audit"), ..) => Key::Audit,
            _ => Key::Other,
        }
    }
}

fn endpoint_part(addr: IpAddr, target: Option<(Proto, u16)>) -> String {
    let target = match target {
        None => "all".to_owned(),
        Some((proto, port)) => format!("{proto}:{port}"),
    };
    format!("bindings/{addr}/{target}/")
}

fn parse_target(text: &str) -> Option<Option<(Proto, u16)>> {
    if text == "all" {
        return Some(None);
    }
    let (proto, port) = text.split_once(':')?;
    Some(Some((proto.parse().ok()?, port.parse().ok()?)))
}

/// A binding's value: its owner and when it was made.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct BindingValue {
    pub account: String,
    pub created_at: i64,
}

impl BindingValue {
    pub fn of(binding: &Binding) -> BindingValue {
        BindingValue { account: binding.account.clone(), created_at: binding.created_at }
    }

    /// The binding of the key `(addr, target, scope)` this value was read from.
    pub fn binding(self, addr: IpAddr, target: Option<(Proto, u16)>, scope: &str) -> Binding {
        Binding { account: self.account, addr, target, created_at: self.created_at, node: node_of(scope) }
    }
}

/// The node a binding's scope names: `None` for fleet-wide.
pub fn node_of(scope: &str) -> Option<String> {
    (scope != FLEET_WIDE).then(|| scope.to_owned())
}

/// The scope part of a binding's key.
pub fn scope_of(binding: &Binding) -> &str {
    binding.node.as_deref().unwrap_or(FLEET_WIDE)
}

pub fn encode(doc: &AccountDoc) -> Vec<u8> {
    serde_json::to_vec(doc).expect("a document serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reads_back_as_what_it_was_made_for() {
        let keys = Keys::new("/ipa/");
        assert_eq!(keys.parse(keys.account("acme").as_bytes()), Key::Account("acme".into()));
        assert_eq!(keys.parse(keys.set("corp-vpn").as_bytes()), Key::Set("corp-vpn".into()));
        assert_eq!(keys.parse(b"/ipa/sets/a/b"), Key::Other);
        assert_eq!(keys.parse(keys.slot(7).as_bytes()), Key::Slot(7));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        for target in [None, Some((Proto::Tcp, 443)), Some((Proto::Udp, 53))] {
            let key = keys.binding(v6, target, FLEET_WIDE);
            assert_eq!(keys.parse(key.as_bytes()), Key::Binding(v6, target, "*".into()), "{key}");
            let (start, end) = keys.endpoint_range(v6, target);
            assert!(key >= start && key < end, "{key} outside [{start}, {end})");
            let node = keys.binding(v6, target, "mx1");
            assert!(node >= start && node < end);
        }
        // A port binding's range does not reach another port's keys.
        let (_, end) = keys.endpoint_range(v6, Some((Proto::Tcp, 44)));
        assert!(keys.binding(v6, Some((Proto::Tcp, 443)), "*") > end);
        assert_eq!(keys.parse(keys.override_sequence().as_bytes()), Key::OverrideSequence);
        assert_eq!(keys.parse(keys.audit(1_700_000_000, "mx1", "0").as_bytes()), Key::Audit);
        assert_eq!(keys.parse(b"/ipa/accounts/a/b"), Key::Other);
        assert_eq!(keys.parse(b"/other/accounts/a"), Key::Other);
        // Node records are outside the policy's range; every policy key is inside it.
        let (start, end) = keys.policy_range();
        assert!(keys.node("mx1") >= end);
        for key in [keys.account("zz"), keys.slot(9), keys.override_sequence(), keys.audit(9, "mx1", "0")] {
            assert!(key >= start && key < end, "{key}");
        }
        let (start, end) = keys.nodes();
        assert!(keys.node("mx1") >= start && keys.node("mx1") < end);
        let [sets, accounts, bindings, audit, sequences] = keys.snapshot_ranges();
        assert_eq!(accounts, keys.accounts_range());
        assert!(keys.set("a") >= keys.policy_range().0 && keys.set("a") < keys.policy_range().1);
        let inside = |key: &str, (start, end): &(String, String)| key >= start.as_str() && key < end.as_str();
        assert!(inside(&keys.account("zz"), &accounts) && !inside(&keys.slot(1), &accounts));
        assert!(inside(&keys.set("zz"), &sets) && !inside(&keys.account("a"), &sets));
        assert!(!inside(&keys.set("zz"), &accounts));
        assert!(inside(&keys.binding(v6, None, "*"), &bindings) && !inside(&keys.account("a"), &bindings));
        assert!(inside(&keys.audit(9, "mx1", "0"), &audit) && !inside(&keys.override_sequence(), &audit));
        assert!(inside(&keys.override_sequence(), &sequences) && !inside(&keys.slot(1), &sequences));
        // Published attempts are outside the policy, and one account's range holds no other's.
        let attempt = keys.attempts("acme", "fd00::1", "password", "mx1");
        assert!(attempt >= keys.policy_range().1, "{attempt}");
        assert!(attempt < keys.nodes().0 || attempt >= keys.nodes().1);
        assert_eq!(keys.parse_attempts("acme", &attempt), Some(("fd00::1", "password", "mx1")));
        let (start, end) = keys.account_attempts("acme");
        assert!(attempt >= start && attempt < end);
        for other in [keys.attempts("acme.b", "*", "sso", "mx1"), keys.attempts("acm", "198.18.0.1", "sso", "mx1")] {
            assert!(other < start || other >= end, "{other}");
            assert_eq!(keys.parse_attempts("acme", &other), None);
        }
        // So are published sign-ins; an account's range holds its keys and no other's.
        let signin = keys.signins("acme", "fd00::1", "mx1");
        assert!(signin >= keys.policy_range().1 && (signin < keys.nodes().0 || signin >= keys.nodes().1));
        assert!(signin >= keys.account_attempts("acme").1 || signin < keys.account_attempts("acme").0);
        assert_eq!(keys.parse_signins(&signin), Some(("acme", "fd00::1", "mx1")));
        let (start, end) = keys.account_signins("acme");
        assert!(signin >= start && signin < end);
        let (all_start, all_end) = keys.all_signins();
        assert!(start >= all_start && end <= all_end);
        for other in [keys.signins("acme.b", "fd00::1", "mx1"), keys.signins("acm", "198.18.0.1", "mx1")] {
            assert!(other < start || other >= end, "{other}");
            assert!(other >= all_start && other < all_end, "{other}");
        }
        assert_eq!(keys.parse_signins(&attempt), None);
        assert_eq!(keys.parse_signins("/ipa/~signins/acme/fd00::1/mx1/x"), None);
        let (start, end) = keys.audit_before(1_700_000_001);
        let old = keys.audit(1_700_000_000, "mx1", "3");
        assert!(old >= start && old < end);
        assert!(keys.audit(1_700_000_001, "mx1", "0") >= end);
    }
}
