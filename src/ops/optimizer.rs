//! Launchers for `shaders/optimizer.wgsl`: the global gradient norm over every gradient buffer
//! (with the clipping coefficient and a finiteness flag for dynamic loss scaling) and fused
//! AdamW over a parameter buffer.
//!
//! The GPU writes the status tensor (`[norm, clip_coef, finite, 0]`) that AdamW reads, so
//! clipping and the skip of non-finite steps need no read-back; and [`advance_step_state`] keeps
//! the loss scaler and Adam's step count on the GPU, writing the next step's
//! [`GradNormScalars`], [`AdamWHyper`] bias corrections and dloss, so that steps can be queued
//! back to back with only the learning rate written by the CPU.

use super::{uses_subgroup_reductions, Check, SUBGROUPS};
use crate::error::{Error, Result};
use crate::gpu::{Axis, Bind, DType, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};

const WG: u32 = 256;

/// Value: [`uses_subgroup_reductions`].
const NORM_PARTIALS: Kernel<1> = Kernel {
    shader: "optimizer",
    entry: "grad_norm_partials",
    fixed: &[("NORM_PARTIALS", "1")],
    axes: [SUBGROUPS],
};

/// Value: [`uses_subgroup_reductions`].
const NORM_FINISH: Kernel<1> = Kernel {
    shader: "optimizer",
    entry: "grad_norm_finish",
    fixed: &[("NORM_FINISH", "1")],
    axes: [SUBGROUPS],
};

/// Value: the storage type of the parameters' copy, unset without one.
const ADAMW: Kernel<1> = Kernel {
    shader: "optimizer",
    entry: "adamw",
    fixed: &[("ADAMW", "1")],
    axes: [Axis::optional("COPY_T", &["f16"])],
};

const STEP_STATE: Kernel<0> = Kernel {
    shader: "optimizer",
    entry: "advance_step_state",
    fixed: &[("STEP_STATE", "1")],
    axes: [],
};

/// Most workgroups of the norm's first stage: with a grid-stride loop any n works (GPT-2's 124M
/// gradients: about 240 elements per thread), and the second stage sums at most this many
/// partials in one workgroup.
pub const GRAD_NORM_MAX_GROUPS: usize = 2048;

/// Elements of the status tensor `grad_norm` writes: `[norm, clip_coef, finite, unused]`.
pub const STATUS_LEN: usize = 4;

/// What the gradient norm reads each step, as an f32 tensor of [`GradNormScalars::LEN`] elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct GradNormScalars {
    /// 1 / loss scale: the gradients in the buffer are multiplied by the loss scale.
    pub inv_loss_scale: f32,
    /// Clip the global norm to this; `<= 0` disables clipping (clip_coef = 1).
    pub max_norm: f32,
    pub _pad: [f32; 2],
}

impl GradNormScalars {
    pub const LEN: usize = 4;

    pub fn new(inv_loss_scale: f32, max_norm: f32) -> Self {
        GradNormScalars {
            inv_loss_scale,
            max_norm,
            _pad: [0.0; 2],
        }
    }

    /// Writes these values into `t` (f32, [`Self::LEN`] elements).
    pub fn write(&self, gpu: &Gpu, t: &Tensor) -> Result<()> {
        Check::new(gpu, "grad_norm")
            .arg("scalars", t)
            .f32()?
            .len(Self::LEN)?;
        gpu.write_bytes(t, bytemuck::bytes_of(self))
    }
}

/// AdamW's hyper-parameters for one step, as an f32 tensor of [`AdamWHyper::LEN`] elements.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamWHyper {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 - beta1^t for the 1-based step t.
    pub bias_correction1: f32,
    /// 1 - beta2^t.
    pub bias_correction2: f32,
    pub inv_loss_scale: f32,
}

impl AdamWHyper {
    pub const LEN: usize = 8;

    /// The values for 1-based step `step`, bias corrections computed in f64.
    pub fn new(
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        step: u32,
        inv_loss_scale: f32,
    ) -> Self {
        AdamWHyper {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
            bias_correction1: (1.0 - (beta1 as f64).powi(step as i32)) as f32,
            bias_correction2: (1.0 - (beta2 as f64).powi(step as i32)) as f32,
            inv_loss_scale,
        }
    }

