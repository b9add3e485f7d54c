//! The Linear-layer products and the bias gradient (summed with the weight gradient) against
//! the CPU reference.

use crate::common::*;
use wgpt::gpu::{DType, Tensor};
use wgpt::ops::matmul::{
    self as mm, MatmulBackwardInput, MatmulBackwardWeight, MatmulForward, MatmulKernel, TileConfig,
    TILE_CONFIGS,
};
use wgpt::reference::elementwise::{gelu, gelu_grad};
use wgpt::reference::matmul as cpu;

/// (M, K, N): one element; odd sizes below and above a tile with K not a multiple of the k step;
/// exactly one 64x64 tile.
const SHAPES: [(usize, usize, usize); 4] = [(1, 1, 1), (37, 29, 53), (130, 70, 200), (64, 64, 64)];

fn uniform(seed: u64, n: usize) -> Vec<f32> {
    rng(seed).vec_uniform(n, -1.0, 1.0)
}

fn forward_want(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    (m, k, n): (usize, usize, usize),
) -> Vec<f32> {
    let mut want = vec![0.0; m * n];
    cpu::matmul_forward(&mut want, x, w, bias, m, k, n);
    want
}

fn backward_input_want(dout: &[f32], w: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    let mut want = vec![0.0; m * k];
    cpu::matmul_backward_input(&mut want, dout, w, m, k, n);
    want
}

fn backward_weight_want(dout: &[f32], x: &[f32], (m, k, n): (usize, usize, usize)) -> Vec<f32> {
    let mut want = vec![0.0; n * k];
    cpu::matmul_backward_weight(&mut want, dout, x, m, k, n);
    want
}

fn bias_want(dout: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut want = vec![0.0; n];
    cpu::matmul_backward_bias(&mut want, dout, m, n);
    want
}

/// `matmul_backward_weight` (with the bias gradient `db` when given) with `accumulate` and a
/// forced `kernel` (None: the launcher's).
fn backward_weight(
    dw: &Tensor,
    db: Option<&Tensor>,
    dout: &Tensor,
    x: &Tensor,
    accumulate: bool,
    kernel: Option<MatmulKernel>,
) -> wgpt::Result<wgpt::Dispatch> {
    let opts = MatmulBackwardWeight {
        dbias: db,
        accumulate,
        kernel,
        ..Default::default()
    };
    mm::matmul_backward_weight(gpu(), dw, dout, x, &opts)
}

fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// The inputs of a forward product at `shape`, stored as `dtype`.
struct Forward {
    x: Tensor,
    w: Tensor,
    b: Tensor,
    xv: Vec<f32>,
    wv: Vec<f32>,
    bv: Vec<f32>,
}

fn forward_inputs(seed: u64, (m, k, n): (usize, usize, usize), dtype: DType) -> Forward {
    let (x, xv) = upload("inp", &uniform(seed, m * k), &[m, k], dtype);
    let (w, wv) = upload("weight", &uniform(seed + 1, n * k), &[n, k], dtype);
    let (b, bv) = upload("bias", &uniform(seed + 2, n), &[n], dtype);
    Forward {
        x,
        w,
        b,
        xv,
        wv,
        bv,
    }
}

#[test]
fn forward_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, _, n) = shape;
            let f = forward_inputs(10 * i as u64, shape, dtype);
            for with_bias in [false, true] {
                let out = poisoned("out", &[m, n], dtype);
                let opts = MatmulForward {
                    bias: with_bias.then_some(&f.b),
                    ..Default::default()
                };
                gpu()
                    .run(&[&mm::matmul_forward(gpu(), &out, &f.x, &f.w, &opts).unwrap()])
                    .unwrap();
                let want = forward_want(&f.xv, &f.wv, with_bias.then_some(&f.bv[..]), shape);
                assert_close(
                    &format!("matmul_forward {dtype:?} {shape:?} bias={with_bias}"),
                    &read(&out),
                    &round_to(&want, dtype),
                    tol_for_output(dtype),
                );
            }
        }
    }
}

#[test]
fn forward_f16_inputs_f32_output() {
    if !gpu().has_f16() {
        eprintln!("adapter has no SHADER_F16: skipped");
        return;
    }
    for (i, &shape) in SHAPES.iter().enumerate() {
        let (m, _, n) = shape;
        let f = forward_inputs(20 + i as u64, shape, DType::F16);
        let (b, bv) = upload("bias", &uniform(30 + i as u64, n), &[n], DType::F32);
        let out = poisoned("out", &[m, n], DType::F32);
        let opts = MatmulForward {
            bias: Some(&b),
            ..Default::default()
        };
        gpu()
            .run(&[&mm::matmul_forward(gpu(), &out, &f.x, &f.w, &opts).unwrap()])
            .unwrap();
        let want = forward_want(&f.xv, &f.wv, Some(&bv), shape);
        // An f32 output: within f32 rounding of the reference on the f16 values as stored.
        assert_close(
            &format!("matmul_forward f16->f32 {shape:?}"),
            &read(&out),
            &want,
            F32_TOL,
        );
    }
}

#[test]
fn forward_gelu_epilogue_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, _, n) = shape;
            let with_bias = i % 2 == 1;
            let f = forward_inputs(40 + i as u64, shape, dtype);
            let out = poisoned("out", &[m, n], dtype);
            let pre = poisoned("pre", &[m, n], dtype);
            let opts = MatmulForward {
                bias: with_bias.then_some(&f.b),
                gelu_pre: Some(&pre),
                ..Default::default()
            };
            gpu()
                .run(&[&mm::matmul_forward(gpu(), &out, &f.x, &f.w, &opts).unwrap()])
                .unwrap();
            let pre_want = round_to(
                &forward_want(&f.xv, &f.wv, with_bias.then_some(&f.bv[..]), shape),
                dtype,
            );
            let what = format!("matmul_forward+gelu {dtype:?} {shape:?} bias={with_bias}");
            let got_pre = read(&pre);
            assert_close(
                &format!("{what} pre"),
                &got_pre,
                &pre_want,
                tol_for_output(dtype),
            );
            // GELU of the pre-activation as stored (just checked), as the kernel takes it.
            let out_want = round_to(&got_pre.iter().map(|&x| gelu(x)).collect::<Vec<_>>(), dtype);
            assert_each_output(&format!("{what} out"), &read(&out), &out_want, dtype);
        }
    }
}

