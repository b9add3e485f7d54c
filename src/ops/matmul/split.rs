//! Split-K for the weight gradients and the classifier's input gradient.
//!
//! `dweight (N, K) = dout^T (N, M) x inp (M, K)` sums over M = B*T rows (16384 for GPT-2 at
//! B=16, T=1024) into an output of few tiles: (768, 768) is 36 tiles of 128 x 128, far from
//! the [`ENOUGH_TILES`] workgroups that keep a large GPU busy. Smaller tiles would fill it but
//! load every operand element more often. Instead the M rows are cut into K slices (whole
//! multiples of 64 rows, at least [`SPLIT_MIN_SLICE`] of them): the product kernel sums each
//! (tile, slice) pair in its own workgroup into an f32 scratch of (slices, N, K) partials, and
//! `split_k_reduce` (shaders/matmul.wgsl) adds each element's partials in slice order, then
//! stores or accumulates into dweight. Deterministic: the slicing is a function of the shape,
//! the kernel and the scratch, and every sum of a given slicing is made in a fixed order; two
//! runs are bitwise equal (an unsplit run differs from a split one in the last bits).
//!
//! The tied classifier's input gradient `dinp (M, K) = dout (M, V) x wte (V, K)` is the same
//! case turned around: a chunk of rows times 768 is few tiles, and its inner dimension is the
//! vocabulary (tens of thousands). Split, it is also more accurate: one f32 sum over the whole
//! vocabulary rounds every small term against a running sum that its few large ones (the
//! target's -1, the likeliest tokens) made large, while slices start afresh and only their few
//! partials meet the large sum.
//!
//! The scratch comes from the caller, sized by [`matmul_backward_weight_scratch_len`] or
//! [`matmul_backward_input_scratch_len`], which depend on the shape only (the most slices any
//! kernel's tiles would take), so that a memory plan made without a device can hold it; the
//! launcher takes no more slices than the scratch and the adapter's largest storage binding
//! hold.

use super::choice::{auto_kernel_sliced, check_kernel, choose_kernel, output_tiles, ENOUGH_TILES};
use super::coop::COOP_TILES;
use super::tiled::TILE_CONFIGS;
use super::{
    backward_input_product, backward_weight_product, flag, launch, Epilogue, MatmulBackwardInput,
    MatmulBackwardWeight, MatmulKernel, Product, Slices, Window, FLAGS, ROWS_COLS,
};
use crate::error::{Error, Result};
use crate::gpu::{Axis, Bind, DType, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};
use crate::ops::{Check, FLOATS};

/// Fewest rows of M a K slice sums. Each slice's partial is written and read back once, 8 bytes
/// per output element, against 2 flops per output element and row: at least 1024 rows keeps
/// that traffic below 1/256 of a byte per flop.
pub const SPLIT_MIN_SLICE: usize = 1024;
/// Most K slices of one product.
pub const SPLIT_MAX: usize = 16;
/// Slices are whole multiples of this many rows: of every kernel's k step, and 16-byte aligned.
const SLICE_STEP: usize = 64;
/// Threads per workgroup of `split_k_reduce`.
const REDUCE_THREADS: usize = 256;

/// Values: the output's storage type, four elements a thread (VEC4), ACCUMULATE, ROW_SUMS.
const SPLIT_K_REDUCE: Kernel<4> = Kernel {
    shader: "matmul",
    entry: "split_k_reduce",
    fixed: &[("SPLIT_REDUCE", "1")],
    axes: [
        Axis::new("C_T", FLOATS),
        Axis::new("VEC4", FLAGS),
        Axis::new("ACCUMULATE", FLAGS),
        Axis::new("ROW_SUMS", FLAGS),
    ],
};

/// K slices for a product of `inner` rows whose output makes `tiles` workgroups: 1 when the
/// tiles are [`ENOUGH_TILES`] already or the rows too few for two slices of
/// [`SPLIT_MIN_SLICE`], else as many as bring the workgroups to ENOUGH_TILES, at most
/// [`SPLIT_MAX`] and at least SPLIT_MIN_SLICE rows each.
pub(super) fn split_count(tiles: u64, inner: usize) -> usize {
    if tiles >= ENOUGH_TILES {
        return 1;
    }
    let want = ENOUGH_TILES.div_ceil(tiles.max(1)) as usize;
    want.min(inner / SPLIT_MIN_SLICE).clamp(1, SPLIT_MAX)
}

