//! End to end, the activity log a support agent reads: sign-ins, drops and audit records
//! kept apart; drops and sign-ins counted per hour (address, method, outcome, caller) rather
//! than stored one row each, so a flood of checks or of refused packets grows the store by
//! a few rows; a summary per address and method; checks for unknown accounts counted per
//! address without the names tried; staff's own checks never counted as the customer's.
//!
//! The real `ipaccessd` runs in the server namespace of a [`TestHosts`] pair; requests are raw
//! JSON lines on its control socket, and blocked traffic is real UDP on the veth. Build the
//! binaries first: `cargo build --release -p ipaccess --bins`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipaccess_tests::client::Conn;
use ipaccess_tests::daemon::{World, binaries};
use ipaccess_tests::netns::{UdpEchoServer, icmp_echo, send_udp, udp_client};
use serde_json::{Value, json};

const OK: Duration = Duration::from_secs(2);
/// An application (check role) and a support agent (support role only).
const APP: u32 = 65534;
const AGENT: u32 = 65533;

fn conn(w: &World) -> Conn {
    Conn::open(&w.socket())
}

fn ok(w: &World, request: Value) -> Value {
    conn(w).ok(request)
}

fn check(w: &World, account: &str, addr: &str, method: &str) -> Value {
    ok(w, json!({"cmd": "check", "account": account, "addr": addr, "method": method}))
}

