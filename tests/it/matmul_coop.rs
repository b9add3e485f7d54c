//! The cooperative-matrix (tensor core) matmul kernel against the CPU reference, and the logic
//! that decides when it runs.
//!
//! On adapters with a 16x16 f16 cooperative-matrix configuration every launcher and epilogue
//! is forced onto each cooperative-matrix tile. Elsewhere those tests say why the real kernel is
//! skipped and run its emulated form instead (the same shader with the five cooperative-matrix
//! operations written out in plain WGSL), which checks everything but the operations
//! themselves; and the fallback to the tiled kernel is tested.

use crate::common::*;
use wgpt::gpu::{DType, Dispatch, Tensor};
use wgpt::ops::matmul::{
    self as mm, MatmulBackwardInput, MatmulBackwardWeight, MatmulForward, MatmulKernel, COOP_TILES,
};
use wgpt::reference::elementwise::{gelu, gelu_grad};
use wgpt::reference::matmul as cpu;

/// (M, K, N): one element; below one fragment; odd sizes across tiles with K not a multiple of
/// 16 or of the k step; K below one fragment; more than one 128x128 tile with ragged edges;
/// the same with every extent a multiple of 8 (16-byte packet loads; whole tiles stored
/// directly by f32 products that fuse nothing).
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (13, 9, 7),
    (37, 29, 53),
    (200, 3, 150),
    (130, 70, 200),
    (136, 72, 200),
];

/// Whether the cooperative-matrix kernel can run here, or else why not.
fn coop_unavailable() -> Option<&'static str> {
    let g = gpu();
    if !g.has_coop_mat16_f16_f32() {
        Some("offers no 16x16 f16 cooperative-matrix configuration")
    } else if !g.has_f16() {
        Some("has no SHADER_F16")
    } else if !g.has_subgroups() {
        Some("has no subgroup operations")
    } else {
        None
    }
}

/// The kernels a test checks: the cooperative-matrix kernel on every tile where the adapter has
/// cooperative matrices, else its emulated form where the adapter has f16 and subgroups (saying
/// so), else none (saying why).
fn kernels_under_test(test: &str) -> Vec<MatmulKernel> {
    let g = gpu();
    let Some(why) = coop_unavailable() else {
        return COOP_TILES.map(MatmulKernel::Coop).to_vec();
    };
    if g.has_f16() && g.has_subgroups() {
        eprintln!(
            "{test}: adapter '{}' {why}: cooperative-matrix kernel skipped, testing its emulated form",
            g.info.name
        );
        let limit = g.limits.max_compute_workgroup_storage_size;
        COOP_TILES
            .into_iter()
            .filter(|t| {
                let fits = t.workgroup_bytes() <= limit;
                if !fits {
                    eprintln!(
                        "{test}: tile {}x{} needs {} bytes of workgroup memory, the adapter \
                         offers {limit}: not run",
                        t.bm(),
                        t.bn(),
                        t.workgroup_bytes()
                    );
                }
                fits
            })
            .map(MatmulKernel::CoopEmulated)
            .collect()
    } else {
        eprintln!("{test}: adapter '{}' {why}: skipped", g.info.name);
        Vec::new()
    }
}

/// Whether the real cooperative-matrix kernel can run here; prints why not.
fn coop_adapter(test: &str) -> bool {
    match coop_unavailable() {
        None => true,
        Some(why) => {
            eprintln!("{test}: adapter '{}' {why}: skipped", gpu().info.name);
            false
        }
    }
}

fn uniform(seed: u64, n: usize) -> Vec<f32> {
    rng(seed).vec_uniform(n, -1.0, 1.0)
}

