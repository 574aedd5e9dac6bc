//! A Hugging Face `tokenizer.json` checked for the chat tokens, and training one on chat data.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::utils::SysRegex;
use tokenizers::{
    AddedToken, DecoderWrapper, Model, ModelWrapper, NormalizerWrapper, OffsetReferential, OffsetType,
    PostProcessorWrapper, PreTokenizedString, PreTokenizer, PreTokenizerWrapper, Tokenizer, TokenizerBuilder,
};

use super::chat::{Conversation, Turn};
use super::format::{
    escape_specials, inference_prompt_escaping, CHAT_TOKENS, EOA, PAD, SIMPLELLAMA_SPECIALS,
};
use super::template::{template_prompt, tokenizer_config_beside, ChatFormat, ChatTemplate};

/// A `tokenizer.json`'s bytes parsed by the `tokenizers` library, with what makes that library
/// panic instead of returning an error refused first (found by tests/fuzz_tokenizer.rs, in
/// tokenizers 0.22): a syntax error inside the decoder's object (its deserializer `expect`s the
/// object to parse), and a BPE merge whose second token is shorter than the model's
/// `continuing_subword_prefix` (it slices the prefix off). A panic left inside the library is
/// caught and returned as an error too. The error does not name the file: callers add it.
pub fn parse_tokenizer_json(bytes: &[u8]) -> Result<Tokenizer> {
    let json: serde_json::Value = serde_json::from_slice(bytes).context("not a valid tokenizer.json")?;
    let model = &json["model"];
    if let (Some(prefix), Some(merges)) =
        (model["continuing_subword_prefix"].as_str(), model["merges"].as_array())
    {
        for (i, merge) in merges.iter().enumerate() {
            let second = match merge {
                serde_json::Value::String(pair) => pair.split_once(' ').map(|(_, b)| b),
                serde_json::Value::Array(pair) => pair.get(1).and_then(|b| b.as_str()),
                _ => None,
            };
            if let Some(b) = second.filter(|b| !b.is_char_boundary(prefix.len())) {
                bail!(
                    "field \"model.merges\"[{i}]: its second token {b:?} is shorter than \
                     model.continuing_subword_prefix {prefix:?}, which every merged continuation starts with"
                );
            }
        }
    }
    match crate::panics::catch(|| Tokenizer::from_bytes(bytes)) {
        Ok(parsed) => parsed.map_err(|e| anyhow!("not a valid tokenizer.json: {e}")),
        Err(panic) => {
            bail!("not a valid tokenizer.json: the tokenizers library panicked reading it: {panic}")
        }
    }
}

/// The six chat tokens and `<PAD>` that `tok` lacks as special added tokens, in that order.
pub fn missing_chat_tokens(tok: &Tokenizer) -> Vec<&'static str> {
    let specials: std::collections::HashSet<String> =
        tok.get_added_tokens_decoder().into_values().filter(|t| t.special).map(|t| t.content).collect();
    CHAT_TOKENS.iter().chain([&PAD]).copied().filter(|t| !specials.contains(*t)).collect()
}

/// A tokenizer with the chat tokens known to exist. Cheap to clone (shared), `Send + Sync`.
#[derive(Clone)]
pub struct ChatTokenizer {
    inner: Arc<Tokenizer>,
    pad_id: u32,
    eoa_id: u32,
    /// Special-token id by its string, for the pieces of the chat format.
    special_ids: HashMap<String, u32>,
    /// Strings escaped in user and assistant text: the tokenizer's special tokens and
    /// SimpleLLaMA's ten.
    escaped: Vec<String>,
    /// `escape_first_bytes[b]`: some escaped string starts with byte `b`.
    escape_first_bytes: [bool; 256],
    fingerprint: u64,
    /// The file it was loaded from (named by errors about data made with another tokenizer).
    path: Option<PathBuf>,
    /// How [`ChatTokenizer::encode_text`] may skip parts of the general `tokenizers` pipeline.
    fast: FastPath,
    /// The special token the tokenizer's post-processor puts before a text (see [`leading_special`]).
    bos_id: Option<u32>,
    /// The model's chat template, when conversations are formatted with it (else SimpleLLaMA's).
    template: Option<Arc<ChatTemplate>>,
    /// Added tokens by first byte (longest first), when text can be cut at them and each piece
    /// encoded through the word cache ([`ChatTokenizer::encode_segmented`]).
    split_tokens: Option<Arc<SplitTokens>>,
    /// `dropped_bytes[b]`: a byte-level BPE without an unknown token or byte fallback whose
    /// vocabulary lacks byte `b`'s character, so that `tokenizers` drops `b` from any text.
    /// SimpleLLaMA's bpe_8k is one (it lacks 161 bytes: tab, `{`, every byte of a non-ASCII
    /// character), and its recipe trains on what it keeps, so the tokens stay the same here;
    /// [`ChatTokenizer::dropped_chars`] lets `sft prepare` say what was lost.
    dropped_bytes: Option<Box<[bool; 256]>>,
}

