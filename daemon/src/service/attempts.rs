//! Denied sign-ins across a fleet: what this node publishes (read from its store), and how
//! support's replies add the other nodes' published tallies to its own (see
//! `cluster::attempts`).

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::atomic::Ordering,
};

use log::warn;

use super::{Failure, Service, now};
use crate::{
    cluster::attempts::{AttemptSource, Remote, RemoteAttempts},
    protocol::{DeniedSummary, SigninSummary},
    store::DeniedTally,
};

impl AttemptSource for Service {
    fn denied_attempts(&self, changed_since: i64) -> Result<(u32, Vec<DeniedTally>), String> {
        let retention = self.retention_days.load(Ordering::Relaxed);
        let since = now() - i64::from(retention) * 24 * 3600;
        let tallies = self.read(|tx| Ok(tx.denied_tallies(since, changed_since)?)).map_err(|e: Failure| e.0.message)?;
        Ok((retention, tallies))
    }
}

/// What the other nodes published for one account: `None` outside a fleet; an error (for
/// a note) when etcd could not be read, and then the reply is this node's alone.
pub(super) struct FleetAttempts {
    pub node: String,
    pub remote: Result<RemoteAttempts, String>,
}

impl FleetAttempts {
    pub fn note(&self) -> Option<String> {
        match &self.remote {
            Err(e) => Some(format!(
                "the attempts other nodes saw could not be read from etcd ({e}); these are node {}'s alone",
                self.node
            )),
            Ok(found) if found.left_out > 0 => Some(format!(
                "other nodes published {} more summaries of this account than one reply counts; \
                 these figures leave them out",
                found.left_out
            )),
            Ok(_) => None,
        }
    }

    fn remote(&self) -> &[Remote] {
        self.remote.as_ref().map_or(&[], |found| &found.rows)
    }
}

impl Service {
    pub(super) fn fleet_attempts(&self, account: &str) -> Option<FleetAttempts> {
        let cluster = self.fleet()?;
        let remote = cluster.attempts(account);
        if let Err(e) = &remote {
            warn!("cluster: support sees only this node's attempts of {account}: {e}");
        }
        Some(FleetAttempts { node: cluster.node().to_owned(), remote })
    }
}

/// Adds the other nodes' tallies last seen since `since` to this node's summary rows, per
/// (address, method, outcome, kind of caller): counts add, first and last seen widen. Most
/// recently seen first, at most `limit`.
pub(super) fn merge_signins(
    local: Vec<SigninSummary>,
    fleet: &FleetAttempts,
    since: i64,
    limit: u32,
) -> Vec<SigninSummary> {
    type Key = (String, String, bool, String, bool);
    let mut rows: HashMap<Key, SigninSummary> = HashMap::new();
    for mut row in local {
        row.nodes = vec![fleet.node.clone()];
        rows.insert((row.address.clone(), row.method.clone(), row.allowed, row.reason.clone(), row.application), row);
    }
    for r in fleet.remote() {
        // Only denied checks (and those monitor mode let through) are published.
        for t in r.tallies.iter().filter(|t| t.last_seen >= since) {
            let key = (r.address.clone(), r.method.clone(), t.allowed, t.reason.clone(), t.application);
            let row = match rows.entry(key) {
                Entry::Occupied(row) => row.into_mut(),
                Entry::Vacant(new) => new.insert(SigninSummary {
                    address: r.address.clone(),
                    method: r.method.clone(),
                    allowed: t.allowed,
                    reason: t.reason.clone(),
                    application: t.application,
                    count: 0,
                    first_seen: t.first_seen,
                    last_seen: t.last_seen,
                    nodes: Vec::new(),
                    location: None,
                }),
            };
            row.count += t.count;
            row.first_seen = row.first_seen.min(t.first_seen);
            row.last_seen = row.last_seen.max(t.last_seen);
            if !row.nodes.contains(&r.node) {
                row.nodes.push(r.node.clone());
            }
        }
    }
    let mut rows: Vec<_> = rows.into_values().collect();
    rows.iter_mut().for_each(|r| r.nodes.sort());
    rows.sort_by(|a, b| {
        (b.last_seen, &a.address, &a.method, &a.reason, a.application).cmp(&(
            a.last_seen,
            &b.address,
            &b.method,
            &b.reason,
            b.application,
        ))
    });
    rows.truncate(limit as usize);
    rows
}

