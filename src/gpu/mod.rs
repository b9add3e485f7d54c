//! The GPU context: adapter and device choice, limits and features, tensors, the pipeline cache
//! and the one way work is put on the GPU (a [`Dispatch`]).

pub mod profile;
pub mod shader;
mod tensor;

pub use tensor::{DType, Tensor};

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the engine may use of an adapter. Everything defaults to "use it if present"; switching
/// a feature off here makes the engine run its fallback path (tests use this).
#[derive(Clone, Debug)]
pub struct GpuOptions {
    pub allow_f16: bool,
    pub allow_subgroups: bool,
    pub allow_timestamps: bool,
    pub allow_cooperative_matrix: bool,
    /// Where compiled pipelines are kept between runs, where the backend can (Vulkan's
    /// pipeline cache); `None`: compile every pipeline anew. Default: [`default_cache_dir`].
    pub pipeline_cache_dir: Option<PathBuf>,
    /// Which adapter to open.
    pub adapter: AdapterChoice,
}

/// Which adapter [`Gpu::new`] opens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdapterChoice {
    /// `WGPU_ADAPTER_NAME` if set, else the best kind (a discrete GPU first).
    #[default]
    Best,
    /// The adapter at this index among all, best kind first (discrete GPUs, integrated,
    /// virtual, software), in the driver's order within a kind.
    Index(usize),
    /// Data parallel: the rank on this machine, modulo the adapters of the best kind, so that
    /// the ranks on one machine spread over its GPUs.
    LocalRank(usize),
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            allow_f16: true,
            allow_subgroups: true,
            allow_timestamps: true,
            allow_cooperative_matrix: true,
            pipeline_cache_dir: default_cache_dir(),
            adapter: AdapterChoice::Best,
        }
    }
}

/// The pipeline cache's folder: `$WGPT_CACHE_DIR` (empty: no cache), else
/// `$XDG_CACHE_HOME/wgpt`, else `$HOME/.cache/wgpt`.
pub fn default_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("WGPT_CACHE_DIR") {
        Some(d) if d.is_empty() => None,
        Some(d) => Some(PathBuf::from(d)),
        None => std::env::var_os("XDG_CACHE_HOME")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("wgpt"))
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|d| !d.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache").join("wgpt"))
            }),
    }
}

/// Whether shaders are created with wgpu's runtime checks (every array index clamped, every
/// loop bounded), from the value of `WGPT_SHADER_CHECKS`: on for `1`, `true`, `on` or `yes`.
/// Off by default: the engine's shaders are proven by the tests and every launch checks its
/// shapes, and the checks keep drivers from unrolling the kernels' register-blocked loops.
pub fn shader_checks_from_env(value: Option<&std::ffi::OsStr>) -> bool {
    value
        .and_then(|v| v.to_str())
        .map(|v| {
            matches!(
                v.trim().to_lowercase().as_str(),
                "1" | "true" | "on" | "yes"
            )
        })
        .unwrap_or(false)
}

/// A pipeline cache loaded from and saved to a file.
struct DiskCache {
    cache: wgpu::PipelineCache,
    path: PathBuf,
    /// Pipelines were created since the last save.
    dirty: std::sync::atomic::AtomicBool,
}

/// How a binding is used by a shader; binding `i` of group 0 is the `i`-th of a dispatch's list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BindKind {
    Uniform,
    Read,
    ReadWrite,
}

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
struct UniformArena {
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

/// Everything that identifies a compute pipeline.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(String, String)>,
    pub layout: Vec<BindKind>,
}

impl PipelineKey {
    fn label(&self) -> String {
        let defs: Vec<String> = self
            .defines
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        format!("{}::{}[{}]", self.shader, self.entry, defs.join(","))
    }
}

/// A cached pipeline and the layout its bind groups are made with.
pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub bind_group_layout: wgpu::BindGroupLayout,
    pub label: String,
}

