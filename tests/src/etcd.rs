//! A real etcd cluster for fleet tests: N `etcd` members (etcd-server 3.4, v3 API) started by
//! the test in a network namespace of their own, and veth links from that namespace to the
//! namespaces of the ipaccessd nodes.
//!
//! Inside the etcd namespace member `i` serves clients on port 2379+2i (on every address, since
//! the namespace is isolated) and its peers on 127.0.0.1:2380+2i. A linked node namespace
//! number k reaches the members at `http://198.18.(100+k).1:2379+2i`, which collides neither
//! with [`TestHosts`](crate::netns::TestHosts) (198.18.0.0/24) nor with another link.
//!
//! Elections are fast so that a test can kill a leader and go on within a second or two:
//! a heartbeat every 50 ms and an election after 500 ms without one (etcd's defaults are
//! 100 ms and 1 s). Each member logs to `<dir>/m<i>.log`; data lives in `<dir>/m<i>`.
//!
//! Every wait is bounded. On Drop (also while unwinding a panic) every member is killed with
//! SIGKILL and reaped, then the namespace and the directory are removed.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::daemon::TempDir;
use crate::netns::{Netns, run_cmd};

/// Client port of member 0; member `i` uses `CLIENT_PORT + 2i` and its peer port is one above.
pub const CLIENT_PORT: u16 = 2379;
/// How long [`EtcdCluster::start`] waits for a leader and a linearizable read.
pub const START_WITHIN: Duration = Duration::from_secs(20);
/// etcdctl's own bounds: for the connection, and for one request after it.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one etcdctl run as a whole (it may try several endpoints), beyond its own timeouts.
const ETCDCTL_LIMIT: Duration = Duration::from_secs(15);
/// How long a member may take to exit after SIGTERM before it gets SIGKILL.
const STOP_WITHIN: Duration = Duration::from_secs(10);
/// Heartbeat and election timeout in milliseconds (see the module comment).
const HEARTBEAT_MS: u32 = 50;
const ELECTION_MS: u32 = 500;
/// Linked namespace number k gets 198.18.(LINK_NET_BASE + k).0/24.
const LINK_NET_BASE: u8 = 100;
const MAX_LINKS: usize = 100;

/// One member: its process (None while killed or stopped) and where it keeps things.
#[derive(Debug)]
struct Member {
    name: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
}

/// A running N-member etcd cluster in its own network namespace. See the module comment.
pub struct EtcdCluster {
    // Drop kills the members first (in `drop`), then the fields go in this order: the
    // namespace (and with it every link's etcd end), then the directory.
    members: Vec<Member>,
    ns: Netns,
    dir: TempDir,
    token: String,
    links: usize,
}

