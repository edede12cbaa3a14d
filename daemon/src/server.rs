//! The control socket: a Unix stream socket speaking newline-delimited JSON
//! (see `protocol`). Each connection's peer credentials (SO_PEERCRED, plus the peer's
//! supplementary groups) are read when it is accepted; its roles are looked up in the
//! configuration in force at each request, so a reload that takes a role away applies to
//! connections already open. Requests on one connection are answered in order, one at a
//! time; every bad request gets a structured error and the connection stays usable, except
//! after a line too long to frame, which closes it. A blank line gets no reply. A request's
//! id is echoed as the text the client wrote (see "Framing" in docs/protocol.md).
//!
//! No client can take the socket from the others (`[limits]`): one uid holds at most
//! `max_connections_per_uid` connections, the last `reserved_admin_connections` slots are
//! kept for root and admins, and a connection that sends no complete request (or does not
//! read its replies) for `idle_timeout_seconds` is closed. A connection over a limit is
//! told `busy` and closed at once.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream as StdUnixStream,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use log::{debug, warn};
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{MapAccess, SeqAccess, Visitor, value::MapDeserializer},
};
use serde_json::{Value, json, value::RawValue};
use tokio::{net::UnixListener, sync::watch};

use crate::{
    config::{Config, Limits},
    protocol::{Caller, Command, ErrorBody, ErrorCode, ImportAccount, Role},
    service::{Failure, Service},
};

/// A reply on the wire: `protocol::Reply` with the id as the client wrote it (its raw JSON
/// text, borrowed from the request line), so that any id comes back exactly: an integer
/// beyond 64 bits is not rounded through a float, `1.10` stays `1.10`.
#[derive(Debug, Serialize)]
struct Reply<'a> {
    id: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    ok: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

/// The id of a reply to a line that was not read as a request.
const NO_ID: &RawValue = RawValue::NULL;

/// A connection's read buffer: the most pipelined requests answered before their replies go out.
const READ_BUFFER: usize = 16 * 1024;
/// Replies held back while more requests are buffered, at most (in bytes).
const WRITE_BATCH: usize = 64 * 1024;

