//! The CPU reference backend: every op of the trait, plainly, in f32 (training) or f64 (gradient checks).
