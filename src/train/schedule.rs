//! The learning-rate schedule: linear warmup, then a cosine decay from `max_lr` to `min_lr`.

use serde::{Deserialize, Serialize};

/// SimpleLLaMA's schedule, indexed by the 0-based optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Optimizer steps the whole schedule spans (warmup included); later steps stay at `min_lr`.
    pub total_steps: u64,
}

impl Schedule {
    /// The learning rate of optimizer step `step` (0-based).
    ///
    /// Warmup reaches `max_lr` at its last step, `(step + 1) / warmup_steps`, so that the first
    /// step already learns; the cosine then runs over the remaining `total - warmup` steps.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.max_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 || step >= self.total_steps {
            return self.min_lr;
        }
        let progress = (step - self.warmup_steps) as f64 / decay_steps as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + cosine * (self.max_lr - self.min_lr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simplellama(total_steps: u64) -> Schedule {
        Schedule { max_lr: 1e-5, min_lr: 1e-6, warmup_steps: 100, total_steps }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1e-30)
    }

    #[test]
    fn warmup_is_linear_up_to_max_lr() {
        let s = simplellama(1000);
        assert!(close(s.lr(0), 1e-7));
        assert!(close(s.lr(49), 5e-6));
        assert!(close(s.lr(99), 1e-5));
        for step in 1..100 {
            assert!(s.lr(step) > s.lr(step - 1));
        }
    }

    #[test]
    fn cosine_decays_from_max_to_min() {
        let s = simplellama(1100);
        assert!(close(s.lr(100), 1e-5));
        // Halfway through the decay the cosine term is exactly one half.
        assert!(close(s.lr(600), 0.5 * (1e-5 + 1e-6)));
        assert!(close(s.lr(1100), 1e-6));
        assert!(close(s.lr(5000), 1e-6));
        for step in 101..1100 {
            assert!(s.lr(step) < s.lr(step - 1), "not decreasing at {step}");
            assert!(s.lr(step) >= 1e-6);
        }
    }

    #[test]
    fn schedules_shorter_than_warmup_end_at_min_lr() {
        let s = simplellama(50);
        assert!(close(s.lr(10), 1.1e-6));
        assert!(close(s.lr(100), 1e-6));
        let no_warmup = Schedule { warmup_steps: 0, ..simplellama(10) };
        assert!(close(no_warmup.lr(0), 1e-5));
        assert!(close(no_warmup.lr(10), 1e-6));
    }
}
