//! A plain CPU implementation of every op, forward and backward: the tests' reference.
//! Written for clarity, not speed; sums accumulate in f64 (the whole-model reference in
//! [`model`] computes in f64, or in f32 to measure f32 arithmetic's own error).

pub mod attention;
pub mod crossentropy;
pub mod elementwise;
pub mod embedding;
pub mod float;
pub mod layernorm;
pub mod matmul;
pub mod model;
pub mod optimizer;
pub mod scaler;
