#if !EMULATE_COOP
enable wgpu_cooperative_matrix;
#endif

// Matrix products on cooperative matrices (tensor cores): f16 operands, f32 sums.
//
// matmul_coop: C[rows, cols] (=|+=) epilogue(A x B): the same products, operand layouts,
// parameters, bindings and epilogues as matmul_tiled in matmul.wgsl, for f16 A and B only.
//
// A workgroup is WM x WN subgroups ("warps"); warp (wm, wn) owns FM x FN fragments of 16 x 16 of
// the BM x BN output tile (BM = 16*FM*WM, BN = 16*FN*WN) and sums them in f32 cooperative
// matrices. Each step stages a BM x BK slice of A and a BK x BN slice of B in workgroup memory as
// f16, each in the layout the operand has in memory, so that the staging loads are plain
// coalesced copies (0 outside the matrices: ragged edges add nothing). The fragment loads read
// the staged tiles row-major (coopLoadT) or column-major (coopLoad); a fragment of role A is
// 16 (m) x 16 (k), of role B 16 (k) x 16 (n), of role C 16 (m) x 16 (n):
//   A (rows, inner)  staged a_tile[m][k]: A(m, k) at m*SA + k   row-major     coopLoadT
//   A (inner, rows)  staged a_tile[k][m]: A(m, k) at k*SA + m   column-major  coopLoad
//   B (inner, cols)  staged b_tile[k][n]: B(k, n) at k*SB + n   row-major     coopLoadT
//   B (cols, inner)  staged b_tile[n][k]: B(k, n) at n*SB + k   column-major  coopLoad
// (SPIR-V OpCooperativeMatrixLoadKHR: RowMajorKHR puts element (r, c) at pointer + r*stride + c,
// ColumnMajorKHR at pointer + c*stride + r, the stride counted in elements of the array.)
// At the end each warp stores one fragment at a time, row-major, into its slot of c_tile, and
// every thread of the workgroup applies the epilogue to its share of the slots and writes C in
// its storage type, exactly as matmul_tiled does. With DIRECT_STORE (no bias, no GELU, no
// accumulation, f32 C with rows 16-byte aligned: the launcher decides) a tile wholly inside C
// skips that: each warp stores its fragments into C with coopStoreT, no barrier; tiles on the
// ragged edges still go through c_tile.
//
// Sums: each fragment adds k in steps of 16 in the order the hardware's multiply-add uses, the
// same on every run, so two runs are bitwise equal (but not equal to matmul_tiled's sums).
//
// Subgroups: the workgroup has THREADS = WM*WN*SG invocations, SG being the adapter's largest
// subgroup size, and the warp is the subgroup_id builtin (a cooperative matrix belongs to one
// subgroup, and the pointer and stride of its loads must be uniform in it). Should the
// subgroups be smaller, the surplus ones repeat the last warp's products and store into a spare
// slot that is never read; should they be larger, fragments would be missing, which the
// start-up self-check in ops/matmul/check.rs (this kernel against matmul_tiled) detects.
//
// EMULATE_COOP replaces the cooperative-matrix operations by plain-WGSL stand-ins that follow
// their SPIR-V definition: everything else in the kernel (staging, fragment offsets, subgroup
// mapping, epilogue) then runs, slowly, on adapters without cooperative matrices, so that tests
// can check it there.
//
// With ROW_SUMS (weight gradients) the first column tile's workgroups also sum A's rows from the
// staged f16 tiles (exact copies of A) in f32, in k order (see matmul_io.wgsl).
//
// Defines: C_T (f32|f16), A_TRANS, B_TRANS, A_VEC, B_VEC, WM, WN, FM, FN, SG, ACCUMULATE,
// DIRECT_STORE, EMULATE_COOP, ROW_SUMS, and the epilogue: BIAS (+ BIAS_T), GELU_FWD or GELU_BWD (+ PRE_T,
// PRE_BINDING). AB_T is always f16.
// Grid: one workgroup per output tile and K slice (split-K: see matmul_io.wgsl), linear id
// wid.x + wid.y * nwg.x (see Gpu::grid).

#include matmul_io

