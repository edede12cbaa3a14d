//! `cargo xtask bench fleet`: a fleet of 3 real ipaccessd nodes on a real 3-member etcd
//! cluster, every member and node in network namespaces of its own on this machine.
//!
//! 1. Acknowledgement to enforced on every node: `allow add` and `allow remove` alternating
//!    on one account through node A; from sending the request until each node's login check
//!    for that address gives the new answer (all three polled in a tight loop after the
//!    acknowledgement). The acknowledgement alone is reported too.
//! 2. Change throughput through node A (one client, sequential). Baseline: etcd's own
//!    sequential puts of a value the size of the account's document, with the daemon's etcd
//!    client (`etcd-client`) from node A's namespace; and a transaction shaped like a change
//!    (a compare, the document, an audit record).
//! 3. Login checks/s with 8 clients on each of the 3 nodes at once, against 8 clients on one
//!    node alone; etcd's revision and request counters read around the run show that checks
//!    never reach it.
//! 4. A new node joining a fleet of 100,000 accounts and 1,000,000 entries: from its start to
//!    enforcing (its applied revision at the fleet's and a check answered from the policy).
//!    Baseline: a standalone daemon restarting from its local store with the same documents
//!    (time to its first answered request, as `bench control` measures a restart). The fleet
//!    is written straight into etcd under a prefix of its own, so that the three running
//!    nodes (with test-size maps) do not follow it.
//!
//! `--quick` makes the joined fleet ten times smaller and the other runs shorter;
//! `--join-only` measures the join alone (e.g. to profile the joining node).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use etcd_client::{Client as Etcd, Compare, CompareOp, PutOptions, Txn, TxnOp};
use ipaccess::{
    cluster::{Keys, keys::encode},
    protocol::{AccountState, Mode},
    store::{AccountDoc, EntryDoc, Store},
};
use ipaccess_tests::{
    client::Conn,
    daemon::{Launch, answers},
    etcd::EtcdCluster,
    fleet::{Fleet, FleetNode, PREFIX},
    netns::Netns,
    ops::Host,
};
use ipnet::IpNet;
use serde_json::{Value, json};

/// Scale of one run.
struct Scale {
    /// Accounts of the fleet a new node joins (10 entries each).
    accounts: usize,
    /// Changes timed to enforcement on every node.
    changes: usize,
    /// Sequential changes, and etcd puts, for the throughput figure.
    sequential: usize,
    /// How long each login-check point runs.
    run: Duration,
}

const ENTRIES: usize = 10;
/// Clients per node for the login checks.
const CLIENTS: usize = 8;
/// Clients sending changes through one node at once, for the concurrent throughput figure.
const CHANGE_CLIENTS: usize = 8;
/// Accounts the login checks spread over (made through node A).
const CHECK_ACCOUNTS: usize = 32;
/// etcd transactions of at most this many puts (etcd's default limit is 128).
const PUTS_PER_TXN: usize = 100;
/// Transactions in flight while seeding the fleet.
const SEED_PARALLEL: usize = 16;
/// The prefix of the fleet a new node joins.
const JOIN_PREFIX: &str = "/ipaccess-join/";
/// Bound on one change becoming enforced everywhere, and on a join.
const ENFORCE_WITHIN: Duration = Duration::from_secs(10);
const JOIN_WITHIN: Duration = Duration::from_secs(600);
/// When the seeded documents say they were made.
const CREATED_AT: i64 = 1_764_000_000;

/// Account `a`'s allowlist, as in `bench control`: 8 IPv4 hosts, an IPv4 /24 and an IPv6
/// /64, inside the test ranges (data only: no traffic uses them).
fn entries_of(a: usize) -> Vec<IpNet> {
    let host = |n: usize| format!("198.18.{}.{}/32", (n >> 8) & 0xff, n & 0xff).parse().unwrap();
    let mut nets: Vec<IpNet> = (0..8).map(|e| host((a * 8 + e) % 65_536)).collect();
    nets.push(format!("198.19.{}.0/24", a % 256).parse().unwrap());
    nets.push(format!("fd00:{:x}:{:x}::/64", a >> 16, a & 0xffff).parse().unwrap());
    nets
}

