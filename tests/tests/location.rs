//! End to end, the location of the addresses in an activity summary and in an override
//! grant's evidence: from the MaxMind-format database the configuration names
//! (`location_database`), none without one, and a database that does not load refused at
//! start and on reload.
//!
//! The databases are written by `ipaccess_tests::mmdb`: made-up places in 198.18.0.0/15
//! and fd00::/8 only. The real `ipaccessd` answers on its real socket; the table is the real
//! `ipaccessctl`'s. Build the binaries first: `cargo build --release -p ipaccess --bins`.

use std::fs;
use std::path::{Path, PathBuf};

use ipaccess_tests::client::Conn;
use ipaccess_tests::daemon::{Daemon, Launch, READY, TempDir, World};
use ipaccess_tests::mmdb::{self, HOSTILE_CITY};
use serde_json::{Value, json};

fn ok(w: &World, request: Value) -> Value {
    Conn::open(&w.socket()).ok(request)
}

/// A configuration naming the database at `path`.
fn config(path: &Path) -> String {
    format!("location_database = {:?}", path.to_str().unwrap())
}

/// A test City database written under `dir`; its path.
fn city_database(dir: &TempDir) -> PathBuf {
    let path = dir.0.join("test-city.mmdb");
    fs::write(&path, mmdb::test_city_database()).unwrap();
    path
}

/// What each address signs in as, and whether `acme` (enforcing 198.18.0.0/24) lets it in.
const SIGNINS: [(&str, &str, bool); 6] = [
    ("198.18.0.7", "password", true),
    ("198.18.5.5", "password", false),
    ("198.19.0.9", "api_key", false),
    ("fd00:1::7", "password", false),
    ("fd00:bad::1", "sso", false),
    // In no test network: no location.
    ("192.0.2.1", "password", false),
];

/// `acme` and a check from each of [`SIGNINS`], as an application would make them.
fn sign_in(w: &World) {
    ok(w, json!({"cmd": "account_add", "account": "acme"}));
    ok(w, json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.0/24"}));
    ok(w, json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "force": true}));
    for (addr, method, allowed) in SIGNINS {
        let r = ok(w, json!({"cmd": "check", "account": "acme", "addr": addr, "method": method}));
        assert_eq!(r["allowed"], allowed, "{addr}: {r}");
    }
}

/// The summary's location of each address (`Value::Null` where a row has none), checking
/// that each row also carries the rest of a sign-in record.
fn locations(w: &World) -> Vec<(String, Value)> {
    let summary = ok(w, json!({"cmd": "activity", "account": "acme", "summary": true}));
    let rows = summary.as_array().unwrap_or_else(|| panic!("not a list: {summary}"));
    assert_eq!(rows.len(), SIGNINS.len(), "{summary:#}");
    let mut got: Vec<(String, Value)> = rows
        .iter()
        .map(|r| {
            // SendGrid's record: allowed, auth_method, first_at, ip, last_at, location.
            for key in ["allowed", "method", "first_seen", "address", "last_seen"] {
                assert!(r.get(key).is_some_and(|v| !v.is_null()), "{key} missing: {r}");
            }
            (r["address"].as_str().unwrap().to_string(), r.get("location").cloned().unwrap_or(Value::Null))
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    got
}

/// The table line of `address` in `table`.
fn line<'a>(table: &'a str, address: &str) -> &'a str {
    let prefix = format!("{address} ");
    table.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no row for {address}:\n{table}"))
}

fn testville() -> Value {
    json!({"country": "XA", "city": "Testville"})
}

/// Each row carries the place the database gives its address: country and city, a country
/// alone, IPv4 and IPv6, and nothing for an address outside every network. The override
/// grant's evidence is placed the same way; the CLI shows a LOCATION column, with the
/// database's text escaped.
#[test]
fn summary_rows_carry_the_location_of_their_address() {
    let dir = TempDir::new();
    let w = World::new(&config(&city_database(&dir)));
    sign_in(&w);
    let expected = vec![
        ("192.0.2.1".to_string(), Value::Null),
        ("198.18.0.7".to_string(), testville()),
        ("198.18.5.5".to_string(), testville()),
        ("198.19.0.9".to_string(), json!({"country": "XB"})),
        ("fd00:1::7".to_string(), testville()),
        ("fd00:bad::1".to_string(), json!({"country": "XB", "city": HOSTILE_CITY})),
    ];
    assert_eq!(locations(&w), expected);

    let granted = ok(
        &w,
        json!({"cmd": "override_grant", "account": "acme", "cidr": "198.18.5.5/32", "ttl_seconds": 3600,
               "ticket": "T-1", "reason": "travelling"}),
    );
    let evidence = granted["recent_denied"].as_array().unwrap();
    let placed = |addr: &str| evidence.iter().find(|r| r["address"] == addr).map(|r| r.get("location").cloned());
    assert_eq!(placed("198.18.5.5"), Some(Some(testville())), "{granted:#}");
    assert_eq!(placed("198.19.0.9"), Some(Some(json!({"country": "XB"}))), "{granted:#}");
    assert_eq!(placed("192.0.2.1"), Some(None), "{granted:#}");

    let table = w.ctl_ok(&["activity", "acme", "--summary"]);
    let head: Vec<&str> = table.lines().next().unwrap().split_whitespace().take(3).collect();
    assert_eq!(head, ["ADDRESS", "LOCATION", "METHOD"], "{table}");
    assert!(line(&table, "198.18.0.7").contains(" Testville, XA "), "{table}");
    assert!(line(&table, "198.19.0.9").contains(" XB "), "{table}");
    assert!(line(&table, "192.0.2.1").split_whitespace().nth(1) == Some("-"), "{table}");
    // The escape in the database's city name is shown, not sent to the terminal.
    assert!(line(&table, "fd00:bad::1").contains(r"Evil\x1b[2Jtown, XB"), "{table}");
    assert!(!table.contains('\x1b'), "{table:?}");
}

