//! A training run as both front ends drive it: the step guards, the schedule of validation,
//! HellaSwag, samples and checkpoints, and the check of a resumed run's settings. headless-train
//! and the app call [`Run::advance`] and show the [`RunEvent`]s it reports in their own way.
//!
//! Evaluations happen at step boundaries: at every multiple of their interval (step 0, before
//! training, included) and after the last step; samples from step 1 on. A resumed run does not
//! repeat the evaluations of the step it resumes at.

use super::settings::{Precision, TrainSettings};
use super::trainer::{StepStats, Trainer};
use crate::checkpoint;
use crate::data::{Corpus, DataLoader, Tokenizer};
use crate::error::{Error, Result, Setting};
use crate::eval::hellaswag;
use crate::gpu::profile::NodeTime;
use crate::sample::{Generator, SampleOptions};
use std::path::{Path, PathBuf};

/// f16 training halves the loss scale on each overflow; this many skipped steps in a row mean
/// the training itself diverged.
pub const MAX_SKIPPED_IN_A_ROW: usize = 25;

/// The reference recipe's prompt for samples during training.
pub const REFERENCE_PROMPT: &str = "Hello, I'm a language model,";

/// Batches per validation by default (the reference's 20).
pub const DEFAULT_VAL_STEPS: usize = 20;

/// What to sample during training.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleSpec {
    pub prompt: String,
    pub samples: usize,
    pub options: SampleOptions,
}

impl Default for SampleSpec {
    /// The reference's: 4 samples of 32 tokens, top-k 50, seed 42.
    fn default() -> Self {
        SampleSpec {
            prompt: REFERENCE_PROMPT.into(),
            samples: 4,
            options: SampleOptions {
                max_new_tokens: 32,
                top_k: 50,
                temperature: 1.0,
                seed: 42,
            },
        }
    }
}

/// The schedule of a run around its steps.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// Where checkpoints go (none: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// A checkpoint every N steps (and always at the end when there is a folder).
    pub checkpoint_every: Option<usize>,
    /// Checkpoints kept in the folder (0: all).
    pub keep_last: usize,
    /// End this session after N steps (the schedule still spans all steps).
    pub stop_after: Option<usize>,
    pub val_every: Option<usize>,
    pub val_steps: usize,
    pub sample_every: Option<usize>,
    pub sample: SampleSpec,
    /// A HellaSwag jsonl file, evaluated every `eval_every` steps (and at the end).
    pub hellaswag: Option<PathBuf>,
    pub eval_every: Option<usize>,
    /// Time every node of a step on the GPU (timestamp queries): each [`RunEvent::Step`] comes
    /// with its node times.
    pub profile: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            checkpoint_dir: None,
            checkpoint_every: None,
            keep_last: checkpoint::DEFAULT_KEEP_LAST,
            stop_after: None,
            val_every: None,
            val_steps: DEFAULT_VAL_STEPS,
            sample_every: None,
            sample: SampleSpec::default(),
            hellaswag: None,
            eval_every: None,
            profile: false,
        }
    }
}

/// What a run reports as it goes.
pub enum RunEvent<'a> {
    /// A step was collected (with its node times when profiling).
    Step {
        stats: &'a StepStats,
        nodes: &'a [NodeTime],
    },
    /// The mean loss over the validation batches after `step` steps.
    Validation {
        step: usize,
        loss: f64,
    },
    /// Samples from the weights after `step` steps, prompt included.
    Samples {
        step: usize,
        texts: Vec<String>,
    },
    HellaSwag {
        step: usize,
        score: hellaswag::Score,
    },
    Saved {
        path: PathBuf,
    },
    /// Data parallel: every rank holds the same weights after `step` steps (checked before
    /// each checkpoint and at the end); `checksum` is theirs ([`super::parallel::checksum`]).
    Replicas {
        step: usize,
        ranks: usize,
        checksum: u64,
    },
}

