//! Chat files: a JSON list, JSON Lines or Parquet (as Hugging Face `datasets` writes them), whose
//! records [`super::sources`] maps to [`Conversation`]s.
//!
//! JSON records are parsed one at a time from a memory map (streaming), so a file never needs
//! more than about its own size of memory; Parquet rows are read one at a time through the
//! `parquet` crate's row API and seen as JSON. Each record is validated with errors that name
//! the file, the example (row) index and the field.

use std::fmt;
use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use parquet::file::reader::{FileReader, SerializedFileReader};
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::Value;

use super::sources::parse_record;

/// SimpleLLaMA's default system prompt, used where a record says `"Template": ["CUSTOM"]` or
/// where a `messages`/`conversations` record has no system message.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are Simple LLaMA, a helpful and factual assistant. Answer clearly, \
stay on topic, and use context from the conversation. If something is unclear or risky, point it out briefly. \
Avoid making things up or giving unsupported claims. Be concise, useful, and aligned with the user's goal.";

/// One user message and the assistant's reply to it.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// A conversation ready to be formatted: `CUSTOM` is already resolved to the default prompt.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub system: String,
    pub turns: Vec<Turn>,
}

/// Reads every conversation of a chat file (JSON list, JSON Lines or Parquet; any schema of
/// [`super::sources`]).
pub fn read_chat_file(path: &Path) -> Result<Vec<Conversation>> {
    let mut out = Vec::new();
    for_each_conversation(path, |_, conv| {
        out.push(conv);
        Ok(())
    })?;
    Ok(out)
}

/// Streams the conversations of a chat file in file order, calling `f(index, conversation)`.
///
/// Only one record's JSON tree exists at a time; the file itself is memory-mapped.
pub fn for_each_conversation(
    path: &Path,
    mut f: impl FnMut(usize, Conversation) -> Result<()>,
) -> Result<()> {
    let file = File::open(path).with_context(|| format!("{}: cannot open chat file", path.display()))?;
    if is_parquet(path, &file)? {
        return for_each_parquet_row(path, file, f);
    }
    let len = file.metadata().with_context(|| format!("{}: cannot stat", path.display()))?.len();
    if len == 0 {
        bail!("{}: empty chat file (expected a JSON list or JSON Lines of conversations)", path.display());
    }
    // SAFETY: the map is read-only and lives only during this call; a file truncated by another
    // process meanwhile would fault, which is the usual caveat of memory-mapped input.
    let map =
        unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
    let _ = map.advise(memmap2::Advice::Sequential);
    let bytes: &[u8] = &map;
    // A UTF-8 byte-order mark (some editors write one) is not JSON: skip it.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let Some(first) = first else {
        bail!("{}: chat file holds only whitespace", path.display());
    };
    let mut handle = |index: usize, record: Value| -> Result<()> {
        let conv = parse_record(&record).map_err(|e| anyhow!("{}: example {index}: {e}", path.display()))?;
        f(index, conv)
    };
    if bytes[first] == b'[' {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut failure: Option<anyhow::Error> = None;
        let mut at = 0;
        let result =
            de.deserialize_seq(ListVisitor { handle: &mut handle, failure: &mut failure, at: &mut at });
        if let Some(e) = failure {
            return Err(e);
        }
        let n = result.with_context(|| format!("{}: example {at}: invalid JSON", path.display()))?;
        de.end().with_context(|| format!("{}: trailing data after the JSON list", path.display()))?;
        if n == 0 {
            bail!("{}: the JSON list holds no conversations", path.display());
        }
    } else {
        let stream = serde_json::Deserializer::from_slice(bytes).into_iter::<CheckedValue>();
        let mut n = 0;
        for (index, record) in stream.map(|r| r.map(|v| v.0)).enumerate() {
            let record = record.with_context(|| {
                format!(
                    "{}: example {index}: invalid JSON (JSON Lines: one conversation a line)",
                    path.display()
                )
            })?;
            handle(index, record)?;
            n += 1;
        }
        if n == 0 {
            bail!("{}: no conversations", path.display());
        }
    }
    Ok(())
}

type Handler<'a> = &'a mut dyn FnMut(usize, Value) -> Result<()>;

/// Visits a top-level JSON list element by element, handing each to `handle` as it is parsed.
struct ListVisitor<'a, 'b> {
    handle: Handler<'a>,
    failure: &'b mut Option<anyhow::Error>,
    /// The index of the element being parsed, for errors inside it.
    at: &'b mut usize,
}

impl<'de> Visitor<'de> for ListVisitor<'_, '_> {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON list of conversations")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
        let mut index = 0;
        while let Some(record) = {
            *self.at = index;
            seq.next_element_seed(RecordSeed)?
        } {
            if let Err(e) = (self.handle)(index, record) {
                *self.failure = Some(e);
                return Err(serde::de::Error::custom("stopped"));
            }
            index += 1;
        }
        Ok(index)
    }
}

struct RecordSeed;

impl<'de> DeserializeSeed<'de> for RecordSeed {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        <CheckedValue as serde::Deserialize>::deserialize(d).map(|v| v.0)
    }
}

/// A JSON value whose objects have no duplicate key: `serde_json::Value` keeps the last of two
/// equal keys, which would silently drop the first field's data.
struct CheckedValue(Value);

impl<'de> serde::Deserialize<'de> for CheckedValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = CheckedValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::String(v.to_string())))
    }
    fn visit_string<E>(self, v: String) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::Null))
    }
    fn visit_none<E>(self) -> Result<CheckedValue, E> {
        Ok(CheckedValue(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<CheckedValue, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CheckedValue, A::Error> {
        let mut items = Vec::new();
        while let Some(CheckedValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(CheckedValue(Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<CheckedValue, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if obj.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate key `{key}` (only one would be read)"
                )));
            }
            let CheckedValue(v) = map.next_value()?;
            obj.insert(key, v);
        }
        Ok(CheckedValue(Value::Object(obj)))
    }
}

/// A `.parquet` file, or any file that starts with Parquet's magic `PAR1`.
fn is_parquet(path: &Path, file: &File) -> Result<bool> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        return Ok(true);
    }
    let mut magic = [0u8; 4];
    use std::os::unix::fs::FileExt;
    let n = file.read_at(&mut magic, 0).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(n == 4 && &magic == b"PAR1")
}

/// Streams a Parquet file's rows (every row group, in order) as conversations: each row's JSON
/// view (lists as lists, structs as objects, strings as strings) goes through the same schema
/// mapping as a JSON record.
fn for_each_parquet_row(
    path: &Path,
    file: File,
    mut f: impl FnMut(usize, Conversation) -> Result<()>,
) -> Result<()> {
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let rows =
        reader.get_row_iter(None).with_context(|| format!("{}: cannot read its rows", path.display()))?;
    let mut n = 0;
    for (index, row) in rows.enumerate() {
        let row = row.with_context(|| format!("{}: row {index}: unreadable", path.display()))?;
        let conv = parse_record(&row.to_json_value())
            .map_err(|e| anyhow!("{}: row {index}: {e}", path.display()))?;
        f(index, conv)?;
        n += 1;
    }
    if n == 0 {
        bail!("{}: the Parquet file holds no rows", path.display());
    }
    Ok(())
}
