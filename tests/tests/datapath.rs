//! Loader and program behaviour beyond verdicts: drop samples and their rate limit, the
//! XDP modes (native, generic, the fallback between them, as the kernel reports them), state
//! kept across a restart, one writer per pin directory, and verification (loads the kernel cut
//! short, and the headroom under its limit).

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use ipaccess::{
    datapath::{Attachment, BindTarget, Binding, Datapath, DatapathError, DatapathOptions, XdpMode, netlink::XdpPath},
    protocol::Mode,
};
use ipaccess_common::{DropReason, DropSample, FAMILY_V4, NEVER_EXPIRES};
use ipaccess_tests::{
    netns::{BpfFs, Netns, TestHosts},
    packets,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ACCOUNT: u32 = 7;
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const REFUSED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 99);

/// Test-size maps in `bpffs`.
fn options(bpffs: &BpfFs) -> DatapathOptions {
    DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 12, accounts: 64 }
}

fn open(bpffs: &BpfFs) -> Datapath {
    Datapath::open(&options(bpffs)).expect("load the XDP program")
}

/// Account 7 owns TCP 443 on 198.18.0.1 and allows 198.18.0.10 only.
fn configure(dp: &mut Datapath, mode: Mode, suspended: bool) {
    let target = BindTarget::Port { protocol: 6, port: 443 };
    dp.set_bindings(&[Binding { addr: SERVER.into(), target, account: ACCOUNT }]).unwrap();
    dp.set_policy(ACCOUNT, mode, suspended).unwrap();
    dp.set_allowlist(ACCOUNT, &[(IpAddr::V4(ALLOWED).into(), NEVER_EXPIRES)]).unwrap();
}

fn run(dp: &Datapath, frame: &[u8]) -> u32 {
    let options = TestRunOptions { data_in: Some(frame), ..Default::default() };
    dp.program().test_run(options).expect("BPF_PROG_TEST_RUN").return_value
}

/// Keeps the calling thread on one CPU: samples are budgeted per CPU.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t with one bit set, for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0);
    }
}

#[test]
fn drop_samples_describe_the_packet_and_respect_the_budget() {
    pin_to_one_cpu();
    let bpffs = BpfFs::new().unwrap();
    let mut dp = open(&bpffs);
    configure(&mut dp, Mode::Enforce, false);
    let refused = packets::ipv4_tcp(REFUSED, SERVER, 40000, 443);

    // Sampling is off until configured.
    assert_eq!(run(&dp, &refused), XDP_DROP);
    assert!(dp.drain_samples(100).is_empty(), "no samples while sampling is off");

    // One sample a second with bursts of five: fifty drops in a moment give five samples.
    dp.set_sampling(1, 5);
    for _ in 0..50 {
        assert_eq!(run(&dp, &refused), XDP_DROP);
    }
    let samples = dp.drain_samples(100);
    assert_eq!(samples.len(), 5, "the burst caps the samples: {samples:?}");
    let s: DropSample = samples[0];
    assert_eq!(
        (s.account, s.drop_reason(), s.family, s.protocol, s.port),
        (ACCOUNT, Ok(DropReason::NotAllowed), FAMILY_V4 as u8, 6, 443)
    );
    assert_eq!(s.src_lo as u32, u32::from(REFUSED));
    assert_eq!(s.dst_lo as u32, u32::from(SERVER));
    assert!(s.time_ns > 0 && s.time_ns <= ipaccess::datapath::boot_time_ns());

    // Allowed traffic is never sampled; after the budget refills, other reasons are.
    assert_eq!(run(&dp, &packets::ipv4_tcp(ALLOWED, SERVER, 40000, 443)), XDP_PASS);
    dp.set_sampling(1_000_000_000, 5);
    configure(&mut dp, Mode::Monitor, false);
    assert_eq!(run(&dp, &refused), XDP_PASS, "monitor mode passes");
    configure(&mut dp, Mode::Enforce, true);
    assert_eq!(run(&dp, &packets::ipv4_tcp(ALLOWED, SERVER, 40000, 443)), XDP_DROP, "suspended drops");
    let reasons: Vec<_> = dp.drain_samples(100).iter().map(DropSample::drop_reason).collect();
    assert_eq!(reasons, vec![Ok(DropReason::WouldDrop), Ok(DropReason::Suspended)]);
}

