//! `cargo xtask demo`: a narrated tour of ipaccess on two throwaway hosts.
//!
//! Two network namespaces joined by a veth pair stand for a server and the internet in front
//! of it (198.18.0.0/15 only, so nothing can leave them). The real ipaccessd filters the
//! server's veth with native XDP; the tour configures a customer account with ipaccessctl,
//! shows an allowed and a blocked client, a refused login with its hint, a support override
//! letting the blocked address in, the counters and the activity log.
//!
//! Everything it creates is owned by a guard that undoes it on Drop: namespaces (and the veth
//! pair, which dies with them), the daemon, the TCP service, the temporary directory. Ctrl-C
//! (and SIGTERM, SIGHUP) only raise a flag that every wait checks, so an interrupted tour
//! unwinds through the same guards. xtask cannot use the tests crate's harness: that crate
//! needs the eBPF toolchain that xtask itself installs; the pieces here are the few it needs.

use std::{
    ffi::OsStr,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    mem,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, status, target_dir};

pub(crate) const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The customer's office: on the allowlist.
pub(crate) const OFFICE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// The customer from a new address (their ISP changed it): not on the list, until support helps.
pub(crate) const TRAVELLING: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);
pub(crate) const PORT: u16 = 8080;
pub(crate) const ACCOUNT: &str = "acme";
/// How long a refused connection attempt waits before it counts as blocked.
pub(crate) const BLOCKED_AFTER: Duration = Duration::from_secs(2);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `step`, or fails at once if the tour was interrupted.
pub(crate) fn pause(step: Duration) -> Result<()> {
    check_interrupted()?;
    thread::sleep(step);
    check_interrupted()
}

/// Ctrl-C (and SIGTERM, SIGHUP) only raise [`INTERRUPTED`]: the tour unwinds through its guards.
pub(crate) fn on_interrupt_clean_up() -> Result<()> {
    ctrlc::set_handler(|| {
        if !INTERRUPTED.swap(true, Ordering::Relaxed) {
            eprintln!("\ninterrupted: cleaning up");
        }
    })
    .context("installing the Ctrl-C handler")
}

/// Builds the release binaries the tours run; returns their directory.
pub(crate) fn build_binaries() -> Result<PathBuf> {
    status(&mut cargo(["build", "--release", "-p", "ipaccess", "--bins"]))?;
    Ok(target_dir().join("release"))
}

pub fn run() -> Result<()> {
    on_interrupt_clean_up()?;
    let release = build_binaries()?;
    let result = tour(&release.join("ipaccessd"), &release.join("ipaccessctl"));
    // The guards have run by now: the tour's own scope is closed.
    match &result {
        Ok(()) => println!("\nThe demo is over; everything it created is gone."),
        Err(e) => eprintln!("\nThe demo stopped: {e:#}\nEverything it created is gone."),
    }
    result
}

