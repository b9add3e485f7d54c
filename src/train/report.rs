//! The profile of a run (headless-train's `--profile`): each op family's share of a step against
//! its roofline bound, the slowest nodes, the host's time per step, the dispatches and the model
//! FLOPs utilisation, from the GPU's timestamps of every node.

use super::run::RunEvent;
use super::settings::TrainSettings;
use super::trainer::{Trainer, PIPELINE_DEPTH};
use crate::data::Corpus;
use crate::error::Result;
use crate::gpu::profile::{by_family, known_peaks, FamilyTime, NodeTime};
use std::fmt::{self, Display, Formatter};

/// Node times summed over the profiled steps, with the host and idle times of every step.
#[derive(Clone, Debug, Default)]
pub struct ProfileTotals {
    first_step: usize,
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
    /// Totals of the steps after `first_step` (the first compiles pipelines and warms caches).
    pub fn after(first_step: usize) -> ProfileTotals {
        ProfileTotals {
            first_step,
            ..ProfileTotals::default()
        }
    }

    /// Adds a step's times; other events are left out.
    pub fn record(&mut self, e: &RunEvent) {
        let RunEvent::Step { stats: s, nodes } = e else {
            return;
        };
        if s.step <= self.first_step {
            return;
        }
        self.steps += 1;
        self.step_ms += s.dt_ms;
        self.encode_ms += s.encode_ms;
        self.submit_ms += s.submit_ms;
        if let Some(idle) = s.gpu_idle_ms {
            self.idle_ms += idle;
            self.idle_steps += 1;
        }
        self.nodes.extend_from_slice(nodes);
        if let Some(r) = s.reduce {
            self.all_reduce_ms += r.all_reduce_ms;
            self.transfer_ms += r.transfer_ms;
            self.reduce_bytes = r.bytes;
            self.buckets = r.buckets;
        }
    }
}

/// An adapter's peak FLOP/s and memory bandwidth (B/s), for the utilisation and the roofline
/// bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Peaks {
    pub flops: Option<f64>,
    pub bytes: Option<f64>,
}

impl Peaks {
    /// `tflops` TFLOP/s and `gbps` GB/s where given, else what is known of the adapter
    /// ([`known_peaks`]).
    pub fn of(adapter: &str, tflops: Option<f64>, gbps: Option<f64>) -> Peaks {
        let known = known_peaks(adapter);
        Peaks {
            flops: tflops.map(|t| t * 1e12).or(known.map(|k| k.0)),
            bytes: gbps.map(|g| g * 1e9).or(known.map(|k| k.1)),
        }
    }
}

/// The profile of a run; its `Display` is the report headless-train prints.
#[derive(Clone, Debug)]
pub struct ProfileReport {
    pub totals: ProfileTotals,
    pub adapter: String,
    pub peaks: Peaks,
    /// Model FLOPs per step.
    pub flops: f64,
    /// Dispatches per step.
    pub dispatches: usize,
    /// Dispatches per micro-step, with the run's fusion and with none.
    pub per_micro_step: (usize, usize),
}

impl ProfileReport {
    /// The report on `totals` from `trainer`'s run. The trainer is dropped: the dispatches of
    /// one micro-step with and without fusion are counted on two more, built on `corpus`.
    pub fn new(
        totals: ProfileTotals,
        trainer: Trainer,
        corpus: &Corpus,
        peaks: Peaks,
    ) -> Result<ProfileReport> {
        let gpu = trainer.gpu().clone();
        let settings = trainer.settings().clone();
        let flops = trainer.graph().flops();
        let dispatches = trainer.graph().dispatch_count();
        drop(trainer);
        let per_micro_step = if totals.steps > 0 {
            let per_micro = |fused: bool| -> Result<usize> {
                let s = TrainSettings {
                    grad_accum: 1,
                    ranks: 1,
                    fused: fused && settings.fused,
                    fused_optimizer: fused && settings.fused_optimizer,
                    ..settings.clone()
                };
                let t = Trainer::new(gpu.clone(), s, corpus.clone(), None)?;
                Ok(t.graph().dispatch_count())
            };
            (per_micro(true)?, per_micro(false)?)
        } else {
            (0, 0)
        };
        Ok(ProfileReport {
            adapter: gpu.info.name.clone(),
            totals,
            peaks,
            flops,
            dispatches,
            per_micro_step,
        })
    }
}

