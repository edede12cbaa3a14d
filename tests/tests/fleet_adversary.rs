//! The fleet's shared sets in the paths between commands, on a real 3-member etcd cluster
//! with real ipaccessd nodes: a node that was away while the fleet, at the kernel's limit
//! of shared sets, deleted a referenced set (forced) and made another takes the new one like
//! every other node (the id the deleted set frees is the one the new set needs), and lets
//! nothing in through the deleted one.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use etcd_client::{Client as Etcd, GetOptions, Txn, TxnOp};
use ipaccess::cluster::Keys;
use ipaccess::store::SetDoc;
use ipaccess_common::MAX_SETS;
use ipaccess_tests::fleet::{Fleet, FleetNode, PREFIX, error_code};
use ipaccess_tests::netns::tcp_connect;
use serde_json::json;

const TCP_PORT: u16 = 7445;
/// etcd's default limit of operations in one transaction.
const PUTS_PER_TXN: usize = 128;

/// Writes `n` empty shared sets (`fill0`, `fill1`, ...) under the fleet's prefix, as nodes
/// would have written them, straight into etcd (a node takes them from its snapshot): far
/// quicker than `n` set changes through a node.
fn seed_sets(fleet: &Fleet, n: usize) {
    let endpoints = fleet.etcd.endpoints_local();
    let keys = Keys::new(PREFIX);
    let doc = serde_json::to_vec(&SetDoc { created_at: 1, created_by: 0, entries: Vec::new() }).unwrap();
    fleet.etcd.netns().run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut etcd = Etcd::connect(&endpoints, None).await.expect("connect to etcd");
            let names: Vec<String> = (0..n).map(|i| format!("fill{i}")).collect();
            for chunk in names.chunks(PUTS_PER_TXN) {
                let ops: Vec<TxnOp> = chunk.iter().map(|name| TxnOp::put(keys.set(name), doc.clone(), None)).collect();
                let answer = etcd.txn(Txn::new().and_then(ops)).await.expect("a seeding transaction");
                assert!(answer.succeeded());
            }
        })
    });
}

/// Whether `src` gets a TCP handshake through to acme's port on `node`, on the wire; it must
/// agree with the node's sign-in check.
fn reaches(node: &FleetNode, src: Ipv4Addr) -> bool {
    let checked = node.check("acme", src.into()).0;
    let target = SocketAddr::new(node.host.hosts.server_v4.into(), TCP_PORT);
    let timeout = if checked { Duration::from_secs(2) } else { Duration::from_millis(500) };
    let wire = node.host.hosts.client.run(|| tcp_connect(src.into(), target, timeout));
    assert_eq!(wire, checked, "{}: {src}: the wire and the checks disagree", node.name);
    wire
}

