//! The control socket under a hostile or careless client, end to end on the real daemon:
//! one uid cannot take every connection (per-uid cap, slots kept for root and admins, idle
//! connections closed), a reload that removes a role applies to connections already open,
//! a group's role goes by the groups a client connected with, and only a command's name, as
//! a string, selects a command.
//!
//! Unprivileged clients connect from a thread that has changed its own uid (SO_PEERCRED
//! records the connecting thread's credentials). Build the binaries first:
//! `cargo build --release -p ipaccess --bins`.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ipaccess_tests::client::Client;
use ipaccess_tests::daemon::{TEST_MAPS, World};
use serde_json::{Value, json};

const NOBODY: u32 = 65534;
/// Unprivileged uids besides nobody (no passwd entry needed).
const APP_A: u32 = 65533;
const APP_B: u32 = 65532;
const ADMIN: u32 = 4242;
/// Longest wait for a reply the daemon owes.
const REPLY: Duration = Duration::from_secs(10);

/// `count` connections to `socket` with the credentials of uid/gid `id` and no supplementary
/// groups. Only the connecting thread changes identity, and that thread then ends.
fn connect_as(socket: &Path, id: u32, count: usize) -> Vec<UnixStream> {
    connect_with_groups(socket, id, &[], count)
}

/// [`connect_as`] with the supplementary groups `groups`.
fn connect_with_groups(socket: &Path, id: u32, groups: &[u32], count: usize) -> Vec<UnixStream> {
    let socket = socket.to_path_buf();
    let groups: Vec<libc::gid_t> = groups.to_vec();
    thread::spawn(move || {
        // SAFETY: raw credential syscalls on this thread only; `groups` outlives the call.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, id, id, id), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, id, id, id), 0);
        }
        let connect = |i| UnixStream::connect(&socket).unwrap_or_else(|e| panic!("connection {i} as {id}: {e}"));
        (0..count).map(connect).collect()
    })
    .join()
    .unwrap()
}

/// Sends `request` (errors ignored: a refused connection may already be closed) and reads
/// one reply line; `None` if the daemon closed the connection without one.
fn exchange(stream: &UnixStream, request: &Value) -> Option<Value> {
    stream.set_read_timeout(Some(REPLY)).unwrap();
    let _ = (&*stream).write_all(format!("{request}\n").as_bytes());
    read_reply(stream)
}

