//! The training loop's state on the GPU: parameters, optimiser moments, the compiled step graph,
//! the data loader and the loss scaler. One step is one submission.
//!
//! Steps are queued without waiting for each other: the loss scaler and Adam's step count live
//! on the GPU (the step's last node advances them), each step's statistics are copied into one
//! of a ring of read-back buffers, and the CPU writes only the next step's tokens and learning
//! rate, through the queue, which orders those writes after the previous step's reads. So while
//! the GPU runs step n the CPU encodes step n+1 ([`Trainer::submit`]) and reads step n's
//! statistics one step late ([`Trainer::collect`]).

mod data_parallel;

use super::parallel::Collective;
use super::plan::MemoryPlan;
use super::settings::{Precision, TrainSettings, ADAM_BETAS, ADAM_EPS};
use crate::checkpoint::{Checkpoint, TrainState};
use crate::data::{Batch, Corpus, DataLoader, LoaderState};
use crate::error::{Error, Result};
use crate::gpu::profile::{NodeTime, Profiler};
use crate::gpu::{AdapterLimits, DType, Gpu, Tensor};
use crate::graph::gpt::{build_train_graph, ParamCopy, StepInput};
use crate::graph::{self, CompiledGraph};
use crate::model::init::init_params;
use crate::model::{ParamLayout, StoredParams};
use crate::ops::{elementwise as ew, embedding, optimizer};
use crate::rng::Rng;
use data_parallel::Parallel;
pub use data_parallel::ReduceStats;
use std::collections::VecDeque;
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
    /// The loss scale after the step (what the next step uses).
    pub loss_scale: f32,
    /// Host time to prepare and encode the step: its batches written, its commands recorded
    /// (the CPU's share of a step).
    pub encode_ms: f64,
    /// Host time in `queue.submit`. Drivers that execute submissions in order on the calling
    /// thread (Mesa's software driver) block here until the previous step has finished.
    pub submit_ms: f64,
    /// With profiling: GPU time from the step's first to its last timestamp, and the GPU's idle
    /// time between the previous step's last timestamp and this step's first.
    pub gpu_ms: Option<f64>,
    pub gpu_idle_ms: Option<f64>,
    /// Data parallel: the gradients' exchange between the ranks.
    pub reduce: Option<ReduceStats>,
}

/// Steps that may be queued at once: the GPU runs one while the CPU encodes the next.
pub const PIPELINE_DEPTH: usize = 2;

/// Bytes of one step's read-back: loss (f32) at 0, status ([`optimizer::STATUS_LEN`] f32) at 16,
/// [`optimizer::StepState`] at 32.
const STATS_BYTES: u64 = 64;

/// One read-back buffer of the ring, with its profiler when profiling.
struct StatsSlot {
    staging: wgpu::Buffer,
    profiler: Option<Profiler>,
}

/// A step queued and not yet collected.
struct Pending {
    slot: usize,
    step: usize,
    lr: f64,
    submitted: Instant,
    encode_ms: f64,
    submit_ms: f64,
    index: wgpu::SubmissionIndex,
    reduce: Option<ReduceStats>,
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
    /// Each position's loss (of the latest micro-step).
    losses: Tensor,
    status: Tensor,
    norm_scalars: Tensor,
    hyper: Tensor,
    state: Tensor,
    bias_table: Tensor,
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
            StepInput::Losses => self.losses.clone(),
            StepInput::Status => self.status.clone(),
            StepInput::NormScalars => self.norm_scalars.clone(),
            StepInput::Hyper => self.hyper.clone(),
            StepInput::State => self.state.clone(),
            StepInput::BiasTable => self.bias_table.clone(),
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
    slots: Vec<StatsSlot>,
    pending: VecDeque<Pending>,
    /// When the last step was collected (the end of its wall-clock time).
    last_collect: Option<Instant>,
    /// With profiling: the last collected step's node times and last timestamp (ns).
    node_times: Vec<NodeTime>,
    last_gpu_end_ns: Option<f64>,
    rng: Rng,
    /// Steps collected; the CPU's copies of the scaler and Adam's count are as after them.
    step: usize,
    adam_t: usize,
    scaler: LossScaler,
    /// Threads that record a step ([`graph::recording_threads`]).
    recording_threads: usize,
    parallel: Option<Parallel>,
}

