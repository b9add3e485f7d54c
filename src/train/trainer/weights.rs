//! The parameters' copies on the GPU and their way in and out: weights set or loaded from a
//! checkpoint, read back, and a checkpoint of the whole run.

use super::Trainer;
use crate::checkpoint::{Checkpoint, TrainState};
use crate::data::LoaderState;
use crate::error::{Error, Result};
use crate::gpu::Tensor;
use crate::graph::gpt::{ParamCopy, ParamInput};
use crate::model::StoredParams;
use crate::ops::elementwise as ew;
use crate::rng::Rng;

/// The parameters' copies a step binds (the graph's [`ParamInput`]s): the model's weights,
/// their f16 copies, gradients and AdamW's moments, each stored as the memory plan says.
pub(super) struct Weights {
    pub params: StoredParams,
    /// f16 copies of the weights (mixed precision only).
    pub params_f16: Option<StoredParams>,
    pub grads: StoredParams,
    pub m: StoredParams,
    pub v: StoredParams,
}

impl Weights {
    fn copy(&self, copy: ParamCopy) -> Result<&StoredParams> {
        match copy {
            ParamCopy::Master => Ok(&self.params),
            ParamCopy::Half => self
                .params_f16
                .as_ref()
                .ok_or_else(|| Error::Other("no f16 copy of the parameters in f32 runs".into())),
            ParamCopy::Grad => Ok(&self.grads),
            ParamCopy::AdamM => Ok(&self.m),
            ParamCopy::AdamV => Ok(&self.v),
        }
    }

    /// The tensor behind a graph input.
    pub fn bind(&self, input: &ParamInput, alignment: u64) -> Result<Tensor> {
        Ok(match *input {
            ParamInput::Piece(id, piece, copy) => self.copy(copy)?.view(id, piece, alignment)?,
            ParamInput::Buffer(copy, b) => self.copy(copy)?.buffers[b].clone(),
        })
    }
}

impl Trainer {
    /// Uploads master weights (flat, in the canonical [`ParamLayout`]) and refreshes their f16
    /// copies.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        self.weights
            .params
            .upload(&self.gpu, &self.layout, params)?;
        if let Some(h) = &self.weights.params_f16 {
            let casts = h
                .buffers
                .iter()
                .zip(&self.weights.params.buffers)
                .map(|(half, full)| ew::cast(&self.gpu, half, full))
                .collect::<Result<Vec<_>>>()?;
            self.gpu.run(&casts.iter().collect::<Vec<_>>())?;
        }
        Ok(())
    }

    pub(super) fn load(&mut self, c: &Checkpoint) -> Result<()> {
        self.set_params(&c.params)?;
        if let (Some((m, v)), Some(s)) = (&c.moments, &c.state) {
            self.weights.m.upload(&self.gpu, &self.layout, m)?;
            self.weights.v.upload(&self.gpu, &self.layout, v)?;
            self.step = s.step;
            self.adam_t = s.adam_t;
            self.loader.set_state(LoaderState {
                epoch: s.loader_epoch,
                position: s.loader_position,
            })?;
            self.rng = Rng::from_state(s.rng_state);
            self.loss_scale = s.loss_scale;
            self.clean_steps = s.clean_steps;
        }
        Ok(())
    }

    /// The master weights on the GPU. A [`crate::sample::Generator`] built on them samples
    /// from the current weights without copying them.
    pub fn stored_params(&self) -> &StoredParams {
        &self.weights.params
    }

    /// Master weights, flat in the canonical [`ParamLayout`].
    pub fn params(&self) -> Result<Vec<f32>> {
        self.weights.params.download(&self.gpu, &self.layout)
    }

    /// The gradients of the last step (scaled by the loss scale it used), flat like
    /// [`Trainer::params`].
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.weights.grads.download(&self.gpu, &self.layout)
    }

    /// Everything needed to continue this run exactly (after every queued step is collected).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        self.expect_idle("a checkpoint")?;
        Ok(Checkpoint {
            config: self.settings.config,
            params: self.params()?,
            moments: Some((
                self.weights.m.download(&self.gpu, &self.layout)?,
                self.weights.v.download(&self.gpu, &self.layout)?,
            )),
            state: Some(TrainState {
                step: self.step,
                adam_t: self.adam_t,
                loader_position: self.loader.position(),
                loader_epoch: self.loader.state().epoch,
                rng_state: self.rng.state(),
                loss_scale: self.loss_scale,
                clean_steps: self.clean_steps,
                settings: serde_json::to_string(&self.settings)
                    .map_err(|e| Error::Other(e.to_string()))?,
            }),
        })
    }
}
