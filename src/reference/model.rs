//! An independent implementation of GPT-2's whole training step (forward, loss, backward,
//! clipping, AdamW, schedule), written as plainly as possible, in float64 or, to measure what a
//! plain single-precision implementation of the same step gets, in float32 (see [`Float`]). The
//! GPU executor is checked against it; it shares nothing with the GPU path but the parameter
//! layout.
//!
//! Every operation rounds to the float type. Long sums are cut into blocks of [`BLOCK`] terms
//! added in order, whose partial sums are then added in order, as BLAS and split-K GPU kernels
//! cut them: in f32 a sum over the 50257-token vocabulary taken in one run rounds each of its
//! small terms against a running total that its few large ones made large, an error of the
//! order of the step's whole f32 rounding. The gradient norm, over every parameter, is summed
//! pairwise.

use super::float::{pairwise_sum, Float};
use crate::model::{BlockTensor as B, GptConfig, ParamId, ParamLayout};

/// Terms a long sum adds in order before its partial sum joins the total (see the module's text).
pub const BLOCK: usize = 256;

/// `sum_i f(i)` for `i` in `0..len`, in blocks of [`BLOCK`] terms.
fn blocked_sum<F: Float>(len: usize, f: impl Fn(usize) -> F) -> F {
    let mut total = F::ZERO;
    for start in (0..len).step_by(BLOCK) {
        total += (start..len.min(start + BLOCK)).map(&f).sum::<F>();
    }
    total
}

/// `out[n, o] = inp[n, k] @ w[o, k]^T + b[o]`
fn linear<F: Float>(inp: &[F], w: &[F], b: Option<&[F]>, n: usize, k: usize, o: usize) -> Vec<F> {
    let mut out = vec![F::ZERO; n * o];
    for i in 0..n {
        let x = &inp[i * k..(i + 1) * k];
        for j in 0..o {
            let wj = &w[j * k..(j + 1) * k];
            let mut dot = F::ZERO;
            for (xs, ws) in x.chunks(BLOCK).zip(wj.chunks(BLOCK)) {
                let mut part = F::ZERO;
                for (&a, &b) in xs.iter().zip(ws) {
                    part += a * b;
                }
                dot += part;
            }
            out[i * o + j] = b.map_or(F::ZERO, |b| b[j]) + dot;
        }
    }
    out
}

/// Gradients of `linear`: adds into dw and db, returns dinp. dinp's sums over `o` are blocked;
/// dw's and db's, over the `n` rows, are not (a few rows in the tests).
#[allow(clippy::too_many_arguments)]
fn linear_backward<F: Float>(
    dout: &[F],
    inp: &[F],
    w: &[F],
    dw: &mut [F],
    db: Option<&mut [F]>,
    n: usize,
    k: usize,
    o: usize,
) -> Vec<F> {
    let mut dinp = vec![F::ZERO; n * k];
    let mut part = vec![F::ZERO; k];
    for i in 0..n {
        let x = &inp[i * k..(i + 1) * k];
        for start in (0..o).step_by(BLOCK) {
            part.fill(F::ZERO);
            for j in start..o.min(start + BLOCK) {
                let g = dout[i * o + j];
                let (wj, dwj) = (&w[j * k..(j + 1) * k], &mut dw[j * k..(j + 1) * k]);
                for ((p, d), (&wv, &xv)) in part.iter_mut().zip(dwj).zip(wj.iter().zip(x)) {
                    *p += g * wv;
                    *d += g * xv;
                }
            }
            for (d, &p) in dinp[i * k..(i + 1) * k].iter_mut().zip(&part) {
                *d += p;
            }
        }
    }
    if let Some(db) = db {
        for i in 0..n {
            for j in 0..o {
                db[j] += dout[i * o + j];
            }
        }
    }
    dinp
}

struct LnCache<F> {
    xhat: Vec<F>,
    rstd: Vec<F>,
}

fn layernorm<F: Float>(x: &[F], w: &[F], b: &[F], n: usize, c: usize) -> (Vec<F>, LnCache<F>) {
    let mut out = vec![F::ZERO; n * c];
    let mut xhat = vec![F::ZERO; n * c];
    let mut rstd = vec![F::ZERO; n];
    let cf = F::of(c as f64);
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let mean = row.iter().copied().sum::<F>() / cf;
        let var = row.iter().map(|&v| (v - mean).powi(2)).sum::<F>() / cf;
        let r = F::ONE / (var + F::of(1e-5)).sqrt();
        rstd[i] = r;
        for j in 0..c {
            let h = (row[j] - mean) * r;
            xhat[i * c + j] = h;
            out[i * c + j] = h * w[j] + b[j];
        }
    }
    (out, LnCache { xhat, rstd })
}

