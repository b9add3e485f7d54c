//! Causal self-attention, flash and naive, forward and backward, against the CPU reference.

use crate::common::*;
use wgpt::gpu::{DType, Dispatch, Tensor};
use wgpt::ops::attention::{self as attn, CoopAttention, FlashTiles};
use wgpt::reference::attention as cpu;

/// (B, T, C, NH): T = 1, T not a multiple of any tile, head sizes 8, 24, 16, 64 and an odd 7.
const SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 16, 2),
    (2, 37, 48, 2),
    (1, 70, 64, 4),
    (2, 64, 128, 2),
    (1, 45, 72, 3),
    (1, 19, 21, 3),
];

fn run(dispatches: &[Dispatch]) {
    let refs: Vec<&Dispatch> = dispatches.iter().collect();
    gpu().run(&refs).expect("run");
}

/// Random attention inputs: qkv (B, T, 3C) and dout (B, T, C), as stored in `dtype`.
struct Case {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    qkv: Tensor,
    qkv_v: Vec<f32>,
    dout: Tensor,
    dout_v: Vec<f32>,
}

fn case(seed: u64, (b, t, c, nh): (usize, usize, usize, usize), dtype: DType) -> Case {
    let mut r = rng(seed);
    // Spread wide enough that the softmax is far from uniform.
    let (qkv, qkv_v) = upload(
        "qkv",
        &r.vec_normal(b * t * 3 * c, 1.5),
        &[b, t, 3 * c],
        dtype,
    );
    let (dout, dout_v) = upload("dout", &r.vec_normal(b * t * c, 1.0), &[b, t, c], dtype);
    Case {
        b,
        t,
        c,
        nh,
        qkv,
        qkv_v,
        dout,
        dout_v,
    }
}

impl Case {
    fn name(&self, what: &str, dtype: DType) -> String {
        format!(
            "{what} {dtype:?} (B,T,C,NH)=({},{},{},{})",
            self.b, self.t, self.c, self.nh
        )
    }
}

/// Flash forward and backward on `k` with explicit tiles: (out, lse, dqkv).
fn flash(k: &Case, dtype: DType, tiles: FlashTiles) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let out = poisoned("out", &[k.b, k.t, k.c], dtype);
    let lse = poisoned("lse", &[k.b, k.nh, k.t], DType::F32);
    let dqkv = poisoned("dqkv", &[k.b, k.t, 3 * k.c], dtype);
    let dd = poisoned("d", &[k.b, k.nh, k.t], DType::F32);
    let g = gpu();
    let mut d = attn::flash_attention_forward_tiled(
        g,
        tiles,
        &attn::AttentionForward {
            out: &out,
            lse: &lse,
            qkv: &k.qkv,
            b: k.b,
            t: k.t,
            nh: k.nh,
        },
    )
    .unwrap();
    d.extend(
        attn::flash_attention_backward_tiled(
            g,
            tiles,
            &attn::AttentionBackward {
                dqkv: &dqkv,
                dout: &k.dout,
                qkv: &k.qkv,
                out: &out,
                lse: &lse,
                d_scratch: &dd,
                b: k.b,
                t: k.t,
                nh: k.nh,
            },
        )
        .unwrap(),
    );
    run(&d);
    (read(&out), read(&lse), read(&dqkv))
}

/// Naive forward and backward on `k`: (out, att, dqkv).
fn naive(k: &Case, dtype: DType) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let out = poisoned("out", &[k.b, k.t, k.c], dtype);
    let att = poisoned("att", &[k.b, k.nh, k.t, k.t], DType::F32);
    let datt = poisoned("datt", &[k.b, k.nh, k.t, k.t], DType::F32);
    let dqkv = poisoned("dqkv", &[k.b, k.t, 3 * k.c], dtype);
    let g = gpu();
    let mut d = attn::naive_attention_forward(g, &out, &att, &k.qkv, k.b, k.t, k.nh).unwrap();
    d.extend(
        attn::naive_attention_backward(
            g,
            &attn::NaiveAttentionBackward {
                dqkv: &dqkv,
                datt_scratch: &datt,
                dout: &k.dout,
                qkv: &k.qkv,
                att: &att,
                b: k.b,
                t: k.t,
                nh: k.nh,
            },
        )
        .unwrap(),
    );
    run(&d);
    (read(&out), read(&att), read(&dqkv))
}

