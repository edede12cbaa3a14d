//! Operations: the daemon's own state (status, counters, metrics), interfaces, and the
//! settings a reload changes.

use std::{collections::HashMap, sync::atomic::Ordering};

use super::{Failure, Reply, Service, ServiceError, now, unknown};
use crate::{
    datapath::{self, DatapathError},
    logging, metrics,
    protocol::{
        AccountTraffic, ClusterStatus, Detach, Detached, ErrorCode, FleetNode, HostTraffic, Stats, StatsReport, Status,
        StatusReport, XdpInterface,
    },
};

impl Service {
    pub(super) fn stats(&self, Stats { account }: Stats) -> Reply<Stats> {
        let slots: Vec<(String, u32)> = match account {
            Some(id) => {
                let slot = self.accounts.read().expect("cache lock").get(&id).ok_or_else(|| unknown(&id))?.slot;
                vec![(id, slot)]
            }
            // Every account from a reader's snapshot of the store, in id order. A walk of the
            // cache held its lock for about 20 ms at 100,000 accounts, and a change waiting for
            // that lock holds up the checks that come after it.
            None => self.read(|tx| Ok(tx.accounts()?.into_iter().map(|a| (a.id, a.slot)).collect()))?,
        };
        let mut accounts = Vec::with_capacity(slots.len());
        for (account, slot) in slots {
            let c = self.counters.account(slot)?;
            accounts.push(AccountTraffic {
                account,
                passed_packets: c.passed_packets,
                passed_bytes: c.passed_bytes,
                dropped_packets: c.dropped_packets,
                dropped_bytes: c.dropped_bytes,
                would_drop_packets: c.would_drop_packets,
                would_drop_bytes: c.would_drop_bytes,
            });
        }
        Ok(StatsReport { accounts, host: host_traffic(&self.counters)? })
    }

    pub(super) fn status(&self, _: Status) -> Reply<Status> {
        // The writer lock only for what the datapath holds in memory; the interfaces' XDP
        // state is asked of the kernel without it.
        let (table_slots_used, table_slots, pin_dir, interfaces) = {
            let writer = self.writer.lock().expect("writer lock");
            let (used, capacity) = writer.datapath.slot_usage();
            (used, capacity, writer.datapath.pin_dir().display().to_string(), writer.datapath.attached_interfaces())
        };
        let xdp: Vec<XdpInterface> = interfaces
            .into_iter()
            .map(|interface| {
                let path = datapath::netlink::xdp_path(&interface).ok().flatten();
                XdpInterface { interface, path }
            })
            .collect();
        Ok(StatusReport {
            accounts: self.accounts.read().expect("cache lock").len() as u64,
            interfaces: xdp.iter().map(|x| x.interface.clone()).collect(),
            xdp,
            pin_dir,
            table_slots_used,
            table_slots,
            host_counters: host_traffic(&self.counters).ok(),
            cluster: self.cluster.get().map(|cluster| {
                let health = cluster.health();
                ClusterStatus {
                    node: cluster.node().to_owned(),
                    connected: health.connected,
                    applied_revision: health.applied_revision,
                    policy_revision: health.policy_revision,
                    cluster_revision: health.cluster_revision.max(health.applied_revision),
                    last_error: health.last_error,
                    clock_offset_ms: health.clock_offset_ms,
                    name_in_use_elsewhere: health.name_in_use_elsewhere,
                    apply_failures: self.cluster_apply_failures.load(Ordering::Relaxed),
                    unenforced: self.unenforced().into_iter().take(100).collect(),
                    nodes: cluster
                        .nodes()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(node, policy_revision)| FleetNode { node, policy_revision })
                        .collect(),
                }
            }),
        })
    }

    pub(super) fn detach(&self, Detach { interface }: Detach, uid: u32) -> Reply<Detach> {
        datapath::check_interface_name(&interface).map_err(|why| {
            Failure::new(ErrorCode::BadRequest, format!("{interface:?} is not an interface name: {why}"))
        })?;
        let detached = self.writer.lock().expect("writer lock").datapath.detach(&interface)?;
        logging::detached(&interface, uid, detached);
        Ok(Detached { interface, detached })
    }

    /// Applies the settings of a reloaded configuration that the service holds: activity
    /// retention, the shortest and widest override, the entry and override limits, and the
    /// drop-sample budget in the kernel.
    pub fn reconfigure(&self, config: &crate::config::Config) {
        self.retention_days.store(config.retention_days, Ordering::Relaxed);
        self.min_override_ttl.store(config.min_override_ttl_seconds.max(1), Ordering::Relaxed);
        self.widest_override.0.store(config.widest_override_ipv4, Ordering::Relaxed);
        self.widest_override.1.store(config.widest_override_ipv6, Ordering::Relaxed);
        // A lower limit refuses further entries only; entries already over it stay.
        self.max_entries.store(config.limits.max_entries_per_account, Ordering::Relaxed);
        self.max_overrides.0.store(config.limits.max_overrides_per_account, Ordering::Relaxed);
        self.max_overrides.1.store(config.limits.max_overrides, Ordering::Relaxed);
        let samples = config.drop_samples_per_second;
        self.writer.lock().expect("writer lock").datapath.set_sampling(samples, samples.max(1) * 10);
    }

    /// For the watchdog: the writer lock can be taken (no change is stuck holding it, and
    /// no change panicked while holding it) and the kernel's maps answer.
    pub fn healthy(&self) -> bool {
        self.writer.lock().is_ok_and(|writer| writer.datapath.host_counters().is_ok())
    }

    /// Attaches the filter to an interface (see [`datapath::Datapath::attach`]).
    pub fn attach(&self, iface: &str, mode: datapath::XdpMode) -> Result<datapath::Attachment, DatapathError> {
        self.writer.lock().expect("writer lock").datapath.attach(iface, mode)
    }

    /// Does the kernel show an XDP program on `iface` (this daemon's or any other)? No lock:
    /// the answer comes from rtnetlink.
    pub fn is_filtered(&self, iface: &str) -> bool {
        datapath::netlink::xdp_path(iface).is_ok_and(|path| path.is_some())
    }

    /// See [`datapath::Datapath::restore_link_pins`].
    pub fn restore_link_pins(&self) -> Vec<(String, Result<std::path::PathBuf, DatapathError>)> {
        self.writer.lock().expect("writer lock").datapath.restore_link_pins()
    }

    /// See [`datapath::Datapath::retire_other_layouts`].
    pub fn retire_other_layouts(&self) {
        self.writer.lock().expect("writer lock").datapath.retire_other_layouts();
    }

    /// Waits until recorded login checks are in the store (before shutting down).
    pub fn flush_activity(&self) {
        self.activity.flush();
    }
}

