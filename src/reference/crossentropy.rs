//! Softmax cross-entropy over rows of `vp` logits of which the first `v` are real tokens.

/// `log(sum_j exp(row[j]))` over the real columns, in f64.
fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    max + row
        .iter()
        .map(|&x| (x as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// `losses[i] = logsumexp(logits[i, :v]) - logits[i, targets[i]]`. `logits`: `[n, vp]`.
pub fn crossentropy_forward(
    losses: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    vp: usize,
    v: usize,
) {
    for (i, row) in logits.chunks(vp).enumerate() {
        let t = targets[i] as usize;
        losses[i] = (logsumexp(&row[..v]) - row[t] as f64) as f32;
    }
}

/// `dlogits[i, j] = (softmax(logits[i, :v])_j - [j == targets[i]]) * dloss` for `j < v`, 0 for
/// the padded columns. Overwrites `dlogits` (`[n, vp]`).
pub fn crossentropy_backward(
    dlogits: &mut [f32],
    logits: &[f32],
    targets: &[u32],
    dloss: f32,
    vp: usize,
    v: usize,
) {
    for (i, row) in logits.chunks(vp).enumerate() {
        let lse = logsumexp(&row[..v]);
        for j in 0..vp {
            dlogits[i * vp + j] = if j < v {
                let p = (row[j] as f64 - lse).exp();
                let y = if j == targets[i] as usize { 1.0 } else { 0.0 };
                ((p - y) * dloss as f64) as f32
            } else {
                0.0
            };
        }
    }
}

/// `scale * sum(losses)`.
pub fn loss_mean(losses: &[f32], scale: f32) -> f32 {
    (scale as f64 * losses.iter().map(|&l| l as f64).sum::<f64>()) as f32
}
