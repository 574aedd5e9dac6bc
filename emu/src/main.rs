//! Runs every kernel of kernels/*.cu on the CPU (emu/cpp: the real .cu files compiled as C++,
//! a thread per CUDA thread) against its CPU twin in `sft::backend::cpu`, with the launch
//! shapes of src/backend/cuda, and prints one line per kernel entry: the cases run, the largest
//! error, the shared-memory races and bank conflicts. The entries come from the PTX that the
//! `sft` build embeds: an entry without a case fails the run, as does any error over its
//! tolerance or any race.
//!
//! `emulate [--flash-report FILE] [--only FAMILY]`: FILE holds the report lines of
//! tests/flash_emu (the tensor-core kernels run in their own program, scripts/emulate.sh runs
//! both); FAMILY runs one family of cases (`rmsnorm`, `attention`, ...; the others then fail
//! as not run).

mod attention;
mod elementwise;
mod emu;
mod reductions;
mod table;

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use emu::{KernelResult, Report, Rng};

/// The cases of one family of kernels.
type Family = fn(&mut Report, &mut Rng);

/// The `.entry` names of every kernels/*.cu file's PTX (its sm_90a module's too).
fn ptx_entries() -> Result<BTreeSet<String>> {
    if !sft::kernels::PTX_UNAVAILABLE.is_empty() {
        bail!(
            "the sft crate was built without PTX ({}): build with REQUIRE_NVCC=1",
            sft::kernels::PTX_UNAVAILABLE
        );
    }
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernels");
    let mut entries = BTreeSet::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {dir}"))? {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "cu") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let ptx =
            sft::kernels::ptx(&stem).with_context(|| format!("kernels/{stem}.cu has no embedded PTX"))?;
        // And its sm_90a module, where it has Hopper-only kernels.
        let sm90a = sft::kernels::ptx(&format!("{stem}_sm90a")).unwrap_or("");
        for line in ptx.lines().chain(sm90a.lines()) {
            if let Some(rest) = line.split(".entry ").nth(1) {
                entries.insert(rest.split('(').next().unwrap().trim().to_string());
            }
        }
    }
    Ok(entries)
}

/// Lines `KERNEL name cases max_err tol races accesses conflicted failures` of the flash program.
fn read_flash(path: &str, report: &mut Report) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the flash report {path}"))?;
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.first() != Some(&"KERNEL") {
            continue;
        }
        if f.len() != 9 {
            bail!("{path} line {}: expected 9 fields, got {}", i + 1, f.len());
        }
        let num = |k: usize| f[k].parse::<f64>().with_context(|| format!("{path} line {}: field {k}", i + 1));
        let failures = num(8)? as usize;
        report.kernels.insert(
            f[1].to_string(),
            KernelResult {
                cases: num(2)? as usize,
                launches: num(2)? as usize,
                max_err: num(3)?,
                tol: num(4)?,
                races: num(5)? as i64,
                accesses: num(6)? as i64,
                conflicted: num(7)? as i64,
                failed: (0..failures).map(|_| "see the flash emulation's output".to_string()).collect(),
            },
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("emulate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<bool> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut flash = None;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--flash-report" => flash = Some(it.next().context("--flash-report needs a file")?.clone()),
            "--only" => only = Some(it.next().context("--only needs a family name")?.clone()),
            other => bail!("unknown argument {other} (usage: emulate [--flash-report FILE] [--only FAMILY])"),
        }
    }
    let entries = ptx_entries()?;
    let listed: BTreeSet<String> =
        table::EMULATED.iter().flat_map(|(_, e)| e.iter().map(|s| s.to_string())).collect();
    emu::self_test().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let mut r = Report::default();
    let mut rng = Rng::new(0x5EED);
    let families: [(&str, Family); 12] = [
        ("casts", elementwise::casts),
        ("rmsnorm", elementwise::rmsnorm),
        ("rope", elementwise::rope),
        ("swiglu", elementwise::swiglu),
        ("dropout", elementwise::dropout),
        ("embedding", elementwise::embedding),
        ("cross entropy", reductions::cross_entropy),
        ("sum of squares", reductions::sum_squares),
        ("adamw", reductions::adamw),
        ("gemm fallback", reductions::gemm),
        ("attention", attention::training),
        ("decode", attention::decode),
    ];
    for (what, f) in families {
        if only.as_ref().is_some_and(|o| !what.contains(o.as_str())) {
            continue;
        }
        let t = Instant::now();
        f(&mut r, &mut rng);
        eprintln!("emulated {what} in {:.1} s", t.elapsed().as_secs_f64());
    }
    if let Some(path) = flash {
        read_flash(&path, &mut r)?;
    }

    let mut ok = true;
    println!(
        "{:<32} {:>5} {:>9} {:>7} {:>6} {:>10} {:>10}  result",
        "kernel (PTX entry)", "cases", "max error", "tol", "races", "smem acc.", "conflicted"
    );
    let all: BTreeSet<&String> = entries.iter().chain(r.kernels.keys()).collect();
    for name in all {
        let line = match r.kernels.get(name.as_str()) {
            Some(k) => {
                let mut verdict = "ok".to_string();
                if !entries.contains(name.as_str()) {
                    verdict = "FAILED: not an entry of the PTX".into();
                } else if k.cases == 0 {
                    verdict = "FAILED: launched, never checked".into();
                } else if !k.failed.is_empty() {
                    verdict = format!("FAILED: {}", k.failed.join("; "));
                } else if k.races > 0 {
                    verdict = "FAILED: shared-memory races".into();
                }
                format!(
                    "{:<32} {:>5} {:>9.2e} {:>7.0e} {:>6} {:>10} {:>10}  {verdict}",
                    name, k.cases, k.max_err, k.tol, k.races, k.accesses, k.conflicted
                )
            }
            None if listed.contains(name.as_str()) || !table::SEPARATE.is_empty() => {
                format!("{name:<32} {:>5}  FAILED: no case ran", 0)
            }
            None => format!("{name:<32} {:>5}  FAILED: not emulated", 0),
        };
        ok &= line.ends_with(" ok");
        println!("{line}");
    }
    println!(
        "{} kernels, {} cases in {:.1} s: {}",
        r.kernels.len(),
        r.kernels.values().map(|k| k.cases).sum::<usize>(),
        started.elapsed().as_secs_f64(),
        if ok { "all ok" } else { "SOME FAILED" }
    );
    Ok(ok)
}
