//! ipaccess: per-account IP allowlists enforced by XDP.
//!
//! `datapath` is the kernel side seen from user space: loading, attaching and the tables the
//! XDP program reads.

pub mod datapath;
