//! LayerNorm forward, fused residual + LayerNorm forward and LayerNorm backward against the CPU
//! reference; the backward also against central differences of the GPU forward.

use crate::common::*;
use wgpt::gpu::DType;
use wgpt::ops::layernorm as ln;
use wgpt::reference::layernorm as cpu;

/// (rows N, channels C): single row and channel, odd sizes around the 256-thread rows, GPT-2's C.
const SHAPES: [(usize, usize); 6] = [(1, 1), (5, 3), (33, 37), (17, 100), (3, 300), (40, 768)];

/// Random activations with a non-zero mean per row, so the mean subtraction matters.
fn activations(r: &mut wgpt::rng::Rng, n: usize, c: usize) -> Vec<f32> {
    let mut x = r.vec_normal(n * c, 1.5);
    for (i, v) in x.iter_mut().enumerate() {
        *v += ((i / c) % 7) as f32 * 0.5 - 1.0;
    }
    x
}

fn cpu_forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    c: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
    cpu::layernorm_forward(&mut out, &mut mean, &mut rstd, x, w, b, c);
    (out, mean, rstd)
}

#[test]
fn layernorm_forward_matches_reference() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        for in_t in float_dtypes() {
            for out_t in float_dtypes() {
                for (s, &(n, c)) in SHAPES.iter().enumerate() {
                    let mut r = rng(10 + s as u64);
                    let (xt, x) = upload("inp", &activations(&mut r, n, c), &[n, c], in_t);
                    let (wt, w) = upload("weight", &r.vec_uniform(c, 0.5, 1.5), &[c], DType::F32);
                    let (bt, b) = upload("bias", &r.vec_uniform(c, -0.5, 0.5), &[c], DType::F32);
                    let out = poisoned("out", &[n, c], out_t);
                    let mean = poisoned("mean", &[n], DType::F32);
                    let rstd = poisoned("rstd", &[n], DType::F32);
                    let d =
                        ln::layernorm_forward(gpu(), &out, &mean, &rstd, &xt, &wt, &bt).unwrap();
                    gpu().run(&[&d]).unwrap();
                    let (want, want_mean, want_rstd) = cpu_forward(&x, &w, &b, n, c);
                    let what =
                        format!("{path}: layernorm_forward in {in_t:?} out {out_t:?} N={n} C={c}");
                    // By the output's type: f32 sums whatever the input's.
                    let tol = tol_for_output(out_t);
                    assert_close(&what, &read(&out), &round_to(&want, out_t), tol);
                    assert_close(&format!("{what} mean"), &read(&mean), &want_mean, 1e-5);
                    assert_close(&format!("{what} rstd"), &read(&rstd), &want_rstd, 1e-5);
                }
            }
        }
    });
}

#[test]
fn fused_residual_layernorm_forward_matches_reference() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        for b_t in float_dtypes() {
            for out_t in float_dtypes() {
                for (s, &(n, c)) in SHAPES.iter().enumerate() {
                    let mut r = rng(20 + s as u64);
                    let (at, a) = upload("a", &activations(&mut r, n, c), &[n, c], DType::F32);
                    let (bt, b) = upload("b", &r.vec_normal(n * c, 1.0), &[n, c], b_t);
                    let (wt, w) = upload("weight", &r.vec_uniform(c, 0.5, 1.5), &[c], DType::F32);
                    let (biast, bias) =
                        upload("bias", &r.vec_uniform(c, -0.5, 0.5), &[c], DType::F32);
                    let residual = poisoned("residual", &[n, c], DType::F32);
                    let out = poisoned("out", &[n, c], out_t);
                    let mean = poisoned("mean", &[n], DType::F32);
                    let rstd = poisoned("rstd", &[n], DType::F32);
                    let d = ln::fused_residual_layernorm_forward(
                        gpu(),
                        &ln::FusedResidualLayerNorm {
                            residual_out: &residual,
                            out: &out,
                            mean: &mean,
                            rstd: &rstd,
                            a: &at,
                            b: &bt,
                            weight: &wt,
                            bias: &biast,
                        },
                    )
                    .unwrap();
                    gpu().run(&[&d]).unwrap();
                    let mut sum = vec![0.0; n * c];
                    wgpt::reference::elementwise::residual_forward(&mut sum, &a, &b);
                    let (want, want_mean, want_rstd) = cpu_forward(&sum, &w, &bias, n, c);
                    let what = format!(
                        "{path}: fused_residual_layernorm b {b_t:?} out {out_t:?} N={n} C={c}"
                    );
                    // The sum itself is exact up to one f32 rounding whatever b's storage type.
                    assert_close(&format!("{what} residual"), &read(&residual), &sum, 1e-6);
                    let tol = tol_for_output(out_t);
                    assert_close(&what, &read(&out), &round_to(&want, out_t), tol);
                    assert_close(&format!("{what} mean"), &read(&mean), &want_mean, 1e-5);
                    assert_close(&format!("{what} rstd"), &read(&rstd), &want_rstd, 1e-5);
                }
            }
        }
    });
}

