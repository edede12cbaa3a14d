//! The command line: clap's definitions (the man pages and completions are generated from
//! them, so every argument has help text) and the request each command stands for.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use ipaccess::protocol::{
    AccountAdd, AccountList, AccountMode, AccountRemove, AccountShow, AccountState, Activity, ActivityKind, AllowAdd,
    AllowDisable, AllowEnable, AllowExpiry, AllowLabel, AllowList, AllowRemove, AllowReplace, BindAdd, BindList,
    BindRemove, Check, ClusterImport, Command, Detach, Method, Mode, OverrideGrant, OverrideList, OverrideRevoke,
    Proto, ReplaceEntry, SetAccountState, Stats, Status, parse_cidr,
};
use ipaccess::protocol::{
    AllowAddSet, AllowDisableSet, AllowEnableSet, AllowRemoveSet, SetAdd, SetDelete, SetList, SetRemove, SetShow,
};
use ipnet::IpNet;

const DEFAULT_SOCKET: &str = "/run/ipaccess/ipaccessd.sock";

#[derive(Parser, Debug)]
#[command(
    name = "ipaccessctl",
    version,
    about = "Manage ipaccessd: accounts, allowlists, bindings, login checks, support overrides"
)]
pub struct Cli {
    /// Control socket
    #[arg(long, global = true, value_name = "PATH", env = "IPACCESS_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Print the daemon's result (or error object) as JSON on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// On a fleet node: after a change, wait (at most SECONDS, 10 by default) until every
    /// live node has applied it (`--wait-fleet=30` for another limit); exit 3 if some have not
    #[arg(long, global = true, value_name = "SECONDS", num_args = 0..=1, require_equals = true, default_missing_value = "10")]
    pub wait_fleet: Option<u64>,
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Subcommand, Debug)]
pub enum Top {
    /// Accounts: creation, state and access mode
    #[command(subcommand)]
    Account(AccountCmd),
    /// An account's IP allowlist
    #[command(subcommand)]
    Allow(AllowCmd),
    /// Destination endpoints owned by accounts
    #[command(subcommand)]
    Bind(BindCmd),
    /// Shared named sets of networks (a company VPN, a CI provider's ranges), defined once
    /// and referenced by any number of accounts (allow add-set)
    #[command(subcommand)]
    Set(SetCmd),
    /// May ACCOUNT log in from ADDR? Exit 0 if allowed, 1 if denied, 2 on error
    Check {
        /// The account signing in
        account: String,
        /// The address the sign-in comes from
        addr: IpAddr,
        /// How the user signs in, recorded in the activity log
        #[arg(long)]
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
        #[arg(long)]
        kind: Option<ActivityKind>,
        /// Sign-ins per address and method: count, first and last seen, allowed or denied, and
        /// the address's location (country, city) when ipaccessd has a location_database
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
        /// Largest request to send, in bytes (half the daemon's default limit for admins, 8 MiB;
        /// each batch is one change: other changes wait while it is applied, about 0.1 s per MiB)
        #[arg(long, value_name = "BYTES", default_value_t = 4 << 20,
              value_parser = clap::value_parser!(u64).range(1024..))]
        batch_bytes: u64,
        /// Apply even where a new mode or allowlist of an existing account would shut out an
        /// address that signed in recently (the lockout guard, as for `allow replace`)
        #[arg(long)]
        force: bool,
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
    /// The fleet this node belongs to (etcd)
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Seed an empty fleet from this host's store: every account (with its allowlist, live
    /// overrides and sub-users), binding and the override sequence are written under the
    /// [cluster] prefix, which must be empty. Run it on the standalone host after adding
    /// [cluster] and restarting it; it then follows the fleet. An import that stopped part-way
    /// can be run again to finish
    Import,
}

