//! Whether two paths name one file: the commands that must not write over their own input, or
//! that compare a recorded directory with the one given, ask the same question.

use std::path::Path;

/// Whether `a` and `b` name one file or directory: the same path, or (both existing) the same
/// device and inode, so that another spelling, a symbolic link or a hard link is caught too.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    a == b
        || matches!((std::fs::metadata(a), std::fs::metadata(b)),
            (Ok(x), Ok(y)) if (x.dev(), x.ino()) == (y.dev(), y.ino()))
}
