//! Replies for a person: each reply type knows how it is shown ([`Render`]). Lists are
//! tables, single things `key: value` lines named as on the wire, Unix times UTC dates.
//!
//! Whatever the daemon sends is shown inert: every cell, value and message goes through
//! [`escape`] (or [`escape_within`] in tables), so text a tenant wrote can neither start a
//! row nor steer the terminal.

use ipaccess::policy::invisible;
use ipaccess::protocol::{
    Account, AccountDetails, ActivityKind, ActivityReport, ActivityRow, Allowlist, Binding, CheckResult,
    ClusterImported, DeniedSummary, Detached, EffectiveState, Entry, EntryRemoved, Granted, Imported, ListedAccount,
    Location, Noted, Override, Removed, ShutOut, SigninSummary, StatsReport, StatusReport, UnknownSummary,
};
use ipaccess::protocol::{ListedSet, SetDeleted, SetReference, SetShutOut, SharedSet};
use ipaccess::time::format_utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::import::Totals;
use crate::transport::DaemonError;

/// A reply as a person reads it, appended to `out`.
pub trait Render {
    fn render(&self, out: &mut String);
}

/// Widest a table cell gets, in characters after escaping; longer ones end in `…`. Only
/// tables are cut (`key: value` lines and `--json` show everything).
pub const CELL_WIDTH: usize = 64;

/// Columns of names the daemon allows only in a plain alphabet and at most 128 characters
/// long (account ids, set names, node names): shown whole, since two that differ only past
/// the cut would read as the same account.
const WHOLE_COLUMNS: [&str; 6] = ["ID", "ACCOUNT", "PARENT", "SET", "SOURCE", "NODE"];

/// Text from the daemon made safe to print: see [`escape_within`].
pub fn escape(s: &str) -> String {
    escape_within(s, usize::MAX)
}

/// A message (an error, a refusal) made safe to print: as [`escape`], but a backslash stays
/// one. Messages quote the values they name with their escapes already (`"a\"b"`, `"\u{feff}"`),
/// which would otherwise show doubled; a message is one line of prose, never a row of a table
/// for a backslash to forge.
pub fn escape_message(s: &str) -> String {
    escaped(s, usize::MAX, false)
}

/// `s` as a terminal can show it without being steered by it: control characters (C0, DEL,
/// C1) and [`invisible`] ones are written as escapes (`\n`, `\x1b`, `\u{202e}`), and a
/// backslash as `\\`, so that what a tenant writes in a label can neither start a new row,
/// send the terminal a command, nor pass for an escape. At most `max` characters: a longer
/// result is cut, between escapes, and ends in `…`.
pub fn escape_within(s: &str, max: usize) -> String {
    escaped(s, max, true)
}

fn escaped(s: &str, max: usize, backslash: bool) -> String {
    let mut out = String::new();
    let (mut width, mut fits) = (0, 0);
    for c in s.chars() {
        let piece = match c {
            '\\' if backslash => "\\\\".to_string(),
            '\n' => "\\n".to_string(),
            '\r' => "\\r".to_string(),
            '\t' => "\\t".to_string(),
            '\0'..='\u{1f}' | '\u{7f}' => format!("\\x{:02x}", c as u32),
            '\u{80}'..='\u{9f}' => format!("\\u{{{:x}}}", c as u32),
            c if invisible(c) => format!("\\u{{{:x}}}", c as u32),
            c => c.to_string(),
        };
        width += piece.chars().count();
        if width > max {
            out.truncate(fits);
            out.push('…');
            return out;
        }
        out.push_str(&piece);
        // Where to cut should a later piece not fit: leave room for the ellipsis.
        if width < max {
            fits = out.len();
        }
    }
    out
}

/// Columns padded to their widest cell (as wide as the terminal shows it: `東京` takes four
/// columns), two spaces apart, with no borders; every cell escaped and cut to [`CELL_WIDTH`]
/// (but for [`WHOLE_COLUMNS`]) first, so the table crate only ever sees one line of inert
/// text per cell.
fn table(out: &mut String, head: &[&str], rows: impl IntoIterator<Item = Vec<String>>) {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING).set_header(head.to_vec());
    let widths: Vec<usize> =
        head.iter().map(|h| if WHOLE_COLUMNS.contains(h) { usize::MAX } else { CELL_WIDTH }).collect();
    for row in rows {
        let cells = row.iter().enumerate().map(|(n, c)| escape_within(c, widths.get(n).copied().unwrap_or(CELL_WIDTH)));
        table.add_row(cells.collect::<Vec<_>>());
    }
    table.column_iter_mut().for_each(|c| {
        c.set_padding((0, 2));
    });
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// A `key: value` line, the value escaped and never cut.
fn line(out: &mut String, key: &str, value: impl AsRef<str>) {
    out.push_str(key);
    out.push_str(": ");
    out.push_str(&escape(value.as_ref()));
    out.push('\n');
}

/// A protocol enum by its wire name (`parent_banned`).
fn name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("({e})"),
    }
}

fn time(secs: i64) -> String {
    format_utc(secs)
}

/// Text that may be absent: `-` for none.
fn or_dash(text: Option<&str>) -> String {
    text.unwrap_or("-").to_string()
}

fn notes(out: &mut String, notes: &[String]) {
    notes.iter().for_each(|n| line(out, "note", n));
}

/// An account's fields, the ones a person looks for first. The state shown is the one in
/// force, with the account's own beside it when an ancestor's differs.
fn account_lines(out: &mut String, account: &Account, effective: Option<EffectiveState>) {
    let own = name(&account.state);
    let state = match effective.map(|e| name(&e)) {
        Some(effective) if effective != own => format!("{effective} (own state: {own})"),
        _ => own,
    };
    line(out, "id", &account.id);
    line(out, "parent", or_dash(account.parent.as_deref()));
    line(out, "state", state);
    line(out, "state_reason", or_dash(account.state_reason.as_deref()));
    line(out, "mode", name(&account.mode));
    line(out, "slot", account.slot.to_string());
    line(out, "created_at", time(account.created_at));
}

