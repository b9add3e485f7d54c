//! The graph executor: a model step as a static list of dispatches over planned buffers.
//!
//! A [`Graph`] is built once, without a device: tensors are declared (planned activations, and
//! inputs the caller owns, named by a key of the caller's type `E` and bound at compile time),
//! then nodes are appended in execution order, each naming the tensors it reads and writes and
//! how to build its dispatches. [`Graph::plan`] computes every planned tensor's lifetime (first
//! to last node that touches it) and packs tensors whose lifetimes do not overlap into shared
//! buffers ([`pack`], a pure function); that is all a memory plan needs. [`Graph::compile`]
//! allocates the packed buffers, binds the inputs and makes every bind group once. A step then
//! only records the prepared dispatches: `head` once, `body` once per micro-step (with that
//! micro-step's inputs), `tail` once.

pub mod gpt;

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, Tensor};

pub type TensorId = usize;

/// Where in a step a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// Once at the start of a step.
    Head,
    /// Once per micro-step (gradient accumulation).
    Body,
    /// Once at the end of a step (gradient norm, optimiser).
    Tail,
}

/// Whether a body node belongs to the forward pass (up to the loss) or the backward pass. An
/// evaluation records the forward nodes alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Forward,
    Backward,
}

enum Storage<E> {
    /// An activation: memory assigned by the planner.
    Planned,
    /// A tensor owned by the caller (parameter views, optimiser state, step scalars), the same
    /// in every micro-step.
    Input(E),
    /// A tensor owned by the caller with one instance per micro-step (token ids, targets).
    PerMicro(E),
}

struct Decl<E> {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage<E>,
}

type BuildFn = Box<dyn Fn(&Gpu, &Resolved) -> Result<Vec<Dispatch>>>;

struct Node {
    label: String,
    family: &'static str,
    phase: Phase,
    reads: Vec<TensorId>,
    writes: Vec<TensorId>,
    flops: f64,
    build: BuildFn,
}

/// The tensors of a graph as the build functions see them.
pub struct Resolved<'a> {
    tensors: &'a [Tensor],
}

impl Resolved<'_> {
    pub fn t(&self, id: TensorId) -> &Tensor {
        &self.tensors[id]
    }
}

/// A graph under construction; `E` names the tensors the caller owns.
pub struct Graph<E> {
    decls: Vec<Decl<E>>,
    nodes: Vec<(Section, Node)>,
    section: Section,
    phase: Phase,
    micro: usize,
}

/// How to find the caller's tensor for an input key in a micro-step.
pub type Bindings<'a, E> = dyn Fn(&E, usize) -> Result<Tensor> + 'a;

impl<E: Clone> Graph<E> {
    /// A graph whose body runs `micro` times per step.
    pub fn new(micro: usize) -> Graph<E> {
        Graph {
            decls: Vec::new(),
            nodes: Vec::new(),
            section: Section::Body,
            phase: Phase::Forward,
            micro: micro.max(1),
        }
    }

    /// Declares an activation whose memory the planner assigns.
    pub fn planned(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType) -> TensorId {
        self.declare(name.into(), shape, dtype, Storage::Planned)
    }

    fn declare(
        &mut self,
        name: String,
        shape: &[usize],
        dtype: DType,
        storage: Storage<E>,
    ) -> TensorId {
        self.decls.push(Decl {
            name,
            shape: shape.to_vec(),
            dtype,
            storage,
        });
        self.decls.len() - 1
    }

    /// Declares a tensor the caller owns, bound through `key` at compile time.
    pub fn input(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        key: E,
    ) -> TensorId {
        self.declare(name.into(), shape, dtype, Storage::Input(key))
    }

    /// Declares an input with one tensor per micro-step, bound through `key` at compile time.
    pub fn per_micro(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
        key: E,
    ) -> TensorId {
        self.declare(name.into(), shape, dtype, Storage::PerMicro(key))
    }

    pub fn shape(&self, id: TensorId) -> &[usize] {
        &self.decls[id].shape
    }

