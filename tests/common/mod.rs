//! Shared test harness: one GPU per test binary, seeded inputs, comparisons with a reference.
#![allow(dead_code)]

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use wgpt::gpu::{DType, Gpu, GpuOptions, Tensor};
use wgpt::rng::Rng;

/// headless-train flags for a small model on the bundled corpus: one step takes a fraction of a
/// second on the CPU driver.
pub const SMALL_RUN: &[&str] = &[
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "16",
    "-B",
    "2",
    "-T",
    "16",
];

thread_local! {
    /// Set while a test body runs on the GPU without subgroups (see `for_each_reduction_path`).
    static WITHOUT_SUBGROUPS: Cell<bool> = const { Cell::new(false) };
}

fn open_gpu(options: &GpuOptions) -> Gpu {
    if std::env::var_os("WGPU_BACKEND").is_none() {
        // SAFETY: set before any other thread of this binary reads the environment through wgpu
        // (this runs inside a OnceLock initialiser, before the first instance).
        unsafe { std::env::set_var("WGPU_BACKEND", "vulkan") };
    }
    let g = Gpu::new(options).unwrap_or_else(|e| panic!("no GPU for tests: {e}"));
    eprintln!("{}", g.summary());
    g
}

/// The GPU every test in this binary shares. `WGPU_BACKEND` defaults to vulkan here. Inside
/// `for_each_reduction_path` it is, on the second pass, the GPU without subgroups.
pub fn gpu() -> &'static Gpu {
    if WITHOUT_SUBGROUPS.with(|w| w.get()) {
        return gpu_without_subgroups();
    }
    gpu_arc_static()
}

fn gpu_arc_static() -> &'static Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(open_gpu(&GpuOptions::default())))
}

/// The shared GPU as an `Arc`, for the trainer and the generator.
pub fn gpu_arc() -> Arc<Gpu> {
    gpu_arc_static().clone()
}

/// A second device on the same adapter with the SUBGROUP feature switched off, so that kernels
/// with a subgroup variant take their fallback path.
pub fn gpu_without_subgroups() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        open_gpu(&GpuOptions {
            allow_subgroups: false,
            ..Default::default()
        })
    })
}

/// Runs `body` on the default GPU and then, when that one has subgroups, again with `gpu()` (and
/// so every helper here) returning [`gpu_without_subgroups`]: the kernels' subgroup and fallback
/// paths both go through the same checks.
pub fn for_each_reduction_path(body: impl Fn()) {
    body();
    if !gpu().has_subgroups() {
        eprintln!("adapter has no SUBGROUP feature: only the fallback path was tested");
        return;
    }
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            WITHOUT_SUBGROUPS.with(|w| w.set(false));
        }
    }
    let _restore = Restore;
    WITHOUT_SUBGROUPS.with(|w| w.set(true));
    body();
}

/// Which reduction path the kernels take on the current `gpu()`, for messages.
pub fn reduction_path() -> String {
    if wgpt::ops::uses_subgroup_reductions(gpu()) {
        let (lo, hi) = gpu().subgroup_sizes;
        format!("subgroups {lo}..{hi}")
    } else {
        "tree".to_string()
    }
}

/// Checks that `dispatch` (made on `gpu()`) runs the variant its GPU calls for: `SUBGROUPS=true`
/// exactly when the device has subgroups, `SUBGROUPS=false` otherwise.
pub fn assert_reduction_variant(dispatch: &wgpt::Dispatch) {
    let want = gpu().has_subgroups();
    assert_eq!(wgpt::ops::uses_subgroup_reductions(gpu()), want);
    let label = &dispatch.pipeline.label;
    assert!(
        label.contains(&format!("SUBGROUPS={want}")),
        "{}: pipeline {label} is not the variant for a device with subgroups = {want}",
        dispatch.label
    );
    eprintln!("{}: {label}", dispatch.label);
}

/// The float dtypes this adapter can run: f32 always, f16 where SHADER_F16 is present.
pub fn float_dtypes() -> Vec<DType> {
    if gpu().has_f16() {
        vec![DType::F32, DType::F16]
    } else {
        eprintln!("adapter has no SHADER_F16: f16 variants skipped");
        vec![DType::F32]
    }
}

pub fn rng(seed: u64) -> Rng {
    Rng::new(seed)
}

