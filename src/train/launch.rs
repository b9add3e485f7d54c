//! Starting a run from a description, as both front ends do: the model (a preset, changes to
//! it, or the weights' shape), where the weights come from (a seeded init, a run to resume,
//! pretrained weights), the settings (each one given, or left to the adapter's defaults, the
//! recipe's or a resumed run's) and the schedule around the steps.
//!
//! [`Launch::prepare`] decides the settings and checks everything that can be checked before
//! the GPU allocates anything, reporting what it decided as [`Note`]s; [`Launch::start`] builds
//! the trainer and the [`Run`].

use super::job::DataParallel;
use super::plan::MemoryPlan;
use super::run::{self, Run, RunOptions};
use super::settings::{AdapterDefaults, AttentionKind, Precision, TrainSettings};
use super::trainer::Trainer;
use crate::checkpoint::{self, hf, Checkpoint};
use crate::data::Corpus;
use crate::error::{Error, Result, Setting};
use crate::gpu::{AdapterLimits, Gpu};
use crate::model::config::{pad_vocab, GPT2_VOCAB};
use crate::model::GptConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a run's weights come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Init {
    /// GPT-2's seeded initialisation.
    Scratch,
    /// One of our checkpoints: a file, or the newest in a folder. A run's checkpoint continues
    /// its run with its settings, saving into the checkpoint's folder unless told otherwise.
    Resume(PathBuf),
    /// Weights to start from: a Hugging Face GPT-2 folder or model.safetensors, or one of our
    /// checkpoints. The model has their shape.
    Pretrained(PathBuf),
}

/// The model's shape as asked for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelSpec {
    /// A preset ([`GptConfig::preset`]). None: the weights' shape when the run starts from
    /// weights, the adapter's default preset otherwise. Pretrained weights' shape always wins.
    pub preset: Option<String>,
    /// Changes to that shape; each None keeps it. Pretrained weights refuse them.
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    pub block_size: Option<usize>,
    /// The vocabulary, padded to a multiple of 128 in memory unless `padded_vocab_size` is given.
    pub vocab_size: Option<usize>,
    pub padded_vocab_size: Option<usize>,
}

impl ModelSpec {
    fn given(&self) -> bool {
        self.preset.is_some()
            || [
                self.n_layer,
                self.n_head,
                self.n_embd,
                self.block_size,
                self.vocab_size,
                self.padded_vocab_size,
            ]
            .iter()
            .any(Option::is_some)
    }

    /// `base` with the changes asked for.
    fn reshape(&self, base: GptConfig) -> GptConfig {
        let mut c = base;
        set(&mut c.n_layer, self.n_layer);
        set(&mut c.n_head, self.n_head);
        set(&mut c.n_embd, self.n_embd);
        set(&mut c.block_size, self.block_size);
        if let Some(v) = self.vocab_size {
            c.vocab_size = v;
            c.padded_vocab_size = pad_vocab(v);
        }
        set(&mut c.padded_vocab_size, self.padded_vocab_size);
        c
    }
}

/// A run's settings as asked for. Each None is left to the adapter (B, T and precision: see
/// [`AdapterDefaults`]), to the recipe ([`TrainSettings::new`]) or, resuming, to the
/// checkpoint's run; a resumed run refuses a setting given here that differs from its own.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SettingsSpec {
    pub batch_size: Option<usize>,
    pub seq_len: Option<usize>,
    pub grad_accum: Option<usize>,
    pub steps: Option<usize>,
    pub max_lr: Option<f64>,
    pub min_lr_ratio: Option<f64>,
    pub warmup_steps: Option<usize>,
    pub weight_decay: Option<f64>,
    pub grad_clip: Option<f64>,
    pub seed: Option<u64>,
    pub precision: Option<Precision>,
    pub attention: Option<AttentionKind>,
    pub fused: Option<bool>,
    pub fused_optimizer: Option<bool>,
    pub shuffle: Option<bool>,
}

