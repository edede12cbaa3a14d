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
    AccountAdd, AccountList, AccountMode, AccountRemove, AccountShow, AccountState, Activity, ActivityKind, AllowAdd,
    AllowDisable, AllowEnable, AllowLabel, AllowList, AllowRemove, AllowReplace, BindAdd, BindList, BindRemove, Check,
    Command, Detach, Import, ImportAccount, Method, Mode, OverrideGrant, OverrideList, OverrideRevoke, Proto,
    ReplaceEntry, Request, SetAccountState, Stats, Status,
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
        /// Only ask: would ADDR be allowed? Records nothing (no sign-in, no denial); open to
        /// support and admins, not only to applications
        #[arg(long)]
        dry_run: bool,
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
        /// One account per line, e.g. {"account": "acme-dev", "parent": "acme", "state": "active",
        /// "mode": "monitor", "entries": [{"cidr": "198.18.0.0/24", "label": "office"}]}; blank
        /// lines and lines starting with `#` are skipped; `-` reads standard input. Errors name
        /// the line
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
    /// Show one account: its fields, allowlist and bindings
    Show {
        /// Account id
        id: String,
    },
    /// Remove an account with its allowlist, bindings, overrides and kernel state
    Remove {
        /// Account id
        id: String,
        /// Also remove its sub-users (refused while it has any, without this)
        #[arg(long)]
        recursive: bool,
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
    /// Turn a disabled entry back on
    Enable {
        /// Account id
        id: String,
        /// The entry, as added
        #[arg(value_parser = parse_cidr)]
        cidr: IpNet,
    },
    /// Keep an entry on the list but ignore it, at sign-in and on the wire
    Disable {
        /// Account id
        id: String,
        /// The entry, as added
        #[arg(value_parser = parse_cidr)]
        cidr: IpNet,
        /// Your own address: refused if disabling the entry would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Disable even if it locks out --client-ip or a recent sign-in
        #[arg(long)]
        force: bool,
    },
    /// Change an entry's label
    Label {
        /// Account id
        id: String,
        /// The entry, as added
        #[arg(value_parser = parse_cidr)]
        cidr: IpNet,
        /// The new label, e.g. "office" (leave it out to clear the label)
        #[arg(value_name = "TEXT")]
        label: Option<String>,
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
        Ok(sa) if sa.port() == 0 => Err("port 0 cannot be bound; leave the port out to bind the whole address".into()),
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
            Command::AccountAdd(AccountAdd { account: id, parent, unconfirmed })
        }
        Top::Account(AccountCmd::Show { id }) => Command::AccountShow(AccountShow { account: id }),
        Top::Account(AccountCmd::Remove { id, recursive }) => {
            Command::AccountRemove(AccountRemove { account: id, recursive })
        }
        Top::Account(AccountCmd::List) => Command::AccountList(AccountList {}),
        Top::Account(AccountCmd::State { id, state, reason }) => {
            Command::AccountState(SetAccountState { account: id, state, reason })
        }
        Top::Account(AccountCmd::Mode { id, mode, client_ip, force }) => {
            Command::AccountMode(AccountMode { account: id, mode, client_ip, force })
        }
        Top::Allow(AllowCmd::Add { id, cidr, label }) => Command::AllowAdd(AllowAdd { account: id, cidr, label }),
        Top::Allow(AllowCmd::Remove { id, cidr, client_ip, force }) => {
            Command::AllowRemove(AllowRemove { account: id, cidr, client_ip, force })
        }
        Top::Allow(AllowCmd::List { id }) => Command::AllowList(AllowList { account: id }),
        Top::Allow(AllowCmd::Enable { id, cidr }) => Command::AllowEnable(AllowEnable { account: id, cidr }),
        Top::Allow(AllowCmd::Disable { id, cidr, client_ip, force }) => {
            Command::AllowDisable(AllowDisable { account: id, cidr, client_ip, force })
        }
        Top::Allow(AllowCmd::Label { id, cidr, label }) => Command::AllowLabel(AllowLabel { account: id, cidr, label }),
        Top::Allow(AllowCmd::Replace { id, file, client_ip, force }) => {
            let text = read_input(&file)?;
            Command::AllowReplace(AllowReplace { account: id, entries: parse_allow_file(&text)?, client_ip, force })
        }
        Top::Stats { id } => Command::Stats(Stats { account: id }),
        Top::Detach { interface } => Command::Detach(Detach { interface }),
        Top::Bind(BindCmd::Add { id, addr, proto }) => {
            let (addr, port, proto) = endpoint(addr, proto)?;
            Command::BindAdd(BindAdd { account: id, addr, port, proto })
        }
        Top::Bind(BindCmd::Remove { addr, proto }) => {
            let (addr, port, proto) = endpoint(addr, proto)?;
            Command::BindRemove(BindRemove { addr, port, proto })
        }
        Top::Bind(BindCmd::List) => Command::BindList(BindList {}),
        Top::Check { account, addr, method, dry_run } => Command::Check(Check { account, addr, method, dry_run }),
        Top::Override(OverrideCmd::Grant { id, cidr, ttl, ticket, reason }) => {
            Command::OverrideGrant(OverrideGrant { account: id, cidr, ttl_seconds: ttl, ticket, reason })
        }
        Top::Override(OverrideCmd::Revoke { id, override_id }) => {
            Command::OverrideRevoke(OverrideRevoke { account: id, override_id })
        }
        Top::Override(OverrideCmd::List { id }) => Command::OverrideList(OverrideList { account: id }),
        Top::Activity { id, since, denied, kind, summary, unknown_accounts, limit } => Command::Activity(Activity {
            account: id,
            since_seconds: since,
            denied_only: denied,
            limit,
            kind,
            summary,
            unknown_accounts,
        }),
        Top::Status => Command::Status(Status {}),
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
        let reply = call(socket, Command::Import(Import { accounts })).map_err(|e| {
            let applied = if done == 0 {
                "nothing was imported".to_string()
            } else {
                format!("lines before {} are imported; run the import again once this is fixed", lines.0)
            };
            match e {
                Failure::Daemon(body) => {
                    // A person fixes a line, not a batch: name the line of the account the
                    // daemon complains about when its message (or details) names one.
                    let place = match blame(batch, &body) {
                        Some((line, account)) => format!("line {line} (account {account})"),
                        None => format!("lines {}-{}", lines.0, lines.1),
                    };
                    let message = format!("{place}: {} ({applied})", body.message);
                    body.with_message(message)
                }
                Failure::Local(message) => {
                    Failure::Local(format!("lines {}-{}: {message} ({applied})", lines.0, lines.1))
                }
            }
        })?;
        for (key, sum) in total.iter_mut() {
            *sum = Value::from(sum.as_u64().unwrap_or(0) + reply[key].as_u64().unwrap_or(0));
        }
    }
    total.insert("batches".into(), Value::from(batches.len()));
    Ok(Value::Object(total))
}