    /// Writes these values into `t` (f32, [`Self::LEN`] elements).
    pub fn write(&self, gpu: &Gpu, t: &Tensor) -> Result<()> {
        Check::new(gpu, "adamw")
            .arg("hyper", t)
            .f32()?
            .len(Self::LEN)?;
        gpu.write_bytes(t, bytemuck::bytes_of(self))
    }
}

/// Uniform block `NormParams` of `shaders/optimizer.wgsl` (both stages of the norm).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    /// Gradient elements of this buffer (stage 1).
    n: u32,
    /// Stage 1: this buffer's workgroups; stage 2: partials over all buffers.
    groups: u32,
    /// Stage 1: this buffer's first partial in the scratch.
    base: u32,
    /// Partials over all buffers (the flags follow the sums).
    total: u32,
}

/// Uniform block `AdamParams` of `shaders/optimizer.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AdamParams {
    n: u32,
    /// Elements `[0, n_decay)` get weight decay.
    n_decay: u32,
    _pad0: u32,
    _pad1: u32,
}

/// Uniform block `StateParams` of `shaders/optimizer.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct StateParams {
    growth_interval: u32,
    /// 1: dynamic loss scaling; 0: the scale stays 1.
    scaling: u32,
    /// Bias-correction pairs in the table.
    table_len: u32,
    _pad: u32,
}

fn norm_groups(n: usize, max_groups: usize) -> usize {
    n.div_ceil(WG as usize).clamp(1, max_groups.max(1))
}

/// Length (f32 elements) of the scratch tensor `grad_norm` needs for gradient buffers of these
/// lengths.
pub fn grad_norm_scratch_len(buffer_lens: &[usize]) -> usize {
    2 * buffer_lens
        .iter()
        .map(|&n| norm_groups(n, GRAD_NORM_MAX_GROUPS))
        .sum::<usize>()
}

/// Global L2 norm of the gradients in every buffer of `grads`, in deterministic stages: one
/// dispatch of partial sums per buffer, then one that adds all partials in order. Returns the
/// dispatches to run in order.
///
/// - `status`: `[4]` f32, overwritten with `[norm, clip_coef, finite, 0]`: norm =
///   `sqrt(sum (g * inv_loss_scale)^2)`; clip_coef = `min(1, max_norm / (norm + 1e-6))`, or 1
///   when `max_norm <= 0` or the gradients are not finite; finite = 1.0, or 0.0 when any gradient
///   is inf/NaN (or the sum of squares overflows).
/// - `grads`: f32 buffers (any shapes) that together hold every parameter gradient once.
/// - `scratch`: f32 with at least [`grad_norm_scratch_len`] elements (contents on entry do not
///   matter).
/// - `scalars`: f32 `[GradNormScalars::LEN]` holding a [`GradNormScalars`].
pub fn grad_norm(
    gpu: &Gpu,
    status: &Tensor,
    grads: &[&Tensor],
    scratch: &Tensor,
    scalars: &Tensor,
) -> Result<Vec<Dispatch>> {
    grad_norm_with_groups(gpu, status, grads, scratch, scalars, GRAD_NORM_MAX_GROUPS)
}

