//! GPT-2 as graphs: the training step (forward, loss, backward, gradient norm, AdamW) and the
//! decoding step, both built from one block forward. This file is where the model's data flow
//! is read, top to bottom.
//!
//! Graphs are built without a device, from the step's shape ([`StepShape`]), the parameters'
//! storage layout and the classifier's chunk size. The parameters' copies are the caller's,
//! named by [`ParamInput`] and bound when the graph is compiled; everything else a step keeps
//! (token ids, the loss, the optimiser's scalars, the decoder's caches) is state the graph
//! allocates, whose ids the builders return ([`StepIo`], [`DecodeIo`]).

use super::layers::{AttentionMode, AttentionSaved, Builder, Linear, Ln, Norm, Stream};
use super::op::{AdamSpan, Heads, Op, TablePart};
use super::step::{AttentionKind, Precision, StepShape, LOSS_SCALE_GROWTH_INTERVAL};
use super::{Graph, Phase, Section, TensorId};
use crate::error::{Error, Result};
use crate::gpu::{DType, Uniform};
use crate::model::params::Block;
use crate::model::{Gpt, GptConfig, ParamId, StorageLayout};
use crate::ops::embedding::{self, TablePiece};
use crate::ops::matmul::matmul_backward_input_scratch_len;
use crate::ops::optimizer;
use crate::ops::sample::DecodeDims;

/// One copy of the parameters; every copy has the same storage layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamCopy {
    /// f32 master weights (LayerNorm, biases and embeddings read them).
    Master,
    /// f16 copies of the weights that matmuls read (mixed precision only).
    Half,
    /// f32 gradients.
    Grad,
    /// AdamW's first and second moments.
    AdamM,
    AdamV,
}

/// The parameters' tensors a graph binds: the caller's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamInput {
    /// Piece `k` of parameter `id` in one copy.
    Piece(ParamId, usize, ParamCopy),
    /// Storage buffer `k` of one copy, whole (zeroing, the gradient norm, AdamW).
    Buffer(ParamCopy, usize),
}

/// One parameter's tensors in a graph.
#[derive(Clone, Copy, Debug)]
struct Param {
    /// f32 master weight.
    p: TensorId,
    /// What products read: the f16 copy in mixed precision, else the master weight.
    w: TensorId,
    /// Gradient (training).
    g: Option<TensorId>,
}

/// The model's parameters as layers.
struct Model {
    /// The token table's row pieces (tied to the classifier): what products read, and the
    /// pieces' f32 tensors and gradients.
    wte: Vec<(Param, TablePiece)>,
    wpe: Param,
    h: Vec<BlockParams>,
    ln_f: Norm,
}

struct BlockParams {
    ln_1: Norm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: Norm,
    c_fc: Linear,
    mlp_proj: Linear,
}

impl Model {
    fn new(p: &Gpt<Param>, wte: Vec<(Param, TablePiece)>) -> Model {
        let grads = |w: &Param, b: &Param| w.g.zip(b.g);
        let norm = |name: String, w: &Param, b: &Param| Norm {
            name,
            weight: w.p,
            bias: b.p,
            grads: grads(w, b),
        };
        let linear = |name: String, w: &Param, b: &Param| Linear {
            name,
            weight: w.w,
            bias: b.p,
            grads: grads(w, b),
        };
        let block = |l: usize, b: &Block<Param>| BlockParams {
            ln_1: norm(format!("h.{l}.ln_1"), &b.ln_1_w, &b.ln_1_b),
            c_attn: linear(format!("h.{l}.attn.c_attn"), &b.c_attn_w, &b.c_attn_b),
            attn_proj: linear(format!("h.{l}.attn.c_proj"), &b.attn_proj_w, &b.attn_proj_b),
            ln_2: norm(format!("h.{l}.ln_2"), &b.ln_2_w, &b.ln_2_b),
            c_fc: linear(format!("h.{l}.mlp.c_fc"), &b.c_fc_w, &b.c_fc_b),
            mlp_proj: linear(format!("h.{l}.mlp.c_proj"), &b.mlp_proj_w, &b.mlp_proj_b),
        };
        Model {
            wte,
            wpe: p.wpe,
            h: p.h.iter().enumerate().map(|(l, b)| block(l, b)).collect(),
            ln_f: norm("ln_f".into(), &p.ln_f_w, &p.ln_f_b),
        }
    }

