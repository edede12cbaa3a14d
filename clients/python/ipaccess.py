"""A client for ipaccessd's control socket (docs/protocol.md), standard library only.

    from ipaccess import Client, Unavailable

    client = Client("/run/ipaccess/ipaccessd.sock")
    try:
        result = client.check("acme", "198.18.0.7", "password")
    except Unavailable:
        deny()  # fail closed: a login the daemon cannot judge is refused
    else:
        if not result.allowed:
            deny(result.hint)

One `Client` holds one connection, reused across requests and opened again when it
breaks (the daemon closes idle connections and restarts). A `Client` serialises its
requests; for concurrency use several (a small pool per process: see the "Framing" section
of docs/protocol.md for sizing against `limits.max_connections_per_uid`).

Every request has a deadline (`timeout` seconds, covering reconnects, the write and the
reply). When it passes, the connection is dropped (a late reply would pair with the wrong
request) and `Timeout` is raised. A connection refused or gone is retried with backoff
until the deadline, except that a mutating request whose connection broke after it was
written is not sent again: the daemon applies a request even when its client has left, so
`ConnectionLost` (with `maybe_applied`) says so and the caller decides (see the idempotent
outcomes in docs/protocol.md).
"""

import errno
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass

DEFAULT_SOCKET = "/run/ipaccess/ipaccessd.sock"

# Commands that change nothing: safe to send again after a broken connection.
READ_ONLY = frozenset(
    {"check", "status", "stats", "account_show", "account_list", "allow_list", "bind_list", "override_list", "activity"}
)


