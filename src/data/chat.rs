//! Chat files: SimpleLLaMA's schema and two common formats, all turned into [`Conversation`].
//!
//! A file is either one JSON list of records or JSON Lines (one record a line). Records are
//! parsed one at a time from a memory map (streaming), so a file never needs more than about
//! its own size of memory, and each record is validated with errors that name the file, the
//! example index and the field.

use std::fmt;
use std::fs::File;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::Value;

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

/// Reads every conversation of a chat file (JSON list or JSON Lines, any of the three schemas).
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
        let conv =
            parse_record(&record, index).map_err(|e| anyhow!("{}: example {index}: {e}", path.display()))?;
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

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string_list<'a>(obj: &'a serde_json::Map<String, Value>, field: &str) -> Result<Vec<&'a str>> {
    let v = obj.get(field).ok_or_else(|| anyhow!("missing field `{field}`"))?;
    let Value::Array(items) = v else {
        bail!("field `{field}`: expected a list of strings, found {}", type_name(v));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.as_str()),
            other => Err(anyhow!("field `{field}[{i}]`: expected a string, found {}", type_name(other))),
        })
        .collect()
}

/// Validates one record of any supported schema and turns it into a [`Conversation`].
pub fn parse_record(record: &Value, _index: usize) -> Result<Conversation> {
    let Value::Object(obj) = record else {
        bail!("expected an object (a conversation), found {}", type_name(record));
    };
    let schemas: Vec<&str> = ["Template", "User", "Assistant", "messages", "conversations"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let simplellama = schemas.iter().any(|k| k.starts_with(char::is_uppercase));
    let kinds = usize::from(simplellama)
        + usize::from(obj.contains_key("messages"))
        + usize::from(obj.contains_key("conversations"));
    if kinds > 1 {
        bail!(
            "fields {}: one record mixes two schemas (SimpleLLaMA's Template/User/Assistant, `messages`, \
             `conversations`); only one would be read",
            schemas.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        );
    }
    if simplellama {
        parse_simplellama(obj)
    } else if let Some(messages) = obj.get("messages") {
        parse_messages(messages, "messages", "role", "content")
    } else if let Some(conversations) = obj.get("conversations") {
        parse_messages(conversations, "conversations", "from", "value")
    } else {
        bail!("unknown schema: expected fields `Template`/`User`/`Assistant`, `messages`, or `conversations`")
    }
}

fn parse_simplellama(obj: &serde_json::Map<String, Value>) -> Result<Conversation> {
    let system = match obj.get("Template") {
        None => bail!("missing field `Template`"),
        Some(Value::String(s)) => s.as_str(),
        Some(Value::Array(items)) if items.len() > 1 => bail!(
            "field `Template`: {} strings, expected one ([\"CUSTOM\"] or [\"<system prompt>\"]); the others \
             would be dropped",
            items.len()
        ),
        Some(Value::Array(items)) => match items.first() {
            None => bail!("field `Template`: empty list (expected [\"CUSTOM\"] or [\"<system prompt>\"])"),
            Some(Value::String(s)) => s.as_str(),
            Some(other) => bail!("field `Template[0]`: expected a string, found {}", type_name(other)),
        },
        Some(other) => bail!("field `Template`: expected a list of one string, found {}", type_name(other)),
    };
    let users = string_list(obj, "User")?;
    let assistants = string_list(obj, "Assistant")?;
    if users.is_empty() {
        bail!("field `User`: empty list (a conversation needs at least one turn)");
    }
    if users.len() != assistants.len() {
        bail!(
            "fields `User` and `Assistant`: length mismatch ({} user turns, {} assistant replies); \
             a conversation must end with the assistant",
            users.len(),
            assistants.len()
        );
    }
    let system = if system == "CUSTOM" { DEFAULT_SYSTEM_PROMPT } else { system };
    Ok(Conversation {
        system: system.to_string(),
        turns: users
            .iter()
            .zip(&assistants)
            .map(|(u, a)| Turn { user: u.to_string(), assistant: a.to_string() })
            .collect(),
    })
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Role {
    System,
    User,
    Assistant,
}

fn parse_messages(list: &Value, field: &str, role_key: &str, text_key: &str) -> Result<Conversation> {
    let Value::Array(items) = list else {
        bail!("field `{field}`: expected a list of messages, found {}", type_name(list));
    };
    if items.is_empty() {
        bail!("field `{field}`: empty list (a conversation needs at least one turn)");
    }
    let mut system: Option<String> = None;
    let mut turns = Vec::new();
    let mut pending_user: Option<String> = None;
    let mut seen_turn = false;
    for (i, item) in items.iter().enumerate() {
        let Value::Object(msg) = item else {
            bail!("field `{field}[{i}]`: expected an object, found {}", type_name(item));
        };
        let role = match msg.get(role_key) {
            Some(Value::String(r)) => match r.as_str() {
                "system" => Role::System,
                "user" | "human" => Role::User,
                "assistant" | "gpt" => Role::Assistant,
                other => bail!(
                    "field `{field}[{i}].{role_key}`: unknown role {other:?} (expected system, user/human or \
                     assistant/gpt)"
                ),
            },
            Some(other) => {
                bail!("field `{field}[{i}].{role_key}`: expected a string, found {}", type_name(other))
            }
            None => bail!("field `{field}[{i}]`: missing `{role_key}`"),
        };
        let text = match msg.get(text_key) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                bail!("field `{field}[{i}].{text_key}`: expected a string, found {}", type_name(other))
            }
            None => bail!("field `{field}[{i}]`: missing `{text_key}`"),
        };
        match role {
            Role::System => {
                if seen_turn || system.is_some() {
                    bail!("field `{field}[{i}]`: roles out of order: a system message may only come first");
                }
                system = Some(text);
            }
            Role::User => {
                if pending_user.is_some() {
                    bail!("field `{field}[{i}]`: roles out of order: two user messages in a row");
                }
                pending_user = Some(text);
                seen_turn = true;
            }
            Role::Assistant => {
                let Some(user) = pending_user.take() else {
                    bail!("field `{field}[{i}]`: roles out of order: an assistant message must follow a user message");
                };
                turns.push(Turn { user, assistant: text });
            }
        }
    }
    if pending_user.is_some() {
        bail!("field `{field}`: the conversation does not end with an assistant message");
    }
    if turns.is_empty() {
        bail!("field `{field}`: no user/assistant turn");
    }
    Ok(Conversation { system: system.unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()), turns })
}
