//! The model's behaviour beyond gradients: padded and packed batches agree, gradient
//! accumulation, KV-cache generation against the full forward, AdamW and its state, the
//! parameter count, Hugging Face conversion, configuration and batch errors.

mod common;

use common::model::*;
use sft::backend::{AdamW, RopeScaling, RopeStyle};
use sft::checkpoint::{from_hf, to_hf};
use sft::data::batch::Batch;
use sft::model::{Model, ModelConfig, NamedTensor, Recompute};

fn model_f64(config: &ModelConfig, max_tokens: usize, seed: u64) -> Model<F64> {
    let mut model = Model::new(f64_backend(), config.clone(), max_tokens).unwrap();
    model.init_params(seed).unwrap();
    // Larger weights than the default init, so that attention is far from uniform.
    let mut params = model.read_params().unwrap();
    let mut rng = sft::rng::Rng::new(seed);
    for t in params.iter_mut().filter(|t| t.shape.len() == 2) {
        t.data.iter_mut().for_each(|x| *x = 0.3 * rng.normal() as f32);
    }
    model.write_params(&params).unwrap();
    model
}

fn grads_of(model: &mut Model<F64>, batches: &[&Batch], scale: f32) -> (f64, Vec<NamedTensor>) {
    model.zero_grads().unwrap();
    let loss = batches.iter().map(|b| model.forward_backward(b, scale, None).unwrap()).sum();
    (loss, model.read_grads().unwrap())
}

fn assert_grads_close(a: &[NamedTensor], b: &[NamedTensor], bound: f64) -> f64 {
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.name, y.name);
        let rel = max_rel_diff(&x.data, &y.data);
        assert!(rel <= bound, "{}: relative difference {rel:e}", x.name);
        worst = worst.max(rel);
    }
    worst
}

#[test]
fn padded_and_packed_batches_give_the_same_loss_and_gradients() {
    for config in [
        tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0),
        tiny_config(4, RopeStyle::HalfSplit, true, 0.0),
    ] {
        let exs = examples(10, &[7, 3, 5, 6]);
        let padded = padded_batch(&exs, 2);
        let packed = packed_batch(&exs, 12);
        assert_eq!(padded.n_supervised(), packed.n_supervised());
        let mut model = model_f64(&config, padded.n_tokens().max(packed.n_tokens()), 1);
        let scale = 1.0 / padded.n_supervised() as f32;
        let (loss_padded, g_padded) = grads_of(&mut model, &[&padded], scale);
        let (loss_packed, g_packed) = grads_of(&mut model, &[&packed], scale);
        assert!((loss_padded - loss_packed).abs() <= 1e-10 * loss_padded, "{loss_padded} vs {loss_packed}");
        assert!((model.loss(&padded).unwrap() - loss_packed).abs() <= 1e-10 * loss_padded);
        let worst = assert_grads_close(&g_padded, &g_packed, 1e-6);
        println!("padded vs packed: max relative gradient difference {worst:e}");
    }
}

#[test]
fn two_micro_batches_accumulate_to_one_batch() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let exs = examples(20, &[6, 4, 7, 5]);
    let first = padded_batch(&exs[..2], 0);
    let second = padded_batch(&exs[2..], 0);
    let both = padded_batch(&exs, 0);
    let total = (first.n_supervised() + second.n_supervised()) as f32;
    assert_eq!(total as usize, both.n_supervised());
    let mut model = model_f64(&config, both.n_tokens(), 2);
    let (loss_two, g_two) = grads_of(&mut model, &[&first, &second], 1.0 / total);
    let (loss_one, g_one) = grads_of(&mut model, &[&both], 1.0 / total);
    assert!((loss_two - loss_one).abs() <= 1e-10 * loss_one);
    let worst = assert_grads_close(&g_two, &g_one, 1e-6);
    println!("accumulated vs one batch: max relative gradient difference {worst:e}");
    // loss_scale multiplies the gradient and not the returned sum.
    let (loss_unscaled, g_unscaled) = grads_of(&mut model, &[&both], 1.0);
    assert_eq!(loss_unscaled, loss_one);
    let rescaled: Vec<NamedTensor> = g_one
        .iter()
        .map(|t| NamedTensor { data: t.data.iter().map(|x| x * total).collect(), ..t.clone() })
        .collect();
    assert_grads_close(&rescaled, &g_unscaled, 1e-5);
    let norm = model.grad_norm().unwrap();
    let direct: f64 =
        g_unscaled.iter().flat_map(|t| &t.data).map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    assert!((norm - direct).abs() <= 1e-6 * direct, "grad_norm {norm} vs {direct}");
}

