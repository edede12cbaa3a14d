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
    collections::{BTreeMap, BTreeSet, HashMap},
    thread,
    time::Instant,
};

use ipaccess_common::{
    AddrWords, FAMILY_V4, FAMILY_V6, MAX_PROBE, MAX_PROBE_LENGTHS, Meta, NO_LENGTH, PackedLengths, Slot, SlotReader,
    SlotState, Summary, TableDesc, Tag, hash_key, home_offset, probe_index, read_lengths,
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
    pub tag: Tag,
    pub hi: u64,
    pub lo: u64,
}

impl SlotKey {
    /// The address the key words hold, in the tag's family.
    pub fn addr(&self) -> std::net::IpAddr {
        self.words().to_ip(self.tag.family())
    }

    fn words(&self) -> AddrWords {
        AddrWords { hi: self.hi, lo: self.lo }
    }

    /// Allowlist keys of `family`: the prefix length and the top bits a [`Summary`] takes.
    fn summary_key(&self, family: u64) -> Option<(u8, u64)> {
        let len = self.tag.prefix_len().filter(|_| self.tag.family() == family)?;
        Some((len, self.words().top(family == FAMILY_V4)))
    }
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

/// The slots of one table in use: live keys, and live keys and tombstones together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Load {
    live: u64,
    used: u64,
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
    /// Per table (by its header's slot), how many of its slots are in use, for
    /// [`Self::change_keys`]; a table missing here is counted once when next needed.
    loads: HashMap<u32, Load>,
    /// New tables are built as small as their keys allow rather than half full: while a
    /// policy that needs more than half the slots is loaded into empty maps (see
    /// [`Self::load_densely`]).
    dense: bool,
    /// Unit tests: every step the writer publishes, in order (see [`Step`]).
    #[cfg(test)]
    trace: std::sync::Mutex<Vec<Step>>,
}

/// What the writer just published, as the instrumented writer of the unit tests records it
/// (outside tests nothing is recorded and these values are never built).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
enum Step {
    /// The header's summaries (IPv4, IPv6).
    Summaries(Summary, Summary),
    /// A key made live at this slot.
    Live(u32),
    /// A live key's value rewritten at this slot.
    Value(u32),
    /// The header's probe lengths (IPv4, IPv6).
    Lengths(PackedLengths, PackedLengths),
    /// The in-place change waited [`READER_GRACE`] for readers holding older lengths.
    Grace,
    /// A removed key's slot became a tombstone.
    Tombstone(u32),
}

