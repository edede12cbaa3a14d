//! The control socket's wire format: one JSON object per line each way.
//!
//! A request is `{"id": <any JSON>, "cmd": "<command>", ...arguments}`; the reply echoes the
//! id and carries either `"ok": <result>` or `"error": {"code": "...", "message": "..."}`.
//! Each command has a request type and a reply type ([`request`], [`reply`]), tied together
//! by [`Call`]; `docs/protocol.md` documents them (tests/tests/protocol_doc.rs keeps it
//! true). The daemon, ipaccessctl, [`crate::client`] and the tests share these types.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub mod reply;
pub mod request;
pub mod sets;

pub use reply::*;
pub use request::*;
pub use sets::*;

/// A request line. `id` is echoed unchanged in the reply.
#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    #[serde(default)]
    pub id: serde_json::Value,
    #[serde(flatten)]
    pub command: Command,
}

/// The kinds of activity records: login checks, packets the kernel dropped, audited changes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum ActivityKind {
    Signin,
    Drop,
    Audit,
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
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Role {
    /// Login checks and reads.
    Check,
    /// Accounts, allowlists, modes, bindings.
    Admin,
    /// Overrides and activity.
    Support,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
#[value(rename_all = "snake_case")]
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

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Mode {
    Off,
    Monitor,
    Enforce,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => ipaccess_common::packet::IPPROTO_TCP,
            Proto::Udp => ipaccess_common::packet::IPPROTO_UDP,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
#[value(rename_all = "snake_case")]
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
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
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
    /// The change would leave an account with more allowlist entries than
    /// `[limits] max_entries_per_account` allows; nothing was changed.
    TooManyEntries,
    /// No shared set of that name.
    UnknownSet,
    /// `set_delete` of a set that accounts still reference (without `force`); `details`
    /// lists them.
    SetInUse,
    /// The change would give an account more enabled set references than the kernel holds
    /// per account; nothing was changed.
    TooManySets,
    /// The grant would give an account more live overrides than
    /// `[limits] max_overrides_per_account` allows; nothing was changed.
    TooManyOverrides,
    /// Storage or kernel failure; nothing was changed.
    Internal,
    /// A fleet node cannot reach a quorum of etcd: changes are refused (nothing was
    /// changed), checks and enforcement go on with the policy last applied.
    ClusterUnavailable,
    /// A fleet node lost a race: another node committed a change to the same account or
    /// endpoint first. Nothing was changed; the node has the winner now, so a retry is
    /// checked against it.
    Conflict,
}

/// An account's state as it takes effect: its own, unless an ancestor's ban or termination
/// suspends it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum EffectiveState {
    Active,
    Unconfirmed,
    Terminated,
    Banned,
    ParentTerminated,
    ParentBanned,
}

impl From<AccountState> for EffectiveState {
    /// An account's own state, as it takes effect when no ancestor suspends it.
    fn from(state: AccountState) -> Self {
        match state {
            AccountState::Active => EffectiveState::Active,
            AccountState::Unconfirmed => EffectiveState::Unconfirmed,
            AccountState::Terminated => EffectiveState::Terminated,
            AccountState::Banned => EffectiveState::Banned,
        }
    }
}

/// Why a check came out as it did, first match wins in this order.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
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

/// An IP address as the standard library reads it (no leading zeros, no zone), in the one
/// form checks, the guard and the kernel use: an IPv4-mapped address (`::ffff:198.18.0.7`,
/// as a dual-stack socket reports an IPv4 client) is the IPv4 address. Every address field
/// of a request is read through it. The error quotes what was given, as [`parse_cidr`]'s does.
pub fn parse_address(text: &str) -> Result<IpAddr, String> {
    let addr: IpAddr = text.parse().map_err(|_| format!("{text:?} is not an IP address (198.18.0.7, fd00::7)"))?;
    Ok(addr.to_canonical())
}

pub(crate) fn address<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    parse_address(&text).map_err(serde::de::Error::custom)
}

fn optional_address<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<IpAddr>, D::Error> {
    let text = <Option<std::borrow::Cow<'de, str>>>::deserialize(deserializer)?;
    text.map(|text| parse_address(&text)).transpose().map_err(serde::de::Error::custom)
}

fn cidr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<IpNet, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    parse_cidr(&text).map_err(serde::de::Error::custom)
}

fn cidrs<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    let texts = <Vec<std::borrow::Cow<'de, str>>>::deserialize(deserializer)?;
    texts.iter().map(|text| parse_cidr(text).map_err(serde::de::Error::custom)).collect()
}

#[cfg(test)]
mod tests {
    use strum::VariantArray;

    use super::*;

