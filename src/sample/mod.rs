//! Text generation with a key/value cache: each new token costs one position's work, all
//! samples are decoded together as a batch, and top-k / temperature sampling runs on the GPU so
//! only the chosen token ids come back to the CPU.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::{AdapterLimits, DType, Gpu, Tensor, Uniform};
use crate::graph::gpt::{layernorm_node, linear_forward, ln_tensors, residual_layernorm};
use crate::graph::{CompiledGraph, Graph, TensorId};
use crate::model::{Gpt, GptConfig, ParamId, ParamLayout, StorageLayout, StoredParams};
use crate::ops::embedding::TablePiece;
use crate::ops::matmul::{self, MatmulForward};
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

/// The tensors a decoding step uses that the generator owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum DecodeInput {
    /// Piece `k` of a parameter (f32 master weights).
    Param(ParamId, usize),
    TokensIn,
    TokensOut,
    Uniforms,
    Logits,
    /// Layer `l`'s key/value cache.
    Cache(usize),
}

/// A GPT-2 ready to decode `samples` sequences at once.
pub struct Generator {
    gpu: Arc<Gpu>,
    config: GptConfig,
    dims: DecodeDims,
    graph: CompiledGraph,
    step: Uniform,
    tokens_in: Tensor,
    tokens_out: Tensor,
    uniforms: Tensor,
    logits: Tensor,
    staging: wgpu::Buffer,
    /// Keeps an uploaded parameter buffer alive when the generator owns it.
    _params: StoredParams,
}

impl Generator {
    /// Uploads the weights of `checkpoint` (in buffers that fit the adapter's limits) and
    /// prepares decoding of `samples` sequences.
    pub fn from_checkpoint(
        gpu: Arc<Gpu>,
        checkpoint: &Checkpoint,
        samples: usize,
    ) -> Result<Generator> {
        let limits = AdapterLimits::of(&gpu);
        Self::from_checkpoint_with_limits(gpu, checkpoint, samples, &limits)
    }

    /// [`Generator::from_checkpoint`] with the weights stored for `limits` instead of the
    /// device's own (which they must not exceed).
    pub fn from_checkpoint_with_limits(
        gpu: Arc<Gpu>,
        checkpoint: &Checkpoint,
        samples: usize,
        limits: &AdapterLimits,
    ) -> Result<Generator> {
        let config = checkpoint.config;
        config.validate()?;
        let layout = ParamLayout::new(&config);
        if checkpoint.params.len() != layout.total {
            return Err(Error::Other(
                "the checkpoint's parameters do not match its config".into(),
            ));
        }
        let storage = Arc::new(StorageLayout::new(&config, limits.storage_capacity())?);
        let params = StoredParams::zeros(&gpu, &storage, DType::F32, "generator params")?;
        params.upload(&gpu, &layout, &checkpoint.params)?;
        Self::new(gpu, config, params, samples)
    }

