//! GPT-2's layers as graph builders: each declares its outputs, appends its operation and
//! returns the outputs' ids, so a model reads as calls (`let qkv = g.linear(ln_1.out,
//! &p.c_attn)`). Which kernels a layer becomes (fused or not, flash or naive attention, split-K
//! partials) is decided here, once, for training and decoding alike.

use super::op::{Heads, Op};
use super::{Graph, TensorId};
use crate::error::{Error, Result};
use crate::gpu::{DType, Uniform};
use crate::ops::layernorm::layernorm_backward_scratch_len;
use crate::ops::matmul::matmul_backward_weight_scratch_len;
use crate::ops::sample::DecodeDims;

/// A Linear layer's tensors: the weight the products read (the f16 copy in mixed precision),
/// the bias, and in training their gradients.
#[derive(Clone, Debug)]
pub struct Linear {
    /// As in GPT-2's files, e.g. `h.3.attn.c_attn`.
    pub name: String,
    pub weight: TensorId,
    pub bias: TensorId,
    /// (weight, bias) gradients.
    pub grads: Option<(TensorId, TensorId)>,
}

/// A LayerNorm's tensors (f32), and in training their gradients.
#[derive(Clone, Debug)]
pub struct Norm {
    pub name: String,
    pub weight: TensorId,
    pub bias: TensorId,
    pub grads: Option<(TensorId, TensorId)>,
}

/// A LayerNorm's output and the statistics its backward reads.
#[derive(Clone, Copy, Debug)]
pub struct Ln {
    pub out: TensorId,
    pub mean: TensorId,
    pub rstd: TensorId,
}

/// The residual stream between layers: a tensor, or a sum not yet formed, which the next
/// LayerNorm forms in the same kernel when fusion is on.
#[derive(Clone, Copy, Debug)]
pub enum Stream {
    Tensor(TensorId),
    Sum(TensorId, TensorId),
}

/// How attention runs.
#[derive(Clone, Debug)]
pub enum AttentionMode {
    /// Training, flash: saves each row's log-sum-exp.
    Flash(Heads),
    /// Training, naive: saves the probabilities (B, NH, T, T).
    Naive(Heads),
    /// Decoding one position per sample against each layer's key/value cache.
    Decode {
        caches: Vec<TensorId>,
        dims: DecodeDims,
        step: Uniform,
    },
}

/// What attention's backward reads besides its input and output.
#[derive(Clone, Copy, Debug)]
pub enum AttentionSaved {
    Lse(TensorId),
    Probs(TensorId),
    /// Decoding: nothing (no backward).
    Cache,
}

/// A graph being built layer by layer over `rows` positions of `c` channels.
pub struct Builder<E> {
    pub g: Graph<E>,
    /// What products read and write: f16 in mixed precision, else f32.
    pub act: DType,
    /// Fused kernels (residual with LayerNorm, product with GELU).
    pub fused: bool,
    pub rows: usize,
    pub c: usize,
    pub attention: AttentionMode,
}

impl<E: Clone> Builder<E> {
    fn no_grads(name: &str) -> Error {
        Error::Other(format!("{name} has no gradients in this graph"))
    }

    fn ln_tensors(&mut self, name: &str) -> Ln {
        let (n, c) = (self.rows, self.c);
        Ln {
            out: self.g.planned(format!("{name} out"), &[n, c], self.act),
            mean: self.g.planned(format!("{name} mean"), &[n], DType::F32),
            rstd: self.g.planned(format!("{name} rstd"), &[n], DType::F32),
        }
    }

    /// `LayerNorm(x)`; returns `x` formed (a pending sum is added first, in the same kernel
    /// when fused) and the LayerNorm's output and statistics.
    pub fn layernorm(&mut self, x: Stream, p: &Norm) -> (TensorId, Ln) {
        let (weight, bias) = (p.weight, p.bias);
        let x = match x {
            Stream::Tensor(x) => x,
            Stream::Sum(a, b) => {
                let res = self.g.planned(
                    format!("residual before {}", p.name),
                    &[self.rows, self.c],
                    DType::F32,
                );
                if self.fused {
                    let Ln { out, mean, rstd } = self.ln_tensors(&p.name);
                    let op = Op::ResidualLayerNorm {
                        res,
                        out,
                        mean,
                        rstd,
                        a,
                        b,
                        weight,
                        bias,
                    };
                    self.g.push(format!("residual+{}.forward", p.name), op);
                    return (res, Ln { out, mean, rstd });
                }
                let op = Op::Residual { out: res, a, b };
                self.g.push(format!("residual before {}", p.name), op);
                res
            }
        };
        let ln = self.ln_tensors(&p.name);
        let op = Op::LayerNorm {
            out: ln.out,
            mean: ln.mean,
            rstd: ln.rstd,
            inp: x,
            weight,
            bias,
        };
        self.g.push(format!("{}.forward", p.name), op);
        (x, ln)
    }

