//! The float types the CPU backend computes in: f32 for training, f64 for gradient checks.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

/// A real number type the CPU ops are generic over, with the GEMM that suits it.
pub trait Real:
    Copy
    + Send
    + Sync
    + Default
    + Debug
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn cos(self) -> Self;
    fn sin(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn neg_infinity() -> Self;

    /// `c[m, n] = alpha · a[m, k] @ b[k, n] + beta · c`, each matrix given by its row and column
    /// strides (so transposes are free). With `beta == 0`, `c` is not read.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: &[Self],
        a_strides: (usize, usize),
        b: &[Self],
        b_strides: (usize, usize),
        beta: Self,
        c: &mut [Self],
        c_strides: (usize, usize),
    );
}

/// Highest flat index a strided `rows × cols` matrix touches, plus one (0 when empty).
fn extent(rows: usize, cols: usize, (rs, cs): (usize, usize)) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

macro_rules! impl_real {
    ($t:ty, $gemm:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn from_f32(x: f32) -> Self {
                x as $t
            }
            #[inline]
            fn to_f32(self) -> f32 {
                self as f32
            }
            #[inline]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline]
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            #[inline]
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }

            fn gemm(
                m: usize,
                k: usize,
                n: usize,
                alpha: Self,
                a: &[Self],
                a_strides: (usize, usize),
                b: &[Self],
                b_strides: (usize, usize),
                beta: Self,
                c: &mut [Self],
                c_strides: (usize, usize),
            ) {
                if m == 0 || n == 0 {
                    return;
                }
                if k == 0 {
                    // Nothing to multiply: only the beta part remains.
                    for i in 0..m {
                        for j in 0..n {
                            let idx = i * c_strides.0 + j * c_strides.1;
                            c[idx] = if beta == 0.0 { 0.0 } else { beta * c[idx] };
                        }
                    }
                    return;
                }
                // The raw GEMM reads through pointers: prove every access is in bounds first.
                assert!(extent(m, k, a_strides) <= a.len(), "gemm: a too short");
                assert!(extent(k, n, b_strides) <= b.len(), "gemm: b too short");
                assert!(extent(m, n, c_strides) <= c.len(), "gemm: c too short");
                // SAFETY: the extents above bound every index the kernel computes from these
                // strides, and `c` is exclusively borrowed, so it aliases neither `a` nor `b`.
                unsafe {
                    $gemm(
                        m,
                        k,
                        n,
                        alpha,
                        a.as_ptr(),
                        a_strides.0 as isize,
                        a_strides.1 as isize,
                        b.as_ptr(),
                        b_strides.0 as isize,
                        b_strides.1 as isize,
                        beta,
                        c.as_mut_ptr(),
                        c_strides.0 as isize,
                        c_strides.1 as isize,
                    );
                }
            }
        }
    };
}

impl_real!(f32, matrixmultiply::sgemm);
impl_real!(f64, matrixmultiply::dgemm);
