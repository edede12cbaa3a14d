//! The activity log's writer: login checks and drop samples are counted in memory and
//! written as per-hour rows (see the `signins`, `drops` and `unknown_signins` tables in
//! `store`), so the store grows with the number of distinct (address, method, outcome,
//! caller) an hour brings, not with the number of checks.
//!
//! Recording stays off the request path: a check adds one to a count in memory, under a
//! lock held for a hash-map update, and wakes nobody (waking a thread per check cost more
//! than answering it). A thread takes the counts and writes them out once a second, when
//! they grow large, and whenever someone asks with [`ActivityLog::flush`]. Drop samples come
//! to it on a channel, a batch per drain. Audit records of changes do not come here; they
//! are written in the change's own transaction.
//!
//! The thread writes through the daemon's one write connection, taking the writer lock for
//! the transaction (see [`StoreAccess`]), not through a connection of its own: in WAL mode a
//! commit made by any other connection makes SQLite drop a connection's whole page cache at
//! its next transaction, and so the first change after each of this log's commits read
//! every page it touched again (about 130 µs on the path of an `allow add`).

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use log::warn;

use crate::{
    protocol::{Method, Reason},
    store::{self, DropKey, SigninKey, Store, StoreError, Tally, UnknownKey},
};

/// How the writer thread reaches the store: runs one write (a whole transaction) on the
/// daemon's write connection, under the lock every change takes, and returns its result.
pub type StoreAccess =
    Box<dyn FnMut(&mut dyn FnMut(&mut Store) -> Result<(), StoreError>) -> Result<(), StoreError> + Send>;

/// Access to the store inside `writer` (its `store` part), taking its lock for each write,
/// so that no connection but the writer's commits to the database. Its commits are durable
/// even on a fleet node, whose writer otherwise commits as a copy of etcd: the counts exist
/// nowhere else. Weak: the log does not keep the writer; once it is gone, writes fail.
pub fn shared_access<W: Send + 'static>(writer: &Arc<Mutex<W>>, store: fn(&mut W) -> &mut Store) -> StoreAccess {
    let writer = Arc::downgrade(writer);
    Box::new(move |write| {
        let gone = || StoreError::Io(std::io::Error::other("the daemon's store is closed"));
        let writer = writer.upgrade().ok_or_else(gone)?;
        let mut guard = writer.lock().map_err(|_| gone())?;
        store(&mut guard).durably(|s| write(s))
    })
}

/// One login check to count.
#[derive(Clone, Debug)]
pub struct Signin {
    pub time: i64,
    pub account: String,
    pub address: IpAddr,
    pub method: Method,
    pub reason: Reason,
    pub uid: u32,
    /// The caller holds the check role: the check is the customer's own attempt.
    pub application: bool,
    /// The allowlist entry that let it through (the most specific one covering the address).
    pub entry: Option<IpNet>,
    /// Or the network of a shared set that did (no own entry covering the address): the
    /// set's name and the network.
    pub set_entry: Option<(String, IpNet)>,
}

/// Dropped packets of one account from one source to one endpoint, already counted.
#[derive(Clone, Debug)]
pub struct Drops {
    pub time: i64,
    pub account: String,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: u8,
    pub port: u16,
    pub reason: &'static str,
    pub count: i64,
}

/// Last uses of allowlist entries: (account, entry) and unix seconds; of shared sets'
/// networks, (set, network).
pub type EntryUses = HashMap<(String, IpNet), i64>;

enum LogMessage {
    Drops(Vec<Drops>),
    /// Packets the kernel let through, as the stamps say: per entry, and per network of a
    /// shared set.
    Packets {
        entries: EntryUses,
        sets: EntryUses,
    },
    Flush(mpsc::SyncSender<()>),
    /// The counted checks reached [`ActivityLog::MAX_PENDING`] rows: write them out early.
    Full,
}

/// Checks counted since the writer last took them, shared by the request path and the writer.
#[derive(Default)]
struct Checks {
    signins: HashMap<SigninKey, Tally>,
    unknown: HashMap<UnknownKey, Tally>,
    /// The last sign-in each entry let through.
    entry_signins: EntryUses,
    /// The last sign-in each (set, network) let through.
    set_signins: EntryUses,
    /// The accounts with a row in `signins`, so that a change asks in one lookup whether its
    /// account has checks not written yet (a scan would hold up every check meanwhile).
    accounts: HashSet<String>,
}

impl Checks {
    fn len(&self) -> usize {
        self.signins.len() + self.unknown.len()
    }

    /// Counts one check; false if it would be a new row and `cap` rows are held already.
    fn add(&mut self, s: Signin, cap: usize) -> bool {
        let tally = Tally::new(1, s.time);
        let full = self.len() >= cap;
        if let Some(entry) = s.entry {
            // One row per entry in use, however many checks: not held to the cap.
            let last = self.entry_signins.entry((s.account.clone(), entry)).or_default();
            *last = (*last).max(s.time);
        }
        if let Some(key) = s.set_entry {
            let last = self.set_signins.entry(key).or_default();
            *last = (*last).max(s.time);
        }
        // A check for an account that does not exist is counted per address: the name
        // tried is not kept (credential stuffing invents them by the million).
        if s.reason == Reason::UnknownAccount {
            let key = UnknownKey { bucket: store::bucket(s.time), address: s.address, method: s.method };
            return add_tally(&mut self.unknown, key, tally, full);
        }
        let key = SigninKey {
            account: s.account,
            bucket: store::bucket(s.time),
            address: s.address,
            method: s.method,
            reason: s.reason,
            uid: s.uid,
            application: s.application,
        };
        match self.signins.entry(key) {
            Entry::Occupied(mut counted) => counted.get_mut().add(tally),
            Entry::Vacant(_) if full => return false,
            Entry::Vacant(new) => {
                self.accounts.insert(new.key().account.clone());
                new.insert(tally);
            }
        }
        true
    }
}

