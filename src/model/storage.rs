//! How the parameters (and, in the same layout, their f16 copies, gradients and AdamW moments)
//! are stored on the GPU: spread over as many buffers as an adapter's limits need, so that every
//! buffer can be bound whole by one dispatch (AdamW, the gradient norm, zeroing, casts).
//!
//! Each buffer holds at most `capacity` elements (the largest f32 binding the adapter offers).
//! Tensors are placed whole, first fit, in storage order (decayed tensors first), so each buffer
//! holds its decayed tensors as a prefix `[0, n_decay)` and AdamW decays that prefix. A tensor
//! larger than one buffer is split along its rows into pieces; only the tied embedding can be
//! (the embedding lookup, its backward and the lm_head products work piece by piece), any other
//! tensor that large is refused. Where everything fits one buffer (a GPU with large bindings) the
//! layout is the canonical [`ParamLayout`]'s: one buffer, one piece per tensor.

use super::params::{align_up, storage_order, Gpt, ParamId, ParamLayout};
use super::GptConfig;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use std::ops::Range;
use std::sync::Arc;

/// One stored part of a tensor: rows `rows` of it, at element `offset` of buffer `buffer`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub buffer: usize,
    pub offset: usize,
    /// Rows of the tensor (its first dimension) this piece holds.
    pub rows: Range<usize>,
    /// The piece's shape: the tensor's with `rows.len()` rows.
    pub shape: Vec<usize>,
}

impl Piece {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One storage buffer: `len` elements, the first `n_decay` of which AdamW decays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorageBuffer {
    pub len: usize,
    pub n_decay: usize,
}

/// The placement of every tensor of a model in storage buffers.
#[derive(Clone, Debug)]
pub struct StorageLayout {
    /// Most elements one buffer may hold.
    pub capacity: usize,
    pub buffers: Vec<StorageBuffer>,
    /// Every tensor's pieces, in row order (one piece for an unsplit tensor).
    pub pieces: Gpt<Vec<Piece>>,
}

impl StorageLayout {
    /// Places the tensors of `config` in buffers of at most `capacity` elements.
    ///
    /// Errors when a tensor other than wte does not fit one buffer, or when one row of wte
    /// does not (the message names the tensor and what it needs).
    pub fn new(config: &GptConfig, capacity: usize) -> Result<StorageLayout> {
        let capacity = capacity - capacity % super::params::ALIGN_ELEMS;
        let mut buffers: Vec<StorageBuffer> = Vec::new();
        let mut placed: std::collections::HashMap<ParamId, Vec<Piece>> = Default::default();
        for id in storage_order(config) {
            let shape = id.shape(config);
            let len: usize = shape.iter().product();
            let rows = shape[0];
            let row_len = len / rows.max(1);
            // Rows per piece: all of them when the tensor fits one buffer.
            let per_piece = if len <= capacity {
                rows
            } else {
                let fit = capacity / row_len.max(1);
                if id != ParamId::Wte || fit == 0 {
                    return Err(Error::Config(format!(
                        "{} ({shape:?}, {} MiB in f32) does not fit one storage buffer of {} MiB \
                         and cannot be split; use a smaller model (a narrower n_embd)",
                        id.name(),
                        (len * 4).div_ceil(1 << 20),
                        (capacity * 4) >> 20
                    )));
                }
                fit
            };
            let mut pieces = Vec::new();
            let mut r0 = 0;
            while r0 < rows {
                let r1 = (r0 + per_piece).min(rows);
                let n = (r1 - r0) * row_len;
                let size = align_up(n);
                let slot = buffers.iter().position(|b| align_up(b.len) + n <= capacity);
                let k = match slot {
                    Some(k) => k,
                    None => {
                        buffers.push(StorageBuffer { len: 0, n_decay: 0 });
                        buffers.len() - 1
                    }
                };
                let b = &mut buffers[k];
                let offset = align_up(b.len);
                // Within capacity: it is a multiple of ALIGN_ELEMS and offset + n fits it.
                b.len = offset + size;
                if id.decayed() {
                    b.n_decay = b.len;
                }
                let mut piece_shape = shape.clone();
                piece_shape[0] = r1 - r0;
                pieces.push(Piece {
                    buffer: k,
                    offset,
                    rows: r0..r1,
                    shape: piece_shape,
                });
                r0 = r1;
            }
            placed.insert(id, pieces);
        }
        let pieces = Gpt::new(config, |id| placed.remove(&id).unwrap_or_default());
        Ok(StorageLayout {
            capacity,
            buffers,
            pieces,
        })
    }

