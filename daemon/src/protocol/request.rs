//! Requests: one type per command, each tied to the type of its reply by [`Call`].
//!
//! A new command is a struct here, a line in the `commands!` table below (its reply type and
//! the role it needs), a handler in the service family it belongs to, and a table in
//! docs/protocol.md (the protocol_doc test names what is missing).

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    AccountState, ActivityKind, Method, Mode, Proto, Role, address, cidr, cidrs, optional_address,
    reply::{
        Account, AccountDetails, ActivityReport, Allowlist, Binding, CheckResult, ClusterImported, Detached, Entry,
        EntryRemoved, Granted, Imported, ListedAccount, Noted, Override, Removed, StatsReport, StatusReport,
    },
    sets::{
        AllowAddSet, AllowDisableSet, AllowEnableSet, AllowRemoveSet, ListedSet, SetAdd, SetDelete, SetDeleted,
        SetList, SetReference, SetRemove, SetShow, SharedSet,
    },
};

/// A request type and what the daemon answers it with.
pub trait Call: Serialize + Into<Command> {
    /// The `ok` value of a successful reply.
    type Reply: DeserializeOwned + Serialize;
    /// The role a caller needs, or `None` when any role will do.
    const ROLE: Option<Role>;
    /// Whether it changes policy. One that does not (a read, or a check, which only adds to
    /// the activity counts) is safe to send again when its reply was lost.
    const CHANGES: bool;
}

/// The `commands!` table: each command's variant of [`Command`] (whose snake_case name is
/// the wire's `cmd`), request type, reply type, role, and whether it changes policy.
macro_rules! commands {
    ($($name:ident($request:ident) => $reply:ty, $role:expr, $changes:expr;)*) => {
        /// Any request, as it arrives on the socket: `{"cmd": "<name>", ...arguments}`.
        #[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
        #[serde(tag = "cmd", rename_all = "snake_case")]
        pub enum Command {
            $($name($request),)*
        }

        $(
            impl Call for $request {
                type Reply = $reply;
                const ROLE: Option<Role> = $role;
                const CHANGES: bool = $changes;
            }

            impl From<$request> for Command {
                fn from(request: $request) -> Command {
                    Command::$name(request)
                }
            }
        )*

        impl Command {
            /// The one role this command needs, or `None` when any role will do.
            pub fn role(&self) -> Option<Role> {
                match self {
                    $(Command::$name(_) => <$request as Call>::ROLE,)*
                }
            }

            /// Whether the command changes policy (see [`Call::CHANGES`]).
            pub fn changes(&self) -> bool {
                match self {
                    $(Command::$name(_) => <$request as Call>::CHANGES,)*
                }
            }

            /// Whether `ok` is a reply of this command's type: it reads as that type and
            /// writes back as the same JSON (no key the type lacks, none it needs missing).
            /// For tests that hold documents and other clients to the types.
            pub fn check_reply(&self, ok: &serde_json::Value) -> Result<(), String> {
                match self {
                    $(Command::$name(_) => round_trips::<$reply>(ok),)*
                }
            }
        }
    };
}

fn round_trips<T: DeserializeOwned + Serialize>(ok: &serde_json::Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(ok.clone()).map_err(|e| e.to_string())?;
    let again = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &again == ok { Ok(()) } else { Err(format!("{ok} reads as the reply type but writes back as {again}")) }
}

const ANY: Option<Role> = None;
const CHANGES: bool = true;
const READS: bool = false;
const ADMIN: Option<Role> = Some(Role::Admin);
const SUPPORT: Option<Role> = Some(Role::Support);