fn tiles_for(c: usize, nh: usize) -> FlashTiles {
    FlashTiles::choose(gpu(), c / nh).expect("tiles")
}

#[test]
fn flash_forward_and_backward_match_reference() {
    for dtype in float_dtypes() {
        for (s, &shape) in SHAPES.iter().enumerate() {
            let k = case(10 + s as u64, shape, dtype);
            let (out, lse, dqkv) = flash(&k, dtype, tiles_for(k.c, k.nh));
            let want = cpu::attention_forward(&k.qkv_v, k.b, k.t, k.c, k.nh);
            // The backward's D is rowsum(P * dP) from its own P and dP, not rowsum(dout * out):
            // the gradient does not depend on how the output was stored.
            let want_dqkv = cpu::attention_backward(&k.dout_v, &k.qkv_v, k.b, k.t, k.c, k.nh);
            // Every sum in f32: f32 outputs (lse always) within f32 rounding, f16 ones within one
            // f16 rounding.
            let tol = tol_for_output(dtype);
            assert_close(
                &k.name("flash out", dtype),
                &out,
                &round_to(&want.out, dtype),
                tol,
            );
            assert_close(&k.name("flash lse", dtype), &lse, &want.lse, F32_TOL);
            assert_close(
                &k.name("flash dqkv", dtype),
                &dqkv,
                &round_to(&want_dqkv, dtype),
                tol,
            );
            if dtype == DType::F16 {
                // Each element the exact value rounded once: no f16 intermediate (such as the
                // probabilities rounded before P V) on the way.
                assert_f16_rounded(&k.name("flash out", dtype), &out, &want.out);
                assert_f16_rounded(&k.name("flash dqkv", dtype), &dqkv, &want_dqkv);
            }
        }
    }
}

#[test]
fn flash_matches_reference_with_every_tile_choice() {
    // The adapter picks one tile set per head size; the others (e.g. what a 48 KiB NVIDIA
    // adapter picks) are run here on head sizes small enough to fit this adapter.
    let limit = gpu().limits.max_compute_workgroup_storage_size;
    for (s, &shape) in [(2, 37, 16, 2), (1, 70, 48, 2)].iter().enumerate() {
        let k = case(30 + s as u64, shape, DType::F32);
        let want = cpu::attention_forward(&k.qkv_v, k.b, k.t, k.c, k.nh);
        let want_dqkv = cpu::attention_backward(&k.dout_v, &k.qkv_v, k.b, k.t, k.c, k.nh);
        let all = FlashTiles::all_for_limit(limit, k.c / k.nh);
        assert!(!all.is_empty());
        // Pair each forward tile with a backward tile so each kernel sees every size.
        let fwd: Vec<(u32, u32)> = dedup(all.iter().map(|t| (t.br, t.bc)));
        let bwd: Vec<(u32, u32)> = dedup(all.iter().map(|t| (t.bq, t.bk)));
        for i in 0..fwd.len().max(bwd.len()) {
            let (br, bc) = fwd[i % fwd.len()];
            let (bq, bk) = bwd[i % bwd.len()];
            let tiles = FlashTiles { br, bc, bq, bk };
            let (out, lse, dqkv) = flash(&k, DType::F32, tiles);
            let what = |w: &str| k.name(&format!("flash {w} {tiles:?}"), DType::F32);
            assert_close(&what("out"), &out, &want.out, 1e-5);
            assert_close(&what("lse"), &lse, &want.lse, 1e-5);
            assert_close(&what("dqkv"), &dqkv, &want_dqkv, 1e-5);
        }
    }
}

