//! The control socket's wire format: one JSON object per line each way.
//!
//! A request is `{"id": <any JSON>, "cmd": "<command>", ...arguments}`; the reply echoes the
//! id and carries either `"ok": <result>` or `"error": {"code": "...", "message": "..."}`.
//! Commands and their arguments are the variants of [`Command`]; `docs/protocol.md` shows an
//! example of each.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A request line. `id` is echoed unchanged in the reply.
#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    #[serde(default)]
    pub id: serde_json::Value,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Create an account (`unconfirmed` until its email is confirmed when asked to).
    AccountAdd {
        account: String,
        #[serde(default)]
        parent: Option<String>,
        #[serde(default)]
        unconfirmed: bool,
    },
    AccountShow {
        account: String,
    },
    /// Remove an account with its allowlist, overrides, bindings and kernel state; refused
    /// while it has sub-users unless `recursive`.
    AccountRemove {
        account: String,
        #[serde(default)]
        recursive: bool,
    },
    AccountList {},
    AccountState {
        account: String,
        state: AccountState,
        #[serde(default)]
        reason: Option<String>,
    },
    AccountMode {
        account: String,
        mode: Mode,
        #[serde(default)]
        client_ip: Option<IpAddr>,
        #[serde(default)]
        force: bool,
    },
    AllowAdd {
        account: String,
        #[serde(deserialize_with = "cidr")]
        cidr: IpNet,
        #[serde(default)]
        label: Option<String>,
    },
    AllowRemove {
        account: String,
        #[serde(deserialize_with = "cidr")]
        cidr: IpNet,
        #[serde(default)]
        client_ip: Option<IpAddr>,
        #[serde(default)]
        force: bool,
    },
    AllowList {
        account: String,
    },
    /// Keep an entry but let nothing in through it, in the kernel too (the lockout guard
    /// applies, as to a removal).
    AllowDisable {
        account: String,
        #[serde(deserialize_with = "cidr")]
        cidr: IpNet,
        #[serde(default)]
        client_ip: Option<IpAddr>,
        #[serde(default)]
        force: bool,
    },
    /// Let a disabled entry in again.
    AllowEnable {
        account: String,
        #[serde(deserialize_with = "cidr")]
        cidr: IpNet,
    },
    /// Change an entry's label (`null` clears it).
    AllowLabel {
        account: String,
        #[serde(deserialize_with = "cidr")]
        cidr: IpNet,
        #[serde(default)]
        label: Option<String>,
    },
    /// Replace the whole allowlist in one change (labels optional).
    AllowReplace {
        account: String,
        entries: Vec<ReplaceEntry>,
        #[serde(default)]
        client_ip: Option<IpAddr>,
        #[serde(default)]
        force: bool,
    },
    BindAdd {
        account: String,
        addr: IpAddr,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        proto: Option<Proto>,
    },
    BindRemove {
        addr: IpAddr,
        #[serde(default)]
        port: Option<u16>,
        #[serde(default)]
        proto: Option<Proto>,
    },
    BindList {},
    /// A login check: may `account` log in from `addr`?
    Check {
        account: String,
        addr: IpAddr,
        #[serde(default)]
        method: Option<Method>,
        /// Answer without recording a sign-in (support and admins asking "would this
        /// address be allowed?").
        #[serde(default)]
        dry_run: bool,
    },
    /// Support: let `cidr` reach the account for `ttl_seconds`, after verifying ownership.
    OverrideGrant {
        account: String,
        #[serde(deserialize_with = "cidr")]
        cidr: IpNet,
        ttl_seconds: u64,
        ticket: String,
        reason: String,
    },
    OverrideRevoke {
        account: String,
        override_id: i64,
    },
    /// Live overrides, of one account or all.
    OverrideList {
        #[serde(default)]
        account: Option<String>,
    },
    /// An account's recorded activity, newest first: sign-ins and drops counted per hour,
    /// audit records one each. Or, with `summary`, its sign-ins per (address, method,
    /// outcome); or, with `unknown_accounts` and no account, checks for accounts that do
    /// not exist, per address.
    Activity {
        #[serde(default)]
        account: Option<String>,
        #[serde(default)]
        since_seconds: Option<u64>,
        /// Refused sign-ins and drops, and those monitor mode let through.
        #[serde(default)]
        denied_only: bool,
        #[serde(default)]
        limit: Option<u32>,
        /// Only sign-ins, drops or audit records (default: all three).
        #[serde(default)]
        kind: Option<ActivityKind>,
        #[serde(default)]
        summary: bool,
        #[serde(default)]
        unknown_accounts: bool,
    },
    /// Kernel counters: one account's, or every account's and the host's.
    Stats {
        #[serde(default)]
        account: Option<String>,
    },
    /// Bulk load: create or update many accounts, each with its whole allowlist, in one
    /// change. Importing the same batch twice leaves the same result.
    Import {
        accounts: Vec<ImportAccount>,
    },
    /// Remove the filter from an interface (the only way it is ever removed).
    Detach {
        interface: String,
    },
    Status {},
}

