// The optimiser: the global gradient norm over the f32 buffers that hold every parameter
// gradient (deterministic: partial sums per buffer, then all partials added in order) and fused
// AdamW over one parameter buffer per dispatch.
//
// Sections: NORM_PARTIALS, NORM_FINISH, ADAMW (define COPY_T = f16: also refresh an f16 copy of
// the parameters in the same pass), STEP_STATE (the loss scaler and Adam's step count, advanced
// on the GPU at the end of each step so that the next step needs nothing from the CPU but lr). The norm's sections take SUBGROUPS: whether their workgroup
// reductions use subgroup operations (the device has the SUBGROUP feature) instead of a
// fixed-shape tree in workgroup memory.
//
// Subgroup reductions: a subgroup operation within each subgroup, the first active lane writes the
// subgroup's partial to slot subgroup_id, one barrier, then thread 0 adds the partials in slot
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

// Exponent bits all ones: inf or NaN. A bit test, because comparisons with NaN may be folded
// away by shader compilers.
fn is_non_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

// Written by the CPU each step (GradNormScalars in src/ops/optimizer.rs).
struct GradNormScalars {
    inv_loss_scale: f32,
    max_norm: f32, // clipping threshold; <= 0 disables clipping
    _pad0: f32,
    _pad1: f32,
}

struct NormParams {
    n: u32,      // gradient elements of this buffer (stage 1)
    groups: u32, // stage 1: this buffer's workgroups; stage 2: partials over all buffers
    base: u32,   // stage 1: this buffer's first partial in scratch
    total: u32,  // partials over all buffers (the flags follow the sums)
}

#if NORM_PARTIALS
// ---- grad_norm_partials (stage 1) --------------------------------------------------------------
// One dispatch per gradient buffer. A fixed number of workgroups walk the buffer with a grid
// stride (any n, no 65535-workgroup limit); each thread sums (g * inv_loss_scale)^2 in f32 over
// about n / (groups * 256) elements (scaling first keeps the loss-scaled squares from
// overflowing), then a workgroup reduction. scratch[base + g] = partial sum,
// scratch[total + base + g] = 1.0 if a non-finite gradient was seen.
@group(0) @binding(0) var<uniform> np: NormParams;
@group(0) @binding(1) var<storage, read> gp_grads: array<f32>;              // (n)
@group(0) @binding(2) var<storage, read> gp_scalars: GradNormScalars;
@group(0) @binding(3) var<storage, read_write> gp_scratch: array<f32>;      // (2 * total)

#if SUBGROUPS
var<workgroup> part_sum: array<f32, 256>;   // (WG) one sum per subgroup
var<workgroup> part_bad: array<u32, 256>;   // (WG) 1 if the subgroup saw a non-finite gradient
#else
var<workgroup> red_sum: array<f32, 256>;
var<workgroup> red_bad: array<u32, 256>;
#endif

@compute @workgroup_size(256)
fn grad_norm_partials(@builtin(workgroup_id) wid: vec3<u32>, t: Thread) {
    let lid = t.lid;
    let g = wid.x;
    let inv = gp_scalars.inv_loss_scale;
    let stride = np.groups * WG;
    var s = 0.0;
    var bad = 0u;
    for (var i = g * WG + lid; i < np.n; i += stride) {
        let x = gp_grads[i];
        if (is_non_finite(x)) {
            bad = 1u;
        }
        let y = x * inv;
        s += y * y;
    }
#if SUBGROUPS
    let sg_sum = subgroupAdd(s);
    let sg_bad = subgroupMax(bad);
    // Only the first active lane writes: subgroups need not be full nor start at lane 0.
    let first = subgroupBroadcastFirst(t.sg_lane);
    if (t.sg_lane == first) {
        part_sum[t.sg] = sg_sum;
        part_bad[t.sg] = sg_bad;
    }
    workgroupBarrier();
    if (lid == 0u && g < np.groups) {
        var total = 0.0;
        var any_bad = 0u;
        for (var k = 0u; k < t.sg_count; k++) {
            total += part_sum[k];
            any_bad |= part_bad[k];
        }
        gp_scratch[np.base + g] = total;
        gp_scratch[np.total + np.base + g] = f32(any_bad);
    }
#else
    red_sum[lid] = s;
    red_bad[lid] = bad;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            red_sum[lid] = red_sum[lid] + red_sum[lid + st];
            red_bad[lid] = red_bad[lid] | red_bad[lid + st];
        }
        workgroupBarrier();
    }
    if (lid == 0u && g < np.groups) {
        gp_scratch[np.base + g] = red_sum[0];
        gp_scratch[np.total + np.base + g] = f32(red_bad[0]);
    }
#endif
}
#endif

