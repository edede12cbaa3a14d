//! The account policy as pure functions: what an account's state is once its ancestors are
//! taken into account, the login decision, and the rules every name, address and text must
//! follow before it reaches the store. Nothing here does I/O, so all of it is unit-tested.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::protocol::{AccountState, CheckResult, EffectiveState, Mode, OverrideRef, Reason};

/// How far up a chain of parents is followed. New stores hold one level of sub-users; an
/// older store may hold deeper trees, and a damaged one could even hold a cycle.
pub const MAX_ANCESTRY: usize = 64;

/// What a login check and the kernel need to know about an account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountPolicy {
    pub slot: u32,
    pub parent: Option<String>,
    pub state: AccountState,
    pub mode: Mode,
    /// The enabled allowlist entries that never expire (disabled ones let nothing in and
    /// are not here).
    pub entries: Vec<IpNet>,
    /// The enabled entries with an expiry: each lets in until its `expires_at`, then nothing
    /// (the kernel stops on its own, as for overrides; the sweep then drops them from here).
    pub expiring: Vec<ExpiringEntry>,
    pub overrides: Vec<LiveOverride>,
    /// The shared sets whose entries also let in (its enabled references only; their
    /// entries live once, in [`Sets`], not here).
    pub sets: Vec<SetUse>,
}

impl AccountPolicy {
    /// When its overrides and expiring entries end (unix s).
    fn expiries(&self) -> impl Iterator<Item = i64> + '_ {
        let overrides = self.overrides.iter().map(|o| o.expires_at);
        overrides.chain(self.expiring.iter().map(|e| e.expires_at))
    }

    /// The earliest end of its overrides and expiring entries (unix s), if it has any.
    pub fn earliest_expiry(&self) -> Option<i64> {
        self.expiries().min()
    }
}

/// Every account's committed policy, with a bound on the earliest expiry among them, so
/// that the sweep walks the accounts (about 2 ms at 100,000, under the lock every change
/// takes) only when something may have ended.
#[derive(Debug, Default)]
pub struct AccountCache {
    accounts: HashMap<String, AccountPolicy>,
    /// No override or expiring entry in the cache ends before this (unix s). Kept by
    /// [`AccountCache::extend`]: a policy put in any other way must not bring an earlier end.
    next_expiry: i64,
}

impl AccountCache {
    pub fn new(accounts: HashMap<String, AccountPolicy>) -> AccountCache {
        let next_expiry = accounts.values().filter_map(AccountPolicy::earliest_expiry).min().unwrap_or(i64::MAX);
        AccountCache { accounts, next_expiry }
    }

    /// Puts these accounts' new policies in (replacing their old ones).
    pub fn extend(&mut self, policies: impl IntoIterator<Item = (String, AccountPolicy)>) {
        for (id, policy) in policies {
            if let Some(end) = policy.earliest_expiry() {
                self.next_expiry = self.next_expiry.min(end);
            }
            self.accounts.insert(id, policy);
        }
    }

    /// Whether an override or expiring entry may have ended by `now`.
    pub fn may_have_expired(&self, now: i64) -> bool {
        self.next_expiry <= now
    }

    /// The accounts with an override or expiring entry that ended by `now`, and the
    /// earliest end after `now` among all accounts (a walk of them all, under the read lock).
    pub fn expired(&self, now: i64) -> (Vec<String>, i64) {
        let mut expired = Vec::new();
        let mut next_expiry = i64::MAX;
        for (id, account) in &self.accounts {
            let (mut ended, mut later) = (false, i64::MAX);
            for end in account.expiries() {
                if end <= now {
                    ended = true;
                } else {
                    later = later.min(end);
                }
            }
            if ended {
                expired.push(id.clone());
            }
            next_expiry = next_expiry.min(later);
        }
        (expired, next_expiry)
    }

    /// Drops what ended by `now` from the accounts [`AccountCache::expired`] found, and
    /// takes its `next_expiry`; nothing may have been put in since (the caller holds the
    /// writer lock throughout).
    pub fn sweep(&mut self, expired: &[String], now: i64, next_expiry: i64) {
        self.next_expiry = next_expiry;
        for id in expired {
            if let Some(account) = self.accounts.get_mut(id) {
                account.overrides.retain(|o| o.expires_at > now);
                account.expiring.retain(|e| e.expires_at > now);
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<AccountPolicy> {
        self.accounts.remove(id)
    }
}

impl std::ops::Deref for AccountCache {
    type Target = HashMap<String, AccountPolicy>;

    fn deref(&self) -> &Self::Target {
        &self.accounts
    }
}

/// An enabled reference to a shared set: its name and its id in this node's kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetUse {
    pub name: String,
    pub kernel_id: u32,
}

/// A shared set as the checks and the kernel need it: its networks, held once for every
/// account that references it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetPolicy {
    pub kernel_id: u32,
    pub entries: Vec<IpNet>,
}

/// Every shared set, by name.
pub type Sets = HashMap<String, SetPolicy>;

/// An enabled allowlist entry that lets in until `expires_at` (unix s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpiringEntry {
    pub cidr: IpNet,
    pub expires_at: i64,
}

