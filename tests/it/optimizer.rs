//! Global gradient norm and fused AdamW against the CPU reference (AdamW state followed in f64
//! over several steps), including the grid-stride and 2-D grid paths GPT-2 sized buffers take,
//! clipping, the f16 parameter copy and the skip of non-finite steps.

use crate::common::*;
use wgpt::gpu::{DType, Tensor};
use wgpt::ops::optimizer as opt;
use wgpt::ops::optimizer::{AdamWHyper, GradNormScalars};
use wgpt::reference::optimizer as cpu;
use wgpt::reference::scaler::LossScaler;

/// Gradient buffers: tiny, around the workgroup size, and bigger than the first stage's
/// 2048 x 256 threads so that each thread strides over the buffer several times.
const SIZES: [usize; 5] = [1, 255, 257, 70_001, 1_300_001];

fn f32_tensor(label: &str, data: &[f32]) -> Tensor {
    gpu()
        .upload(label, data, &[data.len()], DType::F32)
        .unwrap()
}

/// Runs grad_norm (capped at `max_groups` first-stage workgroups) and returns the status.
fn gpu_norm(grads: &[f32], inv_loss_scale: f32, max_norm: f32, max_groups: usize) -> Vec<f32> {
    gpu_norm_split(grads, &[], inv_loss_scale, max_norm, max_groups)
}

/// [`gpu_norm`] with the gradients spread over buffers, cut at `cuts`.
fn gpu_norm_split(
    grads: &[f32],
    cuts: &[usize],
    inv_loss_scale: f32,
    max_norm: f32,
    max_groups: usize,
) -> Vec<f32> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(grads.len());
    let buffers: Vec<Tensor> = bounds
        .windows(2)
        .map(|w| f32_tensor("grads", &grads[w[0]..w[1]]))
        .collect();
    let lens: Vec<usize> = buffers.iter().map(|b| b.len()).collect();
    let g: Vec<&Tensor> = buffers.iter().collect();
    let status = poisoned("status", &[opt::STATUS_LEN], DType::F32);
    let scratch = poisoned("scratch", &[opt::grad_norm_scratch_len(&lens)], DType::F32);
    let scalars = gpu()
        .zeros("scalars", &[GradNormScalars::LEN], DType::F32)
        .unwrap();
    GradNormScalars::new(inv_loss_scale, max_norm)
        .write(gpu(), &scalars)
        .unwrap();
    let ds =
        opt::grad_norm_with_groups(gpu(), &status, &g, &scratch, &scalars, max_groups).unwrap();
    assert_eq!(
        ds.len(),
        buffers.len() + 1,
        "one partial pass per buffer, then the finish"
    );
    gpu().run(&ds.iter().collect::<Vec<_>>()).unwrap();
    read(&status)
}

#[test]
fn grad_norm_matches_reference() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        for (s, &n) in SIZES.iter().enumerate() {
            let mut r = rng(700 + s as u64);
            // Gradients as mixed precision leaves them: multiplied by the loss scale.
            let loss_scale = 1024.0f32;
            let grads: Vec<f32> = r
                .vec_normal(n, 0.01)
                .iter()
                .map(|g| g * loss_scale)
                .collect();
            for max_norm in [0.0f32, 0.05, 1e9] {
                let got = gpu_norm(
                    &grads,
                    1.0 / loss_scale,
                    max_norm,
                    opt::GRAD_NORM_MAX_GROUPS,
                );
                let want = cpu::grad_norm(&grads, 1.0 / loss_scale, max_norm);
                check_status(
                    &format!("{path}: grad_norm n={n} max_norm={max_norm}"),
                    &got,
                    &want,
                );
            }
        }
    });
}

#[test]
fn grad_norm_grid_stride_with_few_workgroups() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        // The same code path as GPT-2's 124M gradients (each thread strides over the buffer many
        // times), reached with a small buffer by capping the first stage's workgroups.
        let n = 100_003;
        let mut r = rng(710);
        let grads = r.vec_normal(n, 1.0);
        let want = cpu::grad_norm(&grads, 1.0, 1.0);
        for groups in [1, 3, 7, 391] {
            let got = gpu_norm(&grads, 1.0, 1.0, groups);
            check_status(
                &format!("{path}: grad_norm n={n} with {groups} workgroups"),
                &got,
                &want,
            );
        }
    });
}

