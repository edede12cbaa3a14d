//! `ipaccessctl cluster import` on a real 3-member etcd cluster with real daemons: a
//! standalone host's store seeds an empty fleet, the host goes on enforcing throughout and
//! then follows the fleet, and empty nodes that join get the whole policy. An import stopped
//! part-way can be run again; anything else under the prefix refuses it. And the way back: a
//! fleet node started without `[cluster]` is a standalone host with the same policy.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::without_last_used;
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX, ctl_import};
use serde_json::{Value, json};

const PORT: u16 = 7443;

/// A store with what a fleet must carry: accounts with a sub-user, enabled and disabled
/// entries, a banned account, a live override, a binding, a shared set referenced by one
/// account, all made through the socket.
/// Every node's clients and server have the same addresses, so the policy means the same
/// on each.
fn build_store(node: &FleetNode) {
    let (good, server) = (node.host.hosts.client_v4[0], node.host.hosts.server_v4);
    let h = &node.host;
    h.ok(json!({"cmd": "account_add", "account": "acme"}));
    h.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32"), "label": "office"}));
    h.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "203.0.113.0/24"}));
    h.ok(json!({"cmd": "allow_disable", "account": "acme", "cidr": "203.0.113.0/24"}));
    h.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT}));
    h.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    h.ok(json!({"cmd": "account_add", "account": "acme-dev", "parent": "acme"}));
    h.ok(json!({"cmd": "allow_add", "account": "acme-dev", "cidr": "198.51.100.0/24"}));
    h.ok(json!({"cmd": "account_mode", "account": "acme-dev", "mode": "enforce", "force": true}));
    h.ok(json!({"cmd": "account_add", "account": "beta"}));
    h.ok(json!({"cmd": "account_mode", "account": "beta", "mode": "enforce", "force": true}));
    h.ok(json!({
        "cmd": "override_grant", "account": "beta", "cidr": "192.0.2.7/32", "ttl_seconds": 3600,
        "ticket": "SUP-9", "reason": "travelling",
    }));
    h.ok(json!({"cmd": "account_add", "account": "gone"}));
    h.ok(json!({"cmd": "account_state", "account": "gone", "state": "banned", "reason": "abuse"}));
    let partner = node.host.hosts.client_v4[1];
    h.ok(json!({"cmd": "set_add", "set": "partners", "cidrs": [format!("{partner}/32")], "label": "egress"}));
    h.ok(json!({"cmd": "allow_add_set", "account": "beta", "set": "partners"}));
}

const ACCOUNTS: [&str; 4] = ["acme", "acme-dev", "beta", "gone"];

/// What a node answers about the policy: accounts, each allowlist, bindings, overrides, and
/// dry-run checks of a few addresses for every account.
fn policy(node: &FleetNode) -> Value {
    let h = &node.host;
    let mut checks = Vec::new();
    let addrs: [IpAddr; 4] = [
        node.host.hosts.client_v4[0].into(),
        node.host.hosts.client_v4[1].into(),
        "192.0.2.7".parse().unwrap(),
        "198.51.100.9".parse().unwrap(),
    ];
    for account in ACCOUNTS {
        for addr in addrs {
            checks.push(json!([account, addr, node.check(account, addr)]));
        }
    }
    // Without the last-used evidence: each node and host keeps its own, moved by traffic.
    let allow: Vec<Value> =
        ACCOUNTS.iter().map(|a| without_last_used(h.ok(json!({"cmd": "allow_list", "account": a})))).collect();
    let overrides = h.ok(json!({"cmd": "override_list"}));
    json!({
        "accounts": h.ok(json!({"cmd": "account_list"})),
        "allow": allow,
        "bindings": h.ok(json!({"cmd": "bind_list"})),
        "sets": h.ok(json!({"cmd": "set_list"})),
        "overrides": overrides,
        "checks": checks,
    })
}

