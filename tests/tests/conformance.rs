//! The language-neutral conformance list (tests/conformance.jsonl), run against the real
//! daemon over its real socket by the Python reference client (clients/python/conformance.py,
//! standard library only) and by the Rust client, `ipaccess::client`, blocking and async
//! (src/bin/conformance-rust.rs, which also holds every reply to its command's type): every
//! check reason, every error code a client can provoke, framing (blank lines, ids echoed
//! exactly, pipelining and its window) and a daemon restart, which this test performs when
//! the runner asks for it. Each runner gets a daemon of its own.
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
/// closed after 2 s (the `idle` step); an account holds at most 2 allowlist entries (the
/// `too_many_entries` case).
const CONFIG: &str = "socket_mode = 0o666\n[roles]\ncheck = { uids = [65534] }\n\
                      [limits]\nmax_connections_per_uid = 16\nmax_request_bytes = 4096\n\
                      max_admin_request_bytes = 65536\nidle_timeout_seconds = 2\nmax_entries_per_account = 2";

/// Longest the whole list may take.
const RUN: Duration = Duration::from_secs(240);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_python_client_passes_the_conformance_list() {
    let mut python = Command::new("python3");
    python.arg(root().join("clients/python/conformance.py"));
    passes_the_list(python);
}

#[test]
fn the_rust_client_passes_the_conformance_list() {
    held_to_types(&passes_the_list(Command::new(env!("CARGO_BIN_EXE_conformance-rust"))));
}

#[test]
fn the_async_rust_client_passes_the_conformance_list() {
    let mut runner = Command::new(env!("CARGO_BIN_EXE_conformance-rust"));
    runner.arg("--async");
    held_to_types(&passes_the_list(runner));
}

/// The Rust runner held every `ok` it received to its command's reply type: the setup
/// cases, the checks and the reads at least.
fn held_to_types(output: &str) {
    let held = output.lines().find_map(|l| l.strip_prefix("replies held to their command's type: "));
    let held: usize =
        held.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no count of typed replies:\n{output}"));
    assert!(held >= 30, "only {held} replies were held to their types:\n{output}");
}

/// Runs `runner --socket S --list L` against a fresh daemon, restarting the daemon when
/// the runner asks; every case must pass. The runner's output.
fn passes_the_list(mut runner: Command) -> String {
    let mut w = World::new(CONFIG);
    let root = root();
    let mut runner = runner
        .arg("--socket")
        .arg(w.socket())
        .arg("--list")
        .arg(root.join("tests/conformance.jsonl"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the conformance runner");
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
    output
}