impl Trainer {
    /// Sets up training on `data` (a text's tokens or a folder of shards). `weights` may be
    /// imported weights (params only) or a full checkpoint (params, moments and state: the run
    /// continues exactly where it stopped).
    pub fn new(
        gpu: Arc<Gpu>,
        settings: TrainSettings,
        data: impl Into<Corpus>,
        weights: Option<&Checkpoint>,
    ) -> Result<Trainer> {
        let limits = AdapterLimits::of(&gpu);
        Self::with_limits(gpu, settings, data, weights, &limits)
    }

    /// [`Trainer::new`] planned for `limits` instead of the device's own (tests give tighter
    /// ones, so that small models are split into several buffers and classifier chunks as
    /// large ones are on real adapters). The limits must not exceed the device's.
    pub fn with_limits(
        gpu: Arc<Gpu>,
        settings: TrainSettings,
        data: impl Into<Corpus>,
        weights: Option<&Checkpoint>,
        limits: &AdapterLimits,
    ) -> Result<Trainer> {
        Self::build(gpu, settings, data.into(), weights, limits, None)
    }

    /// One rank of a data-parallel job: `collective` joins the job's processes, each with its
    /// own trainer on its own device. Every rank reads its own slice of every batch, and the
    /// gradients are summed across the ranks before the optimiser step, which then runs
    /// identically on every rank (see [`super::parallel`]). The gradients are reduced in
    /// buckets of about `bucket_bytes` (e.g. [`super::parallel::BUCKET_BYTES`]), each as soon
    /// as the backward has finished it. `settings.ranks` must be the job's size; `weights`
    /// must be the same on every rank.
    pub fn data_parallel(
        gpu: Arc<Gpu>,
        settings: TrainSettings,
        data: impl Into<Corpus>,
        weights: Option<&Checkpoint>,
        collective: Arc<dyn Collective>,
        bucket_bytes: usize,
    ) -> Result<Trainer> {
        let limits = AdapterLimits::of(&gpu);
        let floats = (bucket_bytes / 4).max(1);
        Self::build(
            gpu,
            settings,
            data.into(),
            weights,
            &limits,
            Some((collective, floats)),
        )
    }

