//! The graph's operations. An [`Op`] carries the tensors it reads and writes (graph ids) and
//! its static settings; from it the graph derives each node's reads and writes (for the memory
//! plan), its model FLOPs and profile family, and, in [`Op::lower`], its dispatches: one match
//! from operation to launcher. A launcher may bind only the tensors its op declares: the
//! tensors a node binds are checked against them when the graph is compiled.

use super::{Resolved, TensorId};
use crate::error::Result;
use crate::gpu::{Dispatch, Gpu, Uniform};
use crate::ops::embedding::TablePiece;
use crate::ops::matmul::{self, MatmulBackwardInput, MatmulBackwardWeight, MatmulForward};
use crate::ops::sample::DecodeDims;
use crate::ops::{
    attention, crossentropy, elementwise as ew, embedding, layernorm, optimizer, sample,
};

/// What a node's time is counted as in a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Embedding,
    LayerNorm,
    Matmul,
    Attention,
    Elementwise,
    Loss,
    Optimizer,
    Sample,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Embedding => "embedding",
            Family::LayerNorm => "layernorm",
            Family::Matmul => "matmul",
            Family::Attention => "attention",
            Family::Elementwise => "elementwise",
            Family::Loss => "loss",
            Family::Optimizer => "optimizer",
            Family::Sample => "sample",
        }
    }
}

/// One row piece of the token table (wte, tied to the classifier): its tensor and where its
/// rows sit in the whole table.
#[derive(Clone, Copy, Debug)]
pub struct TablePart {
    pub table: TensorId,
    pub piece: TablePiece,
}

/// The attention kernel's problem: B sequences of T positions, NH heads.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
}

/// One AdamW dispatch over a span of a storage buffer (views of the buffer's copies).
#[derive(Clone, Copy, Debug)]
pub struct AdamSpan {
    pub params: TensorId,
    pub grads: TensorId,
    pub m: TensorId,
    pub v: TensorId,
    /// The f16 copy the update refreshes (mixed precision).
    pub half: Option<TensorId>,
    /// Elements at the span's start that are weight-decayed.
    pub n_decay: usize,
}

