//! Launchers for `shaders/matmul.wgsl`: the three products of a Linear layer, the bias gradient
//! summed with the weight gradient, in PyTorch layout (weight (N, K) = (out, in)).
//!
//! Every product is one kernel with its operands read in place (transposed or not), so no
//! launcher copies or transposes anything: the tiled kernel `matmul_tiled` (shaders/matmul.wgsl),
//! or, for f16 operands on adapters with 16x16 f16 cooperative matrices (tensor cores), the
//! cooperative-matrix kernel `matmul_coop` (shaders/matmul_coop.wgsl). Which kernel and tile
//! shape runs is decided in one place, `choose_kernel`; options may force one (tests do).
//!
//! Cooperative matrices are young in wgpu and drivers differ, so `matmul_coop` is only chosen
//! after a self-check has compared it with `matmul_tiled` on this device (once per [`Gpu`], at
//! the first f16 product; see [`coop_matmul_status`]). `WGPT_NO_COOPMAT=1` turns it off.
//!
//! Gradient convention of the executor: parameter gradients are cleared once per optimiser step
//! and every weight and bias gradient is launched with `accumulate = true`. Accumulation is exact:
//! the one thread that owns an output element reads it, adds, and writes it back.
//!
//! Dtypes: inputs f32 or f16 (f16 needs SHADER_F16), each tensor its own; every sum is f32.
//! Outputs f32 or f16. The bias may be f32 or f16 whatever the output is.
//!
//! The folder, by concern: this file has the public launchers, their shape and alias checks and
//! the one `launch` every product goes through; `choice` decides the kernel and tile, `check` is
//! the start-up self-check of the cooperative-matrix kernel, `tiled`, `coop` and `rows` hold
//! each kernel's tiles and specialisations, `split` split-K (the weight gradient, and the tied
//! classifier's input gradient).

mod check;
mod choice;
mod coop;
mod rows;
mod split;
mod tiled;

pub use check::{
    agreement_with_tiled, coop_disabled_by_env, coop_matmul_status, relative_difference,
    self_check_tolerance, SELF_CHECK_F16_TOLERANCE, SELF_CHECK_F32_TOLERANCE,
};
pub(crate) use choice::coop_subgroup_size;
pub use choice::{auto_kernel, best_coop_kernel, best_tiled_kernel};
pub use coop::{CoopTile, COOP_TILES};
pub use rows::ROWS_MAX;
pub use split::{
    backward_weight_choice, matmul_backward_input_scratch_len, matmul_backward_input_split,
    matmul_backward_weight_scratch_len, matmul_backward_weight_split, SPLIT_MAX, SPLIT_MIN_SLICE,
};
pub use tiled::{TileConfig, TILE_CONFIGS};

use super::check::Arg;
use super::{Check, FLOATS};
use crate::error::{Error, Result};
use crate::gpu::{
    Axis, Bind, DType, DefineValue, Dispatch, DispatchDesc, Gpu, Specialisation, Tensor,
};
use choice::{check_kernel, choose_kernel, no_split};
use coop::CoopVariant;
use rows::{RowsVariant, ROWS_COLS};
use tiled::{packets_fit, TiledVariant};

/// `2 * M * K * N`: the floating-point operations of an (M, K) x (K, N) product.
pub fn matmul_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

/// Which kernel computes a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// `matmul_tiled`: workgroup-memory tiles, register blocking, f32 arithmetic.
    Tiled(TileConfig),
    /// `matmul_coop`: f16 operands on 16x16x16 cooperative matrices with f32 sums.
    Coop(CoopTile),
    /// `matmul_coop` with its cooperative-matrix operations replaced by plain-WGSL stand-ins
    /// that follow their SPIR-V definition (each lane of a subgroup sums its share of a fragment
    /// from the staged tiles): runs on any adapter with f16 and subgroups, slowly (on Mesa's
    /// software rasteriser only for inner dimensions up to about 3000, as it ends long loops).
    /// For checking the kernel's staging, fragment offsets, subgroup mapping and epilogue where
    /// there are no tensor cores; never chosen by the launchers.
    CoopEmulated(CoopTile),
    /// `matmul_rows`: forward products with at most [`ROWS_MAX`] rows (decoding a few samples),
    /// each weight element read once for every row instead of a tile's worth of padded rows.
    Rows,
}

