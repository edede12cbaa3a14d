//! Reference model of the XDP program's verdict, written from the specification alone
//! (never from the kernel source) so that a differential test can catch either side's bugs.
//!
//! The model is deliberately naive: linear scans over bindings and allowlist entries, no
//! tables, no hashing. Anything clever here would risk sharing a bug with the kernel side.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipaccess_common::packet::*;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::Rng;
use rand::seq::SliceRandom;

/// Never-expiring allowlist entry.
pub const NEVER: u64 = u64::MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    Off,
    Monitor,
    Enforce,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelAccount {
    pub mode: Mode,
    pub suspended: bool,
    /// (prefix, expiry in CLOCK_BOOTTIME ns); `NEVER` = no expiry.
    pub entries: Vec<(IpNet, u64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BindTarget {
    Port { protocol: u8, port: u16 },
    WholeAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelBinding {
    pub addr: IpAddr,
    pub target: BindTarget,
    pub account: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelPolicy {
    /// Account slots (>= 1) that are set; a bound slot missing here is "unset".
    pub accounts: BTreeMap<u32, ModelAccount>,
    pub bindings: Vec<ModelBinding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    NotAllowed,
    Suspended,
    AccountUnset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Not IPv4/IPv6: passed untouched.
    NonIp,
    /// Host-level malformed (cannot even read the IP header): dropped.
    Unreadable,
    /// Destination not owned by any account: passed.
    Unbound,
    /// Neighbour discovery to a bound address: always passed.
    Ndp,
    /// Malformed packet to a bound address; account = whole-address binding's or 0.
    Malformed {
        account: u32,
    },
    /// Mode off, or source allowed.
    Passed {
        account: u32,
    },
    /// Monitor mode, source not allowed: passed but recorded.
    WouldDrop {
        account: u32,
    },
    Dropped {
        account: u32,
        reason: DropReason,
    },
}

impl Outcome {
    pub fn verdict(&self) -> Verdict {
        match self {
            Outcome::NonIp | Outcome::Unbound | Outcome::Ndp | Outcome::Passed { .. } | Outcome::WouldDrop { .. } => {
                Verdict::Pass
            }
            Outcome::Unreadable | Outcome::Malformed { .. } | Outcome::Dropped { .. } => Verdict::Drop,
        }
    }
}

/// What the parser extracts from an IP packet; only the fields the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedIp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Destination port, for TCP/UDP first fragments / unfragmented packets only.
    pub port: Option<u16>,
    pub malformed: bool,
    pub ndp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    NonIp,
    Unreadable,
    Ip(ParsedIp),
}

fn be16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

/// Parse a frame the way the spec says; see `decide` for the verdict.
pub fn parse(frame: &[u8]) -> Parsed {
    if frame.len() < ETH_HDR_LEN {
        return Parsed::NonIp;
    }
    let mut ethertype = be16(frame, 12);
    let mut off = ETH_HDR_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if off + VLAN_HDR_LEN > frame.len() {
            return Parsed::Unreadable;
        }
        ethertype = be16(frame, off + 2);
        off += VLAN_HDR_LEN;
    }
    // A third tag is not parsed: the packet cannot be classified, so it is not let through.
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        return Parsed::Unreadable;
    }
    match ethertype {
        ETH_P_IPV4 => parse_ipv4(frame, off),
        ETH_P_IPV6 => parse_ipv6(frame, off),
        _ => Parsed::NonIp,
    }
}

fn min_transport_len(protocol: u8) -> Option<usize> {
    match protocol {
        IPPROTO_TCP => Some(20),
        IPPROTO_UDP => Some(8),
        _ => None,
    }
}

fn parse_ipv4(frame: &[u8], off: usize) -> Parsed {
    let len = frame.len();
    if len - off < IPV4_HDR_LEN || frame[off] >> 4 != 4 {
        return Parsed::Unreadable;
    }
    let h = &frame[off..];
    let src = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
    let dst = IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19]));
    let protocol = h[9];
    let total_length = be16(h, 2) as usize;
    let frag_offset = be16(h, 6) & 0x1fff;
    let ihl = (h[0] & 0xf) as usize * 4;
    let mut p = ParsedIp { src, dst, protocol, port: None, malformed: false, ndp: false };

    if ihl < IPV4_HDR_LEN || total_length < ihl || off + total_length > len {
        p.malformed = true;
        return Parsed::Ip(p);
    }
    if let Some(min) = min_transport_len(protocol) {
        if frag_offset == 0 {
            let t = off + ihl;
            if ihl + min <= total_length && t + 4 <= len {
                p.port = Some(be16(frame, t + 2));
            } else {
                p.malformed = true;
            }
        } else if frag_offset == 1 && protocol == IPPROTO_TCP {
            // RFC 1858: an offset-1 TCP fragment can overwrite the flags of the first one.
            p.malformed = true;
        }
    }
    Parsed::Ip(p)
}

fn is_ipv6_ext(next: u8) -> bool {
    matches!(next, IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT)
}

