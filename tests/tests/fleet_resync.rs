//! A node's resynchronisation from an etcd snapshot, on a real 3-member etcd cluster with
//! real ipaccessd nodes, where the snapshot's differences cannot be written in any naive
//! order: accounts that swapped kernel slots (or took one another still held) while the node
//! was away, and a tree three levels deep (an older store's grandchild, imported) that a
//! node joining the fleet must write parents first. Either way the node converges, and a
//! ban made afterwards reaches it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX, ctl_import};
use ipaccess_tests::netns::tcp_connect;
use serde_json::{Value, json};

const PORT: u16 = 7443;

/// Makes `account` (under `parent`, if any) through `node`: it allows the nodes' first client
/// address only, is enforced, and owns `port` on the nodes' server address, if given.
fn make(node: &FleetNode, account: &str, parent: Option<&str>, port: Option<u16>) {
    let (good, server) = (node.host.hosts.client_v4[0], node.host.hosts.server_v4);
    let h = &node.host;
    match parent {
        Some(parent) => h.ok(json!({"cmd": "account_add", "account": account, "parent": parent})),
        None => h.ok(json!({"cmd": "account_add", "account": account})),
    };
    h.ok(json!({"cmd": "allow_add", "account": account, "cidr": format!("{good}/32")}));
    if let Some(port) = port {
        h.ok(json!({"cmd": "bind_add", "account": account, "addr": server, "port": port}));
    }
    h.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce", "force": true}));
}

/// Each account's kernel slot, as `node` lists them.
fn slots(node: &FleetNode) -> Vec<(String, u64)> {
    let listed = node.host.ok(json!({"cmd": "account_list"}));
    listed
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {listed}"))
        .iter()
        .map(|a| (a["id"].as_str().unwrap().to_owned(), a["slot"].as_u64().unwrap()))
        .collect()
}

fn slot_of(node: &FleetNode, account: &str) -> u64 {
    slots(node).into_iter().find(|(id, _)| id == account).unwrap_or_else(|| panic!("no {account}")).1
}

/// From the node's first (allowed) client address: does a connection to `port` on its
/// server address get through?
fn first_client_reaches(node: &FleetNode, port: u16) -> bool {
    let hosts = &node.host.hosts;
    let target = SocketAddr::new(hosts.server_v4.into(), port);
    let good = IpAddr::V4(hosts.client_v4[0]);
    hosts.client.run(|| tcp_connect(good, target, Duration::from_secs(2)))
}

/// The node has applied `revision` and reports no error from its cluster connection.
fn caught_up(node: &FleetNode, revision: i64) {
    let status = node.cluster_status();
    assert!(status["applied_revision"].as_i64().unwrap_or(0) >= revision, "{}: {status}", node.name);
    assert_eq!(status["last_error"], Value::Null, "{}: {status}", node.name);
}

