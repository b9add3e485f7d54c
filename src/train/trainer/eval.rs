//! Forward passes outside the step: evaluation losses, and the gradients of given batches
//! (gradient checks).

use super::Trainer;
use crate::data::Batch;
use crate::error::{Error, Result};

impl Trainer {
    /// The forward pass alone on each batch (B*T inputs and targets): each position's loss,
    /// B*T per batch. Nothing the next step reads is changed (the gradients are zeroed by
    /// every step's head, the loss likewise), so evaluations may come between any two steps.
    pub fn position_losses(&mut self, batches: &[Batch]) -> Result<Vec<Vec<f32>>> {
        self.expect_idle("an evaluation")?;
        let n = self.settings.batch_size * self.settings.seq_len;
        let vocab = self.settings.config.vocab_size;
        let mut out = Vec::with_capacity(batches.len());
        for b in batches {
            if b.x.len() != n || b.y.len() != n {
                return Err(Error::Other(format!(
                    "an evaluation batch holds {} inputs and {} targets; the run's B*T is {n}",
                    b.x.len(),
                    b.y.len()
                )));
            }
            if let Some(&bad) = b.x.iter().chain(&b.y).find(|&&t| t as usize >= vocab) {
                return Err(Error::Config(format!(
                    "token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            // The forward pass alone: no embedding-backward buckets.
            self.upload_inputs(0, &b.x, &b.y)?;
            let gpu = self.gpu.clone();
            gpu.scoped("evaluation", || -> Result<()> {
                let mut enc = gpu
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("evaluation"),
                    });
                {
                    let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                        label: Some("forward"),
                        timestamp_writes: None,
                    });
                    self.graph.record_forward(&mut pass, 0);
                }
                gpu.queue.submit([enc.finish()]);
                Ok(())
            })??;
            out.push(self.gpu.read(self.t(self.io.losses))?);
        }
        Ok(out)
    }

    /// The mean loss over `batches` (forward passes alone), summed in f64.
    pub fn mean_loss(&mut self, batches: &[Batch]) -> Result<f64> {
        let losses = self.position_losses(batches)?;
        let count: usize = losses.iter().map(|l| l.len()).sum();
        let sum: f64 = losses.iter().flatten().map(|&l| l as f64).sum();
        Ok(sum / count.max(1) as f64)
    }

    /// Forward and backward on the given micro-batches without an optimiser step: returns the
    /// mean loss and the unscaled gradients (for gradient checks; in a data-parallel job, this
    /// rank's share, not reduced).
    pub fn loss_and_grads(&mut self, batches: &[(Vec<u32>, Vec<u32>)]) -> Result<(f32, Vec<f32>)> {
        if batches.len() != self.settings.grad_accum {
            return Err(Error::Other(format!(
                "{} micro-batches given for grad_accum {}",
                batches.len(),
                self.settings.grad_accum
            )));
        }
        self.expect_idle("a gradient check")?;
        self.upload_batches(batches)?;
        let gpu = self.gpu.clone();
        gpu.scoped("forward and backward", || -> Result<()> {
            let commands = self.encode(false, None)?;
            gpu.queue.submit(commands);
            Ok(())
        })??;
        let loss = gpu.read(self.t(self.io.loss))?[0];
        let inv = 1.0 / self.loss_scale;
        let g = self.grads()?.into_iter().map(|x| x * inv).collect();
        Ok((loss, g))
    }
}
