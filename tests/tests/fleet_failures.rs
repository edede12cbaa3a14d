//! The fleet under failure, on a real 3-member etcd cluster with real ipaccessd nodes: the
//! etcd leader killed in the middle of a stream of changes, admins racing through two nodes,
//! a node killed while its change is on the way, an override expiring while etcd is down,
//! a node catching up without dropping one allowed packet, a node whose kernel tables
//! cannot take a change the fleet committed, and etcd restored from an older backup (with a
//! change sent while the node reconnects to it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipaccess_tests::client::Conn;
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX, error_code};
use ipaccess_tests::netns::{paced_udp_sender, receive_flows, set_rcvbuf, tcp_connect, udp_client};
use serde_json::{Value, json};

const TCP_PORT: u16 = 7443;
const UDP_PORT: u16 = 7553;
/// Kernel tables of 4,096 slots (and no per-account entry limit in the way): a few thousand
/// entries fill them.
const SMALL_MAPS: &str = "[maps]\nslots = 4096\naccounts = 64\n[limits]\nmax_entries_per_account = 100000\n";

/// Two nodes, started, the one at `small` with [`SMALL_MAPS`].
fn two_nodes_one_small(small: usize) -> Fleet {
    let mut fleet = Fleet::new(2).unwrap();
    let node = &fleet.nodes[small];
    std::fs::write(node.host.path("ipaccessd.toml"), node.config(PREFIX, SMALL_MAPS)).unwrap();
    fleet.start_all();
    fleet
}

/// An account's allowlist on a node, as CIDR strings (its own entries and its sets'
/// networks); None if the node does not know it.
fn allow_set(node: &FleetNode, account: &str) -> Option<BTreeSet<String>> {
    let reply = node.host.request(json!({"cmd": "allow_list", "account": account}));
    match error_code(&reply).as_deref() {
        None => Some(reply["ok"].as_array().unwrap().iter().map(|e| e["cidr"].as_str().unwrap().to_owned()).collect()),
        Some("unknown_account") => None,
        Some(other) => panic!("{}: allow_list {account}: {other}: {reply}", node.name),
    }
}

/// Every account a node has: id -> (parent, effective state).
fn accounts(node: &FleetNode) -> BTreeMap<String, (Option<String>, String)> {
    let listed = node.host.ok(json!({"cmd": "account_list"}));
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let parent = a["parent"].as_str().map(str::to_owned);
            (a["id"].as_str().unwrap().to_owned(), (parent, a["effective_state"].as_str().unwrap().to_owned()))
        })
        .collect()
}

/// Sends `request` on `conn` again, up to `tries` times, while it is refused
/// with `conflict` (the node has the winner by then, so a retry is checked against it).
/// Returns the last reply and whether a conflict was seen.
fn with_retries(conn: &mut Conn, request: &Value, tries: usize) -> (Value, bool) {
    let mut conflicted = false;
    for _ in 0..tries {
        let reply = conn.request(request.clone());
        if error_code(&reply).as_deref() != Some("conflict") {
            return (reply, conflicted);
        }
        conflicted = true;
    }
    (conn.request(request.clone()), conflicted)
}

/// Sends `a` through node A and `b` through node B at the same instant (each on a connection
/// opened beforehand, released by one barrier), each retried on `conflict`; their final
/// replies, and how many of them met a conflict.
fn race(fleet: &Fleet, a: Value, b: Value) -> (Value, Value, usize) {
    race_through(fleet, [0, 1], a, b)
}

/// [`race`] with `a` sent through node `through[0]` and `b` through node `through[1]` (the
/// same node for two connections to one node).
fn race_through(fleet: &Fleet, through: [usize; 2], a: Value, b: Value) -> (Value, Value, usize) {
    let [na, nb] = through.map(|i| &fleet.nodes[i]);
    let mut conns = [Conn::open(&na.host.socket()), Conn::open(&nb.host.socket())];
    let barrier = Barrier::new(2);
    let [ca, cb] = &mut conns;
    let ((ra, xa), (rb, xb)) = thread::scope(|s| {
        let ta = s.spawn(|| {
            barrier.wait();
            with_retries(ca, &a, 3)
        });
        let tb = s.spawn(|| {
            barrier.wait();
            with_retries(cb, &b, 3)
        });
        (ta.join().unwrap(), tb.join().unwrap())
    });
    (ra, rb, usize::from(xa) + usize::from(xb))
}

/// Does `src` (one of the node's client addresses) get a TCP handshake through to the bound port?
fn passes(node: &FleetNode, src: IpAddr, timeout: Duration) -> bool {
    passes_to(node, src, TCP_PORT, timeout)
}

/// [`passes`] for the server's TCP `port`.
fn passes_to(node: &FleetNode, src: IpAddr, port: u16, timeout: Duration) -> bool {
    let hosts = &node.host.hosts;
    let target = SocketAddr::new(hosts.server_v4.into(), port);
    hosts.client.run(|| tcp_connect(src, target, timeout))
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Keys and values under `prefix` in etcd (read with etcdctl in the etcd namespace).
fn etcd_get_prefix(fleet: &Fleet, prefix: &str) -> Vec<(String, String)> {
    let text = fleet.etcd.etcdctl(&["get", "--prefix", prefix]).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len().is_multiple_of(2), "etcdctl get printed an odd number of lines:\n{text}");
    lines.chunks(2).map(|kv| (kv[0].to_owned(), kv[1].to_owned())).collect()
}