fn tour(daemon_bin: &Path, ctl_bin: &Path) -> Result<()> {
    // Declared in this order, dropped in the reverse one: service, daemon, namespaces, directory.
    let dir = TempDir::new("ipaccess-demo")?;
    let id = std::process::id();
    heading("1. Two hosts: network namespaces joined by a veth pair");
    let server = Netns::new(format!("ipdemo{id}s"))?;
    let client = Netns::new(format!("ipdemo{id}c"))?;
    println!("   namespaces: {} (server) and {} (client); files in {}", server.name, client.name, dir.0.display());
    veth_pair(&server, &client)?;
    println!("   server {SERVER}; client {OFFICE} (acme's office) and {TRAVELLING} (acme from a new address)");

    heading("2. ipaccessd in the server namespace, filtering its veth with XDP");
    // Small tables: the tour needs a handful of slots, not the production default.
    let daemon = Daemon::start(daemon_bin, &server, &dir.0, "[maps]\nslots = 65536\naccounts = 1024\n")?;
    let ctl = Ctl { bin: ctl_bin.to_path_buf(), socket: daemon.socket.clone(), prompt: "$".into() };
    println!("   ready; ipaccessctl below talks to {}", daemon.socket.display());

    heading(&format!("3. A TCP service on {SERVER}:{PORT} (acme's endpoint)"));
    let service = TcpService::start(&server, SocketAddrV4::new(SERVER, PORT))?;
    println!("   listening");

    heading("4. The customer account: a binding, an allowlist, enforcement");
    ctl.show(&["account", "add", ACCOUNT])?;
    ctl.show(&["bind", "add", ACCOUNT, &format!("{SERVER}:{PORT}")])?;
    ctl.show(&["allow", "add", ACCOUNT, &format!("{OFFICE}/32"), "--label", "office"])?;
    // --client-ip: the change is refused if it would lock out the address the admin uses.
    ctl.show(&["account", "mode", ACCOUNT, "enforce", "--client-ip", &OFFICE.to_string()])?;

    heading("5. Traffic: the office gets in, the new address is dropped in the kernel");
    let target = SocketAddrV4::new(SERVER, PORT);
    expect_connection(&client, OFFICE, target, true)?;
    expect_connection(&client, TRAVELLING, target, false)?;

    heading("6. The customer tries to sign in from the new address");
    let denied = ctl.show_expecting(&["check", ACCOUNT, &TRAVELLING.to_string(), "--method", "password"], 1)?;
    if !denied.contains("address_not_allowed") {
        bail!("expected the login check to be denied with address_not_allowed, got: {denied}");
    }
    println!("result: login from {TRAVELLING}: denied");

    heading("7. Support verifies the customer and grants a temporary override");
    ctl.show(&[
        "override",
        "grant",
        ACCOUNT,
        &TRAVELLING.to_string(),
        "--ttl",
        "1h",
        "--ticket",
        "DEMO-1",
        "--reason",
        "ISP changed the address; ownership verified by phone",
    ])?;
    let allowed = ctl.show(&["check", ACCOUNT, &TRAVELLING.to_string(), "--method", "password"])?;
    if !allowed.starts_with("allowed") {
        bail!("expected the login check to be allowed after the override, got: {allowed}");
    }
    println!("result: login from {TRAVELLING}: allowed");
    expect_connection(&client, TRAVELLING, target, true)?;

    heading("8. Counters from the kernel");
    ctl.show(&["stats", ACCOUNT])?;

    heading("9. The activity log: checks, audited changes, dropped packets");
    // Drop samples reach the log once a second.
    pause(Duration::from_millis(1200))?;
    ctl.show(&["activity", ACCOUNT])?;

    println!("\nconnections the service accepted: {}", service.accepted());
    heading("Cleaning up");
    drop(service);
    drop(daemon);
    drop((client, server));
    drop(dir);
    Ok(())
}

pub(crate) fn heading(text: &str) {
    println!("\n== {text}");
}

