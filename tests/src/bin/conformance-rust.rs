//! Runs the language-neutral conformance list (tests/conformance.jsonl) against a running
//! ipaccessd with the Rust client, `ipaccess::client` (blocking, or with `--async` the
//! tokio one): the same cases and the same conversation with its caller as
//! clients/python/conformance.py, so tests/tests/conformance.rs drives both alike.
//!
//!     conformance-rust --socket PATH [--list FILE] [--async] [--skip STEP]...
//!
//! Every `send` case that reads as a typed `Command` goes through the client; sends that
//! cannot be typed (an unknown command, a missing or extra argument), raw lines and ids the
//! client does not choose (strings, objects, numbers beyond 64 bits) use a plain socket, as
//! the framing steps do. Every `ok` the run receives is held to its command's reply type
//! (`Command::check_reply`: it reads as the type and writes back as the same JSON).
//!
//! The restart step prints `@restart kill`, waits for `killed` on stdin, then prints
//! `@restart start` while the client keeps retrying. Exit status 0 when every case passed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipaccess::client::{AsyncClient, Client, Error};
use ipaccess::protocol::{
    AllowAdd, Call, Check, CheckResult, Command, ErrorBody, ErrorCode, Method, SetAccountState, Status,
};
use serde_json::{Value, json, value::RawValue};

const NOBODY: u32 = 65534;
/// Longest wait for a reply the daemon owes.
const REPLY: Duration = Duration::from_secs(10);

/// The client under test, blocking or async, behind one face.
trait Api: Sized {
    fn open(path: &Path) -> Self;
    fn set_timeout(&mut self, timeout: Duration);
    fn connects(&self) -> u64;
    fn call<C: Call>(&mut self, request: C) -> Result<C::Reply, Error>;
    fn call_command(&mut self, command: Command) -> Result<Value, Error>;
    fn check(&mut self, account: &str, addr: IpAddr, method: Method) -> Result<CheckResult, Error>;
    fn pipeline<C: Call>(&mut self, requests: Vec<C>) -> Result<Vec<Result<C::Reply, Error>>, Error>;
}

impl Api for Client {
    fn open(path: &Path) -> Client {
        Client::lazy(path).with_timeout(REPLY)
    }
    fn set_timeout(&mut self, timeout: Duration) {
        Client::set_timeout(self, timeout)
    }
    fn connects(&self) -> u64 {
        Client::connects(self)
    }
    fn call<C: Call>(&mut self, request: C) -> Result<C::Reply, Error> {
        Client::call(self, request)
    }
    fn call_command(&mut self, command: Command) -> Result<Value, Error> {
        Client::call_command(self, command)
    }
    fn check(&mut self, account: &str, addr: IpAddr, method: Method) -> Result<CheckResult, Error> {
        Client::check(self, account, addr, method)
    }
    fn pipeline<C: Call>(&mut self, requests: Vec<C>) -> Result<Vec<Result<C::Reply, Error>>, Error> {
        Client::pipeline(self, requests)
    }
}

/// The tokio client, each call run to completion on a runtime of its own thread.
struct Async {
    runtime: tokio::runtime::Runtime,
    client: AsyncClient,
}

impl Api for Async {
    fn open(path: &Path) -> Async {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
        Async { runtime, client: AsyncClient::lazy(path).with_timeout(REPLY) }
    }
    fn set_timeout(&mut self, timeout: Duration) {
        self.client.set_timeout(timeout)
    }
    fn connects(&self) -> u64 {
        self.client.connects()
    }
    fn call<C: Call>(&mut self, request: C) -> Result<C::Reply, Error> {
        self.runtime.block_on(self.client.call(request))
    }
    fn call_command(&mut self, command: Command) -> Result<Value, Error> {
        self.runtime.block_on(self.client.call_command(command))
    }
    fn check(&mut self, account: &str, addr: IpAddr, method: Method) -> Result<CheckResult, Error> {
        self.runtime.block_on(self.client.check(account, addr, method))
    }
    fn pipeline<C: Call>(&mut self, requests: Vec<C>) -> Result<Vec<Result<C::Reply, Error>>, Error> {
        self.runtime.block_on(self.client.pipeline(requests))
    }
}

struct Failed(String);

impl From<Error> for Failed {
    fn from(e: Error) -> Failed {
        Failed(format!("client error: {e}"))
    }
}

impl From<std::io::Error> for Failed {
    fn from(e: std::io::Error) -> Failed {
        Failed(format!("socket: {e}"))
    }
}

