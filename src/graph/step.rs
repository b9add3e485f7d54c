//! What a training graph depends on: the step's shape and the kernels chosen, nothing of the
//! trainer's.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// f16 matmul inputs and activations with f32 accumulation, f32 master weights, f32
    /// LayerNorm statistics, softmax, loss and gradient norm; dynamic loss scaling.
    F16,
}

impl std::str::FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "f16" | "fp16" => Ok(Precision::F16),
            other => Err(Error::Config(format!(
                "precision must be f32 or f16, not '{other}'"
            ))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionKind {
    /// Tiled in workgroup memory with an online softmax; no T x T matrix in memory.
    Flash,
    /// Materialises the T x T scores (the plain reference path).
    Naive,
}

impl std::str::FromStr for AttentionKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "flash" => Ok(AttentionKind::Flash),
            "naive" => Ok(AttentionKind::Naive),
            other => Err(Error::Config(format!(
                "attention must be flash or naive, not '{other}'"
            ))),
        }
    }
}

impl std::fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttentionKind::Flash => "flash",
            AttentionKind::Naive => "naive",
        })
    }
}

/// A training step's shape and kernel choices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepShape {
    /// Sequences per micro-batch (B) and positions per sequence (T).
    pub batch: usize,
    pub seq: usize,
    /// Micro-batches per optimiser step on this device.
    pub grad_accum: usize,
    /// Tokens one optimiser step averages over, on all devices of a data-parallel job.
    pub tokens_per_step: usize,
    pub precision: Precision,
    pub attention: AttentionKind,
    /// Fused kernels (residual with LayerNorm, product with GELU).
    pub fused: bool,
    /// One AdamW dispatch per storage buffer rather than one per tensor.
    pub fused_optimizer: bool,
    /// Adam's (beta1, beta2): the size of the bias-correction table.
    pub adam_betas: (f64, f64),
}

/// The loss scale mixed precision starts from (PyTorch's GradScaler: 2^16).
pub const INITIAL_LOSS_SCALE: f32 = 65536.0;

/// Clean steps after which dynamic loss scaling doubles the scale (PyTorch's GradScaler: 2000);
/// the step's last node applies the rule on the GPU.
pub const LOSS_SCALE_GROWTH_INTERVAL: usize = 2000;
