//! GPT-2's training step as a graph: forward, loss, backward, gradient norm and AdamW.
//! This file is the one place where the model's data flow can be read, top to bottom.
//!
//! The graph is built without a device, from the run's settings, the parameters' storage layout
//! and the classifier's chunk size; the tensors the trainer owns are named by [`StepInput`] and
//! bound when the graph is compiled.

use super::{Graph, Phase, Section, TensorId};
use crate::error::{Error, Result};
use crate::gpu::DType;
use crate::model::{Gpt, GptConfig, ParamId, StorageLayout};
use crate::ops::embedding::TablePiece;
use crate::ops::matmul::{MatmulBackwardInput, MatmulBackwardWeight, MatmulForward};
use crate::ops::{
    attention, crossentropy, elementwise as ew, embedding, layernorm, matmul, optimizer,
};
use crate::train::settings::{AttentionKind, Precision, TrainSettings, ADAM_BETAS};
use crate::train::trainer::LossScaler;

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

/// The tensors of a training step that the trainer owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepInput {
    /// Piece `k` of parameter `id` in one copy.
    Param(ParamId, usize, ParamCopy),
    /// Storage buffer `k` of one copy, whole (zeroing, the gradient norm, AdamW).
    Buffer(ParamCopy, usize),
    /// Per micro-step: token ids (B*T), targets (B*T), embedding-backward buckets.
    Tokens,
    Targets,
    Buckets,
    /// The classifier's logits for one chunk of rows: [chunk rows, padded vocab].
    Logits,
    /// [1] f32: d(loss)/d(per-position loss) = loss_scale / (ranks*B*T*grad_accum), written by the
    /// previous step's state update.
    Dloss,
    /// [1] f32: the step's mean loss (accumulated over micro-steps).
    Loss,
    /// [B*T] f32: each position's loss in the latest micro-step (read by evaluations).
    Losses,
    /// [4] f32: gradient norm, clip coefficient, finite flag (written by the norm kernel).
    Status,
    /// Inputs of the gradient norm (inverse loss scale, max norm): the scale's by the state
    /// update, the max norm once.
    NormScalars,
    /// AdamW hyperparameters: lr by the CPU each step, the bias corrections and inverse loss
    /// scale by the state update, the rest once.
    Hyper,
    /// [`optimizer::StepState`]: loss scaler and Adam's step count, kept on the GPU.
    State,
    /// Adam's bias corrections per step ([`optimizer::bias_correction_table`]).
    BiasTable,
}

/// Views of one parameter piece.
#[derive(Clone, Copy, Debug)]
struct ParamIds {
    /// f32 master weight (LayerNorm, biases, embeddings read it).
    p: TensorId,
    /// What matmuls read: the f16 copy in mixed precision, else the master weight.
    w: TensorId,
    /// Gradient.
    g: TensorId,
}

/// One row piece of the tied embedding.
#[derive(Clone, Copy, Debug)]
struct TablePart {
    ids: ParamIds,
    piece: TablePiece,
    /// Rows in this piece.
    rows: usize,
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

/// Declares every parameter piece of `storage` as graph inputs (master, matmul copy, gradient).
fn declare_params(
    g: &mut Graph<StepInput>,
    cfg: &GptConfig,
    storage: &StorageLayout,
    half: bool,
) -> Result<(Gpt<ParamIds>, Vec<TablePart>)> {
    let mut declare = |id: ParamId, k: usize, shape: &[usize]| -> ParamIds {
        let name = format!("{} piece {k}", id.name());
        let p = g.input(
            format!("param {name}"),
            shape,
            DType::F32,
            StepInput::Param(id, k, ParamCopy::Master),
        );
        let w = if half {
            g.input(
                format!("param16 {name}"),
                shape,
                DType::F16,
                StepInput::Param(id, k, ParamCopy::Half),
            )
        } else {
            p
        };
        let gr = g.input(
            format!("grad {name}"),
            shape,
            DType::F32,
            StepInput::Param(id, k, ParamCopy::Grad),
        );
        ParamIds { p, w, g: gr }
    };
    let mut table = Vec::new();
    for (k, piece) in storage.pieces.wte.iter().enumerate() {
        table.push(TablePart {
            ids: declare(ParamId::Wte, k, &piece.shape),
            piece: TablePiece {
                first: piece.rows.start,
                total: cfg.padded_vocab_size,
            },
            rows: piece.rows.len(),
        });
    }
    let whole = Gpt::try_new(cfg, |id| match storage.pieces.get(id).as_slice() {
        _ if id == ParamId::Wte => Ok(table[0].ids),
        [one] => Ok(declare(id, 0, &one.shape)),
        pieces => Err(Error::Other(format!(
            "{} is stored in {} pieces; only the token embedding may be split",
            id.name(),
            pieces.len()
        ))),
    })?;
    Ok((whole, table))
}

/// Builds the whole training step for parameters stored as `storage`, the classifier working on
/// `chunk_rows` positions at a time.
pub fn build_train_graph(
    s: &TrainSettings,
    storage: &StorageLayout,
    chunk_rows: usize,
) -> Result<Graph<StepInput>> {
    let cfg: &GptConfig = &s.config;
    let (b, t, c, nh, l) = (s.batch_size, s.seq_len, cfg.n_embd, cfg.n_head, cfg.n_layer);
    let (v, vp) = (cfg.vocab_size, cfg.padded_vocab_size);
    let n = b * t;
    let hs = cfg.head_size();
    let fused = s.fused;
    // Activation dtype: what matmuls read and write.
    let act = match s.precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
    };
    let mut g = Graph::new(s.grad_accum);
    let (p, wte) = declare_params(&mut g, cfg, storage, s.precision == Precision::F16)?;
    let wpe = p.wpe;

