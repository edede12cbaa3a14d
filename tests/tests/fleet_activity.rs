//! Support on any node of a fleet sees the denied sign-ins made on every node: a real
//! 3-member etcd cluster and 3 real ipaccessd nodes, checks answered on node A (and C),
//! support's `activity` and an override grant's evidence read on node C (and B).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipaccess_tests::daemon::TempDir;
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX};
use ipaccess_tests::mmdb;
use serde_json::{Value, json};

const ATTACKER: &str = "203.0.113.7";
const OTHER: &str = "203.0.113.8";
/// In the test location database's Testville (198.18.0.0/16).
const TRAVELLER: &str = "198.18.77.7";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `count` sign-in checks of acme from `addr` with `method`, recorded (not dry runs) and
/// made as root, so with the check role: the customer's own attempts. Each is denied.
fn denied_checks(node: &FleetNode, addr: &str, method: &str, count: usize) {
    for _ in 0..count {
        let reply = node.host.ok(json!({"cmd": "check", "account": "acme", "addr": addr, "method": method}));
        assert_eq!(reply["allowed"], false, "{}: {reply}", node.name);
    }
}

/// The row of a sign-in summary (or a grant's evidence) for `addr` and `method`.
fn row<'r>(rows: &'r Value, addr: &str, method: &str) -> Option<&'r Value> {
    rows.as_array()?.iter().find(|r| r["address"] == addr && r["method"] == method)
}

fn denied_summary(node: &FleetNode) -> Value {
    node.host.ok(json!({"cmd": "activity", "account": "acme", "summary": true, "denied_only": true}))
}