fn parse_ipv6(frame: &[u8], off: usize) -> Parsed {
    let len = frame.len();
    if len - off < IPV6_HDR_LEN || frame[off] >> 4 != 6 {
        return Parsed::Unreadable;
    }
    let h = &frame[off..];
    let addr = |at: usize| {
        let b: [u8; 16] = h[at..at + 16].try_into().unwrap();
        IpAddr::V6(Ipv6Addr::from(b))
    };
    let payload_length = be16(h, 4) as usize;
    let mut next = h[6];
    let mut p = ParsedIp { src: addr(8), dst: addr(24), protocol: next, port: None, malformed: false, ndp: false };
    let malformed = |mut p: ParsedIp| {
        p.malformed = true;
        Parsed::Ip(p)
    };

    // "readable" checks use the real frame length `len`; "fits" checks use the IP end.
    let end = off + IPV6_HDR_LEN + payload_length;
    if end > len {
        return malformed(p);
    }
    let mut pos = off + IPV6_HDR_LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                if pos + 2 > len {
                    return malformed(p);
                }
                let hlen = (frame[pos + 1] as usize + 1) * 8;
                if pos + hlen > end {
                    return malformed(p);
                }
                next = frame[pos];
                pos += hlen;
            }
            IPPROTO_FRAGMENT => {
                if pos + 4 > len || pos + 8 > end {
                    return malformed(p);
                }
                next = frame[pos];
                let frag_offset = be16(frame, pos + 2) >> 3;
                pos += 8;
                if frag_offset != 0 {
                    // Non-first fragment: no transport header to look at, nothing wrong.
                    p.protocol = next;
                    return Parsed::Ip(p);
                }
            }
            _ => break,
        }
    }
    // Chain longer than we walk: the port (or NDP type) is unknown, so refuse it.
    if is_ipv6_ext(next) {
        return malformed(p);
    }
    p.protocol = next;
    if let Some(min) = min_transport_len(next) {
        if pos + min > end || pos + 4 > len {
            return malformed(p);
        }
        p.port = Some(be16(frame, pos + 2));
    } else if next == IPPROTO_ICMPV6 {
        // The whole fixed ICMPv6 header (type, code, checksum) must be there.
        if pos + 4 > len || pos + 4 > end {
            return malformed(p);
        }
        p.ndp = (ICMPV6_NDP_FIRST..=ICMPV6_NDP_LAST).contains(&frame[pos]);
    }
    Parsed::Ip(p)
}

/// The verdict the XDP program must reach for `frame` at boot-time `now_boot_ns`.
pub fn decide(policy: &ModelPolicy, now_boot_ns: u64, frame: &[u8]) -> Outcome {
    match parse(frame) {
        Parsed::NonIp => Outcome::NonIp,
        Parsed::Unreadable => Outcome::Unreadable,
        Parsed::Ip(p) => decide_ip(policy, now_boot_ns, &p),
    }
}

/// Decision for an already-parsed IP packet (rules 6..11).
pub fn decide_ip(policy: &ModelPolicy, now_boot_ns: u64, p: &ParsedIp) -> Outcome {
    if policy.bindings.is_empty() {
        return Outcome::Unbound;
    }
    if let (false, Some(port)) = (p.malformed, p.port) {
        let target = BindTarget::Port { protocol: p.protocol, port };
        if let Some(b) = find_binding(policy, p.dst, target) {
            return account_decision(policy, now_boot_ns, b.account, p.src);
        }
    }
    if !policy.bindings.iter().any(|b| b.addr == p.dst) {
        return Outcome::Unbound;
    }
    let whole = find_binding(policy, p.dst, BindTarget::WholeAddress);
    if p.malformed {
        return Outcome::Malformed { account: whole.map_or(0, |b| b.account) };
    }
    if p.ndp {
        return Outcome::Ndp;
    }
    match whole {
        Some(b) => account_decision(policy, now_boot_ns, b.account, p.src),
        None => Outcome::Unbound,
    }
}

fn find_binding(policy: &ModelPolicy, addr: IpAddr, target: BindTarget) -> Option<&ModelBinding> {
    policy.bindings.iter().find(|b| b.addr == addr && b.target == target)
}

/// Rule 12: the per-account check.
pub fn account_decision(policy: &ModelPolicy, now_boot_ns: u64, account: u32, src: IpAddr) -> Outcome {
    let Some(acct) = policy.accounts.get(&account) else {
        return Outcome::Dropped { account, reason: DropReason::AccountUnset };
    };
    if acct.suspended {
        return Outcome::Dropped { account, reason: DropReason::Suspended };
    }
    if acct.mode == Mode::Off || source_allowed(acct, now_boot_ns, src) {
        return Outcome::Passed { account };
    }
    match acct.mode {
        Mode::Monitor => Outcome::WouldDrop { account },
        _ => Outcome::Dropped { account, reason: DropReason::NotAllowed },
    }
}

/// Rule 13: any live entry of the same family covering `src` allows it. Longest-prefix
/// match is *not* the rule: an expired /24 does not hide a live /16.
pub fn source_allowed(acct: &ModelAccount, now_boot_ns: u64, src: IpAddr) -> bool {
    acct.entries.iter().any(|&(net, expiry)| {
        let covers = match (net, src) {
            (IpNet::V4(n), IpAddr::V4(a)) => n.contains(&a),
            (IpNet::V6(n), IpAddr::V6(a)) => n.contains(&a),
            _ => false,
        };
        covers && (expiry == NEVER || now_boot_ns < expiry)
    })
}

