//! The bindings as the kernel's binding table holds them, kept in memory by the table's one
//! writer: which keys each binding makes, and which keys a change of some addresses'
//! bindings adds, rewrites and removes.
//!
//! An address's keys depend only on the bindings of that address: a key per bound port, and
//! one address record saying which account has the whole address (if any) and whether the
//! address has port bindings (the kernel then looks for the port first). So a change names
//! the addresses it touches, and only their keys are compared and written: a command on
//! one endpoint costs the same with ten bindings on the host as with a hundred thousand.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipaccess_common::{AccountWord, AddrWords, NO_ACCOUNT, Tag, TagKind};

use super::{BindTarget, Binding, tables::SlotKey};

/// What one key of the binding table says: the account it sends packets to
/// ([`NO_ACCOUNT`] for the address record of an address bound only port by port), and
/// whether the address has port bindings (always false for a port's own key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundTo {
    pub account: u32,
    pub has_ports: bool,
}

/// The account that owns each bound endpoint of one address.
type Targets = BTreeMap<BindTarget, u32>;

/// The bindings in the kernel, by address and by account.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BindingModel {
    by_addr: BTreeMap<IpAddr, Targets>,
    /// Each account's keys, with whether each says the address has port bindings: the keys
    /// whose word is rewritten when the account's policy changes.
    by_account: BTreeMap<u32, BTreeMap<SlotKey, bool>>,
}

/// A change of the bindings of some addresses, as [`BindingModel::change`] worked it out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BindingChange {
    /// Each address's endpoints after the change (empty: none left).
    targets: Vec<(IpAddr, Targets)>,
    /// Keys to add, or to rewrite because their owner changed.
    pub written: Vec<(SlotKey, BoundTo)>,
    /// Keys to take out.
    pub removed: Vec<SlotKey>,
    /// Some address gains a key and, in the same change, another of its keys stops naming
    /// the account it named: packets the new key takes over must find it before the old one
    /// changes (see [`super::tables::Tables::change_keys`]).
    pub settle: bool,
}

impl BindingChange {
    pub fn is_empty(&self) -> bool {
        self.written.is_empty() && self.removed.is_empty()
    }
}

/// A binding at an address the change did not name.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("a binding at {0} is outside the addresses the change names")]
pub struct OutsideChange(pub IpAddr);

impl BindingModel {
    /// The model of exactly these bindings (of an endpoint bound twice, the last wins).
    pub fn of(bindings: &[Binding]) -> Self {
        let mut model = Self::default();
        for (addr, targets) in group(bindings) {
            model.put(addr, targets);
        }
        model
    }

    /// The model of the keys a binding table holds, with their words (read back from the
    /// kernel when the daemon starts over pinned maps).
    pub fn from_table(entries: impl IntoIterator<Item = (SlotKey, u64)>) -> Self {
        let mut bindings = Vec::new();
        for (key, value) in entries {
            let account = AccountWord::from_bits(value).account();
            let target = match key.tag.kind() {
                Some(TagKind::Addr) if account != NO_ACCOUNT => BindTarget::WholeAddress,
                Some(TagKind::Port) => match (key.tag.protocol(), key.tag.port()) {
                    (Some(protocol), Some(port)) => BindTarget::Port { protocol, port },
                    _ => continue,
                },
                _ => continue,
            };
            bindings.push(Binding { addr: key.addr(), target, account });
        }
        Self::of(&bindings)
    }

    /// Every binding, ordered by address, then endpoint.
    pub fn bindings(&self) -> Vec<Binding> {
        self.at_each(self.by_addr.keys())
    }

    /// The bindings at these addresses.
    pub fn at(&self, addrs: &BTreeSet<IpAddr>) -> Vec<Binding> {
        self.at_each(addrs.iter())
    }

