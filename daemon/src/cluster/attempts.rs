//! Denied sign-ins shared by the fleet, so that support on any node sees the attempts made
//! on every node.
//!
//! Checks stay on the node that answered them (counted per hour in its store). Every
//! [`PERIOD`], the node reads from its store the denied checks of each (account, address,
//! method) that saw one lately, summed per day over the retention window, and publishes each
//! under `P/~attempts/<account>/<addr>/<method>/<node>` (outside the policy: nobody watches
//! it). Only values that differ from what it last wrote are written, at most
//! [`MAX_KEYS_PER_SECOND`]; the rest wait in an [`Outbox`], where a newer value of a key
//! replaces the older one. Keys carry a lease of the retention plus one day, one lease per
//! node and day, that nobody renews: a key rewritten later moves to the newer day's lease,
//! and a key nobody rewrites lapses once everything in it is past the retention.
//!
//! Support reads one account's range ([`Cluster::attempts`]) and adds the other nodes'
//! tallies to its own store's.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use etcd_client::PutOptions;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::Cluster;
use crate::store::DeniedTally;

/// How often the node looks for new denied checks to publish.
pub const PERIOD: Duration = Duration::from_secs(2);
/// Keys one node writes per second at most; what is over waits for the next period.
pub const MAX_KEYS_PER_SECOND: usize = 50;
/// Checks reach the store up to a second after they were answered (longer when a write is
/// retried): each pass looks this far back before the last one.
const SLACK_SECONDS: i64 = 60;
/// How long a read or write waits for etcd.
const TIMEOUT: Duration = Duration::from_secs(1);
/// How long one account's attempts may take to read, every page together.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Keys one `activity` counts at most (one account's addresses and methods, times nodes);
/// the rest are read past and said to be missing.
const MAX_REMOTE: usize = 100_000;
pub(super) const DAY: i64 = 24 * 3600;

/// One day's denied checks of one outcome and kind of caller, as published.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptTally {
    pub day: i64,
    pub reason: String,
    pub allowed: bool,
    pub application: bool,
    pub count: i64,
    pub first_seen: i64,
    pub last_seen: i64,
}

/// A key's value: one node's tallies of one (account, address, method), by day.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub tallies: Vec<AttemptTally>,
}

/// Another node's denied checks of one account from one address with one method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Remote {
    pub node: String,
    pub address: String,
    pub method: String,
    pub tallies: Vec<AttemptTally>,
}

/// Where the publisher reads this node's denied checks: the service implements it.
pub trait AttemptSource: Send + Sync + 'static {
    /// The retention in days, and the tallies of [`crate::store::Tx::denied_tallies`] over it.
    fn denied_attempts(&self, changed_since: i64) -> Result<(u32, Vec<DeniedTally>), String>;
}

/// Keys to write, coalesced: one value per key, the newest, and nothing that equals what
/// was written last (nor, with a granularity, anything seen less than it after what was
/// written). Pure, so that the cap and the coalescing are tested alone.
#[derive(Default)]
pub struct Outbox {
    /// Seconds: a key is offered again only once its last time seen is this much newer than
    /// the written one's (0: whenever its value differs).
    granularity: i64,
    /// What was written, and the last time seen in it (to forget keys past the retention).
    written: HashMap<String, (Vec<u8>, i64)>,
    pending: HashMap<String, (Vec<u8>, i64)>,
    /// Pending keys, oldest first (a key may be here after it left `pending`: skipped).
    order: VecDeque<String>,
}

impl Outbox {
    /// An outbox for values that only say when something was last seen, rewritten only
    /// when that moved by `granularity` seconds or more (see `cluster::signins`).
    pub fn with_granularity(granularity: i64) -> Outbox {
        Outbox { granularity, ..Outbox::default() }
    }

