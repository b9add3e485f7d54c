//! The graph executor: a model step as a static list of dispatches over planned buffers.
//!
//! A [`Graph`] is built once: tensors are declared (planned activations, fixed tensors such as
//! parameter views, and per-micro-step inputs), then nodes are appended in execution order, each
//! naming the tensors it reads and writes and how to build its dispatches. [`Graph::compile`]
//! computes every planned tensor's lifetime (first to last node that touches it), packs tensors
//! whose lifetimes do not overlap into shared buffers, and makes every bind group once. A step
//! then only records the prepared dispatches: `head` once, `body` once per micro-step (with that
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

enum Storage {
    /// An activation: memory assigned by the planner.
    Planned,
    /// A tensor owned by the caller (parameter views, optimiser state, step scalars).
    Fixed(Tensor),
    /// One tensor per micro-step (token ids, targets).
    PerMicro(Vec<Tensor>),
}

struct Decl {
    name: String,
    shape: Vec<usize>,
    dtype: DType,
    storage: Storage,
}

type BuildFn = Box<dyn Fn(&Gpu, &Resolved) -> Result<Vec<Dispatch>>>;

struct Node {
    label: String,
    family: &'static str,
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

/// A graph under construction.
pub struct Graph {
    decls: Vec<Decl>,
    nodes: Vec<(Section, Node)>,
    section: Section,
    micro: usize,
}

impl Graph {
    /// A graph whose body runs `micro` times per step.
    pub fn new(micro: usize) -> Graph {
        Graph {
            decls: Vec::new(),
            nodes: Vec::new(),
            section: Section::Body,
            micro: micro.max(1),
        }
    }

    /// Declares an activation whose memory the planner assigns.
    pub fn planned(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType) -> TensorId {
        self.decls.push(Decl {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            storage: Storage::Planned,
        });
        self.decls.len() - 1
    }

    /// Declares a tensor owned by the caller.
    pub fn fixed(&mut self, name: impl Into<String>, tensor: &Tensor) -> TensorId {
        self.decls.push(Decl {
            name: name.into(),
            shape: tensor.shape.clone(),
            dtype: tensor.dtype,
            storage: Storage::Fixed(tensor.clone()),
        });
        self.decls.len() - 1
    }

