//! The daemon's embedded transactional store: accounts, allowlist entries and bindings in
//! SQLite.
//!
//! Every read and write goes through a [`Tx`]; a change counts only once [`Tx::commit`]
//! returns, and by then it is on disk (`synchronous=FULL`). Dropping a `Tx` rolls it back.
//! Values are stored as text in canonical form (CIDRs truncated to their network, enums by
//! their snake_case names) so that equal values compare equal in SQL.

use std::cell::RefCell;
use std::collections::hash_map;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

mod attempts;
mod cluster;
mod sets;
mod signins;

pub use attempts::DeniedTally;
pub use cluster::{AccountDoc, EntryDoc, Marks, OverrideDoc, SetDoc, SetEntryDoc, SetRefDoc};
use ipnet::IpNet;
use rusqlite::{Connection, OptionalExtension, Params, Row, TransactionBehavior};
pub use sets::{SetRefRow, SetRow, SignedInThroughSet};
pub use signins::LastSignin;

use crate::protocol::{
    Account, AccountState, ActivityKind, ActivityRow, Binding, DeniedSummary, Entry, Method, Mode, Override, Proto,
    Reason, RecentSignin, SigninSummary, UnknownSummary,
};

/// Schema migrations; `PRAGMA user_version` counts how many have been applied.
const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE accounts (
        id TEXT PRIMARY KEY,
        slot INTEGER NOT NULL UNIQUE,
        parent TEXT REFERENCES accounts(id),
        state TEXT NOT NULL,
        mode TEXT NOT NULL,
        state_reason TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE allow_entries (
        account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        cidr TEXT NOT NULL,
        label TEXT,
        created_at INTEGER NOT NULL,
        created_by INTEGER NOT NULL,
        PRIMARY KEY (account, cidr)
    );
    -- A whole-address binding has proto '' and port 0.
    CREATE TABLE bindings (
        addr TEXT NOT NULL,
        proto TEXT NOT NULL,
        port INTEGER NOT NULL,
        account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (addr, proto, port)
    );
    CREATE INDEX bindings_account ON bindings(account);",
    // v2: support's time-limited overrides, and the activity log (login checks, audited
    // changes, sampled drops).
    "CREATE TABLE overrides (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        cidr TEXT NOT NULL,
        ticket TEXT NOT NULL,
        reason TEXT NOT NULL,
        operator INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked_at INTEGER
    );
    CREATE INDEX overrides_account ON overrides(account);
    CREATE TABLE activity (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        account TEXT NOT NULL,
        kind TEXT NOT NULL,
        address TEXT,
        method TEXT,
        allowed INTEGER,
        reason TEXT,
        detail TEXT
    );
    CREATE INDEX activity_account_time ON activity(account, time);",
    // v3: a change to a parent reaches its sub-users (banning cascades); find them by index.
    "CREATE INDEX accounts_parent ON accounts(parent);",
    // v4: an entry can be disabled: kept and listed, but it lets nothing in.
    "ALTER TABLE allow_entries ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1;
    -- The sweep audits each override's expiry once, even one that ended while the daemon
    -- was stopped; those that ended before this version are not audited again.
    ALTER TABLE overrides ADD COLUMN expiry_audited INTEGER NOT NULL DEFAULT 0;
    UPDATE overrides SET expiry_audited = 1 WHERE revoked_at IS NOT NULL OR expires_at <= unixepoch();",
    // v5: login checks and drops are counted per hour instead of stored one row each (a
    // busy account wrote millions of rows a day); checks for accounts that do not exist
    // are counted per address, without the names tried. `activity` keeps the audit records.
    // The address '*' counts what came beyond an hour's cap of rows (see `SIGNIN_ROWS`).
    // A uid of -1 marks checks recorded before uids were.
    "CREATE TABLE signins (
        account TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        address TEXT NOT NULL,
        method TEXT NOT NULL,
        reason TEXT NOT NULL,
        uid INTEGER NOT NULL,
        application INTEGER NOT NULL,
        allowed INTEGER NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (account, bucket, address, method, reason, uid, application)
    ) WITHOUT ROWID;
    CREATE INDEX signins_last_seen ON signins(last_seen);
    CREATE TABLE drops (
        account TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        source TEXT NOT NULL,
        destination TEXT NOT NULL,
        protocol INTEGER NOT NULL,
        port INTEGER NOT NULL,
        reason TEXT NOT NULL,
        allowed INTEGER NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (account, bucket, source, destination, protocol, port, reason)
    ) WITHOUT ROWID;
    CREATE INDEX drops_last_seen ON drops(last_seen);
    CREATE TABLE unknown_signins (
        bucket INTEGER NOT NULL,
        address TEXT NOT NULL,
        method TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (bucket, address, method)
    ) WITHOUT ROWID;
    CREATE INDEX unknown_signins_last_seen ON unknown_signins(last_seen);
    INSERT INTO signins
        SELECT account, bucket, address, method, reason, -1, 1, allowed, COUNT(*), MIN(time), MAX(time)
        FROM (SELECT account, time - time % 3600 AS bucket, COALESCE(address, '*') AS address,
                     COALESCE(method, 'password') AS method, COALESCE(reason, '') AS reason,
                     COALESCE(allowed, 0) AS allowed, time
              FROM activity WHERE kind = 'check' AND reason IS NOT 'unknown_account')
        GROUP BY account, bucket, address, method, reason;
    INSERT INTO unknown_signins
        SELECT bucket, address, method, COUNT(*), MIN(time), MAX(time)
        FROM (SELECT time - time % 3600 AS bucket, COALESCE(address, '*') AS address,
                     COALESCE(method, 'password') AS method, time
              FROM activity WHERE kind = 'check' AND reason = 'unknown_account')
        GROUP BY bucket, address, method;
    INSERT INTO drops
        SELECT account, bucket, source, destination, protocol, port, reason, allowed, COUNT(*), MIN(time), MAX(time)
        FROM (SELECT account, time - time % 3600 AS bucket, COALESCE(address, '*') AS source,
                     COALESCE(json_extract(detail, '$.destination'), '*') AS destination,
                     COALESCE(json_extract(detail, '$.protocol'), 0) AS protocol,
                     COALESCE(json_extract(detail, '$.port'), 0) AS port, COALESCE(reason, '') AS reason,
                     COALESCE(allowed, 0) AS allowed, time
              FROM activity WHERE kind = 'drop' AND json_valid(detail))
        GROUP BY account, bucket, source, destination, protocol, port, reason;
    DELETE FROM activity WHERE kind <> 'audit';",
    // v6: audit records without AUTOINCREMENT, which updated `sqlite_sequence` (one more
    // page in every change's commit, and a row per imported account). A new id is then the
    // largest plus one, so it can repeat only once every row above it was pruned: ids are
    // never shown, and they still order the rows that remain.
    "CREATE TABLE activity_v6 (
        id INTEGER PRIMARY KEY,
        time INTEGER NOT NULL,
        account TEXT NOT NULL,
        kind TEXT NOT NULL,
        address TEXT,
        method TEXT,
        allowed INTEGER,
        reason TEXT,
        detail TEXT
    );
    INSERT INTO activity_v6 (id, time, account, kind, address, method, allowed, reason, detail)
        SELECT id, time, account, kind, address, method, allowed, reason, detail FROM activity ORDER BY id;
    DROP TABLE activity;
    ALTER TABLE activity_v6 RENAME TO activity;
    CREATE INDEX activity_account_time ON activity(account, time);
    DELETE FROM sqlite_sequence WHERE name = 'activity';",
    // v7: a fleet node's local copy records the etcd revision it has applied.
    "CREATE TABLE cluster (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    // v8: in a fleet, a binding can be scoped to one node; the local copy keeps every node's
    // so that any node lists the fleet's bindings. '' is fleet-wide (not NULL: NULLs never
    // collide in a key, so two fleet-wide rows of one endpoint would both be taken).
    "CREATE TABLE bindings_v8 (
        addr TEXT NOT NULL,
        proto TEXT NOT NULL,
        port INTEGER NOT NULL,
        node TEXT NOT NULL DEFAULT '',
        account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (addr, proto, port, node)
    );
    INSERT INTO bindings_v8 (addr, proto, port, node, account, created_at)
        SELECT addr, proto, port, '', account, created_at FROM bindings;
    DROP TABLE bindings;
    ALTER TABLE bindings_v8 RENAME TO bindings;
    CREATE INDEX bindings_account ON bindings(account);",
    // v9: last-used evidence of allowlist entries, node-local (a fleet node keeps its own):
    // the last sign-in each entry let through and the last packet, unix seconds. Not a
    // foreign key of allow_entries: the activity log may write a use of an entry just
    // removed (it is ignored, being older than the entry if added again; since v12 the
    // entry's removal deletes the row it had).
    "CREATE TABLE entry_use (
        account TEXT NOT NULL,
        cidr TEXT NOT NULL,
        last_signin INTEGER,
        last_packet INTEGER,
        PRIMARY KEY (account, cidr)
    ) WITHOUT ROWID;",
    // v10: an entry can expire (unix s; NULL never), and the sweep audits each expiry once.
    // The sweep looks for those due under the writer lock every ten seconds: the partial
    // index holds only the entries still to audit, where a scan read every entry (a
    // million at 100,000 accounts).
    "ALTER TABLE allow_entries ADD COLUMN expires_at INTEGER;
    ALTER TABLE allow_entries ADD COLUMN expiry_audited INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX allow_entries_expiring ON allow_entries(expires_at)
        WHERE expires_at IS NOT NULL AND expiry_audited = 0;",
    // v11: shared named sets (a company VPN, a CI provider's ranges), defined once and
    // referenced by any number of accounts. `kernel_id` is the set's key in the kernel's
    // set tables (node-local, reused once freed). A reference holds its set: deleting a
    // referenced set fails here unless its references go first (`set_delete --force`).
    "CREATE TABLE sets (
        name TEXT PRIMARY KEY,
        kernel_id INTEGER NOT NULL UNIQUE,
        created_at INTEGER NOT NULL,
        created_by INTEGER NOT NULL
    );
    CREATE TABLE set_entries (
        set_name TEXT NOT NULL REFERENCES sets(name) ON DELETE CASCADE,
        cidr TEXT NOT NULL,
        label TEXT,
        created_at INTEGER NOT NULL,
        created_by INTEGER NOT NULL,
        PRIMARY KEY (set_name, cidr)
    ) WITHOUT ROWID;
    CREATE TABLE set_refs (
        account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
        set_name TEXT NOT NULL REFERENCES sets(name),
        enabled INTEGER NOT NULL DEFAULT 1,
        created_at INTEGER NOT NULL,
        created_by INTEGER NOT NULL,
        PRIMARY KEY (account, set_name)
    ) WITHOUT ROWID;
    CREATE INDEX set_refs_set ON set_refs(set_name, account);
    -- Node-local, as entry_use: when each network of a set last let a packet through (to any
    -- account referencing it; the kernel stamps a set's key once for all of them).
    CREATE TABLE set_entry_use (
        set_name TEXT NOT NULL,
        cidr TEXT NOT NULL,
        last_packet INTEGER,
        last_signin INTEGER,
        PRIMARY KEY (set_name, cidr)
    ) WITHOUT ROWID;",
    // v12: a removed network's last uses go with it, whichever way it is removed (each is a
    // DELETE of its row), so a network added again starts with none. Kept beside it, a use
    // of the new entry within a minute of the old one's was not written
    // (USE_RESOLUTION_SECONDS), and the new entry showed no use meanwhile. A fleet node that
    // missed the removal sees the network again with a new creation time: the same.
    "DELETE FROM entry_use WHERE NOT EXISTS
        (SELECT 1 FROM allow_entries e WHERE e.account = entry_use.account AND e.cidr = entry_use.cidr);
    CREATE TRIGGER allow_entries_uses_go AFTER DELETE ON allow_entries BEGIN
        DELETE FROM entry_use WHERE account = OLD.account AND cidr = OLD.cidr;
    END;
    CREATE TRIGGER allow_entries_uses_go_when_recreated AFTER UPDATE OF created_at ON allow_entries
        WHEN NEW.created_at IS NOT OLD.created_at BEGIN
        DELETE FROM entry_use WHERE account = OLD.account AND cidr = OLD.cidr;
    END;
    DELETE FROM set_entry_use WHERE NOT EXISTS
        (SELECT 1 FROM set_entries e WHERE e.set_name = set_entry_use.set_name AND e.cidr = set_entry_use.cidr);
    CREATE TRIGGER set_entries_uses_go AFTER DELETE ON set_entries BEGIN
        DELETE FROM set_entry_use WHERE set_name = OLD.set_name AND cidr = OLD.cidr;
    END;
    CREATE TRIGGER set_entries_uses_go_when_recreated AFTER UPDATE OF created_at ON set_entries
        WHEN NEW.created_at IS NOT OLD.created_at BEGIN
        DELETE FROM set_entry_use WHERE set_name = OLD.set_name AND cidr = OLD.cidr;
    END;",
    // v13: sign-ins and drops are keyed by hour first, then account. The activity log
    // rewrites the current hour's rows of every account seen in the last second, every
    // second; keyed by account first, each lay beside its account's earlier hours, so a write
    // of N accounts' counts dirtied about N pages (with eight hours of history, 299 pages for
    // 2,048 accounts; 61 now). Now they lie together. Reads by account go through the new
    // indexes, whose keys a count's update does not change. (The two tables' texts are alike
    // and stay apart: a migration's text never changes once released.)
    "CREATE TABLE signins_v13 (
        account TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        address TEXT NOT NULL,
        method TEXT NOT NULL,
        reason TEXT NOT NULL,
        uid INTEGER NOT NULL,
        application INTEGER NOT NULL,
        allowed INTEGER NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (bucket, account, address, method, reason, uid, application)
    ) WITHOUT ROWID;
    INSERT INTO signins_v13 (account, bucket, address, method, reason, uid, application, allowed, count,
                             first_seen, last_seen)
        SELECT account, bucket, address, method, reason, uid, application, allowed, count, first_seen, last_seen
        FROM signins;
    DROP TABLE signins;
    ALTER TABLE signins_v13 RENAME TO signins;
    CREATE INDEX signins_last_seen ON signins(last_seen);
    CREATE INDEX signins_account ON signins(account, bucket);
    CREATE TABLE drops_v13 (
        account TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        source TEXT NOT NULL,
        destination TEXT NOT NULL,
        protocol INTEGER NOT NULL,
        port INTEGER NOT NULL,
        reason TEXT NOT NULL,
        allowed INTEGER NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY (bucket, account, source, destination, protocol, port, reason)
    ) WITHOUT ROWID;
    INSERT INTO drops_v13 (account, bucket, source, destination, protocol, port, reason, allowed, count,
                           first_seen, last_seen)
        SELECT account, bucket, source, destination, protocol, port, reason, allowed, count, first_seen, last_seen
        FROM drops;
    DROP TABLE drops;
    ALTER TABLE drops_v13 RENAME TO drops;
    CREATE INDEX drops_last_seen ON drops(last_seen);
    CREATE INDEX drops_account ON drops(account, bucket);",
];

/// Entries whose end is due and not audited yet (by `allow_entries_expiring`, migration v10).
const DUE_ENTRY_EXPIRIES: &str = "SELECT account, cidr, label, created_at, created_by, enabled, expires_at
    FROM allow_entries WHERE expires_at <= ?1 AND expiry_audited = 0 LIMIT 1000";

/// Rows of sign-ins one account may add in one hour; further addresses are counted together
/// under the address `*` (one row per method, reason and kind of caller). With the same
/// caps for drops and a shared one for unknown accounts, a flood of invented addresses
/// cannot grow the store without bound.
pub const SIGNIN_ROWS: i64 = 256;

/// Last uses (an entry's or a set network's last sign-in and last packet) are kept to this
/// many seconds: a use less than this after the one stored is not written. An entry in use
/// every second then costs one write a minute rather than sixty; written every second, the
/// last packets of 100,000 entries in use dirtied most of the store's pages each second
/// (about 2 µs a row, 200 ms a second). The time shown is then up to this much earlier
/// than the last use; `allow list --unused` counts in days.
pub const USE_RESOLUTION_SECONDS: i64 = 60;

/// Where a last use is recorded: an account's entry or a shared set's network.
#[derive(Clone, Copy)]
pub(crate) enum UseTable {
    Entries,
    Sets,
}

/// Which last use: a sign-in (a check) or a packet (the kernel's stamp).
#[derive(Clone, Copy)]
pub(crate) enum UseColumn {
    Signin,
    Packet,
}
/// Rows of drops (source, destination endpoint, reason) one account may add in one hour.
pub const DROP_ROWS: i64 = 256;
/// Rows of checks for unknown accounts (address, method) per hour, over all names.
pub const UNKNOWN_ROWS: i64 = 1024;
/// Sign-ins and drops are counted per hour. A row's hour starts less than an hour before
/// its last count, so the reads of one account's rows since `?2` also ask for
/// `bucket > ?2 - 3600`: the account's index then skips the older hours.
pub const BUCKET_SECONDS: i64 = 3600;
// The reads' SQL spells the bucket's width as the literal 3600.
const _: () = assert!(BUCKET_SECONDS == 3600, "the reads' `bucket > ?2 - 3600` must change too");
/// The address under which what exceeds an hour's cap is counted.
pub const OTHER_ADDRESSES: &str = "*";

