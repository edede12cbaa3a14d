//! ipaccessctl: the command-line client of ipaccessd's control socket.
//!
//! One request line out, one reply line back (see `ipaccess::protocol`). Exit status: 0 on
//! success, 2 on any error; `check` exits 1 when the login is denied.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};
use ipaccess::protocol::{
    AccountState, ActivityKind, CheckResult, Command, ErrorBody, ImportAccount, Method, Mode, Proto, ReplaceEntry,
    Reason, Reply, Request,
};
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde_json::Value;

const DEFAULT_SOCKET: &str = "/run/ipaccess/ipaccessd.sock";
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(
    name = "ipaccessctl",
    version,
    about = "Manage ipaccessd: accounts, allowlists, bindings, login checks, support overrides"
)]
struct Cli {
    /// Control socket [env: IPACCESS_SOCKET] [default: /run/ipaccess/ipaccessd.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print the daemon's result (or error object) as JSON on stdout
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand, Debug)]
enum Top {
    /// Accounts: creation, state and access mode
    #[command(subcommand)]
    Account(AccountCmd),
    /// An account's IP allowlist
    #[command(subcommand)]
    Allow(AllowCmd),
    /// Destination endpoints owned by accounts
    #[command(subcommand)]
    Bind(BindCmd),
    /// May ACCOUNT log in from ADDR? Exit 0 if allowed, 1 if denied, 2 on error
    Check {
        /// The account signing in
        account: String,
        /// The address the sign-in comes from
        addr: IpAddr,
        /// How the user signs in, recorded in the activity log
        #[arg(long, value_parser = one_of::<Method>(&["password", "api_key", "sso"]))]
        method: Option<Method>,
    },
    /// Support overrides: temporary access for an address, tied to a ticket
    #[command(subcommand)]
    Override(OverrideCmd),
    /// An account's recorded activity, newest first: sign-ins and dropped packets counted per
    /// hour, audited changes one by one
    Activity {
        /// Account id (left out with --unknown-accounts)
        #[arg(required_unless_present = "unknown_accounts")]
        id: Option<String>,
        /// Only this far back (90s, 30m, 2h, 7d or seconds)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        since: Option<u64>,
        /// Only denied sign-ins and drops (and would-be denials in monitor mode)
        #[arg(long)]
        denied: bool,
        /// Only sign-ins (login checks), drops (refused packets) or audit (changes)
        #[arg(long, value_parser = one_of::<ActivityKind>(&["signin", "drop", "audit"]))]
        kind: Option<ActivityKind>,
        /// Sign-ins per address and method: count, first and last seen, allowed or denied
        #[arg(long)]
        summary: bool,
        /// Sign-ins for accounts that do not exist, per address (the names tried are not kept)
        #[arg(long, conflicts_with_all = ["id", "kind", "summary", "denied"])]
        unknown_accounts: bool,
        /// At most N rows
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        limit: Option<u32>,
    },
    /// Bulk-load accounts and allowlists from FILE (`-`: stdin), one JSON object per line:
    /// {"account": "acme", "mode": "enforce", "entries": [{"cidr": "198.18.0.0/24"}]}
    /// (optional: parent, state, mode, entries; see docs/protocol.md). Sent in batches,
    /// each applied whole; importing a file again is harmless.
    Import {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// Largest request to send, in bytes (the daemon's limit for admins is larger)
        #[arg(long, value_name = "BYTES", default_value_t = 1 << 20,
              value_parser = clap::value_parser!(u64).range(1024..))]
        batch_bytes: u64,
    },
    /// Packet counters from the kernel: one account's, or all accounts' and the host's
    Stats {
        /// Account id (all accounts and the host if omitted)
        id: Option<String>,
    },
    /// Remove the filter from an interface (stopping the daemon never does)
    Detach {
        /// Interface name, e.g. eth0
        interface: String,
    },
    /// Daemon status: interfaces and where XDP runs on them, accounts, table fill, host counters
    Status,
}

