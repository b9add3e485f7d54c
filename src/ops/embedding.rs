//! Launchers for `shaders/embedding.wgsl`: token + position embedding forward, and its backward
//! pass, made deterministic without float atomics by grouping the positions by token on the CPU
//! ([`bucket_tokens`]: the data loader knows the tokens anyway).
//!
//! The token table may be stored in pieces of rows (a table larger than one binding, see
//! `model::storage`): each launch then handles the tokens of one piece ([`TablePiece`]), and
//! one launch per piece covers every position exactly once.

use super::{Check, FLOATS};
use crate::error::Result;
use crate::gpu::{Axis, Bind, Dispatch, DispatchDesc, Gpu, Kernel, Specialisation, Tensor};

const WG: u32 = 256;

/// Values: the storage types of wte and wpe.
const FORWARD: Kernel<2> = Kernel {
    shader: "embedding",
    entry: "embedding_forward",
    fixed: &[("FORWARD", "1")],
    axes: [Axis::new("WTE_T", FLOATS), Axis::new("WPE_T", FLOATS)],
};

/// Value: dout's storage type.
const BACKWARD_WTE: Kernel<1> = Kernel {
    shader: "embedding",
    entry: "embedding_backward_wte",
    fixed: &[("BACKWARD_WTE", "1")],
    axes: [Axis::new("DOUT_T", FLOATS)],
};

/// Value: dout's storage type.
const BACKWARD_WPE: Kernel<1> = Kernel {
    shader: "embedding",
    entry: "embedding_backward_wpe",
    fixed: &[("BACKWARD_WPE", "1")],
    axes: [Axis::new("DOUT_T", FLOATS)],
};

/// Which rows of the token table a `wte` tensor holds: rows `first..first + its rows` of a table
/// of `total` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TablePiece {
    pub first: usize,
    pub total: usize,
}

impl TablePiece {
    /// The whole table of `rows` rows in one tensor.
    pub fn whole(rows: usize) -> TablePiece {
        TablePiece {
            first: 0,
            total: rows,
        }
    }

    /// Checks a piece tensor of `rows` rows lies within the table.
    fn check(self, check: &Check, rows: usize) -> Result<()> {
        if self.first + rows > self.total {
            return Err(check.error(format!(
                "a piece of {rows} rows from row {} is outside a table of {} rows",
                self.first, self.total
            )));
        }
        check.fits_u32("table rows", self.total)?;
        Ok(())
    }

    /// The forward's uniform for `rows` positions (sequences of `t`) of `c` channels, for a
    /// piece of `piece_rows` rows.
    fn forward_params(self, rows: usize, t: usize, c: usize, piece_rows: usize) -> ForwardParams {
        ForwardParams {
            rows: rows as u32,
            t: t as u32,
            c: c as u32,
            vp: self.total as u32,
            first: self.first as u32,
            piece_rows: piece_rows as u32,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The token table's backward uniform for `positions` positions of `c` channels, for a
    /// piece of `piece_rows` rows.
    fn bucket_params(self, positions: usize, c: usize, piece_rows: usize) -> BucketParams {
        BucketParams {
            positions: positions as u32,
            _unused: 0,
            c: c as u32,
            vp: self.total as u32,
            first: self.first as u32,
            piece_rows: piece_rows as u32,
            _pad0: 0,
            _pad1: 0,
        }
    }
}

/// Uniform block `ForwardParams` of `shaders/embedding.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ForwardParams {
    /// Positions, B*T.
    rows: u32,
    t: u32,
    c: u32,
    /// Rows of the whole table (ids beyond are clamped).
    vp: u32,
    /// The piece's first row.
    first: u32,
    /// Rows in this piece.
    piece_rows: u32,
    _pad0: u32,
    _pad1: u32,
}

/// Uniform block `BucketParams` of `shaders/embedding.wgsl` (the token table's gradient).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BucketParams {
    /// Positions, B*T.
    positions: u32,
    _unused: u32,
    c: u32,
    /// Rows of the whole table.
    vp: u32,
    /// The piece's first row.
    first: u32,
    /// Rows in this piece.
    piece_rows: u32,
    _pad0: u32,
    _pad1: u32,
}

/// Uniform block `PosParams` of `shaders/embedding.wgsl` (the position table's gradient).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PosParams {
    b: u32,
    t: u32,
    c: u32,
    _pad: u32,
}

/// The arguments of [`embedding_forward`].
#[derive(Clone, Copy)]
pub struct EmbeddingForward<'a> {
    pub out: &'a Tensor,
    pub tokens: &'a Tensor,
    pub wte: &'a Tensor,
    pub piece: TablePiece,
    pub wpe: &'a Tensor,
    pub b: usize,
    pub t: usize,
}

