// LayerNorm over rows of C channels (eps 1e-5): forward, the fused residual-add + forward used
// between blocks, and the backward pass. Statistics and all arithmetic are f32 whatever the
// storage types.
//
// Row kernels run one workgroup of 256 threads per row. Thread `lid` owns the columns lid,
// lid + 256, ... of its row: consecutive threads touch consecutive addresses (coalesced), and every
// pass over a row touches the same elements from the same thread, so a thread may read back what
// it wrote itself without a barrier. Row sums are reduced in a fixed order, so results are
// bitwise reproducible on a given adapter: with SUBGROUPS, subgroupAdd within each subgroup and
// then the per-subgroup partials in subgroup order (one barrier per sum); without, a fixed-shape
// tree in workgroup memory.
//
// Each entry point sits in its own section (FORWARD, FUSED, BACKWARD, BACKWARD_PARAMS), so a
// launcher sets only the defines its kernel uses: IN_T (inp / a), B_T (b), OUT_T (out), DOUT_T
// (dout): f32 | f16; ROWS: rows per workgroup of the backward kernel; SUBGROUPS: whether the row
// kernels reduce with subgroup operations (the device has the SUBGROUP feature).

const WG: u32 = 256u;
const EPS: f32 = 1e-5;

struct Params {
    n: u32,      // rows (B*T)
    c: u32,      // channels
    groups: u32, // backward: workgroups of stage 1 = partial sums in scratch
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// An invocation's place in its (1-D) workgroup and, with SUBGROUPS, in its subgroup.
struct Thread {
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUPS
    @builtin(subgroup_id) sg: u32,                 // which subgroup of the workgroup
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
#endif
}

#if SUBGROUPS
// One partial per subgroup, indexed by subgroup_id: no assumption on the subgroup size (the
// driver may pick any, and wgpu lets it vary per pipeline) nor on how invocations are laid out
// in subgroups. Vulkan does not promise full subgroups either, so there may in principle be as
// many subgroups as invocations: WG slots. (local_invocation_index / subgroup_size would not do:
// llvmpipe with 1024-bit vectors reports 32 lanes but fills 16 per subgroup.) Two sets of slots,
// which consecutive calls alternate between (`slot`), so one barrier per sum suffices: a thread
// can only overwrite set k after the barrier of the next call, which every thread reaches after
// reading set k.
var<workgroup> partials1: array<f32, 512>;        // (2, WG)
var<workgroup> partials2: array<vec2<f32>, 512>;  // (2, WG)

// Sum of `v` over the workgroup, returned to every thread (the same bits everywhere: every thread
// adds the partials in the same order). Must be called in uniform control flow; consecutive calls
// must pass different `slot`s (0, 1).
fn block_sum(t: Thread, v: f32, slot: u32) -> f32 {
    let s = subgroupAdd(v);
    // Only the first active lane writes: subgroups need not be full nor start at lane 0.
    let first = subgroupBroadcastFirst(t.sg_lane);
    let base = slot * WG;
    if (t.sg_lane == first) {
        partials1[base + t.sg] = s;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var k = 0u; k < t.sg_count; k++) {
        total += partials1[base + k];
    }
    return total;
}

// Two sums at once (the backward pass needs two per row).
fn block_sum2(t: Thread, v: vec2<f32>, slot: u32) -> vec2<f32> {
    let s = subgroupAdd(v);
    let first = subgroupBroadcastFirst(t.sg_lane);
    let base = slot * WG;
    if (t.sg_lane == first) {
        partials2[base + t.sg] = s;
    }
    workgroupBarrier();
    var total = vec2<f32>(0.0, 0.0);
    for (var k = 0u; k < t.sg_count; k++) {
        total += partials2[base + k];
    }
    return total;
}
#else
var<workgroup> red1: array<f32, 256>;
var<workgroup> red2: array<vec2<f32>, 256>;

// Sum of `v` over the workgroup, returned to every thread. Must be called in uniform control flow.
// `slot` is for the subgroup version's alternating partials; the tree does not need it.
fn block_sum(t: Thread, v: f32, slot: u32) -> f32 {
    let lid = t.lid;
    red1[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red1[lid] = red1[lid] + red1[lid + s];
        }
        workgroupBarrier();
    }
    let total = red1[0];
    // Nobody may overwrite red1 (a later call) before every thread has read the total.
    workgroupBarrier();
    return total;
}

// Two sums at once (the backward pass needs two per row).
fn block_sum2(t: Thread, v: vec2<f32>, slot: u32) -> vec2<f32> {
    let lid = t.lid;
    red2[lid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            red2[lid] = red2[lid] + red2[lid + s];
        }
        workgroupBarrier();
    }
    let total = red2[0];
    workgroupBarrier();
    return total;
}
#endif