/// Account `a`'s document, exactly as a node writes one (entries sorted by CIDR text).
fn doc_of(a: usize) -> AccountDoc {
    let mut entries: Vec<EntryDoc> = entries_of(a)
        .into_iter()
        .map(|cidr| EntryDoc {
            cidr,
            label: None,
            enabled: true,
            created_at: CREATED_AT,
            created_by: 0,
            expires_at: None,
        })
        .collect();
    entries.sort_by_key(|e| e.cidr.to_string());
    AccountDoc {
        slot: a as u32 + 1,
        parent: None,
        state: AccountState::Active,
        state_reason: None,
        mode: Mode::Enforce,
        created_at: CREATED_AT,
        entries,
        overrides: Vec::new(),
        sets: Vec::new(),
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One control connection for raw request lines (the check path's cost is the point).
struct Line {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Line {
    fn connect(socket: &Path) -> Line {
        Self::connect_within(socket, Duration::from_secs(30))
    }

    /// A connection whose replies may take up to `within`.
    fn connect_within(socket: &Path, within: Duration) -> Line {
        let stream = UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        stream.set_read_timeout(Some(within)).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
        Line { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream), line: String::new() }
    }

    fn request(&mut self, request: &str) -> &str {
        self.writer.write_all(request.as_bytes()).unwrap();
        self.line.clear();
        assert!(self.reader.read_line(&mut self.line).unwrap() > 0, "the daemon closed the connection");
        assert!(!self.line.contains("\"error\""), "request failed: {request} -> {}", self.line);
        &self.line
    }

    /// Does this node allow `account` to sign in from `addr` now?
    fn allowed(&mut self, account: &str, addr: &str) -> bool {
        let reply = self.request(&format!("{{\"cmd\":\"check\",\"account\":\"{account}\",\"addr\":\"{addr}\"}}\n"));
        reply.contains("\"allowed\":true")
    }

    /// The revision this fleet node reports applied.
    fn applied_revision(&mut self) -> i64 {
        let reply: Value = serde_json::from_str(self.request("{\"cmd\":\"status\"}\n")).expect("status is JSON");
        reply["ok"]["cluster"]["applied_revision"].as_i64().expect("a fleet node reports its revision")
    }
}

fn cluster_status(node: &FleetNode) -> Value {
    node.host.ok(json!({"cmd": "status"}))["cluster"].clone()
}

fn applied(node: &FleetNode) -> i64 {
    cluster_status(node)["applied_revision"].as_i64().expect("a fleet node reports its revision")
}

/// Waits (bounded) until every node has applied `revision`.
fn converge(nodes: &[&FleetNode], revision: i64) {
    let deadline = Instant::now() + ENFORCE_WITHIN;
    for node in nodes {
        for _ in 0..100_000 {
            if applied(node) >= revision {
                break;
            }
            assert!(Instant::now() < deadline, "{} did not apply revision {revision}", node.name);
            thread::sleep(Duration::from_millis(5));
        }
    }
}

struct Enforcement {
    ack: Vec<Duration>,
    /// From the acknowledgement until the last node gave the new answer.
    after_ack: Vec<Duration>,
    /// From the request until every node gave the new answer (the target's figure).
    total: Vec<Duration>,
    /// Per node, from the request until it gave the new answer.
    per_node: Vec<Vec<Duration>>,
    /// Changes node A did not yet enforce at its first poll after the acknowledgement.
    a_late: usize,
    polls: usize,
}

/// `changes` changes through node A, alternately allowing and removing one address of
/// account `probe`; after each acknowledgement, every node's check for that address is polled
/// until all of them give the new answer.
fn ack_to_enforced(fleet: &Fleet, changes: usize) -> Enforcement {
    let addr = "198.18.201.7";
    let mut ctl = Conn::open(&fleet.nodes[0].host.socket());
    let mut checkers: Vec<Line> = fleet.nodes.iter().map(|n| Line::connect(&n.host.socket())).collect();
    let mut e = Enforcement {
        ack: Vec::new(),
        after_ack: Vec::new(),
        total: Vec::new(),
        per_node: vec![Vec::new(); fleet.nodes.len()],
        a_late: 0,
        polls: 0,
    };
    for round in 0..changes {
        let adding = round % 2 == 0;
        let request = if adding {
            json!({"cmd": "allow_add", "account": "probe", "cidr": format!("{addr}/32")})
        } else {
            // The polls count as the customer's sign-ins from the address: forced past the guard.
            json!({"cmd": "allow_remove", "account": "probe", "cidr": format!("{addr}/32"), "force": true})
        };
        let started = Instant::now();
        ctl.ok(request);
        let ack = started.elapsed();
        let mut done: Vec<Option<Duration>> = vec![None; checkers.len()];
        let deadline = started + ENFORCE_WITHIN;
        for poll in 0..10_000_000 {
            for (k, checker) in checkers.iter_mut().enumerate() {
                if done[k].is_none() && checker.allowed("probe", addr) == adding {
                    done[k] = Some(started.elapsed());
                } else if done[k].is_none() && k == 0 && poll == 0 {
                    e.a_late += 1;
                }
            }
            e.polls += 1;
            if done.iter().all(Option::is_some) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "change {round} not enforced everywhere within {ENFORCE_WITHIN:?}: {done:?}"
            );
        }
        let last = done.iter().map(|d| d.expect("every node answered")).max().unwrap();
        for (k, d) in done.iter().enumerate() {
            e.per_node[k].push(d.unwrap());
        }
        e.ack.push(ack);
        e.after_ack.push(last.saturating_sub(ack));
        e.total.push(last);
    }
    for v in [&mut e.ack, &mut e.after_ack, &mut e.total].into_iter().chain(e.per_node.iter_mut()) {
        v.sort_unstable();
    }
    e
}

/// `n` sequential changes through node A; changes per second.
fn change_rate(node: &FleetNode, n: usize) -> f64 {
    let mut ctl = Conn::open(&node.host.socket());
    let started = Instant::now();
    add_and_remove(&mut ctl, "probe", "198.18.202.7/32", n);
    n as f64 / started.elapsed().as_secs_f64()
}

/// `n` changes of `account` through `ctl`, each acknowledged: `cidr` added, then removed
/// (forced past the lockout guard), and so on.
fn add_and_remove(ctl: &mut Conn, account: &str, cidr: &str, n: usize) {
    for i in 0..n {
        if i % 2 == 0 {
            ctl.ok(json!({"cmd": "allow_add", "account": account, "cidr": cidr}));
        } else {
            ctl.ok(json!({"cmd": "allow_remove", "account": account, "cidr": cidr, "force": true}));
        }
    }
}

/// `clients` connections to node A at once, each alternating an add and a removal on an
/// account of its own, `per_client` changes each; changes per second, all together.
fn concurrent_change_rate(node: &FleetNode, clients: usize, per_client: usize) -> f64 {
    for c in 0..clients {
        node.host.ok(json!({"cmd": "account_add", "account": format!("busy{c}")}));
    }
    let socket = node.host.socket();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for c in 0..clients {
            let socket = &socket;
            scope.spawn(move || {
                let mut ctl = Conn::open(socket);
                add_and_remove(&mut ctl, &format!("busy{c}"), &format!("198.18.203.{c}/32"), per_client);
            });
        }
    });
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}

