//! `cargo xtask bench control`: the control plane of a real ipaccessd, in a network namespace
//! with its filter on a real veth.
//!
//! 1. Bulk load: 1,000,000 allowlist entries (100,000 accounts x 10) from an empty start with
//!    `ipaccessctl import`. Baseline: the same rows written straight into a fresh store in
//!    one transaction, with no daemon, socket or kernel (the storage floor).
//! 2. Restart to ready with those entries (SIGTERM, start, first answered request).
//!    Baseline: the first start, with an empty store.
//! 3. `allow add` acknowledged to enforced: after each acknowledgement one UDP datagram from
//!    the newly allowed source to the account's bound port must come back. Baseline: the
//!    same round trip to an unbound port.
//! 4. Login checks per second, their latency and the daemon's CPU time per check, with 1, 16
//!    and 64 clients. Baseline: an echo server on a Unix socket answering the same lines, one
//!    thread per connection. Then 16 clients again while an admin adds and removes an entry at
//!    50 changes/s; baseline: the 16 clients without the admin.
//! 5. What recording those checks costs in storage: 16 clients checking for 60 s must grow
//!    the store (database and WAL, after a checkpoint) by at most 10 MB.
//!
//! `--quick` makes the policy ten times smaller and the runs shorter (a smoke run);
//! `--import-only` measures the bulk load alone (e.g. to profile the daemon during it);
//! `--adds-only` stops after step 3; `--checks-only` skips steps 3 and 5 (e.g. to profile the
//! daemon while it answers checks).

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use ipaccess::{
    protocol::{AccountState, Mode},
    store::Store,
};
use ipaccess_tests::{
    daemon::{Daemon, TempDir, binaries},
    netns::{BpfFs, TestHosts, UdpEchoServer},
};
use ipnet::IpNet;

const ENTRIES: usize = 10;
const ENFORCE_ROUNDS: usize = 1000;

struct Scale {
    accounts: usize,
    run: Duration,
    /// How long 16 clients check for the storage figure.
    storage_run: Duration,
}

/// What 16 clients checking for 60 s may add to the store: 10 MB.
const STORAGE_BUDGET_PER_MINUTE: f64 = 10e6;

/// Account `a`'s allowlist: 8 IPv4 hosts, an IPv4 /24 and an IPv6 /64, all inside the
/// test ranges (198.18.0.0/15, fd00::/8). Entries are data only: no traffic uses them.
fn entries_of(a: usize) -> Vec<IpNet> {
    let host = |n: usize| format!("198.18.{}.{}/32", (n >> 8) & 0xff, n & 0xff).parse().unwrap();
    let mut nets: Vec<IpNet> = (0..8).map(|e| host((a * 8 + e) % 65_536)).collect();
    nets.push(format!("198.19.{}.0/24", a % 256).parse().unwrap());
    nets.push(format!("fd00:{:x}:{:x}::/64", a >> 16, a & 0xffff).parse().unwrap());
    nets
}

/// A source allowed for account `a`, and one it does not allow.
fn allowed_source(a: usize, i: usize) -> String {
    entries_of(a)[i % 8].addr().to_string()
}

fn import_file(dir: &Path, accounts: usize) -> std::path::PathBuf {
    let path = dir.join("import.jsonl");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for a in 0..accounts {
        let entries: Vec<String> = entries_of(a).iter().map(|n| format!("{{\"cidr\":\"{n}\"}}")).collect();
        writeln!(out, "{{\"account\":\"acct{a}\",\"mode\":\"enforce\",\"entries\":[{}]}}", entries.join(",")).unwrap();
    }
    out.flush().unwrap();
    path
}

/// The storage floor: the same accounts and rows, one transaction, no daemon.
fn store_only(dir: &Path, accounts: usize) -> Duration {
    let path = dir.join("baseline.db");
    let started = Instant::now();
    let mut store = Store::open(&path).unwrap();
    let tx = store.transaction().unwrap();
    for a in 0..accounts {
        let id = format!("acct{a}");
        tx.add_account(&id, None, AccountState::Active, Mode::Enforce, 0).unwrap();
        let entries: Vec<(IpNet, Option<String>)> = entries_of(a).into_iter().map(|n| (n, None)).collect();
        tx.replace_entries(&id, &entries, 0, 0).unwrap();
    }
    tx.commit().unwrap();
    started.elapsed()
}