impl EtcdCluster {
    /// Starts `members` members (normally 3) and waits (at most [`START_WITHIN`]) until the
    /// cluster has a leader and answers a linearizable read.
    pub fn start(members: usize) -> Result<EtcdCluster> {
        if members == 0 || members > 9 {
            bail!("an etcd cluster of {members} members is not supported here (1 to 9)");
        }
        let ns = Netns::new("etcd")?;
        ns.ip(&["link", "set", "lo", "up"])?;
        let dir = TempDir::new();
        let members = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                data: dir.0.join(format!("m{i}")),
                log: dir.0.join(format!("m{i}.log")),
                child: None,
                paused: false,
            })
            .collect();
        // The namespace name is unique on this machine, so it tells clusters apart.
        let token = format!("ipaccess-{}", ns.name());
        let mut cluster = EtcdCluster { members, ns, dir, token, links: 0 };
        for i in 0..cluster.members.len() {
            cluster.spawn(i, "new")?;
        }
        cluster.wait_ready(START_WITHIN).context("the etcd cluster did not start")?;
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The namespace the members run in.
    pub fn netns(&self) -> &Netns {
        &self.ns
    }

    /// The cluster's temporary directory (data directories and logs).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Member `i`'s log file.
    pub fn log_path(&self, i: usize) -> &Path {
        &self.members[i].log
    }

    /// The process id of member `i` while it runs (paused included).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Is member `i` running and not paused?
    pub fn is_live(&self, i: usize) -> bool {
        self.members[i].child.is_some() && !self.members[i].paused
    }

    fn client_port(i: usize) -> u16 {
        CLIENT_PORT + 2 * i as u16
    }

    fn peer_url(i: usize) -> String {
        format!("http://127.0.0.1:{}", Self::client_port(i) + 1)
    }

    /// Member `i`'s client URL inside the etcd namespace.
    pub fn endpoint_local(i: usize) -> String {
        format!("http://127.0.0.1:{}", Self::client_port(i))
    }

    /// Every member's client URL inside the etcd namespace, in member order.
    pub fn endpoints_local(&self) -> Vec<String> {
        (0..self.members.len()).map(Self::endpoint_local).collect()
    }

    /// Client URLs of the members that are running and not paused.
    pub fn live_endpoints_local(&self) -> Vec<String> {
        (0..self.members.len()).filter(|&i| self.is_live(i)).map(Self::endpoint_local).collect()
    }

    /// Starts member `i`'s process; `state` is etcd's `--initial-cluster-state` (`new` for the
    /// first start; `existing` for a restart, where etcd goes by its data directory anyway).
    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let initial = self.initial_cluster();
        let member = &self.members[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .with_context(|| format!("open {}", member.log.display()))?;
        let client = Self::client_port(i);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns.name(), "etcd"])
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&member.data)
            .args(["--listen-client-urls", &format!("http://0.0.0.0:{client}")])
            .args(["--advertise-client-urls", &Self::endpoint_local(i)])
            .args(["--listen-peer-urls", &Self::peer_url(i)])
            .args(["--initial-advertise-peer-urls", &Self::peer_url(i)])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.token])
            .args(["--heartbeat-interval", &HEARTBEAT_MS.to_string()])
            .args(["--election-timeout", &ELECTION_MS.to_string()])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // An ETCD_* variable of the caller's would silently override a flag above.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        // `ip netns exec` execs etcd, so the child's pid is etcd's own.
        let child = cmd.spawn().context("cannot start `ip netns exec ... etcd`")?;
        let member = &mut self.members[i];
        member.child = Some(child);
        member.paused = false;
        Ok(())
    }

    /// etcd's `--initial-cluster`: every member's name and peer URL.
    fn initial_cluster(&self) -> String {
        let members = (0..self.members.len()).map(|j| format!("{}={}", self.members[j].name, Self::peer_url(j)));
        members.collect::<Vec<_>>().join(",")
    }

    /// A backup of etcd's whole keyspace at its current revision, taken from member `i` as
    /// an operator takes one (`etcdctl snapshot save`), written to `path`.
    pub fn save_backup(&self, i: usize, path: &Path) -> Result<()> {
        let path = path.to_str().context("a backup path in UTF-8")?;
        etcdctl_in(&self.ns, &[Self::endpoint_local(i)], &["snapshot", "save", path], COMMAND_TIMEOUT).map(|_| ())
    }

    /// Restores the cluster from the backup at `path`, as an operator recovers from one:
    /// every member stopped, its data directory made anew from the backup (`etcdctl snapshot
    /// restore`, with the same names, peer URLs and token), and all started again. etcd's
    /// revision goes back to the backup's. Waits (at most [`START_WITHIN`]) until it answers.
    pub fn restore_backup(&mut self, path: &Path) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_some() {
                self.stop(i)?;
            }
        }
        let (initial, backup) = (self.initial_cluster(), path.to_str().context("a backup path in UTF-8")?);
        for i in 0..self.members.len() {
            let data = self.members[i].data.clone();
            if data.exists() {
                fs::remove_dir_all(&data).with_context(|| format!("remove {}", data.display()))?;
            }
            let data = data.to_str().context("a data directory in UTF-8")?;
            let args = [
                "snapshot",
                "restore",
                backup,
                "--name",
                &self.members[i].name,
                "--initial-cluster",
                &initial,
                "--initial-cluster-token",
                &self.token,
                "--initial-advertise-peer-urls",
                &Self::peer_url(i),
                "--data-dir",
                data,
            ];
            etcdctl_in(&self.ns, &[], &args, COMMAND_TIMEOUT)?;
        }
        for i in 0..self.members.len() {
            self.spawn(i, "existing")?;
        }
        self.wait_ready(START_WITHIN).context("the etcd cluster did not start from the backup")
    }

    /// The last lines of member `i`'s log, for error messages.
    pub fn log_tail(&self, i: usize, lines: usize) -> String {
        let text = fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_tails(&self, lines: usize) -> String {
        (0..self.members.len())
            .map(|i| {
                format!(
                    "---- {} ({}) ----\n{}",
                    self.members[i].name,
                    self.members[i].log.display(),
                    self.log_tail(i, lines)
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Fails (with the member's log tail) if a member we started has exited by itself.
    fn check_running(&mut self) -> Result<()> {
        for i in 0..self.members.len() {
            let Some(child) = self.members[i].child.as_mut() else { continue };
            if let Some(status) = child.try_wait()? {
                self.members[i].child = None;
                bail!("etcd member {} exited ({status}):\n{}", self.members[i].name, self.log_tail(i, 30));
            }
        }
        Ok(())
    }

    /// Waits for a leader and a linearizable read; on timeout the error holds the log tails.
    fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        for _ in 0..10_000 {
            self.check_running()?;
            if self.leader().is_some() {
                match self.revision() {
                    Ok(_) => return Ok(()),
                    Err(e) => last = format!("{e:#}"),
                }
            } else {
                last = "no leader".into();
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("not ready after {within:?} ({last}):\n{}", self.log_tails(20))
    }

    /// Waits (at most `within`) until a live member is leader; returns its index.
    pub fn wait_leader(&self, within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        for _ in 0..10_000 {
            if let Some(i) = self.leader() {
                return Ok(i);
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("no etcd leader within {within:?}")
    }

    /// Waits (at most `within`) until every live member reports the same leader, has no
    /// errors (e.g. "no leader", an alarm), and a linearizable read succeeds.
    pub fn wait_healthy(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        for _ in 0..10_000 {
            match self.healthy() {
                Ok(()) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd not healthy within {within:?}: {last}")
    }

    fn healthy(&self) -> Result<()> {
        let live: Vec<usize> = (0..self.members.len()).filter(|&i| self.is_live(i)).collect();
        let statuses = self.statuses();
        if statuses.len() != live.len() {
            bail!("{} of {} live members answered endpoint status", statuses.len(), live.len());
        }
        let leaders: Vec<Option<u64>> = statuses.iter().map(|s| s.leader).collect();
        if leaders.iter().any(|l| l.is_none() || *l != leaders[0]) {
            bail!("members disagree on the leader: {leaders:?}");
        }
        if let Some(s) = statuses.iter().find(|s| !s.errors.is_empty()) {
            bail!("member {} reports {:?}", s.member, s.errors);
        }
        self.revision().map(|_| ())
    }

    /// The live member that is leader, by asking every live member for its status: the one
    /// whose own id is the leader id it reports. None without a leader (or while an election
    /// runs after the old leader died: the others still name it, but it cannot answer).
    pub fn leader(&self) -> Option<usize> {
        self.statuses().into_iter().find(|s| s.leader == Some(s.id)).map(|s| s.member)
    }

    /// `endpoint status` of each live member, asked one at a time so that a dead or hung
    /// member costs only its own short timeout.
    fn statuses(&self) -> Vec<Status> {
        let mut out = Vec::new();
        for i in (0..self.members.len()).filter(|&i| self.is_live(i)) {
            let endpoint = Self::endpoint_local(i);
            let args = ["endpoint", "status", "-w", "json"];
            let Ok(text) = self.etcdctl_with(&[endpoint], &args, Duration::from_secs(1)) else { continue };
            let Ok(Value::Array(list)) = serde_json::from_str::<Value>(&text) else { continue };
            for entry in list {
                let status = &entry["Status"];
                let Some(id) = status["header"]["member_id"].as_u64() else { continue };
                let errors = status["errors"]
                    .as_array()
                    .map(|e| e.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect())
                    .unwrap_or_default();
                out.push(Status { member: i, id, leader: status["leader"].as_u64(), errors });
            }
        }
        out
    }

    /// The cluster's current revision, by a linearizable read (so it needs a quorum).
    pub fn revision(&self) -> Result<i64> {
        let text = self.etcdctl(&["get", "ipaccess-harness-probe", "--limit", "1", "-w", "json"])?;
        let value: Value = serde_json::from_str(&text).with_context(|| format!("etcdctl get: not JSON: {text}"))?;
        value["header"]["revision"].as_i64().with_context(|| format!("no revision in {text}"))
    }

    /// Compacts the history up to `revision` and waits until it is physically done, so a
    /// watch from an older revision fails with "required revision has been compacted".
    pub fn compact(&self, revision: i64) -> Result<()> {
        self.etcdctl(&["compact", &revision.to_string(), "--physical"]).map(|_| ())
    }

    /// [`EtcdCluster::compact`] to the current revision; returns it.
    pub fn compact_latest(&self) -> Result<i64> {
        let revision = self.revision()?;
        self.compact(revision)?;
        Ok(revision)
    }

    /// `etcdctl ARGS` inside the etcd namespace against every live member (etcdctl picks one
    /// and fails over), bounded by [`DIAL_TIMEOUT`] and [`COMMAND_TIMEOUT`]; its stdout, or an
    /// error with its stderr.
    pub fn etcdctl(&self, args: &[&str]) -> Result<String> {
        let endpoints = self.live_endpoints_local();
        if endpoints.is_empty() {
            bail!("no live etcd member to run `etcdctl {}` against", args.join(" "));
        }
        self.etcdctl_with(&endpoints, args, COMMAND_TIMEOUT)
    }

    fn etcdctl_with(&self, endpoints: &[String], args: &[&str], command_timeout: Duration) -> Result<String> {
        etcdctl_in(&self.ns, endpoints, args, command_timeout)
    }

    /// SIGKILL to member `i` (also when paused) and waits for it to exit.
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let member = &mut self.members[i];
        let Some(mut child) = member.child.take() else { bail!("etcd member {} is not running", member.name) };
        member.paused = false;
        // Child::kill is a no-op error if it already exited; wait reaps it either way.
        let _ = child.kill();
        child.wait().with_context(|| format!("wait for etcd member {}", member.name))?;
        Ok(())
    }

    /// SIGTERM to member `i` and waits (at most 10 s, then SIGKILL) for it to exit.
    pub fn stop(&mut self, i: usize) -> Result<()> {
        let member = &mut self.members[i];
        let Some(mut child) = member.child.take() else { bail!("etcd member {} is not running", member.name) };
        let pid = child.id() as libc::pid_t;
        if member.paused {
            // SAFETY: kill(2) on our own child, which is not reaped yet.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            member.paused = false;
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_WITHIN;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                child.wait()?;
                bail!("etcd member {} ignored SIGTERM for {STOP_WITHIN:?}; killed", member.name);
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts member `i` again on its data directory (after [`kill`](Self::kill) or
    /// [`stop`](Self::stop)). Does not wait for it to rejoin: see [`wait_healthy`](Self::wait_healthy).
    pub fn start_member(&mut self, i: usize) -> Result<()> {
        if self.members[i].child.is_some() {
            bail!("etcd member {} is already running", self.members[i].name);
        }
        self.spawn(i, "existing")
    }

    /// SIGSTOP to member `i`: it keeps its sockets but answers nothing (a hung host).
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.signal_paused(i, libc::SIGSTOP, true)
    }

    /// SIGCONT to a member paused by [`pause`](Self::pause).
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.signal_paused(i, libc::SIGCONT, false)
    }

    fn signal_paused(&mut self, i: usize, signal: libc::c_int, paused: bool) -> Result<()> {
        let member = &mut self.members[i];
        let Some(child) = member.child.as_ref() else { bail!("etcd member {} is not running", member.name) };
        // SAFETY: kill(2) on our own child, which is not reaped yet (we hold its Child).
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error()).context("kill");
        }
        member.paused = paused;
        Ok(())
    }

    /// Joins `ns` to the etcd namespace with a veth pair and returns the members' client URLs
    /// as seen from `ns`, in member order, once each running member accepts a TCP connection
    /// there. Link k (counting from 0) is 198.18.(100+k).0/24: .1 on the etcd side, .2 in `ns`.
    /// The interface in `ns` is `etcd<k>`, so one namespace can be linked to one cluster.
    pub fn link(&mut self, ns: &Netns) -> Result<Vec<String>> {
        let k = self.links;
        if k >= MAX_LINKS {
            bail!("more than {MAX_LINKS} namespaces linked to one etcd cluster");
        }
        let net = LINK_NET_BASE + k as u8;
        let (ours, theirs) = (format!("lnk{k}"), format!("etcd{k}"));
        // Each end is created directly inside its namespace; nothing appears in the root one.
        crate::netns::run_ok(
            "ip",
            &[
                "link",
                "add",
                &ours,
                "netns",
                self.ns.name(),
                "type",
                "veth",
                "peer",
                "name",
                &theirs,
                "netns",
                ns.name(),
            ],
        )?;
        self.links += 1;
        let server = Ipv4Addr::new(198, 18, net, 1);
        let node = Ipv4Addr::new(198, 18, net, 2);
        for (side, ifname, addr) in [(&self.ns, &ours, server), (ns, &theirs, node)] {
            side.ip(&["link", "set", "lo", "up"])?;
            side.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
            side.ip(&["link", "set", ifname, "up"])?;
        }
        let endpoints: Vec<String> =
            (0..self.members.len()).map(|i| format!("http://{server}:{}", Self::client_port(i))).collect();
        // Carrier, ARP and etcd's listener, all at once: a TCP handshake from inside `ns`.
        let deadline = Instant::now() + Duration::from_secs(5);
        for i in (0..self.members.len()).filter(|&i| self.is_live(i)) {
            let addr = SocketAddr::from((server, Self::client_port(i)));
            let mut ok = false;
            for _ in 0..1_000 {
                ok = ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok());
                if ok || Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
            if !ok {
                bail!("etcd member {} not reachable at {addr} from {}", self.members[i].name, ns.name());
            }
        }
        Ok(endpoints)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("{}", self.log_tails(10));
        }
        for member in &mut self.members {
            if let Some(mut child) = member.child.take() {
                // SIGKILL works on a stopped process too; wait reaps it, so nothing is left.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[derive(Debug)]
struct Status {
    member: usize,
    id: u64,
    leader: Option<u64>,
    errors: Vec<String>,
}

/// `etcdctl --endpoints E ARGS` run inside `ns` (e.g. a node's namespace, with the endpoints
/// [`EtcdCluster::link`] returned), with etcdctl's dial timeout [`DIAL_TIMEOUT`] and the given
/// command timeout, and the whole run bounded too. Its stdout, or an error with its stderr.
pub fn etcdctl_in(ns: &Netns, endpoints: &[String], args: &[&str], command_timeout: Duration) -> Result<String> {
    let endpoints = format!("--endpoints={}", endpoints.join(","));
    let dial = format!("--dial-timeout={}ms", DIAL_TIMEOUT.as_millis());
    let command = format!("--command-timeout={}ms", command_timeout.as_millis());
    let mut full = vec!["netns", "exec", ns.name(), "env", "ETCDCTL_API=3", "etcdctl", &endpoints, &dial, &command];
    full.extend_from_slice(args);
    let limit = ETCDCTL_LIMIT + command_timeout;
    let out = run_cmd("ip", &full, limit)?;
    if !out.status.success() {
        bail!("`etcdctl {}` failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
