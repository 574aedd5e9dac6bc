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
use parquet::record::{Field, Row};
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
///
/// The `parquet` crate panics on some damaged files (slice bounds, assertions in its decoders)
/// instead of returning an error, so every call into it runs under [`reader_call`].
fn for_each_parquet_row(
    path: &Path,
    file: File,
    mut f: impl FnMut(usize, Conversation) -> Result<()>,
) -> Result<()> {
    let name = path.display();
    let unreadable = |at: &str, why: String| anyhow!("{name}: {at}not a readable Parquet file ({why})");
    let reader = reader_call(|| SerializedFileReader::new(file))
        .map_err(|p| unreadable("", p))?
        .map_err(|e| unreadable("", short(&e.to_string())))?;
    check_compression(path, &reader)?;
    let mut rows = reader_call(|| reader.get_row_iter(None))
        .map_err(|p| unreadable("", p))?
        .map_err(|e| unreadable("", short(&e.to_string())))?;
    let mut n = 0;
    loop {
        let at = format!("row {n}: ");
        let Some(row) = reader_call(|| rows.next()).map_err(|p| unreadable(&at, p))? else { break };
        let row = row.map_err(|e| unreadable(&at, short(&e.to_string())))?;
        let record = row_to_json(&row).map_err(|e| anyhow!("{name}: row {n}: {e}"))?;
        let conv = parse_record(&record).map_err(|e| anyhow!("{name}: row {n}: {e}"))?;
        f(n, conv)?;
        n += 1;
    }
    if n == 0 {
        bail!("{name}: the Parquet file holds no rows");
    }
    Ok(())
}

/// The crate is built with Snappy only (each codec is a build-time cost): other codecs are named
/// up front, rather than as the crate's "Disabled feature at compile time" at the first page.
fn check_compression(path: &Path, reader: &SerializedFileReader<File>) -> Result<()> {
    use parquet::basic::Compression;
    for group in reader.metadata().row_groups() {
        for column in group.columns() {
            let codec = column.compression();
            if !matches!(codec, Compression::UNCOMPRESSED | Compression::SNAPPY) {
                let codec = format!("{codec:?}");
                let codec = codec.split('(').next().unwrap_or_default().to_lowercase();
                bail!(
                    "{}: column `{}` is {codec}-compressed: only uncompressed and Snappy Parquet files \
                     are supported (write it with compression=\"snappy\", pyarrow's and `datasets`' default)",
                    path.display(),
                    column.column_path().string()
                );
            }
        }
    }
    Ok(())
}

/// A reader's message cut to a readable length: some embed a whole schema or page as Debug text.
fn short(msg: &str) -> String {
    const MAX: usize = 300;
    match msg.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &msg[..i]),
        None => msg.to_string(),
    }
}

/// Runs `call` into the Parquet reader, turning a panic into `Err("the reader failed: ...")`
/// without the hook's "thread panicked" message on stderr.
fn reader_call<T>(call: impl FnOnce() -> T) -> std::result::Result<T, String> {
    // Only the message is cut: the place stays at the end.
    crate::panics::catch(call).map_err(|panic| {
        let at = panic.place.map(|at| format!(" (at {at})")).unwrap_or_default();
        format!("the reader failed: {}{at}", short(&panic.message))
    })
}

/// A row as JSON, as the crate's `to_json_value` sees it except for binary: a BYTE_ARRAY column
/// without the UTF8 annotation (pyarrow's `pa.binary()`) would become base64 text there, which
/// would be trained on as if it were the text. It is read as UTF-8 here, or refused.
fn row_to_json(row: &Row) -> std::result::Result<Value, String> {
    let mut obj = serde_json::Map::new();
    for (key, field) in row.get_column_iter() {
        obj.insert(key.clone(), field_to_json(field, key)?);
    }
    Ok(Value::Object(obj))
}

fn field_to_json(field: &Field, at: &str) -> std::result::Result<Value, String> {
    Ok(match field {
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => {
                return Err(format!(
                    "field `{at}`: binary column that is not UTF-8 (invalid byte at {} of {})",
                    e.valid_up_to(),
                    b.data().len()
                ))
            }
        },
        Field::Group(row) => {
            let mut obj = serde_json::Map::new();
            for (key, f) in row.get_column_iter() {
                obj.insert(key.clone(), field_to_json(f, &format!("{at}.{key}"))?);
            }
            Value::Object(obj)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, f)| field_to_json(f, &format!("{at}[{i}]")))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in map.entries() {
                let key = match field_to_json(k, &format!("{at} (a key)"))? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                let value = field_to_json(v, &format!("{at}.{key}"))?;
                obj.insert(key, value);
            }
            Value::Object(obj)
        }
        other => other.to_json_value(),
    })
}
