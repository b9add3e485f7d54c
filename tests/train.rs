//! The whole training step on the GPU against the independent float64 reference, gradient
//! checks, memorisation, mixed precision, and exact resume from a checkpoint.

mod common;
use common::*;
use std::sync::Arc;
use wgpt::checkpoint::Checkpoint;
use wgpt::data::DataLoader;
use wgpt::model::init::init_params;
use wgpt::model::{GptConfig, ParamLayout};
use wgpt::reference::model::{ReferenceModel, ReferenceOptim, ReferenceTrainer};
use wgpt::train::settings::{AttentionKind, Precision, TrainSettings};
use wgpt::train::trainer::Trainer;

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
    // Weights go through a file, as a user's would.
    let cfg = tiny();
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

fn reference_run(
    s: &TrainSettings,
    tok: &Arc<Vec<u32>>,
    init: &Checkpoint,
    steps: usize,
) -> Vec<(f64, f64)> {
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
    (0..steps)
        .map(|_| {
            let micro: Vec<_> = (0..s.grad_accum)
                .map(|_| {
                    let b = loader.next_batch();
                    (b.x, b.y)
                })
                .collect();
            let st = r.step(&micro, s.batch_size, s.seq_len);
            (st.loss, st.norm)
        })
        .collect()
}

fn check_against_reference(s: TrainSettings, what: &str) {
    let tok = tokens(2000, 1);
    let init = saved_weights(7);
    let want = reference_run(&s, &tok, &init, 10);
    let mut tr = Trainer::new(arc_gpu(), s, tok, Some(&init)).unwrap();
    for (i, (wl, wn)) in want.iter().enumerate() {
        let st = tr.step().unwrap();
        let el = (st.loss as f64 - wl).abs() / wl.abs();
        let en = (st.norm as f64 - wn).abs() / wn.abs();
        eprintln!(
            "{what} step {i}: loss {} vs {wl:.6} (rel {el:.1e}), norm {} vs {wn:.4} (rel {en:.1e})",
            st.loss, st.norm
        );
        assert!(
            el <= 2e-3,
            "{what} step {i}: loss {} vs reference {wl}",
            st.loss
        );
        assert!(
            en <= 2e-2,
            "{what} step {i}: norm {} vs reference {wn}",
            st.norm
        );
    }
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

#[test]
fn full_model_gradient_matches_finite_differences() {
    // GPU gradients (f32) against central differences of the float64 reference loss.
    let s = settings(2, 8);
    let init = saved_weights(3);
    let tok = tokens(200, 2);
    let mut loader = DataLoader::new(tok.clone(), 2, 8).unwrap();
    let b = loader.next_batch();
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
    for e in &model.layout.entries {
        for _ in 0..3 {
            let mut k = r.below(e.len() as u64) as usize;
            if e.name == "wte.weight" {
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
                e.name
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
    tr.set_loss_scale(1e30);
    let st = tr.step().unwrap();
    assert!(st.skipped, "the overflowing step must be skipped");
    assert_eq!(st.loss_scale, 5e29);
    assert!(
        tr.params().unwrap() == before,
        "a skipped step must leave the weights unchanged"
    );
    tr.set_loss_scale(1024.0);
    assert!(!tr.step().unwrap().skipped);
}

#[test]
fn trainer_and_generator_can_move_to_another_thread() {
    fn is_send<T: Send>() {}
    is_send::<Trainer>();
    is_send::<wgpt::sample::Generator>();
}
