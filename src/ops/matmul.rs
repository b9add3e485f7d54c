//! Launchers for `shaders/matmul.wgsl`: the three products of a Linear layer and its bias
//! gradient, in PyTorch layout (weight (N, K) = (out, in)).
//!
//! Every product is the one tiled kernel `matmul_tiled` with its operands read in place
//! (transposed or not), so no launcher copies or transposes anything. Which kernel and tile
//! shape runs is decided in one place, `choose_kernel`; options may force one (tests do).
//!
//! Gradient convention of the executor: parameter gradients are cleared once per optimiser step
//! and every weight and bias gradient is launched with `accumulate = true`. Accumulation is exact:
//! the one thread that owns an output element reads it, adds, and writes it back.
//!
//! Dtypes: inputs f32 or f16 (f16 needs SHADER_F16), each tensor its own; every sum is f32.
//! Outputs f32 or f16. The bias may be f32 or f16 whatever the output is.

use super::{check_f32, check_float, check_u32_range};
use crate::defines;
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Dispatch, DispatchDesc, Gpu, Tensor};

const SHADER: &str = "matmul";
const FAMILY: &str = "matmul";
/// Threads per workgroup of the tiled kernel (16 x 16).
const TILED_THREADS: u32 = 256;
/// A configuration is "big enough" for a large GPU when it gives at least this many workgroups:
/// two for each of the 132 streaming multiprocessors of an H100.
const ENOUGH_TILES: u64 = 264;

/// `2 * M * K * N`: the floating-point operations of an (M, K) x (K, N) product.
pub fn matmul_flops(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

/// Output tile of the tiled kernel: a workgroup of 16 x 16 threads computes (16*tm) x (16*tn)
/// outputs, each thread tm x tn of them, stepping `bk` along the inner dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub tm: u32,
    pub tn: u32,
    pub bk: u32,
}

impl TileConfig {
    /// Output rows per workgroup.
    pub const fn bm(self) -> u32 {
        16 * self.tm
    }

    /// Output columns per workgroup.
    pub const fn bn(self) -> u32 {
        16 * self.tn
    }

    /// Workgroup memory: the A and B slices in f32, one vec4 of padding per k row.
    pub const fn workgroup_bytes(self) -> u32 {
        self.bk * (self.bm() + 4 + self.bn() + 4) * 4
    }

    fn tiles(self, rows: usize, cols: usize) -> u64 {
        rows.div_ceil(self.bm() as usize) as u64 * cols.div_ceil(self.bn() as usize) as u64
    }
}

/// The tile shapes the launchers use, largest first (128x128, 128x64, 64x64, all with k step 16).
pub const TILE_CONFIGS: [TileConfig; 3] = [
    TileConfig {
        tm: 8,
        tn: 8,
        bk: 16,
    },
    TileConfig {
        tm: 8,
        tn: 4,
        bk: 16,
    },
    TileConfig {
        tm: 4,
        tn: 4,
        bk: 16,
    },
];

/// Which kernel computes a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// `matmul_tiled`: workgroup-memory tiles, register blocking, f32 arithmetic.
    Tiled(TileConfig),
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
/// when `a_trans`; B is (inner, cols), or (cols, inner) when `b_trans`.
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
    bias: Option<&'a Tensor>,
    epilogue: Epilogue<'a>,
    accumulate: bool,
}

/// Define-level description of one `matmul_tiled` specialisation; the launcher and
/// `shader_variants` both build their define lists through it.
struct TiledVariant {
    tile: TileConfig,
    a_dtype: DType,
    b_dtype: DType,
    c_dtype: DType,
    a_trans: bool,
    b_trans: bool,
    bias_dtype: Option<DType>,
    /// (dtype of the pre-activation, whether it is written (forward) or read (backward)).
    gelu: Option<(DType, bool)>,
    accumulate: bool,
}

impl TiledVariant {
    fn defines(&self) -> Vec<(String, String)> {
        let flag = |b: bool| if b { "1" } else { "0" };
        let t = self.tile;
        let mut d = defines![
            ("A_T", self.a_dtype.wgsl()),
            ("B_T", self.b_dtype.wgsl()),
            ("C_T", self.c_dtype.wgsl()),
            ("A_TRANS", flag(self.a_trans)),
            ("B_TRANS", flag(self.b_trans)),
            ("TM", t.tm),
            ("TN", t.tn),
            ("BK", t.bk),
            ("ACCUMULATE", flag(self.accumulate)),
        ];
        if let Some(bt) = self.bias_dtype {
            d.extend(defines![("BIAS", "1"), ("BIAS_T", bt.wgsl())]);
        }
        if let Some((pt, forward)) = self.gelu {
            let entry = if forward { "GELU_FWD" } else { "GELU_BWD" };
            // Bindings are numbered in order: params, A, B, C, [bias], [pre].
            let binding = 4 + u32::from(self.bias_dtype.is_some());
            d.extend(defines![
                (entry, "1"),
                ("PRE_T", pt.wgsl()),
                ("PRE_BINDING", binding)
            ]);
        }
        d
    }
}