/// The lines headless-train prints: a step's is the documented
/// `step {step:4} | loss: {loss:.6} | lr {lr:.4e} | norm: {norm:.4} | dt: {ms:.2}ms | tok/sec: {tps:.2}`.
impl std::fmt::Display for RunEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunEvent::Step { stats: s, .. } => {
                write!(
                    f,
                    "step {:4} | loss: {:.6} | lr {:.4e} | norm: {:.4} | dt: {:.2}ms | tok/sec: {:.2}",
                    s.step, s.loss, s.lr, s.norm, s.dt_ms, s.tok_per_sec
                )?;
                if s.skipped {
                    write!(
                        f,
                        " | skipped: non-finite gradients, loss scale now {}",
                        s.loss_scale
                    )?;
                }
                Ok(())
            }
            RunEvent::Validation { step, loss } => write!(f, "step {step:4} | val loss: {loss:.6}"),
            RunEvent::Samples { step, texts } => {
                for (i, t) in texts.iter().enumerate() {
                    if i > 0 {
                        f.write_str("\n")?;
                    }
                    write!(f, "step {step:4} | sample {i}: {t:?}")?;
                }
                Ok(())
            }
            RunEvent::HellaSwag { step, score } => write!(
                f,
                "step {step:4} | hellaswag acc_norm: {}/{} = {:.4}",
                score.correct,
                score.total,
                score.acc_norm()
            ),
            RunEvent::Saved { path } => write!(f, "saved {}", path.display()),
            RunEvent::Replicas {
                step,
                ranks,
                checksum,
            } => write!(
                f,
                "step {step:4} | weights identical on {ranks} ranks: checksum {checksum:016x}"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// More to do: call [`Run::advance`] again.
    Running,
    /// Every step done, evaluated and saved.
    Finished,
}

/// A run: its trainer and everything scheduled around the steps.
pub struct Run {
    trainer: Trainer,
    opts: RunOptions,
    first_step: usize,
    last_step: usize,
    val: Option<DataLoader>,
    hellaswag: Option<Vec<hellaswag::Example>>,
    prompt: Vec<u32>,
    generator: Option<Generator>,
    resumed_from: Option<PathBuf>,
    saved_at: Option<usize>,
    checked_at: Option<usize>,
    evaluated_at: Option<usize>,
    skipped_in_a_row: usize,
}

fn positive(setting: Setting, v: Option<usize>) -> Result<()> {
    match v {
        Some(0) => Err(Error::setting(setting, "must be at least 1")),
        _ => Ok(()),
    }
}

impl Run {
    /// Checks the schedule against the trainer and the data (everything it refuses is refused
    /// now, before any step): validation needs a shard folder, samples must fit the context,
    /// the HellaSwag file must parse, the checkpoint folder must be writable.
    pub fn new(
        mut trainer: Trainer,
        corpus: &Corpus,
        mut opts: RunOptions,
        resumed_from: Option<PathBuf>,
    ) -> Result<Run> {
        if opts.profile {
            trainer.enable_profiling()?;
        }
        // 0: only at the end.
        opts.checkpoint_every = opts.checkpoint_every.filter(|&e| e > 0);
        positive(Setting::ValEvery, opts.val_every)?;
        positive(Setting::SampleEvery, opts.sample_every)?;
        positive(Setting::EvalEvery, opts.eval_every)?;
        let s = trainer.settings();
        let (b, t) = (s.batch_size, s.seq_len);
        let val = match opts.val_every {
            Some(_) => {
                if opts.val_steps == 0 {
                    return Err(Error::setting(Setting::ValSteps, "must be at least 1"));
                }
                Some(DataLoader::validation(corpus, b, t)?)
            }
            None => None,
        };
        let hellaswag = match (&opts.hellaswag, opts.eval_every) {
            (Some(p), _) => Some(hellaswag::load(p)?),
            (None, Some(_)) => {
                return Err(Error::setting(
                    Setting::EvalEvery,
                    "needs a HellaSwag file to evaluate (--hellaswag)",
                ))
            }
            (None, None) => None,
        };
        let prompt = Tokenizer::gpt2().encode(&opts.sample.prompt);
        if opts.sample_every.is_some() {
            let need = prompt.len() + opts.sample.options.max_new_tokens;
            if prompt.is_empty() || need > s.config.block_size {
                return Err(Error::setting(
                    Setting::SampleEvery,
                    format!(
                        "a sample needs the prompt's {} tokens and {} new ones, the model's context is {}",
                        prompt.len(),
                        opts.sample.options.max_new_tokens,
                        s.config.block_size
                    ),
                ));
            }
            if opts.sample.samples == 0 || opts.sample.options.top_k == 0 {
                return Err(Error::setting(
                    Setting::SampleEvery,
                    "samples and top-k must be at least 1",
                ));
            }
        }
        if let (Some(dir), 0) = (&opts.checkpoint_dir, trainer.rank()) {
            // Found now, not at the first save after hours of training (by rank 0, which
            // alone writes them).
            checkpoint::check_writable(dir)
                .map_err(|e| Error::setting(Setting::CheckpointDir, e.to_string()))?;
        }
        let first_step = trainer.step_index();
        let last_step = match opts.stop_after {
            Some(n) => s.steps.min(first_step + n),
            None => s.steps,
        };
        Ok(Run {
            saved_at: resumed_from.as_ref().map(|_| first_step),
            checked_at: None,
            evaluated_at: (first_step > 0).then_some(first_step),
            trainer,
            opts,
            first_step,
            last_step,
            val,
            hellaswag,
            prompt,
            generator: None,
            resumed_from,
            skipped_in_a_row: 0,
        })
    }