impl Slices {
    /// At most `count` slices of `inner` rows, equal but for the last, in whole multiples of
    /// 64 rows (so a short inner dimension may give fewer).
    fn new(inner: usize, count: usize) -> Slices {
        let len = inner.div_ceil(count.max(1)).next_multiple_of(SLICE_STEP);
        if len >= inner {
            return Slices::whole(inner);
        }
        Slices {
            len,
            count: inner.div_ceil(len),
        }
    }
}

/// The most K slices any kernel's tile would cut a (rows, cols) output summed over `inner` into.
fn most_slices(rows: usize, cols: usize, inner: usize) -> usize {
    let tiled = TILE_CONFIGS.iter().map(|t| (t.bm(), t.bn()));
    let coop = COOP_TILES.iter().map(|t| (t.bm(), t.bn()));
    tiled
        .chain(coop)
        .map(|(bm, bn)| split_count(output_tiles(rows, cols, bm, bn), inner))
        .max()
        .unwrap_or(1)
}

/// Elements of the f32 scratch [`matmul_backward_weight_split`] needs for dweight (N, K) (and
/// dbias (N)) summed over M rows, on any adapter: the most K slices any kernel's tile would
/// take, times N * K + N; 0 when no tile would split (few rows, or an output that fills a
/// large GPU by itself).
pub fn matmul_backward_weight_scratch_len(n: usize, k: usize, m: usize) -> usize {
    let most = most_slices(n, k, m);
    if most > 1 {
        most * (n * k + n)
    } else {
        0
    }
}

/// Elements of the f32 scratch [`matmul_backward_input_split`] needs for dinp (M, K) summed over
/// the N columns of dout (the rows of the weight), on any adapter: the most K slices any
/// kernel's tile would take, times M * K; 0 when no tile would split.
pub fn matmul_backward_input_scratch_len(m: usize, k: usize, n: usize) -> usize {
    let most = most_slices(m, k, n);
    if most > 1 {
        most * m * k
    } else {
        0
    }
}

/// The K slices a scratch of `scratch_len` f32 elements holds for `per_slice` partials a
/// slice, within the adapter's largest storage binding (at least 1: no split).
fn scratch_slices(gpu: &Gpu, scratch_len: usize, per_slice: usize) -> usize {
    let binding = gpu.limits.max_storage_buffer_binding_size / (4 * per_slice.max(1) as u64);
    (scratch_len / per_slice.max(1))
        .min(binding as usize)
        .max(1)
}

/// The kernel and the number of K slices [`matmul_backward_weight_split`] takes for dweight
/// (N, K) and dbias summed over M rows with operands of these dtypes and a scratch of
/// `scratch_len` f32 elements (0: none), on `gpu`. The tile is [`auto_kernel`](super::auto_kernel)'s rule with
/// each tile counted once per slice, so a small output keeps big tiles and is split instead.
pub fn backward_weight_choice(
    gpu: &Gpu,
    (n, k): (usize, usize),
    m: usize,
    dtypes: (DType, DType),
    scratch_len: usize,
) -> Result<(MatmulKernel, usize)> {
    let cap = scratch_slices(gpu, scratch_len, n * k + n);
    let slices = |tiles: u64| split_count(tiles, m).min(cap);
    let kernel = auto_kernel_sliced(gpu, n, k, dtypes.0, dtypes.1, &slices)?;
    let (bm, bn) = kernel.output_tile();
    let count = slices(output_tiles(n, k, bm, bn));
    Ok((kernel, Slices::new(m, count).count))
}

