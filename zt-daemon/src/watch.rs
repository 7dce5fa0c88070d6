//! Watching files that operators or controllers rewrite at runtime (trust bundles, SVID files,
//! revocation lists, policies). Editors and kubelet replace files by renaming, and cert-manager
//! swaps several at once, so a burst of events is settled into one reload.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// How long a burst of file events must go quiet before `on_change` runs.
const SETTLE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {message}")]
pub struct WatchError {
    pub path: PathBuf,
    pub message: String,
}

/// Calls `on_change` (on the tokio runtime) after each settled burst of changes under any of
/// `paths`, recursively. The watch lasts as long as the returned watcher is kept.
pub fn on_change(
    paths: &[PathBuf],
    on_change: impl Fn() + Send + 'static,
) -> Result<RecommendedWatcher, WatchError> {
    let watch_err = |path: &Path, e: notify::Error| WatchError {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let first = paths.first().map_or(Path::new("/"), PathBuf::as_path);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .map_err(|e| watch_err(first, e))?;
    for path in paths {
        watcher
            .watch(path, RecursiveMode::Recursive)
            .map_err(|e| watch_err(path, e))?;
    }
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            tokio::time::sleep(SETTLE).await;
            while rx.try_recv().is_ok() {}
            on_change();
        }
    });
    Ok(watcher)
}
