//! The whole training step on the GPU against the independent float64 reference, gradient
//! checks, memorisation, mixed precision, and exact resume from a checkpoint.

use crate::common::*;
use std::sync::Arc;
use wgpt::checkpoint::Checkpoint;
use wgpt::data::DataLoader;
use wgpt::gpu::AdapterLimits;
use wgpt::model::init::init_params;
use wgpt::model::params::storage_order;
use wgpt::model::{GptConfig, ParamId, ParamLayout};
use wgpt::reference::model::{
    AdamUpdate, ReferenceModel, ReferenceOptim, ReferenceSchedule, ReferenceTrainer,
};
use wgpt::train::settings::{AttentionKind, Precision, TrainSettings};
use wgpt::train::trainer::{StepStats, Trainer, PIPELINE_DEPTH};

/// A model small enough for the CPU driver, with a vocabulary that is padded (300 -> 384) and
/// shapes that are not multiples of any tile.
fn tiny() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
        vocab_size: 300,
        padded_vocab_size: 384,
    }
}

fn settings(b: usize, t: usize) -> TrainSettings {
    let mut s = TrainSettings::new(tiny(), b, t);
    s.steps = 10;
    s.warmup_steps = 3;
    s.max_lr = 1e-3;
    s.precision = Precision::F32;
    s
}

fn tokens(n: usize, seed: u64) -> Arc<Vec<u32>> {
    let mut r = rng(seed);
    // Some structure, so the loss can fall: a noisy repeating pattern.
    Arc::new(
        (0..n)
            .map(|i| {
                if r.below(4) == 0 {
                    r.below(300) as u32
                } else {
                    ((i * 7) % 300) as u32
                }
            })
            .collect(),
    )
}

fn arc_gpu() -> Arc<wgpt::Gpu> {
    gpu_arc()
}

fn saved_weights(seed: u64) -> Checkpoint {
    saved_weights_for(tiny(), seed)
}

/// Seeded GPT-2 weights for `cfg`, through a checkpoint file as a user's would come.
fn saved_weights_for(cfg: GptConfig, seed: u64) -> Checkpoint {
    let layout = ParamLayout::new(&cfg);
    let c = Checkpoint {
        config: cfg,
        params: init_params(&cfg, &layout, seed),
        moments: None,
        state: None,
    };
    // A path of its own per call: tests run in parallel and may ask for the same seed.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "wgpt-train-init-{}-{seed}-{k}.safetensors",
        std::process::id()
    ));
    c.save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    back
}

/// How closely a run must follow the float64 reference (see [`check_against_reference_with`]).
#[derive(Clone, Copy, Debug)]
struct Bounds {
    /// Each gradient tensor (each piece of wte) within this relative error in the max norm.
    grad_tol: f32,
    /// At most this many weights a step whose gradient is at the noise of its f32 computation
    /// (see [`check_adamw_step`]).
    max_loose: usize,
    /// Also take each step with the reference computing in float32 and hold the GPU's weight
    /// updates to that noise floor (see [`check_update_noise`]).
    f32_floor: bool,
}

