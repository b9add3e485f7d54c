//! Launchers for `shaders/layernorm.wgsl`: LayerNorm (eps 1e-5) forward, the fused residual add +
//! LayerNorm forward, and the backward pass (two stages: rows, then a deterministic reduction of
//! the parameter gradients).
//!
//! Activations are any shape whose last dimension is C (so `[B, T, C]` and `[B*T, C]` both work);
//! N is the number of rows. `weight`, `bias`, `mean`, `rstd` and all gradients are f32.

use super::{uses_subgroup_reductions, Check, FLOATS, SUBGROUPS};
use crate::error::Result;
use crate::gpu::{Axis, Bind, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};

/// Rows each workgroup of the backward pass handles (and sums parameter gradients over).
/// 16 gives 1024 workgroups for GPT-2's 16384 rows: enough to fill a large GPU while keeping
/// the scratch small (6 MiB at C = 768).
pub const BACKWARD_ROWS_PER_GROUP: usize = 16;

/// Stage 2 of the backward pass: columns per workgroup (the shader's LP_COLS).
const PARAMS_COLS: u32 = 32;

const SHADER: &str = "layernorm";

/// Values: the input's, the output's storage type, [`uses_subgroup_reductions`].
const FORWARD: Kernel<3> = Kernel {
    shader: SHADER,
    entry: "layernorm_forward",
    fixed: &[("FORWARD", "1")],
    axes: [
        Axis::new("IN_T", FLOATS),
        Axis::new("OUT_T", FLOATS),
        SUBGROUPS,
    ],
};

/// Values: the storage types of `a`, `b` and the output, [`uses_subgroup_reductions`].
const FUSED_FORWARD: Kernel<4> = Kernel {
    shader: SHADER,
    entry: "fused_residual_layernorm_forward",
    fixed: &[("FUSED", "1")],
    axes: [
        Axis::new("IN_T", FLOATS),
        Axis::new("B_T", FLOATS),
        Axis::new("OUT_T", FLOATS),
        SUBGROUPS,
    ],
};

/// Values: the storage types of the input and of dout, [`uses_subgroup_reductions`]. ROWS is
/// [`BACKWARD_ROWS_PER_GROUP`].
const BACKWARD: Kernel<3> = Kernel {
    shader: SHADER,
    entry: "layernorm_backward",
    fixed: &[("BACKWARD", "1"), ("ROWS", "16")],
    axes: [
        Axis::new("IN_T", FLOATS),
        Axis::new("DOUT_T", FLOATS),
        SUBGROUPS,
    ],
};
const _: () = assert!(BACKWARD_ROWS_PER_GROUP == 16, "BACKWARD's ROWS define");

const BACKWARD_PARAMS: Kernel<0> = Kernel {
    shader: SHADER,
    entry: "layernorm_backward_params",
    fixed: &[("BACKWARD_PARAMS", "1")],
    axes: [],
};

/// Uniform block `Params` of `shaders/layernorm.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    /// Rows.
    n: u32,
    /// Channels.
    c: u32,
    /// The backward pass: workgroups of its first stage, each one partial row of scratch.
    groups: u32,
    _pad: u32,
}

fn backward_groups(n: usize) -> usize {
    n.div_ceil(BACKWARD_ROWS_PER_GROUP).max(1)
}

/// Length (f32 elements) of the scratch tensor `layernorm_backward` needs for `n` rows of `c`
/// channels: one partial dweight and dbias row per group of [`BACKWARD_ROWS_PER_GROUP`] rows.
pub fn layernorm_backward_scratch_len(n: usize, c: usize) -> usize {
    backward_groups(n) * 2 * c
}

/// `out = (inp - mean) / sqrt(var + 1e-5) * weight + bias` per row, with the row statistics
/// saved for the backward pass.
///
/// - `out`: `[N, C]` f32 | f16, overwritten.
/// - `mean`, `rstd`: `[N]` f32, overwritten (rstd = 1 / sqrt(var + eps), biased variance).
/// - `inp`: `[N, C]` f32 | f16. `weight`, `bias`: `[C]` f32.
pub fn layernorm_forward(
    gpu: &Gpu,
    out: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Dispatch> {
    const OP: &str = "layernorm_forward";
    let check = Check::new(gpu, OP);
    let c = check.arg("weight", weight).f32()?.vector()?;
    check.arg("bias", bias).f32()?.len(c)?;
    let n = check.arg("inp", inp).float()?.rows(c)?;
    check.arg("out", out).float()?.rows_of(n, c)?;
    check.arg("mean", mean).f32()?.len(n)?;
    check.arg("rstd", rstd).f32()?.len(n)?;
    check.fits_u32("N * C", n * c)?;
    let params = gpu.uniform(&Params {
        n: n as u32,
        c: c as u32,
        groups: 0,
        _pad: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: FORWARD.with([&inp.dtype, &out.dtype, &uses_subgroup_reductions(gpu)]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(inp),
            Bind::Read(weight),
            Bind::Read(bias),
            Bind::Write(out),
            Bind::Write(mean),
            Bind::Write(rstd),
        ],
        workgroups: gpu.grid(n as u32),
        label: OP.to_string(),
    })
}

/// The tensors of [`fused_residual_layernorm_forward`].
#[derive(Clone, Copy)]
pub struct FusedResidualLayerNorm<'a> {
    pub residual_out: &'a Tensor,
    pub out: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
}

