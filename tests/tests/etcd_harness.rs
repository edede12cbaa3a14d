//! The fleet tests' etcd harness, tested against real etcd members: a linked namespace reaches
//! every member, the cluster survives the loss of its leader, stops taking writes without a
//! quorum and takes them again when it returns, compaction bites watches the way the daemon's
//! resync will see it, and nothing (process, namespace, directory) outlives the cluster.
//! Needs root, `etcd` and `etcdctl` (`cargo xtask setup` installs them).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipaccess_tests::etcd::{COMMAND_TIMEOUT, DIAL_TIMEOUT, EtcdCluster, etcdctl_in};
use ipaccess_tests::fleet::{Fleet, PREFIX};
use ipaccess_tests::netns::{Netns, run_ok};

/// What a cluster leaves behind to check: its directory and namespace.
struct Traces {
    dir: PathBuf,
    ns: String,
}

impl Traces {
    fn of(etcd: &EtcdCluster) -> Traces {
        Traces { dir: etcd.dir().to_path_buf(), ns: etcd.netns().name().to_string() }
    }

    /// No etcd process with a data directory in `dir`, no namespace, no directory.
    fn assert_gone(&self) {
        assert_eq!(processes(&self.dir), "", "etcd processes left behind");
        let listed = run_ok("ip", &["netns", "list"]).unwrap();
        assert!(!listed.split_whitespace().any(|n| n == self.ns), "namespace {} left: {listed}", self.ns);
        assert!(!self.dir.exists(), "{} left", self.dir.display());
    }
}

/// `pgrep -a -f <dir>`: every process whose command line names the cluster's directory.
fn processes(dir: &Path) -> String {
    let out = std::process::Command::new("pgrep").args(["-a", "-f"]).arg(dir).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn put(etcd: &EtcdCluster, key: &str, value: &str) -> anyhow::Result<()> {
    let out = etcd.etcdctl(&["put", key, value])?;
    anyhow::ensure!(out.trim() == "OK", "put {key}: {out}");
    Ok(())
}

/// The value of `key` by a linearizable read; None if absent.
fn get(etcd: &EtcdCluster, key: &str) -> Option<String> {
    let out = etcd.etcdctl(&["get", key, "--print-value-only"]).unwrap();
    out.lines().next().map(str::to_string)
}

/// Retries `f` every 100 ms until it succeeds or `within` has passed.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e.context(format!("still failing after {within:?}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[test]
fn etcd_linked_namespaces_reach_every_member() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let traces = Traces::of(&etcd);
    assert_eq!(processes(etcd.dir()).lines().count(), 3, "{}", processes(etcd.dir()));
    assert!(etcd.leader().is_some());

    let a = Netns::new("nodea").unwrap();
    let b = Netns::new("nodeb").unwrap();
    let ends_a = etcd.link(&a).unwrap();
    let ends_b = etcd.link(&b).unwrap();
    let want =
        |net: u8| -> Vec<String> { [2379, 2381, 2383].iter().map(|p| format!("http://198.18.{net}.1:{p}")).collect() };
    assert_eq!(ends_a, want(100));
    assert_eq!(ends_b, want(101));

    // Through all three endpoints from a, then through each member alone from b: every member
    // is reachable over each link, and they share one keyspace.
    let t = COMMAND_TIMEOUT;
    assert_eq!(etcdctl_in(&a, &ends_a, &["put", "/harness/k", "from-a"], t).unwrap().trim(), "OK");
    for end in &ends_b {
        let got = etcdctl_in(&b, std::slice::from_ref(end), &["get", "/harness/k", "--print-value-only"], t).unwrap();
        assert_eq!(got.trim(), "from-a", "via {end}");
    }
    assert_eq!(get(&etcd, "/harness/k").as_deref(), Some("from-a"));
    // Nothing else is reachable from a node: not the other link's subnet.
    let other = vec![ends_b[0].clone()];
    assert!(etcdctl_in(&a, &other, &["get", "/harness/k"], Duration::from_secs(1)).is_err());

    drop(etcd);
    traces.assert_gone();
    // The node's end of the veth went with the etcd namespace.
    let links = a.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
}

