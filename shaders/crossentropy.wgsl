// Fused softmax + cross-entropy over a padded vocabulary, and the mean of the per-row losses.
//
// Sections: FORWARD_BACKWARD (defines LOGIT_T: f32 | f16, BACKWARD: whether dlogits are written),
// LOSS_MEAN. Both take SUBGROUPS: whether the workgroup reductions use subgroup operations (the
// device has the SUBGROUP feature) instead of a fixed-shape tree in workgroup memory. All
// arithmetic is f32.
//
// Subgroup reductions: a subgroup operation within each subgroup, the first active lane writes the
// subgroup's partial to slot subgroup_id, one barrier, then the partials are combined in slot
// order. Indexing by subgroup_id assumes nothing about the subgroup size (the driver may pick
// any, and wgpu lets it vary per pipeline) or the layout of invocations in subgroups; as Vulkan
// does not promise full subgroups, there may be as many subgroups as invocations: WG slots.
// (local_invocation_index / subgroup_size would not do: llvmpipe with 1024-bit vectors reports
// 32 lanes but fills 16 per subgroup.) The order of operations is fixed for a given adapter, so
// results are bitwise reproducible.

const WG: u32 = 256u;

// An invocation's place in its (1-D) workgroup and, with SUBGROUPS, in its subgroup.
struct Thread {
    @builtin(local_invocation_index) lid: u32,
#if SUBGROUPS
    @builtin(subgroup_id) sg: u32,                 // which subgroup of the workgroup
    @builtin(num_subgroups) sg_count: u32,
    @builtin(subgroup_invocation_id) sg_lane: u32,
#endif
}

#if FORWARD_BACKWARD
// ---- crossentropy_forward_backward --------------------------------------------------------------
// One workgroup per row; thread `lid` owns the columns lid, lid + 256, ... (coalesced). Pass 1: a
// running (max, sum of exp(x - max)) per thread over the first V columns (online softmax: one read
// of the row), merged per subgroup and then across subgroups in subgroup order (SUBGROUPS) or in a
// fixed-shape tree. Pass 2 (BACKWARD): each thread overwrites its own columns with dlogits, so
// reading and writing the row through one binding is race-free; the target's logit is read by
// thread 0 before the reduction's first barrier, i.e. before any write.
struct Params {
    n: u32,  // rows (B*T)
    vp: u32, // padded columns per row
    v: u32,  // real vocabulary: columns >= v are masked out and get zero gradient
    _pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<{{LOGIT_T}}>; // (N, Vp), dlogits after
@group(0) @binding(2) var<storage, read> targets: array<u32>;              // (N)
@group(0) @binding(3) var<storage, read> dloss: array<f32>;                // (1)
@group(0) @binding(4) var<storage, read_write> losses: array<f32>;         // (N)

#if SUBGROUPS
var<workgroup> part_max: array<f32, 256>;   // (WG) per subgroup: max of its lanes' maxima
var<workgroup> part_sum: array<f32, 256>;   // (WG) its sum of exp(x - part_max)
#else
var<workgroup> red_max: array<f32, 256>;
var<workgroup> red_sum: array<f32, 256>;
#endif

// A finite stand-in for -inf: exp(LOWEST - m) is 0 for any real m, and LOWEST - LOWEST = 0 keeps
// empty partials NaN-free.
const LOWEST: f32 = -3.0e38;

@compute @workgroup_size(256)
fn crossentropy_forward_backward(@builtin(workgroup_id) wid: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>,
                                 t: Thread) {
    let lid = t.lid;
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n) { return; }
    let base = row * p.vp;
    // An out-of-range target (bad data) is clamped so nothing is read out of bounds.
    let tgt = min(targets[row], p.v - 1u);
    var target_logit = 0.0;
    if (lid == 0u) {
        target_logit = f32(logits[base + tgt]);
    }

