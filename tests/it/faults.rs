//! Faults in the middle of a run: the device lost (destroyed from the test). The run ends
//! with a clear error instead of a panic, and its last complete checkpoint loads and resumes.
//! The test opens a device of its own: destroying the one the other tests share would fail them.

use crate::common::assert_same_checkpoint;
use std::sync::Arc;
use wgpt::gpu::{Gpu, GpuOptions};
use wgpt::model::GptConfig;
use wgpt::train::run::{Progress, Run, RunEvent, RunOptions};
use wgpt::train::settings::{Precision, TrainSettings};
use wgpt::train::trainer::Trainer;

#[test]
fn a_lost_device_ends_the_run_with_an_error_and_the_checkpoint_resumes() {
    let dir = std::env::temp_dir().join(format!("wgpt-faults-lost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 32,
        block_size: 16,
        vocab_size: 300,
        padded_vocab_size: 384,
    };
    let mut s = TrainSettings::new(cfg, 2, 16);
    s.precision = Precision::F32;
    s.steps = 6;
    let tokens: Vec<u32> = (0..2000).map(|i| (i * 7 % 300) as u32).collect();
    let corpus = wgpt::data::Corpus::from(tokens);
    let gpu = Arc::new(Gpu::new(&GpuOptions::default()).unwrap());
    let trainer = Trainer::new(gpu.clone(), s.clone(), corpus.clone(), None).unwrap();
    let opts = RunOptions {
        checkpoint_dir: Some(dir.clone()),
        checkpoint_every: Some(2),
        ..RunOptions::default()
    };
    let mut run = Run::new(trainer, &corpus, opts, None).unwrap();
    let mut steps = 0;
    let mut on = |e: RunEvent| {
        if let RunEvent::Step { .. } = e {
            steps += 1;
        }
        Ok(())
    };
    // Steps 0 and 1, then the checkpoint of step 2.
    assert_eq!(run.advance(usize::MAX, &mut on).unwrap(), Progress::Running);
    assert_eq!(run.trainer().step_index(), 2);
    let saved = run.trainer().checkpoint().unwrap();
    gpu.device.destroy();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut last = Ok(Progress::Running);
        for _ in 0..4 {
            last = run.advance(usize::MAX, &mut on);
            if last.is_err() {
                break;
            }
        }
        last
    }));
    let err = match outcome {
        Err(_) => panic!("a lost device panicked"),
        Ok(Ok(p)) => panic!("the run went on after its device was lost: {p:?}"),
        Ok(Err(e)) => e.to_string(),
    };
    eprintln!("error after the device was destroyed: {err}");
    assert!(err.contains("lost") || err.contains("GPU"), "{err}");
    drop(run);
    // The last complete checkpoint loads on a new device and the run goes on from it.
    let (path, ck) = wgpt::checkpoint::load_newest(&dir).unwrap();
    assert!(
        path.ends_with("ckpt_step00000002.safetensors"),
        "{}",
        path.display()
    );
    // The file holds the trainer's whole state at step 2, and a trainer on a new device
    // resumes exactly that state: weights, both moments, counts, loss scale, loader position
    // and epoch, and the random generator, bit for bit.
    assert_same_checkpoint("the file vs the trainer at step 2", &ck, &saved);
    let gpu2 = Arc::new(Gpu::new(&GpuOptions::default()).unwrap());
    let mut t = Trainer::new(gpu2.clone(), s.clone(), corpus.clone(), Some(&ck)).unwrap();
    assert_eq!(t.step_index(), 2);
    assert_same_checkpoint(
        "the resumed trainer vs the file",
        &t.checkpoint().unwrap(),
        &ck,
    );
    let st = t.step().unwrap();
    assert!(st.loss.is_finite());
    assert_eq!(t.step_index(), 3);
    // Step 2 from the checkpoint is step 2 of a run never interrupted.
    let mut whole = Trainer::new(gpu2, s, corpus, None).unwrap();
    let losses: Vec<f32> = (0..3).map(|_| whole.step().unwrap().loss).collect();
    assert_eq!(
        st.loss.to_bits(),
        losses[2].to_bits(),
        "{} vs {}",
        st.loss,
        losses[2]
    );
    assert_same_checkpoint(
        "3 steps resumed after 2 vs 3 in one go",
        &t.checkpoint().unwrap(),
        &whole.checkpoint().unwrap(),
    );
    std::fs::remove_dir_all(&dir).ok();
}
