//! Trains GPT-2 on a text file and prints one line per step.
//!
//! `cargo run --release --bin headless-train -- [flags]`; see `--help`.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wgpt::checkpoint::{self, hf};
use wgpt::data::Corpus;
use wgpt::error::Result;
use wgpt::gpu::{Gpu, GpuOptions};
use wgpt::train::job::Job;
use wgpt::train::ladder;
use wgpt::train::launch::{Init, Launch, ModelSpec, Note, RunSpec, SettingsSpec};
use wgpt::train::metrics::MetricsLog;
use wgpt::train::report::{Peaks, ProfileReport, ProfileTotals};
use wgpt::train::run::{self, Progress, RunEvent, RunOptions};
use wgpt::train::settings::{AttentionKind, Precision};

/// Whether this process prints: a single process, or rank 0 of a data-parallel job.
static PRINTS: AtomicBool = AtomicBool::new(true);

/// `println!` for rank 0 alone (the other ranks of a data-parallel job print nothing but
/// their errors).
macro_rules! say {
    ($($arg:tt)*) => {
        if PRINTS.load(Ordering::Relaxed) {
            println!($($arg)*);
        }
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "headless-train",
    about = "Train GPT-2 on WGSL compute shaders",
    version,
    args_override_self = true
)]
struct Args {
    /// Model preset: gpt2 (124M), gpt2-medium (350M), gpt2-large (774M), gpt2-xl (1.5B) or tiny.
    /// Default: gpt2 on a GPU adapter, tiny on a CPU adapter.
    #[arg(long)]
    preset: Option<String>,
    /// A UTF-8 text file, or a folder of token shards made by prepare-data (its first shard is
    /// the validation split), to train on (default: the corpus in assets/).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Shuffle the shards, and the documents within each shard, anew every epoch (from --seed;
    /// a shard folder only).
    #[arg(long)]
    shuffle: bool,
    /// Sequences per micro-batch (default 16 for gpt2, 4 for tiny).
    #[arg(short = 'B', long = "batch-size")]
    batch_size: Option<usize>,
    /// Tokens per sequence (default 1024 for gpt2, 64 for tiny).
    #[arg(short = 'T', long = "seq-len")]
    seq_len: Option<usize>,
    /// Optimiser steps the schedule spans.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long = "max-lr", default_value_t = 6e-4, allow_hyphen_values = true)]
    max_lr: f64,
    /// min_lr = max_lr * this.
    #[arg(
        long = "min-lr-ratio",
        default_value_t = 0.1,
        allow_hyphen_values = true
    )]
    min_lr_ratio: f64,
    #[arg(long = "warmup-steps", default_value_t = 10)]
    warmup_steps: usize,
    #[arg(
        long = "weight-decay",
        default_value_t = 0.1,
        allow_hyphen_values = true
    )]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0 disables).
    #[arg(long = "grad-clip", default_value_t = 1.0, allow_hyphen_values = true)]
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
    /// Checkpoints kept in the folder: the newest K (0 keeps all). The one just written and
    /// the one the run resumed from are never deleted.
    #[arg(long = "keep-last", default_value_t = checkpoint::DEFAULT_KEEP_LAST)]
    keep_last: usize,
    /// Continue from the newest complete checkpoint in DIR. The run keeps the checkpoint's
    /// settings; a setting given here that differs from them is refused.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Validation loss every N steps (and after the last), over the first --val-steps batches
    /// of the validation split (a shard folder's first shard).
    #[arg(long = "val-every")]
    val_every: Option<usize>,
    /// Batches of B x T tokens per validation.
    #[arg(long = "val-steps", default_value_t = run::DEFAULT_VAL_STEPS)]
    val_steps: usize,
    /// Print samples from the live weights every N steps (and after the last): 4 of 32 tokens
    /// after "Hello, I'm a language model,", top-k 50.
    #[arg(long = "sample-every")]
    sample_every: Option<usize>,
    /// HellaSwag jsonl file (ctx, endings, label per line) to evaluate: every --eval-every
    /// steps and after the last; acc_norm is printed.
    #[arg(long)]
    hellaswag: Option<PathBuf>,
    /// HellaSwag evaluation every N steps (needs --hellaswag).
    #[arg(long = "eval-every")]
    eval_every: Option<usize>,
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
    /// Time every op family on the GPU (timestamp queries) and print a profile at the end:
    /// share of the step, dispatches per step (with and without fusion), model FLOPs utilisation.
    #[arg(long)]
    profile: bool,
    /// Peak FLOP/s of the adapter in TFLOP/s, for the utilisation figure of --profile
    /// (default: known for some GPUs, e.g. 989 for H100/H200 f16 tensor cores).
    #[arg(long = "peak-tflops")]
    peak_tflops: Option<f64>,
    /// Peak memory bandwidth of the adapter in GB/s, for the roofline bound per op family of
    /// --profile (default: known for some GPUs, e.g. 3350 for H100, 4800 for H200).
    #[arg(long = "peak-gbps")]
    peak_gbps: Option<f64>,
    /// Run the speed ladder instead of training: the same short run with each switch turned on
    /// in turn (f32 + naive attention + vocab 50257; f16; fusion; flash; vocab 50304; fused
    /// optimiser), one table row per rung.
    #[arg(long = "bench-ladder")]
    bench_ladder: bool,
    /// Steps per ladder rung (default 12 on a GPU, 5 on a CPU adapter); the first 2 are warm-up.
    #[arg(long = "ladder-steps")]
    ladder_steps: Option<usize>,
    /// Print the memory plan (every buffer and the total for this adapter) and exit without
    /// training.
    #[arg(long = "dry-run")]
    dry_run: bool,
    /// Open the adapter at this index (best kind first: discrete GPUs, integrated, virtual,
    /// software). Default: the best one; in a data-parallel job, the rank on this machine
    /// modulo its GPUs.
    #[arg(long)]
    adapter: Option<usize>,
    /// Data parallel: megabytes of gradients per all-reduce bucket; a bucket is reduced as soon
    /// as the backward has finished it, while the backward of earlier layers runs.
    #[arg(long = "bucket-mb", default_value_t = 25.0)]
    bucket_mb: f64,
}

