//! GPT-2's parameter tensors, addressed by type rather than by name.
//!
//! [`ParamId`] names one tensor (`ParamId::Block(3, BlockTensor::CAttnWeight)`), [`Gpt<T>`] holds one
//! value per tensor in fields (`p.h[3].c_attn_w`), and [`ParamLayout`] places every tensor in one
//! flat array: the canonical CPU layout of a model's parameters (what checkpoints, the importer,
//! initialisation and the float64 reference read and write). How the GPU stores the same tensors
//! across buffers that fit an adapter's limits is [`super::storage::StorageLayout`].
//!
//! Hugging Face names (`wte.weight`, `h.0.attn.c_attn.weight`, ...) exist only for files: they are
//! derived from the id by [`ParamId::name`]. Matmul weights are stored [out, in] (PyTorch Linear),
//! the transpose of Hugging Face's Conv1D.

use super::config::GptConfig;

/// Elements between tensor starts: 128 f16 = 256 bytes, 128 f32 = 512 bytes, so every tensor's
/// view satisfies the storage-offset alignment of every adapter (at most 256 bytes) in f32 and in
/// f16 alike.
pub const ALIGN_ELEMS: usize = 128;

/// Rounds an element count up to the next multiple of [`ALIGN_ELEMS`].
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN_ELEMS) * ALIGN_ELEMS
}

/// One tensor of a transformer block, in the block's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockTensor {
    Ln1Weight,
    Ln1Bias,
    CAttnWeight,
    CAttnBias,
    AttnProjWeight,
    AttnProjBias,
    Ln2Weight,
    Ln2Bias,
    CFcWeight,
    CFcBias,
    MlpProjWeight,
    MlpProjBias,
}

impl BlockTensor {
    pub const ALL: [BlockTensor; 12] = [
        BlockTensor::Ln1Weight,
        BlockTensor::Ln1Bias,
        BlockTensor::CAttnWeight,
        BlockTensor::CAttnBias,
        BlockTensor::AttnProjWeight,
        BlockTensor::AttnProjBias,
        BlockTensor::Ln2Weight,
        BlockTensor::Ln2Bias,
        BlockTensor::CFcWeight,
        BlockTensor::CFcBias,
        BlockTensor::MlpProjWeight,
        BlockTensor::MlpProjBias,
    ];

    /// The Hugging Face name within the block, e.g. `attn.c_attn.weight`.
    pub fn suffix(self) -> &'static str {
        match self {
            BlockTensor::Ln1Weight => "ln_1.weight",
            BlockTensor::Ln1Bias => "ln_1.bias",
            BlockTensor::CAttnWeight => "attn.c_attn.weight",
            BlockTensor::CAttnBias => "attn.c_attn.bias",
            BlockTensor::AttnProjWeight => "attn.c_proj.weight",
            BlockTensor::AttnProjBias => "attn.c_proj.bias",
            BlockTensor::Ln2Weight => "ln_2.weight",
            BlockTensor::Ln2Bias => "ln_2.bias",
            BlockTensor::CFcWeight => "mlp.c_fc.weight",
            BlockTensor::CFcBias => "mlp.c_fc.bias",
            BlockTensor::MlpProjWeight => "mlp.c_proj.weight",
            BlockTensor::MlpProjBias => "mlp.c_proj.bias",
        }
    }

    /// Shape for a model `c` channels wide ([out, in] for matmul weights).
    pub fn shape(self, c: usize) -> Vec<usize> {
        match self {
            BlockTensor::Ln1Weight
            | BlockTensor::Ln1Bias
            | BlockTensor::AttnProjBias
            | BlockTensor::Ln2Weight
            | BlockTensor::Ln2Bias
            | BlockTensor::MlpProjBias => vec![c],
            BlockTensor::CAttnWeight => vec![3 * c, c],
            BlockTensor::CAttnBias => vec![3 * c],
            BlockTensor::AttnProjWeight => vec![c, c],
            BlockTensor::CFcWeight => vec![4 * c, c],
            BlockTensor::CFcBias => vec![4 * c],
            BlockTensor::MlpProjWeight => vec![c, 4 * c],
        }
    }
}

/// One parameter tensor of GPT-2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamId {
    /// Token embedding, tied to the lm_head: [padded vocab, C].
    Wte,
    /// Position embedding: [block size, C].
    Wpe,
    /// Tensor of block `l`.
    Block(usize, BlockTensor),
    LnFWeight,
    LnFBias,
}

