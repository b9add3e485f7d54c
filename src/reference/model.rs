//! An independent float64 implementation of GPT-2's whole training step (forward, loss,
//! backward, clipping, AdamW, schedule), written as plainly as possible. The GPU executor is
//! checked against it; it shares nothing with the GPU path but the parameter layout.

use crate::model::{BlockTensor as B, GptConfig, ParamId, ParamLayout};
use crate::train::schedule::LrSchedule;

/// `out[n, o] = inp[n, k] @ w[o, k]^T + b[o]`
fn linear(inp: &[f64], w: &[f64], b: Option<&[f64]>, n: usize, k: usize, o: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * o];
    for i in 0..n {
        for j in 0..o {
            let mut s = b.map_or(0.0, |b| b[j]);
            for x in 0..k {
                s += inp[i * k + x] * w[j * k + x];
            }
            out[i * o + j] = s;
        }
    }
    out
}

/// Gradients of `linear`: adds into dw and db, returns dinp.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    dout: &[f64],
    inp: &[f64],
    w: &[f64],
    dw: &mut [f64],
    db: Option<&mut [f64]>,
    n: usize,
    k: usize,
    o: usize,
) -> Vec<f64> {
    let mut dinp = vec![0.0; n * k];
    for i in 0..n {
        for j in 0..o {
            let g = dout[i * o + j];
            for x in 0..k {
                dinp[i * k + x] += g * w[j * k + x];
                dw[j * k + x] += g * inp[i * k + x];
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

struct LnCache {
    xhat: Vec<f64>,
    rstd: Vec<f64>,
}

fn layernorm(x: &[f64], w: &[f64], b: &[f64], n: usize, c: usize) -> (Vec<f64>, LnCache) {
    let mut out = vec![0.0; n * c];
    let mut xhat = vec![0.0; n * c];
    let mut rstd = vec![0.0; n];
    for i in 0..n {
        let row = &x[i * c..(i + 1) * c];
        let mean = row.iter().sum::<f64>() / c as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
        let r = 1.0 / (var + 1e-5).sqrt();
        rstd[i] = r;
        for j in 0..c {
            let h = (row[j] - mean) * r;
            xhat[i * c + j] = h;
            out[i * c + j] = h * w[j] + b[j];
        }
    }
    (out, LnCache { xhat, rstd })
}

fn layernorm_backward(
    dout: &[f64],
    cache: &LnCache,
    w: &[f64],
    dw: &mut [f64],
    db: &mut [f64],
    n: usize,
    c: usize,
) -> Vec<f64> {
    let mut dx = vec![0.0; n * c];
    for i in 0..n {
        let mut mean_dnorm = 0.0;
        let mut mean_dnorm_xhat = 0.0;
        for j in 0..c {
            let dn = dout[i * c + j] * w[j];
            mean_dnorm += dn;
            mean_dnorm_xhat += dn * cache.xhat[i * c + j];
            dw[j] += dout[i * c + j] * cache.xhat[i * c + j];
            db[j] += dout[i * c + j];
        }
        mean_dnorm /= c as f64;
        mean_dnorm_xhat /= c as f64;
        for j in 0..c {
            let dn = dout[i * c + j] * w[j];
            dx[i * c + j] =
                (dn - mean_dnorm - cache.xhat[i * c + j] * mean_dnorm_xhat) * cache.rstd[i];
        }
    }
    dx
}

const GELU_SCALE: f64 = 0.797_884_560_802_865_4;

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + (GELU_SCALE * (x + 0.044715 * x * x * x)).tanh())
}

fn gelu_grad(x: f64) -> f64 {
    let t = (GELU_SCALE * (x + 0.044715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
}

/// Causal attention over qkv [B, T, 3C]; returns y [B, T, C] and probabilities [B, NH, T, T].
fn attention(qkv: &[f64], b: usize, t: usize, c: usize, nh: usize) -> (Vec<f64>, Vec<f64>) {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut y = vec![0.0; b * t * c];
    let mut probs = vec![0.0; b * nh * t * t];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let q = &qkv[(bi * t + i) * 3 * c + h * hs..][..hs];
                let mut s = vec![f64::NEG_INFINITY; t];
                for (j, sj) in s.iter_mut().enumerate().take(i + 1) {
                    let k = &qkv[(bi * t + j) * 3 * c + c + h * hs..][..hs];
                    *sj = q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() * scale;
                }
                let m = s[..=i].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s[..=i].iter().map(|v| (v - m).exp()).sum();
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

fn attention_backward(
    dy: &[f64],
    qkv: &[f64],
    probs: &[f64],
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut dqkv = vec![0.0; b * t * 3 * c];
    for bi in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let p = &probs[((bi * nh + h) * t + i) * t..][..t];
                let dyi = &dy[(bi * t + i) * c + h * hs..][..hs];
                // dp_j = dy_i . v_j ; dv_j += p_j dy_i
                let mut dp = vec![0.0; t];
                for j in 0..=i {
                    let vo = (bi * t + j) * 3 * c + 2 * c + h * hs;
                    for d in 0..hs {
                        dp[j] += dyi[d] * qkv[vo + d];
                        dqkv[vo + d] += p[j] * dyi[d];
                    }
                }
                let dot: f64 = (0..=i).map(|j| p[j] * dp[j]).sum();
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

/// GPT-2 in float64 over the flat parameter layout of [`ParamLayout`].
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

    fn view<'a>(&self, flat: &'a [f64], id: ParamId) -> &'a [f64] {
        self.layout.slice(flat, id)
    }

    fn range(&self, id: ParamId) -> std::ops::Range<usize> {
        self.layout.entry(id).range()
    }

    /// Logits [B*T, V] (real vocabulary only) for tokens `x` (B*T).
    pub fn logits(&self, params: &[f64], x: &[u32], b: usize, t: usize) -> Vec<f64> {
        self.forward(params, x, b, t).0
    }

    /// Returns (logits [B*T, V], saved activations).
    fn forward(&self, p: &[f64], x: &[u32], b: usize, t: usize) -> (Vec<f64>, Saved) {
        let cfg = &self.config;
        let (c, n, nh) = (cfg.n_embd, b * t, cfg.n_head);
        let wte = self.view(p, ParamId::Wte);
        let wpe = self.view(p, ParamId::Wpe);
        let mut res = vec![0.0; n * c];
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
            let res2: Vec<f64> = res.iter().zip(&o).map(|(a, b)| a + b).collect();
            let (ln2, ln2c) = layernorm(&res2, w(B::Ln2Weight), w(B::Ln2Bias), n, c);
            let f = linear(&ln2, w(B::CFcWeight), Some(w(B::CFcBias)), n, c, 4 * c);
            let g: Vec<f64> = f.iter().map(|&v| gelu(v)).collect();
            let m = linear(
                &g,
                w(B::MlpProjWeight),
                Some(w(B::MlpProjBias)),
                n,
                4 * c,
                c,
            );
            let res3: Vec<f64> = res2.iter().zip(&m).map(|(a, b)| a + b).collect();
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
    pub fn loss_and_grads(
        &self,
        p: &[f64],
        x: &[u32],
        y: &[u32],
        b: usize,
        t: usize,
    ) -> (f64, Vec<f64>) {
        let cfg = &self.config;
        let (c, n, nh, v) = (cfg.n_embd, b * t, cfg.n_head, cfg.vocab_size);
        let (logits, saved) = self.forward(p, x, b, t);
        let mut grads = vec![0.0; p.len()];
        let mut loss = 0.0;
        let mut dlogits = vec![0.0; n * v];
        for i in 0..n {
            let row = &logits[i * v..(i + 1) * v];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
            let lse = m + z.ln();
            loss += lse - row[y[i] as usize];
            for j in 0..v {
                let pj = (row[j] - lse).exp();
                dlogits[i * v + j] = (pj - if j == y[i] as usize { 1.0 } else { 0.0 }) / n as f64;
            }
        }
        loss /= n as f64;
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
            let df: Vec<f64> = dg
                .iter()
                .zip(&s.f)
                .map(|(g, &f)| g * gelu_grad(f))
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
            for (a, b) in dres.iter_mut().zip(&d) {
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
            for (a, b) in dres.iter_mut().zip(&d) {
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

struct LayerSaved {
    ln1: Vec<f64>,
    ln1c: LnCache,
    qkv: Vec<f64>,
    y: Vec<f64>,
    probs: Vec<f64>,
    ln2: Vec<f64>,
    ln2c: LnCache,
    f: Vec<f64>,
    g: Vec<f64>,
}

struct Saved {
    layers: Vec<LayerSaved>,
    lnf: Vec<f64>,
    lnfc: LnCache,
}

/// Two disjoint mutable ranges of one slice (first must precede second).
fn two_mut(
    v: &mut [f64],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [f64], &mut [f64]) {
    if a.start < b.start {
        let (lo, hi) = v.split_at_mut(b.start);
        (&mut lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = v.split_at_mut(a.start);
        (&mut hi[..a.end - a.start], &mut lo[b])
    }
}

/// The optimiser settings of the recipe.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceOptim {
    pub schedule: LrSchedule,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
}

/// The result of one reference training step.
#[derive(Clone, Copy, Debug)]
pub struct ReferenceStep {
    pub loss: f64,
    pub norm: f64,
    pub lr: f64,
}

/// AdamW state and the training loop in float64.
pub struct ReferenceTrainer {
    pub model: ReferenceModel,
    pub params: Vec<f64>,
    /// The last step's gradient (mean over its micro-batches, before clipping).
    pub grads: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    pub optim: ReferenceOptim,
    step: usize,
}

impl ReferenceTrainer {
    pub fn new(model: ReferenceModel, params: &[f32], optim: ReferenceOptim) -> ReferenceTrainer {
        let n = params.len();
        ReferenceTrainer {
            model,
            params: params.iter().map(|&x| x as f64).collect(),
            grads: Vec::new(),
            m: vec![0.0; n],
            v: vec![0.0; n],
            optim,
            step: 0,
        }
    }

    /// Continues from another trainer's state: f32 weights and AdamW moments (flat, in the
    /// layout). The step count stays.
    pub fn set_state(&mut self, params: &[f32], m: &[f32], v: &[f32]) {
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        self.params = f64s(params);
        self.m = f64s(m);
        self.v = f64s(v);
    }

    /// Steps taken so far.
    pub fn steps(&self) -> usize {
        self.step
    }

    /// One optimiser step over `micro` batches (x, y) of B*T tokens each (gradient accumulation).
    pub fn step(&mut self, micro: &[(Vec<u32>, Vec<u32>)], b: usize, t: usize) -> ReferenceStep {
        let mut loss = 0.0;
        let mut grads = vec![0.0; self.params.len()];
        for (x, y) in micro {
            let (l, g) = self.model.loss_and_grads(&self.params, x, y, b, t);
            loss += l / micro.len() as f64;
            for (a, b) in grads.iter_mut().zip(g) {
                *a += b / micro.len() as f64;
            }
        }
        let norm = grads.iter().map(|g| g * g).sum::<f64>().sqrt();
        let clip = if self.optim.grad_clip > 0.0 {
            (self.optim.grad_clip / (norm + 1e-6)).min(1.0)
        } else {
            1.0
        };
        let lr = self.optim.schedule.lr(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.optim.beta1, self.optim.beta2);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let n_decay = self.model.layout.n_decay;
        for (i, g) in grads.iter().enumerate() {
            let g = g * clip;
            let wd = if i < n_decay {
                self.optim.weight_decay
            } else {
                0.0
            };
            self.params[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
            let mhat = self.m[i] / bc1;
            let vhat = self.v[i] / bc2;
            self.params[i] -= lr * mhat / (vhat.sqrt() + self.optim.eps);
        }
        self.grads = grads;
        ReferenceStep { loss, norm, lr }
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