// SAFETY: `get` returns a pointer into the mapping only for indices below `len`; the mapping
// covers `len` whole slots (page-aligned, so 8-byte aligned) and lives as long as `self`; the
// only writer stores whole aligned words through `MmapArray::store`.
unsafe impl SlotReader for MmapArray<Slot> {
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
        let regions =
            in_use.into_iter().filter(|d| d.is_present()).map(|d| Region { start: d.header(), len: d.region_len() });
        let regions = Regions::with_used(slots.len(), regions)?;
        Ok(Self {
            slots,
            regions,
            loads: HashMap::new(),
            dense: false,
            #[cfg(test)]
            trace: Default::default(),
        })
    }

    pub fn slots(&self) -> &MmapArray<Slot> {
        &self.slots
    }

    pub fn capacity(&self) -> u32 {
        self.regions.capacity()
    }

    /// Before a whole policy is loaded: when the tables are empty (fresh maps, after a reboot
    /// or with a new layout) and `keys` keys in `tables` tables might not fit at half load
    /// (each table rounds up to a power of two: up to four slots a key), new tables are built
    /// as small as their keys allow until [`Self::end_dense_load`]. Changes made in place
    /// under pressure pack tables that full ([`Self::sync`]), and what the kernel enforced
    /// must load again, or the start would be refused and nothing enforced. Returns whether
    /// it loads densely.
    pub fn load_densely(&mut self, keys: u64, tables: u64) -> bool {
        let empty = self.free_slots() == u64::from(self.capacity());
        self.dense = empty && 4 * (keys + tables) > u64::from(self.capacity());
        self.dense
    }

    pub fn end_dense_load(&mut self) {
        self.dense = false;
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

    /// The probe lengths of one family (IPv4 if `v4`) in a published table's header, in the
    /// order the kernel probes them.
    pub fn read_lengths(&self, desc: TableDesc, v4: bool) -> Vec<u8> {
        if !desc.is_present() {
            return Vec::new();
        }
        read_lengths(&self.slots, desc).map_or_else(Vec::new, |(l4, l6)| unpack(if v4 { l4 } else { l6 }))
    }

    /// Makes the table named by `current` hold exactly `wanted`.
    pub fn sync(&mut self, current: TableDesc, wanted: &TableContent) -> Result<Synced, TableError> {
        let v4 = PackedLengths::pack(&wanted.v4_lengths).ok_or(TableError::TooManyLengths)?;
        let v6 = PackedLengths::pack(&wanted.v6_lengths).ok_or(TableError::TooManyLengths)?;
        if wanted.entries.is_empty() {
            return Ok(if current.is_present() { Synced::Replaced(TableDesc::NONE) } else { Synced::InPlace });
        }
        if current.is_present() && self.try_in_place(current, wanted, v4, v6, false) {
            return Ok(Synced::InPlace);
        }
        let built = self.build(wanted, v4, v6);
        // No room for the new table (a smaller one, after removals): the change is made in
        // the table there is, sparse or full of tombstones as it leaves it, if it can be. A
        // removal must not wait for room, or the kernel keeps letting the removed network in.
        if matches!(built, Err(TableError::Full { .. }))
            && current.is_present()
            && self.try_in_place(current, wanted, v4, v6, true)
        {
            return Ok(Synced::InPlace);
        }
        self.or_denser(built, wanted, v4, v6).map(Synced::Replaced)
    }

    /// Builds `wanted` as a new table, never changing one in place: the caller publishes the
    /// whole change with one store of the descriptor (NONE when `wanted` is empty), then
    /// retires the old table.
    pub fn rebuild(&mut self, wanted: &TableContent) -> Result<TableDesc, TableError> {
        let v4 = PackedLengths::pack(&wanted.v4_lengths).ok_or(TableError::TooManyLengths)?;
        let v6 = PackedLengths::pack(&wanted.v6_lengths).ok_or(TableError::TooManyLengths)?;
        if wanted.entries.is_empty() {
            return Ok(TableDesc::NONE);
        }
        let built = self.build(wanted, v4, v6);
        self.or_denser(built, wanted, v4, v6)
    }

    /// Rewrites the value of a key that is in the table (one atomic store); false if absent.
    pub fn set_value(&self, desc: TableDesc, key: &SlotKey, value: u64) -> bool {
        let Some(index) = self.find(desc, key) else { return false };
        self.slots.store(index, VALUE, value);
        true
    }

    /// Changes some keys of a table without prefix lengths (the binding table) where it
    /// is: each key of `written` gets its value, inserted if absent, and each of `removed`
    /// is tombstoned. Nothing else is read or written, so the cost is the change's, not the
    /// table's. New keys go in first, then values are rewritten, then keys removed; with
    /// `settle`, the new keys are also given [`READER_GRACE`] to be seen by every packet
    /// before anything else changes (when a new key takes over packets from one rewritten
    /// or removed here, which a packet may read after it). False, with nothing published,
    /// when the table cannot take the change where it is (it would be too full or too
    /// sparse, or a new key finds no free slot on its probe path): the caller then makes
    /// the change with [`Self::sync`].
    pub fn change_keys(
        &mut self,
        desc: TableDesc,
        written: &[(SlotKey, u64)],
        removed: &[SlotKey],
        settle: bool,
    ) -> bool {
        if !desc.is_present() {
            return false;
        }
        debug_assert!(
            read_lengths(&self.slots, desc).is_some_and(|(v4, v6)| unpack(v4).is_empty() && unpack(v6).is_empty()),
            "only a table without prefix lengths is changed key by key"
        );
        let mut rewrites = Vec::new();
        let mut placements = Vec::new();
        let mut claimed = BTreeSet::new();
        for (key, value) in written {
            if let Some(index) = self.find(desc, key) {
                rewrites.push((index, *value));
                continue;
            }
            let Some(index) = self.free_slot_for(desc, key, &claimed) else { return false };
            claimed.insert(index);
            placements.push((index, *key, *value));
        }
        let tombstones: Vec<u32> = removed.iter().filter_map(|key| self.find(desc, key)).collect();
        let load = self.load(desc);
        let fresh = placements.iter().filter(|(index, ..)| self.meta(*index).is_empty()).count() as u64;
        let after =
            Load { live: load.live + placements.len() as u64 - tombstones.len() as u64, used: load.used + fresh };
        let slots = desc.slots() as u64;
        let too_full = after.used * 100 > slots * MAX_LOAD_PERCENT;
        let too_sparse = desc.log2_slots() > MIN_LOG2_SLOTS && after.live * 100 < slots * MIN_LOAD_PERCENT;
        if too_full || too_sparse || after.live == 0 {
            return false;
        }
        let new_keys = !placements.is_empty();
        for (index, key, value) in placements {
            self.write_live(index, key, value);
        }
        if settle && new_keys && (!rewrites.is_empty() || !tombstones.is_empty()) {
            self.wait_for_readers();
        }
        for (index, value) in rewrites {
            self.rewrite(index, value);
        }
        for index in tombstones {
            self.tombstone(index);
        }
        self.loads.insert(desc.header(), after);
        true
    }

    /// The slot holding `key` live, if any.
    fn find(&self, desc: TableDesc, key: &SlotKey) -> Option<u32> {
        if !desc.is_present() {
            return None;
        }
        let home = home_offset(desc, hash_key(desc.seed(), key.tag, key.hi, key.lo));
        for step in 0..MAX_PROBE {
            let index = probe_index(desc, home, step);
            let meta = self.meta(index);
            match meta.state() {
                SlotState::Empty => return None,
                SlotState::Live
                    if meta.tag() == key.tag
                        && self.slots.load(index, KEY_HI) == key.hi
                        && self.slots.load(index, KEY_LO) == key.lo =>
                {
                    return Some(index);
                }
                _ => {}
            }
        }
        None
    }

    /// How many of a table's slots are in use: remembered, or counted once.
    fn load(&mut self, desc: TableDesc) -> Load {
        let first = desc.header() + 1;
        *self.loads.entry(desc.header()).or_insert_with(|| {
            let metas = (first..first + desc.slots()).map(|index| Meta::from_bits(self.slots.load(index, META)));
            metas.fold(Load { live: 0, used: 0 }, |load, meta| Load {
                live: load.live + u64::from(meta.is_live()),
                used: load.used + u64::from(!meta.is_empty()),
            })
        })
    }

    /// Returns a replaced table's region; it is reused after a quarantine.
    pub fn retire(&mut self, old: TableDesc) {
        if old.is_present() {
            self.loads.remove(&old.header());
            self.regions.free(Region { start: old.header(), len: old.region_len() });
        }
    }

    /// Makes a published allowlist table probe `first` first in one family (IPv4 if `v4`), the
    /// other lengths keeping their order: one aligned store of that family's lengths word.
    /// The same lengths in another order, so a packet that read either word probes the same
    /// keys: nothing about the in-place protocol changes (and [`Self::sync`], which reads the
    /// lengths it starts from, never runs at the same time: one writer). False, and nothing
    /// stored, when `first` is not among the lengths or is first already.
    pub fn reorder(&self, desc: TableDesc, v4: bool, first: u8) -> bool {
        if !desc.is_present() {
            return false;
        }
        let Some((old_v4, old_v6)) = read_lengths(&self.slots, desc) else { return false };
        let mut lengths = unpack(if v4 { old_v4 } else { old_v6 });
        if lengths.first() == Some(&first) || !lengths.contains(&first) {
            return false;
        }
        put_first(&mut lengths, first);
        let word = PackedLengths::pack(&lengths).expect("a permutation fits where the lengths did");
        self.slots.store(desc.header(), if v4 { KEY_HI } else { KEY_LO }, word.0);
        self.note(|| if v4 { Step::Lengths(word, old_v6) } else { Step::Lengths(old_v4, word) });
        true
    }

    /// The allowlist key live in slot `index` right now: its owner (an account slot, or a
    /// shared set with [`ipaccess_common::Tag::SET_OWNER`]) and network.
    /// (Last-used stamps are kept per slot index; this names what a stamp belongs to.)
    pub fn allow_key_at(&self, index: u32) -> Option<(u32, ipnet::IpNet)> {
        if index >= self.slots.len() {
            return None;
        }
        let meta = self.meta(index);
        let tag = meta.tag();
        let (owner, len) = (tag.owner()?, tag.prefix_len()?);
        if !meta.is_live() {
            return None;
        }
        let key = SlotKey { tag, hi: self.slots.load(index, KEY_HI), lo: self.slots.load(index, KEY_LO) };
        let net = ipnet::IpNet::new(key.addr(), len).ok()?;
        // The seqlock's second read: a slot rewritten meanwhile names nothing.
        (self.meta(index) == meta).then_some((owner, net))
    }

    fn meta(&self, index: u32) -> Meta {
        Meta::from_bits(self.slots.load(index, META))
    }

    fn live_slots(&self, desc: TableDesc) -> impl Iterator<Item = (SlotKey, u64, u32)> + '_ {
        let first = desc.header() + 1;
        (first..first + desc.slots()).filter_map(move |index| {
            let meta = self.meta(index);
            meta.is_live().then(|| {
                let key =
                    SlotKey { tag: meta.tag(), hi: self.slots.load(index, KEY_HI), lo: self.slots.load(index, KEY_LO) };
                (key, self.slots.load(index, VALUE), index)
            })
        })
    }

    /// Applies the change without moving the table, if its size and lengths allow.
    /// `any_load`: make the change even where the table would be too full or too sparse for
    /// its size (when no other table can be had); a key that finds no free slot still fails it.
    fn try_in_place(
        &mut self,
        desc: TableDesc,
        wanted: &TableContent,
        v4: PackedLengths,
        v6: PackedLengths,
        any_load: bool,
    ) -> bool {
        let Some((old_v4, old_v6)) = read_lengths(&self.slots, desc) else {
            return false;
        };
        // Counted again when next needed, whatever this does.
        self.loads.remove(&desc.header());
        let (Some(union_v4), Some(union_v6)) = (union(old_v4, v4), union(old_v6, v6)) else {
            return false;
        };
        let mut present: BTreeMap<SlotKey, (u64, u32)> =
            self.live_slots(desc).map(|(key, value, index)| (key, (value, index))).collect();
        let occupied =
            (desc.header() + 1..desc.header() + 1 + desc.slots()).filter(|&i| !self.meta(i).is_empty()).count() as u64;
        let inserts = wanted.entries.keys().filter(|k| !present.contains_key(k)).count() as u64;
        let slots = desc.slots() as u64;
        let too_full = (occupied + inserts) * 100 > slots * MAX_LOAD_PERCENT;
        let too_sparse =
            desc.log2_slots() > MIN_LOG2_SLOTS && (wanted.entries.len() as u64) * 100 < slots * MIN_LOAD_PERCENT;
        if (too_full || too_sparse) && !any_load {
            return false;
        }
        // Place every new key first; if one does not fit within MAX_PROBE, nothing has been
        // published yet and the caller rebuilds instead.
        let mut placements = Vec::new();
        let mut new_values = Vec::new();
        let mut claimed = BTreeSet::new();
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
        for key in wanted.entries.keys() {
            present.remove(key);
        }
        // From here on nothing fails. The summaries first cover the old and new keys alike,
        // so that no source covered before and after is refused while keys come and go.
        self.store_summaries(desc, present.keys().chain(wanted.entries.keys()));
        let new_keys = !placements.is_empty();
        for (index, key, value) in placements {
            self.write_live(index, key, value);
        }
        // In the binding table (no prefix lengths) the key a packet finds first can be a new
        // one taking over from one rewritten or removed here (a port key from its address
        // record): every packet must see the new keys before the old ones change.
        let binding_table = [old_v4, old_v6, v4, v6].iter().all(|l| unpack(*l).is_empty());
        let settled = binding_table && new_keys && (!new_values.is_empty() || !present.is_empty());
        if settled {
            self.wait_for_readers();
        }
        for (index, value) in new_values {
            self.rewrite(index, value);
        }
        self.store_lengths(desc, union_v4, union_v6);
        // A packet may have missed a new key just before it went live (or read the old
        // lengths, without a new key's length, just before the union was published); if it
        // then met a removed key's tombstone, a source covered by the old and the new keys
        // alike would be dropped. Such a packet's program finishes within microseconds, so
        // removals made together with insertions wait that long first. (The binding table
        // has waited above already.)
        let lengths_grew = grew(old_v4, union_v4) || grew(old_v6, union_v6);
        if (new_keys || lengths_grew) && !settled && !present.is_empty() {
            self.wait_for_readers();
        }
        for (_, (_, index)) in present {
            self.tombstone(index);
        }
        self.store_lengths(desc, v4, v6);
        self.store_summaries(desc, wanted.entries.keys());
        true
    }

    /// Lets every run of the program that may hold what was read before the last store
    /// (lengths, or the absence of a key just placed) finish.
    fn wait_for_readers(&self) {
        std::thread::sleep(READER_GRACE);
        self.note(|| Step::Grace);
    }

    fn rewrite(&self, index: u32, value: u64) {
        self.slots.store(index, VALUE, value);
        self.note(|| Step::Value(index));
    }

    fn tombstone(&self, index: u32) {
        let meta = self.meta(index);
        self.slots.store(index, META, Meta::dead(meta.version() + 1).to_bits());
        self.note(|| Step::Tombstone(index));
    }

    /// Records a published step (unit tests only; nothing at all otherwise).
    #[cfg(test)]
    fn note(&self, step: impl FnOnce() -> Step) {
        self.trace.lock().unwrap().push(step());
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn note(&self, _step: impl FnOnce() -> Step) {}

    /// Publishes the header summaries (see [`Summary`]) of allowlist keys; one store each.
    fn store_summaries<'k>(&self, desc: TableDesc, keys: impl Iterator<Item = &'k SlotKey> + Clone) {
        let family = |want: u64| keys.clone().filter_map(move |key| key.summary_key(want));
        let v4 = Summary::of(desc.seed(), family(FAMILY_V4));
        let v6 = Summary::of(desc.seed(), family(FAMILY_V6));
        self.slots.store(desc.header(), META, v4.0);
        self.slots.store(desc.header(), VALUE, v6.0);
        self.note(|| Step::Summaries(v4, v6));
    }

    /// The first reusable slot on `key`'s probe path (checking the key is not further on).
    fn free_slot_for(&self, desc: TableDesc, key: &SlotKey, claimed: &BTreeSet<u32>) -> Option<u32> {
        let home = home_offset(desc, hash_key(desc.seed(), key.tag, key.hi, key.lo));
        (0..MAX_PROBE)
            .map(|step| probe_index(desc, home, step))
            .find(|&index| !self.meta(index).is_live() && !claimed.contains(&index))
    }

    fn write_live(&self, index: u32, key: SlotKey, value: u64) {
        let version = self.meta(index).version() + 1;
        self.slots.store(index, KEY_HI, key.hi);
        self.slots.store(index, KEY_LO, key.lo);
        self.slots.store(index, VALUE, value);
        self.slots.store(index, META, Meta::live(key.tag, version).to_bits());
        self.note(|| Step::Live(index));
    }

    fn store_lengths(&self, desc: TableDesc, v4: PackedLengths, v6: PackedLengths) {
        self.slots.store(desc.header(), KEY_HI, v4.0);
        self.slots.store(desc.header(), KEY_LO, v6.0);
        self.note(|| Step::Lengths(v4, v6));
    }

    /// Builds a complete table in a new region; the region is not visible to the kernel until
    /// its descriptor is published.
    fn build(&mut self, wanted: &TableContent, v4: PackedLengths, v6: PackedLengths) -> Result<TableDesc, TableError> {
        let load = if self.dense { 100 } else { MAX_LOAD_PERCENT };
        let mut log2 = smallest_log2(wanted.entries.len() as u64, load);
        while log2 <= MAX_LOG2_SLOTS {
            let desc = self.allocate(log2)?;
            if let Some(desc) = self.place(desc, wanted, v4, v6) {
                return Ok(desc);
            }
            log2 += 1;
        }
        Err(TableError::Full { needed: 1 << MAX_LOG2_SLOTS, free: self.free_slots() })
    }

    /// `built`, or when it found no free region (and the change cannot be made in place):
    /// the keys in a smaller table, fuller than half (at most one key a slot), the largest
    /// free now that takes every key within the probe bound. An in-place change under the
    /// same pressure leaves a table that full ([`Self::sync`]). Quarantined regions are not
    /// waited for here: the change is refused as full instead.
    fn or_denser(
        &mut self,
        built: Result<TableDesc, TableError>,
        wanted: &TableContent,
        v4: PackedLengths,
        v6: PackedLengths,
    ) -> Result<TableDesc, TableError> {
        let full = match built {
            Err(full @ TableError::Full { .. }) => full,
            other => return other,
        };
        let entries = wanted.entries.len() as u64;
        let (usual, densest) = (smallest_log2(entries, MAX_LOAD_PERCENT), smallest_log2(entries, 100));
        for log2 in (densest..usual).rev() {
            let Some(region) = self.regions.allocate((1u32 << log2) + 1) else { continue };
            if let Some(desc) = self.place(TableDesc::new(region.start, log2), wanted, v4, v6) {
                return Ok(desc);
            }
        }
        Err(full)
    }

    /// Fills the unpublished region `desc` with `wanted`, or frees it (never published, so
    /// at once) when some key finds no slot within [`MAX_PROBE`].
    fn place(
        &mut self,
        desc: TableDesc,
        wanted: &TableContent,
        v4: PackedLengths,
        v6: PackedLengths,
    ) -> Option<TableDesc> {
        if !self.fill(desc, wanted) {
            self.regions.free_unpublished(Region { start: desc.header(), len: desc.region_len() });
            return None;
        }
        self.store_summaries(desc, wanted.entries.keys());
        self.store_lengths(desc, v4, v6);
        let keys = wanted.entries.len() as u64;
        self.loads.insert(desc.header(), Load { live: keys, used: keys });
        Some(desc)
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
            let free =
                (0..MAX_PROBE).map(|step| probe_index(desc, home, step)).find(|&index| self.meta(index).is_empty());
            match free {
                Some(index) => self.write_live(index, *key, value),
                None => return false,
            }
        }
        true
    }
}