/// One connection sending request lines and reading reply lines.
struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
}

impl Client {
    fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Client { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream), line: String::new() }
    }

    fn request(&mut self, request: &str) -> &str {
        self.writer.write_all(request.as_bytes()).unwrap();
        self.line.clear();
        self.reader.read_line(&mut self.line).unwrap();
        assert!(!self.line.contains("\"error\""), "request failed: {request} -> {}", self.line);
        &self.line
    }
}

/// The checks the clients send, half allowed and half denied, over many accounts; another
/// `salt` picks other accounts (so that they make rows the store does not have yet).
fn check_lines(accounts: usize, salt: usize) -> Vec<String> {
    (0..4096)
        .map(|i| {
            let a = (i * 7919 + salt) % accounts;
            let ip =
                if i % 2 == 0 { allowed_source(a, i) } else { format!("198.19.{}.{}", (a + 1) % 256, i % 250 + 1) };
            format!("{{\"id\":{i},\"cmd\":\"check\",\"account\":\"acct{a}\",\"addr\":\"{ip}\"}}\n")
        })
        .collect()
}

struct Figures {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

fn percentile(sorted_ns: &[u64], q: f64) -> f64 {
    sorted_ns[((sorted_ns.len() as f64 * q) as usize).min(sorted_ns.len() - 1)] as f64 / 1000.0
}

/// `clients` threads, each with its own connection, sending checks back to back for `run`.
fn measure(socket: &Path, clients: usize, lines: &Arc<Vec<String>>, run: Duration) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..clients)
        .map(|n| {
            let (socket, lines, stop) = (socket.to_path_buf(), lines.clone(), stop.clone());
            thread::spawn(move || {
                let mut c = Client::connect(&socket);
                let mut latencies = Vec::new();
                let mut i = n * 131;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    c.request(&lines[i % lines.len()]);
                    latencies.push(started.elapsed().as_nanos() as u64);
                    i += 1;
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u64> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    Figures { per_second: all.len() as f64 / elapsed, p50_us: percentile(&all, 0.50), p99_us: percentile(&all, 0.99) }
}

/// Admin changes per second while clients check.
const ADMIN_CHANGES_PER_SECOND: u32 = 50;

struct AdminLoad {
    changes_per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `measure` while one admin connection adds and removes an entry of its own account at a
/// steady [`ADMIN_CHANGES_PER_SECOND`] (each change durable and in the kernel when answered).
fn measure_with_admin(socket: &Path, clients: usize, lines: &Arc<Vec<String>>, run: Duration) -> (Figures, AdminLoad) {
    let mut ctl = Client::connect(socket);
    ctl.request("{\"cmd\":\"account_add\",\"account\":\"churn\"}\n");
    let stop = Arc::new(AtomicBool::new(false));
    let admin = {
        let (stop, every) = (stop.clone(), Duration::from_secs(1) / ADMIN_CHANGES_PER_SECOND);
        thread::spawn(move || {
            let (started, mut latencies) = (Instant::now(), Vec::new());
            let mut next = started;
            while !stop.load(Ordering::Relaxed) {
                let cmd = if latencies.len() % 2 == 0 { "allow_add" } else { "allow_remove" };
                let sent = Instant::now();
                ctl.request(&format!("{{\"cmd\":\"{cmd}\",\"account\":\"churn\",\"cidr\":\"198.18.201.0/24\"}}\n"));
                latencies.push(sent.elapsed().as_nanos() as u64);
                // A steady rate: the next change is due one period after this one was.
                next += every;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (latencies, started.elapsed())
        })
    };
    let figures = measure(socket, clients, lines, run);
    stop.store(true, Ordering::Relaxed);
    let (mut latencies, elapsed) = admin.join().unwrap();
    latencies.sort_unstable();
    let load = AdminLoad {
        changes_per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_us: percentile(&latencies, 0.5),
        p99_us: percentile(&latencies, 0.99),
    };
    (figures, load)
}

/// The transport alone: reads request lines and answers each with a fixed check reply.
fn start_echo(socket: &Path) {
    let listener = UnixListener::bind(socket).expect("bind the echo socket");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            thread::spawn(move || {
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let reply = b"{\"id\":1,\"ok\":{\"allowed\":true,\"hint\":\"\",\"reason\":\"allowed\"}}\n";
                while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    if writer.write_all(reply).is_err() {
                        break;
                    }
                    line.clear();
                }
            });
        }
    });
}

/// How long [`one_datagram`] waits for an echo.
const DROP_WAIT: Duration = Duration::from_millis(500);

/// One datagram out, its echo back: the round-trip time, or None if nothing came back
/// within [`DROP_WAIT`]. No retry: a first datagram that is dropped counts as a failure.
fn one_datagram(sock: &UdpSocket, round: usize) -> Option<Duration> {
    let payload = (round as u64).to_le_bytes();
    let started = Instant::now();
    sock.send(&payload).ok()?;
    let mut buf = [0u8; 16];
    loop {
        let left = DROP_WAIT.checked_sub(started.elapsed())?;
        sock.set_read_timeout(Some(left)).ok()?;
        match sock.recv(&mut buf) {
            Ok(n) if buf[..n] == payload => return Some(started.elapsed()),
            Ok(_) => continue, // a late echo of an earlier round
            Err(_) => return None,
        }
    }
}

/// Latencies as p50, p90 and p99, in µs.
type Percentiles = [f64; 3];

struct Enforcement {
    ack: Percentiles,
    /// The adds that came right after a dropped datagram's wait (a pause of the timeout),
    /// and the others, back to back with the previous round.
    after_pause: Percentiles,
    back_to_back: Percentiles,
    after_ack: Percentiles,
    baseline: Percentiles,
    dropped_after_ack: usize,
    passed_after_removal: usize,
}

/// `allow add` then, as soon as it is acknowledged, one datagram from the new source to the
/// account's bound UDP port; then `allow remove`, and the next datagram must be dropped
/// (checked every tenth round, since a drop costs the whole timeout).
fn add_to_enforced(hosts: &TestHosts, socket: &Path) -> Enforcement {
    let bound = SocketAddr::new(hosts.server_v4.into(), 7001);
    let unbound = SocketAddr::new(hosts.server_v4.into(), 7002);
    let _servers = [
        UdpEchoServer::start_in(&hosts.server, bound).unwrap(),
        UdpEchoServer::start_in(&hosts.server, unbound).unwrap(),
    ];
    let mut ctl = Client::connect(socket);
    ctl.request("{\"cmd\":\"account_add\",\"account\":\"probe\"}\n");
    ctl.request(&format!(
        "{{\"cmd\":\"bind_add\",\"account\":\"probe\",\"addr\":\"{}\",\"port\":7001,\"proto\":\"udp\"}}\n",
        bound.ip()
    ));
    ctl.request("{\"cmd\":\"allow_add\",\"account\":\"probe\",\"cidr\":\"198.18.200.0/24\"}\n");
    ctl.request("{\"cmd\":\"account_mode\",\"account\":\"probe\",\"mode\":\"enforce\",\"force\":true}\n");
    // Sockets made inside the client namespace stay there; one per (source, destination).
    let sockets: Vec<(IpAddr, UdpSocket, UdpSocket)> = hosts.client.run(|| {
        hosts
            .client_v4
            .iter()
            .map(|&src| {
                let connect = |dst| {
                    let s = UdpSocket::bind(SocketAddr::new(src.into(), 0)).unwrap();
                    s.connect(dst).unwrap();
                    s
                };
                (IpAddr::from(src), connect(bound), connect(unbound))
            })
            .collect()
    });
    // Warm up neighbour entries and the echo servers.
    for (_, to_bound, to_unbound) in &sockets {
        let _ = one_datagram(to_unbound, usize::MAX);
        let _ = one_datagram(to_bound, usize::MAX - 1);
    }
    let (mut ack, mut after_ack, mut baseline) = (Vec::new(), Vec::new(), Vec::new());
    let (mut after_pause, mut back_to_back) = (Vec::new(), Vec::new());
    let (mut dropped_after_ack, mut passed_after_removal) = (0, 0);
    for round in 0..ENFORCE_ROUNDS {
        let (src, to_bound, to_unbound) = &sockets[round % sockets.len()];
        if let Some(rtt) = one_datagram(to_unbound, round) {
            baseline.push(rtt.as_nanos() as u64);
        }
        let started = Instant::now();
        ctl.request(&format!("{{\"cmd\":\"allow_add\",\"account\":\"probe\",\"cidr\":\"{src}/32\"}}\n"));
        let took = started.elapsed().as_nanos() as u64;
        ack.push(took);
        // The previous round ended waiting out a datagram that was (rightly) dropped.
        if round % 10 == 1 {
            after_pause.push(took)
        } else {
            back_to_back.push(took)
        }
        match one_datagram(to_bound, round) {
            Some(rtt) => after_ack.push(rtt.as_nanos() as u64),
            None => dropped_after_ack += 1,
        }
        ctl.request(&format!(
            "{{\"cmd\":\"allow_remove\",\"account\":\"probe\",\"cidr\":\"{src}/32\",\"force\":true}}\n"
        ));
        if round % 10 == 0 && one_datagram(to_bound, round + ENFORCE_ROUNDS).is_some() {
            passed_after_removal += 1;
        }
    }
    for v in [&mut ack, &mut after_pause, &mut back_to_back, &mut after_ack, &mut baseline] {
        v.sort_unstable();
        if v.is_empty() {
            v.push(0);
        }
    }
    let percentiles = |v: &[u64]| [0.5, 0.9, 0.99].map(|p| percentile(v, p));
    Enforcement {
        ack: percentiles(&ack),
        after_pause: percentiles(&after_pause),
        back_to_back: percentiles(&back_to_back),
        after_ack: percentiles(&after_ack),
        baseline: percentiles(&baseline),
        dropped_after_ack,
        passed_after_removal,
    }
}

struct World {
    hosts: TestHosts,
    bpffs: BpfFs,
    dir: TempDir,
}

impl World {
    fn socket(&self) -> std::path::PathBuf {
        self.dir.0.join("ipaccessd.sock")
    }

    /// Starts the daemon; the time until it answers its first request.
    fn start(&self, accounts: usize) -> (Daemon, Duration) {
        let config = self.dir.0.join("ipaccessd.toml");
        // Room for the policy: tables of 16 slots per account, with slack for rebuilds.
        let slots = (accounts * 64).next_power_of_two().max(1 << 16);
        std::fs::write(&config, format!("[maps]\nslots = {slots}\naccounts = {}\n", accounts + 1024)).unwrap();
        let (socket, state, log) = (self.socket(), self.dir.0.join("state"), self.dir.0.join("ipaccessd.log"));
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--iface",
            &self.hosts.server_if,
            "--state-dir",
            state.to_str().unwrap(),
            "--socket",
            socket.to_str().unwrap(),
            "--bpffs",
            self.bpffs.path().to_str().unwrap(),
        ];
        let started = Instant::now();
        let daemon = Daemon::start_within(self.hosts.server.name(), &args, &socket, &log, Duration::from_secs(120));
        (daemon, started.elapsed())
    }
}

