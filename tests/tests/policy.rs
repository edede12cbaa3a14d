//! The account policy, end to end, against the independent reference model
//! (`ipaccess_tests::policy_model`).
//!
//! `daemon_agrees_with_policy_model` builds random account trees round after round through the
//! real daemon's control socket (sub-users, refused grandchildren, states, modes, allowlists
//! with enabled and disabled entries, IPv4-mapped spellings, refused CIDRs, live and expired
//! overrides), then compares every login check and the verdict of the XDP program the daemon
//! runs (its pinned link's program, through BPF_PROG_TEST_RUN) with the model. The seed is
//! printed; `IPACCESS_SEED=<n>` replays a run, `IPACCESS_POLICY_ROUNDS=<n>` changes its length.
//!
//! Two more tests: an override's expiry is enforced by a login check at once (not at the
//! daemon's next sweep), and README's support runbook replayed with `ipaccessctl`.
//!
//! Build the binaries first: `cargo build --release -p ipaccess --bins`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{ProgramFd, loaded_programs};
use ipaccess_common::PIN_SUBDIR;
use ipaccess_tests::client::Conn;
use ipaccess_tests::daemon::World;
use ipaccess_tests::netns::{TcpServer, TestHosts, icmp_echo, tcp_connect};
use ipaccess_tests::packets;
use ipaccess_tests::policy_model::{
    self as model, Account, Entry, Expect, Mode, Override, Policy, State, host_in, just_outside, mapped_addr,
    mapped_spelling, unmap_net,
};
use ipaccess_tests::testrun::run_xdp_once;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Overrides that must have expired by the time of the checks live this long.
const SHORT_TTL: u64 = 1;
const LONG_TTL: u64 = 3600;
/// The daemon under test grants overrides from one second up.
const CONFIG: &str = "min_override_ttl_seconds = 1";