/// Trains `steps` steps on the GPU (planned for `limits`, or the device's own) and in float64
/// on the same data, each step taken by both from the GPU's state (weights and AdamW moments),
/// and compares every step's gradients tensor by tensor, wte piece by piece (max-norm relative
/// error within `bounds.grad_tol`), loss and norm (within 1e-5) and every weight after the step,
/// each by its own gradient (see [`check_adamw_step`]); with `bounds.f32_floor`, the updates
/// against what float32 arithmetic gets (see [`check_update_noise`]).
fn check_against_reference_with(
    s: TrainSettings,
    limits: Option<&AdapterLimits>,
    what: &str,
    init: &Checkpoint,
    tok: Arc<Vec<u32>>,
    steps: usize,
    bounds: Bounds,
) -> Trainer {
    let optim = ReferenceOptim {
        schedule: ReferenceSchedule {
            max_lr: s.max_lr,
            min_lr: s.max_lr * s.min_lr_ratio,
            warmup_steps: s.warmup_steps,
            total_steps: s.steps,
        },
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: s.weight_decay,
        grad_clip: s.grad_clip,
    };
    let mut r = ReferenceTrainer::new(ReferenceModel::new(s.config), &init.params, optim);
    let mut r32 = bounds.f32_floor.then(|| {
        ReferenceTrainer::<f32>::with_float(ReferenceModel::new(s.config), &init.params, optim)
    });
    let mut loader = DataLoader::new(tok.clone(), s.batch_size, s.seq_len).unwrap();
    let own = AdapterLimits::of(gpu());
    let limits = limits.unwrap_or(&own);
    let mut tr = Trainer::with_limits(arc_gpu(), s.clone(), tok, Some(init), limits).unwrap();
    eprintln!("{what}: {}", tr.plan().line());
    eprintln!(
        "{what}: {} storage buffers, wte in {} pieces, {}",
        tr.plan().storage.buffers.len(),
        tr.plan().storage.pieces.wte.len(),
        tr.plan().classifier_line(s.config.padded_vocab_size)
    );
    let layout = ParamLayout::new(&s.config);
    let c = s.config.n_embd;
    let wte_pieces: Vec<std::ops::Range<usize>> = tr
        .plan()
        .storage
        .pieces
        .wte
        .iter()
        .map(|p| p.rows.clone())
        .collect();
    // Each tensor on its own; wte piece by piece (rows of the real vocabulary), so that an error
    // confined to one piece is not hidden by the other's larger gradients.
    let mut compared: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    for (id, e) in layout.entries.iter() {
        if id == ParamId::Wte {
            for (k, rows) in wte_pieces.iter().enumerate() {
                let rows = rows.start..rows.end.min(s.config.vocab_size);
                compared.push((
                    format!("wte piece {k} (rows {rows:?})"),
                    e.offset + rows.start * c..e.offset + rows.end * c,
                ));
            }
        } else {
            compared.push((id.name(), e.range()));
        }
    }
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for i in 0..steps {
        let micro: Vec<_> = (0..s.grad_accum)
            .map(|_| {
                let b = loader.next_batch().unwrap();
                (b.x, b.y)
            })
            .collect();
        if wte_pieces.len() > 1 {
            // The batch's tokens reach every piece: the embedding's gradient lands in each.
            for rows in &wte_pieces {
                assert!(
                    micro
                        .iter()
                        .any(|(x, _)| x.iter().any(|&t| rows.contains(&(t as usize)))),
                    "{what} step {i}: no token of the batch in wte rows {rows:?}"
                );
            }
        }
        if i > 0 {
            let state = tr.checkpoint().unwrap();
            let (sm, sv) = state.moments.unwrap();
            r.set_state(&state.params, &sm, &sv);
            if let Some(r32) = r32.as_mut() {
                r32.set_state(&state.params, &sm, &sv);
            }
            (m, v) = (sm, sv);
        }
        // The weights the step starts from (exactly the GPU's: f32 values held in f64).
        let before: Vec<f32> = r.params.iter().map(|&x| x as f32).collect();
        // The float32 step, if any, on a thread of its own while the float64 one runs.
        let want = std::thread::scope(|scope| {
            let f32_step = r32
                .as_mut()
                .map(|r32| scope.spawn(|| r32.step(&micro, s.batch_size, s.seq_len)));
            let want = r.step(&micro, s.batch_size, s.seq_len);
            if let Some(f32_step) = f32_step {
                f32_step.join().unwrap();
            }
            want
        });
        let st = tr.step().unwrap();
        // The step's gradients (f32 runs: a loss scale of 1), before clipping.
        let grads = tr.grads().unwrap();
        let mut worst = (0f32, String::new());
        for (name, range) in &compared {
            let want32: Vec<f32> = r.grads[range.clone()].iter().map(|&g| g as f32).collect();
            let err = rel_error(&grads[range.clone()], &want32);
            if err.is_nan() || err > worst.0 {
                worst = (err, name.clone());
            }
            assert!(
                err <= bounds.grad_tol,
                "{what} step {i}: gradient of {name} off by {err:e} (relative, max-norm)"
            );
        }
        let el = (st.loss as f64 - want.loss).abs() / want.loss.abs();
        let en = (st.norm as f64 - want.norm).abs() / want.norm.abs();
        eprintln!(
            "{what} step {i}: loss {} vs {:.6} (rel {el:.1e}), norm {} vs {:.4} (rel {en:.1e}), \
             gradients within {:.2e} (worst: {})",
            st.loss, want.loss, st.norm, want.norm, worst.0, worst.1
        );
        assert!(
            el <= 1e-5,
            "{what} step {i}: loss {} vs reference {}",
            st.loss,
            want.loss
        );
        assert!(
            en <= 1e-5,
            "{what} step {i}: norm {} vs reference {}",
            st.norm,
            want.norm
        );
        let weights = tr.params().unwrap();
        // The padded vocabulary rows get no gradient and stay exactly zero.
        let wte = layout.slice(&weights, ParamId::Wte);
        let real = s.config.vocab_size * s.config.n_embd;
        assert!(
            wte[real..].iter().all(|&x| x == 0.0),
            "{what} step {i}: a padded vocabulary row of wte moved"
        );
        let step = AdamwStep {
            lr: want.lr,
            adam: AdamUpdate::new(&optim, want.lr, r.steps() as i32),
            m: &m,
            v: &v,
            grads: &r.grads,
            clip: optim.clip_factor(want.norm),
            gpu_grads: &grads,
            gpu_clip: optim.clip_factor(st.norm as f64),
        };
        check_adamw_step(
            &format!("{what} step {i}"),
            &layout,
            &weights,
            &r.params,
            &step,
            bounds.max_loose,
        );
        if let Some(r32) = &r32 {
            check_update_noise(
                &format!("{what} step {i}"),
                &layout,
                &before,
                &weights,
                &r32.params,
                &r.params,
            );
        }
    }
    tr
}

/// Errors of a weight update `after - before` against the float64 reference's `want - before`,
/// over some weights, each as a pair: over all of them, and without the largest one in 10^5.
///
/// An f32 update's error is heavy-tailed: a weight whose gradient cancels to about AdamW's eps
/// (1e-8) turns a tiny absolute error of that gradient into a sizeable part of lr. The few
/// largest errors among millions of weights are single samples of that tail, and their ratio
/// between two equally careful f32 computations varies several-fold from one batch to another;
/// without them the statistics are stable.
#[derive(Clone, Copy, Debug)]
struct UpdateError {
    /// `|u - u_ref| / |u_ref|` in the L2 norm: all errors, and all but the largest.
    l2: (f64, f64),
    /// The worst weight's error over the largest update `max |u_ref|`: the largest error, and
    /// the largest but one in 10^5 (the largest when there are fewer weights).
    worst: (f64, f64),
}