#[derive(Subcommand, Debug)]
pub enum OverrideCmd {
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
pub enum AccountCmd {
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
pub enum AllowCmd {
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
        /// Let the entry in for this long only (90s, 30m, 2h, 7d; at most 366d), then
        /// nothing, in the kernel too; without it the entry never expires. Adding an expired
        /// entry again renews it
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        expires_in: Option<u64>,
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
    /// List an account's allowlist, with when each entry last let a sign-in and a packet
    /// through (as this node saw them)
    List {
        /// Account id
        id: String,
        /// Only the entries that let no sign-in and no packet through for this long (and are
        /// older than that): candidates for removal. 90d, 12h, 30m, 45s or seconds
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        unused: Option<u64>,
    },
    /// Turn disabled entries back on (several: all of them or none)
    Enable {
        /// Account id
        id: String,
        /// The entries, as added
        #[arg(value_name = "CIDR", required = true, value_parser = parse_cidr)]
        cidrs: Vec<IpNet>,
    },
    /// Keep entries on the list but ignore them, at sign-in and on the wire (several: all of
    /// them or none, the lockout guard judging the result once)
    Disable {
        /// Account id
        id: String,
        /// The entries, as added
        #[arg(value_name = "CIDR", required = true, value_parser = parse_cidr)]
        cidrs: Vec<IpNet>,
        /// Your own address: refused if disabling the entries would lock it out
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
    /// Change when an entry ends: --in a duration from now (also renewing an expired entry),
    /// or --never. Until then the entry lets in as before
    #[command(group(clap::ArgGroup::new("end").required(true).args(["ends_in", "never"])))]
    Expire {
        /// Account id
        id: String,
        /// The entry, as added
        #[arg(value_parser = parse_cidr)]
        cidr: IpNet,
        /// The entry ends this long from now (90s, 30m, 2h, 7d; at most 366d)
        #[arg(long = "in", value_name = "DURATION", value_parser = parse_duration)]
        ends_in: Option<u64>,
        /// The entry never ends
        #[arg(long)]
        never: bool,
        /// Your own address: an end brought nearer is refused if the entry's end would lock
        /// it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Bring the end nearer even if it locks out --client-ip or recent sign-ins
        #[arg(long)]
        force: bool,
    },
    /// Let an account in through a shared set's networks (they show in `allow list` as
    /// inherited, SOURCE set:NAME)
    AddSet {
        /// Account id
        id: String,
        /// Set name
        set: String,
    },
    /// Stop an account referencing a shared set (the lockout guard applies)
    RemoveSet {
        /// Account id
        id: String,
        /// Set name
        set: String,
        /// Your own address: refused if the removal would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Remove even if it locks out --client-ip or a recent sign-in
        #[arg(long)]
        force: bool,
    },
    /// Keep an account's reference to a shared set but let nothing in through it, for this
    /// account only (the lockout guard applies)
    DisableSet {
        /// Account id
        id: String,
        /// Set name
        set: String,
        /// Your own address: refused if disabling would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Disable even if it locks out --client-ip or a recent sign-in
        #[arg(long)]
        force: bool,
    },
    /// Turn a disabled reference to a shared set back on
    EnableSet {
        /// Account id
        id: String,
        /// Set name
        set: String,
    },
    /// Replace the whole allowlist from FILE: one `CIDR [label]` per line; a `#` starting a
    /// line or standing apart (`198.18.0.0/24 office # since 2026`) starts a comment, one
    /// within a word is the label's (`Suite #4`); errors name the file's line
    Replace {
        /// Account id
        id: String,
        /// The new list (`-`: stdin), UTF-8 (a byte order mark at its start is skipped)
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// Your own address: refused if the new list would lock it out
        #[arg(long, value_name = "ADDR")]
        client_ip: Option<IpAddr>,
        /// Replace even if it locks out --client-ip
        #[arg(long)]
        force: bool,
        /// Change nothing: show what would be added, removed and kept, and which recent
        /// sign-ins would be shut out
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SetCmd {
    /// Add networks to a set, creating it when it is new; every account that references it
    /// is let in through them at once, in the kernel too
    Add {
        /// Set name (letters, digits and . _ @ + -)
        name: String,
        /// IPv4 or IPv6 CIDRs, or bare addresses
        #[arg(value_name = "CIDR", required = true, value_parser = parse_cidr)]
        cidrs: Vec<IpNet>,
        /// A note shown with each network added, e.g. "corporate VPN"
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
    },
    /// Remove networks from a set, for every account that references it at once (refused if
    /// that shuts out a recent sign-in of an enforcing account, unless --force)
    Remove {
        /// Set name
        name: String,
        /// The networks, as added
        #[arg(value_name = "CIDR", required = true, value_parser = parse_cidr)]
        cidrs: Vec<IpNet>,
        /// Remove even if it shuts out recent sign-ins
        #[arg(long)]
        force: bool,
    },
    /// Delete a set (refused while accounts reference it, unless --force, which removes
    /// their references too)
    Delete {
        /// Set name
        name: String,
        /// Delete even while referenced, removing the references
        #[arg(long)]
        force: bool,
    },
    /// List the sets, with how many networks and references each has
    List,
    /// A set's networks and the accounts that reference it
    Show {
        /// Set name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum BindCmd {
    /// Bind ADDR[:PORT] to an account (IPv6 with a port: [ADDR]:PORT; no port: whole address)
    Add {
        /// Account id
        id: String,
        /// The account's endpoint on this host
        #[arg(value_name = "ADDR[:PORT]", value_parser = parse_endpoint)]
        addr: (IpAddr, Option<u16>),
        /// Protocol of a port binding [default: tcp]
        #[arg(long)]
        proto: Option<Proto>,
        /// In a fleet: bind it on this node only (its [cluster] node name), since the address
        /// is that host's; without it every node enforces it. May be repeated per node.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// Remove a binding
    Remove {
        /// The endpoint, as bound
        #[arg(value_name = "ADDR[:PORT]", value_parser = parse_endpoint)]
        addr: (IpAddr, Option<u16>),
        /// Protocol of a port binding [default: tcp]
        #[arg(long)]
        proto: Option<Proto>,
        /// The node of a binding made with --node; without it, the fleet-wide binding
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
    },
    /// List all bindings (in a fleet, every node's: NODE is the one node that enforces it, * every node)
    List,
}

/// The first of a command's CIDRs (clap requires one) and the rest.
fn first_and_rest(mut cidrs: Vec<IpNet>) -> (IpNet, Vec<IpNet>) {
    let first = cidrs.remove(0);
    (first, cidrs)
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
        // The kernel matches addresses, not interfaces: a zone would be dropped unsaid, as a
        // bare address with one is refused.
        Ok(SocketAddr::V6(sa)) if sa.scope_id() != 0 => {
            Err(format!("`{s}` names a zone (%{}); a binding takes the address without one", sa.scope_id()))
        }
        Ok(sa) => Ok((sa.ip(), Some(sa.port()))),
        Err(_) => Err(format!("`{s}` is not ADDR, ADDR:PORT or [IPv6]:PORT")),
    }
}

/// An allowlist file: one `CIDR [label]` per line; blank lines are skipped, and so is a
/// comment: a `#` that starts a line or stands apart (` # `, or ` #` ending the line). A
/// `#` within a word is the label's (`Suite #4`). Also returns each entry's line number.
fn parse_allow_file(text: &str) -> Result<(Vec<ReplaceEntry>, Vec<usize>), String> {
    let mut entries = Vec::new();
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = without_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        let (cidr, label) = match line.split_once(char::is_whitespace) {
            Some((cidr, label)) => (cidr, Some(label.trim().to_string())),
            None => (line, None),
        };
        let cidr = parse_cidr(cidr).map_err(|e| format!("line {}: {e}", n + 1))?;
        entries.push(ReplaceEntry { cidr, label });
        lines.push(n + 1);
    }
    Ok((entries, lines))
}

/// `line` up to its comment, if it has one (see [`parse_allow_file`]).
fn without_comment(line: &str) -> &str {
    if line.trim_start().starts_with('#') {
        return "";
    }
    let stands_apart = |at: usize| {
        let before = line[..at].ends_with(char::is_whitespace);
        let after = line[at + 1..].chars().next().is_none_or(char::is_whitespace);
        before && after
    };
    match line.match_indices('#').map(|(at, _)| at).find(|&at| stands_apart(at)) {
        Some(at) => &line[..at],
        None => line,
    }
}

/// A bare address binds all of it, so a protocol makes sense only with a port.
fn endpoint(addr: (IpAddr, Option<u16>), proto: Option<Proto>) -> Result<(IpAddr, Option<u16>, Option<Proto>), String> {
    match (addr.1, proto) {
        (None, Some(_)) => Err("--proto needs a port (ADDR:PORT); a bare address binds every port".into()),
        (Some(port), proto) => Ok((addr.0, Some(port), Some(proto.unwrap_or(Proto::Tcp)))),
        (None, None) => Ok((addr.0, None, None)),
    }
}

/// What the command line asks for: one request, or an import (many).
#[derive(Debug)]
pub enum Action {
    Send(Command),
    Import {
        file: PathBuf,
        batch_bytes: u64,
        force: bool,
    },
    /// A request made from a file: `lines[n]` is the file line of the request's entry n + 1,
    /// so that an error about an entry names the line to fix.
    SendFromFile {
        command: Command,
        lines: Vec<usize>,
    },
}

/// The request (or import) the parsed command line stands for; reads `allow replace`'s file.
pub fn action(top: Top) -> Result<Action, String> {
    Ok(Action::Send(match top {
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
        Top::Allow(AllowCmd::Add { id, cidr, label, expires_in }) => {
            Command::AllowAdd(AllowAdd { account: id, cidr, label, ttl_seconds: expires_in })
        }
        Top::Allow(AllowCmd::Remove { id, cidr, client_ip, force }) => {
            Command::AllowRemove(AllowRemove { account: id, cidr, client_ip, force })
        }
        Top::Allow(AllowCmd::List { id, unused }) => Command::AllowList(AllowList { account: id, unused }),
        Top::Allow(AllowCmd::Enable { id, cidrs }) => {
            let (cidr, also) = first_and_rest(cidrs);
            Command::AllowEnable(AllowEnable { account: id, cidr, also })
        }
        Top::Allow(AllowCmd::Disable { id, cidrs, client_ip, force }) => {
            let (cidr, also) = first_and_rest(cidrs);
            Command::AllowDisable(AllowDisable { account: id, cidr, also, client_ip, force })
        }
        Top::Allow(AllowCmd::Label { id, cidr, label }) => Command::AllowLabel(AllowLabel { account: id, cidr, label }),
        Top::Allow(AllowCmd::Expire { id, cidr, ends_in, never: _, client_ip, force }) => {
            Command::AllowExpiry(AllowExpiry { account: id, cidr, ttl_seconds: ends_in, client_ip, force })
        }
        Top::Allow(AllowCmd::Replace { id, file, client_ip, force, dry_run }) => {
            let (entries, lines) = parse_allow_file(&read_input(&file)?)?;
            let command = Command::AllowReplace(AllowReplace { account: id, entries, client_ip, force, dry_run });
            return Ok(Action::SendFromFile { command, lines });
        }
        Top::Allow(AllowCmd::AddSet { id, set }) => Command::AllowAddSet(AllowAddSet { account: id, set }),
        Top::Allow(AllowCmd::RemoveSet { id, set, client_ip, force }) => {
            Command::AllowRemoveSet(AllowRemoveSet { account: id, set, client_ip, force })
        }
        Top::Allow(AllowCmd::DisableSet { id, set, client_ip, force }) => {
            Command::AllowDisableSet(AllowDisableSet { account: id, set, client_ip, force })
        }
        Top::Allow(AllowCmd::EnableSet { id, set }) => Command::AllowEnableSet(AllowEnableSet { account: id, set }),
        Top::Set(SetCmd::Add { name, cidrs, label }) => Command::SetAdd(SetAdd { set: name, cidrs, label }),
        Top::Set(SetCmd::Remove { name, cidrs, force }) => Command::SetRemove(SetRemove { set: name, cidrs, force }),
        Top::Set(SetCmd::Delete { name, force }) => Command::SetDelete(SetDelete { set: name, force }),
        Top::Set(SetCmd::List) => Command::SetList(SetList {}),
        Top::Set(SetCmd::Show { name }) => Command::SetShow(SetShow { set: name }),
        Top::Stats { id } => Command::Stats(Stats { account: id }),
        Top::Detach { interface } => Command::Detach(Detach { interface }),
        Top::Bind(BindCmd::Add { id, addr, proto, node }) => {
            let (addr, port, proto) = endpoint(addr, proto)?;
            Command::BindAdd(BindAdd { account: id, addr, port, proto, node })
        }
        Top::Bind(BindCmd::Remove { addr, proto, node }) => {
            let (addr, port, proto) = endpoint(addr, proto)?;
            Command::BindRemove(BindRemove { addr, port, proto, node })
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
        Top::Cluster(ClusterCmd::Import) => Command::ClusterImport(ClusterImport {}),
        Top::Import { file, batch_bytes, force } => return Ok(Action::Import { file, batch_bytes, force }),
    }))
}

/// The whole of `file`, or of standard input for `-`, without the byte order mark that
/// Windows editors put at the start of a UTF-8 file (it would be read as part of the first
/// network or account).
pub fn read_input(file: &Path) -> Result<String, String> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("reading stdin: {e}"))?
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("reading {}: {e}", file.display()))?
    };
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_owned(),
        None => text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, ValueEnum};
    use serde_json::{Value, json};

