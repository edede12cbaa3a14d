//! Last-used evidence end to end: the real `ipaccessd` in the server namespace of a
//! [`TestHosts`](ipaccess_tests::netns::TestHosts) pair, real UDP through its XDP program on
//! the veth, checks and `allow list` over its control socket and through the real
//! `ipaccessctl`. An entry that lets a datagram through shows a last packet, one that lets a
//! check through a last sign-in, and `--unused` lists only the entry that did neither; the
//! evidence survives a restart of the daemon. Build the binaries first:
//! `cargo build --release -p ipaccess --bins`.

use std::net::{Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipaccess_tests::client::Conn;
use ipaccess_tests::daemon::World;
use ipaccess_tests::netns::{UdpEchoServer, echoed_udp, udp_client};
use serde_json::{Value, json};

fn ok(w: &World, request: Value) -> Value {
    Conn::open(&w.socket()).ok(request)
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// An allowlist as (cidr, last_signin, last_packet).
type Listed = Vec<(String, Option<i64>, Option<i64>)>;

/// `allow_list` as [`Listed`].
fn listed(w: &World, unused: Option<u64>) -> Listed {
    let mut request = json!({"cmd": "allow_list", "account": "cust"});
    if let Some(unused) = unused {
        request["unused"] = json!(unused);
    }
    let list = ok(w, request);
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["cidr"].as_str().unwrap().to_string(), e["last_signin_at"].as_i64(), e["last_packet_at"].as_i64()))
        .collect()
}

/// Account `cust`, bound to UDP `port` on the server address, with an echo server there
/// (keep it alive); the endpoint.
fn bound_customer(w: &World, port: u16) -> (UdpEchoServer, SocketAddr) {
    let dst = SocketAddr::new(w.hosts.server_v4.into(), port);
    let server = UdpEchoServer::start_in(&w.hosts.server, dst).unwrap();
    ok(w, json!({"cmd": "account_add", "account": "cust"}));
    ok(w, json!({"cmd": "bind_add", "account": "cust", "addr": dst.ip().to_string(), "port": port, "proto": "udp"}));
    (server, dst)
}

