//! Builds the eBPF object (the `zt` binary of zt-ebpf) with aya-build, into OUT_DIR.
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The pinned stable toolchain (rust-toolchain.toml) builds `core` for the BPF target only
    // with -Z build-std; RUSTC_BOOTSTRAP=1 allows that for the inner cargo that aya-build runs.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let ebpf = Package {
        name: "zt-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../zt-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom("1.98.0"))
}
