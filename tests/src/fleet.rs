//! A fleet for the etcd-backed tests and `cargo xtask bench fleet`: one real etcd cluster
//! ([`EtcdCluster`]) and N ipaccessd nodes, each a [`Host`] (server and client namespaces, a
//! private bpffs, a directory, the daemon run through its configuration file) whose server
//! namespace is linked to the etcd namespace by a veth of its own.
//!
//! The daemon filters only the node's `server_if`; its traffic to etcd goes over the separate
//! `etcd<k>` link (198.18.(100+k).0/24), so the XDP program never sees it.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use anyhow::{Context, Result};

use crate::daemon::Launch;
use crate::etcd::EtcdCluster;
use crate::netns::{TcpServer, tcp_connect};
use crate::ops::Host;

/// The key prefix the fleet's configuration files name unless a test chooses another.
pub const PREFIX: &str = "/ipaccess-test/";

/// One ipaccessd node of a fleet: its [`Host`], its name in the cluster, and the etcd client
/// URLs as seen from its server namespace (where the daemon runs).
pub struct FleetNode {
    pub host: Host,
    pub name: String,
    pub endpoints: Vec<String>,
}

impl FleetNode {
    /// A fresh host linked to `etcd`; the configuration is not written yet.
    pub fn new(etcd: &mut EtcdCluster, name: &str) -> Result<FleetNode> {
        let host = Host::new();
        let endpoints = etcd.link(&host.hosts.server).with_context(|| format!("link node {name} to etcd"))?;
        Ok(FleetNode { host, name: name.to_string(), endpoints })
    }

    /// The `[cluster]` section of this node's configuration file.
    pub fn cluster_toml(&self, prefix: &str) -> String {
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| toml_string(e)).collect();
        format!(
            "[cluster]\nendpoints = [{}]\nprefix = {}\nnode = {}\n",
            endpoints.join(", "),
            toml_string(prefix),
            toml_string(&self.name)
        )
    }

    /// The whole configuration: the node's server interface, then `extra` top-level settings
    /// (e.g. `log_level = "debug"`; may be empty), then the cluster section.
    pub fn config(&self, prefix: &str, extra: &str) -> String {
        format!(
            "interfaces = [{}]\n{extra}{}{}",
            toml_string(&self.host.hosts.server_if),
            if extra.is_empty() || extra.ends_with('\n') { "" } else { "\n" },
            self.cluster_toml(prefix)
        )
    }

    /// Writes [`FleetNode::config`] (with the test map sizes appended, as every ops test does).
    pub fn write_config(&self, prefix: &str, extra: &str) {
        self.host.write_config(&self.config(prefix, extra));
    }

    /// Starts the daemon on its configuration file and waits until its socket answers.
    pub fn start(&mut self) {
        self.host.start(&Launch::default());
    }

    /// SIGTERM to the daemon and waits (SIGKILL after a while); nothing if it is not running.
    pub fn stop(&mut self) {
        if let Some(mut daemon) = self.host.daemon.take() {
            daemon.terminate();
        }
    }

    /// SIGKILL to the daemon, as a crash would; nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut daemon) = self.host.daemon.take() {
            daemon.kill9();
        }
    }

    pub fn is_running(&self) -> bool {
        self.host.daemon.is_some()
    }

    /// The node's `status.cluster`.
    pub fn cluster_status(&self) -> Value {
        self.host.ok(json!({"cmd": "status"}))["cluster"].clone()
    }

    /// Every policy change up to this revision is applied on the node.
    pub fn applied(&self) -> i64 {
        self.cluster_status()["applied_revision"].as_i64().expect("a fleet node reports its revision")
    }

    /// What the node answers for a sign-in of `account` from `ip` (a dry run: nothing is
    /// recorded): allowed, and the reason.
    pub fn check(&self, account: &str, ip: IpAddr) -> (bool, String) {
        let reply = self.host.ok(json!({"cmd": "check", "account": account, "addr": ip, "dry_run": true}));
        (reply["allowed"].as_bool().unwrap(), reply["reason"].as_str().unwrap().to_owned())
    }

    /// On the node's wire: its first client address gets through to `port` on its server
    /// address, the second does not (the tests' accounts allow the first only).
    pub fn enforces(&self, port: u16) -> bool {
        let hosts = &self.host.hosts;
        let target = SocketAddr::new(hosts.server_v4.into(), port);
        let (good, bad) = (IpAddr::V4(hosts.client_v4[0]), IpAddr::V4(hosts.client_v4[1]));
        hosts.client.run(|| {
            tcp_connect(good, target, Duration::from_secs(2)) && !tcp_connect(bad, target, Duration::from_millis(500))
        })
    }

    /// A TCP listener on the node's server address and `port` (fleet-wide bindings name the
    /// same address on every node).
    pub fn tcp_listener(&self, port: u16) -> TcpServer {
        let hosts = &self.host.hosts;
        TcpServer::start_in(&hosts.server, SocketAddr::new(hosts.server_v4.into(), port)).unwrap()
    }
}