    let tokens = g.per_micro("tokens", &[n], DType::U32, StepInput::Tokens);
    let targets = g.per_micro("targets", &[n], DType::U32, StepInput::Targets);
    let buckets = g.per_micro(
        "buckets",
        &[embedding::embedding_buckets_len(n)],
        DType::U32,
        StepInput::Buckets,
    );
    let dloss = g.input("dloss", &[1], DType::F32, StepInput::Dloss);
    let loss = g.input("loss", &[1], DType::F32, StepInput::Loss);
    let status = g.input(
        "status",
        &[optimizer::STATUS_LEN],
        DType::F32,
        StepInput::Status,
    );
    let norm_scalars = g.input(
        "norm scalars",
        &[optimizer::GradNormScalars::LEN],
        DType::F32,
        StepInput::NormScalars,
    );
    let hyper = g.input(
        "adamw hyper",
        &[optimizer::AdamWHyper::LEN],
        DType::F32,
        StepInput::Hyper,
    );
    let state = g.input(
        "step state",
        &[optimizer::StepState::LEN],
        DType::U32,
        StepInput::State,
    );
    let bias_table = g.input(
        "bias corrections",
        &[optimizer::bias_correction_table(ADAM_BETAS.0, ADAM_BETAS.1).len()],
        DType::F32,
        StepInput::BiasTable,
    );
    // Whole storage buffers, for the per-buffer passes of the optimiser.
    let buffer = |g: &mut Graph<StepInput>, copy: ParamCopy, k: usize, dtype: DType| {
        let len = storage.buffers[k].len;
        g.input(
            format!("{copy:?} buffer {k}"),
            &[len],
            dtype,
            StepInput::Buffer(copy, k),
        )
    };
    let nbuf = storage.buffers.len();
    let grads_all: Vec<TensorId> = (0..nbuf)
        .map(|k| buffer(&mut g, ParamCopy::Grad, k, DType::F32))
        .collect();

    // ---------------------------------------------------------------- head: clear accumulators
    g.section(Section::Head);
    for (k, &grads) in grads_all.iter().enumerate() {
        g.node(
            format!("zero grads {k}"),
            "optimizer",
            &[],
            &[grads],
            0.0,
            move |gpu, r| Ok(vec![ew::fill(gpu, r.t(grads), 0.0)?]),
        );
    }
    g.node("zero loss", "loss", &[], &[loss], 0.0, move |gpu, r| {
        Ok(vec![ew::fill(gpu, r.t(loss), 0.0)?])
    });

    // ---------------------------------------------------------------- body: forward
    g.section(Section::Body);
    let mm = |m: usize, k: usize, nn: usize| matmul::matmul_flops(m, k, nn);

    let emb = g.planned("embedding out", &[n, c], DType::F32);
    {
        let mut reads = vec![tokens, wpe.p];
        reads.extend(wte.iter().map(|part| part.ids.p));
        let parts = wte.clone();
        g.node(
            "embedding.forward",
            "embedding",
            &reads,
            &[emb],
            0.0,
            move |gpu, r| {
                parts
                    .iter()
                    .map(|part| {
                        embedding::embedding_forward(
                            gpu,
                            &embedding::EmbeddingForward {
                                out: r.t(emb),
                                tokens: r.t(tokens),
                                wte: r.t(part.ids.p),
                                piece: part.piece,
                                wpe: r.t(wpe.p),
                                b,
                                t,
                            },
                        )
                    })
                    .collect()
            },
        );
    }

