//! The table writer's in-place change against the real program in the real kernel: packets
//! run (BPF_PROG_TEST_RUN) on one thread while another thread flips an allowlist in place
//! between two lists that both cover the source. None may drop. (The writer's order of
//! steps is asserted by the daemon's unit tests; this checks it holds against the kernel.)

use std::{
    net::Ipv4Addr,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use ipaccess::{
    datapath::{BindTarget, Binding, Datapath, DatapathOptions, order::ProbeOrder},
    protocol::Mode,
};
use ipaccess_common::NEVER_EXPIRES;
use ipaccess_tests::{netns::BpfFs, packets, testrun::run_xdp_once};
use ipnet::IpNet;

const XDP_PASS: u32 = 2;
const ACCOUNT: u32 = 7;
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const SOURCE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const FLIPPING: Duration = Duration::from_secs(3);

/// One BPF_PROG_TEST_RUN of `frame`; the program's verdict. (aya's
/// `test_run` needs the `Xdp`, which the flipping thread's `Datapath` holds mutably.)
fn test_run(prog: &OwnedFd, frame: &[u8]) -> u32 {
    run_xdp_once(prog.as_fd(), frame)
}

fn list(cidrs: &[&str]) -> Vec<(IpNet, u64)> {
    cidrs.iter().map(|c| (c.parse().unwrap(), NEVER_EXPIRES)).collect()
}

/// Runs the program over each of `frames` (sources covered throughout) again and again on
/// one thread while `change` is made again and again on this one, for [`FLIPPING`] (and a
/// bounded count). Every run must pass. Returns the rounds (one run of each frame) and the
/// changes made.
fn run_while_changing(
    prog: &OwnedFd,
    frames: &[&[u8]],
    dp: &mut Datapath,
    mut change: impl FnMut(&mut Datapath, usize),
) -> (u64, usize) {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let runner = scope.spawn(|| {
            let mut rounds = 0u64;
            while !done.load(Ordering::Relaxed) && rounds < 50_000_000 {
                // One run per call, so every verdict is seen (with `repeat` the kernel returns
                // the last run's only, and each such call costs milliseconds, not one).
                for frame in frames {
                    assert_eq!(test_run(prog, frame), XDP_PASS, "a covered source dropped after {rounds} rounds");
                }
                rounds += 1;
            }
            rounds
        });
        let started = Instant::now();
        let mut changes = 0usize;
        while started.elapsed() < FLIPPING && !runner.is_finished() && changes < 10_000_000 {
            changes += 1;
            change(dp, changes);
        }
        done.store(true, Ordering::Relaxed);
        (runner.join().unwrap(), changes)
    })
}

/// The source is covered by a /24 in one list and a /16 in the other, so every flip adds a
/// probe length and tombstones the key at the other: the case where a packet that read
/// the old lengths must not meet the old key's tombstone. A host entry of another address
/// is in both, untouched.
#[test]
fn flipping_an_allowlist_in_place_drops_no_packet_it_covers_throughout() {
    flip_in_place_and_count(&["198.18.0.0/24", "198.18.5.5/32"], &["198.18.0.0/16", "198.18.5.5/32"]);
}

/// The same with a /24 of another network in both lists: the flip to the source's /24 adds
/// no probe length, so a packet that missed the new /24 just before it went live must not
/// then meet the /16's tombstone.
#[test]
fn replacing_a_key_at_a_length_in_use_drops_no_packet_it_covers_throughout() {
    flip_in_place_and_count(&["198.18.9.0/24", "198.18.0.0/16"], &["198.18.9.0/24", "198.18.0.0/24"]);
}

