//! A client for ipaccessd's control socket, blocking ([`Client`]) or for tokio
//! ([`AsyncClient`]), speaking the typed protocol of [`crate::protocol`].
//!
//! A login service asks whether a sign-in may proceed, and refuses it when ipaccessd cannot
//! answer (fail closed):
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use ipaccess::client::{Client, DEFAULT_SOCKET};
//! use ipaccess::protocol::Method;
//!
//! fn may_sign_in(client: &mut Client, account: &str, addr: std::net::IpAddr) -> Result<(), String> {
//!     match client.check(account, addr, Method::Password) {
//!         Ok(result) if result.allowed => Ok(()),
//!         // `hint` is written for the person; `reason` is for the application's logs.
//!         Ok(result) => Err(result.hint),
//!         // Not reachable in time, or an error reply: a sign-in nobody judged is refused.
//!         Err(e) => {
//!             eprintln!("ipaccess: {e}; refusing the sign-in");
//!             Err("Sign-in is unavailable right now; please try again.".into())
//!         }
//!     }
//! }
//!
//! let mut client = Client::connect(DEFAULT_SOCKET).unwrap().with_timeout(Duration::from_millis(500));
//! may_sign_in(&mut client, "acme", "198.18.0.7".parse().unwrap()).unwrap();
//! // Any command, typed: the reply of `AllowList` is `Vec<Entry>`.
//! let entries = client.call(ipaccess::protocol::AllowList { account: "acme".into(), unused: None }).unwrap();
//! ```
//!
//! What the client does for you, as docs/protocol.md ("Framing") asks of every client:
//!
//! - One connection, reused; each request gets a fresh integer id and the reply's id must
//!   be the same (otherwise [`Error::Protocol`], and the connection is dropped).
//! - A deadline per call (2 s unless [`Client::with_timeout`] says otherwise) covering
//!   reconnects, the write and the reply. A reply not received in time is
//!   [`Error::Timeout`] and the connection is dropped, so that a late reply can never be
//!   taken for the next request's.
//! - A connection found closed (the daemon's idle timeout, a restart) before the request
//!   was delivered is opened again and the request sent again; a socket that refuses
//!   connections or is missing (a daemon restarting) is retried with a backoff from 50 ms
//!   doubling to 500 ms, within the deadline. A connection that breaks after a mutating
//!   request was written is not retried: the daemon carries out what it read, so
//!   [`Error::ConnectionLost`] says it may have been applied. Read-only requests are sent
//!   again.
//! - `busy` is not retried here: [`Error::is_retryable`] says a caller may, after a pause.
//!
//! A client sends one request at a time (`&mut self`); for concurrency use a few, sized
//! against `limits.max_connections_per_uid` (docs/protocol.md, "Pools").

use std::io;
use std::time::Duration;

use serde_json::Value;

use crate::protocol::{Call, Command, ErrorBody, ErrorCode};

mod asynchronous;
mod blocking;

pub use asynchronous::AsyncClient;
pub use blocking::Client;

/// Where the packaged daemon listens.
pub const DEFAULT_SOCKET: &str = "/run/ipaccess/ipaccessd.sock";
/// A call's deadline unless the client is given another.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests a pipeline writes before reading their replies: small enough that the replies
/// fit in the socket buffers, so the daemon never stops reading (docs/protocol.md).
pub const BATCH: usize = 256;

const FIRST_PAUSE: Duration = Duration::from_millis(50);
const LONGEST_PAUSE: Duration = Duration::from_millis(500);

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with an error.
    #[error("{}: {message}", code_name(*code))]
    Daemon { code: ErrorCode, message: String, details: Option<Value> },
    /// No reply before the deadline; the request may have been carried out.
    #[error("no reply from ipaccessd before the deadline")]
    Timeout,
    /// The connection broke after a mutating request was written: it may have been applied
    /// (see the idempotent outcomes in docs/protocol.md before sending it again).
    #[error("the connection to ipaccessd broke after the request was sent; it may have been applied")]
    ConnectionLost,
    /// The socket could not be reached (refused or missing until the deadline) or failed.
    #[error("ipaccessd: {0}")]
    Io(#[from] io::Error),
    /// A reply that is not what the protocol promises: not JSON, another id, or an `ok`
    /// that does not read as the command's reply type.
    #[error("ipaccessd protocol: {0}")]
    Protocol(String),
}

fn code_name(code: ErrorCode) -> String {
    serde_json::to_value(code).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

impl Error {
    /// Whether the same request may succeed later: `busy`, `internal`, and a fleet node's
    /// `conflict` and `cluster_unavailable` replies (the retry table of docs/protocol.md),
    /// and a daemon that could not be reached or did not answer in time. Every other error
    /// reply needs a different request.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Daemon { code, .. } => matches!(
                code,
                ErrorCode::Busy | ErrorCode::Internal | ErrorCode::Conflict | ErrorCode::ClusterUnavailable
            ),
            Error::Timeout | Error::ConnectionLost | Error::Io(_) => true,
            Error::Protocol(_) => false,
        }
    }

    /// Whether the connection is gone after this error: the daemon closes it after
    /// `too_large` and `busy`, and the client drops it after anything but an error reply.
    /// The next call opens a new one either way.
    pub fn closes_connection(&self) -> bool {
        match self {
            Error::Daemon { code, .. } => matches!(code, ErrorCode::TooLarge | ErrorCode::Busy),
            _ => true,
        }
    }

    /// The daemon's error code, when it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Daemon { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A request line: the command's JSON with `id` added, and `\n`.
