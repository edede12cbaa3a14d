//! End to end: the real `ipaccessd`, started in the server namespace of a [`TestHosts`] pair
//! with the filter on the real veth, answering on its real control socket; driven by the
//! real `ipaccessctl` and by a raw socket client.
//!
//! Every test has its own namespaces, bpffs, state directory and socket, so tests run in
//! parallel. The binaries are taken from next to the test executable: `cargo test --release
//! --workspace` builds them, or `cargo build -p ipaccess --bins --release`.

use std::collections::BTreeSet;
use std::fs::{self};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::{CtlOutput, World, without_last_used};
use ipaccess_tests::netns::{
    FlowsSeen, TcpServer, TestHosts, icmp_echo, paced_udp_sender, receive_flows, set_rcvbuf, tcp_connect, udp_client,
};
use serde_json::{Value, json};

/// Upper bound for attempts that should succeed; timeout for attempts that should fail.
const OK: Duration = Duration::from_secs(2);
const FAIL: Duration = Duration::from_millis(500);
const NOBODY: &str = "65534";

/// Runs a command as uid/gid 65534 with no supplementary groups.
fn as_nobody() -> Vec<String> {
    let have = |p: &str| Path::new("/usr/bin").join(p).is_file() || Path::new("/bin").join(p).is_file();
    if have("setpriv") {
        ["setpriv", &format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups", "--"]
            .map(String::from)
            .to_vec()
    } else {
        ["runuser", "-u", "nobody", "--"].map(String::from).to_vec()
    }
}

/// The client side of the shared test world: `ipaccessctl` runs and raw connections.
trait Client {
    fn ok(&self, args: &[&str]) -> Value;
    fn fails(&self, args: &[&str]) -> String;
    fn conn(&self) -> Conn;
}

impl Client for World {
    /// `ipaccessctl --json ARGS`, which must succeed; its result.
    fn ok(&self, args: &[&str]) -> Value {
        let out = self.ctl(&[&["--json"], args].concat());
        assert_eq!(out.code, 0, "ipaccessctl {args:?}: {out:#?}");
        out.json()
    }

    /// `ipaccessctl --json ARGS`, which must fail with a daemon error; its code. The human
    /// message on stderr carries the code too, and nothing but the error goes to stdout.
    fn fails(&self, args: &[&str]) -> String {
        error_code(&self.ctl(&[&["--json"], args].concat()), args)
    }

    fn conn(&self) -> Conn {
        Conn::open(&self.socket())
    }
}

/// The error code of a failed `ipaccessctl --json` run (exit status 2).
fn error_code(out: &CtlOutput, args: &[&str]) -> String {
    assert_eq!(out.code, 2, "ipaccessctl {args:?} should have failed: {out:#?}");
    let error = out.json();
    let code = error["code"].as_str().unwrap_or_else(|| panic!("no error code: {out:#?}")).to_string();
    assert!(!error["message"].as_str().unwrap_or_default().is_empty(), "{out:#?}");
    assert!(out.stderr.contains(&format!("({code})")), "{out:#?}");
    code
}

// ---------------------------------------------------------------------------------------------
// Raw protocol client

/// One control connection: a request line out, a reply line back.
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream) }
    }

    /// Sends `line` and a newline.
    fn send(&mut self, line: &[u8]) -> io::Result<()> {
        self.writer.write_all(&[line, b"\n"].concat())
    }

    /// The next reply line; `None` when the daemon closed the connection.
    fn reply(&mut self) -> io::Result<Option<Value>> {
        let mut line = Vec::new();
        if self.reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        assert_eq!(line.last(), Some(&b'\n'), "reply not terminated: {:?}", String::from_utf8_lossy(&line));
        Ok(Some(serde_json::from_slice(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"))))
    }

    fn request(&mut self, request: &Value) -> Value {
        self.send(request.to_string().as_bytes()).unwrap();
        self.reply().unwrap().expect("the daemon closed the connection")
    }

    /// A request that must succeed; its result.
    fn ok(&mut self, request: Value) -> Value {
        let reply = self.request(&request);
        assert!(reply.get("error").is_none(), "{request} -> {reply}");
        assert_eq!(reply["id"], request["id"], "{request} -> {reply}");
        reply["ok"].clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic

fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

/// A TCP handshake from `src` (in the client namespace) to `dst`.
fn tcp_ok(hosts: &TestHosts, src: impl Into<IpAddr>, dst: SocketAddr, timeout: Duration) -> bool {
    let src = src.into();
    hosts.client.run(move || tcp_connect(src, dst, timeout))
}

/// Resolves the server's MAC from both sources (ICMP is not filtered by a port binding).
fn warm_up(hosts: &TestHosts, sources: &[Ipv4Addr]) {
    let dst = IpAddr::from(hosts.server_v4);
    for &src in sources {
        assert!(hosts.client.run(move || icmp_echo(src.into(), dst, OK)), "ping {src} -> {dst}");
    }
}

/// Sequence numbers the receiver saw.
/// UDP from an allowed and a disallowed source to one destination, each datagram carrying
/// `[tag, seq (u32 BE)]`; a receiver in the server namespace records what arrives.
struct UdpFlow {
    stop_tx: Arc<AtomicBool>,
    stop_rx: Arc<AtomicBool>,
    senders: Vec<JoinHandle<u64>>,
    receiver: JoinHandle<FlowsSeen>,
    started: Instant,
}

const TAG_GOOD: u8 = 0xa1;
const TAG_BAD: u8 = 0xb2;
/// Hard limit of a flow, whatever happens to the test thread.
const FLOW_LIMIT: Duration = Duration::from_secs(15);

impl UdpFlow {
    fn start(hosts: &TestHosts, dst: SocketAddr, good: Ipv4Addr, bad: Ipv4Addr, rates: (u64, u64)) -> UdpFlow {
        let rx = hosts.server.run(move || UdpSocket::bind(dst)).unwrap();
        set_rcvbuf(&rx, 16 << 20);
        let stop_rx = Arc::new(AtomicBool::new(false));
        let receiver = receive_flows(
            rx,
            (good.into(), TAG_GOOD),
            bad.into(),
            100_000,
            stop_rx.clone(),
            FLOW_LIMIT + Duration::from_secs(5),
        );
        let stop_tx = Arc::new(AtomicBool::new(false));
        let senders = [(good, TAG_GOOD, rates.0), (bad, TAG_BAD, rates.1)]
            .into_iter()
            .map(|(src, tag, rate)| {
                paced_udp_sender(udp_client(&hosts.client, src.into(), dst), tag, rate, stop_tx.clone(), FLOW_LIMIT)
            })
            .collect();
        UdpFlow { stop_tx, stop_rx, senders, receiver, started: Instant::now() }
    }

    /// Stops the senders, lets the receiver drain; (allowed sent, disallowed sent, seen).
    fn finish(self) -> (u64, u64, FlowsSeen) {
        self.stop_tx.store(true, Ordering::Relaxed);
        let sent: Vec<u64> = self.senders.into_iter().map(|s| s.join().unwrap()).collect();
        thread::sleep(Duration::from_millis(300));
        self.stop_rx.store(true, Ordering::Relaxed);
        (sent[0], sent[1], self.receiver.join().unwrap())
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers on results

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|r| r[key].as_str().unwrap_or_else(|| panic!("no {key} in {r}")).to_string())
        .collect()
}

/// The rows of a human table, split into words (header first).
fn table(out: &CtlOutput) -> Vec<Vec<String>> {
    assert_eq!(out.code, 0, "{out:#?}");
    out.stdout.lines().map(|l| l.split_whitespace().map(String::from).collect()).collect()
}

fn words(s: &[&str]) -> Vec<String> {
    s.iter().map(|w| w.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------

/// Every command through `ipaccessctl`, human and `--json` output, results and error codes.
#[test]
fn every_command() {
    let w = World::new("");
    let server_if = w.hosts.server_if.clone();

    let status = w.ok(&["status"]);
    assert_eq!(status["accounts"], 0, "{status}");
    assert_eq!(status["interfaces"], json!([server_if]), "{status}");
    assert_eq!(status["xdp"], json!([{"interface": server_if, "path": "native"}]), "veth runs native XDP: {status}");
    let pin_dir = status["pin_dir"].as_str().unwrap();
    assert!(pin_dir.starts_with(w.bpffs.path().to_str().unwrap()), "{status}");
    let human = w.ctl(&["status"]);
    assert_eq!(human.code, 0, "{human:#?}");
    assert!(human.stdout.contains(&format!("interfaces: {server_if} (native XDP)\n")), "{human:#?}");

    // account add
    let acme = w.ok(&["account", "add", "acme"]);
    assert_eq!(
        (&acme["id"], &acme["state"], &acme["mode"], &acme["parent"]),
        (&json!("acme"), &json!("active"), &json!("off"), &Value::Null),
        "{acme}"
    );
    assert!(acme["slot"].as_u64().unwrap() >= 1 && acme["created_at"].as_i64().unwrap() > 0, "{acme}");
    let dev = w.ok(&["account", "add", "acme-dev", "--parent", "acme"]);
    assert_eq!(dev["parent"], "acme", "{dev}");
    assert_ne!(dev["slot"], acme["slot"]);
    let newco = w.ok(&["account", "add", "newco", "--unconfirmed"]);
    assert_eq!(newco["state"], "unconfirmed", "{newco}");
    let plain = w.ctl(&["account", "add", "plain"]);
    assert_eq!(plain.code, 0, "{plain:#?}");
    assert!(plain.stdout.contains("id: plain\n") && plain.stdout.contains("state: active\n"), "{plain:#?}");

    assert_eq!(w.fails(&["account", "add", "acme"]), "account_exists");
    let dup = w.ctl(&["account", "add", "acme"]);
    assert_eq!((dup.code, dup.stdout.as_str()), (2, ""), "{dup:#?}");
    assert!(dup.stderr.starts_with("error: ") && dup.stderr.contains("(account_exists)"), "{dup:#?}");
    assert_eq!(w.fails(&["account", "add", "orphan", "--parent", "nope"]), "unknown_account");
    assert_eq!(w.fails(&["account", "show", "nope"]), "unknown_account");
    assert_eq!(w.fails(&["account", "state", "nope", "banned"]), "unknown_account");
    assert_eq!(w.fails(&["account", "mode", "nope", "monitor"]), "unknown_account");

    // account show / list
    let shown = w.ok(&["account", "show", "acme"]);
    let mut acme_view = acme.clone();
    acme_view["effective_state"] = json!("active");
    assert_eq!(shown, json!({"account": acme_view, "entries": [], "bindings": [], "sets": []}));
    let list = w.ok(&["account", "list"]);
    assert_eq!(strings(&list, "id"), ["acme", "acme-dev", "newco", "plain"]);
    assert_eq!(list[0], acme_view);
    let rows = table(&w.ctl(&["account", "list"]));
    assert_eq!(rows[0], words(&["ID", "SLOT", "STATE", "MODE", "PARENT"]));
    let slot = dev["slot"].to_string();
    assert!(rows.contains(&words(&["acme-dev", &slot, "active", "off", "acme"])), "{rows:?}");
    assert!(rows.contains(&words(&["newco", &newco["slot"].to_string(), "unconfirmed", "off", "-"])), "{rows:?}");

    // account state / mode
    let t = w.ok(&["account", "state", "newco", "terminated", "--reason", "unpaid invoice"]);
    assert_eq!((&t["state"], &t["state_reason"]), (&json!("terminated"), &json!("unpaid invoice")), "{t}");
    let t = w.ok(&["account", "state", "newco", "active"]);
    assert_eq!((&t["state"], &t["state_reason"]), (&json!("active"), &Value::Null), "{t}");
    let banned = w.ctl(&["account", "state", "plain", "banned"]);
    assert!(banned.code == 0 && banned.stdout.contains("state: banned\n"), "{banned:#?}");
    assert_eq!(w.ok(&["account", "mode", "acme", "monitor"])["mode"], "monitor");
    let off = w.ctl(&["account", "mode", "plain", "off"]);
    assert!(off.code == 0 && off.stdout.contains("mode: off\n"), "{off:#?}");
    // The client refuses names the protocol does not have, without asking the daemon.
    assert_eq!(w.ctl(&["account", "mode", "acme", "paranoid"]).code, 2);
    assert_eq!(w.ctl(&["account", "state", "acme", "deleted"]).code, 2);
    assert_eq!(w.ok(&["account", "show", "acme"])["account"]["mode"], "monitor");

    // allow add / remove / list
    let e = w.ok(&["allow", "add", "acme", "198.18.0.0/24", "--label", "office"]);
    assert_eq!(
        (&e["account"], &e["cidr"], &e["label"], &e["created_by"]),
        (&json!("acme"), &json!("198.18.0.0/24"), &json!("office"), &json!(0)),
        "{e}"
    );
    assert_eq!(w.ok(&["allow", "add", "acme", "2001:db8::7"])["cidr"], "2001:db8::7/128");
    assert_eq!(w.fails(&["allow", "add", "acme", "198.19.7.9/16"]), "bad_request", "host bits are refused");
    assert_eq!(w.ok(&["allow", "add", "acme", "198.19.0.0/16"])["cidr"], "198.19.0.0/16");
    let human = w.ctl(&["allow", "add", "acme", "203.0.113.5"]);
    assert!(human.code == 0 && human.stdout.contains("cidr: 203.0.113.5/32\n"), "{human:#?}");
    assert_eq!(w.fails(&["allow", "add", "acme", "198.18.0.0/24"]), "entry_exists");
    assert_eq!(w.fails(&["allow", "add", "nope", "198.18.0.1"]), "unknown_account");
    let entries = w.ok(&["allow", "list", "acme"]);
    let cidrs: BTreeSet<String> = strings(&entries, "cidr").into_iter().collect();
    let want = ["198.18.0.0/24", "198.19.0.0/16", "2001:db8::7/128", "203.0.113.5/32"].map(String::from);
    assert_eq!(cidrs, BTreeSet::from(want));
    let rows = table(&w.ctl(&["allow", "list", "acme"]));
    let header = ["CIDR", "STATUS", "LABEL", "EXPIRES", "CREATED", "BY", "LAST", "SIGN-IN", "LAST", "PACKET"];
    assert_eq!(rows[0], words(&header));
    // Split at spaces: the permanent entry's EXPIRES is "-", CREATED a date and a time, then BY.
    assert!(rows.iter().any(|r| r[0] == "198.18.0.0/24" && r[2] == "office" && r[3] == "-" && r[6] == "0"), "{rows:?}");
    let removed = w.ok(&["allow", "remove", "acme", "198.19.0.0/16"]);
    assert_eq!(removed, json!({"account": "acme", "removed": "198.19.0.0/16"}));
    assert_eq!(w.fails(&["allow", "remove", "acme", "198.19.0.0/16"]), "unknown_entry");
    assert_eq!(w.fails(&["allow", "remove", "acme", "192.0.2.0/24"]), "unknown_entry");
    assert_eq!(w.fails(&["allow", "remove", "nope", "192.0.2.0/24"]), "unknown_account");
    assert_eq!(w.fails(&["allow", "list", "nope"]), "unknown_account");
    let human = w.ctl(&["allow", "remove", "acme", "203.0.113.5"]);
    assert!(human.code == 0 && human.stdout.contains("removed: 203.0.113.5/32\n"), "{human:#?}");
    assert_eq!(strings(&w.ok(&["allow", "list", "acme"]), "cidr"), ["198.18.0.0/24", "2001:db8::7/128"]);

    // bind add / remove / list
    let b = w.ok(&["bind", "add", "acme", "198.18.0.1:443"]);
    assert_eq!(
        (&b["account"], &b["addr"], &b["target"]),
        (&json!("acme"), &json!("198.18.0.1"), &json!({"proto": "tcp", "port": 443})),
        "{b}"
    );
    assert_eq!(
        w.ok(&["bind", "add", "acme", "198.18.0.1:53", "--proto", "udp"])["target"],
        json!({"proto": "udp", "port": 53})
    );
    let b6 = w.ok(&["bind", "add", "acme-dev", "[fd00::1]:8443"]);
    assert_eq!((&b6["addr"], &b6["target"]), (&json!("fd00::1"), &json!({"proto": "tcp", "port": 8443})), "{b6}");
    assert_eq!(w.ok(&["bind", "add", "newco", "198.18.0.2"])["target"], Value::Null);
    assert_eq!(w.fails(&["bind", "add", "newco", "198.18.0.1:443"]), "binding_exists");
    assert_eq!(w.fails(&["bind", "add", "acme", "198.18.0.2"]), "binding_exists");
    assert_eq!(w.fails(&["bind", "add", "nope", "198.18.0.3"]), "unknown_account");
    let local = w.ctl(&["bind", "add", "acme", "198.18.0.3", "--proto", "udp"]);
    assert!(local.code == 2 && local.stderr.contains("--proto needs a port"), "{local:#?}");
    assert_eq!(w.ok(&["bind", "list"]).as_array().unwrap().len(), 4);
    let rows = table(&w.ctl(&["bind", "list"]));
    assert_eq!(
        rows,
        [
            ["ACCOUNT", "ADDRESS", "PROTO", "PORT"],
            ["acme", "198.18.0.1", "tcp", "443"],
            ["acme", "198.18.0.1", "udp", "53"],
            ["newco", "198.18.0.2", "*", "*"],
            ["acme-dev", "fd00::1", "tcp", "8443"],
        ]
        .map(|r| words(&r))
    );
    let removed = w.ok(&["bind", "remove", "198.18.0.1:53", "--proto", "udp"]);
    assert_eq!((&removed["account"], &removed["target"]), (&json!("acme"), &json!({"proto": "udp", "port": 53})));
    assert_eq!(w.fails(&["bind", "remove", "198.18.0.1:53", "--proto", "udp"]), "unknown_binding");
    assert_eq!(w.fails(&["bind", "remove", "198.18.0.1:53"]), "unknown_binding");
    assert_eq!(w.fails(&["bind", "remove", "198.18.0.2:80"]), "unknown_binding");
    assert_eq!(w.fails(&["bind", "remove", "198.18.0.9"]), "unknown_binding");
    let human = w.ctl(&["bind", "remove", "198.18.0.2"]);
    assert!(human.code == 0 && human.stdout.contains("account: newco\n"), "{human:#?}");
    let bound = w.ok(&["bind", "list"]);
    assert_eq!(strings(&bound, "addr"), ["198.18.0.1", "fd00::1"]);

    let shown = w.ok(&["account", "show", "acme"]);
    assert_eq!(shown["account"]["mode"], "monitor");
    assert_eq!(strings(&shown["entries"], "cidr"), ["198.18.0.0/24", "2001:db8::7/128"]);
    assert_eq!(shown["bindings"], json!([bound[0]]));

    // check
    let c = w.ctl(&["--json", "check", "acme", "198.18.0.44"]);
    let expected = json!({"allowed": true, "reason": "allowed", "hint": "",
                          "detail": "198.18.0.44 is covered by the allowlist entry 198.18.0.0/24"});
    assert_eq!((c.code, c.json()), (0, expected), "{c:#?}");
    let c = w.ctl(&["check", "acme", "192.0.2.1", "--method", "api_key"]);
    assert!(c.code == 0 && c.stdout.starts_with("allowed (monitor_would_deny): 192.0.2.1 "), "{c:#?}");
    let c = w.ctl(&["check", "plain", "198.18.0.44", "--method", "sso"]);
    assert!(c.code == 1 && c.stdout.starts_with("denied (banned): "), "{c:#?}");
    assert_eq!(w.ctl(&["check", "acme", "not-an-address"]).code, 2);

    // override grant / list / revoke (support.rs tests what they do; here, the client). In
    // monitor mode nothing is blocked, so an override would change nothing: enforce first.
    assert_eq!(
        w.fails(&["override", "grant", "acme", "192.0.2.1", "--ttl", "1h", "--ticket", "T", "--reason", "r"]),
        "refused"
    );
    w.ok(&["account", "mode", "acme", "enforce", "--force"]);
    let grant = ["override", "grant", "acme", "192.0.2.1", "--ttl", "1h", "--ticket", "T-1", "--reason", "verified"];
    let granted = w.ctl(&grant);
    assert_eq!(granted.code, 0, "{granted:#?}");
    for line in ["account: acme\n", "cidr: 192.0.2.1/32\n", "ticket: T-1\n", "reason: verified\n"] {
        assert!(granted.stdout.contains(line), "no {line:?} in {granted:#?}");
    }
    assert!(!granted.stdout.contains("interfaces:"), "{granted:#?}");
    assert!(
        granted.stdout.contains("recent denied attempts:") || granted.stdout.contains("no denied attempts recorded"),
        "{granted:#?}"
    );
    let overrides = w.ok(&["override", "list", "acme"]);
    assert_eq!(strings(&overrides, "cidr"), ["192.0.2.1/32"]);
    let id = overrides[0]["id"].to_string();
    let rows = table(&w.ctl(&["override", "list"]));
    assert_eq!(rows[0], words(&["ID", "ACCOUNT", "CIDR", "EXPIRES", "TICKET", "OPERATOR", "REASON"]));
    assert_eq!(rows[1][..3], words(&[&id, "acme", "192.0.2.1/32"]), "{rows:?}");
    assert_eq!(
        w.fails(&["override", "grant", "nope", "192.0.2.1", "--ttl", "1h", "--ticket", "T", "--reason", "r"]),
        "unknown_account"
    );
    assert_eq!(
        w.ctl(&["override", "grant", "acme", "192.0.2.1", "--ttl", "soon", "--ticket", "T", "--reason", "r"]).code,
        2
    );
    let log = w.daemon.as_ref().unwrap().log_text();
    assert!(
        log.lines().any(|l| l.contains("override_granted: account \"acme\" by uid 0 (")
            && l.contains("ticket=\"T-1\"")
            && l.contains("reason=\"verified\"")),
        "no audit line for the grant in the daemon's log:\n{log}"
    );
    let revoked = w.ok(&["override", "revoke", "acme", &id]);
    assert!(revoked["revoked_at"].as_i64().is_some(), "{revoked}");
    assert_eq!(w.ok(&["override", "list", "acme"]), json!([]));

    // activity: the audit records of the grant and revocation, newest first
    let activity = w.ok(&["activity", "acme", "--limit", "2"]);
    assert_eq!(strings(&activity, "reason"), ["override_revoked", "override_granted"], "{activity}");
    let rows = table(&w.ctl(&["activity", "acme", "--since", "1h"]));
    let head = ["LAST", "SEEN", "KIND", "ADDRESS", "TO", "METHOD", "RESULT", "REASON", "COUNT", "UID"];
    assert_eq!(rows[0], words(&head));
    let granted = words(&["audit", "-", "-", "-", "-", "override_granted", "1", "0"]);
    assert!(rows.iter().any(|r| r[2..] == granted), "{rows:?}");

    let status = w.ok(&["status"]);
    assert_eq!(status["accounts"], 4, "{status}");
    assert!(status["table_slots_used"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(status["table_slots"], 65536, "{status}");
}

/// Every reason code of a login check, the decision order, hints and exit statuses.
#[test]
fn reason_codes() {
    let w = World::new("");
    let (a, b) = ("198.18.0.10", "198.18.0.11");
    for args in [
        &["account", "add", "open"][..],
        &["account", "add", "strict"],
        &["allow", "add", "strict", a],
        &["account", "mode", "strict", "enforce", "--client-ip", a],
        &["account", "add", "watch"],
        &["allow", "add", "watch", a],
        &["account", "mode", "watch", "monitor"],
        &["account", "add", "villain"],
        &["account", "state", "villain", "banned", "--reason", "spam"],
        // Sub-users of a banned parent: parent_banned wins over the sub-user's own termination,
        // the sub-user's own ban over its parent's.
        &["account", "add", "corp"],
        &["account", "add", "corp-dev", "--parent", "corp"],
        &["account", "add", "corp-ops", "--parent", "corp"],
        &["account", "state", "corp-ops", "terminated"],
        &["account", "add", "corp-bad", "--parent", "corp"],
        &["account", "state", "corp-bad", "banned"],
        &["account", "state", "corp", "banned"],
        &["account", "add", "debtor"],
        &["allow", "add", "debtor", a],
        &["account", "mode", "debtor", "enforce", "--client-ip", a],
        &["account", "state", "debtor", "terminated", "--reason", "unpaid"],
        // Unconfirmed comes before the address check.
        &["account", "add", "newbie", "--unconfirmed"],
        &["account", "mode", "newbie", "enforce", "--force"],
    ] {
        w.ok(args);
    }
    let cases = [
        ("ghost", a, false, "unknown_account"),
        ("villain", a, false, "banned"),
        ("corp-bad", a, false, "banned"),
        ("corp-dev", a, false, "parent_banned"),
        ("corp-ops", a, false, "parent_banned"),
        ("debtor", b, false, "terminated"),
        ("newbie", b, false, "unconfirmed"),
        ("strict", b, false, "address_not_allowed"),
        ("strict", "fd00::10", false, "address_not_allowed"),
        ("watch", b, true, "monitor_would_deny"),
        ("watch", "fd00::11", true, "monitor_would_deny"),
        ("strict", a, true, "allowed"),
        ("watch", a, true, "allowed"),
        ("open", b, true, "allowed"),
        ("open", "fd00::10", true, "allowed"),
    ];
    let mut reasons = BTreeSet::new();
    for (i, (account, addr, allowed, reason)) in cases.into_iter().enumerate() {
        let what = format!("check {account} {addr}");
        let json = w.ctl(&["--json", "check", account, addr]);
        assert_eq!(json.code, if allowed { 0 } else { 1 }, "{what}: {json:#?}");
        let v = json.json();
        assert_eq!((&v["allowed"], &v["reason"]), (&json!(allowed), &json!(reason)), "{what}: {v}");
        let hint = v["hint"].as_str().unwrap();
        if !allowed || reason == "monitor_would_deny" {
            assert!(!hint.trim().is_empty(), "{what}: no hint: {v}");
        }
        if reason == "address_not_allowed" || reason == "monitor_would_deny" {
            assert!(hint.contains(addr), "{what}: the hint does not name the address: {v}");
        }
        let method = ["password", "api_key", "sso"][i % 3];
        let human = w.ctl(&["check", account, addr, "--method", method]);
        let verdict = if allowed { "allowed" } else { "denied" };
        let expected = if hint.is_empty() || reason == "allowed" {
            format!("{verdict} ({reason})\n")
        } else {
            format!("{verdict} ({reason}): {hint}\n")
        };
        // The verdict line first; then what operators read (the detail).
        let first = human.stdout.split_inclusive('\n').next().unwrap_or_default();
        assert_eq!((human.code, first), (json.code, expected.as_str()), "{what}: {human:#?}");
        let detail = v["detail"].as_str().unwrap();
        assert!(human.stdout.contains(&format!("detail: {detail}\n")), "{what}: {human:#?}");
        reasons.insert(reason);
    }
    assert_eq!(reasons.len(), 8, "{reasons:?}");

    // Decisions follow changes at once.
    w.ok(&["account", "state", "corp", "active"]);
    assert_eq!(w.ctl(&["check", "corp-dev", b]).code, 0);
    assert!(w.ctl(&["check", "corp-ops", b]).stdout.starts_with("denied (terminated)"));
    w.ok(&["allow", "add", "strict", b]);
    assert_eq!(w.ctl(&["check", "strict", b]).code, 0);
    w.ok(&["account", "state", "newbie", "active"]);
    assert!(w.ctl(&["check", "newbie", b]).stdout.starts_with("denied (address_not_allowed)"));
}

/// Enabling enforcement or removing entries is refused when it would lock out --client-ip,
/// unless forced; a refusal changes nothing, neither the store nor the kernel.
#[test]
fn lockout_prevention() {
    let w = World::new("");
    let (a, b) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let (a_s, b_s) = (a.to_string(), b.to_string());
    let (a_s, b_s) = (a_s.as_str(), b_s.as_str());
    let port = sa(w.hosts.server_v4, 7001);
    let _tcp = TcpServer::start_in(&w.hosts.server, port).unwrap();
    w.ok(&["account", "add", "x"]);
    w.ok(&["bind", "add", "x", &port.to_string()]);
    w.ok(&["allow", "add", "x", b_s, "--label", "b"]);

    let shown = w.ok(&["account", "show", "x"]);
    assert_eq!(w.fails(&["account", "mode", "x", "enforce", "--client-ip", a_s]), "lockout");
    assert_eq!(w.fails(&["account", "mode", "x", "enforce", "--client-ip", "fd00::10"]), "lockout");
    let human = w.ctl(&["account", "mode", "x", "enforce", "--client-ip", a_s]);
    assert!(human.code == 2 && human.stderr.contains(a_s) && human.stderr.contains("(lockout)"), "{human:#?}");
    assert_eq!(w.ok(&["account", "show", "x"]), shown, "a refused change changed the account");
    assert_eq!(w.ctl(&["check", "x", a_s]).code, 0);
    assert!(tcp_ok(&w.hosts, a, port, OK), "a refused change reached the kernel");

    // The caller's address is covered, but `a` signed in successfully a moment ago (the
    // check above, in mode off) and would be shut out: refused, naming it, unless forced.
    let refusal = w.ctl(&["--json", "account", "mode", "x", "enforce", "--client-ip", b_s]);
    let refusal: Value = serde_json::from_str(&refusal.stdout).unwrap();
    assert_eq!(refusal["code"], "lockout", "{refusal}");
    assert!(refusal["message"].as_str().unwrap().contains(&format!("{a_s} (last ")), "{refusal}");
    assert_eq!(refusal["details"]["shut_out"][0]["address"], a_s, "{refusal}");
    assert!(tcp_ok(&w.hosts, a, port, OK), "a refused change reached the kernel");
    assert_eq!(w.ok(&["account", "mode", "x", "enforce", "--client-ip", b_s, "--force"])["mode"], "enforce");
    w.ok(&["account", "mode", "x", "off"]);
    assert_eq!(w.ok(&["account", "mode", "x", "enforce", "--client-ip", a_s, "--force"])["mode"], "enforce");
    assert!(w.ctl(&["check", "x", a_s]).stdout.starts_with("denied (address_not_allowed)"));

    // A prefix covers a; removing it would leave only b.
    w.ok(&["allow", "add", "x", "198.18.0.8/30", "--label", "lan"]);
    assert!(tcp_ok(&w.hosts, a, port, OK));
    let (entries, shown) = (w.ok(&["allow", "list", "x"]), w.ok(&["account", "show", "x"]));
    assert_eq!(w.fails(&["allow", "remove", "x", "198.18.0.8/30", "--client-ip", a_s]), "lockout");
    // Host bits are refused on removal as on addition, so both mean the same network.
    assert_eq!(w.fails(&["allow", "remove", "x", "198.18.0.9/30", "--client-ip", a_s]), "bad_request");
    assert_eq!(w.ok(&["allow", "list", "x"]), entries, "a refused removal changed the allowlist");
    assert_eq!(w.ok(&["account", "show", "x"]), shown);
    assert_eq!(w.ctl(&["check", "x", a_s]).code, 0, "a refused removal changed the login check");
    assert!(tcp_ok(&w.hosts, a, port, OK), "a refused removal reached the kernel");

    // Removing b's own entry leaves a covered; then removing the prefix would lock out b too.
    w.ok(&["allow", "remove", "x", b_s, "--client-ip", a_s]);
    let entries = w.ok(&["allow", "list", "x"]);
    assert_eq!(strings(&entries, "cidr"), ["198.18.0.8/30"]);
    assert_eq!(w.fails(&["allow", "remove", "x", "198.18.0.8/30", "--client-ip", b_s]), "lockout");
    assert_eq!(w.ok(&["allow", "list", "x"]), entries);
    w.ok(&["allow", "remove", "x", "198.18.0.8/30", "--client-ip", a_s, "--force"]);
    assert_eq!(w.ok(&["allow", "list", "x"]), json!([]));
    assert!(w.ctl(&["check", "x", a_s]).stdout.starts_with("denied (address_not_allowed)"));
    assert!(!tcp_ok(&w.hosts, a, port, FAIL), "the forced removal did not reach the kernel");

    // Without enforcement, a removal cannot lock anybody out.
    w.ok(&["allow", "add", "x", a_s]);
    w.ok(&["account", "mode", "x", "monitor"]);
    w.ok(&["allow", "remove", "x", a_s, "--client-ip", a_s]);

    // The daemon's log has a line for each refusal and each mode change, naming the
    // account and the operator.
    let log = w.daemon.as_ref().unwrap().log_text();
    let lines = |prefix: &str| log.lines().filter(|l| l.contains(prefix)).count();
    assert_eq!(lines(&format!("lockout_refused: account \"x\" by uid 0 (client_ip={a})")), 3, "{log}");
    assert_eq!(lines("lockout_refused: account \"x\" by uid 0 (client_ip=fd00::10)"), 1, "{log}");
    assert_eq!(lines(&format!("lockout_refused: account \"x\" by uid 0 (client_ip={b})")), 1, "{log}");
    assert_eq!(lines("mode: account \"x\" by uid 0 (forced=true mode=\"enforce\" was=\"off\")"), 2, "{log}");
    assert_eq!(lines("lockout_refused: account \"x\" by uid 0 (because=\"recent sign-ins shut out\")"), 1, "{log}");
    assert_eq!(lines("mode: account \"x\" by uid 0"), 4, "{log}");
}

/// The daemon's changes reach the XDP filter: allowlist, enforcement, ban, monitor.
#[test]
fn enforced_on_the_wire() {
    let w = World::new("");
    let hosts = &w.hosts;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let (bound, free, sub) = (sa(hosts.server_v4, 7001), sa(hosts.server_v4, 7003), sa(hosts.server_v4, 7004));
    let _servers = [bound, free, sub].map(|addr| TcpServer::start_in(&hosts.server, addr).unwrap());
    w.ok(&["account", "add", "acct"]);
    w.ok(&["bind", "add", "acct", &bound.to_string()]);
    w.ok(&["allow", "add", "acct", &format!("{good}/32")]);
    // A sub-user with its own endpoint and allowlist, enforcing.
    w.ok(&["account", "add", "acct-dev", "--parent", "acct"]);
    w.ok(&["bind", "add", "acct-dev", &sub.to_string()]);
    w.ok(&["allow", "add", "acct-dev", &format!("{good}/32")]);
    w.ok(&["account", "mode", "acct-dev", "enforce"]);
    assert!(tcp_ok(hosts, good, sub, OK), "the sub-user's allowed source refused");
    // Mode off: nothing is filtered yet.
    assert!(tcp_ok(hosts, bad, bound, OK), "mode off filters");
    w.ok(&["account", "mode", "acct", "enforce", "--client-ip", &good.to_string()]);

    assert!(tcp_ok(hosts, good, bound, OK), "allowed source refused");
    assert!(!tcp_ok(hosts, bad, bound, FAIL), "disallowed source got through");
    assert!(tcp_ok(hosts, bad, free, OK), "an unbound port is filtered");

    w.ok(&["account", "state", "acct", "banned", "--reason", "test"]);
    assert!(!tcp_ok(hosts, good, bound, FAIL), "banned account still reachable");
    assert!(!tcp_ok(hosts, good, sub, FAIL), "a banned parent's sub-user still reachable");
    assert!(tcp_ok(hosts, good, free, OK));
    w.ok(&["account", "state", "acct", "active"]);
    assert!(tcp_ok(hosts, good, bound, OK), "reactivated account unreachable");
    assert!(tcp_ok(hosts, good, sub, OK), "the sub-user stays suspended after its parent is reactivated");
    assert!(!tcp_ok(hosts, bad, bound, FAIL));

    w.ok(&["account", "mode", "acct", "monitor"]);
    assert!(tcp_ok(hosts, bad, bound, OK), "monitor mode drops");
    w.ok(&["account", "mode", "acct", "enforce"]);
    assert!(!tcp_ok(hosts, bad, bound, FAIL));
    w.ok(&["bind", "remove", &bound.to_string()]);
    assert!(tcp_ok(hosts, bad, bound, OK), "a removed binding still filters");
}

/// Account `acct`, enforcing, with only `good` on its allowlist and TCP port 7001 on the
/// server bound to it, where a server listens (kept while the returned guard lives).
fn enforcing_account(w: &World, good: Ipv4Addr) -> (SocketAddr, TcpServer) {
    let bound = sa(w.hosts.server_v4, 7001);
    let server = TcpServer::start_in(&w.hosts.server, bound).unwrap();
    w.ok(&["account", "add", "acct"]);
    w.ok(&["bind", "add", "acct", &bound.to_string()]);
    w.ok(&["allow", "add", "acct", &format!("{good}/32")]);
    w.ok(&["account", "mode", "acct", "enforce", "--client-ip", &good.to_string()]);
    (bound, server)
}

/// `xdp_mode = "generic"` puts the filter in the generic path even where the driver has
/// native XDP; status says so, and it enforces there too.
#[test]
fn generic_xdp_mode_enforces() {
    let w = World::new("xdp_mode = \"generic\"");
    let hosts = &w.hosts;
    let status = w.ok(&["status"]);
    assert_eq!(status["xdp"], json!([{"interface": hosts.server_if, "path": "generic"}]), "{status}");
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let (bound, _server) = enforcing_account(&w, good);
    assert!(tcp_ok(hosts, good, bound, OK), "allowed source refused");
    assert!(!tcp_ok(hosts, bad, bound, FAIL), "disallowed source got through in generic XDP");
}

/// A reload attaches a configured interface that is not filtered any more (here detached
/// by hand), as it attaches a newly configured one.
#[test]
fn reload_reattaches_a_configured_interface() {
    let w = World::new("");
    let iface = w.hosts.server_if.clone();
    w.ok(&["detach", &iface]);
    assert_eq!(w.ok(&["status"])["interfaces"], json!([]));
    w.daemon.as_ref().unwrap().signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = w.ok(&["status"]);
        if status["xdp"] == json!([{"interface": iface, "path": "native"}]) {
            break;
        }
        assert!(Instant::now() < deadline, "not attached again after a reload: {status}");
        thread::sleep(Duration::from_millis(100));
    }
    let log = w.daemon.as_ref().unwrap().log_text();
    assert!(log.contains(&format!("reload: {iface} is configured but has no XDP program")), "{log}");
}

/// Everything the daemon's clients can read, through one connection.
fn snapshot(w: &World, checks: &[&str]) -> Value {
    let mut conn = w.conn();
    let accounts = conn.ok(json!({"id": 1, "cmd": "account_list"}));
    let mut out = json!({"accounts": accounts, "bindings": conn.ok(json!({"id": 2, "cmd": "bind_list"}))});
    for id in strings(&accounts, "id") {
        // Without the last-used evidence, which the checks below (and the wire) move on.
        out["entries"][&id] = without_last_used(conn.ok(json!({"id": 3, "cmd": "allow_list", "account": id})));
        for addr in checks {
            out["checks"][&id][*addr] = conn.ok(json!({"id": 4, "cmd": "check", "account": id, "addr": addr}));
        }
    }
    out
}

/// A clean restart (SIGTERM) keeps every account, entry, binding and decision; the filter
/// enforces while the daemon is down and after it is back.
#[test]
fn restart_keeps_everything() {
    let mut w = World::new("");
    let (good, bad) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let port = sa(w.hosts.server_v4, 7001);
    let _tcp = TcpServer::start_in(&w.hosts.server, port).unwrap();
    let good_s = good.to_string();
    for args in [
        &["account", "add", "acme"][..],
        &["account", "add", "acme-dev", "--parent", "acme"],
        &["account", "add", "newco", "--unconfirmed"],
        &["account", "add", "gone"],
        &["account", "state", "gone", "terminated", "--reason", "unpaid"],
        &["account", "add", "evil"],
        &["account", "state", "evil", "banned", "--reason", "abuse"],
        &["allow", "add", "acme", &good_s, "--label", "office"],
        &["allow", "add", "acme", "2001:db8::/48", "--label", "v6"],
        &["allow", "add", "acme-dev", "198.18.0.12/31"],
        &["account", "mode", "acme", "enforce", "--client-ip", &good_s],
        &["account", "mode", "acme-dev", "monitor"],
        &["bind", "add", "acme", &port.to_string()],
        &["bind", "add", "acme", "198.18.0.1:7002", "--proto", "udp"],
        &["bind", "add", "acme-dev", "[fd00::1]:7001"],
        &["bind", "add", "evil", "198.18.0.77"],
    ] {
        w.ok(args);
    }
    let checks = ["198.18.0.10", "198.18.0.11", "198.18.0.13", "2001:db8::1", "fd00::10"];
    let before = snapshot(&w, &checks);
    let slots: BTreeSet<u64> =
        before["accounts"].as_array().unwrap().iter().map(|a| a["slot"].as_u64().unwrap()).collect();
    assert_eq!(slots.len(), 5);
    assert!(tcp_ok(&w.hosts, good, port, OK) && !tcp_ok(&w.hosts, bad, port, FAIL));

    // An idle client does not hold up a clean stop.
    let _idle = w.conn();
    w.stop();
    assert!(tcp_ok(&w.hosts, good, port, OK), "allowed source refused while the daemon is down");
    assert!(!tcp_ok(&w.hosts, bad, port, FAIL), "the filter stopped with the daemon");
    let down = w.ctl(&["status"]);
    assert!(down.code == 2 && down.stderr.contains("cannot connect"), "{down:#?}");

    w.start("");
    assert_eq!(snapshot(&w, &checks), before, "the restart changed what the daemon reports");
    assert_eq!(w.ok(&["status"])["interfaces"], json!([w.hosts.server_if]));
    assert!(tcp_ok(&w.hosts, good, port, OK) && !tcp_ok(&w.hosts, bad, port, FAIL));

    // It goes on working: a new account gets a free slot, changes apply.
    let later = w.ok(&["account", "add", "later"]);
    assert!(!slots.contains(&later["slot"].as_u64().unwrap()), "{later} reuses a slot of {slots:?}");
    w.ok(&["account", "mode", "acme", "monitor"]);
    assert!(tcp_ok(&w.hosts, bad, port, OK));
}

/// The store key of a change request, for comparing what was acknowledged with what is there.
fn change_key(request: &Value) -> (String, String) {
    let field = match request["cmd"].as_str().unwrap() {
        "account_add" => "account",
        "bind_add" => "addr",
        "allow_add" => "cidr",
        other => panic!("{other}"),
    };
    (request["cmd"].as_str().unwrap().to_string(), request[field].as_str().unwrap().to_string())
}

/// Changes one after another on one connection until the daemon goes away; returns the
/// requests it acknowledged and the one it did not answer.
fn write_until_killed(mut conn: Conn) -> (Vec<Value>, Option<Value>) {
    let mut acked = Vec::new();
    for i in 0..20_000u32 {
        let host = format!("198.19.{}.{}", i / 256, i % 256);
        let request = match i % 4 {
            0 => json!({"id": i, "cmd": "account_add", "account": format!("w{i}")}),
            1 => json!({"id": i, "cmd": "bind_add", "account": format!("w{}", i - 1), "addr": host}),
            _ => {
                json!({"id": i, "cmd": "allow_add", "account": "flow", "cidr": format!("{host}/32"), "label": format!("w{i}")})
            }
        };
        let reply = match conn.send(request.to_string().as_bytes()) {
            Ok(()) => conn.reply(),
            Err(e) => Err(e),
        };
        match reply {
            Ok(Some(reply)) => {
                assert!(reply.get("error").is_none() && reply["id"] == i, "{request} -> {reply}");
                acked.push(request);
            }
            Ok(None) => return (acked, Some(request)),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                panic!("no reply to {request} within 5 s")
            }
            Err(_) => return (acked, Some(request)),
        }
    }
    (acked, None)
}

/// SIGKILL while UDP flows and changes are being made: not one datagram from the allowed
/// source is lost and none from the disallowed one gets through while the daemon is dead and
/// restarting; every acknowledged change is there after the restart.
#[test]
fn kill_minus_9_under_traffic() {
    // Thousands of entries may be added to one account before the kill: above the default
    // per-account limit.
    const CONFIG: &str = "[limits]\nmax_entries_per_account = 100000";
    let mut w = World::new(CONFIG);
    let (good, bad) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let dst = sa(w.hosts.server_v4, 7002);
    for args in [
        &["account", "add", "flow"][..],
        &["bind", "add", "flow", &dst.to_string(), "--proto", "udp"],
        &["allow", "add", "flow", &good.to_string()],
        &["account", "mode", "flow", "enforce", "--client-ip", &good.to_string()],
    ] {
        w.ok(args);
    }
    warm_up(&w.hosts, &[good, bad]);
    let present = |w: &World| -> BTreeSet<(String, String)> {
        let mut keys = BTreeSet::new();
        for a in strings(&w.ok(&["account", "list"]), "id") {
            keys.insert(("account_add".to_string(), a));
        }
        for b in strings(&w.ok(&["bind", "list"]), "addr") {
            keys.insert(("bind_add".to_string(), b));
        }
        for e in strings(&w.ok(&["allow", "list", "flow"]), "cidr") {
            keys.insert(("allow_add".to_string(), e));
        }
        keys
    };
    let initial = present(&w);

    let flow = UdpFlow::start(&w.hosts, dst, good, bad, (2000, 500));
    let writer = {
        let conn = w.conn();
        thread::spawn(move || write_until_killed(conn))
    };
    thread::sleep(Duration::from_millis(800));
    let killed_at = flow.started.elapsed();
    w.kill9();
    let (acked, in_flight) = writer.join().unwrap();
    thread::sleep(Duration::from_millis(300));
    w.start(CONFIG);
    let back_at = flow.started.elapsed();
    // A change while it flows, straight after the restart.
    w.ok(&["allow", "add", "flow", "198.18.1.0/24", "--label", "after"]);
    thread::sleep(Duration::from_secs(3).saturating_sub(flow.started.elapsed()).max(Duration::from_millis(500)));
    let (good_sent, bad_sent, seen) = flow.finish();

    let received = seen.good.iter().filter(|&&s| s).count() as u64;
    let missing: Vec<usize> =
        seen.good.iter().take(good_sent as usize).enumerate().filter(|(_, s)| !**s).map(|(i, _)| i).take(20).collect();
    eprintln!(
        "kill_minus_9_under_traffic: {good_sent} allowed and {bad_sent} disallowed datagrams; killed at {killed_at:?}, \
         back at {back_at:?}; {} changes acknowledged before the kill",
        acked.len()
    );
    assert!(good_sent >= 4000 && bad_sent >= 1000, "senders too slow: {good_sent}, {bad_sent}");
    assert_eq!(seen.bad, 0, "datagrams from the disallowed source got through");
    assert_eq!((seen.other, seen.good_dups), (0, 0), "unexpected datagrams");
    assert!(
        missing.is_empty() && received == good_sent,
        "{} of {good_sent} allowed datagrams lost, first {missing:?}",
        good_sent.saturating_sub(received)
    );

    assert!(acked.len() >= 4, "too few changes before the kill: {acked:?}");
    let mut expected = initial.clone();
    expected.extend(acked.iter().map(change_key));
    expected.insert(("allow_add".into(), "198.18.1.0/24".into()));
    let now = present(&w);
    let lost: Vec<_> = expected.difference(&now).collect();
    assert!(lost.is_empty(), "acknowledged changes lost in the kill: {lost:?}");
    // Only the request in flight at the kill may have been applied without an answer.
    let extra: Vec<_> = now.difference(&expected).cloned().collect();
    assert!(
        extra.is_empty() || (extra.len() == 1 && in_flight.as_ref().map(change_key) == Some(extra[0].clone())),
        "changes nobody acknowledged: {extra:?} (in flight: {in_flight:?})"
    );
    let entries = w.ok(&["allow", "list", "flow"]);
    for request in acked.iter().filter(|r| r["cmd"] == "allow_add") {
        let entry = entries.as_array().unwrap().iter().find(|e| e["cidr"] == request["cidr"]).unwrap();
        assert_eq!(entry["label"], request["label"], "{entry}");
    }
    let shown = w.ok(&["account", "show", "flow"]);
    assert_eq!(shown["account"]["mode"], "enforce", "{shown}");
    assert_eq!(w.ok(&["status"])["interfaces"], json!([w.hosts.server_if]));
}

/// A uid with no role gets `forbidden` for reads and changes; the check role allows reads
/// only; roles also come from the peer's group.
#[test]
fn roleless_uid_is_refused() {
    let mut w = World::new("socket_mode = 0o666");
    let mode = fs::metadata(w.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666, "socket mode {mode:o}");
    w.ok(&["account", "add", "acme"]);
    w.ok(&["allow", "add", "acme", "198.18.0.10"]);
    fn run_as_nobody(w: &World, args: &[&str]) -> CtlOutput {
        w.ctl_with(&as_nobody(), &[&["--json"], args].concat())
    }
    fn forbidden(w: &World, args: &[&str]) {
        let out = run_as_nobody(w, args);
        assert_eq!(error_code(&out, args), "forbidden", "{args:?}");
        assert!(out.stderr.contains(NOBODY), "the message does not name the uid: {out:#?}");
    }
    let reads: [&[&str]; 5] = [
        &["account", "list"],
        &["account", "show", "acme"],
        &["allow", "list", "acme"],
        &["check", "acme", "198.18.0.10"],
        &["status"],
    ];
    let changes: [&[&str]; 5] = [
        &["account", "add", "intruder"],
        &["account", "mode", "acme", "off"],
        &["account", "state", "acme", "banned"],
        &["allow", "add", "acme", "0.0.0.0/0"],
        &["bind", "add", "acme", "198.18.0.1"],
    ];
    for args in reads.iter().chain(&changes) {
        forbidden(&w, args);
    }

    w.stop();
    w.start("socket_mode = 0o666\n[roles]\ncheck = { uids = [65534] }");
    for args in reads {
        let out = run_as_nobody(&w, args);
        assert_eq!(out.code, 0, "{args:?} as nobody with the check role: {out:#?}");
    }
    assert_eq!(strings(&run_as_nobody(&w, &["account", "list"]).json(), "id"), ["acme"]);
    for args in changes {
        forbidden(&w, args);
    }
    assert_eq!(strings(&w.ok(&["account", "list"]), "id"), ["acme"]);
    let entries = w.ok(&["allow", "list", "acme"]);
    assert_eq!(strings(&entries, "cidr"), ["198.18.0.10/32"]);
    assert_eq!(w.ok(&["account", "show", "acme"])["account"]["state"], "active");

    // The admin role through the peer's (primary) group; the change records its uid.
    w.stop();
    w.start("socket_mode = 0o666\n[roles]\ncheck = { uids = [65534] }\nadmin = { gids = [65534] }");
    let out = run_as_nobody(&w, &["allow", "add", "acme", "198.18.0.20"]);
    assert_eq!(out.code, 0, "{out:#?}");
    assert_eq!(out.json()["created_by"], 65534);
}

/// A corpus of bad lines on one connection: one structured error each, the connection and the
/// data intact; a line over the limit closes only its own connection.
#[test]
fn malformed_requests() {
    const MAX: usize = 4096;
    let w = World::new(&format!("[limits]\nmax_request_bytes = {MAX}\nmax_admin_request_bytes = {MAX}"));
    w.ok(&["account", "add", "acme"]);
    w.ok(&["allow", "add", "acme", "198.18.0.0/24"]);
    w.ok(&["bind", "add", "acme", "198.18.0.1:443"]);
    let before = snapshot(&w, &["198.18.0.10"]);

    let long = "1".repeat(3000);
    let req = |id: u32, rest: &str| format!(r#"{{"id":{id},{rest}}}"#).into_bytes();
    // (line, expected code, echoed id: bad_json lines have none, they could not be read).
    let mut corpus: Vec<(Vec<u8>, &str, Value)> = vec![
        (b"hello".to_vec(), "bad_json", Value::Null),
        (b"[1,2,3]".to_vec(), "bad_json", Value::Null),
        (br#"[{"id":1,"cmd":"status"}]"#.to_vec(), "bad_json", Value::Null),
        (b"42".to_vec(), "bad_json", Value::Null),
        (br#""account_list""#.to_vec(), "bad_json", Value::Null),
        (b"null".to_vec(), "bad_json", Value::Null),
        (br#"{"id":1,"cmd":"status""#.to_vec(), "bad_json", Value::Null),
        (br#"{"id":1,"cmd":"status"} {"id":2,"cmd":"status"}"#.to_vec(), "bad_json", Value::Null),
        (b"\xff\xfe\x00garbage".to_vec(), "bad_json", Value::Null),
        (
            [&br#"{"id":30,"cmd":"account_add","account":""#[..], b"\xc3\x28", br#""}"#].concat(),
            "bad_json",
            Value::Null,
        ),
        (req(1, r#""account":"acme""#), "bad_request", json!(1)),
        (b"{}".to_vec(), "bad_request", Value::Null),
        (req(2, r#""cmd":"frobnicate""#), "bad_request", json!(2)),
        (br#"{"id":"s","cmd":null}"#.to_vec(), "bad_request", json!("s")),
        (br#"{"id":{"nested":[1,2]},"cmd":"Status"}"#.to_vec(), "bad_request", json!({"nested": [1, 2]})),
        (req(3, r#""cmd":"allow_add","account":"acme""#), "bad_request", json!(3)),
        (req(4, r#""cmd":"account_show""#), "bad_request", json!(4)),
        (req(5, r#""cmd":"account_show","account":42"#), "bad_request", json!(5)),
        (req(6, r#""cmd":"account_mode","account":"acme","mode":"enforce","force":"yes""#), "bad_request", json!(6)),
        (req(7, r#""cmd":"account_add","account":["acme"]"#), "bad_request", json!(7)),
        (req(8, r#""cmd":"account_list","extra":true"#), "bad_request", json!(8)),
        (
            req(9, r#""cmd":"allow_remove","account":"acme","cidr":"198.18.0.0/24","force":true,"sudo":1"#),
            "bad_request",
            json!(9),
        ),
        (req(10, r#""cmd":"allow_add","account":"acme","cidr":"198.18.0.0/33""#), "bad_request", json!(10)),
        (req(11, r#""cmd":"allow_add","account":"acme","cidr":"x""#), "bad_request", json!(11)),
        (req(12, r#""cmd":"allow_remove","account":"acme","cidr":"198.18.0.0/-1""#), "bad_request", json!(12)),
        (req(13, r#""cmd":"check","account":"acme","addr":"198.18.0.256""#), "bad_request", json!(13)),
        (
            req(14, r#""cmd":"check","account":"acme","addr":"198.18.0.10","method":"telepathy""#),
            "bad_request",
            json!(14),
        ),
        (req(15, r#""cmd":"bind_add","account":"acme","addr":"localhost","port":80"#), "bad_request", json!(15)),
        (req(16, r#""cmd":"bind_add","account":"acme","addr":"198.18.0.1","port":70000"#), "bad_request", json!(16)),
        (
            req(17, r#""cmd":"bind_add","account":"acme","addr":"198.18.0.1","port":80,"proto":"sctp""#),
            "bad_request",
            json!(17),
        ),
        (req(18, r#""cmd":"account_state","account":"acme","state":"deleted""#), "bad_request", json!(18)),
        (req(19, r#""cmd":"account_mode","account":"acme","mode":"ENFORCE""#), "bad_request", json!(19)),
        (
            req(20, r#""cmd":"account_mode","account":"acme","mode":"enforce","client_ip":"198.18.0""#),
            "bad_request",
            json!(20),
        ),
        (req(21, &format!(r#""cmd":"allow_add","account":"acme","cidr":"{long}""#)), "bad_request", json!(21)),
        (
            req(22, &format!(r#""cmd":"account_add","account":"{}","unconfirmed":"{}""#, &long[..1500], &long[..1500])),
            "bad_request",
            json!(22),
        ),
    ];
    // Blank lines get no reply: the next reply must be the next request's.
    corpus.insert(5, (b"".to_vec(), "", Value::Null));
    corpus.insert(9, (b"  \t \r".to_vec(), "", Value::Null));

    let mut conn = w.conn();
    let mut other = w.conn();
    for (line, code, id) in &corpus {
        let shown: String = String::from_utf8_lossy(line).chars().take(200).collect();
        conn.send(line).unwrap();
        if code.is_empty() {
            continue;
        }
        let reply = conn.reply().unwrap().unwrap_or_else(|| panic!("{shown}: connection closed"));
        assert_eq!(reply["error"]["code"], *code, "{shown} -> {reply}");
        assert!(!reply["error"]["message"].as_str().unwrap_or_default().is_empty(), "{shown} -> {reply}");
        assert_eq!(&reply["id"], id, "{shown} -> {reply}");
        assert!(reply.get("ok").is_none(), "{shown} -> {reply}");
    }
    // The same connection still works, for a valid request.
    assert_eq!(strings(&conn.ok(json!({"id": "after", "cmd": "account_list"})), "id"), ["acme"]);

    // A line of exactly the limit is read; one byte more is too large and closes the connection.
    let padded = |len: usize| {
        let head = r#"{"id":"edge","cmd":"account_show","account":""#;
        let mut line = head.as_bytes().to_vec();
        line.resize(len - 2, b'p');
        line.extend(b"\"}");
        line
    };
    conn.send(&padded(MAX)).unwrap();
    let reply = conn.reply().unwrap().unwrap();
    // Read and answered (the id is longer than accounts may have, so refused as such).
    assert_eq!((&reply["id"], &reply["error"]["code"]), (&json!("edge"), &json!("bad_request")), "{reply}");
    for len in [MAX + 1, 3 * MAX] {
        let mut conn = w.conn();
        conn.send(&padded(len)).unwrap();
        let reply = conn.reply().unwrap().expect("no reply to a line over the limit");
        assert_eq!(reply["error"]["code"], "too_large", "{reply}");
        match conn.reply() {
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("the connection stays open after too_large: {other:?}"),
        }
    }
    conn.send(&padded(MAX + 100)).unwrap();
    assert_eq!(conn.reply().unwrap().unwrap()["error"]["code"], "too_large");
    assert!(!matches!(conn.reply(), Ok(Some(_))), "the connection stays open after too_large");

    // Other and new connections are served; nothing changed.
    assert_eq!(other.ok(json!({"id": 1, "cmd": "status"}))["accounts"], 1);
    assert_eq!(w.ctl(&["check", "acme", "198.18.0.10"]).code, 0);
    assert_eq!(snapshot(&w, &["198.18.0.10"]), before, "the bad requests changed the data");
}

/// A `proto` without a `port` must not be read as "the whole address", neither when binding
/// nor when removing (ipaccessctl refuses it locally; the daemon must too).
#[test]
fn proto_without_port_is_refused() {
    let w = World::new("");
    w.ok(&["account", "add", "acme"]);
    w.ok(&["bind", "add", "acme", "198.18.0.2"]);
    let mut conn = w.conn();
    let add =
        conn.request(&json!({"id": 1, "cmd": "bind_add", "account": "acme", "addr": "198.18.0.3", "proto": "udp"}));
    assert!(add.get("ok").is_none(), "proto without port accepted: {add}");
    let remove = conn.request(&json!({"id": 2, "cmd": "bind_remove", "addr": "198.18.0.2", "proto": "tcp"}));
    assert!(remove.get("ok").is_none(), "proto without port removed the whole-address binding: {remove}");
    assert_eq!(strings(&w.ok(&["bind", "list"]), "addr"), ["198.18.0.2"]);
}

/// Dual-stack sockets report IPv4 clients as IPv4-mapped IPv6 addresses; a check or a
/// lockout guard given one must treat it as the IPv4 address it is.
#[test]
fn ipv4_mapped_addresses_are_ipv4() {
    let w = World::new("");
    w.ok(&["account", "add", "acme"]);
    w.ok(&["allow", "add", "acme", "198.18.0.10/32"]);
    w.ok(&["account", "mode", "acme", "enforce", "--client-ip", "::ffff:198.18.0.10"]);
    assert_eq!(w.ctl(&["check", "acme", "::ffff:198.18.0.10"]).code, 0);
    assert_eq!(w.ctl(&["check", "acme", "::ffff:198.18.0.11"]).code, 1);
}

/// `allow replace` swaps the whole list in one change, guarded like `allow remove`; `stats`
/// reports the kernel's counters; `detach` over the socket removes the filter, and refuses
/// what cannot be an interface's name.
#[test]
fn replace_stats_and_detach() {
    let w = World::new("");
    let hosts = &w.hosts;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let (bound, _server) = enforcing_account(&w, good);

    let file = w.dir.0.join("allow.txt");
    std::fs::write(&file, format!("# new office\n{bad}/32 office\n198.18.9.0/24\n")).unwrap();
    let replace = |extra: &[&str]| {
        let mut args = vec!["allow", "replace", "acct", "--file", file.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let good_ip = good.to_string();
    let refused = replace(&["--client-ip", &good_ip]);
    let refused: Vec<&str> = refused.iter().map(String::as_str).collect();
    assert_eq!(w.fails(&refused), "lockout");
    assert_eq!(
        strings(&w.ok(&["allow", "list", "acct"]), "cidr"),
        [format!("{good}/32")],
        "a refusal changed the list"
    );
    let forced = replace(&["--client-ip", &good_ip, "--force"]);
    let forced: Vec<&str> = forced.iter().map(String::as_str).collect();
    let listed = w.ok(&forced)["entries"].clone();
    // Listed by CIDR text.
    assert_eq!(strings(&listed, "cidr"), [format!("{bad}/32"), "198.18.9.0/24".to_string()]);
    assert_eq!((&listed[0]["label"], &listed[1]["label"]), (&json!("office"), &Value::Null));
    assert!(tcp_ok(hosts, bad, bound, OK), "the new list is not enforced");
    assert!(!tcp_ok(hosts, good, bound, FAIL), "the replaced entry still lets its source in");

    let stats = w.ok(&["stats", "acct"]);
    let row = &stats["accounts"][0];
    assert_eq!(row["account"], "acct");
    assert!(row["passed_packets"].as_u64().unwrap() >= 1, "{stats}");
    assert!(row["dropped_packets"].as_u64().unwrap() >= 1, "{stats}");
    assert!(w.ok(&["stats"])["host"]["unbound"].is_u64());

    // The refused SYNs from `good` reach the activity log as drop samples (drained each second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let dropped = loop {
        let activity = w.ok(&["activity", "acct"]);
        let found = activity.as_array().unwrap().iter().find(|r| r["kind"] == "drop").cloned();
        if found.is_some() || Instant::now() > deadline {
            break found;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let dropped = dropped.expect("no drop sample in the activity log");
    assert_eq!(dropped["address"], json!(good.to_string()));
    assert_eq!(dropped["reason"], "address_not_allowed");
    assert_eq!(dropped["detail"]["port"], json!(bound.port()));

    assert_eq!(w.ok(&["detach", &hosts.server_if])["detached"], true);
    assert!(tcp_ok(hosts, good, bound, OK), "still filtered after detach");
    assert_eq!(w.ok(&["detach", &hosts.server_if])["detached"], false);
    // Only what could be an interface's name: it also names a file under the pin directory.
    for bad in ["../../etc", "..", "eth0 x", "eth0:1", "an-interface-name"] {
        let out = w.ctl(&["detach", bad]);
        assert!(
            out.code == 2 && out.stderr.contains("is not an interface name") && out.stderr.contains("(bad_request)"),
            "{bad}: {out:#?}"
        );
    }
}

/// `allow replace --file`: a `#` inside a label is the label's, one standing apart starts a
/// comment; the daemon's complaint about an entry names the file's line, for a bad network
/// and a bad label alike; nothing of a refused file is applied; a file saved with a byte
/// order mark and CRLF line ends reads as any other.
#[test]
fn an_allowlist_files_errors_name_its_lines() {
    let w = World::new("");
    w.ok(&["account", "add", "acme"]);
    let file = w.dir.0.join("list.txt");
    let path = file.to_str().unwrap();
    fs::write(&file, "# the office\n198.18.50.0/24 Suite #4, 2nd floor # moved in 2026\n\n198.18.51.7/32 # home\n")
        .unwrap();
    w.ok(&["allow", "replace", "acme", "--file", path]);
    let labels: Vec<Value> =
        w.ok(&["allow", "list", "acme"]).as_array().unwrap().iter().map(|e| e["label"].clone()).collect();
    assert_eq!(labels, [json!("Suite #4, 2nd floor"), Value::Null]);
    for (text, line, entry) in [
        ("# a comment\n198.18.50.0/24 office\n\n# another\n198.18.53.1/24 lab\n", 5, 2),
        ("198.18.50.0/24\n\n198.18.52.0/24 tag\u{e0041}\n", 3, 2),
    ] {
        fs::write(&file, text).unwrap();
        let out = w.ctl(&["allow", "replace", "acme", "--file", path]);
        let want = format!("line {line} (entry {entry}): ");
        assert!(
            out.code == 2 && out.stderr.contains(&want) && out.stderr.contains("(bad_request)"),
            "{want}: {out:#?}"
        );
    }
    assert_eq!(w.ok(&["allow", "list", "acme"]).as_array().unwrap().len(), 2, "a refused file changed the list");
    // Saved by a Windows editor: a byte order mark before the first network is not part of it.
    fs::write(&file, "\u{feff}198.18.50.0/24 office\r\n198.18.51.7/32\r\n").unwrap();
    w.ok(&["allow", "replace", "acme", "--file", path]);
    let listed: Vec<(Value, Value)> = w
        .ok(&["allow", "list", "acme"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["cidr"].clone(), e["label"].clone()))
        .collect();
    assert_eq!(listed, [(json!("198.18.50.0/24"), json!("office")), (json!("198.18.51.7/32"), Value::Null)]);
}

/// `ipaccessctl import`: accounts created and updated with their allowlists, in batches,
/// enforced on the wire; a bad file sends nothing; a bad batch changes nothing; importing
/// twice changes nothing more. Only admins may send requests as large as an import's.
#[test]
fn bulk_import() {
    const SMALL: usize = 2048;
    let config =
        format!("socket_mode = 0o666\n[roles]\ncheck = {{ uids = [65534] }}\n[limits]\nmax_request_bytes = {SMALL}");
    let w = World::new(&config);
    let hosts = &w.hosts;
    let (good, bad) = (hosts.client_v4[0], hosts.client_v4[1]);
    let bound = sa(hosts.server_v4, 7001);
    let _server = TcpServer::start_in(&hosts.server, bound).unwrap();
    w.ok(&["account", "add", "acme"]);
    w.ok(&["allow", "add", "acme", &format!("{bad}/32")]);
    w.ok(&["bind", "add", "acme", &bound.to_string()]);

    // 40 filler accounts of 30 entries make requests far larger than SMALL.
    let mut lines = vec![
        "# migrated from the old platform".to_string(),
        json!({"account": "corp", "mode": "enforce", "entries": [{"cidr": "198.18.5.0/24", "label": "hq"}]}).to_string(),
        json!({"account": "corp-dev", "parent": "corp", "state": "unconfirmed", "entries": []}).to_string(),
        String::new(),
        json!({"account": "acme", "mode": "enforce", "entries": [{"cidr": format!("{good}/32")}, {"cidr": "fd00::/64"}]}).to_string(),
    ];
    for n in 0..40 {
        let entries: Vec<Value> = (0..30).map(|h| json!({"cidr": format!("198.19.{n}.{h}/32")})).collect();
        lines.push(json!({"account": format!("filler-{n:02}"), "mode": "monitor", "entries": entries}).to_string());
    }
    let file = w.dir.0.join("import.jsonl");
    fs::write(&file, lines.join("\n")).unwrap();
    let path = file.to_str().unwrap();

    let summary = w.ok(&["import", path, "--batch-bytes", "8192"]);
    assert_eq!(
        (&summary["accounts"], &summary["created"], &summary["entries"]),
        (&json!(43), &json!(42), &json!(1203)),
        "{summary}"
    );
    assert!(summary["batches"].as_u64().unwrap() >= 4, "{summary}");
    assert_eq!(strings(&w.ok(&["allow", "list", "acme"]), "cidr"), [format!("{good}/32"), "fd00::/64".to_string()]);
    assert_eq!(w.ok(&["account", "show", "corp-dev"])["account"]["parent"], "corp");
    assert_eq!(w.ok(&["account", "show", "filler-39"])["account"]["mode"], "monitor");
    assert_eq!(w.ok(&["allow", "list", "filler-39"]).as_array().unwrap().len(), 30);
    for (account, addr, reason) in [
        ("acme", good.to_string(), "allowed"),
        ("acme", bad.to_string(), "address_not_allowed"),
        ("corp", "198.18.5.77".to_string(), "allowed"),
        ("corp", good.to_string(), "address_not_allowed"),
        ("corp-dev", "198.18.5.77".to_string(), "unconfirmed"),
        ("filler-07", good.to_string(), "monitor_would_deny"),
    ] {
        // `check` exits 1 when denied.
        let out = w.ctl(&["--json", "check", account, &addr]);
        assert_eq!(out.json()["reason"], reason, "{account} from {addr}: {out:#?}");
    }
    assert!(tcp_ok(hosts, good, bound, OK), "an imported entry is not enforced");
    assert!(!tcp_ok(hosts, bad, bound, FAIL), "an entry the import replaced still lets its source in");
    let audited = w.ok(&["activity", "acme"]);
    assert!(
        audited.as_array().unwrap().iter().any(|r| r["reason"] == "import" && r["detail"]["entries"] == 2),
        "{audited}"
    );

    // Again: nothing new, nothing different.
    let before = snapshot(&w, &[&good.to_string(), "198.18.5.77"]);
    let again = w.ok(&["import", path]);
    assert_eq!((&again["created"], &again["batches"]), (&json!(0), &json!(1)), "{again}");
    assert_eq!(snapshot(&w, &[&good.to_string(), "198.18.5.77"]), before);

    // A bad line: nothing is sent. A bad batch: none of it is applied.
    fs::write(
        &file,
        format!("{}\n{{\"account\": \"new\", \"entries\": [{{\"cidr\": \"198.18.0.0/33\"}}]}}\n", lines[1]),
    )
    .unwrap();
    let out = w.ctl(&["import", path]);
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(out.stderr.contains("line 2"), "{out:#?}");
    let batch = [
        json!({"account": "new-1", "entries": [{"cidr": "198.18.7.0/24"}]}),
        json!({"account": "orphan", "parent": "no-such-parent"}),
    ];
    fs::write(&file, batch.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(w.fails(&["import", path]), "unknown_account");
    // The same account twice: refused before anything is sent, the lines named; sent anyway
    // (in one batch), the daemon refuses it too.
    fs::write(&file, [&batch[0], &batch[0]].iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")).unwrap();
    let out = w.ctl(&["import", path]);
    assert!(out.code == 2 && out.stderr.contains("line 2: account new-1 is on line 1 already"), "{out:#?}");
    let reply = w.conn().request(&json!({"cmd": "import", "accounts": [&batch[0], &batch[0]]}));
    assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
    fs::write(&file, json!({"account": "corp-dev", "parent": "acme"}).to_string()).unwrap();
    assert_eq!(w.fails(&["import", path]), "bad_request");
    assert_eq!(snapshot(&w, &[&good.to_string(), "198.18.5.77"]), before, "a refused import changed something");

    // A caller with only the check role keeps the small request limit; an admin does not.
    let big = w.dir.0.join("big.txt");
    fs::write(&big, (0..200).map(|h| format!("198.19.200.{h}/32\n")).collect::<String>()).unwrap();
    let replace = ["--json", "allow", "replace", "filler-00", "--file", big.to_str().unwrap()];
    let out = w.ctl_with(&as_nobody(), &replace);
    assert_eq!(error_code(&out, &replace), "too_large");
    assert_eq!(w.ok(&replace[1..])["entries"].as_array().unwrap().len(), 200);

    // A request far larger than the socket's buffer is refused before it is all sent: the
    // daemon's reason reaches the person, not a broken pipe.
    let huge = w.dir.0.join("huge.txt");
    let lines: String = (0..80_000u32).map(|i| format!("{}/32\n", Ipv4Addr::from(0xc612_0000 + i))).collect();
    fs::write(&huge, lines).unwrap();
    let replace = ["--json", "allow", "replace", "filler-00", "--file", huge.to_str().unwrap()];
    let out = w.ctl_with(&as_nobody(), &replace);
    assert_eq!(error_code(&out, &replace), "too_large");
    assert!(!out.stderr.contains("Broken pipe"), "{out:#?}");
}
