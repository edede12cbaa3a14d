//! ipaccessd's configuration: `/etc/ipaccess/ipaccessd.toml` (or `--config`), every key
//! optional, so the daemon starts with no file at all.
//!
//! ```toml
//! interfaces = ["eth0"]
//! xdp_mode = "auto" # "native" (refuse drivers without XDP), "generic", or native else generic
//! bpffs = "/sys/fs/bpf"
//! state_dir = "/var/lib/ipaccess"
//! socket = "/run/ipaccess/ipaccessd.sock"
//! socket_mode = 0o660
//! socket_group = "ipaccess"  # group owning the socket (name or gid): its members can connect
//! retention_days = 90 # activity kept
//! drop_samples_per_second = 10  # per CPU, into the activity log
//! min_override_ttl_seconds = 60
//! widest_override_ipv4 = 24   # the widest prefix an override may cover
//! widest_override_ipv6 = 48
//! log_level = "info" # error, warn, info, debug or trace; RUST_LOG, when set, wins
//! location_database = "/var/lib/GeoIP/GeoLite2-City.mmdb" # optional: places addresses in activity summaries
//!
//! [roles]            # uids by number, groups by name or gid; root has every role
//! check = { gids = ["ipaccess", 998] }
//! admin = { uids = [1001] }
//! support = { gids = [997] }
//!
//! [limits]
//! max_request_bytes = 65536          # callers without the admin role
//! max_admin_request_bytes = 8388608  # admins: bulk imports and allowlist replacements
//! max_connections = 256
//! reserved_admin_connections = 8    # of max_connections, kept for root and admins
//! max_connections_per_uid = 64
//! idle_timeout_seconds = 30          # no complete request for this long: closed
//! max_entries_per_account = 1000     # allowlist entries, enabled or disabled (overrides apart)
//! max_overrides_per_account = 100    # support's live overrides on one account
//! max_overrides = 10000              # ... and on all accounts together
//!
//! [maps]             # used when the maps are first created
//! slots = 1048576
//! accounts = 65536
//!
//! [metrics]          # Prometheus text format on GET /metrics; off unless `listen` is set
//! listen = "127.0.0.1:9469"
//! allow_non_loopback = false  # a non-loopback `listen` is refused unless this is true
//!
//! [cluster]          # a fleet sharing its policy through etcd; without it, the local store
//! endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]
//! prefix = "/ipaccess/"      # every key this fleet writes starts with it
//! node = "mx1"               # this host's name in the fleet (unique; [a-z0-9._-])
//! username = "ipaccess"      # optional etcd user; its password is read from password_file
//! password_file = "/etc/ipaccess/etcd-password"
//! ca_file = "/etc/ipaccess/etcd-ca.pem"     # optional TLS: the CA that signed etcd's certificates
//! cert_file = "/etc/ipaccess/etcd-client.pem" # optional client certificate and key (both or neither)
//! key_file = "/etc/ipaccess/etcd-client.key"
//! ```
//!
//! On SIGHUP (`systemctl reload ipaccessd`) the file is read again: `interfaces` (new ones
//! are attached, in the new `xdp_mode`; removed ones stay attached), `roles`, `limits` (except
//! `max_connections`), `retention_days`, `min_override_ttl_seconds`, `widest_override_*`,
//! `drop_samples_per_second` and `log_level` change at once, and `location_database` is read
//! again (a database that does not load refuses the reload); the others are logged as
//! needing a restart. A file that does not load is refused and the running one kept
//! (docs/operations.md).

use std::{
    collections::BTreeSet,
    ffi::CString,
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de::Error as _};

use crate::{datapath::XdpMode, protocol::Role};