fn default_data() -> PathBuf {
    let bundled = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/shakespeare.txt");
    if bundled.exists() {
        bundled
    } else {
        PathBuf::from("assets/shakespeare.txt")
    }
}

/// `value` if the flag `id` was on the command line; None leaves the setting to its default
/// (or to a resumed run's checkpoint, which refuses given settings that differ from its own).
fn given<T>(m: &ArgMatches, id: &str, value: T) -> Option<T> {
    (m.value_source(id) == Some(ValueSource::CommandLine)).then_some(value)
}

/// The run the flags describe.
fn run_spec(args: &Args, m: &ArgMatches, job: &Job) -> Result<RunSpec> {
    let init = match (&args.resume, &args.init_from) {
        (Some(dir), _) => Init::Resume(dir.clone()),
        (None, Some(p)) => Init::Pretrained(p.clone()),
        (None, None) => Init::Scratch,
    };
    Ok(RunSpec {
        model: ModelSpec {
            preset: args.preset.clone(),
            n_layer: args.n_layer,
            n_head: args.n_head,
            n_embd: args.n_embd,
            block_size: args.block_size,
            vocab_size: args.vocab_size,
            padded_vocab_size: args.padded_vocab_size,
        },
        init,
        settings: SettingsSpec {
            batch_size: args.batch_size,
            seq_len: args.seq_len,
            grad_accum: given(m, "grad_accum", args.grad_accum),
            steps: given(m, "steps", args.steps),
            max_lr: given(m, "max_lr", args.max_lr),
            min_lr_ratio: given(m, "min_lr_ratio", args.min_lr_ratio),
            warmup_steps: given(m, "warmup_steps", args.warmup_steps),
            weight_decay: given(m, "weight_decay", args.weight_decay),
            grad_clip: given(m, "grad_clip", args.grad_clip),
            seed: given(m, "seed", args.seed),
            precision: args.precision,
            attention: given(m, "attention", args.attention),
            fused: given(m, "no_fusion", !args.no_fusion),
            fused_optimizer: given(m, "no_fused_optimizer", !args.no_fused_optimizer),
            shuffle: given(m, "shuffle", args.shuffle),
        },
        options: RunOptions {
            checkpoint_dir: args.checkpoint_dir.clone(),
            checkpoint_every: args.checkpoint_every,
            keep_last: args.keep_last,
            stop_after: args.stop_after,
            val_every: args.val_every,
            val_steps: args.val_steps,
            sample_every: args.sample_every,
            hellaswag: args.hellaswag.clone(),
            eval_every: args.eval_every,
            profile: args.profile,
            ..RunOptions::default()
        },
        parallel: job.data_parallel(args.bucket_mb)?,
    })
}