/// `dweight (=|+=) dout^T @ inp` (and with `opts.dbias` the bias gradient) as
/// [`matmul_backward_weight`](super::matmul_backward_weight), split over the M rows when the
/// output alone makes too few workgroups and M is long (see the module's text): one dispatch,
/// or two (partial products, and partial row sums after them, into `scratch`, then their sums
/// into dweight and dbias), to be run in order. Without a scratch it never splits.
///
/// dweight: (N, K) (f32, or f16), dout: (M, N), inp: (M, K), leading dimensions flattened;
/// inputs f32 or f16; dbias: (N) f32; scratch: f32,
/// [`matmul_backward_weight_scratch_len`]`(N, K, M)` elements for any split the launcher may
/// choose (fewer allow fewer slices), its contents overwritten.
/// `opts.splits` forces the number of slices (the scratch must hold them).
pub fn matmul_backward_weight_split(
    gpu: &Gpu,
    dweight: &Tensor,
    dout: &Tensor,
    inp: &Tensor,
    scratch: Option<&Tensor>,
    opts: &MatmulBackwardWeight<'_>,
) -> Result<Vec<Dispatch>> {
    let prod = backward_weight_product(gpu, dweight, dout, inp, opts)?;
    let mut inputs = vec![("dout", dout), ("inp", inp), ("dweight", dweight)];
    inputs.extend(opts.dbias.map(|d| ("dbias", d)));
    launch_split(gpu, prod, scratch, &inputs, opts.kernel, opts.splits)
}

/// `dinp (=|+=) dout @ weight` as [`matmul_backward_input`](super::matmul_backward_input), split
/// over the inner dimension (the N columns of dout) when the output alone makes too few
/// workgroups and N is long, the tied classifier's case (see the module's text): one dispatch,
/// or two (partial products into `scratch`, then their sums into dinp), to be run in order.
/// Without a scratch it never splits; with `opts.gelu_pre` (an epilogue the partials cannot
/// apply) neither.
///
/// dinp: (M, K), dout: (M, N) (or a window of it: `opts.dout_columns`), weight: (N, K); any float
/// dtypes; scratch: f32, [`matmul_backward_input_scratch_len`]`(M, K, N)` elements for any split
/// the launcher may choose (fewer allow fewer slices), its contents overwritten. `opts.splits`
/// forces the number of slices (the scratch must hold them).
pub fn matmul_backward_input_split(
    gpu: &Gpu,
    dinp: &Tensor,
    dout: &Tensor,
    weight: &Tensor,
    scratch: Option<&Tensor>,
    opts: &MatmulBackwardInput<'_>,
) -> Result<Vec<Dispatch>> {
    let prod = backward_input_product(gpu, dinp, dout, weight, opts)?;
    if !matches!(prod.epilogue, Epilogue::Plain) {
        if opts.splits.is_some_and(|s| s != 1) {
            return Err(Error::shape(
                prod.op,
                "a GELU epilogue cannot be split: the partial products have none",
            ));
        }
        return Ok(vec![launch(gpu, &prod, opts.kernel)?]);
    }
    let inputs = [("dout", dout), ("weight", weight), ("dinp", dinp)];
    launch_split(gpu, prod, scratch, &inputs, opts.kernel, opts.splits)
}