fn dedup(it: impl Iterator<Item = (u32, u32)>) -> Vec<(u32, u32)> {
    let mut v: Vec<(u32, u32)> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

#[test]
fn naive_forward_and_backward_match_reference() {
    for dtype in float_dtypes() {
        for (s, &shape) in SHAPES.iter().enumerate() {
            let k = case(10 + s as u64, shape, dtype);
            let (out, att, dqkv) = naive(&k, dtype);
            let want = cpu::attention_forward(&k.qkv_v, k.b, k.t, k.c, k.nh);
            let want_dqkv = cpu::attention_backward(&k.dout_v, &k.qkv_v, k.b, k.t, k.c, k.nh);
            let tol = tol_for_output(dtype);
            assert_close(
                &k.name("naive out", dtype),
                &out,
                &round_to(&want.out, dtype),
                tol,
            );
            // The probabilities are f32 whatever qkv's type.
            assert_close(&k.name("naive att", dtype), &att, &want.att, F32_TOL);
            assert_close(
                &k.name("naive dqkv", dtype),
                &dqkv,
                &round_to(&want_dqkv, dtype),
                tol,
            );
            if dtype == DType::F16 {
                assert_f16_rounded(&k.name("naive out", dtype), &out, &want.out);
                assert_f16_rounded(&k.name("naive dqkv", dtype), &dqkv, &want_dqkv);
            }
            // Masked probabilities are exactly zero.
            for bh in 0..k.b * k.nh {
                for i in 0..k.t {
                    for j in i + 1..k.t {
                        assert_eq!(att[(bh * k.t + i) * k.t + j], 0.0, "att above the diagonal");
                    }
                }
            }
        }
    }
}

#[test]
fn flash_and_naive_agree() {
    for dtype in float_dtypes() {
        let k = case(50, (2, 100, 64, 2), dtype);
        let (f_out, _, f_dqkv) = flash(&k, dtype, tiles_for(k.c, k.nh));
        let (n_out, _, n_dqkv) = naive(&k, dtype);
        // Both round to the storage type at the end: allow one f16 rounding of difference.
        let tol = tol_for_output(dtype);
        assert_close(&k.name("flash vs naive out", dtype), &f_out, &n_out, tol);
        assert_close(&k.name("flash vs naive dqkv", dtype), &f_dqkv, &n_dqkv, tol);
    }
}

#[test]
fn mixed_storage_types_match_reference() {
    // qkv f16, out f32 or f16, dout f32, dqkv f32: the flash backward's gradient the same
    // whichever type the forward stored its output in (its D comes from P and dP, not out).
    if !needs(Feature::F16, "mixed storage types") {
        return;
    }
    let (b, t, c, nh) = (1, 33, 32, 2);
    let mut r = rng(60);
    let (qkv, qkv_v) = upload(
        "qkv",
        &r.vec_normal(b * t * 3 * c, 1.5),
        &[b, t, 3 * c],
        DType::F16,
    );
    let (dout, dout_v) = upload(
        "dout",
        &r.vec_normal(b * t * c, 1.0),
        &[b, t, c],
        DType::F32,
    );
    let want = cpu::attention_forward(&qkv_v, b, t, c, nh);
    let want_dqkv = cpu::attention_backward(&dout_v, &qkv_v, b, t, c, nh);
    let g = gpu();
    for out_t in [DType::F32, DType::F16] {
        let out = poisoned("out", &[b, t, c], out_t);
        let lse = poisoned("lse", &[b, nh, t], DType::F32);
        let dd = poisoned("d", &[b, nh, t], DType::F32);
        let dqkv = poisoned("dqkv", &[b, t, 3 * c], DType::F32);
        let mut d = attn::flash_attention_forward(g, &out, &lse, &qkv, b, t, nh).unwrap();
        d.extend(
            attn::flash_attention_backward(
                g,
                &attn::AttentionBackward {
                    dqkv: &dqkv,
                    dout: &dout,
                    qkv: &qkv,
                    out: &out,
                    lse: &lse,
                    d_scratch: &dd,
                    b,
                    t,
                    nh,
                },
            )
            .unwrap(),
        );
        run(&d);
        let tol = tol_for_output(out_t);
        let got_out = read(&out);
        assert_close(
            &format!("flash mixed out {out_t:?}"),
            &got_out,
            &round_to(&want.out, out_t),
            tol,
        );
        assert_close(
            &format!("flash mixed lse out={out_t:?}"),
            &read(&lse),
            &want.lse,
            F32_TOL,
        );
        // dqkv is f32: within f32 rounding of the exact gradient, whatever out's type.
        assert_close(
            &format!("flash mixed dqkv out={out_t:?}"),
            &read(&dqkv),
            &want_dqkv,
            F32_TOL,
        );

        let att = poisoned("att", &[b, nh, t, t], DType::F32);
        let datt = poisoned("datt", &[b, nh, t, t], DType::F32);
        let dqkv = poisoned("dqkv", &[b, t, 3 * c], DType::F32);
        let mut d = attn::naive_attention_forward(g, &out, &att, &qkv, b, t, nh).unwrap();
        d.extend(
            attn::naive_attention_backward(
                g,
                &attn::NaiveAttentionBackward {
                    dqkv: &dqkv,
                    datt_scratch: &datt,
                    dout: &dout,
                    qkv: &qkv,
                    att: &att,
                    b,
                    t,
                    nh,
                },
            )
            .unwrap(),
        );
        run(&d);
        assert_close(
            &format!("naive mixed out {out_t:?}"),
            &read(&out),
            &round_to(&want.out, out_t),
            tol,
        );
        assert_close(
            &format!("naive mixed dqkv out={out_t:?}"),
            &read(&dqkv),
            &want_dqkv,
            F32_TOL,
        );
    }
}

/// loss = sum(out * R) by central differences of the GPU f32 forward, against the GPU backward.
fn finite_difference_check(flash_path: bool) {
    let (b, t, c, nh) = (1, 6, 8, 2);
    let g = gpu();
    let mut r = rng(70);
    let x0 = r.vec_normal(b * t * 3 * c, 1.0);
    let weights = r.vec_normal(b * t * c, 1.0);
    let (qkv, _) = upload("qkv", &x0, &[b, t, 3 * c], DType::F32);
    let (dout, _) = upload("dout", &weights, &[b, t, c], DType::F32);
    let out = poisoned("out", &[b, t, c], DType::F32);
    let lse = poisoned("lse", &[b, nh, t], DType::F32);
    let att = poisoned("att", &[b, nh, t, t], DType::F32);
    let forward = if flash_path {
        attn::flash_attention_forward(g, &out, &lse, &qkv, b, t, nh).unwrap()
    } else {
        attn::naive_attention_forward(g, &out, &att, &qkv, b, t, nh).unwrap()
    };
    let loss = |x: &[f32]| -> f64 {
        g.write(&qkv, x).unwrap();
        run(&forward);
        read(&out)
            .iter()
            .zip(&weights)
            .map(|(&o, &w)| o as f64 * w as f64)
            .sum()
    };
    let dqkv = poisoned("dqkv", &[b, t, 3 * c], DType::F32);
    loss(&x0);
    let backward = if flash_path {
        let dd = poisoned("d", &[b, nh, t], DType::F32);
        run(&attn::flash_attention_backward(
            g,
            &attn::AttentionBackward {
                dqkv: &dqkv,
                dout: &dout,
                qkv: &qkv,
                out: &out,
                lse: &lse,
                d_scratch: &dd,
                b,
                t,
                nh,
            },
        )
        .unwrap());
        read(&dqkv)
    } else {
        let datt = poisoned("datt", &[b, nh, t, t], DType::F32);
        run(&attn::naive_attention_backward(
            g,
            &attn::NaiveAttentionBackward {
                dqkv: &dqkv,
                datt_scratch: &datt,
                dout: &dout,
                qkv: &qkv,
                att: &att,
                b,
                t,
                nh,
            },
        )
        .unwrap());
        read(&dqkv)
    };
    let h = 1e-2f32;
    let mut fd = vec![0f32; x0.len()];
    for i in 0..x0.len() {
        let mut x = x0.clone();
        x[i] = x0[i] + h;
        let up = loss(&x);
        x[i] = x0[i] - h;
        let down = loss(&x);
        fd[i] = ((up - down) / (2.0 * h as f64)) as f32;
    }
    let what = if flash_path { "flash" } else { "naive" };
    // Central differences with h = 1e-2 on an f32 forward: truncation and rounding noise are
    // both far below 1e-3 at this size.
    assert_close(
        &format!("{what} gradient vs finite differences"),
        &backward,
        &fd,
        1e-3,
    );
}

#[test]
fn flash_gradient_matches_finite_differences() {
    finite_difference_check(true);
}

#[test]
fn naive_gradient_matches_finite_differences() {
    finite_difference_check(false);
}

#[test]
fn flash_backward_is_deterministic() {
    let k = case(80, (2, 70, 64, 2), DType::F32);
    let g = gpu();
    let out = poisoned("out", &[k.b, k.t, k.c], DType::F32);
    let lse = poisoned("lse", &[k.b, k.nh, k.t], DType::F32);
    run(&attn::flash_attention_forward(g, &out, &lse, &k.qkv, k.b, k.t, k.nh).unwrap());
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dqkv = poisoned("dqkv", &[k.b, k.t, 3 * k.c], DType::F32);
        let dd = poisoned("d", &[k.b, k.nh, k.t], DType::F32);
        run(&attn::flash_attention_backward(
            g,
            &attn::AttentionBackward {
                dqkv: &dqkv,
                dout: &k.dout,
                qkv: &k.qkv,
                out: &out,
                lse: &lse,
                d_scratch: &dd,
                b: k.b,
                t: k.t,
                nh: k.nh,
            },
        )
        .unwrap());
        runs.push(read(&dqkv));
    }
    assert_bitwise_eq("flash backward, two runs", &runs[0], &runs[1]);
}

