//! The ipaccess XDP program.
//!
//! For each frame: parse it, find the account bound to its destination, and pass it only if
//! that account is not suspended and some live allowlist entry or override covers the
//! source. Everything that could be decided ahead of time (placement in tables, prefix
//! lengths to try, account state) was decided by `ipaccessd` and sits in the maps.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_jiffies64, bpf_ktime_get_boot_ns},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use ipaccess_common::{
    AccountCounters, AccountRecord, AccountWord, BPF_F_MMAPABLE, Config, DEFAULT_ACCOUNTS, DEFAULT_SLOTS, DropReason,
    DropSample, FAMILY_V4, HostCounters, MAX_PROBE_LENGTHS, MAX_SET_GROUPS, NEVER_EXPIRES, NO_ACCOUNT, NO_LENGTH,
    PolicyMode, SAMPLES_BYTES, SampleBudget, Slot, SlotReader, TableDesc, Tag, lookup, lookup_at, read_family_lengths,
    read_summary, v4_key, v6_key,
};
use parse::{Frame, Packet, parse};

#[map(name = "IPACCESS_SLOTS")]
static SLOTS: Array<Slot> = Array::pinned(DEFAULT_SLOTS, BPF_F_MMAPABLE);

#[map(name = "IPACCESS_ACCOUNTS")]
static ACCOUNTS: Array<AccountRecord> = Array::pinned(DEFAULT_ACCOUNTS, BPF_F_MMAPABLE);

#[map(name = "IPACCESS_CONFIG")]
static CONFIG: Array<Config> = Array::pinned(1, BPF_F_MMAPABLE);

#[map(name = "IPACCESS_COUNTERS")]
static COUNTERS: PerCpuArray<AccountCounters> = PerCpuArray::pinned(DEFAULT_ACCOUNTS, 0);

#[map(name = "IPACCESS_HOST_COUNTERS")]
static HOST_COUNTERS: PerCpuArray<HostCounters> = PerCpuArray::pinned(1, 0);

#[map(name = "IPACCESS_SAMPLES")]
static SAMPLES: RingBuf = RingBuf::pinned(SAMPLES_BYTES, 0);

#[map(name = "IPACCESS_SAMPLE_BUDGET")]
static SAMPLE_BUDGET: PerCpuArray<SampleBudget> = PerCpuArray::pinned(1, 0);

/// Per slot of `SLOTS`, the config's clock when the allowlist key there last let a packet
/// through (see `stamp`).
#[map(name = "IPACCESS_LAST_USED")]
static LAST_USED: Array<u64> = Array::pinned(DEFAULT_SLOTS, BPF_F_MMAPABLE);

/// The tables of the set groups (see `sets_allow`), in two generations, and the generation
/// in use in word 0.
#[map(name = "IPACCESS_SET_GROUPS")]
static SET_GROUPS: Array<u64> = Array::pinned(2 * MAX_SET_GROUPS, BPF_F_MMAPABLE);

/// Per account slot, its set group (0: none).
#[map(name = "IPACCESS_ACCOUNT_SETS")]
static ACCOUNT_SETS: Array<u64> = Array::pinned(DEFAULT_ACCOUNTS, BPF_F_MMAPABLE);

/// Per CPU, the timer tick (jiffies) at which an empty sample budget was last checked
/// against the clock. Not pinned: it only saves clock reads, and a fresh one costs one.
#[map(name = "IPACCESS_SAMPLE_TICK")]
static SAMPLE_TICK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The slot array as the shared table code sees it.
struct Slots;

// SAFETY: `get_ptr` returns a pointer into the array map's value memory, which lives as long
// as the program, only for indices below `max_entries`; user space writes it word by word.
unsafe impl SlotReader for Slots {
    #[inline(always)]
    fn slot(&self, index: u32) -> Option<*const Slot> {
        SLOTS.get_ptr(index)
    }
}

#[inline(always)]
fn read<T: Copy>(value: &T) -> T {
    // SAFETY: a reference into a map value; volatile because user space rewrites it
    // concurrently through mmap.
    unsafe { core::ptr::read_volatile(value) }
}

