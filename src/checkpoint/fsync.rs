//! Durable writes: a checkpoint counts as saved only once its bytes and names are on disk.

use anyhow::{Context, Result};
use std::fs::File;
use std::io::Write;
use std::path::Path;

pub(super) fn fsync_file(path: &Path) -> Result<()> {
    File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", path.display()))
}

pub(super) fn fsync_dir(path: &Path) -> Result<()> {
    // Makes renames and new entries in the directory durable (POSIX).
    File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing directory {}", path.display()))
}

pub(super) fn write_file_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}
