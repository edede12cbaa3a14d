//! The single writer of the kernel's lookup tables.
//!
//! [`Tables::sync`] makes one table hold exactly a wanted set of keys. It changes a table in
//! place when it can: new keys are inserted and their prefix lengths published first, then
//! removed keys are tombstoned, and a key present before and after is never touched except
//! for an atomic store of its value. When a table has to grow, shrink or use other prefix
//! lengths, a complete new table is built in a fresh region and the caller swaps its
//! descriptor in with one store. Either way no packet ever misses a key that is wanted both
//! before and after the change. The protocol itself is described in `ipaccess_common::table`.

use std::{
    collections::BTreeMap,
    thread,
    time::Instant,
};

use ipaccess_common::{
    FAMILY_V4, MAX_PROBE, MAX_PROBE_LENGTHS, Meta, PackedLengths, Slot, SlotReader, Summary, TableDesc, Tag,
    hash_key, home_offset, probe_index, read_lengths, state, top_bits,
};

use super::{
    mmap::MmapArray,
    regions::{Region, RegionError, Regions},
};

/// Tables are kept at most this full (live and tombstoned slots), so probes stay short.
const MAX_LOAD_PERCENT: u64 = 50;
/// A table this sparse is rebuilt smaller (if it is bigger than the minimum).
const MIN_LOAD_PERCENT: u64 = 10;
const MIN_LOG2_SLOTS: u32 = 3;
/// How long an in-place change waits between publishing a grown set of prefix lengths and
/// tombstoning removed keys: far longer than one run of the XDP program (which runs with
/// preemption off), so no packet still holds the old lengths.
const READER_GRACE: std::time::Duration = std::time::Duration::from_millis(1);
const MAX_LOG2_SLOTS: u32 = 30;

/// A key as stored in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotKey {
    pub tag: u64,
    pub hi: u64,
    pub lo: u64,
}

/// What a table should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableContent {
    pub entries: BTreeMap<SlotKey, u64>,
    /// Allowlist tables: prefix lengths to probe per family (longest first). Empty for the
    /// binding table.
    pub v4_lengths: Vec<u8>,
    pub v6_lengths: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "the kernel tables are full: {needed} more slots needed, {free} free; raise `slots` in the \
         configuration (it takes effect when the maps are next created)"
    )]
    Full { needed: u64, free: u64 },
    #[error("more than {MAX_PROBE_LENGTHS} probe lengths for one address family")]
    TooManyLengths,
    #[error(transparent)]
    Regions(#[from] RegionError),
}

/// How [`Tables::sync`] applied a change.
#[derive(Debug, PartialEq, Eq)]
pub enum Synced {
    /// The table's descriptor is unchanged.
    InPlace,
    /// A new table (or none) must be published with this descriptor; afterwards the caller
    /// passes the old descriptor to [`Tables::retire`].
    Replaced(TableDesc),
}

pub struct Tables {
    slots: MmapArray<Slot>,
    regions: Regions,
}

impl SlotReader for MmapArray<Slot> {
    fn slot(&self, index: u32) -> Option<*const Slot> {
        self.get(index).map(|p| p.cast_const())
    }
}

const META: usize = 0;
const KEY_HI: usize = 1;
const KEY_LO: usize = 2;
const VALUE: usize = 3;

impl Tables {
    /// Takes over the slot array; `in_use` are the descriptors published in the maps.
    pub fn new(slots: MmapArray<Slot>, in_use: impl IntoIterator<Item = TableDesc>) -> Result<Self, TableError> {
        let regions = in_use
            .into_iter()
            .filter(|d| d.is_present())
            .map(|d| Region { start: d.header(), len: d.region_len() });
        let regions = Regions::with_used(slots.len(), regions)?;
        Ok(Self { slots, regions })
    }

    pub fn slots(&self) -> &MmapArray<Slot> {
        &self.slots
    }

    pub fn capacity(&self) -> u32 {
        self.regions.capacity()
    }

    /// Slots not used by any table (including quarantined ones).
    pub fn free_slots(&self) -> u64 {
        self.regions.free_slots()
    }

    /// The keys a published table holds now, with their values.
    pub fn read(&self, desc: TableDesc) -> TableContent {
        let mut content = TableContent::default();
        if !desc.is_present() {
            return content;
        }
        for (key, value, _) in self.live_slots(desc) {
            content.entries.insert(key, value);
        }
        if let Some((v4, v6)) = read_lengths(&self.slots, desc) {
            content.v4_lengths = unpack(v4);
            content.v6_lengths = unpack(v6);
        }
        content
    }

