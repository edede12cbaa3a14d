//! Which prefix length the kernel probes first in each account's allowlist.
//!
//! The program probes the first length of a table's header before anything else (one probe
//! for a source that length covers), then the summary, then every other length. The writer
//! puts the most specific length first; an account whose packets come mostly through a
//! shorter key (an office /24 of an account that also has host entries) then pays a host
//! probe that misses and the summary on nearly every packet. [`ProbeOrder`] learns, from the
//! last-used stamps the daemon scans every second, which length lets each account's packets
//! through, and asks for that length to be probed first.
//!
//! What it can see: a stamp says that a key let at least one packet through since the last
//! scan, not how many. So the tally counts *seconds* in which a key of a length was used, per
//! (account slot, family): an account whose traffic comes through its /24 every second and
//! to a host now and then gets the /24 first; one whose hosts and /24 are both busy every
//! second keeps what it has (equal tallies never switch). Packet volume within a second is
//! invisible to it.
//!
//! The tally: each second a length was used adds [`SCORE_PER_SECOND`]; every second, each
//! score first loses an eighth (rounded so that it reaches zero), so a length used every
//! second settles at about eight times [`SCORE_PER_SECOND`] and an old habit fades over tens
//! of seconds (half-life about 5 s). A (slot, family) whose scores all reached zero is
//! forgotten, so memory holds only the accounts with recent traffic: at most
//! [`MAX_PROBE_LENGTHS`] small pairs each.
//!
//! Hysteresis: the first length changes only to a length whose score is at least
//! [`MIN_SCORE`] (used in three recent seconds) and more than [`SWITCH_RATIO`] times the
//! score of the length now first. Traffic split evenly (or anywhere up to 2:1) between two
//! lengths never moves the order; moving it back takes the other length to outweigh this one
//! by more than 2:1 in turn.

use std::collections::HashMap;

use ipaccess_common::{FAMILY_V4, FAMILY_V6, MAX_PROBE_LENGTHS};

use super::{KeyOwner, LastUse};

/// Added to a length's score for each second in which one of its keys was stamped.
pub const SCORE_PER_SECOND: u32 = 64;
/// The least score for which a length is put first: three seconds of use in a row
/// (64 + 56 + 49 = 169).
pub const MIN_SCORE: u32 = 160;
/// A length is put first only when its score is more than this many times the first's.
pub const SWITCH_RATIO: u32 = 2;

/// A change of order asked for: probe `first` first in account `slot`'s table of `family`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reorder {
    pub slot: u32,
    pub family: u64,
    pub first: u8,
}

/// The decaying tally of one account's family: (length, score) pairs.
#[derive(Clone, Debug, Default)]
struct Tally(Vec<(u8, u32)>);

impl Tally {
    fn score(&self, len: u8) -> u32 {
        self.0.iter().find(|(l, _)| *l == len).map_or(0, |(_, s)| *s)
    }
}

/// The decision (see the module docs). The daemon keeps one and feeds it each second's
/// stamps ([`ProbeOrder::tick`]), then has [`super::Datapath::reorder_among`] apply it.
#[derive(Debug, Default)]
pub struct ProbeOrder {
    tallies: HashMap<(u32, u64), Tally>,
}

impl ProbeOrder {
    pub fn new() -> Self {
        Self::default()
    }

    /// One second passes: every score decays, then each (slot, family, length) among `used`
    /// (repeats count once) is credited.
    pub fn tick(&mut self, used: impl IntoIterator<Item = (u32, u64, u8)>) {
        self.tallies.retain(|_, tally| {
            for (_, score) in tally.0.iter_mut() {
                *score = *score * 7 / 8;
            }
            tally.0.retain(|(_, score)| *score > 0);
            !tally.0.is_empty()
        });
        // Repeats out by sorting: a set of every key of a busy second cost more than the rest.
        let mut used: Vec<(u32, u64, u8)> = used.into_iter().collect();
        used.sort_unstable();
        used.dedup();
        for (slot, family, len) in used {
            let tally = self.tallies.entry((slot, family)).or_default();
            match tally.0.iter().position(|(l, _)| *l == len) {
                Some(at) => tally.0[at].1 += SCORE_PER_SECOND,
                // More distinct lengths than a table probes (twice over, for lengths of the
                // table before a change): the newcomer waits until one fades. A bound.
                None if tally.0.len() < 2 * MAX_PROBE_LENGTHS => tally.0.push((len, SCORE_PER_SECOND)),
                None => {}
            }
        }
    }

