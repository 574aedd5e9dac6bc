//! Data preparation speed: formatting + tokenization of conversations, and `prepare` end to end.
//!
//! Uses SimpleLLaMA's tokenizer where `../shared/simplellama/bpe_8k.json` (or
//! `$SIMPLELLAMA_TOKENIZER`) exists, else a small tokenizer trained on the bench's own data.
//! Throughput is in tokens. For the comparison with Python `tokenizers`, see
//! scripts/compare_prepare.py.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use sft::data::{prepare, tokenize_conversation, ChatTokenizer, Conversation, PrepareOptions, TrainOn, Turn};
use sft::rng::Rng;

// The tests' data helpers: where SimpleLLaMA's tokenizer is looked for is written once.
#[allow(dead_code)]
#[path = "../tests/common/data.rs"]
mod test_data;

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "gravity",
    "force",
    "photosynthesis",
    "light",
    "energy",
    "plants",
    "Paris",
    "capital",
    "answer",
    "question",
    "2+2",
    "equals",
    "4.",
    "Hello!",
    "how",
    "are",
    "you",
    "naïve",
    "日本語",
    "🙂",
    "(x)",
    "{a: 1}",
    "\n",
    "don't",
    "it's",
];

fn conversations(n: usize) -> Vec<Conversation> {
    let mut rng = Rng::new(5);
    let mut text = |lo: usize, hi: usize| {
        let k = lo + rng.below(hi - lo + 1);
        let mut s = String::new();
        for i in 0..k {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(WORDS[rng.below(WORDS.len())]);
        }
        s
    };
    (0..n)
        .map(|_| Conversation {
            system: sft::data::DEFAULT_SYSTEM_PROMPT.to_string(),
            turns: vec![Turn { user: text(5, 60), assistant: text(20, 200) }; 2],
        })
        .collect()
}

fn tokenizer(dir: &Path, convs: &[Conversation]) -> (ChatTokenizer, PathBuf) {
    if let Some(p) = test_data::simplellama_tokenizer_path() {
        return (ChatTokenizer::from_file(&p).unwrap(), p);
    }
    let p = dir.join("tok.json");
    (sft::data::train_tokenizer(convs, 2000, &p).unwrap(), p)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let convs = conversations(2000);
    let (tok, tok_path) = tokenizer(dir.path(), &convs);
    let n_tokens: usize =
        convs.iter().map(|c| tokenize_conversation(&tok, c, TrainOn::FinalReply).unwrap().len()).sum();

    let mut g = c.benchmark_group("prepare");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(n_tokens as u64));
    g.bench_function("tokenize_conversations_parallel", |b| {
        b.iter(|| {
            let n: usize = convs
                .par_iter()
                .map(|c| tokenize_conversation(&tok, c, TrainOn::FinalReply).unwrap().len())
                .sum();
            black_box(n)
        })
    });
    // The same tokens through the plain `tokenizers` pipeline (whole formatted text, no cache).
    let texts: Vec<String> = convs.iter().map(sft::data::format::training_text).collect();
    g.bench_function("tokenizers_crate_encode_parallel", |b| {
        b.iter(|| {
            let n: usize = texts.par_iter().map(|t| tok.encode(t).unwrap().len()).sum();
            black_box(n)
        })
    });
    let records: Vec<serde_json::Value> = convs
        .iter()
        .map(|c| {
            serde_json::json!({"Template": ["CUSTOM"], "User": c.turns.iter().map(|t| &t.user).collect::<Vec<_>>(),
                "Assistant": c.turns.iter().map(|t| &t.assistant).collect::<Vec<_>>()})
        })
        .collect();
    let data = dir.path().join("chat.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let mut opts = PrepareOptions::new(&data, &tok_path, &dir.path().join("out"));
    opts.max_seq_len = 1 << 20;
    g.bench_function("prepare_end_to_end", |b| b.iter(|| black_box(prepare(&opts).unwrap().n_tokens)));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
