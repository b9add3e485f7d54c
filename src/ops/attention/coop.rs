//! Flash attention on cooperative matrices (`shaders/attention_coop.wgsl`): f16 q, k, v and
//! probabilities on 16x16x16 tensor-core products with f32 sums, for head sizes that are
//! multiples of 16. The same problem, tensors and scratch as the flash launchers in the parent
//! module; the backward is FlashAttention-2's: D (the flash preprocess), then one pass per query
//! block for dQ and one per key block for dK and dV, both recomputing P from the saved lse, with
//! no atomics (deterministic).
//!
//! [`CoopAttention::emulate`] swaps the cooperative-matrix operations for plain-WGSL stand-ins
//! (as `MatmulKernel::CoopEmulated` does for the matmul), so that the kernels can be checked on
//! adapters without cooperative matrices; never chosen for training.

use super::{check_distinct, check_f32_tensor, check_tensor, flash_params, Dims, FAMILY};
use crate::defines;
use crate::error::{Error, Result};
use crate::gpu::{Bind, DType, Dispatch, DispatchDesc, Gpu, Tensor};
use crate::ops::check_u32_range;
use crate::ops::matmul::coop_subgroup_size;

const SHADER: &str = "attention_coop";

/// (warps, BN): the outer block of a workgroup is 16 rows per warp (queries in the forward and
/// dQ kernels, keys in the dK/dV kernel), the inner block BN rows. Largest first; the launcher
/// takes the first that fits the adapter (at head size 64 on 48 KiB: 2 warps and BN = 32).
pub const COOP_ATTENTION_TILES: [(u32, u32); 4] = [(4, 32), (2, 32), (2, 16), (1, 16)];

/// One configuration of the cooperative-matrix attention kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CoopAttention {
    /// Subgroups per workgroup, 16 outer rows each.
    pub warps: u32,
    /// Rows of the inner block (multiple of 16).
    pub bn: u32,
    /// Plain-WGSL stand-ins for the cooperative-matrix operations (`EMULATE_COOP`).
    pub emulate: bool,
}

impl CoopAttention {
    /// Outer rows per workgroup.
    pub const fn rows(self) -> u32 {
        16 * self.warps
    }

    /// f32 row stride of a warp's slot: S and dP side by side, or 16 x hs outputs.
    fn slot_stride(self, hs: u32) -> u32 {
        (2 * self.bn + 4).max(hs) + 4
    }

    /// Workgroup memory of the largest of the three kernels at head size `hs`: f16 tiles with
    /// rows padded by 8, one f32 slot per warp plus a spare, and per-row f32 state.
    pub fn workgroup_bytes(self, hs: u32) -> u64 {
        let (rows, bn, hs64) = (self.rows() as u64, self.bn as u64, hs as u64);
        let slots = self.warps as u64 + 1;
        let (sh, sp) = (hs64 + 8, bn + 8);
        let f = slots * 16 * self.slot_stride(hs) as u64;
        let fwd = 2 * (rows * sh + 2 * bn * sh + slots * 16 * sp) + 4 * (f + 3 * slots * 16);
        let dq = 2 * (2 * rows * sh + 2 * bn * sh + slots * 16 * sp) + 4 * (f + 2 * rows);
        let dkdv = 2 * (2 * rows * sh + 2 * bn * sh + 2 * slots * 16 * sp) + 4 * (f + 2 * bn);
        fwd.max(dq).max(dkdv)
    }

    /// Whether the kernels are written for head size `hs`.
    pub fn supports_head_size(hs: usize) -> bool {
        hs > 0 && hs.is_multiple_of(16) && hs <= super::MAX_HEAD_SIZE
    }

    /// The largest configuration that runs on `gpu` at head size `hs` (emulated or not), or why
    /// none does.
    pub fn choose(gpu: &Gpu, hs: usize, emulate: bool) -> std::result::Result<Self, String> {
        if !Self::supports_head_size(hs) {
            return Err(format!(
                "head size {hs} is not a multiple of 16 up to {}",
                super::MAX_HEAD_SIZE
            ));
        }
        let subgroup = coop_subgroup_size(gpu, emulate)?;
        COOP_ATTENTION_TILES
            .iter()
            .map(|&(warps, bn)| CoopAttention { warps, bn, emulate })
            .find(|c| c.fits(gpu, hs, subgroup))
            .ok_or_else(|| {
                format!(
                    "no cooperative-matrix attention tile fits adapter '{}' at head size {hs}",
                    gpu.info.name
                )
            })
    }

