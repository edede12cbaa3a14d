//! Map names and the records stored in them.

/// Directory under the bpffs mount where maps, program and links are pinned. The layout
/// version is part of the path so that an incompatible build never reuses old maps.
pub const PIN_SUBDIR: &str = "ipaccess/v1";

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "ipaccess_xdp";

/// The slot array holding every table (see `table`). `BPF_F_MMAPABLE`.
pub const MAP_SLOTS: &str = "IPACCESS_SLOTS";
/// Per-account records indexed by account slot, the daemon's own record of what it told the
/// kernel (the kernel reads the copies in the bindings). `BPF_F_MMAPABLE`.
pub const MAP_ACCOUNTS: &str = "IPACCESS_ACCOUNTS";
/// One [`Config`] record. `BPF_F_MMAPABLE`.
pub const MAP_CONFIG: &str = "IPACCESS_CONFIG";
/// Per-CPU [`AccountCounters`] indexed by account slot.
pub const MAP_COUNTERS: &str = "IPACCESS_COUNTERS";
/// Per-CPU [`HostCounters`] (one record) for traffic that belongs to no account.
pub const MAP_HOST_COUNTERS: &str = "IPACCESS_HOST_COUNTERS";
/// Ring buffer of [`DropSample`]s.
pub const MAP_SAMPLES: &str = "IPACCESS_SAMPLES";
/// Per-CPU token bucket limiting samples.
pub const MAP_SAMPLE_BUDGET: &str = "IPACCESS_SAMPLE_BUDGET";

/// Per slot of [`MAP_SLOTS`], a `u32`: the [`Config::clock`] at which the allowlist key in
/// that slot last let a packet through (0: not since the slot was last reused). Written by
/// the program only when older than the clock, so at most once a second per key.
/// `BPF_F_MMAPABLE`.
pub const MAP_LAST_USED: &str = "IPACCESS_LAST_USED";

/// The tables of the shared-set groups. An account that references shared sets has one
/// group: the union of the sets it references, stored once for every account that
/// references the same sets (see docs/datapath.md). Word 0 is the generation in use (0 or
/// 1); group `g` of generation `n` is word `n * MAX_SET_GROUPS + g`, a [`crate::TableDesc`].
/// The daemon writes a change's new group tables into the other generation, then switches
/// with one store of word 0. `BPF_F_MMAPABLE`.
pub const MAP_SET_GROUPS: &str = "IPACCESS_SET_GROUPS";
/// Per account slot, a `u64`: its set group (0: none). `BPF_F_MMAPABLE`.
pub const MAP_ACCOUNT_SETS: &str = "IPACCESS_ACCOUNT_SETS";

/// Set groups per generation; group ids run from 1 to `MAX_SET_GROUPS - 1`.
pub const MAX_SET_GROUPS: u32 = 1 << 12;
/// Shared set ids run from 1 to `MAX_SETS - 1` (0 is "no set").
pub const MAX_SETS: u32 = 1 << 12;
/// Shared sets one account may reference (its enabled references).
pub const MAX_SETS_PER_ACCOUNT: usize = 8;

/// `BPF_F_MMAPABLE` from the kernel UAPI.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Default capacities; the daemon can override them when it first creates the maps.
pub const DEFAULT_SLOTS: u32 = 1 << 20;
pub const DEFAULT_ACCOUNTS: u32 = 1 << 16;
pub const SAMPLES_BYTES: u32 = 1 << 20;

/// Account slot 0 is never assigned, so that 0 can mean "no account" in binding records.
pub const NO_ACCOUNT: u32 = 0;

/// What the kernel knows about one account; written by the daemon through `mmap`, each word
/// with one atomic store. Bindings carry it to the kernel as an [`AccountWord`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountRecord {
    /// A [`Policy`] word.
    pub policy: u64,
    /// [`crate::TableDesc`] of the account's allowlist (allowlist entries and overrides).
    pub table: u64,
}

/// The 8-byte words of an [`AccountRecord`], for writers that store one word at a time.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccountField {
    Policy = 0,
    Table = 1,
}

