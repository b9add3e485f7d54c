//! One typed launcher per kernel: check shapes and dtypes (returning an error, never panicking),
//! look the pipeline up in the cache, make the bind group, size the grid. A launcher returns a
//! [`Dispatch`](crate::gpu::Dispatch) that the caller records once and may replay every step.

pub mod attention;
pub mod crossentropy;
pub mod elementwise;
pub mod embedding;
pub mod layernorm;
pub mod matmul;
pub mod optimizer;
pub mod sample;

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};

/// Checks `t` holds floats the adapter can read (f16 needs SHADER_F16).
pub(crate) fn check_float(gpu: &Gpu, op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    match t.dtype {
        DType::F32 => Ok(()),
        DType::F16 if gpu.has_f16() => Ok(()),
        DType::F16 => Err(Error::shape(
            op,
            format!(
                "{what} is f16 but the adapter '{}' has no SHADER_F16; use f32",
                gpu.info.name
            ),
        )),
        DType::U32 => Err(Error::shape(
            op,
            format!("{what} is u32, expected f32 or f16"),
        )),
    }
}

/// Whether the row-reduction kernels (LayerNorm statistics and backward row sums, the
/// cross-entropy row max / sum of exponentials and loss mean, the gradient norm's partial sums)
/// use their subgroup variant on `gpu` (define `SUBGROUPS`): wherever the SUBGROUP feature is
/// enabled. Those variants are right for any subgroup size, including partly filled subgroups;
/// the fixed-shape trees in workgroup memory are the fallback. Both are bitwise reproducible on
/// a given adapter, but they add in different orders, so their results differ in the last bits.
pub fn uses_subgroup_reductions(gpu: &Gpu) -> bool {
    gpu.has_subgroups()
}

/// The values of the `SUBGROUPS` define, for `shader_variants` of the kernels that take it.
pub(crate) const SUBGROUPS_AXIS: (&str, &[&str]) = ("SUBGROUPS", &["false", "true"]);

/// Checks `t` is f32.
pub(crate) fn check_f32(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    t.expect_dtype(op, what, &[DType::F32])
}

/// Checks `t` holds token ids.
pub(crate) fn check_u32(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    t.expect_dtype(op, what, &[DType::U32])
}

/// Checks that a count fits the u32 indices the shaders use.
pub(crate) fn check_u32_range(op: &'static str, what: &str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::shape(op, format!("{what} = {n} does not fit in 32 bits")))
}

/// A uniform block of four u32 (the most common shape parameter layout).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params4 {
    pub a: u32,
    pub b: u32,
    pub c: u32,
    pub d: u32,
}

/// One specialisation of a shader file that some launcher uses.
pub struct ShaderVariant {
    pub shader: &'static str,
    pub defines: Vec<(String, String)>,
}

/// Every shader specialisation the launchers can ask for (for the naga validation test, so a
/// shader error fails fast with its file and line rather than when a model first runs).
pub fn shader_variants() -> Vec<ShaderVariant> {
    let mut v = Vec::new();
    v.extend(elementwise::shader_variants());
    v.extend(matmul::shader_variants());
    v.extend(layernorm::shader_variants());
    v.extend(attention::shader_variants());
    v.extend(crossentropy::shader_variants());
    v.extend(embedding::shader_variants());
    v.extend(optimizer::shader_variants());
    v.extend(sample::shader_variants());
    v
}

/// All combinations of the given define values, for `shader_variants`.
pub(crate) fn combinations(shader: &'static str, axes: &[(&str, &[&str])]) -> Vec<ShaderVariant> {
    let mut out: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for (name, values) in axes {
        out = out
            .into_iter()
            .flat_map(|d| {
                values.iter().map(move |v| {
                    let mut d = d.clone();
                    d.push((name.to_string(), v.to_string()));
                    d
                })
            })
            .collect();
    }
    out.into_iter()
        .map(|defines| ShaderVariant { shader, defines })
        .collect()
}