struct BackwardCase {
    n: usize,
    c: usize,
    dinp: wgpt::Tensor,
    dweight: wgpt::Tensor,
    dbias: wgpt::Tensor,
    scratch: wgpt::Tensor,
    dispatches: Vec<wgpt::Dispatch>,
    want_dinp: Vec<f32>,
    want_dweight: Vec<f32>,
    want_dbias: Vec<f32>,
    init: (Vec<f32>, Vec<f32>, Vec<f32>),
}

/// Uploads random inputs, random accumulators, and computes the reference answer.
fn backward_case(seed: u64, n: usize, c: usize, in_t: DType, dout_t: DType) -> BackwardCase {
    let mut r = rng(seed);
    let x0 = round_to(&activations(&mut r, n, c), in_t);
    let w = r.vec_uniform(c, 0.5, 1.5);
    let b = r.vec_uniform(c, -0.5, 0.5);
    // Statistics as the forward pass saves them (f32).
    let (_, mean, rstd) = cpu_forward(&x0, &w, &b, n, c);
    let (xt, x) = upload("inp", &x0, &[n, c], in_t);
    let (dt, dout) = upload("dout", &r.vec_normal(n * c, 1.0), &[n, c], dout_t);
    let (wt, _) = upload("weight", &w, &[c], DType::F32);
    let (mt, _) = upload("mean", &mean, &[n], DType::F32);
    let (rt, _) = upload("rstd", &rstd, &[n], DType::F32);
    // Accumulating outputs start from arbitrary values.
    let init = (
        r.vec_uniform(n * c, -1.0, 1.0),
        r.vec_uniform(c, -1.0, 1.0),
        r.vec_uniform(c, -1.0, 1.0),
    );
    let (dinp, _) = upload("dinp", &init.0, &[n, c], DType::F32);
    let (dweight, _) = upload("dweight", &init.1, &[c], DType::F32);
    let (dbias, _) = upload("dbias", &init.2, &[c], DType::F32);
    // The scratch's contents on entry do not matter.
    let scratch = poisoned(
        "scratch",
        &[ln::layernorm_backward_scratch_len(n, c)],
        DType::F32,
    );
    let dispatches = ln::layernorm_backward(
        gpu(),
        &ln::LayerNormBackward {
            dinp: &dinp,
            dweight: &dweight,
            dbias: &dbias,
            scratch: &scratch,
            dout: &dt,
            inp: &xt,
            weight: &wt,
            mean: &mt,
            rstd: &rt,
        },
    )
    .unwrap();
    let (mut want_dinp, mut want_dweight, mut want_dbias) = init.clone();
    cpu::layernorm_backward(
        &mut want_dinp,
        &mut want_dweight,
        &mut want_dbias,
        &dout,
        &x,
        &w,
        &mean,
        &rstd,
        c,
    );
    BackwardCase {
        n,
        c,
        dinp,
        dweight,
        dbias,
        scratch,
        dispatches,
        want_dinp,
        want_dweight,
        want_dbias,
        init,
    }
}

