//! Opening the device: adapter choice, the features the engine asks for, the limits a memory
//! plan must respect, and the error scopes that turn wgpu's errors into `Err` values.

use super::pipeline::{default_cache_dir, shader_checks_from_env};
use super::{Gpu, UniformArena};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;
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
}
