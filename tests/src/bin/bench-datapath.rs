//! `cargo xtask bench datapath`: ns/packet of the XDP program under BPF_PROG_TEST_RUN.
//!
//! For each policy size it loads the maps the way the daemon would, then times the real
//! program on prepared frames (unbound, bound and allowed, bound and dropped; IPv4 and IPv6;
//! and the drops again with drop samples on at the daemon's default rate, which is how a
//! refused flood meets a running `ipaccessd`) with the kernel repeating each frame `--repeat`
//! times. A program that returns at once
//! (`ipaccess_floor`) is measured in the same run, and every figure is also given as a ratio
//! to it: the ratio is what carries over between machines. The floor and the one-hash-lookup
//! reference come from the benchmark's own object (`ipaccess::datapath::BENCH_OBJECT`), not
//! from the object ipaccessd loads.
//!
//! The allowed cases are timed a second time with the filter built without its last-used
//! stamp (`ipaccess::datapath::BENCH_NO_STAMP_OBJECT`), loaded over the same pinned maps, so
//! the stamp's cost is a difference within one run; `--variant OBJECT` times another build of
//! the filter that way instead. A last part has the accounts reference one shared set of
//! 1,000 entries and times their packets, the set's update and its slots, beside a copy of
//! the set in each account's own allowlist.
//!
//! Before timing, two accounts of the same shape send a few seconds of real packets, one
//! from a host entry and one from its office /24, and the daemon's probe-order decision
//! (`Datapath::order_probes`) runs on the stamps they leave, as ipaccessd runs it each
//! second: the /24 rows then show what each account's own traffic made of its order.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use ipaccess::{
    datapath::{
        BENCH_NO_STAMP_OBJECT, BENCH_OBJECT, BindTarget, Binding, Datapath, DatapathOptions, order::ProbeOrder,
    },
    protocol::Mode,
};
use ipaccess_common::{NEVER_EXPIRES, PROGRAM_NAME};
use ipaccess_tests::{netns::BpfFs, packets};
use ipnet::IpNet;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

struct Args {
    repeat: u32,
    samples: usize,
    /// Only the smaller policy size.
    quick: bool,
    /// Another build of the filter (an object file) to time beside the real one in place of
    /// the build without stamps, over the same maps: how an experiment on the program is
    /// measured in the same run as the program it would replace.
    variant: Option<std::path::PathBuf>,
}

fn parse_args() -> Args {
    let mut args = Args { repeat: 1_000_000, samples: 5, quick: false, variant: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse().ok()).expect("flag needs a number");
        match arg.as_str() {
            "--repeat" => args.repeat = value() as u32,
            "--samples" => args.samples = value(),
            "--quick" => args.quick = true,
            "--variant" => args.variant = Some(it.next().expect("--variant needs an object file").into()),
            other => panic!("unknown argument {other} (use --repeat N, --samples N, --quick, --variant OBJECT)"),
        }
    }
    assert!(args.repeat >= 1_000_000, "the benchmark's contract is at least 1,000,000 repetitions");
    args
}

/// Destination address of account `i` (accounts are numbered from 1).
fn v4_dst(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i)
}

fn v6_dst(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128)
}

/// Ten entries an account, the mix a customer would have: six hosts and two /24 nets on
/// IPv4, one host and one /64 on IPv6. Sources are drawn from 198.18.0.0/15 and fd00::/8.
fn allowlist(i: u32) -> Vec<(IpNet, u64)> {
    let host = |n: u32| IpAddr::V4(Ipv4Addr::from(0xc613_0000u32 | ((i * 8 + n) & 0xffff)));
    let mut list: Vec<(IpNet, u64)> = (0..6).map(|n| (IpNet::from(host(n)), NEVER_EXPIRES)).collect();
    for n in 6..8 {
        let net = Ipv4Addr::from(0xc612_0000u32 | (((i * 2 + n) & 0xff) << 8));
        list.push((IpNet::new(net.into(), 24).unwrap(), NEVER_EXPIRES));
    }
    let v6 = 0xfd01_0000_0000_0000_0000_0000_0000_0000u128 | ((i as u128) << 64);
    list.push((IpNet::new(Ipv6Addr::from(v6 | 1).into(), 128).unwrap(), NEVER_EXPIRES));
    list.push((IpNet::new(Ipv6Addr::from(v6).into(), 64).unwrap(), NEVER_EXPIRES));
    list
}