    fn at_each<'a>(&self, addrs: impl Iterator<Item = &'a IpAddr>) -> Vec<Binding> {
        addrs
            .filter_map(|addr| Some((*addr, self.by_addr.get(addr)?)))
            .flat_map(|(addr, targets)| {
                targets.iter().map(move |(&target, &account)| Binding { addr, target, account })
            })
            .collect()
    }

    /// The addresses at which `account` has bindings.
    pub fn addresses_of(&self, account: u32) -> BTreeSet<IpAddr> {
        self.by_account.get(&account).into_iter().flat_map(|keys| keys.keys().map(SlotKey::addr)).collect()
    }

    /// `account`'s keys, each with whether it says the address has port bindings.
    pub fn keys_of(&self, account: u32) -> impl Iterator<Item = (&SlotKey, bool)> {
        self.by_account.get(&account).into_iter().flat_map(|keys| keys.iter().map(|(key, &has)| (key, has)))
    }

    /// Every key the table should hold, with its owner.
    pub fn keys(&self) -> impl Iterator<Item = (SlotKey, BoundTo)> + '_ {
        self.by_addr.iter().flat_map(|(&addr, targets)| address_keys(addr, targets))
    }

    /// What it takes for the bindings at `addrs` to become `wanted` (each of which must be
    /// at one of `addrs`), leaving every other address as it is.
    pub fn change(&self, addrs: &BTreeSet<IpAddr>, wanted: &[Binding]) -> Result<BindingChange, OutsideChange> {
        if let Some(b) = wanted.iter().find(|b| !addrs.contains(&b.addr)) {
            return Err(OutsideChange(b.addr));
        }
        let mut grouped = group(wanted);
        let mut change = BindingChange::default();
        for &addr in addrs {
            let now = self.by_addr.get(&addr).map(|t| address_keys(addr, t)).unwrap_or_default();
            let next = grouped.remove(&addr).unwrap_or_default();
            let after = address_keys(addr, &next);
            let gains = after.keys().any(|key| !now.contains_key(key));
            let hands_over = now.iter().any(|(key, was)| after.get(key).is_none_or(|is| is.account != was.account));
            change.settle |= gains && hands_over;
            change.removed.extend(now.keys().filter(|key| !after.contains_key(key)));
            change.written.extend(after.into_iter().filter(|(key, owner)| now.get(key) != Some(owner)));
            change.targets.push((addr, next));
        }
        Ok(change)
    }

    /// Makes the change's addresses hold their new bindings; returns the change that puts
    /// them back (its targets only: for [`Self::apply`], not for the table).
    pub fn apply(&mut self, change: &BindingChange) -> BindingChange {
        let mut undo = BindingChange::default();
        for (addr, targets) in &change.targets {
            let before = self.take(*addr);
            undo.targets.push((*addr, before));
            self.put(*addr, targets.clone());
        }
        undo
    }

    fn take(&mut self, addr: IpAddr) -> Targets {
        let targets = self.by_addr.remove(&addr).unwrap_or_default();
        for (key, owner) in address_keys(addr, &targets) {
            if let Some(keys) = self.by_account.get_mut(&owner.account) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_account.remove(&owner.account);
                }
            }
        }
        targets
    }

    fn put(&mut self, addr: IpAddr, targets: Targets) {
        if targets.is_empty() {
            return;
        }
        for (key, owner) in address_keys(addr, &targets) {
            if owner.account != NO_ACCOUNT {
                self.by_account.entry(owner.account).or_default().insert(key, owner.has_ports);
            }
        }
        self.by_addr.insert(addr, targets);
    }
}

/// The bindings by address.
fn group(bindings: &[Binding]) -> BTreeMap<IpAddr, Targets> {
    let mut grouped: BTreeMap<IpAddr, Targets> = BTreeMap::new();
    for b in bindings {
        grouped.entry(b.addr).or_default().insert(b.target, b.account);
    }
    grouped
}

