//! The kernel side as user space sees it: load or reuse the XDP program and its pinned maps,
//! attach it to interfaces, and keep the maps in step with the policy.
//!
//! Maps and links are pinned under `<bpffs>/ipaccess/v1/`. A starting daemon reuses them:
//! the maps keep their contents, and the pinned link of each interface is switched to the
//! freshly loaded program with one atomic `bpf_link_update`, so filtering never stops while
//! the daemon restarts or upgrades. Nothing is detached unless [`Datapath::detach`] is called.

pub mod bindings;
pub mod mmap;
pub mod netlink;
pub mod order;
pub mod prefix;
pub mod regions;
mod repin;
pub mod tables;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs, io,
    net::IpAddr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    maps::{Map, MapData, PerCpuArray, RingBuf},
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode as KernelXdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use ipaccess_common::{
    AccountCounters, AccountField, AccountRecord, AccountWord, Config, ConfigField, DropSample, HostCounters,
    MAP_ACCOUNT_SETS, MAP_ACCOUNTS, MAP_CONFIG, MAP_COUNTERS, MAP_HOST_COUNTERS, MAP_LAST_USED, MAP_SAMPLES,
    MAP_SET_GROUPS, MAP_SLOTS, MAX_SET_GROUPS, MAX_SETS, MAX_SETS_PER_ACCOUNT, NEVER_EXPIRES, NO_ACCOUNT, PIN_SUBDIR,
    PROGRAM_NAME, Policy, PolicyMode, Slot, TableDesc, Tag,
};
use ipnet::IpNet;
use log::{info, warn};
use serde::Deserialize;

use crate::protocol::Mode;

use self::{
    bindings::{BindingModel, BoundTo},
    mmap::MmapArray,
    netlink::XdpPath,
    order::ProbeOrder,
    prefix::{TooManyKeys, expand},
    tables::{FirstLengths, SlotKey, Synced, TableContent, TableError, Tables},
};

/// The pinned map of [`Datapath::store_commits`]: created by the daemon, not in the object.
pub const MAP_STORE_COMMITS: &str = "IPACCESS_STORE_COMMITS";
/// The pinned map of [`Datapath::store_line`]: created by the daemon, not in the object.
pub const MAP_STORE_LINE: &str = "IPACCESS_STORE_LINE";

/// The XDP object built by build.rs: the filter ([`PROGRAM_NAME`]) and its maps, nothing else.
pub static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipaccess-ebpf"));

/// The benchmark's reference programs (`ipaccess_floor`, `ipaccess_calibration_hash` and its
/// map), built by build.rs into an object of their own. ipaccessd never loads it: only
/// `cargo xtask bench datapath` does, beside [`PROGRAM_OBJECT`].
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipaccess-bench"));

/// The filter ([`PROGRAM_NAME`]) built without its last-used stamp (the ebpf crate's `no-stamp`
/// feature). Only the benchmark loads it, over the maps [`PROGRAM_OBJECT`]'s filter pinned, to
/// time what the stamp costs an allowed packet in the same run.
pub static BENCH_NO_STAMP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ipaccess-bench-no-stamp"));

/// The bpffs magic number from `statfs(2)`.
const BPF_FS_MAGIC: u32 = 0xcafe4a11;

#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Where bpffs is mounted; pins go under `<bpffs>/ipaccess/v1`.
    pub bpffs: PathBuf,
    /// Capacity of the slot array (all tables together), used when the maps are created.
    pub slots: u32,
    /// Highest account slot + 1, used when the maps are created.
    pub accounts: u32,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            bpffs: PathBuf::from("/sys/fs/bpf"),
            slots: ipaccess_common::DEFAULT_SLOTS,
            accounts: ipaccess_common::DEFAULT_ACCOUNTS,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum BindTarget {
    Port { protocol: u8, port: u16 },
    WholeAddress,
}

/// A destination owned by an account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    pub addr: IpAddr,
    pub target: BindTarget,
    pub account: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("bpffs is not mounted at {0} (mount it with `mount -t bpf bpf {0}`)")]
    BpffsNotMounted(PathBuf),
    #[error("mounting bpffs at {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("map sizes: {slots} slots and {accounts} accounts asked for, at most {max_slots} and {max_accounts}")]
    MapSizes { slots: u32, accounts: u32, max_slots: u32, max_accounts: u32 },
    #[error("creating the pin directory {path}: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error("{0} is in use by another ipaccessd")]
    InUse(PathBuf),
    #[error("loading the XDP program: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the object has no XDP program {0}")]
    NoProgram(String),
    #[error("{0}: {1}")]
    Program(String, #[source] aya::programs::ProgramError),
    #[error("{0}: {1}")]
    Map(String, #[source] aya::maps::MapError),
    #[error("mapping {name}: {source}")]
    Mmap { name: String, source: io::Error },
    #[error("duplicating the descriptor of {name}: {source}")]
    MapFd { name: String, source: io::Error },
    #[error("counting CPUs for the per-CPU counters: {0}")]
    Cpus(#[source] io::Error),
    #[error("{what}: {source}")]
    Link { what: String, source: LinkError },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("unpinning {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("pinning the link again at {path}: {source}")]
    Repin { path: PathBuf, source: io::Error },
    #[error("{iface}: reading its XDP attachment over netlink: {source}")]
    Netlink { iface: String, source: io::Error },
    #[error("{0}: the pinned link attaches nothing")]
    LinkDetached(String),
    #[error("pinned map {name} does not match this build ({detail}); remove {dir} to recreate the maps")]
    IncompatibleMap { name: &'static str, detail: String, dir: PathBuf },
    #[error("account slot {slot} is outside 1..{limit}")]
    AccountSlot { slot: u32, limit: u32 },
    #[error(
        "the kernel's account maps are full: they hold {} accounts; raise `accounts` in the configuration's \
         [maps] (it takes effect when the maps are next created)",
        limit - 1
    )]
    AccountsFull { limit: u32 },
    #[error(transparent)]
    BindingOutsideChange(#[from] bindings::OutsideChange),
    #[error("shared set id {0} is outside 1..{MAX_SETS}")]
    SetId(u32),
    #[error("an account can use at most {MAX_SETS_PER_ACCOUNT} shared sets, {0} were asked for")]
    TooManySets(usize),
    #[error(
        "the kernel holds at most {} distinct combinations of shared sets that accounts use; no room for another",
        MAX_SET_GROUPS - 1
    )]
    TooManySetGroups,
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("{name:?} is not an interface name: {why}")]
    InterfaceName { name: String, why: String },
    #[error(
        "{iface}: native XDP is unavailable ({reason}); with xdp_mode = \"auto\" ipaccessd would fall back to generic XDP"
    )]
    NoNativeXdp { iface: String, reason: String },
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Prefixes(#[from] TooManyKeys),
}

impl DatapathError {
    /// The maps are too small for what was asked: an operator's capacity problem with a
    /// known remedy (fewer entries or accounts, or larger maps), not a fault.
    pub fn is_capacity(&self) -> bool {
        // Every distinct combination of shared sets in use has a kernel table.
        matches!(self, Self::Table(TableError::Full { .. }) | Self::TooManySetGroups | Self::AccountsFull { .. })
    }
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Which XDP path [`Datapath::attach`] may put the program in (`xdp_mode` in the
/// configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native if the driver supports it, else generic, with a warning.
    #[default]
    Auto,
    /// Native only: attaching fails where the driver has no XDP support.
    Native,
    /// Generic only (for drivers whose native XDP misbehaves).
    Generic,
}

/// What [`Datapath::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Where the program runs now.
    pub path: XdpPath,
    /// An existing pinned link was switched to this program (its path is what it was).
    pub reused: bool,
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = if self.reused { "pinned link switched to this program" } else { "new link" };
        write!(f, "{} XDP, {how}", self.path)
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    tables: Tables,
    accounts: MmapArray<AccountRecord>,
    config: MmapArray<Config>,
    /// Per slot of the tables, the clock at which its key last let a packet through.
    last_used: MmapArray<u64>,
    /// The set groups' tables, in two generations ([`MAP_SET_GROUPS`]).
    set_groups: MmapArray<u64>,
    /// Per account slot, its set group.
    account_sets: MmapArray<u64>,
    /// The shared sets and the groups built from them.
    sets: SetGroups,
    samples: RingBuf<MapData>,
    /// The bindings in the kernel's binding table, and each account's keys there (rewritten
    /// when the account changes).
    bindings: BindingModel,
    /// How many loads it took the kernel to verify the program ([`load_program`]).
    load_attempts: u32,
    /// Word 0: the store's commit count of the policy this kernel enforces
    /// ([`Self::store_commits`]). A map of user space alone: the program never reads it.
    store_commits: aya::maps::Array<MapData, u64>,
    /// Word 0: the line of commits of the store whose policy this kernel enforces
    /// ([`Self::store_line`]). A map of its own so that maps pinned by a build before it
    /// keep their commit count.
    store_line: aya::maps::Array<MapData, u64>,
    /// Links this process attached or reused, by interface (each also pinned).
    links: BTreeMap<String, FdLink>,
    /// Per account slot, the length its table probes first per family (IPv4, IPv6;
    /// [`NO_LENGTH`] for the writer's default, the most specific), kept through every
    /// later change of its allowlist.
    first_lengths: FirstLengths,
    /// Held for the life of the Datapath: one writer per pin directory.
    _lock: fs::File,
}