impl std::fmt::Display for MatmulKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MatmulKernel::Tiled(t) => write!(f, "tiled {}x{}", t.bm(), t.bn()),
            MatmulKernel::Coop(t) => write!(f, "coop {}x{}", t.bm(), t.bn()),
            MatmulKernel::CoopEmulated(t) => write!(f, "coop-emulated {}x{}", t.bm(), t.bn()),
            MatmulKernel::Rows => write!(f, "rows"),
        }
    }
}

/// Options of [`matmul_forward`].
#[derive(Clone, Copy, Default)]
pub struct MatmulForward<'a> {
    /// (N) added to every row.
    pub bias: Option<&'a Tensor>,
    /// (M, N): when set, the pre-activation `inp @ weight^T + bias` is stored here and `out`
    /// receives `gelu(pre)` (tanh approximation, computed from the value as stored).
    pub gelu_pre: Option<&'a Tensor>,
    /// `out += ...` instead of `out = ...` (`gelu_pre` is always overwritten).
    pub accumulate: bool,
    /// Forces a kernel instead of `choose_kernel`'s choice.
    pub kernel: Option<MatmulKernel>,
    /// Writes columns `start..start + N` of a wider `out` (M, W) in place, W being its last
    /// dimension (e.g. one vocabulary piece of the logits). Not with `gelu_pre`.
    pub out_columns: Option<usize>,
}

/// Options of [`matmul_backward_input`].
#[derive(Clone, Copy, Default)]
pub struct MatmulBackwardInput<'a> {
    /// (M, K): when set, `dinp = (dout @ weight) * gelu'(pre)`, the gradient through this layer
    /// and the GELU that produced its input (`pre` is the GELU's input).
    pub gelu_pre: Option<&'a Tensor>,
    /// `dinp += ...` instead of `dinp = ...`.
    pub accumulate: bool,
    /// Forces a kernel instead of `choose_kernel`'s choice.
    pub kernel: Option<MatmulKernel>,
    /// Reads columns `start..start + N` of a wider `dout` (M, W) in place, W being its last
    /// dimension (e.g. one vocabulary piece of the logits' gradient).
    pub dout_columns: Option<usize>,
    /// Forces the number of K slices of [`matmul_backward_input_split`] (1: no split) instead of
    /// its own choice; the scratch must hold them.
    pub splits: Option<usize>,
}

/// Options of [`matmul_backward_weight`] and [`matmul_backward_weight_split`].
#[derive(Clone, Copy, Default)]
pub struct MatmulBackwardWeight<'a> {
    /// (N) f32: the bias gradient `dbias (=|+=) sum over the M rows of dout` (as `accumulate`
    /// says), summed in the same dispatch from the dout tiles the product stages anyway.
    pub dbias: Option<&'a Tensor>,
    /// `dweight += ...` instead of `dweight = ...`.
    pub accumulate: bool,
    /// Forces a kernel instead of `choose_kernel`'s choice.
    pub kernel: Option<MatmulKernel>,
    /// Reads columns `start..start + N` of a wider `dout` (M, W) in place, W being its last
    /// dimension.
    pub dout_columns: Option<usize>,
    /// Forces the number of K slices of [`matmul_backward_weight_split`] (1: no split) instead
    /// of [`backward_weight_choice`]'s; the scratch must hold them. (Slices are whole multiples
    /// of 64 rows, so a short M may give fewer.)
    pub splits: Option<usize>,
}