    /// [`ProbeOrder::tick`] with the stamped keys of one scan: accounts' own keys only (a
    /// shared set's group keeps its own order).
    pub fn tick_uses(&mut self, used: &[LastUse]) {
        self.tick(used.iter().filter_map(|u| {
            let KeyOwner::Account(slot) = u.owner else { return None };
            let family = if u.key.addr().is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
            Some((slot, family, u.key.prefix_len()))
        }));
    }

    /// [`ProbeOrder::decide_among`] every candidate at once.
    #[cfg(test)]
    pub fn decide(&self, lengths: impl FnMut(u32, u64) -> Vec<u8>) -> Vec<Reorder> {
        self.decide_among(&self.candidates(), lengths)
    }

    /// The (slot, family) pairs whose tally could call for a change: a length scored
    /// [`MIN_SCORE`]. The daemon decides among them a part at a time
    /// ([`ProbeOrder::decide_among`]), since reading the tables' lengths takes the writer lock.
    pub fn candidates(&self) -> Vec<(u32, u64)> {
        let mut out: Vec<(u32, u64)> = self
            .tallies
            .iter()
            .filter(|(_, tally)| tally.0.iter().any(|&(_, s)| s >= MIN_SCORE))
            .map(|(&key, _)| key)
            .collect();
        out.sort_unstable();
        out
    }

    /// The changes of order the tallies of `candidates` call for. `lengths(slot, family)`
    /// gives the lengths the account's table probes now, in order (empty if it has none):
    /// only a length it holds can be put first.
    pub fn decide_among(
        &self,
        candidates: &[(u32, u64)],
        mut lengths: impl FnMut(u32, u64) -> Vec<u8>,
    ) -> Vec<Reorder> {
        let mut out = Vec::new();
        for &(slot, family) in candidates {
            let Some(tally) = self.tallies.get(&(slot, family)) else { continue };
            let Some(&(best, score)) = tally.0.iter().filter(|(_, s)| *s >= MIN_SCORE).max_by_key(|(_, s)| *s) else {
                continue;
            };
            let now = lengths(slot, family);
            let Some(&first) = now.first() else { continue };
            if best == first || !now.contains(&best) {
                continue;
            }
            if score > SWITCH_RATIO * tally.score(first) {
                out.push(Reorder { slot, family, first: best });
            }
        }
        out
    }