const WM: u32 = {{WM}}u;
const WN: u32 = {{WN}}u;
const FM: u32 = {{FM}}u;
const FN: u32 = {{FN}}u;
const SG: u32 = {{SG}}u;
const WARPS: u32 = WM * WN;
const THREADS: u32 = WARPS * SG;
const BM: u32 = 16u * FM * WM;
const BN: u32 = 16u * FN * WN;
const BK: u32 = 32u;
// Row strides of the staged tiles, in f16. A cooperative load needs its pointer and stride
// 16-byte aligned; the 8 extra elements keep them so and put the 8 rows an 8 x 8 fragment load
// reads in different banks.
// A fragment is read row-major from a tile staged [m][k] (A) or [k][n] (B), column-major from
// one staged [k][m] or [n][k].
#if A_TRANS
const SA: u32 = BM + 8u;
const A_TILE_LEN: u32 = BK * SA;
const A_ROW_MAJOR: bool = false;
#else
const SA: u32 = BK + 8u;
const A_TILE_LEN: u32 = BM * SA;
const A_ROW_MAJOR: bool = true;
#endif
#if B_TRANS
const SB: u32 = BK + 8u;
const B_TILE_LEN: u32 = BN * SB;
const B_ROW_MAJOR: bool = false;
#else
const SB: u32 = BN + 8u;
const B_TILE_LEN: u32 = BK * SB;
const B_ROW_MAJOR: bool = true;
#endif
// Row stride (f32) of a fragment slot of c_tile: 16-byte aligned rows.
const SC: u32 = 20u;
const SLOT_LEN: u32 = 16u * SC;
// One slot per warp and the spare one.
const C_TILE_LEN: u32 = (WARPS + 1u) * SLOT_LEN;
// Elements of the warps' slots every thread finishes per fragment: 256 * WARPS / THREADS.
const EPILOGUE_LOADS: u32 = 256u / SG;
// Consecutive row tiles of one group run next to each other so that they share B in cache.
const GROUP_M: u32 = 8u;
// Rows of A each thread sums with ROW_SUMS.
const ROW_SUM_ROWS: u32 = (BM + THREADS - 1u) / THREADS;

var<workgroup> a_tile: array<{{AB_T}}, A_TILE_LEN>;
var<workgroup> b_tile: array<{{AB_T}}, B_TILE_LEN>;
var<workgroup> c_tile: array<f32, C_TILE_LEN>;

#if EMULATE_COOP
// Stand-ins for the cooperative-matrix operations. Loads and stores follow SPIR-V's
// OpCooperativeMatrixLoadKHR / StoreKHR: row-major (coopLoadT, coopStoreT) puts element (r, c)
// at start + r*stride + c, column-major (coopLoad, coopStore) at start + c*stride + r. An A or B
// fragment is where it lies in its staged tile (start, stride, row-major), read by the
// multiply-add before the next barrier; a C fragment is spread over the subgroup as on real
// hardware: lane l holds elements e = t*SG + l, (r, c) = (e / 16, e % 16).
// Mesa's software rasteriser ends a shader's loops after 65535 iterations in all, which these
// loops reach when the inner dimension is a few thousand: the emulation is for small products.
alias FragA = vec3<u32>;
alias FragB = vec3<u32>;
alias FragC = array<f32, EMULATED_SHARE>;
const EMULATED_SHARE: u32 = 256u / SG;

fn emulated_offset(r: u32, c: u32, stride: u32, row_major: bool) -> u32 {
    return select(c * stride + r, r * stride + c, row_major);
}

fn emulated_load(start: u32, stride: u32, row_major: bool) -> vec3<u32> {
    return vec3<u32>(start, stride, u32(row_major));
}

// a (16 m x 16 k) times b (16 k x 16 n) plus c (16 m x 16 n), this lane's share of it.
fn emulated_multiply_add(a: FragA, b: FragB, c: FragC, lane: u32) -> FragC {
    var out = c;
    for (var t = 0u; t < EMULATED_SHARE; t++) {
        let e = t * SG + lane;
        let r = e / 16u;
        let q = e % 16u;
        var s = out[t];
        for (var k = 0u; k < 16u; k++) {
            let x = f32(a_tile[a.x + emulated_offset(r, k, a.y, a.z != 0u)]);
            let y = f32(b_tile[b.x + emulated_offset(k, q, b.y, b.z != 0u)]);
            s = s + x * y;
        }
        out[t] = s;
    }
    return out;
}

fn emulated_store_c(m: FragC, start: u32, stride: u32, row_major: bool, lane: u32) {
    for (var t = 0u; t < EMULATED_SHARE; t++) {
        let e = t * SG + lane;
        c_tile[start + emulated_offset(e / 16u, e % 16u, stride, row_major)] = m[t];
    }
}