impl ParamId {
    /// Every tensor of `config`, in model order (wte, wpe, blocks, ln_f).
    pub fn all(config: &GptConfig) -> Vec<ParamId> {
        let mut v = vec![ParamId::Wte, ParamId::Wpe];
        for l in 0..config.n_layer {
            v.extend(BlockTensor::ALL.iter().map(|&t| ParamId::Block(l, t)));
        }
        v.push(ParamId::LnFWeight);
        v.push(ParamId::LnFBias);
        v
    }

    /// The Hugging Face GPT-2 name, e.g. `h.3.attn.c_attn.weight` (for files only).
    pub fn name(self) -> String {
        match self {
            ParamId::Wte => "wte.weight".into(),
            ParamId::Wpe => "wpe.weight".into(),
            ParamId::Block(l, t) => format!("h.{l}.{}", t.suffix()),
            ParamId::LnFWeight => "ln_f.weight".into(),
            ParamId::LnFBias => "ln_f.bias".into(),
        }
    }

    /// The tensor's shape in `config` (wte with the padded vocabulary's rows).
    pub fn shape(self, config: &GptConfig) -> Vec<usize> {
        let c = config.n_embd;
        match self {
            ParamId::Wte => vec![config.padded_vocab_size, c],
            ParamId::Wpe => vec![config.block_size, c],
            ParamId::Block(_, t) => t.shape(c),
            ParamId::LnFWeight | ParamId::LnFBias => vec![c],
        }
    }

    /// Whether AdamW decays it: tensors of rank >= 2 (the embeddings and all matmul weights).
    pub fn decayed(self) -> bool {
        matches!(
            self,
            ParamId::Wte
                | ParamId::Wpe
                | ParamId::Block(
                    _,
                    BlockTensor::CAttnWeight
                        | BlockTensor::AttnProjWeight
                        | BlockTensor::CFcWeight
                        | BlockTensor::MlpProjWeight
                )
        )
    }

    /// The matmul weights Hugging Face stores transposed ([in, out], Conv1D).
    pub fn is_conv1d(self) -> bool {
        matches!(
            self,
            ParamId::Block(
                _,
                BlockTensor::CAttnWeight
                    | BlockTensor::AttnProjWeight
                    | BlockTensor::CFcWeight
                    | BlockTensor::MlpProjWeight
            )
        )
    }

    /// LayerNorm weights (initialised to 1).
    pub fn is_layernorm_weight(self) -> bool {
        matches!(
            self,
            ParamId::LnFWeight | ParamId::Block(_, BlockTensor::Ln1Weight | BlockTensor::Ln2Weight)
        )
    }

    /// The two residual projections, initialised with a smaller standard deviation.
    pub fn is_residual_projection(self) -> bool {
        matches!(
            self,
            ParamId::Block(_, BlockTensor::AttnProjWeight | BlockTensor::MlpProjWeight)
        )
    }
}

/// One value per tensor of a transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct Block<T> {
    pub ln_1_w: T,
    pub ln_1_b: T,
    pub c_attn_w: T,
    pub c_attn_b: T,
    pub attn_proj_w: T,
    pub attn_proj_b: T,
    pub ln_2_w: T,
    pub ln_2_b: T,
    pub c_fc_w: T,
    pub c_fc_b: T,
    pub mlp_proj_w: T,
    pub mlp_proj_b: T,
}

impl<T> Block<T> {
    pub fn get(&self, t: BlockTensor) -> &T {
        match t {
            BlockTensor::Ln1Weight => &self.ln_1_w,
            BlockTensor::Ln1Bias => &self.ln_1_b,
            BlockTensor::CAttnWeight => &self.c_attn_w,
            BlockTensor::CAttnBias => &self.c_attn_b,
            BlockTensor::AttnProjWeight => &self.attn_proj_w,
            BlockTensor::AttnProjBias => &self.attn_proj_b,
            BlockTensor::Ln2Weight => &self.ln_2_w,
            BlockTensor::Ln2Bias => &self.ln_2_b,
            BlockTensor::CFcWeight => &self.c_fc_w,
            BlockTensor::CFcBias => &self.c_fc_b,
            BlockTensor::MlpProjWeight => &self.mlp_proj_w,
            BlockTensor::MlpProjBias => &self.mlp_proj_b,
        }
    }

