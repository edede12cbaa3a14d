//! Requests over the control socket as raw JSON lines: one connection ([`Conn`]), optionally
//! with another uid's credentials, and the same requests on a test [`World`] ([`Client`]).

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use serde_json::{Value, json};

use crate::daemon::World;

/// Requests over the control socket, on the shared test world.
pub trait Client {
    fn conn(&self) -> Conn;
    fn ok(&self, request: Value) -> Value;
    fn err(&self, request: Value) -> (String, String);
    fn check(&self, account: &str, addr: impl Into<IpAddr>, method: &str) -> Value;
}

impl Client for World {
    fn conn(&self) -> Conn {
        Conn::open(&self.socket())
    }

    /// A request (on a fresh connection) that must succeed; its result.
    fn ok(&self, request: Value) -> Value {
        self.conn().ok(request)
    }

    /// A request that must fail; its error code and message.
    fn err(&self, request: Value) -> (String, String) {
        self.conn().err(request)
    }

    fn check(&self, account: &str, addr: impl Into<IpAddr>, method: &str) -> Value {
        let addr = addr.into().to_string();
        self.ok(json!({"cmd": "check", "account": account, "addr": addr, "method": method}))
    }
}

/// One control connection: a request line out, a reply line back.
pub struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Conn {
    pub fn open(socket: &Path) -> Conn {
        Conn::from(UnixStream::connect(socket).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display())))
    }

    pub fn from(stream: UnixStream) -> Conn {
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn { writer: stream.try_clone().unwrap(), reader: BufReader::new(stream), next_id: 1 }
    }

    /// Connects with the credentials of uid/gid `id` and no supplementary groups. Only the
    /// connecting thread changes identity (raw syscalls are per thread; SO_PEERCRED records
    /// the connecting thread's credentials), and that thread then ends.
    pub fn open_as(socket: &Path, id: u32) -> Conn {
        let socket = socket.to_path_buf();
        let stream = thread::spawn(move || {
            // SAFETY: raw credential syscalls on this thread only; no memory is involved.
            unsafe {
                assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
                assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
                assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
            }
            UnixStream::connect(&socket)
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("connect as uid {id}: {e}"));
        Conn::from(stream)
    }

    /// Sends `request` with the next id; the whole reply line.
    pub fn request(&mut self, mut request: Value) -> Value {
        request["id"] = json!(self.next_id);
        self.next_id += 1;
        self.writer.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        assert!(self.reader.read_line(&mut line).unwrap() > 0, "{request}: the daemon closed the connection");
        let reply: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"));
        assert_eq!(reply["id"], request["id"], "{request} -> {reply}");
        reply
    }

    /// A request that must succeed; its result.
    pub fn ok(&mut self, request: Value) -> Value {
        let shown = request.to_string();
        let reply = self.request(request);
        assert!(reply.get("error").is_none() && reply.get("ok").is_some(), "{shown} -> {reply}");
        reply["ok"].clone()
    }

    /// A request that must fail; its error code and message.
    pub fn err(&mut self, request: Value) -> (String, String) {
        let shown = request.to_string();
        let reply = self.request(request);
        assert!(reply.get("ok").is_none(), "{shown} should have failed: {reply}");
        let code = reply["error"]["code"].as_str().unwrap_or_else(|| panic!("{shown} -> {reply}")).to_string();
        let message = reply["error"]["message"].as_str().unwrap_or_default().to_string();
        assert!(!message.is_empty(), "{shown} -> {reply}");
        (code, message)
    }
}