/// (1) The etcd leader is killed (SIGKILL) in the middle of a stream of changes through node A:
/// changes are taken again within a bounded time after the election, and every change that
/// was acknowledged is on every node afterwards. A change refused with `cluster_unavailable`
/// may or may not have been committed; nothing is asserted about those.
#[test]
fn the_leader_killed_loses_no_acknowledged_change() {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));

    const BEFORE: usize = 30;
    const AFTER: usize = 30;
    const RESUME_WITHIN: Duration = Duration::from_secs(20);
    let (mut acked, mut unsure) = (Vec::new(), Vec::new());
    let mut killed: Option<(usize, Instant)> = None;
    let mut resumed_after = None;
    let mut acked_after_kill = 0;
    let started = Instant::now();
    for i in 0..2_000usize {
        assert!(started.elapsed() < Duration::from_secs(90), "the loop took too long");
        if killed.is_none() && acked.len() == BEFORE {
            let leader = fleet.etcd.leader().expect("etcd has a leader");
            fleet.etcd.kill(leader).unwrap();
            killed = Some((leader, Instant::now()));
        }
        let cidr = format!("198.19.{}.{}/32", i / 200, i % 200 + 1);
        let reply = fleet.nodes[0].host.request(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr}));
        match error_code(&reply).as_deref() {
            None => {
                acked.push(cidr);
                if let Some((_, at)) = killed {
                    resumed_after.get_or_insert(at.elapsed());
                    acked_after_kill += 1;
                    if acked_after_kill == AFTER {
                        break;
                    }
                }
            }
            // Not confirmed, or lost to this node's own unconfirmed change that etcd
            // committed after all: not acknowledged, so either outcome is allowed.
            Some("cluster_unavailable") | Some("conflict") => {
                assert!(killed.is_some(), "refused while etcd was whole: {reply}");
                unsure.push(cidr);
                if let Some((_, at)) = killed {
                    assert!(
                        resumed_after.is_some() || at.elapsed() < RESUME_WITHIN,
                        "changes still refused {RESUME_WITHIN:?} after the leader was killed: {reply}"
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
            Some(other) => panic!("allow_add {cidr}: unexpected {other}: {reply}"),
        }
    }
    let (leader, _) = killed.expect("the leader was killed");
    assert_eq!(acked_after_kill, AFTER, "changes did not resume after the election");
    eprintln!(
        "killed member {leader}; writes resumed after {resumed_after:?}; {} acknowledged, {} refused while unsure",
        acked.len(),
        unsure.len()
    );

    // Every node converges on etcd's revision (unconfirmed changes it committed late
    // included), and holds every acknowledged entry.
    fleet.converge(fleet.barrier().unwrap());
    for node in &fleet.nodes {
        let listed = allow_set(node, "acme").expect("acme exists");
        let missing: Vec<&String> = acked.iter().filter(|c| !listed.contains(*c)).collect();
        assert!(missing.is_empty(), "{} lost acknowledged entries: {missing:?}", node.name);
    }
    // And the nodes agree with each other on the changes that were not confirmed as well.
    let a_list = allow_set(&fleet.nodes[0], "acme");
    for node in &fleet.nodes[1..] {
        assert_eq!(allow_set(node, "acme"), a_list, "{} differs from node A", node.name);
    }
}

/// Rounds of each race: enough for the two changes to meet in etcd in some of them.
const ROUNDS: usize = 5;

/// A fleet of three started nodes for the races.
fn racing_fleet() -> Fleet {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    fleet
}

/// (2a) Lockout prevention: X and Y are all an enforcing account allows; A removes X while B
/// removes Y. Each alone is fine; both would leave nothing allowed, which the guard refuses.
#[test]
fn racing_removals_never_leave_an_enforcing_account_with_nothing_allowed() {
    racing_removals(&racing_fleet(), [0, 1]);
}

/// (2a) on one node: a node does not hold its writer lock across etcd's round trip, so two
/// of its connections race as two nodes do, and the guard still holds.
#[test]
fn racing_removals_through_one_node_never_leave_an_enforcing_account_with_nothing_allowed() {
    racing_removals(&racing_fleet(), [0, 0]);
}

/// [`racing_removals_never_leave_an_enforcing_account_with_nothing_allowed`]'s rounds, the
/// removals sent through nodes `through`.
fn racing_removals(fleet: &Fleet, through: [usize; 2]) {
    let mut conflicts = 0;
    for r in 0..ROUNDS {
        let (account, x, y) = (format!("lock{r}"), format!("198.19.{r}.1/32"), format!("198.19.{r}.2/32"));
        let a = &fleet.nodes[0];
        a.host.ok(json!({"cmd": "account_add", "account": account}));
        a.host.ok(json!({"cmd": "allow_add", "account": account, "cidr": x}));
        a.host.ok(json!({"cmd": "allow_add", "account": account, "cidr": y}));
        a.host.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce"}));
        fleet.settle();
        let (ra, rb, n) = race_through(
            fleet,
            through,
            json!({"cmd": "allow_remove", "account": account, "cidr": x}),
            json!({"cmd": "allow_remove", "account": account, "cidr": y}),
        );
        conflicts += n;
        at_most_one_removal(fleet, &format!("round {r}"), &account, (&x, &ra), (&y, &rb));
    }
    eprintln!("lockout race through nodes {through:?}: {conflicts} conflicts met in {ROUNDS} rounds");
}

/// Two removals raced, of `x` (answered `ra`) and `y` (`rb`), the account's only two ways
/// in: never both acknowledged, each refused only with `lockout`, and every node lets in
/// exactly what the acknowledged one left.
fn at_most_one_removal(fleet: &Fleet, round: &str, account: &str, (x, ra): (&str, &Value), (y, rb): (&str, &Value)) {
    fleet.settle();
    for reply in [ra, rb] {
        assert!(matches!(error_code(reply).as_deref(), None | Some("lockout")), "{round}: {reply}");
    }
    assert!(error_code(ra).is_some() || error_code(rb).is_some(), "{round}: both removals acknowledged: {ra} {rb}");
    let expected: BTreeSet<String> = match (error_code(ra), error_code(rb)) {
        (None, _) => [y.to_owned()].into(),
        (_, None) => [x.to_owned()].into(),
        _ => [x.to_owned(), y.to_owned()].into(),
    };
    for node in &fleet.nodes {
        let listed = allow_set(node, account).expect("the account exists");
        assert_eq!(listed, expected, "{round}: {} (A: {ra}, B: {rb})", node.name);
    }
}

/// (2b) One endpoint: A binds it to acme while B binds it to other; one owner on every node.
#[test]
fn racing_bindings_leave_one_owner() {
    let fleet = racing_fleet();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "account_add", "account": "other"}));
    let mut conflicts = 0;
    for r in 0..ROUNDS {
        fleet.settle();
        let port = 9000 + r as u16;
        let addr = fleet.nodes[0].host.hosts.server_v4;
        let (ra, rb, n) = race(
            &fleet,
            json!({"cmd": "bind_add", "account": "acme", "addr": addr, "port": port}),
            json!({"cmd": "bind_add", "account": "other", "addr": addr, "port": port}),
        );
        conflicts += n;
        fleet.settle();
        let owner = match (error_code(&ra).as_deref(), error_code(&rb).as_deref()) {
            (None, Some("binding_exists" | "conflict")) => "acme",
            (Some("binding_exists" | "conflict"), None) => "other",
            _ => panic!("round {r}: not exactly one owner acknowledged: A {ra}, B {rb}"),
        };
        for node in &fleet.nodes {
            let bound: Vec<Value> = node.host.ok(json!({"cmd": "bind_list"})).as_array().unwrap().clone();
            let owners: Vec<&str> = bound
                .iter()
                .filter(|b| b["target"]["port"] == json!(port))
                .map(|b| b["account"].as_str().unwrap())
                .collect();
            assert_eq!(owners, [owner], "round {r}: {} has owners {owners:?} for port {port}", node.name);
        }
        let keys = etcd_get_prefix(&fleet, &format!("{PREFIX}bindings/{addr}/tcp:{port}/"));
        assert_eq!(keys.len(), 1, "round {r}: etcd holds {keys:?}");
    }
    eprintln!("binding race: {conflicts} conflicts met in {ROUNDS} rounds");
}