#if DIRECT_STORE
// coopStoreT of a C fragment into C itself (row-major, f32).
fn emulated_store_global(m: FragC, start: u32, stride: u32, lane: u32) {
    for (var t = 0u; t < EMULATED_SHARE; t++) {
        let e = t * SG + lane;
        c[start + (e / 16u) * stride + e % 16u] = m[t];
    }
}
#endif
#else
alias FragA = coop_mat16x16<{{AB_T}}, A>;
alias FragB = coop_mat16x16<{{AB_T}}, B>;
alias FragC = coop_mat16x16<f32, C>;
#endif

// (m, k) within the A tile of staged element e (0 <= e < BM * BK); consecutive e run along the
// operand's contiguous dimension.
fn a_tile_coord(e: u32) -> vec2<u32> {
#if A_TRANS
    return vec2<u32>(e % BM, e / BM);
#else
    return vec2<u32>(e / BK, e % BK);
#endif
}

fn a_tile_index(mk: vec2<u32>) -> u32 {
#if A_TRANS
    return mk.y * SA + mk.x;
#else
    return mk.x * SA + mk.y;
#endif
}

// (n, k) within the B tile of staged element e (0 <= e < BN * BK).
fn b_tile_coord(e: u32) -> vec2<u32> {
#if B_TRANS
    return vec2<u32>(e / BK, e % BK);
#else
    return vec2<u32>(e % BN, e / BN);
#endif
}

fn b_tile_index(nk: vec2<u32>) -> u32 {
#if B_TRANS
    return nk.x * SB + nk.y;
#else
    return nk.y * SB + nk.x;
#endif
}

// Global loads of one k step, held in registers (issued before the step's products, so they
// complete during them) and then written to the staged tiles. With A_VEC (B_VEC) an operand
// is bound as 16-byte packets of 8 f16 along its contiguous dimension and each thread loads
// whole packets, consecutive threads consecutive packets; the launcher sets it when the
// contiguous extent, the row stride, the start and the length are whole packets, so a packet
// lies wholly inside or outside the matrix. Otherwise elements are loaded one by one.
#if A_VEC
const A_PACKETS: u32 = BM * BK / 8u;
const A_LOADS: u32 = (A_PACKETS + THREADS - 1u) / THREADS;
var<private> a_regs: array<vec4<u32>, A_LOADS>;

// (m, k) of the first element of packet e within the A tile.
fn a_packet_coord(e: u32) -> vec2<u32> {
#if A_TRANS
    return vec2<u32>((e % (BM / 8u)) * 8u, e / (BM / 8u));
#else
    return vec2<u32>(e / (BK / 8u), (e % (BK / 8u)) * 8u);
#endif
}

fn load_a_step(row0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < A_LOADS; l++) {
        let e = l * THREADS + lid;
        var v = vec4<u32>(0u);
        if (e < A_PACKETS) {
            let mk = a_packet_coord(e);
            if (row0 + mk.x < p.rows && k0 + mk.y < p.inner) {
                v = a[a_index(row0 + mk.x, k0 + mk.y) / 8u];
            }
        }
        a_regs[l] = v;
    }
}

// The packet's 8 elements lie consecutively in the staged tile too (it keeps the operand's
// layout).
fn store_a_step(lid: u32) {
    for (var l = 0u; l < A_LOADS; l++) {
        let e = l * THREADS + lid;
        if (e < A_PACKETS) {
            let at = a_tile_index(a_packet_coord(e));
            for (var h = 0u; h < 4u; h++) {
                let two = unpack2x16float(a_regs[l][h]);
                a_tile[at + 2u * h] = {{AB_T}}(two.x);
                a_tile[at + 2u * h + 1u] = {{AB_T}}(two.y);
            }
        }
    }
}
#else
const A_LOADS: u32 = BM * BK / THREADS;
var<private> a_regs: array<{{AB_T}}, A_LOADS>;

fn load_a_step(row0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < A_LOADS; l++) {
        let mk = a_tile_coord(l * THREADS + lid);
        var v = {{AB_T}}(0.0);
        if (row0 + mk.x < p.rows && k0 + mk.y < p.inner) {
            v = a[a_index(row0 + mk.x, k0 + mk.y)];
        }
        a_regs[l] = v;
    }
}

fn store_a_step(lid: u32) {
    for (var l = 0u; l < A_LOADS; l++) {
        a_tile[a_tile_index(a_tile_coord(l * THREADS + lid))] = a_regs[l];
    }
}
#endif