#[xdp]
pub fn ipaccess_xdp(ctx: XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    match parse(&ctx) {
        Frame::NonIp => {
            count_host(|c| c.non_ip_packets += 1);
            XDP_PASS
        }
        Frame::Unreadable => {
            count_host(|c| c.malformed_packets += 1);
            XDP_DROP
        }
        Frame::Ip(packet) => decide_ip(&packet, bytes),
    }
}

/// What a decision needs besides the packet: read once per packet.
struct Context<'a> {
    packet: &'a Packet,
    bytes: u64,
    config: &'a Config,
}

#[inline(always)]
fn decide_ip(packet: &Packet, bytes: u64) -> u32 {
    let Some(config) = CONFIG.get(0) else {
        return XDP_PASS;
    };
    let cx = Context { packet, bytes, config };
    // One call of the account's decision, whichever binding found the account: the verifier
    // then walks the allowlist probes once, not once per way of reaching them.
    match bound_account(&cx) {
        Ok(word) => decide_account(word, &cx),
        Err(verdict) => verdict,
    }
}

/// The account word of the binding that owns the packet's destination: the exact (protocol,
/// port) first, then the whole address. `Err` holds the verdict for a packet that is no
/// account's business (passed) or cannot be decided (dropped), already counted.
#[inline(always)]
fn bound_account(cx: &Context) -> Result<AccountWord, u32> {
    let packet = cx.packet;
    let bindings = TableDesc(read(&cx.config.bindings));
    if !bindings.is_present() {
        count_host(|c| c.unbound_packets += 1);
        return Err(XDP_PASS);
    }
    let dst = packet.dst;
    if let (Some(port), false) = (packet.port, packet.malformed) {
        let tag = Tag::port_binding(packet.family, packet.protocol, port);
        if let Some(account) = lookup(&Slots, bindings, tag, dst.hi, dst.lo) {
            return Ok(AccountWord::from_bits(account));
        }
    }
    let Some(addr) = lookup(&Slots, bindings, Tag::address(packet.family), dst.hi, dst.lo) else {
        count_host(|c| c.unbound_packets += 1);
        return Err(XDP_PASS);
    };
    let addr = AccountWord::from_bits(addr);
    if packet.malformed {
        count_host(|c| c.malformed_packets += 1);
        sample(cx, addr.account(), DropReason::Malformed);
        return Err(XDP_DROP);
    }
    if packet.ndp {
        count_host(|c| c.ndp_packets += 1);
        return Err(XDP_PASS);
    }
    if addr.account() == NO_ACCOUNT {
        // Only some ports of this address are bound, and not this one.
        count_host(|c| c.unbound_packets += 1);
        return Err(XDP_PASS);
    }
    Ok(addr)
}

/// `word` is the binding's: account, mode, state and allowlist in one.
#[inline(always)]
fn decide_account(word: AccountWord, cx: &Context) -> u32 {
    let account = word.account();
    let policy = word.policy();
    let mode = policy.mode();
    let bytes = cx.bytes;
    if mode == PolicyMode::Unset {
        return drop(account, cx, DropReason::AccountUnset);
    }
    if policy.is_suspended() {
        return drop(account, cx, DropReason::Suspended);
    }
    if mode == PolicyMode::Off
        || source_allowed(Tag::allow(account, cx.packet.family, 0), word.table(), cx)
        || (word.has_sets() && sets_allow(account, cx))
    {
        count_account(account, |c| {
            c.passed_packets += 1;
            c.passed_bytes += bytes;
        });
        return XDP_PASS;
    }
    if mode == PolicyMode::Monitor {
        count_account(account, |c| {
            c.would_drop_packets += 1;
            c.would_drop_bytes += bytes;
            c.passed_packets += 1;
            c.passed_bytes += bytes;
        });
        sample(cx, account, DropReason::WouldDrop);
        return XDP_PASS;
    }
    drop(account, cx, DropReason::NotAllowed)
}

#[inline(always)]
fn drop(account: u32, cx: &Context, why: DropReason) -> u32 {
    count_account(account, |c| {
        c.dropped_packets += 1;
        c.dropped_bytes += cx.bytes;
    });
    sample(cx, account, why);
    XDP_DROP
}