#[test]
fn layernorm_backward_matches_reference() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        for in_t in float_dtypes() {
            for dout_t in float_dtypes() {
                for (s, &(n, c)) in SHAPES.iter().chain(&[(50, 64)]).enumerate() {
                    let k = backward_case(30 + s as u64, n, c, in_t, dout_t);
                    let ds: Vec<&wgpt::Dispatch> = k.dispatches.iter().collect();
                    gpu().run(&ds).unwrap();
                    let what = format!(
                        "{path}: layernorm_backward in {in_t:?} dout {dout_t:?} N={} C={}",
                        k.n, k.c
                    );
                    // Inputs are compared as stored, so only f32 arithmetic separates GPU and reference.
                    assert_close(&format!("{what} dinp"), &read(&k.dinp), &k.want_dinp, 1e-5);
                    assert_close(
                        &format!("{what} dweight"),
                        &read(&k.dweight),
                        &k.want_dweight,
                        1e-5,
                    );
                    assert_close(
                        &format!("{what} dbias"),
                        &read(&k.dbias),
                        &k.want_dbias,
                        1e-5,
                    );
                    assert!(read(&k.scratch).iter().all(|v| v.is_finite()));
                }
            }
        }
    });
}

#[test]
fn layernorm_backward_is_deterministic() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let k = backward_case(40, 70, 200, DType::F32, DType::F32);
        let ds: Vec<&wgpt::Dispatch> = k.dispatches.iter().collect();
        let mut runs = Vec::new();
        for _ in 0..2 {
            gpu().write(&k.dinp, &k.init.0).unwrap();
            gpu().write(&k.dweight, &k.init.1).unwrap();
            gpu().write(&k.dbias, &k.init.2).unwrap();
            gpu().run(&ds).unwrap();
            runs.push((read(&k.dinp), read(&k.dweight), read(&k.dbias)));
        }
        assert_bitwise_eq(&format!("{path}: dinp"), &runs[0].0, &runs[1].0);
        assert_bitwise_eq(&format!("{path}: dweight"), &runs[0].1, &runs[1].1);
        assert_bitwise_eq(&format!("{path}: dbias"), &runs[0].2, &runs[1].2);
    });
}

/// Gradients of loss = sum(out * R) from the GPU backward vs central differences of the GPU
/// forward (all f32), for inp, weight and bias.
#[test]
fn layernorm_backward_matches_finite_differences() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let (n, c) = (3, 7);
        let mut r = rng(50);
        let x = activations(&mut r, n, c);
        let w = r.vec_uniform(c, 0.5, 1.5);
        let b = r.vec_uniform(c, -0.5, 0.5);
        let rr = r.vec_normal(n * c, 1.0);
        let f32t = DType::F32;
        let (xt, _) = upload("inp", &x, &[n, c], f32t);
        let (wt, _) = upload("weight", &w, &[c], f32t);
        let (bt, _) = upload("bias", &b, &[c], f32t);
        let out = poisoned("out", &[n, c], f32t);
        let mean = poisoned("mean", &[n], f32t);
        let rstd = poisoned("rstd", &[n], f32t);
        let fwd = ln::layernorm_forward(gpu(), &out, &mean, &rstd, &xt, &wt, &bt).unwrap();
        let loss = |xs: &[f32], ws: &[f32], bs: &[f32]| -> f64 {
            gpu().write(&xt, xs).unwrap();
            gpu().write(&wt, ws).unwrap();
            gpu().write(&bt, bs).unwrap();
            gpu().run(&[&fwd]).unwrap();
            read(&out)
                .iter()
                .zip(&rr)
                .map(|(&o, &g)| o as f64 * g as f64)
                .sum()
        };
        let h = 1e-2f32;
        let fd = |which: usize, k: usize| -> f32 {
            let mut p = [x.clone(), w.clone(), b.clone()];
            p[which][k] += h;
            let up = loss(&p[0], &p[1], &p[2]);
            p[which][k] -= 2.0 * h;
            let down = loss(&p[0], &p[1], &p[2]);
            ((up - down) / (2.0 * h as f64)) as f32
        };
        let fd_x: Vec<f32> = (0..n * c).map(|k| fd(0, k)).collect();
        let fd_w: Vec<f32> = (0..c).map(|k| fd(1, k)).collect();
        let fd_b: Vec<f32> = (0..c).map(|k| fd(2, k)).collect();

        // Backward at the unperturbed point, accumulators starting from zero.
        loss(&x, &w, &b);
        let (dt, _) = upload("dout", &rr, &[n, c], f32t);
        let dinp = gpu().zeros("dinp", &[n, c], f32t).unwrap();
        let dweight = gpu().zeros("dweight", &[c], f32t).unwrap();
        let dbias = gpu().zeros("dbias", &[c], f32t).unwrap();
        let scratch = gpu()
            .zeros("scratch", &[ln::layernorm_backward_scratch_len(n, c)], f32t)
            .unwrap();
        let ds = ln::layernorm_backward(
            gpu(),
            &ln::LayerNormBackward {
                dinp: &dinp,
                dweight: &dweight,
                dbias: &dbias,
                scratch: &scratch,
                dout: &dt,
                inp: &xt,
                weight: &wt,
                mean: &mean,
                rstd: &rstd,
            },
        )
        .unwrap();
        gpu().run(&ds.iter().collect::<Vec<_>>()).unwrap();
        assert_close(
            &format!("{path}: layernorm dinp vs finite differences"),
            &read(&dinp),
            &fd_x,
            1e-2,
        );
        assert_close(
            &format!("{path}: layernorm dweight vs finite differences"),
            &read(&dweight),
            &fd_w,
            1e-2,
        );
        assert_close(
            &format!("{path}: layernorm dbias vs finite differences"),
            &read(&dbias),
            &fd_b,
            1e-2,
        );
    });
}