#[derive(Subcommand, Debug)]
enum OverrideCmd {
    /// Let ADDR|CIDR reach an account for a while (a bare address means that one host)
    Grant {
        /// Account id
        id: String,
        /// The address the customer is locked out from (or a CIDR covering it)
        #[arg(value_name = "ADDR|CIDR", value_parser = parse_cidr)]
        cidr: IpNet,
        /// How long it lasts (90s, 30m, 2h, 7d or seconds)
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: u64,
        /// Support ticket that justifies it
        #[arg(long, value_name = "T")]
        ticket: String,
        /// Why access is granted, e.g. how ownership was verified (audited)
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Revoke an override before it expires
    Revoke {
        /// Account id
        id: String,
        /// The override's id (from `override list` or the grant's reply)
        override_id: i64,
    },
    /// List live overrides, of one account or all
    List {
        /// Account id (all accounts if omitted)
        id: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AccountCmd {
    /// Create an account
    Add {
        /// Account id: the platform's own name for the account
        id: String,
        /// Parent account (this one becomes a sub-user)
        #[arg(long, value_name = "ID")]
        parent: Option<String>,
        /// Start unconfirmed (until the email address is confirmed)
        #[arg(long)]
        unconfirmed: bool,
    },
    /// Show one account
    Show {
        /// Account id
        id: String,
    },
    /// List all accounts
    List,
    /// Set an account's state
    State {
        /// Account id
        id: String,
        /// banned also suspends sub-users; terminated is for non-payment; either drops all
        /// traffic to the account's bindings
        #[arg(value_parser = one_of::<AccountState>(&["active", "unconfirmed", "terminated", "banned"]))]
        state: AccountState,
        /// Why, kept with the state and audited
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Set an account's access mode
    Mode {
        /// Account id
        id: String,
        /// off: not filtered; monitor: allowed, would-be denials recorded; enforce: dropped
        #[arg(value_parser = one_of::<Mode>(&["off", "monitor", "enforce"]))]
        mode: Mode,
        /// Your own address: refused if the change would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Apply even if it locks out --client-ip
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AllowCmd {
    /// Allow a CIDR (a bare address means that one host)
    Add {
        /// Account id
        id: String,
        /// IPv4 or IPv6 CIDR, or a bare address
        #[arg(value_parser = parse_cidr)]
        cidr: IpNet,
        /// A note shown with the entry, e.g. "office"
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
    },
    /// Remove an allowlist entry
    Remove {
        /// Account id
        id: String,
        /// The entry, as added
        #[arg(value_parser = parse_cidr)]
        cidr: IpNet,
        /// Your own address: refused if the removal would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Remove even if it locks out --client-ip
        #[arg(long)]
        force: bool,
    },
    /// List an account's allowlist
    List {
        /// Account id
        id: String,
    },
    /// Replace the whole allowlist from FILE: one `CIDR [label]` per line, `#` comments
    Replace {
        /// Account id
        id: String,
        /// The new list (`-`: stdin)
        #[arg(long, value_name = "FILE")]
        file: std::path::PathBuf,
        /// Your own address: refused if the new list would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Replace even if it locks out --client-ip
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum BindCmd {
    /// Bind ADDR[:PORT] to an account (IPv6 with a port: [ADDR]:PORT; no port: whole address)
    Add {
        /// Account id
        id: String,
        /// The account's endpoint on this host
        #[arg(value_name = "ADDR[:PORT]", value_parser = parse_endpoint)]
        addr: (IpAddr, Option<u16>),
        /// Protocol of a port binding [default: tcp]
        #[arg(long, value_parser = one_of::<Proto>(&["tcp", "udp"]))]
        proto: Option<Proto>,
    },
    /// Remove a binding
    Remove {
        /// The endpoint, as bound
        #[arg(value_name = "ADDR[:PORT]", value_parser = parse_endpoint)]
        addr: (IpAddr, Option<u16>),
        /// Protocol of a port binding [default: tcp]
        #[arg(long, value_parser = one_of::<Proto>(&["tcp", "udp"]))]
        proto: Option<Proto>,
    },
    /// List all bindings
    List,
}

/// Clap parser for a protocol enum: `--help` lists the names, serde maps them to the type.
fn one_of<T: DeserializeOwned + Clone + Send + Sync + 'static>(
    names: &'static [&'static str],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(names)
        .map(|s| serde_json::from_value(Value::String(s)).expect("listed names are protocol names"))
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("`{s}` is neither a CIDR (203.0.113.0/24, 2001:db8::/48) nor an address"))
}

/// `90s`, `30m`, `2h`, `7d` or plain seconds, as seconds; zero is refused.
fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("`{s}` is not a duration: use a number with s, m, h or d (90s, 30m, 2h, 7d), or seconds");
    let (digits, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| format!("`{s}` is too long a duration"))?;
    match n.checked_mul(scale) {
        Some(0) => Err("the duration must be more than zero".into()),
        Some(secs) => Ok(secs),
        None => Err(format!("`{s}` is too long a duration")),
    }
}

/// `ADDR`, `[IPv6]`, `IPv4:PORT` or `[IPv6]:PORT`.
fn parse_endpoint(s: &str) -> Result<(IpAddr, Option<u16>), String> {
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    if let Ok(addr) = bare.parse::<IpAddr>() {
        return Ok((addr, None));
    }
    match s.parse::<SocketAddr>() {
        Ok(sa) if sa.port() == 0 => {
            Err("port 0 cannot be bound; leave the port out to bind the whole address".into())
        }
        Ok(sa) => Ok((sa.ip(), Some(sa.port()))),
        Err(_) => Err(format!("`{s}` is not ADDR, ADDR:PORT or [IPv6]:PORT")),
    }
}

/// An allowlist file: one `CIDR [label]` per line; blank lines and `#` comments are skipped.
fn parse_allow_file(text: &str) -> Result<Vec<ReplaceEntry>, Failure> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (cidr, label) = match line.split_once(char::is_whitespace) {
            Some((cidr, label)) => (cidr, Some(label.trim().to_string())),
            None => (line, None),
        };
        let cidr = parse_cidr(cidr).map_err(|e| Failure::Local(format!("line {}: {e}", n + 1)))?;
        entries.push(ReplaceEntry { cidr, label });
    }
    Ok(entries)
}

/// A bare address binds all of it, so a protocol makes sense only with a port.
fn endpoint(
    addr: (IpAddr, Option<u16>),
    proto: Option<Proto>,
) -> Result<(IpAddr, Option<u16>, Option<Proto>), Failure> {
    match (addr.1, proto) {
        (None, Some(_)) => {
            Err(Failure::Local("--proto needs a port (ADDR:PORT); a bare address binds every port".into()))
        }
        (Some(port), proto) => Ok((addr.0, Some(port), Some(proto.unwrap_or(Proto::Tcp)))),
        (None, None) => Ok((addr.0, None, None)),
    }
}

fn request(top: Top) -> Result<Command, Failure> {
    Ok(match top {
        Top::Account(AccountCmd::Add { id, parent, unconfirmed }) => {
            Command::AccountAdd { account: id, parent, unconfirmed }
        }
        Top::Account(AccountCmd::Show { id }) => Command::AccountShow { account: id },
        Top::Account(AccountCmd::List) => Command::AccountList {},
        Top::Account(AccountCmd::State { id, state, reason }) => {
            Command::AccountState { account: id, state, reason }
        }
        Top::Account(AccountCmd::Mode { id, mode, client_ip, force }) => {
            Command::AccountMode { account: id, mode, client_ip, force }
        }
        Top::Allow(AllowCmd::Add { id, cidr, label }) => Command::AllowAdd { account: id, cidr, label },
        Top::Allow(AllowCmd::Remove { id, cidr, client_ip, force }) => {
            Command::AllowRemove { account: id, cidr, client_ip, force }
        }
        Top::Allow(AllowCmd::List { id }) => Command::AllowList { account: id },
        Top::Allow(AllowCmd::Replace { id, file, client_ip, force }) => {
            let text = read_input(&file)?;
            Command::AllowReplace { account: id, entries: parse_allow_file(&text)?, client_ip, force }
        }
        Top::Stats { id } => Command::Stats { account: id },
        Top::Detach { interface } => Command::Detach { interface },
        Top::Bind(BindCmd::Add { id, addr, proto }) => {
            let (addr, port, proto) = endpoint(addr, proto)?;
            Command::BindAdd { account: id, addr, port, proto }
        }
        Top::Bind(BindCmd::Remove { addr, proto }) => {
            let (addr, port, proto) = endpoint(addr, proto)?;
            Command::BindRemove { addr, port, proto }
        }
        Top::Bind(BindCmd::List) => Command::BindList {},
        Top::Check { account, addr, method } => Command::Check { account, addr, method, dry_run: false },
        Top::Override(OverrideCmd::Grant { id, cidr, ttl, ticket, reason }) => {
            Command::OverrideGrant { account: id, cidr, ttl_seconds: ttl, ticket, reason }
        }
        Top::Override(OverrideCmd::Revoke { id, override_id }) => {
            Command::OverrideRevoke { account: id, override_id }
        }
        Top::Override(OverrideCmd::List { id }) => Command::OverrideList { account: id },
        Top::Activity { id, since, denied, kind, summary, unknown_accounts, limit } => Command::Activity {
            account: id,
            since_seconds: since,
            denied_only: denied,
            limit,
            kind,
            summary,
            unknown_accounts,
        },
        Top::Status => Command::Status {},
        Top::Import { .. } => unreachable!("an import is many requests; see `import`"),
    })
}

/// Reads an import file: one account per line; blank lines and lines starting with `#`
/// are skipped. The whole file is checked before anything is sent.
fn parse_import_file(text: &str) -> Result<Vec<(usize, ImportAccount)>, Failure> {
    let mut accounts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let account = serde_json::from_str(line).map_err(|e| Failure::Local(format!("line {}: {e}", n + 1)))?;
        accounts.push((n + 1, account));
    }
    Ok(accounts)
}

/// The whole of `file`, or of standard input for `-`.
fn read_input(file: &Path) -> Result<String, Failure> {
    if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| Failure::Local(format!("reading stdin: {e}")))
    } else {
        std::fs::read_to_string(file).map_err(|e| Failure::Local(format!("reading {}: {e}", file.display())))
    }
}