    pub fn trainer(&self) -> &Trainer {
        &self.trainer
    }

    /// Ends the run and returns its trainer (e.g. to export its weights).
    pub fn into_trainer(self) -> Trainer {
        self.trainer
    }

    /// The step this session started at, and the one it ends at.
    pub fn steps(&self) -> (usize, usize) {
        (self.first_step, self.last_step)
    }

    /// Runs at most `max_steps` steps (queued back to back up to the next evaluation or
    /// checkpoint), with the evaluations and checkpoints that fall due, reporting each to `on`.
    /// An error from `on` ends the run as one from the run itself does.
    pub fn advance(
        &mut self,
        max_steps: usize,
        on: &mut dyn FnMut(RunEvent) -> Result<()>,
    ) -> Result<Progress> {
        let step = self.trainer.step_index();
        if self.evaluated_at != Some(step) {
            // Rank 0 alone evaluates (the others wait for it in the next step's all-reduce).
            if self.trainer.rank() == 0 {
                self.evaluate(step, on)?;
            }
            self.evaluated_at = Some(step);
        }
        if step >= self.last_step {
            self.check_replicas(on)?;
            self.save(on)?;
            return Ok(Progress::Finished);
        }
        let mut until = self.last_step.min(step.saturating_add(max_steps.max(1)));
        let every = [
            self.opts
                .checkpoint_every
                .filter(|_| self.opts.checkpoint_dir.is_some()),
            self.opts.val_every,
            self.opts.sample_every,
            self.opts.eval_every.filter(|_| self.hellaswag.is_some()),
        ];
        // All at least 1: checked or filtered in `Run::new`.
        for e in every.into_iter().flatten() {
            until = until.min((step / e + 1) * e);
        }
        let precision = self.trainer.settings().precision;
        let skipped = &mut self.skipped_in_a_row;
        self.trainer.run_steps(until, |stats, nodes| {
            on(RunEvent::Step { stats, nodes })?;
            guard(stats, precision, skipped)
        })?;
        let step = self.trainer.step_index();
        if let Some(e) = self.opts.checkpoint_every {
            if step.is_multiple_of(e) && step < self.last_step {
                self.save(on)?;
            }
        }
        Ok(Progress::Running)
    }

    /// Writes a checkpoint of the current step into the run's folder unless it has one, then
    /// prunes the folder to the newest `keep_last` (never the one written or the one resumed
    /// from). Returns its path, or None without a folder or when it was already saved.
    pub fn save(&mut self, on: &mut dyn FnMut(RunEvent) -> Result<()>) -> Result<Option<PathBuf>> {
        let Some(dir) = self.opts.checkpoint_dir.clone() else {
            return Ok(None);
        };
        let step = self.trainer.step_index();
        if self.saved_at == Some(step) {
            return Ok(None);
        }
        // Every rank checks that the weights agree; rank 0 alone writes them.
        self.check_replicas(on)?;
        self.saved_at = Some(step);
        if self.trainer.rank() != 0 {
            return Ok(None);
        }
        let path = checkpoint::checkpoint_path(&dir, step);
        self.trainer.checkpoint()?.save(&path)?;
        let mut protect = vec![path.as_path()];
        protect.extend(self.resumed_from.as_deref());
        checkpoint::prune(&dir, self.opts.keep_last, &protect)?;
        on(RunEvent::Saved { path: path.clone() })?;
        Ok(Some(path))
    }

    /// Data parallel: checks that every rank holds the same weights (once per step; every rank
    /// must call it at the same steps, as [`Run::advance`] and [`Run::save`] do).
    fn check_replicas(&mut self, on: &mut dyn FnMut(RunEvent) -> Result<()>) -> Result<()> {
        let step = self.trainer.step_index();
        let Some(c) = self.trainer.collective() else {
            return Ok(());
        };
        if self.checked_at == Some(step) {
            return Ok(());
        }
        let checksum = super::parallel::check_replicas(c, &self.trainer.params()?)?;
        let (ranks, rank) = (c.size(), c.rank());
        self.checked_at = Some(step);
        if rank == 0 {
            on(RunEvent::Replicas {
                step,
                ranks,
                checksum,
            })?;
        }
        Ok(())
    }

