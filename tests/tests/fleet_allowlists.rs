//! Issue 13's allowlist features on a fleet: a real 3-member etcd cluster and 3 real
//! ipaccessd nodes. An entry's label, a bulk disable and a replacement's dry run made
//! through three different nodes read the same on every node (and the disable holds on the
//! wire); last-used evidence is each node's own and survives the node applying later changes
//! to the account; the per-account entry limit refuses an add or an import through any node
//! before anything reaches etcd; the lockout guard on any node weighs the sign-ins made on
//! another.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::{binaries, without_last_used};
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX};
use ipaccess_tests::netns::tcp_connect;
use serde_json::{Value, json};

const PORT: u16 = 7460;
/// Each node's metrics endpoint, inside its own server namespace.
const METRICS: &str = "127.0.0.1:9470";

/// Every key the nodes follow (the policy: accounts, sets, slots, bindings, sequences,
/// audit), each with its value and revisions; the nodes' own records (`P/~nodes/`,
/// `P/~attempts/`) sort after `~` and are left out, since a live node rewrites them.
fn policy_keys(fleet: &Fleet) -> Value {
    let end = format!("{PREFIX}~");
    let text = fleet.etcd.etcdctl(&["get", PREFIX, &end, "-w", "json"]).unwrap();
    let reply: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("etcdctl get: {e}: {text}"));
    reply.get("kvs").cloned().unwrap_or(json!([]))
}

/// The node's `allow_list` for acme.
fn allow_list(node: &FleetNode) -> Value {
    node.host.ok(json!({"cmd": "allow_list", "account": "acme"}))
}

/// The node's entry for `cidr` in acme's list.
fn entry(node: &FleetNode, cidr: &str) -> Value {
    let list = allow_list(node);
    list.as_array().unwrap().iter().find(|e| e["cidr"] == cidr).cloned().unwrap_or_else(|| {
        panic!("{}: no {cidr} in {list}", node.name);
    })
}

/// The error object of a request that must fail.
fn refused(node: &FleetNode, request: Value) -> Value {
    let reply = node.host.request(request.clone());
    reply.get("error").cloned().unwrap_or_else(|| panic!("{}: {request} was taken: {reply}", node.name))
}

/// A TCP connection from `src` (one of the node's client addresses) to the node's `PORT`.
fn connects(node: &FleetNode, src: Ipv4Addr, timeout: Duration) -> bool {
    let target = SocketAddr::new(node.host.hosts.server_v4.into(), PORT);
    node.host.hosts.client.run(|| tcp_connect(IpAddr::V4(src), target, timeout))
}

fn host(ip: Ipv4Addr) -> String {
    format!("{ip}/32")
}

/// acme, made through node A: the entries (with their labels), bound to `PORT` on every
/// node, enforcing (forced: no sign-in has been seen yet). Every node has applied it.
fn enforcing_acme(fleet: &Fleet, entries: &[(&str, Option<&str>)]) {
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    for (cidr, label) in entries {
        a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr, "label": label}));
    }
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": a.host.hosts.server_v4, "port": PORT}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    fleet.settle();
}