/// Sends an import in batches of at most `batch_bytes` (an account larger than that goes
/// alone) and totals the replies. Each batch is one change; after a failed batch the ones
/// before it stay applied, and running the same file again finishes the job.
fn import(socket: &Path, file: &Path, batch_bytes: u64) -> Result<Value, Failure> {
    let text = read_input(file)?;
    let accounts = parse_import_file(&text)?;
    let mut batches: Vec<Vec<(usize, ImportAccount)>> = Vec::new();
    let mut size = 0;
    for (line, account) in accounts {
        let bytes = serde_json::to_string(&account).expect("accounts serialize").len() as u64 + 1;
        match batches.last_mut() {
            Some(batch) if size + bytes <= batch_bytes => batch.push((line, account)),
            _ => {
                batches.push(vec![(line, account)]);
                size = 0;
            }
        }
        size += bytes;
    }
    let mut total = serde_json::Map::new();
    for key in ["accounts", "created", "entries"] {
        total.insert(key.into(), Value::from(0u64));
    }
    for (done, batch) in batches.iter().enumerate() {
        let lines = (batch[0].0, batch[batch.len() - 1].0);
        let accounts = batch.iter().map(|(_, a)| a.clone()).collect();
        let reply = call(socket, Command::Import { accounts }).map_err(|e| {
            let applied = if done == 0 { "nothing was imported".to_string() } else {
                format!("lines before {} are imported; run the import again once this is fixed", lines.0)
            };
            match e {
                Failure::Daemon(body) => Failure::Daemon(ErrorBody {
                    message: format!("lines {}-{}: {} ({applied})", lines.0, lines.1, body.message),
                    ..body
                }),
                Failure::Local(message) => Failure::Local(format!("lines {}-{}: {message} ({applied})", lines.0, lines.1)),
            }
        })?;
        for (key, sum) in total.iter_mut() {
            *sum = Value::from(sum.as_u64().unwrap_or(0) + reply[key].as_u64().unwrap_or(0));
        }
    }
    total.insert("batches".into(), Value::from(batches.len()));
    Ok(Value::Object(total))
}