fn expect(cond: bool, what: impl FnOnce() -> String) -> Result<(), Failed> {
    if cond { Ok(()) } else { Err(Failed(what())) }
}

/// The run's state: where the daemon is, and how many replies were held to their types.
struct Run {
    socket: PathBuf,
    typed: usize,
}

impl Run {
    /// `ok` must be exactly what `command`'s reply type reads and writes.
    fn hold(&mut self, command: &Command, ok: &Value) -> Result<(), Failed> {
        command.check_reply(ok).map_err(|e| Failed(format!("the reply does not fit its type: {e}")))?;
        self.typed += 1;
        Ok(())
    }

    /// `call_command` through the client, its `ok` held to the type.
    fn call(&mut self, api: &mut impl Api, command: Command) -> Result<Value, Error> {
        let ok = api.call_command(command.clone())?;
        if let Err(Failed(why)) = self.hold(&command, &ok) {
            return Err(Error::Protocol(why));
        }
        Ok(ok)
    }
}

/// One line out on a fresh plain connection, one reply line back (`None` if closed first).
fn exchange(path: &Path, line: &[u8]) -> std::io::Result<Option<String>> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(REPLY))?;
    stream.set_write_timeout(Some(REPLY))?;
    stream.write_all(line)?;
    read_reply(&mut BufReader::new(stream))
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut reply = String::new();
    match reader.read_line(&mut reply) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(reply.trim_end().to_string())),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether a plain connection was closed by the daemon (EOF or reset, no further line).
fn closed(reader: &mut impl BufRead) -> bool {
    matches!(read_reply(reader), Ok(None))
}

/// `send` as a typed command, if it reads as one.
fn typed_command(send: &Value) -> Option<Command> {
    serde_json::from_value(send.clone()).ok()
}

/// Every key given in `want` is in `got` with a matching value.
fn matches(want: &Value, got: &Value) -> bool {
    match want {
        Value::Object(want) => {
            got.as_object().is_some_and(|got| want.iter().all(|(k, v)| got.get(k).is_some_and(|g| matches(v, g))))
        }
        _ => want == got,
    }
}

fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code).unwrap().as_str().unwrap().to_string()
}

/// What a reply says, as the list's `expect` speaks of it.
enum Outcome {
    Ok(Value),
    Error(ErrorCode, String),
}

impl Outcome {
    fn of(result: Result<Value, Error>) -> Result<Outcome, Failed> {
        match result {
            Ok(ok) => Ok(Outcome::Ok(ok)),
            Err(Error::Daemon { code, message, .. }) => Ok(Outcome::Error(code, message)),
            Err(e) => Err(e.into()),
        }
    }

    /// A raw reply line: the id is checked by the caller.
    fn of_line(line: &str) -> Result<Outcome, Failed> {
        let reply: Value = serde_json::from_str(line).map_err(|e| Failed(format!("{line:?}: {e}")))?;
        if let Some(error) = reply.get("error") {
            let body: ErrorBody =
                serde_json::from_value(error.clone()).map_err(|e| Failed(format!("error body {error}: {e}")))?;
            return Ok(Outcome::Error(body.code, body.message));
        }
        reply.get("ok").cloned().map(Outcome::Ok).ok_or_else(|| Failed(format!("neither ok nor error: {line}")))
    }
}

/// Checks `outcome` against the case's `expect`; holds an `ok` to the command's type.
fn judge(run: &mut Run, case: &Value, command: Option<&Command>, outcome: &Outcome) -> Result<(), Failed> {
    let want = &case["expect"];
    if let (Outcome::Ok(ok), Some(command)) = (outcome, command) {
        run.hold(command, ok)?;
    }
    if let Some(code) = want.get("error") {
        let Outcome::Error(got, message) = outcome else {
            return Err(Failed(format!("wanted error {code}, got ok")));
        };
        expect(code.as_str() == Some(&code_name(*got)), || format!("wanted error {code}, got {got:?}: {message}"))?;
        return expect(!message.is_empty(), || "an error has a message".into());
    }
    let Outcome::Ok(ok) = outcome else {
        let Outcome::Error(code, message) = outcome else { unreachable!() };
        return Err(Failed(format!("wanted ok, got {}: {message}", code_name(*code))));
    };
    if let Some(reason) = want.get("reason") {
        let result: CheckResult =
            serde_json::from_value(ok.clone()).map_err(|e| Failed(format!("not a check result: {ok} ({e})")))?;
        let got = (json!(result.reason), result.allowed);
        expect(got == (reason.clone(), want["allowed"] == true), || format!("wanted {want}, got {ok}"))
    } else if let Some(count) = want.get("ok_count") {
        let got = ok.as_array().map(Vec::len);
        expect(got.map(|n| n as u64) == count.as_u64(), || format!("wanted {count} items, got {ok}"))
    } else {
        expect(matches(&want["ok"], ok), || format!("wanted ok matching {}, got {ok}", want["ok"]))
    }
}

