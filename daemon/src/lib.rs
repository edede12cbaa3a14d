//! ipaccess: per-account IP allowlists enforced by XDP.
//!
//! - `datapath`: the kernel side seen from user space: loading, attaching and the tables
//!   the XDP program reads;
//! - `store`: the durable policy (SQLite);
//! - `service`: every command, applied to store and kernel together, and login checks;
//! - `protocol` and `server`: the control socket;
//! - `config`: ipaccessd's configuration file;
//! - `docs`: man pages and shell completions generated from the command lines.

pub mod config;
pub mod datapath;
pub mod docs;
pub mod protocol;
pub mod server;
pub mod service;
pub mod store;
