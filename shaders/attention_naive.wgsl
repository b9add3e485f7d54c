// Causal self-attention the straightforward way (the reference rung below flash attention):
// the whole score matrix att (B, NH, T, T) f32 is materialised. Layout as in attention_flash:
// qkv (B, T, 3*C) with q, k, v at channel offsets 0, C, 2C and head h at h*hs.
//
// Forward:  att = scale * q k^T (masked) -> softmax in place (masked entries exactly 0)
//           -> out = att v.
// Backward: datt = dout v^T -> datt = scale * P * (datt - rowsum(P * datt)) in place
//           -> dq = datt k, and dk = datt^T q, dv = P^T dout.
// Matrix products use 16 x 16 output tiles per 256-thread workgroup with 16 x 16 input tiles in
// workgroup memory; row kernels (softmax) use one workgroup per row with a fixed-order tree
// reduction, so every result is deterministic. Tiles that lie wholly above the diagonal are
// skipped: their entries are written (as 0) by the row kernels.
//
// Each kernel is compiled alone, selected by one of the defines SCORES, SOFTMAX, VALUES, DSCORES,
// SOFTMAX_BACKWARD, DQ, DKDV.

struct Params {
    b: u32,
    t: u32,
    nh: u32,
    c: u32,      // NH * hs
    hs: u32,
    n_work: u32, // workgroups with work
    scale: f32,  // 1 / sqrt(hs)
    n_tiles: u32, // tiles along the first tiled dimension (T / 16 rounded up)
}

@group(0) @binding(0) var<uniform> p: Params;

fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// Decodes a workgroup id into (b*NH + h, tile index along rows, tile index along columns).
fn tile_of(n: u32, n_cols: u32) -> vec3<u32> {
    let per_bh = p.n_tiles * n_cols;
    let r = n % per_bh;
    return vec3<u32>(n / per_bh, r / n_cols, r % n_cols);
}

#if SCORES
// ---- naive_attention_scores: att[b, h, i, j] = scale * q_i . k_j for j <= i ---------------------
@group(0) @binding(1) var<storage, read> sc_qkv: array<{{QKV_T}}>;     // (B, T, 3*C)
@group(0) @binding(2) var<storage, read_write> sc_att: array<f32>;     // (B, NH, T, T)

var<workgroup> sc_a: array<f32, 256>; // [i][d]
var<workgroup> sc_b: array<f32, 272>; // [j][d], rows padded to 17

@compute @workgroup_size(256)
fn naive_attention_scores(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let tile = tile_of(n, p.n_tiles);
    if (tile.z > tile.y) { return; } // wholly masked
    let bh = tile.x;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let ly = lid / 16u;
    let lx = lid % 16u;
    let i0 = tile.y * 16u;
    let j0 = tile.z * 16u;
    let row3 = 3u * p.c;
    let base = b * p.t * row3 + h * p.hs;
    var acc = 0.0;
    for (var d0 = 0u; d0 < p.hs; d0 += 16u) {
        let d = d0 + lx;
        var qx = 0.0;
        var kx = 0.0;
        if (d < p.hs && i0 + ly < p.t) { qx = f32(sc_qkv[base + (i0 + ly) * row3 + d]); }
        if (d < p.hs && j0 + ly < p.t) { kx = f32(sc_qkv[base + (j0 + ly) * row3 + p.c + d]); }
        sc_a[ly * 16u + lx] = qx;
        sc_b[ly * 17u + lx] = kx;
        workgroupBarrier();
        for (var dd = 0u; dd < 16u; dd++) { acc = fma(sc_a[ly * 16u + dd], sc_b[lx * 17u + dd], acc); }
        workgroupBarrier();
    }
    let i = i0 + ly;
    let j = j0 + lx;
    if (i < p.t && j < p.t) { sc_att[(bh * p.t + i) * p.t + j] = select(0.0, p.scale * acc, j <= i); }
}
#endif

