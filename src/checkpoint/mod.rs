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
    /// How many times the loader has wrapped (the shuffled order of a shard folder is drawn
    /// per epoch).
    pub loader_epoch: u64,
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
        let hint = std::io::Error::new(
            e.kind(),
            format!(
                "{e}: the checkpoint was not written (its partial file is removed; earlier checkpoints are intact). Free space on that disk or choose another checkpoint folder"
            ),
        );
        return Err(Error::io(path, hint));
    }
    Ok(())
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses safetensors bytes, with an error that names the file.
pub fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    check_offsets(path, bytes)?;
    SafeTensors::deserialize(bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a valid safetensors file ({e}); it may be truncated or corrupt"),
        )
    })
}

/// The `__metadata__` map of safetensors bytes (None when the header has none).
pub fn read_metadata(path: &Path, bytes: &[u8]) -> Result<Option<HashMap<String, String>>> {
    check_offsets(path, bytes)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| {
        Error::format(
            path,
            format!("unreadable header ({e}); the file is truncated or not a safetensors file"),
        )
    })?;
    Ok(header.metadata().clone())
}

/// Checks that no tensor's `data_offsets` run past the end of the file, before the safetensors
/// crate reads them: it adds the last end offset to the header length unchecked, so offsets near
/// `usize::MAX` overflow there (a panic in debug builds) instead of giving an error. A header that
/// does not parse is left to the safetensors crate to report.
fn check_offsets(path: &Path, bytes: &[u8]) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Entry {
        data_offsets: Option<(u64, u64)>,
    }
    let Some((len, rest)) = bytes.split_first_chunk::<8>() else {
        return Ok(());
    };
    let Some(header) = usize::try_from(u64::from_le_bytes(*len))
        .ok()
        .and_then(|n| rest.get(..n))
    else {
        return Ok(());
    };
    let Ok(entries) = serde_json::from_slice::<HashMap<String, Entry>>(header) else {
        return Ok(());
    };
    let data_len = (rest.len() - header.len()) as u64;
    let past_end = entries
        .iter()
        .filter_map(|(name, e)| e.data_offsets.map(|(_, end)| (name, end)))
        .filter(|&(_, end)| end > data_len)
        .max_by_key(|&(_, end)| end);
    match past_end {
        Some((name, end)) => Err(Error::format(
            path,
            format!(
                "not a valid safetensors file (tensor '{name}' ends at byte {end} of the data, \
                 which has only {data_len} bytes); it may be truncated or corrupt"
            ),
        )),
        None => Ok(()),
    }
}

/// Smallest number of bytes one accepted element takes in a file (f16 and bf16).
const MIN_ELEMENT_BYTES: usize = 2;

/// Elements the parameters of `c` take with `wte_rows` rows of `wte`, or None if the count
/// overflows `usize`.
fn param_elements(c: &GptConfig, wte_rows: usize) -> Option<usize> {
    let e = c.n_embd;
    // Per block: two LayerNorms (2e each), c_attn (3e*e + 3e), attn c_proj (e*e + e),
    // c_fc (4e*e + 4e), mlp c_proj (4e*e + e): 12e^2 + 13e.
    let block = e
        .checked_mul(e)?
        .checked_mul(12)?
        .checked_add(e.checked_mul(13)?)?;
    wte_rows
        .checked_mul(e)?
        .checked_add(c.block_size.checked_mul(e)?)?
        .checked_add(c.n_layer.checked_mul(block)?)?
        .checked_add(e.checked_mul(2)?)
}

/// Refuses a config whose parameters cannot be in a file of `file_len` bytes (the file holds
/// `wte_rows` rows of `wte`), before anything is laid out or allocated for them: a damaged or
/// hostile config must not make the loader allocate gigabytes, loop for hours or overflow.
fn check_fits(
    path: &Path,
    source: &str,
    hint: &str,
    c: &GptConfig,
    wte_rows: usize,
    file_len: usize,
) -> Result<()> {
    let counted = param_elements(c, wte_rows).zip(param_elements(c, c.padded_vocab_size));
    let Some((n, _)) = counted else {
        return Err(Error::format(
            path,
            format!(
                "{source} describes a model whose parameter count overflows ({}); {hint}",
                c.describe()
            ),
        ));
    };
    match n.checked_mul(MIN_ELEMENT_BYTES) {
        Some(bytes) if bytes <= file_len => Ok(()),
        _ => Err(Error::format(
            path,
            format!(
                "{source} describes {n} parameters ({}), which take at least {} bytes, but the \
                 file has only {file_len}; {hint}",
                c.describe(),
                n.saturating_mul(MIN_ELEMENT_BYTES)
            ),
        )),
    }
}

/// Checks a tensor's shape and dtype (f32, f16 and bf16 accepted) against what is expected.
fn check_tensor(path: &Path, key: &str, view: &TensorView<'_>, shape: &[usize]) -> Result<()> {
    if view.shape() != shape {
        return Err(Error::format(
            path,
            format!(
                "tensor '{key}' has shape {:?}, expected {shape:?}",
                view.shape()
            ),
        ));
    }
    match view.dtype() {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => Ok(()),
        other => Err(Error::format(
            path,
            format!("tensor '{key}' has dtype {other:?}; expected F32, F16 or BF16"),
        )),
    }
}

