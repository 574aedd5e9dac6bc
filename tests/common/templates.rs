//! Tokenizers and model directories for chat-template tests: a byte-level BPE shaped like
//! Llama 3's with every fixture template's special tokens, and tokenizer_config.json beside it.

use std::path::{Path, PathBuf};

/// A template of tests/fixtures/templates.
pub fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/templates").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// GPT-2's byte → printable char map (as the `tokenizers` ByteLevel pre-tokenizer uses).
pub fn byte_chars() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..=255u32 {
        let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

pub const SPECIALS: [&str; 12] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "<unk>",
];

/// A byte-level BPE shaped like Llama 3's (its split regex, no prefix space), with `merges`
/// (pairs of byte-level strings) and every template's special tokens.
pub fn tokenizer_json(merges: &[(&str, &str)]) -> serde_json::Value {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let map = |t: &str| t.bytes().map(|b| chars[b as usize]).collect::<String>();
    let mut merge_list = Vec::new();
    for (a, b) in merges {
        let (a, b) = (map(a), map(b));
        let id = vocab.len();
        vocab.insert(format!("{a}{b}"), id.into());
        merge_list.push(serde_json::json!(format!("{a} {b}")));
    }
    let base = vocab.len();
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": base + i, "content": t, "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
             "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merge_list}
    })
}

/// A model directory: tokenizer.json and a tokenizer_config.json with `template` and `tokens`.
pub fn model_dir(
    root: &Path,
    name: &str,
    template: &str,
    tokens: &[(&str, &str)],
    merges: &[(&str, &str)],
) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(merges).to_string()).unwrap();
    let mut config = serde_json::Map::new();
    config.insert("chat_template".into(), template.into());
    for (k, v) in tokens {
        config.insert(k.to_string(), (*v).into());
    }
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::Value::Object(config).to_string()).unwrap();
    dir.join("tokenizer.json")
}