    /// The token table's pieces as the embedding reads them (f32).
    fn wte_tables(&self) -> Vec<TablePart> {
        let part = |(p, piece): &(Param, TablePiece)| TablePart {
            table: p.p,
            piece: *piece,
        };
        self.wte.iter().map(part).collect()
    }
}

/// Declares every parameter piece of `storage` as graph inputs: the master weights, the f16
/// copies when `half`, the gradients when `grads`.
fn declare_params<E: Clone>(
    g: &mut Graph<E>,
    cfg: &GptConfig,
    storage: &StorageLayout,
    half: bool,
    grads: bool,
    key: impl Fn(ParamInput) -> E,
) -> Result<Model> {
    let mut declare = |id: ParamId, k: usize, shape: &[usize]| -> Param {
        let name = format!("{} piece {k}", id.name());
        let mut input = |prefix: &str, dtype: DType, copy: ParamCopy| {
            let what = format!("{prefix} {name}");
            g.input(what, shape, dtype, key(ParamInput::Piece(id, k, copy)))
        };
        let p = input("param", DType::F32, ParamCopy::Master);
        let w = match half {
            true => input("param16", DType::F16, ParamCopy::Half),
            false => p,
        };
        let g = grads.then(|| input("grad", DType::F32, ParamCopy::Grad));
        Param { p, w, g }
    };
    let mut wte = Vec::new();
    for (k, piece) in storage.pieces.wte.iter().enumerate() {
        let table = TablePiece {
            first: piece.rows.start,
            total: cfg.padded_vocab_size,
        };
        wte.push((declare(ParamId::Wte, k, &piece.shape), table));
    }
    let whole = Gpt::try_new(cfg, |id| match storage.pieces.get(id).as_slice() {
        _ if id == ParamId::Wte => Ok(wte[0].0),
        [one] => Ok(declare(id, 0, &one.shape)),
        pieces => Err(Error::Other(format!(
            "{} is stored in {} pieces; only the token embedding may be split",
            id.name(),
            pieces.len()
        ))),
    })?;
    Ok(Model::new(&whole, wte))
}

/// What a block's backward reads from its forward.
struct Saved {
    x: TensorId,
    ln_1: Ln,
    qkv: TensorId,
    y: TensorId,
    att: AttentionSaved,
    x_mid: TensorId,
    ln_2: Ln,
    fc_pre: TensorId,
    fc: TensorId,
}

/// One transformer block, as nanoGPT's `Block.forward`:
/// `x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))`. Each residual sum is left to the next
/// LayerNorm, which forms it in the same kernel when fused.
fn block_forward<E: Clone>(
    g: &mut Builder<E>,
    x: Stream,
    p: &BlockParams,
    l: usize,
) -> (Stream, Saved) {
    let (x, ln_1) = g.layernorm(x, &p.ln_1);
    let qkv = g.linear(ln_1.out, &p.c_attn);
    let (y, att) = g.attention(qkv, l, &format!("h.{l}.attn"));
    let attn = g.linear(y, &p.attn_proj);
    let (x_mid, ln_2) = g.layernorm(Stream::Sum(x, attn), &p.ln_2);
    let (fc_pre, fc) = g.linear_gelu(ln_2.out, &p.c_fc);
    let mlp = g.linear(fc, &p.mlp_proj);
    let saved = Saved {
        x,
        ln_1,
        qkv,
        y,
        att,
        x_mid,
        ln_2,
        fc_pre,
        fc,
    };
    (Stream::Sum(x_mid, mlp), saved)
}

/// The block's backward, last layer first, as llm.c's `gpt2_backward`: `dx` is the residual
/// stream's gradient, which both LayerNorms' backward add into.
fn block_backward<E: Clone>(
    g: &mut Builder<E>,
    dx: TensorId,
    p: &BlockParams,
    s: &Saved,
    l: usize,
) -> Result<()> {
    // x = x_mid + mlp.c_proj(GELU(mlp.c_fc(ln_2(x_mid))))
    let dfc_pre = g.gelu_linear_backward(dx, s.fc, s.fc_pre, &p.mlp_proj)?;
    let dln_2 = g.linear_backward(dfc_pre, s.ln_2.out, &p.c_fc)?;
    g.layernorm_backward(dx, dln_2, s.x_mid, &s.ln_2, &p.ln_2)?;
    // x_mid = x + attn.c_proj(attention(attn.c_attn(ln_1(x))))
    let dy = g.linear_backward(dx, s.y, &p.attn_proj)?;
    let dqkv = g.attention_backward(dy, s.qkv, s.y, s.att, l, &format!("h.{l}.attn"))?;
    let dln_1 = g.linear_backward(dqkv, s.ln_1.out, &p.c_attn)?;
    g.layernorm_backward(dx, dln_1, s.x, &s.ln_1, &p.ln_1)
}

