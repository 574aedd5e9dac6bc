//! The record schemas users bring, each mapped to a [`Conversation`] (system prompt, then
//! user/assistant turns), so that every prompt format applies to all of them.
//!
//! One function per schema; [`parse_record`] detects which one a record follows. A record is a
//! JSON value: a line of JSON Lines, an element of a JSON list, or a Parquet row seen through
//! its JSON view (`chat.rs` reads the files). Errors name the field (`messages[2].role`); the
//! reader adds the file and the row.
//!
//! - SimpleLLaMA: `{"Template": ["CUSTOM" | system], "User": [...], "Assistant": [...]}`.
//! - `messages`: `[{"role": "system"|"user"|"assistant", "content": "..."}]` (OpenAI / TRL).
//! - `conversations`: ShareGPT, `[{"from": "system"|"human"|"gpt", "value": "..."}]`.
//! - Alpaca: `instruction`, optional `input`, `output` (and an optional `system`).
//! - `prompt`/`completion`: two strings (and an optional `system`), or TRL's conversational form,
//!   two lists of messages.

use anyhow::{anyhow, bail, Result};
use serde_json::{Map, Value};

use super::chat::{Conversation, Turn, DEFAULT_SYSTEM_PROMPT};

/// A record's schema, as detected from its fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    SimpleLlama,
    Messages,
    ShareGpt,
    Alpaca,
    PromptCompletion,
}

impl Schema {
    /// The fields that identify the schema (any one of them present means this schema).
    fn keys(self) -> &'static [&'static str] {
        match self {
            Schema::SimpleLlama => &["Template", "User", "Assistant"],
            Schema::Messages => &["messages"],
            Schema::ShareGpt => &["conversations"],
            Schema::Alpaca => &["instruction", "output"],
            Schema::PromptCompletion => &["prompt", "completion"],
        }
    }

    const ALL: [Schema; 5] =
        [Schema::SimpleLlama, Schema::Messages, Schema::ShareGpt, Schema::Alpaca, Schema::PromptCompletion];
}

/// The schemas a record holds fields of. Null fields do not count where another field does: a
/// Parquet file whose rows mix schemas has every column in every row, null where absent.
pub fn detect(obj: &Map<String, Value>) -> Vec<Schema> {
    let with = |present: &dyn Fn(&str) -> bool| -> Vec<Schema> {
        Schema::ALL.into_iter().filter(|s| s.keys().iter().any(|k| present(k))).collect()
    };
    let non_null = with(&|k| obj.get(k).is_some_and(|v| !v.is_null()));
    if non_null.is_empty() {
        with(&|k| obj.contains_key(k))
    } else {
        non_null
    }
}

/// Validates one record of any supported schema and turns it into a [`Conversation`].
pub fn parse_record(record: &Value) -> Result<Conversation> {
    let Value::Object(obj) = record else {
        bail!("expected an object (a conversation), found {}", type_name(record));
    };
    let schemas = detect(obj);
    match schemas.as_slice() {
        [] => bail!(
            "unknown schema: expected the fields of one of SimpleLLaMA's `Template`/`User`/`Assistant`, \
             `messages`, `conversations` (ShareGPT), Alpaca's `instruction`/`input`/`output`, or \
             `prompt`/`completion`; found {}",
            field_list(obj.keys().map(String::as_str))
        ),
        [Schema::SimpleLlama] => {
            unread(obj, &["system", "input"], "SimpleLLaMA's `Template`").and_then(|_| simplellama(obj))
        }
        [Schema::Messages] => unread(obj, &["system", "input"], "a system message first in `messages`")
            .and_then(|_| messages(obj)),
        [Schema::ShareGpt] => unread(obj, &["system", "input"], "a system message first in `conversations`")
            .and_then(|_| sharegpt(obj)),
        [Schema::Alpaca] => alpaca(obj),
        [Schema::PromptCompletion] => {
            let lists = obj.get("prompt").is_some_and(Value::is_array);
            let fields: &[&str] = if lists { &["system", "input"] } else { &["input"] };
            unread(obj, fields, "a system message first in `prompt`").and_then(|_| prompt_completion(obj))
        }
        several => {
            let fields = several.iter().flat_map(|s| s.keys()).filter(|k| obj.contains_key(**k)).copied();
            bail!("fields {}: one record mixes two schemas; only one would be read", field_list(fields))
        }
    }
}

/// Refuses fields of another schema that this one would drop (a top-level `system` beside
/// `messages`, an Alpaca `input` beside `prompt`/`completion`): a system prompt lost without a word
/// trains another conversation than the file holds. Null or empty ones (a Parquet column of
/// another schema's rows) carry nothing and are let through. `instead` says where this schema
/// takes what the field meant.
fn unread(obj: &Map<String, Value>, fields: &[&str], instead: &str) -> Result<()> {
    for &field in fields {
        match obj.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => {
                let what = if field == "system" { "the system prompt goes in" } else { "its text goes in" };
                bail!("field `{field}`: not read with this record's schema, so it would be dropped ({what} {instead})")
            }
        }
    }
    Ok(())
}