    /// (slot, family) pairs tallied now: what the memory holds.
    pub fn tracked(&self) -> usize {
        self.tallies.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: u32 = 7;

    /// The order after each second, applying every decision as the daemon does.
    fn run(order: &mut ProbeOrder, lengths: &mut Vec<u8>, seconds: &[&[u8]]) -> Vec<u8> {
        let mut firsts = Vec::new();
        for used in seconds {
            order.tick(used.iter().map(|&len| (SLOT, FAMILY_V4, len)));
            for r in order.decide(|_, _| lengths.clone()) {
                assert_eq!((r.slot, r.family), (SLOT, FAMILY_V4));
                let at = lengths.iter().position(|&l| l == r.first).unwrap();
                let len = lengths.remove(at);
                lengths.insert(0, len);
            }
            firsts.push(lengths[0]);
        }
        firsts
    }

    fn repeat(used: &[u8], seconds: usize) -> Vec<&[u8]> {
        vec![used; seconds]
    }

    #[test]
    fn traffic_through_a_24_puts_it_first_within_three_seconds() {
        let mut order = ProbeOrder::new();
        let mut lengths = vec![32, 24];
        let firsts = run(&mut order, &mut lengths, &repeat(&[24], 5));
        assert_eq!(firsts, [32, 32, 24, 24, 24]);
        assert_eq!(lengths, [24, 32]);
    }

    #[test]
    fn one_second_of_traffic_is_not_enough() {
        let mut order = ProbeOrder::new();
        let mut lengths = vec![32, 24];
        let mut seconds: Vec<&[u8]> = vec![&[24]];
        seconds.extend([&[][..]; 10]);
        assert!(run(&mut order, &mut lengths, &seconds).iter().all(|&l| l == 32));
    }

    #[test]
    fn traffic_split_evenly_never_moves_the_order() {
        for split in [&[&[32u8, 24][..]][..], &[&[32], &[24]], &[&[24], &[32]], &[&[24], &[32], &[32, 24]]] {
            let mut order = ProbeOrder::new();
            let mut lengths = vec![32, 24];
            let seconds: Vec<&[u8]> = split.iter().copied().cycle().take(120).collect();
            let firsts = run(&mut order, &mut lengths, &seconds);
            assert!(firsts.iter().all(|&l| l == 32), "{split:?}: {firsts:?}");
        }
        // Two seconds of three through the /24: it goes first once and stays there.
        let mut order = ProbeOrder::new();
        let mut lengths = vec![32, 24];
        let seconds: Vec<&[u8]> = [&[24u8][..], &[24], &[32]].into_iter().cycle().take(300).collect();
        let firsts = run(&mut order, &mut lengths, &seconds);
        assert_eq!(firsts.windows(2).filter(|w| w[0] != w[1]).count(), 1, "{firsts:?}");
        assert_eq!(lengths[0], 24);
    }

    #[test]
    fn hysteresis_a_switch_back_needs_the_other_length_to_dominate() {
        let mut order = ProbeOrder::new();
        let mut lengths = vec![32, 24];
        run(&mut order, &mut lengths, &repeat(&[24], 30));
        assert_eq!(lengths[0], 24);
        // Hosts as busy as the /24 for a minute: the /24 stays first.
        let firsts = run(&mut order, &mut lengths, &repeat(&[32, 24], 60));
        assert!(firsts.iter().all(|&l| l == 24), "{firsts:?}");
        // Then the /24 falls silent: the hosts take over once they outweigh it 2:1.
        let firsts = run(&mut order, &mut lengths, &repeat(&[32], 30));
        let switched = firsts.iter().position(|&l| l == 32).expect("switched back");
        assert!((2..10).contains(&switched), "{firsts:?}");
        assert!(firsts[switched..].iter().all(|&l| l == 32), "{firsts:?}");
    }

    #[test]
    fn scores_decay_and_idle_accounts_are_forgotten() {
        let mut order = ProbeOrder::new();
        order.tick([(SLOT, FAMILY_V4, 24), (SLOT, FAMILY_V6, 64), (SLOT + 1, FAMILY_V4, 32), (SLOT, FAMILY_V4, 24)]);
        assert_eq!(order.tracked(), 3);
        assert_eq!(order.tallies[&(SLOT, FAMILY_V4)].score(24), SCORE_PER_SECOND, "a repeat counts once");
        let mut seconds = 0;
        while order.tracked() > 0 {
            order.tick([]);
            seconds += 1;
            assert!(seconds < 100, "scores never reach zero");
        }
        // 64 * (7/8)^n rounded down reaches zero after a few tens of seconds.
        assert!((10..60).contains(&seconds), "{seconds}");
        // A length used every second settles where the decay takes back what a second adds.
        for _ in 0..200 {
            order.tick([(SLOT, FAMILY_V4, 24)]);
        }
        let settled = order.tallies[&(SLOT, FAMILY_V4)].score(24);
        assert!((7 * SCORE_PER_SECOND..=8 * SCORE_PER_SECOND).contains(&settled), "{settled}");
    }

    #[test]
    fn only_lengths_the_table_holds_are_put_first() {
        let mut order = ProbeOrder::new();
        for _ in 0..5 {
            order.tick([(SLOT, FAMILY_V4, 24)]);
        }
        assert!(order.decide(|_, _| vec![32, 16]).is_empty());
        assert!(order.decide(|_, _| vec![]).is_empty());
        assert!(order.decide(|_, _| vec![24, 32]).is_empty(), "already first");
        assert_eq!(order.decide(|_, _| vec![32, 24]), [Reorder { slot: SLOT, family: FAMILY_V4, first: 24 }]);
        assert!(order.decide(|_, family| if family == FAMILY_V6 { vec![128, 64] } else { vec![] }).is_empty());
    }

    /// Not a check: what a second of the tally costs at 100,000 accounts with traffic
    /// through two lengths each (200,000 stamped keys), and the decision over them.
    /// `cargo test --release -p ipaccess --lib -- --ignored --nocapture busy_second`.
    #[test]
    #[ignore = "a measurement"]
    fn busy_second_at_100_000_accounts() {
        let mut order = ProbeOrder::new();
        let used: Vec<(u32, u64, u8)> = (0..100_000).flat_map(|s| [(s, FAMILY_V4, 32), (s, FAMILY_V4, 24)]).collect();
        for second in 0..6 {
            let started = std::time::Instant::now();
            order.tick(used.iter().copied());
            let ticked = started.elapsed();
            let candidates = order.candidates();
            let changes = order.decide_among(&candidates, |_, _| vec![32, 24]);
            println!(
                "second {second}: tick {ticked:?}, decision over {} candidates {:?} ({} changes)",
                candidates.len(),
                started.elapsed() - ticked,
                changes.len()
            );
        }
    }
}