impl Render for Account {
    fn render(&self, out: &mut String) {
        account_lines(out, self, None);
    }
}

impl Render for AccountDetails {
    fn render(&self, out: &mut String) {
        account_lines(out, &self.account.account, Some(self.account.effective_state));
        if self.entries.is_empty() {
            out.push_str("\nallowlist: none\n");
        } else {
            out.push_str("\nallowlist:\n");
            self.entries.render(out);
        }
        if self.bindings.is_empty() {
            out.push_str("\nbindings: none\n");
        } else {
            out.push_str("\nbindings:\n");
            self.bindings.render(out);
        }
        // Most accounts reference no set: the section is left out rather than said empty.
        if !self.sets.is_empty() {
            out.push_str("\nshared sets:\n");
            let rows = self.sets.iter().map(|r| {
                let status = if r.enabled { "enabled" } else { "disabled" };
                vec![r.set.clone(), status.to_owned(), time(r.created_at), r.created_by.to_string()]
            });
            table(out, &["SET", "STATUS", "ADDED", "BY"], rows);
        }
    }
}

impl Render for Vec<ListedAccount> {
    fn render(&self, out: &mut String) {
        // The effective state (`parent_banned`) is what a sign-in meets.
        let rows = self.iter().map(|a| {
            let parent = or_dash(a.account.parent.as_deref());
            vec![
                a.account.id.clone(),
                a.account.slot.to_string(),
                name(&a.effective_state),
                name(&a.account.mode),
                parent,
            ]
        });
        table(out, &["ID", "SLOT", "STATE", "MODE", "PARENT"], rows);
    }
}

impl Render for Removed {
    fn render(&self, out: &mut String) {
        line(out, "removed", self.removed.join(", "));
    }
}

fn status(entry: &Entry) -> &'static str {
    if entry.enabled { "enabled" } else { "disabled" }
}

/// When an entry expires, `-` for never, marked once it has.
fn expires(entry: &Entry) -> String {
    let Some(at) = entry.expires_at else { return "-".into() };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    if at <= now { format!("{} (expired)", time(at)) } else { time(at) }
}

impl Render for Noted<Entry> {
    fn render(&self, out: &mut String) {
        let entry = &self.value;
        line(out, "account", &entry.account);
        line(out, "cidr", entry.cidr.to_string());
        line(out, "label", or_dash(entry.label.as_deref()));
        line(out, "status", status(entry));
        if entry.expires_at.is_some() {
            line(out, "expires_at", expires(entry));
        }
        line(out, "created_at", time(entry.created_at));
        line(out, "created_by", entry.created_by.to_string());
        notes(out, &self.notes);
    }
}

impl Render for EntryRemoved {
    fn render(&self, out: &mut String) {
        line(out, "account", &self.account);
        line(out, "removed", self.removed.to_string());
        notes(out, &self.notes);
    }
}

impl Render for Vec<Entry> {
    fn render(&self, out: &mut String) {
        // Inherited rows (a shared set's networks) say where they come from; a list with
        // none keeps the columns it always had.
        let inherited = self.iter().any(|e| e.source.is_some());
        let rows = self.iter().map(|e| {
            let label = or_dash(e.label.as_deref());
            let last = |t: Option<i64>| t.map_or_else(|| "-".into(), time);
            let mut row = vec![
                e.cidr.to_string(),
                status(e).into(),
                label,
                expires(e),
                time(e.created_at),
                e.created_by.to_string(),
                last(e.last_signin_at),
                last(e.last_packet_at),
            ];
            if inherited {
                row.push(or_dash(e.source.as_deref()));
            }
            row
        });
        let mut head = vec!["CIDR", "STATUS", "LABEL", "EXPIRES", "CREATED", "BY", "LAST SIGN-IN", "LAST PACKET"];
        if inherited {
            head.push("SOURCE");
        }
        table(out, &head, rows);
    }
}

impl Render for SharedSet {
    fn render(&self, out: &mut String) {
        line(out, "set", &self.set);
        line(out, "created_at", time(self.created_at));
        line(out, "created_by", self.created_by.to_string());
        if self.entries.is_empty() {
            out.push_str("\nnetworks: none\n");
        } else {
            out.push_str("\nnetworks:\n");
            let last = |t: Option<i64>| t.map_or_else(|| "-".into(), time);
            let rows = self.entries.iter().map(|e| {
                vec![
                    e.cidr.to_string(),
                    or_dash(e.label.as_deref()),
                    time(e.created_at),
                    e.created_by.to_string(),
                    last(e.last_signin_at),
                    last(e.last_packet_at),
                ]
            });
            table(out, &["CIDR", "LABEL", "CREATED", "BY", "LAST SIGN-IN", "LAST PACKET"], rows);
        }
        if self.references.is_empty() {
            out.push_str("\nreferenced by: nobody\n");
        } else {
            out.push_str("\nreferenced by:\n");
            let rows = self.references.iter().map(|r| {
                let status = if r.enabled { "enabled" } else { "disabled" };
                vec![r.account.clone(), status.into(), time(r.created_at), r.created_by.to_string()]
            });
            table(out, &["ACCOUNT", "STATUS", "CREATED", "BY"], rows);
        }
        notes(out, &self.notes);
    }
}

impl Render for Vec<ListedSet> {
    fn render(&self, out: &mut String) {
        let rows = self.iter().map(|s| {
            vec![
                s.set.clone(),
                s.entries.to_string(),
                s.references.to_string(),
                s.enabled_references.to_string(),
                time(s.created_at),
            ]
        });
        table(out, &["SET", "NETWORKS", "REFERENCES", "ENABLED", "CREATED"], rows);
    }
}

impl Render for SetDeleted {
    fn render(&self, out: &mut String) {
        line(out, "deleted", &self.set);
        let removed = if self.references_removed.is_empty() { "-".into() } else { self.references_removed.join(", ") };
        line(out, "references_removed", removed);
    }
}

impl Render for SetReference {
    fn render(&self, out: &mut String) {
        line(out, "account", &self.account);
        line(out, "set", &self.set);
        line(out, "status", if self.enabled { "enabled" } else { "disabled" });
        line(out, "created_at", time(self.created_at));
        line(out, "created_by", self.created_by.to_string());
    }
}