    fn try_new<E>(mut f: impl FnMut(BlockTensor) -> Result<T, E>) -> Result<Block<T>, E> {
        Ok(Block {
            ln_1_w: f(BlockTensor::Ln1Weight)?,
            ln_1_b: f(BlockTensor::Ln1Bias)?,
            c_attn_w: f(BlockTensor::CAttnWeight)?,
            c_attn_b: f(BlockTensor::CAttnBias)?,
            attn_proj_w: f(BlockTensor::AttnProjWeight)?,
            attn_proj_b: f(BlockTensor::AttnProjBias)?,
            ln_2_w: f(BlockTensor::Ln2Weight)?,
            ln_2_b: f(BlockTensor::Ln2Bias)?,
            c_fc_w: f(BlockTensor::CFcWeight)?,
            c_fc_b: f(BlockTensor::CFcBias)?,
            mlp_proj_w: f(BlockTensor::MlpProjWeight)?,
            mlp_proj_b: f(BlockTensor::MlpProjBias)?,
        })
    }
}

/// One value per parameter tensor of GPT-2, as fields: `p.wte`, `p.h[3].c_attn_w`, `p.ln_f_b`.
#[derive(Clone, Debug, PartialEq)]
pub struct Gpt<T> {
    pub wte: T,
    pub wpe: T,
    pub h: Vec<Block<T>>,
    pub ln_f_w: T,
    pub ln_f_b: T,
}

impl<T> Gpt<T> {
    /// Builds the value of every tensor of `config` with `f`, in model order.
    pub fn try_new<E>(
        config: &GptConfig,
        mut f: impl FnMut(ParamId) -> Result<T, E>,
    ) -> Result<Gpt<T>, E> {
        let wte = f(ParamId::Wte)?;
        let wpe = f(ParamId::Wpe)?;
        let h = (0..config.n_layer)
            .map(|l| Block::try_new(|t| f(ParamId::Block(l, t))))
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Gpt {
            wte,
            wpe,
            h,
            ln_f_w: f(ParamId::LnFWeight)?,
            ln_f_b: f(ParamId::LnFBias)?,
        })
    }

    /// [`Gpt::try_new`] for a function that cannot fail.
    pub fn new(config: &GptConfig, mut f: impl FnMut(ParamId) -> T) -> Gpt<T> {
        match Gpt::try_new::<std::convert::Infallible>(config, |id| Ok(f(id))) {
            Ok(g) => g,
            Err(never) => match never {},
        }
    }

    /// The value of tensor `id`. Panics only for a block index beyond the model's layers, which
    /// no id made from the same config has.
    pub fn get(&self, id: ParamId) -> &T {
        match id {
            ParamId::Wte => &self.wte,
            ParamId::Wpe => &self.wpe,
            ParamId::Block(l, t) => self.h[l].get(t),
            ParamId::LnFWeight => &self.ln_f_w,
            ParamId::LnFBias => &self.ln_f_b,
        }
    }

    /// Every (id, value) in model order.
    pub fn iter(&self) -> impl Iterator<Item = (ParamId, &T)> {
        let head = [(ParamId::Wte, &self.wte), (ParamId::Wpe, &self.wpe)];
        let blocks = self.h.iter().enumerate().flat_map(|(l, b)| {
            BlockTensor::ALL
                .iter()
                .map(move |&t| (ParamId::Block(l, t), b.get(t)))
        });
        let tail = [
            (ParamId::LnFWeight, &self.ln_f_w),
            (ParamId::LnFBias, &self.ln_f_b),
        ];
        head.into_iter().chain(blocks).chain(tail)
    }

    /// The same structure with `f` applied to every value.
    pub fn map<U>(&self, mut f: impl FnMut(ParamId, &T) -> U) -> Gpt<U> {
        let mut blocks = Vec::with_capacity(self.h.len());
        for (l, b) in self.h.iter().enumerate() {
            blocks.push(Block {
                ln_1_w: f(ParamId::Block(l, BlockTensor::Ln1Weight), &b.ln_1_w),
                ln_1_b: f(ParamId::Block(l, BlockTensor::Ln1Bias), &b.ln_1_b),
                c_attn_w: f(ParamId::Block(l, BlockTensor::CAttnWeight), &b.c_attn_w),
                c_attn_b: f(ParamId::Block(l, BlockTensor::CAttnBias), &b.c_attn_b),
                attn_proj_w: f(
                    ParamId::Block(l, BlockTensor::AttnProjWeight),
                    &b.attn_proj_w,
                ),
                attn_proj_b: f(ParamId::Block(l, BlockTensor::AttnProjBias), &b.attn_proj_b),
                ln_2_w: f(ParamId::Block(l, BlockTensor::Ln2Weight), &b.ln_2_w),
                ln_2_b: f(ParamId::Block(l, BlockTensor::Ln2Bias), &b.ln_2_b),
                c_fc_w: f(ParamId::Block(l, BlockTensor::CFcWeight), &b.c_fc_w),
                c_fc_b: f(ParamId::Block(l, BlockTensor::CFcBias), &b.c_fc_b),
                mlp_proj_w: f(ParamId::Block(l, BlockTensor::MlpProjWeight), &b.mlp_proj_w),
                mlp_proj_b: f(ParamId::Block(l, BlockTensor::MlpProjBias), &b.mlp_proj_b),
            });
        }
        Gpt {
            wte: f(ParamId::Wte, &self.wte),
            wpe: f(ParamId::Wpe, &self.wpe),
            h: blocks,
            ln_f_w: f(ParamId::LnFWeight, &self.ln_f_w),
            ln_f_b: f(ParamId::LnFBias, &self.ln_f_b),
        }
    }
}

