//! Token embedding: a table lookup, and its deterministic scatter-add backward.

use rayon::prelude::*;

use super::Real;

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
