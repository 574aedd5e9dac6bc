//! Models' own chat templates (tests/fixtures/templates: the real strings of Llama 3.1/3.2,
//! TinyLlama (Zephyr), SmolLM2 (ChatML) and Mistral): rendering against hand-derived strings, the
//! loss masks `sft inspect` shows, and the errors for spans that cannot be located exactly.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::cli::{command, run_fails, s};
use common::templates::{fixture, model_dir};
use sft::data::template::Message;
use sft::data::{
    tokenize_conversation, ChatFormat, ChatTemplate, ChatTokenizer, Conversation, FormatChoice, TrainOn, Turn,
};

/// 2024-07-26 00:00 UTC: `strftime_now` reads SOURCE_DATE_EPOCH, so Llama 3.2's date is fixed.
const EPOCH: &str = "1721952000";

struct Case {
    name: &'static str,
    file: &'static str,
    tokens: &'static [(&'static str, &'static str)],
    /// The conversation [system?] Hi → Hello! → 2+2? → 4, rendered without generation prompt.
    full: &'static str,
    /// The prompt for the second reply (history, then the generation prompt).
    prompt: &'static str,
    /// The final reply through its stop token, and the first.
    final_reply: &'static str,
    first_reply: &'static str,
    with_system: bool,
}

const LLAMA3_FULL: &str = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>";
const LLAMA3_PROMPT: &str = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "llama3.2",
            file: "llama3.2.jinja",
            tokens: &[("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>")],
            full: LLAMA3_FULL,
            prompt: LLAMA3_PROMPT,
            final_reply: "4<|eot_id|>",
            first_reply: "Hello!<|eot_id|>",
            with_system: true,
        },
        Case {
            name: "llama3.1",
            file: "llama3.1.jinja",
            tokens: &[("bos_token", "<|begin_of_text|>"), ("eos_token", "<|eot_id|>")],
            full: LLAMA3_FULL,
            prompt: LLAMA3_PROMPT,
            final_reply: "4<|eot_id|>",
            first_reply: "Hello!<|eot_id|>",
            with_system: true,
        },
        Case {
            name: "tinyllama",
            file: "tinyllama.jinja",
            tokens: &[("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", "</s>")],
            full: "<|system|>\nYou are terse.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n",
            prompt: "<|system|>\nYou are terse.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n<|user|>\n2+2?</s>\n<|assistant|>\n",
            final_reply: "4</s>",
            first_reply: "Hello!</s>",
            with_system: true,
        },
        Case {
            name: "smollm2",
            file: "smollm2.jinja",
            tokens: &[
                ("bos_token", "<|im_start|>"),
                ("eos_token", "<|im_end|>"),
                ("unk_token", "<|endoftext|>"),
                ("pad_token", "<|im_end|>"),
            ],
            full: "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
            prompt: "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
            final_reply: "4<|im_end|>",
            first_reply: "Hello!<|im_end|>",
            with_system: true,
        },
        Case {
            name: "mistral",
            file: "mistral.jinja",
            tokens: &[("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")],
            full: "<s>[INST] Hi [/INST]Hello!</s> [INST] 2+2? [/INST]4</s> ",
            prompt: "<s>[INST] Hi [/INST]Hello!</s> [INST] 2+2? [/INST]",
            final_reply: "4</s>",
            first_reply: "Hello!</s>",
            with_system: false,
        },
    ]
}

