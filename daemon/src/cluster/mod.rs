//! A fleet: many ipaccessd nodes sharing one policy through etcd.
//!
//! etcd is the source of truth. Each node follows the fleet's prefix ([`follow`]): it
//! reads a snapshot at one revision, makes its local store and kernel match it (changing
//! only what differs), then applies the watch's events in order, recording the revision it
//! has applied. A change made through a node is checked there against its local copy,
//! written to etcd in one transaction that holds only if none of the keys it read or writes
//! changed since that copy's revision, and acknowledged once the node's own watch has
//! applied it to the kernel.
//!
//! When etcd cannot be reached the node keeps enforcing and answering checks from what it
//! last applied, and refuses changes with `cluster_unavailable`: it fails static, never open.

pub mod attempts;
pub mod clock;
pub mod keys;
mod seed;
pub mod signins;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, Txn, TxnOp, WatchOptions,
};
use log::{error, info, warn};
use tokio::sync::watch;

pub use keys::{BindingValue, FLEET_WIDE, Key, Keys};

use crate::{
    config,
    protocol::{Binding, ErrorCode},
    service::Failure,
    store::{AccountDoc, ActivityRecord, SetDoc},
};

/// How long a change waits for etcd to answer before it is refused as unavailable.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a committed change waits for this node to apply it before the caller is told.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys read per request of a snapshot: a page of account documents is a few MiB (fewer,
/// larger pages read 100,000 accounts faster), within the largest answer the node accepts.
const SNAPSHOT_PAGE: i64 = 5000;
const LARGEST_ANSWER: usize = 64 << 20;
/// A node's record in etcd lapses this long after it stops renewing it.
const NODE_LEASE_SECONDS: i64 = 10;
/// A node publishes its applied revision at once after a pause, and then at most this
/// often while changes stream in: each record is an etcd write, and three nodes writing
/// theirs after every change took a third of a sequential writer's rate from etcd. It is
/// what `--wait-fleet` waits for, so it is also the most that wait may add.
const PUBLISH_GAP: Duration = Duration::from_millis(50);
/// How often a node prunes old audit keys from etcd, and at most how many pages of keys
/// at once (the rest waits for the next time).
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_PAGES: usize = 100;
/// How often the node checks that etcd answers (and so how soon `status` shows an outage).
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long `status` goes on reporting that another daemon published under this node's
/// name after it was last seen: the two overwrite each other's record in turns, a renewal
/// apart, so each sees the other only every other renewal.
const NAME_CLASH_SHOWN: Duration = Duration::from_secs(30);
/// How soon after a failed attempt the follower connects again when a change is waiting
/// for it (see [`Cluster::wait_in_step`]); without one it backs off up to 5 s. A client
/// retrying in a loop thus makes the node read the fleet's snapshot at most this often.
const RECONNECT_FOR_A_CHANGE: Duration = Duration::from_secs(1);

/// What this node knows of its cluster, for `status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// etcd answered the last probe.
    pub connected: bool,
    /// The latest revision etcd reported.
    pub cluster_revision: i64,
    /// The revision this node's store and kernel reflect.
    pub applied_revision: i64,
    /// The revision of the last policy change (or snapshot) it applied.
    pub policy_revision: i64,
    /// Why the last request to etcd failed, while it does.
    pub last_error: Option<String>,
    /// This node's clock minus etcd's, in milliseconds, as last measured ([`clock`]).
    pub clock_offset_ms: Option<i64>,
    /// Another live daemon published under this node's name within [`NAME_CLASH_SHOWN`].
    pub name_in_use_elsewhere: bool,
}

/// One key's change, as the watch delivers it.
#[derive(Debug)]
pub enum Change {
    /// An account's document, or its removal.
    Account(String, Option<AccountDoc>),
    /// A shared set's document, or its removal.
    Set(String, Option<SetDoc>),
    /// A binding of any scope (its `node`), or its removal.
    Binding(Binding, bool),
    /// The audit records one change (or one part of it) wrote.
    Audit(Vec<ActivityRecord>),
    /// The highest override id the fleet has granted: a node's next id is above it, also
    /// when that node joined after the overrides below it had ended.
    OverrideSequence(i64),
}

/// Everything under the prefix at one revision.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub sets: Vec<(String, SetDoc)>,
    pub accounts: Vec<(String, AccountDoc)>,
    pub bindings: Vec<Binding>,
    /// The audit records written after the revision the local copy had applied (all of
    /// them for a copy that never followed the fleet), oldest first: a node that was away
    /// or fell behind a compaction misses no record.
    pub audit: Vec<ActivityRecord>,
    /// etcd's revision went back below the copy's (restored from a backup): `audit` holds
    /// every record, and those the copy has already must not be added again.
    pub audit_may_repeat: bool,
    /// The highest override id the fleet has granted (0: none).
    pub override_sequence: i64,
}

/// What a node's local copy must be able to do: the service implements it.
pub trait Replica: Send + Sync + 'static {
    /// Makes the local copy equal `snapshot`, changing only what differs.
    fn resync(&self, snapshot: Snapshot) -> Result<(), String>;
    /// Applies one batch of changes, all at or below `revision`, and records `revision`.
    fn apply(&self, changes: Vec<Change>, revision: i64) -> Result<(), String>;
    /// Whether the copy asks for a fresh snapshot (asked once: the answer resets it).
    fn wants_resync(&self) -> bool {
        false
    }
}