    fn out_features(&self, p: &Linear) -> usize {
        self.g.shape(p.weight)[0]
    }

    /// `x @ W^T + b`.
    pub fn linear(&mut self, x: TensorId, p: &Linear) -> TensorId {
        let nout = self.out_features(p);
        let out = self
            .g
            .planned(format!("{} out", p.name), &[self.rows, nout], self.act);
        let op = Op::Linear {
            out,
            inp: x,
            weight: p.weight,
            bias: Some(p.bias),
            gelu_pre: None,
            out_columns: None,
        };
        self.g.push(format!("{}.forward", p.name), op);
        out
    }

    /// `GELU(x @ W^T + b)`: returns the pre-activation (saved for the backward) and the GELU.
    pub fn linear_gelu(&mut self, x: TensorId, p: &Linear) -> (TensorId, TensorId) {
        let shape = [self.rows, self.out_features(p)];
        let pre = self.g.planned(format!("{} out", p.name), &shape, self.act);
        let out = self
            .g
            .planned(format!("{}.gelu out", p.name), &shape, self.act);
        if self.fused {
            let op = Op::Linear {
                out,
                inp: x,
                weight: p.weight,
                bias: Some(p.bias),
                gelu_pre: Some(pre),
                out_columns: None,
            };
            self.g.push(format!("{}+gelu.forward", p.name), op);
        } else {
            let op = Op::Linear {
                out: pre,
                inp: x,
                weight: p.weight,
                bias: Some(p.bias),
                gelu_pre: None,
                out_columns: None,
            };
            self.g.push(format!("{}.forward", p.name), op);
            let op = Op::Gelu { out, inp: pre };
            self.g.push(format!("{}.gelu.forward", p.name), op);
        }
        (pre, out)
    }

    /// Causal self-attention of layer `layer` over `qkv`: its output and what its backward
    /// reads. `name` labels it (`h.3.attn`).
    pub fn attention(
        &mut self,
        qkv: TensorId,
        layer: usize,
        name: &str,
    ) -> (TensorId, AttentionSaved) {
        let (n, c) = (self.rows, self.c);
        let y = self
            .g
            .planned(format!("h.{layer}.attention out"), &[n, c], self.act);
        match self.attention.clone() {
            AttentionMode::Flash(heads) => {
                let lse = self.g.planned(
                    format!("h.{layer}.attention lse"),
                    &[heads.b, heads.nh, heads.t],
                    DType::F32,
                );
                let op = Op::Attention {
                    out: y,
                    lse,
                    qkv,
                    heads,
                };
                self.g.push(format!("{name}.flash.forward"), op);
                (y, AttentionSaved::Lse(lse))
            }
            AttentionMode::Naive(heads) => {
                let probs = self.g.planned(
                    format!("h.{layer}.attention probs"),
                    &[heads.b, heads.nh, heads.t, heads.t],
                    DType::F32,
                );
                let op = Op::NaiveAttention {
                    out: y,
                    probs,
                    qkv,
                    heads,
                };
                self.g.push(format!("{name}.naive.forward"), op);
                (y, AttentionSaved::Probs(probs))
            }
            AttentionMode::Decode { caches, dims, step } => {
                let op = Op::AttentionDecode {
                    out: y,
                    cache: caches[layer],
                    qkv,
                    dims,
                    step,
                };
                self.g.push(format!("{name}.decode"), op);
                (y, AttentionSaved::Cache)
            }
        }
    }