/// [`UpdateError`] of the weights in `ranges`. NaN if anything is not finite.
fn update_error(
    ranges: &[std::ops::Range<usize>],
    before: &[f32],
    after: &[f32],
    want: &[f64],
) -> UpdateError {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let n: usize = ranges.iter().map(|r| r.len()).sum();
    let keep = (n / 100_000).max(1);
    // The `keep` largest errors, by their bits (which order non-negative floats by value).
    let mut largest = BinaryHeap::with_capacity(keep);
    let (mut diff2, mut ref2, mut update_max) = (0f64, 0f64, 0f64);
    for i in ranges.iter().flat_map(|r| r.clone()) {
        if !after[i].is_finite() {
            let nan = (f64::NAN, f64::NAN);
            return UpdateError {
                l2: nan,
                worst: nan,
            };
        }
        let u_ref = want[i] - before[i] as f64;
        let d = (after[i] as f64 - want[i]).abs();
        diff2 += d * d;
        ref2 += u_ref * u_ref;
        update_max = update_max.max(u_ref.abs());
        if largest.len() < keep {
            largest.push(Reverse(d.to_bits()));
        } else if largest
            .peek()
            .is_some_and(|&Reverse(least)| d.to_bits() > least)
        {
            largest.pop();
            largest.push(Reverse(d.to_bits()));
        }
    }
    let top: Vec<f64> = largest
        .into_iter()
        .map(|Reverse(b)| f64::from_bits(b))
        .collect();
    let top_max = top.iter().fold(0f64, |m, &d| m.max(d));
    let top_min = top.iter().fold(f64::INFINITY, |m, &d| m.min(d));
    let (worst_all, worst_rest) = if keep == 1 {
        (top_max, top_max)
    } else {
        (top_max, top_min)
    };
    let rest2 = (diff2 - top.iter().map(|d| d * d).sum::<f64>()).max(0.0);
    UpdateError {
        l2: (diff2.sqrt() / ref2.sqrt(), rest2.sqrt() / ref2.sqrt()),
        worst: (worst_all / update_max, worst_rest / update_max),
    }
}

/// Holds the GPU's weight updates to the noise floor of f32 arithmetic: their error against the
/// float64 reference's update, relative L2 and at the worst weight (see [`UpdateError`]; the
/// largest one in 10^5 errors left out), at most 3 times that of the same step computed by the
/// reference in float32 (`f32_ref`, from the same `before` state). Per kind of matmul weight
/// (all layers together), for wte (the classifier's weight too) and for the whole model.
fn check_update_noise(
    what: &str,
    layout: &ParamLayout,
    before: &[f32],
    gpu: &[f32],
    f32_ref: &[f32],
    want: &[f64],
) {
    use wgpt::model::BlockTensor;
    let mut groups = vec![("wte", vec![layout.entry(ParamId::Wte).range()])];
    for kind in [
        BlockTensor::CAttnWeight,
        BlockTensor::AttnProjWeight,
        BlockTensor::CFcWeight,
        BlockTensor::MlpProjWeight,
    ] {
        let ranges = layout
            .entries
            .iter()
            .filter(|(id, _)| matches!(id, ParamId::Block(_, t) if *t == kind))
            .map(|(_, e)| e.range())
            .collect();
        groups.push((kind.suffix(), ranges));
    }
    #[allow(clippy::single_range_in_vec_init)] // one range: every weight
    groups.push(("whole model", vec![0..want.len()]));
    eprintln!(
        "{what}: update error against float64, GPU vs float32 reference, without the largest \
         1 in 10^5 (all)"
    );
    let mut failures = Vec::new();
    for (name, ranges) in &groups {
        let g = update_error(ranges, before, gpu, want);
        let r = update_error(ranges, before, f32_ref, want);
        eprintln!(
            "  {name:20} L2 {:.2e} vs {:.2e} ({:.2}x; all {:.2e} vs {:.2e}) | worst {:.2e} vs \
             {:.2e} ({:.2}x; all {:.2e} vs {:.2e})",
            g.l2.1,
            r.l2.1,
            g.l2.1 / r.l2.1,
            g.l2.0,
            r.l2.0,
            g.worst.1,
            r.worst.1,
            g.worst.1 / r.worst.1,
            g.worst.0,
            r.worst.0,
        );
        // NaN fails too.
        if !(g.l2.1 <= 3.0 * r.l2.1 && g.worst.1 <= 3.0 * r.worst.1) {
            failures.push(*name);
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: the update of {failures:?} is more than 3 times as far from float64 as float32 \
         arithmetic takes it"
    );
}

fn check_against_reference(s: TrainSettings, what: &str) {
    // Measured: at most 6 of the 39,680 weights a step have a gradient at the noise (key biases,
    // whose true gradient is zero).
    let bounds = Bounds {
        grad_tol: 1e-5,
        max_loose: 16,
        f32_floor: false,
    };
    check_against_reference_with(
        s,
        None,
        what,
        &saved_weights(7),
        tokens(2000, 1),
        10,
        bounds,
    );
}

#[test]
fn ten_f32_steps_match_the_float64_reference() {
    // Clipping is active early (norms start above 1), weight decay on, warmup then cosine.
    check_against_reference(settings(2, 16), "flash");
}

#[test]
fn naive_attention_unfused_with_grad_accumulation_matches_the_reference() {
    let mut s = settings(2, 12);
    s.attention = AttentionKind::Naive;
    s.fused = false;
    s.fused_optimizer = false;
    s.grad_accum = 2;
    check_against_reference(s, "naive+unfused+accum2");
}

/// A model whose token table is larger than one binding and whose logits are larger than one
/// chunk, on limits a few hundred KiB wide: parameters over several storage buffers, wte in two
/// pieces, the classifier in two chunks of rows, AdamW and the norm per buffer. The same
/// reference comparison as above.
#[test]
fn split_storage_and_chunked_classifier_match_the_reference() {
    let cfg = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 96,
        block_size: 48,
        vocab_size: 600,
        padded_vocab_size: 640,
    };
    let limits = AdapterLimits {
        max_binding: 192 << 10,
        ..AdapterLimits::of(gpu())
    };
    for (precision, grad_accum, fused) in [(Precision::F32, 1, true), (Precision::F32, 2, false)] {
        let mut s = TrainSettings::new(cfg, 2, 48);
        s.steps = 6;
        s.warmup_steps = 2;
        s.max_lr = 1e-3;
        s.precision = precision;
        s.grad_accum = grad_accum;
        s.fused_optimizer = fused;
        let what = format!("split {precision} accum {grad_accum} fused optimiser {fused}");
        let tok = Arc::new(
            tokens(3000, 8)
                .iter()
                .map(|&t| (t * 2) % 600)
                .collect::<Vec<u32>>(),
        );
        let init = saved_weights_for(cfg, 21);
        // Measured: at most 118 of the 290,560 weights a step (the first) have a gradient at
        // the noise.
        let bounds = Bounds {
            grad_tol: 1e-5,
            max_loose: 240,
            f32_floor: false,
        };
        let tr = check_against_reference_with(s, Some(&limits), &what, &init, tok, 6, bounds);
        let plan = tr.plan();
        assert_eq!(
            plan.storage.pieces.wte.len(),
            2,
            "{what}: wte in two pieces"
        );
        assert!(plan.storage.buffers.len() >= 4, "{what}: several buffers");
        assert_eq!(
            plan.chunks, 2,
            "{what}: two chunks of {} rows",
            plan.chunk_rows
        );
        for (id, pieces) in plan.storage.pieces.iter() {
            for p in pieces {
                let bytes = (p.len() * 4) as u64;
                assert!(bytes <= limits.max_binding, "{}: {bytes} bytes", id.name());
            }
        }
    }
}