/// etcd's puts from `clients` tasks at once on one client (its connections shared, as a
/// node's are), `per_client` each, each task on a key of its own; puts per second.
fn concurrent_put_rate(ns: &Netns, endpoints: &[String], value_len: usize, clients: usize, per_client: usize) -> f64 {
    ns.run(|| {
        runtime().block_on(async {
            let etcd = Etcd::connect(endpoints, None).await.expect("connect to etcd");
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for c in 0..clients {
                let mut etcd = etcd.clone();
                let value = vec![b'x'; value_len];
                tasks.spawn(async move {
                    for _ in 0..per_client {
                        etcd.put(format!("/bench-etcd/busy{c}"), value.clone(), None).await.expect("put");
                    }
                });
            }
            while let Some(done) = tasks.join_next().await {
                done.expect("a put task");
            }
            (clients * per_client) as f64 / started.elapsed().as_secs_f64()
        })
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

struct EtcdRates {
    value_len: usize,
    puts_per_second: f64,
    txns_per_second: f64,
}

/// etcd's own sequential round trips from `ns` with the daemon's client: `n` puts of a
/// `value_len`-byte value, then `n` transactions shaped like a change (the key unchanged
/// since the last revision seen; the value and an audit-sized record written). Keys outside
/// every fleet's prefix.
fn etcd_rates(ns: &Netns, endpoints: &[String], value_len: usize, n: usize) -> EtcdRates {
    ns.run(|| {
        runtime().block_on(async {
            let mut etcd = Etcd::connect(endpoints, None).await.expect("connect to etcd");
            let value = vec![b'x'; value_len];
            let key = "/bench-etcd/doc";
            let started = Instant::now();
            for _ in 0..n {
                etcd.put(key, value.clone(), None).await.expect("put");
            }
            let puts_per_second = n as f64 / started.elapsed().as_secs_f64();
            let mut revision = etcd.get(key, None).await.expect("get").header().expect("a header").revision();
            let audit = vec![b'a'; 200];
            let started = Instant::now();
            for i in 0..n {
                let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Less, revision + 1)]).and_then([
                    TxnOp::put(key, value.clone(), None),
                    TxnOp::put(format!("/bench-etcd/audit/{i}"), audit.clone(), Some(PutOptions::new())),
                ]);
                let answer = etcd.txn(txn).await.expect("txn");
                assert!(answer.succeeded(), "nothing else writes the key");
                revision = answer.header().expect("a header").revision();
            }
            let txns_per_second = n as f64 / started.elapsed().as_secs_f64();
            EtcdRates { value_len, puts_per_second, txns_per_second }
        })
    })
}