/// [`grad_norm`] with each buffer's first stage capped at `max_groups` workgroups instead of
/// [`GRAD_NORM_MAX_GROUPS`], so that tests can make each thread stride over the buffer many
/// times, as GPT-2 sized buffers do, with small inputs. The scratch must then hold
/// `2 * sum over buffers of min(ceil(n / 256), max_groups)` elements.
#[doc(hidden)]
pub fn grad_norm_with_groups(
    gpu: &Gpu,
    status: &Tensor,
    grads: &[&Tensor],
    scratch: &Tensor,
    scalars: &Tensor,
    max_groups: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "grad_norm";
    let check = Check::new(gpu, OP);
    check.arg("status", status).f32()?.len(STATUS_LEN)?;
    check
        .arg("scalars", scalars)
        .f32()?
        .len(GradNormScalars::LEN)?;
    if grads.is_empty() {
        return Err(check.error("no gradient buffers"));
    }
    let max_groups = max_groups.min(GRAD_NORM_MAX_GROUPS);
    let groups: Vec<usize> = grads
        .iter()
        .map(|g| norm_groups(g.len(), max_groups))
        .collect();
    let total: usize = groups.iter().sum();
    check
        .arg("scratch", scratch)
        .f32()?
        .at_least(2 * total, "grad_norm_scratch_len")?;
    check.fits_u32("partial sums", 2 * total)?;
    let mut dispatches = Vec::with_capacity(grads.len() + 1);
    let mut base = 0;
    for (k, (grads, &groups)) in grads.iter().zip(&groups).enumerate() {
        check.arg("grads", grads).f32()?;
        let n = grads.len();
        // The grid-stride loop's index (up to n + stride) must not wrap around.
        check.fits_u32(
            "gradient elements plus the grid stride",
            n + groups * WG as usize,
        )?;
        let params = gpu.uniform(&NormParams {
            n: n as u32,
            groups: groups as u32,
            base: base as u32,
            total: total as u32,
        });
        dispatches.push(gpu.dispatch(DispatchDesc {
            kernel: NORM_PARTIALS.with([&uses_subgroup_reductions(gpu)]),
            bindings: &[
                Bind::Uniform(&params),
                Bind::Read(grads),
                Bind::Read(scalars),
                Bind::Write(scratch),
            ],
            workgroups: [groups as u32, 1, 1],
            label: format!("{OP}.buffer{k}"),
        })?);
        base += groups;
    }
    let params = gpu.uniform(&NormParams {
        n: 0,
        groups: total as u32,
        base: 0,
        total: total as u32,
    });
    let finish = gpu.dispatch(DispatchDesc {
        kernel: NORM_FINISH.with([&uses_subgroup_reductions(gpu)]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(scratch),
            Bind::Read(scalars),
            Bind::Write(status),
        ],
        workgroups: [1, 1, 1],
        label: format!("{OP}.finish"),
    })?;
    dispatches.push(finish);
    Ok(dispatches)
}

/// The arguments of [`adamw`].
#[derive(Clone, Copy)]
pub struct AdamW<'a> {
    pub params: &'a Tensor,
    pub grads: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub params_f16: Option<&'a Tensor>,
    pub status: &'a Tensor,
    pub hyper: &'a Tensor,
    pub n_decay: usize,
}

/// Fused AdamW (PyTorch semantics) over one parameter buffer in one dispatch:
/// `g = grad * inv_loss_scale * clip_coef`; `p *= 1 - lr * wd` for elements `[0, n_decay)`
/// only; `m = b1 m + (1 - b1) g`; `v = b2 v + (1 - b2) g^2`;
/// `p -= lr * (m / bc1) / (sqrt(v / bc2) + eps)`. When `status[2]` (finite) is 0 nothing is
/// written at all.
///
/// - `params`, `m`, `v`: `[n]` f32, updated in place. `grads`: `[n]` f32, read.
/// - `params_f16`: optional `[n]` f16 copy of the parameters, rewritten from the updated f32
///   values in the same pass (mixed precision).
/// - `status`: `[4]` f32 from [`grad_norm`]. `hyper`: f32 `[AdamWHyper::LEN]` holding an
///   [`AdamWHyper`].
pub fn adamw(gpu: &Gpu, args: &AdamW<'_>) -> Result<Dispatch> {
    let max = gpu.limits.max_compute_workgroups_per_dimension;
    adamw_with_grid_limit(gpu, args, max)
}

