//! Running the real `ipaccessd` in tests: finding the binaries, a temporary directory, a
//! guard that starts the daemon in a network namespace and stops it on Drop, and the world
//! of an end-to-end test (namespaces, bpffs, directory and daemon).

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::{BpfFs, TestHosts};

/// How long the daemon may take to start answering, and to stop after SIGTERM.
pub const READY: Duration = Duration::from_secs(10);
pub const STOP: Duration = Duration::from_secs(5);

pub struct Binaries {
    pub daemon: PathBuf,
    pub ctl: PathBuf,
}

/// `target/<profile>/{ipaccessd,ipaccessctl}`: next to a benchmark binary, or one level up
/// from a test executable in `target/<profile>/deps/`.
pub fn binaries() -> &'static Binaries {
    static BINS: OnceLock<Binaries> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("current_exe");
        let mut dir = exe.parent().expect("the executable has a directory");
        if dir.ends_with("deps") {
            dir = dir.parent().expect("target/<profile>/deps has a parent");
        }
        let bins = Binaries { daemon: dir.join("ipaccessd"), ctl: dir.join("ipaccessctl") };
        for bin in [&bins.daemon, &bins.ctl] {
            assert!(
                bin.is_file(),
                "{} is missing: run `cargo build -p ipaccess --bins --release` first \
                 (`cargo test --release --workspace` builds it too)",
                bin.display()
            );
        }
        bins
    })
}

/// A fresh directory under the system temp dir (its path, and the guard that removes it on
/// Drop). Mode 0755, so that an unprivileged client can reach the socket inside.
pub struct TempDir(pub PathBuf, #[allow(dead_code, reason = "held for its Drop")] tempfile::TempDir);

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl TempDir {
    pub fn new() -> TempDir {
        let dir = tempfile::Builder::new().prefix("ipaccess-test-").tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(dir.path().to_path_buf(), dir)
    }
}

/// How to launch the daemon besides its arguments: a command it runs under (e.g. `setpriv
/// ...`), and environment variables (e.g. `NOTIFY_SOCKET`).
#[derive(Clone, Debug, Default)]
pub struct Launch {
    pub wrapper: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Arguments after the usual ones (e.g. `--accept-older-store`).
    pub extra_args: Vec<String>,
}

/// A running `ipaccessd`: SIGTERM on Drop, SIGKILL if it has not stopped within [`STOP`].
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
}

impl Daemon {
    /// `ip netns exec NETNS ipaccessd ARGS` (exec, so the child is the daemon itself), then
    /// waits until `socket` accepts connections.
    pub fn start(netns: &str, args: &[&str], socket: &Path, log: &Path) -> Daemon {
        Self::start_within(netns, args, socket, log, READY)
    }

    /// [`Daemon::start`], allowing `ready` for start-up (a large store takes longer).
    pub fn start_within(netns: &str, args: &[&str], socket: &Path, log: &Path, ready: Duration) -> Daemon {
        let mut daemon = Self::spawn(netns, &Launch::default(), args, log);
        daemon.wait_answering(socket, ready);
        daemon
    }

    /// `ip netns exec NETNS [WRAPPER...] ipaccessd ARGS EXTRA_ARGS` with `launch.env` added to the
    /// environment; does not wait. With a wrapper that execs (setpriv, prlimit), the child
    /// is still the daemon itself.
    pub fn spawn(netns: &str, launch: &Launch, args: &[&str], log: &Path) -> Daemon {
        let out = OpenOptions::new().create(true).append(true).open(log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(&launch.wrapper)
            .arg(&binaries().daemon)
            .args(args)
            .args(&launch.extra_args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start ipaccessd");
        Daemon { child, log: log.to_path_buf() }
    }

    /// Waits (at most `within`) until `socket` answers; panics if the daemon exits first.
    pub fn wait_answering(&mut self, socket: &Path, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("ipaccessd exited during start-up ({status})");
            }
            // A stale socket left by a killed daemon refuses connections until it is replaced.
            if answers(socket) {
                return;
            }
            assert!(Instant::now() < deadline, "ipaccessd not ready after {within:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `within`) for the daemon to exit by itself.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// SIGTERM and wait; `None` if it did not stop by itself within [`STOP`] (it is then killed).
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(STOP);
        if status.is_none() {
            self.kill9();
        }
        status
    }

    pub fn kill9(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
        if thread::panicking() {
            eprintln!("---- ipaccessd log ({}) ----\n{}", self.log.display(), self.log_text());
        }
    }
}

/// Does a daemon answer a request on `socket`? (Once it does, the socket's mode is set too.)
pub fn answers(socket: &Path) -> bool {
    let Ok(stream) = UnixStream::connect(socket) else {
        return false;
    };
    let timeout = Some(Duration::from_secs(2));
    let mut reply = String::new();
    stream.set_read_timeout(timeout).is_ok()
        && stream.set_write_timeout(timeout).is_ok()
        && (&stream).write_all(b"{\"id\":0,\"cmd\":\"status\"}\n").is_ok()
        && BufReader::new(&stream).read_line(&mut reply).is_ok_and(|n| n > 0)
}

/// Map sizes for end-to-end tests: quick to create, ample for every test's policy.
pub const TEST_MAPS: &str = "[maps]\nslots = 65536\naccounts = 1024\n";

/// The output of one `ipaccessctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    /// Standard output as JSON (`--json`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }
}

/// One end-to-end test's world: client and server namespaces joined by a veth, a private
/// bpffs, a directory for the configuration, store, socket and log, and the daemon filtering
/// the server's veth (stopped first on Drop: fields drop in order).
pub struct World {
    pub daemon: Option<Daemon>,
    pub hosts: TestHosts,
    pub bpffs: BpfFs,
    pub dir: TempDir,
}

impl World {
    /// Everything, with the daemon started on `config` (TOML; [`TEST_MAPS`] is appended).
    pub fn new(config: &str) -> World {
        let mut world =
            World { daemon: None, hosts: TestHosts::new().unwrap(), bpffs: BpfFs::new().unwrap(), dir: TempDir::new() };
        world.start(config);
        world
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.0.join("ipaccessd.sock")
    }