/// Runs the real `ipaccessctl cluster import` (with `--json`) against `socket`: its exit
/// status, stdout as JSON (null if it is not), and stderr.
pub fn ctl_import(socket: &std::path::Path) -> (i32, Value, String) {
    let out = std::process::Command::new(&crate::daemon::binaries().ctl)
        .args(["--socket", socket.to_str().unwrap(), "--json", "cluster", "import"])
        .output()
        .expect("run ipaccessctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), value, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The error code of a reply, or None if it is `ok`.
pub fn error_code(reply: &Value) -> Option<String> {
    if reply.get("ok").is_some() {
        return None;
    }
    Some(reply["error"]["code"].as_str().unwrap_or_else(|| panic!("neither ok nor error: {reply}")).to_owned())
}

/// A TOML basic string. Names, URLs and interface names here are plain ASCII; the escapes
/// keep a stray quote or backslash from breaking the file.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// An etcd cluster of 3 members and `n` nodes named node-a, node-b, ... with their
/// configuration files written for [`PREFIX`]. Dropping it stops the daemons first, then
/// removes the nodes, then the etcd cluster.
pub struct Fleet {
    pub etcd: EtcdCluster,
    pub nodes: Vec<FleetNode>,
}

impl Fleet {
    /// Starts etcd and prepares `n` nodes (at most 26); no daemon runs yet.
    pub fn new(n: usize) -> Result<Fleet> {
        Self::with_members(3, n)
    }

    /// [`Fleet::new`] with an etcd cluster of `members` members.
    pub fn with_members(members: usize, n: usize) -> Result<Fleet> {
        anyhow::ensure!(n <= 26, "at most 26 nodes (node-a to node-z), not {n}");
        let mut etcd = EtcdCluster::start(members)?;
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("node-{}", (b'a' + i as u8) as char);
            let node = FleetNode::new(&mut etcd, &name)?;
            node.write_config(PREFIX, "");
            nodes.push(node);
        }
        Ok(Fleet { etcd, nodes })
    }

    /// Waits until every running node has applied the highest revision any of them has.
    pub fn settle(&self) {
        let revision = self.nodes.iter().filter(|n| n.is_running()).map(FleetNode::applied).max().unwrap_or(0);
        self.converge(revision);
    }

    /// A TCP listener on every node's server address and `port`.
    pub fn listeners(&self, port: u16) -> Vec<TcpServer> {
        self.nodes.iter().map(|n| n.tcp_listener(port)).collect()
    }

    /// Starts every node's daemon that is not running yet, one after another.
    pub fn start_all(&mut self) {
        for node in self.nodes.iter_mut().filter(|n| !n.is_running()) {
            node.start();
        }
    }

    /// The node named `name`.
    pub fn node(&mut self, name: &str) -> &mut FleetNode {
        self.nodes.iter_mut().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Writes a marker key inside the policy range the nodes follow and returns its
    /// revision: a node that has applied it has applied everything before it. (etcd's own
    /// revision counts the nodes' records too, which nodes do not follow.)
    pub fn barrier(&self) -> Result<i64> {
        let text = self.etcd.etcdctl(&["put", &format!("{PREFIX}zz-barrier"), "x", "-w", "json"])?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("etcdctl put: not JSON: {text}"))?;
        value["header"]["revision"].as_i64().with_context(|| format!("no revision in {text}"))
    }

    /// Waits (at most `within`) until every running node has applied `revision`.
    pub fn converge_within(&self, revision: i64, within: Duration) {
        let deadline = Instant::now() + within;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let status = node.cluster_status();
                if status["applied_revision"].as_i64().unwrap_or(0) >= revision {
                    break;
                }
                assert!(Instant::now() < deadline, "{} did not apply revision {revision}: {status}", node.name);
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// [`Fleet::converge_within`] 15 s.
    pub fn converge(&self, revision: i64) {
        self.converge_within(revision, Duration::from_secs(15));
    }

    /// Waits until etcd has a leader and every live member agrees (see
    /// [`EtcdCluster::wait_healthy`]).
    pub fn wait_etcd(&self, within: Duration) -> Result<()> {
        self.etcd.wait_healthy(within)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Daemons first, so none of them sees etcd vanish and logs or retries in vain; then
        // the nodes' namespaces; `etcd` (a field) goes last.
        for node in &mut self.nodes {
            node.stop();
        }
        self.nodes.clear();
    }
}
