//! The path a user takes with a Llama 3.2-style Hugging Face checkpoint, at toy scale on the
//! CPU, through the binary: a transformers 5 config (llama3 RoPE scaling in `rope_parameters`,
//! grouped KV heads, tied embeddings), bf16 weights and a Llama 3-shaped tokenizer.json (byte-level
//! BPE behind Llama 3's split regex, a post-processor that prepends `<|begin_of_text|>`) go through
//! `sft import --add-chat-tokens`, `sft logits`, `sft prepare`, `sft inspect`, `sft train
//! --init-from` and `sft generate`. Everything is written by the test itself.

mod common;

use common::cli::{command, run_ok as sft, s};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sft::backend::cpu::CpuBackend;
use sft::backend::{RopeScaling, RopeStyle};
use sft::checkpoint::read_model_config;
use sft::checkpoint::to_hf;
use sft::data::format::{join_pieces, training_pieces, SIMPLELLAMA_SPECIALS};
use sft::data::{read_chat_file, tokenize_conversation, ChatTokenizer, TrainOn};
use sft::model::params::{init_params, NamedTensor};
use sft::model::{Model, ModelConfig};
use std::path::Path;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

/// Llama 3's pre-tokenizer split (tokenizer.json of Llama 3.x); `(?!\S)` needs fancy-regex.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const BOS: &str = "<|begin_of_text|>";
const EOS: &str = "<|end_of_text|>";
const EOT_ID: &str = "<|eot_id|>";

/// A few merges over words of the chat set, so that the model is BPE and not bytes only.
const MERGES: [(&str, &str); 14] = [
    ("Ġ", "t"),
    ("h", "e"),
    ("Ġt", "he"),
    ("Ġ", "p"),
    ("l", "u"),
    ("Ġp", "lu"),
    ("Ġplu", "s"),
    ("i", "s"),
    ("Ġ", "is"),
    ("W", "h"),
    ("a", "t"),
    ("Wh", "at"),
    ("'", "s"),
    ("Ġ", "Ġ"),
];

/// GPT-2's byte → printable char map (the ByteLevel alphabet), in byte order.
fn byte_chars() -> Vec<char> {
    let mut n = 0;
    (0..=255u8)
        .map(|b| {
            if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
                b as char
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

/// Writes a tokenizer.json laid out as Llama 3.2's and returns its size (special tokens at the
/// top: `<|begin_of_text|>`, `<|end_of_text|>`, `<|eot_id|>`).
fn write_llama3_tokenizer(path: &Path) -> usize {
    let mut vocab: Vec<String> = byte_chars().into_iter().map(String::from).collect();
    for (a, b) in MERGES {
        assert!(vocab.iter().any(|v| v == a) && vocab.iter().any(|v| v == b), "merge {a} {b}");
        vocab.push(format!("{a}{b}"));
    }
    let specials: Vec<serde_json::Value> = [BOS, EOS, EOT_ID]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": vocab.len() + i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let bos_id = vocab.len();
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        vocab.iter().enumerate().map(|(i, t)| (t.clone(), i.into())).collect();
    let merges: Vec<String> = MERGES.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": specials,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {BOS: {"id": BOS, "ids": [bos_id], "tokens": [BOS]}}}
        ]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": true, "vocab": vocab_map, "merges": merges}
    });
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    vocab.len() + 3
}

/// Llama 3.2 1B's shape, shrunk: GQA 4/2, head_dim 16, tied, theta 500000, llama3 scaling.
fn llama3_config(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        vocab_size,
        d_model: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_hidden: 128,
        norm_eps: 1e-5,
        rope_theta: 500_000.0,
        rope_style: RopeStyle::HalfSplit,
        // With head_dim 16 and an original context of 64, pair 0 keeps its frequency, pair 1 is
        // blended and pairs 2-7 are divided by 32: all three llama3 regions are used.
        rope_scaling: Some(RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        }),
        max_seq_len: 256,
        tie_embeddings: true,
        dropout: 0.0,
    }
}

