//! LayerNorm (eps 1e-5) over rows of `c` channels, forward and backward.

pub const EPS: f64 = 1e-5;

/// `out[i, :] = (inp[i, :] - mean_i) * rstd_i * weight + bias`, with `mean[i]` and
/// `rstd[i] = 1 / sqrt(var_i + eps)` (biased variance) written out. `inp`, `out`: `[n, c]`.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    weight: &[f32],
    bias: &[f32],
    c: usize,
) {
    for (i, x) in inp.chunks(c).enumerate() {
        let mu = x.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + EPS).sqrt();
        for j in 0..c {
            let xhat = (x[j] as f64 - mu) * rs;
            out[i * c + j] = (xhat * weight[j] as f64 + bias[j] as f64) as f32;
        }
        mean[i] = mu as f32;
        rstd[i] = rs as f32;
    }
}

/// Accumulates the LayerNorm gradients: `dinp += dL/dinp`, `dweight += dL/dweight`,
/// `dbias += dL/dbias`, given `dout = dL/dout` and the forward's `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dweight: &mut [f32],
    dbias: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let n = inp.len() / c;
    let mut dw = vec![0f64; c];
    let mut db = vec![0f64; c];
    for i in 0..n {
        let (mu, rs) = (mean[i] as f64, rstd[i] as f64);
        let row = i * c..(i + 1) * c;
        let xhat: Vec<f64> = inp[row.clone()]
            .iter()
            .map(|&x| (x as f64 - mu) * rs)
            .collect();
        let dy: Vec<f64> = dout[row].iter().map(|&d| d as f64).collect();
        let dnorm: Vec<f64> = (0..c).map(|j| dy[j] * weight[j] as f64).collect();
        let dnorm_mean = dnorm.iter().sum::<f64>() / c as f64;
        let dnorm_xhat_mean = (0..c).map(|j| dnorm[j] * xhat[j]).sum::<f64>() / c as f64;
        for j in 0..c {
            let d = rs * (dnorm[j] - dnorm_mean - xhat[j] * dnorm_xhat_mean);
            dinp[i * c + j] = (dinp[i * c + j] as f64 + d) as f32;
            dw[j] += dy[j] * xhat[j];
            db[j] += dy[j];
        }
    }
    for j in 0..c {
        dweight[j] = (dweight[j] as f64 + dw[j]) as f32;
        dbias[j] = (dbias[j] as f64 + db[j]) as f32;
    }
}