/// A source of account `i` covered by its first /24 and by none of its hosts: the office
/// network, the common allowed case after a host entry.
fn prefix_source(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xc612_0000u32 | (((i * 2 + 6) & 0xff) << 8) | 77)
}

/// The account after the others has no host entries, only networks (an office and a branch).
fn office_allowlist() -> Vec<(IpNet, u64)> {
    ["198.51.100.0/24", "203.0.113.0/24", "2001:db8:1::/48"]
        .iter()
        .map(|n| (n.parse().unwrap(), NEVER_EXPIRES))
        .collect()
}

/// The allowed sources of account `i` (first v4 host, the v6 host).
fn allowed_sources(i: u32) -> (Ipv4Addr, Ipv6Addr) {
    let v4 = Ipv4Addr::from(0xc613_0000u32 | ((i * 8) & 0xffff));
    let v6 = Ipv6Addr::from(0xfd01_0000_0000_0000_0000_0000_0000_0000u128 | ((i as u128) << 64) | 1);
    (v4, v6)
}

/// One run of `repeat` repetitions, checking the verdict; ns/packet by two clocks:
/// wall-clock time of the whole syscall over the repetitions (how the issue's own figures
/// were taken), and the kernel's per-repetition average, which leaves out part of the test
/// loop and so reads lower for every program (a whole number of ns).
#[derive(Clone, Copy)]
struct Timing {
    wall: f64,
    kernel: f64,
}

fn measure(program: &Xdp, frame: &[u8], expect: u32, args: &Args) -> Timing {
    let started = Instant::now();
    let result = program
        .test_run(TestRunOptions { data_in: Some(frame), repeat: args.repeat, ..Default::default() })
        .expect("BPF_PROG_TEST_RUN");
    let wall = started.elapsed().as_nanos() as f64 / args.repeat as f64;
    assert_eq!(result.return_value, expect, "unexpected verdict while benchmarking");
    Timing { wall, kernel: result.duration.as_nanos() as f64 }
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: u32,
    /// Drop samples on at the daemon's default rate (otherwise off, as in the maps' initial
    /// state): a refused flood then also pays the sample budget's check on every packet.
    sampling: bool,
}

/// `ipaccessd`'s default `drop_samples_per_second`, and the burst it configures with it.
const DAEMON_SAMPLES_PER_SECOND: u64 = 10;
const DAEMON_SAMPLE_BURST: u64 = 10 * DAEMON_SAMPLES_PER_SECOND;

fn cases(accounts: u32) -> Vec<Case> {
    // An account in the middle, so nothing is special about its place in the tables.
    let i = accounts / 2;
    let j = office_account(accounts);
    let (ok4, ok6) = allowed_sources(i);
    let bad4 = Ipv4Addr::new(198, 19, 255, 254);
    let bad6: Ipv6Addr = "fd02::bad".parse().unwrap();
    let unbound4 = Ipv4Addr::new(198, 19, 255, 1);
    let unbound6: Ipv6Addr = "fd03::1".parse().unwrap();
    let case = |name, frame, expect, sampling| Case { name, frame, expect, sampling };
    vec![
        case("unbound pass, IPv4", packets::ipv4_tcp(bad4, unbound4, 40000, 443), XDP_PASS, false),
        case("unbound pass, IPv6", packets::ipv6_tcp(bad6, unbound6, 40000, 443), XDP_PASS, false),
        case("bound allowed, IPv4", packets::ipv4_tcp(ok4, v4_dst(i), 40000, 443), XDP_PASS, false),
        case("bound allowed, IPv6", packets::ipv6_tcp(ok6, v6_dst(i), 40000, 443), XDP_PASS, false),
        case(
            "bound allowed by a /24, account's traffic mostly to its hosts, IPv4",
            packets::ipv4_tcp(prefix_source(i), v4_dst(i), 40000, 443),
            XDP_PASS,
            false,
        ),
        case(
            "bound allowed by a /24, account's traffic through it (its order), IPv4",
            packets::ipv4_tcp(prefix_source(j), v4_dst(j), 40000, 443),
            XDP_PASS,
            false,
        ),
        case(
            "bound allowed by a host, that account (its /24 first), IPv4",
            packets::ipv4_tcp(allowed_sources(j).0, v4_dst(j), 40000, 443),
            XDP_PASS,
            false,
        ),
        case(
            "bound allowed by a /24, no host entries, IPv4",
            packets::ipv4_tcp(Ipv4Addr::new(198, 51, 100, 77), v4_dst(accounts + 1), 40000, 443),
            XDP_PASS,
            false,
        ),
        case("bound dropped, IPv4", packets::ipv4_tcp(bad4, v4_dst(i), 40000, 443), XDP_DROP, false),
        case("bound dropped, IPv6", packets::ipv6_tcp(bad6, v6_dst(i), 40000, 443), XDP_DROP, false),
        case("bound dropped, IPv4, samples on", packets::ipv4_tcp(bad4, v4_dst(i), 40000, 443), XDP_DROP, true),
        case("bound dropped, IPv6, samples on", packets::ipv6_tcp(bad6, v6_dst(i), 40000, 443), XDP_DROP, true),
    ]
}

