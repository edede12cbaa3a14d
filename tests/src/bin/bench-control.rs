//! `cargo xtask bench control`: login checks per second and their latency over the real
//! control socket of a real ipaccessd, with 1, 16 and 64 concurrent clients.
//!
//! Baseline measured in the same run: a Unix-socket echo server answering the same request
//! lines with a fixed reply, one thread per connection (the transport's own cost). Each
//! figure is also given as a ratio to it.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use ipaccess_tests::netns::BpfFs;

const ACCOUNTS: usize = 1_000;
const ENTRIES: usize = 10;
const RUN: Duration = Duration::from_secs(3);

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let path = exe.parent().expect("target dir").join(name);
    assert!(path.exists(), "{} missing: run `cargo build --release -p ipaccess --bins`", path.display());
    path
}

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn start_daemon(dir: &Path, bpffs: &BpfFs, socket: &Path) -> Daemon {
    // An empty configuration: the built-in defaults, whatever /etc holds.
    std::fs::write(dir.join("none.toml"), "").unwrap();
    let child = Command::new(binary("ipaccessd"))
        .args(["--state-dir", dir.to_str().unwrap(), "--socket", socket.to_str().unwrap()])
        .args(["--bpffs", bpffs.path().to_str().unwrap(), "--config", dir.join("none.toml").to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start ipaccessd");
    let daemon = Daemon { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "ipaccessd did not open its socket");
        thread::sleep(Duration::from_millis(50));
    }
    daemon
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

/// A policy of ACCOUNTS accounts in enforce mode with ENTRIES /32 entries each.
fn load_policy(socket: &Path) {
    let mut c = Client::connect(socket);
    for a in 0..ACCOUNTS {
        c.request(&format!("{{\"cmd\":\"account_add\",\"account\":\"acct{a}\"}}\n"));
        for e in 0..ENTRIES {
            let ip = format!("198.18.{}.{}", (a * ENTRIES + e) / 250 % 256, (a * ENTRIES + e) % 250 + 1);
            c.request(&format!("{{\"cmd\":\"allow_add\",\"account\":\"acct{a}\",\"cidr\":\"{ip}/32\"}}\n"));
        }
        c.request(&format!("{{\"cmd\":\"account_mode\",\"account\":\"acct{a}\",\"mode\":\"enforce\",\"force\":true}}\n"));
    }
}

/// The checks the clients send, half allowed and half denied, over many accounts.
fn check_lines() -> Vec<String> {
    (0..4096)
        .map(|i| {
            let a = (i * 7919) % ACCOUNTS;
            let e = a * ENTRIES + i % ENTRIES;
            let ip = if i % 2 == 0 {
                format!("198.18.{}.{}", e / 250 % 256, e % 250 + 1)
            } else {
                format!("198.19.{}.{}", i / 250 % 256, i % 250 + 1)
            };
            format!("{{\"id\":{i},\"cmd\":\"check\",\"account\":\"acct{a}\",\"addr\":\"{ip}\"}}\n")
        })
        .collect()
}

struct Figures {
    per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `clients` threads, each with its own connection, sending checks back to back for RUN.
fn measure(socket: &Path, clients: usize, lines: &Arc<Vec<String>>) -> Figures {
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
    thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u64> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pick = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Figures { per_second: all.len() as f64 / elapsed, p50_us: pick(0.50), p99_us: pick(0.99) }
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

fn main() {
    let dir = std::env::temp_dir().join(format!("ipaccess-bench-control-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bpffs = BpfFs::new().expect("mount a private bpffs");
    let socket = dir.join("ipaccessd.sock");
    let daemon = start_daemon(&dir, &bpffs, &socket);
    let loading = Instant::now();
    load_policy(&socket);
    let load_time = loading.elapsed();
    let echo = dir.join("echo.sock");
    start_echo(&echo);
    let lines = Arc::new(check_lines());

    println!("# ipaccess control benchmark");
    println!();
    println!(
        "Login checks over the control socket of a real ipaccessd ({ACCOUNTS} accounts x {ENTRIES} entries, \
         half the checks allowed), {} s per point. Baseline: an echo server on a Unix socket answering \
         the same lines, one thread per connection.",
        RUN.as_secs()
    );
    println!();
    println!("Policy loaded one request at a time (each a durable commit) in {:.1} s.", load_time.as_secs_f64());
    println!();
    println!("| clients | checks/s | p50 µs | p99 µs | echo req/s | checks/s ÷ echo |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for clients in [1, 16, 64] {
        let baseline = measure(&echo, clients, &lines);
        let real = measure(&socket, clients, &lines);
        println!(
            "| {clients} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
            real.per_second,
            real.p50_us,
            real.p99_us,
            baseline.per_second,
            real.per_second / baseline.per_second
        );
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
