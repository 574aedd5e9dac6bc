//! The multi-tensor AdamW step: one launch for every tensor, through a device array of
//! per-tensor descriptors.

use anyhow::{bail, Result};
use cudarc::driver::LaunchConfig;

use super::launch::{self, AdamTensor, AdamTensorBf16, DevPtr, BLOCK};
use super::scratch::ensure;
use super::{bf16_mut, bf16_of, f32_mut, f32_of, CudaBackend, CudaBuf};
use crate::backend::{stats, AdamW, Clip, StateDtype};

/// At most this many blocks stride over one tensor.
pub const ADAM_BLOCKS: usize = 1024;

impl CudaBackend {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn adamw(
        &self,
        params: &mut [&mut CudaBuf],
        master: &mut [&mut CudaBuf],
        grads: &[&CudaBuf],
        m: &mut [&mut CudaBuf],
        v: &mut [&mut CudaBuf],
        moments: StateDtype,
        lens: &[usize],
        hp: &AdamW,
        clip: Option<Clip<'_, Self>>,
    ) -> Result<()> {
        let k = lens.len();
        if [params.len(), master.len(), grads.len(), m.len(), v.len()].iter().any(|&l| l != k) {
            bail!("adamw: params, master, grads, m, v and lens must have the same count ({k})");
        }
        if k == 0 {
            return Ok(());
        }
        if k > 65_535 {
            bail!("adamw: {k} tensors exceed one launch's grid (65535)");
        }
        if hp.step == 0 {
            bail!("adamw: step is 1-based, got 0");
        }
        // The moments' pointers, checked against `moments` (a buffer of the other precision is
        // an error, not a reinterpretation).
        let mut common = Vec::with_capacity(k);
        let mut moment_ptrs = Vec::with_capacity(k);
        let mut max_len = 0;
        for i in 0..k {
            let len = lens[i];
            let what = |name: &str| format!("adamw tensor {i} {name}");
            common.push((
                self.dev_ptr(f32_mut(master[i], len, &what("master"))?),
                self.dev_ptr(f32_of(grads[i], len, &what("grad"))?),
                self.dev_ptr(bf16_of(params[i], len, &what("param"))?),
            ));
            moment_ptrs.push(match moments {
                StateDtype::F32 => (
                    self.dev_ptr(f32_mut(m[i], len, &what("m"))?),
                    self.dev_ptr(f32_mut(v[i], len, &what("v"))?),
                ),
                StateDtype::Bf16 => (
                    self.dev_ptr(bf16_mut(m[i], len, &what("m (bf16)"))?),
                    self.dev_ptr(bf16_mut(v[i], len, &what("v (bf16)"))?),
                ),
            });
            max_len = max_len.max(len);
        }
        if max_len == 0 {
            return Ok(());
        }
        // The kernel reads the norm where sum_squares left it: no read-back before the update.
        let (sumsq, max_norm) = match &clip {
            Some(c) => {
                let s = f32_of(c.sumsq, stats::SUMSQ + stats::SPLIT, "adamw clip statistics")?;
                (self.dev_ptr(s) + (stats::SUMSQ * std::mem::size_of::<f32>()) as u64, c.max_norm)
            }
            None => (0, 0.0),
        };
        let bc1 = (1.0 - (hp.beta1 as f64).powi(hp.step.min(i32::MAX as u64) as i32)) as f32;
        let bc2 = (1.0 - (hp.beta2 as f64).powi(hp.step.min(i32::MAX as u64) as i32)) as f32;
        let cfg = LaunchConfig {
            grid_dim: (max_len.div_ceil(BLOCK as usize).min(ADAM_BLOCKS) as u32, k as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s, ks) = (&self.stream, &self.kernels);
        let sumsq = DevPtr::<f32>::new(sumsq);
        let mut scratch = self.scratch();
        let lens = lens.iter().map(|&l| l as u64);
        let descs = common.iter().zip(&moment_ptrs).zip(lens);
        // One descriptor array and one launch per moment type: the descriptor structs differ in
        // the moments' pointee type only (the typed launchers keep them apart).
        macro_rules! launch_multi {
            ($desc:ident, $slot:ident, $kernel:path) => {{
                let descs: Vec<$desc> = descs
                    .map(|(((master, grad, param), (m, v)), len)| $desc {
                        master: *master,
                        grad: *grad,
                        m: *m,
                        v: *v,
                        param: *param,
                        len,
                    })
                    .collect();
                let descs_d = ensure(&mut scratch.$slot, k, &self.stream, "adamw descriptors")?;
                self.stream.memcpy_htod(&descs, &mut descs_d.slice_mut(0..k))?;
                // SAFETY: each descriptor's buffers hold at least its `len` elements of the
                // precision its fields say (checked above) and outlive the launch (they are
                // borrowed for this call; the stream is in order); sumsq is null or two floats of
                // the borrowed statistics buffer.
                unsafe {
                    $kernel(
                        s,
                        ks,
                        cfg,
                        descs_d,
                        hp.lr,
                        hp.beta1,
                        hp.beta2,
                        hp.eps,
                        hp.weight_decay,
                        bc1,
                        bc2,
                        hp.grad_scale,
                        &sumsq,
                        max_norm,
                    )
                }?;
            }};
        }
        match moments {
            StateDtype::F32 => launch_multi!(AdamTensor, adam_descs, launch::adamw_multi),
            StateDtype::Bf16 => launch_multi!(AdamTensorBf16, adam_descs_bf16, launch::adamw_multi_bf16),
        }
        Ok(())
    }
}
