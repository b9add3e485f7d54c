//! The GPT-2 model: configuration, parameter layout, initialisation.

pub mod config;
pub mod init;
pub mod params;

pub use config::GptConfig;
pub use params::{ParamEntry, ParamLayout};
