//! The two CSV files sft reads back: a run's `log.csv` (through `sft plot` and the resume that
//! keeps its rows up to the checkpoint) and nsys's kernel summary (through `sft plan
//! --calibrate-from` and `--write-calibration`). Each is generated valid, then its values are
//! set to what a damaged or hand-edited file holds (NaN, infinities, huge or negative numbers,
//! missing fields) and its bytes edited at random. Every outcome must be a clean error naming
//! the file, or a result that holds: an SVG, a log that still starts with its header, factors
//! that are finite and positive. An input that runs past [`DEADLINE`] fails too (a plot's tick
//! search once never ended on a range that overflowed).
//!
//! Bounded in time: `SFT_FUZZ_SECONDS` (default 2) per target. `SFT_FUZZ_SEED` replays a run.

mod common;

use common::fuzz::{self, Tally};
use sft::model::ModelConfig;
use sft::plan::{calibrate, count_step, devices};
use sft::rng::Rng;
use sft::train::log::{CsvLog, HEADER};
use sft::train::plot::plot_log;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The longest one input may take, on a slow CI machine: a plot of 40 rows draws in milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

/// What a number field of either file is set to.
const NUMBERS: &[&str] = &[
    "",
    "0",
    "-0",
    "1",
    "2.5",
    "-3",
    "NaN",
    "nan",
    "inf",
    "-inf",
    "infinity",
    "1e308",
    "-1e308",
    "1.7976931348623157e308",
    "1e400",
    "1e-320",
    "5e-324",
    "1e300",
    "-1e300",
    "abc",
    " 1",
    "1e",
    "0x10",
    "1,234",
    "\"1,234,567\"",
    "18446744073709551615",
    "18446744073709551616",
    "-1",
];

fn pick<'a>(rng: &mut Rng, from: &[&'a str]) -> &'a str {
    from[rng.below(from.len())]
}

/// A number of some magnitude, or one of [`NUMBERS`].
fn number(rng: &mut Rng) -> String {
    if rng.below(3) == 0 {
        return pick(rng, NUMBERS).to_string();
    }
    let exp = rng.below(24) as i32 - 12;
    format!("{}", rng.next_f64() * 10f64.powi(exp))
}

/// What a byte of CSV text is overwritten with: its syntax and a number's characters.
const CSV_BYTES: &[u8] = b"0123456789-.e,\n\" naif";

/// `text` with up to two byte-level edits.
fn damaged(rng: &mut Rng, text: String) -> Vec<u8> {
    let mut bytes = text.into_bytes();
    for _ in 0..rng.below(3) {
        fuzz::edit_text(rng, &mut bytes, CSV_BYTES);
    }
    bytes
}

/// Runs `f` on another thread. When it runs past [`DEADLINE`] on input `what`, the process exits
/// with the input and the seed on stderr: the thread cannot be stopped, and a panic here would
/// wait on it.
fn with_deadline(
    tally: Tally,
    seed: u64,
    what: &str,
    f: impl FnOnce(Tally) -> Tally + Send + 'static,
) -> Tally {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f(tally));
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(done) => done,
        Err(_) => {
            eprintln!("seed {seed}: {what}: still running after {DEADLINE:?}");
            std::process::exit(101)
        }
    }
}

/// A training log of up to 40 rows, most of them as `sft train` writes them.
fn log_text(rng: &mut Rng) -> String {
    let mut lines = vec![if rng.below(20) == 0 { HEADER.replace("lr", "lr2") } else { HEADER.to_string() }];
    let rows = rng.below(41);
    // At times one column holds the same odd value in every row (a plot's axis then has no
    // ordinary value to span).
    let column = (rng.below(4) == 0).then(|| (rng.below(10), number(rng)));
    let mut step = rng.below(5) as u64;
    for _ in 0..rows {
        step += rng.below(3) as u64;
        let mut cols: Vec<String> = vec![
            step.to_string(),
            format!("{:.2}", rng.next_f64() * 100.0),
            format!("{}", 1.0 + rng.next_f64()),
            String::new(),
            String::new(),
            String::new(),
            format!("{:e}", 1e-4 * rng.next_f64()),
            format!("{}", rng.next_f64()),
            format!("{:.3}", step as f64),
            format!("{:.1}", 1000.0 * rng.next_f64()),
        ];
        cols[3] = cols[2].clone();
        for _ in 0..rng.below(3) {
            let k = rng.below(cols.len());
            cols[k] = if k == 0 && rng.below(2) == 0 { pick(rng, NUMBERS).to_string() } else { number(rng) };
        }
        if let Some((k, v)) = &column {
            cols[*k] = v.clone();
        }
        if rng.below(30) == 0 {
            cols.pop();
        }
        lines.push(cols.join(","));
    }
    lines.join("\n") + "\n"
}

