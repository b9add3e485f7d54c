//! Trains GPT-2 on a text file and prints one line per step.
//!
//! `cargo run --release --bin headless-train -- [flags]`; see `--help`.

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wgpt::checkpoint::{self, hf, Checkpoint};
use wgpt::data::Corpus;
use wgpt::error::{Error, Result, Setting};
use wgpt::gpu::profile::{by_family, known_peaks, NodeTime};
use wgpt::gpu::{AdapterChoice, AdapterLimits, Gpu, GpuOptions};
use wgpt::model::config::{pad_vocab, GPT2_VOCAB};
use wgpt::model::GptConfig;
use wgpt::train::parallel::Collective;
use wgpt::train::plan::MemoryPlan;
use wgpt::train::run::{self, Progress, Run, RunEvent, RunOptions};
use wgpt::train::settings::{AdapterDefaults, AttentionKind, Precision, TrainSettings};
use wgpt::train::trainer::{StepStats, Trainer};

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

/// The job this process belongs to: with the `mpi` feature under `mpirun -np N` (N > 1), a
/// data-parallel one; otherwise a single process.
struct Job {
    collective: Option<Arc<dyn Collective>>,
    /// The rank among those on this machine (picks its GPU).
    local_rank: usize,
    /// This machine's name (for a failing rank's message).
    host: String,
}

