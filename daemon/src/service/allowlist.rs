//! Allowlists: entries added, removed, disabled, enabled, labelled, listed and replaced.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use ipnet::IpNet;
use serde_json::json;

use super::{
    Failure, Reply, Service,
    change::{EntryChange, audit, existing, policy_from_store},
    lockout, now,
};
use crate::{
    policy::{AccountPolicy, normalise_cidr, split_entries},
    protocol::{
        Account, AllowAdd, AllowDisable, AllowEnable, AllowExpiry, AllowLabel, AllowList, AllowRemove, AllowReplace,
        Allowlist, Entry, EntryRemoved, ErrorBody, ErrorCode, Noted, RecentSignin, ReplaceEntry, ReplacePlan,
    },
    store::Tx,
};

/// A replacement allowlist: each network with its label.
pub(super) type Wanted = Vec<(IpNet, Option<String>)>;

/// The longest an entry may be added for.
const MAX_ENTRY_TTL: u64 = 366 * 24 * 3600;

impl Service {
    pub(super) fn allow_add(&self, request: AllowAdd, uid: u32) -> Reply<AllowAdd> {
        let AllowAdd { account, cidr, label, ttl_seconds } = request;
        check_entry_ttl(ttl_seconds)?;
        self.change_entry(&account, |tx| {
            let (cidr, notes) = network(cidr)?;
            let at = now();
            // An expired entry is still listed; adding its network again renews it.
            let renewed = tx.entry(&account, cidr)?.filter(|e| e.expires_at.is_some_and(|end| end <= at));
            if renewed.is_some() {
                tx.remove_entry(&account, cidr)?;
            }
            let mut entry = tx.add_entry(&account, cidr, label.as_deref(), uid, at)?;
            // Counted after the insert, so a retried add still gets `entry_exists`; a renewal
            // does not add to the count.
            let after = tx.entry_count(&account)?;
            entry_limit(self.max_entries(), &account, after - u64::from(renewed.is_none()), after)?;
            if let Some(ttl) = ttl_seconds {
                entry.expires_at = Some(at + ttl as i64);
                tx.set_entry_expiry(&account, cidr, entry.expires_at)?;
            }
            let detail = json!({ "cidr": cidr, "label": label, "expires_at": entry.expires_at,
                "renewed": renewed.is_some() });
            audit(tx, &account, uid, "allow_add", detail)?;
            let change = EntryChange::Added { cidr, expires_at: entry.expires_at };
            Ok((existing(tx, &account)?, change, Noted::new(entry, notes)))
        })
    }

    pub(super) fn allow_remove(&self, request: AllowRemove, uid: u32) -> Reply<AllowRemove> {
        let AllowRemove { account, cidr, client_ip, force } = request;
        self.change_entry(&account, |tx| {
            let (cidr, notes) = match network(cidr) {
                // An entry an older version stored as it was given (IPv4-mapped, host bits
                // set), which today's spelling of the network would not find.
                _ if tx.entry(&account, cidr)?.is_some() => (cidr, Vec::new()),
                normalised => normalised?,
            };
            let (row, entry) = withdraw_entry(tx, self, &account, cidr, uid, client_ip, force)?;
            tx.remove_entry(&account, cidr)?;
            audit(tx, &account, uid, "allow_remove", json!({ "cidr": cidr, "label": entry.label, "forced": force }))?;
            Ok((row, EntryChange::Removed(cidr), EntryRemoved { account: account.clone(), removed: cidr, notes }))
        })
    }

    pub(super) fn allow_list(&self, AllowList { account, unused }: AllowList) -> Reply<AllowList> {
        // Sign-ins counted but not written yet would be missing from the evidence.
        self.activity.flush_account(&account);
        let (entries, inherited) = self.read(|tx| {
            existing(tx, &account)?;
            Ok((tx.entries_with_use(&account)?, inherited_entries(tx, &account)?))
        })?;
        let Some(window) = unused else {
            return Ok(entries.into_iter().chain(inherited).collect());
        };
        // A set's networks are reviewed with the set (`set show`), not per account: they are
        // never listed as one account's unused entries.
        // Unused: nothing let in within the window, and old enough to have had the chance (an
        // entry added yesterday is not unused for 90 days).
        let since = now().saturating_sub(i64::try_from(window).unwrap_or(i64::MAX));
        let used = |t: Option<i64>| t.is_some_and(|t| t > since);
        Ok(entries
            .into_iter()
            .filter(|e| e.created_at <= since && !used(e.last_signin_at) && !used(e.last_packet_at))
            .collect())
    }

