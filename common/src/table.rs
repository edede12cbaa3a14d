//! Open-addressed hash tables laid out in one big array map (`SLOTS`).
//!
//! Why not kernel hash maps: a kernel hash lookup costs about as much as the whole rest of
//! the program, and a bound decision needs two or three of them. Array lookups are inlined
//! by the verifier into a bounds check and an add, so a table we lay out ourselves costs a
//! multiply for the hash and a few loads per probe. User space decides everything ahead of
//! time (placement, prefix lengths, seeds); the kernel only probes.
//!
//! # Layout
//!
//! A *region* is `1 + 2^k` consecutive slots: a header slot (per family, the prefix lengths
//! to probe and a [`Summary`] of the keys) followed by `2^k` table slots,
//! probed linearly from the key's home slot for at most [`MAX_PROBE`] slots and stopping at
//! the first empty one. A region is named by a [`TableDesc`] word.
//!
//! # Concurrency (single writer, lock-free readers)
//!
//! The daemon writes slots through an `mmap` of the array while XDP programs on every CPU
//! read them. Each slot's `meta` word is a seqlock: it carries a state, a version bumped on
//! every transition and a tag that identifies the key's kind and owner.
//!
//! * insert: write key and value words, then publish `meta = LIVE|version|tag`;
//! * change a value (an expiry) in place: one aligned 8-byte store;
//! * delete: `meta = DEAD|version` (a tombstone; the key words stay, so no reader can see
//!   a half-erased key);
//! * a reader reads `meta`, the key and value words, then `meta` again, and ignores the
//!   slot if the two `meta` reads differ.
//!
//! Empty slots are only ever created when a region is initialised, so "stop at the first
//! empty slot" stays valid under deletes: every key sits before the first empty slot of its
//! probe sequence. Tombstones are reused by inserts and cleared by rebuilding the region.
//! A rebuilt region replaces the old one with a single store of its descriptor; the old one
//! is reused only after a quarantine, and because every allow entry's tag carries its owner
//! account a reader holding a stale descriptor can never match another account's entry.

/// Slots probed from a key's home slot before a lookup gives up. The writer never places a
/// key further away; it rebuilds the region larger instead.
///
/// Why the program only loads for some bounds: with 10 or fewer, LLVM unrolls the probe
/// loop of [`lookup`] completely (at every one of its ten or so inlined call sites), the
/// program's body grows by half or more, and the inliner no longer folds it into the entry
/// point aya generates. The entry then passes `data` and `data_end` of `xdp_md` (32-bit
/// loads) to the body as arguments, and the body widens them to 64 bits with `r <<= 32;
/// r >>= 32`: shifting a packet pointer, which the verifier refuses ("R1 pointer arithmetic
/// with <<= operator prohibited", at the body's first instruction). From 11 up the loop
/// stays a loop and the body is inlined (24, 16, 12, 11 and 64 load; 10, 9 and 8 do not,
/// kernel 6.18 with the pinned nightly and bpf-linker). The threshold is LLVM's unrolling
/// heuristic, so it can move with the compiler or with the loop's body; the smoke test and
/// every test that loads the program would show it.
pub const MAX_PROBE: u32 = 24;
const _: () = assert!(MAX_PROBE >= 11, "MAX_PROBE <= 10 unrolls the probe loop and the program fails verification");

/// Distinct prefix lengths probed per address family per account. User space expands
/// prefixes so that no account needs more (see the daemon's `prefix` module).
pub const MAX_PROBE_LENGTHS: usize = 8;

/// Marks an unused entry in a packed list of prefix lengths.
pub const NO_LENGTH: u8 = 0xff;

/// An allow entry's value when it never expires.
pub const NEVER_EXPIRES: u64 = u64::MAX;

/// One slot of a table: four 8-byte words, half a cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// A [`Meta`] word: state, version and tag. Header: the IPv4 [`Summary`].
    pub meta: u64,
    /// High 64 bits of the key address (zero for IPv4). Header: IPv4 probe lengths.
    pub key_hi: u64,
    /// Low 64 bits of the key address (the IPv4 address in its low 32 bits). Header: IPv6
    /// probe lengths.
    pub key_lo: u64,
    /// Expiry (allow entries) or account slot and flags (bindings). Header: the IPv6
    /// [`Summary`].
    pub value: u64,
}

