//! wgpt: GPT-2 training and sampling where every tensor op is a WGSL compute shader.

pub mod error;
pub mod gpu;
pub mod ops;
pub mod reference;
pub mod rng;

pub use error::{Error, Result};
pub use gpu::{DType, Dispatch, Gpu, GpuOptions, Tensor};
pub mod checkpoint;
pub mod data;
pub mod model;
pub mod train;
