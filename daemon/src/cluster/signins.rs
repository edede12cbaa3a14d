//! Successful sign-ins shared by the fleet, so that the lockout guard on any node weighs
//! the addresses customers signed in from on every node.
//!
//! Checks stay on the node that answered them. Every [`attempts::PERIOD`], the node reads
//! from its store, per (account, address) an application signed in from successfully in the
//! guard's window, the last time it did, and publishes it under
//! `P/~signins/<account>/<addr>/<node>` (outside the policy: nobody watches it). A key is
//! rewritten only once its last sign-in is [`GRANULARITY`] newer than the one written, so
//! an account signing in all day costs about one write an hour per node and address; the
//! writes share the attempts' cap and [`Outbox`]. Keys carry a lease of the window plus one
//! day, one lease per node and day, as the attempts' do.
//!
//! The guard reads one account's range ([`Cluster::signins`]) and counts the other nodes'
//! sign-ins with its own store's.

use std::{collections::HashSet, net::IpAddr, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

use super::{
    Cluster,
    attempts::{self, Outbox},
};
use crate::{protocol::RecentSignin, store::LastSignin};

/// A published sign-in is rewritten only once the last one is this much newer: the guard's
/// window is 7 days, so another node may count a sign-in as gone up to this much early.
pub const GRANULARITY: i64 = 3600;
/// How long the guard waits for one change's sign-ins, every read together.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Above this many accounts, a set change's guard reads the whole `~signins/` range once
/// rather than one range per account: a range read per account is a round trip each, with
/// the writer lock held, while the whole range is one paged read.
pub const MAX_ACCOUNT_READS: usize = 8;
/// Keys one guard counts at most. Past it, the guard cannot weigh every sign-in and refuses
/// (fail closed); `force` still passes.
const MAX_REMOTE: usize = 200_000;

/// A key's value: when the node last saw a successful sign-in from the address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub last_seen: i64,
}

/// Where the publisher reads this node's sign-ins: the service implements it.
pub trait SigninSource: Send + Sync + 'static {
    /// The guard's window in seconds, and [`crate::store::Tx::last_signins`] over it.
    fn last_signins(&self, changed_since: i64) -> Result<(i64, Vec<LastSignin>), String>;
}

/// An outbox for sign-ins: rewrites wait for [`GRANULARITY`].
pub fn outbox() -> Outbox {
    Outbox::with_granularity(GRANULARITY)
}

/// This node's sign-ins as keys and values.
fn values(cluster: &Cluster, signins: Vec<LastSignin>) -> Vec<(String, Vec<u8>, i64)> {
    signins
        .into_iter()
        .map(|s| {
            let key = cluster.keys.signins(&s.account, &s.address, &cluster.node);
            let value = serde_json::to_vec(&Published { last_seen: s.last_seen }).expect("a sign-in serializes");
            (key, value, s.last_seen)
        })
        .collect()
}

/// Publishes this node's successful sign-ins for as long as the daemon runs.
pub async fn publish(cluster: Arc<Cluster>, source: Arc<dyn SigninSource>) {
    let keys = cluster.clone();
    let read = move |changed_since| {
        let (window, signins) = source.last_signins(changed_since)?;
        Ok((window, values(&keys, signins)))
    };
    attempts::run(cluster, "successful sign-ins", outbox(), read).await
}

/// Another node's last successful sign-in of `account`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteSignin {
    pub account: String,
    pub signin: RecentSignin,
}

impl Cluster {
    /// The successful sign-ins of `accounts` the other nodes published, last seen at or
    /// after `since`: a range per account, or the whole range once for more than
    /// [`MAX_ACCOUNT_READS`] accounts. An error when etcd cannot be read in time, or holds
    /// more than the guard can weigh.
    pub fn signins(&self, accounts: &[&str], since: i64) -> Result<Vec<RemoteSignin>, String> {
        let Some(client) = self.client.lock().expect("client lock").clone() else {
            return Err("this node has not reached etcd since it started".into());
        };
        let wanted: HashSet<&str> = accounts.iter().copied().collect();
        let ranges = if wanted.len() > MAX_ACCOUNT_READS {
            vec![self.keys.all_signins()]
        } else {
            wanted.iter().map(|a| self.keys.account_signins(a)).collect()
        };
        let mut found = Vec::new();
        let mut too_many = false;
        let read = async {
            for (start, end) in ranges {
                super::read_range(&client, start, end, 0, |kv| {
                    let Some(remote) = self.remote_signin(kv) else { return };
                    if remote.signin.last_seen < since || !wanted.contains(remote.account.as_str()) {
                        return;
                    }
                    if found.len() < MAX_REMOTE {
                        found.push(remote);
                    } else {
                        too_many = true;
                    }
                })
                .await?;
            }
            Ok::<_, etcd_client::Error>(())
        };
        match self.runtime.block_on(async { tokio::time::timeout(READ_TIMEOUT, read).await }) {
            Ok(Ok(())) if too_many => {
                Err(format!("the other nodes published more than {MAX_REMOTE} sign-ins to weigh"))
            }
            Ok(Ok(())) => Ok(found),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("etcd did not answer within {READ_TIMEOUT:?}")),
        }
    }

    /// One key of [`super::keys::Keys::all_signins`] as another node's sign-in; `None` for
    /// this node's own (its store, never behind, has them) and for a key or value it cannot
    /// read (written by a newer version, or by hand).
    fn remote_signin(&self, kv: &etcd_client::KeyValue) -> Option<RemoteSignin> {
        let (account, address, node) = self.keys.parse_signins(kv.key_str().ok()?)?;
        if node == self.node {
            return None;
        }
        let address: IpAddr = address.parse().ok()?;
        let value: Published = serde_json::from_slice(kv.value()).ok()?;
        Some(RemoteSignin { account: account.to_owned(), signin: RecentSignin { address, last_seen: value.last_seen } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(last_seen: i64) -> Vec<u8> {
        serde_json::to_vec(&Published { last_seen }).unwrap()
    }

    #[test]
    fn a_signin_is_rewritten_once_an_hour_at_most() {
        let mut outbox = outbox();
        let t = 1_700_000_000;
        // The first sign-in of a key is written.
        outbox.offer("acme/a".into(), value(t), t);
        let first = outbox.take(10);
        assert_eq!(first.len(), 1);
        let (key, v, seen) = first.into_iter().next().unwrap();
        outbox.written(key, v, seen);
        // Signing in again within the hour writes nothing.
        for later in [t, t + 1, t + 1800, t + GRANULARITY - 1] {
            outbox.offer("acme/a".into(), value(later), later);
            assert_eq!(outbox.pending(), 0, "{later}");
        }
        // An hour later it is written again, with the newest time offered before the write.
        outbox.offer("acme/a".into(), value(t + GRANULARITY), t + GRANULARITY);
        outbox.offer("acme/a".into(), value(t + GRANULARITY + 5), t + GRANULARITY + 5);
        // Another key waits beside it; the cap holds the rest for the next take.
        outbox.offer("acme/b".into(), value(t + 10), t + 10);
        let second = outbox.take(1);
        assert_eq!(second, [("acme/a".to_owned(), value(t + GRANULARITY + 5), t + GRANULARITY + 5)]);
        assert_eq!(outbox.pending(), 1);
        let (key, v, seen) = second.into_iter().next().unwrap();
        outbox.written(key, v, seen);
        assert_eq!(outbox.take(10).len(), 1);
        // An older sign-in (another pass over the same rows) never goes back.
        outbox.offer("acme/a".into(), value(t), t);
        assert_eq!(outbox.pending(), 0);
    }
}