/// The outcome of a change's transaction in etcd.
pub enum Committed {
    /// Written, at this revision.
    At(i64),
    /// A key it depends on changed after the local copy's revision; nothing was written.
    /// etcd was at this revision: the caller waits for it (without the writer lock) so that
    /// a retry is checked against what won.
    Conflict(i64),
    /// A change too large for one etcd transaction was written in parts, and part `done`
    /// (of `parts`) conflicted: the parts before it are committed, up to `revision`.
    Partial { revision: i64, done: usize, parts: usize },
}

/// A key a change depends on: it must not have changed since the local copy's revision
/// (or since an earlier part of the same change wrote it).
#[derive(Clone)]
pub enum Guard {
    /// Not modified (nor created) since.
    Key(String),
    /// Not modified since, and not deleted: a key the local copy has. (etcd compares a
    /// deleted key as one never written, so a modification check alone would pass it.)
    Existing(String),
    /// Every key in `[start, end)`.
    Range(String, String),
}

pub enum Write {
    Put(String, Vec<u8>),
    Delete(String),
}

/// What one account, binding or record of a change writes, with its guards: a unit is
/// never split between two etcd transactions.
#[derive(Default)]
pub struct Unit {
    pub guards: Vec<Guard>,
    pub writes: Vec<Write>,
    /// Its audit records: written with the unit, all of one part's in one key.
    pub audit: Vec<ActivityRecord>,
}

/// etcd's defaults: 128 operations (and as many compares) and 1.5 MiB per request. A change
/// that needs more is written in parts of at most this many operations and bytes (one
/// operation of each part is its audit records).
const PART_OPERATIONS: usize = 127;
const PART_BYTES: usize = 1 << 20;
/// The largest document one key may hold: a part of its own, with room for its key and
/// audit record under etcd's request limit.
pub const MAX_DOCUMENT_BYTES: usize = PART_BYTES;

/// This node's handle on its fleet.
pub struct Cluster {
    keys: Keys,
    node: String,
    config: config::Cluster,
    runtime: tokio::runtime::Handle,
    client: Mutex<Option<Client>>,
    /// When audit keys past the retention were last pruned from etcd.
    pruned_at: Mutex<Option<Instant>>,
    /// Every policy event up to this revision has been applied (events, a snapshot, or a
    /// progress report from etcd saying nothing else came).
    applied: watch::Sender<i64>,
    /// The revision of the last policy event or snapshot applied: what the node publishes
    /// (publishing on every progress report would feed itself).
    policy: watch::Sender<i64>,
    /// Odd while this node is in step with etcd (it has taken etcd's policy since it last
    /// connected), even while it is not; it moves on at each change between the two, so a
    /// change checked against the copy in one stretch is never sent in another.
    step: watch::Sender<u64>,
    /// Cuts the follower's pause before its next attempt short: a change is waiting.
    reconnect_now: tokio::sync::Notify,
    health: Mutex<Health>,
    /// When a record of another daemon was last found under this node's name ([`publish`]).
    name_clash_seen: Mutex<Option<Instant>>,
    /// The other nodes' published sign-ins, for the lockout guard ([`signins::follow`]).
    signin_mirror: signins::Mirror,
}

