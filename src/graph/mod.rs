//! The graph executor: a model step as a static list of dispatches over planned buffers.
//!
//! A [`Graph`] is built once, without a device: tensors are declared (planned activations, state
//! the graph allocates and keeps from step to step, inputs the caller owns, named by a key of the
//! caller's type `E` and bound at compile time, and views of any of them), then operations
//! ([`Op`]) are appended in execution order; each names the tensors it reads and writes.
//! [`Graph::plan`] computes every planned tensor's lifetime (first to last node that touches it)
//! and packs tensors whose lifetimes do not overlap into shared buffers ([`pack`], a pure
//! function); that is all a memory plan needs. [`Graph::compile`] allocates the packed buffers and
//! the state, binds the inputs and makes every bind group once, checking that each node binds
//! only the tensors its op declares. A step then only records the prepared dispatches: `head`
//! once, `body` once per micro-step (with that micro-step's inputs), `tail` once.

pub mod gpt;
pub mod layers;
pub mod op;
pub mod record;
pub mod step;

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, Tensor};
pub use op::{Family, Op};
pub use record::{encode_schedule, record_run, recording_threads, Marks};
use std::cell::RefCell;

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
    /// Allocated by the graph at compile time and kept from step to step (step scalars, the
    /// classifier's logits); with `per_micro`, one instance per micro-step (token ids).
    State { per_micro: bool },
    /// A tensor owned by the caller (parameter views, optimiser moments), the same in every
    /// micro-step.
    Input(E),
    /// `shape` elements of another tensor from element `offset` on.
    View { parent: TensorId, offset: usize },
}

struct Decl<E> {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage<E>,
}

struct Node {
    label: String,
    phase: Phase,
    op: Op,
}

/// The tensors of a graph as an op's lowering sees them. Binding a tensor the op does not
/// declare is recorded, and compiling fails on it: an undeclared read would let the planner give
/// a live tensor's memory to another.
pub struct Resolved<'a> {
    tensors: &'a [Tensor],
    declared: &'a [TensorId],
    undeclared: RefCell<Vec<TensorId>>,
}

