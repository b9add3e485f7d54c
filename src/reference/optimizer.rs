//! Global gradient norm with clipping, and AdamW with PyTorch semantics. The optimiser state is
//! kept in f64 so that several steps can be followed without the reference drifting.

/// What the gradient-norm step decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormStatus {
    /// `sqrt(sum g^2) * inv_loss_scale`.
    pub norm: f64,
    /// `min(1, max_norm / (norm + 1e-6))`; 1 when `max_norm <= 0` or the gradients are not finite.
    pub clip_coef: f64,
    /// No gradient is inf or NaN.
    pub finite: bool,
}

pub fn grad_norm(grads: &[f32], inv_loss_scale: f32, max_norm: f32) -> NormStatus {
    let finite = grads.iter().all(|g| g.is_finite());
    let norm = grads
        .iter()
        .map(|&g| (g as f64).powi(2))
        .sum::<f64>()
        .sqrt()
        * inv_loss_scale as f64;
    let clip_coef = if finite && max_norm > 0.0 {
        (max_norm as f64 / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    };
    NormStatus {
        norm,
        clip_coef,
        finite,
    }
}

/// AdamW's hyper-parameters for one step.
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// 1-based step number (for the bias corrections).
    pub step: u32,
    pub inv_loss_scale: f64,
}

/// One AdamW step over the flat parameters; elements `[0, n_decay)` get weight decay. Does
/// nothing when `status.finite` is false.
pub fn adamw_step(
    params: &mut [f64],
    m: &mut [f64],
    v: &mut [f64],
    grads: &[f32],
    status: &NormStatus,
    hp: &AdamW,
    n_decay: usize,
) {
    if !status.finite {
        return;
    }
    let bc1 = 1.0 - hp.beta1.powi(hp.step as i32);
    let bc2 = 1.0 - hp.beta2.powi(hp.step as i32);
    for i in 0..params.len() {
        let g = grads[i] as f64 * hp.inv_loss_scale * status.clip_coef;
        if i < n_decay {
            params[i] *= 1.0 - hp.lr * hp.weight_decay;
        }
        m[i] = hp.beta1 * m[i] + (1.0 - hp.beta1) * g;
        v[i] = hp.beta2 * v[i] + (1.0 - hp.beta2) * g * g;
        let m_hat = m[i] / bc1;
        let v_hat = v[i] / bc2;
        params[i] -= hp.lr * m_hat / (v_hat.sqrt() + hp.eps);
    }
}
