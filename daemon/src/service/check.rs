//! Login checks, answered from memory by the pure decision in [`crate::policy::decide`].

use super::{Reply, Service, now};

use ipnet::IpNet;

use crate::{
    activity::Signin,
    policy::decide,
    protocol::{Caller, Check, Mode, Reason},
};

impl Service {
    pub(super) fn check(&self, Check { account, addr, method, dry_run }: Check, caller: &Caller) -> Reply<Check> {
        let at = now();
        let (result, entry, set_entry) = {
            let accounts = self.accounts.read().expect("cache lock");
            let sets = self.sets.read().expect("set cache lock");
            let result = decide(&accounts, &sets, &account, addr, at);
            // The entry to credit with the sign-in: only when an entry let it in (not mode
            // off, not an override), the most specific live one, expiring or not; a network of
            // a referenced set when no own entry covers the address. Only an application's
            // check is the customer's sign-in: staff trying an address leave no evidence of use.
            let credited = (caller.is_application()
                && result.allowed
                && result.reason == Reason::Allowed
                && result.via_override.is_none())
            .then(|| accounts.get(&account).filter(|a| a.mode != Mode::Off))
            .flatten();
            let entry = credited.and_then(|a| a.credited_entry(IpNet::from(addr), at));
            let set_entry = credited
                .filter(|_| entry.is_none())
                .and_then(|a| a.set_entry_covering(&sets, addr))
                .map(|(set, net)| (set.to_owned(), net));
            (result, entry, set_entry)
        };
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
            entry,
            set_entry,
        });
        Ok(result)
    }
}
