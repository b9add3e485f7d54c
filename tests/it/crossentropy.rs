//! Fused softmax + cross-entropy and the loss mean against the CPU reference, and the gradient
//! against central differences of the GPU forward.

use crate::common::*;
use wgpt::gpu::DType;
use wgpt::ops::crossentropy as ce;
use wgpt::reference::crossentropy as cpu;

/// (rows N, real vocabulary V, padded columns Vp), including GPT-2's vocabulary.
const SHAPES: [(usize, usize, usize); 6] = [
    (1, 1, 1),
    (5, 37, 40),
    (33, 100, 128),
    (7, 1000, 1003),
    (2, 257, 257),
    (3, 50257, 50304),
];

/// Random logits; the padded columns hold large values that would dominate the softmax if they
/// were not masked out.
fn make_logits(r: &mut wgpt::rng::Rng, n: usize, v: usize, vp: usize) -> Vec<f32> {
    let mut x = r.vec_normal(n * vp, 3.0);
    for i in 0..n {
        for j in v..vp {
            x[i * vp + j] = 50.0 + j as f32 * 1e-3;
        }
    }
    x
}

fn make_targets(r: &mut wgpt::rng::Rng, n: usize, v: usize) -> Vec<u32> {
    // The first and last ids always appear.
    (0..n)
        .map(|i| match i {
            0 => v as u32 - 1,
            1 => 0,
            _ => r.below(v as u64) as u32,
        })
        .collect()
}

#[test]
fn crossentropy_forward_backward_matches_reference() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        for dtype in float_dtypes() {
            for backward in [true, false] {
                for (s, &(n, v, vp)) in SHAPES.iter().enumerate() {
                    let mut r = rng(100 + s as u64);
                    let (lt, logits) =
                        upload("logits", &make_logits(&mut r, n, v, vp), &[n, vp], dtype);
                    let targets = make_targets(&mut r, n, v);
                    let tt = gpu().upload_u32("targets", &targets, &[n]).unwrap();
                    let dloss = 0.37f32;
                    let (dt, _) = upload("dloss", &[dloss], &[1], DType::F32);
                    let losses = poisoned("losses", &[n], DType::F32);
                    let d = ce::crossentropy_forward_backward(
                        gpu(),
                        &losses,
                        &lt,
                        &tt,
                        &dt,
                        v,
                        backward,
                    )
                    .unwrap();
                    gpu().run(&[&d]).unwrap();

                    let what = format!(
                        "{path}: crossentropy {dtype:?} backward={backward} N={n} V={v} Vp={vp}"
                    );
                    let mut want = vec![0.0; n];
                    cpu::crossentropy_forward(&mut want, &logits, &targets, vp, v);
                    assert_close(&format!("{what} losses"), &read(&losses), &want, 1e-5);
                    let got = read(&lt);
                    if backward {
                        let mut want = vec![0.0; n * vp];
                        cpu::crossentropy_backward(&mut want, &logits, &targets, dloss, vp, v);
                        let want = round_to(&want, dtype);
                        let what = format!("{what} dlogits");
                        // f16 element by element: most gradients are probabilities far below
                        // the target's, which a max-norm bound would leave unchecked.
                        assert_each_output(&what, &got, &want, dtype);
                        let padded_zero =
                            (0..n).all(|i| (v..vp).all(|j| got[i * vp + j].to_bits() == 0));
                        assert!(
                            padded_zero,
                            "{what}: padded columns must get exactly +0 gradient"
                        );
                    } else {
                        assert_bitwise_eq(&format!("{what}: logits untouched"), &got, &logits);
                    }
                }
            }
        }
    });
}

#[test]
fn dloss_is_read_from_the_gpu_at_run_time() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let (n, v, vp) = (4, 30, 32);
        let mut r = rng(7);
        let x = make_logits(&mut r, n, v, vp);
        let targets = make_targets(&mut r, n, v);
        let (lt, _) = upload("logits", &x, &[n, vp], DType::F32);
        let tt = gpu().upload_u32("targets", &targets, &[n]).unwrap();
        let (dt, _) = upload("dloss", &[1.0], &[1], DType::F32);
        let losses = poisoned("losses", &[n], DType::F32);
        let d = ce::crossentropy_forward_backward(gpu(), &losses, &lt, &tt, &dt, v, true).unwrap();
        // The same recorded dispatch, a new dloss value.
        for dloss in [1.0f32, 2048.0 / 7.0] {
            gpu().write(&lt, &x).unwrap();
            gpu().write(&dt, &[dloss]).unwrap();
            gpu().run(&[&d]).unwrap();
            let mut want = vec![0.0; n * vp];
            cpu::crossentropy_backward(&mut want, &x, &targets, dloss, vp, v);
            assert_close(
                &format!("{path}: dlogits with dloss {dloss}"),
                &read(&lt),
                &want,
                1e-5,
            );
        }
    });
}