/// How long to wait for another connection's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes `conn` wait up to [`BUSY_TIMEOUT`] for another connection's lock, looking again
/// every 50 µs for the first 5 ms. SQLite's own wait sleeps a whole millisecond first, then
/// longer, while the other connection holds the lock for a commit of a few hundred
/// microseconds: a change that met one would wait 1 ms or more. (Inside the daemon every
/// write goes through the one writer connection, the activity log's too; another process
/// writing to the store meets this.)
fn wait_when_busy(conn: &mut Connection) -> Result<(), StoreError> {
    let mut waiting_since = Instant::now();
    conn.busy_handler(Some(move |tries: i32| {
        if tries == 0 {
            waiting_since = Instant::now();
        }
        let waited = waiting_since.elapsed();
        if waited >= BUSY_TIMEOUT {
            return false;
        }
        let pause =
            if waited < Duration::from_millis(5) { Duration::from_micros(50) } else { Duration::from_millis(1) };
        std::thread::sleep(pause);
        true
    }))?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("account {0:?} already exists; choose another id")]
    AccountExists(String),
    #[error("there is no account {0:?}; create it first or check the spelling")]
    UnknownAccount(String),
    #[error("the parent account {0:?} does not exist; create it first")]
    UnknownParent(String),
    #[error("{cidr} is already on the allowlist of account {account:?}")]
    EntryExists { account: String, cidr: IpNet },
    #[error("{endpoint} is already bound to account {owner:?}; remove that binding first")]
    BindingExists { endpoint: String, owner: String },
    /// An endpoint is bound either fleet-wide or on some nodes, never both: which would
    /// a node named in both enforce?
    #[error(
        "{endpoint} is bound to account {owner:?} {held}; binding it {wanted} as well would be ambiguous: remove \
         that binding first"
    )]
    BindingScope { endpoint: String, owner: String, held: String, wanted: String },
    #[error("{parent:?} is itself a sub-user of {grandparent:?}; a sub-user cannot have sub-users")]
    NestedParent { parent: String, grandparent: String },
    #[error("the store holds data this daemon cannot read ({0}); restore a backup or upgrade")]
    Corrupt(String),
    #[error("storage error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot prepare the store's directory: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the store {} was deleted or replaced while ipaccessd ran: until it is back, changes are refused (a restart \
         would not find them) and reads may fail; the kernel keeps enforcing the policy it has. Put the file back, or \
         restart ipaccessd, which checks the store it finds against what the kernel enforces",
        .0.display()
    )]
    Gone(std::path::PathBuf),
}

/// An audit record: one change, with the uid that made it, written in the change's own
/// transaction. A fleet stores it in etcd as this JSON.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ActivityRecord {
    pub time: i64,
    pub account: String,
    pub uid: u32,
    /// What was done (`mode`, `allow_add`, `override_granted`...).
    pub action: String,
    pub detail: serde_json::Value,
}

/// How many times something was seen, and when first and last.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tally {
    pub count: i64,
    pub first_seen: i64,
    pub last_seen: i64,
}

impl Tally {
    pub fn new(count: i64, at: i64) -> Tally {
        Tally { count, first_seen: at, last_seen: at }
    }

    pub fn add(&mut self, other: Tally) {
        self.count += other.count;
        self.first_seen = self.first_seen.min(other.first_seen);
        self.last_seen = self.last_seen.max(other.last_seen);
    }
}

/// The hour `time` falls in (its first second).
pub fn bucket(time: i64) -> i64 {
    time - time.rem_euclid(BUCKET_SECONDS)
}

/// Login checks of an existing account counted together: one hour, one address, method and
/// outcome, one caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SigninKey {
    pub account: String,
    pub bucket: i64,
    pub address: IpAddr,
    pub method: Method,
    pub reason: Reason,
    pub uid: u32,
    /// Made by an application (a caller with the check role): the customer's own attempt.
    pub application: bool,
}

/// Checks for an account that does not exist, counted per hour, address and method; the
/// names tried are not kept.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UnknownKey {
    pub bucket: i64,
    pub address: IpAddr,
    pub method: Method,
}

/// Packets the kernel refused (or would refuse, in monitor mode) counted together: one
/// hour, one source, one destination endpoint, one reason.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub account: String,
    pub bucket: i64,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub protocol: u8,
    pub port: u16,
    /// `address_not_allowed`, `monitor_would_deny` (passed), `suspended`...
    pub reason: &'static str,
}

pub struct Store {
    conn: Connection,
    /// The database file the writer opened (device and inode), to refuse changes once its
    /// path names another file or none; None for readers.
    file: Option<(u64, u64)>,
}

impl Store {
    /// Opens the store at `path`, creating it (and its directory) and the schema as needed.
    /// The store names
    /// every account and its addresses, so it is private whatever the umask: a directory it
    /// creates is 0700, the database 0600, and SQLite gives its -wal and -shm files the
    /// database's mode. An existing file open to others is tightened, with a warning.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e.into()),
            _ => {}
        }
        for file in [path.to_path_buf(), Store::sibling(path, "-wal"), Store::sibling(path, "-shm")] {
            Store::make_private(&file)?;
        }
        let mut conn = Connection::open(path)?;
        wait_when_busy(&mut conn)?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt(format!("journal mode stays {mode:?}, not wal")));
        }
        // FULL makes a commit durable in WAL mode too; NORMAL could lose the last commits.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // A large transaction (an import, a fleet node's first snapshot) keeps its pages in
        // memory until the commit instead of spilling them into the WAL half-way and
        // writing them again: up to 64 MiB, taken only as a transaction grows.
        conn.pragma_update(None, "cache_size", -65536)?;
        // Every statement the daemon runs stays prepared (there are about thirty).
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn)?;
        check_references(&conn)?;
        let file = std::fs::metadata(path).map(|found| (found.dev(), found.ino()))?;
        Ok(Store { conn, file: Some(file) })
    }

    /// Makes this connection's commits durable without waiting for the disk
    /// (`synchronous=NORMAL`), for a fleet node's copy of etcd's policy. The change is
    /// durable in etcd's quorum before any node applies it, and the copy records the
    /// revision it reflects in the same transactions: after a power loss the copy may be a
    /// few commits older but is whole and says which revision it is at, and the node takes
    /// up the watch from there. What it saves is one disk flush per event on every node,
    /// which on the acknowledging node was on the change's path. A process crash loses
    /// nothing either way.
    pub fn as_copy_of_a_durable_source(&self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(())
    }

    /// SQLite's `PRAGMA data_version`: it changes when another connection has committed to
    /// the database since this one last asked (in WAL mode such a commit also makes this
    /// connection drop its whole page cache at its next transaction). Its own commits
    /// leave it alone.
    #[cfg(test)]
    pub(crate) fn data_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn.pragma_query_value(None, "data_version", |r| r.get(0))?)
    }

    /// Sets `PRAGMA mmap_size` (for measurements).
    #[cfg(test)]
    pub(crate) fn set_mmap_size(&self, bytes: i64) {
        self.conn.pragma_update(None, "mmap_size", bytes).unwrap();
    }

    /// `PRAGMA synchronous` as a number (1 NORMAL, 2 FULL).
    #[cfg(test)]
    pub(crate) fn synchronous(&self) -> i64 {
        self.conn.pragma_query_value(None, "synchronous", |r| r.get(0)).unwrap()
    }

    /// Runs `f` with this connection's commits durable (`synchronous=FULL`) even if it is
    /// otherwise [a copy of a durable source](Store::as_copy_of_a_durable_source): for what
    /// only this store holds, such as the activity log's counts, on a fleet node too.
    pub fn durably<T>(&mut self, f: impl FnOnce(&mut Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
        const FULL: i64 = 2;
        let level: i64 = self.conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
        if level >= FULL {
            return f(self);
        }
        self.conn.pragma_update(None, "synchronous", FULL)?;
        let result = f(self);
        let restored = self.conn.pragma_update(None, "synchronous", level);
        let result = result?;
        restored?;
        Ok(result)
    }

    /// Starts a write transaction; it takes the write lock at once, so it cannot fail later
    /// for lack of it.
    pub fn transaction(&mut self) -> Result<Tx<'_>, StoreError> {
        self.still_at_its_path()?;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let changes_at_begin = tx.total_changes();
        Ok(Tx { tx, free_slots: RefCell::new(None), changes_at_begin })
    }

    /// A store deleted or moved away while the daemon runs still takes commits, into a file
    /// no restart finds: they would be acknowledged, then lost. One `stat` a change.
    fn still_at_its_path(&self) -> Result<(), StoreError> {
        let Some(opened) = self.file else { return Ok(()) };
        let path = std::path::Path::new(self.conn.path().unwrap_or_default());
        match std::fs::metadata(path) {
            Ok(found) if (found.dev(), found.ino()) == opened => Ok(()),
            _ => Err(StoreError::Gone(path.to_owned())),
        }
    }

    /// Starts a transaction for reading: a consistent snapshot that does not block writers.
    pub fn read(&mut self) -> Result<Tx<'_>, StoreError> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        let changes_at_begin = tx.total_changes();
        Ok(Tx { tx, free_slots: RefCell::new(None), changes_at_begin })
    }

    /// Connections for reading beside this one (see [`Readers`]); at most `max` open at once.
    pub fn readers(&self, max: usize) -> Readers {
        let path = self.conn.path().map(std::path::PathBuf::from).unwrap_or_default();
        Readers { path, max: max.max(1), pool: Mutex::new((Vec::new(), 0)), returned: Condvar::new() }
    }

    /// Leaves checkpoints to a [`Checkpointer`]: otherwise the commit that finds the WAL
    /// past 1,000 pages copies it into the database and syncs it, which made every hundredth
    /// change or so take milliseconds longer (and every batch of an import).
    pub fn without_autocheckpoint(&self) -> Result<(), StoreError> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// Starts checkpointing this store's WAL in the background (see [`Checkpointer`]), and
    /// stops this connection's own commits from doing it.
    pub fn checkpoint_in_background(&mut self) -> Result<Checkpointer, StoreError> {
        // After the pragma: it installs a WAL hook of its own, which would replace ours.
        self.without_autocheckpoint()?;
        let growth = Arc::new(AtomicU64::new(0));
        let counted = growth.clone();
        let mut last_frames = 0;
        self.conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
            let frames = u64::try_from(frames).unwrap_or(0);
            // Fewer frames than after the previous commit: the WAL started over.
            let added = if frames >= last_frames { frames - last_frames } else { frames };
            last_frames = frames;
            counted.fetch_add(added, Ordering::Relaxed);
            Ok(())
        }))?;
        let path = self.conn.path().map(std::path::PathBuf::from).unwrap_or_default();
        let conn = Connection::open(&path)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("checkpoint".into()).spawn(move || {
            // Frames the writer has added in all, and how many of them the database holds.
            let (mut seen, mut copied) = (growth.load(Ordering::Relaxed), 0);
            let (mut changed_at, mut large_since) = (Instant::now(), None);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_POLL) {
                let now = Instant::now();
                let appended = growth.load(Ordering::Relaxed);
                if appended != seen {
                    changed_at = now;
                }
                seen = appended;
                if appended.saturating_sub(copied) < CHECKPOINT_FRAMES {
                    large_since = None;
                    continue;
                }
                let large_since = *large_since.get_or_insert(now);
                let paused = now - changed_at >= CHECKPOINT_WHEN_QUIET;
                if !(paused || now - large_since >= CHECKPOINT_AT_LATEST) {
                    continue;
                }
                // PASSIVE: copies what no reader still needs, and waits for no one. It says
                // how many frames the WAL holds and how many of those it has copied.
                let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                match done {
                    Ok((in_wal, in_database)) => {
                        let left = u64::try_from(in_wal - in_database).unwrap_or(0);
                        copied = growth.load(Ordering::Relaxed).saturating_sub(left);
                    }
                    Err(e) => log::warn!("checkpointing the store's WAL: {e}"),
                }
            }
        })?;
        Ok(Checkpointer { stop: Some(stop), thread: Some(thread) })
    }

    /// A connection that only reads (`query_only`): the schema is the writer's business.
    /// Never creates the file: a store deleted under the daemon must not come back empty.
    fn open_reader(path: &Path) -> Result<Store, StoreError> {
        let flags = rusqlite::OpenFlags::default() - rusqlite::OpenFlags::SQLITE_OPEN_CREATE;
        let mut conn = Connection::open_with_flags(path, flags)?;
        wait_when_busy(&mut conn)?;
        conn.pragma_update(None, "query_only", true)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Store { conn, file: None })
    }

    /// Takes group and other access away from `file`, if it exists and has any.
    fn make_private(file: &Path) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = match std::fs::metadata(file) {
            Ok(meta) => meta.permissions().mode() & 0o7777,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if mode & 0o077 != 0 {
            let private = mode & 0o700;
            log::warn!("{} had mode {mode:04o}, open to other users; setting it to {private:04o}", file.display());
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(private))?;
        }
        Ok(())
    }

    /// `path` with `suffix` appended to its file name (SQLite's `-wal` and `-shm` files).
    pub fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        name.into()
    }

    /// Writes an empty store at `path` as a daemon that knew only the first `version`
    /// migrations left it: for tests of the upgrades, here and against the real daemon.
    #[doc(hidden)]
    pub fn create_at_schema(path: &Path, version: usize) -> Result<(), StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let conn = Connection::open(path)?;
        for sql in &MIGRATIONS[..version] {
            conn.execute_batch(sql)?;
        }
        conn.pragma_update(None, "user_version", version as i64)?;
        Ok(())
    }
}

/// The background checkpointer copies the WAL into the database once this many frames wait
/// in it (SQLite's own default, about 4 MiB)...
const CHECKPOINT_FRAMES: u64 = 1000;
/// ...and writes have paused this long, so that its sync delays no change's own...
const CHECKPOINT_WHEN_QUIET: Duration = Duration::from_millis(250);
/// ...or, while they do not pause, once that many have waited this long.
const CHECKPOINT_AT_LATEST: Duration = Duration::from_secs(10);
/// How often it looks at the WAL.
const CHECKPOINT_POLL: Duration = Duration::from_millis(100);

/// A thread that checkpoints the WAL when it has grown and writes pause (see
/// [`CHECKPOINT_FRAMES`]), on a connection of its own beside the writer: in WAL mode a
/// checkpoint needs no write lock, so changes do not wait for it. Durability does not
/// depend on it (a commit is synced in the WAL).
///
/// A small WAL is left alone on purpose. Once a checkpoint has copied all of it, the next
/// commit starts the WAL over, which costs that commit a second sync (of the WAL's new
/// header). Checkpointing whenever writes paused made the first change after every pause
/// pay it: the changes an operator makes one at a time.
///
/// How the WAL grows it learns from the writer's WAL hook, never by opening the `-shm`
/// file: closing any descriptor of a file drops every POSIX lock the process holds on it,
/// SQLite's own among them. The next process to open the store (an operator's `.backup`)
/// then finds it unused and resets the shared index under the daemon's feet, which killed
/// the daemon (SIGBUS on the truncated mapping) and risks the store.
/// Stopped when dropped; the last connection to close checkpoints what is left.
pub struct Checkpointer {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A small pool of read-only connections to the store. Reads take one and run a DEFERRED
/// transaction on it: in WAL mode that is a consistent snapshot which neither waits for the
/// writer's transaction nor holds it up, so reads need not queue behind changes (or behind
/// each other) for the writer's connection.
pub struct Readers {
    path: std::path::PathBuf,
    max: usize,
    /// The idle connections, and how many are open in all.
    pool: Mutex<(Vec<Store>, usize)>,
    returned: Condvar,
}

impl Readers {
    /// Runs `f` in a read transaction (rolled back afterwards: it changes nothing). Waits for
    /// a connection when `max` are in use.
    pub fn read<T, E: From<StoreError>>(&self, f: impl FnOnce(&Tx) -> Result<T, E>) -> Result<T, E> {
        let mut store = self.take()?;
        let result = store.read().map_err(E::from).and_then(|tx| f(&tx));
        let mut pool = self.pool.lock().expect("readers lock");
        pool.0.push(store);
        self.returned.notify_one();
        result
    }