/// Rows of one classifier chunk: `start..start + rows` of the B*T positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub start: usize,
    pub rows: usize,
}

/// The classifier's chunks over `n` positions, `chunk_rows` at a time.
pub fn classifier_chunks(n: usize, chunk_rows: usize) -> Vec<Chunk> {
    let step = chunk_rows.max(1);
    (0..n)
        .step_by(step)
        .map(|start| Chunk {
            start,
            rows: step.min(n - start),
        })
        .collect()
}

/// The state a training step keeps in the graph, written and read by the trainer.
#[derive(Clone, Copy, Debug)]
pub struct StepIo {
    /// Per micro-step: token ids (B*T), targets (B*T), embedding-backward buckets.
    pub tokens: TensorId,
    pub targets: TensorId,
    pub buckets: TensorId,
    /// The classifier's logits for one chunk of rows: [chunk rows, padded vocab].
    pub logits: TensorId,
    /// [1] f32: d(loss)/d(per-position loss) = loss_scale / tokens per step, written by the
    /// previous step's state update.
    pub dloss: TensorId,
    /// [1] f32: the step's mean loss (accumulated over micro-steps).
    pub loss: TensorId,
    /// [B*T] f32: each position's loss in the latest micro-step (read by evaluations).
    pub losses: TensorId,
    /// [`optimizer::STATUS_LEN`] f32: gradient norm, clip coefficient, finite flag.
    pub status: TensorId,
    /// Inputs of the gradient norm (inverse loss scale, max norm).
    pub norm_scalars: TensorId,
    /// AdamW's hyperparameters: lr by the CPU each step, the bias corrections and inverse loss
    /// scale by the state update, the rest once.
    pub hyper: TensorId,
    /// [`optimizer::StepState`]: loss scaler and Adam's step count, kept on the GPU.
    pub state: TensorId,
    /// Adam's bias corrections per step ([`optimizer::bias_correction_table`]), written once.
    pub bias_table: TensorId,
}

/// The tied classifier over chunks of rows, so that the logits never exceed one chunk: for each
/// chunk, `logits = ln_f(x) @ wte^T` (one product per piece of wte, each writing its columns),
/// the loss and its gradient in place, then `dln_f = dlogits @ wte` and
/// `dwte += dlogits^T @ ln_f(x)`, piece by piece. Returns `dln_f`.
fn tied_classifier(
    b: &mut Builder<ParamInput>,
    lnf: TensorId,
    model: &Model,
    io: &StepIo,
    chunk_rows: usize,
    vocab: usize,
) -> Result<TensorId> {
    let (n, c) = (b.rows, b.c);
    let vp = b.g.shape(io.logits)[1];
    let dlnf = b.g.planned("d ln_f out", &[n, c], b.act);
    let chunks = classifier_chunks(n, chunk_rows);
    let split = chunks.len() > 1 || model.wte.len() > 1;
    let g = &mut b.g;
    for Chunk { start, rows } in chunks {
        let at = |what: &str, k: usize| match split {
            true => format!("lm_head.{what}[rows {start}+{rows}, piece {k}]"),
            false => format!("lm_head.{what}"),
        };
        let logits = g.view(io.logits, 0, &[rows, vp]);
        let x = g.view(lnf, start * c, &[rows, c]);
        let dx = g.view(dlnf, start * c, &[rows, c]);
        let losses = g.view(io.losses, start, &[rows]);
        let targets = g.view(io.targets, start, &[rows]);
        // The chunk's logits and loss are forward, its products into d(ln_f) and wte backward.
        g.phase(Phase::Forward);
        for (k, (w, piece)) in model.wte.iter().enumerate() {
            let op = Op::Linear {
                out: logits,
                inp: x,
                weight: w.w,
                bias: None,
                gelu_pre: None,
                out_columns: Some(piece.first),
            };
            g.push(at("forward", k), op);
        }
        let label = match split {
            true => format!("crossentropy.forward_backward[rows {start}+{rows}]"),
            false => "crossentropy.forward_backward".into(),
        };
        let op = Op::CrossEntropy {
            losses,
            logits,
            targets,
            dloss: io.dloss,
            vocab,
        };
        g.push(label, op);
        g.phase(Phase::Backward);
        for (k, (w, piece)) in model.wte.iter().enumerate() {
            // Split-K over the vocabulary when the chunk's rows make few tiles: more workgroups,
            // and slices of a few thousand vocabulary rows whose partials meet the target's
            // large term only at the end (see ops/matmul/split.rs: one f32 run over 50,257 rows
            // made GPT-2's f32 updates 5 times a plain f32 implementation's error).
            let len = matmul_backward_input_scratch_len(rows, c, g.shape(w.w)[0]);
            let partials = (len > 0).then(|| {
                let name = format!("{} partials", at("backward_input", k));
                g.planned(name, &[len], DType::F32)
            });
            let op = Op::LinearBackwardInput {
                din: dx,
                dout: logits,
                weight: w.w,
                gelu_pre: None,
                dout_columns: Some(piece.first),
                accumulate: k > 0,
                partials,
            };
            g.push(at("backward_input", k), op);
        }
        for (k, (w, piece)) in model.wte.iter().enumerate() {
            let dweight =
                w.g.ok_or_else(|| Error::Other("wte has no gradient".into()))?;
            let op = Op::LinearBackwardWeight {
                dweight,
                dbias: None,
                dout: logits,
                inp: x,
                dout_columns: Some(piece.first),
                partials: None,
            };
            g.push(at("backward_weight", k), op);
        }
    }
    g.phase(Phase::Forward);
    Ok(dlnf)
}

