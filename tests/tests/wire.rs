//! End to end on the wire: the real XDP program attached to a real veth (server side of a
//! client/server namespace pair), real sockets on both sides.
//!
//! Every test builds its own namespaces and its own private bpffs, so they run in parallel.
//! Only 198.18.0.0/15 and fd00::/8 are used, and no traffic leaves the namespaces.

use std::collections::HashSet;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ipaccess::{
    datapath::{self, Attachment, BindTarget, Binding, Datapath, DatapathOptions, XdpMode, netlink::XdpPath},
    protocol::Mode,
};
use ipaccess_common::{AccountCounters, NEVER_EXPIRES, PIN_SUBDIR};
use ipaccess_tests::netns::{
    BpfFs, Netns, TcpServer, TestHosts, UdpEchoServer, echoed_udp, icmp_echo, neighbours, paced_udp_sender,
    receive_flows, send_udp, set_rcvbuf, tcp_connect, udp_client, udp_roundtrip,
};
use ipnet::IpNet;
use rand::{Rng, SeedableRng, rngs::StdRng};

const TCP: u8 = 6;
const UDP: u8 = 17;
/// Bound ports and one port that no binding mentions.
const P_TCP: u16 = 7001;
const P_UDP: u16 = 7002;
const P_FREE: u16 = 7003;

/// Timeout for attempts that should fail (and upper bound for ones that should succeed).
const FAIL: Duration = Duration::from_millis(500);
const OK: Duration = Duration::from_secs(2);

const ACCOUNT: u32 = 1;
/// Tags of the datagrams from the allowed and the disallowed source in the flow tests.
const TAG_GOOD: u8 = 0xa1;
const TAG_BAD: u8 = 0xb2;
const OTHER: u32 = 2;

fn open(bpffs: &BpfFs) -> Datapath {
    let options = DatapathOptions { bpffs: bpffs.path().into(), slots: 1 << 18, accounts: 64 };
    Datapath::open(&options).expect("load the XDP program")
}

/// Attaches from inside the server namespace (the interface name is resolved there).
fn attach(hosts: &TestHosts, dp: &mut Datapath) -> Attachment {
    let iface = hosts.server_if.clone();
    hosts.server.run(|| dp.attach(&iface, XdpMode::Auto)).expect("attach XDP to the server veth")
}

/// Is some XDP program attached to the server's veth (as `ip link` shows it)?
fn xdp_attached(hosts: &TestHosts) -> bool {
    let link = hosts.server.ip(&["-d", "link", "show", "dev", &hosts.server_if]).unwrap();
    link.contains("xdp") || link.contains("prog/xdp")
}

fn host(addr: impl Into<IpAddr>) -> (IpNet, u64) {
    (IpNet::from(addr.into()), NEVER_EXPIRES)
}

fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

fn port_binding(addr: impl Into<IpAddr>, protocol: u8, port: u16, account: u32) -> Binding {
    Binding { addr: addr.into(), target: BindTarget::Port { protocol, port }, account }
}

fn whole_binding(addr: impl Into<IpAddr>, account: u32) -> Binding {
    Binding { addr: addr.into(), target: BindTarget::WholeAddress, account }
}

fn flush_neighbours(ns: &Netns) {
    ns.ip(&["-4", "neigh", "flush", "all"]).unwrap();
    ns.ip(&["-6", "neigh", "flush", "all"]).unwrap();
}

/// `src` -> `dst` ICMP echo with the harness's raw-socket implementation, in `ns`.
fn echo(ns: &Netns, src: impl Into<IpAddr>, dst: impl Into<IpAddr>, timeout: Duration) -> bool {
    let (src, dst) = (src.into(), dst.into());
    ns.run(move || icmp_echo(src, dst, timeout))
}

fn tcp_ok(hosts: &TestHosts, src: impl Into<IpAddr>, dst: SocketAddr, timeout: Duration) -> bool {
    let src = src.into();
    hosts.client.run(move || tcp_connect(src, dst, timeout))
}

fn udp_ok(hosts: &TestHosts, src: impl Into<IpAddr>, dst: SocketAddr, timeout: Duration) -> bool {
    let src = src.into();
    hosts.client.run(move || udp_roundtrip(src, dst, b"wire-test", timeout))
}

