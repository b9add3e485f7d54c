//! Generation with the key/value cache against the float64 reference model, the GPU sampler
//! against a CPU draw, and the `generate` binary end to end.

use crate::common::*;
use std::sync::Arc;
use wgpt::checkpoint::{hf, Checkpoint};
use wgpt::gpu::DType;
use wgpt::model::init::init_params;
use wgpt::model::params::storage_order;
use wgpt::model::{GptConfig, ParamLayout};
use wgpt::ops::sample::{self as ops, DecodeDims, DecodeStep};
use wgpt::reference::model::ReferenceModel;
use wgpt::sample::{Generator, SampleOptions};

fn tiny() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 3,
        n_embd: 48,
        block_size: 24,
        vocab_size: 300,
        padded_vocab_size: 384,
    }
}

fn arc_gpu() -> Arc<wgpt::Gpu> {
    gpu_arc()
}

/// Random weights with larger than usual scale, so that logits differ clearly between tokens.
fn weights(seed: u64) -> Checkpoint {
    let cfg = tiny();
    let layout = ParamLayout::new(&cfg);
    let mut p = init_params(&cfg, &layout, seed);
    let mut r = rng(seed + 1);
    for id in storage_order(&cfg) {
        for x in &mut p[layout.entry(id).range()] {
            *x = *x * 5.0
                + if !id.decayed() && !id.is_layernorm_weight() {
                    r.range(-0.1, 0.1)
                } else {
                    0.0
                };
        }
    }
    Checkpoint {
        config: cfg,
        params: p,
        moments: None,
        state: None,
    }
}

fn reference_greedy(
    model: &ReferenceModel,
    params: &[f64],
    prompt: &[u32],
    new: usize,
) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let v = model.config.vocab_size;
    // The smallest lead of the chosen token over the runner-up: a test whose choices were near
    // ties would be decided by rounding.
    let mut lead = f64::INFINITY;
    for _ in 0..new {
        let logits = model.logits(params, &seq, 1, seq.len());
        let last = &logits[(seq.len() - 1) * v..seq.len() * v];
        let mut best = 0;
        for (i, &x) in last.iter().enumerate() {
            if x > last[best] {
                best = i;
            }
        }
        let second = (0..v)
            .filter(|&i| i != best)
            .map(|i| last[i])
            .fold(f64::NEG_INFINITY, f64::max);
        lead = lead.min(last[best] - second);
        seq.push(best as u32);
    }
    eprintln!("reference greedy decoding: smallest lead of the chosen token {lead:.3e}");
    assert!(
        lead > 1e-4,
        "a near tie ({lead:e}) would make the comparison a coin toss"
    );
    seq
}

#[test]
fn cached_logits_equal_full_forward_logits_at_every_position() {
    let ck = weights(3);
    let model = ReferenceModel::new(ck.config);
    let params: Vec<f64> = ck.params.iter().map(|&x| x as f64).collect();
    let tokens: Vec<u32> = (0..20).map(|i| ((i * 37 + 5) % 300) as u32).collect();
    let full = model.logits(&params, &tokens, 1, tokens.len());
    let mut g = Generator::from_checkpoint(arc_gpu(), &ck, 2).unwrap();
    let cached = g.logits_per_position(&tokens).unwrap();
    let v = ck.config.vocab_size;
    for (pos, row) in cached.iter().enumerate() {
        let want: Vec<f32> = full[pos * v..(pos + 1) * v]
            .iter()
            .map(|&x| x as f32)
            .collect();
        let err = rel_error(row, &want);
        assert!(err <= 1e-4, "position {pos}: relative error {err:e}");
    }
    eprintln!(
        "cached vs full-forward logits: all {} positions within 1e-4",
        cached.len()
    );
}