fn layernorm_backward<F: Float>(
    dout: &[F],
    cache: &LnCache<F>,
    w: &[F],
    dw: &mut [F],
    db: &mut [F],
    n: usize,
    c: usize,
) -> Vec<F> {
    let mut dx = vec![F::ZERO; n * c];
    let cf = F::of(c as f64);
    for i in 0..n {
        let mut mean_dnorm = F::ZERO;
        let mut mean_dnorm_xhat = F::ZERO;
        for j in 0..c {
            let dn = dout[i * c + j] * w[j];
            mean_dnorm += dn;
            mean_dnorm_xhat += dn * cache.xhat[i * c + j];
            dw[j] += dout[i * c + j] * cache.xhat[i * c + j];
            db[j] += dout[i * c + j];
        }
        mean_dnorm /= cf;
        mean_dnorm_xhat /= cf;
        for j in 0..c {
            let dn = dout[i * c + j] * w[j];
            dx[i * c + j] =
                (dn - mean_dnorm - cache.xhat[i * c + j] * mean_dnorm_xhat) * cache.rstd[i];
        }
    }
    dx
}

const GELU_SCALE: f64 = 0.797_884_560_802_865_4;

fn gelu<F: Float>(x: F) -> F {
    let (half, one, a) = (F::of(0.5), F::ONE, F::of(0.044715));
    half * x * (one + (F::of(GELU_SCALE) * (x + a * x * x * x)).tanh())
}

fn gelu_grad<F: Float>(x: F) -> F {
    let (half, one, a, a3) = (F::of(0.5), F::ONE, F::of(0.044715), F::of(3.0 * 0.044715));
    let t = (F::of(GELU_SCALE) * (x + a * x * x * x)).tanh();
    half * (one + t) + half * x * (one - t * t) * F::of(GELU_SCALE) * (one + a3 * x * x)
}

/// Causal attention over qkv [B, T, 3C]; returns y [B, T, C] and probabilities [B, NH, T, T].
fn attention<F: Float>(qkv: &[F], b: usize, t: usize, c: usize, nh: usize) -> (Vec<F>, Vec<F>) {
    let hs = c / nh;
    let scale = F::ONE / F::of(hs as f64).sqrt();
    let mut y = vec![F::ZERO; b * t * c];
    let mut probs = vec![F::ZERO; b * nh * t * t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = &qkv[(bi * t + i) * 3 * c + h * hs..][..hs];
                let mut s = vec![F::NEG_INFINITY; t];
                for (j, sj) in s.iter_mut().enumerate().take(i + 1) {
                    let k = &qkv[(bi * t + j) * 3 * c + c + h * hs..][..hs];
                    *sj = q.iter().zip(k).map(|(&a, &b)| a * b).sum::<F>() * scale;
                }
                let m = s[..=i].iter().copied().fold(F::NEG_INFINITY, F::max);
                let z: F = s[..=i].iter().map(|&v| (v - m).exp()).sum();
                let p = &mut probs[((bi * nh + h) * t + i) * t..][..t];
                for j in 0..=i {
                    p[j] = (s[j] - m).exp() / z;
                    let v = &qkv[(bi * t + j) * 3 * c + 2 * c + h * hs..][..hs];
                    for d in 0..hs {
                        y[(bi * t + i) * c + h * hs + d] += p[j] * v[d];
                    }
                }
            }
        }
    }
    (y, probs)
}

