//! Launchers for `shaders/elementwise.wgsl`: GELU forward/backward, residual add, casts.

use super::{Check, FLOATS};
use crate::error::Result;
use crate::gpu::{Axis, Bind, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};

const WG: u32 = 256;

/// The file's defines, the same for every entry point (one module): the storage types of the
/// first input, of the second (f32 where there is none) and of the output.
const AXES: [Axis; 3] = [
    Axis::new("IN_T", FLOATS),
    Axis::new("GRAD_T", FLOATS),
    Axis::new("OUT_T", FLOATS),
];

/// Uniform block `Params` of `shaders/elementwise.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    /// Elements.
    n: u32,
    /// What `fill` writes.
    value: f32,
    _pad0: u32,
    _pad1: u32,
}

const fn kernel(entry: &'static str) -> Kernel<3> {
    Kernel {
        shader: "elementwise",
        entry,
        fixed: &[],
        axes: AXES,
    }
}

const GELU_FORWARD: Kernel<3> = kernel("gelu_forward");
const GELU_BACKWARD: Kernel<3> = kernel("gelu_backward");
const RESIDUAL_FORWARD: Kernel<3> = kernel("residual_forward");
const CAST: Kernel<3> = kernel("cast_dtype");
const FILL: Kernel<3> = kernel("fill");

fn flat(
    gpu: &Gpu,
    op: &'static str,
    kernel: &Kernel<3>,
    inputs: &[(&str, &Tensor)],
    out: &Tensor,
) -> Result<Dispatch> {
    let check = Check::new(gpu, op);
    let n = out.len();
    for (what, t) in inputs {
        check.arg(what, t).float()?.len(n)?;
    }
    check.arg("output", out).float()?;
    let n32 = check.fits_u32("element count", n)?;
    let in_t = inputs[0].1.dtype.wgsl();
    let grad_t = inputs.get(1).map(|(_, t)| t.dtype.wgsl()).unwrap_or("f32");
    let params = gpu.uniform(&Params {
        n: n32,
        value: 0.0,
        _pad0: 0,
        _pad1: 0,
    });
    let mut bindings = vec![Bind::Uniform(&params)];
    bindings.extend(inputs.iter().map(|(_, t)| Bind::Read(t)));
    bindings.push(Bind::Write(out));
    gpu.dispatch(DispatchDesc {
        kernel: kernel.with([&in_t, &grad_t, &out.dtype]),
        bindings: &bindings,
        workgroups: gpu.grid(n32.div_ceil(WG)),
        label: op.to_string(),
    })
}

/// `out = gelu(inp)`, tanh approximation. Any shape; `out` has as many elements as `inp`.
pub fn gelu_forward(gpu: &Gpu, out: &Tensor, inp: &Tensor) -> Result<Dispatch> {
    flat(gpu, "gelu_forward", &GELU_FORWARD, &[("inp", inp)], out)
}

/// `dinp = gelu'(inp) * dout`. (In place is not possible: wgpu forbids binding one buffer
/// both read-only and writable in a dispatch.)
pub fn gelu_backward(gpu: &Gpu, dinp: &Tensor, inp: &Tensor, dout: &Tensor) -> Result<Dispatch> {
    flat(
        gpu,
        "gelu_backward",
        &GELU_BACKWARD,
        &[("inp", inp), ("dout", dout)],
        dinp,
    )
}

/// `out = a + b`.
pub fn residual_forward(gpu: &Gpu, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<Dispatch> {
    flat(
        gpu,
        "residual_forward",
        &RESIDUAL_FORWARD,
        &[("a", a), ("b", b)],
        out,
    )
}

/// `out = inp` converted to `out`'s dtype (f32 <-> f16).
pub fn cast(gpu: &Gpu, out: &Tensor, inp: &Tensor) -> Result<Dispatch> {
    flat(gpu, "cast", &CAST, &[("inp", inp)], out)
}

/// `out[i] = value` for every element (zeroing an accumulator, for instance).
pub fn fill(gpu: &Gpu, out: &Tensor, value: f32) -> Result<Dispatch> {
    let check = Check::new(gpu, "fill");
    check.arg("output", out).float()?;
    let n32 = check.fits_u32("element count", out.len())?;
    let params = gpu.uniform(&Params {
        n: n32,
        value,
        _pad0: 0,
        _pad1: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: FILL.with([&"f32", &"f32", &out.dtype]),
        bindings: &[Bind::Uniform(&params), Bind::Write(out)],
        workgroups: gpu.grid(n32.div_ceil(WG)),
        label: "fill".to_string(),
    })
}

pub(crate) fn shader_variants() -> Vec<Specialisation> {
    [GELU_FORWARD, GELU_BACKWARD, RESIDUAL_FORWARD, CAST, FILL]
        .iter()
        .flat_map(|k| k.variants())
        .collect()
}