/// Added tokens (content, id) by their first byte, longest first.
type SplitTokens = HashMap<u8, Vec<(String, u32)>>;

/// One piece of a text cut at its added tokens: its byte offset and first token index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub byte: usize,
    pub token: usize,
    /// An added token (one id) rather than text.
    pub special: bool,
}

/// Which chat format a tokenizer is loaded for (`--chat-format`, `--chat-template`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FormatChoice {
    /// None: the template of the tokenizer_config.json beside the tokenizer when it has one,
    /// else SimpleLLaMA's format.
    pub format: Option<ChatFormat>,
    /// A Jinja file used instead of the tokenizer config's template.
    pub template_file: Option<PathBuf>,
}

impl FormatChoice {
    pub fn new(format: Option<ChatFormat>, template_file: Option<PathBuf>) -> Self {
        FormatChoice { format, template_file }
    }
}

/// The template a tokenizer file is used with under `choice`.
fn choose_template(path: &Path, choice: &FormatChoice) -> Result<Option<ChatTemplate>> {
    let config = tokenizer_config_beside(path);
    Ok(match (choice.format, &choice.template_file) {
        (Some(ChatFormat::SimpleLlama), Some(f)) => {
            bail!("--chat-template {} needs --chat-format template, not simplellama", f.display())
        }
        (Some(ChatFormat::SimpleLlama), None) => None,
        (_, Some(f)) => Some(ChatTemplate::from_file(f, Some(&config))?),
        (Some(ChatFormat::Template), None) => {
            if !config.is_file() {
                bail!(
                    "--chat-format template: {} is missing (the model's chat template lives there); pass \
                     --chat-template FILE instead",
                    config.display()
                );
            }
            Some(ChatTemplate::from_tokenizer_config(&config)?.ok_or_else(|| {
                anyhow!("{}: no `chat_template`; pass --chat-template FILE", config.display())
            })?)
        }
        (None, None) if config.is_file() => ChatTemplate::from_tokenizer_config(&config)?,
        (None, None) => None,
    })
}

/// The id a template-format tokenizer pads with (an ignored target): `<PAD>` when added, else
/// the config's pad token unless it is the stop token, else a dedicated pad or unknown token.
fn template_pad_id(tok: &Tokenizer, tpl: &ChatTemplate, stop: u32) -> Option<u32> {
    let config_pad = tpl.token("pad_token").map(str::to_string);
    let unk = tpl.token("unk_token").map(str::to_string);
    [
        Some(PAD.to_string()),
        config_pad,
        Some("<|finetune_right_pad_id|>".into()),
        Some("<pad>".into()),
        unk,
        Some("<unk>".into()),
    ]
    .into_iter()
    .flatten()
    .filter_map(|t| tok.token_to_id(&t))
    .find(|&id| id != stop)
}

/// The special token that `tok`'s post-processor puts before a single text, if any: Llama 2's
/// `<s>`, Llama 3's `<|begin_of_text|>`. Pretrained models saw it at position 0 of every text,
/// so rows and prompts start with it. SimpleLLaMA's tokenizer and those `sft tokenizer train`
/// writes have no post-processor: nothing changes for them.
pub fn leading_special(tok: &Tokenizer) -> Option<u32> {
    let plain = tok.encode_fast("a", false).ok()?;
    let with = tok.encode_fast("a", true).ok()?;
    let (plain, with) = (plain.get_ids(), with.get_ids());
    let &first = with.first()?;
    let special = tok.get_added_tokens_decoder().get(&first).is_some_and(|t| t.special);
    (special && with.len() > plain.len() && with[1..].starts_with(plain)).then_some(first)
}

