//! What the fuzz tests share: their time budget and seed from the environment, the tally of
//! outcomes (an input's panic caught quietly, for the report), editing a JSON value at a path,
//! and damaging a safetensors file.

use serde_json::{json, Value};
use sft::rng::Rng;

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
    edit_text(rng, bytes, b"0123456789-.e,:{}[]\" ")
}

/// A byte-level edit of text: a cut, a duplicated piece, or one byte overwritten with one of
/// `alphabet` (the characters of the format's syntax). Returns where it happened.
pub fn edit_text(rng: &mut sft::rng::Rng, bytes: &mut Vec<u8>, alphabet: &[u8]) -> usize {
    if bytes.is_empty() {
        return 0;
    }
    let at = rng.below(bytes.len());
    match rng.below(3) {
        0 => bytes.truncate(at),
        1 => {
            let piece = bytes[at..(at + 8).min(bytes.len())].to_vec();
            bytes.splice(at..at, piece);
        }
        _ => bytes[at] = alphabet[rng.below(alphabet.len())],
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
        // sft's own catch: the input's panic comes back with its place, without the hook's
        // line, while every other panic (a failed test's report included) prints as usual.
        match sft::panics::catch(f) {
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
            Err(panic) => {
                self.failures.push(format!("{what}: a panic: {panic}"));
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

/// Values a field is set to, besides removing it.
pub fn special_values() -> Vec<Value> {
    vec![
        json!(0),
        json!(-1),
        json!(1),
        json!(7),
        json!(0.5),
        json!(-0.5),
        json!(1e30),
        json!(-1e30),
        json!(u64::MAX),
        json!(1u64 << 40),
        json!(i64::MIN),
        json!("NaN"),
        json!(""),
        json!("dynamic"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!([1, 2]),
    ]
}

/// A safetensors file split into its header (JSON) and its data.
pub fn split_safetensors(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// The file of `header` and `data`, the header padded with spaces to a multiple of 8 as the
/// format asks.
pub fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

/// What was done to a file, and whether it must be refused: a change to the bytes of a tensor
/// never loads as if nothing happened.
pub struct Damage {
    pub what: String,
    pub must_fail: bool,
}

impl Damage {
    pub fn may(what: String) -> Self {
        Damage { what, must_fail: false }
    }
}

/// Damages one safetensors file of `bytes` in one of a dozen ways. A flipped data byte is marked
/// `must_fail`: in a file that records its checksums, sft's own, that is what it must refuse.
pub fn damage_safetensors(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, Damage) {
    let (mut header, data) = split_safetensors(bytes);
    let header_end = bytes.len() - data.len();
    let names: Vec<String> =
        header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    let name = names[rng.below(names.len())].clone();
    let entry = &mut header[&name];
    let kind = rng.below(14);
    let what = match kind {
        0 => {
            let dtypes = ["F32", "BF16", "F16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX"];
            let d = dtypes[rng.below(dtypes.len())];
            entry["dtype"] = json!(d);
            format!("{name}: dtype {d}")
        }
        1 => {
            let mut shape: Vec<Value> = entry["shape"].as_array().unwrap().clone();
            match rng.below(5) {
                0 => shape.push(json!(1)),
                1 => {
                    shape.pop();
                }
                2 if !shape.is_empty() => {
                    let i = rng.below(shape.len());
                    shape[i] = [json!(0), json!(1), json!(u64::MAX), json!(1u64 << 33), json!(-1)]
                        [rng.below(5)]
                    .clone();
                }
                3 => shape.reverse(),
                _ => shape.clear(),
            }
            let text = format!("{name}: shape {shape:?}");
            entry["shape"] = Value::Array(shape);
            text
        }
        2 => {
            let o: Vec<u64> =
                entry["data_offsets"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
            let (a, b) = (o[0], o[1]);
            let new = match rng.below(6) {
                0 => json!([b, a]),
                1 => json!([a, b + 4]),
                2 => json!([a + 4, b + 4]),
                3 => json!([0, u64::MAX]),
                4 => json!([u64::MAX - 1, u64::MAX]),
                _ => json!(["x", a]),
            };
            let text = format!("{name}: data_offsets {new}");
            entry["data_offsets"] = new;
            text
        }
        3 => {
            header.as_object_mut().unwrap().remove(&name);
            format!("{name} removed from the header")
        }
        4 => {
            let other = names[rng.below(names.len())].clone();
            let v = header.as_object_mut().unwrap().remove(&name).unwrap();
            let new = if other == name { format!("{name}.x") } else { other };
            header.as_object_mut().unwrap().insert(new.clone(), v);
            format!("{name} renamed {new}")
        }
        5 => {
            let v = special_values()[rng.below(special_values().len())].clone();
            *entry = v.clone();
            format!("{name}'s entry = {v}")
        }
        6 => {
            let meta = header.as_object_mut().unwrap().entry("__metadata__").or_insert(json!({}));
            let text = match (meta.as_object_mut(), rng.below(3)) {
                (Some(m), 0) if !m.is_empty() => {
                    // A recorded value (a checksum, where there is one) edited by one character.
                    let keys: Vec<String> = m.keys().cloned().collect();
                    let k = keys[rng.below(keys.len())].clone();
                    let mut v = m[&k].as_str().unwrap_or("0").to_string();
                    let at = rng.below(v.len().max(1));
                    v.replace_range(
                        at..(at + 1).min(v.len()),
                        if v.get(at..at + 1) == Some("f") { "e" } else { "f" },
                    );
                    m.insert(k.clone(), json!(v));
                    format!("metadata {k} = {v:?}")
                }
                (Some(m), 1) => {
                    m.insert("sft.x".into(), json!(3));
                    "metadata holding a number".into()
                }
                _ => {
                    *meta = json!("not a map");
                    "metadata a string".into()
                }
            };
            text
        }
        7 => {
            let n = (header_end - 8) as u64;
            let new = [0, n - 1, n + 8, n - 8, u64::MAX, 1 << 40, bytes.len() as u64][rng.below(7)];
            let mut out = bytes.to_vec();
            out[..8].copy_from_slice(&new.to_le_bytes());
            return (out, Damage::may(format!("length prefix {n} → {new}")));
        }
        8 => {
            let at = 8 + rng.below(header_end - 8);
            let mut out = bytes.to_vec();
            out[at] ^= 1 << rng.below(8);
            return (out, Damage::may(format!("header byte {at} flipped")));
        }
        9 | 10 if !data.is_empty() => {
            let at = header_end + rng.below(data.len());
            let mut out = bytes.to_vec();
            out[at] ^= 1 << rng.below(8);
            return (out, Damage { what: format!("data byte {at} flipped"), must_fail: true });
        }
        11 => {
            let at = rng.below(bytes.len());
            return (bytes[..at].to_vec(), Damage::may(format!("cut at byte {at} of {}", bytes.len())));
        }
        12 => {
            let mut out = bytes.to_vec();
            out.extend((0..1 + rng.below(64)).map(|_| rng.below(256) as u8));
            return (out, Damage::may("bytes appended".into()));
        }
        _ => return (Vec::new(), Damage::may("emptied".into())),
    };
    (join_safetensors(&header, &data), Damage::may(what))
}
