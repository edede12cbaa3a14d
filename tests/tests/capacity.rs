//! Allowlist capacity against the real daemon, its socket, its CLI and its kernel maps: the
//! per-account entry limit (`[limits] max_entries_per_account`) on every path that adds
//! entries, a limit lowered by a reload, full kernel tables, and the metric that counts
//! both refusals.
//!
//! Build the binaries first: `cargo build --release -p ipaccess --bins`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ipaccess_tests::client::Client;
use ipaccess_tests::daemon::{Daemon, Launch, READY, World};
use serde_json::{Value, json};

const LISTEN: &str = "127.0.0.1:9469";

fn config(max_entries: u32) -> String {
    format!("[limits]\nmax_entries_per_account = {max_entries}\n[metrics]\nlisten = \"{LISTEN}\"\n")
}

/// `GET /metrics` from inside the daemon's namespace, as `name{labels}` → value.
fn scrape(w: &World) -> BTreeMap<String, f64> {
    let addr: SocketAddr = LISTEN.parse().unwrap();
    let body = w.hosts.server.run(move || {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to /metrics");
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        response[response.find("\r\n\r\n").unwrap() + 4..].to_string()
    });
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap())
        })
        .collect()
}

fn refused(w: &World, reason: &str) -> f64 {
    let series = format!("ipaccess_changes_refused_total{{reason=\"{reason}\"}}");
    let metrics = scrape(w);
    *metrics.get(&series).unwrap_or_else(|| panic!("no {series} in {metrics:#?}"))
}

/// The account's allowlist as CIDR texts.
fn cidrs(w: &World, account: &str) -> Vec<String> {
    let list = w.ok(json!({"cmd": "allow_list", "account": account}));
    list.as_array().unwrap().iter().map(|e| e["cidr"].as_str().unwrap().to_string()).collect()
}

fn entries(cidrs: &[&str]) -> Value {
    cidrs.iter().map(|c| json!({"cidr": c})).collect()
}

/// `ipaccessctl --socket S ARGS`: (exit code, stdout, stderr).
fn ctl(w: &World, args: &[&str]) -> (i32, String, String) {
    let out = w.ctl(args);
    (out.code, out.stdout, out.stderr)
}