/// The kinds of activity records: login checks, packets the kernel dropped, audited changes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ActivityKind {
    Signin,
    Drop,
    Audit,
}

/// One line of an `allow_replace`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplaceEntry {
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    #[serde(default)]
    pub label: Option<String>,
}

/// One account of an `import`. A missing account is created (`active`, mode `off` unless
/// given); an existing one keeps what is left out. `entries`, when given, replace its
/// allowlist.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImportAccount {
    pub account: String,
    /// Only when the account is created: a parent cannot be changed later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AccountState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entries: Option<Vec<ReplaceEntry>>,
}

impl Command {
    /// Whether a caller holding `roles` may run this command. Reads (status, accounts,
    /// allowlists, bindings, counters) and login checks are open to every role (a check by
    /// a caller without the check role is recorded as that operator's, never as the
    /// customer's attempt); changes need admin; overrides and activity need support.
    pub fn permits(&self, roles: &BTreeSet<Role>) -> bool {
        match self.role() {
            Some(role) => roles.contains(&role),
            None => !roles.is_empty(),
        }
    }

    /// The one role this command needs, or `None` when any role will do.
    pub fn role(&self) -> Option<Role> {
        match self {
            Command::AccountShow { .. }
            | Command::AccountList {}
            | Command::AllowList { .. }
            | Command::BindList {}
            | Command::Stats { .. }
            | Command::Status {}
            | Command::Check { .. } => None,
            Command::AccountAdd { .. }
            | Command::AccountRemove { .. }
            | Command::AllowDisable { .. }
            | Command::AllowEnable { .. }
            | Command::AllowLabel { .. }
            | Command::AccountState { .. }
            | Command::AccountMode { .. }
            | Command::AllowAdd { .. }
            | Command::AllowRemove { .. }
            | Command::AllowReplace { .. }
            | Command::Import { .. }
            | Command::Detach { .. }
            | Command::BindAdd { .. }
            | Command::BindRemove { .. } => Some(Role::Admin),
            Command::OverrideGrant { .. }
            | Command::OverrideRevoke { .. }
            | Command::OverrideList { .. }
            | Command::Activity { .. } => Some(Role::Support),
        }
    }
}

/// Who sent a request: the peer's uid and the roles the configuration in force gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub uid: u32,
    pub roles: BTreeSet<Role>,
}

impl Caller {
    /// An application's sign-in check counts as the customer's attempt (evidence for
    /// support, recent sign-ins for the lockout guard); one made by support or an admin
    /// without the check role does not.
    pub fn is_application(&self) -> bool {
        self.roles.contains(&Role::Check)
    }
}

/// What a caller may do; root has every role.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Login checks and reads.
    Check,
    /// Accounts, allowlists, modes, bindings.
    Admin,
    /// Overrides and activity.
    Support,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    Active,
    Unconfirmed,
    Terminated,
    Banned,
}

impl AccountState {
    /// Banned and terminated accounts have all their traffic dropped.
    pub fn suspended(self) -> bool {
        matches!(self, AccountState::Terminated | AccountState::Banned)
    }
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Off,
    Monitor,
    Enforce,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => ipaccess_common::packet::IPPROTO_TCP,
            Proto::Udp => ipaccess_common::packet::IPPROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    #[default]
    Password,
    ApiKey,
    Sso,
}