    fn take(&self) -> Result<Store, StoreError> {
        let mut pool = self.pool.lock().expect("readers lock");
        loop {
            if let Some(store) = pool.0.pop() {
                return Ok(store);
            }
            if pool.1 < self.max {
                pool.1 += 1;
                drop(pool);
                // Opened outside the lock; a failure gives the place back.
                return Store::open_reader(&self.path)
                    .map_err(|e| if self.path.exists() { e } else { StoreError::Gone(self.path.clone()) })
                    .inspect_err(|_| {
                        self.pool.lock().expect("readers lock").1 -= 1;
                        self.returned.notify_one();
                    });
            }
            pool = self.returned.wait(pool).expect("readers lock");
        }
    }
}

/// Refuses a store whose rows name what is not there (a binding or set reference whose
/// account is gone, a parent that does not exist, a set entry without its set) or whose
/// parent links loop. SQLite checks references only as rows are written, so only a store
/// damaged or edited by hand gets here, and enforcing it would leave an endpoint unfiltered or
/// a ban short of a sub-user. Entries and overrides are not checked: without their account
/// they let nothing in, and there may be a million of them to read at every start.
fn check_references(conn: &Connection) -> Result<(), StoreError> {
    for table in ["accounts", "bindings", "set_refs", "set_entries"] {
        let missing = conn
            .query_row(&format!("PRAGMA foreign_key_check({table})"), [], |row| {
                Ok((row.get::<_, Option<i64>>(1)?, row.get::<_, String>(2)?))
            })
            .optional()?;
        if let Some((row, parent)) = missing {
            let row = row.map_or_else(|| "a row".to_owned(), |n| format!("row {n}"));
            return Err(StoreError::Corrupt(format!(
                "{row} of table {table} names a row of table {parent} that does not exist (a damaged store, or one \
                 edited by hand)"
            )));
        }
    }
    let looping: Option<String> = conn
        .query_row(
            "WITH RECURSIVE up(id, ancestor, depth) AS (
                 SELECT id, parent, 1 FROM accounts WHERE parent IS NOT NULL
                 UNION ALL
                 SELECT up.id, a.parent, up.depth + 1 FROM up JOIN accounts a ON a.id = up.ancestor
                 WHERE a.parent IS NOT NULL AND up.depth < ?1)
             SELECT id FROM up WHERE ancestor = id OR depth >= ?1 LIMIT 1",
            [crate::policy::MAX_ANCESTRY as i64],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(id) = looping {
        return Err(StoreError::Corrupt(format!(
            "the parent links of account {id:?} loop back to it or go more than {} levels up (a damaged store, or \
             one edited by hand)",
            crate::policy::MAX_ANCESTRY
        )));
    }
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let Ok(applied) = usize::try_from(version) else {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} is not one any version of ipaccessd writes"
        )));
    };
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} is newer than the {} this daemon knows",
            MIGRATIONS.len()
        )));
    }
    if applied == MIGRATIONS.len() {
        return Ok(());
    }
    // An upgrade trusts the version to say which steps the store has had: a version set
    // back by hand would run steps again over tables they already made. Only tables are
    // compared, and only for ones the version cannot have: some landed steps gained an
    // index or trigger afterwards, and stores made before that must still upgrade.
    let (found, known) = (tables_of(conn)?, tables_of(&reference_schema(applied)?)?);
    if !found.is_subset(&known) {
        return Err(StoreError::Corrupt(format!(
            "schema version {version} does not match the tables the store holds (a version changed by hand, or a \
             damaged store), so it cannot be upgraded safely"
        )));
    }
    // A step may rewrite a large table (v13: about 2.7 s per million sign-in rows). While
    // steps run, the service manager is asked now and then to wait longer for the start, so
    // that its start timeout does not kill the daemon mid-step, which rolls the step back to
    // be begun again at the next start, and again.
    let mut asked = None::<Instant>;
    conn.progress_handler(
        UPGRADE_PROGRESS_STEPS,
        Some(move || {
            if asked.is_none_or(|at| at.elapsed() >= UPGRADE_EXTEND_EVERY) {
                crate::systemd::extend_start(UPGRADE_EXTEND_BY, "upgrading the store");
                asked = Some(Instant::now());
            }
            false
        }),
    )?;
    let upgraded = (|| {
        for (version, sql) in (1i64..).zip(MIGRATIONS).skip(applied) {
            // Each step and its version bump commit together, so a crash never half-migrates.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()?;
        }
        Ok(())
    })();
    conn.progress_handler(0, None::<fn() -> bool>)?;
    upgraded
}

