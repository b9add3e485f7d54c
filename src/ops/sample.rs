//! Launchers for `shaders/sample.wgsl`: incremental decoding with a key/value cache and
//! top-k / temperature sampling on the GPU.
//!
//! Every dispatch binds the same small `step` uniform ([`DecodeStep`]), which the caller
//! rewrites before each token; everything else is fixed when the dispatch is built.

use super::embedding::TablePiece;
use super::{Check, FLOATS};
use crate::error::{Error, Result};
use crate::gpu::{
    Axis, Bind, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor, Uniform,
};

/// The file's defines, the same for every entry point (one module): the storage types of the
/// weights and of the activations, and the positions the cache holds (any; validated at 64 and
/// 1024).
const AXES: [Axis; 3] = [
    Axis::new("W_T", FLOATS),
    Axis::new("ACT_T", FLOATS),
    Axis::new("T_MAX", &["64", "1024"]),
];

const fn kernel(entry: &'static str) -> Kernel<3> {
    Kernel {
        shader: "sample",
        entry,
        fixed: &[],
        axes: AXES,
    }
}

const EMBEDDING_AT: Kernel<3> = kernel("embedding_at");
const ATTENTION_DECODE: Kernel<3> = kernel("attention_decode");
const TOPK_SAMPLE: Kernel<3> = kernel("topk_sample");

/// The decode problem's fixed sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeDims {
    /// Samples decoded together.
    pub s: usize,
    pub c: usize,
    pub nh: usize,
    /// Positions the cache holds (the model's block size).
    pub t_max: usize,
    /// Real and padded vocabulary.
    pub v: usize,
    pub vp: usize,
}

/// Uniform block `Shape` of `shaders/sample.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ShapeUniform {
    s: u32,
    c: u32,
    nh: u32,
    t_max: u32,
    v: u32,
    vp: u32,
    first: u32,
    piece_rows: u32,
}

/// What changes from one token to the next: uniform block `Step` of `shaders/sample.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DecodeStep {
    /// The position being decoded.
    pub pos: u32,
    /// Candidates kept by top-k sampling (<= 1: greedy).
    pub top_k: u32,
    /// Softmax temperature (<= 0: greedy).
    pub temperature: f32,
    pub _pad: u32,
}

/// A uniform buffer for [`DecodeStep`], rewritten with `queue.write_buffer` before each token.
pub fn step_buffer(gpu: &Gpu) -> Uniform {
    gpu.uniform(&DecodeStep {
        pos: 0,
        top_k: 1,
        temperature: 1.0,
        _pad: 0,
    })
}

/// Workgroup memory holds one score per cached position.
pub fn max_positions(gpu: &Gpu) -> usize {
    (gpu.limits.max_compute_workgroup_storage_size as usize).saturating_sub(1024) / 4
}

fn shape_uniform(check: &Check, d: &DecodeDims) -> Result<Uniform> {
    shape_uniform_for_piece(check, d, TablePiece::whole(d.vp), d.vp)
}

/// The shape uniform with the token-table piece `embedding_at` reads (`piece_rows` rows).
fn shape_uniform_for_piece(
    check: &Check,
    d: &DecodeDims,
    piece: TablePiece,
    piece_rows: usize,
) -> Result<Uniform> {
    if d.s == 0
        || d.c == 0
        || d.nh == 0
        || !d.c.is_multiple_of(d.nh)
        || d.t_max == 0
        || d.v == 0
        || d.vp < d.v
    {
        return Err(check.error(format!("invalid decode sizes {d:?}")));
    }
    let u = |what: &str, x: usize| check.fits_u32(what, x);
    Ok(check.gpu().uniform(&ShapeUniform {
        s: u("samples", d.s)?,
        c: u("channels", d.c)?,
        nh: u("heads", d.nh)?,
        t_max: u("positions", d.t_max)?,
        v: u("vocabulary", d.v)?,
        vp: u("padded vocabulary", d.vp)?,
        first: u("piece's first row", piece.first)?,
        piece_rows: u("piece rows", piece_rows)?,
    }))
}

/// The tensors of [`embedding_at`] and the table piece `wte` holds.
#[derive(Clone, Copy)]
pub struct EmbeddingAt<'a> {
    pub out: &'a Tensor,
    pub tokens: &'a Tensor,
    pub wte: &'a Tensor,
    pub piece: TablePiece,
    pub wpe: &'a Tensor,
}

