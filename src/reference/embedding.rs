//! Token + position embedding (`wte`: `[vp, c]`, `wpe`: `[block, c]`, tokens `[b * t]`).

/// `out[b, t, :] = wte[tokens[b, t], :] + wpe[t, :]`.
pub fn embedding_forward(
    out: &mut [f32],
    tokens: &[u32],
    wte: &[f32],
    wpe: &[f32],
    t: usize,
    c: usize,
) {
    for (row, &tok) in tokens.iter().enumerate() {
        let (tok, pos) = (tok as usize, row % t);
        for j in 0..c {
            out[row * c + j] = (wte[tok * c + j] as f64 + wpe[pos * c + j] as f64) as f32;
        }
    }
}

/// `dwte[tokens[r], :] += dout[r, :]` and `dwpe[r % t, :] += dout[r, :]` for every row r.
pub fn embedding_backward(
    dwte: &mut [f32],
    dwpe: &mut [f32],
    dout: &[f32],
    tokens: &[u32],
    t: usize,
    c: usize,
) {
    let mut gw = vec![0f64; dwte.len()];
    let mut gp = vec![0f64; dwpe.len()];
    for (row, &tok) in tokens.iter().enumerate() {
        let (tok, pos) = (tok as usize, row % t);
        for j in 0..c {
            gw[tok * c + j] += dout[row * c + j] as f64;
            gp[pos * c + j] += dout[row * c + j] as f64;
        }
    }
    for (d, g) in dwte.iter_mut().zip(gw) {
        *d = (*d as f64 + g) as f32;
    }
    for (d, g) in dwpe.iter_mut().zip(gp) {
        *d = (*d as f64 + g) as f32;
    }
}
