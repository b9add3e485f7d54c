//! The training loop's state on the GPU: parameters, optimiser moments, the compiled step graph,
//! the data loader and the loss scaler. One `step()` is one submission.

use super::plan::MemoryPlan;
use super::settings::{Precision, TrainSettings};
use crate::checkpoint::{Checkpoint, TrainState};
use crate::data::DataLoader;
use crate::error::{Error, Result};
use crate::gpu::profile::{NodeTime, Profiler};
use crate::gpu::{AdapterLimits, DType, Gpu, Tensor};
use crate::graph::gpt::{build_train_graph, ParamCopy, StepInput};
use crate::graph::{CompiledGraph, NodeObserver};
use crate::model::init::init_params;
use crate::model::{ParamLayout, StoredParams};
use crate::ops::{elementwise as ew, embedding, optimizer};
use crate::rng::Rng;
use std::sync::Arc;
use std::time::Instant;

/// What one step did, for the log line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    pub step: usize,
    pub loss: f32,
    pub norm: f32,
    pub lr: f64,
    pub dt_ms: f64,
    pub tok_per_sec: f64,
    /// Non-finite gradients: the update was skipped and the loss scale halved.
    pub skipped: bool,
    pub loss_scale: f32,
}

/// Dynamic loss scaling as PyTorch's GradScaler: start at 2^16, halve and skip the step on any
/// non-finite gradient, double after 2000 clean steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f32,
    pub clean_steps: usize,
    pub enabled: bool,
}

impl LossScaler {
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new(enabled: bool) -> LossScaler {
        LossScaler {
            scale: if enabled { 65536.0 } else { 1.0 },
            clean_steps: 0,
            enabled,
        }
    }

    /// Updates after a step; returns whether the step was skipped.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            if self.enabled {
                self.scale = (self.scale * 0.5).max(1.0 / 65536.0);
            }
            self.clean_steps = 0;
            return true;
        }
        self.clean_steps += 1;
        if self.enabled && self.clean_steps >= Self::GROWTH_INTERVAL {
            self.scale = (self.scale * 2.0).min(16_777_216.0);
            self.clean_steps = 0;
        }
        false
    }
}

/// The tensors a training step reads and writes that live outside the graph (see
/// [`StepInput`]).
struct StepTensors {
    params: StoredParams,
    /// f16 copies of the weights (mixed precision only).
    params_f16: Option<StoredParams>,
    grads: StoredParams,
    m: StoredParams,
    v: StoredParams,
    /// Per micro-step: token ids (B*T), targets (B*T), embedding-backward buckets.
    tokens: Vec<Tensor>,
    targets: Vec<Tensor>,
    buckets: Vec<Tensor>,
    /// The classifier's logits for one chunk of rows.
    logits: Tensor,
    dloss: Tensor,
    loss: Tensor,
    status: Tensor,
    norm_scalars: Tensor,
    hyper: Tensor,
}

impl StepTensors {
    fn copy(&self, copy: ParamCopy) -> Result<&StoredParams> {
        match copy {
            ParamCopy::Master => Ok(&self.params),
            ParamCopy::Half => self
                .params_f16
                .as_ref()
                .ok_or_else(|| Error::Other("no f16 copy of the parameters in f32 runs".into())),
            ParamCopy::Grad => Ok(&self.grads),
            ParamCopy::AdamM => Ok(&self.m),
            ParamCopy::AdamV => Ok(&self.v),
        }
    }

    /// The tensor behind a graph input in micro-step `k`.
    fn bind(&self, input: &StepInput, k: usize, alignment: u64) -> Result<Tensor> {
        Ok(match *input {
            StepInput::Param(id, piece, copy) => self.copy(copy)?.view(id, piece, alignment)?,
            StepInput::Buffer(copy, b) => self.copy(copy)?.buffers[b].clone(),
            StepInput::Tokens => self.tokens[k].clone(),
            StepInput::Targets => self.targets[k].clone(),
            StepInput::Buckets => self.buckets[k].clone(),
            StepInput::Logits => self.logits.clone(),
            StepInput::Dloss => self.dloss.clone(),
            StepInput::Loss => self.loss.clone(),
            StepInput::Status => self.status.clone(),
            StepInput::NormScalars => self.norm_scalars.clone(),
            StepInput::Hyper => self.hyper.clone(),
        })
    }
}

pub struct Trainer {
    gpu: Arc<Gpu>,
    settings: TrainSettings,
    layout: ParamLayout,
    plan: MemoryPlan,
    io: StepTensors,
    graph: CompiledGraph,
    loader: DataLoader,
    staging: wgpu::Buffer,
    rng: Rng,
    step: usize,
    adam_t: usize,
    scaler: LossScaler,
}

