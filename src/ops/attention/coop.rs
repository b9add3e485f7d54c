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

use super::{flash_params, AttentionBackward, AttentionForward, Dims};
use crate::error::Result;
use crate::gpu::{Axis, Bind, DType, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};
use crate::ops::matmul::{coop_disabled_by_env, coop_subgroup_size, relative_difference};
use crate::ops::{Check, FLOATS};

const SHADER: &str = "attention_coop";

/// Values: [`CoopAttention::forward`]'s (the head size HS, the tile (WARPS, BN), the subgroup
/// size SG, the slot stride SF, EMULATE_COOP set for [`CoopAttention::emulate`]), then the
/// storage type of out.
const FORWARD: Kernel<7> = Kernel {
    shader: SHADER,
    entry: "attention_coop_forward",
    fixed: &[("FORWARD", "1"), ("H_T", "f16"), ("QKV_T", "f16")],
    axes: [
        Axis::computed("HS"),
        Axis::computed("WARPS"),
        Axis::computed("BN"),
        Axis::computed("SG"),
        Axis::computed("SF"),
        Axis::optional("EMULATE_COOP", &["1"]),
        Axis::new("OUT_T", FLOATS),
    ],
};

/// The axes of the two backward kernels: as [`FORWARD`]'s, then the storage types of dout and
/// dqkv (values from [`CoopAttention::backward`]).
const BACKWARD_AXES: [Axis; 8] = [
    Axis::computed("HS"),
    Axis::computed("WARPS"),
    Axis::computed("BN"),
    Axis::computed("SG"),
    Axis::computed("SF"),
    Axis::optional("EMULATE_COOP", &["1"]),
    Axis::new("DOUT_T", FLOATS),
    Axis::new("DQKV_T", FLOATS),
];

const BACKWARD_DQ: Kernel<8> = Kernel {
    shader: SHADER,
    entry: "attention_coop_backward_dq",
    fixed: &[("BACKWARD_DQ", "1"), ("H_T", "f16"), ("QKV_T", "f16")],
    axes: BACKWARD_AXES,
};

const BACKWARD_DKDV: Kernel<8> = Kernel {
    shader: SHADER,
    entry: "attention_coop_backward_dkdv",
    fixed: &[("BACKWARD_DKDV", "1"), ("H_T", "f16"), ("QKV_T", "f16")],
    axes: BACKWARD_AXES,
};

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
    fn check(self, check: &Check, d: &Dims, qkv: &Tensor) -> Result<u32> {
        let gpu = check.gpu();
        if !COOP_ATTENTION_TILES.contains(&(self.warps, self.bn)) {
            return Err(check.error(format!(
                "unsupported tile {self:?}; (warps, BN) one of {COOP_ATTENTION_TILES:?}"
            )));
        }
        if !Self::supports_head_size(d.hs) {
            return Err(check.error(format!("head size {} is not a multiple of 16", d.hs)));
        }
        if qkv.dtype != DType::F16 {
            return Err(check.error(format!("qkv must be f16, got {}", qkv.dtype.name())));
        }
        let subgroup = coop_subgroup_size(gpu, self.emulate).map_err(|w| check.error(w))?;
        if !self.fits(gpu, d.hs, subgroup) {
            return Err(check.error(format!(
                "{self:?} needs {} invocations and {} bytes of workgroup memory at head size \
                     {}, the adapter offers {} and {}",
                self.warps * subgroup,
                self.workgroup_bytes(d.hs as u32),
                d.hs,
                gpu.limits.max_compute_invocations_per_workgroup,
                gpu.limits.max_compute_workgroup_storage_size
            )));
        }
        Ok(subgroup)
    }

    /// The forward kernel for this configuration at head size `hs` with subgroups of
    /// `subgroup`, writing out as `out`.
    fn forward(self, hs: usize, subgroup: u32, out: DType) -> Specialisation {
        let emulate = self.emulate.then_some("1");
        let sf = self.slot_stride(hs as u32);
        FORWARD.with([&hs, &self.warps, &self.bn, &subgroup, &sf, &emulate, &out])
    }

    /// The backward kernel `kernel` ([`BACKWARD_DQ`] or [`BACKWARD_DKDV`]) for this
    /// configuration, reading dout as `dout` and writing dqkv as `dqkv`.
    fn backward(
        self,
        kernel: &Kernel<8>,
        hs: usize,
        subgroup: u32,
        (dout, dqkv): (DType, DType),
    ) -> Specialisation {
        let emulate = self.emulate.then_some("1");
        let sf = self.slot_stride(hs as u32);
        kernel.with([
            &hs,
            &self.warps,
            &self.bn,
            &subgroup,
            &sf,
            &emulate,
            &dout,
            &dqkv,
        ])
    }
}

