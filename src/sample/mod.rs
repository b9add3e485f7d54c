//! Text generation with a key/value cache: each new token costs one position's work, all
//! samples are decoded together as a batch, and top-k / temperature sampling runs on the GPU so
//! only the chosen token ids come back to the CPU.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};
use crate::graph::gpt::{layernorm_node, linear_forward, ln_tensors, residual_layernorm};
use crate::graph::{CompiledGraph, Graph, TensorId};
use crate::model::{GptConfig, ParamLayout};
use crate::ops::sample::{self as ops, DecodeDims, DecodeStep};
use crate::rng::Rng;
use std::sync::Arc;

/// How to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    pub max_new_tokens: usize,
    /// Candidates kept (1: greedy).
    pub top_k: usize,
    pub temperature: f32,
    pub seed: u64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            max_new_tokens: 22,
            top_k: 50,
            temperature: 1.0,
            seed: 42,
        }
    }
}

/// A GPT-2 ready to decode `samples` sequences at once.
pub struct Generator {
    gpu: Arc<Gpu>,
    config: GptConfig,
    dims: DecodeDims,
    graph: CompiledGraph,
    step: wgpu::Buffer,
    tokens_in: Tensor,
    tokens_out: Tensor,
    uniforms: Tensor,
    logits: Tensor,
    staging: wgpu::Buffer,
    /// Keeps an uploaded parameter buffer alive when the generator owns it.
    _params: Tensor,
}

impl Generator {
    /// Uploads the weights of `checkpoint` and prepares decoding of `samples` sequences.
    pub fn from_checkpoint(
        gpu: Arc<Gpu>,
        checkpoint: &Checkpoint,
        samples: usize,
    ) -> Result<Generator> {
        let layout = ParamLayout::new(&checkpoint.config);
        if checkpoint.params.len() != layout.total {
            return Err(Error::Other(
                "the checkpoint's parameters do not match its config".into(),
            ));
        }
        let params = gpu.upload(
            "generator params",
            &checkpoint.params,
            &[layout.total],
            DType::F32,
        )?;
        Self::new(gpu, checkpoint.config, params, samples)
    }