/// Flips the account's allowlist in place between `a` and `b` (both cover [`SOURCE`]) while
/// packets from it run; every run must pass and be counted.
fn flip_in_place_and_count(a: &[&str], b: &[&str]) {
    let bpffs = BpfFs::new().unwrap();
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 12, accounts: 64 };
    let mut dp = Datapath::open(&options).expect("load the XDP program");
    let target = BindTarget::Port { protocol: 6, port: 443 };
    dp.set_bindings(&[Binding { addr: SERVER.into(), target, account: ACCOUNT }]).unwrap();
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    let lists = [list(a), list(b)];
    dp.set_allowlist(ACCOUNT, &lists[0]).unwrap();

    let frame = packets::ipv4_tcp(SOURCE, SERVER, 40000, 443);
    let refused = packets::ipv4_tcp(Ipv4Addr::new(198, 19, 0, 10), SERVER, 40000, 443);
    let prog = dp.program().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
    assert_eq!(test_run(&prog, &frame), XDP_PASS);
    assert_ne!(test_run(&prog, &refused), XDP_PASS, "the test can see a drop");
    let before = dp.counters(ACCOUNT).unwrap();

    let (runs, flips) =
        run_while_changing(&prog, &[&frame], &mut dp, |dp, flip| dp.set_allowlist(ACCOUNT, &lists[flip % 2]).unwrap());

    // Every run is counted: none dropped, none missing.
    let after = dp.counters(ACCOUNT).unwrap();
    assert_eq!(after.dropped_packets, before.dropped_packets, "{runs} runs during {flips} flips");
    assert_eq!(after.passed_packets - before.passed_packets, runs, "{flips} flips");
    assert!(flips > 100 && runs > 100_000, "too little happened: {flips} flips, {runs} runs");
    println!("{runs} runs of the program during {flips} in-place flips");
}

/// A shared set changed while packets flow: two accounts reference it (one of them with a
/// second set, so in another set group), the source is covered by the set before and after
/// every change (a /24, then a /16), and each change republishes both groups' tables with
/// one generation switch. No run of either account may drop.
#[test]
fn changing_a_shared_set_drops_no_packet_it_covers_in_any_account() {
    const OTHER: u32 = 8;
    const OTHER_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    let bpffs = BpfFs::new().unwrap();
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 12, accounts: 64 };
    let mut dp = Datapath::open(&options).expect("load the XDP program");
    let target = BindTarget::Port { protocol: 6, port: 443 };
    dp.set_bindings(&[
        Binding { addr: SERVER.into(), target, account: ACCOUNT },
        Binding { addr: OTHER_SERVER.into(), target, account: OTHER },
    ])
    .unwrap();
    let nets = |cidrs: &[&str]| -> Vec<IpNet> { cidrs.iter().map(|c| c.parse().unwrap()).collect() };
    let versions = [nets(&["198.18.0.0/24", "198.18.5.5/32"]), nets(&["198.18.0.0/16"])];
    dp.set_shared_set(1, &versions[0]).unwrap();
    dp.set_shared_set(2, &nets(&["198.18.9.9/32"])).unwrap();
    for (slot, sets) in [(ACCOUNT, &[1][..]), (OTHER, &[1, 2][..])] {
        dp.set_policy(slot, Mode::Enforce, false).unwrap();
        dp.set_account_sets(slot, sets).unwrap();
    }

    let frames = [SERVER, OTHER_SERVER].map(|server| packets::ipv4_tcp(SOURCE, server, 40000, 443));
    let refused = packets::ipv4_tcp(Ipv4Addr::new(198, 19, 0, 10), SERVER, 40000, 443);
    let prog = dp.program().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
    for frame in &frames {
        assert_eq!(test_run(&prog, frame), XDP_PASS);
    }
    assert_ne!(test_run(&prog, &refused), XDP_PASS, "the test can see a drop");
    let before = [ACCOUNT, OTHER].map(|slot| dp.counters(slot).unwrap());

    let (runs, changes) = run_while_changing(&prog, &[&frames[0], &frames[1]], &mut dp, |dp, change| {
        dp.set_shared_set(1, &versions[change % 2]).unwrap()
    });

    for (slot, before) in [ACCOUNT, OTHER].into_iter().zip(before) {
        let after = dp.counters(slot).unwrap();
        assert_eq!(after.dropped_packets, before.dropped_packets, "account {slot}: {runs} runs, {changes} changes");
        assert_eq!(after.passed_packets - before.passed_packets, runs, "account {slot}");
    }
    assert!(changes > 100 && runs > 10_000, "too little happened: {changes} changes, {runs} runs");
    println!("{runs} runs of each account during {changes} changes of the set");
}

