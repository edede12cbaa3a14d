//! End to end, an allowlist entry's life: added for a while (it ends on the wire and at
//! sign-in by itself, and its end is audited), disabled and enabled several at a time (all or
//! nothing, the lockout guard judging the whole), a replacement tried first with `--dry-run`,
//! and the whole-Internet entries refused in every spelling. The real daemon over its real
//! socket, the real `ipaccessctl`, the real kernel.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use ipaccess_tests::client::Client;
use ipaccess_tests::daemon::World;
use ipaccess_tests::netns::{TestHosts, UdpEchoServer, icmp_echo, udp_roundtrip};
use serde_json::{Value, json};

const OK: Duration = Duration::from_secs(2);
const FAIL: Duration = Duration::from_millis(500);
const PORT: u16 = 7200;

/// `ipaccessctl --json ARGS`, which must succeed; its result.
fn ctl_ok(w: &World, args: &[&str]) -> Value {
    let out = w.ctl(&[&["--json"], args].concat());
    assert_eq!(out.code, 0, "ipaccessctl {args:?}: {}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("ipaccessctl {args:?}: {e}: {}", out.stdout))
}

/// A UDP datagram from `src` reaches the account's port and comes back.
fn udp_ok(hosts: &TestHosts, src: Ipv4Addr, timeout: Duration) -> bool {
    let dst = SocketAddr::new(hosts.server_v4.into(), PORT);
    hosts.client.run(move || udp_roundtrip(src.into(), dst, b"lifecycle", timeout))
}

/// Account `cust` owning UDP `PORT` on the server, enforcing with `good` allowed; the echo
/// server (keep it alive).
fn enforcing_customer(w: &World, good: Ipv4Addr) -> UdpEchoServer {
    let server = UdpEchoServer::start_in(&w.hosts.server, SocketAddr::new(w.hosts.server_v4.into(), PORT)).unwrap();
    w.ok(json!({"cmd": "account_add", "account": "cust"}));
    w.ok(json!({"cmd": "bind_add", "account": "cust", "addr": w.hosts.server_v4.to_string(), "port": PORT,
                "proto": "udp"}));
    w.ok(json!({"cmd": "allow_add", "account": "cust", "cidr": format!("{good}/32")}));
    w.ok(json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "client_ip": good.to_string()}));
    let dst = IpAddr::from(w.hosts.server_v4);
    for &src in &w.hosts.client_v4 {
        assert!(w.hosts.client.run(move || icmp_echo(src.into(), dst, OK)), "ping {src} -> {dst}");
    }
    server
}

fn check(w: &World, account: &str, addr: impl Into<IpAddr>) -> (bool, String) {
    let c = w.ok(json!({"cmd": "check", "account": account, "addr": addr.into(), "dry_run": true}));
    (c["allowed"].as_bool().unwrap(), c["reason"].as_str().unwrap().to_string())
}

fn enabled(w: &World, account: &str) -> Vec<(String, bool)> {
    let list = w.ok(json!({"cmd": "allow_list", "account": account}));
    list.as_array().unwrap().iter().map(|e| (e["cidr"].as_str().unwrap().into(), e["enabled"] == true)).collect()
}

/// The account's audit records (the action is the `reason`).
fn audits(w: &World, account: &str) -> Vec<Value> {
    let records = w.ok(json!({"cmd": "activity", "account": account, "kind": "audit", "limit": 1000}));
    records.as_array().unwrap().clone()
}