/// Rounds values through f16 (what the GPU sees when a tensor is stored in f16).
pub fn round_to(data: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => data
            .iter()
            .map(|&x| half::f16::from_f32(x).to_f32())
            .collect(),
        _ => data.to_vec(),
    }
}

/// Uploads `data` as `dtype`; returns the tensor and the values as stored (rounded for f16).
pub fn upload(label: &str, data: &[f32], shape: &[usize], dtype: DType) -> (Tensor, Vec<f32>) {
    let t = gpu().upload(label, data, shape, dtype).expect("upload");
    (t, round_to(data, dtype))
}

/// A tensor full of NaN, so that any element a kernel fails to write shows up.
pub fn poisoned(label: &str, shape: &[usize], dtype: DType) -> Tensor {
    let t = gpu().zeros(label, shape, dtype).expect("alloc");
    gpu().poison(&t).expect("poison");
    t
}

/// An output before a kernel runs: poisoned, or (when the kernel accumulates into it) values
/// in [-1, 1) drawn from `seed`, as stored; returns the tensor and its starting values.
pub fn output(
    label: &str,
    shape: &[usize],
    dtype: DType,
    accumulate: bool,
    seed: u64,
) -> (Tensor, Vec<f32>) {
    let n = shape.iter().product();
    if accumulate {
        upload(label, &rng(seed).vec_uniform(n, -1.0, 1.0), shape, dtype)
    } else {
        (poisoned(label, shape, dtype), vec![0.0; n])
    }
}

pub fn read(t: &Tensor) -> Vec<f32> {
    gpu().read(t).expect("read-back")
}

/// The tolerance DESIGN.md sets for kernels whose inputs are stored in `dtype`.
pub fn tol_for(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => 1e-2,
        _ => 1e-5,
    }
}

/// Relative error in the max norm: max |got - want| / max |want|. NaN if anything on either
/// side is non-finite (a NaN must fail every comparison, never vanish in a `max`).
pub fn rel_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    if got.iter().chain(want).any(|x| !x.is_finite()) {
        return f32::NAN;
    }
    let scale = want
        .iter()
        .fold(0f64, |m, &w| m.max((w as f64).abs()))
        .max(1e-30);
    let mut worst = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        worst = worst.max((g as f64 - w as f64).abs());
    }
    (worst / scale) as f32
}

/// Fails, with the first mismatching elements, unless `got` is within `tol` of `want`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = rel_error(got, want);
    // NaN (a non-finite output) fails too.
    if err.is_nan() || err > tol {
        let scale = want.iter().fold(0f32, |m, &w| m.max(w.abs()));
        let mut shown = 0;
        let mut msg = String::new();
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if !g.is_finite() || (g - w).abs() > tol * scale {
                msg.push_str(&format!(
                    "\n  failed at index {i}: computed {g} vs expected {w}"
                ));
                shown += 1;
                if shown == 8 {
                    break;
                }
            }
        }
        panic!("{what}: relative error {err:e} > {tol:e} (max |ref| = {scale}){msg}");
    }
    eprintln!("{what}: relative error {err:.3e} (tolerance {tol:.0e})");
}