#[test]
fn naive_backward_is_deterministic() {
    let k = case(81, (2, 70, 64, 2), DType::F32);
    let runs: Vec<Vec<f32>> = (0..2).map(|_| naive(&k, DType::F32).2).collect();
    assert_bitwise_eq("naive backward, two runs", &runs[0], &runs[1]);
}

#[test]
fn shape_errors_are_returned() {
    let g = gpu();
    let (b, t, c, nh) = (1, 8, 16, 2);
    let f32t = |n: &[usize]| poisoned("x", n, DType::F32);
    let qkv = f32t(&[b, t, 3 * c]);
    let out = f32t(&[b, t, c]);
    let lse = f32t(&[b, nh, t]);
    let att = f32t(&[b, nh, t, t]);
    let expect_err = |r: wgpt::Result<Vec<Dispatch>>, what: &str| {
        let e = r.err().unwrap_or_else(|| panic!("{what}: must be refused"));
        eprintln!("{what}: {e}");
    };
    // C not divisible by NH.
    expect_err(
        attn::flash_attention_forward(g, &out, &lse, &qkv, b, t, 3),
        "C % NH",
    );
    expect_err(
        attn::naive_attention_forward(g, &out, &att, &qkv, b, t, 3),
        "naive C % NH",
    );
    // qkv not B*T*3C.
    expect_err(
        attn::flash_attention_forward(g, &out, &lse, &f32t(&[b, t, 3 * c + 1]), b, t, nh),
        "qkv len",
    );
    // out of the wrong size.
    expect_err(
        attn::flash_attention_forward(g, &f32t(&[b, t, c + 2]), &lse, &qkv, b, t, nh),
        "out len",
    );
    // lse of the wrong size or type.
    expect_err(
        attn::flash_attention_forward(g, &out, &f32t(&[b, nh, t + 1]), &qkv, b, t, nh),
        "lse len",
    );
    expect_err(
        attn::flash_attention_forward(
            g,
            &out,
            &poisoned("lse", &[b, nh, t], DType::U32),
            &qkv,
            b,
            t,
            nh,
        ),
        "lse dtype",
    );
    // Head size above the maximum.
    let big = f32t(&[1, 2, 3 * 256]);
    expect_err(
        attn::flash_attention_forward(g, &f32t(&[1, 2, 256]), &f32t(&[1, 1, 2]), &big, 1, 2, 1),
        "hs too big",
    );
    // Zero sizes.
    expect_err(
        attn::flash_attention_forward(g, &out, &lse, &qkv, 0, t, nh),
        "B = 0",
    );
    // att of the wrong size.
    expect_err(
        attn::naive_attention_forward(g, &out, &f32t(&[b, nh, t, t - 1]), &qkv, b, t, nh),
        "att len",
    );
    // Backward: scratch of the wrong size, dqkv of the wrong size, output aliasing an input.
    let dqkv = f32t(&[b, t, 3 * c]);
    expect_err(
        attn::flash_attention_backward(
            g,
            &attn::AttentionBackward {
                dqkv: &dqkv,
                dout: &out,
                qkv: &qkv,
                out: &out,
                lse: &lse,
                d_scratch: &f32t(&[b, nh]),
                b,
                t,
                nh,
            },
        ),
        "d_scratch len",
    );
    expect_err(
        attn::flash_attention_backward(
            g,
            &attn::AttentionBackward {
                dqkv: &f32t(&[b, t, c]),
                dout: &out,
                qkv: &qkv,
                out: &out,
                lse: &lse,
                d_scratch: &lse,
                b,
                t,
                nh,
            },
        ),
        "dqkv len",
    );
    expect_err(
        attn::flash_attention_backward(
            g,
            &attn::AttentionBackward {
                dqkv: &qkv,
                dout: &out,
                qkv: &qkv,
                out: &out,
                lse: &lse,
                d_scratch: &f32t(&[b, nh, t]),
                b,
                t,
                nh,
            },
        ),
        "dqkv aliasing qkv",
    );
    expect_err(
        attn::naive_attention_backward(
            g,
            &attn::NaiveAttentionBackward {
                dqkv: &dqkv,
                datt_scratch: &f32t(&[b, nh, t]),
                dout: &out,
                qkv: &qkv,
                att: &att,
                b,
                t,
                nh,
            },
        ),
        "datt len",
    );
    // Tiles that are not offered.
    let bad = FlashTiles {
        br: 48,
        bc: 16,
        bq: 16,
        bk: 16,
    };
    expect_err(
        attn::flash_attention_forward_tiled(
            g,
            bad,
            &attn::AttentionForward {
                out: &out,
                lse: &lse,
                qkv: &qkv,
                b,
                t,
                nh,
            },
        ),
        "bad tiles",
    );
    // The error names the op.
    let e = attn::flash_attention_forward(g, &out, &lse, &qkv, b, t, 3)
        .err()
        .unwrap();
    assert!(e.to_string().contains("flash_attention_forward"), "{e}");
}

