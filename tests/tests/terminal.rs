//! End to end: what a tenant writes (an entry's label, an override's ticket and reason, an
//! account name a daemon message quotes) reaches the operator's terminal through the real
//! `ipaccessctl` escaped: it can neither forge a row, nor send the terminal a command, nor
//! reorder the text, and the client does not crash on it.
//!
//! The real `ipaccessd` runs in the shared test world. If the daemon refuses such text (as it
//! may, once it validates labels), the text is written straight into the store while the
//! daemon is stopped, as an older version or a hand edit could have left it: the client must
//! be safe whatever the daemon returns. Build the binaries first:
//! `cargo build --release -p ipaccess --bins`.

use ipaccess_tests::daemon::World;
use serde_json::Value;

/// A label that starts a new line looking like an allow-everything row, then clears the
/// screen, sets the window title (OSC), turns the text red and reverses what follows.
const LABEL: &str = "office\n0.0.0.0/0  forged  2000-01-01 00:00:00  0\x1b[2J\x1b]0;owned\x07\x1b[31m\u{202e}dlrow";
/// A reason that forges an override row for everyone, with a hyperlink (OSC 8).
const REASON: &str = "verified\n9   acme     0.0.0.0/0      2099-01-01 00:00:00  T-9  0  forged\x1b]8;;http://198.18.0.66/\x07click\x1b]8;;\x07";
const TICKET: &str = "T-1\x1b[8m";

/// `ipaccessctl --json ARGS`, which must succeed; its result.
fn ok(w: &World, args: &[&str]) -> Value {
    let out = w.ctl(&[&["--json"], args].concat());
    assert_eq!(out.code, 0, "ipaccessctl {args:?}: {}{}", out.stdout, out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}

/// Nothing on the terminal but printable text and line ends: no ESC, BEL or other control
/// character, no bidi control.
fn assert_inert(what: &str, text: &str) {
    let bad = text.chars().find(|&c| {
        (c.is_control() && c != '\n') || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200b}')
    });
    assert_eq!(bad, None, "{what} prints {bad:?}:\n{text}");
}

/// The hostile label and reason through the daemon if it takes them; else benign text
/// through the daemon, then the hostile text written into the store with the daemon
/// stopped.
fn plant(w: &mut World) {
    ok(w, &["account", "add", "acme"]);
    let entry = w.ctl(&["--json", "allow", "add", "acme", "198.18.0.0/24", "--label", LABEL]);
    if entry.code != 0 {
        ok(w, &["allow", "add", "acme", "198.18.0.0/24", "--label", "office"]);
    }
    // Enforcing, so that an override can change something.
    ok(w, &["account", "mode", "acme", "enforce", "--force"]);
    let grant = ["override", "grant", "acme", "198.18.7.7", "--ttl", "1h"];
    let granted = w.ctl(&[&["--json"][..], &grant, &["--ticket", TICKET, "--reason", REASON]].concat());
    if granted.code != 0 {
        ok(w, &[&grant[..], &["--ticket", "T-1", "--reason", "verified"]].concat());
    }
    if entry.code == 0 && granted.code == 0 {
        return;
    }
    w.stop();
    let store = rusqlite::Connection::open(w.dir.0.join("state").join("ipaccess.db")).unwrap();
    let changed = store.execute("UPDATE allow_entries SET label = ?1 WHERE account = 'acme'", [LABEL]).unwrap()
        + store
            .execute("UPDATE overrides SET ticket = ?1, reason = ?2 WHERE account = 'acme'", [TICKET, REASON])
            .unwrap();
    assert_eq!(changed, 2);
    drop(store);
    w.start("");
}

#[test]
fn hostile_text_forges_no_row_and_reaches_no_terminal() {
    let mut w = World::new("");
    plant(&mut w);
    // The text is stored as written: --json gives it back exactly.
    let entries = ok(&w, &["allow", "list", "acme"]);
    assert_eq!(entries[0]["label"], LABEL, "{entries}");
    let overrides = ok(&w, &["override", "list", "acme"]);
    assert_eq!((&overrides[0]["reason"], &overrides[0]["ticket"]), (&Value::from(REASON), &Value::from(TICKET)));
    let id = overrides[0]["id"].to_string();

    // allow list: the header and the one real row; the label shown escaped (cut to the cell).
    let list = w.ctl(&["allow", "list", "acme"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    assert_inert("allow list", &list.stdout);
    let lines: Vec<&str> = list.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "a forged row:\n{}", list.stdout);
    assert!(lines[0].starts_with("CIDR ") && lines[1].starts_with("198.18.0.0/24 "), "{}", list.stdout);
    assert!(lines[1].contains("office\\n0.0.0.0/0  forged") && lines[1].contains('…'), "{}", list.stdout);

    // override list, of one account and of all: one row, with the reason and ticket escaped.
    for args in [&["override", "list", "acme"][..], &["override", "list"]] {
        let list = w.ctl(args);
        assert_eq!(list.code, 0, "{}", list.stderr);
        assert_inert("override list", &list.stdout);
        let lines: Vec<&str> = list.stdout.lines().collect();
        assert_eq!(lines.len(), 2, "a forged row:\n{}", list.stdout);
        assert!(lines[1].starts_with(&format!("{id} ")), "{}", list.stdout);
        assert!(lines[1].contains("T-1\\x1b[8m") && lines[1].contains("verified\\n9   acme"), "{}", list.stdout);
    }

    // account show: the fields, then the allowlist as a table with the same one row.
    let show = w.ctl(&["account", "show", "acme"]);
    assert_eq!(show.code, 0, "{}", show.stderr);
    assert_inert("account show", &show.stdout);
    assert!(show.stdout.contains("\nallowlist:\nCIDR "), "{}", show.stdout);
    assert_eq!(show.stdout.lines().filter(|l| l.contains("0.0.0.0/0")).count(), 1, "{}", show.stdout);
    assert!(!show.stdout.lines().any(|l| l.starts_with("0.0.0.0/0")), "{}", show.stdout);

    // A daemon message quoting what a caller wrote reaches stderr escaped.
    let name = "nobody\u{202e}txet";
    let missing = w.ctl(&["allow", "list", name]);
    assert_eq!((missing.code, missing.stdout.as_str()), (2, ""), "{}", missing.stderr);
    assert_inert("an error", &missing.stderr);
    assert!(missing.stderr.starts_with("error: ") && missing.stderr.lines().count() == 1, "{}", missing.stderr);

    // A label of 65,536 characters: the table cuts it, --json has all of it, nothing crashes.
    let long = "x".repeat(65_536);
    let added = w.ctl(&["--json", "allow", "add", "acme", "198.18.1.0/24", "--label", &long]);
    if added.code == 0 {
        let list = w.ctl(&["allow", "list", "acme"]);
        assert_eq!(list.code, 0, "{}", list.stderr);
        assert!(list.stdout.lines().all(|l| l.chars().count() < 200), "{}", list.stdout);
        let entries = ok(&w, &["allow", "list", "acme"]);
        assert!(entries.as_array().unwrap().iter().any(|e| e["label"] == long.as_str()));
    } else {
        // A daemon that limits labels says so, with a structured error.
        assert_eq!(added.code, 2, "{}", added.stderr);
        assert!(serde_json::from_str::<Value>(&added.stdout).unwrap()["code"].is_string(), "{}", added.stdout);
    }
}