    pub(super) fn allow_disable(&self, request: AllowDisable, uid: u32) -> Reply<AllowDisable> {
        let AllowDisable { account, cidr, also, client_ip, force } = request;
        self.change(&account, |tx| {
            let (cidrs, notes) = networks(cidr, also)?;
            let row = existing(tx, &account)?;
            for &cidr in &cidrs {
                changed_entry(tx, &account, cidr)?;
            }
            // The guard judges the result of the whole request, once.
            let before = policy_from_store(tx, &row, now())?;
            let mut after = before.clone();
            cidrs.iter().for_each(|&cidr| after.withdraw(cidr));
            lockout::guard(tx, self, &account, uid, client_ip, force, &before, &after)?;
            for &cidr in &cidrs {
                tx.set_entry_enabled(&account, cidr, false)?;
                audit(tx, &account, uid, "allow_disable", json!({ "cidr": cidr, "forced": force }))?;
            }
            Ok((row, bulk_reply(tx, &account, &cidrs, notes, "disabled")?))
        })
    }

    pub(super) fn allow_enable(
        &self,
        AllowEnable { account, cidr, also }: AllowEnable,
        uid: u32,
    ) -> Reply<AllowEnable> {
        self.change(&account, |tx| {
            let (cidrs, notes) = networks(cidr, also)?;
            let row = existing(tx, &account)?;
            for &cidr in &cidrs {
                changed_entry(tx, &account, cidr)?;
            }
            for &cidr in &cidrs {
                tx.set_entry_enabled(&account, cidr, true)?;
                audit(tx, &account, uid, "allow_enable", json!({ "cidr": cidr }))?;
            }
            Ok((row, bulk_reply(tx, &account, &cidrs, notes, "enabled")?))
        })
    }

    pub(super) fn allow_label(&self, AllowLabel { account, cidr, label }: AllowLabel, uid: u32) -> Reply<AllowLabel> {
        self.change(&account, |tx| {
            let (cidr, notes) = network(cidr)?;
            let (row, entry) = existing_entry(tx, &account, cidr)?;
            tx.set_entry_label(&account, cidr, label.as_deref())?;
            audit(tx, &account, uid, "allow_label", json!({ "cidr": cidr, "label": label, "was": entry.label }))?;
            Ok((row, Noted::new(changed_entry(tx, &account, cidr)?, notes)))
        })
    }

    /// A new end for an entry, or none. An end brought nearer is weighed by the lockout guard
    /// as the entry's removal; a later end, or none, is not (until its end the entry lets in
    /// as before).
    pub(super) fn allow_expiry(&self, request: AllowExpiry, uid: u32) -> Reply<AllowExpiry> {
        let AllowExpiry { account, cidr, ttl_seconds, client_ip, force } = request;
        check_entry_ttl(ttl_seconds)?;
        self.change(&account, |tx| {
            let (cidr, notes) = network(cidr)?;
            let (row, entry) = existing_entry(tx, &account, cidr)?;
            let at = now();
            let expires_at = ttl_seconds.map(|ttl| at + ttl as i64);
            // An end brought nearer is a removal on a timer (`--in 1s` is one at once): the
            // guard weighs it now, as it weighs a removal. A later end, or none, or a new end
            // for an entry that has ended, takes nothing away.
            let nearer = expires_at.is_some_and(|new| entry.expires_at.is_none_or(|old| old > at && new < old));
            if nearer {
                guard_withdrawal(tx, self, &row, cidr, uid, client_ip, force)?;
            }
            tx.set_entry_expiry(&account, cidr, expires_at)?;
            let detail = json!({ "cidr": cidr, "expires_at": expires_at, "was": entry.expires_at });
            audit(tx, &account, uid, "allow_expiry", detail)?;
            Ok((row, Noted::new(changed_entry(tx, &account, cidr)?, notes)))
        })
    }