/// A label edited through B, an end given through C and taken away through A, a bulk
/// disable with `also` through C and a replacement's dry run through A (with the real
/// `ipaccessctl`): every node lists the same allowlist after each; the disabled addresses are
/// refused on every node's wire; the dry run leaves every key the nodes follow as it was.
#[test]
fn lifecycle_changes_through_any_node_read_the_same_on_every_node() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let clients = fleet.nodes[0].host.hosts.client_v4.clone();
    let (good, b, c) = (clients[0], clients[1], clients[2]);
    enforcing_acme(&fleet, &[(&host(good), Some("office")), (&host(b), None), (&host(c), Some("ci"))]);
    for node in &fleet.nodes {
        for src in [good, b, c] {
            assert!(connects(node, src, Duration::from_secs(2)), "{}: {src} refused before any change", node.name);
        }
    }

    let (a, nb, nc) = (&fleet.nodes[0], &fleet.nodes[1], &fleet.nodes[2]);
    nb.host.ok(json!({"cmd": "allow_label", "account": "acme", "cidr": host(b), "label": "home"}));
    fleet.settle();
    for node in &fleet.nodes {
        assert_eq!(entry(node, &host(b))["label"], "home", "{}", node.name);
    }

    // An end given through C reaches every node, and taken away through A it is gone everywhere.
    let ends = nc.host.ok(json!({"cmd": "allow_expiry", "account": "acme", "cidr": host(b), "ttl_seconds": 3600}));
    let end = ends["expires_at"].as_i64().unwrap_or_else(|| panic!("no end: {ends}"));
    fleet.settle();
    for node in &fleet.nodes {
        assert_eq!(entry(node, &host(b))["expires_at"], end, "{}", node.name);
    }
    a.host.ok(json!({"cmd": "allow_expiry", "account": "acme", "cidr": host(b)}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(entry(node, &host(b)).get("expires_at").is_none_or(Value::is_null), "{}", node.name);
    }

    let disabled = nc.host.ok(json!({"cmd": "allow_disable", "account": "acme", "cidr": host(b), "also": [host(c)]}));
    assert_eq!(disabled["enabled"], false, "{disabled}");
    fleet.settle();
    let reference = without_last_used(allow_list(a));
    let enabled: Vec<(&str, bool)> =
        reference.as_array().unwrap().iter().map(|e| (e["cidr"].as_str().unwrap(), e["enabled"] == true)).collect();
    assert_eq!(enabled, [(host(good).as_str(), true), (&host(b), false), (&host(c), false)], "{reference}");
    for node in &fleet.nodes {
        assert_eq!(without_last_used(allow_list(node)), reference, "{} lists another allowlist", node.name);
        // The node that took the change and the two that applied it refuse both on the wire.
        assert!(connects(node, good, Duration::from_secs(2)), "{}: the enabled entry stopped working", node.name);
        for src in [b, c] {
            assert!(!connects(node, src, Duration::from_millis(500)), "{}: disabled {src} still gets in", node.name);
        }
    }

    // The dry run through A: what it would do, and nothing done, in etcd or on any node.
    let keys = policy_keys(&fleet);
    let file = a.host.path("replacement");
    std::fs::write(&file, format!("{} office\n198.18.60.0/24 branch\n", host(good))).unwrap();
    let out = Command::new(&binaries().ctl)
        .args(["--socket", a.host.socket().to_str().unwrap(), "--json", "allow", "replace", "acme"])
        .args(["--file", file.to_str().unwrap(), "--dry-run"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let dry = &plan["dry_run"];
    assert_eq!(dry["added"], json!(["198.18.60.0/24"]), "{plan}");
    assert_eq!(dry["removed"], json!([host(b), host(c)]), "{plan}");
    assert_eq!(dry["unchanged"], json!([host(good)]), "{plan}");
    assert_eq!(without_last_used(plan["entries"].clone()), reference, "{plan}");
    assert_eq!(policy_keys(&fleet), keys, "the dry run wrote to etcd");
    // A change made after it is applied by every node before they are compared: a dry run
    // that had reached etcd would show on all of them by then.
    fleet.converge(fleet.barrier().unwrap());
    for node in &fleet.nodes {
        assert_eq!(without_last_used(allow_list(node)), reference, "{}: the dry run changed the list", node.name);
    }
}

/// acme's entries on `node` as (cidr, last sign-in, last packet).
type Evidence = Vec<(String, Option<i64>, Option<i64>)>;

fn evidence(node: &FleetNode, unused: Option<u64>) -> Evidence {
    let mut request = json!({"cmd": "allow_list", "account": "acme"});
    if let Some(window) = unused {
        request["unused"] = json!(window);
    }
    let list = node.host.ok(request);
    list.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["cidr"].as_str().unwrap().to_owned(), e["last_signin_at"].as_i64(), e["last_packet_at"].as_i64()))
        .collect()
}

