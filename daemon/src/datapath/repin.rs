//! Pinning a link again, by its id, when its pin was removed while the daemon ran.
//!
//! aya pins a link only by consuming the one descriptor the daemon holds, and a failed pin
//! would drop it: the filter would leave the interface at once. Here the kernel is asked for
//! a second descriptor of the same link (`BPF_LINK_GET_FD_BY_ID`), and that one is pinned
//! (`BPF_OBJ_PIN`); whatever happens, the daemon's own descriptor stays.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

/// `enum bpf_cmd` in the kernel's uapi/linux/bpf.h.
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// The leading fields of `union bpf_attr` for `BPF_LINK_GET_FD_BY_ID`.
#[repr(C)]
struct GetFdById {
    link_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The leading fields of `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// Pins the link with kernel id `link_id` at `path` (on bpffs, where no file is yet).
pub fn pin_link_by_id(link_id: u32, path: &Path) -> io::Result<()> {
    let mut get = GetFdById { link_id, next_id: 0, open_flags: 0 };
    // SAFETY: `get` is a valid, initialised prefix of bpf_attr of the size passed; the
    // kernel only reads it.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, &mut get, size_of::<GetFdById>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let bpf_fd = u32::try_from(link.as_raw_fd()).map_err(io::Error::other)?;
    let mut pin = ObjPin { pathname: path.as_ptr() as u64, bpf_fd, file_flags: 0 };
    // SAFETY: as above; `path` outlives the call.
    let done = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, &mut pin, size_of::<ObjPin>()) };
    if done < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