impl Datapath {
    /// Loads the program, creating or reusing the pinned maps. Does not attach anything.
    pub fn open(options: &DatapathOptions) -> Result<Self> {
        check_bpffs(&options.bpffs)?;
        if options.slots > AccountWord::MAX_SLOTS || options.accounts > AccountWord::MAX_ACCOUNT + 1 {
            return Err(DatapathError::MapSizes {
                slots: options.slots,
                accounts: options.accounts,
                max_slots: AccountWord::MAX_SLOTS,
                max_accounts: AccountWord::MAX_ACCOUNT + 1,
            });
        }
        let pin_dir = options.bpffs.join(PIN_SUBDIR);
        fs::create_dir_all(&pin_dir).map_err(|source| DatapathError::PinDir { path: pin_dir.clone(), source })?;
        let lock = lock_dir(&pin_dir)?;
        let store_commits = user_space_word(&pin_dir, MAP_STORE_COMMITS)?;
        let store_line = user_space_word(&pin_dir, MAP_STORE_LINE)?;
        // One stamp per slot: as many as the slot array has, which a reused pin may have
        // sized otherwise than the configuration (a build before stamps pinned no stamps).
        let stamps = MapData::from_pin(pin_dir.join(MAP_SLOTS))
            .ok()
            .and_then(|m| m.info().ok())
            .map_or(options.slots, |info| info.max_entries());
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(MAP_SLOTS, options.slots)
            .map_max_entries(MAP_LAST_USED, stamps)
            .map_max_entries(MAP_ACCOUNTS, options.accounts)
            .map_max_entries(MAP_COUNTERS, options.accounts)
            .map_max_entries(MAP_ACCOUNT_SETS, options.accounts)
            // The verifier's message and statistics, not its trace: the program takes some
            // 700,000 verified instructions, whose trace overflows any log buffer, and an
            // overflowing log fails the load with ENOSPC (aya then tries ever larger buffers,
            // verifying the program up to ten more times, and reports ENOSPC, not the cause).
            .verifier_log_level(VerifierLogLevel::STATS)
            .load(PROGRAM_OBJECT)?;
        let slots_len = map_len::<Slot>(&ebpf, MAP_SLOTS, &pin_dir)?;
        let accounts_len = map_len::<AccountRecord>(&ebpf, MAP_ACCOUNTS, &pin_dir)?;
        let counters_len = map_len::<AccountCounters>(&ebpf, MAP_COUNTERS, &pin_dir)?;
        if counters_len != accounts_len {
            return Err(DatapathError::IncompatibleMap {
                name: MAP_COUNTERS,
                detail: format!("{counters_len} counters for {accounts_len} accounts"),
                dir: pin_dir,
            });
        }
        // Created beside maps pinned by a build before shared sets: sized like them.
        let account_sets_len = map_len::<u64>(&ebpf, MAP_ACCOUNT_SETS, &pin_dir)?;
        if account_sets_len != accounts_len {
            return Err(DatapathError::IncompatibleMap {
                name: MAP_ACCOUNT_SETS,
                detail: format!("set groups for {account_sets_len} accounts, {accounts_len} accounts"),
                dir: pin_dir,
            });
        }
        let groups_len = map_len::<u64>(&ebpf, MAP_SET_GROUPS, &pin_dir)?;
        if groups_len != 2 * MAX_SET_GROUPS {
            return Err(DatapathError::IncompatibleMap {
                name: MAP_SET_GROUPS,
                detail: format!("{groups_len} words instead of {}", 2 * MAX_SET_GROUPS),
                dir: pin_dir,
            });
        }
        if slots_len != options.slots || accounts_len != options.accounts {
            warn!(
                "reusing pinned maps with {slots_len} slots and {accounts_len} accounts (configured: {} and {}); \
                 the configured sizes apply when the maps are next created",
                options.slots, options.accounts
            );
        }
        let slots = mmap_map(&ebpf, MAP_SLOTS, slots_len)?;
        let accounts = mmap_map::<AccountRecord>(&ebpf, MAP_ACCOUNTS, accounts_len)?;
        let config = mmap_map::<Config>(&ebpf, MAP_CONFIG, 1)?;
        let last_used_len = map_len::<u64>(&ebpf, MAP_LAST_USED, &pin_dir)?;
        let last_used = mmap_map::<u64>(&ebpf, MAP_LAST_USED, last_used_len)?;
        let set_groups = mmap_map::<u64>(&ebpf, MAP_SET_GROUPS, groups_len)?;
        let account_sets = mmap_map::<u64>(&ebpf, MAP_ACCOUNT_SETS, account_sets_len)?;
        let sets = SetGroups::found(&set_groups, &account_sets);
        let in_use = (0..accounts_len)
            .map(|slot| account_table(&accounts, slot))
            .chain(sets.groups.values().map(|g| g.table))
            .chain([bindings_table(&config)]);
        let tables = Tables::new(slots, in_use)?;
        let samples = ebpf.take_map(MAP_SAMPLES).expect("object has a sample ring");
        let samples = RingBuf::try_from(samples).map_err(|e| DatapathError::Map(MAP_SAMPLES.into(), e))?;
        let program = program_mut(&mut ebpf, PROGRAM_NAME)?;
        let verifying = Instant::now();
        let load_attempts = load_program(program)?;
        let processed = program.info().ok().and_then(|info| info.verified_instruction_count());
        let processed = processed.map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string());
        info!(
            "{PROGRAM_NAME}: verified in {:?} ({processed} instructions processed, load {load_attempts} of {LOAD_ATTEMPTS})",
            verifying.elapsed()
        );
        let bindings = BindingModel::from_table(tables.read(bindings_table(&config)).entries);
        let first_lengths = first_lengths_found(&tables, &accounts);
        Ok(Self {
            ebpf,
            pin_dir,
            tables,
            accounts,
            config,
            last_used,
            set_groups,
            account_sets,
            sets,
            samples,
            bindings,
            load_attempts,
            store_commits,
            store_line,
            links: BTreeMap::new(),
            first_lengths,
            _lock: lock,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The store's commit count ([`crate::store::Tx::commit_counted`]) of the last policy
    /// change written here: 0 for maps no daemon recorded one in (new, or from a build
    /// before the count). Pinned, so it outlives the daemon as the policy in the maps does.
    pub fn store_commits(&self) -> u64 {
        self.store_commits.get(&0, 0).unwrap_or(0)
    }

    /// Records that the maps hold the policy of the store at commit count `count`.
    pub fn set_store_commits(&mut self, count: u64) -> Result<()> {
        self.store_commits.set(0, count, 0).map_err(|e| DatapathError::Map(MAP_STORE_COMMITS.into(), e))
    }

    /// The line of commits ([`crate::store::Tx::start_new_line`]) of the store whose policy
    /// the maps hold: 0 for maps no daemon recorded one in (new, or from a build before
    /// lines). Commit counts compare only within one line.
    pub fn store_line(&self) -> u64 {
        self.store_line.get(&0, 0).unwrap_or(0)
    }

    /// Records that the maps hold the policy of a store on the line `line`.
    pub fn set_store_line(&mut self, line: u64) -> Result<()> {
        self.store_line.set(0, line, 0).map_err(|e| DatapathError::Map(MAP_STORE_LINE.into(), e))
    }

    /// How many loads it took to have the program verified: 1 unless the kernel cut one short.
    pub fn load_attempts(&self) -> u32 {
        self.load_attempts
    }

    /// The loaded filter program (for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program(&self) -> &Xdp {
        self.ebpf.program(PROGRAM_NAME).and_then(|p| p.try_into().ok()).expect("object has the XDP program")
    }

    /// Where the link attaching the filter to `iface` is pinned (a name the kernel would not
    /// give an interface is refused: it could name a path elsewhere).
    fn link_pin(&self, iface: &str) -> Result<PathBuf> {
        check_interface_name(iface).map_err(|why| DatapathError::InterfaceName { name: iface.to_owned(), why })?;
        Ok(self.pin_dir.join(format!("link-{iface}")))
    }

    /// Attaches the filter to `iface` in the path `mode` allows, or switches the interface's
    /// existing pinned link to this program without a gap. A reused link keeps the path it
    /// was attached in: moving between native and generic XDP means detaching first (the
    /// kernel refuses both at once), which ipaccessd never does on its own.
    pub fn attach(&mut self, iface: &str, mode: XdpMode) -> Result<Attachment> {
        let pin = self.link_pin(iface)?;
        if !pin.exists() && self.adopt_link_of_other_layout(iface)? {
            return self.reused_attachment(iface, mode);
        }
        if pin.exists() {
            match self.reuse_link(&pin) {
                Ok(link) => {
                    self.links.insert(iface.to_string(), link);
                    return self.reused_attachment(iface, mode);
                }
                Err(e) => {
                    // The interface went away and came back, or the pin is stale.
                    warn!("{iface}: cannot reuse pinned link ({e}); attaching afresh");
                    let _ = fs::remove_file(&pin);
                }
            }
        }
        let program = program_mut(&mut self.ebpf, PROGRAM_NAME)?;
        let attached = |program: &mut Xdp, flags| match program.attach(iface, flags) {
            Err(ProgramError::UnknownInterface { .. }) => Err(DatapathError::NoInterface(iface.into())),
            other => Ok(other),
        };
        let (id, path) = match mode {
            XdpMode::Generic => (
                attached(program, KernelXdpMode::Skb)?
                    .map_err(|e| DatapathError::Program(format!("attaching to {iface}"), e))?,
                XdpPath::Generic,
            ),
            XdpMode::Native | XdpMode::Auto => match attached(program, KernelXdpMode::Driver)? {
                Ok(id) => (id, XdpPath::Native),
                Err(native) if mode == XdpMode::Native => {
                    return Err(DatapathError::NoNativeXdp { iface: iface.into(), reason: native.to_string() });
                }
                Err(native) => {
                    warn!("{iface}: native XDP unavailable ({native}); falling back to generic XDP, which is slower");
                    let id = attached(program, KernelXdpMode::Skb)?
                        .map_err(|e| DatapathError::Program(format!("attaching to {iface}"), e))?;
                    (id, XdpPath::Generic)
                }
            },
        };
        let link = program.take_link(id).map_err(|e| DatapathError::Program(format!("attaching to {iface}"), e))?;
        let link = FdLink::try_from(link).map_err(|source| DatapathError::Link {
            what: format!("{iface}: XDP attached without a bpf_link"),
            source,
        })?;
        // The pin keeps the link (and so the filter) alive after this process exits.
        let pinned = link.pin(&pin).map_err(|source| DatapathError::Pin { path: pin.clone(), source })?;
        self.links.insert(iface.to_string(), FdLink::from(pinned));
        let attachment = Attachment { path, reused: false };
        info!("{iface}: attached ({attachment})");
        Ok(attachment)
    }

    /// An existing link now runs this program: where it runs (it keeps its XDP path).
    fn reused_attachment(&self, iface: &str, mode: XdpMode) -> Result<Attachment> {
        let path = netlink::xdp_path(iface)
            .map_err(|source| DatapathError::Netlink { iface: iface.into(), source })?
            .ok_or_else(|| DatapathError::LinkDetached(iface.into()))?;
        let wanted = match mode {
            XdpMode::Auto => path,
            XdpMode::Native => XdpPath::Native,
            XdpMode::Generic => XdpPath::Generic,
        };
        if path != wanted {
            warn!(
                "{iface}: runs in {path} XDP but xdp_mode asks for {wanted}; it stays {path}, since \
                 switching means a moment without the filter: `ipaccessctl detach {iface}` and a \
                 reload switch it"
            );
        }
        let attachment = Attachment { path, reused: true };
        info!("{iface}: {attachment}");
        Ok(attachment)
    }

    /// Pin directories of other layout versions of the maps (`<bpffs>/ipaccess/v*` besides
    /// this one's), left by the build this one upgraded from.
    fn other_layouts(&self) -> Vec<PathBuf> {
        let (Some(parent), Some(own)) = (self.pin_dir.parent(), self.pin_dir.file_name()) else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir(parent) else { return Vec::new() };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name() != own && e.file_name().to_string_lossy().starts_with('v'))
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs
    }