    /// The backward of `linear` (or of `linear_gelu`'s product when `gelu_pre` is given: then
    /// the gradient returned is at the pre-activation): the input's gradient, then the
    /// weight's and bias's added into theirs.
    fn backward(
        &mut self,
        dout: TensorId,
        x: TensorId,
        gelu_pre: Option<TensorId>,
        p: &Linear,
    ) -> Result<TensorId> {
        let (dweight, dbias) = p.grads.ok_or_else(|| Self::no_grads(&p.name))?;
        let shape = self.g.shape(x).to_vec();
        let din = self.g.planned(format!("d {} in", p.name), &shape, self.act);
        let fused_gelu = gelu_pre.filter(|_| self.fused);
        let dx = if fused_gelu.is_some() || gelu_pre.is_none() {
            din
        } else {
            self.g
                .planned(format!("d {}.gelu out", p.name), &shape, self.act)
        };
        let label = match fused_gelu {
            Some(_) => format!("{}+gelu.backward_input", p.name),
            None => format!("{}.backward_input", p.name),
        };
        let op = Op::LinearBackwardInput {
            din: dx,
            dout,
            weight: p.weight,
            gelu_pre: fused_gelu,
            dout_columns: None,
            accumulate: false,
            partials: None,
        };
        self.g.push(label, op);
        if let (Some(pre), None) = (gelu_pre, fused_gelu) {
            let op = Op::GeluBackward {
                dinp: din,
                inp: pre,
                dout: dx,
            };
            self.g.push(format!("{}.gelu.backward", p.name), op);
        }
        // Split-K partials when the (out, in) gradient is too small to fill a large GPU alone.
        let (nout, k) = (self.out_features(p), shape[shape.len() - 1]);
        let split = matmul_backward_weight_scratch_len(nout, k, self.rows);
        let partials = (split > 0).then(|| {
            self.g
                .planned(format!("{} weight partials", p.name), &[split], DType::F32)
        });
        let op = Op::LinearBackwardWeight {
            dweight,
            dbias: Some(dbias),
            dout,
            inp: x,
            dout_columns: None,
            partials,
        };
        self.g.push(format!("{}.backward_weight", p.name), op);
        Ok(din)
    }

    /// The backward of `linear(x, p)`: returns the gradient at `x`.
    pub fn linear_backward(&mut self, dout: TensorId, x: TensorId, p: &Linear) -> Result<TensorId> {
        self.backward(dout, x, None, p)
    }

    /// The backward of `linear(GELU(pre), p)`, where `h = GELU(pre)`: returns the gradient at
    /// `pre`.
    pub fn gelu_linear_backward(
        &mut self,
        dout: TensorId,
        h: TensorId,
        pre: TensorId,
        p: &Linear,
    ) -> Result<TensorId> {
        self.backward(dout, h, Some(pre), p)
    }

    /// The backward of a LayerNorm of `x` that fed `ln`: adds the gradient at `x` into `dx`
    /// (the residual stream's) and the parameters' into theirs.
    pub fn layernorm_backward(
        &mut self,
        dx: TensorId,
        dout: TensorId,
        x: TensorId,
        ln: &Ln,
        p: &Norm,
    ) -> Result<()> {
        let (dweight, dbias) = p.grads.ok_or_else(|| Self::no_grads(&p.name))?;
        let scratch = self.g.planned(
            format!("{} backward partials", p.name),
            &[layernorm_backward_scratch_len(self.rows, self.c)],
            DType::F32,
        );
        let op = Op::LayerNormBackward {
            dinp: dx,
            dweight,
            dbias,
            scratch,
            dout,
            inp: x,
            weight: p.weight,
            mean: ln.mean,
            rstd: ln.rstd,
        };
        self.g.push(format!("{}.backward", p.name), op);
        Ok(())
    }

    /// The backward of `attention(qkv)`, whose output was `y`: the gradient at `qkv`.
    pub fn attention_backward(
        &mut self,
        dy: TensorId,
        qkv: TensorId,
        y: TensorId,
        saved: AttentionSaved,
        layer: usize,
        name: &str,
    ) -> Result<TensorId> {
        let shape = self.g.shape(qkv).to_vec();
        let dqkv = self.g.planned(format!("h.{layer}.d qkv"), &shape, self.act);
        match (self.attention.clone(), saved) {
            (AttentionMode::Flash(heads), AttentionSaved::Lse(lse)) => {
                let d = self.g.planned(
                    format!("h.{layer}.attention D"),
                    &[heads.b, heads.nh, heads.t],
                    DType::F32,
                );
                let op = Op::AttentionBackward {
                    dqkv,
                    d,
                    dout: dy,
                    qkv,
                    out: y,
                    lse,
                    heads,
                };
                self.g.push(format!("{name}.flash.backward"), op);
            }
            (AttentionMode::Naive(heads), AttentionSaved::Probs(probs)) => {
                let dprobs = self.g.planned(
                    format!("h.{layer}.d attention probs"),
                    &[heads.b, heads.nh, heads.t, heads.t],
                    DType::F32,
                );
                let op = Op::NaiveAttentionBackward {
                    dqkv,
                    dprobs,
                    dout: dy,
                    qkv,
                    probs,
                    heads,
                };
                self.g.push(format!("{name}.naive.backward"), op);
            }
            _ => return Err(Error::Other(format!("{name}: no backward in this graph"))),
        }
        Ok(dqkv)
    }
}
