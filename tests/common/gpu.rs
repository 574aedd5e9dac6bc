//! Opening the GPU in the GPU tests: a test without one prints why and passes vacuously, so
//! `scripts/gpu_check.sh run` counts the "skipped:" lines and fails when any test was skipped.

use sft::backend::cuda::CudaBackend;

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