#if NORM_FINISH
// ---- grad_norm_finish (stage 2): status = [norm, clip_coef, finite, 0] ---------------------------
@group(0) @binding(0) var<uniform> fp: NormParams;
@group(0) @binding(1) var<storage, read> gf_scratch: array<f32>;            // (2 * groups)
@group(0) @binding(2) var<storage, read> gf_scalars: GradNormScalars;
@group(0) @binding(3) var<storage, read_write> gf_status: array<f32>;       // (4)

#if SUBGROUPS
var<workgroup> fpart_sum: array<f32, 256>;  // (WG) one sum per subgroup
var<workgroup> fpart_bad: array<f32, 256>;  // (WG) max of the subgroup's flags
#else
var<workgroup> fred_sum: array<f32, 256>;
var<workgroup> fred_bad: array<f32, 256>;
#endif

@compute @workgroup_size(256)
fn grad_norm_finish(t: Thread) {
    let lid = t.lid;
    var s = 0.0;
    var bad = 0.0;
    for (var g = lid; g < fp.groups; g += WG) {
        s += gf_scratch[g];
        bad = max(bad, gf_scratch[fp.groups + g]);
    }
#if SUBGROUPS
    let sg_sum = subgroupAdd(s);
    let sg_bad = subgroupMax(bad);
    let first = subgroupBroadcastFirst(t.sg_lane);
    if (t.sg_lane == first) {
        fpart_sum[t.sg] = sg_sum;
        fpart_bad[t.sg] = sg_bad;
    }
    workgroupBarrier();
    if (lid == 0u) {
        var sum = 0.0;
        var any_bad = 0.0;
        for (var k = 0u; k < t.sg_count; k++) {
            sum += fpart_sum[k];
            any_bad = max(any_bad, fpart_bad[k]);
        }
        write_status(sum, any_bad);
    }
#else
    fred_sum[lid] = s;
    fred_bad[lid] = bad;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st = st >> 1u) {
        if (lid < st) {
            fred_sum[lid] = fred_sum[lid] + fred_sum[lid + st];
            fred_bad[lid] = max(fred_bad[lid], fred_bad[lid + st]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        write_status(fred_sum[0], fred_bad[0]);
    }
#endif
}

// status = [norm, clip_coef, finite, 0] from the sum of squares and the non-finite flag.
fn write_status(sum_squares: f32, bad: f32) {
    let norm = sqrt(sum_squares);
    // The sum of squares can overflow even when every gradient is finite.
    let finite = bad == 0.0 && !is_non_finite(norm);
    var clip = 1.0;
    if (finite && gf_scalars.max_norm > 0.0) {
        clip = min(1.0, gf_scalars.max_norm / (norm + 1e-6));
    }
    gf_status[0] = norm;
    gf_status[1] = clip;
    gf_status[2] = select(0.0, 1.0, finite);
    gf_status[3] = 0.0;
}
#endif

#if ADAMW
// ---- adamw: one thread per element of the flat parameter buffer ----------------------------------
// PyTorch AdamW: g = grad * inv_loss_scale * clip; p *= 1 - lr * wd (only i < n_decay);
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= lr * (m / bc1) / (sqrt(v / bc2) + eps).
// A step whose gradients are not finite (status[2] == 0) changes nothing: dynamic loss scaling
// skips it.
struct AdamWHyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32, // 1 - beta1^t
    bias_correction2: f32, // 1 - beta2^t
    inv_loss_scale: f32,
}

struct AdamParams {
    n: u32,
    n_decay: u32, // elements [0, n_decay) get weight decay
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> ap: AdamParams;
@group(0) @binding(1) var<storage, read_write> ad_params: array<f32>;       // (n)
@group(0) @binding(2) var<storage, read> ad_grads: array<f32>;              // (n)
@group(0) @binding(3) var<storage, read_write> ad_m: array<f32>;            // (n)
@group(0) @binding(4) var<storage, read_write> ad_v: array<f32>;            // (n)
@group(0) @binding(5) var<storage, read> ad_status: array<f32>;             // (4) from grad_norm
@group(0) @binding(6) var<storage, read> ad_hyper: AdamWHyper;
#if COPY_T
@group(0) @binding(7) var<storage, read_write> ad_params_copy: array<{{COPY_T}}>;   // (n)
#endif

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= ap.n || ad_status[2] == 0.0) { return; }
    let h = ad_hyper;
    let g = ad_grads[i] * (h.inv_loss_scale * ad_status[1]);
    var p = ad_params[i];
    if (i < ap.n_decay) {
        p *= 1.0 - h.lr * h.weight_decay;
    }
    let m = h.beta1 * ad_m[i] + (1.0 - h.beta1) * g;
    let v = h.beta2 * ad_v[i] + (1.0 - h.beta2) * g * g;
    let m_hat = m / h.bias_correction1;
    let v_hat = v / h.bias_correction2;
    p -= h.lr * m_hat / (sqrt(v_hat) + h.eps);
    ad_params[i] = p;
    ad_m[i] = m;
    ad_v[i] = v;