/// config.json as transformers 5 writes Llama 3.2's: RoPE only in `rope_parameters`.
fn write_hf_config(dir: &Path, c: &ModelConfig, bos: usize) {
    let json = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": bos,
        "eos_token_id": [bos + 1, bos + 2],
        "head_dim": c.head_dim(),
        "hidden_act": "silu",
        "hidden_size": c.d_model,
        "initializer_range": 0.02,
        "intermediate_size": c.ffn_hidden,
        "max_position_embeddings": c.max_seq_len,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": c.n_heads,
        "num_hidden_layers": c.n_layers,
        "num_key_value_heads": c.n_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": c.norm_eps,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "transformers_version": "5.0.0",
        "use_cache": true,
        "vocab_size": c.vocab_size
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// Random weights rounded to bf16 (so that what is written is exactly what the model holds),
/// written under Hugging Face's names as one bf16 `model.safetensors`.
fn write_bf16_weights(dir: &Path, config: &ModelConfig, seed: u64) -> Vec<NamedTensor> {
    let mut params = init_params(config, seed);
    for t in &mut params {
        for x in &mut t.data {
            *x = half::bf16::from_f32(*x).to_f32();
        }
    }
    let hf = to_hf(config, params.clone());
    assert!(hf.iter().all(|t| t.name != "lm_head.weight"), "tied: no lm_head");
    let bytes: Vec<Vec<u8>> = hf
        .iter()
        .map(|t| t.data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView)> = hf
        .iter()
        .zip(&bytes)
        .map(|(t, b)| (t.name.clone(), TensorView::new(Dtype::BF16, t.shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    params
}

/// `sft logits` through the binary.
fn logits_cli(dir: &Path, ids: &[u32]) -> Vec<Vec<f32>> {
    let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
    let out = sft(&["logits", "--checkpoint", s(dir), "--ids", &ids.join(","), "--device", "cpu"]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    serde_json::from_value(json["logits"].clone()).unwrap()
}

/// A small chat set in SimpleLLaMA's schema whose texts reach the branches of Llama 3's split
/// (contractions, long digit runs, newlines, non-Latin letters) and, in user and assistant text,
/// the tokenizer's own special-token strings, which must stay text.
fn chat_json(n: usize) -> String {
    let words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"];
    let convs: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let (a, b) = (i % 10, (i * 7 + 3) % 10);
            let q = format!("What is {} plus {}?", words[a], words[b]);
            let r = format!("{} plus {} is {}.", words[a], words[b], a + b);
            let big = 1000 * i + 234;
            let (user, reply) = match i % 6 {
                0 => (vec!["Hello! What's up?".to_string(), q], vec!["I'm fine, it's sunny.".to_string(), r]),
                1 => {
                    (vec![format!("Add {big} and 56789.")], vec![format!("{big} + 56789 = {}.", big + 56789)])
                }
                2 => (vec![format!("Line one\nline two\r\n\n  {q}")], vec![format!("Größe: {r} Ça va?\n")]),
                3 => (vec![format!("Say {BOS} then {EOT_ID}.")], vec![format!("{BOS} then {EOT_ID}, {EOS}")]),
                _ => (vec![q], vec![r]),
            };
            // A plain-string Template (no list) is accepted too.
            let system: serde_json::Value = match i % 3 {
                0 => "You add numbers.".into(),
                1 => serde_json::json!(["Be brief."]),
                _ => serde_json::json!([""]),
            };
            serde_json::json!({"Template": system, "User": user, "Assistant": reply})
        })
        .collect();
    serde_json::to_string(&convs).unwrap()
}

#[test]
fn llama3_tokenizer_shape_loads_and_prepends_bos_only_when_asked() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("tokenizer.json");
    let size = write_llama3_tokenizer(&path);
    let tok = tokenizers::Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.get_vocab_size(true), size);
    let bos = tok.token_to_id(BOS).unwrap();
    assert_eq!((bos as usize, tok.token_to_id(EOT_ID)), (size - 3, Some(size as u32 - 1)));

    // The post-processor is real: with special tokens it prepends <|begin_of_text|>.
    let text = "What's the plus 12345?\n\n x";
    let with = tok.encode(text, true).unwrap();
    let without = tok.encode(text, false).unwrap();
    assert_eq!(with.get_ids()[0], bos);
    assert_eq!(with.get_ids()[1..], without.get_ids()[..]);
    // Llama 3's split: contractions alone, digits by three, no prefix space, newlines kept
    // with the punctuation before them; then the merges, and the bytes round-trip.
    let mut pts = PreTokenizedString::from(text);
    tok.get_pre_tokenizer().unwrap().pre_tokenize(&mut pts).unwrap();
    let words: Vec<&str> = pts
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(w, _, _)| w)
        .collect();
    assert_eq!(words, ["What", "'s", "Ġthe", "Ġplus", "Ġ", "123", "45", "?ĊĊ", "Ġx"]);
    let tokens: Vec<&str> = without.get_tokens().iter().map(String::as_str).collect();
    assert_eq!(tokens[..5], ["What", "'s", "Ġthe", "Ġplus", "Ġ"]);
    assert_eq!(tok.decode(without.get_ids(), true).unwrap(), text);
}