fn encode(id: u64, command: &Command) -> Result<Vec<u8>, Error> {
    let mut value = serde_json::to_value(command).map_err(|e| Error::Protocol(e.to_string()))?;
    let Some(object) = value.as_object_mut() else {
        return Err(Error::Protocol(format!("a command serialised as {value}")));
    };
    object.insert("id".into(), id.into());
    let mut line = serde_json::to_vec(&value).map_err(|e| Error::Protocol(e.to_string()))?;
    line.push(b'\n');
    Ok(line)
}

/// The `ok` value of the reply `line` to request `id`, or the error it carries.
fn decode(line: &[u8], id: u64) -> Result<Value, Error> {
    let reply: Value = serde_json::from_slice(line)
        .map_err(|e| Error::Protocol(format!("reply is not JSON ({e}): {}", String::from_utf8_lossy(line))))?;
    let Some(reply) = reply.as_object() else {
        return Err(Error::Protocol(format!("reply is not an object: {reply}")));
    };
    let error = match reply.get("error") {
        Some(body) => Some(
            serde_json::from_value::<ErrorBody>(body.clone())
                .map_err(|e| Error::Protocol(format!("error reply {body} ({e})")))?,
        ),
        None => None,
    };
    let echoed = reply.get("id").unwrap_or(&Value::Null);
    if echoed != &Value::from(id) {
        // The daemon answers `null` to lines it could not read as requests; of those, only
        // `too_large` (the request was over the limit) and `busy` (sent on connecting) can
        // meet a request this client wrote.
        let unread = matches!(&error, Some(e) if matches!(e.code, ErrorCode::TooLarge | ErrorCode::Busy));
        if !(echoed.is_null() && unread) {
            return Err(Error::Protocol(format!("reply id {echoed} to request id {id}")));
        }
    }
    match (error, reply.get("ok")) {
        (Some(ErrorBody { code, message, details }), _) => Err(Error::Daemon { code, message, details }),
        (None, Some(ok)) => Ok(ok.clone()),
        (None, None) => Err(Error::Protocol(format!("reply without ok or error: {}", Value::from(reply.clone())))),
    }
}

/// An `ok` value as the reply type of `C`.
fn typed<C: Call>(ok: Value) -> Result<C::Reply, Error> {
    let text = ok.to_string();
    serde_json::from_value(ok).map_err(|e| Error::Protocol(format!("ok {text} is not the command's reply ({e})")))
}

/// Whether an error reply leaves the connection unusable.
fn drops_connection(result: &Result<Value, Error>) -> bool {
    matches!(result, Err(e) if e.closes_connection())
}

/// The connection was found closed: `sent` says whether the whole request had been written.
enum Attempt {
    Gone { sent: bool, why: io::Error },
    Failed(Error),
}

/// A connection closed by the peer (idle timeout, restart), as the socket reports it.
fn is_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// No daemon behind the path (a killed daemon's socket file refuses until the new daemon
/// replaces it; a stopped one may have removed it).
fn is_unreachable(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

fn closed_by_daemon() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the daemon closed the connection")
}