/// The probe account's document as node A wrote it: its size.
fn document_len(ns: &Netns, endpoints: &[String], id: &str) -> usize {
    let key = Keys::new(PREFIX).account(id);
    ns.run(|| {
        runtime().block_on(async {
            let mut etcd = Etcd::connect(endpoints, None).await.expect("connect to etcd");
            let answer = etcd.get(key.as_str(), None).await.expect("get");
            answer.kvs().first().map(|kv| kv.value().len()).expect("the account's document is in etcd")
        })
    })
}

/// Writes `accounts` documents and their slot keys under [`JOIN_PREFIX`], as nodes would have
/// written them, in transactions of [`PUTS_PER_TXN`] puts, [`SEED_PARALLEL`] at a time.
/// Returns the revision of the last one and how long it took.
fn seed(etcd: &EtcdCluster, accounts: usize) -> (i64, Duration) {
    let endpoints = etcd.endpoints_local();
    etcd.netns().run(|| {
        runtime().block_on(async {
            let client = Etcd::connect(&endpoints, None).await.expect("connect to etcd");
            let keys = Keys::new(JOIN_PREFIX);
            let next = Arc::new(AtomicUsize::new(0));
            let per_txn = PUTS_PER_TXN / 2;
            let started = Instant::now();
            let mut writers = tokio::task::JoinSet::new();
            for _ in 0..SEED_PARALLEL {
                let (mut client, keys, next) = (client.clone(), keys.clone(), next.clone());
                writers.spawn(async move {
                    let mut last = 0;
                    for _ in 0..accounts {
                        let first = next.fetch_add(1, Ordering::Relaxed) * per_txn;
                        if first >= accounts {
                            break;
                        }
                        let mut ops = Vec::with_capacity(PUTS_PER_TXN);
                        for a in first..(first + per_txn).min(accounts) {
                            let (id, doc) = (format!("acct{a}"), doc_of(a));
                            ops.push(TxnOp::put(keys.slot(doc.slot), id.as_bytes(), None));
                            ops.push(TxnOp::put(keys.account(&id), encode(&doc), None));
                        }
                        let answer = client.txn(Txn::new().and_then(ops)).await.expect("a seeding transaction");
                        last = last.max(answer.header().expect("a header").revision());
                    }
                    last
                });
            }
            let mut revision = 0;
            while let Some(last) = writers.join_next().await {
                revision = revision.max(last.expect("a seeding task"));
            }
            (revision, started.elapsed())
        })
    })
}