#if B_VEC
const B_PACKETS: u32 = BN * BK / 8u;
const B_LOADS: u32 = (B_PACKETS + THREADS - 1u) / THREADS;
var<private> b_regs: array<vec4<u32>, B_LOADS>;

// (n, k) of the first element of packet e within the B tile.
fn b_packet_coord(e: u32) -> vec2<u32> {
#if B_TRANS
    return vec2<u32>(e / (BK / 8u), (e % (BK / 8u)) * 8u);
#else
    return vec2<u32>((e % (BN / 8u)) * 8u, e / (BN / 8u));
#endif
}

fn load_b_step(col0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < B_LOADS; l++) {
        let e = l * THREADS + lid;
        var v = vec4<u32>(0u);
        if (e < B_PACKETS) {
            let nk = b_packet_coord(e);
            if (col0 + nk.x < p.cols && k0 + nk.y < p.inner) {
                v = b[b_index(k0 + nk.y, col0 + nk.x) / 8u];
            }
        }
        b_regs[l] = v;
    }
}

fn store_b_step(lid: u32) {
    for (var l = 0u; l < B_LOADS; l++) {
        let e = l * THREADS + lid;
        if (e < B_PACKETS) {
            let at = b_tile_index(b_packet_coord(e));
            for (var h = 0u; h < 4u; h++) {
                let two = unpack2x16float(b_regs[l][h]);
                b_tile[at + 2u * h] = {{AB_T}}(two.x);
                b_tile[at + 2u * h + 1u] = {{AB_T}}(two.y);
            }
        }
    }
}
#else
const B_LOADS: u32 = BN * BK / THREADS;
var<private> b_regs: array<{{AB_T}}, B_LOADS>;

fn load_b_step(col0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < B_LOADS; l++) {
        let nk = b_tile_coord(l * THREADS + lid);
        var v = {{AB_T}}(0.0);
        if (col0 + nk.x < p.cols && k0 + nk.y < p.inner) {
            v = b[b_index(k0 + nk.y, col0 + nk.x)];
        }
        b_regs[l] = v;
    }
}

fn store_b_step(lid: u32) {
    for (var l = 0u; l < B_LOADS; l++) {
        b_tile[b_tile_index(b_tile_coord(l * THREADS + lid))] = b_regs[l];
    }
}
#endif