/// Launches `prod` (a plain product, with or without row sums) cut into K slices when its
/// output alone makes too few workgroups and its inner dimension is long, as many as `scratch`
/// holds (or `splits`, forced): the partial products into `scratch`, then their sums (and the
/// row sums') into the product's outputs. Unsplit, one dispatch of the product itself.
/// `others` are the tensors the scratch may not alias.
fn launch_split(
    gpu: &Gpu,
    prod: Product<'_>,
    scratch: Option<&Tensor>,
    others: &[(&str, &Tensor)],
    kernel: Option<MatmulKernel>,
    splits: Option<usize>,
) -> Result<Vec<Dispatch>> {
    let op = prod.op;
    let check = Check::new(gpu, op);
    let outputs = prod.rows * prod.cols;
    // A slice's partials: C's, then the row sums'.
    let per_slice = outputs + prod.row_sums.map_or(0, |_| prod.rows);
    let scratch_len = match scratch {
        Some(s) => {
            check.arg("scratch", s).f32()?;
            check.no_alias(&[("scratch", s)], others)?;
            s.len()
        }
        None => 0,
    };
    let cap = scratch_slices(gpu, scratch_len, per_slice);
    let kernel = match kernel {
        Some(k) => {
            check_kernel(gpu, &prod, k)?;
            k
        }
        None => choose_kernel(gpu, &prod, &|tiles| split_count(tiles, prod.inner).min(cap))?,
    };
    let count = match splits {
        Some(0) => return Err(check.error("splits = 0: at least one K slice")),
        Some(s) if s > cap => {
            return Err(check.error(format!(
                "{s} K slices of ({}, {}) need a scratch of {} f32 elements; it has \
                     {scratch_len} (and the adapter binds at most {} bytes)",
                prod.rows,
                prod.cols,
                s * per_slice,
                gpu.limits.max_storage_buffer_binding_size
            )))
        }
        Some(s) => s,
        None => {
            let (bm, bn) = kernel.output_tile();
            split_count(output_tiles(prod.rows, prod.cols, bm, bn), prod.inner).min(cap)
        }
    };
    let slices = Slices::new(prod.inner, count);
    let (Some(scratch), true) = (scratch, slices.count > 1) else {
        return Ok(vec![launch(gpu, &prod, Some(kernel))?]);
    };
    let partial = Product {
        c: scratch,
        c_window: Window::whole(prod.cols),
        accumulate: false,
        slices,
        ..prod
    };
    let partial = launch(gpu, &partial, Some(kernel))?;
    let reduce = split_k_reduce(
        &check,
        (prod.c, prod.row_sums),
        scratch,
        (prod.rows, prod.cols),
        slices.count,
        prod.accumulate,
    )?;
    Ok(vec![partial, reduce])
}

/// Uniform block `ReduceParams` of `split_k_reduce` (`shaders/matmul.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ReduceParams {
    len: u32,
    splits: u32,
    rows: u32,
    _pad: u32,
}

/// `out (=|+=)` the sum, in slice order, of the `splits` blocks of (rows, cols) partials that
/// lead `scratch`, and `row_sums (=|+=)` that of the `splits` blocks of `rows` partials after
/// them; four elements of `out` a thread (16-byte loads) when the sizes and offsets allow.
fn split_k_reduce(
    check: &Check,
    (out, row_sums): (&Tensor, Option<&Tensor>),
    scratch: &Tensor,
    (rows, cols): (usize, usize),
    splits: usize,
    accumulate: bool,
) -> Result<Dispatch> {
    let gpu = check.gpu();
    let outputs = rows * cols;
    check.fits_u32("scratch elements", splits * (outputs + rows))?;
    let vec4 = outputs.is_multiple_of(4)
        && out.offset.is_multiple_of(16)
        && scratch.offset.is_multiple_of(16);
    let len = if vec4 { outputs / 4 } else { outputs };
    let params = gpu.uniform(&ReduceParams {
        len: len as u32,
        splits: splits as u32,
        rows: rows as u32,
        _pad: 0,
    });
    let threads = len + row_sums.map_or(0, |_| rows);
    let groups = check.fits_u32("workgroups", threads.div_ceil(REDUCE_THREADS))?;
    let mut bindings = vec![
        Bind::Uniform(&params),
        Bind::Read(scratch),
        Bind::Write(out),
    ];
    if let Some(sums) = row_sums {
        bindings.extend([Bind::Read(scratch), Bind::Write(sums)]);
    }
    gpu.dispatch(DispatchDesc {
        kernel: SPLIT_K_REDUCE.with([
            &out.dtype,
            &flag(vec4),
            &flag(accumulate),
            &flag(row_sums.is_some()),
        ]),
        bindings: &bindings,
        workgroups: gpu.grid(groups),
        label: format!("{}.reduce[{splits} K slices]", check.op()),
    })
}

/// The `split_k_reduce` specialisations: each output dtype, vectorised or not, with and without
/// accumulation and row sums. (The partial products are the plain f32-output specialisations
/// of the product kernels, which their own variants include.)
pub(super) fn shader_variants() -> Vec<Specialisation> {
    SPLIT_K_REDUCE.variants()
}