/// The loss of one position with target `t` is `logsumexp(logits) − logits[t]`, so the losses
/// for every `t` give the logits up to a constant.
#[test]
fn kv_cache_logits_match_the_full_forward() {
    for config in [
        tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0),
        tiny_config(4, RopeStyle::HalfSplit, true, 0.0),
    ] {
        let tokens = examples(30, &[7]).remove(0).tokens;
        let n = tokens.len();
        let mut model = model_f64(&config, n, 3);
        // Generation one token at a time, and with a 4-token prompt first.
        let mut cache = model.new_cache(n).unwrap();
        let one_by_one: Vec<Vec<f32>> =
            tokens.iter().map(|&t| model.next_logits(&mut cache, &[t]).unwrap()).collect();
        assert_eq!(cache.len(), n);
        let err = model.next_logits(&mut cache, &[1]).unwrap_err();
        assert!(format!("{err:#}").contains("KV cache full"), "{err:#}");
        let mut cache = model.new_cache(n).unwrap();
        let after_prompt = model.next_logits(&mut cache, &tokens[..4]).unwrap();
        assert!(max_rel_diff(&after_prompt, &one_by_one[3]) < 1e-6);
        for i in 4..n {
            let logits = model.next_logits(&mut cache, &tokens[i..=i]).unwrap();
            assert!(max_rel_diff(&logits, &one_by_one[i]) < 1e-6);
        }

        // A prompt longer than max_tokens goes through in chunks.
        let mut small = Model::new(f64_backend(), config.clone(), 3).unwrap();
        small.write_params(&model.read_params().unwrap()).unwrap();
        let mut cache = small.new_cache(n).unwrap();
        let chunked = small.next_logits(&mut cache, &tokens).unwrap();
        assert!(max_rel_diff(&chunked, &one_by_one[n - 1]) < 1e-6);

        // The full forward: pad_id outside the vocabulary, so that every id can be a target.
        let ignore = VOCAB as u32;
        let mut worst = 0f64;
        for (i, logits) in one_by_one.iter().enumerate() {
            let losses: Vec<f64> = (0..VOCAB as u32)
                .map(|t| {
                    let mut targets = vec![ignore; n];
                    targets[i] = t;
                    let batch = Batch {
                        rows: 1,
                        seq_len: n,
                        inputs: tokens.clone(),
                        targets,
                        positions: (0..n as u32).collect(),
                        cu_seqlens: vec![0, n as u32],
                        pad_id: ignore,
                    };
                    model.loss(&batch).unwrap()
                })
                .collect();
            let lse = logits.iter().map(|&x| (x as f64).exp()).sum::<f64>().ln();
            for (t, loss) in losses.iter().enumerate() {
                let expected = lse - logits[t] as f64;
                let err = (loss - expected).abs() / expected.abs().max(1.0);
                worst = worst.max(err);
                assert!(err < 1e-6, "position {i} target {t}: loss {loss} vs {expected}");
            }
        }
        println!("KV cache vs full forward: max relative difference {worst:e}");
    }
}