    /// The request a command line stands for, as it goes on the wire (without the id).
    fn wire(args: &[&str]) -> Value {
        let cli = Cli::try_parse_from([&["ipaccessctl"], args].concat()).unwrap();
        match action(cli.command).unwrap() {
            Action::Send(command) | Action::SendFromFile { command, .. } => serde_json::to_value(command).unwrap(),
            Action::Import { .. } => panic!("{args:?} is an import"),
        }
    }

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
            "[fe80::1%2]:993",
            "fe80::1%2",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(endpoint((v4, Some(53)), None).unwrap(), (v4, Some(53), Some(Proto::Tcp)));
        assert_eq!(endpoint((v4, Some(53)), Some(Proto::Udp)).unwrap(), (v4, Some(53), Some(Proto::Udp)));
        assert!(endpoint((v4, None), Some(Proto::Udp)).is_err());
        assert_eq!(parse_cidr("203.0.113.7"), Ok("203.0.113.7/32".parse().unwrap()));
        // The protocol's own strict reading: no octal-looking octets, on the command line either.
        assert!(Cli::try_parse_from(["x", "allow", "add", "a", "010.0.0.0/8"]).is_err());
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
        let grant = ["x", "override", "grant", "a", "192.0.2.1", "--ttl", "0", "--ticket", "T", "--reason", "r"];
        let e = Cli::try_parse_from(grant).unwrap_err();
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