/// Flash attention forward on cooperative matrices: `out` (B, T, C) and `lse` (B, NH, T) f32
/// from f16 `qkv` (B, T, 3C), as [`super::flash_attention_forward`]. One dispatch.
pub fn coop_attention_forward(
    gpu: &Gpu,
    cfg: CoopAttention,
    args: &AttentionForward<'_>,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "coop_attention_forward";
    let &AttentionForward {
        out,
        lse,
        qkv,
        b,
        t,
        nh,
    } = args;
    let check = Check::new(gpu, OP);
    let d = Dims::new(&check, qkv, b, t, nh)?;
    let subgroup = cfg.check(&check, &d, qkv)?;
    check.arg("out", out).float()?.len(d.bt() * d.c)?;
    check.arg("lse", lse).f32()?.len(d.bht())?;
    check.no_alias(&[("out", out), ("lse", lse)], &[("qkv", qkv)])?;
    let n_blocks = d.t.div_ceil(cfg.rows() as usize);
    let n_work = check.fits_u32("workgroups", n_blocks * d.b * d.nh)?;
    let params = gpu.uniform(&flash_params(&d, n_blocks, n_work));
    let dispatch = gpu.dispatch(DispatchDesc {
        kernel: cfg.forward(d.hs, subgroup, out.dtype),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(qkv),
            Bind::Write(out),
            Bind::Write(lse),
        ],
        workgroups: gpu.grid(n_work),
        label: OP.to_string(),
    })?;
    Ok(vec![dispatch])
}

/// Flash attention backward on cooperative matrices, as [`super::flash_attention_backward`]
/// (f16 `qkv`): D into `d_scratch`, then dQ (one workgroup per query block) and dK, dV (one per
/// key block). Three dispatches; deterministic.
pub fn coop_attention_backward(
    gpu: &Gpu,
    cfg: CoopAttention,
    args: &AttentionBackward<'_>,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "coop_attention_backward";
    let &AttentionBackward {
        dqkv,
        dout,
        qkv,
        out,
        lse,
        d_scratch,
        b,
        t,
        nh,
    } = args;
    let check = Check::new(gpu, OP);
    let d = Dims::new(&check, qkv, b, t, nh)?;
    let subgroup = cfg.check(&check, &d, qkv)?;
    super::check_flash_backward(&check, &d, args)?;
    let preprocess = super::flash_preprocess(&check, &d, dout, out, d_scratch)?;
    let n_blocks = d.t.div_ceil(cfg.rows() as usize);
    let work = check.fits_u32("workgroups", n_blocks * d.b * d.nh)?;
    let pass = |kernel: &Kernel<8>, what: &str| {
        let params = gpu.uniform(&flash_params(&d, n_blocks, work));
        gpu.dispatch(DispatchDesc {
            kernel: cfg.backward(kernel, d.hs, subgroup, (dout.dtype, dqkv.dtype)),
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
        })
    };
    let dq = pass(&BACKWARD_DQ, "dq")?;
    let dkdv = pass(&BACKWARD_DKDV, "dkdv")?;
    Ok(vec![preprocess, dq, dkdv])
}

