//! Model configuration and presets.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// GPT-2's tokenizer vocabulary (r50k_base): 50,000 merges + 256 bytes + `<|endoftext|>`.
pub const GPT2_VOCAB: usize = 50257;

/// A GPT-2 shape. `vocab_size` is the real vocabulary; `padded_vocab_size` (>= it) is the number
/// of rows `wte` and the logits actually have, rounded up for the kernels' sake. Padding changes
/// the memory layout only: padded logits are masked and padded rows get no gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GptConfig {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub padded_vocab_size: usize,
}

/// Rounds a vocabulary up to a multiple of 128 (50257 -> 50304, as in the reference recipe).
pub fn pad_vocab(v: usize) -> usize {
    v.div_ceil(128) * 128
}

impl GptConfig {
    /// GPT-2 (124M): 12 layers, 12 heads, 768 channels, 1024 positions, vocab 50257 padded to 50304.
    pub fn gpt2() -> GptConfig {
        Self::gpt2_shape(12, 12, 768)
    }

    /// A GPT-2 shape with GPT-2's vocabulary (50257, padded to 50304) and 1024 positions.
    fn gpt2_shape(n_layer: usize, n_head: usize, n_embd: usize) -> GptConfig {
        GptConfig {
            n_layer,
            n_head,
            n_embd,
            block_size: 1024,
            vocab_size: GPT2_VOCAB,
            padded_vocab_size: pad_vocab(GPT2_VOCAB),
        }
    }

    /// GPT-2 medium (350M): 24 layers, 16 heads, 1024 channels.
    pub fn gpt2_medium() -> GptConfig {
        Self::gpt2_shape(24, 16, 1024)
    }

    /// GPT-2 large (774M): 36 layers, 20 heads, 1280 channels.
    pub fn gpt2_large() -> GptConfig {
        Self::gpt2_shape(36, 20, 1280)
    }

    /// GPT-2 XL (1.5B): 48 layers, 25 heads, 1600 channels.
    pub fn gpt2_xl() -> GptConfig {
        Self::gpt2_shape(48, 25, 1600)
    }

    /// A tiny GPT-2 for CPU adapters and tests: 2 layers, 4 heads, 64 channels, 64 positions,
    /// GPT-2's full vocabulary (so it trains on real text).
    pub fn tiny() -> GptConfig {
        GptConfig {
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            block_size: 64,
            vocab_size: GPT2_VOCAB,
            padded_vocab_size: pad_vocab(GPT2_VOCAB),
        }
    }

    /// The presets by name, in size order.
    pub const PRESETS: [&'static str; 5] = ["tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

    pub fn preset(name: &str) -> Result<GptConfig> {
        match name {
            "gpt2" => Ok(Self::gpt2()),
            "gpt2-medium" => Ok(Self::gpt2_medium()),
            "gpt2-large" => Ok(Self::gpt2_large()),
            "gpt2-xl" => Ok(Self::gpt2_xl()),
            "tiny" => Ok(Self::tiny()),
            other => Err(Error::Config(format!(
                "unknown preset '{other}'; the presets are {}",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks the shape is one the model and kernels can run.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.n_layer == 0
            || c.n_head == 0
            || c.n_embd == 0
            || c.block_size == 0
            || c.vocab_size == 0
        {
            return Err(Error::Config(format!(
                "n_layer, n_head, n_embd, block_size and vocab_size must all be at least 1 (got {c:?})"
            )));
        }
        if !c.n_embd.is_multiple_of(c.n_head) {
            return Err(Error::Config(format!(
                "n_embd ({}) must be divisible by n_head ({}); pick n_head among the divisors of n_embd",
                c.n_embd, c.n_head
            )));
        }
        if c.padded_vocab_size < c.vocab_size {
            return Err(Error::Config(format!(
                "the padded vocabulary ({}) is smaller than the vocabulary ({})",
                c.padded_vocab_size, c.vocab_size
            )));
        }
        Ok(())
    }

    /// One line for the log.
    pub fn describe(&self) -> String {
        format!(
            "n_layer {} | n_head {} | n_embd {} | block_size {} | vocab {} (padded {})",
            self.n_layer,
            self.n_head,
            self.n_embd,
            self.block_size,
            self.vocab_size,
            self.padded_vocab_size
        )
    }
}
