// Flash attention (causal, GPT-2 layout), forward and backward, without any T x T matrix in
// device memory. qkv is (B, T, 3*C): q = channels [0, C), k = [C, 2C), v = [2C, 3C); head h
// uses channels h*HS .. (h+1)*HS of each. Scores are scaled by p.scale = 1/sqrt(HS); key j is
// visible to query i when j <= i. All arithmetic is f32 whatever the storage types.
//
// Every kernel runs 256 threads per workgroup, in three layouts over the tiles it stages:
// - "score" layout: a 16 x 16 thread grid over an R x K tile of scores; thread (si, sj) owns the
//   rows si + 16*a and the columns sj + 16*b, so each loaded q and k value is used several times.
// - "row" layout (forward softmax): 256/BR threads per query row.
// - "accumulate" layout: DG threads across the head dimension, RG = 256/DG across the rows;
//   thread (ar, ad) owns rows ar + RG*a and dims ad + DG*c of a tile-rows x HS accumulator.
// Rows staged for dot products are padded to HS+1 floats so that threads reading different rows
// at the same d hit different shared-memory banks.
//
// Each kernel is compiled alone, selected by one of the defines FORWARD, BACKWARD_PREPROCESS,
// BACKWARD_DKDV, BACKWARD_DQ; see src/ops/attention.rs for the tile sizes (BR, BC, BQ, BK, DG).

