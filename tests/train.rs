//! The whole training step on the GPU against the independent float64 reference, gradient
//! checks, memorisation, mixed precision, and exact resume from a checkpoint.

mod common;
use common::*;
use std::sync::Arc;
use wgpt::checkpoint::Checkpoint;
use wgpt::data::DataLoader;
use wgpt::gpu::AdapterLimits;
use wgpt::model::init::init_params;
use wgpt::model::params::storage_order;
use wgpt::model::{GptConfig, ParamId, ParamLayout};
use wgpt::reference::model::{ReferenceModel, ReferenceOptim, ReferenceTrainer};
use wgpt::train::settings::{AttentionKind, Precision, TrainSettings};
use wgpt::train::trainer::{StepStats, Trainer};

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

/// Trains `steps` steps on the GPU (planned for `limits`, or the device's own) and in float64
/// on the same data, each step taken by both from the GPU's state (weights and AdamW moments),
/// and compares every step's gradients tensor by tensor (max-norm relative error within
/// `grad_tol`), loss and norm (within 1e-5) and every weight after the step (see
/// [`check_adamw_step`]).
fn check_against_reference_with(
    s: TrainSettings,
    limits: Option<&AdapterLimits>,
    what: &str,
    init: &Checkpoint,
    tok: Arc<Vec<u32>>,
    steps: usize,
    grad_tol: f32,
) -> Trainer {
    let optim = ReferenceOptim {
        schedule: s.schedule(),
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: s.weight_decay,
        grad_clip: s.grad_clip,
    };
    let mut r = ReferenceTrainer::new(ReferenceModel::new(s.config), &init.params, optim);
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
    for i in 0..steps {
        let micro: Vec<_> = (0..s.grad_accum)
            .map(|_| {
                let b = loader.next_batch().unwrap();
                (b.x, b.y)
            })
            .collect();
        if i > 0 {
            let state = tr.checkpoint().unwrap();
            let (m, v) = state.moments.as_ref().unwrap();
            r.set_state(&state.params, m, v);
        }
        let want = r.step(&micro, s.batch_size, s.seq_len);
        let st = tr.step().unwrap();
        // The step's gradients (f32 runs: a loss scale of 1), before clipping.
        let grads = tr.grads().unwrap();
        let mut worst = (0f32, String::new());
        for (id, e) in layout.entries.iter() {
            let want32: Vec<f32> = r.grads[e.range()].iter().map(|&g| g as f32).collect();
            let err = rel_error(&grads[e.range()], &want32);
            if err.is_nan() || err > worst.0 {
                worst = (err, id.name());
            }
            assert!(
                err <= grad_tol,
                "{what} step {i}: gradient of {} off by {err:e} (relative, max-norm)",
                id.name()
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
        check_adamw_step(
            &format!("{what} step {i}"),
            &layout,
            &weights,
            &r.params,
            &r.grads,
            want.lr,
        );
    }
    tr
}

fn check_against_reference(s: TrainSettings, what: &str) {
    check_against_reference_with(s, None, what, &saved_weights(7), tokens(2000, 1), 10, 1e-5);
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
        let tr = check_against_reference_with(s, Some(&limits), &what, &init, tok, 6, 1e-5);
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
    let tok = Arc::new(wgpt::data::Tokenizer::gpt2().encode(&corpus[..4000]));
    // Two steps: AdamW's first (moments empty) and one with moments; on the software driver a
    // GPT-2 124M step takes about a minute.
    let mut s = TrainSettings::new(cfg, 2, 8);
    s.steps = 2;
    s.warmup_steps = 1;
    s.precision = Precision::F32;
    let limits = AdapterLimits::webgpu_default(gpu().memory);
    // Twelve layers of 768-wide sums and a 50257-wide softmax: the gradients carry a little more
    // f32 rounding than the small models' (8.4e-6 measured on the software driver).
    let tr = check_against_reference_with(s, Some(&limits), "gpt2 124M", &init, tok, 2, 3e-5);
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
    if gpu().has_f16() {
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
    // and every weight bit for bit, in f32 and, where the adapter has it, in f16 (dynamic loss
    // scaling on the GPU).
    let mut precisions = vec![Precision::F32];
    if gpu().has_f16() {
        precisions.push(Precision::F16);
    }
    for precision in precisions {
        let mut s = settings(2, 16);
        s.precision = precision;
        s.steps = 7;
        s.grad_accum = 2;
        let tok = tokens(3000, 5);
        let init = saved_weights(13);
        let mut waited = Trainer::new(arc_gpu(), s.clone(), tok.clone(), Some(&init)).unwrap();
        let a: Vec<StepStats> = (0..7).map(|_| waited.step().unwrap()).collect();
        let mut queued = Trainer::new(arc_gpu(), s, tok, Some(&init)).unwrap();
        let mut b = Vec::new();
        queued
            .run_steps(7, |st, _| {
                assert!(st.encode_ms >= 0.0);
                b.push(*st);
                Ok(())
            })
            .unwrap();
        assert_eq!(queued.in_flight(), 0);
        let what = format!("{precision}");
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
        assert_bitwise_eq(
            &format!("{what} weights after 7 steps"),
            &queued.params().unwrap(),
            &waited.params().unwrap(),
        );
        let (ca, cb) = (waited.checkpoint().unwrap(), queued.checkpoint().unwrap());
        let (sa, sb) = (ca.state.unwrap(), cb.state.unwrap());
        assert_eq!(
            (
                sb.step,
                sb.adam_t,
                sb.loss_scale,
                sb.clean_steps,
                sb.loader_position
            ),
            (
                sa.step,
                sa.adam_t,
                sa.loss_scale,
                sa.clean_steps,
                sa.loader_position
            )
        );
        assert_eq!(sb.step, 7);
        assert_eq!(sb.adam_t, 7);
    }
}

#[test]
fn steps_recorded_on_several_threads_train_exactly_as_on_one() {
    // A 12-layer model (as many dispatches as GPT-2 124M: 282) recorded by one thread and split
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
        assert_eq!(tr.graph().dispatch_count(), 282);
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
    if !gpu().has_f16() {
        eprintln!("adapter has no SHADER_F16: skipped");
        return;
    }
    let s32 = settings(2, 16);
    let mut s16 = s32.clone();
    s16.precision = Precision::F16;
    let tok = tokens(2000, 1);
    let init = saved_weights(7);
    let mut a = Trainer::new(arc_gpu(), s32, tok.clone(), Some(&init)).unwrap();
    let mut b = Trainer::new(arc_gpu(), s16, tok, Some(&init)).unwrap();
    for i in 0..10 {
        let (x, y) = (a.step().unwrap(), b.step().unwrap());
        let rel = ((y.loss - x.loss) / x.loss).abs();
        eprintln!(
            "step {i}: f32 {} f16 {} (rel {rel:.1e}, scale {})",
            x.loss, y.loss, y.loss_scale
        );
        assert!(
            !y.skipped,
            "no step should overflow at the starting scale here"
        );
        assert!(
            rel <= 2e-2,
            "step {i}: f16 loss {} vs f32 {}",
            y.loss,
            x.loss
        );
    }
}

#[test]
fn forced_overflow_is_skipped_and_halves_the_scale() {
    if !gpu().has_f16() {
        eprintln!("adapter has no SHADER_F16: skipped");
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
