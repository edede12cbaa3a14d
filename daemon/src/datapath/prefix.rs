//! Turning an allowlist into table keys.
//!
//! The kernel probes one table key per prefix length it is told to try, for at most
//! [`MAX_PROBE_LENGTHS`] lengths per family. Lists with more distinct lengths are
//! expanded here: a prefix is replaced by the covering set of longer prefixes at the next
//! length that is probed. The lengths to keep are chosen to minimise the number of keys.
//! Entries that land on the same key keep the latest expiry, since either would allow.

use std::collections::BTreeMap;

use ipaccess_common::{AddrWords, FAMILY_V4, FAMILY_V6, MAX_PROBE_LENGTHS, v4_key, v6_key};
use ipnet::IpNet;

/// Keys an expansion may produce per account before it is refused (a quarter of the default
/// slot array at the maximum load).
pub const MAX_EXPANDED_KEYS: u64 = 1 << 17;

/// One allowlist key: family, prefix length and the masked address words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PrefixKey {
    pub family: u64,
    pub len: u8,
    pub hi: u64,
    pub lo: u64,
}

impl PrefixKey {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(n) => {
                let (hi, lo) = v4_key(u32::from(n.addr()), n.prefix_len());
                PrefixKey { family: FAMILY_V4, len: n.prefix_len(), hi, lo }
            }
            IpNet::V6(n) => {
                let words = AddrWords::v6(u128::from(n.addr()));
                let (hi, lo) = v6_key(words.hi, words.lo, n.prefix_len());
                PrefixKey { family: FAMILY_V6, len: n.prefix_len(), hi, lo }
            }
        }
    }
}

/// The keys of an allowlist and the lengths the kernel must probe for them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Expanded {
    /// Key → expiry (CLOCK_BOOTTIME ns, `NEVER_EXPIRES` for permanent entries).
    pub keys: BTreeMap<PrefixKey, u64>,
    /// Probe lengths, longest first.
    pub v4_lengths: Vec<u8>,
    pub v6_lengths: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the allowlist uses prefix lengths that would need {keys} table entries; use fewer distinct \
     prefix lengths (at most {MAX_PROBE_LENGTHS} per address family are free)"
)]
pub struct TooManyKeys {
    pub keys: u64,
}

pub fn expand(entries: &[(IpNet, u64)]) -> Result<Expanded, TooManyKeys> {
    let mut expanded = Expanded::default();
    for family in [FAMILY_V4, FAMILY_V6] {
        let nets: Vec<(IpNet, u64)> =
            entries.iter().filter(|(net, _)| family_of(net) == family).map(|&(net, e)| (net.trunc(), e)).collect();
        let mut counts: BTreeMap<u8, u64> = BTreeMap::new();
        for (net, _) in &nets {
            *counts.entry(net.prefix_len()).or_default() += 1;
        }
        let lengths = choose_lengths(&counts)?;
        for (net, expiry) in nets {
            let target = *lengths.iter().find(|&&l| l >= net.prefix_len()).expect("the longest length is kept");
            let subnets = net.subnets(target).expect("target is not shorter than the prefix");
            for subnet in subnets {
                let slot = expanded.keys.entry(PrefixKey::of(&subnet)).or_insert(expiry);
                *slot = (*slot).max(expiry);
            }
        }
        let mut lengths = lengths;
        lengths.reverse();
        match family {
            FAMILY_V4 => expanded.v4_lengths = lengths,
            _ => expanded.v6_lengths = lengths,
        }
    }
    Ok(expanded)
}

fn family_of(net: &IpNet) -> u64 {
    match net {
        IpNet::V4(_) => FAMILY_V4,
        IpNet::V6(_) => FAMILY_V6,
    }
}