/// Waits (at most 2 s) until `done(counters)` holds; returns the last counters read.
fn wait_counters(dp: &Datapath, slot: u32, done: impl Fn(&AccountCounters) -> bool) -> AccountCounters {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let c = dp.counters(slot).unwrap();
        if done(&c) || Instant::now() >= deadline {
            return c;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------

/// Port bindings on both families: allowed sources get through, others don't, unbound ports
/// and ICMP to the bound addresses are not filtered, ARP and neighbour discovery work.
#[test]
fn wire_allow_deny() {
    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let (s4, s6) = (hosts.server_v4, hosts.server_v6);
    let (good4, bad4) = (hosts.client_v4[0], hosts.client_v4[1]);
    let (good6, bad6) = (hosts.client_v6[0], hosts.client_v6[1]);

    let mut servers = Vec::new();
    let mut echoes = Vec::new();
    for addr in [IpAddr::from(s4), IpAddr::from(s6)] {
        for port in [P_TCP, P_UDP, P_FREE] {
            servers.push(TcpServer::start_in(&hosts.server, sa(addr, port)).unwrap());
        }
        for port in [P_UDP, P_FREE] {
            echoes.push(UdpEchoServer::start_in(&hosts.server, sa(addr, port)).unwrap());
        }
    }

    let mut dp = open(&bpffs);
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_allowlist(ACCOUNT, &[host(good4), host(good6)]).unwrap();
    let bindings = [
        port_binding(s4, TCP, P_TCP, ACCOUNT),
        port_binding(s4, UDP, P_UDP, ACCOUNT),
        port_binding(s6, TCP, P_TCP, ACCOUNT),
        port_binding(s6, UDP, P_UDP, ACCOUNT),
    ];
    dp.set_bindings(&bindings).unwrap();
    let attachment = attach(&hosts, &mut dp);
    eprintln!("wire_allow_deny: attached to {} as {attachment:?}", hosts.server_if);
    assert_eq!(attachment, Attachment { path: XdpPath::Native, reused: false }, "veth runs native XDP");
    assert!(xdp_attached(&hosts));
    // Neighbour entries made before the filter was there must not make the test pass.
    flush_neighbours(&hosts.client);
    flush_neighbours(&hosts.server);

    // ARP / NDP and ICMP to a port-bound address are not the filter's business.
    let host_before = dp.host_counters().unwrap();
    assert!(echo(&hosts.client, bad4, s4, OK), "ICMP echo {bad4} -> {s4}");
    assert!(echo(&hosts.client, bad6, s6, OK), "ICMPv6 echo {bad6} -> {s6}");
    let neigh = neighbours(&hosts.client).unwrap();
    for addr in [IpAddr::from(s4), IpAddr::from(s6)] {
        assert!(
            neigh.iter().any(|n| n.addr == addr
                && n.dev == hosts.client_if
                && n.lladdr.is_some()
                && !matches!(n.state.as_str(), "FAILED" | "INCOMPLETE")),
            "{addr} not resolved in the client's neighbour table: {neigh:?}"
        );
    }
    let host_after = dp.host_counters().unwrap();
    assert!(host_after.non_ip_packets > host_before.non_ip_packets, "ARP went through the filter");
    assert!(host_after.unbound_packets > host_before.unbound_packets, "ICMP counted as unbound");

    for (good, bad, server) in
        [(IpAddr::from(good4), IpAddr::from(bad4), IpAddr::from(s4)), (good6.into(), bad6.into(), s6.into())]
    {
        assert!(tcp_ok(&hosts, good, sa(server, P_TCP), OK), "tcp {good} -> {server}:{P_TCP}");
        assert!(udp_ok(&hosts, good, sa(server, P_UDP), OK), "udp {good} -> {server}:{P_UDP}");
        assert!(!tcp_ok(&hosts, bad, sa(server, P_TCP), FAIL), "tcp {bad} -> {server}:{P_TCP} got through");
        assert!(!udp_ok(&hosts, bad, sa(server, P_UDP), FAIL), "udp {bad} -> {server}:{P_UDP} got through");
        // Same address, a port nobody bound: passes.
        assert!(tcp_ok(&hosts, bad, sa(server, P_FREE), OK), "tcp {bad} -> {server}:{P_FREE}");
        assert!(udp_ok(&hosts, bad, sa(server, P_FREE), OK), "udp {bad} -> {server}:{P_FREE}");
        // The bound port of one protocol is not bound for the other.
        assert!(tcp_ok(&hosts, bad, sa(server, P_UDP), OK), "tcp {bad} -> {server}:{P_UDP} (only udp is bound)");
    }
    let c = dp.counters(ACCOUNT).unwrap();
    assert!(c.dropped_packets >= 4 && c.passed_packets >= 4, "{c:?}");
    assert_eq!(c.would_drop_packets, 0);
    drop((servers, echoes));
}

/// A whole-address binding filters everything to the address except neighbour discovery.
#[test]
fn whole_address_binding_keeps_ndp() {
    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let (s4, s6) = (hosts.server_v4, hosts.server_v6);
    let (good4, bad4) = (hosts.client_v4[0], hosts.client_v4[1]);
    let (good6, bad6) = (hosts.client_v6[0], hosts.client_v6[1]);
    let tcp4 = TcpServer::start_in(&hosts.server, sa(s4, P_TCP)).unwrap();
    let tcp6 = TcpServer::start_in(&hosts.server, sa(s6, P_TCP)).unwrap();

    let mut dp = open(&bpffs);
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_allowlist(ACCOUNT, &[host(good4), host(good6)]).unwrap();
    dp.set_bindings(&[whole_binding(s4, ACCOUNT), whole_binding(s6, ACCOUNT)]).unwrap();
    attach(&hosts, &mut dp);
    flush_neighbours(&hosts.client);
    flush_neighbours(&hosts.server);

    // IPv6. The server resolves the client first: its NS goes out (egress, unfiltered) to the
    // solicited-node group, and the answer is a unicast NA *to server_v6*, which the filter
    // must let through although it is ICMPv6 to a wholly bound address. (Had the client
    // resolved the server first, the server would have learnt the client's MAC from the NS.)
    let ndp_before = dp.host_counters().unwrap().ndp_packets;
    assert!(echo(&hosts.server, s6, good6, OK), "server -> {good6}: NA or echo reply dropped");
    let ndp_after = dp.host_counters().unwrap().ndp_packets;
    assert!(ndp_after > ndp_before, "no NDP packet to the bound address was seen ({ndp_before} -> {ndp_after})");
    // Here NA passes too, but the echo reply from a disallowed source does not.
    assert!(!echo(&hosts.server, s6, bad6, FAIL), "echo reply from {bad6} got through");
    assert!(
        neighbours(&hosts.server).unwrap().iter().any(|n| n.addr == IpAddr::from(bad6) && n.lladdr.is_some()),
        "the server did not resolve {bad6} (NA dropped?)"
    );
    flush_neighbours(&hosts.client);
    flush_neighbours(&hosts.server);
    assert!(tcp_ok(&hosts, good6, sa(s6, P_TCP), OK), "tcp {good6} -> {s6}");
    assert!(echo(&hosts.client, good6, s6, OK), "ICMPv6 echo {good6} -> {s6}");
    assert!(!tcp_ok(&hosts, bad6, sa(s6, P_TCP), FAIL), "tcp {bad6} -> {s6} got through");
    assert!(!echo(&hosts.client, bad6, s6, FAIL), "ICMPv6 echo {bad6} -> {s6} got through");

    // IPv4: ARP is not IP and passes; everything IP from a disallowed source is dropped.
    let arp_before = dp.host_counters().unwrap().non_ip_packets;
    assert!(echo(&hosts.server, s4, good4, OK), "server -> {good4}: ARP reply or echo reply dropped");
    assert!(dp.host_counters().unwrap().non_ip_packets > arp_before);
    assert!(!echo(&hosts.server, s4, bad4, FAIL), "echo reply from {bad4} got through");
    assert!(
        neighbours(&hosts.server).unwrap().iter().any(|n| n.addr == IpAddr::from(bad4) && n.lladdr.is_some()),
        "the server did not resolve {bad4} (ARP reply dropped?)"
    );
    flush_neighbours(&hosts.client);
    flush_neighbours(&hosts.server);
    assert!(tcp_ok(&hosts, good4, sa(s4, P_TCP), OK), "tcp {good4} -> {s4}");
    assert!(echo(&hosts.client, good4, s4, OK), "ICMP echo {good4} -> {s4}");
    assert!(!tcp_ok(&hosts, bad4, sa(s4, P_TCP), FAIL), "tcp {bad4} -> {s4} got through");
    assert!(!echo(&hosts.client, bad4, s4, FAIL), "ICMP echo {bad4} -> {s4} got through");

    let c = dp.counters(ACCOUNT).unwrap();
    assert!(c.dropped_packets >= 6, "{c:?}");
    assert_eq!(tcp4.accepted_within(1, OK), 1);
    assert_eq!(tcp6.accepted_within(1, OK), 1);
}

/// Per-account counters count exactly the frames that reached the server's veth.
#[test]
fn counters_match_traffic() {
    const N: usize = 50;
    const M: usize = 30;
    const PAYLOAD: usize = 100;
    const FRAME: u64 = 14 + 20 + 8 + PAYLOAD as u64;

    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let s4 = hosts.server_v4;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let server = UdpEchoServer::start_in(&hosts.server, sa(s4, P_UDP)).unwrap();

    let mut dp = open(&bpffs);
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_allowlist(ACCOUNT, &[host(good)]).unwrap();
    dp.set_bindings(&[port_binding(s4, UDP, P_UDP, ACCOUNT)]).unwrap();
    attach(&hosts, &mut dp);
    // Resolve ARP first (ICMP to a port-bound address is not counted for the account).
    assert!(echo(&hosts.client, bad, s4, OK));
    assert!(echo(&hosts.client, good, s4, OK));
    assert_eq!(dp.counters(ACCOUNT).unwrap(), AccountCounters::default());

    let payload = vec![0x5a; PAYLOAD];
    let bad_sock = udp_client(&hosts.client, bad.into(), sa(s4, P_UDP));
    let good_sock = udp_client(&hosts.client, good.into(), sa(s4, P_UDP));
    send_udp(&bad_sock, &payload, N);
    let c = wait_counters(&dp, ACCOUNT, |c| c.dropped_packets >= N as u64);
    assert_eq!(echoed_udp(&good_sock, &payload, M, OK), M);
    thread::sleep(Duration::from_millis(100));
    let c2 = dp.counters(ACCOUNT).unwrap();
    let want = AccountCounters {
        passed_packets: M as u64,
        passed_bytes: M as u64 * FRAME,
        dropped_packets: N as u64,
        dropped_bytes: N as u64 * FRAME,
        would_drop_packets: 0,
        would_drop_bytes: 0,
    };
    assert_eq!(c.dropped_packets, N as u64);
    assert_eq!(c2, want);
    assert_eq!(server.received(), M);

    // Monitor: the disallowed source gets through, counted as would-drop and passed.
    const W: usize = 20;
    dp.set_policy(ACCOUNT, Mode::Monitor, false).unwrap();
    assert_eq!(echoed_udp(&bad_sock, &payload, W, OK), W);
    let c3 = wait_counters(&dp, ACCOUNT, |c| c.would_drop_packets >= W as u64);
    let want = AccountCounters {
        passed_packets: (M + W) as u64,
        passed_bytes: (M + W) as u64 * FRAME,
        would_drop_packets: W as u64,
        would_drop_bytes: W as u64 * FRAME,
        ..want
    };
    assert_eq!(c3, want);
    assert_eq!(server.received(), M + W);

    // Suspended: even the allowed source is dropped (in monitor mode too).
    const K: usize = 10;
    dp.set_policy(ACCOUNT, Mode::Monitor, true).unwrap();
    assert_eq!(echoed_udp(&good_sock, &payload, K / 2, Duration::from_millis(100)), 0);
    dp.set_policy(ACCOUNT, Mode::Enforce, true).unwrap();
    assert_eq!(echoed_udp(&good_sock, &payload, K / 2, Duration::from_millis(100)), 0);
    let c4 = wait_counters(&dp, ACCOUNT, |c| c.dropped_packets >= (N + K) as u64);
    let want = AccountCounters { dropped_packets: (N + K) as u64, dropped_bytes: (N + K) as u64 * FRAME, ..want };
    assert_eq!(c4, want);
    assert_eq!(server.received(), M + W);

    // And back: the allowed source passes again.
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    assert_eq!(echoed_udp(&good_sock, &payload, 1, OK), 1);
}

/// An override's expiry is enforced by the kernel alone: no map write, no daemon.
#[test]
fn override_expires_in_kernel() {
    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let s4 = hosts.server_v4;
    let (good, temp, bad) = (hosts.client_v4[0], hosts.client_v4[1], hosts.client_v4[2]);
    let _server = TcpServer::start_in(&hosts.server, sa(s4, P_TCP)).unwrap();

    let mut dp = open(&bpffs);
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_bindings(&[port_binding(s4, TCP, P_TCP, ACCOUNT)]).unwrap();
    attach(&hosts, &mut dp);
    let start = Instant::now();
    let expiry = datapath::boot_time_ns() + 2_000_000_000;
    dp.set_allowlist(ACCOUNT, &[host(good), (IpNet::from(IpAddr::from(temp)), expiry)]).unwrap();

    assert!(tcp_ok(&hosts, temp, sa(s4, P_TCP), OK), "override for {temp} not effective");
    assert!(tcp_ok(&hosts, good, sa(s4, P_TCP), OK));
    assert!(!tcp_ok(&hosts, bad, sa(s4, P_TCP), FAIL));
    assert!(start.elapsed() < Duration::from_millis(1800), "too slow to test before expiry: {:?}", start.elapsed());
    assert!(tcp_ok(&hosts, temp, sa(s4, P_TCP), OK), "override for {temp} ended early");

    // No user space from here on: the pinned link keeps the program, the maps keep the policy.
    drop(dp);
    let wait = Duration::from_millis(2500).saturating_sub(start.elapsed());
    thread::sleep(wait);
    assert!(!tcp_ok(&hosts, temp, sa(s4, P_TCP), FAIL), "override for {temp} still effective after expiry");
    assert!(tcp_ok(&hosts, good, sa(s4, P_TCP), OK), "permanent entry stopped working");
    assert!(!tcp_ok(&hosts, bad, sa(s4, P_TCP), FAIL));
    assert!(xdp_attached(&hosts));
}

fn allowlist_variant(i: usize, good: Ipv4Addr, good6: Ipv6Addr, rng: &mut StdRng) -> Vec<(IpNet, u64)> {
    // The allowed source is always in, with a far expiry on odd rounds (the expiry path).
    let far = datapath::boot_time_ns() + 3600 * 1_000_000_000;
    let mut list = vec![(IpNet::from(IpAddr::from(good)), if i % 2 == 1 { far } else { NEVER_EXPIRES })];
    match i % 4 {
        0 => {}
        1 => {
            // ~2,000 random hosts in 198.19.0.0/16.
            let mut seen = HashSet::new();
            for _ in 0..2000 {
                let addr = Ipv4Addr::new(198, 19, rng.random(), rng.random());
                if seen.insert(addr) {
                    list.push(host(addr));
                }
            }
        }
        2 => {
            // 13 distinct IPv4 lengths (/20../32) and 12 IPv6 ones: expanded to 8 per family.
            for len in 20..=32u8 {
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) | (rng.random::<u32>() & 0xffff));
                list.push((IpNet::new(addr.into(), len).unwrap().trunc(), NEVER_EXPIRES));
            }
            for len in (64..=128u8).step_by(6) {
                let addr = Ipv6Addr::from((0xfd00_0001u128 << 96) | rng.random::<u64>() as u128);
                list.push((IpNet::new(addr.into(), len).unwrap().trunc(), NEVER_EXPIRES));
            }
            list.push(host(good6));
        }
        _ => {
            // A few hundred entries over 9 lengths.
            for k in 0..300u32 {
                let len = 24 + (k % 9) as u8;
                let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) | (rng.random::<u32>() & 0xffff));
                list.push((IpNet::new(addr.into(), len).unwrap().trunc(), far));
            }
        }
    }
    list
}

