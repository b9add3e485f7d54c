//! Which kernel and tile shape computes a product: the one place that decides it, and the
//! checks on a kernel forced by the options.

use super::coop::{CoopTile, COOP_TILES};
use super::rows::{rows_kernel_fits, ROWS_MAX};
use super::tiled::{TileConfig, TILED_THREADS, TILE_CONFIGS};
use super::{coop_matmul_status, MatmulKernel, Product};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu};

/// A configuration is "big enough" for a large GPU when it gives at least this many workgroups:
/// two for each of the 132 streaming multiprocessors of an H100.
pub(super) const ENOUGH_TILES: u64 = 264;

/// How many K slices a product may be cut into when its output makes a given number of tiles
/// (split-K: see `split.rs`); [`no_split`] for every product but those given a scratch (weight
/// gradients, the classifier's input gradient).
pub(super) type SliceRule<'a> = &'a dyn Fn(u64) -> usize;

/// The [`SliceRule`] of a product computed whole.
pub(super) fn no_split(_tiles: u64) -> usize {
    1
}

/// The kernel for a product: the one place that decides it. Forward products of a few rows
/// (decoding) take `matmul_rows`, every other the rule of [`auto_kernel`], with the K slices
/// `slices` allows counted as workgroups.
pub(super) fn choose_kernel(
    gpu: &Gpu,
    prod: &Product<'_>,
    slices: SliceRule<'_>,
) -> Result<MatmulKernel> {
    if rows_kernel_fits(prod) {
        return Ok(MatmulKernel::Rows);
    }
    let (a, b) = (prod.a.dtype, prod.b.dtype);
    auto_kernel_sliced(gpu, prod.rows, prod.cols, a, b, slices).map_err(|e| match e {
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
    auto_kernel_sliced(gpu, rows, cols, a_dtype, b_dtype, &no_split)
}

/// [`auto_kernel`] for a product that `slices` may cut into K slices.
pub(super) fn auto_kernel_sliced(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    a_dtype: DType,
    b_dtype: DType,
    slices: SliceRule<'_>,
) -> Result<MatmulKernel> {
    if a_dtype == DType::F16 && b_dtype == DType::F16 && coop_matmul_status(gpu).is_ok() {
        if let Ok(kernel) = coop_kernel(gpu, rows, cols, slices) {
            return Ok(kernel);
        }
    }
    let half = a_dtype == DType::F16 && b_dtype == DType::F16;
    tiled_kernel(gpu, rows, cols, half, slices)
}

/// Workgroups of a `bm x bn` tile that cover a `rows x cols` output.
pub(super) fn output_tiles(rows: usize, cols: usize, bm: u32, bn: u32) -> u64 {
    rows.div_ceil(bm as usize) as u64 * cols.div_ceil(bn as usize) as u64
}

/// The rule of [`auto_kernel`]: among the tiles whose padded output (`tiles(t) * bm * bn`, the
/// outputs computed) is least, the biggest (they come largest first) that still gives
/// [`ENOUGH_TILES`] workgroups, counting each tile once per K slice `slices` allows (so a split
/// weight gradient keeps big tiles), else the smallest. `usable` is not empty.
pub(super) fn pick_tile<T: Copy>(
    usable: &[T],
    tiles: impl Fn(T) -> u64,
    area: impl Fn(T) -> u64,
    slices: SliceRule<'_>,
) -> T {
    let padded = |t: T| tiles(t) * area(t);
    let least = usable.iter().map(|&t| padded(t)).min().unwrap_or(0);
    let best: Vec<T> = usable
        .iter()
        .copied()
        .filter(|&t| padded(t) == least)
        .collect();
    best.iter()
        .copied()
        .find(|&t| tiles(t) * slices(tiles(t)) as u64 >= ENOUGH_TILES)
        .unwrap_or(best[best.len() - 1])
}

/// The tiled kernel's tile for a `rows x cols` output (the rule of [`auto_kernel`]), for any
/// operand dtypes (its k step as for operands staged in f32).
pub fn best_tiled_kernel(gpu: &Gpu, rows: usize, cols: usize) -> Result<MatmulKernel> {
    tiled_kernel(gpu, rows, cols, false, &no_split)
}

/// Whether the tiled kernel with tile `t` runs on `gpu`, its operands staged in f16 (`half`)
/// or f32.
pub(super) fn tiled_tile_fits(gpu: &Gpu, t: TileConfig, half: bool) -> bool {
    t.workgroup_bytes_staged(half) <= gpu.limits.max_compute_workgroup_storage_size
        && TILED_THREADS <= gpu.limits.max_compute_invocations_per_workgroup
        && TILED_THREADS <= gpu.limits.max_compute_workgroup_size_x
}

fn tiled_kernel(
    gpu: &Gpu,
    rows: usize,
    cols: usize,
    half: bool,
    slices: SliceRule<'_>,
) -> Result<MatmulKernel> {
    let mut usable: Vec<TileConfig> = TILE_CONFIGS
        .iter()
        .copied()
        .filter(|&t| tiled_tile_fits(gpu, t, half))
        .collect();
    // Each shape with its largest k step that fits.
    usable.dedup_by_key(|t| (t.tm, t.tn));
    if usable.is_empty() {
        return Err(Error::Limit {
            what: "matmul".to_string(),
            needed: format!(
                "{TILED_THREADS} threads and {} bytes of workgroup memory",
                TILE_CONFIGS[TILE_CONFIGS.len() - 1].workgroup_bytes_staged(half)
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
        slices,
    )))
}

/// The cooperative-matrix kernel's tile for a `rows x cols` output (the rule of
/// [`auto_kernel`]), whatever the self-check says; an error if the adapter cannot run it.
pub fn best_coop_kernel(gpu: &Gpu, rows: usize, cols: usize) -> Result<MatmulKernel> {
    coop_kernel(gpu, rows, cols, &no_split)
}

fn coop_kernel(gpu: &Gpu, rows: usize, cols: usize, slices: SliceRule<'_>) -> Result<MatmulKernel> {
    let usable = usable_coop_tiles(gpu).map_err(Error::Gpu)?;
    Ok(MatmulKernel::Coop(pick_tile(
        &usable,
        |t| t.tiles(rows, cols),
        |t| (t.bm() * t.bn()) as u64,
        slices,
    )))
}

/// The subgroup size `matmul_coop` is sized for on this adapter, or why the adapter cannot run
/// it at all (with its cooperative-matrix operations emulated when `emulated`).
pub(crate) fn coop_subgroup_size(gpu: &Gpu, emulated: bool) -> std::result::Result<u32, String> {
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
            "adapter '{name}' reports subgroups of up to {size} invocations; the cooperative-matrix \
             kernels are written for 8 to 128"
        ));
    }
    Ok(size)
}