#[test]
fn adamw_step_changes_params_and_optimizer_state_round_trips() {
    let config = ModelConfig::tiny(VOCAB);
    let batch = padded_batch(&examples(40, &[6, 5]), 0);
    let mut model = Model::new(f32_backend(), config.clone(), batch.n_tokens()).unwrap();
    model.init_params(89).unwrap();
    let before = model.read_params().unwrap();
    let (m0, v0) = model.read_optimizer_state().unwrap();
    assert!(m0.iter().chain(&v0).all(|t| t.data.iter().all(|&x| x == 0.0)));
    let hp =
        AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.01, step: 1, grad_scale: 1.0 };
    let loss0 = model.loss(&batch).unwrap();
    for step in 1..=5 {
        model.zero_grads().unwrap();
        model.forward_backward(&batch, 1.0 / batch.n_supervised() as f32, None).unwrap();
        assert!(model.grad_norm().unwrap() > 0.0);
        model.adamw_step(&AdamW { step, ..hp }).unwrap();
    }
    let loss5 = model.loss(&batch).unwrap();
    assert!(loss5 < loss0, "five AdamW steps on one batch should lower its loss: {loss0} -> {loss5}");
    let after = model.read_params().unwrap();
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(b.data, a.data, "{} did not change", b.name);
    }
    let (m, v) = model.read_optimizer_state().unwrap();
    assert!(m.iter().all(|t| t.data.iter().any(|&x| x != 0.0)));

    // A fresh model given the same params and state takes the same next step.
    let mut copy = Model::new(f32_backend(), config, batch.n_tokens()).unwrap();
    copy.write_params(&after).unwrap();
    copy.write_optimizer_state(&m, &v).unwrap();
    assert_eq!(copy.read_optimizer_state().unwrap(), (m.clone(), v.clone()));
    for model in [&mut model, &mut copy] {
        model.zero_grads().unwrap();
        model.forward_backward(&batch, 1.0, None).unwrap();
        model.adamw_step(&AdamW { step: 6, ..hp }).unwrap();
    }
    // Equal up to the f32 rounding of what was read and written back.
    let (ma, va) = model.read_optimizer_state().unwrap();
    let (mb, vb) = copy.read_optimizer_state().unwrap();
    for (a, b) in [(model.read_params().unwrap(), copy.read_params().unwrap()), (ma, mb), (va, vb)] {
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.name, y.name);
            assert!(max_rel_diff(&x.data, &y.data) < 1e-5, "{}", x.name);
        }
    }
    // Misnamed state is rejected.
    let mut bad = m.clone();
    bad[0].name = "nope".into();
    assert!(copy.write_optimizer_state(&bad, &v).is_err());
}

#[test]
fn init_is_seeded_and_scaled() {
    let config = ModelConfig::tiny(VOCAB);
    let mut model = Model::new(f32_backend(), config.clone(), 8).unwrap();
    model.init_params(1).unwrap();
    let a = model.read_params().unwrap();
    model.init_params(1).unwrap();
    assert_eq!(a, model.read_params().unwrap());
    model.init_params(2).unwrap();
    assert_ne!(a, model.read_params().unwrap());
    let std = |name: &str| {
        let t = a.iter().find(|t| t.name == name).unwrap();
        (t.data.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / t.data.len() as f64).sqrt()
    };
    assert!((std("layers.0.qkv") - 0.02).abs() < 0.002);
    assert!((std("layers.1.down") - 0.01).abs() < 0.001, "down scaled by 1/sqrt(2·2 layers)");
    assert!(a.iter().find(|t| t.name == "norm").unwrap().data.iter().all(|&x| x == 1.0));
    assert_eq!(a.iter().map(|t| t.data.len()).sum::<usize>(), config.n_params());
}

