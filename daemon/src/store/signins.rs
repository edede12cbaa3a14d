//! The successful sign-ins a fleet node publishes for the lockout guard on the other nodes
//! (see `cluster::signins`): the rows `recent_signins` counts.

use super::{StoreError, Tx};

/// The last successful sign-in of one account from one address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastSignin {
    pub account: String,
    pub address: String,
    pub last_seen: i64,
    /// When the account now under this id was made (0 if there is none).
    pub account_made_at: i64,
}

impl Tx<'_> {
    /// Per (account, address) an application signed in from successfully (what
    /// `recent_signins` counts), the last time it did, if that is at or after both `since`
    /// and `changed_since`.
    pub fn last_signins(&self, since: i64, changed_since: i64) -> Result<Vec<LastSignin>, StoreError> {
        let sql = "SELECT s.account, s.address, MAX(s.last_seen), COALESCE(a.created_at, 0)
                   FROM signins s LEFT JOIN accounts a ON a.id = s.account
                   WHERE s.last_seen >= MAX(?1, ?2) AND s.application = 1 AND s.allowed = 1 AND s.address <> '*'
                   GROUP BY s.account, s.address ORDER BY s.account, s.address";
        self.rows(sql, (since, changed_since), |r| {
            Ok(LastSignin { account: r.get(0)?, address: r.get(1)?, last_seen: r.get(2)?, account_made_at: r.get(3)? })
        })
    }
}