/// The names of a store's own tables.
fn tables_of(conn: &Connection) -> Result<std::collections::BTreeSet<String>, StoreError> {
    let mut statement =
        conn.prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")?;
    let rows = statement.query_map([], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// An empty in-memory store after the first `version` migrations: what a store at that
/// version holds.
fn reference_schema(version: usize) -> Result<Connection, StoreError> {
    let conn = Connection::open_in_memory()?;
    for sql in &MIGRATIONS[..version] {
        conn.execute_batch(sql)?;
    }
    Ok(conn)
}

/// How many SQLite VM steps pass between looks at the clock while the store is upgraded
/// (a look costs nanoseconds; a million steps take milliseconds).
const UPGRADE_PROGRESS_STEPS: i32 = 1_000_000;
/// While an upgrade runs, the service manager is asked this often for more time ...
const UPGRADE_EXTEND_EVERY: Duration = Duration::from_secs(10);
/// ... and for this much more each time.
const UPGRADE_EXTEND_BY: Duration = Duration::from_secs(60);

/// One account's allowlist (see [`Tx::entries`]).
const ENTRIES_OF_ACCOUNT: &str = "SELECT account, cidr, label, created_at, created_by, enabled, expires_at
                                  FROM allow_entries WHERE account = ?1";

/// A transaction on the store. Dropping it without [`Tx::commit`] rolls it back.
pub struct Tx<'a> {
    tx: rusqlite::Transaction<'a>,
    /// Free account slots, read from the store once per transaction that creates accounts,
    /// so a bulk import does not scan the slot index once per account.
    free_slots: RefCell<Option<FreeSlots>>,
    /// The connection's count of changed rows when the transaction began: a commit that
    /// changed rows is counted (see [`Tx::commit_counted`]).
    changes_at_begin: u64,
}

/// Hands out the lowest free slots >= 1, in order, given the slots in use (sorted).
struct FreeSlots {
    used: Vec<u32>,
    /// Index into `used` of the first slot not below `candidate`.
    next_used: usize,
    candidate: u32,
}

impl FreeSlots {
    fn new(used: Vec<u32>) -> FreeSlots {
        FreeSlots { used, next_used: 0, candidate: 1 }
    }

    fn take(&mut self) -> Option<u32> {
        while self.used.get(self.next_used) == Some(&self.candidate) {
            self.next_used += 1;
            self.candidate = self.candidate.checked_add(1)?;
        }
        let slot = self.candidate;
        self.candidate = self.candidate.checked_add(1)?;
        Some(slot)
    }
}

impl Tx<'_> {
    /// Creates an account in the lowest free slot >= 1.
    pub fn add_account(
        &self,
        id: &str,
        parent: Option<&str>,
        state: AccountState,
        mode: Mode,
        now: i64,
    ) -> Result<Account, StoreError> {
        if self.account(id)?.is_some() {
            return Err(StoreError::AccountExists(id.to_owned()));
        }
        if let Some(p) = parent {
            match self.account(p)? {
                None => return Err(StoreError::UnknownParent(p.to_owned())),
                Some(Account { parent: Some(grandparent), .. }) => {
                    return Err(StoreError::NestedParent { parent: p.to_owned(), grandparent });
                }
                Some(_) => {}
            }
        }
        let slot = self.free_slot()?;
        let row = Account {
            id: id.to_owned(),
            slot,
            parent: parent.map(str::to_owned),
            state,
            mode,
            state_reason: None,
            created_at: now,
        };
        self.execute(
            "INSERT INTO accounts (id, slot, parent, state, mode, state_reason, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)",
            (id, slot, parent, <&str>::from(state), <&str>::from(mode), now),
        )?;
        Ok(row)
    }

    pub fn account(&self, id: &str) -> Result<Option<Account>, StoreError> {
        let sql = "SELECT id, slot, parent, state, mode, state_reason, created_at
                   FROM accounts WHERE id = ?1";
        Ok(self.rows(sql, [id], account_row)?.pop())
    }

    /// The id of the account in `slot`, if one is.
    pub fn account_in_slot(&self, slot: u32) -> Result<Option<String>, StoreError> {
        Ok(self.rows("SELECT id FROM accounts WHERE slot = ?1", [slot], |r| Ok(r.get(0)?))?.pop())
    }

    /// All accounts, ordered by id.
    pub fn accounts(&self) -> Result<Vec<Account>, StoreError> {
        let sql = "SELECT id, slot, parent, state, mode, state_reason, created_at
                   FROM accounts ORDER BY id";
        self.rows(sql, [], account_row)
    }

    /// Every account below `id`, nearest first. New stores hold one level of sub-users; a
    /// store written before that rule may hold deeper trees, and a suspension reaches all
    /// of them. The depth is bounded, so a damaged store with a cycle cannot loop.
    pub fn descendants(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.tx.prepare_cached(
            "WITH RECURSIVE below(id, depth) AS (
                 SELECT id, 1 FROM accounts WHERE parent = ?1
                 UNION SELECT a.id, below.depth + 1 FROM accounts a JOIN below ON a.parent = below.id
                 WHERE below.depth < 64)
             SELECT id FROM below GROUP BY id ORDER BY MIN(depth), id",
        )?;
        let ids = stmt.query_map([id], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// Deletes an account with its allowlist, overrides and bindings (its activity stays,
    /// for the record). Sub-users must be gone first.
    pub fn remove_account(&self, id: &str) -> Result<(), StoreError> {
        // Its entries' last-used evidence goes with it (no foreign key: the rows are node-local).
        self.execute("DELETE FROM entry_use WHERE account = ?1", [id])?;
        match self.execute("DELETE FROM accounts WHERE id = ?1", [id])? {
            0 => Err(StoreError::UnknownAccount(id.to_owned())),
            _ => Ok(()),
        }
    }

    /// Sets the state and its reason; `None` clears a previous reason.
    pub fn set_state(&self, id: &str, state: AccountState, reason: Option<&str>) -> Result<(), StoreError> {
        let sql = "UPDATE accounts SET state = ?2, state_reason = ?3 WHERE id = ?1";
        self.update_account(id, sql, (id, <&str>::from(state), reason))
    }

    pub fn set_mode(&self, id: &str, mode: Mode) -> Result<(), StoreError> {
        self.update_account(id, "UPDATE accounts SET mode = ?2 WHERE id = ?1", (id, <&str>::from(mode)))
    }

    fn update_account(&self, id: &str, sql: &str, params: impl Params) -> Result<(), StoreError> {
        match self.execute(sql, params)? {
            0 => Err(StoreError::UnknownAccount(id.to_owned())),
            _ => Ok(()),
        }
    }

    /// Adds `cidr` (truncated to its network) to the account's allowlist.
    pub fn add_entry(
        &self,
        account: &str,
        cidr: IpNet,
        label: Option<&str>,
        created_by: u32,
        now: i64,
    ) -> Result<Entry, StoreError> {
        self.require_account(account)?;
        let cidr = cidr.trunc();
        let added = self.execute(
            "INSERT INTO allow_entries (account, cidr, label, created_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            (account, cidr.to_string(), label, now, created_by),
        )?;
        if added == 0 {
            return Err(StoreError::EntryExists { account: account.to_owned(), cidr });
        }
        Ok(Entry {
            account: account.to_owned(),
            cidr,
            label: label.map(str::to_owned),
            created_at: now,
            created_by,
            enabled: true,
            last_signin_at: None,
            last_packet_at: None,
            expires_at: None,
            source: None,
        })
    }

    /// One entry of the account's allowlist, matched exactly (callers pass networks).
    pub fn entry(&self, account: &str, cidr: IpNet) -> Result<Option<Entry>, StoreError> {
        let sql = "SELECT account, cidr, label, created_at, created_by, enabled, expires_at
                   FROM allow_entries WHERE account = ?1 AND cidr = ?2";
        Ok(self.rows(sql, (account, cidr.to_string()), entry_row)?.pop())
    }

    /// Enables or disables an entry; false if there is no such entry.
    pub fn set_entry_enabled(&self, account: &str, cidr: IpNet, enabled: bool) -> Result<bool, StoreError> {
        let sql = "UPDATE allow_entries SET enabled = ?3 WHERE account = ?1 AND cidr = ?2";
        Ok(self.execute(sql, (account, cidr.to_string(), enabled))? > 0)
    }

    /// Sets (unix s) or clears an entry's expiry; false if there is no such entry. A new
    /// expiry is audited again when it comes.
    pub fn set_entry_expiry(&self, account: &str, cidr: IpNet, expires_at: Option<i64>) -> Result<bool, StoreError> {
        let sql = "UPDATE allow_entries SET expires_at = ?3, expiry_audited = 0 WHERE account = ?1 AND cidr = ?2";
        Ok(self.execute(sql, (account, cidr.to_string(), expires_at))? > 0)
    }

    /// Entries whose expiry has come by `now` and is not audited yet (at most 1000 a call).
    pub fn unaudited_entry_expiries(&self, now: i64) -> Result<Vec<Entry>, StoreError> {
        self.rows(DUE_ENTRY_EXPIRIES, [now], entry_row)
    }

    pub fn mark_entry_expiry_audited(&self, account: &str, cidr: IpNet) -> Result<(), StoreError> {
        let sql = "UPDATE allow_entries SET expiry_audited = 1 WHERE account = ?1 AND cidr = ?2";
        self.execute(sql, (account, cidr.to_string()))?;
        Ok(())
    }

    /// Sets or clears an entry's label; false if there is no such entry.
    pub fn set_entry_label(&self, account: &str, cidr: IpNet, label: Option<&str>) -> Result<bool, StoreError> {
        let sql = "UPDATE allow_entries SET label = ?3 WHERE account = ?1 AND cidr = ?2";
        Ok(self.execute(sql, (account, cidr.to_string(), label))? > 0)
    }

    /// Removes an entry, matched as spelled (an older version stored networks with host
    /// bits set as given), else after truncation; false if there was none.
    pub fn remove_entry(&self, account: &str, cidr: IpNet) -> Result<bool, StoreError> {
        let sql = "DELETE FROM allow_entries WHERE account = ?1 AND cidr = ?2";
        let removed = match self.execute(sql, (account, cidr.to_string()))? {
            0 if cidr.trunc() != cidr => self.execute(sql, (account, cidr.trunc().to_string()))?,
            removed => removed,
        };
        Ok(removed > 0)
    }

    /// The account's allowlist, ordered by CIDR text; `UnknownAccount` if there is no such
    /// account, so an empty list always means an existing account with no entries.
    pub fn entries(&self, account: &str) -> Result<Vec<Entry>, StoreError> {
        self.require_account(account)?;
        // Sorted here: with `ORDER BY cidr` SQLite prepared the statement again at every
        // run (a sixth of a bulk import's time went to parsing it).
        let mut rows = self.rows(ENTRIES_OF_ACCOUNT, [account], entry_row)?;
        rows.sort_by_cached_key(|e| e.cidr.to_string());
        Ok(rows)
    }

    /// How many entries the account's allowlist holds, enabled or not (what
    /// `[limits] max_entries_per_account` counts).
    pub fn entry_count(&self, account: &str) -> Result<u64, StoreError> {
        Ok(self.count("SELECT COUNT(*) FROM allow_entries WHERE account = ?1", [account])? as u64)
    }

    /// Records the last sign-in each (account, entry) let through, keeping the later time
    /// (to [`USE_RESOLUTION_SECONDS`]).
    pub fn note_entry_signins<'k>(
        &self,
        uses: impl IntoIterator<Item = (&'k (String, IpNet), &'k i64)>,
    ) -> Result<(), StoreError> {
        self.note_entry_uses(UseTable::Entries, UseColumn::Signin, uses)
    }

    /// Records the last packet each (account, entry) let through, keeping the later time
    /// (to [`USE_RESOLUTION_SECONDS`]).
    pub fn note_entry_packets<'k>(
        &self,
        uses: impl IntoIterator<Item = (&'k (String, IpNet), &'k i64)>,
    ) -> Result<(), StoreError> {
        self.note_entry_uses(UseTable::Entries, UseColumn::Packet, uses)
    }

    /// Records a last use (owner: an account or a shared set; CIDR; time) for each of
    /// `uses`. A time less than [`USE_RESOLUTION_SECONDS`] after the one stored is not
    /// written: SQLite then reads the row's page but does not dirty it.
    fn note_entry_uses<'k>(
        &self,
        table: UseTable,
        column: UseColumn,
        uses: impl IntoIterator<Item = (&'k (String, IpNet), &'k i64)>,
    ) -> Result<(), StoreError> {
        let (table, owner) = match table {
            UseTable::Entries => ("entry_use", "account"),
            UseTable::Sets => ("set_entry_use", "set_name"),
        };
        let column = match column {
            UseColumn::Signin => "last_signin",
            UseColumn::Packet => "last_packet",
        };
        let upsert = format!(
            "INSERT INTO {table} ({owner}, cidr, {column}) VALUES (?1, ?2, ?3)
             ON CONFLICT DO UPDATE SET {column} = excluded.{column}
             WHERE {column} IS NULL OR {column} <= excluded.{column} - {USE_RESOLUTION_SECONDS}"
        );
        for ((owner, cidr), at) in uses {
            self.execute(&upsert, (owner, cidr.to_string(), at))?;
        }
        Ok(())
    }

    /// The account's entries with their last-used evidence filled in. Evidence older than
    /// the entry is an earlier entry's of the same network (removed, then added again), not
    /// this one's.
    pub fn entries_with_use(&self, account: &str) -> Result<Vec<Entry>, StoreError> {
        let mut entries = self.entries(account)?;
        let sql = "SELECT cidr, last_signin, last_packet FROM entry_use WHERE account = ?1";
        let used: HashMap<String, (Option<i64>, Option<i64>)> =
            self.rows(sql, [account], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))?.into_iter().collect();
        for e in &mut entries {
            if let Some(&(signin, packet)) = used.get(&e.cidr.to_string()) {
                e.last_signin_at = signin.filter(|&t| t >= e.created_at);
                e.last_packet_at = packet.filter(|&t| t >= e.created_at);
            }
        }
        Ok(entries)
    }

    /// Every allowlist entry, ordered by account then CIDR text.
    pub fn all_entries(&self) -> Result<Vec<Entry>, StoreError> {
        let sql = "SELECT account, cidr, label, created_at, created_by, enabled, expires_at
                   FROM allow_entries ORDER BY account, cidr";
        self.rows(sql, [], entry_row)
    }

    /// Binds `addr` (with `target` a single port, without it the whole address) to `account`
    /// on every node.
    pub fn add_binding(
        &self,
        account: &str,
        addr: IpAddr,
        target: Option<(Proto, u16)>,
        now: i64,
    ) -> Result<Binding, StoreError> {
        self.add_binding_on(account, addr, target, None, now)
    }

    /// Binds an endpoint to `account` on `node` only, or (`None`) on every node. An endpoint
    /// has one owner whatever its scopes: the same owner may bind it on several nodes, but
    /// not on some nodes and fleet-wide.
    pub fn add_binding_on(
        &self,
        account: &str,
        addr: IpAddr,
        target: Option<(Proto, u16)>,
        node: Option<&str>,
        now: i64,
    ) -> Result<Binding, StoreError> {
        self.require_account(account)?;
        let (proto, port) = target_columns(target);
        let held: Vec<(String, String)> = self
            .tx
            .prepare_cached("SELECT account, node FROM bindings WHERE addr = ?1 AND proto = ?2 AND port = ?3")?
            .query_map((addr.to_string(), proto, port), |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let scope = node.unwrap_or("");
        if let Some((owner, _)) = held.iter().find(|(owner, held)| owner != account || held == scope) {
            return Err(StoreError::BindingExists { endpoint: endpoint(addr, target), owner: owner.clone() });
        }
        if !held.is_empty() && (scope.is_empty() || held.iter().any(|(_, held)| held.is_empty())) {
            let nodes: Vec<&str> = held.iter().map(|(_, n)| n.as_str()).filter(|n| !n.is_empty()).collect();
            let on = |nodes: &[&str]| match nodes {
                [] => "fleet-wide (on every node)".to_owned(),
                [one] => format!("on node {one} only"),
                many => format!("on nodes {} only", many.join(", ")),
            };
            return Err(StoreError::BindingScope {
                endpoint: endpoint(addr, target),
                owner: account.to_owned(),
                held: on(&nodes),
                wanted: on(node.as_slice()),
            });
        }
        self.execute(
            "INSERT INTO bindings (addr, proto, port, node, account, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            (addr.to_string(), &proto, port, scope, account, now),
        )?;
        Ok(Binding { account: account.to_owned(), addr, target, created_at: now, node: node.map(str::to_owned) })
    }

    /// Removes a fleet-wide binding and returns it, or `None` if that endpoint was not bound.
    pub fn remove_binding(&self, addr: IpAddr, target: Option<(Proto, u16)>) -> Result<Option<Binding>, StoreError> {
        self.remove_binding_on(addr, target, None)
    }

    /// Removes the binding of an endpoint on `node` (`None`: fleet-wide) and returns it.
    pub fn remove_binding_on(
        &self,
        addr: IpAddr,
        target: Option<(Proto, u16)>,
        node: Option<&str>,
    ) -> Result<Option<Binding>, StoreError> {
        let (proto, port) = target_columns(target);
        let sql = "DELETE FROM bindings WHERE addr = ?1 AND proto = ?2 AND port = ?3 AND node = ?4
                   RETURNING account, addr, proto, port, created_at, node";
        Ok(self.rows(sql, (addr.to_string(), proto, port, node.unwrap_or("")), binding_row)?.pop())
    }

    /// Every binding of every scope, ordered by address text, protocol, port, node (the
    /// fleet-wide one first).
    pub fn bindings(&self) -> Result<Vec<Binding>, StoreError> {
        let sql = "SELECT account, addr, proto, port, created_at, node
                   FROM bindings ORDER BY addr, proto, port, node";
        self.rows(sql, [], binding_row)
    }

    /// The endpoints `account` has bound, in every scope.
    pub fn bindings_of(&self, account: &str) -> Result<Vec<Binding>, StoreError> {
        let sql = "SELECT account, addr, proto, port, created_at, node
                   FROM bindings WHERE account = ?1 ORDER BY addr, proto, port, node";
        self.rows(sql, [account], binding_row)
    }

    /// How many endpoints `account` has bound, in every scope.
    pub fn binding_count(&self, account: &str) -> Result<u64, StoreError> {
        let sql = "SELECT count(*) FROM bindings WHERE account = ?1";
        Ok(self.tx.prepare_cached(sql)?.query_row([account], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The bindings of every scope at these addresses, each address's ordered as
    /// [`Self::bindings`] orders them.
    pub fn bindings_at(&self, addrs: &BTreeSet<IpAddr>) -> Result<Vec<Binding>, StoreError> {
        let sql = "SELECT account, addr, proto, port, created_at, node
                   FROM bindings WHERE addr = ?1 ORDER BY proto, port, node";
        let mut out = Vec::new();
        for addr in addrs {
            out.extend(self.rows(sql, [addr.to_string()], binding_row)?);
        }
        Ok(out)
    }

    /// Makes the transaction's changes durable.
    pub fn commit(self) -> Result<(), StoreError> {
        self.commit_counted().map(drop)
    }

    /// Makes the transaction's changes durable and, if it changed anything, counts it among
    /// the store's commits: the count it returns only ever rises. The daemon records in the
    /// kernel the count of the last commit that changed policy; a store whose count is below
    /// that lost commits the kernel enforces (a deleted write-ahead log, an older backup),
    /// and is refused at start (`ipaccessd`'s `--accept-older-store`).
    pub fn commit_counted(self) -> Result<Option<u64>, StoreError> {
        let counted = if self.tx.total_changes() > self.changes_at_begin {
            let sql = "INSERT INTO cluster (name, value) VALUES ('store_commits', 1)
                       ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value";
            Some(self.count(sql, [])? as u64)
        } else {
            None
        };
        self.tx.commit()?;
        Ok(counted)
    }

    /// The store's count of commits that changed something (see [`Tx::commit_counted`]).
    pub fn commits(&self) -> Result<u64, StoreError> {
        Ok(self.count("SELECT COALESCE(MAX(value), 0) FROM cluster WHERE name = 'store_commits'", [])? as u64)
    }

    /// The store's line of commits (see [`Tx::start_new_line`]); 0 for a store given none.
    pub fn line(&self) -> Result<u64, StoreError> {
        Ok(self.count("SELECT COALESCE(MAX(value), 0) FROM cluster WHERE name = 'store_line'", [])? as u64)
    }

    /// Gives the store a new line of commits, a random number other than 0, and returns it.
    /// Copies of a store (its backups) share its line, and their commit counts compare:
    /// the lower one lost commits. Once a start accepts a copy over newer policy in the
    /// kernel (`ipaccessd`'s `--accept-older-store`), that copy goes on from a lower count
    /// than others of its line, which it no longer matches; so it is given a line of its
    /// own, and the kernel records the line with the count.
    pub fn start_new_line(&self) -> Result<u64, StoreError> {
        let sql = "INSERT INTO cluster (name, value) VALUES ('store_line', random() | 1)
                   ON CONFLICT (name) DO UPDATE SET value = excluded.value RETURNING value";
        Ok(self.count(sql, [])? as u64)
    }

    /// Runs a statement through the connection's statement cache: a bulk import runs the
    /// same few statements hundreds of thousands of times, and parsing them each time
    /// cost more than running them.
    fn execute(&self, sql: &str, params: impl Params) -> Result<usize, rusqlite::Error> {
        self.tx.prepare_cached(sql)?.execute(params)
    }

    /// The lowest slot no account uses (and no earlier call in this transaction took).
    fn free_slot(&self) -> Result<u32, StoreError> {
        let mut free = self.free_slots.borrow_mut();
        if free.is_none() {
            let mut stmt = self.tx.prepare_cached("SELECT slot FROM accounts ORDER BY slot")?;
            let used = stmt
                .query_map([], |r| r.get::<_, i64>(0))?
                .map(|slot| int(slot?, "slot"))
                .collect::<Result<Vec<u32>, StoreError>>()?;
            *free = Some(FreeSlots::new(used));
        }
        free.as_mut()
            .and_then(FreeSlots::take)
            .ok_or_else(|| StoreError::Corrupt("every account slot is in use".into()))
    }

    /// Replaces the account's whole allowlist with `entries` (truncated; a later duplicate
    /// of a CIDR wins). Entries that stay keep when and by whom they were first added; new
    /// ones are recorded as made by `created_by` at `now`.
    pub fn replace_entries(
        &self,
        account: &str,
        entries: &[(IpNet, Option<String>)],
        created_by: u32,
        now: i64,
    ) -> Result<(), StoreError> {
        let texts: Vec<String> = entries.iter().map(|(c, _)| c.trunc().to_string()).collect();
        let wanted: std::collections::HashSet<&str> = texts.iter().map(String::as_str).collect();
        let mut delete = self.tx.prepare_cached("DELETE FROM allow_entries WHERE account = ?1 AND cidr = ?2")?;
        for old in self.entries(account)? {
            let cidr = old.cidr.to_string();
            if !wanted.contains(cidr.as_str()) {
                delete.execute((account, cidr))?;
            }
        }
        let mut upsert = self.tx.prepare_cached(
            "INSERT INTO allow_entries (account, cidr, label, created_at, created_by)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO UPDATE SET label = excluded.label",
        )?;
        for ((_, label), cidr) in entries.iter().zip(&texts) {
            upsert.execute((account, cidr, label.as_deref(), now, created_by))?;
        }
        Ok(())
    }

    /// The allowlist of an account created in this transaction (it has none yet): `entries`
    /// must be distinct, as [`Tx::replace_entries`] takes them.
    pub fn add_entries(
        &self,
        account: &str,
        entries: &[(IpNet, Option<String>)],
        created_by: u32,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut insert = self.tx.prepare_cached(
            "INSERT INTO allow_entries (account, cidr, label, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for (cidr, label) in entries {
            insert.execute((account, cidr.trunc().to_string(), label.as_deref(), now, created_by))?;
        }
        Ok(())
    }

    fn require_account(&self, id: &str) -> Result<(), StoreError> {
        let found =
            self.tx.prepare_cached("SELECT 1 FROM accounts WHERE id = ?1")?.query_row([id], |_| Ok(())).optional()?;
        found.ok_or_else(|| StoreError::UnknownAccount(id.to_owned()))
    }

    /// Records a support override of `cidr` (truncated) for `account` until `expires_at`.
    #[allow(clippy::too_many_arguments)]
    pub fn add_override(
        &self,
        account: &str,
        cidr: IpNet,
        ticket: &str,
        reason: &str,
        operator: u32,
        now: i64,
        expires_at: i64,
    ) -> Result<Override, StoreError> {
        self.require_account(account)?;
        let cidr = cidr.trunc();
        // Above every id ever granted here (the table's AUTOINCREMENT sequence: the overrides
        // of a removed account are gone, and their ids must not name a new grant) and every
        // id a fleet this copy follows has granted (a node that joined later holds only the
        // overrides still live).
        self.execute(
            "INSERT INTO overrides (id, account, cidr, ticket, reason, operator, created_at, expires_at)
             VALUES (MAX((SELECT COALESCE(MAX(id), 0) FROM overrides),
                         (SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'overrides'),
                         (SELECT COALESCE(MAX(value), 0) FROM cluster WHERE name = 'override_sequence')) + 1,
                     ?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            (account, cidr.to_string(), ticket, reason, operator, now, expires_at),
        )?;
        Ok(Override {
            id: self.tx.last_insert_rowid(),
            account: account.to_owned(),
            cidr,
            ticket: ticket.to_owned(),
            reason: reason.to_owned(),
            operator,
            created_at: now,
            expires_at,
            revoked_at: None,
        })
    }

    /// Ends a live override of `account` now; `None` if there is no such live override.
    pub fn revoke_override(&self, account: &str, id: i64, now: i64) -> Result<Option<Override>, StoreError> {
        let changed = self.execute(
            "UPDATE overrides SET revoked_at = ?3
             WHERE id = ?1 AND account = ?2 AND revoked_at IS NULL AND expires_at > ?3",
            (id, account, now),
        )?;
        if changed == 0 {
            return Ok(None);
        }
        let sql = "SELECT id, account, cidr, ticket, reason, operator, created_at, expires_at, revoked_at
                   FROM overrides WHERE id = ?1";
        Ok(self.rows(sql, [id], override_row)?.pop())
    }

    /// Overrides that have expired by `now` (not revoked) and whose expiry is not audited yet.
    pub fn unaudited_expiries(&self, now: i64) -> Result<Vec<Override>, StoreError> {
        let sql = "SELECT id, account, cidr, ticket, reason, operator, created_at, expires_at, revoked_at
                   FROM overrides WHERE revoked_at IS NULL AND expires_at <= ?1 AND expiry_audited = 0
                   ORDER BY id LIMIT 1000";
        self.rows(sql, [now], override_row)
    }

    pub fn mark_expiry_audited(&self, id: i64) -> Result<(), StoreError> {
        self.execute("UPDATE overrides SET expiry_audited = 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Overrides neither revoked nor expired at `now`, of one account or all, oldest first.
    /// How many overrides are live on all accounts together.
    pub fn live_override_count(&self, now: i64) -> Result<u64, StoreError> {
        let sql = "SELECT count(*) FROM overrides WHERE revoked_at IS NULL AND expires_at > ?1";
        Ok(self.tx.prepare_cached(sql)?.query_row([now], |r| r.get::<_, i64>(0))? as u64)
    }

    pub fn live_overrides(&self, account: Option<&str>, now: i64) -> Result<Vec<Override>, StoreError> {
        // Two statements: with `(?2 IS NULL OR account = ?2)` one account's overrides were
        // found by scanning everyone's, in every change.
        match account {
            Some(account) => {
                // Sorted here: with `ORDER BY id` SQLite prepared the statement again at
                // every run, as with the entries (a sixth of a fleet node's join).
                let sql = "SELECT id, account, cidr, ticket, reason, operator, created_at, expires_at, revoked_at
                           FROM overrides WHERE revoked_at IS NULL AND expires_at > ?1 AND account = ?2";
                let mut rows = self.rows(sql, (now, account), override_row)?;
                rows.sort_by_key(|o| o.id);
                Ok(rows)
            }
            None => {
                let sql = "SELECT id, account, cidr, ticket, reason, operator, created_at, expires_at, revoked_at
                           FROM overrides WHERE revoked_at IS NULL AND expires_at > ?1 ORDER BY id";
                self.rows(sql, [now], override_row)
            }
        }
    }

    /// Appends audit records.
    pub fn add_activity(&self, records: &[ActivityRecord]) -> Result<(), StoreError> {
        for r in records {
            self.add_audit(r.time, &r.account, &r.action, &stored_detail(r))?;
        }
        Ok(())
    }

    /// Whether this audit record is stored already (the same time, account, action and
    /// detail, as [`Tx::add_activity`] writes them).
    pub fn has_audit(&self, r: &ActivityRecord) -> Result<bool, StoreError> {
        let sql = "SELECT COUNT(*) FROM activity
                   WHERE account = ?1 AND time = ?2 AND kind = 'audit' AND reason = ?3 AND detail = ?4";
        Ok(self.count(sql, (&r.account, r.time, &r.action, stored_detail(r)))? > 0)
    }

    /// Appends one audit record whose detail is already JSON text (holding its `uid` and
    /// `action`): a bulk import writes one per account, and skips building a JSON value.
    pub fn add_audit(&self, time: i64, account: &str, action: &str, detail: &str) -> Result<(), StoreError> {
        self.execute(
            "INSERT INTO activity (time, account, kind, address, method, allowed, reason, detail)
             VALUES (?1, ?2, 'audit', NULL, NULL, NULL, ?3, ?4)",
            (time, account, action, detail),
        )?;
        Ok(())
    }

    /// Adds counted sign-ins to their hours' rows. A new (address, method, outcome, caller)
    /// beyond an account's [`SIGNIN_ROWS`] in an hour is counted under the address `*`.
    pub fn add_signins<'k>(
        &self,
        tallies: impl IntoIterator<Item = (&'k SigninKey, &'k Tally)>,
    ) -> Result<(), StoreError> {
        let mut rows_in_hour: HashMap<(&str, i64), i64> = HashMap::new();
        for (k, t) in tallies {
            let (address, method, reason) = (k.address.to_string(), <&str>::from(k.method), <&str>::from(k.reason));
            let sql = "UPDATE signins SET count = count + ?8, first_seen = MIN(first_seen, ?9),
                       last_seen = MAX(last_seen, ?10) WHERE account = ?1 AND bucket = ?2 AND address = ?3
                       AND method = ?4 AND reason = ?5 AND uid = ?6 AND application = ?7";
            let key = (&k.account, k.bucket, &address, &method, &reason, k.uid, k.application);
            let (account, bucket, address, method, reason, uid, application) = key;
            let row = (account, bucket, address, method, reason, uid, application, t.count, t.first_seen, t.last_seen);
            if self.execute(sql, row)? > 0 {
                continue;
            }
            let fits = fits_in_hour(&mut rows_in_hour, (&k.account, k.bucket), SIGNIN_ROWS, || {
                self.count(
                    "SELECT COUNT(*) FROM signins WHERE account = ?1 AND bucket = ?2 AND address <> '*'",
                    (&k.account, k.bucket),
                )
            })?;
            // Past the cap, the caller's uid goes too: one row per method, reason and kind of caller.
            let (address, uid) = if fits { (address.as_str(), i64::from(k.uid)) } else { (OTHER_ADDRESSES, -1) };
            self.execute(
                "INSERT INTO signins (account, bucket, address, method, reason, uid, application, allowed, count,
                                      first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT DO UPDATE SET count = count + excluded.count,
                     first_seen = MIN(first_seen, excluded.first_seen), last_seen = MAX(last_seen, excluded.last_seen)",
                (
                    &k.account,
                    k.bucket,
                    address,
                    method,
                    reason,
                    uid,
                    k.application,
                    allows(k.reason),
                    t.count,
                    t.first_seen,
                    t.last_seen,
                ),
            )?;
        }
        Ok(())
    }

    /// Adds counted checks for unknown accounts; past [`UNKNOWN_ROWS`] in an hour, new
    /// addresses are counted under `*`.
    pub fn add_unknown_signins<'k>(
        &self,
        tallies: impl IntoIterator<Item = (&'k UnknownKey, &'k Tally)>,
    ) -> Result<(), StoreError> {
        let mut rows_in_hour: HashMap<i64, i64> = HashMap::new();
        for (k, t) in tallies {
            let (address, method) = (k.address.to_string(), <&str>::from(k.method));
            let sql = "UPDATE unknown_signins SET count = count + ?4, first_seen = MIN(first_seen, ?5),
                       last_seen = MAX(last_seen, ?6) WHERE bucket = ?1 AND address = ?2 AND method = ?3";
            if self.execute(sql, (k.bucket, &address, &method, t.count, t.first_seen, t.last_seen))? > 0 {
                continue;
            }
            let fits = fits_in_hour(&mut rows_in_hour, k.bucket, UNKNOWN_ROWS, || {
                self.count("SELECT COUNT(*) FROM unknown_signins WHERE bucket = ?1 AND address <> '*'", [k.bucket])
            })?;
            let address = if fits { address.as_str() } else { OTHER_ADDRESSES };
            self.execute(
                "INSERT INTO unknown_signins (bucket, address, method, count, first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT DO UPDATE SET count = count + excluded.count,
                     first_seen = MIN(first_seen, excluded.first_seen), last_seen = MAX(last_seen, excluded.last_seen)",
                (k.bucket, address, &method, t.count, t.first_seen, t.last_seen),
            )?;
        }
        Ok(())
    }

    /// Adds counted drops; past an account's [`DROP_ROWS`] in an hour, new (source,
    /// destination) pairs are counted under source and destination `*`, per reason.
    pub fn add_drops<'k>(&self, tallies: impl IntoIterator<Item = (&'k DropKey, &'k Tally)>) -> Result<(), StoreError> {
        let mut rows_in_hour: HashMap<(&str, i64), i64> = HashMap::new();
        for (k, t) in tallies {
            let (source, destination) = (k.source.to_string(), k.destination.to_string());
            let sql = "UPDATE drops SET count = count + ?8, first_seen = MIN(first_seen, ?9),
                       last_seen = MAX(last_seen, ?10) WHERE account = ?1 AND bucket = ?2 AND source = ?3
                       AND destination = ?4 AND protocol = ?5 AND port = ?6 AND reason = ?7";
            let key = (&k.account, k.bucket, &source, &destination, k.protocol, k.port, k.reason);
            let row = (key.0, key.1, key.2, key.3, key.4, key.5, key.6, t.count, t.first_seen, t.last_seen);
            if self.execute(sql, row)? > 0 {
                continue;
            }
            let fits = fits_in_hour(&mut rows_in_hour, (&k.account, k.bucket), DROP_ROWS, || {
                self.count(
                    "SELECT COUNT(*) FROM drops WHERE account = ?1 AND bucket = ?2 AND source <> '*'",
                    (&k.account, k.bucket),
                )
            })?;
            let (source, destination, protocol, port) = if fits {
                (source.as_str(), destination.as_str(), k.protocol, k.port)
            } else {
                (OTHER_ADDRESSES, OTHER_ADDRESSES, 0, 0)
            };
            self.execute(
                "INSERT INTO drops (account, bucket, source, destination, protocol, port, reason, allowed, count,
                                    first_seen, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT DO UPDATE SET count = count + excluded.count,
                     first_seen = MIN(first_seen, excluded.first_seen), last_seen = MAX(last_seen, excluded.last_seen)",
                (
                    &k.account,
                    k.bucket,
                    source,
                    destination,
                    protocol,
                    port,
                    k.reason,
                    k.reason == "monitor_would_deny",
                    t.count,
                    t.first_seen,
                    t.last_seen,
                ),
            )?;
        }
        Ok(())
    }

    /// An account's activity seen since `since` (unix s), newest first, at most `limit` rows:
    /// sign-ins and drops per hour, audit records one each. `kind` keeps one kind;
    /// `denied_only` keeps refused sign-ins and drops, and those monitor mode let through.
    pub fn activity(
        &self,
        account: &str,
        since: i64,
        kind: Option<ActivityKind>,
        denied_only: bool,
        limit: u32,
    ) -> Result<Vec<ActivityRow>, StoreError> {
        let wanted = |k: ActivityKind| kind.is_none_or(|only| only == k);
        let mut rows = Vec::new();
        // Audit records are changes, never denials.
        if wanted(ActivityKind::Audit) && !denied_only {
            let sql = "SELECT account, time, reason, detail FROM activity
                       WHERE account = ?1 AND time >= ?2 AND kind = 'audit' ORDER BY time DESC, id DESC LIMIT ?3";
            rows.extend(self.rows(sql, (account, since, limit), |r| {
                let detail: Option<String> = r.get(3)?;
                let detail = detail.map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d)));
                let uid = detail.as_ref().and_then(|d| d["uid"].as_u64()).and_then(|u| u32::try_from(u).ok());
                let time = r.get(1)?;
                Ok(ActivityRow {
                    kind: ActivityKind::Audit,
                    account: r.get(0)?,
                    time,
                    first_seen: time,
                    count: 1,
                    address: None,
                    method: None,
                    allowed: None,
                    reason: r.get(2)?,
                    uid,
                    detail,
                })
            })?);
        }
        if wanted(ActivityKind::Signin) {
            let sql = "SELECT account, last_seen, first_seen, count, address, method, allowed, reason, uid, application
                       FROM signins WHERE account = ?1 AND last_seen >= ?2 AND bucket > ?2 - 3600
                       AND (?3 = 0 OR allowed = 0 OR reason = 'monitor_would_deny')
                       ORDER BY last_seen DESC, address, method, reason, uid, application LIMIT ?4";
            rows.extend(self.rows(sql, (account, since, denied_only, limit), |r| {
                let uid: i64 = r.get(8)?;
                Ok(ActivityRow {
                    kind: ActivityKind::Signin,
                    account: r.get(0)?,
                    time: r.get(1)?,
                    first_seen: r.get(2)?,
                    count: r.get(3)?,
                    address: r.get(4)?,
                    method: r.get(5)?,
                    allowed: Some(r.get(6)?),
                    reason: r.get(7)?,
                    uid: u32::try_from(uid).ok(),
                    detail: Some(serde_json::json!({ "application": r.get::<_, bool>(9)? })),
                })
            })?);
        }
        if wanted(ActivityKind::Drop) {
            let sql = "SELECT account, last_seen, first_seen, count, source, allowed, reason, destination, protocol,
                       port FROM drops WHERE account = ?1 AND last_seen >= ?2 AND bucket > ?2 - 3600
                       AND (?3 = 0 OR allowed = 0 OR reason = 'monitor_would_deny')
                       ORDER BY last_seen DESC, source, destination, protocol, port, reason LIMIT ?4";
            rows.extend(self.rows(sql, (account, since, denied_only, limit), |r| {
                let detail = serde_json::json!({ "destination": r.get::<_, String>(7)?, "protocol": r.get::<_, i64>(8)?,
                                                 "port": r.get::<_, i64>(9)? });
                Ok(ActivityRow {
                    kind: ActivityKind::Drop,
                    account: r.get(0)?,
                    time: r.get(1)?,
                    first_seen: r.get(2)?,
                    count: r.get(3)?,
                    address: r.get(4)?,
                    method: None,
                    allowed: Some(r.get(5)?),
                    reason: r.get(6)?,
                    uid: None,
                    detail: Some(detail),
                })
            })?);
        }
        // Each kind came newest first; the sort is stable, so within one second audit records
        // come first (in their order), then sign-ins, then drops.
        rows.sort_by_key(|r| std::cmp::Reverse(r.time));
        rows.truncate(limit as usize);
        Ok(rows)
    }

    /// An account's sign-ins seen since `since`, per (address, method, outcome, kind of
    /// caller), most recently seen first, at most `limit`.
    pub fn signin_summary(
        &self,
        account: &str,
        since: i64,
        denied_only: bool,
        limit: u32,
    ) -> Result<Vec<SigninSummary>, StoreError> {
        let sql = "SELECT address, method, allowed, reason, application, SUM(count), MIN(first_seen), MAX(last_seen)
                   FROM signins WHERE account = ?1 AND last_seen >= ?2 AND bucket > ?2 - 3600
                   AND (?3 = 0 OR allowed = 0 OR reason = 'monitor_would_deny')
                   GROUP BY address, method, allowed, reason, application
                   ORDER BY MAX(last_seen) DESC, address, method, reason, application LIMIT ?4";
        self.rows(sql, (account, since, denied_only, limit), |r| {
            Ok(SigninSummary {
                address: r.get(0)?,
                method: r.get(1)?,
                allowed: r.get(2)?,
                reason: r.get(3)?,
                application: r.get(4)?,
                count: r.get(5)?,
                first_seen: r.get(6)?,
                last_seen: r.get(7)?,
                nodes: Vec::new(),
                location: None,
            })
        })
    }

    /// Checks for accounts that do not exist seen since `since`, per (address, method),
    /// most recently seen first.
    pub fn unknown_summary(&self, since: i64, limit: u32) -> Result<Vec<UnknownSummary>, StoreError> {
        let sql = "SELECT address, method, SUM(count), MIN(first_seen), MAX(last_seen) FROM unknown_signins
                   WHERE last_seen >= ?1 GROUP BY address, method ORDER BY MAX(last_seen) DESC, address LIMIT ?2";
        self.rows(sql, (since, limit), |r| {
            Ok(UnknownSummary {
                address: r.get(0)?,
                method: r.get(1)?,
                count: r.get(2)?,
                first_seen: r.get(3)?,
                last_seen: r.get(4)?,
            })
        })
    }

    /// Whether anything about `account` is recorded (an account that was removed may
    /// still have history).
    pub fn has_activity(&self, account: &str) -> Result<bool, StoreError> {
        let sql = "SELECT EXISTS (SELECT 1 FROM activity WHERE account = ?1)
                   OR EXISTS (SELECT 1 FROM signins WHERE account = ?1)
                   OR EXISTS (SELECT 1 FROM drops WHERE account = ?1)";
        Ok(self.count(sql, [account])? != 0)
    }

    /// The customer's denied sign-ins since `since`, per (address, method): checks made
    /// by applications only, so that support's and admins' own checks never count.
    pub fn denied_summary(&self, account: &str, since: i64) -> Result<Vec<DeniedSummary>, StoreError> {
        let sql = "SELECT address, method, MIN(first_seen), MAX(last_seen), SUM(count) FROM signins
                   WHERE account = ?1 AND last_seen >= ?2 AND bucket > ?2 - 3600 AND application = 1 AND allowed = 0
                   GROUP BY address, method ORDER BY MAX(last_seen) DESC LIMIT 50";
        self.rows(sql, (account, since), |r| {
            Ok(DeniedSummary {
                address: r.get(0)?,
                method: r.get(1)?,
                first_seen: r.get(2)?,
                last_seen: r.get(3)?,
                count: r.get(4)?,
                nodes: Vec::new(),
                location: None,
            })
        })
    }

    /// The addresses an application signed in from successfully (allowed, or allowed in
    /// monitor mode) since `since`, each with its last sign-in, newest first. The lockout
    /// guard refuses changes that would shut these out.
    pub fn recent_signins(&self, account: &str, since: i64) -> Result<Vec<RecentSignin>, StoreError> {
        let sql = "SELECT address, MAX(last_seen) FROM signins
                   WHERE account = ?1 AND last_seen >= ?2 AND bucket > ?2 - 3600 AND application = 1 AND allowed = 1
                   AND address <> '*'
                   GROUP BY address ORDER BY MAX(last_seen) DESC";
        self.rows(sql, (account, since), |r| {
            let address: String = r.get(0)?;
            Ok(RecentSignin {
                address: address.parse().map_err(|_| StoreError::Corrupt(format!("bad address {address:?}")))?,
                last_seen: r.get(1)?,
            })
        })
    }

    /// Deletes activity last seen before `before` (unix s); returns how many rows went.
    ///
    /// Audit records have no index by time (each change would write one more page for it),
    /// and a search of the whole table took 4-8 ms at 100,000 accounts' records, under the
    /// lock every change takes. So unless `thorough`, only the oldest records go: those
    /// before the first, by id, that is not older than `before`. Ids and times rise together
    /// unless the clock was set back; the records that leaves behind wait for a thorough
    /// pass.
    pub fn prune_activity(&self, before: i64, thorough: bool) -> Result<usize, StoreError> {
        let audits = if thorough {
            "DELETE FROM activity WHERE time < ?1"
        } else {
            "DELETE FROM activity WHERE id < COALESCE(
                 (SELECT id FROM activity WHERE time >= ?1 ORDER BY id LIMIT 1),
                 (SELECT MAX(id) + 1 FROM activity))"
        };
        let mut pruned = self.execute(audits, [before])?;
        for table in ["signins", "drops", "unknown_signins"] {
            pruned += self.execute(&format!("DELETE FROM {table} WHERE last_seen < ?1"), [before])?;
        }
        Ok(pruned)
    }

    /// A query whose one row is one number.
    fn count(&self, sql: &str, params: impl Params) -> Result<i64, StoreError> {
        Ok(self.tx.prepare_cached(sql)?.query_row(params, |r| r.get(0))?)
    }

    /// Runs a query and converts each row, so that a row that does not parse is `Corrupt`.
    fn rows<T>(
        &self,
        sql: &str,
        params: impl Params,
        convert: fn(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.tx.prepare_cached(sql)?;
        let mut rows = stmt.query(params)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(convert(row)?);
        }
        Ok(out)
    }
}

