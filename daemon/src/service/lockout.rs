//! The lockout guard: a change must not shut out the people who use the account.

use std::net::IpAddr;

use serde_json::json;

use super::{Failure, now};
use crate::{
    logging,
    policy::AccountPolicy,
    protocol::{ErrorCode, Mode, RecentSignin, ShutOut},
    store::Tx,
};

/// How far back a successful sign-in counts for the lockout guard.
const RECENT_SIGNINS: i64 = 7 * 24 * 3600;
/// How many shut-out addresses a refusal's message names (`details` has them all).
const LISTED: usize = 10;

/// Unless `force`, a change that leaves the account enforcing (`before` and `after` are its
/// policy as it is and as the change would leave it) is refused when it would shut out the
/// address the caller says it uses, newly leave nothing allowed at all, or shut out an
/// address that signed in successfully in the last seven days and is let in now (the
/// refusal lists those, in `details`). A change that shuts out nobody who gets in today,
/// such as removing a disabled entry, is not refused.
pub(super) fn guard(
    tx: &Tx,
    account: &str,
    uid: u32,
    client_ip: Option<IpAddr>,
    force: bool,
    before: &AccountPolicy,
    after: &AccountPolicy,
) -> Result<(), Failure> {
    if force || after.mode != Mode::Enforce {
        return Ok(());
    }
    let at = now();
    if let Some(ip) = client_ip.filter(|&ip| !after.covers(ip, at)) {
        logging::lockout_refused(account, uid, ip);
        return Err(Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account}'s allowlist would not include {ip}, the address you are using; add it first, or \
                 repeat with --force (\"force\": true)"
            ),
        ));
    }
    let lets_in_now = |addr: IpAddr| before.mode != Mode::Enforce || before.covers(addr, at);
    let allows_nothing = |p: &AccountPolicy| p.entries.is_empty() && p.live_overrides(at).next().is_none();
    if allows_nothing(after) && (before.mode != Mode::Enforce || !allows_nothing(before)) {
        logging::lockout_refused_because(account, uid, "nothing allowed");
        return Err(Failure::new(
            ErrorCode::Lockout,
            format!(
                "refused: {account} would be enforcing with no enabled entry and no live override, which shuts \
                 everyone out; add an entry first, use mode off to stop restricting it, or repeat with --force"
            ),
        ));
    }
    let shut_out: Vec<RecentSignin> = tx
        .recent_signins(account, at - RECENT_SIGNINS)?
        .into_iter()
        .filter(|s| lets_in_now(s.address) && !after.covers(s.address, at))
        .collect();
    let Some(first) = shut_out.first() else { return Ok(()) };
    logging::lockout_refused_because(account, uid, "recent sign-ins shut out");
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
    Err(refusal)
}
