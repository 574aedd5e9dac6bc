//! Calibration from a GPU measurement: nsys's per-kernel summary of profiled training steps
//! (`nsys stats --report cuda_gpu_kern_sum --format csv`), summed per op family by kernel name,
//! next to the plan's estimate of the same step; the ratios are the families' factors.
//!
//! cuBLASLt's kernels cannot be told apart by name, so all GEMM time is one measurement, shared
//! between `matmul` and the loss's GEMMs (`cross_entropy`) in proportion to their estimates.
//! Memsets and copies are not kernels (nsys reports them apart): `memory` stays uncalibrated.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::counting::{Family, KernelKind, Ledger};
use super::devices::{Calibration, DeviceSpec};
use super::roofline;

/// Where a kernel's time goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Attribution {
    Family(Family),
    /// cuBLASLt (or our fallback GEMM): `matmul` and the loss's GEMMs.
    Gemm,
}

/// The family of a kernel by its entry name (kernels/*.cu; docs/cuda.md lists them), or GEMM.
pub fn attribute(kernel: &str) -> Option<Attribution> {
    // nsys prints C++ names with their signature; the entry name is what precedes '('.
    let name = kernel.split('(').next().unwrap_or(kernel).trim();
    let name = name.strip_prefix("void ").unwrap_or(name);
    let by_prefix: [(&str, Family); 14] = [
        ("adamw", Family::Adamw),
        ("attention_", Family::FlashAttention),
        ("flash_", Family::FlashAttention),
        ("cast_", Family::Cast),
        ("cross_entropy_", Family::CrossEntropy),
        ("dropout_", Family::Dropout),
        ("embedding_", Family::Embedding),
        ("rmsnorm_", Family::Rmsnorm),
        ("residual_rmsnorm", Family::Rmsnorm),
        ("rope_", Family::Rope),
        ("sum_squares", Family::GlobalNorm),
        ("sum_split", Family::GlobalNorm),
        ("swiglu_", Family::Swiglu),
        ("matmul_fallback", Family::Matmul),
    ];
    if let Some(&(_, f)) = by_prefix.iter().find(|(p, _)| name.starts_with(p)) {
        return Some(if f == Family::Matmul { Attribution::Gemm } else { Attribution::Family(f) });
    }
    let lower = kernel.to_ascii_lowercase();
    ["gemm", "nvjet", "cutlass", "xmma", "cublas"]
        .iter()
        .any(|k| lower.contains(k))
        .then_some(Attribution::Gemm)
}

/// Splits one CSV line, honouring double quotes (kernel names contain commas).
fn csv_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let field = fields.last_mut().expect("one field at least");
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => field.push(c),
        }
    }
    fields
}

/// Measured seconds per attribution from nsys's `cuda_gpu_kern_sum` CSV text (`path` names it in
/// errors), and the kernels it could not attribute.
pub fn parse_kern_sum(text: &str, path: &str) -> Result<(BTreeMap<Attribution, f64>, Vec<String>)> {
    // nsys may print a few lines before the table; the header is the line naming both columns.
    let mut lines = text.lines().enumerate();
    let (header_line, header) = lines
        .by_ref()
        .map(|(i, l)| (i, csv_fields(l)))
        .find(|(_, f)| f.iter().any(|c| c == "Name") && f.iter().any(|c| c.starts_with("Total Time")))
        .with_context(|| {
            format!(
                "{path}: no header with \"Total Time (ns)\" and \"Name\" \
                 (expected `nsys stats --report cuda_gpu_kern_sum --format csv`)"
            )
        })?;
    let col = |name: &str| header.iter().position(|c| c.starts_with(name)).expect("checked above");
    let (time_col, name_col) = (col("Total Time"), col("Name"));
    ensure!(header[time_col].contains("(ns)"), "{path}: column {:?} is not in nanoseconds", header[time_col]);
    let mut measured = BTreeMap::new();
    let mut unattributed = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f = csv_fields(line);
        ensure!(
            f.len() == header.len(),
            "{path}:{}: {} fields, the header (line {}) has {}",
            i + 1,
            f.len(),
            header_line + 1,
            header.len()
        );
        let ns =
            f[time_col].replace(',', "").trim().parse::<f64>().ok().filter(|ns| ns.is_finite() && *ns >= 0.0);
        let ns = ns.with_context(|| {
            format!("{path}:{}: Total Time {:?} is not a time in nanoseconds", i + 1, f[time_col])
        })?;
        match attribute(&f[name_col]) {
            Some(a) => *measured.entry(a).or_insert(0.0) += ns * 1e-9,
            None => unattributed.push(f[name_col].clone()),
        }
    }
    Ok((measured, unattributed))
}

