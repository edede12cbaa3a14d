//! `ipaccessctl import`: a file of accounts, one JSON object a line, sent in batches; an
//! error names the line a person has to fix.

use std::path::Path;

use ipaccess::protocol::{ImportAccount, Imported};
use serde::Serialize;
use serde_json::Value;

use crate::args::read_input;
use crate::transport::{self, DaemonError, Failure};

/// What an import did, over all its batches.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    #[serde(flatten)]
    pub imported: Imported,
    pub batches: usize,
}

/// One account of an import file: where it is, its id, and its line as written, which is
/// what is sent once the line has been read as an account.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileAccount<'a> {
    line: usize,
    id: String,
    json: &'a str,
}

/// Reads an import file: one account per line; blank lines and lines starting with `#`
/// are skipped. The whole file is checked before anything is sent, an account given twice
/// too: in two batches the second would silently replace the first.
fn parse_import_file(text: &str) -> Result<Vec<FileAccount<'_>>, String> {
    let mut accounts = Vec::new();
    let mut lines_of: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let json = line.trim();
        if json.is_empty() || json.starts_with('#') {
            continue;
        }
        // Read as the daemon will read it (unknown or repeated fields are refused), so the
        // line itself can be sent.
        let account: ImportAccount = serde_json::from_str(json).map_err(|e| format!("line {}: {e}", n + 1))?;
        if let Some(first) = lines_of.insert(account.account.clone(), n + 1) {
            return Err(format!(
                "line {}: account {} is on line {first} already; an account appears once in an import",
                n + 1,
                account.account
            ));
        }
        accounts.push(FileAccount { line: n + 1, id: account.account, json });
    }
    Ok(accounts)
}

