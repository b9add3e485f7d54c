//! Trains GPT-2 on a text file and prints one line per step.
//!
//! `cargo run --release --bin headless-train -- [flags]`; see `--help`.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use wgpt::checkpoint::{self, hf, Checkpoint};
use wgpt::error::{Error, Result};
use wgpt::gpu::{Gpu, GpuOptions};
use wgpt::model::config::{pad_vocab, GPT2_VOCAB};
use wgpt::model::GptConfig;
use wgpt::train::settings::{AttentionKind, Precision, TrainSettings};
use wgpt::train::trainer::{StepStats, Trainer};

#[derive(Parser, Debug)]
#[command(
    name = "headless-train",
    about = "Train GPT-2 on WGSL compute shaders",
    version
)]
struct Args {
    /// Model preset: gpt2 (124M) or tiny. Default: gpt2 on a GPU adapter, tiny on a CPU adapter.
    #[arg(long)]
    preset: Option<String>,
    /// UTF-8 text file to train on (default: the corpus in assets/).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Sequences per micro-batch (default 16 for gpt2, 4 for tiny).
    #[arg(short = 'B', long = "batch-size")]
    batch_size: Option<usize>,
    /// Tokens per sequence (default 1024 for gpt2, 64 for tiny).
    #[arg(short = 'T', long = "seq-len")]
    seq_len: Option<usize>,
    /// Optimiser steps the schedule spans.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long = "max-lr", default_value_t = 6e-4, allow_negative_numbers = true)]
    max_lr: f64,
    /// min_lr = max_lr * this.
    #[arg(
        long = "min-lr-ratio",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    min_lr_ratio: f64,
    #[arg(long = "warmup-steps", default_value_t = 10)]
    warmup_steps: usize,
    #[arg(
        long = "weight-decay",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[arg(
        long = "grad-clip",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    grad_clip: f64,
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[arg(long = "n-layer")]
    n_layer: Option<usize>,
    #[arg(long = "n-head")]
    n_head: Option<usize>,
    #[arg(long = "n-embd")]
    n_embd: Option<usize>,
    #[arg(long = "block-size")]
    block_size: Option<usize>,
    /// Vocabulary size (padded up to a multiple of 128 in memory unless --padded-vocab-size).
    #[arg(long = "vocab-size")]
    vocab_size: Option<usize>,
    /// Rows of wte and logits in memory (>= vocab size); equal to --vocab-size means no padding.
    #[arg(long = "padded-vocab-size")]
    padded_vocab_size: Option<usize>,
    /// f32 or f16 (default f16 where the adapter has SHADER_F16).
    #[arg(long)]
    precision: Option<Precision>,
    /// flash or naive.
    #[arg(long, default_value = "flash")]
    attention: AttentionKind,
    /// Switch off kernel fusion (to measure what it buys).
    #[arg(long = "no-fusion")]
    no_fusion: bool,
    /// One AdamW dispatch per tensor instead of one for all (to measure what fusion buys).
    #[arg(long = "no-fused-optimizer")]
    no_fused_optimizer: bool,
    /// Start from these weights: a Hugging Face GPT-2 folder or model.safetensors, or a checkpoint.
    #[arg(long = "init-from")]
    init_from: Option<PathBuf>,
    /// Where to write checkpoints.
    #[arg(long = "checkpoint-dir")]
    checkpoint_dir: Option<PathBuf>,
    /// Write a checkpoint every N steps (and always at the end when --checkpoint-dir is set).
    #[arg(long = "checkpoint-every")]
    checkpoint_every: Option<usize>,
    /// Continue from the newest complete checkpoint in DIR.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// End this run after N steps (the schedule still spans --steps).
    #[arg(long = "stop-after")]
    stop_after: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long = "grad-accum", default_value_t = 1)]
    grad_accum: usize,
    /// Write the trained model in the Hugging Face GPT-2 layout into DIR.
    #[arg(long = "export-hf")]
    export_hf: Option<PathBuf>,
    /// Append one JSON object per step to this file.
    #[arg(long)]
    metrics: Option<PathBuf>,
}

fn default_data() -> PathBuf {
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
    if bundled.exists() {
        bundled
    } else {
        PathBuf::from("assets/shakespeare.txt")
    }
}

fn step_line(s: &StepStats) -> String {
    format!(
        "step {:4} | loss: {:.6} | lr {:.4e} | norm: {:.4} | dt: {:.2}ms | tok/sec: {:.2}",
        s.step, s.loss, s.lr, s.norm, s.dt_ms, s.tok_per_sec
    )
}

