//! `sft export`: the shipped directory loads back with the same logits (bf16 tolerance, f32
//! exactly), carries the tokenizer config, special tokens and generation config, and its chat
//! template renders exactly what sft's formatter produces.

mod common;

use std::path::Path;

use common::cli::{run_fails, run_ok as sft, s};
use common::data::{conv, small_tokenizer, synthetic_conversations};
use common::templates::{fixture, model_dir};
use sft::backend::cpu::CpuBackend;
use sft::data::format::{inference_prompt_escaping, join_pieces, training_pieces};
use sft::data::template::{Message, TOKENIZER_CONFIG_FILE};
use sft::data::{
    tokenize_conversation, ChatFormat, ChatTemplate, ChatTokenizer, Conversation, TrainOn,
    DEFAULT_SYSTEM_PROMPT,
};
use sft::generate::cli::all_logits;

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

fn safetensors_dtypes(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut d: Vec<String> = st.tensors().iter().map(|(_, v)| format!("{:?}", v.dtype())).collect();
    d.dedup();
    d
}

/// ‖a − b‖ / ‖a‖ over all positions.
fn relative_error(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (ra, rb) in a.iter().zip(b) {
        for (x, y) in ra.iter().zip(rb) {
            num += ((x - y) as f64).powi(2);
            den += (*x as f64).powi(2);
        }
    }
    (num / den).sqrt()
}

const IDS: [u32; 12] = [8, 40, 41, 9, 4, 50, 60, 70, 5, 6, 80, 90];

#[test]
fn export_loads_back_with_the_same_logits_and_ships_the_configs() {
    let root = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(root.path());
    let tok_path = root.path().join("tok.json");
    let init = root.path().join("init");
    sft(&["init", "--model", "tiny", "--tokenizer", s(&tok_path), "--out", s(&init)]);
    let reference = all_logits(CpuBackend::<f32>::new(), &init, &IDS).unwrap();

    let bf16 = root.path().join("bf16");
    sft(&["export", "--checkpoint", s(&init), "--out", s(&bf16)]);
    let f32_dir = root.path().join("f32");
    sft(&["export", "--checkpoint", s(&init), "--out", s(&f32_dir), "--dtype", "f32"]);
    for (dir, dtype, torch) in [(&bf16, "BF16", "bfloat16"), (&f32_dir, "F32", "float32")] {
        for f in [
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
        ] {
            assert!(dir.join(f).is_file(), "{} lacks {f}", dir.display());
        }
        assert_eq!(safetensors_dtypes(&dir.join("model.safetensors")), [dtype]);
        let config = read_json(&dir.join("config.json"));
        assert_eq!(config["torch_dtype"], torch);
        assert_eq!(config["eos_token_id"], tok.eoa_id());
        assert_eq!(config["pad_token_id"], tok.pad_id());
        let generation = read_json(&dir.join("generation_config.json"));
        assert_eq!(generation["eos_token_id"], tok.eoa_id());
        assert_eq!(generation["top_k"], 10);
        assert_eq!(generation["max_new_tokens"], 512);
        assert!((generation["temperature"].as_f64().unwrap() - 0.3).abs() < 1e-6);
        assert!((generation["top_p"].as_f64().unwrap() - 0.5).abs() < 1e-6);
        let specials = read_json(&dir.join("special_tokens_map.json"));
        assert_eq!(specials["eos_token"], "<EOA>");
        assert_eq!(specials["pad_token"], "<PAD>");
        let tok_config = read_json(&dir.join("tokenizer_config.json"));
        assert_eq!(tok_config["eos_token"], "<EOA>");
        assert!(tok_config["chat_template"].as_str().unwrap().contains("{% generation %}"));
        assert!(!root
            .path()
            .join(format!("{}.export-tmp", dir.file_name().unwrap().to_string_lossy()))
            .exists());
    }
    // Loaded directly, and through `sft import` as a Hugging Face directory.
    let back = root.path().join("back");
    sft(&["import", "--from", s(&bf16), "--out", s(&back)]);
    for dir in [&bf16, &back] {
        let logits = all_logits(CpuBackend::<f32>::new(), dir, &IDS).unwrap();
        let err = relative_error(&reference, &logits);
        eprintln!("{}: bf16 export, relative logit error {err:.2e}", dir.display());
        assert!(err > 0.0 && err < 1e-2, "{}: bf16 logits off by {err:.2e}", dir.display());
    }
    let exact = all_logits(CpuBackend::<f32>::new(), &f32_dir, &IDS).unwrap();
    assert_eq!(relative_error(&reference, &exact), 0.0);
    // An existing directory is refused, not overwritten.
    let err = run_fails(&["export", "--checkpoint", s(&init), "--out", s(&bf16)]);
    assert!(err.contains("already exists"), "{err}");
}