pub const DEFAULT_PATH: &str = "/etc/ipaccess/ipaccessd.toml";

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Interfaces to filter.
    pub interfaces: Vec<String>,
    /// Where the program may run on them: native XDP, generic, or native with a fallback.
    pub xdp_mode: XdpMode,
    /// Where bpffs is mounted (mounted there if it is not).
    pub bpffs: PathBuf,
    /// The store lives here (`ipaccess.db`).
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Group owning the socket file (a name or a gid); its members can connect, and then their
    /// roles decide what they may do.
    #[serde(deserialize_with = "some_group")]
    pub socket_group: Option<u32>,
    /// Days of activity (login checks, audited changes, drop samples) kept.
    pub retention_days: u32,
    /// Shortest override support may grant, in seconds (longest: 30 days).
    pub min_override_ttl_seconds: u64,
    /// The widest IPv4 prefix an override may cover (a /24 by default): support lets a
    /// customer's address in, not a whole provider.
    pub widest_override_ipv4: u8,
    /// The same for IPv6 (a /48 by default).
    pub widest_override_ipv6: u8,
    /// Dropped packets each CPU reports to the activity log per second (bursts up to ten
    /// times that); 0 turns drop samples off.
    pub drop_samples_per_second: u64,
    /// The most detailed log messages written (unless `RUST_LOG` is set).
    pub log_level: LogLevel,
    /// A MaxMind-format City or Country database (GeoLite2-City, ...) that places the
    /// addresses of activity summaries for support; none: no locations.
    pub location_database: Option<PathBuf>,
    pub roles: Roles,
    pub limits: Limits,
    pub maps: Maps,
    pub metrics: Metrics,
    /// The fleet's shared store; `None` runs this host on its own store alone.
    pub cluster: Option<Cluster>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            xdp_mode: XdpMode::Auto,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            state_dir: PathBuf::from("/var/lib/ipaccess"),
            socket: PathBuf::from("/run/ipaccess/ipaccessd.sock"),
            socket_mode: 0o660,
            socket_group: None,
            retention_days: 90,
            drop_samples_per_second: 10,
            min_override_ttl_seconds: 60,
            widest_override_ipv4: 24,
            widest_override_ipv6: 48,
            log_level: LogLevel::Info,
            location_database: None,
            roles: Roles::default(),
            limits: Limits::default(),
            maps: Maps::default(),
            metrics: Metrics::default(),
            cluster: None,
        }
    }
}

/// `[cluster]`: where the fleet's etcd is and who this node is in it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// etcd client URLs (`http://` or `https://`).
    pub endpoints: Vec<String>,
    /// The prefix of every key the fleet writes: several fleets can share one etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// This node's name: unique in the fleet, letters, digits, `.`, `_` and `-`.
    pub node: String,
    pub username: Option<String>,
    /// A file holding the etcd user's password (not the password itself: the configuration
    /// file is world-readable in the package).
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// What a node's name may be: it is a part of etcd keys (a binding's scope among them).
pub const NODE_NAME_RULE: &str = "1 to 63 letters, digits, '.', '_' or '-'";

pub fn node_name_ok(name: &str) -> bool {
    let char_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    !name.is_empty() && name.len() <= 63 && name.chars().all(char_ok)
}

fn default_prefix() -> String {
    "/ipaccess/".into()
}

impl Cluster {
    /// Refuses what would fail later, or silently: a node name that cannot be a key part,
    /// a certificate without its key, a user without a password.
    pub fn check(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("[cluster] endpoints is empty".into());
        }
        if let Some(e) = self.endpoints.iter().find(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
            return Err(format!("[cluster] endpoint {e:?} must start with http:// or https://"));
        }
        if !node_name_ok(&self.node) {
            return Err(format!("[cluster] node {:?}: {NODE_NAME_RULE}", self.node));
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            return Err(format!("[cluster] prefix {:?} must start and end with '/'", self.prefix));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("[cluster] cert_file and key_file go together".into());
        }
        if self.username.is_some() != self.password_file.is_some() {
            return Err("[cluster] username and password_file go together".into());
        }
        Ok(())
    }
}