    // Saved activations per layer, for the backward pass.
    struct Saved {
        res_in: TensorId,
        ln1: TensorId,
        ln1_mean: TensorId,
        ln1_rstd: TensorId,
        qkv: TensorId,
        atty: TensorId,
        /// lse [B, NH, T] (flash) or probabilities [B, NH, T, T] (naive).
        att_stats: TensorId,
        res_mid: TensorId,
        ln2: TensorId,
        ln2_mean: TensorId,
        ln2_rstd: TensorId,
        fc_pre: TensorId,
        fc_gelu: TensorId,
    }
    let mut saved: Vec<Saved> = Vec::with_capacity(l);
    let mut res = emb;
    // With fusion, each layer's first LayerNorm is computed together with the previous residual.
    let mut pending_ln1: Option<Ln> = None;
    for (i, bl) in p.h.iter().enumerate() {
        let name = |s: &str| format!("h.{i}.{s}");
        let Ln {
            out: ln1,
            mean: ln1_mean,
            rstd: ln1_rstd,
        } = match pending_ln1.take() {
            Some(x) => x,
            None => {
                let ln = ln_tensors(&mut g, &name("ln_1"), n, c, act);
                layernorm_node(&mut g, &name("ln_1"), ln, res, bl.ln_1_w.p, bl.ln_1_b.p);
                ln
            }
        };
        // attention
        let qkv = g.planned(name("qkv"), &[n, 3 * c], act);
        let (w, bb) = (bl.c_attn_w.w, bl.c_attn_b.p);
        linear_forward(
            &mut g,
            name("attn.c_attn.forward"),
            ln1,
            w,
            Some(bb),
            None,
            qkv,
            mm(n, c, 3 * c),
        );
        let atty = g.planned(name("attention out"), &[n, c], act);
        let att_flops = attention::attention_flops(b, t, nh, hs) as f64;
        let att_stats = match s.attention {
            AttentionKind::Flash => {
                let lse = g.planned(name("attention lse"), &[b, nh, t], DType::F32);
                g.node(
                    name("attn.flash.forward"),
                    "attention",
                    &[qkv],
                    &[atty, lse],
                    att_flops,
                    // f16 runs on cooperative matrices where the self-check passed.
                    move |gpu, r| {
                        attention::attention_forward(gpu, r.t(atty), r.t(lse), r.t(qkv), b, t, nh)
                    },
                );
                lse
            }
            AttentionKind::Naive => {
                let att = g.planned(name("attention probs"), &[b, nh, t, t], DType::F32);
                g.node(
                    name("attn.naive.forward"),
                    "attention",
                    &[qkv],
                    &[atty, att],
                    att_flops,
                    move |gpu, r| {
                        attention::naive_attention_forward(
                            gpu,
                            r.t(atty),
                            r.t(att),
                            r.t(qkv),
                            b,
                            t,
                            nh,
                        )
                    },
                );
                att
            }
        };
        let proj = g.planned(name("attn.c_proj out"), &[n, c], act);
        let (w, bb) = (bl.attn_proj_w.w, bl.attn_proj_b.p);
        linear_forward(
            &mut g,
            name("attn.c_proj.forward"),
            atty,
            w,
            Some(bb),
            None,
            proj,
            mm(n, c, c),
        );
        // residual + ln_2
        let res_mid = g.planned(name("residual mid"), &[n, c], DType::F32);
        let ln2s = ln_tensors(&mut g, &name("ln_2"), n, c, act);
        let Ln {
            out: ln2,
            mean: ln2_mean,
            rstd: ln2_rstd,
        } = ln2s;
        let (w, bb) = (bl.ln_2_w.p, bl.ln_2_b.p);
        residual_layernorm(
            &mut g,
            fused,
            &name("ln_2"),
            res,
            proj,
            res_mid,
            ln2s,
            w,
            bb,
        );
        // MLP
        let fc_pre = g.planned(name("mlp.c_fc out"), &[n, 4 * c], act);
        let fc_gelu = g.planned(name("mlp.gelu out"), &[n, 4 * c], act);
        let (w, bb) = (bl.c_fc_w.w, bl.c_fc_b.p);
        if fused {
            let flops = mm(n, c, 4 * c);
            let what = name("mlp.c_fc+gelu.forward");
            linear_forward(&mut g, what, ln2, w, Some(bb), Some(fc_pre), fc_gelu, flops);
        } else {
            let flops = mm(n, c, 4 * c);
            linear_forward(
                &mut g,
                name("mlp.c_fc.forward"),
                ln2,
                w,
                Some(bb),
                None,
                fc_pre,
                flops,
            );
            g.node(
                name("mlp.gelu.forward"),
                "elementwise",
                &[fc_pre],
                &[fc_gelu],
                0.0,
                move |gpu, r| Ok(vec![ew::gelu_forward(gpu, r.t(fc_gelu), r.t(fc_pre))?]),
            );
        }
        let mlp_out = g.planned(name("mlp.c_proj out"), &[n, c], act);
        let (w, bb) = (bl.mlp_proj_w.w, bl.mlp_proj_b.p);
        linear_forward(
            &mut g,
            name("mlp.c_proj.forward"),
            fc_gelu,
            w,
            Some(bb),
            None,
            mlp_out,
            mm(n, 4 * c, c),
        );
        let res_out = g.planned(name("residual out"), &[n, c], DType::F32);
        if fused {
            // Fuse this residual with the next LayerNorm (the next block's ln_1, or ln_f).
            let (nw, nb, what) = match p.h.get(i + 1) {
                Some(next) => (next.ln_1_w.p, next.ln_1_b.p, format!("h.{}.ln_1", i + 1)),
                None => (p.ln_f_w.p, p.ln_f_b.p, "ln_f".to_string()),
            };
            let ln = ln_tensors(&mut g, &what, n, c, act);
            residual_layernorm(&mut g, true, &what, res_mid, mlp_out, res_out, ln, nw, nb);
            pending_ln1 = Some(ln);
        } else {
            g.node(
                name("residual.forward"),
                "elementwise",
                &[res_mid, mlp_out],
                &[res_out],
                0.0,
                move |gpu, r| {
                    Ok(vec![ew::residual_forward(
                        gpu,
                        r.t(res_out),
                        r.t(res_mid),
                        r.t(mlp_out),
                    )?])
                },
            );
        }
        saved.push(Saved {
            res_in: res,
            ln1,
            ln1_mean,
            ln1_rstd,
            qkv,
            atty,
            att_stats,
            res_mid,
            ln2,
            ln2_mean,
            ln2_rstd,
            fc_pre,
            fc_gelu,
        });
        res = res_out;
    }
    let Ln {
        out: lnf,
        mean: lnf_mean,
        rstd: lnf_rstd,
    } = match pending_ln1.take() {
        Some(x) => x,
        None => {
            let ln = ln_tensors(&mut g, "ln_f", n, c, act);
            layernorm_node(&mut g, "ln_f", ln, res, p.ln_f_w.p, p.ln_f_b.p);
            ln
        }
    };
    // The classifier, tied to wte, over chunks of rows so that the logits never exceed one
    // chunk: for each chunk, logits = ln_f(x) @ wte^T (one product per piece of wte, each writing
    // its columns), the loss and dlogits in place, then dln_f = dlogits @ wte and
    // dwte += dlogits^T @ ln_f(x), piece by piece.
    let logits = g.input("logits", &[chunk_rows, vp], act, StepInput::Logits);
    let losses = g.input("losses", &[n], DType::F32, StepInput::Losses);
    let dlnf = g.planned("d ln_f out", &[n, c], act);
    let chunks = classifier_chunks(n, chunk_rows);
    let split = chunks.len() > 1 || wte.len() > 1;
    for chunk in chunks.iter().copied() {
        // The chunk's logits and loss are forward, its products into d(ln_f) and wte backward.
        g.phase(Phase::Forward);
        let at = |what: &str, k: usize| {
            if split {
                format!(
                    "lm_head.{what}[rows {}+{}, piece {k}]",
                    chunk.start, chunk.rows
                )
            } else {
                format!("lm_head.{what}")
            }
        };
        let Chunk { start, rows } = chunk;
        for (k, part) in wte.iter().copied().enumerate() {
            g.node(
                at("forward", k),
                "matmul",
                &[lnf, part.ids.w],
                &[logits],
                mm(rows, c, part.rows),
                move |gpu, r| {
                    let align = gpu.alignment();
                    let o = MatmulForward {
                        out_columns: Some(part.piece.first),
                        ..Default::default()
                    };
                    Ok(vec![matmul::matmul_forward(
                        gpu,
                        &r.t(logits).slice(0, &[rows, vp], align)?,
                        &r.t(lnf).slice(start * c, &[rows, c], align)?,
                        r.t(part.ids.w),
                        &o,
                    )?])
                },
            );
        }
        // Loss, and its gradient written over the logits.
        let ce = if split {
            format!("crossentropy.forward_backward[rows {start}+{rows}]")
        } else {
            "crossentropy.forward_backward".into()
        };
        g.node(
            ce,
            "loss",
            &[targets, dloss, logits],
            &[logits, losses],
            0.0,
            move |gpu, r| {
                let align = gpu.alignment();
                Ok(vec![crossentropy::crossentropy_forward_backward(
                    gpu,
                    &r.t(losses).slice(start, &[rows], align)?,
                    &r.t(logits).slice(0, &[rows, vp], align)?,
                    &r.t(targets).slice(start, &[rows], align)?,
                    r.t(dloss),
                    v,
                    true,
                )?])
            },
        );
        g.phase(Phase::Backward);
        for (k, part) in wte.iter().copied().enumerate() {
            let mut reads = vec![logits, part.ids.w];
            if k > 0 {
                reads.push(dlnf);
            }
            // Split-K over the vocabulary when the chunk's rows make few tiles: more workgroups,
            // and slices of a few thousand vocabulary rows whose partials meet the target's
            // large term only at the end (see ops/matmul/split.rs: one f32 run over 50,257 rows
            // made GPT-2's f32 updates 5 times a plain f32 implementation's error).
            let split_len = matmul::matmul_backward_input_scratch_len(rows, c, part.rows);
            let partials = (split_len > 0).then(|| {
                g.planned(
                    format!("{} partials", at("backward_input", k)),
                    &[split_len],
                    DType::F32,
                )
            });
            let mut writes = vec![dlnf];
            writes.extend(partials);
            g.node(
                at("backward_input", k),
                "matmul",
                &reads,
                &writes,
                mm(rows, part.rows, c),
                move |gpu, r| {
                    let align = gpu.alignment();
                    let o = MatmulBackwardInput {
                        dout_columns: Some(part.piece.first),
                        accumulate: k > 0,
                        ..Default::default()
                    };
                    matmul::matmul_backward_input_split(
                        gpu,
                        &r.t(dlnf).slice(start * c, &[rows, c], align)?,
                        &r.t(logits).slice(0, &[rows, vp], align)?,
                        r.t(part.ids.w),
                        partials.map(|s| r.t(s)),
                        &o,
                    )
                },
            );
        }
        for (k, part) in wte.iter().copied().enumerate() {
            let gw = part.ids.g;
            g.node(
                at("backward_weight", k),
                "matmul",
                &[logits, lnf, gw],
                &[gw],
                mm(part.rows, rows, c),
                move |gpu, r| {
                    let align = gpu.alignment();
                    let o = MatmulBackwardWeight {
                        dout_columns: Some(part.piece.first),
                        accumulate: true,
                        ..Default::default()
                    };
                    Ok(vec![matmul::matmul_backward_weight(
                        gpu,
                        r.t(gw),
                        &r.t(logits).slice(0, &[rows, vp], align)?,
                        &r.t(lnf).slice(start * c, &[rows, c], align)?,
                        &o,
                    )?])
                },
            );
        }
    }
    g.phase(Phase::Forward);
    // Over all ranks: their sum is the mean over the step's tokens.
    let inv = 1.0 / s.tokens_per_step() as f32;
    g.node(
        "loss.mean",
        "loss",
        &[losses, loss],
        &[loss],
        0.0,
        move |gpu, r| {
            Ok(vec![crossentropy::loss_mean(
                gpu,
                r.t(loss),
                r.t(losses),
                inv,
                true,
            )?])
        },
    );