/// An entry added for two seconds lets a datagram through on the wire and at sign-in, then
/// stops by itself, with no command; the sweep audits its end; `allow list` shows it expired,
/// and adding it again renews it.
#[test]
fn an_entry_added_for_two_seconds_ends_on_the_wire_by_itself() {
    let w = World::new("");
    let (good, temp) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let _server = enforcing_customer(&w, good);
    assert!(!udp_ok(&w.hosts, temp, FAIL), "{temp} got through before it was added");

    let added_at = Instant::now();
    let entry = ctl_ok(&w, &["allow", "add", "cust", &temp.to_string(), "--expires-in", "2s", "--label", "visitor"]);
    let expires_at = entry["expires_at"].as_i64().unwrap_or_else(|| panic!("no expiry: {entry}"));
    assert_eq!(expires_at - entry["created_at"].as_i64().unwrap(), 2, "{entry}");
    // Stored in whole seconds, the entry lives 1 to 2 s: the checks come within the first.
    assert_eq!(check(&w, "cust", temp), (true, "allowed".into()));
    assert!(udp_ok(&w.hosts, temp, Duration::from_millis(900)), "the expiring entry does not reach the kernel");
    assert!(
        added_at.elapsed() < Duration::from_millis(950),
        "too slow to test before expiry: {:?}",
        added_at.elapsed()
    );
    let listed = w.ctl(&["allow", "list", "cust"]);
    assert!(listed.stdout.contains("EXPIRES") && listed.stdout.contains("visitor"), "{}", listed.stdout);

    thread::sleep(Duration::from_millis(2300).saturating_sub(added_at.elapsed()));
    assert!(!udp_ok(&w.hosts, temp, FAIL), "the entry for {temp} outlived its expiry on the wire");
    assert!(udp_ok(&w.hosts, good, OK), "the permanent entry ended with the expiring one");
    assert_eq!(check(&w, "cust", temp), (false, "address_not_allowed".into()));
    let listed = w.ctl(&["allow", "list", "cust"]);
    assert!(listed.stdout.contains("(expired)"), "{}", listed.stdout);

    // The sweep (every 10 s) audits the end once.
    let deadline = Instant::now() + Duration::from_secs(25);
    let expired = loop {
        let found: Vec<Value> = audits(&w, "cust").into_iter().filter(|r| r["reason"] == "entry_expired").collect();
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0]["detail"]["cidr"], format!("{temp}/32"), "{expired:?}");

    // Added again: renewed, in force again; a bad duration is refused by the daemon.
    let renewed = ctl_ok(&w, &["allow", "add", "cust", &temp.to_string(), "--expires-in", "1h"]);
    assert!(renewed["expires_at"].as_i64().unwrap() > expires_at + 3000, "{renewed}");
    assert!(udp_ok(&w.hosts, temp, OK), "the renewed entry does not reach the kernel");
    let (code, message) = w.err(json!({"cmd": "allow_add", "account": "cust", "cidr": "198.18.50.0/24",
                                       "ttl_seconds": 400 * 24 * 3600}));
    assert_eq!(code, "bad_request", "{message}");
    assert_eq!(enabled(&w, "cust").len(), 2, "a refused add was stored");
}

/// `allow expire` moves an entry's end or takes it away, on the wire and at sign-in: an entry
/// added for two seconds and given an hour outlives its first end; a permanent one given two
/// seconds stops by itself; `--never` takes the end away; each change is audited with the end
/// it replaced, and a bad duration or an unknown entry is refused.
#[test]
fn an_entrys_end_can_be_moved_or_taken_away() {
    let w = World::new("");
    let (good, temp) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let _server = enforcing_customer(&w, good);
    let started = Instant::now();
    ctl_ok(&w, &["allow", "add", "cust", &temp.to_string(), "--expires-in", "2s"]);
    let moved = ctl_ok(&w, &["allow", "expire", "cust", &temp.to_string(), "--in", "1h"]);
    let ends = moved["expires_at"].as_i64().unwrap_or_else(|| panic!("no end: {moved}"));
    assert!((3590..=3610).contains(&(ends - moved["created_at"].as_i64().unwrap())), "{moved}");
    let ended = ctl_ok(&w, &["allow", "expire", "cust", &good.to_string(), "--in", "2s"]);
    assert!(ended["expires_at"].is_i64(), "{ended}");
    thread::sleep(Duration::from_millis(2600).saturating_sub(started.elapsed()));
    assert!(udp_ok(&w.hosts, temp, OK), "{temp} ended at its first end though it was given an hour");
    assert_eq!(check(&w, "cust", temp), (true, "allowed".into()));
    // The permanent entry was given its two seconds just after `started`: a moment more and
    // it has ended.
    thread::sleep(Duration::from_millis(500));
    assert!(!udp_ok(&w.hosts, good, FAIL), "{good} outlived the end it was given");
    assert_eq!(check(&w, "cust", good), (false, "address_not_allowed".into()));

    let kept = ctl_ok(&w, &["allow", "expire", "cust", &temp.to_string(), "--never"]);
    assert!(kept.get("expires_at").is_none_or(Value::is_null), "{kept}");
    // An ended entry given a new end is in force again, as one added again.
    ctl_ok(&w, &["allow", "expire", "cust", &good.to_string(), "--in", "1h"]);
    assert!(udp_ok(&w.hosts, good, OK), "{good} not renewed");
    let listed = w.ok(json!({"cmd": "allow_list", "account": "cust"}));
    let end_of =
        |cidr: String| listed.as_array().unwrap().iter().find(|e| e["cidr"] == cidr).unwrap()["expires_at"].clone();
    assert!(end_of(format!("{temp}/32")).is_null() && end_of(format!("{good}/32")).is_i64(), "{listed}");

    let (code, message) = w.err(json!({"cmd": "allow_expiry", "account": "cust", "cidr": "198.18.99.0/24",
                                       "ttl_seconds": 60}));
    assert_eq!(code, "unknown_entry", "{message}");
    let (code, message) = w.err(json!({"cmd": "allow_expiry", "account": "cust", "cidr": format!("{temp}/32"),
                                       "ttl_seconds": 0}));
    assert_eq!(code, "bad_request", "{message}");
    let records: Vec<Value> = audits(&w, "cust").into_iter().filter(|r| r["reason"] == "allow_expiry").collect();
    assert_eq!(records.len(), 4, "{records:?}");
    let taken_away = records.iter().find(|r| r["detail"]["expires_at"].is_null()).expect("the --never change");
    assert_eq!(taken_away["detail"]["was"], json!(ends), "{taken_away}");
}