    /// Offers a key's current value; it waits only if it differs from what was written (and
    /// with a granularity, if it was last seen that much after the written one). A written
    /// value last seen before `counted_from` does not count as written: readers ignore what
    /// came before it (a sign-in from before its account was made again under the same id),
    /// so the granularity must not hold the new value back (0: always counted).
    pub fn offer(&mut self, key: String, value: Vec<u8>, last_seen: i64, counted_from: i64) {
        if self.written.get(&key).is_some_and(|(_, seen)| *seen < counted_from) {
            self.written.remove(&key);
        }
        let fresh_enough = |seen: i64| self.granularity > 0 && last_seen < seen.saturating_add(self.granularity);
        if self.written.get(&key).is_some_and(|(v, seen)| *v == value || fresh_enough(*seen)) {
            self.pending.remove(&key);
            return;
        }
        if self.pending.insert(key.clone(), (value, last_seen)).is_none() {
            self.order.push_back(key);
        }
    }

    /// At most `max` keys to write now, oldest first.
    pub fn take(&mut self, max: usize) -> Vec<(String, Vec<u8>, i64)> {
        let mut batch = Vec::new();
        while batch.len() < max {
            let Some(key) = self.order.pop_front() else { break };
            if let Some((value, last_seen)) = self.pending.remove(&key) {
                batch.push((key, value, last_seen));
            }
        }
        batch
    }

    /// `key` now holds `value` in etcd.
    pub fn written(&mut self, key: String, value: Vec<u8>, last_seen: i64) {
        self.written.insert(key, (value, last_seen));
    }

    /// Writing `key` failed: it goes first next time, unless a newer value came meanwhile.
    pub fn failed(&mut self, key: String, value: Vec<u8>, last_seen: i64) {
        if !self.pending.contains_key(&key) {
            self.pending.insert(key.clone(), (value, last_seen));
            self.order.push_front(key);
        }
    }