#if DSCORES
// ---- naive_attention_dscores: datt[b, h, i, j] = dout_i . v_j for j <= i -------------------------
@group(0) @binding(1) var<storage, read> ds_dout: array<{{DOUT_T}}>;   // (B, T, C)
@group(0) @binding(2) var<storage, read> ds_qkv: array<{{QKV_T}}>;     // (B, T, 3*C)
@group(0) @binding(3) var<storage, read_write> ds_datt: array<f32>;    // (B, NH, T, T)

var<workgroup> ds_a: array<f32, 256>; // [i][d]
var<workgroup> ds_b: array<f32, 272>; // [j][d], rows padded to 17

@compute @workgroup_size(256)
fn naive_attention_dscores(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let tile = tile_of(n, p.n_tiles);
    if (tile.z > tile.y) { return; }
    let bh = tile.x;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let ly = lid / 16u;
    let lx = lid % 16u;
    let i0 = tile.y * 16u;
    let j0 = tile.z * 16u;
    let row3 = 3u * p.c;
    let vbase = b * p.t * row3 + 2u * p.c + h * p.hs;
    let obase = b * p.t * p.c + h * p.hs;
    var acc = 0.0;
    for (var d0 = 0u; d0 < p.hs; d0 += 16u) {
        let d = d0 + lx;
        var ox = 0.0;
        var vx = 0.0;
        if (d < p.hs && i0 + ly < p.t) { ox = f32(ds_dout[obase + (i0 + ly) * p.c + d]); }
        if (d < p.hs && j0 + ly < p.t) { vx = f32(ds_qkv[vbase + (j0 + ly) * row3 + d]); }
        ds_a[ly * 16u + lx] = ox;
        ds_b[ly * 17u + lx] = vx;
        workgroupBarrier();
        for (var dd = 0u; dd < 16u; dd++) { acc = fma(ds_a[ly * 16u + dd], ds_b[lx * 17u + dd], acc); }
        workgroupBarrier();
    }
    let i = i0 + ly;
    let j = j0 + lx;
    if (i < p.t && j < p.t) { ds_datt[(bh * p.t + i) * p.t + j] = select(0.0, acc, j <= i); }
}
#endif

#if SOFTMAX
// ---- naive_attention_softmax: att row i = softmax(att[i, 0..=i]), 0 beyond the diagonal ----------
// One workgroup per row (b, h, i), in place.
@group(0) @binding(1) var<storage, read_write> sm_att: array<f32>; // (B, NH, T, T)

var<workgroup> sm_red: array<f32, 256>;

@compute @workgroup_size(256)
fn naive_attention_softmax(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let i = n % p.t;
    let row = n * p.t;
    var m = -3.0e38;
    for (var j = lid; j <= i; j += 256u) { m = max(m, sm_att[row + j]); }
    sm_red[lid] = m;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid < w) { sm_red[lid] = max(sm_red[lid], sm_red[lid + w]); }
        workgroupBarrier();
    }
    m = sm_red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j <= i; j += 256u) { s += exp(sm_att[row + j] - m); }
    sm_red[lid] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid < w) { sm_red[lid] += sm_red[lid + w]; }
        workgroupBarrier();
    }
    let inv = 1.0 / sm_red[0];
    for (var j = lid; j < p.t; j += 256u) {
        var v = 0.0;
        if (j <= i) { v = exp(sm_att[row + j] - m) * inv; }
        sm_att[row + j] = v;
    }
}
#endif

#if SOFTMAX_BACKWARD
// ---- naive_attention_softmax_backward: datt = scale * P * (datt - sum_j P * datt), in place -----
// One workgroup per row (b, h, i); entries beyond the diagonal become 0.
@group(0) @binding(1) var<storage, read> sb_att: array<f32>;        // (B, NH, T, T) probabilities
@group(0) @binding(2) var<storage, read_write> sb_datt: array<f32>; // (B, NH, T, T)

var<workgroup> sb_red: array<f32, 256>;