impl Render for Allowlist {
    fn render(&self, out: &mut String) {
        match &self.dry_run {
            None => self.entries.render(out),
            Some(plan) => {
                out.push_str("dry run: nothing was changed\n");
                let cidrs = |list: &[ipnet::IpNet]| list.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
                for (what, list) in [("added", &plan.added), ("removed", &plan.removed), ("unchanged", &plan.unchanged)]
                {
                    line(out, what, if list.is_empty() { "-".into() } else { cidrs(list) });
                }
                let rows = plan.shut_out.iter().map(|s| vec![s.address.to_string(), time(s.last_seen)]);
                if plan.shut_out.is_empty() {
                    line(out, "shut_out", "nobody who signed in in the last 7 days");
                } else {
                    out.push_str("would shut out these recent sign-ins (--force would be needed):\n");
                    table(out, &["ADDRESS", "LAST SIGN-IN"], rows);
                }
                // What the same command without --dry-run would answer now.
                match &plan.refused {
                    Some(refusal) => line(out, "for real", format!("{}: {}", name(&refusal.code), refusal.message)),
                    None => line(out, "for real", "it would be applied"),
                }
            }
        }
        notes(out, &self.notes);
    }
}

/// A binding's protocol and port; `*` for the whole address.
fn target(binding: &Binding) -> (String, String) {
    match binding.target {
        Some((proto, port)) => (name(&proto), port.to_string()),
        None => ("*".into(), "*".into()),
    }
}

impl Render for Binding {
    fn render(&self, out: &mut String) {
        line(out, "account", &self.account);
        line(out, "addr", self.addr.to_string());
        let target = match target(self) {
            (proto, port) if self.target.is_some() => format!("{proto}/{port}"),
            _ => "every port".into(),
        };
        line(out, "target", target);
        if let Some(node) = &self.node {
            line(out, "node", node);
        }
        line(out, "created_at", time(self.created_at));
    }
}

/// A new binding in one line: `bound 198.18.0.1 tcp/443 to acme`.
pub struct Bound<'a>(pub &'a Binding);

impl Render for Bound<'_> {
    fn render(&self, out: &mut String) {
        let b = self.0;
        let what = match b.target {
            Some((proto, port)) => format!("{} {}/{port}", b.addr, name(&proto)),
            None => format!("{} (every port)", b.addr),
        };
        let on = b.node.as_ref().map_or_else(String::new, |node| format!(" on node {node}"));
        out.push_str(&escape(&format!("bound {what} to {}{on}", b.account)));
        out.push('\n');
    }
}

impl Render for Vec<Binding> {
    fn render(&self, out: &mut String) {
        // A node column once some binding is scoped to a node (only a fleet has them).
        let scoped = self.iter().any(|b| b.node.is_some());
        let rows = self.iter().map(|b| {
            let (proto, port) = target(b);
            let mut row = vec![b.account.clone(), b.addr.to_string(), proto, port];
            if scoped {
                row.push(b.node.clone().unwrap_or_else(|| "*".into()));
            }
            row
        });
        let header: &[&str] = if scoped {
            &["ACCOUNT", "ADDRESS", "PROTO", "PORT", "NODE"]
        } else {
            &["ACCOUNT", "ADDRESS", "PROTO", "PORT"]
        };
        table(out, header, rows);
    }
}

/// A check's verdict line, e.g. `denied (address_not_allowed): <hint>`, then the operator's
/// detail and the override that allowed it, if one did.
impl Render for CheckResult {
    fn render(&self, out: &mut String) {
        let reason = name(&self.reason);
        let word = if self.allowed { "allowed" } else { "denied" };
        let hint = if reason == "allowed" || self.hint.is_empty() { String::new() } else { format!(": {}", self.hint) };
        out.push_str(&escape(&format!("{word} ({reason}){hint}")));
        out.push('\n');
        if !self.detail.is_empty() {
            line(out, "detail", &self.detail);
        }
        if let Some(via) = &self.via_override {
            line(out, "via_override", format!("{} (until {})", via.id, time(via.expires_at)));
        }
    }
}

fn override_lines(out: &mut String, o: &Override) {
    line(out, "id", o.id.to_string());
    line(out, "account", &o.account);
    line(out, "cidr", o.cidr.to_string());
    line(out, "ticket", &o.ticket);
    line(out, "reason", &o.reason);
    line(out, "operator", o.operator.to_string());
    line(out, "created_at", time(o.created_at));
    line(out, "expires_at", time(o.expires_at));
    line(out, "revoked_at", o.revoked_at.map_or("-".into(), time));
}

impl Render for Override {
    fn render(&self, out: &mut String) {
        override_lines(out, self);
    }
}

/// A place as `Amsterdam, NL` (or just the country, or just the city); `-` for none. The
/// database's text is escaped with the rest of the cell.
fn place(location: Option<&Location>) -> String {
    let Some(l) = location else { return "-".into() };
    match (l.city.as_deref(), l.country.as_deref()) {
        (Some(city), Some(country)) => format!("{city}, {country}"),
        (Some(one), None) | (None, Some(one)) => one.to_string(),
        (None, None) => "-".into(),
    }
}

fn denied_table(out: &mut String, denied: &[DeniedSummary]) {
    let fleet = denied.iter().any(|d| !d.nodes.is_empty());
    let rows = denied.iter().map(|d| {
        let (address, method) = (or_dash(d.address.as_deref()), or_dash(d.method.as_deref()));
        let mut row = vec![address, place(d.location.as_ref()), method, time(d.first_seen), time(d.last_seen)];
        row.push(d.count.to_string());
        // In a fleet: which nodes saw them.
        if fleet {
            row.push(d.nodes.join(","));
        }
        row
    });
    let head = ["ADDRESS", "LOCATION", "METHOD", "FIRST SEEN", "LAST SEEN", "COUNT", "NODES"];
    table(out, &head[..if fleet { head.len() } else { head.len() - 1 }], rows);
}