struct Params {
    b: u32,
    t: u32,
    nh: u32,
    c: u32,        // NH * HS
    n_blocks: u32, // row blocks per (b, h) that the grid walks
    n_work: u32,   // workgroups (or, for the preprocess kernel, threads) that have work
    scale: f32,    // 1 / sqrt(HS)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const WG: u32 = 256u;
// "minus infinity" for masked scores: below every real score, and exp(NEG - m) == 0.
const NEG: f32 = -3.0e38;

#if !BACKWARD_PREPROCESS
const HS: u32 = {{HS}}u;
const KS: u32 = HS + 1u;             // padded row stride of staged q/k/v/dout rows
const DG: u32 = {{DG}}u;             // accumulate layout: threads across the head dimension
const RG: u32 = WG / DG;             // accumulate layout: threads across the rows
const DPT: u32 = (HS + DG - 1u) / DG; // head dims per thread
#endif

fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

#if FORWARD
// ---- flash_attention_forward -------------------------------------------------------------------
// One workgroup per (query block of BR rows, b, h). Loops over key blocks of BC keys up to the
// causal limit of the block with an online softmax (running max m and sum l per row), then writes
// out = O / l and lse = m + log(l).
const BR: u32 = {{BR}}u;
const BC: u32 = {{BC}}u;
const SA: u32 = BR / 16u;               // score rows per thread
const SB: u32 = BC / 16u;               // score columns per thread
const SS: u32 = BC + 1u;                // padded score row stride
const TPR: u32 = WG / BR;               // row layout: threads per row
const CPT: u32 = (BC + TPR - 1u) / TPR; // row layout: columns per thread
const ORT: u32 = (BR + RG - 1u) / RG;   // accumulate layout: rows per thread

@group(0) @binding(1) var<storage, read> f_qkv: array<{{QKV_T}}>;       // (B, T, 3*C)
@group(0) @binding(2) var<storage, read_write> f_out: array<{{OUT_T}}>; // (B, T, C)
@group(0) @binding(3) var<storage, read_write> f_lse: array<f32>;       // (B, NH, T)

var<workgroup> f_q: array<f32, BR * KS>;  // query block
var<workgroup> f_k: array<f32, BC * KS>;  // key block
var<workgroup> f_v: array<f32, BC * HS>;  // value block (read along d only: no padding needed)
var<workgroup> f_s: array<f32, BR * SS>;  // scores, then probabilities; at the end partial sums
var<workgroup> f_row: array<f32, BR>;     // per row: rescale factor, at the end the sum l

@compute @workgroup_size(256)
fn flash_attention_forward(@builtin(workgroup_id) wid: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let bh_count = p.b * p.nh;
    // The longest query blocks (most key blocks) are dispatched first so the tail is short.
    let qb = p.n_blocks - 1u - n / bh_count;
    let bh = n % bh_count;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let q0 = qb * BR;
    let row3 = 3u * p.c;
    let base = b * p.t * row3 + h * HS; // qkv index of (b, t = 0, q channels of head h)

    for (var e = lid; e < BR * HS; e += WG) {
        let i = e / HS;
        let d = e % HS;
        var x = 0.0;
        if (q0 + i < p.t) { x = f32(f_qkv[base + (q0 + i) * row3 + d]); }
        f_q[i * KS + d] = x;
    }

    let si = lid / 16u;
    let sj = lid % 16u;
    let rr = lid / TPR;
    let rg = lid % TPR;
    let ar = lid / DG;
    let ad = lid % DG;
    var m_run = NEG;  // running max of row rr (the same in all TPR threads of the row)
    var l_part = 0.0; // this thread's share of the running sum of row rr
    var acc: array<f32, ORT * DPT>;
    for (var x = 0u; x < ORT * DPT; x++) { acc[x] = 0.0; }

    let last_key = min(q0 + BR, p.t) - 1u;
    let n_kb = last_key / BC + 1u;
    for (var kb = 0u; kb < n_kb; kb++) {
        let k0 = kb * BC;
        for (var e = lid; e < BC * HS; e += WG) {
            let j = e / HS;
            let d = e % HS;
            var kx = 0.0;
            var vx = 0.0;
            if (k0 + j < p.t) {
                let src = base + (k0 + j) * row3 + d;
                kx = f32(f_qkv[src + p.c]);
                vx = f32(f_qkv[src + 2u * p.c]);
            }
            f_k[j * KS + d] = kx;
            f_v[j * HS + d] = vx;
        }
        workgroupBarrier();

        // Scores, score layout.
        var s: array<f32, SA * SB>;
        for (var x = 0u; x < SA * SB; x++) { s[x] = 0.0; }
        for (var d = 0u; d < HS; d++) {
            var kv: array<f32, SB>;
            for (var y = 0u; y < SB; y++) { kv[y] = f_k[(sj + 16u * y) * KS + d]; }
            for (var a = 0u; a < SA; a++) {
                let qv = f_q[(si + 16u * a) * KS + d];
                for (var y = 0u; y < SB; y++) { s[a * SB + y] = fma(qv, kv[y], s[a * SB + y]); }
            }
        }
        for (var a = 0u; a < SA; a++) {
            let i = si + 16u * a;
            for (var y = 0u; y < SB; y++) {
                let j = sj + 16u * y;
                let visible = k0 + j <= q0 + i && k0 + j < p.t;
                f_s[i * SS + j] = select(NEG, p.scale * s[a * SB + y], visible);
            }
        }
        workgroupBarrier();

        // Online softmax, row layout: every thread of a row finds the same new max...
        var m_blk = NEG;
        for (var j = 0u; j < BC; j++) { m_blk = max(m_blk, f_s[rr * SS + j]); }
        let m_new = max(m_run, m_blk);
        let alpha = exp(m_run - m_new);
        m_run = m_new;
        workgroupBarrier();
        // ...then turns its own columns into probabilities (masked entries exactly 0).
        l_part *= alpha;
        for (var x = 0u; x < CPT; x++) {
            let j = rg + TPR * x;
            if (j < BC) {
                let sv = f_s[rr * SS + j];
                let pv = select(0.0, exp(sv - m_new), sv > NEG);
                f_s[rr * SS + j] = pv;
                l_part += pv;
            }
        }
        if (rg == 0u) { f_row[rr] = alpha; }
        workgroupBarrier();

        // O = alpha * O + P V, accumulate layout.
        for (var a = 0u; a < ORT; a++) {
            let i = ar + RG * a;
            if (i < BR) {
                let al = f_row[i];
                for (var x = 0u; x < DPT; x++) { acc[a * DPT + x] *= al; }
            }
        }
        for (var j = 0u; j < BC; j++) {
            var vv: array<f32, DPT>;
            for (var x = 0u; x < DPT; x++) {
                let d = ad + DG * x;
                vv[x] = select(0.0, f_v[j * HS + min(d, HS - 1u)], d < HS);
            }
            for (var a = 0u; a < ORT; a++) {
                let i = min(ar + RG * a, BR - 1u);
                let pv = f_s[i * SS + j];
                for (var x = 0u; x < DPT; x++) { acc[a * DPT + x] = fma(pv, vv[x], acc[a * DPT + x]); }
            }
        }
        workgroupBarrier();
    }

    // Row sums: the TPR partial sums of each row, added in a fixed order.
    f_s[lid] = l_part; // lid == rr * TPR + rg
    workgroupBarrier();
    if (rg == 0u) {
        var l = 0.0;
        for (var g = 0u; g < TPR; g++) { l += f_s[rr * TPR + g]; }
        f_row[rr] = l;
        if (q0 + rr < p.t) { f_lse[bh * p.t + q0 + rr] = m_run + log(l); }
    }
    workgroupBarrier();
    for (var a = 0u; a < ORT; a++) {
        let i = ar + RG * a;
        if (i < BR && q0 + i < p.t) {
            let l = f_row[i];
            let dst = (b * p.t + q0 + i) * p.c + h * HS;
            for (var x = 0u; x < DPT; x++) {
                let d = ad + DG * x;
                if (d < HS) { f_out[dst + d] = {{OUT_T}}(acc[a * DPT + x] / l); }
            }
        }
    }
}
#endif

#if BACKWARD_PREPROCESS
// ---- flash_attention_backward_preprocess: D[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d]
// (FlashAttention-2's D, for the cooperative-matrix backward; the f32 kernels below sum D from
// P and dP instead, in the dQ pass.)
// One thread per (b, t, h), heads fastest so neighbouring threads read neighbouring memory.
@group(0) @binding(1) var<storage, read> pre_dout: array<{{DOUT_T}}>; // (B, T, C)
@group(0) @binding(2) var<storage, read> pre_out: array<{{OUT_T}}>;   // (B, T, C)
@group(0) @binding(3) var<storage, read_write> pre_d: array<f32>;     // (B, NH, T)

@compute @workgroup_size(256)
fn flash_attention_backward_preprocess(@builtin(workgroup_id) wid: vec3<u32>,
                                       @builtin(num_workgroups) nwg: vec3<u32>,
                                       @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg) * WG + lid;
    if (n >= p.n_work) { return; }
    let hs = p.c / p.nh;
    let h = n % p.nh;
    let bt = n / p.nh;
    let b = bt / p.t;
    let t = bt % p.t;
    let src = bt * p.c + h * hs;
    var acc = 0.0;
    for (var d = 0u; d < hs; d++) { acc = fma(f32(pre_dout[src + d]), f32(pre_out[src + d]), acc); }
    pre_d[(b * p.nh + h) * p.t + t] = acc;
}
#endif

