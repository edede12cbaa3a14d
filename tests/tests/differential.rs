//! The real XDP program, run by the kernel through BPF_PROG_TEST_RUN, against the plain-Rust
//! reference model (`ipaccess_tests::model`) on generated frames and random policies.
//!
//! Every round loads a new random policy into the same maps (so tables are changed in place,
//! grown, shrunk and rebuilt as a daemon would), then compares verdicts frame by frame and
//! the per-account counters at the end of the round. `IPACCESS_SEED=<n>` replays a run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use ipaccess::{
    datapath::{self, Datapath, DatapathOptions},
    protocol::Mode,
};
use ipaccess_common::AccountCounters;
use ipaccess_tests::{
    model::{self, ModelPolicy, Outcome, PolicyParams, Verdict},
    netns::BpfFs,
    packets::{AddressPool, PacketGen, truncations},
};
use rand::{Rng, SeedableRng, rngs::StdRng};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Account slots used by the random policies (they number accounts from 1).
const SLOTS_IN_USE: u32 = 64;

fn seed() -> u64 {
    match std::env::var("IPACCESS_SEED") {
        Ok(s) => s.parse().expect("IPACCESS_SEED must be a number"),
        Err(_) => rand::rng().random(),
    }
}

fn open(bpffs: &BpfFs) -> Datapath {
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 21, accounts: 1024 };
    Datapath::open(&options).expect("load the XDP program")
}

/// Makes the kernel maps say what `policy` says. An allowlist the daemon refuses (too many
/// keys after prefix expansion) is emptied in the model too, so both sides stay the same.
/// The bindings are written whole in some rounds, and address by address in others, as the
/// daemon's commands write them (in a few groups of addresses, chosen by `rng`).
fn apply(dp: &mut Datapath, policy: &mut ModelPolicy, rng: &mut StdRng) {
    for slot in 1..SLOTS_IN_USE {
        match policy.accounts.get_mut(&slot) {
            Some(account) => {
                let mode = match account.mode {
                    model::Mode::Off => Mode::Off,
                    model::Mode::Monitor => Mode::Monitor,
                    model::Mode::Enforce => Mode::Enforce,
                };
                dp.set_policy(slot, mode, account.suspended).unwrap();
                match dp.set_allowlist(slot, &account.entries) {
                    Err(datapath::DatapathError::Prefixes(refused)) => {
                        eprintln!("account {slot}: {refused}; using an empty list");
                        account.entries.clear();
                        dp.set_allowlist(slot, &[]).unwrap();
                    }
                    other => other.unwrap(),
                }
            }
            None => dp.remove_account(slot).unwrap(),
        }
    }
    let bindings: Vec<datapath::Binding> = policy
        .bindings
        .iter()
        .map(|b| datapath::Binding {
            addr: b.addr,
            target: match b.target {
                model::BindTarget::Port { protocol, port } => datapath::BindTarget::Port { protocol, port },
                model::BindTarget::WholeAddress => datapath::BindTarget::WholeAddress,
            },
            account: b.account,
        })
        .collect();
    if rng.random_bool(0.5) {
        dp.set_bindings(&bindings).unwrap();
    } else {
        let mut addrs: Vec<IpAddr> = dp.bindings().iter().chain(&bindings).map(|b| b.addr).collect();
        addrs.sort();
        addrs.dedup();
        let groups = rng.random_range(1..=4);
        for group in 0..groups {
            let at: BTreeSet<IpAddr> =
                addrs.iter().copied().filter(|_| rng.random_range(0..groups - group) == 0).collect();
            addrs.retain(|a| !at.contains(a));
            let wanted: Vec<datapath::Binding> = bindings.iter().copied().filter(|b| at.contains(&b.addr)).collect();
            dp.set_bindings_at(&at, &wanted).unwrap();
        }
        assert!(addrs.is_empty(), "every address written");
    }
    let mut wanted = bindings;
    wanted.sort();
    assert_eq!(dp.bindings(), wanted, "the kernel's bindings as the datapath knows them");
}