impl Render for Granted {
    fn render(&self, out: &mut String) {
        override_lines(out, &self.granted);
        if self.recent_denied.is_empty() {
            out.push_str("\nno denied attempts recorded\n");
        } else {
            out.push_str("\nrecent denied attempts:\n");
            denied_table(out, &self.recent_denied);
        }
        notes(out, &self.notes);
    }
}

impl Render for Vec<Override> {
    fn render(&self, out: &mut String) {
        let rows = self.iter().map(|o| {
            let (id, cidr, operator) = (o.id.to_string(), o.cidr.to_string(), o.operator.to_string());
            vec![id, o.account.clone(), cidr, time(o.expires_at), o.ticket.clone(), operator, o.reason.clone()]
        });
        table(out, &["ID", "ACCOUNT", "CIDR", "EXPIRES", "TICKET", "OPERATOR", "REASON"], rows);
    }
}

/// What an `activity` request asked for: an empty reply reads as any list, so the request
/// says which table it is.
#[derive(Clone, Copy)]
pub struct Asked {
    pub summary: bool,
    pub unknown_accounts: bool,
}

/// An activity report, under the table the request asked for when it is empty.
pub struct ActivityShown<'a>(pub &'a ActivityReport, pub Asked);

/// A drop's `detail`: where the dropped packets went.
#[derive(Deserialize)]
struct DropDetail {
    destination: String,
    protocol: u8,
    port: u16,
}

/// A drop's destination endpoint, `198.18.0.1:7100/tcp` or `[fd00::1]:53/udp`.
fn destination(row: &ActivityRow) -> String {
    let Some(detail) = row.detail.as_ref().filter(|_| row.kind == ActivityKind::Drop) else { return "-".into() };
    match DropDetail::deserialize(detail) {
        Ok(DropDetail { destination, protocol, port }) => {
            let proto = match protocol {
                6 => "tcp".to_string(),
                17 => "udp".to_string(),
                n => n.to_string(),
            };
            let dst = if destination.contains(':') { format!("[{destination}]") } else { destination };
            format!("{dst}:{port}/{proto}")
        }
        Err(_) => "-".into(),
    }
}

fn result(allowed: Option<bool>) -> String {
    match allowed {
        Some(true) => "allowed",
        Some(false) => "denied",
        None => "-",
    }
    .into()
}

fn records(out: &mut String, rows: &[ActivityRow]) {
    let rows = rows.iter().map(|r| {
        let uid = r.uid.map_or("-".into(), |u| u.to_string());
        let (address, method, reason) =
            (or_dash(r.address.as_deref()), or_dash(r.method.as_deref()), or_dash(r.reason.as_deref()));
        let mut row = vec![time(r.time), name(&r.kind), address, destination(r), method, result(r.allowed)];
        row.extend([reason, r.count.to_string(), uid]);
        row
    });
    let head = ["LAST SEEN", "KIND", "ADDRESS", "TO", "METHOD", "RESULT", "REASON", "COUNT", "UID"];
    table(out, &head, rows);
}

fn signins(out: &mut String, rows: &[SigninSummary]) {
    let fleet = rows.iter().any(|s| !s.nodes.is_empty());
    let rows = rows.iter().map(|s| {
        let by = if s.application { "application" } else { "staff" };
        let (address, location) = (s.address.clone(), place(s.location.as_ref()));
        let mut row = vec![address, location, s.method.clone(), result(Some(s.allowed)), s.reason.clone()];
        row.extend([s.count.to_string(), time(s.first_seen), time(s.last_seen), by.into()]);
        // In a fleet: which nodes saw them.
        if fleet {
            row.push(s.nodes.join(","));
        }
        row
    });
    let head = ["ADDRESS", "LOCATION", "METHOD", "RESULT", "REASON", "COUNT", "FIRST SEEN", "LAST SEEN", "BY", "NODES"];
    table(out, &head[..if fleet { head.len() } else { head.len() - 1 }], rows);
}

fn unknown(out: &mut String, rows: &[UnknownSummary]) {
    let rows = rows
        .iter()
        .map(|u| vec![u.address.clone(), u.method.clone(), u.count.to_string(), time(u.first_seen), time(u.last_seen)]);
    table(out, &["ADDRESS", "METHOD", "COUNT", "FIRST SEEN", "LAST SEEN"], rows);
}

impl Render for ActivityShown<'_> {
    fn render(&self, out: &mut String) {
        match self.0 {
            ActivityReport::Records(rows) if rows.is_empty() && self.1.unknown_accounts => unknown(out, &[]),
            ActivityReport::Records(rows) if rows.is_empty() && self.1.summary => signins(out, &[]),
            ActivityReport::Records(rows) => records(out, rows),
            ActivityReport::Signins(rows) => signins(out, rows),
            ActivityReport::UnknownAccounts(rows) => unknown(out, rows),
        }
    }
}

impl Render for StatsReport {
    fn render(&self, out: &mut String) {
        let rows = self.accounts.iter().map(|a| {
            let counts = [a.passed_packets, a.passed_bytes, a.dropped_packets, a.dropped_bytes, a.would_drop_packets];
            std::iter::once(a.account.clone()).chain(counts.map(|n| n.to_string())).collect()
        });
        table(out, &["ACCOUNT", "PASSED", "BYTES", "DROPPED", "BYTES", "WOULD DROP"], rows);
        let h = &self.host;
        let host = format!(
            "non-IP {}, unbound {}, neighbour discovery {}, malformed {}",
            h.non_ip, h.unbound, h.ndp, h.malformed
        );
        line(out, "host", host);
    }
}

impl Render for Imported {
    fn render(&self, out: &mut String) {
        line(out, "accounts", self.accounts.to_string());
        line(out, "created", self.created.to_string());
        line(out, "entries", self.entries.to_string());
    }
}

impl Render for Totals {
    fn render(&self, out: &mut String) {
        self.imported.render(out);
        line(out, "batches", self.batches.to_string());
    }
}

