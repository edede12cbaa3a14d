//! docs/protocol.md replayed against the real daemon, so the document cannot drift.
//!
//! Every fenced block tagged `jsonl` in the document is a run of request/reply line pairs.
//! The test starts a fresh daemon, sends every request as a raw line, in document order, on
//! one connection per caller (the block's `uid=N`, root without), and compares each reply
//! with the documented one as JSON. Values that cannot match are normalised on both sides:
//! numbers under keys ending in `_at` or named `time`, `first_seen` or `last_seen`, and
//! dates (`2026-11-29 08:00:00`) inside strings. The interface and pin directory of the
//! test's namespace are shown as `eth0` and `/sys/fs/bpf/ipaccess`. A block tagged
//! `jsonl shape` is compared by shape only (keys and types: counters depend on the
//! namespace's own traffic).
//!
//! Then the "Commands" section: every command the daemon names in its `bad_request` list
//! ("expected one of ...") has a table and an example; each table's arguments are exactly
//! the fields the daemon accepts, those marked required are refused as missing when left
//! out of the command's example, and every reply of an example has the shape its table's
//! `Reply:` line gives (with the objects of "Reply objects"). Every `ok` of an example, the
//! documented one and the daemon's, is also held to the Rust reply type of its command
//! (`Command::check_reply`), so the document, the daemon and `ipaccess::client` agree.
//!
//! `IPACCESS_BLESS=1 cargo test --release -p ipaccess-tests --test protocol_doc` rewrites
//! the documented replies that differ from the daemon's (and only those), so updating the
//! document is one command; read the diff and the prose around it afterwards.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipaccess::protocol::Command;
use ipaccess_tests::daemon::World;
use serde_json::{Value, json};

const CONFIG: &str = "socket_mode = 0o666\n[roles]\nsupport = { uids = [65534] }";
/// What the document shows for the test namespace's interface and pin directory.
const DOC_IFACE: &str = "eth0";
const DOC_BPFFS: &str = "/sys/fs/bpf";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol.md")
}

/// One `jsonl` block: its flags and its (request, reply, reply's line number) triples.
struct Block {
    shape: bool,
    uid: Option<u32>,
    pairs: Vec<(String, String, usize)>,
}

fn blocks(doc: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = doc.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else { continue };
        let words: Vec<&str> = info.split_whitespace().collect();
        let mut body = Vec::new();
        for (m, l) in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push((m, l.to_string()));
        }
        if words.first() != Some(&"jsonl") {
            let looks_like_one = body.first().is_some_and(|(_, l)| l.starts_with("{\"id\""));
            assert!(!looks_like_one, "line {}: an example block not tagged jsonl would not be tested", n + 1);
            continue;
        }
        assert!(body.len() % 2 == 0 && !body.is_empty(), "line {}: a jsonl block holds request/reply pairs", n + 1);
        let uid = words.iter().find_map(|w| w.strip_prefix("uid=")).map(|u| u.parse().expect("uid=N"));
        let pairs = body.chunks(2).map(|p| (p[0].1.clone(), p[1].1.clone(), p[1].0)).collect();
        out.push(Block { shape: words.contains(&"shape"), uid, pairs });
    }
    out
}

fn is_time_key(key: &str) -> bool {
    key.ends_with("_at") || ["time", "first_seen", "last_seen"].contains(&key)
}

/// Dates in text (`YYYY-MM-DD HH:MM` and optional `:SS`) replaced by `<date>`.
fn without_dates(s: &str) -> String {
    let pattern = b"dddd-dd-dd dd:dd";
    let bytes = s.as_bytes();
    let fits = |at: usize, pat: &[u8]| {
        bytes.len() >= at + pat.len()
            && pat.iter().zip(&bytes[at..]).all(|(p, b)| if *p == b'd' { b.is_ascii_digit() } else { p == b })
    };
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if fits(i, pattern) {
            i += pattern.len();
            if fits(i, b":dd") {
                i += 3;
            }
            out.push_str("<date>");
        } else {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn normalise(v: &Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), if is_time_key(k) && v.is_number() { json!("<time>") } else { normalise(v) }))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(normalise).collect()),
        Value::String(s) => Value::String(without_dates(s)),
        other => other.clone(),
    }
}