/// Adds `more` to `uses`, keeping the later time of each entry.
fn merge_latest(uses: &mut EntryUses, more: EntryUses) {
    for (key, at) in more {
        let last = uses.entry(key).or_default();
        *last = (*last).max(at);
    }
}

fn add_tally<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Tally>, key: K, tally: Tally, full: bool) -> bool {
    match map.get_mut(&key) {
        Some(t) => t.add(tally),
        None if full => return false,
        None => {
            map.insert(key, tally);
        }
    }
    true
}

/// What the request path and the writer thread share.
#[derive(Default)]
struct Shared {
    checks: Mutex<Checks>,
    /// A [`LogMessage::Full`] is on its way: one is enough.
    full_sent: AtomicBool,
    /// The accounts whose sign-in counts the writer took and has not written yet. A
    /// change to one of them waits for them ([`ActivityLog::flush_account`]); a change to
    /// any other account does not wait for the writer, however much else it is writing.
    in_flight: Mutex<HashSet<String>>,
}

/// Counts not written yet.
#[derive(Default)]
struct Pending {
    signins: HashMap<SigninKey, Tally>,
    unknown: HashMap<UnknownKey, Tally>,
    drops: HashMap<DropKey, Tally>,
    entry_signins: EntryUses,
    entry_packets: EntryUses,
    /// Per (set, network): the last sign-in it let through.
    set_signins: EntryUses,
    /// Per (set, network): the last packet it let through.
    set_packets: EntryUses,
}

impl Pending {
    fn len(&self) -> usize {
        self.signins.len()
            + self.unknown.len()
            + self.drops.len()
            + self.entry_signins.len()
            + self.entry_packets.len()
            + self.set_signins.len()
            + self.set_packets.len()
    }

    /// Moves the checks counted so far in with the counts not written yet.
    fn take_checks(&mut self, shared: &Shared) {
        let taken = {
            let mut checks = shared.checks.lock().expect("activity lock");
            // Moved while the counts are held, so that an account is always in one set or
            // the other until its counts are written.
            let accounts = std::mem::take(&mut checks.accounts);
            shared.in_flight.lock().expect("activity lock").extend(accounts);
            std::mem::take(&mut *checks)
        };
        shared.full_sent.store(false, Ordering::Relaxed);
        merge_latest(&mut self.entry_signins, taken.entry_signins);
        merge_latest(&mut self.set_signins, taken.set_signins);
        if self.signins.is_empty() && self.unknown.is_empty() {
            (self.signins, self.unknown) = (taken.signins, taken.unknown);
            return;
        }
        // Only after a failed write: the counts kept for the retry and the new ones add up.
        add_tallies(&mut self.signins, taken.signins);
        add_tallies(&mut self.unknown, taken.unknown);
    }

    fn add(&mut self, message: LogMessage, waiting: &mut Vec<mpsc::SyncSender<()>>) {
        match message {
            LogMessage::Full => {}
            LogMessage::Drops(drops) => {
                for d in drops {
                    let tally = Tally::new(d.count, d.time);
                    let key = DropKey {
                        account: d.account,
                        bucket: store::bucket(d.time),
                        source: d.source,
                        destination: d.destination,
                        protocol: d.protocol,
                        port: d.port,
                        reason: d.reason,
                    };
                    self.drops.entry(key).and_modify(|t| t.add(tally)).or_insert(tally);
                }
            }
            LogMessage::Packets { entries, sets } => {
                merge_latest(&mut self.entry_packets, entries);
                merge_latest(&mut self.set_packets, sets);
            }
            LogMessage::Flush(done) => waiting.push(done),
        }
    }

    /// Writes every count out, [`Self::ROWS_PER_WRITE`] rows a transaction, sign-ins first.
    /// Each transaction takes the writer lock, which every change needs: one transaction of
    /// every row held it, at 100,000 entries in use, for 200 to 700 ms every second. On a
    /// failure the rows not written are kept for the next attempt, up to a limit, so a store
    /// that is briefly locked loses nothing; a transaction is all or nothing, so no count is
    /// written twice.
    fn write(&mut self, access: &mut StoreAccess, shared: &Shared) {
        let mut runs = Runs::new(std::mem::take(self), Self::ROWS_PER_WRITE);
        while runs.rows > 0 {
            let part = runs.next_part(Self::ROWS_PER_WRITE);
            let written = access(&mut |store: &mut Store| part.write_in(store));
            if let Err(e) = written {
                *self = runs.into_pending();
                self.merge(part);
                self.keep_at_most(ActivityLog::MAX_KEPT, shared, &e);
                return;
            }
            if runs.signins.is_empty() {
                shared.in_flight.lock().expect("activity lock").clear();
            }
            // Gives a change woken by the lock's release its chance to take it before the next part.
            thread::yield_now();
        }
    }

