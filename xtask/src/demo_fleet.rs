//! `cargo xtask demo --fleet`: a narrated tour of a fleet, three ipaccessd nodes sharing one
//! policy through a 3-member etcd.
//!
//! etcd runs in a network namespace of its own; each node is a server namespace (the real
//! daemon, filtering its service veth with XDP, and a TCP service on 198.18.0.1:8080, the same
//! address on every node as behind a load balancer) and a client namespace with the office
//! and a stranger's address. A second veth links each server namespace to the etcd one
//! (198.18.(100+k).0/24 for node k), so the daemon's etcd traffic never crosses its filter.
//!
//! The tour makes a change through node 1 and shows it enforced on the wires of nodes 2 and 3,
//! a ban through node 3 seen on node 1, then kills etcd's leader and one more member: every node
//! keeps enforcing and answering checks and refuses changes with `cluster_unavailable`; etcd
//! comes back and a change is enforced everywhere again.
//!
//! Cleanup works as in the single-host tour: guards undo everything on Drop (daemons first,
//! then etcd's members with SIGKILL, the namespaces, the directory), and Ctrl-C only raises the
//! flag every wait checks. The etcd pieces are written again here, small, rather than taken
//! from the tests crate (see demo.rs for why).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::demo::{
    ACCOUNT, BLOCKED_AFTER, Ctl, Daemon, Netns, OFFICE, PORT, SERVER, TRAVELLING as STRANGER, TcpService, TempDir,
    build_binaries, check_interrupted, heading, ip, on_interrupt_clean_up, pause, shell_words, tcp_greeting, veth_pair,
};

const NODES: usize = 3;
const MEMBERS: usize = 3;
/// Member i serves clients on 2379+2i (every address of the etcd namespace) and its peers on
/// 127.0.0.1, one port above.
const CLIENT_PORT: u16 = 2379;
const PREFIX: &str = "/ipaccess-demo/";
/// etcdctl's own bounds, short: a member that is down should cost little.
const ETCDCTL_TIMEOUTS: [&str; 2] = ["--dial-timeout=1s", "--command-timeout=2s"];

pub fn run() -> Result<()> {
    on_interrupt_clean_up()?;
    let release = build_binaries()?;
    let result = tour(&release.join("ipaccessd"), &release.join("ipaccessctl"));
    match &result {
        Ok(()) => println!("\nThe fleet demo is over; everything it created is gone."),
        Err(e) => eprintln!("\nThe fleet demo stopped: {e:#}\nEverything it created is gone."),
    }
    result
}

