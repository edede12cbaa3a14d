//! ipaccessctl: the command-line client of ipaccessd's control socket.
//!
//! One request line out, one reply line back (see `ipaccess::protocol`). Exit status: 0 on
//! success, 2 on any error; `check` exits 1 when the login is denied.
//!
//! [`args`] turns the command line into a request, [`transport`] sends it and reads the reply
//! as the request's reply type, [`render`] shows that for a person; `--json` prints the
//! reply's `ok` exactly as the daemon sent it. [`import`] is the one command that is many
//! requests.

mod args;
mod import;
mod render;
mod transport;

use std::ffi::OsString;
use std::io::{ErrorKind, Write};
use std::path::Path;

use clap::{CommandFactory, Parser};
use ipaccess::protocol::{Call, CheckResult, Command};

use args::{Action, Cli};
use render::{ActivityShown, Asked, Bound, Render, error_text, escape_message};
use transport::Failure;

/// What to print on stdout, and the exit status.
struct Shown {
    text: String,
    status: i32,
}

/// A reply rendered for a person, exit status 0.
fn plain<R: Render>(reply: &R, out: &mut String) -> i32 {
    reply.render(out);
    0
}

/// Sends `request`; its reply for a person by `human` (which also gives the exit status), or
/// with `--json` the `ok` value as it came.
fn answer<C: Call>(
    socket: &Path,
    request: C,
    json: bool,
    human: impl FnOnce(&C::Reply, &mut String) -> i32,
) -> Result<Shown, Failure> {
    let typed = transport::call(socket, request)?;
    let mut text = String::new();
    let status = human(&typed.reply, &mut text);
    if json {
        text = format!("{}\n", typed.raw.get());
    }
    Ok(Shown { text, status })
}

/// The daemon's error about entry N of a request made from a file (`entry N: ...`),
/// reworded to name the file's line, which is what a person fixes.
fn at_file_line(failure: Failure, lines: &[usize]) -> Failure {
    let Failure::Daemon(error) = failure else { return failure };
    let entry = error.message.strip_prefix("entry ").and_then(|rest| rest.split_once(": "));
    let place = entry.and_then(|(n, rest)| {
        let n: usize = n.parse().ok()?;
        Some((*lines.get(n.checked_sub(1)?)?, n, rest.to_owned()))
    });
    match place {
        Some((line, n, rest)) => Failure::Daemon(error.with_message(format!("line {line} (entry {n}): {rest}"))),
        None => Failure::Daemon(error),
    }
}

fn send(socket: &Path, command: Command, json: bool) -> Result<Shown, Failure> {
    match command {
        Command::AccountAdd(r) => answer(socket, r, json, plain),
        Command::AccountShow(r) => answer(socket, r, json, plain),
        Command::AccountRemove(r) => answer(socket, r, json, plain),
        Command::AccountList(r) => answer(socket, r, json, plain),
        Command::AccountState(r) => answer(socket, r, json, plain),
        Command::AccountMode(r) => answer(socket, r, json, plain),
        Command::AllowAdd(r) => answer(socket, r, json, plain),
        Command::AllowRemove(r) => answer(socket, r, json, plain),
        Command::AllowList(r) => answer(socket, r, json, plain),
        Command::AllowDisable(r) => answer(socket, r, json, plain),
        Command::AllowEnable(r) => answer(socket, r, json, plain),
        Command::AllowLabel(r) => answer(socket, r, json, plain),
        Command::AllowExpiry(r) => answer(socket, r, json, plain),
        Command::AllowReplace(r) => answer(socket, r, json, plain),
        Command::BindAdd(r) => answer(socket, r, json, |binding, out| plain(&Bound(binding), out)),
        Command::BindRemove(r) => answer(socket, r, json, plain),
        Command::BindList(r) => answer(socket, r, json, plain),
        // Checks answer through the exit status too, for scripts.
        Command::Check(r) => answer(socket, r, json, |result: &CheckResult, out| {
            result.render(out);
            if result.allowed { 0 } else { 1 }
        }),
        Command::OverrideGrant(r) => answer(socket, r, json, plain),
        Command::OverrideRevoke(r) => answer(socket, r, json, plain),
        Command::OverrideList(r) => answer(socket, r, json, plain),
        Command::Activity(r) => {
            let asked = Asked { summary: r.summary, unknown_accounts: r.unknown_accounts };
            answer(socket, r, json, move |report, out| plain(&ActivityShown(report, asked), out))
        }
        Command::Stats(r) => answer(socket, r, json, plain),
        Command::Import(r) => answer(socket, r, json, plain),
        Command::Detach(r) => answer(socket, r, json, plain),
        Command::Status(r) => answer(socket, r, json, plain),
        Command::ClusterImport(r) => answer(socket, r, json, plain),
        Command::SetAdd(r) => answer(socket, r, json, plain),
        Command::SetRemove(r) => answer(socket, r, json, plain),
        Command::SetDelete(r) => answer(socket, r, json, plain),
        Command::SetList(r) => answer(socket, r, json, plain),
        Command::SetShow(r) => answer(socket, r, json, plain),
        Command::AllowAddSet(r) => answer(socket, r, json, plain),
        Command::AllowRemoveSet(r) => answer(socket, r, json, plain),
        Command::AllowDisableSet(r) => answer(socket, r, json, plain),
        Command::AllowEnableSet(r) => answer(socket, r, json, plain),
    }
}