impl MatmulKernel {
    /// (rows, columns) of the output tile one workgroup computes.
    pub(super) fn output_tile(self) -> (u32, u32) {
        match self {
            MatmulKernel::Tiled(t) => (t.bm(), t.bn()),
            MatmulKernel::Coop(t) | MatmulKernel::CoopEmulated(t) => (t.bm(), t.bn()),
            MatmulKernel::Rows => (super::ROWS_MAX as u32, ROWS_COLS as u32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::choice::pick_tile;
    use super::*;

    #[test]
    fn gpt2_weight_gradients_split_only_when_the_output_is_small() {
        let m = 16 * 1024;
        // (N, K) of the weight gradients of GPT-2 124M: the chosen tiled tile, the slices.
        let choice = |n: usize, k: usize| {
            let slices = |tiles: u64| split_count(tiles, m);
            let t = pick_tile(
                &TILE_CONFIGS,
                |t| t.tiles(n, k),
                |t| (t.bm() * t.bn()) as u64,
                &slices,
            );
            (t.bm(), t.bn(), slices(t.tiles(n, k)))
        };
        // attn.c_proj: 36 tiles of 128 x 128, 8 slices of 2048 rows make 288 workgroups.
        assert_eq!(choice(768, 768), (128, 128, 8));
        // attn.c_attn: 108 tiles, 3 slices; mlp.c_fc and mlp.c_proj: 144 tiles, 2 slices.
        assert_eq!(choice(2304, 768), (128, 128, 3));
        assert_eq!(choice(3072, 768), (128, 128, 2));
        assert_eq!(choice(768, 3072), (128, 128, 2));
        // The tied classifier's gradient fills the GPU by itself.
        assert_eq!(choice(50304, 768), (128, 128, 1));
        // Too few rows to split: the rule of auto_kernel, small tiles.
        assert_eq!(split_count(36, 2047), 1);
        assert_eq!(split_count(36, 4096), 4);
        assert_eq!(split_count(1, 1 << 20), SPLIT_MAX);
    }

    #[test]
    fn scratch_holds_any_kernels_split_and_stays_small() {
        // 768 x 768 is 18 cooperative-matrix tiles of 128 x 256: 15 slices.
        assert_eq!(
            matmul_backward_weight_scratch_len(768, 768, 16384),
            15 * (768 * 768 + 768)
        );
        assert_eq!(matmul_backward_weight_scratch_len(768, 768, 1024), 0);
        assert_eq!(matmul_backward_weight_scratch_len(50304, 768, 16384), 0);
        // Slices only ever bring the workgroups to ENOUGH_TILES (plus one slice's worth), so the
        // scratch is at most about 2 * 264 of the largest tiles (128 x 256) in f32: 66 MiB,
        // within large GPUs' bindings (smaller adapters cap the slices at theirs).
        for (n, k) in [(768, 768), (2304, 768), (3072, 768), (1600, 1600), (64, 64)] {
            let bytes = 4 * matmul_backward_weight_scratch_len(n, k, 1 << 20);
            assert!(
                bytes <= 2 * 264 * (128 * 256 + 128) * 4 + 4 * (n * k + n),
                "{n}x{k}: {bytes}"
            );
        }
    }

    #[test]
    fn slices_are_whole_steps_and_cover_the_rows() {
        for (inner, count) in [(16384, 8), (1000, 3), (130, 2), (777, 5), (100, 4), (64, 2)] {
            let s = Slices::new(inner, count);
            assert!(s.count <= count && s.count >= 1, "{inner} {count}: {s:?}");
            assert!(s.len * s.count >= inner && s.len * (s.count - 1) < inner);
            if s.count > 1 {
                assert_eq!(s.len % SLICE_STEP, 0);
            } else {
                assert_eq!(s.len, inner);
            }
        }
        assert_eq!(
            Slices::new(16384, 8),
            Slices {
                len: 2048,
                count: 8
            }
        );
        assert_eq!(Slices::new(1000, 3), Slices { len: 384, count: 3 });
    }
}