impl AccountField {
    /// Index of the word within the record.
    pub const fn word(self) -> usize {
        self as usize
    }
}

const _: () = {
    assert!(core::mem::offset_of!(AccountRecord, policy) == AccountField::Policy.word() * 8);
    assert!(core::mem::offset_of!(AccountRecord, table) == AccountField::Table.word() * 8);
};

/// An account's filtering mode as the kernel encodes it in a [`Policy`] (two bits).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyMode {
    /// A slot nobody configured: its bindings drop everything (fail closed).
    Unset = 0,
    /// No address check; only suspension applies.
    Off = 1,
    /// Disallowed sources pass but are counted and sampled as would-be drops.
    Monitor = 2,
    /// Disallowed sources are dropped.
    Enforce = 3,
}

/// The `policy` word of an [`AccountRecord`]: `suspended << 2 | mode`.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy(u64);

impl Policy {
    const MODE_MASK: u64 = 0x3;
    const SUSPENDED_BIT: u64 = 1 << 2;
    /// Every bit a policy uses.
    const MASK: u64 = Self::MODE_MASK | Self::SUSPENDED_BIT;
    /// A slot nobody configured (all zero, as a fresh map holds it).
    pub const UNSET: Policy = Policy(0);

    #[inline(always)]
    pub const fn new(mode: PolicyMode, suspended: bool) -> Self {
        Policy(mode as u64 | if suspended { Self::SUSPENDED_BIT } else { 0 })
    }

    #[inline(always)]
    pub const fn mode(self) -> PolicyMode {
        // Two bits, four modes: every value is one of them.
        match self.0 & Self::MODE_MASK {
            0 => PolicyMode::Unset,
            1 => PolicyMode::Off,
            2 => PolicyMode::Monitor,
            _ => PolicyMode::Enforce,
        }
    }

    /// Banned or terminated: every packet to the account's bindings is dropped.
    #[inline(always)]
    pub const fn is_suspended(self) -> bool {
        self.0 & Self::SUSPENDED_BIT != 0
    }

    /// The word as stored; bits a policy does not use are dropped.
    #[inline(always)]
    pub const fn from_bits(bits: u64) -> Self {
        Policy(bits & Self::MASK)
    }

    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        self.0
    }
}

/// The value of a binding (and of an address record) in the binding table: everything the
/// decision needs about the bound account, so that one probe of the binding table is the
/// only lookup before the allowlist. The daemon rewrites this word in each of an account's
/// bindings whenever the account's mode, state or allowlist table changes.
///
/// `has_sets << 62 | account << 38 | has_port_bindings << 37 | policy(mode, suspended) << 34 | table`, where
/// `table` is the allowlist's [`crate::TableDesc`] squeezed into 34 bits (present, log2 and a
/// 28-bit header index: the slot array has at most 2^28 slots).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountWord(u64);

impl AccountWord {
    const HEADER_MASK: u64 = (1 << 28) - 1;
    const LOG2_SHIFT: u32 = 28;
    const LOG2_MASK: u64 = 0x1f;
    const TABLE_PRESENT: u64 = 1 << 33;
    const POLICY_SHIFT: u32 = 34;
    const HAS_PORT_BINDINGS: u64 = 1 << 37;
    const ACCOUNT_SHIFT: u32 = 38;
    const HAS_SETS: u64 = 1 << 62;
    /// Largest account slot the word can carry.
    pub const MAX_ACCOUNT: u32 = (1 << 24) - 1;
    /// Largest slot array the word can address.
    pub const MAX_SLOTS: u32 = 1 << 28;
    /// No account, no table: an address record of an address only bound port by port.
    pub const NONE: AccountWord = AccountWord(0);

    /// The word of `account` (at most [`Self::MAX_ACCOUNT`]) with its policy and allowlist.
    #[inline(always)]
    pub const fn new(account: u32, policy: Policy, table: crate::TableDesc) -> Self {
        let table_bits = if table.is_present() {
            Self::TABLE_PRESENT
                | ((table.log2_slots() as u64 & Self::LOG2_MASK) << Self::LOG2_SHIFT)
                | (table.header() as u64 & Self::HEADER_MASK)
        } else {
            0
        };
        AccountWord(
            ((account & Self::MAX_ACCOUNT) as u64) << Self::ACCOUNT_SHIFT
                | policy.to_bits() << Self::POLICY_SHIFT
                | table_bits,
        )
    }