fn field_list<'a>(keys: impl Iterator<Item = &'a str>) -> String {
    let keys: Vec<String> = keys.map(|k| format!("`{k}`")).collect();
    if keys.is_empty() {
        "no fields".into()
    } else {
        keys.join(", ")
    }
}

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn string_list<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Vec<&'a str>> {
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

/// A string field that must be there.
fn string<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<&'a str> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => bail!("field `{field}`: expected a string, found {}", type_name(other)),
        None => bail!("missing field `{field}`"),
    }
}

/// A string field that may be absent or null.
fn optional_string<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => bail!("field `{field}`: expected a string, found {}", type_name(other)),
    }
}

/// The optional `system` field of the single-turn schemas; the default prompt where absent.
fn system_or_default(obj: &Map<String, Value>) -> Result<String> {
    Ok(optional_string(obj, "system")?.unwrap_or(DEFAULT_SYSTEM_PROMPT).to_string())
}

/// SimpleLLaMA's `{"Template": [...], "User": [...], "Assistant": [...]}`.
pub fn simplellama(obj: &Map<String, Value>) -> Result<Conversation> {
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

/// `{"messages": [{"role", "content"}, ...]}` (OpenAI's and TRL's conversational format).
pub fn messages(obj: &Map<String, Value>) -> Result<Conversation> {
    let list = obj.get("messages").ok_or_else(|| anyhow!("missing field `messages`"))?;
    message_list(&[("messages", list)], "role", "content")
}

/// ShareGPT's `{"conversations": [{"from", "value"}, ...]}`.
pub fn sharegpt(obj: &Map<String, Value>) -> Result<Conversation> {
    let list = obj.get("conversations").ok_or_else(|| anyhow!("missing field `conversations`"))?;
    message_list(&[("conversations", list)], "from", "value")
}

/// Alpaca's `instruction`, `input` (may be empty or absent) and `output`: one turn whose user
/// message is the instruction, then a blank line and the input where there is one.
pub fn alpaca(obj: &Map<String, Value>) -> Result<Conversation> {
    let instruction = string(obj, "instruction")?;
    let input = optional_string(obj, "input")?.unwrap_or("");
    let output = string(obj, "output")?;
    let user = if input.is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
    Ok(Conversation {
        system: system_or_default(obj)?,
        turns: vec![Turn { user, assistant: output.to_string() }],
    })
}

/// `prompt`/`completion`: two strings (one turn), or TRL's conversational form where both are
/// lists of messages (the prompt's, then the completion's).
pub fn prompt_completion(obj: &Map<String, Value>) -> Result<Conversation> {
    let prompt = obj.get("prompt").ok_or_else(|| anyhow!("missing field `prompt`"))?;
    let completion = obj.get("completion").ok_or_else(|| anyhow!("missing field `completion`"))?;
    match (prompt, completion) {
        (Value::String(p), Value::String(c)) => Ok(Conversation {
            system: system_or_default(obj)?,
            turns: vec![Turn { user: p.clone(), assistant: c.clone() }],
        }),
        (Value::Array(_), Value::Array(_)) => {
            message_list(&[("prompt", prompt), ("completion", completion)], "role", "content")
        }
        (Value::String(_) | Value::Array(_), other) => bail!(
            "field `completion`: expected {} like `prompt`, found {}",
            if prompt.is_string() { "a string" } else { "a list of messages" },
            type_name(other)
        ),
        (other, _) => {
            bail!("field `prompt`: expected a string or a list of messages, found {}", type_name(other))
        }
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Role {
    System,
    User,
    Assistant,
}

/// Messages in order, from one or more list fields, into turns: an optional system message
/// first, then user/assistant pairs ending with the assistant.
fn message_list(lists: &[(&str, &Value)], role_key: &str, text_key: &str) -> Result<Conversation> {
    let mut system: Option<String> = None;
    let mut turns = Vec::new();
    let mut pending_user: Option<String> = None;
    let mut seen_turn = false;
    for &(field, list) in lists {
        let Value::Array(items) = list else {
            bail!("field `{field}`: expected a list of messages, found {}", type_name(list));
        };
        if items.is_empty() {
            bail!("field `{field}`: empty list (a conversation needs at least one turn)");
        }
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
                        "field `{field}[{i}].{role_key}`: unknown role {other:?} (expected system, user/human \
                         or assistant/gpt)"
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
                        bail!(
                            "field `{field}[{i}]`: roles out of order: a system message may only come first"
                        );
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
                        bail!(
                            "field `{field}[{i}]`: roles out of order: an assistant message must follow a user \
                             message"
                        );
                    };
                    turns.push(Turn { user, assistant: text });
                }
            }
        }
    }
    let field = lists.last().map_or("messages", |l| l.0);
    if pending_user.is_some() {
        bail!("field `{field}`: the conversation does not end with an assistant message");
    }
    if turns.is_empty() {
        bail!("field `{field}`: no user/assistant turn");
    }
    Ok(Conversation { system: system.unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()), turns })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Conversation> {
        parse_record(&v)
    }

    fn err(v: Value) -> String {
        format!("{:#}", parse(v).unwrap_err())
    }

    #[test]
    fn every_schema_maps_to_the_same_conversation() {
        let one = |system: &str| Conversation {
            system: system.into(),
            turns: vec![Turn { user: "Add 2 and 3.".into(), assistant: "5".into() }],
        };
        let s = "You add.";
        assert_eq!(
            parse(json!({"Template": [s], "User": ["Add 2 and 3."], "Assistant": ["5"]})).unwrap(),
            one(s)
        );
        assert_eq!(
            parse(json!({"messages": [{"role": "system", "content": s}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "5"}]}))
            .unwrap(),
            one(s)
        );
        assert_eq!(
            parse(json!({"conversations": [{"from": "system", "value": s}, {"from": "human", "value": "Add 2 and 3."},
                {"from": "gpt", "value": "5"}]}))
            .unwrap(),
            one(s)
        );
        assert_eq!(
            parse(json!({"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": s})).unwrap(),
            one(s)
        );
        assert_eq!(
            parse(json!({"instruction": "Add 2 and 3.", "output": "5"})).unwrap(),
            one(DEFAULT_SYSTEM_PROMPT)
        );
        assert_eq!(
            parse(json!({"instruction": "Add:", "input": "2 and 3", "output": "5"})).unwrap().turns[0].user,
            "Add:\n\n2 and 3"
        );
        assert_eq!(parse(json!({"prompt": "Add 2 and 3.", "completion": "5", "system": s})).unwrap(), one(s));
        assert_eq!(
            parse(json!({"prompt": [{"role": "system", "content": s}, {"role": "user", "content": "Add 2 and 3."}],
                "completion": [{"role": "assistant", "content": "5"}]}))
            .unwrap(),
            one(s)
        );
        // Extra columns (ids, sources) are the user's and ignored; a null column of another
        // schema (Parquet rows carry every column) does not count as a second schema.
        assert_eq!(
            parse(json!({"id": 7, "prompt": null, "instruction": "Add 2 and 3.", "output": "5"})).unwrap(),
            one(DEFAULT_SYSTEM_PROMPT)
        );
    }

    /// A field this record's schema does not read was dropped silently: a top-level system
    /// prompt beside `messages` trained the default one instead.
    #[test]
    fn fields_another_schema_would_read_are_refused_not_dropped() {
        let msgs = json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]);
        let sharegpt = json!([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]);
        let cases = [
            json!({"messages": msgs, "system": "SYS"}),
            json!({"conversations": sharegpt, "system": "SYS"}),
            json!({"Template": ["CUSTOM"], "User": ["a"], "Assistant": ["b"], "system": "SYS"}),
            json!({"Template": ["CUSTOM"], "User": ["a"], "Assistant": ["b"], "input": "more"}),
            json!({"prompt": "a", "completion": "b", "input": "more"}),
            json!({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}],
                   "system": "SYS"}),
        ];
        for case in cases {
            let e = err(case.clone());
            assert!(
                e.contains("not read with this record's schema") && e.contains("would be dropped"),
                "{case}: {e}"
            );
        }
        // Null or empty: nothing to lose (Parquet rows carry every column of the file).
        assert!(parse(json!({"messages": msgs, "system": null, "input": ""})).is_ok());
    }

    #[test]
    fn bad_records_name_the_field() {
        assert!(err(json!({"text": "hello"})).contains("unknown schema"), "{}", err(json!({"text": "x"})));
        assert!(err(json!({"text": "hello"})).contains("`text`"));
        let e = err(json!({"instruction": "Hi"}));
        assert!(e.contains("missing field `output`"), "{e}");
        let e = err(json!({"instruction": "Hi", "output": 5}));
        assert!(e.contains("field `output`: expected a string, found a number"), "{e}");
        let e = err(json!({"prompt": "Hi", "completion": ["x"]}));
        assert!(e.contains("field `completion`") && e.contains("a string"), "{e}");
        let e = err(json!({"prompt": 3, "completion": "x"}));
        assert!(e.contains("field `prompt`"), "{e}");
        let e = err(json!({"messages": [{"role": "assistant", "content": "5"}]}));
        assert!(e.contains("`messages[0]`") && e.contains("roles out of order"), "{e}");
        let e = err(json!({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}));
        assert!(e.contains("`messages[1].role`") && e.contains("\"bot\""), "{e}");
        let e = err(json!({"conversations": [{"from": "human", "value": 1}]}));
        assert!(e.contains("`conversations[0].value`: expected a string, found a number"), "{e}");
        let e = err(
            json!({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "b"}]}),
        );
        assert!(e.contains("`completion[0]`") && e.contains("two user messages"), "{e}");
        let e =
            err(json!({"messages": [{"role": "user", "content": "a"}], "instruction": "b", "output": "c"}));
        assert!(
            e.contains("mixes two schemas") && e.contains("`messages`") && e.contains("`instruction`"),
            "{e}"
        );
        let e = err(json!({"Template": null, "User": ["a"], "Assistant": ["b"]}));
        assert!(e.contains("field `Template`") && e.contains("null"), "{e}");
    }
}
