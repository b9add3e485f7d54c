//! The tiled kernel `matmul_tiled` (shaders/matmul.wgsl): its tile shapes and the defines of
//! its specialisations.

use super::choice::output_tiles;
use super::{epilogue_defines, flag, SHADER};
use crate::defines;
use crate::gpu::DType;

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

    /// Workgroup memory: the A and B slices in f32, one vec4 of padding per k row.
    pub const fn workgroup_bytes(self) -> u32 {
        self.bk * (self.bm() + 4 + self.bn() + 4) * 4
    }

    pub(super) fn tiles(self, rows: usize, cols: usize) -> u64 {
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

/// Define-level description of one `matmul_tiled` specialisation; the launcher and
/// `shader_variants` both build their define lists through it.
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
}

impl TiledVariant {
    pub(super) fn defines(&self) -> Vec<(String, String)> {
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

/// Every `matmul_tiled` specialisation the launchers ask for: each tile, dtype combination and
/// accumulation, with the epilogues of each product.
pub(super) fn shader_variants() -> Vec<crate::ops::ShaderVariant> {
    let floats = [DType::F32, DType::F16];
    let mut out = Vec::new();
    let mut push = |v: TiledVariant| {
        out.push(crate::ops::ShaderVariant {
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
    out
}