/// The cooperative-matrix tiles the adapter's limits allow, largest first (never empty).
pub(super) fn usable_coop_tiles(gpu: &Gpu) -> std::result::Result<Vec<CoopTile>, String> {
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

/// Checks a forced kernel is one the shaders are built for and the adapter can run.
pub(super) fn check_kernel(gpu: &Gpu, prod: &Product<'_>, kernel: MatmulKernel) -> Result<()> {
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
            let half = prod.a.dtype == DType::F16 && prod.b.dtype == DType::F16;
            if !tiled_tile_fits(gpu, t, half) {
                return Err(Error::shape(
                    op,
                    format!(
                        "tile {t:?} needs {} bytes of workgroup memory, the adapter offers {}",
                        t.workgroup_bytes_staged(half),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_pad_the_output_least_then_fill_the_gpu() {
        // One k step per shape, as the launcher keeps them.
        let mut shapes = TILE_CONFIGS.to_vec();
        shapes.dedup_by_key(|t| (t.tm, t.tn));
        let tile = |rows, cols| {
            let t = pick_tile(
                &shapes,
                |t| t.tiles(rows, cols),
                |t| (t.bm() * t.bn()) as u64,
                &no_split,
            );
            (t.bm(), t.bn())
        };
        // GPT-2's shapes are multiples of 128: the biggest tile when it fills the GPU...
        assert_eq!(tile(16384, 2304), (128, 128));
        assert_eq!(tile(16384, 50304), (128, 128));
        // ...a smaller one for a small output (768 x 768: 36 tiles of 128 x 128).
        assert_eq!(tile(768, 768), (64, 64));
        // 16 rows are padded to 64, not 128.
        assert_eq!(tile(16, 50304).0, 64);
    }

    #[test]
    fn tiled_tiles_fit_nvidia_and_the_webgpu_default() {
        // NVIDIA (48 KiB): f16 operands get 128x128 with k step 32, f32 ones k step 16.
        let fits = |t: TileConfig, half: bool, limit: u32| t.workgroup_bytes_staged(half) <= limit;
        assert!(fits(TILE_CONFIGS[0], true, 48 * 1024));
        assert!(!fits(TILE_CONFIGS[0], false, 48 * 1024));
        assert!(fits(TILE_CONFIGS[1], false, 48 * 1024));
        // WebGPU's default 16 KiB: the last tile, whatever the operands.
        assert!(fits(TILE_CONFIGS[TILE_CONFIGS.len() - 1], false, 16 * 1024));
        for t in TILE_CONFIGS {
            // Whole packets and elements per thread, k steps of whole 32-byte sectors.
            assert!((t.bm() * t.bk).is_multiple_of(256) && (t.bn() * t.bk).is_multiple_of(256));
            assert!(t.bk.is_multiple_of(8) && 64 % t.bk == 0, "{t:?}");
        }
    }
}