fn attention_backward<F: Float>(
    dy: &[F],
    qkv: &[F],
    probs: &[F],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Vec<F> {
    let hs = c / nh;
    let scale = F::ONE / F::of(hs as f64).sqrt();
    let mut dqkv = vec![F::ZERO; b * t * 3 * c];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let p = &probs[((bi * nh + h) * t + i) * t..][..t];
                let dyi = &dy[(bi * t + i) * c + h * hs..][..hs];
                // dp_j = dy_i . v_j ; dv_j += p_j dy_i
                let mut dp = vec![F::ZERO; t];
                for j in 0..=i {
                    let vo = (bi * t + j) * 3 * c + 2 * c + h * hs;
                    for d in 0..hs {
                        dp[j] += dyi[d] * qkv[vo + d];
                        dqkv[vo + d] += p[j] * dyi[d];
                    }
                }
                let dot: F = (0..=i).map(|j| p[j] * dp[j]).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - dot) * scale;
                    let qo = (bi * t + i) * 3 * c + h * hs;
                    let ko = (bi * t + j) * 3 * c + c + h * hs;
                    for d in 0..hs {
                        dqkv[qo + d] += ds * qkv[ko + d];
                        dqkv[ko + d] += ds * qkv[qo + d];
                    }
                }
            }
        }
    }
    dqkv
}

/// GPT-2 over the flat parameter layout of [`ParamLayout`], in whichever [`Float`] the parameters
/// come in.
pub struct ReferenceModel {
    pub config: GptConfig,
    pub layout: ParamLayout,
}

impl ReferenceModel {
    pub fn new(config: GptConfig) -> ReferenceModel {
        ReferenceModel {
            layout: ParamLayout::new(&config),
            config,
        }
    }

