//! Host time of a training step: writing the batch and recording the step's dispatches, with
//! the device idle (each step waited for before the next is prepared), so that nothing but the
//! recording runs on the CPU. GPT-2's shape at a small batch (B=1, T=16 by default), f16, the
//! default graph; prints the median over the steps after the first.
//!
//!     cargo run --release --example host_time -- [PRESET] [STEPS] [N_EMBD N_HEAD]
//!
//! `WGPT_RECORDING_THREADS` sets how many threads record a step (see
//! `wgpt::graph::recording_threads`). N_EMBD and N_HEAD shrink the model's width (not its
//! depth or its dispatches) so that a step finishes quickly on a CPU adapter.

use std::process::ExitCode;
use std::sync::Arc;
use wgpt::model::GptConfig;
use wgpt::train::settings::TrainSettings;
use wgpt::train::trainer::Trainer;
use wgpt::{Gpu, GpuOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let run = || -> wgpt::Result<()> {
        let preset = args.first().map_or("gpt2", String::as_str);
        let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(12);
        let mut config = GptConfig::preset(preset)?;
        if let (Some(c), Some(h)) = (args.get(2), args.get(3)) {
            config.n_embd = c.parse().map_err(|_| wgpt::Error::Other("N_EMBD".into()))?;
            config.n_head = h.parse().map_err(|_| wgpt::Error::Other("N_HEAD".into()))?;
        }
        let gpu = Arc::new(Gpu::new(&GpuOptions::default())?);
        let settings = TrainSettings::new(config, 1, 16);
        let tokens: Vec<u32> = (0..4096u32).map(|i| (i * 7919) % 50257).collect();
        let mut trainer = Trainer::new(gpu.clone(), settings, Arc::new(tokens), None)?;
        let mut ms = Vec::new();
        for _ in 0..steps.max(2) {
            ms.push(trainer.step()?.encode_ms);
        }
        ms.remove(0);
        ms.sort_by(f64::total_cmp);
        println!(
            "{preset} ({} dispatches), B=1 T=16, '{}', recording threads {}: host time to write \
             the batch and record a step, median of {} steps {:.3} ms (min {:.3}, max {:.3})",
            trainer.graph().dispatch_count(),
            gpu.info.name,
            wgpt::graph::recording_threads(&gpu),
            ms.len(),
            ms[ms.len() / 2],
            ms[0],
            ms[ms.len() - 1]
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
