//! Watching files that operators or controllers rewrite at runtime (the node config, trust
//! bundles, SVID files, revocation lists, policies). Editors and kubelet replace files by
//! renaming, and cert-manager swaps several at once, so a burst of events is settled into one
//! call.
//!
//! Only events that can change content count: creation, removal, renaming, data writes. Opening
//! and reading a file do not, so the reload that reads the files never triggers itself (it did:
//! every reload re-armed the watcher, forever), and neither do `touch` or chmod. A watched file is
//! watched through its directory (renames replace it), and only events about that file, or about
//! kubelet's `..data` swap next to it, count: an agent logging into the same directory is not a
//! change. Callers still compare content before acting: a rewrite with the same bytes is no change.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{
    EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, ModifyKind},
};
use tokio::sync::mpsc;

/// How long after the first event of a burst `on_change` runs (later events of the burst are
/// folded into that call).
const SETTLE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
#[error("watching {path}: {message}")]
pub struct WatchError {
    pub path: PathBuf,
    pub message: String,
}

/// What one watched path covers: a directory with everything under it, or a single file (seen
/// through its directory).
#[derive(Debug, Clone)]
struct Target {
    /// What is handed to inotify.
    watched: PathBuf,
    /// `Some(file)`: only events about that file, or kubelet's `..*` entries beside it, count.
    file: Option<PathBuf>,
}

impl Target {
    fn new(path: &Path) -> Self {
        if path.is_dir() {
            return Self {
                watched: path.to_owned(),
                file: None,
            };
        }
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Self {
            watched: parent.to_owned(),
            file: Some(path.to_owned()),
        }
    }

    fn covers(&self, path: &Path) -> bool {
        match &self.file {
            None => path.starts_with(&self.watched),
            Some(file) => {
                path == file
                    || (path.parent() == Some(&self.watched)
                        && path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("..")))
            }
        }
    }
}

/// Whether an event of this kind can mean different content. `Other` includes the rescan
/// notify asks for after an inotify queue overflow, when anything may have changed.
pub fn may_change_content(kind: &EventKind) -> bool {
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Other => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any => false,
    }
}

/// Calls `on_change` (on the tokio runtime) after each settled burst of content changes to any of
/// `paths` (directories recursively, files through their directory). The watch lasts as long as
/// the returned watcher is kept. A path that does not exist yet is watched through its parent.
pub fn on_change(
    paths: &[PathBuf],
    on_change: impl Fn() + Send + 'static,
) -> Result<RecommendedWatcher, WatchError> {
    let watch_err = |path: &Path, e: notify::Error| WatchError {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let targets: Vec<Target> = paths.iter().map(|p| Target::new(p)).collect();
    let first = paths.first().map_or(Path::new("/"), PathBuf::as_path);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let covered = targets.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let relevant = may_change_content(&event.kind)
            && (event.paths.is_empty()
                || event
                    .paths
                    .iter()
                    .any(|p| covered.iter().any(|t| t.covers(p))));
        if relevant {
            let _ = tx.send(());
        }
    })
    .map_err(|e| watch_err(first, e))?;
    for target in &targets {
        let mode = match target.file {
            Some(_) => RecursiveMode::NonRecursive,
            None => RecursiveMode::Recursive,
        };
        watcher
            .watch(&target.watched, mode)
            .map_err(|e| watch_err(&target.watched, e))?;
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

#[cfg(test)]
mod tests {
    use notify::event::{CreateKind, DataChange, MetadataKind, RemoveKind, RenameMode};

    use super::*;

    #[test]
    fn only_content_changes_count() {
        for (kind, counts) in [
            (EventKind::Access(AccessKind::Open(AccessMode::Any)), false),
            (EventKind::Access(AccessKind::Read), false),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Read)),
                false,
            ),
            (
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                true,
            ),
            (
                EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                false,
            ),
            (EventKind::Modify(ModifyKind::Data(DataChange::Any)), true),
            (EventKind::Modify(ModifyKind::Name(RenameMode::To)), true),
            (EventKind::Create(CreateKind::File), true),
            (EventKind::Remove(RemoveKind::File), true),
            (EventKind::Other, true),
            (EventKind::Any, false),
        ] {
            assert_eq!(may_change_content(&kind), counts, "{kind:?}");
        }
    }

    #[test]
    fn a_file_target_covers_the_file_and_kubelets_swap_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        let t = Target::new(&file);
        assert_eq!(t.watched, dir.path());
        assert!(t.covers(&file));
        assert!(t.covers(&dir.path().join("..data")));
        assert!(t.covers(&dir.path().join("..2026_01_01_00_00_00.123")));
        assert!(!t.covers(&dir.path().join("agent.log")));
        assert!(!t.covers(&dir.path().join("node.toml.tmp")));
        assert!(!t.covers(&dir.path().join("sub/..data")));
        let d = Target::new(dir.path());
        assert!(d.covers(&dir.path().join("ns/sa/tls.crt")));
        assert!(!d.covers(Path::new("/elsewhere")));
    }
}