/// Who holds each role, by uid or gid (primary or supplementary group of the peer process).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Roles {
    pub check: Principals,
    pub admin: Principals,
    pub support: Principals,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Principals {
    pub uids: BTreeSet<u32>,
    /// Groups, by name or gid.
    #[serde(deserialize_with = "groups")]
    pub gids: BTreeSet<u32>,
}

impl Principals {
    fn matches(&self, uid: u32, gids: &[u32]) -> bool {
        self.uids.contains(&uid) || gids.iter().any(|g| self.gids.contains(g))
    }
}

impl Roles {
    /// The roles of a peer with `uid` and groups `gids`; root has all of them.
    pub fn of(&self, uid: u32, gids: &[u32]) -> BTreeSet<Role> {
        if uid == 0 {
            return [Role::Check, Role::Admin, Role::Support].into();
        }
        [(Role::Check, &self.check), (Role::Admin, &self.admin), (Role::Support, &self.support)]
            .into_iter()
            .filter(|(_, who)| who.matches(uid, gids))
            .map(|(role, _)| role)
            .collect()
    }
}

/// A group as the configuration names it. Names are looked up when the file is read, so a
/// packaged configuration can name the group its installer created without knowing its gid.
#[derive(Deserialize)]
#[serde(untagged, expecting = "a group name or a gid")]
enum Group {
    Id(u32),
    Name(String),
}

impl Group {
    fn gid(self) -> Result<u32, String> {
        match self {
            Group::Id(gid) => Ok(gid),
            Group::Name(name) => match gid_of(&name) {
                Ok(Some(gid)) => Ok(gid),
                Ok(None) => Err(format!("there is no group named {name:?}")),
                Err(e) => Err(format!("looking up group {name:?}: {e}")),
            },
        }
    }
}

fn some_group<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    Group::deserialize(d)?.gid().map(Some).map_err(D::Error::custom)
}

fn groups<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<u32>, D::Error> {
    Vec::<Group>::deserialize(d)?.into_iter().map(|g| g.gid().map_err(D::Error::custom)).collect()
}

/// The gid of group `name` from the system's group database (NSS), `None` if there is none.
fn gid_of(name: &str) -> io::Result<Option<u32>> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // libc, not rustix: the group database is NSS (files, LDAP, systemd...), which only the C
    // library implements.
    let mut buf = vec![0 as libc::c_char; 4096];
    // The entry (with its member list) must fit in `buf`: grow it on ERANGE, a few times at most.
    for _ in 0..6 {
        // SAFETY: all-zero is a valid `struct group`; getgrnam_r fills it in.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        // SAFETY: valid C string, output struct and buffer of the given length.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
        match rc {
            0 => return Ok((!found.is_null()).then_some(group.gr_gid)),
            libc::ERANGE => buf.resize(buf.len() * 4, 0),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    Err(io::Error::other("the group entry is too large"))
}

/// The least `max_request_bytes` and `max_admin_request_bytes` may be.
pub const MIN_REQUEST_BYTES: usize = 1024;

/// The longest override support may grant: 30 days.
pub const MAX_OVERRIDE_TTL_SECONDS: u64 = 30 * 24 * 3600;

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Longest request line; a longer one gets `too_large` and the connection is closed.
    pub max_request_bytes: usize,
    /// The same for callers with the admin role, whose imports and allowlist replacements
    /// are large; callers with only the check role cannot make the daemon buffer that much.
    pub max_admin_request_bytes: usize,
    /// Connections served at once; more are told `busy` and closed. Requests on one
    /// connection are answered one at a time, in order.
    pub max_connections: usize,
    /// Of `max_connections`, how many only root and admins may take: when every other slot
    /// is held (by a runaway client, say), operators can still connect to repair things.
    /// At most `max_connections - 1` are kept back.
    pub reserved_admin_connections: usize,
    /// Connections one uid may hold at once (root and admins too), so that one client cannot
    /// take every slot.
    pub max_connections_per_uid: usize,
    /// A connection that sends no complete request for this long is closed, and so is one
    /// that does not read its replies for this long.
    pub idle_timeout_seconds: u64,
    /// Allowlist entries one account may hold, enabled and disabled alike (overrides are not
    /// entries). A change that would go over it is refused with `too_many_entries`; an
    /// account already over it (the limit was lowered) keeps its entries.
    pub max_entries_per_account: u32,
    /// Live overrides one account may hold. Support grants them one address at a time to a
    /// locked-out customer; each takes room in the kernel's tables, so a script run amok
    /// (or a careless support login) must not fill the tables every account shares. A grant
    /// over it is refused with `too_many_overrides`; overrides already over it (the limit
    /// was lowered) stay until they expire or are revoked.
    pub max_overrides_per_account: u32,
    /// Live overrides all accounts together may hold: the per-account limit alone lets
    /// support fill the shared tables one account after another. Refused and kept as the
    /// per-account limit is (`too_many_overrides`).
    pub max_overrides: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 64 * 1024,
            max_admin_request_bytes: 8 << 20,
            max_connections: 256,
            reserved_admin_connections: 8,
            max_connections_per_uid: 64,
            idle_timeout_seconds: 30,
            // SendGrid's limit: large enough for any office list, small enough that one
            // account cannot fill the kernel's tables.
            max_entries_per_account: 1000,
            // A customer locked out needs one or two; a hundred is room for a whole office
            // of separate addresses, and 1/10,000 of the default tables.
            max_overrides_per_account: 100,
            // A hundred times what support grants in a busy month, and 1% of the default
            // tables.
            max_overrides: 10_000,
        }
    }
}

