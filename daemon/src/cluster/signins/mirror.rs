//! Every other node's published sign-ins, held in memory by each node: what the lockout
//! guard weighs, without a read of etcd on the change's path.
//!
//! The node's watch of `P/~signins/` ([`super::follow`]) fills it: a snapshot read, then the
//! watch's events from the snapshot's revision (a put replaces a key's sign-in, a delete or
//! a lapsed lease removes it). The mirror is only believed while etcd keeps confirming it:
//! the snapshot read, then progress reports the watch asks for every second. One older than
//! [`MAX_LAG`], a broken watch, or a node that has not read it yet, and the guard refuses
//! (fail closed) rather than weigh an incomplete list.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use super::RemoteSignin;
use crate::protocol::RecentSignin;

/// The oldest confirmation from etcd the guard counts on: the mirror then lacks at most
/// the sign-ins published in the last `MAX_LAG` (the publisher itself sends a sign-in up
/// to [`super::super::attempts::PERIOD`] after it was answered).
pub const MAX_LAG: Duration = Duration::from_secs(5);
/// The most keys a node holds: about 24 bytes each, plus about 150 per account. Past it,
/// the mirror empties and the guard refuses (fail closed) until the keys are fewer again.
pub const MAX_KEYS: usize = 2_000_000;

/// One key: a node's last sign-in of an account from an address. Compact: seconds fit in
/// 32 bits until 2106, and the node is an index into the table's few node names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    last_seen: u32,
    address: IpAddr,
    node: u16,
}

/// The keys, by account; the node's own are left out (its store has them, never behind).
#[derive(Debug)]
pub struct Table {
    own: String,
    limit: usize,
    accounts: HashMap<Box<str>, Vec<Entry>>,
    nodes: Vec<Box<str>>,
    len: usize,
}

/// A table over its limit: what the guard is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Full(pub usize);

impl std::fmt::Display for Full {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the other nodes published more than the {} sign-ins this node holds", self.0)
    }
}