/// The three states of a table slot, in the low two bits of `meta`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// Never used since the region was initialised: probes stop here.
    Empty,
    Live,
    /// A tombstone.
    Dead,
}

/// A slot's `meta` word: `tag << 18 | version << 2 | state`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta(u64);

impl Meta {
    const STATE_MASK: u64 = 3;
    const EMPTY: u64 = 0;
    const LIVE: u64 = 1;
    const DEAD: u64 = 2;
    const VERSION_SHIFT: u32 = 2;
    const VERSION_MASK: u64 = 0xffff;
    const TAG_SHIFT: u32 = 18;

    /// A live slot holding a key with `tag`; versions wrap at 16 bits.
    #[inline(always)]
    pub const fn live(tag: Tag, version: u64) -> Self {
        Meta((tag.0 << Self::TAG_SHIFT) | ((version & Self::VERSION_MASK) << Self::VERSION_SHIFT) | Self::LIVE)
    }

    /// A tombstone; versions wrap at 16 bits.
    #[inline(always)]
    pub const fn dead(version: u64) -> Self {
        Meta(((version & Self::VERSION_MASK) << Self::VERSION_SHIFT) | Self::DEAD)
    }

    #[inline(always)]
    pub const fn state(self) -> SlotState {
        match self.0 & Self::STATE_MASK {
            Self::EMPTY => SlotState::Empty,
            Self::LIVE => SlotState::Live,
            // The writer never stores 3; a reader treats it like a tombstone (not a key,
            // not the end of a probe sequence).
            _ => SlotState::Dead,
        }
    }

    /// Cheaper than `state() == SlotState::Empty` on the kernel's probe path.
    #[inline(always)]
    pub const fn is_empty(self) -> bool {
        self.0 & Self::STATE_MASK == Self::EMPTY
    }

    #[inline(always)]
    pub const fn is_live(self) -> bool {
        self.0 & Self::STATE_MASK == Self::LIVE
    }

    #[inline(always)]
    pub const fn version(self) -> u64 {
        (self.0 >> Self::VERSION_SHIFT) & Self::VERSION_MASK
    }

    #[inline(always)]
    pub const fn tag(self) -> Tag {
        Tag(self.0 >> Self::TAG_SHIFT)
    }

    #[inline(always)]
    pub const fn from_bits(bits: u64) -> Self {
        Meta(bits)
    }

    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        self.0
    }
}

/// Address family as stored in tags and records.
pub const FAMILY_V4: u64 = 0;
pub const FAMILY_V6: u64 = 1;

/// The kind of key a [`Tag`] names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TagKind {
    /// An allowlist entry (or override) of one account.
    Allow,
    /// A binding of one (destination address, protocol, port).
    Port,
    /// The per-address binding record.
    Addr,
}

/// A key's tag: `kind << 44 | family << 40 | rest`, where `rest` is `prefix_len << 32 |
/// owner` for allowlist entries and `protocol << 16 | port` for port bindings. The kind
/// keeps entries of different tables apart even through a stale descriptor. 46 bits, so
/// that it fits above the version and state in [`Meta`]. `family` arguments must be
/// [`FAMILY_V4`] or [`FAMILY_V6`] (not masked: the constructors sit on the packet path).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tag(u64);

impl Tag {
    const KIND_SHIFT: u32 = 44;
    const KIND_ALLOW: u64 = 1;
    const KIND_PORT: u64 = 2;
    const KIND_ADDR: u64 = 3;
    const FAMILY_SHIFT: u32 = 40;
    const PREFIX_SHIFT: u32 = 32;
    const PROTOCOL_SHIFT: u32 = 16;
    /// The owner bit of a shared set's entries (see [`Tag::set_entry`]).
    pub const SET_OWNER: u32 = 1 << 31;

    /// An allowlist entry: `owner` account, family and prefix length.
    #[inline(always)]
    pub const fn allow(owner: u32, family: u64, prefix_len: u8) -> Self {
        Tag((Self::KIND_ALLOW << Self::KIND_SHIFT)
            | (family << Self::FAMILY_SHIFT)
            | ((prefix_len as u64) << Self::PREFIX_SHIFT)
            | owner as u64)
    }

