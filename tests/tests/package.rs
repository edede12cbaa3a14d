//! The Debian package, as `cargo xtask package` builds it: what it holds (binaries, unit,
//! conffile, man pages that render, completions that parse, the documented configuration),
//! and what installing it does, tried for real with dpkg in a throwaway copy of this machine's
//! root (see package_install.sh): group creation and its idempotence, the unit enabled, the
//! packaged configuration letting group ipaccess use the daemon, conffile edits kept on
//! upgrade, the filter taken off on removal, purge. Nothing is installed on this machine.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use ipaccess::config::Config;
use ipaccess_tests::daemon::TempDir;
use ipaccess_tests::netns::{run_cmd, run_ok};
use ipaccess_tests::xtask::cargo_xtask;

/// Generous: the first run may have to install cargo-deb (`cargo xtask setup`).
const BUILD: Duration = Duration::from_secs(20 * 60);

/// The package, built once per test run by `cargo xtask package`.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let out = cargo_xtask(&["package"], BUILD).expect("run cargo xtask package");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cargo xtask package failed ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let deb = stdout
            .lines()
            .find_map(|l| l.strip_prefix("package: "))
            .unwrap_or_else(|| panic!("no `package: PATH` line in:\n{stdout}"));
        PathBuf::from(deb)
    })
}

fn dpkg_deb(args: &[&str]) -> String {
    let deb = package().to_str().unwrap();
    let mut full = args.to_vec();
    full.insert(1, deb);
    run_ok("dpkg-deb", &full).unwrap()
}

/// `dpkg-deb --contents`: path (without the leading `.`) to mode and owner.
fn contents() -> Vec<(String, String, String)> {
    dpkg_deb(&["--contents"])
        .lines()
        .map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let path = cols.last().unwrap().trim_start_matches('.').to_string();
            (path, cols[0].to_string(), cols[1].to_string())
        })
        .collect()
}

/// The package's files, unpacked into a fresh directory.
fn extracted() -> TempDir {
    let root = TempDir::new();
    dpkg_deb(&["--extract", root.0.to_str().unwrap()]);
    root
}

#[test]
fn package_control_fields() {
    let field = |name: &str| dpkg_deb(&["--field", name]).trim().to_string();
    assert_eq!(field("Package"), "ipaccess");
    let arch = run_ok("dpkg", &["--print-architecture"]).unwrap();
    assert_eq!(field("Architecture"), arch.trim());
    assert!(field("Version").starts_with(env!("CARGO_PKG_VERSION")), "{}", field("Version"));
    assert_eq!(field("Section"), "net");
    // Depends: adduser for the postinst, the C library, and nothing else that would surprise.
    let depends = field("Depends");
    let names: BTreeSet<&str> = depends.split(',').map(|d| d.split_whitespace().next().unwrap_or_default()).collect();
    assert!(names.contains("adduser") && names.contains("libc6"), "{depends}");
    assert!(names.iter().all(|n| ["adduser", "libc6", "libgcc-s1"].contains(n)), "{depends}");
    assert!(depends.contains("libc6 (>= 2."), "libc6 needs a minimum version: {depends}");

    let conffiles = dpkg_deb(&["--info", "conffiles"]);
    assert_eq!(conffiles.trim(), "/etc/ipaccess/ipaccessd.toml");
    let postinst = dpkg_deb(&["--info", "postinst"]);
    assert!(postinst.contains("addgroup --system") && postinst.contains("deb-systemd-helper enable ipaccessd.service"));
}