fn f16_input(label: &str, seed: u64, shape: &[usize]) -> (Tensor, Vec<f32>) {
    let n = shape.iter().product();
    upload(label, &uniform(seed, n), shape, DType::F16)
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

fn run(d: Dispatch) {
    gpu().run(&[&d]).unwrap();
}

fn tag(kernel: MatmulKernel, shape: (usize, usize, usize), extra: &str) -> String {
    format!("{kernel} {shape:?} {extra}")
}

/// matmul_forward on every tile: plain, f32 and f16 bias, GELU (pre f16 and f32), accumulate,
/// f16 and f32 outputs.
#[test]
fn forward_matches_reference_on_every_tile() {
    for tested in kernels_under_test("forward_matches_reference_on_every_tile") {
        let kernel = Some(tested);
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, k, n) = shape;
            let seed = 1000 + 10 * i as u64;
            let (x, xv) = f16_input("inp", seed, &[m, k]);
            let (w, wv) = f16_input("weight", seed + 1, &[n, k]);
            // (bias dtype, GELU pre-activation dtype, output dtype, accumulate)
            let cases = [
                (None, None, DType::F16, false),
                (Some(DType::F32), None, DType::F32, false),
                (Some(DType::F16), None, DType::F16, true),
                (Some(DType::F32), Some(DType::F16), DType::F16, false),
                (None, Some(DType::F32), DType::F32, true),
            ];
            for (bias_dt, pre_dt, out_dt, accumulate) in cases {
                let bias = bias_dt.map(|dt| upload("bias", &uniform(seed + 2, n), &[n], dt));
                let (out, start) = output("out", &[m, n], out_dt, accumulate, seed + 3);
                let pre = pre_dt.map(|dt| poisoned("pre", &[m, n], dt));
                let opts = MatmulForward {
                    bias: bias.as_ref().map(|b| &b.0),
                    gelu_pre: pre.as_ref(),
                    accumulate,
                    kernel,
                    out_columns: None,
                };
                run(mm::matmul_forward(gpu(), &out, &x, &w, &opts).unwrap());
                let mut y = vec![0.0; m * n];
                let bv = bias.as_ref().map(|b| &b.1[..]);
                cpu::matmul_forward(&mut y, &xv, &wv, bv, m, k, n);
                let what = tag(
                    tested,
                    shape,
                    &format!("forward bias={bias_dt:?} gelu={pre_dt:?} out={out_dt:?} accumulate={accumulate}"),
                );
                let mut each = false;
                if let (Some(pre), Some(pre_dt)) = (&pre, pre_dt) {
                    let got_pre = read(pre);
                    let tol = tol_for_output(pre_dt);
                    assert_close(&format!("{what} pre"), &got_pre, &round_to(&y, pre_dt), tol);
                    // GELU of the pre-activation as stored (just checked against the reference),
                    // as the kernel takes it: element by element, each output is one rounding of
                    // it, however small.
                    y = got_pre.iter().map(|&v| gelu(v)).collect();
                    each = out_dt == DType::F16;
                }
                let (got, want) = (read(&out), round_to(&add(&start, &y), out_dt));
                assert_close(&what, &got, &want, tol_for_output(out_dt));
                if each {
                    assert_f16_each(&what, &got, &want);
                }
            }
        }
    }
}

/// matmul_backward_input on every tile: plain and through a GELU (pre f16 and f32), overwrite
/// and accumulate, f16 and f32 outputs.
#[test]
fn backward_input_matches_reference_on_every_tile() {
    for tested in kernels_under_test("backward_input_matches_reference_on_every_tile") {
        let kernel = Some(tested);
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, k, n) = shape;
            let seed = 2000 + 10 * i as u64;
            let (dout, doutv) = f16_input("dout", seed, &[m, n]);
            let (w, wv) = f16_input("weight", seed + 1, &[n, k]);
            let mut base = vec![0.0; m * k];
            cpu::matmul_backward_input(&mut base, &doutv, &wv, m, k, n);
            let cases = [
                (None, DType::F16, false),
                (None, DType::F32, true),
                (Some(DType::F16), DType::F16, true),
                (Some(DType::F32), DType::F32, false),
            ];
            for (pre_dt, out_dt, accumulate) in cases {
                let pre = pre_dt.map(|dt| {
                    let values = rng(seed + 2).vec_uniform(m * k, -4.0, 4.0);
                    upload("pre", &values, &[m, k], dt)
                });
                let (dinp, start) = output("dinp", &[m, k], out_dt, accumulate, seed + 3);
                let opts = MatmulBackwardInput {
                    gelu_pre: pre.as_ref().map(|p| &p.0),
                    accumulate,
                    kernel,
                    ..Default::default()
                };
                run(mm::matmul_backward_input(gpu(), &dinp, &dout, &w, &opts).unwrap());
                let mut want = base.clone();
                if let Some((_, prev)) = &pre {
                    want = want
                        .iter()
                        .zip(prev)
                        .map(|(&g, &x)| g * gelu_grad(x))
                        .collect();
                }
                let what = tag(
                    tested,
                    shape,
                    &format!(
                        "backward input gelu={pre_dt:?} out={out_dt:?} accumulate={accumulate}"
                    ),
                );
                assert_close(
                    &what,
                    &read(&dinp),
                    &round_to(&add(&start, &want), out_dt),
                    tol_for_output(out_dt),
                );
            }
        }
    }
}