#[test]
fn out_of_range_targets_are_clamped_and_checked() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let (n, v, vp) = (3, 10, 16);
        let mut r = rng(8);
        let x = make_logits(&mut r, n, v, vp);
        let (lt, _) = upload("logits", &x, &[n, vp], DType::F32);
        let bad = [3u32, 10, 4_000_000_000];
        let tt = gpu().upload_u32("targets", &bad, &[n]).unwrap();
        let (dt, _) = upload("dloss", &[1.0], &[1], DType::F32);
        let losses = poisoned("losses", &[n], DType::F32);
        let d = ce::crossentropy_forward_backward(gpu(), &losses, &lt, &tt, &dt, v, true).unwrap();
        gpu().run(&[&d]).unwrap();
        let mut want = vec![0.0; n];
        cpu::crossentropy_forward(&mut want, &x, &[3, 9, 9], vp, v);
        assert_close(
            &format!("{path}: losses with clamped targets"),
            &read(&losses),
            &want,
            1e-5,
        );
        assert!(read(&lt).iter().all(|g| g.is_finite()));
        assert!(ce::check_targets(&[3, 9, 0], v).is_ok());
        let e = ce::check_targets(&bad, v).expect_err("target 10 >= V");
        assert!(e.to_string().contains("position 1"), "{e}");
    });
}

#[test]
fn loss_mean_matches_reference() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        for (s, &n) in [1usize, 255, 257, 16_387].iter().enumerate() {
            let mut r = rng(200 + s as u64);
            let (lt, losses) = upload("losses", &r.vec_uniform(n, 0.0, 11.0), &[n], DType::F32);
            let scale = 1.0 / (n as f32 * 3.0);
            let out = poisoned("out", &[1], DType::F32);
            gpu()
                .run(&[&ce::loss_mean(gpu(), &out, &lt, scale, false).unwrap()])
                .unwrap();
            let want = cpu::loss_mean(&losses, scale);
            assert_close(
                &format!("{path}: loss_mean N={n}"),
                &read(&out),
                &[want],
                1e-5,
            );
            // Accumulating onto an arbitrary value (gradient accumulation's later micro-steps).
            gpu().write(&out, &[1.25]).unwrap();
            gpu()
                .run(&[&ce::loss_mean(gpu(), &out, &lt, scale, true).unwrap()])
                .unwrap();
            assert_close(
                &format!("{path}: loss_mean N={n} accumulate"),
                &read(&out),
                &[1.25 + want],
                1e-5,
            );
        }
    });
}

/// dlogits from the GPU backward (dloss = 1/N) vs central differences of the GPU mean loss.
#[test]
fn crossentropy_gradient_matches_finite_differences() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let (n, v, vp) = (3, 5, 8);
        let mut r = rng(9);
        let x = r.vec_normal(n * vp, 1.5);
        let targets = make_targets(&mut r, n, v);
        let (lt, _) = upload("logits", &x, &[n, vp], DType::F32);
        let tt = gpu().upload_u32("targets", &targets, &[n]).unwrap();
        let (dt, _) = upload("dloss", &[1.0 / n as f32], &[1], DType::F32);
        let losses = poisoned("losses", &[n], DType::F32);
        let mean = poisoned("mean", &[1], DType::F32);
        let fwd =
            ce::crossentropy_forward_backward(gpu(), &losses, &lt, &tt, &dt, v, false).unwrap();
        let avg = ce::loss_mean(gpu(), &mean, &losses, 1.0 / n as f32, false).unwrap();
        let loss = |xs: &[f32]| -> f64 {
            gpu().write(&lt, xs).unwrap();
            gpu().run(&[&fwd, &avg]).unwrap();
            read(&mean)[0] as f64
        };
        let h = 1e-2f32;
        let fd: Vec<f32> = (0..n * vp)
            .map(|k| {
                let mut p = x.clone();
                p[k] += h;
                let up = loss(&p);
                p[k] -= 2.0 * h;
                let down = loss(&p);
                ((up - down) / (2.0 * h as f64)) as f32
            })
            .collect();
        gpu().write(&lt, &x).unwrap();
        let bwd =
            ce::crossentropy_forward_backward(gpu(), &losses, &lt, &tt, &dt, v, true).unwrap();
        gpu().run(&[&bwd]).unwrap();
        assert_close(
            &format!("{path}: dlogits vs finite differences"),
            &read(&lt),
            &fd,
            1e-2,
        );
    });
}