/// (2c) A sub-user under a parent being removed: A creates s under p while B removes p
/// (without `recursive`). Exactly one is acknowledged, and no node ever has a sub-user whose
/// parent is gone.
#[test]
fn racing_sub_user_and_parent_removal_never_orphan_a_sub_user() {
    let fleet = racing_fleet();
    let mut conflicts = 0;
    for r in 0..ROUNDS {
        let (parent, sub) = (format!("p{r}"), format!("s{r}"));
        fleet.nodes[0].host.ok(json!({"cmd": "account_add", "account": parent}));
        fleet.settle();
        let (ra, rb, n) = race(
            &fleet,
            json!({"cmd": "account_add", "account": sub, "parent": parent}),
            json!({"cmd": "account_remove", "account": parent}),
        );
        conflicts += n;
        fleet.settle();
        let evidence = || {
            let etcd = etcd_get_prefix(&fleet, &format!("{PREFIX}accounts/"));
            let slots = etcd_get_prefix(&fleet, &format!("{PREFIX}slots/"));
            let nodes: Vec<_> = fleet.nodes.iter().map(|n| (n.name.clone(), accounts(n))).collect();
            format!("etcd accounts: {etcd:?}\netcd slots: {slots:?}\nnodes: {nodes:?}")
        };
        match (error_code(&ra).as_deref(), error_code(&rb).as_deref()) {
            (None, Some("has_sub_users")) | (Some("unknown_account"), None) => {}
            _ => panic!("round {r}: not exactly one of the two acknowledged: A {ra}, B {rb}\n{}", evidence()),
        }
        for node in &fleet.nodes {
            let all = accounts(node);
            for (id, (parent, _)) in &all {
                if let Some(parent) = parent {
                    assert!(
                        all.contains_key(parent),
                        "round {r}: {} has {id} whose parent {parent} is gone",
                        node.name
                    );
                }
            }
            assert_eq!(all.contains_key(&sub), error_code(&ra).is_none(), "round {r}: {}: {all:?}", node.name);
            assert_eq!(all.contains_key(&parent), error_code(&rb).is_some(), "round {r}: {}: {all:?}", node.name);
            let shown = node.host.request(json!({"cmd": "account_show", "account": sub}));
            if error_code(&ra).is_none() {
                assert_eq!(shown["ok"]["account"]["parent"], json!(parent), "round {r}: {}: {shown}", node.name);
            }
        }
    }
    eprintln!("sub-user vs removal race: {conflicts} conflicts met in {ROUNDS} rounds");
}

/// (2d) A sub-user under a parent being banned: A bans p while B creates s under p. If s
/// exists, it is suspended with its parent on every node.
#[test]
fn racing_sub_user_and_parent_ban_leave_the_sub_user_banned() {
    let fleet = racing_fleet();
    let mut conflicts = 0;
    for r in 0..ROUNDS {
        let (parent, sub) = (format!("bp{r}"), format!("bs{r}"));
        fleet.nodes[0].host.ok(json!({"cmd": "account_add", "account": parent}));
        fleet.settle();
        let (ra, rb, n) = race(
            &fleet,
            json!({"cmd": "account_state", "account": parent, "state": "banned", "reason": "abuse"}),
            json!({"cmd": "account_add", "account": sub, "parent": parent}),
        );
        conflicts += n;
        fleet.settle();
        assert_eq!(error_code(&ra), None, "round {r}: the ban was refused: {ra}");
        // A sub-user may be created under a banned parent (it is suspended with it), so the
        // creation normally succeeds whichever came first; a refusal must leave nothing.
        let created = error_code(&rb).is_none();
        assert!(created || error_code(&rb).as_deref() == Some("refused"), "round {r}: {rb}");
        for node in &fleet.nodes {
            let all = accounts(node);
            assert_eq!(all.get(&parent).map(|a| a.1.as_str()), Some("banned"), "round {r}: {}", node.name);
            assert_eq!(all.contains_key(&sub), created, "round {r}: {}: {all:?}", node.name);
            if let Some((_, state)) = all.get(&sub) {
                assert_eq!(state, "parent_banned", "round {r}: {}", node.name);
                let answer = node.check(&sub, "198.18.0.10".parse().unwrap());
                assert_eq!(answer, (false, "parent_banned".into()), "round {r}: {}", node.name);
            }
        }
    }
    eprintln!("sub-user vs ban race: {conflicts} conflicts met in {ROUNDS} rounds");
}