    /// Takes over `iface`'s link if a build with another map layout pinned it: the link is
    /// switched to this program in one update (as on any restart; this program already has
    /// its own maps filled), then pinned here and unpinned there. Returns whether there was
    /// one.
    fn adopt_link_of_other_layout(&mut self, iface: &str) -> Result<bool> {
        let Some(old) =
            self.other_layouts().into_iter().map(|dir| dir.join(format!("link-{iface}"))).find(|p| p.exists())
        else {
            return Ok(false);
        };
        let link = match self.reuse_link(&old) {
            Ok(link) => link,
            Err(e) => {
                warn!("{iface}: cannot take over the link pinned at {} ({e})", old.display());
                return Ok(false);
            }
        };
        let pin = self.link_pin(iface)?;
        let pinned = link.pin(&pin).map_err(|source| DatapathError::Pin { path: pin.clone(), source })?;
        self.links.insert(iface.to_string(), FdLink::from(pinned));
        fs::remove_file(&old).map_err(|source| DatapathError::Unpin { path: old.clone(), source })?;
        info!("{iface}: took over the filter pinned at {} by a build with another map layout", old.display());
        Ok(true)
    }

    /// Removes the pins (maps and all) of other map layouts that no interface uses any
    /// more and no running ipaccessd holds. Returns the interfaces still filtered by an
    /// older layout's program, with its directory: they are not in this daemon's
    /// configuration, so they were left as they are.
    pub fn retire_other_layouts(&self) -> Vec<(PathBuf, Vec<String>)> {
        let mut still_used = Vec::new();
        for dir in self.other_layouts() {
            let interfaces = pinned_interfaces(&dir);
            if !interfaces.is_empty() {
                warn!(
                    "{}: still filtering {} with an older build's program; add them to the configuration \
                     (and restart) to move them to this one, or detach them",
                    dir.display(),
                    interfaces.join(", ")
                );
                still_used.push((dir, interfaces));
                continue;
            }
            let Ok(_held) = try_lock_dir(&dir) else {
                warn!("{}: in use by another ipaccessd; left in place", dir.display());
                continue;
            };
            match fs::remove_dir_all(&dir) {
                Ok(()) => info!("removed {}, the pinned maps of a build with another layout", dir.display()),
                Err(e) => warn!("could not remove {}: {e}", dir.display()),
            }
        }
        still_used
    }

    /// Where each interface with a pinned link runs the program, as the kernel reports it
    /// (`None` if it cannot be read, e.g. the interface is gone).
    pub fn attachments(&self) -> Vec<(String, Option<XdpPath>)> {
        self.attached_interfaces()
            .into_iter()
            .map(|iface| {
                let path = netlink::xdp_path(&iface).ok().flatten();
                (iface, path)
            })
            .collect()
    }

