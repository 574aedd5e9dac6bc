//! What a run tells its user on the terminal, written so that a lost reader never stops it.
//!
//! `eprintln!` and `println!` panic when their stream cannot be written: a `tee` that died, a
//! closed terminal, a pipe whose reader exited (`sft train` ignores SIGPIPE, so the write fails
//! instead of killing it). A training run that panics there dies without its next checkpoint,
//! for want of a progress line. [`say!`](crate::say) and [`report!`](crate::report) drop the
//! write error instead. They are for what a run shows while it works (progress, notes,
//! warnings, its closing summary), never for a command's result (JSON, replies, logits): a
//! result that could not be written must fail the command.

use std::fmt;
use std::io::Write;

/// `eprintln!` that drops a write error (see the module).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::console::line(&mut ::std::io::stderr().lock(), ::std::format_args!($($arg)*))
    };
}

/// `println!` that drops a write error: a run's closing summary (see the module).
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {
        $crate::console::line(&mut ::std::io::stdout().lock(), ::std::format_args!($($arg)*))
    };
}

/// Writes `args` and a newline in one write, dropping any error.
pub fn line(out: &mut impl Write, args: fmt::Arguments<'_>) {
    // One write: a line never interleaves with another thread's or another rank's.
    let _ = out.write_all(format!("{args}\n").as_bytes()).and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose reader is gone.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn a_line_to_a_closed_stream_is_dropped_and_an_open_one_gets_it_whole() {
        line(&mut Closed, format_args!("step {}/{}", 1, 2));
        let mut open = Vec::new();
        line(&mut open, format_args!("step {}/{}", 1, 2));
        assert_eq!(open, b"step 1/2\n");
    }
}
