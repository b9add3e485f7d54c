//! Launchers for causal self-attention in the GPT-2 layout: flash attention
//! (`shaders/attention_flash.wgsl`; on cooperative matrices `shaders/attention_coop.wgsl`, see
//! [`coop_attention_forward`]) and the naive path that materialises the score matrix
//! (`shaders/attention_naive.wgsl`).
//!
//! Layout (as in GPT-2 / llm.c): `qkv` (B, T, 3C) is the `c_attn` output, q = channels [0, C),
//! k = [C, 2C), v = [2C, 3C); head h uses channels h*hs .. (h+1)*hs of each, hs = C / NH. The
//! output `out` (B, T, C) keeps the heads in that channel layout, ready for `c_proj`. Scores are
//! scaled by 1/sqrt(hs) and causal (key j visible to query i when j <= i).
//!
//! Storage types: `qkv`, `out`, `dout` and `dqkv` are each f32 or f16 (f16 needs SHADER_F16);
//! `lse`, the backward scratch and the naive score matrices are always f32, and all arithmetic is
//! f32. Every launcher overwrites its outputs (no accumulation) and writes every element.
//!
//! Dispatches: flash forward 1, flash backward 2 (dQ and D, dK/dV; on cooperative matrices 3: D,
//! dQ, dK/dV), naive forward 3 (scores, softmax, values), naive backward 4 (dP, softmax backward,
//! dQ, dK/dV). Record them in order.
//!
//! Scratch tensors:
//! - flash forward: `lse` (B, NH, T) f32, 4*B*NH*T bytes: kept for the backward pass.
//! - flash backward: `d_scratch` (B, NH, T) f32, 4*B*NH*T bytes: D = rowsum(P * dP) (on
//!   cooperative matrices rowsum(dout * out), FlashAttention-2's).
//! - naive forward: `att` (B, NH, T, T) f32, 4*B*NH*T^2 bytes: the probabilities, kept for the
//!   backward pass (4 MiB per (b, h) at T=1024: 768 MiB for GPT-2's B=16, NH=12).
//! - naive backward: `datt_scratch` (B, NH, T, T) f32, the same size again.

mod coop;

pub use coop::{
    agreement_with_flash, auto_coop_attention, coop_attention_backward, coop_attention_forward,
    coop_attention_status, CoopAttention, COOP_ATTENTION_TILES,
};

use super::{Check, FLOATS};
use crate::error::{Error, Result};
use crate::gpu::{Axis, Bind, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};

/// The largest head size the kernels accept.
pub const MAX_HEAD_SIZE: usize = 128;

const FLASH: &str = "attention_flash";
const NAIVE: &str = "attention_naive";

/// Values: the storage types of qkv and out; the head size HS, [`dims_group`]`(HS)` and the
/// tiles (BR, BC).
const FLASH_FORWARD: Kernel<6> = Kernel {
    shader: FLASH,
    entry: "flash_attention_forward",
    fixed: &[("FORWARD", "1")],
    axes: [
        Axis::new("QKV_T", FLOATS),
        Axis::new("OUT_T", FLOATS),
        Axis::computed("HS"),
        Axis::computed("DG"),
        Axis::computed("BR"),
        Axis::computed("BC"),
    ],
};

/// The axes of the two flash backward kernels. Values: the storage types of qkv, dout and dqkv;
/// the head size HS, [`dims_group`]`(HS)` and the tiles (BQ, BK).
const FLASH_BACKWARD_AXES: [Axis; 7] = [
    Axis::new("QKV_T", FLOATS),
    Axis::new("DOUT_T", FLOATS),
    Axis::new("DQKV_T", FLOATS),
    Axis::computed("HS"),
    Axis::computed("DG"),
    Axis::computed("BQ"),
    Axis::computed("BK"),
];

const FLASH_BACKWARD_DQ: Kernel<7> = Kernel {
    shader: FLASH,
    entry: "flash_attention_backward_dq",
    fixed: &[("BACKWARD_DQ", "1")],
    axes: FLASH_BACKWARD_AXES,
};

const FLASH_BACKWARD_DKDV: Kernel<7> = Kernel {
    shader: FLASH,
    entry: "flash_attention_backward_dkdv",
    fixed: &[("BACKWARD_DKDV", "1")],
    axes: FLASH_BACKWARD_AXES,
};