/// matmul_backward_weight on every tile, overwrite and accumulate, f32 and f16 outputs, and the
/// bias gradient with it (f32: the f16 values of dout summed in f32, within f32 rounding).
#[test]
fn backward_weight_matches_reference_on_every_tile() {
    for tested in kernels_under_test("backward_weight_matches_reference_on_every_tile") {
        let kernel = Some(tested);
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, k, n) = shape;
            let seed = 3000 + 10 * i as u64;
            let (dout, doutv) = f16_input("dout", seed, &[m, n]);
            let (x, xv) = f16_input("inp", seed + 1, &[m, k]);
            let mut want = vec![0.0; n * k];
            cpu::matmul_backward_weight(&mut want, &doutv, &xv, m, k, n);
            let mut want_b = vec![0.0; n];
            cpu::matmul_backward_bias(&mut want_b, &doutv, m, n);
            for (out_dt, accumulate) in
                [(DType::F32, false), (DType::F32, true), (DType::F16, false)]
            {
                let (dw, start) = output("dweight", &[n, k], out_dt, accumulate, seed + 2);
                let (db, start_b) = output("dbias", &[n], DType::F32, accumulate, seed + 3);
                let opts = MatmulBackwardWeight {
                    dbias: Some(&db),
                    accumulate,
                    kernel,
                    ..Default::default()
                };
                run(mm::matmul_backward_weight(gpu(), &dw, &dout, &x, &opts).unwrap());
                let what = tag(
                    tested,
                    shape,
                    &format!("backward weight out={out_dt:?} accumulate={accumulate}"),
                );
                assert_close(
                    &what,
                    &read(&dw),
                    &round_to(&add(&start, &want), out_dt),
                    tol_for_output(out_dt),
                );
                assert_close(
                    &format!("{what}: dbias"),
                    &read(&db),
                    &add(&start_b, &want_b),
                    1e-5,
                );
            }
        }
    }
}

