//! Evaluations during training against the float64 reference: validation loss on a shard
//! folder's validation split, HellaSwag scoring on a small fixture in the standard format, and
//! the run's schedule of them; bad evaluation inputs.

use crate::common::*;
use std::path::{Path, PathBuf};
use wgpt::checkpoint::Checkpoint;
use wgpt::data::prepare::{prepare, PrepareOptions};
use wgpt::data::{Corpus, DataLoader};
use wgpt::error::{Error, Setting};
use wgpt::eval::hellaswag;
use wgpt::model::init::init_params;
use wgpt::model::{GptConfig, ParamLayout};
use wgpt::reference::model::ReferenceModel;
use wgpt::train::run::{Progress, Run, RunEvent, RunOptions};
use wgpt::train::settings::{Precision, TrainSettings};
use wgpt::train::trainer::Trainer;

/// The smallest model that reads GPT-2 token ids.
fn small(block: usize) -> GptConfig {
    GptConfig {
        n_layer: 1,
        n_head: 2,
        n_embd: 32,
        block_size: block,
        vocab_size: 50257,
        padded_vocab_size: 50304,
    }
}

fn settings(cfg: GptConfig, b: usize, t: usize) -> TrainSettings {
    let mut s = TrainSettings::new(cfg, b, t);
    s.precision = Precision::F32;
    s.steps = 2;
    s.warmup_steps = 1;
    s.max_lr = 1e-3;
    s
}

fn weights(cfg: GptConfig, seed: u64) -> Checkpoint {
    let layout = ParamLayout::new(&cfg);
    Checkpoint {
        config: cfg,
        params: init_params(&cfg, &layout, seed),
        moments: None,
        state: None,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("wgpt-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn shards(dir: &Path) -> Corpus {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
    let text = std::fs::read_to_string(corpus).unwrap();
    std::fs::write(dir.join("text.txt"), &text[..20_000]).unwrap();
    let mut o = PrepareOptions::new(dir.join("shards"));
    o.shard_tokens = 1500;
    prepare(&[dir.join("text.txt")], &o).unwrap();
    Corpus::open(&dir.join("shards")).unwrap()
}

/// Each position's loss under the float64 reference: `logsumexp(logits) - logits[target]`.
fn reference_losses(
    cfg: GptConfig,
    params: &[f32],
    x: &[u32],
    y: &[u32],
    b: usize,
    t: usize,
) -> Vec<f64> {
    let p: Vec<f64> = params.iter().map(|&v| v as f64).collect();
    let logits = ReferenceModel::new(cfg).logits(&p, x, b, t);
    let v = cfg.vocab_size;
    logits
        .chunks(v)
        .zip(y)
        .map(|(row, &target)| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(z));
            max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln() - row[target as usize]
        })
        .collect()
}