fn bindings_variant(i: usize, s4: Ipv4Addr, rng: &mut StdRng) -> Vec<Binding> {
    let mut out = vec![port_binding(s4, UDP, P_UDP, ACCOUNT)];
    let extra = [0usize, 40, 400, 5][i % 4];
    for k in 0..extra {
        let addr = IpAddr::from(Ipv4Addr::new(198, 19, 200 + (k % 50) as u8, rng.random()));
        out.push(match k % 3 {
            0 => whole_binding(addr, OTHER),
            1 => port_binding(addr, TCP, rng.random_range(1..60000), OTHER),
            _ => port_binding(IpAddr::from(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, k as u16, 1)), UDP, P_UDP, OTHER),
        });
    }
    // Other ports of the same address, for another account.
    if i % 2 == 1 {
        out.push(port_binding(s4, UDP, P_UDP + 1, OTHER));
        out.push(port_binding(s4, TCP, P_UDP, OTHER));
    }
    out.sort();
    out.dedup_by_key(|b| (b.addr, b.target));
    out
}

/// An upgrade to a build whose maps have another layout (so another `ipaccess/vN` pin
/// directory) takes over the interface's link from the old build's pins while traffic
/// flows, losing nothing and letting nothing through, then frees the old pins.
#[test]
fn layout_upgrade_takes_over_without_a_gap() {
    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let s4 = hosts.server_v4;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let configure = |dp: &mut Datapath| {
        dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
        dp.set_allowlist(ACCOUNT, &[host(good)]).unwrap();
        dp.set_bindings(&[port_binding(s4, UDP, P_UDP, ACCOUNT)]).unwrap();
    };
    let mut dp = open(&bpffs);
    configure(&mut dp);
    attach(&hosts, &mut dp);
    assert!(echo(&hosts.client, good, s4, OK));
    assert!(echo(&hosts.client, bad, s4, OK));
    drop(dp);
    // What the build being upgraded from leaves: its pins under another version's directory.
    let current = bpffs.path().join(PIN_SUBDIR);
    let old = current.with_file_name("v0");
    fs::rename(&current, &old).unwrap();
    let link_name = format!("link-{}", hosts.server_if);
    assert!(old.join(&link_name).exists());

    let rx = hosts.server.run(move || UdpSocket::bind(sa(s4, P_UDP))).unwrap();
    set_rcvbuf(&rx, 16 << 20);
    let rx_stop = Arc::new(AtomicBool::new(false));
    let receiver =
        receive_flows(rx, (good.into(), TAG_GOOD), bad.into(), 100_000, rx_stop.clone(), Duration::from_secs(20));
    let tx_stop = Arc::new(AtomicBool::new(false));
    // The senders stop 500 ms after the switch; this only bounds them. Loading the new
    // program while other tests run can take seconds, and the new program must still see
    // traffic after it.
    let limit = Duration::from_secs(60);
    let sending = Instant::now();
    let good_tx =
        paced_udp_sender(udp_client(&hosts.client, good.into(), sa(s4, P_UDP)), TAG_GOOD, 5000, tx_stop.clone(), limit);
    let bad_tx =
        paced_udp_sender(udp_client(&hosts.client, bad.into(), sa(s4, P_UDP)), TAG_BAD, 1000, tx_stop.clone(), limit);
    thread::sleep(Duration::from_millis(500));

    // The new build: fresh maps filled first (as the daemon reconciles before attaching),
    // then the old link switched to the new program.
    let mut dp = open(&bpffs);
    configure(&mut dp);
    assert_eq!(attach(&hosts, &mut dp), Attachment { path: XdpPath::Native, reused: true });
    assert!(current.join(&link_name).exists() && !old.join(&link_name).exists(), "the pin did not move");
    assert_eq!(dp.retire_other_layouts(), []);
    assert!(!old.exists(), "the old layout's pins were left behind");
    let switched_after = sending.elapsed();
    thread::sleep(Duration::from_millis(500));

    tx_stop.store(true, Ordering::Relaxed);
    let (good_sent, bad_sent) = (good_tx.join().unwrap(), bad_tx.join().unwrap());
    let c = wait_counters(&dp, ACCOUNT, |c| c.passed_packets > 0 && c.dropped_packets > 0);
    thread::sleep(Duration::from_millis(300));
    rx_stop.store(true, Ordering::Relaxed);
    let seen = receiver.join().unwrap();
    let received = seen.good.iter().filter(|&&s| s).count() as u64;
    assert!(good_sent >= 2_000 && bad_sent >= 400, "senders too slow: {good_sent}, {bad_sent}");
    assert_eq!((seen.bad, seen.other, seen.good_dups), (0, 0, 0), "disallowed or unexpected datagrams");
    assert_eq!(received, good_sent, "allowed datagrams lost across the takeover");
    // The new program, with the new maps, is the one deciding now.
    assert!(c.passed_packets > 0 && c.dropped_packets > 0, "{c:?} (switched {switched_after:?} after sending began)");
    assert!(dp.detach(&hosts.server_if).unwrap());
}

