//! End to end, as an attacker and a careless admin would try it: the account model's rules
//! on the real daemon over its real socket, and on the wire where they reach the kernel.
//!
//! - sub-users are one level deep, and a ban or termination reaches every account below,
//!   also in a store written before that rule (at login, on the wire, for overrides);
//! - the lockout guard works without `client_ip`: nothing allowed, or a recent sign-in shut out;
//! - IPv4-mapped spellings are IPv4, host bits and leading zeros are refused, overrides are narrow;
//! - names, labels, tickets and reasons are validated;
//! - account removal, entry enable/disable and label edits, and the audit line of each change.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipaccess_tests::client::Client;
use ipaccess_tests::daemon::World;
use ipaccess_tests::netns::{TcpServer, TestHosts, icmp_echo, tcp_connect};
use serde_json::{Value, json};

const OK: Duration = Duration::from_secs(2);
const FAIL: Duration = Duration::from_millis(500);

fn tcp_ok(hosts: &TestHosts, src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> bool {
    hosts.client.run(move || tcp_connect(src.into(), dst, timeout))
}

/// Resolves the server's MAC from each source (ICMP is not filtered by a port binding).
fn warm_up(hosts: &TestHosts) {
    let dst = IpAddr::from(hosts.server_v4);
    for &src in &hosts.client_v4 {
        assert!(hosts.client.run(move || icmp_echo(src.into(), dst, OK)), "ping {src} -> {dst}");
    }
}

fn grant(account: &str, cidr: &str) -> Value {
    json!({"cmd": "override_grant", "account": account, "cidr": cidr, "ttl_seconds": 3600,
           "ticket": "SUP-7", "reason": "verified by phone"})
}

fn reason(w: &World, account: &str, addr: &str) -> String {
    let c = w.ok(json!({"cmd": "check", "account": account, "addr": addr, "dry_run": true}));
    c["reason"].as_str().unwrap().to_string()
}

fn effective_states(w: &World) -> Vec<(String, String)> {
    let list = w.ok(json!({"cmd": "account_list"}));
    list.as_array()
        .unwrap()
        .iter()
        .map(|a| (a["id"].as_str().unwrap().to_string(), a["effective_state"].as_str().unwrap().to_string()))
        .collect()
}

/// An account bound to a TCP port on the server, enforcing with `allowed` on its list.
fn guarded(w: &World, account: &str, parent: Option<&str>, port: u16, allowed: Ipv4Addr) -> (SocketAddr, TcpServer) {
    let dst = SocketAddr::new(w.hosts.server_v4.into(), port);
    let server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
    w.ok(json!({"cmd": "account_add", "account": account, "parent": parent}));
    w.ok(json!({"cmd": "bind_add", "account": account, "addr": dst.ip().to_string(), "port": port}));
    w.ok(json!({"cmd": "allow_add", "account": account, "cidr": allowed.to_string()}));
    w.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce"}));
    (dst, server)
}

/// A grandchild is refused; a store that already holds one (written before the rule) is
/// still enforced: a ban or a termination two levels up reaches it at login, on the wire and
/// for overrides, across a restart too.
#[test]
fn suspension_reaches_every_descendant() {
    let mut w = World::new("");
    warm_up(&w.hosts);
    let good = w.hosts.client_v4[0];
    let (top, _top_server) = guarded(&w, "bad", None, 7201, good);
    let (mid, _mid_server) = guarded(&w, "bad-sub", Some("bad"), 7202, good);
    let (code, message) = w.err(json!({"cmd": "account_add", "account": "bad-sub-sub", "parent": "bad-sub"}));
    assert_eq!(code, "refused", "{message}");
    assert!(message.contains("bad-sub") && message.contains("cannot have sub-users"), "{message}");
    assert!(w.err(json!({"cmd": "account_show", "account": "bad-sub-sub"})).0 == "unknown_account");

    // A store from before the rule: a third level, written straight into the database.
    w.stop();
    let db = w.dir.0.join("state/ipaccess.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "INSERT INTO accounts (id, slot, parent, state, mode, state_reason, created_at)
         VALUES ('bad-sub-sub', 900, 'bad-sub', 'active', 'off', NULL, 0)",
        [],
    )
    .unwrap();
    drop(conn);
    w.start("");
    let (leaf, _leaf_server) = {
        let dst = SocketAddr::new(w.hosts.server_v4.into(), 7203);
        let server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
        w.ok(json!({"cmd": "bind_add", "account": "bad-sub-sub", "addr": dst.ip().to_string(), "port": 7203}));
        w.ok(json!({"cmd": "allow_add", "account": "bad-sub-sub", "cidr": good.to_string()}));
        w.ok(json!({"cmd": "account_mode", "account": "bad-sub-sub", "mode": "enforce"}));
        (dst, server)
    };
    for dst in [top, mid, leaf] {
        assert!(tcp_ok(&w.hosts, good, dst, OK), "{dst} before the ban");
    }
    assert_eq!(reason(&w, "bad-sub-sub", &good.to_string()), "allowed");

    for (state, own, below) in
        [("banned", "banned", "parent_banned"), ("terminated", "terminated", "parent_terminated")]
    {
        w.ok(json!({"cmd": "account_state", "account": "bad", "state": state}));
        for restarted in [false, true] {
            if restarted {
                w.stop();
                w.start("");
            }
            assert_eq!(reason(&w, "bad", &good.to_string()), own);
            for sub in ["bad-sub", "bad-sub-sub"] {
                let c = w.ok(json!({"cmd": "check", "account": sub, "addr": good.to_string(), "dry_run": true}));
                assert_eq!((&c["allowed"], &c["reason"]), (&json!(false), &json!(below)), "{sub} after {state}: {c}");
                assert!(c["hint"].as_str().unwrap().contains("bad"), "{c}");
                if state == "terminated" {
                    assert!(c["hint"].as_str().unwrap().contains("billing"), "{c}");
                }
                let (code, message) = w.err(grant(sub, "198.18.0.12"));
                assert!(code == "refused" && message.contains("parent account bad"), "{sub}: {code} {message}");
            }
            for dst in [top, mid, leaf] {
                assert!(
                    !tcp_ok(&w.hosts, good, dst, FAIL),
                    "{dst} passes while bad is {state} (restarted: {restarted})"
                );
            }
            let states = effective_states(&w);
            assert!(states.contains(&("bad-sub-sub".into(), below.into())), "{states:?}");
            assert!(states.contains(&("bad-sub".into(), below.into())), "{states:?}");
        }
        w.ok(json!({"cmd": "account_state", "account": "bad", "state": "active"}));
        assert_eq!(reason(&w, "bad-sub-sub", &good.to_string()), "allowed");
        assert!(tcp_ok(&w.hosts, good, leaf, OK), "reactivating the parent reaches the grandchild");
    }
}

/// The guard needs no client address: enforcing with nothing allowed, or shutting out an
/// address that signed in successfully in the last week, is refused unless forced, and the
/// refusal names the addresses. A refused change changes nothing.
#[test]
fn lockout_guard_without_client_ip() {
    let w = World::new("");
    warm_up(&w.hosts);
    let [a, b, c, _] = w.hosts.client_v4[..] else { panic!("four client addresses") };
    let (a_s, b_s, c_s) = (a.to_string(), b.to_string(), c.to_string());
    let dst = SocketAddr::new(w.hosts.server_v4.into(), 7301);
    let _server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
    w.ok(json!({"cmd": "account_add", "account": "x"}));
    w.ok(json!({"cmd": "bind_add", "account": "x", "addr": dst.ip().to_string(), "port": 7301}));

    // Nothing allowed at all.
    let (code, message) = w.err(json!({"cmd": "account_mode", "account": "x", "mode": "enforce"}));
    assert!(code == "lockout" && message.contains("no enabled entry"), "{code}: {message}");
    assert_eq!(w.ok(json!({"cmd": "account_show", "account": "x"}))["account"]["mode"], "off");
    assert!(tcp_ok(&w.hosts, c, dst, OK), "a refused mode change reached the kernel");
    w.ok(json!({"cmd": "allow_add", "account": "x", "cidr": a_s}));
    w.ok(json!({"cmd": "account_mode", "account": "x", "mode": "enforce"}));
    for refused in [
        json!({"cmd": "allow_remove", "account": "x", "cidr": a_s}),
        json!({"cmd": "allow_disable", "account": "x", "cidr": a_s}),
        json!({"cmd": "allow_replace", "account": "x", "entries": []}),
    ] {
        let (code, message) = w.err(refused.clone());
        assert!(code == "lockout" && message.contains("--force"), "{refused}: {code}: {message}");
    }
    let list = w.ok(json!({"cmd": "allow_list", "account": "x"}));
    assert_eq!((list[0]["cidr"].as_str(), &list[0]["enabled"]), (Some(format!("{a}/32").as_str()), &json!(true)));
    assert!(tcp_ok(&w.hosts, a, dst, OK) && !tcp_ok(&w.hosts, b, dst, FAIL));

    // Monitor mode: b signs in (would be denied, is allowed); a dry run from c records nothing.
    w.ok(json!({"cmd": "account_mode", "account": "x", "mode": "monitor"}));
    assert_eq!(w.check("x", b, "password")["reason"], "monitor_would_deny");
    assert_eq!(reason(&w, "x", &c_s), "monitor_would_deny");
    let (code, message) = w.err(json!({"cmd": "account_mode", "account": "x", "mode": "enforce"}));
    assert!(code == "lockout" && message.contains(&format!("{b} (last ")) && !message.contains(&c_s), "{message}");
    let reply = w.conn().request(json!({"cmd": "account_mode", "account": "x", "mode": "enforce"}));
    let shut_out = reply["error"]["details"]["shut_out"].as_array().unwrap().clone();
    assert_eq!(shut_out.len(), 1, "{reply}");
    assert_eq!(shut_out[0]["address"], b_s);
    assert!(shut_out[0]["last_seen"].as_i64().unwrap() > 0);
    assert_eq!(w.ok(json!({"cmd": "account_show", "account": "x"}))["account"]["mode"], "monitor");

    // Adding b lets the change through; removing or replacing it away is refused again.
    w.ok(json!({"cmd": "allow_add", "account": "x", "cidr": b_s}));
    w.ok(json!({"cmd": "account_mode", "account": "x", "mode": "enforce"}));
    let (code, message) = w.err(json!({"cmd": "allow_remove", "account": "x", "cidr": b_s}));
    assert!(code == "lockout" && message.contains(&b_s), "{message}");
    let (code, message) = w.err(json!({"cmd": "allow_replace", "account": "x", "entries": [{"cidr": a_s}]}));
    assert!(code == "lockout" && message.contains(&b_s), "{message}");
    assert!(tcp_ok(&w.hosts, b, dst, OK), "a refused removal reached the kernel");
    // A live override counts as allowing b.
    w.ok(grant("x", &c_s));
    // Forced, it goes through, and the kernel follows.
    w.ok(json!({"cmd": "allow_remove", "account": "x", "cidr": b_s, "force": true}));
    assert!(!tcp_ok(&w.hosts, b, dst, FAIL), "the forced removal did not reach the kernel");
    // The guard weighs what a change takes away: b, which signed in but is shut out already,
    // does not stop the removal of an entry that lets nothing in (a disabled one).
    w.ok(json!({"cmd": "allow_add", "account": "x", "cidr": "198.18.0.8/29"}));
    let (code, message) = w.err(json!({"cmd": "allow_disable", "account": "x", "cidr": "198.18.0.8/29"}));
    assert!(code == "lockout" && message.contains(&b_s), "{code}: {message}");
    w.ok(json!({"cmd": "allow_disable", "account": "x", "cidr": "198.18.0.8/29", "force": true}));
    w.ok(json!({"cmd": "allow_remove", "account": "x", "cidr": "198.18.0.8/29"}));
    let log = w.daemon.as_ref().unwrap().log_text();
    assert!(log.contains("lockout_refused: account \"x\" by uid 0 (because=\"nothing allowed\")"), "{log}");
    assert!(log.contains("lockout_refused: account \"x\" by uid 0 (because=\"recent sign-ins shut out\")"), "{log}");
}

/// `import` weighs an existing account's new allowlist and mode with the lockout guard, as
/// `allow_replace` and `account_mode` do: a batch that would shut out a recent sign-in is
/// refused whole (its new accounts too); `force` (`ipaccessctl import --force`) passes it.
#[test]
fn an_import_cannot_shut_out_a_recent_sign_in_unless_forced() {
    let w = World::new("");
    let [a, b, _, _] = w.hosts.client_v4[..] else { panic!("four client addresses") };
    let (a_s, b_s) = (a.to_string(), b.to_string());
    w.ok(json!({"cmd": "account_add", "account": "g"}));
    w.ok(json!({"cmd": "allow_add", "account": "g", "cidr": a_s}));
    w.ok(json!({"cmd": "account_mode", "account": "g", "mode": "enforce"}));
    assert_eq!(w.check("g", a, "password")["allowed"], true);
    let import = |accounts: Value| json!({"cmd": "import", "accounts": accounts});
    for accounts in [
        json!([{"account": "g", "entries": [{"cidr": b_s}]}]),
        json!([{"account": "new-one"}, {"account": "g", "entries": []}]),
        json!([{"account": "g2"}, {"account": "g", "mode": "enforce", "entries": [{"cidr": b_s}]}]),
    ] {
        let (code, message) = w.err(import(accounts.clone()));
        assert!(code == "lockout" && message.starts_with("account g: "), "{accounts}: {code}: {message}");
    }
    // Not enforcing afterwards: nobody is shut out.
    w.ok(import(json!([{"account": "g", "mode": "monitor", "entries": [{"cidr": b_s}]}])));
    w.ok(import(json!([{"account": "g", "mode": "enforce", "entries": [{"cidr": a_s}]}])));
    let listed = |id: &str| w.ok(json!({"cmd": "account_list"})).as_array().unwrap().iter().any(|r| r["id"] == id);
    assert!(!listed("new-one") && !listed("g2"), "a refused batch created an account");
    assert_eq!(reason(&w, "g", &a_s), "allowed", "a refused import reached the policy");

    let file = w.dir.0.join("g.jsonl");
    std::fs::write(&file, json!({"account": "g", "entries": [{"cidr": b_s}]}).to_string()).unwrap();
    let path = file.to_str().unwrap();
    let out = w.ctl(&["import", path]);
    assert!(out.code == 2 && out.stderr.contains("(lockout)") && out.stderr.contains(&a_s), "{out:#?}");
    w.ctl_ok(&["import", path, "--force"]);
    assert_eq!(reason(&w, "g", &a_s), "address_not_allowed");
    assert_eq!(reason(&w, "g", &b_s), "allowed");
}

/// An account removed and made again under its id is a new customer: the old one's
/// sign-ins neither hold back the new one's changes (the lockout guard) nor pass for its
/// attempts in support's evidence. The new account's own sign-ins still count.
#[test]
fn an_id_used_again_owes_nothing_to_the_old_accounts_sign_ins() {
    let w = World::new("");
    let [a, b, c, d] = w.hosts.client_v4[..] else { panic!("four client addresses") };
    let (a_s, b_s, c_s) = (a.to_string(), b.to_string(), c.to_string());
    let enforce = json!({"cmd": "account_mode", "account": "y", "mode": "enforce"});
    w.ok(json!({"cmd": "account_add", "account": "y"}));
    w.ok(json!({"cmd": "allow_add", "account": "y", "cidr": a_s}));
    w.ok(enforce.clone());
    assert_eq!(w.check("y", c, "password")["allowed"], false);
    w.ok(json!({"cmd": "account_mode", "account": "y", "mode": "monitor"}));
    assert_eq!(w.check("y", b, "password")["reason"], "monitor_would_deny");
    let (code, message) = w.err(enforce.clone());
    assert!(code == "lockout" && message.contains(&b_s), "the guard does not see the sign-in: {code}: {message}");
    w.ok(json!({"cmd": "account_remove", "account": "y"}));

    // Accounts are dated to the second: the new one is made in a later second.
    std::thread::sleep(Duration::from_millis(1100));
    w.ok(json!({"cmd": "account_add", "account": "y"}));
    w.ok(json!({"cmd": "allow_add", "account": "y", "cidr": a_s}));
    w.ok(enforce.clone());
    let granted = w.ok(grant("y", &d.to_string()));
    let denied = granted["recent_denied"].as_array().expect("recent_denied").clone();
    assert!(!denied.iter().any(|r| r["address"] == c_s.as_str()), "the old account's attempts: {granted}");

    // Its own sign-ins are weighed as before.
    w.ok(json!({"cmd": "account_mode", "account": "y", "mode": "monitor"}));
    assert_eq!(w.check("y", b, "password")["reason"], "monitor_would_deny");
    let (code, message) = w.err(enforce);
    assert!(code == "lockout" && message.contains(&b_s), "{code}: {message}");
}

/// `::ffff:a.b.c.d` is an IPv4 address however it is spelled: entries and overrides made in
/// the mapped spelling are stored as IPv4, say so, and match at login and on the wire.
#[test]
fn ipv4_mapped_spellings_are_ipv4() {
    let w = World::new("");
    warm_up(&w.hosts);
    let [a, b, c, _] = w.hosts.client_v4[..] else { panic!("four client addresses") };
    let dst = SocketAddr::new(w.hosts.server_v4.into(), 7401);
    let _server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
    w.ok(json!({"cmd": "account_add", "account": "m"}));
    w.ok(json!({"cmd": "bind_add", "account": "m", "addr": dst.ip().to_string(), "port": 7401}));
    let added = w.ok(json!({"cmd": "allow_add", "account": "m", "cidr": format!("::ffff:{a}")}));
    assert_eq!(added["cidr"], format!("{a}/32"));
    assert!(added["notes"][0].as_str().unwrap().contains("IPv4-mapped"), "{added}");
    let net = w.ok(json!({"cmd": "allow_add", "account": "m", "cidr": "::ffff:198.18.6.0/120"}));
    assert_eq!(net["cidr"], "198.18.6.0/24");
    w.ok(json!({"cmd": "account_mode", "account": "m", "mode": "enforce"}));
    assert_eq!(reason(&w, "m", &a.to_string()), "allowed");
    assert_eq!(reason(&w, "m", &format!("::ffff:{a}")), "allowed");
    assert_eq!(reason(&w, "m", "198.18.6.77"), "allowed");
    assert_eq!(reason(&w, "m", &b.to_string()), "address_not_allowed");
    assert!(tcp_ok(&w.hosts, a, dst, OK) && !tcp_ok(&w.hosts, b, dst, FAIL));

    let granted = w.ok(grant("m", &format!("::ffff:{b}")));
    assert_eq!(granted["override"]["cidr"], format!("{b}/32"));
    assert!(granted["notes"][0].as_str().unwrap().contains("IPv4-mapped"), "{granted}");
    let c_check = w.ok(json!({"cmd": "check", "account": "m", "addr": format!("::ffff:{b}"), "dry_run": true}));
    assert_eq!(c_check["via_override"]["id"], granted["override"]["id"], "{c_check}");
    assert!(tcp_ok(&w.hosts, b, dst, OK), "the mapped override does not reach the kernel");
    assert!(!tcp_ok(&w.hosts, c, dst, FAIL));
    // Disabling and enabling in the mapped spelling reach the IPv4 entry, and say so.
    for (cmd, enabled) in [("allow_disable", false), ("allow_enable", true)] {
        let reply = w.ok(json!({"cmd": cmd, "account": "m", "cidr": format!("::ffff:{a}")}));
        assert_eq!((&reply["cidr"], &reply["enabled"]), (&json!(format!("{a}/32")), &json!(enabled)), "{reply}");
        assert!(reply["notes"][0].as_str().unwrap().contains("IPv4-mapped"), "{reply}");
        assert_eq!(reason(&w, "m", &a.to_string()) == "allowed", enabled, "{cmd}");
    }
    // Removing in the mapped spelling removes the IPv4 entry.
    w.ok(json!({"cmd": "allow_remove", "account": "m", "cidr": "::ffff:198.18.6.0/120", "force": true}));
    assert_eq!(reason(&w, "m", "198.18.6.77"), "address_not_allowed");
    // A prefix wider than the mapped range is not a spelling of IPv4 networks.
    assert_eq!(w.err(json!({"cmd": "allow_add", "account": "m", "cidr": "::/64"})).0, "bad_request");
}

/// What an entry or override may be: no leading zeros, no host bits (on add and on remove
/// alike), not the whole Internet, and an override no wider than the configured prefix.
#[test]
fn cidrs_are_strict_and_overrides_narrow() {
    let w = World::new("widest_override_ipv4 = 28\nwidest_override_ipv6 = 56");
    w.ok(json!({"cmd": "account_add", "account": "s"}));
    w.ok(json!({"cmd": "allow_add", "account": "s", "cidr": "198.18.0.0/24"}));
    w.ok(json!({"cmd": "account_mode", "account": "s", "mode": "enforce", "force": true}));
    for (cmd, cidr, says) in [
        ("allow_add", "010.0.0.0/8", "is not a CIDR"),
        ("allow_add", "198.18.0.0/024", "is not a CIDR"),
        ("allow_add", "198.18.1.7/24", "the network is 198.18.1.0/24"),
        ("allow_remove", "198.18.0.7/24", "the network is 198.18.0.0/24"),
        ("allow_add", "0.0.0.0/0", "mode to off"),
        ("allow_add", "::/0", "mode to off"),
        ("allow_add", "fd00::1/64", "the network is fd00::/64"),
    ] {
        let (code, message) = w.err(json!({"cmd": cmd, "account": "s", "cidr": cidr}));
        assert!(code == "bad_request" && message.contains(says), "{cmd} {cidr}: {code}: {message}");
    }
    assert_eq!(w.ok(json!({"cmd": "allow_list", "account": "s"})).as_array().unwrap().len(), 1);
    for (cidr, says) in [
        ("0.0.0.0/0", "mode to off"),
        ("198.19.0.0/16", "at most a /28 for IPv4 (widest_override_ipv4 in the configuration)"),
        ("198.19.0.0/24", "at most a /28 for IPv4"),
        ("fd00:9::/48", "at most a /56 for IPv6"),
    ] {
        let (code, message) = w.err(grant("s", cidr));
        assert!(code == "bad_request" && message.contains(says), "{cidr}: {code}: {message}");
    }
    w.ok(grant("s", "198.19.0.16/28"));
    w.ok(grant("s", "fd00:9::/56"));
    // Already allowed: refused, with the entry that allows it.
    let (code, message) = w.err(grant("s", "198.18.0.9"));
    assert!(code == "refused" && message.contains("198.18.0.0/24"), "{code}: {message}");
    assert_eq!(w.ok(json!({"cmd": "override_list", "account": "s"})).as_array().unwrap().len(), 2);
}

/// Names and free text reach operators' terminals and logs: strict ids for new accounts,
/// bounded labels, tickets and reasons without control or invisible characters.
#[test]
fn names_and_texts_are_validated() {
    let w = World::new("");
    for bad in
        [" acme", "acme ", "ac me", "acme\n0.0.0.0/0", "acme\u{1b}[2J", "acme\u{202e}", "acme\u{200b}", "-acme", ""]
    {
        let (code, message) = w.err(json!({"cmd": "account_add", "account": bad}));
        assert!(code == "bad_request" && message.contains("account id"), "{bad:?}: {code}: {message}");
    }
    assert_eq!(w.err(json!({"cmd": "account_add", "account": "x".repeat(129)})).0, "bad_request");
    w.ok(json!({"cmd": "account_add", "account": "user@example.org"}));
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    for label in ["office\n198.18.0.0/24  forged", "\u{1b}]0;pwned\u{7}", "a\u{202e}b", &"x".repeat(65_536)] {
        let (code, _) = w.err(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.10", "label": label}));
        assert_eq!(code, "bad_request", "{label:?}");
        w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.10", "label": "ok"}));
        let (code, _) = w.err(json!({"cmd": "allow_label", "account": "acme", "cidr": "198.18.0.10", "label": label}));
        assert_eq!(code, "bad_request", "{label:?}");
        w.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": "198.18.0.10"}));
        let mut request = grant("acme", "198.18.0.11");
        request["ticket"] = json!(label);
        assert_eq!(w.err(request).0, "bad_request", "ticket {label:?}");
        let mut request = grant("acme", "198.18.0.11");
        request["reason"] = json!(label);
        assert_eq!(w.err(request).0, "bad_request", "reason {label:?}");
        let state = json!({"cmd": "account_state", "account": "acme", "state": "banned", "reason": label});
        assert_eq!(w.err(state).0, "bad_request", "state reason {label:?}");
    }
    assert_eq!(w.ok(json!({"cmd": "allow_list", "account": "acme"})), json!([]));
    assert_eq!(w.ok(json!({"cmd": "account_show", "account": "acme"}))["account"]["state"], "active");
}

/// Account removal (refused with sub-users unless recursive, taking bindings, overrides and
/// kernel state along), entry enable/disable on the wire, label edits, an override named in
/// the check it allowed, a binding's owner named, and the audit line of every change.
#[test]
fn removal_entry_lifecycle_and_audit() {
    let w = World::new("");
    warm_up(&w.hosts);
    let [a, b, _, _] = w.hosts.client_v4[..] else { panic!("four client addresses") };
    let (dst, _server) = guarded(&w, "org", None, 7501, a);
    w.ok(json!({"cmd": "account_add", "account": "org-dev", "parent": "org"}));
    w.ok(json!({"cmd": "allow_add", "account": "org", "cidr": b.to_string(), "label": "vpn"}));
    assert!(tcp_ok(&w.hosts, b, dst, OK));

    // Disable: kept and listed, but lets nothing in, at login and on the wire.
    let disabled = w.ok(json!({"cmd": "allow_disable", "account": "org", "cidr": b.to_string()}));
    assert_eq!(disabled["enabled"], false, "{disabled}");
    assert_eq!(reason(&w, "org", &b.to_string()), "address_not_allowed");
    assert!(!tcp_ok(&w.hosts, b, dst, FAIL), "a disabled entry still lets packets in");
    let listed = w.ok(json!({"cmd": "allow_list", "account": "org"}));
    assert_eq!(listed.as_array().unwrap().len(), 2);
    w.ok(json!({"cmd": "allow_enable", "account": "org", "cidr": b.to_string()}));
    assert!(tcp_ok(&w.hosts, b, dst, OK), "an enabled entry does not let packets in");
    let relabelled = w.ok(json!({"cmd": "allow_label", "account": "org", "cidr": b.to_string(), "label": "new vpn"}));
    assert_eq!(relabelled["label"], "new vpn");
    assert_eq!(w.err(json!({"cmd": "allow_enable", "account": "org", "cidr": "198.18.9.0/24"})).0, "unknown_entry");

    // The binding's owner is named to whoever tries to take it.
    let (code, message) =
        w.err(json!({"cmd": "bind_add", "account": "org-dev", "addr": dst.ip().to_string(), "port": 7501}));
    assert!(code == "binding_exists" && message.contains("\"org\""), "{code}: {message}");

    // Removal: refused with a sub-user, unless recursive; bindings and kernel state go too.
    let (code, message) = w.err(json!({"cmd": "account_remove", "account": "org"}));
    assert!(code == "has_sub_users" && message.contains("org-dev"), "{code}: {message}");
    let removed = w.ok(json!({"cmd": "account_remove", "account": "org", "recursive": true}));
    assert_eq!(removed["removed"], json!(["org-dev", "org"]));
    assert_eq!(w.ok(json!({"cmd": "bind_list"})), json!([]));
    assert_eq!(reason(&w, "org", &a.to_string()), "unknown_account");
    assert!(tcp_ok(&w.hosts, w.hosts.client_v4[2], dst, OK), "the removed account's endpoint is still filtered");
    assert_eq!(w.ok(json!({"cmd": "status"}))["accounts"], 0);
    // The id can be used again, from a clean slate.
    w.ok(json!({"cmd": "account_add", "account": "org"}));
    assert_eq!(w.ok(json!({"cmd": "allow_list", "account": "org"})), json!([]));

    let log = w.daemon.as_ref().unwrap().log_text();
    for line in [
        "account_add: account \"org\" by uid 0",
        "allow_add: account \"org\" by uid 0",
        "allow_disable: account \"org\" by uid 0",
        "allow_enable: account \"org\" by uid 0",
        "allow_label: account \"org\" by uid 0",
        "bind_add: account \"org\" by uid 0",
        "account_remove: account \"org-dev\" by uid 0",
        "account_remove: account \"org\" by uid 0",
        "mode: account \"org\" by uid 0",
    ] {
        assert!(log.contains(line), "no {line:?} in the daemon's log:\n{log}");
    }
}

/// Override expiry is audited by the sweep, once, with the granting operator; the same
/// sweep takes the ended override out of the cache and the kernel's table.
#[test]
fn override_expiry_is_audited() {
    let w = World::new("min_override_ttl_seconds = 1");
    w.ok(json!({"cmd": "account_add", "account": "e"}));
    w.ok(json!({"cmd": "allow_add", "account": "e", "cidr": "198.18.0.10"}));
    w.ok(json!({"cmd": "account_mode", "account": "e", "mode": "enforce"}));
    let mut request = grant("e", "198.18.0.11");
    request["ttl_seconds"] = json!(1);
    let id = w.ok(request)["override"]["id"].clone();
    // The sweep runs every ten seconds.
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    let line = "override_expired: account \"e\" by uid 0 (cidr=\"198.18.0.11/32\" expires_at=";
    loop {
        let log = w.daemon.as_ref().unwrap().log_text();
        if log.contains(line) {
            assert!(log.contains(&format!("override={id}")), "{log}");
            assert_eq!(log.matches("override_expired:").count(), 1, "{log}");
            assert!(log.contains("account \"e\": expired overrides and entries swept"), "{log}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no expiry audited:\n{log}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Reads (status, accounts, allowlists, bindings) and login checks are open to every role;
/// the check role stays the narrow one (checks and reads only); support's own checks are
/// recorded as theirs and never count as the customer's attempts; a dry run records nothing.
#[test]
fn reads_are_open_to_every_role() {
    use ipaccess_tests::client::Conn;
    const SUPPORT: u32 = 65534;
    const ADMIN: u32 = 65533;
    const CHECKER: u32 = 65532;
    let w = World::new(&format!(
        "socket_mode = 0o666\n[roles]\nsupport = {{ uids = [{SUPPORT}] }}\nadmin = {{ uids = [{ADMIN}] }}\n\
         check = {{ uids = [{CHECKER}] }}"
    ));
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.10"}));
    w.ok(json!({"cmd": "bind_add", "account": "acme", "addr": "198.18.0.1", "port": 443}));
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce"}));
    let reads = [
        json!({"cmd": "status"}),
        json!({"cmd": "account_list"}),
        json!({"cmd": "account_show", "account": "acme"}),
        json!({"cmd": "allow_list", "account": "acme"}),
        json!({"cmd": "bind_list"}),
        json!({"cmd": "check", "account": "acme", "addr": "198.18.0.99", "dry_run": true}),
        json!({"cmd": "check", "account": "acme", "addr": "198.18.0.98"}),
    ];
    for uid in [SUPPORT, ADMIN, CHECKER] {
        let mut conn = Conn::open_as(&w.socket(), uid);
        for read in &reads {
            conn.ok(read.clone());
        }
    }
    let mut checker = Conn::open_as(&w.socket(), CHECKER);
    for change in [
        json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.11"}),
        grant("acme", "198.18.0.12"),
        json!({"cmd": "activity", "account": "acme"}),
    ] {
        assert_eq!(checker.err(change.clone()).0, "forbidden", "{change}");
    }
    // The grant's evidence holds the application's denied attempt from .98 (the check-role
    // caller's), not support's or the admin's own checks of it, and nothing from the dry runs.
    let granted = Conn::open_as(&w.socket(), SUPPORT).ok(grant("acme", "198.18.0.98"));
    let evidence = granted["recent_denied"].as_array().unwrap();
    let from_98: i64 =
        evidence.iter().filter(|r| r["address"] == "198.18.0.98").map(|r| r["count"].as_i64().unwrap()).sum();
    assert_eq!(from_98, 1, "{granted}");
    assert!(!evidence.iter().any(|r| r["address"] == "198.18.0.99"), "a dry run was recorded: {granted}");
}

/// Full kernel tables are an operator's capacity problem, not an internal fault: the error
/// has its own code, says what to raise, and nothing is changed.
#[test]
fn full_tables_have_their_own_error_and_change_nothing() {
    // The per-account limit (1,000 by default) would refuse the list before the kernel does.
    let w = World::new("[limits]\nmax_entries_per_account = 100000");
    w.ok(json!({"cmd": "account_add", "account": "big"}));
    w.ok(json!({"cmd": "allow_add", "account": "big", "cidr": "198.18.0.10"}));
    // The test maps hold 65,536 slots; 70,000 host entries cannot fit.
    let entries: Vec<Value> = (0..70_000u32)
        .map(|n| json!({"cidr": std::net::Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 | n as u128).to_string()}))
        .collect();
    let (code, message) = w.err(json!({"cmd": "allow_replace", "account": "big", "entries": entries, "force": true}));
    assert_eq!(code, "tables_full", "{message}");
    assert!(message.contains("raise `slots`"), "{message}");
    let list = w.ok(json!({"cmd": "allow_list", "account": "big"}));
    assert_eq!(list.as_array().unwrap().len(), 1, "a refused replacement changed the list");
    assert_eq!(reason(&w, "big", "198.18.0.10"), "allowed");
}

/// An endpoint named by its IPv4-mapped IPv6 spelling is the IPv4 endpoint: the binding is
/// stored and listed as IPv4 and filters the IPv4 packets that reach it (kept as IPv6, it
/// would match no packet, and the account would look bound but go unfiltered), and the
/// mapped spelling removes it again.
#[test]
fn a_binding_named_by_its_ipv4_mapped_spelling_filters_the_ipv4_endpoint() {
    let w = World::new("");
    warm_up(&w.hosts);
    let [good, other, ..] = w.hosts.client_v4[..] else { panic!("two client addresses") };
    let dst = SocketAddr::new(w.hosts.server_v4.into(), 7501);
    let _server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
    let mapped = w.hosts.server_v4.to_ipv6_mapped().to_string();
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    let bound = w.ok(json!({"cmd": "bind_add", "account": "acme", "addr": mapped, "port": 7501}));
    assert_eq!(bound["addr"], w.hosts.server_v4.to_string(), "{bound}");
    let listed = w.ok(json!({"cmd": "bind_list"}));
    assert_eq!(listed[0]["addr"], w.hosts.server_v4.to_string(), "{listed}");
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": good.to_string()}));
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce"}));
    assert!(tcp_ok(&w.hosts, good, dst, OK), "the allowed source is refused");
    assert!(!tcp_ok(&w.hosts, other, dst, FAIL), "the endpoint is not filtered");
    // The same endpoint in either spelling is one endpoint.
    let (code, _) = w.err(json!({"cmd": "bind_add", "account": "acme", "addr": dst.ip().to_string(), "port": 7501}));
    assert_eq!(code, "binding_exists");
    w.ok(json!({"cmd": "bind_remove", "addr": mapped, "port": 7501}));
    assert_eq!(w.ok(json!({"cmd": "bind_list"})), json!([]));
    assert!(tcp_ok(&w.hosts, other, dst, OK), "the endpoint is still filtered after its removal");
}
