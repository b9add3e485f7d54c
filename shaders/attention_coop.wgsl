#if !EMULATE_COOP
enable wgpu_cooperative_matrix;
#endif

// Flash attention (causal, GPT-2 layout) on cooperative matrices (tensor cores): f16 operands,
// f32 sums. The same problem, layouts and parameters as attention_flash.wgsl (qkv (B, T, 3C),
// out (B, T, C), lse and D (B, NH, T) f32, scale = 1/sqrt(HS), key j visible to query i when
// j <= i), for a head size HS that is a multiple of 16 and f16 qkv.
//
// A workgroup is WARPS subgroups ("warps") plus, should the subgroups be smaller than SG, surplus
// ones; it owns an outer block of ROWS = 16 * WARPS rows (queries in the forward and dQ kernels,
// keys in the dK/dV kernel), 16 per warp, and walks inner blocks of BN rows (keys, or queries).
// The products run on 16 x 16 fragments read from f16 tiles staged in workgroup memory (wg_h,
// rows padded by 8 f16: 16-byte aligned fragment pointers and strides, and the 8 rows an 8 x 8
// load reads in different banks). A fragment's elements lie where the hardware puts them, so
// everything element-wise (mask, softmax, dS) goes through the warp's f32 slot of wg_f: each
// warp stores its score fragments there row-major (coopStoreT), its lanes work on the rows, and
// write P or dS back as f16 tiles for the next product. Surplus subgroups repeat the last warp's
// work in a spare slot that is never read and write nothing to device memory.
//
// Kernels (one per define):
// - FORWARD: per key block S = Q K^T, online softmax by rows (running max and sum per row in
//   workgroup memory), P in f16, then O = alpha * O + P V with O held by the lanes in f32.
// - BACKWARD_DQ (FlashAttention-2): per query block, over key blocks up to the causal limit:
//   S = Q K^T and dP = dO V^T, P = exp(scale * S - lse), dS = P * (dP - D), dQ += dS K in f32
//   fragments; dQ = scale * dQ.
// - BACKWARD_DKDV: per key block, over query blocks from the causal start: S^T = K Q^T,
//   dP^T = V dO^T, P^T and dS^T as above, dV += P^T dO, dK += dS^T Q; dK = scale * dK.
// Both backward passes recompute P from the forward's lse; D = rowsum(dout * out) comes from
// attention_flash.wgsl's preprocess kernel. Every sum runs in a fixed order: reruns are bitwise
// equal, and nothing is added with atomics.
//
// EMULATE_COOP replaces the cooperative-matrix operations by plain-WGSL stand-ins that follow
// their SPIR-V definition (as in matmul_coop.wgsl), so that everything else runs, slowly, on
// adapters without cooperative matrices.
//
// Defines: HS, WARPS, BN, SG (invocations per subgroup the workgroup is sized for), SF (f32 row
// stride of a warp slot: at least 2*BN + 4 and HS, a multiple of 4), H_T (always f16), QKV_T
// (f16), OUT_T, DOUT_T, DQKV_T, EMULATE_COOP, and one of FORWARD, BACKWARD_DQ, BACKWARD_DKDV.
// Grid: linear workgroup id wid.x + wid.y * nwg.x.

