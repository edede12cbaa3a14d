//! Network-namespace test harness: named namespaces, a veth-joined client/server pair,
//! a private bpffs, and bounded traffic helpers (TCP, UDP, ICMP).
//!
//! Everything here needs root. Test addresses are 198.18.0.0/15 and fd00::/8 only, and the
//! only links are veth pairs whose both ends live in namespaces we created, so no traffic can
//! leave them. Every wait is bounded by a timeout.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Upper bound for any helper command (`ip ...`, `ip netns exec ...`).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// Process-wide counter: makes namespace, mount and ICMP-id values unique across parallel tests.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// `ip netns add` bind-mounts /run/netns on first use; serialising add/del keeps parallel tests
/// from stacking that mount twice.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Commands

/// Runs `program args...`, killing it after `timeout`. Output is read on helper threads so a
/// chatty command cannot block on a full pipe.
pub fn run_cmd(program: &str, args: &[&str], timeout: Duration) -> Result<Output> {
    let cmdline = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{cmdline}`"))?;
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{cmdline}` timed out after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    };
    // A grandchild could keep the pipes open; don't wait for it forever.
    let grace = Duration::from_secs(2);
    Ok(Output {
        status,
        stdout: stdout.recv_timeout(grace).unwrap_or_default(),
        stderr: stderr.recv_timeout(grace).unwrap_or_default(),
    })
}

fn drain(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Like [`run_cmd`] but a non-zero exit is an error carrying stderr; returns stdout.
pub fn run_ok(program: &str, args: &[&str]) -> Result<String> {
    let out = run_cmd(program, args, CMD_TIMEOUT)?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---------------------------------------------------------------------------------------------
// Netns

/// A named network namespace (`ip netns add`), deleted on Drop, also while unwinding a panic.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `<prefix><pid>x<counter>`. The prefix is cut so the name stays <= 15 bytes and
    /// can be used as an interface name too.
    pub fn new(prefix: &str) -> Result<Netns> {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        // A namespace left by a killed run with the same pid makes `add` fail: try the next name.
        for _ in 0..16 {
            let name = unique_name(prefix)?;
            let out = run_cmd("ip", &["netns", "add", &name], CMD_TIMEOUT)?;
            if out.status.success() {
                return Ok(Netns { name });
            }
            let err = String::from_utf8_lossy(&out.stderr);
            if !err.contains("File exists") {
                bail!("`ip netns add {name}` failed: {}", err.trim());
            }
        }
        bail!("no free network namespace name for prefix {prefix:?}")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on a fresh OS thread that has joined this network namespace (only the network
    /// namespace: mounts and /sys stay the caller's) and returns its result. Sockets created
    /// inside stay in the namespace after `f` returns. A panic in `f` is re-raised here.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|s| {
            let handle = s.spawn(move || {
                if let Err(e) = enter_netns(&path) {
                    panic!("{e:#}");
                }
                f()
            });
            handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// `ip netns exec <name> <args...>` (bounded by [`CMD_TIMEOUT`]).
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        self.exec_timeout(args, CMD_TIMEOUT)
    }

    pub fn exec_timeout(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run_cmd("ip", &full, timeout)
    }

    /// [`Netns::exec`] that fails with the command line and stderr when the exit status != 0.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// `ip -n <name> <args...>`: cheaper than `exec` (no mount namespace); returns stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..5 {
            match run_cmd("ip", &["netns", "del", &self.name], CMD_TIMEOUT) {
                Ok(out) if out.status.success() => return,
                _ => thread::sleep(Duration::from_millis(100)),
            }
        }
        eprintln!("warning: could not delete network namespace {}", self.name);
    }
}

