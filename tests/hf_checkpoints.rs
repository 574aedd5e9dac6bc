//! Hugging Face Llama checkpoints: loading (single file, sharded, bf16/f16), the RoPE
//! convention on disk, `sft import --add-chat-tokens`, `sft logits`, and the errors bad input
//! gets. Every checkpoint here is tiny, random, and written by the test itself.

mod common;

use common::cli::output as sft;
use common::train::{chat_json, tiny_config};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use sft::backend::cpu::CpuBackend;
use sft::backend::{RopeScaling, RopeStyle};
use sft::checkpoint::hf::adjacent_to_half_split;
use sft::checkpoint::import::import_hf;
use sft::checkpoint::{self, hf_config_json, read_params, save_weights, to_hf};
use sft::data::{prepare, ChatTokenizer, PrepareOptions, TrainOn};
use sft::generate::cli::all_logits;
use sft::model::params::{init_params, NamedTensor};
use sft::model::ModelConfig;
use std::path::Path;

/// A tensor as written to disk: name, shape, dtype, little-endian bytes.
type RawTensor = (String, Vec<usize>, Dtype, Vec<u8>);

const IDS: [u32; 7] = [3, 17, 42, 5, 250, 9, 101];

fn config(rope_style: RopeStyle, tie: bool, vocab: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        ffn_hidden: 48,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_style,
        rope_scaling: None,
        max_seq_len: 256,
        tie_embeddings: tie,
        dropout: 0.0,
    }
}

fn logits(dir: &Path) -> Vec<Vec<f32>> {
    all_logits(CpuBackend::<f32>::new(), dir, &IDS).unwrap()
}

/// Logits of a model built in memory from internal tensors.
fn logits_of(config: &ModelConfig, params: &[NamedTensor]) -> Vec<Vec<f32>> {
    logits_for(config, params, &IDS)
}

fn logits_for(config: &ModelConfig, params: &[NamedTensor], ids: &[u32]) -> Vec<Vec<f32>> {
    let mut model = sft::model::Model::new(CpuBackend::<f32>::new(), config.clone(), ids.len()).unwrap();
    model.write_params(params).unwrap();
    let mut cache = model.new_cache(ids.len()).unwrap();
    ids.iter().map(|&t| model.next_logits(&mut cache, &[t]).unwrap()).collect()
}

fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (a, b): (Vec<f32>, Vec<f32>) = (a.concat(), b.concat());
    assert_eq!(a.len(), b.len());
    let scale = a.iter().map(|x| x.abs() as f64).fold(0.0, f64::max).max(1e-30);
    a.iter().zip(&b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max) / scale
}

fn encode(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        other => panic!("no encoder for {other:?}"),
    }
}