    /// Makes the table named by `current` hold exactly `wanted`.
    pub fn sync(&mut self, current: TableDesc, wanted: &TableContent) -> Result<Synced, TableError> {
        let v4 = PackedLengths::pack(&wanted.v4_lengths).ok_or(TableError::TooManyLengths)?;
        let v6 = PackedLengths::pack(&wanted.v6_lengths).ok_or(TableError::TooManyLengths)?;
        if wanted.entries.is_empty() {
            return Ok(if current.is_present() { Synced::Replaced(TableDesc::NONE) } else { Synced::InPlace });
        }
        if current.is_present() && self.try_in_place(current, wanted, v4, v6) {
            return Ok(Synced::InPlace);
        }
        self.build(wanted, v4, v6).map(Synced::Replaced)
    }

    /// Rewrites the value of a key that is in the table (one atomic store); false if absent.
    pub fn set_value(&self, desc: TableDesc, key: &SlotKey, value: u64) -> bool {
        if !desc.is_present() {
            return false;
        }
        let home = home_offset(desc, hash_key(desc.seed(), key.tag, key.hi, key.lo));
        for step in 0..MAX_PROBE {
            let index = probe_index(desc, home, step);
            let meta = self.slots.load(index, META);
            match Meta::state(meta) {
                state::EMPTY => return false,
                state::LIVE
                    if Meta::tag(meta) == key.tag
                        && self.slots.load(index, KEY_HI) == key.hi
                        && self.slots.load(index, KEY_LO) == key.lo =>
                {
                    self.slots.store(index, VALUE, value);
                    return true;
                }
                _ => {}
            }
        }
        false
    }

    /// Returns a replaced table's region; it is reused after a quarantine.
    pub fn retire(&mut self, old: TableDesc) {
        if old.is_present() {
            self.regions.free(Region { start: old.header(), len: old.region_len() });
        }
    }

