//! One device for the window and the engine: eframe opens it with the adapter's own limits
//! and the features the engine wants, and the app wraps the same device in a [`Gpu`].

use std::sync::Arc;
use wgpt::gpu::{Gpu, GpuOptions};

/// Discrete before integrated before virtual before software, as `Gpu::new` ranks them.
fn type_rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// The device descriptor the engine needs on `adapter`: every limit the adapter offers (the
/// defaults cap a storage binding at 128 MiB, too small for GPT-2's embedding) and the
/// optional features it uses (f16, subgroups, timestamps, cooperative matrices).
pub fn device_descriptor(adapter: &wgpu::Adapter) -> wgpu::DeviceDescriptor<'static> {
    let features = Gpu::wanted_features(adapter, &GpuOptions::default());
    let experimental = if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        // SAFETY: the engine checks its cooperative-matrix kernels against the tiled kernel
        // before using them (as `Gpu::new` does).
        unsafe { wgpu::ExperimentalFeatures::enabled() }
    } else {
        wgpu::ExperimentalFeatures::disabled()
    };
    wgpu::DeviceDescriptor {
        label: Some("wgpt window + engine device"),
        required_features: features,
        required_limits: adapter.limits(),
        experimental_features: experimental,
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }
}

/// eframe's wgpu configuration: the adapter `Gpu::new` would pick (among those that can draw
/// to the window; `WGPU_ADAPTER_NAME` picks by name), opened with [`device_descriptor`].
pub fn wgpu_configuration() -> eframe::egui_wgpu::WgpuConfiguration {
    use eframe::egui_wgpu::{WgpuConfiguration, WgpuSetupCreateNew};
    let mut setup = WgpuSetupCreateNew::without_display_handle();
    setup.native_adapter_selector = Some(Arc::new(|adapters, surface| {
        let wanted_name = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .map(|n| n.to_lowercase());
        let mut usable: Vec<&wgpu::Adapter> = adapters
            .iter()
            .filter(|a| surface.is_none_or(|s| a.is_surface_supported(s)))
            .filter(|a| {
                wanted_name
                    .as_ref()
                    .is_none_or(|n| a.get_info().name.to_lowercase().contains(n))
            })
            .collect();
        usable.sort_by_key(|a| type_rank(a.get_info().device_type));
        usable.first().map(|a| (*a).clone()).ok_or_else(|| {
            format!(
                "no adapter can draw to this window{} (found: {})",
                if wanted_name.is_some() {
                    " and match WGPU_ADAPTER_NAME"
                } else {
                    ""
                },
                adapters
                    .iter()
                    .map(|a| a.get_info().name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }));
    setup.device_descriptor = Arc::new(device_descriptor);
    WgpuConfiguration {
        wgpu_setup: setup.into(),
        ..Default::default()
    }
}

/// Wraps the device eframe opened.
pub fn gpu_from_render_state(rs: &eframe::egui_wgpu::RenderState) -> Gpu {
    Gpu::from_device(rs.adapter.clone(), rs.device.clone(), rs.queue.clone())
}
