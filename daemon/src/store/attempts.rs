//! The denied sign-ins a fleet node publishes for support on the other nodes (see
//! `cluster::attempts`): the same hourly rows `signin_summary` reads, summed per day.

use super::{StoreError, Tx};

/// Denied checks (and those monitor mode let through) of one account from one address with
/// one method, of one day, outcome and kind of caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeniedTally {
    pub account: String,
    /// The address, or `*` for the addresses beyond an hour's cap.
    pub address: String,
    pub method: String,
    /// The day's first second (UTC).
    pub day: i64,
    pub reason: String,
    pub application: bool,
    pub allowed: bool,
    pub count: i64,
    pub first_seen: i64,
    pub last_seen: i64,
}

impl Tx<'_> {
    /// The denied tallies last seen since `since` of every (account, address, method) that
    /// has a denied check last seen at or after `changed_since`: a group's whole window, so
    /// that what is published for it replaces what was.
    pub fn denied_tallies(&self, since: i64, changed_since: i64) -> Result<Vec<DeniedTally>, StoreError> {
        let sql = "SELECT account, address, method, bucket - bucket % 86400, reason, application, allowed,
                          SUM(count), MIN(first_seen), MAX(last_seen)
                   FROM signins WHERE last_seen >= ?1 AND (allowed = 0 OR reason = 'monitor_would_deny')
                   AND (account, address, method) IN
                       (SELECT account, address, method FROM signins
                        WHERE last_seen >= MAX(?1, ?2) AND (allowed = 0 OR reason = 'monitor_would_deny'))
                   GROUP BY account, address, method, 4, reason, application, allowed
                   ORDER BY account, address, method, 4, reason, application";
        self.rows(sql, (since, changed_since), |r| {
            Ok(DeniedTally {
                account: r.get(0)?,
                address: r.get(1)?,
                method: r.get(2)?,
                day: r.get(3)?,
                reason: r.get(4)?,
                application: r.get(5)?,
                allowed: r.get(6)?,
                count: r.get(7)?,
                first_seen: r.get(8)?,
                last_seen: r.get(9)?,
            })
        })
    }
}
