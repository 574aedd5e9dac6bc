//! The global gradient norm's sum of squares, and the loss sums, accumulated in f64.

use rayon::prelude::*;

use super::Real;

/// Elements per parallel chunk; fixed so the f64 sums are reproducible.
const CHUNK: usize = 1 << 14;

/// Sum of squares of the first `lens[i]` elements of every `bufs[i]`, accumulated in f64.
pub fn sum_squares<T: Real>(bufs: &[&[T]], lens: &[usize]) -> f64 {
    let mut total = 0.0;
    for (b, &len) in bufs.iter().zip(lens) {
        let partials: Vec<f64> = b[..len]
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| x.to_f64() * x.to_f64()).sum::<f64>())
            .collect();
        total += partials.iter().sum::<f64>();
    }
    total
}

/// `Σ x` accumulated in f64 over fixed chunks, as `sum_into`'s kernel: the loss sums.
pub fn sum<T: Real>(x: &[T]) -> f64 {
    let partials: Vec<f64> =
        x.par_chunks(CHUNK).map(|c| c.iter().map(|&v| v.to_f64()).sum::<f64>()).collect();
    partials.iter().sum()
}