/// Escaped text holds no added token; without a normalizer its encoding is the pre-tokenizer's
/// words each run through the model, so the model's ids per word can be cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FastPath {
    /// The general pipeline (a normalizer, or non-special added tokens).
    None,
    /// Any pre-tokenizer, words cached.
    Words,
    /// GPT-2's byte-level pre-tokenizer done here (same regex, no per-byte offset bookkeeping),
    /// words cached by their raw text.
    ByteLevel { add_prefix_space: bool },
}

/// Words in one thread's cache before it is cleared (bounds memory on endless vocabularies).
const WORD_CACHE_MAX: usize = 1 << 20;

/// FxHash: the cache's keys are short words; SipHash would cost more than the lookup saves.
#[derive(Default)]
struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.0 = (self.0.rotate_left(5) ^ i as u64).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type WordCache = HashMap<String, Vec<u32>, BuildHasherDefault<FxHasher>>;

thread_local! {
    /// Per-thread cache of word → ids, tagged with the tokenizer's fingerprint.
    static WORD_CACHE: RefCell<(u64, WordCache)> = RefCell::new((0, WordCache::default()));
}

/// The regex of the `tokenizers` ByteLevel pre-tokenizer (GPT-2's), compiled by the same engine.
static GPT2_SPLIT: LazyLock<SysRegex> = LazyLock::new(|| {
    SysRegex::new(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")
        .expect("valid regex")
});

/// GPT-2's byte → printable char map, as in `tokenizers`.
static BYTE_CHARS: LazyLock<[char; 256]> = LazyLock::new(|| {
    let mut out = ['\0'; 256];
    let mut n = 0;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    out
});

/// FNV-1a, 64 bits: a stable fingerprint of a tokenizer file, stored in every shard.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The fingerprint of a tokenizer file's bytes used with a chat template (`None`: SimpleLLaMA's
/// format, the plain FNV-1a of the bytes, as before templates existed).
pub fn format_fingerprint(bytes: &[u8], template: Option<&str>) -> u64 {
    match template {
        None => fnv1a64(bytes),
        Some(source) => {
            let mut mixed = bytes.to_vec();
            mixed.extend_from_slice(b"\0chat_template\0");
            mixed.extend_from_slice(source.as_bytes());
            fnv1a64(&mixed)
        }
    }
}

/// The fingerprint of the tokenizer file at `path` (holding `bytes`) loaded with the default
/// format choice: with the template of the tokenizer_config.json beside it, if any.
pub fn file_fingerprint(path: &Path, bytes: &[u8]) -> Result<u64> {
    Ok(format_fingerprint(bytes, super::template::default_template_source(path)?.as_deref()))
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .field("fingerprint", &format_args!("{:016x}", self.fingerprint))
            .finish()
    }
}