/// The measured/estimated ratios a calibration accepts.
const PLAUSIBLE_FACTORS: std::ops::RangeInclusive<f64> = 1e-3..=1e3;

/// One family's measured time against its estimate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FamilyCalibration {
    pub family: Family,
    pub measured_s: f64,
    pub estimated_s: f64,
    pub factor: f64,
}

/// The estimate of a family's GEMMs alone (its Gemm-kind tally, launches included).
fn gemm_estimate(ledger: &Ledger, device: &DeviceSpec, family: Family) -> f64 {
    let (c, m, o) = roofline(device, KernelKind::Gemm, &ledger.tally(family, KernelKind::Gemm));
    c.max(m) + o
}

/// Per family, measured seconds per step (`measured` over `steps` profiled steps) against the
/// uncalibrated estimate of `ledger` on `device`. Families without a measurement are left out.
pub fn compare(
    measured: &BTreeMap<Attribution, f64>,
    steps: usize,
    ledger: &Ledger,
    device: &DeviceSpec,
) -> Result<Vec<FamilyCalibration>> {
    ensure!(steps > 0, "--profiled-steps must be at least 1");
    let uncalibrated = Calibration { source: None, factors: BTreeMap::new() };
    let estimates = super::estimate_families(ledger, device, &uncalibrated);
    let gemm_total =
        gemm_estimate(ledger, device, Family::Matmul) + gemm_estimate(ledger, device, Family::CrossEntropy);
    let gemm_measured = measured.get(&Attribution::Gemm).copied().unwrap_or(0.0) / steps as f64;
    let mut out = Vec::new();
    for e in &estimates {
        let own = measured.get(&Attribution::Family(e.family)).copied().unwrap_or(0.0) / steps as f64;
        let share = if gemm_total > 0.0 {
            gemm_measured * gemm_estimate(ledger, device, e.family) / gemm_total
        } else {
            0.0
        };
        let m = own + share;
        if m == 0.0 || e.seconds == 0.0 {
            continue;
        }
        // A roofline estimate is not off by a thousand times: such a ratio (or one that
        // overflowed f64) comes from a profile of another shape or step count, and would scale
        // the family's estimate to nothing or to infinity.
        let factor = m / e.seconds;
        ensure!(
            PLAUSIBLE_FACTORS.contains(&factor),
            "{}: measured {m:e} s per step against an estimate of {:e} s, not a usable ratio \
             (factors lie in {PLAUSIBLE_FACTORS:?}): was the profiled run of this --model, \
             --micro-batch, --seq-len and --grad-accum, over --profiled-steps {steps} steps?",
            e.family.name(),
            e.seconds
        );
        out.push(FamilyCalibration { family: e.family, measured_s: m, estimated_s: e.seconds, factor });
    }
    if out.is_empty() {
        bail!("the measurement attributes no kernel time to any op family of the plan");
    }
    Ok(out)
}

/// `sft plan --calibrate-from`'s reading of the nsys summary in `text` (`path` names it in
/// errors): per family, its measured time over `steps` profiled steps against the estimate of
/// `ledger` on `device`; and the kernels it could not attribute.
pub fn calibrate(
    text: &str,
    path: &str,
    steps: usize,
    ledger: &Ledger,
    device: &DeviceSpec,
) -> Result<(Vec<FamilyCalibration>, Vec<String>)> {
    let (measured, unattributed) = parse_kern_sum(text, path)?;
    let rows =
        compare(&measured, steps, ledger, device).with_context(|| format!("calibrating from {path}"))?;
    Ok((rows, unattributed))
}