/// Values: the storage types of dout and out.
const FLASH_PREPROCESS: Kernel<2> = Kernel {
    shader: FLASH,
    entry: "flash_attention_backward_preprocess",
    fixed: &[("BACKWARD_PREPROCESS", "1")],
    axes: [Axis::new("DOUT_T", FLOATS), Axis::new("OUT_T", FLOATS)],
};

/// Value: qkv's storage type.
const NAIVE_SCORES: Kernel<1> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_scores",
    fixed: &[("SCORES", "1")],
    axes: [Axis::new("QKV_T", FLOATS)],
};

const NAIVE_SOFTMAX: Kernel<0> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_softmax",
    fixed: &[("SOFTMAX", "1")],
    axes: [],
};

/// Values: the storage types of qkv and out.
const NAIVE_VALUES: Kernel<2> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_values",
    fixed: &[("VALUES", "1")],
    axes: [Axis::new("QKV_T", FLOATS), Axis::new("OUT_T", FLOATS)],
};

/// Values: the storage types of dout and qkv.
const NAIVE_DSCORES: Kernel<2> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_dscores",
    fixed: &[("DSCORES", "1")],
    axes: [Axis::new("DOUT_T", FLOATS), Axis::new("QKV_T", FLOATS)],
};

const NAIVE_SOFTMAX_BACKWARD: Kernel<0> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_softmax_backward",
    fixed: &[("SOFTMAX_BACKWARD", "1")],
    axes: [],
};

/// Values: the storage types of qkv and dqkv.
const NAIVE_DQ: Kernel<2> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_dq",
    fixed: &[("DQ", "1")],
    axes: [Axis::new("QKV_T", FLOATS), Axis::new("DQKV_T", FLOATS)],
};

/// Values: the storage types of qkv, dout and dqkv.
const NAIVE_DKDV: Kernel<3> = Kernel {
    shader: NAIVE,
    entry: "naive_attention_dkdv",
    fixed: &[("DKDV", "1")],
    axes: [
        Axis::new("QKV_T", FLOATS),
        Axis::new("DOUT_T", FLOATS),
        Axis::new("DQKV_T", FLOATS),
    ],
};

/// Uniform block `Params` of `shaders/attention_flash.wgsl` and `shaders/attention_coop.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct FlashParams {
    b: u32,
    t: u32,
    nh: u32,
    c: u32,
    n_blocks: u32,
    n_work: u32,
    scale: f32,
    _pad: u32,
}

/// Uniform block `Params` of `shaders/attention_naive.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NaiveParams {
    b: u32,
    t: u32,
    nh: u32,
    c: u32,
    hs: u32,
    n_work: u32,
    scale: f32,
    n_tiles: u32,
}

/// FLOPs of the causal attention forward pass (q k^T and P v over the visible half of the score
/// matrix, 2 per multiply-add): 4 * B * NH * hs * T(T+1)/2. For profiles.
pub fn attention_flops(b: usize, t: usize, nh: usize, hs: usize) -> u64 {
    4 * (b * nh * hs) as u64 * (t as u64 * (t as u64 + 1) / 2)
}

/// FLOPs of the backward pass counted the same way: four products (dP, dV, dQ, dK), twice the
/// forward. The flash kernels do three products more (q k^T in both of their kernels and
/// dout v^T again in the dQ kernel), which this count of useful work leaves out.
pub fn attention_backward_flops(b: usize, t: usize, nh: usize, hs: usize) -> u64 {
    2 * attention_flops(b, t, nh, hs)
}

/// The problem size, validated.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    nh: usize,
    c: usize,
    hs: usize,
}