#[test]
fn package_files() {
    let files = contents();
    let entry =
        |path: &str| files.iter().find(|(p, ..)| p == path).unwrap_or_else(|| panic!("{path} is not in the package"));
    for bin in ["/usr/bin/ipaccessd", "/usr/bin/ipaccessctl"] {
        let (_, mode, owner) = entry(bin);
        assert_eq!((mode.as_str(), owner.as_str()), ("-rwxr-xr-x", "0/0"), "{bin}");
    }
    for file in [
        "/usr/lib/systemd/system/ipaccessd.service",
        "/etc/ipaccess/ipaccessd.toml",
        "/usr/share/bash-completion/completions/ipaccessctl",
        "/usr/share/zsh/vendor-completions/_ipaccessctl",
        "/usr/share/fish/vendor_completions.d/ipaccessctl.fish",
        "/usr/share/bash-completion/completions/ipaccessd",
        "/usr/share/man/man8/ipaccessd.8.gz",
        "/usr/share/man/man8/ipaccessctl.8.gz",
        "/usr/share/doc/ipaccess/copyright",
    ] {
        let (_, mode, owner) = entry(file);
        assert_eq!((mode.as_str(), owner.as_str()), ("-rw-r--r--", "0/0"), "{file}");
    }

    // The packaged binaries run, and are the version the package says.
    let root = extracted();
    let dir = root.0.to_str().unwrap();
    let version = run_ok(&format!("{dir}/usr/bin/ipaccessctl"), &["--version"]).unwrap();
    assert_eq!(version.trim(), format!("ipaccessctl {}", env!("CARGO_PKG_VERSION")));
    let help = run_ok(&format!("{dir}/usr/bin/ipaccessd"), &["--help"]).unwrap();
    assert!(help.contains("--iface"), "{help}");

    let unit = fs::read_to_string(root.0.join("usr/lib/systemd/system/ipaccessd.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/ipaccessd"), "{unit}");
}

#[test]
fn package_man_pages_render() {
    let root = extracted();
    let man8 = root.0.join("usr/share/man/man8");
    let mut pages = BTreeSet::new();
    let mut referenced = BTreeSet::new();
    for entry in fs::read_dir(&man8).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let page = name.strip_suffix(".8.gz").unwrap_or_else(|| panic!("{name}: not a gzipped section-8 page"));
        pages.insert(page.to_string());
        let roff = run_ok("gzip", &["-dc", path.to_str().unwrap()]).unwrap();
        assert!(roff.contains(&format!(".TH {} 8", page.to_uppercase())), "{name}: no .TH header");
        // Pages name their subcommands' pages as `ipaccessctl\-account(8)`.
        for word in roff.split_whitespace() {
            if let Some(sub) = word.strip_suffix("(8)").filter(|w| w.starts_with("ipaccessctl")) {
                referenced.insert(sub.replace("\\-", "-"));
            }
        }
        // Renders with groff's man macros with every warning on, and without a single one.
        let unpacked = root.0.join(page);
        fs::write(&unpacked, &roff).unwrap();
        // -P-cbou: plain text, no overstriking.
        let args = ["-man", "-Tutf8", "-ww", "-P-cbou", unpacked.to_str().unwrap()];
        let out = run_cmd("groff", &args, Duration::from_secs(20)).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.is_empty(), "{name}: groff says: {stderr}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("NAME") && text.contains("SYNOPSIS"), "{name}:\n{text}");
        if page == "ipaccessctl-override-grant" {
            assert!(text.contains("--ttl <DURATION>") && text.contains("--ticket"), "{text}");
        }
    }
    for page in ["ipaccessd", "ipaccessctl", "ipaccessctl-override-grant", "ipaccessctl-allow-replace"] {
        assert!(pages.contains(page), "no page {page} among {pages:?}");
    }
    // Every subcommand a page points to has its own page.
    assert!(referenced.len() >= 9, "{referenced:?}");
    let missing: Vec<_> = referenced.difference(&pages).collect();
    assert!(missing.is_empty(), "pages referenced but missing: {missing:?}");
}

#[test]
fn package_completions_parse() {
    let root = extracted();
    let share = root.0.join("usr/share");
    for name in ["ipaccessd", "ipaccessctl"] {
        let bash = share.join("bash-completion/completions").join(name);
        let bash = bash.to_str().unwrap();
        run_ok("bash", &["-n", bash]).unwrap();
        // Sourcing it registers a completion for the command.
        let registered = run_ok("bash", &["-c", &format!("source {bash} && complete -p {name}")]).unwrap();
        assert!(registered.trim().ends_with(name), "{registered}");
        let zsh = fs::read_to_string(share.join("zsh/vendor-completions").join(format!("_{name}"))).unwrap();
        assert!(zsh.starts_with(&format!("#compdef {name}")), "{zsh}");
        let fish = fs::read_to_string(share.join("fish/vendor_completions.d").join(format!("{name}.fish"))).unwrap();
        assert!(fish.contains(&format!("complete -c {name}")), "{fish}");
    }
    let bash = fs::read_to_string(share.join("bash-completion/completions/ipaccessctl")).unwrap();
    for sub in ["account", "allow", "bind", "check", "override", "activity", "stats", "status"] {
        assert!(bash.contains(sub), "bash completion lacks {sub}");
    }
}