// ---------------------------------------------------------------------------------------
// Random policies
// ---------------------------------------------------------------------------------------

/// Shape of a random policy; `Default` gives a small but varied one.
#[derive(Debug, Clone)]
pub struct PolicyParams {
    /// Accounts present in `accounts`.
    pub accounts: usize,
    /// Extra slots that bindings point at but that are absent from `accounts`.
    pub unset_accounts: usize,
    /// Allowlist entries per account (before shadowing extras), at most.
    pub max_entries: usize,
    /// Distinct prefix lengths per account and family, at most.
    pub max_prefix_lengths: usize,
    pub v4_destinations: usize,
    pub v6_destinations: usize,
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyParams {
            accounts: 6,
            unset_accounts: 2,
            max_entries: 12,
            max_prefix_lengths: 8,
            v4_destinations: 5,
            v6_destinations: 5,
        }
    }
}

const HOUR_NS: u64 = 3_600_000_000_000;

/// An expiry at least an hour in the future (up to ~a week), so a test run cannot race it.
fn live_expiry<R: Rng + ?Sized>(rng: &mut R, now: u64) -> u64 {
    now.saturating_add(HOUR_NS + rng.random_range(0..7 * 24 * HOUR_NS))
}

/// An expiry at least an hour in the past (0 if `now` is too small for that).
fn expired_expiry<R: Rng + ?Sized>(rng: &mut R, now: u64) -> u64 {
    now.saturating_sub(HOUR_NS + rng.random_range(0..7 * 24 * HOUR_NS))
}

fn random_expiry<R: Rng + ?Sized>(rng: &mut R, now: u64) -> u64 {
    match rng.random_range(0..10) {
        0..=4 => NEVER,
        5..=7 => live_expiry(rng, now),
        _ => expired_expiry(rng, now),
    }
}

fn random_v4<R: Rng + ?Sized>(rng: &mut R) -> Ipv4Addr {
    Ipv4Addr::from(rng.random::<u32>())
}

fn random_v6<R: Rng + ?Sized>(rng: &mut R) -> Ipv6Addr {
    Ipv6Addr::from(rng.random::<u128>())
}

/// A prefix length biased towards the edges and the usual octet boundaries.
fn random_len<R: Rng + ?Sized>(rng: &mut R, max: u8) -> u8 {
    match rng.random_range(0..10) {
        0 => 0,
        1 | 2 => max,
        3..=5 => {
            let step = if max == 32 { 8 } else { 16 };
            step * rng.random_range(0..=max / step)
        }
        _ => rng.random_range(0..=max),
    }
}

fn net(addr: IpAddr, len: u8) -> IpNet {
    match addr {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, len).unwrap().trunc()),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, len).unwrap().trunc()),
    }
}

/// Adds entries while keeping at most `max_lens` distinct prefix lengths per family.
struct EntryBuilder {
    entries: Vec<(IpNet, u64)>,
    lens_v4: BTreeSet<u8>,
    lens_v6: BTreeSet<u8>,
    max_lens: usize,
}

impl EntryBuilder {
    fn room_for(&self, n: &IpNet) -> bool {
        let lens = if n.addr().is_ipv4() { &self.lens_v4 } else { &self.lens_v6 };
        lens.contains(&n.prefix_len()) || lens.len() < self.max_lens
    }

    /// Adds all of `nets` or none, so shadowing pairs stay pairs.
    fn add_all(&mut self, nets: &[(IpNet, u64)]) -> bool {
        let mut trial = EntryBuilder {
            entries: Vec::new(),
            lens_v4: self.lens_v4.clone(),
            lens_v6: self.lens_v6.clone(),
            max_lens: self.max_lens,
        };
        for (n, _) in nets {
            if !trial.room_for(n) {
                return false;
            }
            let lens = if n.addr().is_ipv4() { &mut trial.lens_v4 } else { &mut trial.lens_v6 };
            lens.insert(n.prefix_len());
        }
        self.lens_v4 = trial.lens_v4;
        self.lens_v6 = trial.lens_v6;
        self.entries.extend_from_slice(nets);
        true
    }
}