#[test]
fn simplellama_1_3b_has_1_266_780_160_parameters() {
    let config = ModelConfig::simplellama_1_3b();
    config.validate().unwrap();
    assert_eq!(config.n_params(), 1_266_780_160);
    assert_eq!(config.head_dim(), 64);
    assert_eq!(ModelConfig::preset("simplellama-1.3b").unwrap(), config);
    assert_eq!(ModelConfig::preset("tiny").unwrap(), ModelConfig::tiny(8192));
    let err = ModelConfig::preset("gpt-5").unwrap_err();
    assert!(format!("{err:#}").contains("simplellama-1.3b"), "{err:#}");
    let tied = ModelConfig { tie_embeddings: true, ..config };
    assert_eq!(tied.n_params(), 1_266_780_160 - 8192 * 2048);
}

fn llama3(
    low_freq_factor: f32,
    high_freq_factor: f32,
    original_max_position_embeddings: usize,
) -> RopeScaling {
    RopeScaling::Llama3 { factor: 8.0, low_freq_factor, high_freq_factor, original_max_position_embeddings }
}

#[test]
fn config_validation_names_the_problem() {
    let ok = ModelConfig::tiny(100);
    ok.validate().unwrap();
    let cases: Vec<(ModelConfig, &str)> = vec![
        (ModelConfig { vocab_size: 0, ..ok.clone() }, "vocab_size"),
        (ModelConfig { n_layers: 0, ..ok.clone() }, "n_layers"),
        (ModelConfig { d_model: 66, ..ok.clone() }, "divisible by n_heads"),
        (ModelConfig { n_kv_heads: 3, ..ok.clone() }, "divisible by n_kv_heads"),
        (ModelConfig { d_model: 12, ..ok.clone() }, "even"),
        (ModelConfig { dropout: 1.0, ..ok.clone() }, "dropout"),
        (ModelConfig { norm_eps: 0.0, ..ok.clone() }, "norm_eps"),
        (
            ModelConfig { rope_scaling: Some(RopeScaling::Linear { factor: 0.0 }), ..ok.clone() },
            "rope_scaling.factor",
        ),
        (ModelConfig { rope_scaling: Some(llama3(4.0, 4.0, 64)), ..ok.clone() }, "high_freq_factor"),
        (
            ModelConfig { rope_scaling: Some(llama3(1.0, 4.0, 0)), ..ok.clone() },
            "original_max_position_embeddings",
        ),
    ];
    for (config, expected) in cases {
        let err = config.validate().unwrap_err();
        assert!(format!("{err:#}").contains(expected), "expected {expected:?} in {err:#}");
        assert!(Model::new(f32_backend(), config, 8).is_err());
    }
}

#[test]
fn config_files_load_with_defaults_and_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.json");
    std::fs::write(&path, serde_json::to_string(&ModelConfig::tiny(50)).unwrap()).unwrap();
    assert_eq!(ModelConfig::load(&path).unwrap(), ModelConfig::tiny(50));
    // Optional fields take SimpleLLaMA's values.
    let minimal = r#"{"vocab_size": 50, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 176}"#;
    std::fs::write(&path, minimal).unwrap();
    let c = ModelConfig::load(&path).unwrap();
    assert_eq!((c.norm_eps, c.rope_theta, c.rope_style), (1e-5, 10000.0, RopeStyle::AdjacentPairs));
    assert!(!c.tie_embeddings && c.dropout == 0.0 && c.max_seq_len == 2048);
    for (text, expected) in [
        (minimal.replace("\"ffn_hidden\": 176", "\"ffn_hiden\": 176"), "ffn_hiden"),
        (minimal.replace(", \"ffn_hidden\": 176", ""), "ffn_hidden"),
        (minimal.replace("\"n_kv_heads\": 4", "\"n_kv_heads\": 3"), "n_kv_heads"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = format!("{:#}", ModelConfig::load(&path).unwrap_err());
        assert!(err.contains(expected) && err.contains("model.json"), "{err}");
    }
    let err = format!("{:#}", ModelConfig::load(&dir.path().join("absent.json")).unwrap_err());
    assert!(err.contains("absent.json"), "{err}");
}

