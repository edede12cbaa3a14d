//! A reload (SIGHUP, `systemctl reload`): the configuration read again and applied where
//! that needs no restart. The filter is never detached by a reload.
//!
//! - Live: newly listed interfaces are attached, and so are listed ones the kernel shows
//!   no XDP program on (detached by hand, or deleted and created again); `roles`, request
//!   sizes and the idle timeout apply from the next request of every control connection,
//!   open ones included; the per-uid cap and the reserved slots from the next connection;
//!   `retention_days`, `min_override_ttl_seconds`, `drop_samples_per_second`,
//!   `log_level`, `limits.max_entries_per_account`, `limits.max_overrides_per_account` and
//!   `limits.max_overrides` at once (a lower limit refuses further entries or grants and
//!   removes none); `location_database` is read again, whether or not its path changed
//!   (ipaccessd does that before applying the rest, and refuses the reload if it does not
//!   load).
//! - Interfaces no longer listed stay attached, with a warning naming the way to detach.
//! - The socket, state directory, bpffs, map sizes, metrics endpoint and `max_connections`
//!   are logged as needing a restart, and keep their running values.

use log::{error, info, warn};

use crate::{config::Config, logging, service::Service};

/// What a reload from `current` to `next` does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Listed now, not before: attached.
    pub attach: Vec<String>,
    /// Listed before, not now: left attached.
    pub left_attached: Vec<String>,
    /// Changed settings that only a restart applies.
    pub need_restart: Vec<&'static str>,
}

pub fn plan(current: &Config, next: &Config) -> Plan {
    let new_only = |a: &Config, b: &Config| -> Vec<String> {
        let mut names: Vec<String> = b.interfaces.iter().filter(|i| !a.interfaces.contains(i)).cloned().collect();
        names.dedup();
        names
    };
    let changed = [
        ("socket", current.socket != next.socket),
        ("socket_mode", current.socket_mode != next.socket_mode),
        ("socket_group", current.socket_group != next.socket_group),
        ("state_dir", current.state_dir != next.state_dir),
        ("bpffs", current.bpffs != next.bpffs),
        ("maps", current.maps != next.maps),
        ("metrics", current.metrics != next.metrics),
        ("cluster", current.cluster != next.cluster),
        ("limits.max_connections", current.limits.max_connections != next.limits.max_connections),
    ];
    Plan {
        attach: new_only(current, next),
        left_attached: new_only(next, current),
        need_restart: changed.into_iter().filter(|&(_, differs)| differs).map(|(key, _)| key).collect(),
    }
}

/// Applies `next` (blocking: attaching takes the writer lock). Returns the configuration now
/// in force: `next`, except the restart-only settings, which keep their running values, and
/// interfaces that failed to attach, which a later reload tries again. Also returns a status
/// line for the service manager, which the caller logs once the configuration is in force
/// (control connections read it from then on).
pub fn apply(service: &Service, current: &Config, next: Config) -> (Config, String) {
    let plan = plan(current, &next);
    service.reconfigure(&next);
    logging::set_level(next.log_level.filter());
    let mut failed = Vec::new();
    // Listed before and still, but no longer filtered: detached by hand, or the interface
    // was deleted and made again (a bond or VLAN re-created by the network setup).
    let unfiltered = next.interfaces.iter().filter(|i| !plan.attach.contains(i) && !service.is_filtered(i));
    let unfiltered: Vec<String> = unfiltered.cloned().collect();
    for iface in &unfiltered {
        warn!("reload: {iface} is configured but has no XDP program; attaching it again");
    }
    for iface in plan.attach.iter().chain(&unfiltered) {
        match service.attach(iface, next.xdp_mode) {
            Ok(how) => info!("reload: {iface}: {how}"),
            Err(e) => {
                error!("reload: cannot attach to {iface}: {e}");
                failed.push(iface.clone());
            }
        }
    }
    for iface in &plan.left_attached {
        warn!(
            "reload: {iface} is no longer configured but stays filtered; `ipaccessctl detach {iface}` removes the filter"
        );
    }
    for key in &plan.need_restart {
        warn!("reload: {key} changed; it takes effect when ipaccessd is restarted");
    }
    let in_force = Config {
        interfaces: next.interfaces.iter().filter(|i| !failed.contains(i)).cloned().collect(),
        socket: current.socket.clone(),
        socket_mode: current.socket_mode,
        socket_group: current.socket_group,
        state_dir: current.state_dir.clone(),
        bpffs: current.bpffs.clone(),
        maps: current.maps.clone(),
        metrics: current.metrics.clone(),
        limits: crate::config::Limits { max_connections: current.limits.max_connections, ..next.limits.clone() },
        ..next
    };
    let status = match (failed.is_empty(), plan.need_restart.is_empty()) {
        (true, true) => "configuration reloaded".to_string(),
        (false, _) => format!("configuration reloaded; cannot attach to {}", failed.join(", ")),
        (true, false) => format!("configuration reloaded; {} need a restart", plan.need_restart.join(", ")),
    };
    (in_force, status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_attaches_new_interfaces_and_names_restart_only_changes() {
        let current = Config { interfaces: vec!["eth0".into(), "eth1".into()], ..Config::default() };
        let mut next = Config { interfaces: vec!["eth1".into(), "eth2".into()], ..Config::default() };
        next.retention_days = 7;
        next.roles.admin.uids.insert(1000);
        assert_eq!(
            plan(&current, &next),
            Plan { attach: vec!["eth2".into()], left_attached: vec!["eth0".into()], need_restart: vec![] }
        );
        next.socket = "/tmp/other.sock".into();
        next.maps.slots = 4096;
        next.limits.max_connections = 1;
        next.limits.max_request_bytes = 1;
        assert_eq!(plan(&current, &next).need_restart, ["socket", "maps", "limits.max_connections"]);
    }
}
