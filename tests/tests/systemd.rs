//! Running ipaccessd as systemd runs it, without systemd as PID 1: the unit file checked
//! by `systemd-analyze verify`; the real daemon talking sd_notify to a datagram socket this
//! test owns (READY, WATCHDOG, RELOADING, STOPPING) while it is reloaded, and
//! EXTEND_TIMEOUT_USEC while it upgrades a large store; and the daemon
//! started with exactly the unit's capabilities, enforcing, then failing clearly without
//! each of them; and its log reaching the journal's socket, with priorities, when its
//! stderr is the journal stream systemd names.

use std::collections::BTreeSet;
use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipaccess::capabilities;
use ipaccess_tests::daemon::{Launch, READY, binaries};
use ipaccess_tests::netns::{TcpServer, run_cmd, tcp_connect};
use ipaccess_tests::ops::Host;
use serde_json::json;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/ipaccessd.service")
}

/// `KEY=` lines of the unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_string).collect()
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    let unit = fs::read_to_string(unit_path()).unwrap();
    // verify checks that ExecStart= is executable: point it at the binary this build made.
    assert_eq!(unit_values(&unit, "ExecStart"), ["/usr/bin/ipaccessd"]);
    let dir = ipaccess_tests::daemon::TempDir::new();
    let copy = dir.0.join("ipaccessd.service");
    let daemon = binaries().daemon.to_str().unwrap();
    fs::write(&copy, unit.replace("ExecStart=/usr/bin/ipaccessd", &format!("ExecStart={daemon}"))).unwrap();
    let out =
        run_cmd("systemd-analyze", &["verify", "--man=no", copy.to_str().unwrap()], Duration::from_secs(60)).unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // Warnings (an unknown key, a bad value) do not change the exit status: read them too.
    let about_ours: Vec<&str> = text.lines().filter(|l| l.contains("ipaccessd")).collect();
    assert!(out.status.success() && about_ours.is_empty(), "systemd-analyze verify ({}):\n{text}", out.status);

    assert_eq!(unit_values(&unit, "Type"), ["notify"]);
    assert_eq!(unit_values(&unit, "ExecReload"), ["/bin/kill -HUP $MAINPID"]);
    assert_eq!(unit_values(&unit, "WatchdogSec").len(), 1);
    // The unit grants exactly what was measured (see `capabilities_are_exactly_what_is_needed`).
    let granted: BTreeSet<String> = unit_values(&unit, "CapabilityBoundingSet")
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(str::to_string)
        .collect();
    let needed: BTreeSet<String> = capabilities::REQUIRED.iter().map(|(_, name)| name.to_string()).collect();
    assert_eq!(granted, needed);
    assert!(unit_values(&unit, "AmbientCapabilities").is_empty());
}