/// The probe order follows the traffic, in the real kernel: packets (BPF_PROG_TEST_RUN) from
/// an account's office /24 stamp its key, each "second" the stamps go to the decision the
/// daemon runs (`Datapath::order_probes`), and within a few seconds the /24 is probed
/// first; a later change of the allowlist keeps it first. Then the order is flipped between
/// the /24 and the hosts, and the allowlist changed in place, again and again while packets
/// from a host and from the /24 (covered by both orders) run: none may drop.
#[test]
fn traffic_through_a_24_puts_it_first_and_flipping_the_order_drops_nothing() {
    const V4: u64 = ipaccess_common::FAMILY_V4;
    let bpffs = BpfFs::new().unwrap();
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 12, accounts: 64 };
    let mut dp = Datapath::open(&options).expect("load the XDP program");
    let target = BindTarget::Port { protocol: 6, port: 443 };
    dp.set_bindings(&[Binding { addr: SERVER.into(), target, account: ACCOUNT }]).unwrap();
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    let hosts = ["198.18.5.5/32", "198.18.5.6/32", "198.18.5.7/32"];
    let base = [hosts.as_slice(), &["198.18.0.0/24"]].concat();
    dp.set_allowlist(ACCOUNT, &list(&base)).unwrap();
    assert_eq!(dp.probe_lengths(ACCOUNT, V4), [32, 24], "the most specific first by default");

    let office = packets::ipv4_tcp(SOURCE, SERVER, 40000, 443);
    let host = packets::ipv4_tcp(Ipv4Addr::new(198, 18, 5, 6), SERVER, 40000, 443);
    let prog = dp.program().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
    // A second at a time, as ipaccessd's scan: packets stamp their keys with the clock, the
    // clock ticks, the keys stamped since the last tick go to the decision.
    let mut order = ProbeOrder::new();
    let mut moved_after = None;
    for clock in 1..=10 {
        dp.set_clock(clock);
        for _ in 0..3 {
            assert_eq!(test_run(&prog, &office), XDP_PASS);
        }
        dp.set_clock(clock + 1);
        let used = dp.used_since(clock);
        assert!(used.iter().any(|u| u.key.to_string() == "198.18.0.0/24"), "the /24's stamp: {used:?}");
        dp.order_probes(&mut order, &used);
        if dp.probe_lengths(ACCOUNT, V4)[0] == 24 {
            moved_after = Some(clock);
            break;
        }
    }
    let seconds = moved_after.expect("the /24 never went first");
    assert!(seconds <= 5, "after {seconds} seconds");
    assert_eq!(dp.probe_lengths(ACCOUNT, V4), [24, 32]);
    // A change in place (a host added) and one that adds a length both keep it first.
    dp.set_allowlist(ACCOUNT, &list(&[base.as_slice(), &["198.18.5.8/32"]].concat())).unwrap();
    assert_eq!(dp.probe_lengths(ACCOUNT, V4), [24, 32]);
    dp.set_allowlist(ACCOUNT, &list(&[base.as_slice(), &["198.19.0.0/16"]].concat())).unwrap();
    assert_eq!(dp.probe_lengths(ACCOUNT, V4), [24, 32, 16]);
    assert_eq!(test_run(&prog, &office), XDP_PASS);
    assert_eq!(test_run(&prog, &host), XDP_PASS);

    // Flipping: the order between the /24 and the hosts, and the list between one with a
    // /16 elsewhere and one with another host (a length added and removed, with its grace
    // wait), both covering the two sources.
    let lists =
        [list(&[base.as_slice(), &["198.19.0.0/16"]].concat()), list(&[base.as_slice(), &["198.18.5.9/32"]].concat())];
    let before = dp.counters(ACCOUNT).unwrap();
    let (rounds, flips) = run_while_changing(&prog, &[&office, &host], &mut dp, |dp, flip| {
        assert!(dp.put_first(ACCOUNT, V4, if flip.is_multiple_of(2) { 24 } else { 32 }).unwrap(), "flip {flip}");
        if flip.is_multiple_of(16) {
            dp.set_allowlist(ACCOUNT, &lists[(flip / 16) % 2]).unwrap();
        }
    });
    // Both sources are the account's: two packets a round.
    let runs = rounds * 2;
    let after = dp.counters(ACCOUNT).unwrap();
    assert_eq!(after.dropped_packets, before.dropped_packets, "{runs} runs during {flips} flips");
    assert_eq!(after.passed_packets - before.passed_packets, runs, "{flips} flips");
    assert!(flips > 1000 && runs > 100_000, "too little happened: {flips} flips, {runs} runs");
    println!("{runs} runs of the program during {flips} flips of the order");
}

