//! A fleet on a real 3-member etcd cluster with 3 real ipaccessd nodes, each in its own
//! namespaces with its own bpffs and veth: a change through one node is enforced on the
//! wire at the others; losing etcd's quorum leaves every node enforcing what it had and
//! refusing changes; a node that was away, or whose watch was compacted, converges.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::{Launch, binaries};
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX};
use ipaccess_tests::netns::tcp_connect;
use serde_json::{Value, json};

const PORT: u16 = 7443;

/// acme allows the nodes' first client address only and owns the nodes' port `PORT`,
/// made through `node`; returns the revision of the last change.
fn restrict_acme(node: &FleetNode) -> i64 {
    let good = node.host.hosts.client_v4[0];
    let server = node.host.hosts.server_v4;
    node.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    node.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    node.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT}));
    node.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    node.applied()
}

#[test]
fn a_change_through_one_node_is_enforced_on_every_node() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let revision = restrict_acme(&fleet.nodes[0]);
    fleet.converge(revision);
    let (good, bad) = (IpAddr::V4(fleet.nodes[0].host.hosts.client_v4[0]), "198.18.77.7".parse().unwrap());
    for node in &fleet.nodes {
        assert_eq!(node.check("acme", good), (true, "allowed".into()), "{}", node.name);
        assert_eq!(node.check("acme", bad), (false, "address_not_allowed".into()), "{}", node.name);
        assert!(node.enforces(PORT), "{} does not enforce acme's allowlist on its wire", node.name);
        let listed = node.host.ok(json!({"cmd": "allow_list", "account": "acme"}));
        assert_eq!(listed.as_array().map(Vec::len), Some(1), "{}: {listed}", node.name);
    }

    // A ban through node C shuts the address out on A and B too.
    let c = &fleet.nodes[2];
    c.host.ok(json!({"cmd": "account_state", "account": "acme", "state": "banned", "reason": "abuse"}));
    fleet.converge(c.applied());
    for node in &fleet.nodes {
        assert_eq!(node.check("acme", good), (false, "banned".into()), "{}", node.name);
    }
    // The audit records are the fleet's: node A lists the ban made through C.
    let activity = fleet.nodes[0].host.ok(json!({"cmd": "activity", "account": "acme"}));
    assert!(activity.to_string().contains("abuse"), "node A lacks C's audit record: {activity}");

    // `ipaccessctl --wait-fleet` returns once every live node has the change.
    let status = &fleet.nodes[1].cluster_status();
    let named: Vec<&str> = status["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap()).collect();
    assert_eq!(named, ["node-a", "node-b", "node-c"], "{status}");
    let socket = fleet.nodes[1].host.socket();
    let out = std::process::Command::new(&binaries().ctl)
        .args(["--socket", socket.to_str().unwrap(), "--wait-fleet", "account", "add", "beta"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in force on 3 live nodes"), "{out:?}");
    for node in &fleet.nodes {
        assert_eq!(node.check("beta", good), (true, "allowed".into()), "{} lacks beta at once", node.name);
    }
}

#[test]
fn without_a_quorum_every_node_keeps_enforcing_and_refuses_changes() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let revision = restrict_acme(&fleet.nodes[0]);
    fleet.converge(revision);
    let good = IpAddr::V4(fleet.nodes[0].host.hosts.client_v4[0]);

    // Two of three members gone: no quorum.
    let leader = fleet.etcd.leader().expect("a leader");
    let others: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    fleet.etcd.kill(leader).unwrap();
    fleet.etcd.kill(others[0]).unwrap();

    for node in &fleet.nodes {
        assert!(node.enforces(PORT), "{} stopped enforcing without etcd", node.name);
        assert_eq!(node.check("acme", good), (true, "allowed".into()), "{}", node.name);
        let refused = node.host.request(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.60.0/24"}));
        assert_eq!(refused["error"]["code"], "cluster_unavailable", "{}: {refused}", node.name);
    }
    // The health probe (once a second) sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = fleet.nodes[1].cluster_status();
        if status["connected"] == false && status["last_error"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "status does not show the outage: {status}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A node restarted meanwhile enforces its last policy from its local copy.
    fleet.nodes[1].stop();
    fleet.nodes[1].start();
    assert!(fleet.nodes[1].enforces(PORT), "a node restarted without etcd does not enforce its local copy");
    assert_eq!(fleet.nodes[1].check("acme", good), (true, "allowed".into()));

    // The quorum returns: changes are taken again, and every node converges on them.
    fleet.etcd.start_member(leader).unwrap();
    fleet.etcd.start_member(others[0]).unwrap();
    fleet.etcd.wait_healthy(Duration::from_secs(20)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let added = loop {
        let reply =
            fleet.nodes[2].host.request(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.61.0/24"}));
        if reply.get("ok").is_some() {
            break fleet.nodes[2].applied();
        }
        assert!(Instant::now() < deadline, "changes still refused after the quorum came back: {reply}");
        std::thread::sleep(Duration::from_millis(200));
    };
    fleet.converge(added);
    for node in &fleet.nodes {
        assert_eq!(node.check("acme", "198.18.61.9".parse().unwrap()), (true, "allowed".into()), "{}", node.name);
        assert_eq!(node.cluster_status()["connected"], true, "{}", node.name);
    }
}

#[test]
fn a_node_that_was_away_or_compacted_converges_without_a_gap() {
    let mut fleet = Fleet::new(3).unwrap();
    // An audit record from long before the retention (90 days): the nodes prune it from etcd.
    let old_audit = format!("{PREFIX}audit/00100000000/node-x/0");
    fleet.etcd.etcdctl(&["put", &old_audit, "[]"]).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let revision = restrict_acme(&fleet.nodes[0]);
    fleet.converge(revision);

    // Node C is stopped; 50 accounts and 200 entries are made through A.
    fleet.nodes[2].stop();
    let a = &fleet.nodes[0];
    for i in 0..50 {
        a.host.ok(json!({"cmd": "account_add", "account": format!("away{i}")}));
        for j in 0..4 {
            a.host.ok(
                json!({"cmd": "allow_add", "account": format!("away{i}"), "cidr": format!("198.18.{}.{j}/32", 20 + i)}),
            );
        }
    }
    a.host.ok(json!({"cmd": "account_remove", "account": "away0"}));
    let revision = a.applied();
    // And etcd compacts its history past what C saw.
    fleet.etcd.compact_latest().unwrap();

    // C starts on its local copy, enforcing at once, and catches up from a snapshot.
    fleet.nodes[2].start();
    assert!(fleet.nodes[2].enforces(PORT), "node C does not enforce while it catches up");
    fleet.converge(revision);
    let c = &fleet.nodes[2];
    assert!(c.check("away7", "198.18.27.3".parse().unwrap()).0);
    assert_eq!(c.check("away0", "198.18.20.1".parse().unwrap()).1, "unknown_account");
    let listed_a = fleet.nodes[0].host.ok(json!({"cmd": "account_list"}));
    let listed_c = c.host.ok(json!({"cmd": "account_list"}));
    assert_eq!(listed_a, listed_c, "node C's accounts differ from node A's");
    assert!(c.enforces(PORT));
    // The audit records written while C was away reached it through the snapshot.
    let activity = c.host.ok(json!({"cmd": "activity", "account": "away7"}));
    assert!(
        activity.to_string().contains("198.18.27.3/32"),
        "node C lacks the audit of a change made while away: {activity}"
    );

    // The old audit key is gone from etcd (each node prunes on its first sweep, every 10 s),
    // and the fleet's recent ones stay.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fleet.etcd.etcdctl(&["get", "--keys-only", &old_audit]).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline, "the audit key past the retention was never pruned from etcd");
        std::thread::sleep(Duration::from_millis(500));
    }
    let recent = fleet.etcd.etcdctl(&["get", "--prefix", "--keys-only", &format!("{PREFIX}audit/")]).unwrap();
    assert!(recent.lines().filter(|l| !l.is_empty()).count() > 50, "recent audit keys were pruned too:\n{recent}");
}

#[test]
fn an_import_larger_than_one_etcd_transaction_reaches_every_node() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    // 250 accounts with 3 entries each, a parent among them with 20 sub-users: far more
    // than etcd takes in one transaction (128 operations).
    let mut accounts = vec![json!({"account": "corp", "entries": [{"cidr": "198.18.50.0/24"}]})];
    for i in 0..249 {
        let parent = (i < 20).then_some("corp");
        let entries: Vec<Value> =
            (0..3).map(|j| json!({"cidr": format!("198.18.{}.{}/32", 60 + i / 100, (i % 100) * 2 + j)})).collect();
        accounts.push(json!({"account": format!("bulk{i}"), "parent": parent, "mode": "enforce", "entries": entries}));
    }
    let reply = fleet.nodes[0].host.ok(json!({"cmd": "import", "accounts": accounts}));
    assert_eq!(reply["accounts"], 250, "{reply}");
    fleet.converge(fleet.nodes[0].applied());
    let listed = fleet.nodes[0].host.ok(json!({"cmd": "account_list"}));
    assert_eq!(listed.as_array().map(Vec::len), Some(250), "{listed}");
    for node in &fleet.nodes[1..] {
        assert_eq!(node.host.ok(json!({"cmd": "account_list"})), listed, "{} differs from node-a", node.name);
        assert!(node.check("bulk150", "198.18.61.101".parse().unwrap()).0, "{}", node.name);
        assert!(!node.check("bulk150", "198.18.61.120".parse().unwrap()).0, "{}", node.name);
    }
    // A ban of the parent reaches its sub-users on every node.
    fleet.nodes[1].host.ok(json!({"cmd": "account_state", "account": "corp", "state": "banned", "reason": "abuse"}));
    fleet.converge(fleet.nodes[1].applied());
    for node in &fleet.nodes {
        assert_eq!(
            node.check("bulk3", "198.18.60.6".parse().unwrap()),
            (false, "parent_banned".into()),
            "{}",
            node.name
        );
    }
}

/// A host with its own policy that is pointed at an empty fleet keeps enforcing its policy:
/// an empty prefix (a typo, a fleet not seeded yet) must not switch enforcement off.
#[test]
fn a_standalone_host_joining_an_empty_fleet_keeps_its_policy() {
    let mut fleet = Fleet::new(1).unwrap();
    let _listeners = fleet.listeners(PORT);
    let node = &mut fleet.nodes[0];
    // First on its own store.
    node.host.write_standalone_config();
    node.start();
    let (good, server) = (node.host.hosts.client_v4[0], node.host.hosts.server_v4);
    node.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    node.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    node.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT}));
    node.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    assert!(node.enforces(PORT));
    node.stop();
    // Then with the [cluster] section, the fleet's prefix empty.
    node.write_config(ipaccess_tests::fleet::PREFIX, "");
    node.start();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = node.cluster_status();
        if status["last_error"].as_str().is_some_and(|e| e.contains("never followed this fleet")) {
            break status;
        }
        assert!(Instant::now() < deadline, "no refusal to wipe the host's policy: {status}");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(node.enforces(PORT), "the host's policy was dropped: {status}");
    assert_eq!(node.check("acme", IpAddr::V4(good)), (true, "allowed".into()));
}