/// A ready-to-record compute dispatch: pipeline, bind group (made once) and grid.
#[derive(Clone)]
pub struct Dispatch {
    /// What this dispatch computes, e.g. `block3.attn.c_attn.forward`.
    pub label: String,
    /// The op family it belongs to (for profiles), e.g. `matmul`.
    pub family: &'static str,
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
    pub shader: &'static str,
    pub entry: &'static str,
    pub defines: Vec<(String, String)>,
    pub bindings: &'a [Bind<'a>],
    pub workgroups: [u32; 3],
    pub label: String,
    pub family: &'static str,
}

/// Helper to build define lists: `defines![("T", "f32"), ("BIAS", true)]`.
#[macro_export]
macro_rules! defines {
    ($(($k:expr, $v:expr)),* $(,)?) => {
        vec![$(($k.to_string(), $v.to_string())),*]
    };
}

/// A shader file and its defines: one compiled module.
type ModuleKey = (String, Vec<(String, String)>);

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

/// The limits a memory plan must respect, with or without a device: what one storage binding
/// and one buffer may hold, the storage offset alignment, the dispatch grid, and the device's
/// memory when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterLimits {
    /// The adapter's name (for messages).
    pub adapter: String,
    /// Bytes one storage binding may cover.
    pub max_binding: u64,
    /// Bytes one buffer may hold.
    pub max_buffer: u64,
    /// Byte alignment of a binding's offset.
    pub alignment: u64,
    /// Bytes of device memory, when known.
    pub memory: Option<u64>,
}

impl AdapterLimits {
    /// The limits of an open device.
    pub fn of(gpu: &Gpu) -> AdapterLimits {
        AdapterLimits {
            adapter: gpu.info.name.clone(),
            max_binding: gpu.limits.max_storage_buffer_binding_size,
            max_buffer: gpu.limits.max_buffer_size,
            alignment: gpu.alignment(),
            memory: gpu.memory,
        }
    }

    /// WebGPU's default limits (128 MiB per storage binding, 256 MiB per buffer, 256-byte
    /// offsets) with `memory` bytes of device memory.
    pub fn webgpu_default(memory: Option<u64>) -> AdapterLimits {
        let d = wgpu::Limits::default();
        AdapterLimits {
            adapter: "WebGPU default limits".into(),
            max_binding: d.max_storage_buffer_binding_size,
            max_buffer: d.max_buffer_size,
            alignment: d.min_storage_buffer_offset_alignment as u64,
            memory,
        }
    }

    /// Bytes one tensor may take to be bound whole: the smaller of the binding and buffer
    /// limits.
    pub fn tensor_bytes(&self) -> u64 {
        self.max_binding.min(self.max_buffer)
    }

    /// f32 elements of one parameter storage buffer (a whole buffer is bound by AdamW), at most
    /// 2^30 so that every element index fits the shaders' 32-bit arithmetic.
    pub fn storage_capacity(&self) -> usize {
        ((self.tensor_bytes() / 4) as usize).min(1 << 30)
    }
}