fn group_id(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

#if FORWARD
// ---- layernorm_forward: out = (inp - mean) * rstd * weight + bias ------------------------------
@group(0) @binding(1) var<storage, read> lf_inp: array<{{IN_T}}>;          // (N, C)
@group(0) @binding(2) var<storage, read> lf_weight: array<f32>;            // (C)
@group(0) @binding(3) var<storage, read> lf_bias: array<f32>;              // (C)
@group(0) @binding(4) var<storage, read_write> lf_out: array<{{OUT_T}}>;   // (N, C)
@group(0) @binding(5) var<storage, read_write> lf_mean: array<f32>;        // (N)
@group(0) @binding(6) var<storage, read_write> lf_rstd: array<f32>;        // (N)

@compute @workgroup_size(256)
fn layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     t: Thread) {
    let lid = t.lid;
    let row = group_id(wid, nwg);
    if (row >= p.n) { return; }
    let base = row * p.c;
    let inv_c = 1.0 / f32(p.c);

    // Two passes (mean, then the mean of squared deviations): no cancellation, unlike E[x^2]-E[x]^2.
    // The re-reads of the row hit the cache.
    var s = 0.0;
    for (var c = lid; c < p.c; c += WG) {
        s += f32(lf_inp[base + c]);
    }
    let mean = block_sum(t, s, 0u) * inv_c;
    var q = 0.0;
    for (var c = lid; c < p.c; c += WG) {
        let d = f32(lf_inp[base + c]) - mean;
        q += d * d;
    }
    let rstd = 1.0 / sqrt(block_sum(t, q, 1u) * inv_c + EPS);
    for (var c = lid; c < p.c; c += WG) {
        let xhat = (f32(lf_inp[base + c]) - mean) * rstd;
        lf_out[base + c] = {{OUT_T}}(xhat * lf_weight[c] + lf_bias[c]);
    }
    if (lid == 0u) {
        lf_mean[row] = mean;
        lf_rstd[row] = rstd;
    }
}

#endif
#if FUSED
// ---- fused_residual_layernorm_forward: residual = a + b; out = layernorm(residual) -------------
@group(0) @binding(1) var<storage, read> rf_a: array<{{IN_T}}>;            // (N, C)
@group(0) @binding(2) var<storage, read> rf_b: array<{{B_T}}>;             // (N, C)
@group(0) @binding(3) var<storage, read> rf_weight: array<f32>;            // (C)
@group(0) @binding(4) var<storage, read> rf_bias: array<f32>;              // (C)
@group(0) @binding(5) var<storage, read_write> rf_residual: array<f32>;    // (N, C)
@group(0) @binding(6) var<storage, read_write> rf_out: array<{{OUT_T}}>;   // (N, C)
@group(0) @binding(7) var<storage, read_write> rf_mean: array<f32>;        // (N)
@group(0) @binding(8) var<storage, read_write> rf_rstd: array<f32>;        // (N)

@compute @workgroup_size(256)
fn fused_residual_layernorm_forward(@builtin(workgroup_id) wid: vec3<u32>,
                                    @builtin(num_workgroups) nwg: vec3<u32>,
                                    t: Thread) {
    let lid = t.lid;
    let row = group_id(wid, nwg);
    if (row >= p.n) { return; }
    let base = row * p.c;
    let inv_c = 1.0 / f32(p.c);

    var s = 0.0;
    for (var c = lid; c < p.c; c += WG) {
        let x = f32(rf_a[base + c]) + f32(rf_b[base + c]);
        rf_residual[base + c] = x;
        s += x;
    }
    let mean = block_sum(t, s, 0u) * inv_c;
    // The residual elements read below were written by this same thread above.
    var q = 0.0;
    for (var c = lid; c < p.c; c += WG) {
        let d = rf_residual[base + c] - mean;
        q += d * d;
    }
    let rstd = 1.0 / sqrt(block_sum(t, q, 1u) * inv_c + EPS);
    for (var c = lid; c < p.c; c += WG) {
        let xhat = (rf_residual[base + c] - mean) * rstd;
        rf_out[base + c] = {{OUT_T}}(xhat * rf_weight[c] + rf_bias[c]);
    }
    if (lid == 0u) {
        rf_mean[row] = mean;
        rf_rstd[row] = rstd;
    }
}