/// An entry that has ended is swept from the kernel once: not again after a restart, nor
/// after a change to its account (it stays listed, and lets nobody in).
#[test]
fn an_ended_entry_is_swept_once() {
    const SWEPT: &str = "expired overrides and entries swept";
    // The daemon's log, across its restart (one file, appended to).
    let log = |w: &World| w.daemon.as_ref().unwrap().log_text();
    let mut w = World::new("");
    let (good, temp) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let _server = enforcing_customer(&w, good);
    ctl_ok(&w, &["allow", "add", "cust", &temp.to_string(), "--expires-in", "1s"]);
    // The sweep runs every ten seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !log(&w).contains(SWEPT) {
        assert!(Instant::now() < deadline, "the ended entry was not swept:\n{}", log(&w));
        thread::sleep(Duration::from_millis(200));
    }
    w.stop();
    w.start("");
    // The first sweep runs at start; a change reads the account back from the store; the
    // next sweep comes ten seconds later.
    ctl_ok(&w, &["allow", "add", "cust", "198.18.99.0/24"]);
    thread::sleep(Duration::from_millis(10_500));
    assert_eq!(log(&w).matches(SWEPT).count(), 1, "swept again:\n{}", log(&w));
    assert_eq!(check(&w, "cust", temp), (false, "address_not_allowed".into()));
    assert!(!udp_ok(&w.hosts, temp, FAIL), "the ended entry lets {temp} in after the restart");
    let listed = w.ok(json!({"cmd": "allow_list", "account": "cust"}));
    assert!(listed.to_string().contains(&format!("{temp}/32")), "the ended entry is no longer listed: {listed}");
}

/// An end brought nearer is weighed as the entry's removal: `allow expire --in 1s` on the
/// entry a customer signs in through is refused (naming the address the admin uses, then
/// the recent sign-in), in the store and the kernel alike; forced, the entry ends on the
/// wire by itself. A later end for an expiring entry, or a new end for one that has ended,
/// takes nothing away and is not weighed.
#[test]
fn an_end_brought_nearer_is_weighed_as_a_removal() {
    let w = World::new("");
    let (good, b) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let _server = enforcing_customer(&w, good);
    let bs = format!("{b}/32");
    ctl_ok(&w, &["allow", "add", "cust", &bs, "--expires-in", "1h"]);
    w.check("cust", b, "password");
    let end_of = |w: &World| {
        let listed = w.ok(json!({"cmd": "allow_list", "account": "cust"}));
        listed.as_array().unwrap().iter().find(|e| e["cidr"] == bs).unwrap()["expires_at"].clone()
    };
    let ends = end_of(&w);

    let own = w.ctl(&["allow", "expire", "cust", &bs, "--in", "1s", "--client-ip", &b.to_string()]);
    assert_ne!(own.code, 0, "{}{}", own.stdout, own.stderr);
    assert!(own.stderr.contains("the address you are using"), "{}", own.stderr);
    let (code, message) = w.err(json!({"cmd": "allow_expiry", "account": "cust", "cidr": bs, "ttl_seconds": 1}));
    assert_eq!(code, "lockout", "{message}");
    assert!(message.contains(&b.to_string()), "the refusal does not name the recent sign-in: {message}");
    // The entry that had no end, given one: the same.
    w.check("cust", good, "password");
    let (code, _) = w.err(json!({"cmd": "allow_expiry", "account": "cust", "cidr": format!("{good}/32"),
                                 "ttl_seconds": 1}));
    assert_eq!(code, "lockout");
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(end_of(&w), ends, "a refused end was stored");
    assert!(udp_ok(&w.hosts, b, OK) && udp_ok(&w.hosts, good, OK), "a refused end reached the kernel");

    // A later end is not weighed.
    let later = ctl_ok(&w, &["allow", "expire", "cust", &bs, "--in", "2h"]);
    assert!(later["expires_at"].as_i64() > ends.as_i64(), "{later}");
    // Forced, the nearer end is kept and the entry ends by itself; given a new end once it
    // has ended, it is back without the guard.
    let forced = ctl_ok(&w, &["allow", "expire", "cust", &bs, "--in", "1s", "--force"]);
    assert!(forced["expires_at"].as_i64() < later["expires_at"].as_i64(), "{forced}");
    thread::sleep(Duration::from_millis(2100));
    assert!(!udp_ok(&w.hosts, b, FAIL), "{b} outlived the end it was forced to");
    assert_eq!(check(&w, "cust", b), (false, "address_not_allowed".into()));
    ctl_ok(&w, &["allow", "expire", "cust", &bs, "--in", "1h"]);
    assert!(udp_ok(&w.hosts, b, OK), "{b} not renewed");
    let forced_audit = audits(&w, "cust").into_iter().filter(|r| r["reason"] == "allow_expiry").count();
    assert_eq!(forced_audit, 3, "the refused ends were audited, or the kept ones not");
}

