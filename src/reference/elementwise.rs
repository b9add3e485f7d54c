//! GELU (tanh approximation), residual add.

const GELU_SCALE: f64 = 0.797_884_560_802_865_4; // sqrt(2 / pi)

pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    (0.5 * x * (1.0 + u.tanh())) as f32
}

pub fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let u = GELU_SCALE * (x + 0.044715 * x * x * x);
    let t = u.tanh();
    let sech2 = 1.0 - t * t;
    (0.5 * (1.0 + t) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)) as f32
}

/// `out[i] = gelu(inp[i])`
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    for (o, &x) in out.iter_mut().zip(inp) {
        *o = gelu(x);
    }
}

/// `dinp[i] = gelu'(inp[i]) * dout[i]`
pub fn gelu_backward(dinp: &mut [f32], inp: &[f32], dout: &[f32]) {
    for ((d, &x), &g) in dinp.iter_mut().zip(inp).zip(dout) {
        *d = gelu_grad(x) * g;
    }
}

/// `out[i] = a[i] + b[i]`
pub fn residual_forward(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
}