#[test]
fn flops_count() {
    // GPT-2 layer at B=16, T=1024: 4 * 16 * 12 * 64 * 1024 * 1025 / 2 = 25.8 GFLOP.
    assert_eq!(attn::attention_flops(16, 1024, 12, 64), 25_794_969_600);
    assert_eq!(attn::attention_flops(1, 1, 1, 1), 4);
    assert_eq!(attn::attention_backward_flops(1, 1, 1, 1), 8);
}

#[test]
fn attention_shader_variants_validate() {
    // The same check as tests/shaders.rs, for this module's shaders alone.
    use wgpt::gpu::shader::{preprocess, source};
    let mut failures = Vec::new();
    let variants: Vec<_> = wgpt::ops::shader_variants()
        .into_iter()
        .filter(|v| v.shader.starts_with("attention"))
        .collect();
    assert!(variants.iter().any(|v| v.shader == "attention_flash"));
    assert!(variants.iter().any(|v| v.shader == "attention_naive"));
    for v in &variants {
        let text = preprocess(v.shader, source(v.shader).unwrap(), &v.defines).unwrap();
        let module = match naga::front::wgsl::parse_str(&text) {
            Ok(m) => m,
            Err(e) => {
                failures.push(format!("{:?}\n{}", v.defines, e.emit_to_string(&text)));
                continue;
            }
        };
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        if let Err(e) = validator.validate(&module) {
            failures.push(format!("{:?}\n{}", v.defines, e.emit_to_string(&text)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} variant(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{} attention shader variants validate", variants.len());
}

// ---- flash attention on cooperative matrices -----------------------------------------------

/// (B, T, C, NH).
type Shape = (usize, usize, usize, usize);

/// (B, T, C, NH) for the cooperative-matrix kernels on hardware: head sizes 64 and 32, T not a
/// multiple of any block, several (b, h).
const COOP_SHAPES: [Shape; 2] = [(1, 37, 128, 2), (2, 45, 64, 2)];

/// The emulated kernels' cases: (B, T, C, NH) with the (warps, BN) tile each runs on. Head sizes
/// 16 and 32 on the two smallest tiles: T crosses several outer and inner blocks, stops inside
/// one, and the second case has two warps per workgroup. Small on purpose: Mesa's software driver
/// takes minutes to compile an emulated kernel at head size 64 on the largest tile, and the
/// kernels' code paths do not depend on the head size beyond the fragment count.
const COOP_EMULATED_CASES: [(Shape, (u32, u32)); 2] =
    [((1, 37, 32, 2), (1, 16)), ((2, 45, 64, 2), (2, 32))];

/// Tolerances (max-norm relative) of the cooperative-matrix kernels against the float64
/// reference. Their roundings: f16 operands, P and dS rounded to f16 for the second product
/// (2^-11 relative each), the f16 output; every sum in f32. lse sees no f16 rounding after the
/// scores, so its bound is the tight one: q k^T summed in f16 (partial sums up to about 20 at
/// these inputs, half an ulp 2^-7 per addition, 32 additions) would move the scaled scores, and
/// so lse, by about 3e-3 absolute, some 5e-4 relative: five times the bound.
const COOP_OUT_TOL: f32 = 2e-3;
const COOP_LSE_TOL: f32 = 1e-4;
const COOP_GRAD_TOL: f32 = 3e-3;

/// The cooperative-matrix attention configuration the launcher would take here at head size
/// `hs`.
fn coop_config(hs: usize) -> CoopAttention {
    CoopAttention::choose(gpu(), hs, false).expect("a configuration that fits")
}

/// Every case of a check: the shapes with their configurations.
fn coop_cases(emulate: bool) -> Vec<(Shape, CoopAttention)> {
    if emulate {
        COOP_EMULATED_CASES
            .iter()
            .map(|&(shape, (warps, bn))| {
                let cfg = CoopAttention {
                    warps,
                    bn,
                    emulate: true,
                };
                (shape, cfg)
            })
            .collect()
    } else {
        COOP_SHAPES
            .iter()
            .map(|&shape| (shape, coop_config(shape.2 / shape.3)))
            .collect()
    }
}

/// Cooperative-matrix forward on `k` (f16 storage): (out, lse).
fn coop_forward(k: &Case, cfg: CoopAttention) -> (Vec<f32>, Vec<f32>) {
    let out = poisoned("out", &[k.b, k.t, k.c], DType::F16);
    let lse = poisoned("lse", &[k.b, k.nh, k.t], DType::F32);
    run(&attn::coop_attention_forward(
        gpu(),
        cfg,
        &attn::AttentionForward {
            out: &out,
            lse: &lse,
            qkv: &k.qkv,
            b: k.b,
            t: k.t,
            nh: k.nh,
        },
    )
    .unwrap());
    (read(&out), read(&lse))
}

fn coop_forward_check(emulate: bool) {
    for (s, (shape, cfg)) in coop_cases(emulate).into_iter().enumerate() {
        let k = case(90 + s as u64, shape, DType::F16);
        let want = cpu::attention_forward(&k.qkv_v, k.b, k.t, k.c, k.nh);
        {
            let (out, lse) = coop_forward(&k, cfg);
            let what = |w: &str| k.name(&format!("coop {w} {cfg:?}"), DType::F16);
            eprintln!(
                "{}: out {:.2e}, lse {:.2e}",
                what("forward"),
                rel_error(&out, &round_to(&want.out, DType::F16)),
                rel_error(&lse, &want.lse)
            );
            assert_close(
                &what("out"),
                &out,
                &round_to(&want.out, DType::F16),
                COOP_OUT_TOL,
            );
            assert_close(&what("lse"), &lse, &want.lse, COOP_LSE_TOL);
            let (out2, lse2) = coop_forward(&k, cfg);
            assert_bitwise_eq(&what("out, two runs"), &out, &out2);
            assert_bitwise_eq(&what("lse, two runs"), &lse, &lse2);
        }
    }
}

#[test]
fn coop_emulated_forward_matches_reference() {
    coop_forward_check(true);
}

#[test]
#[ignore = "needs 16x16 f16 cooperative matrices"]
fn coop_forward_matches_reference() {
    coop_forward_check(false);
}

/// Cooperative-matrix forward and backward on `k` (f16 storage): dqkv.
fn coop_backward(k: &Case, cfg: CoopAttention) -> Vec<f32> {
    let g = gpu();
    let out = poisoned("out", &[k.b, k.t, k.c], DType::F16);
    let lse = poisoned("lse", &[k.b, k.nh, k.t], DType::F32);
    let dqkv = poisoned("dqkv", &[k.b, k.t, 3 * k.c], DType::F16);
    let dd = poisoned("d", &[k.b, k.nh, k.t], DType::F32);
    let mut d = attn::coop_attention_forward(
        g,
        cfg,
        &attn::AttentionForward {
            out: &out,
            lse: &lse,
            qkv: &k.qkv,
            b: k.b,
            t: k.t,
            nh: k.nh,
        },
    )
    .unwrap();
    d.extend(
        attn::coop_attention_backward(
            g,
            cfg,
            &attn::AttentionBackward {
                dqkv: &dqkv,
                dout: &k.dout,
                qkv: &k.qkv,
                out: &out,
                lse: &lse,
                d_scratch: &dd,
                b: k.b,
                t: k.t,
                nh: k.nh,
            },
        )
        .unwrap(),
    );
    run(&d);
    read(&dqkv)
}

/// dq, dk and dv of a (B, T, 3C) gradient, each (B, T, C).
fn split_dqkv(x: &[f32], c: usize) -> [Vec<f32>; 3] {
    let part = |w: usize| -> Vec<f32> {
        x.chunks(3 * c)
            .flat_map(|row| row[w * c..(w + 1) * c].to_vec())
            .collect()
    };
    [part(0), part(1), part(2)]
}

fn coop_backward_check(emulate: bool) {
    for (s, (shape, cfg)) in coop_cases(emulate).into_iter().enumerate() {
        let k = case(90 + s as u64, shape, DType::F16);
        let want = cpu::attention_backward(&k.dout_v, &k.qkv_v, k.b, k.t, k.c, k.nh);
        let got = coop_backward(&k, cfg);
        let got3 = split_dqkv(&got, k.c);
        let want3 = split_dqkv(&round_to(&want, DType::F16), k.c);
        for (w, name) in ["dq", "dk", "dv"].iter().enumerate() {
            let what = k.name(&format!("coop {name} {cfg:?}"), DType::F16);
            eprintln!("{what}: {:.2e}", rel_error(&got3[w], &want3[w]));
            assert_close(&what, &got3[w], &want3[w], COOP_GRAD_TOL);
        }
        let again = coop_backward(&k, cfg);
        assert_bitwise_eq(&k.name("coop dqkv, two runs", DType::F16), &got, &again);
    }
}

#[test]
fn coop_emulated_backward_matches_reference() {
    coop_backward_check(true);
}

#[test]
#[ignore = "needs 16x16 f16 cooperative matrices"]
fn coop_backward_matches_reference() {
    coop_backward_check(false);
}

#[test]
fn coop_choice_follows_dtype_head_size_and_self_check() {
    let g = gpu();
    // f32 qkv and head sizes that are no multiple of 16 always take the flash kernels.
    assert_eq!(attn::auto_coop_attention(g, 64, DType::F32), None);
    assert_eq!(attn::auto_coop_attention(g, 24, DType::F16), None);
    let status = attn::coop_attention_status(g);
    assert_eq!(
        attn::auto_coop_attention(g, 64, DType::F16).is_some(),
        status.is_ok()
    );
    // Without cooperative matrices the self-check says why and f16 attention stays on flash.
    assert!(g.has_coop_mat16_f16_f32() || status.is_err(), "{status:?}");
    eprintln!(
        "cooperative-matrix attention on '{}': {status:?}",
        g.info.name
    );
}

#[test]
fn coop_emulated_passes_the_self_check() {
    // The start-up self-check (forward and backward against the flash kernels) on the emulated
    // kernels: the machinery that decides for real cooperative matrices, run here (on the
    // smallest tile: see COOP_EMULATED_CASES).
    let g = gpu();
    let cfg = CoopAttention {
        warps: 1,
        bn: 16,
        emulate: true,
    };
    // Err unless out, lse and dqkv are each within their bound (2e-3, 1e-4 and 3e-3).
    let worst = attn::agreement_with_flash(g, cfg).expect("self-check");
    eprintln!("emulated {cfg:?}: largest relative difference from flash {worst:.2e}");
}