/// The line and id of the account in `batch` that a daemon error is about: the one its
/// details name, else the one its message names first (the longest id where two start at the
/// same place, so `acme.dev` wins over `acme`). Ids count only as whole words: `acme` is not
/// named by `acme-dev`.
fn blame<'a>(batch: &'a [(usize, ImportAccount)], error: &DaemonError) -> Option<(usize, &'a str)> {
    let named = error.details.as_ref().and_then(|d| d["account"].as_str());
    if let Some(hit) = batch.iter().find(|(_, a)| Some(a.account.as_str()) == named) {
        return Some((hit.0, &hit.1.account));
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
        .filter(|(_, a)| !a.account.is_empty())
        .filter_map(|(line, a)| first_word(&a.account).map(|at| (at, std::cmp::Reverse(a.account.len()), *line, a)))
        .min_by_key(|&(at, len, line, _)| (at, len, line))
        .map(|(_, _, line, a)| (line, a.account.as_str()))
}

/// An error reply from the daemon. Read leniently (a code this client does not know, a
/// message of the wrong type): the person still sees what the daemon said.
#[derive(Debug)]
struct DaemonError {
    code: String,
    message: String,
    details: Option<Value>,
    /// The error object as it came, for `--json`.
    raw: Value,
}

impl DaemonError {
    fn from_reply(error: &Value) -> DaemonError {
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => cell("", other),
        };
        let (code, message) = match error {
            Value::Object(_) => (text(&error["code"]), text(&error["message"])),
            other => (String::new(), text(other)),
        };
        let details = error.get("details").filter(|d| !d.is_null()).cloned();
        DaemonError { code, message, details, raw: error.clone() }
    }

    /// The same error with another message (in `--json` output too).
    fn with_message(mut self, message: String) -> Failure {
        if let Some(o) = self.raw.as_object_mut() {
            o.insert("message".into(), Value::String(message.clone()));
        }
        self.message = message;
        Failure::Daemon(self)
    }
}

#[derive(Debug)]
enum Failure {
    Daemon(DaemonError),
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
    let reply: Value =
        serde_json::from_str(&reply).map_err(|e| Failure::Local(format!("unreadable reply from the daemon: {e}")))?;
    let Value::Object(reply) = reply else {
        return Err(Failure::Local("unreadable reply from the daemon: not a JSON object".into()));
    };
    let error = reply.get("error").filter(|e| !e.is_null());
    let reply_id = reply.get("id").unwrap_or(&Value::Null);
    // Errors about a line the daemon could not read (too large, busy) carry no id.
    let unread = reply_id.is_null() && error.is_some();
    if *reply_id != id && !unread {
        return Err(Failure::Local(format!("reply is for request {reply_id}, not {id}")));
    }
    match error {
        Some(error) => Err(Failure::Daemon(DaemonError::from_reply(error))),
        // `"ok": null` or no `ok`: a success without a result.
        None => Ok(reply.get("ok").cloned().unwrap_or(Value::Null)),
    }
}

/// Unix seconds as UTC `YYYY-MM-DD HH:MM:SS`.
fn format_time(secs: i64) -> String {
    ipaccess::time::format_utc(secs)
}

/// Widest a table cell gets, in characters after escaping; longer ones end in `…`. Only
/// tables are cut (`key: value` lines and `--json` show everything).
const CELL_WIDTH: usize = 64;

/// Characters that are not control characters but can still hide or reorder text on a
/// terminal: bidi embeddings, overrides, isolates and marks, zero-width characters, the
/// line and paragraph separators, and other invisible format characters.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{ad}' | '\u{34f}' | '\u{61c}' | '\u{115f}' | '\u{1160}' | '\u{17b4}' | '\u{17b5}' | '\u{180b}'..='\u{180f}'
        | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{3164}'
        | '\u{fe00}'..='\u{fe0f}' | '\u{feff}' | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}' | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0000}'..='\u{e0fff}')
}

/// Text from the daemon made safe to print: see [`escape_within`].
fn escape(s: &str) -> String {
    escape_within(s, usize::MAX)
}

