//! What ipaccessd tells systemd (sd_notify(3), through the `sd-notify` crate): ready once
//! the store's policy is in the kernel, the interfaces are attached and the control socket
//! is bound; watchdog pings while the daemon is healthy; reloads; the stop. Every call does
//! nothing unless the daemon was started with `NOTIFY_SOCKET` (by systemd, or by a test).

use std::time::Duration;

use log::warn;
use sd_notify::NotifyState;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        warn!("cannot notify the service manager: {e}");
    }
}

/// Start-up, or a reload, is complete; `status` is what `systemctl status` shows.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload has begun. systemd 253 and later match it to the `MONOTONIC_USEC` sent with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading the configuration")]),
        Err(e) => {
            warn!("cannot read CLOCK_MONOTONIC for the reload notification: {e}");
            notify(&[NotifyState::Reloading]);
        }
    }
}

/// Start-up takes longer than usual (the store is being upgraded): asks the service manager
/// to wait `by` more from now before it gives up on the start (`EXTEND_TIMEOUT_USEC`).
pub fn extend_start(by: Duration, status: &str) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    notify(&[NotifyState::ExtendTimeoutUsec(usec), NotifyState::Status(status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping; the filter stays attached")]);
}

/// How often to ping the watchdog: half of `WATCHDOG_USEC`, if the service manager set it
/// for this process (`WatchdogSec=` in the unit).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|timeout| !timeout.is_zero()).map(|timeout| timeout / 2)
}

pub fn watchdog_ping() {
    notify(&[NotifyState::Watchdog]);
}