/// How long a refused connection may take to receive its `busy` line.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Accepts connections until `shutdown` completes, then closes the open ones for reading
/// and waits (a bounded time) for the requests they are answering. The number of
/// connections stays the one configured at start; the other limits and the roles follow
/// reloads.
///
/// Each connection is served by a thread of its own, blocking on its socket, as the
/// transport's own baseline does: a login check then costs one read and one write, with no
/// event loop between the socket and the answer (the cost that mattered, measured in
/// BENCHMARKS.md). Connections are bounded by `max_connections`.
pub async fn serve(
    listener: UnixListener,
    service: Arc<Service>,
    config: watch::Receiver<Arc<Config>>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Slots { max: config.borrow().limits.max_connections, held: Mutex::default() });
    let open = Arc::new(Open::default());
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted.and_then(|(stream, _)| stream.into_std()) {
                Ok(stream) => stream,
                Err(e) => {
                    warn!("accepting a control connection: {e}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (service, config, slots, open) = (service.clone(), config.clone(), slots.clone(), open.clone());
        let spawned = std::thread::Builder::new().name("ipaccess-conn".into()).spawn(move || {
            let Some(_registered) = open.register(&stream) else { return };
            if let Err(e) = connection(stream, &service, config, &slots) {
                debug!("control connection ended: {e}");
            }
        });
        if let Err(e) = spawned {
            warn!("no thread for a control connection: {e}");
        }
    }
    let waited = tokio::task::spawn_blocking(move || open.close_all(SHUTDOWN_GRACE)).await;
    if !waited.unwrap_or(false) {
        warn!("control connections still busy after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
}

/// How long a stop waits for the requests being answered.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The open connections, so that a stop can close them (for reading: a request being
/// answered still gets its reply).
#[derive(Default)]
struct Open {
    streams: Mutex<OpenStreams>,
    /// Signalled whenever a connection ends.
    ended: Condvar,
}

#[derive(Default)]
struct OpenStreams {
    next: u64,
    by_id: HashMap<u64, StdUnixStream>,
    closing: bool,
}

/// A connection's place in [`Open`], given back when it ends.
struct Registered<'a> {
    open: &'a Open,
    id: u64,
}

impl Open {
    /// Records a connection, or `None` once the daemon is stopping.
    fn register(&self, stream: &StdUnixStream) -> Option<Registered<'_>> {
        let copy = stream.try_clone().ok()?;
        let mut streams = self.streams.lock().expect("open lock");
        if streams.closing {
            return None;
        }
        streams.next += 1;
        let id = streams.next;
        streams.by_id.insert(id, copy);
        Some(Registered { open: self, id })
    }

    /// Stops every connection reading and waits until they have all ended, at most `grace`.
    fn close_all(&self, grace: Duration) -> bool {
        let mut streams = self.streams.lock().expect("open lock");
        streams.closing = true;
        for stream in streams.by_id.values() {
            let _ = stream.shutdown(std::net::Shutdown::Read);
        }
        let (streams, waited) =
            self.ended.wait_timeout_while(streams, grace, |s| !s.by_id.is_empty()).expect("open lock");
        !waited.timed_out() || streams.by_id.is_empty()
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.open.streams.lock().expect("open lock").by_id.remove(&self.id);
        self.open.ended.notify_all();
    }
}

/// The connection slots in use, in all and per uid.
struct Slots {
    max: usize,
    held: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

/// One connection's slot, given back when the connection ends.
struct Slot {
    slots: Arc<Slots>,
    uid: u32,
}

impl Slots {
    /// A slot for a connection from `uid`, or the `busy` error saying which limit it hit.
    /// Root and admins (`privileged`) may also take the reserved slots.
    fn take(self: &Arc<Self>, uid: u32, privileged: bool, limits: &Limits) -> Result<Slot, ErrorBody> {
        let shared = limits.shared_connections(self.max);
        let mut held = self.held.lock().expect("slots lock");
        let of_uid = held.by_uid.get(&uid).copied().unwrap_or(0);
        let (limit, max, message) = if of_uid >= limits.max_connections_per_uid {
            let message = format!("uid {uid} already holds {of_uid} control connections, the most one uid may");
            ("max_connections_per_uid", limits.max_connections_per_uid, message)
        } else if privileged && held.total >= self.max {
            ("max_connections", self.max, "every control connection is in use; try again shortly".to_string())
        } else if !privileged && held.total >= shared {
            let message = "every control connection open to callers without the admin role is in use; try again later";
            ("max_connections", shared, message.into())
        } else {
            held.total += 1;
            *held.by_uid.entry(uid).or_default() += 1;
            return Ok(Slot { slots: self.clone(), uid });
        };
        let details = json!({"limit": format!("limits.{limit}"), "max": max});
        Err(ErrorBody { code: ErrorCode::Busy, message, details: Some(details) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().expect("slots lock");
        held.total -= 1;
        if let Some(n) = held.by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                held.by_uid.remove(&self.uid);
            }
        }
    }
}

/// Tells a connection over a limit why, and closes it.
fn refuse(mut stream: &StdUnixStream, body: ErrorBody) {
    let reply = Reply { id: NO_ID, ok: None, error: Some(body) };
    let _ = stream.set_write_timeout(Some(REFUSAL_WRITE));
    let _ = stream.write_all(&line(&reply));
}

/// A socket whose reads fail with `TimedOut` once a line has taken longer than the idle
/// timeout, so that a byte now and then does not keep a connection's slot. The socket's own
/// timeout (`SO_RCVTIMEO`, the idle timeout) bounds each blocked read; the line's deadline is
/// set at its second read, so a line that arrives whole (nearly all do) costs no clock read,
/// and a line takes at most twice the idle timeout.
struct Timed<'a> {
    stream: &'a StdUnixStream,
    idle: Duration,
    /// Of the line being read, once it took more than one read.
    deadline: Option<Instant>,
    reads: u32,
}

impl Timed<'_> {
    /// A new line begins.
    fn start_line(&mut self, idle: Duration) {
        (self.idle, self.deadline, self.reads) = (idle, None, 0);
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        match self.deadline {
            Some(deadline) if Instant::now() > deadline => return Err(io::ErrorKind::TimedOut.into()),
            None if self.reads > 1 => self.deadline = Some(Instant::now() + self.idle),
            _ => {}
        }
        self.stream.read(buf)
    }
}