#[test]
fn etcd_leader_killed_new_leader_and_data_kept() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let traces = Traces::of(&etcd);
    put(&etcd, "/harness/before", "kept").unwrap();
    let old = etcd.wait_leader(Duration::from_secs(5)).unwrap();
    let pid = etcd.pid(old).unwrap();

    let killed = Instant::now();
    etcd.kill(old).unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "member {old} (pid {pid}) still exists");
    let new = etcd.wait_leader(Duration::from_secs(5)).unwrap();
    let elected = killed.elapsed();
    assert_ne!(new, old);
    // The first put may still meet the election's tail; it must go through within seconds.
    eventually(Duration::from_secs(5), || put(&etcd, "/harness/after", "written")).unwrap();
    eprintln!(
        "leader {old} killed: member {new} leads after {elected:?}, a put succeeded after {:?}",
        killed.elapsed()
    );
    assert_eq!(get(&etcd, "/harness/before").as_deref(), Some("kept"));

    // Back on its data directory, the old leader catches up with what it missed.
    etcd.start_member(old).unwrap();
    etcd.wait_healthy(Duration::from_secs(15)).unwrap();
    let alone = [EtcdCluster::endpoint_local(old)];
    let args = ["get", "/harness/after", "--print-value-only", "--consistency=s"];
    let caught_up = eventually(Duration::from_secs(5), || {
        let v = etcdctl_in(etcd.netns(), &alone, &args, COMMAND_TIMEOUT)?;
        anyhow::ensure!(v.trim() == "written", "member {old} has {v:?}");
        Ok(())
    });
    caught_up.unwrap();

    // A paused member answers nothing but is not dead: etcdctl() leaves it out, the other
    // two keep the quorum, and it rejoins on SIGCONT.
    let follower = (0..3).find(|&i| Some(i) != etcd.leader()).unwrap();
    etcd.pause(follower).unwrap();
    assert!(!etcd.is_live(follower));
    put(&etcd, "/harness/paused", "yes").unwrap();
    etcd.resume(follower).unwrap();
    etcd.wait_healthy(Duration::from_secs(10)).unwrap();

    drop(etcd);
    traces.assert_gone();
}

#[test]
fn etcd_quorum_loss_blocks_writes_until_members_return() {
    let mut etcd = EtcdCluster::start(3).unwrap();
    let traces = Traces::of(&etcd);
    put(&etcd, "/harness/before", "kept").unwrap();
    // The survivor is a follower. (Were it the leader, a put that times out would sit in its
    // log and be committed once the quorum returns: a timeout is an unknown outcome.)
    let leader = etcd.wait_leader(Duration::from_secs(5)).unwrap();
    let survivor = (leader + 1) % 3;
    etcd.kill(leader).unwrap();
    // The other one stops the polite way (SIGTERM), and does so promptly.
    let other = (leader + 2) % 3;
    let pid = etcd.pid(other).unwrap();
    let start = Instant::now();
    etcd.stop(other).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5), "SIGTERM took {:?}", start.elapsed());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "member {other} (pid {pid}) still exists");
    assert_eq!(etcd.live_endpoints_local(), vec![EtcdCluster::endpoint_local(survivor)]);

    // One member of three cannot commit: the put fails, within etcdctl's own bounds.
    let start = Instant::now();
    let err = put(&etcd, "/harness/lost", "never").unwrap_err().to_string();
    let took = start.elapsed();
    assert!(err.contains("timed out") || err.contains("deadline exceeded") || err.contains("no leader"), "{err}");
    assert!(took < COMMAND_TIMEOUT + DIAL_TIMEOUT + Duration::from_secs(2), "the put took {took:?}");
    assert_eq!(etcd.leader(), None);
    assert!(etcd.revision().is_err(), "a linearizable read without a quorum");

    etcd.start_member(leader).unwrap();
    etcd.start_member(other).unwrap();
    etcd.wait_healthy(Duration::from_secs(15)).unwrap();
    eventually(Duration::from_secs(5), || put(&etcd, "/harness/after", "written")).unwrap();
    assert_eq!(get(&etcd, "/harness/before").as_deref(), Some("kept"));
    assert_eq!(get(&etcd, "/harness/after").as_deref(), Some("written"));
    // A follower without a leader drops the proposal: it never takes effect, not even later.
    assert_eq!(get(&etcd, "/harness/lost"), None);

    drop(etcd);
    traces.assert_gone();
}