#[test]
fn greedy_decoding_from_a_hugging_face_checkpoint_matches_the_reference() {
    let ck = weights(5);
    let dir = std::env::temp_dir().join(format!("wgpt-gen-hf-{}", std::process::id()));
    hf::export(&dir, &ck.config, &ck.params).unwrap();
    let loaded = hf::load_any(&dir).unwrap();
    let prompt = [17u32, 250, 3];
    let new = 12;
    let mut g = Generator::from_checkpoint(arc_gpu(), &loaded, 3).unwrap();
    let opts = SampleOptions {
        max_new_tokens: new,
        top_k: 1,
        temperature: 1.0,
        seed: 1,
    };
    let mut streamed = vec![Vec::new(); 3];
    let got = g
        .generate(&prompt, &opts, |s, t| streamed[s].push(t))
        .unwrap();
    let model = ReferenceModel::new(ck.config);
    let params: Vec<f64> = loaded.params.iter().map(|&x| x as f64).collect();
    let want = reference_greedy(&model, &params, &prompt, new);
    for (s, seq) in got.iter().enumerate() {
        assert_eq!(seq, &want, "sample {s}");
        assert_eq!(
            &streamed[s][..],
            &want[prompt.len()..],
            "streamed tokens of sample {s}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Greedy decoding with GPT-2 124M's real shape, from a Hugging Face-format checkpoint, with the
/// weights stored for WebGPU's default limits (wte in two pieces): the reference's tokens.
#[test]
fn greedy_decoding_at_gpt2_124m_shape_matches_the_reference() {
    let cfg = GptConfig::gpt2();
    let dir = std::env::temp_dir().join(format!("wgpt-gpt2-124m-gen-{}", std::process::id()));
    let ck = hf_checkpoint(&dir, &cfg, 125);
    std::fs::remove_dir_all(&dir).ok();
    let prompt = wgpt::data::Tokenizer::gpt2().encode("Hello, I'm a language model,");
    let new = 6;
    let limits = wgpt::AdapterLimits::webgpu_default(gpu().memory);
    let start = std::time::Instant::now();
    let mut g = Generator::from_checkpoint_with_limits(arc_gpu(), &ck, 2, &limits).unwrap();
    assert_eq!(g.storage().pieces.wte.len(), 2);
    let opts = SampleOptions {
        max_new_tokens: new,
        top_k: 1,
        temperature: 1.0,
        seed: 1,
    };
    let got = g.generate(&prompt, &opts, |_, _| {}).unwrap();
    eprintln!(
        "gpt2 124M: {} positions for 2 samples in {:.1} s",
        prompt.len() + new,
        start.elapsed().as_secs_f64()
    );
    let model = ReferenceModel::new(cfg);
    let params: Vec<f64> = ck.params.iter().map(|&x| x as f64).collect();
    let want = reference_greedy(&model, &params, &prompt, new);
    for (s, seq) in got.iter().enumerate() {
        assert_eq!(seq, &want, "sample {s}");
    }
}

/// The inverse-CDF draw the sampler makes, on the CPU: top-k by value, candidates in index order.
fn cpu_draw(logits: &[f32], k: usize, temp: f32, u: f32) -> u32 {
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let thresh = sorted[k.min(logits.len()) - 1];
    let max = sorted[0];
    let w: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x >= thresh {
                (((x - max) / temp) as f64).exp()
            } else {
                0.0
            }
        })
        .collect();
    let total: f64 = w.iter().sum();
    let goal = u as f64 * total;
    let mut acc = 0.0;
    for (i, &x) in w.iter().enumerate() {
        acc += x;
        if x > 0.0 && acc > goal {
            return i as u32;
        }
    }
    unreachable!()
}

#[test]
fn gpu_top_k_sampling_matches_a_cpu_draw() {
    let g = gpu();
    let (s, v, vp) = (7, 1000, 1003);
    let d = DecodeDims {
        s,
        c: 8,
        nh: 2,
        t_max: 8,
        v,
        vp,
    };
    let mut r = rng(21);
    let step = ops::step_buffer(g);
    let tokens = g.zeros("tokens", &[s], DType::U32).unwrap();
    let uniforms = g.zeros("u", &[s], DType::F32).unwrap();
    // Padded columns hold huge values: they must never be drawn.
    let mut logits = r.vec_uniform(s * vp, -4.0, 4.0);
    for row in 0..s {
        for j in v..vp {
            logits[row * vp + j] = 1e4;
        }
    }
    let lt = g.upload("logits", &logits, &[s, vp], DType::F32).unwrap();
    let dispatch = ops::topk_sample(g, &d, &step, &tokens, &lt, &uniforms).unwrap();
    let mut checked = 0;
    for (k, temp) in [(1usize, 1.0f32), (5, 1.0), (50, 0.7), (1000, 1.3)] {
        for _ in 0..4 {
            let u: Vec<f32> = (0..s).map(|_| r.uniform() as f32).collect();
            g.write(&uniforms, &u).unwrap();
            step.write(
                g,
                &DecodeStep {
                    pos: 0,
                    top_k: k as u32,
                    temperature: temp,
                    _pad: 0,
                },
            );
            g.run(&[&dispatch]).unwrap();
            let got = g.read_u32(&tokens).unwrap();
            for row in 0..s {
                let want = cpu_draw(&logits[row * vp..row * vp + v], k, temp, u[row]);
                assert_eq!(got[row], want, "k={k} temp={temp} row {row} u={}", u[row]);
                checked += 1;
            }
        }
    }
    eprintln!("{checked} draws equal to the CPU's");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let ck = weights(1);
    let mut g = Generator::from_checkpoint(arc_gpu(), &ck, 1).unwrap();
    let long: Vec<u32> = vec![1; 25];
    let e = g
        .generate(&long, &SampleOptions::default(), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("25 tokens") && e.contains("context is 24"),
        "{e}"
    );
    let e = g
        .generate(
            &[1; 20],
            &SampleOptions {
                max_new_tokens: 10,
                ..Default::default()
            },
            |_, _| {},
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("at most 4 new tokens"), "{e}");
}

#[test]
fn generate_binary_prints_greedy_samples() {
    let ck = weights(8);
    let dir = std::env::temp_dir().join(format!("wgpt-gen-bin-{}", std::process::id()));
    // Full GPT-2 vocabulary so that the binary's tokenizer can encode the prompt.
    let cfg = GptConfig {
        vocab_size: 50257,
        padded_vocab_size: 50304,
        ..ck.config
    };
    let layout = ParamLayout::new(&cfg);
    let params = init_params(&cfg, &layout, 8);
    hf::export(&dir, &cfg, &params).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_generate"))
        .args([
            "--init-from",
            dir.to_str().unwrap(),
            "--prompt",
            "Hello, I'm",
            "--max-new-tokens",
            "5",
            "--num-samples",
            "2",
            "--top-k",
            "1",
        ])
        .env("WGPU_BACKEND", "vulkan")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    // The CPU reference's greedy continuation, decoded the same way.
    let tok = wgpt::data::Tokenizer::gpt2();
    let prompt = tok.encode("Hello, I'm");
    let model = ReferenceModel::new(cfg);
    let p: Vec<f64> = params.iter().map(|&x| x as f64).collect();
    let want = format!(
        "> {}",
        tok.decode(&reference_greedy(&model, &p, &prompt, 5))
    );
    assert_eq!(lines[0], want);
    assert_eq!(lines[1], want);
    std::fs::remove_dir_all(&dir).ok();
}