fn run_case<A: Api>(run: &mut Run, api: &mut A, case: &Value) -> Result<Option<String>, Failed> {
    let send = case.get("send");
    let command = send.and_then(typed_command);
    let want_null_id = case.get("raw").is_some() || case["expect"].get("id") == Some(&Value::Null);
    if case["as"] == "nobody" {
        let command = command.ok_or_else(|| Failed("an `as` case must read as a command".into()))?;
        let outcome = as_nobody::<A>(&run.socket, &command)?;
        return judge(run, case, Some(&command), &outcome).map(|()| Some("through the client as uid 65534".into()));
    }
    // The client chooses its own ids; a case that names one, a raw line or a send that is
    // not a command goes over a plain socket.
    let plain = case.get("raw").is_some() || case.get("raw_id").is_some() || case.get("id").is_some();
    let Some(command) = command.filter(|_| !plain && !want_null_id) else {
        let (line, id) = plain_line(case)?;
        let reply = exchange(&run.socket, line.as_bytes())?
            .ok_or_else(|| Failed("the daemon closed the connection without a reply".into()))?;
        let ids: HashMap<String, Box<RawValue>> =
            serde_json::from_str(&reply).map_err(|e| Failed(format!("{reply:?}: {e}")))?;
        let echoed = ids.get("id").map(|id| id.get()).unwrap_or("null");
        let wanted = if want_null_id { "null" } else { id.as_str() };
        expect(echoed == wanted, || format!("id {wanted} came back as {echoed}"))?;
        let command = send.and_then(typed_command);
        return judge(run, case, command.as_ref(), &Outcome::of_line(&reply)?).map(|()| None);
    };
    let outcome = Outcome::of(api.call_command(command.clone()))?;
    judge(run, case, Some(&command), &outcome)?;
    // A check once more through the typed convenience call (dry run: nothing recorded).
    if let Command::Check(check) = command {
        let again = api.call(Check { dry_run: true, ..check.clone() })?;
        expect(json!(again.reason) == case["expect"]["reason"], || format!("typed call: {again:?}"))?;
        if check.method.is_none() {
            let result = api.check(&check.account, check.addr, Method::Password)?;
            expect(result.allowed == again.allowed, || format!("client.check: {result:?}"))?;
        }
    }
    Ok(None)
}

/// A case's line for a plain socket, and the id text the reply must carry.
fn plain_line(case: &Value) -> Result<(String, String), Failed> {
    if let Some(raw) = case["raw"].as_str() {
        return Ok((format!("{raw}\n"), "null".into()));
    }
    let mut send = case["send"].clone();
    let body = send.as_object_mut().ok_or_else(|| Failed("`send` is not an object".into()))?;
    if let Some(raw_id) = case["raw_id"].as_str() {
        // Written verbatim, so that the daemon sees the digits and not a float's rounding.
        let rest = serde_json::to_string(body).unwrap();
        return Ok((format!("{{\"id\":{raw_id},{}\n", &rest[1..]), raw_id.into()));
    }
    let id = case.get("id").cloned().unwrap_or(json!("plain"));
    body.insert("id".into(), id.clone());
    Ok((format!("{}\n", Value::Object(body.clone())), id.to_string()))
}