    pub fn dtype(&self, id: TensorId) -> DType {
        self.decls[id].dtype
    }

    /// Appends nodes to `section` from now on.
    pub fn section(&mut self, section: Section) {
        self.section = section;
    }

    /// Marks the nodes appended from now on as forward or backward.
    pub fn phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// Appends a node. `reads` and `writes` must list every tensor the dispatches touch (a
    /// tensor that is read and written, like an accumulator, goes in both).
    pub fn node(
        &mut self,
        label: impl Into<String>,
        family: &'static str,
        reads: &[TensorId],
        writes: &[TensorId],
        flops: f64,
        build: impl Fn(&Gpu, &Resolved) -> Result<Vec<Dispatch>> + 'static,
    ) {
        self.nodes.push((
            self.section,
            Node {
                label: label.into(),
                family,
                phase: self.phase,
                reads: reads.to_vec(),
                writes: writes.to_vec(),
                flops,
                build: Box::new(build),
            },
        ));
    }

    /// For each body node in execution order, the caller's tensors it writes (the gradient
    /// pieces a backward node accumulates into, ...): after the last micro-step's last writer of
    /// a gradient, it is final, and a data-parallel step may reduce it while the rest of the
    /// backward runs.
    pub fn body_writes(&self) -> Vec<Vec<E>> {
        self.execution_order()
            .into_iter()
            .filter(|&i| self.nodes[i].0 == Section::Body)
            .map(|i| {
                self.nodes[i]
                    .1
                    .writes
                    .iter()
                    .filter_map(|&t| match &self.decls[t].storage {
                        Storage::Input(e) | Storage::PerMicro(e) => Some(e.clone()),
                        Storage::Planned => None,
                    })
                    .collect()
            })
            .collect()
    }

