//! The store on disk while the real daemon runs: other processes open it (an operator's
//! backup), and the daemon must neither die nor lose an acknowledged change for it.
//!
//! Build the binaries first: `cargo build --release -p ipaccess --bins`.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::{Launch, answers};
use ipaccess_tests::ops::Host;
use serde_json::json;

/// Who holds a lock on byte `offset` of `file` that would keep this process from taking it
/// for writing: that process's pid, or None when nobody does (or the file is missing).
/// Opens the file, so call it while this process has no SQLite connection to it: the close
/// drops this process's own locks on it.
fn lock_holder(file: &Path, offset: i64) -> Option<i32> {
    let file = File::open(file).ok()?;
    // SAFETY: flock is plain data; F_GETLK only writes into it.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as i16;
    lock.l_whence = libc::SEEK_SET as i16;
    lock.l_start = offset;
    lock.l_len = 1;
    // SAFETY: a valid descriptor and a valid flock for the call's duration.
    let done = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
    assert_eq!(done, 0, "F_GETLK on {}: {}", file.as_raw_fd(), std::io::Error::last_os_error());
    (i32::from(lock.l_type) != libc::F_UNLCK).then_some(lock.l_pid)
}

/// In SQLite's unix VFS, every process with a WAL database open holds a shared lock on
/// byte 128 of its `-shm` file (the WAL index), and one that opens the database and finds
/// that byte unlocked takes it for the first user: it truncates and rebuilds the index.
const WAL_INDEX_IN_USE: i64 = 128;

/// Another process opens the store and takes its write lock, again and again, while
/// clients keep the daemon reading it. The daemon must keep its lock on the WAL index for
/// as long as it runs: it once opened and closed the `-shm` file every 100 ms to see how
/// full the WAL was, which dropped SQLite's locks; the next process to open the store then
/// rebuilt the index under the daemon, which died of SIGBUS within a few dozen rounds.
#[test]
fn another_process_opening_the_store_never_kills_the_daemon() {
    let mut host = Host::new();
    host.write_standalone_config();
    host.start(&Launch::default());
    let (db, shm, socket) = (host.path("state/ipaccess.db"), host.path("state/ipaccess.db-shm"), host.socket());
    host.ok(json!({"cmd": "account_add", "account": "first"}));
    // Several of the daemon's looks at its WAL later, it still holds the index.
    std::thread::sleep(Duration::from_millis(600));
    let pid = host.daemon().child.id() as i32;
    assert_eq!(lock_holder(&shm, WAL_INDEX_IN_USE), Some(pid), "the daemon let go of its lock on the WAL index");

    let stop = AtomicBool::new(false);
    let rounds = std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                let mut asked = 0;
                while asked < 100_000 && !stop.load(Ordering::Relaxed) && answers(&socket) {
                    asked += 1;
                }
            });
        }
        let (deadline, mut rounds) = (Instant::now() + Duration::from_secs(3), 0);
        while rounds < 5000 && Instant::now() < deadline && answers(&socket) {
            let outside = rusqlite::Connection::open(&db).unwrap();
            outside.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").unwrap();
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        rounds
    });
    if let Some(status) = host.daemon().child.try_wait().unwrap() {
        panic!("ipaccessd died after {rounds} openings of its store by another process ({status})");
    }
    assert_eq!(lock_holder(&shm, WAL_INDEX_IN_USE), Some(pid), "the daemon lost its lock on the WAL index");
    host.ok(json!({"cmd": "account_add", "account": "after"}));
}

/// A backup taken with SQLite (`VACUUM INTO`, as `.backup` would; docs/operations.md)
/// while changes are made holds every change acknowledged before it.
#[test]
fn a_backup_taken_while_the_daemon_runs_holds_every_acknowledged_change() {
    let mut host = Host::new();
    host.write_standalone_config();
    host.start(&Launch::default());
    let db = host.path("state/ipaccess.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    for made in 1..=20 {
        assert!(Instant::now() < deadline, "20 backups took over 30 s");
        host.ok(json!({"cmd": "account_add", "account": format!("acct-{made}")}));
        let copy = host.path(&format!("backup-{made}.db"));
        rusqlite::Connection::open(&db).unwrap().execute("VACUUM INTO ?1", [copy.to_str().unwrap()]).unwrap();
        let copied: i64 = rusqlite::Connection::open(&copy)
            .unwrap()
            .query_row("SELECT count(*) FROM accounts", [], |r| r.get(0))
            .unwrap();
        assert_eq!(copied, made, "backup {made} lacks an acknowledged change");
        std::fs::remove_file(&copy).unwrap();
    }
    let listed = host.ok(json!({"cmd": "account_list"}));
    assert_eq!(listed.as_array().map(Vec::len), Some(20), "{listed}");
}

/// The store moved away (as a careless `mv` or `rm` would) while the daemon runs: a change
/// would go into a file no restart finds, acknowledged and then lost, so it is refused,
/// naming the file; checks go on, reads fail clearly if at all, and nothing is made at the
/// path meanwhile. Put back, the store takes changes again, and they outlive a restart.
#[test]
fn a_store_moved_away_while_the_daemon_runs_takes_no_change() {
    let mut host = Host::new();
    host.write_standalone_config();
    host.start(&Launch::default());
    let (db, away) = (host.path("state/ipaccess.db"), host.path("state/away.db"));
    host.ok(json!({"cmd": "account_add", "account": "acme"}));
    host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.10/32"}));
    std::fs::rename(&db, &away).unwrap();

    let refused = host.request(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.11/32"}));
    assert_eq!(refused["error"]["code"], "internal", "{refused}");
    let message = refused["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(db.to_str().unwrap()) && message.contains("deleted or replaced"), "{message}");
    let refused = host.request(json!({"cmd": "account_add", "account": "other"}));
    assert_eq!(refused["error"]["code"], "internal", "{refused}");
    let check = host.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.0.10", "dry_run": true}));
    assert_eq!(check["allowed"], true, "{check}");
    // Reads take pooled connections to the file as it was, or new ones, which find nothing.
    for _ in 0..8 {
        let read = host.request(json!({"cmd": "allow_list", "account": "acme"}));
        let message = read["error"]["message"].as_str().unwrap_or("deleted or replaced");
        assert!(read.get("ok").is_some() || message.contains("deleted or replaced"), "{read}");
    }
    assert!(!db.exists(), "something made a new store at {}", db.display());

    std::fs::rename(&away, &db).unwrap();
    host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.0.12/32"}));
    let stopped = host.daemon.take().unwrap().terminate();
    assert!(stopped.is_some_and(|s| s.success()), "SIGTERM: {stopped:?}");
    host.start(&Launch::default());
    let listed = host.ok(json!({"cmd": "allow_list", "account": "acme"}));
    let cidrs: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|e| e["cidr"].as_str()).collect();
    assert_eq!(cidrs, ["198.18.0.10/32", "198.18.0.12/32"], "{listed}");
}