    pub(super) fn allow_replace(&self, request: AllowReplace, uid: u32) -> Reply<AllowReplace> {
        let AllowReplace { account, entries, client_ip, force, dry_run } = request;
        if dry_run {
            // The shut-out sign-ins include those answered just before.
            self.activity.flush_account(&account);
            return self.read(|tx| {
                let replacement = Replacement::of(tx, &account, entries)?;
                let (before, after) = (&replacement.before, &replacement.after);
                let shut_out = lockout::shut_out(tx, self, &account, before, after, now())?;
                // What the same request would get for real: the checks it would make, in its order.
                let (current, wanted) = (replacement.current.len() as u64, replacement.wanted.len() as u64);
                let refused = match entry_limit(self.max_entries(), &account, current, wanted) {
                    Err(refusal) => Some(refusal),
                    Ok(()) if force => None,
                    Ok(()) => lockout::judge(tx, self, &account, client_ip, before, after)?.map(|(refusal, _)| refusal),
                };
                let plan = replacement.plan(shut_out, refused.map(|f| f.0));
                Ok(Allowlist { entries: tx.entries_with_use(&account)?, notes: replacement.notes, dry_run: Some(plan) })
            });
        }
        self.change(&account, |tx| {
            let Replacement { row, wanted, notes, current, before, after } = Replacement::of(tx, &account, entries)?;
            // The replacement is the whole list afterwards (disabled entries it names stay).
            entry_limit(self.max_entries(), &account, current.len() as u64, wanted.len() as u64)?;
            lockout::guard(tx, self, &account, uid, client_ip, force, &before, &after)?;
            tx.replace_entries(&account, &wanted, uid, now())?;
            audit(tx, &account, uid, "allow_replace", json!({ "entries": wanted.len(), "forced": force }))?;
            Ok((row, Allowlist { entries: tx.entries(&account)?, notes, dry_run: None }))
        })
    }
}