#[test]
fn forward_accumulate_adds_to_output() {
    for dtype in float_dtypes() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, _, n) = shape;
            let f = forward_inputs(50 + i as u64, shape, dtype);
            for with_gelu in [false, true] {
                let (out, start) = upload("out", &uniform(60 + i as u64, m * n), &[m, n], dtype);
                let pre = poisoned("pre", &[m, n], dtype);
                let opts = MatmulForward {
                    bias: Some(&f.b),
                    gelu_pre: with_gelu.then_some(&pre),
                    accumulate: true,
                    ..Default::default()
                };
                gpu()
                    .run(&[&mm::matmul_forward(gpu(), &out, &f.x, &f.w, &opts).unwrap()])
                    .unwrap();
                let what =
                    format!("matmul_forward accumulate {dtype:?} {shape:?} gelu={with_gelu}");
                // The sum is added to the output in f32 and rounded once; with GELU, the GELU
                // of the pre-activation as stored.
                let mut y = forward_want(&f.xv, &f.wv, Some(&f.bv), shape);
                if with_gelu {
                    let pre_want = round_to(&y, dtype);
                    let got_pre = read(&pre);
                    let tol = tol_for_output(dtype);
                    assert_close(&format!("{what} pre"), &got_pre, &pre_want, tol);
                    y = got_pre.iter().map(|&x| gelu(x)).collect();
                }
                assert_close(
                    &what,
                    &read(&out),
                    &round_to(&add(&start, &y), dtype),
                    tol_for_output(dtype),
                );
            }
        }
    }
}

#[test]
fn backward_input_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, k, n) = shape;
            let (dout, doutv) = upload("dout", &uniform(70 + i as u64, m * n), &[m, n], dtype);
            let (w, wv) = upload("weight", &uniform(80 + i as u64, n * k), &[n, k], dtype);
            let (pre, prev) = upload(
                "pre",
                &rng(90 + i as u64).vec_uniform(m * k, -4.0, 4.0),
                &[m, k],
                dtype,
            );
            let base = backward_input_want(&doutv, &wv, shape);
            for with_gelu in [false, true] {
                for accumulate in [false, true] {
                    let (dinp, start) = if accumulate {
                        upload("dinp", &uniform(100 + i as u64, m * k), &[m, k], dtype)
                    } else {
                        (poisoned("dinp", &[m, k], dtype), vec![0.0; m * k])
                    };
                    let opts = MatmulBackwardInput {
                        gelu_pre: with_gelu.then_some(&pre),
                        accumulate,
                        ..Default::default()
                    };
                    gpu()
                        .run(&[&mm::matmul_backward_input(gpu(), &dinp, &dout, &w, &opts).unwrap()])
                        .unwrap();
                    let mut want = base.clone();
                    if with_gelu {
                        want = want
                            .iter()
                            .zip(&prev)
                            .map(|(&g, &x)| g * gelu_grad(x))
                            .collect();
                    }
                    assert_close(
                        &format!("matmul_backward_input {dtype:?} {shape:?} gelu={with_gelu} accumulate={accumulate}"),
                        &read(&dinp),
                        &round_to(&add(&start, &want), dtype),
                        tol_for_output(dtype),
                    );
                }
            }
        }
    }
}

#[test]
fn backward_weight_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &shape) in SHAPES.iter().enumerate() {
            let (m, k, n) = shape;
            let (dout, doutv) = upload("dout", &uniform(110 + i as u64, m * n), &[m, n], dtype);
            let (x, xv) = upload("inp", &uniform(120 + i as u64, m * k), &[m, k], dtype);
            let want = backward_weight_want(&doutv, &xv, shape);
            let want_b = bias_want(&doutv, m, n);
            for accumulate in [false, true] {
                // Weight and bias gradients are f32 whatever the activations are.
                let seed = 130 + i as u64;
                let (dw, start) = output("dweight", &[n, k], DType::F32, accumulate, seed);
                let (db, start_b) = output("dbias", &[n], DType::F32, accumulate, seed + 20);
                let tag = format!("{dtype:?} {shape:?} accumulate={accumulate}");
                gpu()
                    .run(&[&backward_weight(&dw, Some(&db), &dout, &x, accumulate, None).unwrap()])
                    .unwrap();
                assert_close(
                    &format!("matmul_backward_weight {tag}"),
                    &read(&dw),
                    &add(&start, &want),
                    F32_TOL,
                );
                assert_close(
                    &format!("matmul_backward_weight's dbias {tag}"),
                    &read(&db),
                    &add(&start_b, &want_b),
                    1e-5,
                );
            }
        }
    }
}

/// The bias gradient over many rows and row tiles (M = 1000 sums over many k steps, N = 300
/// spans several row tiles of any kernel, the last one ragged), against the reference, and the
/// weight gradient unchanged by it: bitwise equal to the same product without dbias.
#[test]
fn bias_gradient_with_the_weight_gradient() {
    let (m, k, n) = (1000, 24, 300);
    for dtype in float_dtypes() {
        let (dout, doutv) = upload("dout", &uniform(140, m * n), &[m, n], dtype);
        let (x, _) = upload("inp", &uniform(141, m * k), &[m, k], dtype);
        let db = poisoned("dbias", &[n], DType::F32);
        let dw = poisoned("dweight", &[n, k], DType::F32);
        let alone = poisoned("dweight", &[n, k], DType::F32);
        gpu()
            .run(&[
                &backward_weight(&dw, Some(&db), &dout, &x, false, None).unwrap(),
                &backward_weight(&alone, None, &dout, &x, false, None).unwrap(),
            ])
            .unwrap();
        assert_close(
            &format!("dbias {dtype:?} (M {m}, N {n})"),
            &read(&db),
            &bias_want(&doutv, m, n),
            1e-5,
        );
        assert_bitwise_eq("dweight with and without dbias", &read(&dw), &read(&alone));
    }
}