/// Gradients spread over several storage buffers (as a model larger than one binding keeps
/// them): one norm over all of them, non-finite values seen in any buffer.
#[test]
fn grad_norm_over_several_buffers() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let mut r = rng(715);
        let n = 300_007;
        let grads = r.vec_normal(n, 1.0);
        let want = cpu::grad_norm(&grads, 0.5, 1.0);
        for (cuts, groups) in [
            (vec![1], opt::GRAD_NORM_MAX_GROUPS),
            (vec![100_000, 100_256, 299_999], opt::GRAD_NORM_MAX_GROUPS),
            (vec![5, 77_777, 200_000], 3),
        ] {
            let got = gpu_norm_split(&grads, &cuts, 0.5, 1.0, groups);
            check_status(
                &format!("{path}: grad_norm over buffers cut at {cuts:?}, {groups} groups"),
                &got,
                &want,
            );
            let mut bad = grads.clone();
            bad[n - 2] = f32::INFINITY;
            let got = gpu_norm_split(&bad, &cuts, 0.5, 1.0, groups);
            assert_eq!(
                got[2], 0.0,
                "{path}: inf in the last buffer, status {got:?}"
            );
        }
    });
}

#[test]
fn grad_norm_is_deterministic() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let mut r = rng(720);
        let grads = r.vec_normal(1_000_003, 1.0);
        let a = gpu_norm(&grads, 1.0, 1.0, opt::GRAD_NORM_MAX_GROUPS);
        let b = gpu_norm(&grads, 1.0, 1.0, opt::GRAD_NORM_MAX_GROUPS);
        assert_bitwise_eq(&format!("{path}: grad_norm status"), &a, &b);
    });
}

#[test]
fn grad_norm_flags_non_finite_gradients() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let mut r = rng(730);
        let n = 70_001;
        for (what, index, value) in [
            ("NaN", 12_345, f32::NAN),
            ("+inf", n - 1, f32::INFINITY),
            ("-inf", 0, f32::NEG_INFINITY),
            // Finite gradients whose squares overflow f32: the norm is not finite either.
            ("overflowing squares", 7, 1e30),
        ] {
            let mut grads = r.vec_normal(n, 1.0);
            grads[index] = value;
            if what == "overflowing squares" {
                grads[8] = 1e30;
            }
            let got = gpu_norm(&grads, 1.0, 1.0, opt::GRAD_NORM_MAX_GROUPS);
            assert_eq!(
                got[2], 0.0,
                "{path}: {what}: finite flag must be 0, status {got:?}"
            );
            assert_eq!(got[1], 1.0, "{what}: clip_coef is neutral, status {got:?}");
        }
    });
}

/// Everything one AdamW test case holds on the GPU.
struct AdamState {
    params: Tensor,
    grads: Tensor,
    m: Tensor,
    v: Tensor,
    copy: Option<Tensor>,
    status: Tensor,
    _scratch: Tensor,
    scalars: Tensor,
    hyper: Tensor,
    dispatches: Vec<wgpt::Dispatch>,
}

fn adam_state(
    p0: &[f32],
    m0: &[f32],
    v0: &[f32],
    with_copy: bool,
    n_decay: usize,
    grid_limit: u32,
) -> AdamState {
    let n = p0.len();
    let params = f32_tensor("params", p0);
    let grads = gpu().zeros("grads", &[n], DType::F32).unwrap();
    let m = f32_tensor("m", m0);
    let v = f32_tensor("v", v0);
    let copy = with_copy.then(|| poisoned("params_f16", &[n], DType::F16));
    let status = poisoned("status", &[opt::STATUS_LEN], DType::F32);
    let scratch = poisoned("scratch", &[opt::grad_norm_scratch_len(&[n])], DType::F32);
    let scalars = gpu()
        .zeros("scalars", &[GradNormScalars::LEN], DType::F32)
        .unwrap();
    let hyper = gpu()
        .zeros("hyper", &[AdamWHyper::LEN], DType::F32)
        .unwrap();
    let mut dispatches = opt::grad_norm(gpu(), &status, &[&grads], &scratch, &scalars).unwrap();
    dispatches.push(
        opt::adamw_with_grid_limit(
            gpu(),
            &opt::AdamW {
                params: &params,
                grads: &grads,
                m: &m,
                v: &v,
                params_f16: copy.as_ref(),
                status: &status,
                hyper: &hyper,
                n_decay,
            },
            grid_limit,
        )
        .unwrap(),
    );
    AdamState {
        params,
        grads,
        m,
        v,
        copy,
        status,
        _scratch: scratch,
        scalars,
        hyper,
        dispatches,
    }
}

fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

#[test]
fn adamw_matches_reference_over_several_steps() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        // (n, n_decay, max_norm, f16 copy, workgroups per grid dimension)
        let cases: [(usize, usize, f32, bool, u32); 6] = [
            (1, 1, 1e-3, false, 65_535),
            (1000, 0, 1e9, true, 65_535), // clipping inactive, no decay
            (4097, 4097, 0.0, false, 65_535), // clipping disabled, all decayed
            (70_001, 40_000, 0.5, true, 65_535), // clipping active, decay split
            (70_001, 12_345, 1e9, true, 16), // the 2-D grid GPT-2 needs, with a small grid limit
            (300_007, 299_999, 0.5, false, 7),
        ];
        let f16_ok = gpu().has_f16();
        for (s, &(n, n_decay, max_norm, copy, grid_limit)) in cases.iter().enumerate() {
            let copy = copy && f16_ok;
            let mut r = rng(800 + s as u64);
            let p0 = r.vec_normal(n, 1.0);
            let m0 = r.vec_normal(n, 0.01);
            let v0: Vec<f32> = r.vec_normal(n, 0.01).iter().map(|x| x * x).collect();
            let k = adam_state(&p0, &m0, &v0, copy, n_decay, grid_limit);
            let (mut p, mut m, mut v) = (to_f64(&p0), to_f64(&m0), to_f64(&v0));
            let loss_scale = 256.0f32;
            let mut clipped = 0;
            for step in 1..=4u32 {
                let grads: Vec<f32> = r
                    .vec_normal(n, 0.02)
                    .iter()
                    .map(|g| g * loss_scale)
                    .collect();
                gpu().write(&k.grads, &grads).unwrap();
                GradNormScalars::new(1.0 / loss_scale, max_norm)
                    .write(gpu(), &k.scalars)
                    .unwrap();
                let lr = 1e-2 / step as f32;
                let hyper = AdamWHyper::new(lr, 0.9, 0.95, 1e-8, 0.1, step, 1.0 / loss_scale);
                hyper.write(gpu(), &k.hyper).unwrap();
                gpu().run(&k.dispatches.iter().collect::<Vec<_>>()).unwrap();

                let status = cpu::grad_norm(&grads, 1.0 / loss_scale, max_norm);
                if status.clip_coef < 1.0 {
                    clipped += 1;
                }
                let hp = cpu::AdamW {
                    lr: lr as f64,
                    beta1: 0.9,
                    beta2: 0.95,
                    eps: 1e-8,
                    weight_decay: 0.1,
                    step,
                    inv_loss_scale: 1.0 / loss_scale as f64,
                };
                cpu::adamw_step(&mut p, &mut m, &mut v, &grads, &status, &hp, n_decay);
                let what = format!(
                    "{path}: adamw n={n} n_decay={n_decay} max_norm={max_norm} step {step}"
                );
                check_status(&what, &read(&k.status), &status);
                let got_p = read(&k.params);
                assert_close(&format!("{what} params"), &got_p, &to_f32(&p), 1e-5);
                assert_close(&format!("{what} m"), &read(&k.m), &to_f32(&m), 1e-5);
                assert_close(&format!("{what} v"), &read(&k.v), &to_f32(&v), 1e-5);
                if let Some(c) = &k.copy {
                    // The copy is exactly the f16 rounding of the updated f32 parameters.
                    assert_bitwise_eq(
                        &format!("{what} f16 copy"),
                        &read(c),
                        &round_to(&got_p, DType::F16),
                    );
                }
            }
            let active = max_norm > 0.0 && max_norm < 1e9;
            assert_eq!(
                clipped > 0,
                active,
                "case {s}: clipping should be active exactly when max_norm is small"
            );
        }
    });
}