    fn build(
        gpu: Arc<Gpu>,
        settings: TrainSettings,
        corpus: Corpus,
        weights: Option<&Checkpoint>,
        limits: &AdapterLimits,
        collective: Option<(Arc<dyn Collective>, usize)>,
    ) -> Result<Trainer> {
        settings.validate()?;
        let job = collective.as_ref().map_or(1, |c| c.0.size());
        if settings.ranks != job {
            return Err(Error::Config(format!(
                "the settings are for {} ranks but the job has {job}; start it with mpirun -np {}",
                settings.ranks, settings.ranks
            )));
        }
        let cfg = settings.config;
        if let Some(w) = weights {
            if w.config != cfg {
                return Err(Error::Config(format!(
                    "the weights are for {:?} but the run is configured for {:?}",
                    w.config, cfg
                )));
            }
        }
        // Shards hold GPT-2 ids (checked as they are read), within any vocabulary the settings
        // allow; a text's tokens are checked here.
        if matches!(corpus, Corpus::Shards(_)) && cfg.vocab_size < crate::model::config::GPT2_VOCAB
        {
            return Err(Error::Config(format!(
                "shards hold GPT-2 token ids (up to {}), outside the model's vocabulary of {}; use a vocabulary of at least {}",
                crate::model::config::GPT2_VOCAB - 1,
                cfg.vocab_size,
                crate::model::config::GPT2_VOCAB
            )));
        }
        if let Corpus::Text(tokens) = &corpus {
            if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                return Err(Error::Config(format!(
                    "the data holds token id {bad}, outside the model's vocabulary of {}; raise --vocab-size",
                    cfg.vocab_size
                )));
            }
        }
        settings.precision.check_adapter(&gpu)?;
        let shuffle = settings.shuffle.then_some(settings.seed);
        let loader = DataLoader::train(&corpus, settings.batch_size, settings.seq_len, shuffle)?;
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
        let bias_table = optimizer::bias_correction_table(ADAM_BETAS.0, ADAM_BETAS.1);
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
            losses: gpu.zeros("losses", &[n], DType::F32)?,
            status: gpu.zeros("status", &[optimizer::STATUS_LEN], DType::F32)?,
            norm_scalars: gpu.zeros(
                "norm scalars",
                &[optimizer::GradNormScalars::LEN],
                DType::F32,
            )?,
            hyper: gpu.zeros("adamw hyper", &[optimizer::AdamWHyper::LEN], DType::F32)?,
            state: gpu.zeros("step state", &[optimizer::StepState::LEN], DType::U32)?,
            bias_table: gpu.upload(
                "bias corrections",
                &bias_table,
                &[bias_table.len()],
                DType::F32,
            )?,
        };
        let align = gpu.alignment();
        let step_graph = build_train_graph(&settings, storage, plan.chunk_rows)?;
        let parallel = match collective {
            Some((c, bucket_floats)) if c.size() > 1 => Some(Parallel::new(
                &gpu,
                &io,
                &step_graph.body_writes(),
                c,
                bucket_floats,
            )?),
            _ => None,
        };
        let graph = step_graph.compile(&gpu, &|input, k| io.bind(input, k, align))?;

        let slots = (0..PIPELINE_DEPTH)
            .map(|i| StatsSlot {
                staging: gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("step statistics read-back {i}")),
                    size: STATS_BYTES,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }),
                profiler: None,
            })
            .collect();

        let mut t = Trainer {
            parallel,
            scaler: LossScaler::new(settings.precision == Precision::F16),
            recording_threads: graph::recording_threads(&gpu),
            gpu,
            layout,
            plan,
            io,
            graph,
            loader,
            slots,
            pending: VecDeque::new(),
            last_collect: None,
            node_times: Vec::new(),
            last_gpu_end_ns: None,
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
        t.write_state()?;
        if let Some(p) = &t.parallel {
            t.check_job(p.collective.as_ref(), &corpus)?;
        }
        Ok(t)
    }

    /// Data parallel: every rank must start the same run (settings, data, loader position)
    /// from the same weights, or the ranks would train different models or wait for each other
    /// forever. Checked on every rank at start-up.
    fn check_job(&self, c: &dyn Collective, corpus: &Corpus) -> Result<()> {
        use super::parallel::{checksum, fingerprint, first_disagreeing};
        let run = format!(
            "{}|{}|{:?}|{}",
            serde_json::to_string(&self.settings).map_err(|e| Error::Other(e.to_string()))?,
            corpus.train_tokens(),
            self.loader.state(),
            self.step
        );
        if let Some(r) = first_disagreeing(c, fingerprint(run.bytes()))? {
            return Err(Error::Config(format!(
                "rank {r} was started with other settings, data or checkpoint than rank 0; start every rank with the same command line, the same data and the same checkpoint"
            )));
        }
        if let Some(r) = first_disagreeing(c, checksum(&self.params()?))? {
            return Err(Error::Config(format!(
                "rank {r} starts from other weights than rank 0; give every rank the same --init-from or --resume files"
            )));
        }
        Ok(())
    }

    /// Writes the GPU's step state from the CPU's copy (scaler, Adam's count, steps), with the
    /// scalars the next step reads. Later steps advance it on the GPU.
    fn write_state(&self) -> Result<()> {
        let s = &self.settings;
        let state = optimizer::StepState::new(
            self.scaler.scale,
            self.scaler.clean_steps,
            self.adam_t,
            self.step,
            s.tokens_per_step(),
        );
        state.write(&self.gpu, &self.io.state)?;
        self.gpu.write(&self.io.dloss, &[state.dloss])?;
        optimizer::GradNormScalars::new(state.inv_scale, s.grad_clip as f32)
            .write(&self.gpu, &self.io.norm_scalars)?;
        let (bias_correction1, bias_correction2) =
            optimizer::bias_corrections(ADAM_BETAS.0, ADAM_BETAS.1, (self.adam_t + 1) as u32);
        optimizer::AdamWHyper {
            lr: s.schedule().lr(self.step) as f32,
            beta1: ADAM_BETAS.0 as f32,
            beta2: ADAM_BETAS.1 as f32,
            eps: ADAM_EPS,
            weight_decay: s.weight_decay as f32,
            bias_correction1,
            bias_correction2,
            inv_loss_scale: state.inv_scale,
        }
        .write(&self.gpu, &self.io.hyper)
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

    /// This process's rank in a data-parallel job (0 for a single process).
    pub fn rank(&self) -> usize {
        self.parallel.as_ref().map_or(0, |p| p.collective.rank())
    }

    /// The job's collective (None for a single process).
    pub fn collective(&self) -> Option<&dyn Collective> {
        self.parallel.as_ref().map(|p| p.collective.as_ref())
    }

    /// Optimiser steps done so far.
    pub fn step_index(&self) -> usize {
        self.step
    }

    pub fn loss_scaler(&self) -> LossScaler {
        self.scaler
    }

    /// Overrides the loss scale (tests force an overflow with it). Steps still in flight are
    /// collected first.
    pub fn set_loss_scale(&mut self, scale: f32) -> Result<()> {
        self.expect_idle("setting the loss scale")?;
        self.scaler.scale = scale;
        self.write_state()
    }

    /// Sets how many threads record each step (at least 1; the default is
    /// [`graph::recording_threads`]). The steps' results do not depend on it.
    pub fn set_recording_threads(&mut self, threads: usize) {
        self.recording_threads = threads.max(1);
    }

    /// Steps queued and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The index the next queued step will have: collected steps plus those in flight.
    pub fn queued_index(&self) -> usize {
        self.step + self.pending.len()
    }

    fn expect_idle(&self, what: &str) -> Result<()> {
        if self.pending.is_empty() {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "{what} needs every queued step collected first ({} in flight)",
                self.pending.len()
            )))
        }
    }

    /// Turns on per-node timestamps for the steps queued from now on (needs
    /// TIMESTAMP_QUERY_INSIDE_PASSES); [`Trainer::take_node_times`] returns them per step.
    pub fn enable_profiling(&mut self) -> Result<()> {
        self.expect_idle("turning profiling on")?;
        // A timestamp per node, one at the end, and one for the gradient exchange of a
        // data-parallel step.
        let nodes = self.graph.schedule(true).len() + 2;
        for slot in &mut self.slots {
            slot.profiler = Some(Profiler::new(&self.gpu, nodes)?);
        }
        Ok(())
    }

    /// The node times of the step last collected (empty without profiling).
    pub fn take_node_times(&mut self) -> Vec<NodeTime> {
        std::mem::take(&mut self.node_times)
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
            self.loader.set_state(LoaderState {
                epoch: s.loader_epoch,
                position: s.loader_position,
            })?;
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

    /// Everything needed to continue this run exactly (after every queued step is collected).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        self.expect_idle("a checkpoint")?;
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
                loader_epoch: self.loader.state().epoch,
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
            self.upload_inputs(k, x, y)?;
            self.gpu
                .write_u32(&self.io.buckets[k], &embedding::bucket_tokens(x, vp))?;
        }
        Ok(())
    }

    /// Inputs and targets of micro-step `k` (all a forward pass reads).
    fn upload_inputs(&mut self, k: usize, x: &[u32], y: &[u32]) -> Result<()> {
        self.gpu.write_u32(&self.io.tokens[k], x)?;
        self.gpu.write_u32(&self.io.targets[k], y)
    }

    /// Records `head + body * micro (+ tail)` into command buffers to submit in order
    /// ([`graph::encode_schedule`]); the step's statistics are copied into `staging` when given.
    fn encode(
        &mut self,
        include_tail: bool,
        slot: Option<usize>,
    ) -> Result<Vec<wgpu::CommandBuffer>> {
        let nodes = self.graph.schedule(include_tail);
        let profiler = slot.and_then(|i| self.slots[i].profiler.as_mut());
        let marks = profiler.map(|p| p.begin_step(&nodes, None));
        let mut buffers = graph::encode_schedule(
            &self.gpu,
            "training step",
            &nodes,
            0..nodes.len(),
            marks,
            true,
            self.recording_threads,
        )?;
        let Some(i) = slot else {
            return Ok(buffers);
        };
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("training step statistics"),
            });
        if let Some(p) = &self.slots[i].profiler {
            p.resolve(&mut enc);
        }
        self.copy_stats(&mut enc, i);
        buffers.push(enc.finish());
        Ok(buffers)
    }

    /// Copies the step's statistics into read-back slot `i`.
    fn copy_stats(&self, enc: &mut wgpu::CommandEncoder, i: usize) {
        let staging = &self.slots[i].staging;
        enc.copy_buffer_to_buffer(&self.io.loss.buffer, self.io.loss.offset, staging, 0, 4);
        enc.copy_buffer_to_buffer(
            &self.io.status.buffer,
            self.io.status.offset,
            staging,
            16,
            16,
        );
        enc.copy_buffer_to_buffer(&self.io.state.buffer, self.io.state.offset, staging, 32, 32);
    }

    /// Queues the next optimiser step (`grad_accum` micro-batches forward and backward, gradient
    /// norm, clipping, AdamW and the loss scaler's update, in one submission) without waiting
    /// for the GPU. At most [`PIPELINE_DEPTH`] steps may be in flight; [`Trainer::collect`]
    /// returns their statistics in order.
    pub fn submit(&mut self) -> Result<()> {
        if self.pending.len() >= PIPELINE_DEPTH {
            return Err(Error::Other(format!(
                "{PIPELINE_DEPTH} steps are already in flight: collect one first"
            )));
        }
        let start = Instant::now();
        let step = self.queued_index();
        let slot = (0..PIPELINE_DEPTH)
            .find(|i| self.pending.iter().all(|p| p.slot != *i))
            .expect("a free slot when fewer steps than slots are in flight");
        let (rank, ranks) = (self.rank(), self.settings.ranks);
        let batches: Vec<_> = (0..self.settings.grad_accum)
            .map(|_| self.loader.next_batch_of(rank, ranks).map(|b| (b.x, b.y)))
            .collect::<Result<_>>()?;
        self.upload_batches(&batches)?;
        // The learning rate follows the step index alone (skipped steps count), so the CPU
        // knows it ahead; everything else the step reads was written by the previous step.
        let lr = self.settings.schedule().lr(step);
        self.gpu
            .write_bytes(&self.io.hyper, bytemuck::bytes_of(&(lr as f32)))?;
        let gpu = self.gpu.clone();
        let mut encoded = start;
        let mut reduce = None;
        let index = gpu.scoped("training step", || -> Result<wgpu::SubmissionIndex> {
            if self.parallel.is_some() {
                let (index, r) = self.submit_data_parallel(slot)?;
                reduce = Some(r);
                encoded = Instant::now();
                return Ok(index);
            }
            let commands = self.encode(true, Some(slot))?;
            encoded = Instant::now();
            Ok(gpu.queue.submit(commands))
        })??;
        self.pending.push_back(Pending {
            slot,
            step,
            lr,
            submitted: start,
            encode_ms: (encoded - start).as_secs_f64() * 1e3,
            submit_ms: encoded.elapsed().as_secs_f64() * 1e3,
            index,
            reduce,
        });
        Ok(())
    }

    /// Waits for the oldest queued step and returns its statistics (read one step late: the
    /// next step may already be running).
    pub fn collect(&mut self) -> Result<StepStats> {
        let p = self
            .pending
            .pop_front()
            .ok_or_else(|| Error::Other("no step in flight to collect".into()))?;
        let slot = &mut self.slots[p.slot];
        let bytes = self
            .gpu
            .map_read_after(&slot.staging, STATS_BYTES, Some(p.index.clone()))?;
        let now = Instant::now();
        let (mut gpu_ms, mut gpu_idle_ms) = (None, None);
        if let Some(prof) = slot.profiler.as_mut() {
            self.node_times = prof.read_after(&self.gpu, Some(p.index))?;
            if let Some((first, last)) = prof.span_ns() {
                gpu_ms = Some((last - first) * 1e-6);
                gpu_idle_ms = self
                    .last_gpu_end_ns
                    .map(|end| (first - end).max(0.0) * 1e-6);
                self.last_gpu_end_ns = Some(last);
            }
        }
        let f = |i: usize| f32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        let (loss, norm) = (f(0), f(16));
        let state = optimizer::StepState::from_bytes(&bytes[32..])?;
        self.scaler.scale = state.scale;
        self.scaler.clean_steps = state.clean_steps as usize;
        self.adam_t = state.adam_t as usize;
        // Wall time: from the later of its submission and the previous step's end, so that
        // with steps queued back to back it is the time between steps finishing.
        let began = match self.last_collect {
            Some(t) if t > p.submitted => t,
            _ => p.submitted,
        };
        let dt = (now - began).as_secs_f64();
        self.last_collect = Some(now);
        self.step += 1;
        Ok(StepStats {
            step: p.step,
            loss,
            norm,
            lr: p.lr,
            dt_ms: dt * 1e3,
            tok_per_sec: self.settings.tokens_per_step() as f64 / dt,
            skipped: state.skipped == 1,
            loss_scale: state.scale,
            encode_ms: p.encode_ms,
            submit_ms: p.submit_ms,
            gpu_ms,
            gpu_idle_ms,
            reduce: p.reduce,
        })
    }

    /// One optimiser step, waited for: [`Trainer::submit`] then [`Trainer::collect`].
    pub fn step(&mut self) -> Result<StepStats> {
        self.expect_idle("a synchronous step")?;
        self.submit()?;
        self.collect()
    }

    /// Runs steps up to index `until` (exclusive) with [`PIPELINE_DEPTH`] of them in flight,
    /// calling `report` with each step's statistics and node times (when profiling) as they
    /// are collected. An error from `report` stops the queueing: the steps already in flight
    /// are collected unreported and the error is returned. On return no step is in flight.
    pub fn run_steps(
        &mut self,
        until: usize,
        mut report: impl FnMut(&StepStats, &[NodeTime]) -> Result<()>,
    ) -> Result<()> {
        let mut outcome = Ok(());
        // A data-parallel step waits for its own backward inside `submit` (the exchange):
        // queueing the next one early gains nothing and would blur each step's wall time.
        let depth = if self.parallel.is_some() {
            1
        } else {
            PIPELINE_DEPTH
        };
        loop {
            while outcome.is_ok() && self.pending.len() < depth && self.queued_index() < until {
                if let Err(e) = self.submit() {
                    outcome = Err(e);
                }
            }
            if self.pending.is_empty() {
                return outcome;
            }
            let stats = self.collect()?;
            if outcome.is_ok() {
                let nodes = self.take_node_times();
                outcome = report(&stats, &nodes);
            }
        }
    }

    /// The forward pass alone on each batch (B*T inputs and targets): each position's loss,
    /// B*T per batch. Nothing the next step reads is changed (the gradients are zeroed by
    /// every step's head, the loss likewise), so evaluations may come between any two steps.
    pub fn position_losses(&mut self, batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        self.expect_idle("an evaluation")?;
        let n = self.settings.batch_size * self.settings.seq_len;
        let vocab = self.settings.config.vocab_size;
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            if b.x.len() != n || b.y.len() != n {
                return Err(Error::Other(format!(
                    "an evaluation batch holds {} inputs and {} targets; the run's B*T is {n}",
                    b.x.len(),
                    b.y.len()
                )));
            }
            if let Some(&bad) = b.x.iter().chain(&b.y).find(|&&t| t as usize >= vocab) {
                return Err(Error::Config(format!(
                    "token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            // The forward pass alone: no embedding-backward buckets.
            self.upload_inputs(0, &b.x, &b.y)?;
            let gpu = self.gpu.clone();
            gpu.scoped("evaluation", || -> Result<()> {
                let mut enc = gpu
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("evaluation"),
                    });
                {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("forward"),
                        timestamp_writes: None,
                    });
                    self.graph.record_forward(&mut pass, 0);
                }
                gpu.queue.submit([enc.finish()]);
                Ok(())
            })??;
            out.push(self.gpu.read(&self.io.losses)?);
        }
        Ok(out)
    }

    /// The mean loss over `batches` (forward passes alone), summed in f64.
    pub fn mean_loss(&mut self, batches: &[Batch]) -> Result<f64> {
        let losses = self.position_losses(batches)?;
        let count: usize = losses.iter().map(|l| l.len()).sum();
        let sum: f64 = losses.iter().flatten().map(|&l| l as f64).sum();
        Ok(sum / count.max(1) as f64)
    }

    /// Forward and backward on the given micro-batches without an optimiser step: returns the
    /// mean loss and the unscaled gradients (for gradient checks; in a data-parallel job, this
    /// rank's share, not reduced).
    pub fn loss_and_grads(&mut self, batches: &[(Vec<u32>, Vec<u32>)]) -> Result<(f32, Vec<f32>)> {
        if batches.len() != self.settings.grad_accum {
            return Err(Error::Other(format!(
                "{} micro-batches given for grad_accum {}",
                batches.len(),
                self.settings.grad_accum
            )));
        }
        self.expect_idle("a gradient check")?;
        self.upload_batches(batches)?;
        let gpu = self.gpu.clone();
        gpu.scoped("forward and backward", || -> Result<()> {
            let commands = self.encode(false, None)?;
            gpu.queue.submit(commands);
            Ok(())
        })??;
        let loss = gpu.read(&self.io.loss)?[0];
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