impl SettingsSpec {
    fn given(&self, setting: Setting) -> bool {
        match setting {
            Setting::BatchSize => self.batch_size.is_some(),
            Setting::SeqLen => self.seq_len.is_some(),
            Setting::GradAccum => self.grad_accum.is_some(),
            Setting::Steps => self.steps.is_some(),
            Setting::MaxLr => self.max_lr.is_some(),
            Setting::MinLrRatio => self.min_lr_ratio.is_some(),
            Setting::WarmupSteps => self.warmup_steps.is_some(),
            Setting::WeightDecay => self.weight_decay.is_some(),
            Setting::GradClip => self.grad_clip.is_some(),
            Setting::Seed => self.seed.is_some(),
            Setting::Precision => self.precision.is_some(),
            Setting::Attention => self.attention.is_some(),
            Setting::Fusion => self.fused.is_some(),
            Setting::FusedOptimizer => self.fused_optimizer.is_some(),
            Setting::Shuffle => self.shuffle.is_some(),
            _ => false,
        }
    }

    /// The settings for a model of `config`: those given, the defaults for the rest (B and T
    /// for `preset` on this adapter).
    fn resolve(
        &self,
        config: GptConfig,
        preset: &str,
        defaults: &AdapterDefaults,
    ) -> TrainSettings {
        let (b, t) = defaults.batch_shape(preset, config.block_size);
        let mut s = TrainSettings::new(config, b, t);
        s.precision = defaults.precision;
        set(&mut s.batch_size, self.batch_size);
        set(&mut s.seq_len, self.seq_len);
        set(&mut s.grad_accum, self.grad_accum);
        set(&mut s.steps, self.steps);
        set(&mut s.max_lr, self.max_lr);
        set(&mut s.min_lr_ratio, self.min_lr_ratio);
        set(&mut s.warmup_steps, self.warmup_steps);
        set(&mut s.weight_decay, self.weight_decay);
        set(&mut s.grad_clip, self.grad_clip);
        set(&mut s.seed, self.seed);
        set(&mut s.precision, self.precision);
        set(&mut s.attention, self.attention);
        set(&mut s.fused, self.fused);
        set(&mut s.fused_optimizer, self.fused_optimizer);
        set(&mut s.shuffle, self.shuffle);
        s
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

/// Everything a run starts from, but its data (a [`Corpus`], which the front end opens).
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub model: ModelSpec,
    pub init: Init,
    pub settings: SettingsSpec,
    pub options: RunOptions,
    /// Data parallel: the job's ranks (None: this process alone).
    pub parallel: Option<DataParallel>,
}

/// What [`Launch`] decided, in the order it decided it; its `Display` is headless-train's line
/// (or lines) for it.
#[derive(Clone, Debug, PartialEq)]
pub enum Note {
    /// The checkpoint a resumed run continues from.
    Resuming(PathBuf),
    /// The weights a run starts from.
    Initialised(PathBuf),
    /// No preset was asked for, and the adapter is a CPU rasteriser: its default is small.
    DefaultPreset {
        preset: &'static str,
        adapter: String,
    },
    /// The settings the run trains with.
    Settings(Box<TrainSettings>),
    /// The memory plan's summary and its classifier's chunks.
    Memory { plan: String, classifier: String },
    /// Parameter tensors and parameters, with and without weight decay.
    Parameters {
        decayed: (usize, usize),
        not_decayed: (usize, usize),
    },
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Resuming(p) => write!(f, "resuming from {}", p.display()),
            Note::Initialised(p) => write!(f, "initialised from {}", p.display()),
            Note::DefaultPreset { preset, adapter } => write!(
                f,
                "preset: {preset} (the adapter '{adapter}' is a CPU rasteriser; pass --preset gpt2 to override)"
            ),
            Note::Settings(s) => {
                write!(
                    f,
                    "config: {} | B {} | T {} | grad accum {} | {} tokens/step | precision {} | attention {} | steps {}",
                    s.config.describe(),
                    s.batch_size,
                    s.seq_len,
                    s.grad_accum,
                    s.tokens_per_step(),
                    s.precision,
                    s.attention,
                    s.steps
                )?;
                if s.ranks > 1 {
                    write!(
                        f,
                        "\ndata parallel: {} ranks x B {} x T {} x grad accum {} = {} tokens per step",
                        s.ranks,
                        s.batch_size,
                        s.seq_len,
                        s.grad_accum,
                        s.tokens_per_step()
                    )?;
                }
                Ok(())
            }
            Note::Memory { plan, classifier } => write!(f, "{plan}\n{classifier}"),
            Note::Parameters {
                decayed: (dt, dp),
                not_decayed: (nt, np),
            } => write!(
                f,
                "num decayed parameter tensors: {dt}, with {dp} parameters\nnum non-decayed parameter tensors: {nt}, with {np} parameters"
            ),
        }
    }
}

