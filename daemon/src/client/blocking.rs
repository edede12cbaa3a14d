//! The blocking client, on a std `UnixStream`.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    Attempt, BATCH, Backoff, DEFAULT_TIMEOUT, Error, closed_by_daemon, decode, drops_connection, encode, is_gone,
    is_timeout, is_unreachable, typed,
};
use crate::protocol::{Call, Check, CheckResult, Command, Method};

/// A blocking client: one connection, reused, opened again when it breaks. See the
/// [module documentation](super).
pub struct Client {
    path: PathBuf,
    timeout: Duration,
    conn: Option<Connection>,
    next_id: u64,
    connects: u64,
}

struct Connection {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the daemon at `path`, retrying a refused or missing socket within the
    /// default deadline (a daemon that is restarting).
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, Error> {
        let mut client = Client::lazy(path);
        client.connection(Instant::now() + client.timeout)?;
        Ok(client)
    }

    /// A client that connects on its first call.
    pub fn lazy(path: impl AsRef<Path>) -> Client {
        Client { path: path.as_ref().to_path_buf(), timeout: DEFAULT_TIMEOUT, conn: None, next_id: 1, connects: 0 }
    }

    /// Each call's deadline, from sending to the reply, reconnects included.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Connections opened so far (for monitoring reconnects).
    pub fn connects(&self) -> u64 {
        self.connects
    }

    /// Sends any request; its reply, typed.
    pub fn call<C: Call>(&mut self, request: C) -> Result<C::Reply, Error> {
        typed::<C>(self.call_command(request.into())?)
    }

    /// A login check, recorded as a sign-in attempt. An `Err` means nobody judged the
    /// sign-in: refuse it.
    pub fn check(&mut self, account: &str, addr: IpAddr, method: Method) -> Result<CheckResult, Error> {
        self.call(Check { account: account.into(), addr, method: Some(method), dry_run: false })
    }