/// `sft plot` and the resume's `CsvLog::open` on the log at `path`.
fn check_log(mut tally: Tally, path: PathBuf, what: String, log_scale: bool, resume: u64) -> Tally {
    let shown = path.display().to_string();
    let svg = path.with_file_name("loss.svg");
    let _ = std::fs::remove_file(&svg);
    if let Some(summary) = tally.run(&what, &shown, || plot_log(&path, None, log_scale)) {
        let text = std::fs::read_to_string(&summary.svg).unwrap_or_default();
        if !text.starts_with("<svg") || !text.trim_end().ends_with("</svg>") {
            tally.failures.push(format!("{what}: plot_log returned Ok without a whole SVG"));
        }
    }
    if tally.run(&what, &shown, || CsvLog::open(&path, Some(resume))).is_some() {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let kept_only_earlier = text
            .lines()
            .skip(1)
            .all(|l| l.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s <= resume));
        if !text.starts_with(&format!("{HEADER}\n")) || !kept_only_earlier {
            tally.failures.push(format!("{what}: the resumed log holds {text:?}"));
        }
    }
    tally
}

#[test]
fn fuzz_the_training_log() {
    let seconds = fuzz::seconds(2.0);
    let seed = fuzz::seed(seconds);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.csv");
    let mut tally = Tally::default();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let text = log_text(&mut rng);
        let bytes = damaged(&mut rng, text);
        std::fs::write(&path, &bytes).unwrap();
        let what = format!("log.csv {:?}", String::from_utf8_lossy(&bytes));
        let (log_scale, resume) = (rng.below(2) == 0, rng.below(30) as u64);
        tally = with_deadline(tally, seed, &what, {
            let (path, what) = (path.clone(), what.clone());
            move |t| check_log(t, path, what, log_scale, resume)
        });
    }
    println!(
        "training log: {} inputs, {} plotted or resumed, {} errors",
        tally.inputs, tally.ok, tally.errors
    );
    tally.assert_clean(seed);
}

/// Kernel names as nsys prints them: ours, cuBLAS's (with commas and quotes) and unknown ones.
const KERNELS: &[&str] = &[
    "flash_backward_64",
    "flash_forward_64",
    "rmsnorm_backward",
    "residual_rmsnorm_forward",
    "rope_apply",
    "swiglu_forward",
    "adamw_multi",
    "cross_entropy_rows",
    "sum_squares_f32",
    "\"void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_256x128_32x3_tn_align8, 1>(Params)\"",
    "nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT",
    "\"void \"\"quoted\"\", kernel(float*, int)\"",
    "mystery_kernel",
];

/// nsys's `cuda_gpu_kern_sum` CSV, with a line or two before the header at times.
fn kern_sum_text(rng: &mut Rng) -> String {
    let mut lines = Vec::new();
    if rng.below(2) == 0 {
        lines.push("Processing [report.sqlite] with [cuda_gpu_kern_sum.py]... ".to_string());
    }
    let time = if rng.below(20) == 0 { "Total Time (us)" } else { "Total Time (ns)" };
    lines.push(format!("Time (%),{time},Instances,Avg (ns),Med (ns),Min (ns),Max (ns),StdDev (ns),Name"));
    // Totals up to 131 µs: the tiny model's families are estimated at microseconds, and a
    // factor a thousand times off is refused.
    for _ in 0..rng.below(16) {
        let total = if rng.below(4) == 0 { number(rng) } else { format!("{}", rng.below(1 << 17) + 1) };
        let n = 1 + rng.below(200);
        lines.push(format!("{:.1},{total},{n},1,1,1,1,0,{}", 100.0 * rng.next_f64(), pick(rng, KERNELS)));
    }
    lines.join("\n") + "\n"
}

#[test]
fn fuzz_the_kernel_summary_calibration() {
    let seconds = fuzz::seconds(2.0);
    let seed = fuzz::seed(seconds);
    let mut rng = Rng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let calibration = dir.path().join("calibration.json");
    let original =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(devices::CALIBRATION_PATH))
            .unwrap();
    let config =
        ModelConfig { d_model: 128, n_heads: 2, n_kv_heads: 1, ffn_hidden: 352, ..ModelConfig::tiny(300) };
    let ledger = count_step(&config, 2, 64, 1).unwrap().ledger;
    let device = devices::device("h200").unwrap();
    let csv = "kern_sum.csv";
    let mut tally = Tally::default();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let text = kern_sum_text(&mut rng);
        let bytes = damaged(&mut rng, text);
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let what = format!("{csv} {text:?}");
        let steps = [0, 1, 3][rng.below(3)];
        let Some((rows, _)) =
            tally.run(&what, csv, || calibrate::calibrate(&text, csv, steps, &ledger, device))
        else {
            continue;
        };
        // A factor that is not a positive finite ratio would scale a family's estimate to
        // nothing, to a negative time or to NaN: it must have been refused.
        if let Some(r) = rows.iter().find(|r| !(r.factor.is_finite() && r.factor > 0.0)) {
            tally.failures.push(format!("{what}: factor {} for {}", r.factor, r.family.name()));
            continue;
        }
        std::fs::write(&calibration, &original).unwrap();
        let shown = calibration.display().to_string();
        if tally
            .run(&what, &shown, || calibrate::write_calibration(&calibration, device.key, "fuzz", &rows))
            .is_some()
        {
            let written = std::fs::read_to_string(&calibration).unwrap();
            if let Err(e) = devices::parse_calibration(&written, &shown, device.key) {
                tally.failures.push(format!("{what}: wrote a calibration sft plan refuses: {e:#}"));
            }
        }
    }
    println!(
        "kernel summary: {} inputs, {} calibrated or written, {} errors",
        tally.inputs, tally.ok, tally.errors
    );
    tally.assert_clean(seed);
}
