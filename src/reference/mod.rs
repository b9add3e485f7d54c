//! A plain CPU implementation of every op, forward and backward: the tests' reference.
//! Written for clarity, not speed; sums accumulate in f64.

pub mod attention;
pub mod crossentropy;
pub mod elementwise;
pub mod embedding;
pub mod layernorm;
pub mod matmul;
pub mod model;
pub mod optimizer;