fn tour(daemon_bin: &Path, ctl_bin: &Path) -> Result<()> {
    // Dropped in the reverse order: nodes (service, daemon, namespaces), etcd's members, etcd's
    // namespace (and the links' ends in it), the directory.
    let dir = TempDir::new("ipaccess-demo-fleet")?;
    let id = std::process::id();
    let etcd_ns_name = format!("ipfl{id}e");
    let names: Vec<(String, String)> =
        (1..=NODES).map(|k| (format!("ipfl{id}s{k}"), format!("ipfl{id}c{k}"))).collect();
    let listed: Vec<String> = names.iter().enumerate().map(|(k, (s, c))| format!("{s} {c} (node-{})", k + 1)).collect();
    println!("   namespaces: {etcd_ns_name} (etcd), {}; files in {}", listed.join(", "), dir.0.display());

    heading("1. etcd: a 3-member cluster in a namespace of its own");
    let etcd_ns = Netns::new(etcd_ns_name)?;
    ip(&["-n", &etcd_ns.name, "link", "set", "lo", "up"])?;
    let mut etcd = Etcd::start(&etcd_ns, &dir.0)?;
    println!("   members m0, m1, m2 have a leader: m{}", etcd.leader()?);

    heading("2. Three nodes: each a server and a client namespace, its own ipaccessd, a link to etcd");
    let mut nodes = Vec::new();
    for (k, (server, client)) in names.into_iter().enumerate() {
        nodes.push(Node::start(k, server, client, &etcd, &dir.0, daemon_bin, ctl_bin)?);
    }
    println!("\n   on every node: acme's service on {SERVER}:{PORT}; clients {OFFICE} (acme's office) and {STRANGER}");

    heading("3. Through node-1 only: acme's allowlist, the binding of the nodes' service port, enforce");
    let (n1, n2, n3) = (&nodes[0], &nodes[1], &nodes[2]);
    n1.ctl.show(&["account", "add", ACCOUNT])?;
    n1.ctl.show(&["allow", "add", ACCOUNT, &format!("{OFFICE}/32"), "--label", "office"])?;
    n1.ctl.show(&["bind", "add", ACCOUNT, &format!("{SERVER}:{PORT}")])?;
    n1.ctl.show(&["account", "mode", ACCOUNT, "enforce", "--client-ip", &OFFICE.to_string()])?;

    heading("4. Nodes 2 and 3 applied it from etcd and enforce it on their own wires");
    converge(&nodes, n1)?;
    for node in [n2, n3] {
        node.cluster_status()?;
        node.expect_connection(OFFICE, true)?;
        node.expect_connection(STRANGER, false)?;
    }

    heading("5. A ban through node-3, seen on node-1");
    n3.ctl.show(&["account", "state", ACCOUNT, "banned", "--reason", "chargeback fraud"])?;
    converge(&nodes, n3)?;
    n1.expect_check(OFFICE, "banned")?;
    n1.expect_connection(OFFICE, false)?;
    println!("\n   (it was a mistake: the ban is lifted, through node-1)");
    n1.ctl.show(&["account", "state", ACCOUNT, "active"])?;
    converge(&nodes, n1)?;
    n3.expect_connection(OFFICE, true)?;

    let leader = etcd.leader()?;
    let other = (0..MEMBERS).find(|&i| i != leader).expect("three members");
    heading(&format!("6. etcd loses its quorum: the leader m{leader} and m{other} are killed"));
    etcd.kill(leader)?;
    etcd.kill(other)?;
    println!("   one member of three is left: no quorum, no leader");

    heading("7. Every node still enforces and answers checks; changes are refused");
    for node in &nodes {
        node.expect_connection(OFFICE, true)?;
        node.expect_connection(STRANGER, false)?;
        node.expect_check(OFFICE, "allowed")?;
        let add = ["allow", "add", ACCOUNT, &format!("{STRANGER}/32"), "--label", "travel"];
        let refused = node.ctl.output(&add)?;
        let said = String::from_utf8_lossy(&refused.stderr);
        if refused.status.success() || !said.contains("cluster_unavailable") {
            bail!("{}: a change without etcd should be refused with cluster_unavailable, got: {said}", node.name);
        }
        println!("result: {}: change refused (cluster_unavailable)", node.name);
        node.cluster_status()?;
    }

    heading(&format!("8. etcd comes back: m{leader} and m{other} start again on their data"));
    etcd.restart(leader)?;
    etcd.restart(other)?;
    etcd.wait_healthy(Duration::from_secs(30))?;
    println!("   all three members healthy; leader m{}", etcd.leader()?);

    heading("9. The change again, through node-2: accepted, and enforced on every node");
    n2.change_when_etcd_answers(&["allow", "add", ACCOUNT, &format!("{STRANGER}/32"), "--label", "travel"])?;
    converge(&nodes, n2)?;
    wait_connected(&nodes)?;
    for node in &nodes {
        node.cluster_status()?;
        node.expect_connection(STRANGER, true)?;
    }

    heading("Cleaning up");
    drop(nodes);
    drop(etcd);
    drop(etcd_ns);
    drop(dir);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One ipaccessd node. Fields drop in order: the service, the daemon, then the namespaces (the
/// veths, to the client and to etcd, die with them).
struct Node {
    name: String,
    _service: TcpService,
    daemon: Daemon,
    ctl: Ctl,
    client: Netns,
    _server: Netns,
}

impl Node {
    fn start(
        k: usize,
        server: String,
        client: String,
        etcd: &Etcd,
        dir: &Path,
        daemon_bin: &Path,
        ctl_bin: &Path,
    ) -> Result<Node> {
        check_interrupted()?;
        let name = format!("node-{}", k + 1);
        let (server, client) = (Netns::new(server)?, Netns::new(client)?);
        veth_pair(&server, &client)?;
        let endpoints = etcd.link(k, &server)?;
        let dir = dir.join(&name);
        fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let quoted: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        // Small tables: the tour needs a handful of slots, not the production default.
        let config = format!(
            "[maps]\nslots = 65536\naccounts = 1024\n\n[cluster]\nendpoints = [{}]\nprefix = \"{PREFIX}\"\nnode = \"{name}\"\n",
            quoted.join(", ")
        );
        println!("\n   {name}: server {} and client {}; etcd at {}", server.name, client.name, endpoints.join(", "));
        let daemon = Daemon::start(daemon_bin, &server, &dir, &config)?;
        let ctl = Ctl { bin: ctl_bin.to_path_buf(), socket: daemon.socket.clone(), prompt: format!("{name}$") };
        let service = TcpService::start(&server, SocketAddrV4::new(SERVER, PORT))?;
        Ok(Node { name, _service: service, daemon, ctl, client, _server: server })
    }

    /// `applied` and `cluster` of the `revision: applied A of C (lag L)` line of `status`.
    fn revisions(&self) -> Result<(u64, u64)> {
        let out = self.ctl.quiet(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().find_map(|l| l.strip_prefix("revision: applied ")).with_context(|| {
            format!("{}: no cluster revision in `ipaccessctl status`:\n{text}\n{}", self.name, self.daemon.log_text())
        })?;
        let mut words = line.split_whitespace();
        let applied = words.next().and_then(|w| w.parse().ok());
        let cluster = words.nth(1).and_then(|w| w.parse().ok());
        applied.zip(cluster).with_context(|| format!("{}: unexpected status line `{line}`", self.name))
    }

    /// Shows the cluster lines of `ipaccessctl status`.
    fn cluster_status(&self) -> Result<()> {
        println!("\n{} ipaccessctl status   (its cluster lines)", self.ctl.prompt);
        let out = self.ctl.quiet(&["status"])?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().filter(|l| l.starts_with("cluster: ") || l.starts_with("revision: ")) {
            println!("  {line}");
        }
        if !out.status.success() {
            bail!("{}: `ipaccessctl status` failed: {}", self.name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A password sign-in check from `src` that must come out with `reason`.
    fn expect_check(&self, src: Ipv4Addr, reason: &str) -> Result<()> {
        let allowed = reason == "allowed";
        let out = self
            .ctl
            .show_expecting(&["check", ACCOUNT, &src.to_string(), "--method", "password"], i32::from(!allowed))?;
        let expected = if allowed { "allowed".to_string() } else { format!("denied ({reason})") };
        if !out.starts_with(&expected) {
            bail!("{}: expected the check to say `{expected}`, got: {out}", self.name);
        }
        println!("result: {}: login from {src}: {expected}", self.name);
        Ok(())
    }

    /// Connects from `src` in the node's client namespace to its service, and fails the tour
    /// unless the outcome is the expected one.
    fn expect_connection(&self, src: Ipv4Addr, allowed: bool) -> Result<()> {
        check_interrupted()?;
        let dst = SocketAddrV4::new(SERVER, PORT);
        println!("   {}: connecting from {src} to {dst} ...", self.name);
        let greeting = self.client.run(move || tcp_greeting(src, dst))?;
        let outcome = match &greeting {
            Some(text) => format!("connected ({})", text.trim()),
            None => format!("blocked (no answer within {BLOCKED_AFTER:?})"),
        };
        println!("result: {}: {src} -> {dst}: {outcome}", self.name);
        if greeting.is_some() != allowed {
            bail!("{}: {src} -> {dst} should have been {}", self.name, if allowed { "connected" } else { "blocked" });
        }
        Ok(())
    }

    /// Makes a change, trying again (quietly) while the node still finds etcd unavailable: it
    /// reconnects within a few seconds of etcd's return. Shows the attempt that succeeds.
    fn change_when_etcd_answers(&self, args: &[&str]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.ctl.quiet(args)?;
            if out.status.success() {
                println!("\n{} ipaccessctl {}", self.ctl.prompt, shell_words(args));
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    println!("  {line}");
                }
                return Ok(());
            }
            let said = String::from_utf8_lossy(&out.stderr).into_owned();
            if !said.contains("cluster_unavailable") || Instant::now() > deadline {
                bail!("{}: `ipaccessctl {}` failed: {said}", self.name, args.join(" "));
            }
            println!("   ({} still finds etcd unavailable; trying again)", self.name);
            pause(Duration::from_millis(500))?;
        }
    }
}

/// Waits until every node has applied what `origin` has (the revision of its last change).
fn converge(nodes: &[Node], origin: &Node) -> Result<()> {
    let (revision, _) = origin.revisions()?;
    let deadline = Instant::now() + Duration::from_secs(15);
    for node in nodes {
        loop {
            let (applied, _) = node.revisions()?;
            if applied >= revision {
                break;
            }
            if Instant::now() > deadline {
                bail!("{} did not apply revision {revision} within 15 s (it has {applied})", node.name);
            }
            pause(Duration::from_millis(20))?;
        }
    }
    println!("   every node has applied etcd revision {revision}");
    Ok(())
}

/// Waits until every node's `status` says it is connected to etcd again: a node learns of
/// etcd's return by its own probes and reconnects, not all at the same moment.
fn wait_connected(nodes: &[Node]) -> Result<()> {
    let started = Instant::now();
    for node in nodes {
        let connected = format!("cluster: node {}, connected", node.name);
        loop {
            let out = node.ctl.quiet(&["status"])?;
            let text = String::from_utf8_lossy(&out.stdout);
            if text.lines().any(|l| l == connected) {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("{} is still not connected to etcd after 30 s:\n{text}", node.name);
            }
            pause(Duration::from_millis(100))?;
        }
    }
    println!("   every node reports etcd connected");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// etcd

/// etcd's members, each `ip netns exec NS etcd ...` in its own process group (a Ctrl-C at the
/// terminal reaches only the tour). Drop kills them with SIGKILL and reaps them.
struct Etcd {
    ns: String,
    members: Vec<Member>,
}

struct Member {
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Etcd {
    fn start(ns: &Netns, dir: &Path) -> Result<Etcd> {
        let members = (0..MEMBERS)
            .map(|i| Member { data: dir.join(format!("m{i}")), log: dir.join(format!("m{i}.log")), child: None })
            .collect();
        let mut etcd = Etcd { ns: ns.name.clone(), members };
        for i in 0..MEMBERS {
            etcd.spawn(i, "new")?;
        }
        etcd.wait_healthy(Duration::from_secs(20))?;
        Ok(etcd)
    }

    fn local_endpoint(i: usize) -> String {
        format!("http://127.0.0.1:{}", CLIENT_PORT + 2 * i as u16)
    }

    fn peer_url(i: usize) -> String {
        format!("http://127.0.0.1:{}", CLIENT_PORT + 2 * i as u16 + 1)
    }

    /// `state`: `new` on the first start, `existing` on a restart on the member's data.
    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let initial: Vec<String> = (0..MEMBERS).map(|j| format!("m{j}={}", Self::peer_url(j))).collect();
        let member = &mut self.members[i];
        let log = fs::OpenOptions::new().create(true).append(true).open(&member.log)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "etcd", "--name", &format!("m{i}")])
            .arg("--data-dir")
            .arg(&member.data)
            .args(["--listen-client-urls", &format!("http://0.0.0.0:{}", CLIENT_PORT + 2 * i as u16)])
            .args(["--advertise-client-urls", &Self::local_endpoint(i)])
            .args(["--listen-peer-urls", &Self::peer_url(i)])
            .args(["--initial-advertise-peer-urls", &Self::peer_url(i)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-state", state])
            .args(["--initial-cluster-token", &self.ns])
            // Quick elections, so that the tour does not wait for etcd's 1 s default.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // An ETCD_* variable of the caller's would silently override a flag above.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        member.child = Some(cmd.spawn().context("starting etcd (Debian's etcd-server)")?);
        Ok(())
    }

    /// `etcdctl ARGS` in the etcd namespace against `endpoints`: its stdout, or its error.
    fn etcdctl(&self, endpoints: &[String], args: &[&str]) -> Result<String> {
        check_interrupted()?;
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "env", "ETCDCTL_API=3", "etcdctl"])
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(ETCDCTL_TIMEOUTS)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!("`etcdctl {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn all_endpoints() -> Vec<String> {
        (0..MEMBERS).map(Self::local_endpoint).collect()
    }

    /// Waits until every member is healthy (a quorum read through each of them succeeds).
    fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            for (i, member) in self.members.iter_mut().enumerate() {
                if let Some(status) = member.child.as_mut().map(Child::try_wait).transpose()?.flatten() {
                    let log = fs::read_to_string(&member.log).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(10).collect();
                    bail!(
                        "etcd member m{i} exited ({status}):\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
            let last = match self.etcdctl(&Self::all_endpoints(), &["endpoint", "health"]) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() > deadline {
                return Err(last.context(format!("etcd is not healthy after {within:?}")));
            }
            pause(Duration::from_millis(200))?;
        }
    }

    /// The member that is leader, from `etcdctl endpoint status`: one line per member,
    /// `URL, ID, VERSION, DB SIZE, IS LEADER, ...`.
    fn leader(&self) -> Result<usize> {
        let live: Vec<String> =
            (0..MEMBERS).filter(|&i| self.members[i].child.is_some()).map(Self::local_endpoint).collect();
        let text = self.etcdctl(&live, &["endpoint", "status"])?;
        text.lines()
            .find_map(|line| {
                let fields: Vec<&str> = line.split(", ").collect();
                (fields.get(4) == Some(&"true"))
                    .then(|| (0..MEMBERS).find(|&i| fields[0] == Self::local_endpoint(i)))?
            })
            .with_context(|| format!("no leader in `etcdctl endpoint status`:\n{text}"))
    }

    /// SIGKILL to member `i`, reaped at once.
    fn kill(&mut self, i: usize) -> Result<()> {
        let mut child = self.members[i].child.take().with_context(|| format!("etcd member m{i} is not running"))?;
        child.kill()?;
        child.wait()?;
        println!("   killed etcd member m{i} (SIGKILL)");
        Ok(())
    }

    fn restart(&mut self, i: usize) -> Result<()> {
        self.spawn(i, "existing")?;
        println!("   started etcd member m{i}");
        Ok(())
    }

    /// Joins node `k`'s server namespace to etcd's with a veth pair: `n<k+1>` on etcd's side,
    /// `etcd` on the node's, 198.18.(101+k).0/24. Returns the members' URLs as the node sees
    /// them, once each running member accepts a connection from there.
    fn link(&self, k: usize, node: &Netns) -> Result<Vec<String>> {
        let ours = format!("n{}", k + 1);
        ip(&["link", "add", &ours, "netns", &self.ns, "type", "veth", "peer", "name", "etcd", "netns", &node.name])?;
        let net = 101 + k as u8;
        for (ns, ifname, host) in [(self.ns.as_str(), ours.as_str(), 1), (node.name.as_str(), "etcd", 2)] {
            ip(&["-n", ns, "addr", "add", &format!("198.18.{net}.{host}/24"), "dev", ifname])?;
            ip(&["-n", ns, "link", "set", ifname, "up"])?;
        }
        let server = Ipv4Addr::new(198, 18, net, 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        for i in 0..MEMBERS {
            let addr = SocketAddr::from((server, CLIENT_PORT + 2 * i as u16));
            while !node.run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok())? {
                if Instant::now() > deadline {
                    bail!("etcd member m{i} is not reachable at {addr} from {}", node.name);
                }
                pause(Duration::from_millis(20))?;
            }
        }
        Ok((0..MEMBERS).map(|i| format!("http://{server}:{}", CLIENT_PORT + 2 * i as u16)).collect())
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for (i, member) in self.members.iter_mut().enumerate() {
            if let Some(mut child) = member.child.take() {
                let _ = child.kill();
                let _ = child.wait();
                println!("   stopped etcd member m{i}");
            }
        }
    }
}
