//! The memory plan of a training run, computed from its settings and an adapter's limits
//! without a device: where the parameters are stored, how many rows of logits one classifier
//! chunk holds, every buffer with its size, and the total. A run that cannot fit is refused here,
//! before anything is allocated, with what it needs, what the adapter offers and what to change.

use super::settings::{AttentionKind, Precision, TrainSettings, ADAM_BETAS};
use crate::error::{Error, Result};
use crate::gpu::{AdapterLimits, DType};
use crate::graph::gpt::{classifier_chunks, train_graph};
use crate::graph::step::StepShape;
use crate::graph::ActivationPlan;
use crate::model::StorageLayout;
use crate::ops::embedding;
use std::sync::Arc;

/// The shape of the step `settings` describe, as the graph builder takes it.
pub fn step_shape(settings: &TrainSettings) -> StepShape {
    StepShape {
        batch: settings.batch_size,
        seq: settings.seq_len,
        grad_accum: settings.grad_accum,
        tokens_per_step: settings.tokens_per_step(),
        precision: settings.precision,
        attention: settings.attention,
        fused: settings.fused,
        fused_optimizer: settings.fused_optimizer,
        adam_betas: ADAM_BETAS,
    }
}

/// Every buffer of a training run and its size.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    /// Where the parameters (and their copies, gradients and moments) are stored.
    pub storage: Arc<StorageLayout>,
    /// Rows of logits per classifier chunk.
    pub chunk_rows: usize,
    /// Classifier chunks per micro-batch.
    pub chunks: usize,
    /// f32 master weights.
    pub params_bytes: u64,
    /// The f16 copy the matmuls read (mixed precision), else 0.
    pub half_bytes: u64,
    pub grads_bytes: u64,
    /// Both AdamW moments.
    pub moments_bytes: u64,
    /// Activations after the planner's sharing, and the step's small inputs.
    pub activations: ActivationPlan,
    pub inputs_bytes: u64,
    /// The logits of one chunk.
    pub classifier_bytes: u64,
    pub limits: AdapterLimits,
}

fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1 << 20) as f64;
    if m < 1.0 {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    } else if m >= 10_240.0 {
        format!("{:.1} GiB", m / 1024.0)
    } else if m >= 10.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