/// Every specialisation: each tile at every head size the kernels take, for subgroups of 32
/// (NVIDIA) with every storage type of out, dout and dqkv at head sizes 64 and 128, f16 at the
/// others and at subgroups of 8, 16 and 64; the emulated kernel for subgroups of 8 and 32.
pub(crate) fn shader_variants() -> Vec<Specialisation> {
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
                        v.push(cfg.forward(hs, subgroup, ty));
                        for &ty2 in tys {
                            for kernel in [&BACKWARD_DQ, &BACKWARD_DKDV] {
                                v.push(cfg.backward(kernel, hs, subgroup, (ty, ty2)));
                            }
                        }
                    }
                }
            }
        }
    }
    v
}

/// Whether f16 attention on `gpu` runs on cooperative matrices: `Ok`, or `Err` saying why not
/// (`WGPT_NO_COOPMAT` set, no 16x16 f16 cooperative matrices, or a failed self-check). Decided
/// once per [`Gpu`], the first time it is asked, by the rule of the matmul's
/// `coop_matmul_status`: the self-check ([`agreement_with_flash`]) runs forward and backward at a
/// ragged shape through the cooperative-matrix kernels and through the flash kernels; a relative
/// difference above the bound of its output ([`SELF_CHECK_LSE_TOLERANCE`],
/// [`SELF_CHECK_OUT_TOLERANCE`], [`SELF_CHECK_DQKV_TOLERANCE`]), a NaN or an error turns them off
/// for this device, with one line on stderr saying why.
pub fn coop_attention_status(gpu: &Gpu) -> std::result::Result<(), String> {
    gpu.coop_attention
        .get_or_init(|| {
            if coop_disabled_by_env(std::env::var_os("WGPT_NO_COOPMAT").as_deref()) {
                return Err("WGPT_NO_COOPMAT is set".into());
            }
            let cfg = CoopAttention::choose(gpu, SELF_CHECK_SHAPE.2 / SELF_CHECK_SHAPE.3, false)?;
            if let Err(why) = agreement_with_flash(gpu, cfg) {
                eprintln!(
                    "wgpt: cooperative-matrix attention disabled on '{}': {why}; f16 attention \
                     uses the flash kernels",
                    gpu.info.name
                );
                return Err(why);
            }
            Ok(())
        })
        .clone()
}

/// The cooperative-matrix configuration for attention with `qkv` of `dtype` at head size `hs`,
/// when the kernels may run it: f16 qkv, a head size they take, a passed self-check
/// ([`coop_attention_status`]) and a tile that fits. `None` means the flash kernels.
pub fn auto_coop_attention(gpu: &Gpu, hs: usize, dtype: DType) -> Option<CoopAttention> {
    if dtype != DType::F16 || !CoopAttention::supports_head_size(hs) {
        return None;
    }
    coop_attention_status(gpu).ok()?;
    CoopAttention::choose(gpu, hs, false).ok()
}

/// (B, T, C, NH) of the self-check: head size 64, T above every outer and inner block and a
/// multiple of none, two heads and two batch rows.
const SELF_CHECK_SHAPE: (usize, usize, usize, usize) = (2, 77, 128, 2);

/// The self-check's bounds on the relative difference (max-norm) of each output from the flash
/// kernels', which compute in f32 throughout. The cooperative-matrix kernels round the same f16
/// inputs, P and dS to f16 for their second products (2^-11 relative each) and sum in f32. lse
/// (f32) sees no f16 rounding after the scores: q k^T summed in f16 (a driver whose cooperative
/// matrices accumulate in f16) moves it by some 5e-4 relative, five times its bound.
const SELF_CHECK_LSE_TOLERANCE: f32 = 1e-4;
/// out (f16): P rounded to f16 for P V, and the output's own rounding.
const SELF_CHECK_OUT_TOLERANCE: f32 = 2e-3;
/// dqkv: P and dS rounded to f16 for the products that make dq, dk and dv.
const SELF_CHECK_DQKV_TOLERANCE: f32 = 3e-3;

