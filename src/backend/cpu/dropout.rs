//! Dropout with a counter-based mask: element `i` of a call depends only on (seed, i), so the
//! CUDA kernel draws the same mask.

use rayon::prelude::*;

use super::Real;
use crate::rng;

/// Elements per parallel chunk.
const ELEM_CHUNK: usize = 1 << 14;

/// In place: element `i` is zeroed when `uniform(seed, i) < p`, else scaled by `1/(1-p)`.
pub fn dropout<T: Real>(x: &mut [T], len: usize, p: f32, seed: u64) {
    if p == 0.0 {
        return;
    }
    let keep_scale = T::from_f64(1.0 / (1.0 - p as f64));
    x[..len].par_chunks_mut(ELEM_CHUNK).enumerate().for_each(|(c, chunk)| {
        for (k, v) in chunk.iter_mut().enumerate() {
            let i = (c * ELEM_CHUNK + k) as u64;
            *v = if rng::uniform(seed, i) < p { T::ZERO } else { *v * keep_scale };
        }
    });
}