/// An operation of the graph, with its tensors.
#[derive(Clone, Debug)]
pub enum Op {
    /// `out = value`.
    Fill { out: TensorId, value: f32 },
    /// `out[b, t] = wte[tokens[b, t]] + wpe[t]`, one dispatch per table piece.
    Embedding {
        out: TensorId,
        tokens: TensorId,
        wte: Vec<TablePart>,
        wpe: TensorId,
        b: usize,
        t: usize,
    },
    /// Adds `dout` into the gradients of the table pieces (through the sorted buckets) and of
    /// wpe.
    EmbeddingBackward {
        dout: TensorId,
        buckets: TensorId,
        dwte: Vec<TablePart>,
        dwpe: TensorId,
        b: usize,
        t: usize,
    },
    /// `out = LayerNorm(inp)`, saving each row's mean and 1/std.
    LayerNorm {
        out: TensorId,
        mean: TensorId,
        rstd: TensorId,
        inp: TensorId,
        weight: TensorId,
        bias: TensorId,
    },
    /// `res = a + b; out = LayerNorm(res)` in one dispatch.
    ResidualLayerNorm {
        res: TensorId,
        out: TensorId,
        mean: TensorId,
        rstd: TensorId,
        a: TensorId,
        b: TensorId,
        weight: TensorId,
        bias: TensorId,
    },
    /// Adds LayerNorm's input gradient into `dinp` and its parameters' into `dweight`, `dbias`.
    LayerNormBackward {
        dinp: TensorId,
        dweight: TensorId,
        dbias: TensorId,
        scratch: TensorId,
        dout: TensorId,
        inp: TensorId,
        weight: TensorId,
        mean: TensorId,
        rstd: TensorId,
    },
    /// `out = a + b`.
    Residual {
        out: TensorId,
        a: TensorId,
        b: TensorId,
    },
    /// `out = GELU(inp)`.
    Gelu { out: TensorId, inp: TensorId },
    /// `dinp = GELU'(inp) * dout`.
    GeluBackward {
        dinp: TensorId,
        inp: TensorId,
        dout: TensorId,
    },
    /// `out = inp @ weight^T (+ bias)`; with `gelu_pre`, that product goes to `gelu_pre` and its
    /// GELU to `out`. `out_columns`: the first of the columns of `out` written (a table piece).
    Linear {
        out: TensorId,
        inp: TensorId,
        weight: TensorId,
        bias: Option<TensorId>,
        gelu_pre: Option<TensorId>,
        out_columns: Option<usize>,
    },
    /// `din (+)= dout @ weight`, times GELU'(gelu_pre) when given; `dout_columns`: the first of
    /// the columns of `dout` read; split-K over `partials` when planned.
    LinearBackwardInput {
        din: TensorId,
        dout: TensorId,
        weight: TensorId,
        gelu_pre: Option<TensorId>,
        dout_columns: Option<usize>,
        accumulate: bool,
        partials: Option<TensorId>,
    },
    /// `dweight += dout^T @ inp` (and `dbias += colsum(dout)`), split-K over `partials` when
    /// planned.
    LinearBackwardWeight {
        dweight: TensorId,
        dbias: Option<TensorId>,
        dout: TensorId,
        inp: TensorId,
        dout_columns: Option<usize>,
        partials: Option<TensorId>,
    },
    /// Causal self-attention of `qkv`, flash: `out` and each row's log-sum-exp.
    Attention {
        out: TensorId,
        lse: TensorId,
        qkv: TensorId,
        heads: Heads,
    },
    AttentionBackward {
        dqkv: TensorId,
        /// Each row's rowsum(P * dP) (scratch).
        d: TensorId,
        dout: TensorId,
        qkv: TensorId,
        out: TensorId,
        lse: TensorId,
        heads: Heads,
    },
    /// Causal self-attention that stores the probabilities (B, NH, T, T).
    NaiveAttention {
        out: TensorId,
        probs: TensorId,
        qkv: TensorId,
        heads: Heads,
    },
    NaiveAttentionBackward {
        dqkv: TensorId,
        dprobs: TensorId,
        dout: TensorId,
        qkv: TensorId,
        probs: TensorId,
        heads: Heads,
    },
    /// Softmax cross-entropy of `logits` against `targets`: each row's loss into `losses` and
    /// its gradient (times `dloss`) written over the logits.
    CrossEntropy {
        losses: TensorId,
        logits: TensorId,
        targets: TensorId,
        dloss: TensorId,
        vocab: usize,
    },
    /// `loss += scale * sum(losses)`.
    LossMean {
        loss: TensorId,
        losses: TensorId,
        scale: f32,
    },
    /// The global gradient norm and clip factor, and whether every gradient is finite, into
    /// `status`.
    GradNorm {
        status: TensorId,
        grads: Vec<TensorId>,
        scratch: TensorId,
        scalars: TensorId,
    },
    AdamW {
        span: AdamSpan,
        status: TensorId,
        hyper: TensorId,
    },
    /// Advances the loss scaler and Adam's step count, and writes the next step's scalars.
    AdvanceStepState {
        state: TensorId,
        status: TensorId,
        bias_table: TensorId,
        dloss: TensorId,
        norm_scalars: TensorId,
        hyper: TensorId,
        growth_interval: usize,
        scaling: bool,
    },
    /// Decoding: the embedding of each sample's token at the step's position.
    EmbeddingAt {
        out: TensorId,
        tokens: TensorId,
        wte: Vec<TablePart>,
        wpe: TensorId,
        dims: DecodeDims,
        step: Uniform,
    },
    /// Decoding: appends this position's keys and values to `cache` and attends over it.
    AttentionDecode {
        out: TensorId,
        cache: TensorId,
        qkv: TensorId,
        dims: DecodeDims,
        step: Uniform,
    },
    /// Decoding: one token per sample, top-k with temperature.
    TopkSample {
        tokens: TensorId,
        logits: TensorId,
        uniforms: TensorId,
        dims: DecodeDims,
        step: Uniform,
    },
    /// A node that binds `binds` while declaring only `reads` (the compile-time check's test).
    #[cfg(test)]
    Probe {
        reads: Vec<TensorId>,
        binds: Vec<TensorId>,
    },
}