impl Job {
    #[cfg(feature = "mpi")]
    fn join() -> Result<Job> {
        let mpi = wgpt::train::parallel::Mpi::init()?;
        let (local_rank, host) = (mpi.local_rank(), mpi.host());
        let collective: Option<Arc<dyn Collective>> = if mpi.size() > 1 {
            Some(Arc::new(mpi))
        } else {
            None
        };
        Ok(Job {
            collective,
            local_rank,
            host,
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn join() -> Result<Job> {
        Ok(Job {
            collective: None,
            local_rank: 0,
            host: String::new(),
        })
    }

    fn ranks(&self) -> usize {
        self.collective.as_ref().map_or(1, |c| c.size())
    }

    fn rank(&self) -> usize {
        self.collective.as_ref().map_or(0, |c| c.rank())
    }
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

/// Node times summed over the profiled steps, with the host and idle times of every step.
#[derive(Default)]
struct ProfileTotals {
    steps: usize,
    step_ms: f64,
    encode_ms: f64,
    submit_ms: f64,
    idle_ms: f64,
    idle_steps: usize,
    nodes: Vec<NodeTime>,
    all_reduce_ms: f64,
    transfer_ms: f64,
    reduce_bytes: u64,
    buckets: usize,
}

impl ProfileTotals {
    fn add(&mut self, s: &StepStats, times: &[NodeTime]) {
        self.steps += 1;
        self.step_ms += s.dt_ms;
        self.encode_ms += s.encode_ms;
        self.submit_ms += s.submit_ms;
        if let Some(idle) = s.gpu_idle_ms {
            self.idle_ms += idle;
            self.idle_steps += 1;
        }
        self.nodes.extend_from_slice(times);
        if let Some(r) = s.reduce {
            self.all_reduce_ms += r.all_reduce_ms;
            self.transfer_ms += r.transfer_ms;
            self.reduce_bytes = r.bytes;
            self.buckets = r.buckets;
        }
    }

    fn print(
        &self,
        gpu: &Gpu,
        flops: f64,
        dispatches: usize,
        (fused, unfused): (usize, usize),
        peaks: (Option<f64>, Option<f64>),
    ) {
        if self.steps == 0 {
            say!("profile: run at least 2 steps (the first is warm-up)");
            return;
        }
        let n = self.steps as f64;
        let gpu_ms: f64 = self.nodes.iter().map(|t| t.ms).sum::<f64>() / n;
        let step_ms = self.step_ms / n;
        let known = known_peaks(&gpu.info.name);
        let peak_flops = peaks.0.map(|t| t * 1e12).or(known.map(|k| k.0));
        let peak_bytes = peaks.1.map(|g| g * 1e9).or(known.map(|k| k.1));
        say!(
            "profile over {} steps on {} (GPU time from timestamps; step time is wall clock)",
            self.steps,
            gpu.info.name
        );
        match (peak_flops, peak_bytes) {
            (Some(f), Some(b)) => say!(
                "roofline: {:.0} TFLOP/s, {:.0} GB/s; bound = max(FLOPs / peak, bytes bound / bandwidth)",
                f / 1e12,
                b / 1e9
            ),
            _ => say!("roofline: pass --peak-tflops and --peak-gbps for the bound per family"),
        }
        say!(
            "{:<14} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "op family",
            "ms/step",
            "share",
            "GFLOP",
            "MB",
            "GFLOP/s",
            "bound ms",
            "x bound"
        );
        for f in by_family(&self.nodes) {
            let ms = f.ms / n;
            let per_step = |x: f64| x / n;
            let rate = if f.flops > 0.0 && ms > 0.0 {
                format!("{:.1}", per_step(f.flops) / (ms * 1e-3) / 1e9)
            } else {
                "-".into()
            };
            let (bound, ratio) = match (peak_flops, peak_bytes) {
                (Some(pf), Some(pb)) => {
                    let one = wgpt::gpu::profile::FamilyTime {
                        flops: per_step(f.flops),
                        bytes: per_step(f.bytes),
                        ..f
                    };
                    let b = one.roofline_ms(pf, pb);
                    (format!("{b:.3}"), format!("{:.1}", ms / b.max(1e-12)))
                }
                _ => ("-".into(), "-".into()),
            };
            say!(
                "{:<14} {:>10.3} {:>6.1}% {:>10.2} {:>10.1} {:>10} {:>10} {:>8}",
                f.family,
                ms,
                100.0 * ms / gpu_ms.max(1e-9),
                per_step(f.flops) / 1e9,
                per_step(f.bytes) / 1e6,
                rate,
                bound,
                ratio
            );
        }
        let mut per_node: Vec<(String, f64)> = Vec::new();
        for t in &self.nodes {
            match per_node.iter_mut().find(|(l, _)| *l == t.label) {
                Some(e) => e.1 += t.ms / n,
                None => per_node.push((t.label.clone(), t.ms / n)),
            }
        }
        per_node.sort_by(|a, b| b.1.total_cmp(&a.1));
        say!("slowest nodes (ms per step):");
        for (label, ms) in per_node.iter().take(8) {
            say!("  {label:<40} {ms:>9.3}");
        }
        say!("GPU time per step {gpu_ms:.2} ms of {step_ms:.2} ms wall clock");
        let idle = if self.idle_steps > 0 {
            format!("{:.3} ms", self.idle_ms / self.idle_steps as f64)
        } else {
            "-".into()
        };
        if self.reduce_bytes > 0 {
            say!(
                "host per step: {:.3} ms to write the batch, encode, wait for the backward and exchange the gradients, {:.3} ms in queue.submit; GPU idle between steps {idle} (data parallel: one step at a time)",
                self.encode_ms / n,
                self.submit_ms / n,
            );
        } else {
            say!(
                "host per step: {:.3} ms to write the batch and encode, {:.3} ms in queue.submit; GPU idle between steps {idle} (steps queued {} deep)",
                self.encode_ms / n,
                self.submit_ms / n,
                wgpt::train::trainer::PIPELINE_DEPTH
            );
        }
        say!("dispatches per step: {dispatches} ({fused} per micro-step fused, {unfused} unfused)");
        if self.reduce_bytes > 0 {
            let ms = self.all_reduce_ms / n;
            let mb = self.reduce_bytes as f64 / 1e6;
            say!(
                "all-reduce per step: {ms:.3} ms for {mb:.3} MB of gradients in {} bucket(s) ({:.1} MB/s); {:.3} ms more on the host to copy them out of the read-back and queue the sums' upload",
                self.buckets,
                mb / (ms * 1e-3).max(1e-12),
                self.transfer_ms / n
            );
        }
        let achieved = flops / (step_ms * 1e-3);
        match peak_flops {
            Some(p) => say!(
                "model FLOPs per step {:.3e}: {:.2} TFLOP/s achieved, MFU {:.1}% of {:.0} TFLOP/s",
                flops,
                achieved / 1e12,
                100.0 * achieved / p,
                p / 1e12
            ),
            None => say!(
                "model FLOPs per step {:.3e}: {:.3} TFLOP/s achieved (pass --peak-tflops for MFU)",
                flops,
                achieved / 1e12
            ),
        }
    }
}

/// One rung of the speed ladder: a switch turned on over the previous rung.
struct Rung {
    name: &'static str,
    apply: fn(&mut TrainSettings),
}

fn bench_ladder(args: &Args, gpu: Arc<Gpu>, tokens: Corpus, base: TrainSettings) -> Result<()> {
    let rungs = [
        Rung {
            name: "f32, naive attention, vocab 50257",
            apply: |s| {
                s.precision = Precision::F32;
                s.attention = AttentionKind::Naive;
                s.fused = false;
                s.fused_optimizer = false;
                s.config.padded_vocab_size = s.config.vocab_size;
            },
        },
        Rung {
            name: "+ f16 mixed precision",
            apply: |s| s.precision = Precision::F16,
        },
        Rung {
            name: "+ kernel fusion",
            apply: |s| s.fused = true,
        },
        Rung {
            name: "+ flash attention",
            apply: |s| s.attention = AttentionKind::Flash,
        },
        Rung {
            name: "+ vocab padded to 50304",
            apply: |s| s.config.padded_vocab_size = pad_vocab(s.config.vocab_size),
        },
        Rung {
            name: "+ fused optimiser",
            apply: |s| s.fused_optimizer = true,
        },
    ];
    let steps = args
        .ladder_steps
        .unwrap_or(if gpu.is_cpu() { 5 } else { 12 })
        .max(3);
    let warmup = 2;
    say!(
        "speed ladder on {} ({:?}): {} | B {} | T {} | {} steps per rung; median step time after {} warm-up steps",
        gpu.info.name,
        gpu.info.backend,
        base.config.describe(),
        base.batch_size,
        base.seq_len,
        steps,
        warmup
    );
    say!(
        "{:<36} {:>10} {:>12} {:>10} {:>8}",
        "rung",
        "dispatches",
        "tok/sec",
        "step ms",
        "speedup"
    );
    let mut s = base;
    s.steps = steps;
    let mut first = None;
    for rung in rungs {
        (rung.apply)(&mut s);
        if s.precision == Precision::F16 && !gpu.has_f16() {
            say!("{:<36} skipped: the adapter has no SHADER_F16", rung.name);
            s.precision = Precision::F32;
            continue;
        }
        let mut t = match Trainer::new(gpu.clone(), s.clone(), tokens.clone(), None) {
            Ok(t) => t,
            Err(e) => {
                say!("{:<36} skipped: {e}", rung.name);
                continue;
            }
        };
        let mut ms = Vec::new();
        t.run_steps(steps, |st, _| {
            if st.step >= warmup {
                ms.push(st.dt_ms);
            }
            Ok(())
        })?;
        ms.sort_by(|a, b| a.total_cmp(b));
        let sm = ms[ms.len() / 2];
        let tp = s.tokens_per_step() as f64 / (sm * 1e-3);
        let base_tps = *first.get_or_insert(tp);
        say!(
            "{:<36} {:>10} {:>12.1} {:>10.2} {:>7.2}x",
            rung.name,
            t.graph().dispatch_count(),
            tp,
            sm,
            tp / base_tps
        );
    }
    Ok(())
}

fn run(args: Args, matches: &ArgMatches, job: &Job) -> Result<()> {
    let data = args.data.clone().unwrap_or_else(default_data);
    let tokens = Corpus::open(&data)?;
    say!("loaded {} tokens", tokens.train_tokens());
    if let Some(line) = tokens.describe_shards() {
        say!("{line}");
    }

    let adapter = match (args.adapter, job.ranks()) {
        (Some(i), _) => AdapterChoice::Index(i),
        (None, 1) => AdapterChoice::Best,
        (None, _) => AdapterChoice::LocalRank(job.local_rank),
    };
    let gpu = Arc::new(Gpu::new(&GpuOptions {
        adapter,
        ..GpuOptions::default()
    })?);
    say!("{}", gpu.summary());

    // What to start from: a resumed run, imported weights, or a fresh init.
    let mut resumed_from = None;
    let resumed: Option<Checkpoint> = match &args.resume {
        Some(dir) => {
            let (path, c) = checkpoint::load_newest(dir)?;
            say!("resuming from {}", path.display());
            resumed_from = Some(path);
            Some(c)
        }
        None => None,
    };
    let init: Option<Checkpoint> = match (&resumed, &args.init_from) {
        (None, Some(p)) => {
            let c = hf::load_any(p)?;
            say!("initialised from {}", p.display());
            Some(c)
        }
        _ => None,
    };

    let requested = {
        let defaults = AdapterDefaults::for_gpu(&gpu);
        let preset_name = match &args.preset {
            Some(p) => p.clone(),
            None => {
                if defaults.cpu {
                    say!(
                        "preset: {} (the adapter '{}' is a CPU rasteriser; pass --preset gpt2 to override)",
                        defaults.preset, gpu.info.name
                    );
                }
                defaults.preset.into()
            }
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
        let (b0, t0) = defaults.batch_shape(&preset_name, config.block_size);
        let b = args.batch_size.unwrap_or(b0);
        let t = args.seq_len.unwrap_or(t0);
        let mut s = TrainSettings::new(config, b, t);
        s.steps = args.steps;
        s.max_lr = args.max_lr;
        s.min_lr_ratio = args.min_lr_ratio;
        s.warmup_steps = args.warmup_steps;
        s.weight_decay = args.weight_decay;
        s.grad_clip = args.grad_clip;
        s.seed = args.seed;
        s.grad_accum = args.grad_accum;
        s.ranks = job.ranks();
        s.attention = args.attention;
        s.fused = !args.no_fusion;
        s.fused_optimizer = !args.no_fused_optimizer;
        s.shuffle = args.shuffle;
        s.precision = args.precision.unwrap_or(defaults.precision);
        s
    };
    // A resumed run keeps its settings; flags given that differ are refused.
    let resuming = resumed_from.as_deref().zip(resumed.as_ref());
    let settings = run::settings_for_resume(requested, resuming, |s| given(matches, s))?;
    settings.validate()?;
    if settings.precision == Precision::F16 && !gpu.has_f16() {
        return Err(Error::Config(format!(
            "--precision f16 needs SHADER_F16, which the adapter '{}' lacks; use --precision f32",
            gpu.info.name
        )));
    }
    say!(
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
    if settings.ranks > 1 {
        say!(
            "data parallel: {} ranks x B {} x T {} x grad accum {} = {} tokens per step",
            settings.ranks,
            settings.batch_size,
            settings.seq_len,
            settings.grad_accum,
            settings.tokens_per_step()
        );
    }

    // The memory plan, before anything is allocated: refuses a run that cannot fit.
    let plan = MemoryPlan::layout(&settings, &AdapterLimits::of(&gpu))?;
    say!("{}", plan.line());
    say!(
        "{}",
        plan.classifier_line(settings.config.padded_vocab_size)
    );
    if args.dry_run {
        print!("{}", plan.details());
    }
    plan.check_memory(&settings)?;
    if args.dry_run {
        say!("the run fits the adapter");
        return Ok(());
    }
    if args.bench_ladder {
        if settings.ranks > 1 {
            return Err(Error::Config(
                "--bench-ladder runs in one process; start it without mpirun".into(),
            ));
        }
        return bench_ladder(&args, gpu, tokens, settings);
    }
    let checkpoint_dir = args.checkpoint_dir.clone().or(args.resume.clone());
    let weights = resumed.as_ref().or(init.as_ref());
    let mut trainer = match &job.collective {
        Some(c) => Trainer::data_parallel(
            gpu.clone(),
            settings.clone(),
            tokens.clone(),
            weights,
            c.clone(),
            bucket_bytes(args.bucket_mb)?,
        )?,
        None => Trainer::new(gpu.clone(), settings.clone(), tokens.clone(), weights)?,
    };
    if let Err(e) = gpu.save_pipeline_cache() {
        eprintln!("warning: the pipeline cache was not saved ({e}); the next start compiles anew");
    }
    let ((dt, dp), (nt, np)) = trainer.layout().counts();
    say!("num decayed parameter tensors: {dt}, with {dp} parameters");
    say!("num non-decayed parameter tensors: {nt}, with {np} parameters");

    // Rank 0 alone writes the metrics.
    let mut metrics = match args.metrics.as_ref().filter(|_| job.rank() == 0) {
        Some(p) => Some(Metrics {
            path: p.clone(),
            file: std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| Error::io(p, e))?,
            ),
        }),
        None => None,
    };

    if args.profile {
        trainer.enable_profiling()?;
    }
    let opts = RunOptions {
        checkpoint_dir,
        checkpoint_every: args.checkpoint_every,
        keep_last: args.keep_last,
        stop_after: args.stop_after,
        val_every: args.val_every,
        val_steps: args.val_steps,
        sample_every: args.sample_every,
        hellaswag: args.hellaswag.clone(),
        eval_every: args.eval_every,
        ..RunOptions::default()
    };
    let mut run = Run::new(trainer, &tokens, opts, resumed_from)?;
    let mut profile = ProfileTotals::default();
    let first_step = run.steps().0;
    let mut on = |e: RunEvent| -> Result<()> {
        match e {
            RunEvent::Step { stats: s, nodes } => {
                // The first step compiles pipelines and warms caches: leave it out.
                if args.profile && s.step > first_step {
                    profile.add(s, nodes);
                }
                if s.skipped {
                    say!(
                        "{} | skipped: non-finite gradients, loss scale now {}",
                        step_line(s),
                        s.loss_scale
                    );
                } else {
                    say!("{}", step_line(s));
                }
                if let Some(m) = metrics.as_mut() {
                    let mut row = serde_json::json!({
                        "step": s.step, "loss": s.loss, "lr": s.lr, "norm": s.norm, "dt_ms": s.dt_ms,
                        "tok_per_sec": s.tok_per_sec, "skipped": s.skipped, "loss_scale": s.loss_scale,
                        "encode_ms": s.encode_ms, "submit_ms": s.submit_ms,
                    });
                    if let Some(r) = s.reduce {
                        row["all_reduce_ms"] = r.all_reduce_ms.into();
                    }
                    m.write(row)?;
                }
            }
            RunEvent::Validation { step, loss } => {
                say!("step {step:4} | val loss: {loss:.6}");
                if let Some(m) = metrics.as_mut() {
                    m.write(serde_json::json!({ "step": step, "val_loss": loss }))?;
                }
            }
            RunEvent::HellaSwag { step, score } => {
                say!(
                    "step {step:4} | hellaswag acc_norm: {}/{} = {:.4}",
                    score.correct,
                    score.total,
                    score.acc_norm()
                );
                if let Some(m) = metrics.as_mut() {
                    m.write(serde_json::json!({
                        "step": step, "hellaswag_acc_norm": score.acc_norm(),
                        "hellaswag_correct": score.correct, "hellaswag_total": score.total,
                    }))?;
                }
            }
            RunEvent::Samples { step, texts } => {
                for (i, t) in texts.iter().enumerate() {
                    say!("step {step:4} | sample {i}: {t:?}");
                }
            }
            RunEvent::Saved { path } => say!("saved {}", path.display()),
            RunEvent::Replicas {
                step,
                ranks,
                checksum,
            } => {
                say!("step {step:4} | weights identical on {ranks} ranks: checksum {checksum:016x}")
            }
        }
        Ok(())
    };
    while run.advance(usize::MAX, &mut on)? == Progress::Running {}
    let trainer = run.into_trainer();
    if job.rank() != 0 {
        return Ok(());
    }
    if let Some(dir) = &args.export_hf {
        hf::export(dir, &settings.config, &trainer.params()?)?;
        say!("exported Hugging Face GPT-2 to {}", dir.display());
    }
    if args.profile {
        let flops = trainer.graph().flops();
        let dispatches = trainer.graph().dispatch_count();
        drop(trainer);
        let unfused = {
            let mut u = settings.clone();
            u.fused = false;
            u.fused_optimizer = false;
            u.grad_accum = 1;
            u.ranks = 1;
            let mut one = settings.clone();
            one.grad_accum = 1;
            one.ranks = 1;
            let per_micro = |s: &TrainSettings| -> Result<usize> {
                let t = Trainer::new(gpu.clone(), s.clone(), tokens.clone(), None)?;
                Ok(t.graph().dispatch_count())
            };
            (per_micro(&one)?, per_micro(&u)?)
        };
        profile.print(
            &gpu,
            flops,
            dispatches,
            unfused,
            (args.peak_tflops, args.peak_gbps),
        );
    }
    Ok(())
}

/// `--bucket-mb` in bytes (at least one float).
fn bucket_bytes(mb: f64) -> Result<usize> {
    if !(mb > 0.0 && mb.is_finite()) {
        return Err(Error::Config(format!(
            "--bucket-mb must be a positive number of megabytes (got {mb})"
        )));
    }
    Ok(((mb * (1 << 20) as f64) as usize).max(4))
}

/// The metrics file: one JSON object per line, flushed as written.
struct Metrics {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Metrics {
    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}").map_err(|e| Error::io(&self.path, e))?;
        self.file.flush().map_err(|e| Error::io(&self.path, e))
    }
}

/// Whether the user gave `setting` on the command line (a resumed run refuses those that
/// differ from its checkpoint's).
fn given(m: &ArgMatches, setting: Setting) -> bool {
    let ids: &[&str] = match setting {
        Setting::Model => &[
            "preset",
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "vocab_size",
            "padded_vocab_size",
        ],
        Setting::BatchSize => &["batch_size"],
        Setting::SeqLen => &["seq_len"],
        Setting::GradAccum => &["grad_accum"],
        Setting::Steps => &["steps"],
        Setting::MaxLr => &["max_lr"],
        Setting::MinLrRatio => &["min_lr_ratio"],
        Setting::WarmupSteps => &["warmup_steps"],
        Setting::WeightDecay => &["weight_decay"],
        Setting::GradClip => &["grad_clip"],
        Setting::Seed => &["seed"],
        Setting::Precision => &["precision"],
        Setting::Attention => &["attention"],
        Setting::Shuffle => &["shuffle"],
        Setting::Fusion => &["no_fusion"],
        Setting::FusedOptimizer => &["no_fused_optimizer"],
        _ => &[],
    };
    ids.iter()
        .any(|id| m.value_source(id) == Some(ValueSource::CommandLine))
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
