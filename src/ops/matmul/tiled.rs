//! The tiled kernel `matmul_tiled` (shaders/matmul.wgsl): its tile shapes and the defines of
//! its specialisations.

use super::choice::output_tiles;
use super::{flag, with_epilogue, EpilogueValues, FLAGS};
use crate::gpu::{Axis, DType, Kernel, Specialisation};
use crate::ops::FLOATS;

/// Values from [`TiledVariant::specialise`]: the operands' and the output's storage types,
/// whether A and B are read transposed, the tile (TM, TN, BK), ACCUMULATE, ROW_SUMS, the type
/// the operands are staged in, packet loads of A and B and their packet sizes, whether A and B
/// are f16; then the epilogue's.
const TILED: Kernel<23> = Kernel {
    shader: "matmul",
    entry: "matmul_tiled",
    fixed: &[],
    axes: with_epilogue([
        Axis::new("A_T", FLOATS),
        Axis::new("B_T", FLOATS),
        Axis::new("C_T", FLOATS),
        Axis::new("A_TRANS", FLAGS),
        Axis::new("B_TRANS", FLAGS),
        Axis::computed("TM"),
        Axis::computed("TN"),
        Axis::computed("BK"),
        Axis::new("ACCUMULATE", FLAGS),
        Axis::new("ROW_SUMS", FLAGS),
        Axis::new("STAGE_T", FLOATS),
        Axis::new("A_VEC", FLAGS),
        Axis::new("B_VEC", FLAGS),
        Axis::computed("A_PACK"),
        Axis::computed("B_PACK"),
        Axis::new("A_HALF", FLAGS),
        Axis::new("B_HALF", FLAGS),
    ]),
};

/// Threads per workgroup of the tiled kernel (16 x 16).
pub(super) const TILED_THREADS: u32 = 256;

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

    /// Workgroup memory with operands staged in f32 (the most a tile takes): two buffers of the
    /// A and B slices, one vec4 of padding per k row.
    pub const fn workgroup_bytes(self) -> u32 {
        self.workgroup_bytes_staged(false)
    }

    /// Workgroup memory with operands staged in f16 (`half`: both operands are f16) or f32.
    pub const fn workgroup_bytes_staged(self, half: bool) -> u32 {
        let size = if half { 2 } else { 4 };
        2 * self.bk * (self.bm() + 4 + self.bn() + 4) * size
    }

    pub(super) fn tiles(self, rows: usize, cols: usize) -> u64 {
        output_tiles(rows, cols, self.bm(), self.bn())
    }
}

/// The tile shapes the launchers use, largest first, each shape with its k steps largest first:
/// 128x128 (k step 32, or 16), 128x64 (32), 64x64 (32, 16, or 8). The launcher takes for each
/// shape the largest k step whose double-buffered tiles fit the adapter's workgroup memory:
/// staged in f16 (f16 operands), 128x128 with k step 32 needs 33 KiB, which NVIDIA's 48 KiB
/// holds; staged in f32 it takes k step 16 there. 64x64 with k step 8 fits WebGPU's default
/// 16 KiB.
pub const TILE_CONFIGS: [TileConfig; 6] = [
    TileConfig {
        tm: 8,
        tn: 8,
        bk: 32,
    },
    TileConfig {
        tm: 8,
        tn: 8,
        bk: 16,
    },
    TileConfig {
        tm: 8,
        tn: 4,
        bk: 32,
    },
    TileConfig {
        tm: 4,
        tn: 4,
        bk: 32,
    },
    TileConfig {
        tm: 4,
        tn: 4,
        bk: 16,
    },
    TileConfig {
        tm: 4,
        tn: 4,
        bk: 8,
    },
];

/// Whether an operand can be loaded in 16-byte packets: its contiguous extent, row stride and
/// first element are whole packets, and so is the tensor (its binding).
pub(super) fn packets_fit(
    dtype: DType,
    extent: usize,
    stride: usize,
    start: usize,
    len: usize,
) -> bool {
    let pack = 16 / dtype.size();
    [extent, stride, start, len]
        .iter()
        .all(|x| x.is_multiple_of(pack))
}

/// Define-level description of one `matmul_tiled` specialisation; the launcher and
/// `shader_variants` both specialise the kernel through it.
pub(super) struct TiledVariant {
    pub(super) tile: TileConfig,
    pub(super) a_dtype: DType,
    pub(super) b_dtype: DType,
    pub(super) c_dtype: DType,
    pub(super) a_trans: bool,
    pub(super) b_trans: bool,
    pub(super) bias_dtype: Option<DType>,
    /// (dtype of the pre-activation, whether it is written (forward) or read (backward)).
    pub(super) gelu: Option<(DType, bool)>,
    pub(super) accumulate: bool,
    /// Also the sums of A's rows (`ROW_SUMS`: the bias gradient of a weight gradient).
    pub(super) row_sums: bool,
    /// A (B) loaded in 16-byte packets (see [`packets_fit`]).
    pub(super) a_vec: bool,
    pub(super) b_vec: bool,
}

impl TiledVariant {
    /// The type the operands are staged in: f16 when both are f16 (exact, half the memory).
    fn stage(&self) -> DType {
        if self.a_dtype == DType::F16 && self.b_dtype == DType::F16 {
            DType::F16
        } else {
            DType::F32
        }
    }

    pub(super) fn specialise(&self) -> Specialisation {
        let t = self.tile;
        let epilogue = EpilogueValues::new(self.bias_dtype, self.gelu);
        let [e0, e1, e2, e3, e4, e5] = epilogue.values();
        TILED.with([
            &self.a_dtype,
            &self.b_dtype,
            &self.c_dtype,
            &flag(self.a_trans),
            &flag(self.b_trans),
            &t.tm,
            &t.tn,
            &t.bk,
            &flag(self.accumulate),
            &flag(self.row_sums),
            &self.stage(),
            &flag(self.a_vec),
            &flag(self.b_vec),
            &(16 / self.a_dtype.size()),
            &(16 / self.b_dtype.size()),
            &flag(self.a_dtype == DType::F16),
            &flag(self.b_dtype == DType::F16),
            e0,
            e1,
            e2,
            e3,
            e4,
            e5,
        ])
    }
}

/// Every `matmul_tiled` specialisation the launchers ask for: each tile, dtype combination and
/// accumulation, with the epilogues of each product.
pub(super) fn shader_variants() -> Vec<Specialisation> {
    let floats = [DType::F32, DType::F16];
    let mut out = Vec::new();
    // Each with every combination of packet and element loads.
    let mut push = |v: TiledVariant| {
        for a_vec in [false, true] {
            for b_vec in [false, true] {
                let v = TiledVariant { a_vec, b_vec, ..v };
                out.push(v.specialise())
            }
        }
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
                            row_sums: false,
                            a_vec: false,
                            b_vec: false,
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
                        // matmul_backward_weight, with and without the bias gradient.
                        for row_sums in [false, true] {
                            push(TiledVariant {
                                a_trans: true,
                                row_sums,
                                ..base
                            });
                        }
                    }
                }
            }
        }
    }
    out
}
