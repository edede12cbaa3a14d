//! Where ipaccessd's log goes, how detailed it is, and the one line written for each
//! security-relevant event.
//!
//! Started by systemd with stderr connected to the journal (`JOURNAL_STREAM` names
//! stderr's device and inode), records go to the journal with their priorities; otherwise
//! to stderr through env_logger. `RUST_LOG`, when set, filters either way and the
//! configuration's `log_level` is then ignored; otherwise `log_level` sets the level, at
//! start and on reload.

use std::{cell::RefCell, fmt::Write as _};

use log::{Level, LevelFilter, Log, Metadata, Record, info, log, warn};
use serde_json::Value;
use systemd_journal_logger::JournalLog;

/// The log target of security events, so that they can be filtered (`RUST_LOG=ipaccess::audit=info`).
pub const AUDIT_TARGET: &str = "ipaccess::audit";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    Journal,
    Stderr,
}

/// Installs the logger. Until [`set_level`] is called, the level is `info`.
pub fn init() -> Destination {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => {
                let filter = from_env.as_deref().map(|spec| env_filter::Builder::new().parse(spec).build());
                let level = filter.as_ref().map_or(LevelFilter::Info, env_filter::Filter::filter);
                let journal = journal.with_syslog_identifier("ipaccessd".into());
                if log::set_boxed_logger(Box::new(FilteredJournal { journal, filter })).is_ok() {
                    log::set_max_level(level);
                    return Destination::Journal;
                }
            }
            Err(e) => eprintln!("ipaccessd: cannot open the journal ({e}); logging to stderr"),
        }
    }
    let mut builder = env_logger::Builder::new();
    match &from_env {
        Some(spec) => builder.parse_filters(spec),
        // Everything reaches the logger; log::max_level decides (see set_level).
        None => builder.filter_level(LevelFilter::Trace),
    };
    if builder.try_init().is_ok() && from_env.is_none() {
        log::set_max_level(LevelFilter::Info);
    }
    Destination::Stderr
}

/// Applies the configuration's `log_level`, unless `RUST_LOG` chose the filter.
pub fn set_level(level: LevelFilter) {
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.trim().is_empty()) {
        if level != log::max_level() {
            info!("log_level {level} is not applied: RUST_LOG is set");
        }
        return;
    }
    log::set_max_level(level);
}

/// The journal, with `RUST_LOG`'s per-module filter when one was given.
struct FilteredJournal {
    journal: JournalLog,
    filter: Option<env_filter::Filter>,
}

impl Log for FilteredJournal {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.as_ref().is_none_or(|f| f.enabled(metadata)) && self.journal.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if self.filter.as_ref().is_none_or(|f| f.matches(record)) {
            self.journal.log(record);
        }
    }

    fn flush(&self) {
        self.journal.flush();
    }
}

// Security events: one line each, naming the account (or interface) and the operator's uid.

thread_local! {
    /// Lines of the change being made on this thread, held back until it commits.
    static PENDING: RefCell<Option<Vec<(Level, String)>>> = const { RefCell::new(None) };
}

/// Holds back the audit lines of one change: [`PendingAudit::committed`] writes them; a
/// change that fails (dropped without it) writes none, since nothing happened.
pub struct PendingAudit(());

impl PendingAudit {
    pub fn begin() -> PendingAudit {
        PENDING.with(|p| *p.borrow_mut() = Some(Vec::new()));
        PendingAudit(())
    }

    pub fn committed(self) {
        for (level, line) in PENDING.with(|p| p.borrow_mut().take()).unwrap_or_default() {
            log!(target: AUDIT_TARGET, level, "{line}");
        }
    }
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        PENDING.with(|p| p.borrow_mut().take());
    }
}

/// An audited change to `account` by `uid`: `action` and the fields of `detail` (a JSON
/// object), e.g. `override_granted: account "acme" by uid 0 (cidr="198.18.9.9/32" ticket=…)`.
/// A shared set's changes are recorded under `set:NAME` and logged as `set "NAME"`.
/// Inside a change (see [`PendingAudit`]) it is written once the change commits.
pub fn audit(account: &str, uid: u32, action: &str, detail: &Value) {
    // A bulk import audits every account it touches: those lines are detail, its summary
    // line says what happened.
    let level = if action == "import" { Level::Debug } else { Level::Info };
    if level > log::max_level() {
        return;
    }
    let line = format!("{action}: {} by uid {uid}{}", subject(account), fields(detail));
    let held = PENDING.with(|p| match p.borrow_mut().as_mut() {
        Some(pending) => {
            pending.push((level, line.clone()));
            true
        }
        None => false,
    });
    if !held {
        log!(target: AUDIT_TARGET, level, "{line}");
    }
}

/// A change refused because it would lock the caller out of `account`.
pub fn lockout_refused(account: &str, uid: u32, client_ip: std::net::IpAddr) {
    warn!(target: AUDIT_TARGET, "lockout_refused: account {account:?} by uid {uid} (client_ip={client_ip})");
}

/// A change refused by the lockout guard for another reason than the caller's own address.
pub fn lockout_refused_because(account: &str, uid: u32, why: &str) {
    warn!(target: AUDIT_TARGET, "lockout_refused: {} by uid {uid} (because={why:?})", subject(account));
}

/// What a log line names: an account, or a shared set (recorded as `set:NAME`; no account id
/// holds a colon).
fn subject(recorded_as: &str) -> String {
    match recorded_as.strip_prefix("set:") {
        Some(set) => format!("set {set:?}"),
        None => format!("account {recorded_as:?}"),
    }
}

/// The filter removed from an interface (the only way it is ever removed).
pub fn detached(interface: &str, uid: u32, was_attached: bool) {
    warn!(target: AUDIT_TARGET, "detach: interface {interface:?} by uid {uid} (was_attached={was_attached})");
}

/// ` (key=value …)` for the fields of a JSON object, except those the line already names.
/// Strings are quoted and escaped, so a reason or ticket cannot forge another log line.
fn fields(detail: &Value) -> String {
    let Some(object) = detail.as_object() else { return String::new() };
    let mut out = String::new();
    for (key, value) in object.iter().filter(|(k, _)| !matches!(k.as_str(), "uid" | "action")) {
        let sep = if out.is_empty() { " (" } else { " " };
        let _ = match value {
            Value::String(s) => write!(out, "{sep}{key}={s:?}"),
            other => write!(out, "{sep}{key}={other}"),
        };
    }
    if !out.is_empty() {
        out.push(')');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fields_are_quoted_and_cannot_break_the_line() {
        let detail = json!({ "uid": 7, "action": "x", "reason": "two\nlines \"quoted\"", "override": 3, "cidr": "198.18.0.0/24" });
        assert_eq!(fields(&detail), r#" (cidr="198.18.0.0/24" override=3 reason="two\nlines \"quoted\"")"#);
        assert_eq!(fields(&json!({ "uid": 1 })), "");
        assert_eq!(fields(&Value::Null), "");
    }

    #[test]
    fn a_set_is_named_as_a_set() {
        assert_eq!(subject("acme"), r#"account "acme""#);
        assert_eq!(subject("set:corp-vpn"), r#"set "corp-vpn""#);
    }

    #[test]
    fn held_lines_are_dropped_unless_committed() {
        log::set_max_level(LevelFilter::Info);
        let pending = PendingAudit::begin();
        audit("acme", 0, "mode", &json!({}));
        assert_eq!(PENDING.with(|p| p.borrow().as_ref().map(Vec::len)), Some(1));
        drop(pending);
        assert_eq!(PENDING.with(|p| p.borrow().as_ref().map(Vec::len)), None);
    }
}