/// Waits (at most 20 s) until `node`'s denied summary counts `count` checks from `addr`
/// with `method`, and returns that row.
fn wait_for_count(node: &FleetNode, addr: &str, method: &str, count: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rows = denied_summary(node);
        if let Some(r) = row(&rows, addr, method).filter(|r| r["count"] == count) {
            return r.clone();
        }
        assert!(Instant::now() < deadline, "{} never counted {count} checks from {addr} ({method}): {rows}", node.name);
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn support_on_any_node_sees_the_attempts_made_on_every_node() {
    let mut fleet = Fleet::new(3).unwrap();
    // Node C places addresses (a made-up database); A, which answers the checks, does not.
    let places = TempDir::new();
    let database = places.0.join("test-city.mmdb");
    std::fs::write(&database, mmdb::test_city_database()).unwrap();
    fleet.nodes[2].write_config(PREFIX, &format!("location_database = {:?}", database.to_str().unwrap()));
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.51.100.0/24"}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": "198.51.100.1"}));
    fleet.converge(a.applied());
    let (a, b, c) = (&fleet.nodes[0], &fleet.nodes[1], &fleet.nodes[2]);

    let started = now();
    denied_checks(a, ATTACKER, "password", 5);
    denied_checks(a, OTHER, "api_key", 2);
    let on_a = now();

    // Node C answered none of them, and shows them all, as node A counted them.
    let attacker = wait_for_count(c, ATTACKER, "password", 5);
    assert_eq!(attacker["reason"], "address_not_allowed", "{attacker}");
    assert_eq!(attacker["application"], true, "{attacker}");
    assert_eq!(attacker["nodes"], json!(["node-a"]), "{attacker}");
    for seen in ["first_seen", "last_seen"] {
        let at = attacker[seen].as_i64().unwrap();
        assert!((started..=on_a).contains(&at), "{seen} {at} outside [{started}, {on_a}]: {attacker}");
    }
    let other = wait_for_count(c, OTHER, "api_key", 2);
    assert_eq!(other["nodes"], json!(["node-a"]), "{other}");
    // Rows that came from another node are placed by the node that reads them.
    denied_checks(a, TRAVELLER, "password", 1);
    let placed = wait_for_count(c, TRAVELLER, "password", 1);
    assert_eq!(placed["location"], json!({"country": "XA", "city": "Testville"}), "{placed}");
    assert!(attacker.get("location").is_none(), "{attacker}");

    // Attempts from the same address on A and C add up, on C and on B alike.
    denied_checks(c, ATTACKER, "password", 3);
    let on_c = now();
    let both = wait_for_count(c, ATTACKER, "password", 8);
    assert_eq!(both["nodes"], json!(["node-a", "node-c"]), "{both}");
    assert!((started..=on_a).contains(&both["first_seen"].as_i64().unwrap()), "{both}");
    assert!((started..=on_c).contains(&both["last_seen"].as_i64().unwrap()), "{both}");
    // Once C has published its own checks too (a pass is 2 s), it does not count them twice.
    std::thread::sleep(Duration::from_secs(5));
    let settled = denied_summary(c);
    assert_eq!(row(&settled, ATTACKER, "password").map(|r| r["count"].clone()), Some(json!(8)), "{settled}");
    let on_b = wait_for_count(b, ATTACKER, "password", 8);
    assert_eq!(on_b["nodes"], json!(["node-a", "node-c"]), "{on_b}");
    // The full summary (allowed and denied) has them too.
    let all = c.host.ok(json!({"cmd": "activity", "account": "acme", "summary": true}));
    assert_eq!(row(&all, ATTACKER, "password").map(|r| r["count"].clone()), Some(json!(8)), "{all}");

    // An override granted on node C shows the customer's denied attempts of every node.
    let grant = c.host.ok(json!({"cmd": "override_grant", "account": "acme", "cidr": ATTACKER,
        "ttl_seconds": 3600, "ticket": "T-1", "reason": "customer travelling"}));
    let evidence = &grant["recent_denied"];
    let seen = row(evidence, ATTACKER, "password").unwrap_or_else(|| panic!("no {ATTACKER} in {grant}"));
    assert_eq!((seen["count"].as_i64(), seen["nodes"].clone()), (Some(8), json!(["node-a", "node-c"])), "{grant}");
    assert_eq!(row(evidence, OTHER, "api_key").map(|r| r["count"].clone()), Some(json!(2)), "{grant}");
    assert!(grant.get("notes").is_none(), "{grant}");

    // What node A published: one key per (address, method), on a lease of the retention
    // (90 days by default) plus a day, and rewritten only when its counts change.
    let key = format!("{PREFIX}~attempts/acme/{ATTACKER}/password/node-a");
    let published = |key: &str| -> Value {
        let text = fleet.etcd.etcdctl(&["get", key, "-w", "json"]).unwrap();
        serde_json::from_str::<Value>(&text).unwrap()["kvs"][0].clone()
    };
    let first = published(&key);
    let lease = first["lease"].as_i64().expect("the key has a lease");
    let ttl = fleet.etcd.etcdctl(&["lease", "timetolive", &format!("{lease:x}"), "-w", "json"]).unwrap();
    let ttl: Value = serde_json::from_str(&ttl).unwrap();
    let field = |names: [&str; 2]| names.iter().find_map(|n| ttl[n].as_i64()).unwrap_or_else(|| panic!("{ttl}"));
    // etcdctl 3.4 names them as its client library does.
    let (granted, left) = (field(["granted-ttl", "grantedTTL"]), field(["ttl", "TTL"]));
    assert_eq!(granted, 91 * 24 * 3600, "{ttl}");
    assert!(left > 90 * 24 * 3600, "{ttl}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(published(&key)["version"], first["version"], "an unchanged count was written again");

    // etcd loses its quorum: node C still answers from its own checks, and says so by
    // naming itself alone; checks go on being counted.
    fleet.etcd.kill(0).unwrap();
    fleet.etcd.kill(1).unwrap();
    let c = &fleet.nodes[2];
    // (The attacker's address is covered by the override now: another one tries.)
    denied_checks(c, "203.0.113.9", "sso", 1);
    let asked = Instant::now();
    let rows = denied_summary(c);
    assert!(asked.elapsed() < Duration::from_secs(5), "activity took {:?} with etcd down", asked.elapsed());
    let alone = row(&rows, ATTACKER, "password").unwrap_or_else(|| panic!("node C lost its own checks: {rows}"));
    assert_eq!((alone["count"].as_i64(), alone["nodes"].clone()), (Some(3), json!(["node-c"])), "{rows}");
    assert_eq!(row(&rows, "203.0.113.9", "sso").map(|r| r["count"].clone()), Some(json!(1)), "{rows}");
    assert!(row(&rows, OTHER, "api_key").is_none(), "{rows}");
}
