//! One writer per output directory: `sft prepare`, `sft train` and the writers of a checkpoint
//! directory (`init`, `import`, `merge`, `export`) lock a file beside the directory they write
//! (`<dir>.prepare-lock`, `<dir>.train-lock`, `<dir>.write-lock`) for as long as they write it,
//! so that a second command into the same directory is refused with the holder's process id
//! instead of taking its temporary directory for a crash's leftovers (prepare, the checkpoint
//! writers) or interleaving two runs' log rows and checkpoints (train).
//!
//! The lock is an advisory `flock` on the open file: the kernel drops it with the process, so a
//! killed command leaves no lock held, only perhaps the file, which the next holder takes over.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `dir`'s sibling `<name>.<suffix>`. A `dir` without a final name (`.`, `runs/..`) is resolved
/// first.
pub fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let dir = if dir.file_name().is_none() {
        std::fs::canonicalize(dir).with_context(|| format!("{}: cannot resolve", dir.display()))?
    } else {
        dir.to_path_buf()
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{}: not a usable output directory name", dir.display()))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!("{name}.{suffix}")))
}

/// A held lock; dropping it removes the file and lets go.
#[derive(Debug)]
pub struct DirLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock at `path` (created if missing, with its parent directories: the holder is
    /// about to write there; its content becomes this process's id), or fails when another
    /// process holds it: `what` names the directory as the user gave it (`--out-dir runs/sft`),
    /// `command` the kind of holder (`sft train`). The parent is resolved, so that every
    /// spelling of one directory (through a symbolic link, say) finds the same lock.
    pub fn acquire(path: PathBuf, what: &str, command: &str) -> Result<Self> {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        let parent =
            std::fs::canonicalize(parent).with_context(|| format!("{}: cannot resolve", parent.display()))?;
        let path =
            parent.join(path.file_name().with_context(|| format!("{}: no file name", path.display()))?);
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("{}: cannot create the lock of {what}", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    let holder = holder.trim();
                    let who = if holder.is_empty() { String::new() } else { format!(" (process {holder})") };
                    bail!(
                        "{what}: another {command}{who} is writing it; wait for it to finish (its lock: {})",
                        path.display()
                    );
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("{}: cannot lock", path.display()))
                }
            }
            // The holder before us removes the file before it lets go: a lock taken on a file
            // already unlinked (or replaced) guards nothing, so open the path again.
            let (held, now) = (file.metadata()?, std::fs::metadata(&path));
            if now.is_ok_and(|m| m.dev() == held.dev() && m.ino() == held.ino()) {
                file.set_len(0)?;
                write!(file, "{}", std::process::id())?;
                return Ok(DirLock { path, _file: file });
            }
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        // Removed while still locked (the file closes after this), so that a later command
        // never locks a path this one is about to remove.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::{sibling, DirLock};

    /// A second holder is refused while the first holds the lock (flock conflicts between two
    /// opens, in one process as between two), naming the holder; the file goes with the
    /// holder, and the next one takes it.
    #[test]
    fn a_second_writer_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let lock_path = sibling(&dir.path().join("prep"), "prepare-lock").unwrap();
        assert_eq!(lock_path, dir.path().join("prep.prepare-lock"));
        let take = || DirLock::acquire(lock_path.clone(), "--out prep", "sft prepare");
        let first = take().unwrap();
        assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), std::process::id().to_string());
        let err = format!("{:#}", take().expect_err("refused while held"));
        assert!(
            err.starts_with("--out prep: another sft prepare") && err.contains("wait for it to finish"),
            "{err}"
        );
        assert!(err.contains(&format!("(process {})", std::process::id())), "{err}");
        drop(first);
        assert!(!lock_path.exists(), "the holder removes its lock file");
        // A lock file left by a killed holder (no lock held on it) does not stop the next one.
        std::fs::write(&lock_path, "12345").unwrap();
        let next = take().unwrap();
        assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), std::process::id().to_string());
        drop(next);
        // Another directory has a lock of its own.
        let _a = take().unwrap();
        let _b =
            DirLock::acquire(sibling(&dir.path().join("other"), "prepare-lock").unwrap(), "b", "c").unwrap();
    }

    #[test]
    fn a_directory_without_a_final_name_is_resolved_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let got = sibling(&dir.path().join("run").join(".."), "train-lock").unwrap();
        let resolved = std::fs::canonicalize(dir.path()).unwrap();
        let name = resolved.file_name().unwrap().to_str().unwrap();
        assert_eq!(got, resolved.parent().unwrap().join(format!("{name}.train-lock")));
    }
}
