//! The bias gradient `matmul_backward_bias`: column sums of dout in two deterministic stages
//! (the `COLUMN_SUM` entry points of shaders/matmul.wgsl).

use super::{check_no_alias, rows_of, FAMILY, SHADER};
use crate::defines;
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Dispatch, DispatchDesc, Gpu, Tensor};
use crate::ops::{check_f32, check_float, check_u32_range};

/// Rows summed by one workgroup of the first bias-gradient stage (CHUNK_ROWS in the shader).
const BIAS_CHUNK_ROWS: usize = 128;
/// Columns per workgroup of the first stage (SUM_COLS in the shader).
const BIAS_BLOCK_COLS: usize = 64;
/// Threads per workgroup of the second stage.
const BIAS_FINISH_THREADS: usize = 64;

/// Elements of the f32 scratch tensor [`matmul_backward_bias`] needs for dout (M, N):
/// `ceil(M / 128) * N`, one partial sum per column for every chunk of 128 rows.
pub fn matmul_backward_bias_scratch_len(m: usize, n: usize) -> usize {
    m.div_ceil(BIAS_CHUNK_ROWS) * n
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ColumnSumParams {
    rows: u32,
    cols: u32,
    col_blocks: u32,
    chunks: u32,
}

/// `dbias (=|+=) sum over rows of dout`, deterministic, in two dispatches (run them in order):
/// partial sums of 128-row chunks into `scratch`, then each column's partials added in order.
///
/// dbias: (N) f32, dout: (M, N) f32 or f16 with leading dimensions flattened, scratch: f32 with
/// at least [`matmul_backward_bias_scratch_len`]`(M, N)` elements (its contents are overwritten).
pub fn matmul_backward_bias(
    gpu: &Gpu,
    dbias: &Tensor,
    dout: &Tensor,
    scratch: &Tensor,
    accumulate: bool,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "matmul_backward_bias";
    check_f32(OP, "dbias", dbias)?;
    check_float(gpu, OP, "dout", dout)?;
    check_f32(OP, "scratch", scratch)?;
    let n = dbias.len();
    if n == 0 {
        return Err(Error::shape(OP, "dbias is empty"));
    }
    let m = rows_of(OP, "dout", dout, n)?;
    let need = matmul_backward_bias_scratch_len(m, n);
    if scratch.len() < need {
        return Err(Error::shape(
            OP,
            format!(
                "scratch has {} elements, needs matmul_backward_bias_scratch_len({m}, {n}) = {need}",
                scratch.len()
            ),
        ));
    }
    check_no_alias(
        OP,
        &[("dbias", dbias)],
        &[("dout", dout), ("scratch", scratch)],
    )?;
    check_no_alias(OP, &[("scratch", scratch)], &[("dout", dout)])?;
    check_u32_range(OP, "dout elements", m * n)?;
    check_u32_range(OP, "scratch elements", need)?;
    let chunks = m.div_ceil(BIAS_CHUNK_ROWS);
    let col_blocks = n.div_ceil(BIAS_BLOCK_COLS);
    let params = gpu.uniform(
        OP,
        &ColumnSumParams {
            rows: m as u32,
            cols: n as u32,
            col_blocks: col_blocks as u32,
            chunks: chunks as u32,
        },
    );
    let partial_groups = check_u32_range(OP, "workgroups", chunks * col_blocks)?;
    let partial = gpu.dispatch(DispatchDesc {
        shader: SHADER,
        entry: "column_sum_partial",
        defines: column_sum_defines(dout.dtype, false),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(dout),
            Bind::Write(scratch),
        ],
        workgroups: gpu.grid(partial_groups),
        label: format!("{OP}.partial"),
        family: FAMILY,
    })?;
    let finish = gpu.dispatch(DispatchDesc {
        shader: SHADER,
        entry: "column_sum_finish",
        defines: column_sum_defines(DType::F32, accumulate),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(scratch),
            Bind::Write(dbias),
        ],
        workgroups: gpu.grid(n.div_ceil(BIAS_FINISH_THREADS) as u32),
        label: format!("{OP}.finish"),
        family: FAMILY,
    })?;
    Ok(vec![partial, finish])
}

fn column_sum_defines(dout: DType, accumulate: bool) -> Vec<(String, String)> {
    defines![
        ("COLUMN_SUM", "1"),
        ("DOUT_T", dout.wgsl()),
        ("ACCUMULATE", if accumulate { "1" } else { "0" }),
    ]
}

/// The column-sum specialisations: each dout dtype, with and without accumulation.
pub(super) fn shader_variants() -> Vec<crate::ops::ShaderVariant> {
    let floats = [DType::F32, DType::F16];
    let mut out = Vec::new();
    for dout in floats {
        for accumulate in [false, true] {
            out.push(crate::ops::ShaderVariant {
                shader: SHADER,
                defines: column_sum_defines(dout, accumulate),
            });
        }
    }
    out
}
