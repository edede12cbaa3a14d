//! Loads the real program against a private bpffs and runs one packet through it.
use std::{net::Ipv4Addr, path::PathBuf, process::Command};

use aya::programs::{TestRun, TestRunOptions};
use ipaccess::{
    datapath::{BindTarget, Binding, Datapath, DatapathOptions},
    protocol::Mode,
};
use ipaccess_common::NEVER_EXPIRES;

fn frame(src: Ipv4Addr, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[12] = 0x08;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&40u16.to_be_bytes());
    f[23] = 6;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f
}

#[test]
fn smoke() {
    let dir = TempDir::new();
    let path = dir.0.display().to_string();
    assert!(Command::new("mount").args(["-t", "bpf", "bpf", &path]).status().unwrap().success());
    let result = std::panic::catch_unwind(|| {
        let options = DatapathOptions { bpffs: dir.0.clone(), slots: 1 << 12, accounts: 64 };
        let mut dp = Datapath::open(&options).expect("open");
        let server = Ipv4Addr::new(198, 18, 0, 1);
        dp.set_bindings(&[Binding {
            addr: server.into(),
            target: BindTarget::Port { protocol: 6, port: 443 },
            account: 1,
        }])
        .unwrap();
        dp.set_policy(1, Mode::Enforce, false).unwrap();
        dp.set_allowlist(1, &[("198.18.0.0/24".parse().unwrap(), NEVER_EXPIRES)]).unwrap();
        let run = |f: &[u8]| {
            dp.program().test_run(TestRunOptions { data_in: Some(f), ..Default::default() }).unwrap().return_value
        };
        assert_eq!(run(&frame(Ipv4Addr::new(198, 18, 0, 9), server, 443)), 2, "allowed passes");
        assert_eq!(run(&frame(Ipv4Addr::new(198, 18, 1, 9), server, 443)), 1, "disallowed drops");
        assert_eq!(run(&frame(Ipv4Addr::new(198, 18, 1, 9), server, 80)), 2, "unbound passes");
    });
    assert!(Command::new("umount").arg(&path).status().unwrap().success());
    result.unwrap();
    drop(dir);
    assert!(!std::path::Path::new(&path).exists(), "{path} is left behind");
}

/// The bpffs mount point, removed when the test ends (also when it fails after unmounting).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("ipaccess-smoke-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // An empty directory only: if the unmount failed, nothing under the mount is touched.
        let _ = std::fs::remove_dir(&self.0);
    }
}