impl Resolved<'_> {
    pub fn t(&self, id: TensorId) -> &Tensor {
        if !self.declared.contains(&id) {
            self.undeclared.borrow_mut().push(id);
        }
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

/// How to find the caller's tensor for an input key.
pub type Bindings<'a, E> = dyn Fn(&E) -> Result<Tensor> + 'a;

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

    /// Declares state: a tensor the graph allocates (zeroed) at compile time and keeps between
    /// steps ([`CompiledGraph::tensor`] gives it to the caller).
    pub fn state(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType) -> TensorId {
        self.declare(
            name.into(),
            shape,
            dtype,
            Storage::State { per_micro: false },
        )
    }

    /// Declares state with one instance per micro-step (a micro-batch's token ids).
    pub fn per_micro(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        dtype: DType,
    ) -> TensorId {
        self.declare(
            name.into(),
            shape,
            dtype,
            Storage::State { per_micro: true },
        )
    }

    /// Declares a view: `shape` elements of `parent` from element `offset` on. Reading or
    /// writing the view counts as reading or writing its parent.
    pub fn view(&mut self, parent: TensorId, offset: usize, shape: &[usize]) -> TensorId {
        let d = &self.decls[parent];
        let name = format!("{}[{offset}..]", d.name);
        let dtype = d.dtype;
        self.declare(name, shape, dtype, Storage::View { parent, offset })
    }

    /// The tensor a view ultimately shows (a tensor itself otherwise).
    fn root(&self, mut id: TensorId) -> TensorId {
        while let Storage::View { parent, .. } = self.decls[id].storage {
            id = parent;
        }
        id
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

    /// Appends an operation, labelled for profiles and errors.
    pub fn push(&mut self, label: impl Into<String>, op: Op) {
        self.nodes.push((
            self.section,
            Node {
                label: label.into(),
                phase: self.phase,
                op,
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
                    .op
                    .writes()
                    .iter()
                    .filter_map(|&t| match &self.decls[self.root(t)].storage {
                        Storage::Input(e) => Some(e.clone()),
                        _ => None,
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
            let reads = node.op.reads();
            for &id in reads.iter().chain(&node.op.writes()) {
                if id >= n_decl {
                    return Err(Error::Other(format!(
                        "node {} uses an undeclared tensor",
                        node.label
                    )));
                }
                let root = self.root(id);
                if first[root] == usize::MAX {
                    first[root] = i;
                    if matches!(self.decls[root].storage, Storage::Planned)
                        && reads.iter().any(|&r| self.root(r) == root)
                    {
                        return Err(Error::Other(format!(
                            "graph: {} reads {} before anything wrote it",
                            node.label, self.decls[root].name
                        )));
                    }
                }
                last[root] = i;
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

    /// Bytes of the state the graph allocates at compile time.
    pub fn state_bytes(&self) -> u64 {
        self.decls
            .iter()
            .map(|d| match d.storage {
                Storage::State { per_micro } => {
                    tensor_bytes(d) * if per_micro { self.micro as u64 } else { 1 }
                }
                _ => 0,
            })
            .sum()
    }

    /// Allocates the planned buffers and the state, binds the inputs through `bindings` and
    /// builds every dispatch.
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
        let align = gpu.alignment();
        let mut tables: Vec<Vec<Tensor>> = Vec::with_capacity(self.micro);
        for k in 0..self.micro {
            let mut table: Vec<Tensor> = Vec::with_capacity(n_decl);
            for (id, d) in self.decls.iter().enumerate() {
                let t = match &d.storage {
                    Storage::Input(key) => {
                        let t = bindings(key)?;
                        if t.shape.iter().product::<usize>() != d.shape.iter().product::<usize>()
                            || t.dtype != d.dtype
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
                        t
                    }
                    Storage::State { per_micro } => {
                        if k == 0 || *per_micro {
                            let name = match per_micro {
                                true => format!("{} {k}", d.name),
                                false => d.name.clone(),
                            };
                            gpu.zeros(&name, &d.shape, d.dtype)?
                        } else {
                            tables[0][id].clone()
                        }
                    }
                    Storage::View { parent, offset } => {
                        table[*parent].slice(*offset, &d.shape, align)?
                    }
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
            tensors: Vec::new(),
        };
        let order = self.execution_order();
        let shape = |id: TensorId| self.decls[id].shape.clone();
        let per_micro_root = |id: TensorId| {
            matches!(
                self.decls[self.root(id)].storage,
                Storage::State { per_micro: true }
            )
        };
        for k in order {
            let (section, node) = &self.nodes[k];
            let mut declared = node.op.reads();
            declared.extend(node.op.writes());
            let copies = if declared.iter().any(|&id| per_micro_root(id)) {
                self.micro
            } else {
                1
            };
            let mut built: Vec<Vec<Dispatch>> = Vec::with_capacity(copies);
            for table in tables.iter().take(copies) {
                let r = Resolved {
                    tensors: table,
                    declared: &declared,
                    undeclared: RefCell::new(Vec::new()),
                };
                let ds = node.op.lower(gpu, &r).map_err(|e| match e {
                    Error::Shape { op, message } => Error::Shape {
                        op,
                        message: format!("{message} (at {})", node.label),
                    },
                    other => other,
                })?;
                if let Some(&id) = r.undeclared.borrow().first() {
                    return Err(Error::Other(format!(
                        "graph: {} binds {}, which its op does not declare",
                        node.label, self.decls[id].name
                    )));
                }
                built.push(
                    ds.into_iter()
                        .map(|d| d.named(node.label.clone()))
                        .collect(),
                );
            }
            let bytes = built[0].iter().map(|d| d.bytes as f64).sum();
            let c = CompiledNode {
                label: node.label.clone(),
                family: node.op.family().name(),
                phase: node.phase,
                flops: node.op.flops(shape),
                bytes,
                copies: built,
            };
            match section {
                Section::Head => compiled.head.push(c),
                Section::Body => compiled.body.push(c),
                Section::Tail => compiled.tail.push(c),
            }
        }
        compiled.tensors = tables;
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
    /// Every declared tensor, one table per micro-step.
    tensors: Vec<Vec<Tensor>>,
}

impl CompiledGraph {
    /// Tensor `id` as micro-step `micro` binds it (state the caller reads or writes: token ids,
    /// the loss, ...).
    pub fn tensor(&self, id: TensorId, micro: usize) -> &Tensor {
        &self.tensors[micro.min(self.tensors.len() - 1)][id]
    }

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
    use crate::gpu::GpuOptions;

    /// A node whose launcher binds a tensor its op does not declare is refused at compile time:
    /// the planner, not knowing of the read, has given that tensor's memory to another.
    #[test]
    fn binding_an_undeclared_tensor_is_refused() {
        let gpu = Gpu::new(&GpuOptions::default()).expect("a Vulkan adapter");
        let graph = |declare_b: bool| {
            let mut g: Graph<()> = Graph::new(1);
            let a = g.planned("a", &[64], DType::F32);
            let b = g.planned("b", &[64], DType::F32);
            let c = g.planned("c", &[64], DType::F32);
            g.push("write b", Op::Fill { out: b, value: 1.0 });
            g.push("write a", Op::Fill { out: a, value: 2.0 });
            g.push("write c", Op::Fill { out: c, value: 3.0 });
            let reads = if declare_b { vec![a, b, c] } else { vec![a, c] };
            g.push(
                "probe",
                Op::Probe {
                    reads,
                    binds: vec![a, b, c],
                },
            );
            g
        };
        let no_inputs = |_: &()| -> Result<Tensor> { Err(Error::Other("no inputs".into())) };
        // Undeclared, b's life ends at its write, and a, written next, takes its buffer.
        let plan = graph(false).plan().unwrap();
        assert_eq!(plan.slot[0], plan.slot[1], "a and b share: {:?}", plan.slot);
        let err = graph(false)
            .compile(&gpu, &no_inputs)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("probe binds b"), "{err}");
        let plan = graph(true).plan().unwrap();
        assert_ne!(plan.slot[0], plan.slot[1], "b is live until the probe");
        graph(true)
            .compile(&gpu, &no_inputs)
            .expect("every binding declared");
    }

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