#if BACKWARD_DKDV
// ---- flash_attention_backward_dkdv -------------------------------------------------------------
// One workgroup per (key block of BK keys, b, h); loops over the query blocks (BQ rows) at or
// after it, recomputing P = exp(scale * q.k - lse) and dS = P * (dout.v - D), D as the dQ pass
// (which runs first) wrote it:
//   dV[j] = sum_i P[i, j] dout[i],   dK[j] = scale * sum_i dS[i, j] q[i].
const BQ: u32 = {{BQ}}u;
const BK: u32 = {{BK}}u;
const SA: u32 = BQ / 16u;             // score rows (queries) per thread
const SB: u32 = BK / 16u;             // score columns (keys) per thread
const PS: u32 = BK + 1u;              // padded probability row stride
const ORT: u32 = (BK + RG - 1u) / RG; // accumulate layout: key rows per thread

@group(0) @binding(1) var<storage, read> kv_qkv: array<{{QKV_T}}>;         // (B, T, 3*C)
@group(0) @binding(2) var<storage, read> kv_dout: array<{{DOUT_T}}>;       // (B, T, C)
@group(0) @binding(3) var<storage, read> kv_lse: array<f32>;               // (B, NH, T)
@group(0) @binding(4) var<storage, read> kv_dd: array<f32>;                // (B, NH, T)
@group(0) @binding(5) var<storage, read_write> kv_dqkv: array<{{DQKV_T}}>; // (B, T, 3*C)

var<workgroup> kv_k: array<f32, BK * KS>;
var<workgroup> kv_v: array<f32, BK * KS>;
var<workgroup> kv_q: array<f32, BQ * KS>;
var<workgroup> kv_do: array<f32, BQ * KS>;
var<workgroup> kv_p: array<f32, BQ * PS>;
var<workgroup> kv_ds: array<f32, BQ * PS>;
var<workgroup> kv_lse_s: array<f32, BQ>;
var<workgroup> kv_d_s: array<f32, BQ>;