impl Display for ProfileReport {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        if t.steps == 0 {
            return write!(f, "profile: run at least 2 steps (the first is warm-up)");
        }
        let n = t.steps as f64;
        let per_step = |x: f64| x / n;
        let gpu_ms = per_step(t.nodes.iter().map(|t| t.ms).sum::<f64>());
        let step_ms = per_step(t.step_ms);
        writeln!(
            f,
            "profile over {} steps on {} (GPU time from timestamps; step time is wall clock)",
            t.steps, self.adapter
        )?;
        let roofline = self.peaks.flops.zip(self.peaks.bytes);
        match roofline {
            Some((pf, pb)) => writeln!(
                f,
                "roofline: {:.0} TFLOP/s, {:.0} GB/s; bound = max(FLOPs / peak, bytes bound / bandwidth)",
                pf / 1e12,
                pb / 1e9
            )?,
            None => writeln!(
                f,
                "roofline: pass --peak-tflops and --peak-gbps for the bound per family"
            )?,
        }
        writeln!(
            f,
            "{:<14} {:>10} {:>7} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "op family", "ms/step", "share", "GFLOP", "MB", "GFLOP/s", "bound ms", "x bound"
        )?;
        for family in by_family(&t.nodes) {
            let ms = per_step(family.ms);
            let one = FamilyTime {
                flops: per_step(family.flops),
                bytes: per_step(family.bytes),
                ..family
            };
            let rate = if one.flops > 0.0 && ms > 0.0 {
                format!("{:.1}", one.flops / (ms * 1e-3) / 1e9)
            } else {
                "-".into()
            };
            let (bound, ratio) = match roofline {
                Some((pf, pb)) => {
                    let b = one.roofline_ms(pf, pb);
                    (format!("{b:.3}"), format!("{:.1}", ms / b.max(1e-12)))
                }
                None => ("-".into(), "-".into()),
            };
            writeln!(
                f,
                "{:<14} {:>10.3} {:>6.1}% {:>10.2} {:>10.1} {:>10} {:>10} {:>8}",
                one.family,
                ms,
                100.0 * ms / gpu_ms.max(1e-9),
                one.flops / 1e9,
                one.bytes / 1e6,
                rate,
                bound,
                ratio
            )?;
        }
        let mut per_node: Vec<(&str, f64)> = Vec::new();
        for node in &t.nodes {
            match per_node.iter_mut().find(|(l, _)| *l == node.label) {
                Some(e) => e.1 += node.ms / n,
                None => per_node.push((&node.label, node.ms / n)),
            }
        }
        per_node.sort_by(|a, b| b.1.total_cmp(&a.1));
        writeln!(f, "slowest nodes (ms per step):")?;
        for (label, ms) in per_node.iter().take(8) {
            writeln!(f, "  {label:<40} {ms:>9.3}")?;
        }
        writeln!(
            f,
            "GPU time per step {gpu_ms:.2} ms of {step_ms:.2} ms wall clock"
        )?;
        let idle = if t.idle_steps > 0 {
            format!("{:.3} ms", t.idle_ms / t.idle_steps as f64)
        } else {
            "-".into()
        };
        let (encode, submit) = (per_step(t.encode_ms), per_step(t.submit_ms));
        if t.reduce_bytes > 0 {
            writeln!(
                f,
                "host per step: {encode:.3} ms to write the batch, encode, wait for the backward and exchange the gradients, {submit:.3} ms in queue.submit; GPU idle between steps {idle} (data parallel: one step at a time)"
            )?;
        } else {
            writeln!(
                f,
                "host per step: {encode:.3} ms to write the batch and encode, {submit:.3} ms in queue.submit; GPU idle between steps {idle} (steps queued {PIPELINE_DEPTH} deep)"
            )?;
        }
        let (fused, unfused) = self.per_micro_step;
        writeln!(
            f,
            "dispatches per step: {} ({fused} per micro-step fused, {unfused} unfused)",
            self.dispatches
        )?;
        if t.reduce_bytes > 0 {
            let ms = per_step(t.all_reduce_ms);
            let mb = t.reduce_bytes as f64 / 1e6;
            writeln!(
                f,
                "all-reduce per step: {ms:.3} ms for {mb:.3} MB of gradients in {} bucket(s) ({:.1} MB/s); {:.3} ms more on the host to copy them out of the read-back and queue the sums' upload",
                t.buckets,
                mb / (ms * 1e-3).max(1e-12),
                per_step(t.transfer_ms)
            )?;
        }
        let achieved = self.flops / (step_ms * 1e-3);
        match self.peaks.flops {
            Some(p) => write!(
                f,
                "model FLOPs per step {:.3e}: {:.2} TFLOP/s achieved, MFU {:.1}% of {:.0} TFLOP/s",
                self.flops,
                achieved / 1e12,
                100.0 * achieved / p,
                p / 1e12
            ),
            None => write!(
                f,
                "model FLOPs per step {:.3e}: {:.3} TFLOP/s achieved (pass --peak-tflops for MFU)",
                self.flops,
                achieved / 1e12
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::trainer::StepStats;

    fn step(step: usize) -> StepStats {
        StepStats {
            step,
            loss: 3.0,
            norm: 1.0,
            lr: 1e-4,
            dt_ms: 10.0,
            tok_per_sec: 1.0,
            skipped: false,
            loss_scale: 1.0,
            encode_ms: 0.5,
            submit_ms: 0.25,
            gpu_ms: None,
            gpu_idle_ms: Some(0.125),
            reduce: None,
        }
    }

    #[test]
    fn the_report_gives_each_family_per_step_against_its_roofline_and_the_mfu() {
        let node = |label: &str, family, flops, bytes, ms| NodeTime {
            label: label.into(),
            family,
            flops,
            bytes,
            ms,
        };
        let nodes = [
            node("lm_head.forward", "matmul", 2e9, 1e6, 8.0),
            node("adamw", "optimizer", 0.0, 4e6, 2.0),
        ];
        // Steps 1 and 2 count; step 0, the warm-up, does not.
        let mut totals = ProfileTotals::after(0);
        for s in 0..3 {
            totals.record(&RunEvent::Step {
                stats: &step(s),
                nodes: &nodes,
            });
        }
        let report = ProfileReport {
            totals,
            adapter: "test adapter".into(),
            peaks: Peaks::of("test adapter", Some(1.0), Some(100.0)),
            flops: 2e9,
            dispatches: 12,
            per_micro_step: (12, 20),
        };
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("profile over 2 steps on test adapter"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("roofline: 1 TFLOP/s, 100 GB/s"),
            "{text}"
        );
        // 8 ms of a 10 ms step at 250 GFLOP/s, bound by 2 GFLOP at 1 TFLOP/s: 2 ms.
        let matmul: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(
            matmul,
            ["matmul", "8.000", "80.0%", "2.00", "1.0", "250.0", "2.000", "4.0"]
        );
        assert!(text.contains("  lm_head.forward"), "{text}");
        assert!(text.contains("host per step: 0.500 ms to write the batch and encode, 0.250 ms in queue.submit; GPU idle between steps 0.125 ms"), "{text}");
        assert!(text.contains("dispatches per step: 12 (12 per micro-step fused, 20 unfused)"));
        assert!(
            text.ends_with("0.20 TFLOP/s achieved, MFU 20.0% of 1 TFLOP/s"),
            "{text}"
        );
    }

    #[test]
    fn a_run_without_a_step_after_its_first_says_so() {
        let mut totals = ProfileTotals::after(4);
        totals.record(&RunEvent::Step {
            stats: &step(4),
            nodes: &[],
        });
        let report = ProfileReport {
            totals,
            adapter: "test adapter".into(),
            peaks: Peaks::default(),
            flops: 1.0,
            dispatches: 1,
            per_micro_step: (0, 0),
        };
        assert_eq!(
            report.to_string(),
            "profile: run at least 2 steps (the first is warm-up)"
        );
    }
}