    /// Forgets written keys last seen before `before`: their leases are lapsing.
    pub fn forget_before(&mut self, before: i64) {
        self.written.retain(|_, (_, last_seen)| *last_seen >= before);
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// This node's tallies as one value per key (tallies come ordered by key, then day).
fn values(cluster: &Cluster, tallies: Vec<DeniedTally>) -> Vec<Offer> {
    let mut out: Vec<(String, Published)> = Vec::new();
    for t in tallies {
        let key = cluster.keys.attempts(&t.account, &t.address, &t.method, &cluster.node);
        let tally = AttemptTally {
            day: t.day,
            reason: t.reason,
            allowed: t.allowed,
            application: t.application,
            count: t.count,
            first_seen: t.first_seen,
            last_seen: t.last_seen,
        };
        match out.last_mut() {
            Some((last, value)) if *last == key => value.tallies.push(tally),
            _ => out.push((key, Published { tallies: vec![tally] })),
        }
    }
    out.into_iter()
        .map(|(key, value)| {
            let last_seen = value.tallies.iter().map(|t| t.last_seen).max().unwrap_or(0);
            (key, serde_json::to_vec(&value).expect("tallies serialize"), last_seen, 0)
        })
        .collect()
}

pub(super) fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Publishes this node's denied checks for as long as the daemon runs.
pub async fn publish(cluster: Arc<Cluster>, source: Arc<dyn AttemptSource>) {
    let keys = cluster.clone();
    let read = move |changed_since| {
        let (retention, tallies) = source.denied_attempts(changed_since)?;
        Ok((i64::from(retention) * DAY, values(&keys, tallies)))
    };
    run(cluster, "denied checks", Outbox::default(), read).await
}

/// A key to publish: its value, when what it says was last seen, and the time before which
/// readers ignore it (see [`Outbox::offer`]; 0 for always counted).
pub(super) type Offer = (String, Vec<u8>, i64, i64);

/// One node's publishing of `what` for as long as the daemon runs: every [`PERIOD`], `read`
/// (blocking: it reads the store) gives how long keys are kept, in seconds, and the keys
/// whose value may have changed since the time it is given; what the `outbox` lets through
/// is written, at most [`MAX_KEYS_PER_SECOND`], under a lease of that time plus a day.
pub(super) async fn run<R>(cluster: Arc<Cluster>, what: &'static str, mut outbox: Outbox, read: R)
where
    R: Fn(i64) -> Result<(i64, Vec<Offer>), String> + Send + Sync + 'static,
{
    let read = Arc::new(read);
    // The lease of the current day, granted on its first write.
    let mut lease: Option<(i64, i64)> = None;
    // 0: the first pass takes the whole window (after a restart, etcd may lack some of it).
    let mut changed_since = 0;
    let mut forgotten = 0;
    // Said once per outage, not every pass.
    let mut failing = false;
    let mut every = tokio::time::interval(PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let started = now();
        let pass = {
            let read = read.clone();
            tokio::task::spawn_blocking(move || read(changed_since)).await
        };
        let retention = match pass {
            Ok(Ok((retention, values))) => {
                for (key, value, last_seen, counted_from) in values {
                    outbox.offer(key, value, last_seen, counted_from);
                }
                changed_since = started - SLACK_SECONDS;
                retention
            }
            Ok(Err(e)) => {
                warn!("cluster: could not read the {what} to publish: {e}");
                continue;
            }
            Err(e) => {
                warn!("cluster: could not read the {what} to publish: {e}");
                continue;
            }
        };
        if started - forgotten > 3600 {
            outbox.forget_before(started - retention);
            forgotten = started;
        }
        if outbox.pending() == 0 {
            continue;
        }
        let Some(mut client) = cluster.client.lock().expect("client lock").clone() else { continue };
        let day = started - started.rem_euclid(DAY);
        let mut batch = outbox.take(MAX_KEYS_PER_SECOND * PERIOD.as_secs() as usize).into_iter();
        while let Some((key, value, last_seen)) = batch.next() {
            let lease_id = match lease {
                Some((d, id)) if d == day => Ok(id),
                _ => match tokio::time::timeout(TIMEOUT, client.lease_grant(retention + DAY, None)).await {
                    Ok(Ok(granted)) => {
                        lease = Some((day, granted.id()));
                        Ok(granted.id())
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("etcd did not answer within {TIMEOUT:?}")),
                },
            };
            let put = match lease_id {
                Ok(id) => {
                    let options = PutOptions::new().with_lease(id);
                    match tokio::time::timeout(TIMEOUT, client.put(key.clone(), value.clone(), Some(options))).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("etcd did not answer within {TIMEOUT:?}")),
                    }
                }
                Err(e) => Err(e),
            };
            if let Err(e) = put {
                // etcd is away (or lost the lease): everything not written waits for a later
                // pass, in its order (each goes in front of the waiting keys).
                for (key, value, last_seen) in batch.rev() {
                    outbox.failed(key, value, last_seen);
                }
                outbox.failed(key, value, last_seen);
                if !failing {
                    info!("cluster: {what} not published yet ({} keys waiting): {e}", outbox.pending());
                    failing = true;
                }
                lease = None;
                break;
            }
            if failing {
                info!("cluster: publishing {what} again ({} keys waiting)", outbox.pending());
                failing = false;
            }
            outbox.written(key, value, last_seen);
        }
    }
}

/// What the other nodes published for one account.
#[derive(Debug, Default)]
pub struct RemoteAttempts {
    pub rows: Vec<Remote>,
    /// Keys past [`MAX_REMOTE`], read and not counted.
    pub left_out: usize,
}

impl Cluster {
    /// The denied checks of `account` the other nodes published: one range, read a page at
    /// a time at one revision, so that an account with more keys than a page is counted
    /// whole (up to [`MAX_REMOTE`] keys; what is left out is counted).
    pub fn attempts(&self, account: &str) -> Result<RemoteAttempts, String> {
        let Some(client) = self.client.lock().expect("client lock").clone() else {
            return Err("this node has not reached etcd since it started".into());
        };
        let (start, end) = self.keys.account_attempts(account);
        let mut found = RemoteAttempts::default();
        let read = super::read_range(&client, start, end, 0, |kv| {
            let Some(remote) = self.remote_attempt(account, kv) else { return };
            if found.rows.len() < MAX_REMOTE {
                found.rows.push(remote);
            } else {
                found.left_out += 1;
            }
        });
        match self.runtime.block_on(async { tokio::time::timeout(READ_TIMEOUT, read).await }) {
            Ok(Ok(_)) => Ok(found),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("etcd did not answer within {READ_TIMEOUT:?}")),
        }
    }

