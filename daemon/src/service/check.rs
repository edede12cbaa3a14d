//! Login checks, answered from memory by the pure decision in [`crate::policy::decide`].

use super::{Reply, Service, now};
use crate::{
    activity::Signin,
    policy::decide,
    protocol::{Caller, Check},
};

impl Service {
    pub(super) fn check(&self, Check { account, addr, method, dry_run }: Check, caller: &Caller) -> Reply<Check> {
        let at = now();
        let result = decide(&self.accounts.read().expect("cache lock"), &account, addr, at);
        if dry_run {
            return Ok(result);
        }
        // Every check is counted (unknown accounts too); the log counts it per hour, address
        // and outcome, under the caller's uid.
        self.checks.count(result.reason);
        self.activity.signin(Signin {
            time: at,
            account,
            address: addr,
            method: method.unwrap_or_default(),
            reason: result.reason,
            uid: caller.uid,
            application: caller.is_application(),
        });
        Ok(result)
    }
}