impl Trainer {
    /// Sets up training on `tokens`. `weights` may be imported weights (params only) or a full
    /// checkpoint (params, moments and state: the run continues exactly where it stopped).
    pub fn new(
        gpu: Arc<Gpu>,
        settings: TrainSettings,
        tokens: Arc<Vec<u32>>,
        weights: Option<&Checkpoint>,
    ) -> Result<Trainer> {
        let limits = AdapterLimits::of(&gpu);
        Self::with_limits(gpu, settings, tokens, weights, &limits)
    }

    /// [`Trainer::new`] planned for `limits` instead of the device's own (tests give tighter
    /// ones, so that small models are split into several buffers and classifier chunks as
    /// large ones are on real adapters). The limits must not exceed the device's.
    pub fn with_limits(
        gpu: Arc<Gpu>,
        settings: TrainSettings,
        tokens: Arc<Vec<u32>>,
        weights: Option<&Checkpoint>,
        limits: &AdapterLimits,
    ) -> Result<Trainer> {
        settings.validate()?;
        let cfg = settings.config;
        if let Some(w) = weights {
            if w.config != cfg {
                return Err(Error::Config(format!(
                    "the weights are for {:?} but the run is configured for {:?}",
                    w.config, cfg
                )));
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::Config(format!(
                "the data holds token id {bad}, outside the model's vocabulary of {}; raise --vocab-size",
                cfg.vocab_size
            )));
        }
        if settings.precision == Precision::F16 && !gpu.has_f16() {
            return Err(Error::Config(format!(
                "f16 precision needs SHADER_F16, which '{}' lacks; use f32",
                gpu.info.name
            )));
        }
        let loader = DataLoader::new(tokens, settings.batch_size, settings.seq_len)?;
        let layout = ParamLayout::new(&cfg);
        // Refuses, before anything is allocated, a run that cannot fit the adapter.
        let plan = MemoryPlan::new(&settings, limits)?;
        let n = settings.batch_size * settings.seq_len;
        let act = match settings.precision {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        };

        let mut rng = Rng::new(settings.seed);
        let storage = &plan.storage;
        let per_micro = |label: &str, len: usize| -> Result<Vec<Tensor>> {
            (0..settings.grad_accum)
                .map(|k| gpu.zeros(&format!("{label} {k}"), &[len], DType::U32))
                .collect()
        };
        let io = StepTensors {
            params: StoredParams::zeros(&gpu, storage, DType::F32, "params")?,
            params_f16: match settings.precision {
                Precision::F16 => Some(StoredParams::zeros(
                    &gpu,
                    storage,
                    DType::F16,
                    "params f16",
                )?),
                Precision::F32 => None,
            },
            grads: StoredParams::zeros(&gpu, storage, DType::F32, "grads")?,
            m: StoredParams::zeros(&gpu, storage, DType::F32, "adam m")?,
            v: StoredParams::zeros(&gpu, storage, DType::F32, "adam v")?,
            tokens: per_micro("tokens", n)?,
            targets: per_micro("targets", n)?,
            buckets: per_micro("buckets", embedding::embedding_buckets_len(n))?,
            logits: gpu.zeros("logits", &[plan.chunk_rows, cfg.padded_vocab_size], act)?,
            dloss: gpu.zeros("dloss", &[1], DType::F32)?,
            loss: gpu.zeros("loss", &[1], DType::F32)?,
            status: gpu.zeros("status", &[optimizer::STATUS_LEN], DType::F32)?,
            norm_scalars: gpu.zeros(
                "norm scalars",
                &[optimizer::GradNormScalars::LEN],
                DType::F32,
            )?,
            hyper: gpu.zeros("adamw hyper", &[optimizer::AdamWHyper::LEN], DType::F32)?,
        };
        let align = gpu.alignment();
        let graph = build_train_graph(&settings, storage, plan.chunk_rows)?
            .compile(&gpu, &|input, k| io.bind(input, k, align))?;
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("step scalars read-back"),
            size: 256,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });

        let mut t = Trainer {
            scaler: LossScaler::new(settings.precision == Precision::F16),
            gpu,
            layout,
            plan,
            io,
            graph,
            loader,
            staging,
            rng: rng.clone(),
            step: 0,
            adam_t: 0,
            settings,
        };
        match weights {
            Some(w) => t.load(w)?,
            None => {
                let p = init_params(&cfg, &t.layout, rng.next_u64());
                t.rng = rng;
                t.set_params(&p)?;
            }
        }
        Ok(t)
    }

    /// The run's memory plan: every buffer it allocated and the classifier's chunking.
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }

    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    pub fn settings(&self) -> &TrainSettings {
        &self.settings
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// Optimiser steps done so far.
    pub fn step_index(&self) -> usize {
        self.step
    }

    pub fn loss_scaler(&self) -> LossScaler {
        self.scaler
    }

    /// Overrides the loss scale (tests force an overflow with it).
    pub fn set_loss_scale(&mut self, scale: f32) {
        self.scaler.scale = scale;
    }

    pub fn graph(&self) -> &CompiledGraph {
        &self.graph
    }

    /// Uploads master weights (flat, in the canonical [`ParamLayout`]) and refreshes their f16
    /// copies.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        self.io.params.upload(&self.gpu, &self.layout, params)?;
        if let Some(h) = &self.io.params_f16 {
            let casts = h
                .buffers
                .iter()
                .zip(&self.io.params.buffers)
                .map(|(half, full)| ew::cast(&self.gpu, half, full))
                .collect::<Result<Vec<_>>>()?;
            self.gpu.run(&casts.iter().collect::<Vec<_>>())?;
        }
        Ok(())
    }

    fn load(&mut self, c: &Checkpoint) -> Result<()> {
        self.set_params(&c.params)?;
        if let (Some((m, v)), Some(s)) = (&c.moments, &c.state) {
            self.io.m.upload(&self.gpu, &self.layout, m)?;
            self.io.v.upload(&self.gpu, &self.layout, v)?;
            self.step = s.step;
            self.adam_t = s.adam_t;
            self.loader.set_position(s.loader_position)?;
            self.rng = Rng::from_state(s.rng_state);
            self.scaler.scale = s.loss_scale;
            self.scaler.clean_steps = s.clean_steps;
        }
        Ok(())
    }

    /// The master weights on the GPU. A [`crate::sample::Generator`] built on them samples
    /// from the current weights without copying them.
    pub fn stored_params(&self) -> &StoredParams {
        &self.io.params
    }

    /// Master weights, flat in the canonical [`ParamLayout`].
    pub fn params(&self) -> Result<Vec<f32>> {
        self.io.params.download(&self.gpu, &self.layout)
    }

    /// The gradients of the last step (scaled by the loss scale it used), flat like
    /// [`Trainer::params`].
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.io.grads.download(&self.gpu, &self.layout)
    }

    /// Everything needed to continue this run exactly.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        Ok(Checkpoint {
            config: self.settings.config,
            params: self.params()?,
            moments: Some((
                self.io.m.download(&self.gpu, &self.layout)?,
                self.io.v.download(&self.gpu, &self.layout)?,
            )),
            state: Some(TrainState {
                step: self.step,
                adam_t: self.adam_t,
                loader_position: self.loader.position(),
                rng_state: self.rng.state(),
                loss_scale: self.scaler.scale,
                clean_steps: self.scaler.clean_steps,
                settings: serde_json::to_string(&self.settings)
                    .map_err(|e| Error::Other(e.to_string()))?,
            }),
        })
    }

    fn upload_batches(&mut self, batches: &[(Vec<u32>, Vec<u32>)]) -> Result<()> {
        let vp = self.settings.config.padded_vocab_size;
        for (k, (x, y)) in batches.iter().enumerate() {
            self.gpu.write_u32(&self.io.tokens[k], x)?;
            self.gpu.write_u32(&self.io.targets[k], y)?;
            self.gpu
                .write_u32(&self.io.buckets[k], &embedding::bucket_tokens(x, vp))?;
        }
        Ok(())
    }

    fn write_step_scalars(&self, lr: f64) -> Result<()> {
        let s = &self.settings;
        let n = (s.batch_size * s.seq_len * s.grad_accum) as f32;
        let scale = self.scaler.scale;
        self.gpu.write(&self.io.dloss, &[scale / n])?;
        optimizer::GradNormScalars::new(1.0 / scale, s.grad_clip as f32)
            .write(&self.gpu, &self.io.norm_scalars)?;
        let t = (self.adam_t + 1) as i32;
        let hyper = optimizer::AdamWHyper {
            lr: lr as f32,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: s.weight_decay as f32,
            bias_correction1: (1.0 - 0.9f64.powi(t)) as f32,
            bias_correction2: (1.0 - 0.95f64.powi(t)) as f32,
            inv_loss_scale: 1.0 / scale,
        };
        hyper.write(&self.gpu, &self.io.hyper)
    }

    /// Records and submits `head + body * micro (+ tail)`, then reads [loss, norm, clip, finite].
    fn submit(&self, include_tail: bool, mut profiler: Option<&mut Profiler>) -> Result<[f32; 5]> {
        let gpu = &self.gpu;
        gpu.scoped("training step", || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("training step"),
                });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("training step"),
                    timestamp_writes: None,
                });
                if include_tail {
                    let observer = profiler.as_deref_mut().map(|p| p as &mut dyn NodeObserver);
                    self.graph.record(&mut pass, observer);
                } else {
                    self.graph.record_without_tail(&mut pass);
                }
            }
            if let Some(p) = profiler.as_deref() {
                p.resolve(&mut enc);
            }
            enc.copy_buffer_to_buffer(&self.io.loss.buffer, 0, &self.staging, 0, 4);
            enc.copy_buffer_to_buffer(&self.io.status.buffer, 0, &self.staging, 16, 16);
            gpu.queue.submit([enc.finish()]);
        })?;
        let vals: Vec<f32> = bytemuck::pod_collect_to_vec(&gpu.map_read(&self.staging, 32)?);
        Ok([vals[0], vals[4], vals[5], vals[6], vals[7]])
    }

    /// One optimiser step: `grad_accum` micro-batches forward and backward, gradient norm,
    /// clipping and AdamW, in one submission.
    pub fn step(&mut self) -> Result<StepStats> {
        self.step_inner(None)
    }

    /// [`Trainer::step`] with a timestamp before every node: also returns each node's GPU time.
    pub fn step_profiled(&mut self, profiler: &mut Profiler) -> Result<(StepStats, Vec<NodeTime>)> {
        let stats = self.step_inner(Some(&mut *profiler))?;
        Ok((stats, profiler.read(&self.gpu)?))
    }

    fn step_inner(&mut self, profiler: Option<&mut Profiler>) -> Result<StepStats> {
        let start = Instant::now();
        let batches: Vec<_> = (0..self.settings.grad_accum)
            .map(|_| {
                let b = self.loader.next_batch();
                (b.x, b.y)
            })
            .collect();
        self.upload_batches(&batches)?;
        let lr = self.settings.schedule().lr(self.step);
        self.write_step_scalars(lr)?;
        let [loss, norm, _clip, finite, _] = self.submit(true, profiler)?;
        let dt = start.elapsed().as_secs_f64();
        let skipped = self.scaler.update(finite == 1.0);
        if !skipped {
            self.adam_t += 1;
        }
        let stats = StepStats {
            step: self.step,
            loss,
            norm,
            lr,
            dt_ms: dt * 1e3,
            tok_per_sec: self.settings.tokens_per_step() as f64 / dt,
            skipped,
            loss_scale: self.scaler.scale,
        };
        self.step += 1;
        Ok(stats)
    }

    /// Forward and backward on the given micro-batches without an optimiser step: returns the
    /// mean loss and the unscaled gradients (for gradient checks).
    pub fn loss_and_grads(&mut self, batches: &[(Vec<u32>, Vec<u32>)]) -> Result<(f32, Vec<f32>)> {
        if batches.len() != self.settings.grad_accum {
            return Err(Error::Other(format!(
                "{} micro-batches given for grad_accum {}",
                batches.len(),
                self.settings.grad_accum
            )));
        }
        self.upload_batches(batches)?;
        self.write_step_scalars(0.0)?;
        let [loss, ..] = self.submit(false, None)?;
        let inv = 1.0 / self.scaler.scale;
        let g = self.grads()?.into_iter().map(|x| x * inv).collect();
        Ok((loss, g))
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn loss_scale_follows_grad_scaler_rules() {
        let mut s = LossScaler::new(true);
        assert_eq!(s.scale, 65536.0);
        // An overflow halves the scale and skips the step.
        assert!(s.update(false));
        assert_eq!(s.scale, 32768.0);
        // 1999 clean steps keep it; the 2000th doubles it.
        for _ in 0..1999 {
            assert!(!s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(!s.update(true));
        assert_eq!(s.scale, 65536.0);
        // An overflow in the middle restarts the count.
        for _ in 0..1500 {
            s.update(true);
        }
        s.update(false);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        // Without f16 the scale stays 1 and non-finite steps are still skipped.
        let mut off = LossScaler::new(false);
        assert!(off.update(false));
        for _ in 0..4000 {
            off.update(true);
        }
        assert_eq!(off.scale, 1.0);
    }
}