/// Whether an I/O error is a timeout (the socket's own reports one as `WouldBlock`).
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// Writes `bytes` within about the idle timeout: `SO_SNDTIMEO` bounds each blocked write,
/// and a client that reads a little now and then gets until `idle` after the first partial
/// write (a reply that goes out in one write, nearly all, costs no clock read).
fn write_within(mut stream: &StdUnixStream, bytes: &[u8], idle: Duration) -> io::Result<()> {
    let mut rest = bytes;
    let mut deadline = None;
    while !rest.is_empty() {
        match deadline {
            Some(deadline) if Instant::now() > deadline => return Err(io::ErrorKind::TimedOut.into()),
            Some(_) => {}
            None if rest.len() < bytes.len() => deadline = Some(Instant::now() + idle),
            None => {}
        }
        match stream.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn connection(
    stream: StdUnixStream,
    service: &Service,
    mut config: watch::Receiver<Arc<Config>>,
    slots: &Arc<Slots>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let cred = rustix::net::sockopt::socket_peercred(&stream)?;
    let uid = cred.uid.as_raw();
    let mut gids = peer_groups(&stream).unwrap_or_else(|e| {
        // Without them only the uid and the primary group can give roles: fewer, not more.
        warn!("the supplementary groups of a control connection from uid {uid} are unknown: {e}");
        Vec::new()
    });
    gids.push(cred.gid.as_raw());
    let admitted = {
        let config = config.borrow().clone();
        let roles = config.roles.of(uid, &gids);
        if roles.is_empty() {
            // Every request it could send would be refused; served, it would hold one of the
            // slots the applications' login checks need (a few such users could take them
            // all). A role given later by a reload applies from its next connection.
            debug!("refusing a control connection from uid {uid}: no role");
            let message = format!("uid {uid} has no role on this daemon (the configuration's [roles] gives it none)");
            refuse(&stream, ErrorBody { code: ErrorCode::Forbidden, message, details: None });
            return Ok(());
        }
        slots.take(uid, roles.contains(&Role::Admin), &config.limits)
    };
    let _slot = match admitted {
        Ok(slot) => slot,
        Err(busy) => {
            debug!("refusing a control connection from uid {uid}: {}", busy.message);
            refuse(&stream, busy);
            return Ok(());
        }
    };
    let timed = Timed { stream: &stream, idle: Duration::ZERO, deadline: None, reads: 0 };
    let mut reader = BufReader::with_capacity(READ_BUFFER, timed);
    let mut buf = Vec::new();
    // Replies not written yet: those to the requests already in `reader`'s buffer go out
    // together, in one write (pipelined checks cost a syscall each otherwise).
    let mut out = Vec::with_capacity(1024);
    let mut caller = Caller { uid, roles: config.borrow_and_update().roles.of(uid, &gids) };
    let mut idle = Duration::ZERO;
    loop {
        // The configuration in force now: a reload between two requests applies to the next.
        // Roles are worked out again only when it changed.
        if config.has_changed().unwrap_or(false) {
            caller.roles = config.borrow_and_update().roles.of(uid, &gids);
        }
        let max = {
            let in_force = config.borrow();
            let now_idle = Duration::from_secs(in_force.limits.idle_timeout_seconds.max(1));
            if now_idle != idle {
                idle = now_idle;
                stream.set_read_timeout(Some(idle))?;
                stream.set_write_timeout(Some(idle))?;
            }
            if caller.roles.contains(&Role::Admin) {
                in_force.limits.max_admin_request_bytes.max(in_force.limits.max_request_bytes)
            } else {
                in_force.limits.max_request_bytes
            }
        };
        // Never wait for the client while it waits for a reply: unless another whole request
        // is buffered already, whatever is answered goes out before reading on.
        if !out.is_empty() && (out.len() >= WRITE_BATCH || !reader.buffer().contains(&b'\n')) {
            match write_within(&stream, &out, idle) {
                Err(e) if timed_out(&e) => {
                    debug!("closing a control connection of uid {uid}: its replies were not read for {idle:?}");
                    return Ok(());
                }
                result => result?,
            }
            out.clear();
        }
        buf.clear();
        // The whole line must arrive in time, so a byte now and then does not keep a slot.
        reader.get_mut().start_line(idle);
        let n = match (&mut reader).take(max as u64 + 1).read_until(b'\n', &mut buf) {
            Err(e) if timed_out(&e) => {
                debug!("closing a control connection of uid {uid}: no request for {idle:?}");
                return Ok(());
            }
            read => read?,
        };
        if n == 0 {
            return write_within(&stream, &out, idle);
        }
        let reply = if buf.last() != Some(&b'\n') && buf.len() > max {
            let message = format!("request longer than {max} bytes; closing the connection");
            error_reply(NO_ID, ErrorCode::TooLarge, &message)
        } else {
            let text = json_trimmed(&buf);
            if blank(&buf) {
                continue;
            }
            // A reload while the line was on its way applies to it.
            if config.has_changed().unwrap_or(false) {
                caller.roles = config.borrow_and_update().roles.of(uid, &gids);
            }
            answer(text, &caller, service)
        };
        serde_json::to_writer(&mut out, &reply).expect("replies serialize");
        out.push(b'\n');
        if reply.error.as_ref().is_some_and(|e| e.code == ErrorCode::TooLarge) {
            let _ = write_within(&stream, &out, idle);
            return Ok(());
        }
    }
}

/// Whether a line (its `\n`, and a `\r` before it, apart) is empty or only spaces and tabs:
/// such a line gets no reply (docs/protocol.md, "Lines"). Any other line gets one, an error
/// if need be, so that a client pairing replies with requests never goes out of step.
fn blank(line: &[u8]) -> bool {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.iter().all(|&b| b == b' ' || b == b'\t')
}

/// `line` without JSON's white space (space, tab, CR, LF) around it; other bytes, such as a
/// form feed, stay and make the line an error.
fn json_trimmed(line: &[u8]) -> &[u8] {
    let json_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = line.iter().position(|b| !json_space(b)).unwrap_or(line.len());
    let end = line.iter().rposition(|b| !json_space(b)).map_or(start, |at| at + 1);
    &line[start..end]
}

/// One request line to one reply.
fn answer<'a>(text: &'a [u8], caller: &Caller, service: &Service) -> Reply<'a> {
    let (id, command) = match parse(text) {
        Ok(parsed) => parsed,
        Err(reply) => return *reply,
    };
    if !command.permits(&caller.roles) {
        let uid = caller.uid;
        let message = match command.role() {
            Some(needed) => format!("uid {uid} may not run this command (it needs the {needed} role)"),
            None => format!("uid {uid} has no role"),
        };
        return error_reply(id, ErrorCode::Forbidden, &message);
    }
    match service.execute(command, caller) {
        Ok(ok) => Reply { id, ok: Some(ok), error: None },
        Err(Failure(body)) => Reply { id, ok: None, error: Some(body) },
    }
}

