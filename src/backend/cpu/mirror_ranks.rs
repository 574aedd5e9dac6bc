//! Tests only: the CPU backend standing for a GPU that joined a job of two ranks over NCCL,
//! whose other rank holds exactly this rank's gradients, with NCCL's timing. A sum handed over
//! (`all_reduce_sum_ranks`, `reduce_sum_ranks`) takes the buffer as it is at that moment and
//! lands only at `wait_ranks`; in between the buffer holds NaN. So the model's side of the
//! device contract is checked on the CPU: a read before the wait sees NaN, and a write after the
//! hand-over is lost when the sum lands (the result then differs from the host path's).

use std::sync::{Arc, Mutex};

use super::Real;

/// Sums in flight: where each lands, and its value.
#[derive(Debug, Default)]
pub(crate) struct InFlight<T> {
    rank: usize,
    pending: Vec<(Landing<T>, Vec<T>)>,
}

/// The address of a buffer's first element.
#[derive(Debug)]
struct Landing<T>(*mut T);

// SAFETY: a landing is written through only by `land`, on the thread that runs the model which
// owns the buffer (the tests run one model per backend).
unsafe impl<T> Send for Landing<T> {}

impl<T: Real> InFlight<T> {
    pub(crate) fn new(rank: usize) -> Arc<Mutex<InFlight<T>>> {
        Arc::new(Mutex::new(InFlight { rank, pending: Vec::new() }))
    }

    /// Takes the first `lens[i]` elements of each buffer: summed with the other rank's (twice
    /// the value) where `roots` is None or names this rank, unspecified (NaN) elsewhere, as a
    /// reduce leaves non-roots. The buffers hold NaN until [`InFlight::land`].
    pub(crate) fn hand_over(&mut self, bufs: &mut [Vec<T>], lens: &[usize], roots: Option<&[usize]>) {
        let nan = T::from_f32(f32::NAN);
        for (i, (buf, &len)) in bufs.iter_mut().zip(lens).enumerate() {
            let mine = roots.is_none_or(|r| r[i] == self.rank);
            let sum = buf[..len].iter().map(|&x| if mine { x + x } else { nan }).collect();
            buf[..len].fill(nan);
            self.pending.push((Landing(buf.as_mut_ptr()), sum));
        }
    }

    /// Writes every sum in flight into its buffer.
    pub(crate) fn land(&mut self) {
        for (Landing(at), sum) in self.pending.drain(..) {
            // SAFETY: the model keeps its gradient buffers, never reallocated, for its life, and
            // waits (lands) before it drops them; each holds at least `sum.len()` elements.
            unsafe { std::slice::from_raw_parts_mut(at, sum.len()) }.copy_from_slice(&sum);
        }
    }
}
