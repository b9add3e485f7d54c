//! wgpt: GPT-2 training and sampling where every tensor op is a WGSL compute shader.
//!
//! - [`gpu`]: adapter and device, tensors, the pipeline cache, dispatches, timestamps.
//! - [`ops`]: one typed launcher per kernel in `shaders/`.
//! - [`graph`]: the executor (a step as a static list of dispatches over planned buffers).
//! - [`model`], [`data`], [`train`], [`checkpoint`], [`sample`]: GPT-2 itself.
//! - [`reference`]: a plain CPU implementation of every op and of the whole training step.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod gpu;
pub mod graph;
pub mod model;
pub mod ops;
pub mod reference;
pub mod rng;
pub mod sample;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{AdapterLimits, DType, Dispatch, Gpu, GpuOptions, Tensor};