@compute @workgroup_size(256)
fn flash_attention_backward_dkdv(@builtin(workgroup_id) wid: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let bh_count = p.b * p.nh;
    let kb = n / bh_count; // the first key blocks see the most queries: dispatched first
    let bh = n % bh_count;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let k0 = kb * BK;
    let row3 = 3u * p.c;
    let base = b * p.t * row3 + h * HS;
    let obase = b * p.t * p.c + h * HS;

    for (var e = lid; e < BK * HS; e += WG) {
        let j = e / HS;
        let d = e % HS;
        var kx = 0.0;
        var vx = 0.0;
        if (k0 + j < p.t) {
            let src = base + (k0 + j) * row3 + d;
            kx = f32(kv_qkv[src + p.c]);
            vx = f32(kv_qkv[src + 2u * p.c]);
        }
        kv_k[j * KS + d] = kx;
        kv_v[j * KS + d] = vx;
    }

    let si = lid / 16u;
    let sj = lid % 16u;
    let ar = lid / DG;
    let ad = lid % DG;
    var dk: array<f32, ORT * DPT>;
    var dv: array<f32, ORT * DPT>;
    for (var x = 0u; x < ORT * DPT; x++) {
        dk[x] = 0.0;
        dv[x] = 0.0;
    }

    let n_qb = (p.t + BQ - 1u) / BQ;
    for (var qb = k0 / BQ; qb < n_qb; qb++) {
        let q0 = qb * BQ;
        for (var e = lid; e < BQ * HS; e += WG) {
            let i = e / HS;
            let d = e % HS;
            var qx = 0.0;
            var ox = 0.0;
            if (q0 + i < p.t) {
                qx = f32(kv_qkv[base + (q0 + i) * row3 + d]);
                ox = f32(kv_dout[obase + (q0 + i) * p.c + d]);
            }
            kv_q[i * KS + d] = qx;
            kv_do[i * KS + d] = ox;
        }
        if (lid < BQ) {
            let inside = q0 + lid < p.t;
            let at = bh * p.t + min(q0 + lid, p.t - 1u);
            kv_lse_s[lid] = select(0.0, kv_lse[at], inside);
            kv_d_s[lid] = select(0.0, kv_dd[at], inside);
        }
        workgroupBarrier();

        // P and dS, score layout (rows = queries, columns = keys).
        var s: array<f32, SA * SB>;
        var dp: array<f32, SA * SB>;
        for (var x = 0u; x < SA * SB; x++) {
            s[x] = 0.0;
            dp[x] = 0.0;
        }
        for (var d = 0u; d < HS; d++) {
            var kk: array<f32, SB>;
            var vv: array<f32, SB>;
            for (var y = 0u; y < SB; y++) {
                kk[y] = kv_k[(sj + 16u * y) * KS + d];
                vv[y] = kv_v[(sj + 16u * y) * KS + d];
            }
            for (var a = 0u; a < SA; a++) {
                let qv = kv_q[(si + 16u * a) * KS + d];
                let ov = kv_do[(si + 16u * a) * KS + d];
                for (var y = 0u; y < SB; y++) {
                    s[a * SB + y] = fma(qv, kk[y], s[a * SB + y]);
                    dp[a * SB + y] = fma(ov, vv[y], dp[a * SB + y]);
                }
            }
        }
        for (var a = 0u; a < SA; a++) {
            let i = si + 16u * a;
            for (var y = 0u; y < SB; y++) {
                let j = sj + 16u * y;
                let visible = k0 + j <= q0 + i && q0 + i < p.t;
                let pv = select(0.0, exp(p.scale * s[a * SB + y] - kv_lse_s[i]), visible);
                kv_p[i * PS + j] = pv;
                kv_ds[i * PS + j] = pv * (dp[a * SB + y] - kv_d_s[i]);
            }
        }
        workgroupBarrier();

        // dV += P^T dout, dK += dS^T q, accumulate layout (rows = keys).
        for (var i = 0u; i < BQ; i++) {
            var qq: array<f32, DPT>;
            var oo: array<f32, DPT>;
            for (var x = 0u; x < DPT; x++) {
                let d = min(ad + DG * x, HS - 1u);
                qq[x] = kv_q[i * KS + d];
                oo[x] = kv_do[i * KS + d];
            }
            for (var a = 0u; a < ORT; a++) {
                let j = min(ar + RG * a, BK - 1u);
                let pv = kv_p[i * PS + j];
                let dsv = kv_ds[i * PS + j];
                for (var x = 0u; x < DPT; x++) {
                    dv[a * DPT + x] = fma(pv, oo[x], dv[a * DPT + x]);
                    dk[a * DPT + x] = fma(dsv, qq[x], dk[a * DPT + x]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var a = 0u; a < ORT; a++) {
        let j = ar + RG * a;
        if (j < BK && k0 + j < p.t) {
            let dst = base + (k0 + j) * row3;
            for (var x = 0u; x < DPT; x++) {
                let d = ad + DG * x;
                if (d < HS) {
                    kv_dqkv[dst + p.c + d] = {{DQKV_T}}(p.scale * dk[a * DPT + x]);
                    kv_dqkv[dst + 2u * p.c + d] = {{DQKV_T}}(dv[a * DPT + x]);
                }
            }
        }
    }
}
#endif

#if BACKWARD_DQ
// ---- flash_attention_backward_dq ---------------------------------------------------------------
// One workgroup per (query block of BQ rows, b, h); loops over the key blocks (BK keys) up to the
// causal limit, recomputing P = exp(scale * q.k - lse) and dP = dout.v. With E = P * dP,
//   D[i] = sum_j E[i, j],   dQ[i] = scale * sum_j P[i, j] (dP[i, j] - D[i]) k[j]
//                                 = scale * (sum_j E[i, j] k[j] - D[i] * sum_j P[i, j] k[j]),
// so one pass sums both vectors and D, and writes D for the dK/dV pass. D summed from the very
// P and dP that dS is formed from keeps every row of dS summing to zero, as the softmax's
// gradient does (a row attending to one key gets dS = 0 exactly). FlashAttention-2's D, the dot
// product of dout with the rounded output, differs from that sum by a rounding error that every
// dS of the row then carries, and dQ and dK turn it into a gradient along the row's mean key
// and the queries: several times the f32 rounding of the other gradients.
const BQ: u32 = {{BQ}}u;
const BK: u32 = {{BK}}u;
const SA: u32 = BQ / 16u;
const SB: u32 = BK / 16u;
const PS: u32 = BK + 1u;
const ORT: u32 = (BQ + RG - 1u) / RG; // accumulate layout: query rows per thread

@group(0) @binding(1) var<storage, read> dq_qkv: array<{{QKV_T}}>;         // (B, T, 3*C)
@group(0) @binding(2) var<storage, read> dq_dout: array<{{DOUT_T}}>;       // (B, T, C)
@group(0) @binding(3) var<storage, read> dq_lse: array<f32>;               // (B, NH, T)
@group(0) @binding(4) var<storage, read_write> dq_dd: array<f32>;          // (B, NH, T): D
@group(0) @binding(5) var<storage, read_write> dq_dqkv: array<{{DQKV_T}}>; // (B, T, 3*C)

var<workgroup> dq_q: array<f32, BQ * KS>;
var<workgroup> dq_do: array<f32, BQ * KS>;
var<workgroup> dq_k: array<f32, BK * KS>;
var<workgroup> dq_v: array<f32, BK * KS>;
var<workgroup> dq_e: array<f32, BQ * PS>; // E = P * dP
var<workgroup> dq_p: array<f32, BQ * PS>; // P
var<workgroup> dq_lse_s: array<f32, BQ>;

@compute @workgroup_size(256)
fn flash_attention_backward_dq(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let bh_count = p.b * p.nh;
    let qb = p.n_blocks - 1u - n / bh_count; // longest first
    let bh = n % bh_count;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let q0 = qb * BQ;
    let row3 = 3u * p.c;
    let base = b * p.t * row3 + h * HS;
    let obase = b * p.t * p.c + h * HS;

    for (var e = lid; e < BQ * HS; e += WG) {
        let i = e / HS;
        let d = e % HS;
        var qx = 0.0;
        var ox = 0.0;
        if (q0 + i < p.t) {
            qx = f32(dq_qkv[base + (q0 + i) * row3 + d]);
            ox = f32(dq_dout[obase + (q0 + i) * p.c + d]);
        }
        dq_q[i * KS + d] = qx;
        dq_do[i * KS + d] = ox;
    }
    if (lid < BQ) {
        let inside = q0 + lid < p.t;
        let at = bh * p.t + min(q0 + lid, p.t - 1u);
        dq_lse_s[lid] = select(0.0, dq_lse[at], inside);
    }

    let si = lid / 16u;
    let sj = lid % 16u;
    let ar = lid / DG;
    let ad = lid % DG;
    // Accumulate layout: sum_j E k and sum_j P k of this thread's rows and dims, and D of its
    // rows (the DG threads of a row sum the same E in the same order).
    var ek: array<f32, ORT * DPT>;
    var pk: array<f32, ORT * DPT>;
    var dsum: array<f32, ORT>;
    for (var x = 0u; x < ORT * DPT; x++) {
        ek[x] = 0.0;
        pk[x] = 0.0;
    }
    for (var a = 0u; a < ORT; a++) { dsum[a] = 0.0; }

    let last_key = min(q0 + BQ, p.t) - 1u;
    let n_kb = last_key / BK + 1u;
    for (var kb = 0u; kb < n_kb; kb++) {
        let k0 = kb * BK;
        for (var e = lid; e < BK * HS; e += WG) {
            let j = e / HS;
            let d = e % HS;
            var kx = 0.0;
            var vx = 0.0;
            if (k0 + j < p.t) {
                let src = base + (k0 + j) * row3 + d;
                kx = f32(dq_qkv[src + p.c]);
                vx = f32(dq_qkv[src + 2u * p.c]);
            }
            dq_k[j * KS + d] = kx;
            dq_v[j * KS + d] = vx;
        }
        workgroupBarrier();

        var s: array<f32, SA * SB>;
        var dp: array<f32, SA * SB>;
        for (var x = 0u; x < SA * SB; x++) {
            s[x] = 0.0;
            dp[x] = 0.0;
        }
        for (var d = 0u; d < HS; d++) {
            var kk: array<f32, SB>;
            var vv: array<f32, SB>;
            for (var y = 0u; y < SB; y++) {
                kk[y] = dq_k[(sj + 16u * y) * KS + d];
                vv[y] = dq_v[(sj + 16u * y) * KS + d];
            }
            for (var a = 0u; a < SA; a++) {
                let qv = dq_q[(si + 16u * a) * KS + d];
                let ov = dq_do[(si + 16u * a) * KS + d];
                for (var y = 0u; y < SB; y++) {
                    s[a * SB + y] = fma(qv, kk[y], s[a * SB + y]);
                    dp[a * SB + y] = fma(ov, vv[y], dp[a * SB + y]);
                }
            }
        }
        for (var a = 0u; a < SA; a++) {
            let i = si + 16u * a;
            for (var y = 0u; y < SB; y++) {
                let j = sj + 16u * y;
                let visible = k0 + j <= q0 + i && q0 + i < p.t;
                let pv = select(0.0, exp(p.scale * s[a * SB + y] - dq_lse_s[i]), visible);
                dq_p[i * PS + j] = pv;
                dq_e[i * PS + j] = pv * dp[a * SB + y];
            }
        }
        workgroupBarrier();

        // E K, P K and D, accumulate layout (rows = queries), keys in order.
        for (var j = 0u; j < BK; j++) {
            var kk: array<f32, DPT>;
            for (var x = 0u; x < DPT; x++) { kk[x] = dq_k[j * KS + min(ad + DG * x, HS - 1u)]; }
            for (var a = 0u; a < ORT; a++) {
                let i = min(ar + RG * a, BQ - 1u);
                let ev = dq_e[i * PS + j];
                let pv = dq_p[i * PS + j];
                dsum[a] = dsum[a] + ev;
                for (var x = 0u; x < DPT; x++) {
                    ek[a * DPT + x] = fma(ev, kk[x], ek[a * DPT + x]);
                    pk[a * DPT + x] = fma(pv, kk[x], pk[a * DPT + x]);
                }
            }
        }
        workgroupBarrier();
    }

    for (var a = 0u; a < ORT; a++) {
        let i = ar + RG * a;
        if (i < BQ && q0 + i < p.t) {
            let dst = base + (q0 + i) * row3;
            for (var x = 0u; x < DPT; x++) {
                let d = ad + DG * x;
                if (d < HS) {
                    let dqv = ek[a * DPT + x] - dsum[a] * pk[a * DPT + x];
                    dq_dqkv[dst + d] = {{DQKV_T}}(p.scale * dqv);
                }
            }
            if (ad == 0u) { dq_dd[bh * p.t + q0 + i] = dsum[a]; }
        }
    }
}
#endif
