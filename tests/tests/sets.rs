//! End to end, shared named sets: a set defined once lets every account that references it
//! in, on the wire and at sign-in; changing the set changes all of them with one command;
//! a reference can be disabled for one account; the lockout guard weighs set changes; a
//! restart keeps sets, references and the kernel's tables; bad input changes nothing. The
//! real daemon over its real socket, the real `ipaccessctl`, the real kernel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipaccess_tests::client::Client;
use ipaccess_tests::daemon::{World, without_last_used};
use ipaccess_tests::netns::{TestHosts, UdpEchoServer, icmp_echo, udp_roundtrip};
use serde_json::{Value, json};

const OK: Duration = Duration::from_secs(2);
const FAIL: Duration = Duration::from_millis(500);
/// Account `cust` owns UDP `PORT`, `cust2` the next port.
const PORT: u16 = 7300;

/// `ipaccessctl --json ARGS`, which must succeed; its result.
fn ctl_ok(w: &World, args: &[&str]) -> Value {
    let out = w.ctl(&[&["--json"], args].concat());
    assert_eq!(out.code, 0, "ipaccessctl {args:?}: {}{}", out.stdout, out.stderr);
    out.json()
}

/// `ipaccessctl ARGS`, which must fail; the error code it printed (`(code)` on stderr).
fn ctl_fails(w: &World, args: &[&str]) -> String {
    let out = w.ctl(args);
    assert_ne!(out.code, 0, "ipaccessctl {args:?} succeeded: {}", out.stdout);
    out.stderr
}

/// A UDP datagram from `src` reaches `port` on the server and comes back.
fn udp_ok(hosts: &TestHosts, src: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let dst = SocketAddr::new(hosts.server_v4.into(), port);
    hosts.client.run(move || udp_roundtrip(src.into(), dst, b"sets", timeout))
}

/// Accounts `cust` (UDP `PORT`) and `cust2` (`PORT + 1`), each enforcing with only `good`
/// on its own allowlist; the echo servers (keep them alive).
fn two_enforcing_customers(w: &World, good: Ipv4Addr) -> Vec<UdpEchoServer> {
    let mut servers = Vec::new();
    for (account, port) in [("cust", PORT), ("cust2", PORT + 1)] {
        let addr = SocketAddr::new(w.hosts.server_v4.into(), port);
        servers.push(UdpEchoServer::start_in(&w.hosts.server, addr).unwrap());
        w.ok(json!({"cmd": "account_add", "account": account}));
        w.ok(json!({"cmd": "bind_add", "account": account, "addr": w.hosts.server_v4.to_string(), "port": port,
                    "proto": "udp"}));
        w.ok(json!({"cmd": "allow_add", "account": account, "cidr": format!("{good}/32")}));
        w.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce", "client_ip": good.to_string()}));
    }
    let dst = IpAddr::from(w.hosts.server_v4);
    for &src in &w.hosts.client_v4 {
        assert!(w.hosts.client.run(move || icmp_echo(src.into(), dst, OK)), "ping {src} -> {dst}");
    }
    servers
}

/// A check that records nothing: (allowed, detail).
fn would(w: &World, account: &str, addr: Ipv4Addr) -> (bool, String) {
    let c = w.ok(json!({"cmd": "check", "account": account, "addr": addr.to_string(), "dry_run": true}));
    (c["allowed"].as_bool().unwrap(), c["detail"].as_str().unwrap().to_string())
}

/// Whether `src` gets through to `cust` and to `cust2`, on the wire and at sign-in (which
/// must agree).
fn both(w: &World, src: Ipv4Addr) -> (bool, bool) {
    let wire = (udp_ok(&w.hosts, src, PORT, OK), udp_ok(&w.hosts, src, PORT + 1, OK));
    let checks = (would(w, "cust", src).0, would(w, "cust2", src).0);
    assert_eq!(wire, checks, "{src}: the kernel (cust, cust2) and the checks disagree");
    wire
}

fn host(addr: Ipv4Addr) -> String {
    format!("{addr}/32")
}