#[test]
fn etcd_compaction_fails_old_watches() {
    let etcd = EtcdCluster::start(3).unwrap();
    let traces = Traces::of(&etcd);
    put(&etcd, "/harness/k", "1").unwrap();
    let old = etcd.revision().unwrap();
    put(&etcd, "/harness/k", "2").unwrap();
    put(&etcd, "/harness/k", "3").unwrap();
    assert_eq!(etcd.revision().unwrap(), old + 2);

    // Before compaction the old revision is readable.
    let at_old = ["get", "/harness/k", "--rev", &old.to_string(), "--print-value-only"];
    assert_eq!(etcd.etcdctl(&at_old).unwrap().trim(), "1");

    let compacted = etcd.compact_latest().unwrap();
    assert_eq!(compacted, old + 2);
    let err = etcd.etcdctl(&at_old).unwrap_err().to_string();
    assert!(err.contains("required revision has been compacted"), "{err}");
    // A watch from before the compaction is cancelled at once (a resync is due); a watch would
    // otherwise run until the bound on etcdctl, so the time tells the two apart.
    let start = Instant::now();
    let err = etcd.etcdctl(&["watch", "--rev", &old.to_string(), "/harness/k"]).unwrap_err().to_string();
    assert!(err.contains("required revision has been compacted"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    // The current value is untouched.
    assert_eq!(get(&etcd, "/harness/k").as_deref(), Some("3"));

    drop(etcd);
    traces.assert_gone();
}

#[test]
fn etcd_cleaned_up_after_a_panic() {
    let mut traces = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut etcd = EtcdCluster::start(3).unwrap();
        traces = Some(Traces::of(&etcd));
        let first = etcd.leader().unwrap();
        etcd.pause((first + 1) % 3).unwrap(); // a stopped process must be killed too
        panic!("the test fails with the cluster running");
    }));
    assert!(result.is_err());
    traces.expect("the cluster started").assert_gone();
}

#[test]
fn fleet_nodes_configured_and_linked() {
    let fleet = Fleet::new(2).unwrap();
    let traces = Traces::of(&fleet.etcd);
    let names: Vec<&str> = fleet.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node-a", "node-b"]);
    for (k, node) in fleet.nodes.iter().enumerate() {
        assert!(!node.is_running());
        let net = 100 + k;
        let want = format!(
            "[cluster]\nendpoints = [\"http://198.18.{net}.1:2379\", \"http://198.18.{net}.1:2381\", \
             \"http://198.18.{net}.1:2383\"]\nprefix = \"/ipaccess-test/\"\nnode = \"{}\"\n",
            node.name
        );
        assert_eq!(node.cluster_toml(PREFIX), want);
        let file = std::fs::read_to_string(node.host.path("ipaccessd.toml")).unwrap();
        let iface = format!("interfaces = [\"{}\"]\n", node.host.hosts.server_if);
        assert!(file.starts_with(&iface) && file.contains(&want), "{file}");
        // The daemon runs in the server namespace: etcd answers there.
        let key = format!("{PREFIX}probe/{}", node.name);
        let out = etcdctl_in(&node.host.hosts.server, &node.endpoints, &["put", &key, "x"], COMMAND_TIMEOUT).unwrap();
        assert_eq!(out.trim(), "OK");
    }
    let keys = fleet.etcd.etcdctl(&["get", PREFIX, "--prefix", "--keys-only"]).unwrap();
    assert_eq!(keys.split_whitespace().count(), 2, "{keys}");

    let server_ns: Vec<String> = fleet.nodes.iter().map(|n| n.host.hosts.server.name().to_string()).collect();
    drop(fleet);
    traces.assert_gone();
    let listed = run_ok("ip", &["netns", "list"]).unwrap();
    assert!(server_ns.iter().all(|n| !listed.split_whitespace().any(|l| l == n)), "{listed}");
}
