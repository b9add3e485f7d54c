//! The GPU context: wgpu errors become `Err` values (never aborts), the pipeline cache, limits.

use crate::common::*;
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

/// Dispatches' uniform blocks share buffers, packed at the adapter's offset alignment: 600
/// fills recorded before any submission (600 blocks: several 64 KiB buffers at a 256-byte
/// alignment) each write their own value into their own slice, all run in one submission.
#[test]
fn uniform_blocks_share_buffers_and_keep_their_values() {
    let g = gpu();
    let (count, width) = (600, g.alignment() as usize / 4);
    let out = g.zeros("out", &[count * width], DType::F32).unwrap();
    let fills: Vec<_> = (0..count)
        .map(|i| {
            let slice = out.slice(i * width, &[width], g.alignment()).unwrap();
            wgpt::ops::elementwise::fill(g, &slice, i as f32 + 0.5).unwrap()
        })
        .collect();
    g.run(&fills.iter().collect::<Vec<_>>()).unwrap();
    let got = read(&out);
    for i in 0..count {
        let want = i as f32 + 0.5;
        let bad = got[i * width..(i + 1) * width].iter().find(|&&x| x != want);
        assert!(bad.is_none(), "fill {i}: {bad:?} instead of {want}");
    }
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

#[test]
fn shader_checks_are_off_unless_asked_for() {
    use std::ffi::OsStr;
    use wgpt::gpu::shader_checks_from_env as checks;
    assert!(!checks(None));
    for off in ["", "0", "false", "off", "no"] {
        assert!(!checks(Some(OsStr::new(off))), "{off:?}");
    }
    for on in ["1", "true", "ON", " yes "] {
        assert!(checks(Some(OsStr::new(on))), "{on:?}");
    }
}

#[test]
fn kernels_agree_with_and_without_runtime_checks() {
    // The same matmul (odd shape, ragged tiles) through shaders made with wgpu's runtime checks
    // and through the default trusted ones: both equal the CPU reference, bit for bit each other.
    use wgpt::ops::matmul::{matmul_forward, MatmulForward};
    use wgpt::reference::matmul as cpu;
    let (m, k, n) = (37, 29, 53);
    let mut r = rng(5);
    let a: Vec<f32> = (0..m * k).map(|_| r.normal() as f32).collect();
    // PyTorch layout: (N, K).
    let w: Vec<f32> = (0..n * k).map(|_| r.normal() as f32).collect();
    let mut outs = Vec::new();
    for checks in [true, false] {
        let mut g = wgpt::Gpu::new(&wgpt::gpu::GpuOptions {
            pipeline_cache_dir: None,
            ..Default::default()
        })
        .unwrap();
        g.shader_checks = checks;
        let at = g.upload("a", &a, &[m, k], DType::F32).unwrap();
        let wt = g.upload("w", &w, &[n, k], DType::F32).unwrap();
        let out = g.zeros("out", &[m, n], DType::F32).unwrap();
        g.poison(&out).unwrap();
        let d = matmul_forward(&g, &out, &at, &wt, &MatmulForward::default()).unwrap();
        g.run(&[&d]).unwrap();
        outs.push(g.read(&out).unwrap());
    }
    let mut want = vec![0.0; m * n];
    cpu::matmul_forward(&mut want, &a, &w, None, m, k, n);
    assert_close("with runtime checks", &outs[0], &want, 1e-5);
    assert_close("without runtime checks", &outs[1], &want, 1e-5);
    assert_bitwise_eq("with vs without checks", &outs[1], &outs[0]);
}

#[test]
fn pipeline_cache_is_written_whole_and_read_back() {
    let dir = std::env::temp_dir().join(format!("wgpt-pipeline-cache-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    let options = wgpt::gpu::GpuOptions {
        pipeline_cache_dir: Some(dir.clone()),
        ..Default::default()
    };
    let cast = |g: &wgpt::Gpu| {
        let x = g.upload("x", &[1.0, -2.5, 3.25], &[3], DType::F32).unwrap();
        let y = g.zeros("y", &[3], DType::F16).unwrap();
        let d = wgpt::ops::elementwise::cast(g, &y, &x).unwrap();
        g.run(&[&d]).unwrap();
        g.read(&y).unwrap()
    };
    let g = wgpt::Gpu::new(&options).unwrap();
    let path = g
        .pipeline_cache_path()
        .expect("Vulkan devices offer PIPELINE_CACHE")
        .to_path_buf();
    assert!(path.starts_with(&dir));
    assert!(!g.save_pipeline_cache().unwrap(), "nothing compiled yet");
    assert_eq!(cast(&g), [1.0, -2.5, 3.25]);
    assert!(g.save_pipeline_cache().unwrap(), "a pipeline was compiled");
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.is_empty());
    // No temporary file is left beside it.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    drop(g);
    // A second device starts from the file and computes the same.
    let g2 = wgpt::Gpu::new(&options).unwrap();
    assert_eq!(cast(&g2), [1.0, -2.5, 3.25]);
    drop(g2);
    // A corrupt file only means compiling anew.
    std::fs::write(&path, b"not a pipeline cache").unwrap();
    let g3 = wgpt::Gpu::new(&options).unwrap();
    assert_eq!(cast(&g3), [1.0, -2.5, 3.25]);
    drop(g3);
    std::fs::remove_dir_all(&dir).ok();
}
