//! The emulated kernels' host side: launches (grid, block, shared memory and a pointer per
//! argument, as cuLaunchKernel takes them), the per-kernel report, random inputs and errors.

use std::collections::BTreeMap;
use std::ffi::c_void;

use half::bf16;
use sft::backend::cuda::{self, LaunchConfig};

include!(concat!(env!("OUT_DIR"), "/entries.rs"));

#[repr(C)]
pub struct EmuLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    smem: u32,
}

#[repr(C)]
#[derive(Default)]
struct EmuStats {
    races: i64,
    accesses: i64,
    conflicted: i64,
    extra_wavefronts: i64,
}

extern "C" {
    fn emu_take_stats(out: *mut EmuStats);
    fn emu_print_races(n: i32);
}

pub type Entry = unsafe extern "C" fn(*const EmuLaunch, *mut *mut c_void);

/// A launch configuration, as the CUDA backend builds it (src/backend/cuda/*.rs).
#[derive(Clone, Copy, Debug)]
pub struct Cfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
}

pub use sft::backend::cuda::BLOCK;

/// Grid-stride kernels run with at most this many blocks here, so that every thread loops
/// over several elements (the GPU's grids are capped at 65536 blocks, so large inputs loop
/// there too).
pub const GRID_STRIDE_CAP: u32 = 3;

impl From<LaunchConfig> for Cfg {
    fn from(c: LaunchConfig) -> Self {
        Cfg { grid: c.grid_dim, block: c.block_dim }
    }
}

/// The backend's grid_stride, then capped to GRID_STRIDE_CAP blocks.
pub fn grid_stride(total: usize) -> Cfg {
    let mut cfg = Cfg::from(cuda::grid_stride(total));
    cfg.grid.0 = cfg.grid.0.min(GRID_STRIDE_CAP);
    cfg
}

/// The backend's per_row: one block of BLOCK threads per row.
pub fn per_row(rows: usize) -> Cfg {
    cuda::per_row(rows).into()
}

/// A kernel argument: a pointer to its value (a device pointer is passed as a pointer to the
/// pointer, as with cuLaunchKernel).
pub fn arg<T>(v: &T) -> *mut c_void {
    v as *const T as *mut c_void
}

#[derive(Default, Debug)]
pub struct KernelResult {
    pub cases: usize,
    pub launches: usize,
    pub max_err: f64,
    pub tol: f64,
    pub races: i64,
    pub accesses: i64,
    pub conflicted: i64,
    pub failed: Vec<String>,
}

/// Per-kernel results, by entry name.
#[derive(Default)]
pub struct Report {
    pub kernels: BTreeMap<String, KernelResult>,
}

impl Report {
    /// Runs the emulated `name` with `cfg` and `args` (one CTA at a time, a thread per CUDA
    /// thread) and adds its shared-memory counts to the kernel's line.
    pub fn launch(&mut self, name: &str, cfg: Cfg, args: &[*mut c_void]) {
        let s = run(name, cfg, args);
        let k = self.kernels.entry(name.to_string()).or_default();
        k.launches += 1;
        k.races += s.races;
        k.accesses += s.accesses;
        k.conflicted += s.conflicted;
    }
    /// One case of `name`: for each of its outputs, the error against the CPU twin and the
    /// tolerance for that output.
    pub fn check(&mut self, name: &str, case: &str, outputs: &[(&str, f64, f64)]) {
        let k = self.kernels.entry(name.to_string()).or_default();
        k.cases += 1;
        for &(what, err, tol) in outputs {
            k.tol = k.tol.max(tol);
            // A NaN error fails too.
            if err.is_nan() || err > tol {
                k.failed.push(format!("{case}: {what} error {err:.3e} > {tol:.0e}"));
            }
            k.max_err = if err.is_nan() || k.max_err.is_nan() { f64::NAN } else { k.max_err.max(err) };
        }
    }
}

