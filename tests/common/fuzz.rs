//! What the fuzz tests share: their time budget and seed from the environment, quiet panics that
//! are kept for the report, and editing a JSON value at a path.

use serde_json::Value;
use std::sync::Mutex;

/// `SFT_FUZZ_SECONDS`, or `default`.
pub fn seconds(default: f64) -> f64 {
    std::env::var("SFT_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// `SFT_FUZZ_SEED`, or one from the clock (printed, with the budget, so that a failure replays).
pub fn seed(seconds: f64) -> u64 {
    let seed = std::env::var("SFT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("fuzz seed {seed} (replay with SFT_FUZZ_SEED={seed}), {seconds} s of random inputs");
    seed
}

static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// While it lives, panics print nothing; the last one's place and message are kept for
/// [`QuietPanics::last`]. Dropping it restores the previous hook.
pub struct QuietPanics {
    previous: Option<PanicHook>,
}

type PanicHook = Box<dyn Fn(&std::panic::PanicHookInfo<'_>) + Sync + Send + 'static>;

impl QuietPanics {
    pub fn install() -> Self {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|info| *LAST_PANIC.lock().unwrap() = info.to_string()));
        QuietPanics { previous: Some(previous) }
    }

    /// Where the last panic happened, and its message.
    pub fn last() -> String {
        LAST_PANIC.lock().unwrap().clone()
    }
}

impl Drop for QuietPanics {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            std::panic::set_hook(previous);
        }
    }
}

/// Every node of `v` by its path of object keys and array indices.
pub fn paths(v: &Value) -> Vec<Vec<Value>> {
    fn walk(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
        let children: Vec<(Value, &Value)> = match v {
            Value::Object(m) => m.iter().map(|(k, c)| (k.clone().into(), c)).collect(),
            Value::Array(a) => a.iter().enumerate().map(|(i, c)| (i.into(), c)).collect(),
            _ => return,
        };
        for (key, child) in children {
            prefix.push(key);
            out.push(prefix.clone());
            walk(child, prefix, out);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

/// Sets the node at `path` (object keys and array indices) to `value`, or removes it; a path
/// whose parents an earlier edit replaced sets nothing.
pub fn set(json: &mut Value, path: &[Value], value: Option<Value>) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut node = json;
    for key in parents {
        let child = match key {
            Value::String(k) => node.get_mut(k.as_str()),
            _ => node.get_mut(key.as_u64().unwrap() as usize),
        };
        match child {
            Some(c) => node = c,
            None => return,
        }
    }
    match (node, last, value) {
        (Value::Object(m), Value::String(k), Some(v)) => {
            m.insert(k.clone(), v);
        }
        (Value::Object(m), Value::String(k), None) => {
            m.remove(k);
        }
        (Value::Array(a), Value::Number(i), v) => {
            let i = i.as_u64().unwrap() as usize;
            match v {
                Some(v) if i < a.len() => a[i] = v,
                None if i < a.len() => {
                    a.remove(i);
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// A byte-level edit of JSON text: a cut, a duplicated piece, or one byte overwritten with a
/// character of JSON's syntax. Returns where it happened.
pub fn edit_json_text(rng: &mut sft::rng::Rng, bytes: &mut Vec<u8>) -> usize {
    let at = rng.below(bytes.len());
    match rng.below(3) {
        0 => bytes.truncate(at),
        1 => {
            let piece = bytes[at..(at + 8).min(bytes.len())].to_vec();
            bytes.splice(at..at, piece);
        }
        _ => bytes[at] = b"0123456789-.e,:{}[]\" "[rng.below(21)],
    }
    at
}

/// `path` written for a failure report: `a.b.3`.
pub fn show(path: &[Value]) -> String {
    path.iter()
        .map(|k| k.as_str().map_or_else(|| k.to_string(), str::to_string))
        .collect::<Vec<_>>()
        .join(".")
}

/// The outcomes of a fuzz run: every input must end in `Ok` or in an error that names what it
/// is about (a file or directory); a panic, or an error naming nothing, is a failure.
#[derive(Default)]
pub struct Tally {
    pub inputs: usize,
    pub ok: usize,
    pub errors: usize,
    pub failures: Vec<String>,
}

impl Tally {
    /// Runs `f` on input `what`; an error must contain `names`. Returns `f`'s value when it
    /// succeeded, for the caller's own checks.
    pub fn run<T>(&mut self, what: &str, names: &str, f: impl FnOnce() -> anyhow::Result<T>) -> Option<T> {
        self.inputs += 1;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(Ok(value)) => {
                self.ok += 1;
                Some(value)
            }
            Ok(Err(e)) => {
                self.errors += 1;
                let msg = format!("{e:#}");
                if !msg.contains(names) {
                    self.failures.push(format!("{what}: an error naming no file: {msg}"));
                }
                None
            }
            Err(_) => {
                self.failures.push(format!("{what}: {}", QuietPanics::last()));
                None
            }
        }
    }

    /// Fails the test with every failure and the seed that replays them.
    pub fn assert_clean(&self, seed: u64) {
        assert!(
            self.failures.is_empty(),
            "seed {seed}: {} failures:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}
