//! Linear layers in PyTorch layout: `weight` is (N, K) = (out, in). Every function overwrites its
//! output; sums accumulate in f64.

/// `out[m, n] = sum_k inp[m, k] * weight[n, k] + bias[n]`.
/// out: (M, N), inp: (M, K), weight: (N, K), bias: (N).
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(out.len(), m * n);
    assert_eq!(inp.len(), m * k);
    assert_eq!(weight.len(), n * k);
    for r in 0..m {
        let x = &inp[r * k..(r + 1) * k];
        for c in 0..n {
            let w = &weight[c * k..(c + 1) * k];
            let mut s = bias.map_or(0.0, |b| b[c] as f64);
            for (&xi, &wi) in x.iter().zip(w) {
                s += xi as f64 * wi as f64;
            }
            out[r * n + c] = s as f32;
        }
    }
}

/// `dinp[m, k] = sum_n dout[m, n] * weight[n, k]`.
/// dinp: (M, K), dout: (M, N), weight: (N, K).
pub fn matmul_backward_input(
    dinp: &mut [f32],
    dout: &[f32],
    weight: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dinp.len(), m * k);
    assert_eq!(dout.len(), m * n);
    assert_eq!(weight.len(), n * k);
    for r in 0..m {
        for i in 0..k {
            let mut s = 0f64;
            for c in 0..n {
                s += dout[r * n + c] as f64 * weight[c * k + i] as f64;
            }
            dinp[r * k + i] = s as f32;
        }
    }
}

/// `dweight[n, k] = sum_m dout[m, n] * inp[m, k]`.
/// dweight: (N, K), dout: (M, N), inp: (M, K).
pub fn matmul_backward_weight(
    dweight: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    m: usize,
    k: usize,
    n: usize,
) {
    assert_eq!(dweight.len(), n * k);
    assert_eq!(dout.len(), m * n);
    assert_eq!(inp.len(), m * k);
    for c in 0..n {
        for i in 0..k {
            let mut s = 0f64;
            for r in 0..m {
                s += dout[r * n + c] as f64 * inp[r * k + i] as f64;
            }
            dweight[c * k + i] = s as f32;
        }
    }
}

/// `dbias[n] = sum_m dout[m, n]`.
/// dbias: (N), dout: (M, N).
pub fn matmul_backward_bias(dbias: &mut [f32], dout: &[f32], m: usize, n: usize) {
    assert_eq!(dbias.len(), n);
    assert_eq!(dout.len(), m * n);
    for (c, d) in dbias.iter_mut().enumerate() {
        let s: f64 = (0..m).map(|r| dout[r * n + c] as f64).sum();
        *d = s as f32;
    }
}