#[derive(Debug)]
enum Failure {
    Daemon(ErrorBody),
    Local(String),
}

/// Sends one request and waits for its reply.
fn call(socket: &Path, command: Command) -> Result<Value, Failure> {
    let io = |what: &str, e: std::io::Error| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            Failure::Local(format!("no reply from {} within 10 s", socket.display()))
        }
        _ => Failure::Local(format!("{what} {}: {e}", socket.display())),
    };
    let stream = UnixStream::connect(socket).map_err(|e| {
        Failure::Local(format!(
            "cannot connect to {}: {e}; is ipaccessd running, and may you use its socket? \
             (another path: --socket or IPACCESS_SOCKET)",
            socket.display()
        ))
    })?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TIMEOUT)))
        .map_err(|e| io("cannot set timeouts on", e))?;
    let id = Value::from(std::process::id());
    let mut line = serde_json::to_string(&Request { id: id.clone(), command }).expect("requests serialize");
    line.push('\n');
    (&stream).write_all(line.as_bytes()).map_err(|e| io("cannot send to", e))?;
    let mut reply = String::new();
    if BufReader::new(&stream).read_line(&mut reply).map_err(|e| io("cannot read from", e))? == 0 {
        return Err(Failure::Local(format!("{} closed the connection without replying", socket.display())));
    }
    let reply: Reply = serde_json::from_str(&reply)
        .map_err(|e| Failure::Local(format!("unreadable reply from the daemon: {e}")))?;
    // Errors about a line the daemon could not read (too large, busy) carry no id.
    let unread = reply.id.is_null() && reply.error.is_some();
    if reply.id != id && !unread {
        return Err(Failure::Local(format!("reply is for request {}, not {id}", reply.id)));
    }
    match reply.error {
        Some(error) => Err(Failure::Daemon(error)),
        // `"ok": null` deserializes to None: a success without a result.
        None => Ok(reply.ok.unwrap_or(Value::Null)),
    }
}

/// Unix seconds as UTC `YYYY-MM-DD HH:MM:SS` (Howard Hinnant's civil_from_days).
fn format_time(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let (era, doe) = (z.div_euclid(146_097), z.rem_euclid(146_097));
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn cell(key: &str, v: &Value) -> String {
    let is_time = key.ends_with("_at") || matches!(key, "time" | "first_seen" | "last_seen");
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) if is_time && n.is_i64() => format_time(n.as_i64().unwrap_or_default()),
        other => other.to_string(),
    }
}

