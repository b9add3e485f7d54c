//! The GPT-2 model: configuration, parameters (typed ids, the canonical flat layout, the GPU
//! storage layout), initialisation.

pub mod config;
pub mod init;
pub mod params;
pub mod storage;

pub use config::GptConfig;
pub use params::{BlockTensor, Gpt, ParamEntry, ParamId, ParamLayout};
pub use storage::{Piece, StorageLayout, StoredParams};
