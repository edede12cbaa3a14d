//! The async client, on a tokio `UnixStream`: the same behaviour as the blocking one.

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, sleep, timeout_at};

use super::{
    Attempt, BATCH, Backoff, DEFAULT_TIMEOUT, Error, closed_by_daemon, decode, drops_connection, encode, is_gone,
    is_unreachable, typed,
};
use crate::protocol::{Call, Check, CheckResult, Command, Method};

/// An async client for tokio: one connection, reused, opened again when it breaks. See the
/// [module documentation](super).
///
/// ```no_run
/// # async fn sign_in() -> Result<(), ipaccess::client::Error> {
/// use ipaccess::client::AsyncClient;
/// use ipaccess::protocol::Method;
///
/// let mut client = AsyncClient::connect("/run/ipaccess/ipaccessd.sock").await?;
/// let allowed = match client.check("acme", "198.18.0.7".parse().unwrap(), Method::ApiKey).await {
///     Ok(result) => result.allowed,
///     Err(_) => false, // fail closed
/// };
/// # Ok(())
/// # }
/// ```
pub struct AsyncClient {
    path: PathBuf,
    timeout: Duration,
    conn: Option<Connection>,
    next_id: u64,
    connects: u64,
}

struct Connection {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl AsyncClient {
    /// Connects to the daemon at `path`, retrying a refused or missing socket within the
    /// default deadline.
    pub async fn connect(path: impl AsRef<Path>) -> Result<AsyncClient, Error> {
        let mut client = AsyncClient::lazy(path);
        client.connection(Instant::now() + client.timeout).await?;
        Ok(client)
    }

    /// A client that connects on its first call.
    pub fn lazy(path: impl AsRef<Path>) -> AsyncClient {
        AsyncClient { path: path.as_ref().to_path_buf(), timeout: DEFAULT_TIMEOUT, conn: None, next_id: 1, connects: 0 }
    }

    /// Each call's deadline, from sending to the reply, reconnects included.
    pub fn with_timeout(mut self, timeout: Duration) -> AsyncClient {
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
    pub async fn call<C: Call>(&mut self, request: C) -> Result<C::Reply, Error> {
        typed::<C>(self.call_command(request.into()).await?)
    }

    /// A login check, recorded as a sign-in attempt. An `Err` means nobody judged the
    /// sign-in: refuse it.
    pub async fn check(&mut self, account: &str, addr: IpAddr, method: Method) -> Result<CheckResult, Error> {
        self.call(Check { account: account.into(), addr, method: Some(method), dry_run: false }).await
    }

    /// Sends a command known only at run time; its `ok` value as the daemon wrote it.
    ///
    /// Dropping the future mid-call drops the connection too (the reply may still come, and
    /// must not be read as the next request's).
    pub async fn call_command(&mut self, command: Command) -> Result<Value, Error> {
        let deadline = Instant::now() + self.timeout;
        let id = self.fresh_id();
        let line = encode(id, &command)?;
        let mut backoff = Backoff::new();
        loop {
            let why = match self.exchange(&line, id, deadline).await {
                Ok(reply) => return reply,
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Gone { sent: true, .. }) if command.changes() => return Err(Error::ConnectionLost),
                Err(Attempt::Gone { why, .. }) => why,
            };
            match backoff.next(deadline.saturating_duration_since(Instant::now())) {
                Some(pause) => sleep(pause).await,
                None => return Err(Error::Io(why)),
            }
        }
    }

    /// As [`super::Client::pipeline`]: [`BATCH`] requests written, then their replies read.
    pub async fn pipeline<C: Call>(
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
            // Taken out while in use: a future dropped half-way leaves no connection behind.
            let mut conn = match self.conn.take() {
                Some(conn) => conn,
                None => {
                    self.connection(deadline).await?;
                    self.conn.take().expect("connected above")
                }
            };
            match timeout_at(deadline, conn.batch(batch, &mut replies)).await {
                Ok(Ok(())) => self.conn = Some(conn),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::Timeout),
            }
        }
        Ok(replies.into_iter().map(|r| r.and_then(typed::<C>)).collect())
    }

    fn fresh_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Opens a connection unless one is open (retrying refusals until `deadline`).
    async fn connection(&mut self, deadline: Instant) -> Result<(), Error> {
        let mut backoff = Backoff::new();
        while self.conn.is_none() {
            match timeout_at(deadline, UnixStream::connect(&self.path)).await {
                Ok(Ok(stream)) => {
                    let (reader, writer) = stream.into_split();
                    self.conn = Some(Connection { reader: BufReader::new(reader), writer });
                    self.connects += 1;
                }
                Ok(Err(e)) if is_unreachable(&e) => {
                    match backoff.next(deadline.saturating_duration_since(Instant::now())) {
                        Some(pause) => sleep(pause).await,
                        None => return Err(Error::Io(e)),
                    }
                }
                Ok(Err(e)) => return Err(Error::Io(e)),
                Err(_) => return Err(Error::Timeout),
            }
        }
        Ok(())
    }

    /// One request out and its reply back. The connection is taken out for the exchange
    /// and put back only when it is known to be in step.
    async fn exchange(&mut self, line: &[u8], id: u64, deadline: Instant) -> Result<Result<Value, Error>, Attempt> {
        self.connection(deadline).await.map_err(Attempt::Failed)?;
        let mut conn = self.conn.take().expect("connected above");
        match timeout_at(deadline, conn.writer.write_all(line)).await {
            Err(_) => return Err(Attempt::Failed(Error::Timeout)),
            // Nothing reaches a daemon that has closed its end, so sending again is safe; it
            // may have said why first (`busy` on accepting), which is then the reply.
            Ok(Err(why)) if is_gone(&why) => match timeout_at(deadline, conn.read_line()).await {
                Ok(Ok(said)) => return Ok(decode(&said, id)),
                _ => return Err(Attempt::Gone { sent: false, why }),
            },
            Ok(Err(e)) => return Err(Attempt::Failed(Error::Io(e))),
            Ok(Ok(())) => {}
        }
        let reply = match timeout_at(deadline, conn.read_line()).await {
            Err(_) => return Err(Attempt::Failed(Error::Timeout)),
            Ok(Err(why)) if is_gone(&why) => return Err(Attempt::Gone { sent: true, why }),
            Ok(Err(e)) => return Err(Attempt::Failed(Error::Io(e))),
            Ok(Ok(line)) => decode(&line, id),
        };
        if !drops_connection(&reply) && !matches!(reply, Err(Error::Protocol(_))) {
            self.conn = Some(conn);
        }
        Ok(reply)
    }
}

impl Connection {
    async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line).await?;
        if line.pop() != Some(b'\n') {
            return Err(closed_by_daemon());
        }
        Ok(line)
    }

    /// Writes a batch, then reads its replies into `replies`; an error leaves the
    /// connection unusable.
    async fn batch(&mut self, batch: &[(u64, Vec<u8>)], replies: &mut Vec<Result<Value, Error>>) -> Result<(), Error> {
        let bytes: Vec<u8> = batch.iter().flat_map(|(_, line)| line.iter().copied()).collect();
        self.writer.write_all(&bytes).await?;
        for (id, _) in batch {
            let reply = decode(&self.read_line().await?, *id);
            if let Err(e) = reply.as_ref()
                && (drops_connection(&reply) || matches!(e, Error::Protocol(_)))
            {
                return reply.map(drop);
            }
            replies.push(reply);
        }
        Ok(())
    }
}