/// Whether one more distinct row fits under `cap` in its hour (`key`: one account's hour, or
/// the hour of all unknown accounts). The rows already stored are counted (`stored`) once per
/// key and write; the rows this write adds are counted here.
fn fits_in_hour<K: std::hash::Hash + Eq>(
    rows_in_hour: &mut HashMap<K, i64>,
    key: K,
    cap: i64,
    stored: impl FnOnce() -> Result<i64, StoreError>,
) -> Result<bool, StoreError> {
    let rows = match rows_in_hour.entry(key) {
        hash_map::Entry::Occupied(e) => e.into_mut(),
        hash_map::Entry::Vacant(e) => e.insert(stored()?),
    };
    let fits = *rows < cap;
    if fits {
        *rows += 1;
    }
    Ok(fits)
}

/// An audit record's stored detail: its detail object with its `uid` and `action`.
fn stored_detail(r: &ActivityRecord) -> String {
    let mut detail = r.detail.clone();
    if let serde_json::Value::Object(o) = &mut detail {
        o.insert("uid".into(), r.uid.into());
        o.insert("action".into(), r.action.clone().into());
    }
    detail.to_string()
}

fn account_row(r: &Row) -> Result<Account, StoreError> {
    Ok(Account {
        id: r.get(0)?,
        slot: int(r.get(1)?, "slot")?,
        parent: r.get(2)?,
        state: parse_name(&r.get::<_, String>(3)?, "account state")?,
        mode: parse_name(&r.get::<_, String>(4)?, "mode")?,
        state_reason: r.get(5)?,
        created_at: r.get(6)?,
    })
}

fn override_row(r: &Row) -> Result<Override, StoreError> {
    let cidr: String = r.get(2)?;
    Ok(Override {
        id: r.get(0)?,
        account: r.get(1)?,
        cidr: cidr.parse().map_err(|_| StoreError::Corrupt(format!("bad CIDR {cidr:?}")))?,
        ticket: r.get(3)?,
        reason: r.get(4)?,
        operator: int(r.get(5)?, "operator")?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        revoked_at: r.get(8)?,
    })
}

fn entry_row(r: &Row) -> Result<Entry, StoreError> {
    let cidr: String = r.get(1)?;
    Ok(Entry {
        account: r.get(0)?,
        cidr: cidr.parse().map_err(|_| StoreError::Corrupt(format!("bad CIDR {cidr:?}")))?,
        label: r.get(2)?,
        created_at: r.get(3)?,
        created_by: int(r.get(4)?, "created_by")?,
        enabled: r.get::<_, i64>(5)? != 0,
        last_signin_at: None,
        last_packet_at: None,
        expires_at: r.get(6)?,
        source: None,
    })
}

