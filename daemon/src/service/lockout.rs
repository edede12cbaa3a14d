//! The lockout guard: a change must not shut out the people who use the account.

use std::net::IpAddr;

use serde_json::json;

use super::{Failure, Service, now};
use crate::{
    cluster::signins::{RemoteSignin, SigninSource},
    logging,
    policy::{AccountPolicy, SetPolicy, Sets},
    protocol::{ErrorCode, Mode, RecentSignin, ShutOut},
    store::{LastSignin, StoreError, Tx},
};

/// How far back a successful sign-in counts for the lockout guard.
pub(super) const RECENT_SIGNINS: i64 = 7 * 24 * 3600;
/// How many shut-out addresses a refusal's message names (`details` has them all).
const LISTED: usize = 10;

/// The successful sign-ins the other nodes of a fleet answered, which the guard counts with
/// the store's: checks stay on the node that answered them.
pub(super) trait OtherNodes {
    /// Those of `accounts` last seen at or after `since`; none on a single host. Fails
    /// (closed: the guarded change is refused) when this node's copy of them is not known
    /// to be in step with etcd (`cluster::signins::Mirror`).
    fn signins(&self, accounts: &[&str], since: i64) -> Result<Vec<RemoteSignin>, Failure>;
}

impl OtherNodes for Service {
    fn signins(&self, accounts: &[&str], since: i64) -> Result<Vec<RemoteSignin>, Failure> {
        let Some(cluster) = self.fleet() else { return Ok(Vec::new()) };
        cluster.signins(accounts, since).map_err(|e| {
            Failure::new(
                ErrorCode::ClusterUnavailable,
                format!(
                    "the sign-ins other nodes published are not known to be current on this node ({e}), so the \
                     lockout guard cannot weigh them; nothing was changed; repeat once etcd answers, or force the \
                     change with --force"
                ),
            )
        })
    }
}

impl SigninSource for Service {
    fn last_signins(&self, changed_since: i64) -> Result<(i64, Vec<LastSignin>), String> {
        let since = now() - RECENT_SIGNINS;
        let signins = self.read(|tx| Ok(tx.last_signins(since, changed_since)?)).map_err(|e: Failure| e.0.message)?;
        Ok((RECENT_SIGNINS, signins))
    }
}

/// The store's recent sign-ins of `account` and the other nodes', one per address (its
/// latest), newest first. Only those since the account was made: an account removed and
/// made again under its id is a new customer, whose allowlist owes nothing to the old one's
/// sign-ins (the history stays, under the id, for support to read).
fn recent_signins(tx: &Tx, others: &dyn OtherNodes, account: &str, since: i64) -> Result<Vec<RecentSignin>, Failure> {
    let since = since.max(made_at(tx, account)?);
    let mut all = tx.recent_signins(account, since)?;
    all.extend(others.signins(&[account], since)?.into_iter().map(|r| r.signin));
    Ok(merge(all))
}

/// When `account` was made (unix s; 0 if it is not there): sign-ins before it were an
/// earlier account's of the same id.
pub(super) fn made_at(tx: &Tx, account: &str) -> Result<i64, StoreError> {
    Ok(tx.account(account)?.map_or(0, |a| a.created_at))
}

/// Sign-ins one per address, its latest, newest first.
fn merge(mut signins: Vec<RecentSignin>) -> Vec<RecentSignin> {
    signins.sort_by(|a, b| a.address.cmp(&b.address).then(b.last_seen.cmp(&a.last_seen)));
    signins.dedup_by_key(|s| s.address);
    signins.sort_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.address.cmp(&b.address)));
    signins
}

/// Unless `force`, a change that leaves the account enforcing (`before` and `after` are its
/// policy as it is and as the change would leave it) is refused when it would shut out the
/// address the caller says it uses, newly leave nothing allowed at all, or shut out an
/// address that signed in successfully in the last seven days and is let in now (the
/// refusal lists those, in `details`). A change that shuts out nobody who gets in today,
/// such as removing a disabled entry, is not refused. Each refusal is logged.
#[allow(clippy::too_many_arguments)]
pub(super) fn guard(
    tx: &Tx,
    others: &dyn OtherNodes,
    account: &str,
    uid: u32,
    client_ip: Option<IpAddr>,
    force: bool,
    before: &AccountPolicy,
    after: &AccountPolicy,
) -> Result<(), Failure> {
    if force {
        return Ok(());
    }
    let Some((refusal, why)) = judge(tx, others, account, client_ip, before, after)? else { return Ok(()) };
    match why {
        Why::OwnAddress(ip) => logging::lockout_refused(account, uid, ip),
        Why::Because(reason) => logging::lockout_refused_because(account, uid, reason),
    }
    Err(refusal)
}