    /// The same word saying whether some (protocol, port) of the address is bound (address
    /// records only): packets to it that cannot be parsed far enough to find their port are
    /// then dropped rather than passed.
    #[inline(always)]
    pub const fn with_port_bindings(self, has: bool) -> Self {
        AccountWord(if has { self.0 | Self::HAS_PORT_BINDINGS } else { self.0 & !Self::HAS_PORT_BINDINGS })
    }

    #[inline(always)]
    pub const fn has_port_bindings(self) -> bool {
        self.0 & Self::HAS_PORT_BINDINGS != 0
    }

    /// The same word saying whether the account has a set group ([`MAP_ACCOUNT_SETS`]): only
    /// then does a source its own allowlist misses cost the program a look at its sets.
    #[inline(always)]
    pub const fn with_sets(self, has: bool) -> Self {
        AccountWord(if has { self.0 | Self::HAS_SETS } else { self.0 & !Self::HAS_SETS })
    }

    #[inline(always)]
    pub const fn has_sets(self) -> bool {
        self.0 & Self::HAS_SETS != 0
    }

    #[inline(always)]
    pub const fn account(self) -> u32 {
        (self.0 >> Self::ACCOUNT_SHIFT) as u32 & Self::MAX_ACCOUNT
    }

    /// The account's mode and suspension.
    #[inline(always)]
    pub const fn policy(self) -> Policy {
        Policy::from_bits(self.0 >> Self::POLICY_SHIFT)
    }

    #[inline(always)]
    pub const fn table(self) -> crate::TableDesc {
        if self.0 & Self::TABLE_PRESENT == 0 {
            crate::TableDesc::NONE
        } else {
            crate::TableDesc::new(
                (self.0 & Self::HEADER_MASK) as u32,
                ((self.0 >> Self::LOG2_SHIFT) & Self::LOG2_MASK) as u32,
            )
        }
    }

    /// The word as a table value.
    #[inline(always)]
    pub const fn from_bits(bits: u64) -> Self {
        AccountWord(bits)
    }

    #[inline(always)]
    pub const fn to_bits(self) -> u64 {
        self.0
    }
}

/// Global settings, one record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`crate::TableDesc`] of the binding table.
    pub bindings: u64,
    /// Drop samples each CPU may emit per second (0 disables sampling).
    pub samples_per_second: u64,
    /// Largest burst of samples per CPU.
    pub sample_burst: u64,
    /// A coarse clock the daemon ticks about once a second (`CLOCK_BOOTTIME` seconds; 0 while
    /// no daemon ticks it): the stamp an entry's key gets in [`MAP_LAST_USED`] when it lets a
    /// packet through. A word of the config, which every packet reads already, costs the
    /// program no clock read. (Once a word nobody used, so the pinned layout is unchanged.)
    pub clock: u64,
}

/// The 8-byte words of a [`Config`], for writers that store one word at a time.
#[repr(usize)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigField {
    Bindings = 0,
    SamplesPerSecond = 1,
    SampleBurst = 2,
    Clock = 3,
}

impl ConfigField {
    /// Index of the word within the record.
    pub const fn word(self) -> usize {
        self as usize
    }
}

const _: () = {
    assert!(core::mem::offset_of!(Config, bindings) == ConfigField::Bindings.word() * 8);
    assert!(core::mem::offset_of!(Config, samples_per_second) == ConfigField::SamplesPerSecond.word() * 8);
    assert!(core::mem::offset_of!(Config, sample_burst) == ConfigField::SampleBurst.word() * 8);
    assert!(core::mem::offset_of!(Config, clock) == ConfigField::Clock.word() * 8);
};