fn rows(v: &Value) -> &Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}"))
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Sign-in rows as (address, method, allowed, reason, count), sorted.
fn signins(list: &Value) -> Vec<(String, String, bool, String, i64)> {
    let mut got: Vec<_> = rows(list)
        .iter()
        .map(|r| {
            assert_eq!(r["kind"], "signin", "{r}");
            (
                r["address"].as_str().unwrap().to_string(),
                r["method"].as_str().unwrap().to_string(),
                r["allowed"].as_bool().unwrap(),
                r["reason"].as_str().unwrap().to_string(),
                r["count"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    got
}

fn s(v: &str) -> String {
    v.to_string()
}

/// Account `cust`, enforcing an allowlist of `good`, owning UDP `port` on the server (an echo
/// server listens there); returns the bound endpoint and the server.
fn enforcing_customer(w: &World, good: Ipv4Addr, port: u16) -> (SocketAddr, UdpEchoServer) {
    let dst = SocketAddr::new(w.hosts.server_v4.into(), port);
    let server = UdpEchoServer::start_in(&w.hosts.server, dst).unwrap();
    ok(w, json!({"cmd": "account_add", "account": "cust"}));
    ok(w, json!({"cmd": "bind_add", "account": "cust", "addr": dst.ip().to_string(), "port": port, "proto": "udp"}));
    ok(w, json!({"cmd": "allow_add", "account": "cust", "cidr": format!("{good}/32")}));
    ok(w, json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "force": true}));
    (dst, server)
}

/// Blocked traffic for a few seconds and a few denied sign-ins: `--kind` keeps them apart,
/// the sign-ins stay in view under `--denied`, and the drops come counted per source and
/// destination endpoint, not one row per sampled packet.
#[test]
fn drops_are_counted_per_endpoint_and_signins_stay_in_view() {
    let w = World::new("drop_samples_per_second = 50");
    let (good, bad) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let (dst, _server) = enforcing_customer(&w, good, 7300);
    let server = IpAddr::from(w.hosts.server_v4);
    for src in [good, bad] {
        assert!(w.hosts.client.run(move || icmp_echo(src.into(), server, OK)), "ping from {src}");
    }
    let (b, g) = (bad.to_string(), good.to_string());
    for method in ["password", "password", "api_key"] {
        assert_eq!(check(&w, "cust", &b, method)["reason"], "address_not_allowed");
    }
    assert_eq!(check(&w, "cust", &g, "password")["reason"], "allowed");

    // About 4 s of refused datagrams from `bad` (hundreds of samples at 50 a second per CPU).
    let sock = udp_client(&w.hosts.client, bad.into(), dst);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        send_udp(&sock, b"blocked", 64);
        thread::sleep(Duration::from_millis(50));
    }
    // Samples are drained each second: wait until the count stops growing.
    let drops = |w: &World| ok(w, json!({"cmd": "activity", "account": "cust", "kind": "drop"}));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = -1;
    let list = loop {
        thread::sleep(Duration::from_millis(1500));
        let list = drops(&w);
        let total: i64 = rows(&list).iter().map(|r| r["count"].as_i64().unwrap()).sum();
        if (total == last && total > 0) || Instant::now() > deadline {
            break list;
        }
        last = total;
    };
    // One row per (hour, source, destination endpoint, reason): one, or two across an hour.
    let drop_rows = rows(&list);
    assert!((1..=2).contains(&drop_rows.len()), "drops are not counted per endpoint: {list:#}");
    let mut total = 0;
    for r in drop_rows {
        assert_eq!(
            (&r["kind"], &r["address"], &r["reason"]),
            (&json!("drop"), &json!(b), &json!("address_not_allowed")),
            "{r}"
        );
        assert_eq!(r["allowed"], false, "{r}");
        let d = &r["detail"];
        assert_eq!(
            (&d["destination"], &d["protocol"], &d["port"]),
            (&json!(server.to_string()), &json!(17), &json!(7300)),
            "{r}"
        );
        assert!(r["first_seen"].as_i64().unwrap() <= r["time"].as_i64().unwrap(), "{r}");
        total += r["count"].as_i64().unwrap();
    }
    assert!(total > 10, "only {total} drops counted after 4 s of blocked traffic: {list:#}");

    // The sign-ins are apart, and in view: `--denied` is not crowded out by drops.
    let denied_signins = ok(&w, json!({"cmd": "activity", "account": "cust", "kind": "signin", "denied_only": true}));
    assert_eq!(
        signins(&denied_signins),
        [
            (b.clone(), s("api_key"), false, s("address_not_allowed"), 1),
            (b.clone(), s("password"), false, s("address_not_allowed"), 2)
        ],
        "{denied_signins:#}"
    );
    let denied = ok(&w, json!({"cmd": "activity", "account": "cust", "denied_only": true, "limit": 10}));
    let kinds: Vec<&str> = rows(&denied).iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "signin").count(), 2, "{denied:#}");
    assert!(kinds.iter().all(|k| *k != "audit") && kinds.contains(&"drop"), "{denied:#}");
    // Audit records under their own kind, with the operator's uid.
    let audit = ok(&w, json!({"cmd": "activity", "account": "cust", "kind": "audit"}));
    assert!(rows(&audit).iter().all(|r| r["kind"] == "audit" && r["uid"] == 0), "{audit:#}");
    assert!(rows(&audit).iter().any(|r| r["reason"] == "mode"), "{audit:#}");
    let all = ok(&w, json!({"cmd": "activity", "account": "cust"}));
    let times: Vec<i64> = rows(&all).iter().map(|r| r["time"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|t| t[0] >= t[1]), "not newest first: {all:#}");

    // The same through ipaccessctl.
    let ctl = |args: &[&str]| {
        let out = Command::new(&binaries().ctl).arg("--socket").arg(w.socket()).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = ctl(&["activity", "cust", "--kind", "drop"]);
    assert!(table.lines().next().unwrap().starts_with("LAST SEEN"), "{table}");
    assert!(
        table.lines().any(|l| l.contains(" drop ") && l.contains(&b) && l.contains(&format!("{server}:7300/udp"))),
        "{table}"
    );
    let table = ctl(&["activity", "cust", "--kind", "signin", "--denied"]);
    assert_eq!(table.lines().count(), 3, "{table}");
}