fn messages_of(c: &Conversation, final_reply: bool) -> Vec<Message> {
    let mut m = Vec::new();
    if c.system != DEFAULT_SYSTEM_PROMPT {
        m.push(Message::new("system", c.system.clone()));
    }
    let n = c.turns.len();
    for (i, t) in c.turns.iter().enumerate() {
        m.push(Message::new("user", t.user.clone()));
        if final_reply || i + 1 < n {
            m.push(Message::new("assistant", t.assistant.clone()));
        }
    }
    m
}

#[test]
fn exported_simplellama_template_renders_the_formatter_exactly() {
    let root = tempfile::tempdir().unwrap();
    let tok = small_tokenizer(root.path());
    let init = root.path().join("init");
    sft(&["init", "--model", "tiny", "--tokenizer", s(&root.path().join("tok.json")), "--out", s(&init)]);
    let out = root.path().join("export");
    sft(&["export", "--checkpoint", s(&init), "--out", s(&out)]);
    let config = out.join(TOKENIZER_CONFIG_FILE);
    let tpl = ChatTemplate::from_tokenizer_config(&config).unwrap().unwrap();
    let mut convs = synthetic_conversations(20, 3);
    convs.push(conv("", &[("", "")]));
    convs.push(conv(DEFAULT_SYSTEM_PROMPT, &[("a", "b"), ("c", "d")]));
    convs.push(conv(
        "sys <EOA> 'quoted' \\ {{ x }}",
        &[("say <SOU> and <EOT>", "ok <EOA><PAD>"), ("é\n\n", " ")],
    ));
    let specials = tok.escaped_strings();
    for (i, c) in convs.iter().enumerate() {
        let ours = join_pieces(&training_pieces(c, TrainOn::FinalReply), specials);
        assert_eq!(tpl.render(&messages_of(c, true), false).unwrap(), ours, "conversation {i}");
        let (last, history) = c.turns.split_last().unwrap();
        let prompt = inference_prompt_escaping(&c.system, history, &last.user, specials);
        assert_eq!(tpl.render(&messages_of(c, false), true).unwrap(), prompt, "conversation {i}");
    }
    // The exported tokenizer, read in its template format, gives the same tokens and masks.
    let exported = ChatTokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    assert_eq!(exported.chat_format(), ChatFormat::Template);
    assert_eq!(exported.eoa_id(), tok.eoa_id());
    assert_eq!(exported.pad_id(), tok.pad_id());
    for train_on in [TrainOn::FinalReply, TrainOn::AllAssistant] {
        for (i, c) in convs.iter().enumerate() {
            let a = tokenize_conversation(&tok, c, train_on).unwrap();
            let b = tokenize_conversation(&exported, c, train_on).unwrap();
            assert_eq!(a, b, "conversation {i}, {train_on:?}");
        }
    }
    // A wrong role order is the template's error.
    let err = tpl.render(&[Message::new("assistant", "x")], false).unwrap_err().to_string();
    assert!(err.contains("alternate"), "{err}");
}

#[test]
fn a_template_format_checkpoint_exports_its_template_and_stop_token() {
    let root = tempfile::tempdir().unwrap();
    let tokens: &[(&str, &str)] =
        &[("bos_token", "<|im_start|>"), ("eos_token", "<|im_end|>"), ("unk_token", "<|endoftext|>")];
    let tok_path = model_dir(root.path(), "smol", &fixture("smollm2.jinja"), tokens, &[]);
    let tok = ChatTokenizer::from_file(&tok_path).unwrap();
    let init = root.path().join("init");
    sft(&["init", "--model", "tiny", "--tokenizer", s(&tok_path), "--out", s(&init)]);
    assert!(init.join(TOKENIZER_CONFIG_FILE).is_file(), "init keeps the template beside the tokenizer");
    let out = root.path().join("export");
    sft(&["export", "--checkpoint", s(&init), "--out", s(&out)]);
    let tok_config = read_json(&out.join(TOKENIZER_CONFIG_FILE));
    assert_eq!(tok_config["chat_template"], fixture("smollm2.jinja"));
    assert_eq!(tok_config["eos_token"], "<|im_end|>");
    let im_end = tok.special_id("<|im_end|>").unwrap();
    assert_eq!(read_json(&out.join("generation_config.json"))["eos_token_id"], im_end);
    assert_eq!(read_json(&out.join("config.json"))["eos_token_id"], im_end);
    assert_eq!(read_json(&out.join("special_tokens_map.json"))["eos_token"], "<|im_end|>");
    let exported = ChatTokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let c = conv("s", &[("q", "a")]);
    assert_eq!(
        tokenize_conversation(&exported, &c, TrainOn::FinalReply).unwrap(),
        tokenize_conversation(&tok, &c, TrainOn::FinalReply).unwrap()
    );
}
