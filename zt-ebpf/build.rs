//! Rebuilds the programs when bpf-linker changes, and fails early with a clear message when it is
//! missing (scripts/bootstrap.sh installs it).
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => panic!("bpf-linker not found ({e}); run scripts/bootstrap.sh"),
    }
}
