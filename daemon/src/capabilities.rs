//! The capabilities ipaccessd needs, as measured (docs/operations.md): CAP_BPF to create
//! maps and load programs, CAP_NET_ADMIN to load an XDP program and attach it, and
//! CAP_PERFMON because the verifier refuses the program's packet-pointer arithmetic
//! without it. Nothing else, when bpffs is already mounted and the socket's group is the
//! daemon's own.

use std::fs;

/// (capability number from linux/capability.h, name).
pub const REQUIRED: [(u32, &str); 3] = [(39, "CAP_BPF"), (12, "CAP_NET_ADMIN"), (38, "CAP_PERFMON")];

/// The required capabilities this process does not have in its effective set (empty if
/// that cannot be read: then nothing is claimed).
pub fn missing() -> Vec<&'static str> {
    let Some(effective) = effective() else { return Vec::new() };
    REQUIRED.iter().filter(|(bit, _)| effective & (1 << bit) == 0).map(|&(_, name)| name).collect()
}

fn effective() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// A sentence for an error that may come from missing capabilities, or None if none is
/// missing.
pub fn hint() -> Option<String> {
    let missing = missing();
    (!missing.is_empty()).then(|| {
        let all: Vec<&str> = REQUIRED.iter().map(|&(_, name)| name).collect();
        format!("ipaccessd lacks {} (it needs {})", missing.join(", "), all.join(", "))
    })
}