    // ---------------------------------------------------------------- body: backward
    g.phase(Phase::Backward);
    // The residual stream's gradient: every LayerNorm backward adds into it.
    let dres = g.planned("d residual", &[n, c], DType::F32);
    g.node(
        "d residual.zero",
        "elementwise",
        &[],
        &[dres],
        0.0,
        move |gpu, r| Ok(vec![ew::fill(gpu, r.t(dres), 0.0)?]),
    );
    layernorm_backward(
        &mut g, "ln_f", dres, &p.ln_f_w, &p.ln_f_b, dlnf, res, lnf_mean, lnf_rstd, n, c,
    );
    for (i, bl) in p.h.iter().enumerate().rev() {
        let sv = &saved[i];
        let name = |s: &str| format!("h.{i}.{s}");
        // mlp.c_proj (+ the GELU before it)
        let dfc_pre = g.planned(name("d mlp.c_fc out"), &[n, 4 * c], act);
        let (w, fc_pre, fc_gelu) = (bl.mlp_proj_w.w, sv.fc_pre, sv.fc_gelu);
        if fused {
            let what = name("mlp.c_proj+gelu.backward_input");
            let flops = mm(n, c, 4 * c);
            linear_backward_input(&mut g, what, dres, w, Some(fc_pre), dfc_pre, flops);
        } else {
            let dgelu = g.planned(name("d mlp.gelu out"), &[n, 4 * c], act);
            let what = name("mlp.c_proj.backward_input");
            linear_backward_input(&mut g, what, dres, w, None, dgelu, mm(n, c, 4 * c));
            g.node(
                name("mlp.gelu.backward"),
                "elementwise",
                &[fc_pre, dgelu],
                &[dfc_pre],
                0.0,
                move |gpu, r| {
                    Ok(vec![ew::gelu_backward(
                        gpu,
                        r.t(dfc_pre),
                        r.t(fc_pre),
                        r.t(dgelu),
                    )?])
                },
            );
        }
        linear_param_grads(
            &mut g,
            &name("mlp.c_proj"),
            &bl.mlp_proj_w,
            &bl.mlp_proj_b,
            dres,
            fc_gelu,
            n,
            4 * c,
            c,
        );
        // mlp.c_fc
        let dln2 = g.planned(name("d ln_2 out"), &[n, c], act);
        let w = bl.c_fc_w.w;
        let what = name("mlp.c_fc.backward_input");
        linear_backward_input(&mut g, what, dfc_pre, w, None, dln2, mm(n, 4 * c, c));
        linear_param_grads(
            &mut g,
            &name("mlp.c_fc"),
            &bl.c_fc_w,
            &bl.c_fc_b,
            dfc_pre,
            sv.ln2,
            n,
            c,
            4 * c,
        );
        layernorm_backward(
            &mut g,
            &name("ln_2"),
            dres,
            &bl.ln_2_w,
            &bl.ln_2_b,
            dln2,
            sv.res_mid,
            sv.ln2_mean,
            sv.ln2_rstd,
            n,
            c,
        );
        // attn.c_proj
        let datty = g.planned(name("d attention out"), &[n, c], act);
        let w = bl.attn_proj_w.w;
        let what = name("attn.c_proj.backward_input");
        linear_backward_input(&mut g, what, dres, w, None, datty, mm(n, c, c));
        linear_param_grads(
            &mut g,
            &name("attn.c_proj"),
            &bl.attn_proj_w,
            &bl.attn_proj_b,
            dres,
            sv.atty,
            n,
            c,
            c,
        );
        // attention
        let dqkv = g.planned(name("d qkv"), &[n, 3 * c], act);
        let (qkv, atty, stats) = (sv.qkv, sv.atty, sv.att_stats);
        let att_flops = attention::attention_backward_flops(b, t, nh, hs) as f64;
        match s.attention {
            AttentionKind::Flash => {
                let dscratch = g.planned(name("attention D"), &[b, nh, t], DType::F32);
                g.node(
                    name("attn.flash.backward"),
                    "attention",
                    &[datty, qkv, atty, stats],
                    &[dqkv, dscratch],
                    att_flops,
                    move |gpu, r| {
                        attention::attention_backward(
                            gpu,
                            &attention::AttentionBackward {
                                dqkv: r.t(dqkv),
                                dout: r.t(datty),
                                qkv: r.t(qkv),
                                out: r.t(atty),
                                lse: r.t(stats),
                                d_scratch: r.t(dscratch),
                                b,
                                t,
                                nh,
                            },
                        )
                    },
                );
            }
            AttentionKind::Naive => {
                let datt = g.planned(name("d attention probs"), &[b, nh, t, t], DType::F32);
                g.node(
                    name("attn.naive.backward"),
                    "attention",
                    &[datty, qkv, stats],
                    &[dqkv, datt],
                    att_flops,
                    move |gpu, r| {
                        attention::naive_attention_backward(
                            gpu,
                            &attention::NaiveAttentionBackward {
                                dqkv: r.t(dqkv),
                                datt_scratch: r.t(datt),
                                dout: r.t(datty),
                                qkv: r.t(qkv),
                                att: r.t(stats),
                                b,
                                t,
                                nh,
                            },
                        )
                    },
                );
            }
        }
        // attn.c_attn
        let dln1 = g.planned(name("d ln_1 out"), &[n, c], act);
        let w = bl.c_attn_w.w;
        let what = name("attn.c_attn.backward_input");
        linear_backward_input(&mut g, what, dqkv, w, None, dln1, mm(n, 3 * c, c));
        linear_param_grads(
            &mut g,
            &name("attn.c_attn"),
            &bl.c_attn_w,
            &bl.c_attn_b,
            dqkv,
            sv.ln1,
            n,
            c,
            3 * c,
        );
        layernorm_backward(
            &mut g,
            &name("ln_1"),
            dres,
            &bl.ln_1_w,
            &bl.ln_1_b,
            dln1,
            sv.res_in,
            sv.ln1_mean,
            sv.ln1_rstd,
            n,
            c,
        );
    }
    {
        let mut rw = vec![wpe.g];
        rw.extend(wte.iter().map(|part| part.ids.g));
        let mut reads = vec![dres, buckets];
        reads.extend(&rw);
        let parts = wte.clone();
        g.node(
            "embedding.backward",
            "embedding",
            &reads,
            &rw,
            0.0,
            move |gpu, r| {
                let mut ds = Vec::with_capacity(parts.len() + 1);
                for part in &parts {
                    ds.push(embedding::embedding_backward_wte(
                        gpu,
                        &embedding::EmbeddingBackwardWte {
                            dwte: r.t(part.ids.g),
                            piece: part.piece,
                            dout: r.t(dres),
                            buckets: r.t(buckets),
                            b,
                            t,
                        },
                    )?);
                }
                ds.push(embedding::embedding_backward_wpe(
                    gpu,
                    r.t(wpe.g),
                    r.t(dres),
                    b,
                    t,
                )?);
                Ok(ds)
            },
        );
    }