/// `summary` gives an account's sign-ins per (address, method, outcome), with counts and
/// first and last seen; allowed and denied apart.
#[test]
fn summary_per_address_and_method() {
    let w = World::new("");
    ok(&w, json!({"cmd": "account_add", "account": "acme"}));
    ok(&w, json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.0/24"}));
    ok(&w, json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    let before = now();
    for (addr, method, n) in
        [("198.18.0.7", "password", 3), ("198.18.0.7", "api_key", 1), ("198.18.5.5", "password", 2)]
    {
        for _ in 0..n {
            check(&w, "acme", addr, method);
        }
    }
    let summary = ok(&w, json!({"cmd": "activity", "account": "acme", "summary": true}));
    let mut got: Vec<(String, String, bool, i64)> = rows(&summary)
        .iter()
        .map(|r| {
            let (first, last) = (r["first_seen"].as_i64().unwrap(), r["last_seen"].as_i64().unwrap());
            assert!(before <= first && first <= last && last <= now(), "{r}");
            assert_eq!(r["application"], true, "{r}");
            (
                s(r["address"].as_str().unwrap()),
                s(r["method"].as_str().unwrap()),
                r["allowed"].as_bool().unwrap(),
                r["count"].as_i64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (s("198.18.0.7"), s("api_key"), true, 1),
            (s("198.18.0.7"), s("password"), true, 3),
            (s("198.18.5.5"), s("password"), false, 2)
        ],
        "{summary:#}"
    );
    let denied = ok(&w, json!({"cmd": "activity", "account": "acme", "summary": true, "denied_only": true}));
    assert_eq!(rows(&denied).len(), 1, "{denied:#}");
    assert_eq!((&denied[0]["reason"], &denied[0]["count"]), (&json!("address_not_allowed"), &json!(2)));
    // A summary is of sign-ins: another kind is a clear error.
    let code = conn(&w).err(json!({"cmd": "activity", "account": "acme", "summary": true, "kind": "drop"})).0;
    assert_eq!(code, "bad_request");
}

/// Monitor mode's would-be denials (allowed, reason `monitor_would_deny`) are under
/// `denied_only`, as its help says.
#[test]
fn monitor_would_be_denials_are_under_denied() {
    let w = World::new("");
    ok(&w, json!({"cmd": "account_add", "account": "mon"}));
    ok(&w, json!({"cmd": "allow_add", "account": "mon", "cidr": "198.18.0.0/24"}));
    ok(&w, json!({"cmd": "account_mode", "account": "mon", "mode": "monitor"}));
    let c = check(&w, "mon", "198.18.9.9", "sso");
    assert_eq!((&c["allowed"], &c["reason"]), (&json!(true), &json!("monitor_would_deny")), "{c}");
    check(&w, "mon", "198.18.0.1", "sso");
    let denied = ok(&w, json!({"cmd": "activity", "account": "mon", "denied_only": true}));
    assert_eq!(signins(&denied), [(s("198.18.9.9"), s("sso"), true, s("monitor_would_deny"), 1)], "{denied:#}");
    let summary = ok(&w, json!({"cmd": "activity", "account": "mon", "summary": true, "denied_only": true}));
    assert_eq!(rows(&summary).len(), 1, "{summary:#}");
    assert_eq!(summary[0]["reason"], "monitor_would_deny", "{summary:#}");
}

/// A burst of 20,000 checks over 4 addresses and 2 methods adds a handful of rows, and
/// every check is in their counts.
#[test]
fn a_burst_of_checks_adds_a_few_rows_and_counts_them_all() {
    const N: usize = 20_000;
    let w = World::new("");
    ok(&w, json!({"cmd": "account_add", "account": "busy"}));
    ok(&w, json!({"cmd": "allow_add", "account": "busy", "cidr": "198.18.0.0/30"}));
    ok(&w, json!({"cmd": "account_mode", "account": "busy", "mode": "enforce", "force": true}));
    let lines: Vec<String> = (0..N)
        .map(|i| {
            let (addr, method) = (format!("198.18.0.{}", i % 4 * 2), ["password", "api_key"][i / 4 % 2]);
            format!(
                "{{\"id\":{i},\"cmd\":\"check\",\"account\":\"busy\",\"addr\":\"{addr}\",\"method\":\"{method}\"}}\n"
            )
        })
        .collect();
    let senders: Vec<_> = lines
        .chunks(N / 4)
        .map(|part| {
            let (part, socket) = (part.to_vec(), w.socket());
            thread::spawn(move || Conn::open(&socket).pipelined(&part))
        })
        .collect();
    let answered: usize = senders.into_iter().map(|s| s.join().unwrap()).sum();
    assert_eq!(answered, N);
    let list = ok(&w, json!({"cmd": "activity", "account": "busy", "kind": "signin", "limit": 1000}));
    // 4 addresses x 2 methods, each allowed or denied by its address: 8 rows (16 across an hour).
    let n_rows = rows(&list).len();
    assert!(n_rows == 8 || n_rows == 16, "{n_rows} rows for {N} checks: {list:#}");
    let counted: i64 = rows(&list).iter().map(|r| r["count"].as_i64().unwrap()).sum();
    assert_eq!(counted, N as i64, "{list:#}");
    let summary = ok(&w, json!({"cmd": "activity", "account": "busy", "summary": true}));
    assert_eq!(rows(&summary).len(), 8, "{summary:#}");
    for r in rows(&summary) {
        assert_eq!(r["count"], N / 8, "{r}");
        let allowed = ["198.18.0.0", "198.18.0.2"].contains(&r["address"].as_str().unwrap());
        assert_eq!(r["allowed"], allowed, "{r}");
    }
}

/// `GET /metrics` from inside the server namespace: `name{labels}` -> value.
fn scrape(w: &World, listen: &str) -> BTreeMap<String, f64> {
    let addr: SocketAddr = listen.parse().unwrap();
    let response = w.hosts.server.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, OK).expect("connect to the metrics endpoint");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response
    });
    response
        .lines()
        .filter(|l| l.starts_with("ipaccess_"))
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_string(), v.parse().unwrap())))
        .collect()
}

