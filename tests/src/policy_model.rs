//! An independent reference model of the account policy: accounts in a tree, their states and
//! modes, allowlists with enabled and disabled entries, and time-limited overrides; what a
//! login check answers and what the XDP program does with a packet to the account's binding.
//!
//! It is written from the specification (the decision order in DESIGN.md and issue 10), not
//! from the daemon's code, so that `tests/tests/policy.rs` can hold the two against each other.
//! It is deliberately plain: linear scans, no caches, no kernel tables.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Active,
    Unconfirmed,
    Terminated,
    Banned,
}

impl State {
    pub const ALL: [State; 4] = [State::Active, State::Unconfirmed, State::Terminated, State::Banned];

    pub fn name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Unconfirmed => "unconfirmed",
            State::Terminated => "terminated",
            State::Banned => "banned",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    Monitor,
    Enforce,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Off, Mode::Monitor, Mode::Enforce];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Monitor => "monitor",
            Mode::Enforce => "enforce",
        }
    }
}

/// The reason a login check gives, in the order the decision tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    UnknownAccount,
    Banned,
    ParentBanned,
    Terminated,
    ParentTerminated,
    Unconfirmed,
    /// Allowed: mode off, or the address is covered.
    Allowed,
    AddressNotAllowed,
    /// Allowed in monitor mode, although the address is not covered.
    MonitorWouldDeny,
}

impl Reason {
    pub fn code(self) -> &'static str {
        match self {
            Reason::UnknownAccount => "unknown_account",
            Reason::Banned => "banned",
            Reason::ParentBanned => "parent_banned",
            Reason::Terminated => "terminated",
            Reason::ParentTerminated => "parent_terminated",
            Reason::Unconfirmed => "unconfirmed",
            Reason::Allowed => "allowed",
            Reason::AddressNotAllowed => "address_not_allowed",
            Reason::MonitorWouldDeny => "monitor_would_deny",
        }
    }

    pub fn allowed(self) -> bool {
        matches!(self, Reason::Allowed | Reason::MonitorWouldDeny)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub net: IpNet,
    pub enabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    pub id: i64,
    pub net: IpNet,
    /// Unix seconds; the override lets nothing in from this second on.
    pub expires_at: i64,
}

impl Override {
    pub fn live(&self, now: i64) -> bool {
        now < self.expires_at
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub parent: Option<String>,
    pub state: State,
    pub mode: Mode,
    pub entries: Vec<Entry>,
    pub overrides: Vec<Override>,
    /// Addresses of recorded sign-ins that were allowed (the lockout guard protects them).
    pub signed_in: BTreeSet<IpAddr>,
}

impl Account {
    /// Let in by an enabled entry or a live override?
    pub fn covers(&self, addr: IpAddr, now: i64) -> bool {
        let addr = unmap(addr);
        self.entries.iter().any(|e| e.enabled && e.net.contains(&addr))
            || self.overrides.iter().any(|o| o.live(now) && o.net.contains(&addr))
    }

    /// Has it an enabled entry or a live override?
    pub fn covers_anything(&self, now: i64) -> bool {
        self.entries.iter().any(|e| e.enabled) || self.overrides.iter().any(|o| o.live(now))
    }

    /// Would the account as it is let `addr` in? (Not enforcing: everyone.)
    pub fn lets_in(&self, addr: IpAddr, now: i64) -> bool {
        self.mode != Mode::Enforce || self.covers(addr, now)
    }