/// `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`, for the positions whose token lies in
/// `piece` (every position when `wte` is the whole table).
///
/// - `out`: `[B, T, C]` (or `[B*T, C]`) f32, overwritten at those positions.
/// - `tokens`: `[B*T]` (any shape of B*T elements) u32; ids `>= piece.total` are clamped to
///   `piece.total - 1`.
/// - `wte`: `[rows, C]` f32 | f16, rows `piece.first..` of the table. `wpe`: `[block, C]` f32 |
///   f16 with `block >= T`.
pub fn embedding_forward(gpu: &Gpu, args: &EmbeddingForward<'_>) -> Result<Dispatch> {
    const OP: &str = "embedding_forward";
    let &EmbeddingForward {
        out,
        tokens,
        wte,
        piece,
        wpe,
        b,
        t,
    } = args;
    let check = Check::new(gpu, OP);
    if b == 0 || t == 0 {
        return Err(check.error(format!("B = {b} and T = {t} must be positive")));
    }
    let (piece_rows, c) = check.arg("wte", wte).float()?.matrix(1)?;
    let (_, cp) = check.arg("wpe", wpe).float()?.matrix(t)?;
    piece.check(&check, piece_rows)?;
    if cp != c {
        return Err(check.error(format!("wpe has C = {cp} but wte has C = {c}")));
    }
    check
        .arg("out", out)
        .f32()?
        .shape_in(&[&[b, t, c], &[b * t, c]])?;
    check.arg("tokens", tokens).u32()?.len(b * t)?;
    check.fits_u32("B * T * C", b * t * c)?;
    check.fits_u32("Vp * C", wte.len())?;
    let n = (b * t * c) as u32;
    let params = gpu.uniform(&piece.forward_params(b * t, t, c, piece_rows));
    gpu.dispatch(DispatchDesc {
        kernel: FORWARD.with([&wte.dtype, &wpe.dtype]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(tokens),
            Bind::Read(wte),
            Bind::Read(wpe),
            Bind::Write(out),
        ],
        workgroups: gpu.grid(n.div_ceil(WG)),
        label: OP.to_string(),
    })
}

/// Length (u32 elements) of the buckets tensor for `positions` = B*T token positions:
/// a count, then room for `positions` buckets (token, start, count), then the positions.
pub fn embedding_buckets_len(positions: usize) -> usize {
    1 + 4 * positions
}

/// Groups the positions `0..tokens.len()` by token id for [`embedding_backward`]: buckets in
/// ascending token order, positions ascending within a bucket. Ids `>= vp` count as `vp - 1`
/// (as the forward pass clamps them). The result has exactly
/// [`embedding_buckets_len`]`(tokens.len())` elements (zero-padded); its layout is described in
/// `shaders/embedding.wgsl`.
pub fn bucket_tokens(tokens: &[u32], vp: usize) -> Vec<u32> {
    let p = tokens.len();
    let last = vp.saturating_sub(1).min(u32::MAX as usize) as u32;
    let id = |pos: usize| tokens[pos].min(last);
    let mut order: Vec<u32> = (0..p as u32).collect();
    // A stable sort keeps the positions of one token ascending.
    order.sort_by_key(|&pos| id(pos as usize));
    let mut out = vec![0u32; embedding_buckets_len(p)];
    let mut k = 0;
    let mut start = 0;
    while start < p {
        let tok = id(order[start] as usize);
        let mut end = start + 1;
        while end < p && id(order[end] as usize) == tok {
            end += 1;
        }
        out[1 + 3 * k] = tok;
        out[2 + 3 * k] = start as u32;
        out[3 + 3 * k] = (end - start) as u32;
        k += 1;
        start = end;
    }
    out[0] = k as u32;
    out[1 + 3 * p..].copy_from_slice(&order);
    out
}

/// Embedding backward: `dwte[tok, :] += sum of dout[pos, :]` over the positions holding `tok`
/// (in position order), and `dwpe[t, :] += sum over b of dout[b, t, :]`, for a whole table.
/// Returns two dispatches (independent of each other); see [`embedding_backward_wte`] and
/// [`embedding_backward_wpe`].
pub fn embedding_backward(
    gpu: &Gpu,
    dwte: &Tensor,
    dwpe: &Tensor,
    dout: &Tensor,
    buckets: &Tensor,
    b: usize,
    t: usize,
) -> Result<Vec<Dispatch>> {
    let (vp, _) = Check::new(gpu, "embedding_backward")
        .arg("dwte", dwte)
        .matrix(1)?;
    Ok(vec![
        embedding_backward_wte(
            gpu,
            &EmbeddingBackwardWte {
                dwte,
                piece: TablePiece::whole(vp),
                dout,
                buckets,
                b,
                t,
            },
        )?,
        embedding_backward_wpe(gpu, dwpe, dout, b, t)?,
    ])
}