/// Why [`judge`] refuses a change, for the log.
pub(super) enum Why {
    /// The address the caller says it uses would be shut out.
    OwnAddress(IpAddr),
    Because(&'static str),
}

/// What [`guard`] would answer without `force`, and why; logs nothing, so a dry run can ask.
pub(super) fn judge(
    tx: &Tx,
    others: &dyn OtherNodes,
    account: &str,
    client_ip: Option<IpAddr>,
    before: &AccountPolicy,
    after: &AccountPolicy,
) -> Result<Option<(Failure, Why)>, Failure> {
    if after.mode != Mode::Enforce {
        return Ok(None);
    }
    // The networks of the sets it references let in as its own entries do.
    let (before, after) = (&with_sets(tx, before)?, &with_sets(tx, after)?);
    let at = now();
    if let Some(ip) = client_ip.filter(|&ip| !after.covers(ip, at)) {
        let refusal = Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account}'s allowlist would not include {ip}, the address you are using; add it first, or \
                 repeat with --force (\"force\": true)"
            ),
        );
        return Ok(Some((refusal, Why::OwnAddress(ip))));
    }
    let allows_nothing =
        |p: &AccountPolicy| p.live_entries(at).next().is_none() && p.live_overrides(at).next().is_none();
    if allows_nothing(after) && (before.mode != Mode::Enforce || !allows_nothing(before)) {
        let refusal = Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account} would be enforcing with no enabled entry and no live override, which shuts \
                 everyone out; add an entry first, use mode off to stop restricting it, or repeat with --force"
            ),
        );
        return Ok(Some((refusal, Why::Because("nothing allowed"))));
    }
    let shut_out = flat_shut_out(tx, others, account, before, after, at)?;
    let Some(first) = shut_out.first() else { return Ok(None) };
    let mut listed: Vec<String> = shut_out
        .iter()
        .take(LISTED)
        .map(|s| format!("{} (last {} UTC)", s.address, crate::time::format_utc(s.last_seen)))
        .collect();
    if shut_out.len() > LISTED {
        listed.push(format!("and {} more", shut_out.len() - LISTED));
    }
    let mut refusal = Failure::new(
        ErrorCode::Lockout,
        format!(
            "refused: {account} would shut out {} address{} that signed in successfully in the last 7 days: {}; add \
             {} first, or repeat with --force",
            shut_out.len(),
            if shut_out.len() == 1 { "" } else { "es" },
            listed.join(", "),
            if shut_out.len() == 1 { first.address.to_string() } else { "them".into() },
        ),
    );
    refusal.0.details = Some(json!(ShutOut { shut_out }));
    Ok(Some((refusal, Why::Because("recent sign-ins shut out"))))
}

/// The addresses that signed in successfully in the last seven days, are let in at `at` by
/// `before` and would not be by `after` (nobody, unless `after` enforces). Entries and
/// overrides count as they are at `at`: one live then counts however soon it expires (its
/// end was chosen when it was added, and is not the change's doing); an expired one lets
/// nobody in, before or after.
pub(super) fn shut_out(
    tx: &Tx,
    others: &dyn OtherNodes,
    account: &str,
    before: &AccountPolicy,
    after: &AccountPolicy,
    at: i64,
) -> Result<Vec<RecentSignin>, Failure> {
    flat_shut_out(tx, others, account, &with_sets(tx, before)?, &with_sets(tx, after)?, at)
}

/// The policy with the networks of its enabled sets, as the transaction holds them, counted
/// as its own.
fn with_sets(tx: &Tx, policy: &AccountPolicy) -> Result<AccountPolicy, Failure> {
    if policy.sets.is_empty() {
        return Ok(policy.clone());
    }
    let mut sets = Sets::new();
    for r in &policy.sets {
        let entries = tx.set_entries(&r.name)?.into_iter().map(|e| e.cidr).collect();
        sets.insert(r.name.clone(), SetPolicy { kernel_id: r.kernel_id, entries });
    }
    Ok(policy.with_set_entries(&sets))
}

