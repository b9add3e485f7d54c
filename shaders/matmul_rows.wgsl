// matmul_rows: C[rows, cols] (=|+=) epilogue(A x B^T) for a few rows (at most MAX_ROWS): the
// forward product of a Linear layer while decoding a handful of samples, out[M,N] =
// inp[M,K] @ weight[N,K]^T with M small. A tiled kernel would pad M to its tile height and do
// that many times the arithmetic; here every weight element is read once and used for every row.
//
// A workgroup owns COLS output columns; LANES threads share one column, each summing the k of its
// lane (k = lane, lane + LANES, ...) for every row, then lane 0 adds the lanes' partial sums in
// lane order: the order is fixed, so two runs are bitwise equal (the sums differ in the last bits
// from matmul_tiled's, which adds k in order).
// Parameters, bindings (C may be a window of wider rows) and the epilogue are those of every
// product kernel, in matmul_io.wgsl; B is always (cols, inner) here (B_TRANS) and A (rows, inner).
//
// Defines: A_T, B_T, C_T, ACCUMULATE, the epilogue's, A_TRANS = 0, B_TRANS = 1.
// Grid: one workgroup per COLS columns, linear id wid.x + wid.y * nwg.x (see Gpu::grid).

#include matmul_io

const COLS: u32 = 32u;
const LANES: u32 = 8u;
const MAX_ROWS: u32 = 8u; // ROWS_MAX in ops/matmul/rows.rs

var<workgroup> partials: array<array<f32, MAX_ROWS>, 256>; // [thread][row]

@compute @workgroup_size(256)
fn matmul_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let block = wid.x + wid.y * nwg.x;
    if (block >= p.tiles) {
        return;
    }
    let col = block * COLS + lid / LANES;
    let lane = lid % LANES;
    var acc: array<f32, MAX_ROWS>;
    if (col < p.cols) {
        for (var k = lane; k < p.inner; k += LANES) {
            let w = f32(b[b_index(k, col)]);
            for (var r = 0u; r < MAX_ROWS; r++) {
                if (r < p.rows) {
                    acc[r] = acc[r] + f32(a[a_index(r, k)]) * w;
                }
            }
        }
    }
    partials[lid] = acc;
    workgroupBarrier();
    if (lane == 0u && col < p.cols) {
        for (var r = 0u; r < p.rows; r++) {
            var sum = 0.0;
            for (var l = 0u; l < LANES; l++) {
                sum = sum + partials[lid + l][r];
            }
            store_output(r, col, sum);
        }
    }
}
