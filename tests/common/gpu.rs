//! For the GPU tests: opening the GPU (a test without one prints why and passes vacuously, so
//! `scripts/gpu_check.sh run` counts the "skipped:" lines and fails when any test was skipped),
//! bf16-exact inputs, and moving them onto a backend.

use half::bf16;
use sft::backend::cuda::CudaBackend;
use sft::backend::{Backend, Precision};
use sft::rng::Rng;

/// GPU 0, or None (after printing `skipped: <reason>`).
pub fn gpu() -> Option<CudaBackend> {
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!("skipped: {e:#}");
            None
        }
    }
}

/// Normal values (times `scale`), rounded to bf16, so that both backends see the same numbers.
pub fn randn(rng: &mut Rng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| bf16::from_f32(rng.normal() as f32 * scale).to_f32()).collect()
}

pub fn upload<B: Backend>(b: &B, data: &[f32], p: Precision) -> B::Buf {
    let mut buf = b.zeros(data.len(), p).unwrap();
    b.write(&mut buf, data).unwrap();
    buf
}

pub fn upload_ids<B: Backend>(b: &B, data: &[u32]) -> B::Ids {
    let mut ids = b.zeros_ids(data.len()).unwrap();
    b.write_ids(&mut ids, data).unwrap();
    ids
}