    /// Atomically replaces the program in a pinned link (`bpf_link_update`).
    fn reuse_link(&mut self, pin: &Path) -> Result<FdLink> {
        let pinned = PinnedLink::from_pin(pin)
            .map_err(|source| DatapathError::Link { what: format!("opening {}", pin.display()), source })?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|source| DatapathError::Link { what: pin.display().to_string(), source })?;
        let program = program_mut(&mut self.ebpf, PROGRAM_NAME)?;
        let id = program
            .attach_to_link(link)
            .map_err(|e| DatapathError::Program(format!("updating {}", pin.display()), e))?;
        let link = program.take_link(id).map_err(|e| DatapathError::Program(pin.display().to_string(), e))?;
        FdLink::try_from(link).map_err(|source| DatapathError::Link { what: pin.display().to_string(), source })
    }

    /// Removes the filter from `iface`: the only way the daemon ever detaches. Returns false
    /// if it was not attached.
    pub fn detach(&mut self, iface: &str) -> Result<bool> {
        let pin = self.link_pin(iface)?;
        // Closing the last reference to a link that is no longer pinned detaches it.
        self.links.remove(iface);
        if !pin.exists() {
            return Ok(false);
        }
        let pinned = PinnedLink::from_pin(&pin)
            .map_err(|source| DatapathError::Link { what: format!("opening {}", pin.display()), source })?;
        let link = pinned.unpin().map_err(|source| DatapathError::Unpin { path: pin.clone(), source })?;
        drop(link);
        info!("{iface}: detached");
        Ok(true)
    }

    /// Pins again the link of each interface this daemon filters whose pin was removed while
    /// it ran (the pin directory deleted by hand): the pin is what keeps the filter on the
    /// interface once this process exits. Each interface whose pin was gone, with where it
    /// is pinned again, or why it could not be.
    pub fn restore_link_pins(&self) -> Vec<(String, Result<PathBuf>)> {
        let mut gone = Vec::new();
        for (iface, link) in &self.links {
            let Ok(pin) = self.link_pin(iface) else { continue };
            if pin.exists() {
                continue;
            }
            let restored = match link.info() {
                Err(source) => Err(DatapathError::Link { what: format!("{iface}: reading its link"), source }),
                Ok(info) => fs::create_dir_all(&self.pin_dir)
                    .and_then(|()| repin::pin_link_by_id(info.id(), &pin))
                    .map_err(|source| DatapathError::Repin { path: pin.clone(), source })
                    .map(|()| pin),
            };
            gone.push((iface.clone(), restored));
        }
        gone
    }

    /// Interfaces with a pinned link.
    pub fn attached_interfaces(&self) -> Vec<String> {
        pinned_interfaces(&self.pin_dir)
    }

    /// See [`Tables::load_densely`]: called before a whole policy is loaded.
    pub fn load_densely(&mut self, keys: u64, tables: u64) -> bool {
        self.tables.load_densely(keys, tables)
    }

    pub fn end_dense_load(&mut self) {
        self.tables.end_dense_load();
    }

    /// Account slots the maps hold a policy or an allowlist for.
    pub fn configured_slots(&self) -> Vec<u32> {
        (1..self.accounts.len())
            .filter(|&s| self.policy(s) != Policy::UNSET || account_table(&self.accounts, s) != TableDesc::NONE)
            .collect()
    }

    pub fn account_capacity(&self) -> u32 {
        self.accounts.len()
    }

    /// The sizes the pinned maps were made with, (slots, accounts): the configured ones
    /// unless maps made before a change of `[maps]` were reused.
    pub fn map_sizes(&self) -> (u32, u32) {
        (self.tables.capacity(), self.accounts.len())
    }

    fn check_slot(&self, slot: u32) -> Result<()> {
        let limit = self.accounts.len();
        match slot {
            NO_ACCOUNT => Err(DatapathError::AccountSlot { slot, limit }),
            // The store numbers accounts from 1 without knowing the maps' size: a slot past
            // the end is one account more than the maps hold.
            _ if slot >= limit => Err(DatapathError::AccountsFull { limit }),
            _ => Ok(()),
        }
    }

    fn policy(&self, slot: u32) -> Policy {
        Policy::from_bits(self.accounts.load(slot, AccountField::Policy.word()))
    }

    fn store_policy(&self, slot: u32, policy: Policy) {
        self.accounts.store(slot, AccountField::Policy.word(), policy.to_bits());
    }

    fn store_account_table(&self, slot: u32, table: TableDesc) {
        self.accounts.store(slot, AccountField::Table.word(), table.0);
    }

    /// Sets an account's mode and suspension (one atomic store).
    pub fn set_policy(&mut self, slot: u32, mode: Mode, suspended: bool) -> Result<()> {
        self.check_slot(slot)?;
        let mode = match mode {
            Mode::Off => PolicyMode::Off,
            Mode::Monitor => PolicyMode::Monitor,
            Mode::Enforce => PolicyMode::Enforce,
        };
        self.store_policy(slot, Policy::new(mode, suspended));
        self.refresh_bindings(slot);
        Ok(())
    }

    /// Replaces an account's allowlist (entries and overrides, each with its expiry in
    /// `CLOCK_BOOTTIME` ns or `NEVER_EXPIRES`). A source allowed before and after the call is
    /// allowed throughout it.
    pub fn set_allowlist(&mut self, slot: u32, entries: &[(IpNet, u64)]) -> Result<()> {
        self.check_slot(slot)?;
        let mut content = table_content(entries, |family, len| Tag::allow(slot, family, len))?;
        self.first_lengths.apply(slot, &mut content);
        let current = account_table(&self.accounts, slot);
        if let Synced::Replaced(new) = self.tables.sync(current, &content)? {
            self.store_account_table(slot, new);
            // The bindings point the kernel at the new table before the old one is retired.
            self.refresh_bindings(slot);
            self.tables.retire(current);
        }
        Ok(())
    }

    /// Replaces shared set `set`'s entries (they never expire). Every set group holding the
    /// set gets a new table; all of them are published with one store (the generation
    /// switch), so every account referencing the set sees the whole change at the same
    /// moment. On an error nothing has changed.
    pub fn set_shared_set(&mut self, set: u32, entries: &[IpNet]) -> Result<()> {
        check_set(set)?;
        let previous = self.sets.sets.insert(set, entries.to_vec());
        let rebuilt = self.rebuild_groups_with(set);
        if rebuilt.is_err() {
            match previous {
                Some(old) => self.sets.sets.insert(set, old),
                None => self.sets.sets.remove(&set),
            };
        }
        rebuilt
    }

    /// Forgets a shared set: accounts that still reference it get nothing from it.
    pub fn remove_shared_set(&mut self, set: u32) -> Result<()> {
        check_set(set)?;
        let Some(previous) = self.sets.sets.remove(&set) else { return Ok(()) };
        let rebuilt = self.rebuild_groups_with(set);
        if rebuilt.is_err() {
            self.sets.sets.insert(set, previous);
        }
        rebuilt
    }

    /// Rebuilds every group that holds `set` and publishes them all with one store.
    fn rebuild_groups_with(&mut self, set: u32) -> Result<()> {
        let affected: Vec<u32> = self
            .sets
            .groups
            .iter()
            .filter(|(_, g)| g.sets.as_ref().is_some_and(|sets| sets.contains(&set)))
            .map(|(&id, _)| id)
            .collect();
        let mut built: Vec<(u32, TableDesc)> = Vec::with_capacity(affected.len());
        for &id in &affected {
            let sets = self.sets.groups[&id].sets.clone().unwrap_or_default();
            match self.build_group(id, &sets) {
                Ok(table) => built.push((id, table)),
                Err(e) => {
                    // Never published: give the regions back.
                    for (_, table) in built {
                        self.tables.retire(table);
                    }
                    if !matches!(e, DatapathError::Table(TableError::Full { .. })) {
                        return Err(e);
                    }
                    // No room for a second copy of every group: each is changed where it is,
                    // as an allowlist is, so that a removal never waits for room (the kernel
                    // would go on letting the removed network in). Each group then goes from
                    // the old sets to the new on its own, not all of them at one store.
                    for &id in &affected {
                        let sets = self.sets.groups[&id].sets.clone().unwrap_or_default();
                        self.sync_group(id, &sets)?;
                    }
                    return Ok(());
                }
            }
        }
        if built.is_empty() {
            return Ok(());
        }
        // The new tables go into the generation not in use, beside the unchanged ones, and
        // one store switches every account to them.
        let active = self.set_groups.load(0, 0) & 1;
        let next = active ^ 1;
        for (&id, group) in &self.sets.groups {
            let table = built.iter().find(|(b, _)| *b == id).map_or(group.table, |(_, t)| *t);
            self.set_groups.store(group_word(next, id), 0, table.0);
        }
        self.set_groups.store(0, 0, next);
        for (id, table) in built {
            let group = self.sets.groups.get_mut(&id).expect("affected groups exist");
            let old = std::mem::replace(&mut group.table, table);
            // The generation now idle says the same, for the next switch.
            self.set_groups.store(group_word(active, id), 0, table.0);
            self.tables.retire(old);
        }
        Ok(())
    }

    /// A table holding the union of `sets`' entries, keyed for group `id`.
    fn build_group(&mut self, id: u32, sets: &[u32]) -> Result<TableDesc> {
        let content = self.group_content(id, sets)?;
        Ok(self.tables.rebuild(&content)?)
    }

    /// The union of `sets`' entries, keyed for group `id`.
    fn group_content(&self, id: u32, sets: &[u32]) -> Result<TableContent> {
        let mut entries: Vec<(IpNet, u64)> =
            sets.iter().filter_map(|set| self.sets.sets.get(set)).flatten().map(|&net| (net, NEVER_EXPIRES)).collect();
        entries.sort_unstable();
        entries.dedup();
        table_content(&entries, |family, len| Tag::set_entry(id, family, len))
    }

    /// The shared sets whose entries also let sources through to account `slot` (its enabled
    /// references), replacing the previous list. The account moves to the group of exactly
    /// these sets, which is built if no other account uses it, with one store.
    pub fn set_account_sets(&mut self, slot: u32, sets: &[u32]) -> Result<()> {
        self.check_slot(slot)?;
        let wanted = group_key(sets)?;
        let current = self.account_sets.load(slot, 0) as u32;
        let target = if wanted.is_empty() { 0 } else { self.group_of(&wanted)? };
        if target == current {
            return Ok(());
        }
        if target == 0 {
            // The binding word stops sending packets to the group before the group goes.
            self.refresh_bindings_with(slot, false);
            self.account_sets.store(slot, 0, 0);
        } else {
            self.account_sets.store(slot, 0, target as u64);
            self.sets.groups.get_mut(&target).expect("group just found").accounts += 1;
            if current == 0 {
                self.refresh_bindings(slot);
            }
        }
        self.leave_group(current);
        Ok(())
    }

    /// Gives each set group an earlier daemon left (found in the maps at start, its sets
    /// unknown) the sets its accounts want now, when they all want the same ones: the group's
    /// table is brought up to those sets' entries in place, as an allowlist is, and the
    /// accounts stay in it. Otherwise every group would be built anew beside the old one as
    /// its accounts were given their sets, so a restart would need free room for a second
    /// copy of every group, and a host with less would not start again. `wanted` holds each
    /// account slot's sets, as [`Self::set_account_sets`] will be given them; a group whose
    /// accounts disagree (a fleet node that was away) is left to be rebuilt that way.
    pub fn adopt_found_set_groups(&mut self, wanted: &HashMap<u32, Vec<u32>>) -> Result<()> {
        let mut members: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for slot in 0..self.account_sets.len() {
            let id = self.account_sets.load(slot, 0) as u32;
            if self.sets.groups.get(&id).is_some_and(|g| g.sets.is_none()) {
                members.entry(id).or_default().push(slot);
            }
        }
        for (id, slots) in members {
            // Each account's sets as `set_account_sets` would key them; `None` where it would
            // refuse them.
            let mut wants = slots.iter().map(|slot| group_key(wanted.get(slot).map_or(&[], Vec::as_slice)).ok());
            let Some(Some(sets)) = wants.next() else { continue };
            if sets.is_empty()
                || self.sets.by_sets.contains_key(&sets)
                || wants.any(|other| other.as_ref() != Some(&sets))
            {
                continue;
            }
            self.sync_group(id, &sets)?;
            let group = self.sets.groups.get_mut(&id).expect("found above");
            group.sets = Some(sets.clone());
            self.sets.by_sets.insert(sets, id);
        }
        Ok(())
    }

    /// Brings group `id`'s table to `sets`' entries where it is when it can (a table built
    /// beside it otherwise, published with one store).
    fn sync_group(&mut self, id: u32, sets: &[u32]) -> Result<()> {
        let content = self.group_content(id, sets)?;
        let current = self.sets.groups[&id].table;
        if let Synced::Replaced(new) = self.tables.sync(current, &content)? {
            self.publish_group(id, new);
            self.tables.retire(current);
            self.sets.groups.get_mut(&id).expect("a group of the maps").table = new;
        }
        Ok(())
    }

    /// The group of exactly `sets`, built and published if none exists.
    fn group_of(&mut self, sets: &[u32]) -> Result<u32> {
        if let Some(&id) = self.sets.by_sets.get(sets) {
            return Ok(id);
        }
        self.clear_released_groups(Instant::now());
        let free = |id: &u32| !self.sets.groups.contains_key(id) && !self.sets.released.iter().any(|(r, _)| r == id);
        let id = (1..MAX_SET_GROUPS).find(free).ok_or(DatapathError::TooManySetGroups)?;
        let table = self.build_group(id, sets)?;
        self.publish_group(id, table);
        self.sets.groups.insert(id, SetGroup { sets: Some(sets.to_vec()), table, accounts: 0 });
        self.sets.by_sets.insert(sets.to_vec(), id);
        Ok(id)
    }

    /// Writes group `id`'s table into both generations, so that the group is the same
    /// whichever one a packet reads (`TableDesc::NONE`: the group is gone).
    fn publish_group(&self, id: u32, table: TableDesc) {
        self.set_groups.store(group_word(0, id), 0, table.0);
        self.set_groups.store(group_word(1, id), 0, table.0);
    }

    /// One account fewer uses group `id`; the last one out removes it. A packet may have
    /// read the group's id from its account's word just before the account moved on, and
    /// read the group's table after: so the table stays published, its region quarantined
    /// (intact), and the id is not given to other sets until the quarantine ends.
    fn leave_group(&mut self, id: u32) {
        let Some(group) = self.sets.groups.get_mut(&id) else { return };
        group.accounts = group.accounts.saturating_sub(1);
        if group.accounts > 0 {
            return;
        }
        let group = self.sets.groups.remove(&id).expect("just found");
        if let Some(sets) = &group.sets {
            self.sets.by_sets.remove(sets);
        }
        self.tables.retire(group.table);
        self.sets.released.push((id, Instant::now()));
    }

    /// Unpublishes the tables of groups left at least [`regions::QUARANTINE`] before `now`
    /// (no packet can still hold their ids), which frees their ids.
    fn clear_released_groups(&mut self, now: Instant) {
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sets.released)
            .into_iter()
            .partition(|(_, at)| now.duration_since(*at) >= regions::QUARANTINE);
        self.sets.released = waiting;
        for (id, _) in due {
            self.publish_group(id, TableDesc::NONE);
        }
    }

    /// The shared sets account `slot` references in the kernel (empty also for a group an
    /// earlier daemon made, until the account's sets are given again).
    pub fn account_sets(&self, slot: u32) -> Vec<u32> {
        let group = self.account_sets.load(slot, 0) as u32;
        self.sets.groups.get(&group).and_then(|g| g.sets.clone()).unwrap_or_default()
    }

    /// The shared sets whose union set group `group` holds ([`KeyOwner::SetGroup`]).
    pub fn sets_of_group(&self, group: u32) -> Vec<u32> {
        self.sets.groups.get(&group).and_then(|g| g.sets.clone()).unwrap_or_default()
    }

    /// Forgets an account: unset policy (its bindings, if any remain, drop everything), no
    /// allowlist and no shared sets. Counters are zeroed so the slot can be reused.
    pub fn remove_account(&mut self, slot: u32) -> Result<()> {
        self.check_slot(slot)?;
        self.set_account_sets(slot, &[])?;
        self.first_lengths.forget(slot);
        self.store_policy(slot, Policy::UNSET);
        let current = account_table(&self.accounts, slot);
        self.store_account_table(slot, TableDesc::NONE);
        self.refresh_bindings(slot);
        self.tables.retire(current);
        self.reset_counters(slot)
    }

    /// The word the kernel finds in an account's bindings.
    fn account_word(&self, slot: u32) -> AccountWord {
        let has_sets = self.account_sets.load(slot, 0) != 0;
        AccountWord::new(slot, self.policy(slot), account_table(&self.accounts, slot)).with_sets(has_sets)
    }

    /// Rewrites the account word in each of the account's bindings (one store each).
    fn refresh_bindings(&self, slot: u32) {
        self.refresh_bindings_with(slot, self.account_word(slot).has_sets());
    }

    /// [`Self::refresh_bindings`], saying `has_sets` whatever the references hold now.
    fn refresh_bindings_with(&self, slot: u32, has_sets: bool) {
        let table = bindings_table(&self.config);
        let word = self.account_word(slot).with_sets(has_sets);
        for (key, has_ports) in self.bindings.keys_of(slot) {
            let found = self.tables.set_value(table, key, word.with_port_bindings(has_ports).to_bits());
            debug_assert!(found, "binding {key:?} of account {slot} is missing from the table");
        }
    }

    /// The word a binding-table key holds for its owner.
    fn binding_word(&self, owner: BoundTo) -> u64 {
        let word = if owner.account == NO_ACCOUNT { AccountWord::NONE } else { self.account_word(owner.account) };
        word.with_port_bindings(owner.has_ports).to_bits()
    }

    /// Replaces the whole set of bindings, comparing every key of the table with what it
    /// should hold (so it also mends a table that differs from what this process wrote).
    pub fn set_bindings(&mut self, bindings: &[Binding]) -> Result<()> {
        for b in bindings {
            self.check_slot(b.account)?;
        }
        let model = BindingModel::of(bindings);
        let entries = model.keys().map(|(key, owner)| (key, self.binding_word(owner))).collect();
        self.sync_bindings(&TableContent { entries, ..Default::default() })?;
        self.bindings = model;
        Ok(())
    }

    /// Makes the bindings at `addrs` exactly `wanted` (each at one of them), leaving every
    /// other address's as it is: only the keys of those addresses are compared and written,
    /// so a change of one endpoint costs the same whatever the number of bindings.
    pub fn set_bindings_at(&mut self, addrs: &BTreeSet<IpAddr>, wanted: &[Binding]) -> Result<()> {
        for b in wanted {
            self.check_slot(b.account)?;
        }
        let change = self.bindings.change(addrs, wanted)?;
        if change.is_empty() {
            return Ok(());
        }
        let written: Vec<(SlotKey, u64)> =
            change.written.iter().map(|&(key, owner)| (key, self.binding_word(owner))).collect();
        let current = bindings_table(&self.config);
        if self.tables.change_keys(current, &written, &change.removed, change.settle) {
            self.bindings.apply(&change);
            return Ok(());
        }
        // The table has to grow, shrink, go or come: built anew from every binding.
        let undo = self.bindings.apply(&change);
        let entries = self.bindings.keys().map(|(key, owner)| (key, self.binding_word(owner))).collect();
        if let Err(e) = self.sync_bindings(&TableContent { entries, ..Default::default() }) {
            self.bindings.apply(&undo);
            return Err(e);
        }
        Ok(())
    }

    /// Makes the binding table hold `wanted`, publishing a new table if it had to move.
    fn sync_bindings(&mut self, wanted: &TableContent) -> Result<()> {
        let current = bindings_table(&self.config);
        if let Synced::Replaced(new) = self.tables.sync(current, wanted)? {
            self.config.store(0, ConfigField::Bindings.word(), new.0);
            self.tables.retire(current);
        }
        Ok(())
    }

    /// The bindings the kernel holds now.
    pub fn bindings(&self) -> Vec<Binding> {
        self.bindings.bindings()
    }

    /// The bindings the kernel holds now at these addresses.
    pub fn bindings_at(&self, addrs: &BTreeSet<IpAddr>) -> Vec<Binding> {
        self.bindings.at(addrs)
    }

    /// The binding table's descriptor as published: a change made in place leaves it as it
    /// was, one that rebuilt the table does not.
    pub fn bindings_table(&self) -> TableDesc {
        bindings_table(&self.config)
    }

    /// The addresses at which the account in `slot` has bindings in the kernel.
    pub fn binding_addresses_of(&self, slot: u32) -> BTreeSet<IpAddr> {
        self.bindings.addresses_of(slot)
    }

    /// Rate and burst of drop samples per CPU (0 disables them).
    pub fn set_sampling(&self, per_second: u64, burst: u64) {
        // The burst first: a rate switched on is never read with a stale burst.
        self.config.store(0, ConfigField::SampleBurst.word(), burst);
        self.config.store(0, ConfigField::SamplesPerSecond.word(), per_second);
    }

    /// Sets the clock the program stamps used keys with ([`LastUse`]); 0 stops stamping.
    pub fn set_clock(&self, clock: u64) {
        self.config.store(0, ConfigField::Clock.word(), clock);
    }

    /// The clock as last set.
    pub fn clock(&self) -> u64 {
        self.config.load(0, ConfigField::Clock.word())
    }

    /// The allowlist keys stamped at `since` or later, with their stamps: one pass over the
    /// stamps (8 bytes a slot, a few ms for millions), then the key of each stamped slot.
    pub fn used_since(&self, since: u64) -> Vec<LastUse> {
        self.used_since_among(since, 0..self.last_used_slots())
    }

    /// How many slots carry a last-used stamp (as many as the tables have).
    pub fn last_used_slots(&self) -> u32 {
        self.last_used.len()
    }

    /// [`Datapath::used_since`] over the slots in `slots` only: a caller that holds a lock
    /// to read the stamps can scan them a part at a time.
    pub fn used_since_among(&self, since: u64, slots: std::ops::Range<u32>) -> Vec<LastUse> {
        let since = since.max(1);
        let mut out = Vec::new();
        for index in slots.start..slots.end.min(self.last_used.len()) {
            let Some(stamp) = self.last_used.get(index) else { break };
            // SAFETY: in bounds of the mapping; the program writes whole aligned words.
            let stamp = unsafe { std::ptr::read_volatile(stamp) };
            if stamp < since {
                continue;
            }
            if let Some((owner, key)) = self.tables.allow_key_at(index) {
                out.push(LastUse { index, owner: KeyOwner::of(owner), key, clock: stamp });
            }
        }
        out
    }

    /// The prefix lengths account `slot`'s table probes in `family`, in the order the kernel
    /// probes them (empty without a table).
    pub fn probe_lengths(&self, slot: u32, family: u64) -> Vec<u8> {
        let table = if slot < self.accounts.len() { account_table(&self.accounts, slot) } else { TableDesc::NONE };
        self.tables.read_lengths(table, family == ipaccess_common::FAMILY_V4)
    }

    /// Makes account `slot`'s table probe `first` first in `family` (one store of the
    /// header's lengths word, the same lengths in another order), and keeps it first through
    /// later changes of the allowlist while the allowlist has keys of that length. False if
    /// the table holds no such length or has it first already (the preference is kept).
    pub fn put_first(&mut self, slot: u32, family: u64, first: u8) -> Result<bool> {
        self.check_slot(slot)?;
        self.first_lengths.set(slot, family, first);
        Ok(self.tables.reorder(account_table(&self.accounts, slot), family == ipaccess_common::FAMILY_V4, first))
    }

    /// One second of the probe order, all at once (tests and benchmarks; ipaccessd ticks
    /// `order` without the writer lock and calls [`Datapath::reorder_among`] a part at a
    /// time): the keys `used` stamped since the last call go into the tally, and each
    /// account whose traffic comes mostly through another length than the one probed first
    /// gets that length first ([`order`]). Returns the changes made.
    pub fn order_probes(&mut self, order: &mut ProbeOrder, used: &[LastUse]) -> Vec<order::Reorder> {
        order.tick_uses(used);
        self.reorder_among(order, &order.candidates())
    }

    /// Puts first, in the tables of `candidates` (from [`ProbeOrder::candidates`]), the
    /// lengths `order` decides on. Returns the changes made.
    pub fn reorder_among(&mut self, order: &ProbeOrder, candidates: &[(u32, u64)]) -> Vec<order::Reorder> {
        let changes = order.decide_among(candidates, |slot, family| self.probe_lengths(slot, family));
        let mut made = Vec::with_capacity(changes.len());
        for change in changes {
            if let Ok(true) = self.put_first(change.slot, change.family, change.first) {
                made.push(change);
            }
        }
        made
    }

    /// Drop samples waiting in the ring buffer, at most `max`.
    pub fn drain_samples(&mut self, max: usize) -> Vec<DropSample> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.samples.next() else { break };
            if item.len() >= size_of::<DropSample>() {
                // SAFETY: the kernel wrote a DropSample; read_unaligned copes with any alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<DropSample>()) });
            }
        }
        out
    }

    /// An account's counters summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<AccountCounters> {
        self.check_slot(slot)?;
        let map = self.per_cpu::<AccountCounters>(MAP_COUNTERS)?;
        account_sum(&map, slot)
    }

    pub fn host_counters(&self) -> Result<HostCounters> {
        host_sum(&self.per_cpu::<HostCounters>(MAP_HOST_COUNTERS)?)
    }

    /// A second handle on the counter maps, for reading them without this `Datapath`.
    pub fn counter_reader(&self) -> Result<CounterReader> {
        let open = |name: &str| {
            let fd = map_data(&self.ebpf, name).fd().as_fd().try_clone_to_owned();
            let fd = fd.map_err(|source| DatapathError::MapFd { name: name.into(), source })?;
            MapData::from_fd(fd).map_err(|e| DatapathError::Map(name.into(), e))
        };
        let accounts = PerCpuArray::try_from(Map::PerCpuArray(open(MAP_COUNTERS)?))
            .map_err(|e| DatapathError::Map(MAP_COUNTERS.into(), e))?;
        let host = PerCpuArray::try_from(Map::PerCpuArray(open(MAP_HOST_COUNTERS)?))
            .map_err(|e| DatapathError::Map(MAP_HOST_COUNTERS.into(), e))?;
        Ok(CounterReader { accounts, host })
    }

    fn reset_counters(&mut self, slot: u32) -> Result<()> {
        let map = self.ebpf.map_mut(MAP_COUNTERS).expect("object has counters");
        let mut counters: PerCpuArray<_, AccountCounters> =
            PerCpuArray::try_from(map).map_err(|e| DatapathError::Map(MAP_COUNTERS.into(), e))?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let zeros =
            aya::maps::PerCpuValues::try_from(vec![AccountCounters::default(); cpus]).map_err(DatapathError::Cpus)?;
        counters.set(slot, zeros, 0).map_err(|e| DatapathError::Map(MAP_COUNTERS.into(), e))
    }

    fn per_cpu<T: aya::Pod>(&self, name: &str) -> Result<PerCpuArray<&MapData, T>> {
        let map = self.ebpf.map(name).expect("object has the map");
        PerCpuArray::try_from(map).map_err(|e| DatapathError::Map(name.into(), e))
    }

    /// Slots used and available in the table array.
    pub fn slot_usage(&self) -> (u64, u64) {
        let capacity = self.tables.capacity() as u64;
        (capacity - self.tables.free_slots(), capacity)
    }
}

