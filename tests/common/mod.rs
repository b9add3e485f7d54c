//! Shared test harness: one GPU per test binary, seeded inputs, comparisons with a reference.
#![allow(dead_code)]

use std::cell::Cell;
use std::sync::{Arc, OnceLock};
use wgpt::gpu::{DType, Gpu, GpuOptions, Tensor};
use wgpt::reference::model::AdamUpdate;
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
    if !needs(Feature::Subgroups, "the subgroup reduction path") {
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

/// A device feature that some tests need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// SHADER_F16: f16 storage and arithmetic.
    F16,
    /// SUBGROUP: subgroup reductions and the cooperative-matrix kernels' emulated form.
    Subgroups,
}

impl Feature {
    /// The name `WGPT_TEST_REQUIRE` lists it by.
    pub fn name(self) -> &'static str {
        match self {
            Feature::F16 => "f16",
            Feature::Subgroups => "subgroups",
        }
    }

    fn present(self) -> bool {
        match self {
            Feature::F16 => gpu().has_f16(),
            Feature::Subgroups => gpu_arc_static().has_subgroups(),
        }
    }
}

/// Whether `WGPT_TEST_REQUIRE` (a comma-separated list such as `f16,subgroups`) names `feature`.
/// `scripts/test.sh` sets it to what the software driver has, so that there a test cannot pass
/// by leaving out the cases the feature was needed for.
pub fn required(feature: Feature) -> bool {
    required_in(std::env::var("WGPT_TEST_REQUIRE").ok().as_deref(), feature)
}

fn required_in(list: Option<&str>, feature: Feature) -> bool {
    list.unwrap_or("")
        .split(',')
        .any(|f| f.trim().eq_ignore_ascii_case(feature.name()))
}

/// Whether the device has `feature`, for a test (or some of its cases) that needs it: `true`
/// when present; when absent, a failure if `WGPT_TEST_REQUIRE` lists the feature, else `false`
/// with a line on stderr saying what `what` leaves out.
pub fn needs(feature: Feature, what: &str) -> bool {
    if feature.present() {
        return true;
    }
    assert!(
        !required(feature),
        "{what}: the adapter '{}' lacks {}, which WGPT_TEST_REQUIRE lists as required",
        gpu().info.name,
        feature.name()
    );
    eprintln!(
        "{what}: adapter '{}' has no {}: left out (WGPT_TEST_REQUIRE={} would fail instead)",
        gpu().info.name,
        feature.name(),
        feature.name()
    );
    false
}

/// The float dtypes this adapter can run: f32 always, f16 where SHADER_F16 is present (and must
/// be, where `WGPT_TEST_REQUIRE` lists `f16`).
pub fn float_dtypes() -> Vec<DType> {
    if needs(Feature::F16, "f16 variants") {
        vec![DType::F32, DType::F16]
    } else {
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

/// The bound (relative, max-norm: see [`rel_error`]) on an f32 output against the float64
/// reference computed from the inputs as stored ([`upload`], [`round_to`]): what f32 sums and
/// products leave, whatever the inputs' storage type. f16 inputs are exact in f32 and a product
/// of two of them is too, so they add nothing to it.
pub const F32_TOL: f32 = 1e-5;

/// One f16 rounding: the bound on an f16 output against the reference rounded to f16. A kernel
/// that computes in f32 and rounds once, to nearest, lands within half an f16 ulp (2^-11
/// relative) of the exact value, on the reference's own rounding of it unless the exact value
/// lies so close to a rounding boundary that the f32 noise tips it to the other side: then one
/// whole ulp off, at most 2^-10 = 9.8e-4 of the value. An f16 intermediate (an accumulator, a
/// probability rounded before its product) adds errors of that size at every step and exceeds it.
pub const F16_ROUNDING: f32 = 1e-3;

/// The smallest positive normal f16, 2^-14: the absolute floor of [`assert_f16_each`], since
/// WGSL lets an implementation flush subnormal results (below it) to zero.
pub const F16_MIN_NORMAL: f32 = 6.103_515_6e-5;

/// The bound on an output stored in `dtype`, whatever the inputs' types: [`F16_ROUNDING`] for
/// f16, [`F32_TOL`] otherwise.
pub fn tol_for_output(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => F16_ROUNDING,
        _ => F32_TOL,
    }
}

/// Fails unless every `|got[i] - want[i]|` is at most `allowed(want[i])`, naming the first
/// elements beyond it and saying `claim` of the others; a NaN on either side fails.
// `!(x <= bound)` is meant: it is true for a NaN on either side.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn assert_each_within(
    what: &str,
    got: &[f32],
    want: &[f32],
    allowed: impl Fn(f32) -> f64,
    claim: &str,
) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let mut worst = (0f64, 0usize);
    let mut failures = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ratio = (g as f64 - w as f64).abs() / allowed(w);
        // Written so that a NaN (from a non-finite value on either side) fails.
        if !(ratio <= 1.0) {
            failures.push(i);
        } else if ratio > worst.0 {
            worst = (ratio, i);
        }
    }
    if !failures.is_empty() {
        let mut msg = String::new();
        for &i in failures.iter().take(8) {
            msg.push_str(&format!(
                "\n  index {i}: computed {} vs expected {} (allowed {:.3e})",
                got[i],
                want[i],
                allowed(want[i])
            ));
        }
        panic!(
            "{what}: {} of {} elements are not {claim}{msg}",
            failures.len(),
            got.len()
        );
    }
    eprintln!(
        "{what}: every element {claim} (worst {:.2} of its bound, at index {})",
        worst.0, worst.1
    );
}

