//! A model's own chat template (`chat_template` in `tokenizer_config.json`), rendered with
//! minijinja as Hugging Face's `apply_chat_template` renders it, and the loss mask it implies.
//!
//! Rendering follows transformers' Jinja environment: `trim_blocks`, `lstrip_blocks`, loop
//! controls, `raise_exception`, `strftime_now`, a `tojson` that writes what Python's
//! `json.dumps(ensure_ascii=False)` writes, Python's string methods (`.strip()`,
//! `.startswith()`, through minijinja-contrib's pycompat), and the special-token strings of the
//! tokenizer config (`bos_token`, `eos_token`, ...) as variables.
//!
//! Supervision is located in token space, never guessed:
//! - a template with `{% generation %}` markers: each marked span's text boundaries, checked to
//!   fall on token boundaries of the whole rendering;
//! - otherwise, for assistant message `k`: the rendering of the messages before it with the
//!   generation prompt, and of the messages up to it, must each be a string prefix of the whole
//!   rendering and their tokens a prefix of the whole's tokens; the reply is what lies between.
//!
//! A template that breaks either rule is an error naming it (a wrong mask would train silently).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value as Json;

use super::chat::{Conversation, Turn, DEFAULT_SYSTEM_PROMPT};
use super::example::Example;
use super::format::TrainOn;
use super::tokenizer::{ChatTokenizer, FormatChoice, Segment};

/// The file a Hugging Face tokenizer keeps its chat template and special-token strings in.
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// Marks the start and end of a `{% generation %}` span in rendered text (private-use code
/// points: no tokenizer gives them meaning, and content holding them is refused).
const GEN_START: char = '\u{F8F0}';
const GEN_END: char = '\u{F8F1}';

/// The special-token names `apply_chat_template` passes to templates as variables.
const SPECIAL_TOKEN_KEYS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"];

/// How conversations become text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatFormat {
    /// SimpleLLaMA's `<SOT>…<EOT>` / `<SOU>…<EOU>` / `<SOA>…<EOA>` format.
    #[value(name = "simplellama")]
    SimpleLlama,
    /// The model's own Jinja chat template (tokenizer_config.json or --chat-template FILE).
    Template,
}

/// `--chat-format` and `--chat-template`, shared by the commands that format conversations.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ChatFormatArgs {
    /// Chat format: simplellama, or template (the model's own). Default: the chat_template of the
    /// tokenizer_config.json beside the tokenizer when there is one, else SimpleLLaMA's.
    #[arg(long, value_enum)]
    pub chat_format: Option<ChatFormat>,
    /// A Jinja chat template file, used instead of tokenizer_config.json's (template format).
    #[arg(long)]
    pub chat_template: Option<PathBuf>,
}

impl ChatFormatArgs {
    pub fn choice(&self) -> FormatChoice {
        FormatChoice::new(self.chat_format, self.chat_template.clone())
    }
}

/// One message given to a template.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message { role: role.to_string(), content: content.into() }
    }
}