    /// The lockout guard on an unforced change from `before` that leaves the account as
    /// `self`: an enforcing account must not newly be left with nothing enabled and no live
    /// override, and must still let in every address that signed in successfully (recently:
    /// a test's whole run) and that `before` lets in. A change that shuts out nobody who gets
    /// in today passes.
    pub fn expect_guard(&self, before: &Account, now: i64) -> Expect {
        if self.mode != Mode::Enforce {
            return Expect::Ok;
        }
        let newly_nothing = !self.covers_anything(now) && (before.mode != Mode::Enforce || before.covers_anything(now));
        let shuts_out = self.signed_in.iter().any(|&a| before.lets_in(a, now) && !self.covers(a, now));
        if newly_nothing || shuts_out { Expect::Refused("lockout") } else { Expect::Ok }
    }
}

/// What the model expects of a request that changes the policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// It must succeed.
    Ok,
    /// It must fail with this error code.
    Refused(&'static str),
    /// It must fail; the code is not specified (or two would be right).
    Failed,
    /// The specification leaves it open (e.g. an override partly covered by an entry):
    /// the model follows whatever the daemon did.
    Either,
}

/// The IPv4 address an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) stands for; others unchanged.
pub fn unmap(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// The IPv4 network an IPv4-mapped IPv6 network (within `::ffff:0:0/96`) stands for.
pub fn unmap_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("96..=128 minus 96 is a v4 prefix")),
            None => net,
        },
        _ => net,
    }
}

/// `net` spelled as an IPv4-mapped IPv6 network (`::ffff:198.18.6.0/120`).
pub fn mapped_spelling(net: Ipv4Net) -> String {
    format!("::ffff:{}/{}", net.network(), net.prefix_len() + 96)
}

/// `addr` spelled as an IPv4-mapped IPv6 address.
pub fn mapped_addr(addr: Ipv4Addr) -> IpAddr {
    IpAddr::V6(addr.to_ipv6_mapped())
}

/// Does `outer` contain all of `inner`? (Different families never do.)
pub fn contains_net(outer: &IpNet, inner: &IpNet) -> bool {
    outer.prefix_len() <= inner.prefix_len() && outer.contains(&inner.network())
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    contains_net(a, b) || contains_net(b, a)
}

/// The accounts, by id.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub accounts: BTreeMap<String, Account>,
}

/// The widest override prefix the daemon grants by default.
pub const WIDEST_OVERRIDE_V4: u8 = 24;
pub const WIDEST_OVERRIDE_V6: u8 = 48;

/// The account id syntax: `^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$`.
pub fn valid_account_id(id: &str) -> bool {
    let mut chars = id.chars();
    let Some(first) = chars.next() else { return false };
    first.is_ascii_alphanumeric()
        && id.len() <= 128
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-'))
}

impl Policy {
    /// The account's parent, grandparent and so on (bounded, in case a store held a loop).
    pub fn ancestors(&self, id: &str) -> Vec<&Account> {
        let mut out = Vec::new();
        let mut next = self.accounts.get(id).and_then(|a| a.parent.as_deref());
        while let Some(parent) = next {
            let Some(account) = self.accounts.get(parent) else { break };
            out.push(account);
            if out.len() > self.accounts.len() {
                break;
            }
            next = account.parent.as_deref();
        }
        out
    }

    /// Banned or terminated, itself or any ancestor: nothing gets through, nothing is granted.
    pub fn suspended(&self, id: &str) -> bool {
        let own = self.accounts.get(id).is_some_and(|a| matches!(a.state, State::Banned | State::Terminated));
        own || self.ancestors(id).iter().any(|a| matches!(a.state, State::Banned | State::Terminated))
    }

    /// Is `addr` let in by an enabled entry or a live override of `id`?
    pub fn covered(&self, id: &str, addr: IpAddr, now: i64) -> bool {
        self.accounts.get(id).is_some_and(|a| a.covers(addr, now))
    }

    /// The login check: first match wins.
    pub fn check(&self, id: &str, addr: IpAddr, now: i64) -> Reason {
        let Some(account) = self.accounts.get(id) else { return Reason::UnknownAccount };
        let ancestors = self.ancestors(id);
        if account.state == State::Banned {
            return Reason::Banned;
        }
        if ancestors.iter().any(|a| a.state == State::Banned) {
            return Reason::ParentBanned;
        }
        if account.state == State::Terminated {
            return Reason::Terminated;
        }
        if ancestors.iter().any(|a| a.state == State::Terminated) {
            return Reason::ParentTerminated;
        }
        if account.state == State::Unconfirmed {
            return Reason::Unconfirmed;
        }
        if account.mode == Mode::Off || self.covered(id, addr, now) {
            return Reason::Allowed;
        }
        match account.mode {
            Mode::Enforce => Reason::AddressNotAllowed,
            _ => Reason::MonitorWouldDeny,
        }
    }