/// Pauses between attempts: from 50 ms doubling to 500 ms.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(FIRST_PAUSE)
    }

    /// The next pause, if it ends before `left` runs out.
    fn next(&mut self, left: Duration) -> Option<Duration> {
        let pause = self.0;
        self.0 = (self.0 * 2).min(LONGEST_PAUSE);
        (pause < left).then_some(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Status;

    #[test]
    fn replies_are_paired_by_id() {
        let line = encode(7, &Status {}.into()).unwrap();
        assert_eq!(line, b"{\"cmd\":\"status\",\"id\":7}\n");
        assert_eq!(decode(br#"{"id":7,"ok":{"a":1}}"#, 7).unwrap(), serde_json::json!({"a": 1}));
        assert!(matches!(decode(br#"{"id":6,"ok":{}}"#, 7), Err(Error::Protocol(_))));
        assert!(matches!(decode(br#"{"id":null,"ok":{}}"#, 7), Err(Error::Protocol(_))));
        assert!(matches!(decode(b"not json", 7), Err(Error::Protocol(_))));
        let busy = decode(br#"{"id":null,"error":{"code":"busy","message":"m","details":{"max":1}}}"#, 7);
        assert!(matches!(&busy, Err(e @ Error::Daemon { code: ErrorCode::Busy, .. }) if e.closes_connection()));
        let bad = decode(br#"{"id":null,"error":{"code":"bad_json","message":"m"}}"#, 7);
        assert!(matches!(bad, Err(Error::Protocol(_))), "this client never writes a line that is not JSON");
        let internal = decode(br#"{"id":7,"error":{"code":"internal","message":"disk"}}"#, 7).unwrap_err();
        assert!(internal.is_retryable() && !internal.closes_connection());
        assert_eq!(internal.to_string(), "internal: disk");
        assert!(!Error::Daemon { code: ErrorCode::Lockout, message: String::new(), details: None }.is_retryable());
    }

    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::path::PathBuf;

    use crate::protocol::{AccountAdd, Method};

    /// A stand-in daemon on a fresh socket: each accepted connection is handed to `serve`
    /// with the first line it read, in a thread of its own.
    fn server(name: &str, serve: impl Fn(usize, UnixStream, String) + Send + Sync + 'static) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ipaccess-client-{name}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let serve = std::sync::Arc::new(serve);
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let serve = serve.clone();
                std::thread::spawn(move || {
                    let stream = stream.unwrap();
                    let mut line = String::new();
                    let _ = BufReader::new(stream.try_clone().unwrap()).read_line(&mut line);
                    serve(n, stream, line);
                });
            }
        });
        path
    }

    fn id_of(line: &str) -> u64 {
        serde_json::from_str::<Value>(line).unwrap()["id"].as_u64().unwrap()
    }

    const CHECKED: &str = r#""ok":{"allowed":true,"reason":"allowed","hint":"h","detail":"d"}"#;

    #[test]
    fn a_late_reply_is_never_taken_for_the_next_requests() {
        // Every other connection answers after 300 ms, and with the id of the request after
        // it too; the others answer at once.
        let path = server("late", |n, mut stream, line| {
            let id = id_of(&line);
            if n % 2 == 0 {
                std::thread::sleep(Duration::from_millis(300));
                let _ = write!(stream, "{{\"id\":{id},{CHECKED}}}\n{{\"id\":{},{CHECKED}}}\n", id + 1);
            } else {
                let _ = writeln!(stream, "{{\"id\":{id},{}}}", CHECKED.replace("true", "false"));
            }
        });
        let mut client = Client::connect(&path).unwrap().with_timeout(Duration::from_millis(100));
        let addr = "198.18.0.7".parse().unwrap();
        assert!(matches!(client.check("acme", addr, Method::Password), Err(Error::Timeout)));
        std::thread::sleep(Duration::from_millis(300));
        let second = client.check("acme", addr, Method::Password).unwrap();
        assert!(!second.allowed, "the reply came from the new connection");
        assert_eq!(client.connects(), 2);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut client = AsyncClient::lazy(&path).with_timeout(Duration::from_millis(100));
            assert!(matches!(client.check("acme", addr, Method::Password).await, Err(Error::Timeout)));
            assert!(!client.check("acme", addr, Method::Password).await.unwrap().allowed);
            assert_eq!(client.connects(), 2);
        });
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_connection_lost_after_writing_is_resent_only_when_nothing_changes() {
        // Every connection reads one request and closes without a reply, except the third,
        // which answers.
        let path = server("lost", |n, mut stream, line| {
            if n == 2 {
                writeln!(stream, "{{\"id\":{},{CHECKED}}}", id_of(&line)).unwrap();
            }
        });
        let mut client = Client::lazy(&path);
        let add = AccountAdd { account: "acme".into(), parent: None, unconfirmed: false };
        assert!(matches!(client.call(add), Err(Error::ConnectionLost)), "a change may have been applied");
        let check = client.check("acme", "198.18.0.7".parse().unwrap(), Method::Password).unwrap();
        assert!(check.allowed && client.connects() == 3, "a check is sent again");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_reply_with_another_id_drops_the_connection() {
        let path = server("wrong-id", |n, mut stream, line| {
            let id = id_of(&line) + u64::from(n == 0);
            writeln!(stream, "{{\"id\":{id},{CHECKED}}}").unwrap();
        });
        let mut client = Client::lazy(&path);
        let addr = "198.18.0.7".parse().unwrap();
        assert!(matches!(client.check("acme", addr, Method::Password), Err(Error::Protocol(_))));
        assert!(client.check("acme", addr, Method::Password).unwrap().allowed);
        assert_eq!(client.connects(), 2);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_missing_socket_is_retried_until_the_deadline() {
        let path = std::env::temp_dir().join(format!("ipaccess-client-none-{}.sock", std::process::id()));
        let start = std::time::Instant::now();
        let err = Client::lazy(&path).with_timeout(Duration::from_millis(300)).call(Status {}).unwrap_err();
        assert!(matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::NotFound) && err.is_retryable());
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(150) && took < Duration::from_millis(400), "{took:?}");
    }

    #[test]
    fn backoff_doubles_within_the_deadline() {
        let mut backoff = Backoff::new();
        let pauses: Vec<_> = (0..6).map_while(|_| backoff.next(Duration::from_secs(1))).collect();
        assert_eq!(pauses.iter().map(Duration::as_millis).collect::<Vec<_>>(), [50, 100, 200, 400, 500, 500]);
        assert_eq!(Backoff::new().next(Duration::from_millis(50)), None, "no pause that ends past the deadline");
    }
}