    /// Elements over all buffers.
    pub fn total(&self) -> usize {
        self.buffers.iter().map(|b| b.len).sum()
    }

    /// One line: how many buffers, and how the token table is split.
    pub fn describe(&self) -> String {
        let pieces = self.pieces.wte.len();
        format!(
            "{} MiB of f32 weights in {} buffer{} of at most {} MiB, wte in {pieces} piece{}",
            (self.total() * 4).div_ceil(1 << 20),
            self.buffers.len(),
            if self.buffers.len() == 1 { "" } else { "s" },
            (self.capacity * 4) >> 20,
            if pieces == 1 { "" } else { "s" }
        )
    }

    /// Copies `flat` (in the canonical `layout`) into one vector per buffer.
    pub fn scatter(&self, layout: &ParamLayout, flat: &[f32]) -> Vec<Vec<f32>> {
        let mut out: Vec<Vec<f32>> = self.buffers.iter().map(|b| vec![0.0; b.len]).collect();
        for (id, pieces) in self.pieces.iter() {
            let src = layout.slice(flat, id);
            for p in pieces {
                let row_len = p.len() / p.rows.len().max(1);
                let from = &src[p.rows.start * row_len..p.rows.end * row_len];
                out[p.buffer][p.offset..p.offset + from.len()].copy_from_slice(from);
            }
        }
        out
    }

    /// The inverse of [`StorageLayout::scatter`]: one vector per buffer into the canonical flat
    /// array (padding zero).
    pub fn gather(&self, layout: &ParamLayout, buffers: &[Vec<f32>]) -> Vec<f32> {
        let mut flat = vec![0.0; layout.total];
        for (id, pieces) in self.pieces.iter() {
            let dst = &mut flat[layout.entry(id).range()];
            for p in pieces {
                let row_len = p.len() / p.rows.len().max(1);
                let to = &mut dst[p.rows.start * row_len..p.rows.end * row_len];
                to.copy_from_slice(&buffers[p.buffer][p.offset..p.offset + to.len()]);
            }
        }
        flat
    }
}

/// One copy of the parameters on the GPU (master weights, their f16 copy, gradients or a
/// moment): one tensor per storage buffer. Cloning clones the handles, not the data.
#[derive(Clone, Debug)]
pub struct StoredParams {
    pub layout: Arc<StorageLayout>,
    pub buffers: Vec<Tensor>,
}

impl StoredParams {
    /// Zero-filled buffers of `dtype` for `layout`, labelled `label 0`, `label 1`, ...
    pub fn zeros(
        gpu: &Gpu,
        layout: &Arc<StorageLayout>,
        dtype: DType,
        label: &str,
    ) -> Result<StoredParams> {
        let buffers = layout
            .buffers
            .iter()
            .enumerate()
            .map(|(k, b)| gpu.zeros(&format!("{label} {k}"), &[b.len], dtype))
            .collect::<Result<Vec<_>>>()?;
        Ok(StoredParams {
            layout: layout.clone(),
            buffers,
        })
    }

    /// Piece `k` of tensor `id`, as a view with the piece's shape.
    pub fn view(&self, id: ParamId, k: usize, alignment: u64) -> Result<Tensor> {
        let piece = self
            .layout
            .pieces
            .get(id)
            .get(k)
            .ok_or_else(|| Error::Other(format!("{} has no piece {k}", id.name())))?;
        self.buffers[piece.buffer].slice(piece.offset, &piece.shape, alignment)
    }

    /// Writes `flat` (in the canonical `layout`) into the buffers (queued).
    pub fn upload(&self, gpu: &Gpu, layout: &ParamLayout, flat: &[f32]) -> Result<()> {
        if flat.len() != layout.total {
            return Err(Error::Other(format!(
                "{} parameters given for a layout of {}",
                flat.len(),
                layout.total
            )));
        }
        for (t, data) in self.buffers.iter().zip(self.layout.scatter(layout, flat)) {
            gpu.write(t, &data)?;
        }
        Ok(())
    }

