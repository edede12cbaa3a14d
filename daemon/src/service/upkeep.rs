//! Periodic work: expired overrides and entries leave the kernel's tables and are audited,
//! old activity is pruned, and the kernel's drop samples move into the activity log.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::atomic::Ordering,
};

use ipnet::IpNet;
use log::{debug, info, warn};
use serde_json::json;

use super::{
    Failure, Service, ServiceError, Writer,
    change::{apply_account, audit},
    now,
};
use crate::{
    activity::{Drops, EntryUses},
    logging::PendingAudit,
    policy::suspended,
};

/// Most drop samples moved per drain (the ring holds more; the next drain takes them).
const SAMPLES_PER_DRAIN: usize = 4096;

/// Slots of last-used stamps scanned under one hold of the writer lock (512 KiB of stamps).
const LAST_USED_SCAN_SLOTS: u32 = 1 << 16;

/// How often (s) the sweep searches every audit record for expired ones: a record left
/// behind by the quick pass (the clock was set back) stays at most this much longer.
const THOROUGH_PRUNE_EVERY: i64 = 3600;

/// Stamped keys credited to their entries under one taking of the cache's read lock.
const CACHE_PART: usize = 4_096;

/// Accounts whose probe order is decided under one taking of the writer lock: each reads a
/// table header (about 0.1 ms for this many).
const REORDER_PART: usize = 1_024;

impl Service {
    /// Expired overrides leave the cache and the kernel's tables (the kernel already
    /// ignores them) and are audited once each, also those that ended while the daemon was
    /// stopped; activity older than the retention is pruned. A fleet node also enforces
    /// again what its kernel refused from the fleet, in case room has been made.
    pub fn sweep(&self) -> Result<(), ServiceError> {
        let at = now();
        let mut guard = self.writer.lock().expect("writer lock");
        let Writer { store, datapath } = &mut *guard;
        // The walk only when something may have ended; under the read lock, so that checks go on.
        let expired = {
            let accounts = self.accounts.read().expect("cache lock");
            accounts.may_have_expired(at).then(|| accounts.expired(at))
        };
        if let Some((expired, next_expiry)) = expired {
            let mut accounts = self.accounts.write().expect("cache lock");
            accounts.sweep(&expired, at, next_expiry);
            for id in &expired {
                let Some(account) = accounts.get(id) else { continue };
                // The kernel already ignores the expired keys, so a table that cannot be
                // rewritten now (full) keeps them a while longer and nothing more: the rest
                // of the sweep (the audit of the expiry) must not wait for it.
                match apply_account(datapath, account, suspended(|a| accounts.get(a), id)) {
                    Ok(()) => info!("account {id:?}: expired overrides and entries swept"),
                    Err(e) => warn!("account {id:?}: expired overrides and entries stay in the kernel for now: {e}"),
                }
            }
        }
        let pending_audit = PendingAudit::begin();
        let tx = store.transaction()?;
        if self.cluster.get().is_some() {
            self.retry_unenforced(&tx, datapath)?;
        }
        for ended in tx.unaudited_expiries(at)? {
            let detail = json!({ "override": ended.id, "cidr": ended.cidr, "ticket": ended.ticket, "expires_at": ended.expires_at });
            audit(&tx, &ended.account, ended.operator, "override_expired", detail)?;
            tx.mark_expiry_audited(ended.id)?;
        }
        // An expired entry stays listed (its owner removes it or adds it again); its end is
        // audited under the uid that added it, as an override's is under its operator's.
        for ended in tx.unaudited_entry_expiries(at)? {
            let detail = json!({ "cidr": ended.cidr, "label": ended.label, "expires_at": ended.expires_at });
            audit(&tx, &ended.account, ended.created_by, "entry_expired", detail)?;
            tx.mark_entry_expiry_audited(&ended.account, ended.cidr)?;
        }
        tx.commit()?;
        pending_audit.committed();
        let tx = store.transaction()?;
        let retention_days = self.retention_days.load(Ordering::Relaxed);
        let cutoff = at - retention_days as i64 * 24 * 3600;
        let thorough = self.thorough_prune_at.load(Ordering::Relaxed) <= at;
        let pruned = tx.prune_activity(cutoff, thorough)?;
        tx.commit()?;
        drop(guard);
        if thorough {
            self.thorough_prune_at.store(at + THOROUGH_PRUNE_EVERY, Ordering::Relaxed);
        }
        if pruned > 0 {
            info!("pruned {pruned} activity records older than {retention_days} days");
        }
        if let Some(cluster) = self.cluster.get() {
            cluster.prune_audit(cutoff);
        }
        Ok(())
    }