@compute @workgroup_size(256)
fn naive_attention_softmax_backward(@builtin(workgroup_id) wid: vec3<u32>,
                                    @builtin(num_workgroups) nwg: vec3<u32>,
                                    @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let i = n % p.t;
    let row = n * p.t;
    var s = 0.0;
    for (var j = lid; j <= i; j += 256u) { s = fma(sb_att[row + j], sb_datt[row + j], s); }
    sb_red[lid] = s;
    workgroupBarrier();
    for (var w = 128u; w > 0u; w >>= 1u) {
        if (lid < w) { sb_red[lid] += sb_red[lid + w]; }
        workgroupBarrier();
    }
    let dot = sb_red[0];
    for (var j = lid; j < p.t; j += 256u) {
        var v = 0.0;
        if (j <= i) { v = p.scale * sb_att[row + j] * (sb_datt[row + j] - dot); }
        sb_datt[row + j] = v;
    }
}
#endif

#if VALUES
// ---- naive_attention_values: out[b, i, h*hs + d] = sum_{j <= i} att[b, h, i, j] v[b, j, d] -----
@group(0) @binding(1) var<storage, read> va_att: array<f32>;           // (B, NH, T, T)
@group(0) @binding(2) var<storage, read> va_qkv: array<{{QKV_T}}>;     // (B, T, 3*C)
@group(0) @binding(3) var<storage, read_write> va_out: array<{{OUT_T}}>; // (B, T, C)

var<workgroup> va_a: array<f32, 256>; // [i][j]
var<workgroup> va_b: array<f32, 256>; // [j][d]

@compute @workgroup_size(256)
fn naive_attention_values(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let tile = tile_of(n, (p.hs + 15u) / 16u);
    let bh = tile.x;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let ly = lid / 16u;
    let lx = lid % 16u;
    let i0 = tile.y * 16u;
    let d = tile.z * 16u + lx;
    let row3 = 3u * p.c;
    let vbase = b * p.t * row3 + 2u * p.c + h * p.hs;
    let j_end = min(i0 + 16u, p.t); // causal: no key after the tile's last query
    var acc = 0.0;
    for (var j0 = 0u; j0 < j_end; j0 += 16u) {
        var ax = 0.0;
        var vx = 0.0;
        if (i0 + ly < p.t && j0 + lx < p.t) { ax = va_att[(bh * p.t + i0 + ly) * p.t + j0 + lx]; }
        if (j0 + ly < p.t && d < p.hs) { vx = f32(va_qkv[vbase + (j0 + ly) * row3 + d]); }
        va_a[ly * 16u + lx] = ax;
        va_b[ly * 16u + lx] = vx;
        workgroupBarrier();
        for (var jj = 0u; jj < 16u; jj++) { acc = fma(va_a[ly * 16u + jj], va_b[jj * 16u + lx], acc); }
        workgroupBarrier();
    }
    let i = i0 + ly;
    if (i < p.t && d < p.hs) { va_out[(b * p.t + i) * p.c + h * p.hs + d] = {{OUT_T}}(acc); }
}
#endif

#if DQ
// ---- naive_attention_dq: dq[b, i, h*hs + d] = sum_{j <= i} datt[b, h, i, j] k[b, j, d] ---------
@group(0) @binding(1) var<storage, read> dq_datt: array<f32>;            // (B, NH, T, T)
@group(0) @binding(2) var<storage, read> dq_qkv: array<{{QKV_T}}>;       // (B, T, 3*C)
@group(0) @binding(3) var<storage, read_write> dq_dqkv: array<{{DQKV_T}}>; // (B, T, 3*C)

var<workgroup> dq_a: array<f32, 256>; // [i][j]
var<workgroup> dq_b: array<f32, 256>; // [j][d]

