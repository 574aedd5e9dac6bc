//! A panic inside a library, as an error.
//!
//! Some libraries panic on input they should refuse: the tokenizers library on some tokenizer
//! files, minijinja on some template expressions, the Parquet reader on some files (each found
//! by a fuzz test). The input is the user's data, so that is an error naming the file, and the
//! default hook's "thread panicked" line on stderr above it would only look like a crash.

use std::cell::{Cell, RefCell};

thread_local! {
    /// Set while this thread is inside [`catch`]: its panics are expected and come back as
    /// errors, so the hook keeps quiet about them and records where they happened.
    static QUIET: Cell<bool> = const { Cell::new(false) };
    static AT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A caught panic: its message, and where it happened when the hook saw it.
#[derive(Debug, PartialEq)]
pub struct Panic {
    pub message: String,
    /// `<file>:<line>`, the file from its crate's directory on.
    pub place: Option<String>,
}

impl std::fmt::Display for Panic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.place {
            Some(at) => write!(f, "{} (at {at})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Runs `call`, turning a panic inside it into an `Err` holding its message and place
/// (displayed `<message> (at <file>:<line>)`), without the hook's line on stderr.
///
/// The hook is process-wide, so it is wrapped once and defers to the previous one for every
/// panic outside a `catch`: other threads (a library's own worker threads included) and other
/// code are reported as before; only this thread's, inside `call`, are silenced.
pub fn catch<T>(call: impl FnOnce() -> T) -> Result<T, Panic> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) {
                let at = info.location().map(|l| format!("{}:{}", crate_path(l.file()), l.line()));
                AT.with(|p| *p.borrow_mut() = at);
            } else {
                previous(info)
            }
        }));
    });
    let was_quiet = QUIET.with(|q| q.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(call));
    QUIET.with(|q| q.set(was_quiet));
    result.map_err(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("a panic without a message");
        Panic { message: message.to_string(), place: AT.with(|p| p.borrow_mut().take()) }
    })
}

/// A source path from Cargo's registry from the crate's directory on (`tokenizers-0.22.2/src/…`):
/// the registry's own directories say nothing to the reader.
fn crate_path(file: &str) -> &str {
    match file.split_once("/registry/src/") {
        Some((_, index_and_crate)) => index_and_crate.split_once('/').map_or(index_and_crate, |(_, c)| c),
        None => file,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_comes_back_with_its_message_and_place() {
        let err = catch(|| -> u32 { panic!("bad input {}", 7) }).unwrap_err().to_string();
        assert!(err.starts_with("bad input 7 (at ") && err.contains("panics.rs:"), "{err}");
        assert_eq!(catch(|| 3), Ok(3));
        // Nested: the inner panic is caught by the inner call, and the outer one still quiets.
        let outer = catch(|| {
            let inner = catch(|| -> () { panic!("inner") }).unwrap_err();
            assert_eq!(inner.message, "inner");
            panic!("outer")
        })
        .unwrap_err();
        assert_eq!(outer.message, "outer");
        assert!(outer.place.as_ref().is_some_and(|at| at.starts_with("src/panics.rs:")), "{outer:?}");
        assert!(!QUIET.with(Cell::get));
        assert_eq!(
            crate_path(
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/minijinja-2.24.0/src/lib.rs"
            ),
            "minijinja-2.24.0/src/lib.rs"
        );
        assert_eq!(crate_path("src/panics.rs"), "src/panics.rs");
    }
}
