//! Support: time-limited overrides for locked-out customers, and the activity that shows
//! what happened to them.

use std::sync::{Arc, atomic::Ordering};

use ipnet::IpNet;
use serde_json::json;

use super::{
    Failure, Reply, Service,
    allowlist::network,
    attempts::{merge_denied, merge_signins},
    change::{audit, existing},
    now, unknown,
};
use crate::{
    policy::effective_state,
    protocol::{
        Activity, ActivityKind, ActivityReport, EffectiveState, ErrorCode, Granted, Location, Mode, OverrideGrant,
        OverrideList, OverrideRevoke,
    },
};

/// Longest override support may grant (the shortest is configured).
const MAX_OVERRIDE_TTL: u64 = crate::config::MAX_OVERRIDE_TTL_SECONDS;
/// How far back a grant looks for the customer's denied attempts.
const DENIED_LOOKBACK: i64 = 7 * 24 * 3600;
/// The (address, method) rows of a grant's evidence (the store's `denied_summary` keeps as many).
const DENIED_ROWS: usize = 50;
/// What `activity` looks back over, and how many rows it returns, unless asked otherwise.
const ACTIVITY_SINCE: u64 = 7 * 24 * 3600;
const ACTIVITY_LIMIT: u32 = 100;
const ACTIVITY_MAX_LIMIT: u32 = 10_000;

