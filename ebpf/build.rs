// bpf-linker is found on PATH; rebuild the program when it changes.
fn main() {
    let linker = which::which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", linker.display());
}