/// Credential stuffing: checks for 600 invented names from two addresses are counted (in
/// the metric and per address) but leave no row under any name.
#[test]
fn unknown_accounts_are_counted_per_address_not_per_name() {
    const LISTEN: &str = "127.0.0.1:9471";
    let w = World::new(&format!("[metrics]\nlisten = \"{LISTEN}\""));
    let before = scrape(&w, LISTEN)["ipaccess_checks_total{reason=\"unknown_account\"}"];
    let lines: Vec<String> = (0..600)
        .map(|i| {
            let addr = ["198.18.66.6", "198.18.77.7"][i % 2];
            format!("{{\"cmd\":\"check\",\"account\":\"victim-{i}\",\"addr\":\"{addr}\"}}\n")
        })
        .collect();
    assert_eq!(conn(&w).pipelined(&lines), 600);
    let summary = ok(&w, json!({"cmd": "activity", "unknown_accounts": true}));
    let got: Vec<(&str, &str, i64)> = rows(&summary)
        .iter()
        .map(|r| (r["address"].as_str().unwrap(), r["method"].as_str().unwrap(), r["count"].as_i64().unwrap()))
        .collect();
    let mut got = got;
    got.sort();
    assert_eq!(got, [("198.18.66.6", "password", 300), ("198.18.77.7", "password", 300)], "{summary:#}");
    let after = scrape(&w, LISTEN)["ipaccess_checks_total{reason=\"unknown_account\"}"];
    assert_eq!(after - before, 600.0);
    // No name was kept: each is an unknown account with no history.
    for name in ["victim-0", "victim-599"] {
        assert_eq!(conn(&w).err(json!({"cmd": "activity", "account": name})).0, "unknown_account");
    }
    // An account and unknown_accounts at once is a clear error.
    let code = conn(&w).err(json!({"cmd": "activity", "account": "x", "unknown_accounts": true})).0;
    assert_eq!(code, "bad_request");
}