impl Dims {
    /// Derives C from `qkv` (B*T*3C elements) and checks everything that does not depend on the
    /// other tensors.
    fn new(check: &Check, qkv: &Tensor, b: usize, t: usize, nh: usize) -> Result<Dims> {
        if b == 0 || t == 0 || nh == 0 {
            return Err(check.error(format!("B={b}, T={t} and NH={nh} must all be positive")));
        }
        check.arg("qkv", qkv).float()?;
        let rows = b * t * 3;
        if qkv.is_empty() || !qkv.len().is_multiple_of(rows) {
            return Err(check.error(format!(
                "qkv has {} elements (shape {:?}), not B*T*3C for B={b}, T={t}",
                qkv.len(),
                qkv.shape
            )));
        }
        let c = qkv.len() / rows;
        if !c.is_multiple_of(nh) {
            return Err(check.error(format!("C={c} is not divisible by NH={nh}")));
        }
        let hs = c / nh;
        if hs > MAX_HEAD_SIZE {
            return Err(check.error(format!(
                "head size C/NH = {hs} is above the supported {MAX_HEAD_SIZE}; use more heads"
            )));
        }
        check.fits_u32("B*T*3C", qkv.len())?;
        Ok(Dims { b, t, nh, c, hs })
    }

    fn scale(&self) -> f32 {
        (1.0 / (self.hs as f64).sqrt()) as f32
    }

    fn bt(&self) -> usize {
        self.b * self.t
    }

    fn bht(&self) -> usize {
        self.b * self.nh * self.t
    }
}

/// The accumulate layout's number of threads across the head dimension: the largest power of
/// two up to 16 that divides hs, so that no thread idles on a partial column group.
fn dims_group(hs: usize) -> u32 {
    let mut g = 16;
    while !hs.is_multiple_of(g) {
        g /= 2;
    }
    g as u32
}

// ---- flash attention ---------------------------------------------------------------------------

/// Tile sizes of the flash kernels. Multiples of 16 (the score layout is a 16 x 16 thread grid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashTiles {
    /// Forward: query rows per workgroup.
    pub br: u32,
    /// Forward: keys per inner block.
    pub bc: u32,
    /// Backward: query rows per block (dQ: per workgroup; dK/dV: per inner block).
    pub bq: u32,
    /// Backward: keys per block (dK/dV: per workgroup; dQ: per inner block).
    pub bk: u32,
}

/// Forward (BR, BC) in order of preference: the most query rows per workgroup first (fewer
/// reloads of K and V), then the longest key blocks (fewer barriers).
const FORWARD_TILES: [(u32, u32); 5] = [(64, 32), (64, 16), (32, 32), (32, 16), (16, 16)];
/// Backward (BQ, BK) in order of preference.
const BACKWARD_TILES: [(u32, u32); 4] = [(32, 32), (16, 32), (32, 16), (16, 16)];

impl FlashTiles {
    /// Workgroup memory of the forward kernel: Q and K blocks padded to hs+1 floats a row, the V
    /// block, the score block (rows padded to BC+1) and one float per row.
    pub fn forward_bytes(br: u32, bc: u32, hs: u32) -> u64 {
        let (br, bc, hs) = (br as u64, bc as u64, hs as u64);
        4 * (br * (hs + 1) + bc * (hs + 1) + bc * hs + br * (bc + 1) + br)
    }

    /// Workgroup memory of the larger backward kernel (dK/dV): K, V, Q and dout blocks padded to
    /// hs+1 floats a row, P and dS blocks (rows padded to BK+1), lse and D per query row.
    pub fn backward_bytes(bq: u32, bk: u32, hs: u32) -> u64 {
        let (bq, bk, hs) = (bq as u64, bk as u64, hs as u64);
        4 * (2 * bk * (hs + 1) + 2 * bq * (hs + 1) + 2 * bq * (bk + 1) + 2 * bq)
    }

    /// The preferred tiles that fit `limit` bytes of workgroup memory at head size `hs`.
    pub fn for_limit(limit: u32, hs: usize) -> Option<FlashTiles> {
        let hs = hs as u32;
        let (br, bc) = *FORWARD_TILES
            .iter()
            .find(|&&(r, c)| Self::forward_bytes(r, c, hs) <= limit as u64)?;
        let (bq, bk) = *BACKWARD_TILES
            .iter()
            .find(|&&(q, k)| Self::backward_bytes(q, k, hs) <= limit as u64)?;
        Some(FlashTiles { br, bc, bq, bk })
    }

