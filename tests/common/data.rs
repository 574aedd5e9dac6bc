//! Chat data for the data tests: generated conversations, SimpleLLaMA's file schema and
//! tokenizer, a small trained tokenizer.

use std::path::{Path, PathBuf};

use sft::data::{Conversation, Turn};

/// SimpleLLaMA's tokenizer: `$SIMPLELLAMA_TOKENIZER`, else `../shared/simplellama/bpe_8k.json`,
/// else `../../shared/simplellama/bpe_8k.json` (relative to the crate; the scripts look in the
/// same places, scripts/simplellama.py). `None` with a notice that the test is skipped.
pub fn simplellama_tokenizer() -> Option<PathBuf> {
    let found = simplellama_tokenizer_path();
    if found.is_none() {
        eprintln!("notice: SimpleLLaMA tokenizer not found (set SIMPLELLAMA_TOKENIZER); skipping");
    }
    found
}

/// Where [`simplellama_tokenizer`] looks, without the notice (benches/prepare.rs falls back to a
/// tokenizer of its own).
pub fn simplellama_tokenizer_path() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let candidates = std::env::var_os("SIMPLELLAMA_TOKENIZER").map(PathBuf::from).into_iter().chain([
        root.join("../shared/simplellama/bpe_8k.json"),
        root.join("../../shared/simplellama/bpe_8k.json"),
    ]);
    candidates.into_iter().find(|c| c.is_file())
}

pub fn conv(system: &str, turns: &[(&str, &str)]) -> Conversation {
    Conversation {
        system: system.to_string(),
        turns: turns.iter().map(|(u, a)| Turn { user: u.to_string(), assistant: a.to_string() }).collect(),
    }
}

const WORDS: &[&str] = &[
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "what",
    "is",
    "gravity",
    "force",
    "of",
    "attraction",
    "between",
    "masses",
    "hello",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "2+2",
    "4",
    "answer",
    "question",
    "Paris",
    "capital",
    "France",
    "water",
    "boils",
    "at",
    "100",
    "degrees",
    "Celsius",
    "\n",
    "!",
    "?",
    ",",
];

/// Deterministic varied conversations (some multi-turn, some with the default prompt).
pub fn synthetic_conversations(n: usize, seed: u64) -> Vec<Conversation> {
    let mut rng = sft::rng::Rng::new(seed);
    let text = |rng: &mut sft::rng::Rng, max_words: usize| {
        let k = rng.below(max_words + 1);
        (0..k).map(|_| WORDS[rng.below(WORDS.len())]).collect::<Vec<_>>().join(" ")
    };
    (0..n)
        .map(|_| {
            let system = if rng.below(2) == 0 {
                sft::data::DEFAULT_SYSTEM_PROMPT.to_string()
            } else {
                text(&mut rng, 8)
            };
            let n_turns = 1 + rng.below(3);
            let turns = (0..n_turns)
                .map(|_| Turn { user: text(&mut rng, 20), assistant: text(&mut rng, 30) })
                .collect();
            Conversation { system, turns }
        })
        .collect()
}

/// Writes conversations in SimpleLLaMA's schema (a JSON list).
pub fn write_simplellama_json(path: &Path, convs: &[Conversation]) {
    let records: Vec<serde_json::Value> = convs
        .iter()
        .map(|c| {
            serde_json::json!({
                "Template": [c.system],
                "User": c.turns.iter().map(|t| t.user.clone()).collect::<Vec<_>>(),
                "Assistant": c.turns.iter().map(|t| t.assistant.clone()).collect::<Vec<_>>(),
            })
        })
        .collect();
    std::fs::write(path, serde_json::to_string(&records).unwrap()).unwrap();
}

/// Trains a small tokenizer on synthetic data into `dir/tok.json`.
pub fn small_tokenizer(dir: &Path) -> sft::data::ChatTokenizer {
    let convs = synthetic_conversations(200, 7);
    sft::data::train_tokenizer(&convs, 400, &dir.join("tok.json")).unwrap()
}