    fn fits(self, gpu: &Gpu, hs: usize, subgroup: u32) -> bool {
        let threads = self.warps * subgroup;
        self.workgroup_bytes(hs as u32) <= gpu.limits.max_compute_workgroup_storage_size as u64
            && threads <= gpu.limits.max_compute_invocations_per_workgroup
            && threads <= gpu.limits.max_compute_workgroup_size_x
    }

    /// Checks the configuration, the adapter and the shapes; returns the subgroup size.
    fn check(self, gpu: &Gpu, op: &'static str, d: &Dims, qkv: &Tensor) -> Result<u32> {
        if !COOP_ATTENTION_TILES.contains(&(self.warps, self.bn)) {
            return Err(Error::shape(
                op,
                format!("unsupported tile {self:?}; (warps, BN) one of {COOP_ATTENTION_TILES:?}"),
            ));
        }
        if !Self::supports_head_size(d.hs) {
            return Err(Error::shape(
                op,
                format!("head size {} is not a multiple of 16", d.hs),
            ));
        }
        if qkv.dtype != DType::F16 {
            return Err(Error::shape(
                op,
                format!("qkv must be f16, got {}", qkv.dtype.name()),
            ));
        }
        let subgroup = coop_subgroup_size(gpu, self.emulate).map_err(|w| Error::shape(op, w))?;
        if !self.fits(gpu, d.hs, subgroup) {
            return Err(Error::shape(
                op,
                format!(
                    "{self:?} needs {} invocations and {} bytes of workgroup memory at head size \
                     {}, the adapter offers {} and {}",
                    self.warps * subgroup,
                    self.workgroup_bytes(d.hs as u32),
                    d.hs,
                    gpu.limits.max_compute_invocations_per_workgroup,
                    gpu.limits.max_compute_workgroup_storage_size
                ),
            ));
        }
        Ok(subgroup)
    }

    fn defines(self, gate: &str, hs: usize, subgroup: u32) -> Vec<(String, String)> {
        let mut d = defines![
            (gate, 1),
            ("HS", hs),
            ("WARPS", self.warps),
            ("BN", self.bn),
            ("SG", subgroup),
            ("SF", self.slot_stride(hs as u32)),
            ("H_T", "f16"),
            ("QKV_T", "f16"),
        ];
        if self.emulate {
            d.extend(defines![("EMULATE_COOP", 1)]);
        }
        d
    }
}

/// Flash attention forward on cooperative matrices: `out` (B, T, C) and `lse` (B, NH, T) f32
/// from f16 `qkv` (B, T, 3C), as [`super::flash_attention_forward`]. One dispatch.
#[allow(clippy::too_many_arguments)]
pub fn coop_attention_forward(
    gpu: &Gpu,
    cfg: CoopAttention,
    out: &Tensor,
    lse: &Tensor,
    qkv: &Tensor,
    b: usize,
    t: usize,
    nh: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "coop_attention_forward";
    let d = Dims::new(gpu, OP, qkv, b, t, nh)?;
    let subgroup = cfg.check(gpu, OP, &d, qkv)?;
    check_tensor(gpu, OP, "out", out, d.bt() * d.c)?;
    check_f32_tensor(OP, "lse", lse, d.bht())?;
    check_distinct(OP, &[("out", out), ("lse", lse)], &[("qkv", qkv)])?;
    let n_blocks = d.t.div_ceil(cfg.rows() as usize);
    let n_work = check_u32_range(OP, "workgroups", n_blocks * d.b * d.nh)?;
    let params = gpu.uniform(OP, &flash_params(&d, n_blocks, n_work));
    let mut defs = cfg.defines("FORWARD", d.hs, subgroup);
    defs.extend(defines![("OUT_T", out.dtype.wgsl())]);
    let dispatch = gpu.dispatch(DispatchDesc {
        shader: SHADER,
        entry: "attention_coop_forward",
        defines: defs,
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(qkv),
            Bind::Write(out),
            Bind::Write(lse),
        ],
        workgroups: gpu.grid(n_work),
        label: OP.to_string(),
        family: FAMILY,
    })?;
    Ok(vec![dispatch])
}