/// Through node A, while node C is stopped: two accounts are removed and made again in the
/// other order (their slots swapped), and an account with a sub-user is removed, another
/// takes its slot, and it is made again in another one. C restarts, resynchronises from a
/// snapshot holding every one of those slots in other hands, converges, and then enforces a
/// ban made through A, on its wire too.
#[test]
fn accounts_that_swapped_slots_while_a_node_was_away_are_taken_and_a_later_ban_reaches_it() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let _listeners = fleet.listeners(PORT);
    let _listeners2 = fleet.listeners(PORT + 1);
    let a = &fleet.nodes[0];
    make(a, "s1", None, Some(PORT));
    make(a, "s2", None, Some(PORT + 1));
    make(a, "m5", None, None);
    make(a, "m5-dev", Some("m5"), None);
    let before = slots(a);
    fleet.converge(fleet.nodes[0].applied());
    assert_eq!(slots(&fleet.nodes[2]), before);

    fleet.nodes[2].stop();
    let a = &fleet.nodes[0];
    for id in ["s1", "s2", "m5"] {
        a.host.ok(json!({"cmd": "account_remove", "account": id, "recursive": true}));
    }
    make(a, "s2", None, Some(PORT + 1));
    make(a, "s1", None, Some(PORT));
    make(a, "a5", None, None);
    make(a, "m5", None, None);
    make(a, "m5-dev", Some("m5"), None);
    let after = slots(a);
    let was = |id: &str| before.iter().find(|(i, _)| i == id).unwrap().1;
    // The test means what it says: the slots changed hands.
    assert_eq!((slot_of(a, "s1"), slot_of(a, "s2")), (was("s2"), was("s1")), "{before:?} -> {after:?}");
    assert_eq!(slot_of(a, "a5"), was("m5"), "{before:?} -> {after:?}");
    assert_ne!(slot_of(a, "m5"), was("m5"), "{before:?} -> {after:?}");
    let revision = a.applied();

    fleet.nodes[2].start();
    fleet.converge(revision);
    let c = &fleet.nodes[2];
    caught_up(c, revision);
    assert_eq!(slots(c), after, "node C's accounts differ from node A's");
    let good = IpAddr::V4(c.host.hosts.client_v4[0]);
    for id in ["s1", "s2", "a5", "m5", "m5-dev"] {
        assert_eq!(c.check(id, good), (true, "allowed".into()), "{id} on node C");
    }
    assert!(first_client_reaches(c, PORT) && first_client_reaches(c, PORT + 1));

    // A ban through A reaches C: in its checks and on its wire, for the sub-user too.
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_state", "account": "s1", "state": "banned", "reason": "abuse"}));
    a.host.ok(json!({"cmd": "account_state", "account": "m5", "state": "banned", "reason": "abuse"}));
    let revision = a.applied();
    fleet.converge(revision);
    let c = &fleet.nodes[2];
    caught_up(c, revision);
    assert_eq!(c.check("s1", good), (false, "banned".into()));
    assert_eq!(c.check("m5", good), (false, "banned".into()));
    assert_eq!(c.check("m5-dev", good), (false, "parent_banned".into()));
    assert_eq!(c.check("s2", good), (true, "allowed".into()));
    assert_eq!(c.check("a5", good), (true, "allowed".into()));
    assert!(!first_client_reaches(c, PORT), "node C lets traffic through to banned s1's port");
    assert!(first_client_reaches(c, PORT + 1), "node C drops traffic to s2's port");
    assert!(c.enforces(PORT + 1), "node C does not enforce s2's allowlist on its wire");
}

/// A standalone store with a grandchild (top <- mid <- low, as stores written before the
/// rule of one level hold: the parent set in the database while the daemon is stopped) seeds
/// the fleet; a node with an empty store joins and enforces all three, and a ban of the top
/// reaches the grandchild there. `low` sorts before `mid`: a snapshot lists it first.
#[test]
fn an_imported_grandchild_reaches_a_node_that_joins() {
    let mut fleet = Fleet::new(2).unwrap();
    let _listeners = fleet.listeners(PORT);
    let a = &mut fleet.nodes[0];
    a.host.write_standalone_config();
    a.start();
    make(a, "top", None, None);
    make(a, "mid", Some("top"), None);
    make(a, "low", None, Some(PORT));
    a.stop();
    let conn = rusqlite::Connection::open(a.host.path("state/ipaccess.db")).unwrap();
    assert_eq!(conn.execute("UPDATE accounts SET parent = 'mid' WHERE id = 'low'", []).unwrap(), 1);
    drop(conn);
    a.write_config(PREFIX, "");
    a.start();
    let listed = a.host.ok(json!({"cmd": "account_list"}));
    let (code, imported, stderr) = ctl_import(&a.host.socket());
    assert_eq!(code, 0, "{imported} {stderr}");
    assert_eq!(imported["accounts"], 3, "{imported}");
    let revision = imported["revision"].as_i64().unwrap();

    // A node with an empty store joins.
    fleet.nodes[1].start();
    fleet.converge(revision);
    let b = &fleet.nodes[1];
    caught_up(b, revision);
    assert_eq!(b.host.ok(json!({"cmd": "account_list"})), listed, "node B's accounts differ from the store's");
    let (good, bad) = (IpAddr::V4(b.host.hosts.client_v4[0]), IpAddr::V4(b.host.hosts.client_v4[1]));
    for id in ["top", "mid", "low"] {
        assert_eq!(b.check(id, good), (true, "allowed".into()), "{id} on node B");
        assert_eq!(b.check(id, bad), (false, "address_not_allowed".into()), "{id} on node B");
    }
    assert!(b.enforces(PORT), "node B does not enforce the grandchild's allowlist on its wire");

    // A ban of the top, through A, reaches the grandchild on B.
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_state", "account": "top", "state": "banned", "reason": "abuse"}));
    let revision = a.applied();
    fleet.converge(revision);
    let b = &fleet.nodes[1];
    caught_up(b, revision);
    assert_eq!(b.check("top", good), (false, "banned".into()));
    for id in ["mid", "low"] {
        assert_eq!(b.check(id, good), (false, "parent_banned".into()), "{id} on node B");
    }
    assert!(!first_client_reaches(b, PORT), "node B lets traffic through to the banned tree's grandchild");
}