/// Two runs of the same dispatches give the same bits (losses, dlogits, mean), on both paths.
#[test]
fn crossentropy_and_loss_mean_are_deterministic() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let (n, v, vp) = (6, 50257, 50304);
        let mut r = rng(300);
        let x = make_logits(&mut r, n, v, vp);
        let targets = make_targets(&mut r, n, v);
        let (lt, _) = upload("logits", &x, &[n, vp], DType::F32);
        let tt = gpu().upload_u32("targets", &targets, &[n]).unwrap();
        let (dt, _) = upload("dloss", &[0.25], &[1], DType::F32);
        let losses = poisoned("losses", &[n], DType::F32);
        let mean = poisoned("mean", &[1], DType::F32);
        let ce = ce::crossentropy_forward_backward(gpu(), &losses, &lt, &tt, &dt, v, true).unwrap();
        let avg = ce::loss_mean(gpu(), &mean, &losses, 1.0 / n as f32, false).unwrap();
        let mut runs = Vec::new();
        for _ in 0..2 {
            gpu().write(&lt, &x).unwrap();
            gpu().run(&[&ce, &avg]).unwrap();
            runs.push((read(&losses), read(&lt), read(&mean)));
        }
        assert_bitwise_eq(&format!("{path}: losses"), &runs[0].0, &runs[1].0);
        assert_bitwise_eq(&format!("{path}: dlogits"), &runs[0].1, &runs[1].1);
        assert_bitwise_eq(&format!("{path}: loss_mean"), &runs[0].2, &runs[1].2);
    });
}

/// The kernels run their subgroup variant exactly when the device has subgroups, and the tree
/// fallback on the GPU opened without them.
#[test]
fn launchers_pick_the_reduction_variant_of_the_device() {
    eprintln!(
        "SUBGROUP feature: {}, subgroup sizes {:?}",
        gpu().has_subgroups(),
        gpu().subgroup_sizes
    );
    for_each_reduction_path(|| {
        let g = gpu();
        let z = |shape: &[usize], dtype| g.zeros("t", shape, dtype).unwrap();
        let (logits, targets, dloss, losses) = (
            z(&[4, 16], DType::F32),
            z(&[4], DType::U32),
            z(&[1], DType::F32),
            z(&[4], DType::F32),
        );
        for backward in [true, false] {
            assert_reduction_variant(
                &ce::crossentropy_forward_backward(
                    g, &losses, &logits, &targets, &dloss, 16, backward,
                )
                .unwrap(),
            );
        }
        assert_reduction_variant(&ce::loss_mean(g, &dloss, &losses, 1.0, false).unwrap());
    });
}

#[test]
fn shape_errors_are_reported() {
    let g = gpu();
    let z = |shape: &[usize], dtype| g.zeros("t", shape, dtype).unwrap();
    let (logits, targets, dloss, losses) = (
        z(&[4, 16], DType::F32),
        z(&[4], DType::U32),
        z(&[1], DType::F32),
        z(&[4], DType::F32),
    );
    assert!(
        ce::crossentropy_forward_backward(g, &losses, &logits, &targets, &dloss, 16, true).is_ok()
    );
    let e = ce::crossentropy_forward_backward(g, &losses, &logits, &targets, &dloss, 17, true)
        .err()
        .expect("v > vp");
    assert!(
        e.to_string().contains("crossentropy_forward_backward"),
        "{e}"
    );
    assert!(
        ce::crossentropy_forward_backward(g, &losses, &logits, &targets, &dloss, 0, true).is_err()
    );
    assert!(ce::crossentropy_forward_backward(
        g,
        &z(&[5], DType::F32),
        &logits,
        &targets,
        &dloss,
        10,
        true
    )
    .is_err());
    assert!(ce::crossentropy_forward_backward(
        g,
        &losses,
        &logits,
        &z(&[4], DType::F32),
        &dloss,
        10,
        true
    )
    .is_err());
    assert!(ce::crossentropy_forward_backward(
        g,
        &losses,
        &logits,
        &z(&[3], DType::U32),
        &dloss,
        10,
        true
    )
    .is_err());
    assert!(ce::crossentropy_forward_backward(
        g,
        &losses,
        &logits,
        &targets,
        &z(&[2], DType::F32),
        10,
        true
    )
    .is_err());
    assert!(ce::crossentropy_forward_backward(
        g,
        &losses,
        &z(&[4, 16], DType::U32),
        &targets,
        &dloss,
        10,
        true
    )
    .is_err());
    assert!(ce::loss_mean(g, &z(&[2], DType::F32), &losses, 1.0, false).is_err());
    assert!(ce::loss_mean(g, &dloss, &z(&[4], DType::U32), 1.0, false).is_err());
}