/// Builds the whole training step of `cfg` for parameters stored as `storage`, the classifier
/// working on `chunk_rows` positions at a time.
pub fn train_graph(
    s: &StepShape,
    cfg: &GptConfig,
    storage: &StorageLayout,
    chunk_rows: usize,
) -> Result<(Graph<ParamInput>, StepIo)> {
    let (bsz, t, c) = (s.batch, s.seq, cfg.n_embd);
    let n = bsz * t;
    let half = s.precision == Precision::F16;
    let mut g = Graph::new(s.grad_accum);
    let model = declare_params(&mut g, cfg, storage, half, true, |k| k)?;
    let act = if half { DType::F16 } else { DType::F32 };
    let f32s =
        |g: &mut Graph<ParamInput>, name: &str, len: usize| g.state(name, &[len], DType::F32);
    let io = StepIo {
        tokens: g.per_micro("tokens", &[n], DType::U32),
        targets: g.per_micro("targets", &[n], DType::U32),
        buckets: g.per_micro(
            "buckets",
            &[embedding::embedding_buckets_len(n)],
            DType::U32,
        ),
        logits: g.state("logits", &[chunk_rows, cfg.padded_vocab_size], act),
        dloss: f32s(&mut g, "dloss", 1),
        loss: f32s(&mut g, "loss", 1),
        losses: f32s(&mut g, "losses", n),
        status: f32s(&mut g, "status", optimizer::STATUS_LEN),
        norm_scalars: f32s(&mut g, "norm scalars", optimizer::GradNormScalars::LEN),
        hyper: f32s(&mut g, "adamw hyper", optimizer::AdamWHyper::LEN),
        state: g.state("step state", &[optimizer::StepState::LEN], DType::U32),
        bias_table: {
            let (b1, b2) = s.adam_betas;
            let len = optimizer::bias_correction_table(b1, b2).len();
            f32s(&mut g, "bias corrections", len)
        },
    };
    // Whole storage buffers of one copy, for zeroing, the norm and AdamW.
    let buffer = |g: &mut Graph<ParamInput>, copy: ParamCopy, k: usize| {
        let dtype = if copy == ParamCopy::Half {
            DType::F16
        } else {
            DType::F32
        };
        let name = format!("{copy:?} buffer {k}");
        g.input(
            name,
            &[storage.buffers[k].len],
            dtype,
            ParamInput::Buffer(copy, k),
        )
    };
    let grads: Vec<TensorId> = (0..storage.buffers.len())
        .map(|k| buffer(&mut g, ParamCopy::Grad, k))
        .collect();

    // ---------------------------------------------------------------- head: clear accumulators
    g.section(Section::Head);
    for (k, &out) in grads.iter().enumerate() {
        g.push(format!("zero grads {k}"), Op::Fill { out, value: 0.0 });
    }
    g.push(
        "zero loss",
        Op::Fill {
            out: io.loss,
            value: 0.0,
        },
    );

    // ---------------------------------------------------------------- body: forward
    g.section(Section::Body);
    let heads = Heads {
        b: bsz,
        t,
        nh: cfg.n_head,
    };
    let mut b = Builder {
        g,
        act,
        fused: s.fused,
        rows: n,
        c,
        attention: match s.attention {
            AttentionKind::Flash => AttentionMode::Flash(heads),
            AttentionKind::Naive => AttentionMode::Naive(heads),
        },
    };
    let emb = b.g.planned("embedding out", &[n, c], DType::F32);
    let op = Op::Embedding {
        out: emb,
        tokens: io.tokens,
        wte: model.wte_tables(),
        wpe: model.wpe.p,
        b: bsz,
        t,
    };
    b.g.push("embedding.forward", op);
    let mut x = Stream::Tensor(emb);
    let mut saved = Vec::with_capacity(model.h.len());
    for (l, block) in model.h.iter().enumerate() {
        let (out, s) = block_forward(&mut b, x, block, l);
        x = out;
        saved.push(s);
    }
    let (x, ln_f) = b.layernorm(x, &model.ln_f);
    let dlnf = tied_classifier(&mut b, ln_f.out, &model, &io, chunk_rows, cfg.vocab_size)?;
    // Over all ranks: their sum is the mean over the step's tokens.
    let scale = 1.0 / s.tokens_per_step as f32;
    let op = Op::LossMean {
        loss: io.loss,
        losses: io.losses,
        scale,
    };
    b.g.push("loss.mean", op);

    // ---------------------------------------------------------------- body: backward
    b.g.phase(Phase::Backward);
    // The residual stream's gradient: every LayerNorm backward adds into it.
    let dx = b.g.planned("d residual", &[n, c], DType::F32);
    b.g.push(
        "d residual.zero",
        Op::Fill {
            out: dx,
            value: 0.0,
        },
    );
    b.layernorm_backward(dx, dlnf, x, &ln_f, &model.ln_f)?;
    for (l, block) in model.h.iter().enumerate().rev() {
        block_backward(&mut b, dx, block, &saved[l], l)?;
    }
    let dwte = model.wte.iter().map(|(w, piece)| {
        let table =
            w.g.ok_or_else(|| Error::Other("wte has no gradient".into()))?;
        Ok(TablePart {
            table,
            piece: *piece,
        })
    });
    let op = Op::EmbeddingBackward {
        dout: dx,
        buckets: io.buckets,
        dwte: dwte.collect::<Result<_>>()?,
        dwpe: model
            .wpe
            .g
            .ok_or_else(|| Error::Other("wpe has no gradient".into()))?,
        b: bsz,
        t,
    };
    b.g.push("embedding.backward", op);

    // ---------------------------------------------------------------- tail: norm, clip, AdamW
    let mut g = b.g;
    g.section(Section::Tail);
    optimizer_step(&mut g, s, storage, &grads, &io);
    Ok((g, io))
}

