//! What the user has typed into the Train and Generate panels, and how it becomes a
//! [`RunRequest`] or [`GenSpec`] (with errors that say which field is wrong).

use crate::worker::{GenSpec, RunRequest, WeightsSource};
use std::path::PathBuf;
use wgpt::gpu::Gpu;
use wgpt::model::GptConfig;
use wgpt::sample::SampleOptions;
use wgpt::train::launch::{Init, ModelSpec, RunSpec, SettingsSpec};
use wgpt::train::run::RunOptions;
use wgpt::train::settings::{AdapterDefaults, AttentionKind, Precision, TrainSettings};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    Gpt2,
    Gpt2Medium,
    Gpt2Large,
    Gpt2Xl,
    Custom,
}

impl Preset {
    /// The choices, in the order the menu shows them.
    pub const ALL: [Preset; 6] = [
        Preset::Tiny,
        Preset::Gpt2,
        Preset::Gpt2Medium,
        Preset::Gpt2Large,
        Preset::Gpt2Xl,
        Preset::Custom,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Gpt2 => "gpt2 (124M)",
            Preset::Gpt2Medium => "gpt2-medium (350M)",
            Preset::Gpt2Large => "gpt2-large (774M)",
            Preset::Gpt2Xl => "gpt2-xl (1.5B)",
            Preset::Custom => "custom",
        }
    }

    /// The library's preset the model's fields change (custom: gpt2, for its vocabulary).
    fn base(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Gpt2 | Preset::Custom => "gpt2",
            Preset::Gpt2Medium => "gpt2-medium",
            Preset::Gpt2Large => "gpt2-large",
            Preset::Gpt2Xl => "gpt2-xl",
        }
    }

    /// The shape of a named preset (None for custom).
    pub fn config(self) -> Option<GptConfig> {
        match self {
            Preset::Tiny => Some(GptConfig::tiny()),
            Preset::Gpt2 => Some(GptConfig::gpt2()),
            Preset::Gpt2Medium => Some(GptConfig::gpt2_medium()),
            Preset::Gpt2Large => Some(GptConfig::gpt2_large()),
            Preset::Gpt2Xl => Some(GptConfig::gpt2_xl()),
            Preset::Custom => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitChoice {
    Scratch,
    Checkpoint,
    HuggingFace,
}

/// The Train panel's fields.
#[derive(Clone, Debug)]
pub struct TrainForm {
    pub preset: Preset,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub steps: usize,
    pub max_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    pub precision: Precision,
    pub attention: AttentionKind,
    pub data_path: String,
    pub init: InitChoice,
    pub init_path: String,
    pub checkpoint_dir: String,
    /// Shuffle shards and documents per epoch (a shard folder only).
    pub shuffle: bool,
    /// Validation loss every N steps; 0: off (needs a shard folder).
    pub val_every: usize,
    /// Samples every N steps; 0: off.
    pub sample_every: usize,
}

/// The corpus shipped in `assets/`, found from the source tree or the working directory.
pub fn default_data_path() -> String {
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/shakespeare.txt");
    match bundled.canonicalize() {
        Ok(p) => p.display().to_string(),
        Err(_) => "assets/shakespeare.txt".into(),
    }
}

fn default_checkpoint_dir() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("checkpoints/run-{secs}")
}

impl TrainForm {
    /// The headless trainer's defaults for this adapter: GPT-2 with B=16, T=1024 on a GPU, the
    /// tiny model with B=4, T=64 on a CPU rasteriser; f16 where the adapter has SHADER_F16.
    pub fn for_gpu(gpu: &Gpu) -> TrainForm {
        let defaults = AdapterDefaults::for_gpu(gpu);
        let preset = if defaults.preset == "tiny" {
            Preset::Tiny
        } else {
            Preset::Gpt2
        };
        let config = preset.config().unwrap_or_else(GptConfig::gpt2);
        let (batch_size, seq_len) = defaults.batch_shape(defaults.preset, config.block_size);
        let base = TrainSettings::new(config, batch_size, seq_len);
        TrainForm {
            preset,
            n_layer: config.n_layer,
            n_head: config.n_head,
            n_embd: config.n_embd,
            block_size: config.block_size,
            batch_size,
            seq_len,
            steps: base.steps,
            max_lr: base.max_lr,
            warmup_steps: base.warmup_steps,
            weight_decay: base.weight_decay,
            grad_clip: base.grad_clip,
            seed: base.seed,
            precision: defaults.precision,
            attention: AttentionKind::Flash,
            data_path: default_data_path(),
            init: InitChoice::Scratch,
            init_path: String::new(),
            checkpoint_dir: default_checkpoint_dir(),
            shuffle: false,
            val_every: 0,
            sample_every: 0,
        }
    }

    /// Copies a preset's shape into the model fields.
    pub fn apply_preset(&mut self, preset: Preset) {
        self.preset = preset;
        let Some(c) = preset.config() else {
            return;
        };
        self.n_layer = c.n_layer;
        self.n_head = c.n_head;
        self.n_embd = c.n_embd;
        self.block_size = c.block_size;
        self.seq_len = self.seq_len.min(c.block_size);
    }

    /// The model the fields describe.
    pub fn model(&self) -> ModelSpec {
        ModelSpec {
            preset: Some(self.preset.base().into()),
            n_layer: Some(self.n_layer),
            n_head: Some(self.n_head),
            n_embd: Some(self.n_embd),
            block_size: Some(self.block_size),
            ..ModelSpec::default()
        }
    }

    /// The settings the fields give; those the panel has no field for keep the recipe's (or,
    /// resuming, the checkpoint's).
    pub fn settings(&self) -> SettingsSpec {
        SettingsSpec {
            batch_size: Some(self.batch_size),
            seq_len: Some(self.seq_len),
            steps: Some(self.steps),
            max_lr: Some(self.max_lr),
            warmup_steps: Some(self.warmup_steps),
            weight_decay: Some(self.weight_decay),
            grad_clip: Some(self.grad_clip),
            seed: Some(self.seed),
            precision: Some(self.precision),
            attention: Some(self.attention),
            shuffle: Some(self.shuffle),
            ..SettingsSpec::default()
        }
    }

    /// The run to start, or what is wrong with the form. The library checks the settings when
    /// the engine starts the run.
    pub fn run_request(&self) -> Result<RunRequest, String> {
        let data = self.data_path.trim();
        if data.is_empty() {
            return Err(
                "choose the data to train on (a UTF-8 text file or a folder of shards from prepare-data)"
                    .into(),
            );
        }
        let init_path = self.init_path.trim();
        let init = match self.init {
            InitChoice::Scratch => Init::Scratch,
            InitChoice::Checkpoint | InitChoice::HuggingFace if init_path.is_empty() => return Err(
                "choose the checkpoint or Hugging Face folder to start from, or start from scratch"
                    .into(),
            ),
            InitChoice::Checkpoint => Init::Resume(init_path.into()),
            InitChoice::HuggingFace => Init::Pretrained(init_path.into()),
        };
        let dir = self.checkpoint_dir.trim();
        if dir.is_empty() {
            return Err("choose a checkpoint folder (Stop and the end of a run save there)".into());
        }
        // Weights bring their own shape.
        let model = match init {
            Init::Scratch => self.model(),
            _ => ModelSpec::default(),
        };
        Ok(RunRequest {
            data: data.into(),
            spec: RunSpec {
                model,
                init,
                settings: self.settings(),
                options: RunOptions {
                    checkpoint_dir: Some(dir.into()),
                    val_every: (self.val_every > 0).then_some(self.val_every),
                    sample_every: (self.sample_every > 0).then_some(self.sample_every),
                    ..RunOptions::default()
                },
                parallel: None,
            },
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenSourceChoice {
    Run,
    File,
}

/// The Generate panel's fields.
#[derive(Clone, Debug)]
pub struct GenForm {
    pub source: GenSourceChoice,
    pub path: String,
    pub prompt: String,
    pub max_tokens: usize,
    pub top_k: usize,
    pub temperature: f32,
    pub samples: usize,
    pub seed: u64,
}

impl Default for GenForm {
    fn default() -> Self {
        let o = SampleOptions::default();
        GenForm {
            source: GenSourceChoice::Run,
            path: String::new(),
            prompt: "ROMEO:".into(),
            max_tokens: 32,
            top_k: o.top_k,
            temperature: o.temperature,
            samples: 2,
            seed: o.seed,
        }
    }
}

impl GenForm {
    pub fn gen_spec(&self) -> Result<GenSpec, String> {
        if self.prompt.is_empty() {
            return Err("type a prompt (at least one character)".into());
        }
        if self.samples == 0 {
            return Err("ask for at least one sample".into());
        }
        let source = match self.source {
            GenSourceChoice::Run => WeightsSource::Run,
            GenSourceChoice::File => {
                let p = self.path.trim();
                if p.is_empty() {
                    return Err(
                        "choose a checkpoint file or folder, or a Hugging Face GPT-2 folder".into(),
                    );
                }
                WeightsSource::Path(p.into())
            }
        };
        Ok(GenSpec {
            source,
            prompt: self.prompt.clone(),
            samples: self.samples,
            options: SampleOptions {
                max_new_tokens: self.max_tokens,
                top_k: self.top_k,
                temperature: self.temperature,
                seed: self.seed,
            },
        })
    }
}