/// A request line to its id and command, reading the text once. Stricter than the derived
/// parser alone: `cmd` must be a string (serde would take a variant's index, `"cmd": 5`, as
/// a command) and no field may appear twice.
fn parse(text: &[u8]) -> Result<(&RawValue, Command), Box<Reply<'_>>> {
    if let Some(direct) = check(text).or_else(|| import(text)) {
        return Ok(direct);
    }
    let Envelope { id, fields, repeated } = match serde_json::from_slice::<Envelope>(text) {
        Ok(envelope) => envelope,
        Err(e) if e.is_data() => {
            return Err(Box::new(error_reply(NO_ID, ErrorCode::BadJson, "a request is one JSON object per line")));
        }
        Err(e) => return Err(Box::new(error_reply(NO_ID, ErrorCode::BadJson, &format!("not JSON: {e}")))),
    };
    let refused = |why: String| Err(Box::new(error_reply(id, ErrorCode::BadRequest, &format!("bad request: {why}"))));
    if let Some(key) = repeated {
        return refused(format!("field `{key}` appears more than once"));
    }
    // Within the fields too (an import's account, a replacement's entry): the values below
    // keep only the last of a repeated key, so the request would say two things and mean
    // the second. Read again only here: checks and imports read whole take the quick paths.
    if let Ok(Repeated(Some(key))) = serde_json::from_slice::<Repeated>(text) {
        return refused(format!("`{key}` appears more than once in one object"));
    }
    match fields.iter().find(|(key, _)| key == "cmd") {
        None | Some((_, Value::String(_))) => {}
        Some((_, other)) => {
            return refused(format!("`cmd` must be a command name, a string, not {}", json_type(other)));
        }
    }
    match Command::deserialize(MapDeserializer::<_, serde_json::Error>::new(fields.into_iter())) {
        Ok(command) => Ok((id, command)),
        Err(e) => refused(e.to_string()),
    }
}