/// The arguments of [`embedding_backward_wte`].
#[derive(Clone, Copy)]
pub struct EmbeddingBackwardWte<'a> {
    pub dwte: &'a Tensor,
    pub piece: TablePiece,
    pub dout: &'a Tensor,
    pub buckets: &'a Tensor,
    pub b: usize,
    pub t: usize,
}

/// `dwte[tok - piece.first, :] += sum of dout[pos, :]` over the positions holding `tok`, for the
/// tokens of `piece` (rows of other pieces are untouched).
///
/// - `dwte`: `[rows, C]` f32, rows `piece.first..` of the table's gradient, ACCUMULATED.
/// - `dout`: `[B, T, C]` (or `[B*T, C]`) f32 | f16.
/// - `buckets`: u32 with [`embedding_buckets_len`]`(B*T)` elements, holding [`bucket_tokens`] of
///   this batch's tokens (for the whole table's `total` rows). The grid is sized for the worst
///   case (every position a distinct token), so the dispatch can be recorded once and only the
///   buckets rewritten each step.
pub fn embedding_backward_wte(gpu: &Gpu, args: &EmbeddingBackwardWte<'_>) -> Result<Dispatch> {
    const OP: &str = "embedding_backward";
    let &EmbeddingBackwardWte {
        dwte,
        piece,
        dout,
        buckets,
        b,
        t,
    } = args;
    let check = Check::new(gpu, OP);
    let (piece_rows, c) = check.arg("dwte", dwte).f32()?.matrix(1)?;
    piece.check(&check, piece_rows)?;
    if b == 0 || t == 0 {
        return Err(check.error(format!("B = {b} and T = {t} must be positive")));
    }
    check
        .arg("dout", dout)
        .float()?
        .shape_in(&[&[b, t, c], &[b * t, c]])?;
    check.fits_u32("B * T * C", b * t * c)?;
    let positions = b * t;
    let buckets_len = embedding_buckets_len(positions);
    check.arg("buckets", buckets).u32()?.len(buckets_len)?;
    check.fits_u32("buckets length", buckets_len)?;
    check.fits_u32("piece elements", dwte.len())?;
    let params = gpu.uniform(&piece.bucket_params(positions, c, piece_rows));
    gpu.dispatch(DispatchDesc {
        kernel: BACKWARD_WTE.with([&dout.dtype]),
        bindings: &[
            Bind::Uniform(&params),
            Bind::Read(buckets),
            Bind::Read(dout),
            Bind::Write(dwte),
        ],
        workgroups: gpu.grid(positions as u32),
        label: format!("{OP}.wte"),
    })
}

/// `dwpe[t, :] += sum over b of dout[b, t, :]`.
///
/// - `dwpe`: `[block, C]` f32 with `block >= T`, ACCUMULATED (rows `>= T` untouched).
/// - `dout`: `[B, T, C]` (or `[B*T, C]`) f32 | f16.
pub fn embedding_backward_wpe(
    gpu: &Gpu,
    dwpe: &Tensor,
    dout: &Tensor,
    b: usize,
    t: usize,
) -> Result<Dispatch> {
    const OP: &str = "embedding_backward";
    let check = Check::new(gpu, OP);
    let (_, c) = check.arg("dwpe", dwpe).f32()?.matrix(t)?;
    if b == 0 || t == 0 {
        return Err(check.error(format!("B = {b} and T = {t} must be positive")));
    }
    check
        .arg("dout", dout)
        .float()?
        .shape_in(&[&[b, t, c], &[b * t, c]])?;
    check.fits_u32("B * T * C", b * t * c)?;
    let wpe_params = gpu.uniform(&PosParams {
        b: b as u32,
        t: t as u32,
        c: c as u32,
        _pad: 0,
    });
    gpu.dispatch(DispatchDesc {
        kernel: BACKWARD_WPE.with([&dout.dtype]),
        bindings: &[
            Bind::Uniform(&wpe_params),
            Bind::Read(dout),
            Bind::Write(dwpe),
        ],
        workgroups: gpu.grid(((t * c) as u32).div_ceil(WG)),
        label: format!("{OP}.wpe"),
    })
}

pub(crate) fn shader_variants() -> Vec<Specialisation> {
    let mut v = FORWARD.variants();
    v.extend(BACKWARD_WTE.variants());
    v.extend(BACKWARD_WPE.variants());
    v
}