    /// clap's name of each variant is the wire's: what a person types is what the daemon reads.
    fn same_names<T: ValueEnum + serde::Serialize>() {
        for variant in T::value_variants() {
            let clap = variant.to_possible_value().expect("no variant is skipped");
            assert_eq!(serde_json::to_value(variant).unwrap(), clap.get_name(), "{}", std::any::type_name::<T>());
        }
    }

    #[test]
    fn clap_config_and_enum_names() {
        Cli::command().debug_assert();
        same_names::<Mode>();
        same_names::<AccountState>();
        same_names::<Proto>();
        same_names::<Method>();
        same_names::<ActivityKind>();
        for m in ["password", "api_key", "sso"] {
            assert!(Cli::try_parse_from(["x", "check", "a", "192.0.2.1", "--method", m]).is_ok());
        }
        assert!(Cli::try_parse_from(["x", "check", "a", "192.0.2.1", "--method", "api-key"]).is_err());
        assert!(Cli::try_parse_from(["x", "account", "mode", "a", "paranoid"]).is_err());
        // The socket's path from the environment, as before clap read it.
        let command = Cli::command();
        let socket = command.get_arguments().find(|a| a.get_id() == "socket").unwrap();
        assert_eq!(socket.get_env(), Some(std::ffi::OsStr::new("IPACCESS_SOCKET")));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("IPACCESS_SOCKET") && help.contains("/run/ipaccess/ipaccessd.sock"), "{help}");
        // Every argument has help text: the man pages are made from it.
        fn documented(command: &clap::Command) {
            for arg in command.get_arguments().filter(|a| !["help", "version"].contains(&a.get_id().as_str())) {
                assert!(arg.get_help().is_some(), "{} {} has no help", command.get_name(), arg.get_id());
            }
            command.get_subcommands().for_each(documented);
        }
        documented(&Cli::command());
    }

