//! One typed launcher per kernel: check shapes and dtypes (returning an error, never panicking;
//! one set of checks for every op, `check::Check`), look the pipeline up in the cache, make the
//! bind group, size the grid. A launcher returns a [`Dispatch`](crate::gpu::Dispatch) that the
//! caller records once and may replay every step.
//!
//! Each kernel (entry point) is declared once, as a [`Kernel`](crate::gpu::Kernel) constant next
//! to its launcher: the launcher specialises it with the values of its defines, and
//! [`shader_variants`] lists the specialisations the tests validate from the same constant.

pub mod attention;
mod check;
pub mod crossentropy;
pub mod elementwise;
pub mod embedding;
pub mod layernorm;
pub mod matmul;
pub mod optimizer;
pub mod sample;

pub(crate) use check::Check;

use crate::gpu::{Axis, Gpu};

/// Whether the row-reduction kernels (LayerNorm statistics and backward row sums, the
/// cross-entropy row max / sum of exponentials and loss mean, the gradient norm's partial sums)
/// use their subgroup variant on `gpu` (define `SUBGROUPS`): wherever the SUBGROUP feature is
/// enabled. Those variants are right for any subgroup size, including partly filled subgroups;
/// the fixed-shape trees in workgroup memory are the fallback. Both are bitwise reproducible on
/// a given adapter, but they add in different orders, so their results differ in the last bits.
pub fn uses_subgroup_reductions(gpu: &Gpu) -> bool {
    gpu.has_subgroups()
}

/// The define `SUBGROUPS` of the kernels that take it: [`uses_subgroup_reductions`].
pub(crate) const SUBGROUPS: Axis = Axis::new("SUBGROUPS", &["false", "true"]);

/// The storage types of a float tensor, as the values of a define.
pub(crate) const FLOATS: &[&str] = &["f32", "f16"];

/// One specialisation of a shader file that some launcher uses, with the entry points that
/// launchers compile from it.
pub struct ShaderVariant {
    pub shader: &'static str,
    pub entries: Vec<&'static str>,
    pub defines: Vec<(String, String)>,
}

/// Every shader specialisation the launchers can ask for (for the naga validation test, so a
/// shader error fails fast with its file and line rather than when a model first runs): the
/// variants of every kernel, those of one file with equal defines (entry points of one module)
/// merged.
pub fn shader_variants() -> Vec<ShaderVariant> {
    let kernels = [
        elementwise::shader_variants(),
        matmul::shader_variants(),
        layernorm::shader_variants(),
        attention::shader_variants(),
        crossentropy::shader_variants(),
        embedding::shader_variants(),
        optimizer::shader_variants(),
        sample::shader_variants(),
    ];
    let mut out: Vec<ShaderVariant> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for k in kernels.into_iter().flatten() {
        match index.entry((k.shader, k.defines)) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let v: &mut ShaderVariant = &mut out[*e.get()];
                if !v.entries.contains(&k.entry) {
                    v.entries.push(k.entry);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let (shader, defines) = e.key().clone();
                e.insert(out.len());
                out.push(ShaderVariant {
                    shader,
                    entries: vec![k.entry],
                    defines,
                });
            }
        }
    }
    out
}