/// GPT-2 124M at its real shape (12 layers, 12 heads, 768 wide, block 1024, vocab 50257 padded to
/// 50304), from a fixed Hugging Face-format checkpoint, on WebGPU's default limits (128 MiB per
/// binding: wte in two pieces, the parameters over several buffers): a few steps at a small
/// B x T against the float64 reference, weights included.
#[test]
fn gpt2_124m_at_its_real_shape_matches_the_reference() {
    let cfg = GptConfig::gpt2();
    let dir = std::env::temp_dir().join(format!("wgpt-gpt2-124m-train-{}", std::process::id()));
    let init = hf_checkpoint(&dir, &cfg, 124);
    std::fs::remove_dir_all(&dir).ok();
    let corpus = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/shakespeare.txt"
    ))
    .unwrap();
    // Every fourth token moved into wte's second piece (rows past 43,690), so that the
    // embedding's gradient lands in both pieces.
    let tok = wgpt::data::Tokenizer::gpt2().encode(&corpus[..4000]);
    let tok: Vec<u32> = tok
        .iter()
        .enumerate()
        .map(|(i, &t)| if i % 4 == 3 { 43_691 + t % 6_566 } else { t })
        .collect();
    let tok = Arc::new(tok);
    // Two steps: AdamW's first (moments empty) and one with moments; on the software driver a
    // GPT-2 124M step takes about a minute.
    let mut s = TrainSettings::new(cfg, 2, 8);
    s.steps = 2;
    s.warmup_steps = 1;
    s.precision = Precision::F32;
    let limits = AdapterLimits::webgpu_default(gpu().memory);
    // Twelve layers of 768-wide sums and a 50257-wide softmax: the gradients carry a little more
    // f32 rounding than the small models' (8.4e-6 measured on the software driver).
    // Measured: 68,685 of the 124,475,904 weights have a gradient at the noise in the first step
    // (moments empty: AdamW's step is about lr times the gradient's sign), 885 in the second.
    let bounds = Bounds {
        grad_tol: 3e-5,
        max_loose: 100_000,
        f32_floor: true,
    };
    let tr = check_against_reference_with(s, Some(&limits), "gpt2 124M", &init, tok, 2, bounds);
    let plan = tr.plan();
    eprintln!("gpt2 124M: {}", plan.line());
    assert_eq!(
        plan.storage.pieces.wte.len(),
        2,
        "wte (154 MiB) in two pieces"
    );
    assert!(plan.storage.buffers.len() >= 4);
    for b in &plan.storage.buffers {
        assert!((b.len * 4) as u64 <= limits.max_binding);
    }
}