impl Table {
    fn new(own: &str, limit: usize) -> Table {
        Table { own: own.to_owned(), limit, accounts: HashMap::new(), nodes: Vec::new(), len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A key's new value: `node`'s last sign-in of `account` from `address`.
    pub fn put(&mut self, account: &str, address: IpAddr, node: &str, last_seen: i64) -> Result<(), Full> {
        if node == self.own {
            return Ok(());
        }
        let node = match self.nodes.iter().position(|n| &**n == node) {
            Some(i) => i,
            None if self.nodes.len() <= u16::MAX as usize => {
                self.nodes.push(node.into());
                self.nodes.len() - 1
            }
            None => return Err(Full(self.limit)),
        } as u16;
        let last_seen = u32::try_from(last_seen.max(0)).unwrap_or(u32::MAX);
        let entries = self.accounts.entry(account.into()).or_default();
        if let Some(e) = entries.iter_mut().find(|e| e.address == address && e.node == node) {
            e.last_seen = last_seen;
            return Ok(());
        }
        if self.len >= self.limit {
            if entries.is_empty() {
                self.accounts.remove(account);
            }
            return Err(Full(self.limit));
        }
        entries.push(Entry { last_seen, address, node });
        self.len += 1;
        Ok(())
    }

    /// A key deleted, or lapsed with its lease.
    pub fn delete(&mut self, account: &str, address: IpAddr, node: &str) {
        let Some(node) = self.nodes.iter().position(|n| &**n == node) else { return };
        let Some(entries) = self.accounts.get_mut(account) else { return };
        let before = entries.len();
        entries.retain(|e| !(e.address == address && e.node as usize == node));
        self.len -= before - entries.len();
        if entries.is_empty() {
            self.accounts.remove(account);
        }
    }

    fn signins<'a>(&'a self, account: &'a str, since: i64) -> impl Iterator<Item = RemoteSignin> + 'a {
        self.accounts.get(account).into_iter().flatten().filter(move |e| i64::from(e.last_seen) >= since).map(
            move |e| RemoteSignin {
                account: account.to_owned(),
                signin: RecentSignin { address: e.address, last_seen: i64::from(e.last_seen) },
            },
        )
    }
}

/// Whether the table can be counted on.
#[derive(Debug)]
enum Standing {
    /// Never read since the node started.
    NotRead,
    /// etcd confirmed that the table held every key as of this instant.
    Confirmed(Instant),
    /// The watch stopped, for this reason; the table is emptied until it is read again.
    Stopped(String),
}

/// The mirror: a table and whether it is in step with etcd.
#[derive(Debug)]
pub struct Mirror {
    own: String,
    limit: usize,
    state: Mutex<(Table, Standing)>,
}

impl Mirror {
    /// A mirror for the node named `own`, never read yet.
    pub fn new(own: &str) -> Mirror {
        Mirror::with_limit(own, MAX_KEYS)
    }

    fn with_limit(own: &str, limit: usize) -> Mirror {
        Mirror { own: own.to_owned(), limit, state: Mutex::new((Table::new(own, limit), Standing::NotRead)) }
    }

    /// An empty table to read a snapshot into.
    pub fn table(&self) -> Table {
        Table::new(&self.own, self.limit)
    }

    /// A snapshot read in full, linearizably, from a read sent at `asked`: it replaces the
    /// table, whatever the watch had before.
    pub fn load(&self, table: Table, asked: Instant) {
        *self.state.lock().expect("mirror lock") = (table, Standing::Confirmed(asked));
    }

    /// Applies the watch's events in order (a put with its sign-in, a delete with `None`).
    /// Past the limit, the mirror stops (emptied) and says why.
    pub fn apply<'a>(&self, events: impl IntoIterator<Item = Event<'a>>) -> Result<(), Full> {
        let mut state = self.state.lock().expect("mirror lock");
        for (account, address, node, last_seen) in events {
            match last_seen {
                Some(last_seen) => {
                    if let Err(full) = state.0.put(account, address, node, last_seen) {
                        *state = (self.table(), Standing::Stopped(full.to_string()));
                        return Err(full);
                    }
                }
                None => state.0.delete(account, address, node),
            }
        }
        Ok(())
    }

    /// etcd confirmed that every event up to what it had at `asked` has been applied.
    pub fn confirm(&self, asked: Instant) {
        let mut state = self.state.lock().expect("mirror lock");
        match state.1 {
            Standing::Confirmed(at) if at >= asked => {}
            Standing::Confirmed(_) => state.1 = Standing::Confirmed(asked),
            // A table emptied when the watch stopped is only believed after a new read.
            Standing::NotRead | Standing::Stopped(_) => {}
        }
    }

    /// The watch stopped: the table is emptied (it would only grow staler) until read again.
    /// Whether it had been read since it last stopped.
    pub fn stop(&self, why: String) -> bool {
        let mut state = self.state.lock().expect("mirror lock");
        let (_, before) = std::mem::replace(&mut *state, (self.table(), Standing::Stopped(why)));
        matches!(before, Standing::Confirmed(_))
    }

    /// Whether it has been read, or has failed to be, since the node started.
    pub fn tried(&self) -> bool {
        !matches!(self.state.lock().expect("mirror lock").1, Standing::NotRead)
    }

    /// The other nodes' sign-ins of `accounts` last seen at or after `since`; an error
    /// saying why when the mirror is not known to be in step at `now`.
    pub fn signins(&self, accounts: &[&str], since: i64, now: Instant) -> Result<Vec<RemoteSignin>, String> {
        let state = self.state.lock().expect("mirror lock");
        match &state.1 {
            Standing::NotRead => return Err("this node has not read them from etcd since it started".into()),
            Standing::Stopped(why) => return Err(format!("this node's watch of them stopped: {why}")),
            Standing::Confirmed(at) => {
                let age = now.saturating_duration_since(*at);
                if age > MAX_LAG {
                    return Err(format!(
                        "etcd last confirmed this node's copy of them {:.1} s ago, more than the {} s it may lag",
                        age.as_secs_f64(),
                        MAX_LAG.as_secs()
                    ));
                }
            }
        }
        let mut wanted: Vec<&str> = accounts.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        Ok(wanted.into_iter().flat_map(|a| state.0.signins(a, since)).collect())
    }
}

/// A watch event: account, address, node, and the last sign-in (`None`: deleted).
pub type Event<'a> = (&'a str, IpAddr, &'a str, Option<i64>);

#[cfg(test)]
impl Mirror {
    /// Whether the guard would count on it at `now` (what [`Mirror::signins`] decides).
    fn in_step(&self, now: Instant) -> bool {
        self.signins(&[], 0, now).is_ok()
    }