/// Does a live entry of `table` cover the source? `owner` is the tag of the table's keys
/// with prefix length 0 (an account's allowlist, entries and overrides, or a shared set).
/// Every probe length is tried until a live entry is found, so an expired entry never hides
/// a live one at another length. The key that lets the packet through is stamped.
#[inline(always)]
fn source_allowed(owner: Tag, table: TableDesc, cx: &Context) -> bool {
    if !table.is_present() {
        return false;
    }
    let packet = cx.packet;
    let v4 = packet.family == FAMILY_V4;
    let mut now = 0;
    // The most specific length the account uses is probed first, before the summary: the
    // host length when it has host entries (a source allowed by its own address costs one
    // probe), otherwise its longest prefix (an office /24 of an account without host
    // entries costs one probe too, not a host miss and the summary first). The lengths are
    // in the header, which the binding's word locates, so its load does not wait for a probe.
    let Some(lengths) = read_family_lengths(&Slots, table, v4) else {
        return false;
    };
    let host_len = if v4 { 32 } else { 128 };
    let first = lengths.get(0);
    if first == NO_LENGTH {
        return false;
    }
    // A constant length for the host probe: its key needs no masking.
    let hit = if first == host_len {
        entry_live(owner, table, packet, host_len, &mut now)
    } else {
        entry_live(owner, table, packet, first, &mut now)
    };
    if let Some(index) = hit {
        stamp(index, cx);
        return true;
    }
    // The header's summary refuses most uncovered sources with no further probe.
    let Some(summary) = read_summary(&Slots, table, v4) else {
        return false;
    };
    if !summary.may_cover(table.seed(), packet.src.top(v4)) {
        return false;
    }
    for i in 1..MAX_PROBE_LENGTHS {
        let len = lengths.get(i);
        if len == NO_LENGTH {
            break;
        }
        if let Some(index) = entry_live(owner, table, packet, len, &mut now) {
            stamp(index, cx);
            return true;
        }
    }
    false
}

/// Does one of the account's shared sets cover the source? Only accounts whose binding word
/// says they reference sets come here, after their own allowlist missed. The daemon merges
/// the sets an account references into one table, its set group, shared by every account
/// that references the same sets; the group's table is found through the generation in use,
/// so the daemon changes a set in every group that holds it with one store.
#[inline(always)]
fn sets_allow(account: u32, cx: &Context) -> bool {
    let (Some(group), Some(generation)) = (ACCOUNT_SETS.get(account), SET_GROUPS.get(0)) else {
        return false;
    };
    let group = read(group) as u32 % MAX_SET_GROUPS;
    let Some(desc) = SET_GROUPS.get((read(generation) as u32 & 1) * MAX_SET_GROUPS + group) else {
        return false;
    };
    let table = TableDesc(read(desc));
    if !table.is_present() {
        return false;
    }
    // Set entries never expire, and a group is probed after the account's own allowlist
    // missed, so the summary comes first and no probe length is special.
    let packet = cx.packet;
    let v4 = packet.family == FAMILY_V4;
    let (Some(summary), Some(lengths)) = (read_summary(&Slots, table, v4), read_family_lengths(&Slots, table, v4))
    else {
        return false;
    };
    if !summary.may_cover(table.seed(), packet.src.top(v4)) {
        return false;
    }
    let owner = Tag::set_entry(group, packet.family, 0);
    for i in 0..MAX_PROBE_LENGTHS {
        let len = lengths.get(i);
        if len == NO_LENGTH {
            break;
        }
        let src = packet.src;
        let (hi, lo) = if v4 { v4_key(src.lo as u32, len) } else { v6_key(src.hi, src.lo, len) };
        if let Some((index, _)) = lookup_at(&Slots, table, owner.with_prefix_len(len), hi, lo) {
            stamp(index, cx);
            return true;
        }
    }
    false
}

