// Matrix products and the split-K reduction.
//
// matmul_tiled: C[rows, cols] (=|+=) epilogue(A x B), one kernel for every product of a Linear layer:
//   forward          out[M,N]  = inp[M,K] @ weight[N,K]^T   A = inp  [rows, inner], B = weight [cols, inner] (B_TRANS)
//   backward input   dinp[M,K] = dout[M,N] @ weight[N,K]    A = dout [rows, inner], B = weight [inner, cols]
//   backward weight  dw[N,K]   = dout[M,N]^T @ inp[M,K]     A = dout [inner, rows] (A_TRANS), B = inp [inner, cols]
// Each workgroup (256 threads, 16 x 16) owns a BM x BN output tile, BM = 16*TM and BN = 16*TN; a
// thread owns TM x TN outputs in 4 x 4 blocks spread 64 apart, so that neighbouring threads read
// neighbouring vec4s of the shared tiles (no bank conflicts) and the compute loop reads vec4s.
// Each k step stages a BM x BK slice of A and a BK x BN slice of B in workgroup memory, k-major,
// as STAGE_T (f16 when both operands are f16, else f32). The tiles are double-buffered: while a
// step computes from one buffer, its threads hold the next step's global loads in registers
// (issued before the arithmetic, so they complete during it) and write them to the other buffer
// after it; one barrier per step then makes them visible (and ends every read of the buffer the
// following step overwrites).
// Global loads: with A_VEC (B_VEC) the operand is bound as 16-byte packets (vec4<u32>: 4 f32 or
// 8 f16 along its contiguous dimension) and each thread loads whole packets, two neighbouring
// threads covering a 32-byte sector; the launcher sets it when the contiguous extent, the row
// stride and the start are multiples of a packet, so a packet lies wholly inside or outside the
// matrix. Otherwise (ragged shapes) elements are loaded one by one, 8 threads to a sector.
// Every output element is summed over k = 0, 1, ..., inner-1 in order by one thread (over its K
// slice, in a split product: see matmul_io.wgsl and split_k_reduce below), so results do not
// depend on the tile size or load path and two runs are bitwise equal.
// Parameters, bindings (A and C may be windows of wider matrices) and the epilogue are those of
// every product kernel, in matmul_io.wgsl.
//
// With ROW_SUMS (weight gradients) the first column tile's workgroups also sum A's rows from the
// staged tiles, one thread a row (see matmul_io.wgsl).
// Defines: A_T, B_T, C_T (storage types, f32|f16), STAGE_T, A_TRANS, B_TRANS, A_VEC, B_VEC, TM, TN
// (4|8), BK (8|16|32), ACCUMULATE, ROW_SUMS, and the epilogue: BIAS (+ BIAS_T), GELU_FWD or
// GELU_BWD (+ PRE_T, PRE_BINDING).
// Grid: one workgroup per output tile and K slice, linear id wid.x + wid.y * nwg.x (see Gpu::grid).
//
// split_k_reduce (SPLIT_REDUCE): C (=|+=) the sum of a split product's partials, in slice order.


#if !SPLIT_REDUCE
#include matmul_io

const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const BK: u32 = {{BK}}u;
const BM: u32 = 16u * TM;
const BN: u32 = 16u * TN;
const TM4: u32 = TM / 4u;
const TN4: u32 = TN / 4u;
alias Stage = {{STAGE_T}};
// Row strides of the shared tiles in vec4s. The extra vec4 makes the word stride 4 (mod 32
// banks), so the transposing stores of a k-contiguous operand hit different banks.
const SA: u32 = BM / 4u + 1u;
const SB: u32 = BN / 4u + 1u;
// One buffer of each tile; the workgroup holds two.
const A_TILE: u32 = BK * SA;
const B_TILE: u32 = BK * SB;
// Consecutive row tiles of one group run next to each other so that they share B in cache.
const GROUP_M: u32 = 8u;

var<workgroup> a_tile: array<vec4<Stage>, 2u * A_TILE>; // [buffer][k][m / 4][m % 4]
var<workgroup> b_tile: array<vec4<Stage>, 2u * B_TILE>; // [buffer][k][n / 4][n % 4]

// Threads of a 32-byte sector: two 16-byte packets, or 8 elements.
const VEC_SECTOR: u32 = 2u;
const SCALAR_SECTOR: u32 = 8u;