fn main() {
    let switches = ipaccess_tests::bench::switches(
        "bench-control",
        &[
            ("--quick", "a policy ten times smaller and shorter runs (a smoke run)"),
            ("--import-only", "the bulk load alone"),
            ("--adds-only", "stop after `allow add` acknowledged to enforced"),
            ("--checks-only", "the load and restart, then the login checks alone"),
        ],
    );
    let (quick, import_only, adds_only, checks_only) = (
        switches.contains("--quick"),
        switches.contains("--import-only"),
        switches.contains("--adds-only"),
        switches.contains("--checks-only"),
    );
    let scale = if quick {
        Scale { accounts: 10_000, run: Duration::from_secs(1), storage_run: Duration::from_secs(10) }
    } else {
        Scale { accounts: 100_000, run: Duration::from_secs(3), storage_run: Duration::from_secs(60) }
    };
    let world = World { hosts: TestHosts::new().unwrap(), bpffs: BpfFs::new().unwrap(), dir: TempDir::new() };
    let socket = world.socket();
    let total = scale.accounts * ENTRIES;

    println!("# ipaccess control benchmark");
    println!();
    println!(
        "{} accounts x {ENTRIES} entries ({total} entries), enforce mode, filter attached to a veth.",
        scale.accounts
    );
    println!();

    // 1. Bulk load from an empty start.
    let (daemon, empty_start) = world.start(scale.accounts);
    let file = import_file(&world.dir.0, scale.accounts);
    let floor = store_only(&world.dir.0, scale.accounts);
    let started = Instant::now();
    let out = Command::new(&binaries().ctl)
        .args(["--socket", socket.to_str().unwrap(), "--json", "import", file.to_str().unwrap()])
        .output()
        .expect("run ipaccessctl import");
    let load = started.elapsed();
    assert!(out.status.success(), "import failed: {}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["entries"], total as u64, "{summary}");
    println!("## Bulk load and restart");
    println!();
    println!("| step | seconds | baseline | baseline seconds | ratio |");
    println!("|---|---:|---|---:|---:|");
    println!(
        "| load {total} entries from empty (`ipaccessctl import`, {} batches) | {:.2} | same rows into a bare store, one transaction | {:.2} | {:.1}x |",
        summary["batches"],
        load.as_secs_f64(),
        floor.as_secs_f64(),
        load.as_secs_f64() / floor.as_secs_f64()
    );
    if import_only {
        return;
    }

    // 2. Restart to ready with them.
    let mut daemon = daemon;
    assert!(daemon.terminate().is_some_and(|s| s.success()), "SIGTERM did not stop the daemon");
    let (daemon, restart) = world.start(scale.accounts);
    println!(
        "| restart to ready with {total} entries | {:.2} | first start, empty store | {:.2} | {:.1}x |",
        restart.as_secs_f64(),
        empty_start.as_secs_f64(),
        restart.as_secs_f64() / empty_start.as_secs_f64()
    );
    println!();

    // 3. Acknowledged to enforced.
    if !checks_only {
        report_adds(&world.hosts, &socket);
    }
    if adds_only {
        return;
    }

    // 4. Login checks.
    let echo = world.dir.0.join("echo.sock");
    start_echo(&echo);
    let lines = Arc::new(check_lines(scale.accounts, 0));
    println!("## Login checks ({} s per point)", scale.run.as_secs());
    println!();
    println!(
        "| clients | checks/s | p50 µs | p99 µs | daemon's CPU µs/check (user + system) | echo req/s | checks/s ÷ echo |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut without_admin = None;
    for clients in [1, 16, 64] {
        let baseline = measure(&echo, clients, &lines, scale.run);
        let cpu_before = cpu_time(&daemon);
        let real = measure(&socket, clients, &lines, scale.run);
        let (user, system) = cpu_time(&daemon).since(cpu_before);
        let checks = real.per_second * scale.run.as_secs_f64();
        if clients == 16 {
            without_admin = Some((real.per_second, real.p99_us));
        }
        println!(
            "| {clients} | {:.0} | {:.0} | {:.0} | {:.1} + {:.1} | {:.0} | {:.2} |",
            real.per_second,
            real.p50_us,
            real.p99_us,
            user.as_secs_f64() * 1e6 / checks,
            system.as_secs_f64() * 1e6 / checks,
            baseline.per_second,
            real.per_second / baseline.per_second
        );
    }
    println!();
    let (alone, alone_p99) = without_admin.expect("measured with 16 clients");
    let (real, admin) = measure_with_admin(&socket, 16, &lines, scale.run);
    println!("### 16 clients while an admin makes {ADMIN_CHANGES_PER_SECOND} changes/s");
    println!();
    println!(
        "| checks/s | p50 µs | p99 µs | without admin: checks/s | p99 µs | checks/s ÷ without | admin changes/s | change p50 µs | change p99 µs |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {:.0} | {:.0} | {:.0} | {alone:.0} | {alone_p99:.0} | {:.2} | {:.1} | {:.0} | {:.0} |",
        real.per_second,
        real.p50_us,
        real.p99_us,
        real.per_second / alone,
        admin.changes_per_second,
        admin.p50_us,
        admin.p99_us
    );
    println!();

    if checks_only {
        return;
    }

    // 5. The storage those checks cost, measured between two clean stops (each closes the
    // store, which checkpoints the WAL into the database).
    let mut daemon = daemon;
    assert!(daemon.terminate().is_some_and(|s| s.success()), "SIGTERM did not stop the daemon");
    let before = store_bytes(&world.dir.0.join("state"));
    let (mut daemon, _) = world.start(scale.accounts);
    // Checks of other accounts than the ones above: each (account, address, outcome) is a new row.
    let lines = Arc::new(check_lines(scale.accounts, scale.accounts / 2));
    let load = measure(&socket, 16, &lines, scale.storage_run);
    assert!(daemon.terminate().is_some_and(|s| s.success()), "SIGTERM did not stop the daemon");
    let after = store_bytes(&world.dir.0.join("state"));
    let seconds = scale.storage_run.as_secs_f64();
    let checks = load.per_second * seconds;
    let growth = after.saturating_sub(before) as f64;
    let budget = STORAGE_BUDGET_PER_MINUTE * seconds / 60.0;
    println!("## Storage cost of recording login checks (16 clients, {seconds:.0} s)");
    println!();
    println!("| checks answered | checks/s | store before | store after | growth | budget | growth ÷ budget |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {checks:.0} | {:.0} | {} | {} | {:.2} MB | {:.1} MB | {:.3} |",
        load.per_second,
        mb(before),
        mb(after),
        growth / 1e6,
        budget / 1e6,
        growth / budget
    );
    println!();
    println!("Bytes per check: {:.3} (database and WAL, after a checkpoint).", growth / checks.max(1.0));
    assert!(growth <= budget, "the store grew by {growth} bytes, over the budget of {budget}");
}

/// Step 3: `allow add` acknowledged to enforced, printed as a table.
fn report_adds(hosts: &TestHosts, socket: &Path) {
    let e = add_to_enforced(hosts, socket);
    println!("## `allow add` acknowledged to enforced ({ENFORCE_ROUNDS} rounds)");
    println!();
    println!("| | p50 µs | p90 µs | p99 µs |");
    println!("|---|---:|---:|---:|");
    let rows = [
        ("`allow add` request to acknowledgement (durable, in the maps)".to_string(), &e.ack),
        (
            format!(
                "the same, the {} adds right after a round that waited out a dropped datagram ({} ms idle)",
                ENFORCE_ROUNDS / 10,
                DROP_WAIT.as_millis()
            ),
            &e.after_pause,
        ),
        (
            format!(
                "the same, the other {} adds (back to back with the previous round)",
                ENFORCE_ROUNDS - ENFORCE_ROUNDS / 10
            ),
            &e.back_to_back,
        ),
        ("first datagram sent after the acknowledgement, echoed back".to_string(), &e.after_ack),
        ("baseline: the same round trip to an unbound port".to_string(), &e.baseline),
    ];
    for (what, [p50, p90, p99]) in rows {
        println!("| {what} | {p50:.0} | {p90:.0} | {p99:.0} |");
    }
    println!();
    println!(
        "First datagrams dropped after an acknowledged add: {} of {ENFORCE_ROUNDS}; passed after an acknowledged \
         remove: {} of {}.",
        e.dropped_after_ack,
        e.passed_after_removal,
        ENFORCE_ROUNDS.div_ceil(10)
    );
    println!();
}

/// A process's CPU time so far, user and system (`/proc/PID/stat`, in clock ticks).
#[derive(Clone, Copy)]
struct CpuTime {
    user_ticks: u64,
    system_ticks: u64,
}

impl CpuTime {
    /// User and system time spent since `earlier`.
    fn since(self, earlier: CpuTime) -> (Duration, Duration) {
        // SAFETY: sysconf only reads a constant of the system.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let ticks = |n: u64| Duration::from_secs_f64(n as f64 / hz);
        (ticks(self.user_ticks - earlier.user_ticks), ticks(self.system_ticks - earlier.system_ticks))
    }
}

/// The daemon's CPU time so far: what a check costs it, apart from how the machine's two
/// cores were shared with the clients.
fn cpu_time(daemon: &Daemon) -> CpuTime {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.child.id())).expect("read the daemon's stat");
    // Fields after the command name, which is in parentheses and may hold spaces: state is
    // the first, utime the 12th and stime the 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("a stat line").1.split_whitespace().collect();
    let field = |n: usize| fields[n].parse().expect("a tick count");
    CpuTime { user_ticks: field(11), system_ticks: field(12) }
}

/// The store's size in `state`: database and WAL, after a checkpoint. Opening and closing
/// it once more (the daemon is stopped) folds any WAL left behind into the database.
fn store_bytes(state: &Path) -> u64 {
    let db = state.join("ipaccess.db");
    drop(Store::open(&db).expect("open the stopped daemon's store"));
    let size = |file: &str| std::fs::metadata(state.join(file)).map_or(0, |m| m.len());
    size("ipaccess.db") + size("ipaccess.db-wal")
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}