    fn live_slots(&self, desc: TableDesc) -> impl Iterator<Item = (SlotKey, u64, u32)> + '_ {
        let first = desc.header() + 1;
        (first..first + desc.slots()).filter_map(move |index| {
            let meta = self.slots.load(index, META);
            (Meta::state(meta) == state::LIVE).then(|| {
                let key = SlotKey {
                    tag: Meta::tag(meta),
                    hi: self.slots.load(index, KEY_HI),
                    lo: self.slots.load(index, KEY_LO),
                };
                (key, self.slots.load(index, VALUE), index)
            })
        })
    }

    /// Applies the change without moving the table, if its size and lengths allow.
    fn try_in_place(&mut self, desc: TableDesc, wanted: &TableContent, v4: PackedLengths, v6: PackedLengths) -> bool {
        let Some((old_v4, old_v6)) = read_lengths(&self.slots, desc) else {
            return false;
        };
        let (Some(union_v4), Some(union_v6)) = (union(old_v4, v4), union(old_v6, v6)) else {
            return false;
        };
        let mut present: BTreeMap<SlotKey, (u64, u32)> =
            self.live_slots(desc).map(|(key, value, index)| (key, (value, index))).collect();
        let occupied = (desc.header() + 1..desc.header() + 1 + desc.slots())
            .filter(|&i| Meta::state(self.slots.load(i, META)) != state::EMPTY)
            .count() as u64;
        let inserts = wanted.entries.keys().filter(|k| !present.contains_key(k)).count() as u64;
        let slots = desc.slots() as u64;
        let too_full = (occupied + inserts) * 100 > slots * MAX_LOAD_PERCENT;
        let too_sparse =
            desc.log2_slots() > MIN_LOG2_SLOTS && (wanted.entries.len() as u64) * 100 < slots * MIN_LOAD_PERCENT;
        if too_full || too_sparse {
            return false;
        }
        // Place every new key first; if one does not fit within MAX_PROBE, nothing has been
        // published yet and the caller rebuilds instead.
        let mut placements = Vec::new();
        let mut new_values = Vec::new();
        let mut claimed = std::collections::BTreeSet::new();
        for (key, &value) in &wanted.entries {
            match present.get(key) {
                Some(&(old, index)) if old != value => new_values.push((index, value)),
                Some(_) => {}
                None => match self.free_slot_for(desc, key, &claimed) {
                    Some(index) => {
                        claimed.insert(index);
                        placements.push((index, *key, value));
                    }
                    None => return false,
                },
            }
        }
        // From here on nothing fails. The summaries first cover the old and new keys alike,
        // so that no source covered before and after is refused while keys come and go.
        self.store_summaries(desc, present.keys().chain(wanted.entries.keys()));
        for (index, value) in new_values {
            self.slots.store(index, VALUE, value);
        }
        for (index, key, value) in placements {
            self.write_live(index, key, value);
        }
        self.store_lengths(desc, union_v4, union_v6);
        for key in wanted.entries.keys() {
            present.remove(key);
        }
        // A packet that read the old lengths just before the union was published would not
        // probe a new key at a new length; if it then met a removed key's tombstone, a
        // source covered by both would be dropped. Such a packet's program finishes within
        // microseconds, so the removals wait that long (only when both happen at once).
        let lengths_grew = union_v4 != old_v4 || union_v6 != old_v6;
        if lengths_grew && !present.is_empty() {
            std::thread::sleep(READER_GRACE);
        }
        for (_, (_, index)) in present {
            let meta = self.slots.load(index, META);
            self.slots.store(index, META, Meta::dead(Meta::version(meta) + 1));
        }
        self.store_lengths(desc, v4, v6);
        self.store_summaries(desc, wanted.entries.keys());
        true
    }

    /// Publishes the header summaries (see [`Summary`]) of allowlist keys; one store each.
    fn store_summaries<'k>(&self, desc: TableDesc, keys: impl Iterator<Item = &'k SlotKey> + Clone) {
        let family = |want: u64| {
            keys.clone().filter_map(move |key| match Tag::allow_parts(key.tag) {
                Some((family, len)) if family == want => Some((len, top_bits(family == FAMILY_V4, key.hi, key.lo))),
                _ => None,
            })
        };
        let v4 = Summary::of(desc.seed(), family(FAMILY_V4));
        let v6 = Summary::of(desc.seed(), family(ipaccess_common::FAMILY_V6));
        self.slots.store(desc.header(), META, v4.0);
        self.slots.store(desc.header(), VALUE, v6.0);
    }

    /// The first reusable slot on `key`'s probe path (checking the key is not further on).
    fn free_slot_for(
        &self,
        desc: TableDesc,
        key: &SlotKey,
        claimed: &std::collections::BTreeSet<u32>,
    ) -> Option<u32> {
        let home = home_offset(desc, hash_key(desc.seed(), key.tag, key.hi, key.lo));
        (0..MAX_PROBE).map(|step| probe_index(desc, home, step)).find(|&index| {
            let meta = self.slots.load(index, META);
            Meta::state(meta) != state::LIVE && !claimed.contains(&index)
        })
    }

    fn write_live(&self, index: u32, key: SlotKey, value: u64) {
        let version = Meta::version(self.slots.load(index, META)) + 1;
        self.slots.store(index, KEY_HI, key.hi);
        self.slots.store(index, KEY_LO, key.lo);
        self.slots.store(index, VALUE, value);
        self.slots.store(index, META, Meta::live(key.tag, version));
    }

    fn store_lengths(&self, desc: TableDesc, v4: PackedLengths, v6: PackedLengths) {
        self.slots.store(desc.header(), KEY_HI, v4.0);
        self.slots.store(desc.header(), KEY_LO, v6.0);
    }

    /// Builds a complete table in a new region; the region is not visible to the kernel until
    /// its descriptor is published.
    fn build(&mut self, wanted: &TableContent, v4: PackedLengths, v6: PackedLengths) -> Result<TableDesc, TableError> {
        let entries = wanted.entries.len() as u64;
        let mut log2 = MIN_LOG2_SLOTS;
        while (1u64 << log2) * MAX_LOAD_PERCENT < entries * 100 {
            log2 += 1;
        }
        while log2 <= MAX_LOG2_SLOTS {
            let desc = self.allocate(log2)?;
            if self.fill(desc, wanted) {
                self.store_summaries(desc, wanted.entries.keys());
                self.store_lengths(desc, v4, v6);
                return Ok(desc);
            }
            // Some key could not be placed within MAX_PROBE: never published, so the region
            // can be reused at once; try a bigger table with a new seed.
            self.regions.free_unpublished(Region { start: desc.header(), len: desc.region_len() });
            log2 += 1;
        }
        Err(TableError::Full { needed: 1 << MAX_LOG2_SLOTS, free: self.free_slots() })
    }

    fn allocate(&mut self, log2: u32) -> Result<TableDesc, TableError> {
        let len = (1u32 << log2) + 1;
        loop {
            if let Some(region) = self.regions.allocate(len) {
                return Ok(TableDesc::new(region.start, log2));
            }
            // Regions freed moments ago come back after their quarantine.
            match self.regions.next_release() {
                Some(at) if self.regions.free_slots() >= len as u64 => {
                    thread::sleep(at.saturating_duration_since(Instant::now()));
                }
                _ => return Err(TableError::Full { needed: len as u64, free: self.regions.free_slots() }),
            }
        }
    }

    fn fill(&self, desc: TableDesc, wanted: &TableContent) -> bool {
        let first = desc.header() + 1;
        for index in first..first + desc.slots() {
            for word in [META, KEY_HI, KEY_LO, VALUE] {
                self.slots.store(index, word, 0);
            }
        }
        for (key, &value) in &wanted.entries {
            let home = home_offset(desc, hash_key(desc.seed(), key.tag, key.hi, key.lo));
            let free = (0..MAX_PROBE)
                .map(|step| probe_index(desc, home, step))
                .find(|&index| Meta::state(self.slots.load(index, META)) == state::EMPTY);
            match free {
                Some(index) => self.write_live(index, *key, value),
                None => return false,
            }
        }
        true
    }
}