/// The grant's evidence: the customer's denied checks (by applications) on every node,
/// per (address, method), most recently seen first, at most `limit`.
pub(super) fn merge_denied(
    local: Vec<DeniedSummary>,
    fleet: &FleetAttempts,
    since: i64,
    limit: usize,
) -> Vec<DeniedSummary> {
    let mut rows: HashMap<(Option<String>, Option<String>), DeniedSummary> = HashMap::new();
    for mut row in local {
        row.nodes = vec![fleet.node.clone()];
        rows.insert((row.address.clone(), row.method.clone()), row);
    }
    for r in fleet.remote() {
        for t in r.tallies.iter().filter(|t| t.application && !t.allowed && t.last_seen >= since) {
            let row = rows.entry((Some(r.address.clone()), Some(r.method.clone()))).or_insert_with(|| DeniedSummary {
                address: Some(r.address.clone()),
                method: Some(r.method.clone()),
                first_seen: t.first_seen,
                last_seen: t.last_seen,
                count: 0,
                nodes: Vec::new(),
                location: None,
            });
            row.count += t.count;
            row.first_seen = row.first_seen.min(t.first_seen);
            row.last_seen = row.last_seen.max(t.last_seen);
            if !row.nodes.contains(&r.node) {
                row.nodes.push(r.node.clone());
            }
        }
    }
    let mut rows: Vec<_> = rows.into_values().collect();
    rows.iter_mut().for_each(|r| r.nodes.sort());
    rows.sort_by(|a, b| (b.last_seen, &a.address, &a.method).cmp(&(a.last_seen, &b.address, &b.method)));
    rows.truncate(limit);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::attempts::AttemptTally;

    fn tally(reason: &str, application: bool, count: i64, first_seen: i64, last_seen: i64) -> AttemptTally {
        let allowed = reason == "monitor_would_deny";
        AttemptTally { day: 0, reason: reason.into(), allowed, application, count, first_seen, last_seen }
    }

    fn remote(node: &str, address: &str, tallies: Vec<AttemptTally>) -> Remote {
        Remote { node: node.into(), address: address.into(), method: "password".into(), tallies }
    }

    #[test]
    fn the_fleets_attempts_add_up_per_address_and_method() {
        let local = vec![DeniedSummary {
            address: Some("198.18.0.7".into()),
            method: Some("password".into()),
            first_seen: 100,
            last_seen: 200,
            count: 3,
            nodes: Vec::new(),
            location: None,
        }];
        let fleet = FleetAttempts {
            node: "c".into(),
            remote: Ok(RemoteAttempts {
                rows: vec![
                    remote("a", "198.18.0.7", vec![tally("address_not_allowed", true, 5, 50, 150)]),
                    remote("b", "198.18.0.7", vec![tally("address_not_allowed", true, 1, 300, 300)]),
                    // Support's own checks, monitor mode's, and those before the window are no evidence.
                    remote("b", "198.18.0.9", vec![tally("address_not_allowed", false, 9, 300, 300)]),
                    remote("b", "198.18.0.10", vec![tally("monitor_would_deny", true, 9, 300, 300)]),
                    remote(
                        "a",
                        "198.18.0.11",
                        vec![tally("banned", true, 2, 10, 20), tally("banned", true, 4, 60, 90)],
                    ),
                ],
                left_out: 0,
            }),
        };
        let merged = merge_denied(local, &fleet, 30, 50);
        assert_eq!(merged.len(), 2, "{merged:?}");
        let m = &merged[0];
        assert_eq!((m.address.as_deref(), m.count, m.first_seen, m.last_seen), (Some("198.18.0.7"), 9, 50, 300));
        assert_eq!(m.nodes, ["a", "b", "c"]);
        let m = &merged[1];
        assert_eq!((m.address.as_deref(), m.count, m.first_seen, m.last_seen), (Some("198.18.0.11"), 4, 60, 90));
        assert_eq!(m.nodes, ["a"]);
        assert!(fleet.note().is_none());

        // The summary keeps outcomes and callers apart, and the limit holds.
        let summary = merge_signins(Vec::new(), &fleet, 30, 10);
        assert_eq!(summary.len(), 4, "{summary:?}");
        assert!(summary.iter().all(|r| r.last_seen >= 30));
        assert!(summary.windows(2).all(|w| w[0].last_seen >= w[1].last_seen));
        assert_eq!(merge_signins(Vec::new(), &fleet, 30, 2).len(), 2);

        // etcd unreachable: this node's rows alone, and a note that says so.
        let away = FleetAttempts { node: "c".into(), remote: Err("no leader".into()) };
        assert_eq!(merge_denied(Vec::new(), &away, 0, 50), []);
        assert!(away.note().unwrap().contains("no leader"));

        // More keys than one reply counts: what was counted, and a note of what was not.
        let crowded = FleetAttempts {
            node: "c".into(),
            remote: Ok(RemoteAttempts {
                rows: vec![remote("a", "198.18.0.7", vec![tally("address_not_allowed", true, 2, 50, 60)])],
                left_out: 7,
            }),
        };
        assert_eq!(merge_denied(Vec::new(), &crowded, 0, 50).len(), 1);
        assert!(crowded.note().unwrap().contains("7 more summaries"), "{:?}", crowded.note());
    }
}
