//! Reference programs for `cargo xtask bench datapath`, built into their own object
//! (`ipaccess-bench`) so that the object ipaccessd loads and pins holds only the filter and
//! its maps. Nothing here shares a map with the filter: the benchmark loads this object
//! beside the daemon's and runs each program under BPF_PROG_TEST_RUN.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::{map, xdp},
    maps::HashMap,
    programs::XdpContext,
};

/// Returns at once: the benchmark's floor, measured in the same run as the real program so
/// that every figure can be given as a ratio to it.
#[xdp]
pub fn ipaccess_floor(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Benchmark calibration: one kernel hash-map lookup keyed by eight bytes of the frame, the
/// building block a conventional design would spend per decision step.
#[map(name = "IPACCESS_CALIBRATION")]
static CALIBRATION: HashMap<u64, u64> = HashMap::with_max_entries(1024, 0);

#[xdp]
pub fn ipaccess_calibration_hash(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 34 > ctx.data_end() {
        return XDP_PASS;
    }
    // SAFETY: bounds-checked just above.
    let key = unsafe { core::ptr::read_unaligned((start + 26) as *const u64) };
    // SAFETY: the value is only tested for presence.
    match unsafe { CALIBRATION.get(key) } {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