/// What one policy size measured: the timed cases (the floor first), the time the maps took
/// to load, and for the shared set its report lines.
struct SizeRun {
    rows: Vec<(String, Timing)>,
    load_time: f64,
    notes: Vec<String>,
}

fn run_size(accounts: u32, args: &Args, shared: bool) -> SizeRun {
    let bpffs = BpfFs::new().expect("mount a private bpffs");
    let extra = if shared { COPY_SAMPLE } else { 0 };
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 23, accounts: accounts + 2 + extra };
    let mut dp = Datapath::open(&options).expect("load the XDP program");
    let started = Instant::now();
    let mut bindings = Vec::with_capacity(2 * accounts as usize);
    for i in 1..=accounts {
        dp.set_policy(i, Mode::Enforce, false).unwrap();
        dp.set_allowlist(i, &allowlist(i)).unwrap();
        let tcp443 = BindTarget::Port { protocol: 6, port: 443 };
        bindings.push(Binding { addr: v4_dst(i).into(), target: tcp443, account: i });
        bindings.push(Binding { addr: v6_dst(i).into(), target: tcp443, account: i });
    }
    let mut notes = Vec::new();
    let copies = if shared { Some(load_shared_set(&mut dp, accounts, &mut bindings, &mut notes)) } else { None };
    // One more account, without host entries: an office /24 and a branch /24.
    let office = accounts + 1;
    dp.set_policy(office, Mode::Enforce, false).unwrap();
    dp.set_allowlist(office, &office_allowlist()).unwrap();
    bindings.push(Binding {
        addr: v4_dst(office).into(),
        target: BindTarget::Port { protocol: 6, port: 443 },
        account: office,
    });
    dp.set_bindings(&bindings).unwrap();
    // The probe order the daemon's decision gives two accounts from their packets' stamps.
    let clock = if shared { 1 } else { learn_probe_order(&mut dp, accounts, &mut notes) };
    // A ticking clock, as under ipaccessd: an allowed packet pays for its key's last-used
    // stamp (its first packet writes it; the rest read it, as in the second after a tick).
    dp.set_clock(clock);
    let load_time = started.elapsed().as_secs_f64();
    let mut bench = Ebpf::load(BENCH_OBJECT).expect("load the benchmark's reference programs");
    for name in ["ipaccess_floor", "ipaccess_calibration_hash"] {
        let program: &mut Xdp = bench.program_mut(name).expect("in the bench object").try_into().unwrap();
        program.load().unwrap_or_else(|e| panic!("verifying {name}: {e}"));
    }
    // The reference program looks up a key the map holds: one kernel hash lookup that hits.
    let reference_frame = packets::ipv4_tcp(Ipv4Addr::new(198, 19, 0, 1), v4_dst(1), 40000, 443);
    let key = u64::from_ne_bytes(reference_frame[26..34].try_into().unwrap());
    let mut calibration: HashMap<_, u64, u64> =
        HashMap::try_from(bench.map_mut("IPACCESS_CALIBRATION").expect("in the bench object")).unwrap();
    calibration.insert(key, 1, 0).unwrap();

    let mut rows: Vec<(String, &Xdp, Vec<u8>, u32, bool)> = vec![
        (
            "floor (returns at once)".into(),
            bench_program(&bench, "ipaccess_floor"),
            reference_frame.clone(),
            XDP_PASS,
            false,
        ),
        (
            "one kernel hash lookup (reference)".into(),
            bench_program(&bench, "ipaccess_calibration_hash"),
            reference_frame,
            XDP_PASS,
            false,
        ),
    ];
    // The filter without stamps reads the very tables filled above: its pinned maps are
    // reused by name from the daemon's pin directory.
    let variant_bytes = args.variant.as_ref().map(|path| std::fs::read(path).expect("read the variant object"));
    let mut variant = EbpfLoader::new()
        .default_map_pin_directory(dp.pin_dir())
        .load(variant_bytes.as_deref().unwrap_or(BENCH_NO_STAMP_OBJECT))
        .expect("load the variant filter over the pinned maps");
    let program: &mut Xdp = variant.program_mut(PROGRAM_NAME).expect("in the object").try_into().unwrap();
    program.load().expect("verifying the variant filter");
    let variant: &Xdp = variant.program(PROGRAM_NAME).and_then(|p| p.try_into().ok()).expect("loaded above");
    let cases = match copies {
        Some(first_copy) => shared_cases(accounts, first_copy),
        None => cases(accounts),
    };
    for case in cases {
        // Without stamps only allowed packets differ; an experiment may change any bound case.
        // The shared-set run times the real filter alone.
        let allowed = case.expect == XDP_PASS && case.name.starts_with("bound allowed");
        if !shared && (allowed || (args.variant.is_some() && case.name.starts_with("bound"))) {
            let name = format!("{}{}", case.name, variant_suffix(args));
            rows.push((name, variant, case.frame.clone(), case.expect, case.sampling));
        }
        rows.push((case.name.into(), dp.program(), case.frame, case.expect, case.sampling));
    }
    // Rounds interleave the cases so that drift of the machine touches all of them alike;
    // each case keeps its fastest round, since noise on a shared machine only ever adds time.
    let mut best = vec![Timing { wall: f64::INFINITY, kernel: f64::INFINITY }; rows.len()];
    for _ in 0..args.samples {
        for (i, (_, program, frame, expect, sampling)) in rows.iter().enumerate() {
            let rate = if *sampling { DAEMON_SAMPLES_PER_SECOND } else { 0 };
            dp.set_sampling(rate, DAEMON_SAMPLE_BURST);
            let t = measure(program, frame, *expect, args);
            best[i] = Timing { wall: best[i].wall.min(t.wall), kernel: best[i].kernel.min(t.kernel) };
        }
    }
    let rows = rows.iter().zip(best).map(|((name, ..), t)| (name.clone(), t)).collect();
    if let Some(first_copy) = copies {
        time_set_changes(&mut dp, accounts, first_copy, &mut notes);
    }
    SizeRun { rows, load_time, notes }
}

