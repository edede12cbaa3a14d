// Code generation options for bpf-linker, which turns the crate's bitcode into BPF:
// misaligned loads let a 4- or 8-byte header field be one load instead of a byte-by-byte
// assembly. The verifier accepts unaligned packet reads on architectures that handle them
// efficiently (x86-64, arm64), which is where ipaccess runs.
fn main() {
    let linker = which::which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", linker.display());
    println!("cargo:rustc-link-arg-bins=--cpu-features=+allows-misaligned-mem-access");
}