    /// Does the XDP program drop a packet from `src` to one of `id`'s bindings? Unconfirmed
    /// accounts are not filtered on the wire; monitor and off pass unless suspended.
    pub fn wire_drops(&self, id: &str, src: IpAddr, now: i64) -> bool {
        let Some(account) = self.accounts.get(id) else { return false };
        self.suspended(id) || (account.mode == Mode::Enforce && !self.covered(id, src, now))
    }

    /// `account_add`: what must happen.
    pub fn expect_add(&self, id: &str, parent: Option<&str>) -> Expect {
        if !valid_account_id(id) {
            return Expect::Refused("bad_request");
        }
        if self.accounts.contains_key(id) {
            return Expect::Refused("account_exists");
        }
        match parent.map(|p| self.accounts.get(p)) {
            // The parent must exist; the code for a missing one is not specified.
            Some(None) => Expect::Failed,
            Some(Some(p)) if p.parent.is_some() => Expect::Refused("refused"),
            _ => Expect::Ok,
        }
    }

    pub fn add(&mut self, id: &str, parent: Option<&str>, unconfirmed: bool) {
        let state = if unconfirmed { State::Unconfirmed } else { State::Active };
        let account = Account {
            parent: parent.map(str::to_string),
            state,
            mode: Mode::Off,
            entries: Vec::new(),
            overrides: Vec::new(),
            signed_in: BTreeSet::new(),
        };
        self.accounts.insert(id.to_string(), account);
    }

    /// `account_remove`: sub-users go too only when asked for.
    pub fn expect_remove(&self, id: &str, recursive: bool) -> Expect {
        if !self.accounts.contains_key(id) {
            Expect::Refused("unknown_account")
        } else if !recursive && self.accounts.values().any(|a| a.parent.as_deref() == Some(id)) {
            Expect::Failed
        } else {
            Expect::Ok
        }
    }

    /// Removes `id` and everything below it; returns the ids removed.
    pub fn remove(&mut self, id: &str) -> Vec<String> {
        let mut gone = vec![id.to_string()];
        let mut i = 0;
        while i < gone.len() {
            let children = self.accounts.iter().filter(|(_, a)| a.parent.as_deref() == Some(gone[i].as_str()));
            let children: Vec<String> = children.map(|(c, _)| c.clone()).filter(|c| !gone.contains(c)).collect();
            gone.extend(children);
            i += 1;
        }
        for id in &gone {
            self.accounts.remove(id);
        }
        gone
    }

    /// `override_grant` of `net` (already normalised) at `now`.
    pub fn expect_grant(&self, id: &str, net: &IpNet, now: i64) -> Expect {
        let Some(account) = self.accounts.get(id) else { return Expect::Refused("unknown_account") };
        let widest = match net {
            IpNet::V4(_) => WIDEST_OVERRIDE_V4,
            IpNet::V6(_) => WIDEST_OVERRIDE_V6,
        };
        let too_wide = net.prefix_len() < widest;
        let refused = self.suspended(id)
            || account.state == State::Unconfirmed
            || matches!(account.mode, Mode::Off | Mode::Monitor);
        // "Already allowed": wholly inside one enabled entry or live override. Partly covered
        // is left open by the specification.
        let allowers = || {
            let entries = account.entries.iter().filter(|e| e.enabled).map(|e| e.net);
            entries.chain(account.overrides.iter().filter(|o| o.live(now)).map(|o| o.net))
        };
        let covered = allowers().any(|n| contains_net(&n, net));
        let partly = !covered && allowers().any(|n| overlaps(&n, net));
        match (too_wide, refused || covered) {
            // Two reasons to refuse: either code will do, but it must be refused.
            (true, true) => Expect::Failed,
            (true, false) => Expect::Refused("bad_request"),
            (false, true) => Expect::Refused("refused"),
            (false, false) if partly => Expect::Either,
            (false, false) => Expect::Ok,
        }
    }
}