    /// The accounts in the kernel slots `slots` name, looked up by the store's index on a
    /// reader (a slot no account holds any more is left out).
    fn accounts_in_slots(&self, slots: impl Iterator<Item = u32>) -> Result<HashMap<u32, String>, Failure> {
        let slots: HashSet<u32> = slots.collect();
        self.read(|tx| {
            let mut found = HashMap::with_capacity(slots.len());
            for &slot in &slots {
                if let Some(id) = tx.account_in_slot(slot)? {
                    found.insert(slot, id);
                }
            }
            Ok(found)
        })
    }

    /// Ticks the kernel's last-used clock and records which entries let packets through since
    /// the last tick (runs every second, with the drop drain). The clock is `CLOCK_BOOTTIME`
    /// seconds: it never goes back, so a key's stamp only ever grows; the clock in the map
    /// before this tick says where the last scan (this daemon's or a previous one's) ended.
    /// Returns how many entries' last packet moved.
    pub fn note_packets(&self) -> usize {
        let clock = crate::datapath::boot_time_ns() / 1_000_000_000;
        let (since, slots) = {
            let guard = self.writer.lock().expect("writer lock");
            let since = guard.datapath.clock();
            guard.datapath.set_clock(clock);
            (since, guard.datapath.last_used_slots())
        };
        // A part at a time, each under the writer lock on its own: the whole scan (8 bytes
        // a slot, 64 MiB at 100,000 accounts' tables) held changes up for up to 80 ms. A key
        // stamped meanwhile carries this tick's clock, so the next scan finds it if this one
        // has passed it.
        let mut used = Vec::new();
        for start in (0..slots).step_by(LAST_USED_SCAN_SLOTS as usize) {
            let guard = self.writer.lock().expect("writer lock");
            used.extend(guard.datapath.used_since_among(since, start..start.saturating_add(LAST_USED_SCAN_SLOTS)));
        }
        // The probe order follows the traffic: each account's table probes first the length
        // most of its packets come through (datapath::order). Every second, also when nothing
        // was stamped, so that old tallies fade. The tally needs no writer lock; reading and
        // reordering the tables does, a part at a time (at 100,000 busy accounts the tally
        // took 30 to 60 ms, the decision up to 10 ms).
        {
            let mut order = self.probe_order.lock().expect("probe order lock");
            order.tick_uses(&used);
            for part in order.candidates().chunks(REORDER_PART) {
                let mut guard = self.writer.lock().expect("writer lock");
                for change in guard.datapath.reorder_among(&order, part) {
                    debug!("account slot {}: /{} now probed first", change.slot, change.first);
                }
            }
        }
        if used.is_empty() {
            return 0;
        }
        let at = now();
        let set_uses = self.set_packets(&used, at, clock);
        let by_slot = match self.accounts_in_slots(used.iter().filter_map(|u| u.owner.account())) {
            Ok(found) => found,
            Err(e) => {
                warn!("last packets of {} keys not recorded: {}", used.len(), e.0.message);
                let moved = set_uses.len();
                self.activity.packets(EntryUses::new(), set_uses);
                return moved;
            }
        };
        let mut uses = EntryUses::new();
        // The cache's read lock a part at a time: a change commits by taking its write lock
        // (and checks then wait behind that change), so a busy second's keys, all at once,
        // would hold up changes and checks alike.
        for part in used.chunks(CACHE_PART) {
            let accounts = self.accounts.read().expect("cache lock");
            for u in part {
                let Some(slot) = u.owner.account() else { continue };
                let Some(policy) = by_slot.get(&slot).and_then(|id| Some((id, accounts.get(id)?))) else {
                    continue;
                };
                // A key is one entry's, or a longer key one was expanded to (prefix.rs), or an
                // override's (no entry holds it): credited like a sign-in from its address, to
                // an entry live when the key let the packet through.
                let time = at - clock.saturating_sub(u.clock) as i64;
                if let Some(entry) = policy.1.credited_entry(u.key, time) {
                    let last = uses.entry((policy.0.clone(), entry)).or_default();
                    *last = (*last).max(time);
                }
            }
        }
        let moved = uses.len() + set_uses.len();
        self.activity.packets(uses, set_uses);
        moved
    }