    fn view<'a, F>(&self, flat: &'a [F], id: ParamId) -> &'a [F] {
        self.layout.slice(flat, id)
    }

    fn range(&self, id: ParamId) -> std::ops::Range<usize> {
        self.layout.entry(id).range()
    }

    /// Logits [B*T, V] (real vocabulary only) for tokens `x` (B*T).
    pub fn logits<F: Float>(&self, params: &[F], x: &[u32], b: usize, t: usize) -> Vec<F> {
        self.forward(params, x, b, t).0
    }

    /// Returns (logits [B*T, V], saved activations).
    fn forward<F: Float>(&self, p: &[F], x: &[u32], b: usize, t: usize) -> (Vec<F>, Saved<F>) {
        let cfg = &self.config;
        let (c, n, nh) = (cfg.n_embd, b * t, cfg.n_head);
        let wte = self.view(p, ParamId::Wte);
        let wpe = self.view(p, ParamId::Wpe);
        let mut res = vec![F::ZERO; n * c];
        for i in 0..n {
            let tok = x[i] as usize;
            for j in 0..c {
                res[i * c + j] = wte[tok * c + j] + wpe[(i % t) * c + j];
            }
        }
        let mut layers = Vec::new();
        for l in 0..cfg.n_layer {
            let w = |t: B| self.view(p, ParamId::Block(l, t));
            let (ln1, ln1c) = layernorm(&res, w(B::Ln1Weight), w(B::Ln1Bias), n, c);
            let qkv = linear(&ln1, w(B::CAttnWeight), Some(w(B::CAttnBias)), n, c, 3 * c);
            let (y, probs) = attention(&qkv, b, t, c, nh);
            let o = linear(&y, w(B::AttnProjWeight), Some(w(B::AttnProjBias)), n, c, c);
            let res2: Vec<F> = res.iter().zip(&o).map(|(&a, &b)| a + b).collect();
            let (ln2, ln2c) = layernorm(&res2, w(B::Ln2Weight), w(B::Ln2Bias), n, c);
            let f = linear(&ln2, w(B::CFcWeight), Some(w(B::CFcBias)), n, c, 4 * c);
            let g: Vec<F> = f.iter().map(|&v| gelu(v)).collect();
            let m = linear(
                &g,
                w(B::MlpProjWeight),
                Some(w(B::MlpProjBias)),
                n,
                4 * c,
                c,
            );
            let res3: Vec<F> = res2.iter().zip(&m).map(|(&a, &b)| a + b).collect();
            layers.push(LayerSaved {
                ln1,
                ln1c,
                qkv,
                y,
                probs,
                ln2,
                ln2c,
                f,
                g,
            });
            res = res3;
        }
        let (lnf, lnfc) = layernorm(
            &res,
            self.view(p, ParamId::LnFWeight),
            self.view(p, ParamId::LnFBias),
            n,
            c,
        );
        let v = cfg.vocab_size;
        // lm_head tied to wte; only the real vocabulary rows.
        let logits = linear(&lnf, &wte[..v * c], None, n, c, v);
        (logits, Saved { layers, lnf, lnfc })
    }

    /// Mean cross-entropy over the B*T positions and the gradient of every parameter.
    pub fn loss_and_grads<F: Float>(
        &self,
        p: &[F],
        x: &[u32],
        y: &[u32],
        b: usize,
        t: usize,
    ) -> (F, Vec<F>) {
        let cfg = &self.config;
        let (c, n, nh, v) = (cfg.n_embd, b * t, cfg.n_head, cfg.vocab_size);
        let (logits, saved) = self.forward(p, x, b, t);
        let nf = F::of(n as f64);
        let mut grads = vec![F::ZERO; p.len()];
        let mut loss = F::ZERO;
        let mut dlogits = vec![F::ZERO; n * v];
        for i in 0..n {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().copied().fold(F::NEG_INFINITY, F::max);
            let z = blocked_sum(v, |j| (row[j] - m).exp());
            let lse = m + z.ln();
            loss += lse - row[y[i] as usize];
            for j in 0..v {
                let pj = (row[j] - lse).exp();
                let target = if j == y[i] as usize { F::ONE } else { F::ZERO };
                dlogits[i * v + j] = (pj - target) / nf;
            }
        }
        loss /= nf;
        let wte_r = self.range(ParamId::Wte);
        let wte = &p[wte_r.clone()];
        let dlnf = {
            let dwte = &mut grads[wte_r.start..wte_r.start + v * c];
            linear_backward(&dlogits, &saved.lnf, &wte[..v * c], dwte, None, n, c, v)
        };
        let mut dres = {
            let (dw, db) = two_mut(
                &mut grads,
                self.range(ParamId::LnFWeight),
                self.range(ParamId::LnFBias),
            );
            layernorm_backward(
                &dlnf,
                &saved.lnfc,
                self.view(p, ParamId::LnFWeight),
                dw,
                db,
                n,
                c,
            )
        };
        for l in (0..cfg.n_layer).rev() {
            let s = &saved.layers[l];
            let name = |t: B| ParamId::Block(l, t);
            let w = |t: B| self.view(p, name(t));
            // MLP
            let dg = {
                let (dw, db) = two_mut(
                    &mut grads,
                    self.range(name(B::MlpProjWeight)),
                    self.range(name(B::MlpProjBias)),
                );
                linear_backward(&dres, &s.g, w(B::MlpProjWeight), dw, Some(db), n, 4 * c, c)
            };
            let df: Vec<F> = dg
                .iter()
                .zip(&s.f)
                .map(|(&g, &f)| g * gelu_grad(f))
                .collect();
            let dln2 = {
                let (dw, db) = two_mut(
                    &mut grads,
                    self.range(name(B::CFcWeight)),
                    self.range(name(B::CFcBias)),
                );
                linear_backward(&df, &s.ln2, w(B::CFcWeight), dw, Some(db), n, c, 4 * c)
            };
            let d = {
                let (dw, db) = two_mut(
                    &mut grads,
                    self.range(name(B::Ln2Weight)),
                    self.range(name(B::Ln2Bias)),
                );
                layernorm_backward(&dln2, &s.ln2c, w(B::Ln2Weight), dw, db, n, c)
            };
            for (a, &b) in dres.iter_mut().zip(&d) {
                *a += b;
            }
            // attention
            let dy = {
                let (dw, db) = two_mut(
                    &mut grads,
                    self.range(name(B::AttnProjWeight)),
                    self.range(name(B::AttnProjBias)),
                );
                linear_backward(&dres, &s.y, w(B::AttnProjWeight), dw, Some(db), n, c, c)
            };
            let dqkv = attention_backward(&dy, &s.qkv, &s.probs, b, t, c, nh);
            let dln1 = {
                let (dw, db) = two_mut(
                    &mut grads,
                    self.range(name(B::CAttnWeight)),
                    self.range(name(B::CAttnBias)),
                );
                linear_backward(&dqkv, &s.ln1, w(B::CAttnWeight), dw, Some(db), n, c, 3 * c)
            };
            let d = {
                let (dw, db) = two_mut(
                    &mut grads,
                    self.range(name(B::Ln1Weight)),
                    self.range(name(B::Ln1Bias)),
                );
                layernorm_backward(&dln1, &s.ln1c, w(B::Ln1Weight), dw, db, n, c)
            };
            for (a, &b) in dres.iter_mut().zip(&d) {
                *a += b;
            }
        }
        let wpe_r = self.range(ParamId::Wpe);
        for i in 0..n {
            let tok = x[i] as usize;
            for j in 0..c {
                grads[wte_r.start + tok * c + j] += dres[i * c + j];
                grads[wpe_r.start + (i % t) * c + j] += dres[i * c + j];
            }
        }
        (loss, grads)
    }
}