/// A set referenced by two accounts lets both in on the wire and at sign-in; adding a
/// network to it and removing one change both with one command each; disabling the
/// reference for one account shuts only that one out; `allow list` shows the set's networks
/// as inherited rows, marked with their source and whether the reference is enabled.
#[test]
fn a_set_changes_every_referencing_account_at_once() {
    let w = World::new("");
    let [good, vpn, ci, _] = w.hosts.client_v4[..] else { panic!() };
    let _servers = two_enforcing_customers(&w, good);
    assert_eq!(both(&w, vpn), (false, false), "before the set");

    let created = ctl_ok(&w, &["set", "add", "corp-vpn", &host(vpn), "--label", "office VPN"]);
    assert_eq!(created["entries"][0]["cidr"], host(vpn), "{created}");
    assert_eq!(created["references"], json!([]), "{created}");
    assert_eq!(both(&w, vpn), (false, false), "a set nobody references lets nobody in");
    ctl_ok(&w, &["allow", "add-set", "cust", "corp-vpn"]);
    ctl_ok(&w, &["allow", "add-set", "cust2", "corp-vpn"]);
    assert_eq!(both(&w, vpn), (true, true), "both references let the set's network in");
    let (_, detail) = would(&w, "cust", vpn);
    assert!(detail.contains("corp-vpn") && detail.contains(&host(vpn)), "the check names the set: {detail}");
    // The datagrams are the set network's last-used evidence (the kernel's stamp, read
    // every second), in `set show` and in each account's inherited row.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let shown = loop {
        let shown = w.ok(json!({"cmd": "set_show", "set": "corp-vpn"}));
        if shown["entries"][0].get("last_packet_at").is_some() || std::time::Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let last_packet =
        shown["entries"][0]["last_packet_at"].as_i64().unwrap_or_else(|| panic!("no last packet: {shown}"));
    let list = w.ok(json!({"cmd": "allow_list", "account": "cust2"}));
    let row = list.as_array().unwrap().iter().find(|e| e["source"] == "set:corp-vpn").unwrap().clone();
    assert_eq!(row["last_packet_at"], last_packet, "{list}");

    // One command, both accounts: in and out.
    ctl_ok(&w, &["set", "add", "corp-vpn", &host(ci)]);
    assert_eq!(both(&w, ci), (true, true), "a network added to the set");
    ctl_ok(&w, &["set", "remove", "corp-vpn", &host(ci)]);
    assert_eq!(both(&w, ci), (false, false), "a network removed from the set");
    assert_eq!(both(&w, good), (true, true), "own entries stay");

    // Disabled for cust2 only.
    let disabled = ctl_ok(&w, &["allow", "disable-set", "cust2", "corp-vpn"]);
    assert_eq!(disabled["enabled"], false, "{disabled}");
    assert_eq!(both(&w, vpn), (true, false), "the disabled reference shuts out only cust2");
    let listed = w.ctl(&["allow", "list", "cust2"]);
    assert!(listed.stdout.contains("SOURCE") && listed.stdout.contains("set:corp-vpn"), "{}", listed.stdout);
    // `account show` names the account's references, disabled ones too.
    let shown = ctl_ok(&w, &["account", "show", "cust2"]);
    assert_eq!(
        (shown["sets"][0]["set"].clone(), shown["sets"][0]["enabled"].clone()),
        (json!("corp-vpn"), json!(false))
    );
    let shown = w.ctl(&["account", "show", "cust2"]).stdout;
    assert!(shown.contains("shared sets:\nSET") && shown.contains("corp-vpn  disabled"), "{shown}");
    let inherited: Vec<Value> = w
        .ok(json!({"cmd": "allow_list", "account": "cust2"}))
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("source").is_some())
        .cloned()
        .collect();
    assert_eq!(inherited.len(), 1, "{inherited:?}");
    assert_eq!(inherited[0]["source"], "set:corp-vpn");
    assert_eq!(inherited[0]["enabled"], false);
    assert_eq!(inherited[0]["label"], "office VPN");
    let own = w.ok(json!({"cmd": "allow_list", "account": "cust"}));
    assert!(own.as_array().unwrap().iter().any(|e| e["cidr"] == host(good) && e.get("source").is_none()), "{own}");
    // --unused lists own entries only: a set's networks are reviewed with the set.
    let unused = w.ok(json!({"cmd": "allow_list", "account": "cust", "unused": 0}));
    assert!(unused.as_array().unwrap().iter().all(|e| e.get("source").is_none()), "{unused}");

    ctl_ok(&w, &["allow", "enable-set", "cust2", "corp-vpn"]);
    assert_eq!(both(&w, vpn), (true, true), "enabled again");
    let shown = ctl_ok(&w, &["set", "show", "corp-vpn"]);
    let referrers: Vec<&str> =
        shown["references"].as_array().unwrap().iter().map(|r| r["account"].as_str().unwrap()).collect();
    assert_eq!(referrers, ["cust", "cust2"], "{shown}");
    let list = ctl_ok(&w, &["set", "list"]);
    assert_eq!(
        list,
        json!([{"set": "corp-vpn", "entries": 1, "references": 2, "enabled_references": 2,
                             "created_at": list[0]["created_at"], "created_by": 0}])
    );
    let removed = ctl_ok(&w, &["allow", "remove-set", "cust", "corp-vpn"]);
    assert_eq!(removed["set"], "corp-vpn");
    assert_eq!(both(&w, vpn), (false, true), "the removed reference");
    let audits = w.ok(json!({"cmd": "activity", "account": "set:corp-vpn", "kind": "audit"}));
    let actions: Vec<&str> = audits.as_array().unwrap().iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "set_add").count(), 2, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| **a == "set_remove").count(), 1, "{actions:?}");

    // A sign-in through the set (a check that is recorded; last, since the lockout guard
    // then protects it) is the set network's evidence too, in `set show` (the CLI's table as
    // well) and in the account's inherited row.
    assert_eq!(w.ok(json!({"cmd": "check", "account": "cust2", "addr": vpn.to_string()}))["allowed"], true);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let shown = loop {
        let shown = w.ok(json!({"cmd": "set_show", "set": "corp-vpn"}));
        if shown["entries"][0].get("last_signin_at").is_some() || std::time::Instant::now() > deadline {
            break shown;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let last_signin =
        shown["entries"][0]["last_signin_at"].as_i64().unwrap_or_else(|| panic!("no last sign-in: {shown}"));
    let list = w.ok(json!({"cmd": "allow_list", "account": "cust2"}));
    let row = list.as_array().unwrap().iter().find(|e| e["source"] == "set:corp-vpn").unwrap().clone();
    assert_eq!(row["last_signin_at"], last_signin, "{list}");
    let table = w.ctl_ok(&["set", "show", "corp-vpn"]);
    assert!(table.contains("LAST SIGN-IN") && table.contains("LAST PACKET"), "{table}");
    let network_row = table.lines().find(|l| l.starts_with(&host(vpn))).unwrap_or_else(|| panic!("{table}"));
    assert!(!network_row.trim_end().ends_with('-'), "no evidence shown: {network_row}");
}

/// A set change that would shut out a recent successful sign-in of an enforcing account
/// (one that nothing else of the account lets in) is refused, naming the account and the
/// address, and changes nothing; so are disabling and removing the reference; deleting a
/// referenced set is refused naming the accounts; --force does each.
#[test]
fn the_lockout_guard_weighs_set_changes() {
    let w = World::new("");
    let [good, vpn, other, _] = w.hosts.client_v4[..] else { panic!() };
    let _servers = two_enforcing_customers(&w, good);
    ctl_ok(&w, &["set", "add", "corp-vpn", &host(vpn), &host(other)]);
    ctl_ok(&w, &["allow", "add-set", "cust", "corp-vpn"]);
    ctl_ok(&w, &["allow", "add-set", "cust2", "corp-vpn"]);
    // cust signs in through the set from vpn; cust2 has its own entry for it too.
    ctl_ok(&w, &["allow", "add", "cust2", &host(vpn)]);
    assert_eq!(w.check("cust", vpn, "password")["allowed"], true);
    assert_eq!(w.check("cust2", vpn, "password")["allowed"], true);
    let before = ctl_ok(&w, &["set", "show", "corp-vpn"]);

    let (code, message) = w.err(json!({"cmd": "set_remove", "set": "corp-vpn", "cidrs": [host(vpn)]}));
    assert_eq!(code, "lockout", "{message}");
    assert!(message.contains("cust from 198.18.0.11"), "names the account and the address: {message}");
    assert!(!message.contains("cust2"), "cust2 keeps its own entry for it: {message}");
    let reply = w.conn().request(json!({"cmd": "set_remove", "set": "corp-vpn", "cidrs": [host(vpn)]}));
    let details = &reply["error"]["details"];
    assert_eq!(details["shut_out"][0]["account"], "cust", "{reply}");
    assert_eq!(details["shut_out"][0]["address"], vpn.to_string(), "{reply}");
    // Removing a network nobody signed in from passes.
    ctl_ok(&w, &["set", "remove", "corp-vpn", &host(other)]);
    ctl_ok(&w, &["set", "add", "corp-vpn", &host(other)]);
    let cidrs = |set: &Value| set["entries"].as_array().unwrap().iter().map(|e| e["cidr"].clone()).collect::<Vec<_>>();
    assert_eq!(cidrs(&ctl_ok(&w, &["set", "show", "corp-vpn"])), cidrs(&before));

    for args in [&["allow", "disable-set", "cust", "corp-vpn"][..], &["allow", "remove-set", "cust", "corp-vpn"]] {
        let stderr = ctl_fails(&w, args);
        assert!(stderr.contains("(lockout)") && stderr.contains(&vpn.to_string()), "{args:?}: {stderr}");
    }
    let stderr = ctl_fails(&w, &["set", "delete", "corp-vpn"]);
    assert!(stderr.contains("(set_in_use)") && stderr.contains("cust, cust2"), "{stderr}");
    // Nothing of those changed, in the store or the kernel.
    assert_eq!(ctl_ok(&w, &["set", "show", "corp-vpn"])["references"], before["references"]);
    assert!(udp_ok(&w.hosts, vpn, PORT, OK), "a refused change reached the kernel");

    ctl_ok(&w, &["set", "remove", "corp-vpn", &host(vpn), "--force"]);
    assert!(!udp_ok(&w.hosts, vpn, PORT, FAIL), "the forced removal did not reach the kernel");
    assert!(!would(&w, "cust", vpn).0);
    assert!(udp_ok(&w.hosts, vpn, PORT + 1, OK), "cust2's own entry stays");
    let deleted = ctl_ok(&w, &["set", "delete", "corp-vpn", "--force"]);
    assert_eq!(deleted["references_removed"], json!(["cust", "cust2"]), "{deleted}");
    assert_eq!(w.err(json!({"cmd": "set_show", "set": "corp-vpn"})).0, "unknown_set");
    assert!(!udp_ok(&w.hosts, other, PORT, FAIL) && !udp_ok(&w.hosts, other, PORT + 1, FAIL), "the deleted set");
    let listed = w.ok(json!({"cmd": "allow_list", "account": "cust"}));
    assert!(listed.as_array().unwrap().iter().all(|e| e.get("source").is_none()), "{listed}");
}

/// A restart keeps sets, references (a disabled one too) and the kernel's set tables: the
/// datagram passes while the daemon is down and after it is back, and the daemon reports
/// the same sets.
/// An override is refused for an address an enabled set already lets in (it would change
/// nothing, and count against the account's overrides), and granted once the account's
/// reference to the set is disabled.
#[test]
fn no_override_for_what_a_set_already_allows() {
    let w = World::new("");
    ctl_ok(&w, &["account", "add", "cust"]);
    ctl_ok(&w, &["allow", "add", "cust", "198.18.60.0/24"]);
    ctl_ok(&w, &["set", "add", "vpn", "198.18.41.0/24"]);
    ctl_ok(&w, &["allow", "add-set", "cust", "vpn"]);
    ctl_ok(&w, &["account", "mode", "cust", "enforce", "--force"]);
    let grant =
        ["override", "grant", "cust", "198.18.41.5", "--ttl", "1h", "--ticket", "T-1", "--reason", "locked out"];
    let refused = ctl_fails(&w, &grant);
    assert!(refused.contains("(refused)") && refused.contains("of the shared set vpn"), "{refused}");
    assert_eq!(ctl_ok(&w, &["override", "list", "cust"]), json!([]), "a refused grant was kept");
    ctl_ok(&w, &["allow", "disable-set", "cust", "vpn", "--force"]);
    assert_eq!(ctl_ok(&w, &grant)["override"]["cidr"], "198.18.41.5/32");
}

#[test]
fn a_restart_keeps_sets_and_references() {
    let mut w = World::new("");
    let [good, vpn, ci, _] = w.hosts.client_v4[..] else { panic!() };
    let _servers = two_enforcing_customers(&w, good);
    ctl_ok(&w, &["set", "add", "corp-vpn", &host(vpn)]);
    ctl_ok(&w, &["set", "add", "ci", &host(ci)]);
    ctl_ok(&w, &["allow", "add-set", "cust", "corp-vpn"]);
    ctl_ok(&w, &["allow", "add-set", "cust2", "corp-vpn"]);
    ctl_ok(&w, &["allow", "add-set", "cust2", "ci"]);
    ctl_ok(&w, &["allow", "disable-set", "cust2", "corp-vpn"]);
    // Compared as policy: without the last-used evidence the test's own datagrams move.
    let snapshot = |w: &World| {
        let mut shown = w.ok(json!({"cmd": "set_show", "set": "corp-vpn"}));
        shown["entries"] = without_last_used(shown["entries"].take());
        json!([
            w.ok(json!({"cmd": "set_list"})),
            shown,
            without_last_used(w.ok(json!({"cmd": "allow_list", "account": "cust"}))),
            without_last_used(w.ok(json!({"cmd": "allow_list", "account": "cust2"})))
        ])
    };
    let before = snapshot(&w);
    assert_eq!(both(&w, vpn), (true, false));
    assert_eq!(both(&w, ci), (false, true));

    w.stop();
    assert!(
        udp_ok(&w.hosts, vpn, PORT, OK) && udp_ok(&w.hosts, ci, PORT + 1, OK),
        "the kernel forgot a set while the daemon was down"
    );
    assert!(!udp_ok(&w.hosts, vpn, PORT + 1, FAIL), "the disabled reference let in while the daemon was down");
    w.start("");
    assert_eq!(snapshot(&w), before, "the restart changed what the daemon reports");
    assert_eq!(both(&w, vpn), (true, false), "after the restart");
    assert_eq!(both(&w, ci), (false, true), "after the restart");
    // It goes on working: a set change after the restart reaches the kernel.
    ctl_ok(&w, &["set", "remove", "ci", &host(ci)]);
    assert_eq!(both(&w, ci), (false, false));
}

/// A restart finds the set groups' tables in the kernel and keeps them, brought up to date in
/// place: on a host whose tables have too little room left for a second copy of a large set,
/// the daemon starts again (twice), enforces the set as before, and uses no more slots; and
/// a network removed from the set then is removed in place, not refused for want of room.
#[test]
fn a_restart_on_nearly_full_tables_keeps_the_set_groups_in_place() {
    const LIMITS: &str = "[limits]\nmax_entries_per_account = 100000\n";
    const MAPS: &str = "[maps]\nslots = 8192\naccounts = 64\n";
    let mut w = World::with_maps(LIMITS, MAPS);
    let [good, vpn, _, stranger] = w.hosts.client_v4[..] else { panic!() };
    let _servers = two_enforcing_customers(&w, good);
    // 800 host networks (the VPN's address among them): the group's table takes 2,048 slots.
    let mut networks: Vec<String> = (0..799u32).map(|n| format!("198.19.{}.{}/32", n / 200, n % 200 + 1)).collect();
    networks.push(host(vpn));
    w.ok(json!({"cmd": "set_add", "set": "corp-vpn", "cidrs": networks}));
    for account in ["cust", "cust2"] {
        w.ok(json!({"cmd": "allow_add_set", "account": account, "set": "corp-vpn"}));
    }
    let status = |w: &World| {
        let status = w.ok(json!({"cmd": "status"}));
        (status["table_slots"].as_u64().unwrap(), status["table_slots_used"].as_u64().unwrap())
    };
    let free = |w: &World| status(w).0 - status(w).1;
    // Other accounts' host entries until fewer slots are free than the group takes: each
    // filler until its table cannot grow, then the next one.
    let mut fillers = Vec::new();
    'fill: for k in 0..32u32 {
        let filler = format!("filler{k}");
        w.ok(json!({"cmd": "account_add", "account": filler}));
        fillers.push(filler.clone());
        for n in 0..4096u32 {
            if n % 16 == 0 && free(&w) < 1_500 {
                break 'fill;
            }
            let reply =
                w.conn().request(json!({"cmd": "allow_add", "account": filler, "cidr": format!("fd00::{k:x}:{n:x}")}));
            if let Some(error) = reply.get("error") {
                assert_eq!(error["code"], "tables_full", "{reply}");
                break;
            }
        }
    }
    assert!(free(&w) < 1_500, "{:?}", status(&w));
    let (_, before) = status(&w);
    assert_eq!(both(&w, vpn), (true, true));
    for round in 1..=2 {
        w.stop();
        w.start_with_maps(LIMITS, MAPS);
        assert_eq!(both(&w, vpn), (true, true), "restart {round}");
        assert_eq!(both(&w, stranger), (false, false), "restart {round}");
        let (_, used) = status(&w);
        assert!(used <= before, "restart {round}: {used} slots used, {before} before");
    }
    // The kept group still follows the set. A set change builds the group's next table
    // beside it when there is room; here there is none, and a removal is made in place
    // rather than refused (the removed network would go on being let in).
    assert!(free(&w) < 1_500, "{:?}", status(&w));
    w.ok(json!({"cmd": "set_remove", "set": "corp-vpn", "cidrs": [host(vpn)]}));
    assert_eq!(both(&w, vpn), (false, false));
    assert_eq!(both(&w, good), (true, true), "an account's own entry");
    let (_, used) = status(&w);
    assert!(used <= before, "{used} slots used, {before} before");
    // With room again, a change is built beside the old table and switched at one store.
    for filler in &fillers {
        w.ok(json!({"cmd": "allow_replace", "account": filler, "entries": [], "force": true}));
    }
    let addition = json!({"cmd": "set_add", "set": "corp-vpn", "cidrs": [host(vpn)]});
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.conn().request(addition.clone()).get("ok").is_none() {
        assert!(std::time::Instant::now() < deadline, "the set's change was refused: {:?}", status(&w));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(both(&w, vpn), (true, true));
}

/// Bad input gets a structured error and changes nothing: unknown sets, whole-Internet and
/// host-bit networks, bad names, a network the set holds already among new ones, one it
/// lacks, and a reference over the per-account limit.
#[test]
fn bad_input_changes_nothing() {
    let w = World::new("");
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    let code = |request: Value| w.err(request).0;
    assert_eq!(code(json!({"cmd": "allow_add_set", "account": "acme", "set": "nope"})), "unknown_set");
    assert_eq!(code(json!({"cmd": "allow_add_set", "account": "ghost", "set": "nope"})), "unknown_account");
    assert_eq!(code(json!({"cmd": "set_remove", "set": "nope", "cidrs": ["198.18.1.0/24"]})), "unknown_set");
    assert_eq!(code(json!({"cmd": "set_delete", "set": "nope"})), "unknown_set");
    for cidr in ["0.0.0.0/0", "::/0", "198.18.1.7/24"] {
        let (c, message) = w.err(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["198.18.1.0/24", cidr]}));
        assert_eq!(c, "bad_request", "{cidr}: {message}");
    }
    for name in ["-vpn", "corp vpn", "set:vpn", "vpn\u{202e}", ""] {
        assert_eq!(code(json!({"cmd": "set_add", "set": name, "cidrs": ["198.18.1.0/24"]})), "bad_request", "{name:?}");
    }
    assert_eq!(code(json!({"cmd": "set_add", "set": "vpn", "cidrs": []})), "bad_request");
    assert_eq!(w.ok(json!({"cmd": "set_list"})), json!([]), "a refused set_add created a set");

    w.ok(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["198.18.1.0/24"]}));
    let vpn = w.ok(json!({"cmd": "set_show", "set": "vpn"}));
    assert_eq!(
        code(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["198.18.2.0/24", "198.18.1.0/24"]})),
        "entry_exists"
    );
    assert_eq!(
        code(json!({"cmd": "set_remove", "set": "vpn", "cidrs": ["198.18.1.0/24", "198.18.9.0/24"]})),
        "unknown_entry"
    );
    assert_eq!(w.ok(json!({"cmd": "set_show", "set": "vpn"})), vpn, "a refused change changed the set");
    assert_eq!(code(json!({"cmd": "allow_remove_set", "account": "acme", "set": "vpn"})), "unknown_entry");

    // Eight enabled references at most; a ninth, or enabling one over the limit, is refused.
    for n in 0..9 {
        w.ok(json!({"cmd": "set_add", "set": format!("s{n}"), "cidrs": [format!("198.18.{}.0/24", 100 + n)]}));
    }
    for n in 0..8 {
        w.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": format!("s{n}")}));
    }
    let before = w.ok(json!({"cmd": "allow_list", "account": "acme"}));
    let reply = w.conn().request(json!({"cmd": "allow_add_set", "account": "acme", "set": "s8"}));
    assert_eq!(reply["error"]["code"], "too_many_sets", "{reply}");
    assert_eq!(reply["error"]["details"]["max"], 8, "{reply}");
    assert_eq!(w.ok(json!({"cmd": "allow_list", "account": "acme"})), before, "a refused reference was stored");
    w.ok(json!({"cmd": "allow_disable_set", "account": "acme", "set": "s0"}));
    w.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "s8"}));
    assert_eq!(code(json!({"cmd": "allow_enable_set", "account": "acme", "set": "s0"})), "too_many_sets");
    let stderr = ctl_fails(&w, &["allow", "add-set", "acme", "s8"]);
    assert!(stderr.contains("(entry_exists)"), "{stderr}");
}

