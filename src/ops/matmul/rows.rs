//! The few-rows kernel `matmul_rows` (shaders/matmul_rows.wgsl): forward products of decoding.

use super::{epilogue_defines, flag, Product, ROWS_SHADER};
use crate::defines;
use crate::gpu::DType;

/// Most rows `matmul_rows` takes (MAX_ROWS in the shader): the forward products of decoding up
/// to this many samples at once.
pub const ROWS_MAX: usize = 8;
/// Output columns per workgroup of `matmul_rows` (COLS in the shader).
pub(super) const ROWS_COLS: usize = 32;

/// Whether `matmul_rows` computes a product: a forward product (A as is, B transposed) with at
/// most [`ROWS_MAX`] rows.
pub(super) fn rows_kernel_fits(prod: &Product<'_>) -> bool {
    prod.rows <= ROWS_MAX && !prod.a_trans && prod.b_trans
}

/// Define-level description of one `matmul_rows` specialisation (A as is, B transposed).
pub(super) struct RowsVariant {
    pub(super) a_dtype: DType,
    pub(super) b_dtype: DType,
    pub(super) c_dtype: DType,
    pub(super) bias_dtype: Option<DType>,
    pub(super) gelu: Option<(DType, bool)>,
    pub(super) accumulate: bool,
}

impl RowsVariant {
    pub(super) fn defines(&self) -> Vec<(String, String)> {
        let mut d = defines![
            ("A_T", self.a_dtype.wgsl()),
            ("B_T", self.b_dtype.wgsl()),
            ("C_T", self.c_dtype.wgsl()),
            ("A_TRANS", "0"),
            ("B_TRANS", "1"),
            ("ACCUMULATE", flag(self.accumulate)),
        ];
        d.extend(epilogue_defines(self.bias_dtype, self.gelu));
        d
    }
}

/// Every `matmul_rows` specialisation: every dtype, accumulation, bias and GELU combination of a
/// forward product.
pub(super) fn shader_variants() -> Vec<crate::ops::ShaderVariant> {
    let floats = [DType::F32, DType::F16];
    let mut out = Vec::new();
    for a_dtype in floats {
        for b_dtype in floats {
            for c_dtype in floats {
                for accumulate in [false, true] {
                    for bias_dtype in [None, Some(DType::F32), Some(DType::F16)] {
                        for gelu in [None, Some((DType::F32, true)), Some((DType::F16, true))] {
                            let v = RowsVariant {
                                a_dtype,
                                b_dtype,
                                c_dtype,
                                bias_dtype,
                                gelu,
                                accumulate,
                            };
                            out.push(crate::ops::ShaderVariant {
                                shader: ROWS_SHADER,
                                defines: v.defines(),
                            });
                        }
                    }
                }
            }
        }
    }
    out
}
