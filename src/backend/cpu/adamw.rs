//! The AdamW step, one tensor at a time (the CUDA kernel does all tensors in one launch).

use rayon::prelude::*;

use super::Real;
use crate::backend::{AdamW, StateDtype};

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// One AdamW step for one tensor, in PyTorch's order: decoupled decay of `master` first, then
/// the moments of `g = grad · grad_scale`, the bias-corrected update, and `params = master`.
pub fn adamw_tensor<T: Real>(
    params: &mut [T],
    master: &mut [T],
    grads: &[T],
    m: &mut [T],
    v: &mut [T],
    hp: &AdamW,
) {
    adamw_tensor_clipped(params, master, grads, m, v, StateDtype::F32, hp, 1.0)
}

/// `x` as a bf16 buffer holds it after a store: rounded to nearest, ties to even (the kernel's
/// `__float2bfloat16_rn`), through f32 as the kernel computes in f32.
pub fn round_bf16<T: Real>(x: T) -> T {
    T::from_f32(half::bf16::from_f32(x.to_f32()).to_f32())
}

/// [`adamw_tensor`] with the gradients also multiplied by `clip` (the clip factor the CUDA kernel
/// computes from the device's sum of squares; `grad_scale · clip` is rounded to f32 as there),
/// and the moments stored as `moments` says: with bf16, this step's update uses the new moments
/// unrounded, and what is stored (what the next step reads) is them rounded to bf16.
#[allow(clippy::too_many_arguments)]
pub fn adamw_tensor_clipped<T: Real>(
    params: &mut [T],
    master: &mut [T],
    grads: &[T],
    m: &mut [T],
    v: &mut [T],
    moments: StateDtype,
    hp: &AdamW,
    clip: f32,
) {
    let store: fn(T) -> T = match moments {
        StateDtype::F32 => |x| x,
        StateDtype::Bf16 => round_bf16,
    };
    let step = hp.step.min(i32::MAX as u64) as i32;
    let (b1, b2) = (T::from_f32(hp.beta1), T::from_f32(hp.beta2));
    let c1 = T::from_f64(1.0 - (hp.beta1 as f64).powi(step));
    let c2 = T::from_f64(1.0 - (hp.beta2 as f64).powi(step));
    let (lr, eps, gs) = (T::from_f32(hp.lr), T::from_f32(hp.eps), T::from_f32(hp.grad_scale * clip));
    let decay = T::from_f64(hp.lr as f64 * hp.weight_decay as f64);
    let len = params.len();
    params
        .par_chunks_mut(CHUNK)
        .zip(master[..len].par_chunks_mut(CHUNK))
        .zip(grads[..len].par_chunks(CHUNK))
        .zip(m[..len].par_chunks_mut(CHUNK))
        .zip(v[..len].par_chunks_mut(CHUNK))
        .for_each(|((((p, w), g), m), v)| {
            for k in 0..p.len() {
                w[k] -= decay * w[k];
                let gk = g[k] * gs;
                let mk = b1 * m[k] + (T::ONE - b1) * gk;
                let vk = b2 * v[k] + (T::ONE - b2) * gk * gk;
                m[k] = store(mk);
                v[k] = store(vk);
                w[k] -= lr * (mk / c1) / ((vk / c2).sqrt() + eps);
                p[k] = w[k];
            }
        });
}