#[test]
fn hugging_face_conversion_round_trips() {
    for config in [
        tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0),
        tiny_config(4, RopeStyle::HalfSplit, true, 0.0),
    ] {
        let mut model = Model::new(f32_backend(), config.clone(), 4).unwrap();
        model.init_params(9).unwrap();
        let ours = model.read_params().unwrap();
        let hf = to_hf(&config, ours.clone());
        let find = |name: &str| hf.iter().find(|t| t.name == name);
        let d = config.d_model;
        let hd = config.head_dim();
        assert_eq!(find("model.embed_tokens.weight").unwrap().shape, vec![VOCAB, d]);
        assert_eq!(find("model.layers.1.self_attn.q_proj.weight").unwrap().shape, vec![4 * hd, d]);
        assert_eq!(
            find("model.layers.1.self_attn.k_proj.weight").unwrap().shape,
            vec![config.n_kv_heads * hd, d]
        );
        assert_eq!(find("model.layers.0.mlp.gate_proj.weight").unwrap().shape, vec![24, d]);
        assert_eq!(find("model.layers.0.mlp.down_proj.weight").unwrap().shape, vec![d, 24]);
        assert!(find("model.layers.0.input_layernorm.weight").is_some());
        assert!(find("model.layers.0.post_attention_layernorm.weight").is_some());
        assert!(find("model.norm.weight").is_some());
        assert_eq!(find("lm_head.weight").is_some(), !config.tie_embeddings);
        // The q rows are the first rows of the fused qkv (permuted per head to Hugging Face's
        // half-split RoPE order for an adjacent-pairs model), the up rows the second half of gate_up.
        let qkv = ours.iter().find(|t| t.name == "layers.0.qkv").unwrap();
        let q_rows = &qkv.data[..4 * hd * d];
        let expected_q = match config.rope_style {
            RopeStyle::AdjacentPairs => sft::checkpoint::hf::adjacent_to_half_split(q_rows, 4, hd, d),
            RopeStyle::HalfSplit => q_rows.to_vec(),
        };
        assert_eq!(find("model.layers.0.self_attn.q_proj.weight").unwrap().data, expected_q);
        if config.rope_style == RopeStyle::AdjacentPairs {
            // Within head 0, HF row 1 is Meta row 2 and HF row hd/2 is Meta row 1.
            let q_hf = &find("model.layers.0.self_attn.q_proj.weight").unwrap().data;
            assert_eq!(q_hf[d..2 * d], q_rows[2 * d..3 * d]);
            assert_eq!(q_hf[hd / 2 * d..(hd / 2 + 1) * d], q_rows[d..2 * d]);
        }
        let gate_up = ours.iter().find(|t| t.name == "layers.1.gate_up").unwrap();
        assert_eq!(find("model.layers.1.mlp.up_proj.weight").unwrap().data, gate_up.data[24 * d..]);

        assert_eq!(from_hf(&config, hf.clone()).unwrap(), ours);
        let mut shuffled = hf.clone();
        shuffled.reverse();
        model.write_params(&from_hf(&config, shuffled.clone()).unwrap()).unwrap();
        assert_eq!(model.read_params().unwrap(), ours);

        let missing: Vec<NamedTensor> =
            hf.iter().filter(|t| t.name != "model.layers.1.mlp.up_proj.weight").cloned().collect();
        let err = format!("{:#}", from_hf(&config, missing.clone()).unwrap_err());
        assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
        let mut misshaped = hf.clone();
        let v = misshaped.iter_mut().find(|t| t.name == "model.layers.0.self_attn.v_proj.weight").unwrap();
        v.shape[0] += 1;
        let err = format!("{:#}", from_hf(&config, misshaped.clone()).unwrap_err());
        assert!(err.contains("v_proj") && err.contains("shape"), "{err}");
        if config.tie_embeddings {
            // A tied checkpoint may carry lm_head.weight as a copy of the embedding, nothing else.
            let mut with_head = hf.clone();
            let embed = find("model.embed_tokens.weight").unwrap();
            with_head.push(NamedTensor::new("lm_head.weight", embed.shape.clone(), embed.data.clone()));
            assert_eq!(from_hf(&config, with_head.clone()).unwrap(), ours);
            with_head.last_mut().unwrap().data[0] += 1.0;
            assert!(format!("{:#}", from_hf(&config, with_head.clone()).unwrap_err()).contains("lm_head"));
        }
        let mut extra = hf.clone();
        extra.push(NamedTensor::new("model.layers.9.mlp.up_proj.weight", vec![1], vec![0.0]));
        let err = format!("{:#}", from_hf(&config, extra.clone()).unwrap_err());
        assert!(err.contains("layers.9"), "{err}");
    }
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let batch = padded_batch(&examples(50, &[6, 5]), 0);
    let mut model = Model::new(f32_backend(), config, batch.n_tokens() - 1).unwrap();
    let err = format!("{:#}", model.loss(&batch).unwrap_err());
    assert!(err.contains("max_tokens"), "{err}");
    let mut model = Model::new(f32_backend(), model.config().clone(), batch.n_tokens()).unwrap();
    model.loss(&batch).unwrap();
    let mut bad = batch.clone();
    bad.inputs[3] = VOCAB as u32;
    assert!(format!("{:#}", model.loss(&bad).unwrap_err()).contains("vocabulary"));
    let mut bad = batch.clone();
    bad.cu_seqlens.pop();
    assert!(format!("{:#}", model.forward_backward(&bad, 1.0, None).unwrap_err()).contains("cu_seqlens"));
    let mut bad = batch.clone();
    bad.targets.pop();
    assert!(format!("{:#}", model.loss(&bad).unwrap_err()).contains("targets"));
    let mut cache = model.new_cache(4).unwrap();
    assert!(model.next_logits(&mut cache, &[]).is_err());
    assert!(model
        .next_logits(&mut cache, &[1, 2, 3, 4, 5])
        .unwrap_err()
        .to_string()
        .contains("KV cache full"));
}