/// Without `location_database`, no row has a location and the column shows none.
#[test]
fn without_a_database_there_is_no_location() {
    let w = World::new("");
    sign_in(&w);
    assert!(locations(&w).iter().all(|(_, l)| l.is_null()), "{:?}", locations(&w));
    let table = w.ctl_ok(&["activity", "acme", "--summary"]);
    assert!(table.lines().next().unwrap().contains(" LOCATION "), "{table}");
    for (addr, _, _) in SIGNINS {
        assert_eq!(line(&table, addr).split_whitespace().nth(1), Some("-"), "{table}");
    }
}

/// `ipaccessd` on the configuration, state and socket of `w`; does not wait.
fn spawn(w: &World, log: &str) -> Daemon {
    let args = w.daemon_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Daemon::spawn(w.hosts.server.name(), &Launch::default(), &args, &w.dir.0.join(log))
}

/// Restarts `w`'s daemon on its configuration file as it now is; the start must be refused.
fn refused_start(w: &World, log: &str) -> String {
    let mut daemon = spawn(w, log);
    let status = daemon.wait_exit(READY);
    let text = daemon.log_text();
    assert!(status.is_some_and(|s| !s.success()), "the start was not refused ({status:?}):\n{text}");
    text
}

/// A missing file, one that is no database, and a database without places each refuse the
/// start with an error that names the file and what is wrong; on reload, the same refuse
/// the reload and the database in force stays; a good new file at the same path is read.
#[test]
fn a_database_that_does_not_load_is_refused_at_start_and_on_reload() {
    let dir = TempDir::new();
    let db = city_database(&dir);
    let mut w = World::new(&config(&db));
    sign_in(&w);
    w.stop();
    let cfg = w.dir.0.join("ipaccessd.toml");
    let with = |path: &Path| fs::write(&cfg, format!("{}\n{}", config(path), ipaccess_tests::daemon::TEST_MAPS));

    let missing = dir.0.join("missing.mmdb");
    with(&missing).unwrap();
    let log = refused_start(&w, "missing.log");
    assert!(log.contains(&format!("the location database {}", missing.display())), "{log}");

    let corrupt = dir.0.join("corrupt.mmdb");
    fs::write(&corrupt, b"this is not a MaxMind database\n").unwrap();
    with(&corrupt).unwrap();
    let log = refused_start(&w, "corrupt.log");
    assert!(log.contains(&format!("the location database {}", corrupt.display())), "{log}");

    let asn = dir.0.join("asn.mmdb");
    let net = "198.18.0.0/15".parse().unwrap();
    let number = mmdb::map([("autonomous_system_number", mmdb::Data::U32(64512))]);
    fs::write(&asn, mmdb::build("GeoLite2-ASN", &[(net, number)])).unwrap();
    with(&asn).unwrap();
    let log = refused_start(&w, "asn.log");
    assert!(log.contains("\"GeoLite2-ASN\" database, which has no countries or cities"), "{log}");

    // Back on the good database; then it is damaged in place and the daemon reloaded.
    with(&db).unwrap();
    let mut daemon = spawn(&w, "good.log");
    daemon.wait_answering(&w.socket(), READY);
    w.daemon = Some(daemon);
    let placed = |w: &World| locations(w).into_iter().find(|(a, _)| a == "198.18.0.7").unwrap().1;
    assert_eq!(placed(&w), testville());
    fs::write(&db, b"truncated").unwrap();
    let log = w.reload();
    assert!(log.contains("reload refused") && log.contains(&db.display().to_string()), "{log}");
    assert_eq!(placed(&w), testville(), "the database in force is kept");

    // geoipupdate's way: a new file at the same path, then a reload.
    let renamed = mmdb::build("ipaccess-Test-City", &[(net, mmdb::place("XC", Some("Newtown")))]);
    fs::write(&db, renamed).unwrap();
    let log = w.reload();
    assert!(log.contains("configuration reloaded"), "{log}");
    assert_eq!(placed(&w), json!({"country": "XC", "city": "Newtown"}));

    // And a reload without the setting leaves no location.
    fs::write(&cfg, ipaccess_tests::daemon::TEST_MAPS).unwrap();
    assert!(w.reload().contains("configuration reloaded"));
    assert_eq!(placed(&w), Value::Null);
}