/// What happens to each finished sum before it is stored.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    Plain,
    /// Store the sum (plus bias) in the tensor, output its GELU.
    GeluForward(&'a Tensor),
    /// Multiply the sum by the GELU derivative at the tensor's values.
    GeluBackward(&'a Tensor),
}

/// `c (=|+=) epilogue(A x B (+ bias))`, c: (rows, cols); A is (rows, inner), or (inner, rows)
/// when `a_trans`; B is (inner, cols), or (cols, inner) when `b_trans`. A and C may be windows
/// of wider matrices: A's rows are `a.stride` elements apart and start at element `a.start`
/// (likewise C); a contiguous operand has stride = its row length and start 0.
struct Product<'a> {
    op: &'static str,
    c: &'a Tensor,
    a: &'a Tensor,
    b: &'a Tensor,
    rows: usize,
    cols: usize,
    inner: usize,
    a_trans: bool,
    b_trans: bool,
    a_window: Window,
    c_window: Window,
    bias: Option<&'a Tensor>,
    epilogue: Epilogue<'a>,
    /// (rows) f32: also `row_sums (=|+=)` the sums of A's rows over the inner dimension (the
    /// bias gradient of a weight-gradient product). Plain epilogue, no bias.
    row_sums: Option<&'a Tensor>,
    accumulate: bool,
    /// How the inner dimension is cut (split-K); C holds one (rows, cols) block per slice.
    slices: Slices,
}

/// The K slices of a product: `count` slices of `len` inner elements, the last one possibly
/// shorter. An unsplit product is one slice of the whole inner dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slices {
    len: usize,
    count: usize,
}

impl Slices {
    fn whole(inner: usize) -> Slices {
        Slices {
            len: inner,
            count: 1,
        }
    }
}

/// Where a matrix operand lies in its tensor: element `start`, rows `stride` elements apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    start: usize,
    stride: usize,
}

impl Window {
    /// A whole contiguous matrix with rows of `row_len`.
    fn whole(row_len: usize) -> Window {
        Window {
            start: 0,
            stride: row_len,
        }
    }
}

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// The values of a define that is a flag: `0` or `1`.
const FLAGS: &[&str] = &["0", "1"];

/// The epilogue's defines, the last axes of every product kernel: `BIAS` (+ `BIAS_T`),
/// `GELU_FWD` or `GELU_BWD` (+ `PRE_T`, `PRE_BINDING`). Values from [`EpilogueValues`].
const EPILOGUE_AXES: [Axis; 6] = [
    Axis::optional("BIAS", &["1"]),
    Axis::optional("BIAS_T", FLOATS),
    Axis::optional("GELU_FWD", &["1"]),
    Axis::optional("GELU_BWD", &["1"]),
    Axis::optional("PRE_T", FLOATS),
    Axis::computed_optional("PRE_BINDING"),
];

/// A product kernel's axes: `head`, then [`EPILOGUE_AXES`] (`M` must be `N` + 6).
const fn with_epilogue<const N: usize, const M: usize>(head: [Axis; N]) -> [Axis; M] {
    assert!(M == N + EPILOGUE_AXES.len());
    let mut out = [EPILOGUE_AXES[0]; M];
    let mut i = 0;
    while i < N {
        out[i] = head[i];
        i += 1;
    }
    while i < M {
        out[i] = EPILOGUE_AXES[i - N];
        i += 1;
    }
    out
}

/// The values of [`EPILOGUE_AXES`], shared by every product kernel.
struct EpilogueValues {
    bias: Option<&'static str>,
    bias_t: Option<DType>,
    gelu_fwd: Option<&'static str>,
    gelu_bwd: Option<&'static str>,
    pre_t: Option<DType>,
    pre_binding: Option<u32>,
}