/// The packaged configuration: what it sets, and that every commented-out setting is a real
/// key showing its real default.
#[test]
fn package_config_documents_the_defaults() {
    let root = extracted();
    let text = fs::read_to_string(root.0.join("etc/ipaccess/ipaccessd.toml")).unwrap();
    // Group ipaccess exists only where the package is installed; root's group 0 stands in.
    let text = text.replace("\"ipaccess\"", "\"root\"");
    let load = |text: &str| {
        let path = root.0.join("ipaccessd.toml");
        fs::write(&path, text).unwrap();
        Config::load(&path, true).unwrap_or_else(|e| panic!("{e}\n{text}"))
    };

    let packaged = load(&text);
    let mut expected = Config { socket_group: Some(0), ..Config::default() };
    for role in [&mut expected.roles.check, &mut expected.roles.admin, &mut expected.roles.support] {
        role.gids = [0].into();
    }
    assert_eq!(packaged, expected);

    // `#key = value` and `#[table]` are settings; `# text` is prose.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(setting) if !setting.is_empty() && !setting.starts_with([' ', '#']) => setting,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let settings = text.lines().filter(|l| l.starts_with('#') && !l.starts_with("# ") && l.len() > 1).count();
    assert!(settings >= 14, "only {settings} commented-out settings:\n{text}");
    assert_eq!(load(&uncommented), expected, "a commented-out value is not the default:\n{uncommented}");
}

#[test]
fn package_installs_into_a_throwaway_root() {
    let deb = package().to_str().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/package_install.sh");
    let scratch = TempDir::new();
    let group_before = fs::read_to_string("/etc/group").unwrap();
    let out = run_cmd(
        "unshare",
        &[
            "--mount",
            "--pid",
            "--net",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            script.to_str().unwrap(),
            scratch.0.to_str().unwrap(),
            deb,
        ],
        Duration::from_secs(180),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "install script failed ({}):\n{stdout}\n{stderr}", out.status);
    let has = |line: &str| assert!(stdout.lines().any(|l| l == line), "no `{line}` in:\n{stdout}\n{stderr}");
    let value = |prefix: &str| -> Vec<String> {
        stdout.lines().filter_map(|l| l.strip_prefix(prefix)).map(str::to_string).collect()
    };

    has("status: install ok installed");
    // A system group (below the first user gid), created once and kept through the upgrade
    // and the purge, with its members.
    let groups = value("group: ");
    assert_eq!(groups.len(), 2, "{stdout}");
    let gid: u32 = groups[0].split(':').nth(2).unwrap().parse().unwrap();
    assert!(groups[0].starts_with("ipaccess:x:") && gid < 1000, "{}", groups[0]);
    assert_eq!(groups[1], format!("ipaccess:x:{gid}:ipa-operator"));
    has("groups named ipaccess: 1");
    assert_eq!(value("after purge: group: "), [groups[1].clone()]);
    assert!(value("conffile:").iter().any(|c| c.starts_with(" /etc/ipaccess/ipaccessd.toml ")), "{stdout}");
    has("enabled: yes");

    has("socket: ipaccess 660");
    has("operator account add: ok");
    has("outsider status: refused");
    has("after stop: filter attached");
    has("config edit: kept");
    has("after remove: filter detached");
    has("after remove: binaries gone");
    has("after remove: config kept");
    has("after remove: store kept");
    has("after purge: config gone");
    has("after purge: store gone");
    has("== done");

    // This machine is untouched.
    assert_eq!(fs::read_to_string("/etc/group").unwrap(), group_before);
    assert!(!Path::new("/usr/lib/systemd/system/ipaccessd.service").exists() || is_installed_here());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(scratch.0.to_str().unwrap()), "a scratch mount is left behind");
}

/// Whether a developer really installed the package on this machine (then its files are theirs).
fn is_installed_here() -> bool {
    run_cmd("dpkg-query", &["-W", "ipaccess"], Duration::from_secs(20)).is_ok_and(|o| o.status.success())
}