#[test]
fn llama3_checkpoint_imports_prepares_trains_and_generates() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("Llama-3.2-toy");
    std::fs::create_dir(&hf).unwrap();
    let old_vocab = write_llama3_tokenizer(&hf.join("tokenizer.json"));
    let bos = old_vocab - 3;
    let config = llama3_config(old_vocab);
    write_hf_config(&hf, &config, bos);
    let params = write_bf16_weights(&hf, &config, 32);
    assert_eq!(read_model_config(&hf).unwrap(), config, "transformers 5 config read as Llama 3.2's");

    // The binary reads the bf16 file as the model it holds (llama3 frequencies and all).
    let ids: Vec<u32> = vec![bos as u32, 87, 104, 258, 269, 32, 10, bos as u32 + 2];
    let hf_logits = logits_cli(&hf, &ids);
    let mut model = Model::new(CpuBackend::<f32>::new(), config.clone(), ids.len()).unwrap();
    model.write_params(&params).unwrap();
    let mut cache = model.new_cache(ids.len()).unwrap();
    let expected: Vec<Vec<f32>> = ids.iter().map(|&t| model.next_logits(&mut cache, &[t]).unwrap()).collect();
    assert_eq!(hf_logits, expected);

    // Import: the chat tokens follow <|eot_id|>, the old rows and scaling stay.
    let ckpt = root.path().join("llama3-chat");
    let out = sft(&["import", "--from", s(&hf), "--out", s(&ckpt), "--add-chat-tokens"]);
    let new_vocab = old_vocab + 7;
    assert!(out.contains(&format!("<SOU>={old_vocab}")), "{out}");
    assert!(out.contains(&format!("<PAD>={}", new_vocab - 1)), "{out}");
    assert!(out.contains(&format!("{old_vocab} -> {new_vocab}")), "{out}");
    let imported = read_model_config(&ckpt).unwrap();
    assert_eq!(imported, ModelConfig { vocab_size: new_vocab, ..config.clone() });
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["rope_theta"], 500000.0);
    assert_eq!(
        json["rope_scaling"],
        serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    );
    assert_eq!(json["vocab_size"], new_vocab);
    assert_eq!(json["tie_word_embeddings"], true);
    // The tokenizer's own BOS, not a <SOS> it lacks; replies end at <EOA>.
    assert_eq!(json["bos_token_id"], bos);
    assert_eq!(json["eos_token_id"], old_vocab + 3);
    let tok = ChatTokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    assert_eq!(tok.bos_id(), Some(bos as u32));
    assert_eq!(tok.vocab_size(), new_vocab);
    assert_eq!(tok.special_id(BOS), Some(bos as u32), "old special ids kept");
    for (old, new) in hf_logits.iter().zip(&logits_cli(&ckpt, &ids)) {
        assert_eq!((new.len(), &new[..old_vocab]), (new_vocab, &old[..]), "old rows unchanged");
    }

    // Rows start with <|begin_of_text|> as the post-processor would put it (what the pretrained
    // model saw at position 0), then <SOT>; special strings inside texts stay text.
    let chat = root.path().join("chat.json");
    std::fs::write(&chat, chat_json(36)).unwrap();
    let prepared = root.path().join("prepared");
    let tok_path = ckpt.join("tokenizer.json");
    let report = sft(&[
        "prepare",
        "--data",
        s(&chat),
        "--tokenizer",
        s(&tok_path),
        "--out",
        s(&prepared),
        "--max-seq-len",
        "256",
        "--train-share",
        "0.9",
    ]);
    assert!(report.contains("32 train, 4 val, 0 skipped"), "{report}");
    let own_specials = [BOS, EOS, EOT_ID].map(|t| tok.special_id(t).unwrap());
    let mut rows = 0;
    for split in ["train", "val"] {
        let json = sft(&[
            "inspect",
            "--data",
            s(&prepared),
            "--split",
            split,
            "--batch-size",
            "4",
            "--max-seq-len",
            "256",
            "--no-shuffle",
            "--json",
        ]);
        for line in json.lines() {
            let batch: serde_json::Value = serde_json::from_str(line).unwrap();
            for row in batch["inputs"].as_array().unwrap() {
                let row: Vec<u32> = serde_json::from_value(row.clone()).unwrap();
                assert_eq!(row[..2], [bos as u32, tok.special_id("<SOT>").unwrap()], "{row:?}");
                assert!(row[1..].iter().all(|id| !own_specials.contains(id)), "{split}: {row:?}");
                rows += 1;
            }
        }
    }
    assert_eq!(rows, 36);

    // Encoded piece by piece (the word cache, Llama 3's split), a conversation gets the ids the
    // tokenizers crate gives its whole escaped text with the post-processor's BOS; generation's
    // prompt is a prefix of them.
    let plain = tokenizers::Tokenizer::from_file(&tok_path).unwrap();
    let mut escaped: Vec<&str> = SIMPLELLAMA_SPECIALS.to_vec();
    escaped.extend([BOS, EOS, EOT_ID]);
    for conv in read_chat_file(&chat).unwrap() {
        let ex = tokenize_conversation(&tok, &conv, TrainOn::FinalReply).unwrap();
        let text = join_pieces(&training_pieces(&conv, TrainOn::FinalReply), &escaped);
        assert_eq!(ex.tokens, plain.encode(text.as_str(), true).unwrap().get_ids(), "{text:?}");
        assert!(!ex.supervised[0]);
        let (last, history) = conv.turns.split_last().unwrap();
        let prompt = tok.encode_prompt(&conv.system, history, &last.user).unwrap();
        assert_eq!(ex.tokens[..prompt.len()], prompt[..], "{text:?}");
        assert_eq!(prompt[0], bos as u32);
        assert!(prompt[1..].iter().all(|id| !own_specials.contains(id)), "{prompt:?}");
    }

    // Fine-tune from the import on the CPU, then generate from the saved checkpoint.
    let run = root.path().join("run");
    let out = sft(&[
        "train",
        "--data",
        s(&prepared),
        "--init-from",
        s(&ckpt),
        "--out-dir",
        s(&run),
        "--device",
        "cpu",
        "--micro-batch",
        "4",
        "--grad-accum",
        "1",
        "--max-steps",
        "4",
        "--max-seq-len",
        "256",
        "--warmup-steps",
        "1",
        "--max-lr",
        "0.001",
        "--min-lr",
        "0.0001",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
    ]);
    let loss: f64 = out
        .split("train loss ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("no train loss: {out}"));
    assert!(loss.is_finite() && loss > 0.0, "{out}");
    assert!(out.contains("done: 4 steps"), "{out}");
    let step = run.join("step-4");
    assert!(step.join("model.safetensors").is_file() && step.join("tokenizer.json").is_file(), "{out}");
    assert_eq!(read_model_config(&step).unwrap(), imported);

    let reply = sft(&[
        "generate",
        "--checkpoint",
        s(&step),
        "--system",
        "You add numbers.",
        "--prompt",
        &format!("What is two plus three? {EOT_ID}"),
        "--max-new-tokens",
        "5",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ]);
    // Four steps of a random toy model: the reply is noise (spaces here); that it is printed is
    // the check.
    assert!(reply.ends_with('\n'), "{reply:?}");

    // Rows without the BOS that the tokenizer adds (shards from a tokenizer without the
    // post-processor, as older builds wrote them) get a note at the start of training.
    let no_bos = root.path().join("no-bos");
    let mut tok_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tok_path).unwrap()).unwrap();
    tok_json["post_processor"] = serde_json::Value::Null;
    let no_bos_tok = root.path().join("no-bos-tokenizer.json");
    std::fs::write(&no_bos_tok, tok_json.to_string()).unwrap();
    sft(&["prepare", "--data", s(&chat), "--tokenizer", s(&no_bos_tok), "--out", s(&no_bos)]);
    let train_once = |data: &Path, run: &str| {
        let out = command()
            .args(["train", "--data", s(data), "--init-from", s(&ckpt), "--out-dir"])
            .arg(root.path().join(run))
            .args(["--device", "cpu", "--micro-batch", "4", "--grad-accum", "1", "--max-steps", "1"])
            .args(["--max-seq-len", "256"])
            .args(["--eval-every", "0", "--sample-every", "0"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(!train_once(&no_bos, "run-a").contains("re-run sft prepare"), "no BOS in the tokenizer either");
    // Shards of the BOS tokenizer whose rows lack the BOS (an older build's): made by rewriting
    // the prepared shards, since shards of another tokenizer are refused outright.
    let old_rows = root.path().join("old-rows");
    std::fs::create_dir_all(&old_rows).unwrap();
    std::fs::copy(&tok_path, old_rows.join("tokenizer.json")).unwrap();
    for split in ["train", "val"] {
        let name = format!("{split}-00000.bin");
        let shard = sft::data::shard::Shard::open(&prepared.join(&name)).unwrap();
        let h = *shard.header();
        let mut w = sft::data::shard::ShardWriter::create(&old_rows.join(&name), h.fingerprint, h.pad_id)
            .unwrap()
            .with_set_id(h.set_id);
        for i in 0..shard.len() {
            let ex = shard.example(i);
            assert_eq!(ex.tokens[0] as usize, bos);
            let spans: Vec<[u32; 2]> = ex.spans.iter().map(|&[a, b]| [a.max(1) - 1, b - 1]).collect();
            w.push(&ex.tokens[1..], &spans).unwrap();
        }
        w.finish().unwrap();
    }
    sft::data::prepare::record_shards(&old_rows).unwrap();
    let stderr = train_once(&old_rows, "run-b");
    assert!(
        stderr.contains(&format!("starts texts with token {bos}")) && stderr.contains("re-run sft prepare"),
        "{stderr}"
    );
    assert!(!train_once(&prepared, "run-c").contains("re-run sft prepare"));
}