fn run(args: Args) -> Result<()> {
    let data = args.data.clone().unwrap_or_else(default_data);
    let tokens = Arc::new(wgpt::data::load_tokens(&data)?);
    println!("loaded {} tokens", tokens.len());

    let gpu = Arc::new(Gpu::new(&GpuOptions::default())?);
    println!("{}", gpu.summary());

    // What to start from: a resumed run, imported weights, or a fresh init.
    let resumed: Option<Checkpoint> = match &args.resume {
        Some(dir) => {
            let (path, c) = checkpoint::load_newest(dir)?;
            println!("resuming from {}", path.display());
            Some(c)
        }
        None => None,
    };
    let init: Option<Checkpoint> = match (&resumed, &args.init_from) {
        (None, Some(p)) => {
            let c = hf::load_any(p)?;
            println!("initialised from {}", p.display());
            Some(c)
        }
        _ => None,
    };

    let settings = if let Some(state) = resumed.as_ref().and_then(|c| c.state.as_ref()) {
        let s: TrainSettings = serde_json::from_str(&state.settings)
            .map_err(|e| Error::Other(format!("the checkpoint's settings do not parse: {e}")))?;
        s
    } else {
        let preset_name = match &args.preset {
            Some(p) => p.clone(),
            None if gpu.is_cpu() => {
                println!(
                    "preset: tiny (the adapter '{}' is a CPU rasteriser; pass --preset gpt2 to override)",
                    gpu.info.name
                );
                "tiny".into()
            }
            None => "gpt2".into(),
        };
        let mut config = match &init {
            Some(c) => c.config,
            None => GptConfig::preset(&preset_name)?,
        };
        if let Some(v) = args.n_layer {
            config.n_layer = v;
        }
        if let Some(v) = args.n_head {
            config.n_head = v;
        }
        if let Some(v) = args.n_embd {
            config.n_embd = v;
        }
        if let Some(v) = args.block_size {
            config.block_size = v;
        }
        if let Some(v) = args.vocab_size {
            config.vocab_size = v;
            config.padded_vocab_size = pad_vocab(v);
        }
        if let Some(v) = args.padded_vocab_size {
            config.padded_vocab_size = v;
        }
        if config.vocab_size < GPT2_VOCAB {
            return Err(Error::Config(format!(
                "--vocab-size {} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB} tokens; use at least {GPT2_VOCAB}",
                config.vocab_size
            )));
        }
        if init.is_some() && config != init.as_ref().map(|c| c.config).unwrap_or(config) {
            return Err(Error::Config(
                "--init-from fixes the model's shape; drop --n-layer/--n-head/--n-embd/--block-size/--vocab-size".into(),
            ));
        }
        let small = preset_name == "tiny" || gpu.is_cpu();
        let b = args.batch_size.unwrap_or(if small { 4 } else { 16 });
        let t = args
            .seq_len
            .unwrap_or(if small { 64 } else { 1024 }.min(config.block_size));
        let mut s = TrainSettings::new(config, b, t);
        s.steps = args.steps;
        s.max_lr = args.max_lr;
        s.min_lr_ratio = args.min_lr_ratio;
        s.warmup_steps = args.warmup_steps;
        s.weight_decay = args.weight_decay;
        s.grad_clip = args.grad_clip;
        s.seed = args.seed;
        s.grad_accum = args.grad_accum;
        s.attention = args.attention;
        s.fused = !args.no_fusion;
        s.fused_optimizer = !args.no_fused_optimizer;
        s.precision = match args.precision {
            Some(p) => p,
            None if gpu.has_f16() => Precision::F16,
            None => Precision::F32,
        };
        s
    };
    settings.validate()?;
    if settings.precision == Precision::F16 && !gpu.has_f16() {
        return Err(Error::Config(format!(
            "--precision f16 needs SHADER_F16, which the adapter '{}' lacks; use --precision f32",
            gpu.info.name
        )));
    }
    println!(
        "config: {} | B {} | T {} | grad accum {} | {} tokens/step | precision {} | attention {} | steps {}",
        settings.config.describe(),
        settings.batch_size,
        settings.seq_len,
        settings.grad_accum,
        settings.tokens_per_step(),
        settings.precision,
        settings.attention,
        settings.steps
    );

    let weights = resumed.as_ref().or(init.as_ref());
    let mut trainer = Trainer::new(gpu.clone(), settings.clone(), tokens, weights)?;
    let ((dt, dp), (nt, np)) = trainer.layout().counts();
    println!("num decayed parameter tensors: {dt}, with {dp} parameters");
    println!("num non-decayed parameter tensors: {nt}, with {np} parameters");

    let checkpoint_dir = args.checkpoint_dir.clone().or(args.resume.clone());
    let mut metrics = match &args.metrics {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::io(p, e))?,
        )),
        None => None,
    };

    let mut done_this_run = 0;
    while trainer.step_index() < settings.steps {
        if args.stop_after.is_some_and(|n| done_this_run >= n) {
            break;
        }
        let s = trainer.step()?;
        done_this_run += 1;
        if s.skipped {
            println!(
                "{} | skipped: non-finite gradients, loss scale now {}",
                step_line(&s),
                s.loss_scale
            );
        } else {
            println!("{}", step_line(&s));
        }
        if let Some(m) = metrics.as_mut() {
            let line = serde_json::json!({
                "step": s.step, "loss": s.loss, "lr": s.lr, "norm": s.norm, "dt_ms": s.dt_ms,
                "tok_per_sec": s.tok_per_sec, "skipped": s.skipped, "loss_scale": s.loss_scale,
            });
            writeln!(m, "{line}")
                .map_err(|e| Error::io(args.metrics.clone().unwrap_or_default(), e))?;
            m.flush()
                .map_err(|e| Error::io(args.metrics.clone().unwrap_or_default(), e))?;
        }
        if !s.loss.is_finite() && settings.precision == Precision::F32 {
            return Err(Error::Other(format!(
                "the loss became {} at step {}; stopping (the last checkpoint is kept). Lower --max-lr or check the data",
                s.loss, s.step
            )));
        }
        if let (Some(dir), Some(every)) = (&checkpoint_dir, args.checkpoint_every) {
            if every > 0 && trainer.step_index() % every == 0 {
                let path = checkpoint::checkpoint_path(dir, trainer.step_index());
                trainer.checkpoint()?.save(&path)?;
                println!("saved {}", path.display());
            }
        }
    }
    if let Some(dir) = &checkpoint_dir {
        let path = checkpoint::checkpoint_path(dir, trainer.step_index());
        if !path.exists() {
            trainer.checkpoint()?.save(&path)?;
            println!("saved {}", path.display());
        }
    }
    if let Some(dir) = &args.export_hf {
        hf::export(dir, &settings.config, &trainer.params()?)?;
        println!("exported Hugging Face GPT-2 to {}", dir.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
