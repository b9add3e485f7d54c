//! The GPU context: wgpu errors become `Err` values (never aborts), the pipeline cache, limits.

mod common;
use common::*;
use wgpt::gpu::DType;

fn bad_buffer(g: &wgpt::Gpu) -> wgpu::Buffer {
    // MAP_READ cannot be combined with STORAGE: a validation error.
    g.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("invalid on purpose"),
        size: 256,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    })
}

#[test]
fn validation_errors_become_errors() {
    let g = gpu();
    let e = g
        .scoped("making a bad buffer", || bad_buffer(g))
        .unwrap_err()
        .to_string();
    assert!(e.contains("making a bad buffer"), "{e}");
}

#[test]
fn errors_outside_a_scope_are_reported_not_fatal() {
    // A separate device: this test leaves an error pending on it on purpose.
    let g = wgpt::Gpu::new(&wgpt::GpuOptions::default()).unwrap();
    let _b = bad_buffer(&g);
    let e = g.check_lost().unwrap_err().to_string();
    assert!(e.contains("GPU"), "{e}");
    // reported once, then the device carries on
    g.check_lost().unwrap();
    let t = g.upload("x", &[1.0, 2.0], &[2], DType::F32).unwrap();
    assert_eq!(g.read(&t).unwrap(), vec![1.0, 2.0]);
}

#[test]
fn pipelines_are_cached_by_key() {
    let g = gpu();
    let a = g.zeros("a", &[10], DType::F32).unwrap();
    let b = g.zeros("b", &[10], DType::F32).unwrap();
    let d1 = wgpt::ops::elementwise::gelu_forward(g, &b, &a).unwrap();
    let d2 = wgpt::ops::elementwise::gelu_forward(g, &a, &b).unwrap();
    assert!(std::sync::Arc::ptr_eq(&d1.pipeline, &d2.pipeline));
    let c = g.zeros("c", &[10], DType::F16);
    if let Ok(c) = c {
        if g.has_f16() {
            let d3 = wgpt::ops::elementwise::gelu_forward(g, &c, &a).unwrap();
            assert!(!std::sync::Arc::ptr_eq(&d1.pipeline, &d3.pipeline));
        }
    }
}

#[test]
fn oversized_tensors_are_refused_before_allocation() {
    let g = gpu();
    let max = g
        .limits
        .max_buffer_size
        .min(g.limits.max_storage_buffer_binding_size);
    let n = (max / 4 + 1) as usize;
    let e = g.zeros("huge", &[n], DType::F32).unwrap_err().to_string();
    assert!(
        e.contains("huge") && e.contains("MiB") && e.contains(&g.info.name),
        "{e}"
    );
}

#[test]
fn summary_names_adapter_and_features() {
    let s = gpu().summary();
    assert!(
        s.contains(&gpu().info.name) && s.contains("features:"),
        "{s}"
    );
    assert_eq!(s.contains("shader-f16"), gpu().has_f16());
}