/// The account whose traffic comes through its first /24 (the office), beside account
/// `accounts / 2`, whose traffic comes to its hosts: the same allowlist shape.
fn office_account(accounts: u32) -> u32 {
    accounts / 2 + 1
}

/// Runs what ipaccessd runs each second (`Datapath::order_probes` on the keys stamped since
/// the last tick) over real packets (BPF_PROG_TEST_RUN, one a second per account): account
/// `accounts / 2` sends from a host entry, [`office_account`] from its office /24. Returns
/// the clock to time with, once the decision has put the /24 first (bounded: 10 seconds).
fn learn_probe_order(dp: &mut Datapath, accounts: u32, notes: &mut Vec<String>) -> u64 {
    const V4: u64 = ipaccess_common::FAMILY_V4;
    let (hosts, office) = (accounts / 2, office_account(accounts));
    let frames = [
        packets::ipv4_tcp(allowed_sources(hosts).0, v4_dst(hosts), 40000, 443),
        packets::ipv4_tcp(prefix_source(office), v4_dst(office), 40000, 443),
    ];
    let mut order = ProbeOrder::new();
    for clock in 1..=10 {
        dp.set_clock(clock);
        for frame in &frames {
            let result = dp
                .program()
                .test_run(TestRunOptions { data_in: Some(frame), repeat: 1, ..Default::default() })
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!(result.return_value, XDP_PASS);
        }
        dp.set_clock(clock + 1);
        let used = dp.used_since(clock);
        dp.order_probes(&mut order, &used);
        if dp.probe_lengths(office, V4).first() == Some(&24) {
            assert_eq!(dp.probe_lengths(hosts, V4).first(), Some(&32), "hosts' traffic keeps hosts first");
            notes.push(format!(
                "probe order from the stamps of {clock} seconds of packets: account {office} (office /24) probes {:?}, \
                 account {hosts} (hosts) {:?}",
                dp.probe_lengths(office, V4),
                dp.probe_lengths(hosts, V4)
            ));
            return clock + 1;
        }
    }
    panic!("the decision did not put the office /24 first in 10 seconds");
}

