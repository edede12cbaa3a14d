//! Successful sign-ins shared by the fleet, so that the lockout guard on any node weighs
//! the addresses customers signed in from on every node.
//!
//! Checks stay on the node that answered them. Every [`attempts::PERIOD`], the node reads
//! from its store, per (account, address) an application signed in from successfully in the
//! guard's window, the last time it did, and publishes it under
//! `P/~signins/<account>/<addr>/<node>` (outside the policy: nobody watches it). A key is
//! rewritten only once its last sign-in is [`GRANULARITY`] newer than the one written, so
//! an account signing in all day costs about one write an hour per node and address (but
//! at once when the written one is from before the account was made again under its id);
//! the writes share the attempts' cap and [`Outbox`]. Keys carry a lease of the window plus one
//! day, one lease per node and day, as the attempts' do.
//!
//! Every node keeps the other nodes' sign-ins in memory ([`Mirror`]), fed by a watch of
//! `P/~signins/` ([`follow`]); the guard counts them with its own store's and never reads
//! etcd on the change's path ([`Cluster::signins`]).

mod mirror;

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, EventType, WatchOptions};
use log::{info, warn};
use serde::{Deserialize, Serialize};

pub use self::mirror::{MAX_KEYS, MAX_LAG, Mirror};
use super::{
    Cluster,
    attempts::{self, Outbox},
};
use crate::{protocol::RecentSignin, store::LastSignin};

/// A published sign-in is rewritten only once the last one is this much newer: the guard's
/// window is 7 days, so another node may count a sign-in as gone up to this much early.
pub const GRANULARITY: i64 = 3600;
/// How often the watch asks etcd to confirm that it has delivered everything: what keeps
/// the mirror in step while nobody signs in (well within [`MAX_LAG`]).
const CONFIRM_EVERY: Duration = Duration::from_secs(1);
/// A confirmation not answered in this long means the watch is stuck: it is read again.
const CONFIRM_WITHIN: Duration = Duration::from_secs(10);
/// How long a guarded change on a node that has just started waits for the first read.
const FIRST_READ_WITHIN: Duration = Duration::from_secs(3);
/// How long a snapshot of `~signins/` may take (a paged read of up to [`MAX_KEYS`] keys).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The pause before reading again after the mirror overflowed: the keys only get fewer as
/// their leases lapse, which takes hours.
const FULL_PAUSE: Duration = Duration::from_secs(60);

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
fn values(cluster: &Cluster, signins: Vec<LastSignin>) -> Vec<attempts::Offer> {
    signins
        .into_iter()
        .map(|s| {
            let key = cluster.keys.signins(&s.account, &s.address, &cluster.node);
            let value = serde_json::to_vec(&Published { last_seen: s.last_seen }).expect("a sign-in serializes");
            // Other nodes' guards count only sign-ins since the account was made: one
            // written for an earlier account of the same id must not hold this one back.
            (key, value, s.last_seen, s.account_made_at)
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
    /// after `since`, from this node's mirror: no read of etcd. An error saying why when
    /// the mirror is not known to be in step (never read, its watch stopped, or etcd has not
    /// confirmed it within [`MAX_LAG`]), or overflowed.
    pub fn signins(&self, accounts: &[&str], since: i64) -> Result<Vec<RemoteSignin>, String> {
        // A node that has just started reads them within moments of reaching etcd: a guarded
        // change sent meanwhile waits for that (or for the first read's failure) rather than
        // being refused. Short sleeps: only until the first read, never again.
        let deadline = Instant::now() + FIRST_READ_WITHIN;
        while !self.signin_mirror.tried() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.signin_mirror.signins(accounts, since, Instant::now())
    }

    /// One key of [`super::keys::Keys::all_signins`], put (`put`) or deleted, as a mirror
    /// event; `None` for a key it cannot read (written by a newer version, or by hand). A
    /// value it cannot read no longer says what the key said: the key counts as deleted.
    fn signin_event<'k>(&self, kv: &'k etcd_client::KeyValue, put: bool) -> Option<mirror::Event<'k>> {
        let (account, address, node) = self.keys.parse_signins(std::str::from_utf8(kv.key()).ok()?)?;
        let last_seen = put.then(|| serde_json::from_slice::<Published>(kv.value()).ok()).flatten();
        Some((account, address.parse().ok()?, node, last_seen.map(|p| p.last_seen)))
    }
}

