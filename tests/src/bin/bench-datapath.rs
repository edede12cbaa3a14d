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
//! the stamp's cost is a difference within one run.

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
    datapath::{BENCH_NO_STAMP_OBJECT, BENCH_OBJECT, BindTarget, Binding, Datapath, DatapathOptions},
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
            "bound allowed by a /24, IPv4",
            packets::ipv4_tcp(prefix_source(i), v4_dst(i), 40000, 443),
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

fn run_size(accounts: u32, args: &Args) -> (Vec<(String, Timing)>, f64) {
    let bpffs = BpfFs::new().expect("mount a private bpffs");
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 23, accounts: accounts + 2 };
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
    // A ticking clock, as under ipaccessd: an allowed packet pays for its key's last-used
    // stamp (its first packet writes it; the rest read it, as in the second after a tick).
    dp.set_clock(1);
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
    for case in cases(accounts) {
        // Without stamps only allowed packets differ; an experiment may change any bound case.
        let allowed = case.expect == XDP_PASS && case.name.starts_with("bound allowed");
        if allowed || (args.variant.is_some() && case.name.starts_with("bound")) {
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
    (rows.iter().zip(best).map(|((name, ..), t)| (name.clone(), t)).collect(), load_time)
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
    for (label, accounts) in sizes.into_iter().take(if args.quick { 1 } else { 2 }) {
        let (rows, load_time) = run_size(accounts, &args);
        println!();
        println!("## {label}");
        println!();
        println!("maps loaded in {load_time:.2} s");
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
        print_variant_cost(&rows, &args);
    }
}
