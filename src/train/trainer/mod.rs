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
mod eval;
mod ring;
mod weights;

use super::parallel::Collective;
use super::plan::{step_shape, MemoryPlan};
use super::settings::{Precision, TrainSettings, ADAM_BETAS, ADAM_EPS};
use crate::checkpoint::Checkpoint;
use crate::data::{Corpus, DataLoader};
use crate::error::{Error, Result};
use crate::gpu::profile::{NodeTime, Profiler};
use crate::gpu::{AdapterLimits, DType, Gpu, Tensor};
use crate::graph::gpt::{train_graph, StepIo};
use crate::graph::step::INITIAL_LOSS_SCALE;
use crate::graph::{self, CompiledGraph, TensorId};
use crate::model::init::init_params;
use crate::model::{ParamLayout, StoredParams};
use crate::ops::{embedding, optimizer};
use crate::rng::Rng;
use data_parallel::Parallel;
pub use data_parallel::ReduceStats;
pub use ring::PIPELINE_DEPTH;
use ring::{Finished, Pending, Ring};
use std::sync::Arc;
use std::time::Instant;
use weights::Weights;

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

pub struct Trainer {
    gpu: Arc<Gpu>,
    settings: TrainSettings,
    layout: ParamLayout,
    plan: MemoryPlan,
    weights: Weights,
    /// The step's state in the graph.
    io: StepIo,
    graph: CompiledGraph,
    loader: DataLoader,
    /// The steps in flight and their read-back slots.
    ring: Ring,
    /// When the last step was collected (the end of its wall-clock time).
    last_collect: Option<Instant>,
    /// With profiling: the last collected step's node times and last timestamp (ns).
    node_times: Vec<NodeTime>,
    last_gpu_end_ns: Option<f64>,
    rng: Rng,
    /// Steps collected; the CPU's copies of the scaler and Adam's count are as after them.
    step: usize,
    adam_t: usize,
    /// The loss scale the next step uses, and the clean steps since it last changed.
    loss_scale: f32,
    clean_steps: usize,
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
        let mut rng = Rng::new(settings.seed);
        let storage = &plan.storage;
        let copies = Weights {
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
        };
        let align = gpu.alignment();
        let shape = step_shape(&settings);
        let (step_graph, io) = train_graph(&shape, &cfg, storage, plan.chunk_rows)?;
        let body_writes = step_graph.body_writes();
        let graph = step_graph.compile(&gpu, &|input| copies.bind(input, align))?;
        let bias_table = optimizer::bias_correction_table(ADAM_BETAS.0, ADAM_BETAS.1);
        gpu.write(graph.tensor(io.bias_table, 0), &bias_table)?;
        let parallel = match collective {
            Some((c, bucket_floats)) if c.size() > 1 => Some(Parallel::new(
                &gpu,
                &copies,
                graph.tensor(io.loss, 0),
                &body_writes,
                c,
                bucket_floats,
            )?),
            _ => None,
        };