/// Lists may come bare or wrapped in an object (`{"accounts": [...]}`).
fn rows(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Object(o) => o.values().find_map(|v| v.as_array().cloned()).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn table(out: &mut String, head: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for row in &rows {
        widths.iter_mut().zip(row).for_each(|(w, c)| *w = (*w).max(c.chars().count()));
    }
    let head = head.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(head).chain(rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
}

/// An activity row's outcome: allowed or denied (`-` for audit records).
fn result(r: &Value) -> &'static str {
    match r["allowed"] {
        Value::Bool(true) => "allowed",
        Value::Bool(false) => "denied",
        _ => "-",
    }
}

fn human(command: &Command, v: &Value) -> String {
    let mut out = String::new();
    let col = |r: &Value, k: &str| cell(k, &r[k]);
    match command {
        Command::AccountList {} => {
            let rows = rows(v)
                .iter()
                .map(|r| ["id", "slot", "state", "mode", "parent"].map(|k| col(r, k)).to_vec())
                .collect();
            table(&mut out, &["ID", "SLOT", "STATE", "MODE", "PARENT"], rows);
        }
        Command::AllowList { .. } | Command::AllowReplace { .. } => {
            let rows = rows(v)
                .iter()
                .map(|r| ["cidr", "label", "created_at", "created_by"].map(|k| col(r, k)).to_vec())
                .collect();
            table(&mut out, &["CIDR", "LABEL", "CREATED", "BY"], rows);
        }
        Command::Stats { .. } => {
            let rows = rows(&v["accounts"])
                .iter()
                .map(|r| {
                    ["account", "passed_packets", "passed_bytes", "dropped_packets", "dropped_bytes", "would_drop_packets"]
                        .map(|k| col(r, k))
                        .to_vec()
                })
                .collect();
            table(&mut out, &["ACCOUNT", "PASSED", "BYTES", "DROPPED", "BYTES", "WOULD DROP"], rows);
            let h = &v["host"];
            out.push_str(&format!(
                "host: non-IP {}, unbound {}, neighbour discovery {}, malformed {}\n",
                cell("", &h["non_ip"]),
                cell("", &h["unbound"]),
                cell("", &h["ndp"]),
                cell("", &h["malformed"])
            ));
        }
        Command::BindList {} => {
            let rows = rows(v)
                .iter()
                .map(|r| {
                    // A port binding's target is {"proto": .., "port": ..}; null is the whole address.
                    let (proto, port) = match &r["target"] {
                        Value::Object(t) => (cell("", &t["proto"]), cell("", &t["port"])),
                        _ => ("*".into(), "*".into()),
                    };
                    vec![col(r, "account"), col(r, "addr"), proto, port]
                })
                .collect();
            table(&mut out, &["ACCOUNT", "ADDRESS", "PROTO", "PORT"], rows);
        }
        Command::OverrideGrant { .. } => {
            key_values(&mut out, &v["override"], |_| true);
            let denied = v["recent_denied"].as_array().cloned().unwrap_or_default();
            if denied.is_empty() {
                out.push_str("\nno denied attempts recorded\n");
            } else {
                out.push_str("\nrecent denied attempts:\n");
                let rows = denied
                    .iter()
                    .map(|r| ["address", "method", "first_seen", "last_seen", "count"].map(|k| col(r, k)).to_vec())
                    .collect();
                table(&mut out, &["ADDRESS", "METHOD", "FIRST SEEN", "LAST SEEN", "COUNT"], rows);
            }
        }
        Command::OverrideList { .. } => {
            let rows = rows(v)
                .iter()
                .map(|r| ["id", "account", "cidr", "expires_at", "ticket", "reason"].map(|k| col(r, k)).to_vec())
                .collect();
            table(&mut out, &["ID", "ACCOUNT", "CIDR", "EXPIRES", "TICKET", "REASON"], rows);
        }
        Command::Activity { unknown_accounts: true, .. } => {
            let rows = rows(v)
                .iter()
                .map(|r| ["address", "method", "count", "first_seen", "last_seen"].map(|k| col(r, k)).to_vec())
                .collect();
            table(&mut out, &["ADDRESS", "METHOD", "COUNT", "FIRST SEEN", "LAST SEEN"], rows);
        }
        Command::Activity { summary: true, .. } => {
            let rows = rows(v)
                .iter()
                .map(|r| {
                    let by = if r["application"] == Value::Bool(false) { "staff" } else { "application" };
                    let mut row = vec![col(r, "address"), col(r, "method"), result(r).into(), col(r, "reason")];
                    row.extend([col(r, "count"), col(r, "first_seen"), col(r, "last_seen"), by.into()]);
                    row
                })
                .collect();
            let head = ["ADDRESS", "METHOD", "RESULT", "REASON", "COUNT", "FIRST SEEN", "LAST SEEN", "BY"];
            table(&mut out, &head, rows);
        }
        Command::Activity { .. } => {
            let rows = rows(v)
                .iter()
                .map(|r| {
                    // A drop's destination endpoint, `198.18.0.1:7100/tcp`; `*` beyond the hour's cap.
                    let d = &r["detail"];
                    let to = match (&d["destination"], d["protocol"].as_u64(), d["port"].as_u64()) {
                        (Value::String(dst), Some(proto), Some(port)) if r["kind"] == "drop" => {
                            let proto = match proto {
                                6 => "tcp".to_string(),
                                17 => "udp".to_string(),
                                n => n.to_string(),
                            };
                            let dst = if dst.contains(':') { format!("[{dst}]") } else { dst.clone() };
                            cell("", &Value::String(format!("{dst}:{port}/{proto}")))
                        }
                        _ => "-".into(),
                    };
                    let mut row = vec![col(r, "time"), col(r, "kind"), col(r, "address"), to, col(r, "method")];
                    row.extend([result(r).into(), col(r, "reason"), col(r, "count"), col(r, "uid")]);
                    row
                })
                .collect();
            let head = ["LAST SEEN", "KIND", "ADDRESS", "TO", "METHOD", "RESULT", "REASON", "COUNT", "UID"];
            table(&mut out, &head, rows);
        }
        Command::Status {} => {
            // Interfaces with the path the kernel runs the program in; the rest as it comes.
            let interfaces: Vec<String> = rows(&v["xdp"])
                .iter()
                .map(|a| match &a["path"] {
                    Value::Null => format!("{} (no XDP program: a reload attaches it again)", cell("", &a["interface"])),
                    path => format!("{} ({} XDP)", cell("", &a["interface"]), cell("", path)),
                })
                .collect();
            let interfaces = if interfaces.is_empty() { "none".to_string() } else { interfaces.join(", ") };
            out.push_str(&format!("interfaces: {interfaces}\n"));
            key_values(&mut out, v, |k| !matches!(k, "interfaces" | "xdp"));
        }
        _ => key_values(&mut out, v, |_| true),
    }
    out
}

/// An object as `key: value` lines (the keys `shown` accepts), anything else as one line.
fn key_values(out: &mut String, v: &Value, shown: impl Fn(&str) -> bool) {
    match v {
        Value::Object(o) => {
            o.iter().filter(|(k, _)| shown(k)).for_each(|(k, v)| out.push_str(&format!("{k}: {}\n", cell(k, v))))
        }
        Value::Null => {}
        other => out.push_str(&format!("{}\n", cell("", other))),
    }
}

/// Parses `args`, runs the command and writes its output to `out`; returns the exit status.
fn run<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I, out: &mut dyn Write) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print(); // Usage errors exit 2, --help and --version 0.
            return e.exit_code();
        }
    };
    let socket = cli
        .socket
        .or_else(|| std::env::var_os("IPACCESS_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| DEFAULT_SOCKET.into());
    let result = match cli.command {
        Top::Import { file, batch_bytes } => {
            import(&socket, &file, batch_bytes).map(|v| (Command::Import { accounts: Vec::new() }, v))
        }
        top => request(top).and_then(|command| call(&socket, command.clone()).map(|v| (command, v))),
    };
    let (text, status) = match result {
        Ok((command, v)) => {
            // Checks answer through the exit status too, for scripts.
            let check = matches!(command, Command::Check { .. })
                .then(|| serde_json::from_value::<CheckResult>(v.clone()));
            let status = match &check {
                Some(Ok(c)) if !c.allowed => 1,
                Some(Err(e)) => {
                    eprintln!("error: unreadable check result: {e}");
                    return 2;
                }
                _ => 0,
            };
            let text = match check {
                _ if cli.json => format!("{}\n", serde_json::to_string_pretty(&v).expect("values serialize")),
                Some(Ok(c)) => {
                    let reason = serde_json::to_value(c.reason).expect("reasons serialize");
                    let verdict = if c.allowed { "allowed" } else { "denied" };
                    let hint = if c.reason == Reason::Allowed || c.hint.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", c.hint)
                    };
                    format!("{verdict} ({}){hint}\n", reason.as_str().unwrap_or_default())
                }
                _ => human(&command, &v),
            };
            (text, status)
        }
        Err(Failure::Daemon(e)) => {
            let code = serde_json::to_value(e.code).expect("codes serialize");
            eprintln!("error: {} ({})", e.message, code.as_str().unwrap_or_default());
            let json = if cli.json {
                serde_json::to_string_pretty(&e).expect("errors serialize") + "\n"
            } else {
                String::new()
            };
            (json, 2)
        }
        Err(Failure::Local(message)) => {
            eprintln!("error: {message}");
            return 2;
        }
    };
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `ipaccessctl account list | head` is not an error.
        Err(e) if e.kind() != ErrorKind::BrokenPipe => {
            eprintln!("error: cannot write output: {e}");
            2
        }
        _ => status,
    }
}