/// A kernel key that let a packet through: whose it is, the key (an allowlist entry or
/// override, a shared set's entry, or a longer key one was expanded to) and the clock it
/// was stamped with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastUse {
    /// The slot of the tables (and of the stamps) the key is in.
    pub index: u32,
    pub owner: KeyOwner,
    pub key: IpNet,
    pub clock: u64,
}

/// Whose table an allowlist key is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyOwner {
    /// An account's own allowlist (entries and overrides), by account slot.
    Account(u32),
    /// A shared-set group (the union of the sets some accounts reference): see
    /// [`Datapath::sets_of_group`].
    SetGroup(u32),
}

impl KeyOwner {
    fn of(tag_owner: u32) -> Self {
        if tag_owner & Tag::SET_OWNER != 0 {
            KeyOwner::SetGroup(tag_owner & !Tag::SET_OWNER)
        } else {
            KeyOwner::Account(tag_owner)
        }
    }

    /// The account slot, for an account's own key.
    pub fn account(self) -> Option<u32> {
        match self {
            KeyOwner::Account(slot) => Some(slot),
            KeyOwner::SetGroup(_) => None,
        }
    }
}

/// The first lengths the account tables in the maps probe where they are not the most
/// specific (a previous daemon's [`Datapath::put_first`]): kept across a restart.
fn first_lengths_found(tables: &Tables, accounts: &MmapArray<AccountRecord>) -> FirstLengths {
    let mut found = FirstLengths::default();
    for slot in 0..accounts.len() {
        let table = account_table(accounts, slot);
        if table.is_present() {
            found.found(tables, slot, table);
        }
    }
    found
}