#[test]
fn validation_loss_equals_the_reference_before_and_after_training() {
    let dir = temp_dir("val");
    let corpus = shards(&dir);
    let cfg = small(16);
    let (b, t, val_steps) = (2, 16, 3);
    let s = settings(cfg, b, t);
    let init = weights(cfg, 3);
    let trainer = Trainer::new(gpu_arc(), s, corpus.clone(), Some(&init)).unwrap();
    let opts = RunOptions {
        val_every: Some(2),
        val_steps,
        ..RunOptions::default()
    };
    let mut run = Run::new(trainer, &corpus, opts, None).unwrap();
    let mut vals = Vec::new();
    let mut steps = 0;
    let mut on = |e: RunEvent| {
        match e {
            RunEvent::Validation { step, loss } => vals.push((step, loss)),
            RunEvent::Step { .. } => steps += 1,
            _ => {}
        }
        Ok(())
    };
    while run.advance(usize::MAX, &mut on).unwrap() == Progress::Running {}
    assert_eq!(steps, 2);
    assert_eq!(vals.iter().map(|v| v.0).collect::<Vec<_>>(), vec![0, 2]);
    // The reference over the same batches: the validation shard from its start.
    let mut val = DataLoader::validation(&corpus, b, t).unwrap();
    let batches: Vec<_> = (0..val_steps).map(|_| val.next_batch().unwrap()).collect();
    let trained = run.trainer().params().unwrap();
    for (params, (step, got)) in [(&init.params, vals[0]), (&trained, vals[1])] {
        let mut sum = 0.0;
        for bt in &batches {
            sum += reference_losses(cfg, params, &bt.x, &bt.y, b, t)
                .iter()
                .sum::<f64>();
        }
        let want = sum / (val_steps * b * t) as f64;
        let rel = ((got - want) / want).abs();
        assert!(
            rel < 1e-6,
            "step {step}: val loss {got} vs reference {want} (rel {rel:.2e})"
        );
        eprintln!("step {step}: val loss {got:.7} reference {want:.7} rel {rel:.2e}");
    }
    assert!(
        vals[1].1 != vals[0].1,
        "training did not change the validation loss"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn hellaswag_scores_equal_the_reference() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hellaswag-small.jsonl");
    let examples = hellaswag::load(&path).unwrap();
    assert_eq!(examples.len(), 6);
    assert_eq!(examples[5].label, 3, "a label given as a string");
    let cfg = small(32);
    // B = 3: the 24 rows fill 8 batches, and rows of one example land in different batches.
    let (b, t) = (3, 32);
    let init = weights(cfg, 3);
    let corpus = Corpus::from(vec![0u32; b * t + 1]);
    let mut trainer = Trainer::new(gpu_arc(), settings(cfg, b, t), corpus, Some(&init)).unwrap();
    let got =
        hellaswag::evaluate(&examples, b, t, |batches| trainer.position_losses(batches)).unwrap();
    // The float64 reference's choices on the fixture for these weights are endings 2, 1, 0,
    // 1, 3, 3 (each ahead of the next best by at least 2.6e-4 of its mean loss), against the
    // labels 0, 1, 2, 0, 0, 3: right on examples 1 and 5.
    const EXPECTED_CORRECT: usize = 2;
    // The reference scores each row alone, unpadded: context then ending, the ending's
    // positions averaged. Its choice is the ending with the lowest mean loss, as HellaSwag's
    // `acc_norm` rule has it (the only score reported here).
    let mut want = Vec::new();
    for e in &examples {
        let mut mean = [0.0f64; 4];
        for (j, end) in e.endings.iter().enumerate() {
            let mut tokens = e.context.clone();
            if tokens.is_empty() {
                tokens.push(wgpt::data::EOT);
            }
            let first = tokens.len() - 1;
            tokens.extend_from_slice(end);
            let n = tokens.len() - 1;
            let l = reference_losses(cfg, &init.params, &tokens[..n], &tokens[1..], 1, n);
            mean[j] = l[first..].iter().sum::<f64>() / end.len() as f64;
        }
        want.push(mean);
    }
    assert_eq!(got.losses.len(), want.len());
    let mut worst = 0.0f64;
    for (g, w) in got.losses.iter().zip(&want) {
        for j in 0..4 {
            let rel = ((g[j] - w[j]) / w[j]).abs();
            // A NaN fails too.
            worst = if rel.is_nan() || worst.is_nan() {
                f64::NAN
            } else {
                worst.max(rel)
            };
        }
    }
    assert!(worst < 1e-6, "ending losses off by {worst:.2e}");
    // The reference's choice of each example, and how far its best ending is ahead of the
    // next: the GPU's choice must be the same wherever that margin is beyond what the f32
    // arithmetic (the 1e-6 above) could move it.
    let mut correct = 0;
    for (i, (w, e)) in want.iter().zip(&examples).enumerate() {
        let mut order = [0usize, 1, 2, 3];
        order.sort_by(|&a, &b| w[a].total_cmp(&w[b]));
        let (best, next) = (order[0], order[1]);
        let margin = (w[next] - w[best]) / w[best];
        eprintln!(
            "example {i}: reference choice {best} (label {}), margin {margin:.2e}, GPU choice {}",
            e.label, got.choices[i]
        );
        assert!(
            margin > 1e-5,
            "example {i}: the reference's choice is a tie: {w:?}"
        );
        assert_eq!(
            got.choices[i], best,
            "example {i}: mean ending losses {w:?}"
        );
        correct += usize::from(best == e.label);
    }
    eprintln!(
        "hellaswag: {}/{} (reference {correct}/{}), worst rel. error of an ending's mean loss \
         {worst:.2e}",
        got.correct,
        got.total,
        examples.len()
    );
    // The seeded untrained model's count on the fixture, as the float64 reference scores it.
    assert_eq!(
        correct, EXPECTED_CORRECT,
        "the reference's count on the fixture"
    );
    assert_eq!((got.correct, got.total), (EXPECTED_CORRECT, 6));
    assert_eq!(got.acc_norm(), EXPECTED_CORRECT as f64 / 6.0);
}

#[test]
fn bad_evaluation_inputs_name_the_file_or_setting() {
    let dir = temp_dir("bad");
    let bad = dir.join("hs.jsonl");
    let good = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hellaswag-small.jsonl"),
    )
    .unwrap();
    let first = good.lines().next().unwrap();
    for (line, want) in [
        (
            "{\"ctx\": \"a\", \"endings\": [\"b\"], \"label\": 0}",
            "4 strings",
        ),
        (
            "{\"ctx\": \"a\", \"endings\": [\"b\",\"c\",\"d\",\"e\"], \"label\": 7}",
            "label",
        ),
        ("not json", "not JSON"),
    ] {
        std::fs::write(&bad, format!("{first}\n{line}\n")).unwrap();
        let e = hellaswag::load(&bad).unwrap_err().to_string();
        assert!(
            e.contains("hs.jsonl") && e.contains("line 2") && e.contains(want),
            "{e}"
        );
    }
    std::fs::write(&bad, "\n").unwrap();
    assert!(hellaswag::load(&bad)
        .unwrap_err()
        .to_string()
        .contains("no examples"));

    // The run refuses, before any step, what it cannot evaluate.
    let cfg = small(16);
    let text = Corpus::from(vec![1u32; 200]);
    let new_run = |opts: RunOptions| {
        let tr = Trainer::new(gpu_arc(), settings(cfg, 2, 16), text.clone(), None).unwrap();
        Run::new(tr, &text, opts, None).err().expect("refused")
    };
    let setting = |e: &Error| match e {
        Error::Setting { setting, .. } => Some(*setting),
        _ => None,
    };
    let e = new_run(RunOptions {
        val_every: Some(5),
        ..RunOptions::default()
    });
    assert_eq!(setting(&e), Some(Setting::ValEvery), "{e}");
    assert!(e.to_string().contains("shards"), "{e}");
    let e = new_run(RunOptions {
        eval_every: Some(5),
        ..RunOptions::default()
    });
    assert_eq!(setting(&e), Some(Setting::EvalEvery), "{e}");
    // 7 prompt tokens and 32 new ones do not fit a context of 16.
    let e = new_run(RunOptions {
        sample_every: Some(5),
        ..RunOptions::default()
    });
    assert_eq!(setting(&e), Some(Setting::SampleEvery), "{e}");
    let blocked = dir.join("file-not-folder");
    std::fs::write(&blocked, "x").unwrap();
    let e = new_run(RunOptions {
        checkpoint_dir: Some(blocked),
        ..RunOptions::default()
    });
    assert_eq!(setting(&e), Some(Setting::CheckpointDir), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn samples_during_training_come_from_the_live_weights() {
    // Samples after step 1 equal those of a generator built separately on the weights the
    // trainer holds then (same prompt, seed and top-k): the run samples its live weights.
    let cfg = small(48);
    let (b, t) = (2, 16);
    let tokens: Vec<u32> = (0..400).map(|i| (i * 37 % 5000) as u32).collect();
    let corpus = Corpus::from(tokens);
    let s = settings(cfg, b, t);
    let trainer = Trainer::new(gpu_arc(), s, corpus.clone(), Some(&weights(cfg, 4))).unwrap();
    let opts = RunOptions {
        sample_every: Some(1),
        stop_after: Some(1),
        ..RunOptions::default()
    };
    let spec = opts.sample.clone();
    let mut run = Run::new(trainer, &corpus, opts, None).unwrap();
    let mut samples = Vec::new();
    let mut on = |e: RunEvent| {
        if let RunEvent::Samples { step, texts } = e {
            samples.push((step, texts));
        }
        Ok(())
    };
    while run.advance(usize::MAX, &mut on).unwrap() == Progress::Running {}
    assert_eq!(samples.len(), 1);
    let (step, texts) = &samples[0];
    assert_eq!(*step, 1);
    assert_eq!(texts.len(), spec.samples);
    let c = run.trainer().checkpoint().unwrap();
    let mut g = wgpt::sample::Generator::from_checkpoint(gpu_arc(), &c, spec.samples).unwrap();
    let bpe = wgpt::data::Tokenizer::gpt2();
    let prompt = bpe.encode(&spec.prompt);
    let want: Vec<String> = g
        .generate(&prompt, &spec.options, |_, _| {})
        .unwrap()
        .iter()
        .map(|s| bpe.decode(s))
        .collect();
    assert_eq!(texts, &want);
    assert!(texts.iter().all(|t| t.starts_with(&spec.prompt)));
}