/// A support agent's dry-run checks record nothing; an application's checks carry its uid;
/// the override grant's `recent_denied` holds only the application's attempts; an agent's
/// allowed check does not count as the entry's last sign-in, an application's does.
#[test]
fn staff_checks_are_not_the_customers_and_dry_runs_record_nothing() {
    let roles = format!("socket_mode = 0o666\n[roles]\ncheck = {{ uids = [{APP}] }}\nsupport = {{ uids = [{AGENT}] }}");
    let w = World::new(&roles);
    ok(&w, json!({"cmd": "account_add", "account": "acme"}));
    ok(&w, json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.0/24"}));
    ok(&w, json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    let mut agent = Conn::open_as(&w.socket(), AGENT);
    let mut app = Conn::open_as(&w.socket(), APP);
    for _ in 0..3 {
        let c = agent.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.40.4", "dry_run": true}));
        assert_eq!(c["reason"], "address_not_allowed", "{c}");
    }
    // Support may record a check too; it is recorded as the agent's, never as the customer's.
    agent.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.40.4"}));
    for _ in 0..2 {
        app.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.50.5", "method": "api_key"}));
    }
    let granted = agent.ok(json!({"cmd": "override_grant", "account": "acme", "cidr": "198.18.50.5/32",
                                  "ttl_seconds": 3600, "ticket": "T-7", "reason": "verified"}));
    let recent = &granted["recent_denied"];
    assert_eq!(rows(recent).len(), 1, "{granted:#}");
    assert_eq!(
        (&recent[0]["address"], &recent[0]["method"], &recent[0]["count"]),
        (&json!("198.18.50.5"), &json!("api_key"), &json!(2))
    );
    let log = agent.ok(json!({"cmd": "activity", "account": "acme", "kind": "signin"}));
    assert_eq!(rows(&log).len(), 2, "{log:#}");
    let row = |addr: &str| rows(&log).iter().find(|r| r["address"] == addr).unwrap_or_else(|| panic!("{log:#}"));
    let (app_row, agent_row) = (row("198.18.50.5"), row("198.18.40.4"));
    assert_eq!((&app_row["uid"], &app_row["detail"]["application"]), (&json!(APP), &json!(true)), "{log:#}");
    // One recorded check by the agent; its three dry runs left nothing.
    assert_eq!((&agent_row["uid"], &agent_row["detail"]["application"]), (&json!(AGENT), &json!(false)), "{log:#}");
    assert_eq!(agent_row["count"], 1, "a dry run was recorded: {log:#}");
    let audit = agent.ok(json!({"cmd": "activity", "account": "acme", "kind": "audit", "limit": 1}));
    assert_eq!((&audit[0]["reason"], &audit[0]["uid"]), (&json!("override_granted"), &json!(AGENT)), "{audit:#}");

    let last_signin = |conn: &mut Conn| {
        let list = conn.ok(json!({"cmd": "allow_list", "account": "acme"}));
        let entry = rows(&list).iter().find(|e| e["cidr"] == "198.18.0.0/24").cloned();
        entry.unwrap_or_else(|| panic!("{list:#}"))["last_signin_at"].clone()
    };
    let allowed = agent.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.0.7"}));
    assert_eq!(allowed["reason"], "allowed", "{allowed}");
    assert_eq!(last_signin(&mut agent), Value::Null, "the agent's check counted as the customer's sign-in");
    app.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.0.7", "method": "password"}));
    assert!(last_signin(&mut agent).is_i64(), "the application's sign-in was not credited to its entry");
}

/// `activity` for an account that never existed is `unknown_account`, not an empty list;
/// an existing account with nothing recorded yet is an empty list; a removed account's
/// history can still be read.
#[test]
fn activity_of_an_unknown_account_is_an_error() {
    let w = World::new("");
    assert_eq!(conn(&w).err(json!({"cmd": "activity", "account": "nosuch"})).0, "unknown_account");
    assert_eq!(conn(&w).err(json!({"cmd": "activity", "account": "nosuch", "summary": true})).0, "unknown_account");
    assert_eq!(conn(&w).err(json!({"cmd": "activity"})).0, "bad_request");
    ok(&w, json!({"cmd": "account_add", "account": "quiet"}));
    // No sign-in yet: an empty list, not an error.
    let quiet = ok(&w, json!({"cmd": "activity", "account": "quiet", "kind": "signin"}));
    assert_eq!(quiet, json!([]));
    // A removed account keeps its history, and it can still be read.
    ok(&w, json!({"cmd": "account_add", "account": "gone"}));
    check(&w, "gone", "198.18.3.3", "password");
    ok(&w, json!({"cmd": "account_remove", "account": "gone"}));
    let history = ok(&w, json!({"cmd": "activity", "account": "gone", "kind": "signin"}));
    assert_eq!(signins(&history), [(s("198.18.3.3"), s("password"), true, s("allowed"), 1)], "{history:#}");
    let out =
        Command::new(&binaries().ctl).arg("--socket").arg(w.socket()).args(["activity", "nosuch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_account"), "{out:?}");
}