    /// A binding of one (destination address, protocol, port).
    #[inline(always)]
    pub const fn port_binding(family: u64, protocol: u8, port: u16) -> Self {
        Tag((Self::KIND_PORT << Self::KIND_SHIFT)
            | (family << Self::FAMILY_SHIFT)
            | ((protocol as u64) << Self::PROTOCOL_SHIFT)
            | port as u64)
    }

    /// The per-address binding record: whole-address binding and "has port bindings".
    #[inline(always)]
    pub const fn address(family: u64) -> Self {
        Tag((Self::KIND_ADDR << Self::KIND_SHIFT) | (family << Self::FAMILY_SHIFT))
    }

    /// `None` for a word no constructor makes.
    #[inline(always)]
    pub const fn kind(self) -> Option<TagKind> {
        match self.0 >> Self::KIND_SHIFT {
            Self::KIND_ALLOW => Some(TagKind::Allow),
            Self::KIND_PORT => Some(TagKind::Port),
            Self::KIND_ADDR => Some(TagKind::Addr),
            _ => None,
        }
    }

    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    #[inline(always)]
    pub const fn family(self) -> u64 {
        (self.0 >> Self::FAMILY_SHIFT) & 1
    }

    /// Allowlist entries: the entry's owner, an account slot or, with [`Tag::SET_OWNER`],
    /// a shared set.
    #[inline(always)]
    pub const fn owner(self) -> Option<u32> {
        match self.kind() {
            Some(TagKind::Allow) => Some(self.0 as u32),
            _ => None,
        }
    }

    /// The same allowlist tag at another prefix length (`self` built with length 0, so the
    /// packet path only ORs the length in).
    #[inline(always)]
    pub const fn with_prefix_len(self, prefix_len: u8) -> Self {
        Tag(self.0 | ((prefix_len as u64) << Self::PREFIX_SHIFT))
    }

    /// Allowlist entries: the prefix length of the key.
    #[inline(always)]
    pub const fn prefix_len(self) -> Option<u8> {
        match self.kind() {
            Some(TagKind::Allow) => Some((self.0 >> Self::PREFIX_SHIFT) as u8),
            _ => None,
        }
    }

    /// An entry of shared-set group `group` (below [`crate::MAX_SET_GROUPS`]): an allowlist
    /// key whose owner has [`Tag::SET_OWNER`] set, which no account slot has (they stay below
    /// 2^24), so a group's key and an account's key never match each other's probes.
    #[inline(always)]
    pub const fn set_entry(group: u32, family: u64, prefix_len: u8) -> Self {
        Self::allow(Self::SET_OWNER | group, family, prefix_len)
    }

    /// Port bindings: the transport protocol.
    #[inline(always)]
    pub const fn protocol(self) -> Option<u8> {
        match self.kind() {
            Some(TagKind::Port) => Some((self.0 >> Self::PROTOCOL_SHIFT) as u8),
            _ => None,
        }
    }

    /// Port bindings: the destination port.
    #[inline(always)]
    pub const fn port(self) -> Option<u16> {
        match self.kind() {
            Some(TagKind::Port) => Some(self.0 as u16),
            _ => None,
        }
    }

    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        self.0
    }
}

/// An address as the two key words of a table slot: host-order halves, IPv4 in the low 32
/// bits of `lo` (and `hi` zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrWords {
    pub hi: u64,
    pub lo: u64,
}

impl AddrWords {
    /// `addr` in host order.
    #[inline(always)]
    pub const fn v4(addr: u32) -> Self {
        AddrWords { hi: 0, lo: addr as u64 }
    }

    /// `addr` in host order.
    #[inline(always)]
    pub const fn v6(addr: u128) -> Self {
        AddrWords { hi: (addr >> 64) as u64, lo: addr as u64 }
    }

    /// The address and its family ([`FAMILY_V4`] or [`FAMILY_V6`]).
    pub const fn of(addr: core::net::IpAddr) -> (u64, Self) {
        match addr {
            core::net::IpAddr::V4(a) => (FAMILY_V4, Self::v4(a.to_bits())),
            core::net::IpAddr::V6(a) => (FAMILY_V6, Self::v6(a.to_bits())),
        }
    }