    /// Whether an evaluation every `every` steps falls at `step`.
    fn due(&self, every: Option<usize>, step: usize) -> bool {
        every.is_some_and(|e| step.is_multiple_of(e) || step == self.last_step)
    }

    fn evaluate(&mut self, step: usize, on: &mut dyn FnMut(RunEvent) -> Result<()>) -> Result<()> {
        if self.due(self.opts.val_every, step) {
            if let Some(val) = self.val.as_mut() {
                val.reset();
                let batches = (0..self.opts.val_steps)
                    .map(|_| val.next_batch())
                    .collect::<Result<Vec<_>>>()?;
                let loss = self.trainer.mean_loss(&batches)?;
                on(RunEvent::Validation { step, loss })?;
            }
        }
        let hellaswag_due = self.hellaswag.is_some()
            && (self.due(self.opts.eval_every, step) || step == self.last_step);
        if hellaswag_due {
            let s = self.trainer.settings();
            let (b, t) = (s.batch_size, s.seq_len);
            let examples = self.hellaswag.as_deref().unwrap_or_default();
            let trainer = &mut self.trainer;
            let score =
                hellaswag::evaluate(examples, b, t, |batches| trainer.position_losses(batches))?;
            on(RunEvent::HellaSwag { step, score })?;
        }
        if step > 0 && self.due(self.opts.sample_every, step) {
            let texts = self.sample()?;
            on(RunEvent::Samples { step, texts })?;
        }
        Ok(())
    }

    /// Samples from the live weights (the generator reads the trainer's buffers).
    fn sample(&mut self) -> Result<Vec<String>> {
        let spec = &self.opts.sample;
        if self.generator.is_none() {
            self.generator = Some(Generator::new(
                self.trainer.gpu().clone(),
                self.trainer.settings().config,
                self.trainer.stored_params().clone(),
                spec.samples,
            )?);
        }
        let g = self.generator.as_mut().expect("made above");
        let seqs = g.generate(&self.prompt, &spec.options, |_, _| {})?;
        let bpe = Tokenizer::gpt2();
        Ok(seqs.iter().map(|s| bpe.decode(s)).collect())
    }
}

/// The step guards: a non-finite loss in f32 (no loss scale to lower, it will not recover)
/// or [`MAX_SKIPPED_IN_A_ROW`] skipped f16 steps in a row stop the run.
fn guard(s: &StepStats, precision: Precision, skipped_in_a_row: &mut usize) -> Result<()> {
    if s.skipped {
        *skipped_in_a_row += 1;
    } else {
        *skipped_in_a_row = 0;
    }
    if !s.loss.is_finite() && (precision == Precision::F32 || !s.skipped) {
        return Err(Error::setting(
            Setting::MaxLr,
            format!(
                "the loss became {} at step {}; the run stopped (the last checkpoint is kept). Lower the learning rate or check the data",
                s.loss, s.step
            ),
        ));
    }
    if *skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW {
        return Err(Error::setting(
            Setting::MaxLr,
            format!(
                "the gradients were non-finite for {MAX_SKIPPED_IN_A_ROW} steps in a row (loss {}); the run stopped (the last checkpoint is kept). Lower the learning rate or train in f32",
                s.loss
            ),
        ));
    }
    Ok(())
}