/// A run ready to start: its settings decided and checked, its weights read, its memory
/// laid out.
pub struct Launch {
    gpu: Arc<Gpu>,
    corpus: Corpus,
    settings: TrainSettings,
    plan: MemoryPlan,
    weights: Option<Checkpoint>,
    resumed_from: Option<PathBuf>,
    options: RunOptions,
    parallel: Option<DataParallel>,
}

impl Launch {
    /// Reads the weights, decides the settings (a resumed run's are its checkpoint's), checks
    /// them against the adapter and lays out the memory plan, which refuses a run whose
    /// buffers cannot be bound. Whether the plan fits the adapter's memory is checked by
    /// [`Launch::check_memory`] and again when the trainer is built.
    pub fn prepare(
        gpu: Arc<Gpu>,
        corpus: Corpus,
        spec: RunSpec,
        report: &mut dyn FnMut(Note),
    ) -> Result<Launch> {
        let RunSpec {
            model,
            init,
            settings: asked,
            mut options,
            parallel,
        } = spec;
        let (weights, resumed_from) = match &init {
            Init::Scratch => (None, None),
            Init::Resume(p) => {
                let (path, c) = if p.is_dir() {
                    checkpoint::load_newest(p)?
                } else {
                    (p.clone(), Checkpoint::load(p)?)
                };
                report(Note::Resuming(path.clone()));
                if options.checkpoint_dir.is_none() {
                    options.checkpoint_dir = path.parent().map(Path::to_path_buf);
                }
                (Some(c), Some(path))
            }
            Init::Pretrained(p) => {
                let c = hf::load_any(p)?;
                report(Note::Initialised(p.clone()));
                (Some(c), None)
            }
        };

        let defaults = AdapterDefaults::for_gpu(&gpu);
        let preset = match &model.preset {
            Some(p) => p.as_str(),
            None => {
                if defaults.cpu {
                    report(Note::DefaultPreset {
                        preset: defaults.preset,
                        adapter: gpu.info.name.clone(),
                    });
                }
                defaults.preset
            }
        };
        let pretrained = matches!(init, Init::Pretrained(_));
        let base = match (&weights, &model.preset) {
            (Some(w), _) if pretrained => w.config,
            (Some(w), None) => w.config,
            _ => GptConfig::preset(preset)?,
        };
        let config = model.reshape(base);
        if config.vocab_size < GPT2_VOCAB {
            return Err(Error::Config(format!(
                "--vocab-size {} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} tokens; use at least {GPT2_VOCAB}",
                config.vocab_size
            )));
        }
        if pretrained && config != base {
            return Err(Error::Config(
                "--init-from fixes the model's shape; drop --n-layer/--n-head/--n-embd/--block-size/--vocab-size".into(),
            ));
        }
        let mut requested = asked.resolve(config, preset, &defaults);
        requested.ranks = parallel.as_ref().map_or(1, |p| p.collective.size());
        let resuming = resumed_from.as_deref().zip(weights.as_ref());
        let given = |s: Setting| asked.given(s) || (s == Setting::Model && model.given());
        let settings = run::settings_for_resume(requested, resuming, given)?;
        settings.validate()?;
        settings.precision.check_adapter(&gpu)?;
        report(Note::Settings(Box::new(settings.clone())));

        let plan = MemoryPlan::layout(&settings, &AdapterLimits::of(&gpu))?;
        report(Note::Memory {
            plan: plan.line(),
            classifier: plan.classifier_line(settings.config.padded_vocab_size),
        });
        Ok(Launch {
            gpu,
            corpus,
            settings,
            plan,
            weights,
            resumed_from,
            options,
            parallel,
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    /// Every buffer of the run and its total.
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    /// Refuses a run whose buffers do not fit the adapter's memory.
    pub fn check_memory(&self) -> Result<()> {
        self.plan.check_memory(&self.settings)
    }

    /// Builds the trainer (allocating the run's buffers, uploading its weights) and the run.
    pub fn start(self, report: &mut dyn FnMut(Note)) -> Result<Run> {
        let Launch {
            gpu,
            corpus,
            settings,
            weights,
            resumed_from,
            options,
            parallel,
            ..
        } = self;
        let weights = weights.as_ref();
        let trainer = match parallel {
            Some(p) => Trainer::data_parallel(
                gpu,
                settings,
                corpus.clone(),
                weights,
                p.collective,
                p.bucket_bytes,
            )?,
            None => Trainer::new(gpu, settings, corpus.clone(), weights)?,
        };
        let (decayed, not_decayed) = trainer.layout().counts();
        report(Note::Parameters {
            decayed,
            not_decayed,
        });
        Run::new(trainer, &corpus, options, resumed_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_left_out_take_the_adapters_and_the_recipes_defaults() {
        let cpu = AdapterDefaults::new(true, true);
        let s = SettingsSpec::default().resolve(GptConfig::tiny(), "tiny", &cpu);
        let mut expected = TrainSettings::new(GptConfig::tiny(), 4, 64);
        expected.precision = Precision::F16;
        assert_eq!(s, expected);
        // GPT-2 on a GPU without f16: the recipe's batch, T no longer than the block.
        let gpu = AdapterDefaults::new(false, false);
        let mut short = GptConfig::gpt2();
        short.block_size = 256;
        let s = SettingsSpec::default().resolve(short, "gpt2", &gpu);
        assert_eq!(
            (s.batch_size, s.seq_len, s.precision),
            (16, 256, Precision::F32)
        );
    }

    #[test]
    fn given_settings_win_and_are_the_ones_a_resumed_run_checks() {
        let asked = SettingsSpec {
            batch_size: Some(2),
            fused: Some(false),
            max_lr: Some(1e-3),
            ..SettingsSpec::default()
        };
        let s = asked.resolve(
            GptConfig::tiny(),
            "tiny",
            &AdapterDefaults::new(true, false),
        );
        assert_eq!((s.batch_size, s.fused, s.max_lr), (2, false, 1e-3));
        assert_eq!(s.seq_len, 64);
        let given: Vec<Setting> = [
            Setting::BatchSize,
            Setting::SeqLen,
            Setting::Fusion,
            Setting::MaxLr,
            Setting::Seed,
        ]
        .into_iter()
        .filter(|&x| asked.given(x))
        .collect();
        assert_eq!(given, [Setting::BatchSize, Setting::Fusion, Setting::MaxLr]);
    }

    #[test]
    fn a_model_spec_changes_its_base_shape() {
        assert!(!ModelSpec::default().given());
        let m = ModelSpec {
            n_layer: Some(3),
            vocab_size: Some(50260),
            ..ModelSpec::default()
        };
        assert!(m.given());
        let c = m.reshape(GptConfig::tiny());
        assert_eq!(
            (c.n_layer, c.n_embd, c.vocab_size, c.padded_vocab_size),
            (3, 64, 50260, 50304)
        );
        let exact = ModelSpec {
            padded_vocab_size: Some(50257),
            ..ModelSpec::default()
        };
        assert_eq!(exact.reshape(GptConfig::gpt2()).padded_vocab_size, 50257);
    }
}