/// The gradient norm and clip factor, AdamW over every storage buffer (one dispatch per buffer
/// when fused, else one per tensor piece), and the step state's update.
fn optimizer_step(
    g: &mut Graph<ParamInput>,
    s: &StepShape,
    storage: &StorageLayout,
    grads: &[TensorId],
    io: &StepIo,
) {
    let lens: Vec<usize> = storage.buffers.iter().map(|b| b.len).collect();
    let scratch_len = optimizer::grad_norm_scratch_len(&lens);
    let scratch = g.planned("norm partials", &[scratch_len], DType::F32);
    let op = Op::GradNorm {
        status: io.status,
        grads: grads.to_vec(),
        scratch,
        scalars: io.norm_scalars,
    };
    g.push("grad_norm", op);
    let half = s.precision == Precision::F16;
    let nbuf = storage.buffers.len();
    for (k, sb) in storage.buffers.iter().enumerate() {
        let mut buffer = |copy: ParamCopy| {
            let dtype = if copy == ParamCopy::Half {
                DType::F16
            } else {
                DType::F32
            };
            let name = format!("{copy:?} buffer {k}");
            g.input(name, &[sb.len], dtype, ParamInput::Buffer(copy, k))
        };
        let params = buffer(ParamCopy::Master);
        let m = buffer(ParamCopy::AdamM);
        let v = buffer(ParamCopy::AdamV);
        let half_k = half.then(|| buffer(ParamCopy::Half));
        // (label, offset, length, decayed prefix) of each AdamW dispatch over this buffer.
        let spans: Vec<(String, usize, usize, usize)> = if s.fused_optimizer {
            let label = match nbuf {
                1 => "adamw".to_string(),
                _ => format!("adamw buffer {k}"),
            };
            vec![(label, 0, sb.len, sb.n_decay)]
        } else {
            let mut spans = Vec::new();
            for (id, pieces) in storage.pieces.iter() {
                for (j, piece) in pieces.iter().enumerate().filter(|(_, p)| p.buffer == k) {
                    let label = match pieces.len() {
                        1 => format!("adamw {}", id.name()),
                        _ => format!("adamw {} piece {j}", id.name()),
                    };
                    let decay = if id.decayed() { piece.len() } else { 0 };
                    spans.push((label, piece.offset, piece.len(), decay));
                }
            }
            spans
        };
        for (label, offset, len, n_decay) in spans {
            let mut span = |t: TensorId| g.view(t, offset, &[len]);
            let span = AdamSpan {
                params: span(params),
                grads: span(grads[k]),
                m: span(m),
                v: span(v),
                half: half_k.map(&mut span),
                n_decay,
            };
            let op = Op::AdamW {
                span,
                status: io.status,
                hyper: io.hyper,
            };
            g.push(label, op);
        }
    }
    // Last: the loss scaler and Adam's step count advance on the GPU, and the next step's
    // scalars are written, so that the next step can be queued before this one has finished.
    let op = Op::AdvanceStepState {
        state: io.state,
        status: io.status,
        bias_table: io.bias_table,
        dloss: io.dloss,
        norm_scalars: io.norm_scalars,
        hyper: io.hyper,
        growth_interval: LOSS_SCALE_GROWTH_INTERVAL,
        scaling: half,
    };
    g.push("step state", op);
}