/// The smallest table (as log2 of its slots, at least [`MIN_LOG2_SLOTS`]) that holds
/// `entries` keys at most `load_percent` full.
fn smallest_log2(entries: u64, load_percent: u64) -> u32 {
    let mut log2 = MIN_LOG2_SLOTS;
    while (1u64 << log2) * load_percent < entries * 100 {
        log2 += 1;
    }
    log2
}

fn unpack(lengths: PackedLengths) -> Vec<u8> {
    (0..MAX_PROBE_LENGTHS).map(|i| lengths.get(i)).take_while(|&l| l != ipaccess_common::NO_LENGTH).collect()
}

/// Lengths in either list, if they still fit in one word: `wanted`'s in its order (so a
/// length put first stays first while a change is under way), then the old ones it lacks.
fn union(old: PackedLengths, wanted: PackedLengths) -> Option<PackedLengths> {
    let mut all = unpack(wanted);
    for len in unpack(old) {
        if !all.contains(&len) {
            all.push(len);
        }
    }
    PackedLengths::pack(&all)
}

/// Does `now` hold a length `before` did not?
fn grew(before: PackedLengths, now: PackedLengths) -> bool {
    let before = unpack(before);
    unpack(now).iter().any(|len| !before.contains(len))
}

/// The length each account's table probes first per family, where it is not the writer's
/// default (the most specific): what [`Tables::reorder`] was asked for, applied to every
/// later [`TableContent`] of that account before [`Tables::sync`], so that an in-place
/// change (its union of lengths included) or a rebuild keeps it first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FirstLengths(BTreeMap<u32, [u8; 2]>);