#[test]
fn xdp_mode_on_an_interface_without_driver_support() {
    // Loopback has no driver-level XDP.
    let ns = Netns::new("ipagen").unwrap();
    ns.ip(&["link", "set", "lo", "up"]).unwrap();
    let bpffs = BpfFs::new().unwrap();
    let mut dp = open(&bpffs);
    ns.run(move || {
        let native = dp.attach("lo", XdpMode::Native);
        assert!(
            matches!(&native, Err(e @ DatapathError::NoNativeXdp { .. }) if e.to_string().contains("xdp_mode = \"auto\"")),
            "native only must be refused on lo: {native:?}"
        );
        assert_eq!(dp.attachments(), [], "a refused attach leaves nothing behind");

        for mode in [XdpMode::Auto, XdpMode::Generic] {
            let attachment = dp.attach("lo", mode).expect("attach");
            assert_eq!(attachment, Attachment { path: XdpPath::Generic, reused: false }, "{mode:?}");
            assert_eq!(dp.attachments(), [("lo".to_string(), Some(XdpPath::Generic))], "as the kernel reports it");
            assert!(dp.detach("lo").unwrap());
            assert_eq!(dp.attachments(), []);
        }
    });
}

/// An interface deleted and created again (a bond or VLAN re-made by the network setup)
/// leaves a pinned link that filters nothing: attaching again must notice and attach afresh.
#[test]
fn a_recreated_interface_is_attached_afresh() {
    let ns = Netns::new("ipastale").unwrap();
    let add = || ns.ip(&["link", "add", "ipastale0", "type", "veth", "peer", "name", "ipastale1"]).unwrap();
    add();
    let bpffs = BpfFs::new().unwrap();
    let mut dp = open(&bpffs);
    ns.run(|| {
        assert_eq!(dp.attach("ipastale0", XdpMode::Auto).unwrap(), Attachment { path: XdpPath::Native, reused: false });
    });
    drop(dp);
    ns.ip(&["link", "del", "ipastale0"]).unwrap();
    add();
    let mut dp = open(&bpffs);
    ns.run(move || {
        assert_eq!(dp.attachments(), [("ipastale0".to_string(), None)], "the stale pin shows as attaching nothing");
        assert_eq!(dp.attach("ipastale0", XdpMode::Auto).unwrap(), Attachment { path: XdpPath::Native, reused: false });
        assert_eq!(dp.attachments(), [("ipastale0".to_string(), Some(XdpPath::Native))]);
        assert!(dp.detach("ipastale0").unwrap());
    });
}

/// A veth has native XDP: each mode gets the path it asks for, and a restarted loader keeps
/// the path the pinned link has rather than detaching to change it.
#[test]
fn xdp_mode_on_an_interface_with_driver_support() {
    let hosts = TestHosts::new().unwrap();
    let iface = hosts.server_if.clone();
    let bpffs = BpfFs::new().unwrap();
    hosts.server.run(|| {
        let mut dp = open(&bpffs);
        let kernel_says = || ipaccess::datapath::netlink::xdp_path(&iface).unwrap();
        assert_eq!(kernel_says(), None);
        assert_eq!(dp.attach(&iface, XdpMode::Generic).unwrap(), Attachment { path: XdpPath::Generic, reused: false });
        assert_eq!(kernel_says(), Some(XdpPath::Generic));

        // A new loader asking for native finds the generic link and keeps it as it is.
        drop(dp);
        let mut dp = open(&bpffs);
        assert_eq!(dp.attach(&iface, XdpMode::Native).unwrap(), Attachment { path: XdpPath::Generic, reused: true });
        assert_eq!(kernel_says(), Some(XdpPath::Generic));

        assert!(dp.detach(&iface).unwrap());
        assert_eq!(kernel_says(), None);
        for mode in [XdpMode::Native, XdpMode::Auto] {
            assert_eq!(
                dp.attach(&iface, mode).unwrap(),
                Attachment { path: XdpPath::Native, reused: false },
                "{mode:?}"
            );
            assert_eq!(dp.attachments(), [(iface.clone(), Some(XdpPath::Native))]);
            assert!(dp.detach(&iface).unwrap());
        }
    });
}