/// [`adamw`] with the grid laid out as if at most `max_per_dim` workgroups fitted in one
/// dimension, so that tests reach the 2-D grid GPT-2's 124M parameters need (485k workgroups)
/// with small inputs.
#[doc(hidden)]
pub fn adamw_with_grid_limit(gpu: &Gpu, args: &AdamW<'_>, max_per_dim: u32) -> Result<Dispatch> {
    const OP: &str = "adamw";
    let &AdamW {
        params,
        grads,
        m,
        v,
        params_f16,
        status,
        hyper,
        n_decay,
    } = args;
    let check = Check::new(gpu, OP);
    let n = params.len();
    for (what, t) in [("params", params), ("grads", grads), ("m", m), ("v", v)] {
        check.arg(what, t).f32()?.len(n)?;
    }
    check.arg("status", status).f32()?.len(STATUS_LEN)?;
    check.arg("hyper", hyper).f32()?.len(AdamWHyper::LEN)?;
    if n_decay > n {
        return Err(check.error(format!("n_decay = {n_decay} is beyond the {n} parameters")));
    }
    if let Some(copy) = params_f16 {
        check
            .arg("params_f16", copy)
            .dtype(&[DType::F16])?
            .len(n)?
            .float()?;
    }
    let n32 = check.fits_u32("parameter count", n)?;
    let uniform = gpu.uniform(&AdamParams {
        n: n32,
        n_decay: n_decay as u32,
        _pad0: 0,
        _pad1: 0,
    });
    let mut bindings = vec![
        Bind::Uniform(&uniform),
        Bind::Write(params),
        Bind::Read(grads),
        Bind::Write(m),
        Bind::Write(v),
        Bind::Read(status),
        Bind::Read(hyper),
    ];
    if let Some(copy) = params_f16 {
        bindings.push(Bind::Write(copy));
    }
    let groups = n32.div_ceil(WG).max(1);
    let max = max_per_dim.clamp(1, gpu.limits.max_compute_workgroups_per_dimension);
    let y = groups.div_ceil(max);
    gpu.dispatch(DispatchDesc {
        kernel: ADAMW.with([&params_f16.map(|c| c.dtype)]),
        bindings: &bindings,
        workgroups: [groups.div_ceil(y), y, 1],
        label: OP.to_string(),
    })
}

/// The loss scaler and Adam's step count as the GPU keeps them between steps (a u32 tensor of
/// [`StepState::LEN`] elements; the first four hold f32 bits). [`advance_step_state`] updates it
/// at the end of every step.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StepState {
    pub scale: f32,
    /// `1 / scale`, correctly rounded.
    pub inv_scale: f32,
    /// What the cross-entropy backward starts from: `scale / tokens`, correctly rounded.
    pub dloss: f32,
    /// `1 / tokens`, correctly rounded (tokens: per optimiser step).
    pub inv_tokens: f32,
    pub clean_steps: u32,
    /// Optimiser steps taken; skipped steps do not count.
    pub adam_t: u32,
    /// 1 when the last step was skipped (non-finite gradients).
    pub skipped: u32,
    /// Steps run, skipped ones included.
    pub steps: u32,
}

impl StepState {
    pub const LEN: usize = 8;

    /// The state before a step, computed on the CPU (at the start of a run, on resume, or when
    /// the scale is set by hand).
    pub fn new(scale: f32, clean_steps: usize, adam_t: usize, steps: usize, tokens: usize) -> Self {
        let n = tokens as f32;
        StepState {
            scale,
            inv_scale: 1.0 / scale,
            dloss: scale / n,
            inv_tokens: 1.0 / n,
            clean_steps: clean_steps as u32,
            adam_t: adam_t as u32,
            skipped: 0,
            steps: steps as u32,
        }
    }

    pub fn write(&self, gpu: &Gpu, t: &Tensor) -> Result<()> {
        check_state(gpu, t)?;
        gpu.write_bytes(t, bytemuck::bytes_of(self))
    }

    /// Decodes the state from its tensor's bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let size = std::mem::size_of::<Self>();
        if bytes.len() < size {
            return Err(Error::Gpu(format!(
                "step state: {} bytes read back, {size} expected",
                bytes.len()
            )));
        }
        Ok(bytemuck::pod_read_unaligned(&bytes[..size]))
    }
}

/// Checks `t` can hold a [`StepState`].
fn check_state(gpu: &Gpu, t: &Tensor) -> Result<()> {
    Check::new(gpu, "advance_step_state")
        .arg("state", t)
        .u32()?
        .len(StepState::LEN)?;
    Ok(())
}

