//! Shared named sets: requests and replies. A set (a company VPN, a CI provider's ranges)
//! is defined once and referenced by any number of accounts; changing it changes every
//! referencing account at once.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{cidrs, optional_address};

/// Add networks to a set, creating the set when it is new (all of them or none).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetAdd {
    pub set: String,
    #[serde(deserialize_with = "cidrs")]
    pub cidrs: Vec<IpNet>,
    /// The label of every network added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Remove networks from a set, from every referencing account at once (the lockout guard
/// applies to each of them).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetRemove {
    pub set: String,
    #[serde(deserialize_with = "cidrs")]
    pub cidrs: Vec<IpNet>,
    #[serde(default)]
    pub force: bool,
}

/// Delete a set; refused while accounts reference it, unless `force` (which removes their
/// references too, the lockout guard still applying unless forced).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetDelete {
    pub set: String,
    #[serde(default)]
    pub force: bool,
}

/// Every set, with how many entries and references it has.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetList {}

/// A set with its entries and the accounts that reference it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetShow {
    pub set: String,
}

/// Let an account in through a set's entries (a reference, enabled).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowAddSet {
    pub account: String,
    pub set: String,
}

/// Remove an account's reference to a set (the lockout guard applies).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRemoveSet {
    pub account: String,
    pub set: String,
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
}

/// Keep an account's reference to a set but let nothing in through it, for this account
/// only (the lockout guard applies).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowDisableSet {
    pub account: String,
    pub set: String,
    #[serde(default, deserialize_with = "optional_address", skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<IpAddr>,
    #[serde(default)]
    pub force: bool,
}

/// Let a disabled reference in again.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowEnableSet {
    pub account: String,
    pub set: String,
}

/// A network of a set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SetEntry {
    /// Canonical, as allowlist entries are.
    pub cidr: IpNet,
    pub label: Option<String>,
    pub created_at: i64,
    /// Uid of the caller that added it.
    pub created_by: u32,
    /// `set_show` only: when it last let a sign-in through (an allowed `check` of any
    /// referencing account that no own entry of the account covered), unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_signin_at: Option<i64>,
    /// `set_show` only: when it last let a packet through in this node's kernel (to any
    /// referencing account), unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_packet_at: Option<i64>,
}

/// An account's reference to a set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SetReference {
    pub account: String,
    pub set: String,
    /// A disabled reference is kept and listed but lets nothing in for this account.
    pub enabled: bool,
    pub created_at: i64,
    pub created_by: u32,
}

/// `set_show`, `set_add`, `set_remove`: a set with its entries and references.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SharedSet {
    pub set: String,
    pub created_at: i64,
    pub created_by: u32,
    pub entries: Vec<SetEntry>,
    pub references: Vec<SetReference>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// A line of `set_list`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ListedSet {
    pub set: String,
    pub entries: u64,
    /// Accounts referencing it, and how many of those references are enabled.
    pub references: u64,
    pub enabled_references: u64,
    pub created_at: i64,
    pub created_by: u32,
}

/// `set_delete`: the set that went, and the accounts whose references went with it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SetDeleted {
    pub set: String,
    pub references_removed: Vec<String>,
}

/// The `details` of a `lockout` refusing a change to a set: the recent sign-ins it would
/// shut out, per account, and the enforcing accounts it would leave letting nobody in (the
/// first 1,000 of each).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SetShutOut {
    pub shut_out: Vec<AccountSignin>,
    pub allows_nothing: Vec<String>,
}

/// An account's successful sign-in from `address`, last at `last_seen`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccountSignin {
    pub account: String,
    pub address: IpAddr,
    pub last_seen: i64,
}