/// Replacing a /24 with a /16 in place both adds a prefix length and removes a key: the
/// removal waits until no packet can still be probing with the old lengths
/// (docs/datapath.md, "Changing an allowlist without a gap"); the result decides right.
#[test]
fn in_place_change_gives_readers_time_before_removing() {
    let bpffs = BpfFs::new().unwrap();
    let mut dp = open(&bpffs);
    configure(&mut dp, Mode::Enforce, false);
    let net = |s: &str| (s.parse::<ipnet::IpNet>().unwrap(), NEVER_EXPIRES);
    dp.set_allowlist(ACCOUNT, &[net("198.18.0.0/24")]).unwrap();
    let started = Instant::now();
    dp.set_allowlist(ACCOUNT, &[net("198.18.0.0/16")]).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1), "removed without a grace period");
    assert_eq!(run(&dp, &packets::ipv4_tcp(Ipv4Addr::new(198, 18, 7, 7), SERVER, 40000, 443)), XDP_PASS);
    assert_eq!(run(&dp, &packets::ipv4_tcp(Ipv4Addr::new(198, 19, 7, 7), SERVER, 40000, 443)), XDP_DROP);
}

#[test]
fn state_survives_a_restart_and_one_writer_holds_the_pins() {
    let bpffs = BpfFs::new().unwrap();
    let mut dp = open(&bpffs);
    configure(&mut dp, Mode::Enforce, false);
    let second = Datapath::open(&options(&bpffs));
    assert!(
        matches!(&second, Err(e) if e.to_string().contains("in use by another ipaccessd")),
        "a second writer must be refused"
    );
    let bindings = dp.bindings();
    drop(dp);

    let dp = open(&bpffs);
    assert_eq!(dp.bindings(), bindings, "bindings are read back from the pinned maps");
    assert_eq!(run(&dp, &packets::ipv4_tcp(ALLOWED, SERVER, 40000, 443)), XDP_PASS);
    assert_eq!(run(&dp, &packets::ipv4_tcp(REFUSED, SERVER, 40000, 443)), XDP_DROP);
}

