//! Launchers for `shaders/matmul.wgsl`: the three products of a Linear layer and its bias
//! gradient, in PyTorch layout (weight (N, K) = (out, in)).
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

use super::{check_f32, check_float, check_u32_range};
use crate::defines;
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Dispatch, DispatchDesc, Gpu, Tensor};

const SHADER: &str = "matmul";
const COOP_SHADER: &str = "matmul_coop";
const ROWS_SHADER: &str = "matmul_rows";
/// Most rows `matmul_rows` takes (MAX_ROWS in the shader): the forward products of decoding up
/// to this many samples at once.
pub const ROWS_MAX: usize = 8;
/// Output columns per workgroup of `matmul_rows` (COLS in the shader).
const ROWS_COLS: usize = 32;
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
        output_tiles(rows, cols, self.bm(), self.bn())
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

/// Output tile of the cooperative-matrix kernel: a workgroup of `warps_m x warps_n` subgroups,
/// each summing `frags_m x frags_n` fragments of 16 x 16 outputs, stepping [`CoopTile::BK`]
/// along the inner dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopTile {
    pub warps_m: u32,
    pub warps_n: u32,
    pub frags_m: u32,
    pub frags_n: u32,
}

impl CoopTile {
    /// Inner-dimension step (BK in the shader).
    pub const BK: u32 = 32;

    /// Output rows per workgroup.
    pub const fn bm(self) -> u32 {
        16 * self.frags_m * self.warps_m
    }

    /// Output columns per workgroup.
    pub const fn bn(self) -> u32 {
        16 * self.frags_n * self.warps_n
    }

    /// Subgroups per workgroup.
    pub const fn warps(self) -> u32 {
        self.warps_m * self.warps_n
    }

    /// Workgroup memory: the staged A and B slices in f16 with rows padded by 8 (for either
    /// operand layout), and one 16 x 20 f32 fragment slot per subgroup plus a spare.
    pub const fn workgroup_bytes(self) -> u32 {
        const fn max(a: u32, b: u32) -> u32 {
            if a > b {
                a
            } else {
                b
            }
        }
        let bk = Self::BK;
        let a = max(self.bm() * (bk + 8), bk * (self.bm() + 8)) * 2;
        let b = max(self.bn() * (bk + 8), bk * (self.bn() + 8)) * 2;
        let c = (self.warps() + 1) * 16 * 20 * 4;
        a + b + c
    }

    /// Whether every thread of a workgroup with subgroups of `subgroup` stages a whole number of
    /// elements (the shader assumes it).
    const fn divides(self, subgroup: u32) -> bool {
        let threads = self.warps() * subgroup;
        (self.bm() * Self::BK).is_multiple_of(threads)
            && (self.bn() * Self::BK).is_multiple_of(threads)
            && 256u32.is_multiple_of(subgroup)
    }

    fn tiles(self, rows: usize, cols: usize) -> u64 {
        output_tiles(rows, cols, self.bm(), self.bn())
    }
}

/// The cooperative-matrix tiles, largest first: 128x128 (8 subgroups of 64x32), 128x64 and
/// 64x64 (4 subgroups of 64x32 and of 32x32).
pub const COOP_TILES: [CoopTile; 3] = [
    CoopTile {
        warps_m: 2,
        warps_n: 4,
        frags_m: 4,
        frags_n: 2,
    },
    CoopTile {
        warps_m: 2,
        warps_n: 2,
        frags_m: 4,
        frags_n: 2,
    },
    CoopTile {
        warps_m: 2,
        warps_n: 2,
        frags_m: 2,
        frags_n: 2,
    },
];

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
}