/// The keys of an allowlist or a shared set (each network with its expiry), expanded to the
/// prefix lengths the kernel probes, each tagged by `tag(family, length)`.
fn table_content(entries: &[(IpNet, u64)], tag: impl Fn(u64, u8) -> Tag) -> Result<TableContent> {
    let expanded = expand(entries)?;
    Ok(TableContent {
        entries: expanded
            .keys
            .iter()
            .map(|(k, &expiry)| (SlotKey { tag: tag(k.family, k.len), hi: k.hi, lo: k.lo }, expiry))
            .collect(),
        v4_lengths: expanded.v4_lengths,
        v6_lengths: expanded.v6_lengths,
    })
}

/// The shared sets the datapath was given and the set groups built from them. A group is
/// the union of the sets some accounts reference, so that the kernel probes one table per
/// account for its sets, and a set's entries are stored once per distinct combination of
/// sets in use, never per account.
#[derive(Default)]
struct SetGroups {
    /// Each set's entries, as last given.
    sets: BTreeMap<u32, Vec<IpNet>>,
    groups: BTreeMap<u32, SetGroup>,
    /// Each group's id by its sets.
    by_sets: BTreeMap<Vec<u32>, u32>,
    /// Groups whose last account left, and when: their tables stay published and their
    /// ids unused until the quarantine ends (see [`Datapath::leave_group`]).
    released: Vec<(u32, Instant)>,
}