/// `allow_list` once `done` holds of it (the stamps are read once a second), or after 10 s.
fn listed_once(w: &World, done: impl Fn(&Listed) -> bool) -> Listed {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = listed(w, None);
        if done(&seen) || Instant::now() > deadline {
            return seen;
        }
        thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn entries_show_their_last_packet_and_sign_in_and_unused_lists_the_rest() {
    let mut w = World::new("");
    let (packets_from, checks_from) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let (_server, dst) = bound_customer(&w, 7400);
    let host = format!("{packets_from}/32");
    // The checks come from an address inside a /24 that also holds a /16's: the /24 is the
    // most specific entry and gets the sign-in, the /16 nothing.
    let net24 = format!("{}/24", Ipv4Addr::from(u32::from(checks_from) & 0xffff_ff00));
    let net16 = format!("{}/16", Ipv4Addr::from(u32::from(checks_from) & 0xffff_0000));
    let idle = "203.0.113.0/24".to_string();
    for cidr in [&host, &net24, &net16, &idle] {
        ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": cidr}));
    }
    ok(&w, json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "force": true}));
    let added = now();
    // Fresh entries: no evidence, and none is unused yet (none is older than a second's window).
    assert!(listed(&w, None).iter().all(|(_, s, p)| s.is_none() && p.is_none()), "{:?}", listed(&w, None));
    assert!(listed(&w, Some(3600)).is_empty(), "an entry added just now is not unused for an hour");
    // Entries old enough for a window of 4 s before anything uses them (see below).
    thread::sleep(Duration::from_secs(6));

    // A datagram through the host entry, in the kernel; a check through the /24.
    let sock = udp_client(&w.hosts.client, packets_from.into(), dst);
    assert!(echoed_udp(&sock, b"hello", 3, Duration::from_secs(2)) > 0, "the allowed datagram was not echoed");
    assert_eq!(
        ok(&w, json!({"cmd": "check", "account": "cust", "addr": checks_from.to_string(), "method": "password"}))["reason"],
        "allowed"
    );
    let seen = listed_once(&w, |seen| seen.iter().any(|(c, _, p)| *c == host && p.is_some()));
    let find = |seen: &Listed, cidr: &str| {
        seen.iter().find(|(c, ..)| c == cidr).cloned().unwrap_or_else(|| panic!("{cidr} not listed: {seen:?}"))
    };
    let (_, signin, packet) = find(&seen, &host);
    let packet = packet.expect("the host entry shows no last packet");
    assert!(signin.is_none() && (added - 2..=now() + 1).contains(&packet), "{seen:?}");
    let (_, signin, packet) = find(&seen, &net24);
    assert!(packet.is_none() && signin.is_some_and(|t| (added..=now()).contains(&t)), "{seen:?}");
    for idle in [&net16, &idle] {
        assert_eq!(find(&seen, idle), (idle.clone(), None, None), "credited though it let nothing in");
    }

    // A window of 4 s: the entries are older than that, the evidence is younger (read within
    // a second or two, and a packet's time may read up to a second early), so the entries
    // that let nothing in are unused, and only they; through the CLI too, with its columns.
    let unused: Vec<String> = listed(&w, Some(4)).into_iter().map(|(c, ..)| c).collect();
    let mut expected = vec![net16.clone(), idle.clone()];
    expected.sort();
    let mut got = unused.clone();
    got.sort();
    assert_eq!(got, expected);
    let shown = w.ctl_ok(&["allow", "list", "cust", "--unused", "4s"]);
    assert!(shown.contains("LAST SIGN-IN") && shown.contains("LAST PACKET"), "{shown}");
    assert!(shown.contains(&idle) && !shown.contains(&host) && !shown.contains(&net24), "{shown}");
    let all = w.ctl_ok(&["allow", "list", "cust"]);
    assert!(all.contains(&host) && all.contains(&net24), "{all}");
    // With a window of an hour, none is old enough to be unused.
    assert!(listed(&w, Some(3600)).is_empty());

    // The evidence is in the store: a restarted daemon still shows it.
    w.stop();
    w.start("");
    let again = listed(&w, None);
    assert_eq!(find(&again, &host).2, find(&seen, &host).2, "the last packet was lost in a restart");
    assert_eq!(find(&again, &net24).1, find(&seen, &net24).1, "the last sign-in was lost in a restart");
}