/// The shared set's id (ids start at 1).
const SET: u32 = 1;
/// The shared set's size, and how many accounts hold a copy of it as their own entries: the
/// layout sets replace, measured on this sample and scaled to every account.
const SET_ENTRIES: u32 = 1_000;
const COPY_SAMPLE: u32 = 100;

/// A provider's ranges, as a shared set holds them: 600 IPv4 hosts, 300 IPv4 /24s and 100
/// IPv6 /48s, drawn from 100.64.0.0/10 and fd10::/16 (apart from the accounts' own entries),
/// plus `extra` more hosts (the set after a change).
fn shared_set(extra: u32) -> Vec<IpNet> {
    let v4 = |addr: u32, len| IpNet::new(Ipv4Addr::from(addr).into(), len).unwrap();
    let mut set: Vec<IpNet> = (0..600 + extra).map(|n| v4(0x6440_0000 + n + 1, 32)).collect();
    set.extend((0..300).map(|n| v4(0x6441_0000 + (n << 8), 24)));
    let v6 = |n: u32| Ipv6Addr::from(0xfd10_0000_0000_0000_0000_0000_0000_0000u128 | ((n as u128) << 80));
    set.extend((0..100).map(|n| IpNet::new(v6(n).into(), 48).unwrap()));
    assert_eq!(set.len() as u32, SET_ENTRIES + extra);
    set
}

/// A source in the set's `n`-th host entry and one in its `n`-th /24.
fn set_sources(n: u32) -> (Ipv4Addr, Ipv4Addr) {
    (Ipv4Addr::from(0x6440_0000 + n + 1), Ipv4Addr::from(0x6441_0000 + (n << 8) + 77))
}

/// Own entries plus a copy of the set: what an account would hold without shared sets.
fn copied_allowlist(i: u32, extra: u32) -> Vec<(IpNet, u64)> {
    let mut list = allowlist(i);
    list.extend(shared_set(extra).into_iter().map(|net| (net, NEVER_EXPIRES)));
    list
}