impl Op {
    /// The tensors the op reads (an accumulator it adds into is read and written).
    pub fn reads(&self) -> Vec<TensorId> {
        use Op::*;
        let mut v = match self {
            Fill { .. } => vec![],
            Embedding {
                tokens, wte, wpe, ..
            } => [*tokens, *wpe].into_iter().chain(tables(wte)).collect(),
            EmbeddingBackward {
                dout,
                buckets,
                dwte,
                dwpe,
                ..
            } => [*dout, *buckets, *dwpe]
                .into_iter()
                .chain(tables(dwte))
                .collect(),
            LayerNorm {
                inp, weight, bias, ..
            } => vec![*inp, *weight, *bias],
            ResidualLayerNorm {
                a, b, weight, bias, ..
            } => vec![*a, *b, *weight, *bias],
            LayerNormBackward {
                dinp,
                dweight,
                dbias,
                dout,
                inp,
                weight,
                mean,
                rstd,
                ..
            } => vec![*dout, *inp, *weight, *mean, *rstd, *dinp, *dweight, *dbias],
            Residual { a, b, .. } => vec![*a, *b],
            Gelu { inp, .. } => vec![*inp],
            GeluBackward { inp, dout, .. } => vec![*inp, *dout],
            Linear {
                inp, weight, bias, ..
            } => [*inp, *weight].into_iter().chain(*bias).collect(),
            LinearBackwardInput {
                din,
                dout,
                weight,
                gelu_pre,
                accumulate,
                ..
            } => [*dout, *weight]
                .into_iter()
                .chain(*gelu_pre)
                .chain(accumulate.then_some(*din))
                .collect(),
            LinearBackwardWeight {
                dweight,
                dbias,
                dout,
                inp,
                ..
            } => [*dout, *inp, *dweight].into_iter().chain(*dbias).collect(),
            Attention { qkv, .. } | NaiveAttention { qkv, .. } => vec![*qkv],
            AttentionBackward {
                dout,
                qkv,
                out,
                lse,
                ..
            } => vec![*dout, *qkv, *out, *lse],
            NaiveAttentionBackward {
                dout, qkv, probs, ..
            } => vec![*dout, *qkv, *probs],
            CrossEntropy {
                logits,
                targets,
                dloss,
                ..
            } => vec![*targets, *dloss, *logits],
            LossMean { loss, losses, .. } => vec![*losses, *loss],
            GradNorm { grads, scalars, .. } => grads.iter().copied().chain([*scalars]).collect(),
            AdamW {
                span,
                status,
                hyper,
            } => [span.grads, *status, *hyper, span.params, span.m, span.v]
                .into_iter()
                .chain(span.half)
                .collect(),
            AdvanceStepState {
                state,
                status,
                bias_table,
                ..
            } => vec![*status, *state, *bias_table],
            EmbeddingAt {
                tokens, wte, wpe, ..
            } => [*tokens, *wpe].into_iter().chain(tables(wte)).collect(),
            AttentionDecode { cache, qkv, .. } => vec![*qkv, *cache],
            TopkSample {
                logits, uniforms, ..
            } => vec![*logits, *uniforms],
            #[cfg(test)]
            Probe { reads, .. } => reads.clone(),
        };
        v.dedup();
        v
    }