/// Map sizes for `accounts` accounts of 10 entries, as `bench control` sizes them.
fn maps(accounts: usize) -> String {
    let slots = (accounts * 64).next_power_of_two().max(1 << 16);
    format!("[maps]\nslots = {slots}\naccounts = {}\n", accounts + 1024)
}

/// Spawns the daemon of `host` and waits (bounded) until its socket answers; the time taken.
fn start_to_answer(host: &mut Host) -> Duration {
    let started = Instant::now();
    host.spawn(&Launch::default());
    let socket = host.socket();
    for _ in 0..1_000_000 {
        if answers(&socket) {
            return started.elapsed();
        }
        assert!(started.elapsed() < JOIN_WITHIN, "ipaccessd not answering after {JOIN_WITHIN:?}");
        if let Some(status) = host.daemon().child.try_wait().unwrap() {
            panic!("ipaccessd exited during start-up ({status}):\n{}", host.log_text());
        }
        thread::sleep(Duration::from_millis(5));
    }
    unreachable!("bounded by time above")
}

struct Join {
    answered: Duration,
    in_step: Duration,
    enforcing: Duration,
    /// The longest a `status` request waited for its answer meanwhile.
    slowest_status: Duration,
    /// The node's own account of its resync (read from etcd, applied), from its log.
    resync_log: String,
}

/// Starts `node` (empty store and maps) on the seeded fleet and times it to enforcing: its
/// applied revision at `revision` and a check of the last account answered from the policy.
fn join(node: &mut FleetNode, accounts: usize, revision: i64) -> Join {
    let config = format!("{}\n{}", node.config(JOIN_PREFIX, ""), maps(accounts));
    std::fs::write(node.host.path("ipaccessd.toml"), config).unwrap();
    let started = Instant::now();
    let answered = start_to_answer(&mut node.host);
    let last = accounts - 1;
    let (account, source) = (format!("acct{last}"), entries_of(last)[3].addr().to_string());
    let (mut in_step, mut slowest_status) = (None, Duration::ZERO);
    // `status` waits while the node resynchronises (see BENCHMARKS.md): no short timeout.
    let mut ctl = Line::connect_within(&node.host.socket(), JOIN_WITHIN);
    for _ in 0..1_000_000 {
        if in_step.is_none() {
            let asked = Instant::now();
            let applied = ctl.applied_revision();
            slowest_status = slowest_status.max(asked.elapsed());
            if applied >= revision {
                in_step = Some(started.elapsed());
            }
        }
        if let Some(in_step) = in_step
            && ctl.allowed(&account, &source)
        {
            let enforcing = started.elapsed();
            let log = node.host.log_text();
            let resync_log = log.lines().rfind(|l| l.contains("in step with etcd")).unwrap_or("").to_owned();
            return Join { answered, in_step, enforcing, slowest_status, resync_log };
        }
        assert!(started.elapsed() < JOIN_WITHIN, "{} not in step after {JOIN_WITHIN:?}", node.name);
        thread::sleep(Duration::from_millis(10));
    }
    unreachable!("bounded by time above")
}

struct Standalone {
    store_written: Duration,
    first_start: Duration,
    restart: Duration,
}

/// A standalone daemon (no `[cluster]`) whose store holds the same documents: written with
/// the store's own code, started once (loading its fresh maps), stopped, and restarted.
fn standalone(accounts: usize) -> Standalone {
    let mut host = Host::new();
    let state = host.path("state");
    std::fs::create_dir_all(&state).unwrap();
    let started = Instant::now();
    {
        let mut store = Store::open(&state.join("ipaccess.db")).expect("open the store");
        let tx = store.transaction().unwrap();
        for a in 0..accounts {
            tx.put_account_doc(&format!("acct{a}"), &doc_of(a), CREATED_AT).unwrap();
        }
        tx.commit().unwrap();
    }
    let store_written = started.elapsed();
    let config = format!("interfaces = [\"{}\"]\n{}", host.hosts.server_if, maps(accounts));
    std::fs::write(host.path("ipaccessd.toml"), config).unwrap();
    let first_start = start_to_answer(&mut host);
    let status = host.daemon.take().unwrap().terminate();
    assert!(status.is_some_and(|s| s.success()), "SIGTERM did not stop the standalone daemon: {status:?}");
    let restart = start_to_answer(&mut host);
    let last = accounts - 1;
    let mut check = Line::connect(&host.socket());
    assert!(check.allowed(&format!("acct{last}"), &entries_of(last)[3].addr().to_string()));
    Standalone { store_written, first_start, restart }
}