/// The service manager's end of `NOTIFY_SOCKET`.
struct Notifications {
    socket: UnixDatagram,
    /// Everything received, in order.
    seen: Vec<(Instant, String)>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let socket = UnixDatagram::bind(path).unwrap();
        Notifications { socket, seen: Vec::new() }
    }

    /// Receives until a message satisfies `wanted` (returned), or `within` passes (panics).
    fn wait_for(&mut self, what: &str, within: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} within {within:?}; received: {:#?}", self.seen);
            self.socket.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push((Instant::now(), message.clone()));
                if wanted(&message) {
                    return message;
                }
            }
        }
    }

    /// Receives everything for `period`.
    fn collect(&mut self, period: Duration) -> Vec<(Instant, String)> {
        let from = self.seen.len();
        let deadline = Instant::now() + period;
        let mut buf = vec![0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            self.socket.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.socket.recv(&mut buf) {
                self.seen.push((Instant::now(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
        self.seen[from..].to_vec()
    }
}

fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// As uid/gid 65534 with no supplementary groups: does `ipaccessctl status` succeed?
fn nobody_may_read(host: &Host) -> bool {
    let socket = host.socket();
    let args = ["--reuid=65534", "--regid=65534", "--clear-groups", "--", binaries().ctl.to_str().unwrap()];
    let mut argv: Vec<&str> = args.to_vec();
    argv.extend(["--socket", socket.to_str().unwrap(), "status"]);
    run_cmd("setpriv", &argv, Duration::from_secs(15)).unwrap().status.success()
}

#[test]
fn notifies_ready_watchdog_reload_and_stop() {
    const WATCHDOG: Duration = Duration::from_secs(1);
    let mut host = Host::new();
    // A second interface, configured only later by a reload.
    let (extra, extra_peer) = ("opsx0", "opsx1");
    host.hosts.server.ip(&["link", "add", extra, "type", "veth", "peer", "name", extra_peer]).unwrap();
    host.hosts.server.ip(&["link", "set", extra, "up"]).unwrap();
    host.hosts.server.ip(&["link", "set", extra_peer, "up"]).unwrap();
    let server_if = host.hosts.server_if.clone();
    let config = |interfaces: &[&str], extra: &str| {
        format!("interfaces = {interfaces:?}\nsocket_mode = 0o666\nretention_days = 30\n{extra}")
    };
    host.write_config(&config(&[&server_if], ""));
    let notify_path = host.path("notify.sock");
    let mut notifications = Notifications::bind(&notify_path);
    let launch = Launch {
        wrapper: Vec::new(),
        env: vec![
            ("NOTIFY_SOCKET".into(), notify_path.to_str().unwrap().into()),
            ("WATCHDOG_USEC".into(), WATCHDOG.as_micros().to_string()),
        ],
        ..Launch::default()
    };
    host.spawn(&launch);

    // READY=1 comes once everything is in place: the socket answers at once and the
    // interface is filtered.
    let ready = notifications.wait_for("READY=1", READY, |m| has(m, "READY=1"));
    assert!(ipaccess_tests::daemon::answers(&host.socket()), "READY=1 before the socket answers");
    assert!(host.xdp_attached(&server_if), "READY=1 before {server_if} is attached");
    assert!(ready.contains("STATUS=filtering on"), "{ready}");
    let before_ready = &notifications.seen[..notifications.seen.len() - 1];
    assert!(before_ready.iter().all(|(_, m)| !has(m, "WATCHDOG=1")), "pinged before READY: {before_ready:?}");

    // Watchdog pings every WATCHDOG/2, well inside the timeout.
    let pings: Vec<Instant> = notifications
        .collect(WATCHDOG * 3)
        .into_iter()
        .filter(|(_, m)| has(m, "WATCHDOG=1"))
        .map(|(at, _)| at)
        .collect();
    assert!(pings.len() >= 4, "{} pings in {:?}", pings.len(), WATCHDOG * 3);
    let longest = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(longest < WATCHDOG, "{longest:?} between two pings; the timeout is {WATCHDOG:?}");

    // Reload: a new interface, a role for uid 65534, another log level.
    assert!(!nobody_may_read(&host), "uid 65534 has no role yet");
    host.write_config(&config(&[&server_if, extra], "log_level = \"debug\"\n[roles]\ncheck = { uids = [65534] }\n"));
    let reloads = |notifications: &mut Notifications, host: &mut Host| {
        host.daemon().signal(libc::SIGHUP);
        let reloading = notifications.wait_for("RELOADING=1", READY, |m| has(m, "RELOADING=1"));
        assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading}");
        notifications.wait_for("READY=1 after RELOADING=1", READY, |m| has(m, "READY=1"))
    };
    let done = reloads(&mut notifications, &mut host);
    assert!(done.contains("STATUS=configuration reloaded"), "{done}");
    assert!(host.xdp_attached(extra), "the reload did not attach {extra}");
    let status = host.ok(json!({"cmd": "status"}));
    assert_eq!(status["interfaces"], json!([extra, server_if.as_str()].iter().collect::<BTreeSet<_>>()));
    assert!(nobody_may_read(&host), "the reload did not give uid 65534 the check role");

    // Dropping an interface from the list leaves it attached; restart-only keys are named.
    host.write_config(&config(&[&server_if], "[roles]\ncheck = { uids = [65534] }\n[limits]\nmax_connections = 3\n"));
    let done = reloads(&mut notifications, &mut host);
    assert!(done.contains("limits.max_connections need a restart"), "{done}");
    assert!(host.xdp_attached(extra), "a reload detached {extra}");
    let log = host.log_text();
    assert!(log.contains(&format!("{extra} is no longer configured but stays filtered")), "{log}");
    assert!(log.contains("limits.max_connections changed; it takes effect when ipaccessd is restarted"), "{log}");

    // A broken file is refused; the configuration in force stays.
    host.write_config("interfaces = [");
    let done = reloads(&mut notifications, &mut host);
    assert!(done.contains("STATUS=reload refused"), "{done}");
    assert!(host.log_text().contains("reload refused, the configuration in force is kept"));
    assert!(nobody_may_read(&host), "a refused reload changed the roles");
    // The watchdog still pings after all that.
    let later = notifications.collect(WATCHDOG);
    assert!(later.iter().any(|(_, m)| has(m, "WATCHDOG=1")), "{later:?}");

    // SIGTERM: STOPPING=1, a clean exit, and the filter stays. The socket file goes with
    // the daemon, so clients see at once that nobody listens.
    assert!(host.socket().exists());
    host.daemon().signal(libc::SIGTERM);
    notifications.wait_for("STOPPING=1", READY, |m| has(m, "STOPPING=1"));
    let status = host.daemon().wait_exit(READY);
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{}", host.log_text());
    host.daemon = None;
    assert!(host.xdp_attached(&server_if) && host.xdp_attached(extra));
    assert!(!host.socket().exists(), "a clean exit left its socket file behind");
}

/// An upgrade that rewrites a large table asks the service manager for more time while it
/// runs (`EXTEND_TIMEOUT_USEC`), before READY: a start timeout would otherwise kill the
/// daemon mid-step, and the step would roll back and begin again at every start. The store
/// here is at schema v12 with 300,000 sign-in rows, which v13 rewrites.
#[test]
fn a_long_store_upgrade_asks_for_more_time() {
    const ROWS: i64 = 300_000;
    let mut host = Host::new();
    host.write_standalone_config();
    let db = host.path("state/ipaccess.db");
    // A store as v12 left it: sign-ins keyed by account first.
    ipaccess::store::Store::create_at_schema(&db, 12).unwrap();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO signins SELECT 'acct' || (i % 10000), 3600 * (i / 10000), '198.18.' || (i % 250) || '.7',
             'password', 'allowed', 7, 1, 1, 1, 3600 * (i / 10000), 3600 * (i / 10000) FROM n",
        [ROWS - 1],
    )
    .unwrap();
    drop(conn);
    let notify_path = host.path("notify.sock");
    let mut notifications = Notifications::bind(&notify_path);
    let env = vec![("NOTIFY_SOCKET".into(), notify_path.to_str().unwrap().into())];
    host.spawn(&Launch { env, ..Launch::default() });
    notifications.wait_for("READY=1", READY, |m| has(m, "READY=1"));
    let before_ready = &notifications.seen[..notifications.seen.len() - 1];
    assert!(
        before_ready
            .iter()
            .any(|(_, m)| has(m, "EXTEND_TIMEOUT_USEC=60000000") && has(m, "STATUS=upgrading the store")),
        "no extension asked for before READY: {before_ready:?}"
    );
    let conn = rusqlite::Connection::open(&db).unwrap();
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM signins", [], |r| r.get(0)).unwrap();
    assert_eq!((version, rows), (13, ROWS));
}

/// A change that holds the writer lock for long stops the pings; they resume when it is
/// done. The test makes the change stuck for certain: it holds the store's write lock itself
/// (a second SQLite writer), so the daemon's change waits in SQLite's busy handler, under
/// the writer lock, for as long as the test chooses (less than the store's 5 s busy timeout).
#[test]
fn watchdog_pauses_while_the_writer_is_stuck() {
    const WATCHDOG: Duration = Duration::from_millis(400);
    const STUCK: Duration = Duration::from_secs(2);
    let mut host = Host::new();
    host.write_standalone_config();
    let notify_path = host.path("notify.sock");
    let mut notifications = Notifications::bind(&notify_path);
    let env = vec![
        ("NOTIFY_SOCKET".into(), notify_path.to_str().unwrap().into()),
        ("WATCHDOG_USEC".into(), WATCHDOG.as_micros().to_string()),
    ];
    host.spawn(&Launch { env, ..Launch::default() });
    notifications.wait_for("READY=1", READY, |m| has(m, "READY=1"));
    notifications.wait_for("WATCHDOG=1", WATCHDOG * 4, |m| has(m, "WATCHDOG=1"));

    let mut outside = rusqlite::Connection::open(host.path("state/ipaccess.db")).unwrap();
    let held = outside.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).unwrap();
    let started = Instant::now();
    let reply = std::thread::scope(|s| {
        let request = s.spawn(|| host.request(json!({ "cmd": "account_add", "account": "acme" })));
        while started.elapsed() < STUCK {
            notifications.collect(Duration::from_millis(50));
        }
        assert!(!request.is_finished(), "the change did not wait for the store's write lock");
        held.rollback().unwrap();
        while !request.is_finished() && started.elapsed() < STUCK * 4 {
            notifications.collect(Duration::from_millis(50));
        }
        request.join().unwrap()
    });
    let done = Instant::now();
    assert!(reply.get("ok").is_some(), "{reply}");
    let mut pings: Vec<Instant> =
        notifications.seen.iter().filter(|(at, m)| *at >= started && has(m, "WATCHDOG=1")).map(|(at, _)| *at).collect();
    pings.insert(0, started);
    pings.push(done);
    let longest = pings.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        longest >= STUCK - WATCHDOG,
        "pings kept coming while a change held the writer lock (longest gap {longest:?}, change {:?})",
        done - started
    );
    assert!(host.log_text().contains("not pinging the watchdog"), "{}", host.log_text());
    notifications.wait_for("WATCHDOG=1 after the change", WATCHDOG * 4, |m| has(m, "WATCHDOG=1"));
}