/// Fails unless every element of an f16 output lies within one f16 rounding of its own expected
/// value: `|got - want| <= F16_ROUNDING |want| + F16_MIN_NORMAL`. For element-wise kernels, where
/// the max-norm check of [`assert_close`] lets small outputs be off by a fraction of the largest
/// (a GELU output near zero could be 0.06 off next to outputs of 6). A NaN on either side fails.
pub fn assert_f16_each(what: &str, got: &[f32], want: &[f32]) {
    assert_each_within(
        what,
        got,
        want,
        |w| F16_ROUNDING as f64 * (w as f64).abs() + F16_MIN_NORMAL as f64,
        "within one f16 rounding of their own value",
    );
}

/// Fails unless an element-wise output stored in `dtype` matches `want` (the reference rounded to
/// `dtype`): within [`tol_for_output`] in the max norm and, for f16, every element within one f16
/// rounding of its own value ([`assert_f16_each`]), so that small outputs next to large ones are
/// checked too.
pub fn assert_each_output(what: &str, got: &[f32], want: &[f32], dtype: DType) {
    assert_close(what, got, want, tol_for_output(dtype));
    if dtype == DType::F16 {
        assert_f16_each(what, got, want);
    }
}

/// Fails unless every element of an f16 output is its exact value (`exact`: the float64
/// reference, not rounded to f16) rounded once: `|got - exact|` at most half an f16 ulp of
/// `exact` plus [`F32_TOL`] of the largest `|exact|` (the f32 arithmetic before the rounding);
/// below the smallest normal f16, at most [`F16_MIN_NORMAL`] (flushed to zero). Stronger than the
/// max-norm [`F16_ROUNDING`]: an f16 intermediate (a probability rounded to f16 before its
/// product) moves most elements by a fraction of an ulp, which carries many past half of one.
/// A NaN on either side fails.
pub fn assert_f16_rounded(what: &str, got: &[f32], exact: &[f32]) {
    let noise = F32_TOL as f64 * exact.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
    let allowed = |x: f32| {
        let x = x.abs();
        if x < F16_MIN_NORMAL {
            return F16_MIN_NORMAL as f64 + noise;
        }
        // Half an f16 ulp in x's binade: 2^(exponent - 11).
        let exponent = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
        2f64.powi(exponent - 11) + noise
    };
    assert_each_within(what, got, exact, allowed, "the exact value rounded to f16");
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

/// One AdamW step taken from the same state (weights and moments) by the GPU and by the float64
/// reference: what [`check_adamw_step`] needs to size each weight's allowance.
pub struct AdamwStep<'a> {
    pub lr: f64,
    /// The step's rule (the reference's, in f64).
    pub adam: AdamUpdate<f64>,
    /// The moments before the step (empty: zero).
    pub m: &'a [f32],
    pub v: &'a [f32],
    /// The reference's gradient (before clipping) and clipping coefficient.
    pub grads: &'a [f64],
    pub clip: f64,
    /// The GPU's gradient (before clipping) and the clipping coefficient of its norm.
    pub gpu_grads: &'a [f32],
    pub gpu_clip: f64,
}

impl AdamwStep<'_> {
    /// AdamW's step (without weight decay) of weight `i` for gradient `g` scaled by `clip`.
    fn update(&self, i: usize, g: f64, clip: f64) -> f64 {
        let (m, v) = if self.m.is_empty() {
            (0.0, 0.0)
        } else {
            (self.m[i] as f64, self.v[i] as f64)
        };
        let (m, v) = self.adam.moments(m, v, g * clip);
        self.adam.step(m, v)
    }

    /// How far weight `i`'s update moves because the GPU's gradient (and clipping coefficient)
    /// differ from the reference's: what the measured gradient error allows this weight, judged
    /// by its own gradient. A weight whose gradient is well above its error moves by a tiny part
    /// of `lr`; one whose gradient is at the noise (the key bias, whose true gradient is zero)
    /// may move by up to `2 lr`.
    fn gradient_allowance(&self, i: usize) -> f64 {
        (self.update(i, self.gpu_grads[i] as f64, self.gpu_clip)
            - self.update(i, self.grads[i], self.clip))
        .abs()
    }
}