/// `x` to four significant digits: 2.467, 0.9071, 0.0001234 (rounding to decimals would write
/// a small factor as 0, which the plan refuses).
fn four_digits(x: f64) -> f64 {
    format!("{x:.3e}").parse().unwrap_or(x)
}

/// Writes `rows` as `device`'s factors, with `source`, into the calibration file at `path`
/// (families not measured keep theirs).
pub fn write_calibration(path: &Path, device: &str, source: &str, rows: &[FamilyCalibration]) -> Result<()> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {shown}"))?;
    let mut doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {shown}"))?;
    let entry = doc
        .get_mut("devices")
        .and_then(|d| d.get_mut(device))
        .with_context(|| format!("{shown}: devices.{device} is missing"))?;
    entry["source"] = serde_json::Value::String(source.to_string());
    for r in rows {
        entry["factors"][r.family.name()] = serde_json::json!(four_digits(r.factor));
    }
    let out = serde_json::to_string_pretty(&doc)? + "\n";
    // The file must stay one that `sft plan` accepts.
    super::devices::parse_calibration(&out, &shown, device)?;
    std::fs::write(path, out).with_context(|| format!("writing {shown}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn kernels_are_attributed_by_entry_name() {
        let f = attribute;
        assert_eq!(f("rmsnorm_backward"), Some(Attribution::Family(Family::Rmsnorm)));
        assert_eq!(f("rmsnorm_backward_dw_reduce"), Some(Attribution::Family(Family::Rmsnorm)));
        assert_eq!(f("residual_rmsnorm_forward"), Some(Attribution::Family(Family::Rmsnorm)));
        assert_eq!(f("flash_backward_64"), Some(Attribution::Family(Family::FlashAttention)));
        assert_eq!(f("flash_tile_table"), Some(Attribution::Family(Family::FlashAttention)));
        assert_eq!(f("attention_backward_dkdv_32"), Some(Attribution::Family(Family::FlashAttention)));
        assert_eq!(f("attention_backward_d"), Some(Attribution::Family(Family::FlashAttention)));
        assert_eq!(f("sum_squares_f32"), Some(Attribution::Family(Family::GlobalNorm)));
        assert_eq!(f("sum_split"), Some(Attribution::Family(Family::GlobalNorm)));
        assert_eq!(
            f("void cross_entropy_rows(float*, int)"),
            Some(Attribution::Family(Family::CrossEntropy))
        );
        assert_eq!(f("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT"), Some(Attribution::Gemm));
        assert_eq!(f("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64"), Some(Attribution::Gemm));
        assert_eq!(f("matmul_fallback_f32out"), Some(Attribution::Gemm));
        assert_eq!(f("some_other_kernel"), None);
    }

    #[test]
    fn the_kernel_summary_is_summed_per_family() {
        let csv = "Processing [report.sqlite]\n\
            \"Time (%)\",\"Total Time (ns)\",\"Instances\",\"Avg (ns)\",\"Name\"\n\
            60.0,\"600000\",3,200000,\"void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm, 1>(Params)\"\n\
            20.0,200000,48,4166,rmsnorm_backward\n\
            10.0,100000,48,2083,rmsnorm_forward\n\
            10.0,100000,1,100000,mystery\n";
        let (m, unknown) = parse_kern_sum(csv, "k.csv").unwrap();
        assert!((m[&Attribution::Gemm] - 600e-6).abs() < 1e-12);
        assert!((m[&Attribution::Family(Family::Rmsnorm)] - 300e-6).abs() < 1e-12);
        assert_eq!(unknown, vec!["mystery".to_string()]);
        let err = format!("{:#}", parse_kern_sum("a,b\n1,2\n", "k.csv").unwrap_err());
        assert!(err.contains("k.csv") && err.contains("Total Time"), "{err}");
        let err =
            format!("{:#}", parse_kern_sum("\"Total Time (ns)\",Name\nx,rope_apply\n", "k.csv").unwrap_err());
        assert!(err.contains("k.csv:2"), "{err}");
        // Parsed as f64 but not a time: refused, not summed into a factor of NaN or below zero.
        for time in ["NaN", "inf", "-5", "1e400"] {
            let csv = format!("\"Total Time (ns)\",Name\n{time},rope_apply\n");
            let err = format!("{:#}", parse_kern_sum(&csv, "k.csv").unwrap_err());
            assert!(err.contains("k.csv:2") && err.contains("not a time in nanoseconds"), "{err}");
        }
        assert_eq!(four_digits(2.46749), 2.467);
        assert_eq!(four_digits(0.000123456), 0.0001235);
    }

    #[test]
    fn factors_are_measured_over_estimated_and_gemm_time_is_shared() {
        let c = ModelConfig {
            d_model: 128,
            n_heads: 2,
            n_kv_heads: 1,
            ffn_hidden: 352,
            ..ModelConfig::tiny(300)
        };
        let count = super::super::count_step(&c, 2, 64, 1).unwrap();
        let dev = super::super::devices::device("h100").unwrap();
        let base = Calibration { source: None, factors: BTreeMap::new() };
        let est = super::super::estimate_families(&count.ledger, dev, &base);
        let e = |f: Family| est.iter().find(|x| x.family == f).unwrap().seconds;
        // Twice every estimate, over 2 profiled steps: every factor 2. The loss's own kernels
        // are measured under their names, its GEMMs with cuBLAS's.
        let ce_gemm = gemm_estimate(&count.ledger, dev, Family::CrossEntropy);
        let mut measured = BTreeMap::new();
        measured.insert(Attribution::Gemm, 4.0 * (e(Family::Matmul) + ce_gemm));
        measured.insert(Attribution::Family(Family::CrossEntropy), 4.0 * (e(Family::CrossEntropy) - ce_gemm));
        measured.insert(Attribution::Family(Family::Rmsnorm), 4.0 * e(Family::Rmsnorm));
        let rows = compare(&measured, 2, &count.ledger, dev).unwrap();
        let families: Vec<Family> = rows.iter().map(|r| r.family).collect();
        assert_eq!(families, vec![Family::Rmsnorm, Family::Matmul, Family::CrossEntropy]);
        for r in &rows {
            assert!((r.factor - 2.0).abs() < 1e-9, "{:?}: {}", r.family, r.factor);
        }
        // Times a thousand times off the estimate, or whose ratio to it overflows: refused.
        for time in [f64::MAX, 5e-324, 4e3 * e(Family::Rmsnorm)] {
            measured.insert(Attribution::Family(Family::Rmsnorm), time);
            let err = format!("{:#}", compare(&measured, 1, &count.ledger, dev).unwrap_err());
            assert!(err.contains("rmsnorm") && err.contains("not a usable ratio"), "{err}");
        }
    }

    #[test]
    fn writing_keeps_the_file_valid_and_records_the_source() {
        let dir = std::env::temp_dir().join(format!("sft_plan_cal_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("calibration.json");
        std::fs::write(&path, include_str!("calibration.json")).unwrap();
        let rows =
            [FamilyCalibration { family: Family::Matmul, measured_s: 1.2, estimated_s: 1.0, factor: 1.2 }];
        // A device still uncalibrated in the shipped file: the families not measured keep 1.0.
        write_calibration(&path, "a100", "A100, 2026-12-01, commit abc, nsys", &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let cal = super::super::devices::parse_calibration(&text, "c", "a100").unwrap();
        assert_eq!(cal.factor(Family::Matmul), 1.2);
        assert_eq!(cal.factor(Family::Rmsnorm), 1.0);
        assert_eq!(cal.source.as_deref(), Some("A100, 2026-12-01, commit abc, nsys"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