    /// The tensors the op writes.
    pub fn writes(&self) -> Vec<TensorId> {
        use Op::*;
        match self {
            Fill { out, .. }
            | Embedding { out, .. }
            | Residual { out, .. }
            | Gelu { out, .. }
            | EmbeddingAt { out, .. } => vec![*out],
            EmbeddingBackward { dwte, dwpe, .. } => {
                [*dwpe].into_iter().chain(tables(dwte)).collect()
            }
            LayerNorm {
                out, mean, rstd, ..
            } => vec![*out, *mean, *rstd],
            ResidualLayerNorm {
                res,
                out,
                mean,
                rstd,
                ..
            } => vec![*res, *out, *mean, *rstd],
            LayerNormBackward {
                dinp,
                dweight,
                dbias,
                scratch,
                ..
            } => vec![*dinp, *dweight, *dbias, *scratch],
            GeluBackward { dinp, .. } => vec![*dinp],
            Linear { out, gelu_pre, .. } => gelu_pre.iter().copied().chain([*out]).collect(),
            LinearBackwardInput { din, partials, .. } => {
                [*din].into_iter().chain(*partials).collect()
            }
            LinearBackwardWeight {
                dweight,
                dbias,
                partials,
                ..
            } => [*dweight]
                .into_iter()
                .chain(*dbias)
                .chain(*partials)
                .collect(),
            Attention { out, lse, .. } => vec![*out, *lse],
            AttentionBackward { dqkv, d, .. } => vec![*dqkv, *d],
            NaiveAttention { out, probs, .. } => vec![*out, *probs],
            NaiveAttentionBackward { dqkv, dprobs, .. } => vec![*dqkv, *dprobs],
            CrossEntropy { logits, losses, .. } => vec![*logits, *losses],
            LossMean { loss, .. } => vec![*loss],
            GradNorm {
                status, scratch, ..
            } => vec![*status, *scratch],
            AdamW { span, .. } => [span.params, span.m, span.v]
                .into_iter()
                .chain(span.half)
                .collect(),
            AdvanceStepState {
                state,
                dloss,
                norm_scalars,
                hyper,
                ..
            } => vec![*state, *dloss, *norm_scalars, *hyper],
            AttentionDecode { cache, out, .. } => vec![*cache, *out],
            TopkSample { tokens, .. } => vec![*tokens],
            #[cfg(test)]
            Probe { .. } => vec![],
        }
    }

    pub fn family(&self) -> Family {
        use Op::*;
        match self {
            Embedding { .. } | EmbeddingBackward { .. } | EmbeddingAt { .. } => Family::Embedding,
            LayerNorm { .. } | ResidualLayerNorm { .. } | LayerNormBackward { .. } => {
                Family::LayerNorm
            }
            Linear { .. } | LinearBackwardInput { .. } | LinearBackwardWeight { .. } => {
                Family::Matmul
            }
            Attention { .. }
            | AttentionBackward { .. }
            | NaiveAttention { .. }
            | NaiveAttentionBackward { .. }
            | AttentionDecode { .. } => Family::Attention,
            Residual { .. } | Gelu { .. } | GeluBackward { .. } => Family::Elementwise,
            CrossEntropy { .. } | LossMean { .. } => Family::Loss,
            GradNorm { .. } | AdamW { .. } | AdvanceStepState { .. } => Family::Optimizer,
            TopkSample { .. } => Family::Sample,
            // Zeroing: of gradients (the optimiser's share), of the loss or of an accumulator.
            Fill { .. } => Family::Elementwise,
            #[cfg(test)]
            Probe { .. } => Family::Elementwise,
        }
    }