/// Picks at most `MAX_PROBE_LENGTHS` of the used lengths (always the longest) so that
/// expanding every prefix to the next kept length creates the fewest keys. Ascending order.
fn choose_lengths(counts: &BTreeMap<u8, u64>) -> Result<Vec<u8>, TooManyKeys> {
    let lengths: Vec<u8> = counts.keys().copied().collect();
    let n = lengths.len();
    if n <= MAX_PROBE_LENGTHS {
        return Ok(lengths);
    }
    // Keys created when lengths[a..=b] are all expanded to lengths[b].
    let group_cost = |a: usize, b: usize| -> u64 {
        (a..=b)
            .map(|i| {
                counts[&lengths[i]]
                    .saturating_mul(1u64.checked_shl((lengths[b] - lengths[i]) as u32).unwrap_or(u64::MAX))
            })
            .fold(0u64, u64::saturating_add)
    };
    // best[k][b]: fewest keys covering lengths[..=b] with k kept lengths, the last being b.
    let mut best = vec![vec![u64::MAX; n]; MAX_PROBE_LENGTHS + 1];
    let mut from = vec![vec![usize::MAX; n]; MAX_PROBE_LENGTHS + 1];
    for (b, cost) in best[1].iter_mut().enumerate() {
        *cost = group_cost(0, b);
    }
    for k in 2..=MAX_PROBE_LENGTHS {
        for b in k - 1..n {
            for a in k - 2..b {
                let cost = best[k - 1][a].saturating_add(group_cost(a + 1, b));
                if cost < best[k][b] {
                    best[k][b] = cost;
                    from[k][b] = a;
                }
            }
        }
    }
    let keys = best[MAX_PROBE_LENGTHS][n - 1];
    if keys > MAX_EXPANDED_KEYS {
        return Err(TooManyKeys { keys });
    }
    let mut kept = Vec::with_capacity(MAX_PROBE_LENGTHS);
    let (mut k, mut b) = (MAX_PROBE_LENGTHS, n - 1);
    while k >= 1 {
        kept.push(lengths[b]);
        if k == 1 {
            break;
        }
        b = from[k][b];
        k -= 1;
    }
    kept.reverse();
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipaccess_common::NEVER_EXPIRES;

    fn nets(list: &[&str]) -> Vec<(IpNet, u64)> {
        list.iter().map(|s| (s.parse().unwrap(), NEVER_EXPIRES)).collect()
    }

    #[test]
    fn few_lengths_are_kept_as_they_are() {
        let e = expand(&nets(&["198.18.0.1/32", "198.18.1.0/24", "fd00::/64", "fd00::1/128"])).unwrap();
        assert_eq!(e.v4_lengths, vec![32, 24]);
        assert_eq!(e.v6_lengths, vec![128, 64]);
        assert_eq!(e.keys.len(), 4);
    }

    #[test]
    fn host_bits_are_cleared() {
        let e = expand(&nets(&["198.18.1.77/24"])).unwrap();
        let key = e.keys.keys().next().unwrap();
        assert_eq!(key.lo, u32::from(std::net::Ipv4Addr::new(198, 18, 1, 0)) as u64);
    }

    #[test]
    fn many_lengths_are_expanded_to_the_cheapest_kept_set() {
        // Lengths 16..=25 (ten of them) of one distinct address each: two must be folded
        // into a neighbour, and the cheapest is folding a length into the next (doubling one
        // entry). These are table data only; nothing is sent to them.
        let list: Vec<String> = (16..=25).map(|len| format!("10.{len}.0.0/{len}")).collect();
        let list: Vec<&str> = list.iter().map(String::as_str).collect();
        let e = expand(&nets(&list)).unwrap();
        assert_eq!(e.v4_lengths.len(), MAX_PROBE_LENGTHS);
        assert_eq!(e.v4_lengths[0], 25, "the longest length is always probed");
        assert_eq!(e.keys.len(), 12, "two prefixes doubled");
    }

    #[test]
    fn expansion_keeps_the_latest_expiry() {
        // Ten lengths; 17..=24 hold four prefixes each, so the cheapest folds are the lone /15
        // and the lone /16 (which expires) into /17, where they land on the same keys: the
        // permanent entry must win.
        let mut list = nets(&["198.18.0.0/15"]);
        list.push(("198.18.0.0/16".parse().unwrap(), 5));
        for len in 17..=24u8 {
            for i in 0..4u32 {
                let addr = std::net::Ipv4Addr::from(0x0a00_0000 | (i << (32 - len)));
                list.push((IpNet::new(addr.into(), len).unwrap(), 7));
            }
        }
        let e = expand(&list).unwrap();
        assert_eq!(e.v4_lengths, (17..=24).rev().collect::<Vec<u8>>());
        let base = u32::from(std::net::Ipv4Addr::new(198, 18, 0, 0)) as u64;
        let folded: Vec<u64> = e.keys.iter().filter(|(k, _)| k.lo >> 17 == base >> 17).map(|(_, &exp)| exp).collect();
        assert_eq!(folded, vec![NEVER_EXPIRES; 4], "the /15 as four /17s, two shared with the /16");
    }

    #[test]
    fn refuses_expansions_that_explode() {
        // Nine lengths 16 bits apart (8 apart at the end), each well populated: folding any
        // one of them into the next would create more than MAX_EXPANDED_KEYS keys.
        let mut list = Vec::new();
        for len in (8..=104).step_by(16) {
            for i in 0..256u128 {
                let addr = std::net::Ipv6Addr::from(i << (128 - len));
                list.push((IpNet::new(addr.into(), len as u8).unwrap(), NEVER_EXPIRES));
            }
        }
        for i in 0..5000u128 {
            list.push((IpNet::new(std::net::Ipv6Addr::from(i << 8).into(), 120).unwrap(), NEVER_EXPIRES));
        }
        list.push(("fd00::1/128".parse().unwrap(), NEVER_EXPIRES));
        assert!(matches!(expand(&list), Err(TooManyKeys { keys }) if keys > MAX_EXPANDED_KEYS));
    }
}