/// A login check read straight from its line: checks are nearly all the traffic, and the
/// general path first builds a JSON value of every field. Anything unusual (a field unknown
/// or given twice, another command, `cmd` not a string) is not a check here and goes the
/// general path, which words the error.
fn check(text: &[u8]) -> Option<(&RawValue, Command)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CheckLine<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        cmd: Cow<'a, str>,
        account: String,
        #[serde(deserialize_with = "crate::protocol::address")]
        addr: std::net::IpAddr,
        #[serde(default)]
        method: Option<crate::protocol::Method>,
        #[serde(default)]
        dry_run: bool,
    }
    let line: CheckLine = serde_json::from_slice(text).ok()?;
    if line.cmd != "check" {
        return None;
    }
    let CheckLine { id, account, addr, method, dry_run, .. } = line;
    Some((id.unwrap_or(NO_ID), Command::Check(crate::protocol::Check { account, addr, method, dry_run })))
}

/// An import read straight from its line: its accounts are most of a bulk load's bytes, and
/// the general path would build a JSON value of each and then copy it into its type. As
/// for checks, anything unusual goes the general path, which words the error.
fn import(text: &[u8]) -> Option<(&RawValue, Command)> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ImportLine<'a> {
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(borrow)]
        cmd: Cow<'a, str>,
        accounts: Vec<ImportAccount>,
        #[serde(default)]
        force: bool,
    }
    let line: ImportLine = serde_json::from_slice(text).ok()?;
    if line.cmd != "import" {
        return None;
    }
    let import = crate::protocol::Import { accounts: line.accounts, force: line.force };
    Some((line.id.unwrap_or(NO_ID), Command::Import(import)))
}