/// Split-K weight gradients on every tile: M = 300 rows in 3 slices (128, 128 and a ragged 44),
/// overwrite and accumulate, f32 and f16 gradients, against the reference on the values as
/// stored (f16 products are exact in f32: within f32 rounding), and bitwise equal when rerun.
/// The operands load in 16-byte packets and the partials (f32, nothing fused) are stored
/// straight from the fragments where a whole tile lies inside the (136, 72) gradient. The bias
/// gradient goes along (its partials after the product's in the scratch).
#[test]
fn split_backward_weight_matches_reference_on_every_tile() {
    let (m, k, n, splits) = (300, 72, 136, 3);
    let shape = (m, k, n);
    let (dout, doutv) = f16_input("dout", 3500, &[m, n]);
    let (x, xv) = f16_input("inp", 3501, &[m, k]);
    let mut want = vec![0.0; n * k];
    cpu::matmul_backward_weight(&mut want, &doutv, &xv, m, k, n);
    let mut want_b = vec![0.0; n];
    cpu::matmul_backward_bias(&mut want_b, &doutv, m, n);
    let scratch = poisoned("scratch", &[splits * (n * k + n)], DType::F32);
    for tested in kernels_under_test("split_backward_weight_matches_reference_on_every_tile") {
        for (out_dt, accumulate, tol) in [
            (DType::F32, false, F32_TOL),
            (DType::F32, true, F32_TOL),
            (DType::F16, true, F16_ROUNDING),
        ] {
            let mut runs = Vec::new();
            for _ in 0..2 {
                let (dw, start) = output("dweight", &[n, k], out_dt, accumulate, 3502);
                let (db, start_b) = output("dbias", &[n], DType::F32, accumulate, 3503);
                let opts = MatmulBackwardWeight {
                    dbias: Some(&db),
                    accumulate,
                    kernel: Some(tested),
                    splits: Some(splits),
                    ..Default::default()
                };
                gpu().poison(&scratch).unwrap();
                let ds =
                    mm::matmul_backward_weight_split(gpu(), &dw, &dout, &x, Some(&scratch), &opts)
                        .unwrap();
                assert_eq!(
                    ds.len(),
                    2,
                    "{tested}: a forced split runs partials, then their sum"
                );
                for define in ["A_VEC=1", "B_VEC=1", "DIRECT_STORE=1"] {
                    let label = &ds[0].pipeline.label;
                    assert!(label.contains(define), "{label}");
                }
                gpu().run(&ds.iter().collect::<Vec<_>>()).unwrap();
                let what = tag(
                    tested,
                    shape,
                    &format!("split-K backward weight out={out_dt:?} accumulate={accumulate}"),
                );
                let got = read(&dw);
                assert_close(&what, &got, &round_to(&add(&start, &want), out_dt), tol);
                let got_b = read(&db);
                assert_close(
                    &format!("{what}: dbias"),
                    &got_b,
                    &add(&start_b, &want_b),
                    1e-5,
                );
                runs.push([got, got_b].concat());
            }
            assert_bitwise_eq(&format!("{tested} split-K run twice"), &runs[0], &runs[1]);
        }
    }
}

/// Two runs of each product on each tile are bitwise equal.
#[test]
fn coop_runs_are_bitwise_deterministic() {
    let (m, k, n) = (130, 70, 200);
    let (x, _) = f16_input("inp", 4000, &[m, k]);
    let (w, _) = f16_input("weight", 4001, &[n, k]);
    let (dout, _) = f16_input("dout", 4002, &[m, n]);
    let (b, _) = f16_input("bias", 4003, &[n]);
    for tested in kernels_under_test("coop_runs_are_bitwise_deterministic") {
        let kernel = Some(tested);
        let out = poisoned("out", &[m, n], DType::F16);
        let pre = poisoned("pre", &[m, n], DType::F32);
        let dinp = poisoned("dinp", &[m, k], DType::F32);
        let dw = poisoned("dweight", &[n, k], DType::F32);
        let db = poisoned("dbias", &[n], DType::F32);
        let fwd = mm::matmul_forward(
            gpu(),
            &out,
            &x,
            &w,
            &MatmulForward {
                bias: Some(&b),
                gelu_pre: Some(&pre),
                kernel,
                ..Default::default()
            },
        )
        .unwrap();
        let opts = MatmulBackwardInput {
            kernel,
            ..Default::default()
        };
        let bwd_in = mm::matmul_backward_input(gpu(), &dinp, &dout, &w, &opts).unwrap();
        let opts = MatmulBackwardWeight {
            dbias: Some(&db),
            kernel,
            ..Default::default()
        };
        let bwd_w = mm::matmul_backward_weight(gpu(), &dw, &dout, &x, &opts).unwrap();
        let all = [&fwd, &bwd_in, &bwd_w];
        let outputs = [&out, &pre, &dinp, &dw, &db];
        gpu().run(&all).unwrap();
        let first: Vec<Vec<f32>> = outputs.iter().map(|t| read(t)).collect();
        for t in outputs {
            gpu().poison(t).unwrap();
        }
        gpu().run(&all).unwrap();
        for (t, a) in outputs.iter().zip(&first) {
            assert_bitwise_eq(&format!("{tested} run twice"), &read(t), a);
        }
    }
}