#[test]
fn adamw_skips_a_step_with_non_finite_gradients() {
    for_each_reduction_path(|| {
        let path = reduction_path();
        let n = 5000;
        let mut r = rng(900);
        let p0 = r.vec_normal(n, 1.0);
        let m0 = r.vec_normal(n, 0.01);
        let v0: Vec<f32> = r.vec_normal(n, 0.01).iter().map(|x| x * x).collect();
        let k = adam_state(&p0, &m0, &v0, gpu().has_f16(), 3000, 65_535);
        let copy_before = vec![0.5f32; n];
        if let Some(c) = &k.copy {
            gpu().write(c, &copy_before).unwrap();
        }
        for bad in [f32::NAN, f32::INFINITY] {
            let mut grads = r.vec_normal(n, 1.0);
            grads[4321] = bad;
            gpu().write(&k.grads, &grads).unwrap();
            GradNormScalars::new(1.0, 1.0)
                .write(gpu(), &k.scalars)
                .unwrap();
            AdamWHyper::new(1e-2, 0.9, 0.95, 1e-8, 0.1, 1, 1.0)
                .write(gpu(), &k.hyper)
                .unwrap();
            gpu().run(&k.dispatches.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(read(&k.status)[2], 0.0, "{path}: finite flag");
            assert_bitwise_eq(
                &format!("params after a {bad} gradient"),
                &read(&k.params),
                &p0,
            );
            assert_bitwise_eq(&format!("m after a {bad} gradient"), &read(&k.m), &m0);
            assert_bitwise_eq(&format!("v after a {bad} gradient"), &read(&k.v), &v0);
            if let Some(c) = &k.copy {
                assert_bitwise_eq("f16 copy after a skipped step", &read(c), &copy_before);
            }
        }
        // A finite step afterwards updates as usual.
        let grads = r.vec_normal(n, 1.0);
        gpu().write(&k.grads, &grads).unwrap();
        gpu().run(&k.dispatches.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(read(&k.status)[2], 1.0);
        let got = read(&k.params);
        assert!(
            got.iter().zip(&p0).filter(|(a, b)| a != b).count() > n / 2,
            "a finite step must update"
        );
    });
}

/// Both stages of the norm run their subgroup variant exactly when the device has subgroups, and
/// the tree fallback on the GPU opened without them.
#[test]
fn grad_norm_picks_the_reduction_variant_of_the_device() {
    eprintln!(
        "SUBGROUP feature: {}, subgroup sizes {:?}",
        gpu().has_subgroups(),
        gpu().subgroup_sizes
    );
    for_each_reduction_path(|| {
        let g = gpu();
        let z = |n: usize| g.zeros("t", &[n], DType::F32).unwrap();
        let n = 1000;
        let scratch = z(opt::grad_norm_scratch_len(&[n]));
        let ds = opt::grad_norm(g, &z(4), &[&z(n)], &scratch, &z(4)).unwrap();
        for d in &ds {
            assert_reduction_variant(d);
        }
    });
}

#[test]
fn shape_errors_are_reported() {
    let g = gpu();
    let f = DType::F32;
    let z = |n: usize, dtype| g.zeros("t", &[n], dtype).unwrap();
    let n = 1000;
    let (grads, status, scratch, scalars) = (
        z(n, f),
        z(4, f),
        z(opt::grad_norm_scratch_len(&[n]), f),
        z(4, f),
    );
    assert!(opt::grad_norm(g, &status, &[&grads], &scratch, &scalars).is_ok());
    let e = opt::grad_norm(g, &status, &[&grads], &z(1, f), &scalars)
        .err()
        .expect("scratch");
    assert!(e.to_string().contains("scratch"), "{e}");
    // Two buffers need room for both buffers' partials.
    assert!(opt::grad_norm(g, &status, &[&grads, &grads], &scratch, &scalars).is_err());
    assert!(opt::grad_norm(g, &status, &[], &scratch, &scalars).is_err());
    assert!(opt::grad_norm(g, &z(3, f), &[&grads], &scratch, &scalars).is_err());
    let half = z(n, DType::F16);
    assert!(opt::grad_norm(g, &status, &[&half], &scratch, &scalars).is_err());
    assert!(opt::grad_norm(g, &status, &[&grads], &scratch, &z(2, f)).is_err());

    let (p, m, v, hyper) = (z(n, f), z(n, f), z(n, f), z(AdamWHyper::LEN, f));
    assert!(opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &grads,
            m: &m,
            v: &v,
            params_f16: None,
            status: &status,
            hyper: &hyper,
            n_decay: n
        }
    )
    .is_ok());
    let e = opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &grads,
            m: &m,
            v: &v,
            params_f16: None,
            status: &status,
            hyper: &hyper,
            n_decay: n + 1,
        },
    )
    .err()
    .expect("n_decay");
    assert!(e.to_string().contains("adamw"), "{e}");
    assert!(opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &z(n - 1, f),
            m: &m,
            v: &v,
            params_f16: None,
            status: &status,
            hyper: &hyper,
            n_decay: 0
        }
    )
    .is_err());
    assert!(opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &grads,
            m: &z(n, DType::F16),
            v: &v,
            params_f16: None,
            status: &status,
            hyper: &hyper,
            n_decay: 0
        }
    )
    .is_err());
    assert!(opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &grads,
            m: &m,
            v: &v,
            params_f16: Some(&z(n, f)),
            status: &status,
            hyper: &hyper,
            n_decay: 0
        }
    )
    .is_err());
    assert!(opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &grads,
            m: &m,
            v: &v,
            params_f16: None,
            status: &status,
            hyper: &z(4, f),
            n_decay: 0
        }
    )
    .is_err());
    assert!(opt::adamw(
        g,
        &opt::AdamW {
            params: &p,
            grads: &grads,
            m: &m,
            v: &v,
            params_f16: None,
            status: &z(2, f),
            hyper: &hyper,
            n_decay: 0
        }
    )
    .is_err());
    assert!(GradNormScalars::new(1.0, 1.0).write(g, &z(3, f)).is_err());
    assert!(AdamWHyper::new(1e-3, 0.9, 0.95, 1e-8, 0.1, 1, 1.0)
        .write(g, &z(4, f))
        .is_err());
}

