//! `sft plan` on the 1.3B: the shape of its output (families, labels, the final line), never
//! its timing values, which are estimates.

mod common;

use common::cli::output as sft;

const STEP: [&str; 9] =
    ["plan", "--model", "simplellama-1.3b", "--gpu", "h100", "--micro-batch", "8", "--seq-len", "2048"];

#[test]
fn plan_prints_every_family_and_ends_with_the_mfu_line() {
    let out = sft(&STEP);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("sft plan: ESTIMATES"), "{text}");
    assert!(text.contains("uncalibrated: no GPU measurement yet"), "{text}");
    for heading in ["Estimated cost per op family", "Estimated speed:", "Estimated memory plan:"] {
        assert!(text.contains(heading), "{heading} missing:\n{text}");
    }
    // Every family of a training step appears (cast only when a copy changes precision, which
    // the step never does). The 1.3B has dropout 0.1, whose masks the norm kernels draw: no
    // dropout row.
    assert!(!text.lines().any(|l| l.split_whitespace().next() == Some("dropout")), "{text}");
    for family in [
        "embedding",
        "rmsnorm",
        "matmul",
        "rope",
        "flash_attention",
        "swiglu",
        "cross_entropy",
        "global_norm",
        "adamw",
        "memory",
    ] {
        let row = text.lines().find(|l| l.split_whitespace().next() == Some(family));
        let row = row.unwrap_or_else(|| panic!("no row for {family}:\n{text}"));
        // calls, launches, GFLOP, GB, ms, share, bound
        assert_eq!(row.split_whitespace().count(), 8, "{row}");
    }
    assert!(text.contains("1266780160 parameters"), "{text}");
    assert!(text.contains("fits "), "{text}");
    let last = text.lines().last().unwrap();
    let pct = last.strip_prefix("estimated MFU: ").and_then(|r| r.strip_suffix('%'));
    let pct: f64 = pct.unwrap_or_else(|| panic!("last line: {last}")).parse().unwrap();
    assert!(pct > 0.0 && pct < 100.0, "{last}");
    let decimals = last.trim_end_matches('%').rsplit('.').next().unwrap();
    assert_eq!(decimals.len(), 1, "{last}");
}

#[test]
fn plan_json_is_labelled_an_estimate_and_matches_the_memory_model() {
    let mut args = STEP.to_vec();
    args[4] = "rtx4090";
    args.push("--json");
    let out = sft(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["estimate"], true);
    assert_eq!(v["calibrated"], false);
    assert_eq!(v["device"]["key"], "rtx4090");
    let families: Vec<&str> =
        v["families"].as_array().unwrap().iter().map(|f| f["family"].as_str().unwrap()).collect();
    assert!(families.contains(&"matmul") && families.contains(&"flash_attention"), "{families:?}");
    // 8 × 2048 tokens of the 1.3B do not fit in 24 GB (the optimizer state alone is ~21 GiB).
    assert_eq!(v["memory"]["fits"], false);
    assert_eq!(v["memory"]["largest_micro_batch"], 0);
}

#[test]
fn plan_names_a_bad_device_or_length() {
    let mut args = STEP.to_vec();
    args[4] = "tpu";
    let out = sft(&args);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--gpu \"tpu\"") && err.contains("h100"), "{err}");

    let mut args = STEP.to_vec();
    args[8] = "4096";
    let out = sft(&args);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--seq-len 4096"));
}

/// Llama 3.2 1B's `config.json` as Hugging Face publishes it (the fields that matter here).
const LLAMA_3_2_1B: &str = r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
 "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
 "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
 "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
 "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0,
 "high_freq_factor": 4.0, "low_freq_factor": 1.0, "original_max_position_embeddings": 8192,
 "rope_type": "llama3"}, "rope_theta": 500000.0, "tie_word_embeddings": true,
 "torch_dtype": "bfloat16", "vocab_size": 128256}"#;

fn plan_params(model: &str) -> u64 {
    let out = sft(&["plan", "--model", model, "--seq-len", "2048", "--json"]);
    assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["n_params"].as_u64().unwrap_or_else(|| panic!("{v}"))
}

#[test]
fn a_pretrained_models_directory_or_config_json_is_a_model_to_plan() {
    let root = tempfile::tempdir().unwrap();
    let hf = root.path().join("Llama-3.2-1B");
    std::fs::create_dir(&hf).unwrap();
    std::fs::write(hf.join("config.json"), LLAMA_3_2_1B).unwrap();
    // 1,235,814,400: the published size of Llama 3.2 1B (tied embeddings).
    assert_eq!(plan_params(hf.to_str().unwrap()), 1_235_814_400);
    assert_eq!(plan_params(hf.join("config.json").to_str().unwrap()), 1_235_814_400);

    // A small Llama of the same kind, initialized from its config file, then planned from the
    // checkpoint sft wrote (its config.json carries our "sft" section as well).
    let small = root.path().join("small.json");
    let text = LLAMA_3_2_1B
        .replace("\"hidden_size\": 2048", "\"hidden_size\": 256")
        .replace("\"intermediate_size\": 8192", "\"intermediate_size\": 512")
        .replace("\"num_attention_heads\": 32", "\"num_attention_heads\": 4")
        .replace("\"num_key_value_heads\": 8", "\"num_key_value_heads\": 2")
        .replace("\"num_hidden_layers\": 16", "\"num_hidden_layers\": 2")
        .replace("\"vocab_size\": 128256", "\"vocab_size\": 512");
    std::fs::write(&small, text).unwrap();
    let ckpt = root.path().join("init");
    let out = sft(&["init", "--model", small.to_str().unwrap(), "--out", ckpt.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Embedding 512·256, per layer q 256², k and v 128·256, o 256², three 512·256 MLP
    // matrices, two norms; the final norm.
    let per_layer = 2 * 256 * 256 + 2 * 128 * 256 + 3 * 512 * 256 + 2 * 256;
    let expected = 512 * 256 + 2 * per_layer + 256;
    assert_eq!(plan_params(ckpt.to_str().unwrap()), expected);
    assert_eq!(plan_params(small.to_str().unwrap()), expected);

    // A model-config file of neither kind still names its bad field.
    let bad = root.path().join("bad.json");
    std::fs::write(&bad, r#"{"d_model": 256, "heads": 4}"#).unwrap();
    let out = sft(&["plan", "--model", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.json") && err.contains("heads"), "{err}");
}
