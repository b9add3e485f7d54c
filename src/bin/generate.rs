//! Samples text from a GPT-2: Hugging Face weights or one of our checkpoints.
//!
//! `cargo run --release --bin generate -- --init-from PATH --prompt TEXT`; see `--help`.

use clap::Parser;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use wgpt::checkpoint::hf;
use wgpt::data::Tokenizer;
use wgpt::error::Result;
use wgpt::gpu::{Gpu, GpuOptions};
use wgpt::sample::{Generator, SampleOptions};

/// Tokens in total (prompt included) when --max-new-tokens is not given, as in the reference
/// sampling of GPT-2 (124M).
const DEFAULT_TOTAL_TOKENS: usize = 30;

#[derive(Parser, Debug)]
#[command(
    name = "generate",
    about = "Sample text from GPT-2 on WGSL compute shaders",
    version
)]
struct Args {
    /// A Hugging Face GPT-2 folder (model.safetensors + config.json), that file, a checkpoint
    /// file, or a checkpoint folder (its newest checkpoint).
    #[arg(long = "init-from")]
    init_from: PathBuf,
    #[arg(long, default_value = "Hello, I'm a language model,")]
    prompt: String,
    /// New tokens per sample (default: up to 30 tokens in total, prompt included).
    #[arg(long = "max-new-tokens")]
    max_new_tokens: Option<usize>,
    #[arg(long = "num-samples", default_value_t = 5)]
    num_samples: usize,
    /// Keep the k most likely tokens (1: greedy decoding).
    #[arg(long = "top-k", default_value_t = 50)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_hyphen_values = true)]
    temperature: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print each token as it is produced (sample 0 only) before the final lines.
    #[arg(long)]
    stream: bool,
}

fn run(args: Args) -> Result<()> {
    if args.num_samples == 0 {
        return Err(wgpt::Error::Config(
            "--num-samples must be at least 1".into(),
        ));
    }
    if args.top_k == 0 {
        return Err(wgpt::Error::Config(
            "--top-k must be at least 1 (1 is greedy decoding)".into(),
        ));
    }
    if !(args.temperature > 0.0 && args.temperature.is_finite()) {
        return Err(wgpt::Error::Config(format!(
            "--temperature must be a positive number (got {}); use --top-k 1 for greedy decoding",
            args.temperature
        )));
    }
    let checkpoint = hf::load_any(&args.init_from)?;
    let gpu = Arc::new(Gpu::new(&GpuOptions::default())?);
    eprintln!("{}", gpu.summary());
    eprintln!("model: {}", checkpoint.config.describe());
    let tok = Tokenizer::gpt2();
    let prompt = tok.encode(&args.prompt);
    let max_new = args
        .max_new_tokens
        .unwrap_or_else(|| DEFAULT_TOTAL_TOKENS.saturating_sub(prompt.len()).max(1));
    let mut generator = Generator::from_checkpoint(gpu, &checkpoint, args.num_samples)?;
    eprintln!("weights: {}", generator.storage().describe());
    generator.check_fits(prompt.len(), max_new)?;
    let opts = SampleOptions {
        max_new_tokens: max_new,
        top_k: args.top_k,
        temperature: args.temperature,
        seed: args.seed,
    };
    let start = Instant::now();
    let mut first = None;
    let mut pending: Vec<u32> = Vec::new();
    let seqs = generator.generate(&prompt, &opts, |sample, token| {
        first.get_or_insert_with(Instant::now);
        if args.stream && sample == 0 {
            // Print whole characters only: a token may end in the middle of one.
            pending.push(token);
            let bytes = tok.decode_bytes(&pending);
            if let Ok(text) = std::str::from_utf8(&bytes) {
                eprint!("{text}");
                let _ = std::io::stderr().flush();
                pending.clear();
            }
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    if args.stream {
        eprintln!();
    }
    for s in &seqs {
        println!("> {}", tok.decode(s));
    }
    let per_sample = (prompt.len() + max_new) as f64 / secs;
    eprintln!(
        "{} samples x {} new tokens in {:.2}s ({} positions each incl. prompt): {:.1} tokens/s per sample, {:.1} tokens/s in total",
        args.num_samples,
        max_new,
        secs,
        prompt.len() + max_new,
        per_sample,
        per_sample * args.num_samples as f64
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