struct LayerSaved<F> {
    ln1: Vec<F>,
    ln1c: LnCache<F>,
    qkv: Vec<F>,
    y: Vec<F>,
    probs: Vec<F>,
    ln2: Vec<F>,
    ln2c: LnCache<F>,
    f: Vec<F>,
    g: Vec<F>,
}

struct Saved<F> {
    layers: Vec<LayerSaved<F>>,
    lnf: Vec<F>,
    lnfc: LnCache<F>,
}

/// Two disjoint mutable ranges of one slice (first must precede second).
fn two_mut<F>(
    v: &mut [F],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [F], &mut [F]) {
    if a.start < b.start {
        let (lo, hi) = v.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = v.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

/// The recipe's learning rate: linear warmup over `warmup_steps` (step 0 gets one step's
/// share), cosine decay to `min_lr` at `total_steps`, then `min_lr`.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceSchedule {
    pub max_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl ReferenceSchedule {
    pub fn lr(&self, step: usize) -> f64 {
        let (it, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if it < warmup {
            self.max_lr * (it + 1.0) / warmup
        } else if it > total || total <= warmup {
            self.min_lr
        } else {
            let decay_ratio = (it - warmup) / (total - warmup);
            let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos());
            self.min_lr + coeff * (self.max_lr - self.min_lr)
        }
    }
}

/// The optimiser settings of the recipe.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceOptim {
    pub schedule: ReferenceSchedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
}

impl ReferenceOptim {
    /// The factor clipping scales a gradient of norm `norm` by (1 without clipping).
    pub fn clip_factor<F: Float>(&self, norm: F) -> F {
        if self.grad_clip > 0.0 {
            (F::of(self.grad_clip) / (norm + F::of(1e-6))).min(F::ONE)
        } else {
            F::ONE
        }
    }
}

/// AdamW's rule for one weight at one step, weight decay aside, computed in `F`: the reference
/// trainer's, and the tests' measure of how far a gradient's error moves a weight.
#[derive(Clone, Copy, Debug)]
pub struct AdamUpdate<F> {
    lr: F,
    beta1: F,
    beta2: F,
    eps: F,
    /// The bias corrections 1 - beta^t.
    bc1: F,
    bc2: F,
}

impl<F: Float> AdamUpdate<F> {
    /// The rule of step `t` (1-based) at learning rate `lr`.
    pub fn new(optim: &ReferenceOptim, lr: F, t: i32) -> AdamUpdate<F> {
        let (beta1, beta2) = (F::of(optim.beta1), F::of(optim.beta2));
        AdamUpdate {
            lr,
            beta1,
            beta2,
            eps: F::of(optim.eps),
            bc1: F::ONE - beta1.powi(t),
            bc2: F::ONE - beta2.powi(t),
        }
    }

    /// The moments (m, v) after gradient `g` (clipped already).
    pub fn moments(&self, m: F, v: F, g: F) -> (F, F) {
        (
            self.beta1 * m + (F::ONE - self.beta1) * g,
            self.beta2 * v + (F::ONE - self.beta2) * g * g,
        )
    }

    /// What the weight loses for moments (m, v) as [`AdamUpdate::moments`] gave them.
    pub fn step(&self, m: F, v: F) -> F {
        let mhat = m / self.bc1;
        let vhat = v / self.bc2;
        self.lr * mhat / (vhat.sqrt() + self.eps)
    }
}

/// The result of one reference training step.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceStep {
    pub loss: f64,
    pub norm: f64,
    pub lr: f64,
}

/// AdamW state and the training loop, in float64 or float32 (`F`). The optimiser settings and
/// the schedule's learning rate are rounded to `F` and the whole step is computed in it.
pub struct ReferenceTrainer<F: Float = f64> {
    pub model: ReferenceModel,
    pub params: Vec<F>,
    /// The last step's gradient (mean over its micro-batches, before clipping).
    pub grads: Vec<F>,
    m: Vec<F>,
    v: Vec<F>,
    pub optim: ReferenceOptim,
    step: usize,
}

fn from_f32<F: Float>(x: &[f32]) -> Vec<F> {
    x.iter().map(|&v| F::of_f32(v)).collect()
}