/// With cooperative matrices available, the self-check decides; a passing one means the
/// launchers pick the cooperative-matrix kernel for f16 operands only.
#[test]
fn auto_choice_follows_the_self_check() {
    if !coop_adapter("auto_choice_follows_the_self_check") {
        return;
    }
    let status = mm::coop_matmul_status(gpu());
    eprintln!("self-check: {status:?}");
    for tile in COOP_TILES {
        let err = mm::agreement_with_tiled(gpu(), MatmulKernel::Coop(tile));
        eprintln!(
            "coop {}x{} against the tiled kernel: {err:?}",
            tile.bm(),
            tile.bn()
        );
        // The kernel matches the reference in the tests above, so it must pass the self-check.
        assert!(err.is_ok(), "{err:?}");
    }
    let f16_kernel = mm::auto_kernel(gpu(), 4096, 768, DType::F16, DType::F16).unwrap();
    match status {
        Ok(()) => assert!(matches!(f16_kernel, MatmulKernel::Coop(_)), "{f16_kernel}"),
        Err(_) => assert!(matches!(f16_kernel, MatmulKernel::Tiled(_)), "{f16_kernel}"),
    }
    for (a, b) in [
        (DType::F32, DType::F32),
        (DType::F16, DType::F32),
        (DType::F32, DType::F16),
    ] {
        let kernel = mm::auto_kernel(gpu(), 4096, 768, a, b).unwrap();
        assert!(
            matches!(kernel, MatmulKernel::Tiled(_)),
            "{a:?} x {b:?}: {kernel}"
        );
    }
}

/// Without cooperative matrices the status says why, f16 products run on the tiled kernel, and
/// forcing the cooperative-matrix kernel is an error, not a panic.
#[test]
fn without_cooperative_matrices_the_tiled_kernel_runs() {
    let g = gpu();
    let status = mm::coop_matmul_status(g);
    eprintln!("cooperative matrices: {status:?}");
    if g.has_coop_mat16_f16_f32() {
        eprintln!(
            "adapter '{}' has cooperative matrices: the fallback is not exercised here",
            g.info.name
        );
        return;
    }
    let why = status.expect_err("no cooperative matrices, yet enabled");
    assert!(
        why.contains(&g.info.name) || why.contains("WGPT_NO_COOPMAT"),
        "{why}"
    );
    assert!(mm::best_coop_kernel(g, 100, 100).is_err());
    let dtypes = if g.has_f16() {
        vec![DType::F16, DType::F32]
    } else {
        vec![DType::F32]
    };
    for dt in dtypes {
        let kernel = mm::auto_kernel(g, 130, 200, dt, dt).unwrap();
        assert!(matches!(kernel, MatmulKernel::Tiled(_)), "{dt:?}: {kernel}");
        let (m, k, n) = (37, 29, 53);
        let (x, _) = upload("inp", &uniform(5000, m * k), &[m, k], dt);
        let (w, _) = upload("weight", &uniform(5001, n * k), &[n, k], dt);
        let out = poisoned("out", &[m, n], dt);
        let d = mm::matmul_forward(g, &out, &x, &w, &MatmulForward::default()).unwrap();
        assert!(
            d.pipeline.label.contains("matmul_tiled"),
            "{}",
            d.pipeline.label
        );
        if dt == DType::F16 {
            let forced = MatmulForward {
                kernel: Some(MatmulKernel::Coop(COOP_TILES[0])),
                ..Default::default()
            };
            let e = mm::matmul_forward(g, &out, &x, &w, &forced)
                .err()
                .expect("must be refused");
            assert!(e.to_string().contains("cooperative-matrix"), "{e}");
        }
    }
}