    /// How many keys it holds.
    fn len(&self) -> usize {
        self.state.lock().expect("mirror lock").0.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn listed(mirror: &Mirror, accounts: &[&str], since: i64, now: Instant) -> Vec<(String, String, i64)> {
        let mut found: Vec<_> = mirror
            .signins(accounts, since, now)
            .unwrap()
            .into_iter()
            .map(|r| (r.account, r.signin.address.to_string(), r.signin.last_seen))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn an_entry_is_small() {
        // The per-key cost docs/design.md states.
        assert_eq!(std::mem::size_of::<Entry>(), 24);
    }

    #[test]
    fn events_put_replace_and_delete_and_a_snapshot_replaces_everything() {
        let mirror = Mirror::new("a");
        let t0 = Instant::now();
        let mut table = mirror.table();
        table.put("acme", ip("198.18.0.1"), "b", 100).unwrap();
        table.put("acme", ip("198.18.0.1"), "a", 500).unwrap();
        table.put("globex", ip("fd00::1"), "c", 200).unwrap();
        assert_eq!(table.len(), 2, "the node's own key is skipped");
        mirror.load(table, t0);
        assert_eq!(listed(&mirror, &["acme"], 0, t0), [("acme".into(), "198.18.0.1".into(), 100)]);

        // A put replaces the key's value (also an older one: the key says what it says),
        // another node's key for the same address is its own, a delete removes one key.
        mirror
            .apply([
                ("acme", ip("198.18.0.1"), "b", Some(150)),
                ("acme", ip("198.18.0.1"), "c", Some(120)),
                ("acme", ip("198.18.0.2"), "b", Some(300)),
                ("acme", ip("198.18.0.9"), "a", Some(900)),
                ("globex", ip("fd00::1"), "c", None),
            ])
            .unwrap();
        assert_eq!(
            listed(&mirror, &["acme", "globex", "acme"], 0, t0),
            [
                ("acme".into(), "198.18.0.1".into(), 120),
                ("acme".into(), "198.18.0.1".into(), 150),
                ("acme".into(), "198.18.0.2".into(), 300)
            ]
        );
        assert_eq!(listed(&mirror, &["acme"], 150, t0).len(), 2, "the window's start counts");
        mirror.apply([("acme", ip("198.18.0.1"), "b", None), ("acme", ip("198.18.0.7"), "b", None)]).unwrap();
        assert_eq!(mirror.len(), 2);

        // A new snapshot (after a compaction or a broken watch) replaces the whole table.
        let mut table = mirror.table();
        table.put("initech", ip("198.18.5.5"), "c", 400).unwrap();
        mirror.load(table, t0);
        assert_eq!(listed(&mirror, &["acme", "initech"], 0, t0), [("initech".into(), "198.18.5.5".into(), 400)]);
    }

    #[test]
    fn it_is_believed_only_in_step() {
        let mirror = Mirror::new("a");
        let t0 = Instant::now();
        let err = mirror.signins(&["acme"], 0, t0).unwrap_err();
        assert!(err.contains("not read them"), "{err}");
        assert!(!mirror.tried());
        mirror.load(mirror.table(), t0);
        assert!(mirror.tried());
        assert!(mirror.signins(&["acme"], 0, t0 + MAX_LAG).is_ok());
        let err = mirror.signins(&["acme"], 0, t0 + MAX_LAG + Duration::from_millis(1)).unwrap_err();
        assert!(err.contains("last confirmed"), "{err}");
        // etcd's progress reports keep it in step.
        mirror.confirm(t0 + Duration::from_secs(4));
        mirror.confirm(t0 + Duration::from_secs(1));
        assert!(mirror.in_step(t0 + Duration::from_secs(9)));
        assert!(!mirror.in_step(t0 + Duration::from_secs(10)));
        // A stopped watch empties it, and a late confirmation does not bring it back: only
        // a new read does.
        mirror.apply([("acme", ip("198.18.0.1"), "b", Some(1))]).unwrap();
        assert!(mirror.stop("etcd ended the watch".into()));
        assert!(!mirror.stop("etcd ended the watch".into()), "stopped already");
        mirror.confirm(t0 + Duration::from_secs(5));
        let err = mirror.signins(&["acme"], 0, t0 + Duration::from_secs(5)).unwrap_err();
        assert!(err.contains("stopped: etcd ended the watch"), "{err}");
        assert!(mirror.is_empty());
        mirror.load(mirror.table(), t0 + Duration::from_secs(6));
        assert!(mirror.in_step(t0 + Duration::from_secs(6)));
    }

    #[test]
    fn past_its_limit_it_empties_and_refuses() {
        let mirror = Mirror::with_limit("a", 2);
        let t0 = Instant::now();
        let mut table = mirror.table();
        table.put("acme", ip("198.18.0.1"), "b", 1).unwrap();
        table.put("acme", ip("198.18.0.2"), "b", 1).unwrap();
        assert_eq!(table.put("acme", ip("198.18.0.3"), "b", 1), Err(Full(2)), "a snapshot over the limit");
        // Rewriting a key it holds does not count against the limit.
        table.put("acme", ip("198.18.0.2"), "b", 5).unwrap();
        mirror.load(table, t0);
        let full = mirror.apply([("acme", ip("198.18.0.1"), "b", None), ("globex", ip("fd00::1"), "b", Some(2))]);
        assert_eq!(full, Ok(()));
        let full = mirror.apply([("initech", ip("fd00::2"), "c", Some(2))]);
        assert_eq!(full, Err(Full(2)));
        let err = mirror.signins(&["acme"], 0, t0).unwrap_err();
        assert!(err.contains("more than the 2 sign-ins"), "{err}");
        assert!(mirror.is_empty());
    }
}