impl EpilogueValues {
    /// A bias of `bias_dtype`, and a GELU epilogue of a pre-activation of that dtype, written
    /// (forward) or read (backward).
    fn new(bias_dtype: Option<DType>, gelu: Option<(DType, bool)>) -> EpilogueValues {
        let forward = gelu.map(|(_, forward)| forward);
        EpilogueValues {
            bias: bias_dtype.map(|_| "1"),
            bias_t: bias_dtype,
            gelu_fwd: forward.filter(|&f| f).map(|_| "1"),
            gelu_bwd: forward.filter(|&f| !f).map(|_| "1"),
            pre_t: gelu.map(|(dtype, _)| dtype),
            // Bindings are numbered in order: params, A, B, C, [bias], [pre].
            pre_binding: gelu.map(|_| 4 + u32::from(bias_dtype.is_some())),
        }
    }

    fn values(&self) -> [&dyn DefineValue; 6] {
        [
            &self.bias,
            &self.bias_t,
            &self.gelu_fwd,
            &self.gelu_bwd,
            &self.pre_t,
            &self.pre_binding,
        ]
    }
}

/// Uniform block `Params` of the product kernels (`shaders/matmul_io.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TiledParams {
    rows: u32,
    cols: u32,
    inner: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,
    a_start: u32,
    a_stride: u32,
    c_start: u32,
    c_stride: u32,
    k_slice: u32,
    splits: u32,
}