/// Same keys and types all the way down; every element of an array shaped like the
/// documented array's first.
fn same_shape(doc: &Value, real: &Value) -> bool {
    match (doc, real) {
        (Value::Object(d), Value::Object(r)) => d.keys().eq(r.keys()) && d.iter().all(|(k, dv)| same_shape(dv, &r[k])),
        (Value::Array(d), Value::Array(r)) => match d.first() {
            None => r.is_empty(),
            Some(first) => !r.is_empty() && r.iter().all(|rv| same_shape(first, rv)),
        },
        (Value::Number(_), Value::Number(_)) | (Value::String(_), Value::String(_)) => true,
        (Value::Bool(_), Value::Bool(_)) => true,
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

/// Raw request lines on one connection per uid.
struct Session {
    world: World,
    conns: BTreeMap<u32, (UnixStream, BufReader<UnixStream>)>,
}

impl Session {
    fn send(&mut self, uid: Option<u32>, line: &str) -> String {
        let socket = self.world.socket();
        let uid = uid.unwrap_or(0);
        let (writer, reader) = self.conns.entry(uid).or_insert_with(|| {
            let stream = connect_as(socket, uid);
            stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            (stream.try_clone().unwrap(), BufReader::new(stream))
        });
        writer.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut reply = String::new();
        assert!(reader.read_line(&mut reply).unwrap() > 0, "{line}: the daemon closed the connection");
        reply.trim_end().to_string()
    }

    /// A reply with the namespace's interface and pin directory as the document shows them.
    fn as_documented(&self, reply: &str) -> String {
        let bpffs = self.world.bpffs.path().to_str().unwrap().to_string();
        let iface = format!("\"{}\"", self.world.hosts.server_if);
        reply.replace(&bpffs, DOC_BPFFS).replace(&iface, &format!("\"{DOC_IFACE}\""))
    }

    /// A documented request naming the namespace's interface.
    fn as_sent(&self, request: &str) -> String {
        request.replace(&format!("\"{DOC_IFACE}\""), &format!("\"{}\"", self.world.hosts.server_if))
    }
}

/// A connection with the credentials of uid/gid `uid` (root: the test's own). Only the
/// connecting thread changes identity, and that thread then ends.
fn connect_as(socket: PathBuf, uid: u32) -> UnixStream {
    if uid == 0 {
        return UnixStream::connect(&socket).unwrap();
    }
    std::thread::spawn(move || {
        // SAFETY: raw credential syscalls on this thread only; no memory is involved.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()), 0);
            assert_eq!(libc::syscall(libc::SYS_setresgid, uid, uid, uid), 0);
            assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0);
        }
        UnixStream::connect(&socket)
    })
    .join()
    .unwrap()
    .unwrap_or_else(|e| panic!("connect as uid {uid}: {e}"))
}

/// Sleeps past the top of the hour when it is less than a minute away: activity rows are
/// counted per hour, and a session split over two hours would show more rows.
fn away_from_the_hour() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let left = 3600 - now % 3600;
    if left < 60 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

/// Sleeps to just after the start of the next second and returns that second. The
/// documented replies show the rows of several checks as made in one second (times are
/// normalised, but lists newest first are not): the replay takes some 50 ms, so started at
/// a second's start it stays within it.
fn at_the_start_of_a_second() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    std::thread::sleep(Duration::from_millis(1005) - Duration::from_nanos(u64::from(now.subsec_nanos())));
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The names in backquotes after `after` in a serde message (`expected one of `a`, `b``).
fn quoted_after(message: &str, after: &str) -> Vec<String> {
    let Some(at) = message.find(after) else { return Vec::new() };
    message[at + after.len()..].split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The lines of the section headed `## {title}`, up to the next `## ` heading.
fn section<'a>(doc: &'a str, title: &str) -> Vec<&'a str> {
    let heading = format!("## {title}");
    doc.lines().skip_while(|l| l.trim_end() != heading).skip(1).take_while(|l| !l.starts_with("## ")).collect()
}

/// The cells of a table row (`|` escaped as `\\|` stays in its cell), with the empty ones
/// before the first and after the last `|`.
fn cells(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => out.last_mut().unwrap().push(chars.next().unwrap()),
            '|' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out.iter().map(|c| c.trim().to_string()).collect()
}