    #[test]
    fn commands_on_the_wire() {
        let cases: [(&[&str], Value); 15] = [
            (
                &["account", "add", "acme", "--unconfirmed"],
                json!({"cmd": "account_add", "account": "acme", "unconfirmed": true}),
            ),
            (&["account", "remove", "acme"], json!({"cmd": "account_remove", "account": "acme", "recursive": false})),
            (
                &["account", "remove", "acme", "--recursive"],
                json!({"cmd": "account_remove", "account": "acme", "recursive": true}),
            ),
            (
                &["account", "state", "acme", "banned", "--reason", "spam"],
                json!({"cmd": "account_state", "account": "acme", "state": "banned", "reason": "spam"}),
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
                &["allow", "expire", "acme", "198.18.0.7", "--in", "7d"],
                json!({"cmd": "allow_expiry", "account": "acme", "cidr": "198.18.0.7/32", "ttl_seconds": 604800,
                       "force": false}),
            ),
            (
                &["allow", "expire", "acme", "198.18.0.7", "--in", "1s", "--client-ip", "198.18.0.9", "--force"],
                json!({"cmd": "allow_expiry", "account": "acme", "cidr": "198.18.0.7/32", "ttl_seconds": 1,
                       "client_ip": "198.18.0.9", "force": true}),
            ),
            (
                &["allow", "expire", "acme", "198.18.0.0/24", "--never"],
                json!({"cmd": "allow_expiry", "account": "acme", "cidr": "198.18.0.0/24", "ttl_seconds": null,
                       "force": false}),
            ),
            (
                &["check", "acme", "198.18.0.9", "--dry-run"],
                json!({"cmd": "check", "account": "acme", "addr": "198.18.0.9", "dry_run": true}),
            ),
            (
                &["check", "acme", "192.0.2.9", "--method", "api_key"],
                json!({"cmd": "check", "account": "acme", "addr": "192.0.2.9", "method": "api_key", "dry_run": false}),
            ),
            (
                &["bind", "add", "acme", "[fd00::1]:53", "--proto", "udp"],
                json!({"cmd": "bind_add", "account": "acme", "addr": "fd00::1", "port": 53, "proto": "udp"}),
            ),
            (
                &["activity", "acme", "--since", "30m", "--denied", "--limit", "3", "--kind", "drop"],
                json!({"cmd": "activity", "account": "acme", "since_seconds": 1800, "denied_only": true, "limit": 3,
                       "kind": "drop", "summary": false, "unknown_accounts": false}),
            ),
        ];
        for (args, want) in cases {
            assert_eq!(wire(args), want, "{args:?}");
        }
        let cli = Cli::try_parse_from(["x", "bind", "add", "acme", "198.18.0.3", "--proto", "udp"]).unwrap();
        assert!(action(cli.command).unwrap_err().contains("--proto needs a port"));
    }