/// Not a check: prints the CPU backend's training throughput on `ModelConfig::tiny`
/// (`cargo test --release --test model_batches -- --ignored --nocapture`).
#[test]
#[ignore]
fn tiny_forward_backward_throughput() {
    let config = ModelConfig::tiny(8192);
    let exs = examples(60, &[128; 8]);
    let batch = padded_batch(&exs, 0);
    let mut model = Model::new(f32_backend(), config, batch.n_tokens()).unwrap();
    model.init_params(1).unwrap();
    model.forward_backward(&batch, 1.0, None).unwrap();
    let steps = 5;
    let start = std::time::Instant::now();
    for _ in 0..steps {
        model.forward_backward(&batch, 1.0, Some(3)).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "tiny (d 64, 2 layers, vocab 8192) fwd+bwd, {} tokens/batch: {:.0} tokens/s",
        batch.n_tokens(),
        (steps * batch.n_tokens()) as f64 / secs
    );
}

#[test]
fn loss_matches_a_plain_reference_forward() {
    let exs = examples(70, &[7, 4, 6, 5]);
    for config in [
        tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0),
        tiny_config(4, RopeStyle::HalfSplit, true, 0.0),
    ] {
        for batch in [padded_batch(&exs, 1), packed_batch(&exs, 13)] {
            let mut model = model_f64(&config, batch.n_tokens(), 4);
            let params = model.read_params().unwrap();
            let expected = common::model::reference::reference_loss(&config, &params, &batch);
            let loss = model.loss(&batch).unwrap();
            assert!((loss - expected).abs() <= 1e-9 * expected, "loss {loss} vs reference {expected}");
        }
    }
}