    /// `ipaccessctl --socket SOCKET ARGS` against this world's daemon.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        self.ctl_with(&[], args)
    }

    /// `[wrapper...] ipaccessctl --socket SOCKET ARGS` (a wrapper such as `setpriv` runs it as
    /// another user).
    pub fn ctl_with(&self, wrapper: &[String], args: &[&str]) -> CtlOutput {
        let socket = self.socket();
        let ctl = binaries().ctl.to_str().unwrap();
        let mut argv: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        argv.extend([ctl, "--socket", socket.to_str().unwrap()]);
        argv.extend_from_slice(args);
        let out = crate::netns::run_cmd(argv[0], &argv[1..], Duration::from_secs(15)).unwrap();
        // What ipaccessctl prints reaches a terminal: it must be text, whatever the daemon
        // holds (see tests/tests/terminal.rs).
        let text = |bytes: Vec<u8>, what: &str| {
            String::from_utf8(bytes).unwrap_or_else(|e| panic!("ipaccessctl {args:?}: {what} is not UTF-8: {e}"))
        };
        CtlOutput {
            code: out.status.code().unwrap_or_else(|| panic!("ipaccessctl {args:?} died: {}", out.status)),
            stdout: text(out.stdout, "stdout"),
            stderr: text(out.stderr, "stderr"),
        }
    }

    /// `ipaccessctl ARGS`, which must succeed: its standard output.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert_eq!(out.code, 0, "ipaccessctl {args:?}: {out:#?}");
        out.stdout
    }

    /// The configuration file's path: [`World::start`] writes it.
    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("ipaccessd.toml")
    }

    /// The daemon's arguments: this world's configuration file, interface, state directory,
    /// socket and bpffs.
    pub fn daemon_args(&self) -> Vec<String> {
        let text = |p: &Path| p.to_str().unwrap().to_string();
        vec![
            "--config".into(),
            text(&self.config_path()),
            "--iface".into(),
            self.hosts.server_if.clone(),
            "--state-dir".into(),
            text(&self.dir.0.join("state")),
            "--socket".into(),
            text(&self.socket()),
            "--bpffs".into(),
            text(self.bpffs.path()),
        ]
    }

    /// Like [`World::new`], with `maps` (a `[maps]` section) instead of [`TEST_MAPS`]: for
    /// kernel tables small enough to fill.
    pub fn with_maps(config: &str, maps: &str) -> World {
        let mut world =
            World { daemon: None, hosts: TestHosts::new().unwrap(), bpffs: BpfFs::new().unwrap(), dir: TempDir::new() };
        world.start_with_maps(config, maps);
        world
    }

    /// Starts the daemon on the same state directory, bpffs and socket as before.
    pub fn start(&mut self, config: &str) {
        self.start_with_maps(config, TEST_MAPS);
    }

    /// Starts the daemon again with `maps` (a `[maps]` section) instead of [`TEST_MAPS`].
    pub fn start_with_maps(&mut self, config: &str, maps: &str) {
        assert!(self.daemon.is_none(), "the daemon is already running");
        fs::write(self.config_path(), format!("{config}\n{maps}")).unwrap();
        let args = self.daemon_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = self.dir.0.join("ipaccessd.log");
        self.daemon = Some(Daemon::start(self.hosts.server.name(), &args, &self.socket(), &log));
    }

    /// SIGTERM; asserts that the daemon stopped by itself, promptly and successfully.
    pub fn stop(&mut self) {
        let mut daemon = self.daemon.take().expect("the daemon is running");
        let status = daemon.terminate();
        assert!(status.is_some_and(|s| s.success()), "SIGTERM: {status:?}:\n{}", daemon.log_text());
    }

    pub fn kill9(&mut self) {
        self.daemon.take().expect("the daemon is running").kill9();
    }

    /// Sends SIGHUP and waits for the reload's outcome in the log: what the log gained since,
    /// which says "configuration reloaded" or "reload refused".
    pub fn reload(&self) -> String {
        let daemon = self.daemon.as_ref().expect("the daemon is running");
        let before = daemon.log_text().len();
        daemon.signal(libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = daemon.log_text();
            let new = &log[before..];
            if new.contains("configuration reloaded") || new.contains("reload refused") {
                return new.to_string();
            }
            assert!(Instant::now() < deadline, "no reload in the log:\n{log}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An `allow_list` reply without its entries' last-used evidence (`last_signin_at`,
/// `last_packet_at`): what a test compares as policy, since checks and traffic move it and
/// each node keeps its own.
pub fn without_last_used(mut entries: serde_json::Value) -> serde_json::Value {
    for entry in entries.as_array_mut().expect("allow_list is a list") {
        let entry = entry.as_object_mut().expect("an entry is an object");
        entry.remove("last_signin_at");
        entry.remove("last_packet_at");
    }
    entries
}
