//! Launchers for `shaders/crossentropy.wgsl`: fused softmax + cross-entropy (forward and,
//! optionally, the logits' gradient written in place) and the mean of the per-row losses.

use super::{uses_subgroup_reductions, Check, FLOATS, SUBGROUPS};
use crate::error::{Error, Result};
use crate::gpu::{Axis, Bind, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};

/// Values: the logits' storage type, whether dlogits are written, [`uses_subgroup_reductions`].
const FORWARD_BACKWARD: Kernel<3> = Kernel {
    shader: "crossentropy",
    entry: "crossentropy_forward_backward",
    fixed: &[("FORWARD_BACKWARD", "1")],
    axes: [
        Axis::new("LOGIT_T", FLOATS),
        Axis::new("BACKWARD", &["true", "false"]),
        SUBGROUPS,
    ],
};

/// Value: [`uses_subgroup_reductions`].
const LOSS_MEAN: Kernel<1> = Kernel {
    shader: "crossentropy",
    entry: "loss_mean",
    fixed: &[("LOSS_MEAN", "1")],
    axes: [SUBGROUPS],
};

/// Uniform block `Params` of `shaders/crossentropy.wgsl`'s forward and backward.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    /// Rows.
    n: u32,
    /// Columns per row (the padded vocabulary).
    vp: u32,
    /// The real vocabulary: columns from `v` on are masked out.
    v: u32,
    _pad: u32,
}

/// Per-row losses and (with `backward`) the logits' gradient, in one pass over each row.
///
/// - `losses`: `[N]` f32, overwritten: `logsumexp(logits[i, :v]) - logits[i, targets[i]]`.
/// - `logits`: `[N, Vp]` (any shape whose last dimension is Vp) f32 | f16, bound writable. With
///   `backward` it is OVERWRITTEN in place by dlogits: `(softmax_j - [j == target]) * dloss[0]`
///   for `j < v`, exactly 0 for the padded columns `j >= v`. Without it, it is left unchanged.
/// - `targets`: `[N]` u32. An id `>= v` cannot be checked here (it lives on the GPU); the shader
///   clamps it to `v - 1` so nothing is read out of bounds (see [`check_targets`] for the CPU).
/// - `dloss`: `[1]` f32, read on the GPU each run (e.g. loss_scale / (B*T*grad_accum)).
/// - `v`: the real vocabulary, `1 <= v <= Vp`.
pub fn crossentropy_forward_backward(
    gpu: &Gpu,
    losses: &Tensor,
    logits: &Tensor,
    targets: &Tensor,
    dloss: &Tensor,
    v: usize,
    backward: bool,
) -> Result<Dispatch> {
    const OP: &str = "crossentropy_forward_backward";
    let check = Check::new(gpu, OP);
    check.arg("logits", logits).float()?;
    let vp = *logits.shape.last().unwrap_or(&0);
    if vp == 0 {
        return Err(check.error(format!(
            "logits has shape {:?}, expected [N, Vp] with Vp > 0",
            logits.shape
        )));
    }
    if v == 0 || v > vp {
        return Err(check.error(format!(
            "vocabulary v = {v} must be in 1..={vp} (the logits' last dimension)"
        )));
    }
    let n = logits.len() / vp;
    check.arg("losses", losses).f32()?.len(n)?;
    check.arg("targets", targets).u32()?.len(n)?;
    check.arg("dloss", dloss).f32()?.len(1)?;
    check.fits_u32("N * Vp", logits.len())?;
    let params = gpu.uniform(&Params {
        n: n as u32,
        vp: vp as u32,
        v: v as u32,
        _pad: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: FORWARD_BACKWARD.with([&logits.dtype, &backward, &uses_subgroup_reductions(gpu)]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Write(logits),
            Bind::Read(targets),
            Bind::Read(dloss),
            Bind::Write(losses),
        ],
        workgroups: gpu.grid(n as u32),
        label: OP.to_string(),
    })
}

/// Checks on the CPU that every target id is a real token (`< v`); the data loader's guard for
/// what the shader can only clamp.
pub fn check_targets(targets: &[u32], v: usize) -> Result<()> {
    match targets.iter().position(|&t| t as usize >= v) {
        Some(i) => Err(Error::shape(
            "crossentropy_forward_backward",
            format!(
                "target {} at position {i} is outside the vocabulary of {v}",
                targets[i]
            ),
        )),
        None => Ok(()),
    }
}

/// Uniform block `MeanParams` of `shaders/crossentropy.wgsl`'s loss mean.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct MeanParams {
    n: u32,
    accumulate: u32,
    scale: f32,
    _pad: u32,
}

/// `out[0] = scale * sum(losses)` (or `+=` with `accumulate`), one workgroup, a fixed summation
/// order. `out`: `[1]` f32; `losses`: `[N]` f32 (any shape). For the mean loss of a step with
/// gradient accumulation, scale = 1 / (N * grad_accum) and accumulate on every micro-step but
/// the first.
pub fn loss_mean(
    gpu: &Gpu,
    out: &Tensor,
    losses: &Tensor,
    scale: f32,
    accumulate: bool,
) -> Result<Dispatch> {
    const OP: &str = "loss_mean";
    let check = Check::new(gpu, OP);
    check.arg("out", out).f32()?.len(1)?;
    check.arg("losses", losses).f32()?;
    let n = check.fits_u32("N", losses.len())?;
    let params = gpu.uniform(&MeanParams {
        n,
        accumulate: accumulate as u32,
        scale,
        _pad: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: LOSS_MEAN.with([&uses_subgroup_reductions(gpu)]),
        bindings: &[Bind::Uniform(&params), Bind::Read(losses), Bind::Write(out)],
        workgroups: [1, 1, 1],
        label: OP.to_string(),
    })
}

pub(crate) fn shader_variants() -> Vec<Specialisation> {
    let mut v = FORWARD_BACKWARD.variants();
    v.extend(LOSS_MEAN.variants());
    v
}