    /// Model FLOPs (products and attention; the rest counts as none), from the tensors' shapes.
    pub fn flops(&self, shape: impl Fn(TensorId) -> Vec<usize>) -> f64 {
        let rows_cols = |id: TensorId| {
            let s = shape(id);
            let cols = s.last().copied().unwrap_or(1);
            (s.iter().product::<usize>() / cols.max(1), cols)
        };
        match self {
            // out [m, n] (or its columns) = inp [m, k] @ weight [n, k]^T.
            Op::Linear { inp, weight, .. } => {
                let (m, k) = rows_cols(*inp);
                let (n, _) = rows_cols(*weight);
                matmul::matmul_flops(m, k, n)
            }
            Op::LinearBackwardInput { din, weight, .. } => {
                let (m, k) = rows_cols(*din);
                let (n, _) = rows_cols(*weight);
                matmul::matmul_flops(m, n, k)
            }
            Op::LinearBackwardWeight { dweight, inp, .. } => {
                let (n, k) = rows_cols(*dweight);
                let (m, _) = rows_cols(*inp);
                matmul::matmul_flops(n, m, k)
            }
            Op::Attention { qkv, heads, .. } | Op::NaiveAttention { qkv, heads, .. } => {
                let hs = rows_cols(*qkv).1 / 3 / heads.nh;
                attention::attention_flops(heads.b, heads.t, heads.nh, hs) as f64
            }
            Op::AttentionBackward { qkv, heads, .. }
            | Op::NaiveAttentionBackward { qkv, heads, .. } => {
                let hs = rows_cols(*qkv).1 / 3 / heads.nh;
                attention::attention_backward_flops(heads.b, heads.t, heads.nh, hs) as f64
            }
            _ => 0.0,
        }
    }

