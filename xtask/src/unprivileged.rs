//! The unprivileged lane: zt-daemon's unit tests (routing, the pool, CONNECT and outbound
//! refusals, the in-process data path over real TLS, config, policy) run again as `nobody`, with
//! no capabilities, from a copy of the test binary in a world-readable directory. What they cover
//! is thereby proven not to need root; the root suite covers capture and namespaces.
use std::{os::unix::fs::PermissionsExt, process::Command};

use anyhow::{Context, bail};

/// The user and group the lane runs as.
const NOBODY: &str = "65534";

pub fn run() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Exactly what `cargo test --all-targets` builds (the same features), so after it nothing
    // is built again.
    let args = ["test", "--all-targets", "--no-run", "--message-format=json"];
    eprintln!("[xtask] cargo {}", args.join(" "));
    let out = Command::new(&cargo)
        .args(args)
        .current_dir(crate::workspace_root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {cargo}"))?;
    if !out.status.success() {
        bail!("building zt-daemon's unit tests failed ({})", out.status);
    }
    let binary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| {
            m["reason"] == "compiler-artifact"
                && m["profile"]["test"] == true
                && m["target"]["name"] == "zt_daemon"
                && m["target"]["kind"][0] == "lib"
        })
        .and_then(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .context("cargo named no unit-test executable for zt-daemon")?;
    // The workspace may sit where nobody cannot read (e.g. under /root).
    let dir = std::env::temp_dir().join(format!("zt-unprivileged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = run_as_nobody(&binary, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_as_nobody(binary: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    let copy = dir.join("zt-daemon-unit-tests");
    std::fs::copy(binary, &copy)
        .with_context(|| format!("copying {} to {}", binary.display(), copy.display()))?;
    for path in [dir, copy.as_path()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    eprintln!("[xtask] zt-daemon unit tests as uid {NOBODY}, no capabilities");
    let status = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(&copy)
        .current_dir(dir)
        .env("HOME", dir)
        .status()
        .context("running setpriv (util-linux)")?;
    if !status.success() {
        bail!("zt-daemon's unit tests failed without root ({status})");
    }
    Ok(())
}