    /// Writes every row in one transaction.
    fn write_in(&self, store: &mut Store) -> Result<(), StoreError> {
        let tx = store.transaction()?;
        tx.add_signins(&self.signins)?;
        tx.add_unknown_signins(&self.unknown)?;
        tx.add_drops(&self.drops)?;
        tx.note_entry_signins(&self.entry_signins)?;
        tx.note_entry_packets(&self.entry_packets)?;
        tx.note_set_signins(&self.set_signins)?;
        tx.note_set_packets(&self.set_packets)?;
        tx.commit()
    }

    /// After a failed write: what is kept for the next attempt, at most `limit` rows. Last
    /// uses go first (an entry still in use is stamped again within seconds), then counts.
    fn keep_at_most(&mut self, limit: usize, shared: &Shared, error: &StoreError) {
        if self.len() < limit {
            warn!("could not record activity, will retry: {error}");
            return;
        }
        let last_uses =
            self.entry_signins.len() + self.entry_packets.len() + self.set_signins.len() + self.set_packets.len();
        if last_uses > 0 {
            warn!("could not record activity ({last_uses} last uses of entries not recorded): {error}");
            (self.entry_signins, self.entry_packets, self.set_signins, self.set_packets) = Default::default();
        }
        if self.len() >= limit {
            warn!("could not record activity ({} rows of counts lost): {error}", self.len());
            *self = Pending::default();
            shared.in_flight.lock().expect("activity lock").clear();
        }
    }

    /// Rows in one write transaction at most. At 100,000 accounts a row costs about 2 µs
    /// (more when it is new), so a change waits about 2 ms at most for the log's part
    /// (`change_waits_during_a_large_write`).
    const ROWS_PER_WRITE: usize = 1_024;

    /// Puts back rows a write took (counts add up; last uses keep the later).
    fn merge(&mut self, other: Pending) {
        add_tallies(&mut self.signins, other.signins);
        add_tallies(&mut self.unknown, other.unknown);
        add_tallies(&mut self.drops, other.drops);
        merge_latest(&mut self.entry_signins, other.entry_signins);
        merge_latest(&mut self.entry_packets, other.entry_packets);
        merge_latest(&mut self.set_signins, other.set_signins);
        merge_latest(&mut self.set_packets, other.set_packets);
    }
}

/// Adds `more` to `tallies`, key by key.
fn add_tallies<K: std::hash::Hash + Eq>(tallies: &mut HashMap<K, Tally>, more: HashMap<K, Tally>) {
    for (key, tally) in more {
        tallies.entry(key).and_modify(|t| t.add(tally)).or_insert(tally);
    }
}

/// The rows of one write, each table's sorted by the table's key with the first row last, so
/// that each part pops the next run of the table (counts: hour, then account; last uses:
/// account or set, then network). A part's rows then lie together in the table: taken at
/// random, every part of a second's write dirtied nearly every page of the hour's rows again,
/// and each of those pages went into the WAL once per part. Sorted once a write: choosing
/// each part's rows among all the rows left made a write's cost grow with the square of its
/// rows.
struct Runs {
    signins: Vec<(SigninKey, Tally)>,
    unknown: Vec<(UnknownKey, Tally)>,
    drops: Vec<(DropKey, Tally)>,
    entry_signins: Vec<((String, IpNet), i64)>,
    entry_packets: Vec<((String, IpNet), i64)>,
    set_signins: Vec<((String, IpNet), i64)>,
    set_packets: Vec<((String, IpNet), i64)>,
    /// Rows no part has taken yet.
    rows: usize,
}

impl Runs {
    /// `pending`'s rows, sorted only if they need more than one part of `part_rows`.
    fn new(pending: Pending, part_rows: usize) -> Runs {
        let rows = pending.len();
        let sort = rows > part_rows;
        let last_use = |a: &(String, IpNet), b: &(String, IpNet)| a.cmp(b);
        Runs {
            signins: in_key_order(pending.signins, sort, |a, b| (a.bucket, &a.account).cmp(&(b.bucket, &b.account))),
            unknown: in_key_order(pending.unknown, sort, |a, b| (a.bucket, a.address).cmp(&(b.bucket, b.address))),
            drops: in_key_order(pending.drops, sort, |a, b| (a.bucket, &a.account).cmp(&(b.bucket, &b.account))),
            entry_signins: in_key_order(pending.entry_signins, sort, last_use),
            entry_packets: in_key_order(pending.entry_packets, sort, last_use),
            set_signins: in_key_order(pending.set_signins, sort, last_use),
            set_packets: in_key_order(pending.set_packets, sort, last_use),
            rows,
        }
    }

    /// The next `rows` rows at most, sign-ins first.
    fn next_part(&mut self, rows: usize) -> Pending {
        let mut left = rows;
        let part = Pending {
            signins: take_run(&mut self.signins, &mut left),
            unknown: take_run(&mut self.unknown, &mut left),
            drops: take_run(&mut self.drops, &mut left),
            entry_signins: take_run(&mut self.entry_signins, &mut left),
            entry_packets: take_run(&mut self.entry_packets, &mut left),
            set_signins: take_run(&mut self.set_signins, &mut left),
            set_packets: take_run(&mut self.set_packets, &mut left),
        };
        self.rows -= rows - left;
        part
    }