/// The state a decoding step keeps in the graph.
#[derive(Clone, Debug)]
pub struct DecodeIo {
    /// [samples] u32: each sample's token at the step's position, and the one sampled after it.
    pub tokens_in: TensorId,
    pub tokens_out: TensorId,
    /// [samples] f32: the uniform draws the sampler turns into tokens.
    pub uniforms: TensorId,
    /// [samples, padded vocab] f32.
    pub logits: TensorId,
}

/// One decoding step of `cfg` for `dims.s` samples at once, from the f32 weights stored as
/// `storage`: each sample's token at the position in `step` through the same blocks as
/// training (attention against each layer's key/value cache), the tied classifier and top-k
/// sampling.
pub fn decode_graph(
    cfg: &GptConfig,
    storage: &StorageLayout,
    dims: DecodeDims,
    step: Uniform,
) -> Result<(Graph<ParamInput>, DecodeIo)> {
    let (s, c) = (dims.s, dims.c);
    let mut g = Graph::new(1);
    let model = declare_params(&mut g, cfg, storage, false, false, |k| k)?;
    let io = DecodeIo {
        tokens_in: g.state("tokens in", &[s], DType::U32),
        tokens_out: g.state("tokens out", &[s], DType::U32),
        uniforms: g.state("uniforms", &[s], DType::F32),
        logits: g.state("logits", &[s, dims.vp], DType::F32),
    };
    let cache = [cfg.block_size, s, 3 * c];
    let caches = (0..cfg.n_layer)
        .map(|l| g.state(format!("h.{l}.kv cache"), &cache, DType::F32))
        .collect();
    let mut b = Builder {
        g,
        act: DType::F32,
        fused: true,
        rows: s,
        c,
        attention: AttentionMode::Decode {
            caches,
            dims,
            step: step.clone(),
        },
    };
    let emb = b.g.planned("embedding", &[s, c], DType::F32);
    let op = Op::EmbeddingAt {
        out: emb,
        tokens: io.tokens_in,
        wte: model.wte_tables(),
        wpe: model.wpe.p,
        dims,
        step: step.clone(),
    };
    b.g.push("embedding_at", op);
    let mut x = Stream::Tensor(emb);
    for (l, block) in model.h.iter().enumerate() {
        x = block_forward(&mut b, x, block, l).0;
    }
    let (_, ln_f) = b.layernorm(x, &model.ln_f);
    let mut g = b.g;
    for (k, (w, piece)) in model.wte.iter().enumerate() {
        let label = match model.wte.len() {
            1 => "lm_head.forward".to_string(),
            _ => format!("lm_head.forward[piece {k}]"),
        };
        let op = Op::Linear {
            out: io.logits,
            inp: ln_f.out,
            weight: w.w,
            bias: None,
            gelu_pre: None,
            out_columns: Some(piece.first),
        };
        g.push(label, op);
    }
    let op = Op::TopkSample {
        tokens: io.tokens_out,
        logits: io.logits,
        uniforms: io.uniforms,
        dims,
        step,
    };
    g.push("topk_sample", op);
    Ok((g, io))
}
