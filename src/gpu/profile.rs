//! Per-node GPU time from timestamp queries written between dispatches.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{Marks, Scheduled};
use std::collections::BTreeMap;

/// Writes a timestamp before every node of a step and one at the end; after the step,
/// [`Profiler::read`] turns them into time per node.
pub struct Profiler {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    capacity: u32,
    labels: Vec<(String, &'static str, f64, f64)>,
    written: u32,
    overflowed: bool,
    period_ns: f64,
    span_ns: Option<(f64, f64)>,
}

/// Time of one node in one step.
#[derive(Clone, Debug)]
pub struct NodeTime {
    pub label: String,
    pub family: &'static str,
    pub flops: f64,
    /// Bytes of the tensors it binds (a lower bound on its memory traffic).
    pub bytes: f64,
    pub ms: f64,
}

impl Profiler {
    /// A profiler for steps of at most `capacity - 1` nodes. Needs TIMESTAMP_QUERY and
    /// TIMESTAMP_QUERY_INSIDE_PASSES.
    pub fn new(gpu: &Gpu, capacity: usize) -> Result<Profiler> {
        let need = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        if !gpu.features.contains(need) {
            return Err(Error::Gpu(format!(
                "the adapter '{}' cannot write timestamps inside compute passes; --profile needs TIMESTAMP_QUERY_INSIDE_PASSES",
                gpu.info.name
            )));
        }
        let capacity = (capacity as u32).clamp(2, wgpu::QUERY_SET_MAX_QUERIES);
        let query_set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: capacity,
        });
        let bytes = capacity as u64 * 8;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profile read-back"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Profiler {
            query_set,
            resolve,
            staging,
            capacity,
            labels: Vec::new(),
            written: 0,
            overflowed: false,
            period_ns: gpu.queue.get_timestamp_period() as f64,
            span_ns: None,
        })
    }

    /// Readies the profiler for a step that records `nodes` (its schedule) and returns the
    /// timestamps to write: one before each node and one at the end, as far as the query set
    /// holds them (see [`Profiler::overflowed`]). With `pause` = (i, label, family), the step
    /// pauses before node i (a data-parallel step's gradient exchange through the host): the
    /// pause is timed as a node of its own, whose start the marks write as the end of node i-1;
    /// nodes from i on then take the marks shifted by one ([`Marks::shifted`]).
    pub fn begin_step(
        &mut self,
        nodes: &[Scheduled<'_>],
        pause: Option<(usize, &str, &'static str)>,
    ) -> Marks<'_> {
        let mut labels: Vec<_> = nodes
            .iter()
            .map(|s| {
                (
                    s.node.label.clone(),
                    s.node.family,
                    s.node.flops,
                    s.node.bytes,
                )
            })
            .collect();
        if let Some((at, label, family)) = pause {
            labels.insert(at.min(labels.len()), (label.to_string(), family, 0.0, 0.0));
        }
        let wanted = labels.len() + 1;
        self.overflowed = wanted > self.capacity as usize;
        self.written = wanted.min(self.capacity as usize) as u32;
        labels.truncate(self.written as usize - 1);
        self.labels = labels;
        Marks {
            query_set: &self.query_set,
            capacity: self.written,
            offset: 0,
        }
    }

    /// Copies the timestamps into the read-back buffer (after the pass, in the same encoder).
    pub fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        if self.written == 0 {
            return;
        }
        encoder.resolve_query_set(&self.query_set, 0..self.written, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.staging, 0, self.written as u64 * 8);
    }

    /// Reads the step's node times (after the submission finished) and resets for the next step.
    pub fn read(&mut self, gpu: &Gpu) -> Result<Vec<NodeTime>> {
        self.read_after(gpu, None)
    }

    /// [`Profiler::read`] waiting only for submission `index`. Also keeps the step's first and
    /// last timestamps ([`Profiler::span_ns`]).
    pub fn read_after(
        &mut self,
        gpu: &Gpu,
        index: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<NodeTime>> {
        let n = self.written as usize;
        let mut out = Vec::new();
        self.span_ns = None;
        if n >= 2 {
            let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&gpu.map_read_after(
                &self.staging,
                n as u64 * 8,
                index,
            )?);
            self.span_ns = Some((
                ticks[0] as f64 * self.period_ns,
                ticks[n - 1] as f64 * self.period_ns,
            ));
            for i in 0..n - 1 {
                let (label, family, flops, bytes) = self.labels[i].clone();
                let dt = ticks[i + 1].saturating_sub(ticks[i]) as f64 * self.period_ns * 1e-6;
                out.push(NodeTime {
                    label,
                    family,
                    flops,
                    bytes,
                    ms: dt,
                });
            }
        }
        self.labels.clear();
        self.written = 0;
        Ok(out)
    }

    /// The first and last timestamps of the step last read, in ns on the GPU's clock (the same
    /// clock for every submission to the queue, so the gap between steps is GPU idle time).
    pub fn span_ns(&self) -> Option<(f64, f64)> {
        self.span_ns
    }

    /// Whether the step had more nodes than the query set holds (later nodes went unmeasured).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }
}

/// One op family's share of the profiled steps.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FamilyTime {
    pub family: &'static str,
    pub ms: f64,
    pub flops: f64,
    pub bytes: f64,
}

impl FamilyTime {
    /// The roofline's lower bound on its time (ms) on an adapter of `peak_flops` FLOP/s and
    /// `peak_bytes` B/s: whichever of compute and memory traffic takes longer.
    pub fn roofline_ms(&self, peak_flops: f64, peak_bytes: f64) -> f64 {
        (self.flops / peak_flops).max(self.bytes / peak_bytes) * 1e3
    }
}

/// Sums node times per op family, largest time first.
pub fn by_family(times: &[NodeTime]) -> Vec<FamilyTime> {
    let mut m: BTreeMap<&'static str, FamilyTime> = BTreeMap::new();
    for t in times {
        let e = m.entry(t.family).or_insert(FamilyTime {
            family: t.family,
            ..Default::default()
        });
        e.ms += t.ms;
        e.flops += t.flops;
        e.bytes += t.bytes;
    }
    let mut v: Vec<_> = m.into_values().collect();
    v.sort_by(|a, b| b.ms.total_cmp(&a.ms));
    v
}

/// Dense f16 tensor-core FLOP/s and memory bandwidth (B/s) of a few well-known GPUs, by name.
pub fn known_peaks(adapter_name: &str) -> Option<(f64, f64)> {
    let n = adapter_name.to_lowercase();
    let (tflops, tbps) = if n.contains("h200") {
        (989.0, 4.8)
    } else if n.contains("h100") || n.contains("gh200") {
        (989.0, 3.35)
    } else if n.contains("a100") {
        (312.0, 2.0)
    } else if n.contains("l40") {
        (181.0, 0.864)
    } else if n.contains("4090") {
        (165.0, 1.008)
    } else {
        return None;
    };
    Some((tflops * 1e12, tbps * 1e12))
}