/// A compiled chat template with the variables its tokenizer config gives it.
pub struct ChatTemplate {
    /// Where it came from, for errors ("…/tokenizer_config.json" or the --chat-template file).
    name: String,
    source: String,
    env: Environment<'static>,
    has_generation: bool,
    /// `bos_token`, `eos_token`, ... as strings.
    tokens: BTreeMap<String, String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("name", &self.name).field("tokens", &self.tokens).finish()
    }
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' extension tag) become a filter
/// block, so the tags keep their whitespace control and `trim_blocks` behaviour, and the filter
/// wraps what the block renders in [`GEN_START`]/[`GEN_END`].
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        // The closing `%}` comes after the opening `{%`: in `{%}` they overlap.
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            rest = "";
            break;
        };
        let inner = &tag[2..end];
        let (open_ctl, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, close_ctl) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        let replacement = match body.trim() {
            "generation" => Some("filter __sft_generation"),
            "endgeneration" => Some("endfilter"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                found = true;
                out.push_str(&format!("{{%{open_ctl} {r} {close_ctl}%}}"));
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    (out, found)
}

fn raise_exception(message: String) -> Result<Value, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// Seconds since the epoch for `strftime_now`: `SOURCE_DATE_EPOCH` when set (reproducible
/// data preparation and tests), else the clock.
fn now_unix() -> i64 {
    if let Some(s) = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.trim().parse::<i64>().ok()) {
        return s;
    }
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// Python's `strftime` for the codes chat templates use, in UTC.
pub fn strftime(format: &str, unix: i64) -> Result<String, JinjaError> {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let code = chars.next().unwrap_or('%');
        let month = MONTHS[(m - 1) as usize];
        match code {
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:2}")),
            'm' => out.push_str(&format!("{m:02}")),
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'b' | 'h' => out.push_str(&month[..3]),
            'B' => out.push_str(month),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'H' => out.push_str(&format!("{:02}", secs / 3600)),
            'M' => out.push_str(&format!("{:02}", secs / 60 % 60)),
            'S' => out.push_str(&format!("{:02}", secs % 60)),
            'j' => out.push_str(&format!("{yday:03}")),
            '%' => out.push('%'),
            other => {
                return Err(JinjaError::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported format code %{other}"),
                ))
            }
        }
    }
    Ok(out)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`:
/// `", "`/`": "` separators without indent, `","` and newlines with it (transformers' `tojson`).
/// Maps keep their order (as Python dicts do) unless `sort_keys`.
pub fn python_json(value: &Value, indent: Option<usize>, sort_keys: bool) -> Result<String, JinjaError> {
    fn write(
        out: &mut String,
        v: &Value,
        indent: Option<usize>,
        sort_keys: bool,
        depth: usize,
    ) -> Result<(), JinjaError> {
        let newline = |out: &mut String, depth: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * depth));
            }
        };
        let item_sep = if indent.is_some() { "," } else { ", " };
        let leaf = |v: &Value| {
            serde_json::to_string(v)
                .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
        };
        match v.kind() {
            minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    newline(out, depth + 1);
                    write(out, item, indent, sort_keys, depth + 1)?;
                }
                newline(out, depth);
                out.push(']');
            }
            minijinja::value::ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                if sort_keys {
                    keys.sort();
                }
                out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    newline(out, depth + 1);
                    let key = match k.as_str() {
                        Some(s) => s.to_string(),
                        None => k.to_string(),
                    };
                    out.push_str(&leaf(&Value::from(key))?);
                    out.push_str(": ");
                    write(out, &v.get_item(k)?, indent, sort_keys, depth + 1)?;
                }
                newline(out, depth);
                out.push('}');
            }
            minijinja::value::ValueKind::Undefined | minijinja::value::ValueKind::None => {
                out.push_str("null")
            }
            _ => out.push_str(&leaf(v)?),
        }
        Ok(())
    }
    let mut out = String::new();
    write(&mut out, value, indent, sort_keys, 0)?;
    Ok(out)
}

fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    Ok(Value::from_safe_string(python_json(&value, indent, sort_keys.unwrap_or(false))?))
}

/// The content of a special-token entry of tokenizer_config.json: a string, or an AddedToken
/// object `{"content": ...}`.
fn token_string(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

/// The template engine's instructions one render may run: about half a second. The fixture
/// templates run 23–34 per message (10,000 messages: 230k–340k); a template is data, and
/// without a bound nested loops in a broken one would hold preprocessing for hours instead of
/// failing.
const RENDER_FUEL: u64 = 20_000_000;

/// The text one render may produce: this base plus [`RENDER_BYTES_PER_INPUT_BYTE`] times the
/// bytes of the messages and special tokens it was given. Fuel counts instructions, and one
/// instruction can print 100 MB (`{{ 'x' * 100000000 }}`): without a bound on the output, a
/// loop of a few thousand instructions would fill the memory of every thread rendering.
const RENDER_BYTES_BASE: usize = 1 << 20;
const RENDER_BYTES_PER_INPUT_BYTE: usize = 16;

/// The rendered text, refusing to grow past `limit` bytes.
struct BoundedText {
    bytes: Vec<u8>,
    limit: usize,
    over: bool,
}

impl std::io::Write for BoundedText {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.over = true;
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles `source`; `tokens` are the special-token variables (`bos_token` → `<s>`, ...).
    pub fn new(name: &str, source: &str, tokens: BTreeMap<String, String>) -> Result<Self> {
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: String| strftime(&format, now_unix()));
        env.add_filter("tojson", tojson);
        env.add_filter("__sft_generation", |s: String| format!("{GEN_START}{s}{GEN_END}"));
        env.add_template_owned("chat_template", rewritten)
            .map_err(|e| anyhow!("{name}: chat_template does not compile: {e:#}"))?;
        Ok(ChatTemplate { name: name.to_string(), source: source.to_string(), env, has_generation, tokens })
    }

    /// The template of a `tokenizer_config.json` (`chat_template` as a string, or the entry
    /// named `default` of a list of named templates), with its special-token strings; `None`
    /// when the file has no template.
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<Self>> {
        let config = read_tokenizer_config(path)?;
        let Some(source) = template_source(&config, path)? else { return Ok(None) };
        let name = format!("{} (chat_template)", path.display());
        Ok(Some(Self::new(&name, &source, special_tokens_of(&config))?))
    }

    /// A template file (`--chat-template FILE`); the special-token strings come from the
    /// tokenizer config beside the tokenizer when there is one.
    pub fn from_file(path: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let source = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read chat template", path.display()))?;
        let tokens = match tokenizer_config.filter(|p| p.is_file()) {
            Some(c) => special_tokens_of(&read_tokenizer_config(c)?),
            None => BTreeMap::new(),
        };
        Self::new(&path.display().to_string(), &source, tokens)
    }

    /// Where the template came from.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The Jinja source as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template marks assistant text with `{% generation %}`.
    pub fn has_generation_markers(&self) -> bool {
        self.has_generation
    }

    /// A special-token variable (`eos_token`, ...).
    pub fn token(&self, key: &str) -> Option<&str> {
        self.tokens.get(key).map(String::as_str)
    }

    /// The special-token variables.
    pub fn tokens(&self) -> &BTreeMap<String, String> {
        &self.tokens
    }

    /// Renders with the `{% generation %}` spans as byte ranges of the returned text.
    fn render_marked(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>)> {
        for (i, m) in messages.iter().enumerate() {
            if m.content.contains([GEN_START, GEN_END]) {
                bail!(
                    "message {i}: holds a private-use character (U+F8F0/U+F8F1) that marks generation spans"
                );
            }
        }
        let input_bytes: usize = messages.iter().map(|m| m.role.len() + m.content.len()).sum::<usize>()
            + self.tokens.values().map(String::len).sum::<usize>();
        let limit = RENDER_BYTES_BASE.saturating_add(input_bytes.saturating_mul(RENDER_BYTES_PER_INPUT_BYTE));
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        ctx.insert("messages".into(), Value::from_serialize(messages));
        ctx.insert("add_generation_prompt".into(), Value::from(add_generation_prompt));
        for (k, v) in &self.tokens {
            ctx.insert(k.clone(), Value::from(v.as_str()));
        }
        let tmpl = self.env.get_template("chat_template").expect("added in new");
        // minijinja 2.24 panics on some expressions instead of failing (`''[::-1]` indexes an
        // empty string; found by tests/fuzz_template.rs): a template is data, so that is an error.
        let mut out = BoundedText { bytes: Vec::new(), limit, over: false };
        let rendered =
            crate::panics::catch(|| tmpl.render_captured_to(ctx, &mut out).map(drop)).map_err(|panic| {
                anyhow!("{}: rendering failed: the template engine panicked on it: {panic}", self.name)
            })?;
        rendered.map_err(|e| {
            let detail = match e.kind() {
                _ if out.over => format!(
                    "the text of one conversation passed {limit} bytes ({input_bytes} bytes of \
                     messages and special tokens went in; a loop that does not end?)"
                ),
                ErrorKind::InvalidOperation => e.detail().unwrap_or("").to_string(),
                ErrorKind::OutOfFuel => format!(
                    "it ran {RENDER_FUEL} instructions for one conversation without finishing \
                     (a loop that does not end?)"
                ),
                _ => format!("{e:#}"),
            };
            anyhow!("{}: rendering failed: {detail}", self.name)
        })?;
        let raw = String::from_utf8(out.bytes)
            .map_err(|e| anyhow!("{}: rendering failed: the text is not UTF-8: {e}", self.name))?;
        let mut text = String::with_capacity(raw.len());
        let mut spans = Vec::new();
        let mut open: Option<usize> = None;
        for c in raw.chars() {
            match c {
                GEN_START => open = Some(text.len()),
                GEN_END => {
                    if let Some(a) = open.take() {
                        spans.push(a..text.len());
                    }
                }
                _ => text.push(c),
            }
        }
        Ok((text, spans))
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        Ok(self.render_marked(messages, add_generation_prompt)?.0)
    }
}

/// `chat_template` of a tokenizer config: a string, or the entry named `default` of a list of
/// named templates.
fn template_source(config: &serde_json::Map<String, Json>, path: &Path) -> Result<Option<String>> {
    Ok(match config.get("chat_template") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(Json::Array(list)) => {
            let default = list.iter().find(|t| t.get("name").and_then(Json::as_str) == Some("default"));
            match default.and_then(|t| t.get("template")).and_then(Json::as_str) {
                Some(s) => Some(s.to_string()),
                None => {
                    bail!("{}: field `chat_template`: a list without a `default` template", path.display())
                }
            }
        }
        Some(_) => bail!("{}: field `chat_template`: expected a string", path.display()),
    })
}

/// The chat template source of the tokenizer config beside `tokenizer`, when it has one (what
/// a tokenizer loaded with the default format choice uses).
pub fn default_template_source(tokenizer: &Path) -> Result<Option<String>> {
    let config = tokenizer_config_beside(tokenizer);
    if !config.is_file() {
        return Ok(None);
    }
    template_source(&read_tokenizer_config(&config)?, &config)
}

fn read_tokenizer_config(path: &Path) -> Result<serde_json::Map<String, Json>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    match serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))? {
        Json::Object(o) => Ok(o),
        _ => bail!("{}: expected a JSON object", path.display()),
    }
}

fn special_tokens_of(config: &serde_json::Map<String, Json>) -> BTreeMap<String, String> {
    SPECIAL_TOKEN_KEYS
        .iter()
        .filter_map(|k| config.get(*k).and_then(token_string).map(|v| (k.to_string(), v)))
        .collect()
}

/// A `tokenizer_config.json` holding `tpl` as its `chat_template`: the fields of `original`
/// (when given) kept, the template's special-token strings set.
pub fn tokenizer_config_json(
    tpl: &ChatTemplate,
    original: Option<&Path>,
) -> Result<serde_json::Map<String, Json>> {
    let mut config = match original.filter(|p| p.is_file()) {
        Some(p) => read_tokenizer_config(p)?,
        None => serde_json::Map::new(),
    };
    for (k, v) in tpl.tokens() {
        config.entry(k.clone()).or_insert_with(|| Json::String(v.clone()));
    }
    config.insert("chat_template".into(), Json::String(tpl.source().to_string()));
    Ok(config)
}

/// The tokenizer config beside a tokenizer file.
pub fn tokenizer_config_beside(tokenizer: &Path) -> PathBuf {
    tokenizer.with_file_name(TOKENIZER_CONFIG_FILE)
}

/// The messages of a conversation, texts escaped by `escape`. SimpleLLaMA's default system
/// prompt (a `CUSTOM` record, or a record without a system message) gives no system message:
/// the model's template then applies its own default.
pub fn conversation_messages<'a>(
    system: &str,
    turns: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    escape: &dyn Fn(&str) -> String,
) -> Vec<Message> {
    let mut out = Vec::new();
    if system != DEFAULT_SYSTEM_PROMPT {
        out.push(Message::new("system", escape(system)));
    }
    for (user, assistant) in turns {
        out.push(Message::new("user", escape(user)));
        if let Some(a) = assistant {
            out.push(Message::new("assistant", escape(a)));
        }
    }
    out
}

fn conv_messages(tok: &ChatTokenizer, conv: &Conversation) -> Vec<Message> {
    let escape = |t: &str| tok.escape(t).into_owned();
    conversation_messages(
        &conv.system,
        conv.turns.iter().map(|t| (t.user.as_str(), Some(t.assistant.as_str()))),
        &escape,
    )
}

/// The token index at byte `at` of `text`: the tokens of `text[..at]` must be a prefix of
/// `whole` (the tokens of `text`, cut into `segments`), else the boundary is not a token
/// boundary. Only the piece of text that `at` falls in is encoded again.
fn token_boundary(
    tok: &ChatTokenizer,
    tpl: &ChatTemplate,
    text: &str,
    at: usize,
    whole: &[u32],
    segments: &[Segment],
) -> Result<usize> {
    let not_boundary = || {
        anyhow!(
            "{}: an assistant span boundary at byte {at} is not a token boundary (the tokens of the text \
             before it are not a prefix of the whole's); the loss mask cannot be located exactly",
            tpl.name()
        )
    };
    if at == 0 || at == text.len() {
        return Ok(if at == 0 { 0 } else { whole.len() });
    }
    // The first piece starts at byte 0, so some piece starts at or before `at`.
    let seg = segments[segments.partition_point(|s| s.byte <= at) - 1];
    if seg.byte == at {
        return Ok(seg.token);
    }
    if seg.special {
        return Err(not_boundary());
    }
    let prefix = if segments.len() == 1 {
        tok.encode(&text[..at])?
    } else {
        let mut p = whole[..seg.token].to_vec();
        p.extend(tok.encode_piece(&text[seg.byte..at])?);
        p
    };
    if !whole.starts_with(&prefix) {
        return Err(not_boundary());
    }
    Ok(prefix.len())
}

/// The first 40 characters of a message, for an error.
fn preview(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

/// Formats and tokenizes a conversation with its template; supervised: the assistant replies
/// (every one, or the final one) through the template's stop token.
pub fn tokenize_with_template(
    tok: &ChatTokenizer,
    tpl: &ChatTemplate,
    conv: &Conversation,
    train_on: TrainOn,
) -> Result<Example> {
    let messages = conv_messages(tok, conv);
    let assistant_at: Vec<usize> =
        messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
    let (text, marked) = tpl.render_marked(&messages, false)?;
    let (tokens, segments) = tok.encode_segmented(&text)?;
    let mut spans: Vec<Range<usize>> = Vec::new();
    if tpl.has_generation_markers() {
        if marked.len() != assistant_at.len() {
            bail!(
                "{}: {} {{% generation %}} spans for {} assistant messages; the loss mask cannot be located exactly",
                tpl.name(),
                marked.len(),
                assistant_at.len()
            );
        }
        for r in &marked {
            let a = token_boundary(tok, tpl, &text, r.start, &tokens, &segments)?;
            let b = token_boundary(tok, tpl, &text, r.end, &tokens, &segments)?;
            spans.push(a..b);
        }
    } else {
        let wanted: Vec<usize> = match train_on {
            TrainOn::AllAssistant => assistant_at.clone(),
            TrainOn::FinalReply => assistant_at.last().copied().into_iter().collect(),
        };
        for &k in &wanted {
            let prompt = tpl.render(&messages[..k], true)?;
            let through = tpl.render(&messages[..=k], false)?;
            if !text.starts_with(&prompt) || !through.starts_with(&prompt) || !text.starts_with(&through) {
                bail!(
                    "{}: rendering the conversation up to assistant message {k} (with and without the \
                     generation prompt) does not give prefixes of the whole rendering; the loss mask cannot be \
                     located exactly (a template that renders earlier turns differently, e.g. dropping past \
                     reasoning, needs {{% generation %}} markers)",
                    tpl.name()
                );
            }
            // The span must hold the reply: a template that leaves it out (or renders nothing)
            // would otherwise give an example with no supervised token, or supervise the template's
            // own text, without a word.
            let content = &messages[k].content;
            if !text[prompt.len()..through.len()].contains(content.as_str()) {
                bail!(
                    "{}: assistant message {k} ({:?}) is not rendered between the generation prompt and the end \
                     of its turn; the loss mask cannot be located exactly",
                    tpl.name(),
                    preview(content)
                );
            }
            let a = token_boundary(tok, tpl, &text, prompt.len(), &tokens, &segments)?;
            let b = token_boundary(tok, tpl, &text, through.len(), &tokens, &segments)?;
            spans.push(a..b);
        }
    }
    if train_on == TrainOn::FinalReply && tpl.has_generation_markers() {
        spans = spans.pop().into_iter().collect();
    }
    // A reply ends at the stop token: what the template writes after it (ChatML's newline,
    // Mistral's space) is the next turn's context, not something to generate.
    let stop = tok.eoa_id();
    let mut ex = Example { supervised: vec![false; tokens.len()], tokens };
    for r in spans {
        // A marked span that stops just before the stop token (`{% endgeneration %}<|im_end|>`)
        // takes it: a model never shown its stop token as a target would not learn to stop.
        let r = if ex.tokens.get(r.end) == Some(&stop) && !ex.tokens[r.clone()].contains(&stop) {
            r.start..r.end + 1
        } else {
            r
        };
        let Some(p) = ex.tokens[r.clone()].iter().position(|&t| t == stop) else {
            // A model never shown its stop token as a target does not learn to stop.
            bail!(
                "{}: an assistant reply (tokens {}..{}) ends without the stop token {} ({stop}); the template \
                 must write it after each reply",
                tpl.name(),
                r.start,
                r.end,
                tok.inner().id_to_token(stop).unwrap_or_default()
            );
        };
        ex.supervised[r.start..r.start + p + 1].iter_mut().for_each(|s| *s = true);
    }
    let pad = tok.pad_id();
    if let Some(i) = (0..ex.len()).find(|&i| ex.supervised[i] && ex.tokens[i] == pad) {
        bail!(
            "{}: supervised token {i} is the pad id {pad}, which marks ignored targets; give the tokenizer \
             a pad token the template never writes (`sft import --add-chat-tokens` adds <PAD>)",
            tpl.name()
        );
    }
    Ok(ex)
}

/// The prompt for the next reply: the history and the new user message, with the generation
/// prompt. Texts are escaped as in training.
pub fn template_prompt(
    tok: &ChatTokenizer,
    tpl: &ChatTemplate,
    system: &str,
    history: &[Turn],
    user: &str,
) -> Result<String> {
    let escape = |t: &str| tok.escape(t).into_owned();
    let turns = history.iter().map(|t| (t.user.as_str(), Some(t.assistant.as_str()))).chain([(user, None)]);
    let messages = conversation_messages(system, turns, &escape);
    tpl.render(&messages, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_tags_become_filter_blocks_keeping_whitespace_control() {
        let (s, found) =
            rewrite_generation_tags("a{%- generation %}b{% endgeneration -%}c{% if x %}{% endif %}");
        assert!(found);
        assert_eq!(s, "a{%- filter __sft_generation %}b{% endfilter -%}c{% if x %}{% endif %}");
        assert!(!rewrite_generation_tags("{{ x }}{% for m in y %}{% endfor %}").1);
        // A `{%}` (its `%}` overlapping the `{%`) sliced backwards; now it is left to the parser.
        assert_eq!(rewrite_generation_tags("a{%}b"), ("a{%}b".to_string(), false));
        assert_eq!(rewrite_generation_tags("a{%}b%}c").0, "a{%}b%}c");
    }

    /// minijinja panicked reversing an empty string; the render is an error instead.
    #[test]
    fn a_template_the_engine_panics_on_is_an_error() {
        let tpl = ChatTemplate::new("t", "{{ messages[0]['content'][::-1] }}", BTreeMap::new()).unwrap();
        assert_eq!(tpl.render(&[Message::new("user", "ab")], false).unwrap(), "ba");
        let err = format!("{:#}", tpl.render(&[Message::new("user", "")], false).unwrap_err());
        assert!(err.contains("rendering failed"), "{err}");
    }

    #[test]
    fn a_render_that_does_not_end_runs_out_of_fuel_or_room_and_a_long_conversation_does_not() {
        let endless =
            "{% for a in range(100000) %}{% for b in range(100000) %}{% set c = b %}{% endfor %}{% endfor %}";
        let tpl = ChatTemplate::new("endless", endless, BTreeMap::new()).unwrap();
        let started = std::time::Instant::now();
        let err = format!("{:#}", tpl.render(&[Message::new("user", "hi")], false).unwrap_err());
        assert!(err.contains("endless: rendering failed") && err.contains("without finishing"), "{err}");
        eprintln!("fuel ran out after {:.2} s", started.elapsed().as_secs_f64());

        // A few instructions that print 100 MB each stop at the output bound, not at the fuel
        // (or the memory).
        let wide = "{% for a in range(1000) %}{{ 'x' * 100000000 }}{% endfor %}";
        let tpl = ChatTemplate::new("wide", wide, BTreeMap::new()).unwrap();
        let err = format!("{:#}", tpl.render(&[Message::new("user", "hi")], false).unwrap_err());
        assert!(
            err.contains("wide: rendering failed")
                && err.contains(&format!("passed {} bytes", RENDER_BYTES_BASE + 16 * 6)),
            "{err}"
        );
        // A reply of 4 MB is far inside its bound.
        let long = "{% for m in messages %}{{ m.content }}{% endfor %}";
        let tpl = ChatTemplate::new("long", long, BTreeMap::new()).unwrap();
        let reply = "y".repeat(4 << 20);
        assert_eq!(
            tpl.render(&[Message::new("user", "hi"), Message::new("assistant", &*reply)], false)
                .unwrap()
                .len(),
            2 + (4 << 20)
        );

        // Every fixture template renders a conversation of 10,000 messages within the budget.
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/templates");
        let messages: Vec<Message> = (0..10_000)
            .map(|i| Message::new(["user", "assistant"][i % 2], format!("message {i} with some words in it")))
            .collect();
        let tokens: BTreeMap<String, String> =
            [("bos_token", "<s>"), ("eos_token", "</s>")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        for name in ["llama3.1.jinja", "llama3.2.jinja", "mistral.jinja", "smollm2.jinja", "tinyllama.jinja"]
        {
            let source = std::fs::read_to_string(format!("{fixtures}/{name}")).unwrap();
            let tpl = ChatTemplate::new(name, &source, tokens.clone()).unwrap();
            let text = tpl.render(&messages, true).unwrap_or_else(|e| panic!("{e:#}"));
            assert!(text.contains("message 9999 with"), "{name}");
        }
    }

    #[test]
    fn strftime_matches_python_for_known_dates() {
        // 2024-07-26 00:00:00 UTC, a Friday; 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(strftime("%d %b %Y", 1_721_952_000).unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %e %H:%M:%S %j %y %%", 951_827_696).unwrap(),
            "Tuesday February 29 12:34:56 060 00 %"
        );
        assert!(strftime("%Q", 0).is_err());
    }

    #[test]
    fn tojson_matches_json_dumps() {
        let tpl = ChatTemplate::new(
            "test",
            r#"{{ {"b": [1, 2.5, "é\n", none], "a": {}, "c": []} | tojson }}|{{ {"b": 1, "a": 2} | tojson(sort_keys=true) }}|{{ {"k": [1]} | tojson(indent=2) }}"#,
            BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(
            tpl.render(&[], false).unwrap(),
            "{\"b\": [1, 2.5, \"é\\n\", null], \"a\": {}, \"c\": []}|{\"a\": 2, \"b\": 1}|{\n  \"k\": [\n    1\n  ]\n}"
        );
    }

    #[test]
    fn hugging_face_globals_filters_and_python_methods() {
        let source = "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}\
            {% if m.content.startswith('#') %}{% continue %}{% endif %}[{{ m.content.strip() }}|{{ m.role.upper() }}]\
            {% endfor %}{{ eos_token }}{% if add_generation_prompt %}{{ raise_exception('no prompt: ' ~ bos_token) }}{% endif %}";
        let tokens =
            [("eos_token".to_string(), "</s>".to_string()), ("bos_token".to_string(), "<s>".to_string())];
        let tpl = ChatTemplate::new("t.jinja", source, tokens.into_iter().collect()).unwrap();
        let msgs =
            [Message::new("user", "  a  "), Message::new("assistant", "#skip"), Message::new("user", "c")];
        assert_eq!(tpl.render(&msgs, false).unwrap(), "[a|USER]</s>");
        let err = tpl.render(&msgs, true).unwrap_err().to_string();
        assert_eq!(err, "t.jinja: rendering failed: no prompt: <s>");
        let date = ChatTemplate::new("d", "{{ strftime_now('%Y') | length }}", BTreeMap::new()).unwrap();
        assert_eq!(date.render(&[], false).unwrap(), "4");
        assert!(ChatTemplate::new("bad.jinja", "{% if %}", BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("bad.jinja"));
    }
}