/// Waits until the node reports a cluster error containing `text`; its status then.
fn wait_error(node: &FleetNode, text: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = node.cluster_status();
        if status["last_error"].as_str().is_some_and(|e| e.contains(text)) {
            return status;
        }
        assert!(Instant::now() < deadline, "{}: no error with {text:?}: {status}", node.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every key under `prefix` but the live nodes' records, in order, with its value.
fn keys_under(fleet: &Fleet, prefix: &str) -> Vec<(String, String)> {
    let text = fleet.etcd.etcdctl(&["get", "--prefix", prefix]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .map(|kv| (kv[0].to_owned(), kv.get(1).copied().unwrap_or("").to_owned()))
        .filter(|(key, _)| !key.contains("/~nodes/"))
        .collect()
}

#[test]
fn a_standalone_host_seeds_an_empty_fleet_and_every_node_follows() {
    let mut fleet = Fleet::new(3).unwrap();
    let _listeners = fleet.listeners(PORT);
    let a = &mut fleet.nodes[0];
    a.host.write_standalone_config();
    a.start();
    // Without [cluster] there is nothing to import into.
    let (code, reply, stderr) = ctl_import(&a.host.socket());
    assert_eq!(code, 2, "{reply} {stderr}");
    assert_eq!(reply["code"], "refused", "{reply}");
    assert!(stderr.contains("no [cluster] section"), "{stderr}");
    build_store(a);
    assert!(a.enforces(PORT));
    let before = policy(a);
    a.stop();

    // With [cluster] on the empty prefix: it keeps enforcing its own store, takes nothing
    // from etcd and refuses changes (which would seed the fleet with one account).
    a.write_config(PREFIX, "");
    a.start();
    wait_error(a, "never followed this fleet");
    assert!(a.enforces(PORT), "the host's policy was dropped before the import");
    let refused = a.host.request(json!({"cmd": "allow_add", "account": "beta", "cidr": "192.0.2.0/24"}));
    assert_eq!(refused["error"]["code"], "refused", "{refused}");
    assert!(keys_under(&fleet, PREFIX).is_empty(), "a refused change reached etcd");
    // Empty nodes join the empty fleet.
    fleet.nodes[1].start();
    fleet.nodes[2].start();

    let (code, imported, stderr) = ctl_import(&fleet.nodes[0].host.socket());
    assert_eq!(code, 0, "{imported} {stderr}");
    assert_eq!(imported["accounts"], 4, "{imported}");
    assert_eq!(imported["bindings"], 1, "{imported}");
    assert_eq!(imported["sets"], 1, "{imported}");
    assert_eq!(imported["already_present"], 0, "{imported}");
    // 4 documents, 4 slots, 1 binding, 1 set, the override sequence.
    assert_eq!(imported["written"], 11, "{imported}");
    let revision = imported["revision"].as_i64().unwrap();
    // The import returned once the importing node followed the fleet.
    let a = &fleet.nodes[0];
    assert!(a.applied() >= revision, "{}", a.cluster_status());
    assert_eq!(a.cluster_status()["last_error"], Value::Null);
    fleet.converge(revision);
    for node in &fleet.nodes {
        assert_eq!(policy(node), before, "{} differs from the standalone host's store", node.name);
        assert!(node.enforces(PORT), "{} does not enforce the imported policy on its wire", node.name);
    }
    // One audit record of the import, fleet-wide.
    let audit = keys_under(&fleet, &format!("{PREFIX}audit/"));
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert!(audit[0].1.contains("cluster_import"), "{audit:?}");

    // A change through B is enforced on A.
    let extra = fleet.nodes[0].host.hosts.client_v4[1];
    fleet.nodes[1].host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{extra}/32")}));
    let applied = fleet.nodes[1].applied();
    fleet.converge(applied);
    assert_eq!(fleet.nodes[0].check("acme", extra.into()), (true, "allowed".into()));

    // A second import is refused, through the importing node and through an empty one.
    for node in &fleet.nodes[..2] {
        let (code, reply, stderr) = ctl_import(&node.host.socket());
        assert_eq!(code, 2, "{reply}");
        assert_eq!(reply["code"], "refused", "{reply}");
        assert!(stderr.contains("already follows the fleet"), "{stderr}");
    }
}

/// An import stopped part-way (the keys of its first parts written, the rest not) is
/// finished by running it again; a key holding anything else refuses it and nothing is
/// written. And the way back: a fleet node started without `[cluster]` enforces the same
/// policy and takes changes locally.
#[test]
fn an_import_stopped_part_way_is_finished_and_a_fleet_node_goes_back_to_standalone() {
    let mut fleet = Fleet::new(1).unwrap();
    let _listeners = fleet.listeners(PORT);
    let a = &mut fleet.nodes[0];
    a.host.write_standalone_config();
    a.start();
    build_store(a);
    let before = policy(a);
    a.stop();
    // A complete import under a first prefix gives the keys an import of this store writes.
    let first = "/seed-1/";
    a.write_config(first, "");
    a.start();
    let (code, imported, stderr) = ctl_import(&a.host.socket());
    assert_eq!(code, 0, "{imported} {stderr}");
    let complete = keys_under(&fleet, first);
    // In the fleet, acme's endpoint is bound to this node only, and another endpoint to
    // another node: on the way back the first becomes this host's own, the second goes.
    let (server, a) = (fleet.nodes[0].host.hosts.server_v4, &fleet.nodes[0]);
    a.host.ok(json!({"cmd": "bind_remove", "addr": server, "port": PORT}));
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT, "node": a.name}));
    a.host.ok(json!({"cmd": "bind_add", "account": "beta", "addr": server, "port": PORT + 1, "node": "node-z"}));
    assert!(a.enforces(PORT), "the node does not enforce its own node-scoped binding");
    let in_fleet = keys_under(&fleet, first);

    // The way back: stopped, [cluster] removed, started: the same policy, and changes are
    // taken locally.
    let a = &mut fleet.nodes[0];
    a.stop();
    a.host.write_standalone_config();
    a.start();
    assert!(a.host.ok(json!({"cmd": "status"})).get("cluster").is_none());
    // The same policy (acme's endpoint was bound again in the fleet: a later time).
    let binding_times = |mut policy: Value| {
        policy["bindings"].as_array_mut().unwrap().iter_mut().for_each(|b| b["created_at"] = json!(0));
        policy
    };
    assert_eq!(binding_times(policy(a)), binding_times(before.clone()), "the node's copy is not its policy");
    assert!(a.enforces(PORT), "the binding that was scoped to this node is not enforced on its own");
    a.host.ok(json!({"cmd": "allow_add", "account": "acme-dev", "cidr": "192.0.2.0/24"}));
    let changed = policy(a);
    assert_eq!(keys_under(&fleet, first), in_fleet, "a standalone host wrote to etcd");

    // As a run that stopped after its first part would have left it: the keys of the
    // parents' units (document and slot) of accounts this store still holds as they were.
    let partial = "/seed-2/";
    let mut copied = 0;
    for (key, value) in &complete {
        let rest = key.strip_prefix(first).unwrap();
        let keep = rest == "accounts/acme"
            || rest == "accounts/beta"
            || (rest.starts_with("slots/") && (value == "acme" || value == "beta"));
        if keep {
            fleet.etcd.etcdctl(&["put", &format!("{partial}{rest}"), value]).unwrap();
            copied += 1;
        }
    }
    assert_eq!(copied, 4, "{complete:?}");
    let a = &mut fleet.nodes[0];
    a.stop();
    a.write_config(partial, "");
    a.start();
    // A fleet seeded part-way is not taken: the host keeps its whole policy.
    wait_error(a, "never followed this fleet");
    assert_eq!(policy(a), changed, "a part-way fleet replaced the host's policy");
    let (code, imported, stderr) = ctl_import(&a.host.socket());
    assert_eq!(code, 0, "{imported} {stderr}");
    assert_eq!(imported["already_present"], 4, "{imported}");
    assert_eq!(imported["written"], 7, "{imported}");
    assert_eq!(policy(a), changed);
    assert_eq!(a.cluster_status()["last_error"], Value::Null);

    // Something else under the prefix (acme's document as another policy has it: mode
    // off): refused, naming the key, and nothing written.
    let other = "/seed-3/";
    let acme = &complete.iter().find(|(key, _)| key == &format!("{first}accounts/acme")).unwrap().1;
    assert!(acme.contains("\"mode\":\"enforce\""), "{acme}");
    let acme = acme.replace("\"mode\":\"enforce\"", "\"mode\":\"off\"");
    fleet.etcd.etcdctl(&["put", &format!("{other}accounts/acme"), &acme]).unwrap();
    let a = &mut fleet.nodes[0];
    a.stop();
    a.host.write_standalone_config();
    a.start();
    a.stop();
    a.write_config(other, "");
    a.start();
    let (code, reply, stderr) = ctl_import(&a.host.socket());
    assert_eq!(code, 2, "{reply}");
    assert_eq!(reply["code"], "refused", "{reply}");
    assert!(stderr.contains(&format!("{other}accounts/acme")), "{stderr}");
    assert_eq!(keys_under(&fleet, other).len(), 1, "a refused import wrote keys");
    assert!(fleet.nodes[0].enforces(PORT));
}