/// A reply line.
#[derive(Debug, Deserialize, Serialize)]
pub struct Reply {
    pub id: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    /// Structured facts behind the error, where a caller can act on them (for `lockout`:
    /// the recent sign-ins the change would shut out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

/// Stable error codes: scripts match on these, people read the message.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The line is not JSON, or not an object.
    BadJson,
    /// Unknown `cmd`, or missing/extra/mistyped arguments.
    BadRequest,
    /// The line is longer than the configured limit; the connection is closed.
    TooLarge,
    /// The caller's uid/gid has no role that allows the command.
    Forbidden,
    UnknownAccount,
    AccountExists,
    UnknownBinding,
    BindingExists,
    EntryExists,
    UnknownEntry,
    UnknownOverride,
    /// The account's state forbids it (no override for a banned or terminated account).
    Refused,
    /// The change would lock out the address the caller named with `client_ip`.
    Lockout,
    /// The daemon is busy (too many requests in flight on this connection).
    Busy,
    /// The account already has sub-users (remove them first, or `recursive`).
    HasSubUsers,
    /// The kernel's tables have no room for the change (raise `[maps] slots`); nothing was
    /// changed.
    TablesFull,
    /// Storage or kernel failure; nothing was changed.
    Internal,
}

/// The outcome of a login check.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct CheckResult {
    pub allowed: bool,
    /// Stable reason code, see [`Reason`].
    pub reason: Reason,
    /// A sentence the person signing in can act on. It never tells whether an account
    /// exists: an unknown account gets the hint of an address that is not allowed.
    pub hint: String,
    /// What an operator needs to know (which rule decided, and why); not for the person
    /// signing in.
    #[serde(default)]
    pub detail: String,
    /// The support override that let the address in, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_override: Option<OverrideRef>,
}

/// Which override allowed a check, and until when (unix s).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct OverrideRef {
    pub id: i64,
    pub expires_at: i64,
}

/// An account's state as it takes effect: its own, unless an ancestor's ban or termination
/// suspends it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum EffectiveState {
    Active,
    Unconfirmed,
    Terminated,
    Banned,
    ParentTerminated,
    ParentBanned,
}

/// Why a check came out as it did, first match wins in this order.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownAccount,
    Banned,
    ParentBanned,
    Terminated,
    /// The parent account was terminated for non-payment, and with it its sub-users.
    ParentTerminated,
    Unconfirmed,
    AddressNotAllowed,
    /// Monitor mode: the address is not on the list, but the check allows and records it.
    MonitorWouldDeny,
    Allowed,
}

/// A CIDR or a bare address (a host: /32 or /128), written strictly: decimal prefix
/// lengths without a sign or leading zeros, and addresses as the standard library reads
/// them (no leading zeros in IPv4 octets, which some parsers take for octal). Host bits
/// are checked later, where the error can name the network.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let bad = || format!("{text:?} is not a CIDR (198.18.0.0/24, fd00::/48) or an address");
    let (addr, prefix) = match text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (text, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) => return Err(bad()),
        Some(p) if p.len() > 1 && p.starts_with('0') => return Err(bad()),
        Some(p) => p.parse().map_err(|_| bad())?,
    };
    IpNet::new(addr, prefix).map_err(|_| format!("{text:?}: the prefix length is at most {max}"))
}

fn cidr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<IpNet, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    parse_cidr(&text).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_cidrs() {
        assert_eq!(parse_cidr("198.18.0.0/24").unwrap().to_string(), "198.18.0.0/24");
        assert_eq!(parse_cidr("198.18.0.7").unwrap().to_string(), "198.18.0.7/32");
        assert_eq!(parse_cidr("fd00::1").unwrap().to_string(), "fd00::1/128");
        assert_eq!(parse_cidr("198.18.0.7/24").unwrap().to_string(), "198.18.0.7/24", "host bits are judged later");
        for bad in [
            "010.0.0.0/8",
            "010.0.0.1",
            "198.18.0.0/024",
            "198.18.0.0/+24",
            "198.18.0.0/",
            "198.18.0.0/33",
            "fd00::/129",
            "/24",
            "198.18.0.0/24 ",
            " 198.18.0.0/24",
            "198.18.0.0/2a",
            "fd00::/0048",
            "",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        let request: Result<Command, _> =
            serde_json::from_str(r#"{"cmd": "allow_add", "account": "a", "cidr": "010.0.0.0/8"}"#);
        assert!(request.unwrap_err().to_string().contains("is not a CIDR"));
        let request: Command =
            serde_json::from_str(r#"{"cmd": "allow_add", "account": "a", "cidr": "198.18.0.9"}"#).unwrap();
        assert!(matches!(request, Command::AllowAdd { cidr, .. } if cidr.to_string() == "198.18.0.9/32"));
    }
}