    var m = LOWEST;
    var s = 0.0;
    for (var j = lid; j < p.v; j += WG) {
        let x = f32(logits[base + j]);
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s += exp(x - m);
        }
    }
#if SUBGROUPS
    // The lanes' (max, sum) merged: every sum rescaled to the subgroup's max. An empty lane
    // (m = LOWEST, s = 0) adds 0 whatever the max.
    let sg_max = subgroupMax(m);
    let sg_sum = subgroupAdd(s * exp(m - sg_max));
    // Only the first active lane writes: subgroups need not be full nor start at lane 0.
    let first = subgroupBroadcastFirst(t.sg_lane);
    if (t.sg_lane == first) {
        part_max[t.sg] = sg_max;
        part_sum[t.sg] = sg_sum;
    }
    workgroupBarrier();
    // Every thread merges the partials in the same order, so all agree on the bits.
    var row_max = LOWEST;
    for (var k = 0u; k < t.sg_count; k++) {
        row_max = max(row_max, part_max[k]);
    }
    var row_sum = 0.0;
    for (var k = 0u; k < t.sg_count; k++) {
        row_sum += part_sum[k] * exp(part_max[k] - row_max);
    }
#else
    red_max[lid] = m;
    red_sum[lid] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            let m1 = red_max[lid];
            let m2 = red_max[lid + st];
            let mm = max(m1, m2);
            red_sum[lid] = red_sum[lid] * exp(m1 - mm) + red_sum[lid + st] * exp(m2 - mm);
            red_max[lid] = mm;
        }
        workgroupBarrier();
    }
    let row_max = red_max[0];
    let row_sum = red_sum[0];
#endif
    if (lid == 0u) {
        losses[row] = row_max + log(row_sum) - target_logit;
    }

#if BACKWARD
    let scale = dloss[0];
    let inv_sum = 1.0 / row_sum;
    for (var j = lid; j < p.vp; j += WG) {
        var d = 0.0;
        if (j < p.v) {
            let prob = exp(f32(logits[base + j]) - row_max) * inv_sum;
            d = (prob - select(0.0, 1.0, j == tgt)) * scale;
        }
        logits[base + j] = {{LOGIT_T}}(d);
    }
#endif
}
#endif

#if LOSS_MEAN
// ---- loss_mean: out = (accumulate ? out : 0) + scale * sum(losses) -----------------------------
// A single workgroup: per-thread strided sums, then per subgroup and across subgroups in subgroup
// order (SUBGROUPS) or a fixed-shape tree (deterministic either way).
struct MeanParams {
    n: u32,
    accumulate: u32,
    scale: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> mp: MeanParams;
@group(0) @binding(1) var<storage, read> lm_losses: array<f32>;     // (N)
@group(0) @binding(2) var<storage, read_write> lm_out: array<f32>;  // (1)

#if SUBGROUPS
var<workgroup> lm_partials: array<f32, 256>;    // (WG) one sum per subgroup
#else
var<workgroup> red: array<f32, 256>;
#endif

@compute @workgroup_size(256)
fn loss_mean(t: Thread) {
    let lid = t.lid;
    var s = 0.0;
    for (var i = lid; i < mp.n; i += WG) {
        s += lm_losses[i];
    }
#if SUBGROUPS
    let sg_sum = subgroupAdd(s);
    let first = subgroupBroadcastFirst(t.sg_lane);
    if (t.sg_lane == first) {
        lm_partials[t.sg] = sg_sum;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var total = 0.0;
        for (var k = 0u; k < t.sg_count; k++) {
            total += lm_partials[k];
        }
        var prev = 0.0;
        if (mp.accumulate != 0u) {
            prev = lm_out[0];
        }
        lm_out[0] = prev + mp.scale * total;
    }
#else
    red[lid] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            red[lid] = red[lid] + red[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var prev = 0.0;
        if (mp.accumulate != 0u) {
            prev = lm_out[0];
        }
        lm_out[0] = prev + mp.scale * red[0];
    }
#endif
}
#endif