impl Render for ClusterImported {
    fn render(&self, out: &mut String) {
        line(out, "prefix", &self.prefix);
        line(out, "accounts", self.accounts.to_string());
        line(out, "bindings", self.bindings.to_string());
        line(out, "shared sets", self.sets.to_string());
        line(out, "keys written", self.written.to_string());
        line(out, "keys already there", self.already_present.to_string());
        line(out, "revision", self.revision.to_string());
    }
}

impl Render for Detached {
    fn render(&self, out: &mut String) {
        line(out, "interface", &self.interface);
        line(out, "detached", self.detached.to_string());
    }
}

impl Render for StatusReport {
    fn render(&self, out: &mut String) {
        // Interfaces with the path the kernel runs the program in.
        let interfaces: Vec<String> = self
            .xdp
            .iter()
            .map(|x| match x.path {
                Some(path) => format!("{} ({} XDP)", x.interface, name(&path)),
                None => format!("{} (no XDP program: a reload attaches it again)", x.interface),
            })
            .collect();
        line(out, "interfaces", if interfaces.is_empty() { "none".into() } else { interfaces.join(", ") });
        line(out, "accounts", self.accounts.to_string());
        line(out, "pin_dir", &self.pin_dir);
        line(out, "table_slots_used", self.table_slots_used.to_string());
        line(out, "table_slots", self.table_slots.to_string());
        let host = match &self.host_counters {
            Some(h) => format!(
                "non-IP {}, unbound {}, neighbour discovery {}, malformed {}",
                h.non_ip, h.unbound, h.ndp, h.malformed
            ),
            None => "- (the kernel's counters could not be read)".into(),
        };
        line(out, "host_counters", host);
        if let Some(c) = &self.cluster {
            let health = match &c.last_error {
                None if c.connected => "connected".to_owned(),
                None => "not connected".to_owned(),
                Some(why) => format!("unavailable: {why}"),
            };
            line(out, "cluster", format!("node {}, {health}", c.node));
            if c.name_in_use_elsewhere {
                line(out, "name", "another live node uses this node's name: give each node its own [cluster] node");
            }
            let lag = c.cluster_revision - c.applied_revision;
            line(out, "revision", format!("applied {} of {} (lag {lag})", c.applied_revision, c.cluster_revision));
            if c.apply_failures > 0 {
                line(out, "apply_failures", format!("{} (see the daemon's log)", c.apply_failures));
            }
            if !c.unenforced.is_empty() {
                let names = c.unenforced.join(", ");
                line(out, "unenforced", format!("{names} (the previous version is enforced here; retried every 10 s)"));
            }
            if let Some(ms) = c.clock_offset_ms {
                let off = if ms.abs() > 1000 { " (more than 1 s: overrides end at the wrong time here)" } else { "" };
                line(out, "clock", format!("{:+.3} s against etcd{off}", ms as f64 / 1000.0));
            }
        }
    }
}

