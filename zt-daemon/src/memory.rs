//! Giving freed memory back to the system. glibc's malloc keeps the pages that ended connections
//! freed in its per-thread arenas, so after a burst of thousands of connections the agent would
//! hold its peak RSS for good. A trim every few seconds returns them (`cargo xtask soak` checks
//! that the agent comes back to its starting RSS).
//!
//! A trim cannot reach glibc's per-thread caches (tcache): each worker thread keeps up to seven
//! freed chunks of every small size, and after a burst those few hundred chunks sit on as many
//! different pages (about 2 MB more RSS per agent after 10 000 connections, for good). The cache
//! is a start-up tunable, so the agent re-executes itself once with it turned off.
//!
//! The same re-execution keeps a few MiB free at the top of each heap between those trims. By
//! default glibc gives memory back as soon as 128 KiB are free at the top, and a bulk transfer's
//! receiving agent frees and takes a buffer of about one HTTP/2 frame per frame: each new one
//! landed on fresh pages, a page fault and a page clear per 4 KiB (10% of its CPU per GiB,
//! BENCHMARKS.md "Per-byte CPU"). Setting the trim threshold turns off glibc's adaptive mmap
//! threshold, so that one is set too, or frames above 128 KiB would be mapped and unmapped.

use std::time::Duration;

/// The glibc tunables the agent runs with: no per-thread caches; up to 4 MiB free at a heap's
/// top before free() returns it (the periodic trim still does); allocations below 4 MiB from
/// the heap. Each with the older variable that sets it too, if there is one.
const TUNABLES: [(&str, &str, Option<&str>); 3] = [
    ("glibc.malloc.tcache_count", "0", None),
    (
        "glibc.malloc.trim_threshold",
        "4194304",
        Some("MALLOC_TRIM_THRESHOLD_"),
    ),
    (
        "glibc.malloc.mmap_threshold",
        "4194304",
        Some("MALLOC_MMAP_THRESHOLD_"),
    ),
];

/// Set in the re-executed agent's environment: it re-executes once, whatever glibc did with
/// the tunables (a secure-mode process has them removed).
const REEXECUTED: &str = "ZT_MALLOC_TUNABLES_SET";

/// `current` (a `GLIBC_TUNABLES` value) with each of [`TUNABLES`] the operator did not set
/// appended, or None when they set them all: an operator's own value wins, in `current` or in
/// the older variable (`legacy_set` says which of those are set).
#[cfg_attr(not(target_env = "gnu"), allow(dead_code))]
fn with_agent_tunables(current: &str, legacy_set: impl Fn(&str) -> bool) -> Option<String> {
    // glibc ignores an empty value: that is not the operator's choice.
    let set: Vec<&str> = current
        .split(':')
        .filter_map(|t| t.split_once('='))
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, _)| name)
        .collect();
    let missing: Vec<String> = TUNABLES
        .iter()
        .filter(|(name, _, legacy)| !set.contains(name) && !legacy.is_some_and(&legacy_set))
        .map(|(name, value, _)| format!("{name}={value}"))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let added = missing.join(":");
    Some(if current.is_empty() {
        added
    } else {
        format!("{current}:{added}")
    })
}

/// Re-executes the agent with [`TUNABLES`] added to `GLIBC_TUNABLES`, unless they are all set
/// already, this is the re-executed agent, or glibc would ignore them (secure mode: setuid or
/// file capabilities). Returns only when no re-execution was needed (None) or it failed (the
/// error; the agent then runs with glibc's defaults). Call it before any thread starts.
#[cfg(target_env = "gnu")]
pub fn reexec_with_malloc_tunables() -> Option<std::io::Error> {
    use std::os::unix::process::CommandExt as _;
    if std::env::var_os(REEXECUTED).is_some() {
        // SAFETY: single-threaded (the caller runs before any thread starts).
        unsafe { std::env::remove_var(REEXECUTED) };
        return None;
    }
    // SAFETY: getauxval has no preconditions.
    if unsafe { libc::getauxval(libc::AT_SECURE) } != 0 {
        return None;
    }
    // Not UTF-8: leave the operator's value alone rather than replace it.
    let current = match std::env::var("GLIBC_TUNABLES") {
        Ok(value) => value,
        Err(std::env::VarError::NotPresent) => String::new(),
        Err(std::env::VarError::NotUnicode(_)) => return None,
    };
    let tunables = with_agent_tunables(&current, |name| std::env::var_os(name).is_some())?;
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args)
        .env("GLIBC_TUNABLES", tunables)
        .env(REEXECUTED, "1");
    // exec only returns on failure.
    Some(cmd.exec())
}

#[cfg(not(target_env = "gnu"))]
pub fn reexec_with_malloc_tunables() -> Option<std::io::Error> {
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

#[cfg(test)]
mod tests {
    use super::with_agent_tunables;

    #[test]
    fn the_agent_adds_only_the_tunables_the_operator_did_not_set() {
        let none = |_: &str| false;
        let all = "glibc.malloc.tcache_count=0:glibc.malloc.trim_threshold=4194304:glibc.malloc.mmap_threshold=4194304";
        assert_eq!(with_agent_tunables("", none).as_deref(), Some(all));
        // After the re-execution: nothing more to add.
        assert_eq!(with_agent_tunables(all, none), None);
        assert_eq!(
            with_agent_tunables(
                "glibc.malloc.trim_threshold=65536:glibc.malloc.arena_max=2",
                none
            )
            .as_deref(),
            Some(
                "glibc.malloc.trim_threshold=65536:glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=4194304"
            )
        );
        // An empty value, a stray separator or an entry without `=` sets nothing.
        assert_eq!(
            with_agent_tunables("glibc.malloc.tcache_count=::junk", none).as_deref(),
            Some(
                "glibc.malloc.tcache_count=::junk:glibc.malloc.tcache_count=0:glibc.malloc.trim_threshold=4194304:glibc.malloc.mmap_threshold=4194304"
            )
        );
        // MALLOC_TRIM_THRESHOLD_ and MALLOC_MMAP_THRESHOLD_ are the operator's too.
        assert_eq!(
            with_agent_tunables("", |name| name == "MALLOC_MMAP_THRESHOLD_").as_deref(),
            Some("glibc.malloc.tcache_count=0:glibc.malloc.trim_threshold=4194304")
        );
    }
}
