//! One frame through a loaded XDP program with BPF_PROG_TEST_RUN, by file descriptor: for a
//! program this process did not load through aya (the daemon's, found through its pinned
//! link) or one another thread holds mutably. aya 0.14 runs only programs it wraps itself.

use std::os::fd::{AsRawFd, BorrowedFd};

/// The `test` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The program's verdict (XDP_PASS, XDP_DROP, ...) for `frame`, run once by the kernel.
pub fn run_xdp_once(program: BorrowedFd<'_>, frame: &[u8]) -> u32 {
    let mut attr = TestRunAttr {
        prog_fd: program.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid, zero-padded bpf_attr for this command whose input points at
    // `frame`, which outlives the call; there is no output buffer, and the kernel writes only
    // `retval` and `duration` back.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_TEST_RUN, &raw mut attr, size_of::<TestRunAttr>() as libc::c_uint)
    };
    assert_eq!(rc, 0, "BPF_PROG_TEST_RUN: {}", std::io::Error::last_os_error());
    attr.retval
}
