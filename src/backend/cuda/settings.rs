//! The environment variables that change which kernels the CUDA backend runs (cross-checks,
//! opt-in variants, GEMM tuning), and the line each prints when the backend opens: a run's log
//! then says when it did not run the defaults (an atomic dQ run is not bit-reproducible, a
//! fallback GEMM run is 100 times slower). Malformed values are refused where they are read
//! (`FlashChoice::from_env`, `gemm::candidate_count`); these notes only describe valid ones.

use super::{FlashChoice, FlashDq, FlashMma};

/// One note per variable set to a value other than its default, in a fixed order; `var` reads
/// the environment.
pub fn notes(var: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |name: &str, value: &str, what: &str| out.push(format!("{name}={value}: {what}"));
    if let Some(v) = var("SFT_FLASH_DQ") {
        match FlashDq::parse(&v) {
            Ok(FlashDq::Atomic) => note(
                "SFT_FLASH_DQ",
                &v,
                "the flash backward adds dQ with fp32 atomics; runs are not bit-reproducible",
            ),
            Ok(FlashDq::Deferred | FlashDq::DeferredQ64) => {
                note("SFT_FLASH_DQ", &v, "the flash backward's deferred dQ sums (the default's bits)")
            }
            Ok(FlashDq::Ordered) | Err(_) => {}
        }
    }
    if let Some(v) = var("SFT_FLASH_MMA") {
        if let Ok(FlashMma::Wgmma) = FlashMma::parse(&v) {
            note(
                "SFT_FLASH_MMA",
                &v,
                "the head_dim 64 flash forward and ordered backward on wgmma (compute capability 9.0)",
            );
        }
    }
    if let Some(v) = var("SFT_ATTENTION").filter(|v| v.eq_ignore_ascii_case("scalar")) {
        note(
            "SFT_ATTENTION",
            &v,
            "the scalar attention kernels (slower; a cross-check of the tensor-core ones)",
        );
    }
    if let Some(v) = var("SFT_GEMM_FALLBACK").filter(|v| v == "1") {
        note("SFT_GEMM_FALLBACK", &v, "every GEMM on kernels/matmul.cu, not cuBLASLt (100x slower or worse)");
    }
    let autotune_off = var("SFT_GEMM_AUTOTUNE").is_some_and(|v| v == "0");
    if autotune_off {
        note("SFT_GEMM_AUTOTUNE", "0", "cuBLASLt's first heuristic answer per GEMM shape, untimed");
    } else if let Some(v) = var("SFT_GEMM_CANDIDATES") {
        note("SFT_GEMM_CANDIDATES", &v, "cuBLASLt heuristic answers timed per GEMM shape (default 8)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::notes;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(name, _)| *name == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn defaults_print_nothing_and_each_override_one_line() {
        assert!(notes(env(&[])).is_empty());
        assert!(notes(env(&[
            ("SFT_FLASH_DQ", "ordered"),
            ("SFT_ATTENTION", "auto"),
            ("SFT_GEMM_AUTOTUNE", "1")
        ]))
        .is_empty());
        assert!(notes(env(&[("SFT_FLASH_MMA", "mma")])).is_empty());
        let wgmma = notes(env(&[("SFT_FLASH_MMA", "wgmma")]));
        assert!(wgmma.len() == 1 && wgmma[0].starts_with("SFT_FLASH_MMA=wgmma: "), "{wgmma:?}");
        let all = notes(env(&[
            ("SFT_FLASH_DQ", "atomic"),
            ("SFT_ATTENTION", "scalar"),
            ("SFT_GEMM_FALLBACK", "1"),
            ("SFT_GEMM_CANDIDATES", "32"),
        ]));
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(all[0].starts_with("SFT_FLASH_DQ=atomic: ") && all[0].contains("not bit-reproducible"));
        assert!(all[3].starts_with("SFT_GEMM_CANDIDATES=32: "));
        // Autotuning off overrides the candidate count (gemm::candidate_count): one note.
        let off = notes(env(&[("SFT_GEMM_AUTOTUNE", "0"), ("SFT_GEMM_CANDIDATES", "32")]));
        assert_eq!(off.len(), 1);
        assert!(off[0].starts_with("SFT_GEMM_AUTOTUNE=0: "), "{off:?}");
    }
}
