//! `cargo run --release -p wgpt-app`: the desktop app.

use std::process::ExitCode;
use std::sync::Arc;
use wgpt_app::{device, WgptApp};

fn main() -> ExitCode {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("wgpt: GPT-2 on WGSL compute shaders")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([900.0, 600.0]),
        renderer: eframe::Renderer::Wgpu,
        wgpu_options: device::wgpu_configuration(),
        ..Default::default()
    };
    let result = eframe::run_native(
        "wgpt",
        options,
        Box::new(|cc| {
            let rs = cc.wgpu_render_state.as_ref().ok_or(
                "eframe started without its wgpu renderer; the app needs a Vulkan, Metal or DX12 adapter",
            )?;
            let gpu = Arc::new(device::gpu_from_render_state(rs));
            eprintln!("{}", gpu.summary());
            Ok(Box::new(WgptApp::new(gpu)))
        }),
    );
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