/// Every kernel set id is taken (MAX_SETS - 1 sets). Node B is away while, through node A,
/// a set an enforcing account references is deleted (forced) and a new one made and
/// referenced by the same account. Node B
/// catches up in one batch holding both changes; it must take the new set (with the id the
/// deleted one frees) and enforce it like node A, not count it as a set its kernel cannot
/// hold and leave the account without it until the set changes again.
#[test]
fn a_node_that_was_away_takes_a_set_made_at_the_limit_in_place_of_a_deleted_one() {
    let mut fleet = Fleet::new(2).unwrap();
    let full = MAX_SETS as usize - 1;
    seed_sets(&fleet, full);
    fleet.start_all();
    fleet.settle();
    let _listeners = fleet.listeners(TCP_PORT);
    let hosts = &fleet.nodes[0].host.hosts;
    let (good, guest, old, server) = (hosts.client_v4[0], hosts.client_v4[1], hosts.client_v4[2], hosts.server_v4);
    let a = &fleet.nodes[0];
    assert_eq!(a.host.ok(json!({"cmd": "set_list"})).as_array().unwrap().len(), full);
    // At the limit, a new set is refused through any node, and nothing is written.
    let refused = a.host.request(json!({"cmd": "set_add", "set": "one-too-many", "cidrs": ["198.18.99.0/24"]}));
    assert_eq!(error_code(&refused).as_deref(), Some("tables_full"), "{refused}");
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": TCP_PORT}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good.to_string()}));
    // acme also lets `old` in through the set that will be deleted (its kernel id is the one
    // the new set takes).
    a.host.ok(json!({"cmd": "set_add", "set": "fill0", "cidrs": [format!("{old}/32")]}));
    a.host.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "fill0"}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(reaches(node, good) && reaches(node, old) && !reaches(node, guest), "{}: before", node.name);
    }

    fleet.nodes[1].stop();
    let a = &fleet.nodes[0];
    let deleted = a.host.ok(json!({"cmd": "set_delete", "set": "fill0", "force": true}));
    assert_eq!(deleted["references_removed"], json!(["acme"]), "{deleted}");
    a.host.ok(json!({"cmd": "set_add", "set": "partners", "cidrs": [format!("{guest}/32")]}));
    a.host.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": "partners"}));
    let revision = a.applied();
    assert!(reaches(a, guest) && !reaches(a, old), "node A does not enforce the sets as changed");

    fleet.nodes[1].start();
    fleet.converge(revision);
    let (a, b) = (&fleet.nodes[0], &fleet.nodes[1]);
    let shown = b.host.request(json!({"cmd": "set_show", "set": "partners"}));
    assert_eq!(error_code(&shown), None, "node B lacks the set the fleet made: {shown}");
    assert_eq!(b.host.ok(json!({"cmd": "set_list"})), a.host.ok(json!({"cmd": "set_list"})));
    let listed = b.host.ok(json!({"cmd": "allow_list", "account": "acme"}));
    assert!(listed.to_string().contains("set:partners"), "node B lost acme's reference: {listed}");
    assert!(reaches(b, guest), "node B does not let the set's network in");
    assert!(reaches(b, good), "node B shut acme's own entry out");
    assert!(!reaches(b, old), "node B still lets the deleted set's network in");
    assert!(!listed.to_string().contains("set:fill0"), "node B kept the deleted set's reference: {listed}");
    let failures = b.cluster_status()["apply_failures"].as_u64().unwrap();
    assert_eq!(failures, 0, "node B counted a change it could not enforce since it started");
}

/// A forced delete of a set that 130 accounts reference rewrites 130 documents besides the
/// set's: more than one etcd transaction takes, so it is written in parts. At no revision in
/// between may etcd hold the set gone while documents still name it (the nodes apply every
/// revision; and a set made again under that name would let those accounts in on the nodes
/// that read their documents anew). etcd's history is read revision by revision.
#[test]
fn a_forced_delete_of_a_widely_referenced_set_never_leaves_references_to_a_missing_set() {
    const ACCOUNTS: usize = 130;
    let mut fleet = Fleet::new(2).unwrap();
    fleet.start_all();
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "set_add", "set": "wide", "cidrs": ["198.18.50.0/24"]}));
    let mut lines = Vec::new();
    for i in 0..ACCOUNTS {
        lines.push(format!("{}\n", json!({"cmd": "account_add", "account": format!("t{i}")})));
        lines.push(format!("{}\n", json!({"cmd": "allow_add_set", "account": format!("t{i}"), "set": "wide"})));
    }
    let ok = ipaccess_tests::client::Conn::open(&a.host.socket()).pipelined(&lines);
    assert_eq!(ok, lines.len(), "some accounts or references were refused");
    let deleted = a.host.ok(json!({"cmd": "set_delete", "set": "wide", "force": true}));
    assert_eq!(deleted["references_removed"].as_array().unwrap().len(), ACCOUNTS, "{deleted}");
    fleet.settle();

    let endpoints = fleet.etcd.endpoints_local();
    let keys = Keys::new(PREFIX);
    let torn: Vec<(i64, usize)> = fleet.etcd.netns().run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut etcd = Etcd::connect(&endpoints, None).await.expect("connect to etcd");
            let (start, end) = keys.accounts_range();
            // The revisions the delete wrote the documents at (every one of them it rewrote).
            let now = etcd.get(start.clone(), Some(GetOptions::new().with_range(end.clone()))).await.unwrap();
            assert_eq!(now.kvs().len(), ACCOUNTS);
            let written: Vec<i64> = now.kvs().iter().map(|kv| kv.mod_revision()).collect();
            let (first, last) = (*written.iter().min().unwrap(), *written.iter().max().unwrap());
            let mut torn = Vec::new();
            for revision in first..=last {
                let at = GetOptions::new().with_revision(revision);
                let set = etcd.get(keys.set("wide"), Some(at)).await.unwrap();
                let docs =
                    etcd.get(start.clone(), Some(GetOptions::new().with_range(end.clone()).with_revision(revision)));
                let naming =
                    docs.await.unwrap().kvs().iter().filter(|kv| kv.value_str().unwrap().contains("\"wide\"")).count();
                if set.kvs().is_empty() && naming > 0 {
                    torn.push((revision, naming));
                }
            }
            torn
        })
    });
    assert_eq!(torn, [], "(revision, documents naming the set) while etcd no longer held the set");
    for node in &fleet.nodes {
        assert_eq!(node.host.ok(json!({"cmd": "set_list"})), json!([]), "{}", node.name);
        let listed = node.host.ok(json!({"cmd": "allow_list", "account": "t129"}));
        assert!(!listed.to_string().contains("set:wide"), "{}: {listed}", node.name);
    }
}