/// Bindings changed a few addresses at a time, as `bind add`, `bind remove` and `account
/// remove` change them (`Datapath::set_bindings_at`, which rewrites only those addresses'
/// keys in place): after every change, a packet to each endpoint of a small pool (bound
/// ports, an unbound port, the whole address; IPv4 and IPv6) is counted by exactly the
/// account that owns it now, or by none. Random, with `IPACCESS_SEED=<n>` to replay.
#[test]
fn bindings_changed_address_by_address_send_every_packet_to_its_owner() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::IpAddr;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    const ACCOUNTS: u32 = 4;
    let seed = std::env::var("IPACCESS_SEED").map_or_else(|_| rand::rng().random(), |s| s.parse().unwrap());
    println!("IPACCESS_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let bpffs = BpfFs::new().unwrap();
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 12, accounts: 64 };
    let mut dp = Datapath::open(&options).expect("load the XDP program");
    for slot in 1..=ACCOUNTS {
        dp.set_policy(slot, Mode::Off, false).unwrap();
    }
    let pool: Vec<IpAddr> = ["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4", "fd00::1", "fd00::2"]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let targets = [
        BindTarget::Port { protocol: 6, port: 443 },
        BindTarget::Port { protocol: 6, port: 444 },
        BindTarget::Port { protocol: 17, port: 53 },
        BindTarget::WholeAddress,
    ];
    // What a packet to (address, protocol, port) finds, probed for every endpoint above and
    // one port nobody binds.
    let probes = [(6u8, 443u16), (6, 444), (17, 53), (6, 445)];
    let mut truth: BTreeMap<(IpAddr, BindTarget), u32> = BTreeMap::new();
    let prog = dp.program().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
    let counted =
        |dp: &Datapath| -> Vec<u64> { (1..=ACCOUNTS).map(|s| dp.counters(s).unwrap().passed_packets).collect() };
    let mut in_place_steps = 0;
    for step in 0..300 {
        let mut at = BTreeSet::new();
        for _ in 0..rng.random_range(1..=2) {
            at.insert(pool[rng.random_range(0..pool.len())]);
        }
        truth.retain(|(addr, _), _| !at.contains(addr));
        for &addr in &at {
            for target in targets {
                if rng.random_bool(0.4) {
                    truth.insert((addr, target), rng.random_range(1..=ACCOUNTS));
                }
            }
        }
        let wanted: Vec<Binding> = truth
            .iter()
            .filter(|((addr, _), _)| at.contains(addr))
            .map(|(&(addr, target), &account)| Binding { addr, target, account })
            .collect();
        let table_before = dp.bindings_table();
        dp.set_bindings_at(&at, &wanted).unwrap();
        in_place_steps += usize::from(table_before.is_present() && dp.bindings_table() == table_before);
        let all: Vec<Binding> =
            truth.iter().map(|(&(addr, target), &account)| Binding { addr, target, account }).collect();
        assert_eq!(dp.bindings(), all, "seed {seed}, step {step}");
        for &addr in &pool {
            for (protocol, port) in probes {
                let owner = truth
                    .get(&(addr, BindTarget::Port { protocol, port }))
                    .or_else(|| truth.get(&(addr, BindTarget::WholeAddress)));
                let src: IpAddr = if addr.is_ipv4() { SOURCE.into() } else { "fd00::99".parse().unwrap() };
                let frame = if protocol == 6 {
                    packets::tcp(src, addr, 40000, port)
                } else {
                    packets::udp(src, addr, 40000, port)
                };
                let before = counted(&dp);
                assert_eq!(test_run(&prog, &frame), XDP_PASS);
                let gained: Vec<u64> = counted(&dp).iter().zip(&before).map(|(a, b)| a - b).collect();
                let expected: Vec<u64> = (1..=ACCOUNTS).map(|s| u64::from(owner == Some(&s))).collect();
                assert_eq!(gained, expected, "seed {seed}, step {step}: {addr} {protocol}/{port}, owner {owner:?}");
            }
        }
    }
    println!("{in_place_steps} of 300 changes made key by key in place");
    assert!(in_place_steps > 100, "seed {seed}: only {in_place_steps} changes in place");
}