/// A command's table: its arguments (name, required) and its reply shape.
#[derive(Default)]
struct Table {
    args: Vec<(String, bool)>,
    reply: Option<String>,
}

/// `### `name`` headings of the Commands section, each with its argument rows
/// (`| `arg` | type | required |`) and `Reply: `shape`` line.
fn tables(doc: &str) -> BTreeMap<String, Table> {
    let mut out: BTreeMap<String, Table> = BTreeMap::new();
    let mut current = None;
    for line in section(doc, "Commands") {
        if let Some(name) = line.strip_prefix("### ") {
            let name = name.trim().trim_matches('`').to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        let Some(name) = &current else { continue };
        let table = out.get_mut(name).unwrap();
        let cells = cells(line);
        if cells.len() >= 5 && cells[1].starts_with('`') {
            table.args.push((cells[1].trim_matches('`').to_string(), cells[3] == "required"));
        } else if let Some(reply) = line.strip_prefix("Reply: `") {
            table.reply = Some(reply.split('`').next().unwrap().to_string());
        }
    }
    out
}

/// "Reply objects": `| `Name` | `key`, `key?`, ... | notes |` (`?`: only sometimes present).
fn objects(doc: &str) -> BTreeMap<String, Vec<(String, bool)>> {
    let mut out = BTreeMap::new();
    for line in section(doc, "Reply objects") {
        let cells = cells(line);
        if cells.len() >= 5 && cells[1].starts_with('`') {
            let keys = cells[2]
                .split(',')
                .map(|k| k.trim().trim_matches('`'))
                .filter(|k| !k.is_empty())
                .map(|k| match k.strip_suffix('?') {
                    Some(k) => (k.to_string(), false),
                    None => (k.to_string(), true),
                })
                .collect();
            out.insert(cells[1].trim_matches('`').to_string(), keys);
        }
    }
    out
}

/// A reply shape: `string`, `number`, `bool`, `null`, `any`, an object's name, `[shape]`,
/// `{key: shape, key?: shape}`, and alternatives `a | b`.
#[derive(Debug)]
enum Shape {
    Named(String),
    List(Box<Shape>),
    Object(Vec<(String, bool, Shape)>),
    Either(Vec<Shape>),
}

fn parse_shape(text: &str) -> Shape {
    let tokens: Vec<String> = {
        let mut tokens = Vec::new();
        let mut word = String::new();
        for c in text.chars() {
            if c.is_alphanumeric() || c == '_' {
                word.push(c);
                continue;
            }
            if !word.is_empty() {
                tokens.push(std::mem::take(&mut word));
            }
            if !c.is_whitespace() {
                tokens.push(c.to_string());
            }
        }
        if !word.is_empty() {
            tokens.push(word);
        }
        tokens
    };
    let mut at = 0;
    let shape = parse_either(&tokens, &mut at);
    assert_eq!(at, tokens.len(), "reply shape {text:?}: trailing text");
    shape
}

fn parse_either(t: &[String], at: &mut usize) -> Shape {
    let mut alternatives = vec![parse_one(t, at)];
    while t.get(*at).is_some_and(|s| s == "|") {
        *at += 1;
        alternatives.push(parse_one(t, at));
    }
    if alternatives.len() == 1 { alternatives.pop().unwrap() } else { Shape::Either(alternatives) }
}

fn parse_one(t: &[String], at: &mut usize) -> Shape {
    let token = t.get(*at).unwrap_or_else(|| panic!("reply shape ends early: {t:?}")).clone();
    *at += 1;
    match token.as_str() {
        "[" => {
            let inner = parse_either(t, at);
            assert_eq!(t.get(*at).map(String::as_str), Some("]"), "{t:?}");
            *at += 1;
            Shape::List(Box::new(inner))
        }
        "{" => {
            let mut fields = Vec::new();
            while t.get(*at).map(String::as_str) != Some("}") {
                let key = t[*at].clone();
                *at += 1;
                let required = t[*at] != "?";
                if !required {
                    *at += 1;
                }
                assert_eq!(t[*at], ":", "{t:?}");
                *at += 1;
                fields.push((key, required, parse_either(t, at)));
                if t.get(*at).map(String::as_str) == Some(",") {
                    *at += 1;
                }
            }
            *at += 1;
            Shape::Object(fields)
        }
        _ => Shape::Named(token),
    }
}

/// Why `value` does not have `shape`, if it does not.
fn misfit(shape: &Shape, value: &Value, objects: &BTreeMap<String, Vec<(String, bool)>>) -> Option<String> {
    let keys_fit = |keys: Vec<(&str, bool)>| -> Option<String> {
        let Value::Object(map) = value else { return Some(format!("not an object: {value}")) };
        let known: BTreeSet<&str> = keys.iter().map(|k| k.0).collect();
        let extra: Vec<&String> = map.keys().filter(|k| !known.contains(k.as_str())).collect();
        let missing: Vec<&str> = keys.iter().filter(|k| k.1 && !map.contains_key(k.0)).map(|k| k.0).collect();
        let fits = extra.is_empty() && missing.is_empty();
        (!fits).then(|| format!("keys not listed {extra:?}, missing {missing:?} in {value}"))
    };
    match shape {
        Shape::Named(name) => match (name.as_str(), value) {
            ("any", _) | ("string", Value::String(_)) | ("number", Value::Number(_)) | ("bool", Value::Bool(_)) => None,
            ("null", Value::Null) | ("object", Value::Object(_)) => None,
            ("string" | "number" | "bool" | "null" | "object", _) => Some(format!("not a {name}: {value}")),
            _ => match objects.get(name) {
                None => Some(format!("{name} is not in Reply objects")),
                Some(keys) => keys_fit(keys.iter().map(|(k, r)| (k.as_str(), *r)).collect()),
            },
        },
        Shape::List(inner) => match value {
            Value::Array(items) => items.iter().find_map(|item| misfit(inner, item, objects)),
            _ => Some(format!("not a list: {value}")),
        },
        Shape::Object(fields) => keys_fit(fields.iter().map(|(k, r, _)| (k.as_str(), *r)).collect())
            .or_else(|| fields.iter().find_map(|(k, _, s)| value.get(k).and_then(|v| misfit(s, v, objects)))),
        Shape::Either(alternatives) => {
            let why: Vec<String> = alternatives.iter().filter_map(|s| misfit(s, value, objects)).collect();
            (why.len() == alternatives.len()).then(|| why.join("; or "))
        }
    }
}

/// Whether `ok` is what the request's command replies with, as the Rust types say
/// (`Command::check_reply`: it reads as the reply type and writes back as the same JSON).
fn fits_its_type(request: &str, ok: &Value) -> Result<(), String> {
    let mut request: Value =
        serde_json::from_str(request).map_err(|e| format!("answers a request that is not JSON: {e}"))?;
    request.as_object_mut().map(|r| r.remove("id"));
    let command: Command =
        serde_json::from_value(request).map_err(|e| format!("answers a request that is not a command: {e}"))?;
    command.check_reply(ok).map_err(|e| format!("does not fit the reply type of the command: {e}"))
}

#[test]
fn protocol_doc_matches_the_daemon() {
    let path = doc_path();
    let doc = std::fs::read_to_string(&path).unwrap();
    let bless = std::env::var_os("IPACCESS_BLESS").is_some_and(|v| v == "1");
    away_from_the_hour();
    let mut session = Session { world: World::new(CONFIG), conns: BTreeMap::new() };
    let mut failures = Vec::new();
    let mut blessed: BTreeMap<usize, String> = BTreeMap::new();
    // Each command's example requests with the daemon's replies to them.
    let mut examples: BTreeMap<String, Vec<(Value, Value)>> = BTreeMap::new();

    let started = at_the_start_of_a_second();
    for block in blocks(&doc) {
        for (request, documented, line) in &block.pairs {
            let sent = session.as_sent(request);
            let real_line = session.send(block.uid, &sent);
            let real_line = session.as_documented(&real_line);
            let real: Value = serde_json::from_str(&real_line).unwrap_or_else(|e| panic!("{real_line:?}: {e}"));
            let fits = match serde_json::from_str::<Value>(documented) {
                Ok(doc) if block.shape => same_shape(&doc, &real),
                Ok(doc) => normalise(&doc) == normalise(&real),
                Err(_) => false,
            };
            if !fits {
                if bless {
                    blessed.insert(*line, real_line.clone());
                } else {
                    let at = line + 1;
                    let shown = format!("line {at}: {request}\n  documented: {documented}\n  daemon:     {real_line}");
                    failures.push(shown);
                }
            }
            let documented_ok = serde_json::from_str::<Value>(documented).ok().and_then(|d| d.get("ok").cloned());
            for (whose, ok) in [("documented", documented_ok), ("daemon's", real.get("ok").cloned())] {
                if let Some(ok) = ok
                    && let Err(why) = fits_its_type(request, &ok)
                {
                    failures.push(format!("line {}: {request}\n  the {whose} reply {why}", line + 1));
                }
            }
            if let Ok(req) = serde_json::from_str::<Value>(request)
                && let Some(cmd) = req["cmd"].as_str()
            {
                examples.entry(cmd.to_string()).or_default().push((req.clone(), real));
            }
        }
    }

    let ended = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    if ended != started && !failures.is_empty() {
        failures.push(format!(
            "(the replay ran from second {started} into {ended}: rows the document shows as made in one second \
             were not, so a list newest first may differ in order)"
        ));
    }

    // The command list, from the daemon's own refusal of an unknown one.
    let fly = session.send(None, r#"{"id":"probe","cmd":"fly"}"#);
    let fly: Value = serde_json::from_str(&fly).unwrap();
    let commands = quoted_after(fly["error"]["message"].as_str().unwrap(), "expected one of");
    assert!(commands.len() > 10, "no command list in {fly}");
    let tables = tables(&doc);
    let objects = objects(&doc);
    for name in tables.keys().filter(|n| !commands.contains(n)) {
        failures.push(format!("table for `{name}`, which is not a command"));
    }
    for cmd in &commands {
        let Some(table) = tables.get(cmd) else {
            failures.push(format!("`{cmd}` has no table in ## Commands"));
            continue;
        };
        let Some(uses) = examples.get(cmd) else {
            failures.push(format!("`{cmd}` has no example"));
            continue;
        };
        // The arguments the daemon takes: serde lists them when refusing an unknown field.
        let probe = session.send(None, &json!({"id": "probe", "cmd": cmd, "zz_probe": 0}).to_string());
        let probe: Value = serde_json::from_str(&probe).unwrap();
        let message = probe["error"]["message"].as_str().unwrap_or("").to_string();
        assert!(message.contains("unknown field `zz_probe`"), "{cmd}: {probe}");
        let mut taken: Vec<String> = quoted_after(&message, "`zz_probe`");
        taken.sort();
        let mut listed: Vec<String> = table.args.iter().map(|a| a.0.clone()).collect();
        listed.sort();
        if taken != listed {
            failures.push(format!("`{cmd}`: the table lists arguments {listed:?}, the daemon takes {taken:?}"));
        }
        for (arg, _) in table.args.iter().filter(|a| a.1) {
            let Some((request, _)) = uses.iter().find(|(r, _)| r.get(arg).is_some()) else {
                failures.push(format!("`{cmd}`: no example gives the required `{arg}`"));
                continue;
            };
            let mut without = request.clone();
            without.as_object_mut().unwrap().remove(arg);
            without["id"] = json!("probe");
            let reply = session.send(None, &without.to_string());
            if !reply.contains(&format!("missing field `{arg}`")) {
                failures.push(format!("`{cmd}`: `{arg}` is marked required, but without it: {reply}"));
            }
        }
        for (request, reply) in uses {
            for key in request.as_object().unwrap().keys().filter(|k| *k != "id" && *k != "cmd") {
                if !table.args.iter().any(|a| &a.0 == key) {
                    failures.push(format!("`{cmd}`: example argument `{key}` is not in the table"));
                }
            }
            let Some(ok) = reply.get("ok") else { continue };
            match &table.reply {
                None => failures.push(format!("`{cmd}`: no Reply: line")),
                Some(shape) => {
                    if let Some(why) = misfit(&parse_shape(shape), ok, &objects) {
                        failures.push(format!("`{cmd}` reply is not `{shape}`: {why}"));
                    }
                }
            }
        }
    }

    if bless && !blessed.is_empty() {
        let mut lines: Vec<String> = doc.lines().map(str::to_string).collect();
        for (line, text) in &blessed {
            lines[*line] = text.clone();
        }
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        eprintln!("IPACCESS_BLESS: rewrote {} replies in {}", blessed.len(), path.display());
    }
    assert!(failures.is_empty(), "docs/protocol.md disagrees with the daemon:\n{}", failures.join("\n"));
}
