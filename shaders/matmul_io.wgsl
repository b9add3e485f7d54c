// What every matrix-product kernel (matmul_tiled, matmul_coop, matmul_rows) shares: the
// parameters, the bindings and the epilogue. Included with `#include matmul_io`, so all kernels
// bind the same tensors in the same places and store the same bits for the same sums.
//
// C[rows, cols] (=|+=) epilogue(A x B): A is (rows, inner), or (inner, rows) with A_TRANS; B is
// (inner, cols), or (cols, inner) with B_TRANS. A and C may be windows of wider matrices (one
// vocabulary piece of the logits): their first element and row stride come in the parameters.
// Split-K (matmul_tiled and matmul_coop, weight gradients): with splits > 1 the inner dimension is
// cut into slices of k_slice elements and slice s's partial product A[:, slice] x B[slice, :] is
// stored, plain, as rows s*rows .. (s+1)*rows of C, an f32 scratch of (splits, rows, cols) that
// split_k_reduce (matmul.wgsl) then adds up in slice order.
// Row sums (ROW_SUMS, weight gradients: the bias gradient with the weight's): the workgroups of
// the first column tile also sum each row of A over their K slice, in k order, from the staged
// A tiles (exact copies of A), and store the sum with store_row_sum. Not with BIAS or a GELU.
// Defines: A_T, B_T, C_T (storage types, f32|f16), A_TRANS, B_TRANS, ACCUMULATE, ROW_SUMS, and
// the epilogue: BIAS (+ BIAS_T), GELU_FWD or GELU_BWD (+ PRE_T, PRE_BINDING).

struct Params {
    rows: u32,
    cols: u32,
    inner: u32,
    tiles_m: u32,  // ceil(rows / BM)
    tiles_n: u32,  // ceil(cols / BN)
    tiles: u32,    // tiles_m * tiles_n
    a_start: u32,  // A's first element in `a`
    a_stride: u32, // elements between A's stored rows (inner, or rows with A_TRANS, when whole)
    c_start: u32,  // C's first element in `c`
    c_stride: u32, // elements between C's rows (cols when whole)
    k_slice: u32,  // inner elements per K slice: inner, or a multiple of 64 when split
    splits: u32,   // K slices; workgroup tiles * s + t sums slice s of output tile t
}

@group(0) @binding(0) var<uniform> p: Params;
// With A_VEC / B_VEC (matmul_tiled) the operand is bound as 16-byte packets of its elements.
#if A_VEC
@group(0) @binding(1) var<storage, read> a: array<vec4<u32>>;     // (rows, inner) or (inner, rows)
#else
@group(0) @binding(1) var<storage, read> a: array<{{A_T}}>;        // (rows, inner) or (inner, rows)
#endif
#if B_VEC
@group(0) @binding(2) var<storage, read> b: array<vec4<u32>>;     // (inner, cols) or (cols, inner)
#else
@group(0) @binding(2) var<storage, read> b: array<{{B_T}}>;        // (inner, cols) or (cols, inner)
#endif
@group(0) @binding(3) var<storage, read_write> c: array<{{C_T}}>;  // (rows, cols)
#if BIAS
@group(0) @binding(4) var<storage, read> bias: array<{{BIAS_T}}>;  // (cols)
#endif
#if GELU_FWD
// The pre-activation A x B + bias is stored here and C receives gelu(pre).
@group(0) @binding({{PRE_BINDING}}) var<storage, read_write> pre: array<{{PRE_T}}>; // (rows, cols)
#endif
#if GELU_BWD
// C receives (A x B) * gelu'(pre).
@group(0) @binding({{PRE_BINDING}}) var<storage, read> pre: array<{{PRE_T}}>;       // (rows, cols)
#endif

#if ROW_SUMS
@group(0) @binding(4) var<storage, read_write> row_sums: array<f32>; // (rows)

// Stores the sum of A's row `row` over K slice `split`: row_sums[row] (=|+=) it in a whole
// product; in a split one, plain, as slice `split`'s partial after C's (splits, rows, cols)
// partials, at splits*rows*cols + split*rows + row, for split_k_reduce to add up.
fn store_row_sum(split: u32, row: u32, sum: f32) {
    if (p.splits > 1u) {
        c[p.splits * p.rows * p.cols + split * p.rows + row] = {{C_T}}(sum);
        return;
    }
#if ACCUMULATE
    row_sums[row] = row_sums[row] + sum;
#else
    row_sums[row] = sum;
#endif
}
#endif

// Index of A[row, k] in `a`.
fn a_index(row: u32, k: u32) -> u32 {
#if A_TRANS
    return p.a_start + k * p.a_stride + row;
#else
    return p.a_start + row * p.a_stride + k;
#endif
}

// Index of B[k, col] in `b`.
fn b_index(k: u32, col: u32) -> u32 {
#if B_TRANS
    return col * p.inner + k;
#else
    return k * p.cols + col;
#endif
}

// Applies the epilogue to one finished sum and writes C[row, col]; the only thread that touches
// this element, so `+=` is an exact read-add-write. (A split product's slice s passes row
// s*rows + r; its epilogue is plain, so `pre` and `bias` are not used.)
fn store_output(row: u32, col: u32, sum: f32) {
    let idx = row * p.cols + col; // in `pre`, always whole
    let c_idx = p.c_start + row * p.c_stride + col;
    var v = sum;
#if BIAS
    v = v + f32(bias[col]);
#endif
#if GELU_FWD
    // GELU of the value as stored, so the fused pass equals matmul-then-gelu at any precision
    // and the backward pass sees the same pre-activation.
    let stored = {{PRE_T}}(v);
    pre[idx] = stored;
    v = gelu(f32(stored));
#endif
#if GELU_BWD
    v = v * gelu_grad(f32(pre[idx]));
#endif
#if ACCUMULATE
    v = f32(c[c_idx]) + v;
#endif
    c[c_idx] = {{C_T}}(v);
}

#include gelu