/// The data loader's batches (dynamic padding and packing) of the same examples: the model sees
/// the same loss and gradients either way.
#[test]
fn loader_batches_padded_and_packed_agree() {
    use sft::data::{batches_from_examples, BatchMode, Example, LoaderConfig};
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let examples: Vec<Example> = examples(80, &[7, 3, 9, 5, 6, 4])
        .into_iter()
        .map(|e| Example { tokens: e.tokens, supervised: e.supervised })
        .collect();
    let cfg = |mode, batch_size| LoaderConfig { batch_size, max_seq_len: 12, mode, shuffle: false, seed: 0 };
    let padded = batches_from_examples(&examples, PAD, &cfg(BatchMode::Dynamic, 2)).unwrap();
    let packed = batches_from_examples(&examples, PAD, &cfg(BatchMode::Packed, 1)).unwrap();
    let supervised = |bs: &[Batch]| bs.iter().map(Batch::n_supervised).sum::<usize>();
    assert_eq!(supervised(&padded), supervised(&packed));
    assert!(packed.iter().any(|b| b.n_segments() > b.rows), "some row holds several examples");
    let max_tokens = padded.iter().chain(&packed).map(Batch::n_tokens).max().unwrap();
    let mut model = model_f64(&config, max_tokens, 8);
    let scale = 1.0 / supervised(&padded) as f32;
    let (loss_padded, g_padded) = grads_of(&mut model, &padded.iter().collect::<Vec<_>>(), scale);
    let (loss_packed, g_packed) = grads_of(&mut model, &packed.iter().collect::<Vec<_>>(), scale);
    assert!((loss_padded - loss_packed).abs() <= 1e-10 * loss_padded, "{loss_padded} vs {loss_packed}");
    let worst = assert_grads_close(&g_padded, &g_packed, 1e-6);
    println!("loader padded vs packed: max relative gradient difference {worst:e}");
}

/// The crate's CPU backend and the plain test-only one agree on a whole training step.
#[test]
fn cpu_backend_matches_the_naive_backend() {
    use common::model::naive::NaiveBackend;
    let exs = examples(90, &[7, 4, 6, 5]);
    for config in [
        tiny_config(2, RopeStyle::AdjacentPairs, false, 0.25),
        tiny_config(4, RopeStyle::HalfSplit, true, 0.25),
    ] {
        // The naive model with each recompute mode: recompute against an independent backend.
        for (batch, recompute) in [padded_batch(&exs, 1), packed_batch(&exs, 13)]
            .into_iter()
            .flat_map(|b| Recompute::ALL.map(|r| (b.clone(), r)))
        {
            let mut cpu = model_f64(&config, batch.n_tokens(), 5);
            let tokens = batch.n_tokens();
            let mut naive =
                Model::with_recompute(NaiveBackend::default(), config.clone(), tokens, None, recompute)
                    .unwrap();
            naive.write_params(&cpu.read_params().unwrap()).unwrap();
            let hp = AdamW {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.95,
                eps: 1e-8,
                weight_decay: 0.01,
                step: 1,
                grad_scale: 0.5,
            };
            let l_cpu = cpu.forward_backward(&batch, 0.1, Some(7)).unwrap();
            let l_naive = naive.forward_backward(&batch, 0.1, Some(7)).unwrap();
            // Not bit-equal: the backends may round constants (RoPE angles, for one) differently.
            assert!(
                (l_cpu - l_naive).abs() <= 1e-8 * l_naive,
                "{l_cpu} vs {l_naive} (recompute {recompute})"
            );
            assert_grads_close(&cpu.read_grads().unwrap(), &naive.read_grads().unwrap(), 1e-6);
            assert!(
                (cpu.grad_norm().unwrap() - naive.grad_norm().unwrap()).abs()
                    <= 1e-7 * naive.grad_norm().unwrap()
            );
            cpu.adamw_step(&hp).unwrap();
            naive.adamw_step(&hp).unwrap();
            assert_grads_close(&cpu.read_params().unwrap(), &naive.read_params().unwrap(), 1e-6);
            let mut c1 = cpu.new_cache(8).unwrap();
            let mut c2 = naive.new_cache(8).unwrap();
            let a = cpu.next_logits(&mut c1, &batch.inputs[..5]).unwrap();
            let b = naive.next_logits(&mut c2, &batch.inputs[..5]).unwrap();
            assert!(max_rel_diff(&a, &b) < 1e-6);
        }
    }
}