/// (2e) A reference to a set being deleted: A references set s from an account while B
/// deletes s (without `force`). Exactly one is acknowledged, and no account document in etcd
/// nor any node holds a reference to a set that is gone. In odd rounds the set is empty
/// (its deletion takes no network away, and must still hold the accounts).
#[test]
fn racing_set_reference_and_set_deletion_leave_no_dangling_reference() {
    let fleet = racing_fleet();
    let mut conflicts = 0;
    for r in 0..ROUNDS {
        let (account, set, cidr) = (format!("ref{r}"), format!("vpn{r}"), format!("198.19.{r}.0/24"));
        fleet.nodes[0].host.ok(json!({"cmd": "account_add", "account": account}));
        fleet.nodes[0].host.ok(json!({"cmd": "set_add", "set": set, "cidrs": [cidr]}));
        if r % 2 == 1 {
            fleet.nodes[0].host.ok(json!({"cmd": "set_remove", "set": set, "cidrs": [cidr]}));
        }
        fleet.settle();
        let (ra, rb, n) = race(
            &fleet,
            json!({"cmd": "allow_add_set", "account": account, "set": set}),
            json!({"cmd": "set_delete", "set": set}),
        );
        conflicts += n;
        fleet.settle();
        let referenced = match (error_code(&ra).as_deref(), error_code(&rb).as_deref()) {
            (None, Some("set_in_use")) => true,
            (Some("unknown_set"), None) => false,
            _ => panic!("round {r}: not exactly one of the two acknowledged: A {ra}, B {rb}"),
        };
        let doc = etcd_get_prefix(&fleet, &format!("{PREFIX}accounts/{account}"));
        let set_key = etcd_get_prefix(&fleet, &format!("{PREFIX}sets/{set}"));
        assert_eq!(doc[0].1.contains(&format!("\"set\":\"{set}\"")), referenced, "round {r}: {doc:?}");
        assert_eq!(set_key.iter().any(|(k, _)| k.ends_with(&format!("/{set}"))), referenced, "round {r}");
        for node in &fleet.nodes {
            // The account's references (an empty set lends no row to its allowlist).
            let shown = node.host.ok(json!({"cmd": "account_show", "account": account}));
            let names_it = shown["sets"].as_array().is_some_and(|refs| refs.iter().any(|x| x["set"] == set.as_str()));
            assert_eq!(names_it, referenced, "round {r}: {}: {shown}", node.name);
            let sets = node.host.ok(json!({"cmd": "set_list"})).to_string();
            assert_eq!(sets.contains(&format!("\"{set}\"")), referenced, "round {r}: {}: {sets}", node.name);
        }
    }
    eprintln!("set reference vs deletion race: {conflicts} conflicts met in {ROUNDS} rounds");
}

/// (2f) Lockout prevention across a set: an enforcing account lets in X (its own entry) and
/// Y (through set s). A removes X (fine alone: the set still lets Y in) while B removes Y
/// from s (fine alone: X remains). Both would leave the account letting nobody in: never
/// both acknowledged.
#[test]
fn racing_entry_and_set_network_removals_never_leave_an_account_with_nothing() {
    let fleet = racing_fleet();
    let mut conflicts = 0;
    for r in 0..ROUNDS {
        let (account, set) = (format!("mix{r}"), format!("egress{r}"));
        let (x, y) = (format!("198.19.{}.1/32", 100 + r), format!("198.19.{}.2/32", 100 + r));
        let a = &fleet.nodes[0];
        a.host.ok(json!({"cmd": "set_add", "set": set, "cidrs": [y]}));
        a.host.ok(json!({"cmd": "account_add", "account": account}));
        a.host.ok(json!({"cmd": "allow_add", "account": account, "cidr": x}));
        a.host.ok(json!({"cmd": "allow_add_set", "account": account, "set": set}));
        a.host.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce"}));
        fleet.settle();
        let (ra, rb, n) = race(
            &fleet,
            json!({"cmd": "allow_remove", "account": account, "cidr": x}),
            json!({"cmd": "set_remove", "set": set, "cidrs": [y]}),
        );
        conflicts += n;
        // What the account lets in counts its own entries and the set's networks alike.
        at_most_one_removal(&fleet, &format!("round {r}"), &account, (&x, &ra), (&y, &rb));
    }
    eprintln!("entry vs set network race: {conflicts} conflicts met in {ROUNDS} rounds");
}

/// (3) Node A is killed (SIGKILL) right after a large import was sent to it, at moments
/// spread over the time such an import takes: etcd holds all of the import or none of it
/// (every account document and slot key), and nodes B and C converge to the same state.
#[test]
fn a_node_killed_in_the_middle_of_a_write_leaves_all_or_nothing() {
    kill_in_the_middle_of_an_import(40);
}

/// The same with 60 accounts: their documents and slot keys are 120 operations, and their
/// audit records one more, just under etcd's default limit of 128 per transaction
/// (`--max-txn-ops`); a larger import is written in parts (docs/design.md, "A fleet").
#[test]
fn a_node_killed_in_the_middle_of_a_large_write_leaves_all_or_nothing() {
    kill_in_the_middle_of_an_import(60);
}

fn kill_in_the_middle_of_an_import(size: usize) {
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let batch = |round: usize| -> Vec<Value> {
        (0..size)
            .map(|i| {
                json!({
                    "account": format!("k{round}-{i}"),
                    "mode": "enforce",
                    "entries": [
                        {"cidr": format!("198.19.{i}.{}/32", round + 1)},
                        {"cidr": format!("198.18.{}.0/24", 100 + i)},
                    ],
                })
            })
            .collect()
    };
    // The same import, left to finish, is taken; how long it takes spreads the kills below.
    let started = Instant::now();
    let control = fleet.nodes[0].host.request(json!({"cmd": "import", "accounts": batch(99)}));
    let took = started.elapsed();
    assert!(error_code(&control).is_none(), "an import of {size} accounts is refused: {control}");
    let mut landed = Vec::new();
    // Different moments of the write: before the daemon reads it, while it checks, while
    // etcd commits it, after.
    let delays = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.4, 1.0].map(|f: f64| took.mul_f64(f));
    for (round, delay) in delays.into_iter().enumerate() {
        let line = format!("{}\n", json!({"id": 1, "cmd": "import", "accounts": batch(round)}));
        let stream = UnixStream::connect(fleet.nodes[0].host.socket()).unwrap();
        (&stream).write_all(line.as_bytes()).unwrap();
        thread::sleep(delay);
        fleet.nodes[0].kill();
        drop(stream);
        // A transaction already with etcd commits or not within its own bound; then it is final.
        thread::sleep(Duration::from_millis(500));

        let docs = etcd_get_prefix(&fleet, &format!("{PREFIX}accounts/k{round}-"));
        let slots: Vec<(String, String)> = etcd_get_prefix(&fleet, &format!("{PREFIX}slots/"))
            .into_iter()
            .filter(|(_, id)| id.starts_with(&format!("k{round}-")))
            .collect();
        assert!(
            (docs.is_empty() || docs.len() == size) && slots.len() == docs.len(),
            "round {round} (kill after {delay:?}): {} of {size} documents and {} slot keys in etcd",
            docs.len(),
            slots.len()
        );
        for (key, value) in &docs {
            let doc: Value = serde_json::from_str(value).unwrap_or_else(|e| panic!("{key}: {e}: {value}"));
            assert_eq!(doc["entries"].as_array().map(Vec::len), Some(2), "round {round}: {key}: {value}");
            assert_eq!(doc["mode"], "enforce", "round {round}: {key}: {value}");
            let id = key.rsplit('/').next().unwrap();
            assert!(
                slots.iter().any(|(k, v)| v == id && k.ends_with(&format!("/{}", doc["slot"]))),
                "round {round}: {id}'s slot {} has no key naming it",
                doc["slot"]
            );
        }
        let all = !docs.is_empty();
        landed.push((delay, all));

        // B and C converge to etcd's revision and agree with each other and with etcd.
        let revision = fleet.barrier().unwrap();
        fleet.converge(revision);
        let (b, c) = (&fleet.nodes[1], &fleet.nodes[2]);
        assert_eq!(accounts(b), accounts(c), "round {round}: B and C differ");
        assert_eq!(b.host.ok(json!({"cmd": "account_list"})), c.host.ok(json!({"cmd": "account_list"})));
        for i in (0..size).step_by(7) {
            let id = format!("k{round}-{i}");
            let (lb, lc) = (allow_set(b, &id), allow_set(c, &id));
            assert_eq!(lb, lc, "round {round}: {id}");
            assert_eq!(lb.is_some(), all, "round {round}: {id} on B disagrees with etcd");
        }
        fleet.nodes[0].start();
    }
    eprintln!("import of {size} taking {took:?}; landed (kill after, all): {landed:?}");
    // The kills fell on both sides of the commit, so both outcomes were checked.
    assert!(landed.iter().any(|l| l.1) && landed.iter().any(|l| !l.1), "one outcome only: {landed:?}");
    // Node A, restarted on its local copy, caught up as well.
    fleet.settle();
    assert_eq!(accounts(&fleet.nodes[0]), accounts(&fleet.nodes[1]), "A differs after its restart");
}