        let mut t = Trainer {
            ring: Ring::new(&gpu),
            parallel,
            loss_scale: match settings.precision {
                Precision::F16 => INITIAL_LOSS_SCALE,
                Precision::F32 => 1.0,
            },
            clean_steps: 0,
            recording_threads: graph::recording_threads(&gpu),
            gpu,
            layout,
            plan,
            weights: copies,
            io,
            graph,
            loader,
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
            self.loss_scale,
            self.clean_steps,
            self.adam_t,
            self.step,
            s.tokens_per_step(),
        );
        state.write(&self.gpu, self.t(self.io.state))?;
        self.gpu.write(self.t(self.io.dloss), &[state.dloss])?;
        optimizer::GradNormScalars::new(state.inv_scale, s.grad_clip as f32)
            .write(&self.gpu, self.t(self.io.norm_scalars))?;
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
        .write(&self.gpu, self.t(self.io.hyper))
    }

    /// A state tensor of the step (the same in every micro-step).
    fn t(&self, id: TensorId) -> &Tensor {
        self.graph.tensor(id, 0)
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

    /// The loss scale the next step uses (1 without mixed precision).
    pub fn loss_scale(&self) -> f32 {
        self.loss_scale
    }

    /// Overrides the loss scale (tests force an overflow with it). Steps still in flight are
    /// collected first.
    pub fn set_loss_scale(&mut self, scale: f32) -> Result<()> {
        self.expect_idle("setting the loss scale")?;
        self.loss_scale = scale;
        self.write_state()
    }

    /// Sets how many threads record each step (at least 1; the default is
    /// [`graph::recording_threads`]). The steps' results do not depend on it.
    pub fn set_recording_threads(&mut self, threads: usize) {
        self.recording_threads = threads.max(1);
    }

    /// Steps queued and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.ring.pending.len()
    }

    /// The index the next queued step will have: collected steps plus those in flight.
    pub fn queued_index(&self) -> usize {
        self.step + self.ring.pending.len()
    }

    fn expect_idle(&self, what: &str) -> Result<()> {
        if self.ring.pending.is_empty() {
            Ok(())
        } else {
            Err(Error::Other(format!(
                "{what} needs every queued step collected first ({} in flight)",
                self.ring.pending.len()
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
        for slot in &mut self.ring.slots {
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

    fn upload_batches(&mut self, batches: &[(Vec<u32>, Vec<u32>)]) -> Result<()> {
        let vp = self.settings.config.padded_vocab_size;
        for (k, (x, y)) in batches.iter().enumerate() {
            self.upload_inputs(k, x, y)?;
            self.gpu.write_u32(
                self.graph.tensor(self.io.buckets, k),
                &embedding::bucket_tokens(x, vp),
            )?;
        }
        Ok(())
    }

    /// Inputs and targets of micro-step `k` (all a forward pass reads).
    fn upload_inputs(&mut self, k: usize, x: &[u32], y: &[u32]) -> Result<()> {
        self.gpu
            .write_u32(self.graph.tensor(self.io.tokens, k), x)?;
        self.gpu.write_u32(self.graph.tensor(self.io.targets, k), y)
    }

    /// Records `head + body * micro (+ tail)` into command buffers to submit in order
    /// ([`graph::encode_schedule`]); the step's statistics are copied into `staging` when given.
    fn encode(
        &mut self,
        include_tail: bool,
        slot: Option<usize>,
    ) -> Result<Vec<wgpu::CommandBuffer>> {
        let nodes = self.graph.schedule(include_tail);
        let profiler = slot.and_then(|i| self.ring.slots[i].profiler.as_mut());
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
        if let Some(p) = &self.ring.slots[i].profiler {
            p.resolve(&mut enc);
        }
        self.copy_stats(&mut enc, i);
        buffers.push(enc.finish());
        Ok(buffers)
    }

    /// Copies the step's statistics into read-back slot `i`.
    fn copy_stats(&self, enc: &mut wgpu::CommandEncoder, i: usize) {
        let staging = &self.ring.slots[i].staging;
        for (id, at, len) in [
            (self.io.loss, 0, 4),
            (self.io.status, 16, 16),
            (self.io.state, 32, 32),
        ] {
            let t = self.t(id);
            enc.copy_buffer_to_buffer(&t.buffer, t.offset, staging, at, len);
        }
    }

    /// Queues the next optimiser step (`grad_accum` micro-batches forward and backward, gradient
    /// norm, clipping, AdamW and the loss scaler's update, in one submission) without waiting
    /// for the GPU. At most [`PIPELINE_DEPTH`] steps may be in flight; [`Trainer::collect`]
    /// returns their statistics in order.
    pub fn submit(&mut self) -> Result<()> {
        let start = Instant::now();
        let step = self.queued_index();
        let slot = self.ring.free_slot()?;
        let (rank, ranks) = (self.rank(), self.settings.ranks);
        let batches: Vec<_> = (0..self.settings.grad_accum)
            .map(|_| self.loader.next_batch_of(rank, ranks).map(|b| (b.x, b.y)))
            .collect::<Result<_>>()?;
        self.upload_batches(&batches)?;
        // The learning rate follows the step index alone (skipped steps count), so the CPU
        // knows it ahead; everything else the step reads was written by the previous step.
        let lr = self.settings.schedule().lr(step);
        self.gpu
            .write_bytes(self.t(self.io.hyper), bytemuck::bytes_of(&(lr as f32)))?;
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
        self.ring.push(Pending {
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
    /// next step may already be running). Native only: a browser cannot block; it polls.
    pub fn collect(&mut self) -> Result<StepStats> {
        self.ring.wait(&self.gpu)?;
        self.finish()
    }

    /// The oldest queued step's statistics if it has finished, without blocking: `None` while
    /// it runs (or when no step is queued).
    pub fn poll(&mut self) -> Result<Option<StepStats>> {
        match self.ring.ready(&self.gpu)? {
            true => self.finish().map(Some),
            false => Ok(None),
        }
    }

    /// Reads the oldest step's statistics, which have arrived, and advances the CPU's copies.
    fn finish(&mut self) -> Result<StepStats> {
        let Finished {
            pending: p,
            loss,
            norm,
            state,
        } = self.ring.take()?;
        let slot = &mut self.ring.slots[p.slot];
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
        self.loss_scale = state.scale;
        self.clean_steps = state.clean_steps as usize;
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
            while outcome.is_ok() && self.ring.pending.len() < depth && self.queued_index() < until
            {
                if let Err(e) = self.submit() {
                    outcome = Err(e);
                }
            }
            if self.ring.pending.is_empty() {
                return outcome;
            }
            let stats = self.collect()?;
            if outcome.is_ok() {
                let nodes = self.take_node_times();
                outcome = report(&stats, &nodes);
            }
        }
    }
}
