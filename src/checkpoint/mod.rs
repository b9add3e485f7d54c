//! Checkpoints (our own safetensors files) and Hugging Face GPT-2 import/export.
//!
//! A checkpoint is one safetensors file holding every parameter under its Hugging Face-style name
//! (our [out, in] layout, padded vocabulary rows included), the AdamW moments as
//! `optim.m.<name>` / `optim.v.<name>`, and in its metadata the config, the step, the loader
//! position, the RNG state, the loss scale and the run's settings. It is written to a temporary
//! file in the same folder, flushed to disk and renamed, so a crash never leaves a
//! half-written checkpoint under a checkpoint's name.

pub mod hf;

use crate::error::{Error, Result};
use crate::model::{GptConfig, ParamLayout};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "wgpt-checkpoint";
const PREFIX: &str = "ckpt_step";
const SUFFIX: &str = ".safetensors";

/// Everything a run needs to continue exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Optimiser steps completed.
    pub step: usize,
    /// AdamW's own step count (skipped steps do not advance it).
    pub adam_t: usize,
    pub loader_position: usize,
    pub rng_state: [u64; 4],
    pub loss_scale: f32,
    pub clean_steps: usize,
    /// The run's settings as JSON (batch, sequence, schedule...), checked on resume.
    pub settings: String,
}

/// A checkpoint in memory: flat parameters (and moments) in the layout of `config`.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub config: GptConfig,
    pub params: Vec<f32>,
    /// AdamW first and second moments, when the file has them.
    pub moments: Option<(Vec<f32>, Vec<f32>)>,
    pub state: Option<TrainState>,
}

/// A `View` over f32 data for the safetensors writer.
struct F32View<'a> {
    shape: Vec<usize>,
    data: &'a [f32],
}

impl safetensors::View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(bytemuck::cast_slice(self.data))
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// Writes `tensors` and `metadata` to `path` atomically: a temporary sibling file, flushed and
/// synced, then renamed over `path`.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: Vec<(String, Vec<usize>, &[f32])>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, F32View)> = tensors
        .into_iter()
        .map(|(n, shape, data)| (n, F32View { shape, data }))
        .collect();
    let bytes = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::format(path, format!("could not serialise: {e}")))?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("checkpoint");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses safetensors bytes, with an error that names the file.
pub fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file ({e}); it may be truncated or corrupt"),
        )
    })
}

/// Copies a tensor's elements out as f32 (f32, f16 and bf16 accepted), checking its shape.
pub fn tensor_f32(
    path: &Path,
    key: &str,
    view: &TensorView<'_>,
    shape: &[usize],
) -> Result<Vec<f32>> {
    if view.shape() != shape {
        return Err(Error::format(
            path,
            format!(
                "tensor '{key}' has shape {:?}, expected {shape:?}",
                view.shape()
            ),
        ));
    }
    let data = view.data();
    Ok(match view.dtype() {
        // Tensor bytes need not be aligned in the file: copy rather than cast in place.
        Dtype::F32 => bytemuck::pod_collect_to_vec(data),
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(data)
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(data)
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        other => {
            return Err(Error::format(
                path,
                format!("tensor '{key}' has dtype {other:?}; expected F32, F16 or BF16"),
            ))
        }
    })
}

fn meta<'a>(path: &Path, m: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
    m.get(key)
        .map(|s| s.as_str())
        .ok_or_else(|| Error::format(path, format!("checkpoint metadata has no '{key}'")))
}

fn meta_num<T: std::str::FromStr>(
    path: &Path,
    m: &HashMap<String, String>,
    key: &str,
) -> Result<T> {
    meta(path, m, key)?
        .parse()
        .map_err(|_| Error::format(path, format!("checkpoint metadata '{key}' is not a number")))
}

impl Checkpoint {
    /// Saves to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let layout = ParamLayout::new(&self.config);
        if self.params.len() != layout.total {
            return Err(Error::Other(format!(
                "checkpoint has {} parameters for a layout of {}",
                self.params.len(),
                layout.total
            )));
        }
        let mut tensors = Vec::new();
        for e in &layout.entries {
            let r = e.offset..e.offset + e.len();
            tensors.push((e.name.clone(), e.shape.clone(), &self.params[r.clone()]));
            if let Some((m, v)) = &self.moments {
                tensors.push((
                    format!("optim.m.{}", e.name),
                    e.shape.clone(),
                    &m[r.clone()],
                ));
                tensors.push((format!("optim.v.{}", e.name), e.shape.clone(), &v[r]));
            }
        }
        let mut md = HashMap::new();
        md.insert("format".to_string(), FORMAT.to_string());
        md.insert(
            "config".to_string(),
            serde_json::to_string(&self.config).map_err(|e| Error::Other(e.to_string()))?,
        );
        if let Some(s) = &self.state {
            md.insert("step".into(), s.step.to_string());
            md.insert("adam_t".into(), s.adam_t.to_string());
            md.insert("loader_position".into(), s.loader_position.to_string());
            md.insert(
                "rng_state".into(),
                s.rng_state
                    .iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            md.insert("loss_scale".into(), s.loss_scale.to_string());
            md.insert("clean_steps".into(), s.clean_steps.to_string());
            md.insert("settings".into(), s.settings.clone());
        }
        write_safetensors_atomic(path, tensors, md)
    }