    /// Declares an input with one tensor per micro-step.
    pub fn per_micro(&mut self, name: impl Into<String>, tensors: &[Tensor]) -> Result<TensorId> {
        let name = name.into();
        if tensors.len() != self.micro {
            return Err(Error::Other(format!(
                "graph input {name}: {} tensors for {} micro-steps",
                tensors.len(),
                self.micro
            )));
        }
        self.decls.push(Decl {
            name,
            shape: tensors[0].shape.clone(),
            dtype: tensors[0].dtype,
            storage: Storage::PerMicro(tensors.to_vec()),
        });
        Ok(self.decls.len() - 1)
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
                reads: reads.to_vec(),
                writes: writes.to_vec(),
                flops,
                build: Box::new(build),
            },
        ));
    }

    /// Plans memory and builds every dispatch.
    pub fn compile(self, gpu: &Gpu) -> Result<CompiledGraph> {
        // Execution order: head, body, tail.
        let mut order: Vec<(Section, Node)> = Vec::with_capacity(self.nodes.len());
        let mut rest = self.nodes;
        for s in [Section::Head, Section::Body, Section::Tail] {
            let (now, later): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(sec, _)| *sec == s);
            order.extend(now);
            rest = later;
        }

        // Lifetimes of planned tensors.
        let n_decl = self.decls.len();
        let mut first = vec![usize::MAX; n_decl];
        let mut last = vec![0usize; n_decl];
        for (i, (_, node)) in order.iter().enumerate() {
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

        // Interval packing: walk planned tensors by first use; reuse the smallest free buffer
        // that is large enough, else make a new one.
        struct Phys {
            bytes: u64,
            busy_until: usize,
            buffer: Option<wgpu::Buffer>,
        }
        let mut phys: Vec<Phys> = Vec::new();
        let mut assign = vec![usize::MAX; n_decl];
        let mut planned: Vec<TensorId> = (0..n_decl)
            .filter(|&i| {
                matches!(self.decls[i].storage, Storage::Planned) && first[i] != usize::MAX
            })
            .collect();
        planned.sort_by_key(|&i| (first[i], std::cmp::Reverse(tensor_bytes(&self.decls[i]))));
        for &id in &planned {
            let bytes = tensor_bytes(&self.decls[id]);
            let candidate = phys
                .iter()
                .enumerate()
                .filter(|(_, p)| p.busy_until < first[id] && p.bytes >= bytes)
                .min_by_key(|(_, p)| p.bytes)
                .map(|(i, _)| i);
            let slot = match candidate {
                Some(s) => s,
                None => {
                    phys.push(Phys {
                        bytes,
                        busy_until: 0,
                        buffer: None,
                    });
                    phys.len() - 1
                }
            };
            phys[slot].busy_until = last[id];
            assign[id] = slot;
        }
        let mut planned_bytes = 0;
        let mut unplanned_bytes = 0;
        for &id in &planned {
            unplanned_bytes += tensor_bytes(&self.decls[id]);
        }
        for (i, p) in phys.iter_mut().enumerate() {
            planned_bytes += p.bytes;
            let t = gpu.zeros(
                &format!("activations.{i}"),
                &[p.bytes as usize / 4],
                DType::F32,
            )?;
            p.buffer = Some(t.buffer);
        }

        // Concrete tensors, one table per micro-step.
        let mut tables: Vec<Vec<Tensor>> = Vec::with_capacity(self.micro);
        for k in 0..self.micro {
            let mut table = Vec::with_capacity(n_decl);
            for (id, d) in self.decls.iter().enumerate() {
                let t = match &d.storage {
                    Storage::Fixed(t) => t.clone(),
                    Storage::PerMicro(ts) => ts[k].clone(),
                    Storage::Planned => {
                        let buffer = match assign[id] {
                            usize::MAX => {
                                // Declared but never used: give it a minimal buffer.
                                gpu.zeros(&d.name, &[1], DType::F32)?.buffer
                            }
                            slot => phys[slot].buffer.clone().expect("allocated above"),
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
            planned_bytes,
            unplanned_bytes,
        };
        for (section, node) in order {
            let per_micro = node
                .reads
                .iter()
                .chain(&node.writes)
                .any(|&id| matches!(self.decls[id].storage, Storage::PerMicro(_)));
            let copies = if per_micro { self.micro } else { 1 };
            let mut built = Vec::with_capacity(copies);
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
            let c = CompiledNode {
                label: node.label,
                family: node.family,
                flops: node.flops,
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

fn tensor_bytes(d: &Decl) -> u64 {
    let n: usize = d.shape.iter().product();
    ((n * d.dtype.size()) as u64).div_ceil(256).max(1) * 256
}

/// A node with its dispatches built: one copy, or one per micro-step.
pub struct CompiledNode {
    pub label: String,
    pub family: &'static str,
    pub flops: f64,
    copies: Vec<Vec<Dispatch>>,
}

impl CompiledNode {
    fn dispatches(&self, micro: usize) -> &[Dispatch] {
        &self.copies[micro.min(self.copies.len() - 1)]
    }
}

/// Something that wants to know where each node starts and ends (timestamp profiling).
pub trait NodeObserver {
    fn before(&mut self, pass: &mut wgpu::ComputePass<'_>, node: &CompiledNode);
    fn after_all(&mut self, pass: &mut wgpu::ComputePass<'_>);
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
    /// Records a whole step into `pass`.
    pub fn record(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        mut observer: Option<&mut dyn NodeObserver>,
    ) {
        let mut emit = |pass: &mut wgpu::ComputePass<'_>, node: &CompiledNode, k: usize| {
            if let Some(o) = observer.as_deref_mut() {
                o.before(pass, node);
            }
            for d in node.dispatches(k) {
                d.record(pass);
            }
        };
        for n in &self.head {
            emit(pass, n, 0);
        }
        for k in 0..self.micro {
            for n in &self.body {
                emit(pass, n, k);
            }
        }
        for n in &self.tail {
            emit(pass, n, 0);
        }
        if let Some(o) = observer {
            o.after_all(pass);
        }
    }

    /// Records head and body only (forward and backward, no optimiser step).
    pub fn record_without_tail(&self, pass: &mut wgpu::ComputePass<'_>) {
        for n in &self.head {
            for d in n.dispatches(0) {
                d.record(pass);
            }
        }
        for k in 0..self.micro {
            for n in &self.body {
                for d in n.dispatches(k) {
                    d.record(pass);
                }
            }
        }
    }

    /// Dispatches recorded per step.
    pub fn dispatch_count(&self) -> usize {
        let count = |nodes: &[CompiledNode], k: usize| -> usize {
            nodes.iter().map(|n| n.dispatches(k).len()).sum()
        };
        count(&self.head, 0)
            + (0..self.micro).map(|k| count(&self.body, k)).sum::<usize>()
            + count(&self.tail, 0)
    }

    /// Nodes recorded per step, in order.
    pub fn node_sequence(&self) -> Vec<&CompiledNode> {
        let mut v: Vec<&CompiledNode> = self.head.iter().collect();
        for _ in 0..self.micro {
            v.extend(self.body.iter());
        }
        v.extend(self.tail.iter());
        v
    }

    /// Model FLOPs of one step (sum of the nodes' estimates).
    pub fn flops(&self) -> f64 {
        self.node_sequence().iter().map(|n| n.flops).sum()
    }
}