    // ---------------------------------------------------------------- tail: norm, clip, AdamW
    g.section(Section::Tail);
    let buffer_lens: Vec<usize> = storage.buffers.iter().map(|b| b.len).collect();
    let norm_scratch = g.planned(
        "norm partials",
        &[optimizer::grad_norm_scratch_len(&buffer_lens)],
        DType::F32,
    );
    {
        let mut reads = grads_all.clone();
        reads.push(norm_scalars);
        let grads = grads_all.clone();
        g.node(
            "grad_norm",
            "optimizer",
            &reads,
            &[status, norm_scratch],
            0.0,
            move |gpu, r| {
                let views: Vec<_> = grads.iter().map(|&id| r.t(id)).collect();
                optimizer::grad_norm(
                    gpu,
                    r.t(status),
                    &views,
                    r.t(norm_scratch),
                    r.t(norm_scalars),
                )
            },
        );
    }
    let half = s.precision == Precision::F16;
    for (k, sb) in storage.buffers.iter().enumerate() {
        let params_k = buffer(&mut g, ParamCopy::Master, k, DType::F32);
        let m_k = buffer(&mut g, ParamCopy::AdamM, k, DType::F32);
        let v_k = buffer(&mut g, ParamCopy::AdamV, k, DType::F32);
        let half_k = half.then(|| buffer(&mut g, ParamCopy::Half, k, DType::F16));
        let grads_k = grads_all[k];
        let mut reads = vec![grads_k, status, hyper, params_k, m_k, v_k];
        let mut writes = vec![params_k, m_k, v_k];
        if let Some(h) = half_k {
            reads.push(h);
            writes.push(h);
        }
        // (label, offset, length, decayed prefix) of each AdamW dispatch over this buffer: the
        // whole buffer at once, or (unfused) one per tensor piece.
        let spans: Vec<(String, usize, usize, usize)> = if s.fused_optimizer {
            let label = if nbuf == 1 {
                "adamw".to_string()
            } else {
                format!("adamw buffer {k}")
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
            g.node(label, "optimizer", &reads, &writes, 0.0, move |gpu, r| {
                let align = gpu.alignment();
                let sl = |id: TensorId| r.t(id).slice(offset, &[len], align);
                let p16 = match half_k {
                    Some(h) => Some(sl(h)?),
                    None => None,
                };
                Ok(vec![optimizer::adamw(
                    gpu,
                    &optimizer::AdamW {
                        params: &sl(params_k)?,
                        grads: &sl(grads_k)?,
                        m: &sl(m_k)?,
                        v: &sl(v_k)?,
                        params_f16: p16.as_ref(),
                        status: r.t(status),
                        hyper: r.t(hyper),
                        n_decay,
                    },
                )?])
            });
        }
    }
    // Last: the loss scaler and Adam's step count advance on the GPU, and the next step's
    // scalars are written, so that the next step can be queued before this one has finished.
    let scaling = half;
    g.node(
        "step state",
        "optimizer",
        &[status, state, bias_table],
        &[state, dloss, norm_scalars, hyper],
        0.0,
        move |gpu, r| {
            Ok(vec![optimizer::advance_step_state(
                gpu,
                &optimizer::AdvanceStepState {
                    state: r.t(state),
                    status: r.t(status),
                    table: r.t(bias_table),
                    dloss: r.t(dloss),
                    norm_scalars: r.t(norm_scalars),
                    hyper: r.t(hyper),
                    growth_interval: LossScaler::GROWTH_INTERVAL,
                    scaling,
                },
            )?])
        },
    );
    Ok(g)
}

/// A LayerNorm's output and the statistics saved for its backward pass.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ln {
    pub out: TensorId,
    pub mean: TensorId,
    pub rstd: TensorId,
}