#[test]
fn out_of_memory_advice_names_a_micro_batch_that_fits() {
    use sft::model::forward::{memory_advice, memory_bytes, micro_batch_that_fits};
    let config = ModelConfig::preset("simplellama-1.3b").unwrap();
    let (fixed, per_token) = memory_bytes(&config, 2);
    // Weights (bf16) + f32 master, gradient and two moments: 18 bytes per parameter.
    assert!(fixed >= config.n_params() * 18);
    let gib = 1usize << 30;
    let free = 80 * gib;
    let fits = micro_batch_that_fits(&config, 2, 2048, free);
    assert!(fits >= 1);
    assert!(fixed + fits * per_token * 2048 <= free / 10 * 9);
    assert!(fixed + (fits + 1) * per_token * 2048 > free / 10 * 9);
    assert_eq!(memory_advice("gpu", &config, 2, fits, 2048, free), None);
    let msg = memory_advice("cuda:0 H100", &config, 2, fits + 8, 2048, free).unwrap();
    assert!(msg.contains("cuda:0 H100") && msg.contains(&format!("micro_batch {fits} would fit")), "{msg}");
    // The fixed state alone is too large: shorter rows would not help.
    let msg = memory_advice("gpu", &config, 2, 1, 2048, 10 * gib).unwrap();
    assert!(
        msg.contains("not even micro_batch 1 fits") && msg.contains("alone exceed") && msg.contains("--lora"),
        "{msg}"
    );
    // Room for the fixed state and half a row: shorter rows or recompute would.
    let tight = (fixed + per_token * 1024) / 9 * 10;
    let msg = memory_advice("gpu", &config, 2, 1, 2048, tight).unwrap();
    assert!(
        msg.contains("not even micro_batch 1 fits")
            && msg.contains("--max-seq-len")
            && msg.contains("--recompute"),
        "{msg}"
    );
}

#[test]
fn an_inference_model_gives_the_training_models_logits_and_refuses_to_train() {
    let config = tiny_config(2, RopeStyle::AdjacentPairs, false, 0.0);
    let mut train = Model::new(f32_backend(), config.clone(), 64).unwrap();
    train.init_params(5).unwrap();
    let params = train.read_params().unwrap();
    let mut infer = Model::new_inference(f32_backend(), config, 16).unwrap();
    infer.write_params(&params).unwrap();
    assert_eq!(infer.read_params().unwrap(), params);

    // Same logits, though the inference model feeds the 20-token prompt in chunks of 16.
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 % 20) as u32 + 3).collect();
    let mut c1 = train.new_cache(32).unwrap();
    let mut c2 = infer.new_cache(32).unwrap();
    let a = train.next_logits(&mut c1, &ids).unwrap();
    let b = infer.next_logits(&mut c2, &ids).unwrap();
    assert!(max_rel_diff(&a, &b) < 1e-5, "{}", max_rel_diff(&a, &b));

    let exs = examples(3, &[9, 6]);
    let batch = padded_batch(&exs, 0);
    assert!(infer.loss(&batch).unwrap().is_finite());
    let err = infer.forward_backward(&batch, 1.0, None).unwrap_err().to_string();
    assert!(err.contains("inference only"), "{err}");
    assert!(infer.read_grads().is_err() && infer.grad_norm().is_err());
}