fn launch(gpu: &Gpu, prod: &Product<'_>, forced: Option<MatmulKernel>) -> Result<Dispatch> {
    let op = prod.op;
    let check = Check::new(gpu, op);
    // Every element index the shader forms must fit its u32 arithmetic.
    let a_rows = if prod.a_trans { prod.inner } else { prod.rows };
    check.fits_u32(
        "A's last element",
        prod.a_window.start + a_rows * prod.a_window.stride,
    )?;
    check.fits_u32("inner * cols", prod.inner * prod.cols)?;
    check.fits_u32(
        "C's last element",
        prod.c_window.start + prod.slices.count * prod.rows * prod.c_window.stride,
    )?;
    if prod.row_sums.is_some() {
        if prod.bias.is_some() || !matches!(prod.epilogue, Epilogue::Plain) {
            return Err(check.error("row sums go with a plain product only (no bias, no GELU)"));
        }
        // A split product stores them after C's partials.
        check.fits_u32(
            "the row sums' partials",
            prod.slices.count * (prod.rows * prod.cols + prod.rows),
        )?;
    }
    let kernel = match forced {
        Some(k) => {
            check_kernel(gpu, prod, k)?;
            k
        }
        None => choose_kernel(gpu, prod, &no_split)?,
    };
    if prod.row_sums.is_some() && kernel == MatmulKernel::Rows {
        return Err(check.error("the rows kernel does not sum rows"));
    }
    let row_sums = prod.row_sums.is_some();
    let gelu = match prod.epilogue {
        Epilogue::Plain => None,
        Epilogue::GeluForward(t) => Some((t.dtype, true)),
        Epilogue::GeluBackward(t) => Some((t.dtype, false)),
    };
    // 16-byte packet loads where the operands' shapes allow them (matmul_tiled, matmul_coop).
    let a_vec = packets_fit(
        prod.a.dtype,
        if prod.a_trans { prod.rows } else { prod.inner },
        prod.a_window.stride,
        prod.a_window.start,
        prod.a.len(),
    );
    let b_len = if prod.b_trans { prod.inner } else { prod.cols };
    let b_vec = packets_fit(prod.b.dtype, b_len, b_len, 0, prod.b.len());
    let (bm, bn, specialisation) = match kernel {
        MatmulKernel::Tiled(tile) => {
            let variant = TiledVariant {
                tile,
                a_dtype: prod.a.dtype,
                b_dtype: prod.b.dtype,
                c_dtype: prod.c.dtype,
                a_trans: prod.a_trans,
                b_trans: prod.b_trans,
                bias_dtype: prod.bias.map(|b| b.dtype),
                gelu,
                accumulate: prod.accumulate,
                row_sums,
                a_vec,
                b_vec,
            };
            (tile.bm(), tile.bn(), variant.specialise())
        }
        MatmulKernel::Rows => {
            let variant = RowsVariant {
                a_dtype: prod.a.dtype,
                b_dtype: prod.b.dtype,
                c_dtype: prod.c.dtype,
                bias_dtype: prod.bias.map(|b| b.dtype),
                gelu,
                accumulate: prod.accumulate,
            };
            (ROWS_MAX as u32, ROWS_COLS as u32, variant.specialise())
        }
        MatmulKernel::Coop(tile) | MatmulKernel::CoopEmulated(tile) => {
            let emulate = matches!(kernel, MatmulKernel::CoopEmulated(_));
            let variant = CoopVariant {
                tile,
                subgroup: coop_subgroup_size(gpu, emulate).map_err(|why| check.error(why))?,
                c_dtype: prod.c.dtype,
                a_trans: prod.a_trans,
                b_trans: prod.b_trans,
                bias_dtype: prod.bias.map(|b| b.dtype),
                gelu,
                accumulate: prod.accumulate,
                row_sums,
                emulate,
                a_vec,
                b_vec,
                direct_store: matches!(prod.epilogue, Epilogue::Plain)
                    && prod.bias.is_none()
                    && !prod.accumulate
                    && prod.c.dtype == DType::F32
                    && prod.c_window.start.is_multiple_of(4)
                    && prod.c_window.stride.is_multiple_of(4)
                    && prod.c.offset.is_multiple_of(16),
            };
            (tile.bm(), tile.bn(), variant.specialise())
        }
    };
    let tiles_m = check.fits_u32("row tiles", prod.rows.div_ceil(bm as usize))?;
    let tiles_n = check.fits_u32("column tiles", prod.cols.div_ceil(bn as usize))?;
    let tiles = check.fits_u32("tiles", tiles_m as usize * tiles_n as usize)?;
    let workgroups = check.fits_u32(
        "workgroups (tiles x K slices)",
        tiles as usize * prod.slices.count,
    )?;
    let params = gpu.uniform(&TiledParams {
        rows: prod.rows as u32,
        cols: prod.cols as u32,
        inner: prod.inner as u32,
        tiles_m,
        tiles_n,
        tiles,
        a_start: prod.a_window.start as u32,
        a_stride: prod.a_window.stride as u32,
        c_start: prod.c_window.start as u32,
        c_stride: prod.c_window.stride as u32,
        k_slice: prod.slices.len as u32,
        splits: prod.slices.count as u32,
    });
    let mut bindings = vec![
        Bind::Uniform(&params),
        Bind::Read(prod.a),
        Bind::Read(prod.b),
        Bind::Write(prod.c),
    ];
    if let Some(bias) = prod.bias {
        bindings.push(Bind::Read(bias));
    }
    match prod.epilogue {
        Epilogue::Plain => {}
        Epilogue::GeluForward(pre) => bindings.push(Bind::Write(pre)),
        Epilogue::GeluBackward(pre) => bindings.push(Bind::Read(pre)),
    }
    if let Some(sums) = prod.row_sums {
        bindings.push(Bind::Write(sums));
    }
    gpu.dispatch(DispatchDesc {
        kernel: specialisation,
        bindings: &bindings,
        workgroups: gpu.grid(workgroups),
        label: if prod.slices.count > 1 {
            format!("{op}.partial[{} K slices]", prod.slices.count)
        } else {
            op.to_string()
        },
    })
}

/// The window of `t` (rows of `width` elements, leading dimensions flattened) that holds a
/// `rows x cols` matrix: columns `start..start + cols` when `columns` is `Some(start)` (the
/// matrix lies inside wider rows), else the whole tensor, which must then be `rows x cols`.
fn window(t: Arg<'_>, rows: usize, cols: usize, columns: Option<usize>) -> Result<Window> {
    Ok(match columns {
        Some(start) => Window {
            start,
            stride: t.columns(rows, start, cols)?,
        },
        None => {
            t.rows_of(rows, cols)?;
            Window::whole(cols)
        }
    })
}