    /// The address these words hold in `family` ([`FAMILY_V4`], anything else is IPv6).
    pub const fn to_ip(self, family: u64) -> core::net::IpAddr {
        if family == FAMILY_V4 {
            core::net::IpAddr::V4(core::net::Ipv4Addr::from_bits(self.lo as u32))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from_bits(((self.hi as u128) << 64) | self.lo as u128))
        }
    }

    /// The top 64 bits of the address (IPv4 in the top half), as [`Summary`] compares them.
    #[inline(always)]
    pub const fn top(self, v4: bool) -> u64 {
        top_bits(v4, self.hi, self.lo)
    }
}

impl From<core::net::IpAddr> for AddrWords {
    fn from(addr: core::net::IpAddr) -> Self {
        Self::of(addr).1
    }
}

/// Names a region of `SLOTS`: `PRESENT | log2(table slots) << 32 | header`.
/// Zero means "no table" (an account with an empty allowlist, or no bindings at all).
/// The word also seeds the region's hash, so the kernel needs no load to learn the seed; a
/// table rebuilt because a key did not fit lands in another region, so with another seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableDesc(pub u64);

impl TableDesc {
    pub const NONE: TableDesc = TableDesc(0);
    const PRESENT: u64 = 1 << 63;

    pub const fn new(header: u32, log2_slots: u32) -> Self {
        TableDesc(Self::PRESENT | ((log2_slots as u64) << 32) | header as u64)
    }

    /// The hash seed of the region.
    #[inline(always)]
    pub const fn seed(self) -> u64 {
        self.0
    }

    #[inline(always)]
    pub const fn is_present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }

    /// Index of the header slot; table slots follow it.
    #[inline(always)]
    pub const fn header(self) -> u32 {
        self.0 as u32
    }

    #[inline(always)]
    pub const fn log2_slots(self) -> u32 {
        ((self.0 >> 32) & 0x3f) as u32
    }

    #[inline(always)]
    pub const fn slots(self) -> u32 {
        1 << self.log2_slots()
    }

    #[inline(always)]
    pub const fn mask(self) -> u32 {
        self.slots() - 1
    }

    /// Slots the region occupies, header included.
    pub const fn region_len(self) -> u32 {
        self.slots() + 1
    }
}

