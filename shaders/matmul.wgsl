// Matrix products, the split-K reduction and the bias-gradient column sum.
//
// matmul_tiled: C[rows, cols] (=|+=) epilogue(A x B), one kernel for every product of a Linear layer:
//   forward          out[M,N]  = inp[M,K] @ weight[N,K]^T   A = inp  [rows, inner], B = weight [cols, inner] (B_TRANS)
//   backward input   dinp[M,K] = dout[M,N] @ weight[N,K]    A = dout [rows, inner], B = weight [inner, cols]
//   backward weight  dw[N,K]   = dout[M,N]^T @ inp[M,K]     A = dout [inner, rows] (A_TRANS), B = inp [inner, cols]
// Each workgroup (256 threads, 16 x 16) owns a BM x BN output tile, BM = 16*TM and BN = 16*TN; a
// thread owns TM x TN outputs in 4 x 4 blocks spread 64 apart, so that neighbouring threads read
// neighbouring vec4s of the shared tiles (no bank conflicts) and the compute loop reads vec4s.
// Each step stages a BM x BK slice of A and a BK x BN slice of B in workgroup memory, k-major,
// converted to f32; the next step's global loads are issued before the current step's
// arithmetic (register prefetch) to hide memory latency with a single shared buffer.
// Every output element is summed over k = 0, 1, ..., inner-1 in order by one thread (over its K
// slice, in a split product: see matmul_io.wgsl and split_k_reduce below), so results do not
// depend on the tile size and two runs are bitwise equal.
// Parameters, bindings (A and C may be windows of wider matrices) and the epilogue are those of
// every product kernel, in matmul_io.wgsl.
//
// Defines: A_T, B_T, C_T (storage types, f32|f16), A_TRANS, B_TRANS, TM, TN (4|8), BK (multiple
// of 8), ACCUMULATE, and the epilogue: BIAS (+ BIAS_T), GELU_FWD or GELU_BWD (+ PRE_T, PRE_BINDING).
// Grid: one workgroup per output tile and K slice, linear id wid.x + wid.y * nwg.x (see Gpu::grid).
//
// split_k_reduce (SPLIT_REDUCE): C (=|+=) the sum of a split product's partials, in slice order.
//
// column_sum_partial / column_sum_finish (COLUMN_SUM): dbias[cols] (=|+=) sum over rows of
// dout[rows, cols], in two deterministic stages through a scratch of (chunks, cols) partial sums.

#if !COLUMN_SUM
#if !SPLIT_REDUCE
#include matmul_io

const TM: u32 = {{TM}}u;
const TN: u32 = {{TN}}u;
const BK: u32 = {{BK}}u;
const BM: u32 = 16u * TM;
const BN: u32 = 16u * TN;
const TM4: u32 = TM / 4u;
const TN4: u32 = TN / 4u;
// Row strides of the shared tiles in vec4s. The extra vec4 makes the word stride 4 (mod 32
// banks), so the transposing stores of a k-contiguous operand (8 k x 4 rows per 32 threads, see
// a_tile_coord) hit 32 different banks.
const SA: u32 = BM / 4u + 1u;
const SB: u32 = BN / 4u + 1u;
// Elements of each tile every thread stages per step.
const A_LOADS: u32 = BM * BK / 256u;
const B_LOADS: u32 = BN * BK / 256u;
// Consecutive row tiles of one group run next to each other so that they share B in cache.
const GROUP_M: u32 = 8u;

var<workgroup> a_tile: array<vec4<f32>, BK * SA>; // [k][m / 4][m % 4]
var<workgroup> b_tile: array<vec4<f32>, BK * SB>; // [k][n / 4][n % 4]

// (m, k) within the A tile of staged element e (0 <= e < BM * BK). Consecutive threads take
// consecutive addresses of the operand's contiguous dimension; for a k-contiguous operand 8
// threads cover 8 k of one row (a 32-byte sector in f32) and the next 8 the next row.
fn a_tile_coord(e: u32) -> vec2<u32> {
#if A_TRANS
    return vec2<u32>(e % BM, e / BM);
#else
    return vec2<u32>((e / 8u) % BM, (e / (8u * BM)) * 8u + e % 8u);
#endif
}

// (n, k) within the B tile of staged element e (0 <= e < BN * BK).
fn b_tile_coord(e: u32) -> vec2<u32> {
#if B_TRANS
    return vec2<u32>((e / 8u) % BN, (e / (8u * BN)) * 8u + e % 8u);
#else
    return vec2<u32>(e % BN, e / BN);
#endif
}

// A[row, k] as f32, 0 outside the matrix.
fn load_a(row: u32, k: u32) -> f32 {
    if (row >= p.rows || k >= p.inner) {
        return 0.0;
    }
    return f32(a[a_index(row, k)]);
}

