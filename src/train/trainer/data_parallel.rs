//! A data-parallel step: the gradients summed across the ranks between the backward and the
//! update, in buckets reduced as the backward finishes them (see [`crate::train::parallel`]).

use super::weights::Weights;
use super::Trainer;
use crate::error::Result;
use crate::gpu::{Gpu, Tensor};
use crate::graph;
use crate::graph::gpt::{ParamCopy, ParamInput};
use crate::train::parallel::{all_reduce_buckets, Collective};
use std::sync::Arc;
use std::time::Instant;

/// What the gradient exchange of one data-parallel step cost.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReduceStats {
    /// Host time in the all-reduce (MPI), all buckets.
    pub all_reduce_ms: f64,
    /// Host time to copy the gradients out of the mapped read-back and to queue the sums'
    /// writes to the GPU (the wait for the backward and the all-reduce excluded).
    pub transfer_ms: f64,
    /// Bytes each rank sends into the all-reduce (the gradients and the loss, f32).
    pub bytes: u64,
    /// All-reduce calls (buckets).
    pub buckets: usize,
}

/// A data-parallel trainer's share of the job: the collective, and where the gradients pass
/// through host memory on their way to and from the all-reduce.
pub(super) struct Parallel {
    pub(super) collective: Arc<dyn Collective>,
    /// In the order the backward finishes them; the last holds the loss too.
    buckets: Vec<Bucket>,
    /// Floats per all-reduce call.
    bucket_floats: usize,
    /// One bucket's values, summed in place.
    host: Vec<f32>,
}

/// Gradients that are final at the same point of the backward, reduced together.
struct Bucket {
    /// They are final once the last micro-step's body nodes before this one have run.
    after_node: usize,
    /// Views of the gradient buffers (and of the loss), in the staging buffer's order.
    parts: Vec<Tensor>,
    /// MAP_READ: the parts, back to back.
    staging: wgpu::Buffer,
    floats: usize,
}

impl Parallel {
    /// Groups the gradients into buckets of about `bucket_floats` by the body node that
    /// finishes them (`writes`: each body node's writes, [`crate::graph::Graph::body_writes`]),
    /// so that the first buckets can be reduced while the backward of earlier layers runs.
    pub(super) fn new(
        gpu: &Gpu,
        weights: &Weights,
        loss: &Tensor,
        writes: &[Vec<ParamInput>],
        collective: Arc<dyn Collective>,
        bucket_floats: usize,
    ) -> Result<Parallel> {
        let align = gpu.alignment();
        let body = writes.len();
        // The last body node writing each gradient piece.
        let mut last: Vec<(usize, ParamInput)> = Vec::new();
        let mut whole_buffers = false;
        for (i, w) in writes.iter().enumerate() {
            for input in w {
                match input {
                    ParamInput::Piece(_, _, ParamCopy::Grad) => {
                        match last.iter_mut().find(|(_, p)| p == input) {
                            Some(e) => e.0 = i,
                            None => last.push((i, *input)),
                        }
                    }
                    ParamInput::Buffer(ParamCopy::Grad, _) => whole_buffers = true,
                    _ => {}
                }
            }
        }
        let mut finals: Vec<(usize, Tensor)> = if whole_buffers {
            // A node writes whole gradient buffers: they are final at the end.
            weights
                .grads
                .buffers
                .iter()
                .map(|b| (body, b.clone()))
                .collect()
        } else {
            last.sort_by_key(|(i, _)| *i);
            last.iter()
                .map(|(i, input)| Ok((*i + 1, weights.bind(input, align)?)))
                .collect::<Result<_>>()?
        };
        finals.push((body, loss.clone()));
        let mut buckets = Vec::new();
        let mut parts = Vec::new();
        let mut floats = 0;
        let count = finals.len();
        for (j, (after_node, t)) in finals.into_iter().enumerate() {
            floats += t.len();
            parts.push(t);
            if floats >= bucket_floats.max(1) || j + 1 == count {
                let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(&format!("gradient read-back {}", buckets.len())),
                    size: (floats * 4) as u64,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                buckets.push(Bucket {
                    after_node,
                    parts: std::mem::take(&mut parts),
                    staging,
                    floats,
                });
                floats = 0;
            }
        }
        Ok(Parallel {
            collective,
            buckets,
            bucket_floats: bucket_floats.max(1),
            host: Vec::new(),
        })
    }
}