/// A support override as the policy sees it: it covers `cidr` until `expires_at` (unix s).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveOverride {
    pub id: i64,
    pub cidr: IpNet,
    pub expires_at: i64,
}

impl AccountPolicy {
    /// The enabled entry, live at `now`, that covers `addr`, if any: a permanent one first,
    /// then the one that lasts longest, so the answer does not name one about to expire.
    pub fn entry_covering(&self, addr: IpAddr, now: i64) -> Option<(IpNet, Option<i64>)> {
        if let Some(net) = self.entries.iter().copied().find(|net| net.contains(&addr)) {
            return Some((net, None));
        }
        self.live_expiring(now)
            .filter(|e| e.cidr.contains(&addr))
            .max_by_key(|e| e.expires_at)
            .map(|e| (e.cidr, Some(e.expires_at)))
    }

    /// Entries with an expiry that are still live at `now`.
    pub fn live_expiring(&self, now: i64) -> impl Iterator<Item = &ExpiringEntry> {
        self.expiring.iter().filter(move |e| e.expires_at > now)
    }

    /// Every enabled entry live at `now`, permanent or not.
    pub fn live_entries(&self, now: i64) -> impl Iterator<Item = IpNet> + '_ {
        self.entries.iter().copied().chain(self.live_expiring(now).map(|e| e.cidr))
    }

    /// The entry a use at `at` is credited to: the most specific enabled entry live then,
    /// with an expiry or without, that covers `key` (a sign-in's address as a host network,
    /// or a key the kernel stamped, which is an entry's or one it was expanded to). Removing
    /// that entry alone could shut the address out only if no other covers it.
    pub fn credited_entry(&self, key: IpNet, at: i64) -> Option<IpNet> {
        self.live_entries(at).filter(|net| net.contains(&key)).max_by_key(|net| net.prefix_len())
    }

    /// Takes `cidr` out of the enabled entries (removed or disabled), expiring or not.
    pub fn withdraw(&mut self, cidr: IpNet) {
        self.entries.retain(|&net| net != cidr);
        self.expiring.retain(|e| e.cidr != cidr);
    }

    /// The override, live at `now`, that covers `addr`, if any.
    pub fn override_covering(&self, addr: IpAddr, now: i64) -> Option<LiveOverride> {
        self.overrides.iter().copied().find(|o| o.expires_at > now && o.cidr.contains(&addr))
    }

    pub fn covers(&self, addr: IpAddr, now: i64) -> bool {
        self.entry_covering(addr, now).is_some() || self.override_covering(addr, now).is_some()
    }

    /// Live overrides at `now`.
    pub fn live_overrides(&self, now: i64) -> impl Iterator<Item = &LiveOverride> {
        self.overrides.iter().filter(move |o| o.expires_at > now)
    }

    /// The most specific network of an enabled referenced set that covers `addr`, with the
    /// set's name (sets the account references but `sets` lacks let nothing in).
    pub fn set_entry_covering<'s>(&'s self, sets: &'s Sets, addr: IpAddr) -> Option<(&'s str, IpNet)> {
        self.sets
            .iter()
            .filter_map(|r| sets.get(&r.name).map(|set| (r.name.as_str(), set)))
            .flat_map(|(name, set)| set.entries.iter().filter(|n| n.contains(&addr)).map(move |&n| (name, n)))
            .max_by_key(|(_, n)| n.prefix_len())
    }

    /// This policy with the networks of its enabled sets (as `sets` holds them) counted as
    /// its own permanent entries: what the lockout guard weighs. A copy for one change, never
    /// the cache's.
    pub fn with_set_entries(&self, sets: &Sets) -> AccountPolicy {
        let mut flat = self.clone();
        for r in &self.sets {
            flat.entries.extend(sets.get(&r.name).into_iter().flat_map(|s| s.entries.iter().copied()));
        }
        flat
    }
}

/// Enabled entries (network, enabled, expiry) as the policy holds them at `now`: the
/// permanent ones, and those with an expiry still to come. One that has ended lets nobody
/// in and stays only in the store's list (held here, the sweep would find it again after
/// every restart and every change to its account).
pub fn split_entries(
    all: impl Iterator<Item = (IpNet, bool, Option<i64>)>,
    now: i64,
) -> (Vec<IpNet>, Vec<ExpiringEntry>) {
    let (mut entries, mut expiring) = (Vec::new(), Vec::new());
    for (cidr, _, expires_at) in all.filter(|&(_, enabled, _)| enabled) {
        match expires_at {
            None => entries.push(cidr),
            Some(expires_at) if expires_at > now => expiring.push(ExpiringEntry { cidr, expires_at }),
            Some(_) => {}
        }
    }
    (entries, expiring)
}

