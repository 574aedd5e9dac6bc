//! The SwiGLU activation `silu(gate) · up` and its backward.

use rayon::prelude::*;

use super::Real;

#[inline]
fn silu_parts<T: Real>(g: T) -> (T, T) {
    let s = T::ONE / (T::ONE + (-g).exp());
    (s, g * s)
}

/// `out = silu(gate) · up` from `gate_up` rows `[gate | up]`.
pub fn swiglu_forward<T: Real>(out: &mut [T], gate_up: &[T], n: usize, hidden: usize) {
    if hidden == 0 {
        return;
    }
    out[..n * hidden].par_chunks_mut(hidden).zip(gate_up.par_chunks(2 * hidden)).for_each(|(o, gu)| {
        let (gate, up) = gu.split_at(hidden);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = silu_parts(g).1 * u;
        }
    });
}

/// `dgate_up` (overwritten) from `dout`.
pub fn swiglu_backward<T: Real>(dgate_up: &mut [T], dout: &[T], gate_up: &[T], n: usize, hidden: usize) {
    if hidden == 0 {
        return;
    }
    dgate_up[..2 * n * hidden]
        .par_chunks_mut(2 * hidden)
        .zip(dout.par_chunks(hidden))
        .zip(gate_up.par_chunks(2 * hidden))
        .for_each(|((dgu, dr), gu)| {
            let (dgate, dup) = dgu.split_at_mut(hidden);
            let (gate, up) = gu.split_at(hidden);
            for j in 0..hidden {
                let (s, silu) = silu_parts(gate[j]);
                dgate[j] = dr[j] * up[j] * s * (T::ONE + gate[j] * (T::ONE - s));
                dup[j] = dr[j] * silu;
            }
        });
}