impl Trainer {
    /// A data-parallel step: forward and backward are submitted in segments, each ending
    /// where a bucket of gradients is final and copying it to its read-back buffer; bucket by
    /// bucket, in the order the backward finishes them, the host waits for its segment, reads
    /// it, sums it across the ranks (all-reduce) and queues the sums' upload, while the GPU
    /// runs the backward of earlier layers. Then the update (norm, clipping, AdamW, the step
    /// state) is submitted behind the uploads. Every rank updates from the same sums, so the
    /// weights stay identical, and the non-finite check of f16 loss scaling sees the sums too,
    /// so every rank skips the same steps. Returns the update's submission and what the
    /// exchange cost.
    pub(super) fn submit_data_parallel(
        &mut self,
        slot: usize,
    ) -> Result<(wgpu::SubmissionIndex, ReduceStats)> {
        let gpu = self.gpu.clone();
        let par = self
            .parallel
            .as_mut()
            .expect("called for data-parallel trainers");
        let nodes = self.graph.schedule(true);
        // The last micro-step's body starts at `last`; the update (the tail) at `update`.
        let update = nodes.len() - self.graph.tail.len();
        let last = update - self.graph.body.len();
        let mut marks = self.ring.slots[slot].profiler.as_mut().map(|p| {
            p.begin_step(
                &nodes,
                Some((update, "gradient all-reduce (host)", "all-reduce")),
            )
        });
        let mut from = 0;
        let mut segments = Vec::with_capacity(par.buckets.len());
        for (j, bucket) in par.buckets.iter().enumerate() {
            let to = if j + 1 == par.buckets.len() {
                update
            } else {
                (last + bucket.after_node).clamp(from, update)
            };
            let label = format!("training step: gradients {j}");
            // The last segment's end mark starts the exchange's pause.
            let mut commands = graph::encode_schedule(
                &gpu,
                &label,
                &nodes,
                from..to,
                marks,
                to == update,
                self.recording_threads,
            )?;
            from = to;
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some(&label),
                });
            let mut at = 0;
            for t in &bucket.parts {
                enc.copy_buffer_to_buffer(&t.buffer, t.offset, &bucket.staging, at, t.byte_size());
                at += t.byte_size();
            }
            commands.push(enc.finish());
            segments.push(gpu.queue.submit(commands));
        }
        marks = marks.map(|m| m.shifted(1));
        let (mut reduce_s, mut transfer_s, mut calls) = (0.0, 0.0, 0);
        for (bucket, index) in par.buckets.iter().zip(segments) {
            // The wait for the backward is not the exchange's cost.
            gpu.wait_for(Some(index.clone()))?;
            let start = Instant::now();
            par.host.clear();
            gpu.map_read_with(
                &bucket.staging,
                (bucket.floats * 4) as u64,
                Some(index),
                |b| par.host.extend_from_slice(bytemuck::cast_slice(b)),
            )?;
            let read = Instant::now();
            // The sums over the ranks.
            all_reduce_buckets(par.collective.as_ref(), &mut par.host, par.bucket_floats)?;
            calls += bucket.floats.div_ceil(par.bucket_floats);
            let reduced = Instant::now();
            // Back to the GPU, ahead of the update (the queue orders the writes before the
            // next submission; no later segment writes a final gradient).
            let mut at = 0;
            for t in &bucket.parts {
                let len = t.len();
                gpu.queue.write_buffer(
                    &t.buffer,
                    t.offset,
                    bytemuck::cast_slice(&par.host[at..at + len]),
                );
                at += len;
            }
            reduce_s += (reduced - read).as_secs_f64();
            transfer_s += ((read - start) + reduced.elapsed()).as_secs_f64();
        }
        let floats: usize = par.buckets.iter().map(|b| b.floats).sum();

        let mut commands = graph::encode_schedule(
            &gpu,
            "training step: update",
            &nodes,
            update..nodes.len(),
            marks,
            true,
            self.recording_threads,
        )?;
        let mut enc = gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("training step: statistics"),
            });
        if let Some(p) = self.ring.slots[slot].profiler.as_ref() {
            p.resolve(&mut enc);
        }
        self.copy_stats(&mut enc, slot);
        commands.push(enc.finish());
        let index = gpu.queue.submit(commands);
        Ok((
            index,
            ReduceStats {
                all_reduce_ms: reduce_s * 1e3,
                transfer_ms: transfer_s * 1e3,
                bytes: (floats * 4) as u64,
                buckets: calls,
            },
        ))
    }
}
