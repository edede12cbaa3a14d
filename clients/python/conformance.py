#!/usr/bin/env python3
"""Runs the language-neutral conformance list (tests/conformance.jsonl) against a running
ipaccessd with the Python client, standard library only.

    python3 clients/python/conformance.py --socket /run/ipaccess/ipaccessd.sock [--list FILE]

Each line of the list is one case: `send` (a request object; the runner adds the id, or
writes `raw_id` verbatim), or `raw` (a line sent as is), optionally `as: "nobody"` (from a
process with uid/gid 65534, which the daemon must give only the check role), and `expect`:
`{"ok": {...}}` (every key given must match), `{"ok_count": n}` (a list of n items),
`{"error": code}`, or `{"reason": r, "allowed": b}` for a check. A case with `step` is a
procedure named by it (blank_line, pipeline, window, too_large, busy, idle, restart), described
in its `checks`.

The restart step needs whoever started the daemon: the runner prints `@restart kill` and
waits for a line on stdin (the daemon has been killed with SIGKILL, its socket file left
behind), then prints `@restart start` and expects the daemon to be started again while it
keeps retrying. Exit status 0 when every case passed; one line per case on stdout.
"""

import argparse
import json
import os
import pathlib
import socket
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import ipaccess  # noqa: E402

NOBODY = 65534
REPLY = 10.0  # longest wait for a reply the daemon owes