impl Cluster {
    /// A handle for a node whose local copy has applied `applied` (0 if none).
    pub fn new(config: &config::Cluster, runtime: tokio::runtime::Handle, applied: i64) -> Arc<Cluster> {
        let (applied_tx, _) = watch::channel(applied);
        let (policy_tx, _) = watch::channel(applied);
        Arc::new(Cluster {
            keys: Keys::new(&config.prefix),
            node: config.node.clone(),
            config: config.clone(),
            runtime,
            client: Mutex::new(None),
            pruned_at: Mutex::new(None),
            applied: applied_tx,
            policy: policy_tx,
            step: watch::channel(0).0,
            reconnect_now: tokio::sync::Notify::new(),
            health: Mutex::new(Health { applied_revision: applied, ..Health::default() }),
            name_clash_seen: Mutex::new(None),
            signin_mirror: signins::Mirror::new(&config.node),
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn health(&self) -> Health {
        let mut health = self.health.lock().expect("health lock").clone();
        // Read in the reverse order of `set_applied`'s writes, so that one status never
        // shows a policy revision ahead of the applied one.
        health.policy_revision = *self.policy.borrow();
        health.applied_revision = *self.applied.borrow();
        let clash = *self.name_clash_seen.lock().expect("name clash lock");
        health.name_in_use_elsewhere = clash.is_some_and(|seen| seen.elapsed() < NAME_CLASH_SHOWN);
        health
    }

    /// Another live daemon's record is under this node's name (a configuration copied
    /// without changing `node`): node-scoped bindings and `--wait-fleet` cannot tell the two
    /// apart. Logged once per episode; `status` shows it for [`NAME_CLASH_SHOWN`].
    fn name_clash(&self) {
        let mut seen = self.name_clash_seen.lock().expect("name clash lock");
        if seen.is_none_or(|at| at.elapsed() >= NAME_CLASH_SHOWN) {
            error!(
                "cluster: another ipaccessd publishes under this node's name {:?}: each node of a fleet needs its own \
                 [cluster] node name (bindings scoped to a node, and --wait-fleet, go by it)",
                self.node
            );
        }
        *seen = Some(Instant::now());
    }

    /// The revision the local copy reflects.
    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Records that everything up to `revision` is applied; `policy` when a policy event or
    /// a snapshot brought it (not a progress report).
    fn set_applied(&self, revision: i64, policy: bool) {
        let advance = |applied: &mut i64| {
            let newer = revision > *applied;
            if newer {
                *applied = revision;
            }
            newer
        };
        // `applied` first: whoever wakes on `policy` (a change or an import waiting to be
        // enforced) and then asks for the status must find `applied` at least as far.
        self.applied.send_if_modified(advance);
        if policy {
            self.policy.send_if_modified(advance);
        }
    }

    /// Records a snapshot's revision: everything up to it is applied, and nothing after it,
    /// even when this node had counted further (etcd's history went back).
    fn set_applied_from_snapshot(&self, revision: i64) {
        if revision >= *self.applied.borrow() {
            return self.set_applied(revision, true);
        }
        // Down in the reverse order of `set_applied`'s, so that `health` (which reads
        // `policy` first) never shows a policy revision ahead of the applied one.
        self.policy.send_replace(revision);
        self.applied.send_replace(revision);
        self.health.lock().expect("health lock").cluster_revision = revision;
    }

    /// The stretch this node is in: see [`Cluster::wait_in_step`].
    pub fn step(&self) -> u64 {
        *self.step.borrow()
    }

    fn set_in_step(&self, in_step: bool) {
        self.step.send_if_modified(|step| {
            let moves = (*step % 2 == 1) != in_step;
            if moves {
                *step += 1;
            }
            moves
        });
    }

    fn connected(&self, revision: i64) {
        let mut health = self.health.lock().expect("health lock");
        if !health.connected {
            info!("cluster: etcd answers again (revision {revision})");
        }
        health.connected = true;
        health.cluster_revision = health.cluster_revision.max(revision);
        health.last_error = None;
    }

    fn saw_revision(&self, revision: i64) {
        let mut health = self.health.lock().expect("health lock");
        health.cluster_revision = health.cluster_revision.max(revision);
    }

    fn failed(&self, why: String) {
        let mut health = self.health.lock().expect("health lock");
        if health.connected || health.last_error.is_none() {
            warn!("cluster: {why}; enforcing the last policy applied (revision {})", self.applied());
        }
        health.connected = false;
        health.last_error = Some(why);
    }

    /// Writes one change: `compares` must all hold in etcd, and then `ops` are applied
    /// atomically. Blocks (the caller is a connection's thread, not the runtime).
    pub fn commit(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Committed, Failure> {
        let Some(mut client) = self.client.lock().expect("client lock").clone() else {
            return Err(unavailable("this node has not reached etcd since it started"));
        };
        let txn = Txn::new().when(compares).and_then(ops);
        // The timer is made inside the runtime: this thread is not one of its own.
        let answer = self.runtime.block_on(async { tokio::time::timeout(WRITE_TIMEOUT, client.txn(txn)).await });
        let response = match answer {
            // Sent, and no answer: etcd may still commit it once a quorum is back.
            Err(_) => {
                self.failed(format!("etcd did not answer a change within {WRITE_TIMEOUT:?}"));
                return Err(outcome_unknown(&format!("etcd did not answer within {WRITE_TIMEOUT:?}")));
            }
            // Refused as it is (too many operations, too large, not permitted): etcd is well,
            // and the change was not applied.
            Ok(Err(etcd_client::Error::GRpcStatus(status)))
                if matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::FailedPrecondition
                ) =>
            {
                return Err(Failure::new(
                    ErrorCode::Internal,
                    format!("etcd refused the change as it is ({}); nothing was changed", status.message()),
                ));
            }
            Ok(Err(e)) => {
                self.failed(format!("etcd refused a change: {e}"));
                return Err(outcome_unknown(&e.to_string()));
            }
            Ok(Ok(response)) => response,
        };
        let revision = response.header().map_or(0, |h| h.revision());
        self.connected(revision);
        Ok(if response.succeeded() { Committed::At(revision) } else { Committed::Conflict(revision) })
    }

    /// Writes a change's units: in one etcd transaction when they fit (nearly every change),
    /// else in parts, in order. `applied` is the local copy's revision the change was
    /// checked against; `step`, the stretch in step with etcd it was checked in (see
    /// [`Cluster::wait_in_step`]): no part is sent once the node has left it.
    pub fn commit_units(&self, units: Vec<Unit>, applied: i64, step: Option<u64>) -> Result<Committed, Failure> {
        let mut parts: Vec<Vec<Unit>> = vec![Vec::new()];
        let (mut operations, mut bytes) = (0, 0);
        for unit in units {
            let compares: usize = unit.guards.iter().map(|g| if matches!(g, Guard::Existing(_)) { 2 } else { 1 }).sum();
            let unit_operations = compares.max(unit.writes.len());
            let unit_bytes: usize = unit
                .writes
                .iter()
                .map(|w| match w {
                    Write::Put(key, value) => key.len() + value.len(),
                    Write::Delete(key) => key.len(),
                })
                .sum::<usize>()
                + unit.audit.len() * 256;
            if operations + unit_operations > PART_OPERATIONS || bytes + unit_bytes > PART_BYTES {
                if !parts.last().expect("one part").is_empty() {
                    parts.push(Vec::new());
                }
                (operations, bytes) = (0, 0);
            }
            operations += unit_operations;
            bytes += unit_bytes;
            parts.last_mut().expect("one part").push(unit);
        }
        let count = parts.len();
        // Keys an earlier part wrote, and at which revision: later parts hold them to that.
        let mut written_at: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
        let mut revision = applied;
        for (done, part) in parts.into_iter().enumerate() {
            let mut compares = Vec::new();
            let mut seen = std::collections::HashSet::new();
            let mut ops = Vec::new();
            let mut written = Vec::new();
            let mut audit = Vec::new();
            for unit in part {
                audit.extend(unit.audit);
                for guard in unit.guards {
                    let compare = match guard {
                        Guard::Key(key) | Guard::Existing(key) if !seen.insert(key.clone()) => continue,
                        Guard::Key(key) => {
                            let bound = written_at.get(&key).copied().unwrap_or(applied);
                            Compare::mod_revision(key, CompareOp::Less, bound + 1)
                        }
                        Guard::Existing(key) => {
                            let bound = written_at.get(&key).copied().unwrap_or(applied);
                            compares.push(Compare::version(key.clone(), CompareOp::Greater, 0));
                            Compare::mod_revision(key, CompareOp::Less, bound + 1)
                        }
                        Guard::Range(start, end) => {
                            if !seen.insert(format!("{start}\0{end}")) {
                                continue;
                            }
                            // Keys of the range an earlier part wrote are this change's own.
                            let bound = written_at
                                .iter()
                                .filter(|(key, _)| **key >= start && **key < end)
                                .map(|(_, &at)| at)
                                .fold(applied, i64::max);
                            Compare::mod_revision(start, CompareOp::Less, bound + 1).with_range(end)
                        }
                    };
                    compares.push(compare);
                }
                for write in unit.writes {
                    match write {
                        Write::Put(key, value) => {
                            written.push(key.clone());
                            ops.push(TxnOp::put(key, value, None));
                        }
                        Write::Delete(key) => {
                            written.push(key.clone());
                            ops.push(TxnOp::delete(key, None));
                        }
                    }
                }
            }
            if !audit.is_empty() {
                let unique =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
                let time = audit.iter().map(|a| a.time).min().unwrap_or(0);
                let key = self.keys.audit(time, &self.node, &format!("{unique}-{done}"));
                ops.push(TxnOp::put(key, serde_json::to_vec(&audit).expect("audit records serialize"), None));
            }
            let committed = match step {
                Some(step) if step != self.step() => Err(unavailable(
                    "this node lost its connection to etcd while the change was being made, and must take etcd's \
                     policy again first",
                )),
                _ => self.commit(compares, ops),
            };
            match committed {
                Ok(Committed::At(at)) => {
                    revision = at;
                    written_at.extend(written.into_iter().map(|key| (key, at)));
                }
                Ok(Committed::Conflict(at)) if done == 0 => return Ok(Committed::Conflict(at)),
                Ok(Committed::Conflict(at)) => return Ok(Committed::Partial { revision: at, done, parts: count }),
                Ok(partial @ Committed::Partial { .. }) => return Ok(partial),
                Err(e) if done == 0 => return Err(e),
                Err(e) => {
                    warn!("cluster: a change in {count} parts stopped after {done}: {}", e.0.message);
                    return Ok(Committed::Partial { revision, done, parts: count });
                }
            }
        }
        Ok(Committed::At(revision))
    }

    /// The live nodes and the policy revision each has applied, as they published it.
    pub fn nodes(&self) -> Result<Vec<(String, i64)>, String> {
        let Some(mut client) = self.client.lock().expect("client lock").clone() else {
            return Err("this node has not reached etcd since it started".into());
        };
        let (start, end) = self.keys.nodes();
        let read = async {
            tokio::time::timeout(PROBE_EVERY, client.get(start.clone(), Some(GetOptions::new().with_range(end)))).await
        };
        let answer = match self.runtime.block_on(read) {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("etcd did not answer within {PROBE_EVERY:?}")),
        };
        Ok(answer
            .kvs()
            .iter()
            .filter_map(|kv| {
                let name = kv.key_str().ok()?.strip_prefix(start.as_str())?.to_owned();
                let value: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
                Some((name, value.get("policy_revision")?.as_i64()?))
            })
            .collect())
    }

    /// Waits until the local copy has applied `revision`; false if it has not in time.
    /// Deletes the fleet's audit records older than `before` (unix seconds), at most every
    /// [`PRUNE_EVERY`] on this node; every node does it, so it goes on while any node runs.
    /// Keys are deleted a page at a time, so no node's watch receives one huge event.
    /// Blocks; failures wait for the next time.
    pub fn prune_audit(&self, before: i64) {
        let Some(mut client) = self.client.lock().expect("client lock").clone() else { return };
        {
            let mut pruned_at = self.pruned_at.lock().expect("prune lock");
            if pruned_at.is_some_and(|at| at.elapsed() < PRUNE_EVERY) {
                return;
            }
            *pruned_at = Some(Instant::now());
        }
        let (start, end) = self.keys.audit_before(before);
        let prune = async {
            let mut deleted = 0;
            for _ in 0..PRUNE_PAGES {
                let page = GetOptions::new().with_range(end.clone()).with_keys_only().with_limit(SNAPSHOT_PAGE);
                let page = client.get(start.clone(), Some(page)).await?;
                let Some(last) = page.kvs().last() else { break };
                let mut through = last.key().to_vec();
                through.push(0);
                let options = DeleteOptions::new().with_range(through);
                deleted += client.delete(start.clone(), Some(options)).await?.deleted();
                if !page.more() {
                    break;
                }
            }
            Ok::<i64, etcd_client::Error>(deleted)
        };
        match self.runtime.block_on(prune) {
            Ok(0) => {}
            Ok(deleted) => info!("cluster: pruned {deleted} audit keys older than the retention from etcd"),
            Err(e) => warn!("cluster: pruning old audit keys from etcd failed ({e}); trying again later"),
        }
    }

    /// Waits (at most [`WRITE_TIMEOUT`]) until this node is in step with etcd: it has taken
    /// etcd's policy since it last connected, after a start as after an outage. Returns the
    /// stretch it is in ([`Cluster::step`]), or `None` if it is not in step by then.
    ///
    /// A change is checked against the local copy and sent with guards at the copy's
    /// revision, which mean something only in the history etcd has: an etcd restored from a
    /// backup has gone back to lower revisions, and every guard would hold against it. So a
    /// change is made only in step, and sent only in the same stretch (see
    /// [`Cluster::commit_units`]). Call it without the writer lock: the resync needs it.
    pub fn wait_in_step(&self) -> Option<u64> {
        let mut step = self.step.subscribe();
        let now = *step.borrow_and_update();
        if now % 2 == 1 {
            return Some(now);
        }
        // Never in step, and failing: the change is refused at once, as not following.
        if self.applied() == 0 && self.health.lock().expect("health lock").last_error.is_some() {
            return None;
        }
        self.reconnect_now.notify_one();
        let wait =
            async { tokio::time::timeout(WRITE_TIMEOUT, step.wait_for(|s| s % 2 == 1)).await.ok()?.ok().map(|s| *s) };
        self.runtime.block_on(wait)
    }

    /// Waits (at most [`APPLY_TIMEOUT`]) until this node is in step with etcd at `revision`,
    /// however it learnt so (events, a snapshot, or etcd's progress report).
    pub fn wait_applied(&self, revision: i64) -> bool {
        Self::wait_for(&self.runtime, &self.applied, revision)
    }

    /// Waits (at most [`APPLY_TIMEOUT`]) until this node has applied the policy events of
    /// revision `revision`, a change of its own it is about to acknowledge: only applied
    /// events or a snapshot count, never a progress report.
    pub fn wait_enforced(&self, revision: i64) -> bool {
        Self::wait_for(&self.runtime, &self.policy, revision)
    }

    fn wait_for(runtime: &tokio::runtime::Handle, revision: &watch::Sender<i64>, wanted: i64) -> bool {
        let mut seen = revision.subscribe();
        let wait = async { tokio::time::timeout(APPLY_TIMEOUT, seen.wait_for(|&r| r >= wanted)).await };
        runtime.block_on(wait).is_ok_and(|r| r.is_ok())
    }

    async fn connect(&self) -> Result<Client, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(WRITE_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from the others answers "no leader" instead of stale reads.
            .with_require_leader(true);
        let c = &self.config;
        if let (Some(user), Some(file)) = (&c.username, &c.password_file) {
            let password = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
            options = options.with_user(user, password.trim_end_matches(['\r', '\n']));
        }
        if c.ca_file.is_some() || c.cert_file.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &c.ca_file {
                let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            if let (Some(cert), Some(key)) = (&c.cert_file, &c.key_file) {
                let cert = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
                let key = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            options = options.with_tls(tls);
        }
        Client::connect(&c.endpoints, Some(options)).await.map_err(|e| format!("cannot reach etcd: {e}"))
    }

    /// Reads the accounts, bindings and audit records under the prefix at one revision, a
    /// page at a time. Audit records etcd wrote at or before `applied` are in the copy
    /// already, and are not even read.
    async fn snapshot(&self, client: &Client, applied: i64) -> Result<Snapshot, String> {
        let mut snapshot = Snapshot::default();
        for (start, end) in self.keys.snapshot_ranges() {
            let read = read_range(client, start, end, snapshot.revision, |kv| {
                if kv.mod_revision() <= applied && self.keys.parse(kv.key()) == Key::Audit {
                    return;
                }
                match self.decode(kv.key(), Some(kv.value())) {
                    Some(Change::Account(id, Some(doc))) => snapshot.accounts.push((id, doc)),
                    Some(Change::Set(name, Some(doc))) => snapshot.sets.push((name, doc)),
                    Some(Change::Binding(binding, true)) => snapshot.bindings.push(binding),
                    Some(Change::Audit(records)) => snapshot.audit.extend(records),
                    Some(Change::OverrideSequence(n)) => snapshot.override_sequence = n,
                    _ => {}
                }
            });
            snapshot.revision = read.await.map_err(|e| format!("snapshot: {e}"))?;
        }
        Ok(snapshot)
    }

    /// What one key's new value (or `None`: its deletion) means for this node; `None` for
    /// keys it has no use for (sequences, unknown keys).
    fn decode(&self, key: &[u8], value: Option<&[u8]>) -> Option<Change> {
        match self.keys.parse(key) {
            Key::Account(id) => match value.map(serde_json::from_slice::<AccountDoc>) {
                None => Some(Change::Account(id, None)),
                Some(Ok(doc)) => Some(Change::Account(id, Some(doc))),
                Some(Err(e)) => {
                    warn!("cluster: account {id}'s document does not read ({e}); ignored");
                    None
                }
            },
            Key::Set(name) => match value.map(serde_json::from_slice::<SetDoc>) {
                None => Some(Change::Set(name, None)),
                Some(Ok(doc)) => Some(Change::Set(name, Some(doc))),
                Some(Err(e)) => {
                    warn!("cluster: the set {name}'s document does not read ({e}); ignored");
                    None
                }
            },
            // Every node's bindings: the local copy lists the fleet's; the kernel takes only
            // those enforced here (see `service::bindings::for_kernel`).
            Key::Binding(addr, target, scope) => match value {
                None => {
                    let gone =
                        Binding { account: String::new(), addr, target, created_at: 0, node: keys::node_of(&scope) };
                    Some(Change::Binding(gone, false))
                }
                Some(value) => match serde_json::from_slice::<BindingValue>(value) {
                    Ok(v) => Some(Change::Binding(v.binding(addr, target, &scope), true)),
                    Err(e) => {
                        warn!("cluster: the binding {} does not read ({e}); ignored", String::from_utf8_lossy(key));
                        None
                    }
                },
            },
            Key::Audit => value.and_then(|v| serde_json::from_slice::<Vec<ActivityRecord>>(v).ok()).map(Change::Audit),
            Key::OverrideSequence => {
                value.and_then(|v| std::str::from_utf8(v).ok()?.parse().ok()).map(Change::OverrideSequence)
            }
            _ => None,
        }
    }

    /// One pass: connect, resynchronise from a snapshot, then apply the watch until it
    /// fails. Returns why it stopped.
    async fn follow_once(&self, replica: &Arc<dyn Replica>) -> String {
        let mut client = match self.connect().await {
            Ok(client) => client,
            Err(e) => return e,
        };
        *self.client.lock().expect("client lock") = Some(client.clone());
        // Each turn: a snapshot, then the watch from its revision. The watch ends the turn
        // early only when the copy asks for a fresh snapshot (see `Replica::wants_resync`).
        loop {
            let started = Instant::now();
            let applied = self.applied();
            let mut snapshot = match self.snapshot(&client, applied).await {
                Ok(snapshot) => snapshot,
                Err(e) => return e,
            };
            if snapshot.revision < applied {
                // etcd's revisions never go back, unless its data was restored from a backup
                // (or another cluster answers at these endpoints). Its policy is the fleet's
                // now; revisions this node counted before mean nothing there, so it follows
                // etcd's from here on. The audit records are read again, all of them: the
                // ones written since the restore are numbered below `applied`.
                warn!(
                    "cluster: etcd is at revision {}, behind the {applied} this node had applied: its data was \
                     restored from an earlier backup, or these endpoints reach another cluster. Taking etcd's policy \
                     as it is now",
                    snapshot.revision
                );
                snapshot = match self.snapshot(&client, 0).await {
                    Ok(snapshot) => Snapshot { audit_may_repeat: true, ..snapshot },
                    Err(e) => return e,
                };
            }
            let (revision, read) = (snapshot.revision, started.elapsed());
            let (accounts, bindings) = (snapshot.accounts.len(), snapshot.bindings.len());
            let resync = {
                let replica = replica.clone();
                tokio::task::spawn_blocking(move || replica.resync(snapshot)).await
            };
            match resync {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return format!("resynchronising from revision {revision}: {e}"),
                Err(e) => return format!("resynchronising from revision {revision}: {e}"),
            }
            self.set_applied_from_snapshot(revision);
            self.set_in_step(true);
            self.connected(revision);
            info!(
                "cluster: in step with etcd at revision {revision} ({accounts} accounts, {bindings} bindings; read in \
             {read:.2?}, applied in {:.2?})",
                started.elapsed() - read
            );
            let (start, end) = self.keys.policy_range();
            let options = WatchOptions::new().with_range(end).with_start_revision(revision + 1).with_progress_notify();
            let mut stream = match client.watch(start, Some(options)).await {
                Ok(stream) => stream,
                Err(e) => return format!("watch: {e}"),
            };
            // etcd reports progress when asked: then this node knows it has every policy event
            // up to etcd's revision, even when the last writes were other keys (node records).
            let mut progress = tokio::time::interval(PROBE_EVERY);
            // etcd 3.4 before 3.4.24 may send a progress report ahead of events it has queued
            // for this watch: a report is believed only when the next one comes (a second
            // later), by which time those events have arrived.
            let mut reported: Option<i64> = None;
            loop {
                let response = tokio::select! {
                    message = stream.message() => match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return "etcd ended the watch".into(),
                        Err(e) => return format!("watch: {e}"),
                    },
                    _ = progress.tick() => {
                        if replica.wants_resync() {
                            info!("cluster: a resync was asked for by this node's copy; taking a fresh snapshot");
                            break;
                        }
                        if let Err(e) = stream.request_progress().await {
                            return format!("watch: {e}");
                        }
                        continue;
                    }
                };
                if response.canceled() {
                    let compacted = response.compact_revision();
                    return if compacted > 0 {
                        format!("the watch fell behind etcd's compaction (revision {compacted}); resynchronising")
                    } else {
                        format!("etcd cancelled the watch: {}", response.cancel_reason())
                    };
                }
                let header_revision = response.header().map_or(0, |h| h.revision());
                // A member answers the watch from its own state, also for a while after it has
                // lost its quorum: only the probe (a linearizable read) says etcd can be used.
                self.saw_revision(header_revision);
                let events = response.events();
                let Some(last) = events.iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision()).max() else {
                    if !response.created()
                        && let Some(earlier) = reported.replace(header_revision)
                    {
                        self.set_applied(earlier, false);
                    }
                    continue;
                };
                let changes: Vec<Change> = events
                    .iter()
                    .filter_map(|event| {
                        let kv = event.kv()?;
                        let value = (event.event_type() == EventType::Put).then(|| kv.value());
                        self.decode(kv.key(), value)
                    })
                    .collect();
                if changes.is_empty() {
                    // Keys this node has no use for (the sequence, unknown keys).
                    self.set_applied(last, false);
                    continue;
                }
                let replica = replica.clone();
                match tokio::task::spawn_blocking(move || replica.apply(changes, last)).await {
                    Ok(Ok(())) => self.set_applied(last, true),
                    Ok(Err(e)) => return format!("applying revision {last}: {e}"),
                    Err(e) => return format!("applying revision {last}: {e}"),
                }
            }
        }
    }
}

/// Reads every key in `[start, end)` at `revision` (etcd's latest when 0), a page at a
/// time, handing each to `each`; returns the revision read at.
async fn read_range(
    client: &Client,
    start: String,
    end: String,
    mut revision: i64,
    mut each: impl FnMut(&KeyValue),
) -> Result<i64, etcd_client::Error> {
    let kv = client.kv_client().max_decoding_message_size(LARGEST_ANSWER);
    let (mut from, end) = (start.into_bytes(), end.into_bytes());
    // Bounded: each page moves `from` past its last key, and the range is finite.
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(SNAPSHOT_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        // A page is asked again rather than the whole read started over.
        let page = read_again_if_unavailable(|| {
            // The clients are handles on one shared connection: a copy per try is cheap.
            let (mut kv, from, options) = (kv.clone(), from.clone(), options.clone());
            async move { kv.get(from, Some(options)).await }
        })
        .await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        page.kvs().iter().for_each(&mut each);
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(revision),
        }
    }
}