/// Last-used evidence: the key that lets a packet through gets the config's clock in its
/// stamp, the host key for a host and the /24's key for a source only the /24 covers; a
/// stamp that is not older than the clock is left alone (no store on a busy key's every
/// packet); a refused packet and a stopped clock stamp nothing.
#[test]
fn an_allowed_packet_stamps_its_key_once_per_clock_tick() {
    use aya::maps::{Array, Map, MapData};
    use ipaccess::datapath::{KeyOwner, LastUse};

    let bpffs = BpfFs::new().unwrap();
    let mut dp = open(&bpffs);
    configure(&mut dp, Mode::Enforce, false);
    let office: ipnet::IpNet = "198.18.1.0/24".parse().unwrap();
    dp.set_allowlist(ACCOUNT, &[(IpAddr::V4(ALLOWED).into(), NEVER_EXPIRES), (office, NEVER_EXPIRES)]).unwrap();
    let host = packets::ipv4_tcp(ALLOWED, SERVER, 40000, 443);
    let in_office = packets::ipv4_tcp(Ipv4Addr::new(198, 18, 1, 77), SERVER, 40000, 443);
    let refused = packets::ipv4_tcp(REFUSED, SERVER, 40000, 443);

    // No daemon ticks the clock: nothing is stamped.
    assert_eq!(run(&dp, &host), XDP_PASS);
    assert!(dp.used_since(0).is_empty(), "stamped without a clock: {:?}", dp.used_since(0));

    dp.set_clock(100);
    assert_eq!(run(&dp, &refused), XDP_DROP);
    assert!(dp.used_since(0).is_empty(), "a refused packet stamped a key");
    assert_eq!(run(&dp, &host), XDP_PASS);
    let used = dp.used_since(0);
    let host_key: ipnet::IpNet = IpAddr::V4(ALLOWED).into();
    assert_eq!(
        used.iter().map(|u| (u.owner, u.key, u.clock)).collect::<Vec<_>>(),
        [(KeyOwner::Account(ACCOUNT), host_key, 100)]
    );
    let LastUse { index, .. } = used[0];

    // Another CPU stamped the key a tick later (written here through the pinned map): a
    // packet at the older clock must not store its clock over it.
    let pin = dp.pin_dir().join(ipaccess_common::MAP_LAST_USED);
    let mut stamps: Array<MapData, u64> = Array::try_from(Map::Array(MapData::from_pin(&pin).unwrap())).unwrap();
    stamps.set(index, 101, 0).unwrap();
    for _ in 0..3 {
        assert_eq!(run(&dp, &host), XDP_PASS);
    }
    assert_eq!(stamps.get(&index, 0).unwrap(), 101, "a stamp newer than the clock was written over");

    // The next tick: the first packet moves the stamp; the office's key gets its own.
    dp.set_clock(102);
    assert_eq!(run(&dp, &host), XDP_PASS);
    assert_eq!(run(&dp, &in_office), XDP_PASS);
    let mut used: Vec<_> = dp.used_since(102).into_iter().map(|u| (u.key, u.clock)).collect();
    used.sort();
    assert_eq!(used, [(host_key, 102), (office, 102)]);
    assert!(dp.used_since(103).is_empty(), "used_since returns only stamps from its clock on");
}

/// A second account, bound like [`ACCOUNT`] to TCP 443 of its own address.
const OTHER: u32 = 8;
const OTHER_SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

/// A datapath with [`ACCOUNT`] at [`SERVER`] and [`OTHER`] at [`OTHER_SERVER`], both
/// enforcing and allowing nothing yet.
fn two_enforcing_accounts(bpffs: &BpfFs) -> Datapath {
    let mut dp = open(bpffs);
    let target = BindTarget::Port { protocol: 6, port: 443 };
    dp.set_bindings(&[
        Binding { addr: SERVER.into(), target, account: ACCOUNT },
        Binding { addr: OTHER_SERVER.into(), target, account: OTHER },
    ])
    .unwrap();
    for slot in [ACCOUNT, OTHER] {
        dp.set_policy(slot, Mode::Enforce, false).unwrap();
    }
    dp
}