/// Copies a tensor's elements out as f32 (f32, f16 and bf16 accepted), checking its shape.
pub fn tensor_f32(
    path: &Path,
    key: &str,
    view: &TensorView<'_>,
    shape: &[usize],
) -> Result<Vec<f32>> {
    check_tensor(path, key, view, shape)?;
    Ok(elements_f32(view))
}

/// A tensor's elements as f32, for a view that [`check_tensor`] accepted.
fn elements_f32(view: &TensorView<'_>) -> Vec<f32> {
    let data = view.data();
    match view.dtype() {
        // Tensor bytes need not be aligned in the file: copy rather than cast in place.
        Dtype::F16 => bytemuck::pod_collect_to_vec::<u8, half::f16>(data)
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        Dtype::BF16 => bytemuck::pod_collect_to_vec::<u8, half::bf16>(data)
            .into_iter()
            .map(|x| x.to_f32())
            .collect(),
        // F32, the only other dtype check_tensor lets through.
        _ => bytemuck::pod_collect_to_vec(data),
    }
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
        for (id, e) in layout.entries.iter() {
            let r = e.range();
            tensors.push((id.name(), e.shape.clone(), &self.params[r.clone()]));
            if let Some((m, v)) = &self.moments {
                tensors.push((
                    format!("optim.m.{}", id.name()),
                    e.shape.clone(),
                    &m[r.clone()],
                ));
                tensors.push((format!("optim.v.{}", id.name()), e.shape.clone(), &v[r]));
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
            md.insert("loader_epoch".into(), s.loader_epoch.to_string());
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
        Checkpoint::from_bytes(path, &read_file(path)?)
    }

    /// Parses the bytes of one of our checkpoint files; `path` only names the file in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
        let st = parse(path, bytes)?;
        let md = read_metadata(path, bytes)?.ok_or_else(|| {
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
        check_fits(
            path,
            "the config in the checkpoint's metadata",
            "the file is truncated or its metadata is damaged",
            &config,
            config.padded_vocab_size,
            bytes.len(),
        )?;
        let layout = ParamLayout::new(&config);
        let has_moments = st.names().iter().any(|n| n.starts_with("optim.m."));
        // Every tensor is found and checked before the buffers are allocated.
        let mut views = Vec::new();
        for (id, e) in layout.entries.iter() {
            let get = |key: &str| -> Result<TensorView<'_>> {
                let view = st
                    .tensor(key)
                    .map_err(|_| Error::format(path, format!("missing tensor '{key}'")))?;
                check_tensor(path, key, &view, &e.shape)?;
                Ok(view)
            };
            let param = get(&id.name())?;
            let moment_views = if has_moments {
                Some((
                    get(&format!("optim.m.{}", id.name()))?,
                    get(&format!("optim.v.{}", id.name()))?,
                ))
            } else {
                None
            };
            views.push((e, param, moment_views));
        }
        let mut params = vec![0f32; layout.total];
        let mut moments = has_moments.then(|| (vec![0f32; layout.total], vec![0f32; layout.total]));
        for (e, param, moment_views) in &views {
            let r = e.range();
            params[r.clone()].copy_from_slice(&elements_f32(param));
            if let (Some((m, v)), Some((mv, vv))) = (moments.as_mut(), moment_views) {
                m[r.clone()].copy_from_slice(&elements_f32(mv));
                v[r].copy_from_slice(&elements_f32(vv));
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
                // Absent in checkpoints written before shard folders: epoch 0.
                loader_epoch: match md.contains_key("loader_epoch") {
                    true => meta_num(path, &md, "loader_epoch")?,
                    false => 0,
                },
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
    let rd = std::fs::read_dir(dir).map_err(|e| {
        let hint = match e.kind() {
            std::io::ErrorKind::NotFound => std::io::Error::new(
                e.kind(),
                "no such folder; --resume takes the folder a run wrote with --checkpoint-dir",
            ),
            _ => e,
        };
        Error::io(dir, hint)
    })?;
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

/// Checkpoints a run keeps by default: the newest three.
pub const DEFAULT_KEEP_LAST: usize = 3;

/// Makes sure checkpoints can be written in `dir` before a run trains anything: creates the
/// folder and writes, then removes, a small probe file.
pub fn check_writable(dir: &Path) -> Result<()> {
    let why = |e: std::io::Error| {
        Error::io(
            dir,
            std::io::Error::new(
                e.kind(),
                format!("checkpoints cannot be written here ({e}); pick another folder"),
            ),
        )
    };
    std::fs::create_dir_all(dir).map_err(why)?;
    let probe = dir.join(format!(".write-test-{}", std::process::id()));
    std::fs::write(&probe, b"checkpoint folder write test").map_err(why)?;
    std::fs::remove_file(&probe).map_err(why)
}

/// Deletes all but the newest `keep` checkpoints in `dir` (`keep` = 0 keeps every one), never
/// one of `protect` (the checkpoint just written, the one the run resumed from). Returns the
/// files deleted. Files that are not checkpoints are left alone.
pub fn prune(dir: &Path, keep: usize, protect: &[&Path]) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for (_, path) in list_checkpoints(dir)?.into_iter().skip(keep) {
        if protect.iter().any(|p| *p == path) {
            continue;
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        removed.push(path);
    }
    Ok(removed)
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