fn read_reply(stream: &UnixStream) -> Option<Value> {
    // One byte at a time, so nothing after the line is consumed.
    let mut line = Vec::new();
    let mut byte = [0u8];
    loop {
        match (&*stream).read(&mut byte) {
            Ok(0) => return None,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("reading a reply: {e}"),
        }
    }
    Some(serde_json::from_slice(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}")))
}

/// Served: a reply to this request (ok, or an error other than `busy`).
fn served(reply: &Option<Value>, id: u64) -> bool {
    reply.as_ref().is_some_and(|r| r["id"] == id && r["error"]["code"] != "busy")
}

/// Refused as `busy` for `limit`, with the structured error, and then closed at once.
fn assert_busy(stream: &UnixStream, reply: &Option<Value>, limit: &str) {
    let reply = reply.as_ref().expect("a refused connection gets a reply before it is closed");
    assert_eq!(reply["error"]["code"], "busy", "{reply}");
    assert_eq!(reply["id"], Value::Null, "{reply}");
    assert_eq!(reply["error"]["details"]["limit"], limit, "{reply}");
    assert!(!reply["error"]["message"].as_str().unwrap_or_default().is_empty(), "{reply}");
    // EOF, or a reset when the daemon closed it without reading the request sent.
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let read = (&*stream).read(&mut [0u8; 16]);
    let closed = matches!(&read, Ok(0)) || matches!(&read, Err(e) if e.kind() == ErrorKind::ConnectionReset);
    assert!(closed, "a refused connection stays open: {read:?}");
}

fn status(id: u64) -> Value {
    json!({"id": id, "cmd": "status"})
}

/// 256 idle connections from one uid: it gets the per-uid cap, no more, and root, an admin
/// and another application are still served while it holds them. Today's main gives the
/// flood every slot and everyone else `busy`.
#[test]
fn one_uid_cannot_take_the_socket() {
    let w = World::new(&format!(
        "socket_mode = 0o666\n[roles]\ncheck = {{ uids = [{NOBODY}, {APP_A}] }}\nadmin = {{ uids = [{ADMIN}] }}"
    ));
    let flood = connect_as(&w.socket(), NOBODY, 256);
    let replies: Vec<Option<Value>> = flood.iter().enumerate().map(|(i, s)| exchange(s, &status(i as u64))).collect();
    let held: Vec<usize> = (0..flood.len()).filter(|&i| served(&replies[i], i as u64)).collect();
    assert_eq!(held.len(), 64, "served connections of one uid (default limits.max_connections_per_uid)");
    for i in (0..flood.len()).filter(|i| !held.contains(i)) {
        assert_busy(&flood[i], &replies[i], "limits.max_connections_per_uid");
    }
    // The 64 held connections are idle now; everyone else still gets in.
    let root = UnixStream::connect(w.socket()).unwrap();
    assert!(exchange(&root, &status(1)).is_some_and(|r| r["ok"].is_object()), "root is not served");
    let admin = connect_as(&w.socket(), ADMIN, 1).remove(0);
    let added = exchange(&admin, &json!({"id": 2, "cmd": "account_add", "account": "cust"}));
    assert!(added.as_ref().is_some_and(|r| r["id"] == 2 && r.get("error").is_none()), "admin not served: {added:?}");
    let app = connect_as(&w.socket(), APP_A, 1).remove(0);
    let checked = exchange(&app, &json!({"id": 3, "cmd": "check", "account": "cust", "addr": "198.18.0.10"}));
    assert!(checked.as_ref().is_some_and(|r| r["ok"]["allowed"].is_boolean()), "another uid not served: {checked:?}");
    // The held connections still work.
    assert!(served(&exchange(&flood[held[0]], &status(9)), 9));
}

/// When callers without the admin role hold every shared slot, root and admins still get
/// the reserved ones; a third application is told `busy` until a shared slot is free.
#[test]
fn reserved_slots_keep_room_for_root_and_admins() {
    let w = World::new(&format!(
        "socket_mode = 0o666\n[roles]\ncheck = {{ uids = [{NOBODY}, {APP_A}, {APP_B}] }}\n\
         admin = {{ uids = [{ADMIN}] }}\n\
         [limits]\nmax_connections = 12\nmax_connections_per_uid = 4\nreserved_admin_connections = 4"
    ));
    let mut held = connect_as(&w.socket(), NOBODY, 4);
    held.extend(connect_as(&w.socket(), APP_A, 4));
    for (i, stream) in held.iter().enumerate() {
        assert!(served(&exchange(stream, &status(i as u64)), i as u64), "connection {i} of the 8 shared ones");
    }
    let late = connect_as(&w.socket(), APP_B, 1).remove(0);
    let reply = exchange(&late, &status(1));
    assert_busy(&late, &reply, "limits.max_connections");
    assert_eq!(reply.as_ref().unwrap()["error"]["details"]["max"], 8, "{reply:?}");
    let root = UnixStream::connect(w.socket()).unwrap();
    assert!(served(&exchange(&root, &status(2)), 2), "root is refused while only the shared slots are full");
    let admins = connect_as(&w.socket(), ADMIN, 3);
    for (i, admin) in admins.iter().enumerate() {
        assert!(served(&exchange(admin, &status(3 + i as u64)), 3 + i as u64), "admin connection {i}");
    }
    // 8 shared + root + 3 admins = 12: now even an admin is told busy.
    let over = connect_as(&w.socket(), ADMIN, 1).remove(0);
    let reply = exchange(&over, &status(7));
    assert_busy(&over, &reply, "limits.max_connections");
    // Slots are given back when connections close: with root and the admins gone the shared
    // slots are still full, and one more closed lets the late application in.
    drop((root, admins, over));
    let refused = connect_as(&w.socket(), APP_B, 1).remove(0);
    let reply = exchange(&refused, &status(8));
    assert_busy(&refused, &reply, "limits.max_connections");
    drop(held.pop());
    let deadline = Instant::now() + REPLY;
    loop {
        let again = connect_as(&w.socket(), APP_B, 1).remove(0);
        if served(&exchange(&again, &status(9)), 9) {
            break;
        }
        assert!(Instant::now() < deadline, "a closed connection's slot is not given back");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A connection with no complete request for `idle_timeout_seconds` is closed (a silent one
/// and one that sent half a line), its slot is given back, and a connection in use is not.
#[test]
fn idle_connections_are_closed() {
    let w = World::new(&format!(
        "socket_mode = 0o666\n[roles]\ncheck = {{ uids = [{NOBODY}] }}\n[limits]\nidle_timeout_seconds = 2\n\
         max_connections_per_uid = 3"
    ));
    let conns = connect_as(&w.socket(), NOBODY, 3);
    let (silent, partial, busy) = (&conns[0], &conns[1], &conns[2]);
    assert!(served(&exchange(silent, &status(1)), 1));
    (&*partial).write_all(br#"{"id": 2, "cmd": "sta"#).unwrap();
    let start = Instant::now();
    // The busy connection sends a request every half second, for longer than the timeout.
    for i in 0..10 {
        let reply = exchange(busy, &status(10 + i));
        assert!(served(&reply, 10 + i), "a connection in use was closed after {:?}: {reply:?}", start.elapsed());
        thread::sleep(Duration::from_millis(500));
    }
    for (name, stream) in [("silent", silent), ("half a line", partial)] {
        stream.set_read_timeout(Some(REPLY)).unwrap();
        let mut byte = [0u8];
        let read = (&*stream).read(&mut byte);
        assert!(matches!(read, Ok(0)), "the {name} connection is still open after {:?}: {read:?}", start.elapsed());
    }
    // Two slots of nobody's three were given back.
    let again = connect_as(&w.socket(), NOBODY, 2);
    for (i, stream) in again.iter().enumerate() {
        assert!(served(&exchange(stream, &status(30 + i as u64)), 30 + i as u64), "slot {i} not given back");
    }
}

/// Waits (bounded) until the daemon's log has `n` lines containing `what`.
fn wait_log(w: &World, what: &str, n: usize) {
    let deadline = Instant::now() + REPLY;
    let daemon = w.daemon.as_ref().unwrap();
    while daemon.log_text().matches(what).count() < n {
        assert!(Instant::now() < deadline, "no {what:?} in the log:\n{}", daemon.log_text());
        thread::sleep(Duration::from_millis(50));
    }
}

/// A uid with no role is refused as it connects (`forbidden`, naming it, then closed) and
/// takes no slot: callers who could run nothing cannot hold the connections the
/// applications' login checks need, however many they open.
#[test]
fn a_caller_without_a_role_takes_no_slot() {
    let w = World::new(&format!(
        "socket_mode = 0o666\n[roles]\ncheck = {{ uids = [{APP_A}] }}\n\
         [limits]\nmax_connections = 12\nmax_connections_per_uid = 4\nreserved_admin_connections = 4"
    ));
    let mut refused = connect_as(&w.socket(), NOBODY, 10);
    refused.extend(connect_as(&w.socket(), APP_B, 10));
    for (i, stream) in refused.iter().enumerate() {
        let reply = exchange(stream, &status(i as u64)).expect("a refused connection gets a reply");
        assert_eq!((&reply["id"], &reply["error"]["code"]), (&Value::Null, &json!("forbidden")), "{reply}");
        let uid = if i < 10 { NOBODY } else { APP_B };
        assert!(reply["error"]["message"].as_str().unwrap().contains(&uid.to_string()), "{reply}");
        assert!(read_reply(stream).is_none(), "connection {i} is left open");
    }
    let apps = connect_as(&w.socket(), APP_A, 4);
    for (i, app) in apps.iter().enumerate() {
        assert!(served(&exchange(app, &status(i as u64)), i as u64), "the application's connection {i}");
    }
}

/// Roles come from the configuration in force at each request: after a reload that takes
/// the admin role away, the admin's connection opened before it is refused, and a reload
/// that gives it back lets the same connection in again.
#[test]
fn a_reload_that_removes_a_role_applies_to_open_connections() {
    let with_admin = format!("socket_mode = 0o666\n[roles]\nadmin = {{ uids = [{ADMIN}] }}");
    let w = World::new(&with_admin);
    let conn = connect_as(&w.socket(), ADMIN, 1).remove(0);
    let add = |id: u64, account: &str| exchange(&conn, &json!({"id": id, "cmd": "account_add", "account": account}));
    let added = add(1, "before");
    assert!(added.as_ref().is_some_and(|r| r.get("ok").is_some()), "{added:?}");

    let reload_to = |config: &str, n: usize| {
        fs::write(w.dir.0.join("ipaccessd.toml"), format!("{config}\n{TEST_MAPS}")).unwrap();
        w.daemon.as_ref().unwrap().signal(libc::SIGHUP);
        wait_log(&w, "configuration reloaded", n);
    };
    reload_to("socket_mode = 0o666", 1);
    let refused = add(2, "after").expect("a reply");
    assert_eq!(refused["error"]["code"], "forbidden", "the open connection kept the removed role: {refused}");
    assert_eq!(refused["id"], 2);
    let status = exchange(&conn, &status(3)).expect("a reply");
    assert_eq!(status["error"]["code"], "forbidden", "a uid with no role left may still read: {status}");

    reload_to(&with_admin, 2);
    let added = add(4, "again");
    assert!(added.as_ref().is_some_and(|r| r.get("ok").is_some()), "{added:?}");
}

/// A role given to a group is judged by the supplementary groups the client held when it
/// connected, not by those of whatever process has its pid when the connection is served
/// (a pid is reused once its process ends, perhaps by another user's). Here the connecting
/// thread's groups differ from its process's, which hold no role's group, as a process that
/// took over the pid would: the client is an admin, and one without the group is not.
#[test]
fn a_group_role_is_judged_by_the_groups_the_client_connected_with() {
    const STAFF: u32 = 4343;
    let w = World::new(&format!("socket_mode = 0o666\n[roles]\nadmin = {{ gids = [{STAFF}] }}"));
    let add = |conn: &UnixStream, account: &str| {
        exchange(conn, &json!({"id": 1, "cmd": "account_add", "account": account})).expect("a reply")
    };
    let staff = connect_with_groups(&w.socket(), APP_A, &[NOBODY, STAFF], 1).remove(0);
    let added = add(&staff, "by-group");
    assert!(added.get("ok").is_some(), "the group the client connected with gave no role: {added}");
    let outsider = connect_as(&w.socket(), APP_B, 1).remove(0);
    let refused = add(&outsider, "by-nobody");
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    assert_eq!(w.ok(json!({"cmd": "account_list"})).as_array().map(Vec::len), Some(1));
}

/// `cmd` names a command with a string and nothing else: serde would take `"cmd": 5` as the
/// sixth command (today `allow_add`). Each bad tag is refused with a structured
/// `bad_request` that echoes the id, changes nothing, and leaves the connection usable.
#[test]
fn only_a_command_name_selects_a_command() {
    let w = World::new("");
    let conn = UnixStream::connect(w.socket()).unwrap();
    let ok = |request: Value| {
        let reply = exchange(&conn, &request).expect("a reply");
        assert!(reply.get("error").is_none(), "{request} -> {reply}");
        reply["ok"].clone()
    };
    ok(json!({"id": 0, "cmd": "account_add", "account": "tagtest"}));
    let args = r#""account": "tagtest", "cidr": "198.18.5.0/24""#;
    let tags = [
        "5",
        "0",
        "1",
        "22",
        "-1",
        "18446744073709551615",
        "5.0",
        "5e0",
        "-0.5",
        "true",
        "false",
        "null",
        "[5]",
        r#"["allow_add"]"#,
        r#"{"allow_add": {}}"#,
        "{}",
        r#""5""#,
        r#""""#,
        r#""ALLOW_ADD""#,
        r#""allow-add""#,
        r#""allow_add ""#,
        r#""AllowAdd""#,
    ];
    for (i, tag) in tags.iter().enumerate() {
        let line = format!(r#"{{"id": {i}, "cmd": {tag}, {args}}}"#);
        (&conn).write_all(format!("{line}\n").as_bytes()).unwrap();
        let reply = read_reply(&conn).unwrap_or_else(|| panic!("{line}: connection closed"));
        assert_eq!(reply["error"]["code"], "bad_request", "{line} -> {reply}");
        assert_eq!(reply["id"], i, "{line} -> {reply}");
        assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{line} -> {reply}");
    }
    // A repeated field is refused too: which of the two would count?
    for (i, line) in [
        r#"{"id": 100, "cmd": "status", "cmd": "allow_add", "account": "tagtest", "cidr": "198.18.5.0/24"}"#,
        r#"{"id": 101, "cmd": "allow_add", "account": "tagtest", "cidr": "198.18.5.0/24", "cidr": "198.18.6.0/24"}"#,
    ]
    .iter()
    .enumerate()
    {
        (&conn).write_all(format!("{line}\n").as_bytes()).unwrap();
        let reply = read_reply(&conn).expect("a reply");
        assert_eq!(reply["error"]["code"], "bad_request", "{line} -> {reply}");
        assert_eq!(reply["id"], 100 + i, "{line} -> {reply}");
        assert!(reply["error"]["message"].as_str().unwrap().contains("more than once"), "{line} -> {reply}");
    }
    // Not JSON, or not an object: bad_json, as before.
    for line in ["{\"cmd\": ", "[1, 2]", "5"] {
        (&conn).write_all(format!("{line}\n").as_bytes()).unwrap();
        let reply = read_reply(&conn).expect("a reply");
        assert_eq!(reply["error"]["code"], "bad_json", "{line} -> {reply}");
    }
    let listed = ok(json!({"id": 200, "cmd": "allow_list", "account": "tagtest"}));
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "a bad tag changed the allowlist: {listed}");
    // The same request with the command's name is accepted: the refusals are about the tag.
    ok(json!({"id": 201, "cmd": "allow_add", "account": "tagtest", "cidr": "198.18.5.0/24"}));
    assert_eq!(ok(json!({"id": 202, "cmd": "allow_list", "account": "tagtest"})).as_array().map(Vec::len), Some(1));
}