impl ReferenceTrainer {
    /// The float64 reference, from f32 weights (flat, in the layout) with empty moments.
    pub fn new(model: ReferenceModel, params: &[f32], optim: ReferenceOptim) -> ReferenceTrainer {
        ReferenceTrainer::with_float(model, params, optim)
    }
}

impl<F: Float> ReferenceTrainer<F> {
    /// The reference computing in `F`, e.g. `ReferenceTrainer::<f32>::with_float(..)`.
    pub fn with_float(
        model: ReferenceModel,
        params: &[f32],
        optim: ReferenceOptim,
    ) -> ReferenceTrainer<F> {
        let n = params.len();
        ReferenceTrainer {
            model,
            params: from_f32(params),
            grads: Vec::new(),
            m: vec![F::ZERO; n],
            v: vec![F::ZERO; n],
            optim,
            step: 0,
        }
    }

    /// Continues from another trainer's state: f32 weights and AdamW moments (flat, in the
    /// layout). The step count stays.
    pub fn set_state(&mut self, params: &[f32], m: &[f32], v: &[f32]) {
        self.params = from_f32(params);
        self.m = from_f32(m);
        self.v = from_f32(v);
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One optimiser step over `micro` batches (x, y) of B*T tokens each (gradient accumulation).
    pub fn step(&mut self, micro: &[(Vec<u32>, Vec<u32>)], b: usize, t: usize) -> ReferenceStep {
        let o = &self.optim;
        let count = F::of(micro.len() as f64);
        let mut loss = F::ZERO;
        let mut grads = vec![F::ZERO; self.params.len()];
        for (x, y) in micro {
            let (l, g) = self.model.loss_and_grads(&self.params, x, y, b, t);
            loss += l / count;
            for (a, b) in grads.iter_mut().zip(g) {
                *a += b / count;
            }
        }
        let norm = pairwise_sum(&grads, &|g| g * g).sqrt();
        let clip = o.clip_factor(norm);
        let lr = F::of(o.schedule.lr(self.step));
        self.step += 1;
        let adam = AdamUpdate::new(o, lr, self.step as i32);
        let decay = F::ONE - lr * F::of(o.weight_decay);
        let n_decay = self.model.layout.n_decay;
        for (i, &g) in grads.iter().enumerate() {
            let g = g * clip;
            if i < n_decay {
                self.params[i] *= decay;
            }
            (self.m[i], self.v[i]) = adam.moments(self.m[i], self.v[i], g);
            self.params[i] -= adam.step(self.m[i], self.v[i]);
        }
        self.grads = grads;
        ReferenceStep {
            loss: loss.to_f64(),
            norm: norm.to_f64(),
            lr: lr.to_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::init_params;
    use crate::rng::Rng;

    #[test]
    fn reference_gradients_match_finite_differences() {
        let cfg = GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            block_size: 8,
            vocab_size: 11,
            padded_vocab_size: 16,
        };
        let model = ReferenceModel::new(cfg);
        let mut rng = Rng::new(3);
        let p32 = init_params(&cfg, &model.layout, 9);
        // perturb so LN weights/biases and biases are not trivial
        let mut p: Vec<f64> = p32.iter().map(|&x| x as f64 + rng.normal() * 0.1).collect();
        let (b, t) = (2, 5);
        let x: Vec<u32> = (0..b * t).map(|_| rng.below(11) as u32).collect();
        let y: Vec<u32> = (0..b * t).map(|_| rng.below(11) as u32).collect();
        let (_, g) = model.loss_and_grads(&p, &x, &y, b, t);
        let h = 1e-6;
        for (id, e) in model.layout.entries.iter() {
            for k in [0, e.len() / 2, e.len() - 1] {
                let i = e.offset + k;
                if id == ParamId::Wte && k >= 11 * 8 {
                    continue; // padded rows: no gradient, not part of the function
                }
                let orig = p[i];
                p[i] = orig + h;
                let lp = model.loss_and_grads(&p, &x, &y, b, t).0;
                p[i] = orig - h;
                let lm = model.loss_and_grads(&p, &x, &y, b, t).0;
                p[i] = orig;
                let fd = (lp - lm) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() < 1e-6 + 1e-4 * fd.abs(),
                    "{}[{k}]: fd {fd} vs analytic {}",
                    id.name(),
                    g[i]
                );
            }
        }
    }
}