/// Accounts in batches whose requests stay within `batch_bytes` (an account larger than that
/// goes alone), in file order.
fn batches(accounts: Vec<FileAccount<'_>>, batch_bytes: u64) -> Vec<Vec<FileAccount<'_>>> {
    let mut batches: Vec<Vec<FileAccount>> = Vec::new();
    let mut size = 0;
    for account in accounts {
        let bytes = account.json.len() as u64 + 1;
        match batches.last_mut() {
            Some(batch) if size + bytes <= batch_bytes => batch.push(account),
            _ => {
                batches.push(vec![account]);
                size = 0;
            }
        }
        size += bytes;
    }
    batches
}

/// Sends the import in file `file` (`-`: stdin) and totals the replies. Each batch is one
/// change; after a failed batch the ones before it stay applied, and running the same file
/// again finishes the job.
pub fn import(socket: &Path, file: &Path, batch_bytes: u64, force: bool) -> Result<Totals, Failure> {
    let text = read_input(file).map_err(Failure::Local)?;
    let batches = batches(parse_import_file(&text).map_err(Failure::Local)?, batch_bytes);
    let mut totals = Totals { batches: batches.len(), ..Totals::default() };
    for (done, batch) in batches.iter().enumerate() {
        let lines = (batch[0].line, batch[batch.len() - 1].line);
        let place = format!("lines {}-{}", lines.0, lines.1);
        let before = if done == 0 { String::new() } else { format!(", as are the lines before {}", lines.0) };
        let applied = |details: Option<&Value>| match details {
            // A fleet node whose own kernel had no room: the batch is the fleet's all the same.
            Some(d) if d.get("committed_revision").is_some() => format!("{place} are committed in the fleet{before}"),
            // Too large for one etcd transaction, and a later part lost a race.
            Some(d) if d.get("committed_parts").and_then(Value::as_u64).is_some_and(|n| n > 0) => {
                format!("part of {place} is committed{before}; run the import again to finish it")
            }
            _ if done == 0 => "nothing was imported".to_string(),
            _ => format!("lines before {} are imported; run the import again once this is fixed", lines.0),
        };
        let accounts: Vec<&str> = batch.iter().map(|a| a.json).collect();
        let reply = transport::call_import(socket, &accounts, force).map_err(|e| match e {
            Failure::Daemon(error) => {
                // A person fixes a line, not a batch: name the line of the account the
                // daemon complains about when its message (or details) names one.
                let place = match blame(batch, &error) {
                    Some((line, account)) => format!("line {line} (account {account})"),
                    None => place.clone(),
                };
                let message = format!("{place}: {} ({})", error.message, applied(error.details.as_ref()));
                Failure::Daemon(error.with_message(message))
            }
            Failure::Local(message) => Failure::Local(format!("{place}: {message} ({})", applied(None))),
            // Sent, and no word back: the batch may be in; a second run changes nothing twice.
            Failure::Unanswered(message) => Failure::Local(format!(
                "{place}: {message}; whether they were imported is not known{before}: run the import again to be \
                 sure (what is imported already stays as it is)"
            )),
            // The batch went through, but its result cannot be added up.
            Failure::Unreadable { raw, error } => Failure::Local(format!(
                "{place}: sent, but the daemon's reply does not read as an import result ({error}): {raw}"
            )),
        })?;
        let Imported { accounts, created, entries } = reply.reply;
        totals.imported.accounts += accounts;
        totals.imported.created += created;
        totals.imported.entries += entries;
    }
    Ok(totals)
}

/// The line and id of the account in `batch` that a daemon error is about: the one its
/// details name, else the one its message names first (the longest id where two start at the
/// same place, so `acme.dev` wins over `acme`). Ids count only as whole words: `acme` is not
/// named by `acme-dev`.
fn blame<'a>(batch: &'a [FileAccount], error: &DaemonError) -> Option<(usize, &'a str)> {
    let named = error.details.as_ref().and_then(|d| d.get("account")).and_then(|a| a.as_str());
    if let Some(hit) = batch.iter().find(|a| Some(a.id.as_str()) == named) {
        return Some((hit.line, &hit.id));
    }
    let id_char = |c: char| c.is_alphanumeric() || c == '-' || c == '_';
    let message = error.message.as_str();
    let first_word = |id: &str| {
        message.match_indices(id).map(|(at, _)| at).find(|&at| {
            let before = message[..at].chars().next_back();
            let after = message[at + id.len()..].chars().next();
            !before.is_some_and(id_char) && !after.is_some_and(id_char)
        })
    };
    batch
        .iter()
        .filter(|a| !a.id.is_empty())
        .filter_map(|a| first_word(&a.id).map(|at| (at, std::cmp::Reverse(a.id.len()), a.line, a)))
        .min_by_key(|&(at, len, line, _)| (at, len, line))
        .map(|(_, _, line, a)| (line, a.id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{against_all, against_each};
    use serde_json::json;

    fn account(line: usize, id: &str) -> FileAccount<'static> {
        FileAccount { line, id: id.into(), json: "{}" }
    }

    /// The same account twice is refused before anything is sent, naming both lines, whatever
    /// batches the two would fall into.
    #[test]
    fn an_account_twice_in_a_file_is_refused() {
        let text = "{\"account\": \"dup\"}\n{\"account\": \"other\"}\n\n{\"account\": \"dup\", \"mode\": \"off\"}\n";
        let error = parse_import_file(text).unwrap_err();
        assert!(error.starts_with("line 4: account dup is on line 1 already"), "{error}");
        assert_eq!(parse_import_file("{\"account\": \"a\"}\n{\"account\": \"b\"}\n").unwrap().len(), 2);
    }

    #[test]
    fn errors_name_the_line() {
        let batch = [(3, "acme"), (5, "acme-dev"), (8, "acme.dev"), (9, "b")].map(|(n, id)| account(n, id));
        let error = |message: &str, details: Value| {
            DaemonError::from_reply(&json!({"code": "bad_request", "message": message, "details": details}))
        };
        assert_eq!(blame(&batch, &error("acme-dev exists with another parent", Value::Null)), Some((5, "acme-dev")));
        assert_eq!(blame(&batch, &error("account acme.dev: parent acme", Value::Null)), Some((8, "acme.dev")));
        assert_eq!(blame(&batch, &error("there is no account acme.", Value::Null)), Some((3, "acme")));
        assert_eq!(blame(&batch, &error("x", json!({"account": "b"}))), Some((9, "b")));
        assert_eq!(blame(&batch, &error("x", json!(["b"]))), None, "details of another shape name nobody");
        assert_eq!(blame(&batch, &error("bad ab and bc", Value::Null)), None);

        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut file,
            b"# accounts\n{\"account\": \"acme\"}\n\n{\"account\": \"acme-dev\", \"parent\": \"x\"}\n",
        )
        .unwrap();
        let (request, status, out, err) = against_all(
            &["import", file.path().to_str().unwrap()],
            |_| json!({"error": {"code": "unknown_account", "message": "acme-dev: there is no account x"}}),
        );
        assert_eq!(request["accounts"].as_array().unwrap().len(), 2);
        assert_eq!((status, out.as_str()), (2, ""));
        assert_eq!(
            err,
            "error: line 4 (account acme-dev): acme-dev: there is no account x (nothing was imported) (unknown_account)\n"
        );
        // A fleet node's refusals that come after the fleet committed the batch, or part of it,
        // do not say that nothing was imported.
        let path = file.path().to_str().unwrap();
        for (details, said) in [
            (json!({"committed_revision": 9}), "(lines 2-4 are committed in the fleet) (tables_full)"),
            (
                json!({"parts": 3, "committed_parts": 1}),
                "(part of lines 2-4 is committed; run the import again to finish it) (tables_full)",
            ),
            (json!({"parts": 3, "committed_parts": 0}), "(nothing was imported) (tables_full)"),
        ] {
            let sent = details.clone();
            let (_, _, _, err) = against_all(
                &["import", path],
                move |_| json!({"error": {"code": "tables_full", "message": "no room", "details": sent}}),
            );
            assert!(err.starts_with(&format!("error: lines 2-4: no room {said}\n")), "{details}: {err}");
        }
        // Sent, and the daemon went away without a word: the batch may be in, so the client
        // does not say that nothing was imported.
        let (_, status, _, err) = crate::tests::against_lines(&["import", path], 1, |_| String::new());
        assert_eq!(status, 2);
        assert!(err.contains("lines 2-4: ") && err.contains("whether they were imported is not known"), "{err}");
        assert!(!err.contains("nothing was imported") && !err.contains("may have been applied"), "{err}");
        // A line that is not an import account: nothing is sent (there is no daemon to send it to).
        std::fs::write(file.path(), "{\"account\": \"acme\"}\n{\"account\": \"acme\", \"mode\": \"strict\"}\n")
            .unwrap();
        let mut err = Vec::new();
        let argv = ["ipaccessctl", "--socket", "/nonexistent/ipaccessd.sock", "import", file.path().to_str().unwrap()];
        assert_eq!(crate::run(argv, &mut Vec::new(), &mut err), 2);
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("error: line 2: unknown variant `strict`"), "{err}");
    }

    #[test]
    fn batches_are_totalled_and_a_later_failure_says_what_stayed() {
        // Three accounts of about 420 bytes each in batches of at most 1 KiB: two batches.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let lines: Vec<String> = (0..3)
            .map(|n| {
                let entries: Vec<Value> = (0..15).map(|h| json!({"cidr": format!("198.19.{n}.{h}/32")})).collect();
                json!({"account": format!("a{n}"), "entries": entries}).to_string()
            })
            .collect();
        std::io::Write::write_all(&mut file, lines.join("\n").as_bytes()).unwrap();
        let path = file.path().to_str().unwrap();
        let imported = |r: &Value| {
            let n = r["accounts"].as_array().unwrap().len();
            json!({"ok": {"accounts": n, "created": n, "entries": 15 * n}})
        };
        let (requests, status, out, _) =
            against_each(&["--json", "import", path, "--batch-bytes", "1024"], 2, imported);
        assert_eq!(requests.iter().map(|r| r["accounts"].as_array().unwrap().len()).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(status, 0);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            json!({"accounts": 3, "created": 3, "entries": 45, "batches": 2})
        );
        let (_, status, out, err) = against_each(&["import", path, "--batch-bytes", "1024"], 2, |r| {
            if r["accounts"].as_array().unwrap().len() == 2 {
                json!({"ok": {"accounts": 2, "created": 2, "entries": 30}})
            } else {
                json!({"error": {"code": "tables_full", "message": "no room for a2's entries"}})
            }
        });
        assert_eq!((status, out.as_str()), (2, ""));
        assert_eq!(
            err,
            "error: line 3 (account a2): no room for a2's entries (lines before 3 are imported; run the import again \
             once this is fixed) (tables_full)\n"
        );
        // A batch whose result does not read as one: an error, never a wrong total.
        let (_, status, _, err) = against_each(&["import", path], 1, |_| json!({"ok": {"accounts": "three"}}));
        assert_eq!(status, 2);
        assert!(
            err.starts_with("error: lines 1-3: sent, but the daemon's reply does not read as an import result"),
            "{err}"
        );
    }
}