impl Service {
    /// `[limits] max_entries_per_account` as configured now (a reload changes it).
    pub(super) fn max_entries(&self) -> u32 {
        self.max_entries.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Refuses, with `too_many_entries`, a change that takes `account` from `before` to
/// `after` allowlist entries (enabled and disabled; overrides are not entries) when
/// `after` is over `[limits] max_entries_per_account`. A change that does not add to the
/// count passes: an account over a limit lowered since keeps working and can shrink.
///
/// Callers count inside the change's transaction. On a fleet node that is the local copy
/// at the revision the change is checked against, and the change rewrites the account's
/// document under a guard that it is unmodified since that revision (`fleet::submit`):
/// two nodes adding the last entry the limit allows at once cannot both commit; the loser
/// gets `conflict`, and its retry is counted against the winner's list.
pub(super) fn entry_limit(max: u32, account: &str, before: u64, after: u64) -> Result<(), Failure> {
    let max = u64::from(max);
    if after <= max || after <= before {
        return Ok(());
    }
    Err(Failure::with_details(
        ErrorCode::TooManyEntries,
        format!(
            "{account}'s allowlist would have {after} entries; the limit is {max} per account \
             ([limits] max_entries_per_account); nothing was changed"
        ),
        json!({
            "account": account,
            "entries": after,
            "limit": "limits.max_entries_per_account",
            "max": max,
        }),
    ))
}

/// The rows an account inherits from the sets it references, after its own: each network
/// of each set, `enabled` as the reference is, `source` naming the set.
fn inherited_entries(tx: &Tx, account: &str) -> Result<Vec<Entry>, Failure> {
    let mut rows = Vec::new();
    for r in tx.set_refs(account)? {
        rows.extend(tx.set_entries_with_use(&r.set)?.into_iter().map(|e| Entry {
            account: account.to_owned(),
            cidr: e.cidr,
            label: e.label,
            created_at: e.created_at,
            created_by: e.created_by,
            enabled: r.enabled,
            // The set's: the kernel stamps a set's key once for every account using it, and a
            // sign-in is credited to the set's network whichever account it was for.
            last_signin_at: e.last_signin_at,
            last_packet_at: e.last_packet_at,
            expires_at: None,
            source: Some(format!("set:{}", r.set)),
        }));
    }
    Ok(rows)
}

/// An `allow_replace` worked out in a transaction, before anything changes.
struct Replacement {
    row: Account,
    wanted: Wanted,
    notes: Vec<String>,
    /// The allowlist as it is.
    current: Vec<Entry>,
    /// The account's policy as it is and as the replacement would leave it: a kept entry
    /// keeps whether it is enabled and its expiry; a new one is enabled and permanent.
    before: AccountPolicy,
    after: AccountPolicy,
}

impl Replacement {
    fn of(tx: &Tx, account: &str, entries: Vec<ReplaceEntry>) -> Result<Replacement, Failure> {
        let row = existing(tx, account)?;
        let (wanted, notes) = distinct_entries(entries)?;
        let current = tx.entries(account)?;
        let kept: HashMap<IpNet, &Entry> = current.iter().map(|e| (e.cidr, e)).collect();
        let at = now();
        let before = policy_from_store(tx, &row, at)?;
        let (entries, expiring) = split_entries(
            wanted.iter().map(|(cidr, _)| match kept.get(cidr) {
                Some(e) => (e.cidr, e.enabled, e.expires_at),
                None => (*cidr, true, None),
            }),
            at,
        );
        let after = AccountPolicy { entries, expiring, ..before.clone() };
        Ok(Replacement { row, wanted, notes, current, before, after })
    }

    fn plan(&self, shut_out: Vec<RecentSignin>, refused: Option<ErrorBody>) -> ReplacePlan {
        let wanted: HashSet<IpNet> = self.wanted.iter().map(|(c, _)| *c).collect();
        let (mut added, mut unchanged): (Vec<IpNet>, Vec<IpNet>) =
            wanted.iter().partition(|&c| !self.current.iter().any(|e| e.cidr == *c));
        let mut removed: Vec<IpNet> = self.current.iter().map(|e| e.cidr).filter(|c| !wanted.contains(c)).collect();
        for list in [&mut added, &mut removed, &mut unchanged] {
            list.sort_by_cached_key(|c| c.to_string());
        }
        ReplacePlan { added, removed, unchanged, shut_out, refused }
    }
}

/// The entries of a replacement in canonical form (see [`network`]); where a CIDR is given
/// twice, the later one (and its label) counts. Also returns the notes on rewritten entries,
/// and one on repeated CIDRs, if any: a label given with the earlier one is dropped.
pub(super) fn distinct_entries(entries: Vec<ReplaceEntry>) -> Result<(Wanted, Vec<String>), Failure> {
    // Per CIDR: its place in `wanted`, and the number of the entry that first gave it.
    let mut positions: HashMap<IpNet, (usize, usize)> = HashMap::with_capacity(entries.len());
    let mut wanted: Wanted = Vec::with_capacity(entries.len());
    let (mut notes, mut repeated, mut first_repeat) = (Vec::new(), 0, None);
    for (n, entry) in entries.into_iter().enumerate() {
        let (cidr, note) = network(entry.cidr).map_err(|f| f.prefixed(&format!("entry {}", n + 1)))?;
        notes.extend(note);
        match positions.get(&cidr) {
            Some(&(at, first)) => {
                wanted[at].1 = entry.label;
                repeated += 1;
                first_repeat.get_or_insert((cidr, first, n + 1));
            }
            None => {
                positions.insert(cidr, (wanted.len(), n + 1));
                wanted.push((cidr, entry.label));
            }
        }
    }
    if let Some((cidr, first, again)) = first_repeat {
        let others = match repeated {
            1 => String::new(),
            more => format!(" (and {} more repeats)", more - 1),
        };
        notes.push(format!(
            "{cidr} is given more than once, as entries {first} and {again}{others}: the later entry, with its label, \
             counts"
        ));
    }
    Ok((wanted, notes))
}

/// The account and one of its entries, or `unknown_entry`.
fn existing_entry(tx: &Tx, account: &str, cidr: IpNet) -> Result<(Account, Entry), Failure> {
    let row = existing(tx, account)?;
    Ok((row, changed_entry(tx, account, cidr)?))
}

/// One of the account's entries as this transaction sees it (after a change in it, too), or
/// `unknown_entry`.
fn changed_entry(tx: &Tx, account: &str, cidr: IpNet) -> Result<Entry, Failure> {
    tx.entry(account, cidr)?
        .ok_or_else(|| Failure::new(ErrorCode::UnknownEntry, format!("{cidr} is not on {account}'s allowlist")))
}

/// An entry about to stop letting anything in (removed or disabled): the account and the
/// entry, once the lockout guard has accepted the account's policy without it.
fn withdraw_entry(
    tx: &Tx,
    others: &dyn lockout::OtherNodes,
    account: &str,
    cidr: IpNet,
    uid: u32,
    client_ip: Option<IpAddr>,
    force: bool,
) -> Result<(Account, Entry), Failure> {
    let (row, entry) = existing_entry(tx, account, cidr)?;
    guard_withdrawal(tx, others, &row, cidr, uid, client_ip, force)?;
    Ok((row, entry))
}

/// The lockout guard's judgement of the account's policy without the entry `cidr`.
fn guard_withdrawal(
    tx: &Tx,
    others: &dyn lockout::OtherNodes,
    row: &Account,
    cidr: IpNet,
    uid: u32,
    client_ip: Option<IpAddr>,
    force: bool,
) -> Result<(), Failure> {
    if force {
        // The guard would not look.
        return Ok(());
    }
    let before = policy_from_store(tx, row, now())?;
    let mut after = before.clone();
    after.withdraw(cidr);
    lockout::guard(tx, others, &row.id, uid, client_ip, force, &before, &after)
}

/// The entries a bulk request names (`cidr`, then `also`), canonical and each once, with
/// the notes on rewritten ones.
fn networks(cidr: IpNet, also: Vec<IpNet>) -> Result<(Vec<IpNet>, Vec<String>), Failure> {
    let mut cidrs = Vec::with_capacity(1 + also.len());
    let mut notes = Vec::new();
    for given in std::iter::once(cidr).chain(also) {
        let (cidr, note) = network(given)?;
        notes.extend(note);
        if !cidrs.contains(&cidr) {
            cidrs.push(cidr);
        }
    }
    Ok((cidrs, notes))
}

/// The reply of a bulk enable or disable: the first entry as changed (as for one entry),
/// and a note for each further one.
fn bulk_reply(
    tx: &Tx,
    account: &str,
    cidrs: &[IpNet],
    mut notes: Vec<String>,
    done: &str,
) -> Result<Noted<Entry>, Failure> {
    notes.extend(cidrs[1..].iter().map(|cidr| format!("{cidr} {done} too")));
    Ok(Noted::new(changed_entry(tx, account, cidrs[0])?, notes))
}

/// `bad_request` unless `ttl_seconds` (an entry's life) is within 1 s and 366 days, or
/// absent (it never ends).
fn check_entry_ttl(ttl_seconds: Option<u64>) -> Result<(), Failure> {
    match ttl_seconds {
        Some(ttl) if !(1..=MAX_ENTRY_TTL).contains(&ttl) => Err(Failure::new(
            ErrorCode::BadRequest,
            format!(
                "an entry lasts from 1 s to {MAX_ENTRY_TTL} s (366 days); leave ttl_seconds out for one that never expires"
            ),
        )),
        _ => Ok(()),
    }
}

/// A CIDR as the store keeps it (see [`normalise_cidr`]) with a note when it was rewritten,
/// or `bad_request` saying why not.
pub(super) fn network(cidr: IpNet) -> Result<(IpNet, Vec<String>), Failure> {
    let (cidr, note) = normalise_cidr(cidr).map_err(|why| Failure::new(ErrorCode::BadRequest, why))?;
    Ok((cidr, note.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cidr: &str, label: Option<&str>) -> ReplaceEntry {
        ReplaceEntry { cidr: crate::protocol::parse_cidr(cidr).unwrap(), label: label.map(str::to_string) }
    }

    #[test]
    fn the_entry_limit_refuses_growth_past_it_only() {
        entry_limit(3, "acme", 2, 3).expect("up to the limit");
        entry_limit(3, "acme", 5, 4).expect("an account over a lowered limit may shrink");
        entry_limit(3, "acme", 5, 5).expect("and keep what it has");
        let Failure(body) = entry_limit(3, "acme", 3, 4).expect_err("one past it");
        assert_eq!(body.code, ErrorCode::TooManyEntries);
        assert!(body.message.contains("acme's allowlist would have 4 entries; the limit is 3"), "{}", body.message);
        assert_eq!(body.details.unwrap()["account"], "acme");
        assert!(entry_limit(3, "acme", 5, 6).is_err(), "over a lowered limit, nothing is added");
    }

    #[test]
    fn a_replacement_is_canonical_and_its_last_label_wins() {
        let (wanted, notes) = distinct_entries(vec![
            entry("198.18.0.0/24", Some("old")),
            entry("::ffff:198.18.1.0/120", None),
            entry("198.18.0.0/24", Some("new")),
        ])
        .unwrap();
        let shown: Vec<(String, Option<String>)> = wanted.into_iter().map(|(c, l)| (c.to_string(), l)).collect();
        assert_eq!(shown, [("198.18.0.0/24".into(), Some("new".into())), ("198.18.1.0/24".into(), None)]);
        assert_eq!(notes.len(), 2, "the mapped spelling and the repeat are noted: {notes:?}");
        assert!(notes[1].contains("198.18.0.0/24 is given more than once, as entries 1 and 3:"), "{notes:?}");
        let (_, notes) = distinct_entries(
            ["198.18.0.1", "198.18.0.2", "198.18.0.1", "198.18.0.2", "198.18.0.1"]
                .into_iter()
                .map(|c| entry(c, None))
                .collect(),
        )
        .unwrap();
        assert_eq!(
            notes,
            ["198.18.0.1/32 is given more than once, as entries 1 and 3 (and 2 more repeats): the later \
                            entry, with its label, counts"]
        );
        let Failure(body) =
            distinct_entries(vec![entry("198.18.0.0/24", None), entry("198.18.0.7/24", None)]).expect_err("host bits");
        assert!(body.message.starts_with("entry 2: ") && body.message.contains("198.18.0.0/24"), "{}", body.message);
    }
}
