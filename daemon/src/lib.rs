//! ipaccess: per-account IP allowlists enforced by XDP.
//!
//! - `datapath`: the kernel side seen from user space: loading, attaching and the tables
//!   the XDP program reads;
//! - `store`: the durable policy (SQLite);
//! - `policy`: the account model as pure functions: effective state, the login decision,
//!   and the rules for names, addresses and free text;
//! - `service`: every command, applied to store and kernel together, and login checks;
//! - `activity`: login checks and drops counted per hour into the store, off the request path;
//! - `protocol` and `server`: the control socket; `client`: a client for it (blocking and async);
//! - `config`: ipaccessd's configuration file; `location`: the optional database that places
//!   addresses for support;
//! - `systemd`, `logging`, `reload`, `metrics`, `capabilities`, `kernel`: running as a service
//!   (docs/operations.md).
//! - `docs`: man pages and shell completions generated from the command lines.

pub mod activity;
pub mod capabilities;
pub mod client;
pub mod cluster;
pub mod config;
pub mod datapath;
pub mod docs;
pub mod kernel;
pub mod location;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod reload;
pub mod server;
pub mod service;
pub mod store;
pub mod systemd;
pub mod time;
