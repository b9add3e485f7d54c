//! The speed ladder (headless-train's `--bench-ladder`): the same short run with each speed-up
//! switched on in turn (f32 with naive attention and the vocabulary unpadded; f16; fusion; flash
//! attention; the vocabulary padded; the fused optimiser), one table row per rung.

use super::settings::{AttentionKind, Precision, TrainSettings};
use super::trainer::Trainer;
use crate::data::Corpus;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::config::pad_vocab;
use std::sync::Arc;

/// One rung of the ladder: a switch turned on over the previous rung.
struct Rung {
    name: &'static str,
    apply: fn(&mut TrainSettings),
}

const RUNGS: [Rung; 6] = [
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

/// Steps each rung runs before its steps are timed.
const WARMUP: usize = 2;

/// Climbs the ladder from `base` (its model, B and T), `steps` steps per rung (default 12 on a
/// GPU, 5 on a CPU adapter; at least 3), passing each line of the table to `report`. A rung the
/// adapter cannot run is reported as skipped.
pub fn climb(
    gpu: &Arc<Gpu>,
    corpus: &Corpus,
    base: TrainSettings,
    steps: Option<usize>,
    report: &mut dyn FnMut(String),
) -> Result<()> {
    if base.ranks > 1 {
        return Err(Error::Config(
            "--bench-ladder runs in one process; start it without mpirun".into(),
        ));
    }
    let steps = steps.unwrap_or(if gpu.is_cpu() { 5 } else { 12 }).max(3);
    report(format!(
        "speed ladder on {} ({:?}): {} | B {} | T {} | {} steps per rung; median step time after {} warm-up steps",
        gpu.info.name,
        gpu.info.backend,
        base.config.describe(),
        base.batch_size,
        base.seq_len,
        steps,
        WARMUP
    ));
    report(format!(
        "{:<36} {:>10} {:>12} {:>10} {:>8}",
        "rung", "dispatches", "tok/sec", "step ms", "speedup"
    ));
    let mut s = base;
    s.steps = steps;
    let mut first = None;
    for rung in RUNGS {
        (rung.apply)(&mut s);
        if s.precision.check_adapter(gpu).is_err() {
            report(format!(
                "{:<36} skipped: the adapter has no SHADER_F16",
                rung.name
            ));
            s.precision = Precision::F32;
            continue;
        }
        let mut t = match Trainer::new(gpu.clone(), s.clone(), corpus.clone(), None) {
            Ok(t) => t,
            Err(e) => {
                report(format!("{:<36} skipped: {e}", rung.name));
                continue;
            }
        };
        let mut ms = Vec::new();
        t.run_steps(steps, |st, _| {
            if st.step >= WARMUP {
                ms.push(st.dt_ms);
            }
            Ok(())
        })?;
        ms.sort_by(|a, b| a.total_cmp(b));
        let median = ms[ms.len() / 2];
        let tokens_per_sec = s.tokens_per_step() as f64 / (median * 1e-3);
        let base_tps = *first.get_or_insert(tokens_per_sec);
        report(format!(
            "{:<36} {:>10} {:>12.1} {:>10.2} {:>7.2}x",
            rung.name,
            t.graph().dispatch_count(),
            tokens_per_sec,
            median,
            tokens_per_sec / base_tps
        ));
    }
    Ok(())
}