fn unique_name(prefix: &str) -> Result<String> {
    let tail = format!("{}x{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let room = 15usize.saturating_sub(tail.len());
    // Only characters that are valid in both namespace and interface names.
    let head: String = prefix.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(room).collect();
    let name = head + &tail;
    if name.len() > 15 {
        bail!("namespace name {name} would be longer than 15 bytes");
    }
    Ok(name)
}

fn enter_netns(path: &str) -> Result<()> {
    let file = File::open(path).with_context(|| format!("cannot open {path}"))?;
    // SAFETY: plain syscall on a valid fd; it only changes this thread's network namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("setns({path})"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// TestHosts

/// Two namespaces, "server" and "client", joined by a veth pair.
///
/// Server: 198.18.0.1/24 and fd00::1/64. Client: 198.18.0.10-13/24 and fd00::10-13/64, so a
/// test can pick an allowed or a disallowed source. Each interface is named after its
/// namespace. Namespaces are isolated, so parallel TestHosts may reuse the same addresses.
#[derive(Debug)]
pub struct TestHosts {
    // Interfaces die with their namespace, so dropping these two cleans up everything.
    pub server: Netns,
    pub client: Netns,
    pub server_if: String,
    pub client_if: String,
    pub server_v4: Ipv4Addr,
    pub server_v6: Ipv6Addr,
    pub client_v4: Vec<Ipv4Addr>,
    pub client_v6: Vec<Ipv6Addr>,
    server_ifindex: u32,
}

impl TestHosts {
    pub fn new() -> Result<TestHosts> {
        let server = Netns::new("ips")?;
        let client = Netns::new("ipc")?;
        let server_if = server.name().to_string();
        let client_if = client.name().to_string();
        // Each end is created directly inside its namespace; nothing appears in the root one.
        let cmd = format!(
            "link add {server_if} netns {} type veth peer name {client_if} netns {}",
            server.name(),
            client.name()
        );
        run_ok("ip", &cmd.split_whitespace().collect::<Vec<_>>())?;
        let server_v4 = Ipv4Addr::new(198, 18, 0, 1);
        let server_v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        let client_v4: Vec<_> = (10..14).map(|i| Ipv4Addr::new(198, 18, 0, i)).collect();
        let client_v6: Vec<_> = (0x10..0x14).map(|i| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i)).collect();
        configure(&server, &server_if, &[server_v4], &[server_v6])?;
        configure(&client, &client_if, &client_v4, &client_v6)?;
        wait_ready(&server, &server_if)?;
        wait_ready(&client, &client_if)?;
        let name = CString::new(server_if.as_str())?;
        // SAFETY: valid C string; the ioctl runs on a socket inside the server namespace.
        let server_ifindex = server.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) });
        if server_ifindex == 0 {
            bail!("no ifindex for {server_if} in {}", server.name());
        }
        Ok(TestHosts {
            server,
            client,
            server_if,
            client_if,
            server_v4,
            server_v6,
            client_v4,
            client_v6,
            server_ifindex,
        })
    }

    /// ifindex of `server_if` inside the server namespace (where XDP gets attached).
    pub fn server_ifindex(&self) -> u32 {
        self.server_ifindex
    }
}

fn configure(ns: &Netns, ifname: &str, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) -> Result<()> {
    ns.ip(&["link", "set", "lo", "up"])?;
    // No DAD for the link-local address either (it appears at link up), so no address is
    // ever tentative for long. /proc/sys/net follows the calling thread's namespace.
    let knob = format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad");
    ns.run(|| std::fs::write(&knob, "0")).with_context(|| format!("write {knob}"))?;
    for a in v4 {
        ns.ip(&["addr", "add", &format!("{a}/24"), "dev", ifname])?;
    }
    for a in v6 {
        ns.ip(&["-6", "addr", "add", &format!("{a}/64"), "dev", ifname, "nodad"])?;
    }
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}

