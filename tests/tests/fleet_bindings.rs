//! Bindings scoped to one node (`bind add ... --node NAME`), on a real 3-member etcd cluster
//! with 3 real ipaccessd nodes, each in its own namespaces. Every node's server namespace has
//! the same address, so one endpoint exists on every node's wire: a binding scoped to node B
//! filters it on B only, and A and C pass it as the unbound address it is there.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Barrier;
use std::thread;
use std::time::Duration;

use ipaccess_tests::client::Conn;
use ipaccess_tests::daemon::{Launch, binaries};
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX, error_code};
use ipaccess_tests::netns::tcp_connect;
use ipaccess_tests::ops::Host;
use serde_json::{Value, json};

const PORT: u16 = 7443;
const FLEET_PORT: u16 = 7444;

/// On the node's wire, to the server address and `port`: (does the allowed client address
/// get through, does the other one).
fn passes(node: &FleetNode, port: u16) -> (bool, bool) {
    let hosts = &node.host.hosts;
    let target = SocketAddr::new(hosts.server_v4.into(), port);
    let (good, bad) = (IpAddr::V4(hosts.client_v4[0]), IpAddr::V4(hosts.client_v4[1]));
    hosts.client.run(|| {
        (tcp_connect(good, target, Duration::from_secs(2)), tcp_connect(bad, target, Duration::from_millis(700)))
    })
}

/// Filtered by acme's allowlist on this node's wire.
const FILTERED: (bool, bool) = (true, false);
/// Not bound on this node: both addresses get through.
const OPEN: (bool, bool) = (true, true);

/// A node's bindings of the server address's `port`: (account, node) pairs, node `*` for
/// fleet-wide.
fn bound(node: &FleetNode, port: u16) -> Vec<(String, String)> {
    let listed = node.host.ok(json!({"cmd": "bind_list"}));
    listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["target"]["port"] == json!(port))
        .map(|b| (b["account"].as_str().unwrap().to_owned(), b["node"].as_str().unwrap_or("*").to_owned()))
        .collect()
}

fn pair(account: &str, node: &str) -> (String, String) {
    (account.to_owned(), node.to_owned())
}

/// acme allows the nodes' first client address only and enforces, made through `node`.
fn acme(node: &FleetNode) {
    let good = node.host.hosts.client_v4[0];
    node.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    node.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    node.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
}