/// Flash attention backward on cooperative matrices, as [`super::flash_attention_backward`]
/// (f16 `qkv`): D into `d_scratch`, then dQ (one workgroup per query block) and dK, dV (one per
/// key block). Three dispatches; deterministic.
#[allow(clippy::too_many_arguments)]
pub fn coop_attention_backward(
    gpu: &Gpu,
    cfg: CoopAttention,
    dqkv: &Tensor,
    dout: &Tensor,
    qkv: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_scratch: &Tensor,
    b: usize,
    t: usize,
    nh: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "coop_attention_backward";
    let d = Dims::new(gpu, OP, qkv, b, t, nh)?;
    let subgroup = cfg.check(gpu, OP, &d, qkv)?;
    check_tensor(gpu, OP, "dqkv", dqkv, d.bt() * 3 * d.c)?;
    check_tensor(gpu, OP, "dout", dout, d.bt() * d.c)?;
    check_tensor(gpu, OP, "out", out, d.bt() * d.c)?;
    check_f32_tensor(OP, "lse", lse, d.bht())?;
    check_f32_tensor(OP, "d_scratch", d_scratch, d.bht())?;
    check_distinct(
        OP,
        &[("d_scratch", d_scratch)],
        &[("dout", dout), ("out", out)],
    )?;
    check_distinct(
        OP,
        &[("dqkv", dqkv)],
        &[
            ("qkv", qkv),
            ("dout", dout),
            ("lse", lse),
            ("d_scratch", d_scratch),
        ],
    )?;
    let preprocess = super::flash_preprocess(gpu, OP, &d, dout, out, d_scratch)?;
    let n_blocks = d.t.div_ceil(cfg.rows() as usize);
    let work = check_u32_range(OP, "workgroups", n_blocks * d.b * d.nh)?;
    let pass = |entry: &'static str, gate: &str, what: &str| {
        let params = gpu.uniform(OP, &flash_params(&d, n_blocks, work));
        let mut defs = cfg.defines(gate, d.hs, subgroup);
        defs.extend(defines![
            ("DOUT_T", dout.dtype.wgsl()),
            ("DQKV_T", dqkv.dtype.wgsl()),
        ]);
        gpu.dispatch(DispatchDesc {
            shader: SHADER,
            entry,
            defines: defs,
            bindings: &[
                Bind::Uniform(&params),
                Bind::Read(qkv),
                Bind::Read(dout),
                Bind::Read(lse),
                Bind::Read(d_scratch),
                Bind::Write(dqkv),
            ],
            workgroups: gpu.grid(work),
            label: format!("{OP}.{what}"),
            family: FAMILY,
        })
    };
    let dq = pass("attention_coop_backward_dq", "BACKWARD_DQ", "dq")?;
    let dkdv = pass("attention_coop_backward_dkdv", "BACKWARD_DKDV", "dkdv")?;
    Ok(vec![preprocess, dq, dkdv])
}

/// Every specialisation: each tile at every head size the kernels take, for subgroups of 32
/// (NVIDIA) with every storage type of out, dout and dqkv at head sizes 64 and 128, f16 at the
/// others and at subgroups of 8, 16 and 64; the emulated kernel for subgroups of 8 and 32.
pub(crate) fn shader_variants() -> Vec<crate::ops::ShaderVariant> {
    let types = [DType::F32, DType::F16];
    let mut v = Vec::new();
    for emulate in [false, true] {
        let subgroups: &[u32] = if emulate { &[8, 32] } else { &[8, 16, 32, 64] };
        for &subgroup in subgroups {
            for hs in (16..=super::MAX_HEAD_SIZE).step_by(16) {
                let all_types = subgroup == 32 && (hs == 64 || hs == 128);
                let tys: &[DType] = if all_types { &types } else { &[DType::F16] };
                for (warps, bn) in COOP_ATTENTION_TILES {
                    let cfg = CoopAttention { warps, bn, emulate };
                    for &ty in tys {
                        let mut f = cfg.defines("FORWARD", hs, subgroup);
                        f.extend(defines![("OUT_T", ty.wgsl())]);
                        v.push(f);
                        for &ty2 in tys {
                            for gate in ["BACKWARD_DQ", "BACKWARD_DKDV"] {
                                let mut g = cfg.defines(gate, hs, subgroup);
                                g.extend(defines![("DOUT_T", ty.wgsl()), ("DQKV_T", ty2.wgsl())]);
                                v.push(g);
                            }
                        }
                    }
                }
            }
        }
    }
    v.into_iter()
        .map(|defines| crate::ops::ShaderVariant {
            shader: SHADER,
            defines,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_size_64_fits_nvidia_workgroup_memory() {
        let fits = |hs: u32| {
            COOP_ATTENTION_TILES
                .iter()
                .map(|&(warps, bn)| CoopAttention {
                    warps,
                    bn,
                    emulate: false,
                })
                .find(|c| c.workgroup_bytes(hs) <= 48 * 1024)
        };
        assert_eq!(fits(64).map(|c| (c.warps, c.bn)), Some((2, 32)));
        assert!(fits(128).is_some());
    }
}