/// etcd holds one shared set more than a node's kernel has ids for (written by hand, or by
/// two nodes adding the last sets at once): each node names the set it could not take in
/// `status` and has no such set. Once a set is deleted, freeing an id, every node takes the
/// missing set from etcd on its own (a resync it asks for), and an account can use it.
#[test]
fn a_set_no_kernel_id_was_free_for_is_taken_once_one_is() {
    let mut fleet = Fleet::new(2).unwrap();
    seed_sets(&fleet, MAX_SETS as usize);
    fleet.start_all();
    fleet.settle();
    let _listeners = fleet.listeners(TCP_PORT);
    let hosts = &fleet.nodes[0].host.hosts;
    let (good, guest, server) = (hosts.client_v4[0], hosts.client_v4[1], hosts.server_v4);
    let mut missing = Vec::new();
    for node in &fleet.nodes {
        let unenforced = node.cluster_status()["unenforced"].clone();
        let names = unenforced.as_array().expect("unenforced is a list");
        assert_eq!(names.len(), 1, "{}: one set more than the kernel's ids: {unenforced}", node.name);
        let name = names[0].as_str().unwrap().strip_prefix("set:").expect("a set").to_owned();
        let shown = node.host.request(json!({"cmd": "set_show", "set": name}));
        assert_eq!(error_code(&shown).as_deref(), Some("unknown_set"), "{}: {shown}", node.name);
        missing.push(name);
    }
    let a = &fleet.nodes[0];
    a.host.ok(json!({"cmd": "account_add", "account": "acme"}));
    a.host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    a.host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": TCP_PORT}));
    a.host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good.to_string()}));
    // A set every node has goes, freeing an id on each.
    let gone = (0..MAX_SETS).map(|i| format!("fill{i}")).find(|n| !missing.contains(n)).unwrap();
    a.host.ok(json!({"cmd": "set_delete", "set": gone}));
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    for (node, name) in fleet.nodes.iter().zip(&missing) {
        loop {
            let shown = node.host.request(json!({"cmd": "set_show", "set": name}));
            let unenforced = node.cluster_status()["unenforced"].clone();
            if error_code(&shown).is_none() && unenforced == json!([]) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{}: never took the set {name} once an id was free: {shown} {unenforced}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Usable on every node: acme lets the guest in through it once it holds the guest.
    let name = &missing[0];
    a.host.ok(json!({"cmd": "set_add", "set": name, "cidrs": [format!("{guest}/32")]}));
    a.host.ok(json!({"cmd": "allow_add_set", "account": "acme", "set": name}));
    fleet.settle();
    for node in &fleet.nodes {
        assert!(reaches(node, guest), "{}: the set taken late does not let its network in", node.name);
        assert!(reaches(node, good), "{}: acme's own entry", node.name);
    }
}