/// One endpoint keeps its owner while the bindings around it change key by key in place:
/// the owner holds it now through its port, now through the whole address; another port of
/// the address, the whole address and another address are bound to another account and
/// unbound again. The new key must be findable before the old one goes, so no packet to
/// the endpoint may be dropped, or counted to anyone but its owner.
#[test]
fn an_endpoint_bound_throughout_loses_no_packet_while_its_neighbours_change() {
    const OTHER: u32 = 8;
    let bpffs = BpfFs::new().unwrap();
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 12, accounts: 64 };
    let mut dp = Datapath::open(&options).expect("load the XDP program");
    let https = BindTarget::Port { protocol: 6, port: 443 };
    let kept = Binding { addr: SERVER.into(), target: https, account: ACCOUNT };
    let neighbour: std::net::IpAddr = Ipv4Addr::new(198, 18, 0, 2).into();
    // Bindings elsewhere, so that the table is big enough for tombstones to be rare.
    let elsewhere =
        (1..=40).map(|i| Binding { addr: Ipv4Addr::new(198, 18, 1, i).into(), target: https, account: OTHER });
    let first: Vec<Binding> =
        [kept, Binding { addr: neighbour, target: https, account: OTHER }].into_iter().chain(elsewhere).collect();
    dp.set_bindings(&first).unwrap();
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_allowlist(ACCOUNT, &list(&["198.18.0.0/24"])).unwrap();
    dp.set_policy(OTHER, Mode::Enforce, false).unwrap();
    let frame = packets::ipv4_tcp(SOURCE, SERVER, 40000, 443);
    let prog = dp.program().fd().unwrap().as_fd().try_clone_to_owned().unwrap();
    assert_eq!(test_run(&prog, &frame), XDP_PASS);
    let before = [ACCOUNT, OTHER].map(|slot| dp.counters(slot).unwrap());
    let whole = |account| Binding { addr: SERVER.into(), target: BindTarget::WholeAddress, account };
    let http = Binding { addr: SERVER.into(), target: BindTarget::Port { protocol: 6, port: 80 }, account: OTHER };
    let variants = [vec![kept, http], vec![whole(ACCOUNT)], vec![kept, whole(OTHER)], vec![whole(ACCOUNT), http]];
    let at = std::collections::BTreeSet::from([SERVER.into(), neighbour]);
    let mut in_place = 0;
    let (runs, changes) = run_while_changing(&prog, &[&frame], &mut dp, |dp, change| {
        let mut wanted = variants[change % variants.len()].clone();
        if change % 2 == 0 {
            wanted.push(Binding { addr: neighbour, target: https, account: OTHER });
        }
        let table = dp.bindings_table();
        dp.set_bindings_at(&at, &wanted).unwrap();
        in_place += usize::from(dp.bindings_table() == table);
    });
    // Tombstones fill the table now and then, and it is rebuilt: most changes are in place.
    assert!(in_place * 10 > changes * 9, "{in_place} of {changes} changes in place");
    let after = [ACCOUNT, OTHER].map(|slot| dp.counters(slot).unwrap());
    assert_eq!(after[0].dropped_packets, before[0].dropped_packets, "{runs} runs during {changes} changes");
    assert_eq!(after[0].passed_packets - before[0].passed_packets, runs, "{changes} changes");
    assert_eq!(after[1], before[1], "nothing reached the other account");
    assert!(changes > 100 && runs > 100_000, "too little happened: {changes} changes, {runs} runs");
    println!("{runs} runs of the program during {changes} changes of the bindings around it, {in_place} in place");
}