/// `allow disable ACCOUNT CIDR...` is one request: refused as a whole when the result would
/// shut out a recent sign-in (nothing disabled, in the store or the kernel), applied as a
/// whole with --force; `allow enable` takes several too; an unknown entry among them
/// changes nothing.
#[test]
fn bulk_disable_is_all_or_nothing() {
    let w = World::new("");
    let (good, b, c) = (w.hosts.client_v4[0], w.hosts.client_v4[1], w.hosts.client_v4[2]);
    let _server = enforcing_customer(&w, good);
    w.ok(json!({"cmd": "allow_add", "account": "cust", "cidr": format!("{b}/32")}));
    w.ok(json!({"cmd": "allow_add", "account": "cust", "cidr": format!("{c}/32")}));
    // b signs in: the guard protects it.
    w.check("cust", b, "password");
    let all_on = enabled(&w, "cust");
    assert!(all_on.iter().all(|(_, on)| *on) && all_on.len() == 3, "{all_on:?}");

    let (bs, cs) = (format!("{b}/32"), format!("{c}/32"));
    let refused = w.ctl(&["allow", "disable", "cust", &cs, &bs]);
    assert_ne!(refused.code, 0, "{}", refused.stdout);
    assert!(refused.stderr.contains("lockout") && refused.stderr.contains(&b.to_string()), "{}", refused.stderr);
    assert_eq!(enabled(&w, "cust"), all_on, "a refused bulk disable changed entries");
    assert!(udp_ok(&w.hosts, c, OK) && udp_ok(&w.hosts, b, OK), "a refused bulk disable reached the kernel");

    let (code, _) = w.err(json!({"cmd": "allow_disable", "account": "cust", "cidr": cs,
                                 "also": ["198.18.99.0/24"], "force": true}));
    assert_eq!(code, "unknown_entry");
    assert_eq!(enabled(&w, "cust"), all_on, "a bulk disable naming an unknown entry changed entries");

    let forced = ctl_ok(&w, &["allow", "disable", "cust", &cs, &bs, "--force"]);
    assert_eq!(forced["enabled"], false, "{forced}");
    let now_on: Vec<bool> = enabled(&w, "cust").into_iter().map(|(_, on)| on).collect();
    assert_eq!(now_on.iter().filter(|on| !**on).count(), 2, "{now_on:?}");
    assert!(!udp_ok(&w.hosts, b, FAIL) && !udp_ok(&w.hosts, c, FAIL), "the bulk disable did not reach the kernel");
    assert_eq!(check(&w, "cust", b), (false, "address_not_allowed".into()));

    ctl_ok(&w, &["allow", "enable", "cust", &bs, &cs]);
    assert_eq!(enabled(&w, "cust"), all_on);
    assert!(udp_ok(&w.hosts, b, OK) && udp_ok(&w.hosts, c, OK), "the bulk enable did not reach the kernel");
    let actions: Vec<String> = audits(&w, "cust").iter().map(|r| r["reason"].as_str().unwrap().to_string()).collect();
    assert_eq!(actions.iter().filter(|a| *a == "allow_disable").count(), 2, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| *a == "allow_enable").count(), 2, "{actions:?}");
}

