//! GPT-2's training step as a graph: forward, loss, backward, gradient norm and AdamW.
//! This file is the one place where the model's data flow can be read, top to bottom.

use super::{Graph, Section, TensorId};
use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};
use crate::model::{GptConfig, ParamLayout};
use crate::ops::matmul::{MatmulBackwardInput, MatmulForward};
use crate::ops::{
    attention, crossentropy, elementwise as ew, embedding, layernorm, matmul, optimizer,
};
use crate::train::settings::{AttentionKind, Precision, TrainSettings};

/// The tensors a training step reads and writes that live outside the graph.
pub struct StepTensors {
    /// Master weights, flat (layout order).
    pub params: Tensor,
    /// f16 copies of the weights (mixed precision only), same layout.
    pub params_f16: Option<Tensor>,
    /// Gradients, flat f32, same layout.
    pub grads: Tensor,
    /// AdamW moments, flat f32.
    pub m: Tensor,
    pub v: Tensor,
    /// Per micro-step: token ids (B*T), targets (B*T), embedding-backward buckets.
    pub tokens: Vec<Tensor>,
    pub targets: Vec<Tensor>,
    pub buckets: Vec<Tensor>,
    /// [1] f32: d(loss)/d(per-position loss) = loss_scale / (B*T*grad_accum), written each step.
    pub dloss: Tensor,
    /// [1] f32: the step's mean loss (accumulated over micro-steps).
    pub loss: Tensor,
    /// [4] f32: gradient norm, clip coefficient, finite flag (written by the norm kernel).
    pub status: Tensor,
    /// Inputs of the gradient norm (inverse loss scale, max norm), written each step.
    pub norm_scalars: Tensor,
    /// AdamW hyperparameters, written each step.
    pub hyper: Tensor,
}

/// Views of one named parameter in the flat buffers.
struct ParamIds {
    /// f32 master weight (LayerNorm, biases, embeddings read it).
    p: TensorId,
    /// What matmuls read: the f16 copy in mixed precision, else the master weight.
    w: TensorId,
    /// Gradient.
    g: TensorId,
}

fn view(flat: &Tensor, layout: &ParamLayout, name: &str, align: u64) -> Result<Tensor> {
    let e = layout.get(name)?;
    flat.slice(e.offset, &e.shape, align)
}

