//! `cargo xtask demo`, run as a developer runs it: it must tell its whole story (an allowed
//! and a blocked client, a refused login, an override letting the blocked address in, counters
//! and the activity log) and leave nothing behind, also when interrupted with Ctrl-C halfway.
//! `cargo xtask demo --fleet` likewise: a change through one node enforced on the others'
//! wires, every node enforcing and refusing changes while etcd has no quorum, and no etcd
//! member, namespace or file left afterwards.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ipaccess_tests::netns::run_ok;
use ipaccess_tests::xtask::cargo_xtask;

/// The tour takes seconds; the rest is room for building the binaries on a cold cache.
const LIMIT: Duration = Duration::from_secs(15 * 60);

/// The namespaces and directory a demo announced: "namespaces: S (server) and C (client);
/// files in DIR", or for the fleet "namespaces: E (etcd), S1 C1 (node-1), ...; files in DIR".
fn created(output: &str) -> (Vec<String>, String) {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("namespaces: "))
        .unwrap_or_else(|| panic!("the demo did not name its namespaces:\n{output}"));
    let (names, dir) = line.split_once("; files in ").unwrap_or_else(|| panic!("no directory in `{line}`"));
    let namespaces: Vec<String> = names
        .split_whitespace()
        .filter(|w| !w.starts_with('(') && *w != "and")
        .map(|w| w.trim_end_matches(',').to_string())
        .collect();
    (namespaces, dir.trim().to_string())
}

/// Nothing the demo made is left: namespaces, directory, processes using it, mounts.
fn assert_nothing_left(output: &str) {
    let (namespaces, dir) = created(output);
    assert!(dir.contains("ipaccess-demo-"), "{dir}");
    let listed = run_ok("ip", &["netns", "list"]).unwrap();
    for ns in &namespaces {
        assert!(!listed.lines().any(|l| l.split_whitespace().next() == Some(ns)), "namespace {ns} is left:\n{listed}");
    }
    assert!(!Path::new(&dir).exists(), "{dir} is left");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&dir), "process {} is left: {cmdline}", entry.file_name().to_string_lossy());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&dir), "a mount under {dir} is left");
}

#[test]
fn demo_tells_the_whole_story() {
    let out = cargo_xtask(&["demo"], LIMIT).expect("run cargo xtask demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed ({}):\n{stdout}\n{stderr}", out.status);
    let results: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("result: ")).collect();
    let expected = [
        "198.18.0.10 -> 198.18.0.1:8080: connected (hello 198.18.0.10, this is acme's service)",
        "198.18.0.20 -> 198.18.0.1:8080: blocked (no answer within 2s)",
        "login from 198.18.0.20: denied",
        "login from 198.18.0.20: allowed",
        "198.18.0.20 -> 198.18.0.1:8080: connected (hello 198.18.0.20, this is acme's service)",
    ];
    assert_eq!(results, expected, "{stdout}");
    // It shows the commands it runs, the denial's reason and hint, counters and the log.
    for text in [
        "$ ipaccessctl bind add acme 198.18.0.1:8080",
        "$ ipaccessctl override grant acme 198.18.0.20 --ttl 1h --ticket DEMO-1",
        "denied (address_not_allowed): Sign-in from 198.18.0.20 is not allowed",
        "$ ipaccessctl stats acme",
        "$ ipaccessctl activity acme",
        "override_granted",
    ] {
        assert!(stdout.contains(text), "no `{text}` in:\n{stdout}");
    }
    // The blocked attempt was counted and sampled by the kernel.
    let stats = stdout.lines().find(|l| l.trim_start().starts_with("acme ")).expect("a stats row for acme");
    let dropped: u64 = stats.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(dropped >= 1, "{stats}");
    assert!(stdout.lines().any(|l| l.contains(" drop ") && l.contains("198.18.0.20")), "{stdout}");
    assert!(stdout.contains("everything it created is gone"), "{stdout}");
    assert_nothing_left(&stdout);
}

#[test]
fn demo_cleans_up_when_interrupted() {
    interrupt_at(&["demo"], "== 5.", &["stopped ipaccessd", "deleted namespace", "removed /"]);
}