/// Plans the tensors of a LayerNorm over `n` rows of `c`: output in `dtype`, f32 statistics.
pub(crate) fn ln_tensors<E: Clone>(
    g: &mut Graph<E>,
    what: &str,
    n: usize,
    c: usize,
    dtype: DType,
) -> Ln {
    Ln {
        out: g.planned(format!("{what} out"), &[n, c], dtype),
        mean: g.planned(format!("{what} mean"), &[n], DType::F32),
        rstd: g.planned(format!("{what} rstd"), &[n], DType::F32),
    }
}

/// `ln = LayerNorm(inp)`.
pub(crate) fn layernorm_node<E: Clone>(
    g: &mut Graph<E>,
    what: &str,
    ln: Ln,
    inp: TensorId,
    w: TensorId,
    bias: TensorId,
) {
    let Ln { out, mean, rstd } = ln;
    g.node(
        format!("{what}.forward"),
        "layernorm",
        &[inp, w, bias],
        &[out, mean, rstd],
        0.0,
        move |gpu, r| {
            Ok(vec![layernorm::layernorm_forward(
                gpu,
                r.t(out),
                r.t(mean),
                r.t(rstd),
                r.t(inp),
                r.t(w),
                r.t(bias),
            )?])
        },
    );
}

/// `res_out = a + b; ln = LayerNorm(res_out)` (one fused dispatch, or two).
#[allow(clippy::too_many_arguments)]
pub(crate) fn residual_layernorm<E: Clone>(
    g: &mut Graph<E>,
    fused: bool,
    what: &str,
    a: TensorId,
    b: TensorId,
    res_out: TensorId,
    ln: Ln,
    w: TensorId,
    bias: TensorId,
) {
    if !fused {
        g.node(
            format!("residual before {what}"),
            "elementwise",
            &[a, b],
            &[res_out],
            0.0,
            move |gpu, r| {
                Ok(vec![ew::residual_forward(
                    gpu,
                    r.t(res_out),
                    r.t(a),
                    r.t(b),
                )?])
            },
        );
        layernorm_node(g, what, ln, res_out, w, bias);
        return;
    }
    let Ln { out, mean, rstd } = ln;
    g.node(
        format!("residual+{what}.forward"),
        "layernorm",
        &[a, b, w, bias],
        &[res_out, out, mean, rstd],
        0.0,
        move |gpu, r| {
            Ok(vec![layernorm::fused_residual_layernorm_forward(
                gpu,
                &layernorm::FusedResidualLayerNorm {
                    residual_out: r.t(res_out),
                    out: r.t(out),
                    mean: r.t(mean),
                    rstd: r.t(rstd),
                    a: r.t(a),
                    b: r.t(b),
                    weight: r.t(w),
                    bias: r.t(bias),
                },
            )?])
        },
    );
}