impl Service {
    pub(super) fn override_grant(&self, request: OverrideGrant, uid: u32) -> Reply<OverrideGrant> {
        let OverrideGrant { account, cidr, ttl_seconds, ticket, reason } = request;
        let shortest = self.min_override_ttl.load(Ordering::Relaxed);
        if !(shortest..=MAX_OVERRIDE_TTL).contains(&ttl_seconds) {
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!("an override lasts from {shortest} s to {MAX_OVERRIDE_TTL} s (30 days)"),
            ));
        }
        if ticket.trim().is_empty() || reason.trim().is_empty() {
            return Err(Failure::new(ErrorCode::BadRequest, "an override needs a ticket and a reason"));
        }
        let (cidr, notes) = network(cidr)?;
        let widest = match cidr {
            IpNet::V4(_) => self.widest_override.0.load(Ordering::Relaxed),
            IpNet::V6(_) => self.widest_override.1.load(Ordering::Relaxed),
        };
        if cidr.prefix_len() < widest {
            let (family, key) = if cidr.addr().is_ipv4() { ("IPv4", 4) } else { ("IPv6", 6) };
            return Err(Failure::new(
                ErrorCode::BadRequest,
                format!(
                    "{cidr} is wider than an override may be: at most a /{widest} for {family} \
                     (widest_override_ipv{key} in the configuration); grant the customer's own address"
                ),
            ));
        }
        // `change` flushes the log first: the reply's denied attempts include the latest.
        // The attempts made since the account was made: an earlier account of the same id
        // is not the customer asking now. One window for this node's attempts and the fleet's.
        let mut evidence_from = 0;
        let mut granted = self.change(&account, |tx| {
            let row = existing(tx, &account)?;
            self.refuse_useless_override(&account, cidr)?;
            let at = now();
            let granted = tx.add_override(&account, cidr, &ticket, &reason, uid, at, at + ttl_seconds as i64)?;
            // Counted in the change's transaction: two grants racing (on two fleet nodes)
            // are checked one after the other.
            let (per_account, in_all) = self.max_overrides();
            override_limit(&account, tx.live_overrides(Some(&account), at)?.len(), per_account)?;
            overrides_in_all_limit(tx.live_override_count(at)?, in_all)?;
            let recorded = json!({ "override": granted.id, "cidr": granted.cidr, "ticket": ticket,
                "reason": reason, "expires_at": granted.expires_at });
            audit(tx, &account, uid, "override_granted", recorded)?;
            evidence_from = (at - DENIED_LOOKBACK).max(row.created_at);
            let recent_denied = tx.denied_summary(&account, evidence_from)?;
            Ok((row, Granted { granted, recent_denied, notes }))
        })?;
        // In a fleet, the evidence includes the attempts the other nodes saw.
        if let Some(fleet) = self.fleet_attempts(&account) {
            let local = std::mem::take(&mut granted.recent_denied);
            granted.recent_denied = merge_denied(local, &fleet, evidence_from, DENIED_ROWS);
            granted.notes.extend(fleet.note());
        }
        self.locate(granted.recent_denied.iter_mut().map(|r| (r.address.as_deref(), &mut r.location)));
        Ok(granted)
    }

    /// `[limits] max_overrides_per_account` and `max_overrides` as configured now (a reload
    /// changes them).
    fn max_overrides(&self) -> (usize, u64) {
        (self.max_overrides.0.load(Ordering::Relaxed) as usize, self.max_overrides.1.load(Ordering::Relaxed).into())
    }

    /// Uses `locator` (or none) for the locations of sign-ins from now on.
    pub fn set_locator(&self, locator: Option<crate::location::Locator>) {
        *self.locator.write().expect("locator lock") = locator.map(Arc::new);
    }

    /// Fills in each row's location, once its rows are final (merged with the fleet's, so
    /// every node places the same rows alike). Nothing without a database.
    fn locate<'a>(&self, rows: impl Iterator<Item = (Option<&'a str>, &'a mut Option<Location>)>) {
        let Some(locator) = self.locator.read().expect("locator lock").clone() else { return };
        for (address, location) in rows {
            *location = address.and_then(|a| locator.locate(a));
        }
    }

    /// An override is for a customer locked out by its allowlist. It is refused, with the
    /// reason, where it cannot be that: the account (or an ancestor) is banned or terminated,
    /// its email is unconfirmed, it blocks nothing (mode off or monitor), or the addresses are
    /// already allowed (by a permanent entry, an enabled shared set, or a live override).
    fn refuse_useless_override(&self, account: &str, cidr: IpNet) -> Result<(), Failure> {
        let refused = |why: String| Err(Failure::new(ErrorCode::Refused, why));
        let cache = self.accounts.read().expect("cache lock");
        let Some(policy) = cache.get(account) else { return Err(unknown(account)) };
        match effective_state(|id| cache.get(id), policy) {
            (EffectiveState::Banned, _) => refused(format!("{account} is banned; overrides cannot reactivate it")),
            (EffectiveState::ParentBanned, Some(p)) => {
                refused(format!("{account}'s parent account {p} is banned; overrides cannot reactivate it"))
            }
            (EffectiveState::Terminated, _) => refused(format!(
                "{account} was terminated for non-payment; billing must reactivate it, an override would not help"
            )),
            (EffectiveState::ParentTerminated, Some(p)) => refused(format!(
                "{account}'s parent account {p} was terminated for non-payment; billing must reactivate it, an \
                 override would not help"
            )),
            (EffectiveState::Unconfirmed, _) => refused(format!(
                "{account} has not confirmed its email address; an override would not let anyone in: confirm the \
                 email first"
            )),
            _ if policy.mode == Mode::Off => {
                refused(format!("{account} is in mode off: no address is blocked, so an override would change nothing"))
            }
            _ if policy.mode == Mode::Monitor => refused(format!(
                "{account} is in monitor mode: no address is blocked, so an override would change nothing"
            )),
            _ => {
                let at = now();
                // An entry that will expire does not make an override useless.
                if let Some(entry) = policy.entries.iter().find(|net| net.contains(&cidr)) {
                    return refused(format!("{cidr} is already allowed by {account}'s allowlist entry {entry}"));
                }
                // A shared set's networks let the account in as its own entries do.
                let sets = self.sets.read().expect("set cache lock");
                let from_set = policy.sets.iter().find_map(|r| {
                    let set = sets.get(&r.name)?;
                    set.entries.iter().find(|net| net.contains(&cidr)).map(|net| (r.name.as_str(), net))
                });
                if let Some((set, net)) = from_set {
                    return refused(format!(
                        "{cidr} is already allowed by {net} of the shared set {set}, which {account} uses"
                    ));
                }
                if let Some(o) = policy.live_overrides(at).find(|o| o.cidr.contains(&cidr)) {
                    return refused(format!(
                        "{cidr} is already allowed by override {} until {} UTC",
                        o.id,
                        crate::time::format_utc(o.expires_at)
                    ));
                }
                Ok(())
            }
        }
    }

    pub(super) fn override_revoke(&self, request: OverrideRevoke, uid: u32) -> Reply<OverrideRevoke> {
        let OverrideRevoke { account, override_id } = request;
        self.change(&account, |tx| {
            let row = existing(tx, &account)?;
            let revoked = tx.revoke_override(&account, override_id, now())?.ok_or_else(|| {
                Failure::new(ErrorCode::UnknownOverride, format!("{account} has no live override {override_id}"))
            })?;
            audit(tx, &account, uid, "override_revoked", json!({ "override": override_id, "cidr": revoked.cidr }))?;
            Ok((row, revoked))
        })
    }

    pub(super) fn override_list(&self, OverrideList { account }: OverrideList) -> Reply<OverrideList> {
        self.read(|tx| {
            if let Some(a) = account.as_deref() {
                existing(tx, a)?;
            }
            Ok(tx.live_overrides(account.as_deref(), now())?)
        })
    }

    pub(super) fn activity(&self, request: Activity) -> Reply<Activity> {
        let Activity { account, since_seconds, denied_only, limit, kind, summary, unknown_accounts } = request;
        let since = now() - since_seconds.unwrap_or(ACTIVITY_SINCE).min(i64::MAX as u64 / 2) as i64;
        let limit = limit.unwrap_or(ACTIVITY_LIMIT).min(ACTIVITY_MAX_LIMIT);
        let bad = |why: &str| Err(Failure::new(ErrorCode::BadRequest, why));
        let account = match (account, unknown_accounts) {
            (None, true) if kind.is_none() && !summary && !denied_only => None,
            (None, true) => return bad("unknown_accounts is a summary of its own: no kind, summary or denied_only"),
            (Some(_), true) => return bad("unknown_accounts is of no account: leave the account out"),
            (None, false) => return bad("activity needs an account (or unknown_accounts)"),
            (Some(account), false) => Some(account),
        };
        if summary && kind.is_some_and(|k| k != ActivityKind::Signin) {
            return bad("a summary is of sign-ins only: leave kind out");
        }
        // In a fleet, a summary adds the attempts the other nodes published (read before
        // the local rows, so that the local limit leaves room for them).
        let fleet = match &account {
            Some(account) if summary => self.fleet_attempts(account),
            _ => None,
        };
        let room = fleet.as_ref().and_then(|f| f.remote.as_ref().ok()).map_or(0, |r| r.rows.len() as u32);
        // Counts still in memory are written first, so the answer includes the latest.
        self.activity.flush();
        self.read(|tx| match account {
            None => Ok(ActivityReport::UnknownAccounts(tx.unknown_summary(since, limit)?)),
            Some(account) => {
                // An account that was removed keeps its history; a name that never existed
                // has none (checks for unknown accounts are not kept by name).
                if tx.account(&account)?.is_none() && !tx.has_activity(&account)? {
                    return Err(unknown(&account));
                }
                if summary {
                    let local = tx.signin_summary(&account, since, denied_only, limit.saturating_add(room))?;
                    let mut rows = match &fleet {
                        Some(fleet) => merge_signins(local, fleet, since, limit),
                        None => local,
                    };
                    self.locate(rows.iter_mut().map(|r| (Some(r.address.as_str()), &mut r.location)));
                    Ok(ActivityReport::Signins(rows))
                } else {
                    Ok(ActivityReport::Records(tx.activity(&account, since, kind, denied_only, limit)?))
                }
            }
        })
    }
}