/// CapEff of a process, as a set of capability numbers.
fn effective_caps(pid: u32) -> BTreeSet<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_string();
    let bits = u64::from_str_radix(&hex, 16).unwrap();
    (0..64).filter(|b| bits & (1 << b) != 0).collect()
}

/// Runs the daemon with a bounding set of exactly `caps` (as root: what CapabilityBoundingSet=
/// does for the unit) and a zero memlock limit (BPF memory is charged to the cgroup on 6.x).
fn limited(caps: &[&str]) -> Launch {
    let set: String = caps.iter().map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
    let wrapper =
        ["prlimit", "--memlock=0:0", "setpriv", &format!("--bounding-set=-all{set}"), "--inh-caps=-all", "--"];
    Launch { wrapper: wrapper.map(String::from).to_vec(), ..Launch::default() }
}

#[test]
fn capabilities_are_exactly_what_is_needed() {
    const PORT: u16 = 7443;
    let needed: Vec<&str> = capabilities::REQUIRED.iter().map(|&(_, name)| name).collect();
    let mut host = Host::new();
    host.write_config(&format!("interfaces = [\"{}\"]\ndrop_samples_per_second = 100\n", host.hosts.server_if));
    host.start(&limited(&needed));
    let pid = host.daemon().child.id();
    let bits: BTreeSet<u32> = capabilities::REQUIRED.iter().map(|&(bit, _)| bit).collect();
    assert_eq!(effective_caps(pid), bits, "the daemon runs with more or fewer capabilities than intended");

    let (server, good, bad) = (host.hosts.server_v4, host.hosts.client_v4[0], host.hosts.client_v4[1]);
    let target = SocketAddr::new(server.into(), PORT);
    let _listener = TcpServer::start_in(&host.hosts.server, target).unwrap();
    host.ok(json!({"cmd": "account_add", "account": "acme"}));
    host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": format!("{good}/32")}));
    host.ok(json!({"cmd": "bind_add", "account": "acme", "addr": server, "port": PORT}));
    host.ok(json!({"cmd": "account_mode", "account": "acme", "mode": "enforce", "client_ip": good}));
    let enforcing = |host: &Host| {
        host.hosts.client.run(|| {
            tcp_connect(IpAddr::V4(good), target, Duration::from_secs(2))
                && !tcp_connect(IpAddr::V4(bad), target, Duration::from_millis(500))
        })
    };
    assert!(enforcing(&host), "not enforcing with {needed:?}");
    // Drop samples come through the ring buffer into the activity log.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let activity = host.ok(json!({"cmd": "activity", "account": "acme", "denied_only": true}));
        if activity.as_array().unwrap().iter().any(|a| a["kind"] == "drop" && a["address"] == bad.to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "no drop sample from {bad}: {activity}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A restart with the same set reuses the pinned maps and updates the pinned link.
    host.daemon.take().unwrap().terminate().expect("stops on SIGTERM");
    host.start(&limited(&needed));
    assert!(host.log_text().contains("native XDP, pinned link switched to this program"), "{}", host.log_text());
    assert!(enforcing(&host), "not enforcing after a restart with {needed:?}");
    host.daemon.take().unwrap().terminate().expect("stops on SIGTERM");

    // Without any one of them the daemon does not start, and says which one is missing;
    // the filter stays attached and enforcing meanwhile.
    for missing in &needed {
        let fewer: Vec<&str> = needed.iter().copied().filter(|c| c != missing).collect();
        let daemon = host.spawn(&limited(&fewer));
        let status = daemon.wait_exit(READY);
        host.daemon = None;
        let log = host.log_text();
        assert!(status.is_some_and(|s| !s.success()), "started without {missing}: {status:?}\n{log}");
        let last = log.lines().rev().find(|l| l.contains("lacks")).unwrap_or_default().to_string();
        assert!(last.contains(&format!("ipaccessd lacks {missing} (it needs")), "without {missing}:\n{log}");
        assert!(enforcing(&host), "the filter stopped after a failed start without {missing}");
        fs::write(host.log(), "").unwrap();
    }
}

/// One journal entry from the native protocol: `KEY=value` lines, or for values that hold
/// newlines `KEY`, a newline, the length as 64-bit little-endian, the value and a newline.
fn journal_fields(mut datagram: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(end) = datagram.iter().position(|&b| b == b'\n' || b == b'=') {
        let key = String::from_utf8_lossy(&datagram[..end]).into_owned();
        let value: &[u8];
        if datagram[end] == b'=' {
            let rest = &datagram[end + 1..];
            let stop = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            value = &rest[..stop];
            datagram = rest.get(stop + 1..).unwrap_or_default();
        } else {
            let rest = &datagram[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            value = &rest[8..8 + len];
            datagram = rest.get(8 + len + 1..).unwrap_or_default();
        }
        fields.push((key, String::from_utf8_lossy(value).into_owned()));
    }
    fields
}

/// Started by systemd, stderr is the journal stream named in `JOURNAL_STREAM`, and the
/// daemon writes entries, with syslog priorities, to the journal's socket. Here the socket
/// path is bind-mounted (inside the daemon's own mount namespace) to a socket this test
/// owns, and `JOURNAL_STREAM` names the file that is the daemon's stderr.
#[test]
fn logs_to_the_journal_with_priorities_under_systemd() {
    let mut host = Host::new();
    host.write_config(&format!("interfaces = [\"{}\"]", host.hosts.server_if));
    let journal_dir = host.path("journal");
    fs::create_dir(&journal_dir).unwrap();
    let journal = UnixDatagram::bind(journal_dir.join("socket")).unwrap();
    fs::write(host.log(), "").unwrap();
    let stderr = fs::metadata(host.log()).unwrap();

    // `ip netns exec` has given the daemon a mount namespace of its own: mounts made in it
    // stay there. /run/systemd is a tmpfs there, so nothing is created on this machine.
    let mount = format!(
        "mkdir -p /run/systemd && mount -t tmpfs tmpfs /run/systemd && mkdir /run/systemd/journal && \
         mount --bind {} /run/systemd/journal && exec \"$0\" \"$@\"",
        journal_dir.display()
    );
    let launch = Launch {
        wrapper: vec!["sh".into(), "-c".into(), mount],
        env: vec![("JOURNAL_STREAM".into(), format!("{}:{}", stderr.dev(), stderr.ino()))],
        ..Launch::default()
    };
    host.start(&launch);
    host.ok(json!({"id": 1, "cmd": "account_add", "account": "acme"}));
    host.ok(json!({"id": 2, "cmd": "allow_add", "account": "acme", "cidr": "198.18.0.7/32"}));
    let refused = host.request(json!({"id": 3, "cmd": "account_mode", "account": "acme", "mode": "enforce",
        "client_ip": "198.18.0.9"}));
    assert_eq!(refused["error"]["code"], "lockout", "{refused}");

    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let field = |entry: &[(String, String)], key: &str| entry.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 64 * 1024];
    while Instant::now() < deadline
        && !entries.iter().any(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with("lockout_refused")))
    {
        journal.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if let Ok(n) = journal.recv(&mut buf) {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    let find = |prefix: &str| {
        entries
            .iter()
            .find(|e| field(e, "MESSAGE").is_some_and(|m| m.starts_with(prefix)))
            .unwrap_or_else(|| panic!("no journal entry starting {prefix:?} in {entries:#?}"))
    };
    // Info is "notice" (5) in this logger's mapping, warn is "warning" (4).
    let reconciled = find("reconciled ");
    assert_eq!(field(reconciled, "PRIORITY").as_deref(), Some("5"), "{reconciled:?}");
    assert_eq!(field(reconciled, "SYSLOG_IDENTIFIER").as_deref(), Some("ipaccessd"), "{reconciled:?}");
    let lockout = find("lockout_refused: account \"acme\" by uid 0 (client_ip=198.18.0.9)");
    assert_eq!(field(lockout, "PRIORITY").as_deref(), Some("4"), "{lockout:?}");
    assert_eq!(field(lockout, "TARGET").as_deref(), Some("ipaccess::audit"), "{lockout:?}");

    // Nothing went to stderr instead.
    host.daemon().terminate();
    let stderr = host.log_text();
    assert!(!stderr.contains("reconciled") && !stderr.contains("lockout_refused"), "{stderr}");
}