fn seed() -> u64 {
    match std::env::var("IPACCESS_SEED") {
        Ok(s) => s.parse().expect("IPACCESS_SEED must be a number"),
        Err(_) => rand::rng().random(),
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn now() -> i64 {
    unix_now() as i64
}

/// Sleeps until the wall clock reads `at` (unix seconds); returns at once if it already has.
fn sleep_until(at: f64) {
    let wait = at - unix_now();
    if wait > 0.0 {
        thread::sleep(Duration::from_secs_f64(wait));
    }
}

// ---------------------------------------------------------------------------------------------
// The control socket

/// A login check; recorded (a sign-in) unless `dry_run`.
fn check(conn: &mut Conn, account: &str, addr: IpAddr, dry_run: bool) -> Value {
    conn.ok(json!({"cmd": "check", "account": account, "addr": addr.to_string(), "dry_run": dry_run}))
}

/// The first `"cidr"` anywhere in a reply (replies may wrap the entry or override).
fn find_cidr(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) => map.get("cidr").and_then(Value::as_str).or_else(|| map.values().find_map(find_cidr)),
        Value::Array(items) => items.iter().find_map(find_cidr),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The program the daemon runs

/// The XDP program behind the daemon's pinned link on the server interface: the very program
/// the kernel runs on that interface, with the maps the daemon writes.
fn pinned_program(w: &World) -> ProgramFd {
    let pin = w.bpffs.path().join(PIN_SUBDIR).join(format!("link-{}", w.hosts.server_if));
    let link = FdLink::from(PinnedLink::from_pin(&pin).unwrap_or_else(|e| panic!("open {}: {e}", pin.display())));
    let id = link.info().expect("the pinned link's info").program_id();
    let info = loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .unwrap_or_else(|| panic!("program {id} of {} is not loaded", pin.display()));
    info.fd().expect("a descriptor of the daemon's program")
}

/// XDP_PASS or XDP_DROP for one frame, from the kernel running the program once.
fn run_frame(program: &ProgramFd, frame: &[u8]) -> u32 {
    run_xdp_once(program.as_fd(), frame)
}

// ---------------------------------------------------------------------------------------------
// Random policies

/// Parts of the specification a run can leave out (`IPACCESS_POLICY_SKIP=nesting,disable`),
/// for a daemon that does not implement them yet. Everything is on by default.
#[derive(Clone, Copy, Debug)]
struct Features {
    /// Grandchild attempts (must be refused).
    nesting: bool,
    /// `allow_disable` / `allow_enable`.
    disable: bool,
    /// IPv4-mapped spellings of entries, overrides and checked addresses.
    mapped: bool,
    /// Host bits and leading zeros refused.
    strict: bool,
    /// Bare addresses taken as host networks in allowlist entries.
    bare: bool,
    /// Terminated parents suspend their sub-users.
    parent_terminated: bool,
    /// Overrides refused where they can change nothing (mode off or monitor, unconfirmed,
    /// already allowed) and wider than the default widest prefix.
    grant_rules: bool,
}

impl Features {
    fn from_env() -> Features {
        let skip = std::env::var("IPACCESS_POLICY_SKIP").unwrap_or_default();
        let on = |name: &str| !skip.split(',').any(|s| s.trim() == name);
        Features {
            nesting: on("nesting"),
            disable: on("disable"),
            mapped: on("mapped"),
            strict: on("strict"),
            bare: on("bare"),
            parent_terminated: on("parent_terminated"),
            grant_rules: on("grant_rules"),
        }
    }
}

/// An account's bound endpoints: a whole IPv4 address, and an IPv6 address's TCP port 443.
#[derive(Clone, Copy)]
struct Endpoints {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

/// Random IPv4 networks fall in 198.18.0.0/18 and IPv6 ones in fd00::/46, so that entries,
/// overrides and checked addresses often overlap.
fn random_net(rng: &mut StdRng, v6: bool, prefixes: std::ops::RangeInclusive<u8>) -> IpNet {
    let prefix = rng.random_range(prefixes);
    if v6 {
        let bits = u128::from(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0)) | (rng.random::<u128>() >> 46);
        IpNet::V6(Ipv6Net::new(bits.into(), prefix.max(46)).unwrap().trunc())
    } else {
        let bits = u32::from(Ipv4Addr::new(198, 18, 0, 0)) | (rng.random::<u32>() >> 18);
        IpNet::V4(Ipv4Net::new(bits.into(), prefix.max(18)).unwrap().trunc())
    }
}

/// How `net` is written in a request, and what the daemon must make of it: the network it
/// stands for, or the error code.
fn spell(rng: &mut StdRng, net: IpNet, f: Features) -> (String, Result<IpNet, &'static str>) {
    let host = net.prefix_len() == net.max_prefix_len();
    match (net, rng.random_range(0..10)) {
        (IpNet::V4(v4), 0 | 1) if f.mapped => {
            let text = if host && rng.random_bool(0.5) { format!("::ffff:{}", v4.addr()) } else { mapped_spelling(v4) };
            (text, Ok(net))
        }
        (_, 2) if f.strict && !host => {
            // A host bit set: refused, with the network named (not silently truncated).
            let text = format!("{}/{}", host_in(&net, 1 | rng.random::<u128>()), net.prefix_len());
            (text, Err("bad_request"))
        }
        (IpNet::V4(v4), 3) if f.strict => {
            let o = v4.addr().octets();
            (format!("{}.0{}.{}.{}/{}", o[0], o[1], o[2], o[3], v4.prefix_len()), Err("bad_request"))
        }
        _ if f.bare && host && rng.random_bool(0.5) => (net.addr().to_string(), Ok(net)),
        _ => (net.to_string(), Ok(net)),
    }
}

/// Ids in the documented character set; a few invalid ones are tried too.
fn account_id(rng: &mut StdRng, round: usize, i: usize) -> String {
    match rng.random_range(0..6) {
        0 => format!("u{i}.r{round}@example.org"),
        1 => format!("U{i}_r{round}+tag-x"),
        _ => format!("p{round}-{i}"),
    }
}

const INVALID_IDS: &[&str] =
    &["", "-lead", ".dot", "has space", "tab\there", "caf\u{e9}", "zero\u{200b}width", " pad", "pad ", "new\nline"];

/// One random state, weighted towards the interesting ones.
fn random_state(rng: &mut StdRng) -> State {
    *[State::Active, State::Active, State::Active, State::Unconfirmed, State::Terminated, State::Banned]
        .choose(rng)
        .unwrap()
}

fn random_mode(rng: &mut StdRng) -> Mode {
    *[Mode::Off, Mode::Monitor, Mode::Enforce, Mode::Enforce].choose(rng).unwrap()
}

/// The running comparison: the daemon's world, the model, and what disagreed.
struct Differential {
    rng: StdRng,
    features: Features,
    model: Policy,
    conn: Conn,
    program: ProgramFd,
    endpoints: Vec<(String, Endpoints)>,
    /// Endpoints of removed accounts: unbound, so their traffic passes.
    unbound: Vec<Endpoints>,
    next_endpoint: u32,
    mismatches: Vec<String>,
    checks: usize,
    frames: usize,
    requests: usize,
    /// How often each request came out how (`allow_add bad_request`), and each check reason:
    /// printed, to show what a run covered.
    tally: BTreeMap<String, usize>,
}

impl Differential {
    fn new(w: &World, seed: u64, features: Features) -> Differential {
        Differential {
            rng: StdRng::seed_from_u64(seed),
            features,
            model: Policy::default(),
            conn: Conn::open(&w.socket()),
            program: pinned_program(w),
            endpoints: Vec::new(),
            unbound: Vec::new(),
            next_endpoint: 1,
            mismatches: Vec::new(),
            checks: 0,
            frames: 0,
            requests: 0,
            tally: BTreeMap::new(),
        }
    }

    /// Sends a change; records a disagreement with `expect`. The result when it succeeded
    /// (the model then follows the daemon, whatever it expected, so that one disagreement
    /// does not cascade).
    fn change(&mut self, request: Value, expect: Expect) -> Option<Value> {
        self.requests += 1;
        let reply = self.conn.request(request.clone());
        let outcome = match (&reply.get("ok"), reply["error"]["code"].as_str()) {
            (Some(ok), _) => Ok((*ok).clone()),
            (None, Some(code)) => Err(code.to_string()),
            _ => panic!("{request} -> {reply}: neither ok nor an error code"),
        };
        let how = match &outcome {
            Ok(_) => "ok",
            Err(code) => code.as_str(),
        };
        *self.tally.entry(format!("{} {how}", request["cmd"].as_str().unwrap_or("?"))).or_default() += 1;
        let agrees = match (&expect, &outcome) {
            (Expect::Either, _) | (Expect::Ok, Ok(_)) => true,
            (Expect::Refused(want), Err(got)) => want == got,
            (Expect::Failed, Err(_)) => true,
            _ => false,
        };
        if !agrees {
            self.mismatches.push(format!("{request}\n    model expected {expect:?}, daemon replied {reply}"));
        }
        outcome.ok()
    }

    /// The model's account, for the messages.
    fn describe(&self, id: &str) -> String {
        let mut out = String::new();
        let mut next = Some(id.to_string());
        for _ in 0..4 {
            let Some(id) = next.take() else { break };
            let Some(a) = self.model.accounts.get(&id) else {
                out += &format!("{id}: unknown");
                break;
            };
            let entries: Vec<String> =
                a.entries.iter().map(|e| format!("{}{}", e.net, if e.enabled { "" } else { " (disabled)" })).collect();
            let overrides: Vec<String> =
                a.overrides.iter().map(|o| format!("{} until {}", o.net, o.expires_at)).collect();
            out += &format!(
                "\n      {id}: {} {} entries [{}] overrides [{}]",
                a.state.name(),
                a.mode.name(),
                entries.join(", "),
                overrides.join(", ")
            );
            next = a.parent.clone();
        }
        out
    }

    fn add_account(&mut self, id: &str, parent: Option<&str>, unconfirmed: bool) -> bool {
        let expect = self.model.expect_add(id, parent);
        let request = json!({"cmd": "account_add", "account": id, "parent": parent, "unconfirmed": unconfirmed});
        let done = self.change(request, expect).is_some();
        if done {
            self.model.add(id, parent, unconfirmed);
        }
        done
    }

    /// Whole IPv4 address and an IPv6 TCP port, unique in this world.
    fn bind(&mut self, id: &str) {
        let n = self.next_endpoint;
        self.next_endpoint += 1;
        let ends = Endpoints {
            v4: Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8),
            v6: Ipv6Addr::new(0xfd00, 0xb1, 0, 0, 0, 0, (n >> 16) as u16, n as u16),
        };
        let v4 = json!({"cmd": "bind_add", "account": id, "addr": ends.v4.to_string()});
        let v6 = json!({"cmd": "bind_add", "account": id, "addr": ends.v6.to_string(), "port": 443, "proto": "tcp"});
        if self.change(v4, Expect::Ok).is_some() && self.change(v6, Expect::Ok).is_some() {
            self.endpoints.push((id.to_string(), ends));
        }
    }

    fn allow_add(&mut self, id: &str, net: IpNet) {
        let (text, parsed) = spell(&mut self.rng, net, self.features);
        let expect = match parsed {
            Err(code) => Expect::Refused(code),
            Ok(net) if self.model.accounts[id].entries.iter().any(|e| e.net == net) => Expect::Refused("entry_exists"),
            Ok(_) => Expect::Ok,
        };
        let label = self.rng.random_bool(0.5).then(|| format!("site {}", self.rng.random_range(0..100)));
        let request = json!({"cmd": "allow_add", "account": id, "cidr": text, "label": label});
        let Some(reply) = self.change(request.clone(), expect) else { return };
        // What the daemon stored is what the model takes (it said so in the reply).
        let stored: Option<IpNet> = find_cidr(&reply).and_then(|c| c.parse().ok());
        match (stored, parsed) {
            (Some(stored), Ok(net)) if stored != net => {
                self.mismatches.push(format!("{request}\n    stored as {stored}, the model expected {net}: {reply}"))
            }
            (None, _) => self.mismatches.push(format!("{request}\n    the reply names no cidr: {reply}")),
            _ => {}
        }
        if let Some(stored) = stored {
            let entries = &mut self.model.accounts.get_mut(id).unwrap().entries;
            entries.retain(|e| e.net != stored);
            entries.push(Entry { net: stored, enabled: true });
        }
    }

    /// A change that may be refused by the lockout guard: `after` is the account as the
    /// change leaves it. Unforced, the guard's answer must be the model's.
    fn guarded(&mut self, id: &str, mut request: Value, after: Account, force: bool) {
        if force {
            request["force"] = json!(true);
        }
        // An override expiring right now leaves the guard's answer open.
        let t = now();
        let before = self.model.accounts[id].clone();
        let mut expect = if force { Expect::Ok } else { after.expect_guard(&before, t - 2) };
        if !force && expect != after.expect_guard(&before, t + 2) {
            expect = Expect::Either;
        }
        if expect == Expect::Refused("lockout") && after.covers_anything(t) {
            *self.tally.entry("(lockout for a recent sign-in)".into()).or_default() += 1;
        }
        if self.change(request, expect).is_some() {
            self.model.accounts.insert(id.to_string(), after);
        }
    }

    /// Disables, enables or removes one of the account's entries, forced past the lockout
    /// guard or not.
    fn edit_entry(&mut self, id: &str, force: bool) {
        let entries = &self.model.accounts[id].entries;
        let Some(entry) = entries.choose(&mut self.rng).cloned() else { return };
        // Mapped spellings name the IPv4 entry they stand for.
        let text = match entry.net {
            IpNet::V4(v4) if self.features.mapped && self.rng.random_bool(0.2) => mapped_spelling(v4),
            net => net.to_string(),
        };
        let choice = self.rng.random_range(0..10);
        let mut after = self.model.accounts[id].clone();
        let position = after.entries.iter().position(|e| e.net == entry.net).unwrap();
        if self.features.disable && choice < 6 {
            if entry.enabled {
                after.entries[position].enabled = false;
                self.guarded(id, json!({"cmd": "allow_disable", "account": id, "cidr": text}), after, force);
            } else {
                after.entries[position].enabled = true;
                self.guarded(id, json!({"cmd": "allow_enable", "account": id, "cidr": text}), after, false);
            }
        } else if choice < 9 {
            after.entries.remove(position);
            self.guarded(id, json!({"cmd": "allow_remove", "account": id, "cidr": text}), after, force);
        } else {
            // An entry the account does not have.
            let missing = random_net(&mut self.rng, false, 30..=32);
            if !after.entries.iter().any(|e| e.net == missing) {
                let request = json!({"cmd": "allow_remove", "account": id, "cidr": missing.to_string(), "force": true});
                self.change(request, Expect::Refused("unknown_entry"));
            }
        }
    }

    fn set_state(&mut self, id: &str, state: State) {
        let request = json!({"cmd": "account_state", "account": id, "state": state.name(), "reason": "policy test"});
        if self.change(request, Expect::Ok).is_some() {
            self.model.accounts.get_mut(id).unwrap().state = state;
        }
    }

    fn set_mode(&mut self, id: &str, mode: Mode, force: bool) {
        let mut after = self.model.accounts[id].clone();
        after.mode = mode;
        self.guarded(id, json!({"cmd": "account_mode", "account": id, "mode": mode.name()}), after, force);
    }

    /// One override request: mostly where it can be granted, sometimes too wide, inside an
    /// enabled or a disabled entry, in mapped spelling; short-lived ones expire before the
    /// checks.
    fn grant(&mut self, id: &str) {
        let v6 = self.rng.random_bool(0.3);
        let account = &self.model.accounts[id];
        let net = match self.rng.random_range(0..10) {
            // Too wide.
            0 => random_net(&mut self.rng, v6, if v6 { 40..=47 } else { 18..=23 }),
            // A host inside one of its entries (enabled: already allowed; disabled: not).
            1 | 2 if !account.entries.is_empty() => {
                let entry = account.entries.choose(&mut self.rng).unwrap().net;
                let host = host_in(&entry, self.rng.random());
                IpNet::new(host, if host.is_ipv4() { 32 } else { 128 }).unwrap()
            }
            _ => random_net(&mut self.rng, v6, if v6 { 48..=128 } else { 24..=32 }),
        };
        let text = match net {
            IpNet::V4(v4) if self.features.mapped && self.rng.random_bool(0.2) => mapped_spelling(v4),
            net => net.to_string(),
        };
        // An override that expires while the grants are made leaves "already allowed" open.
        let t = now();
        let mut expect = self.model.expect_grant(id, &net, t - 2);
        if expect != self.model.expect_grant(id, &net, t + 2) {
            expect = Expect::Either;
        }
        // Without the newer rules only suspension is sure to refuse.
        if !self.features.grant_rules && !self.model.suspended(id) {
            expect = Expect::Either;
        }
        let ttl = if self.rng.random_bool(0.4) { SHORT_TTL } else { LONG_TTL };
        let request = json!({"cmd": "override_grant", "account": id, "cidr": text, "ttl_seconds": ttl,
                             "ticket": format!("T-{}", self.requests), "reason": "policy test"});
        let before = now();
        let Some(reply) = self.change(request.clone(), expect) else { return };
        let o = &reply["override"];
        let (Some(oid), Some(expires_at), Some(stored)) =
            (o["id"].as_i64(), o["expires_at"].as_i64(), o["cidr"].as_str().and_then(|c| c.parse::<IpNet>().ok()))
        else {
            self.mismatches.push(format!("{request}\n    the reply lacks override.id/expires_at/cidr: {reply}"));
            return;
        };
        if stored != unmap_net(net) {
            self.mismatches.push(format!("{request}\n    granted {stored}, the model expected {net}: {reply}"));
        }
        let lifetime = expires_at - before;
        if !(ttl as i64 - 1..=ttl as i64 + 2).contains(&lifetime) {
            self.mismatches.push(format!("{request}\n    expires {lifetime} s after the grant: {reply}"));
        }
        let account = self.model.accounts.get_mut(id).unwrap();
        account.overrides.push(Override { id: oid, net: stored, expires_at });
    }

    /// One round: `n` new accounts through the socket, then every check and frame compared.
    fn round(&mut self, round: usize, n: usize) {
        let f = self.features;
        // Accounts: top-level ones first, then sub-users of random top-level accounts.
        let mut ids = Vec::new();
        let mut tops = Vec::new();
        for i in 0..n {
            let id = account_id(&mut self.rng, round, i);
            let sub = i >= n / 3 && self.rng.random_bool(0.7);
            let parent = if sub { tops.choose(&mut self.rng).cloned() } else { None };
            let unconfirmed = self.rng.random_bool(0.15);
            if self.add_account(&id, parent.as_deref(), unconfirmed) {
                if parent.is_none() {
                    tops.push(id.clone());
                }
                ids.push(id);
            }
        }
        let subs: Vec<String> = ids.iter().filter(|id| self.model.accounts[*id].parent.is_some()).cloned().collect();
        // A sub-user of a sub-user is refused; so are invalid ids and missing parents.
        if f.nesting {
            for i in 0..3 {
                if let Some(parent) = subs.choose(&mut self.rng).cloned() {
                    self.add_account(&format!("g{round}-{i}"), Some(&parent), false);
                }
            }
        }
        if f.strict {
            let bad = *INVALID_IDS.choose(&mut self.rng).unwrap();
            self.add_account(bad, None, false);
            self.add_account(&"x".repeat(129), None, false);
        }
        self.add_account(&format!("m{round}"), Some(&format!("nobody-{round}")), false);
        for id in &ids {
            self.bind(id);
        }

        // Allowlists, then some entries disabled, enabled or removed.
        for id in &ids {
            for _ in 0..self.rng.random_range(0..=5) {
                let v6 = self.rng.random_bool(0.3);
                let net = random_net(&mut self.rng, v6, if v6 { 46..=128 } else { 18..=32 });
                self.allow_add(id, net);
            }
            for _ in 0..self.rng.random_range(0..=2) {
                let force = self.rng.random_bool(0.5);
                self.edit_entry(id, force);
            }
        }

        // States and modes at the time of the grants: mostly grantable, not always.
        for id in &ids {
            let state = if self.rng.random_bool(0.75) { State::Active } else { random_state(&mut self.rng) };
            let mode = if self.rng.random_bool(0.75) { Mode::Enforce } else { random_mode(&mut self.rng) };
            self.set_state(id, self.allowed_state(id, state));
            let force = self.rng.random_bool(0.7);
            self.set_mode(id, mode, force);
        }
        for id in &ids {
            for _ in 0..self.rng.random_range(0..=3) {
                self.grant(id);
            }
        }

        // The final states and modes.
        for id in &ids {
            let state = random_state(&mut self.rng);
            let mode = random_mode(&mut self.rng);
            self.set_state(id, self.allowed_state(id, state));
            let force = self.rng.random_bool(0.7);
            self.set_mode(id, mode, force);
        }

        // Every short override must be over, in the daemon and in the kernel (whose clock
        // is boot time: a second of slack for the conversion).
        let soon = now() + SHORT_TTL as i64 + 2;
        let overrides = self.model.accounts.values().flat_map(|a| &a.overrides);
        if let Some(e) = overrides.map(|o| o.expires_at).filter(|&e| e <= soon).max() {
            sleep_until(e as f64 + 1.0);
        }

        let mut unknown: Vec<String> = (0..3).map(|i| format!("p{round}-unknown-{i}")).collect();
        unknown.push(format!("g{round}-0"));
        for id in ids.iter().chain(&unknown) {
            self.compare(id);
        }

        // The recorded sign-ins are evidence now: unforced changes right after them must not
        // shut them out. Then those accounts are compared again.
        let changed: Vec<String> = ids.iter().filter(|_| self.rng.random_bool(0.3)).cloned().collect();
        for id in &changed {
            match self.rng.random_range(0..3) {
                0 => self.set_mode(id, Mode::Enforce, false),
                _ => self.edit_entry(id, false),
            }
        }
        for id in &changed {
            self.compare(id);
        }

        // Some accounts removed (with their sub-users when recursive), some ids used again:
        // nothing of the old account may come back, at login or on the wire.
        let mut removed = Vec::new();
        let removing: Vec<String> = ids.iter().filter(|_| self.rng.random_bool(0.05)).cloned().collect();
        for id in &removing {
            let recursive = self.rng.random_bool(0.5);
            let expect = self.model.expect_remove(id, recursive);
            let request = json!({"cmd": "account_remove", "account": id, "recursive": recursive});
            if self.change(request, expect).is_some() {
                for gone in self.model.remove(id) {
                    if let Some(at) = self.endpoints.iter().position(|(a, _)| *a == gone) {
                        self.unbound.push(self.endpoints.swap_remove(at).1);
                    }
                    removed.push(gone);
                }
            }
        }
        for id in &removed {
            if self.rng.random_bool(0.5) {
                self.add_account(id, None, false);
                self.set_mode(id, Mode::Enforce, true);
            }
            self.compare(id);
        }
        let unbound = std::mem::take(&mut self.unbound);
        let (src4, src6) = (Ipv4Addr::new(198, 18, 250, 1), Ipv6Addr::new(0xfd00, 0xee, 0, 0, 0, 0, 0, 1));
        for ends in &unbound {
            let v4 = packets::tcp(src4.into(), ends.v4.into(), 40000, 80);
            let frames = [v4, packets::tcp(src6.into(), ends.v6.into(), 40000, 443)];
            for frame in frames {
                self.frames += 1;
                if run_frame(&self.program, &frame) != XDP_PASS {
                    self.mismatches.push(format!("a frame to {}/{} of a removed account is dropped", ends.v4, ends.v6));
                }
            }
        }
    }

    /// Without the parent_terminated feature, parents of sub-users are never terminated.
    fn allowed_state(&self, id: &str, state: State) -> State {
        let is_parent = self.model.accounts.values().any(|a| a.parent.as_deref() == Some(id));
        if !self.features.parent_terminated && is_parent && state == State::Terminated { State::Banned } else { state }
    }

    /// The addresses checked for one account: inside and just outside its entries and
    /// overrides, and random ones; IPv4 ones also in mapped spelling.
    fn addresses(&mut self, id: &str) -> Vec<IpAddr> {
        let mut nets: Vec<IpNet> = Vec::new();
        if let Some(a) = self.model.accounts.get(id) {
            nets.extend(a.entries.iter().map(|e| e.net));
            nets.extend(a.overrides.iter().map(|o| o.net));
        }
        let mut out = BTreeSet::new();
        for net in nets {
            out.insert(host_in(&net, self.rng.random()));
            if let Some(&edge) = just_outside(&net).choose(&mut self.rng) {
                out.insert(edge);
            }
        }
        for _ in 0..2 {
            out.insert(host_in(&random_net(&mut self.rng, false, 18..=18), self.rng.random()));
        }
        out.insert(host_in(&random_net(&mut self.rng, true, 46..=46), self.rng.random()));
        out.into_iter().collect()
    }

    /// Login checks and wire verdicts of one account against the model.
    fn compare(&mut self, id: &str) {
        let ends = self.endpoints.iter().find(|(a, _)| a == id).map(|(_, e)| *e);
        for addr in self.addresses(id) {
            let mut spellings = vec![addr];
            if let IpAddr::V4(v4) = addr
                && self.features.mapped
                && self.rng.random_bool(0.3)
            {
                spellings.push(mapped_addr(v4));
            }
            for spelled in spellings {
                let want = self.model.check(id, spelled, now());
                let dry_run = !self.rng.random_bool(0.2);
                let got = check(&mut self.conn, id, spelled, dry_run);
                self.checks += 1;
                if !dry_run
                    && want.allowed()
                    && let Some(account) = self.model.accounts.get_mut(id)
                {
                    account.signed_in.insert(model::unmap(spelled));
                }
                *self.tally.entry(format!("check {}", want.code())).or_default() += 1;
                if got["allowed"] != json!(want.allowed()) || got["reason"] != json!(want.code()) {
                    let account = self.describe(id);
                    self.mismatches.push(format!(
                        "check {id} {spelled} (dry_run {dry_run}): model {} ({}), daemon {got}{account}",
                        want.code(),
                        if want.allowed() { "allowed" } else { "denied" },
                    ));
                }
            }
            let Some(ends) = ends else { continue };
            let (sport, dport) = (self.rng.random_range(1024..=65535), self.rng.random_range(1..=65535));
            let frame = match addr {
                IpAddr::V4(src) => packets::tcp(src.into(), ends.v4.into(), sport, dport),
                IpAddr::V6(src) => packets::tcp(src.into(), ends.v6.into(), sport, 443),
            };
            let drops = self.model.wire_drops(id, addr, now());
            let verdict = run_frame(&self.program, &frame);
            self.frames += 1;
            *self.tally.entry(format!("wire {}", if drops { "drop" } else { "pass" })).or_default() += 1;
            if verdict != if drops { XDP_DROP } else { XDP_PASS } {
                let account = self.describe(id);
                self.mismatches.push(format!(
                    "wire {addr} -> {id}: model {}, kernel returned {verdict}{account}",
                    if drops { "drop" } else { "pass" }
                ));
            }
        }
    }
}

/// Rounds of `per_round` accounts each; a fresh daemon every `per_world` rounds (the test
/// maps hold 1024 accounts).
fn differential(seed: u64, rounds: usize, per_round: usize, per_world: usize) -> (usize, usize, usize) {
    let features = Features::from_env();
    eprintln!("IPACCESS_SEED={seed} rounds={rounds} {features:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut accounts, mut checks, mut frames) = (0, 0, 0);
    let started = Instant::now();
    for first in (0..rounds).step_by(per_world) {
        let w = World::new(CONFIG);
        let mut d = Differential::new(&w, rng.random(), features);
        for round in first..(first + per_world).min(rounds) {
            d.round(round, per_round);
            if !d.mismatches.is_empty() {
                for m in d.mismatches.iter().take(15) {
                    eprintln!("round {round}: {m}");
                }
                panic!(
                    "round {round}: {} disagreements with the model; replay with IPACCESS_SEED={seed} \
                     IPACCESS_POLICY_ROUNDS={}",
                    d.mismatches.len(),
                    round + 1
                );
            }
        }
        accounts += d.tally.get("account_add ok").copied().unwrap_or_default();
        let tally: Vec<String> = d.tally.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        eprintln!("{}", tally.join(", "));
        checks += d.checks;
        frames += d.frames;
        eprintln!(
            "{accounts} accounts, {checks} checks, {frames} frames, {} requests in this world, {:.1?}",
            d.requests,
            started.elapsed()
        );
    }
    (accounts, checks, frames)
}

#[test]
fn daemon_agrees_with_policy_model() {
    let rounds = std::env::var("IPACCESS_POLICY_ROUNDS").map_or(20, |s| s.parse().expect("a number of rounds"));
    let (accounts, checks, frames) = differential(seed(), rounds, 100, 8);
    eprintln!("{accounts} accounts, {checks} login checks and {frames} frames agree with the model");
}

// ---------------------------------------------------------------------------------------------
// An override's expiry, at login, at once

/// An enforcing account `cust` allowing 198.18.0.0/24, bound to 198.19.0.1.
fn enforcing(conn: &mut Conn) -> Ipv4Addr {
    let bound = Ipv4Addr::new(198, 19, 0, 1);
    conn.ok(json!({"cmd": "account_add", "account": "cust"}));
    conn.ok(json!({"cmd": "allow_add", "account": "cust", "cidr": "198.18.0.0/24"}));
    conn.ok(json!({"cmd": "account_mode", "account": "cust", "mode": "enforce", "force": true}));
    conn.ok(json!({"cmd": "bind_add", "account": "cust", "addr": bound.to_string()}));
    bound
}

fn grant(account: &str, cidr: &str, ttl: u64) -> Value {
    json!({"cmd": "override_grant", "account": account, "cidr": cidr, "ttl_seconds": ttl,
           "ticket": "SUP-1142", "reason": "ISP changed address, verified by phone"})
}

/// A login check made just after an override's `expires_at` is denied at once: the decision
/// itself honours the expiry, without waiting for the daemon's periodic sweep (10 s). Two
/// overrides two seconds apart, each checked just before and just after its expiry, so that a
/// sweep happening to run in between cannot hide a decision that ignores expiry.
#[test]
fn a_check_just_after_an_overrides_expiry_is_denied() {
    let w = World::new(CONFIG);
    let mut conn = Conn::open(&w.socket());
    let bound = enforcing(&mut conn);
    let program = pinned_program(&w);
    let frame = |src: Ipv4Addr| packets::tcp(src.into(), bound.into(), 40000, 443);
    let sources = [Ipv4Addr::new(198, 18, 7, 7), Ipv4Addr::new(198, 18, 7, 8)];
    for (src, ttl) in sources.iter().zip([2, 4]) {
        assert_eq!(check(&mut conn, "cust", (*src).into(), false)["reason"], "address_not_allowed");
        let granted = conn.ok(grant("cust", &format!("{src}/32"), ttl));
        assert!(granted["override"]["expires_at"].is_i64(), "{granted}");
    }
    let listed = conn.ok(json!({"cmd": "override_list", "account": "cust"}));
    let expiries: Vec<i64> = sources
        .iter()
        .map(|src| {
            let o = listed.as_array().unwrap().iter().find(|o| o["cidr"] == format!("{src}/32"));
            o.and_then(|o| o["expires_at"].as_i64()).unwrap_or_else(|| panic!("no override for {src}: {listed}"))
        })
        .collect();
    for (&src, &expires_at) in sources.iter().zip(&expiries) {
        let at = expires_at as f64;
        // Half a second before: allowed, at login and on the wire; the reply came in time.
        sleep_until(at - 0.5);
        let before = check(&mut conn, "cust", src.into(), false);
        assert!(unix_now() < at, "the check before the expiry came too late to count");
        assert_eq!((&before["allowed"], &before["reason"]), (&json!(true), &json!("allowed")), "{src}: {before}");
        assert_eq!(run_frame(&program, &frame(src)), XDP_PASS, "{src} dropped before its override expired");
        // Just after: denied, recorded or not.
        sleep_until(at + 0.05);
        let after = check(&mut conn, "cust", src.into(), false);
        let dry = check(&mut conn, "cust", src.into(), true);
        assert!(unix_now() < at + 1.0, "the checks after the expiry took more than a second");
        for reply in [&after, &dry] {
            let got = (&reply["allowed"], &reply["reason"]);
            assert_eq!(got, (&json!(false), &json!("address_not_allowed")), "{src} just after {expires_at}: {reply}");
        }
        // The kernel's clock is boot time: allow it the conversion's second.
        sleep_until(at + 1.0);
        assert_eq!(run_frame(&program, &frame(src)), XDP_DROP, "{src} passes after its override expired");
    }
}

// ---------------------------------------------------------------------------------------------
// README's support runbook, with ipaccessctl

/// `ipaccessctl --socket SOCKET ARGS`: exit code, stdout and stderr.
fn ctl(w: &World, args: &[&str]) -> (i32, String, String) {
    let out = w.ctl(args);
    (out.code, out.stdout, out.stderr)
}

/// `ipaccessctl --json ARGS` with the expected exit code (0 allowed/ok, 1 denied); its JSON.
fn ctl_json(w: &World, args: &[&str], code: i32) -> Value {
    let (got, stdout, stderr) = ctl(w, &[&["--json"], args].concat());
    assert_eq!(got, code, "ipaccessctl {args:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("ipaccessctl {args:?}: not JSON ({e}): {stdout}{stderr}"))
}

/// The objects anywhere in `value` whose `address` is `addr` and whose `method` is `method`.
fn rows<'a>(value: &'a Value, addr: &str, method: &str, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if map.get("address").and_then(Value::as_str) == Some(addr) && map.get("method") == Some(&json!(method)) {
                out.push(value);
            }
            map.values().for_each(|v| rows(v, addr, method, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rows(v, addr, method, out)),
        _ => {}
    }
}

fn tcp_ok(hosts: &TestHosts, src: Ipv4Addr, dst: SocketAddr, timeout: Duration) -> bool {
    hosts.client.run(move || tcp_connect(src.into(), dst, timeout))
}

/// README's "Letting a locked-out customer back in", step by step on the real daemon, with
/// real TCP connections through the filter: locked out at login and on the wire, the denied
/// attempts in `activity`, a dry-run check with the reason, an override that lets them in,
/// the address added by the customer, the override revoked, and still allowed.
#[test]
fn support_runbook_end_to_end() {
    let w = World::new("");
    let (office, home) = (w.hosts.client_v4[0], w.hosts.client_v4[1]);
    let dst = SocketAddr::new(w.hosts.server_v4.into(), 7100);
    let _server = TcpServer::start_in(&w.hosts.server, dst).unwrap();
    for src in [office, home] {
        let to = IpAddr::from(w.hosts.server_v4);
        assert!(w.hosts.client.run(move || icmp_echo(src.into(), to, Duration::from_secs(2))), "ping from {src}");
    }
    let (ok, fail) = (Duration::from_secs(2), Duration::from_millis(500));
    let (office_s, home_s) = (office.to_string(), home.to_string());

    // The customer enforces its allowlist from the office.
    ctl_json(&w, &["account", "add", "cust"], 0);
    ctl_json(&w, &["bind", "add", "cust", &dst.to_string(), "--proto", "tcp"], 0);
    ctl_json(&w, &["allow", "add", "cust", &format!("{office}/32"), "--label", "office"], 0);
    ctl_json(&w, &["account", "mode", "cust", "enforce", "--client-ip", &office_s], 0);
    assert!(tcp_ok(&w.hosts, office, dst, ok), "the office is refused");

    // Working from home: sign-ins refused (the platform's checks), and the wire closed.
    for method in ["password", "api_key", "password"] {
        let c = ctl_json(&w, &["check", "cust", &home_s, "--method", method], 1);
        assert_eq!(c["reason"], "address_not_allowed", "{c}");
        assert!(!c["hint"].as_str().unwrap_or_default().is_empty(), "a denial without a hint: {c}");
    }
    assert!(!tcp_ok(&w.hosts, home, dst, fail), "home got through before any override");

    // Step 2: support sees what they tried, per address and method, and the reason.
    let summary = ctl_json(&w, &["activity", "cust", "--summary"], 0);
    for (method, times) in [("password", 2), ("api_key", 1)] {
        let mut found = Vec::new();
        rows(&summary, &home_s, method, &mut found);
        assert_eq!(found.len(), 1, "one summary row for {home} by {method}: {summary}");
        assert_eq!((&found[0]["count"], &found[0]["allowed"]), (&json!(times), &json!(false)), "{summary}");
    }
    let dry = ctl_json(&w, &["check", "cust", &home_s, "--dry-run"], 1);
    assert_eq!((&dry["allowed"], &dry["reason"]), (&json!(false), &json!("address_not_allowed")), "{dry}");

    // Step 3: an override for the address they use now; the reply shows their attempts.
    let granted = ctl_json(
        &w,
        &["override", "grant", "cust", &home_s, "--ttl", "2h", "--ticket", "SUP-1142", "--reason", "ISP changed"],
        0,
    );
    let mut attempts = Vec::new();
    rows(&granted["recent_denied"], &home_s, "password", &mut attempts);
    assert!(!attempts.is_empty(), "the grant does not show the denied attempts: {granted}");
    let c = ctl_json(&w, &["check", "cust", &home_s], 0);
    assert_eq!(c["reason"], "allowed", "{c}");
    assert!(tcp_ok(&w.hosts, home, dst, ok), "the override does not let home in on the wire");

    // Step 4: the customer adds the address; support revokes the override.
    ctl_json(&w, &["allow", "add", "cust", &format!("{home}/32"), "--label", "home"], 0);
    let listed = ctl_json(&w, &["override", "list", "cust"], 0);
    let id = listed[0]["id"].as_i64().unwrap_or_else(|| panic!("no live override: {listed}"));
    ctl_json(&w, &["override", "revoke", "cust", &id.to_string()], 0);
    assert_eq!(ctl_json(&w, &["override", "list", "cust"], 0), json!([]), "the override outlived its revocation");

    // Still allowed, by the allowlist now, at login and on the wire; the office too.
    for src in [&home_s, &office_s] {
        let c = ctl_json(&w, &["check", "cust", src], 0);
        assert_eq!((&c["allowed"], &c["reason"]), (&json!(true), &json!("allowed")), "{src}: {c}");
    }
    assert!(tcp_ok(&w.hosts, home, dst, ok), "home is refused after the override was revoked");
    assert!(tcp_ok(&w.hosts, office, dst, ok), "the office is refused at the end");
}