/// `residual_out = a + b`, then LayerNorm of it, in one pass (the residual stream between blocks).
///
/// - `residual_out`: `[N, C]` f32, overwritten (the sum, kept in f32).
/// - `out`: `[N, C]` f32 | f16, overwritten. `mean`, `rstd`: `[N]` f32, overwritten.
/// - `a`, `b`: `[N, C]` f32 | f16 each. `weight`, `bias`: `[C]` f32.
pub fn fused_residual_layernorm_forward(
    gpu: &Gpu,
    args: &FusedResidualLayerNorm<'_>,
) -> Result<Dispatch> {
    const OP: &str = "fused_residual_layernorm_forward";
    let &FusedResidualLayerNorm {
        residual_out,
        out,
        mean,
        rstd,
        a,
        b,
        weight,
        bias,
    } = args;
    let check = Check::new(gpu, OP);
    let c = check.arg("weight", weight).f32()?.vector()?;
    check.arg("bias", bias).f32()?.len(c)?;
    let n = check.arg("a", a).float()?.rows(c)?;
    check.arg("b", b).float()?.rows_of(n, c)?;
    check.arg("out", out).float()?.rows_of(n, c)?;
    check
        .arg("residual_out", residual_out)
        .f32()?
        .rows_of(n, c)?;
    check.arg("mean", mean).f32()?.len(n)?;
    check.arg("rstd", rstd).f32()?.len(n)?;
    check.fits_u32("N * C", n * c)?;
    let params = gpu.uniform(&Params {
        n: n as u32,
        c: c as u32,
        groups: 0,
        _pad: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: FUSED_FORWARD.with([
            &a.dtype,
            &b.dtype,
            &out.dtype,
            &uses_subgroup_reductions(gpu),
        ]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(a),
            Bind::Read(b),
            Bind::Read(weight),
            Bind::Read(bias),
            Bind::Write(residual_out),
            Bind::Write(out),
            Bind::Write(mean),
            Bind::Write(rstd),
        ],
        workgroups: gpu.grid(n as u32),
        label: OP.to_string(),
    })
}

/// The tensors of [`layernorm_backward`].
#[derive(Clone, Copy)]
pub struct LayerNormBackward<'a> {
    pub dinp: &'a Tensor,
    pub dweight: &'a Tensor,
    pub dbias: &'a Tensor,
    pub scratch: &'a Tensor,
    pub dout: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
}

/// LayerNorm backward. Returns two dispatches to run in order.
///
/// - `dinp`: `[N, C]` f32, ACCUMULATED (`+=`: it is the residual stream's gradient).
/// - `dweight`, `dbias`: `[C]` f32, ACCUMULATED (the caller clears them once per optimiser step).
/// - `scratch`: f32 with at least [`layernorm_backward_scratch_len`]`(N, C)` elements; holds
///   per-chunk partial sums between the two dispatches (contents on entry do not matter).
/// - `dout`: `[N, C]` f32 | f16. `inp`: `[N, C]` f32 | f16 (the forward input).
/// - `weight`: `[C]` f32. `mean`, `rstd`: `[N]` f32 from the forward pass.
///
/// Parameter gradients are summed over rows in a fixed order (per chunk of
/// [`BACKWARD_ROWS_PER_GROUP`] rows, then over chunks): bitwise reproducible.
pub fn layernorm_backward(gpu: &Gpu, args: &LayerNormBackward<'_>) -> Result<Vec<Dispatch>> {
    const OP: &str = "layernorm_backward";
    let &LayerNormBackward {
        dinp,
        dweight,
        dbias,
        scratch,
        dout,
        inp,
        weight,
        mean,
        rstd,
    } = args;
    let check = Check::new(gpu, OP);
    let c = check.arg("weight", weight).f32()?.vector()?;
    let n = check.arg("inp", inp).float()?.rows(c)?;
    check.arg("dout", dout).float()?.rows_of(n, c)?;
    check.arg("dinp", dinp).f32()?.rows_of(n, c)?;
    check.arg("dweight", dweight).f32()?.len(c)?;
    check.arg("dbias", dbias).f32()?.len(c)?;
    check.arg("mean", mean).f32()?.len(n)?;
    check.arg("rstd", rstd).f32()?.len(n)?;
    let need = layernorm_backward_scratch_len(n, c);
    check
        .arg("scratch", scratch)
        .f32()?
        .at_least(need, "layernorm_backward_scratch_len")?;
    check.fits_u32("scratch length", need)?;
    check.fits_u32("N * C", n * c)?;
    let groups = backward_groups(n) as u32;
    let params = gpu.uniform(&Params {
        n: n as u32,
        c: c as u32,
        groups,
        _pad: 0,
    });
    let rows_stage = gpu.dispatch(DispatchDesc {
        kernel: BACKWARD.with([&inp.dtype, &dout.dtype, &uses_subgroup_reductions(gpu)]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(dout),
            Bind::Read(inp),
            Bind::Read(weight),
            Bind::Read(mean),
            Bind::Read(rstd),
            Bind::Write(dinp),
            Bind::Write(scratch),
        ],
        workgroups: gpu.grid(groups),
        label: OP.to_string(),
    })?;
    let params_stage = gpu.dispatch(DispatchDesc {
        kernel: BACKWARD_PARAMS.with([]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(scratch),
            Bind::Write(dweight),
            Bind::Write(dbias),
        ],
        workgroups: gpu.grid((2 * c as u32).div_ceil(PARAMS_COLS)),
        label: format!("{OP}.params"),
    })?;
    Ok(vec![rows_stage, params_stage])
}

pub(crate) fn shader_variants() -> Vec<Specialisation> {
    let mut v = FORWARD.variants();
    v.extend(FUSED_FORWARD.variants());
    v.extend(BACKWARD.variants());
    v.extend(BACKWARD_PARAMS.variants());
    v
}