fn tokens_map(tokens: &[(&str, &str)]) -> BTreeMap<String, String> {
    tokens.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn messages(with_system: bool, final_reply: bool) -> Vec<Message> {
    let mut m = Vec::new();
    if with_system {
        m.push(Message::new("system", "You are terse."));
    }
    m.push(Message::new("user", "Hi"));
    m.push(Message::new("assistant", "Hello!"));
    m.push(Message::new("user", "2+2?"));
    if final_reply {
        m.push(Message::new("assistant", "4"));
    }
    m
}

fn conversation(with_system: bool) -> Conversation {
    Conversation {
        system: if with_system { "You are terse.".into() } else { sft::data::DEFAULT_SYSTEM_PROMPT.into() },
        turns: vec![
            Turn { user: "Hi".into(), assistant: "Hello!".into() },
            Turn { user: "2+2?".into(), assistant: "4".into() },
        ],
    }
}

fn chat_file(dir: &Path, with_system: bool) -> PathBuf {
    let path = dir.join(format!("chat-{with_system}.json"));
    let mut msgs = Vec::new();
    if with_system {
        msgs.push(serde_json::json!({"role": "system", "content": "You are terse."}));
    }
    for (u, a) in [("Hi", "Hello!"), ("2+2?", "4")] {
        msgs.push(serde_json::json!({"role": "user", "content": u}));
        msgs.push(serde_json::json!({"role": "assistant", "content": a}));
    }
    std::fs::write(&path, serde_json::json!([{ "messages": msgs }]).to_string()).unwrap();
    path
}

#[test]
fn real_templates_render_the_hand_derived_strings() {
    std::env::set_var("SOURCE_DATE_EPOCH", EPOCH);
    for case in cases() {
        let tpl = ChatTemplate::new(case.name, &fixture(case.file), tokens_map(case.tokens)).unwrap();
        assert_eq!(tpl.render(&messages(case.with_system, true), false).unwrap(), case.full, "{}", case.name);
        assert_eq!(
            tpl.render(&messages(case.with_system, false), true).unwrap(),
            case.prompt,
            "{}",
            case.name
        );
    }
}

#[test]
fn smollm2_and_llama_defaults_without_a_system_message() {
    std::env::set_var("SOURCE_DATE_EPOCH", EPOCH);
    let smol = ChatTemplate::new("smollm2", &fixture("smollm2.jinja"), BTreeMap::new()).unwrap();
    assert_eq!(
        smol.render(&[Message::new("user", "Hi")], true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    // Llama 3.2 trims message content and dates the system header with strftime_now.
    let llama = ChatTemplate::new(
        "llama3.2",
        &fixture("llama3.2.jinja"),
        tokens_map(&[("bos_token", "<|begin_of_text|>")]),
    )
    .unwrap();
    assert_eq!(
        llama.render(&[Message::new("user", "  Hi \n")], true).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\
         Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn mistral_refuses_a_system_message_with_its_own_error() {
    let tpl = ChatTemplate::new("mistral.jinja", &fixture("mistral.jinja"), BTreeMap::new()).unwrap();
    let err = tpl.render(&messages(true, true), false).unwrap_err().to_string();
    assert!(err.contains("mistral.jinja") && err.contains("Conversation roles must alternate"), "{err}");
}

/// The row `sft inspect` prints for the one-conversation chat file.
fn inspect_row(tokenizer: &Path, chat: &Path, extra: &[&str]) -> String {
    let mut args =
        vec!["inspect", "--data", s(chat), "--tokenizer", s(tokenizer), "--batch-size", "1", "--no-shuffle"];
    args.extend_from_slice(extra);
    let out = command().args(&args).env("SOURCE_DATE_EPOCH", EPOCH).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "sft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let row = stdout.lines().skip_while(|l| !l.starts_with("--- row 0")).skip(1);
    // The row's text may span lines (templates write newlines).
    let mut text = Vec::new();
    for line in row {
        if line.starts_with("===") || line.contains(" batches, ") {
            break;
        }
        text.push(line);
    }
    text.join("\n")
}

#[test]
fn inspect_shows_masks_of_the_final_reply_or_every_reply() {
    let root = tempfile::tempdir().unwrap();
    for case in cases() {
        let tok =
            model_dir(root.path(), case.name, &fixture(case.file), case.tokens, &[("H", "e"), ("l", "l")]);
        let chat = chat_file(root.path(), case.with_system);
        let final_only = case.full.replacen(case.final_reply, &format!("⟦{}⟧", case.final_reply), 1);
        let row = inspect_row(&tok, &chat, &[]);
        assert_eq!(row, final_only, "{}: final reply only (the default)", case.name);
        let every = final_only.replacen(case.first_reply, &format!("⟦{}⟧", case.first_reply), 1);
        let row = inspect_row(&tok, &chat, &["--train-on", "all-assistant"]);
        assert_eq!(row, every, "{}: every reply", case.name);
    }
}

#[test]
fn library_masks_match_the_template_spans_token_for_token() {
    std::env::set_var("SOURCE_DATE_EPOCH", EPOCH);
    let root = tempfile::tempdir().unwrap();
    for case in cases() {
        let path = model_dir(root.path(), case.name, &fixture(case.file), case.tokens, &[]);
        let tok = ChatTokenizer::from_file(&path).unwrap();
        assert_eq!(tok.chat_format(), ChatFormat::Template);
        assert_eq!(tok.bos_id(), None, "{}: the template writes its own BOS", case.name);
        let eos = case.tokens.iter().find(|(k, _)| *k == "eos_token").unwrap().1;
        assert_eq!(tok.eoa_id(), tok.special_id(eos).unwrap());
        let ex = tokenize_conversation(&tok, &conversation(case.with_system), TrainOn::AllAssistant).unwrap();
        assert_eq!(ex.tokens, tok.encode(case.full).unwrap(), "{}: tokens of the rendering", case.name);
        let spans: Vec<String> = ex
            .spans()
            .iter()
            .map(|&[a, b]| tok.decode_with_specials(&ex.tokens[a as usize..b as usize]).unwrap())
            .collect();
        assert_eq!(spans, [case.first_reply, case.final_reply], "{}", case.name);
        // Generation's prompt is the rendering's prefix that the final reply continues.
        let prompt = tok
            .encode_prompt(
                &conversation(case.with_system).system,
                &conversation(case.with_system).turns[..1],
                "2+2?",
            )
            .unwrap();
        assert_eq!(prompt, tok.encode(case.prompt).unwrap(), "{}", case.name);
        assert!(ex.tokens.starts_with(&prompt));
    }
}

#[test]
fn special_token_strings_in_content_stay_text() {
    std::env::set_var("SOURCE_DATE_EPOCH", EPOCH);
    let root = tempfile::tempdir().unwrap();
    let case = &cases()[0];
    let path = model_dir(root.path(), case.name, &fixture(case.file), case.tokens, &[]);
    let tok = ChatTokenizer::from_file(&path).unwrap();
    let conv = Conversation {
        system: "s".into(),
        turns: vec![Turn { user: "say <|eot_id|> now".into(), assistant: "ok <|start_header_id|>".into() }],
    };
    let ex = tokenize_conversation(&tok, &conv, TrainOn::FinalReply).unwrap();
    let eot = tok.special_id("<|eot_id|>").unwrap();
    let header = tok.special_id("<|start_header_id|>").unwrap();
    // system, user and assistant each end with one <|eot_id|>; the typed ones are text.
    assert_eq!(ex.tokens.iter().filter(|&&t| t == eot).count(), 3);
    assert_eq!(ex.tokens.iter().filter(|&&t| t == header).count(), 3);
    let [a, b] = *ex.spans().last().unwrap();
    let reply = tok.decode_with_specials(&ex.tokens[a as usize..b as usize]).unwrap();
    assert_eq!(reply, "ok <\u{200B}|start_header_id|><|eot_id|>");
}

#[test]
fn generation_markers_give_the_same_spans_as_prefix_rendering() {
    let root = tempfile::tempdir().unwrap();
    let chatml = fixture("smollm2.jinja");
    let marked = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nDefault<|im_end|>\n' }}{% endif %}\
        {% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}\
        {% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let tokens: &[(&str, &str)] = &[("eos_token", "<|im_end|>")];
    let plain = ChatTokenizer::from_file(&model_dir(root.path(), "plain", &chatml, tokens, &[])).unwrap();
    let gen = ChatTokenizer::from_file(&model_dir(root.path(), "marked", marked, tokens, &[])).unwrap();
    assert!(gen.template().unwrap().has_generation_markers());
    // Markers around the content only: the stop token right after a span is supervised too.
    let content_only = marked.replace(
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    );
    assert_ne!(content_only, marked);
    let narrow =
        ChatTokenizer::from_file(&model_dir(root.path(), "narrow", &content_only, tokens, &[])).unwrap();
    for train_on in [TrainOn::FinalReply, TrainOn::AllAssistant] {
        let a = tokenize_conversation(&plain, &conversation(true), train_on).unwrap();
        let b = tokenize_conversation(&gen, &conversation(true), train_on).unwrap();
        assert_eq!(a, b, "{train_on:?}");
        assert_eq!(tokenize_conversation(&narrow, &conversation(true), train_on).unwrap(), a, "{train_on:?}");
    }
}

#[test]
fn spans_that_cannot_be_located_exactly_are_errors_naming_the_template() {
    let root = tempfile::tempdir().unwrap();
    let tokens: &[(&str, &str)] = &[("eos_token", "<|im_end|>"), ("pad_token", "<|endoftext|>")];
    // Earlier turns rendered differently once a later one exists: no prefix.
    let shifting = "{% for m in messages %}{% if loop.last %}[last]{% endif %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}\
                    {% if add_generation_prompt %}<|im_start|>{% endif %}";
    let tok = ChatTokenizer::from_file(&model_dir(root.path(), "shifting", shifting, tokens, &[])).unwrap();
    let err =
        format!("{:#}", tokenize_conversation(&tok, &conversation(true), TrainOn::FinalReply).unwrap_err());
    assert!(err.contains("shifting") && err.contains("cannot be located exactly"), "{err}");
    // The generation prompt ends inside a word the tokenizer merges with the reply ("Ans" + "wer").
    let merging = "{% for m in messages %}<|im_start|>{% if m.role == 'assistant' %}Ans{% endif %}{{ m.content }}<|im_end|>{% endfor %}\
                   {% if add_generation_prompt %}<|im_start|>Ans{% endif %}";
    let merges = [("A", "n"), ("An", "s"), ("w", "e"), ("we", "r"), ("Ans", "wer")];
    let tok = ChatTokenizer::from_file(&model_dir(root.path(), "merging", merging, tokens, &merges)).unwrap();
    let conv =
        Conversation { system: "s".into(), turns: vec![Turn { user: "q".into(), assistant: "wer".into() }] };
    let err = format!("{:#}", tokenize_conversation(&tok, &conv, TrainOn::FinalReply).unwrap_err());
    assert!(err.contains("merging") && err.contains("not a token boundary"), "{err}");
    // The same through the CLI: an error, not a panic, and no shards.
    let out = root.path().join("out");
    let tok_path = root.path().join("merging/tokenizer.json");
    let chat_merge = root.path().join("merge.json");
    std::fs::write(
        &chat_merge,
        r#"[{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wer"}]}]"#,
    )
    .unwrap();
    let err =
        run_fails(&["prepare", "--data", s(&chat_merge), "--tokenizer", s(&tok_path), "--out", s(&out)]);
    assert!(err.contains("not a token boundary"), "{err}");
    assert!(!out.join("train-00000.bin").exists());

    // Templates that leave the reply out, render nothing, or write no stop token after it: the
    // examples had no supervised token, or a reply the model would never learn to end.
    let cases = [
        ("useronly", "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}", "is not rendered"),
        ("empty", "", "is not rendered"),
        ("constant", "constant text", "is not rendered"),
        ("nostop", "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}", "without the stop token <|im_end|>"),
    ];
    for (name, template, needle) in cases {
        let tok = ChatTokenizer::from_file(&model_dir(root.path(), name, template, tokens, &[])).unwrap();
        let err = format!(
            "{:#}",
            tokenize_conversation(&tok, &conversation(true), TrainOn::FinalReply).unwrap_err()
        );
        assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
    }
}

#[test]
fn format_choice_flags_and_defaults() {
    let root = tempfile::tempdir().unwrap();
    let case = &cases()[3];
    let path = model_dir(root.path(), case.name, &fixture(case.file), case.tokens, &[]);
    // Forcing SimpleLLaMA's format on a tokenizer without its chat tokens says what is missing.
    let err =
        ChatTokenizer::load(&path, &FormatChoice::new(Some(ChatFormat::SimpleLlama), None)).unwrap_err();
    assert!(format!("{err:#}").contains("<SOU>"), "{err:#}");
    // --chat-template FILE replaces the config's template; its tokens still come from the config.
    let file = root.path().join("tiny.jinja");
    std::fs::write(&file, fixture("tinyllama.jinja")).unwrap();
    let tok = ChatTokenizer::load(&path, &FormatChoice::new(None, Some(file.clone()))).unwrap();
    assert_eq!(tok.template().unwrap().source(), fixture("tinyllama.jinja"));
    assert_eq!(tok.eoa_id(), tok.special_id("<|im_end|>").unwrap());
    assert!(
        ChatTokenizer::load(&path, &FormatChoice::new(Some(ChatFormat::SimpleLlama), Some(file))).is_err()
    );
    // A template-format tokenizer and a SimpleLLaMA one over the same file differ in fingerprint.
    let plain = root.path().join("plain");
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::copy(&path, plain.join("tokenizer.json")).unwrap();
    let err = ChatTokenizer::load(
        &plain.join("tokenizer.json"),
        &FormatChoice::new(Some(ChatFormat::Template), None),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("tokenizer_config.json"), "{err:#}");
}

#[test]
fn prepare_keeps_the_template_with_the_shards() {
    let root = tempfile::tempdir().unwrap();
    let case = &cases()[3];
    let tok = model_dir(root.path(), case.name, &fixture(case.file), case.tokens, &[]);
    let chat = chat_file(root.path(), true);
    let out = root.path().join("prepared");
    let status = command()
        .args(["prepare", "--data", s(&chat), "--tokenizer", s(&tok), "--out", s(&out), "--train-share", "1"])
        .status()
        .unwrap();
    assert!(status.success());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["chat_template"], fixture(case.file));
    let row = inspect_row(&out.join("tokenizer.json"), &out, &[]);
    let expected = case.full.replacen(case.final_reply, &format!("⟦{}⟧", case.final_reply), 1);
    assert_eq!(row, expected);
    // The same shards read with another template are refused (another fingerprint).
    let other = root.path().join("other.jinja");
    std::fs::write(&other, fixture("tinyllama.jinja")).unwrap();
    let err =
        run_fails(&["inspect", "--data", s(&out), "--tokenizer", s(&tok), "--chat-template", s(&other)]);
    assert!(err.contains("was made with the tokenizer"), "{err}");
}

/// A model with a template and none of SimpleLLaMA's tokens, start to finish: prepare in its
/// template, fine-tune from its checkpoint, evaluate, generate, export.
#[test]
fn a_template_model_prepares_trains_generates_and_exports() {
    let root = tempfile::tempdir().unwrap();
    let case = &cases()[3];
    let tok = model_dir(root.path(), case.name, &fixture(case.file), case.tokens, &[("H", "e")]);
    let chat = root.path().join("chat.jsonl");
    let mut lines = String::new();
    for i in 0..40 {
        let msgs = serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": format!("what is {i} plus one?")},
            {"role": "assistant", "content": format!("{} it is", i + 1)},
        ]});
        lines.push_str(&format!("{msgs}\n"));
    }
    std::fs::write(&chat, lines).unwrap();
    let data = root.path().join("prepared");
    common::cli::run_ok(&["prepare", "--data", s(&chat), "--tokenizer", s(&tok), "--out", s(&data)]);
    let init = root.path().join("init");
    common::cli::run_ok(&["init", "--model", "tiny", "--tokenizer", s(&tok), "--out", s(&init)]);
    let out = root.path().join("run");
    let mut cfg = common::train::tiny_config(&data, Path::new(""), &out, sft::data::BatchMode::Dynamic);
    cfg.from_scratch = false;
    cfg.init_from = Some(init.clone());
    cfg.max_steps = Some(2);
    cfg.dropout = Some(0.0);
    let config = root.path().join("run.json");
    std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let stdout = common::cli::run_ok(&["train", "--config", s(&config)]);
    assert!(stdout.contains("done: 2 steps"), "{stdout}");
    let step = out.join("step-2");
    assert!(step.join("tokenizer_config.json").is_file(), "the template travels into checkpoints");
    let eval =
        common::cli::run_ok(&["eval", "--checkpoint", s(&step), "--data", s(&chat), "--device", "cpu"]);
    assert!(eval.contains("mean masked loss"), "{eval}");
    let reply = common::cli::run_ok(&[
        "generate",
        "--checkpoint",
        s(&step),
        "--prompt",
        "what is 3 plus one?",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(!reply.contains("<|im_start|>"), "{reply}");
    let export = root.path().join("export");
    common::cli::run_ok(&["export", "--checkpoint", s(&step), "--out", s(&export)]);
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(export.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(exported["chat_template"], fixture(case.file));
}

/// Cutting text at added tokens and encoding the pieces through the word cache gives exactly
/// the ids of `tokenizers` (the template path's fast encode).
#[test]
fn segmented_encoding_equals_the_tokenizers_encoding() {
    let root = tempfile::tempdir().unwrap();
    let mut toks = vec![ChatTokenizer::from_file(&model_dir(
        root.path(),
        "m",
        &fixture("smollm2.jinja"),
        &[("eos_token", "<|im_end|>")],
        &[("H", "e"), ("l", "l"), ("\n", "\n")],
    ))
    .unwrap()];
    match common::data::simplellama_tokenizer_path() {
        Some(p) => toks.push(ChatTokenizer::from_file(&p).unwrap()),
        None => eprintln!("../shared/simplellama/bpe_8k.json absent: SimpleLLaMA's tokenizer not checked"),
    }
    toks.push(common::data::small_tokenizer(root.path()));
    let pieces = [
        "<|im_start|>",
        "<|im_end|>",
        "<SOA>",
        "<EOA>",
        "Hello",
        " world",
        "\n\n",
        "  ",
        "é日本",
        "<",
        "|",
        "x<|im",
        "<|eot_id|>",
        "<s>",
        "</s>",
        "12345",
        "'s",
        "\t",
    ];
    let mut rng = sft::rng::Rng::new(5);
    for tok in &toks {
        for _ in 0..300 {
            let n = 1 + (rng.next_u64() % 12) as usize;
            let text: String =
                (0..n).map(|_| pieces[(rng.next_u64() % pieces.len() as u64) as usize]).collect();
            let (ids, segments) = tok.encode_segmented(&text).unwrap();
            assert_eq!(ids, tok.encode(&text).unwrap(), "{text:?}");
            assert_eq!(segments.first().map(|s| s.byte), Some(0));
        }
    }
}