/// The slot of a live entry for the source cut to `len` bits, if there is one. `owner` is
/// the keys' tag with prefix length 0; `now` is read at most once.
#[inline(always)]
fn entry_live(owner: Tag, table: TableDesc, packet: &Packet, len: u8, now: &mut u64) -> Option<u32> {
    let src = packet.src;
    let (hi, lo) = if packet.family == FAMILY_V4 { v4_key(src.lo as u32, len) } else { v6_key(src.hi, src.lo, len) };
    let (index, expires) = lookup_at(&Slots, table, owner.with_prefix_len(len), hi, lo)?;
    if expires == NEVER_EXPIRES {
        return Some(index);
    }
    if *now == 0 {
        // SAFETY: a plain helper call.
        *now = unsafe { bpf_ktime_get_boot_ns() };
    }
    (*now < expires).then_some(index)
}

/// Records that the key in slot `index` let a packet through: its stamp becomes the config's
/// clock, but only if it is older. So a busy key costs one load and a compare, and its stamp's
/// cache line is written (and taken from the other CPUs) at most once a second. CPUs that race
/// store the same clock, or one a second apart: either is right.
#[inline(always)]
fn stamp(index: u32, cx: &Context) {
    let clock = read(&cx.config.clock);
    if let Some(last) = LAST_USED.get_ptr_mut(index) {
        // SAFETY: a pointer into the array map's value memory; the daemon only reads it.
        unsafe {
            if core::ptr::read_volatile(last) < clock {
                core::ptr::write_volatile(last, clock);
            }
        }
    }
}

#[inline(always)]
fn count_account(account: u32, update: impl FnOnce(&mut AccountCounters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(account) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        update(unsafe { &mut *counters });
    }
}

#[inline(always)]
fn count_host(update: impl FnOnce(&mut HostCounters)) {
    if let Some(counters) = HOST_COUNTERS.get_ptr_mut(0) {
        // SAFETY: per-CPU value, as above.
        update(unsafe { &mut *counters });
    }
}

/// Sends a drop sample to user space, at most `samples_per_second` per CPU with bursts up
/// to `sample_burst`, so a flood costs the ring buffer nothing beyond the budget.
///
/// Under a flood the budget is empty on almost every drop, and reading the clock would then
/// cost as much as the rest of the drop path. So an empty budget is checked against the
/// clock only once per timer tick (jiffies, one load): a token that falls due is noticed at
/// the next tick at the latest, 1 to 10 ms late depending on the kernel's HZ. A rate of one
/// sample per ns or more is no limit at all.
#[inline(always)]
fn sample(cx: &Context, account: u32, why: DropReason) {
    const SECOND: u64 = 1_000_000_000;
    let (packet, config) = (cx.packet, cx.config);
    let rate = read(&config.samples_per_second);
    if rate == 0 {
        return;
    }
    let Some(budget) = SAMPLE_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU value, only this CPU writes it while the program runs.
    let budget = unsafe { &mut *budget };
    let limited = rate < SECOND;
    if limited && budget.tokens == 0 && !new_tick() {
        return;
    }
    // SAFETY: a plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    if limited {
        let interval = SECOND / rate;
        let earned = (now - budget.last_refill_ns) / interval;
        if earned > 0 {
            let burst = read(&config.sample_burst).max(1);
            budget.tokens = budget.tokens.saturating_add(earned).min(burst);
            budget.last_refill_ns = now;
        }
        if budget.tokens == 0 {
            return;
        }
        budget.tokens -= 1;
    }
    let Some(mut entry) = SAMPLES.reserve::<DropSample>(0) else {
        return;
    };
    entry.write(DropSample {
        time_ns: now,
        src_hi: packet.src.hi,
        src_lo: packet.src.lo,
        dst_hi: packet.dst.hi,
        dst_lo: packet.dst.lo,
        account,
        port: packet.port.unwrap_or(0),
        reason: why as u8,
        family: packet.family as u8,
        protocol: packet.protocol,
        _pad: [0; 7],
    });
    entry.submit(0);
}

/// Has the timer ticked since this CPU last asked? (See `sample`.)
#[inline(always)]
fn new_tick() -> bool {
    let Some(last) = SAMPLE_TICK.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU value, as above; a plain helper call.
    let (last, jiffies) = unsafe { (&mut *last, bpf_jiffies64()) };
    if *last == jiffies {
        return false;
    }
    *last = jiffies;
    true
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