/// Debian's libfaketime (package faketime): preloaded, it shifts the wall clock the daemon
/// reads and nothing else on the machine.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

#[test]
fn a_node_whose_clock_disagrees_with_etcds_says_so() {
    let mut fleet = Fleet::new(2).unwrap();
    fleet.nodes[0].start();
    // Node B's wall clock runs 5 s ahead; its monotonic clock (timers, the runtime) is left
    // alone.
    let ahead = Launch {
        wrapper: vec![],
        env: [("LD_PRELOAD", FAKETIME), ("FAKETIME", "+5s"), ("FAKETIME_DONT_FAKE_MONOTONIC", "1")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .to_vec(),
        ..Launch::default()
    };
    fleet.nodes[1].host.start(&ahead);
    let measured = |node: &FleetNode| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(ms) = node.cluster_status()["clock_offset_ms"].as_i64() {
                return ms;
            }
            assert!(Instant::now() < deadline, "{} never measured its clock: {}", node.name, node.cluster_status());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let (a, b) = (measured(&fleet.nodes[0]), measured(&fleet.nodes[1]));
    // etcd runs on this machine's clock: A agrees with it, B is 5 s ahead (within the
    // measurement's tenth of a second and loopback's round trip).
    assert!(a.abs() <= 250, "node A's clock is off by {a} ms against etcd on the same machine");
    assert!((4750..=5250).contains(&b), "node B runs 5 s ahead, but measured {b} ms");
    let log = fleet.nodes[1].host.log_text();
    assert!(log.contains("clock is 5.0 s ahead of etcd"), "no warning in node B's log:\n{log}");
    assert!(!fleet.nodes[0].host.log_text().contains("ahead of etcd"), "node A warned with a good clock");
}

#[test]
fn a_node_that_joined_after_an_override_ended_grants_a_new_id() {
    let mut fleet = Fleet::new(2).unwrap();
    fleet.nodes[0].start();
    let _listeners = fleet.listeners(PORT);
    let a = &fleet.nodes[0];
    restrict_acme(a);
    let guest = a.host.hosts.client_v4[1];
    let grant = |node: &FleetNode, ticket: &str| {
        node.host.ok(json!({
            "cmd": "override_grant", "account": "acme", "cidr": format!("{guest}/32"), "ttl_seconds": 600,
            "ticket": ticket, "reason": "travelling",
        }))["override"]["id"]
            .as_i64()
            .unwrap()
    };
    // An override granted and revoked through A: the fleet's documents no longer hold it.
    let first = grant(a, "SUP-1");
    a.host.ok(json!({"cmd": "override_revoke", "account": "acme", "override_id": first}));

    // B joins with an empty store and grants one: a new id, which A takes like any other.
    fleet.nodes[1].start();
    let revision = fleet.nodes[0].applied();
    fleet.converge(revision);
    let second = grant(&fleet.nodes[1], "SUP-2");
    assert!(second > first, "node B reused override id {second} (the fleet had granted {first})");
    fleet.converge(fleet.nodes[1].applied());
    for node in &fleet.nodes {
        assert!(node.check("acme", guest.into()).0, "{}: the override granted through B is not in force", node.name);
        let listed = node.host.ok(json!({"cmd": "override_list", "account": "acme"}));
        assert!(listed.to_string().contains("SUP-2"), "{}: {listed}", node.name);
    }
}

/// An entry added for a few seconds through node A reaches node C, which lets its address
/// in at sign-in and on its wire until the expiry, then stops by itself (no further change
/// goes through etcd).
#[test]
fn an_entry_expiry_reaches_another_node_and_ends_there() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    fleet.converge(restrict_acme(&fleet.nodes[0]));
    let c = &fleet.nodes[2];
    let (visitor, server) = (c.host.hosts.client_v4[1], c.host.hosts.server_v4);
    let target = std::net::SocketAddr::new(server.into(), PORT);
    let reaches = |timeout| c.host.hosts.client.run(|| tcp_connect(visitor.into(), target, timeout));
    assert!(!reaches(Duration::from_millis(500)), "{visitor} got through before it was added");

    let added_at = Instant::now();
    let entry = fleet.nodes[0].host.ok(json!({"cmd": "allow_add", "account": "acme",
        "cidr": format!("{visitor}/32"), "ttl_seconds": 4}));
    let expires_at = entry["expires_at"].as_i64().unwrap_or_else(|| panic!("no expiry: {entry}"));
    fleet.converge(fleet.nodes[0].applied());
    let listed = c.host.ok(json!({"cmd": "allow_list", "account": "acme"}));
    assert!(listed.as_array().unwrap().iter().any(|e| e["expires_at"] == expires_at), "{listed}");
    // Stored in whole seconds, the entry lives 3 to 4 s.
    assert_eq!(c.check("acme", visitor.into()), (true, "allowed".into()));
    assert!(reaches(Duration::from_millis(900)), "node C does not let the expiring entry in on its wire");
    assert!(
        added_at.elapsed() < Duration::from_millis(2900),
        "too slow to test before expiry: {:?}",
        added_at.elapsed()
    );

    std::thread::sleep(Duration::from_millis(4300).saturating_sub(added_at.elapsed()));
    assert!(!reaches(Duration::from_millis(500)), "node C let the entry in after its expiry");
    assert_eq!(c.check("acme", visitor.into()), (false, "address_not_allowed".into()));
    assert!(c.enforces(PORT), "node C stopped enforcing the permanent entry");
}