    /// The op's dispatches, on the tensors `r` resolves its ids to.
    pub fn lower(&self, gpu: &Gpu, r: &Resolved) -> Result<Vec<Dispatch>> {
        use Op::*;
        let one = |d: Result<Dispatch>| d.map(|d| vec![d]);
        match self {
            Fill { out, value } => one(ew::fill(gpu, r.t(*out), *value)),
            Embedding {
                out,
                tokens,
                wte,
                wpe,
                b,
                t,
            } => wte
                .iter()
                .map(|part| {
                    let args = embedding::EmbeddingForward {
                        out: r.t(*out),
                        tokens: r.t(*tokens),
                        wte: r.t(part.table),
                        piece: part.piece,
                        wpe: r.t(*wpe),
                        b: *b,
                        t: *t,
                    };
                    embedding::embedding_forward(gpu, &args)
                })
                .collect(),
            EmbeddingBackward {
                dout,
                buckets,
                dwte,
                dwpe,
                b,
                t,
            } => {
                let mut ds = Vec::with_capacity(dwte.len() + 1);
                for part in dwte {
                    let args = embedding::EmbeddingBackwardWte {
                        dwte: r.t(part.table),
                        piece: part.piece,
                        dout: r.t(*dout),
                        buckets: r.t(*buckets),
                        b: *b,
                        t: *t,
                    };
                    ds.push(embedding::embedding_backward_wte(gpu, &args)?);
                }
                ds.push(embedding::embedding_backward_wpe(
                    gpu,
                    r.t(*dwpe),
                    r.t(*dout),
                    *b,
                    *t,
                )?);
                Ok(ds)
            }
            LayerNorm {
                out,
                mean,
                rstd,
                inp,
                weight,
                bias,
            } => one(layernorm::layernorm_forward(
                gpu,
                r.t(*out),
                r.t(*mean),
                r.t(*rstd),
                r.t(*inp),
                r.t(*weight),
                r.t(*bias),
            )),
            ResidualLayerNorm {
                res,
                out,
                mean,
                rstd,
                a,
                b,
                weight,
                bias,
            } => one(layernorm::fused_residual_layernorm_forward(
                gpu,
                &layernorm::FusedResidualLayerNorm {
                    residual_out: r.t(*res),
                    out: r.t(*out),
                    mean: r.t(*mean),
                    rstd: r.t(*rstd),
                    a: r.t(*a),
                    b: r.t(*b),
                    weight: r.t(*weight),
                    bias: r.t(*bias),
                },
            )),
            LayerNormBackward {
                dinp,
                dweight,
                dbias,
                scratch,
                dout,
                inp,
                weight,
                mean,
                rstd,
            } => layernorm::layernorm_backward(
                gpu,
                &layernorm::LayerNormBackward {
                    dinp: r.t(*dinp),
                    dweight: r.t(*dweight),
                    dbias: r.t(*dbias),
                    scratch: r.t(*scratch),
                    dout: r.t(*dout),
                    inp: r.t(*inp),
                    weight: r.t(*weight),
                    mean: r.t(*mean),
                    rstd: r.t(*rstd),
                },
            ),
            Residual { out, a, b } => one(ew::residual_forward(gpu, r.t(*out), r.t(*a), r.t(*b))),
            Gelu { out, inp } => one(ew::gelu_forward(gpu, r.t(*out), r.t(*inp))),
            GeluBackward { dinp, inp, dout } => {
                one(ew::gelu_backward(gpu, r.t(*dinp), r.t(*inp), r.t(*dout)))
            }
            Linear {
                out,
                inp,
                weight,
                bias,
                gelu_pre,
                out_columns,
            } => {
                let o = MatmulForward {
                    bias: bias.map(|b| r.t(b)),
                    gelu_pre: gelu_pre.map(|p| r.t(p)),
                    out_columns: *out_columns,
                    ..Default::default()
                };
                one(matmul::matmul_forward(
                    gpu,
                    r.t(*out),
                    r.t(*inp),
                    r.t(*weight),
                    &o,
                ))
            }
            LinearBackwardInput {
                din,
                dout,
                weight,
                gelu_pre,
                dout_columns,
                accumulate,
                partials,
            } => {
                let o = MatmulBackwardInput {
                    gelu_pre: gelu_pre.map(|p| r.t(p)),
                    dout_columns: *dout_columns,
                    accumulate: *accumulate,
                    ..Default::default()
                };
                match partials {
                    Some(s) => matmul::matmul_backward_input_split(
                        gpu,
                        r.t(*din),
                        r.t(*dout),
                        r.t(*weight),
                        Some(r.t(*s)),
                        &o,
                    ),
                    None => one(matmul::matmul_backward_input(
                        gpu,
                        r.t(*din),
                        r.t(*dout),
                        r.t(*weight),
                        &o,
                    )),
                }
            }
            LinearBackwardWeight {
                dweight,
                dbias,
                dout,
                inp,
                dout_columns,
                partials,
            } => {
                let o = MatmulBackwardWeight {
                    dbias: dbias.map(|b| r.t(b)),
                    dout_columns: *dout_columns,
                    accumulate: true,
                    ..Default::default()
                };
                match partials {
                    Some(s) => matmul::matmul_backward_weight_split(
                        gpu,
                        r.t(*dweight),
                        r.t(*dout),
                        r.t(*inp),
                        Some(r.t(*s)),
                        &o,
                    ),
                    None => one(matmul::matmul_backward_weight(
                        gpu,
                        r.t(*dweight),
                        r.t(*dout),
                        r.t(*inp),
                        &o,
                    )),
                }
            }
            Attention {
                out,
                lse,
                qkv,
                heads: h,
            } => attention::attention_forward(gpu, r.t(*out), r.t(*lse), r.t(*qkv), h.b, h.t, h.nh),
            AttentionBackward {
                dqkv,
                d,
                dout,
                qkv,
                out,
                lse,
                heads: h,
            } => attention::attention_backward(
                gpu,
                &attention::AttentionBackward {
                    dqkv: r.t(*dqkv),
                    dout: r.t(*dout),
                    qkv: r.t(*qkv),
                    out: r.t(*out),
                    lse: r.t(*lse),
                    d_scratch: r.t(*d),
                    b: h.b,
                    t: h.t,
                    nh: h.nh,
                },
            ),
            NaiveAttention {
                out,
                probs,
                qkv,
                heads: h,
            } => attention::naive_attention_forward(
                gpu,
                r.t(*out),
                r.t(*probs),
                r.t(*qkv),
                h.b,
                h.t,
                h.nh,
            ),
            NaiveAttentionBackward {
                dqkv,
                dprobs,
                dout,
                qkv,
                probs,
                heads: h,
            } => attention::naive_attention_backward(
                gpu,
                &attention::NaiveAttentionBackward {
                    dqkv: r.t(*dqkv),
                    datt_scratch: r.t(*dprobs),
                    dout: r.t(*dout),
                    qkv: r.t(*qkv),
                    att: r.t(*probs),
                    b: h.b,
                    t: h.t,
                    nh: h.nh,
                },
            ),
            CrossEntropy {
                losses,
                logits,
                targets,
                dloss,
                vocab,
            } => one(crossentropy::crossentropy_forward_backward(
                gpu,
                r.t(*losses),
                r.t(*logits),
                r.t(*targets),
                r.t(*dloss),
                *vocab,
                true,
            )),
            LossMean {
                loss,
                losses,
                scale,
            } => one(crossentropy::loss_mean(
                gpu,
                r.t(*loss),
                r.t(*losses),
                *scale,
                true,
            )),
            GradNorm {
                status,
                grads,
                scratch,
                scalars,
            } => {
                let views: Vec<_> = grads.iter().map(|&id| r.t(id)).collect();
                optimizer::grad_norm(gpu, r.t(*status), &views, r.t(*scratch), r.t(*scalars))
            }
            AdamW {
                span,
                status,
                hyper,
            } => one(optimizer::adamw(
                gpu,
                &optimizer::AdamW {
                    params: r.t(span.params),
                    grads: r.t(span.grads),
                    m: r.t(span.m),
                    v: r.t(span.v),
                    params_f16: span.half.map(|h| r.t(h)),
                    status: r.t(*status),
                    hyper: r.t(*hyper),
                    n_decay: span.n_decay,
                },
            )),
            AdvanceStepState {
                state,
                status,
                bias_table,
                dloss,
                norm_scalars,
                hyper,
                growth_interval,
                scaling,
            } => one(optimizer::advance_step_state(
                gpu,
                &optimizer::AdvanceStepState {
                    state: r.t(*state),
                    status: r.t(*status),
                    table: r.t(*bias_table),
                    dloss: r.t(*dloss),
                    norm_scalars: r.t(*norm_scalars),
                    hyper: r.t(*hyper),
                    growth_interval: *growth_interval,
                    scaling: *scaling,
                },
            )),
            EmbeddingAt {
                out,
                tokens,
                wte,
                wpe,
                dims,
                step,
            } => wte
                .iter()
                .map(|part| {
                    let args = sample::EmbeddingAt {
                        out: r.t(*out),
                        tokens: r.t(*tokens),
                        wte: r.t(part.table),
                        piece: part.piece,
                        wpe: r.t(*wpe),
                    };
                    sample::embedding_at(gpu, dims, step, &args)
                })
                .collect(),
            AttentionDecode {
                out,
                cache,
                qkv,
                dims,
                step,
            } => one(sample::attention_decode(
                gpu,
                dims,
                step,
                r.t(*out),
                r.t(*cache),
                r.t(*qkv),
            )),
            TopkSample {
                tokens,
                logits,
                uniforms,
                dims,
                step,
            } => one(sample::topk_sample(
                gpu,
                dims,
                step,
                r.t(*tokens),
                r.t(*logits),
                r.t(*uniforms),
            )),
            #[cfg(test)]
            Probe { binds, .. } => {
                for &id in binds {
                    let _ = r.t(id);
                }
                Ok(vec![])
            }
        }
    }
}

fn tables(parts: &[TablePart]) -> impl Iterator<Item = TensorId> + '_ {
    parts.iter().map(|p| p.table)
}