// Reads (status, accounts, allowlists, bindings, counters) and login checks are open to
// every role; changes need admin; overrides and activity need support.
commands! {
    AccountAdd(AccountAdd) => Account, ADMIN, CHANGES;
    AccountShow(AccountShow) => AccountDetails, ANY, READS;
    AccountRemove(AccountRemove) => Removed, ADMIN, CHANGES;
    AccountList(AccountList) => Vec<ListedAccount>, ANY, READS;
    AccountState(SetAccountState) => Account, ADMIN, CHANGES;
    AccountMode(AccountMode) => Account, ADMIN, CHANGES;
    AllowAdd(AllowAdd) => Noted<Entry>, ADMIN, CHANGES;
    AllowRemove(AllowRemove) => EntryRemoved, ADMIN, CHANGES;
    AllowList(AllowList) => Vec<Entry>, ANY, READS;
    AllowDisable(AllowDisable) => Noted<Entry>, ADMIN, CHANGES;
    AllowEnable(AllowEnable) => Noted<Entry>, ADMIN, CHANGES;
    AllowLabel(AllowLabel) => Noted<Entry>, ADMIN, CHANGES;
    AllowExpiry(AllowExpiry) => Noted<Entry>, ADMIN, CHANGES;
    AllowReplace(AllowReplace) => Allowlist, ADMIN, CHANGES;
    BindAdd(BindAdd) => Binding, ADMIN, CHANGES;
    BindRemove(BindRemove) => Binding, ADMIN, CHANGES;
    BindList(BindList) => Vec<Binding>, ANY, READS;
    Check(Check) => CheckResult, ANY, READS;
    OverrideGrant(OverrideGrant) => Granted, SUPPORT, CHANGES;
    OverrideRevoke(OverrideRevoke) => Override, SUPPORT, CHANGES;
    OverrideList(OverrideList) => Vec<Override>, SUPPORT, READS;
    Activity(Activity) => ActivityReport, SUPPORT, READS;
    Stats(Stats) => StatsReport, ANY, READS;
    Import(Import) => Imported, ADMIN, CHANGES;
    Detach(Detach) => Detached, ADMIN, CHANGES;
    Status(Status) => StatusReport, ANY, READS;
    ClusterImport(ClusterImport) => ClusterImported, ADMIN, CHANGES;
    SetAdd(SetAdd) => SharedSet, ADMIN, CHANGES;
    SetRemove(SetRemove) => SharedSet, ADMIN, CHANGES;
    SetDelete(SetDelete) => SetDeleted, ADMIN, CHANGES;
    SetList(SetList) => Vec<ListedSet>, ANY, READS;
    SetShow(SetShow) => SharedSet, ANY, READS;
    AllowAddSet(AllowAddSet) => SetReference, ADMIN, CHANGES;
    AllowRemoveSet(AllowRemoveSet) => SetReference, ADMIN, CHANGES;
    AllowDisableSet(AllowDisableSet) => SetReference, ADMIN, CHANGES;
    AllowEnableSet(AllowEnableSet) => SetReference, ADMIN, CHANGES;
}

impl Command {
    /// Whether a caller holding `roles` may run this command (any role at all, for the
    /// commands open to every role).
    pub fn permits(&self, roles: &BTreeSet<Role>) -> bool {
        match self.role() {
            Some(role) => roles.contains(&role),
            None => !roles.is_empty(),
        }
    }

    /// The account the command is about, where it names one.
    pub fn account(&self) -> Option<&str> {
        match self {
            Command::AccountAdd(AccountAdd { account, .. })
            | Command::AccountShow(AccountShow { account })
            | Command::AccountRemove(AccountRemove { account, .. })
            | Command::AccountState(SetAccountState { account, .. })
            | Command::AccountMode(AccountMode { account, .. })
            | Command::AllowAdd(AllowAdd { account, .. })
            | Command::AllowRemove(AllowRemove { account, .. })
            | Command::AllowList(AllowList { account, .. })
            | Command::AllowDisable(AllowDisable { account, .. })
            | Command::AllowEnable(AllowEnable { account, .. })
            | Command::AllowLabel(AllowLabel { account, .. })
            | Command::AllowExpiry(AllowExpiry { account, .. })
            | Command::AllowReplace(AllowReplace { account, .. })
            | Command::BindAdd(BindAdd { account, .. })
            | Command::Check(Check { account, .. })
            | Command::OverrideGrant(OverrideGrant { account, .. })
            | Command::OverrideRevoke(OverrideRevoke { account, .. })
            | Command::AllowAddSet(AllowAddSet { account, .. })
            | Command::AllowRemoveSet(AllowRemoveSet { account, .. })
            | Command::AllowDisableSet(AllowDisableSet { account, .. })
            | Command::AllowEnableSet(AllowEnableSet { account, .. }) => Some(account),
            Command::OverrideList(OverrideList { account }) | Command::Activity(Activity { account, .. }) => {
                account.as_deref()
            }
            Command::Stats(Stats { account }) => account.as_deref(),
            Command::AccountList(_)
            | Command::BindRemove(_)
            | Command::BindList(_)
            | Command::Import(_)
            | Command::Detach(_)
            | Command::Status(_)
            | Command::ClusterImport(_)
            | Command::SetAdd(_)
            | Command::SetRemove(_)
            | Command::SetDelete(_)
            | Command::SetList(_)
            | Command::SetShow(_) => None,
        }
    }
}