/// The probe order follows the traffic under the real daemon: datagrams from an address in
/// an account's /24 (the account also has host entries, so its host length is probed first
/// at the start) make ipaccessd, from its once-a-second stamp scan, put the /24 first in the
/// account's table header within a few seconds. Read from the pinned maps, as the kernel
/// reads them.
#[test]
fn traffic_through_a_24_makes_the_daemon_probe_it_first() {
    use aya::maps::{Array, Map, MapData};
    use ipaccess_common::{AccountRecord, MAP_ACCOUNTS, MAP_SLOTS, PIN_SUBDIR, PackedLengths, Slot, TableDesc};

    let w = World::new("");
    let from = w.hosts.client_v4[0];
    let (_server, dst) = bound_customer(&w, 7401);
    let net24 = format!("{}/24", Ipv4Addr::from(u32::from(from) & 0xffff_ff00));
    for cidr in [net24.as_str(), "198.19.250.1/32", "198.19.250.2/32"] {
        ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": cidr}));
    }
    ok(&w, json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "force": true}));
    // The IPv4 lengths of the one account table in the pinned maps, in probe order.
    let pins = w.bpffs.path().join(PIN_SUBDIR);
    let first_length = || {
        let accounts: Array<MapData, AccountRecord> =
            Array::try_from(Map::Array(MapData::from_pin(pins.join(MAP_ACCOUNTS)).unwrap())).unwrap();
        let slots: Array<MapData, Slot> =
            Array::try_from(Map::Array(MapData::from_pin(pins.join(MAP_SLOTS)).unwrap())).unwrap();
        let tables: Vec<TableDesc> = (0..accounts.len())
            .filter_map(|i| Some(TableDesc(accounts.get(&i, 0).ok()?.table)).filter(|d| d.is_present()))
            .collect();
        assert_eq!(tables.len(), 1, "one account with an allowlist: {tables:?}");
        PackedLengths(slots.get(&tables[0].header(), 0).unwrap().key_hi).get(0)
    };
    assert_eq!(first_length(), 32, "the host length first at the start");

    let sock = udp_client(&w.hosts.client, from.into(), dst);
    let started = Instant::now();
    let mut moved = None;
    while started.elapsed() < Duration::from_secs(15) {
        assert!(echoed_udp(&sock, b"office", 1, Duration::from_secs(2)) > 0, "the /24 lets the datagram through");
        if first_length() == 24 {
            moved = Some(started.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let moved = moved.expect("the daemon never put the /24 first");
    println!("the /24 went first after {moved:?} of traffic");
    assert!(moved < Duration::from_secs(10), "{moved:?}");
    assert_eq!(echoed_udp(&sock, b"office", 3, Duration::from_secs(2)), 3, "still allowed");
}

/// A check let in by an entry with an expiry is credited to that entry like any other: the
/// most specific live entry covering the address, whether it expires or not. A permanent
/// /24 and an expiring host entry inside it: checks from the host go to the host entry,
/// checks from elsewhere in the /24 to the /24; and an expiring /16 alone covering a third
/// address gets that one's sign-in.
#[test]
fn an_entry_with_an_expiry_is_credited_with_the_sign_ins_it_lets_in() {
    let w = World::new("");
    ok(&w, json!({"cmd": "account_add", "account": "cust"}));
    let (host, other, wider) = ("198.18.7.9", "198.18.7.10", "198.19.3.4");
    ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": "198.18.7.0/24"}));
    ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": host, "ttl_seconds": 3600}));
    ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": "198.19.0.0/16", "ttl_seconds": 3600}));
    ok(&w, json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "force": true}));
    let before = now();
    for addr in [host, wider] {
        let reply = ok(&w, json!({"cmd": "check", "account": "cust", "addr": addr, "method": "password"}));
        assert_eq!(reply["reason"], "allowed", "{reply}");
    }
    // Listing waits for the account's counted checks, so the evidence shows at once.
    let seen = listed(&w, None);
    let signin = |cidr: &str| seen.iter().find(|(c, ..)| c == cidr).unwrap_or_else(|| panic!("{cidr}: {seen:?}")).1;
    assert!(signin("198.18.7.9/32").is_some_and(|t| (before..=now()).contains(&t)), "host entry: {seen:?}");
    assert!(signin("198.19.0.0/16").is_some_and(|t| (before..=now()).contains(&t)), "expiring /16: {seen:?}");
    assert_eq!(signin("198.18.7.0/24"), None, "the /24 let no check in: {seen:?}");

    let reply = ok(&w, json!({"cmd": "check", "account": "cust", "addr": other, "method": "password"}));
    assert_eq!(reply["reason"], "allowed", "{reply}");
    let seen = listed(&w, None);
    let signin = |cidr: &str| seen.iter().find(|(c, ..)| c == cidr).unwrap().1;
    assert!(signin("198.18.7.0/24").is_some(), "the /24 let {other} in: {seen:?}");
}

/// A datagram let through by an entry with an expiry is credited to that entry: its key in
/// the kernel is its own, and the stamp scan must find the entry among the expiring ones too.
#[test]
fn an_entry_with_an_expiry_is_credited_with_the_packets_it_lets_in() {
    let w = World::new("");
    let src = w.hosts.client_v4[0];
    let (_server, dst) = bound_customer(&w, 7402);
    let host = format!("{src}/32");
    let net24 = format!("{}/24", Ipv4Addr::from(u32::from(src) & 0xffff_ff00));
    ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": net24}));
    ok(&w, json!({"cmd": "allow_add", "account": "cust", "cidr": host, "ttl_seconds": 3600}));
    ok(&w, json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "force": true}));
    let before = now();
    let sock = udp_client(&w.hosts.client, src.into(), dst);
    assert!(echoed_udp(&sock, b"hello", 3, Duration::from_secs(2)) > 0, "the allowed datagram was not echoed");
    let seen = listed_once(&w, |seen| seen.iter().any(|(_, _, p)| p.is_some()));
    let packet = |cidr: &str| seen.iter().find(|(c, ..)| c == cidr).unwrap_or_else(|| panic!("{cidr}: {seen:?}")).2;
    assert!(packet(&host).is_some_and(|t| (before - 2..=now() + 1).contains(&t)), "{seen:?}");
    assert_eq!(packet(&net24), None, "the /24 holds the datagram's address but its key let nothing in: {seen:?}");
}