    /// The rows no part took.
    fn into_pending(self) -> Pending {
        Pending {
            signins: self.signins.into_iter().collect(),
            unknown: self.unknown.into_iter().collect(),
            drops: self.drops.into_iter().collect(),
            entry_signins: self.entry_signins.into_iter().collect(),
            entry_packets: self.entry_packets.into_iter().collect(),
            set_signins: self.set_signins.into_iter().collect(),
            set_packets: self.set_packets.into_iter().collect(),
        }
    }
}

/// `rows` in `order` with the first last (see [`Runs`]); as they come if not `sort`.
fn in_key_order<K, V>(rows: HashMap<K, V>, sort: bool, order: impl Fn(&K, &K) -> std::cmp::Ordering) -> Vec<(K, V)> {
    let mut rows: Vec<(K, V)> = rows.into_iter().collect();
    if sort {
        rows.sort_unstable_by(|a, b| order(&b.0, &a.0));
    }
    rows
}

/// Pops up to `left` rows off the end of `rows`, and counts them off `left`.
fn take_run<K: std::hash::Hash + Eq, V>(rows: &mut Vec<(K, V)>, left: &mut usize) -> HashMap<K, V> {
    let taken = rows.len().min(*left);
    *left -= taken;
    rows.drain(rows.len() - taken..).collect()
}

/// The handle checks and the drop drain record through.
pub struct ActivityLog {
    sender: mpsc::SyncSender<LogMessage>,
    shared: Arc<Shared>,
    /// Checks not counted in the store because the writer fell behind (the queue was full).
    dropped: AtomicU64,
}

impl ActivityLog {
    /// Drop batches and flush requests waiting for the writer.
    const QUEUE: usize = 1024;
    /// Distinct rows of check counts held in memory at most; a check that would need
    /// another is not counted (and counted in `dropped`).
    const MAX_CHECK_ROWS: usize = Self::MAX_PENDING * 4;
    /// Rows kept for the next attempt after failed writes, at most (see `keep_at_most`).
    const MAX_KEPT: usize = Self::MAX_PENDING * 4;
    /// How often counts are written out when nobody asks.
    const WRITE_EVERY: Duration = Duration::from_secs(1);
    /// Distinct rows of counts held before they are written out early.
    const MAX_PENDING: usize = 16_384;

    /// Starts the writer thread, writing through `access` (the daemon's write connection).
    pub fn start(mut access: StoreAccess) -> ActivityLog {
        let (sender, receiver) = mpsc::sync_channel(Self::QUEUE);
        let shared = Arc::new(Shared::default());
        let checks = shared.clone();
        thread::Builder::new()
            .name("activity-log".into())
            .spawn(move || {
                let mut pending = Pending::default();
                let mut waiting = Vec::new();
                let mut last_write = Instant::now();
                loop {
                    let wait = Self::WRITE_EVERY.saturating_sub(last_write.elapsed()).max(Duration::from_millis(10));
                    let stop = match receiver.recv_timeout(wait) {
                        Ok(message) => {
                            pending.add(message, &mut waiting);
                            false
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => false,
                        Err(mpsc::RecvTimeoutError::Disconnected) => true,
                    };
                    // Take what else is queued, but not forever: a flood must still be written out.
                    for message in receiver.try_iter().take(Self::MAX_PENDING) {
                        pending.add(message, &mut waiting);
                    }
                    if stop
                        || !waiting.is_empty()
                        || checks.full_sent.load(Ordering::Relaxed)
                        || pending.len() >= Self::MAX_PENDING
                        || last_write.elapsed() >= Self::WRITE_EVERY
                    {
                        pending.take_checks(&checks);
                        pending.write(&mut access, &checks);
                        last_write = Instant::now();
                        waiting.drain(..).for_each(|done| {
                            let _ = done.send(());
                        });
                    }
                    if stop {
                        break;
                    }
                }
            })
            .expect("spawn the activity log thread");
        ActivityLog { sender, shared, dropped: AtomicU64::new(0) }
    }

    /// Counts a login check (never waits for the writer: if it is far behind, a check that
    /// needs a new row is dropped).
    pub fn signin(&self, signin: Signin) {
        let (counted, rows) = {
            let mut checks = self.shared.checks.lock().expect("activity lock");
            (checks.add(signin, Self::MAX_CHECK_ROWS), checks.len())
        };
        if !counted {
            self.count_dropped();
        }
        if rows >= Self::MAX_PENDING && !self.shared.full_sent.swap(true, Ordering::Relaxed) {
            let _ = self.sender.try_send(LogMessage::Full);
        }
    }

    /// Records the packets entries and shared sets' networks let through (written with the
    /// next write).
    pub fn packets(&self, entries: EntryUses, sets: EntryUses) {
        if !entries.is_empty() || !sets.is_empty() {
            self.send(LogMessage::Packets { entries, sets });
        }
    }

    /// Counts drained drop samples.
    pub fn drops(&self, drops: Vec<Drops>) {
        if !drops.is_empty() {
            self.send(LogMessage::Drops(drops));
        }
    }

    fn send(&self, message: LogMessage) {
        if self.sender.try_send(message).is_err() {
            self.count_dropped();
        }
    }

    fn count_dropped(&self) {
        let dropped = self.dropped.fetch_add(1, Ordering::Relaxed);
        if (dropped + 1).is_power_of_two() {
            warn!("the activity log fell behind: {} records not counted so far", dropped + 1);
        }
    }

    /// Waits until the checks of `account` recorded so far are in the store; at once when
    /// none are waiting to be written.
    pub fn flush_account(&self, account: &str) {
        // The counts' own map first: the writer moves an account from it to `in_flight`,
        // never back, so looking in this order cannot miss one on its way.
        let waiting = self.shared.checks.lock().expect("activity lock").accounts.contains(account)
            || self.shared.in_flight.lock().expect("activity lock").contains(account);
        if waiting {
            self.flush();
        }
    }

    /// Waits until everything recorded so far is in the store.
    pub fn flush(&self) {
        let (done, wait) = mpsc::sync_channel(1);
        if self.sender.send(LogMessage::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(10));
        }
    }
}