/// LayerNorm backward: adds into `dres` and the parameter gradients.
#[allow(clippy::too_many_arguments)]
fn layernorm_backward(
    g: &mut Graph<StepInput>,
    what: &str,
    dres: TensorId,
    w: &ParamIds,
    bias: &ParamIds,
    dout: TensorId,
    inp: TensorId,
    mean: TensorId,
    rstd: TensorId,
    n: usize,
    c: usize,
) {
    let scratch = g.planned(
        format!("{what} backward partials"),
        &[layernorm::layernorm_backward_scratch_len(n, c)],
        DType::F32,
    );
    let (wp, gw, gb) = (w.p, w.g, bias.g);
    g.node(
        format!("{what}.backward"),
        "layernorm",
        &[dout, inp, wp, mean, rstd, dres, gw, gb],
        &[dres, gw, gb, scratch],
        0.0,
        move |gpu, r| {
            layernorm::layernorm_backward(
                gpu,
                &layernorm::LayerNormBackward {
                    dinp: r.t(dres),
                    dweight: r.t(gw),
                    dbias: r.t(gb),
                    scratch: r.t(scratch),
                    dout: r.t(dout),
                    inp: r.t(inp),
                    weight: r.t(wp),
                    mean: r.t(mean),
                    rstd: r.t(rstd),
                },
            )
        },
    );
}

