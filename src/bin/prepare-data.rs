//! Tokenises text into GPT-2 token shards for `headless-train --data DIR`.
//!
//! `cargo run --release --bin prepare-data -- INPUT... --out DIR [--shard-tokens N]`

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use wgpt::data::prepare::{prepare, PrepareOptions, DEFAULT_SHARD_TOKENS};

#[derive(Parser, Debug)]
#[command(
    name = "prepare-data",
    about = "Tokenise text files, folders of them, or JSON lines into GPT-2 token shards \
             (the first shard is the validation split)",
    version
)]
struct Args {
    /// Text files, folders of them (read recursively, in path order), or JSON-lines files
    /// (.jsonl, .json, .ndjson) with one document per line.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Folder to write the shards into (val_000000.bin, train_000001.bin, ...).
    #[arg(long)]
    out: PathBuf,
    /// Tokens per shard.
    #[arg(long = "shard-tokens", default_value_t = DEFAULT_SHARD_TOKENS)]
    shard_tokens: usize,
    /// The field of a JSON-lines record that holds the text.
    #[arg(long = "text-field", default_value = "text")]
    text_field: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut opts = PrepareOptions::new(&args.out);
    opts.shard_tokens = args.shard_tokens;
    opts.text_field = args.text_field;
    opts.progress = true;
    match prepare(&args.inputs, &opts) {
        Ok(r) => {
            println!(
                "wrote {} shards to {}: {} tokens ({} validation, {} training) from {} documents, {:.1} MB of input",
                r.shards.len(),
                args.out.display(),
                r.tokens,
                r.val_tokens,
                r.tokens - r.val_tokens,
                r.documents,
                r.bytes as f64 / 1e6
            );
            println!(
                "took {:.2} s: {:.0} tokens/s on {} threads",
                r.seconds,
                r.tokens_per_second(),
                rayon::current_num_threads()
            );
            if r.shards.len() < 2 {
                eprintln!(
                    "warning: everything fitted in the validation shard, so there is nothing to train on; run again with --shard-tokens below {}",
                    r.tokens / 2
                );
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