#[test]
fn a_binding_scoped_to_one_node_is_enforced_on_that_nodes_wire_only() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let (_scoped, _wide) = (fleet.listeners(PORT), fleet.listeners(FLEET_PORT));
    let server = fleet.nodes[0].host.hosts.server_v4;
    acme(&fleet.nodes[0]);
    // Through node A, a binding that only node B enforces.
    let made = fleet.nodes[0]
        .host
        .ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT, "node": "node-b"}));
    assert_eq!(made["node"], "node-b", "{made}");
    fleet.settle();
    for node in &fleet.nodes {
        assert_eq!(bound(node, PORT), [pair("acme", "node-b")], "{} lists the fleet's bindings", node.name);
        let expected = if node.name == "node-b" { FILTERED } else { OPEN };
        assert_eq!(passes(node, PORT), expected, "{} on its wire", node.name);
    }

    // A fleet-wide binding (through C) is enforced on every node.
    fleet.nodes[2].host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": FLEET_PORT}));
    fleet.settle();
    for node in &fleet.nodes {
        assert_eq!(bound(node, FLEET_PORT), [pair("acme", "*")], "{}", node.name);
        assert_eq!(passes(node, FLEET_PORT), FILTERED, "{} does not enforce the fleet-wide binding", node.name);
    }

    // One owner per endpoint whatever the scope; never fleet-wide and on a node at once.
    let c = &fleet.nodes[2];
    let both = c.host.request(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT}));
    assert_eq!(error_code(&both).as_deref(), Some("binding_exists"), "{both}");
    assert!(both["error"]["message"].as_str().unwrap().contains("ambiguous"), "{both}");
    let both = c
        .host
        .request(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": FLEET_PORT, "node": "node-c"}));
    assert_eq!(error_code(&both).as_deref(), Some("binding_exists"), "{both}");
    c.host.ok(json!({"cmd": "account_add", "account": "other"}));
    let stolen =
        c.host.request(json!({"cmd": "bind_add", "account": "other", "addr": server, "port": PORT, "node": "node-a"}));
    assert_eq!(error_code(&stolen).as_deref(), Some("binding_exists"), "{stolen}");
    let odd =
        c.host.request(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT, "node": "a/b"}));
    assert_eq!(error_code(&odd).as_deref(), Some("bad_request"), "{odd}");

    // The same owner on a second node: C enforces it as well.
    c.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT, "node": "node-c"}));
    fleet.settle();
    let out = Command::new(&binaries().ctl)
        .args(["--socket", fleet.nodes[0].host.socket().to_str().unwrap(), "bind", "list"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("NODE"), "{out:?}");
    assert!(text.lines().any(|l| l.contains(&PORT.to_string()) && l.trim_end().ends_with("node-c")), "{text}");

    // Removed from B (through A): B's kernel lets the other address in again; C's does not.
    let socket = fleet.nodes[0].host.socket();
    let out = Command::new(&binaries().ctl)
        .args(["--socket", socket.to_str().unwrap(), "bind", "remove"])
        .arg(format!("{server}:{PORT}"))
        .args(["--node", "node-b"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    fleet.settle();
    for node in &fleet.nodes {
        assert_eq!(bound(node, PORT), [pair("acme", "node-c")], "{}", node.name);
        let expected = if node.name == "node-c" { FILTERED } else { OPEN };
        assert_eq!(passes(node, PORT), expected, "{} after the removal from node-b", node.name);
    }
    let wrong_scope = fleet.nodes[1].host.request(json!({"cmd": "bind_remove", "addr": server, "port": PORT}));
    assert_eq!(error_code(&wrong_scope).as_deref(), Some("unknown_binding"), "{wrong_scope}");
    assert!(wrong_scope["error"]["message"].as_str().unwrap().contains("on node node-c"), "{wrong_scope}");

    // A restart loads the kernel from the local copy: still only this node's bindings.
    for i in [0, 2] {
        fleet.nodes[i].stop();
        fleet.nodes[i].start();
    }
    fleet.settle();
    for node in &fleet.nodes {
        let expected = if node.name == "node-c" { FILTERED } else { OPEN };
        assert_eq!(passes(node, PORT), expected, "{} after a restart", node.name);
        assert_eq!(passes(node, FLEET_PORT), FILTERED, "{} after a restart", node.name);
    }
}

/// Sends `a` through node A and `b` through node C at the same instant, each retried on
/// `conflict` (the node has the winner by then); their final replies, and how many met one.
fn race(fleet: &Fleet, a: Value, c: Value) -> (Value, Value, usize) {
    let mut conns = [Conn::open(&fleet.nodes[0].host.socket()), Conn::open(&fleet.nodes[2].host.socket())];
    let barrier = Barrier::new(2);
    let [ca, cc] = &mut conns;
    let send = |conn: &mut Conn, request: &Value| {
        barrier.wait();
        let mut conflicted = false;
        for _ in 0..3 {
            let reply = conn.request(request.clone());
            if error_code(&reply).as_deref() != Some("conflict") {
                return (reply, conflicted);
            }
            conflicted = true;
        }
        (conn.request(request.clone()), conflicted)
    };
    let ((ra, xa), (rc, xc)) = thread::scope(|s| {
        let ta = s.spawn(|| send(ca, &a));
        let tc = s.spawn(|| send(cc, &c));
        (ta.join().unwrap(), tc.join().unwrap())
    });
    (ra, rc, usize::from(xa) + usize::from(xc))
}

/// A binds an endpoint to acme on node B while C binds it fleet-wide to other: exactly one
/// is acknowledged, and every node (and etcd) has that one owner in that one scope.
#[test]
fn racing_a_node_binding_and_a_fleet_wide_one_leave_one_owner() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "account_add", "account": "other"}));
    let addr = a.host.hosts.server_v4;
    let mut conflicts = 0;
    for r in 0..5 {
        fleet.settle();
        let port = 9100 + r as u16;
        let (ra, rc, n) = race(
            &fleet,
            json!({"cmd": "bind_add", "account": "acme", "addr": addr, "port": port, "node": "node-b"}),
            json!({"cmd": "bind_add", "account": "other", "addr": addr, "port": port}),
        );
        conflicts += n;
        fleet.settle();
        let winner = match (error_code(&ra).as_deref(), error_code(&rc).as_deref()) {
            (None, Some("binding_exists" | "conflict")) => pair("acme", "node-b"),
            (Some("binding_exists" | "conflict"), None) => pair("other", "*"),
            _ => panic!("round {r}: not exactly one binding acknowledged: A {ra}, C {rc}"),
        };
        for node in &fleet.nodes {
            assert_eq!(bound(node, port), std::slice::from_ref(&winner), "round {r}: {}", node.name);
        }
        let keys =
            fleet.etcd.etcdctl(&["get", "--prefix", "--keys-only", &format!("{PREFIX}bindings/{addr}/tcp:{port}/")]);
        let keys: Vec<String> = keys.unwrap().lines().filter(|l| !l.is_empty()).map(str::to_owned).collect();
        assert_eq!(keys.len(), 1, "round {r}: etcd holds {keys:?}");
    }
    eprintln!("scope race: {conflicts} conflicts met in 5 rounds");
}

/// Outside a fleet, `--node` is refused as a bad request, through the daemon's socket and
/// the CLI alike, and nothing is bound.
#[test]
fn a_standalone_host_refuses_node_scoped_bindings() {
    let mut host = Host::new();
    host.write_standalone_config();
    host.start(&Launch::default());
    host.ok(json!({"cmd": "account_add", "account": "acme"}));
    let server = host.hosts.server_v4;
    let refused = host.request(json!({"cmd": "bind_add", "account": "acme", "addr": server, "node": "mx1"}));
    assert_eq!(error_code(&refused).as_deref(), Some("bad_request"), "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("need a fleet"), "{refused}");
    let out = Command::new(&binaries().ctl)
        .args(["--socket", host.socket().to_str().unwrap(), "bind", "add", "acme"])
        .arg(format!("{server}:443"))
        .args(["--node", "mx1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("need a fleet"), "{out:?}");
    assert_eq!(host.ok(json!({"cmd": "bind_list"})), json!([]));
    // Without it, nothing changed.
    host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": 443}));
    let listed = host.ok(json!({"cmd": "bind_list"}));
    assert!(listed[0].get("node").is_none(), "{listed}");
}