    /// Decodes with the f32 master weights in `params`. The buffers may be shared with a
    /// trainer: generation then sees its current weights.
    pub fn new(
        gpu: Arc<Gpu>,
        config: GptConfig,
        params: StoredParams,
        samples: usize,
    ) -> Result<Generator> {
        config.validate()?;
        if samples == 0 {
            return Err(Error::Config("--num-samples must be at least 1".into()));
        }
        for t in &params.buffers {
            t.expect_dtype("generator", "params", &[DType::F32])?;
        }
        let storage = params.layout.clone();
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
        let cache_shape = [config.block_size, s, 3 * c];
        let mut caches = Vec::new();
        for l in 0..config.n_layer {
            caches.push(gpu.zeros(&format!("h.{l}.kv cache"), &cache_shape, DType::F32)?);
        }

        let mut g: Graph<DecodeInput> = Graph::new(1);
        // Every parameter piece as an input; only wte may have several.
        let declare = |g: &mut Graph<DecodeInput>, id: ParamId, k: usize| {
            let shape = &storage.pieces.get(id)[k].shape;
            g.input(
                format!("{} piece {k}", id.name()),
                shape,
                DType::F32,
                DecodeInput::Param(id, k),
            )
        };
        let wte: Vec<(TensorId, TablePiece)> = storage
            .pieces
            .wte
            .iter()
            .enumerate()
            .map(|(k, piece)| {
                let t = TablePiece {
                    first: piece.rows.start,
                    total: vp,
                };
                (declare(&mut g, ParamId::Wte, k), t)
            })
            .collect();
        let p = Gpt::try_new(&config, |id| match storage.pieces.get(id).len() {
            _ if id == ParamId::Wte => Ok(wte[0].0),
            1 => Ok(declare(&mut g, id, 0)),
            k => Err(Error::Other(format!(
                "{} is stored in {k} pieces; only the token embedding may be split",
                id.name()
            ))),
        })?;
        let tin = g.input("tokens in", &[s], DType::U32, DecodeInput::TokensIn);
        let tout = g.input("tokens out", &[s], DType::U32, DecodeInput::TokensOut);
        let unif = g.input("uniforms", &[s], DType::F32, DecodeInput::Uniforms);
        let logits_id = g.input("logits", &[s, vp], DType::F32, DecodeInput::Logits);
        let step_buf = step.clone();

        let x0 = g.planned("embedding", &[s, c], DType::F32);
        {
            let (sb, d, wpe) = (step_buf.clone(), dims, p.wpe);
            let mut reads = vec![tin, wpe];
            reads.extend(wte.iter().map(|(id, _)| *id));
            let parts = wte.clone();
            g.node(
                "embedding_at",
                "embedding",
                &reads,
                &[x0],
                0.0,
                move |gpu, r| {
                    parts
                        .iter()
                        .map(|&(w, piece)| {
                            ops::embedding_at(
                                gpu,
                                &d,
                                &sb,
                                &ops::EmbeddingAt {
                                    out: r.t(x0),
                                    tokens: r.t(tin),
                                    wte: r.t(w),
                                    piece,
                                    wpe: r.t(wpe),
                                },
                            )
                        })
                        .collect()
                },
            );
        }
        let mut x = x0;
        for (l, bl) in p.h.iter().enumerate() {
            let name = |s: &str| format!("h.{l}.{s}");
            let ln1 = layer_norm(&mut g, &name("ln_1"), x, bl.ln_1_w, bl.ln_1_b, s, c);
            let qkv = g.planned(name("qkv"), &[s, 3 * c], DType::F32);
            let (w, bias) = (bl.c_attn_w, bl.c_attn_b);
            linear(&mut g, &name("attn.c_attn"), ln1, w, Some(bias), qkv, false);
            let cache = g.input(
                name("kv cache"),
                &cache_shape,
                DType::F32,
                DecodeInput::Cache(l),
            );
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
            let (w, bias) = (bl.attn_proj_w, bl.attn_proj_b);
            linear(
                &mut g,
                &name("attn.c_proj"),
                atty,
                w,
                Some(bias),
                proj,
                false,
            );
            let mid = g.planned(name("residual mid"), &[s, c], DType::F32);
            let ln2 = ln_tensors(&mut g, &name("ln_2"), s, c, DType::F32);
            let (w2, b2) = (bl.ln_2_w, bl.ln_2_b);
            residual_layernorm(&mut g, true, &name("ln_2"), x, proj, mid, ln2, w2, b2);
            let ln2 = ln2.out;
            let fc = g.planned(name("mlp.gelu out"), &[s, 4 * c], DType::F32);
            let (w, bias) = (bl.c_fc_w, bl.c_fc_b);
            linear(&mut g, &name("mlp.c_fc"), ln2, w, Some(bias), fc, true);
            let mlp = g.planned(name("mlp.c_proj out"), &[s, c], DType::F32);
            let (w, bias) = (bl.mlp_proj_w, bl.mlp_proj_b);
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
        let lnf = layer_norm(&mut g, "ln_f", x, p.ln_f_w, p.ln_f_b, s, c);
        // lm_head, tied to wte: one product per piece of wte, each writing its columns.
        for (k, &(w, piece)) in wte.iter().enumerate() {
            let label = match wte.len() {
                1 => "lm_head.forward".to_string(),
                _ => format!("lm_head.forward[piece {k}]"),
            };
            g.node(
                label,
                "matmul",
                &[lnf, w],
                &[logits_id],
                0.0,
                move |gpu, r| {
                    let o = MatmulForward {
                        out_columns: Some(piece.first),
                        ..Default::default()
                    };
                    Ok(vec![matmul::matmul_forward(
                        gpu,
                        r.t(logits_id),
                        r.t(lnf),
                        r.t(w),
                        &o,
                    )?])
                },
            );
        }
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
        let align = gpu.alignment();
        let graph = g.compile(&gpu, &|input, _| match *input {
            DecodeInput::Param(id, k) => params.view(id, k, align),
            DecodeInput::TokensIn => Ok(tokens_in.clone()),
            DecodeInput::TokensOut => Ok(tokens_out.clone()),
            DecodeInput::Uniforms => Ok(uniforms.clone()),
            DecodeInput::Logits => Ok(logits.clone()),
            DecodeInput::Cache(l) => Ok(caches[l].clone()),
        })?;
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

    /// How the weights are stored (buffers, pieces).
    pub fn storage(&self) -> &StorageLayout {
        &self._params.layout
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
        self.step.write(gpu, &step);
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
                self.graph.record(&mut pass);
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
    g: &mut Graph<DecodeInput>,
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
    g: &mut Graph<DecodeInput>,
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