/// Writes (name, shape, dtype, bytes) tensors as a safetensors file.
fn write_st(path: &Path, tensors: &[RawTensor]) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, s, d, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// config.json as transformers writes it: no "sft" section.
fn write_hf_config(dir: &Path, config: &ModelConfig, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json = hf_config_json(config);
    json.as_object_mut().unwrap().remove("sft");
    edit(&mut json);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

/// A single-file Hugging Face checkpoint of `config` (half-split) with the given internal params.
fn write_hf_dir(dir: &Path, config: &ModelConfig, params: &[NamedTensor]) {
    std::fs::create_dir_all(dir).unwrap();
    write_hf_config(dir, config, |_| {});
    let tensors: Vec<_> = to_hf(config, params.to_vec())
        .into_iter()
        .map(|t| (t.name, t.shape, Dtype::F32, encode(&t.data, Dtype::F32)))
        .collect();
    write_st(&dir.join("model.safetensors"), &tensors);
}

/// A checkpoint directory has one writer at a time: while another process writes `dir` (here
/// this test holds its lock, and `dir.tmp` stands for its work in progress), a second save is
/// refused naming the holder and leaves that work alone; after it, the save goes through, into
/// a parent directory that did not exist yet.
#[test]
fn a_second_writer_of_one_checkpoint_directory_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let config = config(RopeStyle::HalfSplit, false, 300);
    let params = init_params(&config, 3);
    let dir = root.path().join("new-parent").join("ckpt");
    let lock = root.path().join("new-parent").join("ckpt.write-lock");
    let held = sft::lock::DirLock::acquire(lock.clone(), "ckpt", "test").unwrap();
    let in_progress = root.path().join("new-parent").join("ckpt.tmp");
    std::fs::create_dir_all(&in_progress).unwrap();
    let err = format!("{:#}", save_weights(&dir, &config, params.clone(), None).unwrap_err());
    let holder = format!("another sft command (process {}) is writing it", std::process::id());
    assert!(err.contains(&holder) && err.contains("ckpt"), "{err}");
    assert!(in_progress.is_dir() && !dir.exists(), "the refused save touched the holder's work");
    drop(held);
    std::fs::remove_dir_all(&in_progress).unwrap();
    save_weights(&dir, &config, params.clone(), None).unwrap();
    assert_eq!(read_params(&dir, &config).unwrap(), params);
    assert!(!lock.exists(), "the writer's lock goes with it");
}

#[test]
fn save_and_load_round_trip_weights_and_logits() {
    let root = tempfile::tempdir().unwrap();
    for (i, (style, tie)) in [
        (RopeStyle::AdjacentPairs, true),
        (RopeStyle::AdjacentPairs, false),
        (RopeStyle::HalfSplit, true),
        (RopeStyle::HalfSplit, false),
    ]
    .into_iter()
    .enumerate()
    {
        let config = config(style, tie, 300);
        let params = init_params(&config, 7 + i as u64);
        let dir = root.path().join(format!("ckpt-{i}"));
        save_weights(&dir, &config, params.clone(), None).unwrap();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["torch_dtype"], "float32");
        assert_eq!(json["tie_word_embeddings"], tie);
        let names = checkpoint::tensor_shapes(&dir.join("model.safetensors")).unwrap();
        assert_eq!(names.contains_key("lm_head.weight"), !tie, "tied checkpoints carry no lm_head");
        assert_eq!(checkpoint::read_model_config(&dir).unwrap(), config);
        assert_eq!(read_params(&dir, &config).unwrap(), params, "{style:?} tied={tie}");
        assert_eq!(logits(&dir), logits_of(&config, &params), "{style:?} tied={tie}");

        // A file from a build before the q/k order mark: refused when adjacent pairs (its rows
        // would be misread), accepted when half split (nothing was permuted then either).
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("sft_qk_order");
        std::fs::write(dir.join("config.json"), old.to_string()).unwrap();
        match style {
            RopeStyle::AdjacentPairs => {
                let err = format!("{:#}", checkpoint::read_model_config(&dir).unwrap_err());
                assert!(err.contains("older sft build") && err.contains("config.json"), "{err}");
            }
            RopeStyle::HalfSplit => assert_eq!(checkpoint::read_model_config(&dir).unwrap(), config),
        }
    }
}