    /// Nodes in execution order: head, body, tail.
    fn execution_order(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.nodes.len());
        for s in [Section::Head, Section::Body, Section::Tail] {
            order.extend((0..self.nodes.len()).filter(|&i| self.nodes[i].0 == s));
        }
        order
    }

    /// Plans the activations' memory: each planned tensor's lifetime, then [`pack`]. Needs no
    /// device.
    pub fn plan(&self) -> Result<ActivationPlan> {
        let order = self.execution_order();
        let n_decl = self.decls.len();
        let mut first = vec![usize::MAX; n_decl];
        let mut last = vec![0usize; n_decl];
        for (i, &k) in order.iter().enumerate() {
            let node = &self.nodes[k].1;
            for &id in node.reads.iter().chain(&node.writes) {
                if id >= n_decl {
                    return Err(Error::Other(format!(
                        "node {} uses an undeclared tensor",
                        node.label
                    )));
                }
                if first[id] == usize::MAX {
                    first[id] = i;
                    if matches!(self.decls[id].storage, Storage::Planned)
                        && node.reads.contains(&id)
                    {
                        return Err(Error::Other(format!(
                            "graph: {} reads {} before anything wrote it",
                            node.label, self.decls[id].name
                        )));
                    }
                }
                last[id] = i;
            }
        }
        let planned: Vec<TensorId> = (0..n_decl)
            .filter(|&i| {
                matches!(self.decls[i].storage, Storage::Planned) && first[i] != usize::MAX
            })
            .collect();
        let intervals: Vec<Interval> = planned
            .iter()
            .map(|&id| Interval {
                bytes: tensor_bytes(&self.decls[id]),
                first: first[id],
                last: last[id],
            })
            .collect();
        let packing = pack(&intervals);
        let mut slot = vec![None; n_decl];
        for (k, &id) in planned.iter().enumerate() {
            slot[id] = Some(packing.assign[k]);
        }
        let mut largest: Vec<Option<TensorId>> = vec![None; packing.slots.len()];
        for &id in &planned {
            let s = slot[id].expect("assigned above");
            let bigger = largest[s]
                .is_none_or(|l| tensor_bytes(&self.decls[id]) > tensor_bytes(&self.decls[l]));
            if bigger {
                largest[s] = Some(id);
            }
        }
        Ok(ActivationPlan {
            buffers: packing
                .slots
                .iter()
                .zip(&largest)
                .map(|(&bytes, l)| {
                    let name = l.map_or_else(String::new, |id| self.decls[id].name.clone());
                    (name, bytes)
                })
                .collect(),
            unshared_bytes: intervals.iter().map(|i| i.bytes).sum(),
            largest_tensor: planned
                .iter()
                .map(|&id| (self.decls[id].name.clone(), tensor_bytes(&self.decls[id])))
                .max_by_key(|(_, b)| *b),
            slot,
        })
    }

    /// Allocates the planned buffers, binds the inputs through `bindings` and builds every
    /// dispatch.
    pub fn compile(self, gpu: &Gpu, bindings: &Bindings<'_, E>) -> Result<CompiledGraph> {
        let plan = self.plan()?;
        let mut buffers = Vec::with_capacity(plan.buffers.len());
        for (i, (_, bytes)) in plan.buffers.iter().enumerate() {
            let t = gpu.zeros(
                &format!("activations.{i}"),
                &[*bytes as usize / 4],
                DType::F32,
            )?;
            buffers.push(t.buffer);
        }

        // Concrete tensors, one table per micro-step.
        let n_decl = self.decls.len();
        let mut tables: Vec<Vec<Tensor>> = Vec::with_capacity(self.micro);
        for k in 0..self.micro {
            let mut table = Vec::with_capacity(n_decl);
            for (id, d) in self.decls.iter().enumerate() {
                let t = match &d.storage {
                    Storage::Input(key) => bindings(key, 0)?,
                    Storage::PerMicro(key) => bindings(key, k)?,
                    Storage::Planned => {
                        let buffer = match plan.slot[id] {
                            // Declared but never used: give it a minimal buffer.
                            None => gpu.zeros(&d.name, &[1], DType::F32)?.buffer,
                            Some(slot) => buffers[slot].clone(),
                        };
                        Tensor {
                            buffer,
                            offset: 0,
                            shape: d.shape.clone(),
                            dtype: d.dtype,
                        }
                    }
                };
                if matches!(d.storage, Storage::Input(_) | Storage::PerMicro(_))
                    && (t.shape.iter().product::<usize>() != d.shape.iter().product::<usize>()
                        || t.dtype != d.dtype)
                {
                    return Err(Error::Other(format!(
                        "graph input {}: bound a {} tensor of shape {:?}, declared {} {:?}",
                        d.name,
                        t.dtype.name(),
                        t.shape,
                        d.dtype.name(),
                        d.shape
                    )));
                }
                table.push(t);
            }
            tables.push(table);
        }

        let mut compiled = CompiledGraph {
            head: Vec::new(),
            body: Vec::new(),
            tail: Vec::new(),
            micro: self.micro,
            planned_bytes: plan.bytes(),
            unplanned_bytes: plan.unshared_bytes,
        };
        let order = self.execution_order();
        let mut nodes: Vec<Option<(Section, Node)>> = self.nodes.into_iter().map(Some).collect();
        for k in order {
            let (section, node) = nodes[k].take().expect("each node once");
            let per_micro = node
                .reads
                .iter()
                .chain(&node.writes)
                .any(|&id| matches!(self.decls[id].storage, Storage::PerMicro(_)));
            let copies = if per_micro { self.micro } else { 1 };
            let mut built: Vec<Vec<Dispatch>> = Vec::with_capacity(copies);
            for table in tables.iter().take(copies) {
                let ds = (node.build)(gpu, &Resolved { tensors: table }).map_err(|e| match e {
                    Error::Shape { op, message } => Error::Shape {
                        op,
                        message: format!("{message} (at {})", node.label),
                    },
                    other => other,
                })?;
                built.push(
                    ds.into_iter()
                        .map(|d| d.named(node.label.clone()))
                        .collect(),
                );
            }
            let bytes = built[0].iter().map(|d| d.bytes as f64).sum();
            let c = CompiledNode {
                label: node.label,
                family: node.family,
                phase: node.phase,
                flops: node.flops,
                bytes,
                copies: built,
            };
            match section {
                Section::Head => compiled.head.push(c),
                Section::Body => compiled.body.push(c),
                Section::Tail => compiled.tail.push(c),
            }
        }
        Ok(compiled)
    }
}

