//! Types and algorithms shared by the XDP program and user space.
//!
//! Everything the kernel program reads is laid out here, once: the map names, the slot
//! format of the lookup tables, the hash that places keys in them and the probe that finds
//! them again. The kernel only ever *reads* these tables; `ipaccessd` is their single writer
//! (see `table` for the concurrency protocol). Keeping the reader in this crate means the
//! daemon's writer and the kernel's reader cannot disagree about where a key lives.
#![cfg_attr(not(test), no_std)]

pub mod maps;
pub mod packet;
pub mod table;

pub use maps::*;
pub use table::*;

#[cfg(test)]
mod tests;