/// Builds a random policy for differential testing. Expiries are kept at least an hour
/// away from `now_boot_ns` (pass a `now` of a few hours or more so "expired" is possible).
///
/// Account slots are `1..=accounts + unset_accounts`, shuffled; binding keys are unique
/// (one account per (addr, protocol, port) and per whole address), as in the kernel maps.
pub fn random_policy<R: Rng + ?Sized>(rng: &mut R, params: &PolicyParams, now_boot_ns: u64) -> ModelPolicy {
    let now = now_boot_ns;
    let total = (params.accounts + params.unset_accounts) as u32;
    let mut slots: Vec<u32> = (1..=total).collect();
    slots.shuffle(rng);
    let (set_slots, _unset) = slots.split_at(params.accounts);

    // Addresses shared between accounts, so allowlists overlap and nest.
    let mut bases: Vec<IpAddr> = (0..6).map(|_| IpAddr::V4(random_v4(rng))).collect();
    bases.extend((0..6).map(|_| IpAddr::V6(random_v6(rng))));

    let mut accounts = BTreeMap::new();
    for &slot in set_slots {
        let mode = [Mode::Off, Mode::Monitor, Mode::Enforce, Mode::Enforce][rng.random_range(0..4)];
        let suspended = rng.random_ratio(1, 6);
        let mut eb = EntryBuilder {
            entries: Vec::new(),
            lens_v4: BTreeSet::new(),
            lens_v6: BTreeSet::new(),
            max_lens: params.max_prefix_lengths,
        };

        // Shadowing cases first, so the prefix-length budget does not squeeze them out.
        if rng.random_ratio(1, 2) {
            // Expired narrow prefix inside a live wider one: the wider one must still allow.
            let base = bases[rng.random_range(0..bases.len())];
            let (narrow, wide) = if base.is_ipv4() { (24, 16) } else { (64, 48) };
            eb.add_all(&[(net(base, narrow), expired_expiry(rng, now)), (net(base, wide), live_expiry(rng, now))]);
        }
        if rng.random_ratio(1, 2) {
            // Same prefix twice with different expiries: the live one must win.
            let base = bases[rng.random_range(0..bases.len())];
            let len = random_len(rng, if base.is_ipv4() { 32 } else { 128 });
            let n = net(base, len);
            let (a, b) = (random_expiry(rng, now), random_expiry(rng, now));
            eb.add_all(&[(n, a), (n, b)]);
        }
        if rng.random_ratio(1, 3) {
            // Nested prefixes of one address, mixed expiries.
            let base = bases[rng.random_range(0..bases.len())];
            let max = if base.is_ipv4() { 32 } else { 128 };
            let mut lens: Vec<u8> = (0..3).map(|_| random_len(rng, max)).collect();
            lens.sort();
            lens.dedup();
            let nets: Vec<_> = lens.iter().map(|&l| (net(base, l), random_expiry(rng, now))).collect();
            eb.add_all(&nets);
        }

        let n_entries = rng.random_range(0..=params.max_entries);
        for _ in 0..n_entries {
            let addr = match rng.random_range(0..4) {
                0 => IpAddr::V4(random_v4(rng)),
                1 => IpAddr::V6(random_v6(rng)),
                _ => bases[rng.random_range(0..bases.len())],
            };
            let len = random_len(rng, if addr.is_ipv4() { 32 } else { 128 });
            // A /0 allows everything; keep it rare so most accounts actually filter.
            if len == 0 && !rng.random_ratio(1, 4) {
                continue;
            }
            let e = (net(addr, len), random_expiry(rng, now));
            eb.add_all(&[e]);
        }
        eb.entries.shuffle(rng);
        accounts.insert(slot, ModelAccount { mode, suspended, entries: eb.entries });
    }

    // Bindings: each destination gets some ports and maybe the whole address.
    let mut bindings = Vec::new();
    let common_ports = [22u16, 53, 80, 443, 8080];
    let mut dsts: Vec<IpAddr> = (0..params.v4_destinations).map(|_| IpAddr::V4(random_v4(rng))).collect();
    dsts.extend((0..params.v6_destinations).map(|_| IpAddr::V6(random_v6(rng))));
    let mut seen = BTreeSet::new();
    for addr in dsts {
        let pick_account = |rng: &mut R| {
            if total == 0 { 1 } else { rng.random_range(1..=total) }
        };
        if rng.random_ratio(2, 3) {
            let account = pick_account(rng);
            bindings.push(ModelBinding { addr, target: BindTarget::WholeAddress, account });
        }
        // At least one binding per address, so every destination is "bound".
        let min_ports = if bindings.last().is_some_and(|b| b.addr == addr) { 0 } else { 1 };
        for _ in 0..rng.random_range(min_ports..=4) {
            let protocol = if rng.random_bool(0.5) { IPPROTO_TCP } else { IPPROTO_UDP };
            let port =
                if rng.random_bool(0.6) { common_ports[rng.random_range(0..common_ports.len())] } else { rng.random() };
            if seen.insert((addr, protocol, port)) {
                let account = pick_account(rng);
                bindings.push(ModelBinding { addr, target: BindTarget::Port { protocol, port }, account });
            }
        }
    }
    bindings.shuffle(rng);
    ModelPolicy { accounts, bindings }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 10 * HOUR_NS;
    const IPPROTO_ICMP: u8 = 1;

    fn v4(s: &str) -> IpAddr {
        IpAddr::V4(s.parse().unwrap())
    }
    fn v6(s: &str) -> IpAddr {
        IpAddr::V6(s.parse().unwrap())
    }
    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// IPv4 header (IHL 5 + options) + transport bytes; total_length computed unless given.
    fn ip4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, options: &[u8], l4: &[u8]) -> Vec<u8> {
        let ihl = 5 + options.len() / 4;
        let total = ihl * 4 + l4.len();
        let mut h = vec![0x40 | ihl as u8, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        h.extend_from_slice(&frag.to_be_bytes());
        h.extend_from_slice(&[64, proto, 0, 0]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(options);
        h.extend_from_slice(l4);
        h
    }

    fn tcp(dport: u16) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&1234u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t
    }
    fn udp(dport: u16) -> Vec<u8> {
        tcp(dport)[..8].to_vec()
    }

    /// IPv6 header + payload; payload_length computed.
    fn ip6(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        h.extend_from_slice(payload);
        h
    }

    /// Generic extension header of `units` 8-byte units beyond the first.
    fn ext(next: u8, units: u8) -> Vec<u8> {
        let mut e = vec![0u8; (units as usize + 1) * 8];
        e[0] = next;
        e[1] = units;
        e
    }
    fn frag(next: u8, offset: u16, more: bool) -> Vec<u8> {
        let mut e = vec![next, 0];
        e.extend_from_slice(&((offset << 3) | more as u16).to_be_bytes());
        e.extend_from_slice(&[0, 0, 0, 1]);
        e
    }

    const D4: [u8; 4] = [192, 0, 2, 1];
    const D6: &str = "2001:db8::1";
    const S4_OK: [u8; 4] = [198, 51, 100, 7];
    const S4_BAD: [u8; 4] = [203, 0, 113, 9];
    const S6_OK: &str = "2001:db8:aaaa::5";
    const S6_BAD: &str = "2001:db8:bbbb::5";

    fn account(mode: Mode) -> ModelAccount {
        ModelAccount {
            mode,
            suspended: false,
            entries: vec![(n("198.51.100.0/24"), NEVER), (n("2001:db8:aaaa::/48"), NEVER)],
        }
    }

    /// Account 1 (enforce) owns D4:tcp/80 and D6:udp/53; account 2 (monitor) owns the whole
    /// of D4 and D6; account 3 is bound (D4:udp/53) but unset.
    fn policy() -> ModelPolicy {
        let mut accounts = BTreeMap::new();
        accounts.insert(1, account(Mode::Enforce));
        accounts.insert(2, account(Mode::Monitor));
        let b = |addr, target, account| ModelBinding { addr, target, account };
        let port = |protocol, port| BindTarget::Port { protocol, port };
        ModelPolicy {
            accounts,
            bindings: vec![
                b(v4("192.0.2.1"), port(IPPROTO_TCP, 80), 1),
                b(v4("192.0.2.1"), BindTarget::WholeAddress, 2),
                b(v4("192.0.2.1"), port(IPPROTO_UDP, 53), 3),
                b(v6(D6), port(IPPROTO_UDP, 53), 1),
                b(v6(D6), BindTarget::WholeAddress, 2),
                // Port-only address: has an address record but no whole-address binding.
                b(v4("192.0.2.2"), port(IPPROTO_TCP, 22), 1),
            ],
        }
    }

    fn d(frame: &[u8]) -> Outcome {
        decide(&policy(), NOW, frame)
    }

    const PASSED1: Outcome = Outcome::Passed { account: 1 };
    const NOTALLOWED1: Outcome = Outcome::Dropped { account: 1, reason: DropReason::NotAllowed };

    #[test]
    fn model_verdicts() {
        use Outcome::*;
        assert_eq!(NonIp.verdict(), Verdict::Pass);
        assert_eq!(Unreadable.verdict(), Verdict::Drop);
        assert_eq!(Unbound.verdict(), Verdict::Pass);
        assert_eq!(Ndp.verdict(), Verdict::Pass);
        assert_eq!(Malformed { account: 0 }.verdict(), Verdict::Drop);
        assert_eq!(Passed { account: 1 }.verdict(), Verdict::Pass);
        assert_eq!(WouldDrop { account: 1 }.verdict(), Verdict::Pass);
        assert_eq!(NOTALLOWED1.verdict(), Verdict::Drop);
    }

    #[test]
    fn model_ethernet_and_vlan() {
        let good = eth(ETH_P_IPV4, &ip4(S4_OK, D4, IPPROTO_TCP, 0, &[], &tcp(80)));
        assert_eq!(d(&good), PASSED1);
        // Rule 1: shorter than an Ethernet header.
        assert_eq!(d(&good[..13]), Outcome::NonIp);
        assert_eq!(d(&[]), Outcome::NonIp);
        // Rule 3: other EtherTypes.
        assert_eq!(d(&eth(0x0806, &[0; 28])), Outcome::NonIp);
        assert_eq!(d(&eth(0x88cc, &[])), Outcome::NonIp);

        let tagged = |tags: &[u16]| {
            let mut f = vec![0u8; 12];
            for &tpid in tags {
                f.extend_from_slice(&tpid.to_be_bytes());
                f.extend_from_slice(&[0, 7]); // TCI
            }
            f.extend_from_slice(&ETH_P_IPV4.to_be_bytes());
            f.extend_from_slice(&ip4(S4_OK, D4, IPPROTO_TCP, 0, &[], &tcp(80)));
            f
        };
        assert_eq!(d(&tagged(&[0x8100])), PASSED1);
        assert_eq!(d(&tagged(&[0x88a8, 0x8100])), PASSED1);
        // Rule 2: a third tag is not parsed.
        assert_eq!(d(&tagged(&[0x88a8, 0x8100, 0x8100])), Outcome::Unreadable);
        // Tag present but its inner EtherType is cut off.
        assert_eq!(d(&tagged(&[0x8100])[..17]), Outcome::Unreadable);
        // Inner EtherType readable, but no IP header after it.
        assert_eq!(d(&tagged(&[0x8100])[..18]), Outcome::Unreadable);
        // Tag with a non-IP inner type is non-IP.
        let mut arp = vec![0u8; 12];
        arp.extend_from_slice(&[0x81, 0x00, 0, 1, 0x08, 0x06]);
        assert_eq!(d(&arp), Outcome::NonIp);
    }

    #[test]
    fn model_ipv4_header() {
        let f = |ip: Vec<u8>| d(&eth(ETH_P_IPV4, &ip));
        let ok = ip4(S4_OK, D4, IPPROTO_TCP, 0, &[], &tcp(80));
        // Rule 4: fewer than 20 bytes, or wrong version.
        assert_eq!(f(ok[..19].to_vec()), Outcome::Unreadable);
        let mut bad = ok.clone();
        bad[0] = 0x65;
        assert_eq!(f(bad), Outcome::Unreadable);
        // IHL < 5 → malformed (whole-address account of D4 is 2).
        let mut bad = ok.clone();
        bad[0] = 0x44;
        assert_eq!(f(bad), Outcome::Malformed { account: 2 });
        // total_length < IHL.
        let mut bad = ok.clone();
        bad[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert_eq!(f(bad), Outcome::Malformed { account: 2 });
        // total_length beyond the frame.
        let mut bad = ok.clone();
        bad[2..4].copy_from_slice(&41u16.to_be_bytes());
        assert_eq!(f(bad), Outcome::Malformed { account: 2 });
        // Trailing Ethernet padding beyond total_length is fine.
        let mut padded = ok.clone();
        padded.extend_from_slice(&[0; 10]);
        assert_eq!(f(padded), PASSED1);
        // Options shift the transport header.
        assert_eq!(f(ip4(S4_OK, D4, IPPROTO_TCP, 0, &[1; 8], &tcp(80))), PASSED1);
        // Malformed to a port-only address: account 0.
        let mut bad = ip4(S4_OK, [192, 0, 2, 2], IPPROTO_TCP, 0, &[], &tcp(22));
        bad[0] = 0x43;
        assert_eq!(f(bad), Outcome::Malformed { account: 0 });
        // Malformed to an unbound address stays unbound.
        let mut bad = ip4(S4_OK, [192, 0, 2, 99], IPPROTO_TCP, 0, &[], &tcp(80));
        bad[0] = 0x43;
        assert_eq!(f(bad), Outcome::Unbound);
    }

    #[test]
    fn model_ipv4_transport_and_fragments() {
        let f = |ip: Vec<u8>| d(&eth(ETH_P_IPV4, &ip));
        // TCP header shorter than 20 within total_length → malformed.
        assert_eq!(f(ip4(S4_OK, D4, IPPROTO_TCP, 0, &[], &tcp(80)[..19])), Outcome::Malformed { account: 2 });
        // UDP needs only 8 bytes.
        assert_eq!(
            f(ip4(S4_OK, D4, IPPROTO_UDP, 0, &[], &udp(53))),
            Outcome::Dropped { account: 3, reason: DropReason::AccountUnset }
        );
        assert_eq!(f(ip4(S4_OK, D4, IPPROTO_UDP, 0, &[], &udp(53)[..7])), Outcome::Malformed { account: 2 });
        // First fragment (MF set, offset 0) still carries the port.
        assert_eq!(f(ip4(S4_BAD, D4, IPPROTO_TCP, 0x2000, &[], &tcp(80))), NOTALLOWED1);
        // Offset-1 TCP fragment is malformed (RFC 1858), even if tiny.
        assert_eq!(f(ip4(S4_OK, D4, IPPROTO_TCP, 1, &[], &[0; 4])), Outcome::Malformed { account: 2 });
        // Offset-1 UDP fragment is not; it has no port so the whole address decides.
        assert_eq!(f(ip4(S4_BAD, D4, IPPROTO_UDP, 1, &[], &[0; 4])), Outcome::WouldDrop { account: 2 });
        // Later fragments: no port, whole address decides; to a port-only address: unbound.
        assert_eq!(f(ip4(S4_OK, D4, IPPROTO_TCP, 185, &[], &[])), Outcome::Passed { account: 2 });
        assert_eq!(f(ip4(S4_OK, [192, 0, 2, 2], IPPROTO_TCP, 185, &[], &[])), Outcome::Unbound);
        // Other protocols never have a port.
        assert_eq!(f(ip4(S4_BAD, D4, IPPROTO_ICMP, 0, &[], &[8, 0, 0, 0])), Outcome::WouldDrop { account: 2 });
        assert_eq!(f(ip4(S4_BAD, D4, 99, 0, &[], &[])), Outcome::WouldDrop { account: 2 });
        // Unmatched port falls back to the whole address.
        assert_eq!(f(ip4(S4_BAD, D4, IPPROTO_TCP, 0, &[], &tcp(81))), Outcome::WouldDrop { account: 2 });
        // Port-only address, other port: unbound.
        assert_eq!(f(ip4(S4_BAD, [192, 0, 2, 2], IPPROTO_TCP, 0, &[], &tcp(23))), Outcome::Unbound);
        assert_eq!(f(ip4(S4_BAD, [192, 0, 2, 2], IPPROTO_TCP, 0, &[], &tcp(22))), NOTALLOWED1);
    }

    #[test]
    fn model_ipv6_basic() {
        let f = |ip: Vec<u8>| d(&eth(ETH_P_IPV6, &ip));
        assert_eq!(f(ip6(S6_OK, D6, IPPROTO_UDP, &udp(53))), PASSED1);
        assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_UDP, &udp(53))), NOTALLOWED1);
        assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_TCP, &tcp(53))), Outcome::WouldDrop { account: 2 });
        // Rule 5: short header / wrong version.
        assert_eq!(f(ip6(S6_OK, D6, IPPROTO_UDP, &[])[..39].to_vec()), Outcome::Unreadable);
        let mut bad = ip6(S6_OK, D6, IPPROTO_UDP, &udp(53));
        bad[0] = 0x40;
        assert_eq!(f(bad), Outcome::Unreadable);
        // payload_length beyond the frame.
        let mut bad = ip6(S6_OK, D6, IPPROTO_UDP, &udp(53));
        bad[5] += 1;
        assert_eq!(f(bad), Outcome::Malformed { account: 2 });
        // payload_length too small for the UDP header: malformed although bytes are there.
        let mut bad = ip6(S6_OK, D6, IPPROTO_UDP, &udp(53));
        bad[5] = 7;
        assert_eq!(f(bad), Outcome::Malformed { account: 2 });
        // Unbound v6 destination; a v4-mapped form of a bound v4 address is not it.
        assert_eq!(f(ip6(S6_OK, "2001:db8::2", IPPROTO_UDP, &udp(53))), Outcome::Unbound);
        assert_eq!(f(ip6(S6_OK, "::ffff:192.0.2.1", IPPROTO_TCP, &tcp(80))), Outcome::Unbound);
    }

    #[test]
    fn model_ipv6_extension_headers() {
        let f = |ip: Vec<u8>| d(&eth(ETH_P_IPV6, &ip));
        let chain = |hdrs: &[Vec<u8>], first: u8, l4: &[u8]| {
            let mut p: Vec<u8> = hdrs.concat();
            p.extend_from_slice(l4);
            ip6(S6_OK, D6, first, &p)
        };
        // HBH -> routing -> dstopts -> UDP.
        let hdrs = [ext(43, 0), ext(60, 2), ext(17, 1)];
        assert_eq!(f(chain(&hdrs, 0, &udp(53))), PASSED1);
        // First fragment (offset 0, M=1) carries the port.
        assert_eq!(f(chain(&[frag(17, 0, true)], 44, &udp(53))), PASSED1);
        // Non-first fragment: no port, protocol = next; whole address decides.
        let nf = chain(&[frag(17, 100, false)], 44, &[1, 2]);
        assert_eq!(f(nf), Outcome::Passed { account: 2 });
        // Non-first fragment stops the walk even with more ext headers "after" it.
        assert_eq!(f(chain(&[frag(0, 100, false)], 44, &[])), Outcome::Passed { account: 2 });
        // Exactly 6 extension headers then UDP: fine.
        let six: Vec<_> = (0..6).map(|i| ext(if i == 5 { 17 } else { 60 }, 0)).collect();
        assert_eq!(f(chain(&six, 60, &udp(53))), PASSED1);
        // 7 extension headers: the walk gives up → malformed.
        let seven: Vec<_> = (0..7).map(|i| ext(if i == 6 { 17 } else { 60 }, 0)).collect();
        assert_eq!(f(chain(&seven, 60, &udp(53))), Outcome::Malformed { account: 2 });
        // 6 headers with the 6th a non-first fragment: not malformed.
        let mut six_f: Vec<_> = (0..5).map(|i| ext(if i == 4 { 44 } else { 60 }, 0)).collect();
        six_f.push(frag(17, 9, false));
        assert_eq!(f(chain(&six_f, 60, &[])), Outcome::Passed { account: 2 });
        // Ext header longer than payload_length → malformed.
        assert_eq!(f(chain(&[ext(17, 3)], 0, &[])), Outcome::Malformed { account: 2 });
        // Ext header whose two first bytes are missing: payload ends right at pos.
        assert_eq!(f(chain(&[], 0, &[])), Outcome::Malformed { account: 2 });
        // Fragment header cut short.
        assert_eq!(f(chain(&[], 44, &[17, 0, 0, 0, 0])), Outcome::Malformed { account: 2 });
        // payload_length too small for UDP after ext header, bytes present in the frame.
        let mut short = chain(&[ext(17, 0)], 0, &udp(53));
        short[5] = 8 + 7;
        assert_eq!(f(short), Outcome::Malformed { account: 2 });
    }

    #[test]
    fn model_ipv6_ndp() {
        let f = |ip: Vec<u8>| d(&eth(ETH_P_IPV6, &ip));
        for t in 133..=137u8 {
            assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[t, 0, 0, 0])), Outcome::Ndp);
        }
        // Echo request is an ordinary packet.
        assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[128, 0, 0, 0])), Outcome::WouldDrop { account: 2 });
        assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[138, 0, 0, 0])), Outcome::WouldDrop { account: 2 });
        // A cut ICMPv6 header is malformed.
        assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[135, 0])), Outcome::Malformed { account: 2 });
        // NDP behind an extension header.
        let mut p = ext(58, 0);
        p.extend([135, 0, 0, 0]);
        assert_eq!(f(ip6(S6_BAD, D6, 0, &p)), Outcome::Ndp);
        // ICMPv6 with no type byte → malformed.
        assert_eq!(f(ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[])), Outcome::Malformed { account: 2 });
        // Type byte present in the frame but beyond payload_length → malformed.
        let mut bad = ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[135]);
        bad[5] = 0;
        assert_eq!(f(bad), Outcome::Malformed { account: 2 });
        // NDP to an unbound address is just unbound.
        assert_eq!(f(ip6(S6_BAD, "2001:db8::2", IPPROTO_ICMPV6, &[135])), Outcome::Unbound);
        // Empty policy: everything IP is unbound.
        let empty = ModelPolicy::default();
        let frame = eth(ETH_P_IPV6, &ip6(S6_BAD, D6, IPPROTO_ICMPV6, &[]));
        assert_eq!(decide(&empty, NOW, &frame), Outcome::Unbound);
    }

    #[test]
    fn model_account_decision() {
        let mut p = policy();
        let frame = |src| eth(ETH_P_IPV4, &ip4(src, D4, IPPROTO_TCP, 0, &[], &tcp(80)));
        let (ok, bad) = (frame(S4_OK), frame(S4_BAD));
        assert_eq!(decide(&p, NOW, &ok), PASSED1);
        assert_eq!(decide(&p, NOW, &bad), NOTALLOWED1);
        p.accounts.get_mut(&1).unwrap().mode = Mode::Monitor;
        assert_eq!(decide(&p, NOW, &bad), Outcome::WouldDrop { account: 1 });
        p.accounts.get_mut(&1).unwrap().mode = Mode::Off;
        assert_eq!(decide(&p, NOW, &bad), PASSED1);
        // Suspension beats every mode, including off, and an allowed source.
        p.accounts.get_mut(&1).unwrap().suspended = true;
        let susp = Outcome::Dropped { account: 1, reason: DropReason::Suspended };
        assert_eq!(decide(&p, NOW, &bad), susp);
        assert_eq!(decide(&p, NOW, &ok), susp);
        p.accounts.remove(&1);
        let unset = Outcome::Dropped { account: 1, reason: DropReason::AccountUnset };
        assert_eq!(decide(&p, NOW, &ok), unset);
    }

    #[test]
    fn model_source_allowed_expiry_and_families() {
        let mut a = account(Mode::Enforce);
        a.entries = vec![
            (n("10.1.2.0/24"), NOW - HOUR_NS), // expired
            (n("10.1.0.0/16"), NOW + HOUR_NS), // live, shadowed by the /24 in LPM terms
            (n("172.16.0.0/12"), NOW),         // expires exactly now: gone
            (n("192.168.1.1/32"), NOW - 1),
            (n("192.168.1.1/32"), NEVER), // same prefix twice
            (n("::/0"), NOW - 1),
        ];
        assert!(source_allowed(&a, NOW, v4("10.1.2.3")));
        assert!(source_allowed(&a, NOW, v4("10.1.200.3")));
        assert!(!source_allowed(&a, NOW, v4("10.2.0.1")));
        assert!(!source_allowed(&a, NOW, v4("172.16.0.1")));
        assert!(source_allowed(&a, NOW - 1, v4("172.16.0.1")));
        assert!(source_allowed(&a, NOW, v4("192.168.1.1")));
        assert!(!source_allowed(&a, NOW, v4("192.168.1.2")));
        assert!(!source_allowed(&a, NOW, v6("2001:db8::1")));
        assert!(source_allowed(&a, NOW - 2, v6("2001:db8::1")));
        // v4 /0 does not cover v6, nor the v4-mapped form.
        a.entries = vec![(n("0.0.0.0/0"), NEVER)];
        assert!(source_allowed(&a, NOW, v4("1.2.3.4")));
        assert!(!source_allowed(&a, NOW, v6("::ffff:1.2.3.4")));
        a.entries = vec![(n("::/0"), NEVER)];
        assert!(!source_allowed(&a, NOW, v4("1.2.3.4")));
    }

    #[test]
    fn model_random_policy_shape() {
        use rand::SeedableRng;
        let params = PolicyParams::default();
        for seed in 0..50 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let p = random_policy(&mut rng, &params, NOW);
            assert_eq!(p.accounts.len(), params.accounts);
            assert!(p.accounts.keys().all(|&k| k >= 1));
            assert!(p.bindings.iter().all(|b| b.account >= 1));
            for a in p.accounts.values() {
                for fam in [true, false] {
                    let lens: BTreeSet<u8> = a
                        .entries
                        .iter()
                        .filter(|(n, _)| n.addr().is_ipv4() == fam)
                        .map(|(n, _)| n.prefix_len())
                        .collect();
                    assert!(lens.len() <= params.max_prefix_lengths);
                }
                for &(net, exp) in &a.entries {
                    assert_eq!(net, net.trunc());
                    assert!(exp == NEVER || exp.abs_diff(NOW) >= HOUR_NS);
                }
            }
            // Binding keys are unique.
            let keys: BTreeSet<_> = p.bindings.iter().map(|b| (b.addr, b.target)).collect();
            assert_eq!(keys.len(), p.bindings.len());
        }
    }
}