#if A_VEC
// Elements of A per packet, packets per step, packets each thread loads.
const PA: u32 = {{A_PACK}}u;
const A_PACKETS: u32 = BM * BK / PA;
const A_LOADS: u32 = (A_PACKETS + 255u) / 256u;
var<private> a_regs: array<vec4<u32>, A_LOADS>;

// Element i of an A packet as f32.
fn a_elem(u: vec4<u32>, i: u32) -> f32 {
#if A_HALF
    return unpack2x16float(u[i / 2u])[i % 2u];
#else
    return bitcast<f32>(u[i]);
#endif
}

// (m, k) of the first element of packet e within the A tile: along m (A_TRANS) or k.
fn a_packet_coord(e: u32) -> vec2<u32> {
#if A_TRANS
    let per_row = BM / PA;
    return vec2<u32>((e % per_row) * PA, e / per_row);
#else
    let g = min(VEC_SECTOR, BK / PA);
    return vec2<u32>((e / g) % BM, (e % g + g * (e / (g * BM))) * PA);
#endif
}

// Loads this thread's packets of the A slice starting at (row0, k0) into a_regs; zeros outside
// the matrix (whole packets: the launcher checked the shape).
fn load_a_step(row0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < A_LOADS; l++) {
        let e = l * 256u + lid;
        var v = vec4<u32>(0u);
        if (e < A_PACKETS) {
            let mk = a_packet_coord(e);
            let row = row0 + mk.x;
            let k = k0 + mk.y;
            if (row < p.rows && k < p.inner) {
                v = a[a_index(row, k) / PA];
            }
        }
        a_regs[l] = v;
    }
}

// Writes a_regs into A tile buffer `buf`.
fn store_a_step(buf: u32, lid: u32) {
    let base = buf * A_TILE;
    for (var l = 0u; l < A_LOADS; l++) {
        let e = l * 256u + lid;
        if (e < A_PACKETS) {
            let mk = a_packet_coord(e);
            let u = a_regs[l];
#if A_TRANS
            for (var q = 0u; q < PA / 4u; q++) {
                a_tile[base + mk.y * SA + mk.x / 4u + q] = vec4<Stage>(vec4<f32>(
                    a_elem(u, 4u * q), a_elem(u, 4u * q + 1u), a_elem(u, 4u * q + 2u),
                    a_elem(u, 4u * q + 3u)));
            }
#else
            for (var i = 0u; i < PA; i++) {
                a_tile[base + (mk.y + i) * SA + mk.x / 4u][mk.x % 4u] = Stage(a_elem(u, i));
            }
#endif
        }
    }
}
#else
const A_LOADS: u32 = BM * BK / 256u;
var<private> a_regs: array<f32, A_LOADS>;

// (m, k) within the A tile of staged element e (0 <= e < BM * BK). Consecutive threads take
// consecutive addresses of the operand's contiguous dimension; for a k-contiguous operand 8
// threads cover 8 k of one row (a 32-byte sector in f32) and the next 8 the next row.
fn a_tile_coord(e: u32) -> vec2<u32> {
#if A_TRANS
    return vec2<u32>(e % BM, e / BM);
#else
    let g = min(SCALAR_SECTOR, BK);
    return vec2<u32>((e / g) % BM, (e / (g * BM)) * g + e % g);
#endif
}

fn load_a_step(row0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < A_LOADS; l++) {
        let mk = a_tile_coord(l * 256u + lid);
        let row = row0 + mk.x;
        let k = k0 + mk.y;
        var v = 0.0;
        if (row < p.rows && k < p.inner) {
            v = f32(a[a_index(row, k)]);
        }
        a_regs[l] = v;
    }
}

fn store_a_step(buf: u32, lid: u32) {
    let base = buf * A_TILE;
    for (var l = 0u; l < A_LOADS; l++) {
        let mk = a_tile_coord(l * 256u + lid);
        a_tile[base + mk.y * SA + mk.x / 4u][mk.x % 4u] = Stage(a_regs[l]);
    }
}
#endif

#if B_VEC
const PB: u32 = {{B_PACK}}u;
const B_PACKETS: u32 = BN * BK / PB;
const B_LOADS: u32 = (B_PACKETS + 255u) / 256u;
var<private> b_regs: array<vec4<u32>, B_LOADS>;