fn main() {
    if let Some(status) = ipaccess::docs::generate_if_requested(<Cli as clap::CommandFactory>::command, "ipaccessctl") {
        std::process::exit(status);
    }
    std::process::exit(run(std::env::args_os(), &mut std::io::stdout().lock()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn endpoints() {
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(parse_endpoint("198.18.0.1:443"), Ok((v4, Some(443))));
        assert_eq!(parse_endpoint("198.18.0.1"), Ok((v4, None)));
        assert_eq!(parse_endpoint("[fd00::1]:443"), Ok((v6, Some(443))));
        assert_eq!(parse_endpoint("fd00::1"), Ok((v6, None)));
        assert_eq!(parse_endpoint("[fd00::1]"), Ok((v6, None)));
        for bad in [
            "fd00::1:443x",
            "198.18.0.1:",
            "198.18.0.1:70000",
            "host:443",
            "[198.18.0.1]:443",
            "198.18.0.1:0",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(endpoint((v4, Some(53)), None).unwrap(), (v4, Some(53), Some(Proto::Tcp)));
        assert_eq!(endpoint((v4, Some(53)), Some(Proto::Udp)).unwrap(), (v4, Some(53), Some(Proto::Udp)));
        assert!(endpoint((v4, None), Some(Proto::Udp)).is_err());
        assert_eq!(parse_cidr("203.0.113.7"), Ok("203.0.113.7/32".parse().unwrap()));
    }

    #[test]
    fn times() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59");
        assert_eq!(format_time(4_102_444_800), "2100-01-01 00:00:00");
    }

    #[test]
    fn durations() {
        for (s, secs) in [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604_800), ("45", 45), ("0010m", 600)] {
            assert_eq!(parse_duration(s), Ok(secs), "{s}");
        }
        for bad in ["", "0", "0s", "0d", "s", "h", "-5", "+5", "1.5h", "2w", "2 h", " 2h", "2H", "h2", "2hh", "1e3",
                    "99999999999999999999", "999999999999999999d", "３s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let e = Cli::try_parse_from(["x", "override", "grant", "a", "192.0.2.1", "--ttl", "0", "--ticket", "T",
                                     "--reason", "r"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(e.to_string().contains("more than zero"), "{e}");
        assert!(Cli::try_parse_from(["x", "activity", "a", "--since", "soon"]).is_err());
        assert!(Cli::try_parse_from(["x", "activity", "a", "--limit", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "activity", "a", "--since", "2h", "--denied", "--limit", "5"]).is_ok());
        assert!(Cli::try_parse_from(["x", "activity", "a", "--kind", "signin", "--denied"]).is_ok());
        assert!(Cli::try_parse_from(["x", "activity", "a", "--kind", "check"]).is_err());
        assert!(Cli::try_parse_from(["x", "activity"]).is_err());
        assert!(Cli::try_parse_from(["x", "activity", "a", "--unknown-accounts"]).is_err());
        assert!(Cli::try_parse_from(["x", "activity", "a", "--summary", "--kind", "drop"]).is_ok());
    }

    #[test]
    fn clap_config_and_enum_names() {
        <Cli as clap::CommandFactory>::command().debug_assert();
        for m in ["password", "api_key", "sso"] {
            assert!(Cli::try_parse_from(["x", "check", "a", "192.0.2.1", "--method", m]).is_ok());
        }
        assert!(Cli::try_parse_from(["x", "account", "mode", "a", "paranoid"]).is_err());
    }

    /// Runs the client against a one-shot fake daemon; returns (request sent, status, stdout).
    fn against(args: &[&str], reply: impl FnOnce(&Value) -> Value + Send + 'static) -> (Value, i32, String) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ipaccessctl-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let mut request: Value = serde_json::from_str(&line).unwrap();
            let id = request.as_object_mut().unwrap().remove("id").unwrap();
            let mut answer = reply(&request);
            answer["id"] = id;
            (&stream).write_all(format!("{answer}\n").as_bytes()).unwrap();
            request
        });
        let mut argv = vec!["ipaccessctl", "--socket", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut out = Vec::new();
        let status = run(argv, &mut out);
        let request = server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        (request, status, String::from_utf8(out).unwrap())
    }

    #[test]
    fn account_add_end_to_end() {
        let (request, status, out) = against(&["account", "add", "acme", "--unconfirmed"], |_| {
            json!({"ok": {"id": "acme", "slot": 1, "parent": null, "state": "unconfirmed", "mode": "off",
                          "state_reason": null, "created_at": 951_782_400}})
        });
        assert_eq!(
            request,
            json!({"cmd": "account_add", "account": "acme", "parent": null, "unconfirmed": true})
        );
        assert_eq!(status, 0);
        assert!(out.contains("id: acme\n") && out.contains("created_at: 2000-02-29 00:00:00\n"), "{out}");
    }

    #[test]
    fn check_denied_exits_1_and_errors_exit_2() {
        let (request, status, out) = against(
            &["check", "acme", "192.0.2.9", "--method", "api_key"],
            |_| json!({"ok": {"allowed": false, "reason": "address_not_allowed", "hint": "Add 192.0.2.9."}}),
        );
        assert_eq!(
            request,
            json!({"cmd": "check", "account": "acme", "addr": "192.0.2.9", "method": "api_key"})
        );
        assert_eq!((status, out.as_str()), (1, "denied (address_not_allowed): Add 192.0.2.9.\n"));
        let (_, status, out) = against(
            &["--json", "account", "show", "nobody"],
            |_| json!({"error": {"code": "unknown_account", "message": "no account nobody"}}),
        );
        assert_eq!(status, 2);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], "unknown_account");
        let mut out = Vec::new();
        assert_eq!(run(["ipaccessctl", "--socket", "/nonexistent/ipaccessd.sock", "status"], &mut out), 2);
    }

    #[test]
    fn bind_list_table() {
        let (_, status, out) = against(&["bind", "list"], |_| {
            json!({"ok": [{"account": "acme", "addr": "198.18.0.1", "target": {"proto": "tcp", "port": 443}},
                          {"account": "b", "addr": "fd00::1", "target": null}]})
        });
        assert_eq!(status, 0);
        assert_eq!(
            out,
            "ACCOUNT  ADDRESS     PROTO  PORT\nacme     198.18.0.1  tcp    443\nb        fd00::1     *      *\n"
        );
    }

    #[test]
    fn override_grant_end_to_end() {
        let row = json!({"id": 7, "account": "acme", "cidr": "fd00::9/128", "ticket": "T-1", "reason": "locked out",
                         "operator": 0, "created_at": 951_782_400, "expires_at": 951_789_600, "revoked_at": null});
        let reply = json!({"ok": {"override": row, "recent_denied": [
            {"address": "fd00::9", "method": "password", "first_seen": 951_782_000, "last_seen": 951_782_300,
             "count": 3}]}});
        let args = ["override", "grant", "acme", "fd00::9", "--ttl", "2h", "--ticket", "T-1", "--reason", "locked out"];
        let sent = reply.clone();
        let (request, status, out) = against(&args, move |_| sent);
        assert_eq!(
            request,
            json!({"cmd": "override_grant", "account": "acme", "cidr": "fd00::9/128", "ttl_seconds": 7200,
                   "ticket": "T-1", "reason": "locked out"})
        );
        assert_eq!(status, 0);
        for line in ["id: 7\n", "cidr: fd00::9/128\n", "expires_at: 2000-02-29 02:00:00\n", "revoked_at: -\n",
                     "\nrecent denied attempts:\nADDRESS  METHOD    FIRST SEEN           LAST SEEN            COUNT\n\
                      fd00::9  password  2000-02-28 23:53:20  2000-02-28 23:58:20  3\n"] {
            assert!(out.contains(line), "{line:?} not in:\n{out}");
        }
        let (_, _, out) = against(&["--json", "override", "grant", "acme", "fd00::9", "--ttl", "2h", "--ticket",
                                    "T-1", "--reason", "x"], move |_| reply);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["recent_denied"][0]["count"], 3);
        let (_, _, out) = against(&args, |_| json!({"ok": {"override": {"id": 8}, "recent_denied": []}}));
        assert_eq!(out, "id: 8\n\nno denied attempts recorded\n");
    }

    #[test]
    fn override_list_and_activity_tables() {
        let (request, _, out) = against(&["override", "list"], |_| {
            json!({"ok": [{"id": 1, "account": "acme", "cidr": "198.18.0.9/32", "ticket": "T-1", "reason": "r",
                           "operator": 0, "created_at": 0, "expires_at": 951_782_400, "revoked_at": null}]})
        });
        assert_eq!(request, json!({"cmd": "override_list", "account": null}));
        assert_eq!(
            out,
            "ID  ACCOUNT  CIDR           EXPIRES              TICKET  REASON\n\
             1   acme     198.18.0.9/32  2000-02-29 00:00:00  T-1     r\n"
        );
        let (request, _, out) = against(&["activity", "acme", "--since", "30m", "--denied", "--limit", "3"], |_| {
            json!({"ok": [
                {"time": 951_782_400, "first_seen": 951_782_000, "count": 4, "account": "acme", "kind": "signin",
                 "address": "198.18.0.9", "method": "password", "allowed": false, "reason": "address_not_allowed",
                 "uid": 33, "detail": {"application": true}},
                {"time": 951_782_399, "first_seen": 951_782_399, "count": 1, "account": "acme", "kind": "audit",
                 "address": null, "method": null, "allowed": null, "reason": "allow_add", "uid": 0, "detail": {}},
                {"time": 951_782_398, "first_seen": 951_782_001, "count": 12, "account": "acme", "kind": "drop",
                 "address": "fd00::9", "method": null, "allowed": false, "reason": "address_not_allowed", "uid": null,
                 "detail": {"destination": "fd00::1", "protocol": 17, "port": 53}}]})
        });
        assert_eq!(
            request,
            json!({"cmd": "activity", "account": "acme", "since_seconds": 1800, "denied_only": true, "limit": 3,
                   "kind": null, "summary": false, "unknown_accounts": false})
        );
        assert_eq!(
            out,
            "LAST SEEN            KIND    ADDRESS     TO                METHOD    RESULT  REASON               COUNT  UID\n\
             2000-02-29 00:00:00  signin  198.18.0.9  -                 password  denied  address_not_allowed  4      33\n\
             2000-02-28 23:59:59  audit   -           -                 -         -       allow_add            1      0\n\
             2000-02-28 23:59:58  drop    fd00::9     [fd00::1]:53/udp  -         denied  address_not_allowed  12     -\n"
        );
        let (request, _, out) = against(&["activity", "acme", "--summary", "--kind", "signin"], |_| json!({"ok": []}));
        assert_eq!(request["summary"], true);
        assert!(out.starts_with("ADDRESS  METHOD  RESULT  REASON  COUNT  FIRST SEEN  LAST SEEN  BY"), "{out}");
        let (request, _, out) = against(&["activity", "--unknown-accounts"], |_| {
            json!({"ok": [{"address": "198.18.66.6", "method": "password", "count": 7, "first_seen": 0,
                           "last_seen": 60}]})
        });
        assert_eq!((&request["account"], &request["unknown_accounts"]), (&Value::Null, &json!(true)));
        assert_eq!(
            out,
            "ADDRESS      METHOD    COUNT  FIRST SEEN           LAST SEEN\n\
             198.18.66.6  password  7      1970-01-01 00:00:00  1970-01-01 00:01:00\n"
        );
    }
}
