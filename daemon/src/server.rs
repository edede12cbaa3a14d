//! The control socket: a Unix stream socket speaking newline-delimited JSON
//! (see `protocol`). Each connection's peer credentials (SO_PEERCRED, plus the peer's
//! supplementary groups) decide its roles. Requests on one connection are answered in
//! order, one at a time; every bad request gets a structured error and the connection
//! stays usable, except after a line too long to frame, which closes it.

use std::{collections::BTreeSet, fs, io, sync::Arc};

use log::{debug, warn};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, watch},
};

use crate::{
    config::Config,
    protocol::{Caller, Command, ErrorBody, ErrorCode, Reply, Request, Role},
    service::{Failure, Service},
};

/// Accepts connections until `shutdown` completes. A connection takes its roles and limits
/// from the configuration in force when it is accepted (a reload changes them for new
/// connections); the number of connections stays the one configured at start.
pub async fn serve(
    listener: UnixListener,
    service: Arc<Service>,
    config: watch::Receiver<Arc<Config>>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(config.borrow().limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    warn!("accepting a control connection: {e}");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let (service, config) = (service.clone(), config.borrow().clone());
        tokio::spawn(async move {
            if let Err(e) = connection(stream, service, config).await {
                debug!("control connection ended: {e}");
            }
            drop(permit);
        });
    }
}

async fn refuse_busy(mut stream: UnixStream) {
    let reply = error_reply(Value::Null, ErrorCode::Busy, "too many control connections; try again shortly");
    let _ = stream.write_all(&line(&reply)).await;
}

async fn connection(stream: UnixStream, service: Arc<Service>, config: Arc<Config>) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let mut gids = cred.pid().map(supplementary_groups).unwrap_or_default();
    gids.push(cred.gid());
    let roles = config.roles.of(uid, &gids);
    let max = if roles.contains(&Role::Admin) {
        config.limits.max_admin_request_bytes.max(config.limits.max_request_bytes)
    } else {
        config.limits.max_request_bytes
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut reader).take(max as u64 + 1).read_until(b'\n', &mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') && buf.len() > max {
            let message = format!("request longer than {max} bytes; closing the connection");
            write.write_all(&line(&error_reply(Value::Null, ErrorCode::TooLarge, &message))).await?;
            return Ok(());
        }
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let reply = answer(text, &roles, uid, &service).await;
        write.write_all(&line(&reply)).await?;
    }
}

/// One request line to one reply.
async fn answer(text: &[u8], roles: &BTreeSet<Role>, uid: u32, service: &Arc<Service>) -> Reply {
    // The common case parses once; only a bad request is parsed again, to classify the
    // error and recover its id.
    let (id, request) = match serde_json::from_slice::<Request>(text) {
        Ok(request) => (request.id.clone(), request),
        Err(e) => return bad_request(text, e),
    };
    if !request.command.permits(roles) {
        let message = match request.command.role() {
            Some(needed) => format!("uid {uid} may not run this command (it needs the {needed:?} role)").to_lowercase(),
            None => format!("uid {uid} has no role"),
        };
        return error_reply(id, ErrorCode::Forbidden, &message);
    }
    let caller = Caller { uid, roles: roles.clone() };
    let outcome = match request.command {
        // Checks are answered from memory and never block.
        command @ Command::Check { .. } => service.execute(command, &caller),
        command => {
            let service = service.clone();
            match tokio::task::spawn_blocking(move || service.execute(command, &caller)).await {
                Ok(outcome) => outcome,
                Err(e) => Err(Failure::new(ErrorCode::Internal, format!("the request failed: {e}"))),
            }
        }
    };
    match outcome {
        Ok(ok) => Reply { id, ok: Some(ok), error: None },
        Err(Failure(body)) => Reply { id, ok: None, error: Some(body) },
    }
}

fn bad_request(text: &[u8], error: serde_json::Error) -> Reply {
    match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(fields)) => {
            let id = fields.get("id").cloned().unwrap_or(Value::Null);
            error_reply(id, ErrorCode::BadRequest, &format!("bad request: {error}"))
        }
        Ok(_) => error_reply(Value::Null, ErrorCode::BadJson, "a request is one JSON object per line"),
        Err(e) => error_reply(Value::Null, ErrorCode::BadJson, &format!("not JSON: {e}")),
    }
}

fn error_reply(id: Value, code: ErrorCode, message: &str) -> Reply {
    Reply { id, ok: None, error: Some(ErrorBody { code, message: message.into(), details: None }) }
}

fn line(reply: &Reply) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(reply).expect("replies serialize");
    bytes.push(b'\n');
    bytes
}

/// The peer's supplementary groups, from /proc: SO_PEERCRED carries only the primary one.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|groups| groups.split_whitespace().filter_map(|g| g.parse().ok()).collect())
        .unwrap_or_default()
}
