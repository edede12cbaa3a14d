//! The oldest kernel ipaccessd runs on, so that a load failing on an older one says so
//! instead of leaving the operator with a bare EINVAL or EPERM.
//!
//! 5.11 is the newest of what the program and loader use: BPF memory charged to the
//! memory cgroup instead of RLIMIT_MEMLOCK (5.11), bpf_link for XDP (5.9), CAP_BPF and
//! CAP_PERFMON, ring buffers and `bpf_ktime_get_boot_ns` (5.8), mmapable arrays (5.5).

/// (major, minor).
pub const MINIMUM: (u32, u32) = (5, 11);

/// The running kernel's (major, minor), from uname(2).
pub fn release() -> Option<(u32, u32)> {
    parse_release(&rustix::system::uname().release().to_string_lossy())
}

/// "6.18.0-13-amd64" → (6, 18).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut numbers = release.split(|c: char| !c.is_ascii_digit());
    let major = numbers.next()?.parse().ok()?;
    let minor = numbers.next()?.parse().ok()?;
    Some((major, minor))
}

/// A sentence for a failed load if this kernel is older than [`MINIMUM`], else None.
pub fn hint() -> Option<String> {
    hint_for(release()?)
}

fn hint_for((major, minor): (u32, u32)) -> Option<String> {
    ((major, minor) < MINIMUM)
        .then(|| format!("this kernel is Linux {major}.{minor}; ipaccessd needs {}.{} or later", MINIMUM.0, MINIMUM.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse() {
        assert_eq!(parse_release("6.18.0-13-amd64"), Some((6, 18)));
        assert_eq!(parse_release("5.4.0"), Some((5, 4)));
        assert_eq!(parse_release("5.15"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
    }

    #[test]
    fn only_older_kernels_get_a_hint() {
        assert!(hint_for((5, 10)).is_some_and(|h| h.contains("Linux 5.10") && h.contains("5.11 or later")));
        assert!(hint_for((4, 19)).is_some());
        assert_eq!(hint_for((5, 11)), None);
        assert_eq!(hint_for((6, 1)), None);
        // This machine's kernel is new enough: a real load failure here is something else.
        assert_eq!(hint(), None);
    }
}