#if COPY_T
    ad_params_copy[i] = {{COPY_T}}(p);
#endif
}
#endif

#if STEP_STATE
// ---- advance_step_state: one thread, last node of a step ------------------------------------------
// Dynamic loss scaling as PyTorch's GradScaler, on the GPU: a step whose gradients are not finite
// (status[2] == 0) halves the scale (not below 2^-16) and was skipped; otherwise the clean-step
// count grows and, with scaling on, doubles the scale (not above 2^24) every growth_interval
// clean steps; Adam's step count t grows with every step taken. Then writes what the next step
// reads: the cross-entropy's dloss = scale / tokens, 1 / scale for the norm and AdamW, and the
// bias corrections of step t + 1 from a table computed on the CPU in f64 (1.0 past its end, where
// both round to 1 in f32). Every value is produced by exact operations (scaling by powers of two,
// table lookups), so it is bit for bit what the CPU wrote before (StepState in
// src/ops/optimizer.rs).
struct StepState {
    scale: f32,
    inv_scale: f32,      // 1 / scale, correctly rounded
    dloss: f32,          // scale / tokens, correctly rounded
    inv_tokens: f32,     // 1 / tokens, correctly rounded
    clean_steps: u32,
    adam_t: u32,         // optimiser steps taken (skipped ones excluded)
    skipped: u32,        // whether the last step was skipped
    steps: u32,          // steps run, skipped ones included
}

struct StateParams {
    growth_interval: u32,
    scaling: u32,        // 1: f16 dynamic loss scaling; 0: the scale stays 1
    table_len: u32,      // bias-correction pairs in the table, for t = 1 ..= table_len
    _pad: u32,
}

const MIN_SCALE: f32 = 1.52587890625e-05; // 2^-16
const MAX_SCALE: f32 = 16777216.0;        // 2^24

@group(0) @binding(0) var<uniform> sp: StateParams;
@group(0) @binding(1) var<storage, read> st_status: array<f32>;             // (4) from grad_norm
@group(0) @binding(2) var<storage, read_write> st_state: StepState;
@group(0) @binding(3) var<storage, read> st_table: array<f32>;              // (2 * table_len)
@group(0) @binding(4) var<storage, read_write> st_dloss: array<f32>;        // (1)
@group(0) @binding(5) var<storage, read_write> st_norm: array<f32>;         // GradNormScalars
@group(0) @binding(6) var<storage, read_write> st_hyper: array<f32>;        // AdamWHyper

// The scale times 2^e (e = -1 or 1) with its reciprocal and dloss scaled alike; clamped to
// [2^-16, 2^24], where the clamp value's reciprocal and dloss are exact too.
fn rescale(s: ptr<function, StepState>, up: bool) {
    if (up) {
        if ((*s).scale * 2.0 > MAX_SCALE) {
            (*s).scale = MAX_SCALE;
            (*s).inv_scale = 1.0 / MAX_SCALE;
            (*s).dloss = MAX_SCALE * (*s).inv_tokens;
        } else {
            (*s).scale *= 2.0;
            (*s).inv_scale *= 0.5;
            (*s).dloss *= 2.0;
        }
    } else {
        if ((*s).scale * 0.5 < MIN_SCALE) {
            (*s).scale = MIN_SCALE;
            (*s).inv_scale = 1.0 / MIN_SCALE;
            (*s).dloss = MIN_SCALE * (*s).inv_tokens;
        } else {
            (*s).scale *= 0.5;
            (*s).inv_scale *= 2.0;
            (*s).dloss *= 0.5;
        }
    }
}

@compute @workgroup_size(1)
fn advance_step_state() {
    var s = st_state;
    s.steps += 1u;
    if (st_status[2] == 0.0) {
        if (sp.scaling == 1u) {
            rescale(&s, false);
        }
        s.clean_steps = 0u;
        s.skipped = 1u;
    } else {
        s.skipped = 0u;
        s.adam_t += 1u;
        s.clean_steps += 1u;
        if (sp.scaling == 1u && s.clean_steps >= sp.growth_interval) {
            rescale(&s, true);
            s.clean_steps = 0u;
        }
    }
    st_state = s;
    st_dloss[0] = s.dloss;
    st_norm[0] = s.inv_scale;
    // AdamWHyper: [lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2,
    // inv_loss_scale]; lr is the CPU's, written per step.
    let t = s.adam_t + 1u;
    var bc = vec2<f32>(1.0, 1.0);
    if (t <= sp.table_len) {
        bc = vec2<f32>(st_table[2u * (t - 1u)], st_table[2u * (t - 1u) + 1u]);
    }
    st_hyper[5] = bc.x;
    st_hyper[6] = bc.y;
    st_hyper[7] = s.inv_scale;
}
#endif