/// Mixes a key into 64 bits: the words are folded together first so that only one multiply
/// sits on the path from packet to probe (this hash is on every packet's critical path).
/// Multiply-shift: the home slot is taken from the high bits, which the multiply mixes
/// well. The per-region seed and the writer's bounded probing (a table whose keys do not
/// all fit within `MAX_PROBE` is rebuilt elsewhere, so with another seed) keep crafted keys
/// from building long chains.
#[inline(always)]
pub const fn hash_key(seed: u64, tag: Tag, hi: u64, lo: u64) -> u64 {
    let folded = seed ^ lo ^ tag.0.rotate_left(29) ^ hi.rotate_left(47) ^ (hi >> 13);
    folded.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Home slot of a key, as an offset within the table (0..slots).
#[inline(always)]
pub const fn home_offset(desc: TableDesc, hash: u64) -> u32 {
    // The top bits of a multiplicative hash are the well-mixed ones (tables have at least
    // two slots, so the shift stays below 64).
    (hash >> (64 - desc.log2_slots())) as u32
}

/// Index in `SLOTS` of the `step`-th probe for a key whose home offset is `home`.
#[inline(always)]
pub const fn probe_index(desc: TableDesc, home: u32, step: u32) -> u32 {
    desc.header() + 1 + ((home + step) & desc.mask())
}

/// Read access to the slot array: a map lookup in the kernel, an `mmap` in user space.
/// Both sides then share [`lookup`], so they cannot disagree about where a key lives.
///
/// # Safety
///
/// [`lookup`], [`read_lengths`], [`read_family_lengths`] and [`read_summary`] dereference
/// the pointers this trait hands out, so an implementation must guarantee that every
/// `Some(ptr)` returned by [`SlotReader::slot`]:
///
/// - points to a whole [`Slot`], aligned to 8 bytes, that stays mapped and readable for as
///   long as `self` is borrowed;
/// - is distinct for distinct in-range indices (index `i` is the `i`-th slot of one array);
/// - is only ever written concurrently with single aligned 8-byte stores (the seqlock's
///   protocol above), so that each word read is a whole word some writer stored.
///
/// It must return `None` for every index at or past the array's end.
pub unsafe trait SlotReader {
    /// Pointer to slot `index`, `None` past the array's end.
    fn slot(&self, index: u32) -> Option<*const Slot>;
}

#[inline(always)]
fn read_word(word: *const u64) -> u64 {
    // SAFETY: callers pass pointers into a live slot (the `SlotReader` contract); volatile
    // keeps the seqlock's two reads of `meta` from being merged or reordered around the key
    // reads.
    unsafe { core::ptr::read_volatile(word) }
}

/// Finds a key; returns its value word. See the module docs for the protocol.
#[inline(always)]
pub fn lookup<R: SlotReader>(slots: &R, desc: TableDesc, tag: Tag, hi: u64, lo: u64) -> Option<u64> {
    lookup_at(slots, desc, tag, hi, lo).map(|(_, value)| value)
}

/// Finds a key; returns the index of its slot (where the program stamps its last use) and
/// its value word.
#[inline(always)]
pub fn lookup_at<R: SlotReader>(slots: &R, desc: TableDesc, tag: Tag, hi: u64, lo: u64) -> Option<(u32, u64)> {
    // SAFETY (all reads below): pointers come from `slots.slot`, valid by the `SlotReader` contract.
    let home = home_offset(desc, hash_key(desc.seed(), tag, hi, lo));
    let mut step = 0;
    while step < MAX_PROBE {
        let index = probe_index(desc, home, step);
        let slot = slots.slot(index)?;
        // All four words at once (one cache line): the compares then wait for one load,
        // not two in a row.
        let meta = Meta(read_word(unsafe { &raw const (*slot).meta }));
        let key_hi = read_word(unsafe { &raw const (*slot).key_hi });
        let key_lo = read_word(unsafe { &raw const (*slot).key_lo });
        let value = read_word(unsafe { &raw const (*slot).value });
        if meta.is_empty() {
            return None;
        }
        if meta == Meta::live(tag, meta.version()) && key_hi == hi && key_lo == lo {
            // A changed meta means the slot was rewritten while we read it.
            if read_word(unsafe { &raw const (*slot).meta }) == meta.0 {
                return Some((index, value));
            }
        }
        step += 1;
    }
    None
}

/// Reads an allowlist region's probe lengths (IPv4, IPv6) from its header.
#[inline(always)]
pub fn read_lengths<R: SlotReader>(slots: &R, desc: TableDesc) -> Option<(PackedLengths, PackedLengths)> {
    let header = slots.slot(desc.header())?;
    // SAFETY: as in `lookup`.
    unsafe {
        Some((
            PackedLengths(read_word(&raw const (*header).key_hi)),
            PackedLengths(read_word(&raw const (*header).key_lo)),
        ))
    }
}

/// Reads one family's probe lengths from an allowlist region's header.
#[inline(always)]
pub fn read_family_lengths<R: SlotReader>(slots: &R, desc: TableDesc, v4: bool) -> Option<PackedLengths> {
    let header = slots.slot(desc.header())?;
    // SAFETY: as in `lookup`.
    let word = unsafe { if v4 { &raw const (*header).key_hi } else { &raw const (*header).key_lo } };
    Some(PackedLengths(read_word(word)))
}

/// Reads one family's [`Summary`] from an allowlist region's header.
#[inline(always)]
pub fn read_summary<R: SlotReader>(slots: &R, desc: TableDesc, v4: bool) -> Option<Summary> {
    let header = slots.slot(desc.header())?;
    // SAFETY: as in `lookup`.
    let word = unsafe { if v4 { &raw const (*header).meta } else { &raw const (*header).value } };
    Some(Summary(read_word(word)))
}

/// A one-word summary of an allowlist's keys of one family, kept in the region's header so
/// that most refused sources are refused after one load, with no probe.
///
/// The daemon cuts every key of the family to a common length `c` (the shortest key length
/// of the family, at most 64 bits) and hashes each cut key to two of 58 positions; the
/// summary has a bit set for each position that *no* key hashes to. A source whose cut
/// address hashes to a set bit is covered by no key of any length, live or not, so it can
/// be refused at once; any other source goes on to the probes. Sources are compared as
/// their top 64 bits (IPv4 in the top half), and `c` is stored as a shift:
/// `absent << 6 | (64 - c)`.
///
/// The summary only ever says "no key covers this source" when that is true of every key
/// in the region at the moment it is read, which is why the writer publishes the summary of
/// the old and new keys together before it inserts anything, and the new keys' summary only
/// after the removed keys are tombstoned. Zero says nothing (every source goes on to the
/// probes): regions written before summaries existed read as zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary(pub u64);

impl Summary {
    /// Says nothing: every source is probed.
    pub const UNKNOWN: Summary = Summary(0);
    /// No keys at all: every source is refused.
    pub const NO_KEYS: Summary = Summary(!Self::SHIFT_MASK);
    const SHIFT_MASK: u64 = 63;
    /// Bits above the six of the shift field.
    const POSITIONS: u64 = 58;

    /// False only if no key of the region covers the source whose top 64 bits are `top`
    /// (`seed` is the region's [`TableDesc::seed`]).
    #[inline(always)]
    pub const fn may_cover(self, seed: u64, top: u64) -> bool {
        let cut = top & (u64::MAX << (self.0 & Self::SHIFT_MASK));
        self.0 & summary_bits(seed, cut) == 0
    }

    /// The summary of one family's keys, given as (prefix length, [`top_bits`] of the key).
    pub fn of(seed: u64, keys: impl Iterator<Item = (u8, u64)> + Clone) -> Summary {
        let Some(shortest) = keys.clone().map(|(len, _)| len.min(64)).min() else {
            return Summary::NO_KEYS;
        };
        if shortest == 0 {
            // A /0 covers everything; a shift of 64 cannot be stored, and nothing is saved.
            return Summary::UNKNOWN;
        }
        let shift = 64 - shortest as u64;
        let present = keys.fold(0, |bits, (_, top)| bits | summary_bits(seed, top & (u64::MAX << shift)));
        Summary(!present & !Self::SHIFT_MASK | shift)
    }
}

/// The summary bits of a source or key cut to the summary's length: two positions (0..58),
/// one from each half of one multiply, each moved above the shift field. The key's halves
/// are folded together first, because a multiply only mixes bits upwards: without the fold
/// the low half of the product would not depend on an IPv4 address (the top half) at all.
#[inline(always)]
const fn summary_bits(seed: u64, cut: u64) -> u64 {
    let folded = cut ^ seed;
    let hash = (folded ^ (folded >> 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let first = ((hash >> 32) * Summary::POSITIONS) >> 32;
    let second = ((hash & 0xffff_ffff) * Summary::POSITIONS) >> 32;
    ((1 << first) | (1 << second)) << 6
}

/// The top 64 bits of an address as table key words give them (IPv4 in the top half).
#[inline(always)]
pub const fn top_bits(v4: bool, hi: u64, lo: u64) -> u64 {
    if v4 { lo << 32 } else { hi }
}

/// Probe lengths packed into one word, one byte each, [`NO_LENGTH`] for unused places.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedLengths(pub u64);

impl PackedLengths {
    pub const EMPTY: PackedLengths = PackedLengths(u64::MAX);

    #[inline(always)]
    pub const fn get(self, i: usize) -> u8 {
        (self.0 >> (i * 8)) as u8
    }

    /// Packs up to [`MAX_PROBE_LENGTHS`] lengths; `None` if there are more.
    pub fn pack(lengths: &[u8]) -> Option<Self> {
        if lengths.len() > MAX_PROBE_LENGTHS {
            return None;
        }
        let mut word = u64::MAX;
        for (i, &len) in lengths.iter().enumerate() {
            word &= !(0xffu64 << (i * 8));
            word |= (len as u64) << (i * 8);
        }
        Some(PackedLengths(word))
    }
}

/// The IPv4 address `addr` (host order) cut to `len` bits, as table key words.
#[inline(always)]
pub const fn v4_key(addr: u32, len: u8) -> (u64, u64) {
    let masked = if len == 0 {
        0
    } else if len >= 32 {
        addr
    } else {
        addr & !(u32::MAX >> len)
    };
    (0, masked as u64)
}

/// The IPv6 address `(hi, lo)` (host order halves) cut to `len` bits, as table key words.
#[inline(always)]
pub const fn v6_key(hi: u64, lo: u64, len: u8) -> (u64, u64) {
    if len == 0 {
        (0, 0)
    } else if len < 64 {
        (hi & !(u64::MAX >> len), 0)
    } else if len == 64 {
        (hi, 0)
    } else if len < 128 {
        (hi, lo & !(u64::MAX >> (len - 64)))
    } else {
        (hi, lo)
    }
}
