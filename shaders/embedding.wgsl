// Token + position embedding: forward, and a deterministic backward without float atomics.
//
// Sections: FORWARD (WTE_T, WPE_T: f32 | f16), BACKWARD_WTE (DOUT_T), BACKWARD_WPE (DOUT_T).
// Token ids >= Vp (bad data) are clamped to Vp - 1 so nothing is read or written out of bounds;
// `bucket_tokens` on the CPU clamps the same way, so forward and backward agree.
// The token table may come in pieces of rows (one launch per piece): a launch handles the tokens
// in rows first .. first + piece_rows of the Vp-row table and leaves the others alone.

const WG: u32 = 256u;

fn linear_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

#if FORWARD
// ---- embedding_forward: out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :] ---------------------------
// One thread per output element (coalesced along C).
struct ForwardParams {
    rows: u32, // B*T
    t: u32,
    c: u32,
    vp: u32,         // rows of the whole table
    first: u32,      // the piece's first row
    piece_rows: u32, // rows in this piece
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: ForwardParams;
@group(0) @binding(1) var<storage, read> ef_tokens: array<u32>;          // (B*T)
@group(0) @binding(2) var<storage, read> ef_wte: array<{{WTE_T}}>;       // (piece_rows, C)
@group(0) @binding(3) var<storage, read> ef_wpe: array<{{WPE_T}}>;       // (block, C), block >= T
@group(0) @binding(4) var<storage, read_write> ef_out: array<f32>;       // (B*T, C)

@compute @workgroup_size(256)
fn embedding_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = linear_group(wid, nwg) * WG + lid;
    if (i >= p.rows * p.c) { return; }
    let row = i / p.c;
    let col = i - row * p.c;
    let pos = row % p.t;
    let tok = min(ef_tokens[row], p.vp - 1u);
    if (tok < p.first || tok - p.first >= p.piece_rows) { return; }
    ef_out[i] = f32(ef_wte[(tok - p.first) * p.c + col]) + f32(ef_wpe[pos * p.c + col]);
}
#endif

#if BACKWARD_WTE
// ---- embedding_backward_wte: dwte[token, :] += sum of dout[pos, :] over the token's positions ----
// `buckets` (built on the CPU by bucket_tokens, P = B*T positions):
//   [0]                      number of buckets K (distinct token ids)
//   [1 + 3k .. 1 + 3k + 3]   bucket k: token id, start, count     (k < P)
//   [1 + 3P + start + q]     the q-th position of that token, ascending
// Workgroup k owns bucket k, i.e. one row of dwte that no other workgroup touches; its threads
// split the C columns and sum the positions in order: deterministic. The grid has P workgroups
// (every position a distinct token, the worst case) so it can be recorded once; workgroups k >= K
// return at once.
struct BucketParams {
    positions: u32, // P = B*T
    _unused: u32,
    c: u32,
    vp: u32,         // rows of the whole table
    first: u32,      // the piece's first row
    piece_rows: u32, // rows in this piece
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> bp: BucketParams;
@group(0) @binding(1) var<storage, read> bw_buckets: array<u32>;          // (1 + 4 P)
@group(0) @binding(2) var<storage, read> bw_dout: array<{{DOUT_T}}>;      // (B*T, C)
@group(0) @binding(3) var<storage, read_write> bw_dwte: array<f32>;       // (piece_rows, C), accumulated

@compute @workgroup_size(256)
fn embedding_backward_wte(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let k = linear_group(wid, nwg);
    let n_buckets = min(bw_buckets[0], bp.positions);
    if (k >= n_buckets) { return; }
    let tok = min(bw_buckets[1u + 3u * k], bp.vp - 1u);
    if (tok < bp.first || tok - bp.first >= bp.piece_rows) { return; }
    let row = tok - bp.first;
    let start = min(bw_buckets[2u + 3u * k], bp.positions);
    let count = min(bw_buckets[3u + 3u * k], bp.positions - start);
    let list = 1u + 3u * bp.positions + start;
    for (var col = lid; col < bp.c; col += WG) {
        var s = 0.0;
        for (var q = 0u; q < count; q++) {
            let pos = min(bw_buckets[list + q], bp.positions - 1u);
            s += f32(bw_dout[pos * bp.c + col]);
        }
        bw_dwte[row * bp.c + col] += s;
    }
}
#endif

#if BACKWARD_WPE
// ---- embedding_backward_wpe: dwpe[t, :] += sum over b of dout[b, t, :] ------------------------------
// One thread per (t, c), summing the B batch rows in order.
struct PosParams {
    b: u32,
    t: u32,
    c: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> pp: PosParams;
@group(0) @binding(1) var<storage, read> pw_dout: array<{{DOUT_T}}>;      // (B, T, C)
@group(0) @binding(2) var<storage, read_write> pw_dwpe: array<f32>;       // (block, C), accumulated

@compute @workgroup_size(256)
fn embedding_backward_wpe(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let i = linear_group(wid, nwg) * WG + lid; // t * C + c
    let tc = pp.t * pp.c;
    if (i >= tc) { return; }
    var s = 0.0;
    for (var b = 0u; b < pp.b; b++) {
        s += f32(pw_dout[b * tc + i]);
    }
    pw_dwpe[i] += s;
}
#endif
