//! End to end, for support staff: time-limited overrides (in the store, in login checks and
//! in the kernel, across a SIGKILL and a restart), the refusals, the activity log with its
//! audit records, and the `support` role.
//!
//! The real `ipaccessd` runs in the server namespace of a [`TestHosts`] pair with its own
//! bpffs, state directory and socket; requests are raw JSON lines on the control socket
//! (`ipaccess_tests::client`). Build the binaries first:
//! `cargo build --release -p ipaccess --bins`.

use std::fs::{self};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipaccess_tests::client::{Client, Conn};
use ipaccess_tests::daemon::World;
use ipaccess_tests::netns::{TcpServer, TestHosts, icmp_echo, tcp_connect};
use serde_json::{Value, json};

/// Upper bound for attempts that should succeed; timeout for attempts that should fail.
const OK: Duration = Duration::from_secs(2);
const FAIL: Duration = Duration::from_millis(500);
const NOBODY: u32 = 65534;
const DAY: u64 = 24 * 3600;

// ---------------------------------------------------------------------------------------------
// Small helpers

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// A TCP handshake from `src` (in the client namespace) to `dst`.
fn tcp_ok(hosts: &TestHosts, src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> bool {
    hosts.client.run(move || tcp_connect(src.into(), dst, timeout))
}

/// Resolves the server's MAC from each source (ICMP is not filtered by a port binding).
fn warm_up(hosts: &TestHosts, sources: &[Ipv4Addr]) {
    let dst = IpAddr::from(hosts.server_v4);
    for &src in sources {
        assert!(hosts.client.run(move || icmp_echo(src.into(), dst, OK)), "ping {src} -> {dst}");
    }
}

fn grant(account: &str, cidr: &str, ttl: u64) -> Value {
    json!({"cmd": "override_grant", "account": account, "cidr": cidr, "ttl_seconds": ttl,
           "ticket": "SUP-1234", "reason": "customer verified by phone"})
}

/// The check must come out as `allowed` with `reason`.
fn assert_check(w: &World, account: &str, addr: impl Into<IpAddr>, method: &str, allowed: bool, reason: &str) {
    let addr = addr.into();
    let c = w.check(account, addr, method);
    assert_eq!(
        (&c["allowed"], &c["reason"]),
        (&json!(allowed), &json!(reason)),
        "check {account} {addr} {method}: {c}"
    );
}

/// Waits until the daemon has written out the login checks it recorded so far (an `activity`
/// request flushes them). Checks are written in batches, audit records in the change's own
/// transaction; without this, a check made just before a change can be stored after the
/// change's audit record and come out in the wrong order (see
/// `activity_is_newest_first_across_checks_and_changes`).
fn settle(w: &World, account: &str) {
    w.ok(json!({"cmd": "activity", "account": account, "limit": 1}));
}

fn ids(list: &Value) -> Vec<i64> {
    list.as_array().unwrap_or_else(|| panic!("not a list: {list}")).iter().map(|o| o["id"].as_i64().unwrap()).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

/// A customer locked out by its own allowlist gets in through an override, in login checks
/// and on the wire; the override outlives a SIGKILL of the daemon (the pinned filter keeps
/// it) and a restart; revoking ends it at once.
#[test]
fn override_lets_a_locked_out_customer_in_and_expires_in_the_kernel() {
    let mut w = World::new("");
    let (good, locked, other) = (w.hosts.client_v4[0], w.hosts.client_v4[1], w.hosts.client_v4[2]);
    let (dst, _server) = enforcing_customer(&w, good);
    warm_up(&w.hosts, &[good, locked, other]);

    // Locked out: two methods, three attempts; and on the wire.
    let before = now();
    for method in ["password", "api_key", "password"] {
        assert_check(&w, "cust", locked, method, false, "address_not_allowed");
    }
    assert_check(&w, "cust", good, "password", true, "allowed");
    assert!(tcp_ok(&w.hosts, good, dst, OK), "the allowed source is refused");
    assert!(!tcp_ok(&w.hosts, locked, dst, FAIL), "the locked-out source got through");

    // The grant shows support the customer's denied attempts.
    let granted = w.ok(grant("cust", &format!("{locked}/32"), 60));
    let row = &granted["override"];
    let id = row["id"].as_i64().unwrap_or_else(|| panic!("no override id: {granted}"));
    assert_eq!(row["account"], "cust", "{granted}");
    assert_eq!(row["cidr"], format!("{locked}/32"), "{granted}");
    assert_eq!((&row["ticket"], &row["reason"]), (&json!("SUP-1234"), &json!("customer verified by phone")));
    assert_eq!(row["operator"], 0, "{granted}");
    assert_eq!(row["revoked_at"], Value::Null, "{granted}");
    let created = row["created_at"].as_i64().unwrap();
    assert!((before..=now()).contains(&created), "{granted}");
    assert_eq!(row["expires_at"].as_i64().unwrap() - created, 60, "{granted}");
    let recent = granted["recent_denied"].as_array().unwrap_or_else(|| panic!("no recent_denied: {granted}"));
    let mut seen: Vec<(String, String, i64)> = recent
        .iter()
        .map(|r| {
            let (first, last) = (r["first_seen"].as_i64().unwrap(), r["last_seen"].as_i64().unwrap());
            assert!(before <= first && first <= last && last <= now(), "{r}");
            (r["address"].as_str().unwrap().into(), r["method"].as_str().unwrap().into(), r["count"].as_i64().unwrap())
        })
        .collect();
    seen.sort();
    let l = locked.to_string();
    assert_eq!(seen, [(l.clone(), "api_key".into(), 1), (l.clone(), "password".into(), 2)], "{granted}");

    // In force: checks and traffic from that address only.
    assert_check(&w, "cust", locked, "password", true, "allowed");
    assert_check(&w, "cust", locked, "sso", true, "allowed");
    assert_check(&w, "cust", other, "password", false, "address_not_allowed");
    assert!(tcp_ok(&w.hosts, locked, dst, OK), "the override does not reach the kernel");
    assert!(!tcp_ok(&w.hosts, other, dst, FAIL), "the override let another source through");
    let listed = w.ok(json!({"cmd": "override_list", "account": "cust"}));
    assert_eq!(ids(&listed), [id], "{listed}");
    assert_eq!(&listed[0], row, "the list differs from the grant");
    assert_eq!(ids(&w.ok(json!({"cmd": "override_list"}))), [id]);

    // The daemon dies: the pinned filter keeps the override (and the allowlist).
    w.kill9();
    assert!(tcp_ok(&w.hosts, locked, dst, OK), "the override ended with the daemon");
    assert!(tcp_ok(&w.hosts, good, dst, OK), "the allowlist ended with the daemon");
    assert!(!tcp_ok(&w.hosts, other, dst, FAIL), "filtering stopped with the daemon");
    // ...and a new daemon still lists and honours it.
    w.start("");
    let listed = w.ok(json!({"cmd": "override_list", "account": "cust"}));
    assert_eq!(ids(&listed), [id], "{listed}");
    assert_eq!(&listed[0], row, "the restart changed the override");
    assert_check(&w, "cust", locked, "password", true, "allowed");
    assert!(tcp_ok(&w.hosts, locked, dst, OK), "the restart dropped the override from the kernel");
    assert!(!tcp_ok(&w.hosts, other, dst, FAIL));

    // Revoked (by the right account only): ends at once, in checks and in the kernel.
    let (code, _) = w.err(json!({"cmd": "override_revoke", "account": "nobody-else", "override_id": id}));
    assert_eq!(code, "unknown_account");
    w.ok(json!({"cmd": "account_add", "account": "neighbour"}));
    let (code, _) = w.err(json!({"cmd": "override_revoke", "account": "neighbour", "override_id": id}));
    assert_eq!(code, "unknown_override", "another account's override was revoked");
    let revoked = w.ok(json!({"cmd": "override_revoke", "account": "cust", "override_id": id}));
    assert_eq!(revoked["id"], id, "{revoked}");
    assert!(revoked["revoked_at"].as_i64().is_some_and(|t| t >= created), "{revoked}");
    assert_check(&w, "cust", locked, "password", false, "address_not_allowed");
    assert!(!tcp_ok(&w.hosts, locked, dst, FAIL), "a revoked override still lets traffic through");
    assert!(tcp_ok(&w.hosts, good, dst, OK));
    assert_eq!(w.ok(json!({"cmd": "override_list", "account": "cust"})), json!([]));
    assert_eq!(w.ok(json!({"cmd": "override_list"})), json!([]));
    let (code, message) = w.err(json!({"cmd": "override_revoke", "account": "cust", "override_id": id}));
    assert_eq!(code, "unknown_override", "{message}");
    let (code, _) = w.err(json!({"cmd": "override_revoke", "account": "cust", "override_id": id + 1000}));
    assert_eq!(code, "unknown_override");
}

/// No override for banned accounts, sub-users of banned parents, or accounts terminated for
/// non-payment, with a message that says why; unconfirmed accounts may get one; bad
/// durations and missing tickets or reasons are bad requests; nothing refused is stored.
#[test]
fn overrides_are_refused_for_banned_and_terminated_accounts() {
    let w = World::new("");
    for (account, parent, unconfirmed) in [
        ("spammer", None, false),
        ("corp", None, false),
        ("corp-dev", Some("corp"), false),
        ("debtor", None, false),
        ("newbie", None, true),
        ("fine", None, false),
    ] {
        w.ok(json!({"cmd": "account_add", "account": account, "parent": parent, "unconfirmed": unconfirmed}));
    }
    for (account, state) in [("spammer", "banned"), ("corp", "banned"), ("debtor", "terminated")] {
        w.ok(json!({"cmd": "account_state", "account": account, "state": state, "reason": "test"}));
    }
    let net = "198.18.0.11/32";

    let (code, message) = w.err(grant("spammer", net, 3600));
    assert_eq!(code, "refused", "{message}");
    assert!(message.contains("spammer") && message.contains("banned"), "{message}");
    let (code, message) = w.err(grant("corp-dev", net, 3600));
    assert_eq!(code, "refused", "{message}");
    assert!(message.contains("parent") && message.contains("corp") && message.contains("banned"), "{message}");
    let (code, message) = w.err(grant("debtor", net, 3600));
    assert_eq!(code, "refused", "{message}");
    assert!(message.contains("terminated") && message.contains("non-payment"), "{message}");
    let (code, _) = w.err(grant("ghost", net, 3600));
    assert_eq!(code, "unknown_account");
    // The parent itself is banned too.
    assert_eq!(w.err(grant("corp", net, 3600)).0, "refused");

    // An unconfirmed account is not locked out by its allowlist: confirming the email is
    // what lets it in, and the refusal says so.
    let (code, message) = w.err(grant("newbie", net, 3600));
    assert!(code == "refused" && message.contains("confirm the email"), "{code}: {message}");
    // An account in mode off blocks nothing; enforcing (with nothing allowed: forced) it does.
    let (code, message) = w.err(grant("fine", net, 3600));
    assert!(code == "refused" && message.contains("mode off"), "{code}: {message}");
    w.ok(json!({"cmd": "account_mode", "account": "fine", "mode": "enforce", "force": true}));
    // The edges of the duration are allowed.
    let shortest = w.ok(grant("fine", "198.18.0.12/32", 60))["override"].clone();
    assert_eq!(shortest["expires_at"].as_i64().unwrap() - shortest["created_at"].as_i64().unwrap(), 60);
    let longest = w.ok(grant("fine", "198.18.0.0/24", 30 * DAY))["override"].clone();
    assert_eq!(longest["expires_at"].as_i64().unwrap() - longest["created_at"].as_i64().unwrap(), (30 * DAY) as i64);

    // Bad durations, tickets and reasons.
    for ttl in [0, 1, 59, 30 * DAY + 1, u64::MAX] {
        let (code, message) = w.err(grant("fine", net, ttl));
        assert_eq!(code, "bad_request", "ttl {ttl}: {message}");
    }
    for (ticket, reason) in [("", "verified"), ("SUP-1", ""), ("  ", "verified"), ("SUP-1", " \t ")] {
        let mut request = grant("fine", net, 3600);
        request["ticket"] = json!(ticket);
        request["reason"] = json!(reason);
        let (code, message) = w.err(request);
        assert_eq!(code, "bad_request", "ticket {ticket:?}, reason {reason:?}: {message}");
    }
    for missing in ["ticket", "reason", "ttl_seconds", "cidr"] {
        let mut request = grant("fine", net, 3600);
        request.as_object_mut().unwrap().remove(missing);
        assert_eq!(w.err(request).0, "bad_request", "without {missing}");
    }
    let mut request = grant("fine", net, 3600);
    request["ttl_seconds"] = json!(-60);
    assert_eq!(w.err(request).0, "bad_request", "negative ttl");

    // Only the three granted overrides exist; the refused ones left no audit record.
    let all = w.ok(json!({"cmd": "override_list"}));
    let mut accounts: Vec<&str> = all.as_array().unwrap().iter().map(|o| o["account"].as_str().unwrap()).collect();
    accounts.sort();
    assert_eq!(accounts, ["fine", "fine"], "{all}");
    for account in ["spammer", "corp-dev", "debtor", "newbie"] {
        let log = w.ok(json!({"cmd": "activity", "account": account}));
        let grants = log.as_array().unwrap().iter().filter(|r| r["reason"] == "override_granted").count();
        assert_eq!(grants, 0, "a refused grant was audited for {account}: {log}");
        assert_eq!(w.ok(json!({"cmd": "override_list", "account": account})), json!([]));
    }
    // The refused accounts still check as before.
    assert_check(&w, "spammer", Ipv4Addr::new(198, 18, 0, 11), "password", false, "banned");
    assert_check(&w, "corp-dev", Ipv4Addr::new(198, 18, 0, 11), "password", false, "parent_banned");
    assert_check(&w, "debtor", Ipv4Addr::new(198, 18, 0, 11), "password", false, "terminated");
    assert_eq!(w.err(json!({"cmd": "override_list", "account": "ghost"})).0, "unknown_account");
}

/// Every check is counted and every audited change is in the activity log: sign-ins per
/// (address, method, outcome) with their counts, audit records one each, newest first;
/// `denied_only` and `limit` filter it; audit records carry the uid; it all survives a
/// restart.
#[test]
fn activity_log_records_checks_and_audits() {
    let mut w = World::new("");
    let (a, b) = ("198.18.0.10", "198.18.0.99");
    let before = now();
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    w.ok(json!({"cmd": "account_add", "account": "other"}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{a}/32")}));
    // Sign-ins as (address, method, allowed, reason).
    type Signin<'a> = (&'a str, &'a str, bool, &'a str);
    let mut expected: Vec<Signin> = Vec::new();
    type Expected<'a> = Vec<Signin<'a>>;
    fn check<'a>(
        w: &World,
        addr: &'a str,
        method: &'a str,
        allowed: bool,
        reason: &'a str,
        expected: &mut Expected<'a>,
    ) {
        let c = w.ok(json!({"cmd": "check", "account": "acme", "addr": addr, "method": method}));
        assert_eq!((&c["allowed"], &c["reason"]), (&json!(allowed), &json!(reason)), "{c}");
        expected.push((addr, method, allowed, reason));
    }
    check(&w, b, "password", true, "allowed", &mut expected);
    // b signed in a moment ago: enforcing without it is a lockout the guard refuses.
    let (code, message) = w.err(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": a}));
    assert!(code == "lockout" && message.contains(b), "{code}: {message}");
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": a, "force": true}));
    check(&w, a, "password", true, "allowed", &mut expected);
    check(&w, b, "api_key", false, "address_not_allowed", &mut expected);
    check(&w, b, "sso", false, "address_not_allowed", &mut expected);
    check(&w, b, "sso", false, "address_not_allowed", &mut expected);
    let id = w.ok(grant("acme", &format!("{b}/32"), 600))["override"]["id"].clone();
    check(&w, b, "sso", true, "allowed", &mut expected);
    w.ok(json!({"cmd": "override_revoke", "account": "acme", "override_id": id}));
    check(&w, b, "password", false, "address_not_allowed", &mut expected);
    w.ok(json!({"cmd": "account_state", "account": "acme", "state": "terminated", "reason": "unpaid"}));
    check(&w, a, "api_key", false, "terminated", &mut expected);
    // Another account's activity stays out of acme's.
    w.ok(json!({"cmd": "check", "account": "other", "addr": b}));

    let log = w.ok(json!({"cmd": "activity", "account": "acme"}));
    let records = log.as_array().unwrap_or_else(|| panic!("not a list: {log}"));
    for r in records {
        assert_eq!(r["account"], "acme", "{r}");
        let (first, last) = (r["first_seen"].as_i64().unwrap(), r["time"].as_i64().unwrap());
        assert!(before <= first && first <= last && last <= now(), "{r}");
        assert_eq!(r["uid"], 0, "{r}");
    }
    let times: Vec<i64> = records.iter().map(|r| r["time"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|t| t[0] >= t[1]), "not newest first: {times:?}");
    // Each (address, method, outcome) counted once, whatever the hour rows.
    let counted = |list: &Value| {
        let mut counts = std::collections::BTreeMap::new();
        for r in list.as_array().unwrap().iter().filter(|r| r["kind"] == "signin") {
            let key = (
                r["address"].as_str().unwrap().to_string(),
                r["method"].as_str().unwrap().to_string(),
                r["allowed"].as_bool().unwrap(),
                r["reason"].as_str().unwrap().to_string(),
            );
            *counts.entry(key).or_insert(0) += r["count"].as_i64().unwrap();
        }
        counts
    };
    let mut want = std::collections::BTreeMap::new();
    for (addr, method, allowed, reason) in &expected {
        *want.entry((addr.to_string(), method.to_string(), *allowed, reason.to_string())).or_insert(0) += 1;
    }
    assert_eq!(counted(&log), want, "sign-ins of acme:\n{log:#}");

    // Audit records: one each, newest first, who and what.
    let audits: Vec<&Value> = records.iter().filter(|r| r["kind"] == "audit").collect();
    let actions: Vec<&str> = audits.iter().map(|r| r["reason"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["state", "override_revoked", "override_granted", "mode", "allow_add", "account_add"],
        "{log:#}"
    );
    let audit = |action: &str| audits.iter().find(|r| r["reason"] == action).unwrap()["detail"].clone();
    for action in ["mode", "override_granted", "override_revoked", "state"] {
        let detail = audit(action);
        assert_eq!((&detail["uid"], &detail["action"]), (&json!(0), &json!(action)), "{action}: {detail}");
    }
    assert_eq!((&audit("mode")["mode"], &audit("mode")["was"]), (&json!("enforce"), &json!("off")));
    assert_eq!((&audit("state")["state"], &audit("state")["reason"]), (&json!("terminated"), &json!("unpaid")));
    let granted = audit("override_granted");
    assert_eq!(
        (&granted["override"], &granted["cidr"], &granted["ticket"]),
        (&id, &json!(format!("{b}/32")), &json!("SUP-1234"))
    );
    assert_eq!(audit("override_revoked")["override"], id);

    // Filters.
    let denied = w.ok(json!({"cmd": "activity", "account": "acme", "denied_only": true}));
    let want: Vec<&Value> = records.iter().filter(|r| r["allowed"] == json!(false)).collect();
    assert_eq!(want.len(), 4, "{log:#}");
    assert_eq!(denied.as_array().unwrap().iter().collect::<Vec<_>>(), want, "denied_only");
    assert_eq!(want.iter().map(|r| r["count"].as_i64().unwrap()).sum::<i64>(), 5);
    for limit in [1, 3] {
        let capped = w.ok(json!({"cmd": "activity", "account": "acme", "limit": limit}));
        assert_eq!(capped.as_array().unwrap()[..], records[..limit], "limit {limit}");
    }
    let capped = w.ok(json!({"cmd": "activity", "account": "acme", "denied_only": true, "limit": 2}));
    assert_eq!(capped.as_array().unwrap().iter().collect::<Vec<_>>(), want[..2], "denied_only and limit");
    let recent = w.ok(json!({"cmd": "activity", "account": "acme", "since_seconds": 3600}));
    assert_eq!(&recent, &log, "since_seconds 3600");
    let other = w.ok(json!({"cmd": "activity", "account": "other"}));
    assert_eq!(other.as_array().unwrap().len(), 2, "its check and its creation: {other}");

    // One more check just before SIGTERM: shutting down writes it out.
    let last = w.ok(json!({"cmd": "check", "account": "acme", "addr": b, "method": "api_key"}));
    assert_eq!(last["reason"], "terminated");
    w.stop();
    w.start("");
    let after = w.ok(json!({"cmd": "activity", "account": "acme"}));
    let mut want = counted(&log);
    want.insert((b.to_string(), "api_key".to_string(), false, "terminated".to_string()), 1);
    assert_eq!(counted(&after), want, "after the restart:\n{after:#}");
    let audits_after: Vec<&Value> = after.as_array().unwrap().iter().filter(|r| r["kind"] == "audit").collect();
    assert_eq!(audits_after, audits, "the restart changed the audit records");
}

/// Overrides and activity need the support role: a check-only uid is forbidden them; with
/// support it works, and the override and its audit record name that uid.
#[test]
fn support_role_is_needed() {
    let mut w = World::new("socket_mode = 0o666\n[roles]\ncheck = { uids = [65534] }");
    let mode = fs::metadata(w.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "socket mode {mode:o}");
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.10/32"}));
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce"}));
    let root_grant = w.ok(grant("acme", "198.18.0.13/32", 3600))["override"]["id"].clone();

    let support_requests = [
        grant("acme", "198.18.0.11/32", 3600),
        json!({"cmd": "override_list", "account": "acme"}),
        json!({"cmd": "override_list"}),
        json!({"cmd": "override_revoke", "account": "acme", "override_id": root_grant}),
        json!({"cmd": "activity", "account": "acme"}),
        json!({"cmd": "activity", "account": "acme", "denied_only": true, "limit": 1}),
    ];
    let mut nobody = Conn::open_as(&w.socket(), NOBODY);
    // The check role works...
    let c = nobody.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.0.11", "method": "password"}));
    assert_eq!(c["reason"], "address_not_allowed", "{c}");
    // ...support's commands do not.
    for request in &support_requests {
        let (code, message) = nobody.err(request.clone());
        assert_eq!(code, "forbidden", "{request}: {message}");
        assert!(message.contains("65534") && message.contains("support"), "{message}");
    }
    assert_eq!(
        ids(&w.ok(json!({"cmd": "override_list"}))),
        [root_grant.as_i64().unwrap()],
        "a forbidden request changed something"
    );

    w.stop();
    w.start("socket_mode = 0o666\n[roles]\ncheck = { uids = [65534] }\nsupport = { uids = [65534] }");
    let mut nobody = Conn::open_as(&w.socket(), NOBODY);
    let granted = nobody.ok(grant("acme", "198.18.0.11/32", 3600));
    assert_eq!(granted["override"]["operator"], NOBODY, "{granted}");
    let recent = granted["recent_denied"].as_array().unwrap();
    assert!(recent.iter().any(|r| r["address"] == "198.18.0.11" && r["method"] == "password"), "{granted}");
    let id = granted["override"]["id"].clone();
    let listed = nobody.ok(json!({"cmd": "override_list", "account": "acme"}));
    assert_eq!(ids(&listed), [root_grant.as_i64().unwrap(), id.as_i64().unwrap()], "{listed}");
    assert_eq!(listed[0]["operator"], 0, "{listed}");
    assert_eq!(listed[1]["operator"], NOBODY, "{listed}");
    let c = nobody.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.0.11"}));
    assert_eq!(c["reason"], "allowed", "{c}");
    settle(&w, "acme");
    nobody.ok(json!({"cmd": "override_revoke", "account": "acme", "override_id": root_grant}));
    let log = nobody.ok(json!({"cmd": "activity", "account": "acme", "kind": "audit", "limit": 2}));
    let actions: Vec<(&Value, &Value)> =
        log.as_array().unwrap().iter().map(|r| (&r["reason"], &r["detail"]["uid"])).collect();
    let want = [(&json!("override_revoked"), &json!(NOBODY)), (&json!("override_granted"), &json!(NOBODY))];
    assert_eq!(actions, want, "{log:#}");
    // The sign-ins carry the uid that checked.
    let log = nobody.ok(json!({"cmd": "activity", "account": "acme", "kind": "signin"}));
    let signins: Vec<(&Value, &Value, &Value)> =
        log.as_array().unwrap().iter().map(|r| (&r["address"], &r["reason"], &r["uid"])).collect();
    assert!(signins.contains(&(&json!("198.18.0.11"), &json!("allowed"), &json!(NOBODY))), "{log:#}");
    // Support is not admin.
    let (code, _) = nobody.err(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.11/32"}));
    assert_eq!(code, "forbidden");
    let (code, _) = nobody.err(json!({"cmd": "account_state", "account": "acme", "state": "active"}));
    assert_eq!(code, "forbidden");
}

/// Checks and changes taking turns on one connection: every check is counted (a change
/// writes out the checks answered before it, so the lockout guard sees them), and every
/// change has its audit record, newest first.
#[test]
fn activity_counts_every_check_between_changes() {
    const ROUNDS: usize = 300;
    let w = World::new("");
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    let mut conn = w.conn();
    for round in 0..ROUNDS {
        conn.ok(json!({"cmd": "check", "account": "acme", "addr": format!("198.18.1.{}", round % 250)}));
        let mode = ["monitor", "off"][round % 2];
        conn.ok(json!({"cmd": "account_mode", "account": "acme", "mode": mode}));
    }
    let log = w.ok(json!({"cmd": "activity", "account": "acme", "limit": 2 * ROUNDS}));
    let records = log.as_array().unwrap();
    let checks: i64 = records.iter().filter(|r| r["kind"] == "signin").map(|r| r["count"].as_i64().unwrap()).sum();
    assert_eq!(checks, ROUNDS as i64, "checks lost: {log:#}");
    let audits = records.iter().filter(|r| r["kind"] == "audit" && r["reason"] == "mode");
    let modes: Vec<&str> = audits.map(|r| r["detail"]["mode"].as_str().unwrap()).collect();
    let want: Vec<&str> = (0..ROUNDS).rev().map(|round| ["monitor", "off"][round % 2]).collect();
    assert_eq!(modes, want, "audit records lost or out of order: {log:#}");
}

/// Account `cust` owning TCP 7100 on the server, allowing only `good`, in enforce mode; the
/// destination and its server (keep it alive).
fn enforcing_customer(w: &World, good: Ipv4Addr) -> (SocketAddr, TcpServer) {
    let dst = sa(w.hosts.server_v4, 7100);
    let server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
    w.ok(json!({"cmd": "account_add", "account": "cust"}));
    w.ok(
        json!({"cmd": "bind_add", "account": "cust", "addr": dst.ip().to_string(), "port": dst.port(), "proto": "tcp"}),
    );
    w.ok(json!({"cmd": "allow_add", "account": "cust", "cidr": format!("{good}/32")}));
    w.ok(json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "client_ip": good.to_string()}));
    (dst, server)
}

/// An override ends at its expiry on the wire even while no daemon runs: the kernel checks
/// the expiry itself. (The minimum lifetime is lowered to one second for this.)
#[test]
fn override_stops_at_its_expiry_while_the_daemon_is_stopped() {
    let mut w = World::new("min_override_ttl_seconds = 1");
    let (good, locked) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let (dst, _server) = enforcing_customer(&w, good);
    warm_up(&w.hosts, &[good, locked]);
    let granted_at = Instant::now();
    w.ok(json!({"cmd": "override_grant", "account": "cust", "cidr": format!("{locked}/32"),
                "ttl_seconds": 4, "ticket": "T-1", "reason": "test"}));
    assert!(tcp_ok(&w.hosts, locked, dst, OK), "the override does not let the source in");
    w.kill9();
    assert!(tcp_ok(&w.hosts, locked, dst, OK), "the override ended with the daemon");
    thread::sleep(Duration::from_secs(5).saturating_sub(granted_at.elapsed()));
    assert!(!tcp_ok(&w.hosts, locked, dst, FAIL), "the override outlived its expiry with no daemon running");
    assert!(tcp_ok(&w.hosts, good, dst, OK), "the allowlist ended with the override");
    w.start("min_override_ttl_seconds = 1");
    assert_eq!(w.ok(json!({"cmd": "override_list", "account": "cust"})), json!([]));
    assert_check(&w, "cust", locked, "password", false, "address_not_allowed");
}
