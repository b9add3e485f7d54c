// Elementwise ops over flat tensors of n elements: GELU (tanh approximation) forward and
// backward, residual add, and dtype casts. Every op computes in f32 whatever the storage type.
// Grid: ceil(n / 256) workgroups, laid out 2-D (see Gpu::grid).

struct Params {
    n: u32,
    value: f32, // fill: the value written
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

#include gelu

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

// ---- fill: out = value --------------------------------------------------------------------------
@group(0) @binding(1) var<storage, read_write> f_out: array<{{OUT_T}}>; // (n)

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = linear_index(wid, nwg, lid);
    if (i >= p.n) { return; }
    f_out[i] = {{OUT_T}}(p.value);
}