/// The kernel for a product: the one place that decides it.
///
/// The tiled kernel takes the biggest tile that still gives [`ENOUGH_TILES`] workgroups (big
/// tiles reuse each loaded element more; small ones keep a large GPU busy when the output is
/// small, e.g. the (768, 768) weight gradient), among those the adapter's workgroup memory holds.
fn choose_kernel(gpu: &Gpu, prod: &Product<'_>) -> Result<MatmulKernel> {
    let fits = |t: &TileConfig| {
        t.workgroup_bytes() <= gpu.limits.max_compute_workgroup_storage_size
            && TILED_THREADS <= gpu.limits.max_compute_invocations_per_workgroup
            && TILED_THREADS <= gpu.limits.max_compute_workgroup_size_x
    };
    let usable: Vec<TileConfig> = TILE_CONFIGS.iter().copied().filter(fits).collect();
    let Some(&smallest) = usable.last() else {
        return Err(Error::Limit {
            what: prod.op.to_string(),
            needed: format!(
                "{TILED_THREADS} threads and {} bytes of workgroup memory",
                TILE_CONFIGS[2].workgroup_bytes()
            ),
            available: format!(
                "{} threads and {} bytes",
                gpu.limits.max_compute_invocations_per_workgroup,
                gpu.limits.max_compute_workgroup_storage_size
            ),
            adapter: gpu.info.name.clone(),
            hint: "use an adapter that meets the WebGPU default limits".into(),
        });
    };
    let tile = usable
        .iter()
        .copied()
        .find(|t| t.tiles(prod.rows, prod.cols) >= ENOUGH_TILES)
        .unwrap_or(smallest);
    Ok(MatmulKernel::Tiled(tile))
}