impl FirstLengths {
    /// Account `slot` wants `first` probed first in `family`.
    pub fn set(&mut self, slot: u32, family: u64, first: u8) {
        let firsts = self.0.entry(slot).or_insert([NO_LENGTH; 2]);
        firsts[usize::from(family != FAMILY_V4)] = first;
    }

    pub fn get(&self, slot: u32, family: u64) -> Option<u8> {
        let first = self.0.get(&slot)?[usize::from(family != FAMILY_V4)];
        (first != NO_LENGTH).then_some(first)
    }

    pub fn forget(&mut self, slot: u32) {
        self.0.remove(&slot);
    }

    /// Puts the account's preferred lengths first in `content` (those it holds).
    pub fn apply(&self, slot: u32, content: &mut TableContent) {
        if let Some(&[v4, v6]) = self.0.get(&slot) {
            put_first(&mut content.v4_lengths, v4);
            put_first(&mut content.v6_lengths, v6);
        }
    }

    /// The preferences a published table's header shows (a first length that is not the
    /// family's longest), as a previous writer left them: how they survive a restart.
    pub fn found(&mut self, tables: &Tables, slot: u32, desc: TableDesc) {
        for family in [FAMILY_V4, FAMILY_V6] {
            let lengths = tables.read_lengths(desc, family == FAMILY_V4);
            if let (Some(&first), Some(&max)) = (lengths.first(), lengths.iter().max())
                && first != max
            {
                self.set(slot, family, first);
            }
        }
    }
}