    /// Every tile choice the launchers accept that fits `limit` bytes at head size `hs`.
    pub fn all_for_limit(limit: u32, hs: usize) -> Vec<FlashTiles> {
        let hs32 = hs as u32;
        let mut v = Vec::new();
        for &(br, bc) in &FORWARD_TILES {
            for &(bq, bk) in &BACKWARD_TILES {
                if Self::forward_bytes(br, bc, hs32) <= limit as u64
                    && Self::backward_bytes(bq, bk, hs32) <= limit as u64
                {
                    v.push(FlashTiles { br, bc, bq, bk });
                }
            }
        }
        v
    }

    /// The tiles for this adapter's workgroup memory at head size `hs`.
    pub fn choose(gpu: &Gpu, hs: usize) -> Result<FlashTiles> {
        let limit = gpu.limits.max_compute_workgroup_storage_size;
        Self::for_limit(limit, hs).ok_or_else(|| Error::Limit {
            what: format!("flash attention at head size {hs}"),
            needed: format!(
                "{} bytes of workgroup memory",
                Self::forward_bytes(16, 16, hs as u32).max(Self::backward_bytes(16, 16, hs as u32))
            ),
            available: format!("{limit} bytes"),
            adapter: gpu.info.name.clone(),
            hint: "use a smaller head size (more heads) or the naive attention path".into(),
        })
    }

    fn check(&self, check: &Check, hs: usize) -> Result<()> {
        let gpu = check.gpu();
        if !FORWARD_TILES.contains(&(self.br, self.bc))
            || !BACKWARD_TILES.contains(&(self.bq, self.bk))
        {
            return Err(check.error(format!("unsupported tiles {self:?}; forward (BR, BC) one of {FORWARD_TILES:?}, backward (BQ, BK) one of {BACKWARD_TILES:?}"),
            ));
        }
        let limit = gpu.limits.max_compute_workgroup_storage_size as u64;
        let need = Self::forward_bytes(self.br, self.bc, hs as u32)
            .max(Self::backward_bytes(self.bq, self.bk, hs as u32));
        if need > limit {
            return Err(Error::Limit {
                what: format!("{} with tiles {self:?} at head size {hs}", check.op()),
                needed: format!("{need} bytes of workgroup memory"),
                available: format!("{limit} bytes"),
                adapter: gpu.info.name.clone(),
                hint: "use FlashTiles::choose".into(),
            });
        }
        Ok(())
    }
}

fn flash_params(d: &Dims, n_blocks: usize, n_work: u32) -> FlashParams {
    FlashParams {
        b: d.b as u32,
        t: d.t as u32,
        nh: d.nh as u32,
        c: d.c as u32,
        n_blocks: n_blocks as u32,
        n_work,
        scale: d.scale(),
        _pad: 0,
    }
}

/// Flash attention forward: `out` (B, T, C) and `lse` (B, NH, T) f32 from `qkv` (B, T, 3C).
/// C is taken from `qkv`'s length. Tiles from [`FlashTiles::choose`]. One dispatch.
pub fn flash_attention_forward(
    gpu: &Gpu,
    out: &Tensor,
    lse: &Tensor,
    qkv: &Tensor,
    b: usize,
    t: usize,
    nh: usize,
) -> Result<Vec<Dispatch>> {
    let d = Dims::new(&Check::new(gpu, "flash_attention_forward"), qkv, b, t, nh)?;
    let tiles = FlashTiles::choose(gpu, d.hs)?;
    flash_attention_forward_tiled(
        gpu,
        tiles,
        &AttentionForward {
            out,
            lse,
            qkv,
            b,
            t,
            nh,
        },
    )
}

/// The arguments of the attention forward launchers that take them in one struct
/// ([`flash_attention_forward_tiled`], [`coop_attention_forward`]).
#[derive(Clone, Copy)]
pub struct AttentionForward<'a> {
    pub out: &'a Tensor,
    pub lse: &'a Tensor,
    pub qkv: &'a Tensor,
    pub b: usize,
    pub t: usize,
    pub nh: usize,
}

