//! Per-node GPU time from timestamp queries written between dispatches.

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::graph::{CompiledNode, NodeObserver};
use std::collections::BTreeMap;

/// Writes a timestamp before every node of a step and one at the end; after the step,
/// [`Profiler::read`] turns them into time per node.
pub struct Profiler {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    capacity: u32,
    labels: Vec<(String, &'static str, f64)>,
    written: u32,
    overflowed: bool,
    period_ns: f64,
}

/// Time of one node in one step.
#[derive(Clone, Debug)]
pub struct NodeTime {
    pub label: String,
    pub family: &'static str,
    pub flops: f64,
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
        })
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
        let n = self.written as usize;
        let mut out = Vec::new();
        if n >= 2 {
            let ticks: Vec<u64> =
                bytemuck::pod_collect_to_vec(&gpu.map_read(&self.staging, n as u64 * 8)?);
            for i in 0..n - 1 {
                let (label, family, flops) = self.labels[i].clone();
                let dt = ticks[i + 1].saturating_sub(ticks[i]) as f64 * self.period_ns * 1e-6;
                out.push(NodeTime {
                    label,
                    family,
                    flops,
                    ms: dt,
                });
            }
        }
        self.labels.clear();
        self.written = 0;
        Ok(out)
    }

    /// Whether the step had more nodes than the query set holds (later nodes went unmeasured).
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }
}

impl NodeObserver for Profiler {
    fn before(&mut self, pass: &mut wgpu::ComputePass<'_>, node: &CompiledNode) {
        if self.written + 1 >= self.capacity {
            self.overflowed = true;
            return;
        }
        pass.write_timestamp(&self.query_set, self.written);
        self.labels
            .push((node.label.clone(), node.family, node.flops));
        self.written += 1;
    }

    fn after_all(&mut self, pass: &mut wgpu::ComputePass<'_>) {
        if self.written < self.capacity {
            pass.write_timestamp(&self.query_set, self.written);
            self.written += 1;
        }
    }
}

/// Sums node times per op family: (family, ms, flops), largest first.
pub fn by_family(times: &[NodeTime]) -> Vec<(&'static str, f64, f64)> {
    let mut m: BTreeMap<&'static str, (f64, f64)> = BTreeMap::new();
    for t in times {
        let e = m.entry(t.family).or_default();
        e.0 += t.ms;
        e.1 += t.flops;
    }
    let mut v: Vec<_> = m.into_iter().map(|(f, (ms, fl))| (f, ms, fl)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}