/// A node's local copy put back from before a ban (an older backup, a damaged write-ahead
/// log) while etcd is unreachable: the node refuses to start on it, so the kernel goes on
/// enforcing the ban, on the wire, instead of enforcing the older copy until etcd returns.
/// Once etcd is back, a start with `--accept-older-store` takes the fleet's policy, ban
/// included.
#[test]
fn a_node_on_an_older_copy_while_etcd_is_down_does_not_undo_a_ban() {
    let mut fleet = Fleet::with_members(1, 1).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let revision = restrict_acme(&fleet.nodes[0]);
    fleet.converge(revision);
    let node = &mut fleet.nodes[0];
    assert!(node.enforces(PORT));
    // A copy of the store from before the ban, taken as a backup would be (daemon stopped).
    node.stop();
    let state = node.host.path("state");
    let files = ["ipaccess.db", "ipaccess.db-wal", "ipaccess.db-shm"];
    let backup: Vec<(&str, Option<Vec<u8>>)> = files.map(|f| (f, std::fs::read(state.join(f)).ok())).to_vec();
    node.start();
    node.host.ok(json!({"cmd": "account_state", "account": "acme", "state": "banned", "reason": "abuse"}));
    let good = IpAddr::V4(node.host.hosts.client_v4[0]);
    assert_eq!(node.check("acme", good), (false, "banned".into()));
    node.stop();
    for (file, bytes) in &backup {
        let path = state.join(file);
        let _ = std::fs::remove_file(&path);
        if let Some(bytes) = bytes {
            std::fs::write(&path, bytes).unwrap();
        }
    }
    for member in 0..fleet.etcd.len() {
        fleet.etcd.stop(member).unwrap();
    }

    let node = &mut fleet.nodes[0];
    node.host.spawn(&Launch::default());
    let status = node.host.daemon().wait_exit(Duration::from_secs(20));
    let log = node.host.daemon().log_text();
    assert!(status.is_some_and(|s| !s.success()), "the node started on the older copy:\n{log}");
    for needed in ["refusing to start", "is behind the policy", "--accept-older-store", "once etcd is reachable"] {
        assert!(log.contains(needed), "the refusal does not say {needed:?}:\n{log}");
    }
    node.host.daemon = None;
    let hosts = &node.host.hosts;
    let target = std::net::SocketAddr::new(hosts.server_v4.into(), PORT);
    assert!(
        !hosts.client.run(|| tcp_connect(good, target, Duration::from_millis(500))),
        "the ban stopped being enforced on the wire"
    );

    // etcd back: started on purpose, the node takes the fleet's policy, the ban with it.
    for member in 0..fleet.etcd.len() {
        fleet.etcd.start_member(member).unwrap();
    }
    fleet.etcd.wait_healthy(Duration::from_secs(20)).unwrap();
    let node = &mut fleet.nodes[0];
    node.host.start(&Launch { extra_args: vec!["--accept-older-store".into()], ..Launch::default() });
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.check("acme", good) != (false, "banned".into()) {
        assert!(Instant::now() < deadline, "the node did not take the ban from etcd: {}", node.cluster_status());
        std::thread::sleep(Duration::from_millis(100));
    }
    let hosts = &node.host.hosts;
    assert!(!hosts.client.run(|| tcp_connect(good, target, Duration::from_millis(500))));
}