/// The account's state as it takes effect, and the ancestor it comes from when it is not
/// the account's own. The order is the decision order: a ban (own, then any ancestor's)
/// before a termination (own, then any ancestor's) before an unconfirmed email.
pub fn effective_state<'a>(
    lookup: impl Fn(&str) -> Option<&'a AccountPolicy>,
    account: &'a AccountPolicy,
) -> (EffectiveState, Option<&'a str>) {
    let mut ancestors: Vec<(&'a str, &'a AccountPolicy)> = Vec::new();
    let mut parent = account.parent.as_deref();
    while let Some(id) = parent {
        let Some(found) = lookup(id) else { break };
        if ancestors.len() == MAX_ANCESTRY || ancestors.iter().any(|(seen, _)| *seen == id) {
            break;
        }
        ancestors.push((id, found));
        parent = found.parent.as_deref();
    }
    let ancestor_in = |state| ancestors.iter().find(|(_, a)| a.state == state).map(|(id, _)| *id);
    if account.state == AccountState::Banned {
        return (EffectiveState::Banned, None);
    }
    if let Some(id) = ancestor_in(AccountState::Banned) {
        return (EffectiveState::ParentBanned, Some(id));
    }
    if account.state == AccountState::Terminated {
        return (EffectiveState::Terminated, None);
    }
    if let Some(id) = ancestor_in(AccountState::Terminated) {
        return (EffectiveState::ParentTerminated, Some(id));
    }
    match account.state {
        AccountState::Unconfirmed => (EffectiveState::Unconfirmed, None),
        _ => (EffectiveState::Active, None),
    }
}

impl EffectiveState {
    /// Banned or terminated, directly or through an ancestor: every packet to the account's
    /// endpoints is dropped, sign-ins are refused and no override can change that.
    pub fn suspended(self) -> bool {
        matches!(
            self,
            EffectiveState::Banned
                | EffectiveState::ParentBanned
                | EffectiveState::Terminated
                | EffectiveState::ParentTerminated
        )
    }
}

/// Whether the kernel should drop everything to the account (see [`EffectiveState::suspended`]).
pub fn suspended<'a>(lookup: impl Fn(&str) -> Option<&'a AccountPolicy>, id: &str) -> bool {
    lookup(id).is_some_and(|account| effective_state(&lookup, account).0.suspended())
}

/// What a person is told when the address is not allowed; an unknown account gets the same
/// words, so the hint never tells whether an account exists.
fn not_allowed_hint(addr: IpAddr) -> String {
    format!(
        "Sign-in from {addr} is not allowed for this account. Sign in from an address on the account's allowlist \
         and add this one, or ask support to verify your ownership and grant temporary access."
    )
}