fn binding_row(r: &Row) -> Result<Binding, StoreError> {
    let addr: String = r.get(1)?;
    let proto: String = r.get(2)?;
    let port: u16 = int(r.get(3)?, "port")?;
    let target = match (proto.as_str(), port) {
        ("", 0) => None,
        ("", _) => {
            return Err(StoreError::Corrupt(format!("port {port} without a protocol")));
        }
        (p, _) => Some((parse_name(p, "protocol")?, port)),
    };
    Ok(Binding {
        account: r.get(0)?,
        addr: addr.parse().map_err(|_| StoreError::Corrupt(format!("bad address {addr:?}")))?,
        target,
        created_at: r.get(4)?,
        node: Some(r.get::<_, String>(5)?).filter(|n| !n.is_empty()),
    })
}

/// The columns for a binding's target: a whole address is ('', 0).
fn target_columns(target: Option<(Proto, u16)>) -> (&'static str, u16) {
    target.map_or(("", 0), |(proto, port)| (proto.into(), port))
}

/// A binding's endpoint for messages: `192.0.2.1` or `tcp 192.0.2.1:443`.
fn endpoint(addr: IpAddr, target: Option<(Proto, u16)>) -> String {
    match target {
        None => addr.to_string(),
        Some((proto, port)) => format!("{} {}", <&str>::from(proto), SocketAddr::new(addr, port)),
    }
}

/// Whether a check with this reason let the sign-in through (monitor mode's would-be
/// denials did).
fn allows(reason: Reason) -> bool {
    matches!(reason, Reason::Allowed | Reason::MonitorWouldDeny)
}

/// A protocol name read back from a column (written with the same names).
fn parse_name<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| StoreError::Corrupt(format!("unknown {what} {s:?}")))
}