/// The row kernels run their subgroup variant exactly when the device has subgroups, and the
/// tree fallback on the GPU opened without them.
#[test]
fn launchers_pick_the_reduction_variant_of_the_device() {
    eprintln!(
        "SUBGROUP feature: {}, subgroup sizes {:?}",
        gpu().has_subgroups(),
        gpu().subgroup_sizes
    );
    for_each_reduction_path(|| {
        let (n, c) = (4, 8);
        let f = DType::F32;
        let z = |shape: &[usize]| gpu().zeros("t", shape, f).unwrap();
        let (x, out, res, mean, rstd, w, b) = (
            z(&[n, c]),
            z(&[n, c]),
            z(&[n, c]),
            z(&[n]),
            z(&[n]),
            z(&[c]),
            z(&[c]),
        );
        let scratch = z(&[ln::layernorm_backward_scratch_len(n, c)]);
        let g = gpu();
        assert_reduction_variant(
            &ln::layernorm_forward(g, &out, &mean, &rstd, &x, &w, &b).unwrap(),
        );
        assert_reduction_variant(
            &ln::fused_residual_layernorm_forward(
                g,
                &ln::FusedResidualLayerNorm {
                    residual_out: &res,
                    out: &out,
                    mean: &mean,
                    rstd: &rstd,
                    a: &x,
                    b: &x,
                    weight: &w,
                    bias: &b,
                },
            )
            .unwrap(),
        );
        let ds = ln::layernorm_backward(
            g,
            &ln::LayerNormBackward {
                dinp: &res,
                dweight: &w,
                dbias: &b,
                scratch: &scratch,
                dout: &x,
                inp: &x,
                weight: &w,
                mean: &mean,
                rstd: &rstd,
            },
        )
        .unwrap();
        assert_reduction_variant(&ds[0]);
    });
}

