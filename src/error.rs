//! The library's one error type. Every variant says what went wrong, with the file, key, shape or
//! limit involved, and what to do about it; the binaries print it and exit non-zero.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No adapter, no device, or the device was lost.
    #[error("GPU: {0}")]
    Gpu(String),

    /// A wgpu validation or out-of-memory error raised while building or running GPU work.
    #[error("GPU error in {context}: {message}")]
    GpuValidation { context: String, message: String },

    /// Tensor shapes that do not fit an op.
    #[error("{op}: {message}")]
    Shape { op: &'static str, message: String },

    /// A size beyond what the adapter offers.
    #[error("{what} needs {needed} but the adapter '{adapter}' offers {available}: {hint}")]
    Limit {
        what: String,
        needed: String,
        available: String,
        adapter: String,
        hint: String,
    },

    /// A configuration or command-line value out of range.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file that was read but whose contents are not what was expected.
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },

    /// A run setting that cannot be used as given. Each front end names the setting in its
    /// own words (a flag, a form field) before the message.
    #[error("{}: {message}", setting.flag())]
    Setting { setting: Setting, message: String },

    /// Anything else, with its explanation.
    #[error("{0}")]
    Other(String),
}

/// The settings of a run that the library checks and both front ends expose.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Setting {
    Model,
    Data,
    Shuffle,
    BatchSize,
    SeqLen,
    GradAccum,
    Steps,
    MaxLr,
    MinLrRatio,
    WarmupSteps,
    WeightDecay,
    GradClip,
    Seed,
    Precision,
    Attention,
    Fusion,
    FusedOptimizer,
    ValEvery,
    ValSteps,
    SampleEvery,
    HellaSwag,
    EvalEvery,
    CheckpointDir,
}

impl Setting {
    /// The command-line flag of headless-train.
    pub fn flag(self) -> &'static str {
        match self {
            Setting::Model => "--preset/--n-layer/--n-head/--n-embd/--block-size/--vocab-size",
            Setting::Data => "--data",
            Setting::Shuffle => "--shuffle",
            Setting::BatchSize => "--batch-size",
            Setting::SeqLen => "--seq-len",
            Setting::GradAccum => "--grad-accum",
            Setting::Steps => "--steps",
            Setting::MaxLr => "--max-lr",
            Setting::MinLrRatio => "--min-lr-ratio",
            Setting::WarmupSteps => "--warmup-steps",
            Setting::WeightDecay => "--weight-decay",
            Setting::GradClip => "--grad-clip",
            Setting::Seed => "--seed",
            Setting::Precision => "--precision",
            Setting::Attention => "--attention",
            Setting::Fusion => "--no-fusion",
            Setting::FusedOptimizer => "--no-fused-optimizer",
            Setting::ValEvery => "--val-every",
            Setting::ValSteps => "--val-steps",
            Setting::SampleEvery => "--sample-every",
            Setting::HellaSwag => "--hellaswag",
            Setting::EvalEvery => "--eval-every",
            Setting::CheckpointDir => "--checkpoint-dir",
        }
    }
}

impl Error {
    pub fn setting(setting: Setting, message: impl Into<String>) -> Self {
        Error::Setting {
            setting,
            message: message.into(),
        }
    }

    pub fn shape(op: &'static str, message: impl Into<String>) -> Self {
        Error::Shape {
            op,
            message: message.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn format(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            message: message.into(),
        }
    }
}
