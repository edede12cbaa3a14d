//! Replies: the `ok` value of each command (see [`super::Call::Reply`]), as the daemon
//! writes it and as clients read it. Times are Unix seconds; uids are numbers.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{AccountState, ActivityKind, EffectiveState, ErrorBody, Mode, Proto, Reason};
use crate::datapath::netlink::XdpPath;

/// An account as a change leaves it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Account {
    pub id: String,
    /// The account's key in the kernel maps; slot 0 is reserved.
    pub slot: u32,
    pub parent: Option<String>,
    pub state: AccountState,
    pub mode: Mode,
    pub state_reason: Option<String>,
    pub created_at: i64,
}

/// An account as lists show it: with the state in force, which differs from its own when an
/// ancestor is banned or terminated.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ListedAccount {
    #[serde(flatten)]
    pub account: Account,
    pub effective_state: EffectiveState,
}

/// `account_show`: the account with its allowlist, bindings and shared-set references.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct AccountDetails {
    pub account: ListedAccount,
    pub entries: Vec<Entry>,
    pub bindings: Vec<Binding>,
    /// Its references to shared sets, enabled and disabled, by set name (absent in replies
    /// of versions without sets).
    #[serde(default)]
    pub sets: Vec<crate::protocol::SetReference>,
}

/// `account_remove`: every account removed, deepest sub-user first.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Removed {
    pub removed: Vec<String>,
}

/// An allowlist entry.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Entry {
    pub account: String,
    /// Always canonical: host bits are zero, IPv4-mapped networks are IPv4.
    pub cidr: IpNet,
    pub label: Option<String>,
    pub created_at: i64,
    /// Uid of the caller that added the entry.
    pub created_by: u32,
    /// A disabled entry is kept and listed but lets nothing in.
    pub enabled: bool,
    /// `allow_list` only: when the entry last let a sign-in through (an allowed check whose
    /// address it is the most specific entry to cover), unix seconds, on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_signin_at: Option<i64>,
    /// `allow_list` only: when the entry last let a packet through in this node's kernel,
    /// unix seconds (to within the daemon's one-second clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_packet_at: Option<i64>,
    /// When the entry stops letting anything in (unix s); left out when it never does. An
    /// expired entry stays listed until it is removed or added again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// `allow_list` only: where an inherited row comes from (`set:<name>`, a shared set the
    /// account references); left out for the account's own entries. Such a row is one of
    /// the set's networks, `enabled` says whether the reference is, and it changes with
    /// the set (`set_add`, `set_remove`), not with the `allow_*` entry commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// A reply with what the daemon rewrote on the way in (an IPv4-mapped network stored as
/// IPv4, for instance); `notes` is left out when there is nothing to say.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Noted<T> {
    #[serde(flatten)]
    pub value: T,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl<T> Noted<T> {
    pub fn new(value: T, notes: Vec<String>) -> Noted<T> {
        Noted { value, notes }
    }
}

/// `allow_remove`: the network that left the allowlist.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct EntryRemoved {
    pub account: String,
    pub removed: IpNet,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// `allow_replace`: the allowlist as the change left it (with `dry_run`, as it is, unchanged).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Allowlist {
    pub entries: Vec<Entry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Only for a `dry_run`: what the replacement would do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<ReplacePlan>,
}

/// What an `allow_replace` would change, computed without changing anything.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ReplacePlan {
    /// Networks the replacement adds, removes, and keeps (canonical, in CIDR text order).
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
    pub unchanged: Vec<IpNet>,
    /// Addresses that signed in successfully in the last 7 days, are let in now and would
    /// not be after the replacement (what the lockout guard would refuse it for).
    pub shut_out: Vec<RecentSignin>,
    /// The error the same request without `dry_run` would get now (the lockout guard, unless
    /// `force`, or the entry limit); absent when it would be applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ErrorBody>,
}

/// An endpoint bound to an account.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Binding {
    pub account: String,
    pub addr: IpAddr,
    /// `None` binds the whole address; on the wire `{"proto": "tcp", "port": 443}` or null.
    #[serde(serialize_with = "write_target", deserialize_with = "read_target")]
    pub target: Option<(Proto, u16)>,
    pub created_at: i64,
    /// In a fleet, the one node that enforces it; absent (or null): every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A bound port as the wire shows it.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Port {
    proto: Proto,
    port: u16,
}

fn write_target<S: Serializer>(target: &Option<(Proto, u16)>, s: S) -> Result<S::Ok, S::Error> {
    target.map(|(proto, port)| Port { proto, port }).serialize(s)
}