/// `allow replace --dry-run` changes nothing and says what the replacement would add,
/// remove and keep, and the recent sign-in it would shut out; readable and as JSON.
#[test]
fn replace_dry_run_changes_nothing_and_names_the_shut_out() {
    let w = World::new("");
    let (good, b) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let _server = enforcing_customer(&w, good);
    w.ok(json!({"cmd": "allow_add", "account": "cust", "cidr": format!("{b}/32"), "label": "home"}));
    w.check("cust", b, "password");
    let before = w.ok(json!({"cmd": "allow_list", "account": "cust"}));
    let file = w.dir.0.join("new-list");
    fs::write(&file, format!("{good}/32 office\n198.18.60.0/24 branch\n")).unwrap();
    let path = file.to_str().unwrap();

    let plan = ctl_ok(&w, &["allow", "replace", "cust", "--file", path, "--dry-run"]);
    let dry = &plan["dry_run"];
    assert_eq!(dry["added"], json!(["198.18.60.0/24"]), "{plan}");
    assert_eq!(dry["removed"], json!([format!("{b}/32")]), "{plan}");
    assert_eq!(dry["unchanged"], json!([format!("{good}/32")]), "{plan}");
    let shut_out: Vec<&str> =
        dry["shut_out"].as_array().unwrap().iter().map(|s| s["address"].as_str().unwrap()).collect();
    assert_eq!(shut_out, [b.to_string()], "{plan}");
    assert_eq!(plan["entries"], before, "{plan}");
    // It says what the real request would get: the lockout, with the sign-in in its details.
    assert_eq!(dry["refused"]["code"], "lockout", "{plan}");
    assert_eq!(dry["refused"]["details"]["shut_out"][0]["address"], b.to_string(), "{plan}");
    // With --force it would be applied.
    let forced = ctl_ok(&w, &["allow", "replace", "cust", "--file", path, "--dry-run", "--force"]);
    assert!(forced["dry_run"].get("refused").is_none(), "{forced}");
    // The guard's other refusals, which shut out no recent sign-in, are named too: the
    // caller's own address left out, and an enforcing account left allowing nobody.
    let dry_run = |entries: Value, extra: Value| {
        let mut request = json!({"cmd": "allow_replace", "account": "cust", "entries": entries, "dry_run": true});
        request.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        w.ok(request)["dry_run"].clone()
    };
    let keep_both = json!([{"cidr": format!("{good}/32")}, {"cidr": format!("{b}/32")}]);
    assert!(dry_run(keep_both.clone(), json!({})).get("refused").is_none(), "a harmless replacement is refused");
    let own = dry_run(keep_both, json!({"client_ip": "198.18.99.1"}));
    assert_eq!(own["shut_out"], json!([]), "{own}");
    assert!(own["refused"]["message"].as_str().unwrap().contains("198.18.99.1, the address you are using"), "{own}");
    let w_nothing = dry_run(json!([]), json!({}));
    assert!(w_nothing["refused"]["message"].as_str().unwrap().contains("no enabled entry"), "{w_nothing}");

    let shown = w.ctl(&["allow", "replace", "cust", "--file", path, "--dry-run"]);
    assert_eq!(shown.code, 0, "{}", shown.stderr);
    for part in [
        "nothing was changed",
        "added: 198.18.60.0/24",
        &format!("removed: {b}/32"),
        &b.to_string(),
        "for real: lockout: refused: cust would shut out 1 address",
    ] {
        assert!(shown.stdout.contains(part), "{part:?} missing:\n{}", shown.stdout);
    }

    assert_eq!(w.ok(json!({"cmd": "allow_list", "account": "cust"})), before, "the dry run changed the allowlist");
    assert!(udp_ok(&w.hosts, b, OK), "the dry run reached the kernel");
    assert!(!audits(&w, "cust").iter().any(|r| r["reason"] == "allow_replace"), "the dry run was audited");
    // For real, the guard refuses what the dry run named.
    let (code, message) = w.err(json!({"cmd": "allow_replace", "account": "cust",
        "entries": [{"cidr": format!("{good}/32")}, {"cidr": "198.18.60.0/24"}]}));
    assert!(code == "lockout" && message.contains(&b.to_string()), "{code}: {message}");
}

