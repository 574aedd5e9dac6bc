//! Dropout with a counter-based mask: element `i` of a call depends only on (seed, i), so the
//! CUDA kernel draws the same mask.

use rayon::prelude::*;

use super::Real;
use crate::backend::Dropout;
use crate::rng;

/// Elements per parallel chunk.
const ELEM_CHUNK: usize = 1 << 14;

/// Element `i` of a buffer through `dropout`: zero when `uniform(seed, i) < p`, else `v · keep_scale`.
#[inline]
pub(super) fn masked<T: Real>(v: T, dropout: Dropout, keep_scale: T, i: usize) -> T {
    if rng::uniform(dropout.seed, i as u64) < dropout.p {
        T::ZERO
    } else {
        v * keep_scale
    }
}

/// `1 / (1 - p)` in `T`.
pub(super) fn keep_scale<T: Real>(p: f32) -> T {
    T::from_f64(1.0 / (1.0 - p as f64))
}

/// In place: element `i` is zeroed when `uniform(seed, i) < p`, else scaled by `1/(1-p)`.
pub fn dropout<T: Real>(x: &mut [T], len: usize, p: f32, seed: u64) {
    if p == 0.0 {
        return;
    }
    let mask = Dropout { p, seed };
    let scale = keep_scale::<T>(p);
    x[..len].par_chunks_mut(ELEM_CHUNK).enumerate().for_each(|(c, chunk)| {
        for (k, v) in chunk.iter_mut().enumerate() {
            *v = masked(*v, mask, scale, c * ELEM_CHUNK + k);
        }
    });
}
