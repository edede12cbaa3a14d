//! A fleet node on an etcd that demands TLS with client certificates and a user's password,
//! as docs/operations.md recommends: a real etcd member (one is enough here) in the node's
//! own server namespace, certificates made by openssl for the test, etcd's authentication
//! switched on with a role limited to the fleet's prefix.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ipaccess_tests::daemon::Launch;
use ipaccess_tests::etcd::etcdctl_in;
use ipaccess_tests::netns::Netns;
use ipaccess_tests::ops::Host;
use serde_json::json;

const PREFIX: &str = "/tls-fleet/";
const ENDPOINT: &str = "https://127.0.0.1:2379";

/// `openssl` with `args`, in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate (CN `ipaccess`), all
/// signed by the CA; returns the directory.
fn certificates(dir: &Path) -> PathBuf {
    let dir = dir.join("pki");
    fs::create_dir_all(&dir).unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=ipaccess test CA", "-keyout", "ca.key", "-out"];
    ca.push("ca.pem");
    ca.extend(ec);
    openssl(&dir, &ca);
    fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n").unwrap();
    fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, subject) in [("server", "/CN=etcd"), ("client", "/CN=ipaccess")] {
        let (key, csr, pem, ext) =
            (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
        let mut req = vec!["req", "-new", "-subj", subject, "-keyout", &key, "-out", &csr];
        req.extend(ec);
        openssl(&dir, &req);
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
    dir
}

/// One etcd member serving TLS only, with client certificates required; killed on Drop.
struct Etcd {
    child: Child,
    pki: PathBuf,
}

impl Etcd {
    fn start(host: &Host, pki: &Path) -> Etcd {
        let data = host.path("etcd-data");
        let file = |name: &str| pki.join(name).to_str().unwrap().to_owned();
        let log = fs::File::create(host.path("etcd.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", host.hosts.server.name(), "etcd", "--name", "tls0"])
            .args(["--data-dir", data.to_str().unwrap()])
            .args(["--listen-client-urls", ENDPOINT, "--advertise-client-urls", ENDPOINT])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "tls0=http://127.0.0.1:2380"])
            .args(["--cert-file", &file("server.pem"), "--key-file", &file("server.key")])
            .args(["--trusted-ca-file", &file("ca.pem"), "--client-cert-auth"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        let etcd = Etcd { child, pki: pki.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while etcd.ctl(&host.hosts.server, &["endpoint", "health"]).is_err() {
            assert!(Instant::now() < deadline, "etcd with TLS never became healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
        etcd
    }

    /// etcdctl over TLS, in the namespace `ns` where etcd runs.
    fn ctl(&self, ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
        let file = |name: &str| format!("{}", self.pki.join(name).display());
        let tls = [format!("--cacert={}", file("ca.pem")), format!("--cert={}", file("client.pem"))];
        let mut full: Vec<String> = tls.to_vec();
        full.push(format!("--key={}", file("client.key")));
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        etcdctl_in(ns, &[ENDPOINT.to_owned()], &full, Duration::from_secs(5))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status(host: &Host) -> serde_json::Value {
    host.ok(json!({"cmd": "status"}))["cluster"].clone()
}

fn config(host: &Host, pki: &Path, password_file: &Path) -> String {
    format!(
        "interfaces = [\"{}\"]\n[cluster]\nendpoints = [\"{ENDPOINT}\"]\nprefix = \"{PREFIX}\"\nnode = \"tls-a\"\n\
         username = \"ipaccess\"\npassword_file = \"{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        host.hosts.server_if,
        password_file.display(),
        pki.join("ca.pem").display(),
        pki.join("client.pem").display(),
        pki.join("client.key").display(),
    )
}

#[test]
fn a_node_works_through_tls_client_certificates_and_an_etcd_user() {
    let mut host = Host::new();
    let pki = certificates(&host.dir.0);
    let etcd = Etcd::start(&host, &pki);
    // etcd's authentication: root, and a user whose role may touch the fleet's prefix only.
    for args in [
        &["user", "add", "root:root-secret"][..],
        &["user", "add", "ipaccess:fleet-secret"],
        &["role", "add", "ipaccess"],
        &["role", "grant-permission", "ipaccess", "readwrite", PREFIX, "--prefix=true"],
        &["user", "grant-role", "ipaccess", "ipaccess"],
        &["auth", "enable"],
    ] {
        etcd.ctl(&host.hosts.server, args).unwrap_or_else(|e| panic!("etcdctl {}: {e}", args.join(" ")));
    }

    // A wrong password: the node starts on its (empty) store, says why it is not
    // connected, and refuses changes.
    let password = host.path("etcd-password");
    fs::write(&password, "not-the-secret\n").unwrap();
    host.write_config(&config(&host, &pki, &password));
    host.start(&Launch::default());
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&host)["last_error"].is_null() {
        assert!(Instant::now() < deadline, "a wrong password never showed in status: {}", status(&host));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(status(&host)["connected"], false, "{}", status(&host));
    assert!(status(&host)["last_error"].as_str().unwrap().contains("authentication failed"), "{}", status(&host));
    let refused = host.request(json!({"cmd": "account_add", "account": "acme"}));
    assert_eq!(refused["error"]["code"], "cluster_unavailable", "{refused}");
    host.daemon.take().unwrap().terminate();

    // The right password (with a trailing newline, as editors leave it): connected, a change
    // lands in etcd under the prefix, and the clock is measured over the same TLS.
    fs::write(&password, "fleet-secret\n").unwrap();
    host.start(&Launch::default());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(status(&host)["connected"] == true && status(&host)["clock_offset_ms"].is_i64()) {
        assert!(Instant::now() < deadline, "the node never connected over TLS: {}", status(&host));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(status(&host)["clock_offset_ms"].as_i64().unwrap().abs() <= 250, "{}", status(&host));
    host.ok(json!({"cmd": "account_add", "account": "acme"}));
    host.ok(json!({"cmd": "allow_add", "account": "acme", "cidr": "198.18.9.0/24"}));
    let stored =
        etcd.ctl(&host.hosts.server, &["--user=root:root-secret", "get", &format!("{PREFIX}accounts/acme")]).unwrap();
    assert!(stored.contains("198.18.9.0/24"), "the change is not in etcd: {stored}");
    let check = host.ok(json!({"cmd": "check", "account": "acme", "addr": "198.18.9.7", "dry_run": true}));
    assert_eq!(check["allowed"], true, "{check}");
}