// B[k, col] as f32, 0 outside the matrix.
fn load_b(k: u32, col: u32) -> f32 {
    if (col >= p.cols || k >= p.inner) {
        return 0.0;
    }
    return f32(b[b_index(k, col)]);
}

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
    var a_next: array<f32, A_LOADS>;
    var b_next: array<f32, B_LOADS>;

    for (var l = 0u; l < A_LOADS; l++) {
        let mk = a_tile_coord(l * 256u + lid);
        a_next[l] = load_a(row0 + mk.x, k_begin + mk.y);
    }
    for (var l = 0u; l < B_LOADS; l++) {
        let nk = b_tile_coord(l * 256u + lid);
        b_next[l] = load_b(k_begin + nk.y, col0 + nk.x);
    }

    let steps = (min(p.k_slice, p.inner - k_begin) + BK - 1u) / BK;
    for (var s = 0u; s < steps; s++) {
        for (var l = 0u; l < A_LOADS; l++) {
            let mk = a_tile_coord(l * 256u + lid);
            a_tile[mk.y * SA + mk.x / 4u][mk.x % 4u] = a_next[l];
        }
        for (var l = 0u; l < B_LOADS; l++) {
            let nk = b_tile_coord(l * 256u + lid);
            b_tile[nk.y * SB + nk.x / 4u][nk.x % 4u] = b_next[l];
        }
        workgroupBarrier();

        // Issue the next step's global loads now; they complete during the arithmetic below.
        if (s + 1u < steps) {
            let k0 = k_begin + (s + 1u) * BK;
            for (var l = 0u; l < A_LOADS; l++) {
                let mk = a_tile_coord(l * 256u + lid);
                a_next[l] = load_a(row0 + mk.x, k0 + mk.y);
            }
            for (var l = 0u; l < B_LOADS; l++) {
                let nk = b_tile_coord(l * 256u + lid);
                b_next[l] = load_b(k0 + nk.y, col0 + nk.x);
            }
        }

        for (var k = 0u; k < BK; k++) {
            var av: array<vec4<f32>, TM4>;
            var bv: array<vec4<f32>, TN4>;
            for (var i = 0u; i < TM4; i++) {
                av[i] = a_tile[k * SA + ty + 16u * i];
            }
            for (var j = 0u; j < TN4; j++) {
                bv[j] = b_tile[k * SB + tx + 16u * j];
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
        workgroupBarrier();
    }

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
#endif

#if SPLIT_REDUCE
// split_k_reduce: C (=|+=) the sum of the K slices' partial products, added in slice order so
// that the result does not depend on anything but the slicing. One thread per VEC elements of
// C (whole, contiguous): 16-byte loads of the partials when VEC = 4.
// Defines: C_T (f32|f16), VEC4, ACCUMULATE. Grid: linear id wid.x + wid.y * nwg.x, 256 threads.
#if VEC4
alias Part = vec4<f32>;
alias Out = vec4<{{C_T}}>;
#else
alias Part = f32;
alias Out = {{C_T}};
#endif

struct ReduceParams {
    len: u32,    // elements of C / VEC
    splits: u32, // K slices
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> rp: ReduceParams;
@group(0) @binding(1) var<storage, read> partials: array<Part>; // (splits, len)
@group(0) @binding(2) var<storage, read_write> out: array<Out>;      // (len)

@compute @workgroup_size(256)
fn split_k_reduce(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if (i >= rp.len) {
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

#if COLUMN_SUM
struct SumParams {
    rows: u32,
    cols: u32,
    col_blocks: u32, // ceil(cols / SUM_COLS)
    chunks: u32,     // ceil(rows / CHUNK_ROWS)
}

@group(0) @binding(0) var<uniform> sp: SumParams;

// Stage 1: workgroup (chunk, block) sums rows [chunk*CHUNK_ROWS, +CHUNK_ROWS) of SUM_COLS columns;
// 4 lanes of 64 threads read 64 consecutive columns of 4 rows at a time.
const SUM_COLS: u32 = 64u;
const CHUNK_ROWS: u32 = 128u;

@group(0) @binding(1) var<storage, read> cs_dout: array<{{DOUT_T}}>;    // (rows, cols)
@group(0) @binding(2) var<storage, read_write> cs_partial: array<f32>; // (chunks, cols)

var<workgroup> lane_sums: array<f32, 256>;

@compute @workgroup_size(256)
fn column_sum_partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let id = wid.x + wid.y * nwg.x;
    if (id >= sp.col_blocks * sp.chunks) {
        return;
    }
    let chunk = id / sp.col_blocks;
    let col = (id % sp.col_blocks) * SUM_COLS + lid % SUM_COLS;
    let lane = lid / SUM_COLS;
    var s = 0.0;
    if (col < sp.cols) {
        let end = min(sp.rows, (chunk + 1u) * CHUNK_ROWS);
        for (var r = chunk * CHUNK_ROWS + lane; r < end; r += 4u) {
            s = s + f32(cs_dout[r * sp.cols + col]);
        }
    }
    lane_sums[lid] = s;
    workgroupBarrier();
    if (lane == 0u && col < sp.cols) {
        let c = lid;
        cs_partial[chunk * sp.cols + col] =
            ((lane_sums[c] + lane_sums[c + 64u]) + lane_sums[c + 128u]) + lane_sums[c + 192u];
    }
}

// Stage 2: one thread per column adds the chunks' partial sums in chunk order.
@group(0) @binding(1) var<storage, read> cf_partial: array<f32>;       // (chunks, cols)
@group(0) @binding(2) var<storage, read_write> cf_dbias: array<f32>;   // (cols)

@compute @workgroup_size(64)
fn column_sum_finish(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let col = (wid.x + wid.y * nwg.x) * 64u + lid;
    if (col >= sp.cols) {
        return;
    }
    var s = 0.0;
    for (var chunk = 0u; chunk < sp.chunks; chunk++) {
        s = s + cf_partial[chunk * sp.cols + col];
    }
#if ACCUMULATE
    s = cf_dbias[col] + s;
#endif
    cf_dbias[col] = s;
}
#endif