/// The login decision of DESIGN.md, first match wins: unknown account; banned (own, then an
/// ancestor's); terminated (own, then an ancestor's); unconfirmed; mode off; covered by an
/// enabled entry or a live override; otherwise denied in `enforce`, allowed and flagged in
/// `monitor`.
pub fn decide(accounts: &HashMap<String, AccountPolicy>, sets: &Sets, id: &str, addr: IpAddr, now: i64) -> CheckResult {
    let result = |allowed, reason, hint: String, detail: String| CheckResult {
        allowed,
        reason,
        hint,
        detail,
        via_override: None,
    };
    let Some(account) = accounts.get(id) else {
        return result(false, Reason::UnknownAccount, not_allowed_hint(addr), format!("there is no account {id:?}"));
    };
    match effective_state(|a| accounts.get(a), account) {
        (EffectiveState::Banned, _) => {
            return result(
                false,
                Reason::Banned,
                "This account is banned. Support cannot reactivate it.".into(),
                format!("{id} is banned"),
            );
        }
        (EffectiveState::ParentBanned, Some(parent)) => {
            return result(
                false,
                Reason::ParentBanned,
                format!(
                    "The account {parent} is banned, and with it all its sub-users. Support cannot reactivate them."
                ),
                format!("{id} is suspended: its parent account {parent} is banned"),
            );
        }
        (EffectiveState::Terminated, _) => {
            return result(
                false,
                Reason::Terminated,
                "This account was terminated for non-payment. Settle the balance with billing to reactivate it.".into(),
                format!("{id} is terminated"),
            );
        }
        (EffectiveState::ParentTerminated, Some(parent)) => {
            return result(
                false,
                Reason::ParentTerminated,
                format!(
                    "The account {parent} was terminated for non-payment, and with it its sub-users. Its owner can \
                     settle the balance with billing to reactivate them."
                ),
                format!("{id} is suspended: its parent account {parent} is terminated"),
            );
        }
        (EffectiveState::Unconfirmed, _) => {
            return result(
                false,
                Reason::Unconfirmed,
                "The account's email address is not confirmed yet. Follow the link in the confirmation email.".into(),
                format!("{id} has not confirmed its email address"),
            );
        }
        _ => {}
    }
    if account.mode == Mode::Off {
        return result(true, Reason::Allowed, String::new(), format!("{id} does not restrict addresses (mode off)"));
    }
    match account.entry_covering(addr, now) {
        Some((net, None)) => {
            return result(
                true,
                Reason::Allowed,
                String::new(),
                format!("{addr} is covered by the allowlist entry {net}"),
            );
        }
        Some((net, Some(until))) => {
            let detail =
                format!("{addr} is covered by the allowlist entry {net} until {} UTC", crate::time::format_utc(until));
            return result(true, Reason::Allowed, String::new(), detail);
        }
        None => {}
    }
    if let Some((set, net)) = account.set_entry_covering(sets, addr) {
        let detail = format!("{addr} is covered by {net} of the shared set {set}");
        return result(true, Reason::Allowed, String::new(), detail);
    }
    if let Some(granted) = account.override_covering(addr, now) {
        let mut allowed = result(
            true,
            Reason::Allowed,
            String::new(),
            format!(
                "{addr} is covered by support override {} ({}) until {} UTC",
                granted.id,
                granted.cidr,
                crate::time::format_utc(granted.expires_at)
            ),
        );
        allowed.via_override = Some(OverrideRef { id: granted.id, expires_at: granted.expires_at });
        return allowed;
    }
    let entries = account.live_entries(now).count();
    let overrides = account.live_overrides(now).count();
    let mut unmatched =
        format!("{addr} matches none of {id}'s {entries} enabled entries and {overrides} live overrides");
    if !account.sets.is_empty() {
        unmatched.push_str(&format!(", nor its {} enabled shared sets", account.sets.len()));
    }
    match account.mode {
        Mode::Monitor => result(
            true,
            Reason::MonitorWouldDeny,
            format!("{addr} is not on the allowlist; allowed because the account is in monitor mode."),
            format!("{unmatched}; monitor mode records it and allows"),
        ),
        _ => result(false, Reason::AddressNotAllowed, not_allowed_hint(addr), unmatched),
    }
}

/// Account ids: what a new account may be called. Letters, digits and `. _ @ + -`, starting
/// with a letter or digit, at most 128 characters: no spaces, control, bidi or zero-width
/// characters that could make two ids look alike or rewrite an operator's screen.
pub const ACCOUNT_ID_RULE: &str = "an account id is 1 to 128 characters: ASCII letters, digits and . _ @ + -, \
                                   starting with a letter or digit";

pub fn valid_account_id(id: &str) -> bool {
    let mut bytes = id.bytes();
    id.len() <= 128
        && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"._@+-".contains(&b))
}

/// The longest label, ticket, override reason and state reason, in characters.
pub const MAX_LABEL: usize = 200;
pub const MAX_TICKET: usize = 100;
pub const MAX_REASON: usize = 1000;

/// Free text (labels, tickets, reasons) must fit `max` characters and hold no control,
/// bidi-formatting or zero-width characters: it is shown on operators' terminals.
pub fn check_text(what: &str, text: &str, max: usize) -> Result<(), String> {
    if text.chars().count() > max {
        return Err(format!("{what} is longer than {max} characters"));
    }
    if let Some(c) = text.chars().find(|&c| hidden_or_control(c)) {
        return Err(format!("{what} holds the control or invisible character U+{:04X}; plain text only", c as u32));
    }
    Ok(())
}

fn hidden_or_control(c: char) -> bool {
    c.is_control() || invisible(c)
}

/// Characters that are not control characters but can still hide or reorder text on a
/// terminal: bidi embeddings, overrides, isolates and marks, zero-width characters, the
/// line and paragraph separators, variation selectors, tag characters and other invisible
/// format or filler characters: Unicode's default-ignorable code points (which a terminal
/// draws as nothing), the separators and the interlinear annotation marks. Free text with
/// them is refused ([`check_text`]), and `ipaccessctl` escapes them in whatever it prints
/// (text stored before they were refused).
pub fn invisible(c: char) -> bool {
    matches!(c,
        '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}' | '\u{180b}'..='\u{180f}'
        | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{3164}'
        | '\u{fe00}'..='\u{fe0f}' | '\u{feff}' | '\u{ffa0}' | '\u{fff0}'..='\u{fffb}' | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}' | '\u{e0000}'..='\u{e0fff}')
}