/// Bytes a buffer of `elements` of `dtype` takes (buffers are whole multiples of 256 bytes).
fn buffer_bytes(elements: usize, dtype: DType) -> u64 {
    ((elements * dtype.size()) as u64).div_ceil(256).max(1) * 256
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The smallest number of rows such that a chunk starting at any multiple of it begins at an
/// aligned offset in every row-major tensor the classifier slices: rows of `c` activations of
/// `act` bytes, and the per-row u32 targets and f32 losses.
pub fn chunk_granularity(c: usize, act: usize, alignment: u64) -> usize {
    let align = alignment.max(1);
    let rows_for = |row_bytes: u64| align / gcd(align, row_bytes);
    let (a, b) = (rows_for((c * act) as u64), rows_for(4));
    (a / gcd(a, b) * b) as usize
}

/// Rows of logits per classifier chunk for `n` positions: all of them when `n x vp` logits fit
/// one binding, else the most that do, in whole multiples of [`chunk_granularity`].
pub fn classifier_chunk_rows(
    n: usize,
    vp: usize,
    c: usize,
    act: DType,
    limits: &AdapterLimits,
) -> Result<usize> {
    let row_bytes = (vp * act.size()) as u64;
    let fit = (limits.tensor_bytes() / row_bytes.max(1)) as usize;
    if n <= fit {
        return Ok(n);
    }
    let g = chunk_granularity(c, act.size(), limits.alignment);
    let rows = fit - fit % g;
    if rows == 0 {
        return Err(Error::Limit {
            what: "the classifier's logits".into(),
            needed: format!(
                "{} MiB for a chunk of {g} rows x {vp} vocabulary entries",
                (g as u64 * row_bytes).div_ceil(1 << 20)
            ),
            available: format!("{} MiB per binding", limits.tensor_bytes() >> 20),
            adapter: limits.adapter.clone(),
            hint: "use a smaller vocabulary".into(),
        });
    }
    Ok(rows)
}

impl MemoryPlan {
    /// Plans `settings` on an adapter with `limits`; refuses what cannot fit: a buffer beyond
    /// the limits, or a total beyond the adapter's memory.
    pub fn new(settings: &TrainSettings, limits: &AdapterLimits) -> Result<MemoryPlan> {
        let plan = Self::layout(settings, limits)?;
        plan.check_memory(settings)?;
        Ok(plan)
    }

    /// The plan without the check of the total against the adapter's memory (what `--dry-run`
    /// prints before saying whether it fits); still refuses a buffer beyond the limits.
    pub fn layout(settings: &TrainSettings, limits: &AdapterLimits) -> Result<MemoryPlan> {
        settings.validate()?;
        let cfg = &settings.config;
        if limits.alignment > 256 || !limits.alignment.is_power_of_two() {
            return Err(Error::Limit {
                what: "tensor views".into(),
                needed: "storage offsets aligned to at most 256 bytes".into(),
                available: format!("an alignment of {} bytes", limits.alignment),
                adapter: limits.adapter.clone(),
                hint: "use another adapter".into(),
            });
        }
        let capacity = limits.storage_capacity();
        let storage = StorageLayout::new(cfg, capacity).map_err(|e| match e {
            Error::Config(message) => Error::Limit {
                what: "the parameters".into(),
                needed: message,
                available: format!("{} MiB per binding", limits.tensor_bytes() >> 20),
                adapter: limits.adapter.clone(),
                hint: "use a smaller model".into(),
            },
            other => other,
        })?;
        let act = match settings.precision {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        };
        let n = settings.batch_size * settings.seq_len;
        let vp = cfg.padded_vocab_size;
        let chunk_rows = classifier_chunk_rows(n, vp, cfg.n_embd, act, limits)?;
        let (graph, _) = train_graph(&step_shape(settings), cfg, &storage, chunk_rows)?;
        let activations = graph.plan()?;
        if let Some((name, bytes)) = &activations.largest_tensor {
            if *bytes > limits.tensor_bytes() {
                let hint = if name.contains("attention probs")
                    && settings.attention == AttentionKind::Naive
                {
                    "use --attention flash (it keeps no T x T matrix), or a smaller -B or -T"
                } else {
                    "use a smaller batch (-B) with more --grad-accum, or a smaller -T"
                };
                return Err(Error::Limit {
                    what: format!("the activation '{name}'"),
                    needed: format!("a binding of {} MiB", bytes.div_ceil(1 << 20)),
                    available: format!("{} MiB per binding", limits.tensor_bytes() >> 20),
                    adapter: limits.adapter.clone(),
                    hint: hint.into(),
                });
            }
        }
        let per_buffer = |dtype: DType| -> u64 {
            storage
                .buffers
                .iter()
                .map(|b| buffer_bytes(b.len, dtype))
                .sum()
        };
        let micro = settings.grad_accum as u64;
        let inputs_bytes = micro
            * (2 * buffer_bytes(n, DType::U32)
                + buffer_bytes(embedding::embedding_buckets_len(n), DType::U32))
            + buffer_bytes(n, DType::F32)
            + 5 * 256;
        let plan = MemoryPlan {
            chunk_rows,
            chunks: classifier_chunks(n, chunk_rows).len(),
            params_bytes: per_buffer(DType::F32),
            half_bytes: match settings.precision {
                Precision::F16 => per_buffer(DType::F16),
                Precision::F32 => 0,
            },
            grads_bytes: per_buffer(DType::F32),
            moments_bytes: 2 * per_buffer(DType::F32),
            classifier_bytes: buffer_bytes(chunk_rows * vp, act),
            activations,
            inputs_bytes,
            storage: Arc::new(storage),
            limits: limits.clone(),
        };
        Ok(plan)
    }

    /// Refuses a plan whose total exceeds the adapter's memory (when known), with what to change:
    /// a smaller model when the weights, gradients and moments alone do not fit, else a smaller
    /// batch (and f16 for an f32 run).
    pub fn check_memory(&self, settings: &TrainSettings) -> Result<()> {
        let Some(memory) = self.limits.memory else {
            return Ok(());
        };
        if self.total() <= memory {
            return Ok(());
        }
        let state = self.params_bytes + self.half_bytes + self.grads_bytes + self.moments_bytes;
        let hint = if state > memory {
            format!(
                "the weights, their gradients and AdamW's moments alone take {}; use a smaller \
                 model",
                mib(state)
            )
        } else {
            let mut h = "use a smaller batch (-B) with more --grad-accum to keep the tokens per \
                         step, or a shorter -T"
                .to_string();
            if settings.precision == Precision::F32 {
                h.push_str(", or --precision f16");
            }
            h
        };
        Err(Error::Limit {
            what: "the run".into(),
            needed: format!("{} of device memory ({})", mib(self.total()), self.line()),
            available: mib(memory),
            adapter: self.limits.adapter.clone(),
            hint,
        })
    }

    /// Bytes of everything the run allocates (all of it is live during a step: the peak).
    pub fn total(&self) -> u64 {
        self.params_bytes
            + self.half_bytes
            + self.grads_bytes
            + self.moments_bytes
            + self.activations.bytes()
            + self.inputs_bytes
            + self.classifier_bytes
    }

    /// One line for the log: `memory: params ... | grads ... | moments ... | activations ... |
    /// classifier ... | total ...` (params include the f16 copy).
    pub fn line(&self) -> String {
        format!(
            "memory: params {} | grads {} | moments {} | activations {} | classifier {} | total {}",
            mib(self.params_bytes + self.half_bytes),
            mib(self.grads_bytes),
            mib(self.moments_bytes),
            mib(self.activations.bytes() + self.inputs_bytes),
            mib(self.classifier_bytes),
            mib(self.total())
        )
    }

    /// The classifier's chunking, for the log.
    pub fn classifier_line(&self, vp: usize) -> String {
        format!(
            "classifier: logits in {} chunk{} of {} rows x {vp} (at most {} per binding on '{}')",
            self.chunks,
            if self.chunks == 1 { "" } else { "s" },
            self.chunk_rows,
            mib(self.limits.tensor_bytes()),
            self.limits.adapter
        )
    }

    /// Every buffer with its size.
    pub fn details(&self) -> String {
        let mut out = String::new();
        let mut line = |what: String, bytes: u64| {
            out.push_str(&format!("  {what:<58} {:>10}\n", mib(bytes)));
        };
        let s = &self.storage;
        for (k, b) in s.buffers.iter().enumerate() {
            let tensors: usize = s
                .pieces
                .iter()
                .map(|(_, ps)| ps.iter().filter(|p| p.buffer == k).count())
                .sum();
            let what =
                |copy: &str| format!("{copy} buffer {k} ({tensors} tensors, {} elements)", b.len);
            line(what("params f32"), buffer_bytes(b.len, DType::F32));
            if self.half_bytes > 0 {
                line(what("params f16"), buffer_bytes(b.len, DType::F16));
            }
            line(what("grads f32"), buffer_bytes(b.len, DType::F32));
            line(what("adam m f32"), buffer_bytes(b.len, DType::F32));
            line(what("adam v f32"), buffer_bytes(b.len, DType::F32));
        }
        for (k, (name, bytes)) in self.activations.buffers.iter().enumerate() {
            line(format!("activations {k} (largest: {name})"), *bytes);
        }
        line(
            "step inputs (tokens, targets, buckets, losses, scalars)".into(),
            self.inputs_bytes,
        );
        line(
            format!("classifier logits ({} rows)", self.chunk_rows),
            self.classifier_bytes,
        );
        out.push_str(&format!(
            "  {:<58} {:>10}  (activations unshared: {})\n",
            "total",
            mib(self.total()),
            mib(self.activations.unshared_bytes)
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_start_at_aligned_rows() {
        // 768 channels in f16 (1536-byte rows) and u32 targets (4-byte rows), 256-byte offsets.
        assert_eq!(chunk_granularity(768, 2, 256), 64);
        // 32 channels in f32 (128-byte rows): 2 rows; targets need 64.
        assert_eq!(chunk_granularity(32, 4, 256), 64);
        assert_eq!(chunk_granularity(48, 2, 16), 4);
        for (c, act, align) in [(768, 2, 256), (100, 4, 64), (7, 2, 32)] {
            let g = chunk_granularity(c, act, align) as u64;
            assert_eq!(g * (c * act) as u64 % align, 0);
            assert_eq!(g * 4 % align, 0);
        }
    }
}