/// (4) An override granted through node A is in force on every node; etcd then loses its
/// quorum; the override still ends on time on every node, at sign-in and on the wire.
#[test]
fn an_override_expires_on_every_node_while_etcd_is_down() {
    const TTL: u64 = 8;
    let mut fleet = Fleet::new(3).unwrap();
    for node in &fleet.nodes {
        node.write_config(PREFIX, "min_override_ttl_seconds = 1\n");
    }
    fleet.start_all();
    let _listeners = fleet.listeners(TCP_PORT);
    let a = &fleet.nodes[0];
    let (good, guest) = (a.host.hosts.client_v4[0], a.host.hosts.client_v4[1]);
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": a.host.hosts.server_v4, "port": TCP_PORT}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(
            !passes(node, guest.into(), Duration::from_millis(500)),
            "{}: guest passes before the grant",
            node.name
        );
    }

    let granted = fleet.nodes[0].host.ok(json!({
        "cmd": "override_grant", "account": "acme", "cidr": format!("{guest}/32"), "ttl_seconds": TTL,
        "ticket": "SUP-1", "reason": "travelling",
    }));
    let expires_at = granted["override"]["expires_at"].as_i64().expect("expires_at");
    fleet.settle();
    for node in &fleet.nodes {
        assert!(node.check("acme", guest.into()).0, "{}: the override is not in force", node.name);
        assert!(
            passes(node, guest.into(), Duration::from_secs(2)),
            "{}: the override does not pass the wire",
            node.name
        );
    }

    // Two of three members gone: no quorum, before the override ends.
    let leader = fleet.etcd.leader().expect("a leader");
    let other = (0..3).find(|&i| i != leader).unwrap();
    fleet.etcd.kill(leader).unwrap();
    fleet.etcd.kill(other).unwrap();
    assert!(
        unix_now() < expires_at - 1,
        "too slow: quorum was lost only at {} with the override ending at {expires_at}",
        unix_now()
    );
    // Every node knows etcd is gone before the override ends.
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in &fleet.nodes {
        while node.cluster_status()["connected"] != false {
            assert!(Instant::now() < deadline, "{} still reports etcd connected", node.name);
            thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(unix_now() < expires_at, "too slow: the nodes noticed the outage after the override ended");

    // After the expiry (second granularity: one second of slack, plus the kernel's own check).
    let wait = (expires_at + 1 - unix_now()).max(0) as u64;
    thread::sleep(Duration::from_secs(wait));
    for node in &fleet.nodes {
        assert_eq!(
            node.check("acme", guest.into()),
            (false, "address_not_allowed".into()),
            "{}: the override outlived its expiry",
            node.name
        );
        assert!(
            !passes(node, guest.into(), Duration::from_millis(700)),
            "{}: the wire still lets the guest in",
            node.name
        );
        assert!(passes(node, good.into(), Duration::from_secs(2)), "{}: the allowed address is shut out", node.name);
        assert_eq!(node.cluster_status()["connected"], false, "{}: etcd came back during the test", node.name);
    }
}

/// (5) Node C is stopped, 1,000 changes are made through A, and C starts again: not one
/// datagram from an allowed source is dropped on C's wire while it catches up (and not one
/// from a disallowed source passes), and C ends equal to A.
#[test]
fn a_node_catching_up_drops_no_allowed_packet() {
    const ACCOUNTS: usize = 100;
    const GOOD_RATE: u64 = 2000;
    const BAD_RATE: u64 = 200;
    let mut fleet = Fleet::new(3).unwrap();
    fleet.start_all();
    let a = &fleet.nodes[0];
    let (good, bad) = (a.host.hosts.client_v4[0], a.host.hosts.client_v4[1]);
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    a.host.ok(
        json!({"cmd": "bind_add", "account": "acme", "addr": a.host.hosts.server_v4, "port": UDP_PORT, "proto": "udp"}),
    );
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    fleet.settle();

    fleet.nodes[2].stop();
    // 1,000 changes: 100 accounts with 9 entries each, and acme's own list grows by 10 (so
    // C rewrites the very account whose traffic flows while it catches up). Pipelined on one
    // connection: the node still takes them one change, one etcd transaction at a time.
    let mut lines = Vec::new();
    for i in 0..ACCOUNTS {
        let id = format!("bulk{i}");
        lines.push(json!({"cmd": "account_add", "account": id}));
        for j in 0..9 {
            lines.push(json!({"cmd": "allow_add", "account": id, "cidr": format!("198.19.{i}.{}/32", j + 1)}));
        }
    }
    for j in 0..10 {
        lines
            .insert(j * 97, json!({"cmd": "allow_add", "account": "acme", "cidr": format!("198.18.200.{}/32", j + 1)}));
    }
    assert_eq!(lines.len(), 1_010);
    let lines: Vec<String> = lines.iter().map(|l| format!("{l}\n")).collect();
    let started = Instant::now();
    let ok = Conn::open(&fleet.nodes[0].host.socket()).pipelined(&lines);
    assert_eq!(ok, lines.len(), "some of the changes through A were refused");
    let revision = fleet.nodes[0].applied();
    eprintln!("{} changes through A in {:.1?}", lines.len(), started.elapsed());

    // Traffic to C's bound port from the allowed and a disallowed source, received (not
    // echoed: a datagram lost on the way back would count as a drop) in C's server namespace.
    let c = &fleet.nodes[2];
    let hosts = &c.host.hosts;
    let dst = SocketAddr::new(hosts.server_v4.into(), UDP_PORT);
    let rx = hosts.server.run(move || UdpSocket::bind(dst)).unwrap();
    set_rcvbuf(&rx, 16 << 20);
    let rx_stop = Arc::new(AtomicBool::new(false));
    let limit = Duration::from_secs(60);
    let receiver = receive_flows(rx, (good.into(), 1), bad.into(), 200_000, rx_stop.clone(), limit + limit);
    let tx_stop = Arc::new(AtomicBool::new(false));
    let good_tx = paced_udp_sender(udp_client(&hosts.client, good.into(), dst), 1, GOOD_RATE, tx_stop.clone(), limit);
    let bad_tx = paced_udp_sender(udp_client(&hosts.client, bad.into(), dst), 2, BAD_RATE, tx_stop.clone(), limit);
    thread::sleep(Duration::from_millis(300));

    let catch_up = Instant::now();
    fleet.nodes[2].start();
    fleet.converge_within(revision, Duration::from_secs(30));
    let caught_up = catch_up.elapsed();
    thread::sleep(Duration::from_millis(300));
    tx_stop.store(true, Ordering::Relaxed);
    let (good_sent, bad_sent) = (good_tx.join().unwrap(), bad_tx.join().unwrap());
    // Let the receiver drain its buffer.
    thread::sleep(Duration::from_millis(500));
    rx_stop.store(true, Ordering::Relaxed);
    let seen = receiver.join().unwrap();
    let received = seen.good.iter().filter(|&&s| s).count() as u64;
    eprintln!("C caught up in {caught_up:.1?}; {good_sent} allowed and {bad_sent} disallowed datagrams sent");
    assert!(good_sent >= GOOD_RATE / 2 && bad_sent > 0, "senders too slow: {good_sent}, {bad_sent}");
    assert_eq!((seen.bad, seen.other, seen.good_dups), (0, 0, 0), "disallowed or unexpected datagrams passed");
    let lost: Vec<usize> = (0..good_sent as usize).filter(|&i| !seen.good[i]).take(20).collect();
    assert_eq!(received, good_sent, "allowed datagrams dropped while C caught up (first lost: {lost:?})");

    // C equals A.
    let (a, c) = (&fleet.nodes[0], &fleet.nodes[2]);
    assert_eq!(c.host.ok(json!({"cmd": "account_list"})), a.host.ok(json!({"cmd": "account_list"})));
    for id in ["acme".to_owned()].into_iter().chain((0..ACCOUNTS).step_by(9).map(|i| format!("bulk{i}"))) {
        assert_eq!(allow_set(c, &id), allow_set(a, &id), "{id}: C differs from A");
    }
    assert_eq!(c.host.ok(json!({"cmd": "bind_list"})), a.host.ok(json!({"cmd": "bind_list"})));
}

/// A change the asking node's kernel cannot take is the fleet's all the same (another node
/// enforces it), but the asking node does not acknowledge it as enforced: it answers
/// `tables_full`, saying the change is committed, and keeps enforcing the previous list.
#[test]
fn a_change_the_asking_nodes_tables_cannot_take_is_not_acknowledged() {
    let fleet = two_nodes_one_small(0);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    a.host.ok(json!({"cmd": "account_add", "account": "big"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "big", "cidr": "198.18.0.7"}));
    let mut wanted: Vec<Value> = (1..=3000u32).map(|n| json!({"cidr": format!("fd00::{n:x}/128")})).collect();
    wanted.push(json!({"cidr": "198.18.0.7/32"}));
    let reply = a.host.request(json!({"cmd": "allow_replace", "account": "big", "entries": wanted, "force": true}));
    assert_eq!(error_code(&reply).as_deref(), Some("tables_full"), "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(message.contains("committed in the fleet") && message.contains("big"), "{message}");
    fleet.settle();
    assert_eq!(allow_set(b, "big").map(|l| l.len()), Some(3001), "node B has the fleet's list");
    assert_eq!(b.check("big", "fd00::bb8".parse().unwrap()), (true, "allowed".to_string()));
    let failures = a.cluster_status()["apply_failures"].as_u64().unwrap();
    assert!(failures >= 1, "node A counts the account it could not enforce: {failures}");
    // Once the list fits again, a change made on node A is acknowledged as before.
    let reply = a.host.request(json!({"cmd": "allow_replace", "account": "big", "entries": [{"cidr": "198.18.0.7"}]}));
    assert_eq!(error_code(&reply), None, "{reply}");
    a.host.ok(json!({"cmd": "allow_add", "account": "big", "cidr": "198.18.0.8"}));
}

/// A binding the asking node's kernel cannot take (its binding table would have to grow into
/// full tables) is not acknowledged: `tables_full`, naming the address, as for an account.
/// The node names the address in `unenforced`, and once room is made it writes the binding
/// on its own, so the endpoint is filtered there without another change.
#[test]
fn a_binding_the_asking_nodes_tables_cannot_take_is_not_acknowledged() {
    let fleet = two_nodes_one_small(0);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    let (good, guest) = (a.host.hosts.client_v4[0], a.host.hosts.client_v4[1]);
    let server = a.host.hosts.server_v4;
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    // 990 host entries: a table of 2,048 of node A's 4,096 slots.
    let hosts: Vec<Value> = (0..990u32).map(|n| json!({"cidr": format!("fd00::1:{n:x}/128")})).collect();
    a.host.ok(json!({"cmd": "account_add", "account": "filler"}));
    a.host.ok(json!({"cmd": "allow_replace", "account": "filler", "entries": hosts}));
    fleet.settle();
    assert_eq!(a.cluster_status()["unenforced"], json!([]), "A took the filler");

    // acme's ports, one binding at a time, until node A's binding table cannot grow.
    let refused = (0..1500u16).find_map(|n| {
        let port = 20_000 + n;
        let reply = a.host.request(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": port}));
        error_code(&reply).map(|code| (port, code, reply))
    });
    let (port, code, reply) = refused.expect("1,500 bindings fit in the room the filler left");
    assert_eq!(code, "tables_full", "{reply}");
    let message = reply["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("committed in the fleet") && message.contains(&format!("the bindings at {server}")),
        "{message}"
    );
    fleet.settle();
    assert_eq!(a.cluster_status()["unenforced"], json!([format!("bind:{server}")]));
    assert_eq!(b.cluster_status()["unenforced"], json!([]), "B has room for it");
    let _listeners = fleet.listeners(port);
    assert!(!passes_to(b, guest.into(), port, Duration::from_millis(500)), "B filters the new endpoint");
    assert!(passes_to(b, good.into(), port, Duration::from_secs(2)), "B lets acme's address in");
    // What `unenforced` says: A's kernel does not know the endpoint is acme's.
    assert!(passes_to(a, guest.into(), port, Duration::from_secs(2)), "A has the binding it refused");

    // Room is made by another account's removal; the binding is not changed again.
    a.host.ok(json!({"cmd": "account_remove", "account": "filler"}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let unenforced = a.cluster_status()["unenforced"].clone();
        if unenforced == json!([]) && !passes_to(a, guest.into(), port, Duration::from_millis(500)) {
            break;
        }
        assert!(Instant::now() < deadline, "A never wrote the binding once room was made: {unenforced}");
        thread::sleep(Duration::from_millis(500));
    }
    assert!(passes_to(a, good.into(), port, Duration::from_secs(2)), "A lets acme's address in");
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": port + 1}));
}

/// A node whose kernel refused a version of an account the fleet committed (full tables)
/// names it in `status` and enforces its previous version; once room is made anywhere in the
/// fleet's policy, it enforces the fleet's version on its own (it retries every 10 s), with no
/// further change to that account.
#[test]
fn a_node_enforces_what_its_tables_refused_once_room_is_made() {
    // SMALL_MAPS on B: 4,096 slots take the fillers half full (1,000 entries in 2,049
    // slots, 500 in 1,025), leaving about 1,010: too few for 602 entries for acme half full
    // (2,049) or packed as tight as a table may be (1,025, 59% full). Loads stay far from
    // full, so no key's probe bound decides the outcome, whichever filler B builds first.
    let fleet = two_nodes_one_small(1);
    let _listeners = fleet.listeners(TCP_PORT);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    let (good, guest) = (a.host.hosts.client_v4[0], a.host.hosts.client_v4[1]);
    let hosts = |block: u32, count: u32| (0..count).map(move |n| json!({"cidr": format!("fd00::{block:x}:{n:x}/128")}));
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": a.host.hosts.server_v4, "port": TCP_PORT}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    a.host.ok(json!({"cmd": "account_add", "account": "filler"}));
    a.host.ok(json!({"cmd": "allow_replace", "account": "filler", "entries": hosts(1, 1000).collect::<Vec<_>>()}));
    a.host.ok(json!({"cmd": "account_add", "account": "filler2"}));
    a.host.ok(json!({"cmd": "allow_replace", "account": "filler2", "entries": hosts(3, 500).collect::<Vec<_>>()}));
    fleet.settle();
    assert_eq!(b.cluster_status()["unenforced"], json!([]), "B took the fillers");
    assert!(!passes(b, guest.into(), Duration::from_millis(500)), "B lets the guest in before the change");

    let mut wanted: Vec<Value> = hosts(2, 600).collect();
    wanted.extend([json!({"cidr": format!("{good}/32")}), json!({"cidr": format!("{guest}/32")})]);
    a.host.ok(json!({"cmd": "allow_replace", "account": "acme", "entries": wanted}));
    fleet.settle();
    assert_eq!(b.cluster_status()["unenforced"], json!(["acme"]), "B names what its kernel refused");
    assert!(passes(a, guest.into(), Duration::from_secs(2)), "A enforces the fleet's list");
    assert!(!passes(b, guest.into(), Duration::from_millis(500)), "B keeps enforcing acme's previous list");
    assert!(passes(b, good.into(), Duration::from_secs(2)), "B keeps enforcing acme's previous list");

    // Room is made by another account's removal; acme itself does not change again.
    a.host.ok(json!({"cmd": "account_remove", "account": "filler"}));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let unenforced = b.cluster_status()["unenforced"].clone();
        if unenforced == json!([]) && passes(b, guest.into(), Duration::from_millis(500)) {
            break;
        }
        assert!(Instant::now() < deadline, "B never enforced acme's list once room was made: {unenforced}");
        thread::sleep(Duration::from_millis(500));
    }
    assert!(passes(b, good.into(), Duration::from_secs(2)), "B lets acme's own address in");
}

/// How many of `node`'s audit records of `account` record `action` on `cidr`.
fn audits_of(node: &FleetNode, account: &str, action: &str, cidr: &str) -> usize {
    let records = node.host.ok(json!({"cmd": "activity", "account": account, "kind": "audit", "limit": 1000}));
    let records = records.as_array().unwrap_or_else(|| panic!("{}: not a list: {records}", node.name));
    records.iter().filter(|r| r["reason"] == action && r["detail"].to_string().contains(cidr)).count()
}

/// Waits (at most 20 s) until `node` follows an etcd restored from a backup at revision
/// `restored`: connected, counting from about that revision, without the account `later`
/// that the backup does not hold.
fn follows_restored_etcd(node: &FleetNode, restored: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = node.cluster_status();
        let in_step = status["connected"] == true && status["applied_revision"].as_i64() <= Some(restored + 10);
        if in_step && node.check("later", "198.19.70.1".parse().unwrap()).1 == "unknown_account" {
            return;
        }
        assert!(Instant::now() < deadline, "{} does not follow the restored etcd: {status}", node.name);
        thread::sleep(Duration::from_millis(100));
    }
}

/// etcd restored from a backup taken earlier: its revision goes back. Each node takes
/// etcd's policy as it is now and counts from etcd's revision, not from the higher one it
/// had applied. Otherwise a change made after the restore, numbered below that, would count
/// as applied before it is: `--wait-fleet` would not wait for a node that lacks it, and a
/// node away during the restore would skip the audit records written since.
#[test]
fn after_etcd_is_restored_from_an_older_backup_the_nodes_count_from_its_revision() {
    let mut fleet = Fleet::with_members(1, 2).unwrap();
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.19.70.1/32"}));
    fleet.settle();
    let backup = fleet.etcd.dir().join("backup.db");
    fleet.etcd.save_backup(0, &backup).unwrap();
    // History the backup does not hold: 41 changes.
    for n in 1..=20 {
        let cidr = format!("198.19.71.{n}/32");
        a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr}));
        a.host.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": cidr}));
    }
    a.host.ok(json!({"cmd": "account_add", "account": "later"}));
    fleet.settle();
    let counted = fleet.nodes[1].applied();

    // node-b is away while etcd is restored, and while a change is made after it.
    fleet.nodes[1].stop();
    fleet.etcd.restore_backup(&backup).unwrap();
    let restored = fleet.etcd.revision().unwrap();
    assert!(restored + 30 < counted, "the backup's revision {restored} is not well below {counted}");
    let a = &fleet.nodes[0];
    follows_restored_etcd(a, restored);
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.19.72.1/32"}));
    assert!(a.check("acme", "198.19.72.1".parse().unwrap()).0, "node-a acknowledged before it applied");

    // node-b starts on a copy at a revision far above etcd's. Until it has taken etcd's
    // policy, it must not publish that revision: `--wait-fleet` would count it as having
    // changes it has never seen.
    fleet.nodes[1].start();
    let (deadline, mut taken_at) = (Instant::now() + Duration::from_secs(20), None);
    while taken_at.is_none_or(|at: Instant| at.elapsed() < Duration::from_millis(300)) {
        let published = fleet.nodes[0].cluster_status()["nodes"].clone();
        let b = published.as_array().and_then(|nodes| nodes.iter().find(|n| n["node"] == "node-b"));
        let b = b.and_then(|n| n["policy_revision"].as_i64());
        assert!(b.is_none_or(|b| b <= restored + 10), "node-b published its old copy's revision: {published}");
        if taken_at.is_none() && fleet.nodes[1].cluster_status()["applied_revision"].as_i64() <= Some(restored + 10) {
            taken_at = Some(Instant::now());
        }
        assert!(Instant::now() < deadline, "node-b never took the restored etcd's policy");
    }
    follows_restored_etcd(&fleet.nodes[1], restored);
    fleet.settle();
    let b = &fleet.nodes[1];
    assert_eq!(b.check("later", "198.19.70.1".parse().unwrap()).1, "unknown_account", "node-b kept what etcd lost");
    assert!(b.check("acme", "198.19.72.1".parse().unwrap()).0, "node-b lacks the change made after the restore");
    assert!(b.host.log_text().contains("restored from an earlier backup"), "node-b did not say why it resynchronised");
    // Its audit copy: the record written after the restore, once; those it had, not again.
    assert_eq!(audits_of(b, "acme", "allow_add", "198.19.72.1/32"), 1, "node-b's audit after the restore");
    assert_eq!(audits_of(b, "acme", "allow_add", "198.19.70.1/32"), 1, "node-b's audit from before the backup");
    assert_eq!(audits_of(b, "acme", "allow_add", "198.19.71.5/32"), 1, "node-b's audit from after the backup");

    // A node that cannot apply a change is waited for.
    b.host.daemon.as_ref().unwrap().signal(libc::SIGSTOP);
    let socket = fleet.nodes[0].host.socket();
    let out = std::process::Command::new(&ipaccess_tests::daemon::binaries().ctl)
        .args(["--socket", socket.to_str().unwrap(), "--wait-fleet=2", "allow", "add", "acme", "198.19.72.2"])
        .output()
        .unwrap();
    b.host.daemon.as_ref().unwrap().signal(libc::SIGCONT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "--wait-fleet did not wait for the stopped node-b: {stderr}");
    assert!(stderr.contains("node-b has not applied"), "{stderr}");
}