/// Builds the whole training step.
pub fn build_train_graph(gpu: &Gpu, s: &TrainSettings, io: &StepTensors) -> Result<Graph> {
    let cfg: &GptConfig = &s.config;
    let layout = ParamLayout::new(cfg);
    let align = gpu.alignment();
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

    let param = |g: &mut Graph, name: &str| -> Result<ParamIds> {
        let p = g.fixed(
            format!("param {name}"),
            &view(&io.params, &layout, name, align)?,
        );
        let w = match &io.params_f16 {
            Some(h) => g.fixed(format!("param16 {name}"), &view(h, &layout, name, align)?),
            None => p,
        };
        let gr = g.fixed(
            format!("grad {name}"),
            &view(&io.grads, &layout, name, align)?,
        );
        Ok(ParamIds { p, w, g: gr })
    };
    let wte = param(&mut g, "wte.weight")?;
    let wpe = param(&mut g, "wpe.weight")?;
    struct Block {
        ln1_w: ParamIds,
        ln1_b: ParamIds,
        attn_w: ParamIds,
        attn_b: ParamIds,
        proj_w: ParamIds,
        proj_b: ParamIds,
        ln2_w: ParamIds,
        ln2_b: ParamIds,
        fc_w: ParamIds,
        fc_b: ParamIds,
        mlp_w: ParamIds,
        mlp_b: ParamIds,
    }
    let mut blocks = Vec::with_capacity(l);
    for i in 0..l {
        let mut pp = |s: &str| param(&mut g, &format!("h.{i}.{s}"));
        blocks.push(Block {
            ln1_w: pp("ln_1.weight")?,
            ln1_b: pp("ln_1.bias")?,
            attn_w: pp("attn.c_attn.weight")?,
            attn_b: pp("attn.c_attn.bias")?,
            proj_w: pp("attn.c_proj.weight")?,
            proj_b: pp("attn.c_proj.bias")?,
            ln2_w: pp("ln_2.weight")?,
            ln2_b: pp("ln_2.bias")?,
            fc_w: pp("mlp.c_fc.weight")?,
            fc_b: pp("mlp.c_fc.bias")?,
            mlp_w: pp("mlp.c_proj.weight")?,
            mlp_b: pp("mlp.c_proj.bias")?,
        });
    }
    let lnf_w = param(&mut g, "ln_f.weight")?;
    let lnf_b = param(&mut g, "ln_f.bias")?;

    let tokens = g.per_micro("tokens", &io.tokens)?;
    let targets = g.per_micro("targets", &io.targets)?;
    let buckets = g.per_micro("buckets", &io.buckets)?;
    let dloss = g.fixed("dloss", &io.dloss);
    let loss = g.fixed("loss", &io.loss);
    let status = g.fixed("status", &io.status);
    let norm_scalars = g.fixed("norm scalars", &io.norm_scalars);
    let hyper = g.fixed("adamw hyper", &io.hyper);
    let grads_all = g.fixed("grads", &io.grads);
    let params_all = g.fixed("params", &io.params);
    let params16_all = io.params_f16.as_ref().map(|h| g.fixed("params f16", h));
    let m_all = g.fixed("adam m", &io.m);
    let v_all = g.fixed("adam v", &io.v);

    // ---------------------------------------------------------------- head: clear accumulators
    g.section(Section::Head);
    g.node(
        "zero grads",
        "optimizer",
        &[],
        &[grads_all],
        0.0,
        move |gpu, r| Ok(vec![ew::fill(gpu, r.t(grads_all), 0.0)?]),
    );
    g.node("zero loss", "loss", &[], &[loss], 0.0, move |gpu, r| {
        Ok(vec![ew::fill(gpu, r.t(loss), 0.0)?])
    });

    // ---------------------------------------------------------------- body: forward
    g.section(Section::Body);
    let mm = |m: usize, k: usize, nn: usize| matmul::matmul_flops(m, k, nn);

    let emb = g.planned("embedding out", &[n, c], DType::F32);
    g.node(
        "embedding.forward",
        "embedding",
        &[tokens, wte.p, wpe.p],
        &[emb],
        0.0,
        move |gpu, r| {
            Ok(vec![embedding::embedding_forward(
                gpu,
                r.t(emb),
                r.t(tokens),
                r.t(wte.p),
                r.t(wpe.p),
                b,
                t,
            )?])
        },
    );

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
    for (i, bl) in blocks.iter().enumerate() {
        let name = |s: &str| format!("h.{i}.{s}");
        let Ln {
            out: ln1,
            mean: ln1_mean,
            rstd: ln1_rstd,
        } = match pending_ln1.take() {
            Some(x) => x,
            None => {
                let ln = ln_tensors(&mut g, &name("ln_1"), n, c, act);
                layernorm_node(&mut g, &name("ln_1"), ln, res, bl.ln1_w.p, bl.ln1_b.p);
                ln
            }
        };
        // attention
        let qkv = g.planned(name("qkv"), &[n, 3 * c], act);
        let (w, bb) = (bl.attn_w.w, bl.attn_b.p);
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
                    move |gpu, r| {
                        attention::flash_attention_forward(
                            gpu,
                            r.t(atty),
                            r.t(lse),
                            r.t(qkv),
                            b,
                            t,
                            nh,
                        )
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
        let (w, bb) = (bl.proj_w.w, bl.proj_b.p);
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
        let (w, bb) = (bl.ln2_w.p, bl.ln2_b.p);
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
        let (w, bb) = (bl.fc_w.w, bl.fc_b.p);
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
        let (w, bb) = (bl.mlp_w.w, bl.mlp_b.p);
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
            let (nw, nb, what) = match blocks.get(i + 1) {
                Some(next) => (next.ln1_w.p, next.ln1_b.p, format!("h.{}.ln_1", i + 1)),
                None => (lnf_w.p, lnf_b.p, "ln_f".to_string()),
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
            layernorm_node(&mut g, "ln_f", ln, res, lnf_w.p, lnf_b.p);
            ln
        }
    };
    // lm_head, tied to wte: logits = ln_f(x) @ wte^T over the padded vocabulary.
    let logits = g.planned("logits", &[n, vp], act);
    let w = wte.w;
    linear_forward(
        &mut g,
        "lm_head.forward".into(),
        lnf,
        w,
        None,
        None,
        logits,
        mm(n, c, vp),
    );
    // Loss, and its gradient written over the logits.
    let losses = g.planned("losses", &[n], DType::F32);
    g.node(
        "crossentropy.forward_backward",
        "loss",
        &[targets, dloss, logits],
        &[logits, losses],
        0.0,
        move |gpu, r| {
            Ok(vec![crossentropy::crossentropy_forward_backward(
                gpu,
                r.t(losses),
                r.t(logits),
                r.t(targets),
                r.t(dloss),
                v,
                true,
            )?])
        },
    );
    let inv = 1.0 / (n * s.grad_accum) as f32;
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
    let dlogits = logits;
    let dlnf = g.planned("d ln_f out", &[n, c], act);
    let w = wte.w;
    let flops = mm(n, vp, c);
    linear_backward_input(
        &mut g,
        "lm_head.backward_input".into(),
        dlogits,
        w,
        None,
        dlnf,
        flops,
    );
    let gw = wte.g;
    g.node(
        "lm_head.backward_weight",
        "matmul",
        &[dlogits, lnf, gw],
        &[gw],
        mm(n, c, vp),
        move |gpu, r| {
            Ok(vec![matmul::matmul_backward_weight(
                gpu,
                r.t(gw),
                r.t(dlogits),
                r.t(lnf),
                true,
            )?])
        },
    );
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
        &mut g, "ln_f", dres, &lnf_w, &lnf_b, dlnf, res, lnf_mean, lnf_rstd, n, c,
    );
    for (i, bl) in blocks.iter().enumerate().rev() {
        let sv = &saved[i];
        let name = |s: &str| format!("h.{i}.{s}");
        // mlp.c_proj (+ the GELU before it)
        let dfc_pre = g.planned(name("d mlp.c_fc out"), &[n, 4 * c], act);
        let (w, fc_pre, fc_gelu) = (bl.mlp_w.w, sv.fc_pre, sv.fc_gelu);
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
            &bl.mlp_w,
            &bl.mlp_b,
            dres,
            fc_gelu,
            n,
            4 * c,
            c,
        );
        // mlp.c_fc
        let dln2 = g.planned(name("d ln_2 out"), &[n, c], act);
        let w = bl.fc_w.w;
        let what = name("mlp.c_fc.backward_input");
        linear_backward_input(&mut g, what, dfc_pre, w, None, dln2, mm(n, 4 * c, c));
        linear_param_grads(
            &mut g,
            &name("mlp.c_fc"),
            &bl.fc_w,
            &bl.fc_b,
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
            &bl.ln2_w,
            &bl.ln2_b,
            dln2,
            sv.res_mid,
            sv.ln2_mean,
            sv.ln2_rstd,
            n,
            c,
        );
        // attn.c_proj
        let datty = g.planned(name("d attention out"), &[n, c], act);
        let w = bl.proj_w.w;
        let what = name("attn.c_proj.backward_input");
        linear_backward_input(&mut g, what, dres, w, None, datty, mm(n, c, c));
        linear_param_grads(
            &mut g,
            &name("attn.c_proj"),
            &bl.proj_w,
            &bl.proj_b,
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
                        attention::flash_attention_backward(
                            gpu,
                            r.t(dqkv),
                            r.t(datty),
                            r.t(qkv),
                            r.t(atty),
                            r.t(stats),
                            r.t(dscratch),
                            b,
                            t,
                            nh,
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
                            r.t(dqkv),
                            r.t(datt),
                            r.t(datty),
                            r.t(qkv),
                            r.t(stats),
                            b,
                            t,
                            nh,
                        )
                    },
                );
            }
        }
        // attn.c_attn
        let dln1 = g.planned(name("d ln_1 out"), &[n, c], act);
        let w = bl.attn_w.w;
        let what = name("attn.c_attn.backward_input");
        linear_backward_input(&mut g, what, dqkv, w, None, dln1, mm(n, 3 * c, c));
        linear_param_grads(
            &mut g,
            &name("attn.c_attn"),
            &bl.attn_w,
            &bl.attn_b,
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
            &bl.ln1_w,
            &bl.ln1_b,
            dln1,
            sv.res_in,
            sv.ln1_mean,
            sv.ln1_rstd,
            n,
            c,
        );
    }
    let (gwte, gwpe) = (wte.g, wpe.g);
    g.node(
        "embedding.backward",
        "embedding",
        &[dres, buckets, gwte, gwpe],
        &[gwte, gwpe],
        0.0,
        move |gpu, r| {
            embedding::embedding_backward(gpu, r.t(gwte), r.t(gwpe), r.t(dres), r.t(buckets), b, t)
        },
    );

    // ---------------------------------------------------------------- tail: norm, clip, AdamW
    g.section(Section::Tail);
    let norm_scratch = g.planned(
        "norm partials",
        &[optimizer::grad_norm_scratch_len(layout.total)],
        DType::F32,
    );
    g.node(
        "grad_norm",
        "optimizer",
        &[grads_all, norm_scalars],
        &[status, norm_scratch],
        0.0,
        move |gpu, r| {
            optimizer::grad_norm(
                gpu,
                r.t(status),
                r.t(grads_all),
                r.t(norm_scratch),
                r.t(norm_scalars),
            )
        },
    );
    let mut reads = vec![grads_all, status, hyper, params_all, m_all, v_all];
    let mut writes = vec![params_all, m_all, v_all];
    if let Some(h) = params16_all {
        reads.push(h);
        writes.push(h);
    }
    if s.fused_optimizer {
        let n_decay = layout.n_decay;
        g.node("adamw", "optimizer", &reads, &writes, 0.0, move |gpu, r| {
            Ok(vec![optimizer::adamw(
                gpu,
                r.t(params_all),
                r.t(grads_all),
                r.t(m_all),
                r.t(v_all),
                params16_all.map(|h| r.t(h)),
                r.t(status),
                r.t(hyper),
                n_decay,
            )?])
        });
    } else {
        for e in layout.entries.clone() {
            let decay = e.decayed();
            g.node(
                format!("adamw {}", e.name),
                "optimizer",
                &reads,
                &writes,
                0.0,
                move |gpu, r| {
                    let sl = |id: TensorId| r.t(id).slice(e.offset, &e.shape, gpu.alignment());
                    let p16 = match params16_all {
                        Some(h) => Some(sl(h)?),
                        None => None,
                    };
                    let len = e.len();
                    Ok(vec![optimizer::adamw(
                        gpu,
                        &sl(params_all)?,
                        &sl(grads_all)?,
                        &sl(m_all)?,
                        &sl(v_all)?,
                        p16.as_ref(),
                        r.t(status),
                        r.t(hyper),
                        if decay { len } else { 0 },
                    )?])
                },
            );
        }
    }
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
pub(crate) fn ln_tensors(g: &mut Graph, what: &str, n: usize, c: usize, dtype: DType) -> Ln {
    Ln {
        out: g.planned(format!("{what} out"), &[n, c], dtype),
        mean: g.planned(format!("{what} mean"), &[n], DType::F32),
        rstd: g.planned(format!("{what} rstd"), &[n], DType::F32),
    }
}

