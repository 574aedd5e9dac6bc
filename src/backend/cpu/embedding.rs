//! Token embedding: a table lookup, and its deterministic scatter-add backward.

use rayon::prelude::*;

use super::Real;
use crate::backend::GradMode;

/// `out[i] = table[ids[i]]`.
pub fn embedding_forward<T: Real>(out: &mut [T], ids: &[u32], table: &[T], n: usize, d: usize) {
    out[..n * d].par_chunks_mut(d.max(1)).zip(&ids[..n]).for_each(|(row, &id)| {
        let t = id as usize;
        row.copy_from_slice(&table[t * d..(t + 1) * d]);
    });
}

/// `dtable[ids[i]] += dout[i]`, in row order (deterministic).
pub fn embedding_backward<T: Real>(dtable: &mut [T], ids: &[u32], dout: &[T], n: usize, d: usize) {
    for (i, &id) in ids[..n].iter().enumerate() {
        let t = id as usize;
        for (acc, &g) in dtable[t * d..(t + 1) * d].iter_mut().zip(&dout[i * d..(i + 1) * d]) {
            *acc += g;
        }
    }
}

/// The backward from tokens grouped by id (`crate::backend::group_tokens_by_id`), as the CUDA
/// kernel computes it: each id's rows of `dout` summed in token order, then written to (or added
/// to) its table row; with `Overwrite`, the rows of absent ids are zeroed.
#[allow(clippy::too_many_arguments)]
pub fn embedding_backward_grouped<T: Real>(
    dtable: &mut [T],
    order: &[u32],
    group_start: &[u32],
    group_id: &[u32],
    dout: &[T],
    d: usize,
    mode: GradMode,
) {
    if mode == GradMode::Overwrite {
        dtable.fill(T::ZERO);
    }
    let mut acc = vec![T::ZERO; d];
    for (g, &id) in group_id.iter().enumerate() {
        acc.fill(T::ZERO);
        for &tok in &order[group_start[g] as usize..group_start[g + 1] as usize] {
            let t = tok as usize;
            acc.iter_mut().zip(&dout[t * d..(t + 1) * d]).for_each(|(a, &x)| *a += x);
        }
        let row = &mut dtable[id as usize * d..(id as usize + 1) * d];
        row.iter_mut().zip(&acc).for_each(|(r, &a)| *r += a);
    }
}