/// The login checks: half allowed, half denied, over the accounts made for them.
fn check_lines() -> Vec<String> {
    (0..4096)
        .map(|i| {
            let a = i % CHECK_ACCOUNTS;
            let addr = if i % 2 == 0 {
                format!("198.18.{}.{}", 210 + a / 8, 1 + i % 200)
            } else {
                format!("198.19.77.{}", i % 250)
            };
            format!("{{\"id\":{i},\"cmd\":\"check\",\"account\":\"chk{a}\",\"addr\":\"{addr}\"}}\n")
        })
        .collect()
}

/// `clients` threads on each socket, each with its own connection, checking back to back for
/// `run`; checks answered per second on each socket.
fn checks(sockets: &[PathBuf], clients: usize, lines: &Arc<Vec<String>>, run: Duration) -> Vec<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<Vec<_>> = sockets
        .iter()
        .map(|socket| {
            (0..clients)
                .map(|n| {
                    let (socket, lines, stop) = (socket.clone(), lines.clone(), stop.clone());
                    thread::spawn(move || {
                        let mut c = Line::connect(&socket);
                        let (mut done, mut i) = (0usize, n * 131);
                        while !stop.load(Ordering::Relaxed) && done < 100_000_000 {
                            c.request(&lines[i % lines.len()]);
                            done += 1;
                            i += 1;
                        }
                        done
                    })
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let answered: Vec<usize> = workers.into_iter().map(|w| w.into_iter().map(|t| t.join().unwrap()).sum()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    answered.into_iter().map(|n| n as f64 / elapsed).collect()
}

/// Requests every etcd member has started serving, by gRPC method, summed over the members
/// (from their Prometheus endpoints, read inside the etcd namespace).
fn etcd_requests(etcd: &EtcdCluster) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for endpoint in etcd.endpoints_local() {
        let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
        let text = etcd.netns().run(|| {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect to etcd");
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: etcd\r\n\r\n").unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).expect("etcd's metrics");
            text
        });
        for line in text.lines().filter(|l| l.starts_with("grpc_server_started_total{")) {
            let method = line.split("grpc_method=\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("?");
            let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            *total.entry(method.to_owned()).or_insert(0) += count as u64;
        }
    }
    total
}

fn main() {
    let switches = ipaccess_tests::bench::switches(
        "bench-fleet",
        &[
            ("--quick", "a joined fleet ten times smaller and shorter runs"),
            ("--join-only", "a new node joining the fleet, alone"),
        ],
    );
    let (quick, join_only) = (switches.contains("--quick"), switches.contains("--join-only"));
    let scale = if quick {
        Scale { accounts: 10_000, changes: 200, sequential: 200, run: Duration::from_secs(1) }
    } else {
        Scale { accounts: 100_000, changes: 1_000, sequential: 500, run: Duration::from_secs(3) }
    };
    println!("# ipaccess fleet benchmark");
    println!();
    println!(
        "3 etcd members and 3 ipaccessd nodes, each in network namespaces of its own, on {} CPUs.",
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();

    let mut fleet = Fleet::new(3).expect("start etcd and the nodes' namespaces");
    fleet.start_all();
    if !join_only {
        {
            let a = &fleet.nodes[0];
            a.host.ok(json!({"cmd": "account_add", "account": "probe"}));
            a.host.ok(json!({"cmd": "allow_add", "account": "probe", "cidr": "198.18.200.0/24"}));
            a.host.ok(json!({"cmd": "account_mode", "account": "probe", "mode": "enforce", "force": true}));
        }
        let nodes: Vec<&FleetNode> = fleet.nodes.iter().collect();
        converge(&nodes, applied(nodes[0]));

        // 1. Acknowledgement to enforced on every node.
        let e = ack_to_enforced(&fleet, scale.changes);
        println!("## Acknowledgement to enforced on every node ({} changes through node A)", scale.changes);
        println!();
        println!("| | p50 ms | p99 ms | max ms |");
        println!("|---|---:|---:|---:|");
        let row = |what: &str, v: &[Duration]| {
            println!(
                "| {what} | {:.2} | {:.2} | {:.2} |",
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.99)),
                ms(percentile(v, 1.0))
            );
        };
        row("request to acknowledgement (committed in etcd, enforced on node A)", &e.ack);
        for (k, node) in fleet.nodes.iter().enumerate() {
            row(&format!("request to {}'s check giving the new answer", node.name), &e.per_node[k]);
        }
        row("acknowledgement to every node's check giving it", &e.after_ack);
        row("**request to enforced on every node** (target: p99 <= 100 ms)", &e.total);
        println!();
        println!(
            "Node A's first check after an acknowledgement still gave the old answer: {} of {} changes. Checks sent \
         while polling: {} rounds of up to 3.",
            e.a_late, scale.changes, e.polls
        );
        println!();

        // 2. Change throughput against etcd's own.
        let a = &fleet.nodes[0];
        let changes_per_second = change_rate(a, scale.sequential);
        let doc_len = document_len(&a.host.hosts.server, &a.endpoints, "probe");
        let rates = etcd_rates(&a.host.hosts.server, &a.endpoints, doc_len, scale.sequential);
        println!("## Change throughput through one node (one client, sequential, {} each)", scale.sequential);
        println!();
        println!("| | per second | changes/s ÷ it |");
        println!("|---|---:|---:|");
        println!("| `allow add` / `allow remove` through node A, each acknowledged | {changes_per_second:.0} | 1.00 |");
        println!(
            "| etcd put of a {}-byte value (`etcd-client`, from node A's namespace) | {:.0} | **{:.2}** |",
            rates.value_len,
            rates.puts_per_second,
            changes_per_second / rates.puts_per_second
        );
        println!(
            "| etcd transaction shaped like a change (a compare, that value, a 200-byte audit record) | {:.0} | {:.2} |",
            rates.txns_per_second,
            changes_per_second / rates.txns_per_second
        );
        let per_client = scale.sequential / 2;
        let concurrent = concurrent_change_rate(a, CHANGE_CLIENTS, per_client);
        let concurrent_puts =
            concurrent_put_rate(&a.host.hosts.server, &a.endpoints, doc_len, CHANGE_CLIENTS, per_client);
        println!(
            "| {CHANGE_CLIENTS} clients at once through node A, {per_client} changes each, each on its own account | \
             {concurrent:.0} | |"
        );
        println!(
            "| etcd puts from {CHANGE_CLIENTS} tasks at once on one client, {per_client} each | {concurrent_puts:.0} | \
             **{:.2}** |",
            concurrent / concurrent_puts
        );
        println!();

        // 3. Login checks on 3 nodes against 1.
        for i in 0..CHECK_ACCOUNTS {
            let id = format!("chk{i}");
            a.host.ok(json!({"cmd": "account_add", "account": id}));
            a.host.ok(json!({"cmd": "allow_add", "account": id, "cidr": format!("198.18.{}.0/24", 210 + i / 8)}));
            a.host.ok(json!({"cmd": "account_mode", "account": id, "mode": "enforce", "force": true}));
        }
        converge(&nodes, applied(a));
        let lines = Arc::new(check_lines());
        let sockets: Vec<PathBuf> = fleet.nodes.iter().map(|n| n.host.socket()).collect();
        let one = checks(&sockets[..1], CLIENTS, &lines, scale.run)[0];
        let one_wide = checks(&sockets[..1], CLIENTS * sockets.len(), &lines, scale.run)[0];
        let (revision_before, requests_before) = (fleet.etcd.revision().unwrap(), etcd_requests(&fleet.etcd));
        let all = checks(&sockets, CLIENTS, &lines, scale.run);
        let (revision_after, requests_after) = (fleet.etcd.revision().unwrap(), etcd_requests(&fleet.etcd));
        let sum: f64 = all.iter().sum();
        println!("## Login checks: 3 nodes together against 1 ({} s per point)", scale.run.as_secs());
        println!();
        println!("| | clients | checks/s | ÷ one node, {CLIENTS} clients |");
        println!("|---|---:|---:|---:|");
        println!("| node A alone | {CLIENTS} | {one:.0} | 1.00 |");
        println!(
            "| node A alone (the machine's limit: the same client count as below) | {} | {one_wide:.0} | {:.2} |",
            CLIENTS * 3,
            one_wide / one
        );
        for (node, rate) in fleet.nodes.iter().zip(&all) {
            println!("| {} while all three are checked | {CLIENTS} | {rate:.0} | {:.2} |", node.name, rate / one);
        }
        println!("| **3 nodes together** | {} | {sum:.0} | **{:.2}** |", CLIENTS * 3, sum / one);
        println!();
        let mut grown: Vec<String> = requests_after
            .iter()
            .filter_map(|(m, &after)| {
                let d = after.saturating_sub(requests_before.get(m).copied().unwrap_or(0));
                (d > 0).then(|| format!("{m} {d}"))
            })
            .collect();
        if grown.is_empty() {
            grown.push("none".into());
        }
        println!(
            "etcd during the 3-node run: revision {revision_before} before, {revision_after} after; gRPC requests \
         started on its members (including the 2 etcdctl reads of the revision and the nodes' once-a-second \
         probes): {}; checks answered: {:.0}.",
            grown.join(", "),
            sum * scale.run.as_secs_f64()
        );
        println!();
    }
    // 4. A new node joining a large fleet, against a standalone restart.
    let (revision, seeded) = seed(&fleet.etcd, scale.accounts);
    let total = scale.accounts * ENTRIES;
    let mut newcomer = FleetNode::new(&mut fleet.etcd, "node-d").expect("link a fourth node to etcd");
    let j = join(&mut newcomer, scale.accounts, revision);
    newcomer.stop();
    drop(newcomer);
    let s = standalone(scale.accounts);
    println!("## A new node joining a fleet of {} accounts and {total} entries", scale.accounts);
    println!();
    println!("| | seconds |");
    println!("|---|---:|");
    println!(
        "| seeding etcd (documents and slot keys, {PUTS_PER_TXN} puts a transaction, {SEED_PARALLEL} in flight; not part of the figure) | {:.2} |",
        seeded.as_secs_f64()
    );
    println!("| new node: start to its first answered request | {:.2} |", j.answered.as_secs_f64());
    println!(
        "| new node: the longest a `status` request waited for its answer meanwhile | {:.2} |",
        j.slowest_status.as_secs_f64()
    );
    println!(
        "| new node: start to its applied revision at the fleet's ({revision}) | {:.2} |",
        j.in_step.as_secs_f64()
    );
    println!(
        "| **new node: start to enforcing** (in step, and a check answered from the policy) | {:.2} |",
        j.enforcing.as_secs_f64()
    );
    println!(
        "| standalone daemon: the same documents written into its store (not part of the figure) | {:.2} |",
        s.store_written.as_secs_f64()
    );
    println!("| standalone daemon: first start on that store, empty maps | {:.2} |", s.first_start.as_secs_f64());
    println!(
        "| **standalone daemon: restart to its first answered request** (baseline) | {:.2} |",
        s.restart.as_secs_f64()
    );
    println!();
    println!("The new node's log: `{}`", j.resync_log.trim());
    println!();
    println!(
        "Joining ÷ standalone restart: **{:.1}x** (target <= 3x); joining ÷ standalone first start: {:.1}x.",
        j.enforcing.as_secs_f64() / s.restart.as_secs_f64(),
        j.enforcing.as_secs_f64() / s.first_start.as_secs_f64()
    );
}