/// The settings a resumed run continues with: the checkpoint's. A setting the user gave
/// (`given`) that differs from the checkpoint's is refused, naming it, rather than silently
/// replaced: the run would not be the one that was saved.
///
/// The number of ranks is the job's (`requested.ranks`), not a setting: a run may resume with
/// another number of ranks where it divides the checkpoint's micro-batches per step (ranks x
/// grad accum), which are kept, so each step still reads the same tokens; grad accum becomes
/// that quotient (a `--grad-accum` given must equal it).
pub fn resume_settings(
    stored: &TrainSettings,
    requested: &TrainSettings,
    given: impl Fn(Setting) -> bool,
) -> Result<TrainSettings> {
    let checks: [(Setting, bool, String, String); 15] = [
        (
            Setting::Model,
            stored.config != requested.config,
            stored.config.describe(),
            requested.config.describe(),
        ),
        pair(Setting::BatchSize, stored.batch_size, requested.batch_size),
        pair(Setting::SeqLen, stored.seq_len, requested.seq_len),
        (
            Setting::GradAccum,
            stored.micro_batches_per_step() != requested.micro_batches_per_step(),
            micro_batches(stored),
            micro_batches(requested),
        ),
        pair(Setting::Steps, stored.steps, requested.steps),
        pair(Setting::MaxLr, stored.max_lr, requested.max_lr),
        pair(
            Setting::MinLrRatio,
            stored.min_lr_ratio,
            requested.min_lr_ratio,
        ),
        pair(
            Setting::WarmupSteps,
            stored.warmup_steps,
            requested.warmup_steps,
        ),
        pair(
            Setting::WeightDecay,
            stored.weight_decay,
            requested.weight_decay,
        ),
        pair(Setting::GradClip, stored.grad_clip, requested.grad_clip),
        pair(Setting::Seed, stored.seed, requested.seed),
        pair(Setting::Precision, stored.precision, requested.precision),
        pair(Setting::Attention, stored.attention, requested.attention),
        pair(Setting::Shuffle, stored.shuffle, requested.shuffle),
        pair(Setting::Fusion, stored.fused, requested.fused),
    ];
    for (setting, differs, was, asked) in checks {
        if differs && given(setting) {
            return Err(Error::setting(
                setting,
                format!(
                    "the checkpoint's run used {was}, not {asked}; a resumed run keeps its settings (leave this out, or start a new run)"
                ),
            ));
        }
    }
    let mut s = stored.clone();
    let micro = stored.micro_batches_per_step();
    if requested.ranks != stored.ranks {
        if requested.ranks == 0 || !micro.is_multiple_of(requested.ranks) {
            return Err(Error::setting(
                Setting::GradAccum,
                format!(
                    "the checkpoint's run used {}, which {} ranks cannot share evenly; resume with a number of ranks that divides {micro}",
                    micro_batches(stored),
                    requested.ranks
                ),
            ));
        }
        s.ranks = requested.ranks;
        s.grad_accum = micro / requested.ranks;
    }
    Ok(s)
}

/// How a step's micro-batches are divided, for messages.
fn micro_batches(s: &TrainSettings) -> String {
    if s.ranks == 1 {
        format!("grad accum {}", s.grad_accum)
    } else {
        format!(
            "{} micro-batches per step ({} ranks x grad accum {})",
            s.micro_batches_per_step(),
            s.ranks,
            s.grad_accum
        )
    }
}

fn pair<T: PartialEq + std::fmt::Display>(
    s: Setting,
    a: T,
    b: T,
) -> (Setting, bool, String, String) {
    (s, a != b, a.to_string(), b.to_string())
}

