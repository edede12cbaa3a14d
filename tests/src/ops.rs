//! One `ipaccessd` run the way a service manager runs it: configured only through its file
//! (so that a reload can change everything, interfaces included), started under a wrapper
//! and with an environment of the test's choosing, in the server namespace of a
//! [`TestHosts`] pair. Used by the systemd, capability and metrics tests.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::daemon::{Daemon, Launch, READY, TEST_MAPS, TempDir};
use crate::netns::{BpfFs, TestHosts};

/// Namespaces, a private bpffs and a directory for configuration, store, socket and log;
/// the daemon (stopped first on Drop: fields drop in order).
pub struct Host {
    pub daemon: Option<Daemon>,
    pub hosts: TestHosts,
    pub bpffs: BpfFs,
    pub dir: TempDir,
}

impl Default for Host {
    fn default() -> Self {
        Self::new()
    }
}

impl Host {
    pub fn new() -> Host {
        Host { daemon: None, hosts: TestHosts::new().unwrap(), bpffs: BpfFs::new().unwrap(), dir: TempDir::new() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("ipaccessd.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.path("ipaccessd.log")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Writes the configuration file (with [`TEST_MAPS`] appended), as an operator would before
    /// starting or reloading the daemon.
    pub fn write_config(&self, toml: &str) {
        fs::write(self.path("ipaccessd.toml"), format!("{toml}\n{TEST_MAPS}")).unwrap();
    }

    /// Writes a configuration that filters the server interface and says nothing else: a
    /// standalone host (no `[cluster]`) with every default.
    pub fn write_standalone_config(&self) {
        self.write_config(&format!("interfaces = [\"{}\"]\n", self.hosts.server_if));
    }

    /// Starts the daemon on the configuration file without waiting for it.
    pub fn spawn(&mut self, launch: &Launch) -> &mut Daemon {
        assert!(self.daemon.is_none(), "the daemon is already running");
        let path = |name: &str| self.path(name).to_str().unwrap().to_string();
        let args = [
            "--config".to_string(),
            path("ipaccessd.toml"),
            "--state-dir".into(),
            path("state"),
            "--socket".into(),
            path("ipaccessd.sock"),
            "--bpffs".into(),
            self.bpffs.path().to_str().unwrap().into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::spawn(self.hosts.server.name(), launch, &args, &self.log());
        self.daemon.insert(daemon)
    }

    /// Starts the daemon and waits until its socket answers.
    pub fn start(&mut self, launch: &Launch) {
        let socket = self.socket();
        self.spawn(launch).wait_answering(&socket, READY);
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("the daemon is running")
    }

    /// One request on a fresh connection; the whole reply.
    pub fn request(&self, request: Value) -> Value {
        let stream = UnixStream::connect(self.socket()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (&stream).write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply to {request} is not JSON ({e}): {line:?}"))
    }

    /// A request that must succeed; its `ok` value.
    pub fn ok(&self, request: Value) -> Value {
        let reply = self.request(request.clone());
        reply.get("ok").cloned().unwrap_or_else(|| panic!("{request} failed: {reply}"))
    }

    /// Is an XDP program attached to `iface` in the server namespace?
    pub fn xdp_attached(&self, iface: &str) -> bool {
        self.hosts.server.ip(&["link", "show", "dev", iface]).unwrap().contains("prog/xdp")
    }
}