/// The activations' memory: the packed buffers and which buffer each planned tensor uses.
#[derive(Clone, Debug)]
pub struct ActivationPlan {
    /// Each buffer's size, named after the largest tensor it holds.
    pub buffers: Vec<(String, u64)>,
    /// Bytes the same tensors would take without sharing.
    pub unshared_bytes: u64,
    /// The largest planned tensor (name, bytes): what a binding must be able to hold.
    pub largest_tensor: Option<(String, u64)>,
    slot: Vec<Option<usize>>,
}

impl ActivationPlan {
    /// Bytes of all packed buffers.
    pub fn bytes(&self) -> u64 {
        self.buffers.iter().map(|(_, b)| b).sum()
    }
}

/// A planned tensor for [`pack`]: its size and the first and last node (in execution order) that
/// use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub bytes: u64,
    pub first: usize,
    pub last: usize,
}

/// The result of [`pack`]: buffer sizes, and each interval's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    pub slots: Vec<u64>,
    pub assign: Vec<usize>,
}

/// Packs tensors into shared buffers: walking them by first use (largest first among equals),
/// each takes the smallest free buffer that is large enough (free: its last tensor's lifetime
/// ended before this one's begins), else a new buffer of its own size. Two tensors share a
/// buffer only if their lifetimes do not overlap.
pub fn pack(intervals: &[Interval]) -> Packing {
    let mut order: Vec<usize> = (0..intervals.len()).collect();
    order.sort_by_key(|&i| (intervals[i].first, std::cmp::Reverse(intervals[i].bytes)));
    let mut slots: Vec<u64> = Vec::new();
    let mut busy_until: Vec<usize> = Vec::new();
    let mut assign = vec![0; intervals.len()];
    for i in order {
        let iv = intervals[i];
        let candidate = (0..slots.len())
            .filter(|&s| busy_until[s] < iv.first && slots[s] >= iv.bytes)
            .min_by_key(|&s| slots[s]);
        let s = match candidate {
            Some(s) => s,
            None => {
                slots.push(iv.bytes);
                busy_until.push(0);
                slots.len() - 1
            }
        };
        busy_until[s] = iv.last;
        assign[i] = s;
    }
    Packing { slots, assign }
}

fn tensor_bytes<E>(d: &Decl<E>) -> u64 {
    let n: usize = d.shape.iter().product();
    ((n * d.dtype.size()) as u64).div_ceil(256).max(1) * 256
}

/// A node with its dispatches built: one copy, or one per micro-step.
pub struct CompiledNode {
    pub label: String,
    pub family: &'static str,
    pub phase: Phase,
    pub flops: f64,
    /// Bytes of the tensors its dispatches bind (each once per dispatch).
    pub bytes: f64,
    copies: Vec<Vec<Dispatch>>,
}

impl CompiledNode {
    fn dispatches(&self, micro: usize) -> &[Dispatch] {
        &self.copies[micro.min(self.copies.len() - 1)]
    }
}

/// A node in a step's recording order, with the micro-step whose copy runs.
#[derive(Clone, Copy)]
pub struct Scheduled<'a> {
    pub node: &'a CompiledNode,
    pub micro: usize,
}

impl Scheduled<'_> {
    /// Its dispatches.
    pub fn dispatches(&self) -> &[Dispatch] {
        self.node.dispatches(self.micro)
    }
}

/// Timestamps written between the nodes of a step (profiling): node `i` of the step's schedule
/// starts at query `i + offset` and the step ends at query `n + offset`; queries from
/// `capacity` on are not written. (`offset` 1 leaves a query for a pause inside the step: see
/// [`crate::gpu::profile::Profiler::begin_step`].)
#[derive(Clone, Copy)]
pub struct Marks<'a> {
    pub query_set: &'a wgpu::QuerySet,
    pub capacity: u32,
    pub offset: usize,
}