impl metrics::Source for Service {
    /// Every account's counters are read from the kernel (one map lookup per account)
    /// without the writer lock, so a scrape does not hold up changes; the lock is taken only
    /// for the table and interface figures. The accounts and their live overrides come from
    /// a reader's snapshot of the store, not from the cache: a walk of the cache held its
    /// lock for about 10 ms at 100,000 accounts, and with it any change waiting for that
    /// lock and the checks queued behind the change.
    fn snapshot(&self) -> Result<metrics::Snapshot, ServiceError> {
        let at = now();
        let (accounts, overrides) =
            self.readers.read(|tx| Ok::<_, ServiceError>((tx.accounts()?, tx.live_overrides(None, at)?)))?;
        let mut live: HashMap<String, usize> = HashMap::new();
        for o in overrides {
            *live.entry(o.account).or_default() += 1;
        }
        let mut rows = Vec::with_capacity(accounts.len());
        for account in accounts {
            let live_overrides = live.get(&account.id).copied().unwrap_or(0);
            let counters = self.counters.account(account.slot)?;
            rows.push(metrics::AccountMetrics { account: account.id, counters, live_overrides });
        }
        let host = self.counters.host()?;
        let writer = self.writer.lock().expect("writer lock");
        let (table_slots_used, table_slots) = writer.datapath.slot_usage();
        Ok(metrics::Snapshot {
            accounts: rows,
            host,
            checks: self.checks.read(),
            refused: self.refusals.read(),
            table_slots_used,
            table_slots,
            account_slots: u64::from(writer.datapath.account_capacity().saturating_sub(1)),
            reconcile_seconds: self.reconcile.as_secs_f64(),
            interfaces: writer.datapath.attachments(),
            cluster: self.cluster.get().map(|cluster| {
                let health = cluster.health();
                metrics::ClusterMetrics {
                    connected: health.connected,
                    applied_revision: health.applied_revision,
                    cluster_revision: health.cluster_revision.max(health.applied_revision),
                    apply_failures: self.cluster_apply_failures.load(Ordering::Relaxed),
                    unenforced: self.unenforced.lock().expect("unenforced lock").len() as u64,
                    clock_offset_seconds: health.clock_offset_ms.map(|ms| ms as f64 / 1000.0),
                }
            }),
        })
    }
}

fn host_traffic(counters: &datapath::CounterReader) -> Result<HostTraffic, DatapathError> {
    let c = counters.host()?;
    Ok(HostTraffic {
        non_ip: c.non_ip_packets,
        unbound: c.unbound_packets,
        ndp: c.ndp_packets,
        malformed: c.malformed_packets,
    })
}
