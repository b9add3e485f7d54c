//! Launchers for `shaders/layernorm.wgsl`: LayerNorm (eps 1e-5) forward, the fused residual add +
//! LayerNorm forward, and the backward pass (two stages: rows, then a deterministic reduction of
//! the parameter gradients).
//!
//! Activations are any shape whose last dimension is C (so `[B, T, C]` and `[B*T, C]` both work);
//! N is the number of rows. `weight`, `bias`, `mean`, `rstd` and all gradients are f32.

use super::{check_f32, check_float, check_u32_range, uses_subgroup_reductions, FLOATS, SUBGROUPS};
use crate::error::{Error, Result};
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

/// Checks `t` is a float tensor whose last dimension is `c`; returns the number of rows.
fn rows_of(gpu: &Gpu, op: &'static str, what: &str, t: &Tensor, c: usize) -> Result<usize> {
    check_float(gpu, op, what, t)?;
    if t.shape.last() != Some(&c) {
        return Err(Error::shape(
            op,
            format!(
                "{what} has shape {:?}, expected its last dimension to be C = {c}",
                t.shape
            ),
        ));
    }
    Ok(t.len() / c)
}

/// Checks `t` is an f32 tensor of exactly `n` elements.
fn f32_len(op: &'static str, what: &str, t: &Tensor, n: usize) -> Result<()> {
    check_f32(op, what, t)?;
    t.expect_len(op, what, n)
}

/// Checks weight is f32 `[C]` with C > 0; returns C.
fn weight_c(op: &'static str, weight: &Tensor) -> Result<usize> {
    check_f32(op, "weight", weight)?;
    if weight.shape.len() != 1 || weight.is_empty() {
        return Err(Error::shape(
            op,
            format!(
                "weight has shape {:?}, expected [C] with C > 0",
                weight.shape
            ),
        ));
    }
    Ok(weight.len())
}

/// Checks weight and bias are f32 `[C]`; returns C.
fn params_c(op: &'static str, weight: &Tensor, bias: &Tensor) -> Result<usize> {
    let c = weight_c(op, weight)?;
    f32_len(op, "bias", bias, c)?;
    Ok(c)
}

/// Checks `t` has the same number of rows as `inp` (and last dimension C).
fn same_rows(
    gpu: &Gpu,
    op: &'static str,
    what: &str,
    t: &Tensor,
    c: usize,
    n: usize,
) -> Result<()> {
    let rows = rows_of(gpu, op, what, t, c)?;
    if rows != n {
        return Err(Error::shape(
            op,
            format!(
                "{what} has shape {:?} ({rows} rows), expected {n} rows of {c}",
                t.shape
            ),
        ));
    }
    Ok(())
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
    let c = params_c(OP, weight, bias)?;
    let n = rows_of(gpu, OP, "inp", inp, c)?;
    same_rows(gpu, OP, "out", out, c, n)?;
    f32_len(OP, "mean", mean, n)?;
    f32_len(OP, "rstd", rstd, n)?;
    check_u32_range(OP, "N * C", n * c)?;
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

/// `residual_out = a + b`, then LayerNorm of it, in one pass (the residual stream between blocks).
///
/// - `residual_out`: `[N, C]` f32, overwritten (the sum, kept in f32).
/// - `out`: `[N, C]` f32 | f16, overwritten. `mean`, `rstd`: `[N]` f32, overwritten.
/// - `a`, `b`: `[N, C]` f32 | f16 each. `weight`, `bias`: `[C]` f32.
#[allow(clippy::too_many_arguments)]
pub fn fused_residual_layernorm_forward(
    gpu: &Gpu,
    residual_out: &Tensor,
    out: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Dispatch> {
    const OP: &str = "fused_residual_layernorm_forward";
    let c = params_c(OP, weight, bias)?;
    let n = rows_of(gpu, OP, "a", a, c)?;
    same_rows(gpu, OP, "b", b, c, n)?;
    same_rows(gpu, OP, "out", out, c, n)?;
    check_f32(OP, "residual_out", residual_out)?;
    same_rows(gpu, OP, "residual_out", residual_out, c, n)?;
    f32_len(OP, "mean", mean, n)?;
    f32_len(OP, "rstd", rstd, n)?;
    check_u32_range(OP, "N * C", n * c)?;
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
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    gpu: &Gpu,
    dinp: &Tensor,
    dweight: &Tensor,
    dbias: &Tensor,
    scratch: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "layernorm_backward";
    let c = weight_c(OP, weight)?;
    let n = rows_of(gpu, OP, "inp", inp, c)?;
    same_rows(gpu, OP, "dout", dout, c, n)?;
    check_f32(OP, "dinp", dinp)?;
    same_rows(gpu, OP, "dinp", dinp, c, n)?;
    f32_len(OP, "dweight", dweight, c)?;
    f32_len(OP, "dbias", dbias, c)?;
    f32_len(OP, "mean", mean, n)?;
    f32_len(OP, "rstd", rstd, n)?;
    check_f32(OP, "scratch", scratch)?;
    let need = layernorm_backward_scratch_len(n, c);
    if scratch.len() < need {
        return Err(Error::shape(
            OP,
            format!(
                "scratch has {} elements, needs at least {need} (layernorm_backward_scratch_len)",
                scratch.len()
            ),
        ));
    }
    check_u32_range(OP, "scratch length", need)?;
    check_u32_range(OP, "N * C", n * c)?;
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