/// Spellings of one network name one set entry: an IPv4-mapped IPv6 network is the IPv4
/// network (added, found as a duplicate and removed under either spelling), and so is a
/// sign-in from an IPv4-mapped address (dual-stack sockets report them); upper-case and
/// zero-compressed IPv6 name one entry; a zero-padded octet is refused and changes nothing.
#[test]
fn spellings_of_one_network_name_one_set_entry() {
    let w = World::new("");
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.10/32"}));
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": "198.18.0.10"}));
    let added = w.ok(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["::ffff:198.18.1.0/120", "FD00:0:0:0::/64"]}));
    let cidrs: Vec<&str> = added["entries"].as_array().unwrap().iter().map(|e| e["cidr"].as_str().unwrap()).collect();
    assert_eq!(cidrs, ["198.18.1.0/24", "fd00::/64"], "{added}");
    assert_eq!(w.err(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["198.18.1.0/24"]})).0, "entry_exists");
    assert_eq!(w.err(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["fd00::/64"]})).0, "entry_exists");
    assert_eq!(w.err(json!({"cmd": "set_add", "set": "vpn", "cidrs": ["198.018.2.0/24"]})).0, "bad_request");
    w.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "vpn"}));
    let check = |addr: &str| w.ok(json!({"cmd": "check", "account": "acme", "addr": addr, "dry_run": true}));
    for addr in ["::ffff:198.18.1.9", "198.18.1.9", "FD00::9"] {
        assert_eq!(check(addr)["allowed"], true, "{addr}: {}", check(addr));
    }
    w.ok(json!({"cmd": "set_remove", "set": "vpn", "cidrs": ["::ffff:198.18.1.0/120", "fd00:0::/64"], "force": true}));
    for addr in ["::ffff:198.18.1.9", "198.18.1.9", "fd00::9"] {
        assert_eq!(check(addr)["allowed"], false, "{addr}: {}", check(addr));
    }
    let shown = w.ok(json!({"cmd": "set_show", "set": "vpn"}));
    assert_eq!(shown["entries"], json!([]), "{shown}");
}

