//! Builds the eBPF object (the `zt` binary of zt-ebpf) with aya-build and puts it in OUT_DIR.
//!
//! aya-build builds under OUT_DIR, and every profile and feature set has its own (clippy, build,
//! test, release): each would build `core` for the BPF target and the programs again, although
//! the object is the same (always an optimized build). So the build runs once per target
//! directory, in `<target dir>/ebpf`, under a file lock, and the object is copied from there.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // The pinned stable toolchain (rust-toolchain.toml) builds `core` for the BPF target only
    // with -Z build-std; RUSTC_BOOTSTRAP=1 allows that for the inner cargo that aya-build runs.
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let shared = shared_build_dir(&out_dir);
    fs::create_dir_all(&shared).with_context(|| format!("creating {}", shared.display()))?;
    // Two build scripts of one cargo run may build at once (say, the library for `cargo build`
    // and for a test): the second waits here, then finds the object up to date. The lock goes
    // with the file when main returns.
    let lock_path = shared.join(".lock");
    let lock = fs::File::create(&lock_path)
        .with_context(|| format!("creating {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    // aya-build takes its directory from OUT_DIR only.
    // SAFETY: still single-threaded.
    unsafe { std::env::set_var("OUT_DIR", &shared) };
    let ebpf = Package {
        name: "zt-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../zt-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom("1.98.0"))?;
    // Where OUT_DIR has no shape to share from, aya-build wrote the object in place: copying a
    // file onto itself would truncate it.
    if shared != out_dir {
        let (from, to) = (shared.join("zt"), out_dir.join("zt"));
        fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// `<target dir>/ebpf`, found from OUT_DIR (`<target dir>/[<triple>/]<profile>/build/<unit>/out`);
/// OUT_DIR itself, as aya-build would use it, if it has another shape.
fn shared_build_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.file_name() == Some("build".as_ref()))
        .and_then(|build| build.parent()?.parent())
        .map(|target| target.join("ebpf"))
        .unwrap_or_else(|| out_dir.to_owned())
}