#endif
#if BACKWARD
// ---- layernorm_backward (stage 1) ---------------------------------------------------------------
// Workgroup g handles rows [g*ROWS, g*ROWS + ROWS). Phase A, row by row: dinp += rstd * (dnorm -
// mean(dnorm) - xhat * mean(dnorm * xhat)) with dnorm = dout * weight. Phase B, column by column:
// the chunk's partial dweight = sum dout * xhat and dbias = sum dout over its rows, in row order,
// written to scratch[g] (the chunk's rows are still in cache from phase A). Stage 2 adds the
// partials of all chunks in a fixed order: no float atomics, bitwise reproducible.
@group(0) @binding(1) var<storage, read> lb_dout: array<{{DOUT_T}}>;       // (N, C)
@group(0) @binding(2) var<storage, read> lb_inp: array<{{IN_T}}>;          // (N, C)
@group(0) @binding(3) var<storage, read> lb_weight: array<f32>;            // (C)
@group(0) @binding(4) var<storage, read> lb_mean: array<f32>;              // (N)
@group(0) @binding(5) var<storage, read> lb_rstd: array<f32>;              // (N)
@group(0) @binding(6) var<storage, read_write> lb_dinp: array<f32>;        // (N, C), accumulated
@group(0) @binding(7) var<storage, read_write> lb_scratch: array<f32>;     // (groups, 2, C)

@compute @workgroup_size(256)
fn layernorm_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      t: Thread) {
    let lid = t.lid;
    let g = group_id(wid, nwg);
    if (g >= p.groups) { return; }
    let row0 = g * {{ROWS}}u;
    let rows = min({{ROWS}}u, p.n - row0);
    let inv_c = 1.0 / f32(p.c);

    for (var r = 0u; r < rows; r++) {
        let row = row0 + r;
        let base = row * p.c;
        let mean = lb_mean[row];
        let rstd = lb_rstd[row];
        var acc = vec2<f32>(0.0, 0.0);
        for (var c = lid; c < p.c; c += WG) {
            let xhat = (f32(lb_inp[base + c]) - mean) * rstd;
            let dnorm = lb_weight[c] * f32(lb_dout[base + c]);
            acc += vec2<f32>(dnorm, dnorm * xhat);
        }
        let means = block_sum2(t, acc, r & 1u) * inv_c; // (mean(dnorm), mean(dnorm * xhat))
        for (var c = lid; c < p.c; c += WG) {
            let xhat = (f32(lb_inp[base + c]) - mean) * rstd;
            let dnorm = lb_weight[c] * f32(lb_dout[base + c]);
            lb_dinp[base + c] += rstd * (dnorm - means.x - xhat * means.y);
        }
    }

    let out = g * 2u * p.c;
    for (var c = lid; c < p.c; c += WG) {
        var dw = 0.0;
        var db = 0.0;
        for (var r = 0u; r < rows; r++) {
            let row = row0 + r;
            let d = f32(lb_dout[row * p.c + c]);
            let xhat = (f32(lb_inp[row * p.c + c]) - lb_mean[row]) * lb_rstd[row];
            dw += d * xhat;
            db += d;
        }
        lb_scratch[out + c] = dw;
        lb_scratch[out + p.c + c] = db;
    }
}

#endif
#if BACKWARD_PARAMS
// ---- layernorm_backward_params (stage 2): dweight += sum_g partial, dbias likewise ---------------
// Workgroup (32 columns) x (8 lanes): lane l sums the partials g = l, l + 8, ... of its column (reads
// of 32 consecutive floats, coalesced), then lane 0 adds the 8 lane sums in order.
@group(0) @binding(1) var<storage, read> lp_scratch: array<f32>;           // (groups, 2, C)
@group(0) @binding(2) var<storage, read_write> lp_dweight: array<f32>;     // (C), accumulated
@group(0) @binding(3) var<storage, read_write> lp_dbias: array<f32>;       // (C), accumulated

const LP_COLS: u32 = 32u;
const LP_LANES: u32 = 8u;
var<workgroup> lane_sums: array<array<f32, 32>, 8>;

@compute @workgroup_size(32, 8)
fn layernorm_backward_params(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_id) lid: vec3<u32>) {
    let j = group_id(wid, nwg) * LP_COLS + lid.x; // column of the (2, C) partial: dweight then dbias
    let width = 2u * p.c;
    var s = 0.0;
    if (j < width) {
        for (var g = lid.y; g < p.groups; g += LP_LANES) {
            s += lp_scratch[g * width + j];
        }
    }
    lane_sums[lid.y][lid.x] = s;
    workgroupBarrier();
    if (lid.y == 0u && j < width) {
        var total = 0.0;
        for (var l = 0u; l < LP_LANES; l++) {
            total += lane_sums[l][lid.x];
        }
        if (j < p.c) {
            lp_dweight[j] += total;
        } else {
            lp_dbias[j - p.c] += total;
        }
    }
}
#endif