fn int<T: TryFrom<i64>>(v: i64, column: &str) -> Result<T, StoreError> {
    T::try_from(v).map_err(|_| StoreError::Corrupt(format!("{column} {v} is out of range")))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(tempfile::TempDir);

    impl TempDir {
        fn new() -> TempDir {
            TempDir(tempfile::Builder::new().prefix("ipaccess-store-").tempdir().unwrap())
        }

        fn db(&self) -> PathBuf {
            // A subdirectory, so open() has to create it.
            self.0.path().join("state").join("ipaccess.db")
        }
    }

    fn open() -> (TempDir, Store) {
        let dir = TempDir::new();
        let store = Store::open(&dir.db()).unwrap();
        (dir, store)
    }

    fn add(tx: &Tx, id: &str) -> Account {
        tx.add_account(id, None, AccountState::Active, Mode::Enforce, 100).unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A change that meets another connection's write lock waits for it, and then writes.
    #[test]
    fn a_writer_waits_for_another_connections_commit() {
        let (dir, mut first) = open();
        let mut second = Store::open(&dir.db()).unwrap();
        let held = first.transaction().unwrap();
        add(&held, "first");
        let waiting = std::thread::spawn(move || {
            let started = Instant::now();
            let tx = second.transaction().unwrap();
            add(&tx, "second");
            tx.commit().unwrap();
            started.elapsed()
        });
        std::thread::sleep(Duration::from_millis(30));
        held.commit().unwrap();
        let waited = waiting.join().unwrap();
        assert!(waited >= Duration::from_millis(25), "the second writer did not wait: {waited:?}");
        let tx = first.transaction().unwrap();
        assert!(tx.account("first").unwrap().is_some() && tx.account("second").unwrap().is_some());
    }

    /// A WAL that has grown reaches the database file once writes pause, with no help from
    /// the writer (whose own checkpoints are off); a small one is left for later.
    #[test]
    fn a_grown_wal_is_checkpointed_once_writes_pause() {
        let (dir, mut store) = open();
        let _checkpointer = store.checkpoint_in_background().unwrap();
        let before = std::fs::metadata(dir.db()).unwrap().len();
        let tx = store.transaction().unwrap();
        add(&tx, "small");
        tx.commit().unwrap();
        std::thread::sleep(CHECKPOINT_WHEN_QUIET + 3 * CHECKPOINT_POLL);
        assert_eq!(std::fs::metadata(dir.db()).unwrap().len(), before, "a small WAL was checkpointed");

        let tx = store.transaction().unwrap();
        let label = "x".repeat(1000);
        let owner = add(&tx, "large");
        for n in 0..CHECKPOINT_FRAMES * 5 {
            let cidr = IpNet::new(IpAddr::from(std::net::Ipv6Addr::from(u128::from(n) << 64)), 64).unwrap();
            tx.add_entry(&owner.id, cidr, Some(&label), 0, 100).unwrap();
        }
        tx.commit().unwrap();
        let waited = Instant::now();
        while std::fs::metadata(dir.db()).unwrap().len() <= before {
            assert!(waited.elapsed() < Duration::from_secs(5), "no checkpoint 5 s after the last write");
            std::thread::sleep(CHECKPOINT_POLL);
        }
        assert!(waited.elapsed() >= CHECKPOINT_WHEN_QUIET - CHECKPOINT_POLL, "checkpointed before writes paused");
    }

    /// The overrides of a removed account go with it, but their ids are not handed out
    /// again: an old ticket's id must not name another grant.
    #[test]
    fn an_override_id_is_never_reused() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "kept");
        add(&tx, "removed");
        let first = tx.add_override("kept", net("198.18.0.1/32"), "T-1", "verified", 0, 100, 200).unwrap();
        let last = tx.add_override("removed", net("198.18.0.2/32"), "T-2", "verified", 0, 100, 200).unwrap();
        assert!(last.id > first.id);
        tx.remove_account("removed").unwrap();
        tx.commit().unwrap();
        let tx = store.transaction().unwrap();
        add(&tx, "removed");
        let next = tx.add_override("removed", net("198.18.0.2/32"), "T-3", "verified", 0, 100, 200).unwrap();
        assert!(next.id > last.id, "override id {} handed out again", next.id);
    }

    /// A store whose rows name a missing account, or whose parents loop, is refused at open:
    /// enforced, the binding would leave its endpoint unfiltered.
    #[test]
    fn a_store_with_broken_references_is_refused() {
        for (damage, named) in [
            ("UPDATE accounts SET parent = 'ghost' WHERE id = 'child'", "table accounts"),
            (
                "INSERT INTO bindings (addr, proto, port, node, account, created_at)
                 VALUES ('198.18.0.1', 'udp', 5001, '', 'ghost', 100)",
                "table bindings",
            ),
            ("UPDATE accounts SET parent = 'child' WHERE id = 'top'", "loop back"),
            ("UPDATE accounts SET parent = 'top' WHERE id = 'top'", "loop back"),
        ] {
            let (dir, mut store) = open();
            let tx = store.transaction().unwrap();
            add(&tx, "top");
            tx.add_account("child", Some("top"), AccountState::Active, Mode::Enforce, 100).unwrap();
            tx.commit().unwrap();
            drop(store);
            let raw = Connection::open(dir.db()).unwrap();
            raw.execute_batch(&format!("PRAGMA foreign_keys = OFF; {damage};")).unwrap();
            drop(raw);
            match Store::open(&dir.db()) {
                Err(StoreError::Corrupt(why)) => assert!(why.contains(named), "{damage}: {why}"),
                Err(other) => panic!("{damage}: {other}"),
                Ok(_) => panic!("{damage}: the store opened"),
            }
        }
    }

    #[test]
    fn slots_start_at_one_and_reuse_the_lowest_free() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        let slots: Vec<u32> = ["a", "b", "c", "d"].iter().map(|id| add(&tx, id).slot).collect();
        assert_eq!(slots, [1, 2, 3, 4]);
        // No delete command yet; free slots 1 and 3 by hand. A transaction reads the free
        // slots once, so the next one sees the gaps.
        tx.tx.execute("DELETE FROM accounts WHERE id IN ('a', 'c')", []).unwrap();
        tx.commit().unwrap();
        let tx = store.transaction().unwrap();
        assert_eq!(add(&tx, "e").slot, 1);
        assert_eq!(add(&tx, "f").slot, 3);
        assert_eq!(add(&tx, "g").slot, 5);
    }

    #[test]
    fn replacing_entries_keeps_only_the_new_ones() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        tx.add_entry("acme", net("198.18.0.0/24"), Some("old"), 0, 1).unwrap();
        tx.add_entry("acme", net("198.18.1.0/24"), None, 0, 1).unwrap();
        let wanted = [
            (net("198.18.1.7/24"), Some("office".to_string())),
            (net("fd00::1/128"), None),
            (net("198.18.1.0/24"), Some("office, again".to_string())),
        ];
        tx.replace_entries("acme", &wanted, 7, 2).unwrap();
        let got: Vec<_> = tx
            .entries("acme")
            .unwrap()
            .into_iter()
            .map(|e| (e.cidr.to_string(), e.label, e.created_by, e.created_at))
            .collect();
        // The entry that stays keeps its origin; its label is the new one.
        assert_eq!(
            got,
            [
                ("198.18.1.0/24".to_string(), Some("office, again".to_string()), 0, 1),
                ("fd00::1/128".to_string(), None, 7, 2)
            ]
        );
        assert!(matches!(tx.replace_entries("nobody", &wanted, 7, 2), Err(StoreError::UnknownAccount(_))));
    }

    #[test]
    fn duplicate_account_and_unknown_parent() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        let err = tx.add_account("acme", None, AccountState::Active, Mode::Off, 1);
        assert!(matches!(err, Err(StoreError::AccountExists(id)) if id == "acme"));
        let err = tx.add_account("bob", Some("nope"), AccountState::Active, Mode::Off, 1);
        assert!(matches!(err, Err(StoreError::UnknownParent(p)) if p == "nope"));
        let sub = tx.add_account("bob", Some("acme"), AccountState::Unconfirmed, Mode::Monitor, 7);
        let sub = sub.unwrap();
        assert_eq!(sub.parent.as_deref(), Some("acme"));
        assert_eq!(tx.account("bob").unwrap(), Some(sub));
        assert_eq!(tx.account("nobody").unwrap(), None);
        let ids: Vec<String> = tx.accounts().unwrap().into_iter().map(|a| a.id).collect();
        assert_eq!(ids, ["acme", "bob"]);
        let err = tx.add_account("bob-sub", Some("bob"), AccountState::Active, Mode::Off, 1);
        assert!(
            matches!(err, Err(StoreError::NestedParent { parent, grandparent }) if parent == "bob" && grandparent == "acme")
        );
        assert_eq!(tx.account("bob-sub").unwrap(), None);
    }

    #[test]
    fn descendants_of_an_old_deep_tree_and_removal() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "top");
        tx.add_account("mid", Some("top"), AccountState::Active, Mode::Off, 1).unwrap();
        // A store written before sub-users were limited to one level.
        tx.tx.execute("INSERT INTO accounts VALUES ('deep', 99, 'mid', 'active', 'off', NULL, 1)", []).unwrap();
        assert_eq!(tx.descendants("top").unwrap(), ["mid", "deep"]);
        assert_eq!(tx.descendants("deep").unwrap(), Vec::<String>::new());
        tx.add_entry("deep", net("198.18.0.0/24"), None, 0, 1).unwrap();
        tx.add_binding("deep", ip("198.18.1.1"), None, 1).unwrap();
        assert!(tx.remove_account("mid").is_err(), "a parent goes after its sub-users");
        tx.remove_account("deep").unwrap();
        assert!(tx.bindings().unwrap().is_empty());
        assert!(tx.all_entries().unwrap().is_empty());
        assert!(matches!(tx.remove_account("deep"), Err(StoreError::UnknownAccount(_))));
    }

    #[test]
    fn entries_can_be_disabled_and_relabelled() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        tx.add_entry("acme", net("198.18.0.0/24"), Some("office"), 0, 1).unwrap();
        assert!(tx.set_entry_enabled("acme", net("198.18.0.0/24"), false).unwrap());
        assert!(!tx.set_entry_enabled("acme", net("198.18.9.0/24"), false).unwrap());
        assert!(tx.set_entry_label("acme", net("198.18.0.0/24"), Some("old office")).unwrap());
        let entry = tx.entry("acme", net("198.18.0.0/24")).unwrap().unwrap();
        assert_eq!((entry.enabled, entry.label.as_deref()), (false, Some("old office")));
        // A replacement that keeps the entry keeps it disabled.
        tx.replace_entries("acme", &[(net("198.18.0.0/24"), None)], 0, 2).unwrap();
        assert!(!tx.entry("acme", net("198.18.0.0/24")).unwrap().unwrap().enabled);
    }

    #[test]
    fn an_entry_expiry_is_kept_and_audited_once() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        tx.add_entry("acme", net("198.18.0.0/24"), None, 7, 1).unwrap();
        tx.add_entry("acme", net("198.18.1.0/24"), None, 7, 1).unwrap();
        assert!(tx.set_entry_expiry("acme", net("198.18.0.0/24"), Some(100)).unwrap());
        assert!(!tx.set_entry_expiry("acme", net("198.18.9.0/24"), Some(100)).unwrap());
        let entry = tx.entry("acme", net("198.18.0.0/24")).unwrap().unwrap();
        assert_eq!(entry.expires_at, Some(100));
        assert_eq!(tx.entry("acme", net("198.18.1.0/24")).unwrap().unwrap().expires_at, None);
        assert!(tx.unaudited_entry_expiries(99).unwrap().is_empty());
        let ended = tx.unaudited_entry_expiries(100).unwrap();
        assert_eq!(ended, std::slice::from_ref(&entry));
        tx.mark_entry_expiry_audited("acme", entry.cidr).unwrap();
        assert!(tx.unaudited_entry_expiries(1_000).unwrap().is_empty());
        // A replacement keeps the expiry; a new one is audited again when it comes.
        tx.replace_entries("acme", &[(net("198.18.0.0/24"), Some("kept".into()))], 0, 2).unwrap();
        assert_eq!(tx.entry("acme", net("198.18.0.0/24")).unwrap().unwrap().expires_at, Some(100));
        tx.set_entry_expiry("acme", net("198.18.0.0/24"), Some(500)).unwrap();
        assert_eq!(tx.unaudited_entry_expiries(500).unwrap().len(), 1);
    }

    #[test]
    fn state_and_mode_updates() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        tx.set_state("acme", AccountState::Banned, Some("fraud")).unwrap();
        tx.set_mode("acme", Mode::Monitor).unwrap();
        let row = tx.account("acme").unwrap().unwrap();
        assert_eq!(
            (row.state, row.mode, row.state_reason.as_deref()),
            (AccountState::Banned, Mode::Monitor, Some("fraud"))
        );
        tx.set_state("acme", AccountState::Active, None).unwrap();
        assert_eq!(tx.account("acme").unwrap().unwrap().state_reason, None);
        let err = tx.set_state("nope", AccountState::Active, None);
        assert!(matches!(err, Err(StoreError::UnknownAccount(_))));
        assert!(matches!(tx.set_mode("nope", Mode::Off), Err(StoreError::UnknownAccount(_))));
    }

    #[test]
    fn entries_are_canonical_and_unique() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        let row = tx.add_entry("acme", net("198.18.1.7/24"), Some("office"), 1000, 5).unwrap();
        assert_eq!(row.cidr, net("198.18.1.0/24"));
        let err = tx.add_entry("acme", net("198.18.1.0/24"), None, 0, 6);
        assert!(matches!(err, Err(StoreError::EntryExists { cidr, .. }) if cidr == net("198.18.1.0/24")));
        assert!(matches!(tx.add_entry("nope", net("10.0.0.0/8"), None, 0, 6), Err(StoreError::UnknownAccount(_))));
        tx.add_entry("acme", net("2001:db8::1/128"), None, 0, 6).unwrap();
        assert_eq!(tx.entries("acme").unwrap().len(), 2);
        // Text order: "198.…" sorts before "2001:…".
        assert_eq!(tx.entries("acme").unwrap()[0], row);
        assert_eq!(tx.all_entries().unwrap().len(), 2);
        assert!(matches!(tx.entries("nope"), Err(StoreError::UnknownAccount(_))));
        // Found by the other spelling too; an older version's row, stored as given, by its own.
        tx.tx.execute("INSERT INTO allow_entries (account, cidr, created_at, created_by) VALUES ('acme', '198.18.1.9/24', 1, 0)", []).unwrap();
        assert!(tx.remove_entry("acme", net("198.18.1.9/24")).unwrap());
        assert_eq!(tx.entries("acme").unwrap().len(), 2, "the canonical row went with it");
        assert!(tx.remove_entry("acme", net("198.18.1.200/24")).unwrap());
        assert!(!tx.remove_entry("acme", net("198.18.1.0/24")).unwrap());
        assert_eq!(tx.entries("acme").unwrap().len(), 1);
    }

    #[test]
    fn whole_address_and_port_bindings_are_distinct() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        add(&tx, "other");
        let a = ip("192.0.2.10");
        let whole = tx.add_binding("acme", a, None, 1).unwrap();
        let https = tx.add_binding("other", a, Some((Proto::Tcp, 443)), 2).unwrap();
        tx.add_binding("other", a, Some((Proto::Udp, 443)), 3).unwrap();
        let err = tx.add_binding("other", a, None, 4);
        assert!(
            matches!(err, Err(StoreError::BindingExists { endpoint, owner }) if endpoint == "192.0.2.10" && owner == "acme")
        );
        let err = tx.add_binding("acme", a, Some((Proto::Tcp, 443)), 4);
        assert!(matches!(err, Err(StoreError::BindingExists { endpoint, .. }) if endpoint == "tcp 192.0.2.10:443"));
        let err = tx.add_binding("nope", ip("2001:db8::1"), None, 4);
        assert!(matches!(err, Err(StoreError::UnknownAccount(_))));
        assert_eq!(tx.bindings().unwrap().len(), 3);
        assert_eq!(tx.remove_binding(a, Some((Proto::Tcp, 443))).unwrap(), Some(https));
        assert_eq!(tx.remove_binding(a, Some((Proto::Tcp, 443))).unwrap(), None);
        assert_eq!(tx.remove_binding(a, None).unwrap(), Some(whole.clone()));
        let json = serde_json::to_string(&whole).unwrap();
        assert_eq!(json, r#"{"account":"acme","addr":"192.0.2.10","target":null,"created_at":1}"#);
        let left = serde_json::to_value(tx.bindings().unwrap()).unwrap();
        assert_eq!(left[0]["target"], serde_json::json!({"proto": "udp", "port": 443}));
    }

    /// An endpoint has one owner whatever its scopes; the owner may bind it on several
    /// nodes, but not on some nodes and fleet-wide; removal names the scope.
    #[test]
    fn a_binding_is_scoped_to_nodes_or_fleet_wide_with_one_owner() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        add(&tx, "other");
        let (a, https) = (ip("192.0.2.10"), Some((Proto::Tcp, 443)));
        let on_b = tx.add_binding_on("acme", a, https, Some("mx-b"), 1).unwrap();
        assert_eq!(on_b.node.as_deref(), Some("mx-b"));
        tx.add_binding_on("acme", a, https, Some("mx-c"), 2).unwrap();
        let again = tx.add_binding_on("acme", a, https, Some("mx-b"), 3);
        assert!(matches!(again, Err(StoreError::BindingExists { owner, .. }) if owner == "acme"));
        for node in [Some("mx-a"), None] {
            let err = tx.add_binding_on("other", a, https, node, 3);
            assert!(matches!(err, Err(StoreError::BindingExists { owner, .. }) if owner == "acme"), "{node:?}");
        }
        let err = tx.add_binding_on("acme", a, https, None, 3).unwrap_err();
        assert!(matches!(err, StoreError::BindingScope { .. }));
        let message = err.to_string();
        assert!(message.contains("on nodes mx-b, mx-c only") && message.contains("fleet-wide"), "{message}");
        // The other way round: fleet-wide first, then one node.
        tx.add_binding("acme", a, None, 4).unwrap();
        let err = tx.add_binding_on("acme", a, None, Some("mx-b"), 5).unwrap_err();
        assert!(err.to_string().contains("fleet-wide (on every node); binding it on node mx-b only"), "{err}");
        let all = tx.bindings().unwrap();
        let scopes: Vec<_> = all.iter().map(|b| (b.target, b.node.as_deref())).collect();
        assert_eq!(scopes, [(None, None), (https, Some("mx-b")), (https, Some("mx-c"))]);
        // Removing names the scope: the fleet-wide removal leaves the node-scoped ones.
        assert_eq!(tx.remove_binding(a, https).unwrap(), None);
        assert_eq!(tx.remove_binding_on(a, https, Some("mx-b")).unwrap(), Some(on_b));
        assert_eq!(tx.remove_binding_on(a, https, Some("mx-b")).unwrap(), None);
        assert_eq!(tx.bindings().unwrap().len(), 2);
        // The fleet's copy takes any scope as etcd has it.
        let theirs =
            Binding { account: "other".into(), addr: a, target: https, created_at: 9, node: Some("mx-c".into()) };
        tx.put_binding(&theirs).unwrap();
        assert!(tx.bindings().unwrap().contains(&theirs));
        let json = serde_json::to_value(&theirs).unwrap();
        assert_eq!(json["node"], "mx-c");
    }

    /// A store in `dir` written by a daemon that knew the first `version` migrations.
    fn store_of_schema(dir: &TempDir, version: usize) -> Connection {
        Store::create_at_schema(&dir.db(), version).unwrap();
        Connection::open(dir.db()).unwrap()
    }

    /// A store of schema v7 (bindings without a scope): its bindings become fleet-wide.
    #[test]
    fn bindings_of_an_older_store_become_fleet_wide() {
        let dir = TempDir::new();
        let conn = store_of_schema(&dir, 7);
        conn.execute(
            "INSERT INTO accounts (id, slot, state, mode, created_at) VALUES ('acme', 1, 'active', 'enforce', 5)",
            [],
        )
        .unwrap();
        conn.execute("INSERT INTO bindings VALUES ('198.18.0.1', 'tcp', 443, 'acme', 6)", []).unwrap();
        conn.execute("INSERT INTO bindings VALUES ('fd00::1', '', 0, 'acme', 7)", []).unwrap();
        drop(conn);
        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.transaction().unwrap();
        let bindings = tx.bindings().unwrap();
        assert_eq!(bindings.len(), 2);
        assert!(bindings.iter().all(|b| b.node.is_none() && b.account == "acme"), "{bindings:?}");
        assert_eq!(bindings[0].target, Some((Proto::Tcp, 443)));
        // The new key: the same endpoint on a node is now a row of its own, and removing the
        // account still removes its bindings.
        tx.add_binding_on("acme", ip("fd00::2"), None, Some("mx-b"), 8).unwrap();
        tx.remove_account("acme").unwrap();
        assert!(tx.bindings().unwrap().is_empty());
    }

    /// A store of schema v11: the last uses of entries it no longer holds are dropped by the
    /// upgrade; those of entries it holds stay.
    #[test]
    fn the_upgrade_drops_the_uses_of_removed_entries() {
        let dir = TempDir::new();
        let conn = store_of_schema(&dir, 11);
        conn.execute_batch(
            "INSERT INTO accounts (id, slot, state, mode, created_at) VALUES ('acme', 1, 'active', 'enforce', 5);
             INSERT INTO allow_entries (account, cidr, created_at, created_by) VALUES ('acme', '198.18.0.7/32', 5, 0);
             INSERT INTO entry_use (account, cidr, last_packet) VALUES ('acme', '198.18.0.7/32', 50);
             INSERT INTO entry_use (account, cidr, last_packet) VALUES ('acme', '198.18.0.8/32', 40);",
        )
        .unwrap();
        drop(conn);
        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.transaction().unwrap();
        let kept: Vec<(String, i64)> =
            tx.rows("SELECT cidr, last_packet FROM entry_use", [], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        assert_eq!(kept, [("198.18.0.7/32".to_string(), 50)]);
    }

    /// Sign-ins and drops counted before v13 (keyed by account first) are all there after
    /// the upgrade, and counting goes on into the same rows.
    #[test]
    fn the_upgrade_keeps_the_counts_of_sign_ins_and_drops() {
        let dir = TempDir::new();
        let conn = store_of_schema(&dir, 12);
        conn.execute_batch(
            "INSERT INTO signins VALUES ('acme', 7200, '198.18.0.7', 'password', 'allowed', 7, 1, 1, 3, 7201, 7300);
             INSERT INTO signins VALUES ('acme', 3600, '198.19.0.7', 'password', 'address_not_allowed', 7, 1, 0, 2,
                                         3601, 3700);
             INSERT INTO drops VALUES ('acme', 7200, '198.19.0.7', '198.18.1.1', 6, 443, 'address_not_allowed', 0,
                                       5, 7202, 7299);",
        )
        .unwrap();
        drop(conn);
        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.transaction().unwrap();
        let counts = |tx: &Tx| -> Vec<(i64, i64)> {
            tx.activity("acme", 0, None, false, 10).unwrap().iter().map(|r| (r.time, r.count)).collect()
        };
        assert_eq!(counts(&tx), [(7300, 3), (7299, 5), (3700, 2)]);
        let again = SigninKey { bucket: 7200, ..signin("acme", "198.18.0.7", Reason::Allowed, 7, true) };
        tx.add_signins([(&again, &Tally::new(1, 7400))]).unwrap();
        assert_eq!(counts(&tx), [(7400, 4), (7299, 5), (3700, 2)]);
    }

    /// The sweep's search for due entry expiries, under the writer lock every ten seconds,
    /// reads the partial index of entries still to audit, not every entry.
    #[test]
    fn due_entry_expiries_are_found_by_their_index() {
        let (_dir, store) = open();
        let plan: Vec<String> = store
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {DUE_ENTRY_EXPIRIES}"))
            .unwrap()
            .query_map([0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(plan.iter().any(|step| step.contains("allow_entries_expiring")), "{plan:?}");
    }

    #[test]
    fn the_statements_a_bulk_import_repeats_are_prepared_once() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        for id in ["a", "b"] {
            add(&tx, id);
            tx.add_entry(id, net("198.18.1.0/24"), None, 0, 0).unwrap();
            tx.add_entry(id, net("198.18.0.0/24"), None, 0, 0).unwrap();
        }
        for id in ["a", "b", "a", "b"] {
            let cidrs: Vec<String> = tx.entries(id).unwrap().iter().map(|e| e.cidr.to_string()).collect();
            assert_eq!(cidrs, ["198.18.0.0/24", "198.18.1.0/24"]);
        }
        let stmt = tx.tx.prepare_cached(ENTRIES_OF_ACCOUNT).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    #[test]
    fn readers_see_the_last_commit_beside_an_open_write() {
        let (_dir, mut store) = open();
        let readers = store.readers(2);
        let tx = store.transaction().unwrap();
        add(&tx, "committed");
        tx.commit().unwrap();
        let tx = store.transaction().unwrap();
        add(&tx, "pending");
        // The writer holds the write lock; reads neither wait for it nor see its changes.
        let started = std::time::Instant::now();
        let seen = |id: &'static str| readers.read(|r| Ok::<_, StoreError>(r.account(id)?.is_some())).unwrap();
        assert!(seen("committed"));
        assert!(!seen("pending"));
        assert!(started.elapsed() < Duration::from_secs(1), "a read waited for the writer");
        // A reader connection does not write, whatever it is asked.
        let refused = readers.read(|r| r.add_account("sneaky", None, AccountState::Active, Mode::Off, 0));
        assert!(refused.is_err());
        tx.commit().unwrap();
        assert!(seen("pending"));
    }

    #[test]
    fn dropped_transaction_leaves_nothing() {
        let (_dir, mut store) = open();
        {
            let tx = store.transaction().unwrap();
            add(&tx, "acme");
            tx.add_entry("acme", net("10.0.0.0/8"), None, 0, 1).unwrap();
        }
        let tx = store.read().unwrap();
        assert!(tx.accounts().unwrap().is_empty());
        assert!(tx.all_entries().unwrap().is_empty());
    }

    /// Each commit that changed something counts once, whatever it changed; one that
    /// changed nothing, and a read, do not; the count survives a reopen.
    #[test]
    fn commits_that_change_something_are_counted() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.db()).unwrap();
        assert_eq!(store.read().unwrap().commits().unwrap(), 0);
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        tx.add_entry("acme", net("198.18.0.0/24"), None, 0, 1).unwrap();
        assert_eq!(tx.commit_counted().unwrap(), Some(1), "one commit of two changes");
        let tx = store.transaction().unwrap();
        assert!(tx.accounts().unwrap().len() == 1);
        assert_eq!(tx.commit_counted().unwrap(), None, "a commit that changed nothing");
        let tx = store.transaction().unwrap();
        assert!(tx.remove_entry("acme", net("198.18.9.0/24")).is_ok_and(|removed| !removed));
        assert_eq!(tx.commit_counted().unwrap(), None, "a statement that matched no row");
        let tx = store.transaction().unwrap();
        tx.set_mode("acme", Mode::Monitor).unwrap();
        tx.commit().unwrap();
        drop(store);
        let mut store = Store::open(&dir.db()).unwrap();
        assert_eq!(store.read().unwrap().commits().unwrap(), 2);
    }

    #[test]
    fn committed_data_survives_reopen() {
        let dir = TempDir::new();
        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.transaction().unwrap();
        let acct = add(&tx, "acme");
        let entry = tx.add_entry("acme", net("2001:db8::/32"), Some("v6"), 0, 1).unwrap();
        let bind = tx.add_binding("acme", ip("2001:db8::1"), Some((Proto::Udp, 53)), 2).unwrap();
        tx.commit().unwrap();
        drop(store);

        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.read().unwrap();
        assert_eq!(tx.accounts().unwrap(), [acct]);
        assert_eq!(tx.entries("acme").unwrap(), [entry]);
        assert_eq!(tx.bindings().unwrap(), [bind]);
    }

    /// A drop of 198.19.0.7's packets to 198.18.1.1:443/tcp for `account`, in the hour `bucket`.
    fn drop_key(account: &str, bucket: i64) -> DropKey {
        DropKey {
            account: account.into(),
            bucket,
            source: ip("198.19.0.7"),
            destination: ip("198.18.1.1"),
            protocol: 6,
            port: 443,
            reason: "address_not_allowed",
        }
    }

    fn signin(account: &str, addr: &str, reason: Reason, uid: u32, application: bool) -> SigninKey {
        let (account, address, bucket, method) = (account.into(), ip(addr), bucket(7200), Method::Password);
        SigninKey { account, bucket, address, method, reason, uid, application }
    }

    /// The activity log rewrites the current hour's counts of every account checked (or
    /// dropped) in the last second, every second. Those rows lie together, not each beside
    /// its account's earlier hours: a write of 2,048 accounts' counts dirties a few dozen
    /// pages, where it dirtied about one page per account.
    #[test]
    fn a_write_of_the_hours_counts_dirties_a_few_pages() {
        const ACCOUNTS: usize = 2048;
        let (dir, mut store) = open();
        let wal = Store::sibling(&dir.db(), "-wal");
        let signin_of = |a: usize, bucket: i64| SigninKey {
            bucket,
            ..signin(&format!("acct{a}"), "198.18.0.7", Reason::Allowed, 7, true)
        };
        let drop_of = |a: usize, bucket: i64| drop_key(&format!("acct{a}"), bucket);
        // Eight hours of history for every account, then the current hour's first counts.
        let write = |store: &mut Store, hour: i64, table: &str| {
            let tx = store.transaction().unwrap();
            let at = hour * BUCKET_SECONDS;
            if table == "signins" {
                let tallies: Vec<_> = (0..ACCOUNTS).map(|a| (signin_of(a, at), Tally::new(1, at))).collect();
                tx.add_signins(tallies.iter().map(|(k, t)| (k, t))).unwrap();
            } else {
                let tallies: Vec<_> = (0..ACCOUNTS).map(|a| (drop_of(a, at), Tally::new(1, at))).collect();
                tx.add_drops(tallies.iter().map(|(k, t)| (k, t))).unwrap();
            }
            tx.commit().unwrap();
        };
        for table in ["signins", "drops"] {
            for hour in 0..=8 {
                write(&mut store, hour, table);
            }
            store.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
            assert_eq!(std::fs::metadata(&wal).unwrap().len(), 0);
            // A second later: the same rows of the current hour, counted once more.
            write(&mut store, 8, table);
            let page: i64 = store.conn.pragma_query_value(None, "page_size", |r| r.get(0)).unwrap();
            let frames = std::fs::metadata(&wal).unwrap().len() / (page as u64 + 24);
            assert!(frames < ACCOUNTS as u64 / 16, "{table}: {frames} pages written for {ACCOUNTS} rows");
        }
    }

    /// The reads of one account's rows skip hours that end before `since`, and no more: a
    /// row whose last count came in its hour's last second is still found from that second.
    #[test]
    fn a_read_since_a_time_finds_a_row_counted_in_its_hours_last_second() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        let allowed = signin("acme", "198.18.0.7", Reason::Allowed, 7, true);
        let denied = signin("acme", "198.19.0.7", Reason::AddressNotAllowed, 7, true);
        let last_second = allowed.bucket + BUCKET_SECONDS - 1;
        let tally = Tally { count: 1, first_seen: allowed.bucket, last_seen: last_second };
        tx.add_signins([(&allowed, &tally), (&denied, &tally)]).unwrap();
        tx.add_drops([(&drop_key("acme", allowed.bucket), &tally)]).unwrap();
        for (since, found) in [(0, true), (last_second, true), (last_second + 1, false)] {
            let recent = tx.recent_signins("acme", since).unwrap();
            assert_eq!(recent.len(), usize::from(found), "since {since}");
            assert_eq!(tx.denied_summary("acme", since).unwrap().len(), usize::from(found), "since {since}");
            assert_eq!(tx.signin_summary("acme", since, false, 10).unwrap().len(), 2 * usize::from(found));
            let rows = tx.activity("acme", since, None, false, 10).unwrap();
            assert_eq!(rows.len(), 3 * usize::from(found), "since {since}: {rows:?}");
        }
    }

    #[test]
    fn signins_are_counted_per_hour_and_capped() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        // 300 addresses, each seen twice in two writes: the first SIGNIN_ROWS get a row each,
        // the rest are counted under `*`.
        let keys: Vec<SigninKey> = (0..300)
            .map(|i| signin("acme", &format!("198.18.{}.{}", i / 250, i % 250), Reason::Allowed, 7, true))
            .collect();
        for at in [7300, 7400] {
            let tallies: Vec<(SigninKey, Tally)> = keys.iter().map(|k| (k.clone(), Tally::new(1, at))).collect();
            tx.add_signins(tallies.iter().map(|(k, t)| (k, t))).unwrap();
        }
        let rows = tx.activity("acme", 0, Some(ActivityKind::Signin), false, 10_000).unwrap();
        assert_eq!(rows.len() as i64, SIGNIN_ROWS + 1);
        assert_eq!(rows.iter().map(|r| r.count).sum::<i64>(), 600);
        let other = rows.iter().find(|r| r.address.as_deref() == Some(OTHER_ADDRESSES)).unwrap();
        assert_eq!((other.count, other.uid, other.first_seen, other.time), (2 * (300 - SIGNIN_ROWS), None, 7300, 7400));
        let one = rows.iter().find(|r| r.address.as_deref() == Some("198.18.0.0")).unwrap();
        assert_eq!((one.count, one.uid, one.first_seen, one.time), (2, Some(7), 7300, 7400));
        // The next hour starts afresh.
        let next = SigninKey { bucket: bucket(10_800), ..keys[299].clone() };
        tx.add_signins([(&next, &Tally::new(1, 10_801))]).unwrap();
        let rows = tx.activity("acme", 10_800, None, false, 10).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].address.as_deref(), Some("198.18.1.49"));
        // Pruning goes by when a row was last seen.
        assert_eq!(tx.prune_activity(7401, false).unwrap() as i64, SIGNIN_ROWS + 1);
    }

    /// The quick pass takes the oldest audit records up to the first that is not expired,
    /// however many there are, and leaves one the clock put out of order to the thorough
    /// pass; nothing else goes.
    #[test]
    fn the_quick_prune_takes_the_oldest_audit_records_and_the_thorough_one_the_rest() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        for time in [100, 200, 300, 1000, 250, 1100] {
            tx.add_audit(time, "acme", "mode", r#"{"uid": 0, "action": "mode"}"#).unwrap();
        }
        let times = |tx: &Tx| -> Vec<i64> {
            let mut stmt = tx.tx.prepare("SELECT time FROM activity ORDER BY id").unwrap();
            stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(tx.prune_activity(50, false).unwrap(), 0);
        assert_eq!(tx.prune_activity(500, false).unwrap(), 3);
        assert_eq!(times(&tx), [1000, 250, 1100], "the record after the clock was set back waits");
        assert_eq!(tx.prune_activity(500, true).unwrap(), 1);
        assert_eq!(times(&tx), [1000, 1100]);
        assert_eq!(tx.prune_activity(2000, false).unwrap(), 2, "all expired: all go");
        assert_eq!(tx.prune_activity(2000, false).unwrap(), 0);
        tx.add_audit(3000, "acme", "mode", r#"{"uid": 0, "action": "mode"}"#).unwrap();
        assert_eq!(times(&tx), [3000]);
    }

    #[test]
    fn staff_checks_are_not_the_customers() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        let staff_denied = signin("acme", "198.18.0.1", Reason::AddressNotAllowed, 1000, false);
        let staff_allowed = signin("acme", "198.18.0.2", Reason::Allowed, 1000, false);
        let app_denied = signin("acme", "198.18.0.3", Reason::AddressNotAllowed, 33, true);
        let app_monitor = signin("acme", "198.18.0.4", Reason::MonitorWouldDeny, 33, true);
        let t = Tally::new(2, 7300);
        tx.add_signins([(&staff_denied, &t), (&staff_allowed, &t), (&app_denied, &t), (&app_monitor, &t)]).unwrap();
        let denied = tx.denied_summary("acme", 0).unwrap();
        assert_eq!(denied.len(), 1);
        assert_eq!((denied[0].address.as_deref(), denied[0].count), (Some("198.18.0.3"), 2));
        let monitored = RecentSignin { address: ip("198.18.0.4"), last_seen: 7300 };
        assert_eq!(tx.recent_signins("acme", 0).unwrap(), [monitored]);
        assert!(tx.recent_signins("acme", 7301).unwrap().is_empty());
        // Both are listed, each under its caller.
        let summary = tx.signin_summary("acme", 0, false, 10).unwrap();
        assert_eq!(summary.iter().filter(|s| !s.application).count(), 2);
        let denied = tx.signin_summary("acme", 0, true, 10).unwrap();
        let mut reasons: Vec<&str> = denied.iter().map(|s| s.reason.as_str()).collect();
        reasons.sort();
        assert_eq!(reasons, ["address_not_allowed", "address_not_allowed", "monitor_would_deny"]);
    }

    /// What a fleet node publishes: denied checks per day, of the groups that changed, over
    /// the whole window.
    #[test]
    fn denied_tallies_are_per_day_and_whole_for_a_group_that_changed() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        let denied = signin("acme", "198.18.0.3", Reason::AddressNotAllowed, 33, true);
        let later = SigninKey { bucket: bucket(90_000), ..denied.clone() };
        let allowed = signin("acme", "198.18.0.4", Reason::Allowed, 33, true);
        let quiet = signin("acme", "198.18.0.5", Reason::Banned, 33, true);
        tx.add_signins([
            (&denied, &Tally::new(2, 7300)),
            (&later, &Tally::new(3, 90_100)),
            (&allowed, &Tally::new(5, 90_100)),
            (&quiet, &Tally::new(1, 7300)),
        ])
        .unwrap();
        let all = tx.denied_tallies(0, 0).unwrap();
        let days: Vec<_> = all.iter().map(|t| (t.address.as_str(), t.day, t.count)).collect();
        assert_eq!(days, [("198.18.0.3", 0, 2), ("198.18.0.3", 86_400, 3), ("198.18.0.5", 0, 1)]);
        // Only 198.18.0.3 changed since 90,000: all of its days come, nothing of the others.
        let changed = tx.denied_tallies(0, 90_000).unwrap();
        assert_eq!(changed, all[..2]);
        // The window bounds what comes.
        assert_eq!(tx.denied_tallies(8000, 0).unwrap(), all[1..2]);
    }

    /// A store of schema v4 with one row per check and drop: the migration counts them per
    /// hour, keeps the audit records, and keeps no name of an unknown account.
    #[test]
    fn old_activity_rows_are_counted_per_hour_by_the_migration() {
        let dir = TempDir::new();
        let conn = store_of_schema(&dir, 4);
        conn.execute("INSERT INTO accounts VALUES ('acme', 1, NULL, 'active', 'enforce', NULL, 0)", []).unwrap();
        let old = "INSERT INTO activity (time, account, kind, address, method, allowed, reason, detail)
                   VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
        let dropped = r#"{"destination": "198.18.0.1", "protocol": 17, "port": 53}"#;
        for (time, account, kind, address, method, allowed, reason, detail) in [
            (7201, "acme", "check", Some("198.18.0.9"), Some("password"), Some(false), "address_not_allowed", None),
            (7205, "acme", "check", Some("198.18.0.9"), Some("password"), Some(false), "address_not_allowed", None),
            (11_000, "acme", "check", Some("198.18.0.9"), Some("password"), Some(false), "address_not_allowed", None),
            (7202, "ghost-1", "check", Some("198.18.6.6"), Some("password"), Some(false), "unknown_account", None),
            (7203, "ghost-2", "check", Some("198.18.6.6"), Some("password"), Some(false), "unknown_account", None),
            (7204, "acme", "drop", Some("198.18.0.9"), None, Some(false), "address_not_allowed", Some(dropped)),
            (7206, "acme", "drop", Some("198.18.0.9"), None, Some(false), "address_not_allowed", Some(dropped)),
            (7207, "acme", "audit", None, None, None, "mode", Some(r#"{"uid": 5, "action": "mode"}"#)),
        ] {
            conn.execute(old, (time, account, kind, address, method, allowed, reason, detail)).unwrap();
        }
        drop(conn);
        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.read().unwrap();
        let rows = tx.activity("acme", 0, None, false, 100).unwrap();
        let got: Vec<(ActivityKind, i64, i64, i64, Option<u32>)> =
            rows.iter().map(|r| (r.kind, r.time, r.first_seen, r.count, r.uid)).collect();
        assert_eq!(
            got,
            [
                (ActivityKind::Signin, 11_000, 11_000, 1, None),
                (ActivityKind::Audit, 7207, 7207, 1, Some(5)),
                (ActivityKind::Drop, 7206, 7204, 2, None),
                (ActivityKind::Signin, 7205, 7201, 2, None),
            ]
        );
        assert_eq!(rows[2].detail, Some(serde_json::json!({"destination": "198.18.0.1", "protocol": 17, "port": 53})));
        let unknown = tx.unknown_summary(0, 10).unwrap();
        assert_eq!(unknown.len(), 1);
        assert_eq!((unknown[0].address.as_str(), unknown[0].count), ("198.18.6.6", 2));
        assert!(!tx.has_activity("ghost-1").unwrap());
        assert_eq!(tx.denied_summary("acme", 0).unwrap()[0].count, 3);
    }

    /// A store of schema v5: its audit records keep their ids and order through v6, and
    /// new ones come after them.
    #[test]
    fn audit_records_keep_their_ids_without_autoincrement() {
        let dir = TempDir::new();
        let conn = store_of_schema(&dir, 5);
        let old =
            "INSERT INTO activity (id, time, account, kind, reason, detail) VALUES (?1, 7200, 'acme', 'audit', ?2, ?3)";
        for (id, action) in [(3, "account_add"), (9, "mode"), (12, "allow_add")] {
            conn.execute(old, (id, action, format!(r#"{{"uid": 5, "action": "{action}"}}"#))).unwrap();
        }
        drop(conn);
        let mut store = Store::open(&dir.db()).unwrap();
        let tx = store.transaction().unwrap();
        tx.add_audit(7200, "acme", "allow_remove", r#"{"uid": 6, "action": "allow_remove"}"#).unwrap();
        let ids: Vec<(i64, String)> = tx
            .tx
            .prepare("SELECT id, reason FROM activity ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let ids: Vec<(i64, &str)> = ids.iter().map(|(id, r)| (*id, r.as_str())).collect();
        assert_eq!(ids, [(3, "account_add"), (9, "mode"), (12, "allow_add"), (13, "allow_remove")]);
        let sequence: i64 = tx.count("SELECT COUNT(*) FROM sqlite_sequence WHERE name = 'activity'", []).unwrap();
        assert_eq!(sequence, 0, "activity no longer uses AUTOINCREMENT");
        // Within one second, the newest record is listed first.
        let rows = tx.activity("acme", 0, Some(ActivityKind::Audit), false, 10).unwrap();
        let listed: Vec<(&str, Option<u32>)> = rows.iter().map(|r| (r.reason.as_deref().unwrap(), r.uid)).collect();
        assert_eq!(
            listed,
            [("allow_remove", Some(6)), ("allow_add", Some(5)), ("mode", Some(5)), ("account_add", Some(5))]
        );
    }

    /// A version that does not match the tables (set back, or negative) is refused before
    /// any step runs, and the store is left as it was.
    #[test]
    fn a_version_that_does_not_match_the_tables_is_refused_untouched() {
        let dir = TempDir::new();
        drop(Store::open(&dir.db()).unwrap());
        let schema = |conn: &Connection| -> Vec<(String, String)> {
            let mut statement = conn.prepare("SELECT name, sql FROM sqlite_master ORDER BY name").unwrap();
            statement
                .query_map([], |r| Ok((r.get(0)?, r.get::<_, Option<String>>(1)?.unwrap_or_default())))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        for version in [5, -3] {
            let conn = Connection::open(dir.db()).unwrap();
            conn.pragma_update(None, "user_version", version).unwrap();
            let before = schema(&conn);
            drop(conn);
            let Err(StoreError::Corrupt(why)) = Store::open(&dir.db()) else { panic!("version {version} was opened") };
            assert!(why.contains(&format!("schema version {version} ")), "{why}");
            assert!(!why.contains("newer"), "{why}");
            assert_eq!(schema(&Connection::open(dir.db()).unwrap()), before, "version {version}");
        }
        // A store really at an older version is still upgraded, also one made before a
        // landed step gained an index (v10's `allow_entries_expiring`).
        let old = TempDir::new();
        Store::create_at_schema(&old.db(), 10).unwrap();
        Connection::open(old.db()).unwrap().execute_batch("DROP INDEX allow_entries_expiring").unwrap();
        drop(Store::open(&old.db()).unwrap());
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = TempDir::new();
        drop(Store::open(&dir.db()).unwrap());
        let conn = Connection::open(dir.db()).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(Store::open(&dir.db()), Err(StoreError::Corrupt(_))));
    }

    /// A last use is kept to [`USE_RESOLUTION_SECONDS`]: a later one within it is not
    /// written, one past it is, an earlier one never replaces a later; sign-ins and packets
    /// each on their own.
    #[test]
    fn last_uses_are_kept_to_the_resolution() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        tx.replace_entries("acme", &[(net("198.18.0.7/32"), None)], 0, 100).unwrap();
        let key = ("acme".to_string(), net("198.18.0.7/32"));
        let uses = |at: i64| HashMap::from([(key.clone(), at)]);
        let last = |tx: &Tx| {
            let e = &tx.entries_with_use("acme").unwrap()[0];
            (e.last_signin_at, e.last_packet_at)
        };
        tx.note_entry_packets(&uses(1_000)).unwrap();
        assert_eq!(last(&tx), (None, Some(1_000)));
        tx.note_entry_packets(&uses(1_000 + USE_RESOLUTION_SECONDS - 1)).unwrap();
        assert_eq!(last(&tx), (None, Some(1_000)), "within the resolution: not written");
        tx.note_entry_signins(&uses(1_030)).unwrap();
        assert_eq!(last(&tx), (Some(1_030), Some(1_000)), "a first sign-in is written at once");
        tx.note_entry_packets(&uses(1_000 + USE_RESOLUTION_SECONDS)).unwrap();
        assert_eq!(last(&tx), (Some(1_030), Some(1_000 + USE_RESOLUTION_SECONDS)));
        tx.note_entry_packets(&uses(500)).unwrap();
        assert_eq!(last(&tx), (Some(1_030), Some(1_000 + USE_RESOLUTION_SECONDS)), "an earlier use changes nothing");
    }

    /// A network removed and added again within the resolution: the new one's first use is
    /// written at once (before v12 the removed one's time, kept, held it back a minute), and
    /// a set's document applied again keeps the uses of the networks that stay.
    #[test]
    fn a_network_added_again_starts_without_the_removed_ones_uses() {
        let (_dir, mut store) = open();
        let tx = store.transaction().unwrap();
        add(&tx, "acme");
        let (cidr, other) = (net("198.18.0.7/32"), net("198.18.9.0/24"));
        let at = |owner: &str, at: i64| HashMap::from([((owner.to_string(), cidr), at)]);
        tx.replace_entries("acme", &[(cidr, None)], 0, 100).unwrap();
        tx.note_entry_packets(&at("acme", 1_000)).unwrap();
        assert!(tx.remove_entry("acme", cidr).unwrap());
        tx.replace_entries("acme", &[(cidr, None)], 0, 1_010).unwrap();
        tx.note_entry_packets(&at("acme", 1_020)).unwrap();
        assert_eq!(tx.entries_with_use("acme").unwrap()[0].last_packet_at, Some(1_020));

        tx.add_set("corp-vpn", 0, 100, 16).unwrap().unwrap();
        assert!(tx.add_set_entry("corp-vpn", cidr, None, 0, 100).unwrap());
        tx.note_set_packets(&at("corp-vpn", 1_000)).unwrap();
        assert!(tx.remove_set_entry("corp-vpn", cidr).unwrap());
        assert!(tx.add_set_entry("corp-vpn", cidr, None, 0, 1_010).unwrap());
        tx.note_set_packets(&at("corp-vpn", 1_020)).unwrap();
        assert_eq!(tx.set_entries_with_use("corp-vpn").unwrap()[0].last_packet_at, Some(1_020));

        let network = |cidr, created_at| SetEntryDoc { cidr, label: None, created_at, created_by: 0 };
        let doc = SetDoc { created_at: 100, created_by: 0, entries: vec![network(cidr, 1_010), network(other, 1_030)] };
        tx.put_set_doc("corp-vpn", &doc, 16).unwrap().unwrap();
        let listed = tx.set_entries_with_use("corp-vpn").unwrap();
        let uses: Vec<_> = listed.iter().map(|e| (e.cidr, e.last_packet_at)).collect();
        assert_eq!(uses, [(cidr, Some(1_020)), (other, None)], "a network that stays keeps its uses");
        // A node that missed a removal and the network's return sees it with a new creation
        // time: it is another network, without the old one's uses.
        let doc = SetDoc { created_at: 100, created_by: 0, entries: vec![network(cidr, 1_040), network(other, 1_030)] };
        tx.put_set_doc("corp-vpn", &doc, 16).unwrap().unwrap();
        tx.note_set_packets(&at("corp-vpn", 1_050)).unwrap();
        assert_eq!(tx.set_entries_with_use("corp-vpn").unwrap()[0].last_packet_at, Some(1_050));
        tx.note_entry_packets(&at("acme", 1_040)).unwrap();
        tx.execute("UPDATE allow_entries SET created_at = 1045 WHERE account = 'acme'", []).unwrap();
        tx.note_entry_packets(&at("acme", 1_050)).unwrap();
        assert_eq!(tx.entries_with_use("acme").unwrap()[0].last_packet_at, Some(1_050));
    }
}