/// (scale, clean steps, Adam's t) after a step that was or was not finite, by the CPU's rule
/// (the reference's [`LossScaler`], as PyTorch's GradScaler): Adam counts the steps taken.
fn scaler_rule(
    (scale, clean, t): (f32, u32, u32),
    finite: bool,
    scaling: bool,
    growth: u32,
) -> (f32, u32, u32) {
    let mut s = LossScaler {
        scale,
        clean_steps: clean as usize,
        enabled: scaling,
        growth_interval: growth as usize,
    };
    let skipped = s.update(finite);
    (s.scale, s.clean_steps as u32, t + u32::from(!skipped))
}

#[test]
fn step_state_advances_on_the_gpu_as_the_cpu_rules_say() {
    let g = gpu();
    let table = opt::bias_correction_table(0.9, 0.95);
    // Both corrections reach 1.0 in f32 within the table's length, and not before its end.
    let (last1, last2) = (table[table.len() - 2], table[table.len() - 1]);
    assert!(
        last1 < 1.0 || last2 < 1.0,
        "the table ends at its first (1, 1) pair"
    );
    assert!(
        table.len() / 2 > 300 && table.len() / 2 < 400,
        "{} pairs",
        table.len() / 2
    );
    let table_t = f32_tensor("table", &table);
    // Not a power of two: dloss and 1/tokens are rounded.
    let tokens = 3 * 7 * 5;
    // Starting scales: the default, one that is not a power of two, and ones next to both
    // clamps; with and without scaling; a growth interval of 3 so that doubling happens. The
    // pattern below takes 3 * 2^22 past the upper clamp (doubled after the first three steps:
    // 3 * 2^23 > 2^24) and 3 * 2^-17 past the lower one (halved at steps 3 and 5: 3 * 2^-18 <
    // 2^-16, then 2^-17); 2^23 reaches 2^24 by a plain doubling and 2^-15 reaches 2^-16 by a
    // halving, then stays at the lower clamp.
    let cases = [
        (65536.0f32, true),
        (3.0, true),
        (8_388_608.0, true),
        (12_582_912.0, true),
        (1.0 / 32768.0, true),
        (3.0 / 131_072.0, true),
        (1.0, false),
    ];
    let (mut upper, mut lower) = (0, 0);
    let pattern = [
        true, true, true, false, true, false, false, true, true, true, true, true, true, true,
    ];
    for (start, scaling) in cases {
        let state = g
            .zeros("state", &[opt::StepState::LEN], DType::U32)
            .unwrap();
        // Steps taken already: t runs past the table's end.
        let adam_t0 = table.len() / 2 - 5;
        opt::StepState::new(start, 0, adam_t0, adam_t0, tokens)
            .write(g, &state)
            .unwrap();
        let dloss = f32_tensor("dloss", &[f32::NAN]);
        let norm = f32_tensor("norm scalars", &[f32::NAN, 0.75, 0.0, 0.0]);
        let hyper_in = [3e-4, 0.9, 0.95, 1e-8, 0.1, f32::NAN, f32::NAN, f32::NAN];
        let hyper = f32_tensor("hyper", &hyper_in);
        let status = f32_tensor("status", &[0.0; 4]);
        let d = opt::advance_step_state(
            g,
            &opt::AdvanceStepState {
                state: &state,
                status: &status,
                table: &table_t,
                dloss: &dloss,
                norm_scalars: &norm,
                hyper: &hyper,
                growth_interval: 3,
                scaling,
            },
        )
        .unwrap();
        let mut want = (start, 0u32, adam_t0 as u32);
        for (i, &finite) in pattern.iter().enumerate() {
            g.write(&status, &[1.5, 0.5, if finite { 1.0 } else { 0.0 }, 0.0])
                .unwrap();
            g.run(&[&d]).unwrap();
            let before = want.0;
            want = scaler_rule(want, finite, scaling, 3);
            // Steps where a clamp, not a plain doubling or halving, sets the scale.
            upper += usize::from(finite && want.0 == 16_777_216.0 && before * 2.0 > want.0);
            lower += usize::from(!finite && scaling && before * 0.5 < want.0);
            let got = opt::StepState::from_bytes(&g.read_bytes(&state).unwrap()).unwrap();
            let what = format!("start {start}, scaling {scaling}, step {i}");
            let n = tokens as f32;
            assert_eq!(got.scale.to_bits(), want.0.to_bits(), "{what}: scale");
            assert_eq!(
                got.inv_scale.to_bits(),
                (1.0 / want.0).to_bits(),
                "{what}: 1/scale"
            );
            assert_eq!(got.dloss.to_bits(), (want.0 / n).to_bits(), "{what}: dloss");
            assert_eq!(
                got.inv_tokens.to_bits(),
                (1.0 / n).to_bits(),
                "{what}: 1/tokens"
            );
            assert_eq!(
                (got.clean_steps, got.adam_t),
                (want.1, want.2),
                "{what}: counts"
            );
            assert_eq!(got.skipped, u32::from(!finite), "{what}: skipped");
            assert_eq!(got.steps as usize, adam_t0 + i + 1, "{what}: steps");
            assert_eq!(
                read(&dloss)[0].to_bits(),
                (want.0 / n).to_bits(),
                "{what}: dloss out"
            );
            assert_eq!(
                read(&norm),
                [1.0 / want.0, 0.75, 0.0, 0.0],
                "{what}: norm scalars"
            );
            let t = (want.2 + 1) as i32;
            let bc = [1.0 - 0.9f64.powi(t), 1.0 - 0.95f64.powi(t)].map(|c| c as f32);
            let h = read(&hyper);
            assert_eq!(
                &h[..5],
                &hyper_in[..5],
                "{what}: the CPU's hyperparameters kept"
            );
            assert_eq!(
                [h[5].to_bits(), h[6].to_bits(), h[7].to_bits()],
                [bc[0].to_bits(), bc[1].to_bits(), (1.0 / want.0).to_bits()],
                "{what}: bias corrections of step {} and 1/scale",
                want.2 + 1
            );
        }
    }
    // Both clamps were taken: once above (3 * 2^22), three times below (3 * 2^-17 twice,
    // 2^-15 once: its second halving starts from 2^-16 itself).
    assert_eq!((upper, lower), (1, 3), "clamped steps (upper, lower)");
}