@compute @workgroup_size(256)
fn naive_attention_dq(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let tile = tile_of(n, (p.hs + 15u) / 16u);
    let bh = tile.x;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let ly = lid / 16u;
    let lx = lid % 16u;
    let i0 = tile.y * 16u;
    let d = tile.z * 16u + lx;
    let row3 = 3u * p.c;
    let base = b * p.t * row3 + h * p.hs;
    let j_end = min(i0 + 16u, p.t);
    var acc = 0.0;
    for (var j0 = 0u; j0 < j_end; j0 += 16u) {
        var ax = 0.0;
        var kx = 0.0;
        if (i0 + ly < p.t && j0 + lx < p.t) { ax = dq_datt[(bh * p.t + i0 + ly) * p.t + j0 + lx]; }
        if (j0 + ly < p.t && d < p.hs) { kx = f32(dq_qkv[base + (j0 + ly) * row3 + p.c + d]); }
        dq_a[ly * 16u + lx] = ax;
        dq_b[ly * 16u + lx] = kx;
        workgroupBarrier();
        for (var jj = 0u; jj < 16u; jj++) { acc = fma(dq_a[ly * 16u + jj], dq_b[jj * 16u + lx], acc); }
        workgroupBarrier();
    }
    let i = i0 + ly;
    if (i < p.t && d < p.hs) { dq_dqkv[base + i * row3 + d] = {{DQKV_T}}(acc); }
}
#endif

#if DKDV
// ---- naive_attention_dkdv: dk[j] = sum_{i >= j} datt[i, j] q[i], dv[j] = sum_{i >= j} P[i, j] dout[i]
@group(0) @binding(1) var<storage, read> kv_att: array<f32>;             // (B, NH, T, T) probabilities
@group(0) @binding(2) var<storage, read> kv_datt: array<f32>;            // (B, NH, T, T)
@group(0) @binding(3) var<storage, read> kv_qkv: array<{{QKV_T}}>;       // (B, T, 3*C)
@group(0) @binding(4) var<storage, read> kv_dout: array<{{DOUT_T}}>;     // (B, T, C)
@group(0) @binding(5) var<storage, read_write> kv_dqkv: array<{{DQKV_T}}>; // (B, T, 3*C)

var<workgroup> kv_ds: array<f32, 272>; // [i][j], rows padded to 17
var<workgroup> kv_p: array<f32, 272>;  // [i][j], rows padded to 17
var<workgroup> kv_q: array<f32, 256>;  // [i][d]
var<workgroup> kv_do: array<f32, 256>; // [i][d]

@compute @workgroup_size(256)
fn naive_attention_dkdv(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let tile = tile_of(n, (p.hs + 15u) / 16u);
    let bh = tile.x;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let ly = lid / 16u;
    let lx = lid % 16u;
    let j0 = tile.y * 16u;
    let d = tile.z * 16u + lx;
    let row3 = 3u * p.c;
    let base = b * p.t * row3 + h * p.hs;
    let obase = b * p.t * p.c + h * p.hs;
    var dk = 0.0;
    var dv = 0.0;
    for (var i0 = j0; i0 < p.t; i0 += 16u) { // causal: no query before the tile's first key
        let i = i0 + ly;
        var dsx = 0.0;
        var px = 0.0;
        var qx = 0.0;
        var ox = 0.0;
        if (i < p.t && j0 + lx < p.t) {
            let at = (bh * p.t + i) * p.t + j0 + lx;
            dsx = kv_datt[at];
            px = kv_att[at];
        }
        if (i < p.t && d < p.hs) {
            qx = f32(kv_qkv[base + i * row3 + d]);
            ox = f32(kv_dout[obase + i * p.c + d]);
        }
        kv_ds[ly * 17u + lx] = dsx;
        kv_p[ly * 17u + lx] = px;
        kv_q[ly * 16u + lx] = qx;
        kv_do[ly * 16u + lx] = ox;
        workgroupBarrier();
        for (var ii = 0u; ii < 16u; ii++) {
            dk = fma(kv_ds[ii * 17u + ly], kv_q[ii * 16u + lx], dk);
            dv = fma(kv_p[ii * 17u + ly], kv_do[ii * 16u + lx], dv);
        }
        workgroupBarrier();
    }
    let j = j0 + ly;
    if (j < p.t && d < p.hs) {
        let dst = base + j * row3 + d;
        kv_dqkv[dst + p.c] = {{DQKV_T}}(dk);
        kv_dqkv[dst + 2u * p.c] = {{DQKV_T}}(dv);
    }
}
#endif