/// [`flash_attention_forward`] with explicit tiles (which must fit the adapter).
pub fn flash_attention_forward_tiled(
    gpu: &Gpu,
    tiles: FlashTiles,
    args: &AttentionForward<'_>,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "flash_attention_forward";
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
    tiles.check(&check, d.hs)?;
    check.arg("out", out).float()?.len(d.bt() * d.c)?;
    check.arg("lse", lse).f32()?.len(d.bht())?;
    check.no_alias(&[("out", out), ("lse", lse)], &[("qkv", qkv)])?;
    let n_qb = d.t.div_ceil(tiles.br as usize);
    let n_work = check.fits_u32("workgroups", n_qb * d.b * d.nh)?;
    let params = gpu.uniform(&flash_params(&d, n_qb, n_work));
    let dispatch = gpu.dispatch(DispatchDesc {
        kernel: FLASH_FORWARD.with([
            &qkv.dtype,
            &out.dtype,
            &d.hs,
            &dims_group(d.hs),
            &tiles.br,
            &tiles.bc,
        ]),
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

/// The arguments of the attention backward launchers ([`attention_backward`],
/// [`flash_attention_backward`], [`flash_attention_backward_tiled`],
/// [`coop_attention_backward`]).
#[derive(Clone, Copy)]
pub struct AttentionBackward<'a> {
    pub dqkv: &'a Tensor,
    pub dout: &'a Tensor,
    pub qkv: &'a Tensor,
    pub out: &'a Tensor,
    pub lse: &'a Tensor,
    pub d_scratch: &'a Tensor,
    pub b: usize,
    pub t: usize,
    pub nh: usize,
}

/// Flash attention backward: writes every element of `dqkv` (B, T, 3C) from `dout` (B, T, C),
/// the forward's `qkv` and `lse` (`out` is checked, not read). `d_scratch` (B, NH, T) f32
/// receives D = rowsum(P * dP), dP = dout v^T, summed by the first of two dispatches: dQ (one
/// workgroup per query block), then dK/dV (one workgroup per key block); deterministic (no
/// atomics). (See shaders/attention_flash.wgsl for why D is not FlashAttention-2's
/// rowsum(dout * out).)
pub fn flash_attention_backward(gpu: &Gpu, args: &AttentionBackward<'_>) -> Result<Vec<Dispatch>> {
    let &AttentionBackward { qkv, b, t, nh, .. } = args;
    let d = Dims::new(&Check::new(gpu, "flash_attention_backward"), qkv, b, t, nh)?;
    let tiles = FlashTiles::choose(gpu, d.hs)?;
    flash_attention_backward_tiled(gpu, tiles, args)
}

/// Causal attention forward on the fastest kernels `gpu` has for it: on cooperative matrices
/// where [`auto_coop_attention`] allows (f16 qkv, a head size that is a multiple of 16, a
/// passed self-check), else [`flash_attention_forward`]. Same tensors and results within the
/// self-check's tolerance.
pub fn attention_forward(
    gpu: &Gpu,
    out: &Tensor,
    lse: &Tensor,
    qkv: &Tensor,
    b: usize,
    t: usize,
    nh: usize,
) -> Result<Vec<Dispatch>> {
    let hs = Dims::new(&Check::new(gpu, "attention_forward"), qkv, b, t, nh)?.hs;
    match auto_coop_attention(gpu, hs, qkv.dtype) {
        Some(cfg) => coop_attention_forward(
            gpu,
            cfg,
            &AttentionForward {
                out,
                lse,
                qkv,
                b,
                t,
                nh,
            },
        ),
        None => flash_attention_forward(gpu, out, lse, qkv, b, t, nh),
    }
}

/// The backward pass of [`attention_forward`], on the kernels it chose.
pub fn attention_backward(gpu: &Gpu, args: &AttentionBackward<'_>) -> Result<Vec<Dispatch>> {
    let &AttentionBackward { qkv, b, t, nh, .. } = args;
    let hs = Dims::new(&Check::new(gpu, "attention_backward"), qkv, b, t, nh)?.hs;
    match auto_coop_attention(gpu, hs, qkv.dtype) {
        Some(cfg) => coop_attention_backward(gpu, cfg, args),
        None => flash_attention_backward(gpu, args),
    }
}

/// Checks the tensors of a flash backward pass (either kernel family): sizes, storage types
/// and that no output aliases an input.
fn check_flash_backward(check: &Check, d: &Dims, args: &AttentionBackward<'_>) -> Result<()> {
    let &AttentionBackward {
        dqkv,
        dout,
        qkv,
        out,
        lse,
        d_scratch,
        ..
    } = args;
    check.arg("dqkv", dqkv).float()?.len(d.bt() * 3 * d.c)?;
    check.arg("dout", dout).float()?.len(d.bt() * d.c)?;
    check.arg("out", out).float()?.len(d.bt() * d.c)?;
    check.arg("lse", lse).f32()?.len(d.bht())?;
    check.arg("d_scratch", d_scratch).f32()?.len(d.bht())?;
    check.no_alias(&[("d_scratch", d_scratch)], &[("dout", dout), ("out", out)])?;
    check.no_alias(
        &[("dqkv", dqkv)],
        &[
            ("qkv", qkv),
            ("dout", dout),
            ("lse", lse),
            ("d_scratch", d_scratch),
        ],
    )?;
    Ok(())
}

/// [`flash_attention_backward`] with explicit tiles (which must fit the adapter).
pub fn flash_attention_backward_tiled(
    gpu: &Gpu,
    tiles: FlashTiles,
    args: &AttentionBackward<'_>,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "flash_attention_backward";
    let &AttentionBackward {
        dqkv,
        dout,
        qkv,
        lse,
        d_scratch,
        b,
        t,
        nh,
        ..
    } = args;
    let check = Check::new(gpu, OP);
    let d = Dims::new(&check, qkv, b, t, nh)?;
    tiles.check(&check, d.hs)?;
    check_flash_backward(&check, &d, args)?;

    // Two passes over the same inputs: dQ per query block, which also sums D into `d_scratch`,
    // then dK/dV per key block, which reads it.
    let pass = |kernel: &Kernel<7>, block: u32, what: &str, d_bind: Bind<'_>| {
        let n_blocks = d.t.div_ceil(block as usize);
        let work = check.fits_u32("workgroups", n_blocks * d.b * d.nh)?;
        let params = gpu.uniform(&flash_params(&d, n_blocks, work));
        gpu.dispatch(DispatchDesc {
            kernel: kernel.with([
                &qkv.dtype,
                &dout.dtype,
                &dqkv.dtype,
                &d.hs,
                &dims_group(d.hs),
                &tiles.bq,
                &tiles.bk,
            ]),
            bindings: &[
                Bind::Uniform(&params),
                Bind::Read(qkv),
                Bind::Read(dout),
                Bind::Read(lse),
                d_bind,
                Bind::Write(dqkv),
            ],
            workgroups: gpu.grid(work),
            label: format!("{OP}.{what}"),
        })
    };
    let dq = pass(&FLASH_BACKWARD_DQ, tiles.bq, "dq", Bind::Write(d_scratch))?;
    let dkdv = pass(
        &FLASH_BACKWARD_DKDV,
        tiles.bk,
        "dkdv",
        Bind::Read(d_scratch),
    )?;
    Ok(vec![dq, dkdv])
}

/// The cooperative-matrix backward's first dispatch: D = rowsum(dout * out) into `d_scratch`
/// (B, NH, T) f32.
fn flash_preprocess(
    check: &Check,
    d: &Dims,
    dout: &Tensor,
    out: &Tensor,
    d_scratch: &Tensor,
) -> Result<Dispatch> {
    let gpu = check.gpu();
    let n_rows = check.fits_u32("B*T*NH", d.bht())?;
    let pre_params = gpu.uniform(&flash_params(d, 0, n_rows));
    gpu.dispatch(DispatchDesc {
        kernel: FLASH_PREPROCESS.with([&dout.dtype, &out.dtype]),
        bindings: &[
            Bind::Uniform(&pre_params),
            Bind::Read(dout),
            Bind::Read(out),
            Bind::Write(d_scratch),
        ],
        workgroups: gpu.grid(n_rows.div_ceil(256)),
        label: format!("{}.preprocess", check.op()),
    })
}

// ---- naive attention ---------------------------------------------------------------------------

fn naive_params(d: &Dims, n_work: u32) -> NaiveParams {
    NaiveParams {
        b: d.b as u32,
        t: d.t as u32,
        nh: d.nh as u32,
        c: d.c as u32,
        hs: d.hs as u32,
        n_work,
        scale: d.scale(),
        n_tiles: d.t.div_ceil(16) as u32,
    }
}

/// Workgroup counts of the naive kernels: (score tiles, rows, (row tile x head-dim tile)s).
fn naive_grids(check: &Check, d: &Dims) -> Result<(u32, u32, u32)> {
    let bh = d.b * d.nh;
    let tiles_t = d.t.div_ceil(16);
    check.fits_u32("B*NH*T*T", bh * d.t * d.t)?;
    Ok((
        check.fits_u32("workgroups", bh * tiles_t * tiles_t)?,
        check.fits_u32("workgroups", bh * d.t)?,
        check.fits_u32("workgroups", bh * tiles_t * d.hs.div_ceil(16))?,
    ))
}

fn naive_dispatch(
    gpu: &Gpu,
    d: &Dims,
    kernel: Specialisation,
    bindings: &[Bind<'_>],
    n_work: u32,
    label: String,
) -> Result<Dispatch> {
    let params = gpu.uniform(&naive_params(d, n_work));
    let mut all = vec![Bind::Uniform(&params)];
    all.extend(bindings.iter().map(|b| match b {
        Bind::Uniform(u) => Bind::Uniform(u),
        Bind::Read(t) => Bind::Read(t),
        Bind::Write(t) => Bind::Write(t),
    }));
    gpu.dispatch(DispatchDesc {
        kernel,
        bindings: &all,
        workgroups: gpu.grid(n_work),
        label,
    })
}

/// Naive attention forward: `att` (B, NH, T, T) f32 receives the softmax probabilities (exactly
/// 0 above the diagonal) and `out` (B, T, C) = att v. Three dispatches: scores, softmax in
/// place, values.
pub fn naive_attention_forward(
    gpu: &Gpu,
    out: &Tensor,
    att: &Tensor,
    qkv: &Tensor,
    b: usize,
    t: usize,
    nh: usize,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "naive_attention_forward";
    let check = Check::new(gpu, OP);
    let d = Dims::new(&check, qkv, b, t, nh)?;
    check.arg("out", out).float()?.len(d.bt() * d.c)?;
    check.arg("att", att).f32()?.len(d.bht() * d.t)?;
    check.no_alias(&[("out", out), ("att", att)], &[("qkv", qkv)])?;
    let (score_wg, row_wg, value_wg) = naive_grids(&check, &d)?;
    Ok(vec![
        naive_dispatch(
            gpu,
            &d,
            NAIVE_SCORES.with([&qkv.dtype]),
            &[Bind::Read(qkv), Bind::Write(att)],
            score_wg,
            format!("{OP}.scores"),
        )?,
        naive_dispatch(
            gpu,
            &d,
            NAIVE_SOFTMAX.with([]),
            &[Bind::Write(att)],
            row_wg,
            format!("{OP}.softmax"),
        )?,
        naive_dispatch(
            gpu,
            &d,
            NAIVE_VALUES.with([&qkv.dtype, &out.dtype]),
            &[Bind::Read(att), Bind::Read(qkv), Bind::Write(out)],
            value_wg,
            format!("{OP}.values"),
        )?,
    ])
}

/// The arguments of [`naive_attention_backward`].
#[derive(Clone, Copy)]
pub struct NaiveAttentionBackward<'a> {
    pub dqkv: &'a Tensor,
    pub datt_scratch: &'a Tensor,
    pub dout: &'a Tensor,
    pub qkv: &'a Tensor,
    pub att: &'a Tensor,
    pub b: usize,
    pub t: usize,
    pub nh: usize,
}

/// Naive attention backward: writes every element of `dqkv` (B, T, 3C) from `dout` (B, T, C),
/// `qkv` and the forward's probabilities `att` (B, NH, T, T) f32. `datt_scratch` (B, NH, T, T)
/// f32 receives dP = dout v^T, then in place dS = scale * P * (dP - rowsum(P * dP)). Four
/// dispatches: dP, softmax backward, dq, dk and dv; deterministic.
pub fn naive_attention_backward(
    gpu: &Gpu,
    args: &NaiveAttentionBackward<'_>,
) -> Result<Vec<Dispatch>> {
    const OP: &str = "naive_attention_backward";
    let &NaiveAttentionBackward {
        dqkv,
        datt_scratch,
        dout,
        qkv,
        att,
        b,
        t,
        nh,
    } = args;
    let check = Check::new(gpu, OP);
    let d = Dims::new(&check, qkv, b, t, nh)?;
    check.arg("dqkv", dqkv).float()?.len(d.bt() * 3 * d.c)?;
    check.arg("dout", dout).float()?.len(d.bt() * d.c)?;
    check.arg("att", att).f32()?.len(d.bht() * d.t)?;
    check
        .arg("datt_scratch", datt_scratch)
        .f32()?
        .len(d.bht() * d.t)?;
    check.no_alias(
        &[("datt_scratch", datt_scratch)],
        &[("dout", dout), ("qkv", qkv), ("att", att)],
    )?;
    check.no_alias(
        &[("dqkv", dqkv)],
        &[
            ("dout", dout),
            ("qkv", qkv),
            ("att", att),
            ("datt_scratch", datt_scratch),
        ],
    )?;
    let (score_wg, row_wg, value_wg) = naive_grids(&check, &d)?;
    Ok(vec![
        naive_dispatch(
            gpu,
            &d,
            NAIVE_DSCORES.with([&dout.dtype, &qkv.dtype]),
            &[Bind::Read(dout), Bind::Read(qkv), Bind::Write(datt_scratch)],
            score_wg,
            format!("{OP}.dscores"),
        )?,
        naive_dispatch(
            gpu,
            &d,
            NAIVE_SOFTMAX_BACKWARD.with([]),
            &[Bind::Read(att), Bind::Write(datt_scratch)],
            row_wg,
            format!("{OP}.softmax_backward"),
        )?,
        naive_dispatch(
            gpu,
            &d,
            NAIVE_DQ.with([&qkv.dtype, &dqkv.dtype]),
            &[Bind::Read(datt_scratch), Bind::Read(qkv), Bind::Write(dqkv)],
            value_wg,
            format!("{OP}.dq"),
        )?,
        naive_dispatch(
            gpu,
            &d,
            NAIVE_DKDV.with([&qkv.dtype, &dout.dtype, &dqkv.dtype]),
            &[
                Bind::Read(att),
                Bind::Read(datt_scratch),
                Bind::Read(qkv),
                Bind::Read(dout),
                Bind::Write(dqkv),
            ],
            value_wg,
            format!("{OP}.dkdv"),
        )?,
    ])
}

/// Every specialisation the launchers can ask for: every head size 1..=MAX_HEAD_SIZE with every
/// tile size in f32, and every storage-type combination at the head sizes GPT-2 and the tests
/// use (the types only change loads and stores; the head size and tiles shape everything else).
pub(crate) fn shader_variants() -> Vec<Specialisation> {
    let mut v = FLASH_PREPROCESS.variants();
    for hs in 1..=MAX_HEAD_SIZE {
        let types = if [8, 16, 24, 32, 64, 128].contains(&hs) {
            FLOATS
        } else {
            &["f32"]
        };
        let dg = dims_group(hs);
        for (br, bc) in FORWARD_TILES {
            for qkv in types {
                for out in types {
                    v.push(FLASH_FORWARD.with([qkv, out, &hs, &dg, &br, &bc]));
                }
            }
        }
        for (bq, bk) in BACKWARD_TILES {
            for kernel in [FLASH_BACKWARD_DKDV, FLASH_BACKWARD_DQ] {
                for qkv in types {
                    for dout in types {
                        for dqkv in types {
                            v.push(kernel.with([qkv, dout, dqkv, &hs, &dg, &bq, &bk]));
                        }
                    }
                }
            }
        }
    }
    v.extend(NAIVE_SCORES.variants());
    v.extend(NAIVE_SOFTMAX.variants());
    v.extend(NAIVE_VALUES.variants());
    v.extend(NAIVE_DSCORES.variants());
    v.extend(NAIVE_SOFTMAX_BACKWARD.variants());
    v.extend(NAIVE_DQ.variants());
    v.extend(NAIVE_DKDV.variants());
    v.extend(coop::shader_variants());
    v
}