/// Rows of a matrix operand `cols` wide, or of the wider rows it is a window of (`columns`).
fn window_rows(t: Arg<'_>, cols: usize, columns: Option<usize>) -> Result<usize> {
    let width = match columns {
        Some(_) => *t.tensor().shape.last().unwrap_or(&0),
        None => cols,
    };
    t.rows(width.max(1))
}

/// `out (=|+=) inp @ weight^T (+ bias)`, optionally followed by GELU (see [`MatmulForward`]).
///
/// out: (M, N), inp: (M, K) with leading dimensions flattened (M = inp.len() / K),
/// weight: (N, K), bias: (N), gelu_pre: (M, N). Any float dtypes.
pub fn matmul_forward(
    gpu: &Gpu,
    out: &Tensor,
    inp: &Tensor,
    weight: &Tensor,
    opts: &MatmulForward<'_>,
) -> Result<Dispatch> {
    const OP: &str = "matmul_forward";
    let check = Check::new(gpu, OP);
    let out_arg = check.arg("out", out).float()?;
    let inp_arg = check.arg("inp", inp).float()?;
    let (n, k) = check.arg("weight", weight).float()?.matrix(1)?;
    let m = inp_arg.rows(k)?;
    let c_window = window(out_arg, m, n, opts.out_columns)?;
    if opts.out_columns.is_some() && opts.gelu_pre.is_some() {
        return Err(check
            .error("a GELU epilogue writes whole rows; it cannot be combined with out_columns"));
    }
    let mut inputs = vec![("inp", inp), ("weight", weight)];
    if let Some(bias) = opts.bias {
        check.arg("bias", bias).float()?.len(n)?;
        inputs.push(("bias", bias));
    }
    let mut outputs = vec![("out", out)];
    if let Some(pre) = opts.gelu_pre {
        check.arg("gelu_pre", pre).float()?.rows_of(m, n)?;
        outputs.push(("gelu_pre", pre));
    }
    check.no_alias(&outputs, &inputs)?;
    let prod = Product {
        op: OP,
        c: out,
        a: inp,
        b: weight,
        rows: m,
        cols: n,
        inner: k,
        a_trans: false,
        b_trans: true,
        a_window: Window::whole(k),
        c_window,
        bias: opts.bias,
        epilogue: opts.gelu_pre.map_or(Epilogue::Plain, Epilogue::GeluForward),
        row_sums: None,
        accumulate: opts.accumulate,
        slices: Slices::whole(k),
    };
    launch(gpu, &prod, opts.kernel)
}

/// `dinp (=|+=) dout @ weight`, optionally times `gelu'(pre)` (see [`MatmulBackwardInput`]);
/// [`matmul_backward_input_split`] may split the sum over N (the tied classifier's vocabulary).
///
/// dinp: (M, K), dout: (M, N) with leading dimensions flattened, weight: (N, K),
/// gelu_pre: (M, K). Any float dtypes.
pub fn matmul_backward_input(
    gpu: &Gpu,
    dinp: &Tensor,
    dout: &Tensor,
    weight: &Tensor,
    opts: &MatmulBackwardInput<'_>,
) -> Result<Dispatch> {
    let prod = backward_input_product(gpu, dinp, dout, weight, opts)?;
    launch(gpu, &prod, opts.kernel)
}