/// Parses `args`, runs the command and writes its output to `out` and its errors to `err`;
/// returns the exit status.
fn run<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        // Usage errors exit 2, --help and --version 0.
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return e.exit_code();
        }
        // The message quotes the argument as it was given, which may carry a terminal's
        // escapes (a customer's "address" passed on by a script): each line is escaped.
        Err(e) => {
            let text = e.render().to_string();
            let _ = write!(err, "{}", text.lines().map(|l| escape_message(l) + "\n").collect::<String>());
            return e.exit_code();
        }
    };
    let result = match args::action(cli.command) {
        Err(message) => Err(Failure::Local(message)),
        Ok(Action::Send(command)) => send(&cli.socket, command, cli.json),
        Ok(Action::SendFromFile { command, lines }) => {
            send(&cli.socket, command, cli.json).map_err(|e| at_file_line(e, &lines))
        }
        Ok(Action::Import { file, batch_bytes, force }) => {
            import::import(&cli.socket, &file, batch_bytes, force).map(|totals| {
                // Totals this client added up: there is no reply to pass on as it came.
                let text = if cli.json {
                    serde_json::to_string(&totals).expect("totals serialize") + "\n"
                } else {
                    let mut text = String::new();
                    totals.render(&mut text);
                    text
                };
                Shown { text, status: 0 }
            })
        }
    };
    let Shown { text, mut status } = match result {
        Ok(shown) => shown,
        Err(Failure::Daemon(e)) => {
            let _ = write!(err, "{}", error_text(&e));
            let text = if cli.json { format!("{}\n", e.raw) } else { String::new() };
            Shown { text, status: 2 }
        }
        Err(Failure::Unreadable { raw, error }) => {
            // A daemon older or newer than this client: say so, never guess (a check's verdict
            // least of all); `--json` still passes on what came.
            let _ = writeln!(
                err,
                "error: the daemon's reply does not read as this command's result (is ipaccessd older or newer \
                 than ipaccessctl?): {}",
                escape_message(&error)
            );
            let text = if cli.json { format!("{}\n", raw.get()) } else { String::new() };
            Shown { text, status: 2 }
        }
        Err(Failure::Local(message)) => {
            let _ = writeln!(err, "error: {}", escape_message(&message));
            return 2;
        }
        Err(Failure::Unanswered(message)) => {
            let _ = writeln!(err, "error: {} (the request may have been applied)", escape_message(&message));
            return 2;
        }
    };
    if let Some(seconds) = cli.wait_fleet.filter(|_| status == 0) {
        match wait_fleet(&cli.socket, std::time::Duration::from_secs(seconds)) {
            Ok(line) => {
                let _ = writeln!(err, "{line}");
            }
            Err(message) => {
                let _ = writeln!(err, "error: {}", escape_message(&message));
                status = 3;
            }
        }
    }
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `ipaccessctl account list | head` is not an error.
        Err(e) if e.kind() != ErrorKind::BrokenPipe => {
            let _ = writeln!(err, "error: cannot write output: {e}");
            2
        }
        _ => status,
    }
}