/// The self-check's machinery on any adapter with f16: correct candidates pass it, a tiled one
/// exactly (the tiled kernel's sums do not depend on its tile), the emulated cooperative-matrix
/// kernel within the bound of each output's type (f32 rounding for f32 products, one f16
/// rounding for the f16 forward output).
#[test]
fn self_check_passes_correct_candidates() {
    if !gpu().has_f16() {
        eprintln!("adapter has no SHADER_F16: the self-check runs f16 products: skipped");
        return;
    }
    // The largest tile (and k step) the adapter holds for f16 operands.
    let limit = gpu().limits.max_compute_workgroup_storage_size;
    let largest = mm::TILE_CONFIGS
        .into_iter()
        .find(|t| t.workgroup_bytes_staged(true) <= limit)
        .unwrap();
    let candidate = MatmulKernel::Tiled(largest);
    let err = mm::agreement_with_tiled(gpu(), candidate).unwrap();
    eprintln!("{candidate} against the tiled 64x64 kernel: relative difference {err:.3e}");
    assert_eq!(err, 0.0);
    if !gpu().has_subgroups() {
        eprintln!("adapter has no subgroup operations: emulated candidates skipped");
        return;
    }
    let limit = gpu().limits.max_compute_workgroup_storage_size;
    for tile in COOP_TILES
        .into_iter()
        .filter(|t| t.workgroup_bytes() <= limit)
    {
        let candidate = MatmulKernel::CoopEmulated(tile);
        // Err unless each output is within its type's bound (mm::self_check_tolerance).
        let err = mm::agreement_with_tiled(gpu(), candidate).unwrap();
        eprintln!("{candidate} against the tiled 64x64 kernel: relative difference {err:.3e}");
        assert!(err <= mm::SELF_CHECK_F16_TOLERANCE, "{err}");
    }
}

/// Forcing the cooperative-matrix kernel on f32 operands is refused, on any adapter.
#[test]
fn coop_kernel_refuses_f32_operands() {
    let (m, k, n) = (37, 29, 53);
    let x = gpu().zeros("inp", &[m, k], DType::F32).unwrap();
    let w = gpu().zeros("weight", &[n, k], DType::F32).unwrap();
    let out = gpu().zeros("out", &[m, n], DType::F32).unwrap();
    let forced = MatmulForward {
        kernel: Some(MatmulKernel::Coop(COOP_TILES[3])),
        ..Default::default()
    };
    let e = mm::matmul_forward(gpu(), &out, &x, &w, &forced)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(e.contains("matmul_forward") && e.contains("f16"), "{e}");
}

/// Every `matmul_coop` specialisation goes through naga's SPIR-V writer with the options the
/// Vulkan backend uses (SPIR-V 1.6, clamped indices), on any adapter: the cooperative-matrix
/// code path is otherwise only compiled where an adapter offers it.
#[test]
fn coop_variants_translate_to_spirv() {
    use naga::back::spv;
    let source = wgpt::gpu::shader::source("matmul_coop").unwrap();
    let variants: Vec<_> = wgpt::ops::shader_variants()
        .into_iter()
        .filter(|v| v.shader == "matmul_coop")
        .collect();
    assert!(!variants.is_empty());
    let mut options = spv::Options {
        lang_version: (1, 6),
        ..Default::default()
    };
    options.bounds_check_policies = naga::proc::BoundsCheckPolicies {
        index: naga::proc::BoundsCheckPolicy::Restrict,
        buffer: naga::proc::BoundsCheckPolicy::Restrict,
        image_load: naga::proc::BoundsCheckPolicy::Restrict,
        binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "matmul_coop".into(),
    };
    for v in &variants {
        let emulated = v.defines.iter().any(|(k, _)| k == "EMULATE_COOP");
        let text = wgpt::gpu::shader::preprocess("matmul_coop", source, &v.defines).unwrap();
        let module = naga::front::wgsl::parse_str(&text).unwrap();
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .unwrap_or_else(|e| panic!("{:?}: {e:?}", v.defines));
        let words = spv::write_vec(&module, &info, &options, Some(&pipeline))
            .unwrap_or_else(|e| panic!("{:?}: {e}", v.defines));
        if emulated {
            continue;
        }
        // The cooperative loads (OpCooperativeMatrixLoadKHR = 4457), store (4458) and
        // multiply-adds (4459) must all be there; instructions follow the 5-word header, each
        // with its word count in the high half of its first word.
        let mut seen = [false; 3];
        let mut i = 5;
        while i < words.len() {
            let opcode = words[i] & 0xffff;
            if (4457..=4459).contains(&opcode) {
                seen[(opcode - 4457) as usize] = true;
            }
            i += ((words[i] >> 16) as usize).max(1);
        }
        assert_eq!(
            seen, [true; 3],
            "{:?}: cooperative load, store, multiply-add",
            v.defines
        );
    }
    eprintln!("{} matmul_coop variants written as SPIR-V", variants.len());
}
