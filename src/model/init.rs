//! GPT-2 initialisation from a seed.

use super::params::storage_order;
use super::{GptConfig, ParamId, ParamLayout};
use crate::rng::Rng;

/// Fresh parameters in the flat layout: Linear and Embedding weights ~ N(0, 0.02), the residual
/// projections (`attn.c_proj`, `mlp.c_proj`) ~ N(0, 0.02 * (2 * n_layer)^-0.5), biases 0,
/// LayerNorm weight 1 and bias 0. The padded vocabulary rows of wte stay 0 (they are never read).
pub fn init_params(config: &GptConfig, layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut flat = vec![0f32; layout.total];
    let residual_std = 0.02 * (2.0 * config.n_layer as f32).powf(-0.5);
    // Storage order (decayed tensors first), so a seed gives the same weights in every version.
    for id in storage_order(config) {
        let dst = &mut flat[layout.entry(id).range()];
        if id.is_layernorm_weight() {
            dst.fill(1.0);
            continue;
        }
        if !id.decayed() {
            // biases (LayerNorm and Linear)
            continue;
        }
        let std = if id.is_residual_projection() {
            residual_std
        } else {
            0.02
        };
        let n = if id == ParamId::Wte {
            config.vocab_size * config.n_embd
        } else {
            dst.len()
        };
        for x in &mut dst[..n] {
            *x = (rng.normal() * std as f64) as f32;
        }
    }
    flat
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_follows_gpt2() {
        let cfg = GptConfig {
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            block_size: 16,
            vocab_size: 100,
            padded_vocab_size: 128,
        };
        let layout = ParamLayout::new(&cfg);
        let p = init_params(&cfg, &layout, 1337);
        let std = |id: ParamId| {
            let v = layout.slice(&p, id);
            (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        use crate::model::BlockTensor as B;
        assert!((std(ParamId::Block(0, B::CFcWeight)) - 0.02).abs() < 0.002);
        assert!((std(ParamId::Block(1, B::AttnProjWeight)) - 0.01).abs() < 0.002);
        assert!(layout
            .slice(&p, ParamId::Block(0, B::Ln1Weight))
            .iter()
            .all(|&x| x == 1.0));
        assert!(layout
            .slice(&p, ParamId::Block(0, B::CAttnBias))
            .iter()
            .all(|&x| x == 0.0));
        let wte = layout.entry(ParamId::Wte);
        assert!(p[wte.offset + 100 * 32..wte.offset + 128 * 32]
            .iter()
            .all(|&x| x == 0.0));
        assert_eq!(
            init_params(&cfg, &layout, 1337),
            p,
            "seeded init is reproducible"
        );
    }
}