/// One matmul node: `out = inp @ w^T (+ bias)`. With `gelu_pre`, the GELU epilogue is fused:
/// `gelu_pre` receives the pre-activation and `out` its GELU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward<E: Clone>(
    g: &mut Graph<E>,
    what: String,
    inp: TensorId,
    w: TensorId,
    bias: Option<TensorId>,
    gelu_pre: Option<TensorId>,
    out: TensorId,
    flops: f64,
) {
    let mut reads = vec![inp, w];
    reads.extend(bias);
    let mut writes: Vec<TensorId> = gelu_pre.into_iter().collect();
    writes.push(out);
    g.node(what, "matmul", &reads, &writes, flops, move |gpu, r| {
        let o = MatmulForward {
            bias: bias.map(|b| r.t(b)),
            gelu_pre: gelu_pre.map(|p| r.t(p)),
            ..Default::default()
        };
        Ok(vec![matmul::matmul_forward(
            gpu,
            r.t(out),
            r.t(inp),
            r.t(w),
            &o,
        )?])
    });
}

/// The input gradient of a Linear layer: `din = dout @ w`. With `gelu_pre` (the saved
/// pre-activation of a GELU that fed the layer), the GELU backward is fused and `din` is the
/// gradient at the pre-activation.
fn linear_backward_input(
    g: &mut Graph<StepInput>,
    what: String,
    dout: TensorId,
    w: TensorId,
    gelu_pre: Option<TensorId>,
    din: TensorId,
    flops: f64,
) {
    let mut reads = vec![dout, w];
    reads.extend(gelu_pre);
    g.node(what, "matmul", &reads, &[din], flops, move |gpu, r| {
        let o = MatmulBackwardInput {
            gelu_pre: gelu_pre.map(|p| r.t(p)),
            ..Default::default()
        };
        Ok(vec![matmul::matmul_backward_input(
            gpu,
            r.t(din),
            r.t(dout),
            r.t(w),
            &o,
        )?])
    });
}

/// Weight and bias gradients of a Linear layer `out = inp @ W^T + b` given `dout`, in one
/// node: the bias gradient is summed from the dout tiles the weight gradient stages.
#[allow(clippy::too_many_arguments)]
fn linear_param_grads(
    g: &mut Graph<StepInput>,
    what: &str,
    w: &ParamIds,
    bias: &ParamIds,
    dout: TensorId,
    inp: TensorId,
    n: usize,
    k: usize,
    nout: usize,
) {
    let (gw, gb) = (w.g, bias.g);
    // Split-K partials when the (nout, k) gradient is too small to fill a large GPU alone.
    let split_len = matmul::matmul_backward_weight_scratch_len(nout, k, n);
    let split = (split_len > 0)
        .then(|| g.planned(format!("{what} weight partials"), &[split_len], DType::F32));
    let mut writes = vec![gw, gb];
    writes.extend(split);
    g.node(
        format!("{what}.backward_weight"),
        "matmul",
        &[dout, inp, gw, gb],
        &writes,
        matmul::matmul_flops(n, k, nout),
        move |gpu, r| {
            let o = MatmulBackwardWeight {
                dbias: Some(r.t(gb)),
                accumulate: true,
                ..Default::default()
            };
            matmul::matmul_backward_weight_split(
                gpu,
                r.t(gw),
                r.t(dout),
                r.t(inp),
                split.map(|s| r.t(s)),
                &o,
            )
        },
    );
}