/// Waits (at most 5 s) for carrier and for no IPv6 address to be tentative.
fn wait_ready(ns: &Netns, ifname: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let link = ns.ip(&["-o", "link", "show", "dev", ifname])?;
        let addrs = ns.ip(&["-o", "addr", "show", "dev", ifname])?;
        if addrs.contains("dadfailed") {
            bail!("duplicate address detected on {ifname}: {addrs}");
        }
        if link.contains("state UP") && !addrs.contains("tentative") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{ifname} in {} not ready after 5 s:\n{link}{addrs}", ns.name());
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// BpfFs

/// A bpffs mounted on a fresh temporary directory in this process's mount namespace; unmounted
/// lazily (MNT_DETACH) and removed on Drop. Pins inside vanish with it.
#[derive(Debug)]
pub struct BpfFs {
    path: PathBuf,
}

impl BpfFs {
    pub fn new() -> Result<BpfFs> {
        let path = std::env::temp_dir().join(format!(
            "ipaccess-bpffs-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let target = CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: valid C strings; no mount data.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(err).with_context(|| format!("mount -t bpf bpf {}", path.display()));
        }
        Ok(BpfFs { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: valid C string. Lazy, so an open pin or fd cannot make this fail.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic helpers (call them inside `Netns::run` to use that namespace)

/// Binds to `src` (port 0) and connects to `dst`; true iff the handshake completes in time.
pub fn tcp_connect(src: IpAddr, dst: SocketAddr, timeout: Duration) -> bool {
    if src.is_ipv4() != dst.is_ipv4() {
        return false;
    }
    let Some(fd) = bound_socket(src, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) else {
        return false;
    };
    let (sa, len) = sockaddr(dst);
    // SAFETY: sa/len describe a valid sockaddr for this family.
    if unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) } == 0 {
        return true;
    }
    if io::Error::last_os_error().raw_os_error() != Some(libc::EINPROGRESS) {
        return false;
    }
    if !wait_fd(&fd, libc::POLLOUT, timeout) {
        return false; // no answer at all: e.g. the SYN was dropped
    }
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err/len are a valid out buffer for SO_ERROR.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && err == 0
}

/// Sends `payload` from `src` (port 0) to `dst` and expects the same bytes back from `dst`
/// within `timeout`. Re-sends up to 3 times inside that time; an ICMP unreachable fails fast.
pub fn udp_roundtrip(src: IpAddr, dst: SocketAddr, payload: &[u8], timeout: Duration) -> bool {
    let Ok(sock) = UdpSocket::bind(SocketAddr::new(src, 0)) else {
        return false;
    };
    // Connected, so only `dst` can answer and ICMP errors surface as ECONNREFUSED.
    if sock.connect(dst).is_err() {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; payload.len() + 1]; // +1 so a longer reply does not match
    for _ in 0..3 {
        if sock.send(payload).is_err() {
            return false;
        }
        let slot_end = (Instant::now() + timeout / 3).min(deadline);
        for _ in 0..64 {
            let left = slot_end.saturating_duration_since(Instant::now());
            if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match sock.recv(&mut buf) {
                Ok(n) if &buf[..n] == payload => return true,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    break;
                }
                Err(_) => return false,
            }
        }
    }
    false
}

/// One `ping -c 1 -W 1 -I src dst` inside `ns`; used to check that ARP / neighbour discovery
/// still work. Without a `ping` binary, sends one ICMP echo from a raw socket instead.
pub fn ping(ns: &Netns, src: IpAddr, dst: IpAddr) -> bool {
    if have_program("ping") {
        let (src, dst) = (src.to_string(), dst.to_string());
        let args = ["ping", "-c", "1", "-W", "1", "-I", &src, &dst];
        return matches!(ns.exec_timeout(&args, Duration::from_secs(5)), Ok(o) if o.status.success());
    }
    ns.run(move || icmp_echo(src, dst, Duration::from_secs(1)))
}

/// One ICMP / ICMPv6 echo request from `src` to `dst` over a raw socket; true iff the matching
/// reply arrives within `timeout`. Needs CAP_NET_RAW.
pub fn icmp_echo(src: IpAddr, dst: IpAddr, timeout: Duration) -> bool {
    if src.is_ipv4() != dst.is_ipv4() {
        return false;
    }
    let (proto, request, reply) = match dst {
        IpAddr::V4(_) => (libc::IPPROTO_ICMP, 8u8, 0u8),
        IpAddr::V6(_) => (libc::IPPROTO_ICMPV6, 128, 129),
    };
    let Some(fd) = bound_socket(src, libc::SOCK_RAW, proto) else {
        return false;
    };
    let id = (std::process::id() as u16) ^ (NEXT_ID.fetch_add(1, Ordering::Relaxed) as u16);
    let [id0, id1] = id.to_be_bytes();
    let mut pkt = [request, 0, 0, 0, id0, id1, 0, 1, b'i', b'p', b'a', b'c'];
    if dst.is_ipv4() {
        // The kernel fills in the ICMPv6 checksum itself, not the ICMPv4 one.
        let sum = inet_checksum(&pkt);
        pkt[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let (sa, len) = sockaddr(SocketAddr::new(dst, 0));
    // SAFETY: pkt and sa are valid for the given lengths.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr() as *const libc::c_void,
            pkt.len(),
            0,
            &sa as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if sent < 0 {
        return false;
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    // A raw socket sees every ICMP packet of the namespace: skip the ones that aren't ours.
    for _ in 0..256 {
        if !wait_fd(&fd, libc::POLLIN, deadline.saturating_duration_since(Instant::now())) {
            return false;
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n <= 0 {
            return false;
        }
        let data = &buf[..n as usize];
        // Raw IPv4 sockets deliver the IP header too; IPv6 ones don't.
        let icmp = if dst.is_ipv4() { &data[((data[0] & 0x0f) as usize * 4).min(data.len())..] } else { data };
        if icmp.len() >= 8 && icmp[0] == reply && icmp[4..8] == pkt[4..8] {
            return true;
        }
    }
    false
}

/// One entry of `ip neigh show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub dev: String,
    pub lladdr: Option<String>,
    /// REACHABLE, STALE, DELAY, PROBE, INCOMPLETE, FAILED, PERMANENT, ...
    pub state: String,
}

/// The neighbour table (ARP and NDP) of `ns`.
pub fn neighbours(ns: &Netns) -> Result<Vec<Neighbour>> {
    Ok(ns.ip(&["neigh", "show"])?.lines().filter_map(parse_neighbour).collect())
}

fn parse_neighbour(line: &str) -> Option<Neighbour> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let addr = words.first()?.parse().ok()?;
    let after = |key: &str| words.iter().position(|w| *w == key).and_then(|i| words.get(i + 1));
    Some(Neighbour {
        addr,
        dev: after("dev")?.to_string(),
        lladdr: after("lladdr").map(|s| s.to_string()),
        state: words.last().filter(|w| w.chars().all(|c| c.is_ascii_uppercase())).map_or("", |w| w).to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A background thread with a stop flag; Drop stops and joins it. Loops check the flag at least
/// every ~50 ms, so stopping is prompt.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn spawn(body: impl FnOnce(&AtomicBool) + Send + 'static) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        Worker { stop, thread: Some(thread::spawn(move || body(&flag))) }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener inside a namespace, served from a background thread until dropped.
/// The socket is created inside the namespace, so the thread itself needs no setns.
pub struct TcpServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    _worker: Worker,
}

impl TcpServer {
    /// Accepts connections and closes them at once. Port 0 picks a free port; see [`Self::addr`].
    pub fn start_in(ns: &Netns, addr: SocketAddr) -> Result<TcpServer> {
        Self::start(ns, addr, false)
    }

    /// Accepts connections and echoes what it reads (one connection at a time, each for at
    /// most 5 s or until the peer closes).
    pub fn start_echo_in(ns: &Netns, addr: SocketAddr) -> Result<TcpServer> {
        Self::start(ns, addr, true)
    }

    fn start(ns: &Netns, addr: SocketAddr, echo: bool) -> Result<TcpServer> {
        let listener =
            ns.run(move || TcpListener::bind(addr)).with_context(|| format!("bind tcp {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let worker = Worker::spawn(move |stop| {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        if echo {
                            echo_tcp(conn, stop);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(TcpServer { addr, accepted, _worker: worker })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections accepted, after waiting (at most `timeout`) for at least `expected`: the
    /// kernel completes a handshake before this server's thread gets round to accepting it.
    pub fn accepted_within(&self, expected: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        while self.accepted() < expected && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        self.accepted()
    }
}

fn echo_tcp(mut conn: TcpStream, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    if conn.set_nonblocking(false).is_err()
        || conn.set_read_timeout(Some(step)).is_err()
        || conn.set_write_timeout(Some(Duration::from_secs(1))).is_err()
    {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

/// A UDP socket in `ns` bound to `src` (port 0) and connected to `dst`.
pub fn udp_client(ns: &Netns, src: IpAddr, dst: SocketAddr) -> UdpSocket {
    ns.run(move || {
        let sock = UdpSocket::bind(SocketAddr::new(src, 0))?;
        sock.connect(dst)?;
        io::Result::Ok(sock)
    })
    .expect("udp client socket")
}

/// Sends `count` datagrams of `payload` (paced, so no queue on the way overflows).
pub fn send_udp(sock: &UdpSocket, payload: &[u8], count: usize) {
    for i in 0..count {
        sock.send(payload).expect("send");
        if i % 8 == 7 {
            thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Sends `count` datagrams one at a time, each waiting (at most `timeout`) for its echo;
/// returns how many came back.
pub fn echoed_udp(sock: &UdpSocket, payload: &[u8], count: usize, timeout: Duration) -> usize {
    let mut buf = vec![0u8; payload.len() + 1];
    let mut back = 0;
    for _ in 0..count {
        sock.send(payload).expect("send");
        sock.set_read_timeout(Some(timeout)).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) if &buf[..n] == payload => back += 1,
            Ok(n) => panic!("unexpected {n}-byte datagram"),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
    back
}

/// A UDP socket inside a namespace that sends every datagram back to its sender, until dropped.
pub struct UdpEchoServer {
    addr: SocketAddr,
    received: Arc<AtomicUsize>,
    _worker: Worker,
}

impl UdpEchoServer {
    /// Port 0 picks a free port; see [`Self::addr`].
    pub fn start_in(ns: &Netns, addr: SocketAddr) -> Result<UdpEchoServer> {
        let sock =
            ns.run(move || UdpSocket::bind(addr)).with_context(|| format!("bind udp {addr} in {}", ns.name()))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let received = Arc::new(AtomicUsize::new(0));
        let count = received.clone();
        let worker = Worker::spawn(move |stop| {
            let mut buf = [0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                match sock.recv_from(&mut buf) {
                    Ok((n, from)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = sock.send_to(&buf[..n], from);
                    }
                    Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(UdpEchoServer { addr, received, _worker: worker })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received (and echoed) so far.
    pub fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Small socket utilities

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A close-on-exec socket of `src`'s family, bound to `src` port 0.
fn bound_socket(src: IpAddr, ty: libc::c_int, proto: libc::c_int) -> Option<OwnedFd> {
    let domain = if src.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscall; the fd is owned right away.
    let raw = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if raw < 0 {
        return None;
    }
    // SAFETY: raw is a fresh fd that nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let (sa, len) = sockaddr(SocketAddr::new(src, 0));
    // SAFETY: sa/len describe a valid sockaddr.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
    (rc == 0).then_some(fd)
}

/// poll() for `events` until `timeout`; false on timeout or error.
fn wait_fd(fd: &OwnedFd, events: libc::c_short, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    for _ in 0..100 {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 };
        let ms = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => return true,
            0 => return false,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => continue,
            _ => return false,
        }
    }
    false
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn have_program(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// Sends `rate` datagrams/s of `[tag, sequence number (u32, big-endian), padding]` on a
/// connected socket until `stop` is set or `limit` has passed; returns how many were sent.
pub fn paced_udp_sender(
    sock: UdpSocket,
    tag: u8,
    rate: u64,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let start = Instant::now();
        let mut sent: u64 = 0;
        let mut errors = 0u64;
        let mut datagram = [0u8; 64];
        datagram[0] = tag;
        while !stop.load(Ordering::Relaxed) && start.elapsed() < limit {
            // Catch up in bursts of at most 64 after a late wake-up, not all at once.
            let due = (start.elapsed().as_micros() as u64 * rate / 1_000_000).min(sent + 64);
            while sent < due {
                datagram[1..5].copy_from_slice(&(sent as u32).to_be_bytes());
                match sock.send(&datagram) {
                    Ok(_) => sent += 1,
                    Err(e) => {
                        errors += 1;
                        assert!(errors < 1000, "send keeps failing: {e}");
                        break;
                    }
                }
            }
            thread::sleep(Duration::from_micros(500));
        }
        sent
    })
}

/// Forces a socket's receive buffer to `bytes` (SO_RCVBUFFORCE: root), so a burst is not
/// lost to a full buffer and counted as a drop.
pub fn set_rcvbuf(sock: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: plain setsockopt with an int value.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &bytes as *const _ as *const libc::c_void,
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
}

/// What [`receive_flows`] saw.
pub struct FlowsSeen {
    /// Sequence numbers received from the good source.
    pub good: Vec<bool>,
    /// Good datagrams received more than once.
    pub good_dups: u64,
    /// Datagrams from the bad source.
    pub bad: u64,
    /// Anything else (including good sequence numbers beyond `good`'s length).
    pub other: u64,
}

/// Receives on `rx` in a thread until `stop` (or `limit`): datagrams from `good` tagged
/// `good_tag` (as [`paced_udp_sender`] sends them) are recorded by sequence number, up to
/// `capacity`; those from `bad` are counted.
pub fn receive_flows(
    rx: UdpSocket,
    (good, good_tag): (IpAddr, u8),
    bad: IpAddr,
    capacity: usize,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> JoinHandle<FlowsSeen> {
    rx.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    thread::spawn(move || {
        let mut seen = FlowsSeen { good: vec![false; capacity], good_dups: 0, bad: 0, other: 0 };
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + limit;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match rx.recv_from(&mut buf) {
                Ok((n, from)) if n >= 5 && buf[0] == good_tag && from.ip() == good => {
                    let seq = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
                    match seen.good.get_mut(seq) {
                        Some(slot) if *slot => seen.good_dups += 1,
                        Some(slot) => *slot = true,
                        None => seen.other += 1,
                    }
                }
                Ok((_, from)) if from.ip() == bad => seen.bad += 1,
                Ok(_) => seen.other += 1,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("recv: {e}"),
            }
        }
        seen
    })
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;

    const T: Duration = Duration::from_secs(2);

    fn netns_listed(name: &str) -> bool {
        run_ok("ip", &["netns", "list"]).unwrap().lines().any(|l| l.split_whitespace().next() == Some(name))
    }

    fn bpf_mounted(path: &Path) -> bool {
        let path = path.to_str().unwrap();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(path) && l.contains(" - bpf "))
    }

    #[test]
    fn netns_traffic_between_hosts() {
        let hosts = TestHosts::new().unwrap();
        let names = [hosts.server.name().to_string(), hosts.client.name().to_string()];
        assert!(names.iter().all(|n| netns_listed(n)));
        let link = hosts.server.ip(&["-o", "link", "show", "dev", &hosts.server_if]).unwrap();
        assert!(link.starts_with(&format!("{}:", hosts.server_ifindex())), "{link}");
        let knob = format!("/proc/sys/net/ipv6/conf/{}/accept_dad", hosts.client_if);
        assert_eq!(hosts.client.exec_ok(&["cat", &knob]).unwrap().trim(), "0");

        let (s4, s6) = (IpAddr::from(hosts.server_v4), IpAddr::from(hosts.server_v6));
        let tcp4 = TcpServer::start_in(&hosts.server, SocketAddr::new(s4, 0)).unwrap();
        let tcp6 = TcpServer::start_echo_in(&hosts.server, SocketAddr::new(s6, 0)).unwrap();
        let udp4 = UdpEchoServer::start_in(&hosts.server, SocketAddr::new(s4, 0)).unwrap();
        let udp6 = UdpEchoServer::start_in(&hosts.server, SocketAddr::new(s6, 0)).unwrap();
        let (t4, t6, u4, u6) = (tcp4.addr(), tcp6.addr(), udp4.addr(), udp6.addr());
        assert_ne!(t4.port(), 0);

        let sources: Vec<IpAddr> = hosts
            .client_v4
            .iter()
            .map(|&a| IpAddr::from(a))
            .chain(hosts.client_v6.iter().map(|&a| IpAddr::from(a)))
            .collect();
        assert!(sources.len() >= 8);
        hosts.client.run(|| {
            for &src in &sources {
                let (t, u) = if src.is_ipv4() { (t4, u4) } else { (t6, u6) };
                assert!(tcp_connect(src, t, T), "tcp {src} -> {t}");
                assert!(udp_roundtrip(src, u, b"hello", T), "udp {src} -> {u}");
                // Nothing listens on port 9 in the fresh server namespace: RST / ICMP unreachable.
                let closed = SocketAddr::new(t.ip(), 9);
                let start = Instant::now();
                assert!(!tcp_connect(src, closed, T), "tcp {src} -> {closed}");
                assert!(!udp_roundtrip(src, closed, b"x", T), "udp {src} -> {closed}");
                assert!(start.elapsed() < 2 * T + Duration::from_millis(500));
            }
            let mut conn = TcpStream::connect_timeout(&t6, T).unwrap();
            conn.set_read_timeout(Some(T)).unwrap();
            conn.write_all(b"echo?").unwrap();
            let mut back = [0u8; 5];
            conn.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"echo?");
        });
        let settle = Duration::from_secs(3);
        assert!(tcp4.accepted_within(4, settle) >= 4 && tcp6.accepted_within(4, settle) >= 4);
        assert!(udp4.received() >= 4 && udp6.received() >= 4);

        // A silent destination (no host answers ARP) fails within the timeout, not later.
        let src = sources[0];
        let start = Instant::now();
        let ok = hosts.client.run(|| tcp_connect(src, "198.18.0.99:80".parse().unwrap(), Duration::from_millis(300)));
        assert!(!ok);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());

        // Neighbour discovery works both ways and shows up in the tables.
        let c6 = IpAddr::from(hosts.client_v6[1]);
        assert!(ping(&hosts.client, src, s4));
        assert!(ping(&hosts.client, c6, s6));
        assert!(ping(&hosts.server, s6, c6));
        assert!(!ping(&hosts.client, src, "198.18.0.98".parse().unwrap()));
        let neigh = neighbours(&hosts.client).unwrap();
        for addr in [s4, s6] {
            assert!(
                neigh.iter().any(|n| n.addr == addr && n.lladdr.is_some() && n.dev == hosts.client_if),
                "{addr} missing in {neigh:?}"
            );
        }

        drop((tcp4, tcp6, udp4, udp6));
        drop(hosts);
        assert!(names.iter().all(|n| !netns_listed(n)));
    }

    #[test]
    fn netns_removed_after_panic() {
        let mut name = String::new();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let ns = Netns::new("panic").unwrap();
            name = ns.name().to_string();
            assert!(netns_listed(&name));
            ns.run(|| panic!("boom inside the namespace"));
        }));
        assert!(result.is_err());
        assert!(!name.is_empty() && !netns_listed(&name));
    }

    #[test]
    fn netns_unique_names_and_isolation() {
        let all: Vec<Netns> = thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| Netns::new("a-long-prefix").unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let names: HashSet<&str> = all.iter().map(|n| n.name()).collect();
        assert_eq!(names.len(), all.len());
        assert!(names.iter().all(|n| n.len() <= 15 && netns_listed(n)), "{names:?}");

        // run() really enters the namespace, and only for the closure's thread.
        let ino = |p: &str| std::fs::metadata(p).unwrap().ino();
        let own = ino("/proc/thread-self/ns/net");
        let inside = all[0].run(|| ino("/proc/thread-self/ns/net"));
        assert_eq!(inside, ino(&format!("/run/netns/{}", all[0].name())));
        assert_ne!(inside, own);
        assert_eq!(ino("/proc/thread-self/ns/net"), own);

        // A fresh namespace holds only lo.
        let links = all[1].exec_ok(&["ip", "-o", "link", "show"]).unwrap();
        assert_eq!(links.lines().count(), 1, "{links}");
        let err = all[1].exec_ok(&["false"]).unwrap_err().to_string();
        assert!(err.contains("false") && err.contains("failed"), "{err}");
        let err = all[1].exec_timeout(&["sleep", "5"], Duration::from_millis(200)).unwrap_err();
        assert!(err.to_string().contains("timed out"), "{err}");
    }

    #[test]
    fn netns_bpffs_mounted_and_removed() {
        let fs = BpfFs::new().unwrap();
        let path = fs.path().to_path_buf();
        assert!(bpf_mounted(&path));
        drop(fs);
        assert!(!bpf_mounted(&path));
        assert!(!path.exists());
    }
}