/// Checks a forced kernel is one the shaders are built for and the adapter can run.
fn check_kernel(gpu: &Gpu, op: &'static str, kernel: MatmulKernel) -> Result<()> {
    let MatmulKernel::Tiled(t) = kernel;
    if !TILE_CONFIGS.contains(&t) {
        return Err(Error::shape(
            op,
            format!("tile {t:?} is not one of the configurations {TILE_CONFIGS:?}"),
        ));
    }
    if t.workgroup_bytes() > gpu.limits.max_compute_workgroup_storage_size {
        return Err(Error::shape(
            op,
            format!(
                "tile {t:?} needs {} bytes of workgroup memory, the adapter offers {}",
                t.workgroup_bytes(),
                gpu.limits.max_compute_workgroup_storage_size
            ),
        ));
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TiledParams {
    rows: u32,
    cols: u32,
    inner: u32,
    tiles_m: u32,
    tiles_n: u32,
    tiles: u32,
    _pad: [u32; 2],
}

fn launch(gpu: &Gpu, prod: &Product<'_>, forced: Option<MatmulKernel>) -> Result<Dispatch> {
    let op = prod.op;
    // Every element index the shader forms must fit its u32 arithmetic.
    check_u32_range(op, "rows * inner", prod.rows * prod.inner)?;
    check_u32_range(op, "inner * cols", prod.inner * prod.cols)?;
    check_u32_range(op, "rows * cols", prod.rows * prod.cols)?;
    let kernel = match forced {
        Some(k) => {
            check_kernel(gpu, op, k)?;
            k
        }
        None => choose_kernel(gpu, prod)?,
    };
    let MatmulKernel::Tiled(tile) = kernel;
    let variant = TiledVariant {
        tile,
        a_dtype: prod.a.dtype,
        b_dtype: prod.b.dtype,
        c_dtype: prod.c.dtype,
        a_trans: prod.a_trans,
        b_trans: prod.b_trans,
        bias_dtype: prod.bias.map(|b| b.dtype),
        gelu: match prod.epilogue {
            Epilogue::Plain => None,
            Epilogue::GeluForward(t) => Some((t.dtype, true)),
            Epilogue::GeluBackward(t) => Some((t.dtype, false)),
        },
        accumulate: prod.accumulate,
    };
    let tiles_m = check_u32_range(op, "row tiles", prod.rows.div_ceil(tile.bm() as usize))?;
    let tiles_n = check_u32_range(op, "column tiles", prod.cols.div_ceil(tile.bn() as usize))?;
    let tiles = check_u32_range(op, "tiles", tiles_m as usize * tiles_n as usize)?;
    let params = gpu.uniform(
        op,
        &TiledParams {
            rows: prod.rows as u32,
            cols: prod.cols as u32,
            inner: prod.inner as u32,
            tiles_m,
            tiles_n,
            tiles,
            _pad: [0; 2],
        },
    );
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
    gpu.dispatch(DispatchDesc {
        shader: SHADER,
        entry: "matmul_tiled",
        defines: variant.defines(),
        bindings: &bindings,
        workgroups: gpu.grid(tiles),
        label: op.to_string(),
        family: FAMILY,
    })
}

/// (N, K) of a weight, which must be 2-D and non-empty.
fn weight_dims(op: &'static str, what: &str, w: &Tensor) -> Result<(usize, usize)> {
    match w.shape[..] {
        [n, k] if n > 0 && k > 0 => Ok((n, k)),
        _ => Err(Error::shape(
            op,
            format!(
                "{what} has shape {:?}, expected a non-empty (N, K) matrix",
                w.shape
            ),
        )),
    }
}

/// Rows of `t` seen as (rows, width) with leading dimensions flattened. A tensor of rank >= 2
/// must have `width` as its last dimension; a flat one just a multiple of `width` elements.
fn rows_of(op: &'static str, what: &str, t: &Tensor, width: usize) -> Result<usize> {
    let last_ok = t.shape.len() < 2 || t.shape.last() == Some(&width);
    if !last_ok || t.is_empty() || !t.len().is_multiple_of(width) {
        return Err(Error::shape(
            op,
            format!("{what} has shape {:?}, expected (..., {width})", t.shape),
        ));
    }
    Ok(t.len() / width)
}

/// Checks `t` is (rows, width) up to flattening of its leading dimensions.
fn expect_rows(op: &'static str, what: &str, t: &Tensor, rows: usize, width: usize) -> Result<()> {
    let got = rows_of(op, what, t, width)?;
    if got != rows {
        return Err(Error::shape(
            op,
            format!(
                "{what} has shape {:?}, expected {rows} rows of {width}",
                t.shape
            ),
        ));
    }
    Ok(())
}

/// Whether two tensor views share any byte.
fn overlaps(x: &Tensor, y: &Tensor) -> bool {
    x.buffer == y.buffer
        && x.offset < y.offset + y.byte_size()
        && y.offset < x.offset + x.byte_size()
}

/// Outputs may not share a buffer with any input (wgpu forbids binding one buffer both read-only
/// and writable in a dispatch), nor overlap each other.
fn check_no_alias(
    op: &'static str,
    outputs: &[(&str, &Tensor)],
    inputs: &[(&str, &Tensor)],
) -> Result<()> {
    for (i, (out_name, out)) in outputs.iter().enumerate() {
        for (in_name, inp) in inputs {
            if out.buffer == inp.buffer {
                return Err(Error::shape(
                    op,
                    format!(
                        "{out_name} shares a buffer with {in_name}; outputs may not alias inputs"
                    ),
                ));
            }
        }
        for (other_name, other) in &outputs[i + 1..] {
            if overlaps(out, other) {
                return Err(Error::shape(
                    op,
                    format!("{out_name} overlaps {other_name}"),
                ));
            }
        }
    }
    Ok(())
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
    check_float(gpu, OP, "out", out)?;
    check_float(gpu, OP, "inp", inp)?;
    check_float(gpu, OP, "weight", weight)?;
    let (n, k) = weight_dims(OP, "weight", weight)?;
    let m = rows_of(OP, "inp", inp, k)?;
    expect_rows(OP, "out", out, m, n)?;
    let mut inputs = vec![("inp", inp), ("weight", weight)];
    if let Some(bias) = opts.bias {
        check_float(gpu, OP, "bias", bias)?;
        bias.expect_len(OP, "bias", n)?;
        inputs.push(("bias", bias));
    }
    let mut outputs = vec![("out", out)];
    if let Some(pre) = opts.gelu_pre {
        check_float(gpu, OP, "gelu_pre", pre)?;
        expect_rows(OP, "gelu_pre", pre, m, n)?;
        outputs.push(("gelu_pre", pre));
    }
    check_no_alias(OP, &outputs, &inputs)?;
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
        bias: opts.bias,
        epilogue: opts.gelu_pre.map_or(Epilogue::Plain, Epilogue::GeluForward),
        accumulate: opts.accumulate,
    };
    launch(gpu, &prod, opts.kernel)
}

/// `dinp (=|+=) dout @ weight`, optionally times `gelu'(pre)` (see [`MatmulBackwardInput`]).
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
    const OP: &str = "matmul_backward_input";
    check_float(gpu, OP, "dinp", dinp)?;
    check_float(gpu, OP, "dout", dout)?;
    check_float(gpu, OP, "weight", weight)?;
    let (n, k) = weight_dims(OP, "weight", weight)?;
    let m = rows_of(OP, "dout", dout, n)?;
    expect_rows(OP, "dinp", dinp, m, k)?;
    let mut inputs = vec![("dout", dout), ("weight", weight)];
    if let Some(pre) = opts.gelu_pre {
        check_float(gpu, OP, "gelu_pre", pre)?;
        expect_rows(OP, "gelu_pre", pre, m, k)?;
        inputs.push(("gelu_pre", pre));
    }
    check_no_alias(OP, &[("dinp", dinp)], &inputs)?;
    let prod = Product {
        op: OP,
        c: dinp,
        a: dout,
        b: weight,
        rows: m,
        cols: k,
        inner: n,
        a_trans: false,
        b_trans: false,
        bias: None,
        epilogue: opts
            .gelu_pre
            .map_or(Epilogue::Plain, Epilogue::GeluBackward),
        accumulate: opts.accumulate,
    };
    launch(gpu, &prod, opts.kernel)
}

