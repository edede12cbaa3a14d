//! Builds the XDP program (ebpf/) for the BPF target with the nightly toolchain and
//! bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! `cargo xtask setup` installs what this needs.

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "ipaccess-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
        ..Default::default()
    };
    println!("cargo:rerun-if-changed=../common/src");
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}