#[test]
fn shape_errors_are_reported() {
    let f = DType::F32;
    let z = |shape: &[usize], dtype| gpu().zeros("t", shape, dtype).unwrap();
    let (inp, out, mean, rstd, w, b) = (
        z(&[4, 8], f),
        z(&[4, 8], f),
        z(&[4], f),
        z(&[4], f),
        z(&[8], f),
        z(&[8], f),
    );
    let g = gpu();
    assert!(ln::layernorm_forward(g, &out, &mean, &rstd, &inp, &w, &b).is_ok());
    let e = ln::layernorm_forward(g, &z(&[4, 9], f), &mean, &rstd, &inp, &w, &b)
        .err()
        .expect("out shape");
    assert!(e.to_string().contains("layernorm_forward"), "{e}");
    assert!(ln::layernorm_forward(g, &out, &mean, &rstd, &inp, &z(&[7], f), &b).is_err());
    assert!(ln::layernorm_forward(g, &out, &mean, &rstd, &inp, &w, &z(&[9], f)).is_err());
    assert!(ln::layernorm_forward(g, &out, &z(&[3], f), &rstd, &inp, &w, &b).is_err());
    assert!(ln::layernorm_forward(g, &out, &mean, &rstd, &z(&[4, 8], DType::U32), &w, &b).is_err());
    assert!(ln::layernorm_forward(g, &out, &mean, &rstd, &inp, &z(&[8], DType::F16), &b).is_err());
    let res = z(&[4, 8], f);
    assert!(ln::fused_residual_layernorm_forward(
        g,
        &ln::FusedResidualLayerNorm {
            residual_out: &res,
            out: &out,
            mean: &mean,
            rstd: &rstd,
            a: &inp,
            b: &inp,
            weight: &w,
            bias: &b
        }
    )
    .is_ok());
    assert!(ln::fused_residual_layernorm_forward(
        g,
        &ln::FusedResidualLayerNorm {
            residual_out: &res,
            out: &out,
            mean: &mean,
            rstd: &rstd,
            a: &inp,
            b: &z(&[5, 8], f),
            weight: &w,
            bias: &b
        }
    )
    .is_err());
    assert!(ln::fused_residual_layernorm_forward(
        g,
        &ln::FusedResidualLayerNorm {
            residual_out: &z(&[4, 8], DType::U32),
            out: &out,
            mean: &mean,
            rstd: &rstd,
            a: &inp,
            b: &inp,
            weight: &w,
            bias: &b
        }
    )
    .is_err());
    let scratch = z(&[ln::layernorm_backward_scratch_len(4, 8)], f);
    assert!(ln::layernorm_backward(
        g,
        &ln::LayerNormBackward {
            dinp: &out,
            dweight: &w,
            dbias: &b,
            scratch: &scratch,
            dout: &inp,
            inp: &inp,
            weight: &w,
            mean: &mean,
            rstd: &rstd
        }
    )
    .is_ok());
    let small = z(&[ln::layernorm_backward_scratch_len(4, 8) - 1], f);
    let e = ln::layernorm_backward(
        g,
        &ln::LayerNormBackward {
            dinp: &out,
            dweight: &w,
            dbias: &b,
            scratch: &small,
            dout: &inp,
            inp: &inp,
            weight: &w,
            mean: &mean,
            rstd: &rstd,
        },
    )
    .err()
    .expect("scratch");
    assert!(e.to_string().contains("scratch"), "{e}");
    assert!(ln::layernorm_backward(
        g,
        &ln::LayerNormBackward {
            dinp: &out,
            dweight: &z(&[9], f),
            dbias: &b,
            scratch: &scratch,
            dout: &inp,
            inp: &inp,
            weight: &w,
            mean: &mean,
            rstd: &rstd
        }
    )
    .is_err());
    assert!(ln::layernorm_backward(
        g,
        &ln::LayerNormBackward {
            dinp: &z(&[4, 8], DType::F16),
            dweight: &w,
            dbias: &b,
            scratch: &scratch,
            dout: &inp,
            inp: &inp,
            weight: &w,
            mean: &mean,
            rstd: &rstd
        }
    )
    .is_err());
    assert!(ln::layernorm_backward(
        g,
        &ln::LayerNormBackward {
            dinp: &out,
            dweight: &w,
            dbias: &b,
            scratch: &scratch,
            dout: &z(&[3, 8], f),
            inp: &inp,
            weight: &w,
            mean: &mean,
            rstd: &rstd
        }
    )
    .is_err());
}