/// A daemon error for stderr: `error: MESSAGE (CODE)`, then its details, indented: a
/// lockout's shut-out sign-ins as a table, other details as the JSON they are.
pub fn error_text(e: &DaemonError) -> String {
    let code = if e.code.is_empty() { String::new() } else { format!(" ({})", e.code) };
    let mut text = format!("error: {}\n", escape_message(&format!("{}{code}", e.message)));
    if let Some(details) = &e.details {
        let mut shown = String::new();
        // A set change's refusal names the account of each sign-in, and those left with
        // nothing.
        if let Ok(SetShutOut { shut_out, allows_nothing }) = SetShutOut::deserialize(details) {
            let rows = shut_out.iter().map(|s| vec![s.account.clone(), s.address.to_string(), time(s.last_seen)]);
            table(&mut shown, &["ACCOUNT", "ADDRESS", "LAST SEEN"], rows);
            if !allows_nothing.is_empty() {
                line(&mut shown, "would let nobody in", allows_nothing.join(", "));
            }
        } else {
            match ShutOut::deserialize(details) {
                Ok(ShutOut { shut_out }) => {
                    let rows = shut_out.iter().map(|s| vec![s.address.to_string(), time(s.last_seen)]);
                    table(&mut shown, &["ADDRESS", "LAST SEEN"], rows);
                }
                Err(_) => line(&mut shown, "details", details.to_string()),
            }
        }
        shown.lines().for_each(|l| text.push_str(&format!("  {l}\n")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::json;

    /// `value` read as `T` and rendered.
    fn shown<T: DeserializeOwned + Render>(value: Value) -> String {
        let mut out = String::new();
        serde_json::from_value::<T>(value).unwrap().render(&mut out);
        out
    }

    /// A label written to forge a row, clear the screen, retitle the terminal, reverse the
    /// text and hide a character: every cell shows it escaped, on its own row.
    pub const HOSTILE: &str = "\n0.0.0.0/0  forged\x1b[2J\x1b]0;x\x07\u{202e}\u{200b}\u{9b}\\";
    pub const HOSTILE_SHOWN: &str = "\\n0.0.0.0/0  forged\\x1b[2J\\x1b]0;x\\x07\\u{202e}\\u{200b}\\u{9b}\\\\";

    fn entry(cidr: &str, label: &str, enabled: bool) -> Value {
        json!({"account": "acme", "cidr": cidr, "label": label, "created_at": 951_782_400, "created_by": 0,
               "enabled": enabled})
    }

    #[test]
    fn escapes() {
        assert_eq!(escape(HOSTILE), HOSTILE_SHOWN);
        assert_eq!(
            escape("tab\there\r\0\u{7f}\u{85}\u{2028}\u{2066}\u{feff}"),
            "tab\\there\\r\\x00\\x7f\\u{85}\\u{2028}\\u{2066}\\u{feff}"
        );
        // Ordinary text, accents and other scripts pass unchanged.
        assert_eq!(escape("Büro Zürich, 東京 – ok"), "Büro Zürich, 東京 – ok");
        // Cut to the width, between escapes, ellipsis included.
        assert_eq!(escape_within("abcdef", 6), "abcdef");
        assert_eq!(escape_within("abcdefg", 6), "abcde…");
        assert_eq!(escape_within("abcd\n", 6), "abcd\\n");
        assert_eq!(escape_within("abcd\nx", 6), "abcd…");
        assert_eq!(escape_within("abc\x1bdef", 6), "abc…");
        assert_eq!(escape_within("", 6), "");
    }

    #[test]
    fn hostile_label_and_reason_forge_no_row() {
        let out =
            shown::<Vec<Entry>>(json!([entry("198.18.0.0/24", HOSTILE, true), entry("198.18.1.0/24", "plain", true)]));
        let width = HOSTILE_SHOWN.chars().count();
        assert!(width < CELL_WIDTH);
        let pad = |s: &str| format!("{s}{}", " ".repeat(width - s.len()));
        assert_eq!(
            out,
            format!(
                "CIDR           STATUS   {}  EXPIRES  CREATED              BY  LAST SIGN-IN  LAST PACKET\n\
                 198.18.0.0/24  enabled  {HOSTILE_SHOWN}  -        2000-02-29 00:00:00  0   -             -\n\
                 198.18.1.0/24  enabled  {}  -        2000-02-29 00:00:00  0   -             -\n",
                pad("LABEL"),
                pad("plain")
            )
        );
        assert!(!out.contains('\x1b') && !out.contains('\u{202e}') && out.lines().count() == 3, "{out}");

        let out = shown::<Vec<Override>>(json!([{"id": 1, "account": "acme", "cidr": "198.18.0.9/32",
            "ticket": "T\x1b[8m", "reason": "ok\n2   acme     0.0.0.0/0", "operator": 1001, "created_at": 0,
            "expires_at": 951_782_400, "revoked_at": null}]));
        assert_eq!(
            out,
            "ID  ACCOUNT  CIDR           EXPIRES              TICKET    OPERATOR  REASON\n\
             1   acme     198.18.0.9/32  2000-02-29 00:00:00  T\\x1b[8m  1001      ok\\n2   acme     0.0.0.0/0\n"
        );
    }

    #[test]
    fn columns_line_up_as_the_terminal_shows_them() {
        // Wide characters take two columns each, a combining accent none.
        let out =
            shown::<Vec<Entry>>(json!([entry("198.18.0.0/24", "東京", true), entry("fd00::/48", "Ze\u{301}ro", true)]));
        assert_eq!(
            out,
            "CIDR           STATUS   LABEL  EXPIRES  CREATED              BY  LAST SIGN-IN  LAST PACKET\n\
             198.18.0.0/24  enabled  東京   -        2000-02-29 00:00:00  0   -             -\n\
             fd00::/48      enabled  Ze\u{301}ro   -        2000-02-29 00:00:00  0   -             -\n"
        );
    }

    #[test]
    fn huge_label_is_cut_in_tables_only() {
        let label = "x".repeat(65_536);
        let out = shown::<Vec<Entry>>(json!([entry("198.18.0.0/24", &label, false)]));
        let cut = format!("{}…", "x".repeat(CELL_WIDTH - 1));
        assert_eq!(
            out.lines().nth(1),
            Some(format!("198.18.0.0/24  disabled  {cut}  -        2000-02-29 00:00:00  0   -             -").as_str())
        );
        // A `key: value` line shows it all.
        let out = shown::<Noted<Entry>>(entry("198.18.0.0/24", &label, true));
        assert!(out.contains(&format!("label: {label}\n")), "{}", out.len());
    }

    #[test]
    fn verdicts_are_escaped() {
        let out = shown::<CheckResult>(json!({"allowed": false, "reason": "address_not_allowed",
            "hint": "Add it.\nallowed (allowed)\x1b[1A\x1b[2K", "detail": "no entry\u{202e}"}));
        assert_eq!(
            out,
            "denied (address_not_allowed): Add it.\\nallowed (allowed)\\x1b[1A\\x1b[2K\ndetail: no entry\\u{202e}\n"
        );
        let out = shown::<CheckResult>(json!({"allowed": true, "reason": "allowed", "hint": "ignored", "detail": "",
            "via_override": {"id": 3, "expires_at": 951_782_400}}));
        assert_eq!(out, "allowed (allowed)\nvia_override: 3 (until 2000-02-29 00:00:00)\n");
    }

    #[test]
    fn errors_and_their_details() {
        let message = "entry 198.18.0.0/24 of acme exists\n\x1b]8;;http://evil\x07label";
        let e = DaemonError::from_reply(&json!({"code": "entry_exists", "message": message}));
        assert_eq!(
            error_text(&e),
            "error: entry 198.18.0.0/24 of acme exists\\n\\x1b]8;;http://evil\\x07label (entry_exists)\n"
        );
        // A lockout's shut-out sign-ins, readably after the message.
        let e = DaemonError::from_reply(&json!({"code": "lockout", "message": "would shut out 2 recent sign-ins",
            "details": {"shut_out": [{"address": "198.18.0.9", "last_seen": 951_782_400},
                                     {"address": "fd00::9", "last_seen": 951_782_399}]}}));
        assert_eq!(
            error_text(&e),
            "error: would shut out 2 recent sign-ins (lockout)\n\
             \x20 ADDRESS     LAST SEEN\n\
             \x20 198.18.0.9  2000-02-29 00:00:00\n\
             \x20 fd00::9     2000-02-28 23:59:59\n"
        );
        // Details of another shape: the JSON they are, escaped.
        let e = DaemonError::from_reply(&json!({"code": "lockout", "message": "no", "details": {"limit": "2\n4"}}));
        assert_eq!(error_text(&e), "error: no (lockout)\n  details: {\"limit\":\"2\\\\n4\"}\n");
        // An error this client cannot fully read still shows what it says (as JSON, whose
        // escapes are shown once, as a message's own are).
        let e = DaemonError::from_reply(&json!({"code": 9, "message": ["no\n", 1]}));
        assert_eq!(error_text(&e), "error: [\"no\\n\",1] (9)\n");
    }

    #[test]
    fn accounts_for_a_person() {
        let account = json!({"id": "acme-dev", "slot": 2, "parent": "acme", "state": "active",
                             "effective_state": "parent_banned", "mode": "enforce", "state_reason": null,
                             "created_at": 951_782_400});
        let details = json!({"account": account, "entries": [entry("198.18.0.0/24", "office", false)],
            "bindings": [{"account": "acme-dev", "addr": "198.18.0.1", "target": {"proto": "tcp", "port": 443},
                          "created_at": 951_782_400}]});
        assert_eq!(
            shown::<AccountDetails>(details),
            "id: acme-dev\nparent: acme\nstate: parent_banned (own state: active)\nstate_reason: -\nmode: enforce\n\
             slot: 2\ncreated_at: 2000-02-29 00:00:00\n\
             \nallowlist:\n\
             CIDR           STATUS    LABEL   EXPIRES  CREATED              BY  LAST SIGN-IN  LAST PACKET\n\
             198.18.0.0/24  disabled  office  -        2000-02-29 00:00:00  0   -             -\n\
             \nbindings:\n\
             ACCOUNT   ADDRESS     PROTO  PORT\n\
             acme-dev  198.18.0.1  tcp    443\n"
        );
        let mut banned = account.clone();
        banned["effective_state"] = json!("active");
        let out = shown::<AccountDetails>(json!({"account": banned, "entries": [], "bindings": []}));
        assert!(out.contains("state: active\n") && out.ends_with("\nallowlist: none\n\nbindings: none\n"), "{out}");
        let with_sets = json!({"account": banned, "entries": [], "bindings": [], "sets": [
            {"account": "acme-dev", "set": "corp-vpn", "enabled": false, "created_at": 951_782_400, "created_by": 0}]});
        assert!(
            shown::<AccountDetails>(with_sets).ends_with(
                "\nshared sets:\nSET       STATUS    ADDED                BY\ncorp-vpn  disabled  2000-02-29 00:00:00  0\n"
            ),
            "shared sets section"
        );
        let mut top = account.clone();
        (top["id"], top["slot"], top["parent"], top["effective_state"]) =
            (json!("acme"), json!(1), json!(null), json!("banned"));
        top["state"] = json!("banned");
        assert_eq!(
            shown::<Vec<ListedAccount>>(json!([top, account])),
            "ID        SLOT  STATE          MODE     PARENT\nacme      1     banned         enforce  -\n\
             acme-dev  2     parent_banned  enforce  acme\n"
        );
        // Two ids that differ only past a cell's width are shown whole, never cut alike.
        let long = |end: &str| {
            let mut a = account.clone();
            a["id"] = json!(format!("{}{end}", "a".repeat(CELL_WIDTH + 6)));
            a["parent"] = json!(format!("{}-parent", "p".repeat(CELL_WIDTH + 6)));
            a
        };
        let out = shown::<Vec<ListedAccount>>(json!([long("-prod"), long("-dev")]));
        for whole in [
            format!("{}-prod", "a".repeat(70)),
            format!("{}-dev", "a".repeat(70)),
            format!("{}-parent", "p".repeat(70)),
        ] {
            assert!(out.contains(&whole), "{whole} is not shown whole: {out}");
        }
        assert!(!out.contains('…'), "{out}");
    }

    #[test]
    fn status_bindings_and_overrides_for_a_person() {
        let out = shown::<StatusReport>(json!({"accounts": 2, "interfaces": ["veth0", "veth1"],
            "xdp": [{"interface": "veth0", "path": "native"}, {"interface": "veth1\n", "path": null}],
            "pin_dir": "/sys/fs/bpf/ipaccess", "table_slots_used": 3, "table_slots": 65536,
            "host_counters": {"non_ip": 1, "unbound": 2, "ndp": 3, "malformed": 4}}));
        assert_eq!(
            out,
            "interfaces: veth0 (native XDP), veth1\\n (no XDP program: a reload attaches it again)\naccounts: 2\n\
             pin_dir: /sys/fs/bpf/ipaccess\ntable_slots_used: 3\ntable_slots: 65536\n\
             host_counters: non-IP 1, unbound 2, neighbour discovery 3, malformed 4\n"
        );
        let bindings = json!([{"account": "acme", "addr": "198.18.0.1", "target": {"proto": "tcp", "port": 443},
                               "created_at": 0},
                              {"account": "b", "addr": "fd00::1", "target": null, "created_at": 0}]);
        assert_eq!(
            shown::<Vec<Binding>>(bindings.clone()),
            "ACCOUNT  ADDRESS     PROTO  PORT\nacme     198.18.0.1  tcp    443\nb        fd00::1     *      *\n"
        );
        let first: Binding = serde_json::from_value(bindings[0].clone()).unwrap();
        let mut out = String::new();
        Bound(&first).render(&mut out);
        assert_eq!(out, "bound 198.18.0.1 tcp/443 to acme\n");
        let scoped = json!([{"account": "acme", "addr": "198.18.0.1", "target": null, "created_at": 0, "node": "mx2"},
                            {"account": "b", "addr": "fd00::1", "target": null, "created_at": 0}]);
        assert_eq!(
            shown::<Vec<Binding>>(scoped.clone()),
            "ACCOUNT  ADDRESS     PROTO  PORT  NODE\nacme     198.18.0.1  *      *     mx2\nb        fd00::1     *      *     *\n"
        );
        let mut out = String::new();
        Bound(&serde_json::from_value(scoped[0].clone()).unwrap()).render(&mut out);
        assert_eq!(out, "bound 198.18.0.1 (every port) to acme on node mx2\n");
        assert_eq!(
            shown::<Binding>(bindings[1].clone()),
            "account: b\naddr: fd00::1\ntarget: every port\ncreated_at: 1970-01-01 00:00:00\n"
        );

        let row = json!({"id": 7, "account": "acme", "cidr": "fd00::9/128", "ticket": "T-1", "reason": "locked out",
                         "operator": 0, "created_at": 951_782_400, "expires_at": 951_789_600, "revoked_at": null});
        let out = shown::<Granted>(json!({"override": row, "recent_denied": [
            {"address": "fd00::9", "method": "password", "first_seen": 951_782_000, "last_seen": 951_782_300,
             "count": 3, "location": {"country": "NL"}}]}));
        for line in [
            "id: 7\n",
            "cidr: fd00::9/128\n",
            "expires_at: 2000-02-29 02:00:00\n",
            "revoked_at: -\n",
            "\nrecent denied attempts:\nADDRESS  LOCATION  METHOD    FIRST SEEN           LAST SEEN            COUNT\n\
                      fd00::9  NL        password  2000-02-28 23:53:20  2000-02-28 23:58:20  3\n",
        ] {
            assert!(out.contains(line), "{line:?} not in:\n{out}");
        }
        let out = shown::<Granted>(json!({"override": row, "recent_denied": [], "notes": ["mapped\n"]}));
        assert!(out.ends_with("revoked_at: -\n\nno denied attempts recorded\nnote: mapped\\n\n"), "{out}");
    }

    #[test]
    fn activity_tables() {
        let report = json!([
            {"time": 951_782_400, "first_seen": 951_782_000, "count": 4, "account": "acme", "kind": "signin",
             "address": "198.18.0.9", "method": "password", "allowed": false, "reason": "address_not_allowed",
             "uid": 33, "detail": {"application": true}},
            {"time": 951_782_399, "first_seen": 951_782_399, "count": 1, "account": "acme", "kind": "audit",
             "address": null, "method": null, "allowed": null, "reason": "allow_add", "uid": 0, "detail": {}},
            {"time": 951_782_398, "first_seen": 951_782_001, "count": 12, "account": "acme", "kind": "drop",
             "address": "fd00::9", "method": null, "allowed": false, "reason": "address_not_allowed", "uid": null,
             "detail": {"destination": "fd00::1", "protocol": 17, "port": 53}}]);
        let records = Asked { summary: false, unknown_accounts: false };
        let render = |report: Value, asked| {
            let mut out = String::new();
            ActivityShown(&serde_json::from_value(report).unwrap(), asked).render(&mut out);
            out
        };
        assert_eq!(
            render(report, records),
            "LAST SEEN            KIND    ADDRESS     TO                METHOD    RESULT  REASON               COUNT  UID\n\
             2000-02-29 00:00:00  signin  198.18.0.9  -                 password  denied  address_not_allowed  4      33\n\
             2000-02-28 23:59:59  audit   -           -                 -         -       allow_add            1      0\n\
             2000-02-28 23:59:58  drop    fd00::9     [fd00::1]:53/udp  -         denied  address_not_allowed  12     -\n"
        );
        let summary = Asked { summary: true, unknown_accounts: false };
        assert_eq!(
            render(json!([]), summary),
            "ADDRESS  LOCATION  METHOD  RESULT  REASON  COUNT  FIRST SEEN  LAST SEEN  BY\n"
        );
        // A location as the database gives it, its text escaped like a tenant's.
        let signins = json!([{"address": "198.18.0.9", "method": "sso", "allowed": true, "reason": "allowed",
                              "application": false, "count": 2, "first_seen": 0, "last_seen": 60,
                              "location": {"country": "XA", "city": "Gr\u{1b}[2Jn"}},
                             {"address": "fd00::7", "method": "sso", "allowed": true, "reason": "allowed",
                              "application": false, "count": 1, "first_seen": 0, "last_seen": 0}]);
        assert_eq!(
            render(signins, summary),
            "ADDRESS     LOCATION        METHOD  RESULT   REASON   COUNT  FIRST SEEN           LAST SEEN            BY\n\
             198.18.0.9  Gr\\x1b[2Jn, XA  sso     allowed  allowed  2      1970-01-01 00:00:00  1970-01-01 00:01:00  staff\n\
             fd00::7     -               sso     allowed  allowed  1      1970-01-01 00:00:00  1970-01-01 00:00:00  staff\n"
        );
        let unknown = Asked { summary: false, unknown_accounts: true };
        let rows =
            json!([{"address": "198.18.66.6", "method": "password", "count": 7, "first_seen": 0, "last_seen": 60}]);
        assert_eq!(
            render(rows, unknown),
            "ADDRESS      METHOD    COUNT  FIRST SEEN           LAST SEEN\n\
             198.18.66.6  password  7      1970-01-01 00:00:00  1970-01-01 00:01:00\n"
        );
        assert_eq!(render(json!([]), unknown), "ADDRESS  METHOD  COUNT  FIRST SEEN  LAST SEEN\n");
    }

    #[test]
    fn stats_removals_and_imports() {
        let out =
            shown::<StatsReport>(json!({"accounts": [{"account": "acme", "passed_packets": 1, "passed_bytes": 60,
            "dropped_packets": 2, "dropped_bytes": 120, "would_drop_packets": 0, "would_drop_bytes": 0}],
            "host": {"non_ip": 1, "unbound": 2, "ndp": 3, "malformed": 4}}));
        assert_eq!(
            out,
            "ACCOUNT  PASSED  BYTES  DROPPED  BYTES  WOULD DROP\nacme     1       60     2        120    0\n\
             host: non-IP 1, unbound 2, neighbour discovery 3, malformed 4\n"
        );
        assert_eq!(shown::<Removed>(json!({"removed": ["acme-dev", "acme"]})), "removed: acme-dev, acme\n");
        assert_eq!(
            shown::<EntryRemoved>(json!({"account": "acme", "removed": "203.0.113.5/32"})),
            "account: acme\nremoved: 203.0.113.5/32\n"
        );
        let totals = Totals { imported: Imported { accounts: 3, created: 2, entries: 5 }, batches: 1 };
        let mut out = String::new();
        totals.render(&mut out);
        assert_eq!(out, "accounts: 3\ncreated: 2\nentries: 5\nbatches: 1\n");
        assert_eq!(
            shown::<ClusterImported>(json!({"prefix": "/ipa/", "accounts": 2, "bindings": 1, "written": 5,
                "already_present": 0, "revision": 9})),
            "prefix: /ipa/\naccounts: 2\nbindings: 1\nshared sets: 0\nkeys written: 5\nkeys already there: 0\nrevision: 9\n"
        );
        assert_eq!(
            shown::<Detached>(json!({"interface": "eth0", "detached": true})),
            "interface: eth0\ndetached: true\n"
        );
    }
}
