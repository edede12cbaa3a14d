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
    /// See [`Policy`].
    pub policy: u64,
    /// [`crate::TableDesc`] of the account's allowlist (allowlist entries and overrides).
    pub table: u64,
}

/// The `policy` word of an [`AccountRecord`].
pub struct Policy;

impl Policy {
    pub const MODE_MASK: u64 = 0x3;
    /// A slot nobody configured: its bindings drop everything (fail closed).
    pub const MODE_UNSET: u64 = 0;
    /// No address check; only suspension applies.
    pub const MODE_OFF: u64 = 1;
    /// Disallowed sources pass but are counted and sampled as would-be drops.
    pub const MODE_MONITOR: u64 = 2;
    /// Disallowed sources are dropped.
    pub const MODE_ENFORCE: u64 = 3;
    /// Banned or terminated: every packet to the account's bindings is dropped.
    pub const SUSPENDED_BIT: u64 = 1 << 2;

    pub const fn word(mode: u64, suspended: bool) -> u64 {
        (mode & Self::MODE_MASK) | if suspended { Self::SUSPENDED_BIT } else { 0 }
    }
}

/// The value of a binding (and of an address record) in the binding table: everything the
/// decision needs about the bound account, so that one probe of the binding table is the
/// only lookup before the allowlist. The daemon rewrites this word in each of an account's
/// bindings whenever the account's mode, state or allowlist table changes.
///
/// `account << 38 | has_port_bindings << 37 | policy(mode, suspended) << 34 | table`, where
/// `table` is the allowlist's [`crate::TableDesc`] squeezed into 34 bits (present, log2 and a
/// 28-bit header index: the slot array has at most 2^28 slots).
pub struct AccountWord;

impl AccountWord {
    const HEADER_MASK: u64 = (1 << 28) - 1;
    const POLICY_SHIFT: u32 = 34;
    /// Address records only: some (protocol, port) of this address is bound, so packets to
    /// it that cannot be parsed far enough to find their port are dropped rather than passed.
    pub const HAS_PORT_BINDINGS: u64 = 1 << 37;
    const ACCOUNT_SHIFT: u32 = 38;
    /// Largest account slot the word can carry.
    pub const MAX_ACCOUNT: u32 = (1 << 24) - 1;
    /// Largest slot array the word can address.
    pub const MAX_SLOTS: u32 = 1 << 28;

    pub const fn encode(account: u32, policy: u64, table: crate::TableDesc) -> u64 {
        let table_bits = if table.is_present() {
            (1 << 33) | ((table.log2_slots() as u64) << 28) | (table.header() as u64 & Self::HEADER_MASK)
        } else {
            0
        };
        ((account as u64) << Self::ACCOUNT_SHIFT)
            | ((policy & (Policy::MODE_MASK | Policy::SUSPENDED_BIT)) << Self::POLICY_SHIFT)
            | table_bits
    }

    #[inline(always)]
    pub const fn account(word: u64) -> u32 {
        (word >> Self::ACCOUNT_SHIFT) as u32 & Self::MAX_ACCOUNT
    }

    /// The account's policy in [`Policy`] form (mode and suspension).
    #[inline(always)]
    pub const fn policy(word: u64) -> u64 {
        (word >> Self::POLICY_SHIFT) & (Policy::MODE_MASK | Policy::SUSPENDED_BIT)
    }

    #[inline(always)]
    pub const fn table(word: u64) -> crate::TableDesc {
        if word & (1 << 33) == 0 {
            crate::TableDesc::NONE
        } else {
            crate::TableDesc::new((word & Self::HEADER_MASK) as u32, ((word >> 28) & 0x1f) as u32)
        }
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
    pub reserved: u64,
}

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

/// Why a packet was dropped (or would have been, in monitor mode).
pub mod reason {
    pub const NOT_ALLOWED: u8 = 1;
    pub const WOULD_DROP: u8 = 2;
    pub const SUSPENDED: u8 = 3;
    pub const MALFORMED: u8 = 4;
    pub const ACCOUNT_UNSET: u8 = 5;
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