/// The command sent by the client from a child process with uid and gid 65534 (SO_PEERCRED
/// names the process that connected), which the daemon gives only the check role.
fn as_nobody<A: Api>(socket: &Path, command: &Command) -> Result<Outcome, Failed> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a two-element array.
    expect(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, || "pipe".into())?;
    // SAFETY: the runner is single-threaded here (the only other thread, the window step's
    // writer, has ended), so the child may run ordinary code before it exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: the child drops to uid/gid 65534 with no supplementary groups, sends, writes
        // the outcome to the pipe and exits without running the parent's destructors.
        unsafe {
            libc::close(fds[0]);
            let ok = libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(NOBODY, NOBODY, NOBODY) == 0
                && libc::setresuid(NOBODY, NOBODY, NOBODY) == 0;
            let outcome = if ok {
                match A::open(socket).call_command(command.clone()) {
                    Ok(ok) => json!({"ok": ok}),
                    Err(Error::Daemon { code, message, details }) => {
                        json!({"error": ErrorBody { code, message, details }})
                    }
                    Err(e) => json!({"failed": e.to_string()}),
                }
            } else {
                json!({"failed": "could not become uid 65534"})
            };
            let text = outcome.to_string();
            libc::write(fds[1], text.as_ptr().cast(), text.len());
            libc::_exit(0);
        }
    }
    // SAFETY: the write end belongs to the child now; the read end is ours to own.
    let mut from_child = unsafe {
        libc::close(fds[1]);
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0])
    };
    let mut text = String::new();
    from_child.read_to_string(&mut text)?;
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    expect(status == 0, || format!("the child running as uid {NOBODY} failed ({status})"))?;
    let reply: Value = serde_json::from_str(&text).map_err(|e| Failed(format!("child said {text:?}: {e}")))?;
    if let Some(why) = reply.get("failed") {
        return Err(Failed(format!("as uid {NOBODY}: {why}")));
    }
    Outcome::of_line(&text)
}

fn step_blank_line(run: &mut Run) -> Result<Option<String>, Failed> {
    let mut stream = UnixStream::connect(&run.socket)?;
    stream.set_read_timeout(Some(REPLY))?;
    stream.write_all(b"\n   \n{\"id\":\"after-blank\",\"cmd\":\"status\"}\n")?;
    let reply = read_reply(&mut BufReader::new(stream))?.unwrap_or_default();
    let reply: Value = serde_json::from_str(&reply).map_err(|e| Failed(format!("{reply:?}: {e}")))?;
    expect(reply["id"] == "after-blank", || format!("the first reply after blank lines was {reply}"))?;
    run.hold(&Status {}.into(), &reply["ok"])?;
    Ok(None)
}

fn step_pipeline(api: &mut impl Api, case: &Value) -> Result<Option<String>, Failed> {
    let accounts = [
        ("c-acme", "198.18.0.7", "allowed"),
        ("c-acme", "198.18.9.9", "address_not_allowed"),
        ("c-ban", "198.18.0.7", "banned"),
    ];
    let count = case["count"].as_u64().unwrap_or(3000) as usize;
    let (requests, reasons): (Vec<_>, Vec<_>) = (0..count)
        .map(|i| {
            let (account, addr, reason) = accounts[i % accounts.len()];
            (Check { account: account.into(), addr: addr.parse().unwrap(), method: None, dry_run: true }, reason)
        })
        .unzip();
    api.set_timeout(Duration::from_secs(60));
    let start = Instant::now();
    let replies = api.pipeline(requests);
    api.set_timeout(REPLY);
    let took = start.elapsed();
    let replies = replies?;
    expect(replies.len() == count, || format!("{} replies to {count} requests", replies.len()))?;
    for (i, (reply, reason)) in replies.into_iter().zip(reasons).enumerate() {
        let reply = reply?;
        expect(json!(reply.reason) == reason, || format!("reply {i}: {reply:?}, wanted {reason}"))?;
    }
    Ok(Some(format!("{count} in {:.2}s", took.as_secs_f64())))
}

/// Writes without reading until the daemon stops reading; then reads everything back.
fn step_window(run: &mut Run) -> Result<Option<String>, Failed> {
    let line: &[u8] = b"{\"cmd\":\"check\",\"account\":\"c-acme\",\"addr\":\"198.18.0.7\",\"dry_run\":true}\n";
    let data = line.repeat(16);
    let mut stream = UnixStream::connect(&run.socket)?;
    stream.set_nonblocking(true)?;
    let (mut sent, mut stalls, start) = (0usize, 0, Instant::now());
    while stalls < 5 && start.elapsed() < Duration::from_secs(20) && sent < 50_000 * line.len() {
        match stream.write(&data[sent % line.len()..]) {
            Ok(n) => {
                sent += n;
                stalls = 0;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                stalls += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.into()),
        }
    }
    expect(stalls >= 5, || format!("the daemon kept reading {sent} bytes of requests without replies being read"))?;
    let (whole, rest) = (sent / line.len(), sent % line.len());
    let total = whole + usize::from(rest > 0);
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(REPLY))?;
    let writer = (rest > 0).then(|| {
        let mut stream = stream.try_clone().unwrap();
        let tail = line[rest..].to_vec();
        std::thread::spawn(move || stream.write_all(&tail))
    });
    let mut reader = BufReader::new(stream);
    for i in 0..total {
        let reply = read_reply(&mut reader)?.ok_or_else(|| Failed(format!("closed after {i} of {total} replies")))?;
        expect(reply.contains("\"reason\":\"allowed\""), || format!("reply {i}: {reply}"))?;
    }
    if let Some(writer) = writer {
        writer.join().unwrap()?;
    }
    Ok(Some(format!("{total} requests ({sent} bytes) written before the daemon stopped reading")))
}