    /// Sends a command known only at run time; its `ok` value as the daemon wrote it.
    pub fn call_command(&mut self, command: Command) -> Result<Value, Error> {
        let deadline = Instant::now() + self.timeout;
        let id = self.fresh_id();
        let line = encode(id, &command)?;
        let mut backoff = Backoff::new();
        loop {
            let why = match self.exchange(&line, id, deadline) {
                Ok(reply) => return reply,
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Gone { sent: true, .. }) if command.changes() => return Err(Error::ConnectionLost),
                Err(Attempt::Gone { why, .. }) => why,
            };
            match backoff.next(deadline.saturating_duration_since(Instant::now())) {
                Some(pause) => thread::sleep(pause),
                None => return Err(Error::Io(why)),
            }
        }
    }

    /// Sends every request and reads the replies, [`BATCH`] requests at a time, on one
    /// connection: several times faster than one call after another. Each request's own
    /// outcome, in order; an `Err` of the whole when the connection failed or the deadline
    /// passed, with some requests perhaps carried out. Nothing is sent twice.
    pub fn pipeline<C: Call>(
        &mut self,
        requests: impl IntoIterator<Item = C>,
    ) -> Result<Vec<Result<C::Reply, Error>>, Error> {
        let deadline = Instant::now() + self.timeout;
        let mut lines = Vec::new();
        for request in requests {
            let id = self.fresh_id();
            lines.push((id, encode(id, &request.into())?));
        }
        let mut replies = Vec::with_capacity(lines.len());
        for batch in lines.chunks(BATCH) {
            let result = self.batch(batch, deadline, &mut replies);
            if result.is_err() {
                self.conn = None;
            }
            result?;
        }
        Ok(replies.into_iter().map(|r| r.and_then(typed::<C>)).collect())
    }

    fn batch(
        &mut self,
        batch: &[(u64, Vec<u8>)],
        deadline: Instant,
        replies: &mut Vec<Result<Value, Error>>,
    ) -> Result<(), Error> {
        let conn = self.connection(deadline)?;
        let bytes: Vec<u8> = batch.iter().flat_map(|(_, line)| line.iter().copied()).collect();
        conn.writer.set_write_timeout(Some(left(deadline)?))?;
        conn.writer.write_all(&bytes).map_err(timeout_or_io)?;
        for (id, _) in batch {
            let line = conn.read_line(deadline).map_err(timeout_or_io)?;
            let reply = decode(&line, *id);
            if let Err(e) = reply.as_ref()
                && (drops_connection(&reply) || matches!(e, Error::Protocol(_)))
            {
                return reply.map(drop);
            }
            replies.push(reply);
        }
        Ok(())
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The open connection, or a new one (retrying refusals until `deadline`).
    fn connection(&mut self, deadline: Instant) -> Result<&mut Connection, Error> {
        let mut backoff = Backoff::new();
        while self.conn.is_none() {
            match UnixStream::connect(&self.path) {
                Ok(stream) => {
                    let reader = BufReader::new(stream.try_clone()?);
                    self.conn = Some(Connection { reader, writer: stream });
                    self.connects += 1;
                }
                Err(e) if is_unreachable(&e) => {
                    match backoff.next(deadline.saturating_duration_since(Instant::now())) {
                        Some(pause) => thread::sleep(pause),
                        None => return Err(Error::Io(e)),
                    }
                }
                Err(e) => return Err(Error::Io(e)),
            }
        }
        Ok(self.conn.as_mut().expect("connected above"))
    }

    /// One request out and its reply back; the connection is dropped on anything that
    /// leaves it in doubt.
    fn exchange(&mut self, line: &[u8], id: u64, deadline: Instant) -> Result<Result<Value, Error>, Attempt> {
        let conn = self.connection(deadline).map_err(Attempt::Failed)?;
        let result = match conn.send(line, deadline) {
            Ok(()) => conn.read_line(deadline).map_err(|why| match is_gone(&why) {
                true => Attempt::Gone { sent: true, why },
                false => Attempt::Failed(timeout_or_io(why)),
            }),
            // A daemon that closed at once may have said why first (`busy` on accepting).
            Err(Attempt::Gone { sent, why }) => conn.read_line(deadline).map_err(|_| Attempt::Gone { sent, why }),
            Err(failed) => Err(failed),
        };
        let reply = result.map(|line| decode(&line, id));
        if !matches!(&reply, Ok(r) if !drops_connection(r) && !matches!(r, Err(Error::Protocol(_)))) {
            self.conn = None;
        }
        reply
    }
}

impl Connection {
    fn send(&mut self, line: &[u8], deadline: Instant) -> Result<(), Attempt> {
        self.writer.set_write_timeout(Some(left(deadline).map_err(Attempt::Failed)?)).map_err(io_failed)?;
        self.writer.write_all(line).map_err(|why| {
            // Nothing reaches a daemon that has closed its end, so sending again is safe.
            if is_gone(&why) { Attempt::Gone { sent: false, why } } else { Attempt::Failed(timeout_or_io(why)) }
        })
    }

    /// One reply line; a connection closed first is `UnexpectedEof`. Each read waits only
    /// for what is left of the deadline, so a reply trickling in cannot outlast it.
    fn read_line(&mut self, deadline: Instant) -> std::io::Result<Vec<u8>> {
        let mut line = Vec::new();
        loop {
            let wait = left(deadline).map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
            self.reader.get_ref().set_read_timeout(Some(wait))?;
            let buf = match self.reader.fill_buf() {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            if buf.is_empty() {
                return Err(closed_by_daemon());
            }
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                line.extend_from_slice(&buf[..end]);
                self.reader.consume(end + 1);
                return Ok(line);
            }
            let taken = buf.len();
            line.extend_from_slice(buf);
            self.reader.consume(taken);
        }
    }
}

/// The time left until `deadline`, or `Timeout` when none is.
fn left(deadline: Instant) -> Result<Duration, Error> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() { Err(Error::Timeout) } else { Ok(left) }
}

fn timeout_or_io(e: std::io::Error) -> Error {
    if is_timeout(&e) { Error::Timeout } else { Error::Io(e) }
}

fn io_failed(e: std::io::Error) -> Attempt {
    Attempt::Failed(Error::Io(e))
}