/// Restarts, allowlist replacements and binding rewrites while traffic flows: not one
/// datagram from the allowed source is lost, not one from a disallowed source gets through.
#[test]
fn no_gap_on_reload() {
    const GOOD_RATE: u64 = 5000;
    const BAD_RATE: u64 = 1000;

    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let s4 = hosts.server_v4;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let mut rng = StdRng::seed_from_u64(rand::rng().random());

    let mut dp = open(&bpffs);
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_policy(OTHER, Mode::Enforce, false).unwrap();
    dp.set_allowlist(ACCOUNT, &[host(good)]).unwrap();
    dp.set_bindings(&bindings_variant(0, s4, &mut rng)).unwrap();
    attach(&hosts, &mut dp);
    assert!(echo(&hosts.client, good, s4, OK));
    assert!(echo(&hosts.client, bad, s4, OK));

    // Receiver: one socket with a big buffer, a thread that only records sequence numbers.
    let rx = hosts.server.run(move || UdpSocket::bind(sa(s4, P_UDP))).unwrap();
    set_rcvbuf(&rx, 16 << 20);
    let rx_stop = Arc::new(AtomicBool::new(false));
    let receiver =
        receive_flows(rx, (good.into(), TAG_GOOD), bad.into(), 200_000, rx_stop.clone(), Duration::from_secs(30));

    let before = dp.counters(ACCOUNT).unwrap();
    let tx_stop = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(15);
    let good_tx = paced_udp_sender(
        udp_client(&hosts.client, good.into(), sa(s4, P_UDP)),
        TAG_GOOD,
        GOOD_RATE,
        tx_stop.clone(),
        limit,
    );
    let bad_tx = paced_udp_sender(
        udp_client(&hosts.client, bad.into(), sa(s4, P_UDP)),
        TAG_BAD,
        BAD_RATE,
        tx_stop.clone(),
        limit,
    );

    // Churn while it flows.
    let start = Instant::now();
    let restart_ms = AtomicU64::new(0);
    let mut restarts = 0;
    let good6 = hosts.client_v6[0];
    thread::sleep(Duration::from_millis(200));
    for i in 0..20 {
        dp.set_allowlist(ACCOUNT, &allowlist_variant(i + 1, good, good6, &mut rng)).unwrap();
        dp.set_bindings(&bindings_variant(i + 1, s4, &mut rng)).unwrap();
        if i % 4 == 3 {
            let t = Instant::now();
            drop(dp);
            dp = open(&bpffs);
            assert_eq!(attach(&hosts, &mut dp), Attachment { path: XdpPath::Native, reused: true });
            restart_ms.fetch_max(t.elapsed().as_millis() as u64, Ordering::Relaxed);
            restarts += 1;
            // Straight after a restart, change tables again.
            dp.set_allowlist(ACCOUNT, &allowlist_variant(i + 2, good, good6, &mut rng)).unwrap();
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Let it flow for at least 3 s in all.
    thread::sleep(Duration::from_secs(3).saturating_sub(start.elapsed()));
    let churn = start.elapsed();
    tx_stop.store(true, Ordering::Relaxed);
    let good_sent = good_tx.join().unwrap();
    let bad_sent = bad_tx.join().unwrap();
    // Let the receiver drain its buffer.
    let c = wait_counters(&dp, ACCOUNT, |c| {
        c.passed_packets - before.passed_packets >= good_sent && c.dropped_packets - before.dropped_packets >= bad_sent
    });
    thread::sleep(Duration::from_millis(300));
    rx_stop.store(true, Ordering::Relaxed);
    let seen = receiver.join().unwrap();
    let received = seen.good.iter().filter(|&&s| s).count() as u64;
    let missing: Vec<usize> =
        seen.good.iter().take(good_sent as usize).enumerate().filter(|(_, s)| !**s).map(|(i, _)| i).take(20).collect();
    let link = hosts.client.ip(&["-s", "link", "show", "dev", &hosts.client_if]).unwrap();
    eprintln!(
        "no_gap_on_reload: {good_sent} allowed and {bad_sent} disallowed datagrams in {churn:?}, \
         {restarts} restarts (slowest {} ms), counters {c:?}",
        restart_ms.load(Ordering::Relaxed)
    );
    assert_eq!(restarts, 5);
    assert!(good_sent >= 10_000, "sender too slow: {good_sent}");
    assert!(bad_sent >= 2_000, "sender too slow: {bad_sent}");
    assert_eq!(seen.bad, 0, "datagrams from the disallowed source were received");
    assert_eq!(seen.other, 0, "unexpected datagrams");
    assert_eq!(seen.good_dups, 0);
    assert!(
        missing.is_empty() && received == good_sent,
        "{} of {good_sent} allowed datagrams missing, first {missing:?}; counters {c:?}; client link:\n{link}",
        good_sent - received
    );
    assert_eq!(c.dropped_packets - before.dropped_packets, bad_sent, "allowed datagrams were dropped: {c:?}");
    assert_eq!(c.passed_packets - before.passed_packets, good_sent, "{c:?}");
    assert_eq!(c.would_drop_packets, 0);
}

/// The filter stays until somebody asks for it to go.
#[test]
fn detach_only_on_request() {
    let hosts = TestHosts::new().unwrap();
    let bpffs = BpfFs::new().unwrap();
    let s4 = hosts.server_v4;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let _server = TcpServer::start_in(&hosts.server, sa(s4, P_TCP)).unwrap();

    let mut dp = open(&bpffs);
    dp.set_policy(ACCOUNT, Mode::Enforce, false).unwrap();
    dp.set_allowlist(ACCOUNT, &[host(good)]).unwrap();
    dp.set_bindings(&[port_binding(s4, TCP, P_TCP, ACCOUNT)]).unwrap();
    attach(&hosts, &mut dp);
    assert_eq!(dp.attached_interfaces(), vec![hosts.server_if.clone()]);
    assert!(!tcp_ok(&hosts, bad, sa(s4, P_TCP), FAIL));
    assert!(tcp_ok(&hosts, good, sa(s4, P_TCP), OK));

    drop(dp);
    assert!(xdp_attached(&hosts));
    assert!(!tcp_ok(&hosts, bad, sa(s4, P_TCP), FAIL), "filter gone with the Datapath");
    assert!(tcp_ok(&hosts, good, sa(s4, P_TCP), OK));

    // A new daemon that never attached detaches on request.
    let mut dp = open(&bpffs);
    assert_eq!(dp.attached_interfaces(), vec![hosts.server_if.clone()]);
    assert!(!tcp_ok(&hosts, bad, sa(s4, P_TCP), FAIL), "opening detached the filter");
    assert!(dp.detach(&hosts.server_if).unwrap());
    assert!(!xdp_attached(&hosts), "XDP still on the interface after detach");
    assert!(tcp_ok(&hosts, bad, sa(s4, P_TCP), OK), "still filtered after detach");
    assert!(dp.attached_interfaces().is_empty());
    assert!(!dp.detach(&hosts.server_if).unwrap());
    assert!(!dp.detach("ipanone0").unwrap());

    // Attaching again works, and so does detaching the link this process made itself.
    assert!(!attach(&hosts, &mut dp).reused);
    assert!(!tcp_ok(&hosts, bad, sa(s4, P_TCP), FAIL));
    assert!(dp.detach(&hosts.server_if).unwrap());
    assert!(!xdp_attached(&hosts));
    assert!(tcp_ok(&hosts, bad, sa(s4, P_TCP), OK));
}