fn unpack(lengths: PackedLengths) -> Vec<u8> {
    (0..MAX_PROBE_LENGTHS).map(|i| lengths.get(i)).take_while(|&l| l != ipaccess_common::NO_LENGTH).collect()
}

/// Lengths in either list, if they still fit in one word (longest first).
fn union(a: PackedLengths, b: PackedLengths) -> Option<PackedLengths> {
    let mut all = unpack(a);
    all.extend(unpack(b));
    all.sort_unstable_by(|x, y| y.cmp(x));
    all.dedup();
    PackedLengths::pack(&all)
}

#[cfg(test)]
mod tests {
    use ipaccess_common::{Summary, top_bits, v4_key, v6_key};

    /// xorshift64*: deterministic test data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Random allowlists of each family: every address a key covers passes the summary, and
    /// most addresses no key covers are refused by it.
    #[test]
    fn summary_never_refuses_a_covered_source() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let (mut uncovered, mut refused) = (0u64, 0u64);
        for round in 0..2000 {
            let v4 = round % 2 == 0;
            let seed = rng.next() | 1 << 63;
            let count = 1 + rng.next() % 6;
            // (len, hi, lo) of each key, cut the way the daemon stores them.
            let keys: Vec<(u8, u64, u64)> = (0..count)
                .map(|_| {
                    if v4 {
                        let len = [8, 16, 22, 24, 28, 32][rng.next() as usize % 6];
                        let (hi, lo) = v4_key(rng.next() as u32, len);
                        (len, hi, lo)
                    } else {
                        let len = [32, 48, 56, 64, 96, 128][rng.next() as usize % 6];
                        let (hi, lo) = v6_key(rng.next(), rng.next(), len);
                        (len, hi, lo)
                    }
                })
                .collect();
            let summary = Summary::of(seed, keys.iter().map(|&(len, hi, lo)| (len, top_bits(v4, hi, lo))));
            for &(len, hi, lo) in &keys {
                // An address inside the key: its own words with random host bits.
                let (src_hi, src_lo) = if v4 {
                    let host = if len == 32 { 0 } else { rng.next() as u32 >> len };
                    (0, (lo as u32 | host) as u64)
                } else if len <= 64 {
                    (hi | if len == 64 { 0 } else { rng.next() >> len }, rng.next())
                } else {
                    (hi, lo | if len == 128 { 0 } else { rng.next() >> (len - 64) })
                };
                assert!(summary.may_cover(seed, top_bits(v4, src_hi, src_lo)), "{keys:?} {summary:?}");
            }
            for _ in 0..20 {
                let (src_hi, src_lo) = if v4 { (0, rng.next() >> 32) } else { (rng.next(), rng.next()) };
                let covered = keys.iter().any(|&(len, hi, lo)| {
                    if v4 { v4_key(src_lo as u32, len) == (hi, lo) } else { v6_key(src_hi, src_lo, len) == (hi, lo) }
                });
                if !covered {
                    uncovered += 1;
                    refused += !summary.may_cover(seed, top_bits(v4, src_hi, src_lo)) as u64;
                }
            }
        }
        assert!(refused * 100 > uncovered * 95, "only {refused} of {uncovered} uncovered sources refused");
    }

    #[test]
    fn summary_without_keys_refuses_and_zero_says_nothing() {
        assert!(!Summary::of(7, std::iter::empty()).may_cover(7, 42));
        assert!(Summary::UNKNOWN.may_cover(7, 42));
        // A /0 covers everything.
        assert!(Summary::of(7, [(0u8, 0u64)].into_iter()).may_cover(7, 42));
    }
}