/// `dweight (=|+=) dout^T @ inp`: the weight gradient, summed over the M rows.
///
/// dweight: (N, K) (f32, or f16), dout: (M, N), inp: (M, K), leading dimensions flattened;
/// inputs f32 or f16.
pub fn matmul_backward_weight(
    gpu: &Gpu,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    accumulate: bool,
) -> Result<Dispatch> {
    matmul_backward_weight_with(gpu, dweight, dout, inp, accumulate, None)
}

/// [`matmul_backward_weight`] with a forced kernel (`None`: `choose_kernel`'s choice).
pub fn matmul_backward_weight_with(
    gpu: &Gpu,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    accumulate: bool,
    kernel: Option<MatmulKernel>,
) -> Result<Dispatch> {
    const OP: &str = "matmul_backward_weight";
    check_float(gpu, OP, "dweight", dweight)?;
    check_float(gpu, OP, "dout", dout)?;
    check_float(gpu, OP, "inp", inp)?;
    let (n, k) = weight_dims(OP, "dweight", dweight)?;
    let m = rows_of(OP, "dout", dout, n)?;
    expect_rows(OP, "inp", inp, m, k)?;
    check_no_alias(OP, &[("dweight", dweight)], &[("dout", dout), ("inp", inp)])?;
    let prod = Product {
        op: OP,
        c: dweight,
        a: dout,
        b: inp,
        rows: n,
        cols: k,
        inner: m,
        a_trans: true,
        b_trans: false,
        bias: None,
        epilogue: Epilogue::Plain,
        accumulate,
    };
    launch(gpu, &prod, kernel)
}

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

pub(crate) fn shader_variants() -> Vec<super::ShaderVariant> {
    let floats = [DType::F32, DType::F16];
    let mut out = Vec::new();
    let mut push = |v: TiledVariant| {
        out.push(super::ShaderVariant {
            shader: SHADER,
            defines: v.defines(),
        })
    };
    for tile in TILE_CONFIGS {
        for a_dtype in floats {
            for b_dtype in floats {
                for c_dtype in floats {
                    for accumulate in [false, true] {
                        let base = TiledVariant {
                            tile,
                            a_dtype,
                            b_dtype,
                            c_dtype,
                            a_trans: false,
                            b_trans: false,
                            bias_dtype: None,
                            gelu: None,
                            accumulate,
                        };
                        // matmul_forward: every bias and GELU combination.
                        for bias_dtype in [None, Some(DType::F32), Some(DType::F16)] {
                            for gelu in [None, Some((DType::F32, true)), Some((DType::F16, true))] {
                                push(TiledVariant {
                                    b_trans: true,
                                    bias_dtype,
                                    gelu,
                                    ..base
                                });
                            }
                        }
                        // matmul_backward_input: plain or through a GELU.
                        for gelu in [None, Some((DType::F32, false)), Some((DType::F16, false))] {
                            push(TiledVariant { gelu, ..base });
                        }
                        // matmul_backward_weight.
                        push(TiledVariant {
                            a_trans: true,
                            ..base
                        });
                    }
                }
            }
        }
    }
    for dout in floats {
        for accumulate in [false, true] {
            out.push(super::ShaderVariant {
                shader: SHADER,
                defines: column_sum_defines(dout, accumulate),
            });
        }
    }
    out
}