/// Shared sets in the kernel: two accounts reference one set and share its table; a change
/// of the set reaches both, also where one of them unites it with a second set; a reference
/// dropped for one account shuts out only that one; a set's key is stamped as its group's;
/// and a restarted daemon's datapath enforces the sets until they are given again, then
/// frees the groups it found.
#[test]
fn shared_sets_let_in_every_account_that_references_them_and_change_for_all() {
    use ipaccess::datapath::KeyOwner;
    let bpffs = BpfFs::new().unwrap();
    let mut dp = two_enforcing_accounts(&bpffs);
    dp.set_allowlist(ACCOUNT, &[(IpAddr::V4(ALLOWED).into(), NEVER_EXPIRES)]).unwrap();
    let to = |server: Ipv4Addr, src: Ipv4Addr| packets::ipv4_tcp(src, server, 40000, 443);
    let net = |cidr: &str| -> ipnet::IpNet { cidr.parse().unwrap() };
    let (vpn, moved, partner) =
        (Ipv4Addr::new(198, 18, 40, 7), Ipv4Addr::new(198, 18, 41, 9), Ipv4Addr::new(198, 18, 50, 1));

    dp.set_shared_set(1, &[net("198.18.40.0/24")]).unwrap();
    assert_eq!(run(&dp, &to(SERVER, vpn)), XDP_DROP, "a set nobody references let a packet in");
    let (own_tables_only, _) = dp.slot_usage();
    dp.set_account_sets(ACCOUNT, &[1]).unwrap();
    let (with_one_group, _) = dp.slot_usage();
    assert!(with_one_group > own_tables_only);
    dp.set_account_sets(OTHER, &[1]).unwrap();
    assert_eq!(dp.slot_usage().0, with_one_group, "a second account referencing the set took slots of its own");
    for server in [SERVER, OTHER_SERVER] {
        assert_eq!(run(&dp, &to(server, vpn)), XDP_PASS, "set entry, account at {server}");
    }
    assert_eq!(run(&dp, &to(SERVER, ALLOWED)), XDP_PASS, "the account's own entry beside its set");
    assert_eq!(run(&dp, &to(OTHER_SERVER, ALLOWED)), XDP_DROP, "one account's own entry let another in");

    dp.set_shared_set(1, &[net("198.18.41.0/24")]).unwrap();
    for server in [SERVER, OTHER_SERVER] {
        assert_eq!(run(&dp, &to(server, vpn)), XDP_DROP, "a network taken out of the set, account at {server}");
        assert_eq!(run(&dp, &to(server, moved)), XDP_PASS, "a network put into the set, account at {server}");
    }

    // A second set for one account: a group of its own, and a change of the first set still
    // reaches both groups.
    dp.set_shared_set(2, &[net("198.18.50.1/32")]).unwrap();
    dp.set_account_sets(ACCOUNT, &[2, 1]).unwrap();
    assert_eq!(dp.account_sets(ACCOUNT), [1, 2]);
    assert_eq!(run(&dp, &to(SERVER, partner)), XDP_PASS);
    assert_eq!(run(&dp, &to(OTHER_SERVER, partner)), XDP_DROP, "a set the account does not reference");
    dp.set_shared_set(1, &[net("198.18.42.0/24")]).unwrap();
    let third = Ipv4Addr::new(198, 18, 42, 1);
    for server in [SERVER, OTHER_SERVER] {
        assert_eq!(run(&dp, &to(server, third)), XDP_PASS, "account at {server}");
        assert_eq!(run(&dp, &to(server, moved)), XDP_DROP, "account at {server}");
    }

    // The key that let the packet in is stamped as its group's.
    dp.set_clock(100);
    assert_eq!(run(&dp, &to(SERVER, partner)), XDP_PASS);
    let used = dp.used_since(100);
    assert_eq!(used.len(), 1, "{used:?}");
    let KeyOwner::SetGroup(group) = used[0].owner else { panic!("stamped as {:?}", used[0].owner) };
    assert_eq!((dp.sets_of_group(group), used[0].key), (vec![1, 2], net("198.18.50.1/32")));

    // One account drops its references: only it is shut out.
    dp.set_account_sets(OTHER, &[]).unwrap();
    assert_eq!(run(&dp, &to(OTHER_SERVER, third)), XDP_DROP);
    assert_eq!(run(&dp, &to(SERVER, third)), XDP_PASS);
    assert!(matches!(dp.set_account_sets(ACCOUNT, &(1..=9).collect::<Vec<_>>()), Err(DatapathError::TooManySets(9))));
    assert!(matches!(dp.set_shared_set(0, &[]), Err(DatapathError::SetId(0))));

    // A restart: the pinned maps go on enforcing; the sets given again move the account to a
    // new group and the one found is freed.
    let in_use = dp.slot_usage().0;
    drop(dp);
    let mut dp = open(&bpffs);
    assert_eq!(run(&dp, &to(SERVER, third)), XDP_PASS, "a set's entry after a restart");
    assert_eq!(run(&dp, &to(OTHER_SERVER, third)), XDP_DROP);
    dp.set_shared_set(1, &[net("198.18.42.0/24")]).unwrap();
    dp.set_shared_set(2, &[net("198.18.50.1/32")]).unwrap();
    dp.set_account_sets(ACCOUNT, &[1, 2]).unwrap();
    assert_eq!(run(&dp, &to(SERVER, third)), XDP_PASS);
    assert_eq!(dp.slot_usage().0, in_use, "the group found at the restart was not freed");
    dp.set_account_sets(ACCOUNT, &[]).unwrap();
    assert_eq!(run(&dp, &to(SERVER, third)), XDP_DROP);
    assert_eq!(run(&dp, &to(SERVER, ALLOWED)), XDP_PASS);
    assert_eq!(dp.slot_usage().0, own_tables_only, "the last account out of a group leaves its table behind");
}