/// Runs forward and backward on seeded f16 inputs at (B, T, C, NH) = (2, 77, 128, 2) through
/// `cfg` and through the flash kernels, outputs poisoned with NaN first, and returns the largest
/// relative difference (max-norm) of out, lse and dqkv; `Err` says which disagreed by more than
/// its bound ([`SELF_CHECK_OUT_TOLERANCE`], [`SELF_CHECK_LSE_TOLERANCE`],
/// [`SELF_CHECK_DQKV_TOLERANCE`]), left an element unwritten, or failed to run.
pub fn agreement_with_flash(gpu: &Gpu, cfg: CoopAttention) -> std::result::Result<f32, String> {
    let (b, t, c, nh) = SELF_CHECK_SHAPE;
    let f16 = DType::F16;
    let run = || -> Result<[(Vec<f32>, Vec<f32>); 3]> {
        let mut rng = crate::rng::Rng::new(0xa77e_c4ec);
        let qkv = gpu.upload(
            "self-check qkv",
            &rng.vec_uniform(b * t * 3 * c, -2.0, 2.0),
            &[b, t, 3 * c],
            f16,
        )?;
        let dout = gpu.upload(
            "self-check dout",
            &rng.vec_uniform(b * t * c, -1.0, 1.0),
            &[b, t, c],
            f16,
        )?;
        let mut outs = Vec::new();
        for coop in [false, true] {
            let out = gpu.zeros("self-check out", &[b, t, c], f16)?;
            let lse = gpu.zeros("self-check lse", &[b, nh, t], DType::F32)?;
            let dqkv = gpu.zeros("self-check dqkv", &[b, t, 3 * c], DType::F32)?;
            let dd = gpu.zeros("self-check D", &[b, nh, t], DType::F32)?;
            for x in [&out, &lse, &dqkv, &dd] {
                gpu.poison(x)?;
            }
            let mut d = if coop {
                coop_attention_forward(
                    gpu,
                    cfg,
                    &AttentionForward {
                        out: &out,
                        lse: &lse,
                        qkv: &qkv,
                        b,
                        t,
                        nh,
                    },
                )?
            } else {
                super::flash_attention_forward(gpu, &out, &lse, &qkv, b, t, nh)?
            };
            d.extend(if coop {
                coop_attention_backward(
                    gpu,
                    cfg,
                    &AttentionBackward {
                        dqkv: &dqkv,
                        dout: &dout,
                        qkv: &qkv,
                        out: &out,
                        lse: &lse,
                        d_scratch: &dd,
                        b,
                        t,
                        nh,
                    },
                )?
            } else {
                super::flash_attention_backward(
                    gpu,
                    &super::AttentionBackward {
                        dqkv: &dqkv,
                        dout: &dout,
                        qkv: &qkv,
                        out: &out,
                        lse: &lse,
                        d_scratch: &dd,
                        b,
                        t,
                        nh,
                    },
                )?
            });
            let refs: Vec<&Dispatch> = d.iter().collect();
            gpu.run(&refs)?;
            outs.push([gpu.read(&out)?, gpu.read(&lse)?, gpu.read(&dqkv)?]);
        }
        let [o0, l0, g0] = outs.remove(0);
        let [o1, l1, g1] = outs.remove(0);
        Ok([(o1, o0), (l1, l0), (g1, g0)])
    };
    let what = format!("attention (B, T, C, NH) = {SELF_CHECK_SHAPE:?} on {cfg:?}");
    let results = run().map_err(|e| format!("{what} failed: {e}"))?;
    let mut worst = 0f32;
    let bounds = [
        ("out", SELF_CHECK_OUT_TOLERANCE),
        ("lse", SELF_CHECK_LSE_TOLERANCE),
        ("dqkv", SELF_CHECK_DQKV_TOLERANCE),
    ];
    for ((got, want), (name, tol)) in results.iter().zip(bounds) {
        let err = relative_difference(got, want).map_err(|e| format!("{what}, {name}: {e}"))?;
        if err.is_nan() || err > tol {
            return Err(format!(
                "{what}: {name} differs from the flash kernels by {err:.3e} (relative, max-norm; \
                 allowed {tol:.0e})"
            ));
        }
        worst = worst.max(err);
    }
    Ok(worst)
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