    /// Loads one of our checkpoint files.
    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = read_file(path)?;
        let st = parse(path, &bytes)?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(path, format!("unreadable header: {e}")))?;
        let md = header.metadata().clone().ok_or_else(|| {
            Error::format(
                path,
                "no metadata: not a checkpoint written by this program",
            )
        })?;
        if md.get("format").map(|s| s.as_str()) != Some(FORMAT) {
            return Err(Error::format(
                path,
                "not a checkpoint written by this program (metadata 'format' is not wgpt-checkpoint)",
            ));
        }
        let config: GptConfig = serde_json::from_str(meta(path, &md, "config")?)
            .map_err(|e| Error::format(path, format!("malformed config in metadata: {e}")))?;
        config
            .validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        let layout = ParamLayout::new(&config);
        let has_moments = st.names().iter().any(|n| n.starts_with("optim.m."));
        let mut params = vec![0f32; layout.total];
        let mut moments = has_moments.then(|| (vec![0f32; layout.total], vec![0f32; layout.total]));
        for e in &layout.entries {
            let r = e.offset..e.offset + e.len();
            let get = |key: &str| -> Result<Vec<f32>> {
                let view = st
                    .tensor(key)
                    .map_err(|_| Error::format(path, format!("missing tensor '{key}'")))?;
                tensor_f32(path, key, &view, &e.shape)
            };
            params[r.clone()].copy_from_slice(&get(&e.name)?);
            if let Some((m, v)) = moments.as_mut() {
                m[r.clone()].copy_from_slice(&get(&format!("optim.m.{}", e.name))?);
                v[r].copy_from_slice(&get(&format!("optim.v.{}", e.name))?);
            }
        }
        let state = if md.contains_key("step") {
            let rng: Vec<u64> = meta(path, &md, "rng_state")?
                .split(',')
                .map(|s| s.parse::<u64>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| Error::format(path, "malformed rng_state in metadata"))?;
            let rng_state: [u64; 4] = rng
                .try_into()
                .map_err(|_| Error::format(path, "rng_state must hold 4 numbers"))?;
            Some(TrainState {
                step: meta_num(path, &md, "step")?,
                adam_t: meta_num(path, &md, "adam_t")?,
                loader_position: meta_num(path, &md, "loader_position")?,
                rng_state,
                loss_scale: meta_num(path, &md, "loss_scale")?,
                clean_steps: meta_num(path, &md, "clean_steps")?,
                settings: meta(path, &md, "settings")?.to_string(),
            })
        } else {
            None
        };
        Ok(Checkpoint {
            config,
            params,
            moments,
            state,
        })
    }
}

/// The file name of the checkpoint after `step` steps.
pub fn checkpoint_path(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("{PREFIX}{step:08}{SUFFIX}"))
}

/// Checkpoint files in `dir`, newest first (by step number in the name).
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut found = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.strip_suffix(SUFFIX))
        {
            if let Ok(step) = num.parse::<usize>() {
                found.push((step, entry.path()));
            }
        }
    }
    found.sort_by_key(|&(step, _)| std::cmp::Reverse(step));
    Ok(found)
}

/// The newest checkpoint in `dir` that loads completely (a damaged newer file is reported
/// on stderr and skipped).
pub fn load_newest(dir: &Path) -> Result<(PathBuf, Checkpoint)> {
    let all = list_checkpoints(dir)?;
    if all.is_empty() {
        return Err(Error::format(
            dir,
            "no checkpoint (ckpt_stepNNNNNNNN.safetensors) in this folder; train with --checkpoint-dir first",
        ));
    }
    let mut last_err = None;
    for (_, path) in all {
        match Checkpoint::load(&path) {
            Ok(c) => return Ok((path, c)),
            Err(e) => {
                eprintln!("skipping unreadable checkpoint: {e}");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.expect("at least one checkpoint was tried"))
}