impl Limits {
    /// Values that would leave a client unable to make any request.
    fn validate(&self) -> Result<(), String> {
        if self.max_connections_per_uid == 0 || self.idle_timeout_seconds == 0 {
            return Err("limits.max_connections_per_uid and limits.idle_timeout_seconds must be at least 1".into());
        }
        if self.max_entries_per_account == 0 {
            // 0 would refuse every entry; an account without restriction uses mode `off`.
            return Err("limits.max_entries_per_account must be at least 1".into());
        }
        if self.max_overrides_per_account == 0 || self.max_overrides == 0 {
            return Err("limits.max_overrides_per_account and limits.max_overrides must be at least 1".into());
        }
        // At 0 not even `status` could be sent; below this hardly a login check.
        if self.max_request_bytes.min(self.max_admin_request_bytes) < MIN_REQUEST_BYTES {
            return Err(format!(
                "limits.max_request_bytes and limits.max_admin_request_bytes must be at least {MIN_REQUEST_BYTES}, \
                 room for a login check and the other short requests"
            ));
        }
        Ok(())
    }

    /// The slots callers without the admin role may share: at least one, so a small
    /// `max_connections` never shuts everyone else out.
    pub fn shared_connections(&self, max_connections: usize) -> usize {
        max_connections.saturating_sub(self.reserved_admin_connections).max(1.min(max_connections))
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Maps {
    pub slots: u32,
    pub accounts: u32,
}

impl Default for Maps {
    fn default() -> Self {
        Self { slots: ipaccess_common::DEFAULT_SLOTS, accounts: ipaccess_common::DEFAULT_ACCOUNTS }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// The Prometheus endpoint (see docs/operations.md for every metric).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// Address to serve `GET /metrics` on; none (the default) serves nothing.
    pub listen: Option<SocketAddr>,
    /// The metrics name every account and its traffic, so by default only a loopback
    /// address is accepted; exposing them further must be asked for.
    pub allow_non_loopback: bool,
}

/// The cause is part of each message and not also a `source`: the daemon prints an error
/// with its chain, which would say it twice.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("{0}: {1}")]
    Parse(PathBuf, toml::de::Error),
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

impl Config {
    /// Reads `path`; with `required` false a missing file means the built-in defaults.
    pub fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        let config: Config = match fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !required => Config::default(),
            Err(e) => return Err(ConfigError::Read(path.to_path_buf(), e)),
        };
        config.validate().map_err(|why| ConfigError::Invalid(path.to_path_buf(), why))?;
        Ok(config)
    }

    /// What the types alone do not rule out.
    fn validate(&self) -> Result<(), String> {
        self.limits.validate()?;
        if self.retention_days == 0 {
            // 0 would prune the whole activity log at the next sweep: the audit trail and the
            // sign-ins the lockout guard and support's evidence rest on.
            return Err("retention_days must be at least 1".into());
        }
        if !(1..=MAX_OVERRIDE_TTL_SECONDS).contains(&self.min_override_ttl_seconds) {
            return Err(format!(
                "min_override_ttl_seconds = {} must be from 1 to {MAX_OVERRIDE_TTL_SECONDS} (30 days, the longest \
                 override), or every grant would be refused",
                self.min_override_ttl_seconds
            ));
        }
        if self.maps.slots == 0 || self.maps.accounts == 0 {
            return Err("maps.slots and maps.accounts must be at least 1".into());
        }
        if let Some(cluster) = &self.cluster {
            cluster.check()?;
        }
        if let Some(listen) = self.metrics.listen
            && !listen.ip().is_loopback()
            && !self.metrics.allow_non_loopback
        {
            return Err(format!(
                "metrics.listen = \"{listen}\" is not a loopback address; the metrics name every account, so \
                 set metrics.allow_non_loopback = true to serve them there"
            ));
        }
        if !(1..=32).contains(&self.widest_override_ipv4) || !(1..=128).contains(&self.widest_override_ipv6) {
            return Err(format!(
                "widest_override_ipv4 = {} and widest_override_ipv6 = {} must be prefix lengths from 1 to 32 and \
                 from 1 to 128",
                self.widest_override_ipv4, self.widest_override_ipv6
            ));
        }
        Ok(())
    }

    pub fn database(&self) -> PathBuf {
        self.state_dir.join("ipaccess.db")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(toml::from_str::<Config>("").unwrap(), Config::default());
    }

    #[test]
    fn reads_every_section() {
        let config: Config = toml::from_str(
            r#"
            interfaces = ["eth0", "eth1"]
            socket_mode = 0o600
            [roles]
            check = { gids = [998] }
            admin = { uids = [1001] }
            [limits]
            max_request_bytes = 1024
            [maps]
            slots = 4096
            "#,
        )
        .unwrap();
        assert_eq!(config.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.socket_mode, 0o600);
        assert_eq!(config.limits.max_request_bytes, 1024);
        assert_eq!(config.limits.max_connections, Limits::default().max_connections);
        assert_eq!(config.maps.slots, 4096);
        assert_eq!(config.roles.of(1001, &[]), [Role::Admin].into());
        assert_eq!(config.roles.of(1002, &[5, 998]), [Role::Check].into());
        assert!(config.roles.of(65534, &[65534]).is_empty());
        assert_eq!(config.roles.of(0, &[]).len(), 3);
    }

    #[test]
    fn groups_by_name_or_gid() {
        // Group 0 is called root on every Linux system.
        let config: Config = toml::from_str(
            r#"
            socket_group = "root"
            [roles]
            support = { gids = ["root", 997] }
            "#,
        )
        .unwrap();
        assert_eq!(config.socket_group, Some(0));
        assert_eq!(config.roles.support.gids, [0, 997].into());
        assert_eq!(toml::from_str::<Config>("socket_group = 998").unwrap().socket_group, Some(998));

        let err = toml::from_str::<Config>(r#"socket_group = "no-such-group-here""#).unwrap_err();
        assert!(err.to_string().contains(r#"no group named "no-such-group-here""#), "{err}");
        let err = toml::from_str::<Config>("[roles]\ncheck = { gids = [true] }").unwrap_err();
        assert!(err.to_string().contains("a group name or a gid"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        assert!(toml::from_str::<Config>("interface = [\"eth0\"]").is_err());
    }

    #[test]
    fn metrics_are_off_by_default_and_loopback_only_unless_allowed() {
        assert_eq!(Config::default().metrics.listen, None);
        let dir = tempfile::tempdir().unwrap();
        let load = |text: &str| {
            let path = dir.path().join("ipaccessd.toml");
            fs::write(&path, text).unwrap();
            Config::load(&path, true)
        };
        let local = load("[metrics]\nlisten = \"[::1]:9469\"").unwrap();
        assert_eq!(local.metrics.listen, Some("[::1]:9469".parse().unwrap()));
        let refused = load("[metrics]\nlisten = \"198.18.0.1:9469\"").unwrap_err();
        assert!(matches!(refused, ConfigError::Invalid(..)), "{refused}");
        assert!(refused.to_string().contains("allow_non_loopback"), "{refused}");
        load("[metrics]\nlisten = \"198.18.0.1:9469\"\nallow_non_loopback = true").unwrap();
        assert_eq!(load("log_level = \"debug\"").unwrap().log_level, LogLevel::Debug);
        assert!(matches!(load("log_level = \"loud\""), Err(ConfigError::Parse(..))));
    }

    #[test]
    fn a_configuration_error_says_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, missing) = (dir.path().join("ipaccessd.toml"), dir.path().join("none.toml"));
        fs::write(&path, "interfaces = [").unwrap();
        for (error, cause) in [
            (Config::load(&path, true).unwrap_err(), "unclosed array"),
            (Config::load(&missing, true).unwrap_err(), "No such file"),
        ] {
            // As the daemon prints it: the error and its chain.
            let printed = format!("{:?}", anyhow::Error::from(error));
            assert_eq!(printed.matches(cause).count(), 1, "{printed}");
        }
    }

    #[test]
    fn connection_limits() {
        let limits: Limits = toml::from_str("reserved_admin_connections = 4").unwrap();
        assert_eq!(limits.shared_connections(256), 252);
        assert_eq!(limits.shared_connections(4), 1, "one slot stays shared however many are reserved");
        assert_eq!(limits.shared_connections(0), 0);
        for bad in [
            "[limits]\nmax_connections_per_uid = 0",
            "[limits]\nidle_timeout_seconds = 0",
            "[limits]\nmax_entries_per_account = 0",
            "retention_days = 0",
            "[maps]\naccounts = 0",
        ] {
            let refused = toml::from_str::<Config>(bad).unwrap().validate().unwrap_err();
            assert!(refused.contains("at least 1"), "{bad}: {refused}");
        }
        for bad in ["[limits]\nmax_request_bytes = 0", "[limits]\nmax_admin_request_bytes = 1023"] {
            let refused = toml::from_str::<Config>(bad).unwrap().validate().unwrap_err();
            assert!(refused.contains("at least 1024"), "{bad}: {refused}");
        }
        for bad in ["min_override_ttl_seconds = 0", "min_override_ttl_seconds = 2592001"] {
            let refused = toml::from_str::<Config>(bad).unwrap().validate().unwrap_err();
            assert!(refused.contains("from 1 to 2592000"), "{bad}: {refused}");
        }
        let refused = toml::from_str::<Config>("widest_override_ipv4 = 0").unwrap().validate().unwrap_err();
        assert!(refused.contains("from 1 to 32 and from 1 to 128"), "{refused}");
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error_only_when_named() {
        let missing = Path::new("/nonexistent/ipaccessd.toml");
        assert_eq!(Config::load(missing, false).unwrap(), Config::default());
        assert!(matches!(Config::load(missing, true), Err(ConfigError::Read(..))));
    }
}