/// Two nodes started with the same `[cluster] node` (a configuration copied as it was):
/// each says so in `status` and in its log within a few renewals, while a fleet of distinct
/// names never does.
#[test]
fn two_nodes_with_one_name_are_told_apart_in_status() {
    let mut fleet = Fleet::with_members(1, 2).unwrap();
    fleet.nodes[0].start();
    let named = |node: &FleetNode| node.cluster_status()["name_in_use_elsewhere"].clone();
    // Alone, over several renewals (a third of the 10 s lease each).
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(named(&fleet.nodes[0]), json!(false), "{}", fleet.nodes[0].cluster_status());

    let b = &mut fleet.nodes[1];
    b.name = "node-a".into();
    b.write_config(PREFIX, "");
    b.start();
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.nodes.iter().any(|n| named(n) != json!(true)) {
        assert!(
            Instant::now() < deadline,
            "the clash is not shown within 20 s: {} / {}",
            fleet.nodes[0].cluster_status(),
            fleet.nodes[1].cluster_status()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for node in &fleet.nodes {
        let log = node.host.log_text();
        assert!(log.contains("another ipaccessd publishes under this node's name \"node-a\""), "{log}");
        let out = std::process::Command::new(&binaries().ctl)
            .args(["--socket", node.host.socket().to_str().unwrap(), "status"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains("another live node uses this node's name"), "{shown}");
    }
}