/// In a fleet a set is one etcd document and a reference part of the account's: a set made
/// through one node, referenced through another and changed through a third lets in (and
/// stops letting in) on every node's wire and in every node's checks; a reference disabled
/// on one node is disabled everywhere; a forced delete takes the references with it on
/// every node; a node that was away while a set was made, referenced and its watch
/// compacted takes it from the snapshot.
#[test]
fn a_fleet_shares_sets_and_references() {
    use ipaccess_tests::fleet::{Fleet, FleetNode, error_code};
    const TCP_PORT: u16 = 7444;
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(TCP_PORT);
    let hosts = &fleet.nodes[0].host.hosts;
    let (good, bad, server) = (hosts.client_v4[0], hosts.client_v4[1], hosts.server_v4);
    let (a, b, c) = (&fleet.nodes[0], &fleet.nodes[1], &fleet.nodes[2]);
    // acme's own allowlist lets in an unrelated address only; its port on every node.
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.77.7/32"}));
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": TCP_PORT}));
    b.host.ok(json!({"cmd": "set_add", "set": "corp-vpn", "cidrs": [host(good)], "label": "office"}));
    // (A change is in force on the node that made it when acknowledged; on the others once
    // they have applied it.)
    fleet.settle();
    c.host.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "corp-vpn"}));
    fleet.settle();
    // The lockout guard on node A counts the set node C referenced: enforcing is accepted.
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good.to_string()}));
    fleet.settle();
    let reaches = |node: &FleetNode, src: Ipv4Addr| {
        let target = SocketAddr::new(server.into(), TCP_PORT);
        let timeout = if node.check("acme", src.into()).0 { OK } else { FAIL };
        let wire = node.host.hosts.client.run(|| ipaccess_tests::netns::tcp_connect(src.into(), target, timeout));
        assert_eq!(wire, node.check("acme", src.into()).0, "{}: {src}: the wire and the checks disagree", node.name);
        wire
    };
    let listed = a.host.ok(json!({"cmd": "set_list"}));
    for node in &fleet.nodes {
        assert!(reaches(node, good) && !reaches(node, bad), "{}: the set does not let in alone", node.name);
        assert_eq!(node.host.ok(json!({"cmd": "set_list"})), listed, "{}", node.name);
        let inherited = without_last_used(node.host.ok(json!({"cmd": "allow_list", "account": "acme"})));
        let inherited = inherited.as_array().unwrap().iter().find(|r| r["source"] == "set:corp-vpn").cloned();
        assert_eq!(inherited.map(|r| r["cidr"].clone()), Some(json!(host(good))), "{}", node.name);
    }
    assert_eq!(listed[0]["references"], 1, "{listed}");

    // One command through node A adds a network to the set for every node; one through B
    // takes it away again.
    a.host.ok(json!({"cmd": "set_add", "set": "corp-vpn", "cidrs": [host(bad)]}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(reaches(node, bad), "{}: the set's new network does not let in", node.name);
    }
    b.host.ok(json!({"cmd": "set_remove", "set": "corp-vpn", "cidrs": [host(bad)]}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(!reaches(node, bad) && reaches(node, good), "{}", node.name);
    }

    // Disabled through B: no node lets the set's networks in for acme; enabled through C.
    b.host.ok(json!({"cmd": "allow_disable_set", "account": "acme", "set": "corp-vpn", "force": true}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(!reaches(node, good), "{}: a disabled reference still lets in", node.name);
    }
    c.host.ok(json!({"cmd": "allow_enable_set", "account": "acme", "set": "corp-vpn"}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(reaches(node, good), "{}", node.name);
    }

    // A referenced set is not deleted without --force, through any node.
    let refused = b.host.request(json!({"cmd": "set_delete", "set": "corp-vpn"}));
    assert_eq!(error_code(&refused).as_deref(), Some("set_in_use"), "{refused}");

    // Node C is away while a second set is made and referenced, and etcd compacts its history.
    fleet.nodes[2].stop();
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    a.host.ok(json!({"cmd": "set_add", "set": "partners", "cidrs": [host(bad)]}));
    fleet.settle();
    b.host.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "partners"}));
    let revision = b.applied();
    fleet.etcd.compact_latest().unwrap();
    fleet.nodes[2].start();
    fleet.converge(revision);
    let c = &fleet.nodes[2];
    assert!(reaches(c, bad) && reaches(c, good), "node C lacks the set made while it was away");
    assert_eq!(c.host.ok(json!({"cmd": "set_list"})), fleet.nodes[0].host.ok(json!({"cmd": "set_list"})));

    // A forced delete through C takes the set and its reference away on every node.
    let deleted = c.host.ok(json!({"cmd": "set_delete", "set": "partners", "force": true}));
    assert_eq!(deleted["references_removed"], json!(["acme"]), "{deleted}");
    fleet.settle();
    for node in &fleet.nodes {
        assert!(!reaches(node, bad) && reaches(node, good), "{}", node.name);
        let sets: Vec<Value> = node.host.ok(json!({"cmd": "set_list"})).as_array().unwrap().to_vec();
        assert_eq!(sets.iter().map(|s| s["set"].clone()).collect::<Vec<_>>(), [json!("corp-vpn")], "{}", node.name);
        let rows = node.host.ok(json!({"cmd": "allow_list", "account": "acme"}));
        assert!(!rows.to_string().contains("set:partners"), "{}: {rows}", node.name);
    }
    // The fleet's audit holds the set changes, whichever node made them.
    let activity = fleet.nodes[1].host.ok(json!({"cmd": "activity", "account": "set:partners"}));
    assert!(activity.to_string().contains("set_delete"), "{activity}");
}