fn b_elem(u: vec4<u32>, i: u32) -> f32 {
#if B_HALF
    return unpack2x16float(u[i / 2u])[i % 2u];
#else
    return bitcast<f32>(u[i]);
#endif
}

// (n, k) of the first element of packet e within the B tile: along k (B_TRANS) or n.
fn b_packet_coord(e: u32) -> vec2<u32> {
#if B_TRANS
    let g = min(VEC_SECTOR, BK / PB);
    return vec2<u32>((e / g) % BN, (e % g + g * (e / (g * BN))) * PB);
#else
    let per_row = BN / PB;
    return vec2<u32>((e % per_row) * PB, e / per_row);
#endif
}

fn load_b_step(col0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < B_LOADS; l++) {
        let e = l * 256u + lid;
        var v = vec4<u32>(0u);
        if (e < B_PACKETS) {
            let nk = b_packet_coord(e);
            let col = col0 + nk.x;
            let k = k0 + nk.y;
            if (col < p.cols && k < p.inner) {
                v = b[b_index(k, col) / PB];
            }
        }
        b_regs[l] = v;
    }
}

fn store_b_step(buf: u32, lid: u32) {
    let base = buf * B_TILE;
    for (var l = 0u; l < B_LOADS; l++) {
        let e = l * 256u + lid;
        if (e < B_PACKETS) {
            let nk = b_packet_coord(e);
            let u = b_regs[l];
#if B_TRANS
            for (var i = 0u; i < PB; i++) {
                b_tile[base + (nk.y + i) * SB + nk.x / 4u][nk.x % 4u] = Stage(b_elem(u, i));
            }
#else
            for (var q = 0u; q < PB / 4u; q++) {
                b_tile[base + nk.y * SB + nk.x / 4u + q] = vec4<Stage>(vec4<f32>(
                    b_elem(u, 4u * q), b_elem(u, 4u * q + 1u), b_elem(u, 4u * q + 2u),
                    b_elem(u, 4u * q + 3u)));
            }
#endif
        }
    }
}
#else
const B_LOADS: u32 = BN * BK / 256u;
var<private> b_regs: array<f32, B_LOADS>;

// (n, k) within the B tile of staged element e (0 <= e < BN * BK).
fn b_tile_coord(e: u32) -> vec2<u32> {
#if B_TRANS
    let g = min(SCALAR_SECTOR, BK);
    return vec2<u32>((e / g) % BN, (e / (g * BN)) * g + e % g);
#else
    return vec2<u32>(e % BN, e / BN);
#endif
}

fn load_b_step(col0: u32, k0: u32, lid: u32) {
    for (var l = 0u; l < B_LOADS; l++) {
        let nk = b_tile_coord(l * 256u + lid);
        let col = col0 + nk.x;
        let k = k0 + nk.y;
        var v = 0.0;
        if (col < p.cols && k < p.inner) {
            v = f32(b[b_index(k, col)]);
        }
        b_regs[l] = v;
    }
}

fn store_b_step(buf: u32, lid: u32) {
    let base = buf * B_TILE;
    for (var l = 0u; l < B_LOADS; l++) {
        let nk = b_tile_coord(l * 256u + lid);
        b_tile[base + nk.y * SB + nk.x / 4u][nk.x % 4u] = Stage(b_regs[l]);
    }
}
#endif

@compute @workgroup_size(256)
fn matmul_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
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

    // This thread's outputs: rows row0 + 4*ty + 64*i + r, cols col0 + 4*tx + 64*j + q.
    let tx = lid % 16u;
    let ty = lid / 16u;

    var acc: array<vec4<f32>, TM * TN4>; // [i*4 + r][j] holds cols q = 0..3
#if ROW_SUMS
    // Workgroups of the first column tile: thread lid < BM also sums row row0 + lid of A.
    let sums_row = col0 == 0u && lid < BM;
    var row_sum = 0.0;