/// The IPv4-mapped range `::ffff:0:0/96`: dual-stack sockets report IPv4 clients in it.
fn mapped_range() -> Ipv6Net {
    Ipv6Net::new(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0), 96).expect("96 is a valid IPv6 prefix length")
}

/// A CIDR in the one form the store, the checks and the kernel use: IPv4-mapped IPv6
/// networks become the IPv4 network they cover (`::ffff:198.18.6.0/120` is 198.18.6.0/24),
/// host bits are refused (so that adding and removing agree on what was meant), and so are
/// the whole-Internet prefixes (an account that wants no restriction uses mode `off`).
/// Returns the network and, when it was rewritten, a note saying so for the reply.
pub fn normalise_cidr(net: IpNet) -> Result<(IpNet, Option<String>), String> {
    let (canonical, note) = match net {
        IpNet::V6(v6) if mapped_range().contains(&v6) => {
            let octets = v6.addr().octets();
            let v4 = Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15]);
            let v4 = Ipv4Net::new(v4, v6.prefix_len() - 96).expect("96..=128 minus 96 is a valid length");
            (IpNet::V4(v4), Some(format!("{net} is an IPv4-mapped IPv6 network; it is kept as the IPv4 network {v4}")))
        }
        IpNet::V6(v6) if v6.contains(&mapped_range()) && v6.prefix_len() > 0 => {
            return Err(format!(
                "{net} covers the IPv4-mapped range ::ffff:0:0/96, which ipaccess treats as IPv4; list the IPv4 \
                 networks instead"
            ));
        }
        other => (other, None),
    };
    if canonical.prefix_len() == 0 {
        return Err(format!("{net} would allow every address; to stop restricting an account, set its mode to off"));
    }
    if canonical.trunc() != canonical {
        return Err(format!(
            "{net} has host bits set; the network is {}, or give a single address as {}/{}",
            canonical.trunc(),
            canonical.addr(),
            canonical.max_prefix_len()
        ));
    }
    Ok((canonical, note))
}

/// For an entry an older version stored before [`normalise_cidr`] applied (IPv4-mapped,
/// host bits set), what today's rules make of it; `None` for an entry stored as today's
/// rules store it. Such entries are enforced as stored, and removed by their stored
/// spelling.
pub fn stored_otherwise_today(stored: IpNet) -> Option<String> {
    match normalise_cidr(stored) {
        Ok((today, _)) if today == stored => None,
        Ok((today, _)) => Some(format!("today it would be stored as {today}")),
        Err(why) => Some(format!("today it would be refused ({why})")),
    }
}

