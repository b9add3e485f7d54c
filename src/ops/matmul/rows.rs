//! The few-rows kernel `matmul_rows` (shaders/matmul_rows.wgsl): forward products of decoding.

use super::{flag, with_epilogue, EpilogueValues, Product, FLAGS};
use crate::gpu::{Axis, DType, Kernel, Specialisation};
use crate::ops::FLOATS;

/// Most rows `matmul_rows` takes (MAX_ROWS in the shader): the forward products of decoding up
/// to this many samples at once.
pub const ROWS_MAX: usize = 8;
/// Output columns per workgroup of `matmul_rows` (COLS in the shader).
pub(super) const ROWS_COLS: usize = 32;

/// Values from [`RowsVariant::specialise`]: the operands' and the output's storage types,
/// ACCUMULATE, then the epilogue's. A is read as is, B transposed.
const ROWS: Kernel<10> = Kernel {
    shader: "matmul_rows",
    entry: "matmul_rows",
    fixed: &[("A_TRANS", "0"), ("B_TRANS", "1")],
    axes: with_epilogue([
        Axis::new("A_T", FLOATS),
        Axis::new("B_T", FLOATS),
        Axis::new("C_T", FLOATS),
        Axis::new("ACCUMULATE", FLAGS),
    ]),
};

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
    pub(super) fn specialise(&self) -> Specialisation {
        let epilogue = EpilogueValues::new(self.bias_dtype, self.gelu);
        let [e0, e1, e2, e3, e4, e5] = epilogue.values();
        ROWS.with([
            &self.a_dtype,
            &self.b_dtype,
            &self.c_dtype,
            &flag(self.accumulate),
            e0,
            e1,
            e2,
            e3,
            e4,
            e5,
        ])
    }
}

/// Every `matmul_rows` specialisation: every dtype, accumulation, bias and GELU combination of a
/// forward product.
pub(super) fn shader_variants() -> Vec<Specialisation> {
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
                            out.push(v.specialise());
                        }
                    }
                }
            }
        }
    }
    out
}