/// `s` as a terminal can show it without being steered by it: control characters (C0, DEL,
/// C1) and [`invisible`] ones are written as escapes (`\n`, `\x1b`, `\u{202e}`), and a
/// backslash as `\\`, so that what a tenant writes in a label can neither start a new row,
/// send the terminal a command, nor pass for an escape. At most `max` characters: a longer
/// result is cut, between escapes, and ends in `…`.
fn escape_within(s: &str, max: usize) -> String {
    let mut out = String::new();
    let (mut width, mut fits) = (0, 0);
    for c in s.chars() {
        let piece = match c {
            '\\' => "\\\\".to_string(),
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

fn is_time(key: &str) -> bool {
    // The last part of a flattened key (`override.expires_at`) says what it is.
    let key = key.rsplit('.').next().unwrap_or(key);
    key.ends_with("_at") || key.ends_with("_seen") || matches!(key, "time" | "until")
}

/// A value as plain text (not yet escaped): Unix times as dates, nested values spelled out
/// (`k=v, k=v`; lists joined by commas), never as raw JSON.
fn cell(key: &str, v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) if is_time(key) && n.is_i64() => format_time(n.as_i64().unwrap_or_default()),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(|v| cell(key, v)).collect::<Vec<_>>().join(", "),
        Value::Object(o) if o.is_empty() => "-".into(),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{k}={}", cell(k, v))).collect::<Vec<_>>().join(", "),
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

/// Columns padded to their widest cell; every cell escaped and cut to [`CELL_WIDTH`].
fn table(out: &mut String, head: &[&str], rows: Vec<Vec<String>>) {
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    let rows: Vec<Vec<String>> =
        std::iter::once(head).chain(rows).map(|r| r.iter().map(|c| escape_within(c, CELL_WIDTH)).collect()).collect();
    let mut widths = vec![0; rows.iter().map(Vec::len).max().unwrap_or(0)];
    for row in &rows {
        widths.iter_mut().zip(row).for_each(|(w, c)| *w = (*w).max(c.chars().count()));
    }
    for row in rows {
        // Padded by hand: a format width (`{c:w$}`) is limited to 16 bits and panics beyond.
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count()))).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
}

/// Rows of objects whose keys nobody told us about: one column per key, in order of
/// appearance (`last_seen` is headed LAST SEEN).
fn any_table(out: &mut String, rows: &[Value]) {
    let mut keys: Vec<&str> = Vec::new();
    for key in rows.iter().filter_map(Value::as_object).flat_map(|o| o.keys()) {
        if !keys.contains(&key.as_str()) {
            keys.push(key);
        }
    }
    let head: Vec<String> = keys.iter().map(|k| k.to_uppercase().replace('_', " ")).collect();
    let cells = rows.iter().map(|r| keys.iter().map(|k| cell(k, &r[*k])).collect()).collect();
    table(out, &head.iter().map(String::as_str).collect::<Vec<_>>(), cells);
}

/// The entries of an allowlist.
fn entries_table(out: &mut String, entries: &[Value]) {
    let rows = entries
        .iter()
        .map(|r| {
            // Entries from a daemon without per-entry switches have no `enabled`.
            let status = match r["enabled"] {
                Value::Bool(true) => "enabled",
                Value::Bool(false) => "disabled",
                _ => "-",
            };
            vec![
                cell("", &r["cidr"]),
                status.into(),
                cell("", &r["label"]),
                cell("created_at", &r["created_at"]),
                cell("", &r["created_by"]),
            ]
        })
        .collect();
    table(out, &["CIDR", "STATUS", "LABEL", "CREATED", "BY"], rows);
}

/// A binding's target: `{"proto": "tcp", "port": 443}`, or null for the whole address.
fn target(r: &Value) -> (String, String) {
    match &r["target"] {
        Value::Object(t) => (cell("", &t["proto"]), cell("", &t["port"])),
        _ => ("*".into(), "*".into()),
    }
}

fn bindings_table(out: &mut String, bindings: &[Value]) {
    let rows = bindings
        .iter()
        .map(|r| {
            let (proto, port) = target(r);
            vec![cell("", &r["account"]), cell("", &r["addr"]), proto, port]
        })
        .collect();
    table(out, &["ACCOUNT", "ADDRESS", "PROTO", "PORT"], rows);
}

/// An account's fields as `key: value` lines. The state shown is the effective
/// one when the daemon sends it (a sub-user of a banned parent is `parent_banned`), with the
/// account's own state beside it when that differs.
fn account_fields(out: &mut String, row: &Value) {
    let Value::Object(o) = row else {
        return key_values(out, row, |_| true);
    };
    let mut row = o.clone();
    if let Some(effective) = row.remove("effective_state").filter(|e| !e.is_null()) {
        let own = row.get("state").cloned().unwrap_or_default();
        let shown = if own == effective || own.is_null() {
            cell("", &effective)
        } else {
            format!("{} (own state: {})", cell("", &effective), cell("", &own))
        };
        row.insert("state".into(), Value::String(shown));
    }
    const FIRST: [&str; 7] = ["id", "parent", "state", "state_reason", "mode", "slot", "created_at"];
    // The fields a person looks for first, in that order, then the rest.
    for key in FIRST {
        if let Some(v) = row.get(key) {
            key_values(out, &Value::Object([(key.to_string(), v.clone())].into_iter().collect()), |_| true);
        }
    }
    key_values(out, &Value::Object(row), |k| !FIRST.contains(&k));
}

/// The one line of a new binding: `bound 198.18.0.1 tcp/443 to acme`.
fn binding_line(v: &Value) -> Option<String> {
    let addr = v["addr"].as_str()?;
    let account = v["account"].as_str()?;
    let what = match target(v) {
        (proto, port) if v["target"].is_object() => format!("{addr} {proto}/{port}"),
        _ => format!("{addr} (every port)"),
    };
    Some(escape(&format!("bound {what} to {account}")) + "\n")
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
        Command::AccountList(AccountList {}) => {
            let rows = rows(v)
                .iter()
                .map(|r| {
                    // The effective state (`parent_banned`) is what a sign-in meets.
                    let state = if r["effective_state"].is_null() { "state" } else { "effective_state" };
                    ["id", "slot", state, "mode", "parent"].map(|k| col(r, k)).to_vec()
                })
                .collect();
            table(&mut out, &["ID", "SLOT", "STATE", "MODE", "PARENT"], rows);
        }
        Command::AccountShow(AccountShow { .. }) if v["account"].is_object() => {
            account_fields(&mut out, &v["account"]);
            for (key, title) in [("entries", "allowlist"), ("bindings", "bindings")] {
                match v[key].as_array() {
                    Some(list) if !list.is_empty() => {
                        out.push_str(&format!("\n{title}:\n"));
                        if key == "entries" { entries_table(&mut out, list) } else { bindings_table(&mut out, list) }
                    }
                    _ => out.push_str(&format!("\n{title}: none\n")),
                }
            }
            // Whatever else the daemon tells about the account (sub-users, overrides...).
            key_values(&mut out, v, |k| !matches!(k, "account" | "entries" | "bindings"));
        }
        Command::AccountAdd(AccountAdd { .. })
        | Command::AccountState(SetAccountState { .. })
        | Command::AccountMode(AccountMode { .. }) => account_fields(&mut out, v),
        Command::AllowList(AllowList { .. }) | Command::AllowReplace(AllowReplace { .. }) => {
            entries_table(&mut out, &rows(v))
        }
        Command::Stats(Stats { .. }) => {
            let rows = rows(&v["accounts"])
                .iter()
                .map(|r| {
                    [
                        "account",
                        "passed_packets",
                        "passed_bytes",
                        "dropped_packets",
                        "dropped_bytes",
                        "would_drop_packets",
                    ]
                    .map(|k| col(r, k))
                    .to_vec()
                })
                .collect();
            table(&mut out, &["ACCOUNT", "PASSED", "BYTES", "DROPPED", "BYTES", "WOULD DROP"], rows);
            let h = &v["host"];
            out.push_str(&escape(&format!(
                "host: non-IP {}, unbound {}, neighbour discovery {}, malformed {}",
                cell("", &h["non_ip"]),
                cell("", &h["unbound"]),
                cell("", &h["ndp"]),
                cell("", &h["malformed"])
            )));
            out.push('\n');
        }
        Command::BindList(BindList {}) => bindings_table(&mut out, &rows(v)),
        Command::BindAdd(BindAdd { .. }) => match binding_line(v) {
            Some(line) => out.push_str(&line),
            None => key_values(&mut out, v, |_| true),
        },
        Command::OverrideGrant(OverrideGrant { .. }) => {
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
        Command::OverrideList(OverrideList { .. }) => {
            let rows = rows(v)
                .iter()
                .map(|r| {
                    ["id", "account", "cidr", "expires_at", "ticket", "operator", "reason"].map(|k| col(r, k)).to_vec()
                })
                .collect();
            table(&mut out, &["ID", "ACCOUNT", "CIDR", "EXPIRES", "TICKET", "OPERATOR", "REASON"], rows);
        }
        Command::Activity(Activity { unknown_accounts: true, .. }) => {
            let rows = rows(v)
                .iter()
                .map(|r| ["address", "method", "count", "first_seen", "last_seen"].map(|k| col(r, k)).to_vec())
                .collect();
            table(&mut out, &["ADDRESS", "METHOD", "COUNT", "FIRST SEEN", "LAST SEEN"], rows);
        }
        Command::Activity(Activity { summary: true, .. }) => {
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
        Command::Activity(Activity { .. }) => {
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
        Command::Status(Status {}) => {
            // Interfaces with the path the kernel runs the program in; the rest as it comes.
            let interfaces: Vec<String> = rows(&v["xdp"])
                .iter()
                .map(|a| match &a["path"] {
                    Value::Null => {
                        format!("{} (no XDP program: a reload attaches it again)", cell("", &a["interface"]))
                    }
                    path => format!("{} ({} XDP)", cell("", &a["interface"]), cell("", path)),
                })
                .collect();
            let interfaces = if interfaces.is_empty() { "none".to_string() } else { interfaces.join(", ") };
            out.push_str(&format!("interfaces: {}\n", escape(&interfaces)));
            key_values(&mut out, v, |k| !matches!(k, "interfaces" | "xdp"));
        }
        _ => key_values(&mut out, v, |_| true),
    }
    out
}

/// Any value for a person: an object as `key: value` lines (the keys `shown` accepts;
/// nested objects flattened to `outer.inner: value`, lists of objects as tables after the
/// lines), a list of objects as a table, anything else as one line. Keys and values escaped.
fn key_values(out: &mut String, v: &Value, shown: impl Fn(&str) -> bool) {
    fn lines<'a>(out: &mut String, key: &str, v: &'a Value, tables: &mut Vec<(String, &'a [Value])>) {
        match v {
            Value::Object(o) if !o.is_empty() => {
                o.iter().for_each(|(k, v)| lines(out, &format!("{key}.{k}"), v, tables))
            }
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object) => tables.push((key.to_string(), a)),
            _ => out.push_str(&format!("{}: {}\n", escape(key), escape(&cell(key, v)))),
        }
    }
    match v {
        Value::Object(o) => {
            let mut tables = Vec::new();
            o.iter().filter(|(k, _)| shown(k)).for_each(|(k, v)| lines(out, k, v, &mut tables));
            for (key, rows) in tables {
                out.push_str(&format!("\n{}:\n", escape(&key)));
                any_table(out, rows);
            }
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_object) => any_table(out, a),
        Value::Null => {}
        other => out.push_str(&format!("{}\n", escape(&cell("", other)))),
    }
}

/// A check's verdict line for a person, e.g. `denied (address_not_allowed): <hint>`, then
/// anything else the result carries (an operator's detail, the override that allowed it)
/// as `key: value` lines. `None` when `allowed` is not a boolean: no verdict is guessed.
fn verdict(v: &Value) -> Option<(String, bool)> {
    let allowed = v["allowed"].as_bool()?;
    let reason = cell("", &v["reason"]);
    let hint = match &v["hint"] {
        Value::Null => String::new(),
        hint => cell("", hint),
    };
    let hint = if reason == "allowed" || hint.is_empty() { String::new() } else { format!(": {hint}") };
    let word = if allowed { "allowed" } else { "denied" };
    let mut text = escape(&format!("{word} ({reason}){hint}")) + "\n";
    key_values(&mut text, v, |k| !matches!(k, "allowed" | "reason" | "hint"));
    Some((text, allowed))
}

/// A daemon error for stderr: `error: MESSAGE (CODE)`, then its details, indented.
fn error_text(e: &DaemonError) -> String {
    let code = if e.code.is_empty() { String::new() } else { format!(" ({})", e.code) };
    let mut text = format!("error: {}\n", escape(&format!("{}{code}", e.message)));
    if let Some(details) = &e.details {
        let mut shown = String::new();
        key_values(&mut shown, details, |_| true);
        shown.lines().for_each(|l| text.push_str(&if l.is_empty() { "\n".into() } else { format!("  {l}\n") }));
    }
    text
}

/// Parses `args`, runs the command and writes its output to `out` and its errors to `err`;
/// returns the exit status.
fn run<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
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
            import(&socket, &file, batch_bytes).map(|v| (Command::Import(Import { accounts: Vec::new() }), v))
        }
        top => request(top).and_then(|command| call(&socket, command.clone()).map(|v| (command, v))),
    };
    let (text, status) = match result {
        Ok((command, v)) => {
            // Checks answer through the exit status too, for scripts; a result without a
            // readable verdict is an error, never a pass.
            let check = matches!(command, Command::Check(Check { .. })).then(|| verdict(&v));
            let status = match &check {
                Some(Some((_, false))) => 1,
                Some(None) => {
                    let _ = writeln!(err, "error: unreadable check result: `allowed` is missing or not true/false");
                    return 2;
                }
                _ => 0,
            };
            let text = match check {
                _ if cli.json => format!("{}\n", serde_json::to_string_pretty(&v).expect("values serialize")),
                Some(Some((text, _))) => text,
                _ => human(&command, &v),
            };
            (text, status)
        }
        Err(Failure::Daemon(e)) => {
            let _ = write!(err, "{}", error_text(&e));
            let json = if cli.json {
                serde_json::to_string_pretty(&e.raw).expect("values serialize") + "\n"
            } else {
                String::new()
            };
            (json, 2)
        }
        Err(Failure::Local(message)) => {
            let _ = writeln!(err, "error: {}", escape(&message));
            return 2;
        }
    };
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // `ipaccessctl account list | head` is not an error.
        Err(e) if e.kind() != ErrorKind::BrokenPipe => {
            let _ = writeln!(err, "error: cannot write output: {e}");
            2
        }
        _ => status,
    }
}