/// Adding, replacing and importing stop at the limit, each with `too_many_entries`, a message
/// naming the account and nothing applied; disabled entries count, overrides do not; each
/// refusal is counted in the metric.
#[test]
fn the_entry_limit_holds_on_add_replace_and_import() {
    let w = World::new(&config(3));
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    for cidr in ["198.18.0.0/24", "198.18.1.0/24"] {
        w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr}));
    }
    // The third through the real CLI; the fourth refused by it, with the code on stderr.
    let (code, _, stderr) = ctl(&w, &["allow", "add", "acme", "198.18.2.7"]);
    assert_eq!(code, 0, "{stderr}");
    let (code, stdout, stderr) = ctl(&w, &["allow", "add", "acme", "198.18.3.7"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("(too_many_entries)"), "{stderr}");
    assert!(stderr.contains("acme's allowlist would have 4 entries; the limit is 3"), "{stderr}");
    let (code, stdout, _) = ctl(&w, &["--json", "allow", "add", "acme", "198.18.3.7"]);
    assert_eq!(code, 2);
    let error: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(error["code"], "too_many_entries", "{error}");
    assert_eq!(
        error["details"],
        json!({"account": "acme", "entries": 4, "limit": "limits.max_entries_per_account", "max": 3})
    );
    // A retried add of an entry it has is still `entry_exists`, as clients rely on.
    assert_eq!(w.err(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.0/24"})).0, "entry_exists");
    // A disabled entry still counts.
    w.ok(json!({"cmd": "allow_disable", "account": "acme", "cidr": "198.18.1.0/24"}));
    let (code, message) = w.err(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.4.0/24"}));
    assert_eq!(code, "too_many_entries", "{message}");
    assert_eq!(cidrs(&w, "acme"), ["198.18.0.0/24", "198.18.1.0/24", "198.18.2.7/32"]);
    assert_eq!(refused(&w, "too_many_entries"), 3.0);
    assert_eq!(refused(&w, "tables_full"), 0.0);

    // An override is not an entry: support can still let an address in.
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    w.ok(json!({"cmd": "override_grant", "account": "acme", "cidr": "198.18.9.9", "ttl_seconds": 3600,
                "ticket": "T-1", "reason": "at the limit"}));

    // A replacement is the whole list: four are refused, and the list is as it was.
    let four = entries(&["198.18.5.0/24", "198.18.6.0/24", "198.18.7.0/24", "198.18.8.0/24"]);
    let (code, message) = w.err(json!({"cmd": "allow_replace", "account": "acme", "entries": four, "force": true}));
    assert_eq!(code, "too_many_entries", "{message}");
    assert_eq!(cidrs(&w, "acme"), ["198.18.0.0/24", "198.18.1.0/24", "198.18.2.7/32"]);
    let three = entries(&["198.18.5.0/24", "198.18.6.0/24", "198.18.5.0/24", "198.18.7.0/24"]);
    w.ok(json!({"cmd": "allow_replace", "account": "acme", "entries": three, "force": true}));
    assert_eq!(cidrs(&w, "acme"), ["198.18.5.0/24", "198.18.6.0/24", "198.18.7.0/24"]);

    // An import is one change: an account over the limit refuses the whole request, the
    // account created before it in the same request included.
    let import = json!({"cmd": "import", "accounts": [
        {"account": "fresh", "entries": entries(&["198.19.0.0/24"])},
        {"account": "acme", "entries": four},
    ]});
    let reply = w.conn().request(import);
    assert_eq!(reply["error"]["code"], "too_many_entries", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().starts_with("account acme: "), "{reply}");
    assert_eq!(reply["error"]["details"]["account"], "acme", "{reply}");
    assert_eq!(w.err(json!({"cmd": "allow_list", "account": "fresh"})).0, "unknown_account");
    assert_eq!(cidrs(&w, "acme"), ["198.18.5.0/24", "198.18.6.0/24", "198.18.7.0/24"]);
    // The CLI names the file's line.
    let file = w.dir.0.join("import.jsonl");
    std::fs::write(
        &file,
        "{\"account\": \"fresh\", \"entries\": [{\"cidr\": \"198.19.0.0/24\"}]}\n\
         {\"account\": \"new\", \"entries\": [{\"cidr\": \"198.19.1.0/24\"}, {\"cidr\": \"198.19.2.0/24\"}, \
         {\"cidr\": \"198.19.3.0/24\"}, {\"cidr\": \"198.19.4.0/24\"}]}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = ctl(&w, &["import", file.to_str().unwrap()]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("line 2 (account new)") && stderr.contains("(too_many_entries)"), "{stderr}");
    assert!(stderr.contains("nothing was imported"), "{stderr}");
    assert_eq!(w.err(json!({"cmd": "allow_list", "account": "fresh"})).0, "unknown_account");
    assert_eq!(refused(&w, "too_many_entries"), 6.0);
    // Still enforced as before.
    assert_eq!(w.check("acme", [198, 18, 6, 1], "password")["reason"], "allowed");
    assert_eq!(w.check("acme", [198, 18, 0, 1], "password")["reason"], "address_not_allowed");
}

/// A limit lowered by a reload removes nothing: the account keeps every entry, enforced; it
/// may not grow, but it may shrink.
#[test]
fn a_lowered_limit_keeps_every_entry() {
    let w = World::new(&config(5));
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    let four = ["198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24", "198.18.3.0/24"];
    w.ok(json!({"cmd": "allow_replace", "account": "acme", "entries": entries(&four)}));
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    std::fs::write(w.config_path(), format!("{}\n{}", config(2), ipaccess_tests::daemon::TEST_MAPS)).unwrap();
    let log = w.reload();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert_eq!(cidrs(&w, "acme"), four);
    for addr in [[198, 18, 0, 1], [198, 18, 3, 1]] {
        assert_eq!(w.check("acme", addr, "password")["reason"], "allowed", "{addr:?}");
    }
    let (code, message) = w.err(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.4.0/24"}));
    assert_eq!(code, "too_many_entries", "{message}");
    assert!(message.contains("the limit is 2"), "{message}");
    // Same length, then shorter: accepted; longer again: refused.
    let swapped = ["198.18.0.0/24", "198.18.1.0/24", "198.18.2.0/24", "198.18.9.0/24"];
    w.ok(json!({"cmd": "allow_replace", "account": "acme", "entries": entries(&swapped), "force": true}));
    w.ok(json!({"cmd": "allow_replace", "account": "acme", "entries": entries(&four[..3]), "force": true}));
    let (code, _) = w.err(json!({"cmd": "allow_replace", "account": "acme", "entries": entries(&four), "force": true}));
    assert_eq!(code, "too_many_entries");
    // A dry run of it says so, and changes nothing either.
    let plan = w.ok(json!({"cmd": "allow_replace", "account": "acme", "entries": entries(&four), "dry_run": true}));
    assert_eq!(plan["dry_run"]["refused"]["code"], "too_many_entries", "{plan}");
    assert_eq!(cidrs(&w, "acme"), four[..3]);
    assert_eq!(refused(&w, "too_many_entries"), 2.0);
}

/// Kernel tables too small for what is asked: `tables_full` for an add and an import, nothing
/// changed in the store or the kernel, the daemon answering, and the metric counting both.
#[test]
fn full_kernel_tables_refuse_with_tables_full_and_count_it() {
    let w = World::with_maps(&config(100_000), "[maps]\nslots = 4096\naccounts = 64\n");
    w.ok(json!({"cmd": "account_add", "account": "acme"}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.7"}));
    w.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    // Host entries one at a time until the tables have no room for the next.
    let mut added = vec!["198.18.0.7/32".to_string()];
    let full = (1..4096u32).find_map(|n| {
        let cidr = format!("fd00::{n:x}/128");
        match w.conn().request(json!({"cmd": "allow_add", "account": "acme", "cidr": cidr})) {
            reply if reply.get("ok").is_some() => {
                added.push(cidr);
                None
            }
            reply => Some((cidr, reply)),
        }
    });
    let (cidr, reply) = full.expect("4096 slots take fewer than 4096 entries");
    assert_eq!(reply["error"]["code"], "tables_full", "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("raise `slots`"), "{reply}");
    let mut listed = cidrs(&w, "acme");
    listed.sort();
    added.sort();
    assert_eq!(listed, added, "{cidr} was refused but listed");
    // An import that does not fit leaves nothing of itself either.
    let many: Vec<String> = (0..2048u32).map(|n| format!("fd01::{n:x}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let reply = w.conn().request(json!({"cmd": "import", "accounts": [
        {"account": "other", "entries": entries(&["198.19.0.0/24"])},
        {"account": "big", "entries": entries(&many)},
    ]}));
    assert_eq!(reply["error"]["code"], "tables_full", "{reply}");
    assert_eq!(w.err(json!({"cmd": "allow_list", "account": "other"})).0, "unknown_account");
    assert_eq!(refused(&w, "tables_full"), 2.0);
    assert_eq!(refused(&w, "too_many_entries"), 0.0);
    let status = w.ok(json!({"cmd": "status"}));
    assert_eq!(status["table_slots"], 4096, "{status}");
    assert!(status["table_slots_used"].as_u64().unwrap() <= 4096, "{status}");
    let metrics = scrape(&w);
    assert_eq!(metrics["ipaccess_table_slots"], 4096.0);
    assert_eq!(metrics["ipaccess_table_slots_used"], status["table_slots_used"].as_f64().unwrap());
    // The kernel still enforces what it had.
    assert_eq!(w.check("acme", [198, 18, 0, 7], "password")["reason"], "allowed");
    assert_eq!(w.check("acme", [198, 18, 0, 8], "password")["reason"], "address_not_allowed");
    // And room made is room to use.
    w.ok(json!({"cmd": "allow_remove", "account": "acme", "cidr": added.last().unwrap(), "force": true}));
    w.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.8"}));
}

/// More accounts than the kernel's account maps hold: the next `account_add` (and an import
/// of new accounts) is refused with `tables_full` and what to raise, nothing is stored, and
/// an account removed makes room for one more.
#[test]
fn full_account_maps_refuse_a_new_account_with_tables_full() {
    let w = World::with_maps(&config(1_000), "[maps]\nslots = 4096\naccounts = 8\n");
    for n in 1..8 {
        w.ok(json!({"cmd": "account_add", "account": format!("a{n}")}));
    }
    let (code, message) = w.err(json!({"cmd": "account_add", "account": "a8"}));
    assert_eq!(code, "tables_full", "{message}");
    assert!(message.contains("hold 7 accounts") && message.contains("raise `accounts`"), "{message}");
    let reply = w.conn().request(json!({"cmd": "import", "accounts": [
        {"account": "b1", "entries": entries(&["198.19.0.0/24"])},
    ]}));
    assert_eq!(reply["error"]["code"], "tables_full", "{reply}");
    let listed = w.ok(json!({"cmd": "account_list"}));
    assert_eq!(listed.as_array().unwrap().len(), 7, "{listed}");
    assert_eq!(refused(&w, "tables_full"), 2.0);
    w.ok(json!({"cmd": "account_remove", "account": "a3"}));
    w.ok(json!({"cmd": "account_add", "account": "a8"}));
}

/// `ipaccessd ARGS` in `w`'s namespace on its configuration, state and bpffs, without
/// waiting to be asked anything: its exit status (it must exit) and its log.
fn run_daemon(w: &World, extra: &[&str], log: &str) -> (bool, String) {
    let mut args = w.daemon_args();
    if extra.contains(&"--detach-all") {
        // It finds the interfaces itself; naming one is refused.
        let iface = args.iter().position(|a| a == "--iface").unwrap();
        args.drain(iface..iface + 2);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut daemon = Daemon::spawn(w.hosts.server.name(), &Launch::default(), &args, &w.dir.0.join(log));
    let status = daemon.wait_exit(READY).unwrap_or_else(|| panic!("ipaccessd {extra:?} did not exit"));
    (status.success(), daemon.log_text())
}

/// The maps outlive the daemon, so `[maps]` sizes apply only to new ones. A store with more
/// accounts than the maps a start made (a failed first start on sizes too small) is refused;
/// raising the size alone is refused again, as the small maps are reused, and the refusal
/// now says so and how to make new maps. Doing what it says starts the daemon with them.
#[test]
fn a_raised_map_size_that_cannot_apply_says_how_to_make_new_maps() {
    const ROOMY: &str = "[maps]\nslots = 4096\naccounts = 64\n";
    let mut w = World::with_maps(&config(1_000), ROOMY);
    for n in 1..=10 {
        w.ok(json!({"cmd": "account_add", "account": format!("a{n}")}));
    }
    w.stop();
    let pins = w.bpffs.path().join("ipaccess");
    let make_new_maps = |w: &World| {
        let (ok, log) = run_daemon(w, &["--detach-all"], "detach.log");
        assert!(ok, "--detach-all failed:\n{log}");
        std::fs::remove_dir_all(&pins).unwrap();
    };
    make_new_maps(&w);
    // Maps made at a start that finds them too small for the store: the start is refused.
    std::fs::write(w.config_path(), format!("{}\n[maps]\nslots = 4096\naccounts = 8\n", config(1_000))).unwrap();
    let (ok, log) = run_daemon(&w, &[], "small.log");
    assert!(!ok && log.contains("hold 7 accounts") && log.contains("raise `accounts`"), "{log}");
    assert!(!log.contains("were made with"), "the maps were made with the configured sizes:\n{log}");
    // Raised, but the small maps are pinned: refused again, saying why and what to do.
    std::fs::write(w.config_path(), format!("{}\n{ROOMY}", config(1_000))).unwrap();
    let (ok, log) = run_daemon(&w, &[], "raised.log");
    assert!(!ok, "{log}");
    for needed in ["were made with 4096 slots and 8 accounts", "asks for 4096 and 64", "--detach-all", "v1"] {
        assert!(log.contains(needed), "the refusal does not say {needed:?}:\n{log}");
    }
    make_new_maps(&w);
    w.start_with_maps(&config(1_000), ROOMY);
    assert_eq!(w.ok(json!({"cmd": "account_list"})).as_array().unwrap().len(), 10);
    assert_eq!(w.ok(json!({"cmd": "status"}))["table_slots"], 4096);
}

/// Support's live overrides on one account stop at `[limits] max_overrides_per_account`: the
/// next grant gets `too_many_overrides` (over the socket and through the CLI), with details
/// and nothing stored or enforced; expired and revoked overrides make room, another account
/// counts its own, a lowered limit revokes nothing, and the metric counts each refusal.
#[test]
fn support_overrides_stop_at_the_per_account_limit() {
    let config = |max: u32| {
        format!(
            "min_override_ttl_seconds = 1\n[limits]\nmax_overrides_per_account = {max}\n[metrics]\nlisten = \"{LISTEN}\"\n"
        )
    };
    let w = World::new(&config(3));
    for account in ["acme", "beta"] {
        w.ok(json!({"cmd": "account_add", "account": account}));
        w.ok(json!({"cmd": "allow_add", "account": account, "cidr": "198.18.0.7"}));
        w.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce", "force": true}));
    }
    let grant = |account: &str, cidr: &str, ttl: u64| {
        w.conn().request(json!({"cmd": "override_grant", "account": account, "cidr": cidr, "ttl_seconds": ttl,
                                "ticket": "T-1", "reason": "locked out"}))
    };
    let live = |account: &str| w.ok(json!({"cmd": "override_list", "account": account})).as_array().unwrap().len();
    // One that ends within a second or two, then three that last.
    assert!(grant("acme", "198.18.1.9", 1).get("ok").is_some());
    std::thread::sleep(Duration::from_millis(2100));
    for n in 1..=3 {
        let reply = grant("acme", &format!("198.18.1.{n}"), 3600);
        assert!(reply.get("ok").is_some(), "grant {n}: {reply}");
    }
    let reply = grant("acme", "198.18.1.4", 3600);
    assert_eq!(reply["error"]["code"], "too_many_overrides", "{reply}");
    assert_eq!(
        reply["error"]["details"],
        json!({"account": "acme", "overrides": 4, "limit": "limits.max_overrides_per_account", "max": 3})
    );
    assert!(reply["error"]["message"].as_str().unwrap().contains("revoke one first"), "{reply}");
    assert_eq!(live("acme"), 3);
    assert_eq!(w.check("acme", [198, 18, 1, 4], "password")["reason"], "address_not_allowed");
    assert_eq!(w.check("acme", [198, 18, 1, 3], "password")["reason"], "allowed");
    // The CLI shows the code.
    let args = ["override", "grant", "acme", "198.18.1.4", "--ttl", "1h", "--ticket", "T-1", "--reason", "locked out"];
    let (code, stdout, stderr) = ctl(&w, &args);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("(too_many_overrides)") && stderr.contains("acme would have 4 live overrides"), "{stderr}");
    // Another account counts its own.
    assert!(grant("beta", "198.18.1.4", 3600).get("ok").is_some());
    // A revoked override makes room.
    let first = w.ok(json!({"cmd": "override_list", "account": "acme"}))[0]["id"].clone();
    w.ok(json!({"cmd": "override_revoke", "account": "acme", "override_id": first}));
    assert!(grant("acme", "198.18.1.4", 3600).get("ok").is_some());
    assert_eq!(refused(&w, "too_many_overrides"), 2.0);
    assert_eq!(refused(&w, "tables_full"), 0.0);

    // A lowered limit revokes nothing, and refuses the next grant.
    std::fs::write(w.config_path(), format!("{}\n{}", config(1), ipaccess_tests::daemon::TEST_MAPS)).unwrap();
    let log = w.reload();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert_eq!(live("acme"), 3);
    assert_eq!(w.check("acme", [198, 18, 1, 4], "password")["reason"], "allowed");
    let reply = grant("acme", "198.18.1.5", 3600);
    assert_eq!(reply["error"]["details"]["max"], 1, "{reply}");
}

/// Live overrides on all accounts together stop at `[limits] max_overrides`, whatever the
/// per-account limit: support granting one address to account after account cannot fill
/// the tables every account shares. The refused grant is neither stored nor enforced; a
/// revocation on any account makes room, and a reload raises the limit.
#[test]
fn support_overrides_stop_at_the_limit_on_all_accounts() {
    let config = |max: u32| format!("[limits]\nmax_overrides = {max}\n[metrics]\nlisten = \"{LISTEN}\"\n");
    let w = World::new(&config(3));
    let accounts = ["acme", "beta", "gamma", "delta"];
    for account in accounts {
        w.ok(json!({"cmd": "account_add", "account": account}));
        w.ok(json!({"cmd": "allow_add", "account": account, "cidr": "198.18.0.7"}));
        w.ok(json!({"cmd": "account_mode", "account": account, "mode": "enforce", "force": true}));
    }
    let grant = |account: &str, cidr: &str| {
        w.conn().request(json!({"cmd": "override_grant", "account": account, "cidr": cidr, "ttl_seconds": 3600,
                                "ticket": "T-2", "reason": "locked out"}))
    };
    for (n, account) in accounts[..3].iter().enumerate() {
        let reply = grant(account, &format!("198.18.2.{n}"));
        assert!(reply.get("ok").is_some(), "{account}: {reply}");
    }
    let reply = grant("delta", "198.18.2.9");
    assert_eq!(reply["error"]["code"], "too_many_overrides", "{reply}");
    assert_eq!(reply["error"]["details"], json!({"overrides": 4, "limit": "limits.max_overrides", "max": 3}));
    assert!(reply["error"]["message"].as_str().unwrap().contains("all accounts together"), "{reply}");
    assert_eq!(w.ok(json!({"cmd": "override_list", "account": "delta"})), json!([]));
    assert_eq!(w.check("delta", [198, 18, 2, 9], "password")["reason"], "address_not_allowed");
    assert_eq!(refused(&w, "too_many_overrides"), 1.0);

    let first = w.ok(json!({"cmd": "override_list", "account": "beta"}))[0]["id"].clone();
    w.ok(json!({"cmd": "override_revoke", "account": "beta", "override_id": first}));
    assert!(grant("delta", "198.18.2.9").get("ok").is_some());
    assert_eq!(w.check("delta", [198, 18, 2, 9], "password")["reason"], "allowed");
    assert_eq!(grant("beta", "198.18.2.1")["error"]["code"], "too_many_overrides");

    std::fs::write(w.config_path(), format!("{}\n{}", config(4), ipaccess_tests::daemon::TEST_MAPS)).unwrap();
    assert!(w.reload().contains("configuration reloaded"));
    assert!(grant("beta", "198.18.2.1").get("ok").is_some());
}
