//! Text generation with a key/value cache: each new token costs one position's work, all
//! samples are decoded together as a batch, and top-k / temperature sampling runs on the GPU so
//! only the chosen token ids come back to the CPU.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::gpu::{AdapterLimits, DType, Gpu, Tensor, Uniform};
use crate::graph::gpt::{decode_graph, ParamCopy, ParamInput};
use crate::graph::CompiledGraph;
use crate::model::{GptConfig, ParamLayout, StorageLayout, StoredParams};
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
        let (g, io) = decode_graph(&config, &storage, dims, step.clone())?;
        let align = gpu.alignment();
        let graph = g.compile(&gpu, &|input| match *input {
            ParamInput::Piece(id, k, ParamCopy::Master) => params.view(id, k, align),
            other => Err(Error::Other(format!(
                "decoding binds the f32 weights alone, not {other:?}"
            ))),
        })?;
        let tokens_in = graph.tensor(io.tokens_in, 0).clone();
        let tokens_out = graph.tensor(io.tokens_out, 0).clone();
        let uniforms = graph.tensor(io.uniforms, 0).clone();
        let logits = graph.tensor(io.logits, 0).clone();
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
