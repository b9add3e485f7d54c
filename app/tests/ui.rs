//! The app driven through its widgets' accessible labels, as a person would use it, on whatever
//! adapter `Gpu::new` finds (`WGPU_BACKEND=vulkan` with Mesa's software driver in CI). The
//! model is tiny (1 layer, C 32, B 1, T 8) so a step takes a fraction of a second there.

use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wgpt::gpu::{Gpu, GpuOptions};
use wgpt_app::{RunStatus, WgptApp};

/// One device for all tests of this binary (they run on parallel threads).
fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(Gpu::new(&GpuOptions::default()).expect("a wgpu adapter")))
        .clone()
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpt-app-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A small corpus: a few hundred tokens of text.
fn write_corpus(dir: &std::path::Path) -> PathBuf {
    let p = dir.join("corpus.txt");
    let text =
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
            .repeat(20);
    std::fs::write(&p, text).expect("write corpus");
    p
}

fn harness(app: WgptApp) -> Harness<'static, WgptApp> {
    Harness::builder()
        .with_size([1400.0, 1000.0])
        .build_ui_state(|ui, app: &mut WgptApp| app.show(ui), app)
}

/// Steps frames until `cond` holds, failing after `secs` with the app's errors and log.
fn wait_for(
    h: &mut Harness<'_, WgptApp>,
    what: &str,
    secs: u64,
    cond: impl Fn(&Harness<'_, WgptApp>) -> bool,
) {
    let start = Instant::now();
    loop {
        h.step();
        if cond(h) {
            return;
        }
        if start.elapsed() > Duration::from_secs(secs) {
            let app = h.state();
            panic!(
                "timed out after {secs}s waiting for {what}; status {:?}; errors {:?}; log tail {:?}",
                app.status,
                app.errors,
                app.log.iter().rev().take(8).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// The number N in the label that reads `{prefix}N{suffix}...`.
fn number_in_label(h: &Harness<'_, WgptApp>, prefix: &str, suffix: &str) -> Option<usize> {
    let label = label_text(&h.query_by_label_contains(prefix)?);
    let rest = &label[label.find(prefix)? + prefix.len()..];
    rest[..rest.find(suffix)?].trim().parse().ok()
}

/// A node's accessible name (AccessKit keeps a plain label's text in its value).
fn label_text(n: &egui_kittest::Node<'_>) -> String {
    let a = n.accesskit_node();
    a.label().or_else(|| a.value()).unwrap_or_default()
}

fn set_number(h: &Harness<'_, WgptApp>, label: &str, v: f64) {
    h.get_by_label(label).set_value_accesskit(v);
}

fn set_text(h: &Harness<'_, WgptApp>, label: &str, text: &str) {
    h.get_by_label(label).set_text_value_accesskit(text);
}

/// Fills the Train panel with a model small enough for a software driver.
fn configure_tiny_run(h: &mut Harness<'_, WgptApp>, data: &str, ckpt: &str, steps: usize) {
    set_number(h, "Layers", 1.0);
    set_number(h, "Heads", 2.0);
    set_number(h, "Embedding", 32.0);
    set_number(h, "Block size", 16.0);
    set_number(h, "Batch size (B)", 1.0);
    set_number(h, "Sequence length (T)", 8.0);
    set_number(h, "Steps", steps as f64);
    set_number(h, "Warmup steps", 2.0);
    h.get_by_label("f32").click();
    set_text(h, "Data file or folder", data);
    set_text(h, "Checkpoint folder", ckpt);
    h.run_steps(2);
    let t = &h.state().train;
    assert_eq!(
        (
            t.n_layer,
            t.n_head,
            t.n_embd,
            t.block_size,
            t.batch_size,
            t.seq_len,
            t.steps
        ),
        (1, 2, 32, 16, 1, 8, steps),
        "the form did not take the values typed into it"
    );
    assert_eq!(t.data_path, data);
    assert_eq!(t.checkpoint_dir, ckpt);
}

#[test]
fn train_pause_generate_stop() {
    let dir = scratch_dir("train");
    let data = write_corpus(&dir);
    let ckpt = dir.join("ckpt");
    let mut h = harness(WgptApp::new(gpu()));
    h.run();
    configure_tiny_run(
        &mut h,
        &data.display().to_string(),
        &ckpt.display().to_string(),
        1000,
    );

    h.get_by_label("Start").click();
    wait_for(&mut h, "three points on the loss plot", 40, |h| {
        number_in_label(h, "Loss: ", " points").unwrap_or(0) >= 3
    });
    let done = number_in_label(&h, "Steps done: ", "/").expect("step counter");
    assert!(done >= 3, "step counter reads {done}");
    for metric in ["Learning rate: ", "Gradient norm: ", "Tokens per second: "] {
        assert!(
            number_in_label(&h, metric, " points").unwrap_or(0) >= 3,
            "{metric}"
        );
    }
    wait_for(&mut h, "the step counter to rise", 20, |h| {
        number_in_label(h, "Steps done: ", "/").unwrap_or(0) > done
    });
    let losses: Vec<f32> = h.state().run.steps.iter().map(|s| s.loss).collect();
    assert!(losses.iter().all(|l| l.is_finite()), "losses {losses:?}");
    // The first loss of a fresh GPT-2 is about ln(50257) = 10.8.
    assert!((losses[0] - 10.8).abs() < 1.0, "first loss {}", losses[0]);

    h.get_by_label("Pause").click();
    wait_for(&mut h, "the run to pause", 20, |h| {
        h.query_by_label("Run: paused").is_some()
    });
    let paused_at = h.state().run.steps_done();
    std::thread::sleep(Duration::from_millis(300));
    h.run_steps(3);
    assert_eq!(
        h.state().run.steps_done(),
        paused_at,
        "steps ran while paused"
    );

    // Sample from the paused run's own weights.
    h.get_by_label("Generate").click();
    h.run_steps(2);
    set_text(&h, "Prompt", "Speak,");
    set_number(&h, "Max new tokens", 6.0);
    set_number(&h, "Samples", 2.0);
    h.run_steps(2);
    h.get_by_label("Generate text").click();
    wait_for(&mut h, "generated text", 30, |h| {
        number_in_label(h, "Tokens generated: ", "|") == Some(12)
            && h.query_by_label_contains("tokens/s").is_some()
            && !h.state().gen_view.running
    });
    let texts = h.state().gen_view.texts.clone();
    assert_eq!(texts.len(), 2);
    for t in &texts {
        assert!(t.starts_with("Speak,") && t.len() > "Speak,".len(), "{t:?}");
        assert!(
            h.query_by_label(t).is_some(),
            "sample text {t:?} not on screen"
        );
    }
    assert_eq!(h.state().status, RunStatus::Paused);
    assert_eq!(h.state().run.steps_done(), paused_at);

    // Resume, then Stop: a checkpoint lands in the folder shown in the panel.
    h.get_by_label("Train").click();
    h.run_steps(2);
    h.get_by_label("Resume").click();
    wait_for(&mut h, "a step after resuming", 20, |h| {
        h.state().run.steps_done() > paused_at
    });
    h.get_by_label("Stop").click();
    wait_for(&mut h, "the run to stop", 30, |h| {
        h.query_by_label_contains("Run: stopped after step")
            .is_some()
    });
    let step = h.state().run.steps_done();
    let saved = wgpt::checkpoint::checkpoint_path(&ckpt, step);
    assert!(saved.exists(), "no checkpoint at {}", saved.display());
    assert!(h
        .query_by_label_contains(&format!("Last checkpoint: {}", saved.display()))
        .is_some());
    let c = wgpt::checkpoint::Checkpoint::load(&saved).expect("the checkpoint loads");
    assert_eq!(c.state.map(|s| s.step), Some(step));
    assert!(h.state().errors.is_empty(), "{:?}", h.state().errors);
    h.state_mut().shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_data_path_shows_an_error() {
    let dir = scratch_dir("bad-data");
    let mut h = harness(WgptApp::new(gpu()));
    let missing = dir.join("no-such-corpus.txt");
    configure_tiny_run(
        &mut h,
        &missing.display().to_string(),
        &dir.display().to_string(),
        5,
    );
    h.get_by_label("Start").click();
    wait_for(&mut h, "the error", 20, |h| {
        h.query_by_label_contains("Error: ").is_some()
    });
    let err = label_text(&h.get_by_label_contains("Error: "));
    assert!(
        err.contains("no-such-corpus.txt") && err.contains("no such file"),
        "{err}"
    );
    assert!(h.query_by_label("Run: could not start").is_some());
    // The form is usable again, and the error can be dismissed.
    h.get_by_label("Dismiss errors").click();
    h.run_steps(2);
    assert!(h.query_by_label_contains("Error: ").is_none());
    assert!(h.state().run.steps.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unreadable_checkpoint_and_oversized_model_show_errors() {
    let dir = scratch_dir("bad-weights");
    let data = write_corpus(&dir);
    let mut h = harness(WgptApp::new(gpu()));
    configure_tiny_run(
        &mut h,
        &data.display().to_string(),
        &dir.join("ckpt").display().to_string(),
        5,
    );

    // A file that is not a checkpoint.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"definitely not safetensors").expect("write junk");
    h.get_by_label("Checkpoint (resumes its run)").click();
    h.run_steps(1);
    set_text(&h, "Weights path", &junk.display().to_string());
    h.run_steps(1);
    h.get_by_label("Start").click();
    wait_for(&mut h, "the checkpoint error", 20, |h| {
        h.query_by_label_contains("junk.safetensors").is_some()
            && h.query_by_label("Run: could not start").is_some()
    });
    h.get_by_label("Dismiss errors").click();
    // Two frames: the first still lays out the error bar the click removes.
    h.run_steps(2);

    // A model too large for any adapter: 48 layers 4096 wide, 9.7B parameters (an MLP weight
    // of 256 MiB where a binding holds 128 MiB, some 180 GB with gradients and moments where
    // bindings are larger). The memory plan refuses it before allocating, saying what the
    // adapter offers.
    h.get_by_label("Scratch (seeded init)").click();
    set_number(&h, "Layers", 48.0);
    set_number(&h, "Heads", 32.0);
    set_number(&h, "Embedding", 4096.0);
    h.run_steps(2);
    h.get_by_label("Start").click();
    wait_for(&mut h, "the size error", 20, |h| {
        h.query_by_label_contains("needs").is_some()
            && h.query_by_label_contains("offers").is_some()
    });
    assert!(h.query_by_label("Run: could not start").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A shard folder with validation every step: the validation curve is plotted; then resuming
/// its checkpoint with another batch size is refused, naming the field.
#[test]
fn validation_curve_and_resume_settings_check() {
    let dir = scratch_dir("val");
    let text = write_corpus(&dir);
    let shards = dir.join("shards");
    let mut o = wgpt::data::prepare::PrepareOptions::new(&shards);
    o.shard_tokens = 200;
    wgpt::data::prepare::prepare(&[text], &o).expect("shards");
    let ckpt = dir.join("ckpt");
    let mut h = harness(WgptApp::new(gpu()));
    configure_tiny_run(
        &mut h,
        &shards.display().to_string(),
        &ckpt.display().to_string(),
        3,
    );
    set_number(&h, "Validate every", 1.0);
    h.run_steps(1);
    h.get_by_label("Start").click();
    wait_for(&mut h, "the run to finish", 300, |h| {
        matches!(h.state().status, RunStatus::Ended(_))
    });
    let app = h.state();
    assert!(app.errors.is_empty(), "{:?}", app.errors);
    assert_eq!(
        app.run.val.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert!(app.run.val.iter().all(|v| v.1.is_finite() && v.1 > 0.0));
    h.run_steps(2);
    let label = label_text(&h.get_by_label_contains("Loss: 3 points"));
    assert!(label.contains(", val "), "{label}");

    // Resume the run's checkpoint with B = 2 where it was trained with B = 1.
    h.get_by_label("Checkpoint (resumes its run)").click();
    h.run_steps(1);
    set_text(&h, "Weights path", &ckpt.display().to_string());
    set_number(&h, "Batch size (B)", 2.0);
    h.run_steps(2);
    h.get_by_label("Start").click();
    wait_for(&mut h, "the resume error", 60, |h| {
        h.query_by_label_contains("Batch size: the checkpoint's run used 1, not 2")
            .is_some()
    });
    assert!(h.query_by_label("Run: could not start").is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