/// Small shapes make the launcher pick the smallest tile; every tile and k step the adapter's
/// workgroup memory holds is forced here, on shapes that are not multiples of any tile: element
/// loads (K = 70 and 3, below one k step, N = 150) and 16-byte packet loads (every extent a
/// multiple of 8: f32 and f16 packets), with ragged tiles at the edges.
#[test]
fn every_tile_config_matches_reference() {
    let shapes = [(130, 70, 200), (200, 3, 150), (136, 72, 200)];
    let limit = gpu().limits.max_compute_workgroup_storage_size;
    for tile in TILE_CONFIGS {
        let kernel = Some(MatmulKernel::Tiled(tile));
        for dtype in float_dtypes() {
            // Operands staged in f16 when both are f16, else f32: larger tiles need more.
            let need = tile.workgroup_bytes_staged(dtype == DType::F16);
            if need > limit {
                eprintln!(
                    "{dtype:?} tile {}x{} k step {}: needs {need} bytes of workgroup memory, the \
                     adapter offers {limit}: not run",
                    tile.bm(),
                    tile.bn(),
                    tile.bk
                );
                continue;
            }
            for (i, &shape) in shapes.iter().enumerate() {
                let (m, k, n) = shape;
                let seed = 200 + 10 * i as u64;
                let tag = format!(
                    "{dtype:?} {shape:?} tile {}x{} k step {}",
                    tile.bm(),
                    tile.bn(),
                    tile.bk
                );

                let f = forward_inputs(seed, shape, dtype);
                let out = poisoned("out", &[m, n], dtype);
                let opts = MatmulForward {
                    bias: Some(&f.b),
                    kernel,
                    ..Default::default()
                };
                let d = mm::matmul_forward(gpu(), &out, &f.x, &f.w, &opts).unwrap();
                // Packets where every extent allows them (K = 72), elements elsewhere.
                let packets = k % 8 == 0;
                for operand in ["A_VEC", "B_VEC"] {
                    let want = format!("{operand}={}", u8::from(packets));
                    assert!(d.pipeline.label.contains(&want), "{}", d.pipeline.label);
                }
                gpu().run(&[&d]).unwrap();
                let want = forward_want(&f.xv, &f.wv, Some(&f.bv), shape);
                assert_close(
                    &format!("matmul_forward {tag}"),
                    &read(&out),
                    &round_to(&want, dtype),
                    tol_for_output(dtype),
                );

                let (dout, doutv) = upload("dout", &uniform(seed + 5, m * n), &[m, n], dtype);
                let dinp = poisoned("dinp", &[m, k], dtype);
                let opts = MatmulBackwardInput {
                    kernel,
                    ..Default::default()
                };
                gpu()
                    .run(&[&mm::matmul_backward_input(gpu(), &dinp, &dout, &f.w, &opts).unwrap()])
                    .unwrap();
                let want = backward_input_want(&doutv, &f.wv, shape);
                assert_close(
                    &format!("matmul_backward_input {tag}"),
                    &read(&dinp),
                    &round_to(&want, dtype),
                    tol_for_output(dtype),
                );

                let dw = poisoned("dweight", &[n, k], DType::F32);
                let db = poisoned("dbias", &[n], DType::F32);
                let d = backward_weight(&dw, Some(&db), &dout, &f.x, false, kernel).unwrap();
                gpu().run(&[&d]).unwrap();
                let want = backward_weight_want(&doutv, &f.xv, shape);
                assert_close(
                    &format!("matmul_backward_weight {tag}"),
                    &read(&dw),
                    &want,
                    F32_TOL,
                );
                assert_close(
                    &format!("matmul_backward_weight's dbias {tag}"),
                    &read(&db),
                    &bias_want(&doutv, m, n),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn leading_dimensions_are_flattened() {
    // inp (B, T, K) = (3, 5, 29) with weight (53, 29): M = 15.
    let shape = (15, 29, 53);
    let (x, xv) = upload("inp", &uniform(300, 15 * 29), &[3, 5, 29], DType::F32);
    let (w, wv) = upload("weight", &uniform(301, 53 * 29), &[53, 29], DType::F32);
    let out = poisoned("out", &[3, 5, 53], DType::F32);
    gpu()
        .run(&[&mm::matmul_forward(gpu(), &out, &x, &w, &MatmulForward::default()).unwrap()])
        .unwrap();
    assert_close(
        "matmul_forward (3, 5, 29)",
        &read(&out),
        &forward_want(&xv, &wv, None, shape),
        1e-5,
    );
}

#[test]
fn runs_are_bitwise_deterministic() {
    let shape = (130, 70, 200);
    let (m, k, n) = shape;
    let f = forward_inputs(400, shape, DType::F32);
    let (dout, _) = upload("dout", &uniform(401, m * n), &[m, n], DType::F32);
    let out = poisoned("out", &[m, n], DType::F32);
    let pre = poisoned("pre", &[m, n], DType::F32);
    let dinp = poisoned("dinp", &[m, k], DType::F32);
    let dw = poisoned("dweight", &[n, k], DType::F32);
    let db = poisoned("dbias", &[n], DType::F32);
    let fwd = mm::matmul_forward(
        gpu(),
        &out,
        &f.x,
        &f.w,
        &MatmulForward {
            bias: Some(&f.b),
            gelu_pre: Some(&pre),
            ..Default::default()
        },
    )
    .unwrap();
    let bwd_in =
        mm::matmul_backward_input(gpu(), &dinp, &dout, &f.w, &MatmulBackwardInput::default())
            .unwrap();
    let bwd_w = backward_weight(&dw, Some(&db), &dout, &f.x, false, None).unwrap();
    let all = [&fwd, &bwd_in, &bwd_w];
    let outputs = [&out, &pre, &dinp, &dw, &db];
    gpu().run(&all).unwrap();
    let first: Vec<Vec<f32>> = outputs.iter().map(|t| read(t)).collect();
    for t in outputs {
        gpu().poison(t).unwrap();
    }
    gpu().run(&all).unwrap();
    for (t, a) in outputs.iter().zip(&first) {
        assert_bitwise_eq("matmul run twice", &read(t), a);
    }
}

#[test]
fn flops_count_multiply_adds_twice() {
    assert_eq!(
        mm::matmul_flops(16384, 768, 2304),
        2.0 * 16384.0 * 768.0 * 2304.0
    );
}

#[test]
fn bad_shapes_and_aliases_are_errors() {
    let f32_ = DType::F32;
    let x = gpu().zeros("inp", &[37, 29], f32_).unwrap();
    let w = gpu().zeros("weight", &[53, 29], f32_).unwrap();
    let w_bad = gpu().zeros("weight", &[53, 30], f32_).unwrap();
    let out = gpu().zeros("out", &[37, 53], f32_).unwrap();
    let out_bad = gpu().zeros("out", &[37, 52], f32_).unwrap();
    let bias_bad = gpu().zeros("bias", &[52], f32_).unwrap();
    let ids = gpu().zeros("ids", &[37, 29], DType::U32).unwrap();
    let fwd = |out: &Tensor, x: &Tensor, w: &Tensor, opts: &MatmulForward| {
        mm::matmul_forward(gpu(), out, x, w, opts)
            .err()
            .expect("must be refused")
            .to_string()
    };
    let none = MatmulForward::default();
    let e = fwd(&out, &x, &w_bad, &none);
    assert!(e.contains("matmul_forward") && e.contains("inp"), "{e}");
    assert!(fwd(&out_bad, &x, &w, &none).contains("out"));
    assert!(fwd(&out, &ids, &w, &none).contains("u32"));
    let e = fwd(
        &out,
        &x,
        &w,
        &MatmulForward {
            bias: Some(&bias_bad),
            ..none
        },
    );
    assert!(e.contains("bias"), "{e}");
    let pre_bad = gpu().zeros("pre", &[37, 52], f32_).unwrap();
    assert!(fwd(
        &out,
        &x,
        &w,
        &MatmulForward {
            gelu_pre: Some(&pre_bad),
            ..none
        }
    )
    .contains("gelu_pre"));
    assert!(fwd(
        &out,
        &x,
        &w,
        &MatmulForward {
            gelu_pre: Some(&out),
            ..none
        }
    )
    .contains("overlaps"));
    let bad_tile = MatmulKernel::Tiled(TileConfig {
        tm: 2,
        tn: 4,
        bk: 16,
    });
    assert!(fwd(
        &out,
        &x,
        &w,
        &MatmulForward {
            kernel: Some(bad_tile),
            ..none
        }
    )
    .contains("tile"));

    // An output in the same buffer as an input: two views of one allocation.
    let both = gpu().zeros("both", &[2 * 37 * 64], f32_).unwrap();
    let x_view = both.slice(0, &[37, 29], gpu().alignment()).unwrap();
    let out_view = both.slice(37 * 64, &[37, 53], gpu().alignment()).unwrap();
    assert!(fwd(&out_view, &x_view, &w, &none).contains("alias"));

    let dinp = gpu().zeros("dinp", &[37, 29], f32_).unwrap();
    let e = mm::matmul_backward_input(gpu(), &dinp, &out, &w_bad, &MatmulBackwardInput::default())
        .err()
        .expect("must be refused")
        .to_string();
    assert!(e.contains("matmul_backward_input"), "{e}");
    let e = mm::matmul_backward_input(gpu(), &dinp, &out_bad, &w, &MatmulBackwardInput::default())
        .err()
        .expect("must be refused")
        .to_string();
    assert!(e.contains("dout"), "{e}");

    let dw = gpu().zeros("dweight", &[53, 29], f32_).unwrap();
    let x_short = gpu().zeros("inp", &[36, 29], f32_).unwrap();
    let e = backward_weight(&dw, None, &out, &x_short, true, None)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(
        e.contains("matmul_backward_weight") && e.contains("inp"),
        "{e}"
    );
    assert!(backward_weight(&x, None, &out, &x, true, None).is_err());
    // Column windows must lie inside the rows they are taken from.
    let wide = gpu().zeros("wide", &[37, 100], f32_).unwrap();
    let window = |start| MatmulForward {
        out_columns: Some(start),
        ..none
    };
    assert!(mm::matmul_forward(gpu(), &wide, &x, &w, &window(47)).is_ok());
    assert!(fwd(&wide, &x, &w, &window(48)).contains("outside"));
    let with_gelu = MatmulForward {
        gelu_pre: Some(&out),
        ..window(0)
    };
    assert!(fwd(&wide, &x, &w, &with_gelu).contains("out_columns"));
    let e = mm::matmul_backward_input(
        gpu(),
        &dinp,
        &wide,
        &w,
        &MatmulBackwardInput {
            dout_columns: Some(48),
            ..Default::default()
        },
    )
    .err()
    .expect("must be refused")
    .to_string();
    assert!(e.contains("dout") && e.contains("outside"), "{e}");

    // dbias: (N) f32, apart from the inputs and from dweight.
    let dw = gpu().zeros("dweight", &[53, 29], f32_).unwrap();
    let db = gpu().zeros("dbias", &[53], f32_).unwrap();
    let bwd = |db: &Tensor| {
        backward_weight(&dw, Some(db), &out, &x, true, None)
            .err()
            .expect("must be refused")
            .to_string()
    };
    assert!(backward_weight(&dw, Some(&db), &out, &x, true, None).is_ok());
    let db_short = gpu().zeros("dbias", &[52], f32_).unwrap();
    assert!(bwd(&db_short).contains("dbias"));
    if let Ok(db16) = gpu().zeros("dbias", &[53], DType::F16) {
        assert!(bwd(&db16).contains("dbias"));
    }
    let in_dout = out.slice(0, &[53], gpu().alignment()).unwrap();
    assert!(bwd(&in_dout).contains("alias"));
    let in_dw = dw.slice(0, &[53], gpu().alignment()).unwrap();
    assert!(bwd(&in_dw).contains("overlap"));
}

/// The three products on column windows of a wider matrix, as the classifier runs them on one
/// vocabulary piece of the logits: the forward writes only its columns (the others keep their
/// values), the backward products read only theirs.
#[test]
fn products_on_column_windows_of_wider_rows() {
    let (m, k, width) = (70, 29, 150);
    // The largest tile the adapter holds whatever the operands.
    let limit = gpu().limits.max_compute_workgroup_storage_size;
    let largest = TILE_CONFIGS
        .into_iter()
        .find(|t| t.workgroup_bytes() <= limit)
        .unwrap();
    let mut kernels = vec![None, Some(MatmulKernel::Tiled(largest))];
    if gpu().has_f16() && gpu().has_subgroups() {
        kernels.push(Some(MatmulKernel::CoopEmulated(mm::COOP_TILES[3])));
    }
    for dtype in float_dtypes() {
        for kernel in kernels.clone() {
            if matches!(kernel, Some(MatmulKernel::CoopEmulated(_))) && dtype != DType::F16 {
                continue;
            }
            // Pieces of the columns: [0, 53), [53, 54), [54, 150).
            for (start, n) in [(0, 53), (53, 1), (54, 96)] {
                let seed = 900 + start as u64;
                let tag = format!("{dtype:?} columns {start}..{} kernel {kernel:?}", start + n);
                let (x, xv) = upload("inp", &uniform(seed, m * k), &[m, k], dtype);
                let (w, wv) = upload("weight", &uniform(seed + 1, n * k), &[n, k], dtype);
                let before = uniform(seed + 2, m * width);
                let (wide, before) = upload("wide", &before, &[m, width], dtype);
                let opts = MatmulForward {
                    out_columns: Some(start),
                    kernel,
                    ..Default::default()
                };
                gpu()
                    .run(&[&mm::matmul_forward(gpu(), &wide, &x, &w, &opts).unwrap()])
                    .unwrap();
                let product = forward_want(&xv, &wv, None, (m, k, n));
                let mut want = before.clone();
                for r in 0..m {
                    want[r * width + start..r * width + start + n]
                        .copy_from_slice(&product[r * n..(r + 1) * n]);
                }
                assert_close(
                    &format!("matmul_forward into {tag}"),
                    &read(&wide),
                    &round_to(&want, dtype),
                    tol_for_output(dtype),
                );

                // The window of the (now written) wide matrix as dout.
                let got = read(&wide);
                let window: Vec<f32> = (0..m)
                    .flat_map(|r| got[r * width + start..r * width + start + n].to_vec())
                    .collect();
                let dinp = poisoned("dinp", &[m, k], DType::F32);
                let opts = MatmulBackwardInput {
                    dout_columns: Some(start),
                    kernel,
                    ..Default::default()
                };
                gpu()
                    .run(&[&mm::matmul_backward_input(gpu(), &dinp, &wide, &w, &opts).unwrap()])
                    .unwrap();
                assert_close(
                    &format!("matmul_backward_input from {tag}"),
                    &read(&dinp),
                    &backward_input_want(&window, &wv, (m, k, n)),
                    1e-5,
                );
                let dw = poisoned("dweight", &[n, k], DType::F32);
                let db = poisoned("dbias", &[n], DType::F32);
                let opts = MatmulBackwardWeight {
                    dbias: Some(&db),
                    dout_columns: Some(start),
                    kernel,
                    ..Default::default()
                };
                gpu()
                    .run(&[&mm::matmul_backward_weight(gpu(), &dw, &wide, &x, &opts).unwrap()])
                    .unwrap();
                assert_close(
                    &format!("matmul_backward_weight from {tag}"),
                    &read(&dw),
                    &backward_weight_want(&window, &xv, (m, k, n)),
                    1e-5,
                );
                assert_close(
                    &format!("matmul_backward_weight's dbias from {tag}"),
                    &read(&db),
                    &bias_want(&window, m, n),
                    1e-5,
                );
            }
        }
    }
}

/// Sums of f16 values accumulated in f16, as a kernel without f32 accumulation would: every
/// addition rounded to f16.
fn f16_accumulated(terms: impl Iterator<Item = f32>) -> f32 {
    let mut acc = half::f16::ZERO;
    for t in terms {
        acc = half::f16::from_f32(acc.to_f32() + half::f16::from_f32(t).to_f32());
    }
    acc.to_f32()
}

/// f16 operands, f32 sums: over inner dimensions of 1000 the products stay within f32 rounding of
/// the exact result (f32 outputs) or one f16 rounding of it (f16 outputs), bounds an f16
/// accumulator misses by far (checked here on the same data).
#[test]
fn f16_products_accumulate_in_f32() {
    if !gpu().has_f16() {
        eprintln!("adapter has no SHADER_F16: skipped");
        return;
    }
    // (M, K, N) for the forward and backward-input products; backward weight sums over M.
    let (m, k, n) = (33, 1000, 47);
    let f16 = DType::F16;
    let (x, xv) = upload("inp", &uniform(950, m * k), &[m, k], f16);
    let (w, wv) = upload("weight", &uniform(951, n * k), &[n, k], f16);
    let (wk, wkv) = upload("weight", &uniform(952, k * n), &[k, n], f16);
    let (xt, xtv) = upload("inp", &uniform(953, k * n), &[k, n], f16);
    let (dt, dtv) = upload("dout", &uniform(954, k * m), &[k, m], f16);
    // Bounds: f32 outputs within 1e-5; f16 outputs within one rounding, 2^-11 < 1e-3.
    let (tol32, tol16) = (F32_TOL, F16_ROUNDING);
    let forward = forward_want(&xv, &wv, None, (m, k, n));
    let forward_f16acc: Vec<f32> = (0..m * n)
        .map(|e| f16_accumulated((0..k).map(|j| xv[(e / n) * k + j] * wv[(e % n) * k + j])))
        .collect();
    let f16acc_error = rel_error(&forward_f16acc, &forward);
    eprintln!("an f16 accumulator would be off by {f16acc_error:.2e}");
    assert!(
        f16acc_error > 3.0 * tol16,
        "the data must tell an f16 accumulator apart ({f16acc_error:e})"
    );
    for out_dtype in [DType::F32, f16] {
        let tol = if out_dtype == f16 { tol16 } else { tol32 };
        let out = poisoned("out", &[m, n], out_dtype);
        gpu()
            .run(&[&mm::matmul_forward(gpu(), &out, &x, &w, &MatmulForward::default()).unwrap()])
            .unwrap();
        assert_close(
            &format!("f16 matmul_forward K={k} -> {out_dtype:?}"),
            &read(&out),
            &forward,
            tol,
        );
        // dinp (33, 47) = dout (33, 1000) @ weight (1000, 47).
        let dinp = poisoned("dinp", &[m, n], out_dtype);
        gpu()
            .run(&[&mm::matmul_backward_input(
                gpu(),
                &dinp,
                &x,
                &wk,
                &MatmulBackwardInput::default(),
            )
            .unwrap()])
            .unwrap();
        assert_close(
            &format!("f16 matmul_backward_input K={k} -> {out_dtype:?}"),
            &read(&dinp),
            &backward_input_want(&xv, &wkv, (m, n, k)),
            tol,
        );
        // dweight (33, 47) = dout (1000, 33)^T @ inp (1000, 47).
        let dw = poisoned("dweight", &[m, n], out_dtype);
        gpu()
            .run(&[&backward_weight(&dw, None, &dt, &xt, false, None).unwrap()])
            .unwrap();
        assert_close(
            &format!("f16 matmul_backward_weight M={k} -> {out_dtype:?}"),
            &read(&dw),
            &backward_weight_want(&dtv, &xtv, (k, n, m)),
            tol,
        );
    }
}

/// Forward products of a few rows (decoding a handful of samples) run on `matmul_rows`, chosen
/// for them by the launcher: every epilogue, accumulation and a column window, against the
/// reference.
#[test]
fn few_rows_take_the_rows_kernel_and_match_reference() {
    for dtype in float_dtypes() {
        for (i, &m) in [1usize, 2, 3, 8].iter().enumerate() {
            let (k, n, width) = (133, 77, 100);
            let seed = 1000 + 10 * i as u64;
            let f = forward_inputs(seed, (m, k, n), dtype);
            let plain = forward_want(&f.xv, &f.wv, Some(&f.bv), (m, k, n));
            for (with_gelu, accumulate) in [(false, false), (true, false), (false, true)] {
                let tag = format!("rows kernel {dtype:?} M={m} gelu={with_gelu} acc={accumulate}");
                let (out, start) = if accumulate {
                    upload("out", &uniform(seed + 5, m * n), &[m, n], dtype)
                } else {
                    (poisoned("out", &[m, n], dtype), vec![0.0; m * n])
                };
                let pre = poisoned("pre", &[m, n], dtype);
                let opts = MatmulForward {
                    bias: Some(&f.b),
                    gelu_pre: with_gelu.then_some(&pre),
                    accumulate,
                    ..Default::default()
                };
                let d = mm::matmul_forward(gpu(), &out, &f.x, &f.w, &opts).unwrap();
                assert!(
                    d.pipeline.label.starts_with("matmul_rows"),
                    "{tag}: ran {}",
                    d.pipeline.label
                );
                gpu().run(&[&d]).unwrap();
                // Rounded once, after the accumulation; with GELU, the GELU of the
                // pre-activation as stored (checked first).
                let mut y = plain.clone();
                if with_gelu {
                    let got_pre = read(&pre);
                    let tol = tol_for_output(dtype);
                    assert_close(&format!("{tag} pre"), &got_pre, &round_to(&y, dtype), tol);
                    y = got_pre.iter().map(|&x| gelu(x)).collect();
                }
                let (got, want) = (read(&out), round_to(&add(&start, &y), dtype));
                assert_close(&tag, &got, &want, tol_for_output(dtype));
                if with_gelu && dtype == DType::F16 {
                    assert_f16_each(&tag, &got, &want);
                }
            }
            // Into columns 20..97 of wider rows, the other columns untouched.
            let (wide, before) = upload("wide", &uniform(seed + 6, m * width), &[m, width], dtype);
            let opts = MatmulForward {
                out_columns: Some(20),
                kernel: Some(MatmulKernel::Rows),
                ..Default::default()
            };
            gpu()
                .run(&[&mm::matmul_forward(gpu(), &wide, &f.x, &f.w, &opts).unwrap()])
                .unwrap();
            let product = forward_want(&f.xv, &f.wv, None, (m, k, n));
            let mut want = before.clone();
            for r in 0..m {
                want[r * width + 20..r * width + 20 + n]
                    .copy_from_slice(&product[r * n..(r + 1) * n]);
            }
            assert_close(
                &format!("rows kernel {dtype:?} M={m} into a window"),
                &read(&wide),
                &round_to(&want, dtype),
                tol_for_output(dtype),
            );
        }
    }
    // Nine rows, or a backward product, are not the rows kernel's.
    let x = gpu().zeros("inp", &[9, 16], DType::F32).unwrap();
    let w = gpu().zeros("weight", &[5, 16], DType::F32).unwrap();
    let out = gpu().zeros("out", &[9, 5], DType::F32).unwrap();
    let forced = MatmulForward {
        kernel: Some(MatmulKernel::Rows),
        ..Default::default()
    };
    let e = mm::matmul_forward(gpu(), &out, &x, &w, &forced)
        .err()
        .expect("nine rows")
        .to_string();
    assert!(e.contains("at most 8 rows"), "{e}");
}

/// `matmul_backward_weight_split` (with the bias gradient `db` when given) with `scratch`,
/// `accumulate` and forced `splits` (None: the launcher's choice).
fn backward_weight_split(
    (dw, db): (&Tensor, Option<&Tensor>),
    dout: &Tensor,
    x: &Tensor,
    scratch: Option<&Tensor>,
    accumulate: bool,
    splits: Option<usize>,
) -> wgpt::Result<Vec<wgpt::Dispatch>> {
    let opts = MatmulBackwardWeight {
        dbias: db,
        accumulate,
        splits,
        ..Default::default()
    };
    mm::matmul_backward_weight_split(gpu(), dw, dout, x, scratch, &opts)
}

/// [`backward_weight_split`] with a scratch and `splits` forced: the dispatches.
fn forced_split(
    outs: (&Tensor, Option<&Tensor>),
    dout: &Tensor,
    x: &Tensor,
    scratch: &Tensor,
    accumulate: bool,
    splits: usize,
) -> Vec<wgpt::Dispatch> {
    backward_weight_split(outs, dout, x, Some(scratch), accumulate, Some(splits)).unwrap()
}

fn run_all(ds: &[wgpt::Dispatch]) {
    gpu().run(&ds.iter().collect::<Vec<_>>()).unwrap();
}

/// Split-K weight gradients forced to split, against the CPU reference: M (the rows summed) not
/// a multiple of the 64-row slice step, so the last slice is ragged; outputs of whole vec4s and
/// not; f32 and f16 inputs (sums in f32: within f32 rounding of the reference on the values as
/// stored); f32 and f16 gradients; accumulate on and off; the bias gradient with them (f32).
#[test]
fn backward_weight_split_matches_reference() {
    // (M, K, N, slices): 1000 rows in 3 slices of 384 (the last 232), N*K = 1073 (no vec4);
    // 777 in 5 of 192 (the last 9); 130 in 2 of 128 (the last 2).
    let cases = [(1000, 29, 37, 3), (777, 64, 48, 5), (130, 70, 200, 2)];
    let dtypes = float_dtypes();
    for &dtype in &dtypes {
        for (i, &(m, k, n, splits)) in cases.iter().enumerate() {
            let seed = 1100 + 10 * i as u64;
            let (dout, doutv) = upload("dout", &uniform(seed, m * n), &[m, n], dtype);
            let (x, xv) = upload("inp", &uniform(seed + 1, m * k), &[m, k], dtype);
            let want = backward_weight_want(&doutv, &xv, (m, k, n));
            let want_b = bias_want(&doutv, m, n);
            let scratch = poisoned("scratch", &[splits * (n * k + n)], DType::F32);
            // (gradient dtype, accumulate, tolerance: f32 rounding, or one f16 rounding)
            let mut outputs = vec![(DType::F32, false, 1e-5), (DType::F32, true, 1e-5)];
            if dtypes.contains(&DType::F16) {
                outputs.push((DType::F16, true, 1e-3));
            }
            for (out_dt, accumulate, tol) in outputs {
                let (dw, start) = output("dweight", &[n, k], out_dt, accumulate, seed + 2);
                let (db, start_b) = output("dbias", &[n], DType::F32, accumulate, seed + 3);
                let sums = (&dw, Some(&db));
                let ds = forced_split(sums, &dout, &x, &scratch, accumulate, splits);
                assert_eq!(ds.len(), 2, "a forced split runs partials, then their sum");
                run_all(&ds);
                let what = format!(
                    "split-K matmul_backward_weight {dtype:?} -> {out_dt:?} (M {m}, K {k}, N {n}) \
                     {splits} slices accumulate={accumulate}"
                );
                let got = read(&dw);
                let want = round_to(&add(&start, &want), out_dt);
                assert_close(&what, &got, &want, tol);
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

/// A small gradient summed over many rows splits by itself: (64, 64) over 4096 rows is one tile,
/// cut into 4 slices of 1024 rows. It matches the reference and the unsplit product, and
/// without a scratch (or with too small a one) the same call does not split.
#[test]
fn small_output_with_many_rows_splits_by_itself() {
    let (m, k, n) = (4096, 64, 64);
    for dtype in float_dtypes() {
        let (dout, doutv) = upload("dout", &uniform(1200, m * n), &[m, n], dtype);
        let (x, xv) = upload("inp", &uniform(1201, m * k), &[m, k], dtype);
        let want = backward_weight_want(&doutv, &xv, (m, k, n));
        let len = mm::matmul_backward_weight_scratch_len(n, k, m);
        let per_slice = n * k + n;
        assert!(len >= 4 * per_slice, "scratch of {len} elements");
        let choice = |len| mm::backward_weight_choice(gpu(), (n, k), m, (dtype, dtype), len);
        assert_eq!(choice(len).unwrap().1, 4);
        assert_eq!(choice(0).unwrap().1, 1);
        assert_eq!(choice(2 * per_slice).unwrap().1, 2);

        let scratch = poisoned("scratch", &[len], DType::F32);
        let split = poisoned("dweight", &[n, k], DType::F32);
        let split_b = poisoned("dbias", &[n], DType::F32);
        let ds = backward_weight_split(
            (&split, Some(&split_b)),
            &dout,
            &x,
            Some(&scratch),
            false,
            None,
        )
        .unwrap();
        assert_eq!(ds.len(), 2);
        run_all(&ds);
        let whole = poisoned("dweight", &[n, k], DType::F32);
        let whole_b = poisoned("dbias", &[n], DType::F32);
        let ds =
            backward_weight_split((&whole, Some(&whole_b)), &dout, &x, None, false, None).unwrap();
        assert_eq!(ds.len(), 1, "no scratch, no split");
        run_all(&ds);
        let want_b = bias_want(&doutv, m, n);
        let (split, whole) = (read(&split), read(&whole));
        let (split_b, whole_b) = (read(&split_b), read(&whole_b));
        for (what, got, got_b) in [("split", &split, &split_b), ("unsplit", &whole, &whole_b)] {
            let what = format!("{dtype:?} (M {m}, K {k}, N {n}) {what}");
            assert_close(&what, got, &want, 1e-5);
            assert_close(&format!("{what}: dbias"), got_b, &want_b, 1e-5);
        }
        assert_close("split against unsplit", &split, &whole, 1e-5);
        assert_close("split against unsplit: dbias", &split_b, &whole_b, 1e-5);
    }
}

/// Split-K runs are bitwise repeatable, plain and accumulating, whatever was in the scratch.
#[test]
fn split_runs_are_bitwise_deterministic() {
    let (m, k, n, splits) = (777, 64, 48, 5);
    let (dout, _) = upload("dout", &uniform(1300, m * n), &[m, n], DType::F32);
    let (x, _) = upload("inp", &uniform(1301, m * k), &[m, k], DType::F32);
    let start = uniform(1302, n * k);
    let start_b = uniform(1303, n);
    let scratch = poisoned("scratch", &[splits * (n * k + n)], DType::F32);
    for accumulate in [false, true] {
        let mut runs = Vec::new();
        for _ in 0..2 {
            let (dw, _) = upload("dweight", &start, &[n, k], DType::F32);
            let (db, _) = upload("dbias", &start_b, &[n], DType::F32);
            gpu().poison(&scratch).unwrap();
            let ds = forced_split((&dw, Some(&db)), &dout, &x, &scratch, accumulate, splits);
            run_all(&ds);
            runs.push([read(&dw), read(&db)].concat());
        }
        assert_bitwise_eq(
            &format!("split-K accumulate={accumulate} run twice"),
            &runs[0],
            &runs[1],
        );
    }
}

#[test]
fn split_k_refuses_what_it_cannot_do() {
    let f32_ = DType::F32;
    let (m, k, n) = (300, 29, 37);
    let dout = gpu().zeros("dout", &[m, n], f32_).unwrap();
    let x = gpu().zeros("inp", &[m, k], f32_).unwrap();
    let dw = gpu().zeros("dweight", &[n, k], f32_).unwrap();
    let err = |r: wgpt::Result<Vec<wgpt::Dispatch>>| r.err().expect("must be refused").to_string();
    // A split without a scratch, or with one too small for the slices asked for.
    let opts = MatmulBackwardWeight {
        splits: Some(2),
        ..Default::default()
    };
    let e = mm::matmul_backward_weight(gpu(), &dw, &dout, &x, &opts)
        .err()
        .expect("must be refused")
        .to_string();
    assert!(e.contains("scratch"), "{e}");
    assert!(err(backward_weight_split(
        (&dw, None),
        &dout,
        &x,
        None,
        false,
        Some(2)
    ))
    .contains("scratch"));
    let small = gpu().zeros("scratch", &[2 * n * k - 1], f32_).unwrap();
    let e = err(backward_weight_split(
        (&dw, None),
        &dout,
        &x,
        Some(&small),
        false,
        Some(2),
    ));
    assert!(
        e.contains("matmul_backward_weight") && e.contains("scratch"),
        "{e}"
    );
    let scratch = gpu().zeros("scratch", &[2 * n * k], f32_).unwrap();
    assert!(backward_weight_split((&dw, None), &dout, &x, Some(&scratch), false, Some(2)).is_ok());
    // With the bias gradient a slice holds N row sums more.
    let db = gpu().zeros("dbias", &[n], f32_).unwrap();
    let with_bias =
        |scratch| backward_weight_split((&dw, Some(&db)), &dout, &x, Some(scratch), false, Some(2));
    assert!(err(with_bias(&scratch)).contains("scratch"));
    let scratch_b = gpu().zeros("scratch", &[2 * (n * k + n)], f32_).unwrap();
    assert!(with_bias(&scratch_b).is_ok());
    assert!(err(backward_weight_split(
        (&dw, None),
        &dout,
        &x,
        Some(&scratch),
        false,
        Some(0)
    ))
    .contains("0"));
    // The scratch is f32 and shares no buffer with the operands.
    if let Ok(half) = gpu().zeros("scratch", &[2 * n * k], DType::F16) {
        assert!(
            backward_weight_split((&dw, None), &dout, &x, Some(&half), false, Some(2)).is_err()
        );
    }
    let e = err(backward_weight_split(
        (&dw, None),
        &dout,
        &x,
        Some(&dout),
        false,
        Some(2),
    ));
    assert!(e.contains("alias"), "{e}");
    let e = err(backward_weight_split(
        (&dw, None),
        &dout,
        &x,
        Some(&dw),
        false,
        Some(2),
    ));
    assert!(e.contains("alias") || e.contains("overlap"), "{e}");
}

/// The input gradient split over a long inner dimension, as the tied classifier's is (a few rows
/// of dout, a window of its columns being one vocabulary piece): forced slices (the last one
/// ragged) and the launcher's own choice, plain and accumulating, f32 and f16 inputs, against the
/// CPU reference; without a scratch, or with a GELU epilogue, it stays one product.
#[test]
fn backward_input_split_matches_reference() {
    // (M rows, K, N inner, dout width, first column): 16 rows, N = 2500 in a window of 3000.
    let (m, k, n, width, start) = (16, 48, 2500, 3000, 300);
    for dtype in float_dtypes() {
        let (wide, widev) = upload("dout", &uniform(1400, m * width), &[m, width], dtype);
        let (w, wv) = upload("weight", &uniform(1401, n * k), &[n, k], dtype);
        let window: Vec<f32> = (0..m)
            .flat_map(|r| widev[r * width + start..r * width + start + n].to_vec())
            .collect();
        let want = backward_input_want(&window, &wv, (m, k, n));
        let auto = mm::matmul_backward_input_scratch_len(m, k, n);
        assert!(auto > 0, "a (16, 48) output over 2500 rows splits");
        for (splits, len) in [(Some(3), 3 * m * k), (Some(7), 7 * m * k), (None, auto)] {
            let scratch = poisoned("scratch", &[len], DType::F32);
            for accumulate in [false, true] {
                let (dinp, before) = output("dinp", &[m, k], DType::F32, accumulate, 1402);
                let opts = MatmulBackwardInput {
                    dout_columns: Some(start),
                    accumulate,
                    splits,
                    ..Default::default()
                };
                let ds =
                    mm::matmul_backward_input_split(gpu(), &dinp, &wide, &w, Some(&scratch), &opts)
                        .unwrap();
                assert_eq!(ds.len(), 2, "{splits:?} slices: partials, then their sum");
                run_all(&ds);
                assert_close(
                    &format!(
                        "split matmul_backward_input {dtype:?} {splits:?} slices \
                         accumulate={accumulate}"
                    ),
                    &read(&dinp),
                    &add(&before, &want),
                    F32_TOL,
                );
            }
        }
        let dinp = poisoned("dinp", &[m, k], DType::F32);
        let split = |scratch, splits| {
            let opts = MatmulBackwardInput {
                dout_columns: Some(start),
                splits,
                ..Default::default()
            };
            mm::matmul_backward_input_split(gpu(), &dinp, &wide, &w, scratch, &opts)
        };
        assert_eq!(split(None, None).unwrap().len(), 1, "no scratch, no split");
        assert!(split(None, Some(2)).is_err(), "slices need a scratch");
        let (pre, _) = upload("pre", &uniform(1403, m * k), &[m, k], dtype);
        let (dense, _) = upload("dout", &uniform(1404, m * n), &[m, n], dtype);
        let scratch = poisoned("scratch", &[auto], DType::F32);
        let with_gelu = |splits| {
            let gelu = MatmulBackwardInput {
                gelu_pre: Some(&pre),
                splits,
                ..Default::default()
            };
            mm::matmul_backward_input_split(gpu(), &dinp, &dense, &w, Some(&scratch), &gelu)
        };
        assert_eq!(
            with_gelu(None).unwrap().len(),
            1,
            "a GELU epilogue is not split"
        );
        assert!(with_gelu(Some(2)).is_err());
    }
}