fn read_target<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(Proto, u16)>, D::Error> {
    Ok(Option::<Port>::deserialize(d)?.map(|Port { proto, port }| (proto, port)))
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

/// Which override allowed a check, and until when.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct OverrideRef {
    pub id: i64,
    pub expires_at: i64,
}

/// A support override: `cidr` may reach `account` until `expires_at`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Override {
    pub id: i64,
    pub account: String,
    pub cidr: IpNet,
    pub ticket: String,
    pub reason: String,
    /// Uid of the support operator who granted it.
    pub operator: u32,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// `override_grant`: the override, and the customer's denied attempts of the last 7 days
/// (the evidence support weighs).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Granted {
    #[serde(rename = "override")]
    pub granted: Override,
    pub recent_denied: Vec<DeniedSummary>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Denied checks from one (address, method), as hosted platforms show them to support.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct DeniedSummary {
    pub address: Option<String>,
    pub method: Option<String>,
    pub first_seen: i64,
    pub last_seen: i64,
    pub count: i64,
    /// In a fleet: the nodes whose checks are counted here (see `SigninSummary::nodes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Where the address is (see `SigninSummary::location`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

/// `activity`: records, a summary of sign-ins, or the checks for unknown accounts, as the
/// request asked.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum ActivityReport {
    Records(Vec<ActivityRow>),
    Signins(Vec<SigninSummary>),
    UnknownAccounts(Vec<UnknownSummary>),
}

/// One row of an account's activity: an hour's count of sign-ins or drops (for one
/// address, outcome and caller, or one source and destination), or one audit record.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ActivityRow {
    pub kind: ActivityKind,
    pub account: String,
    /// When it was last seen (for audit records: when the change was made).
    pub time: i64,
    pub first_seen: i64,
    pub count: i64,
    /// The address signing in, or the packets' source; `*` for the addresses beyond an
    /// hour's cap.
    pub address: Option<String>,
    pub method: Option<String>,
    pub allowed: Option<bool>,
    /// The check's or drop's reason, or the audited action.
    pub reason: Option<String>,
    /// Who checked, or who made the change.
    pub uid: Option<u32>,
    /// Drops: destination, protocol and port; sign-ins: whether an application checked;
    /// audit records: what changed.
    pub detail: Option<serde_json::Value>,
}

/// An account's sign-ins from one address with one method and one outcome, over a period.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct SigninSummary {
    pub address: String,
    pub method: String,
    pub allowed: bool,
    pub reason: String,
    /// Whether these checks came from applications (false: support or admin staff).
    pub application: bool,
    pub count: i64,
    pub first_seen: i64,
    pub last_seen: i64,
    /// In a fleet: the nodes whose checks are counted here, this one included. Only this
    /// node's name when etcd could not be read (the reply is then this node's alone); empty
    /// on a host outside a fleet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Where the address is, by the configured location database (`location_database`),
    /// looked up when the summary is read; absent without a database, or where it gives
    /// no place for the address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
}

/// A place as a MaxMind-format database gives it: the country's ISO 3166-1 alpha-2 code and
/// the city's English name, each absent where the database has none (a Country database
/// has no cities).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Location {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub city: Option<String>,
}

/// Checks for accounts that do not exist, from one address with one method.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct UnknownSummary {
    pub address: String,
    pub method: String,
    pub count: i64,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// `stats`: kernel counters per account, and the host's.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct StatsReport {
    pub accounts: Vec<AccountTraffic>,
    pub host: HostTraffic,
}

/// One account's packets and bytes since its counters were created.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct AccountTraffic {
    pub account: String,
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Monitor mode: what enforcement would have dropped (it passed).
    pub would_drop_packets: u64,
    pub would_drop_bytes: u64,
}

/// Packets the filter passed without an account.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct HostTraffic {
    pub non_ip: u64,
    /// To addresses nobody bound.
    pub unbound: u64,
    /// IPv6 neighbour discovery, always passed.
    pub ndp: u64,
    /// Too short or malformed to judge.
    pub malformed: u64,
}

/// `import`: how many accounts the batch held, how many were new, and how many allowlist
/// entries it wrote.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Imported {
    pub accounts: u64,
    pub created: u64,
    pub entries: u64,
}

/// `detach`: whether a filter was on the interface.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Detached {
    pub interface: String,
    pub detached: bool,
}