/// `out[s] = wte[tokens[s]] + wpe[step.pos]` for every sample whose token lies in `piece`.
/// out: (S, C) f32; tokens: (S) u32; wte: (rows, C) rows `piece.first..` of the (Vp, C) table;
/// wpe: (block, C); f32 or f16 (same dtype).
pub fn embedding_at(
    gpu: &Gpu,
    d: &DecodeDims,
    step: &Uniform,
    args: &EmbeddingAt<'_>,
) -> Result<Dispatch> {
    const OP: &str = "embedding_at";
    let &EmbeddingAt {
        out,
        tokens,
        wte,
        piece,
        wpe,
    } = args;
    let check = Check::new(gpu, OP);
    check.arg("out", out).f32()?.len(d.s * d.c)?;
    check.arg("tokens", tokens).u32()?.len(d.s)?;
    check.arg("wte", wte).float()?;
    let piece_rows = wte.len() / d.c.max(1);
    if wte.len() != piece_rows * d.c || piece.total != d.vp || piece.first + piece_rows > d.vp {
        return Err(check.error(format!(
            "wte has shape {:?}; expected rows {}.. of a ({}, {}) table",
            wte.shape, piece.first, d.vp, d.c
        )));
    }
    check.arg("wpe", wpe).float()?.dtype(&[wte.dtype])?;
    if wpe.len() < d.t_max * d.c {
        return Err(check.error(format!(
            "wpe has {} elements, fewer than {} positions",
            wpe.len(),
            d.t_max
        )));
    }
    let shape = shape_uniform_for_piece(&check, d, piece, piece_rows)?;
    gpu.dispatch(DispatchDesc {
        kernel: EMBEDDING_AT.with([&wte.dtype, &"f32", &d.t_max]),
        bindings: &[
            Bind::Uniform(&shape),
            Bind::Uniform(step),
            Bind::Read(tokens),
            Bind::Read(wte),
            Bind::Read(wpe),
            Bind::Write(out),
        ],
        workgroups: [check.fits_u32("samples", d.s)?, 1, 1],
        label: OP.into(),
    })
}

/// One query per (sample, head) attending over cached positions `0..=step.pos`; the new k and v
/// (from `qkv`) are first written into the cache at `step.pos`.
/// out: (S, C); cache: (T_MAX, S, 3C); qkv: (S, 3C); all the same float dtype.
pub fn attention_decode(
    gpu: &Gpu,
    d: &DecodeDims,
    step: &Uniform,
    out: &Tensor,
    cache: &Tensor,
    qkv: &Tensor,
) -> Result<Dispatch> {
    const OP: &str = "attention_decode";
    let check = Check::new(gpu, OP);
    for (what, t, n) in [
        ("out", out, d.s * d.c),
        ("cache", cache, d.t_max * d.s * 3 * d.c),
        ("qkv", qkv, d.s * 3 * d.c),
    ] {
        check.arg(what, t).float()?.dtype(&[qkv.dtype])?.len(n)?;
    }
    if d.t_max > max_positions(gpu) {
        return Err(Error::Limit {
            what: "the key/value cache's scores".into(),
            needed: format!("{} positions", d.t_max),
            available: format!("{} positions of workgroup memory", max_positions(gpu)),
            adapter: gpu.info.name.clone(),
            hint: "use a model with a smaller block size".into(),
        });
    }
    let shape = shape_uniform(&check, d)?;
    gpu.dispatch(DispatchDesc {
        kernel: ATTENTION_DECODE.with([&"f32", &qkv.dtype, &d.t_max]),
        bindings: &[
            Bind::Uniform(&shape),
            Bind::Uniform(step),
            Bind::Read(qkv),
            Bind::Write(cache),
            Bind::Write(out),
        ],
        workgroups: [check.fits_u32("samples x heads", d.s * d.nh)?, 1, 1],
        label: OP.into(),
    })
}

/// One token per sample drawn from softmax(top-k(logits[s, :V]) / temperature) with the uniform
/// number `uniforms[s]`; greedy when `step.top_k <= 1` or `step.temperature <= 0`.
/// tokens: (S) u32; logits: (S, Vp) f32 or f16; uniforms: (S) f32 in [0, 1).
pub fn topk_sample(
    gpu: &Gpu,
    d: &DecodeDims,
    step: &Uniform,
    tokens: &Tensor,
    logits: &Tensor,
    uniforms: &Tensor,
) -> Result<Dispatch> {
    const OP: &str = "topk_sample";
    let check = Check::new(gpu, OP);
    check.arg("tokens", tokens).u32()?.len(d.s)?;
    check.arg("logits", logits).float()?.len(d.s * d.vp)?;
    check.arg("uniforms", uniforms).f32()?.len(d.s)?;
    let shape = shape_uniform(&check, d)?;
    gpu.dispatch(DispatchDesc {
        kernel: TOPK_SAMPLE.with([&"f32", &logits.dtype, &d.t_max]),
        bindings: &[
            Bind::Uniform(&shape),
            Bind::Uniform(step),
            Bind::Read(logits),
            Bind::Read(uniforms),
            Bind::Write(tokens),
        ],
        workgroups: [check.fits_u32("samples", d.s)?, 1, 1],
        label: OP.into(),
    })
}

pub(crate) fn shader_variants() -> Vec<Specialisation> {
    [EMBEDDING_AT, ATTENTION_DECODE, TOPK_SAMPLE]
        .iter()
        .flat_map(|k| k.variants())
        .collect()
}