/// A packet reads its account's set group from `ACCOUNT_SETS`, then the group's table: an
/// account moved to another group in between must leave the one it left whole for that
/// packet, neither cleared (a source both groups cover would be dropped) nor given to other
/// sets (the packet would be judged by sets its account never referenced), until the
/// quarantine ends. Such a packet is played here by writing the old group's id back into
/// the account's word through the pinned map.
#[test]
fn a_set_group_left_stays_whole_for_packets_that_read_it_until_the_quarantine_ends() {
    use aya::maps::{Array, Map, MapData};
    use ipaccess::datapath::regions::QUARANTINE;
    let bpffs = BpfFs::new().unwrap();
    let mut dp = two_enforcing_accounts(&bpffs);
    let net = |cidr: &str| -> ipnet::IpNet { cidr.parse().unwrap() };
    let (vpn, partner) = (Ipv4Addr::new(198, 18, 40, 7), Ipv4Addr::new(198, 18, 50, 1));
    let to_account = |src: Ipv4Addr| packets::ipv4_tcp(src, SERVER, 40000, 443);
    dp.set_shared_set(1, &[net("198.18.40.0/24")]).unwrap();
    dp.set_shared_set(2, &[net("198.18.50.1/32")]).unwrap();
    dp.set_shared_set(3, &[net("198.18.60.0/24")]).unwrap();
    let pin = dp.pin_dir().join(ipaccess_common::MAP_ACCOUNT_SETS);
    let mut groups: Array<MapData, u64> = Array::try_from(Map::Array(MapData::from_pin(&pin).unwrap())).unwrap();

    dp.set_account_sets(ACCOUNT, &[1]).unwrap();
    let left = groups.get(&ACCOUNT, 0).unwrap();
    dp.set_account_sets(ACCOUNT, &[1, 2]).unwrap();
    let joined = groups.get(&ACCOUNT, 0).unwrap();
    assert_ne!(left, joined, "a new combination of sets, a new group");
    let left_at = Instant::now();

    // A packet that read the group it left: its set still lets the source in.
    groups.set(ACCOUNT, left, 0).unwrap();
    assert_eq!(run(&dp, &to_account(vpn)), XDP_PASS, "the group left was cleared under a packet that read it");
    groups.set(ACCOUNT, joined, 0).unwrap();

    // Sets wanted meanwhile get a group of another id.
    dp.set_account_sets(OTHER, &[2]).unwrap();
    let other_group = groups.get(&OTHER, 0).unwrap();
    assert!(left_at.elapsed() < QUARANTINE, "the test was too slow to show anything");
    assert_ne!(other_group, left, "a group's id was given to other sets within the quarantine");
    groups.set(ACCOUNT, left, 0).unwrap();
    assert_eq!(run(&dp, &to_account(vpn)), XDP_PASS);
    assert_eq!(run(&dp, &to_account(partner)), XDP_DROP, "judged by sets of another group");
    groups.set(ACCOUNT, joined, 0).unwrap();
    assert_eq!(run(&dp, &to_account(partner)), XDP_PASS);

    // After the quarantine the id is free again: no id is kept for ever.
    thread::sleep(QUARANTINE.saturating_sub(left_at.elapsed()) + Duration::from_millis(50));
    dp.set_account_sets(OTHER, &[3]).unwrap();
    assert_eq!(groups.get(&OTHER, 0).unwrap(), left, "the lowest free id, once the quarantine is over");
    let partner_to_other = packets::ipv4_tcp(partner, OTHER_SERVER, 40000, 443);
    let office_to_other = packets::ipv4_tcp(Ipv4Addr::new(198, 18, 60, 1), OTHER_SERVER, 40000, 443);
    assert_eq!(run(&dp, &partner_to_other), XDP_DROP, "the set the account left");
    assert_eq!(run(&dp, &office_to_other), XDP_PASS);
    assert_eq!(run(&dp, &to_account(vpn)), XDP_PASS);
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// The verifier gives up with EAGAIN when the loading thread has a signal pending, and
/// verifying this program takes long enough on a busy host for one to arrive: the load is
/// tried again rather than failing the daemon's start (or an upgrade's).
#[test]
fn a_load_the_kernel_cuts_short_is_tried_again() {
    let bpffs = BpfFs::new().unwrap();
    // SAFETY: a handler that does nothing, installed without SA_RESTART, so that a pending
    // SIGUSR1 interrupts the verifier instead of killing the process.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore_signal as *const () as libc::sighandler_t;
        assert_eq!(libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()), 0);
    }
    // SAFETY: the handle of the calling thread, which outlives the signaller (joined below).
    let loader = unsafe { libc::pthread_self() };
    let stop = Arc::new(AtomicBool::new(false));
    let signaller = {
        let stop = stop.clone();
        thread::spawn(move || {
            let start = Instant::now();
            let mut sent = 0;
            // Through the first attempts (each verification takes about a second here), then quiet.
            while start.elapsed() < Duration::from_millis(250) && !stop.load(Ordering::Relaxed) {
                // SAFETY: the loading thread is alive until this thread is joined.
                assert_eq!(unsafe { libc::pthread_kill(loader, libc::SIGUSR1) }, 0);
                sent += 1;
                thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    let opened = Datapath::open(&options(&bpffs));
    stop.store(true, Ordering::Relaxed);
    let sent = signaller.join().unwrap();
    let mut dp = opened.expect("the load is tried again after the kernel stopped verifying");
    assert!(sent > 10, "only {sent} signals were sent");
    // Otherwise the signals missed the verifier and this test proved nothing.
    assert!(dp.load_attempts() > 1, "the first load was not interrupted ({sent} signals sent)");
    configure(&mut dp, Mode::Enforce, false);
    assert_eq!(run(&dp, &packets::ipv4_tcp(REFUSED, SERVER, 40000, 443)), XDP_DROP);
    assert_eq!(run(&dp, &packets::ipv4_tcp(ALLOWED, SERVER, 40000, 443)), XDP_PASS);
}

/// The kernel refuses a program whose verification processes more than 1,000,000
/// instructions ("BPF program is too large"), and this one walks every probe of every table a
/// packet may reach (docs/datapath.md). Failing here, well before that cliff, says a change
/// spent most of the headroom left, while the program still loads and the cost can be weighed.
const VERIFIER_BUDGET: u32 = 850_000;

#[test]
fn the_program_verifies_well_within_the_kernels_limit() {
    let bpffs = BpfFs::new().unwrap();
    let dp = open(&bpffs);
    let info = dp.program().info().unwrap();
    let processed = info.verified_instruction_count().expect("the kernel reports what verification processed");
    // Ten thousand: far below what this program's probes take, so a zero or a tiny figure
    // is a sign the count is not what this test thinks it is.
    assert!(processed > 10_000, "only {processed} instructions processed");
    assert!(
        processed <= VERIFIER_BUDGET,
        "verification processed {processed} instructions, over the budget of {VERIFIER_BUDGET} (the kernel stops at \
         1,000,000)"
    );
}
