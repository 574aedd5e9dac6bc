//! A model's chat template (`tokenizer_config.json`), damaged, through what `prepare`, `inspect`,
//! `generate` and `chat` do with it: load the tokenizer with the template, tokenize conversations
//! with their loss masks (the final reply and every reply), encode a generation prompt. The real
//! templates of tests/fixtures/templates are cut, spliced and given Jinja snippets (generation
//! markers, stray tags, exceptions, out-of-range indexing), and the special tokens of the config
//! changed or removed. Every outcome is `Ok` or a clean `Err`; a panic fails the test with the seed
//! and the damage.
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 4). `SFT_FUZZ_SEED` replays a run.

mod common;

use common::fuzz::{self, Tally};
use common::templates::{fixture, model_dir};
use serde_json::{json, Value};
use sft::data::{tokenize_conversation, ChatTokenizer, Conversation, TrainOn, Turn};
use sft::rng::Rng;
use std::path::Path;
use std::time::{Duration, Instant};

/// The fixtures and the tokens their configs name.
const TEMPLATES: [(&str, &[(&str, &str)]); 5] = [
    ("llama3.2.jinja", &[("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>")]),
    ("llama3.1.jinja", &[("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>")]),
    ("tinyllama.jinja", &[("bos_token", "<s>"), ("eos_token", "</s>")]),
    ("smollm2.jinja", &[("eos_token", "<|im_end|>")]),
    ("mistral.jinja", &[("bos_token", "<s>"), ("eos_token", "</s>")]),
];

/// Pieces of Jinja spliced into a template.
const SNIPPETS: &[&str] = &[
    "{% generation %}",
    "{% endgeneration %}",
    "{% generation %}{{ message['content'] }}{% endgeneration %}",
    "{{ eos_token }}",
    "{{ bos_token }}",
    "{{ '<|eot_id|>' }}",
    "{{ '</s>' }}",
    "{% if %}",
    "{% endif %}",
    "{% endfor %}",
    "{% for message in messages %}",
    "{{ raise_exception('refused') }}",
    "{{ messages[7]['content'] }}",
    "{{ messages[-1]['content'] }}",
    "{{ message['content'] * 3 }}",
    "{{ message['content'][::-1] }}",
    "{{ loop.index0 }}",
    "{% set x = 1 / 0 %}",
    "{{ undefined_name.field }}",
    "{{ message }}",
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}",
    "{{ '\u{0}' }}",
    "{#",
    "{{",
    "}}",
    "\n",
];

fn conversations() -> Vec<Conversation> {
    vec![
        Conversation {
            system: "You are terse.".into(),
            turns: vec![
                Turn { user: "Hi".into(), assistant: "Hello!".into() },
                Turn { user: "2+2?".into(), assistant: "4".into() },
            ],
        },
        Conversation {
            system: String::new(),
            turns: vec![Turn { user: "say <|eot_id|> </s>".into(), assistant: "".into() }],
        },
    ]
}

/// What the commands do with a tokenizer and its template.
fn exercise(path: &Path) -> anyhow::Result<()> {
    let tok = ChatTokenizer::from_file(path)?;
    for conv in conversations() {
        for train_on in [TrainOn::FinalReply, TrainOn::AllAssistant] {
            // A template that cannot locate a reply is an error for that conversation alone.
            if let Ok(ex) = tokenize_conversation(&tok, &conv, train_on) {
                assert!(ex.spans().iter().all(|&[a, b]| a <= b && b as usize <= ex.len()), "{ex:?}");
            }
        }
        let _ = tok.encode_prompt(&conv.system, &conv.turns[..conv.turns.len() - 1], "next?");
    }
    Ok(())
}

/// One damage of the template text.
fn damage_text(rng: &mut Rng, text: &mut String) -> String {
    let chars: Vec<char> = text.chars().collect();
    let at = rng.below(chars.len() + 1);
    let mut out: Vec<char> = chars.clone();
    let what = match rng.below(4) {
        0 => {
            let end = (at + 1 + rng.below(24)).min(chars.len());
            out.drain(at.min(end)..end);
            format!("chars {at}..{end} cut")
        }
        1 => {
            let end = (at + 1 + rng.below(40)).min(chars.len());
            let piece: Vec<char> = chars[at.min(end)..end].to_vec();
            let to = rng.below(out.len() + 1);
            out.splice(to..to, piece);
            format!("chars {at}..{end} copied to {to}")
        }
        _ => {
            let s = SNIPPETS[rng.below(SNIPPETS.len())];
            out.splice(at..at, s.chars());
            format!("{s:?} at char {at}")
        }
    };
    *text = out.into_iter().collect();
    what
}

#[test]
fn a_damaged_chat_template_renders_or_fails_cleanly() {
    let seconds = fuzz::seconds(4.0);
    let seed = fuzz::seed(seconds);
    // Llama 3.2's template prints today's date: fixed, so that a replay renders the same text.
    std::env::set_var("SOURCE_DATE_EPOCH", "1721952000");

    let root = tempfile::tempdir().unwrap();
    let mut dirs = Vec::new();
    for (k, (file, tokens)) in TEMPLATES.iter().enumerate() {
        let path = model_dir(root.path(), &format!("m{k}"), &fixture(file), tokens, &[]);
        exercise(&path).unwrap_or_else(|e| panic!("{file} as it is: {e:#}"));
        let config: Value = serde_json::from_str(
            &std::fs::read_to_string(path.with_file_name("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        dirs.push((file, path, config));
    }

    let mut tally = Tally::default();
    let mut rng = Rng::new(seed);
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < deadline {
        let (file, path, base) = &dirs[rng.below(dirs.len())];
        let mut config = base.clone();
        let mut what = format!("seed {seed} input {}: {file}:", tally.inputs);
        let mut template = config["chat_template"].as_str().unwrap().to_string();
        for _ in 0..1 + rng.below(3) {
            what.push_str(&format!(" {};", damage_text(&mut rng, &mut template)));
        }
        config["chat_template"] = json!(template);
        if rng.below(4) == 0 {
            let field = ["eos_token", "bos_token", "pad_token", "chat_template"][rng.below(4)];
            let value = [
                json!(null),
                json!(""),
                json!("<|im_start|>"),
                json!("not a token"),
                json!({"content": "</s>"}),
                json!(3),
                json!([{"name": "default", "template": "{{ messages }}"}]),
            ][rng.below(7)]
            .clone();
            what.push_str(&format!(" {field} = {value};"));
            config[field] = value;
        }
        std::fs::write(path.with_file_name("tokenizer_config.json"), config.to_string()).unwrap();
        tally.run(&what, "tokenizer", || exercise(path));
    }
    println!(
        "fuzzed chat templates: {} inputs: {} loaded, {} clean errors, {} failures",
        tally.inputs,
        tally.ok,
        tally.errors,
        tally.failures.len()
    );
    tally.assert_clean(seed);
}
