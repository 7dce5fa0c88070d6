//! Giving freed memory back to the system. glibc's malloc keeps the pages that ended connections
//! freed in its per-thread arenas, so after a burst of thousands of connections the agent would
//! hold its peak RSS for good. A trim every few seconds returns them (`cargo xtask soak` checks
//! that the agent comes back to its starting RSS).
//!
//! A trim cannot reach glibc's per-thread caches (tcache): each worker thread keeps up to seven
//! freed chunks of every small size, and after a burst those few hundred chunks sit on as many
//! different pages (about 2 MB more RSS per agent after 10 000 connections, for good). The cache
//! is a start-up tunable, so the agent re-executes itself once with it turned off.

use std::time::Duration;

/// The glibc tunable that turns off the per-thread caches.
const NO_TCACHE: &str = "glibc.malloc.tcache_count=0";

/// Re-executes the agent with [`NO_TCACHE`] added to `GLIBC_TUNABLES`, unless it is already set
/// (an operator's own `tcache_count` wins). Returns only when no re-execution was needed (None)
/// or it failed (the error; the agent then runs with the caches).
#[cfg(target_env = "gnu")]
pub fn reexec_without_thread_caches() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt as _;
    let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    if current.contains("glibc.malloc.tcache_count") {
        return None;
    }
    let tunables = if current.is_empty() {
        NO_TCACHE.to_owned()
    } else {
        format!("{current}:{NO_TCACHE}")
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    // exec only returns on failure.
    Some(cmd.args(args).env("GLIBC_TUNABLES", tunables).exec())
}

#[cfg(not(target_env = "gnu"))]
pub fn reexec_without_thread_caches() -> Option<std::io::Error> {
    None
}

/// How often freed memory is returned.
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// Runs for the life of the agent.
pub async fn return_freed_memory() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Trimming takes the arenas' locks and madvise()s free pages: off the async workers.
        let _ = tokio::task::spawn_blocking(trim).await;
    }
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; 0 keeps no extra padding at the heap top.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}