class Failed(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failed(what)


class Num(str):
    """A JSON number kept as its text."""


def parse_exact(raw):
    """A reply line with every number kept as its text, to compare ids digit for digit."""
    return json.loads(raw, parse_int=Num, parse_float=Num)


def request_line(case, request_id):
    body = json.dumps(case["send"], separators=(",", ":"))
    if "raw_id" in case:
        return ('{"id":' + case["raw_id"] + "," + body[1:]).encode() + b"\n"
    return json.dumps(dict(case["send"], id=request_id), separators=(",", ":")).encode() + b"\n"


def exchange(path, line, deadline=REPLY):
    """One line out on a fresh connection, one reply line back (`None` if closed first)."""
    conn = ipaccess.Connection(path, time.monotonic() + deadline)
    try:
        conn.send(line, time.monotonic() + deadline)
        return conn.read_line(time.monotonic() + deadline)
    finally:
        conn.close()


def exchange_as(path, uid, line):
    """`exchange` from a child process running as `uid` (SO_PEERCRED names the connecting process)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            reply = exchange(path, line)
            os.write(write_end, reply or b"")
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    chunks = []
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    expect(status == 0, f"the child running as uid {uid} failed ({status})")
    return b"".join(chunks) or None


def matches(want, got):
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and matches(v, got[k]) for k, v in want.items())
    return want == got


def run_case(client, path, case, ids):
    request_id = next(ids)
    if "raw" in case:
        line = case["raw"].encode() + b"\n"
    else:
        request_id = case.get("id", request_id)
        line = request_line(case, request_id)
    if case.get("as") == "nobody":
        raw = exchange_as(path, NOBODY, line)
    else:
        raw = exchange(path, line)
    expect(raw is not None, "the daemon closed the connection without a reply")
    reply = json.loads(raw)
    want = case["expect"]
    if "raw" in case or want.get("id", "") is None:
        expect(reply.get("id") is None, f"id should be null: {raw!r}")
    elif "raw_id" in case:
        echoed = parse_exact(raw).get("id")
        expect(echoed == case["raw_id"], f"id {case['raw_id']} came back as {echoed}")
    else:
        expect(reply.get("id") == request_id, f"id {request_id!r} came back as {reply.get('id')!r}")
    if "error" in want:
        code = reply.get("error", {}).get("code")
        expect(code == want["error"], f"wanted error {want['error']}, got {raw!r}")
        expect(reply["error"].get("message"), "an error has a message")
        # The client raises the class documented for that code.
        expect(isinstance(ipaccess.error_from(reply), ipaccess.ERRORS[code]), f"class for {code}")
    elif "reason" in want:
        ok = reply.get("ok")
        expect(ok is not None, f"wanted a check result, got {raw!r}")
        expect((ok["reason"], ok["allowed"]) == (want["reason"], want["allowed"]), f"got {raw!r}")
        if case.get("as") is None and "raw_id" not in case and "id" not in case:
            # The same check through the client's typed call.
            send = case["send"]
            result = client.check(send["account"], send["addr"], send.get("method", "password"), dry_run=True)
            expect((result.reason, result.allowed) == (want["reason"], want["allowed"]), f"client.check: {result}")
    elif "ok_count" in want:
        expect(len(reply.get("ok") or []) == want["ok_count"], f"wanted {want['ok_count']} items, got {raw!r}")
    else:
        expect("ok" in reply, f"wanted ok, got {raw!r}")
        expect(matches(want["ok"], reply["ok"]), f"wanted ok matching {want['ok']}, got {raw!r}")


def step_blank_line(client, path, case):
    conn = ipaccess.Connection(path, time.monotonic() + REPLY)
    try:
        conn.send(b"\n   \n" + b'{"id":"after-blank","cmd":"status"}\n', time.monotonic() + REPLY)
        reply = json.loads(conn.read_line(time.monotonic() + REPLY))
        expect(reply.get("id") == "after-blank", f"the first reply after blank lines was {reply}")
    finally:
        conn.close()


def step_pipeline(client, path, case):
    accounts = [("c-acme", "198.18.0.7", "allowed"), ("c-acme", "198.18.9.9", "address_not_allowed"),
                ("c-ban", "198.18.0.7", "banned")]
    requests, reasons = [], []
    for i in range(case["count"]):
        account, addr, reason = accounts[i % len(accounts)]
        requests.append({"cmd": "check", "account": account, "addr": addr, "dry_run": True})
        reasons.append(reason)
    start = time.monotonic()
    replies = client.pipeline(requests, timeout=60)
    took = time.monotonic() - start
    got = [r["ok"]["reason"] for r in replies]
    expect(got == reasons, "replies out of order or wrong")
    return f"{len(replies)} in {took:.2f}s"


def step_window(client, path, case):
    """Writes without reading until the daemon stops reading; then reads everything back."""
    line = b'{"cmd":"check","account":"c-acme","addr":"198.18.0.7","dry_run":true}\n'
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.setblocking(False)
    sent, stalls, start = 0, 0, time.monotonic()
    data = line * 16
    while stalls < 5 and time.monotonic() - start < 20 and sent < 50_000 * len(line):
        try:
            sent += sock.send(data[sent % len(line):])
            stalls = 0
        except BlockingIOError:
            stalls += 1
            time.sleep(0.1)
    expect(stalls >= 5, f"the daemon kept reading {sent} bytes of requests without replies being read")
    whole, rest = divmod(sent, len(line))
    total = whole + (1 if rest else 0)
    sock.setblocking(True)
    sock.settimeout(REPLY)
    if rest:
        threading.Thread(target=sock.sendall, args=(line[rest:],), daemon=True).start()
    conn = ipaccess.Connection.__new__(ipaccess.Connection)
    conn.sock, conn.buf = sock, bytearray()
    try:
        for i in range(total):
            raw = conn.read_line(time.monotonic() + REPLY)
            expect(raw is not None, f"closed after {i} of {total} replies")
            expect(json.loads(raw)["ok"]["reason"] == "allowed", f"reply {i}: {raw!r}")
    finally:
        sock.close()
    return f"{total} requests ({sent} bytes) written before the daemon stopped reading"


def step_too_large(client, path, case):
    conn = ipaccess.Connection(path, time.monotonic() + REPLY)
    try:
        line = b'{"cmd":"check","account":"' + b"x" * case["bytes"] + b'"}\n'
        threading.Thread(target=lambda: _ignore(conn.sock.sendall, line), daemon=True).start()
        raw = conn.read_line(time.monotonic() + REPLY)
        expect(raw is not None, "no reply to an over-long line")
        reply = json.loads(raw)
        expect(reply.get("id") is None and reply.get("error", {}).get("code") == "too_large", f"got {raw!r}")
        expect(isinstance(ipaccess.error_from(reply), ipaccess.TooLarge), "TooLarge")
        expect(_closed(conn), "the connection stays open after too_large")
    finally:
        conn.close()


def _ignore(f, *args):
    try:
        f(*args)
    except OSError:
        pass


def _closed(conn):
    try:
        return conn.read_line(time.monotonic() + REPLY) is None
    except ConnectionResetError:
        return True


def step_busy(client, path, case):
    held = []
    try:
        for n in range(1, 300):
            conn = ipaccess.Connection(path, time.monotonic() + REPLY)
            held.append(conn)
            # Over the limit, the daemon writes `busy` as soon as it accepts the connection and
            # reads nothing: the request's id 1 does not come back.
            _ignore(conn.send, b'{"id":1,"cmd":"status"}\n', time.monotonic() + REPLY)
            raw = conn.read_line(time.monotonic() + REPLY)
            expect(raw is not None, f"connection {n} closed without a reply")
            reply = json.loads(raw)
            if reply.get("id") == 1 and "ok" in reply:
                continue
            expect(reply.get("id") is None and reply["error"]["code"] == "busy", f"got {raw!r}")
            expect(reply["error"]["details"]["limit"] == case["limit"], f"got {raw!r}")
            expect(_closed(conn), "the connection stays open after busy")
            expect(isinstance(ipaccess.error_from(reply), ipaccess.Busy), "Busy")
            return f"busy at connection {n} of this uid"
        raise Failed("no connection was refused")
    finally:
        for conn in held:
            conn.close()


def step_idle(client, path, case):
    """The daemon closes an idle pooled connection; the client's next requests reconnect."""
    expect(client.check("c-acme", "198.18.0.7").allowed, "before the idle timeout")
    before = client.connects
    time.sleep(case["idle_seconds"] + 1)
    # Read-only, then mutating: either way the write fails before anything was delivered,
    # so sending again on a new connection is safe.
    expect(client.check("c-acme", "198.18.0.7").allowed, "after the idle timeout")
    expect(client.connects == before + 1, f"{client.connects - before} reconnects for the check")
    account = client.request("account_state", account="c-ban", state="banned", reason="abuse")
    expect(account["state"] == "banned", f"got {account}")
    time.sleep(case["idle_seconds"] + 1)
    account = client.request("account_state", account="c-ban", state="banned", reason="abuse")
    expect(account["state"] == "banned" and client.connects == before + 2, "a mutating request after the timeout")


def step_restart(client, path, case):
    expect(client.check("c-acme", "198.18.0.7").allowed, "before the restart")
    before = client.connects
    print("@restart kill", flush=True)
    expect(sys.stdin.readline().strip() == "killed", "the daemon was not killed")
    expect(os.path.exists(path), "the killed daemon's socket file is left behind")
    # Fail closed: with a short deadline, a check while the daemon is away raises Unavailable.
    start = time.monotonic()
    try:
        client.check("c-acme", "198.18.0.7", timeout=0.3)
        raise Failed("a check succeeded with no daemon")
    except ipaccess.Unavailable:
        pass
    expect(time.monotonic() - start < 2, "the deadline was not kept")
    print("@restart start", flush=True)
    result = client.check("c-acme", "198.18.0.7", timeout=30)
    expect(result.allowed and result.reason == "allowed", f"after the restart: {result}")
    expect(client.connects > before, "the client did not reconnect")
    # A mutating request on the new connection; state from before the restart is there.
    try:
        client.request("allow_add", account="c-acme", cidr="198.18.0.0/24")
        raise Failed("the entry added before the restart is gone")
    except ipaccess.AlreadyExists as e:
        expect(e.code == "entry_exists", str(e))
    return f"reconnected after {time.monotonic() - start:.2f}s"


STEPS = {
    "blank_line": step_blank_line,
    "pipeline": step_pipeline,
    "window": step_window,
    "too_large": step_too_large,
    "busy": step_busy,
    "idle": step_idle,
    "restart": step_restart,
}


def main():
    here = pathlib.Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--list", default=str(here.parent.parent / "tests" / "conformance.jsonl"))
    parser.add_argument("--skip", action="append", default=[], help="a step to leave out (e.g. restart)")
    args = parser.parse_args()
    cases = [json.loads(line) for line in open(args.list, encoding="utf-8") if line.strip()]
    client = ipaccess.Client(args.socket, timeout=REPLY)
    ids = iter(range(1, 1 << 62))
    passed = failed = 0
    for case in cases:
        if case.get("step") in args.skip:
            continue
        try:
            if "step" in case:
                note = STEPS[case["step"]](client, args.socket, case)
            else:
                note = run_case(client, args.socket, case, ids)
            passed += 1
            print(f"pass {case['name']}" + (f": {note}" if note else ""), flush=True)
        except (Failed, ipaccess.IpaccessError, OSError, ValueError, KeyError, TypeError) as e:
            failed += 1
            print(f"FAIL {case['name']}: {type(e).__name__}: {e}", flush=True)
    client.close()
    print(f"conformance: {passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