/// An allowance above this part of `lr` marks a weight whose gradient is at the noise of its f32
/// computation ("loose"); [`check_adamw_step`] counts them against a ceiling.
pub const LOOSE_ALLOWANCE: f64 = 1e-3;

/// Checks the weights after one AdamW step taken from the same state (weights and moments) by the
/// GPU in f32 and by the float64 reference, element by element.
///
/// Each weight may differ by the rounding of its f32 update (`3e-7 |p| + 1e-6 lr`) plus what its
/// own gradient's measured error moves its update: AdamW's step computed in f64 with the GPU's
/// gradient against the step with the reference's (twice that, for the f32 arithmetic of the
/// moments around it). So every weight is judged by its own gradient: where the gradient is well
/// above its error the allowance is a tiny part of `lr`, and only weights whose gradient is at
/// the noise get more. Those (an allowance above [`LOOSE_ALLOWANCE`] of `lr`) must number at most
/// `max_loose`, a ceiling the caller writes down.
// `!(x <= bound)` is meant: it is true for a NaN on either side.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
pub fn check_adamw_step(
    what: &str,
    layout: &wgpt::model::ParamLayout,
    got: &[f32],
    want: &[f64],
    step: &AdamwStep,
    max_loose: usize,
) {
    assert_eq!(got.len(), want.len(), "{what}: length mismatch");
    let lr = step.lr;
    let rounding = |w: f64| 3e-7 * w.abs() + 1e-6 * lr;
    let mut worst = (0f64, 0usize);
    let mut loose = 0usize;
    let mut failures = Vec::new();
    // Recomputed for the failure message rather than kept: one per weight (124M at GPT-2).
    let allowance = |i: usize| 2.0 * step.gradient_allowance(i);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let allow = allowance(i);
        let tol = rounding(w) + allow;
        let diff = (g as f64 - w).abs();
        // A NaN anywhere (weight, gradient, allowance) fails.
        if !(diff <= tol) {
            failures.push(i);
        }
        if !(allow <= LOOSE_ALLOWANCE * lr) {
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
                "\n  {}: computed {} vs reference {} (allowed {:.3e}, gradient {:.3e} vs the \
                 GPU's {:.3e})",
                name_of(i),
                got[i],
                want[i],
                rounding(want[i]) + allowance(i),
                step.grads[i],
                step.gpu_grads[i]
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
        "{what}: weights within tolerance (worst {:.2} of it, at {}); {loose} of {} with a \
         gradient at the noise (allowance above {LOOSE_ALLOWANCE:e} lr; ceiling {max_loose}); \
         worst tensor max-norm relative error {:.2e} ({})",
        worst.0,
        name_of(worst.1),
        got.len(),
        worst_tensor.0,
        worst_tensor.1
    );
    assert!(
        loose <= max_loose,
        "{what}: {loose} weights have a gradient at the noise of its computation (their update \
         may move by over {LOOSE_ALLOWANCE:e} lr), more than the {max_loose} expected"
    );
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

/// Fails unless two checkpoints hold the same training state bit for bit: config, weights, both
/// AdamW moments and the training state (counts, loss scale, loader epoch and position, random
/// generator).
pub fn assert_same_checkpoint(
    what: &str,
    got: &wgpt::checkpoint::Checkpoint,
    want: &wgpt::checkpoint::Checkpoint,
) {
    assert_eq!(got.config, want.config, "{what}: config");
    assert_bitwise_eq(&format!("{what}: weights"), &got.params, &want.params);
    let (Some((gm, gv)), Some((wm, wv))) = (&got.moments, &want.moments) else {
        panic!("{what}: moments missing");
    };
    assert_bitwise_eq(&format!("{what}: first moments"), gm, wm);
    assert_bitwise_eq(&format!("{what}: second moments"), gv, wv);
    let (Some(g), Some(w)) = (&got.state, &want.state) else {
        panic!("{what}: training state missing");
    };
    assert_eq!(
        g.loss_scale.to_bits(),
        w.loss_scale.to_bits(),
        "{what}: loss scale"
    );
    assert_eq!(g, w, "{what}: training state");
    eprintln!(
        "{what}: same state (step {}, adam_t {}, loader epoch {} position {}, rng {:x?})",
        g.step, g.adam_t, g.loader_epoch, g.loader_position, g.rng_state
    );
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