/// What the model says the counters of each account should have gained.
fn expect_counters(expected: &mut BTreeMap<u32, AccountCounters>, outcome: Outcome, bytes: u64) {
    let (account, passed, dropped, would_drop) = match outcome {
        Outcome::Passed { account } => (account, true, false, false),
        Outcome::WouldDrop { account } => (account, true, false, true),
        Outcome::Dropped { account, .. } => (account, false, true, false),
        _ => return,
    };
    let c = expected.entry(account).or_default();
    if passed {
        c.passed_packets += 1;
        c.passed_bytes += bytes;
    }
    if dropped {
        c.dropped_packets += 1;
        c.dropped_bytes += bytes;
    }
    if would_drop {
        c.would_drop_packets += 1;
        c.would_drop_bytes += bytes;
    }
}

struct Mismatch {
    round: usize,
    frame: Vec<u8>,
    model: Outcome,
    kernel: u32,
}

/// Runs `rounds` random policies with `frames` generated frames each; every `truncate_every`
/// frame is also cut at every byte offset. Returns the number of frames compared.
fn differential(seed: u64, params: &PolicyParams, rounds: usize, frames: usize, truncate_every: usize) -> usize {
    let bpffs = BpfFs::new().expect("mount a private bpffs");
    let mut dp = open(&bpffs);
    let mut rng = StdRng::seed_from_u64(seed);
    let now = datapath::boot_time_ns();
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for round in 0..rounds {
        let mut policy = model::random_policy(&mut rng, params, now);
        apply(&mut dp, &mut policy, &mut rng);
        let before: BTreeMap<u32, AccountCounters> =
            (1..SLOTS_IN_USE).map(|slot| (slot, dp.counters(slot).unwrap())).collect();
        let mut expected: BTreeMap<u32, AccountCounters> = BTreeMap::new();
        let mut packets = PacketGen::new(rng.random(), AddressPool::from_policy(&policy));
        for i in 0..frames {
            let frame = packets.frame();
            let mut check = |frame: Vec<u8>| {
                let model = model::decide(&policy, now, &frame);
                let run = dp.program().test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() });
                let kernel = run.expect("BPF_PROG_TEST_RUN").return_value;
                let wanted = if model.verdict() == Verdict::Pass { XDP_PASS } else { XDP_DROP };
                if kernel != wanted {
                    mismatches.push(Mismatch { round, frame: frame.clone(), model, kernel });
                }
                expect_counters(&mut expected, model, frame.len() as u64);
                compared += 1;
            };
            if i % truncate_every == 0 {
                truncations(&frame).for_each(&mut check);
            }
            check(frame);
        }
        report(&mismatches, compared, seed);
        for slot in 1..SLOTS_IN_USE {
            let after = dp.counters(slot).unwrap();
            let b = before[&slot];
            let gained = AccountCounters {
                passed_packets: after.passed_packets - b.passed_packets,
                passed_bytes: after.passed_bytes - b.passed_bytes,
                dropped_packets: after.dropped_packets - b.dropped_packets,
                dropped_bytes: after.dropped_bytes - b.dropped_bytes,
                would_drop_packets: after.would_drop_packets - b.would_drop_packets,
                would_drop_bytes: after.would_drop_bytes - b.would_drop_bytes,
            };
            let want = expected.get(&slot).copied().unwrap_or_default();
            assert_eq!(gained, want, "seed {seed} round {round}: counters of account {slot}");
        }
    }
    compared
}

fn report(mismatches: &[Mismatch], compared: usize, seed: u64) {
    if mismatches.is_empty() {
        return;
    }
    for m in mismatches.iter().take(10) {
        let hex: String = m.frame.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!("round {}: model {:?}, kernel returned {} for frame {hex}", m.round, m.model, m.kernel);
    }
    panic!("{} of {compared} frames disagree with the model; replay with IPACCESS_SEED={seed}", mismatches.len());
}

#[test]
fn kernel_agrees_with_model() {
    let seed = seed();
    eprintln!("IPACCESS_SEED={seed}");
    let compared = differential(seed, &PolicyParams::default(), 12, 6_000, 10);
    eprintln!("{compared} frames compared");
    assert!(compared >= 100_000, "only {compared} frames compared");
}

/// Allowlists with more distinct prefix lengths than the kernel probes, so the daemon has to
/// expand prefixes; the verdicts must not change.
#[test]
fn prefix_expansion_agrees_with_model() {
    let seed = seed();
    eprintln!("IPACCESS_SEED={seed}");
    let params = PolicyParams { max_prefix_lengths: 14, max_entries: 24, ..PolicyParams::default() };
    let compared = differential(seed, &params, 6, 3_000, 20);
    eprintln!("{compared} frames compared");
}