/// Options of [`matmul_backward_weight`].
#[derive(Clone, Copy, Default)]
pub struct MatmulBackwardWeight {
    /// `dweight += ...` instead of `dweight = ...`.
    pub accumulate: bool,
    /// Forces a kernel instead of `choose_kernel`'s choice.
    pub kernel: Option<MatmulKernel>,
    /// Reads columns `start..start + N` of a wider `dout` (M, W) in place, W being its last
    /// dimension.
    pub dout_columns: Option<usize>,
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
    accumulate: bool,
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

fn flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

/// The epilogue defines, shared by both kernels: `BIAS` (+ `BIAS_T`), `GELU_FWD` or `GELU_BWD`
/// (+ `PRE_T`, `PRE_BINDING`).
fn epilogue_defines(
    bias_dtype: Option<DType>,
    gelu: Option<(DType, bool)>,
) -> Vec<(String, String)> {
    let mut d = Vec::new();
    if let Some(bt) = bias_dtype {
        d.extend(defines![("BIAS", "1"), ("BIAS_T", bt.wgsl())]);
    }
    if let Some((pt, forward)) = gelu {
        let entry = if forward { "GELU_FWD" } else { "GELU_BWD" };
        // Bindings are numbered in order: params, A, B, C, [bias], [pre].
        let binding = 4 + u32::from(bias_dtype.is_some());
        d.extend(defines![
            (entry, "1"),
            ("PRE_T", pt.wgsl()),
            ("PRE_BINDING", binding)
        ]);
    }
    d
}

impl TiledVariant {
    fn defines(&self) -> Vec<(String, String)> {
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
        d.extend(epilogue_defines(self.bias_dtype, self.gelu));
        d
    }
}

/// Define-level description of one `matmul_coop` specialisation (A and B are always f16).
struct CoopVariant {
    tile: CoopTile,
    /// Invocations per subgroup the workgroup is sized for (the adapter's largest).
    subgroup: u32,
    c_dtype: DType,
    a_trans: bool,
    b_trans: bool,
    bias_dtype: Option<DType>,
    gelu: Option<(DType, bool)>,
    accumulate: bool,
    /// Plain-WGSL stand-ins for the cooperative-matrix operations (`EMULATE_COOP`).
    emulate: bool,
}

impl CoopVariant {
    fn defines(&self) -> Vec<(String, String)> {
        let t = self.tile;
        let mut d = defines![
            ("AB_T", DType::F16.wgsl()),
            ("A_T", DType::F16.wgsl()),
            ("B_T", DType::F16.wgsl()),
            ("C_T", self.c_dtype.wgsl()),
            ("A_TRANS", flag(self.a_trans)),
            ("B_TRANS", flag(self.b_trans)),
            ("WM", t.warps_m),
            ("WN", t.warps_n),
            ("FM", t.frags_m),
            ("FN", t.frags_n),
            ("SG", self.subgroup),
            ("ACCUMULATE", flag(self.accumulate)),
        ];
        if self.emulate {
            d.extend(defines![("EMULATE_COOP", "1")]);
        }
        d.extend(epilogue_defines(self.bias_dtype, self.gelu));
        d
    }
}

/// Whether `matmul_rows` computes a product: a forward product (A as is, B transposed) with at
/// most [`ROWS_MAX`] rows.
fn rows_kernel_fits(prod: &Product<'_>) -> bool {
    prod.rows <= ROWS_MAX && !prod.a_trans && prod.b_trans
}

/// Define-level description of one `matmul_rows` specialisation (A as is, B transposed).
struct RowsVariant {
    a_dtype: DType,
    b_dtype: DType,
    c_dtype: DType,
    bias_dtype: Option<DType>,
    gelu: Option<(DType, bool)>,
    accumulate: bool,
}

impl RowsVariant {
    fn defines(&self) -> Vec<(String, String)> {
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

/// The kernel for a product: the one place that decides it. Forward products of a few rows
/// (decoding) take `matmul_rows`, every other the rule of [`auto_kernel`].
fn choose_kernel(gpu: &Gpu, prod: &Product<'_>) -> Result<MatmulKernel> {
    if rows_kernel_fits(prod) {
        return Ok(MatmulKernel::Rows);
    }
    auto_kernel(gpu, prod.rows, prod.cols, prod.a.dtype, prod.b.dtype).map_err(|e| match e {
        Error::Limit {
            needed,
            available,
            adapter,
            hint,
            ..
        } => Error::Limit {
            what: prod.op.to_string(),
            needed,
            available,
            adapter,
            hint,
        },
        other => other,
    })
}

/// The kernel the launchers pick for a `rows x cols` output with operands of these dtypes.
///
/// f16 operands run on cooperative matrices when [`coop_matmul_status`] allows it (which runs
/// the self-check the first time), everything else on the tiled kernel. Either kernel takes,
/// among the tiles the adapter's limits allow that pad the output least (a 16-row product is
/// not computed as 128 rows when 64 will do), the biggest that still gives 264 workgroups, two
/// per streaming multiprocessor of an H100 (big tiles reuse each loaded element more; small
/// ones keep a large GPU busy when the output is small, e.g. the (768, 768) weight gradient).
pub fn auto_kernel(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    a_dtype: DType,
    b_dtype: DType,
) -> Result<MatmulKernel> {
    if a_dtype == DType::F16 && b_dtype == DType::F16 && coop_matmul_status(gpu).is_ok() {
        if let Ok(kernel) = best_coop_kernel(gpu, rows, cols) {
            return Ok(kernel);
        }
    }
    best_tiled_kernel(gpu, rows, cols)
}

/// Workgroups of a `bm x bn` tile that cover a `rows x cols` output.
fn output_tiles(rows: usize, cols: usize, bm: u32, bn: u32) -> u64 {
    rows.div_ceil(bm as usize) as u64 * cols.div_ceil(bn as usize) as u64
}

/// The rule of [`auto_kernel`]: among the tiles whose padded output (`tiles(t) * bm * bn`, the
/// outputs computed) is least, the biggest (they come largest first) that still gives
/// [`ENOUGH_TILES`] workgroups, else the smallest. `usable` is not empty.
fn pick_tile<T: Copy>(usable: &[T], tiles: impl Fn(T) -> u64, area: impl Fn(T) -> u64) -> T {
    let padded = |t: T| tiles(t) * area(t);
    let least = usable.iter().map(|&t| padded(t)).min().unwrap_or(0);
    let best: Vec<T> = usable
        .iter()
        .copied()
        .filter(|&t| padded(t) == least)
        .collect();
    best.iter()
        .copied()
        .find(|&t| tiles(t) >= ENOUGH_TILES)
        .unwrap_or(best[best.len() - 1])
}

/// The tiled kernel's tile for a `rows x cols` output (the rule of [`auto_kernel`]).
pub fn best_tiled_kernel(gpu: &Gpu, rows: usize, cols: usize) -> Result<MatmulKernel> {
    let fits = |t: &TileConfig| {
        t.workgroup_bytes() <= gpu.limits.max_compute_workgroup_storage_size
            && TILED_THREADS <= gpu.limits.max_compute_invocations_per_workgroup
            && TILED_THREADS <= gpu.limits.max_compute_workgroup_size_x
    };
    let usable: Vec<TileConfig> = TILE_CONFIGS.iter().copied().filter(fits).collect();
    if usable.is_empty() {
        return Err(Error::Limit {
            what: "matmul".to_string(),
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
    }
    Ok(MatmulKernel::Tiled(pick_tile(
        &usable,
        |t| t.tiles(rows, cols),
        |t| (t.bm() * t.bn()) as u64,
    )))
}

/// The cooperative-matrix kernel's tile for a `rows x cols` output (the rule of
/// [`auto_kernel`]), whatever the self-check says; an error if the adapter cannot run it.
pub fn best_coop_kernel(gpu: &Gpu, rows: usize, cols: usize) -> Result<MatmulKernel> {
    let usable = usable_coop_tiles(gpu).map_err(Error::Gpu)?;
    Ok(MatmulKernel::Coop(pick_tile(
        &usable,
        |t| t.tiles(rows, cols),
        |t| (t.bm() * t.bn()) as u64,
    )))
}

/// The subgroup size `matmul_coop` is sized for on this adapter, or why the adapter cannot run
/// it at all (with its cooperative-matrix operations emulated when `emulated`).
fn coop_subgroup_size(gpu: &Gpu, emulated: bool) -> std::result::Result<u32, String> {
    let name = &gpu.info.name;
    if !emulated && !gpu.has_coop_mat16_f16_f32() {
        return Err(format!(
            "adapter '{name}' offers no 16x16 f16 cooperative-matrix configuration with f32 \
             accumulation"
        ));
    }
    if !gpu.has_f16() {
        return Err(format!("adapter '{name}' has no SHADER_F16"));
    }
    if !gpu.has_subgroups() {
        return Err(format!("adapter '{name}' has no subgroup operations"));
    }
    // The largest size: smaller subgroups would only repeat work (see matmul_coop.wgsl).
    let size = gpu.subgroup_sizes.1;
    if !(size.is_power_of_two() && (8..=128).contains(&size)) {
        return Err(format!(
            "adapter '{name}' reports subgroups of up to {size} invocations; matmul_coop is \
             written for 8 to 128"
        ));
    }
    Ok(size)
}

/// The cooperative-matrix tiles the adapter's limits allow, largest first (never empty).
fn usable_coop_tiles(gpu: &Gpu) -> std::result::Result<Vec<CoopTile>, String> {
    let subgroup = coop_subgroup_size(gpu, false)?;
    let usable: Vec<CoopTile> = COOP_TILES
        .iter()
        .copied()
        .filter(|t| coop_tile_fits(gpu, *t, subgroup))
        .collect();
    if usable.is_empty() {
        return Err(format!(
            "no cooperative-matrix tile fits adapter '{}': {} bytes of workgroup memory and {} \
             invocations per workgroup",
            gpu.info.name,
            gpu.limits.max_compute_workgroup_storage_size,
            gpu.limits.max_compute_invocations_per_workgroup
        ));
    }
    Ok(usable)
}

fn coop_tile_fits(gpu: &Gpu, t: CoopTile, subgroup: u32) -> bool {
    let threads = t.warps() * subgroup;
    t.divides(subgroup)
        && t.workgroup_bytes() <= gpu.limits.max_compute_workgroup_storage_size
        && threads <= gpu.limits.max_compute_invocations_per_workgroup
        && threads <= gpu.limits.max_compute_workgroup_size_x
}

/// Whether the value of `WGPT_NO_COOPMAT` turns the cooperative-matrix kernel off: any value but
/// empty or `0`.
pub fn coop_disabled_by_env(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// Whether f16 products on `gpu` run on cooperative matrices: `Ok`, or `Err` saying why not
/// (`WGPT_NO_COOPMAT` set, an adapter without 16x16 f16 cooperative matrices, or a failed
/// self-check). Decided once per [`Gpu`], the first time it is asked (the launchers ask at
/// their first f16 product): the self-check runs the three products of a Linear layer at
/// awkward shapes through every usable cooperative-matrix tile and through the tiled kernel
/// (see [`agreement_with_tiled`]); any relative difference above 1e-2, any NaN or any error
/// turns cooperative matrices off for this device, with one line on stderr saying why.
pub fn coop_matmul_status(gpu: &Gpu) -> std::result::Result<(), String> {
    gpu.coop_matmul
        .get_or_init(|| {
            if coop_disabled_by_env(std::env::var_os("WGPT_NO_COOPMAT").as_deref()) {
                return Err("WGPT_NO_COOPMAT is set".into());
            }
            let tiles = usable_coop_tiles(gpu)?;
            for tile in tiles {
                if let Err(why) = agreement_with_tiled(gpu, MatmulKernel::Coop(tile)) {
                    eprintln!(
                        "wgpt: cooperative matrices disabled on '{}': {why}; f16 matmuls use \
                         the tiled kernel",
                        gpu.info.name
                    );
                    return Err(why);
                }
            }
            Ok(())
        })
        .clone()
}

/// Largest relative difference the self-check accepts between a kernel and the tiled kernel.
pub const SELF_CHECK_TOLERANCE: f32 = 1e-2;
/// (M, K, N) of the self-check: more than one tile of every size in each output dimension, none
/// a multiple of 16, and several k steps with a ragged last one, for all three products.
const SELF_CHECK_SHAPE: (usize, usize, usize) = (133, 150, 141);

/// Runs matmul_forward (with an f32 bias, f16 output), matmul_backward_input and
/// matmul_backward_weight (f32 outputs) on seeded f16 inputs at (M, K, N) = (133, 150, 141)
/// through `candidate` and through the tiled kernel, outputs poisoned with NaN first, and
/// returns the largest relative difference (max-norm) of the candidate from the tiled kernel.
/// `Err` says which product disagreed by more than [`SELF_CHECK_TOLERANCE`], left an output
/// unwritten, or failed to run.
pub fn agreement_with_tiled(
    gpu: &Gpu,
    candidate: MatmulKernel,
) -> std::result::Result<f32, String> {
    let (m, k, n) = SELF_CHECK_SHAPE;
    let setup = || -> Result<[Tensor; 4]> {
        let mut rng = crate::rng::Rng::new(0x5e1f_c4ec);
        let f16 = DType::F16;
        Ok([
            gpu.upload(
                "self-check inp",
                &rng.vec_uniform(m * k, -1.0, 1.0),
                &[m, k],
                f16,
            )?,
            gpu.upload(
                "self-check weight",
                &rng.vec_uniform(n * k, -1.0, 1.0),
                &[n, k],
                f16,
            )?,
            gpu.upload(
                "self-check dout",
                &rng.vec_uniform(m * n, -1.0, 1.0),
                &[m, n],
                f16,
            )?,
            gpu.upload(
                "self-check bias",
                &rng.vec_uniform(n, -1.0, 1.0),
                &[n],
                DType::F32,
            )?,
        ])
    };
    if !gpu.has_f16() {
        return Err(format!("adapter '{}' has no SHADER_F16", gpu.info.name));
    }
    let [inp, weight, dout, bias] = setup().map_err(|e| e.to_string())?;
    let reference = MatmulKernel::Tiled(TILE_CONFIGS[TILE_CONFIGS.len() - 1]);
    type Build<'a> = Box<dyn Fn(&Tensor, MatmulKernel) -> Result<Dispatch> + 'a>;
    let cases: [(&str, [usize; 3], DType, Build); 3] = [
        (
            "matmul_forward",
            [m, k, n],
            DType::F16,
            Box::new(|out, kernel| {
                let opts = MatmulForward {
                    bias: Some(&bias),
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_forward(gpu, out, &inp, &weight, &opts)
            }),
        ),
        (
            "matmul_backward_input",
            [m, n, k],
            DType::F32,
            Box::new(|out, kernel| {
                let opts = MatmulBackwardInput {
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_backward_input(gpu, out, &dout, &weight, &opts)
            }),
        ),
        (
            "matmul_backward_weight",
            [n, m, k],
            DType::F32,
            Box::new(|out, kernel| {
                let opts = MatmulBackwardWeight {
                    kernel: Some(kernel),
                    ..Default::default()
                };
                matmul_backward_weight(gpu, out, &dout, &inp, &opts)
            }),
        ),
    ];
    let mut worst = 0f32;
    for (op, [rows, inner, cols], dtype, build) in cases {
        let what = format!("{op} ({rows}x{inner} by {inner}x{cols}) on {candidate}");
        let run = || -> Result<(Vec<f32>, Vec<f32>)> {
            let want = gpu.zeros("self-check reference", &[rows, cols], dtype)?;
            let got = gpu.zeros("self-check candidate", &[rows, cols], dtype)?;
            gpu.poison(&want)?;
            gpu.poison(&got)?;
            let by_reference = build(&want, reference)?;
            let by_candidate = build(&got, candidate)?;
            gpu.run(&[&by_reference, &by_candidate])?;
            Ok((gpu.read(&got)?, gpu.read(&want)?))
        };
        let (got, want) = run().map_err(|e| format!("{what} failed: {e}"))?;
        let err = relative_difference(&got, &want).map_err(|e| format!("{what}: {e}"))?;
        if err.is_nan() || err > SELF_CHECK_TOLERANCE {
            return Err(format!(
                "{what} differs from the tiled kernel by {err:.3e} (relative, max-norm; \
                 allowed {SELF_CHECK_TOLERANCE:.0e})"
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
}

/// `max |got - want| / max |want|`, or `Err` naming the first non-finite element of either.
pub fn relative_difference(got: &[f32], want: &[f32]) -> std::result::Result<f32, String> {
    if got.len() != want.len() {
        return Err(format!("{} elements against {}", got.len(), want.len()));
    }
    if let Some(i) = want.iter().position(|x| !x.is_finite()) {
        return Err(format!("the tiled kernel's element {i} is {}", want[i]));
    }
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "element {i} is {} (not written, or overflowed)",
            got[i]
        ));
    }
    let scale = want.iter().fold(0f64, |s, &w| s.max(f64::from(w).abs()));
    let diff = got.iter().zip(want).fold(0f64, |d, (&g, &w)| {
        d.max((f64::from(g) - f64::from(w)).abs())
    });
    Ok((diff / scale.max(1e-30)) as f32)
}

/// Checks a forced kernel is one the shaders are built for and the adapter can run.
fn check_kernel(gpu: &Gpu, prod: &Product<'_>, kernel: MatmulKernel) -> Result<()> {
    let op = prod.op;
    match kernel {
        MatmulKernel::Rows => {
            if !rows_kernel_fits(prod) {
                return Err(Error::shape(
                    op,
                    format!(
                        "the rows kernel computes forward products of at most {ROWS_MAX} rows \
                         (this product has {})",
                        prod.rows
                    ),
                ));
            }
        }
        MatmulKernel::Tiled(t) => {
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
        }
        MatmulKernel::Coop(t) | MatmulKernel::CoopEmulated(t) => {
            let emulated = matches!(kernel, MatmulKernel::CoopEmulated(_));
            if !COOP_TILES.contains(&t) {
                return Err(Error::shape(
                    op,
                    format!("tile {t:?} is not one of the configurations {COOP_TILES:?}"),
                ));
            }
            if prod.a.dtype != DType::F16 || prod.b.dtype != DType::F16 {
                return Err(Error::shape(
                    op,
                    format!(
                        "the cooperative-matrix kernel needs f16 operands, got {} and {}",
                        prod.a.dtype.name(),
                        prod.b.dtype.name()
                    ),
                ));
            }
            let subgroup =
                coop_subgroup_size(gpu, emulated).map_err(|why| Error::shape(op, why))?;
            if !coop_tile_fits(gpu, t, subgroup) {
                return Err(Error::shape(
                    op,
                    format!(
                        "tile {t:?} needs {} invocations and {} bytes of workgroup memory, the \
                         adapter offers {} and {}",
                        t.warps() * subgroup,
                        t.workgroup_bytes(),
                        gpu.limits.max_compute_invocations_per_workgroup,
                        gpu.limits.max_compute_workgroup_storage_size
                    ),
                ));
            }
        }
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
    a_start: u32,
    a_stride: u32,
    c_start: u32,
    c_stride: u32,
    _pad: [u32; 2],
}

fn launch(gpu: &Gpu, prod: &Product<'_>, forced: Option<MatmulKernel>) -> Result<Dispatch> {
    let op = prod.op;
    // Every element index the shader forms must fit its u32 arithmetic.
    let a_rows = if prod.a_trans { prod.inner } else { prod.rows };
    check_u32_range(
        op,
        "A's last element",
        prod.a_window.start + a_rows * prod.a_window.stride,
    )?;
    check_u32_range(op, "inner * cols", prod.inner * prod.cols)?;
    check_u32_range(
        op,
        "C's last element",
        prod.c_window.start + prod.rows * prod.c_window.stride,
    )?;
    let kernel = match forced {
        Some(k) => {
            check_kernel(gpu, prod, k)?;
            k
        }
        None => choose_kernel(gpu, prod)?,
    };
    let gelu = match prod.epilogue {
        Epilogue::Plain => None,
        Epilogue::GeluForward(t) => Some((t.dtype, true)),
        Epilogue::GeluBackward(t) => Some((t.dtype, false)),
    };
    let (shader, entry, bm, bn, defines) = match kernel {
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
            };
            (
                SHADER,
                "matmul_tiled",
                tile.bm(),
                tile.bn(),
                variant.defines(),
            )
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
            (
                ROWS_SHADER,
                "matmul_rows",
                ROWS_MAX as u32,
                ROWS_COLS as u32,
                variant.defines(),
            )
        }
        MatmulKernel::Coop(tile) | MatmulKernel::CoopEmulated(tile) => {
            let emulate = matches!(kernel, MatmulKernel::CoopEmulated(_));
            let variant = CoopVariant {
                tile,
                subgroup: coop_subgroup_size(gpu, emulate).map_err(|why| Error::shape(op, why))?,
                c_dtype: prod.c.dtype,
                a_trans: prod.a_trans,
                b_trans: prod.b_trans,
                bias_dtype: prod.bias.map(|b| b.dtype),
                gelu,
                accumulate: prod.accumulate,
                emulate,
            };
            (
                COOP_SHADER,
                "matmul_coop",
                tile.bm(),
                tile.bn(),
                variant.defines(),
            )
        }
    };
    let tiles_m = check_u32_range(op, "row tiles", prod.rows.div_ceil(bm as usize))?;
    let tiles_n = check_u32_range(op, "column tiles", prod.cols.div_ceil(bn as usize))?;
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
            a_start: prod.a_window.start as u32,
            a_stride: prod.a_window.stride as u32,
            c_start: prod.c_window.start as u32,
            c_stride: prod.c_window.stride as u32,
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
        shader,
        entry,
        defines,
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

/// The window of `t` (rows of `width` elements, leading dimensions flattened) that holds a
/// `rows x cols` matrix: columns `start..start + cols` when `columns` is `Some(start)` (the
/// matrix lies inside wider rows), else the whole tensor, which must then be `rows x cols`.
fn window(
    op: &'static str,
    what: &str,
    t: &Tensor,
    rows: usize,
    cols: usize,
    columns: Option<usize>,
) -> Result<Window> {
    let Some(start) = columns else {
        expect_rows(op, what, t, rows, cols)?;
        return Ok(Window::whole(cols));
    };
    let width = *t.shape.last().unwrap_or(&0);
    if width == 0 || start + cols > width {
        return Err(Error::shape(
            op,
            format!(
                "{what} has shape {:?}: columns {start}..{} are outside its rows",
                t.shape,
                start + cols
            ),
        ));
    }
    expect_rows(op, what, t, rows, width)?;
    Ok(Window {
        start,
        stride: width,
    })
}

/// Rows of a matrix operand `cols` wide, or of the wider rows it is a window of (`columns`).
fn window_rows(
    op: &'static str,
    what: &str,
    t: &Tensor,
    cols: usize,
    columns: Option<usize>,
) -> Result<usize> {
    let width = match columns {
        Some(_) => *t.shape.last().unwrap_or(&0),
        None => cols,
    };
    rows_of(op, what, t, width.max(1))
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
    let c_window = window(OP, "out", out, m, n, opts.out_columns)?;
    if opts.out_columns.is_some() && opts.gelu_pre.is_some() {
        return Err(Error::shape(
            OP,
            "a GELU epilogue writes whole rows; it cannot be combined with out_columns",
        ));
    }
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
        a_window: Window::whole(k),
        c_window,
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
    let m = window_rows(OP, "dout", dout, n, opts.dout_columns)?;
    let a_window = window(OP, "dout", dout, m, n, opts.dout_columns)?;
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
        a_window,
        c_window: Window::whole(k),
        bias: None,
        epilogue: opts
            .gelu_pre
            .map_or(Epilogue::Plain, Epilogue::GeluBackward),
        accumulate: opts.accumulate,
    };
    launch(gpu, &prod, opts.kernel)
}

/// `dweight (=|+=) dout^T @ inp`: the weight gradient, summed over the M rows (see
/// [`MatmulBackwardWeight`]).
///
/// dweight: (N, K) (f32, or f16), dout: (M, N), inp: (M, K), leading dimensions flattened;
/// inputs f32 or f16.
pub fn matmul_backward_weight(
    gpu: &Gpu,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    opts: &MatmulBackwardWeight,
) -> Result<Dispatch> {
    const OP: &str = "matmul_backward_weight";
    check_float(gpu, OP, "dweight", dweight)?;
    check_float(gpu, OP, "dout", dout)?;
    check_float(gpu, OP, "inp", inp)?;
    let (n, k) = weight_dims(OP, "dweight", dweight)?;
    let m = window_rows(OP, "dout", dout, n, opts.dout_columns)?;
    let a_window = window(OP, "dout", dout, m, n, opts.dout_columns)?;
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
        a_window,
        c_window: Window::whole(k),
        bias: None,
        epilogue: Epilogue::Plain,
        accumulate: opts.accumulate,
    };
    launch(gpu, &prod, opts.kernel)
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
    out.extend(coop_shader_variants());
    // matmul_rows: every dtype, accumulation, bias and GELU combination of a forward product.
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
                            out.push(super::ShaderVariant {
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

/// Every `matmul_coop` specialisation: each tile, output dtype and epilogue for subgroups of
/// 32 (NVIDIA), the plain products for the other subgroup sizes the launcher accepts, and the
/// emulated kernel.
fn coop_shader_variants() -> Vec<super::ShaderVariant> {
    let floats = [DType::F32, DType::F16];
    let mut variants = Vec::new();
    for tile in COOP_TILES {
        for c_dtype in floats {
            for accumulate in [false, true] {
                let base = CoopVariant {
                    tile,
                    subgroup: 32,
                    c_dtype,
                    a_trans: false,
                    b_trans: false,
                    bias_dtype: None,
                    gelu: None,
                    accumulate,
                    emulate: false,
                };
                // matmul_forward: every bias and GELU combination.
                for bias_dtype in [None, Some(DType::F32), Some(DType::F16)] {
                    for gelu in [None, Some((DType::F32, true)), Some((DType::F16, true))] {
                        variants.push(CoopVariant {
                            b_trans: true,
                            bias_dtype,
                            gelu,
                            ..base
                        });
                    }
                }
                // matmul_backward_input: plain or through a GELU.
                for gelu in [None, Some((DType::F32, false)), Some((DType::F16, false))] {
                    variants.push(CoopVariant { gelu, ..base });
                }
                // matmul_backward_weight.
                variants.push(CoopVariant {
                    a_trans: true,
                    ..base
                });
            }
        }
        for subgroup in [8, 16, 64, 128] {
            for (a_trans, b_trans) in [(false, true), (false, false), (true, false)] {
                variants.push(CoopVariant {
                    tile,
                    subgroup,
                    c_dtype: DType::F32,
                    a_trans,
                    b_trans,
                    bias_dtype: None,
                    gelu: None,
                    accumulate: false,
                    emulate: false,
                });
            }
        }
    }
    // The emulated kernel (tests on adapters without cooperative matrices): the same
    // specialisations for subgroups of 8 (Mesa's software rasteriser) and 32.
    let emulated: Vec<CoopVariant> = variants
        .iter()
        .filter(|v| v.subgroup == 32)
        .flat_map(|v| {
            [8, 32].map(|subgroup| CoopVariant {
                subgroup,
                emulate: true,
                ..*v
            })
        })
        .collect();
    variants.extend(emulated);
    variants
        .into_iter()
        .map(|v| super::ShaderVariant {
            shader: COOP_SHADER,
            defines: v.defines(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn env_switch_reads_any_value_but_empty_or_zero_as_off() {
        assert!(!coop_disabled_by_env(None));
        assert!(!coop_disabled_by_env(Some(OsStr::new(""))));
        assert!(!coop_disabled_by_env(Some(OsStr::new("0"))));
        assert!(coop_disabled_by_env(Some(OsStr::new("1"))));
        assert!(coop_disabled_by_env(Some(OsStr::new("yes"))));
    }

    #[test]
    fn relative_difference_catches_mismatch_and_unwritten_elements() {
        let want = [1.0, -2.0, 4.0];
        assert_eq!(relative_difference(&want, &want), Ok(0.0));
        let err = relative_difference(&[1.0, -2.0, 4.2], &want).unwrap();
        assert!((err - 0.05).abs() < 1e-6, "{err}");
        // A transposed or misplaced fragment gives an O(1) difference.
        assert!(relative_difference(&[4.0, -2.0, 1.0], &want).unwrap() > SELF_CHECK_TOLERANCE);
        let e = relative_difference(&[1.0, f32::NAN, 4.0], &want).unwrap_err();
        assert!(e.contains("element 1"), "{e}");
        assert!(relative_difference(&want, &[1.0, f32::INFINITY, 4.0]).is_err());
        assert!(relative_difference(&want[..2], &want).is_err());
    }

    #[test]
    fn coop_tiles_fit_nvidia_limits_and_divide_the_staging() {
        for t in COOP_TILES {
            // 48 KiB of workgroup memory, subgroups of 32, 1024 invocations.
            assert!(t.workgroup_bytes() <= 48 * 1024, "{t:?}");
            for subgroup in [8, 16, 32, 64, 128] {
                assert!(t.divides(subgroup), "{t:?} subgroup {subgroup}");
                assert!(t.warps() * subgroup <= 1024, "{t:?} subgroup {subgroup}");
            }
        }
        assert_eq!(COOP_TILES[0].bm(), 128);
        assert_eq!(COOP_TILES[0].bn(), 128);
        assert_eq!(COOP_TILES[2].bm(), 64);
    }

    #[test]
    fn tiles_pad_the_output_least_then_fill_the_gpu() {
        let tile = |rows, cols| {
            pick_tile(
                &TILE_CONFIGS,
                |t| t.tiles(rows, cols),
                |t| (t.bm() * t.bn()) as u64,
            )
        };
        // GPT-2's shapes are multiples of 128: the biggest tile when it fills the GPU...
        assert_eq!(tile(16384, 2304), TILE_CONFIGS[0]);
        assert_eq!(tile(16384, 50304), TILE_CONFIGS[0]);
        // ...a smaller one for a small output (768 x 768: 36 tiles of 128 x 128).
        assert_eq!(tile(768, 768), TILE_CONFIGS[2]);
        // 16 rows are padded to 64, not 128.
        assert_eq!(tile(16, 50304).bm(), 64);
    }

    #[test]
    fn self_check_shape_is_ragged_for_every_tile() {
        let (m, k, n) = SELF_CHECK_SHAPE;
        for t in COOP_TILES {
            for (rows, cols) in [(m, n), (m, k), (n, k)] {
                let (bm, bn) = (t.bm() as usize, t.bn() as usize);
                assert!(rows > bm && rows % bm != 0 && cols > bn && cols % bn != 0);
            }
        }
        for dim in [m, k, n] {
            assert!(dim % 16 != 0 && dim > CoopTile::BK as usize);
        }
    }
}