#endif

    let steps = (min(p.k_slice, p.inner - k_begin) + BK - 1u) / BK;
    load_a_step(row0, k_begin, lid);
    load_b_step(col0, k_begin, lid);
    store_a_step(0u, lid);
    store_b_step(0u, lid);
    workgroupBarrier();
    for (var s = 0u; s < steps; s++) {
        let buf = s % 2u;
        let more = s + 1u < steps;
        // The next step's global loads, in flight during the arithmetic below.
        if (more) {
            let k0 = k_begin + (s + 1u) * BK;
            load_a_step(row0, k0, lid);
            load_b_step(col0, k0, lid);
        }

        let a_base = buf * A_TILE;
        let b_base = buf * B_TILE;
#if ROW_SUMS
        if (sums_row) {
            for (var k = 0u; k < BK; k++) {
                row_sum = row_sum + f32(a_tile[a_base + k * SA + lid / 4u][lid % 4u]);
            }
        }
#endif
        for (var k = 0u; k < BK; k++) {
            var av: array<vec4<f32>, TM4>;
            var bv: array<vec4<f32>, TN4>;
            for (var i = 0u; i < TM4; i++) {
                av[i] = vec4<f32>(a_tile[a_base + k * SA + ty + 16u * i]);
            }
            for (var j = 0u; j < TN4; j++) {
                bv[j] = vec4<f32>(b_tile[b_base + k * SB + tx + 16u * j]);
            }
            for (var i = 0u; i < TM4; i++) {
                for (var r = 0u; r < 4u; r++) {
                    let ar = av[i][r];
                    for (var j = 0u; j < TN4; j++) {
                        let o = (i * 4u + r) * TN4 + j;
                        acc[o] = acc[o] + ar * bv[j];
                    }
                }
            }
        }

        // Into the other buffer, whose last reads (the previous step's) ended at its barrier.
        if (more) {
            store_a_step(1u - buf, lid);
            store_b_step(1u - buf, lid);
        }
        workgroupBarrier();
    }

#if ROW_SUMS
    if (sums_row && row0 + lid < p.rows) {
        store_row_sum(split, row0 + lid, row_sum);
    }
#endif
    for (var i = 0u; i < TM4; i++) {
        for (var r = 0u; r < 4u; r++) {
            let row = row0 + 4u * ty + 64u * i + r;
            if (row < p.rows) {
                for (var j = 0u; j < TN4; j++) {
                    let v = acc[(i * 4u + r) * TN4 + j];
                    for (var q = 0u; q < 4u; q++) {
                        let col = col0 + 4u * tx + 64u * j + q;
                        if (col < p.cols) {
                            store_output(c_row0 + row, col, v[q]);
                        }
                    }
                }
            }
        }
    }
}
#endif

#if SPLIT_REDUCE
// split_k_reduce: C (=|+=) the sum of the K slices' partial products, added in slice order so
// that the result does not depend on anything but the slicing. One thread per VEC elements of
// C (whole, contiguous): 16-byte loads of the partials when VEC = 4. With ROW_SUMS the threads
// past C's also add up the row sums' partials that follow C's in the scratch, one row each.
// Defines: C_T (f32|f16), VEC4, ACCUMULATE, ROW_SUMS. Grid: linear id wid.x + wid.y * nwg.x,
// 256 threads, covering len (+ rows) threads.
#if VEC4
alias Part = vec4<f32>;
alias Out = vec4<{{C_T}}>;
const VEC: u32 = 4u;
#else
alias Part = f32;
alias Out = {{C_T}};
const VEC: u32 = 1u;
#endif

struct ReduceParams {
    len: u32,    // elements of C / VEC
    splits: u32, // K slices
    rows: u32,   // rows of C (with ROW_SUMS)
    _pad: u32,
}

@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> partials: array<Part>; // (splits, len)
@group(0) @binding(2) var<storage, read_write> out: array<Out>;      // (len)
#if ROW_SUMS
// The same scratch as `partials`, per element: (splits, rows) row sums from splits * len * VEC.
@group(0) @binding(3) var<storage, read> row_partials: array<f32>;
@group(0) @binding(4) var<storage, read_write> row_sums: array<f32>; // (rows)
#endif

@compute @workgroup_size(256)
fn split_k_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= rp.len) {
#if ROW_SUMS
        let row = i - rp.len;
        if (row < rp.rows) {
            let base = rp.splits * rp.len * VEC + row;
            var r = row_partials[base];
            for (var k = 1u; k < rp.splits; k++) {
                r = r + row_partials[base + k * rp.rows];
            }
#if ACCUMULATE
            r = row_sums[row] + r;
#endif
            row_sums[row] = r;
        }
#endif
        return;
    }
    var s = partials[i];
    for (var k = 1u; k < rp.splits; k++) {
        s = s + partials[k * rp.len + i];
    }
#if ACCUMULATE
    s = Part(out[i]) + s;
#endif
    out[i] = Out(s);
}
#endif