struct SetGroup {
    /// The sets it unites; `None` for a group found in the maps at start (an earlier
    /// daemon's), which accounts leave as their sets are given again.
    sets: Option<Vec<u32>>,
    table: TableDesc,
    /// Accounts in the group.
    accounts: u32,
}

impl SetGroups {
    /// The groups the maps hold, with the accounts in each.
    fn found(set_groups: &MmapArray<u64>, account_sets: &MmapArray<u64>) -> Self {
        let active = set_groups.load(0, 0) & 1;
        let mut found = SetGroups::default();
        for slot in 0..account_sets.len() {
            let id = account_sets.load(slot, 0) as u32;
            if id == 0 || id >= MAX_SET_GROUPS {
                continue;
            }
            let table = TableDesc(set_groups.load(group_word(active, id), 0));
            found.groups.entry(id).or_insert(SetGroup { sets: None, table, accounts: 0 }).accounts += 1;
        }
        found
    }
}

/// The word of group `id`'s table in `generation` of [`MAP_SET_GROUPS`].
fn group_word(generation: u64, id: u32) -> u32 {
    generation as u32 * MAX_SET_GROUPS + id
}

/// `sets` as a group is keyed: each once, in order. Refused: an id the kernel has no room
/// for, or more sets than one account may reference.
fn group_key(sets: &[u32]) -> Result<Vec<u32>> {
    sets.iter().try_for_each(|&set| check_set(set))?;
    let mut key = sets.to_vec();
    key.sort_unstable();
    key.dedup();
    if key.len() > MAX_SETS_PER_ACCOUNT {
        return Err(DatapathError::TooManySets(key.len()));
    }
    Ok(key)
}

fn check_set(set: u32) -> Result<()> {
    if set == 0 || set >= MAX_SETS {
        return Err(DatapathError::SetId(set));
    }
    Ok(())
}

fn account_table(accounts: &MmapArray<AccountRecord>, slot: u32) -> TableDesc {
    TableDesc(accounts.load(slot, AccountField::Table.word()))
}

fn bindings_table(config: &MmapArray<Config>) -> TableDesc {
    TableDesc(config.load(0, ConfigField::Bindings.word()))
}

/// Now on `CLOCK_BOOTTIME`, the clock the kernel compares override expiries with.
pub fn boot_time_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Mounts bpffs at `path` unless it is mounted there already (systemd usually mounts
/// /sys/fs/bpf; a fresh network namespace or container may not have it).
pub fn ensure_bpffs(path: &Path) -> Result<()> {
    if check_bpffs(path).is_ok() {
        return Ok(());
    }
    let mount_error = |source| DatapathError::Mount { path: path.to_path_buf(), source };
    fs::create_dir_all(path).map_err(mount_error)?;
    rustix::mount::mount("bpf", path, "bpf", rustix::mount::MountFlags::empty(), c"mode=0700")
        .map_err(|e| mount_error(e.into()))?;
    info!("mounted bpffs at {}", path.display());
    Ok(())
}

fn check_bpffs(path: &Path) -> Result<()> {
    match rustix::fs::statfs(path) {
        Ok(stat) if u32::try_from(stat.f_type).ok() == Some(BPF_FS_MAGIC) => Ok(()),
        _ => Err(DatapathError::BpffsNotMounted(path.to_path_buf())),
    }
}

/// The directory's lock if no other process holds it, at once.
fn try_lock_dir(dir: &Path) -> io::Result<fs::File> {
    let file = fs::File::open(dir)?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)?;
    Ok(file)
}