/// The binding table's keys for one address's endpoints: one per bound port, and the
/// address record (none when nothing is bound there).
fn address_keys(addr: IpAddr, targets: &Targets) -> BTreeMap<SlotKey, BoundTo> {
    let mut keys = BTreeMap::new();
    if targets.is_empty() {
        return keys;
    }
    let (family, words) = AddrWords::of(addr);
    let (hi, lo) = (words.hi, words.lo);
    let mut whole = NO_ACCOUNT;
    let mut has_ports = false;
    for (&target, &account) in targets {
        match target {
            BindTarget::Port { protocol, port } => {
                let key = SlotKey { tag: Tag::port_binding(family, protocol, port), hi, lo };
                keys.insert(key, BoundTo { account, has_ports: false });
                has_ports = true;
            }
            BindTarget::WholeAddress => whole = account,
        }
    }
    keys.insert(SlotKey { tag: Tag::address(family), hi, lo }, BoundTo { account: whole, has_ports });
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: u8 = 6;
    const UDP: u8 = 17;

    fn port(addr: &str, protocol: u8, port: u16, account: u32) -> Binding {
        Binding { addr: addr.parse().unwrap(), target: BindTarget::Port { protocol, port }, account }
    }

    fn whole(addr: &str, account: u32) -> Binding {
        Binding { addr: addr.parse().unwrap(), target: BindTarget::WholeAddress, account }
    }

    fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    /// The keys each binding makes, written out by hand for one address of each kind.
    #[test]
    fn an_address_has_a_key_per_port_and_one_record() {
        let model = BindingModel::of(&[
            port("198.18.0.1", TCP, 443, 1),
            port("198.18.0.1", UDP, 53, 2),
            whole("198.18.0.1", 3),
            port("fd00::1", TCP, 443, 4),
            whole("198.18.0.2", 5),
        ]);
        let keys: BTreeMap<SlotKey, BoundTo> = model.keys().collect();
        let (v4, one) = AddrWords::of("198.18.0.1".parse().unwrap());
        let (_, two) = AddrWords::of("198.18.0.2".parse().unwrap());
        let (v6, six) = AddrWords::of("fd00::1".parse().unwrap());
        let key = |tag, w: AddrWords| SlotKey { tag, hi: w.hi, lo: w.lo };
        let owner = |account, has_ports| BoundTo { account, has_ports };
        let expected = BTreeMap::from([
            (key(Tag::port_binding(v4, TCP, 443), one), owner(1, false)),
            (key(Tag::port_binding(v4, UDP, 53), one), owner(2, false)),
            (key(Tag::address(v4), one), owner(3, true)),
            (key(Tag::address(v4), two), owner(5, false)),
            (key(Tag::port_binding(v6, TCP, 443), six), owner(4, false)),
            // Bound port by port only: the record says so, and names no account.
            (key(Tag::address(v6), six), owner(NO_ACCOUNT, true)),
        ]);
        assert_eq!(keys, expected);
        assert_eq!(
            model.keys_of(3).map(|(k, has)| (*k, has)).collect::<Vec<_>>(),
            [(key(Tag::address(v4), one), true)]
        );
        assert_eq!(model.addresses_of(4), addrs(&["fd00::1"]));
        assert_eq!(model.keys_of(NO_ACCOUNT).count(), 0, "a record of no account is nobody's key");
    }

    /// A change touches only the keys of the addresses it names, and only those whose owner
    /// differs: a port bound beside a whole-address binding rewrites the record (it now has
    /// ports) and adds the port's key, nothing else.
    #[test]
    fn a_change_writes_only_the_keys_that_differ() {
        let mut model = BindingModel::of(&[whole("198.18.0.1", 1), whole("198.18.0.2", 2)]);
        let at = addrs(&["198.18.0.1"]);
        let change = model.change(&at, &[whole("198.18.0.1", 1), port("198.18.0.1", TCP, 443, 2)]).unwrap();
        let (v4, one) = AddrWords::of("198.18.0.1".parse().unwrap());
        let record = SlotKey { tag: Tag::address(v4), hi: one.hi, lo: one.lo };
        let port_key = SlotKey { tag: Tag::port_binding(v4, TCP, 443), hi: one.hi, lo: one.lo };
        assert_eq!(
            change.written,
            [(port_key, BoundTo { account: 2, has_ports: false }), (record, BoundTo { account: 1, has_ports: true })]
        );
        assert!(change.removed.is_empty());
        assert!(!change.settle, "the record names the same account: no packet changes hands");
        let undo = model.apply(&change);
        assert_eq!(model.keys_of(2).count(), 2, "account 2: its whole address and the new port");
        assert_eq!(model.keys_of(1).map(|(_, has)| has).collect::<Vec<_>>(), [true]);
        // Unbinding the port takes its key out and rewrites the record back.
        let back = model.change(&at, &[whole("198.18.0.1", 1)]).unwrap();
        assert_eq!(back.removed, [port_key]);
        assert_eq!(back.written, [(record, BoundTo { account: 1, has_ports: false })]);
        model.apply(&undo);
        assert_eq!(model, BindingModel::of(&[whole("198.18.0.1", 1), whole("198.18.0.2", 2)]));
    }

    /// A new key that takes packets over from a key changing hands in the same change (a
    /// port of the whole address of 1 kept by 1 while the address goes to 2) must be seen
    /// first; a new key beside keys that keep their accounts, or a removal alone, need not.
    #[test]
    fn a_change_settles_only_when_a_new_key_takes_over_from_a_key_changing_hands() {
        let model = BindingModel::of(&[whole("198.18.0.1", 1)]);
        let at = addrs(&["198.18.0.1"]);
        let settles = |wanted: &[Binding]| model.change(&at, wanted).unwrap().settle;
        assert!(settles(&[port("198.18.0.1", TCP, 443, 1), whole("198.18.0.1", 2)]));
        assert!(settles(&[port("198.18.0.1", TCP, 443, 1)]), "the record stops naming 1");
        assert!(!settles(&[port("198.18.0.1", TCP, 443, 2), whole("198.18.0.1", 1)]));
        assert!(!settles(&[whole("198.18.0.1", 2)]), "no new key");
        assert!(!settles(&[]), "removal alone");
        let other = addrs(&["198.18.0.1", "198.18.0.2"]);
        let apart = model.change(&other, &[whole("198.18.0.2", 3)]).unwrap();
        assert!(!apart.settle, "a new key at another address takes nothing over");
    }

    #[test]
    fn a_binding_outside_the_named_addresses_is_refused() {
        let model = BindingModel::default();
        let err = model.change(&addrs(&["198.18.0.1"]), &[whole("198.18.0.2", 1)]).unwrap_err();
        assert_eq!(err, OutsideChange("198.18.0.2".parse().unwrap()));
    }

    /// Random changes of random addresses: after each, the model equals the model built
    /// from scratch of the bindings it should hold, the change's keys turn the old key set
    /// into the new one, and the undo puts the old model back.
    #[test]
    fn random_changes_agree_with_a_model_built_from_scratch() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let pool = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "fd00::1", "fd00::2"];
        let mut truth: BTreeMap<(IpAddr, BindTarget), u32> = BTreeMap::new();
        let mut model = BindingModel::default();
        for _ in 0..2_000 {
            let at: BTreeSet<IpAddr> = (0..1 + next(2)).map(|_| pool[next(5) as usize].parse().unwrap()).collect();
            let mut after = truth.clone();
            after.retain(|(addr, _), _| !at.contains(addr));
            for &addr in &at {
                for _ in 0..next(4) {
                    let target = match next(3) {
                        0 => BindTarget::WholeAddress,
                        1 => BindTarget::Port { protocol: TCP, port: 443 + next(2) as u16 },
                        _ => BindTarget::Port { protocol: UDP, port: 53 },
                    };
                    after.insert((addr, target), 1 + next(4) as u32);
                }
            }
            let wanted: Vec<Binding> = after
                .iter()
                .filter(|((addr, _), _)| at.contains(addr))
                .map(|(&(addr, target), &account)| Binding { addr, target, account })
                .collect();
            let before = model.clone();
            let change = model.change(&at, &wanted).unwrap();
            let mut keys: BTreeMap<SlotKey, BoundTo> = model.keys().collect();
            for key in &change.removed {
                assert!(keys.remove(key).is_some(), "removes a key that is there");
            }
            for (key, owner) in &change.written {
                assert_ne!(keys.insert(*key, *owner), Some(*owner), "rewrites only what differs");
            }
            let undo = model.apply(&change);
            let all: Vec<Binding> =
                after.iter().map(|(&(addr, target), &account)| Binding { addr, target, account }).collect();
            let scratch = BindingModel::of(&all);
            assert_eq!(model, scratch);
            assert_eq!(keys, scratch.keys().collect::<BTreeMap<_, _>>());
            assert_eq!(model.bindings(), all);
            let mut undone = model.clone();
            undone.apply(&undo);
            assert_eq!(undone, before);
            truth = after;
        }
    }

    /// What the kernel's table holds reads back as the bindings that made it, including
    /// an address bound port by port only (its record names no account).
    #[test]
    fn a_table_reads_back_as_its_bindings() {
        let bindings = [port("fd00::1", TCP, 443, 4), whole("198.18.0.1", 3), port("198.18.0.1", UDP, 53, 2)];
        let model = BindingModel::of(&bindings);
        let table = model.keys().map(|(key, owner)| {
            let word = if owner.account == NO_ACCOUNT {
                AccountWord::NONE
            } else {
                AccountWord::new(owner.account, ipaccess_common::Policy::UNSET, ipaccess_common::TableDesc::NONE)
            };
            (key, word.with_port_bindings(owner.has_ports).to_bits())
        });
        assert_eq!(BindingModel::from_table(table), model);
    }
}