/// `lengths` with `first` moved to the front, the others in their order (unchanged if
/// `first` is not among them).
pub fn put_first(lengths: &mut Vec<u8>, first: u8) {
    if let Some(at) = lengths.iter().position(|&l| l == first) {
        let len = lengths.remove(at);
        lengths.insert(0, len);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeSet,
        time::{Duration, SystemTime},
    };

    use ipaccess_common::{NEVER_EXPIRES, Summary, lookup, read_summary, top_bits, v4_key, v6_key};

    use super::*;

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

    // The writer over anonymous memory: the code the daemon runs, no root, no BPF map.

    fn tables(slots: u32) -> Tables {
        Tables::new(MmapArray::anonymous(slots).unwrap(), []).unwrap()
    }

    fn v4(owner: u32, addr: [u8; 4], len: u8) -> SlotKey {
        let (hi, lo) = v4_key(u32::from_be_bytes(addr), len);
        SlotKey { tag: Tag::allow(owner, FAMILY_V4, len), hi, lo }
    }

    fn v6(owner: u32, hi: u64, lo: u64, len: u8) -> SlotKey {
        let (hi, lo) = v6_key(hi, lo, len);
        SlotKey { tag: Tag::allow(owner, FAMILY_V6, len), hi, lo }
    }

    /// What the daemon asks for: the keys, and each family's distinct lengths, longest first.
    fn content(entries: &BTreeMap<SlotKey, u64>) -> TableContent {
        let lengths = |want: u64| {
            let set: BTreeSet<u8> =
                entries.keys().filter(|k| k.tag.family() == want).filter_map(|k| k.tag.prefix_len()).collect();
            set.into_iter().rev().collect::<Vec<u8>>()
        };
        TableContent { entries: entries.clone(), v4_lengths: lengths(FAMILY_V4), v6_lengths: lengths(FAMILY_V6) }
    }

    fn wanted(keys: &[(SlotKey, u64)]) -> TableContent {
        content(&keys.iter().copied().collect())
    }

    /// The reader's answer: the code the XDP program runs, over the writer's memory.
    fn found(t: &Tables, desc: TableDesc, key: &SlotKey) -> Option<u64> {
        lookup(t.slots(), desc, key.tag, key.hi, key.lo)
    }

    /// Syncs and publishes as the datapath does; true if the change was made in place.
    fn apply(t: &mut Tables, desc: &mut TableDesc, wanted: &TableContent) -> bool {
        match t.sync(*desc, wanted).unwrap() {
            Synced::InPlace => true,
            Synced::Replaced(new) => {
                t.retire(*desc);
                *desc = new;
                false
            }
        }
    }

    fn take_trace(t: &Tables) -> Vec<Step> {
        std::mem::take(&mut *t.trace.lock().unwrap())
    }

    fn slot_of(t: &Tables, desc: TableDesc, key: &SlotKey) -> u32 {
        t.live_slots(desc).find(|(k, _, _)| k == key).map(|(_, _, index)| index).expect("key is live")
    }

    const A: u64 = 1_000;
    const B: u64 = 2_000;

    #[test]
    fn in_place_change_touches_only_what_changed() {
        let mut t = tables(1 << 10);
        let host = |last: u8| v4(1, [198, 18, 0, last], 32);
        let (a, b, c, d) = (host(1), host(2), host(3), host(4));
        let mut desc = TableDesc::NONE;
        assert!(!apply(&mut t, &mut desc, &wanted(&[(a, A), (b, A), (c, A)])), "a first table is built");
        let (slot_a, slot_c) = (slot_of(&t, desc, &a), slot_of(&t, desc, &c));
        let meta_a = t.slots().load(slot_a, META);
        let meta_c = t.slots().load(slot_c, META);
        let before = desc;
        take_trace(&t);

        let next = wanted(&[(a, A), (b, B), (d, A)]);
        assert!(apply(&mut t, &mut desc, &next), "room and lengths allow an in-place change");
        assert_eq!(desc, before);
        assert_eq!(t.slots().load(slot_a, META), meta_a, "a key kept with its value is never rewritten");
        assert_eq!(found(&t, desc, &b), Some(B), "a changed value is stored in place");
        assert_eq!(found(&t, desc, &c), None);
        assert_eq!(found(&t, desc, &d), Some(A));
        let (tomb, meta_c) = (Meta::from_bits(t.slots().load(slot_c, META)), Meta::from_bits(meta_c));
        assert_eq!((tomb.state(), tomb.version()), (SlotState::Dead, meta_c.version() + 1), "a tombstone");
        assert_eq!(t.read(desc), next);
        let trace = take_trace(&t);
        let at = |want: &dyn Fn(&Step) -> bool| trace.iter().position(want).unwrap_or_else(|| panic!("{trace:?}"));
        let (inserted, grace) = (at(&|s| *s == Step::Live(slot_of(&t, desc, &d))), at(&|s| *s == Step::Grace));
        assert!(inserted < grace && grace < at(&|s| *s == Step::Tombstone(slot_c)), "{trace:?}");
        assert_eq!(read_summary(t.slots(), desc, true), Some(Summary::of(desc.seed(), summary_keys(&next, FAMILY_V4))));
    }

    fn summary_keys(content: &TableContent, want: u64) -> impl Iterator<Item = (u8, u64)> + Clone + '_ {
        content.entries.keys().filter_map(move |k| k.summary_key(want))
    }

    /// The order that keeps a source covered by an old key and a new key of another length
    /// allowed throughout: the union of lengths is published, then the writer waits, and
    /// only then tombstones. (Moving the wait after the tombstones fails here.)
    #[test]
    fn in_place_change_publishes_the_union_then_waits_then_tombstones() {
        let mut t = tables(1 << 10);
        let host = v4(1, [198, 18, 0, 9], 32);
        let old = v4(1, [198, 18, 0, 0], 24);
        let new = v4(1, [198, 18, 0, 0], 16);
        let mut desc = TableDesc::NONE;
        let before = wanted(&[(host, A), (old, A)]);
        apply(&mut t, &mut desc, &before);
        take_trace(&t);

        let after = wanted(&[(host, A), (new, A)]);
        let started = Instant::now();
        assert!(apply(&mut t, &mut desc, &after), "an in-place change");
        assert!(started.elapsed() >= READER_GRACE);
        let trace = take_trace(&t);
        let at = |want: &dyn Fn(&Step) -> bool| trace.iter().position(want).unwrap_or_else(|| panic!("{trace:?}"));
        // The wanted lengths in their order, then the old ones they lack.
        let union = PackedLengths::pack(&[32, 16, 24]).unwrap();
        let final_lengths = PackedLengths::pack(&[32, 16]).unwrap();
        let no_v6 = PackedLengths::pack(&[]).unwrap();
        let inserted = at(&|s| *s == Step::Live(slot_of(&t, desc, &new)));
        let union_published = at(&|s| *s == Step::Lengths(union, no_v6));
        let grace = at(&|s| *s == Step::Grace);
        let tombstone = at(&|s| matches!(s, Step::Tombstone(_)));
        let final_published = at(&|s| *s == Step::Lengths(final_lengths, no_v6));
        assert!(inserted < union_published, "the new key is live before its length is probed: {trace:?}");
        assert!(union_published < grace, "the wait follows the union: {trace:?}");
        assert!(grace < tombstone, "the old key is tombstoned only after the wait: {trace:?}");
        assert!(tombstone < final_published, "the old length goes only after its keys: {trace:?}");
        assert_eq!(trace.iter().filter(|s| matches!(s, Step::Tombstone(_))).count(), 1);

        // The summaries: first of old and new keys together, last of the new keys alone.
        let summaries: Vec<(usize, Summary)> = trace
            .iter()
            .enumerate()
            .filter_map(|(i, s)| if let Step::Summaries(v4, _) = s { Some((i, *v4)) } else { None })
            .collect();
        let (first_at, first) = summaries[0];
        assert!(first_at < inserted);
        for key in [&host, &old, &new] {
            assert!(first.may_cover(desc.seed(), top_bits(true, key.hi, key.lo)), "{key:?} refused while changing");
        }
        let (last_at, last) = *summaries.last().unwrap();
        assert!(last_at > tombstone);
        assert_eq!(last, Summary::of(desc.seed(), summary_keys(&after, FAMILY_V4)));
        assert_eq!(t.read(desc), after);
    }

    /// A reorder is one store of one family's lengths word; a preference then survives an
    /// in-place change (its union of lengths too), a change that adds a length, and a
    /// rebuild; and it comes back from the header as a restarted writer finds it.
    #[test]
    fn a_first_length_put_first_stays_first_through_later_changes() {
        let mut t = tables(1 << 12);
        let mut firsts = FirstLengths::default();
        let (host, office, branch) =
            (v4(1, [198, 18, 0, 9], 32), v4(1, [198, 18, 1, 0], 24), v4(1, [198, 18, 0, 0], 16));
        let host6 = v6(1, 0xfd00 << 48, 1, 128);
        // Room in the table (16 slots) for the changes below to be made in place.
        let (a6, b6) = (v6(1, 0xfd00 << 48, 2, 128), v6(1, 0xfd00 << 48, 3, 128));
        let mut desc = TableDesc::NONE;
        let sync = |t: &mut Tables, desc: &mut TableDesc, firsts: &FirstLengths, keys: &[(SlotKey, u64)]| {
            let mut content = wanted(keys);
            firsts.apply(1, &mut content);
            apply(t, desc, &content)
        };
        sync(&mut t, &mut desc, &firsts, &[(host, A), (office, A), (host6, A), (a6, A), (b6, A)]);
        assert_eq!(t.read_lengths(desc, true), [32, 24], "the most specific first by default");
        take_trace(&t);

        firsts.set(1, FAMILY_V4, 24);
        assert!(t.reorder(desc, true, 24));
        let v6_word = PackedLengths::pack(&[128]).unwrap();
        assert_eq!(take_trace(&t), [Step::Lengths(PackedLengths::pack(&[24, 32]).unwrap(), v6_word)], "one store");
        assert!(!t.reorder(desc, true, 24), "first already");
        assert!(!t.reorder(desc, true, 16), "not a length of the table");
        assert!(!t.reorder(desc, false, 64), "not a length of the table");
        assert_eq!(t.read_lengths(desc, false), [128], "the other family untouched");

        // In place: a host added, then a /16 added while a host goes (the union published,
        // the wait, the tombstone): the /24 is first at every step the writer publishes.
        let other = v4(1, [198, 18, 0, 10], 32);
        assert!(sync(&mut t, &mut desc, &firsts, &[(host, A), (other, A), (office, A), (host6, A), (a6, A), (b6, A)]));
        assert!(sync(
            &mut t,
            &mut desc,
            &firsts,
            &[(other, A), (office, A), (branch, A), (host6, A), (a6, A), (b6, A)]
        ));
        let trace = take_trace(&t);
        let published: Vec<PackedLengths> =
            trace.iter().filter_map(|s| if let Step::Lengths(v4, _) = s { Some(*v4) } else { None }).collect();
        assert!(trace.contains(&Step::Grace), "{trace:?}");
        assert!(published.len() >= 4, "{trace:?}");
        assert!(published.iter().all(|l| l.get(0) == 24), "{published:?}");
        assert_eq!(t.read_lengths(desc, true), [24, 32, 16]);
        assert!([other, office, branch, host6].iter().all(|k| found(&t, desc, k) == Some(A)));
        assert_eq!(found(&t, desc, &host), None);

        // A rebuild (many more keys than the table holds) keeps it first too.
        let mut many: Vec<(SlotKey, u64)> = (0..40).map(|i| (v4(1, [198, 18, 2, i], 32), A)).collect();
        many.push((office, A));
        let before = desc;
        assert!(!sync(&mut t, &mut desc, &firsts, &many), "rebuilt");
        assert_ne!(desc, before);
        assert_eq!(t.read_lengths(desc, true), [24, 32]);

        // A writer starting over these slots finds the preference in the header.
        let mut restarted = FirstLengths::default();
        restarted.found(&t, 1, desc);
        assert_eq!(restarted, firsts);
        // Without the /24 the default order comes back; the preference waits for a /24.
        sync(&mut t, &mut desc, &firsts, &many[..40]);
        assert_eq!(t.read_lengths(desc, true), [32]);
        assert_eq!(firsts.get(1, FAMILY_V4), Some(24));
    }

    fn binding_key(port: u16) -> SlotKey {
        SlotKey { tag: Tag::port_binding(FAMILY_V4, 6, port), hi: 0, lo: 0xc612_0001 }
    }

    /// A binding table of `ports` keys (values `A`, `A + 1`, ...), published, its trace taken.
    fn binding_table(t: &mut Tables, ports: u16) -> (TableDesc, Vec<(SlotKey, u64)>) {
        let keys: Vec<(SlotKey, u64)> = (0..ports).map(|i| (binding_key(440 + i), A + u64::from(i))).collect();
        let mut desc = TableDesc::NONE;
        apply(t, &mut desc, &wanted(&keys));
        take_trace(t);
        (desc, keys)
    }

    /// A key-by-key change of a binding table: the new key goes in first, then the changed
    /// value, then the removed key's tombstone; nothing else is written (no header word, no
    /// wait), and no other key's slot is touched.
    #[test]
    fn a_binding_table_changes_key_by_key_new_keys_first_and_removals_last() {
        let mut t = tables(1 << 10);
        let (desc, keys) = binding_table(&mut t, 6);
        let (kept, rewritten, gone) = (keys[0].0, keys[1].0, keys[2].0);
        let fresh = binding_key(500);
        assert!(t.change_keys(desc, &[(rewritten, B), (fresh, B + 1)], &[gone], false));
        let trace = take_trace(&t);
        let live = slot_of(&t, desc, &fresh);
        assert_eq!(
            trace,
            [Step::Live(live), Step::Value(slot_of(&t, desc, &rewritten)), Step::Tombstone(trace_tombstone(&trace))]
        );
        assert_eq!(found(&t, desc, &kept), Some(A));
        assert_eq!(found(&t, desc, &rewritten), Some(B));
        assert_eq!(found(&t, desc, &fresh), Some(B + 1));
        assert_eq!(found(&t, desc, &gone), None);
        // A key that is not there is no removal; a table emptied is left to `sync`, which
        // publishes no table at all.
        assert!(t.change_keys(desc, &[], &[gone], false));
        assert_eq!(take_trace(&t), []);
        let all: Vec<SlotKey> = t.read(desc).entries.into_keys().collect();
        assert!(!t.change_keys(desc, &[], &all, false), "the last key goes with the table");
        assert_eq!(take_trace(&t), [], "nothing published when refused");
    }

    /// With `settle`, the new keys have the readers' grace before any other key changes;
    /// without new keys there is nothing to wait for.
    #[test]
    fn a_settled_change_waits_between_its_new_keys_and_the_rest() {
        let mut t = tables(1 << 10);
        let (mut desc, keys) = binding_table(&mut t, 6);
        let fresh = binding_key(500);
        assert!(t.change_keys(desc, &[(fresh, B), (keys[0].0, B)], &[keys[1].0], true));
        let trace = take_trace(&t);
        assert_eq!(trace[..2], [Step::Live(slot_of(&t, desc, &fresh)), Step::Grace]);
        assert_eq!(trace.len(), 4, "{trace:?}");
        assert!(t.change_keys(desc, &[(keys[0].0, A)], &[keys[2].0], true));
        assert!(!take_trace(&t).contains(&Step::Grace), "no new key, no wait");
        // A whole sync of a binding table in place waits the same way.
        let mut next: BTreeMap<SlotKey, u64> = t.read(desc).entries;
        next.insert(binding_key(501), A);
        next.insert(keys[0].0, B);
        assert!(apply(&mut t, &mut desc, &content(&next)));
        let trace = take_trace(&t);
        let grace = trace.iter().position(|s| *s == Step::Grace).expect("a wait");
        assert!(matches!(trace[grace - 1], Step::Live(_)) && matches!(trace[grace + 1], Step::Value(_)), "{trace:?}");
    }

    fn trace_tombstone(trace: &[Step]) -> u32 {
        trace.iter().find_map(|s| if let Step::Tombstone(i) = s { Some(*i) } else { None }).expect("a tombstone")
    }

    /// A key-by-key change that would leave the table over its load, or too sparse for its
    /// size, is refused before anything is published; `sync` then rebuilds it.
    #[test]
    fn a_binding_table_too_full_or_too_sparse_is_refused_key_by_key() {
        let mut t = tables(1 << 12);
        let (mut desc, keys) = binding_table(&mut t, 4);
        let slots = desc.slots() as usize;
        let many: Vec<(SlotKey, u64)> = (0..slots as u16).map(|i| (binding_key(1000 + i), B)).collect();
        take_trace(&t);
        assert!(!t.change_keys(desc, &many, &[], false), "{slots} more keys in {slots} slots");
        assert_eq!(take_trace(&t), []);
        // Grown, then cut back to one key: too sparse for its size.
        let grown: Vec<(SlotKey, u64)> = keys.iter().copied().chain(many.iter().copied()).collect();
        apply(&mut t, &mut desc, &wanted(&grown));
        let removed: Vec<SlotKey> = grown[1..].iter().map(|(k, _)| *k).collect();
        take_trace(&t);
        assert!(!t.change_keys(desc, &[], &removed, false));
        assert_eq!(take_trace(&t), []);
        assert_eq!(t.read(desc).entries.len(), grown.len(), "nothing changed");
    }

    #[test]
    fn no_wait_when_nothing_is_both_inserted_and_removed() {
        let mut t = tables(1 << 10);
        let mut desc = TableDesc::NONE;
        let (a, b, wide) = (v4(1, [198, 18, 0, 1], 32), v4(1, [198, 18, 0, 2], 32), v4(1, [198, 18, 0, 0], 24));
        apply(&mut t, &mut desc, &wanted(&[(a, A)]));
        // Keys added, a value changed, keys removed: each alone.
        for next in [wanted(&[(a, A), (b, A), (wide, A)]), wanted(&[(a, B), (b, A), (wide, A)]), wanted(&[(a, B)])] {
            take_trace(&t);
            assert!(apply(&mut t, &mut desc, &next));
            let trace = take_trace(&t);
            assert!(!trace.contains(&Step::Grace), "{trace:?}");
        }
    }

    /// A /16 replaced by a /24 inside it, a length the table already probes: a packet from
    /// the /24 may miss the new key just before it goes live and reach the /16 after it was
    /// removed, though both cover it. So the removal waits for such packets even when no
    /// length is new. (Waiting only when the lengths grow failed here.)
    #[test]
    fn a_key_replaced_at_a_length_in_use_is_removed_only_after_the_wait() {
        let mut t = tables(1 << 10);
        let (other, wide, narrow) =
            (v4(1, [198, 18, 9, 0], 24), v4(1, [198, 18, 0, 0], 16), v4(1, [198, 18, 0, 0], 24));
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&[(other, A), (wide, A)]));
        let wide_slot = slot_of(&t, desc, &wide);
        take_trace(&t);

        let started = Instant::now();
        assert!(apply(&mut t, &mut desc, &wanted(&[(other, A), (narrow, A)])), "an in-place change");
        assert!(started.elapsed() >= READER_GRACE);
        let trace = take_trace(&t);
        let at = |want: &dyn Fn(&Step) -> bool| trace.iter().position(want).unwrap_or_else(|| panic!("{trace:?}"));
        let inserted = at(&|s| *s == Step::Live(slot_of(&t, desc, &narrow)));
        let grace = at(&|s| *s == Step::Grace);
        assert!(inserted < grace && grace < at(&|s| *s == Step::Tombstone(wide_slot)), "{trace:?}");
    }

    /// Most of a big table's keys removed while the slot array has no room for the smaller
    /// table a rebuild would want: the removal is made in place (the removed keys found no
    /// more), not refused as full.
    #[test]
    fn a_removal_with_no_room_for_a_smaller_table_is_made_in_place() {
        // One 1,024-slot table and its header, and less than any other table needs.
        let mut t = tables((1 << 10) + 2);
        let keys: Vec<(SlotKey, u64)> = (0..400u32).map(|i| (v4(1, (0xc612_0000 + i).to_be_bytes(), 32), A)).collect();
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&keys));
        assert_eq!(desc.log2_slots(), 10);
        // Ten keys left: far below the least load a 1,024-slot table keeps.
        assert!(apply(&mut t, &mut desc, &wanted(&keys[..10])), "made in place");
        for (key, _) in &keys[10..] {
            assert_eq!(found(&t, desc, key), None, "a removed key is still found");
        }
        for (key, value) in &keys[..10] {
            assert_eq!(found(&t, desc, key), Some(*value));
        }
    }

    /// Slots for a table of the usual size are not free, but a fuller one fits: it is built
    /// that full (as an in-place change would leave it) rather than refused, so that what
    /// the kernel enforces loads again into fresh maps; and where not even one slot a key
    /// is free, the table is refused as full.
    #[test]
    fn a_table_with_no_room_at_half_load_is_built_fuller() {
        // 100 keys want 256 slots at half load; 130 slots are there (header included).
        let keys: Vec<(SlotKey, u64)> = (0..100u32).map(|i| (v4(1, (0xc612_0000 + i).to_be_bytes(), 32), A)).collect();
        let mut t = tables(130);
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&keys));
        assert_eq!(desc.log2_slots(), 7, "{desc:?}");
        for (key, value) in &keys {
            assert_eq!(found(&t, desc, key), Some(*value));
        }
        assert_eq!(found(&t, desc, &v4(1, [198, 18, 9, 9], 32)), None);
        // 100 keys and 64 slots: no table holds them.
        let mut t = tables(100);
        let result = t.sync(TableDesc::NONE, &wanted(&keys));
        assert!(matches!(result, Err(TableError::Full { .. })), "{result:?}");
    }

    /// Dense loading is for empty maps that a policy might not fit at half load only, and
    /// builds each table as small as its keys allow.
    #[test]
    fn a_tight_policy_loads_densely_into_empty_maps_only() {
        let keys: Vec<(SlotKey, u64)> = (0..30u32).map(|i| (v4(1, (0xc612_0000 + i).to_be_bytes(), 32), A)).collect();
        let mut t = tables(1 << 10);
        assert!(!t.load_densely(100, 50), "room for four slots a key");
        assert!(t.load_densely(200, 100));
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&keys));
        assert_eq!(desc.log2_slots(), 5, "30 keys in 32 slots");
        assert!(keys.iter().all(|(k, v)| found(&t, desc, k) == Some(*v)));
        t.end_dense_load();
        let mut other = TableDesc::NONE;
        apply(&mut t, &mut other, &wanted(&keys[..10]));
        assert_eq!(other.log2_slots(), 5, "half full again once the load is done");
        // Maps with tables in them are not loaded into afresh.
        assert!(!t.load_densely(1000, 100));
    }

    #[test]
    fn growing_and_shrinking_rebuild_elsewhere_and_leave_the_old_region_intact() {
        let mut t = tables(1 << 12);
        let keys: Vec<SlotKey> = (0..40).map(|i| v4(1, [198, 18, 1, i], 32)).collect();
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&[(keys[0], A), (keys[1], A)]));
        let small = desc;
        assert_eq!(small.log2_slots(), MIN_LOG2_SLOTS);

        let many: Vec<(SlotKey, u64)> = keys.iter().map(|&k| (k, A)).collect();
        assert!(!apply(&mut t, &mut desc, &wanted(&many)), "40 keys do not fit in 8 slots at half load");
        let big = desc;
        assert!(big.slots() as u64 * MAX_LOAD_PERCENT >= 40 * 100, "{big:?}");
        assert_ne!(big.header(), small.header());
        assert!(keys.iter().all(|k| found(&t, big, k) == Some(A)));
        // A packet that read the old descriptor still finds the old table whole.
        assert_eq!(found(&t, small, &keys[0]), Some(A));
        assert_eq!(found(&t, small, &keys[1]), Some(A));

        assert!(!apply(&mut t, &mut desc, &wanted(&[(keys[5], B)])), "one key in 128 slots is too sparse");
        assert_eq!(desc.log2_slots(), MIN_LOG2_SLOTS);
        let (start, end) = (desc.header(), desc.header() + desc.region_len());
        for old in [small, big] {
            let (old_start, old_end) = (old.header(), old.header() + old.region_len());
            assert!(end <= old_start || start >= old_end, "{desc:?} reuses quarantined {old:?}");
        }
        assert_eq!(found(&t, desc, &keys[5]), Some(B));
        assert_eq!(found(&t, desc, &keys[0]), None);
        assert!(keys.iter().all(|k| found(&t, big, k) == Some(A)), "the retired big table is intact too");
    }

    #[test]
    fn lengths_that_do_not_fit_together_rebuild_and_too_many_are_refused() {
        let mut t = tables(1 << 10);
        let mut desc = TableDesc::NONE;
        let first: Vec<(SlotKey, u64)> = (0..8).map(|i| (v4(1, [198, 18, 0, 0], 24 + i), A)).collect();
        apply(&mut t, &mut desc, &wanted(&first));
        let before = desc;
        let other: Vec<(SlotKey, u64)> = (0..8).map(|i| (v4(1, [198, 18, 0, 0], 8 + i), A)).collect();
        assert!(!apply(&mut t, &mut desc, &wanted(&other)), "16 lengths cannot be published at once");
        assert_ne!(desc, before);
        assert!(other.iter().all(|(k, v)| found(&t, desc, k) == Some(*v)));

        let mut nine = wanted(&other);
        nine.v4_lengths.push(1);
        assert!(matches!(t.sync(desc, &nine), Err(TableError::TooManyLengths)));
        assert_eq!(t.read(desc), wanted(&other), "a refused change leaves the table as it was");
    }

    #[test]
    fn an_empty_list_has_no_table() {
        let mut t = tables(1 << 6);
        assert_eq!(t.sync(TableDesc::NONE, &TableContent::default()).unwrap(), Synced::InPlace);
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&[(v4(1, [198, 18, 0, 1], 32), A)]));
        assert_eq!(t.sync(desc, &TableContent::default()).unwrap(), Synced::Replaced(TableDesc::NONE));
    }

    #[test]
    fn a_full_array_is_an_error_and_a_quarantined_region_is_waited_for() {
        // Room for exactly one 8-slot table: not for nine keys, even at one key a slot.
        let mut t = tables(9);
        let keys: Vec<(SlotKey, u64)> = (0..9).map(|i| (v4(1, [198, 18, 0, i], 32), A)).collect();
        assert!(matches!(t.sync(TableDesc::NONE, &wanted(&keys)), Err(TableError::Full { .. })));
        let mut desc = TableDesc::NONE;
        apply(&mut t, &mut desc, &wanted(&keys[..2]));
        assert_eq!(desc.header(), 0);
        apply(&mut t, &mut desc, &TableContent::default());
        // The only region is quarantined: the next table waits for it rather than fail.
        let started = Instant::now();
        apply(&mut t, &mut desc, &wanted(&keys[2..4]));
        assert!(started.elapsed() >= super::super::regions::QUARANTINE - Duration::from_millis(50));
        assert_eq!(desc.header(), 0);
        assert_eq!(found(&t, desc, &keys[2].0), Some(A));
    }

    #[test]
    fn published_regions_are_not_handed_out_again() {
        let in_use = [TableDesc::new(0, 3), TableDesc::new(9, 4)];
        let mut t = Tables::new(MmapArray::anonymous(100).unwrap(), in_use).unwrap();
        assert_eq!(t.free_slots(), 100 - 9 - 17);
        let desc = match t.sync(TableDesc::NONE, &wanted(&[(v4(1, [198, 18, 0, 1], 32), A)])).unwrap() {
            Synced::Replaced(desc) => desc,
            other => panic!("{other:?}"),
        };
        assert!(desc.header() >= 26, "{desc:?}");
        let overlapping = [TableDesc::new(0, 3), TableDesc::new(4, 3)];
        assert!(matches!(
            Tables::new(MmapArray::anonymous(100).unwrap(), overlapping),
            Err(TableError::Regions(RegionError::Overlap(4)))
        ));
    }

    /// Model-based: random change sequences to several tables sharing one slot array, each
    /// applied through the writer; after every change, each table's reader finds exactly the
    /// wanted keys with their values and the header describes them. Replay a failure with
    /// `IPACCESS_TABLES_SEED=<seed>`.
    #[test]
    fn random_changes_keep_every_table_exact() {
        let seed = std::env::var("IPACCESS_TABLES_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos() as u64);
        println!("tables model seed {seed}");
        let mut rng = Rng(seed | 1);
        const TABLES: usize = 4;
        const STEPS: usize = 400;
        const V4_LENGTHS: [u8; 6] = [8, 16, 20, 24, 28, 32];
        const V6_LENGTHS: [u8; 5] = [32, 48, 64, 96, 128];
        let mut t = tables(1 << 17);
        let mut descs = [TableDesc::NONE; TABLES];
        let mut wanted: Vec<BTreeMap<SlotKey, u64>> = vec![BTreeMap::new(); TABLES];
        let mut ever: Vec<BTreeSet<SlotKey>> = vec![BTreeSet::new(); TABLES];
        let (mut in_place, mut rebuilt, mut keyed) = (0, 0, 0);
        for step in 0..STEPS {
            let table = rng.next() as usize % TABLES;
            let owner = table as u32 + 1;
            // This change's prefix lengths: a random few of each family.
            let v4_lengths: Vec<u8> = V4_LENGTHS.iter().copied().filter(|_| rng.next().is_multiple_of(3)).collect();
            let v6_lengths: Vec<u8> = V6_LENGTHS.iter().copied().filter(|_| rng.next().is_multiple_of(4)).collect();
            let new_key = |rng: &mut Rng| {
                // Table 0 is a binding table; the others are allowlists. A small address space,
                // so keys come back after they were removed.
                let pick = rng.next();
                if table == 0 {
                    let tag = Tag::port_binding(FAMILY_V4, [6, 17][pick as usize % 2], 440 + (pick >> 8) as u16 % 8);
                    return SlotKey { tag, hi: 0, lo: 0xc612_0000 | (rng.next() % 64) };
                }
                let addr = 0xc612_0000 | (rng.next() as u32 % 4096) << 4;
                match (pick % 4, v4_lengths.is_empty(), v6_lengths.is_empty()) {
                    (0, _, false) | (_, true, false) => {
                        let len = v6_lengths[(pick >> 8) as usize % v6_lengths.len()];
                        v6(owner, 0xfd00_0000_0000_0000 | (rng.next() % 256) << 40, rng.next() % 16, len)
                    }
                    (_, false, _) => v4(owner, addr.to_be_bytes(), v4_lengths[(pick >> 8) as usize % v4_lengths.len()]),
                    (_, true, true) => v4(owner, addr.to_be_bytes(), 32),
                }
            };
            let before = wanted[table].clone();
            let keys = &mut wanted[table];
            match rng.next() % 10 {
                0 => keys.clear(),
                1 | 2 => {
                    for _ in 0..20 + rng.next() % 200 {
                        let key = new_key(&mut rng);
                        keys.insert(key, rng.next());
                    }
                }
                3 | 4 => keys.retain(|_, _| rng.next().is_multiple_of(4)),
                _ => {
                    keys.retain(|_, _| !rng.next().is_multiple_of(8));
                    for value in keys.values_mut() {
                        if rng.next().is_multiple_of(8) {
                            *value = rng.next();
                        }
                    }
                    for _ in 0..rng.next() % 6 {
                        let key = new_key(&mut rng);
                        keys.insert(key, NEVER_EXPIRES);
                    }
                }
            }
            ever[table].extend(keys.keys().copied());
            let content = content(keys);
            // The binding table changes key by key, as the datapath changes it, falling back
            // to a whole sync when the table cannot take the change where it is.
            if table == 0 {
                let written: Vec<(SlotKey, u64)> =
                    keys.iter().filter(|(k, v)| before.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
                let removed: Vec<SlotKey> = before.keys().filter(|k| !keys.contains_key(k)).copied().collect();
                if t.change_keys(descs[table], &written, &removed, false) {
                    keyed += 1;
                    let counted = t.loads.remove(&descs[table].header()).expect("a change keeps its load");
                    assert_eq!(t.load(descs[table]), counted, "seed {seed}, step {step}: the load kept is the load");
                    check_tables(&t, &descs, &wanted, &ever, seed, step);
                    continue;
                }
            }
            match t.sync(descs[table], &content) {
                Ok(Synced::InPlace) => in_place += 1,
                Ok(Synced::Replaced(new)) => {
                    t.retire(descs[table]);
                    descs[table] = new;
                    rebuilt += 1;
                }
                Err(e) => panic!("seed {seed}, step {step}: {e}"),
            }
            check_tables(&t, &descs, &wanted, &ever, seed, step);
        }
        println!("{in_place} changes in place, {rebuilt} rebuilt, {keyed} key by key");
        assert!(in_place > STEPS / 10 && rebuilt > STEPS / 20, "seed {seed}: {in_place} in place, {rebuilt} rebuilt");
        assert!(keyed > STEPS / 20, "seed {seed}: {keyed} key by key");
    }

    /// After each change of [`random_changes_keep_every_table_exact`]: each table's reader
    /// finds exactly its wanted keys, and its header describes them.
    fn check_tables<const TABLES: usize>(
        t: &Tables,
        descs: &[TableDesc; TABLES],
        wanted: &[BTreeMap<SlotKey, u64>],
        ever: &[BTreeSet<SlotKey>],
        seed: u64,
        step: usize,
    ) {
        take_trace(t);
        for i in 0..TABLES {
            let (desc, keys) = (descs[i], &wanted[i]);
            let context = format!("seed {seed}, step {step}, table {i}, {desc:?}");
            if keys.is_empty() {
                assert_eq!(desc, TableDesc::NONE, "{context}");
                continue;
            }
            for (key, value) in keys {
                assert_eq!(found(t, desc, key), Some(*value), "{context}: wanted {key:?} not found");
            }
            for key in ever[i].iter().filter(|k| !keys.contains_key(k)) {
                assert_eq!(found(t, desc, key), None, "{context}: unwanted {key:?} found");
            }
            assert_eq!(t.read(desc), content_of(keys), "{context}");
            if i != 0 {
                for (v4, family) in [(true, FAMILY_V4), (false, FAMILY_V6)] {
                    let summary = read_summary(t.slots(), desc, v4).unwrap();
                    for key in keys.keys().filter(|k| k.summary_key(family).is_some()) {
                        assert!(summary.may_cover(desc.seed(), top_bits(v4, key.hi, key.lo)), "{context}: {key:?}");
                    }
                }
            }
        }
        let published =
            descs.iter().filter(|d| d.is_present()).map(|d| Region { start: d.header(), len: d.region_len() });
        assert!(Regions::with_used(t.capacity(), published).is_ok(), "seed {seed}, step {step}: {descs:?} overlap");
    }

    fn content_of(keys: &BTreeMap<SlotKey, u64>) -> TableContent {
        content(keys)
    }
}