fn main() {
    if let Some(status) = ipaccess::docs::generate_if_requested(<Cli as clap::CommandFactory>::command, "ipaccessctl") {
        std::process::exit(status);
    }
    std::process::exit(run(std::env::args_os(), &mut std::io::stdout().lock(), &mut std::io::stderr()));
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
        for bad in ["fd00::1:443x", "198.18.0.1:", "198.18.0.1:70000", "host:443", "[198.18.0.1]:443", "198.18.0.1:0"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(endpoint((v4, Some(53)), None).unwrap(), (v4, Some(53), Some(Proto::Tcp)));
        assert_eq!(endpoint((v4, Some(53)), Some(Proto::Udp)).unwrap(), (v4, Some(53), Some(Proto::Udp)));
        assert!(endpoint((v4, None), Some(Proto::Udp)).is_err());
        assert_eq!(parse_cidr("203.0.113.7"), Ok("203.0.113.7/32".parse().unwrap()));
    }

    #[test]
    fn durations() {
        for (s, secs) in [("90s", 90), ("30m", 1800), ("2h", 7200), ("7d", 604_800), ("45", 45), ("0010m", 600)] {
            assert_eq!(parse_duration(s), Ok(secs), "{s}");
        }
        for bad in [
            "",
            "0",
            "0s",
            "0d",
            "s",
            "h",
            "-5",
            "+5",
            "1.5h",
            "2w",
            "2 h",
            " 2h",
            "2H",
            "h2",
            "2hh",
            "1e3",
            "99999999999999999999",
            "999999999999999999d",
            "３s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let e = Cli::try_parse_from([
            "x",
            "override",
            "grant",
            "a",
            "192.0.2.1",
            "--ttl",
            "0",
            "--ticket",
            "T",
            "--reason",
            "r",
        ])
        .unwrap_err();
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
        let (request, status, out, _) = against_all(args, reply);
        (request, status, out)
    }

    /// [`against`], with what the client wrote on stderr too.
    fn against_all(
        args: &[&str],
        reply: impl FnOnce(&Value) -> Value + Send + 'static,
    ) -> (Value, i32, String, String) {
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
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = run(argv, &mut out, &mut err);
        let request = server.join().unwrap();
        std::fs::remove_file(&path).unwrap();
        (request, status, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
    }

    #[test]
    fn account_add_end_to_end() {
        let (request, status, out) = against(&["account", "add", "acme", "--unconfirmed"], |_| {
            json!({"ok": {"id": "acme", "slot": 1, "parent": null, "state": "unconfirmed", "mode": "off",
                          "state_reason": null, "created_at": 951_782_400}})
        });
        assert_eq!(request, json!({"cmd": "account_add", "account": "acme", "unconfirmed": true}));
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
            json!({"cmd": "check", "account": "acme", "addr": "192.0.2.9", "method": "api_key", "dry_run": false})
        );
        assert_eq!((status, out.as_str()), (1, "denied (address_not_allowed): Add 192.0.2.9.\n"));
        let (_, status, out) = against(
            &["--json", "account", "show", "nobody"],
            |_| json!({"error": {"code": "unknown_account", "message": "no account nobody"}}),
        );
        assert_eq!(status, 2);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["code"], "unknown_account");
        let mut out = Vec::new();
        assert_eq!(
            run(["ipaccessctl", "--socket", "/nonexistent/ipaccessd.sock", "status"], &mut out, &mut Vec::new()),
            2
        );
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
        for line in [
            "id: 7\n",
            "cidr: fd00::9/128\n",
            "expires_at: 2000-02-29 02:00:00\n",
            "revoked_at: -\n",
            "\nrecent denied attempts:\nADDRESS  METHOD    FIRST SEEN           LAST SEEN            COUNT\n\
                      fd00::9  password  2000-02-28 23:53:20  2000-02-28 23:58:20  3\n",
        ] {
            assert!(out.contains(line), "{line:?} not in:\n{out}");
        }
        let (_, _, out) = against(
            &["--json", "override", "grant", "acme", "fd00::9", "--ttl", "2h", "--ticket", "T-1", "--reason", "x"],
            move |_| reply,
        );
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
        assert_eq!(request, json!({"cmd": "override_list"}));
        assert_eq!(
            out,
            "ID  ACCOUNT  CIDR           EXPIRES              TICKET  OPERATOR  REASON\n\
             1   acme     198.18.0.9/32  2000-02-29 00:00:00  T-1     0         r\n"
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
                   "summary": false, "unknown_accounts": false})
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

    /// A label written to forge a row, clear the screen, retitle the terminal, reverse the
    /// text and hide a character: every cell shows it escaped, on its own row.
    const HOSTILE: &str = "\n0.0.0.0/0  forged\x1b[2J\x1b]0;x\x07\u{202e}\u{200b}\u{9b}\\";
    const HOSTILE_SHOWN: &str = "\\n0.0.0.0/0  forged\\x1b[2J\\x1b]0;x\\x07\\u{202e}\\u{200b}\\u{9b}\\\\";

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
        let entry = |cidr: &str, label: &str| {
            json!({"account": "acme", "cidr": cidr, "label": label, "created_at": 951_782_400, "created_by": 0,
                   "enabled": true})
        };
        let reply = json!({"ok": [entry("198.18.0.0/24", HOSTILE), entry("198.18.1.0/24", "plain")]});
        let sent = reply.clone();
        let (_, status, out) = against(&["allow", "list", "acme"], move |_| sent);
        assert_eq!(status, 0);
        let width = HOSTILE_SHOWN.chars().count();
        assert!(width < CELL_WIDTH);
        let pad = |s: &str| format!("{s}{}", " ".repeat(width - s.len()));
        assert_eq!(
            out,
            format!(
                "CIDR           STATUS   {}  CREATED              BY\n\
                 198.18.0.0/24  enabled  {HOSTILE_SHOWN}  2000-02-29 00:00:00  0\n\
                 198.18.1.0/24  enabled  {}  2000-02-29 00:00:00  0\n",
                pad("LABEL"),
                pad("plain")
            )
        );
        assert!(!out.contains('\x1b') && !out.contains('\u{202e}') && out.lines().count() == 3, "{out}");
        // --json passes the label on exactly, escaped the JSON way.
        let (_, _, out) = against(&["--json", "allow", "list", "acme"], move |_| reply);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()[0]["label"], HOSTILE);
        assert!(!out.contains('\x1b') && !out.contains("\n0.0.0.0"), "{out}");

        let (_, status, out) = against(&["override", "list"], |_| {
            json!({"ok": [{"id": 1, "account": "acme", "cidr": "198.18.0.9/32", "ticket": "T\x1b[8m",
                           "reason": "ok\n2   acme     0.0.0.0/0", "operator": 1001, "created_at": 0,
                           "expires_at": 951_782_400, "revoked_at": null}]})
        });
        assert_eq!(status, 0);
        assert_eq!(
            out,
            "ID  ACCOUNT  CIDR           EXPIRES              TICKET    OPERATOR  REASON\n\
             1   acme     198.18.0.9/32  2000-02-29 00:00:00  T\\x1b[8m  1001      ok\\n2   acme     0.0.0.0/0\n"
        );
    }

    #[test]
    fn huge_label_is_cut_in_tables_and_exact_in_json() {
        let label = "x".repeat(65_536);
        let reply = json!({"ok": [{"account": "acme", "cidr": "198.18.0.0/24", "label": label, "created_at": 0,
                                   "created_by": 0}]});
        let sent = reply.clone();
        let (_, status, out) = against(&["allow", "list", "acme"], move |_| sent);
        assert_eq!(status, 0);
        let cut = format!("{}…", "x".repeat(CELL_WIDTH - 1));
        assert_eq!(out.lines().nth(1), Some(format!("198.18.0.0/24  -       {cut}  1970-01-01 00:00:00  0").as_str()));
        let (_, status, out) = against(&["--json", "allow", "list", "acme"], move |_| reply);
        assert_eq!(status, 0);
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap()[0]["label"].as_str().unwrap().len(), 65_536);
        // A `key: value` line shows it all.
        let (_, status, out) = against(
            &["allow", "add", "acme", "198.18.0.0/24", "--label", "x"],
            move |_| json!({"ok": {"account": "acme", "cidr": "198.18.0.0/24", "label": label}}),
        );
        assert_eq!(status, 0);
        assert!(out.contains(&format!("label: {}\n", "x".repeat(65_536))), "{}", out.len());
    }

    #[test]
    fn wrong_types_and_out_of_range_numbers_do_not_panic() {
        // Every field of the wrong type, numbers out of any range, rows that are not objects.
        let (_, status, out) = against(&["allow", "list", "acme"], |_| {
            json!({"ok": [{"cidr": 7, "label": {"a": [1, {"b": null}]}, "created_at": u64::MAX, "created_by": -1.5e300,
                           "enabled": "yes"},
                          {"created_at": i64::MIN, "cidr": [], "label": {}},
                          "a string", 12, null]})
        });
        assert_eq!(status, 0);
        assert_eq!(
            out,
            "CIDR  STATUS  LABEL     CREATED               BY\n\
             7     -       a=1, b=-  18446744073709551615  -1.5e+300\n\
             -     -       -         -9223372036854775808  -\n\
             -     -       -         -                     -\n\
             -     -       -         -                     -\n\
             -     -       -         -                     -\n"
        );
        for reply in [json!("text"), json!(42), json!(null), json!({"weird": {"deep": [[1, 2], {"k": "v\n"}]}})] {
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
            ] {
                let sent = reply.clone();
                let (_, status, out) = against(args, move |_| json!({"ok": sent}));
                assert_eq!(status, 0, "{args:?} {reply}");
                assert!(!out.contains("v\n"), "{args:?}: {out}");
            }
        }
        let (_, _, out) =
            against(&["account", "add", "a"], |_| json!({"ok": {"weird": {"deep": [[1, 2], {"k": "v\n"}]}}}));
        assert_eq!(out, "weird.deep: 1, 2, k=v\\n\n");
        assert_eq!(format_time(i64::MAX), i64::MAX.to_string(), "out of range: the number, never a panic");
        // A check whose verdict is not a boolean is an error, never a pass.
        let (_, status, out, err) = against_all(
            &["check", "a", "198.18.0.1"],
            |_| json!({"ok": {"allowed": "true", "reason": "allowed", "hint": ""}}),
        );
        assert_eq!((status, out.as_str()), (2, ""));
        assert!(err.contains("unreadable check result"), "{err}");
        // An error reply this client cannot fully read still shows what it says.
        let (_, status, _, err) = against_all(&["status"], |_| json!({"error": {"code": 9, "message": ["no\n", 1]}}));
        assert_eq!((status, err.as_str()), (2, "error: no\\n, 1 (9)\n"));
    }

    #[test]
    fn verdicts_and_errors_are_escaped() {
        let (_, status, out) = against(&["check", "acme", "198.18.0.9"], |_| {
            json!({"ok": {"allowed": false, "reason": "address_not_allowed",
                          "hint": "Add it.\nallowed (allowed)\x1b[1A\x1b[2K", "detail": {"entries": 0}}})
        });
        assert_eq!(status, 1);
        assert_eq!(
            out,
            "denied (address_not_allowed): Add it.\\nallowed (allowed)\\x1b[1A\\x1b[2K\ndetail.entries: 0\n"
        );
        // A reason this client does not know yet is still shown; the verdict is the boolean.
        let (_, status, out) = against(&["check", "acme", "198.18.0.9"], |_| {
            json!({"ok": {"allowed": true, "reason": "override\u{202e}", "hint": "",
                          "override": {"id": 3, "expires_at": 951_782_400}}})
        });
        assert_eq!(status, 0);
        assert_eq!(out, "allowed (override\\u{202e})\noverride.expires_at: 2000-02-29 00:00:00\noverride.id: 3\n");

        // Daemon messages quote what a tenant wrote: escaped on stderr, exact with --json.
        let message = "entry 198.18.0.0/24 of acme exists\n\x1b]8;;http://evil\x07label";
        let (_, status, out, err) = against_all(
            &["allow", "add", "acme", "198.18.0.0/24"],
            move |_| json!({"error": {"code": "entry_exists", "message": message}}),
        );
        assert_eq!((status, out.as_str()), (2, ""));
        assert_eq!(err, "error: entry 198.18.0.0/24 of acme exists\\n\\x1b]8;;http://evil\\x07label (entry_exists)\n");
        let (_, _, out, _) = against_all(
            &["--json", "allow", "add", "acme", "198.18.0.0/24"],
            move |_| json!({"error": {"code": "entry_exists", "message": message}}),
        );
        assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!({"code": "entry_exists", "message": message}));

        // A refusal's details, readably after the message.
        let (_, status, _, err) = against_all(&["account", "mode", "acme", "enforce"], |_| {
            json!({"error": {"code": "lockout", "message": "would shut out 2 recent sign-ins; repeat with --force",
                             "details": [{"address": "198.18.0.9", "last_seen": 951_782_400},
                                         {"address": "fd00::9\n", "last_seen": 951_782_399}]}})
        });
        assert_eq!(status, 2);
        assert_eq!(
            err,
            "error: would shut out 2 recent sign-ins; repeat with --force (lockout)\n\
             \x20 ADDRESS     LAST SEEN\n\
             \x20 198.18.0.9  2000-02-29 00:00:00\n\
             \x20 fd00::9\\n   2000-02-28 23:59:59\n"
        );
        let (_, _, _, err) = against_all(&["allow", "remove", "acme", "198.18.0.0/24"], |_| {
            json!({"error": {"code": "lockout", "message": "no", "details": {"recent_signins": [{"address": "a"}],
                                                                            "limit": 24}}})
        });
        assert_eq!(err, "error: no (lockout)\n  limit: 24\n\n  recent_signins:\n  ADDRESS\n  a\n");
    }

    #[test]
    fn account_show_list_status_and_bind_add_for_a_person() {
        let account = json!({"id": "acme-dev", "slot": 2, "parent": "acme", "state": "active",
                             "effective_state": "parent_banned", "mode": "enforce", "state_reason": null,
                             "created_at": 951_782_400});
        let shown = json!({"account": account, "entries": [
            {"account": "acme-dev", "cidr": "198.18.0.0/24", "label": "office", "created_at": 951_782_400,
             "created_by": 0, "enabled": false}],
            "bindings": [{"account": "acme-dev", "addr": "198.18.0.1", "target": {"proto": "tcp", "port": 443},
                          "created_at": 951_782_400}]});
        let (request, status, out) = against(&["account", "show", "acme-dev"], move |_| json!({"ok": shown}));
        assert_eq!(request, json!({"cmd": "account_show", "account": "acme-dev"}));
        assert_eq!(status, 0);
        assert_eq!(
            out,
            "id: acme-dev\nparent: acme\nstate: parent_banned (own state: active)\nstate_reason: -\nmode: enforce\n\
             slot: 2\ncreated_at: 2000-02-29 00:00:00\n\
             \nallowlist:\n\
             CIDR           STATUS    LABEL   CREATED              BY\n\
             198.18.0.0/24  disabled  office  2000-02-29 00:00:00  0\n\
             \nbindings:\n\
             ACCOUNT   ADDRESS     PROTO  PORT\n\
             acme-dev  198.18.0.1  tcp    443\n"
        );
        let (_, _, out) = against(&["account", "show", "acme"], |_| {
            json!({"ok": {"account": {"id": "acme", "state": "banned", "effective_state": "banned"},
                          "entries": [], "bindings": [], "sub_users": ["acme-dev"]}})
        });
        assert_eq!(out, "id: acme\nstate: banned\n\nallowlist: none\n\nbindings: none\nsub_users: acme-dev\n");

        let (_, _, out) = against(&["account", "list"], |_| {
            json!({"ok": [{"id": "acme", "slot": 1, "parent": null, "state": "banned", "mode": "off"},
                          {"id": "acme-dev", "slot": 2, "parent": "acme", "state": "active",
                           "effective_state": "parent_banned", "mode": "off"}]})
        });
        assert_eq!(
            out,
            "ID        SLOT  STATE          MODE  PARENT\nacme      1     banned         off   -\n\
             acme-dev  2     parent_banned  off   acme\n"
        );

        let (_, _, out) = against(&["status"], |_| {
            json!({"ok": {"accounts": 2, "interfaces": ["veth0"], "xdp": [{"interface": "veth0", "path": "native"}],
                          "pin_dir": "/sys/fs/bpf/ipaccess", "table_slots_used": 3, "table_slots": 65536,
                          "host_counters": {"non_ip": 1, "unbound": 2, "ndp": 3, "malformed": 4},
                          "connections": [{"uid": 0, "open": 1}], "started_at": 951_782_400}})
        });
        assert_eq!(
            out,
            "interfaces: veth0 (native XDP)\naccounts: 2\nhost_counters.malformed: 4\nhost_counters.ndp: 3\n\
             host_counters.non_ip: 1\nhost_counters.unbound: 2\npin_dir: /sys/fs/bpf/ipaccess\n\
             started_at: 2000-02-29 00:00:00\ntable_slots: 65536\ntable_slots_used: 3\n\nconnections:\nOPEN  UID\n1     0\n"
        );

        let (_, _, out) = against(&["bind", "add", "acme", "198.18.0.1:443"], |_| {
            json!({"ok": {"account": "acme", "addr": "198.18.0.1", "target": {"proto": "tcp", "port": 443},
                          "created_at": 951_782_400}})
        });
        assert_eq!(out, "bound 198.18.0.1 tcp/443 to acme\n");
        let (_, _, out) = against(
            &["bind", "add", "acme\n", "fd00::1"],
            |_| json!({"ok": {"account": "acme\n", "addr": "fd00::1", "target": null, "created_at": 0}}),
        );
        assert_eq!(out, "bound fd00::1 (every port) to acme\\n\n");
    }

    #[test]
    fn new_commands_on_the_wire() {
        let cases: [(&[&str], Value); 7] = [
            (&["account", "remove", "acme"], json!({"cmd": "account_remove", "account": "acme", "recursive": false})),
            (
                &["account", "remove", "acme", "--recursive"],
                json!({"cmd": "account_remove", "account": "acme", "recursive": true}),
            ),
            (
                &["allow", "enable", "acme", "198.18.0.0/24"],
                json!({"cmd": "allow_enable", "account": "acme", "cidr": "198.18.0.0/24"}),
            ),
            (
                &["allow", "disable", "acme", "198.18.0.7", "--client-ip", "198.18.0.9", "--force"],
                json!({"cmd": "allow_disable", "account": "acme", "cidr": "198.18.0.7/32", "client_ip": "198.18.0.9",
                    "force": true}),
            ),
            (
                &["allow", "disable", "acme", "fd00::/48"],
                json!({"cmd": "allow_disable", "account": "acme", "cidr": "fd00::/48", "force": false}),
            ),
            (
                &["allow", "label", "acme", "198.18.0.0/24", "home office"],
                json!({"cmd": "allow_label", "account": "acme", "cidr": "198.18.0.0/24", "label": "home office"}),
            ),
            (
                &["check", "acme", "198.18.0.9", "--dry-run"],
                json!({"cmd": "check", "account": "acme", "addr": "198.18.0.9", "dry_run": true}),
            ),
        ];
        for (args, want) in cases {
            let (request, status, _) =
                against(args, |_| json!({"ok": {"allowed": true, "reason": "allowed", "hint": ""}}));
            assert_eq!((request, status), (want, 0), "{args:?}");
        }
        // Every argument has help text: the man pages are made from it.
        fn documented(command: &clap::Command) {
            for arg in command.get_arguments().filter(|a| !["help", "version"].contains(&a.get_id().as_str())) {
                assert!(arg.get_help().is_some(), "{} {} has no help", command.get_name(), arg.get_id());
            }
            command.get_subcommands().for_each(documented);
        }
        documented(&<Cli as clap::CommandFactory>::command());
    }

    #[test]
    fn import_errors_name_the_line() {
        let batch: Vec<(usize, ImportAccount)> = [(3, "acme"), (5, "acme-dev"), (8, "acme.dev"), (9, "b")]
            .map(|(n, id)| (n, serde_json::from_value(json!({"account": id})).unwrap()))
            .to_vec();
        let error = |message: &str, details: Value| {
            DaemonError::from_reply(&json!({"code": "bad_request", "message": message, "details": details}))
        };
        assert_eq!(blame(&batch, &error("acme-dev exists with another parent", Value::Null)), Some((5, "acme-dev")));
        assert_eq!(blame(&batch, &error("account acme.dev: parent acme", Value::Null)), Some((8, "acme.dev")));
        assert_eq!(blame(&batch, &error("there is no account acme.", Value::Null)), Some((3, "acme")));
        assert_eq!(blame(&batch, &error("x", json!({"account": "b"}))), Some((9, "b")));
        assert_eq!(blame(&batch, &error("bad ab and bc", Value::Null)), None);

        let path = std::env::temp_dir().join(format!("ipaccessctl-import-{}.jsonl", std::process::id()));
        std::fs::write(
            &path,
            "# accounts\n{\"account\": \"acme\"}\n\n{\"account\": \"acme-dev\", \"parent\": \"x\"}\n",
        )
        .unwrap();
        let (request, status, out, err) = against_all(
            &["import", path.to_str().unwrap()],
            |_| json!({"error": {"code": "unknown_account", "message": "acme-dev: there is no account x"}}),
        );
        assert_eq!(request["accounts"].as_array().unwrap().len(), 2);
        assert_eq!((status, out.as_str()), (2, ""));
        assert_eq!(
            err,
            "error: line 4 (account acme-dev): acme-dev: there is no account x (nothing was imported) (unknown_account)\n"
        );
        std::fs::write(&path, "{\"account\": \"acme\"}\n{\"account\": \"acme\", \"mode\": \"strict\"}\n").unwrap();
        let mut err = Vec::new();
        let socket = "/nonexistent/ipaccessd.sock";
        assert_eq!(
            run(["ipaccessctl", "--socket", socket, "import", path.to_str().unwrap()], &mut Vec::new(), &mut err),
            2
        );
        let err = String::from_utf8(err).unwrap();
        assert!(err.starts_with("error: line 2: unknown variant `strict`"), "{err}");
        std::fs::remove_file(&path).unwrap();
    }
}