/// Runs `cargo xtask ARGS`, sends it SIGINT as a terminal's Ctrl-C would once it prints a line
/// starting with `step`, and checks that it stops, says `said`, and leaves nothing behind.
fn interrupt_at(args: &[&str], step: &str, said: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Its own process group, so that the SIGINT below reaches it the way a terminal's Ctrl-C
    // reaches a foreground job, and nothing else.
    let mut child = Command::new(cargo)
        .arg("xtask")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let errors = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });

    // Interrupt while traffic flows: the daemon runs and the namespaces exist.
    let mut output = String::new();
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                output.push_str(&line);
                output.push('\n');
                if line.starts_with(step) {
                    break;
                }
            }
            Err(_) => {
                let _ = child.kill();
                panic!("the demo did not reach `{step}`:\n{output}");
            }
        }
    }
    let (namespaces, _) = created(&output);
    assert!(run_ok("ip", &["netns", "list"]).unwrap().contains(&namespaces[0]));
    // SAFETY: kill(2) on the process group of our own child.
    assert_eq!(unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGINT) }, 0);

    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop within 30 s of Ctrl-C:\n{output}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    reader.join().unwrap();
    output.extend(lines.try_iter().map(|l| l + "\n"));
    let errors = errors.join().unwrap();
    assert!(!status.success(), "an interrupted demo must not report success:\n{output}");
    assert!(errors.contains("interrupted: cleaning up"), "{errors}");
    for text in said {
        assert!(output.contains(text), "no `{text}` in:\n{output}\n{errors}");
    }
    assert_nothing_left(&output);
}

#[test]
fn fleet_demo_tells_the_whole_story() {
    let out = cargo_xtask(&["demo", "--fleet"], LIMIT).expect("run cargo xtask demo --fleet");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the fleet demo failed ({}):\n{stdout}\n{stderr}", out.status);
    let results: Vec<&str> = stdout.lines().filter_map(|l| l.strip_prefix("result: ")).collect();
    let office = "198.18.0.10 -> 198.18.0.1:8080: connected (hello 198.18.0.10, this is acme's service)";
    let stranger_blocked = "198.18.0.20 -> 198.18.0.1:8080: blocked (no answer within 2s)";
    let stranger = "198.18.0.20 -> 198.18.0.1:8080: connected (hello 198.18.0.20, this is acme's service)";
    let mut expected = Vec::new();
    // Made through node-1, enforced on the wires of nodes 2 and 3.
    for node in ["node-2", "node-3"] {
        expected.push(format!("{node}: {office}"));
        expected.push(format!("{node}: {stranger_blocked}"));
    }
    // A ban through node-3 on node-1; lifted through node-1, seen on node-3.
    expected.push("node-1: login from 198.18.0.10: denied (banned)".into());
    expected.push("node-1: 198.18.0.10 -> 198.18.0.1:8080: blocked (no answer within 2s)".into());
    expected.push(format!("node-3: {office}"));
    // etcd without a quorum: every node enforces, answers checks, refuses changes.
    for node in ["node-1", "node-2", "node-3"] {
        expected.push(format!("{node}: {office}"));
        expected.push(format!("{node}: {stranger_blocked}"));
        expected.push(format!("{node}: login from 198.18.0.10: allowed"));
        expected.push(format!("{node}: change refused (cluster_unavailable)"));
    }
    // etcd back: a change through node-2 is enforced everywhere.
    for node in ["node-1", "node-2", "node-3"] {
        expected.push(format!("{node}: {stranger}"));
    }
    assert_eq!(results, expected, "{stdout}");
    for text in [
        "node-1$ ipaccessctl bind add acme 198.18.0.1:8080",
        "node-3$ ipaccessctl account state acme banned",
        "node-2$ ipaccessctl status",
        "cluster: node node-2, connected",
        "cluster: node node-3, unavailable",
        "killed etcd member",
        "every node has applied etcd revision",
        "everything it created is gone",
    ] {
        assert!(stdout.contains(text), "no `{text}` in:\n{stdout}");
    }
    // Each node's status shows it caught up with the cluster at the end.
    assert!(stdout.lines().filter(|l| l.trim_start().starts_with("revision: applied")).any(|l| l.contains("(lag 0)")));
    let (namespaces, _) = created(&stdout);
    assert_eq!(namespaces.len(), 7, "etcd's and 2 per node: {namespaces:?}");
    assert_nothing_left(&stdout);
}

#[test]
fn fleet_demo_cleans_up_when_interrupted() {
    // At step 4 etcd's three members, three daemons and seven namespaces are up.
    let said =
        ["stopped ipaccessd", "stopped etcd member m0", "stopped etcd member m2", "deleted namespace", "removed /"];
    interrupt_at(&["demo", "--fleet"], "== 4.", &said);
}
