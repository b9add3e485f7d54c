//! The GPU context: adapter and device choice, limits and features, tensors, the pipeline cache
//! and the one way work is put on the GPU (a [`Dispatch`]).
//!
//! By concern: `device` opens the adapter and knows its limits and features, `kernel` declares
//! the kernels and their specialisations, `pipeline` compiles and caches pipelines (and keeps
//! the driver's cache on disk), `dispatch` builds dispatches and their uniform blocks, `buffer`
//! makes, writes and reads tensors' buffers.

mod buffer;
mod device;
mod dispatch;
mod kernel;
mod pipeline;
pub mod profile;
pub mod shader;
mod tensor;

pub use device::{AdapterChoice, AdapterLimits, GpuOptions};
pub use dispatch::{Bind, Dispatch, DispatchDesc, Uniform};
pub use kernel::{Axis, DefineValue, Kernel, Specialisation};
pub use pipeline::{default_cache_dir, shader_checks_from_env, BindKind, Pipeline, PipelineKey};
pub use tensor::{DType, Tensor};

use dispatch::UniformArena;
use pipeline::{DiskCache, ModuleKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The device and everything derived from it. One per process; shared by reference.
pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    /// Smallest and largest subgroup size the adapter may use (when SUBGROUP is enabled).
    pub subgroup_sizes: (u32, u32),
    /// Cooperative-matrix (tensor core) configurations, when that feature is enabled.
    pub cooperative_matrix: Vec<wgpu::CooperativeMatrixProperties>,
    /// Bytes of the adapter's largest device-local memory heap, where the driver tells (Vulkan).
    pub memory: Option<u64>,
    /// Whether f16 matmuls may use the cooperative-matrix kernel (`Err` says why not): decided
    /// once, by the start-up self-check in `ops::matmul`.
    pub(crate) coop_matmul: std::sync::OnceLock<std::result::Result<(), String>>,
    /// Whether f16 attention may use the cooperative-matrix kernels (`Err` says why not):
    /// decided once, by the start-up self-check in `ops::attention`.
    pub(crate) coop_attention: std::sync::OnceLock<std::result::Result<(), String>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
    layouts: Mutex<HashMap<Vec<BindKind>, wgpu::BindGroupLayout>>,
    uniforms: Mutex<UniformArena>,
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    lost: Arc<Mutex<Option<String>>>,
    uncaptured: Arc<Mutex<Option<String>>>,
    /// Shaders created with wgpu's runtime checks ([`shader_checks_from_env`]).
    pub shader_checks: bool,
    pipeline_cache: Option<DiskCache>,
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // A cache that cannot be written only costs the next start its compile time.
        let _ = self.save_pipeline_cache();
    }
}