/// Checks the weights after one AdamW step taken from the same state (weights and moments) by the
/// GPU in f32 and by the float64 reference, element by element, at the tolerance f32 allows.
///
/// Each weight may differ by the rounding of its f32 update (`3e-7 |p| + 1e-6 lr`) plus what an
/// f32 error in its gradient can move it: AdamW's update depends on the gradient's direction
/// more than on its size, so a gradient known to within `eps` (here `1e-5` of the largest
/// gradient of its tensor, about the precision the gradient checks assert) changes the update by
/// about `4 eps / |g|` of `lr`, and by at most `2 lr` (a flipped sign) where `|g|` is not above
/// the noise (the key bias, whose true gradient is zero, is such a case: AdamW turns its f32
/// noise into steps of a sizeable part of `lr`). Well-conditioned weights (the vast majority)
/// must so match to about f32 precision. Returns how many weights needed more than rounding.
pub fn check_adamw_step(
    what: &str,
    layout: &wgpt::model::ParamLayout,
    got: &[f32],
    want: &[f64],
    grads: &[f64],
    lr: f64,
) -> usize {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let mut allow = vec![0f64; want.len()];
    for (_, e) in layout.entries.iter() {
        let g = &grads[e.range()];
        let eps = 1e-5 * g.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (a, &gi) in allow[e.range()].iter_mut().zip(g) {
            *a = lr * (4.0 * eps / gi.abs()).min(2.0);
        }
    }
    let rounding = |w: f64| 3e-7 * w.abs() + 1e-6 * lr;
    let mut worst = (0f64, 0usize);
    let mut loose = 0usize;
    let mut failures = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = rounding(w) + allow[i];
        let diff = (g as f64 - w).abs();
        if !g.is_finite() || diff > tol {
            failures.push(i);
        }
        if diff > rounding(w) {
            loose += 1;
        }
        if diff / tol > worst.0 {
            worst = (diff / tol, i);
        }
    }
    let name_of = |i: usize| {
        layout
            .entries
            .iter()
            .find(|(_, e)| e.range().contains(&i))
            .map(|(id, e)| format!("{}[{}]", id.name(), i - e.offset))
            .unwrap_or_else(|| format!("padding at {i}"))
    };
    if !failures.is_empty() {
        let mut msg = String::new();
        for &i in failures.iter().take(8) {
            msg.push_str(&format!(
                "\n  {}: computed {} vs reference {} (allowed {:.3e}, gradient {:.3e})",
                name_of(i),
                got[i],
                want[i],
                rounding(want[i]) + allow[i],
                grads[i]
            ));
        }
        panic!(
            "{what}: {} of {} weights beyond their tolerance{msg}",
            failures.len(),
            got.len()
        );
    }
    let mut worst_tensor = (0f32, String::new());
    for (id, e) in layout.entries.iter() {
        let want32: Vec<f32> = want[e.range()].iter().map(|&x| x as f32).collect();
        let err = rel_error(&got[e.range()], &want32);
        if err.is_nan() || err > worst_tensor.0 {
            worst_tensor = (err, id.name());
        }
    }
    eprintln!(
        "{what}: weights within tolerance (worst {:.2} of it, at {}); {loose} of {} beyond f32 \
         rounding; worst tensor max-norm relative error {:.2e} ({})",
        worst.0,
        name_of(worst.1),
        got.len(),
        worst_tensor.0,
        worst_tensor.1
    );
    loose
}

/// Bitwise equality of two f32 slices.
pub fn assert_bitwise_eq(what: &str, a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{what}: length mismatch");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            x.to_bits() == y.to_bits(),
            "{what}: runs differ at index {i}: {x} vs {y}"
        );
    }
}

/// Writes seeded weights for `config` as a Hugging Face GPT-2 folder (`model.safetensors` +
/// `config.json`) into `dir` and returns them as imported from it. The weights are GPT-2's
/// initialisation with every bias and LayerNorm parameter moved off its initial value, so that
/// the bias and LayerNorm paths carry non-trivial values from the first step.
pub fn hf_checkpoint(
    dir: &std::path::Path,
    config: &wgpt::model::GptConfig,
    seed: u64,
) -> wgpt::checkpoint::Checkpoint {
    use wgpt::model::params::storage_order;
    let layout = wgpt::model::ParamLayout::new(config);
    let mut params = wgpt::model::init::init_params(config, &layout, seed);
    let mut r = rng(seed + 1);
    for id in storage_order(config) {
        if id.decayed() {
            continue;
        }
        let ln = id.is_layernorm_weight();
        for x in &mut params[layout.entry(id).range()] {
            *x += if ln {
                r.range(-0.2, 0.2)
            } else {
                r.range(-0.1, 0.1)
            };
        }
    }
    wgpt::checkpoint::hf::export(dir, config, &params).expect("export");
    let back = wgpt::checkpoint::hf::load_any(dir).expect("import");
    assert_eq!(back.params, params, "export then import is exact");
    back
}

/// Checks a gradient-norm status tensor `[norm, clip_coef, finite, 0]` against the reference.
pub fn check_status(what: &str, got: &[f32], want: &wgpt::reference::optimizer::NormStatus) {
    assert_close(
        &format!("{what} norm"),
        &got[..1],
        &[want.norm as f32],
        1e-5,
    );
    assert_close(
        &format!("{what} clip_coef"),
        &got[1..2],
        &[want.clip_coef as f32],
        1e-5,
    );
    assert_eq!(
        got[2],
        if want.finite { 1.0 } else { 0.0 },
        "{what}: finite flag"
    );
    assert_eq!(got[3], 0.0, "{what}: unused slot");
}