fn used(evidence: &Evidence, cidr: &str) -> (Option<i64>, Option<i64>) {
    let row = evidence.iter().find(|(c, ..)| c == cidr).unwrap_or_else(|| panic!("no {cidr} in {evidence:?}"));
    (row.1, row.2)
}

/// Waits (at most 10 s: packet stamps are read once a second) until `node` shows `what` of
/// `cidr`, and returns the node's evidence.
fn wait_evidence(node: &FleetNode, cidr: &str, what: fn((Option<i64>, Option<i64>)) -> bool) -> Evidence {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = evidence(node, None);
        if what(used(&seen, cidr)) {
            return seen;
        }
        assert!(Instant::now() < deadline, "{}: never showed the use of {cidr}: {seen:?}", node.name);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cidrs(evidence: &Evidence) -> Vec<&str> {
    let mut cidrs: Vec<&str> = evidence.iter().map(|(c, ..)| c.as_str()).collect();
    cidrs.sort();
    cidrs
}

/// A sign-in answered by node B is B's evidence, a packet on node C's wire is C's; node A,
/// which saw neither, shows none, and each node's `--unused` lists what it saw unused
/// (docs/operations.md, "Unused entries"). Changes to acme made through A afterwards (an
/// entry added, the used entry relabelled), which B and C apply by rewriting acme's rows,
/// keep the evidence; an entry removed and added again does not inherit its predecessor's.
#[test]
fn last_used_evidence_is_each_nodes_own_and_outlives_later_changes() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let clients = fleet.nodes[0].host.hosts.client_v4.clone();
    let (packets_from, signs_in) = (clients[0], clients[1]);
    let (packet_entry, signin_entry, idle) = (host(packets_from), host(signs_in), "203.0.113.0/24".to_owned());
    enforcing_acme(&fleet, &[(&packet_entry, None), (&signin_entry, None), (&idle, None)]);
    // Entries older than the 4 s window used below before anything uses them.
    std::thread::sleep(Duration::from_secs(6));
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;

    let (a, b, c) = (&fleet.nodes[0], &fleet.nodes[1], &fleet.nodes[2]);
    let check = b.host.ok(json!({"cmd": "check", "account": "acme", "addr": signs_in, "method": "password"}));
    assert_eq!(check["reason"], "allowed", "{check}");
    assert!(connects(c, packets_from, Duration::from_secs(2)), "node C refused an allowed address");

    let on_b = wait_evidence(b, &signin_entry, |(signin, _)| signin.is_some());
    let on_c = wait_evidence(c, &packet_entry, |(_, packet)| packet.is_some());
    let signed_in = used(&on_b, &signin_entry).0.unwrap();
    let packet = used(&on_c, &packet_entry).1.unwrap();
    // A packet's time may read up to a second early.
    assert!(signed_in >= started && packet >= started - 1, "{on_b:?} {on_c:?}");
    assert_eq!(used(&on_b, &packet_entry), (None, None), "B credited C's packet: {on_b:?}");
    assert_eq!(used(&on_c, &signin_entry), (None, None), "C credited B's sign-in: {on_c:?}");
    for (node, seen) in [(b, &on_b), (c, &on_c)] {
        assert_eq!(used(seen, &idle), (None, None), "{}: {seen:?}", node.name);
    }
    let on_a = evidence(a, None);
    assert!(on_a.iter().all(|(_, s, p)| s.is_none() && p.is_none()), "A shows another node's evidence: {on_a:?}");

    assert_eq!(cidrs(&evidence(a, Some(4))), [packet_entry.as_str(), &signin_entry, &idle]);
    assert_eq!(cidrs(&evidence(b, Some(4))), [packet_entry.as_str(), &idle]);
    assert_eq!(cidrs(&evidence(c, Some(4))), [signin_entry.as_str(), &idle]);

    // Later changes through A, applied by B and C from acme's rewritten document.
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.60.0/24"}));
    a.host.ok(json!({"cmd": "allow_label", "account": "acme", "cidr": signin_entry, "label": "home"}));
    a.host.ok(json!({"cmd": "allow_label", "account": "acme", "cidr": packet_entry, "label": "office"}));
    fleet.settle();
    assert_eq!(entry(b, &signin_entry)["label"], "home");
    assert_eq!(entry(c, &packet_entry)["label"], "office");
    assert_eq!(used(&evidence(b, None), &signin_entry).0, Some(signed_in), "B lost its sign-in to A's change");
    assert_eq!(used(&evidence(c, None), &packet_entry).1, Some(packet), "C lost its packet to A's change");
    assert_eq!(cidrs(&evidence(b, Some(4))), [packet_entry.as_str(), &idle], "B's unused list changed");

    // Removed and added again through A (a second later than the sign-in): a new entry,
    // which the old one's sign-in does not vouch for.
    std::thread::sleep(Duration::from_millis(1100));
    a.host.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": signin_entry, "force": true}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": signin_entry}));
    fleet.settle();
    assert_eq!(used(&evidence(b, None), &signin_entry), (None, None), "the re-added entry shows the old sign-in");
    assert_eq!(used(&evidence(c, None), &packet_entry).1, Some(packet), "C lost its packet to A's change");
}