    /// Decodes with the f32 master weights in `params` (flat, in [`ParamLayout`] order). The
    /// buffer may be shared with a trainer: generation then sees its current weights.
    pub fn new(
        gpu: Arc<Gpu>,
        config: GptConfig,
        params: Tensor,
        samples: usize,
    ) -> Result<Generator> {
        config.validate()?;
        if samples == 0 {
            return Err(Error::Config("--num-samples must be at least 1".into()));
        }
        let layout = ParamLayout::new(&config);
        params.expect_len("generator", "params", layout.total)?;
        let (s, c, vp) = (samples, config.n_embd, config.padded_vocab_size);
        let dims = DecodeDims {
            s,
            c,
            nh: config.n_head,
            t_max: config.block_size,
            v: config.vocab_size,
            vp,
        };
        let step = ops::step_buffer(&gpu);
        let tokens_in = gpu.zeros("decode tokens in", &[s], DType::U32)?;
        let tokens_out = gpu.zeros("decode tokens out", &[s], DType::U32)?;
        let uniforms = gpu.zeros("decode uniforms", &[s], DType::F32)?;
        let logits = gpu.zeros("decode logits", &[s, vp], DType::F32)?;
        let mut caches = Vec::new();
        for l in 0..config.n_layer {
            caches.push(gpu.zeros(
                &format!("h.{l}.kv cache"),
                &[config.block_size, s, 3 * c],
                DType::F32,
            )?);
        }

        let align = gpu.alignment();
        let mut g = Graph::new(1);
        let p = |g: &mut Graph, name: &str| -> Result<TensorId> {
            let e = layout.get(name)?;
            Ok(g.fixed(name, &params.slice(e.offset, &e.shape, align)?))
        };
        let wte = p(&mut g, "wte.weight")?;
        let wpe = p(&mut g, "wpe.weight")?;
        let tin = g.fixed("tokens in", &tokens_in);
        let tout = g.fixed("tokens out", &tokens_out);
        let unif = g.fixed("uniforms", &uniforms);
        let logits_id = g.fixed("logits", &logits);
        let step_buf = step.clone();

        let x0 = g.planned("embedding", &[s, c], DType::F32);
        {
            let (sb, d) = (step_buf.clone(), dims);
            g.node(
                "embedding_at",
                "embedding",
                &[tin, wte, wpe],
                &[x0],
                0.0,
                move |gpu, r| {
                    Ok(vec![ops::embedding_at(
                        gpu,
                        &d,
                        &sb,
                        r.t(x0),
                        r.t(tin),
                        r.t(wte),
                        r.t(wpe),
                    )?])
                },
            );
        }
        let mut x = x0;
        for (l, cache) in caches.iter().enumerate() {
            let name = |s: &str| format!("h.{l}.{s}");
            let (w1, b1) = (
                p(&mut g, &name("ln_1.weight"))?,
                p(&mut g, &name("ln_1.bias"))?,
            );
            let ln1 = layer_norm(&mut g, &name("ln_1"), x, w1, b1, s, c);
            let qkv = g.planned(name("qkv"), &[s, 3 * c], DType::F32);
            let (w, bias) = (
                p(&mut g, &name("attn.c_attn.weight"))?,
                p(&mut g, &name("attn.c_attn.bias"))?,
            );
            linear(&mut g, &name("attn.c_attn"), ln1, w, Some(bias), qkv, false);
            let cache = g.fixed(name("kv cache"), cache);
            let atty = g.planned(name("attention out"), &[s, c], DType::F32);
            {
                let (sb, d) = (step_buf.clone(), dims);
                g.node(
                    name("attention_decode"),
                    "attention",
                    &[qkv, cache],
                    &[cache, atty],
                    0.0,
                    move |gpu, r| {
                        Ok(vec![ops::attention_decode(
                            gpu,
                            &d,
                            &sb,
                            r.t(atty),
                            r.t(cache),
                            r.t(qkv),
                        )?])
                    },
                );
            }
            let proj = g.planned(name("attn.c_proj out"), &[s, c], DType::F32);
            let (w, bias) = (
                p(&mut g, &name("attn.c_proj.weight"))?,
                p(&mut g, &name("attn.c_proj.bias"))?,
            );
            linear(
                &mut g,
                &name("attn.c_proj"),
                atty,
                w,
                Some(bias),
                proj,
                false,
            );
            let (w2, b2) = (
                p(&mut g, &name("ln_2.weight"))?,
                p(&mut g, &name("ln_2.bias"))?,
            );
            let mid = g.planned(name("residual mid"), &[s, c], DType::F32);
            let ln2 = ln_tensors(&mut g, &name("ln_2"), s, c, DType::F32);
            residual_layernorm(&mut g, true, &name("ln_2"), x, proj, mid, ln2, w2, b2);
            let ln2 = ln2.out;
            let fc = g.planned(name("mlp.gelu out"), &[s, 4 * c], DType::F32);
            let (w, bias) = (
                p(&mut g, &name("mlp.c_fc.weight"))?,
                p(&mut g, &name("mlp.c_fc.bias"))?,
            );
            linear(&mut g, &name("mlp.c_fc"), ln2, w, Some(bias), fc, true);
            let mlp = g.planned(name("mlp.c_proj out"), &[s, c], DType::F32);
            let (w, bias) = (
                p(&mut g, &name("mlp.c_proj.weight"))?,
                p(&mut g, &name("mlp.c_proj.bias"))?,
            );
            linear(&mut g, &name("mlp.c_proj"), fc, w, Some(bias), mlp, false);
            let out = g.planned(name("residual out"), &[s, c], DType::F32);
            let (m2, o2) = (mid, out);
            g.node(
                name("residual"),
                "elementwise",
                &[m2, mlp],
                &[o2],
                0.0,
                move |gpu, r| {
                    Ok(vec![crate::ops::elementwise::residual_forward(
                        gpu,
                        r.t(o2),
                        r.t(m2),
                        r.t(mlp),
                    )?])
                },
            );
            x = out;
        }
        let (wf, bf) = (p(&mut g, "ln_f.weight")?, p(&mut g, "ln_f.bias")?);
        let lnf = layer_norm(&mut g, "ln_f", x, wf, bf, s, c);
        linear(&mut g, "lm_head", lnf, wte, None, logits_id, false);
        {
            let (sb, d) = (step_buf.clone(), dims);
            g.node(
                "topk_sample",
                "sample",
                &[logits_id, unif],
                &[tout],
                0.0,
                move |gpu, r| {
                    Ok(vec![ops::topk_sample(
                        gpu,
                        &d,
                        &sb,
                        r.t(tout),
                        r.t(logits_id),
                        r.t(unif),
                    )?])
                },
            );
        }
        let graph = g.compile(&gpu)?;
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("decode read-back"),
            size: (s as u64 * 4).div_ceil(256) * 256,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Generator {
            gpu,
            config,
            dims,
            graph,
            step,
            tokens_in,
            tokens_out,
            uniforms,
            logits,
            staging,
            _params: params,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn samples(&self) -> usize {
        self.dims.s
    }

    /// Runs one position for every sample: feeds `tokens` (one per sample) at `pos` and returns
    /// the sampled next tokens.
    fn decode(
        &mut self,
        pos: usize,
        tokens: &[u32],
        opts: &SampleOptions,
        rng: &mut Rng,
    ) -> Result<Vec<u32>> {
        let gpu = &self.gpu;
        gpu.write_u32(&self.tokens_in, tokens)?;
        let u: Vec<f32> = (0..self.dims.s).map(|_| rng.uniform() as f32).collect();
        gpu.write(&self.uniforms, &u)?;
        let step = DecodeStep {
            pos: pos as u32,
            top_k: opts.top_k as u32,
            temperature: opts.temperature,
            _pad: 0,
        };
        gpu.queue
            .write_buffer(&self.step, 0, bytemuck::bytes_of(&step));
        gpu.scoped("decode step", || {
            let mut enc = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("decode step"),
                });
            {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("decode step"),
                    timestamp_writes: None,
                });
                self.graph.record(&mut pass, None);
            }
            enc.copy_buffer_to_buffer(
                &self.tokens_out.buffer,
                0,
                &self.staging,
                0,
                self.dims.s as u64 * 4,
            );
            gpu.queue.submit([enc.finish()]);
        })?;
        let out: Vec<u32> =
            bytemuck::pod_collect_to_vec(&gpu.map_read(&self.staging, self.dims.s as u64 * 4)?);
        Ok(out)
    }

    /// Checks a prompt and a token budget fit the context.
    pub fn check_fits(&self, prompt_len: usize, max_new_tokens: usize) -> Result<()> {
        let ctx = self.config.block_size;
        if prompt_len == 0 {
            return Err(Error::Config(
                "the prompt is empty; give at least one token of text".into(),
            ));
        }
        if prompt_len > ctx {
            return Err(Error::Config(format!(
                "the prompt is {prompt_len} tokens but the model's context is {ctx} tokens; shorten the prompt"
            )));
        }
        if prompt_len + max_new_tokens > ctx {
            return Err(Error::Config(format!(
                "the prompt ({prompt_len} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's context of {ctx} tokens; ask for at most {} new tokens",
                ctx - prompt_len
            )));
        }
        Ok(())
    }

    /// Generates `opts.max_new_tokens` tokens after `prompt` for every sample. `on_token(sample,
    /// token)` is called as each token is produced. Returns each sample's tokens, prompt included.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &SampleOptions,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        self.check_fits(prompt.len(), opts.max_new_tokens)?;
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(Error::Config(format!(
                "prompt token {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let s = self.dims.s;
        let mut rng = Rng::new(opts.seed);
        let mut seqs: Vec<Vec<u32>> = vec![prompt.to_vec(); s];
        if opts.max_new_tokens == 0 {
            return Ok(seqs);
        }
        // The prompt, one position at a time (the cache fills as it goes).
        let mut next = Vec::new();
        for (pos, &tok) in prompt.iter().enumerate() {
            next = self.decode(pos, &vec![tok; s], opts, &mut rng)?;
        }
        for i in 0..opts.max_new_tokens {
            for (k, &t) in next.iter().enumerate() {
                seqs[k].push(t);
                on_token(k, t);
            }
            if i + 1 == opts.max_new_tokens {
                break;
            }
            let pos = prompt.len() + i;
            next = self.decode(pos, &next.clone(), opts, &mut rng)?;
        }
        Ok(seqs)
    }

    /// Feeds `tokens` (for sample 0; other samples get the same) one position at a time and
    /// returns sample 0's logits (real vocabulary) after each position.
    pub fn logits_per_position(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.check_fits(tokens.len(), 0)?;
        let mut rng = Rng::new(0);
        let opts = SampleOptions {
            top_k: 1,
            ..Default::default()
        };
        let mut out = Vec::new();
        for (pos, &tok) in tokens.iter().enumerate() {
            self.decode(pos, &vec![tok; self.dims.s], &opts, &mut rng)?;
            let row = self.gpu.read(&self.logits)?;
            out.push(row[..self.config.vocab_size].to_vec());
        }
        Ok(out)
    }
}

fn layer_norm(
    g: &mut Graph,
    what: &str,
    x: TensorId,
    w: TensorId,
    b: TensorId,
    s: usize,
    c: usize,
) -> TensorId {
    let ln = ln_tensors(g, what, s, c, DType::F32);
    layernorm_node(g, what, ln, x, w, b);
    ln.out
}

fn linear(
    g: &mut Graph,
    what: &str,
    inp: TensorId,
    w: TensorId,
    bias: Option<TensorId>,
    out: TensorId,
    gelu: bool,
) {
    let pre = gelu.then(|| {
        let shape = g.shape(out).to_vec();
        g.planned(format!("{what} pre-activation"), &shape, DType::F32)
    });
    linear_forward(g, format!("{what}.forward"), inp, w, bias, pre, out, 0.0);
}
