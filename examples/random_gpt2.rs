//! Writes seeded GPT-2 weights of a preset's shape as a Hugging Face folder (`model.safetensors`
//! and `config.json`): GPT-2's initialisation, for trying `generate` or `--init-from` at the
//! real sizes without downloading anything.
//!
//!     cargo run --release --example random_gpt2 -- gpt2-large /tmp/gpt2-large [seed]

use std::path::PathBuf;
use std::process::ExitCode;
use wgpt::checkpoint::hf;
use wgpt::model::init::init_params;
use wgpt::model::{GptConfig, ParamLayout};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(preset), Some(dir)) = (args.first(), args.get(1)) else {
        eprintln!(
            "usage: random_gpt2 PRESET DIR [SEED]  (presets: {})",
            GptConfig::PRESETS.join(", ")
        );
        return ExitCode::FAILURE;
    };
    let seed = match args.get(2).map(|s| s.parse::<u64>()) {
        None => 1337,
        Some(Ok(s)) => s,
        Some(Err(_)) => {
            eprintln!("error: the seed must be a whole number");
            return ExitCode::FAILURE;
        }
    };
    let run = || -> wgpt::Result<()> {
        let config = GptConfig::preset(preset)?;
        let layout = ParamLayout::new(&config);
        let params = init_params(&config, &layout, seed);
        hf::export(&PathBuf::from(dir), &config, &params)?;
        println!(
            "wrote {} ({} parameters, seed {seed}) to {dir}",
            config.describe(),
            layout.num_params()
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