/// Refuses, with `too_many_overrides`, a grant that leaves `live` overrides on all accounts
/// together when `[limits] max_overrides` allows `max`.
fn overrides_in_all_limit(live: u64, max: u64) -> Result<(), Failure> {
    if live <= max {
        return Ok(());
    }
    Err(Failure::with_details(
        ErrorCode::TooManyOverrides,
        format!(
            "there would be {live} live overrides on all accounts together; the limit is {max} ([limits] \
             max_overrides): revoke some, or raise the limit; nothing was changed"
        ),
        json!({ "overrides": live, "limit": "limits.max_overrides", "max": max }),
    ))
}

/// Refuses, with `too_many_overrides`, a grant that leaves `account` with `live` overrides
/// when `[limits] max_overrides_per_account` allows `max`.
fn override_limit(account: &str, live: usize, max: usize) -> Result<(), Failure> {
    if live <= max {
        return Ok(());
    }
    Err(Failure::with_details(
        ErrorCode::TooManyOverrides,
        format!(
            "{account} would have {live} live overrides; the limit is {max} per account \
             ([limits] max_overrides_per_account): revoke one first; nothing was changed"
        ),
        json!({
            "account": account,
            "overrides": live,
            "limit": "limits.max_overrides_per_account",
            "max": max,
        }),
    ))
}