    /// Credits the set keys among `used` to the most specific network, among the sets their
    /// group unites, that covers them (node-local, once for every account using the set):
    /// each network's last packet, for the activity log to write as it writes entries'.
    fn set_packets(&self, used: &[crate::datapath::LastUse], at: i64, clock: u64) -> EntryUses {
        let groups: HashSet<u32> = used
            .iter()
            .filter_map(|u| match u.owner {
                crate::datapath::KeyOwner::SetGroup(g) => Some(g),
                crate::datapath::KeyOwner::Account(_) => None,
            })
            .collect();
        if groups.is_empty() {
            return EntryUses::new();
        }
        let members: HashMap<u32, Vec<u32>> = {
            let guard = self.writer.lock().expect("writer lock");
            groups.iter().map(|&g| (g, guard.datapath.sets_of_group(g))).collect()
        };
        let mut uses = EntryUses::new();
        {
            let sets = self.sets.read().expect("set cache lock");
            let by_id: HashMap<u32, (&String, &Vec<IpNet>)> =
                sets.iter().map(|(name, s)| (s.kernel_id, (name, &s.entries))).collect();
            for u in used {
                let crate::datapath::KeyOwner::SetGroup(g) = u.owner else { continue };
                let covering = members[&g]
                    .iter()
                    .filter_map(|id| by_id.get(id))
                    .flat_map(|&(name, entries)| entries.iter().filter(|n| n.contains(&u.key)).map(move |n| (name, *n)))
                    .max_by_key(|(_, n)| n.prefix_len());
                if let Some((name, net)) = covering {
                    let time = at - clock.saturating_sub(u.clock) as i64;
                    let last = uses.entry((name.clone(), net)).or_default();
                    *last = (*last).max(time);
                }
            }
        }
        uses
    }

    /// Moves the kernel's drop samples into the activity log (kind "drop"), so that support
    /// sees refused packets next to refused sign-ins. Returns how many were moved.
    pub fn drain_drop_samples(&self) -> usize {
        let samples = self.writer.lock().expect("writer lock").datapath.drain_samples(SAMPLES_PER_DRAIN);
        if samples.is_empty() {
            return 0;
        }
        // The few slots the samples name, looked up in the store: a map of every account's
        // slot, built under the cache's lock, held up changes for milliseconds at 100,000
        // accounts.
        let by_slot = match self.accounts_in_slots(samples.iter().map(|s| s.account)) {
            Ok(found) => found,
            Err(e) => {
                warn!("{} drop samples not recorded: {}", samples.len(), e.0.message);
                return samples.len();
            }
        };
        let at = now();
        // Many samples of one flow come in one drain: they are counted per endpoint here.
        let mut counted: HashMap<(&str, IpAddr, IpAddr, u8, u16, &'static str), i64> = HashMap::new();
        let mut unknown = 0;
        for sample in &samples {
            let Some(account) = by_slot.get(&sample.account) else { continue };
            let Ok(reason) = sample.drop_reason() else {
                unknown += 1;
                continue;
            };
            let (src, dst) = (sample.source(), sample.destination());
            *counted.entry((account, src, dst, sample.protocol, sample.port, reason.as_str())).or_default() += 1;
        }
        if unknown > 0 {
            warn!("{unknown} drop samples give a reason this build does not know (a kernel program of another build?)");
        }
        let drops = counted
            .into_iter()
            .map(|((account, source, destination, protocol, port, reason), count)| Drops {
                time: at,
                account: account.to_string(),
                source,
                destination,
                protocol,
                port,
                reason,
                count,
            })
            .collect();
        self.activity.drops(drops);
        samples.len()
    }
}