/// `ipaccess_changes_refused_total{reason="too_many_entries"}` as the node's endpoint says.
fn too_many_entries_refused(node: &FleetNode) -> f64 {
    let addr: SocketAddr = METRICS.parse().unwrap();
    let response = node.host.hosts.server.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to /metrics");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    });
    let series = "ipaccess_changes_refused_total{reason=\"too_many_entries\"} ";
    let line = response.lines().find(|l| l.starts_with(series));
    line.and_then(|l| l[series.len()..].parse().ok())
        .unwrap_or_else(|| panic!("{}: no {series}in {response}", node.name))
}

/// `[limits] max_entries_per_account = 3` on every node: an `allow_add` past it through B
/// or C, and an `import` past it through C (alone or with an account it would create), are
/// refused with `too_many_entries` and its details, and counted in the refusing node's
/// metric; etcd's policy keys and every node's lists stay as they were. Up to the limit, an import through C reaches every node.
#[test]
fn the_entry_limit_refuses_through_any_node_before_etcd() {
    let mut fleet = Fleet::new(3).unwrap();
    for node in &fleet.nodes {
        node.write_config(PREFIX, &format!("[limits]\nmax_entries_per_account = 3\n[metrics]\nlisten = {METRICS:?}\n"));
    }
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    for cidr in ["198.18.1.0/24", "198.18.2.0/24", "198.18.3.0/24"] {
        a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr}));
    }
    fleet.settle();
    let keys = policy_keys(&fleet);
    let lists: Vec<Value> = fleet.nodes.iter().map(allow_list).collect();
    let expected = json!({"account": "acme", "entries": 4, "limit": "limits.max_entries_per_account", "max": 3});

    let (b, c) = (&fleet.nodes[1], &fleet.nodes[2]);
    for node in [b, c] {
        let error = refused(node, json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.4.0/24"}));
        assert_eq!(error["code"], "too_many_entries", "{}: {error}", node.name);
        assert_eq!(error["details"], expected, "{}: {error}", node.name);
    }
    let four = json!([{"cidr": "198.18.1.0/24"}, {"cidr": "198.18.2.0/24"}, {"cidr": "198.18.3.0/24"},
                      {"cidr": "198.18.4.0/24"}]);
    let imports = [
        json!({"cmd": "import", "accounts": [{"account": "acme", "entries": four}]}),
        json!({"cmd": "import", "accounts": [{"account": "newco", "entries": [{"cidr": "198.18.9.0/24"}]},
                                             {"account": "acme", "entries": four}]}),
    ];
    for import in imports {
        let error = refused(c, import.clone());
        assert_eq!(error["code"], "too_many_entries", "{import}: {error}");
        assert_eq!(error["details"]["max"], 3, "{import}: {error}");
        assert_eq!(error["details"]["entries"], 4, "{import}: {error}");
    }
    assert_eq!(policy_keys(&fleet), keys, "a refused change reached etcd");
    // Each node counts the refusals it made: B one add, C one add and two imports.
    let counted: Vec<f64> = fleet.nodes.iter().map(too_many_entries_refused).collect();
    assert_eq!(counted, [0.0, 1.0, 3.0]);
    fleet.converge(fleet.barrier().unwrap());
    for (node, before) in fleet.nodes.iter().zip(&lists) {
        assert_eq!(&allow_list(node), before, "{}: a refused change reached the node", node.name);
        let newco = node.host.request(json!({"cmd": "allow_list", "account": "newco"}));
        assert_eq!(newco["error"]["code"], "unknown_account", "{}: a refused import made newco: {newco}", node.name);
    }

    // At the limit, the same import is taken and reaches every node.
    let three = json!([{"cidr": "198.18.7.0/24"}, {"cidr": "198.18.8.0/24"}, {"cidr": "198.18.9.0/24"}]);
    c.host.ok(json!({"cmd": "import", "accounts": [{"account": "newco", "entries": three}]}));
    fleet.settle();
    for node in &fleet.nodes {
        let newco = node.host.ok(json!({"cmd": "allow_list", "account": "newco"}));
        assert_eq!(newco.as_array().map(Vec::len), Some(3), "{}: {newco}", node.name);
    }
}