#[test]
fn sharded_bf16_f16_checkpoint_loads_exactly() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("hf");
    std::fs::create_dir(&dir).unwrap();
    let config = config(RopeStyle::HalfSplit, false, 300);
    // Multiples of 2^-10 below 2^-3 in magnitude: exact in bf16 and f16 alike.
    let mut params = init_params(&config, 3);
    for t in &mut params {
        for x in &mut t.data {
            *x = ((*x * 1024.0).round() / 1024.0).clamp(-0.125, 0.125);
        }
    }
    let hf = to_hf(&config, params.clone());
    let shard_of = |name: &str| {
        if name.starts_with("model.embed_tokens") || name.starts_with("model.layers.0.") {
            ("model-00001-of-00003.safetensors", Dtype::BF16)
        } else if name.starts_with("model.layers.1.") || name == "model.norm.weight" {
            ("model-00002-of-00003.safetensors", Dtype::F16)
        } else {
            ("model-00003-of-00003.safetensors", Dtype::F32)
        }
    };
    let mut shards: std::collections::BTreeMap<&str, Vec<_>> = Default::default();
    let mut weight_map = serde_json::Map::new();
    for t in &hf {
        let (file, dtype) = shard_of(&t.name);
        shards.entry(file).or_default().push((
            t.name.clone(),
            t.shape.clone(),
            dtype,
            encode(&t.data, dtype),
        ));
        weight_map.insert(t.name.clone(), file.into());
    }
    // Old transformers saved RoPE inverse frequencies: ignored on load.
    let inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq".to_string();
    shards.get_mut("model-00001-of-00003.safetensors").unwrap().push((
        inv_freq.clone(),
        vec![4],
        Dtype::F32,
        encode(&[1.0, 0.1, 0.01, 0.001], Dtype::F32),
    ));
    weight_map.insert(inv_freq, "model-00001-of-00003.safetensors".into());
    for (file, tensors) in &shards {
        write_st(&dir.join(file), tensors);
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    write_hf_config(&dir, &config, |j| j["rope_scaling"] = serde_json::Value::Null);

    assert_eq!(read_params(&dir, &config).unwrap(), params);
    assert_eq!(logits(&dir), logits_of(&config, &params));

    // Errors name the file and the tensor.
    let index_path = dir.join("model.safetensors.index.json");
    std::fs::rename(dir.join("model-00002-of-00003.safetensors"), dir.join("moved")).unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(err.contains("model-00002-of-00003.safetensors") && err.contains("missing"), "{err}");
    std::fs::rename(dir.join("moved"), dir.join("model-00002-of-00003.safetensors")).unwrap();

    let mut bad = index.clone();
    bad["weight_map"].as_object_mut().unwrap().remove("model.layers.1.mlp.up_proj.weight");
    std::fs::write(&index_path, bad.to_string()).unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(
        err.contains("model.safetensors.index.json") && err.contains("model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );

    let mut bad = index.clone();
    bad["weight_map"]["model.layers.7.mlp.up_proj.weight"] = "model-00001-of-00003.safetensors".into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(err.contains("index.json") && err.contains("model.layers.7.mlp.up_proj.weight"), "{err}");

    // The index says a shard holds a tensor it does not.
    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "model-00001-of-00003.safetensors".into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(err.contains("model-00001-of-00003.safetensors") && err.contains("model.norm.weight"), "{err}");

    std::fs::write(&index_path, r#"{"metadata": {}}"#).unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(err.contains("index.json") && err.contains("weight_map"), "{err}");
    std::fs::write(&index_path, "{not json").unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(err.contains("index.json"), "{err}");
}

#[test]
fn both_rope_conventions_give_the_same_logits() {
    let adjacent = config(RopeStyle::AdjacentPairs, false, 300);
    let half = ModelConfig { rope_style: RopeStyle::HalfSplit, ..adjacent.clone() };
    let w = init_params(&adjacent, 11);
    // The same weights with the q and k rows of each head in half-split order.
    let heads = adjacent.heads();
    let d = adjacent.d_model;
    let (qw, kvw) = (heads.q_width(), heads.kv_width());
    let permuted: Vec<NamedTensor> = w
        .iter()
        .map(|t| {
            if !t.name.ends_with(".qkv") {
                return t.clone();
            }
            let mut data = adjacent_to_half_split(&t.data[..qw * d], heads.n_heads, heads.head_dim, d);
            data.extend(adjacent_to_half_split(
                &t.data[qw * d..(qw + kvw) * d],
                heads.n_kv_heads,
                heads.head_dim,
                d,
            ));
            data.extend_from_slice(&t.data[(qw + kvw) * d..]);
            NamedTensor { data, ..t.clone() }
        })
        .collect();
    let reference = logits_of(&adjacent, &w);
    let diff = max_rel_diff(&reference, &logits_of(&half, &permuted));
    assert!(diff < 1e-5, "adjacent pairs vs permuted half split: max relative difference {diff}");
    // Without the permutation the conventions disagree: the comparison above can fail.
    let unpermuted = max_rel_diff(&reference, &logits_of(&half, &w));
    assert!(unpermuted > 1e-3, "RoPE style made no difference ({unpermuted})");

    // Our export, read as a Hugging Face checkpoint from elsewhere (no "sft" section: half split,
    // no permutation on load), gives the original model's logits.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("export");
    save_weights(&dir, &adjacent, w.clone(), None).unwrap();
    let config_path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("sft");
    std::fs::write(&config_path, json.to_string()).unwrap();
    assert_eq!(checkpoint::read_model_config(&dir).unwrap(), half);
    let diff = max_rel_diff(&reference, &logits(&dir));
    assert!(diff < 1e-5, "exported adjacent-pairs model read as HF: max relative difference {diff}");
}

#[test]
fn bad_configs_and_tensors_are_named_errors() {
    let root = tempfile::tempdir().unwrap();
    let config = config(RopeStyle::HalfSplit, true, 300);
    let params = init_params(&config, 5);
    let dir = root.path().join("hf");
    write_hf_dir(&dir, &config, &params);
    assert_eq!(logits(&dir), logits_of(&config, &params));

    let err_of = |edit: &dyn Fn(&mut serde_json::Value)| {
        write_hf_config(&dir, &config, edit);
        format!("{:#}", checkpoint::read_model_config(&dir).unwrap_err())
    };
    for (kind, field) in [("yarn", "rope_scaling"), ("dynamic", "rope_parameters")] {
        let err = err_of(&|j| j[field] = serde_json::json!({"rope_type": kind, "factor": 4.0}));
        assert!(err.contains("config.json") && err.contains(field) && err.contains(kind), "{err}");
    }
    let err = err_of(&|j| j["partial_rotary_factor"] = 0.5.into());
    assert!(err.contains("config.json") && err.contains("partial_rotary_factor"), "{err}");
    let err = err_of(&|j| j["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
    assert!(err.contains("rope_scaling") && err.contains("low_freq_factor"), "{err}");
    let err = err_of(&|j| j["head_dim"] = 16.into());
    assert!(err.contains("config.json") && err.contains("head_dim"), "{err}");
    let err = err_of(&|j| j["attention_bias"] = true.into());
    assert!(err.contains("config.json") && err.contains("attention_bias"), "{err}");
    let err = err_of(&|j| j["mlp_bias"] = true.into());
    assert!(err.contains("mlp_bias"), "{err}");
    let err = err_of(&|j| {
        j.as_object_mut().unwrap().remove("intermediate_size");
    });
    assert!(err.contains("config.json") && err.contains("intermediate_size"), "{err}");
    let err = err_of(&|j| j["model_type"] = "mistral".into());
    assert!(err.contains("model_type"), "{err}");
    write_hf_config(&dir, &config, |_| {});

    let st = dir.join("model.safetensors");
    let hf = to_hf(&config, params.clone());
    let write_with = |edit: &dyn Fn(&mut Vec<RawTensor>)| {
        let mut tensors: Vec<_> = hf
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone(), Dtype::F32, encode(&t.data, Dtype::F32)))
            .collect();
        edit(&mut tensors);
        write_st(&st, &tensors);
        format!("{:#}", read_params(&dir, &config).unwrap_err())
    };
    let err = write_with(&|ts| ts.retain(|t| t.0 != "model.layers.1.self_attn.k_proj.weight"));
    assert!(
        err.contains("model.safetensors") && err.contains("model.layers.1.self_attn.k_proj.weight"),
        "{err}"
    );
    let err = write_with(&|ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.layers.0.mlp.down_proj.weight").unwrap();
        t.1 = vec![t.1[1], t.1[0]];
    });
    assert!(err.contains("model.layers.0.mlp.down_proj.weight") && err.contains("shape"), "{err}");
    let err = write_with(&|ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.2 = Dtype::I32;
    });
    assert!(
        err.contains("model.safetensors") && err.contains("model.norm.weight") && err.contains("I32"),
        "{err}"
    );
    let err = write_with(&|ts| {
        ts.push(("model.layers.0.self_attn.q_proj.bias".into(), vec![32], Dtype::F32, vec![0; 128]))
    });
    assert!(err.contains("q_proj.bias"), "{err}");
    // A tied checkpoint may hold lm_head.weight only as a copy of the embedding.
    let err = write_with(&|ts| {
        let mut head = ts[0].clone();
        head.0 = "lm_head.weight".into();
        head.3[0] ^= 1;
        ts.push(head);
    });
    assert!(err.contains("lm_head.weight"), "{err}");
    std::fs::remove_file(&st).unwrap();
    let err = format!("{:#}", read_params(&dir, &config).unwrap_err());
    assert!(err.contains("model.safetensors") && err.contains("model.safetensors.index.json"), "{err}");
}

/// A byte-level BPE tokenizer with only `<s>` and `</s>` as special tokens (258 ids), like a
/// pretrained model's: none of the chat tokens.
fn write_plain_tokenizer(path: &Path) {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};
    let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    chars.sort_unstable();
    let vocab: tokenizers::models::bpe::Vocab =
        chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).build().unwrap();
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default()));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.add_special_tokens(&[AddedToken::from("<s>", true), AddedToken::from("</s>", true)]);
    tok.save(path, true).unwrap();
}