class IpaccessError(Exception):
    """An error reply from the daemon: `code` (stable), `message` (for people), `details`."""

    retry = False  # whether sending the same request again later may succeed
    closes = False  # whether the daemon closed the connection after this error

    def __init__(self, code, message, details=None, request_id=None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.details, self.id = code, message, details, request_id


class RequestError(IpaccessError):
    """bad_json, bad_request: the request is malformed; fix it, do not retry."""


class TooLarge(RequestError):
    """too_large: the line exceeded the limit; the daemon closed the connection."""

    closes = True


class Forbidden(IpaccessError):
    """forbidden: the caller's uid has no role allowing the command."""


class NotFound(IpaccessError):
    """unknown_account, unknown_entry, unknown_binding, unknown_override, unknown_set."""


class AlreadyExists(IpaccessError):
    """account_exists, entry_exists, binding_exists (on a retry: the first attempt applied)."""


class Refused(IpaccessError):
    """refused, lockout, has_sub_users, set_in_use: the change is not allowed as asked;
    nothing changed."""


class Busy(IpaccessError):
    """busy: over a connection limit; the connection is closed. Retry later, with backoff."""

    retry = True
    closes = True


class TablesFull(IpaccessError):
    """tables_full: no room in the kernel's tables; nothing was changed. Retrying will not
    help until an operator makes room."""

    retry = False


class TooManyEntries(IpaccessError):
    """too_many_entries: the change would take an account over the configured number of
    allowlist entries; nothing was changed. `details` names the account and the limit."""

    retry = False


class TooManySets(IpaccessError):
    """too_many_sets: the change would give an account more enabled shared-set references
    than the kernel holds per account; nothing was changed. `details` names the limit."""

    retry = False


class TooManyOverrides(IpaccessError):
    """too_many_overrides: the grant would give an account more live overrides than the
    configured limit; nothing was changed. Revoke one first. `details` names the limit."""

    retry = False


class Internal(IpaccessError):
    """internal: storage or kernel failure; nothing was changed."""

    retry = True


class ClusterUnavailable(IpaccessError):
    """cluster_unavailable: a fleet node cannot reach etcd's quorum; checks still work.
    Retry after a pause; if the message says etcd did not confirm the change, look first."""

    retry = True


class Conflict(IpaccessError):
    """conflict: another fleet node changed the same account first; nothing was changed.
    Retry at once."""

    retry = True


class Unavailable(IpaccessError):
    """The daemon could not be reached, or gave no reply, within the request's deadline."""

    retry = True

    def __init__(self, message, maybe_applied=False):
        super().__init__("unavailable", message)
        self.maybe_applied = maybe_applied


class Timeout(Unavailable):
    """The deadline passed with the request written and no reply: it may have been applied."""


class ConnectionLost(Unavailable):
    """The connection broke after a mutating request was written: it may have been applied."""


ERRORS = {
    "bad_json": RequestError,
    "bad_request": RequestError,
    "too_large": TooLarge,
    "forbidden": Forbidden,
    "unknown_account": NotFound,
    "unknown_entry": NotFound,
    "unknown_binding": NotFound,
    "unknown_override": NotFound,
    "unknown_set": NotFound,
    "account_exists": AlreadyExists,
    "entry_exists": AlreadyExists,
    "binding_exists": AlreadyExists,
    "refused": Refused,
    "lockout": Refused,
    "has_sub_users": Refused,
    "set_in_use": Refused,
    "busy": Busy,
    "tables_full": TablesFull,
    "too_many_entries": TooManyEntries,
    "too_many_sets": TooManySets,
    "too_many_overrides": TooManyOverrides,
    "internal": Internal,
    "cluster_unavailable": ClusterUnavailable,
    "conflict": Conflict,
}


def error_from(reply):
    """The exception for an error reply (an unknown code gives the base class)."""
    body = reply.get("error") or {}
    code = body.get("code", "internal")
    return ERRORS.get(code, IpaccessError)(code, body.get("message", ""), body.get("details"), reply.get("id"))


@dataclass(frozen=True)
class CheckResult:
    """A login check's answer. `reason` is stable (see docs/protocol.md); `hint` is for the person."""

    allowed: bool
    reason: str
    hint: str = ""

    def __bool__(self):
        return self.allowed


class _Gone(Exception):
    """The connection broke; `sent` says whether the whole request had been written."""

    def __init__(self, sent, why):
        super().__init__(why)
        self.sent = sent


class Connection:
    """One socket with line framing: `send` whole lines, `read_line` one reply line."""

    def __init__(self, path, deadline):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.buf = bytearray()

    def close(self):
        self.sock.close()

    def send(self, data, deadline):
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        self.sock.sendall(data)

    def read_line(self, deadline):
        """One line without its newline; `None` if the daemon closed the connection."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return line
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk


class Client:
    """Requests over one reused connection. Thread-safe; one request at a time."""

    def __init__(self, path=DEFAULT_SOCKET, timeout=2.0, backoff=(0.05, 0.5)):
        self.path = path
        self.timeout = timeout
        self.backoff = backoff  # first and longest pause between connection attempts
        self.connects = 0  # connections opened so far (for monitoring reconnects)
        self._conn = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def close(self):
        with self._lock:
            self._drop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _drop(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connect(self, deadline):
        """A connection, opened again if needed, retrying refusals with backoff until the deadline."""
        pause = self.backoff[0]
        while self._conn is None:
            try:
                self._conn = Connection(self.path, deadline)
                self.connects += 1
            except (ConnectionRefusedError, FileNotFoundError) as e:
                # No daemon behind the socket file (stopped, or restarting: a killed daemon's
                # file refuses connections until the new one replaces it).
                if time.monotonic() + pause >= deadline:
                    raise Unavailable(f"cannot connect to {self.path}: {e}") from e
                time.sleep(pause)
                pause = min(pause * 2, self.backoff[1])
            except socket.timeout as e:
                raise Unavailable(f"cannot connect to {self.path} in time") from e
        return self._conn

    def request(self, cmd, *, timeout=None, **args):
        """Sends `cmd` with `args`; its `ok` value, or raises the error's class from ERRORS."""
        return self.call(dict(args, cmd=cmd), timeout=timeout)

    def call(self, request, timeout=None):
        """`request` (a dict with `cmd`) as is, with a fresh id; its `ok` value."""
        reply = self.roundtrip(request, timeout)
        if "error" in reply:
            raise error_from(reply)
        return reply.get("ok")

    def roundtrip(self, request, timeout=None):
        """The whole reply object of `request` (ok or error alike)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            request = dict(request, id=next(self._ids))
            line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
            retry_after_send = request.get("cmd") in READ_ONLY
            pause = self.backoff[0]
            while True:
                try:
                    return self._exchange(line, request["id"], deadline)
                except _Gone as gone:
                    if gone.sent and not retry_after_send:
                        raise ConnectionLost(f"connection lost after sending {request['cmd']}: {gone}", True) from None
                    if time.monotonic() + pause >= deadline:
                        raise Unavailable(f"connection lost: {gone}", gone.sent) from None
                    time.sleep(pause)
                    pause = min(pause * 2, self.backoff[1])

    def _exchange(self, line, request_id, deadline):
        conn = self._connect(deadline)
        sent = False
        try:
            conn.send(line, deadline)
            sent = True
            raw = conn.read_line(deadline)
        except socket.timeout:
            self._drop()
            raise Timeout("no reply before the deadline", sent) from None
        except OSError as e:
            self._drop()
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN) or isinstance(e, ConnectionError):
                raise _Gone(sent, e) from None
            raise
        if raw is None:
            self._drop()
            raise _Gone(sent, "closed by the daemon")
        reply = json.loads(raw)
        if reply.get("id") != request_id:
            self._drop()
            if reply.get("id") is None and "error" in reply:
                # `busy` on connect (sent unprompted), or `too_large`: the daemon closed it.
                raise error_from(reply)
            raise Unavailable(f"reply id {reply.get('id')!r} does not match request id {request_id}")
        if reply.get("error", {}).get("code") in ("busy", "too_large"):
            self._drop()
        return reply

    def check(self, account, addr, method="password", dry_run=False, timeout=None):
        """A login check. Raises `Unavailable` when the daemon cannot answer: deny then."""
        args = {"account": account, "addr": str(addr), "method": method}
        if dry_run:
            args["dry_run"] = True
        ok = self.request("check", timeout=timeout, **args)
        return CheckResult(ok["allowed"], ok["reason"], ok.get("hint", ""))

    def pipeline(self, requests, timeout=None):
        """Sends every request before reading the replies, writing from a second thread so
        the daemon never waits on unread replies (it stops reading once its socket buffer
        is full). The reply objects, in order. Nothing is retried."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._lock:
            conn = self._connect(deadline)
            ids = [next(self._ids) for _ in requests]
            lines = (json.dumps(dict(r, id=i), separators=(",", ":")).encode() + b"\n" for r, i in zip(requests, ids))
            data = b"".join(lines)
            failed = []

            def write():
                try:
                    conn.sock.sendall(data)
                except OSError as e:
                    failed.append(e)

            writer = threading.Thread(target=write, daemon=True)
            writer.start()
            replies = []
            try:
                for want in ids:
                    raw = conn.read_line(deadline)
                    if raw is None:
                        raise Unavailable(f"closed after {len(replies)} of {len(ids)} replies", True)
                    reply = json.loads(raw)
                    if reply.get("id") != want:
                        raise Unavailable(f"reply id {reply.get('id')!r} where {want} was due", True)
                    replies.append(reply)
            except (OSError, Unavailable):
                self._drop()
                writer.join(1)
                raise
            writer.join(max(deadline - time.monotonic(), 0.001))
            if failed:
                self._drop()
                raise Unavailable(f"writing the pipeline: {failed[0]}", True)
            return replies