/// The checked, unsplit product of [`matmul_backward_input`]: C = dinp (M, K), A = dout (M, N),
/// B = weight (N, K), inner = N.
fn backward_input_product<'a>(
    gpu: &Gpu,
    dinp: &'a Tensor,
    dout: &'a Tensor,
    weight: &'a Tensor,
    opts: &MatmulBackwardInput<'a>,
) -> Result<Product<'a>> {
    const OP: &str = "matmul_backward_input";
    let check = Check::new(gpu, OP);
    let dinp_arg = check.arg("dinp", dinp).float()?;
    let dout_arg = check.arg("dout", dout).float()?;
    let (n, k) = check.arg("weight", weight).float()?.matrix(1)?;
    let m = window_rows(dout_arg, n, opts.dout_columns)?;
    let a_window = window(dout_arg, m, n, opts.dout_columns)?;
    dinp_arg.rows_of(m, k)?;
    let mut inputs = vec![("dout", dout), ("weight", weight)];
    if let Some(pre) = opts.gelu_pre {
        check.arg("gelu_pre", pre).float()?.rows_of(m, k)?;
        inputs.push(("gelu_pre", pre));
    }
    check.no_alias(&[("dinp", dinp)], &inputs)?;
    Ok(Product {
        op: OP,
        c: dinp,
        a: dout,
        b: weight,
        rows: m,
        cols: k,
        inner: n,
        a_trans: false,
        b_trans: false,
        a_window,
        c_window: Window::whole(k),
        bias: None,
        epilogue: opts
            .gelu_pre
            .map_or(Epilogue::Plain, Epilogue::GeluBackward),
        row_sums: None,
        accumulate: opts.accumulate,
        slices: Slices::whole(n),
    })
}

/// `dweight (=|+=) dout^T @ inp`: the weight gradient, summed over the M rows, and with
/// `opts.dbias` the bias gradient (see [`MatmulBackwardWeight`]), in one dispatch;
/// [`matmul_backward_weight_split`] may split the sum over M to fill a large GPU.
///
/// dweight: (N, K) (f32, or f16), dout: (M, N), inp: (M, K), leading dimensions flattened;
/// inputs f32 or f16; dbias: (N) f32.
pub fn matmul_backward_weight(
    gpu: &Gpu,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    opts: &MatmulBackwardWeight<'_>,
) -> Result<Dispatch> {
    let prod = backward_weight_product(gpu, dweight, dout, inp, opts)?;
    if opts.splits.is_some_and(|s| s != 1) {
        return Err(Error::shape(
            prod.op,
            "split-K needs a scratch: use matmul_backward_weight_split",
        ));
    }
    launch(gpu, &prod, opts.kernel)
}

/// The checked, unsplit product of [`matmul_backward_weight`]: C = dweight (N, K), A = dout
/// read transposed (N rows of the product along its M rows), B = inp (M, K), inner = M; the
/// bias gradient is the sums of A's rows.
fn backward_weight_product<'a>(
    gpu: &Gpu,
    dweight: &'a Tensor,
    dout: &'a Tensor,
    inp: &'a Tensor,
    opts: &MatmulBackwardWeight<'a>,
) -> Result<Product<'a>> {
    const OP: &str = "matmul_backward_weight";
    let check = Check::new(gpu, OP);
    let dweight_arg = check.arg("dweight", dweight).float()?;
    let dout_arg = check.arg("dout", dout).float()?;
    let inp_arg = check.arg("inp", inp).float()?;
    let (n, k) = dweight_arg.matrix(1)?;
    let m = window_rows(dout_arg, n, opts.dout_columns)?;
    let a_window = window(dout_arg, m, n, opts.dout_columns)?;
    inp_arg.rows_of(m, k)?;
    let mut outputs = vec![("dweight", dweight)];
    if let Some(dbias) = opts.dbias {
        check.arg("dbias", dbias).f32()?.len(n)?;
        outputs.push(("dbias", dbias));
    }
    check.no_alias(&outputs, &[("dout", dout), ("inp", inp)])?;
    Ok(Product {
        op: OP,
        c: dweight,
        a: dout,
        b: inp,
        rows: n,
        cols: k,
        inner: m,
        a_trans: true,
        b_trans: false,
        a_window,
        c_window: Window::whole(k),
        bias: None,
        epilogue: Epilogue::Plain,
        row_sums: opts.dbias,
        accumulate: opts.accumulate,
        slices: Slices::whole(m),
    })
}

/// Every specialisation of the three product kernels and the split-K reduction.
pub(crate) fn shader_variants() -> Vec<Specialisation> {
    let mut out = tiled::shader_variants();
    out.extend(split::shader_variants());
    out.extend(coop::shader_variants());
    out.extend(rows::shader_variants());
    out
}
