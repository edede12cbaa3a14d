//! A `BPF_F_MMAPABLE` array map seen as memory.
//!
//! The daemon writes the kernel's tables through these mappings instead of one syscall per
//! element: loading a million allowlist entries is a memory copy, and every word the kernel
//! reads can be changed with one atomic store (see `ipaccess_common::table`).

use std::{
    io,
    marker::PhantomData,
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use rustix::mm::{MapFlags, ProtFlags};

/// A shared, writable mapping of an array map whose values are `T` (8-byte aligned words).
pub struct MmapArray<T> {
    base: NonNull<T>,
    len: u32,
    bytes: usize,
    _values: PhantomData<T>,
}

// SAFETY: the mapping is plain shared memory; all mutation goes through `&mut self` or atomics.
unsafe impl<T: Send> Send for MmapArray<T> {}
unsafe impl<T: Sync> Sync for MmapArray<T> {}

impl<T> MmapArray<T> {
    /// Maps all `len` values of the array map behind `fd`.
    pub fn new(fd: BorrowedFd<'_>, len: u32) -> io::Result<Self> {
        Self::map(len, Some(fd))
    }

    /// `len` zeroed values in anonymous memory, as a freshly created map holds them: the
    /// table writer runs over it in unit tests, which need neither root nor a BPF map.
    #[cfg(test)]
    pub fn anonymous(len: u32) -> io::Result<Self> {
        Self::map(len, None)
    }

    /// Maps `fd` shared, or anonymous private memory without one.
    fn map(len: u32, fd: Option<BorrowedFd<'_>>) -> io::Result<Self> {
        assert!(size_of::<T>().is_multiple_of(8) && align_of::<T>() <= 8, "array values must be whole words");
        let page = rustix::param::page_size();
        let bytes = (len as usize * size_of::<T>()).div_ceil(page) * page;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        // SAFETY: a fresh mapping at an address the kernel picks, so nothing else is
        // overlaid; of a map fd (the kernel checks size and flags) or anonymous.
        let ptr = unsafe {
            match fd {
                Some(fd) => rustix::mm::mmap(std::ptr::null_mut(), bytes, prot, MapFlags::SHARED, fd, 0),
                None => rustix::mm::mmap_anonymous(std::ptr::null_mut(), bytes, prot, MapFlags::PRIVATE),
            }
        }?;
        Ok(Self { base: NonNull::new(ptr.cast()).expect("mmap returned null"), len, bytes, _values: PhantomData })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Pointer to value `index`, `None` out of range.
    pub fn get(&self, index: u32) -> Option<*mut T> {
        // SAFETY: in bounds of the mapping.
        (index < self.len).then(|| unsafe { self.base.as_ptr().add(index as usize) })
    }

    /// The `word`-th 8-byte word of value `index` as an atomic.
    ///
    /// # Panics
    /// If `index` or `word` is out of range: callers index with values they validated.
    pub fn word(&self, index: u32, word: usize) -> &AtomicU64 {
        assert!(word < size_of::<T>() / 8, "word {word} out of range");
        let value = self.get(index).unwrap_or_else(|| panic!("index {index} out of range {}", self.len));
        // SAFETY: aligned, in bounds, lives as long as the mapping; the kernel only reads it.
        unsafe { AtomicU64::from_ptr(value.cast::<u64>().add(word)) }
    }

    pub fn load(&self, index: u32, word: usize) -> u64 {
        self.word(index, word).load(Ordering::Acquire)
    }

    pub fn store(&self, index: u32, word: usize, value: u64) {
        self.word(index, word).store(value, Ordering::Release)
    }
}

impl<T> Drop for MmapArray<T> {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped; nothing borrows it past `self`.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
