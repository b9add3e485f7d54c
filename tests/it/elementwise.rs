//! GELU, residual add and casts against the CPU reference.

use crate::common::*;
use wgpt::gpu::DType;
use wgpt::ops::elementwise as ew;
use wgpt::reference::elementwise as cpu;

const SIZES: [usize; 4] = [1, 255, 257, 70_001];

#[test]
fn gelu_forward_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &n) in SIZES.iter().enumerate() {
            let mut r = rng(i as u64);
            let x = r.vec_uniform(n, -6.0, 6.0);
            let (xt, x) = upload("x", &x, &[n], dtype);
            let out = poisoned("out", &[n], dtype);
            gpu()
                .run(&[&ew::gelu_forward(gpu(), &out, &xt).unwrap()])
                .unwrap();
            let mut want = vec![0.0; n];
            cpu::gelu_forward(&mut want, &x);
            // f16 element by element: outputs near zero (x near 0, or very negative) held to
            // their own rounding, not to a fraction of the largest output.
            assert_each_output(
                &format!("gelu_forward {dtype:?} n={n}"),
                &read(&out),
                &round_to(&want, dtype),
                dtype,
            );
        }
    }
}

#[test]
fn gelu_backward_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &n) in SIZES.iter().enumerate() {
            let mut r = rng(100 + i as u64);
            let (xt, x) = upload("x", &r.vec_uniform(n, -6.0, 6.0), &[n], dtype);
            let (dt, d) = upload("dout", &r.vec_uniform(n, -1.0, 1.0), &[n], dtype);
            let out = poisoned("dinp", &[n], dtype);
            gpu()
                .run(&[&ew::gelu_backward(gpu(), &out, &xt, &dt).unwrap()])
                .unwrap();
            let mut want = vec![0.0; n];
            cpu::gelu_backward(&mut want, &x, &d);
            assert_each_output(
                &format!("gelu_backward {dtype:?} n={n}"),
                &read(&out),
                &round_to(&want, dtype),
                dtype,
            );
        }
    }
}

#[test]
fn gelu_gradient_matches_finite_differences() {
    // The reference derivative itself, checked against central differences in f64.
    let mut r = rng(5);
    for _ in 0..200 {
        let x = r.range(-5.0, 5.0);
        let h = 1e-3f32;
        let fd = (cpu::gelu(x + h) as f64 - cpu::gelu(x - h) as f64) / (2.0 * h as f64);
        let g = cpu::gelu_grad(x) as f64;
        assert!((fd - g).abs() < 1e-3, "x={x}: fd {fd} vs analytic {g}");
    }
}

#[test]
fn gelu_is_finite_for_large_inputs() {
    let x = [-1e4f32, -80.0, -20.0, 20.0, 80.0, 1e4];
    let (xt, _) = upload("x", &x, &[6], DType::F32);
    let out = poisoned("out", &[6], DType::F32);
    gpu()
        .run(&[&ew::gelu_forward(gpu(), &out, &xt).unwrap()])
        .unwrap();
    let mut want = vec![0.0; 6];
    cpu::gelu_forward(&mut want, &x);
    assert_close("gelu_forward extremes", &read(&out), &want, 1e-6);
}

#[test]
fn residual_forward_matches_reference() {
    for dtype in float_dtypes() {
        for (i, &n) in SIZES.iter().enumerate() {
            let mut r = rng(200 + i as u64);
            let (at, a) = upload("a", &r.vec_uniform(n, -3.0, 3.0), &[n], DType::F32);
            let (bt, b) = upload("b", &r.vec_uniform(n, -3.0, 3.0), &[n], dtype);
            let out = poisoned("out", &[n], DType::F32);
            gpu()
                .run(&[&ew::residual_forward(gpu(), &out, &at, &bt).unwrap()])
                .unwrap();
            let mut want = vec![0.0; n];
            cpu::residual_forward(&mut want, &a, &b);
            assert_close(
                &format!("residual_forward {dtype:?} n={n}"),
                &read(&out),
                &want,
                1e-6,
            );
        }
    }
}

#[test]
fn casts_round_trip() {
    if !gpu().has_f16() {
        eprintln!("adapter has no SHADER_F16: cast test skipped");
        return;
    }
    for &n in &SIZES {
        let mut r = rng(n as u64);
        let x = r.vec_uniform(n, -100.0, 100.0);
        let (xt, x) = upload("x", &x, &[n], DType::F32);
        let h = poisoned("h", &[n], DType::F16);
        let back = poisoned("back", &[n], DType::F32);
        gpu()
            .run(&[
                &ew::cast(gpu(), &h, &xt).unwrap(),
                &ew::cast(gpu(), &back, &h).unwrap(),
            ])
            .unwrap();
        // f16 rounding is to nearest: the GPU must agree with half's conversion exactly.
        assert_bitwise_eq("f32 -> f16 -> f32", &read(&back), &round_to(&x, DType::F16));
    }
}

#[test]
fn shape_mismatch_is_an_error() {
    let (a, _) = upload("a", &[1.0; 10], &[10], DType::F32);
    let out = poisoned("out", &[11], DType::F32);
    let err = ew::gelu_forward(gpu(), &out, &a)
        .err()
        .expect("mismatch must be refused");
    assert!(err.to_string().contains("gelu_forward"), "{err}");
}

#[test]
fn fill_writes_every_element() {
    for dtype in float_dtypes() {
        for &n in &SIZES {
            let out = poisoned("out", &[n], dtype);
            gpu().run(&[&ew::fill(gpu(), &out, -2.5).unwrap()]).unwrap();
            assert_close(
                &format!("fill {dtype:?} n={n}"),
                &read(&out),
                &vec![-2.5; n],
                0.0,
            );
        }
    }
}