/// No entry may allow every address, however it is spelled, in `allow_add`,
/// `allow_replace` or `import`: `bad_request`, pointing to mode off, nothing stored.
#[test]
fn the_whole_internet_is_refused_in_every_spelling() {
    let w = World::new("");
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.0/24"}));
    let before = w.ok(json!({"cmd": "allow_list", "account": "acme"}));
    for spelling in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96", "::ffff:0:0/96", "::0/0"] {
        let requests = [
            json!({"cmd": "allow_add", "account": "acme", "cidr": spelling}),
            json!({"cmd": "allow_replace", "account": "acme", "entries": [{"cidr": "198.18.1.0/24"}, {"cidr": spelling}]}),
            json!({"cmd": "import", "accounts": [{"account": "acme", "entries": [{"cidr": spelling}]},
                                                 {"account": "newco", "entries": [{"cidr": "198.18.2.0/24"}]}]}),
        ];
        for request in requests {
            let (code, message) = w.err(request.clone());
            assert_eq!(code, "bad_request", "{request}: {message}");
            assert!(message.contains("mode") && message.contains("off"), "{request}: {message}");
        }
        let out = w.ctl(&["allow", "add", "acme", spelling]);
        assert_ne!(out.code, 0, "{spelling}");
        assert!(out.stderr.contains("off"), "{spelling}: {}", out.stderr);
    }
    assert_eq!(w.ok(json!({"cmd": "allow_list", "account": "acme"})), before);
    let (code, _) = w.err(json!({"cmd": "allow_list", "account": "newco"}));
    assert_eq!(code, "unknown_account", "a refused import created an account");
}

/// Entries an older version stored as given, before today's rules (an IPv4-mapped network,
/// host bits set): kept and enforced as stored (the store is not rewritten behind the
/// customer's back), named in a warning at start, and removable by the spelling they were
/// stored with, which today's parsing alone would not find.
#[test]
fn entries_stored_by_an_older_version_are_named_and_removable_as_stored() {
    let mut w = World::new("");
    let (good, b) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let _server = enforcing_customer(&w, good);
    w.stop();
    let octets = b.octets();
    let host_bits = format!("{}.{}.{}.77/24", octets[0], octets[1], octets[2]);
    let mapped = format!("::ffff:{}.{}.{}.0/120", octets[0], octets[1], octets[2]);
    let conn = rusqlite::Connection::open(w.dir.0.join("state/ipaccess.db")).unwrap();
    for cidr in [&host_bits, &mapped] {
        let sql = "INSERT INTO allow_entries (account, cidr, created_at, created_by) VALUES ('cust', ?1, 1, 0)";
        assert_eq!(conn.execute(sql, [cidr]).unwrap(), 1);
    }
    drop(conn);
    w.start("");
    let log = w.daemon.as_ref().unwrap().log_text();
    for (cidr, said) in [(&host_bits, "would be refused"), (&mapped, "lets nobody in")] {
        let warning = log.lines().find(|l| l.contains(&format!("entry {cidr} was stored by an older version")));
        let warning = warning.unwrap_or_else(|| panic!("no warning naming {cidr}:\n{log}"));
        assert!(warning.contains(said) && warning.contains("allow remove"), "{warning}");
    }
    // Enforced as stored: the host-bits entry lets its network in, in checks and on the wire.
    assert_eq!(check(&w, "cust", b), (true, "allowed".into()));
    assert!(udp_ok(&w.hosts, b, OK), "the stored /24 does not let {b} in on the wire");
    // Removed by the spelling each was stored with, through the real CLI.
    for cidr in [&host_bits, &mapped] {
        let out = w.ctl(&["allow", "remove", "cust", cidr, "--force"]);
        assert_eq!(out.code, 0, "{cidr}: {}", out.stderr);
    }
    assert_eq!(enabled(&w, "cust"), [(format!("{good}/32"), true)]);
    // Gone from the store too: a restart does not bring them back.
    w.stop();
    w.start("");
    assert_eq!(enabled(&w, "cust"), [(format!("{good}/32"), true)]);
    assert_eq!(check(&w, "cust", b), (false, "address_not_allowed".into()));
    assert!(!udp_ok(&w.hosts, b, FAIL), "the removed /24 still lets {b} in on the wire");
    // Today's spellings are still held to today's rules.
    let (code, message) = w.err(json!({"cmd": "allow_remove", "account": "cust", "cidr": "198.18.0.5/24"}));
    assert!(code == "bad_request" && message.contains("host bits"), "{code}: {message}");
}