/// The value node `node` published for acme's sign-ins from `address`, once it has (a pass
/// is 2 s; bounded).
fn published_signin(fleet: &Fleet, address: &str, node: &str) -> Value {
    let key = format!("{PREFIX}~signins/acme/{address}/{node}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = fleet.etcd.etcdctl(&["get", "--prefix", &key, "--print-value-only"]).unwrap();
        if let Some(line) = text.lines().find(|l| !l.trim().is_empty()) {
            return serde_json::from_str(line).unwrap_or_else(|e| panic!("{key}: {e}: {line}"));
        }
        assert!(Instant::now() < deadline, "{node} did not publish {key} within 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A customer signs in on node B, through an entry and through a shared set; once B has
/// published the sign-ins (`P/~signins/`), node A, which answered neither, refuses to remove
/// the entry or the set's network (`lockout`, naming the address), lists the address in a
/// replacement's dry run, and node C refuses too; forced, the removal goes through A and
/// reaches every node.
#[test]
fn the_lockout_guard_on_any_node_weighs_sign_ins_made_on_another() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let (through_entry, through_set) = ("198.18.0.11", "198.18.0.12");
    let (entry_cidr, set_cidr, kept) = (format!("{through_entry}/32"), format!("{through_set}/32"), "203.0.113.0/24");
    enforcing_acme(&fleet, &[(&entry_cidr, None), (kept, None)]);
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "set_add", "set": "office", "cidrs": [set_cidr]}));
    a.host.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "office"}));
    fleet.settle();
    let (a, b, c) = (&fleet.nodes[0], &fleet.nodes[1], &fleet.nodes[2]);
    let dry_run = json!({"cmd": "allow_replace", "account": "acme", "entries": [{"cidr": kept}], "dry_run": true});
    // Nobody has signed in yet: nothing to shut out.
    assert_eq!(a.host.ok(dry_run.clone())["dry_run"]["shut_out"], json!([]));

    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    for address in [through_entry, through_set] {
        let check = b.host.ok(json!({"cmd": "check", "account": "acme", "addr": address, "method": "password"}));
        assert_eq!(check["reason"], "allowed", "{check}");
    }
    for address in [through_entry, through_set] {
        let published = published_signin(&fleet, address, &b.name);
        assert!(published["last_seen"].as_i64().unwrap() >= started, "{published}");
    }

    let remove = json!({"cmd": "allow_remove", "account": "acme", "cidr": entry_cidr});
    for node in [a, c, b] {
        let error = refused(node, remove.clone());
        assert_eq!(error["code"], "lockout", "{}: {error}", node.name);
        let message = error["message"].as_str().unwrap();
        assert!(message.contains(&format!("add {through_entry} first")), "{}: {message}", node.name);
        let shut_out = &error["details"]["shut_out"];
        assert_eq!(shut_out.as_array().map(Vec::len), Some(1), "{}: {error}", node.name);
        assert_eq!(shut_out[0]["address"], through_entry, "{}: {error}", node.name);
        assert!(shut_out[0]["last_seen"].as_i64().unwrap() >= started, "{}: {error}", node.name);
    }
    // The dry run through A names the address signed in from on B (the set's stays in).
    let plan = a.host.ok(dry_run);
    let shut_out = &plan["dry_run"]["shut_out"];
    assert_eq!(shut_out.as_array().map(Vec::len), Some(1), "{plan}");
    assert_eq!(shut_out[0]["address"], through_entry, "{plan}");
    // A set change weighs every referencing account's sign-ins, made on any node.
    let shrink = json!({"cmd": "set_remove", "set": "office", "cidrs": [set_cidr]});
    let error = refused(a, shrink.clone());
    assert_eq!(error["code"], "lockout", "{error}");
    assert_eq!(
        error["details"]["shut_out"],
        json!([{"account": "acme", "address": through_set,
        "last_seen": error["details"]["shut_out"][0]["last_seen"]}]),
        "{error}"
    );
    assert!(error["message"].as_str().unwrap().contains(&format!("acme from {through_set}")), "{error}");

    // Forced, both go through A, and reach every node.
    a.host.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": entry_cidr, "force": true}));
    a.host.ok(json!({"cmd": "set_remove", "set": "office", "cidrs": [set_cidr], "force": true}));
    fleet.settle();
    for node in &fleet.nodes {
        let list = allow_list(node);
        let cidrs: Vec<&str> = list.as_array().unwrap().iter().filter_map(|e| e["cidr"].as_str()).collect();
        assert_eq!(cidrs, [kept], "{}: {list}", node.name);
    }
}