/// Whether `net` lies in the IPv4-mapped IPv6 range (::ffff:0:0/96).
pub fn is_ipv4_mapped(net: IpNet) -> bool {
    matches!(net, IpNet::V6(v6) if mapped_range().contains(&v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(parent: Option<&str>, state: AccountState, mode: Mode, entries: &[&str]) -> AccountPolicy {
        AccountPolicy {
            slot: 1,
            parent: parent.map(str::to_string),
            state,
            mode,
            entries: entries.iter().map(|e| e.parse().unwrap()).collect(),
            expiring: Vec::new(),
            overrides: Vec::new(),
            sets: Vec::new(),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A use is credited to the most specific entry live at its time, with an expiry or
    /// without; an entry that had ended by then gets nothing.
    #[test]
    fn a_use_is_credited_to_the_most_specific_entry_live_at_its_time() {
        let mut a = account(None, AccountState::Active, Mode::Enforce, &["198.18.0.0/16", "198.18.7.0/24"]);
        a.expiring.push(ExpiringEntry { cidr: net("198.18.7.9/32"), expires_at: 1_000 });
        a.expiring.push(ExpiringEntry { cidr: net("198.18.7.8/31"), expires_at: 2_000 });
        let host = net("198.18.7.9/32");
        assert_eq!(a.credited_entry(host, 999), Some(host));
        assert_eq!(a.credited_entry(host, 1_000), Some(net("198.18.7.8/31")), "the /32 ended at 1000");
        assert_eq!(a.credited_entry(host, 2_000), Some(net("198.18.7.0/24")));
        assert_eq!(a.credited_entry(net("198.18.9.0/24"), 0), Some(net("198.18.0.0/16")), "a kernel key, expanded");
        assert_eq!(a.credited_entry(net("198.19.0.1/32"), 0), None);
    }

    /// The sweep's walk is due exactly when something in the cache may have ended: put in
    /// at the start, by a later change, or left by the previous sweep.
    #[test]
    fn the_cache_knows_when_something_may_have_ended() {
        let timed = |override_end: Option<i64>, entry_end: Option<i64>| {
            let mut a = account(None, AccountState::Active, Mode::Enforce, &["198.18.0.0/24"]);
            a.overrides.extend(override_end.map(|end| LiveOverride {
                id: 1,
                cidr: net("198.18.9.9/32"),
                expires_at: end,
            }));
            a.expiring.extend(entry_end.map(|end| ExpiringEntry { cidr: net("198.18.7.0/24"), expires_at: end }));
            a
        };
        let mut cache = AccountCache::new(HashMap::from([
            ("plain".to_string(), timed(None, None)),
            ("acme".to_string(), timed(Some(500), Some(300))),
        ]));
        assert!(!cache.may_have_expired(299));
        assert!(cache.may_have_expired(300));
        let (expired, next) = cache.expired(300);
        assert_eq!((expired.clone(), next), (vec!["acme".to_string()], 500));
        cache.sweep(&expired, 300, next);
        assert!(cache["acme"].expiring.is_empty() && cache["acme"].overrides.len() == 1);
        assert!(!cache.may_have_expired(499), "the override is still live");
        cache.extend([("globex".to_string(), timed(None, Some(400)))]);
        assert!(cache.may_have_expired(400), "a later change brought an earlier end");
        let (expired, next) = cache.expired(500);
        assert_eq!(next, i64::MAX);
        let mut expired = expired;
        expired.sort();
        assert_eq!(expired, ["acme", "globex"]);
        cache.sweep(&expired, 500, next);
        assert!(!cache.may_have_expired(i64::MAX - 1), "nothing timed is left");
        assert!(cache.remove("acme").is_some() && !cache.contains_key("acme"));
    }

    #[test]
    fn suspension_reaches_every_descendant_of_an_old_deep_tree() {
        use AccountState::*;
        let mut accounts = HashMap::new();
        accounts.insert("top".to_string(), account(None, Active, Mode::Enforce, &["198.18.0.0/24"]));
        accounts.insert("mid".to_string(), account(Some("top"), Active, Mode::Off, &[]));
        accounts.insert("leaf".to_string(), account(Some("mid"), Active, Mode::Off, &[]));
        let a = ip("198.18.0.1");
        assert_eq!(decide(&accounts, &Sets::new(), "leaf", a, 0).reason, Reason::Allowed);
        accounts.get_mut("top").unwrap().state = Terminated;
        let leaf = decide(&accounts, &Sets::new(), "leaf", a, 0);
        assert_eq!((leaf.allowed, leaf.reason), (false, Reason::ParentTerminated));
        assert!(leaf.hint.contains("top") && leaf.hint.contains("billing"), "{}", leaf.hint);
        accounts.get_mut("mid").unwrap().state = Banned;
        // A ban anywhere above comes before a termination anywhere above.
        assert_eq!(decide(&accounts, &Sets::new(), "leaf", a, 0).reason, Reason::ParentBanned);
        assert_eq!(decide(&accounts, &Sets::new(), "mid", a, 0).reason, Reason::Banned);
        assert_eq!(decide(&accounts, &Sets::new(), "top", a, 0).reason, Reason::Terminated);
        assert!(suspended(|id| accounts.get(id), "leaf"));
        accounts.get_mut("mid").unwrap().state = Unconfirmed;
        accounts.get_mut("top").unwrap().state = Active;
        // An unconfirmed parent does not suspend: only bans and terminations cascade.
        assert_eq!(decide(&accounts, &Sets::new(), "leaf", a, 0).reason, Reason::Allowed);
        assert!(!suspended(|id| accounts.get(id), "leaf"));
    }

    #[test]
    fn a_cycle_in_a_damaged_store_ends() {
        let mut accounts = HashMap::new();
        accounts.insert("a".to_string(), account(Some("b"), AccountState::Active, Mode::Off, &[]));
        accounts.insert("b".to_string(), account(Some("a"), AccountState::Banned, Mode::Off, &[]));
        assert_eq!(decide(&accounts, &Sets::new(), "a", ip("198.18.0.1"), 0).reason, Reason::ParentBanned);
    }

    #[test]
    fn decision_order_and_overrides() {
        let mut accounts = HashMap::new();
        let mut acme = account(None, AccountState::Active, Mode::Enforce, &["198.18.0.0/24"]);
        acme.overrides.push(LiveOverride { id: 7, cidr: net("198.18.9.9/32"), expires_at: 100 });
        accounts.insert("acme".to_string(), acme);
        let allowed = decide(&accounts, &Sets::new(), "acme", ip("198.18.0.5"), 50);
        assert_eq!((allowed.allowed, allowed.reason, allowed.via_override), (true, Reason::Allowed, None));
        let by_override = decide(&accounts, &Sets::new(), "acme", ip("198.18.9.9"), 99);
        assert_eq!(by_override.via_override, Some(OverrideRef { id: 7, expires_at: 100 }));
        // At its expiry second the override is over.
        let expired = decide(&accounts, &Sets::new(), "acme", ip("198.18.9.9"), 100);
        assert_eq!((expired.allowed, expired.reason), (false, Reason::AddressNotAllowed));
        let unknown = decide(&accounts, &Sets::new(), "nobody", ip("198.18.9.9"), 100);
        assert_eq!(unknown.reason, Reason::UnknownAccount);
        assert_eq!(unknown.hint, expired.hint, "the hint must not tell whether an account exists");
        assert!(expired.detail.contains("1 enabled entries and 0 live overrides"), "{}", expired.detail);
        accounts.get_mut("acme").unwrap().mode = Mode::Monitor;
        let monitored = decide(&accounts, &Sets::new(), "acme", ip("198.18.7.1"), 0);
        assert_eq!((monitored.allowed, monitored.reason), (true, Reason::MonitorWouldDeny));
        accounts.get_mut("acme").unwrap().mode = Mode::Off;
        assert_eq!(decide(&accounts, &Sets::new(), "acme", ip("198.18.7.1"), 0).reason, Reason::Allowed);
        accounts.get_mut("acme").unwrap().state = AccountState::Unconfirmed;
        assert_eq!(decide(&accounts, &Sets::new(), "acme", ip("198.18.0.5"), 0).reason, Reason::Unconfirmed);
    }

    #[test]
    fn an_expiring_entry_lets_in_until_its_expiry_only() {
        let mut accounts = HashMap::new();
        let mut acme = account(None, AccountState::Active, Mode::Enforce, &["198.18.0.0/24"]);
        acme.expiring.push(ExpiringEntry { cidr: net("198.18.5.0/24"), expires_at: 100 });
        acme.expiring.push(ExpiringEntry { cidr: net("198.18.5.7/32"), expires_at: 200 });
        accounts.insert("acme".to_string(), acme);
        let at = |addr: &str, now| decide(&accounts, &Sets::new(), "acme", ip(addr), now);
        let until = at("198.18.5.7", 99);
        assert!(until.allowed && until.detail.contains("198.18.5.7/32 until"), "the longest-lived is named: {until:?}");
        assert!(at("198.18.5.8", 99).allowed);
        assert_eq!(at("198.18.5.8", 100).reason, Reason::AddressNotAllowed, "at its expiry second it is over");
        assert!(at("198.18.5.7", 199).allowed);
        let over = at("198.18.5.7", 200);
        assert_eq!(over.reason, Reason::AddressNotAllowed);
        assert!(over.detail.contains("1 enabled entries"), "expired entries are not counted: {}", over.detail);
        assert!(at("198.18.0.1", 1_000).detail.ends_with("entry 198.18.0.0/24"), "a permanent entry has no end");
        let acme = &accounts["acme"];
        assert_eq!(acme.live_entries(150).count(), 2);
        let mut withdrawn = acme.clone();
        withdrawn.withdraw(net("198.18.5.7/32"));
        assert!(!withdrawn.covers(ip("198.18.5.7"), 150) && withdrawn.expiring.len() == 1);
    }

    #[test]
    fn an_enabled_set_lets_in_after_own_entries_and_names_itself() {
        let mut accounts = HashMap::new();
        let mut acme = account(None, AccountState::Active, Mode::Enforce, &["198.18.0.0/24"]);
        acme.sets.push(SetUse { name: "corp-vpn".into(), kernel_id: 3 });
        // A reference to a set the cache lacks lets nothing in.
        acme.sets.push(SetUse { name: "gone".into(), kernel_id: 4 });
        accounts.insert("acme".to_string(), acme);
        let mut sets = Sets::new();
        sets.insert(
            "corp-vpn".into(),
            SetPolicy { kernel_id: 3, entries: vec![net("198.18.40.0/24"), net("198.18.40.7/32")] },
        );
        let via_set = decide(&accounts, &sets, "acme", ip("198.18.40.7"), 0);
        assert_eq!((via_set.allowed, via_set.reason), (true, Reason::Allowed));
        assert!(
            via_set.detail.contains("198.18.40.7/32 of the shared set corp-vpn"),
            "the most specific: {}",
            via_set.detail
        );
        let own = decide(&accounts, &sets, "acme", ip("198.18.0.1"), 0);
        assert!(own.detail.contains("allowlist entry"), "own entries first: {}", own.detail);
        let denied = decide(&accounts, &sets, "acme", ip("198.18.41.1"), 0);
        assert_eq!(denied.reason, Reason::AddressNotAllowed);
        assert!(denied.detail.contains("nor its 2 enabled shared sets"), "{}", denied.detail);
        assert_eq!(decide(&accounts, &Sets::new(), "acme", ip("198.18.40.7"), 0).reason, Reason::AddressNotAllowed);
        // The lockout guard's view: the set's networks counted as the account's own.
        let flat = accounts["acme"].with_set_entries(&sets);
        assert!(flat.covers(ip("198.18.40.9"), 0) && !accounts["acme"].covers(ip("198.18.40.9"), 0));
    }

    #[test]
    fn entries_split_into_permanent_and_expiring_enabled_ones() {
        let (entries, expiring) = split_entries(
            [
                (net("198.18.0.0/24"), true, None),
                (net("198.18.1.0/24"), false, None),
                (net("198.18.2.0/24"), true, Some(50)),
                (net("198.18.3.0/24"), false, Some(50)),
                (net("198.18.4.0/24"), true, Some(40)),
            ]
            .into_iter(),
            45,
        );
        assert_eq!(entries, [net("198.18.0.0/24")]);
        assert_eq!(expiring, [ExpiringEntry { cidr: net("198.18.2.0/24"), expires_at: 50 }]);
    }

    #[test]
    fn entries_an_older_version_stored_are_told_apart() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(stored_otherwise_today(net("198.18.0.0/24")), None);
        assert_eq!(stored_otherwise_today(net("fd00::/64")), None);
        let mapped = stored_otherwise_today(net("::ffff:198.18.0.0/120")).unwrap();
        assert!(mapped.contains("stored as 198.18.0.0/24"), "{mapped}");
        assert!(is_ipv4_mapped(net("::ffff:198.18.0.0/120")) && !is_ipv4_mapped(net("fd00::/64")));
        let host_bits = stored_otherwise_today(net("198.18.0.77/24")).unwrap();
        assert!(host_bits.contains("refused") && host_bits.contains("host bits"), "{host_bits}");
    }

    #[test]
    fn account_ids() {
        for good in ["acme", "a", "acme-dev", "user@example.org", "a.b_c+d", "A1", &"x".repeat(128)] {
            assert!(valid_account_id(good), "{good}");
        }
        for bad in [
            "",
            " acme",
            "acme ",
            "-acme",
            ".acme",
            "ac me",
            "acme\n",
            "acme\u{202e}",
            "acme\u{200b}",
            "äcme",
            "acme/x",
            &"x".repeat(129),
        ] {
            assert!(!valid_account_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn texts() {
        assert!(check_text("label", "office, 3rd floor", MAX_LABEL).is_ok());
        assert!(check_text("label", "caf\u{e9}", MAX_LABEL).is_ok());
        for bad in ["a\nb", "a\u{1b}[2J", "a\u{9b}b", "a\u{202e}b", "a\u{200b}b", "a\u{7f}"] {
            assert!(check_text("label", bad, MAX_LABEL).is_err(), "{bad:?}");
        }
        // What ipaccessctl escapes is refused: separators, tag characters (which can carry
        // hidden text), variation selectors, fillers.
        for c in [
            '\u{2028}',
            '\u{2029}',
            '\u{e0041}',
            '\u{fe0f}',
            '\u{180e}',
            '\u{34f}',
            '\u{115f}',
            '\u{3164}',
            '\u{fff9}',
            '\u{fff0}',
            '\u{1bca0}',
            '\u{1bca3}',
            '\u{1d173}',
        ] {
            let text = format!("office{c}");
            assert!(check_text("label", &text, MAX_LABEL).unwrap_err().contains("invisible"), "{text:?}");
        }
        assert!(check_text("label", &"x".repeat(MAX_LABEL + 1), MAX_LABEL).unwrap_err().contains("200"));
    }

    #[test]
    fn cidrs() {
        let ok = |s: &str| normalise_cidr(net(s)).map(|(n, note)| (n.to_string(), note.is_some()));
        assert_eq!(ok("198.18.0.0/24"), Ok(("198.18.0.0/24".into(), false)));
        assert_eq!(ok("::ffff:198.18.6.0/120"), Ok(("198.18.6.0/24".into(), true)));
        assert_eq!(ok("::ffff:198.18.7.7/128"), Ok(("198.18.7.7/32".into(), true)));
        assert_eq!(ok("fd00::/48"), Ok(("fd00::/48".into(), false)));
        let err = ok("198.18.0.7/24").unwrap_err();
        assert!(err.contains("198.18.0.0/24") && err.contains("198.18.0.7/32"), "{err}");
        assert!(ok("::ffff:198.18.6.1/120").unwrap_err().contains("198.18.6.0/24"));
        assert!(ok("0.0.0.0/0").unwrap_err().contains("mode to off"));
        assert!(ok("::/0").is_err());
        assert!(ok("::ffff:0.0.0.0/96").is_err(), "the whole mapped range is 0.0.0.0/0");
        assert!(ok("::/64").unwrap_err().contains("IPv4-mapped"));
    }
}
