//! The cooperative-matrix kernel `matmul_coop` (shaders/matmul_coop.wgsl): its tile shapes and
//! the defines of its specialisations, real and emulated.

use super::choice::output_tiles;
use super::{flag, with_epilogue, EpilogueValues, FLAGS};
use crate::gpu::{Axis, DType, Kernel, Specialisation};
use crate::ops::FLOATS;

/// Values from [`CoopVariant::specialise`]: the output's storage type, whether A and B are read
/// transposed, the tile (WM, WN, FM, FN), the subgroup size SG, ACCUMULATE, ROW_SUMS, packet
/// loads of A and B, DIRECT_STORE, EMULATE_COOP (set for the emulated kernel); then the
/// epilogue's. A and B are f16.
const COOP: Kernel<20> = Kernel {
    shader: "matmul_coop",
    entry: "matmul_coop",
    fixed: &[("AB_T", "f16"), ("A_T", "f16"), ("B_T", "f16")],
    axes: with_epilogue([
        Axis::new("C_T", FLOATS),
        Axis::new("A_TRANS", FLAGS),
        Axis::new("B_TRANS", FLAGS),
        Axis::computed("WM"),
        Axis::computed("WN"),
        Axis::computed("FM"),
        Axis::computed("FN"),
        Axis::computed("SG"),
        Axis::new("ACCUMULATE", FLAGS),
        Axis::new("ROW_SUMS", FLAGS),
        Axis::new("A_VEC", FLAGS),
        Axis::new("B_VEC", FLAGS),
        Axis::new("DIRECT_STORE", FLAGS),
        Axis::optional("EMULATE_COOP", &["1"]),
    ]),
};

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
    pub(super) const fn divides(self, subgroup: u32) -> bool {
        let threads = self.warps() * subgroup;
        (self.bm() * Self::BK).is_multiple_of(threads)
            && (self.bn() * Self::BK).is_multiple_of(threads)
            && 256u32.is_multiple_of(subgroup)
    }

    pub(super) fn tiles(self, rows: usize, cols: usize) -> u64 {
        output_tiles(rows, cols, self.bm(), self.bn())
    }
}

/// The cooperative-matrix tiles, largest first: 128x256 (8 subgroups of 64x64: 42 KiB of
/// workgroup memory, within NVIDIA's 48 KiB), 128x128 (8 subgroups of 64x32), 128x64 and 64x64
/// (4 subgroups of 64x32 and of 32x32). The launcher uses those the adapter's limits allow.
pub const COOP_TILES: [CoopTile; 4] = [
    CoopTile {
        warps_m: 2,
        warps_n: 4,
        frags_m: 4,
        frags_n: 4,
    },
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

/// Define-level description of one `matmul_coop` specialisation (A and B are always f16).
pub(super) struct CoopVariant {
    pub(super) tile: CoopTile,
    /// Invocations per subgroup the workgroup is sized for (the adapter's largest).
    pub(super) subgroup: u32,
    pub(super) c_dtype: DType,
    pub(super) a_trans: bool,
    pub(super) b_trans: bool,
    pub(super) bias_dtype: Option<DType>,
    pub(super) gelu: Option<(DType, bool)>,
    pub(super) accumulate: bool,
    /// Also the sums of A's rows (`ROW_SUMS`: the bias gradient of a weight gradient).
    pub(super) row_sums: bool,
    /// Plain-WGSL stand-ins for the cooperative-matrix operations (`EMULATE_COOP`).
    pub(super) emulate: bool,
    /// A (B) loaded in 16-byte packets (see `tiled::packets_fit`).
    pub(super) a_vec: bool,
    pub(super) b_vec: bool,
    /// Whole tiles stored with coopStoreT straight into C (`DIRECT_STORE`): nothing fused, no
    /// accumulation, f32 C with 16-byte aligned rows.
    pub(super) direct_store: bool,
}

impl CoopVariant {
    pub(super) fn specialise(&self) -> Specialisation {
        let t = self.tile;
        let epilogue = EpilogueValues::new(self.bias_dtype, self.gelu);
        let [e0, e1, e2, e3, e4, e5] = epilogue.values();
        COOP.with([
            &self.c_dtype,
            &flag(self.a_trans),
            &flag(self.b_trans),
            &t.warps_m,
            &t.warps_n,
            &t.frags_m,
            &t.frags_n,
            &self.subgroup,
            &flag(self.accumulate),
            &flag(self.row_sums),
            &flag(self.a_vec),
            &flag(self.b_vec),
            &flag(self.direct_store),
            &self.emulate.then_some("1"),
            e0,
            e1,
            e2,
            e3,
            e4,
            e5,
        ])
    }
}

/// Every `matmul_coop` specialisation: each tile, output dtype and epilogue for subgroups of
/// 32 (NVIDIA), the plain products for the other subgroup sizes the launcher accepts, and the
/// emulated kernel.
pub(super) fn shader_variants() -> Vec<Specialisation> {
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
                    row_sums: false,
                    emulate: false,
                    a_vec: false,
                    b_vec: false,
                    direct_store: false,
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
                // matmul_backward_weight, with and without the bias gradient.
                for row_sums in [false, true] {
                    variants.push(CoopVariant {
                        a_trans: true,
                        row_sums,
                        ..base
                    });
                }
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
                    row_sums: false,
                    emulate: false,
                    a_vec: false,
                    b_vec: false,
                    direct_store: false,
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
    // Each with every combination of packet and element loads, and the plain f32 products with
    // the direct store too.
    let plain = |v: &CoopVariant| {
        v.bias_dtype.is_none() && v.gelu.is_none() && !v.accumulate && v.c_dtype == DType::F32
    };
    variants
        .iter()
        .flat_map(|v| {
            let stores: &[bool] = if plain(v) { &[false, true] } else { &[false] };
            stores.iter().flat_map(move |&direct_store| {
                [(false, false), (false, true), (true, false), (true, true)].map(
                    |(a_vec, b_vec)| CoopVariant {
                        a_vec,
                        b_vec,
                        direct_store,
                        ..*v
                    },
                )
            })
        })
        .map(|v| v.specialise())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!((COOP_TILES[0].bm(), COOP_TILES[0].bn()), (128, 256));
        assert_eq!((COOP_TILES[1].bm(), COOP_TILES[1].bn()), (128, 128));
        assert_eq!(COOP_TILES[3].bm(), 64);
    }
}
