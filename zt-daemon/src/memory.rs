//! Giving freed memory back to the system. glibc's malloc keeps the pages that ended connections
//! freed in its per-thread arenas, so after a burst of thousands of connections the agent would
//! hold its peak RSS for good. A trim every few seconds returns them (`cargo xtask soak` checks
//! that the agent comes back to its starting RSS).
use std::time::Duration;

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
