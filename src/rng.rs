//! Counter-based random numbers.
//!
//! Every random draw in the trainer (initialization, shuffling, dropout masks, sampling) is a
//! pure function of a seed and a counter. That makes resume exact (the state is two integers),
//! and lets a CUDA kernel draw the same dropout mask as the CPU reference: element `i` of a
//! mask is `uniform(seed, i)` on both.

/// SplitMix64 finalizer: a bijective mix of 64 bits, good enough for ML randomness.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The `index`-th 32-bit draw of stream `seed`. Mirrored by `hash_u32` in kernels/common.cuh.
#[inline]
pub fn hash_u32(seed: u64, index: u64) -> u32 {
    (mix64(seed ^ mix64(index)) >> 32) as u32
}

/// Uniform in [0, 1) from draw `index` of stream `seed` (24 bits, exact in f32).
#[inline]
pub fn uniform(seed: u64, index: u64) -> f32 {
    (hash_u32(seed, index) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// A sequential generator over a counter-based stream; its whole state is `(seed, counter)`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rng {
    pub seed: u64,
    pub counter: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { seed, counter: 0 }
    }

    /// A derived, independent stream (for a sub-task such as one epoch's shuffle).
    pub fn fork(&self, stream: u64) -> Rng {
        Rng::new(mix64(self.seed ^ mix64(stream.wrapping_add(0x5851_F42D_4C95_7F2D))))
    }

    pub fn next_u64(&mut self) -> u64 {
        let v = mix64(self.seed ^ mix64(self.counter));
        self.counter += 1;
        v
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Uniform integer in [0, n), n > 0 (Lemire's multiply-shift; bias below 2^-32 for n < 2^32).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let mut a = Rng::new(89);
        let mut b = Rng::new(89);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        let mut c = Rng::new(90);
        assert_ne!(xs[0], c.next_u64());
        assert_ne!(a.fork(1).next_u64(), a.fork(2).next_u64());
    }

    #[test]
    fn uniform_and_normal_have_plausible_moments() {
        let n = 100_000;
        let mean_u: f64 = (0..n).map(|i| uniform(7, i) as f64).sum::<f64>() / n as f64;
        assert!((mean_u - 0.5).abs() < 0.01, "mean {mean_u}");
        let mut r = Rng::new(3);
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.03, "mean {mean} var {var}");
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<usize> = (0..1000).collect();
        Rng::new(1).shuffle(&mut v);
        assert_ne!(v, (0..1000).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
    }
}