/// `ln = LayerNorm(inp)`.
pub(crate) fn layernorm_node(
    g: &mut Graph,
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
pub(crate) fn residual_layernorm(
    g: &mut Graph,
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
                r.t(res_out),
                r.t(out),
                r.t(mean),
                r.t(rstd),
                r.t(a),
                r.t(b),
                r.t(w),
                r.t(bias),
            )?])
        },
    );
}

/// LayerNorm backward: adds into `dres` and the parameter gradients.
#[allow(clippy::too_many_arguments)]
fn layernorm_backward(
    g: &mut Graph,
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
                r.t(dres),
                r.t(gw),
                r.t(gb),
                r.t(scratch),
                r.t(dout),
                r.t(inp),
                r.t(wp),
                r.t(mean),
                r.t(rstd),
            )
        },
    );
}

/// One matmul node: `out = inp @ w^T (+ bias)`. With `gelu_pre`, the GELU epilogue is fused:
/// `gelu_pre` receives the pre-activation and `out` its GELU.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_forward(
    g: &mut Graph,
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
    g: &mut Graph,
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

/// Weight and bias gradients of a Linear layer `out = inp @ W^T + b` given `dout`.
#[allow(clippy::too_many_arguments)]
fn linear_param_grads(
    g: &mut Graph,
    what: &str,
    w: &ParamIds,
    bias: &ParamIds,
    dout: TensorId,
    inp: TensorId,
    n: usize,
    k: usize,
    nout: usize,
) {
    let gw = w.g;
    g.node(
        format!("{what}.backward_weight"),
        "matmul",
        &[dout, inp, gw],
        &[gw],
        matmul::matmul_flops(n, k, nout),
        move |gpu, r| {
            Ok(vec![matmul::matmul_backward_weight(
                gpu,
                r.t(gw),
                r.t(dout),
                r.t(inp),
                true,
            )?])
        },
    );
    let gb = bias.g;
    let scratch = g.planned(
        format!("{what} bias partials"),
        &[matmul::matmul_backward_bias_scratch_len(n, nout)],
        DType::F32,
    );
    g.node(
        format!("{what}.backward_bias"),
        "matmul",
        &[dout, gb],
        &[gb, scratch],
        0.0,
        move |gpu, r| matmul::matmul_backward_bias(gpu, r.t(gb), r.t(dout), r.t(scratch), true),
    );
}
