// Elementwise ops over flat tensors of n elements: GELU (tanh approximation) forward and
// backward, residual add, and dtype casts. Every op computes in f32 whatever the storage type.
// Grid: ceil(n / 256) workgroups, laid out 2-D (see Gpu::grid).

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

const GELU_SCALE: f32 = 0.7978845608028654; // sqrt(2 / pi)

// 0.5 * (1 + tanh(u)) written as the logistic function of 2u: finite for every u (exp overflow
// gives 1 / inf = 0) and free of the cancellation 1 + tanh(u) suffers when u is very negative.
fn half_one_plus_tanh(u: f32) -> f32 {
    return 1.0 / (1.0 + exp(-2.0 * u));
}

fn gelu(x: f32) -> f32 {
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    return x * half_one_plus_tanh(u);
}

fn gelu_grad(x: f32) -> f32 {
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    let s = half_one_plus_tanh(u);
    let sech2 = 4.0 * s * (1.0 - s); // 1 - tanh(u)^2
    return s + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x);
}

fn linear_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * 256u + lid;
}

// ---- gelu_forward: out = gelu(inp) ------------------------------------------------------------
@group(0) @binding(1) var<storage, read> gf_inp: array<{{IN_T}}>;       // (n)
@group(0) @binding(2) var<storage, read_write> gf_out: array<{{OUT_T}}>; // (n)

@compute @workgroup_size(256)
fn gelu_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    gf_out[i] = {{OUT_T}}(gelu(f32(gf_inp[i])));
}

// ---- gelu_backward: dinp = gelu'(inp) * dout --------------------------------------------------
@group(0) @binding(1) var<storage, read> gb_inp: array<{{IN_T}}>;        // (n)
@group(0) @binding(2) var<storage, read> gb_dout: array<{{GRAD_T}}>;     // (n)
@group(0) @binding(3) var<storage, read_write> gb_dinp: array<{{OUT_T}}>; // (n)

@compute @workgroup_size(256)
fn gelu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    gb_dinp[i] = {{OUT_T}}(gelu_grad(f32(gb_inp[i])) * f32(gb_dout[i]));
}

// ---- residual_forward: out = a + b ------------------------------------------------------------
@group(0) @binding(1) var<storage, read> ra: array<{{IN_T}}>;           // (n)
@group(0) @binding(2) var<storage, read> rb: array<{{GRAD_T}}>;         // (n)
@group(0) @binding(3) var<storage, read_write> rout: array<{{OUT_T}}>;  // (n)

@compute @workgroup_size(256)
fn residual_forward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    rout[i] = {{OUT_T}}(f32(ra[i]) + f32(rb[i]));
}

// ---- cast_dtype: out = OUT_T(inp) -------------------------------------------------------------------
@group(0) @binding(1) var<storage, read> c_inp: array<{{IN_T}}>;        // (n)
@group(0) @binding(2) var<storage, read_write> c_out: array<{{OUT_T}}>; // (n)

@compute @workgroup_size(256)
fn cast_dtype(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    c_out[i] = {{OUT_T}}(f32(c_inp[i]));
}

// ---- fill: out = value (value's f32 bits in p._pad0) ----------------------------------------
@group(0) @binding(1) var<storage, read_write> f_out: array<{{OUT_T}}>; // (n)

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    f_out[i] = {{OUT_T}}(bitcast<f32>(p._pad0));
}