/// An account removed and made again under its id is a new customer: other nodes' guards
/// count only its sign-ins since it was made. B published acme's sign-in from an address;
/// acme is removed and made again, and the new acme signs in from the same address on B
/// within the hour a published sign-in is otherwise left as it is: B publishes it at once,
/// and A's guard refuses to remove the entry that lets it in.
#[test]
fn a_sign_in_of_an_account_made_again_reaches_the_other_nodes_guards_at_once() {
    let mut fleet = Fleet::new(2).unwrap();
    fleet.start_all();
    let (address, kept) = ("198.18.0.11", "203.0.113.0/24");
    let entry = format!("{address}/32");
    enforcing_acme(&fleet, &[(&entry, None), (kept, None)]);
    let sign_in = |fleet: &Fleet| {
        let b = &fleet.nodes[1];
        let check = b.host.ok(json!({"cmd": "check", "account": "acme", "addr": address, "method": "password"}));
        assert_eq!(check["reason"], "allowed", "{check}");
    };
    sign_in(&fleet);
    let first = published_signin(&fleet, address, &fleet.nodes[1].name)["last_seen"].as_i64().unwrap();

    // Made again a second later, so that the old sign-in is before the new account.
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_remove", "account": "acme"}));
    std::thread::sleep(Duration::from_millis(1100));
    enforcing_acme(&fleet, &[(&entry, None), (kept, None)]);
    let made = fleet.nodes[0].host.ok(json!({"cmd": "account_show", "account": "acme"}))["account"]["created_at"]
        .as_i64()
        .unwrap();
    assert!(made > first, "made at {made}, old sign-in at {first}");
    let remove = json!({"cmd": "allow_remove", "account": "acme", "cidr": entry});
    // Nobody has signed in to the new acme: nothing shut out, as a dry run of the same shows.
    let dry = json!({"cmd": "allow_replace", "account": "acme", "entries": [{"cidr": kept}], "dry_run": true});
    assert_eq!(fleet.nodes[0].host.ok(dry.clone())["dry_run"]["shut_out"], json!([]));

    sign_in(&fleet);
    let b_name = fleet.nodes[1].name.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while published_signin(&fleet, address, &b_name)["last_seen"].as_i64().unwrap() < made {
        assert!(Instant::now() < deadline, "B did not publish the new account's sign-in within 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    let a = &fleet.nodes[0];
    let plan = until(a, &dry, Duration::from_secs(10), |reply| reply["ok"]["dry_run"]["shut_out"] != json!([]));
    assert_eq!(plan["ok"]["dry_run"]["shut_out"][0]["address"], address, "{plan}");
    let error = refused(a, remove);
    assert_eq!(error["code"], "lockout", "{error}");
    assert_eq!(error["details"]["shut_out"][0]["address"], address, "{error}");
}

/// A guarded request through `node` until `done` says its answer is the one waited for
/// (bounded by `within`); the last answer.
fn until(node: &FleetNode, request: &Value, within: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let reply = node.host.request(request.clone());
        if done(&reply) {
            return reply;
        }
        assert!(Instant::now() < deadline, "{}: {request} still answers {reply} after {within:?}", node.name);
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Each node keeps the other nodes' sign-ins in memory, fed by a watch, and counts on it
/// only while etcd confirms it: with every etcd member hung (SIGSTOP: no error, just
/// silence), node A's guard refuses a replacement's dry run, and an unforced removal is
/// refused with `cluster_unavailable` saying why (the guard's reason, or the node being out
/// of step with etcd), rather than weighed against a list A cannot vouch for; once etcd is
/// back, A reads the sign-ins again and its guard names B's sign-in once more.
#[test]
fn the_guard_refuses_while_the_other_nodes_sign_ins_are_not_current_and_recovers() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let signs_in = "198.18.0.21";
    let (entry_cidr, kept) = (format!("{signs_in}/32"), "203.0.113.0/24");
    enforcing_acme(&fleet, &[(&entry_cidr, None), (kept, None)]);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    let check = b.host.ok(json!({"cmd": "check", "account": "acme", "addr": signs_in, "method": "password"}));
    assert_eq!(check["reason"], "allowed", "{check}");
    published_signin(&fleet, signs_in, &b.name);
    let dry_run = json!({"cmd": "allow_replace", "account": "acme", "entries": [{"cidr": kept}], "dry_run": true});
    let names_b_signin = |reply: &Value| {
        reply["ok"]["dry_run"]["shut_out"].as_array().is_some_and(|s| s.len() == 1 && s[0]["address"] == signs_in)
    };
    until(a, &dry_run, Duration::from_secs(5), names_b_signin);

    for member in 0..fleet.etcd.len() {
        fleet.etcd.pause(member).unwrap();
    }
    let paused = Instant::now();
    let unavailable = |reply: &Value| reply["error"]["code"] == "cluster_unavailable";
    let a = &fleet.nodes[0];
    let reply = until(a, &dry_run, Duration::from_secs(20), unavailable);
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("sign-ins other nodes published are not known to be current"), "{message}");
    let remove = json!({"cmd": "allow_remove", "account": "acme", "cidr": entry_cidr});
    // Refused by the guard, or, once the node's watch has given up on the hung etcd too,
    // before it: a node out of step with etcd makes no change at all.
    let error = refused(a, remove.clone());
    assert_eq!(error["code"], "cluster_unavailable", "{error}");
    let why = error["message"].as_str().unwrap();
    assert!(
        why.contains("lockout guard cannot weigh them") || why.contains("has not taken its policy again"),
        "{error}"
    );
    eprintln!("refused {:.1?} after etcd hung: {message}", paused.elapsed());

    for member in 0..fleet.etcd.len() {
        fleet.etcd.resume(member).unwrap();
    }
    fleet.wait_etcd(Duration::from_secs(30)).unwrap();
    let a = &fleet.nodes[0];
    until(a, &dry_run, Duration::from_secs(60), names_b_signin);
    let error = refused(a, remove);
    assert_eq!(error["code"], "lockout", "{error}");
    assert!(error["message"].as_str().unwrap().contains(&format!("add {signs_in} first")), "{error}");
}
