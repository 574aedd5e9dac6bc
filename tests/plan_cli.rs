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