impl Marks<'_> {
    /// The same marks with queries shifted by `by` more.
    pub fn shifted(self, by: usize) -> Self {
        Marks {
            offset: self.offset + by,
            ..self
        }
    }

    fn write(&self, pass: &mut wgpu::ComputePass<'_>, index: usize) {
        if let Ok(i) = u32::try_from(index + self.offset) {
            if i < self.capacity {
                pass.write_timestamp(self.query_set, i);
            }
        }
    }
}

/// Records `nodes`, the run of a step's schedule that starts at node `first`, into `pass`;
/// with `marks`, a timestamp before each node and, when `end` says the run ends the step, one
/// after it.
pub fn record_run(
    pass: &mut wgpu::ComputePass<'_>,
    nodes: &[Scheduled<'_>],
    first: usize,
    marks: Option<Marks<'_>>,
    end: bool,
) {
    for (i, s) in nodes.iter().enumerate() {
        if let Some(m) = marks {
            m.write(pass, first + i);
        }
        for d in s.dispatches() {
            d.record(pass);
        }
    }
    if let (Some(m), true) = (marks, end) {
        m.write(pass, first + nodes.len());
    }
}

/// Dispatches below which a run is not split off: each run costs a thread and a command buffer.
const MIN_DISPATCHES_PER_RUN: usize = 96;

/// The most threads that record one step.
const MAX_RECORDING_THREADS: usize = 4;

/// Threads that record a step: `WGPT_RECORDING_THREADS` when set; else one per core up to
/// [`MAX_RECORDING_THREADS`] on a GPU, and one on a CPU adapter, where the cores that would
/// record the next step are the ones running the present one.
pub fn recording_threads(gpu: &Gpu) -> usize {
    if let Some(n) = std::env::var("WGPT_RECORDING_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        return n.max(1);
    }
    if gpu.info.device_type == wgpu::DeviceType::Cpu {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_RECORDING_THREADS))
}

/// Splits `nodes` at node boundaries into at most `runs` runs of about equal dispatch counts;
/// returns each run's first node index (the first is 0) in order.
fn split_runs(nodes: &[Scheduled<'_>], runs: usize) -> Vec<usize> {
    let total: usize = nodes.iter().map(|s| s.dispatches().len()).sum();
    let mut starts = vec![0];
    let mut seen = 0;
    for (i, s) in nodes.iter().enumerate() {
        let next = starts.len();
        if next < runs && i > 0 && seen * runs >= next * total {
            starts.push(i);
        }
        seen += s.dispatches().len();
    }
    starts
}

/// Records `nodes[range]` (of a step's schedule, see [`CompiledGraph::schedule`]) into command
/// buffers to be submitted in order. wgpu's encoding of a compute pass (its resource tracking
/// and barriers) costs the CPU a few microseconds per dispatch, most of a step's host time; so a
/// range of many dispatches is split into runs recorded at once on up to `threads` threads. The
/// same dispatches in the same order either way, so the results are the same. With `marks`,
/// timestamps as [`record_run`] writes them, and one after the range when `end_mark`.
pub fn encode_schedule(
    gpu: &Gpu,
    label: &str,
    nodes: &[Scheduled<'_>],
    range: std::ops::Range<usize>,
    marks: Option<Marks<'_>>,
    end_mark: bool,
    threads: usize,
) -> Result<Vec<wgpu::CommandBuffer>> {
    let part = &nodes[range.clone()];
    let dispatches: usize = part.iter().map(|s| s.dispatches().len()).sum();
    let runs = (dispatches / MIN_DISPATCHES_PER_RUN).clamp(1, threads.max(1));
    let mut starts = split_runs(part, runs);
    starts.push(part.len());
    let encode_run = |w: &[usize]| {
        let (a, b) = (w[0], w[1]);
        gpu.scoped(label, || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(label),
                    timestamp_writes: None,
                });
                let end = end_mark && b == part.len();
                record_run(&mut pass, &part[a..b], range.start + a, marks, end);
            }
            enc.finish()
        })
    };
    if starts.len() == 2 {
        return Ok(vec![encode_run(&starts)?]);
    }
    std::thread::scope(|scope| {
        let others: Vec<_> = starts[1..]
            .windows(2)
            .map(|w| scope.spawn(move || encode_run(w)))
            .collect();
        let mut buffers = vec![encode_run(&starts[..2])?];
        for h in others {
            buffers
                .push(h.join().map_err(|_| {
                    Error::Other(format!("{label}: a recording thread panicked"))
                })??);
        }
        Ok(buffers)
    })
}