/// Bytes of the largest device-local memory heap, read from the Vulkan driver; for a CPU
/// adapter, whose memory is the machine's (software drivers report a nominal heap), the
/// machine's memory where the system tells; `None` otherwise.
fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    if adapter.get_info().device_type == wgpu::DeviceType::Cpu {
        return system_memory();
    }
    #[cfg(any(target_os = "linux", target_os = "windows", target_os = "android"))]
    {
        // SAFETY: reads the physical device's memory properties through the raw handles wgpu
        // holds for this adapter; nothing is created or destroyed.
        let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
        let instance = hal.shared_instance().raw_instance();
        let props =
            unsafe { instance.get_physical_device_memory_properties(hal.raw_physical_device()) };
        let count = (props.memory_heap_count as usize).min(props.memory_heaps.len());
        // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
        props.memory_heaps[..count]
            .iter()
            .filter(|h| h.flags.as_raw() & 1 != 0)
            .map(|h| h.size)
            .max()
    }
    #[cfg(not(any(target_os = "linux", target_os = "windows", target_os = "android")))]
    {
        let _ = adapter;
        None
    }
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo), on Linux.
fn system_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Mesa's device-selection layer (an implicit Vulkan layer on Linux) connects to Wayland when
/// the adapters are listed, to rank the session's GPU first; without a desktop session
/// (no `XDG_RUNTIME_DIR`, as on a server or in CI) libwayland then prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment`. There is no session to
/// rank for and the engine picks its adapter itself, so the layer is switched off through its
/// own switch (`NODEVICE_SELECT=1`), unless the user asks it for a device
/// (`MESA_VK_DEVICE_SELECT`) or set the switch either way.
fn quiet_device_select_without_a_session() {
    let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_dir());
    let absolute_display =
        std::env::var_os("WAYLAND_DISPLAY").is_some_and(|d| std::path::Path::new(&d).is_absolute());
    let user_choice = std::env::var_os("MESA_VK_DEVICE_SELECT").is_some()
        || std::env::var_os("NODEVICE_SELECT").is_some();
    if runtime_dir.is_none() && !absolute_display && !user_choice {
        // Before the instance exists; the loader reads the variable when it loads layers.
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

impl Gpu {
    /// Opens the best adapter: the one named by `WGPU_ADAPTER_NAME` if set, else a discrete GPU
    /// before an integrated one before a software one, among the backends `WGPU_BACKEND` allows.
    pub fn new(options: &GpuOptions) -> Result<Gpu> {
        quiet_device_select_without_a_session();
        pollster::block_on(Self::new_async(options))
    }

    async fn new_async(options: &GpuOptions) -> Result<Gpu> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter = if options.adapter == AdapterChoice::Best
            && std::env::var_os("WGPU_ADAPTER_NAME").is_some()
        {
            wgpu::util::initialize_adapter_from_env_or_default(&instance, None)
                .await
                .map_err(|e| Error::Gpu(format!("no adapter matches WGPU_ADAPTER_NAME: {e}")))?
        } else {
            let mut adapters = Self::sorted_adapters(&instance).await;
            if adapters.is_empty() {
                return Err(Error::Gpu(
                    "no GPU adapter found. Install a Vulkan driver (on Debian/Ubuntu without a GPU: \
                     `apt-get install mesa-vulkan-drivers`) or check WGPU_BACKEND"
                        .into(),
                ));
            }
            let index = match options.adapter {
                AdapterChoice::Best => 0,
                AdapterChoice::Index(i) => {
                    if i >= adapters.len() {
                        let names: Vec<String> = adapters
                            .iter()
                            .enumerate()
                            .map(|(i, a)| format!("{i}: {}", a.get_info().name))
                            .collect();
                        return Err(Error::Gpu(format!(
                            "there is no adapter {i}; the adapters are {}",
                            names.join(", ")
                        )));
                    }
                    i
                }
                AdapterChoice::LocalRank(r) => {
                    let best = type_rank(adapters[0].get_info().device_type);
                    let count = adapters
                        .iter()
                        .filter(|a| type_rank(a.get_info().device_type) == best)
                        .count();
                    r % count
                }
            };
            adapters.swap_remove(index)
        };
        Self::from_adapter(adapter, options).await
    }

    /// The adapters of the backends `WGPU_BACKEND` allows, best kind first (discrete GPUs,
    /// integrated, virtual, software), in the driver's order within a kind.
    async fn sorted_adapters(instance: &wgpu::Instance) -> Vec<wgpu::Adapter> {
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let mut adapters = instance.enumerate_adapters(backends).await;
        adapters.sort_by_key(|a| type_rank(a.get_info().device_type));
        adapters
    }

    /// The features the engine asks for on `adapter`, given `options`.
    pub fn wanted_features(adapter: &wgpu::Adapter, options: &GpuOptions) -> wgpu::Features {
        let have = adapter.features();
        let mut want = wgpu::Features::empty();
        if options.allow_f16 {
            want |= wgpu::Features::SHADER_F16;
        }
        if options.allow_subgroups {
            want |= wgpu::Features::SUBGROUP;
        }
        if options.allow_timestamps {
            want |= wgpu::Features::TIMESTAMP_QUERY
                | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
                | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS;
        }
        if options.allow_cooperative_matrix {
            want |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        if options.pipeline_cache_dir.is_some() {
            want |= wgpu::Features::PIPELINE_CACHE;
        }
        want & have
    }

    async fn from_adapter(adapter: wgpu::Adapter, options: &GpuOptions) -> Result<Gpu> {
        let features = Self::wanted_features(&adapter, options);
        // The default limits cap a storage binding at 128 MiB, too small for GPT-2's embedding:
        // ask for everything the adapter offers.
        let limits = adapter.limits();
        let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            // SAFETY: the cooperative-matrix kernels are checked against the tiled kernel at
            // start-up before they are used (see ops::matmul).
            unsafe { wgpu::ExperimentalFeatures::enabled() }
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpt device"),
                required_features: features,
                required_limits: limits.clone(),
                experimental_features: experimental,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::Gpu(format!("could not open the device: {e}")))?;
        let mut gpu = Self::from_device(adapter, device, queue);
        if let Some(dir) = &options.pipeline_cache_dir {
            gpu.pipeline_cache = gpu.open_pipeline_cache(dir);
        }
        Ok(gpu)
    }

    /// The pipeline cache kept in `dir` for this adapter and driver, when the device has
    /// PIPELINE_CACHE. A missing, unreadable or stale file only means compiling anew.
    fn open_pipeline_cache(&self, dir: &Path) -> Option<DiskCache> {
        if !self.features.contains(wgpu::Features::PIPELINE_CACHE) {
            return None;
        }
        let key = wgpu::util::pipeline_cache_key(&self.info)?;
        let path = dir.join(key);
        let data = std::fs::read(&path).ok();
        // SAFETY: the data is what `PipelineCache::get_data` wrote for an adapter with this
        // key (written whole: to a temporary file, then renamed); with `fallback` the driver
        // validates it against its own header and starts empty when it does not match.
        let cache = unsafe {
            self.device
                .create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                    label: Some("wgpt pipeline cache"),
                    data: data.as_deref(),
                    fallback: true,
                })
        };
        Some(DiskCache {
            cache,
            path,
            dirty: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where the pipeline cache is kept, when there is one.
    pub fn pipeline_cache_path(&self) -> Option<&Path> {
        self.pipeline_cache.as_ref().map(|c| c.path.as_path())
    }

    /// Writes the pipeline cache to its file if pipelines were compiled since the last save
    /// (a temporary file, then renamed: never a half-written cache). Returns whether it wrote.
    pub fn save_pipeline_cache(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        let Some(c) = &self.pipeline_cache else {
            return Ok(false);
        };
        if !c.dirty.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let Some(data) = c.cache.get_data() else {
            return Ok(false);
        };
        if let Some(dir) = c.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let tmp = c.path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &data).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &c.path).map_err(|e| Error::io(&c.path, e))?;
        Ok(true)
    }

    /// Wraps a device opened elsewhere (the desktop app shares eframe's device).
    pub fn from_device(adapter: wgpu::Adapter, device: wgpu::Device, queue: wgpu::Queue) -> Gpu {
        let info = adapter.get_info();
        let features = device.features();
        let limits = device.limits();
        let adapter_info_subgroups = {
            let a = adapter.get_info();
            (a.subgroup_min_size, a.subgroup_max_size)
        };
        let cooperative_matrix =
            if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
                adapter.cooperative_matrix_properties()
            } else {
                Vec::new()
            };
        let lost = Arc::new(Mutex::new(None));
        let lost_cb = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut l) = lost_cb.lock() {
                *l = Some(format!("{reason:?}: {message}"));
            }
        });
        // wgpu's default handler panics on an error raised outside an error scope; keep the
        // first one instead and report it from the next check.
        let uncaptured = Arc::new(Mutex::new(None));
        let uncaptured_cb = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut u) = uncaptured_cb.lock() {
                u.get_or_insert_with(|| e.to_string());
            }
        }));
        let memory = device_memory(&adapter);
        Gpu {
            adapter,
            device,
            queue,
            info,
            features,
            limits,
            memory,
            subgroup_sizes: adapter_info_subgroups,
            cooperative_matrix,
            coop_matmul: std::sync::OnceLock::new(),
            coop_attention: std::sync::OnceLock::new(),
            pipelines: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
            uniforms: Mutex::new(UniformArena::default()),
            modules: Mutex::new(HashMap::new()),
            lost,
            uncaptured,
            shader_checks: shader_checks_from_env(
                std::env::var_os("WGPT_SHADER_CHECKS").as_deref(),
            ),
            pipeline_cache: None,
        }
    }

    pub fn has_f16(&self) -> bool {
        self.features.contains(wgpu::Features::SHADER_F16)
    }

    pub fn has_subgroups(&self) -> bool {
        self.features.contains(wgpu::Features::SUBGROUP)
    }

    pub fn has_timestamps(&self) -> bool {
        self.features.contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Whether the adapter is a software rasteriser (llvmpipe/lavapipe, WARP, SwiftShader).
    pub fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Whether a 16x16x16 f16 cooperative-matrix configuration with f32 accumulation is offered.
    pub fn has_coop_mat16_f16_f32(&self) -> bool {
        self.cooperative_matrix.iter().any(|p| {
            p.m_size == 16
                && p.n_size == 16
                && p.k_size == 16
                && p.ab_type == wgpu::CooperativeScalarType::F16
                && p.cr_type == wgpu::CooperativeScalarType::F32
        })
    }

    /// The optional features in use, by name ("none" when there are none).
    pub fn feature_list(&self) -> String {
        let mut feats = Vec::new();
        if self.has_f16() {
            feats.push("shader-f16".to_string());
        }
        if self.has_subgroups() {
            feats.push(format!(
                "subgroup({}..{})",
                self.subgroup_sizes.0, self.subgroup_sizes.1
            ));
        }
        if self.has_timestamps() {
            feats.push("timestamp-query".to_string());
        }
        if self.has_coop_mat16_f16_f32() {
            feats.push("cooperative-matrix-16x16".to_string());
        }
        if feats.is_empty() {
            "none".to_string()
        } else {
            feats.join(", ")
        }
    }

    /// One line: adapter, backend, type and the optional features in use.
    pub fn summary(&self) -> String {
        let memory = match self.memory {
            Some(m) => format!(" | memory {} MiB", m >> 20),
            None => String::new(),
        };
        format!(
            "adapter: {} ({:?}, {:?}, driver {} {}) | features: {} | max binding {} MiB{memory}",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info,
            self.feature_list(),
            self.limits.max_storage_buffer_binding_size >> 20
        )
    }

    /// The alignment every tensor view's byte offset must respect.
    pub fn alignment(&self) -> u64 {
        (self.limits.min_storage_buffer_offset_alignment as u64).max(4)
    }

    /// Errors if the device was lost or raised an error outside any error scope.
    pub fn check_lost(&self) -> Result<()> {
        if let Ok(l) = self.lost.lock() {
            if let Some(msg) = l.as_ref() {
                return Err(Error::Gpu(format!(
                    "the device was lost ({msg}); restart the program. If it happens again, \
                     reduce the batch size or sequence length"
                )));
            }
        }
        if let Ok(mut u) = self.uncaptured.lock() {
            if let Some(msg) = u.take() {
                return Err(Error::GpuValidation {
                    context: "GPU work".into(),
                    message: msg,
                });
            }
        }
        Ok(())
    }

    /// Runs `f` inside validation and out-of-memory error scopes, so that wgpu errors become
    /// `Err` values naming `context` instead of aborting the process.
    pub fn scoped<T>(&self, context: &str, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = v.or(o) {
            return Err(Error::GpuValidation {
                context: context.to_string(),
                message: e.to_string(),
            });
        }
        self.check_lost()?;
        Ok(value)
    }

    fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        let max = self
            .limits
            .max_buffer_size
            .min(self.limits.max_storage_buffer_binding_size);
        if bytes > max {
            return Err(Error::Limit {
                what: what.to_string(),
                needed: format!("a buffer of {} MiB", bytes.div_ceil(1 << 20)),
                available: format!("at most {} MiB per buffer", max >> 20),
                adapter: self.info.name.clone(),
                hint: "use a smaller model, batch or sequence length, or f16 precision".into(),
            });
        }
        Ok(())
    }

    /// A new zero-filled tensor.
    pub fn zeros(&self, label: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let bytes = ((n * dtype.size()) as u64).div_ceil(256).max(1) * 256;
        self.check_size(label, bytes)?;
        let buffer = self.scoped(label, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: bytes,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })?;
        Ok(Tensor {
            buffer,
            offset: 0,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A new tensor holding `data` (converted to `dtype`).
    pub fn upload(
        &self,
        label: &str,
        data: &[f32],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let t = self.zeros(label, shape, dtype)?;
        self.write(&t, data)?;
        Ok(t)
    }

    /// A new u32 tensor holding `data`.
    pub fn upload_u32(&self, label: &str, data: &[u32], shape: &[usize]) -> Result<Tensor> {
        let t = self.zeros(label, shape, DType::U32)?;
        self.write_u32(&t, data)?;
        Ok(t)
    }

    /// Encodes f32 values as the bytes of `dtype`.
    pub fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
        match dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
            DType::U32 => {
                let u: Vec<u32> = data.iter().map(|&x| x as u32).collect();
                bytemuck::cast_slice(&u).to_vec()
            }
        }
    }

    /// Writes `data` into `t` (queued; visible to the next submission).
    pub fn write(&self, t: &Tensor, data: &[f32]) -> Result<()> {
        t.expect_len("write", "data", data.len())?;
        self.write_bytes(t, &Self::encode(data, t.dtype))
    }

    pub fn write_u32(&self, t: &Tensor, data: &[u32]) -> Result<()> {
        t.expect_len("write", "data", data.len())?;
        self.write_bytes(t, bytemuck::cast_slice(data))
    }

    /// Writes raw bytes at the start of `t`, padded to whole words.
    pub fn write_bytes(&self, t: &Tensor, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if bytes.len().is_multiple_of(4) {
            self.queue.write_buffer(&t.buffer, t.offset, bytes);
        } else {
            let mut padded = bytes.to_vec();
            padded.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(&t.buffer, t.offset, &padded);
        }
        Ok(())
    }

    /// Fills `t` with NaN (f32/f16) or 0xFFFFFFFF (u32), so an element a kernel fails to write
    /// is caught by the comparison that follows.
    pub fn poison(&self, t: &Tensor) -> Result<()> {
        let words = (t.byte_size() / 4) as usize;
        let word: u32 = match t.dtype {
            DType::F32 => 0x7fc0_0000,
            DType::F16 => 0x7e00_7e00,
            DType::U32 => u32::MAX,
        };
        self.write_bytes(t, bytemuck::cast_slice(&vec![word; words]))
    }

    /// Copies `t` back to the CPU as raw bytes (exactly `len * size` bytes).
    pub fn read_bytes(&self, t: &Tensor) -> Result<Vec<u8>> {
        let size = t.byte_size();
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back staging"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("read-back"),
            });
        encoder.copy_buffer_to_buffer(&t.buffer, t.offset, &staging, 0, size);
        self.scoped("read-back", || self.queue.submit([encoder.finish()]))?;
        let mut bytes = self.map_read(&staging, size)?;
        bytes.truncate(t.len() * t.dtype.size());
        Ok(bytes)
    }

    /// Waits for the GPU, then maps the first `len` bytes of a MAP_READ buffer (filled by work
    /// already submitted) and copies them out.
    pub fn map_read(&self, staging: &wgpu::Buffer, len: u64) -> Result<Vec<u8>> {
        self.map_read_after(staging, len, None)
    }

    /// [`Gpu::map_read`] waiting only for submission `index` (and those before it), not for
    /// work queued since: how a step's statistics are read while the next step runs.
    pub fn map_read_after(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        index: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<u8>> {
        self.map_read_with(staging, len, index, |bytes| bytes.to_vec())
    }

    /// Maps the first `len` bytes of `staging` once submission `index` has finished and hands
    /// them to `read` (without a copy), then unmaps.
    pub fn map_read_with<T>(
        &self,
        staging: &wgpu::Buffer,
        len: u64,
        index: Option<wgpu::SubmissionIndex>,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let slice = staging.slice(..len);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.wait_for(index)?;
        rx.recv()
            .map_err(|_| Error::Gpu("read-back never completed".into()))?
            .map_err(|e| Error::Gpu(format!("read-back failed: {e}")))?;
        let value = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| Error::Gpu(format!("read-back mapping failed: {e}")))?;
            read(&view)
        };
        staging.unmap();
        Ok(value)
    }

    /// Copies `t` back to the CPU as f32 values.
    pub fn read(&self, t: &Tensor) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(t)?;
        Ok(match t.dtype {
            DType::F32 => bytemuck::pod_collect_to_vec(&bytes),
            DType::F16 => {
                let h: Vec<half::f16> = bytemuck::pod_collect_to_vec(&bytes);
                h.iter().map(|x| x.to_f32()).collect()
            }
            DType::U32 => {
                let u: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
                u.iter().map(|&x| x as f32).collect()
            }
        })
    }

    pub fn read_u32(&self, t: &Tensor) -> Result<Vec<u32>> {
        Ok(bytemuck::pod_collect_to_vec(&self.read_bytes(t)?))
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self) -> Result<()> {
        self.wait_for(None)
    }

    /// Blocks until submission `index` has finished (all submitted work when `None`).
    pub fn wait_for(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: index,
                timeout: None,
            })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))?;
        self.check_lost()
    }

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

    fn bind_group_layout(&self, kinds: &[BindKind]) -> wgpu::BindGroupLayout {
        let mut layouts = self.layouts.lock().unwrap_or_else(|p| p.into_inner());
        layouts
            .entry(kinds.to_vec())
            .or_insert_with(|| {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = kinds
                    .iter()
                    .enumerate()
                    .map(|(i, k)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: match k {
                            BindKind::Uniform => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Uniform,
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            BindKind::Read => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: true },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            BindKind::ReadWrite => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: false },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                        },
                        count: None,
                    })
                    .collect();
                let label: Vec<&str> = kinds
                    .iter()
                    .map(|k| match k {
                        BindKind::Uniform => "u",
                        BindKind::Read => "r",
                        BindKind::ReadWrite => "w",
                    })
                    .collect();
                self.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(&format!("layout {}", label.join(""))),
                        entries: &entries,
                    })
            })
            .clone()
    }

    /// The pipeline for `key`, compiled on first use and cached.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<Pipeline>> {
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(p.clone());
        }
        let label = key.label();
        let module_key = (key.shader.to_string(), key.defines.clone());
        let cached_module = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&module_key)
            .cloned();
        let module = match cached_module {
            Some(m) => m,
            None => {
                let text =
                    shader::preprocess(key.shader, shader::source(key.shader)?, &key.defines)?;
                let m = self.scoped(&format!("compiling shaders/{}.wgsl", key.shader), || {
                    let desc = wgpu::ShaderModuleDescriptor {
                        label: Some(&label),
                        source: wgpu::ShaderSource::Wgsl(text.into()),
                    };
                    if self.shader_checks {
                        self.device.create_shader_module(desc)
                    } else {
                        // SAFETY: only the engine's own shaders are created here; every
                        // launcher checks the shapes and lengths of what it binds, and the
                        // tests run every kernel against CPU references (also with the checks
                        // on, WGPT_SHADER_CHECKS=1) on shapes that reach every edge path.
                        unsafe {
                            self.device.create_shader_module_trusted(
                                desc,
                                wgpu::ShaderRuntimeChecks::unchecked(),
                            )
                        }
                    }
                })?;
                self.modules
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(module_key, m.clone());
                m
            }
        };
        let bind_group_layout = self.bind_group_layout(&key.layout);
        let pipeline = self.scoped(&format!("pipeline {label}"), || {
            let layout = self
                .device
                .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&label),
                    bind_group_layouts: &[Some(&bind_group_layout)],
                    immediate_size: 0,
                });
            self.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&layout),
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: self.pipeline_cache.as_ref().map(|c| &c.cache),
                })
        })?;
        if let Some(c) = &self.pipeline_cache {
            c.dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        let p = Arc::new(Pipeline {
            pipeline,
            bind_group_layout,
            label,
        });
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), p.clone());
        Ok(p)
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
            shader: desc.shader,
            entry: desc.entry,
            defines: desc.defines,
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
            family: desc.family,
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