/// A change sent while a node reconnects to an etcd restored from a backup waits until the
/// node has taken the backup's policy, and is checked against it. Checked against the
/// node's newer copy instead, its guards (at the copy's revision, above every revision the
/// backup has) would all hold, and the copy's version of the account, with what the restore
/// took away, would be written over the backup's.
#[test]
fn a_change_sent_while_a_node_reconnects_to_a_restored_etcd_is_checked_against_it() {
    let mut fleet = Fleet::with_members(1, 1).unwrap();
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.19.73.1/32"}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    fleet.settle();
    let backup = fleet.etcd.dir().join("backup.db");
    fleet.etcd.save_backup(0, &backup).unwrap();
    // History the backup does not hold: its entry replaced by another, and 40 changes more
    // (so that the node's revision stays well above etcd's once restored).
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.19.73.2/32"}));
    a.host.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": "198.19.73.1/32"}));
    for n in 1..=20 {
        let cidr = format!("198.19.74.{n}/32");
        a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr}));
        a.host.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": cidr}));
    }
    let counted = a.applied();

    // etcd goes down; one change is sent again and again until acknowledged, while etcd is
    // restored from the backup and comes back.
    fleet.etcd.stop(0).unwrap();
    let (node, etcd) = (&fleet.nodes[0], &mut fleet.etcd);
    let (replies, restored) = thread::scope(|s| {
        let sender = s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut replies = Vec::new();
            while Instant::now() < deadline {
                let reply = node.host.request(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.19.73.3/32"}));
                let done = error_code(&reply).is_none();
                replies.push(reply);
                if done {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            replies
        });
        etcd.restore_backup(&backup).unwrap();
        let restored = etcd.revision().unwrap();
        (sender.join().unwrap(), restored)
    });
    assert!(restored + 30 < counted, "the backup's revision {restored} is not well below {counted}");
    eprintln!("{} tries; the last: {}", replies.len(), replies.last().map(Value::to_string).unwrap_or_default());
    let last = replies.last().expect("a change was sent");
    assert!(error_code(last).is_none(), "the change was never acknowledged: {last}");
    for reply in &replies[..replies.len() - 1] {
        assert_eq!(error_code(reply).as_deref(), Some("cluster_unavailable"), "{reply}");
    }

    // The node follows the restored etcd, and the account is the backup's with the change.
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.applied() >= counted {
        assert!(Instant::now() < deadline, "node-a does not follow the restored etcd: {}", node.cluster_status());
        thread::sleep(Duration::from_millis(100));
    }
    let want: BTreeSet<String> = ["198.19.73.1/32", "198.19.73.3/32"].map(String::from).into();
    assert_eq!(
        allow_set(node, "acme"),
        Some(want),
        "the change was checked against the node's copy from before the restore ({} tries)",
        replies.len()
    );
    assert!(node.check("acme", "198.19.73.1".parse().unwrap()).0, "the backup's entry is not enforced");
    assert!(!node.check("acme", "198.19.73.2".parse().unwrap()).0, "an entry the restore took away is enforced");
}