/// The settings a run continues with when it starts from `checkpoint` (the file at `path`):
/// a run's checkpoint keeps its own settings ([`resume_settings`]); weights without a run's
/// state (or no checkpoint) take the requested ones.
pub fn settings_for_resume(
    requested: TrainSettings,
    checkpoint: Option<(&Path, &checkpoint::Checkpoint)>,
    given: impl Fn(Setting) -> bool,
) -> Result<TrainSettings> {
    let Some((path, state)) = checkpoint.and_then(|(p, c)| Some((p, c.state.as_ref()?))) else {
        return Ok(requested);
    };
    let stored: TrainSettings = serde_json::from_str(&state.settings)
        .map_err(|e| Error::format(path, format!("the checkpoint's settings do not parse: {e}")))?;
    resume_settings(&stored, &requested, given)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::GptConfig;

    #[test]
    fn resume_refuses_given_settings_that_differ_and_keeps_the_stored_ones() {
        let stored = TrainSettings::new(GptConfig::tiny(), 4, 64);
        let mut asked = stored.clone();
        asked.batch_size = 8;
        asked.max_lr = 1e-3;
        let e = resume_settings(&stored, &asked, |_| true).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Setting {
                    setting: Setting::BatchSize,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e
            .to_string()
            .starts_with("--batch-size: the checkpoint's run used 4, not 8"));
        let only_lr_given = resume_settings(&stored, &asked, |s| s == Setting::MaxLr);
        assert!(matches!(
            only_lr_given,
            Err(Error::Setting {
                setting: Setting::MaxLr,
                ..
            })
        ));
        let none_given = resume_settings(&stored, &asked, |_| false).unwrap();
        assert_eq!(none_given, stored);
    }

    #[test]
    fn resume_with_other_ranks_keeps_the_micro_batches_per_step() {
        let mut stored = TrainSettings::new(GptConfig::tiny(), 4, 64);
        stored.ranks = 2;
        stored.grad_accum = 2;
        // One rank takes all four micro-batches; four ranks one each.
        let mut asked = stored.clone();
        asked.ranks = 1;
        asked.grad_accum = 1;
        let one = resume_settings(&stored, &asked, |_| false).unwrap();
        assert_eq!((one.ranks, one.grad_accum), (1, 4));
        assert_eq!(one.tokens_per_step(), stored.tokens_per_step());
        asked.ranks = 4;
        let four = resume_settings(&stored, &asked, |_| false).unwrap();
        assert_eq!((four.ranks, four.grad_accum), (4, 1));
        // --grad-accum given must agree; three ranks cannot share four micro-batches.
        asked.ranks = 1;
        asked.grad_accum = 2;
        let e = resume_settings(&stored, &asked, |s| s == Setting::GradAccum).unwrap_err();
        assert!(e.to_string().starts_with("--grad-accum: the checkpoint's run used 4 micro-batches per step (2 ranks x grad accum 2)"), "{e}");
        asked.grad_accum = 4;
        assert!(resume_settings(&stored, &asked, |s| s == Setting::GradAccum).is_ok());
        asked.ranks = 3;
        asked.grad_accum = 1;
        let e = resume_settings(&stored, &asked, |_| false).unwrap_err();
        assert!(e.to_string().contains("3 ranks cannot share"), "{e}");
    }

    #[test]
    fn events_print_as_the_log_lines_of_the_contract() {
        let mut s = StepStats {
            step: 7,
            loss: 3.25,
            norm: 0.5,
            lr: 6e-4,
            dt_ms: 12.345,
            tok_per_sec: 1000.0,
            skipped: false,
            loss_scale: 1.0,
            encode_ms: 0.0,
            submit_ms: 0.0,
            gpu_ms: None,
            gpu_idle_ms: None,
            reduce: None,
        };
        let line = |s: &StepStats| {
            RunEvent::Step {
                stats: s,
                nodes: &[],
            }
            .to_string()
        };
        assert_eq!(
            line(&s),
            "step    7 | loss: 3.250000 | lr 6.0000e-4 | norm: 0.5000 | dt: 12.35ms | tok/sec: 1000.00"
        );
        s.skipped = true;
        s.loss_scale = 32768.0;
        assert!(line(&s).ends_with(" | skipped: non-finite gradients, loss scale now 32768"));
        let val = RunEvent::Validation {
            step: 20,
            loss: 4.5,
        };
        assert_eq!(val.to_string(), "step   20 | val loss: 4.500000");
        let samples = RunEvent::Samples {
            step: 3,
            texts: vec!["a".into(), "b\n".into()],
        };
        assert_eq!(
            samples.to_string(),
            "step    3 | sample 0: \"a\"\nstep    3 | sample 1: \"b\\n\""
        );
    }

    #[test]
    fn guards_stop_on_a_non_finite_f32_loss_and_on_25_skipped_steps() {
        let mut s = StepStats {
            step: 3,
            loss: 2.0,
            norm: 1.0,
            lr: 1e-4,
            dt_ms: 1.0,
            tok_per_sec: 1.0,
            skipped: false,
            loss_scale: 1.0,
            encode_ms: 0.0,
            submit_ms: 0.0,
            gpu_ms: None,
            gpu_idle_ms: None,
            reduce: None,
        };
        let mut n = 0;
        assert!(guard(&s, Precision::F32, &mut n).is_ok());
        s.loss = f32::NAN;
        s.skipped = true;
        assert!(guard(&s, Precision::F32, &mut n).is_err());
        // f16: skipped steps are counted, and the 25th in a row stops.
        let mut n = 0;
        for i in 0..MAX_SKIPPED_IN_A_ROW - 1 {
            assert!(guard(&s, Precision::F16, &mut n).is_ok(), "step {i}");
        }
        let mut clean = s;
        clean.skipped = false;
        clean.loss = 2.0;
        assert!(guard(&clean, Precision::F16, &mut n).is_ok());
        assert_eq!(n, 0);
        for _ in 0..MAX_SKIPPED_IN_A_ROW - 1 {
            guard(&s, Precision::F16, &mut n).unwrap();
        }
        let e = guard(&s, Precision::F16, &mut n).unwrap_err().to_string();
        assert!(e.contains("25 steps in a row"), "{e}");
    }
}