/// A compiled step.
pub struct CompiledGraph {
    pub head: Vec<CompiledNode>,
    pub body: Vec<CompiledNode>,
    pub tail: Vec<CompiledNode>,
    pub micro: usize,
    /// Bytes of activation buffers after packing.
    pub planned_bytes: u64,
    /// Bytes the same activations would take without sharing.
    pub unplanned_bytes: u64,
}

impl CompiledGraph {
    /// The nodes of a step in recording order: head, the body once per micro-step, and the
    /// tail (the optimiser) when `include_tail`.
    pub fn schedule(&self, include_tail: bool) -> Vec<Scheduled<'_>> {
        let at = |micro: usize| move |node| Scheduled { node, micro };
        let mut v: Vec<Scheduled<'_>> = self.head.iter().map(at(0)).collect();
        for k in 0..self.micro {
            v.extend(self.body.iter().map(at(k)));
        }
        if include_tail {
            v.extend(self.tail.iter().map(at(0)));
        }
        v
    }

    /// Records a whole step into `pass`.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        record_run(pass, &self.schedule(true), 0, None, true);
    }

    /// Records the forward pass of micro-step `k` alone: the body's forward nodes, which end
    /// with the per-position losses (an evaluation: no gradients, no update).
    pub fn record_forward(&self, pass: &mut wgpu::ComputePass<'_>, k: usize) {
        for n in self.body.iter().filter(|n| n.phase == Phase::Forward) {
            for d in n.dispatches(k) {
                d.record(pass);
            }
        }
    }

    /// Dispatches recorded per step.
    pub fn dispatch_count(&self) -> usize {
        self.schedule(true)
            .iter()
            .map(|s| s.dispatches().len())
            .sum()
    }

    /// Model FLOPs of one step (sum of the nodes' estimates).
    pub fn flops(&self) -> f64 {
        self.schedule(true).iter().map(|s| s.node.flops).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(bytes: u64, first: usize, last: usize) -> Interval {
        Interval { bytes, first, last }
    }

    #[test]
    fn chain_reuses_disjoint_intermediates() {
        // a -> b -> c -> d, each read only by the next: two buffers alternate.
        let p = pack(&[iv(100, 0, 1), iv(100, 1, 2), iv(100, 2, 3), iv(100, 3, 4)]);
        assert_eq!(p.slots, [100, 100]);
        assert_eq!(p.assign, [0, 1, 0, 1]);
    }

    #[test]
    fn overlapping_lifetimes_never_share() {
        let ivs = [
            iv(64, 0, 9),
            iv(32, 2, 5),
            iv(128, 3, 4),
            iv(16, 6, 8),
            iv(256, 5, 7),
        ];
        let p = pack(&ivs);
        for i in 0..ivs.len() {
            assert!(p.slots[p.assign[i]] >= ivs[i].bytes, "buffer too small");
            for j in 0..i {
                let overlap = ivs[i].first <= ivs[j].last && ivs[j].first <= ivs[i].last;
                if overlap {
                    assert_ne!(p.assign[i], p.assign[j], "{i} and {j} overlap");
                }
            }
        }
        // The 16-byte tensor reuses the 32-byte buffer freed at node 5.
        assert_eq!(p.assign[3], p.assign[1]);
        assert_eq!(p.slots.iter().sum::<u64>(), 64 + 32 + 128 + 256);
    }
}
