//! The language-neutral conformance list (tests/conformance.jsonl), run by the Python
//! reference client (clients/python/conformance.py, standard library only) against the real
//! daemon over its real socket: every check reason, every error code a client can provoke,
//! framing (blank lines, ids echoed exactly, pipelining and its window) and a daemon restart,
//! which this test performs when the runner asks for it.
//!
//! Build the binaries first: `cargo build --release -p ipaccess --bins`; needs `python3`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::World;

/// Uid 65534 may only check (the list's `"as": "nobody"` cases); root may open 16 connections
/// (the `busy` step); a line over 64 KiB is `too_large` even for root; idle connections are
/// closed after 2 s (the `idle` step).
const CONFIG: &str = "socket_mode = 0o666\n[roles]\ncheck = { uids = [65534] }\n\
                      [limits]\nmax_connections_per_uid = 16\nmax_request_bytes = 4096\n\
                      max_admin_request_bytes = 65536\nidle_timeout_seconds = 2";

/// Longest the whole list may take.
const RUN: Duration = Duration::from_secs(240);

#[test]
fn the_python_client_passes_the_conformance_list() {
    let mut w = World::new(CONFIG);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut runner = Command::new("python3")
        .arg(root.join("clients/python/conformance.py"))
        .arg("--socket")
        .arg(w.socket())
        .arg("--list")
        .arg(root.join("tests/conformance.jsonl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start python3");
    let mut to_runner = runner.stdin.take().unwrap();
    let (lines, from_runner) = mpsc::channel();
    let stdout = runner.stdout.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + RUN;
    let mut output = Vec::new();
    let mut restarted = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match from_runner.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = runner.kill();
                panic!("the conformance run took over {RUN:?}:\n{}", output.join("\n"));
            }
        };
        match line.as_str() {
            // SIGKILL: the socket file stays behind and refuses connections.
            "@restart kill" => {
                w.kill9();
                assert!(w.socket().exists(), "a killed daemon leaves its socket file");
                writeln!(to_runner, "killed").unwrap();
            }
            // The runner is retrying already; start returns once the new daemon answers.
            "@restart start" => {
                w.start(CONFIG);
                restarted = true;
            }
            _ => {}
        }
        output.push(line);
    }
    let status = runner.wait().unwrap();
    let output = output.join("\n");
    eprintln!("{output}");
    assert!(status.success(), "the conformance run failed ({status}):\n{output}");
    assert!(restarted, "the list's restart step did not run");
    let cases = std::fs::read_to_string(root.join("tests/conformance.jsonl")).unwrap();
    let count = cases.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(output.contains(&format!("conformance: {count} passed, 0 failed")), "{output}");
}