/// Create an account (`unconfirmed` until its email is confirmed when asked to). It starts
/// in mode `off`: restriction is opt-in.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountAdd {
    pub account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    #[serde(default)]
    pub unconfirmed: bool,
}

/// An account with its allowlist and bindings.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountShow {
    pub account: String,
}

/// Remove an account with its allowlist, overrides, bindings and kernel state; refused
/// while it has sub-users unless `recursive`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountRemove {
    pub account: String,
    #[serde(default)]
    pub recursive: bool,
}

/// Every account, with the state in force.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountList {}

/// Set an account's own state (banning or terminating a parent suspends its sub-users).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetAccountState {
    pub account: String,
    pub state: AccountState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Set an account's mode; the lockout guard applies when it becomes `enforce`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountMode {
    pub account: String,
    pub mode: Mode,
    /// The address the person making the change uses; the change is refused if it would
    /// shut that address out.
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
}

/// Add a network (or a bare address: a host) to an allowlist.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowAdd {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The entry lets in for this many seconds from now, then nothing (as an override
    /// does); left out, it never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
}

/// Remove an entry (the lockout guard applies).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRemove {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
}

/// An account's allowlist, enabled and disabled entries alike.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    pub account: String,
    /// Only the entries that let no sign-in and no packet through in this many seconds and
    /// are at least that old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unused: Option<u64>,
}

/// Keep an entry but let nothing in through it, in the kernel too (the lockout guard
/// applies, as to a removal).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowDisable {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    /// Further entries disabled in the same change: all of them or none, the lockout guard
    /// judging the result once.
    #[serde(default, deserialize_with = "cidrs", skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<IpNet>,
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
}

/// Let a disabled entry in again.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowEnable {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    /// Further entries enabled in the same change: all of them or none.
    #[serde(default, deserialize_with = "cidrs", skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<IpNet>,
}

/// Change an entry's label (`null` clears it).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowLabel {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    #[serde(default)]
    pub label: Option<String>,
}

/// Change when an entry ends: `ttl_seconds` from now (which also renews an expired one), or
/// never when it is left out or `null`. An end brought nearer is weighed by the lockout
/// guard as the entry's removal.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowExpiry {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
}

/// Replace the whole allowlist in one change (labels optional).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowReplace {
    pub account: String,
    pub entries: Vec<ReplaceEntry>,
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
    /// Change nothing: the reply's `dry_run` says what the replacement would add, remove
    /// and keep, and which recent sign-ins it would shut out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// One line of an `allow_replace`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplaceEntry {
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Bind an endpoint (a whole address, or one protocol and port of it) to an account: the
/// kernel then filters packets to it by the account's policy.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BindAdd {
    pub account: String,
    #[serde(deserialize_with = "address")]
    pub addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    /// In a fleet: the one node that enforces it (its `[cluster] node`); without it, every
    /// node does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Remove a binding.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BindRemove {
    #[serde(deserialize_with = "address")]
    pub addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
    /// The node of a binding scoped to one node; without it, the fleet-wide binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Every binding.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BindList {}

