//! Putting work on the GPU: the uniform blocks of shape parameters (packed many to a buffer),
//! the resources a dispatch binds, and [`Dispatch`], made once and recorded every step.

use super::{BindKind, Gpu, Pipeline, PipelineKey, Specialisation, Tensor};
use crate::error::{Error, Result};
use std::sync::Arc;

/// A dispatch's block of uniform parameters (shapes, offsets), in a uniform buffer it shares
/// with many other dispatches' blocks (see [`Gpu::uniform`]).
#[derive(Clone, Debug)]
pub struct Uniform {
    buffer: wgpu::Buffer,
    offset: u64,
    size: u64,
}

impl Uniform {
    fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.size),
        })
    }

    /// Replaces the block's contents (as `queue.write_buffer`: before the next submission's
    /// commands run). `value` must have the size the block was made with.
    pub fn write<T: bytemuck::Pod>(&self, gpu: &Gpu, value: &T) {
        let bytes = padded_uniform(value);
        debug_assert_eq!(bytes.len() as u64, self.size);
        gpu.queue.write_buffer(&self.buffer, self.offset, &bytes);
    }
}

/// A uniform value's bytes, padded to a multiple of 16 (at least 16).
fn padded_uniform<T: bytemuck::Pod>(value: &T) -> Vec<u8> {
    let mut bytes = bytemuck::bytes_of(value).to_vec();
    bytes.resize(bytes.len().div_ceil(16).max(1) * 16, 0);
    bytes
}

/// Bytes of each buffer that [`Gpu::uniform`] fills with blocks one after the other.
const UNIFORM_CHUNK: u64 = 64 << 10;

/// The uniform buffer [`Gpu::uniform`] is filling and the bytes of it already given out.
#[derive(Default)]
pub(super) struct UniformArena {
    buffer: Option<wgpu::Buffer>,
    used: u64,
}

/// One resource bound to a dispatch.
pub enum Bind<'a> {
    /// A block of uniform parameters (shapes).
    Uniform(&'a Uniform),
    /// A tensor the shader only reads.
    Read(&'a Tensor),
    /// A tensor the shader writes (and may read).
    Write(&'a Tensor),
}

impl Bind<'_> {
    fn kind(&self) -> BindKind {
        match self {
            Bind::Uniform(_) => BindKind::Uniform,
            Bind::Read(_) => BindKind::Read,
            Bind::Write(_) => BindKind::ReadWrite,
        }
    }
}

/// A ready-to-record compute dispatch: pipeline, bind group (made once) and grid.
#[derive(Clone)]
pub struct Dispatch {
    /// What this dispatch computes, e.g. `block3.attn.c_attn.forward`.
    pub label: String,
    pub pipeline: Arc<Pipeline>,
    pub bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    /// Bytes of the storage tensors it binds, each counted once: a lower bound on its memory
    /// traffic, for the profile's roofline.
    pub bytes: u64,
}

impl Dispatch {
    /// Records the dispatch into a compute pass.
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        let [x, y, z] = self.workgroups;
        pass.dispatch_workgroups(x, y, z);
    }

    /// Relabels the dispatch (the executor names each dispatch after its place in the model).
    pub fn named(mut self, label: impl Into<String>) -> Self {
        self.label = label.into();
        self
    }
}

/// Everything needed to build a [`Dispatch`].
pub struct DispatchDesc<'a> {
    /// The kernel and its defines' values (from [`Kernel::with`](super::Kernel::with)).
    pub kernel: Specialisation,
    pub bindings: &'a [Bind<'a>],
    pub workgroups: [u32; 3],
    pub label: String,
}