/// Makes every account reference one shared set and gives a sample of further accounts a
/// copy of it as their own entries (bound like the others), noting the slots each layout
/// takes. Returns the first copy account.
fn load_shared_set(dp: &mut Datapath, accounts: u32, bindings: &mut Vec<Binding>, notes: &mut Vec<String>) -> u32 {
    let (before, capacity) = dp.slot_usage();
    let started = Instant::now();
    dp.set_shared_set(SET, &shared_set(0)).unwrap();
    let created = started.elapsed();
    let (with_set, _) = dp.slot_usage();
    let started = Instant::now();
    for i in (1..=accounts).filter(|&i| i != without_sets(accounts)) {
        dp.set_account_sets(i, &[SET]).unwrap();
    }
    let referenced = started.elapsed();
    let (with_refs, _) = dp.slot_usage();
    let first_copy = accounts + 2;
    let started = Instant::now();
    for i in first_copy..first_copy + COPY_SAMPLE {
        dp.set_policy(i, Mode::Enforce, false).unwrap();
        dp.set_allowlist(i, &copied_allowlist(i, 0)).unwrap();
        let tcp443 = BindTarget::Port { protocol: 6, port: 443 };
        bindings.push(Binding { addr: v4_dst(i).into(), target: tcp443, account: i });
    }
    let copied = started.elapsed();
    let (with_copies, _) = dp.slot_usage();
    // The kernel holds a set in the table of each distinct combination of sets that accounts
    // reference, so it takes slots once the first account references it.
    let set_slots = with_refs - before;
    let own_slots = before as f64 / accounts as f64;
    let copy_slots = (with_copies - with_refs) as f64 / COPY_SAMPLE as f64;
    // A slot is 32 bytes in IPACCESS_SLOTS and 8 in IPACCESS_LAST_USED.
    let mib = |slots: f64| slots * 40.0 / (1 << 20) as f64;
    notes.push(format!(
        "own allowlists: {before} slots ({own_slots:.1} an account); the shared set ({SET_ENTRIES} entries) then \
         takes {set_slots} slots ({:.2} MiB with their stamps) for all the accounts that reference it (defined in \
         {:.2} ms, no slots until referenced; referenced by all the accounts in {:.1} ms; {} slots before that)",
        mib(set_slots as f64),
        created.as_secs_f64() * 1e3,
        referenced.as_secs_f64() * 1e3,
        with_set - before
    ));
    notes.push(format!(
        "a copy per account instead: {copy_slots:.0} slots an account for its own and the copied entries \
         (measured on {COPY_SAMPLE} accounts, loaded in {:.1} ms), so {accounts} accounts would take {:.0} slots \
         ({:.0} MiB) where the shared set takes {} ({:.1} MiB); the slot array here holds {capacity} ({:.0} MiB)",
        copied.as_secs_f64() * 1e3,
        copy_slots * accounts as f64,
        mib(copy_slots * accounts as f64),
        before + set_slots,
        mib((before + set_slots) as f64),
        mib(capacity as f64)
    ));
    first_copy
}

/// The one account that references no set in the shared-set run: the same run's baseline.
fn without_sets(accounts: u32) -> u32 {
    accounts / 2 + 1
}

/// The shared-set run's cases, all on accounts that reference the set or hold a copy.
fn shared_cases(accounts: u32, first_copy: u32) -> Vec<Case> {
    let i = accounts / 2;
    let (own4, _) = allowed_sources(i);
    let (set_host, set_net) = set_sources(SET_ENTRIES / 4);
    let bad4 = Ipv4Addr::new(198, 19, 255, 254);
    let copy = first_copy + COPY_SAMPLE / 2;
    let tcp = |src, dst| packets::ipv4_tcp(src, dst, 40000, 443);
    let case = |name, frame, expect| Case { name, frame, expect, sampling: false };
    vec![
        case("own host entry, account references the set", tcp(own4, v4_dst(i)), XDP_PASS),
        case("own /24, account references the set", tcp(prefix_source(i), v4_dst(i)), XDP_PASS),
        case("allowed by the set's host entry", tcp(set_host, v4_dst(i)), XDP_PASS),
        case("allowed by the set's /24", tcp(set_net, v4_dst(i)), XDP_PASS),
        case("refused, account references the set", tcp(bad4, v4_dst(i)), XDP_DROP),
        case("refused, account without sets (baseline)", tcp(bad4, v4_dst(without_sets(accounts))), XDP_DROP),
        case("copy: allowed by the copied host entry", tcp(set_host, v4_dst(copy)), XDP_PASS),
        case("copy: allowed by the copied /24", tcp(set_net, v4_dst(copy)), XDP_PASS),
        case("copy: refused", tcp(bad4, v4_dst(copy)), XDP_DROP),
    ]
}