/// Keeps this node's [`Mirror`] of the other nodes' sign-ins for as long as the daemon
/// runs: reads `~signins/` whole, then follows its watch; after any failure (a compaction,
/// a broken watch, etcd unreachable) the mirror stops being believed at once and is read
/// again once etcd answers.
pub async fn follow(cluster: Arc<Cluster>) {
    let mut pause = Duration::from_millis(100);
    loop {
        let Some(client) = cluster.client.lock().expect("client lock").clone() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let started = Instant::now();
        let (why, full) = follow_once(&cluster, client).await;
        if cluster.signin_mirror.stop(why.clone()) {
            warn!("cluster: the other nodes' sign-ins are not current here ({why}); guarded changes are refused");
        }
        if full {
            tokio::time::sleep(FULL_PAUSE).await;
            continue;
        }
        if started.elapsed() > Duration::from_secs(10) {
            pause = Duration::from_millis(100);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// One pass: a snapshot, then the watch until it fails. Returns why it stopped, and
/// whether because the mirror overflowed.
async fn follow_once(cluster: &Cluster, mut client: Client) -> (String, bool) {
    let mirror = &cluster.signin_mirror;
    let (start, end) = cluster.keys.all_signins();
    let mut table = mirror.table();
    let mut full = None;
    let asked = Instant::now();
    let read = super::read_range(&client, start.clone(), end.clone(), 0, |kv| {
        let Some((account, address, node, Some(last_seen))) = cluster.signin_event(kv, true) else { return };
        if full.is_none()
            && let Err(e) = table.put(account, address, node, last_seen)
        {
            full = Some(e);
        }
    });
    let revision = match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(revision)) => revision,
        Ok(Err(e)) => return (format!("reading them: {e}"), false),
        Err(_) => return (format!("reading them took more than {READ_TIMEOUT:?}"), false),
    };
    if let Some(full) = full {
        return (full.to_string(), true);
    }
    let keys = table.len();
    mirror.load(table, asked);
    info!("cluster: the other nodes' sign-ins read at revision {revision} ({keys} keys); following them");
    let options = WatchOptions::new().with_range(end).with_start_revision(revision + 1);
    let mut stream = match client.watch(start, Some(options)).await {
        Ok(stream) => stream,
        Err(e) => return (format!("watch: {e}"), false),
    };
    let mut confirm = tokio::time::interval(CONFIRM_EVERY);
    // When each confirmation still unanswered was asked for, oldest first.
    let mut asked: VecDeque<Instant> = VecDeque::new();
    // etcd 3.4 before 3.4.24 may report progress ahead of events it has queued for the
    // watch: a report vouches for the time of the one before it.
    let mut answered: Option<Instant> = None;
    loop {
        let response = tokio::select! {
            message = stream.message() => match message {
                Ok(Some(response)) => response,
                Ok(None) => return ("etcd ended the watch".into(), false),
                Err(e) => return (format!("watch: {e}"), false),
            },
            _ = confirm.tick() => {
                if asked.front().is_some_and(|at| at.elapsed() > CONFIRM_WITHIN) {
                    return (format!("etcd did not confirm the watch within {CONFIRM_WITHIN:?}"), false);
                }
                if let Err(e) = stream.request_progress().await {
                    return (format!("watch: {e}"), false);
                }
                asked.push_back(Instant::now());
                continue;
            }
        };
        if response.canceled() {
            let compacted = response.compact_revision();
            return if compacted > 0 {
                (format!("the watch fell behind etcd's compaction (revision {compacted})"), false)
            } else {
                (format!("etcd cancelled the watch: {}", response.cancel_reason()), false)
            };
        }
        if response.created() {
            continue;
        }
        let events = response.events();
        if events.is_empty() {
            // A progress report: every event up to etcd's revision when it was asked for
            // has been delivered.
            if let Some(at) = asked.pop_front()
                && let Some(earlier) = answered.replace(at)
            {
                mirror.confirm(earlier);
            }
            continue;
        }
        let changes =
            events.iter().filter_map(|event| cluster.signin_event(event.kv()?, event.event_type() == EventType::Put));
        if let Err(full) = mirror.apply(changes) {
            return (full.to_string(), true);
        }
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
        outbox.offer("acme/a".into(), value(t), t, 0);
        let first = outbox.take(10);
        assert_eq!(first.len(), 1);
        let (key, v, seen) = first.into_iter().next().unwrap();
        outbox.written(key, v, seen);
        // Signing in again within the hour writes nothing.
        for later in [t, t + 1, t + 1800, t + GRANULARITY - 1] {
            outbox.offer("acme/a".into(), value(later), later, 0);
            assert_eq!(outbox.pending(), 0, "{later}");
        }
        // An hour later it is written again, with the newest time offered before the write.
        outbox.offer("acme/a".into(), value(t + GRANULARITY), t + GRANULARITY, 0);
        outbox.offer("acme/a".into(), value(t + GRANULARITY + 5), t + GRANULARITY + 5, 0);
        // Another key waits beside it; the cap holds the rest for the next take.
        outbox.offer("acme/b".into(), value(t + 10), t + 10, 0);
        let second = outbox.take(1);
        assert_eq!(second, [("acme/a".to_owned(), value(t + GRANULARITY + 5), t + GRANULARITY + 5)]);
        assert_eq!(outbox.pending(), 1);
        let (key, v, seen) = second.into_iter().next().unwrap();
        outbox.written(key, v, seen);
        assert_eq!(outbox.take(10).len(), 1);
        // An older sign-in (another pass over the same rows) never goes back.
        outbox.offer("acme/a".into(), value(t), t, 0);
        assert_eq!(outbox.pending(), 0);
    }
}