/// Where one tensor lies in the flat array.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamEntry {
    pub id: ParamId,
    pub shape: Vec<usize>,
    /// Element offset in the flat array.
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
        self.id.decayed()
    }

    /// The tensor's elements in the flat array.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// Every tensor placed in one flat array, in *storage order*: the decayed tensors (rank >= 2)
/// first, then the vectors, each group in model order, each tensor starting at a multiple of
/// [`ALIGN_ELEMS`]. The decayed tensors (and their padding) are the prefix `[0, n_decay)`.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub entries: Gpt<ParamEntry>,
    /// Elements in the flat array, padding included.
    pub total: usize,
    /// Elements `[0, n_decay)` belong to decayed tensors (and their padding).
    pub n_decay: usize,
}

/// The tensors of `config` in storage order: decayed first, each group in model order.
pub fn storage_order(config: &GptConfig) -> Vec<ParamId> {
    let (decayed, rest): (Vec<ParamId>, Vec<ParamId>) = ParamId::all(config)
        .into_iter()
        .partition(|id| id.decayed());
    decayed.into_iter().chain(rest).collect()
}

impl ParamLayout {
    pub fn new(config: &GptConfig) -> ParamLayout {
        let mut offsets = std::collections::HashMap::new();
        let mut offset = 0;
        let mut n_decay = 0;
        for id in storage_order(config) {
            offsets.insert(id, offset);
            offset += align_up(id.shape(config).iter().product());
            if id.decayed() {
                n_decay = offset;
            }
        }
        let entries = Gpt::new(config, |id| ParamEntry {
            id,
            shape: id.shape(config),
            offset: offsets[&id],
        });
        ParamLayout {
            entries,
            total: offset,
            n_decay,
        }
    }

    /// The entry of tensor `id`.
    pub fn entry(&self, id: ParamId) -> &ParamEntry {
        self.entries.get(id)
    }

    /// Tensor `id`'s elements within `flat` (an array of `total` elements in this layout).
    pub fn slice<'a, T>(&self, flat: &'a [T], id: ParamId) -> &'a [T] {
        &flat[self.entry(id).range()]
    }

    /// (tensor count, parameter count) of decayed and of non-decayed tensors. The padded
    /// vocabulary rows of wte count as parameters, as in the reference recipe.
    pub fn counts(&self) -> ((usize, usize), (usize, usize)) {
        let mut d = (0, 0);
        let mut n = (0, 0);
        for (_, e) in self.entries.iter() {
            let c = if e.decayed() { &mut d } else { &mut n };
            c.0 += 1;
            c.1 += e.len();
        }
        (d, n)
    }

    /// Number of parameters (padding between tensors excluded).
    pub fn num_params(&self) -> usize {
        self.entries.iter().map(|(_, e)| e.len()).sum()
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
        for (id, e) in l.entries.iter() {
            assert_eq!(e.id, id);
            assert_eq!(e.decayed(), e.offset < l.n_decay, "{}", id.name());
            assert_eq!(e.offset % ALIGN_ELEMS, 0);
        }
    }

    #[test]
    fn ids_and_fields_agree() {
        let cfg = GptConfig::tiny();
        let g = Gpt::new(&cfg, |id| id);
        let ids: Vec<ParamId> = g.iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ParamId::all(&cfg));
        for (id, v) in g.iter() {
            assert_eq!(*v, id);
            assert_eq!(*g.get(id), id);
        }
        let mapped = g.map(|id, _| id.name());
        assert_eq!(mapped.h[1].c_attn_w, "h.1.attn.c_attn.weight");
        assert_eq!(mapped.h[0].mlp_proj_b, "h.0.mlp.c_proj.bias");
        // Names are unique.
        let mut names: Vec<String> = ids.iter().map(|i| i.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ids.len());
    }
}