// Cooperative operations must run in control flow that is uniform across the subgroup: here
// they sit only in loops whose trip counts are the same for the whole workgroup. Every index
// and stride they use is a `let` or a constant, so it exists before the operation.
@compute @workgroup_size(THREADS)
fn matmul_coop(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sg: u32,
#if EMULATE_COOP
               @builtin(subgroup_invocation_id) lane: u32,
#endif
               ) {
    let id = wid.x + wid.y * nwg.x;
    if (id >= p.tiles * p.splits) {
        return;
    }
    // Split-K: this workgroup sums slice `split` of the inner dimension for output tile `tile`.
    let split = id / p.tiles;
    let tile = id % p.tiles;
    let k_begin = split * p.k_slice;
    let c_row0 = split * p.rows;
    // Grouped tile order: GROUP_M row tiles sweep the columns together.
    let per_group = GROUP_M * p.tiles_n;
    let first_m = (tile / per_group) * GROUP_M;
    let group_rows = min(p.tiles_m - first_m, GROUP_M);
    let in_group = tile % per_group;
    let row0 = (first_m + in_group % group_rows) * BM;
    let col0 = (in_group / group_rows) * BN;

    let warp = min(sg, WARPS - 1u);
    let slot = min(sg, WARPS);
    // First row (m) and column (n) of this warp's fragments within the tile.
    let warp_m0 = (warp / WN) * FM * 16u;
    let warp_n0 = (warp % WN) * FN * 16u;

    var acc: array<FragC, FM * FN>; // [i * FN + j], zero to start
    var b_frag: array<FragB, FN>;
#if ROW_SUMS
    // Workgroups of the first column tile also sum A's rows: rows i * THREADS + lid of the tile.
    let sums_rows = col0 == 0u;
    var row_sum: array<f32, ROW_SUM_ROWS>;
#endif

    load_a_step(row0, k_begin, lid);
    load_b_step(col0, k_begin, lid);

    let steps = (min(p.k_slice, p.inner - k_begin) + BK - 1u) / BK;
    for (var s = 0u; s < steps; s++) {
        store_a_step(lid);
        store_b_step(lid);
        workgroupBarrier();
#if ROW_SUMS
        if (sums_rows) {
            for (var i = 0u; i < ROW_SUM_ROWS; i++) {
                let m = i * THREADS + lid;
                if (m < BM) {
                    for (var k = 0u; k < BK; k++) {
                        row_sum[i] = row_sum[i] + f32(a_tile[a_tile_index(vec2<u32>(m, k))]);
                    }
                }
            }
        }
#endif

        // Issue the next step's global loads now; they complete during the products below.
        if (s + 1u < steps) {
            let k0 = k_begin + (s + 1u) * BK;
            load_a_step(row0, k0, lid);
            load_b_step(col0, k0, lid);
        }

        for (var kk = 0u; kk < BK; kk += 16u) {
            for (var j = 0u; j < FN; j++) {
                let n0 = warp_n0 + j * 16u;
#if B_TRANS
                let bi = n0 * SB + kk;
#else
                let bi = kk * SB + n0;
#endif
#if EMULATE_COOP
                b_frag[j] = emulated_load(bi, SB, B_ROW_MAJOR);
#else
#if B_TRANS
                b_frag[j] = coopLoad<FragB>(&b_tile[bi], SB);
#else
                b_frag[j] = coopLoadT<FragB>(&b_tile[bi], SB);
#endif
#endif
            }
            for (var i = 0u; i < FM; i++) {
                let m0 = warp_m0 + i * 16u;
#if A_TRANS
                let ai = kk * SA + m0;
#else
                let ai = m0 * SA + kk;
#endif
#if EMULATE_COOP
                let a_frag = emulated_load(ai, SA, A_ROW_MAJOR);
#else
#if A_TRANS
                let a_frag = coopLoad<FragA>(&a_tile[ai], SA);
#else
                let a_frag = coopLoadT<FragA>(&a_tile[ai], SA);
#endif
#endif
                for (var j = 0u; j < FN; j++) {
                    let o = i * FN + j;
#if EMULATE_COOP
                    acc[o] = emulated_multiply_add(a_frag, b_frag[j], acc[o], lane);
#else
                    acc[o] = coopMultiplyAdd(a_frag, b_frag[j], acc[o]);
#endif
                }
            }
        }
        workgroupBarrier();
    }

#if ROW_SUMS
    if (sums_rows) {
        for (var i = 0u; i < ROW_SUM_ROWS; i++) {
            let m = i * THREADS + lid;
            if (m < BM && row0 + m < p.rows) {
                store_row_sum(split, row0 + m, row_sum[i]);
            }
        }
    }
#endif
#if DIRECT_STORE
    // Nothing fused, f32 C with 16-byte aligned rows: when the whole tile lies inside C (the
    // same for the whole workgroup), each warp stores its fragments straight from registers.
    if (row0 + BM <= p.rows && col0 + BN <= p.cols) {
        if (sg < WARPS) {
            let stride = p.c_stride;
            for (var f = 0u; f < FM * FN; f++) {
                let row = c_row0 + row0 + warp_m0 + (f / FN) * 16u;
                let col = col0 + warp_n0 + (f % FN) * 16u;
                let ci = p.c_start + row * stride + col;
                let frag = acc[f];
#if EMULATE_COOP
                emulated_store_global(frag, ci, stride, lane);
#else
                coopStoreT(frag, &c[ci], stride);
#endif
            }
        }
        return;
    }
#endif
    // Fragment f of every warp goes through the warps' slots: C(r, q) at r*SC + q.
    let slot_start = slot * SLOT_LEN;
    for (var f = 0u; f < FM * FN; f++) {
        let sum = acc[f];
#if EMULATE_COOP
        emulated_store_c(sum, slot_start, SC, true, lane);
#else
        coopStoreT(sum, &c_tile[slot_start], SC);
#endif
        workgroupBarrier();
        let frag_m0 = (f / FN) * 16u;
        let frag_n0 = (f % FN) * 16u;
        for (var t = 0u; t < EPILOGUE_LOADS; t++) {
            let e = t * THREADS + lid; // 0 <= e < WARPS * 256
            let w = e / 256u;
            let r = (e % 256u) / 16u;
            let q = e % 16u;
            let row = row0 + (w / WN) * FM * 16u + frag_m0 + r;
            let col = col0 + (w % WN) * FN * 16u + frag_n0 + q;
            if (row < p.rows && col < p.cols) {
                store_output(c_row0 + row, col, c_tile[w * SLOT_LEN + r * SC + q]);
            }
        }
        workgroupBarrier();
    }
}