impl Drop for ActivityLog {
    /// Writes out what is counted while the write connection is still there (the service
    /// drops its log before its writer).
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::protocol::{AccountState, Mode};

    fn signin(account: &str, time: i64) -> Signin {
        Signin {
            time,
            account: account.into(),
            address: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7)),
            method: Method::Password,
            reason: Reason::Allowed,
            uid: 0,
            application: true,
            entry: None,
            set_entry: None,
        }
    }

    fn writer() -> (tempfile::TempDir, Arc<Mutex<Store>>) {
        let dir = tempfile::Builder::new().prefix("ipaccess-activity-").tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("ipaccess.db")).unwrap();
        let tx = store.transaction().unwrap();
        tx.add_account("a1", None, AccountState::Active, Mode::Enforce, 1).unwrap();
        tx.commit().unwrap();
        (dir, Arc::new(Mutex::new(store)))
    }

    /// The log's commits go through the writer's connection: the writer sees no other
    /// connection's commit, so SQLite keeps its page cache for the next change. The same
    /// probe does see the commits of a log on a connection of its own (as the daemon had it
    /// before), so it can tell.
    #[test]
    fn commits_through_the_writer_leave_its_page_cache_alone() {
        let (dir, writer) = writer();
        let version = || writer.lock().unwrap().data_version().unwrap();
        let recent = |store: &mut Store| store.read().unwrap().recent_signins("a1", 0).unwrap().len();

        let log = ActivityLog::start(shared_access(&writer, |s| s));
        let before = version();
        log.signin(signin("a1", 1_000));
        log.flush();
        assert_eq!(recent(&mut writer.lock().unwrap()), 1, "the sign-in is in the store");
        assert_eq!(version(), before, "no other connection committed");
        drop(log);

        let mut own = Store::open(&dir.path().join("ipaccess.db")).unwrap();
        let log = ActivityLog::start(Box::new(move |write| write(&mut own)));
        let before = version();
        log.signin(signin("a1", 2_000));
        log.flush();
        assert_ne!(version(), before, "a log with its own connection is seen committing");
    }

    /// Dropping the log writes out what it counted, through a writer that is still there.
    #[test]
    fn dropping_the_log_writes_out_its_counts() {
        let (_dir, writer) = writer();
        let log = ActivityLog::start(shared_access(&writer, |s| s));
        log.signin(signin("a1", 1_000));
        drop(log);
        let mut store = writer.lock().unwrap();
        assert_eq!(store.read().unwrap().recent_signins("a1", 0).unwrap().len(), 1);
    }

    /// Once the writer is gone the log's writes fail (and are logged); nothing waits.
    #[test]
    fn a_log_outliving_its_writer_does_not_hang() {
        let (_dir, writer) = writer();
        let log = ActivityLog::start(shared_access(&writer, |s| s));
        drop(writer);
        log.signin(signin("a1", 1_000));
        let started = Instant::now();
        log.flush();
        drop(log);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// The log's commits are durable (`synchronous=FULL`) on a writer that commits as a copy
    /// of a durable source, and the writer keeps its own setting.
    #[test]
    fn the_log_commits_durably_on_a_copy() {
        let (_dir, writer) = writer();
        writer.lock().unwrap().as_copy_of_a_durable_source().unwrap();
        let mut access = shared_access(&writer, |s| s);
        let mut seen = None;
        access(&mut |store: &mut Store| {
            seen = Some(store.synchronous());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, Some(2), "FULL while the log writes");
        assert_eq!(writer.lock().unwrap().synchronous(), 1, "NORMAL again afterwards");
    }

    /// A store of `accounts` accounts `p0`, `p1`, ... with `entries` host entries each, and
    /// a last packet (at 100) of each account's first entry, for writes of many rows.
    fn many_accounts(accounts: u32, entries: u32) -> (tempfile::TempDir, Arc<Mutex<Store>>, EntryUses) {
        let (dir, writer) = writer();
        let mut uses = EntryUses::new();
        {
            let mut store = writer.lock().unwrap();
            let tx = store.transaction().unwrap();
            for a in 0..accounts {
                let id = format!("p{a}");
                let nets: Vec<(IpNet, Option<String>)> = (0..entries)
                    .map(|e| (IpNet::from(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + a * entries + e))), None))
                    .collect();
                tx.add_account(&id, None, AccountState::Active, Mode::Enforce, 0).unwrap();
                tx.replace_entries(&id, &nets, 0, 0).unwrap();
                uses.insert((id, nets[0].0), 100);
            }
            tx.commit().unwrap();
        }
        (dir, writer, uses)
    }

    /// A log on `writer` that runs `before(n)` ahead of its `n`th write (from 0); an error
    /// from it fails that write. Also returns the count of writes.
    fn log_with(
        writer: &Arc<Mutex<Store>>,
        mut before: impl FnMut(u64) -> Result<(), StoreError> + Send + 'static,
    ) -> (ActivityLog, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicU64::new(0));
        let mut shared = shared_access(writer, |s| s);
        let counted = calls.clone();
        let log = ActivityLog::start(Box::new(move |write| {
            before(counted.fetch_add(1, Ordering::Relaxed))?;
            shared(write)
        }));
        (log, calls)
    }

    /// Many rows are written a part at a time (each part takes the writer lock on its own,
    /// so a change waits for one part, not for them all), and every row arrives.
    #[test]
    fn a_large_write_is_made_in_parts_and_loses_nothing() {
        let (_dir, writer, uses) = many_accounts(5_000, 1);
        let (log, parts) = log_with(&writer, |_| Ok(()));
        log.signin(signin("a1", 1_000));
        log.packets(uses.clone(), EntryUses::new());
        log.flush();
        // 5,001 rows: the sign-in and 5,000 last packets.
        let parts = parts.load(Ordering::Relaxed);
        assert!(parts > 2, "in parts: {parts}");
        assert_eq!(parts, 5_001u64.div_ceil(Pending::ROWS_PER_WRITE as u64));
        let mut store = writer.lock().unwrap();
        let tx = store.read().unwrap();
        assert_eq!(tx.recent_signins("a1", 0).unwrap().len(), 1);
        for (account, net) in uses.keys() {
            let entries = tx.entries_with_use(account).unwrap();
            assert_eq!(entries.len(), 1);
            assert_eq!(entries[0].cidr, *net);
            assert_eq!(entries[0].last_packet_at, Some(100), "{account}'s last packet");
        }
    }

    /// A part that fails is kept and written by the next write, and the parts written
    /// before it are not written again: every count once.
    #[test]
    fn a_failed_part_is_written_later_and_nothing_twice() {
        let (_dir, writer, uses) = many_accounts(3_000, 1);
        let (log, _) = log_with(&writer, |n| match n {
            1 => Err(StoreError::Io(std::io::Error::other("the disk is briefly away"))),
            _ => Ok(()),
        });
        // A part's worth of sign-ins fills the first part; last packets come in the second (fails).
        for n in 0..Pending::ROWS_PER_WRITE as i64 {
            log.signin(Signin { uid: n as u32, ..signin("a1", 1_000) });
        }
        log.packets(uses.clone(), EntryUses::new());
        log.flush();
        log.flush();
        let mut store = writer.lock().unwrap();
        let tx = store.read().unwrap();
        let counted: i64 = tx.signin_summary("a1", 0, false, 1_000).unwrap().iter().map(|s| s.count).sum();
        assert_eq!(counted, Pending::ROWS_PER_WRITE as i64, "each sign-in counted once");
        for (account, _) in uses.keys() {
            assert_eq!(tx.entries_with_use(account).unwrap()[0].last_packet_at, Some(100), "{account}");
        }
    }

    /// A write in parts takes each table's rows in the order of its key: every part is a run
    /// of accounts the next parts do not reach back into, so no page of the hour's rows is
    /// written by two parts.
    #[test]
    fn each_part_of_a_write_is_a_run_of_accounts() {
        let shared = Shared::default();
        {
            let mut checks = shared.checks.lock().unwrap();
            // Counted in an order unlike the accounts' own.
            for n in 0..3_000u32 {
                let a = n * 7_919 % 3_000;
                let entry = Some(IpNet::from(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + n))));
                assert!(checks.add(Signin { entry, ..signin(&format!("a{a:04}"), 7_200) }, usize::MAX));
            }
        }
        let mut pending = Pending::default();
        pending.take_checks(&shared);
        // Per table, the first and last account of each part, in the order written.
        let (mut signins, mut entry_uses) = (Vec::new(), Vec::new());
        let mut runs = Runs::new(pending, Pending::ROWS_PER_WRITE);
        while runs.rows > 0 {
            let part = runs.next_part(Pending::ROWS_PER_WRITE);
            let span =
                |accounts: Vec<&String>| Some((accounts.iter().min()?.to_string(), accounts.iter().max()?.to_string()));
            signins.extend(span(part.signins.keys().map(|k| &k.account).collect()));
            entry_uses.extend(span(part.entry_signins.keys().map(|(account, _)| account).collect()));
        }
        for (table, parts) in [("sign-ins", signins), ("last uses", entry_uses)] {
            assert!(parts.len() >= 2, "{table}: {parts:?}");
            for pair in parts.windows(2) {
                assert!(pair[0].1 < pair[1].0, "{table}: a part reaches back before the last: {pair:?}");
            }
        }
    }

    /// A backlog is sorted once and cut into runs: as many comparisons as a sort needs,
    /// where choosing each part among all the rows left needed a pass over them per part
    /// (at 131,072 rows, 2.3 million comparisons against 17 million).
    #[test]
    fn a_large_backlog_is_cut_into_parts_with_one_sort() {
        let rows: HashMap<u32, ()> = (0..131_072u32).map(|n| (n.wrapping_mul(2_654_435_761), ())).collect();
        let n = rows.len() as u64;
        let comparisons = std::cell::Cell::new(0u64);
        let mut sorted = in_key_order(rows, true, |a, b| {
            comparisons.set(comparisons.get() + 1);
            a.cmp(b)
        });
        let (mut parts, mut last_part_end) = (0, None);
        while !sorted.is_empty() {
            let mut left = Pending::ROWS_PER_WRITE;
            let part = take_run(&mut sorted, &mut left);
            let (first, last) = (part.keys().min().copied(), part.keys().max().copied());
            assert!(last_part_end < first, "part {parts} reaches back before the last one");
            assert_eq!(part.len() + left, Pending::ROWS_PER_WRITE);
            last_part_end = last;
            parts += 1;
        }
        assert_eq!(parts, n.div_ceil(Pending::ROWS_PER_WRITE as u64));
        let bound = 2 * n * n.ilog2() as u64;
        assert!(comparisons.get() <= bound, "{} comparisons for {n} rows (at most {bound})", comparisons.get());
    }

    /// Writes that keep failing: what is kept is bounded, and last uses are let go before
    /// counts of sign-ins.
    #[test]
    fn a_store_that_keeps_failing_loses_last_uses_before_counts() {
        let shared = Shared::default();
        {
            let mut checks = shared.checks.lock().unwrap();
            for uid in 0..10 {
                assert!(checks.add(Signin { uid, ..signin("a1", 1_000) }, usize::MAX));
            }
        }
        let mut pending = Pending::default();
        pending.take_checks(&shared);
        for a in 0..100u32 {
            let net = IpNet::from(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + a)));
            pending.entry_packets.insert((format!("p{a}"), net), 100);
        }
        let error = StoreError::Io(std::io::Error::other("the disk is away"));
        pending.keep_at_most(200, &shared, &error);
        assert_eq!((pending.signins.len(), pending.entry_packets.len()), (10, 100), "under the limit: all kept");
        pending.keep_at_most(50, &shared, &error);
        assert_eq!((pending.signins.len(), pending.entry_packets.len()), (10, 0), "last uses go first");
        assert!(shared.in_flight.lock().unwrap().contains("a1"), "a1's counts still wait to be written");
        pending.keep_at_most(5, &shared, &error);
        assert_eq!(pending.len(), 0);
        assert!(shared.in_flight.lock().unwrap().is_empty(), "nothing left to wait for");
    }

    /// A change waits for the log only when its own account's sign-ins are among what the
    /// log has not written: not for a long write of other rows.
    #[test]
    fn a_change_waits_only_for_its_own_accounts_sign_ins() {
        let (_dir, writer, uses) = many_accounts(3_000, 1);
        let (entered, in_write) = mpsc::channel::<()>();
        let (release, gate) = mpsc::channel::<()>();
        let (log, _) = log_with(&writer, move |n| {
            if n == 0 {
                entered.send(()).unwrap();
                gate.recv_timeout(Duration::from_secs(30)).unwrap();
            }
            Ok(())
        });
        let log = Arc::new(log);
        log.signin(signin("a1", 1_000));
        log.packets(uses, EntryUses::new());
        let flushing = {
            let log = log.clone();
            thread::spawn(move || log.flush())
        };
        in_write.recv_timeout(Duration::from_secs(10)).expect("the log starts writing");
        // The log is held in its first part, which holds a1's sign-in.
        let finished = |account: &'static str| {
            let (done, finished) = mpsc::channel();
            let log = log.clone();
            thread::spawn(move || {
                log.flush_account(account);
                done.send(()).unwrap();
            });
            finished
        };
        let other = finished("a2");
        assert!(other.recv_timeout(Duration::from_secs(5)).is_ok(), "a2 has no sign-in in the write: no wait");
        let own = finished("a1");
        assert!(own.recv_timeout(Duration::from_millis(300)).is_err(), "a1's sign-in is not written yet");
        release.send(()).unwrap();
        assert!(own.recv_timeout(Duration::from_secs(10)).is_ok(), "a1 waits until its sign-in is written");
        flushing.join().unwrap();
        let mut store = writer.lock().unwrap();
        assert_eq!(store.read().unwrap().recent_signins("a1", 0).unwrap().len(), 1);
    }

    /// Not a check: how long a change waits for the writer lock while the log writes the
    /// last packets of 100,000 entries (a second's worth on a host where that many are in
    /// use), on a store of 100,000 accounts x 10 entries. A change is tried every 2 ms
    /// meanwhile. `cargo test --release -p ipaccess --lib -- --ignored --nocapture
    /// change_waits_during_a_large_write`.
    #[test]
    #[ignore = "a measurement, about a minute"]
    fn change_waits_during_a_large_write() {
        let (_dir, writer, uses) = many_accounts(100_000, 10);
        for round in 0..3 {
            let log = ActivityLog::start(shared_access(&writer, |s| s));
            let fresh: EntryUses = uses.iter().map(|(k, &t)| (k.clone(), t + round)).collect();
            let started = Instant::now();
            log.packets(fresh, EntryUses::new());
            let flushing = thread::spawn(move || log.flush());
            let mut waits = Vec::new();
            while !flushing.is_finished() {
                let asked = Instant::now();
                drop(writer.lock().unwrap());
                waits.push(asked.elapsed().as_micros() as u64);
                thread::sleep(Duration::from_millis(2));
            }
            let took = started.elapsed();
            waits.sort_unstable();
            println!(
                "100,000 rows written in {took:?}; {} changes tried meanwhile waited p50 {} µs, p99 {} µs, max {} µs",
                waits.len(),
                waits[waits.len() / 2],
                waits[waits.len() * 99 / 100],
                waits[waits.len() - 1]
            );
        }
    }

    /// Not a check: what the first change after one of the log's commits costs, on a store
    /// the size of the control bench's (100,000 accounts x 10 entries), with the log on the
    /// writer's connection and on one of its own. Thread CPU time of `BEGIN`, the change's
    /// SQL and its audit record (not the commit's disk flush), so a busy machine's
    /// scheduling does not count. `cargo test --release -p ipaccess --lib -- --ignored
    /// --nocapture first_change_after_a_log_commit`.
    #[test]
    #[ignore = "a measurement, about a minute"]
    fn first_change_after_a_log_commit() {
        use rustix::time::{ClockId, clock_gettime};
        const ACCOUNTS: usize = 100_000;
        const ROUNDS: usize = 400;
        let dir = tempfile::Builder::new().prefix("ipaccess-activity-").tempdir().unwrap();
        let path = dir.path().join("ipaccess.db");
        let mut store = Store::open(&path).unwrap();
        store.without_autocheckpoint().unwrap();
        let tx = store.transaction().unwrap();
        for a in 0..ACCOUNTS {
            let id = format!("acct{a}");
            tx.add_account(&id, None, AccountState::Active, Mode::Enforce, 0).unwrap();
            let entries: Vec<(IpNet, Option<String>)> = (0..10u32)
                .map(|e| (IpNet::from(IpAddr::V4(Ipv4Addr::from(0xc612_0000 + (a as u32) * 10 + e))), None))
                .collect();
            tx.replace_entries(&id, &entries, 0, 0).unwrap();
        }
        tx.commit().unwrap();
        let writer = Arc::new(Mutex::new(store));
        let cpu = || {
            let t = clock_gettime(ClockId::ThreadCPUTime);
            t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
        };
        let measure = |log: &ActivityLog, round0: usize| {
            let mut costs = Vec::with_capacity(ROUNDS);
            for r in 0..ROUNDS {
                let n = round0 + r;
                log.signin(signin(&format!("acct{}", (n * 7919) % ACCOUNTS), n as i64));
                log.flush();
                let account = format!("acct{}", (n * 104_729) % ACCOUNTS);
                let cidr = IpNet::from(IpAddr::V4(Ipv4Addr::from(0xc613_0000 + n as u32)));
                let mut store = writer.lock().unwrap();
                let started = cpu();
                let tx = store.transaction().unwrap();
                tx.add_entry(&account, cidr, None, 0, n as i64).unwrap();
                tx.add_audit(n as i64, &account, "allow_add", "{}").unwrap();
                costs.push(cpu() - started);
                tx.commit().unwrap();
            }
            costs.sort_by(f64::total_cmp);
            (costs[ROUNDS / 2], costs[ROUNDS * 9 / 10], costs[ROUNDS * 99 / 100])
        };
        // A log on a connection of its own, as the daemon had it before.
        let on_its_own_connection = || {
            let mut own = Store::open(&path).unwrap();
            own.without_autocheckpoint().unwrap();
            ActivityLog::start(Box::new(move |write| write(&mut own)))
        };
        for round in 0..2 {
            let shared = ActivityLog::start(shared_access(&writer, |s| s));
            let (p50, p90, p99) = measure(&shared, round * 3 * ROUNDS);
            println!(
                "log on the writer's connection: BEGIN + SQL, thread CPU µs p50 {p50:.0} p90 {p90:.0} p99 {p99:.0}"
            );
            drop(shared);
            let separate = on_its_own_connection();
            let (p50, p90, p99) = measure(&separate, (round * 3 + 1) * ROUNDS);
            println!(
                "log on a connection of its own: BEGIN + SQL, thread CPU µs p50 {p50:.0} p90 {p90:.0} p99 {p99:.0}"
            );
            drop(separate);
            // Candidate not taken: the pages read again come from a mapping of the database
            // file (pages still in the WAL are read as before).
            writer.lock().unwrap().set_mmap_size(1 << 30);
            let separate = on_its_own_connection();
            let (p50, p90, p99) = measure(&separate, (round * 3 + 2) * ROUNDS);
            println!(
                "the same, writer with mmap_size 1 GiB:  BEGIN + SQL, thread CPU µs p50 {p50:.0} p90 {p90:.0} p99 {p99:.0}"
            );
            writer.lock().unwrap().set_mmap_size(0);
        }
    }
}