    /// Names as text (the store's columns, log lines, metrics labels) are the wire's names.
    #[test]
    fn every_name_is_the_wire_name() {
        fn same<T>()
        where
            T: VariantArray + Copy + Serialize + Into<&'static str> + std::str::FromStr + PartialEq + std::fmt::Debug,
        {
            for &variant in T::VARIANTS {
                let name: &'static str = variant.into();
                assert_eq!(serde_json::to_value(variant).unwrap(), name, "{variant:?}");
                assert_eq!(name.parse::<T>().ok(), Some(variant));
            }
        }
        same::<ActivityKind>();
        same::<Role>();
        same::<AccountState>();
        same::<Mode>();
        same::<Proto>();
        same::<Method>();
        same::<ErrorCode>();
        same::<EffectiveState>();
        same::<Reason>();
    }

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
        assert!(matches!(request, Command::AllowAdd(AllowAdd { cidr, .. }) if cidr.to_string() == "198.18.0.9/32"));
    }

    /// A bad address says which: the value is quoted, in every field that takes one.
    #[test]
    fn an_address_refused_is_named() {
        for (line, bad) in [
            (r#"{"cmd": "check", "account": "a", "addr": "198.018.0.7"}"#, "198.018.0.7"),
            (r#"{"cmd": "bind_add", "account": "a", "addr": "fe80::1%2"}"#, "fe80::1%2"),
            (r#"{"cmd": "bind_remove", "addr": " 198.18.0.1"}"#, " 198.18.0.1"),
            (r#"{"cmd": "allow_remove", "account": "a", "cidr": "198.18.0.0/24", "client_ip": "x"}"#, "x"),
            (
                r#"{"cmd": "allow_remove_set", "account": "a", "set": "s", "client_ip": "198.18.0.1/32"}"#,
                "198.18.0.1/32",
            ),
        ] {
            let error = serde_json::from_str::<Command>(line).unwrap_err().to_string();
            assert!(error.contains(&format!("{bad:?} is not an IP address")), "{line}: {error}");
        }
        // Absent or null, an optional address is none; given, it is read.
        for line in [
            r#"{"cmd": "allow_remove", "account": "a", "cidr": "198.18.0.0/24"}"#,
            r#"{"cmd": "allow_remove", "account": "a", "cidr": "198.18.0.0/24", "client_ip": null}"#,
        ] {
            let Ok(Command::AllowRemove(remove)) = serde_json::from_str::<Command>(line) else { panic!("{line}") };
            assert_eq!(remove.client_ip, None);
        }
        let line = r#"{"cmd": "allow_remove", "account": "a", "cidr": "198.18.0.0/24", "client_ip": "fd00::9"}"#;
        let Ok(Command::AllowRemove(remove)) = serde_json::from_str::<Command>(line) else { panic!("{line}") };
        assert_eq!(remove.client_ip, Some("fd00::9".parse().unwrap()));
    }

    /// Every address field reads an IPv4-mapped address as the IPv4 address (a field left
    /// out here, as `allow_expiry`'s `client_ip` once was, made the lockout guard refuse the
    /// person's own address).
    #[test]
    fn a_mapped_address_is_ipv4_in_every_field() {
        use serde_json::json;
        let mapped = "::ffff:198.18.0.9";
        let mut fields = 0;
        for (cmd, extra) in [
            ("check", json!({"account": "a"})),
            ("bind_add", json!({"account": "a"})),
            ("bind_remove", json!({})),
            ("account_mode", json!({"account": "a", "mode": "enforce"})),
            ("allow_remove", json!({"account": "a", "cidr": "198.18.1.0/24"})),
            ("allow_disable", json!({"account": "a", "cidr": "198.18.1.0/24"})),
            ("allow_expiry", json!({"account": "a", "cidr": "198.18.1.0/24", "ttl_seconds": 60})),
            ("allow_replace", json!({"account": "a", "entries": []})),
            ("allow_remove_set", json!({"account": "a", "set": "s"})),
            ("allow_disable_set", json!({"account": "a", "set": "s"})),
        ] {
            let mut request = extra;
            request["cmd"] = json!(cmd);
            let field = if matches!(cmd, "check" | "bind_add" | "bind_remove") { "addr" } else { "client_ip" };
            request[field] = json!(mapped);
            let command: Command = serde_json::from_value(request.clone()).unwrap_or_else(|e| panic!("{request}: {e}"));
            let read = serde_json::to_value(&command).unwrap();
            assert_eq!(read[field], "198.18.0.9", "{cmd}: {read}");
            fields += 1;
        }
        assert_eq!(fields, 10);
        assert_eq!(parse_address("fd00::1"), Ok("fd00::1".parse().unwrap()), "real IPv6 stays");
    }
}