/// Per-account, per-CPU packet and byte counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountCounters {
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Monitor mode: packets that enforcement would have dropped (they passed).
    pub would_drop_packets: u64,
    pub would_drop_bytes: u64,
}

/// Per-CPU counters for traffic the filter passes or drops without an account.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCounters {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    pub non_ip_packets: u64,
    /// IP to a destination with no binding: passed.
    pub unbound_packets: u64,
    /// Neighbour discovery to a bound address: passed.
    pub ndp_packets: u64,
    /// Malformed or truncated IP that could not be shown to be unbound: dropped.
    pub malformed_packets: u64,
}

/// Why a packet was dropped (or would have been, in monitor mode), as [`DropSample::reason`]
/// carries it.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Enforce mode, and no live allowlist entry or override covers the source.
    NotAllowed = 1,
    /// Monitor mode: the packet passed, but enforcement would have dropped it.
    WouldDrop = 2,
    /// The account is banned or terminated.
    Suspended = 3,
    /// Bound destination, but the packet could not be parsed far enough to decide.
    Malformed = 4,
    /// The destination is bound to an account slot with no policy (fail closed).
    AccountUnset = 5,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::NotAllowed,
        DropReason::WouldDrop,
        DropReason::Suspended,
        DropReason::Malformed,
        DropReason::AccountUnset,
    ];

    /// The reason a byte from the kernel names; `None` for a byte no reason has (a kernel
    /// program of another build).
    pub const fn from_u8(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(DropReason::NotAllowed),
            2 => Some(DropReason::WouldDrop),
            3 => Some(DropReason::Suspended),
            4 => Some(DropReason::Malformed),
            5 => Some(DropReason::AccountUnset),
            _ => None,
        }
    }

    /// The name the activity log and the protocol use.
    pub const fn as_str(self) -> &'static str {
        match self {
            DropReason::NotAllowed => "address_not_allowed",
            DropReason::WouldDrop => "monitor_would_deny",
            DropReason::Suspended => "suspended",
            DropReason::Malformed => "malformed",
            DropReason::AccountUnset => "account_unset",
        }
    }
}

impl TryFrom<u8> for DropReason {
    /// The unknown byte.
    type Error = u8;

    fn try_from(byte: u8) -> Result<Self, u8> {
        DropReason::from_u8(byte).ok_or(byte)
    }
}

/// A sampled drop, sent to user space through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropSample {
    /// `CLOCK_BOOTTIME` in ns.
    pub time_ns: u64,
    /// Source and destination as host-order halves (IPv4 in the low 32 bits of `*_lo`).
    pub src_hi: u64,
    pub src_lo: u64,
    pub dst_hi: u64,
    pub dst_lo: u64,
    pub account: u32,
    /// Destination port, 0 if none was parsed.
    pub port: u16,
    pub reason: u8,
    /// [`crate::FAMILY_V4`] or [`crate::FAMILY_V6`].
    pub family: u8,
    pub protocol: u8,
    pub _pad: [u8; 7],
}

impl DropSample {
    /// The reason the kernel gave; `Err` with the byte if this build knows no such reason.
    pub const fn drop_reason(&self) -> Result<DropReason, u8> {
        match DropReason::from_u8(self.reason) {
            Some(reason) => Ok(reason),
            None => Err(self.reason),
        }
    }

    pub fn source(&self) -> core::net::IpAddr {
        crate::AddrWords { hi: self.src_hi, lo: self.src_lo }.to_ip(self.family as u64)
    }

    pub fn destination(&self) -> core::net::IpAddr {
        crate::AddrWords { hi: self.dst_hi, lo: self.dst_lo }.to_ip(self.family as u64)
    }
}

/// Per-CPU token bucket for [`DropSample`]s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SampleBudget {
    pub last_refill_ns: u64,
    pub tokens: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C) with no padding and only integer fields.
    unsafe impl aya::Pod for AccountRecord {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for AccountCounters {}
    unsafe impl aya::Pod for HostCounters {}
    unsafe impl aya::Pod for DropSample {}
    unsafe impl aya::Pod for SampleBudget {}
    unsafe impl aya::Pod for crate::Slot {}
}