/// [`shut_out`] of policies whose sets are already counted as their own entries.
fn flat_shut_out(
    tx: &Tx,
    others: &dyn OtherNodes,
    account: &str,
    before: &AccountPolicy,
    after: &AccountPolicy,
    at: i64,
) -> Result<Vec<RecentSignin>, Failure> {
    if after.mode != Mode::Enforce {
        return Ok(Vec::new());
    }
    let lets_in_now = |addr: IpAddr| before.mode != Mode::Enforce || before.covers(addr, at);
    // Another node's sign-ins count as this one's: they are the same customers.
    Ok(recent_signins(tx, others, account, at - RECENT_SIGNINS)?
        .into_iter()
        .filter(|s| lets_in_now(s.address) && !after.covers(s.address, at))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        policy::ExpiringEntry,
        protocol::{AccountState, Method, Reason},
        store::{SigninKey, Store, Tally, bucket},
    };

    fn policy(mode: Mode, entries: &[&str]) -> AccountPolicy {
        AccountPolicy {
            slot: 1,
            parent: None,
            state: AccountState::Active,
            mode,
            entries: entries.iter().map(|e| e.parse().unwrap()).collect(),
            expiring: Vec::new(),
            overrides: Vec::new(),
            sets: Vec::new(),
        }
    }

    /// A store in which `acme` signed in successfully from each of `addresses` an hour ago.
    fn store_with_signins(dir: &tempfile::TempDir, addresses: &[&str]) -> Store {
        let mut store = Store::open(&dir.path().join("store.db")).unwrap();
        let tx = store.transaction().unwrap();
        tx.add_account("acme", None, AccountState::Active, Mode::Enforce, 0).unwrap();
        let at = now() - 3600;
        let keys: Vec<SigninKey> = addresses
            .iter()
            .map(|a| SigninKey {
                account: "acme".into(),
                bucket: bucket(at),
                address: a.parse().unwrap(),
                method: Method::Password,
                reason: Reason::Allowed,
                uid: 1000,
                application: true,
            })
            .collect();
        let once = Tally::new(1, at);
        tx.add_signins(keys.iter().map(|k| (k, &once))).unwrap();
        tx.commit().unwrap();
        store
    }

    /// A single host: no other node.
    struct Alone;

    impl OtherNodes for Alone {
        fn signins(&self, _: &[&str], _: i64) -> Result<Vec<RemoteSignin>, Failure> {
            Ok(Vec::new())
        }
    }

    /// Other nodes that published these sign-ins, or whose etcd cannot be read (`None`).
    struct Others(Option<Vec<RemoteSignin>>);

    impl OtherNodes for Others {
        fn signins(&self, accounts: &[&str], since: i64) -> Result<Vec<RemoteSignin>, Failure> {
            let Some(all) = &self.0 else { return Err(Failure::new(ErrorCode::ClusterUnavailable, "etcd is away")) };
            Ok(all
                .iter()
                .filter(|r| accounts.contains(&r.account.as_str()) && r.signin.last_seen >= since)
                .cloned()
                .collect())
        }
    }

    fn refusal(result: Result<(), Failure>) -> (ErrorCode, String, Option<serde_json::Value>) {
        let Failure(body) = result.expect_err("refused");
        (body.code, body.message, body.details)
    }

    #[test]
    fn the_callers_own_address_and_an_empty_allowlist_are_guarded() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_signins(&dir, &[]);
        let tx = store.transaction().unwrap();
        let office = policy(Mode::Enforce, &["198.18.0.0/24"]);
        let elsewhere = policy(Mode::Enforce, &["198.18.1.0/24"]);
        let me = Some("198.18.0.9".parse().unwrap());
        let (code, message, _) = refusal(guard(&tx, &Alone, "acme", 0, me, false, &office, &elsewhere));
        assert_eq!(code, ErrorCode::Lockout);
        assert!(message.contains("198.18.0.9, the address you are using"), "{message}");
        assert!(guard(&tx, &Alone, "acme", 0, me, true, &office, &elsewhere).is_ok(), "force overrides the guard");
        assert!(
            guard(&tx, &Alone, "acme", 0, me, false, &office, &policy(Mode::Monitor, &[])).is_ok(),
            "monitor blocks nobody"
        );
        // Newly nothing allowed: refused; already nothing allowed: not this change's doing.
        let (code, message, _) =
            refusal(guard(&tx, &Alone, "acme", 0, None, false, &office, &policy(Mode::Enforce, &[])));
        assert_eq!(code, ErrorCode::Lockout);
        assert!(message.contains("no enabled entry"), "{message}");
        let empty = policy(Mode::Enforce, &[]);
        assert!(guard(&tx, &Alone, "acme", 0, None, false, &empty, &empty).is_ok());
    }

    #[test]
    fn recent_signins_that_would_be_shut_out_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_signins(&dir, &["198.18.0.9", "198.18.2.9", "fd00::9"]);
        let tx = store.transaction().unwrap();
        let before = policy(Mode::Enforce, &["198.18.0.0/24", "fd00::/64"]);
        // Keeps 198.18.0.9, shuts out fd00::9; 198.18.2.9 was shut out already.
        let after = policy(Mode::Enforce, &["198.18.0.0/24"]);
        let (code, message, details) = refusal(guard(&tx, &Alone, "acme", 0, None, false, &before, &after));
        assert_eq!(code, ErrorCode::Lockout);
        assert!(message.contains("would shut out 1 address ") && message.contains("add fd00::9 first"), "{message}");
        let listed: ShutOut = serde_json::from_value(details.unwrap()).unwrap();
        let addresses: Vec<String> = listed.shut_out.iter().map(|s| s.address.to_string()).collect();
        assert_eq!(addresses, ["fd00::9"]);
        // An expiring entry counts while it is live, however soon it ends; once expired,
        // it lets nobody in, so withdrawing it shuts out nobody.
        let mut expiring = policy(Mode::Enforce, &["198.18.0.0/24"]);
        expiring.expiring.push(ExpiringEntry { cidr: "fd00::/64".parse().unwrap(), expires_at: now() + 5 });
        let (_, message, _) = refusal(guard(&tx, &Alone, "acme", 0, None, false, &expiring, &after));
        assert!(message.contains("add fd00::9 first"), "{message}");
        expiring.expiring[0].expires_at = now() - 1;
        assert!(guard(&tx, &Alone, "acme", 0, None, false, &expiring, &after).is_ok());
        // Turning enforcement on shuts out every recent address not on the list.
        let off = policy(Mode::Off, &["198.18.0.0/24"]);
        let (_, message, _) = refusal(guard(&tx, &Alone, "acme", 0, None, false, &off, &after));
        assert!(message.contains("would shut out 2 addresses"), "{message}");
    }

    #[test]
    fn other_nodes_signins_count_and_unread_ones_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store_with_signins(&dir, &["198.18.0.9"]);
        let tx = store.transaction().unwrap();
        let before = policy(Mode::Enforce, &["198.18.0.0/24", "fd00::/64"]);
        let after = policy(Mode::Enforce, &["198.18.0.0/24"]);
        assert!(guard(&tx, &Alone, "acme", 0, None, false, &before, &after).is_ok(), "nobody here used fd00::");
        let remote = |account: &str, address: &str, ago: i64| RemoteSignin {
            account: account.into(),
            signin: RecentSignin { address: address.parse().unwrap(), last_seen: now() - ago },
        };
        // Signed in on another node: refused as if here. Another account's, or one past the
        // window, does not count.
        let others = Others(Some(vec![
            remote("acme", "fd00::9", 60),
            remote("acme", "fd00::9", 7200),
            remote("acme", "fd00::8", RECENT_SIGNINS + 60),
            remote("globex", "fd00::7", 60),
        ]));
        let (code, message, details) = refusal(guard(&tx, &others, "acme", 0, None, false, &before, &after));
        assert_eq!(code, ErrorCode::Lockout);
        assert!(message.contains("would shut out 1 address ") && message.contains("add fd00::9 first"), "{message}");
        let listed: ShutOut = serde_json::from_value(details.unwrap()).unwrap();
        assert_eq!(listed.shut_out.len(), 1);
        assert_eq!(listed.shut_out[0].last_seen, now() - 60, "the latest of the address");
        let shut = shut_out(&tx, &others, "acme", &before, &after, now()).unwrap();
        assert_eq!(shut.iter().map(|s| s.address.to_string()).collect::<Vec<_>>(), ["fd00::9"]);
        // etcd unread: refused (fail closed), unless forced; a change that cannot shut out
        // anybody does not need it.
        let away = Others(None);
        let (code, _, _) = refusal(guard(&tx, &away, "acme", 0, None, false, &before, &after));
        assert_eq!(code, ErrorCode::ClusterUnavailable);
        assert!(guard(&tx, &away, "acme", 0, None, true, &before, &after).is_ok());
        assert!(guard(&tx, &away, "acme", 0, None, false, &before, &policy(Mode::Monitor, &[])).is_ok());
    }
}