fn step_too_large(run: &mut Run, api: &mut impl Api, case: &Value) -> Result<Option<String>, Failed> {
    let bytes = case["bytes"].as_u64().unwrap_or(70_000) as usize;
    // Through the client: the error, typed, and the next call on a new connection.
    let check = Check { account: "x".repeat(bytes), addr: "198.18.0.7".parse().unwrap(), method: None, dry_run: true };
    let before = api.connects();
    match api.call(check) {
        Err(e @ Error::Daemon { code: ErrorCode::TooLarge, .. }) => {
            expect(e.closes_connection() && !e.is_retryable(), || format!("{e} is neither closing nor final"))?
        }
        other => return Err(Failed(format!("wanted too_large, got {other:?}"))),
    }
    let status = run.call(api, Status {}.into())?;
    expect(status.is_object() && api.connects() == before + 1, || "no new connection after too_large".into())?;
    // On a plain socket: id null, then closed.
    let stream = UnixStream::connect(&run.socket)?;
    stream.set_read_timeout(Some(REPLY))?;
    let line = format!("{{\"cmd\":\"check\",\"account\":\"{}\"}}\n", "x".repeat(bytes));
    let mut writer = stream.try_clone()?;
    let write = std::thread::spawn(move || writer.write_all(line.as_bytes()));
    let mut reader = BufReader::new(stream);
    let reply = read_reply(&mut reader)?.ok_or_else(|| Failed("no reply to an over-long line".into()))?;
    expect(reply.starts_with("{\"id\":null,\"error\":{\"code\":\"too_large\""), || format!("got {reply}"))?;
    expect(closed(&mut reader), || "the connection stays open after too_large".into())?;
    let _ = write.join();
    Ok(None)
}