/// A random host address inside `net` (or its only one).
pub fn host_in(net: &IpNet, bits: u128) -> IpAddr {
    match net {
        IpNet::V4(n) => {
            let host = (bits as u32) & !u32::from(n.netmask());
            IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
        }
        IpNet::V6(n) => {
            let host = bits & !u128::from(n.netmask());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
        }
    }
}

/// The addresses just outside `net` (below its first and above its last), where they exist.
pub fn just_outside(net: &IpNet) -> Vec<IpAddr> {
    match net {
        IpNet::V4(n) => {
            let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
            [lo.checked_sub(1), hi.checked_add(1)].into_iter().flatten().map(|a| IpAddr::V4(a.into())).collect()
        }
        IpNet::V6(n) => {
            let (lo, hi) = (u128::from(n.network()), u128::from(n.broadcast()));
            [lo.checked_sub(1), hi.checked_add(1)].into_iter().flatten().map(|a| IpAddr::V6(a.into())).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn policy() -> Policy {
        let mut p = Policy::default();
        p.add("top", None, false);
        p.add("sub", Some("top"), false);
        let sub = p.accounts.get_mut("sub").unwrap();
        sub.mode = Mode::Enforce;
        sub.entries.push(Entry { net: net("198.18.1.0/24"), enabled: true });
        sub.entries.push(Entry { net: net("198.18.2.0/24"), enabled: false });
        sub.overrides.push(Override { id: 1, net: net("198.18.3.3/32"), expires_at: 100 });
        p
    }

    #[test]
    fn decision_order() {
        let mut p = policy();
        let a = |s: &str| -> IpAddr { s.parse().unwrap() };
        assert_eq!(p.check("nobody", a("198.18.1.1"), 0), Reason::UnknownAccount);
        assert_eq!(p.check("sub", a("198.18.1.1"), 0), Reason::Allowed);
        assert_eq!(p.check("sub", a("::ffff:198.18.1.1"), 0), Reason::Allowed);
        assert_eq!(p.check("sub", a("198.18.2.1"), 0), Reason::AddressNotAllowed, "disabled entries let nothing in");
        assert_eq!(p.check("sub", a("198.18.3.3"), 99), Reason::Allowed);
        assert_eq!(p.check("sub", a("198.18.3.3"), 100), Reason::AddressNotAllowed, "expired at expires_at");
        p.accounts.get_mut("sub").unwrap().state = State::Unconfirmed;
        assert_eq!(p.check("sub", a("198.18.1.1"), 0), Reason::Unconfirmed);
        assert!(!p.wire_drops("sub", a("198.18.1.1"), 0), "unconfirmed is not filtered on the wire");
        p.accounts.get_mut("top").unwrap().state = State::Terminated;
        assert_eq!(p.check("sub", a("198.18.1.1"), 0), Reason::ParentTerminated);
        assert!(p.wire_drops("sub", a("198.18.1.1"), 0));
        p.accounts.get_mut("sub").unwrap().state = State::Terminated;
        assert_eq!(p.check("sub", a("198.18.1.1"), 0), Reason::Terminated);
        p.accounts.get_mut("top").unwrap().state = State::Banned;
        assert_eq!(p.check("sub", a("198.18.1.1"), 0), Reason::ParentBanned, "a parent's ban before own termination");
        p.accounts.get_mut("sub").unwrap().state = State::Banned;
        assert_eq!(p.check("sub", a("198.18.1.1"), 0), Reason::Banned);
    }

    #[test]
    fn modes() {
        let mut p = policy();
        let a: IpAddr = "198.18.9.9".parse().unwrap();
        assert!(p.wire_drops("sub", a, 0));
        p.accounts.get_mut("sub").unwrap().mode = Mode::Monitor;
        assert_eq!(p.check("sub", a, 0), Reason::MonitorWouldDeny);
        assert!(!p.wire_drops("sub", a, 0));
        p.accounts.get_mut("sub").unwrap().mode = Mode::Off;
        assert_eq!(p.check("sub", a, 0), Reason::Allowed);
    }

    #[test]
    fn grants_and_nesting() {
        let p = policy();
        assert_eq!(p.expect_add("subsub", Some("sub")), Expect::Refused("refused"));
        assert_eq!(p.expect_add("-x", None), Expect::Refused("bad_request"));
        assert_eq!(p.expect_add("top", None), Expect::Refused("account_exists"));
        assert_eq!(p.expect_grant("sub", &net("198.18.1.7/32"), 0), Expect::Refused("refused"));
        assert_eq!(p.expect_grant("sub", &net("198.18.2.7/32"), 0), Expect::Ok, "a disabled entry allows nothing");
        assert_eq!(p.expect_grant("sub", &net("198.18.1.0/25"), 0), Expect::Refused("refused"), "inside an entry");
        assert_eq!(p.expect_grant("sub", &net("198.18.3.0/24"), 0), Expect::Either, "partly allowed by an override");
        assert_eq!(p.expect_grant("sub", &net("198.19.0.0/16"), 0), Expect::Refused("bad_request"));
        assert_eq!(p.expect_grant("top", &net("198.19.0.0/16"), 0), Expect::Failed, "too wide and mode off");
        assert_eq!(p.expect_grant("top", &net("198.18.7.7/32"), 0), Expect::Refused("refused"), "mode off");
    }

    #[test]
    fn lockout_guard() {
        let mut p = policy();
        let sub = p.accounts.get_mut("sub").unwrap();
        let before = sub.clone();
        assert_eq!(sub.expect_guard(&before, 0), Expect::Ok);
        sub.signed_in.insert("::ffff:198.18.1.9".parse().unwrap());
        let before = sub.clone();
        assert_eq!(sub.expect_guard(&before, 0), Expect::Ok, "a mapped sign-in is its IPv4 address");
        sub.entries[0].enabled = false;
        assert_eq!(sub.expect_guard(&before, 0), Expect::Refused("lockout"), "a recent sign-in shut out");
        // Already shut out before the change: nobody who gets in today is shut out by it.
        let disabled = sub.clone();
        assert_eq!(sub.expect_guard(&disabled, 0), Expect::Ok, "removing a disabled entry");
        sub.signed_in.clear();
        assert_eq!(sub.expect_guard(&before, 0), Expect::Ok, "a live override is a way in");
        assert_eq!(sub.expect_guard(&before, 100), Expect::Refused("lockout"), "nothing enabled, nothing live");
        assert_eq!(sub.expect_guard(&disabled, 100), Expect::Ok, "already enforcing with nothing: not newly");
        sub.mode = Mode::Monitor;
        assert_eq!(sub.expect_guard(&before, 100), Expect::Ok);
    }

    #[test]
    fn mapped_networks() {
        assert_eq!(unmap_net(net("::ffff:198.18.6.0/120")), net("198.18.6.0/24"));
        assert_eq!(unmap_net(net("::ffff:198.18.7.7/128")), net("198.18.7.7/32"));
        assert_eq!(unmap_net(net("fd00::/64")), net("fd00::/64"));
        assert_eq!(mapped_spelling("198.18.6.0/24".parse().unwrap()), "::ffff:198.18.6.0/120");
        assert!(valid_account_id("a.b_c@d+e-f"));
        assert!(!valid_account_id(&"a".repeat(129)));
        assert!(valid_account_id(&"a".repeat(128)));
    }
}