#[test]
fn import_adds_chat_tokens_then_trains_and_exports() {
    let root = tempfile::tempdir().unwrap();
    let hf_dir = root.path().join("hf");
    let hf_config = config(RopeStyle::HalfSplit, false, 258);
    let hf_params = init_params(&hf_config, 21);
    write_hf_dir(&hf_dir, &hf_config, &hf_params);
    write_plain_tokenizer(&hf_dir.join("tokenizer.json"));

    // Without the flag: a plain conversion, same model.
    let plain = root.path().join("plain");
    let report = import_hf(&hf_dir, &plain, false).unwrap();
    assert!(report.added.is_empty());
    assert_eq!(read_params(&plain, &hf_config).unwrap(), hf_params);
    assert!(ChatTokenizer::from_file(&plain.join("tokenizer.json")).is_err());

    let out = root.path().join("imported");
    let report = import_hf(&hf_dir, &out, true).unwrap();
    let added: Vec<&str> = report.added.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(added, ["<SOU>", "<EOU>", "<SOA>", "<EOA>", "<SOT>", "<EOT>", "<PAD>"]);
    let ids: Vec<u32> = report.added.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, (258..265).collect::<Vec<u32>>());
    let tok = ChatTokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 265);
    assert_eq!(tok.special_id("<PAD>"), Some(264));
    let config = checkpoint::read_model_config(&out).unwrap();
    assert_eq!(config, ModelConfig { vocab_size: 265, ..hf_config.clone() });
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((json["pad_token_id"].clone(), json["eos_token_id"].clone()), (264.into(), 261.into()));

    let params = read_params(&out, &config).unwrap();
    let d = config.d_model;
    for name in ["tok_embeddings", "lm_head"] {
        let before = &hf_params.iter().find(|t| t.name == name).unwrap().data;
        let after = params.iter().find(|t| t.name == name).unwrap();
        assert_eq!(after.shape, vec![265, d]);
        assert_eq!(after.data[..258 * d], before[..], "{name}: existing rows unchanged");
        let mean: Vec<f32> = (0..d)
            .map(|j| ((0..258).map(|r| before[r * d + j] as f64).sum::<f64>() / 258.0) as f32)
            .collect();
        for id in 258..265 {
            assert_eq!(after.data[id * d..(id + 1) * d], mean[..], "{name}: row {id} is the mean");
        }
    }
    // The old tokens' logits are the original model's, extended by the new tokens'.
    let (old, new) = (logits(&hf_dir), logits(&out));
    for (o, n) in old.iter().zip(&new) {
        assert_eq!(n[..258], o[..]);
        assert_eq!(n.len(), 265);
    }

    // --init-from the original: the error names the missing tokens and the fix.
    let chat = root.path().join("chat.json");
    std::fs::write(&chat, chat_json(40)).unwrap();
    let data = root.path().join("prepared");
    prepare(&PrepareOptions {
        data: chat,
        tokenizer: out.join("tokenizer.json"),
        out_dir: data.clone(),
        max_seq_len: 200,
        train_share: 0.85,
        seed: 5,
        train_on: TrainOn::FinalReply,
        chat: Default::default(),
    })
    .unwrap();
    let mut cfg = tiny_config(
        &data,
        &out.join("tokenizer.json"),
        &root.path().join("run0"),
        sft::data::BatchMode::Dynamic,
    );
    cfg.max_seq_len = Some(200);
    cfg.micro_batch = 2.into();
    cfg.grad_accum = 1;
    cfg.max_steps = Some(2);
    cfg.eval_every = 0;
    cfg.save_every = 0;
    cfg.dropout = None;
    cfg.init_from = Some(hf_dir.clone());
    cfg.from_scratch = false;
    let err = format!("{:#}", sft::train::cli::train_on_device(&cfg).unwrap_err());
    assert!(
        err.contains("<SOU>")
            && err.contains("<PAD>")
            && err.contains("sft import")
            && err.contains("--add-chat-tokens"),
        "{err}"
    );

    // From the import, it trains.
    cfg.init_from = Some(out.clone());
    cfg.out_dir = root.path().join("run");
    let report = sft::train::cli::train_on_device(&cfg).unwrap();
    assert_eq!(report.steps, 2);
    assert!(report.final_train_loss.is_finite());
    let trained = report.checkpoint.expect("the run saves at its end");
    let trained_params = read_params(&trained, &config).unwrap();
    assert_ne!(trained_params, params, "training changed the weights");

    // Export and reload: identical logits, also when read as an HF checkpoint from elsewhere.
    let export = root.path().join("export");
    save_weights(&export, &config, trained_params.clone(), Some(&trained.join("tokenizer.json"))).unwrap();
    assert_eq!(logits(&export), logits(&trained));
    let config_path = export.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    json.as_object_mut().unwrap().remove("sft");
    std::fs::write(&config_path, json.to_string()).unwrap();
    assert_eq!(logits(&export), logits(&trained));
}