/// Clients that each hold a connection, until the daemon answers one with `busy`.
fn step_busy<A: Api>(run: &mut Run, case: &Value) -> Result<Option<String>, Failed> {
    let mut held = Vec::new();
    for n in 1..300 {
        let mut client = A::open(&run.socket);
        match client.call(Status {}) {
            Ok(_) => held.push(client),
            Err(e @ Error::Daemon { code: ErrorCode::Busy, .. }) => {
                let Error::Daemon { details, .. } = &e else { unreachable!() };
                let limit = details.as_ref().map(|d| d["limit"].clone());
                expect(limit.as_ref() == Some(&case["limit"]), || format!("busy names {limit:?}"))?;
                expect(e.closes_connection() && e.is_retryable(), || format!("{e}: closes and may be retried"))?;
                // The client dropped it; the next call tries a new connection (busy again).
                let again = client.call(Status {});
                expect(matches!(again, Err(Error::Daemon { code: ErrorCode::Busy, .. })), || format!("{again:?}"))?;
                expect(client.connects() == 2, || format!("{} connections for two calls", client.connects()))?;
                return Ok(Some(format!("busy at connection {n} of this uid")));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Failed("no connection was refused".into()))
}

/// The daemon closes an idle connection; the client's next requests reconnect.
fn step_idle(run: &mut Run, api: &mut impl Api, case: &Value) -> Result<Option<String>, Failed> {
    let idle = Duration::from_secs(case["idle_seconds"].as_u64().unwrap_or(2) + 1);
    let addr: IpAddr = "198.18.0.7".parse().unwrap();
    expect(api.check("c-acme", addr, Method::Password)?.allowed, || "before the idle timeout".into())?;
    let before = api.connects();
    std::thread::sleep(idle);
    // Read-only, then mutating: either way the write fails before anything was delivered,
    // so sending again on a new connection is safe.
    expect(api.check("c-acme", addr, Method::Password)?.allowed, || "after the idle timeout".into())?;
    expect(api.connects() == before + 1, || format!("{} reconnects for the check", api.connects() - before))?;
    let ban =
        SetAccountState { account: "c-ban".into(), state: ipaccess::protocol::AccountState::Banned, reason: None };
    let ban = SetAccountState { reason: Some("abuse".into()), ..ban };
    run.call(api, ban.clone().into())?;
    std::thread::sleep(idle);
    let account = api.call(ban)?;
    expect(account.state == ipaccess::protocol::AccountState::Banned && api.connects() == before + 2, || {
        format!("a mutating request after the timeout: {account:?}, {} connections", api.connects() - before)
    })?;
    Ok(None)
}

fn step_restart(run: &mut Run, api: &mut impl Api) -> Result<Option<String>, Failed> {
    let addr: IpAddr = "198.18.0.7".parse().unwrap();
    expect(api.check("c-acme", addr, Method::Password)?.allowed, || "before the restart".into())?;
    let before = api.connects();
    println!("@restart kill");
    let mut said = String::new();
    std::io::stdin().read_line(&mut said)?;
    expect(said.trim() == "killed", || "the daemon was not killed".into())?;
    expect(run.socket.exists(), || "the killed daemon's socket file is left behind".into())?;
    // Fail closed: with a short deadline, a check while the daemon is away is an error.
    api.set_timeout(Duration::from_millis(300));
    let start = Instant::now();
    let away = api.check("c-acme", addr, Method::Password);
    expect(matches!(&away, Err(e) if e.is_retryable()), || format!("with no daemon: {away:?}"))?;
    expect(start.elapsed() < Duration::from_secs(2), || "the deadline was not kept".into())?;
    println!("@restart start");
    api.set_timeout(Duration::from_secs(30));
    let result = api.check("c-acme", addr, Method::Password);
    api.set_timeout(REPLY);
    let result = result?;
    expect(result.allowed, || format!("after the restart: {result:?}"))?;
    expect(api.connects() > before, || "the client did not reconnect".into())?;
    // A mutating request on the new connection; state from before the restart is there.
    let again =
        AllowAdd { account: "c-acme".into(), cidr: "198.18.0.0/24".parse().unwrap(), label: None, ttl_seconds: None };
    match run.call(api, again.into()) {
        Err(Error::Daemon { code: ErrorCode::EntryExists, .. }) => {}
        other => return Err(Failed(format!("the entry added before the restart: {other:?}"))),
    }
    Ok(Some(format!("reconnected after {:.2}s", start.elapsed().as_secs_f64())))
}

fn run_list<A: Api>(socket: PathBuf, cases: &[Value], skip: &[String]) -> bool {
    let mut api = A::open(&socket);
    let mut run = Run { socket, typed: 0 };
    let (mut passed, mut failed) = (0, 0);
    for case in cases {
        let step = case["step"].as_str();
        if step.is_some_and(|s| skip.iter().any(|k| k == s)) {
            continue;
        }
        let result = match step {
            None => run_case(&mut run, &mut api, case),
            Some("blank_line") => step_blank_line(&mut run),
            Some("pipeline") => step_pipeline(&mut api, case),
            Some("window") => step_window(&mut run),
            Some("too_large") => step_too_large(&mut run, &mut api, case),
            Some("busy") => step_busy::<A>(&mut run, case),
            Some("idle") => step_idle(&mut run, &mut api, case),
            Some("restart") => step_restart(&mut run, &mut api),
            Some(other) => Err(Failed(format!("no step named {other}"))),
        };
        let name = case["name"].as_str().unwrap_or("?");
        match result {
            Ok(note) => {
                passed += 1;
                println!("pass {name}{}", note.map(|n| format!(": {n}")).unwrap_or_default());
            }
            Err(Failed(why)) => {
                failed += 1;
                println!("FAIL {name}: {why}");
            }
        }
    }
    println!("replies held to their command's type: {}", run.typed);
    println!("conformance: {passed} passed, {failed} failed");
    failed == 0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut socket, mut list, mut asynchronous, mut skip) = (None, None, false, Vec::new());
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" => socket = args.next().map(PathBuf::from),
            "--list" => list = args.next().map(PathBuf::from),
            "--async" => asynchronous = true,
            "--skip" => skip.extend(args.next()),
            _ => {
                eprintln!("usage: conformance-rust --socket PATH [--list FILE] [--async] [--skip STEP]...");
                std::process::exit(2);
            }
        }
    }
    let socket = socket.expect("--socket PATH");
    let list = list.unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance.jsonl"));
    let text = std::fs::read_to_string(&list).unwrap_or_else(|e| panic!("{}: {e}", list.display()));
    let cases: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let passed =
        if asynchronous { run_list::<Async>(socket, &cases, &skip) } else { run_list::<Client>(socket, &cases, &skip) };
    std::process::exit(if passed { 0 } else { 1 });
}