/// A change of the set (one entry added, then removed again, five times each), against the
/// copy layout's equivalent: rewriting every copy, timed on the sample and scaled.
fn time_set_changes(dp: &mut Datapath, accounts: u32, first_copy: u32, notes: &mut Vec<String>) {
    let mut changes = Vec::new();
    for round in 0..10 {
        let started = Instant::now();
        dp.set_shared_set(SET, &shared_set(1 - round % 2)).unwrap();
        changes.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let adds: Vec<String> = changes.iter().step_by(2).map(|ms| format!("{ms:.2}")).collect();
    notes.push(format!("set changed (1,001 entries) in {} ms; back to 1,000 between", adds.join(", ")));
    let started = Instant::now();
    for i in first_copy..first_copy + COPY_SAMPLE {
        dp.set_allowlist(i, &copied_allowlist(i, 1)).unwrap();
    }
    let sample = started.elapsed().as_secs_f64();
    notes.push(format!(
        "the same change to copies: {COPY_SAMPLE} allowlists rewritten in {:.1} ms ({:.2} ms each), so {accounts} \
         would take about {:.1} s",
        sample * 1e3,
        sample * 1e3 / COPY_SAMPLE as f64,
        sample * accounts as f64 / COPY_SAMPLE as f64
    ));
}

/// Appended to a case's name for its run of the variant filter.
fn variant_suffix(args: &Args) -> &'static str {
    if args.variant.is_some() { ", variant" } else { ", without the stamp" }
}

/// Each case the variant ran, side by side with the real filter from the same run, and the
/// difference in ns and in multiples of the floor: without `--variant`, what the last-used
/// stamp costs.
fn print_variant_cost(rows: &[(String, Timing)], args: &Args) {
    let floor = rows[0].1;
    let suffix = variant_suffix(args);
    println!();
    if args.variant.is_some() {
        println!("The real filter against the variant (same run, same maps):");
        println!();
        println!("| case | clock | real filter | variant | difference | x floor |");
    } else {
        println!("What the last-used stamp costs an allowed packet (same run, same maps):");
        println!();
        println!("| case | clock | with stamp | without | difference | x floor |");
    }
    println!("|---|---|---:|---:|---:|---:|");
    for (name, with) in rows {
        let Some((_, without)) = rows.iter().find(|(n, _)| *n == format!("{name}{suffix}")) else {
            continue;
        };
        for (clock, with, without, floor) in
            [("wall", with.wall, without.wall, floor.wall), ("kernel", with.kernel, without.kernel, floor.kernel)]
        {
            let diff = with - without;
            println!("| {name} | {clock} | {with:.1} | {without:.1} | {diff:+.1} | {:+.2}x |", diff / floor);
        }
    }
}

fn bench_program<'a>(bench: &'a Ebpf, name: &str) -> &'a Xdp {
    bench.program(name).and_then(|p| p.try_into().ok()).expect("loaded above")
}

fn main() {
    let args = parse_args();
    println!("# ipaccess datapath benchmark");
    println!();
    println!(
        "BPF_PROG_TEST_RUN, {} repetitions per run, fastest of {} interleaved runs; x = ratio to the floor \
         measured the same way.",
        args.repeat, args.samples
    );
    let sizes = [
        ("10,000 accounts x 10 entries (100,000 entries)", 10_000),
        ("100,000 accounts x 10 entries (1,000,000 entries)", 100_000),
    ];
    let shared =
        ("10,000 accounts x 10 entries, all but one also referencing one shared set of 1,000 entries", 10_000, true);
    let sizes = sizes.into_iter().map(|(label, accounts)| (label, accounts, false));
    for (label, accounts, shared) in sizes.take(if args.quick { 1 } else { 2 }).chain([shared]) {
        let SizeRun { rows, load_time, notes } = run_size(accounts, &args, shared);
        println!();
        println!("## {label}");
        println!();
        println!("maps loaded in {load_time:.2} s");
        if !notes.is_empty() {
            println!();
        }
        for note in &notes {
            println!("- {note}");
        }
        println!();
        println!("| case | wall ns/packet | x floor | kernel ns/packet | x floor |");
        println!("|---|---:|---:|---:|---:|");
        let floor = rows[0].1;
        for (name, t) in &rows {
            println!(
                "| {name} | {:.1} | {:.2}x | {:.0} | {:.2}x |",
                t.wall,
                t.wall / floor.wall,
                t.kernel,
                t.kernel / floor.kernel
            );
        }
        if !shared {
            print_variant_cost(&rows, &args);
        }
    }
}