/// A request object split into its id (its text, as written) and the command's fields (keys
/// borrowed from the line where they can be; a request has a handful, so a list is quicker
/// than a map).
struct Envelope<'a> {
    id: &'a RawValue,
    fields: Vec<(Cow<'a, str>, Value)>,
    /// The first key that appeared twice.
    repeated: Option<String>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Envelope<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope<'de>, A::Error> {
                let mut envelope = Envelope { id: NO_ID, fields: Vec::new(), repeated: None };
                let mut has_id = false;
                while let Some(Key(key)) = map.next_key()? {
                    let again = if key == "id" {
                        envelope.id = map.next_value()?;
                        std::mem::replace(&mut has_id, true)
                    } else {
                        let again = envelope.fields.iter().any(|(k, _)| *k == key);
                        envelope.fields.push((key.clone(), map.next_value()?));
                        again
                    };
                    if again && envelope.repeated.is_none() {
                        envelope.repeated = Some(key.into_owned());
                    }
                }
                Ok(envelope)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// The first key some object of a JSON text, at any depth, names twice.
struct Repeated(Option<String>);

impl<'de> Deserialize<'de> for Repeated {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Scan;
        impl<'de> Visitor<'de> for Scan {
            type Value = Repeated;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Repeated, A::Error> {
                let mut keys = std::collections::HashSet::new();
                let mut found = None;
                while let Some(Key(key)) = map.next_key()? {
                    let Repeated(inner) = map.next_value()?;
                    if found.is_some() {
                        // Found already; the rest is still read through.
                    } else if keys.contains(&key) {
                        found = Some(key.into_owned());
                    } else {
                        found = inner;
                        keys.insert(key);
                    }
                }
                Ok(Repeated(found))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Repeated, A::Error> {
                let mut found = None;
                while let Some(Repeated(inner)) = seq.next_element()? {
                    found = found.or(inner);
                }
                Ok(Repeated(found))
            }

            fn visit_bool<E>(self, _: bool) -> Result<Repeated, E> {
                Ok(Repeated(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<Repeated, E> {
                Ok(Repeated(None))
            }

            fn visit_u64<E>(self, _: u64) -> Result<Repeated, E> {
                Ok(Repeated(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Repeated, E> {
                Ok(Repeated(None))
            }

            fn visit_str<E>(self, _: &str) -> Result<Repeated, E> {
                Ok(Repeated(None))
            }

            fn visit_unit<E>(self) -> Result<Repeated, E> {
                Ok(Repeated(None))
            }
        }
        deserializer.deserialize_any(Scan)
    }
}

/// A key, borrowed from the request line unless it holds escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(Text)
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn error_reply<'a>(id: &'a RawValue, code: ErrorCode, message: &str) -> Reply<'a> {
    Reply { id, ok: None, error: Some(ErrorBody { code, message: message.into(), details: None }) }
}

fn line(reply: &Reply) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(reply).expect("replies serialize");
    bytes.push(b'\n');
    bytes
}

/// The peer's supplementary groups as they were when it connected (`SO_PEERGROUPS`; the
/// primary one comes with `SO_PEERCRED`). Not read from /proc by the peer's pid: by the time
/// the connection is served that process may be gone and its pid another user's.
fn peer_groups(stream: &StdUnixStream) -> io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    const GID: usize = size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `groups`, whose length it is.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let wanted = len as usize / GID;
        if rc == 0 {
            groups.truncate(wanted);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // Too small: the kernel says how many there are (at most NGROUPS_MAX, 65,536).
        if e.raw_os_error() != Some(libc::ERANGE) || wanted <= groups.len() {
            return Err(e);
        }
        groups.resize(wanted, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(line: &str) -> Reply<'_> {
        match parse(line.as_bytes()) {
            Ok((_, command)) => panic!("{line} was accepted as {command:?}"),
            Err(reply) => *reply,
        }
    }

    /// The quick path for checks reads what the general path reads, and leaves to it every
    /// line it would word an error for.
    #[test]
    fn a_check_reads_alike_on_both_paths() {
        for line in [
            r#"{"id": 1, "cmd": "check", "account": "acme", "addr": "198.18.0.9"}"#,
            r#"{"cmd": "check", "account": "a\u0063me", "addr": "fd00::1", "method": "sso", "dry_run": true}"#,
            r#"{"account": "acme", "addr": "198.18.0.9", "cmd": "check", "id": {"trace": [1, 2]}}"#,
            r#"{"id": null, "cmd": "check", "account": "acme", "addr": "::ffff:198.18.0.9"}"#,
        ] {
            let (quick_id, quick) = check(line.as_bytes()).expect(line);
            let Envelope { id, fields, .. } = serde_json::from_slice(line.as_bytes()).unwrap();
            let general = Command::deserialize(MapDeserializer::<_, serde_json::Error>::new(fields.into_iter()));
            assert_eq!((quick_id.get(), quick), (id.get(), general.unwrap()), "{line}");
        }
        for line in [
            r#"{"id": 1, "cmd": "check", "account": "acme", "addr": "198.18.0.9", "addr": "198.18.0.8"}"#,
            r#"{"id": 1, "cmd": "check", "account": "acme", "addr": "198.18.0.9", "extra": 1}"#,
            r#"{"id": 1, "cmd": "status"}"#,
            r#"{"id": 1, "cmd": 5, "account": "acme", "addr": "198.18.0.9"}"#,
            r#"{"id": 1, "cmd": "check", "account": "acme"}"#,
        ] {
            assert!(check(line.as_bytes()).is_none(), "{line} must go the general path");
        }
        let reply = refused(r#"{"id": 1, "cmd": "check", "account": "acme", "addr": "1.2.3.4", "addr": "1.2.3.5"}"#);
        assert!(reply.error.unwrap().message.contains("`addr` appears more than once"));
    }

    /// Blank is empty or spaces and tabs (and the line's own end); a form feed or a lone
    /// `\r` is not, and gets an error, as does a request with one after it.
    #[test]
    fn only_spaces_and_tabs_make_a_line_blank() {
        for line in ["\n", "", " \t \n", "\r\n", " \r\n"] {
            assert!(blank(line.as_bytes()), "{line:?}");
        }
        for line in ["\x0c\n", " \x0c \n", "\r\r\n", "\x0b\n", "{}\n"] {
            assert!(!blank(line.as_bytes()), "{line:?}");
        }
        assert_eq!(json_trimmed(b" \t{\"cmd\": \"status\"}\r\n"), br#"{"cmd": "status"}"#);
        assert_eq!(json_trimmed(b" \r\n"), b"");
        let text = json_trimmed(b"{\"id\": 4, \"cmd\": \"status\"}\x0c\n");
        assert!(parse(text).is_err(), "a form feed after a request is not JSON's white space");
    }

    #[test]
    fn a_command_is_named_by_a_string_only() {
        let (id, command) = parse(br#"{"id": 3, "cmd": "status"}"#).unwrap();
        assert_eq!((id.get(), command), ("3", Command::Status(crate::protocol::Status {})));
        for tag in ["5", "0", "5.0", "true", "null", "[5]", r#"{"status": {}}"#, r#""5""#, r#""Status""#] {
            let line = format!(r#"{{"id": 7, "cmd": {tag}, "account": "a", "cidr": "198.18.0.0/24"}}"#);
            let reply = refused(&line);
            let error = reply.error.unwrap();
            assert_eq!((reply.id.get(), error.code), ("7", ErrorCode::BadRequest), "{tag}: {}", error.message);
        }
        let reply = refused(r#"{"id": 1, "cmd": "status", "cmd": "status"}"#);
        assert!(reply.error.unwrap().message.contains("`cmd` appears more than once"));
        let reply = refused(r#"{"id": 1, "id": 2, "cmd": "status"}"#);
        assert!(reply.error.unwrap().message.contains("`id` appears more than once"));
        let (bad_json, bad_request) = (ErrorCode::BadJson, ErrorCode::BadRequest);
        for (line, code) in [("[1]", bad_json), ("{", bad_json), (r#"{"id": 4}"#, bad_request)] {
            assert_eq!(refused(line).error.unwrap().code, code, "{line}");
        }
    }

    /// A key given twice is refused at any depth, not read as its last value.
    #[test]
    fn a_key_twice_in_a_nested_object_is_refused() {
        for (line, key) in [
            (r#"{"cmd": "import", "accounts": [{"account": "a", "mode": "off", "mode": "enforce"}]}"#, "mode"),
            (r#"{"cmd": "import", "accounts": [{"account": "acme", "account": "other"}]}"#, "account"),
            (
                r#"{"cmd": "allow_replace", "account": "a", "entries": [{"cidr": "198.18.0.0/24", "cidr": "198.18.9.0/24"}]}"#,
                "cidr",
            ),
            (r#"{"cmd": "status", "id": {"a": 1, "b": [{"c": 1, "c": 2}]}}"#, "c"),
        ] {
            let message = refused(line).error.unwrap().message;
            assert!(message.contains(&format!("`{key}` appears more than once")), "{line}: {message}");
        }
        // Equal keys in different objects are no repetition.
        let line = r#"{"cmd": "import", "accounts": [{"account": "a", "entries": [{"cidr": "198.18.0.0/24"}]}, {"account": "b", "entries": [{"cidr": "198.18.1.0/24"}]}]}"#;
        assert!(parse(line.as_bytes()).is_ok());
        let line = r#"{"cmd": "allow_replace", "account": "a", "entries": [{"cidr": "198.18.0.0/24"}, {"cidr": "198.18.1.0/24", "label": "x"}]}"#;
        assert!(parse(line.as_bytes()).is_ok());
    }

    #[test]
    fn an_import_reads_as_the_general_parser_reads_it() {
        let line = r#"{"id": 9, "accounts": [{"account": "a", "mode": "enforce", "entries": [{"cidr": "198.18.0.0/24", "label": "x"}]}, {"account": "b", "parent": "a"}], "cmd": "import"}"#;
        let (_, fast) = parse(line.as_bytes()).unwrap();
        let Envelope { fields, .. } = serde_json::from_str::<Envelope>(line).unwrap();
        let general = Command::deserialize(MapDeserializer::<_, serde_json::Error>::new(fields.into_iter())).unwrap();
        assert_eq!(fast, general);
        // What the fast path does not take gets the general path's words.
        let odd = r#"{"id": 9, "cmd": "import", "accounts": [{"account": "a", "colour": "red"}]}"#;
        assert!(refused(odd).error.unwrap().message.contains("unknown field `colour`"));
        let extra = r#"{"id": 9, "cmd": "import", "accounts": [], "dry_run": true}"#;
        assert!(refused(extra).error.unwrap().message.contains("unknown field `dry_run`"));
        let forced = r#"{"id": 9, "cmd": "import", "accounts": [{"account": "a"}], "force": true}"#;
        let Command::Import(forced) = parse(forced.as_bytes()).unwrap().1 else { panic!("not an import") };
        assert!(forced.force);
        let twice = r#"{"id": 9, "cmd": "import", "accounts": [], "accounts": [{"account": "a"}]}"#;
        assert!(refused(twice).error.unwrap().message.contains("`accounts` appears more than once"));
        assert!(import(br#"{"cmd": "status"}"#).is_none() && import(br#"{"cmd": "check", "accounts": []}"#).is_none());
    }

    #[test]
    fn an_id_comes_back_as_written() {
        let ids = [
            "340282366920938463463374607431768211457",
            "-18446744073709551617",
            "1.10",
            "1e400",
            r#""\u00e9""#,
            r#"{"a": [1, 2.50]}"#,
            "null",
            "0",
        ];
        for written in ids {
            let request = format!(r#"{{"id":  {written} , "cmd": "status"}}"#);
            let (id, _) = parse(request.as_bytes()).unwrap();
            let ok = Reply { id, ok: Some(RawValue::from_string("{}".into()).unwrap()), error: None };
            assert_eq!(String::from_utf8(line(&ok)).unwrap(), format!("{{\"id\":{written},\"ok\":{{}}}}\n"));
            let unknown = format!(r#"{{"id": {written}, "cmd": "fly"}}"#);
            assert_eq!(refused(&unknown).id.get(), written);
        }
        let (id, _) = parse(br#"{"cmd": "status"}"#).unwrap();
        assert_eq!(id.get(), "null");
        assert_eq!(refused("not json").id.get(), "null");
    }

    /// What parsing a check line costs (`cargo test --release -p ipaccess --lib parse_cost -- --ignored
    /// --nocapture`): the id is kept as its raw text, which must not slow the check path.
    #[test]
    #[ignore]
    fn parse_cost() {
        let line = br#"{"id":123456,"cmd":"check","account":"acme-0042","addr":"198.18.0.7","method":"password"}"#;
        let rounds = 2_000_000;
        for _ in 0..3 {
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                std::hint::black_box(parse(std::hint::black_box(line)).is_ok());
            }
            eprintln!("parsing a check line: {:?}", start.elapsed() / rounds);
        }
    }
}