/// Takes an exclusive lock on the pin directory so two daemons never write the same maps.
/// A lock that is busy is retried for a moment: a process forked by another thread of ours
/// holds a copy of the previous holder's descriptor until it execs.
fn lock_dir(dir: &Path) -> Result<fs::File> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let error = match try_lock_dir(dir) {
            Ok(file) => return Ok(file),
            Err(e) => e,
        };
        if error.kind() != io::ErrorKind::WouldBlock {
            return Err(DatapathError::Lock { path: dir.to_path_buf(), source: error });
        }
        if Instant::now() > deadline {
            return Err(DatapathError::InUse(dir.to_path_buf()));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// How often a load the kernel cut short (see [`load_program`]) is tried.
const LOAD_ATTEMPTS: u32 = 4;

/// Loads (verifies) the program, trying again when the kernel gave up for a reason of the
/// moment rather than a verdict on the program: the verifier stops with EAGAIN when the
/// loading thread has a signal pending and can fail an allocation (ENOMEM) on a host short
/// of memory, and verifying takes long enough (about a second, more on a busy host) for
/// either to happen. A rejection is reported at once. Returns the number of loads it took.
fn load_program(program: &mut Xdp) -> Result<u32> {
    let mut attempt = 1;
    loop {
        match program.load() {
            Ok(()) => return Ok(attempt),
            Err(ProgramError::LoadError { io_error, .. })
                if attempt < LOAD_ATTEMPTS
                    && matches!(io_error.raw_os_error(), Some(libc::EAGAIN | libc::EINTR | libc::ENOMEM)) =>
            {
                warn!("{PROGRAM_NAME}: the kernel stopped verifying it ({io_error}); trying again");
                thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
                attempt += 1;
            }
            Err(e) => return Err(DatapathError::Program(format!("verifying {PROGRAM_NAME}"), e)),
        }
    }
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .ok_or_else(|| DatapathError::NoProgram(name.into()))?
        .try_into()
        .map_err(|e| DatapathError::Program(name.into(), e))
}

fn map_data<'a>(ebpf: &'a Ebpf, name: &str) -> &'a MapData {
    match ebpf.map(name).expect("object has the map") {
        Map::Array(data) | Map::PerCpuArray(data) => data,
        other => panic!("{name} has unexpected type {other:?}"),
    }
}

/// Reads the kernel's packet counters through its own map handles, so that the daemon can
/// serve `stats` and metrics over many accounts without holding up changes (which hold the
/// [`Datapath`]). Counters are per-CPU: each read sums the CPUs' values.
pub struct CounterReader {
    accounts: PerCpuArray<MapData, AccountCounters>,
    host: PerCpuArray<MapData, HostCounters>,
}

impl CounterReader {
    pub fn account(&self, slot: u32) -> Result<AccountCounters> {
        if slot == NO_ACCOUNT {
            return Err(DatapathError::AccountSlot { slot, limit: self.accounts.len() });
        }
        account_sum(&self.accounts, slot)
    }

    pub fn host(&self) -> Result<HostCounters> {
        host_sum(&self.host)
    }
}

fn account_sum<M: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<M, AccountCounters>,
    slot: u32,
) -> Result<AccountCounters> {
    let values = map.get(&slot, 0).map_err(|e| DatapathError::Map(MAP_COUNTERS.into(), e))?;
    Ok(values.iter().fold(AccountCounters::default(), |mut sum, c| {
        sum.passed_packets += c.passed_packets;
        sum.passed_bytes += c.passed_bytes;
        sum.dropped_packets += c.dropped_packets;
        sum.dropped_bytes += c.dropped_bytes;
        sum.would_drop_packets += c.would_drop_packets;
        sum.would_drop_bytes += c.would_drop_bytes;
        sum
    }))
}

fn host_sum<M: std::borrow::Borrow<MapData>>(map: &PerCpuArray<M, HostCounters>) -> Result<HostCounters> {
    let values = map.get(&0, 0).map_err(|e| DatapathError::Map(MAP_HOST_COUNTERS.into(), e))?;
    Ok(values.iter().fold(HostCounters::default(), |mut sum, c| {
        sum.non_ip_packets += c.non_ip_packets;
        sum.unbound_packets += c.unbound_packets;
        sum.ndp_packets += c.ndp_packets;
        sum.malformed_packets += c.malformed_packets;
        sum
    }))
}

/// Whether `name` can be a network interface's name, by the kernel's rules
/// (`dev_valid_name`): 1 to 15 bytes, not `.` or `..`, without `/`, `:`, white space or
/// control characters.
pub fn check_interface_name(name: &str) -> std::result::Result<(), String> {
    const IFNAMSIZ: usize = 16;
    if name.is_empty() || name.len() >= IFNAMSIZ {
        return Err(format!("an interface name is 1 to {} bytes long", IFNAMSIZ - 1));
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` are not interface names".into());
    }
    if let Some(c) = name.chars().find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        return Err(format!("an interface name has no {c:?}"));
    }
    Ok(())
}

/// Interfaces with a link pinned under `bpffs`, found without loading anything (so that
/// looking creates no maps).
pub fn pinned_interfaces_under(bpffs: &Path) -> Vec<String> {
    pinned_interfaces(&bpffs.join(PIN_SUBDIR))
}

fn pinned_interfaces(pin_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok()?.strip_prefix("link-").map(str::to_string))
        .collect();
    names.sort();
    names
}

/// Checks a (possibly reused) array map against this build; returns its length.
fn map_len<T>(ebpf: &Ebpf, name: &'static str, dir: &Path) -> Result<u32> {
    let info = map_data(ebpf, name).info().map_err(|e| DatapathError::Map(name.into(), e))?;
    if info.value_size() as usize != size_of::<T>() {
        return Err(DatapathError::IncompatibleMap {
            name,
            detail: format!("value size {} instead of {}", info.value_size(), size_of::<T>()),
            dir: dir.to_path_buf(),
        });
    }
    Ok(info.max_entries())
}

/// The pinned one-word array `name` in `pin_dir` ([`MAP_STORE_COMMITS`],
/// [`MAP_STORE_LINE`]), created (holding 0) if it is not there.
fn user_space_word(pin_dir: &Path, name: &str) -> Result<aya::maps::Array<MapData, u64>> {
    let path = pin_dir.join(name);
    let map_error = |e| DatapathError::Map(name.into(), e);
    if !path.exists() {
        let array = aya::maps::Array::<MapData, u64>::create(1, 0).map_err(map_error)?;
        array.pin(&path).map_err(|source| DatapathError::Pin { path: path.clone(), source })?;
    }
    let data = MapData::from_pin(&path).map_err(map_error)?;
    aya::maps::Array::try_from(Map::Array(data)).map_err(map_error)
}

fn mmap_map<T>(ebpf: &Ebpf, name: &str, len: u32) -> Result<MmapArray<T>> {
    let data = map_data(ebpf, name);
    MmapArray::new(data.fd().as_fd(), len).map_err(|source| DatapathError::Mmap { name: name.into(), source })
}

#[cfg(test)]
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Datapath>();
};

#[cfg(test)]
mod tests {
    use super::check_interface_name;

    #[test]
    fn interface_names_as_the_kernel_rules_them() {
        for good in ["eth0", "veth-a.100", "x", "fifteen-bytes-x", "wlp0s20f3"] {
            assert_eq!(check_interface_name(good), Ok(()), "{good}");
        }
        for bad in ["", "sixteen-bytes-xx", ".", "..", "../etc", "a/b", "eth0:1", "eth 0", "eth0\n", "lo\0", "x\u{1b}"]
        {
            assert!(check_interface_name(bad).is_err(), "{bad:?}");
        }
    }
}
