//! One request over the control socket, and its reply read as the request's reply type.
//!
//! Kept small and private on purpose: everything the rest of ipaccessctl needs from the
//! socket goes through [`call`], so a shared client library can take its place here alone.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipaccess::protocol::{Call, Import, Request};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A successful reply: typed for a person, and the `ok` value exactly as it came for `--json`.
pub struct Typed<R> {
    pub reply: R,
    pub raw: Box<RawValue>,
}

#[derive(Debug)]
pub enum Failure {
    /// The daemon answered with an error.
    Daemon(DaemonError),
    /// No usable answer: no connection, a timeout, a line that is not a reply, a bad file.
    Local(String),
    /// The request was sent whole and no reply came (the connection closed, or the wait
    /// ran out): the daemon may have applied it.
    Unanswered(String),
    /// A success whose `ok` does not read as the command's reply type (an older or newer
    /// daemon): `raw` as it came, `error` why it does not read.
    Unreadable { raw: Box<RawValue>, error: String },
}

/// An error reply from the daemon. Read leniently (a code this client does not know, a
/// message of the wrong type): the person still sees what the daemon said.
#[derive(Debug)]
pub struct DaemonError {
    pub code: String,
    pub message: String,
    /// Free-form by the protocol; for `lockout`, a [`ipaccess::protocol::ShutOut`].
    pub details: Option<Value>,
    /// The error object as it came, for `--json`.
    pub raw: Value,
}

impl DaemonError {
    pub fn from_reply(error: &Value) -> DaemonError {
        // Strings as they are; anything else as compact JSON (escaped later, like all text).
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        };
        let (code, message) = match error {
            Value::Object(_) => (text(&error["code"]), text(&error["message"])),
            other => (String::new(), text(other)),
        };
        let details = error.get("details").filter(|d| !d.is_null()).cloned();
        DaemonError { code, message, details, raw: error.clone() }
    }

    /// The same error with another message (in `--json` output too).
    pub fn with_message(mut self, message: String) -> DaemonError {
        if let Some(o) = self.raw.as_object_mut() {
            o.insert("message".into(), Value::String(message.clone()));
        }
        self.message = message;
        self
    }
}

/// A reply line as this client reads it before knowing whether it succeeded.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(default)]
    id: Value,
    #[serde(borrow, default)]
    ok: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<Value>,
}

/// Sends `request` to the daemon at `socket` and reads the reply as `C::Reply`.
pub fn call<C: Call>(socket: &Path, request: C) -> Result<Typed<C::Reply>, Failure> {
    let line = serde_json::to_string(&Request { id: Value::from(std::process::id()), command: request.into() })
        .expect("requests serialize");
    reply_to::<C>(exchange(socket, line)?)
}

/// Sends an `import` of accounts that are already JSON text (checked by the caller as
/// [`ipaccess::protocol::ImportAccount`]s): a large import is not written out a second time.
pub fn call_import(socket: &Path, accounts: &[&str], force: bool) -> Result<Typed<<Import as Call>::Reply>, Failure> {
    let size = accounts.iter().map(|a| a.len() + 1).sum::<usize>() + 64;
    let mut line = String::with_capacity(size);
    let force = if force { ",\"force\":true" } else { "" };
    line.push_str(&format!("{{\"id\":{}{force},\"cmd\":\"import\",\"accounts\":[", std::process::id()));
    for (n, account) in accounts.iter().enumerate() {
        if n > 0 {
            line.push(',');
        }
        line.push_str(account);
    }
    line.push_str("]}");
    reply_to::<Import>(exchange(socket, line)?)
}

/// Reads the reply line to this process's request as `C::Reply`.
fn reply_to<C: Call>(line: String) -> Result<Typed<C::Reply>, Failure> {
    let reply: Line =
        serde_json::from_str(&line).map_err(|e| Failure::Local(format!("unreadable reply from the daemon: {e}")))?;
    let id = Value::from(std::process::id());
    let error = reply.error.filter(|e| !e.is_null());
    // Errors about a line the daemon could not read (too large, busy) carry no id.
    let unread = reply.id.is_null() && error.is_some();
    if reply.id != id && !unread {
        return Err(Failure::Local(format!("reply is for request {}, not {id}", reply.id)));
    }
    if let Some(error) = error {
        return Err(Failure::Daemon(DaemonError::from_reply(&error)));
    }
    // No `ok` at all reads as `null`, which no reply type is.
    let raw = reply.ok.map_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"), |ok| ok.to_owned());
    match serde_json::from_str(raw.get()) {
        Ok(reply) => Ok(Typed { reply, raw }),
        Err(e) => Err(Failure::Unreadable { raw, error: e.to_string() }),
    }
}

/// Writes one request line and reads one reply line.
fn exchange(socket: &Path, mut line: String) -> Result<String, Failure> {
    let io = |what: &str, e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            Failure::Local(format!("no reply from {} within 10 s", socket.display()))
        }
        _ => Failure::Local(format!("{what} {}: {e}", socket.display())),
    };
    let stream = UnixStream::connect(socket).map_err(|e| {
        Failure::Local(format!(
            "cannot connect to {}: {e}; is ipaccessd running, and may you use its socket? \
             (another path: --socket or IPACCESS_SOCKET)",
            socket.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| io("cannot set timeouts on", e))?;
    line.push('\n');
    // A daemon that refuses a request before reading all of it (too large, a caller without
    // a role) replies and closes the connection: what it said is read even when sending the
    // rest failed, so the person sees the reason rather than a broken pipe.
    let sent = match (&stream).write_all(line.as_bytes()) {
        Err(e) if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
            return Err(io("cannot send to", e));
        }
        sent => sent,
    };
    let mut reply = String::new();
    match (BufReader::new(&stream).read_line(&mut reply), sent) {
        (Ok(n), _) if n > 0 => Ok(reply),
        (_, Err(e)) => Err(io("cannot send to", e)),
        (Err(e), Ok(())) => Err(match io("cannot read from", e) {
            Failure::Local(what) => Failure::Unanswered(what),
            other => other,
        }),
        (Ok(_), Ok(())) => {
            Err(Failure::Unanswered(format!("{} closed the connection without replying", socket.display())))
        }
    }
}