/// Connects from `src` in the client namespace and fails the tour unless the outcome is the
/// expected one.
fn expect_connection(client: &Netns, src: Ipv4Addr, dst: SocketAddrV4, allowed: bool) -> Result<()> {
    check_interrupted()?;
    println!("   connecting from {src} to {dst} ...");
    let greeting = client.run(move || tcp_greeting(src, dst))?;
    let outcome = match &greeting {
        Some(text) => format!("connected ({})", text.trim()),
        None => format!("blocked (no answer within {BLOCKED_AFTER:?})"),
    };
    println!("result: {src} -> {dst}: {outcome}");
    if greeting.is_some() != allowed {
        bail!("{src} -> {dst} should have been {}", if allowed { "connected" } else { "blocked" });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ipaccessctl

pub(crate) struct Ctl {
    pub(crate) bin: PathBuf,
    pub(crate) socket: PathBuf,
    /// Shown before each command: `$`, or the node's name on a fleet.
    pub(crate) prompt: String,
}

impl Ctl {
    /// Runs ipaccessctl without showing anything.
    pub(crate) fn quiet(&self, args: &[&str]) -> Result<Output> {
        check_interrupted()?;
        Command::new(&self.bin)
            .args(args)
            .env("IPACCESS_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .output()
            .context("running ipaccessctl")
    }

    pub(crate) fn output(&self, args: &[&str]) -> Result<Output> {
        check_interrupted()?;
        println!("\n{} ipaccessctl {}", self.prompt, shell_words(args));
        let out = self.quiet(args)?;
        for line in String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines()) {
            println!("  {line}");
        }
        Ok(out)
    }

    /// Runs a command that must succeed; returns its standard output.
    pub(crate) fn show(&self, args: &[&str]) -> Result<String> {
        self.show_expecting(args, 0)
    }

    /// Runs a command that must exit with `code` (`check` exits 1 for a denied login).
    pub(crate) fn show_expecting(&self, args: &[&str], code: i32) -> Result<String> {
        let out = self.output(args)?;
        if out.status.code() != Some(code) {
            bail!("`ipaccessctl {}` exited with {}, expected {code}", shell_words(args), out.status);
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The arguments as one would type them: quoted when they hold spaces.
pub(crate) fn shell_words(args: &[&str]) -> String {
    let quoted: Vec<String> =
        args.iter().map(|a| if a.contains(' ') { format!("\"{a}\"") } else { a.to_string() }).collect();
    quoted.join(" ")
}

// ---------------------------------------------------------------------------------------------
// Guards

/// A directory under the system's temporary directory, removed with its contents on Drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// `<tmp>/<prefix>-<pid>`.
    pub(crate) fn new(prefix: &str) -> Result<TempDir> {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        match fs::remove_dir_all(&self.0) {
            Ok(()) => println!("   removed {}", self.0.display()),
            Err(e) => eprintln!("   warning: could not remove {}: {e}", self.0.display()),
        }
    }
}

/// Runs `ip ARGS` and fails with its message unless it succeeds.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A named network namespace, deleted (with its interfaces) on Drop.
pub(crate) struct Netns {
    pub(crate) name: String,
}

impl Netns {
    pub(crate) fn new(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }

    /// Runs `f` on a thread that has joined this namespace (sockets made there stay in it).
    pub(crate) fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        let worker = thread::spawn(move || -> Result<T> {
            let ns = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: a plain syscall on an open namespace file; it moves this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error()).with_context(|| format!("entering {path}"));
            }
            Ok(f())
        });
        worker.join().map_err(|_| anyhow::anyhow!("a thread in namespace {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match ip(&["netns", "del", &self.name]) {
            Ok(()) => println!("   deleted namespace {}", self.name),
            Err(e) => eprintln!("   warning: {e:#}"),
        }
    }
}

/// The veth pair, one end in each namespace and named after it, with the addresses up.
pub(crate) fn veth_pair(server: &Netns, client: &Netns) -> Result<()> {
    let (s, c) = (server.name.as_str(), client.name.as_str());
    ip(&["link", "add", s, "netns", s, "type", "veth", "peer", "name", c, "netns", c])?;
    for (ns, addrs) in [(s, vec![SERVER]), (c, vec![OFFICE, TRAVELLING])] {
        for addr in addrs {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", ns])?;
        }
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", ns, "up"])?;
    }
    Ok(())
}

/// ipaccessd in the server namespace, in its own process group so that a Ctrl-C at the
/// terminal reaches only the tour, which then stops the daemon itself: SIGTERM on Drop,
/// SIGKILL if it has not stopped within five seconds.
pub(crate) struct Daemon {
    child: Child,
    pub(crate) socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Starts the daemon on `config` (the file's text), its files in `dir`.
    pub(crate) fn start(bin: &Path, server: &Netns, dir: &Path, config_text: &str) -> Result<Daemon> {
        let config = dir.join("ipaccessd.toml");
        fs::write(&config, config_text)?;
        let socket = dir.join("ipaccessd.sock");
        let log = dir.join("ipaccessd.log");
        let out = fs::File::create(&log)?;
        // `ip netns exec` gives the daemon a mount namespace with a fresh /sys; ipaccessd mounts
        // bpffs at /sys/fs/bpf there, so the mount and its pins vanish with the daemon.
        let child = Command::new("ip")
            .args(["netns", "exec", &server.name])
            .arg(bin)
            .args([OsStr::new("--config"), config.as_os_str()])
            .args([OsStr::new("--iface"), OsStr::new(&server.name)])
            .args([OsStr::new("--socket"), socket.as_os_str()])
            .args([OsStr::new("--state-dir"), dir.join("state").as_os_str()])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .context("starting ipaccessd")?;
        let mut daemon = Daemon { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !answers(&daemon.socket) {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("ipaccessd exited during start-up ({status}):\n{}", daemon.log_text());
            }
            if Instant::now() > deadline {
                bail!("ipaccessd did not answer within 15 s:\n{}", daemon.log_text());
            }
            pause(Duration::from_millis(50))?;
        }
        for line in daemon.log_text().lines().filter(|l| l.contains("XDP") || l.contains("ready")) {
            println!("   ipaccessd: {line}");
        }
        Ok(daemon)
    }

    pub(crate) fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                println!("   stopped ipaccessd");
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("   ipaccessd did not stop on SIGTERM; killed it");
    }
}

/// Does a daemon answer a status request on `socket`?
fn answers(socket: &Path) -> bool {
    let Ok(stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(2));
    let mut reply = String::new();
    stream.set_read_timeout(timeout).is_ok()
        && (&stream).write_all(b"{\"cmd\":\"status\"}\n").is_ok()
        && BufReader::new(&stream).read_line(&mut reply).is_ok_and(|n| n > 0)
}

/// A TCP service in a namespace that greets each client with the address it came from. Its
/// thread stops on Drop.
pub(crate) struct TcpService {
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    worker: Option<JoinHandle<()>>,
}

impl TcpService {
    pub(crate) fn start(ns: &Netns, addr: SocketAddrV4) -> Result<TcpService> {
        let listener = ns.run(move || TcpListener::bind(addr))?.with_context(|| format!("listening on {addr}"))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop_flag, count) = (stop.clone(), accepted.clone());
        let worker = thread::spawn(move || {
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = conn.set_nonblocking(false);
                        let _ = writeln!(conn, "hello {}, this is acme's service", peer.ip());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(TcpService { stop, accepted, worker: Some(worker) })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        println!("   stopped the TCP service");
    }
}

/// Connects from `src` to `dst` and reads the greeting; `None` if no connection was made
/// within [`BLOCKED_AFTER`]. std cannot choose a connection's source address, hence libc.
pub(crate) fn tcp_greeting(src: Ipv4Addr, dst: SocketAddrV4) -> Option<String> {
    let sockaddr = |addr: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
        sin_zero: [0; 8],
    };
    let len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket syscall; the descriptor is owned at once.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return None;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // On Linux a blocking connect gives up after the send timeout.
    let timeout = libc::timeval { tv_sec: BLOCKED_AFTER.as_secs() as libc::time_t, tv_usec: 0 };
    let (from, to) = (sockaddr(SocketAddrV4::new(src, 0)), sockaddr(dst));
    // SAFETY: valid descriptor, option value and socket addresses of the stated sizes.
    let connected = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) == 0
            && libc::bind(fd.as_raw_fd(), (&from as *const libc::sockaddr_in).cast(), len) == 0
            && libc::connect(fd.as_raw_fd(), (&to as *const libc::sockaddr_in).cast(), len) == 0
    };
    if !connected {
        return None;
    }
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(BLOCKED_AFTER)).ok()?;
    let mut greeting = String::new();
    stream.read_to_string(&mut greeting).ok()?;
    Some(greeting)
}