/// A store from an older version may hold names the fleet's keys cannot carry (an id with
/// `/` reads as another key, so the import would never be seen as finished). The import
/// refuses it before writing anything, naming the account, quoted.
#[test]
fn an_account_whose_id_the_fleet_cannot_hold_is_refused_before_anything_is_written() {
    let mut fleet = Fleet::new(1).unwrap();
    let a = &mut fleet.nodes[0];
    a.host.write_standalone_config();
    a.start();
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.stop();
    let conn = rusqlite::Connection::open(a.host.path("state/ipaccess.db")).unwrap();
    let legacy = "INSERT INTO accounts (id, slot, parent, state, mode, state_reason, created_at)
                  VALUES ('odd/x', 900, NULL, 'active', 'off', NULL, 1)";
    assert_eq!(conn.execute(legacy, []).unwrap(), 1);
    drop(conn);
    a.write_config(PREFIX, "");
    a.start();
    let (code, out, stderr) = ctl_import(&a.host.socket());
    assert_ne!(code, 0, "{out} {stderr}");
    assert!(stderr.contains("\"odd/x\"") && stderr.contains("nothing was imported"), "{stderr}");
    assert_eq!(keys_under(&fleet, PREFIX), Vec::<(String, String)>::new(), "the refused import wrote keys");
}