/// Waits until every live node of the fleet has applied what the node behind `socket` has
/// applied now (the change just made, and anything before it).
fn wait_fleet(socket: &Path, within: std::time::Duration) -> Result<String, String> {
    let status = |socket: &Path| match transport::call(socket, ipaccess::protocol::Status {}) {
        Ok(typed) => typed.reply.cluster.ok_or_else(|| "--wait-fleet: this daemon is not a fleet node".to_owned()),
        Err(Failure::Daemon(e)) => Err(format!("--wait-fleet: {}", e.message)),
        Err(Failure::Unreadable { error, .. }) => Err(format!("--wait-fleet: unreadable status: {error}")),
        Err(Failure::Local(message) | Failure::Unanswered(message)) => Err(format!("--wait-fleet: {message}")),
    };
    // A node whose policy revision is at least this one has every change up to it.
    let target = status(socket)?.policy_revision;
    let deadline = std::time::Instant::now() + within;
    loop {
        let cluster = status(socket)?;
        let behind: Vec<String> =
            cluster.nodes.iter().filter(|n| n.policy_revision < target).map(|n| n.node.clone()).collect();
        if behind.is_empty() && !cluster.nodes.is_empty() {
            return Ok(format!("in force on {} live nodes (revision {target})", cluster.nodes.len()));
        }
        if std::time::Instant::now() >= deadline {
            return Err(if cluster.nodes.is_empty() {
                format!(
                    "the fleet's nodes could not be read within {within:?} ({})",
                    cluster.last_error.unwrap_or_default()
                )
            } else {
                let verb = if behind.len() == 1 { "has" } else { "have" };
                format!("after {within:?}, {} {verb} not applied revision {target}", behind.join(", "))
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn main() {
    if let Some(status) = ipaccess::docs::generate_if_requested(Cli::command, "ipaccessctl") {
        std::process::exit(status);
    }
    std::process::exit(run(std::env::args_os(), &mut std::io::stdout().lock(), &mut std::io::stderr()));
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    /// Runs the client against a fake daemon that answers `connections` requests, each with
    /// the line `reply` makes of it (the request as sent, id included; an empty one closes
    /// the connection without a reply); returns (requests, status, stdout, stderr).
    pub(crate) fn against_lines(
        args: &[&str],
        connections: usize,
        mut reply: impl FnMut(&Value) -> String + Send + 'static,
    ) -> (Vec<Value>, i32, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipaccessd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for _ in 0..connections {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let request: Value = serde_json::from_str(&line).unwrap();
                let answer = reply(&request);
                if !answer.is_empty() {
                    (&stream).write_all(format!("{answer}\n").as_bytes()).unwrap();
                }
                requests.push(request);
            }
            requests
        });
        let mut argv = vec!["ipaccessctl", "--socket", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = run(argv, &mut out, &mut err);
        let requests = server.join().unwrap();
        (requests, status, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    /// [`against_lines`] with replies made as JSON values, the request's id put in; the
    /// requests without their ids.
    pub(crate) fn against_each(
        args: &[&str],
        connections: usize,
        mut reply: impl FnMut(&Value) -> Value + Send + 'static,
    ) -> (Vec<Value>, i32, String, String) {
        let (requests, status, out, err) = against_lines(args, connections, move |request| {
            let mut request = request.clone();
            let id = request.as_object_mut().unwrap().remove("id").unwrap();
            let mut answer = reply(&request);
            answer["id"] = id;
            answer.to_string()
        });
        let requests = requests
            .into_iter()
            .map(|mut r| {
                r.as_object_mut().unwrap().remove("id");
                r
            })
            .collect();
        (requests, status, out, err)
    }

    /// One request: (request sent, status, stdout, stderr).
    pub(crate) fn against_all(
        args: &[&str],
        reply: impl FnOnce(&Value) -> Value + Send + 'static,
    ) -> (Value, i32, String, String) {
        let mut reply = Some(reply);
        let (mut requests, status, out, err) = against_each(args, 1, move |r| reply.take().expect("one request")(r));
        (requests.remove(0), status, out, err)
    }

    #[test]
    fn account_add_end_to_end() {
        let (request, status, out, err) = against_all(&["account", "add", "acme", "--unconfirmed"], |_| {
            json!({"ok": {"id": "acme", "slot": 1, "parent": null, "state": "unconfirmed", "mode": "off",
                          "state_reason": null, "created_at": 951_782_400}})
        });
        assert_eq!(request, json!({"cmd": "account_add", "account": "acme", "unconfirmed": true}));
        assert_eq!((status, err.as_str()), (0, ""));
        assert_eq!(
            out,
            "id: acme\nparent: -\nstate: unconfirmed\nstate_reason: -\nmode: off\nslot: 1\n\
             created_at: 2000-02-29 00:00:00\n"
        );
    }

    #[test]
    fn check_denied_exits_1_and_errors_exit_2() {
        let denied = json!({"ok": {"allowed": false, "reason": "address_not_allowed", "hint": "Add 192.0.2.9.",
                                   "detail": ""}});
        let sent = denied.clone();
        let (request, status, out, _) = against_all(&["check", "acme", "192.0.2.9", "--method", "api_key"], |_| sent);
        assert_eq!(
            request,
            json!({"cmd": "check", "account": "acme", "addr": "192.0.2.9", "method": "api_key", "dry_run": false})
        );
        assert_eq!((status, out.as_str()), (1, "denied (address_not_allowed): Add 192.0.2.9.\n"));
        // --json: the same exit status, the result as it came.
        let (_, status, out, _) = against_all(&["--json", "check", "acme", "192.0.2.9"], |_| denied);
        assert_eq!(
            (status, serde_json::from_str::<Value>(&out).unwrap()["reason"].clone()),
            (1, json!("address_not_allowed"))
        );
        let allowed = json!({"ok": {"allowed": true, "reason": "allowed", "hint": "", "detail": "entry 192.0.2.0/24"}});
        let (_, status, out, _) = against_all(&["check", "acme", "192.0.2.9"], |_| allowed);
        assert_eq!((status, out.as_str()), (0, "allowed (allowed)\ndetail: entry 192.0.2.0/24\n"));

        let (_, status, out, err) = against_all(
            &["--json", "account", "show", "nobody"],
            |_| json!({"error": {"code": "unknown_account", "message": "no account nobody"}}),
        );
        assert_eq!(status, 2);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], "unknown_account");
        assert_eq!(err, "error: no account nobody (unknown_account)\n");
        let mut err = Vec::new();
        let argv = ["ipaccessctl", "--socket", "/nonexistent/ipaccessd.sock", "status"];
        assert_eq!(run(argv, &mut Vec::new(), &mut err), 2);
        assert!(String::from_utf8(err).unwrap().contains("cannot connect to /nonexistent/ipaccessd.sock"));
    }

    #[test]
    fn json_is_the_reply_exactly_as_it_came() {
        // Spacing, key order, a key this client does not know and a number no u64 holds: all
        // kept, because the reply is passed on, not read and written again.
        let ok = r#"{ "removed":["acme-dev" ,"acme"], "zz_new": 123456789012345678901234567890, "notes": [] }"#;
        let (_, status, out, err) =
            against_lines(&["--json", "account", "remove", "acme", "--recursive"], 1, move |r| {
                format!(r#"{{"id": {}, "ok": {ok}}}"#, r["id"])
            });
        assert_eq!((status, err.as_str()), (0, ""));
        assert_eq!(out, format!("{ok}\n"));
    }

    #[test]
    fn a_reply_of_another_shape_is_an_error_never_a_guess() {
        let args = ["allow", "list", "acme"];
        let hostile = json!({"ok": [{"cidr": "198.18.0.0/24", "label": 7, "created_at": "\x1b[2J"}]});
        let sent = hostile.clone();
        let (_, status, out, err) = against_all(&args, move |_| sent);
        assert_eq!((status, out.as_str()), (2, ""));
        assert!(err.starts_with("error: the daemon's reply does not read as this command's result"), "{err}");
        assert!(!err.contains('\x1b') && err.lines().count() == 1, "{err}");
        // --json passes on what came, and still says it is not what was expected.
        let (_, status, out, err) = against_all(&[&["--json"][..], &args].concat(), move |_| hostile.clone());
        assert_eq!(status, 2);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!([{"cidr": "198.18.0.0/24", "label": 7,
                                                                           "created_at": "\x1b[2J"}])
        );
        assert!(err.starts_with("error: the daemon's reply does not read"), "{err}");
        // A check whose verdict is not a boolean is an error, never a pass.
        let (_, status, out, _) = against_all(
            &["check", "a", "198.18.0.1"],
            |_| json!({"ok": {"allowed": "true", "reason": "allowed", "hint": "", "detail": ""}}),
        );
        assert_eq!((status, out.as_str()), (2, ""));
        // No `ok` at all; and replies that are not even of the right kind, for every command.
        for reply in
            [json!({}), json!({"ok": null}), json!({"ok": "text"}), json!({"ok": {"weird": [1, {"k": "v\n"}]}})]
        {
            for args in [
                &["account", "list"][..],
                &["account", "show", "a"],
                &["status"],
                &["bind", "list"],
                &["bind", "add", "a", "198.18.0.1"],
                &["stats"],
                &["override", "grant", "a", "198.18.0.1", "--ttl", "1h", "--ticket", "T", "--reason", "r"],
                &["override", "list"],
                &["allow", "list", "a"],
                &["activity", "a"],
                &["detach", "eth0"],
            ] {
                let sent = reply.clone();
                let (_, status, out, err) = against_all(args, move |_| sent);
                assert_eq!((status, out.as_str()), (2, ""), "{args:?} {reply}");
                assert!(err.starts_with("error: ") && !err.contains("v\n"), "{args:?}: {err}");
            }
        }
    }

    #[test]
    fn a_request_sent_and_never_answered_may_have_been_applied() {
        let (_, status, _, err) = against_lines(&["allow", "add", "acme", "198.18.0.1"], 1, |_| String::new());
        assert_eq!(status, 2);
        assert!(err.ends_with("closed the connection without replying (the request may have been applied)\n"), "{err}");
    }

    #[test]
    fn a_message_quoting_a_value_shows_its_escapes_once() {
        // As the daemon words it: the value quoted with its escapes (Rust's `{:?}`).
        let message = format!("{:?} is not a CIDR (198.18.0.0/24, fd00::/48) or an address", "a\"b\u{1b}[2J\\");
        let (_, status, _, err) = against_all(
            &["allow", "add", "acme", "198.18.0.1"],
            move |_| json!({"error": {"code": "bad_request", "message": message}}),
        );
        assert_eq!(status, 2);
        assert_eq!(
            err,
            "error: \"a\\\"b\\u{1b}[2J\\\\\" is not a CIDR (198.18.0.0/24, fd00::/48) or an address (bad_request)\n"
        );
        // A raw control character or bidi control in a message is still escaped.
        let (_, _, _, err) =
            against_all(&["status"], |_| json!({"error": {"code": "internal", "message": "x\u{1b}[2J\u{202e}\ny"}}));
        assert_eq!(err, "error: x\\x1b[2J\\u{202e}\\ny (internal)\n");
    }

    #[test]
    fn an_argument_clap_refuses_reaches_the_terminal_escaped() {
        for args in [
            ["ipaccessctl", "check", "acme", "198.18.0.1\x1b[2J\x1b]0;pwned\x07\u{202e}"],
            ["ipaccessctl", "activity", "acme", "--since=1d\x1b[2J\r\x07"],
        ] {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let status = run(args, &mut out, &mut err);
            let err = String::from_utf8(err).unwrap();
            assert_eq!(status, 2, "{err}");
            assert!(out.is_empty());
            assert!(err.starts_with("error: "), "{err}");
            assert!(!err.contains(['\x1b', '\x07', '\r', '\u{202e}']), "{args:?}: {err:?}");
        }
        // Help is not an error, and goes out as clap writes it.
        assert_eq!(run(["ipaccessctl", "--version"], &mut Vec::new(), &mut Vec::new()), 0);
    }

    #[test]
    fn refusals_show_their_details_after_the_message() {
        let (_, status, out, err) = against_all(&["account", "mode", "acme", "enforce"], |_| {
            json!({"error": {"code": "lockout", "message": "would shut out 198.18.0.9\u{202e}; repeat with --force",
                             "details": {"shut_out": [{"address": "198.18.0.9", "last_seen": 951_782_400}]}}})
        });
        assert_eq!((status, out.as_str()), (2, ""));
        assert_eq!(
            err,
            "error: would shut out 198.18.0.9\\u{202e}; repeat with --force (lockout)\n\
             \x20 ADDRESS     LAST SEEN\n\
             \x20 198.18.0.9  2000-02-29 00:00:00\n"
        );
        // Errors about a line the daemon could not read carry no id.
        let (_, status, _, err) = against_lines(&["status"], 1, |_| {
            r#"{"id": null, "error": {"code": "too_large", "message": "line too long"}}"#.into()
        });
        assert_eq!((status, err.as_str()), (2, "error: line too long (too_large)\n"));
        // A reply to another request is not taken for this one's.
        let (_, status, _, err) = against_lines(&["status"], 1, |_| r#"{"id": 1, "ok": {}}"#.into());
        assert_eq!(status, 2);
        assert!(err.starts_with("error: reply is for request 1"), "{err}");
    }

    #[test]
    fn bind_add_and_remove_for_a_person() {
        let binding = json!({"account": "acme\n", "addr": "fd00::1", "target": null, "created_at": 0});
        let sent = binding.clone();
        let (request, status, out, _) =
            against_all(&["bind", "add", "acme\n", "fd00::1"], move |_| json!({"ok": sent}));
        assert_eq!(request, json!({"cmd": "bind_add", "account": "acme\n", "addr": "fd00::1"}));
        assert_eq!((status, out.as_str()), (0, "bound fd00::1 (every port) to acme\\n\n"));
        let (_, status, out, _) = against_all(&["bind", "remove", "fd00::1"], move |_| json!({"ok": binding}));
        assert_eq!(status, 0);
        assert!(out.starts_with("account: acme\\n\naddr: fd00::1\n"), "{out}");
    }
}