fn run(args: Args, matches: &ArgMatches, job: &Job) -> Result<()> {
    let spec = run_spec(&args, matches, job)?;
    let corpus = Corpus::open(&args.data.clone().unwrap_or_else(default_data))?;
    say!("loaded {} tokens", corpus.train_tokens());
    if let Some(line) = corpus.describe_shards() {
        say!("{line}");
    }
    let gpu = Arc::new(Gpu::new(&GpuOptions {
        adapter: job.adapter(args.adapter),
        ..GpuOptions::default()
    })?);
    say!("{}", gpu.summary());

    let mut note = |n: Note| say!("{n}");
    let launch = Launch::prepare(gpu.clone(), corpus.clone(), spec, &mut note)?;
    if args.dry_run {
        print!("{}", launch.plan().details());
    }
    launch.check_memory()?;
    if args.dry_run {
        say!("the run fits the adapter");
        return Ok(());
    }
    if args.bench_ladder {
        let base = launch.settings().clone();
        return ladder::climb(&gpu, &corpus, base, args.ladder_steps, &mut |l| say!("{l}"));
    }
    // Rank 0 alone writes the metrics.
    let mut metrics = match args.metrics.as_deref().filter(|_| job.rank() == 0) {
        Some(p) => Some(MetricsLog::open(p)?),
        None => None,
    };
    let mut run = launch.start(&mut note)?;
    if let Err(e) = gpu.save_pipeline_cache() {
        eprintln!("warning: the pipeline cache was not saved ({e}); the next start compiles anew");
    }
    let mut profile = args.profile.then(|| ProfileTotals::after(run.steps().0));
    let mut on = |e: RunEvent| -> Result<()> {
        if let Some(p) = profile.as_mut() {
            p.record(&e);
        }
        say!("{e}");
        match metrics.as_mut() {
            Some(m) => m.record(&e),
            None => Ok(()),
        }
    };
    while run.advance(usize::MAX, &mut on)? == Progress::Running {}
    let trainer = run.into_trainer();
    if job.rank() != 0 {
        return Ok(());
    }
    if let Some(dir) = &args.export_hf {
        hf::export(dir, &trainer.settings().config, &trainer.params()?)?;
        say!("exported Hugging Face GPT-2 to {}", dir.display());
    }
    if let Some(totals) = profile {
        let peaks = Peaks::of(&gpu.info.name, args.peak_tflops, args.peak_gbps);
        say!("{}", ProfileReport::new(totals, trainer, &corpus, peaks)?);
    }
    Ok(())
}

fn main() -> ExitCode {
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let job = match Job::join() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    PRINTS.store(job.rank() == 0, Ordering::Relaxed);
    // A panic is caught here too, so that a failing rank ends the whole job.
    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(args, &matches, &job)));
    let message = match outcome {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the engine panicked (see above)".into(),
    };
    match &job.collective {
        Some(c) => {
            // The other ranks would wait for this one in the next all-reduce forever: end
            // the job. The last checkpoint (written whole, then renamed) stays loadable.
            eprintln!(
                "error: rank {} of {} (on {}) failed: {message}; ending the job (the last checkpoint is kept; resume with --resume)",
                c.rank(),
                c.size(),
                job.host
            );
            c.abort(1)
        }
        None => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