/// A login check: may `account` log in from `addr`?
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Check {
    pub account: String,
    #[serde(deserialize_with = "address")]
    pub addr: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Answer without recording a sign-in (support and admins asking "would this address be
    /// allowed?").
    #[serde(default)]
    pub dry_run: bool,
}

/// Support: let `cidr` reach the account for `ttl_seconds`, after verifying ownership.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OverrideGrant {
    pub account: String,
    #[serde(deserialize_with = "cidr")]
    pub cidr: IpNet,
    pub ttl_seconds: u64,
    pub ticket: String,
    pub reason: String,
}

/// End an override before it expires.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OverrideRevoke {
    pub account: String,
    pub override_id: i64,
}

/// Live overrides, of one account or all.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OverrideList {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// An account's recorded activity, newest first: sign-ins and drops counted per hour, audit
/// records one each. Or, with `summary`, its sign-ins per (address, method, outcome); or,
/// with `unknown_accounts` and no account, checks for accounts that do not exist, per
/// address.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Activity {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_seconds: Option<u64>,
    /// Refused sign-ins and drops, and those monitor mode let through.
    #[serde(default)]
    pub denied_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only sign-ins, drops or audit records (default: all three).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ActivityKind>,
    #[serde(default)]
    pub summary: bool,
    #[serde(default)]
    pub unknown_accounts: bool,
}

/// Kernel counters: one account's, or every account's and the host's.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// Bulk load: create or update many accounts, each with its whole allowlist, in one change.
/// Importing the same batch twice leaves the same result.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Import {
    pub accounts: Vec<ImportAccount>,
    /// Apply even where the lockout guard refuses a change to an existing account's mode
    /// or allowlist (as `force` does for `allow_replace`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
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

/// Remove the filter from an interface (the only way it is ever removed).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Detach {
    pub interface: String,
}

/// Seed an empty fleet from this host's store: a node with a `[cluster]` section whose
/// prefix is empty writes every account, slot, binding and the override sequence there.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterImport {}

/// The daemon's own state: accounts, interfaces, table use.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Status {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_its_fields_and_cmd() {
        let check = Check { account: "acme".into(), addr: "198.18.0.9".parse().unwrap(), method: None, dry_run: false };
        let line = serde_json::to_string(&Command::from(check.clone())).unwrap();
        assert_eq!(line, r#"{"cmd":"check","account":"acme","addr":"198.18.0.9","dry_run":false}"#);
        assert_eq!(serde_json::from_str::<Command>(&line).unwrap(), Command::Check(check.clone()));
        let extra = serde_json::from_str::<Command>(r#"{"cmd": "status", "verbose": true}"#);
        assert!(extra.unwrap_err().to_string().contains("unknown field `verbose`"));
        let missing = serde_json::from_str::<Command>(r#"{"cmd": "allow_list"}"#);
        assert!(missing.unwrap_err().to_string().contains("missing field `account`"));
        let ok = serde_json::json!({"allowed": false, "reason": "banned", "hint": "h", "detail": "d"});
        assert_eq!(Command::from(check.clone()).check_reply(&ok), Ok(()));
        let extra = serde_json::json!({"allowed": false, "reason": "banned", "hint": "h", "detail": "d", "more": 1});
        assert!(Command::from(check).check_reply(&extra).is_err(), "a key the type lacks is caught");
    }

    #[test]
    fn roles() {
        let check: Command = serde_json::from_str(r#"{"cmd": "check", "account": "a", "addr": "198.18.0.1"}"#).unwrap();
        assert_eq!(check.role(), None);
        assert!(check.permits(&[Role::Support].into()));
        assert!(!check.permits(&BTreeSet::new()), "a caller with no role may do nothing");
        assert_eq!(Command::from(Detach { interface: "eth0".into() }).role(), Some(Role::Admin));
        assert_eq!(Command::from(OverrideList::default()).role(), Some(Role::Support));
    }
}
