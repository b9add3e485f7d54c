//! A training run's settings: everything that decides what a step computes.

use crate::error::{Error, Result, Setting};
use crate::model::GptConfig;
use serde::{Deserialize, Serialize};

/// AdamW's betas and epsilon, as the recipe fixes them (the betas in f64: the bias corrections
/// are computed from them in f64; the kernel gets them rounded to f32).
pub const ADAM_BETAS: (f64, f64) = (0.9, 0.95);
pub const ADAM_EPS: f32 = 1e-8;

pub use crate::graph::step::{AttentionKind, Precision};

impl Precision {
    /// Refuses f16 on an adapter without SHADER_F16: the one place this rule is checked.
    pub fn check_adapter(self, gpu: &crate::gpu::Gpu) -> Result<()> {
        if self == Precision::F16 && !gpu.has_f16() {
            return Err(Error::setting(
                Setting::Precision,
                format!(
                    "f16 needs SHADER_F16, which the adapter '{}' lacks; use f32",
                    gpu.info.name
                ),
            ));
        }
        Ok(())
    }
}

/// What a run defaults to on an adapter (both front ends start from these): GPT-2 124M at
/// B=16, T=1024 on a GPU; the tiny model at B=4, T=64 on a CPU rasteriser, where GPT-2's
/// steps would take minutes; f16 mixed precision where the adapter has SHADER_F16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdapterDefaults {
    pub preset: &'static str,
    pub precision: Precision,
    /// The adapter is a CPU rasteriser.
    pub cpu: bool,
}

impl AdapterDefaults {
    pub fn for_gpu(gpu: &crate::gpu::Gpu) -> AdapterDefaults {
        Self::new(gpu.is_cpu(), gpu.has_f16())
    }

    pub fn new(cpu: bool, has_f16: bool) -> AdapterDefaults {
        AdapterDefaults {
            preset: if cpu { "tiny" } else { "gpt2" },
            precision: if has_f16 {
                Precision::F16
            } else {
                Precision::F32
            },
            cpu,
        }
    }

    /// B and T for a model of `block_size` from `preset`: small ones for the tiny model or on a
    /// CPU adapter, the recipe's otherwise (T never beyond the block size).
    pub fn batch_shape(&self, preset: &str, block_size: usize) -> (usize, usize) {
        let small = preset == "tiny" || self.cpu;
        let (b, t) = if small { (4, 64) } else { (16, 1024) };
        (b, t.min(block_size))
    }
}

fn one() -> usize {
    1
}

/// What a training step computes and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub config: GptConfig,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    /// Processes training data-parallel (`mpirun -np N`), each with its own B x T x
    /// grad_accum tokens per step; 1 for a single process.
    #[serde(default = "one")]
    pub ranks: usize,
    pub steps: usize,
    pub max_lr: f64,
    pub min_lr_ratio: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub precision: Precision,
    pub attention: AttentionKind,
    /// Kernel fusion (bias+GELU in the matmul epilogue, residual+LayerNorm, GELU backward in
    /// the matmul backward). Off only to measure what it buys.
    pub fused: bool,
    /// One AdamW dispatch over all parameters (off: one per tensor).
    pub fused_optimizer: bool,
    /// Shuffle the order of shards, and of documents within each shard, every epoch (from
    /// `seed`; a folder of shards only).
    #[serde(default)]
    pub shuffle: bool,
}

impl TrainSettings {
    /// The recipe's defaults for a model shape.
    pub fn new(config: GptConfig, batch_size: usize, seq_len: usize) -> TrainSettings {
        TrainSettings {
            config,
            batch_size,
            seq_len,
            grad_accum: 1,
            ranks: 1,
            steps: 50,
            max_lr: 6e-4,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            precision: Precision::F32,
            attention: AttentionKind::Flash,
            fused: true,
            fused_optimizer: true,
            shuffle: false,
        }
    }

    /// Tokens per optimiser step, over all ranks: ranks x B x T x grad_accum.
    pub fn tokens_per_step(&self) -> usize {
        self.ranks * self.batch_size * self.seq_len * self.grad_accum
    }

    /// Micro-batches of B x T per optimiser step, over all ranks.
    pub fn micro_batches_per_step(&self) -> usize {
        self.ranks * self.grad_accum
    }

    pub fn schedule(&self) -> super::schedule::LrSchedule {
        super::schedule::LrSchedule {
            max_lr: self.max_lr,
            min_lr: self.max_lr * self.min_lr_ratio,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
        }
    }

    /// Range checks with messages that say what to change; each error names its setting,
    /// which the front end words as its flag or field.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let bad = |s: Setting, m: String| Err(Error::setting(s, m));
        if self.batch_size == 0 {
            return bad(Setting::BatchSize, "must be at least 1".into());
        }
        if self.seq_len == 0 {
            return bad(Setting::SeqLen, "must be at least 1".into());
        }
        if self.seq_len > self.config.block_size {
            return bad(
                Setting::SeqLen,
                format!(
                    "{} is longer than the model's block size {}; lower it or raise the block size",
                    self.seq_len, self.config.block_size
                ),
            );
        }
        if self.grad_accum == 0 {
            return bad(Setting::GradAccum, "must be at least 1".into());
        }
        if self.ranks == 0 {
            return Err(Error::Config("a run needs at least 1 rank".into()));
        }
        if !(self.max_lr > 0.0 && self.max_lr.is_finite()) {
            return bad(
                Setting::MaxLr,
                format!("must be a positive number (got {})", self.max_lr),
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                Setting::MinLrRatio,
                format!("must be within [0, 1] (got {})", self.min_lr_ratio),
            );
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad(
                Setting::WeightDecay,
                format!("must be >= 0 (got {})", self.weight_decay),
            );
        }
        if !(self.grad_clip >= 0.0 && self.grad_clip.is_finite()) {
            return bad(
                Setting::GradClip,
                format!("must be >= 0 (0 disables clipping; got {})", self.grad_clip),
            );
        }
        Ok(())
    }
}