/// `cluster_import`: what the fleet's prefix now holds of this host's store.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ClusterImported {
    pub prefix: String,
    pub accounts: u64,
    pub bindings: u64,
    /// Shared sets (absent in replies of versions without them).
    #[serde(default)]
    pub sets: u64,
    /// Keys this run wrote.
    pub written: u64,
    /// Keys an earlier run that stopped part-way had already written, holding exactly what
    /// this one would have.
    pub already_present: u64,
    /// The etcd revision of the last key written; this node has applied it.
    pub revision: i64,
}

/// `status`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct StatusReport {
    pub accounts: u64,
    /// Interfaces the filter is attached to.
    pub interfaces: Vec<String>,
    /// Where each runs the program, as the kernel reports it (null: no program).
    pub xdp: Vec<XdpInterface>,
    pub pin_dir: String,
    pub table_slots_used: u64,
    pub table_slots: u64,
    /// Null when the kernel's counters could not be read.
    pub host_counters: Option<HostTraffic>,
    /// A fleet node's view of its cluster; absent on a single host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// Where a fleet node stands with etcd.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ClusterStatus {
    pub node: String,
    /// etcd answered within the last second or so.
    pub connected: bool,
    /// Every policy change up to this revision is in this node's store and kernel.
    pub applied_revision: i64,
    /// The revision of the last policy change (or snapshot) this node applied.
    pub policy_revision: i64,
    /// The latest revision etcd reported.
    pub cluster_revision: i64,
    /// Why etcd cannot be used now; null while it can.
    pub last_error: Option<String>,
    /// Accounts or bindings the fleet committed that this node's kernel refused (full
    /// tables); see the log.
    pub apply_failures: u64,
    /// The accounts and shared sets (`set:NAME`) whose latest version from the fleet this
    /// node's kernel still refuses, by name (at most 100; the metric counts them all). The
    /// node keeps enforcing their previous version and tries again every 10 s.
    pub unenforced: Vec<String>,
    /// This node's clock minus etcd's, in milliseconds, as last measured (every minute);
    /// null until then. Override expiry is absolute: beyond 1000 either way the node warns.
    pub clock_offset_ms: Option<i64>,
    /// The live nodes of the fleet and the policy revision each has applied (empty while
    /// etcd cannot be read).
    pub nodes: Vec<FleetNode>,
    /// Another live daemon publishes under this node's name (seen within the last 30 s):
    /// two nodes were given the same `[cluster] node`.
    #[serde(default)]
    pub name_in_use_elsewhere: bool,
}

/// A live fleet node, as it published itself in etcd.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct FleetNode {
    pub node: String,
    pub policy_revision: i64,
}

/// An attached interface and the XDP path its program runs in.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct XdpInterface {
    pub interface: String,
    pub path: Option<XdpPath>,
}

/// What a lockout refusal carries in `details`: the recent sign-ins the change would shut
/// out.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct ShutOut {
    pub shut_out: Vec<RecentSignin>,
}

/// An address that signed in successfully, and when it last did.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct RecentSignin {
    pub address: IpAddr,
    pub last_seen: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_only_when_there_are_some() {
        let entry = Entry {
            account: "acme".into(),
            cidr: "198.18.0.0/24".parse().unwrap(),
            label: None,
            created_at: 1,
            created_by: 0,
            enabled: true,
            last_signin_at: None,
            last_packet_at: None,
            expires_at: None,
            source: None,
        };
        let plain = serde_json::to_value(Noted::new(entry.clone(), vec![])).unwrap();
        assert!(plain.get("notes").is_none() && plain["cidr"] == "198.18.0.0/24");
        let noted = serde_json::to_string(&Noted::new(entry, vec!["rewritten".into()])).unwrap();
        assert_eq!(serde_json::from_str::<Noted<Entry>>(&noted).unwrap().notes, ["rewritten"]);
    }

    #[test]
    fn targets_and_activity_shapes() {
        let binding: Binding = serde_json::from_str(
            r#"{"account": "a", "addr": "198.18.0.1", "target": {"proto": "udp", "port": 53}, "created_at": 1}"#,
        )
        .unwrap();
        assert_eq!(binding.target, Some((Proto::Udp, 53)));
        assert_eq!(serde_json::to_value(&binding).unwrap()["target"]["proto"], "udp");
        let summary =
            r#"[{"address": "198.18.0.9", "method": "password", "count": 2, "first_seen": 1, "last_seen": 2}]"#;
        assert!(
            matches!(serde_json::from_str(summary).unwrap(), ActivityReport::UnknownAccounts(rows) if rows.len() == 1)
        );
    }
}