impl Gpu {
    /// A block of uniform parameters holding `value`: a slice of a 64 KiB uniform buffer that
    /// the next blocks share, so that a step's few hundred dispatches bind a handful of
    /// buffers, not one each (wgpu tracks the state of every buffer a command buffer uses).
    /// The value is written as `queue.write_buffer` does: before the next submission runs.
    pub fn uniform<T: bytemuck::Pod>(&self, value: &T) -> Uniform {
        let bytes = padded_uniform(value);
        let size = bytes.len() as u64;
        let align = u64::from(self.limits.min_uniform_buffer_offset_alignment).max(16);
        let mut arena = self.uniforms.lock().unwrap_or_else(|p| p.into_inner());
        let buffer = match &arena.buffer {
            Some(b) if arena.used + size <= UNIFORM_CHUNK => b.clone(),
            _ => {
                let b = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("uniform blocks"),
                    size: UNIFORM_CHUNK.max(size),
                    usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                arena.buffer = Some(b.clone());
                arena.used = 0;
                b
            }
        };
        let offset = arena.used;
        arena.used = (offset + size).next_multiple_of(align);
        drop(arena);
        self.queue.write_buffer(&buffer, offset, &bytes);
        Uniform {
            buffer,
            offset,
            size,
        }
    }

    /// Builds a dispatch: pipeline from the cache, a bind group made now, and the grid.
    pub fn dispatch(&self, desc: DispatchDesc<'_>) -> Result<Dispatch> {
        let max = self.limits.max_compute_workgroups_per_dimension;
        if desc.workgroups.iter().any(|&w| w > max) {
            return Err(Error::Limit {
                what: desc.label.clone(),
                needed: format!("a grid of {:?} workgroups", desc.workgroups),
                available: format!("at most {max} per dimension"),
                adapter: self.info.name.clone(),
                hint: "use a smaller batch or sequence length".into(),
            });
        }
        let key = PipelineKey {
            shader: desc.kernel.shader,
            entry: desc.kernel.entry,
            defines: desc.kernel.defines,
            layout: desc.bindings.iter().map(|b| b.kind()).collect(),
        };
        let pipeline = self.pipeline(&key)?;
        for b in desc.bindings {
            if let Bind::Read(t) | Bind::Write(t) = b {
                if t.byte_size() > self.limits.max_storage_buffer_binding_size {
                    return Err(Error::Limit {
                        what: format!("{} (a tensor of shape {:?})", desc.label, t.shape),
                        needed: format!("a binding of {} MiB", t.byte_size().div_ceil(1 << 20)),
                        available: format!(
                            "{} MiB per storage binding",
                            self.limits.max_storage_buffer_binding_size >> 20
                        ),
                        adapter: self.info.name.clone(),
                        hint: "use a smaller model, batch or sequence length, or f16 precision"
                            .into(),
                    });
                }
            }
        }
        let entries: Vec<wgpu::BindGroupEntry> = desc
            .bindings
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: match b {
                    Bind::Uniform(u) => u.binding(),
                    Bind::Read(t) | Bind::Write(t) => t.binding(),
                },
            })
            .collect();
        let bind_group = self.scoped(&desc.label, || {
            self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&desc.label),
                layout: &pipeline.bind_group_layout,
                entries: &entries,
            })
        })?;
        let bytes = desc
            .bindings
            .iter()
            .map(|b| match b {
                Bind::Read(t) | Bind::Write(t) => t.byte_size(),
                Bind::Uniform(_) => 0,
            })
            .sum();
        Ok(Dispatch {
            label: desc.label,
            pipeline,
            bind_group,
            workgroups: desc.workgroups,
            bytes,
        })
    }

    /// A grid of `n` workgroups laid out within the per-dimension limit: `[x, y, 1]` with
    /// `x * y >= n`. Shaders recover the linear id as `wid.x + wid.y * nwg.x` and skip ids >= n.
    pub fn grid(&self, n: u32) -> [u32; 3] {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1);
        if n <= max {
            [n.max(1), 1, 1]
        } else {
            let y = n.div_ceil(max);
            [n.div_ceil(y), y, 1]
        }
    }

    /// Records `dispatches` into one compute pass, submits, and waits for the GPU to finish.
    pub fn run(&self, dispatches: &[&Dispatch]) -> Result<()> {
        let context = dispatches
            .first()
            .map(|d| d.label.clone())
            .unwrap_or_else(|| "empty run".into());
        self.scoped(&context, || {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some(&context),
                });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some(&context),
                    timestamp_writes: None,
                });
                for d in dispatches {
                    d.record(&mut pass);
                }
            }
            self.queue.submit([encoder.finish()]);
        })?;
        self.wait()
    }
}