#[test]
fn full_model_gradient_matches_finite_differences() {
    // GPU gradients (f32) against central differences of the float64 reference loss.
    let s = settings(2, 8);
    let init = saved_weights(3);
    let tok = tokens(200, 2);
    let mut loader = DataLoader::new(tok.clone(), 2, 8).unwrap();
    let b = loader.next_batch().unwrap();
    let mut tr = Trainer::new(arc_gpu(), s.clone(), tok, Some(&init)).unwrap();
    let (loss, grads) = tr.loss_and_grads(&[(b.x.clone(), b.y.clone())]).unwrap();
    let model = ReferenceModel::new(s.config);
    let mut p: Vec<f64> = init.params.iter().map(|&x| x as f64).collect();
    let (ref_loss, _) = model.loss_and_grads(&p, &b.x, &b.y, 2, 8);
    assert!(
        ((loss as f64 - ref_loss) / ref_loss).abs() < 1e-5,
        "loss {loss} vs {ref_loss}"
    );
    let mut r = rng(9);
    let mut worst = 0f64;
    for id in storage_order(&s.config) {
        let e = model.layout.entry(id);
        for _ in 0..3 {
            let mut k = r.below(e.len() as u64) as usize;
            if id == ParamId::Wte {
                // a row of a token present in the batch, so the gradient is not trivially zero
                k = b.x[r.below(b.x.len() as u64) as usize] as usize * 32 + r.below(32) as usize;
            }
            let i = e.offset + k;
            let h = 1e-5;
            let orig = p[i];
            p[i] = orig + h;
            let lp = model.loss_and_grads(&p, &b.x, &b.y, 2, 8).0;
            p[i] = orig - h;
            let lm = model.loss_and_grads(&p, &b.x, &b.y, 2, 8).0;
            p[i] = orig;
            let fd = (lp - lm) / (2.0 * h);
            let g = grads[i] as f64;
            let err = (g - fd).abs() / (fd.abs() + 1e-3);
            worst = worst.max(err);
            assert!(
                err < 1e-2,
                "{}[{k}]: GPU gradient {g} vs finite difference {fd}",
                id.name()
            );
        }
    }
    eprintln!("worst relative gradient error vs finite differences: {worst:.2e}");
}

#[test]
fn memorises_one_repeated_batch() {
    let mut s = settings(2, 16);
    s.steps = 200;
    s.warmup_steps = 5;
    s.max_lr = 3e-3;
    s.weight_decay = 0.0;
    // Exactly one batch of data: the loader returns it every step.
    let tok = tokens(2 * 16 + 1, 5);
    let mut tr = Trainer::new(arc_gpu(), s, tok, None).unwrap();
    let mut last = f32::INFINITY;
    for i in 0..150 {
        last = tr.step().unwrap().loss;
        if last < 0.5 {
            eprintln!("loss {last} after {} steps", i + 1);
            return;
        }
    }
    panic!("the loss on one repeated batch only fell to {last}");
}

#[test]
fn resumed_run_prints_identical_losses() {
    let mut s = settings(2, 16);
    s.steps = 8;
    if needs(Feature::F16, "an f16 run resumed") {
        s.precision = Precision::F16;
    }
    let tok = tokens(3000, 4);
    let init = saved_weights(11);
    let mut full = Trainer::new(arc_gpu(), s.clone(), tok.clone(), Some(&init)).unwrap();
    let whole: Vec<f32> = (0..8).map(|_| full.step().unwrap().loss).collect();
    let mut first = Trainer::new(arc_gpu(), s.clone(), tok.clone(), Some(&init)).unwrap();
    let mut parts: Vec<f32> = (0..4).map(|_| first.step().unwrap().loss).collect();
    let dir = std::env::temp_dir().join(format!("wgpt-resume-{}", std::process::id()));
    let path = wgpt::checkpoint::checkpoint_path(&dir, 4);
    first.checkpoint().unwrap().save(&path).unwrap();
    drop(first);
    let (_, ck) = wgpt::checkpoint::load_newest(&dir).unwrap();
    let mut second = Trainer::new(arc_gpu(), s, tok, Some(&ck)).unwrap();
    assert_eq!(second.step_index(), 4);
    parts.extend((0..4).map(|_| second.step().unwrap().loss));
    std::fs::remove_dir_all(&dir).ok();
    assert_bitwise_eq("losses of 8 steps vs 4 + resume + 4", &parts, &whole);
}

