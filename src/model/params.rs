//! The parameters' layout: every tensor a named view into one flat buffer.
//!
//! Tensors of rank >= 2 (the embeddings and all matmul weights, which get weight decay) come
//! first, then the vectors (biases and LayerNorm parameters, no decay), so that AdamW applies
//! decay to the prefix `[0, n_decay)` of the buffer in a single dispatch. Each tensor starts at
//! a multiple of [`ALIGN_ELEMS`] elements so that its view satisfies the storage-offset
//! alignment of every adapter (256 bytes) in f32 and in f16 alike.
//!
//! Names follow Hugging Face GPT-2 (`wte.weight`, `h.0.attn.c_attn.weight`, ...); matmul weights
//! are stored as [out, in] (PyTorch Linear), the transpose of Hugging Face's Conv1D.

use super::config::GptConfig;
use crate::error::{Error, Result};

/// Elements between tensor starts: 128 f16 = 256 bytes, 128 f32 = 512 bytes.
pub const ALIGN_ELEMS: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamEntry {
    pub name: String,
    pub shape: Vec<usize>,
    /// Element offset in the flat buffer.
    pub offset: usize,
}

impl ParamEntry {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn decayed(&self) -> bool {
        self.shape.len() >= 2
    }
}

#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub entries: Vec<ParamEntry>,
    /// Elements in the flat buffer, padding included.
    pub total: usize,
    /// Elements `[0, n_decay)` belong to decayed tensors (and their padding).
    pub n_decay: usize,
}

/// The block's tensors in order: (name suffix, shape, decayed).
fn block_tensors(c: &GptConfig) -> Vec<(&'static str, Vec<usize>)> {
    let e = c.n_embd;
    vec![
        ("ln_1.weight", vec![e]),
        ("ln_1.bias", vec![e]),
        ("attn.c_attn.weight", vec![3 * e, e]),
        ("attn.c_attn.bias", vec![3 * e]),
        ("attn.c_proj.weight", vec![e, e]),
        ("attn.c_proj.bias", vec![e]),
        ("ln_2.weight", vec![e]),
        ("ln_2.bias", vec![e]),
        ("mlp.c_fc.weight", vec![4 * e, e]),
        ("mlp.c_fc.bias", vec![4 * e]),
        ("mlp.c_proj.weight", vec![e, 4 * e]),
        ("mlp.c_proj.bias", vec![e]),
    ]
}

impl ParamLayout {
    pub fn new(c: &GptConfig) -> ParamLayout {
        let mut all: Vec<(String, Vec<usize>)> = vec![
            ("wte.weight".into(), vec![c.padded_vocab_size, c.n_embd]),
            ("wpe.weight".into(), vec![c.block_size, c.n_embd]),
        ];
        for l in 0..c.n_layer {
            for (suffix, shape) in block_tensors(c) {
                all.push((format!("h.{l}.{suffix}"), shape));
            }
        }
        all.push(("ln_f.weight".into(), vec![c.n_embd]));
        all.push(("ln_f.bias".into(), vec![c.n_embd]));
        // Decayed first, each group in model order.
        let (decayed, rest): (Vec<_>, Vec<_>) = all.into_iter().partition(|(_, s)| s.len() >= 2);
        let mut entries = Vec::new();
        let mut offset = 0;
        let mut n_decay = 0;
        for (name, shape) in decayed.into_iter().chain(rest) {
            let n: usize = shape.iter().product();
            let decays = shape.len() >= 2;
            entries.push(ParamEntry {
                name,
                shape,
                offset,
            });
            offset += n.div_ceil(ALIGN_ELEMS) * ALIGN_ELEMS;
            if decays {
                n_decay = offset;
            }
        }
        ParamLayout {
            entries,
            total: offset,
            n_decay,
        }
    }

    pub fn get(&self, name: &str) -> Result<&ParamEntry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::Other(format!("no parameter named '{name}'")))
    }

    /// (tensor count, parameter count) of decayed and of non-decayed tensors. The padded
    /// vocabulary rows of wte count as parameters, as in the reference recipe.
    pub fn counts(&self) -> ((usize, usize), (usize, usize)) {
        let mut d = (0, 0);
        let mut n = (0, 0);
        for e in &self.entries {
            let c = if e.decayed() { &mut d } else { &mut n };
            c.0 += 1;
            c.1 += e.len();
        }
        (d, n)
    }

    /// Number of parameters (padding between tensors excluded).
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|e| e.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_counts_match_the_recipe() {
        let l = ParamLayout::new(&GptConfig::gpt2());
        let ((dt, dp), (nt, np)) = l.counts();
        assert_eq!((dt, dp), (50, 124_354_560));
        assert_eq!((nt, np), (98, 121_344));
        // every decayed element lies before n_decay, every other after it
        for e in &l.entries {
            assert_eq!(e.decayed(), e.offset < l.n_decay, "{}", e.name);
            assert_eq!(e.offset % ALIGN_ELEMS, 0);
        }
    }
}