/// One launch of the emulated `name`; its shared-memory counts.
fn run(name: &str, cfg: Cfg, args: &[*mut c_void]) -> EmuStats {
    let f = entry(name).unwrap_or_else(|| panic!("{name} is not in EMULATED (emu/src/table.rs)"));
    let l = EmuLaunch {
        grid: [cfg.grid.0, cfg.grid.1, cfg.grid.2],
        block: [cfg.block.0, cfg.block.1, cfg.block.2],
        smem: 0,
    };
    let mut a = args.to_vec();
    let mut s = EmuStats::default();
    // SAFETY: the arguments point at values of the kernel's parameter types, in its order,
    // and the buffers hold what the kernel reads and writes (as on the GPU: unchecked).
    unsafe {
        emu_take_stats(&mut s);
        f(&l, a.as_mut_ptr());
        emu_take_stats(&mut s);
    }
    s
}

/// The shared-memory checks on kernels with known defects (emu/cpp/selftest.cu): a missing
/// barrier must give races, the same with the barrier none, a 32-way strided read conflicts.
pub fn self_test() -> Result<(), String> {
    let mut out = vec![0.0f32; 256];
    let po = out.as_mut_ptr();
    // SAFETY: sets a counter.
    unsafe { emu_print_races(0) };
    let cfg = Cfg { grid: (2, 1, 1), block: (256, 1, 1) };
    let missing = run("selftest_missing_barrier", cfg, &[arg(&po)]);
    let with = run("selftest_with_barrier", cfg, &[arg(&po)]);
    let conflict = run("selftest_bank_conflict", Cfg { grid: (1, 1, 1), block: (32, 1, 1) }, &[arg(&po)]);
    eprintln!(
        "self-test of the shared-memory checks: missing barrier {} races, with it {}; strided read {} of {} warp accesses conflicted",
        missing.races, with.races, conflict.conflicted, conflict.accesses
    );
    // SAFETY: as above; the real kernels' first races are printed.
    unsafe { emu_print_races(8) };
    if missing.races == 0 || with.races != 0 || conflict.conflicted == 0 {
        return Err("the shared-memory checks missed a known defect (or flagged correct code)".into());
    }
    Ok(())
}

/// Deterministic random inputs (SplitMix64), never zero.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        sft::rng::mix64(self.0)
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
    /// `len` normal values rounded to bf16 (never exactly zero), as bf16 and as f64.
    pub fn bf16s(&mut self, len: usize, scale: f64) -> (Vec<bf16>, Vec<f64>) {
        let v: Vec<bf16> = (0..len)
            .map(|_| loop {
                let b = bf16::from_f64(self.normal() * scale);
                if b.to_f32() != 0.0 {
                    break b;
                }
            })
            .collect();
        let f = v.iter().map(|b| b.to_f64()).collect();
        (v, f)
    }
    pub fn f32s(&mut self, len: usize, scale: f64) -> Vec<f32> {
        (0..len)
            .map(|_| (self.normal() * scale) as f32)
            .filter(|&x| x != 0.0)
            .chain(std::iter::repeat(0.5))
            .take(len)
            .collect()
    }
}

/// ‖got − want‖ / ‖want‖ (the absolute norm when `want` is zero; infinite on a NaN).
pub fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    let (mut d, mut n) = (0.0, 0.0);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        d += (g - w) * (g - w);
        n += w * w;
    }
    if n > 0.0 {
        (d / n).sqrt()
    } else {
        d.sqrt()
    }
}

/// Elements that differ (for outputs that must be exact), as an error figure.
pub fn mismatches<T: PartialEq>(got: &[T], want: &[T]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared buffers differ in length");
    got.iter().zip(want).filter(|(g, w)| g != w).count() as f64
}

pub fn f64s_bf16(v: &[bf16]) -> Vec<f64> {
    v.iter().map(|b| b.to_f64()).collect()
}

pub fn f64s_f32(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A bf16 buffer that no kernel wrote yet: NaN, so an element the kernel skips shows.
pub fn nan_bf16(len: usize) -> Vec<bf16> {
    vec![bf16::NAN; len]
}

pub const TOL_BF16: f64 = 1e-2;
pub const TOL_F32: f64 = 1e-5;
pub const EXACT: f64 = 0.0;