#[test]
fn resumed_run_on_shuffled_shards_continues_exactly() {
    // A folder of small shards (so that steps cross shard boundaries and the run passes into a
    // second, differently shuffled epoch): 6 steps in one go against 3, a checkpoint, and 3
    // more in a new trainer. Loader state (epoch, position)
    // and the per-epoch orders must bring back the same batches: same losses and weights.
    let dir = std::env::temp_dir().join(format!("wgpt-shard-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let docs: Vec<String> = (0..40)
        .map(|i| {
            serde_json::json!({ "text": format!("Document {i} says {} things.", i * 7) })
                .to_string()
        })
        .collect();
    std::fs::write(dir.join("docs.jsonl"), docs.join("\n")).unwrap();
    let mut o = wgpt::data::prepare::PrepareOptions::new(dir.join("shards"));
    o.shard_tokens = 100;
    wgpt::data::prepare::prepare(&[dir.join("docs.jsonl")], &o).unwrap();
    let corpus = wgpt::data::Corpus::open(&dir.join("shards")).unwrap();
    let cfg = GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
        vocab_size: 50257,
        padded_vocab_size: 50304,
    };
    let mut s = TrainSettings::new(cfg, 4, 16);
    s.steps = 6;
    s.warmup_steps = 2;
    s.max_lr = 1e-3;
    s.shuffle = true;
    let init = saved_weights_for(cfg, 5);
    let mut full = Trainer::new(arc_gpu(), s.clone(), corpus.clone(), Some(&init)).unwrap();
    let whole: Vec<f32> = (0..6).map(|_| full.step().unwrap().loss).collect();
    let mut first = Trainer::new(arc_gpu(), s.clone(), corpus.clone(), Some(&init)).unwrap();
    let mut parts: Vec<f32> = (0..3).map(|_| first.step().unwrap().loss).collect();
    let path = wgpt::checkpoint::checkpoint_path(&dir.join("ck"), 3);
    first.checkpoint().unwrap().save(&path).unwrap();
    drop(first);
    let (_, ck) = wgpt::checkpoint::load_newest(&dir.join("ck")).unwrap();
    let state = ck.state.as_ref().unwrap();
    eprintln!(
        "resumed at epoch {} position {}",
        state.loader_epoch, state.loader_position
    );
    let mut second = Trainer::new(arc_gpu(), s, corpus, Some(&ck)).unwrap();
    parts.extend((0..3).map(|_| second.step().unwrap().loss));
    assert_bitwise_eq("losses of 6 steps vs 3 + resume + 3", &parts, &whole);
    let end = full.checkpoint().unwrap().state.unwrap();
    assert!(end.loader_epoch >= 1, "the run stayed in its first epoch");
    assert_bitwise_eq(
        "weights after 6 steps vs 3 + resume + 3",
        &second.params().unwrap(),
        &full.params().unwrap(),
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn queued_steps_train_exactly_as_steps_waited_for() {
    // Steps queued back to back (the loss scaler and Adam's count advanced on the GPU, the
    // statistics read one step late) against the same steps each waited for: every statistic
    // and the whole checkpoint (weights, both moments, counts, loss scale, loader epoch and
    // position, random generator) bit for bit, in f32 and in f16 (dynamic loss scaling on the
    // GPU). The corpus is short enough for the loader to wrap into its second epoch. The f16
    // runs start at a loss scale that overflows the first steps' gradients: each such step is
    // skipped and halves the scale on the GPU while the next step is already queued behind it,
    // as the scaler's rule says, until a scale that fits lets the run train.
    let mut precisions = vec![Precision::F32];
    if needs(Feature::F16, "queued f16 steps and their overflows") {
        precisions.push(Precision::F16);
    }
    for precision in precisions {
        let mut s = settings(2, 16);
        s.precision = precision;
        s.steps = 7;
        s.grad_accum = 2;
        // 12 batches of 2 x 16 per epoch; the 7 steps take 14.
        let tok = tokens(400, 5);
        let init = saved_weights(13);
        let f16 = precision == Precision::F16;
        // 2^24: these gradients overflow f16 at 2^24 and 2^23 and fit at 2^22 (measured; the
        // default 2^16 is far below), so two steps are skipped and five train.
        let start_scale = if f16 { 16_777_216.0 } else { 1.0 };
        let mut waited = Trainer::new(arc_gpu(), s.clone(), tok.clone(), Some(&init)).unwrap();
        let mut queued = Trainer::new(arc_gpu(), s.clone(), tok.clone(), Some(&init)).unwrap();
        let mut polled = Trainer::new(arc_gpu(), s, tok, Some(&init)).unwrap();
        if f16 {
            waited.set_loss_scale(start_scale).unwrap();
            queued.set_loss_scale(start_scale).unwrap();
            polled.set_loss_scale(start_scale).unwrap();
        }
        let a: Vec<StepStats> = (0..7).map(|_| waited.step().unwrap()).collect();
        let mut b = Vec::new();
        queued
            .run_steps(7, |st, _| {
                assert!(st.encode_ms >= 0.0);
                b.push(*st);
                Ok(())
            })
            .unwrap();
        assert_eq!(queued.in_flight(), 0);
        // Polled, never waited for, as a browser's event loop must run it: queued two deep,
        // each step's statistics taken once a non-blocking poll finds them.
        assert!(
            polled.poll().unwrap().is_none(),
            "nothing queued, nothing to take"
        );
        let (mut c, mut empty_polls, began) = (Vec::new(), 0, std::time::Instant::now());
        while c.len() < 7 {
            while polled.in_flight() < PIPELINE_DEPTH && polled.queued_index() < 7 {
                polled.submit().unwrap();
            }
            match polled.poll().unwrap() {
                Some(st) => c.push(st),
                None => {
                    empty_polls += 1;
                    assert!(began.elapsed().as_secs() < 600, "no step finished");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
        eprintln!("{precision}: {empty_polls} polls found no finished step");
        assert_eq!(polled.in_flight(), 0);
        let what = format!("{precision}");
        for (name, f) in [
            ("losses", (|x: &StepStats| x.loss) as fn(&StepStats) -> f32),
            ("norms", |x| x.norm),
            ("loss scales", |x| x.loss_scale),
        ] {
            let (want, got): (Vec<f32>, Vec<f32>) =
                a.iter().zip(&c).map(|(a, c)| (f(a), f(c))).unzip();
            assert_bitwise_eq(&format!("{what} polled {name}"), &got, &want);
        }
        let field = |v: &[StepStats], f: fn(&StepStats) -> f32| v.iter().map(f).collect::<Vec<_>>();
        assert_bitwise_eq(
            &format!("{what} losses"),
            &field(&b, |x| x.loss),
            &field(&a, |x| x.loss),
        );
        assert_bitwise_eq(
            &format!("{what} norms"),
            &field(&b, |x| x.norm),
            &field(&a, |x| x.norm),
        );
        assert_bitwise_eq(
            &format!("{what} loss scales"),
            &field(&b, |x| x.loss_scale),
            &field(&a, |x| x.loss_scale),
        );
        assert_eq!(
            b.iter()
                .map(|x| (x.step, x.skipped, x.lr))
                .collect::<Vec<_>>(),
            a.iter()
                .map(|x| (x.step, x.skipped, x.lr))
                .collect::<Vec<_>>()
        );
        // The queued steps' scaler against its rule, followed here on the CPU: a skipped step
        // halves the scale (no clamp is near), a taken one keeps it (the growth interval of
        // 2000 clean steps is far).
        let (mut scale, mut skips, mut clean) = (start_scale, 0, 0);
        for st in &b {
            if st.skipped {
                scale *= 0.5;
                skips += 1;
                clean = 0;
            } else {
                clean += 1;
            }
            eprintln!(
                "{what} step {}: loss {} norm {} skipped {} scale {}",
                st.step, st.loss, st.norm, st.skipped, st.loss_scale
            );
            assert_eq!(st.loss_scale, scale, "{what} step {}: loss scale", st.step);
        }
        if f16 {
            assert!(
                b[0].skipped && b[1].skipped && b[2..].iter().all(|x| !x.skipped),
                "{what}: the first two steps overflow, the others train"
            );
        } else {
            assert_eq!(skips, 0, "{what}: no step overflows");
        }
        let (ca, cb) = (waited.checkpoint().unwrap(), queued.checkpoint().unwrap());
        assert_same_checkpoint(&format!("{what} after 7 steps"), &cb, &ca);
        let cc = polled.checkpoint().unwrap();
        assert_same_checkpoint(&format!("{what} polled, after 7 steps"), &cc, &ca);
        assert!(
            cb.params
                .iter()
                .zip(&init.params)
                .any(|(a, b)| a.to_bits() != b.to_bits()),
            "{what}: no step trained"
        );
        let sb = cb.state.unwrap();
        eprintln!("{what}: state after 7 steps {sb:?}");
        assert_eq!(sb.step, 7);
        assert_eq!(sb.adam_t, 7 - skips);
        assert_eq!(sb.loss_scale, scale);
        assert_eq!(
            sb.clean_steps, clean,
            "{what}: clean steps since the last skip"
        );
        assert_eq!(
            (sb.loader_epoch, sb.loader_position),
            (1, 2 * 32),
            "{what}: loader state"
        );
    }
}
#[test]
fn steps_recorded_on_several_threads_train_exactly_as_on_one() {
    // A 12-layer model (as many dispatches as GPT-2 124M: 270) recorded by one thread and split
    // into three runs recorded at once, each a command buffer: losses, norms and every weight
    // bit for bit after 3 queued steps, profiled (timestamps written across the runs).
    let config = GptConfig {
        n_layer: 12,
        ..tiny()
    };
    let mut s = TrainSettings::new(config, 1, 16);
    s.precision = Precision::F32;
    s.steps = 3;
    let tok = tokens(2000, 8);
    let init = saved_weights_for(config, 21);
    let mut runs = Vec::new();
    for threads in [1, 3] {
        let mut tr = Trainer::new(arc_gpu(), s.clone(), tok.clone(), Some(&init)).unwrap();
        assert_eq!(tr.graph().dispatch_count(), 270);
        tr.set_recording_threads(threads);
        let profiling = tr.enable_profiling().is_ok();
        let mut stats = Vec::new();
        let mut nodes = Vec::new();
        tr.run_steps(3, |st, times| {
            stats.push((st.loss, st.norm));
            nodes.push(times.len());
            Ok(())
        })
        .unwrap();
        eprintln!("{threads} recording threads: profiled {profiling}, node times {nodes:?}");
        if profiling {
            let all = tr.graph().schedule(true).len();
            assert!(
                nodes.iter().all(|&n| n == all),
                "{threads} threads: {nodes:?} of {all}"
            );
        }
        runs.push((stats, tr.params().unwrap()));
    }
    let (one, three) = (&runs[0], &runs[1]);
    let pick = |v: &[(f32, f32)], f: fn(&(f32, f32)) -> f32| v.iter().map(f).collect::<Vec<_>>();
    assert_bitwise_eq("losses", &pick(&three.0, |x| x.0), &pick(&one.0, |x| x.0));
    assert_bitwise_eq("norms", &pick(&three.0, |x| x.1), &pick(&one.0, |x| x.1));
    assert_bitwise_eq("weights after 3 steps", &three.1, &one.1);
}

#[test]
fn f16_training_tracks_f32() {
    // Ten steps in f16 (activations and their gradients stored in f16, f32 master weights and
    // moments) against the same ten steps in f32 from the same weights. After every step, each
    // tensor's distance to the f32 run's weights is measured against how far the f32 run has
    // moved it (L2 norms): f16 changes the updates by its rounding, not by their size. The key
    // bias is left out: its true gradient is zero (the softmax does not see a shift common to a
    // query's scores), so both runs move it by their own rounding noise. Each step's loss
    // (f32, from the f16 logits) equals the f32 run's to 1e-4 (measured: 7e-6 at worst), and
    // the loss on the batches trained on falls by the f32 run's drop to 1e-3 of it (measured:
    // 9e-5).
    if !needs(Feature::F16, "f16 training") {
        return;
    }
    // The weights' bound after step i (0-based) is 0.1 / sqrt(i + 1). After the first step
    // AdamW's update is lr times the gradient's sign, so a weight whose gradient is below its
    // f16 rounding error moves by 2 lr the other way: a fraction f of such weights puts its
    // tensor at 2 sqrt(f) (measured on the CPU driver: 4.4e-2 in mlp.c_proj.weight, f = 5e-4).
    // The moments then average such errors over the steps, and the worst tensor falls about
    // as 1 / sqrt(steps): 2.0e-2, 1.2e-2, 9.1e-3, ... 5.8e-3 after ten steps (most tensors 5e-4
    // to 1.5e-3 by then, a few f16 roundings of their gradients). The bound is 2.3 times the
    // first step's and 5.5 times the tenth's.
    let s32 = settings(2, 16);
    let mut s16 = s32.clone();
    s16.precision = Precision::F16;
    let tok = tokens(2000, 1);
    let init = saved_weights(7);
    let cfg = tiny();
    let layout = ParamLayout::new(&cfg);
    let mut a = Trainer::new(arc_gpu(), s32, tok.clone(), Some(&init)).unwrap();
    let mut b = Trainer::new(arc_gpu(), s16, tok.clone(), Some(&init)).unwrap();
    // The ten batches the steps train on.
    let mut loader = DataLoader::new(tok, 2, 16).unwrap();
    let seen: Vec<_> = (0..10).map(|_| loader.next_batch().unwrap()).collect();
    let before = (a.mean_loss(&seen).unwrap(), b.mean_loss(&seen).unwrap());
    // The weights compared: every tensor but the key bias.
    let keep = |id: ParamId, i: usize| {
        !(id.name().ends_with("attn.c_attn.bias") && (cfg.n_embd..2 * cfg.n_embd).contains(&i))
    };
    let l2 = |id: ParamId, x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .enumerate()
            .filter(|(i, _)| keep(id, *i))
            .map(|(_, (&p, &q))| (p as f64 - q as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    for i in 0..10 {
        let (x, y) = (a.step().unwrap(), b.step().unwrap());
        assert!(
            !y.skipped,
            "no step should overflow at the starting scale here"
        );
        let rel_loss = ((y.loss - x.loss) / x.loss).abs();
        assert!(
            rel_loss <= 1e-4,
            "step {i}: f16 loss {} vs f32 {} (relative {rel_loss:.1e})",
            y.loss,
            x.loss
        );
        let bound = 0.1 / ((i + 1) as f64).sqrt();
        let (w32, w16) = (a.params().unwrap(), b.params().unwrap());
        let mut worst = (0.0f64, String::new());
        for (id, e) in layout.entries.iter() {
            let r = e.range();
            let moved = l2(id, &w32[r.clone()], &init.params[r.clone()]);
            let apart = l2(id, &w16[r.clone()], &w32[r]);
            let rel = apart / moved;
            assert!(
                rel <= bound,
                "step {i}: {}: the f16 weights are {apart:.3e} from the f32 run's, which moved \
                 {moved:.3e} (relative {rel:.2e} > {bound:.2e})",
                id.name()
            );
            if rel > worst.0 {
                worst = (rel, id.name());
            }
        }
        eprintln!(
            "step {i}: loss f32 {} f16 {} (relative {rel_loss:.1e}, scale {}); f16 weights from \
             f32's relative to the update: worst {:.2e} ({})",
            x.loss, y.loss, y.loss_scale, worst.0, worst.1
        );
    }
    let after = (a.mean_loss(&seen).unwrap(), b.mean_loss(&seen).unwrap());
    let (drop32, drop16) = (before.0 - after.0, before.1 - after.1);
    eprintln!(
        "loss on the batches trained on: f32 {:.6} -> {:.6}, f16 {:.6} -> {:.6}",
        before.0, after.0, before.1, after.1
    );
    assert!(
        drop32 > 0.0,
        "the f32 loss did not fall: {before:?} -> {after:?}"
    );
    let rel = ((drop16 - drop32) / drop32).abs();
    assert!(
        rel <= 1e-3,
        "the f16 loss fell by {drop16:.6}, the f32 loss by {drop32:.6} (relative difference \
         {rel:.1e})"
    );
}
#[test]
fn forced_overflow_is_skipped_and_halves_the_scale() {
    if !needs(Feature::F16, "the f16 loss scaler") {
        return;
    }
    let mut s = settings(2, 16);
    s.precision = Precision::F16;
    let tok = tokens(2000, 1);
    let mut tr = Trainer::new(arc_gpu(), s, tok, Some(&saved_weights(7))).unwrap();
    tr.step().unwrap();
    let before = tr.params().unwrap();
    // A scale this large makes the f16 gradients overflow to infinity.
    tr.set_loss_scale(1e30).unwrap();
    let st = tr.step().unwrap();
    assert!(st.skipped, "the overflowing step must be skipped");
    assert_eq!(st.loss_scale, 5e29);
    assert!(
        tr.params().unwrap() == before,
        "a skipped step must leave the weights unchanged"
    );
    tr.set_loss_scale(1024.0).unwrap();
    assert!(!tr.step().unwrap().skipped);
}

#[test]
fn trainer_and_generator_can_move_to_another_thread() {
    fn is_send<T: Send>() {}
    is_send::<Trainer>();
    is_send::<wgpt::sample::Generator>();
}