/// Runs a read, and runs it again (a few times, 50 ms apart) when the member it reached is
/// unavailable. The client spreads requests over the endpoints and now and then tries one
/// that is down or not yet listening, while the others hold a quorum: one such answer says
/// nothing about the fleet's store. Only reads go through here; they are safe to repeat.
async fn read_again_if_unavailable<T, F, Fut>(mut read: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut tries = 0;
    loop {
        match read().await {
            Err(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::Unavailable && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            answer => return answer,
        }
    }
}

/// Follows the fleet for as long as the daemon runs: after any failure, it reconnects (with
/// a growing pause, up to 5 s) and resynchronises.
pub async fn follow(cluster: Arc<Cluster>, replica: Arc<dyn Replica>) {
    let _probe = AbortOnDrop(tokio::spawn(probe(cluster.clone())));
    let _publish = AbortOnDrop(tokio::spawn(publish(cluster.clone())));
    let _clock = AbortOnDrop(tokio::spawn(clock::watch(cluster.clone())));
    let _signins = AbortOnDrop(tokio::spawn(signins::follow(cluster.clone())));
    let mut pause = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        let why = cluster.follow_once(&replica).await;
        cluster.set_in_step(false);
        cluster.failed(why);
        if started.elapsed() > Duration::from_secs(10) {
            pause = Duration::from_millis(100);
        }
        let failed_at = tokio::time::Instant::now();
        tokio::select! {
            _ = tokio::time::sleep_until(failed_at + pause) => {}
            _ = cluster.reconnect_now.notified() => {
                tokio::time::sleep_until(failed_at + pause.min(RECONNECT_FOR_A_CHANGE)).await;
            }
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

/// Stops a task when its owner stops.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publishes this node's applied revision under `P/~nodes/<node>`, on a lease that lapses
/// when the node stops, so that `status` (and `ipaccessctl --wait-fleet`) can see which
/// live nodes have applied a change.
async fn publish(cluster: Arc<Cluster>) {
    let (mut applied, mut step) = (cluster.policy.subscribe(), cluster.step.subscribe());
    loop {
        let Some(mut client) = cluster.client.lock().expect("client lock").clone() else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let lease = match client.lease_grant(NODE_LEASE_SECONDS, None).await {
            Ok(lease) => lease.id(),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok((mut keeper, mut answers)) = client.lease_keep_alive(lease).await else {
            continue;
        };
        let mut renew = tokio::time::interval(Duration::from_secs(NODE_LEASE_SECONDS as u64 / 3));
        let (mut published, mut next_put) = (-1, tokio::time::Instant::now());
        loop {
            let revision = *applied.borrow_and_update();
            let behind = revision != published;
            // Only in step with etcd: until its first snapshot since it connected, a node's
            // copy may be ahead of an etcd restored from a backup, and publishing it would
            // tell `--wait-fleet` that the node has changes it has never seen.
            let in_step = *step.borrow_and_update() % 2 == 1;
            tokio::select! {
                _ = tokio::time::sleep_until(next_put), if behind && in_step => {
                    let value = serde_json::json!({ "policy_revision": revision }).to_string();
                    let options = PutOptions::new().with_lease(lease);
                    if client.put(cluster.keys.node(&cluster.node), value, Some(options)).await.is_err() {
                        break;
                    }
                    (published, next_put) = (revision, tokio::time::Instant::now() + PUBLISH_GAP);
                }
                changed = applied.changed(), if !behind => if changed.is_err() { return },
                changed = step.changed(), if !in_step => if changed.is_err() { return },
                _ = renew.tick() => {
                    if keeper.keep_alive().await.is_err() || !matches!(answers.message().await, Ok(Some(a)) if a.ttl() > 0) {
                        break;
                    }
                    // Our record is under our lease once put: another lease there is another
                    // live daemon with this name. Written again, so that it sees us too.
                    if published >= 0
                        && let Ok(answer) = client.get(cluster.keys.node(&cluster.node), None).await
                        && answer.kvs().first().is_some_and(|kv| kv.lease() != lease)
                    {
                        cluster.name_clash();
                        published = -1;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Asks etcd for one key every second, so that an outage shows in `status` even while no
/// change is made and the watch is silent.
async fn probe(cluster: Arc<Cluster>) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    loop {
        every.tick().await;
        let Some(client) = cluster.client.lock().expect("client lock").clone() else {
            continue;
        };
        let key = cluster.keys.override_sequence();
        let read = read_again_if_unavailable(|| {
            let (mut client, key) = (client.clone(), key.clone());
            async move { client.get(key, None).await }
        });
        match tokio::time::timeout(PROBE_EVERY, read).await {
            Ok(Ok(answer)) => cluster.connected(answer.header().map_or(0, |h| h.revision())),
            Ok(Err(e)) => cluster.failed(format!("etcd: {e}")),
            Err(_) => cluster.failed(format!("etcd did not answer within {PROBE_EVERY:?}")),
        }
    }
}

pub fn unavailable(why: &str) -> Failure {
    Failure::new(
        ErrorCode::ClusterUnavailable,
        format!(
            "the fleet's store (etcd) cannot take changes now ({why}); nothing was changed, and the policy in force stays enforced"
        ),
    )
}

/// A change was sent and etcd did not confirm it: a quorum that comes back may still
/// commit it, so the caller must look before repeating it.
fn outcome_unknown(why: &str) -> Failure {
    Failure::new(
        ErrorCode::ClusterUnavailable,
        format!(
            "the fleet's store (etcd) did not confirm the change ({why}); it is not in force on this node, but etcd \
             may still commit it when it recovers: check before repeating it. The policy in force stays enforced"
        ),
    )
}

/// A change written in parts stopped part-way: what came before is committed.
/// `set` names the shared set the change deleted or changed, if it did.
pub fn partial(done: usize, parts: usize, set: Option<&str>) -> Failure {
    let again = match set {
        // The set's own document goes in the last part (see `service::fleet`).
        Some(set) => format!(
            "A forced deletion of the set {set} writes the set's own removal last, so the set is still there and \
             still referenced where the failed parts did not reach: send the same request again to finish it"
        ),
        None => "An import can be sent again as it is".to_owned(),
    };
    Failure::with_details(
        ErrorCode::Conflict,
        format!(
            "the change was too large for one etcd transaction and was written in {parts} parts; the first {done} \
             are committed and in force, the rest conflicted with another node's change or could not be written. \
             {again}"
        ),
        // A client must not read this `conflict` as "nothing was changed".
        serde_json::json!({ "parts": parts, "committed_parts": done }),
    )
}

/// The caller's change lost a race with another node's; nothing was written.
pub fn conflict() -> Failure {
    Failure::new(
        ErrorCode::Conflict,
        "another change to the same account or endpoint was committed first on another node; nothing was changed, \
         and this node now has that change: try again",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that sees the policy revision reach `r` (an import waiting to be enforced)
    /// and then asks for the status never finds the applied revision behind `r`.
    /// A handle on no reachable etcd: the revision counters alone.
    fn offline_cluster(runtime: &tokio::runtime::Runtime) -> Arc<Cluster> {
        let config = config::Cluster {
            endpoints: vec!["http://127.0.0.1:1".into()],
            prefix: "/t/".into(),
            node: "n".into(),
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
        };
        Cluster::new(&config, runtime.handle().clone(), 0)
    }

    #[test]
    fn the_applied_revision_is_never_behind_the_policy_revision() {
        use std::sync::atomic::{AtomicI64, Ordering};
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cluster = offline_cluster(&runtime);
        const LAST: i64 = 20_000;
        // In lockstep: the writer advances only once the reader has seen the last revision,
        // so the reader is always watching when a revision is recorded.
        let seen = Arc::new(AtomicI64::new(0));
        let writer = {
            let (cluster, seen) = (cluster.clone(), seen.clone());
            std::thread::spawn(move || {
                for r in 1..=LAST {
                    cluster.set_applied(r, true);
                    spin_until(|| seen.load(Ordering::Acquire) >= r);
                }
            })
        };
        let mut behind = 0;
        for wanted in 1..=LAST {
            spin_until(|| *cluster.policy.borrow() >= wanted);
            behind += usize::from(cluster.applied() < wanted);
            seen.store(wanted, Ordering::Release);
        }
        writer.join().unwrap();
        assert_eq!(behind, 0, "the applied revision was seen behind the policy revision {behind} times in {LAST}");
    }

    /// One `health` (what `status` and the metrics show) never has the policy revision
    /// ahead of the applied one, however the revisions move while it is read.
    #[test]
    fn a_health_report_never_shows_the_policy_revision_ahead() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let cluster = offline_cluster(&runtime);
        const LAST: i64 = 2_000_000;
        let writer = {
            let cluster = cluster.clone();
            std::thread::spawn(move || (1..=LAST).for_each(|r| cluster.set_applied(r, true)))
        };
        let (mut reports, mut ahead) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let health = cluster.health();
            reports += 1;
            ahead += u64::from(health.policy_revision > health.applied_revision);
            if health.policy_revision == LAST {
                break;
            }
            assert!(Instant::now() < deadline, "the writer stopped at {}", health.policy_revision);
        }
        writer.join().unwrap();
        assert_eq!(ahead, 0, "{ahead} of {reports} reports had the policy revision ahead of the applied one");
    }

    /// Polls without sleeping (the window under test is a few instructions wide) for at
    /// most 10 s, yielding so that the other thread runs even when both share one core.
    fn spin_until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "the other thread stopped");
            std::thread::yield_now();
        }
    }
}