#[test]
fn import_and_logits_through_the_binary() {
    let root = tempfile::tempdir().unwrap();
    let hf_dir = root.path().join("hf");
    let config = config(RopeStyle::HalfSplit, true, 258);
    write_hf_dir(&hf_dir, &config, &init_params(&config, 4));
    write_plain_tokenizer(&hf_dir.join("tokenizer.json"));
    let out = root.path().join("imported");
    let o = sft(&[
        "import",
        "--from",
        hf_dir.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--add-chat-tokens",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("<PAD>=264") && stdout.contains("258 -> 265"), "{stdout}");

    let ids: Vec<String> = IDS.iter().map(|i| i.to_string()).collect();
    let o = sft(&["logits", "--checkpoint", out.to_str().unwrap(), "--ids", &ids.join(",")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let printed: Vec<Vec<f32>> = serde_json::from_value(json["logits"].clone()).unwrap();
    assert_eq!(printed, logits(&out), "the JSON round-trips the f32 logits exactly");

    // A checkpoint that exists already is not overwritten.
    let o = sft(&["import", "--from", hf_dir.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

#[test]
fn import_into_a_padded_vocabulary_reuses_the_padding_rows() {
    // 262 embedding rows for a 258-token tokenizer, as models pad their vocabulary: the added
    // ids 258..265 take the four padding rows and three new ones.
    let root = tempfile::tempdir().unwrap();
    let hf_dir = root.path().join("hf");
    let hf_config = config(RopeStyle::HalfSplit, true, 262);
    let hf_params = init_params(&hf_config, 8);
    write_hf_dir(&hf_dir, &hf_config, &hf_params);
    write_plain_tokenizer(&hf_dir.join("tokenizer.json"));
    let out = root.path().join("imported");
    let report = import_hf(&hf_dir, &out, true).unwrap();
    assert_eq!(report.old_vocab_size, 262);
    assert_eq!(report.config.vocab_size, 265);
    let params = read_params(&out, &report.config).unwrap();
    let before = &hf_params[0].data;
    let after = &params.iter().find(|t| t.name == "tok_embeddings").unwrap().data;
    let d = hf_config.d_model;
    assert_eq!(after[..258 * d], before[..258 * d]);
    let mean: Vec<f32> =
        (0..d).map(|j| ((0..258).map(|r| before[r * d + j] as f64).sum::<f64>() / 258.0) as f32).collect();
    for id in 258..265 {
        assert_eq!(after[id * d..(id + 1) * d], mean[..], "row {id}");
    }
}

/// Llama 3.1/3.2 configs: RoPE scaling as transformers 4 writes it (top-level `rope_theta` and
/// `rope_scaling`) and as transformers 5 does (`rope_parameters` holding both) read the same.
#[test]
fn llama3_rope_scaling_reads_from_both_config_layouts() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path();
    let base = ModelConfig { max_seq_len: 1024, ..config(RopeStyle::HalfSplit, true, 300) };
    let llama3 = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 256,
    };
    let want = ModelConfig { rope_theta: 500_000.0, rope_scaling: Some(llama3), ..base.clone() };
    let scaling = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256});

    write_hf_config(dir, &want, |_| {});
    assert_eq!(checkpoint::read_model_config(dir).unwrap(), want);

    write_hf_config(dir, &base, |j| {
        let o = j.as_object_mut().unwrap();
        o.remove("rope_theta");
        o.remove("rope_scaling");
        let mut params = scaling.clone();
        params["rope_theta"] = 500_000.0.into();
        o.insert("rope_parameters".into(), params);
    });
    assert_eq!(checkpoint::read_model_config(dir).unwrap(), want);

    // transformers takes the original context from max_position_embeddings when it is absent.
    write_hf_config(dir, &want, |j| {
        j["rope_scaling"].as_object_mut().unwrap().remove("original_max_position_embeddings");
    });
    let fallback = RopeScaling::Llama3 {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 1024,
    };
    assert_eq!(checkpoint::read_model_config(dir).unwrap().rope_scaling, Some(fallback));

    // The "sft" section keeps the scaling too, and a model built from it rotates differently.
    let ours = hf_config_json(&want);
    let back: ModelConfig = serde_json::from_value(ours["sft"].clone()).unwrap();
    assert_eq!(back, want);
    let params = init_params(&want, 9);
    let unscaled = ModelConfig { rope_scaling: None, ..want.clone() };
    let ids: Vec<u32> = (0..64).map(|i| (i * 37 % 300) as u32).collect();
    let (a, b) = (logits_for(&want, &params, &ids), logits_for(&unscaled, &params, &ids));
    // Position 0 rotates by nothing either way; later ones see the scaled frequencies.
    assert_eq!(a[0], b[0]);
    assert!(max_rel_diff(&a[1..], &b[1..]) > 1e-5, "scaling changed nothing");
}