/// Adam's bias corrections `(1 - beta1^t, 1 - beta2^t)` for the 1-based step `t`, computed in
/// f64 from the f64 betas and rounded to f32.
pub fn bias_corrections(beta1: f64, beta2: f64, t: u32) -> (f32, f32) {
    let t = t.min(i32::MAX as u32) as i32;
    ((1.0 - beta1.powi(t)) as f32, (1.0 - beta2.powi(t)) as f32)
}

/// [`bias_corrections`] for t = 1, 2, ..., flat in pairs, up to the first t from which both
/// round to 1.0 (for 0.9 / 0.95: 337 steps); [`advance_step_state`] uses 1.0 beyond.
pub fn bias_correction_table(beta1: f64, beta2: f64) -> Vec<f32> {
    let mut table = Vec::new();
    for t in 1..=100_000u32 {
        let (c1, c2) = bias_corrections(beta1, beta2, t);
        if c1 == 1.0 && c2 == 1.0 {
            break;
        }
        table.extend([c1, c2]);
    }
    table
}

/// The arguments of [`advance_step_state`].
#[derive(Clone, Copy)]
pub struct AdvanceStepState<'a> {
    pub state: &'a Tensor,
    pub status: &'a Tensor,
    pub table: &'a Tensor,
    pub dloss: &'a Tensor,
    pub norm_scalars: &'a Tensor,
    pub hyper: &'a Tensor,
    pub growth_interval: usize,
    pub scaling: bool,
}

/// The last node of a training step: advances the loss scaler and Adam's step count in `state`
/// from the step's finiteness flag (`status[2]`, from [`grad_norm`]) as [`LossScaler`] rules
/// (skip and halve on non-finite gradients; with `scaling`, double every `growth_interval` clean
/// steps), then writes what the next step reads: `dloss[0]`, the norm's `inv_loss_scale`
/// (`norm_scalars[0]`) and AdamW's bias corrections and `inv_loss_scale` (`hyper[5..8]`, from
/// `table` = [`bias_correction_table`]). AdamW's `lr` is left for the CPU to write.
///
/// [`LossScaler`]: crate::reference::scaler::LossScaler
pub fn advance_step_state(gpu: &Gpu, args: &AdvanceStepState<'_>) -> Result<Dispatch> {
    const OP: &str = "advance_step_state";
    let &AdvanceStepState {
        state,
        status,
        table,
        dloss,
        norm_scalars,
        hyper,
        growth_interval,
        scaling,
    } = args;
    let check = Check::new(gpu, OP);
    check_state(gpu, state)?;
    check.arg("status", status).f32()?.len(STATUS_LEN)?;
    check.arg("table", table).f32()?;
    if !table.len().is_multiple_of(2) {
        return Err(check.error("the bias-correction table holds pairs"));
    }
    check.arg("dloss", dloss).f32()?.len(1)?;
    check
        .arg("norm_scalars", norm_scalars)
        .f32()?
        .len(GradNormScalars::LEN)?;
    check.arg("hyper", hyper).f32()?.len(AdamWHyper::LEN)?;
    let uniform = gpu.uniform(&StateParams {
        growth_interval: check.fits_u32("growth interval", growth_interval.max(1))?,
        scaling: scaling as u32,
        table_len: (table.len() / 2) as u32,
        _pad: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: STEP_STATE.with([]),
        bindings: &[
            Bind::Uniform(&uniform),
            Bind::Read(status),
            Bind::Write(state),
            Bind::Read(table),
            Bind::Write(dloss),
            Bind::Write(norm_scalars),
            Bind::Write(hyper),
        ],
        workgroups: [1, 1, 1],
        label: OP.to_string(),
    })
}

pub(crate) fn shader_variants() -> Vec<Specialisation> {
    let mut v = NORM_PARTIALS.variants();
    v.extend(NORM_FINISH.variants());
    v.extend(ADAMW.variants());
    v.extend(STEP_STATE.variants());
    v
}
