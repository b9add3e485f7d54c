// Incremental decoding: the embedding of one position, attention of one new query per sample
// over a key/value cache, and top-k / temperature sampling on the GPU.
//
// The cache of a layer is laid out time-major, (T_MAX, S, 3C): row t holds the c_attn output
// (q | k | v) of position t for every sample, so writing one position is one contiguous row.
// `step.pos` (the position being decoded) is rewritten by the CPU before each token.

struct Shape {
    s: u32,      // samples decoded together
    c: u32,      // channels
    nh: u32,     // heads
    t_max: u32,  // positions the cache holds
    v: u32,      // real vocabulary (sampling ignores the padded columns beyond it)
    vp: u32,     // padded vocabulary (row stride of the logits)
    first: u32,      // embedding_at: the first row of the token-table piece it reads
    piece_rows: u32, // embedding_at: rows in that piece
}

struct Step {
    pos: u32,
    top_k: u32,
    temperature: f32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> shape: Shape;
@group(0) @binding(1) var<uniform> step: Step;

// ---- embedding_at: out[s, :] = wte[tokens[s], :] + wpe[pos, :] --------------------------------
// The token table may come in pieces of rows (one launch per piece): a launch writes the samples
// whose token lies in its piece.
@group(0) @binding(2) var<storage, read> ea_tokens: array<u32>;         // (S)
@group(0) @binding(3) var<storage, read> ea_wte: array<{{W_T}}>;         // (piece_rows, C)
@group(0) @binding(4) var<storage, read> ea_wpe: array<{{W_T}}>;         // (block, C)
@group(0) @binding(5) var<storage, read_write> ea_out: array<f32>;      // (S, C)

@compute @workgroup_size(64)
fn embedding_at(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let s = wid.x;
    let tok = min(ea_tokens[s], shape.vp - 1u);
    if (tok < shape.first || tok - shape.first >= shape.piece_rows) { return; }
    let row = tok - shape.first;
    for (var c = lid; c < shape.c; c += 64u) {
        ea_out[s * shape.c + c] = f32(ea_wte[row * shape.c + c]) + f32(ea_wpe[step.pos * shape.c + c]);
    }
}

// ---- attention_decode: one query per (sample, head) over positions 0..=pos ---------------------
// The new position's q, k, v come in `ad_qkv`; k and v are first stored into the cache.
const AD_THREADS: u32 = 64u;
@group(0) @binding(2) var<storage, read> ad_qkv: array<{{ACT_T}}>;          // (S, 3C)
@group(0) @binding(3) var<storage, read_write> ad_cache: array<{{ACT_T}}>;  // (T_MAX, S, 3C)
@group(0) @binding(4) var<storage, read_write> ad_out: array<{{ACT_T}}>;    // (S, C)

var<workgroup> ad_scores: array<f32, {{T_MAX}}>;
var<workgroup> ad_red: array<f32, AD_THREADS>;

@compute @workgroup_size(64)
fn attention_decode(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let s = wid.x / shape.nh;
    let h = wid.x % shape.nh;
    let c = shape.c;
    let hs = c / shape.nh;
    let row3 = 3u * c;
    let pos = step.pos;
    // Store this position's k and v (this head's slice) into the cache.
    for (var d = lid; d < hs; d += AD_THREADS) {
        let src = s * row3 + h * hs + d;
        let dst = (pos * shape.s + s) * row3 + h * hs + d;
        ad_cache[dst + c] = ad_qkv[src + c];
        ad_cache[dst + 2u * c] = ad_qkv[src + 2u * c];
    }
    storageBarrier();
    workgroupBarrier();
    let scale = 1.0 / sqrt(f32(hs));
    let q_off = s * row3 + h * hs;
    // Scores and their maximum.
    var local_max = -3.0e38;
    for (var j = lid; j <= pos; j += AD_THREADS) {
        let k_off = (j * shape.s + s) * row3 + c + h * hs;
        var dot = 0.0;
        for (var d = 0u; d < hs; d++) {
            dot += f32(ad_qkv[q_off + d]) * f32(ad_cache[k_off + d]);
        }
        let sc = dot * scale;
        ad_scores[j] = sc;
        local_max = max(local_max, sc);
    }
    ad_red[lid] = local_max;
    workgroupBarrier();
    for (var w = AD_THREADS / 2u; w > 0u; w /= 2u) {
        if (lid < w) { ad_red[lid] = max(ad_red[lid], ad_red[lid + w]); }
        workgroupBarrier();
    }
    let m = ad_red[0];
    workgroupBarrier();
    var local_sum = 0.0;
    for (var j = lid; j <= pos; j += AD_THREADS) {
        let e = exp(ad_scores[j] - m);
        ad_scores[j] = e;
        local_sum += e;
    }
    ad_red[lid] = local_sum;
    workgroupBarrier();
    for (var w = AD_THREADS / 2u; w > 0u; w /= 2u) {
        if (lid < w) { ad_red[lid] = ad_red[lid] + ad_red[lid + w]; }
        workgroupBarrier();
    }
    let inv = 1.0 / ad_red[0];
    // Weighted sum of the values; each thread owns channels of the head.
    for (var d = lid; d < hs; d += AD_THREADS) {
        var acc = 0.0;
        for (var j = 0u; j <= pos; j++) {
            acc += ad_scores[j] * f32(ad_cache[(j * shape.s + s) * row3 + 2u * c + h * hs + d]);
        }
        ad_out[s * c + h * hs + d] = {{ACT_T}}(acc * inv);
    }
}

// ---- topk_sample: one token per sample from softmax(top-k(logits) / temperature) ---------------
// The k-th largest logit is found exactly by a bitwise search over order-preserving integer
// keys; the draw then walks the candidates in index order, so the result is deterministic for
// a given uniform number. top_k <= 1 or temperature <= 0 is greedy (lowest index on ties).
const TS_THREADS: u32 = 256u;
@group(0) @binding(2) var<storage, read> ts_logits: array<{{ACT_T}}>;     // (S, Vp)
@group(0) @binding(3) var<storage, read> ts_uniform: array<f32>;          // (S) in [0, 1)
@group(0) @binding(4) var<storage, read_write> ts_tokens: array<u32>;     // (S)

var<workgroup> ts_count: array<u32, TS_THREADS>;
var<workgroup> ts_sum: array<f32, TS_THREADS>;
var<workgroup> ts_maxkey: array<u32, TS_THREADS>;

fn order_key(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn key_value(k: u32) -> f32 {
    let b = select(~k, k & 0x7fffffffu, (k & 0x80000000u) != 0u);
    return bitcast<f32>(b);
}

@compute @workgroup_size(256)
fn topk_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let s = wid.x;
    let v = shape.v;
    let row = s * shape.vp;
    let greedy = step.top_k <= 1u || step.temperature <= 0.0;
    let k = select(min(step.top_k, v), 1u, greedy);
    // Largest key.
    var mk = 0u;
    for (var i = lid; i < v; i += TS_THREADS) {
        mk = max(mk, order_key(f32(ts_logits[row + i])));
    }
    ts_maxkey[lid] = mk;
    workgroupBarrier();
    for (var w = TS_THREADS / 2u; w > 0u; w /= 2u) {
        if (lid < w) { ts_maxkey[lid] = max(ts_maxkey[lid], ts_maxkey[lid + w]); }
        workgroupBarrier();
    }
    let max_key = ts_maxkey[0];
    workgroupBarrier();
    // Threshold: the largest key t with count(key >= t) >= k.
    var thresh = 0u;
    if (k >= v) {
        thresh = 0u;
    } else if (k == 1u) {
        thresh = max_key;
    } else {
        for (var bit = 31i; bit >= 0i; bit--) {
            let cand = thresh | (1u << u32(bit));
            var cnt = 0u;
            for (var i = lid; i < v; i += TS_THREADS) {
                cnt += select(0u, 1u, order_key(f32(ts_logits[row + i])) >= cand);
            }
            ts_count[lid] = cnt;
            workgroupBarrier();
            for (var w = TS_THREADS / 2u; w > 0u; w /= 2u) {
                if (lid < w) { ts_count[lid] = ts_count[lid] + ts_count[lid + w]; }
                workgroupBarrier();
            }
            if (ts_count[0] >= k) { thresh = cand; }
            workgroupBarrier();
        }
    }
    // Candidate weights, summed per contiguous chunk of the row.
    let max_logit = key_value(max_key);
    let temp = select(step.temperature, 1.0, greedy);
    let chunk = (v + TS_THREADS - 1u) / TS_THREADS;
    let lo = min(lid * chunk, v);
    let hi = min(lo + chunk, v);
    var part = 0.0;
    for (var i = lo; i < hi; i++) {
        let x = f32(ts_logits[row + i]);
        if (order_key(x) >= thresh) { part += exp((x - max_logit) / temp); }
    }
    ts_sum[lid] = part;
    workgroupBarrier();
    if (lid == 0u) {
        var total = 0.0;
        for (var t = 0u; t < TS_THREADS; t++) { total += ts_sum[t]; }
        let goal = select(ts_uniform[s] * total, 0.0, greedy);
        var acc = 0.0;
        var chosen = 0xffffffffu;
        var last = 0u;
        for (var t = 0u; t < TS_THREADS && chosen == 0xffffffffu; t++) {
            let c_lo = min(t * chunk, v);
            let c_hi = min(c_lo + chunk, v);
            if (ts_sum[t] > 0.0 && acc + ts_sum[t] > goal) {
                for (var i = c_lo; i < c_hi; i++) {
                    let x = f32(ts_logits[row + i]);
                    if (order_key(x) >= thresh) {
                        acc += exp((x - max_logit) / temp);
                        last = i;
                        if (acc > goal) { chosen = i; break; }
                    }
                }
                // Rounding can leave the walk just short: take the chunk's last candidate.
                if (chosen == 0xffffffffu) { chosen = last; }
            } else {
                acc += ts_sum[t];
            }
        }
        if (chosen == 0xffffffffu) {
            // Only when every weight underflowed: fall back to the argmax.
            for (var i = 0u; i < v; i++) {
                if (order_key(f32(ts_logits[row + i])) == max_key) { chosen = i; break; }
            }
        }
        ts_tokens[s] = chosen;
    }
}
