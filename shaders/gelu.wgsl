// GELU, tanh approximation, and its derivative, in f32. Included (`#include gelu`) by every
// kernel that computes it, so the matmul's fused epilogue and the elementwise kernels agree
// to the bit.

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