    /// Reads the buffers back into the canonical `layout`.
    pub fn download(&self, gpu: &Gpu, layout: &ParamLayout) -> Result<Vec<f32>> {
        let bufs = self
            .buffers
            .iter()
            .map(|t| gpu.read(t))
            .collect::<Result<Vec<_>>>()?;
        Ok(self.layout.gather(layout, &bufs))
    }

    /// Bytes over all buffers.
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(|t| t.byte_size()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ALIGN_ELEMS;

    fn check_invariants(cfg: &GptConfig, s: &StorageLayout) {
        // Pieces never overlap, stay inside their buffer, are aligned, and cover every row.
        let mut spans: Vec<(usize, usize, usize, bool)> = Vec::new();
        for (id, pieces) in s.pieces.iter() {
            let rows = id.shape(cfg)[0];
            let mut next = 0;
            for p in pieces {
                assert_eq!(p.rows.start, next, "{} pieces in row order", id.name());
                next = p.rows.end;
                assert_eq!(p.offset % ALIGN_ELEMS, 0);
                assert!(p.offset + p.len() <= s.buffers[p.buffer].len);
                assert!(s.buffers[p.buffer].len <= s.capacity);
                spans.push((p.buffer, p.offset, p.offset + p.len(), id.decayed()));
            }
            assert_eq!(next, rows, "{} rows covered", id.name());
        }
        spans.sort();
        for w in spans.windows(2) {
            if w[0].0 == w[1].0 {
                assert!(w[0].2 <= w[1].1, "pieces overlap: {w:?}");
            }
        }
        // Decayed pieces form each buffer's prefix [0, n_decay).
        for (b, start, end, decayed) in spans {
            let n_decay = s.buffers[b].n_decay;
            if decayed {
                assert!(end <= n_decay);
            } else {
                assert!(start >= n_decay);
            }
        }
    }

    #[test]
    fn gpt2_in_webgpu_default_bindings() {
        // 128 MiB of f32 per buffer: wte (154 MiB) is split in two, 124M parameters in 5 buffers.
        let cfg = GptConfig::gpt2();
        let s = StorageLayout::new(&cfg, (128 << 20) / 4).unwrap();
        check_invariants(&cfg, &s);
        assert_eq!(s.pieces.wte.len(), 2);
        assert!(
            s.buffers.len() >= 4 && s.buffers.len() <= 5,
            "{}",
            s.buffers.len()
        );
        // With room for everything, one buffer in the canonical layout.
        let one = StorageLayout::new(&cfg, usize::MAX / 8).unwrap();
        let canon = ParamLayout::new(&cfg);
        assert_eq!(one.buffers.len(), 1);
        assert_eq!(one.buffers[0].len, canon.total);
        assert_eq!(one.buffers[0].n_decay, canon.n_decay);
        for (id, pieces) in one.pieces.iter() {
            assert_eq!(pieces.len(), 1);
            assert_eq!(pieces[0].offset, canon.entry(id).offset);
        }
    }

    #[test]
    fn scatter_then_gather_is_the_identity() {
        let cfg = GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            vocab_size: 300,
            padded_vocab_size: 384,
        };
        let layout = ParamLayout::new(&cfg);
        let flat: Vec<f32> = (0..layout.total)
            .map(|i| {
                // padding stays zero
                let used = layout.entries.iter().any(|(_, e)| e.range().contains(&i));
                if used {
                    i as f32
                } else {
                    0.0
                }
            })
            .collect();
        for cap in [4096, 5000, 8192, 1 << 20] {
            let s = StorageLayout::new(&cfg, cap).unwrap();
            check_invariants(&cfg, &s);
            let bufs = s.scatter(&layout, &flat);
            assert_eq!(s.gather(&layout, &bufs), flat, "capacity {cap}");
        }
        // wte (384 x 32) over buffers of 4992 elements: pieces of 156, 156 and 72 rows.
        let s = StorageLayout::new(&cfg, 5000).unwrap();
        let rows: Vec<usize> = s.pieces.wte.iter().map(|p| p.rows.len()).collect();
        assert_eq!(rows, [156, 156, 72]);
        // c_attn (96 x 32 = 3072) does not fit 2048 and cannot be split.
        let err = StorageLayout::new(&cfg, 2048).unwrap_err().to_string();
        assert!(err.contains("h.0.attn.c_attn.weight"), "{err}");
    }
}