    #[test]
    fn allowlist_files() {
        let text = "# office\n198.18.0.0/24 head office # comment\n\nfd00::1\n  # indented\n198.18.1.0/24 Suite #4, 2nd floor\n\
                    198.18.2.0/24 lab #\n198.18.3.0/24 #\n";
        let (entries, lines) = parse_allow_file(text).unwrap();
        assert_eq!(
            serde_json::to_value(entries).unwrap(),
            json!([
                {"cidr": "198.18.0.0/24", "label": "head office"},
                {"cidr": "fd00::1/128"},
                {"cidr": "198.18.1.0/24", "label": "Suite #4, 2nd floor"},
                {"cidr": "198.18.2.0/24", "label": "lab"},
                {"cidr": "198.18.3.0/24"},
            ])
        );
        assert_eq!(lines, [2, 4, 6, 7, 8]);
        assert!(parse_allow_file("198.18.0.0/24\nnot-a-cidr x\n").unwrap_err().starts_with("line 2: "));
    }

    #[test]
    fn a_files_byte_order_mark_is_not_its_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("list.txt");
        std::fs::write(&file, "\u{feff}198.18.0.0/24 office\n").unwrap();
        assert_eq!(read_input(&file).unwrap(), "198.18.0.0/24 office\n");
        // Only at the start: elsewhere it is the text's, and refused where it does not belong.
        std::fs::write(&file, "198.18.0.0/24 office\n\u{feff}198.18.1.0/24\n").unwrap();
        assert!(parse_allow_file(&read_input(&file).unwrap()).unwrap_err().starts_with("line 2: "));
    }
}
