//! Causal self-attention in the GPT-2 layout, forward and backward.
//!
//! `qkv` is (B, T, 3*C): q = channels [0, C), k = [C, 2C), v = [2C, 3C); head h uses channels
//! h*hs .. (h+1)*hs of each, hs = C / NH. Scores are scaled by 1/sqrt(hs) and key j is visible to
//! query i when j <= i. The output (B, T, C) has the heads in the same channel layout.

/// What the forward pass produces.
pub struct AttentionForward {
    /// (B, T, C)
    pub out: Vec<f32>,
    /// (B, NH, T, T): softmax probabilities, exactly 0 above the diagonal.
    pub att: Vec<f32>,
    /// (B, NH, T): log-sum-exp of each row of scaled scores.
    pub lse: Vec<f32>,
}

/// Probabilities of one (b, h) in f64, row-major (T, T), and the rows' log-sum-exp.
fn probabilities(
    qkv: &[f32],
    b: usize,
    h: usize,
    t: usize,
    c: usize,
    hs: usize,
) -> (Vec<f64>, Vec<f64>) {
    let scale = 1.0 / (hs as f64).sqrt();
    let q = |i: usize, d: usize| qkv[(b * t + i) * 3 * c + h * hs + d] as f64;
    let k = |j: usize, d: usize| qkv[(b * t + j) * 3 * c + c + h * hs + d] as f64;
    let mut p = vec![0.0f64; t * t];
    let mut lse = vec![0.0f64; t];
    for i in 0..t {
        let scores: Vec<f64> = (0..=i)
            .map(|j| scale * (0..hs).map(|d| q(i, d) * k(j, d)).sum::<f64>())
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for (j, s) in scores.iter().enumerate() {
            p[i * t + j] = (s - m).exp() / sum;
        }
        lse[i] = m + sum.ln();
    }
    (p, lse)
}

/// Forward pass: out = softmax(scale * q k^T, causal) v per head.
pub fn attention_forward(qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) -> AttentionForward {
    assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be (B, T, 3C)");
    assert_eq!(c % nh, 0, "C must be divisible by NH");
    let hs = c / nh;
    let mut out = vec![0.0f32; b * t * c];
    let mut att = vec![0.0f32; b * nh * t * t];
    let mut lse = vec![0.0f32; b * nh * t];
    for bi in 0..b {
        for h in 0..nh {
            let (p, l) = probabilities(qkv, bi, h, t, c, hs);
            let bh = bi * nh + h;
            for i in 0..t {
                lse[bh * t + i] = l[i] as f32;
                for j in 0..t {
                    att[(bh * t + i) * t + j] = p[i * t + j] as f32;
                }
                for d in 0..hs {
                    let y: f64 = (0..=i)
                        .map(|j| {
                            p[i * t + j] * qkv[(bi * t + j) * 3 * c + 2 * c + h * hs + d] as f64
                        })
                        .sum();
                    out[(bi * t + i) * c + h * hs + d] = y as f32;
                }
            }
        }
    }
    AttentionForward { out, att, lse }
}

/// Backward pass: the gradient with respect to qkv (B, T, 3C) given dout (B, T, C).
/// With P the probabilities and dP = dout v^T: dS = P * (dP - rowsum(P * dP)),
/// dq = scale * dS k, dk = scale * dS^T q, dv = P^T dout.
pub fn attention_backward(
    dout: &[f32],
    qkv: &[f32],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Vec<f32> {
    assert_eq!(qkv.len(), b * t * 3 * c, "qkv must be (B, T, 3C)");
    assert_eq!(dout.len(), b * t * c, "dout must be (B, T, C)");
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut dqkv = vec![0.0f32; b * t * 3 * c];
    for bi in 0..b {
        for h in 0..nh {
            let (p, _) = probabilities(qkv, bi, h, t, c, hs);
            let at = |i: usize, part: usize, d: usize| (bi * t + i) * 3 * c + part * c + h * hs + d;
            let x = |i: usize, part: usize, d: usize| qkv[at(i, part, d)] as f64;
            let g = |i: usize, d: usize| dout[(bi * t + i) * c + h * hs + d] as f64;
            // dS (T, T), zero above the diagonal.
            let mut ds = vec![0.0f64; t * t];
            for i in 0..t {
                let dp: Vec<f64> = (0..=i)
                    .map(|j| (0..hs).map(|d| g(i, d) * x(j, 2, d)).sum())
                    .collect();
                let dot: f64 = (0..=i).map(|j| p[i * t + j] * dp[j]).sum();
                for j in 0..=i {
                    ds[i * t + j] = p[i * t + j] * (dp[j] - dot);
                }
            }
            for i in 0..t {
                for d in 0..hs {
                    let dq: f64 = (0..=i).map(|j| ds[i * t + j] * x(j, 1, d)).sum();
                    dqkv[at(i, 0, d)] = (scale * dq) as f32;
                    let dk: f64 = (i..t).map(|r| ds[r * t + i] * x(r, 0, d)).sum();
                    dqkv[at(i, 1, d)] = (scale * dk) as f32;
                    let dv: f64 = (i..t).map(|r| p[r * t + i] * g(r, d)).sum();
                    dqkv[at(i, 2, d)] = dv as f32;
                }
            }
        }
    }
    dqkv
}