impl ChatTokenizer {
    /// Loads a `tokenizer.json`; checks that the six chat tokens and `<PAD>` are special tokens.
    ///
    /// A `tokenizer_config.json` beside it with a `chat_template` makes that template the chat
    /// format (see [`Self::load`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::load(path, &FormatChoice::default())
    }

    /// Loads a `tokenizer.json` for the chat format `choice` picks. SimpleLLaMA's format needs
    /// its chat tokens and `<PAD>`; a template needs an `eos_token` (the stop token) and a pad id.
    /// The fingerprint covers the template's source too: shards made in one format are refused
    /// by a tokenizer loaded for another.
    pub fn load(path: &Path, choice: &FormatChoice) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("{}: cannot read tokenizer", path.display()))?;
        let tok = parse_tokenizer_json(&bytes).with_context(|| path.display().to_string())?;
        let template = choose_template(path, choice)?;
        let fingerprint = format_fingerprint(&bytes, template.as_ref().map(ChatTemplate::source));
        let mut tok = Self::from_tokenizer_with(tok, fingerprint, template.map(Arc::new))
            .with_context(|| format!("{}", path.display()))?;
        tok.path = Some(path.to_path_buf());
        Ok(tok)
    }

    /// The file this tokenizer was loaded from or saved to.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    fn from_tokenizer(tok: Tokenizer, fingerprint: u64) -> Result<Self> {
        Self::from_tokenizer_with(tok, fingerprint, None)
    }

    fn from_tokenizer_with(
        mut tok: Tokenizer,
        fingerprint: u64,
        template: Option<Arc<ChatTemplate>>,
    ) -> Result<Self> {
        let added = tok.get_added_tokens_decoder();
        let mut special_ids = HashMap::new();
        let mut escaped: Vec<String> = SIMPLELLAMA_SPECIALS.iter().map(|s| s.to_string()).collect();
        for (id, t) in &added {
            if t.special {
                special_ids.insert(t.content.clone(), *id);
                if !escaped.contains(&t.content) {
                    escaped.push(t.content.clone());
                }
            }
        }
        let missing = missing_chat_tokens(&tok);
        if template.is_none() && !missing.is_empty() {
            bail!(
                "tokenizer lacks the chat special tokens {} (they must be added special tokens; \
                 `sft import --add-chat-tokens` adds them to a Hugging Face model)",
                missing.join(", ")
            );
        }
        // Longest first, so that a special string containing another is escaped whole.
        escaped.sort_by_key(|s| std::cmp::Reverse(s.len()));
        if tok.get_decoder().is_none() {
            let is_byte_level = tok
                .get_pre_tokenizer()
                .and_then(|p| serde_json::to_string(p).ok())
                .is_some_and(|s| s.contains("\"ByteLevel\""));
            if is_byte_level {
                // SimpleLLaMA's file has no decoder; without one, decoded text shows `Ġ` for spaces.
                tok.with_decoder(Some(ByteLevelDecoder::default()));
            }
        }
        // BPE dropout makes a word's ids random: no cache then.
        let dropout = matches!(tok.get_model(), ModelWrapper::BPE(b) if b.dropout.is_some_and(|p| p > 0.0));
        let fast = if tok.get_normalizer().is_some() || !added.values().all(|t| t.special) || dropout {
            FastPath::None
        } else {
            match tok.get_pre_tokenizer() {
                None => FastPath::None,
                Some(PreTokenizerWrapper::ByteLevel(b)) if b.use_regex => {
                    FastPath::ByteLevel { add_prefix_space: b.add_prefix_space }
                }
                Some(_) => FastPath::Words,
            }
        };
        // Cutting at added tokens matches `tokenizers` only when they match anywhere, verbatim.
        let plain_match = added.values().all(|t| !t.lstrip && !t.rstrip && !t.single_word);
        let split_tokens = (fast != FastPath::None && plain_match).then(|| {
            let mut by_byte = SplitTokens::new();
            for (id, t) in &added {
                if let Some(&b) = t.content.as_bytes().first() {
                    by_byte.entry(b).or_default().push((t.content.clone(), *id));
                }
            }
            for v in by_byte.values_mut() {
                v.sort_by_key(|(c, _)| std::cmp::Reverse(c.len()));
            }
            Arc::new(by_byte)
        });
        let mut escape_first_bytes = [false; 256];
        for e in &escaped {
            if let Some(&b) = e.as_bytes().first() {
                escape_first_bytes[b as usize] = true;
            }
        }
        let (pad_id, eoa_id, bos_id) = match &template {
            None => (special_ids[PAD], special_ids[EOA], leading_special(&tok)),
            Some(tpl) => {
                let Some(eos) = tpl.token("eos_token") else {
                    bail!(
                        "{}: no `eos_token` (the stop token of a reply); a template's special tokens come from \
                         tokenizer_config.json beside the tokenizer",
                        tpl.name()
                    );
                };
                let stop = tok.token_to_id(eos).ok_or_else(|| {
                    anyhow!("{}: eos_token {eos:?} is not a token of the tokenizer", tpl.name())
                })?;
                let pad = template_pad_id(&tok, tpl, stop).ok_or_else(|| {
                    anyhow!(
                        "{}: no pad token (ignored targets need an id no reply uses): add one with \
                         `sft import --add-chat-tokens`, or set `pad_token` in tokenizer_config.json",
                        tpl.name()
                    )
                })?;
                // The template writes the BOS token itself (Llama 3's `{{ bos_token }}`).
                (pad, stop, None)
            }
        };
        let dropped_bytes = dropped_bytes(&tok);
        Ok(ChatTokenizer {
            dropped_bytes,
            escape_first_bytes,
            fast,
            bos_id,
            template,
            split_tokens,
            pad_id,
            eoa_id,
            special_ids,
            escaped,
            inner: Arc::new(tok),
            fingerprint,
            path: None,
        })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The token that ends a reply: `<EOA>`, or a template's `eos_token`.
    pub fn eoa_id(&self) -> u32 {
        self.eoa_id
    }

    /// The chat format conversations are formatted with.
    pub fn chat_format(&self) -> ChatFormat {
        if self.template.is_some() {
            ChatFormat::Template
        } else {
            ChatFormat::SimpleLlama
        }
    }

    /// The model's chat template, in the template format.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_deref()
    }

    /// The token that starts every row and prompt, when the tokenizer's post-processor adds one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// FNV-1a of the tokenizer file's bytes.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// The id of a special token string such as `<SOA>`.
    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.special_ids.get(token).copied()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// The characters of `text` that the tokenizer drops (it has no token for one of their bytes,
    /// and neither an unknown token nor byte fallback), in order; empty for most tokenizers.
    pub fn dropped_chars(&self, text: &str) -> Vec<char> {
        let Some(dropped) = &self.dropped_bytes else { return Vec::new() };
        if !text.bytes().any(|b| dropped[b as usize]) {
            return Vec::new();
        }
        let mut buf = [0u8; 4];
        text.chars().filter(|c| c.encode_utf8(&mut buf).bytes().any(|b| dropped[b as usize])).collect()
    }

    /// Encodes text as the tokenizer does: special-token strings become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.guarded("encode", || self.inner.encode_fast(text, false))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Escapes special-token strings (see [`escape_specials`]) so that `text` stays text.
    pub fn escape<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        // Most text holds no byte that starts a special token: skip the substring searches.
        if !text.bytes().any(|b| self.escape_first_bytes[b as usize]) {
            return std::borrow::Cow::Borrowed(text);
        }
        escape_specials(text, &self.escaped)
    }

    /// Encodes as [`Self::encode`] does (added-token strings become their ids), cutting the text at
    /// its added tokens and encoding each piece through the word cache; also returns the pieces.
    /// A tokenizer that cannot be cut so gives one piece, encoded by `tokenizers`.
    pub fn encode_segmented(&self, text: &str) -> Result<(Vec<u32>, Vec<Segment>)> {
        let Some(split) = &self.split_tokens else {
            return Ok((self.encode(text)?, vec![Segment { byte: 0, token: 0, special: false }]));
        };
        let bytes = text.as_bytes();
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut segments = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hit = split
                .get(&bytes[i])
                .and_then(|cands| cands.iter().find(|(c, _)| bytes[i..].starts_with(c.as_bytes())));
            let Some((content, id)) = hit else {
                i += 1;
                continue;
            };
            if start < i {
                segments.push(Segment { byte: start, token: ids.len(), special: false });
                ids.extend(self.encode_words(&text[start..i])?);
            }
            segments.push(Segment { byte: i, token: ids.len(), special: true });
            ids.push(*id);
            i += content.len();
            start = i;
        }
        if start < bytes.len() {
            segments.push(Segment { byte: start, token: ids.len(), special: false });
            ids.extend(self.encode_words(&text[start..])?);
        }
        Ok((ids, segments))
    }

    /// Encodes a text piece that holds no added token (a piece of [`Self::encode_segmented`]).
    pub fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_words(text)
    }

    /// The special-token strings [`Self::escape`] escapes in texts.
    pub fn escaped_strings(&self) -> &[String] {
        &self.escaped
    }

    /// Encodes user or assistant text: special-token strings in it are escaped first.
    ///
    /// Escaped text holds no added token, so (without a normalizer) its encoding is the
    /// pre-tokenizer's words each run through the model: most words repeat, so the model's
    /// output per word is cached per thread. Tests check the result against [`Self::encode`].
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let text = self.escape(text);
        self.encode_words(&text)
    }

    /// Encodes text that holds no added token through the word cache.
    fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        match self.fast {
            FastPath::None => return self.encode(text),
            FastPath::Words => {
                let mut pts = PreTokenizedString::from(text);
                let pre = self.inner.get_pre_tokenizer().expect("checked in from_tokenizer");
                self.guarded("encode", || pre.pre_tokenize(&mut pts))?;
                self.with_cache(|cache| {
                    for (word, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                        self.push_word(cache, word, word, &mut ids)?;
                    }
                    Ok(())
                })?;
            }
            FastPath::ByteLevel { add_prefix_space } => {
                let prefixed;
                let s: &str = if add_prefix_space && !text.starts_with(' ') {
                    prefixed = format!(" {text}");
                    &prefixed
                } else {
                    text
                };
                self.with_cache(|cache| {
                    let mut mapped = String::new();
                    let mut word = |w: &str, ids: &mut Vec<u32>| -> Result<()> {
                        if let Some(hit) = cache.get(w) {
                            ids.extend_from_slice(hit);
                            return Ok(());
                        }
                        mapped.clear();
                        mapped.extend(w.bytes().map(|b| BYTE_CHARS[b as usize]));
                        self.push_word(cache, w, &mapped, ids)
                    };
                    let mut prev = 0;
                    for (a, b) in GPT2_SPLIT.find_iter(s) {
                        if prev < a {
                            word(&s[prev..a], &mut ids)?;
                        }
                        word(&s[a..b], &mut ids)?;
                        prev = b;
                    }
                    if prev < s.len() {
                        word(&s[prev..], &mut ids)?;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(ids)
    }

    fn with_cache(&self, f: impl FnOnce(&mut WordCache) -> Result<()>) -> Result<()> {
        WORD_CACHE.with(|cell| {
            let mut guard = cell.borrow_mut();
            let (owner, cache) = &mut *guard;
            if *owner != self.fingerprint || cache.len() > WORD_CACHE_MAX {
                cache.clear();
                *owner = self.fingerprint;
            }
            f(cache)
        })
    }

    /// Appends the ids of `word` (given to the model as `model_input`), through the cache.
    fn push_word(
        &self,
        cache: &mut WordCache,
        word: &str,
        model_input: &str,
        ids: &mut Vec<u32>,
    ) -> Result<()> {
        if let Some(hit) = cache.get(word) {
            ids.extend_from_slice(hit);
            return Ok(());
        }
        let toks: Vec<u32> = self
            .guarded("encode", || self.inner.get_model().tokenize(model_input))?
            .iter()
            .map(|t| t.id)
            .collect();
        ids.extend_from_slice(&toks);
        cache.insert(word.to_string(), toks);
        Ok(())
    }

    /// The prompt for the next reply ([`inference_prompt`]) with the texts escaped as training
    /// escapes them: a pretrained tokenizer's own special strings (Llama 3's `<|eot_id|>`) typed
    /// by a user would otherwise become control tokens that training never showed in text.
    ///
    /// [`inference_prompt`]: super::inference_prompt
    pub fn inference_prompt(&self, system: &str, history: &[Turn], user: &str) -> String {
        inference_prompt_escaping(system, history, user, &self.escaped)
    }

    /// The ids of [`Self::inference_prompt`], after [`Self::bos_id`] when there is one: the
    /// prefix of the training row a reply continues.
    /// In the template format, the template's rendering with the generation prompt.
    pub fn encode_prompt(&self, system: &str, history: &[Turn], user: &str) -> Result<Vec<u32>> {
        if let Some(tpl) = &self.template {
            return self.encode(&template_prompt(self, tpl, system, history, user)?);
        }
        let mut ids: Vec<u32> = self.bos_id.into_iter().collect();
        ids.extend(self.encode(&self.inference_prompt(system, history, user))?);
        Ok(ids)
    }

    /// [`Self::encode_text`] without the word cache: the `tokenizers` encode of the escaped text.
    pub fn encode_text_uncached(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.encode(&self.escape(text))
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.guarded("decode", || self.inner.decode(ids, true))
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode_with_specials(&self, ids: &[u32]) -> Result<String> {
        self.guarded("decode", || self.inner.decode(ids, false))
    }

    /// `f`, a call into the tokenizers library, with its error, or a panic inside the library,
    /// as an error naming the file the tokenizer came from. The library panics on some
    /// tokenizer files it loads without complaint (tokenizers 0.22: a `normalizer` of `[""]`
    /// panics when it normalizes text; found by tests/fuzz_tokenizer.rs).
    fn guarded<T>(&self, op: &str, f: impl FnOnce() -> tokenizers::Result<T>) -> Result<T> {
        let failed = |e: &dyn std::fmt::Display| match &self.path {
            Some(path) => anyhow!("{}: {op} failed: {e}", path.display()),
            None => anyhow!("tokenizer: {op} failed: {e}"),
        };
        match crate::panics::catch(f) {
            Ok(result) => result.map_err(|e| failed(&e)),
            Err(panic) => Err(failed(&format!("the tokenizers library panicked: {panic}"))),
        }
    }
}

/// The bytes a byte-level BPE would drop: those whose byte-level character is not in its
/// vocabulary, when it has neither an unknown token nor byte fallback to stand for them. None
/// when nothing can be dropped (or the tokenizer is not a byte-level BPE).
fn dropped_bytes(tok: &Tokenizer) -> Option<Box<[bool; 256]>> {
    let ModelWrapper::BPE(bpe) = tok.get_model() else { return None };
    if bpe.unk_token.is_some() || bpe.byte_fallback {
        return None;
    }
    let byte_level = matches!(tok.get_pre_tokenizer(), Some(PreTokenizerWrapper::ByteLevel(_)));
    if !byte_level {
        return None;
    }
    let vocab = bpe.get_vocab();
    let mut dropped = Box::new([false; 256]);
    let mut any = false;
    for (b, ch) in byte_level_chars().into_iter().enumerate() {
        if !vocab.contains_key(&ch.to_string()) {
            dropped[b] = true;
            any = true;
        }
    }
    any.then_some(dropped)
}

/// The character the byte-level pre-tokenizer writes for each byte (GPT-2's table): printable
/// bytes stand for themselves, the other 68 take the characters from U+0100 up, in byte order.
fn byte_level_chars() -> [char; 256] {
    let printable =
        |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut out = ['\0'; 256];
    let mut next = 0x100u32;
    for (b, c) in out.iter_mut().enumerate() {
        let b = b as u32;
        *c = if printable(b) {
            char::from_u32(b).expect("a byte is a char")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are chars")
        };
    }
    out
}

/// The largest vocabulary `train_tokenizer` accepts (the trainer's tables grow with it: about 70
/// bytes an id, so an absurd size would abort on its allocation).
pub const MAX_TRAIN_VOCAB: usize = 1 << 20;

/// Runs of non-whitespace longer than this many bytes are cut into pieces for tokenizer training:
/// BPE training rescans a whole word at every merge it applies there, so one long word (a
/// whitespace-free blob) costs time quadratic in its length; pieces keep it linear, and no
/// useful token is this long.
pub const MAX_TRAIN_WORD_BYTES: usize = 64;

/// `text` cut (at char boundaries) so that no run of non-whitespace exceeds
/// [`MAX_TRAIN_WORD_BYTES`]; texts without such a run pass whole. Each piece is pre-tokenized on
/// its own (gaining the prefix space), which only touches the statistics of such runs.
fn split_long_words(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let (mut piece_start, mut run_start) = (0, 0);
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            run_start = i + c.len_utf8();
        } else if i + c.len_utf8() - run_start.max(piece_start) > MAX_TRAIN_WORD_BYTES {
            pieces.push(&text[piece_start..i]);
            piece_start = i;
            run_start = i;
        }
    }
    pieces.push(&text[piece_start..]);
    pieces
}

/// Trains a byte-level BPE (`add_prefix_space`, like SimpleLLaMA's) on the texts of `convs`,
/// with SimpleLLaMA's ten special tokens at ids 0–9 in its order, and saves it to `out`.
pub fn train_tokenizer(convs: &[Conversation], vocab_size: usize, out: &Path) -> Result<ChatTokenizer> {
    let min = 256 + SIMPLELLAMA_SPECIALS.len();
    if !(min..=MAX_TRAIN_VOCAB).contains(&vocab_size) {
        bail!(
            "vocab size {vocab_size} is out of range: a byte-level BPE trains with {min} to {MAX_TRAIN_VOCAB} ids \
             (256 bytes and SimpleLLaMA's ten special tokens at least)"
        );
    }
    if convs.is_empty() {
        bail!("no conversations to train the tokenizer on");
    }
    let mut tok = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default().into())
    .with_pre_tokenizer(Some(ByteLevel::new(true, true, true).into()))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .map_err(|e| anyhow!("building the tokenizer: {e}"))?;
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(SIMPLELLAMA_SPECIALS.iter().map(|s| AddedToken::from(*s, true)).collect())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let texts = convs
        .iter()
        .flat_map(|c| {
            std::iter::once(c.system.as_str())
                .chain(c.turns.iter().flat_map(|t| [t.user.as_str(), t.assistant.as_str()]))
        })
        .flat_map(split_long_words);
    tok.train(&mut trainer, texts).map_err(|e| anyhow!("training the tokenizer: {e}"))?;
    if let Some(parent) = out.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("{}: cannot create", parent.display()))?;
        }
    }
    let tok: Tokenizer = tok.into();
    let json = tok.to_string(false).map_err(|e| anyhow!("serializing the tokenizer: {e}"))?;
    let tmp = out.with_extension("json.tmp");
    std::fs::write(&tmp, json.as_bytes()).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("{}: cannot write", out.display()))?;
    for (i, s) in SIMPLELLAMA_SPECIALS.iter().enumerate() {
        if tok.token_to_id(s) != Some(i as u32) {
            bail!("trained tokenizer: {s} is not at id {i}");
        }
    }
    let mut tok = ChatTokenizer::from_tokenizer(tok, fnv1a64(json.as_bytes()))?;
    tok.path = Some(out.to_path_buf());
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Conversation, Turn};

    /// Our table of byte-level characters is the pre-tokenizer's alphabet, and the characters a
    /// vocabulary lacks a byte of are the ones `tokenizers` drops.
    /// A byte-level BPE trained on one tiny conversation ("zebra" → "zoo"), in `dir`.
    fn zebra_tokenizer(dir: &Path) -> PathBuf {
        let convs = vec![Conversation {
            system: "s".into(),
            turns: vec![Turn { user: "zebra".into(), assistant: "zoo".into() }],
        }];
        let path = dir.join("tokenizer.json");
        train_tokenizer(&convs, 300, &path).unwrap();
        path
    }

    #[test]
    fn the_characters_a_vocabulary_cannot_hold_are_named() {
        use std::collections::HashSet;
        let ours: HashSet<char> = byte_level_chars().into_iter().collect();
        let theirs: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        assert_eq!(ours, theirs);
        assert_eq!(byte_level_chars()[b' ' as usize], '\u{120}');

        let dir = tempfile::tempdir().unwrap();
        let path = zebra_tokenizer(dir.path());
        let tok = ChatTokenizer::from_file(&path).unwrap();
        assert!(tok.dropped_chars("zoo é\t{").is_empty());
        // The same tokenizer without "z" (nor any merge with it): "zoo" loses its z.
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["model"]["vocab"].as_object_mut().unwrap().remove("z");
        let merges: Vec<serde_json::Value> = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| !m.to_string().contains('z'))
            .cloned()
            .collect();
        json["model"]["merges"] = merges.into();
        let cut = dir.path().join("no-z.json");
        std::fs::write(&cut, json.to_string()).unwrap();
        let tok = ChatTokenizer::from_file(&cut).unwrap();
        assert_eq!(tok.dropped_chars("a zoo, a boa"), vec!['z']);
        let decoded = tok.decode(&tok.encode_text("zoo").unwrap()).unwrap();
        assert_eq!(decoded.trim(), "oo", "tokenizers drops what dropped_chars names");
    }

    /// Three inputs on which tokenizers 0.22 panicked (two while parsing, one while encoding),
    /// now plain errors.
    #[test]
    fn what_makes_the_tokenizers_library_panic_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = zebra_tokenizer(dir.path());
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let text = json.to_string();

        // A syntax error inside the decoder's object.
        let decoder = json["decoder"].to_string();
        let broken = text.replacen(&decoder, &decoder.replacen(':', "::", 1), 1);
        assert_ne!(broken, text);
        let err = format!("{:#}", parse_tokenizer_json(broken.as_bytes()).unwrap_err());
        assert!(err.contains("not a valid tokenizer.json") && err.contains("column"), "{err}");

        // A continuing-subword prefix longer than a merge's second token.
        let mut prefixed = json.clone();
        prefixed["model"]["continuing_subword_prefix"] = "##".into();
        let err = format!("{:#}", parse_tokenizer_json(prefixed.to_string().as_bytes()).unwrap_err());
        assert!(err.contains("model.merges") && err.contains("continuing_subword_prefix"), "{err}");

        // A normalizer of `[""]` loads, then panics inside the library when it normalizes text.
        let mut odd = json.clone();
        odd["normalizer"] = serde_json::json!([""]);
        let odd_path = dir.path().join("odd.json");
        std::fs::write(&odd_path, odd.to_string()).unwrap();
        let err = match ChatTokenizer::from_file(&odd_path) {
            Ok(tok) => format!("{:#}", tok.encode_text("zebra zoo").unwrap_err()),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains("odd.json"), "{err}");
    }
}