    /// One key of [`Keys::account_attempts`] as another node's tallies; `None` for this
    /// node's own (its store, never behind, has them) and for a key or value it cannot read.
    fn remote_attempt(&self, account: &str, kv: &etcd_client::KeyValue) -> Option<Remote> {
        let (address, method, node) = self.keys.parse_attempts(account, kv.key_str().ok()?)?;
        if node == self.node {
            return None;
        }
        let value: Published = serde_json::from_slice(kv.value()).ok()?;
        Some(Remote {
            node: node.to_owned(),
            address: address.to_owned(),
            method: method.to_owned(),
            tallies: value.tallies,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_coalesces_and_keeps_to_the_cap() {
        let mut outbox = Outbox::default();
        for i in 0..5 {
            outbox.offer(format!("k{i}"), b"1".to_vec(), 10, 0);
        }
        // A newer value of a waiting key replaces it, in its place.
        outbox.offer("k0".into(), b"2".to_vec(), 11, 0);
        assert_eq!(outbox.pending(), 5);
        let first = outbox.take(3);
        assert_eq!(first.iter().map(|(k, ..)| k.as_str()).collect::<Vec<_>>(), ["k0", "k1", "k2"]);
        assert_eq!(first[0].1, b"2");
        for (key, value, seen) in first {
            outbox.written(key, value, seen);
        }
        // What is over the cap waits for the next take; nothing is lost.
        assert_eq!(outbox.pending(), 2);
        // A value equal to the one written is not written again; a changed one is.
        outbox.offer("k0".into(), b"2".to_vec(), 11, 0);
        outbox.offer("k1".into(), b"3".to_vec(), 12, 0);
        let second = outbox.take(10);
        assert_eq!(second.iter().map(|(k, ..)| k.as_str()).collect::<Vec<_>>(), ["k3", "k4", "k1"]);
        assert!(outbox.take(10).is_empty());
        // A failed write goes first next time, unless a newer value came meanwhile.
        let (k3, k4) = (second[0].clone(), second[1].clone());
        outbox.offer("k9".into(), b"1".to_vec(), 13, 0);
        outbox.failed(k3.0, k3.1, k3.2);
        outbox.offer("k4".into(), b"5".to_vec(), 14, 0);
        outbox.failed(k4.0, k4.1, k4.2);
        let third = outbox.take(10);
        let keys: Vec<_> = third.iter().map(|(k, v, _)| (k.as_str(), v.as_slice())).collect();
        assert_eq!(keys, [("k3", &b"1"[..]), ("k9", b"1"), ("k4", b"5")]);
        // Written keys past the retention are forgotten: offered again, they are written.
        for (key, value, seen) in third {
            outbox.written(key, value, seen);
        }
        outbox.forget_before(12);
        outbox.offer("k0".into(), b"2".to_vec(), 11, 0);
        outbox.offer("k9".into(), b"1".to_vec(), 13, 0);
        assert_eq!(outbox.take(10).len(), 1);
    }

    /// With a granularity, a newer time is held back until it is that much newer, unless
    /// the written one is from before the time readers count from.
    #[test]
    fn a_value_readers_ignore_does_not_hold_back_a_new_one() {
        let mut outbox = Outbox::with_granularity(3600);
        outbox.written("k".into(), b"100".to_vec(), 100);
        outbox.offer("k".into(), b"200".to_vec(), 200, 0);
        assert!(outbox.take(10).is_empty(), "within the granularity");
        outbox.offer("k".into(), b"200".to_vec(), 200, 150);
        let taken = outbox.take(10);
        assert_eq!(taken.iter().map(|(k, _, seen)| (k.as_str(), *seen)).collect::<Vec<_>>(), [("k", 200)]);
    }
}