struct Params {
    b: u32,
    t: u32,
    nh: u32,
    c: u32,        // NH * HS
    n_blocks: u32, // outer blocks per (b, h)
    n_work: u32,   // workgroups that have work
    scale: f32,    // 1 / sqrt(HS)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const HS: u32 = {{HS}}u;
const WARPS: u32 = {{WARPS}}u;
const SG: u32 = {{SG}}u;
const BN: u32 = {{BN}}u;
const SF: u32 = {{SF}}u;
const THREADS: u32 = WARPS * SG;
const ROWS: u32 = 16u * WARPS;
const SLOTS: u32 = WARPS + 1u;
const SH: u32 = HS + 8u;    // f16 row stride of staged q / k / v / dout rows
const SP: u32 = BN + 8u;    // f16 row stride of a warp's P / dS tile
const PT_LEN: u32 = 16u * SP;
const SLOT_F: u32 = 16u * SF;
const DPO: u32 = BN + 4u;   // column of dP in a warp's f32 slot
const OF: u32 = HS / 16u;   // fragments across the head dimension
const NF: u32 = BN / 16u;   // fragments across the inner block
const SHARE: u32 = 256u / SG; // elements of a 16 x 16 fragment per lane
// "minus infinity" for masked scores: below every real score, and exp(NEG - m) == 0.
const NEG: f32 = -3.0e38;

var<private> lane: u32;

fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

#if FORWARD
// Q (outer), K and V (inner), one P tile per slot.
const QO: u32 = 0u;
const KO: u32 = QO + ROWS * SH;
const VO: u32 = KO + BN * SH;
const PO: u32 = VO + BN * SH;
const H_LEN: u32 = PO + SLOTS * PT_LEN;
#endif
#if BACKWARD_DQ
// Q and dout (outer), K and V (inner), one dS tile per slot.
const QO: u32 = 0u;
const DOO: u32 = QO + ROWS * SH;
const KO: u32 = DOO + ROWS * SH;
const VO: u32 = KO + BN * SH;
const DSO: u32 = VO + BN * SH;
const H_LEN: u32 = DSO + SLOTS * PT_LEN;
#endif
#if BACKWARD_DKDV
// K and V (outer), Q and dout (inner), one P^T and one dS^T tile per slot.
const KO: u32 = 0u;
const VO: u32 = KO + ROWS * SH;
const QO: u32 = VO + ROWS * SH;
const DOO: u32 = QO + BN * SH;
const PO: u32 = DOO + BN * SH;
const DSO: u32 = PO + SLOTS * PT_LEN;
const H_LEN: u32 = DSO + SLOTS * PT_LEN;
#endif

var<workgroup> wg_h: array<{{H_T}}, H_LEN>;
var<workgroup> wg_f: array<f32, SLOTS * SLOT_F>;

#if EMULATE_COOP
// Stand-ins for the cooperative-matrix operations. An A or B fragment is where it lies in wg_h
// (start, stride, row-major), read by the multiply-add before the next barrier; loads follow
// SPIR-V's OpCooperativeMatrixLoadKHR: row-major (coopLoadT) puts element (r, c) at
// start + r*stride + c, column-major (coopLoad) at start + c*stride + r. A C fragment is spread
// over the subgroup: lane l holds elements e = t*SG + l, (r, c) = (e / 16, e % 16).
alias FragA = vec3<u32>;
alias FragB = vec3<u32>;
alias FragC = array<f32, SHARE>;

fn emulated_offset(r: u32, c: u32, f: vec3<u32>) -> u32 {
    return f.x + select(c * f.y + r, r * f.y + c, f.z != 0u);
}

fn load_a(start: u32, stride: u32) -> FragA {
    return vec3<u32>(start, stride, 1u);
}

fn load_b_row(start: u32, stride: u32) -> FragB {
    return vec3<u32>(start, stride, 1u);
}

fn load_b_col(start: u32, stride: u32) -> FragB {
    return vec3<u32>(start, stride, 0u);
}

fn mma(a: FragA, b: FragB, c: FragC) -> FragC {
    var out = c;
    for (var t = 0u; t < SHARE; t++) {
        let e = t * SG + lane;
        let r = e / 16u;
        let q = e % 16u;
        var s = out[t];
        for (var k = 0u; k < 16u; k++) {
            s = s + f32(wg_h[emulated_offset(r, k, a)]) * f32(wg_h[emulated_offset(k, q, b)]);
        }
        out[t] = s;
    }
    return out;
}

// coopStoreT into wg_f.
fn store_f(m: FragC, start: u32, stride: u32) {
    for (var t = 0u; t < SHARE; t++) {
        let e = t * SG + lane;
        wg_f[start + (e / 16u) * stride + e % 16u] = m[t];
    }
}
#else
alias FragA = coop_mat16x16<{{H_T}}, A>;
alias FragB = coop_mat16x16<{{H_T}}, B>;
alias FragC = coop_mat16x16<f32, C>;

fn load_a(start: u32, stride: u32) -> FragA {
    return coopLoadT<FragA>(&wg_h[start], stride);
}

fn load_b_row(start: u32, stride: u32) -> FragB {
    return coopLoadT<FragB>(&wg_h[start], stride);
}

fn load_b_col(start: u32, stride: u32) -> FragB {
    return coopLoad<FragB>(&wg_h[start], stride);
}

fn mma(a: FragA, b: FragB, c: FragC) -> FragC {
    return coopMultiplyAdd(a, b, c);
}

fn store_f(m: FragC, start: u32, stride: u32) {
    coopStoreT(m, &wg_f[start], stride);
}
#endif

#if FORWARD
@group(0) @binding(1) var<storage, read> f_qkv: array<{{QKV_T}}>;       // (B, T, 3*C)
@group(0) @binding(2) var<storage, read_write> f_out: array<{{OUT_T}}>; // (B, T, C)
@group(0) @binding(3) var<storage, read_write> f_lse: array<f32>;       // (B, NH, T)

// Per slot row: running max, running sum, last rescale factor.
var<workgroup> row_m: array<f32, SLOTS * 16u>;
var<workgroup> row_l: array<f32, SLOTS * 16u>;
var<workgroup> row_alpha: array<f32, SLOTS * 16u>;

// Rows [0, n) of the head's channels `ch` (q 0, k C, v 2C) from row t0 on, into wg_h at `at`.
fn stage_qkv(at: u32, base: u32, t0: u32, n: u32, ch: u32, lid: u32) {
    let row3 = 3u * p.c;
    for (var e = lid; e < n * HS; e += THREADS) {
        let i = e / HS;
        let d = e % HS;
        var x = {{H_T}}(0.0);
        if (t0 + i < p.t) { x = {{H_T}}(f_qkv[base + (t0 + i) * row3 + ch + d]); }
        wg_h[at + i * SH + d] = x;
    }
}

@compute @workgroup_size(THREADS)
fn attention_coop_forward(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32,
                          @builtin(subgroup_id) sg: u32,
                          @builtin(subgroup_invocation_id) sg_lane: u32) {
    lane = sg_lane;
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let bh_count = p.b * p.nh;
    let qb = p.n_blocks - 1u - n / bh_count; // longest first
    let bh = n % bh_count;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let q0 = qb * ROWS;
    let base = b * p.t * 3u * p.c + h * HS;

    let warp = min(sg, WARPS - 1u);
    let slot = min(sg, WARPS);
    let m0 = warp * 16u;
    let fs = slot * SLOT_F;
    let ps = PO + slot * PT_LEN;

    stage_qkv(QO, base, q0, ROWS, 0u, lid);
    for (var r = lane; r < 16u; r += SG) {
        row_m[slot * 16u + r] = NEG;
        row_l[slot * 16u + r] = 0.0;
    }
    var o: array<f32, OF * SHARE>;

    let n_kb = (min(q0 + ROWS, p.t) - 1u) / BN + 1u;
    for (var kb = 0u; kb < n_kb; kb++) {
        let k0 = kb * BN;
        stage_qkv(KO, base, k0, BN, p.c, lid);
        stage_qkv(VO, base, k0, BN, 2u * p.c, lid);
        workgroupBarrier();

        // S = Q K^T: B(d, key) = K[key][d], column-major in the staged K.
        for (var j = 0u; j < NF; j++) {
            var s: FragC;
            for (var dd = 0u; dd < OF; dd++) {
                let a = load_a(QO + m0 * SH + dd * 16u, SH);
                let bk = load_b_col(KO + j * 16u * SH + dd * 16u, SH);
                s = mma(a, bk, s);
            }
            store_f(s, fs + j * 16u, SF);
        }
        workgroupBarrier();

        // Online softmax, one lane per row.
        for (var r = lane; r < 16u; r += SG) {
            let i = q0 + m0 + r;
            let at = fs + r * SF;
            var m_blk = NEG;
            for (var j = 0u; j < BN; j++) {
                let visible = k0 + j <= i && k0 + j < p.t;
                m_blk = max(m_blk, select(NEG, p.scale * wg_f[at + j], visible));
            }
            let m_old = row_m[slot * 16u + r];
            let m_new = max(m_old, m_blk);
            let alpha = exp(m_old - m_new);
            var l = row_l[slot * 16u + r] * alpha;
            for (var j = 0u; j < BN; j++) {
                let visible = k0 + j <= i && k0 + j < p.t;
                let pv = {{H_T}}(select(0.0, exp(p.scale * wg_f[at + j] - m_new), visible));
                wg_h[ps + r * SP + j] = pv;
                l += f32(pv); // the sum of the probabilities P V uses
            }
            row_m[slot * 16u + r] = m_new;
            row_l[slot * 16u + r] = l;
            row_alpha[slot * 16u + r] = alpha;
        }
        workgroupBarrier();

        // P V: B(key, d) = V[key][d], row-major in the staged V.
        for (var f = 0u; f < OF; f++) {
            var pv: FragC;
            for (var kk = 0u; kk < NF; kk++) {
                let a = load_a(ps + kk * 16u, SP);
                let bv = load_b_row(VO + kk * 16u * SH + f * 16u, SH);
                pv = mma(a, bv, pv);
            }
            store_f(pv, fs + f * 16u, SF);
        }
        workgroupBarrier();

        // O = alpha * O + P V, each lane its share of every fragment.
        for (var f = 0u; f < OF; f++) {
            for (var t = 0u; t < SHARE; t++) {
                let e = t * SG + lane;
                let r = e / 16u;
                let x = f * SHARE + t;
                o[x] = row_alpha[slot * 16u + r] * o[x] + wg_f[fs + r * SF + f * 16u + e % 16u];
            }
        }
        workgroupBarrier();
    }

    if (sg < WARPS) {
        for (var r = lane; r < 16u; r += SG) {
            let i = q0 + m0 + r;
            if (i < p.t) { f_lse[bh * p.t + i] = row_m[slot * 16u + r] + log(row_l[slot * 16u + r]); }
        }
        for (var f = 0u; f < OF; f++) {
            for (var t = 0u; t < SHARE; t++) {
                let e = t * SG + lane;
                let r = e / 16u;
                let i = q0 + m0 + r;
                if (i < p.t) {
                    let dst = (b * p.t + i) * p.c + h * HS + f * 16u + e % 16u;
                    f_out[dst] = {{OUT_T}}(o[f * SHARE + t] / row_l[slot * 16u + r]);
                }
            }
        }
    }
}
#endif

#if !FORWARD
@group(0) @binding(1) var<storage, read> g_qkv: array<{{QKV_T}}>;         // (B, T, 3*C)
@group(0) @binding(2) var<storage, read> g_dout: array<{{DOUT_T}}>;       // (B, T, C)
@group(0) @binding(3) var<storage, read> g_lse: array<f32>;               // (B, NH, T)
@group(0) @binding(4) var<storage, read> g_dd: array<f32>;                // (B, NH, T)
@group(0) @binding(5) var<storage, read_write> g_dqkv: array<{{DQKV_T}}>; // (B, T, 3*C)

// Rows [0, n) from row t0 on of the head's channels `ch` of qkv, into wg_h at `at`.
fn stage_qkv(at: u32, base: u32, t0: u32, n: u32, ch: u32, lid: u32) {
    let row3 = 3u * p.c;
    for (var e = lid; e < n * HS; e += THREADS) {
        let i = e / HS;
        let d = e % HS;
        var x = {{H_T}}(0.0);
        if (t0 + i < p.t) { x = {{H_T}}(g_qkv[base + (t0 + i) * row3 + ch + d]); }
        wg_h[at + i * SH + d] = x;
    }
}

// The same for dout (B, T, C), `obase` its index of (b, t = 0, head h).
fn stage_dout(at: u32, obase: u32, t0: u32, n: u32, lid: u32) {
    for (var e = lid; e < n * HS; e += THREADS) {
        let i = e / HS;
        let d = e % HS;
        var x = {{H_T}}(0.0);
        if (t0 + i < p.t) { x = {{H_T}}(g_dout[obase + (t0 + i) * p.c + d]); }
        wg_h[at + i * SH + d] = x;
    }
}

// lse and D of rows [0, n) from row t0 on (0 past T).
fn stage_rows(bh: u32, t0: u32, n: u32, lid: u32) {
    for (var i = lid; i < n; i += THREADS) {
        let inside = t0 + i < p.t;
        let at = bh * p.t + min(t0 + i, p.t - 1u);
        lse_s[i] = select(0.0, g_lse[at], inside);
        d_s[i] = select(0.0, g_dd[at], inside);
    }
}

// A warp's two score products over the head dimension into its f32 slot at `fs`: S = A B^T at
// column 0 and dP = C D^T at column DPO, A and C its 16 staged rows (at `a`, `c`), B and D the
// BN staged rows of the inner block (at `b`, `d`; B(d, row) = B[row][d], column-major).
fn scores_and_dp(a: u32, b: u32, c: u32, d: u32, fs: u32) {
    for (var j = 0u; j < NF; j++) {
        var s: FragC;
        var dp: FragC;
        for (var dd = 0u; dd < OF; dd++) {
            s = mma(load_a(a + dd * 16u, SH), load_b_col(b + j * 16u * SH + dd * 16u, SH), s);
            dp = mma(load_a(c + dd * 16u, SH), load_b_col(d + j * 16u * SH + dd * 16u, SH), dp);
        }
        store_f(s, fs + j * 16u, SF);
        store_f(dp, fs + DPO + j * 16u, SF);
    }
}

// Fragments `acc` (16 x HS) of this warp: factor * acc into channels `ch` of dqkv rows
// t0 .. t0 + 15, through the warp's slot. Every subgroup calls it (uniform control flow);
// surplus ones (`write` false) write nothing.
fn write_rows(acc: ptr<function, array<FragC, OF>>, fs: u32, base: u32, t0: u32, ch: u32,
              factor: f32, write: bool) {
    for (var f = 0u; f < OF; f++) {
        store_f((*acc)[f], fs + f * 16u, SF);
    }
    workgroupBarrier();
    if (write) {
        let row3 = 3u * p.c;
        for (var f = 0u; f < OF; f++) {
            for (var t = 0u; t < SHARE; t++) {
                let e = t * SG + lane;
                let r = e / 16u;
                if (t0 + r < p.t) {
                    let dst = base + (t0 + r) * row3 + ch + f * 16u + e % 16u;
                    g_dqkv[dst] = {{DQKV_T}}(factor * wg_f[fs + r * SF + f * 16u + e % 16u]);
                }
            }
        }
    }
    workgroupBarrier();
}
#endif

#if BACKWARD_DQ
var<workgroup> lse_s: array<f32, ROWS>;
var<workgroup> d_s: array<f32, ROWS>;

@compute @workgroup_size(THREADS)
fn attention_coop_backward_dq(@builtin(workgroup_id) wid: vec3<u32>,
                              @builtin(num_workgroups) nwg: vec3<u32>,
                              @builtin(local_invocation_index) lid: u32,
                              @builtin(subgroup_id) sg: u32,
                              @builtin(subgroup_invocation_id) sg_lane: u32) {
    lane = sg_lane;
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let bh_count = p.b * p.nh;
    let qb = p.n_blocks - 1u - n / bh_count; // longest first
    let bh = n % bh_count;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let q0 = qb * ROWS;
    let base = b * p.t * 3u * p.c + h * HS;
    let obase = b * p.t * p.c + h * HS;

    let warp = min(sg, WARPS - 1u);
    let slot = min(sg, WARPS);
    let m0 = warp * 16u;
    let fs = slot * SLOT_F;
    let ds_at = DSO + slot * PT_LEN;

    stage_qkv(QO, base, q0, ROWS, 0u, lid);
    stage_dout(DOO, obase, q0, ROWS, lid);
    stage_rows(bh, q0, ROWS, lid);
    var dq: array<FragC, OF>;

    let n_kb = (min(q0 + ROWS, p.t) - 1u) / BN + 1u;
    for (var kb = 0u; kb < n_kb; kb++) {
        let k0 = kb * BN;
        stage_qkv(KO, base, k0, BN, p.c, lid);
        stage_qkv(VO, base, k0, BN, 2u * p.c, lid);
        workgroupBarrier();

        // S = Q K^T and dP = dO V^T.
        scores_and_dp(QO + m0 * SH, KO, DOO + m0 * SH, VO, fs);
        workgroupBarrier();

        // dS = P * (dP - D), P = exp(scale * S - lse), in f16.
        for (var e = lane; e < 16u * BN; e += SG) {
            let r = e / BN;
            let j = e % BN;
            let i = q0 + m0 + r;
            let visible = k0 + j <= i && i < p.t;
            let pv = select(0.0, exp(p.scale * wg_f[fs + r * SF + j] - lse_s[m0 + r]), visible);
            wg_h[ds_at + r * SP + j] = {{H_T}}(pv * (wg_f[fs + r * SF + DPO + j] - d_s[m0 + r]));
        }
        workgroupBarrier();

        // dQ += dS K: B(key, d) = K[key][d], row-major.
        for (var f = 0u; f < OF; f++) {
            for (var kk = 0u; kk < NF; kk++) {
                let a = load_a(ds_at + kk * 16u, SP);
                let bk = load_b_row(KO + kk * 16u * SH + f * 16u, SH);
                dq[f] = mma(a, bk, dq[f]);
            }
        }
        workgroupBarrier();
    }

    write_rows(&dq, fs, base, q0 + m0, 0u, p.scale, sg < WARPS);
}
#endif

#if BACKWARD_DKDV
var<workgroup> lse_s: array<f32, BN>;
var<workgroup> d_s: array<f32, BN>;

@compute @workgroup_size(THREADS)
fn attention_coop_backward_dkdv(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32,
                                @builtin(subgroup_id) sg: u32,
                                @builtin(subgroup_invocation_id) sg_lane: u32) {
    lane = sg_lane;
    let n = linear_workgroup(wid, nwg);
    if (n >= p.n_work) { return; }
    let bh_count = p.b * p.nh;
    let kb = n / bh_count; // the first key blocks see the most queries: dispatched first
    let bh = n % bh_count;
    let b = bh / p.nh;
    let h = bh % p.nh;
    let k0 = kb * ROWS;
    let base = b * p.t * 3u * p.c + h * HS;
    let obase = b * p.t * p.c + h * HS;

    let warp = min(sg, WARPS - 1u);
    let slot = min(sg, WARPS);
    let m0 = warp * 16u;
    let fs = slot * SLOT_F;
    let p_at = PO + slot * PT_LEN;
    let ds_at = DSO + slot * PT_LEN;

    stage_qkv(KO, base, k0, ROWS, p.c, lid);
    stage_qkv(VO, base, k0, ROWS, 2u * p.c, lid);
    var dk: array<FragC, OF>;
    var dv: array<FragC, OF>;

    let n_qb = (p.t + BN - 1u) / BN;
    for (var qb = k0 / BN; qb < n_qb; qb++) {
        let q0 = qb * BN;
        stage_qkv(QO, base, q0, BN, 0u, lid);
        stage_dout(DOO, obase, q0, BN, lid);
        stage_rows(bh, q0, BN, lid);
        workgroupBarrier();

        // S^T = K Q^T and dP^T = V dO^T.
        scores_and_dp(KO + m0 * SH, QO, VO + m0 * SH, DOO, fs);
        workgroupBarrier();

        // P^T and dS^T in f16 (rows keys, columns queries).
        for (var e = lane; e < 16u * BN; e += SG) {
            let r = e / BN;
            let j = e % BN;
            let i = q0 + j;
            let visible = k0 + m0 + r <= i && i < p.t;
            let pv = select(0.0, exp(p.scale * wg_f[fs + r * SF + j] - lse_s[j]), visible);
            wg_h[p_at + r * SP + j] = {{H_T}}(pv);
            wg_h[ds_at + r * SP + j] = {{H_T}}(pv * (wg_f[fs + r * SF + DPO + j] - d_s[j]));
        }
        workgroupBarrier();

        // dV += P^T dO, dK += dS^T Q: B(query, d), row-major.
        for (var f = 0u; f < OF; f++) {
            for (var kk = 0u; kk < NF; kk++) {
                let ap = load_a(p_at + kk * 16u, SP);
                let bo = load_b_row(DOO + kk * 16u * SH + f * 16u, SH);
                dv[f] = mma(ap, bo, dv[f]);
                let ads = load_a(ds_at + kk * 16u, SP);
                let bq = load_b_row(QO + kk * 16u * SH + f * 16u, SH);
                dk[f] = mma(ads, bq, dk[f]);
            }
        }
        workgroupBarrier();
    }

    write_rows(&dk, fs, base, k0 + m0, p.c, p.scale, sg < WARPS);
    write_rows(&dv, fs, base, k0 + m0, 2u * p.c, 1.0, sg < WARPS);
}
#endif
